"""``genderlens bench``: the naive loop vs the batched pipeline vs the full system, on the same frames.

A clip is composed from real face photos (1-4 portraits pasted into each 640x480 frame, JPEG-encoded as
capture does), then measured three ways in one run:

1. ``naive``: the loop a tutorial writes, in this process, no Redis: per frame ``cv2.imdecode``,
   ``cv2.FaceDetectorYN.detect`` (same ONNX, same thresholds and the same no-face retry at the
   fallback sides as cv2-yunet), then for each face one at a
   time: crop, to tensor, normalise, forward pass with a batch of one. Its crop is the shared
   landmark alignment applied to that one face, so that its detections and labels must be identical to
   the pipeline's (checked, and reported under ``identical``). ``naive_bbox`` is the same loop with the
   literal tutorial crop (box slice + ``cv2.resize``), reported for its speed and how often its labels
   agree; it is not the baseline, because its outputs differ.
2. ``pipeline``: :class:`services.inference.pipeline.Pipeline` (the worker's own code) on batches of
   ``--batch-size`` frames, in this process, no Redis: the compute ceiling.
3. ``system``: a throw-away Redis, a publisher process per run (capture's wire format and accounting)
   and ``--workers`` real worker processes (``build_worker``, the code ``genderlens infer`` runs), at
   maximum rate (closed loop: the publisher keeps ``2 x batch x workers`` frames in flight, so workers
   never starve and queues stay bounded) and at a fixed ``--rate-fps`` per camera. Latency is the
   Result's ``published - captured``. ``scaling`` repeats the max-rate run with one and with two
   workers of one thread each.

Figures: frames/s, faces/s, latency p50/p95/p99 (in-process modes: from the moment the frame's batch is
handed over to the moment its output is back, i.e. what the frame waits for its batch), mean ms per
frame per stage, CPU% (100 = one core) and resident memory of the processes doing the work.

A development tool: it lives in the source checkout's ``tools/`` (no wheel or image contains it) and
needs the ``bench`` extra (psutil). Modules: :mod:`.clip` (the test clip), :mod:`.measure` (CPU, memory,
percentiles, the host's load), :mod:`.inprocess` (naive and pipeline), :mod:`.system` (publisher ->
workers -> results on a throw-away Redis) with :mod:`.processes` (the child processes), :mod:`.report`
(table and ratios) and :mod:`.cli` (the command). ``python -m tools.bench`` = ``genderlens bench``.
"""
