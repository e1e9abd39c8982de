"""The viewer's routes, one router per concern: ``pages`` (the wall page, login, /docs), ``streams``
(MJPEG and snapshots), ``api`` (cameras, results, stats, model, events), ``ws`` (the WebSocket) and
``ops`` (health, readiness, metrics)."""
