"""The helpers every package shares, each with one home: atomic writes (``shared.fsutil``), the model
event (``shared.events``), the device rule (``shared.device``), logging set-up and a command's report
(``shared.runtime``)."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import BinaryIO

import pytest
import redis
import torch

from shared import constants as C
from shared.device import resolve_device
from shared.events import announce_model
from shared.fsutil import atomic_write
from shared.models.artifact import ModelMeta
from shared.preprocess import PREPROCESS_VERSION
from shared.runtime import LOG_FORMAT, say, setup_logging
from shared.schema import ModelEvent
from tests.helpers.redis_servers import redis_url_for_db


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "state.bin"
    atomic_write(target, b"first")  # the folder is created
    assert target.read_bytes() == b"first"

    def half_then_fail(fh: BinaryIO) -> None:
        fh.write(b"half of the sec")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"first"  # the old file, whole
    assert [p.name for p in target.parent.iterdir()] == ["state.bin"]  # no temp file left
    atomic_write(target, lambda fh: torch.save({"x": torch.ones(2)}, fh))
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.ones(2))


def _meta(version: str) -> ModelMeta:
    return ModelMeta(
        name="gender", version=version, arch="gendernet", classes=["female", "male"], input_size=64,
        margin=1.0, mean=[0.5] * 3, std=[0.5] * 3, preprocess_version=PREPROCESS_VERSION,
    )  # fmt: skip


def test_announce_model_adds_the_event_and_is_best_effort(caplog: pytest.LogCaptureFixture) -> None:
    url, version = redis_url_for_db(9), f"v{secrets.token_hex(4)}"
    assert announce_model(url, _meta(version), timeout_s=2.0, client_name="test")
    client = redis.Redis.from_url(url)
    try:
        entries = client.xrevrange(C.MODEL_EVENTS_STREAM, count=20)
    finally:
        client.close()
    events = [ModelEvent.from_fields(fields) for _, fields in entries]
    assert any((e.name, e.version, e.path) == ("gender", version, f"gender-{version}") for e in events)
    with caplog.at_level(logging.WARNING):
        assert not announce_model(
            "redis://:secret@127.0.0.1:1/0", _meta("v1"), timeout_s=1.0, client_name="t"
        )
    assert "could not announce gender-v1" in caplog.text and "secret" not in caplog.text


def test_resolve_device() -> None:
    assert resolve_device("cpu", "genderlens x") == torch.device("cpu")
    assert resolve_device("auto", "genderlens x").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="genderlens x: --device cuda:1 asked for, but no CUDA device"):
            resolve_device("cuda:1", "genderlens x")


def test_setup_logging_keeps_a_host_programs_handlers(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        root.handlers = [handler := logging.NullHandler()]
        setup_logging("INFO", replace=False)  # a command run inside another program
        assert root.handlers == [handler]
        setup_logging("WARNING")  # a service's main
        assert root.level == logging.WARNING and root.handlers != [handler]
        assert root.handlers[0].formatter is not None and root.handlers[0].formatter._fmt == LOG_FORMAT
    finally:
        root.handlers, _ = saved[0], root.setLevel(saved[1])
    say("figures")
    assert capsys.readouterr().out == "figures\n"
