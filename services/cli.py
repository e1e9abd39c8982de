"""The ``genderlens`` command. Each subcommand lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when their subcommand runs,
so ``genderlens capture`` and ``genderlens view`` never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("services.up", "run every service as local processes (Redis included when needed)"),
    "capture": ("services.capture.main", "publish frames from one source to Redis"),
    "infer": ("services.inference.main", "run one inference worker (consumer group member)"),
    "view": ("services.viewer.main", "serve the annotated live view and the HTTP API"),
    "train": ("trainer.train", "train a classifier on a face dataset and publish a model version"),
    "eval": ("trainer.evaluate", "evaluate a model end to end on uncropped photos"),
    "bench": ("services.inference.bench", "benchmark naive loop vs batched pipeline vs full system"),
    "models": ("services.models_cli", "list, promote or roll back model versions"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genderlens",
        description="Real-time perceived-gender detection on live video (Redis Streams microservices).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv if a in COMMANDS), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        # Only the chosen subcommand's module is imported (and so only it pulls its dependencies).
        if name == wanted:
            importlib.import_module(module).add_arguments(p)
    return parser


def _quiet_openmp() -> None:
    """Make idle OpenMP threads sleep instead of spin, unless the user chose otherwise.

    With libgomp's default (spin at every barrier), a torch process whose cores are not all free -- a
    worker beside Redis and capture, two workers on two cores, a trainer beside anything -- collapses:
    measured 5 frames/s instead of 130 (docs/benchmarks.md, "The OpenMP trap"). libgomp reads this once
    when torch loads it, so it must be set here, before any subcommand imports torch. This is a runtime
    knob of a library, not a genderlens setting, hence the environment.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_openmp()
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args = parser.parse_args(args_list)
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
