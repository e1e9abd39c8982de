"""Helpers shared by the tests: no tests here (pytest collects ``test_*.py`` files only).

One home per job: ``paths`` (the one place that knows where ``../shared`` is), ``waiting``
(``wait_until``), ``net`` (``free_port``), ``redis_servers`` (the test Redis and throw-away servers),
``processes`` (real ``genderlens`` processes), ``photos`` and ``media`` (frames, clips, JPEGs),
``artifacts`` and ``datasets`` (model artifacts, training subsets), ``accounting``, ``viewer``,
``browser`` and ``deploy``. Fixtures built on them live in ``tests/conftest.py``.
"""
