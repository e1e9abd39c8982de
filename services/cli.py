"""The ``genderlens`` command. Each subcommand lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when their subcommand runs,
so ``genderlens capture`` and ``genderlens view`` never import torch.

``genderlens bench`` is a development tool: it lives in the source checkout's top-level ``tools/``,
which no wheel and so no image contains. From a checkout (an editable install) it is found next to
``services/``; elsewhere the command says so and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("services.up", "run every service as local processes (Redis included when needed)"),
    "capture": ("services.capture.main", "publish frames from one source to Redis"),
    "infer": ("services.inference.main", "run one inference worker (consumer group member)"),
    "view": ("services.viewer.main", "serve the annotated live view and the HTTP API"),
    "train": ("trainer.train", "train a classifier on a face dataset and publish a model version"),
    "eval": ("trainer.evaluate", "evaluate a model end to end on uncropped photos"),
    "bench": ("tools.bench.cli", "benchmark naive loop vs batched pipeline vs full system (dev tool)"),
    "models": ("services.models_cli", "list, promote or roll back model versions"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genderlens",
        description="Real-time perceived-gender detection on live video (Redis Streams microservices).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv if a in COMMANDS), None)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        # Only the chosen subcommand's module is imported (and so only it pulls its dependencies).
        if name == wanted:
            load_command(name).add_arguments(p)
    return parser


def load_command(name: str) -> ModuleType:
    """Import the module of subcommand ``name``. A dev tool (``tools.*``) is looked for in the source
    checkout this package runs from; where there is none (an image, a wheel install) the command exits
    with what to install instead of a traceback (a missing extra is the tool's own clear error)."""
    module = COMMANDS[name][0]
    if not module.startswith("tools."):
        return importlib.import_module(module)
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "tools" / "__init__.py").is_file() and str(checkout) not in sys.path:
        sys.path.append(str(checkout))
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if not exc.name or not (module == exc.name or module.startswith(exc.name + ".")):
            raise  # a missing dependency of the tool, not the tool itself
        raise SystemExit(
            f"genderlens {name}: a development tool, found only in a source checkout of genderlens "
            f"(its tools/ folder; images and wheels leave it out): install from a checkout with "
            f"pip install -e '.[{name}]'"
        ) from None


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
    return int(load_command(args.command).run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
