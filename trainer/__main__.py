"""``python -m trainer ...``: the train command (the trainer container's entry point)."""

from __future__ import annotations

from trainer.train import get_args_parser, main

if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
