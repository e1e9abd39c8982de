"""Keeps the current classifier loaded, and swaps in a new one without a restart.

A background thread looks at ``MODELS_DIR/current`` every ``poll_s`` (and at once when a model event
arrives on Redis); a new version is loaded and validated off the hot path (metadata contract, probe
forward pass), then swapped in with one reference assignment, which the worker reads once per batch.
A broken artifact is refused: the previous model keeps serving, and an error event is published.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from prometheus_client import Counter

from shared.models.artifact import ArtifactError, Classifier, current_dir, load_artifact

log = logging.getLogger(__name__)

MODEL_SWAPS = Counter("genderlens_worker_model_swaps_total", "New model versions swapped in")
MODEL_REFUSALS = Counter("genderlens_worker_model_refused_total", "Model artifacts refused as broken")


class ModelManager:
    def __init__(
        self,
        models_dir: Path,
        device: str,
        on_event: Callable[[str, str], None] | None = None,
    ) -> None:
        self.models_dir = models_dir
        self.device = device
        self.current: Classifier | None = None
        self._on_event = on_event or (lambda level, msg: None)
        self._seen: Path | None = None  # last pointer target tried (loaded or refused)
        self._pointer_error: str | None = None  # reported once, not at every poll
        self._wake = threading.Event()
        self._lock = threading.Lock()

    def check(self) -> bool:
        """Load the pointer's target if it changed. Returns True when a new model was swapped in."""
        with self._lock:
            try:
                target = current_dir(self.models_dir)
            except ArtifactError as exc:
                if str(exc) != self._pointer_error:
                    self._pointer_error = str(exc)
                    self._refuse(None, str(exc))
                return False
            self._pointer_error = None
            if target is None or target == self._seen:
                return False
            self._seen = target
            try:
                model = load_artifact(target, self.device)
            except ArtifactError as exc:
                self._refuse(target, str(exc))
                return False
            previous = self.current
            self.current = model  # the swap: workers pick it up at their next batch
            MODEL_SWAPS.inc()
            log.info(
                "serving model %s (was %s)",
                model.meta.dirname,
                previous.meta.dirname if previous else "none",
            )
            self._on_event("info", f"now serving model {model.meta.dirname}")
            return True

    def _refuse(self, target: Path | None, reason: str) -> None:
        serving = self.current.meta.dirname if self.current else "none"
        MODEL_REFUSALS.inc()
        log.error("refused model %s: %s (still serving %s)", target, reason, serving)
        self._on_event(
            "error", f"refused model {target.name if target else '?'}: {reason}; still serving {serving}"
        )

    def wake(self) -> None:
        self._wake.set()

    def watch(self, stop: threading.Event, poll_s: float) -> None:
        while not stop.is_set():
            try:
                self.check()
            except Exception:  # never let the watcher die: the worker must keep serving
                log.exception("model watcher error")
            self._wake.wait(poll_s)
            self._wake.clear()

    def start(self, stop: threading.Event, poll_s: float) -> threading.Thread:
        thread = threading.Thread(target=self.watch, args=(stop, poll_s), name="model-watcher", daemon=True)
        thread.start()
        return thread
