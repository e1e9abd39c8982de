"""Inference worker settings (env prefix ``GENDERLENS_``; CLI flags override)."""

from __future__ import annotations

from pydantic import Field

from shared.settings import CommonSettings, ModelPathsMixin


class InferenceSettings(ModelPathsMixin, CommonSettings):
    @property
    def fallback_sides(self) -> tuple[int, ...]:
        """``detector_fallback_sides`` as numbers."""
        return tuple(int(v) for v in self.detector_fallback_sides.split(",") if v.strip())

    detector: str = Field(
        "auto",
        description="Face detector backend: cv2-yunet, torch-yunet, or auto = the one measured fastest: "
        "torch-yunet on CUDA and on CPU with torch_threads=1, cv2-yunet on CPU with more threads "
        "(docs/benchmarks.md).",
    )
    detector_score_threshold: float = Field(0.6, gt=0, lt=1, description="YuNet score threshold.")
    detector_max_side: int = Field(
        640,
        ge=64,
        description="Frames are downscaled to this long side for detection (the one policy: eval and "
        "the trainer use the same; docs/detection.md).",
    )
    detector_fallback_sides: str = Field(
        "320,200",
        pattern=r"^\s*(\d+\s*(,\s*\d+\s*)*)?$",
        description="When no face is found at detector_max_side, retry at these smaller long sides "
        "(comma-separated, decreasing; empty = no fallback). Large close-up faces are found there.",
    )
    detector_fallback_every: int = Field(
        8,
        ge=1,
        description="Retry at most one in this many frames with no face (bounds the cost of an empty "
        "room to about 1/N of a 40% retry), but every such frame right after a retry found a face.",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="Where the models run: auto (cuda when present), cpu, cuda or cuda:N.",
    )
    torch_threads: int = Field(
        0, ge=0, description="torch intra-op threads, also the cap of OpenCV's; 0 = the libraries' default."
    )
    batch_size: int = Field(
        8,
        ge=1,
        le=1024,
        description="Most frames per pass of the pipeline, and per camera in one read.",
    )
    max_wait_ms: int = Field(
        5, ge=0, le=1000, description="Most time to wait to fill a batch once a frame is in hand."
    )
    block_ms: int = Field(500, ge=1, le=10_000, description="XREADGROUP BLOCK time when idle.")
    staleness_ms: int = Field(
        500,
        ge=1,
        description="Frames older than this when read, or when their batch is done, are dropped "
        "(counted dropped_stale; at publish also dropped_stale_publish).",
    )
    claim_idle_ms: int = Field(
        5000, ge=100, description="Pending entries idle this long are claimed from dead workers."
    )
    max_deliveries: int = Field(3, ge=1, description="After this many deliveries an entry is dead-lettered.")
    results_maxlen: int = Field(256, ge=4, description="Cap (MAXLEN ~) of each results stream.")
    uncertain_threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Below this confidence a face is 'uncertain'; unset = the model's own threshold "
        "(its metadata). Results carry the value used, and the viewer applies the same one to its "
        "smoothed labels: one policy.",
    )
    worker_name: str | None = Field(None, description="Consumer name; default host-pid (unique per process).")
    drain_timeout_s: float = Field(
        10.0, gt=0, description="On SIGTERM, finish the in-flight batch within this."
    )
    model_poll_s: float = Field(2.0, gt=0, description="How often to look for a new current model.")
    cameras_refresh_s: float = Field(1.0, gt=0, description="How often to look for new camera streams.")
    health_file: str | None = Field(
        None,
        description="File touched after every loop; the container "
        "healthcheck (`genderlens infer --check-health`) fails when it goes stale.",
    )
    health_max_age_s: float = Field(30.0, gt=0, description="Health file older than this = unhealthy.")
