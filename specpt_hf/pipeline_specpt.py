"""The `spectrum-redshift` pipeline: spectra in, redshift, uncertainty, quality and a ZWARN-like flag out.

    >>> import specpt_hf  # registers the task
    >>> from transformers import pipeline
    >>> pipe = pipeline("spectrum-redshift", model="runs/redshift/best")          # a folder or a Hub repo id
    >>> pipe("coadd-sv3-dark-26065.fits")                      # one dict per spectrum of the DESI file
    >>> pipe({"wave": wave, "flux": flux, "ivar": ivar})      # arrays on any grid (Angstrom, 1e-17 erg/s/cm2/A)
    >>> pipe(spectrum)                                         # a specutils.Spectrum from any instrument
    >>> from specpt_hf import load_pipeline
    >>> pipe = load_pipeline("specpt-desi", autoencoder="specpt-desi-autoencoder")   # short names

Inputs (one per call, or a list of them):

- a DESI `coadd-*` / `spectra-*` path: every good fiber, read with `specpt_hf.data.read_desi_spectra`, or a
  Multimodal Universe DESI file (HDF5 shard or Parquet export, `specpt_hf.data.mmu`). Needs the `specpt_hf`
  package, which plugs its readers in as `SpecPTRedshiftPipeline.file_reader` when imported; the other inputs
  work without it (for `trust_remote_code` users);
- a dict with `flux` ([pixels] or [n, pixels]) and optional `wave` (Angstrom, vacuum, increasing), `ivar`,
  `mask` (True = bad pixel) and `targetid`; or a tuple `(wave, flux)` / `(wave, flux, ivar)`. Without `wave` the
  flux must already be on the model's grid;
- a `specutils.Spectrum` (1-D or [n, pixels] flux, any spectral axis and flux-density unit, any uncertainty kind).

Spectra not on the model's grid are resampled onto it (flux-conserving, inverse variance propagated; model
pixels not entirely covered by the input are masked). Spectra without any usable pixel after that are returned
with z = NaN and the NODATA bit; an input none of whose spectra has a usable pixel raises ValueError.

Outputs, per spectrum, a dict: `z`, `zerr`, `quality` (NaN where the head gives none), `zwarn` (see `SpecPTZwarn`),
`npixels` (good pixels on the model grid); `targetid`, `survey`, `program`, `healpix` for DESI files; with an
autoencoder (`autoencoder=` a model, folder, repo id or short name) also `anomaly` (reduced chi^2 of the
autoencoder's reconstruction) and, with `return_reconstruction=True`, `reconstruction` (flux units, model grid);
with `return_embedding=True`, `embedding` (the redshift head's per-spectrum vector). The redshift model has no
decoder, so reconstructions always come from the separate autoencoder.

Call parameters: `batch_size` (spectra per model call, default 64), `return_embedding`, `return_reconstruction`,
`min_quality`, `min_coverage`, `max_anomaly` (the flag thresholds, see `FlagThresholds`).

Shipping with a model: `pipe.save_pretrained(folder)` writes `custom_pipelines` into config.json and copies this
file and the files it imports relatively (`prediction.py`, `loading.py`, `resampling.py`, `refinement.py`) next
to `modeling_specpt.py` and `configuration_specpt.py`, so that
`pipeline("spectrum-redshift", model=folder, trust_remote_code=True)` works where `specpt_hf` is not installed.
Where `specpt_hf` is installed and the folder ships the pipeline, `transformers.pipeline` still asks for
`trust_remote_code=True` (or `pipeline_class=SpecPTRedshiftPipeline`); `specpt_hf.load_pipeline(folder)` uses
this class directly and needs neither.

Short names: `specpt-desi` and `specpt-desi-autoencoder` (see `SHORT_NAMES`) work in `load_model`,
`load_pipeline` and the pipeline's `autoencoder=` argument. `transformers.pipeline(...)` itself resolves model
strings before any of this code runs, so there use the repo id (`specpt/specpt-desi`) or a loaded model.

This file is shipped as remote code: it imports only numpy, torch, astropy, huggingface_hub, transformers and the
files next to it; nothing from the `specpt_hf` package.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import Pipeline, PreTrainedModel
from transformers.utils import logging

from .configuration_specpt import SpecPTConfig
from .loading import MODEL_TYPES, load_model
from .prediction import FlagThresholds, check_same_grid, pdf_redshifts, predict_spectra, to_model_grid
from .resampling import spectrum_arrays

logger = logging.get_logger(__name__)

TASK = "spectrum-redshift"
DEFAULT_BATCH_SIZE = 64


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------


def _is_spectrum(value: Any) -> bool:
    return hasattr(value, "spectral_axis") and hasattr(value, "flux")


def _input_arrays(inputs: Any) -> dict[str, Any]:
    """wave/flux/ivar/mask/targetid from a dict, a tuple or a Spectrum."""
    if _is_spectrum(inputs):
        return spectrum_arrays(inputs)
    if isinstance(inputs, dict):
        if "flux" not in inputs:
            raise ValueError(f"a dict input needs a `flux` entry, got keys {sorted(inputs)}")
        unknown = set(inputs) - {"wave", "wavelength", "flux", "ivar", "mask", "targetid"}
        if unknown:
            raise ValueError(f"unknown dict entries {sorted(unknown)}; use wave, flux, ivar, mask, targetid")
        arrays = dict(inputs)
        arrays["wave"] = arrays.pop("wavelength", arrays.get("wave"))
        return arrays
    if isinstance(inputs, tuple) and len(inputs) in (2, 3):
        return dict(zip(("wave", "flux", "ivar"), inputs, strict=False))
    raise ValueError(
        "input must be a DESI coadd path, a dict with `flux` (and `wave`, `ivar`, `mask`), a tuple "
        f"(wave, flux[, ivar]) or a specutils Spectrum, got {type(inputs).__name__}"
    )


def _as_2d(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return value[None] if value.ndim == 1 else value


def _check_shapes(flux: np.ndarray, others: dict[str, np.ndarray | None]) -> None:
    """ValueError naming the argument when `flux` is empty or `ivar` / `mask` do not match its shape."""
    if flux.size == 0:
        raise ValueError(f"`flux` is empty (shape {flux.shape}): nothing to predict")
    for name, value in others.items():
        if value is not None and value.shape != flux.shape:
            raise ValueError(f"`{name}` has shape {value.shape} but `flux` has shape {flux.shape}")


def prepare_input(inputs: Any, config: SpecPTConfig) -> dict[str, Any]:
    """One array input (dict, tuple or Spectrum) -> spectra on the model's grid: `flux`, `ivar`, `mask`
    [n, pixels], `meta` (one dict per spectrum), `single` (a 1-D input) and `source` (for messages)."""
    arrays = _input_arrays(inputs)
    flux = _as_2d(arrays["flux"])
    single = np.ndim(arrays["flux"]) == 1
    _check_shapes(flux, {key: _as_2d(arrays.get(key)) for key in ("ivar", "mask")})
    wave = arrays.get("wave")
    wave = None if wave is None else np.asarray(getattr(wave, "value", wave), dtype=np.float64)
    flux, ivar, mask = to_model_grid(
        config, flux, _as_2d(arrays.get("ivar")), _as_2d(arrays.get("mask")), wave
    )
    targetid = arrays.get("targetid")
    meta = [{} for _ in range(len(flux))]
    if targetid is not None:
        targetid = np.atleast_1d(targetid)
        if len(targetid) != len(flux):
            raise ValueError(f"`targetid` has {len(targetid)} values for {len(flux)} spectra")
        for item, value in zip(meta, targetid, strict=True):
            item["targetid"] = int(value)
    source = "input spectrum" if wave is None else f"input spectrum ({wave[0]:.1f}-{wave[-1]:.1f} A)"
    return {"flux": flux, "ivar": ivar, "mask": mask, "meta": meta, "single": single, "source": source}


# ----------------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------------


def _is_model_type(model: Any, task: str) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == MODEL_TYPES[task]


class SpecPTRedshiftPipeline(Pipeline):
    """`spectrum-redshift`: redshift, uncertainty, quality and `SpecPTZwarn` flag of each input spectrum.

    Args:
        model: a SpecPT redshift model ([`SpecPTForRedshift`]).
        autoencoder (*optional*): a SpecPT autoencoder, or its folder / repo id / short name, on the same grid;
            adds `anomaly` and allows `return_reconstruction`.
        batch_size (`int`, *optional*, defaults to 64): spectra per model call.
        min_quality, min_coverage, max_anomaly (`float`, *optional*): the flag thresholds ([`FlagThresholds`]).
        return_embedding, return_reconstruction (`bool`, *optional*): add those arrays to each result.
        return_pdf (`bool`, *optional*): add `pz` (p(z) per bin) and `pz_z` (the bins' redshifts) to each result,
            and `chi2_scan` / `chi2_scan_z` (the chi^2(z) samples) when the model refines.

    See the module docstring for inputs and outputs.
    """

    # a file path input -> `prepare_input`'s dict; `import specpt_hf` sets it to the DESI / MMU file reader
    file_reader: ClassVar[Callable[[str, SpecPTConfig], dict[str, Any]] | None] = None

    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, model: PreTrainedModel, *args: Any, autoencoder: Any = None, **kwargs: Any) -> None:
        if not _is_model_type(model, "redshift"):
            raise ValueError(
                f"the {TASK} pipeline needs a SpecPT redshift model (model_type 'specpt_redshift'), got "
                f"{type(model).__name__}; pass an autoencoder as `autoencoder=`"
            )
        super().__init__(model, *args, **kwargs)
        self.model.eval()
        if isinstance(autoencoder, (str, os.PathLike)):
            autoencoder = load_model(autoencoder, task="autoencoder")
        if autoencoder is not None:
            if not _is_model_type(autoencoder, "autoencoder"):
                raise ValueError(
                    f"`autoencoder` must be a SpecPT autoencoder, got {type(autoencoder).__name__}"
                )
            check_same_grid(self.model, autoencoder)
            autoencoder = autoencoder.to(self.device).eval()
        self.autoencoder = autoencoder

    def __call__(self, inputs: Any, **kwargs: Any) -> dict[str, Any] | list[Any]:
        """Predict one input or a list of inputs; `batch_size` sets the spectra per model call (each input is
        already a batch of spectra, so transformers' own batching of inputs is not used)."""
        if isinstance(inputs, (list, tuple)) and not len(inputs):
            raise ValueError("no inputs: the list is empty")
        batch_size = kwargs.pop("batch_size", None) or self._batch_size or DEFAULT_BATCH_SIZE
        return super().__call__(inputs, batch_size=1, max_batch_size=int(batch_size), **kwargs)

    def _sanitize_parameters(
        self,
        max_batch_size: int | None = None,
        return_embedding: bool | None = None,
        return_reconstruction: bool | None = None,
        return_pdf: bool | None = None,
        min_quality: float | None = None,
        min_coverage: float | None = None,
        max_anomaly: float | None = None,
    ) -> tuple[dict, dict, dict]:
        forward: dict[str, Any] = {}
        if max_batch_size is not None:
            forward["max_batch_size"] = max_batch_size
        if return_embedding is not None:
            forward["return_embedding"] = return_embedding
        if return_reconstruction is not None:
            if return_reconstruction and getattr(self, "autoencoder", True) is None:
                raise ValueError(
                    "`return_reconstruction=True` needs `autoencoder=` (the redshift model has no decoder)"
                )
            forward["return_reconstruction"] = return_reconstruction
        if return_pdf is not None:
            forward["return_pdf"] = return_pdf
        limits = {"min_quality": min_quality, "min_coverage": min_coverage, "max_anomaly": max_anomaly}
        limits = {key: float(value) for key, value in limits.items() if value is not None}
        if limits:
            forward["thresholds"] = limits
        return {}, forward, {}

    def _read_file(self, path: str) -> dict[str, Any]:
        if self.file_reader is None:
            raise ValueError(
                f"{path}: reading DESI files needs the `specpt_hf` package (pip install specpt-hf); without it "
                "pass (wave, flux, ivar) arrays or a specutils Spectrum"
            )
        return self.file_reader(path, self.model.config)

    def preprocess(self, inputs: Any) -> dict[str, Any]:
        if isinstance(inputs, (str, os.PathLike)):
            if os.path.isdir(inputs):
                raise ValueError(f"{os.fspath(inputs)}: a directory; pass its coadd-*.fits files one by one")
            prepared = self._read_file(os.fspath(inputs))
        else:
            prepared = prepare_input(inputs, self.model.config)
        if (~prepared["mask"]).sum() == 0:
            grid = f"{self.model.config.wavelength_start:.1f}-{self.model.config.wavelength_end:.1f} A"
            raise ValueError(f"{prepared['source']}: no usable pixel on the model's grid ({grid})")
        return prepared

    def _forward(
        self,
        inputs: dict[str, Any],
        max_batch_size: int = DEFAULT_BATCH_SIZE,
        return_embedding: bool = False,
        return_reconstruction: bool = False,
        return_pdf: bool = False,
        thresholds: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        limits = FlagThresholds(**(thresholds or {}))
        parts = []
        for start in range(0, len(inputs["flux"]), max_batch_size):
            chunk = slice(start, start + max_batch_size)
            parts.append(
                predict_spectra(
                    self.model,
                    inputs["flux"][chunk],
                    None if inputs["ivar"] is None else inputs["ivar"][chunk],
                    inputs["mask"][chunk],
                    autoencoder=self.autoencoder,
                    thresholds=limits,
                    return_embedding=return_embedding,
                    return_reconstruction=return_reconstruction,
                    return_pdf=return_pdf,
                )
            )
        columns = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
        nodata = int((columns["npixels"] == 0).sum())
        if nodata:
            logger.warning(
                f"{inputs['source']}: {nodata} spectra without a usable pixel on the model's grid (NODATA)"
            )
        return {"columns": columns, "meta": inputs["meta"], "single": inputs["single"]}

    def postprocess(self, outputs: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
        columns = outputs["columns"]
        scalars = ["z", "zerr", "quality", "zwarn", "npixels", "z_net", "zerr_net"] + (
            ["anomaly"] if self.autoencoder is not None else []
        )
        scalars += [key for key in ("chi2", "deltachi2", "spectype", "npixels_fit") if key in columns]
        arrays = [
            key for key in ("embedding", "reconstruction", "coeff", "pz", "chi2_scan") if key in columns
        ]
        grids = pdf_redshifts(self.model) if "pz" in columns else {}
        results = []
        for i, meta in enumerate(outputs["meta"]):
            row = {**meta, **{key: columns[key][i].item() for key in scalars}}
            row.update({key: columns[key][i] for key in arrays})
            row.update({f"{key}_z": grid for key, grid in grids.items()})
            results.append(row)
        return results[0] if outputs["single"] else results


__all__ = ["DEFAULT_BATCH_SIZE", "TASK", "SpecPTRedshiftPipeline", "prepare_input"]
