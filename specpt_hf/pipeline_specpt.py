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

Batching is transformers' own: the pipeline is a `ChunkPipeline` whose `preprocess` yields one item per spectrum
(an input file or array stack is many spectra), `SpecPTFeatureExtractor` puts them on the model's grid, and the
pipeline's DataLoader collates `batch_size` items from one or several inputs into each model call; `postprocess`
gathers each input's spectra back into its results.

Shipping with a model: `pipe.save_pretrained(folder)` writes `custom_pipelines` into config.json and copies this
file and the files it imports relatively (`prediction.py`, `loading.py`, `resampling.py`, `refinement.py`,
`emission_lines.py`) next to `modeling_specpt.py` and `configuration_specpt.py`, so that
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
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import BatchFeature, FeatureExtractionMixin, PreTrainedModel
from transformers.pipelines.base import ChunkPipeline
from transformers.utils import logging

from .configuration_specpt import SpecPTConfig
from .loading import MODEL_TYPES, load_model
from .prediction import (
    REFINEMENT_COLUMNS,
    FlagThresholds,
    check_same_grid,
    pdf_redshifts,
    predict_spectra,
    to_model_grid,
)
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


class SpecPTFeatureExtractor(FeatureExtractionMixin):
    """Spectra (a dict, a tuple or a `specutils.Spectrum`) -> the model's inputs on its grid.

    Args:
        num_pixels, wavelength_start, wavelength_step: the model's grid (`SpecPTConfig`'s fields of those names).
        padding_value (`float`, defaults to 0.0): the collate's fill value (every spectrum has the grid's length,
            so nothing is padded).
    """

    model_input_names = ["flux", "ivar", "mask"]

    def __init__(
        self,
        num_pixels: int = 7781,
        wavelength_start: float = 3600.0,
        wavelength_step: float = 0.8,
        padding_value: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_pixels = int(num_pixels)
        self.wavelength_start = float(wavelength_start)
        self.wavelength_step = float(wavelength_step)
        self.padding_value = float(padding_value)

    @classmethod
    def from_model_config(cls, config: SpecPTConfig) -> SpecPTFeatureExtractor:
        """The feature extractor of a model's grid."""
        return cls(config.num_pixels, config.wavelength_start, config.wavelength_step)

    def __call__(self, inputs: Any) -> BatchFeature:
        """One array input -> `flux`, `ivar` (None without one), `mask` [n, pixels] on the grid, `meta` (one dict
        per spectrum), `single` (a 1-D input) and `source` (for messages)."""
        arrays = _input_arrays(inputs)
        flux = _as_2d(arrays["flux"])
        single = np.ndim(arrays["flux"]) == 1
        _check_shapes(flux, {key: _as_2d(arrays.get(key)) for key in ("ivar", "mask")})
        wave = arrays.get("wave")
        wave = None if wave is None else np.asarray(getattr(wave, "value", wave), dtype=np.float64)
        # to_model_grid reads only the grid's fields, which the extractor holds under the config's names
        flux, ivar, mask = to_model_grid(
            self, flux, _as_2d(arrays.get("ivar")), _as_2d(arrays.get("mask")), wave
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
        return BatchFeature(
            {"flux": flux, "ivar": ivar, "mask": mask, "meta": meta, "single": single, "source": source}
        )


# ----------------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------------


def _is_model_type(model: Any, task: str) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == MODEL_TYPES[task]


class SpecPTRedshiftPipeline(ChunkPipeline):
    """`spectrum-redshift`: redshift, uncertainty, quality and `SpecPTZwarn` flag of each input spectrum.

    Args:
        model: a SpecPT redshift model ([`SpecPTForRedshift`]).
        autoencoder (*optional*): a SpecPT autoencoder, or its folder / repo id / short name, on the same grid;
            adds `anomaly` and allows `return_reconstruction`.
        feature_extractor (*optional*): a [`SpecPTFeatureExtractor`]; by default the model's grid's.
        batch_size (`int`, *optional*, defaults to 64): spectra per model call.
        min_quality, min_coverage, max_anomaly (`float`, *optional*): the flag thresholds ([`FlagThresholds`]).
        return_embedding, return_reconstruction (`bool`, *optional*): add those arrays to each result.
        return_pdf (`bool`, *optional*): add `pz` (p(z) per bin) and `pz_z` (the bins' redshifts) to each result,
            and `chi2_scan` / `chi2_scan_z` (the chi^2(z) samples) when the model refines.

    See the module docstring for inputs and outputs.
    """

    # a file path input -> the feature extractor's dict; `import specpt_hf` sets it to the DESI / MMU file reader
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
        if kwargs.get("feature_extractor") is None:
            kwargs["feature_extractor"] = SpecPTFeatureExtractor.from_model_config(model.config)
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
        """Predict one input or a list of inputs; `batch_size` spectra per model call, across inputs."""
        if isinstance(inputs, (list, tuple)) and not len(inputs):
            raise ValueError("no inputs: the list is empty")
        batch_size = int(kwargs.pop("batch_size", None) or self._batch_size or DEFAULT_BATCH_SIZE)
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        # a list goes through transformers' DataLoader, which batches the spectra; so does a single input
        one = not isinstance(inputs, list)
        results = super().__call__([inputs] if one else inputs, batch_size=batch_size, **kwargs)
        return results[0] if one else results

    def _sanitize_parameters(
        self,
        return_embedding: bool | None = None,
        return_reconstruction: bool | None = None,
        return_pdf: bool | None = None,
        min_quality: float | None = None,
        min_coverage: float | None = None,
        max_anomaly: float | None = None,
    ) -> tuple[dict, dict, dict]:
        forward: dict[str, Any] = {}
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

    def preprocess(self, inputs: Any) -> Iterator[dict[str, Any]]:
        """One input -> one item per spectrum: `flux`, `ivar`, `mask` [1, pixels] (ivar zero and `has_ivar`
        False where the input has none), its `meta`, and what `postprocess` needs of the input."""
        if isinstance(inputs, (str, os.PathLike)):
            if os.path.isdir(inputs):
                raise ValueError(f"{os.fspath(inputs)}: a directory; pass its coadd-*.fits files one by one")
            prepared = self._read_file(os.fspath(inputs))
        else:
            prepared = self.feature_extractor(inputs)
        if (~prepared["mask"]).sum() == 0:
            grid = f"{self.model.config.wavelength_start:.1f}-{self.model.config.wavelength_end:.1f} A"
            raise ValueError(f"{prepared['source']}: no usable pixel on the model's grid ({grid})")
        flux = torch.tensor(prepared["flux"], dtype=torch.float32)  # [n, pixels]
        has_ivar = prepared["ivar"] is not None
        ivar = torch.tensor(prepared["ivar"], dtype=torch.float32) if has_ivar else torch.zeros_like(flux)
        mask = torch.tensor(prepared["mask"], dtype=torch.bool)  # [n, pixels], True = bad
        n = len(flux)
        for i in range(n):
            yield {
                "flux": flux[i : i + 1],
                "ivar": ivar[i : i + 1],
                "mask": mask[i : i + 1],
                "has_ivar": has_ivar,
                "meta": prepared["meta"][i],
                "single": prepared["single"],
                "source": prepared["source"],
                "is_last": i == n - 1,
            }

    def _forward(
        self,
        inputs: dict[str, Any],
        return_embedding: bool = False,
        return_reconstruction: bool = False,
        return_pdf: bool = False,
        thresholds: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """A collated batch of spectra (from one or several inputs) -> their columns; spectra with and without
        ivar run as separate model calls."""
        flux, ivar, mask = (inputs[key].cpu().numpy() for key in ("flux", "ivar", "mask"))  # [b, pixels]
        # collated items hold lists; a batch of one (transformers' `no_collate_fn`) holds the item's own values
        has_ivar = np.atleast_1d(np.asarray(inputs["has_ivar"], dtype=bool))  # [b]
        limits = FlagThresholds(**(thresholds or {}))
        columns: dict[str, np.ndarray] = {}
        for with_ivar in (True, False):
            rows = np.flatnonzero(has_ivar == with_ivar)
            if not len(rows):
                continue
            part = predict_spectra(
                self.model,
                flux[rows],
                ivar[rows] if with_ivar else None,
                mask[rows],
                autoencoder=self.autoencoder,
                thresholds=limits,
                return_embedding=return_embedding,
                return_reconstruction=return_reconstruction,
                return_pdf=return_pdf,
            )
            for key, value in part.items():
                if key not in columns:
                    columns[key] = np.empty((len(flux), *value.shape[1:]), dtype=value.dtype)
                columns[key][rows] = value
        passed = {key: inputs[key] for key in ("meta", "single", "source", "is_last")}
        return {**columns, **passed}

    def postprocess(self, outputs: list[dict[str, Any]]) -> dict[str, Any] | list[dict[str, Any]]:
        """One input's spectra (`_forward`'s rows, in order) -> its result dicts."""
        scalars = ["z", "zerr", "quality", "zwarn", "npixels", "z_net", "zerr_net"] + (
            ["anomaly"] if self.autoencoder is not None else []
        )
        first = outputs[0]
        scalars += [key for key in REFINEMENT_COLUMNS if key != "coeff" and key in first]
        arrays = [key for key in ("embedding", "reconstruction", "coeff", "pz", "chi2_scan") if key in first]
        grids = pdf_redshifts(self.model) if "pz" in first else {}
        results = []
        for row in outputs:
            result = {**row["meta"], **{key: np.asarray(row[key]).item() for key in scalars}}
            result.update({key: np.asarray(row[key])[0] for key in arrays})
            result.update({f"{key}_z": grid for key, grid in grids.items()})
            results.append(result)
        nodata = sum(result["npixels"] == 0 for result in results)
        if nodata:
            logger.warning(
                f"{first['source']}: {nodata} spectra without a usable pixel on the model's grid (NODATA)"
            )
        return results[0] if first["single"] else results


__all__ = ["DEFAULT_BATCH_SIZE", "TASK", "SpecPTFeatureExtractor", "SpecPTRedshiftPipeline"]
