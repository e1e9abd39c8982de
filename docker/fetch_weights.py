"""Put every pinned detector weight file into a folder, checked against its sha256 (image build step).

    python docker/fetch_weights.py DEST                  # download from the pinned URLs (shared/weights.py)
    python docker/fetch_weights.py DEST --base-url URL   # download the same files from a mirror (URL/NAME)
    python docker/fetch_weights.py DEST --from DIR       # copy from a local folder instead (offline builds)
    python docker/fetch_weights.py DEST --local DIR      # each file from DIR when it is there, else download
    python docker/fetch_weights.py DIR --check           # only verify DIR holds every file, intact

The URLs and digests live in ``shared/weights.py`` only; this script loads that file by path (with the
folder holding ``shared/`` on the import path, for the modules it imports), so the build stage that runs
it needs nothing but ``shared/`` and the standard library: no installed project. Every file, wherever it
came from, is checked against its pinned sha256: a mismatch (or a missing file) fails the build.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import urllib.request
from pathlib import Path
from types import ModuleType

WEIGHTS_PY = Path(__file__).resolve().parents[1] / "shared" / "weights.py"


def load_weights_module(path: Path = WEIGHTS_PY) -> ModuleType:
    root = str(path.resolve().parents[1])  # shared/weights.py imports shared.fsutil
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location("genderlens_pinned_weights", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def download(url: str, path: Path, timeout_s: float) -> None:
    """Fetch url into path (the caller checks the digest, and a mismatch fails the build)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp, path.open("wb") as out:
            shutil.copyfileobj(resp, out)
    except OSError as exc:
        raise OSError(f"could not download {url} ({exc})") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dest", type=Path, help="folder to fill (or to check)")
    parser.add_argument("--from", dest="source", type=Path, help="copy from this folder, no download")
    parser.add_argument(
        "--local",
        type=Path,
        help="take each file from this folder when it is there (checked like a download), else download it",
    )
    parser.add_argument(
        "--base-url", default="", help="download NAME from BASE_URL/NAME instead of the pinned URL"
    )
    parser.add_argument(
        "--ca-bundle",
        type=Path,
        help="trust this CA bundle for downloads, when the file exists (a mirror's CA)",
    )
    parser.add_argument("--check", action="store_true", help="verify dest only")
    parser.add_argument("--weights-py", type=Path, default=WEIGHTS_PY, help="file defining WEIGHTS")
    parser.add_argument("--timeout", type=float, default=120.0, help="download timeout per file (s)")
    args = parser.parse_args(argv)

    weights = load_weights_module(args.weights_py)
    if args.ca_bundle is not None and args.ca_bundle.is_file():
        os.environ["SSL_CERT_FILE"] = str(args.ca_bundle)  # urllib's default context reads it
    args.dest.mkdir(parents=True, exist_ok=True)
    for name, spec in sorted(weights.WEIGHTS.items()):
        source = args.source
        if source is None and args.local is not None and (args.local / name).is_file():
            source = args.local
        try:
            if args.check:
                path = weights.resolve_weights(name, args.dest, args.dest)
            elif source is not None:
                src = weights.resolve_weights(name, source, source)
                path = args.dest / name
                shutil.copyfile(src, path)
                weights.resolve_weights(name, args.dest, args.dest)
            elif args.base_url:
                path = args.dest / name
                download(f"{args.base_url.rstrip('/')}/{name}", path, args.timeout)
                weights.resolve_weights(name, args.dest, args.dest)
            else:
                path = weights.resolve_weights(name, None, args.dest, download_timeout_s=args.timeout)
        except (weights.WeightsError, OSError) as exc:
            sys.stderr.write(f"error: {name}: {exc}\n")
            return 1
        sys.stdout.write(f"ok {path} sha256={spec.sha256}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
