"""``python -m tools.bench [FLAGS]``: the same command as ``genderlens bench [FLAGS]``, through the same
CLI (which also makes idle OpenMP threads sleep before torch loads, as every measured run did)."""

from __future__ import annotations

import sys

from services.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
