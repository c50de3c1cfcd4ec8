"""Run settings for `specpt train`: a dataclass read from a YAML file, with command-line overrides.

Every field of `TrainingSettings` is a YAML key and a command-line flag (`batch_size` <-> `--batch-size`,
parsed by `transformers.HfArgumentParser`). Flags override the file; the settings actually used are
written as `training_settings.yaml` next to the weights, so a model folder says how it was trained.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml
from transformers import HfArgumentParser

from specpt_hf.atomic import atomic_write_text

from ..cli import add_debug_flag

SETTINGS_NAME = "training_settings.yaml"
# transformers.SchedulerType values that need nothing beyond warm-up and total steps.
Scheduler = Literal[
    "cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"
]


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainingSettings:
    """Everything one training run needs besides the data and the model code (see each field's help)."""

    # what to train
    stage: Literal["autoencoder", "redshift"] = _setting(
        "autoencoder", "'autoencoder' (stage 1, reconstruction pretraining) or 'redshift' (stage 2)"
    )
    preset: str = _setting("specpt-tiny", "model preset (see `specpt presets`) used when no pretrained_model")
    pretrained_model: str | None = _setting(
        None, "model folder to start from; for stage 2 the stage-1 model ({output_dir}/model)"
    )
    freeze_encoder: bool = _setting(False, "stage 2: keep the pretrained encoder fixed, train only the head")
    # data
    data_dir: str = _setting("data/specpt", "folder with {split}/*.parquet shards from `specpt prepare`")
    output_dir: str = _setting("runs/specpt", "where checkpoints, logs and the final model go")
    max_train_spectra: int | None = _setting(None, "use only the first N training spectra (quick runs)")
    max_val_spectra: int | None = _setting(None, "use only the first N validation spectra (quick runs)")
    num_workers: int = _setting(0, "DataLoader worker processes")
    # augmentations (specpt_hf/training/augment.py; 0 = off)
    augment_probability: float = _setting(0.5, "chance that each augmentation hits a training spectrum")
    augment_calibration: float = _setting(
        0.0, "rms of the smooth per-arm flux-calibration distortion (e.g. 0.02)"
    )
    augment_sky_residual: float = _setting(
        0.0, "sky-line residual peaks, in units of the local noise (e.g. 2)"
    )
    augment_masked_span: int = _setting(0, "longest masked span, pixels (cosmic rays, bad columns; e.g. 200)")
    augment_renoise: float = _setting(0.0, "largest S/N reduction factor, > 1 (e.g. 2)")
    augment_resolution: float = _setting(
        0.0, "largest extra Gaussian blur sigma, pixels (resolution jitter; e.g. 1)"
    )
    augment_ebv: float = _setting(0.0, "largest Galactic E(B-V) applied (e.g. 0.1)")
    augment_until_step: int | None = _setting(
        None, "augment only the first N optimizer steps; the rest train on the spectra as they are"
    )
    consistency_renoise: float = _setting(
        0.0,
        "stage 2: pair each spectrum with a copy at S/N / f, f uniform in [1, F], trained on the same label and "
        "pulled toward the spectrum's p(z) (F > 1, e.g. 2; 0 = off; twice the forward cost)",
    )
    consistency_weight: float = _setting(
        1.0, "weight of the copy's KL(p(z) of the spectrum || p(z) of the copy)"
    )
    # optimisation
    batch_size: int = _setting(32, "spectra per batch and per process")
    gradient_accumulation_steps: int = _setting(1, "batches summed into one optimizer step")
    learning_rate: float = _setting(1e-4, "peak AdamW learning rate")
    encoder_learning_rate: float | None = _setting(
        None, "stage 2: learning rate of the pretrained encoder when fine-tuned (default: learning_rate)"
    )
    weight_decay: float = _setting(0.01, "AdamW weight decay on weight matrices (not biases or norms)")
    lr_scheduler: Scheduler = _setting("cosine", "learning-rate schedule after the linear warm-up")
    warmup_steps: int = _setting(500, "optimizer steps of linear warm-up")
    max_steps: int | None = _setting(None, "stop after this many optimizer steps (overrides num_epochs)")
    num_epochs: int = _setting(10, "passes over the training split when max_steps is not set")
    max_grad_norm: float = _setting(1.0, "gradient clipping norm (0 disables clipping)")
    mixed_precision: Literal["no", "bf16", "fp16"] = _setting(
        "no", "'no', 'bf16' or 'fp16' (fp16 on GPUs; bf16 on a CPU without native bf16 runs float32)"
    )
    seed: int = _setting(42, "seed for the weights, the data order and dropout")
    # checkpoints, validation, logging
    checkpointing_steps: int | None = _setting(
        None, "save the training state every N optimizer steps in {output_dir}/checkpoints/step_{N}"
    )
    checkpoints_total_limit: int | None = _setting(3, "keep only the newest N checkpoints")
    eval_steps: int | None = _setting(None, "validate every N optimizer steps (default: every epoch)")
    early_stopping_patience: int | None = _setting(
        None, "stage 2: stop after N validations without a better NMAD"
    )
    logging_steps: int = _setting(10, "log the training loss every N optimizer steps")
    report_to: str = _setting("tensorboard", "Accelerate tracker name, or 'none'")
    disable_tqdm: bool = _setting(False, "hide the progress bar")
    resume: bool = _setting(False, "continue from the newest checkpoint in {output_dir}/checkpoints")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` naming the first setting that makes no sense."""
        positive = [
            "batch_size",
            "gradient_accumulation_steps",
            "num_epochs",
            "logging_steps",
            "learning_rate",
        ]
        positive += ["max_steps", "checkpointing_steps", "checkpoints_total_limit", "eval_steps"]
        positive += [
            "max_train_spectra",
            "max_val_spectra",
            "early_stopping_patience",
            "encoder_learning_rate",
            "augment_until_step",
        ]
        for name in positive:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"setting {name!r} must be > 0, got {value!r}")
        for name in ("warmup_steps", "num_workers", "weight_decay", "max_grad_norm", "consistency_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"setting {name!r} must be >= 0, got {getattr(self, name)!r}")
        if self.consistency_renoise and self.consistency_renoise <= 1.0:
            raise ValueError(
                f"setting 'consistency_renoise' is a S/N reduction factor > 1 (or 0: off), got {self.consistency_renoise}"
            )
        if self.stage == "autoencoder":
            for name in (
                "freeze_encoder",
                "encoder_learning_rate",
                "early_stopping_patience",
                "consistency_renoise",
            ):
                if getattr(self, name) not in (None, False):
                    raise ValueError(f"setting {name!r} applies to stage 'redshift' only, not 'autoencoder'")
        if self.freeze_encoder and self.encoder_learning_rate is not None:
            raise ValueError("settings 'freeze_encoder' and 'encoder_learning_rate' exclude each other")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> TrainingSettings:
        """Read settings from a YAML file; keyword arguments override its values."""
        return cls(**{**read_settings_file(path), **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the settings as `training_settings.yaml` into `folder` (atomically); return the file."""
        text = "# settings of the `specpt train` run that produced this folder\n"
        text += yaml.safe_dump(self.to_dict(), sort_keys=False)
        return atomic_write_text(Path(folder) / SETTINGS_NAME, text)


def read_settings_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a settings YAML file, checked for unknown keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"settings file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of setting names to values")
    known = [f.name for f in fields(TrainingSettings)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {unknown}; known settings: {known}")
    return data


def settings_parser(**kwargs: Any) -> HfArgumentParser:
    """An argument parser with `--config FILE` and one flag per setting."""
    parser = HfArgumentParser(TrainingSettings, **kwargs)
    parser.add_argument("--config", type=Path, help="YAML settings file (see examples/configs/)")
    add_debug_flag(parser)
    return parser


def parse_settings(argv: list[str], **parser_kwargs: Any) -> TrainingSettings:
    """Settings from a command line: the `--config` file's values, then the flags given."""
    parser = settings_parser(**parser_kwargs)
    known, _ = parser.parse_known_args(argv)
    if known.config is not None:
        file_values = read_settings_file(known.config)
        parser.set_defaults(**{k: v for k, v in file_values.items()})
    try:
        settings, _ = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    except ValueError as err:
        where = f"{known.config}: " if known.config is not None else ""
        raise ValueError(f"{where}{err}") from err
    return settings


def _is_optional(hint: Any) -> bool:
    return isinstance(hint, types.UnionType) and type(None) in hint.__args__


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert `value` (from YAML or a flag) to the field's type, or raise `ValueError` naming the field."""
    if value is None:
        if not _is_optional(hint):
            raise ValueError(f"setting {name!r} cannot be empty")
        return None
    if typing.get_origin(hint) is Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"setting {name!r} must be one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    kind = next(arg for arg in hint.__args__ if arg is not type(None)) if _is_optional(hint) else hint
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"setting {name!r} must be true or false, got {value!r}")
    if isinstance(value, bool) or (kind is str and not isinstance(value, str)):
        raise ValueError(f"setting {name!r} must be a {kind.__name__}, got {value!r}")
    try:
        converted = kind(value)  # YAML reads "1e-4" as a string
    except (TypeError, ValueError) as err:
        raise ValueError(f"setting {name!r} must be a {kind.__name__}, got {value!r}") from err
    if kind is int and isinstance(value, float) and converted != value:
        raise ValueError(f"setting {name!r} must be an integer, got {value!r}")
    return converted
