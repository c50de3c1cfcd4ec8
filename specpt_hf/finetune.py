"""Fine-tuning SpecPT on spectra from other instruments (Keck/DEIMOS, HST/WFC3 grisms).

A pretrained SpecPT folder (autoencoder or redshift model) becomes a `SpecPTForRedshift` for a new instrument in
one of two ways (`grid=`):

- `"resample"`: the model keeps its own wavelength grid; the instrument's spectra are resampled onto it
  (flux-conserving, `specpt_hf.resampling.resample`) and the model pixels the instrument does not cover are
  masked. Needs overlap: HST G141 (1.07-1.70 um) against the DESI grid (0.36-0.98 um) is refused.
- `"native"`: a new config with the instrument's own grid (`wavelength_start`, `wavelength_step`,
  `num_pixels`; a grid that is not linear is resampled onto a linear one with its median step). In the `tokens`
  layout every backbone tensor is grid-independent in shape (stem convolutions over pixels, the
  wavelength-feature projection of log(wavelength), transformer, pooling), so all of them load; token positions
  follow from the new wavelengths. The stem's kernels are in pixels, so they see the new pixel scale: fine-tune
  the stem (`freeze="none"`) when the pixel size changes much.

Freezing (`freeze=`): `"none"` trains everything, `"stem"` fixes the token stem, `"encoder"` fixes the whole
backbone (only the head trains). LoRA (`lora_rank > 0`, through `peft`) puts adapters on every encoder layer's
self-attention (peft's `MultiheadAttention` LoRA: the packed q/k/v `in_proj_weight` and `out_proj`) and its
feed-forward `linear1` / `linear2` (`lora_targets=LORA_FEED_FORWARD_MODULES`: the feed-forward ones only); the
head (and, unless frozen, the stem, pooler and final norm) trains in full as peft `modules_to_save`.
What peft can target in `nn.TransformerEncoderLayer`: `linear1` / `linear2` (plain `nn.Linear`) and the whole
`self_attn` module. Targeting `self_attn.out_proj` alone does nothing, since `nn.MultiheadAttention` reads its
weight directly instead of calling it, and `in_proj_weight` is a bare parameter (peft's `target_parameters` fails
on it: its wrapper hides the attributes the encoder layer reads). peft's `MultiheadAttention` LoRA merges the
adapter into in_proj/out_proj before each forward and subtracts it afterwards, so those two base weights pick up
float rounding (~1e-6 relative after a few hundred steps); all other base weights stay bit-identical. In eval
mode PyTorch's fused `TransformerEncoderLayer` path reads the base weights directly and skips every adapter:
validation in `specpt_hf.training` switches that path off for peft models (`adapters_active`), and `merge_lora`
gives a plain model with the adapters merged in (what `write_finetuned` / `save_finetuned` write).

Training is `specpt train`'s Accelerate loop (`specpt_hf.training.training_function`, stage 2) run on the model
built here: `finetune` checks the data grid and has the loop write its model folders with `write_finetuned`.

The mock data come from `specpt_hf.data.mock.generate_spectra` on the instrument's grid and resolution, written
as Parquet shards in the project layout (`{out}/{split}/part-*.parquet`, the columns of ARCHITECTURE.md, any
pixel count), so `specpt_hf.training` reads them unchanged.

    >>> model, report = adapt_to_instrument("runs/ae/model", "deimos", grid="native", freeze="stem")
    >>> write_instrument_dataset("data/deimos", "deimos", config_wavelength(model.config),
    ...                          {"train": 2000, "validation": 200, "test": 500})
    >>> settings = TrainingSettings(stage="redshift", data_dir="data/deimos", output_dir="runs/deimos",
    ...                             max_steps=1000, learning_rate=3e-4, warmup_steps=50, seed=0)
    >>> result = finetune(model, settings, report)      # runs/deimos/model: merged weights, adaptation.json
    >>> evaluate_redshifts(result.model, "data/deimos").metrics["all"]["nmad"]
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PretrainedConfig

from .atomic import atomic_write_json, replaced_folder
from .configuration_specpt import SpecPTConfig, SpecPTForRedshiftConfig
from .data.instrument import DESI, INSTRUMENTS, Instrument, get_instrument
from .evaluation.metrics import metrics_by_group
from .modeling_specpt import SpecPTForRedshift, SpecPTForSpectrumReconstruction, num_tokens
from .prediction import model_wavelength as config_wavelength  # a config's grid, float64 [num_pixels]
from .prediction import predict_dataset
from .presets import PRESETS
from .resampling import bin_edges, resample
from .training.settings import TrainingSettings
from .training.train import (
    TrainingResult,
    adapters_active,
    is_peft_model,
    training_function,
)

GRIDS = ("resample", "native")
FREEZE_CHOICES = ("none", "stem", "encoder")
SPLITS = ("train", "validation", "test")
MOCK_INFO_NAME = "mock_info.json"
ADAPTATION_NAME = "adaptation.json"
LORA_ADAPTER_DIR = "lora_adapter"
# Module names (relative to SpecPTForRedshift) that get LoRA adapters (regexes matched in full, see above).
LORA_TARGET_MODULES = r"specpt\.encoder\.layers\.\d+\.(self_attn|linear1|linear2)"
LORA_FEED_FORWARD_MODULES = r"specpt\.encoder\.layers\.\d+\.(linear1|linear2)"
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
_MOCK_TARGETID_BIT = 1 << 58  # desitarget's MOCK bit


# ----------------------------------------------------------------------------------------------------------------
# Instruments: what they observe, their grids, and their coverage of a model's grid
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstrumentSample:
    """The mock targets an instrument observes (class -> share) and the redshift range of its head."""

    classes: Mapping[str, float]
    z_min: float
    z_max: float


# DEIMOS: DEEP2-like galaxies (z ~ 0.7-1.4) plus brighter low-z ones; the mock classes reach z = 1.63.
# WFC3 grisms: slitless emission-line galaxies (H-alpha, [O III], [O II]) and quasars up to z ~ 3.5.
INSTRUMENT_SAMPLES: dict[str, InstrumentSample] = {
    "desi": InstrumentSample({"bgs": 0.25, "lrg": 0.25, "elg": 0.3, "qso": 0.2}, 0.0, 4.0),
    "deimos": InstrumentSample({"bgs": 0.2, "lrg": 0.3, "elg": 0.5}, 0.0, 1.7),
    "hst_g102": InstrumentSample({"elg": 0.8, "qso": 0.2}, 0.0, 3.6),
    "hst_g141": InstrumentSample({"elg": 0.8, "qso": 0.2}, 0.0, 3.6),
}


def instrument_sample(instrument: str | Instrument) -> InstrumentSample:
    """The default targets and redshift range of `instrument` (ValueError for an instrument without one)."""
    name = get_instrument(instrument).name.lower()
    if name not in INSTRUMENT_SAMPLES:
        raise ValueError(f"no default sample for instrument {name!r}; known: {sorted(INSTRUMENT_SAMPLES)}")
    return INSTRUMENT_SAMPLES[name]


def native_grid(instrument: str | Instrument, step: float | None = None) -> dict[str, float | int]:
    """The instrument's grid as config values (`wavelength_start`, `wavelength_step`, `num_pixels`).

    A linear grid is taken as it is; a grid that is not linear (arms with different steps) becomes a linear grid
    over the same range with the median pixel step. `step` forces another step (e.g. to oversample a grism).
    """
    wave = get_instrument(instrument).wave
    steps = np.diff(wave)
    linear = np.allclose(steps, steps[0], rtol=1e-6, atol=0.0)
    if step is None and linear:
        return {
            "wavelength_start": float(wave[0]),
            "wavelength_step": float(steps[0]),
            "num_pixels": len(wave),
        }
    step = float(np.median(steps)) if step is None else float(step)
    if not step > 0:
        raise ValueError(f"`step` must be > 0, got {step}")
    num_pixels = int(np.floor((wave[-1] - wave[0]) / step + 1e-9)) + 1
    return {"wavelength_start": float(wave[0]), "wavelength_step": step, "num_pixels": num_pixels}


def coverage_mask(config: SpecPTConfig, instrument: str | Instrument) -> np.ndarray:
    """Model pixels (of `config`'s grid) lying entirely inside the instrument's coverage, bool [num_pixels].

    Raises:
        ValueError: when fewer pixels than one token (`patch_size`; 1 for the `paper` layout) are covered.
    """
    instrument = get_instrument(instrument)
    model_edges = bin_edges(config_wavelength(config))
    data_edges = bin_edges(instrument.wave)
    covered = (model_edges[:-1] >= data_edges[0] - 1e-9) & (model_edges[1:] <= data_edges[-1] + 1e-9)
    needed = config.patch_size if config.layout == "tokens" else 1
    if covered.sum() < needed:
        low, high = instrument.coverage
        raise ValueError(
            f"{instrument.name} covers {low:.0f}-{high:.0f} A but the model's grid spans "
            f"{config.wavelength_start:.0f}-{config.wavelength_end:.0f} A: {int(covered.sum())} model pixels are "
            f"covered, at least {needed} are needed for grid='resample'; use grid='native'"
        )
    return covered


# ----------------------------------------------------------------------------------------------------------------
# Building the model for an instrument
# ----------------------------------------------------------------------------------------------------------------


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


def group_names(names: list[str]) -> str:
    """'specpt.encoder (24), head (12)': tensor names counted by their first two name parts."""
    counts: dict[str, int] = {}
    for name in names:
        group = ".".join(name.split(".")[:2])
        counts[group] = counts.get(group, 0) + 1
    return ", ".join(f"{group} ({n})" for group, n in sorted(counts.items())) or "none"


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")


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
    _check_choice("freeze", freeze, FREEZE_CHOICES)
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

    _check_choice("freeze", freeze, FREEZE_CHOICES)
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
    _check_choice("grid", grid, GRIDS)
    _check_choice("freeze", freeze, FREEZE_CHOICES)
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


# ----------------------------------------------------------------------------------------------------------------
# Mock data for an instrument, as Parquet shards in the project layout
# ----------------------------------------------------------------------------------------------------------------


def _class_counts(classes: Mapping[str, float], n: int) -> dict[str, int]:
    """Split `n` spectra over the classes by share (largest remainder)."""
    total = float(sum(classes.values()))
    exact = {name: n * share / total for name, share in classes.items()}
    counts = {name: int(np.floor(value)) for name, value in exact.items()}
    for name in sorted(exact, key=lambda k: counts[k] - exact[k])[: n - sum(counts.values())]:
        counts[name] += 1
    return counts


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _instrument_code(instrument: Instrument) -> int:
    names = sorted(INSTRUMENTS)
    return names.index(instrument.name.lower()) + 1 if instrument.name.lower() in names else 0


def mock_chunk(
    instrument: Instrument,
    classes: Mapping[str, float],
    n: int,
    seed: int,
    wavelength: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """`n` mock spectra of the classes, shuffled, on `wavelength` (resampled, uncovered pixels masked) or on the
    instrument's grid; columns flux, ivar, mask [n, pixels] and z, zerr, zwarn, spectype, target_class [n]."""
    parts = []
    for k, (name, count) in enumerate(_class_counts(classes, n).items()):
        if count:
            parts.append((name, _generate(name, count, _derived_seed(seed, k), instrument)))
    flux = np.concatenate([d["flux"] for _, d in parts])  # [n, instrument pixels]
    ivar = np.concatenate([d["ivar"] for _, d in parts])
    mask = np.concatenate([d["mask"] for _, d in parts])
    if wavelength is not None and not _same_grid(instrument.wave, wavelength):
        flux, ivar, mask = resample(instrument.wave, flux, ivar, wavelength, mask=mask)  # [n, pixels]
    truth = {
        key: np.concatenate([d["truth"][key] for _, d in parts]) for key in ("z", "zerr", "zwarn", "spectype")
    }
    order = np.random.default_rng(_derived_seed(seed, 1_000_003)).permutation(n)
    columns = {
        "flux": flux.astype(np.float32),
        "ivar": ivar.astype(np.float32),
        "mask": mask | ~(ivar > 0),
        "target_class": np.concatenate([np.full(len(d["flux"]), name) for name, d in parts]),
        **truth,
    }
    return {key: value[order] for key, value in columns.items()}


def _generate(target_class: str, n: int, seed: int, instrument: Instrument) -> dict[str, Any]:
    from .data.mock import generate_spectra

    return generate_spectra(target_class, n, seed, instrument=instrument)


def _same_grid(a: np.ndarray, b: np.ndarray) -> bool:
    return len(a) == len(b) and np.allclose(a, b, rtol=0.0, atol=1e-6 * float(np.max(np.abs(a))))


def read_mock_info(data_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The `mock_info.json` of a folder written by `write_instrument_dataset` (None when there is none)."""
    path = Path(data_dir) / MOCK_INFO_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err


def write_instrument_dataset(
    out_dir: str | os.PathLike,
    instrument: str | Instrument,
    wavelength: np.ndarray | None,
    splits: Mapping[str, int],
    *,
    seed: int = 0,
    classes: Mapping[str, float] | None = None,
    chunk_size: int = 256,
    shard_size: int = 2000,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, int]:
    """Mock spectra of `instrument` as Parquet shards `{out_dir}/{split}/part-*.parquet` (ARCHITECTURE.md
    columns, `z` = the mock truth) plus `mock_info.json` describing the grid and the sample.

    Args:
        wavelength: the grid to write the spectra on (e.g. `config_wavelength(model.config)`): spectra are
            resampled onto it with uncovered pixels masked. None keeps the instrument's own grid.
        splits: spectra per split, e.g. {"train": 2000, "validation": 200, "test": 500}. Each split has its own
            seeds, so a split's spectra do not depend on the other splits' sizes; rows are a shuffled class mix,
            so the first N training rows are a fair subsample.
        classes: target class -> share (default: the instrument's `INSTRUMENT_SAMPLES`).

    Returns:
        Rows written per split (spectra without any good pixel on `wavelength` are dropped and counted in
        `mock_info.json`).
    """
    from .data.builder import desi_features, record_to_example
    from .data.prepare import ShardWriter, check_output_folder, write_dataset_card
    from .data.redshifts import QualityCuts

    instrument = get_instrument(instrument)
    classes = dict(classes or instrument_sample(instrument).classes)
    unknown = [split for split in splits if split not in SPLITS]
    if unknown or any(int(n) < 0 for n in splits.values()):
        raise ValueError(f"`splits` must map {SPLITS} to counts >= 0, got {dict(splits)}")
    grid = instrument.wave if wavelength is None else np.asarray(wavelength, dtype=float)
    out = Path(out_dir)
    check_output_folder(out, overwrite)
    with replaced_folder(out) as tmp:  # complete or absent: written aside, the card last, then renamed
        features = desi_features(len(grid))
        rows, dropped = {}, {}
        for split_code, split in enumerate(SPLITS):
            n_split = int(splits.get(split, 0))
            if not n_split:
                continue
            writer = ShardWriter(tmp / split, features, shard_size, min(256, shard_size), "snappy")
            rows[split], dropped[split] = 0, 0
            chunks = range(math.ceil(n_split / chunk_size))
            try:
                for k in tqdm(chunks, desc=f"{instrument.name} {split}", unit="chunk", disable=not progress):
                    n = min(chunk_size, n_split - k * chunk_size)
                    data = mock_chunk(instrument, classes, n, _derived_seed(seed, split_code, k), grid)
                    for i in range(n):
                        if data["mask"][i].all():
                            dropped[split] += 1
                            continue
                        index = k * chunk_size + i
                        targetid = (
                            _MOCK_TARGETID_BIT | _instrument_code(instrument) << 48 | split_code << 40 | index
                        )
                        writer.add(record_to_example(_record(data, i, targetid, instrument)))
                        rows[split] += 1
                writer.close()
            except BaseException:
                writer.abort()
                raise
        grid_values = {
            "wavelength_start": float(grid[0]),
            "wavelength_step": float(np.median(np.diff(grid))),
            "num_pixels": len(grid),
            "linear": bool(np.allclose(np.diff(grid), np.diff(grid)[0], rtol=1e-6)),
        }
        info = {"instrument": instrument.name, "seed": seed, "classes": classes, "requested": dict(splits)}
        atomic_write_json(
            tmp / MOCK_INFO_NAME, {**info, **grid_values, "rows": rows, "dropped_no_coverage": dropped}
        )
        body = f"\n# Mock {instrument.name} spectra\n\nWritten by `specpt_hf.finetune.write_instrument_dataset`.\n"
        write_dataset_card(
            tmp, rows=rows, target_class="all", cuts=QualityCuts(enabled=False), features=features, body=body
        )
    return rows


def _record(data: Mapping[str, np.ndarray], i: int, targetid: int, instrument: Instrument) -> dict[str, Any]:
    return {
        "targetid": targetid,
        "flux": data["flux"][i],
        "ivar": data["ivar"][i],
        "mask": data["mask"][i],
        "z": data["z"][i],
        "zerr": data["zerr"][i],
        "zwarn": data["zwarn"][i],
        "spectype": data["spectype"][i],
        "target_class": data["target_class"][i],
        "survey": f"mock-{instrument.name.lower()}",
        "program": "mock",
        "healpix": -1,
    }


def check_data_grid(data_dir: str | os.PathLike, config: SpecPTConfig) -> None:
    """Raise ValueError when `mock_info.json` of `data_dir` describes another grid than `config`'s."""
    info = read_mock_info(data_dir)
    if info is None:
        return
    same = (
        info["num_pixels"] == config.num_pixels
        and math.isclose(info["wavelength_start"], config.wavelength_start, rel_tol=1e-6)
        and math.isclose(info["wavelength_step"], config.wavelength_step, rel_tol=1e-6)
    )
    if not same:
        raise ValueError(
            f"{data_dir}: spectra are on a {info['num_pixels']}-pixel grid from {info['wavelength_start']:g} A in "
            f"{info['wavelength_step']:g} A steps, the model reads {config.num_pixels} pixels from "
            f"{config.wavelength_start:g} A in {config.wavelength_step:g} A steps"
        )


# ----------------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------------


def finetune(
    model: nn.Module, settings: TrainingSettings, report: AdaptationReport | None = None
) -> TrainingResult:
    """Train `model` (from `adapt_to_instrument`) with `specpt train`'s loop, stage 2 (`training_function`), on
    `settings.data_dir` (checked against the model's grid); the folders `model/` and `best/` of
    `settings.output_dir` are written by `write_finetuned` (a LoRA model merged, its adapter alongside, `report`
    as `adaptation.json`).

    Spectra outside the model's redshift range are dropped, as `specpt train` does."""
    if settings.stage != "redshift":
        raise ValueError(
            f"fine-tuning trains a redshift model: setting 'stage' must be 'redshift', not {settings.stage!r}"
        )
    check_data_grid(settings.data_dir, redshift_config(model))
    return training_function(settings, model, functools.partial(write_finetuned, report=report))


@dataclass
class SplitEvaluation:
    """Predictions on one split and their metrics (`metrics["all"]` and per target class)."""

    z_pred: np.ndarray
    z_true: np.ndarray
    target_class: np.ndarray
    metrics: dict[str, dict[str, float | int]]
    dropped_out_of_range: int


def evaluate_redshifts(
    model: nn.Module,
    data_dir: str | os.PathLike,
    split: str = "test",
    batch_size: int = 64,
    max_spectra: int | None = None,
    progress: bool = False,
) -> SplitEvaluation:
    """NMAD, eta, bias, sigma68 of `model` on a split of `data_dir`, overall and per target class (spectra outside
    the model's redshift range are left out and counted)."""
    from .training.data import filter_redshift_range, first_rows, load_split

    config = redshift_config(model)
    check_data_grid(data_dir, config)
    columns = ("flux", "ivar", "mask", "z", "target_class")
    dataset = load_split(data_dir, split, columns)
    dataset, dropped = filter_redshift_range(dataset, config.z_min, config.z_max)
    dataset = first_rows(dataset, max_spectra)
    if len(dataset) == 0:
        raise ValueError(f"{Path(data_dir) / split}: no spectra within the model's redshift range")
    plain = merge_lora(model)
    was_training = plain.training
    predicted = predict_dataset(plain, dataset, batch_size, desc=f"evaluate {split}", progress=progress)
    plain.train(was_training)
    pred, true, labels = predicted["z_pred"], predicted["z"], predicted["target_class"].astype(str)
    metrics = metrics_by_group(pred, true, labels, overall_key="all")
    return SplitEvaluation(pred, true, labels, metrics, dropped)


# ----------------------------------------------------------------------------------------------------------------
# A small pretrained start on DESI-like mocks (quick runs without a released checkpoint)
# ----------------------------------------------------------------------------------------------------------------


def pretrain_mock_autoencoder(
    out_dir: str | os.PathLike,
    *,
    preset: str = "specpt-tiny",
    n_train: int = 256,
    n_val: int = 32,
    max_steps: int = 50,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Pretrain a SpecPT autoencoder (stage 1 of `specpt train`) on DESI-like mocks; return its model folder.

    Writes `{out_dir}/data` (DESI-grid Parquet shards of all four classes) and `{out_dir}/run`."""
    out = Path(out_dir)
    data = out / "data"
    write_instrument_dataset(
        data,
        DESI,
        None,
        {"train": n_train, "validation": n_val},
        seed=seed,
        overwrite=True,
        progress=progress,
    )
    settings = TrainingSettings(
        stage="autoencoder",
        preset=preset,
        data_dir=str(data),
        output_dir=str(out / "run"),
        max_steps=max_steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=max(1, max_steps // 10),
        eval_steps=max_steps,
        logging_steps=max(1, max_steps // 5),
        report_to="none",
        seed=seed,
    )
    return training_function(settings).model_dir


__all__ = [
    "FREEZE_CHOICES",
    "GRIDS",
    "INSTRUMENT_SAMPLES",
    "LORA_FEED_FORWARD_MODULES",
    "LORA_TARGET_MODULES",
    "AdaptationReport",
    "InstrumentSample",
    "SplitEvaluation",
    "adapt_to_instrument",
    "adapters_active",
    "apply_freeze",
    "apply_lora",
    "config_wavelength",
    "coverage_mask",
    "evaluate_redshifts",
    "finetune",
    "instrument_sample",
    "lora_config",
    "merge_lora",
    "mock_chunk",
    "native_grid",
    "pretrain_mock_autoencoder",
    "save_finetuned",
    "write_finetuned",
    "write_instrument_dataset",
]
