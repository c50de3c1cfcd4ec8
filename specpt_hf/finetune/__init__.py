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

`instruments` holds what each instrument observes, its grid and its coverage of a model's grid; `adapt` builds
the model for an instrument (weights, freezing, LoRA) and writes it; `mock_dataset` writes an instrument's mock
spectra as Parquet shards; `train` fine-tunes and evaluates the model, and pretrains a small mock autoencoder.

    >>> model, report = adapt_to_instrument("runs/ae/model", "deimos", grid="native", freeze="stem")
    >>> write_instrument_dataset("data/deimos", "deimos", config_wavelength(model.config),
    ...                          {"train": 2000, "validation": 200, "test": 500})
    >>> settings = TrainingSettings(stage="redshift", data_dir="data/deimos", output_dir="runs/deimos",
    ...                             max_steps=1000, learning_rate=3e-4, warmup_steps=50, seed=0)
    >>> result = finetune(model, settings, report)      # runs/deimos/model: merged weights, adaptation.json
    >>> evaluate_redshifts(result.model, "data/deimos").metrics["all"]["nmad"]
"""

from .adapt import (
    ADAPTATION_NAME,
    FREEZE_CHOICES,
    GRIDS,
    LORA_ADAPTER_DIR,
    LORA_FEED_FORWARD_MODULES,
    LORA_TARGET_MODULES,
    AdaptationReport,
    adapt_to_instrument,
    apply_freeze,
    apply_lora,
    group_names,
    lora_config,
    lora_modules,
    merge_lora,
    redshift_config,
    save_finetuned,
    write_finetuned,
)
from .instruments import (
    INSTRUMENT_SAMPLES,
    InstrumentSample,
    config_wavelength,
    coverage_mask,
    instrument_sample,
    native_grid,
)
from .mock_dataset import (
    MOCK_INFO_NAME,
    SPLITS,
    check_data_grid,
    mock_chunk,
    read_mock_info,
    write_instrument_dataset,
)
from .train import (
    SplitEvaluation,
    evaluate_redshifts,
    finetune,
    pretrain_mock_autoencoder,
)

__all__ = [
    "ADAPTATION_NAME",
    "AdaptationReport",
    "FREEZE_CHOICES",
    "GRIDS",
    "INSTRUMENT_SAMPLES",
    "InstrumentSample",
    "LORA_ADAPTER_DIR",
    "LORA_FEED_FORWARD_MODULES",
    "LORA_TARGET_MODULES",
    "MOCK_INFO_NAME",
    "SPLITS",
    "SplitEvaluation",
    "adapt_to_instrument",
    "apply_freeze",
    "apply_lora",
    "check_data_grid",
    "config_wavelength",
    "coverage_mask",
    "evaluate_redshifts",
    "finetune",
    "group_names",
    "instrument_sample",
    "lora_config",
    "lora_modules",
    "merge_lora",
    "mock_chunk",
    "native_grid",
    "pretrain_mock_autoencoder",
    "read_mock_info",
    "redshift_config",
    "save_finetuned",
    "write_finetuned",
    "write_instrument_dataset",
]
