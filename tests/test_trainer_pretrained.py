"""Training on dlib's pretrained backbone: frozen (cached embeddings + head) and fine-tuned (last blocks),
on a tiny real subset of ../shared; the artifacts carry the backbone's contract; the embedding cache
resumes chunk by chunk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from services.cli import main as cli_main
from shared.models.artifact import current_dir, load_artifact, read_meta
from shared.models.dlib_resnet import DlibResNet
from tests.helpers.datasets import class_subset
from tests.helpers.paths import TRAIN_DIR as TRAIN
from tests.helpers.paths import WEIGHTS_DIR as WEIGHTS
from tests.helpers.paths import skip_without
from trainer import features
from trainer.features import extract_view
from trainer.pretrained import BACKBONES, backbone_state

needs_shared = skip_without(TRAIN / "female", WEIGHTS)


def _subset(dest: Path, per_class: int = 16) -> Path:
    return class_subset(TRAIN, dest, per_class, step=600)


def _args(data: Path, tmp: Path, *extra: str) -> list[str]:
    return [
        "train", "--data", str(data), "--arch", "dlib_resnet", "--threads", "1", "--batch-size", "16",
        "--out", str(tmp / "models"), "--cache-dir", str(tmp / "cache"), "--weights-dir", str(WEIGHTS),
        "--val-fraction", "0.25", "--test-fraction", "0.2", "--no-announce", "--head-epochs", "4",
        "--feature-views", "1", "--flip-tta", "off", *extra,
    ]  # fmt: skip


@needs_shared
def test_frozen_run_publishes_the_backbone_contract(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _subset(tmp_path / "data")
    assert cli_main(_args(data, tmp_path, "--mode", "frozen")) == 0
    out = capsys.readouterr().out
    assert "head fitted on" in out and "proxies: color" in out
    art = current_dir(tmp_path / "models")
    assert art is not None
    meta = read_meta(art)
    spec = BACKBONES["dlib_resnet"]
    assert (meta.arch, meta.backbone, meta.mode, meta.template) == (
        "dlib_resnet",
        spec.name,
        "frozen",
        "dlib",
    )
    assert meta.input_size == 150 and meta.mean == list(spec.mean) and meta.std == list(spec.std)
    assert (art / "model.safetensors").stat().st_size < 30 * 2**20
    # Frozen means frozen: every backbone tensor in the artifact is dlib's.
    saved = load_file(str(art / "model.safetensors"))
    for name, tensor in backbone_state("dlib_resnet").items():
        assert torch.equal(saved[f"backbone.{name}"], tensor), name
    clf = load_artifact(art)
    probs = clf.predict(torch.zeros((2, 3, 150, 150), dtype=torch.uint8))
    assert probs.shape == (2, 2) and torch.isfinite(probs).all()


@needs_shared
@pytest.mark.parametrize(
    ("backbone_lr_scale", "fine_tuning_helps"),
    [(0.1, None), (3000.0, False)],  # the default; a rate that wrecks the backbone in one epoch
)
def test_finetune_trains_only_the_last_blocks_and_keeps_what_validates_best(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    backbone_lr_scale: float,
    fine_tuning_helps: bool | None,
) -> None:
    data = _subset(tmp_path / "data", per_class=12)
    ckpt_dir = tmp_path / "ckpt"
    args = _args(
        data, tmp_path, "--mode", "finetune", "--trainable-blocks", "1", "--epochs", "1",
        "--backbone-lr-scale", str(backbone_lr_scale), "--checkpoint-dir", str(ckpt_dir),
    )  # fmt: skip
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "head fitted on" in out and "epoch 1:" in out
    # The fine-tuning epoch trained the last block only (its weights are in the checkpoint).
    pretrained = backbone_state("dlib_resnet")
    tuned = torch.load(ckpt_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    assert torch.equal(tuned["backbone.blocks.12.conv1.weight"], pretrained["blocks.12.conv1.weight"])
    assert not torch.equal(tuned["backbone.blocks.13.conv1.weight"], pretrained["blocks.13.conv1.weight"])
    # The artifact holds the candidate with the lower validation loss: the fitted head (4 head
    # epochs, best kept) or the fine-tuning epoch; the report and the log say which.
    art = current_dir(tmp_path / "models")
    assert art is not None
    meta = read_meta(art)
    assert meta.mode == "finetune" and meta.arch_config["trainable_blocks"] == 1
    training = json.loads((art / "report.json").read_text())["training"]
    head_rows, tune_rows = training["history"][:4], training["history"][4:]
    assert len(tune_rows) == 1
    helped = tune_rows[0]["val_loss"] < min(row["val_loss"] for row in head_rows) - 1e-4
    if fine_tuning_helps is not None:
        assert helped == fine_tuning_helps, training["history"]
    saved = load_file(str(art / "model.safetensors"))
    block13 = saved["backbone.blocks.13.conv1.weight"]
    if helped:
        assert training["best_epoch"] == 1 and "best: epoch 1 (val loss" in out
        assert torch.equal(block13, tuned["backbone.blocks.13.conv1.weight"])
    else:
        assert training["best_epoch"] == 0 and "best: the fitted head" in out
        assert torch.equal(block13, pretrained["blocks.13.conv1.weight"])


def test_embedding_cache_resumes_chunk_by_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features, "CHUNK", 4)
    net = DlibResNet().eval()
    crops = torch.randint(
        0, 256, (10, 3, 150, 150), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    index = np.arange(10, dtype=np.int64)
    mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.5)
    calls: list[int] = []

    def embed(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return net(x)

    first = extract_view(embed, crops, index, "plain", tmp_path, mean, std, torch.device("cpu"))
    assert sorted(p.name for p in tmp_path.glob("chunk-*.npy")) == [f"chunk-0000{i}.npy" for i in range(3)]
    assert sum(calls) == 10
    # An interrupted run: the middle chunk is missing. Only it is computed again.
    (tmp_path / "chunk-00001.npy").unlink()
    calls.clear()
    second = extract_view(embed, crops, index, "plain", tmp_path, mean, std, torch.device("cpu"))
    assert sum(calls) == 4
    assert torch.allclose(first.values, second.values, atol=1e-6)


def test_age_balance_weights_give_each_band_the_same_total() -> None:
    from trainer.features import age_balance_weights

    ages = ["20-29"] * 8 + ["3-9"] * 2 + ["0-2"] * 1 + [None]
    w = age_balance_weights(ages, cap=4.0)
    assert w.mean().item() == pytest.approx(1.0)
    total = {band: float(w[[i for i, a in enumerate(ages) if a == band]].sum()) for band in ("20-29", "3-9")}
    assert total["20-29"] == pytest.approx(total["3-9"])  # 8 x 1 vs 2 x 4
    assert float(w[10]) == pytest.approx(float(w[8]))  # the single 0-2 image is capped at 4x too
