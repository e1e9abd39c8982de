"""Put every pinned detector weight file into a folder, checked against its sha256 (image build step).

    python docker/fetch_weights.py DEST             # download from the pinned URLs (shared/weights.py)
    python docker/fetch_weights.py DEST --from DIR  # copy from a local folder instead (offline builds)
    python docker/fetch_weights.py DIR --check      # only verify DIR holds every file, intact

The URLs and digests live in ``shared/weights.py`` only; this script loads that file by path, so the
build stage that runs it needs nothing but that file and the standard library. A digest mismatch fails
the build.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

WEIGHTS_PY = Path(__file__).resolve().parents[1] / "shared" / "weights.py"


def load_weights_module(path: Path = WEIGHTS_PY) -> ModuleType:
    spec = importlib.util.spec_from_file_location("genderlens_pinned_weights", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dest", type=Path, help="folder to fill (or to check)")
    parser.add_argument("--from", dest="source", type=Path, help="copy from this folder, no download")
    parser.add_argument("--check", action="store_true", help="verify dest only")
    parser.add_argument("--weights-py", type=Path, default=WEIGHTS_PY, help="file defining WEIGHTS")
    parser.add_argument("--timeout", type=float, default=120.0, help="download timeout per file (s)")
    args = parser.parse_args(argv)

    weights = load_weights_module(args.weights_py)
    args.dest.mkdir(parents=True, exist_ok=True)
    for name, spec in sorted(weights.WEIGHTS.items()):
        try:
            if args.check:
                path = weights.resolve_weights(name, args.dest, args.dest)
            elif args.source is not None:
                src = weights.resolve_weights(name, args.source, args.source)
                path = args.dest / name
                shutil.copyfile(src, path)
                weights.resolve_weights(name, args.dest, args.dest)
            else:
                path = weights.resolve_weights(name, None, args.dest, download_timeout_s=args.timeout)
        except weights.WeightsError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return 1
        sys.stdout.write(f"ok {path} sha256={spec.sha256}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
