"""A reader for dlib's own serialisation of a DNN (``dlib::serialize(net, file)``), enough to take the
weights out of ``dlib_face_recognition_resnet_model_v1.dat``. It is not pickle: nothing is executed,
only numbers are read.

dlib's format, as written by dlib 19.x (``dlib/serialize.h``, ``dlib/cuda/tensor.h``, ``layers.h``):

* integers: one byte ``n | 0x80 if negative`` then ``n`` little-endian magnitude bytes;
* floats (scalars): mantissa (int64) and exponent (int16), both as integers: value = m * 2**e;
* strings: a length (integer) then the bytes; bools: the character ``'0'`` or ``'1'``;
* tensors: version 2, then num_samples, k, nr, nc (integers), then raw little-endian float32 values;
* the network nests from the loss layer inwards, so the layers themselves appear from the input
  layer outwards, each as its name (``con_4``, ``affine_``, ``max_pool_2``, ...) and its fields.

:func:`read_dlib_layers` walks the file from layer name to layer name, reading each layer's fields and
stepping over its parameter tensor, so weights can never be mistaken for a layer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

#: Layer names this reader understands (dlib's serialisation tags).
LAYER_TAGS: Final = (
    "input_rgb_image_sized",
    "con_4",
    "affine_",
    "relu_",
    "max_pool_2",
    "avg_pool_2",
    "add_prev_",
    "fc_2",
)


class DlibFormatError(ValueError):
    """The file is not a dlib network of the expected shape."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise DlibFormatError("unexpected end of file")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def int(self) -> int:
        head = self.byte()
        n, neg = head & 0x7F, bool(head & 0x80)
        if n > 8:
            raise DlibFormatError(f"bad integer header {head:#x} at byte {self.pos - 1}")
        value = int.from_bytes(self.data[self.pos : self.pos + n], "little")
        self.pos += n
        return -value if neg else value

    def float(self) -> float:
        mantissa = self.int()
        exponent = self.int()
        return float(mantissa) * 2.0**exponent

    def str(self) -> str:
        n = self.int()
        if not 0 <= n <= 1 << 16:
            raise DlibFormatError(f"bad string length {n} at byte {self.pos}")
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("ascii", errors="replace")

    def tensor(self) -> npt.NDArray[np.float32]:
        version = self.int()
        if version != 2:
            raise DlibFormatError(f"tensor version {version} at byte {self.pos}; this reader knows 2")
        n, k, nr, nc = (self.int() for _ in range(4))
        count = n * k * nr * nc
        end = self.pos + 4 * count
        if count < 0 or end > len(self.data):
            raise DlibFormatError(f"tensor of {count} floats runs past the end of the file")
        values = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.pos).astype(np.float32)
        self.pos = end
        return values.reshape(n, k, nr, nc)


@dataclass
class DlibLayer:
    """One layer of the file: its tag, its integer/float fields and its parameter tensor (if any)."""

    tag: str
    ints: dict[str, int] = field(default_factory=dict)
    floats: dict[str, float] = field(default_factory=dict)
    params: npt.NDArray[np.float32] | None = None


def _read_layer(r: _Reader, tag: str) -> DlibLayer:
    layer = DlibLayer(tag)
    if tag == "input_rgb_image_sized":
        layer.floats = {"avg_red": r.float(), "avg_green": r.float(), "avg_blue": r.float()}
        layer.ints = {"nr": r.int(), "nc": r.int()}
    elif tag == "con_4":
        layer.params = r.tensor()
        con_fields = ("num_filters", "nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x")
        layer.ints = {k: r.int() for k in con_fields}
    elif tag == "affine_":
        layer.params = r.tensor()
    elif tag in ("max_pool_2", "avg_pool_2"):
        pool_fields = ("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x")
        layer.ints = {k: r.int() for k in pool_fields}
    elif tag == "fc_2":
        layer.ints = {"num_outputs": r.int(), "num_inputs": r.int()}
        layer.params = r.tensor()
    return layer


def read_dlib_layers(path: Path) -> tuple[str, list[DlibLayer]]:
    """(loss layer tag, layers from the input outwards) of a serialised dlib network."""
    data = path.read_bytes()
    r = _Reader(data)
    if r.int() != 1:
        raise DlibFormatError(f"{path}: not a dlib network (bad loss-layer version)")
    loss = r.str()
    if not loss.startswith("loss_"):
        raise DlibFormatError(f"{path}: not a dlib network (first tag {loss[:40]!r})")
    needles = {tag: b"\x01" + struct.pack("B", len(tag)) + tag.encode() for tag in LAYER_TAGS}
    layers: list[DlibLayer] = []
    while True:
        hits = [(data.find(n, r.pos), tag) for tag, n in needles.items()]
        hits = [(pos, tag) for pos, tag in hits if pos >= 0]
        if not hits:
            break
        pos, tag = min(hits)
        r.pos = pos + len(needles[tag])
        layers.append(_read_layer(r, tag))
    if not layers or layers[0].tag != "input_rgb_image_sized":
        raise DlibFormatError(f"{path}: no input layer found")
    return loss, layers


def dlib_resnet_state_dict(path: Path) -> dict[str, npt.NDArray[np.float32]]:
    """The state dict of :class:`shared.models.dlib_resnet.DlibResNet` from dlib's
    ``dlib_face_recognition_resnet_model_v1.dat``; checks every shape against the architecture."""
    from shared.models.dlib_resnet import BLOCKS, DLIB_MEAN_RGB, EMBEDDING_DIM

    loss, layers = read_dlib_layers(path)
    if loss != "loss_metric_2":
        raise DlibFormatError(f"{path}: loss layer {loss!r}, expected the metric loss of the face network")
    inp = layers[0]
    mean = (inp.floats["avg_red"], inp.floats["avg_green"], inp.floats["avg_blue"])
    if inp.ints != {"nr": 150, "nc": 150} or not np.allclose(mean, DLIB_MEAN_RGB, atol=1e-3):
        raise DlibFormatError(f"{path}: input layer {inp.ints} {mean} is not dlib's 150 x 150 face input")
    convs = [layer for layer in layers if layer.tag == "con_4"]
    affines = [layer for layer in layers if layer.tag == "affine_"]
    fcs = [layer for layer in layers if layer.tag == "fc_2"]
    if len(convs) != 1 + 2 * len(BLOCKS) or len(affines) != len(convs) or len(fcs) != 1:
        raise DlibFormatError(
            f"{path}: {len(convs)} conv / {len(affines)} affine / {len(fcs)} fc layers; "
            f"dlib's ResNet-29 has {1 + 2 * len(BLOCKS)} / {1 + 2 * len(BLOCKS)} / 1"
        )
    names = ["conv1"] + [f"blocks.{i}.conv{j}" for i in range(len(BLOCKS)) for j in (1, 2)]
    aff_names = ["aff1"] + [f"blocks.{i}.aff{j}" for i in range(len(BLOCKS)) for j in (1, 2)]
    state: dict[str, npt.NDArray[np.float32]] = {}
    cin = 3
    for name, aff_name, conv, aff in zip(names, aff_names, convs, affines, strict=True):
        k, nr, nc = conv.ints["num_filters"], conv.ints["nr"], conv.ints["nc"]
        assert conv.params is not None and aff.params is not None
        flat = conv.params.reshape(-1)
        n_w = k * cin * nr * nc
        if flat.size != n_w + k or aff.params.size != 2 * k:
            raise DlibFormatError(f"{path}: layer {name} has {flat.size} values, expected {n_w + k}")
        state[f"{name}.weight"] = flat[:n_w].reshape(k, cin, nr, nc).copy()
        state[f"{name}.bias"] = flat[n_w:].copy()
        gamma_beta = aff.params.reshape(2, k)
        state[f"{aff_name}.weight"] = gamma_beta[0].copy()
        state[f"{aff_name}.bias"] = gamma_beta[1].copy()
        cin = k
    fc = fcs[0]
    assert fc.params is not None
    if fc.ints != {"num_outputs": EMBEDDING_DIM, "num_inputs": 256} or fc.params.size != 256 * EMBEDDING_DIM:
        raise DlibFormatError(f"{path}: fc layer {fc.ints} does not fit")
    state["fc.weight"] = fc.params.reshape(256, EMBEDDING_DIM).T.copy()  # dlib computes x @ W
    return state
