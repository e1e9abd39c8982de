"""bfloat16 serving on CPU is the artifact's choice and the CPU's ability, and stays close to float32."""

from __future__ import annotations

from pathlib import Path

import torch

from shared.models.artifact import cpu_has_native_bf16, load_artifact, publish_untrained


def test_cpu_bf16_follows_the_artifact_and_the_cpu(tmp_path: Path) -> None:
    allowed = publish_untrained(tmp_path / "a", name="bf", version="1", cpu_bf16=True)
    plain = publish_untrained(tmp_path / "b", name="fp", version="1")
    clf = load_artifact(tmp_path / "a" / allowed.dirname)
    assert clf.cpu_bf16 == cpu_has_native_bf16()
    assert load_artifact(tmp_path / "b" / plain.dirname).cpu_bf16 is False
    crops = torch.randint(
        0, 256, (8, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    clf.cpu_bf16 = True  # forced: bf16 autocast runs (emulated where the CPU lacks it)
    bf16 = clf.predict(crops)
    clf.cpu_bf16 = False
    fp32 = clf.predict(crops)
    assert bf16.dtype == torch.float32 and torch.allclose(bf16.sum(1), torch.ones(8))
    assert (bf16 - fp32).abs().max() < 0.05
