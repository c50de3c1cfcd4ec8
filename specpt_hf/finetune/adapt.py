"""Building the model for an instrument: weights from a pretrained folder, freezing, LoRA, saving.

Freezing (`freeze=`): `"none"` trains everything, `"stem"` fixes the token stem, `"encoder"` fixes the whole
backbone (only the head trains). LoRA (`lora_rank > 0`, through `peft`) puts adapters on the `nn.Linear`
layers of every encoder layer: the attention projections `self_attn.q_proj` / `k_proj` / `v_proj` / `out_proj`
and the feed-forward `mlp.fc1` / `mlp.fc2` (`lora_targets=LORA_FEED_FORWARD_MODULES`: the feed-forward ones
only); the head (and, unless frozen, the stem, pooler and final norm) trains in full as peft `modules_to_save`.
The base weights stay bit-identical, and `merge_lora` gives a plain model with the adapters merged in (what
`write_finetuned` / `save_finetuned` write).
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig

from ..atomic import atomic_write_json, replaced_folder
from ..configuration_specpt import SpecPTConfig, SpecPTForRedshiftConfig, check_choice
from ..data.instrument import Instrument, get_instrument
from ..modeling_specpt import SpecPTForRedshift, SpecPTForSpectrumReconstruction, group_names, num_tokens
from ..presets import PRESETS
from ..training.train import is_peft_model
from .instruments import INSTRUMENT_SAMPLES, coverage_mask, native_grid

GRIDS = ("resample", "native")
FREEZE_CHOICES = ("none", "stem", "encoder")
ADAPTATION_NAME = "adaptation.json"
LORA_ADAPTER_DIR = "lora_adapter"
# Module names (relative to SpecPTForRedshift) that get LoRA adapters (regexes matched in full, see above).
LORA_TARGET_MODULES = r"specpt\.encoder\.layers\.\d+\.(self_attn\.([qkv]|out)_proj|mlp\.fc[12])"
LORA_FEED_FORWARD_MODULES = r"specpt\.encoder\.layers\.\d+\.mlp\.fc[12]"
# Trained in full next to the adapters (peft `modules_to_save`), by `freeze` choice.
_LORA_FULLY_TRAINED = {
    "none": ("head", "specpt.stem", "specpt.pooler", "specpt.encoder.norm"),
    "stem": ("head", "specpt.pooler", "specpt.encoder.norm"),
    "encoder": ("head",),
}
# Config keys that decide what the p(z) head's outputs mean; the head of a redshift model is kept only when
# none of them changes.
_HEAD_KEYS = (
    "head_type",
    "z_min",
    "z_max",
    "num_redshift_bins",
    "head_hidden_size",
    "head_num_blocks",
    "redshift_offset_bound",
)


@dataclass
class AdaptationReport:
    """What `adapt_to_instrument` built: grid, loaded / new / unused tensors, freezing, LoRA, parameter counts."""

    source: str
    source_type: str
    instrument: str
    grid: str
    wavelength_start: float
    wavelength_step: float
    num_pixels: int
    covered_pixels: int
    tokens: int
    z_min: float
    z_max: float
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    head_loaded: bool = False
    freeze: str = "none"
    lora_rank: int = 0
    lora_modules: list[str] = field(default_factory=list)
    trainable_parameters: int = 0
    total_parameters: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """Three lines: the grid, the tensors (grouped by module), the training setup."""
        return (
            f"{self.instrument} ({self.grid} grid): {self.num_pixels} pixels from {self.wavelength_start:.1f} A in "
            f"{self.wavelength_step:g} A steps ({self.covered_pixels} covered, {self.tokens} tokens), "
            f"z in [{self.z_min:g}, {self.z_max:g}]\n"
            f"from {self.source} ({self.source_type}): loaded {len(self.loaded)} tensors "
            f"[{group_names(self.loaded)}]; new {len(self.new)} [{group_names(self.new)}]; unused "
            f"{len(self.unused)} [{group_names(self.unused)}]; shape-mismatched {len(self.mismatched)} "
            f"[{group_names(self.mismatched)}]\n"
            f"freeze={self.freeze}, LoRA rank {self.lora_rank} on {len(self.lora_modules)} modules: "
            f"{self.trainable_parameters:,} of {self.total_parameters:,} parameters trainable"
        )


def _source_model(pretrained: str | os.PathLike) -> tuple[nn.Module, str]:
    """The pretrained model with its own config, and its `model_type` ("specpt" or "specpt_redshift")."""
    config_dict, _ = PretrainedConfig.get_config_dict(str(pretrained))
    model_type = config_dict.get("model_type")
    if model_type == SpecPTConfig.model_type:
        return SpecPTForSpectrumReconstruction.from_pretrained(str(pretrained)), model_type
    if model_type == SpecPTForRedshiftConfig.model_type:
        return SpecPTForRedshift.from_pretrained(str(pretrained)), model_type
    raise ValueError(
        f"{pretrained}: config.json has model_type {model_type!r}; expected a SpecPT autoencoder "
        f"({SpecPTConfig.model_type!r}) or redshift model ({SpecPTForRedshiftConfig.model_type!r})"
    )


def _target_config(
    source: nn.Module,
    source_type: str,
    overrides: dict[str, Any],
    head_preset: str | None,
) -> SpecPTForRedshiftConfig:
    """The redshift config for the new instrument: the source's backbone settings, its head settings (a redshift
    source) or the preset's / the defaults (an autoencoder source), then `overrides`."""
    values = source.config.to_dict()
    for key in ("architectures", "auto_map", "model_type", "transformers_version"):
        values.pop(key, None)
    if source_type == SpecPTConfig.model_type and head_preset is not None:
        if head_preset not in PRESETS:
            raise ValueError(f"unknown `head_preset` {head_preset!r}; choose one of {list(PRESETS)}")
        values.update(PRESETS[head_preset].head)
    values.update(overrides)
    return SpecPTForRedshiftConfig(**values)


def _copy_weights(
    model: SpecPTForRedshift, source: nn.Module, keep_head: bool, report: AdaptationReport
) -> None:
    """Copy every source tensor whose name and shape match (the head only when `keep_head`); fill `report`."""
    target = model.state_dict()
    copied: dict[str, torch.Tensor] = {}
    for name, tensor in source.state_dict().items():
        if name not in target or (name.startswith("head.") and not keep_head):
            report.unused.append(name)
        elif target[name].shape != tensor.shape:
            report.mismatched.append(name)
        else:
            copied[name] = tensor
    model.load_state_dict(copied, strict=False)
    report.loaded = sorted(copied)
    report.new = sorted(set(target) - set(copied))
    report.head_loaded = keep_head and any(name.startswith("head.") for name in copied)


def apply_freeze(model: SpecPTForRedshift, freeze: str) -> None:
    """Stop gradients to the stem (`"stem"`) or the whole backbone (`"encoder"`); `"none"` trains everything.

    `"encoder"` goes through `config.freeze_encoder`, so the frozen backbone also stays in eval mode (dropout
    off) in training and the saved config says it was frozen."""
    check_choice("freeze", freeze, FREEZE_CHOICES)
    model.requires_grad_(True)
    model.config.freeze_encoder = freeze == "encoder"
    if freeze == "encoder":
        model.specpt.requires_grad_(False)
        model.specpt.eval()
    elif freeze == "stem":
        model.specpt.stem.requires_grad_(False)


def lora_config(
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    freeze: str = "encoder",
    targets: str = LORA_TARGET_MODULES,
) -> Any:
    """The `peft.LoraConfig`: adapters on the modules matching `targets` (a regex on module names, e.g.
    `LORA_TARGET_MODULES` or `LORA_FEED_FORWARD_MODULES`), the head (and what `freeze` leaves trainable) trained
    in full."""
    from peft import LoraConfig

    check_choice("freeze", freeze, FREEZE_CHOICES)
    if rank < 1:
        raise ValueError(f"`lora_rank` must be >= 1, got {rank}")
    return LoraConfig(
        r=int(rank),
        lora_alpha=float(2 * rank if alpha is None else alpha),
        lora_dropout=float(dropout),
        target_modules=targets,
        modules_to_save=list(_LORA_FULLY_TRAINED[freeze]),
    )


def apply_lora(
    model: SpecPTForRedshift,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    freeze: str = "encoder",
    targets: str = LORA_TARGET_MODULES,
) -> Any:
    """Wrap `model` in a `peft.PeftModel` with LoRA adapters (see `lora_config`); the base weights are frozen."""
    from peft import get_peft_model

    config = lora_config(rank, alpha, dropout, freeze, targets)
    present = {name for name, _ in model.named_modules()}
    config.modules_to_save = [name for name in config.modules_to_save if name in present]
    model.requires_grad_(True)
    model.config.freeze_encoder = False
    return get_peft_model(model, config)


def lora_modules(model: nn.Module) -> list[str]:
    """Names of the modules that carry LoRA adapters (empty for a plain model)."""
    from peft.tuners.lora import LoraLayer

    names = [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    return [name.removeprefix("base_model.model.") for name in names]


def adapt_to_instrument(
    pretrained: str | os.PathLike,
    instrument: str | Instrument,
    *,
    grid: str = "native",
    freeze: str = "none",
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    lora_targets: str = LORA_TARGET_MODULES,
    native_step: float | None = None,
    z_min: float | None = None,
    z_max: float | None = None,
    head_preset: str | None = None,
    load_weights: bool = True,
    seed: int = 0,
    **config_overrides: Any,
) -> tuple[nn.Module, AdaptationReport]:
    """A `SpecPTForRedshift` for `instrument`, started from the pretrained folder (or Hub id) `pretrained`.

    Args:
        pretrained: a SpecPT autoencoder or redshift-model folder.
        instrument: `"deimos"`, `"hst_g102"`, `"hst_g141"`, `"desi"` or an `Instrument`.
        grid: `"resample"` (keep the model's grid; needs overlap) or `"native"` (the instrument's grid).
        freeze: `"none"`, `"stem"` or `"encoder"` (see `apply_freeze`).
        lora_rank: > 0 wraps the model in a peft LoRA model (see `apply_lora`; needs `peft`).
        lora_targets: regex of the module names that get adapters (`LORA_TARGET_MODULES`: attention and
            feed-forward; `LORA_FEED_FORWARD_MODULES`: feed-forward only).
        native_step: pixel step of the native grid (default: the instrument's own).
        z_min, z_max: redshift range of the head (default: the instrument's, `INSTRUMENT_SAMPLES`).
        head_preset: take the head sizes from this preset when `pretrained` is an autoencoder.
        load_weights: False builds the same model from scratch (nothing loaded), for comparisons.
        seed: seeds the initialisation of what is not loaded (the head).
        config_overrides: further `SpecPTForRedshiftConfig` values.

    The head of a redshift-model folder is kept when the redshift range and head sizes are unchanged, and
    re-initialised otherwise (its bins would mean other redshifts).

    Returns:
        The model (a `peft.PeftModel` when `lora_rank > 0`) and an `AdaptationReport`.
    """
    check_choice("grid", grid, GRIDS)
    check_choice("freeze", freeze, FREEZE_CHOICES)
    if lora_rank < 0:
        raise ValueError(f"`lora_rank` must be >= 0 (0: no LoRA), got {lora_rank}")
    instrument = get_instrument(instrument)
    sample = INSTRUMENT_SAMPLES.get(instrument.name.lower())
    source, source_type = _source_model(pretrained)
    default_range = (
        (sample.z_min, sample.z_max)
        if sample
        else (getattr(source.config, "z_min", 0.0), getattr(source.config, "z_max", 4.0))
    )
    overrides: dict[str, Any] = {
        "z_min": default_range[0] if z_min is None else z_min,
        "z_max": default_range[1] if z_max is None else z_max,
    }
    if grid == "native":
        overrides.update(native_grid(instrument, native_step))
    overrides.update(config_overrides)
    config = _target_config(source, source_type, overrides, head_preset)
    if config.layout == "paper" and config.num_pixels != source.config.num_pixels:
        raise ValueError(
            f"the `paper` layout's flatten projection is sized for {source.config.num_pixels} pixels; it cannot read "
            f"the {config.num_pixels}-pixel {instrument.name} grid: use grid='resample' or a `tokens` model"
        )
    covered = coverage_mask(config, instrument) if grid == "resample" else np.ones(config.num_pixels, bool)

    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's random state
        torch.manual_seed(seed)
        model = SpecPTForRedshift(config)
    report = AdaptationReport(
        source=str(pretrained) if load_weights else f"{pretrained} (architecture only)",
        source_type=source_type if load_weights else "scratch",
        instrument=instrument.name,
        grid=grid,
        wavelength_start=config.wavelength_start,
        wavelength_step=config.wavelength_step,
        num_pixels=config.num_pixels,
        covered_pixels=int(covered.sum()),
        tokens=num_tokens(config),
        z_min=config.z_min,
        z_max=config.z_max,
        freeze=freeze,
        lora_rank=int(lora_rank),
    )
    if load_weights:
        keep_head = source_type == SpecPTForRedshiftConfig.model_type and all(
            getattr(source.config, key) == getattr(config, key) for key in _HEAD_KEYS
        )
        _copy_weights(model, source, keep_head, report)
    else:
        report.new = sorted(model.state_dict())
    del source

    if lora_rank > 0:
        model = apply_lora(model, lora_rank, lora_alpha, lora_dropout, freeze, lora_targets)
        report.lora_modules = lora_modules(model)
    else:
        apply_freeze(model, freeze)
    report.trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report.total_parameters = sum(p.numel() for p in model.parameters())
    return model, report


def redshift_config(model: nn.Module) -> SpecPTForRedshiftConfig:
    """The `SpecPTForRedshiftConfig` of a plain or peft-wrapped redshift model."""
    config = getattr(model, "config", None)
    if not isinstance(config, SpecPTForRedshiftConfig):
        raise ValueError(f"expected a SpecPTForRedshift (or a peft model of one), got {type(model).__name__}")
    return config


def merge_lora(model: nn.Module) -> nn.Module:
    """A plain `SpecPTForRedshift` with the LoRA adapters merged into a copy of the weights (the peft model is
    left as it is); a plain model is returned unchanged."""
    if not is_peft_model(model):
        return model
    return copy.deepcopy(model).merge_and_unload()


def write_finetuned(
    model: nn.Module, folder: str | os.PathLike, report: AdaptationReport | None = None
) -> None:
    """Write the fine-tuned model with `save_pretrained` into the (new, empty) `folder`.

    A LoRA model is written merged (a plain `SpecPTForRedshift` folder that `from_pretrained` loads), with its
    adapter next to it in `lora_adapter/`. `report` goes to `adaptation.json`."""
    folder = Path(folder)
    merge_lora(model).save_pretrained(folder, safe_serialization=True)
    if is_peft_model(model):
        model.save_pretrained(folder / LORA_ADAPTER_DIR)
    if report is not None:
        atomic_write_json(folder / ADAPTATION_NAME, report.to_dict())


def save_finetuned(
    model: nn.Module, folder: str | os.PathLike, report: AdaptationReport | None = None
) -> Path:
    """`write_finetuned` into `folder`, replaced at once when it exists; return `folder`."""
    with replaced_folder(folder) as tmp:
        write_finetuned(model, tmp, report)
    return Path(folder)
