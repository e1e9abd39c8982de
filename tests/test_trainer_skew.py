"""Train/serve skew check: the crops the trainer caches are the crops serving makes.

The inference worker (CPU route) detects on the decoded BGR frames, stacks them into one padded batch,
calls ``shared.preprocess.align_faces`` with every face's landmarks and swaps BGR->RGB on the crops. The
trainer calls ``crop_faces_bgr`` one image at a time and keeps the face nearest the centre. Here both
paths run on the same real training chips (and a real eval photo) and must give the same pixels, for
every chip contract in use: gendernet's 64 px ``utkface`` framing and the dlib backbone's 150 px ``dlib``
framing (the template is read from one place, ``shared.preprocess.TEMPLATES``, by both paths).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from shared.preprocess import align_faces, stack_frames
from tests.helpers.paths import EVAL_DIR as EVAL
from tests.helpers.paths import TRAIN_DIR as TRAIN
from tests.helpers.paths import WEIGHTS_DIR as WEIGHTS
from tests.helpers.paths import skip_without
from trainer.cache import STATUS_OK, build_or_load
from trainer.data import load_bgr, read_folder
from trainer.faces import central_face, make_detector


@skip_without(TRAIN / "female", WEIGHTS)
@pytest.mark.parametrize(("size", "template"), [(64, "utkface"), (150, "dlib")])
def test_cached_training_crops_equal_serving_crops(tmp_path: Path, size: int, template: str) -> None:
    data = tmp_path / "d"
    for label in ("female", "male"):
        (data / label).mkdir(parents=True)
        for src in sorted((TRAIN / label).glob("*.jpg"))[::2000][:3]:
            (data / label / src.name).symlink_to(src)
    pixabay = sorted((EVAL / "male" / "pixabay").glob("*.jpg"))[:1]
    for src in pixabay:  # an uncropped photo of another size in the same batch
        (data / "male" / src.name).symlink_to(src)
    catalog = read_folder(data)
    detector = make_detector(weights_dir=WEIGHTS)
    cache = build_or_load(catalog, tmp_path / "cache", detector, size, 1.0, template=template)
    assert (cache.status == STATUS_OK).all()

    # The serving route: one padded BGR batch, all faces at once, channels swapped on the crops.
    images = [load_bgr(s.path) for s in catalog.samples]
    assert all(im is not None for im in images)
    bgr = [im for im in images if im is not None]
    dets = detector.detect(bgr)
    frames = stack_frames([torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1))) for im in bgr])
    counts = torch.tensor([len(d) for d in dets])
    index = torch.repeat_interleave(torch.arange(len(bgr)), counts)
    landmarks = torch.from_numpy(np.concatenate([d.landmarks for d in dets]))
    served = align_faces(frames, index, landmarks, size, 1.0, template).flip(1)
    offsets = np.concatenate([[0], np.cumsum(counts.numpy())])
    for i, (im, det) in enumerate(zip(bgr, dets, strict=True)):
        pick = central_face(det, im.shape[1], im.shape[0])
        assert pick is not None
        serving_crop = served[offsets[i] + pick].numpy().astype(np.int16)
        diff = np.abs(serving_crop - cache.crops[i].astype(np.int16))
        assert diff.max() <= 1, f"{catalog.samples[i].relpath}: train/serve crops differ by {diff.max()}"
