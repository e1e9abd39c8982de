"""``detector = "auto"`` (the inference setting's default): the backend measured fastest for a device
and thread count.

Registered in the registry like any backend, and imported lazily by ``shared.detectors.create`` when
the name is asked for, so the registry is complete whoever imports it.
"""

from __future__ import annotations

import torch

from shared.detectors import DetectorConfig, FaceDetector, create, register


def default_detector(device: str | torch.device, threads: int | None = None) -> str:
    """What ``detector = "auto"`` resolves to, from measurements on the same frames
    (docs/benchmarks.md, runs D-F):

    * GPU: torch-yunet, the batched one, which keeps the frames on the device from decode to
      classification;
    * CPU with one torch thread (``torch_threads=1``, one worker per core: the recommended CPU set-up):
      torch-yunet, 93 vs 72 frames/s for the whole pipeline;
    * CPU with more threads: cv2-yunet. The CLI makes OpenMP threads sleep at barriers
      (OMP_WAIT_POLICY=PASSIVE, which keeps a worker from collapsing when its cores are shared), and
      that costs torch-yunet's hundreds of small parallel regions more than OpenCV's own thread pool:
      106 vs 77 frames/s.

    ``threads``: the torch thread count to decide for; None = this process's current one (the worker
    resolves after applying its torch_threads setting).
    """
    if torch.device(device).type != "cpu":
        return "torch-yunet"
    n = torch.get_num_threads() if threads is None else threads
    return "torch-yunet" if n <= 1 else "cv2-yunet"


@register("auto")
def _auto_detector(config: DetectorConfig) -> FaceDetector:
    """The registry entry behind ``detector = "auto"``: decided when the detector is built, for the
    config's device and this process's torch threads (a worker builds it after applying its
    ``torch_threads``)."""
    return create(default_detector(config.device), config)
