"""The `spectrum-redshift` pipeline: spectra in, redshift, uncertainty, quality and a ZWARN-like flag out.

    >>> import specpt_hf  # registers the task
    >>> from transformers import pipeline
    >>> pipe = pipeline("spectrum-redshift", model="runs/redshift/best")          # a folder or a Hub repo id
    >>> pipe("coadd-sv3-dark-26065.fits")                      # one dict per spectrum of the DESI file
    >>> pipe({"wave": wave, "flux": flux, "ivar": ivar})      # arrays on any grid (Angstrom, 1e-17 erg/s/cm2/A)
    >>> pipe(spectrum)                                         # a specutils.Spectrum from any instrument
    >>> from specpt_hf.pipeline_specpt import load_pipeline
    >>> pipe = load_pipeline("specpt-desi", autoencoder="specpt-desi-autoencoder")   # short names

Inputs (one per call, or a list of them):

- a DESI `coadd-*` / `spectra-*` path: every good fiber, read with `specpt_hf.data.read_desi_spectra`, or a
  Multimodal Universe DESI file (HDF5 shard or Parquet export, `specpt_hf.data.mmu`). Needs the `specpt_hf`
  package; the rest of this file works without it (for `trust_remote_code` users);
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
file and the files it imports relatively (`resampling.py`) next to `modeling_specpt.py` and
`configuration_specpt.py`, so that
`pipeline("spectrum-redshift", model=folder, trust_remote_code=True)` works where `specpt_hf` is not installed.
Where `specpt_hf` is installed and the folder ships the pipeline, `transformers.pipeline` still asks for
`trust_remote_code=True` (or `pipeline_class=SpecPTRedshiftPipeline`); `load_pipeline(folder)` uses this class
directly and needs neither.

Short names: `specpt-desi` and `specpt-desi-autoencoder` (see `SHORT_NAMES`) work in `load_model`,
`load_pipeline` and the pipeline's `autoencoder=` argument. `transformers.pipeline(...)` itself resolves model
strings before any of this code runs, so there use the repo id (`specpt/specpt-desi`) or a loaded model.

This file is shipped as remote code: it imports only numpy, torch, astropy, huggingface_hub, transformers and the
files next to it (the two model files and `resampling.py`; plus `specpt_hf` for DESI files, when installed).
"""

from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import is_offline_mode
from safetensors import SafetensorError, safe_open
from transformers import Pipeline, PretrainedConfig, PreTrainedModel
from transformers.utils import logging

from .configuration_specpt import SpecPTConfig, SpecPTForRedshiftConfig
from .modeling_specpt import SpecPTForRedshift, SpecPTForSpectrumReconstruction
from .resampling import good_pixels, resample, spectrum_arrays

try:  # DESI and MMU files are read by the package's readers; without it the pipeline takes arrays and Spectra
    from specpt_hf.data.desi import desi_brz_wavelength, read_desi_spectra
    from specpt_hf.data.mmu import is_mmu_file, read_mmu_spectra
except ImportError:
    desi_brz_wavelength = read_desi_spectra = is_mmu_file = read_mmu_spectra = None

logger = logging.get_logger(__name__)

TASK = "spectrum-redshift"
DEFAULT_BATCH_SIZE = 64

# Short model names -> Hub repo ids. `specpt-desi`: the redshift model trained on DESI EDR spectra;
# `specpt-desi-autoencoder`: the pretrained autoencoder it starts from (also gives the anomaly score).
SHORT_NAMES: dict[str, str] = {
    "specpt-desi": "specpt/specpt-desi",
    "specpt-desi-autoencoder": "specpt/specpt-desi-autoencoder",
}
MODEL_TYPES = {"redshift": SpecPTForRedshiftConfig.model_type, "autoencoder": SpecPTConfig.model_type}


class SpecPTZwarn(enum.IntFlag):
    """Bits of the `zwarn` / `ZWARN` flag of SpecPT predictions (0 = no warning; never inverted).

    Bit positions follow Redrock's ZWARN where the meaning corresponds, so `ZWARN == 0` cuts read the same:

    - bit 1 `LITTLE_COVERAGE` (Redrock: same): fewer than `min_coverage` of the model's pixels are good, or (with
      refinement) fewer than `min_coverage` of the good pixels lie inside the winning templates' rest range.
    - bit 2 `LOW_QUALITY` (Redrock: SMALL_DELTA_CHI2): `quality` (p(z) mass near the peak) below `min_quality`;
      with template refinement, as in Redrock, DELTACHI2 below `min_delta_chi2` (alias `SMALL_DELTA_CHI2`).
    - bit 4 `ANOMALOUS` (Redrock: MANY_OUTLIERS): the autoencoder's reduced chi^2 exceeds `max_anomaly`
      (only set when an autoencoder is used).
    - bit 5 `AT_Z_LIMIT` (Redrock: Z_FITLIMIT): z within one p(z) bin of the model's z_min or z_max (not for a STAR).
    - bit 9 `NODATA` (Redrock: same): no usable pixel on the model's grid; z, zerr, quality are NaN.
    - bit 10 `BAD_FIT` (Redrock: BAD_MINFIT): usable pixels, but z came out NaN / inf (e.g. a flux of 1e38
      overflowing float32); never a silent ZWARN = 0.
    """

    LITTLE_COVERAGE = 1 << 1
    LOW_QUALITY = 1 << 2
    SMALL_DELTA_CHI2 = 1 << 2  # alias: the bit's meaning with template refinement
    ANOMALOUS = 1 << 4
    AT_Z_LIMIT = 1 << 5
    NODATA = 1 << 9
    BAD_FIT = 1 << 10

    @classmethod
    def names(cls, value: int) -> list[str]:
        """Names of the bits set in `value`."""
        return [flag.name for flag in cls if int(value) & flag]


@dataclass(frozen=True)
class FlagThresholds:
    """Thresholds of the `SpecPTZwarn` bits.

    Args:
        min_quality (`float`, defaults to 0.5): `LOW_QUALITY` below this quality.
        min_coverage (`float`, defaults to 0.5): `LITTLE_COVERAGE` below this fraction of good model pixels.
        max_anomaly (`float`, defaults to 5.0): `ANOMALOUS` above this reduced chi^2 of the reconstruction.
        min_delta_chi2 (`float`, defaults to 9.0): with refinement, `SMALL_DELTA_CHI2` below this DELTACHI2
            (Redrock's default).
    """

    min_quality: float = 0.5
    min_coverage: float = 0.5
    max_anomaly: float = 5.0
    min_delta_chi2: float = 9.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_quality <= 1.0 or not 0.0 <= self.min_coverage <= 1.0:
            raise ValueError(
                f"`min_quality` and `min_coverage` must be in [0, 1], got {self.min_quality}, {self.min_coverage}"
            )
        if not self.max_anomaly > 0:
            raise ValueError(f"`max_anomaly` must be > 0, got {self.max_anomaly}")
        if not self.min_delta_chi2 >= 0:
            raise ValueError(f"`min_delta_chi2` must be >= 0, got {self.min_delta_chi2}")

    def as_dict(self) -> dict[str, float]:
        return {field.name: getattr(self, field.name) for field in fields(self)}


# ----------------------------------------------------------------------------------------------------------------
# Loading models by folder, repo id or short name
# ----------------------------------------------------------------------------------------------------------------


def resolve_model_name(name_or_path: str | os.PathLike) -> str:
    """A local folder as is, a short name (`SHORT_NAMES`) as its repo id, anything else unchanged."""
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        return name
    return SHORT_NAMES.get(name, name)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")


def _unavailable(name: str, repo: str, error: Exception) -> OSError:
    where = f"{name!r} (Hub repo {repo!r})" if name != repo else repr(repo)
    if is_offline_mode():
        return OSError(
            f"{where} is neither a local folder nor in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids "
            f"downloading it: download it once with network access (unset HF_HUB_OFFLINE, e.g. `hf download {repo}`), "
            "or pass the path of a local model folder"
        )
    return OSError(
        f"cannot load {where}: it is not a local folder and the Hub refused or could not be reached ({error}). "
        "Check the name, the network and HF_ENDPOINT, or pass the path of a local model folder"
    )


def _check_weights(folder: Path) -> None:
    """OSError naming the file when a local folder's safetensors weights are truncated or not safetensors."""
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError, ValueError) as error:  # broken header or buffer
            raise OSError(
                f"{path}: not a readable safetensors file ({error}); it is truncated or corrupt: copy or "
                "download the model folder again"
            ) from None


def check_model_source(
    name_or_path: str | os.PathLike, task: str | None = None, **hub_kwargs: Any
) -> tuple[str, str]:
    """(folder or repo id, model_type) of a SpecPT model, checked before any weights are read.

    Raises:
        FileNotFoundError: a path that does not exist.
        OSError: a model that cannot be fetched (offline: says to download it or pass a folder), or a folder
            without weights or with broken ones.
        ValueError: a folder holding another kind of model (foreign `model_type`, or the other SpecPT task).
    """
    if task is not None and task not in MODEL_TYPES:
        raise ValueError(f"`task` must be one of {tuple(MODEL_TYPES)} or None, got {task!r}")
    name = os.fspath(name_or_path)
    repo = resolve_model_name(name)
    local = os.path.isdir(repo)
    if not local and _looks_like_path(name):
        raise FileNotFoundError(f"{name}: no such model folder")
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(repo, **hub_kwargs)
    except OSError as error:
        if local:
            raise OSError(f"{repo}: not a model folder (no readable config.json: {error})") from error
        raise _unavailable(name, repo, error) from error
    model_type = config_dict.get("model_type")
    if model_type not in MODEL_TYPES.values():
        raise ValueError(
            f"{name}: config.json has model_type {model_type!r}, not a SpecPT model {tuple(MODEL_TYPES.values())}"
        )
    if task is not None and model_type != MODEL_TYPES[task]:
        other = "autoencoder" if task == "redshift" else "redshift"
        raise ValueError(
            f"{name}: holds a SpecPT {other} model (model_type {model_type!r}), not a {task} model"
        )
    if local and not any(
        os.path.isfile(os.path.join(repo, f)) for f in ("model.safetensors", "model.safetensors.index.json")
    ):
        raise OSError(f"{repo}: no model.safetensors; the model folder is incomplete")
    if local:
        _check_weights(Path(repo))
    return repo, model_type


def load_model(
    name_or_path: str | os.PathLike, task: str | None = None, **kwargs: Any
) -> SpecPTForRedshift | SpecPTForSpectrumReconstruction:
    """Load a SpecPT model from a local folder, a Hub repo id or a short name, in eval mode.

    Args:
        name_or_path: folder, repo id, or a key of `SHORT_NAMES` (`specpt-desi`, `specpt-desi-autoencoder`).
        task: `"redshift"` or `"autoencoder"` to insist on that kind of model; None takes what the folder holds.
        kwargs: passed to `from_pretrained` (`revision`, `cache_dir`, `token`, `local_files_only`, `dtype`, ...).

    Raises:
        The errors of `check_model_source`.
    """
    name = os.fspath(name_or_path)
    hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
    repo, model_type = check_model_source(name, task, **hub_kwargs)
    local = os.path.isdir(repo)
    cls = SpecPTForRedshift if model_type == MODEL_TYPES["redshift"] else SpecPTForSpectrumReconstruction
    try:
        model = cls.from_pretrained(repo, **kwargs)
    except OSError as error:
        if local:
            raise
        raise _unavailable(name, repo, error) from error
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Grids and resampling
# ----------------------------------------------------------------------------------------------------------------


def model_wavelength(config: SpecPTConfig) -> np.ndarray:
    """Pixel centres of the model's grid, Angstrom, float64 [num_pixels]."""
    return config.wavelength_start + config.wavelength_step * np.arange(config.num_pixels, dtype=np.float64)


def same_grid(wave: np.ndarray, config: SpecPTConfig) -> bool:
    """Whether `wave` is the model's grid (to 1e-3 of a pixel)."""
    wave = np.asarray(wave, dtype=np.float64)
    if wave.shape != (config.num_pixels,):
        return False
    return bool(np.allclose(wave, model_wavelength(config), rtol=0.0, atol=1e-3 * config.wavelength_step))


def _check_wave(wave: Any, pixels: int) -> np.ndarray:
    wave = np.asarray(wave, dtype=np.float64)
    if wave.ndim != 1 or len(wave) != pixels or len(wave) < 2:
        raise ValueError(
            f"`wave` must be 1-D with one value per flux pixel ({pixels}), got shape {wave.shape}"
        )
    if not np.all(np.isfinite(wave)) or np.any(np.diff(wave) <= 0):
        raise ValueError("`wave` must be finite and strictly increasing (Angstrom)")
    return wave


def resample_spectra(
    wave: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray | None,
    mask: np.ndarray | None,
    new_wave: np.ndarray,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """`resample` (flux-conserving, inverse variance propagated, uncovered pixels masked) in the form the model
    reads: flux [n, n_out] float32 (0 where masked), ivar [n, n_out] float32 (None without input ivar) and
    mask [n, n_out] bool (True = bad)."""
    out_flux, out_ivar, out_mask = resample(wave, flux, ivar, new_wave, mask=mask)
    return out_flux.astype(np.float32), None if ivar is None else out_ivar.astype(np.float32), out_mask


def to_model_grid(
    config: SpecPTConfig,
    flux: np.ndarray,
    ivar: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    wave: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Spectra [n, pixels] as the model reads them: float32 flux, ivar (or None), mask (True = bad) on the model's
    grid. Unchanged when `wave` is None or the model's grid; resampled otherwise."""
    flux = np.asarray(flux, dtype=np.float32)
    if flux.ndim != 2:
        raise ValueError(f"`flux` must be [pixels] or [n, pixels], got shape {flux.shape}")
    ivar = None if ivar is None else np.broadcast_to(np.asarray(ivar, dtype=np.float32), flux.shape)
    mask = None if mask is None else np.broadcast_to(np.asarray(mask).astype(bool), flux.shape)
    if wave is not None:
        wave = _check_wave(wave, flux.shape[1])
        if not same_grid(wave, config):
            return resample_spectra(wave, flux, ivar, mask, model_wavelength(config))
    elif flux.shape[1] != config.num_pixels:
        raise ValueError(
            f"`flux` has {flux.shape[1]} pixels but the model's grid has {config.num_pixels}; pass `wave` "
            "(Angstrom) to resample it"
        )
    return flux, ivar, ~good_pixels(flux, ivar, mask)


# ----------------------------------------------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------------------------------------------


def check_same_grid(model: PreTrainedModel, autoencoder: PreTrainedModel) -> None:
    """ValueError unless the autoencoder reads the redshift model's grid."""
    keys = ("num_pixels", "wavelength_start", "wavelength_step")
    a, b = ({k: getattr(m.config, k) for k in keys} for m in (model, autoencoder))
    if a != b:
        raise ValueError(f"the autoencoder's grid {b} differs from the redshift model's {a}")


def zwarn_flags(
    config: SpecPTForRedshiftConfig,
    z: np.ndarray,
    quality: np.ndarray,
    npixels: np.ndarray,
    anomaly: np.ndarray,
    thresholds: FlagThresholds,
    delta_chi2: np.ndarray | None = None,
    npixels_fit: np.ndarray | None = None,
    spectype: np.ndarray | None = None,
) -> np.ndarray:
    """`SpecPTZwarn` bit mask [n] (int64) from the predictions and the thresholds (NaN never sets a bit);
    `delta_chi2`, `npixels_fit` and `spectype` come from template refinement (None: network-only). A STAR sits
    at z ~ 0 by nature, inside its own velocity range: it never gets AT_Z_LIMIT."""
    with np.errstate(invalid="ignore"):
        u_z = np.log1p(z)
        edge = (u_z - math.log1p(config.z_min) < config.redshift_bin_width) | (
            math.log1p(config.z_max) - u_z < config.redshift_bin_width
        )
        if spectype is not None:
            edge &= spectype != "STAR"
        coverage = npixels < thresholds.min_coverage * config.num_pixels
        if npixels_fit is not None:
            coverage |= npixels_fit < thresholds.min_coverage * npixels
        ambiguous = (
            quality < thresholds.min_quality if delta_chi2 is None else delta_chi2 < thresholds.min_delta_chi2
        )
        bits = [
            (coverage, SpecPTZwarn.LITTLE_COVERAGE),
            (ambiguous, SpecPTZwarn.LOW_QUALITY),
            (anomaly > thresholds.max_anomaly, SpecPTZwarn.ANOMALOUS),
            (edge, SpecPTZwarn.AT_Z_LIMIT),
            (npixels == 0, SpecPTZwarn.NODATA),
            ((npixels > 0) & ~np.isfinite(z), SpecPTZwarn.BAD_FIT),
        ]
    flags = np.zeros(len(z), dtype=np.int64)
    for condition, bit in bits:
        flags |= np.where(condition, int(bit), 0)
    return flags


def _numpy(value: torch.Tensor | None, n: int) -> np.ndarray:
    return np.full(n, np.nan) if value is None else value.float().cpu().numpy().astype(np.float64)


@torch.inference_mode()
def predict_spectra(
    model: SpecPTForRedshift,
    flux: np.ndarray,
    ivar: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    *,
    autoencoder: SpecPTForSpectrumReconstruction | None = None,
    thresholds: FlagThresholds | None = None,
    return_embedding: bool = False,
    return_reconstruction: bool = False,
    return_pdf: bool = False,
) -> dict[str, np.ndarray]:
    """Run the redshift model (and the autoencoder) on spectra [n, pixels] on the model's grid, in one batch.

    Spectra without a usable pixel are not passed to the models: they get NaN and the NODATA bit.

    Returns numpy arrays [n]: `z`, `zerr`, `quality` (float64, NaN where the head gives none), `npixels` (int64),
    `anomaly` (float64, NaN without autoencoder or ivar), `zwarn` (int64, `SpecPTZwarn`), `z_net`, `zerr_net`
    (the network's own; equal to `z`, `zerr` without refinement); with template refinement (`model.refines`)
    also `chi2`, `deltachi2` (float64), `spectype` (str), `npixels_fit` (int64) and `coeff` [n, vectors];
    optionally `embedding` [n, d] and `reconstruction` [n, pixels] (float32, flux units; needs the autoencoder);
    with `return_pdf`, `pz` [n, bins] (the probability of each p(z) bin, at `pdf_redshifts(model)["pz"]`) and,
    when the model refines, `chi2_scan` [n, trials] (the coarse chi^2(z) samples, NaN where not searched).
    """
    if return_pdf and model.config.head_type != "pz":
        raise ValueError(f"`return_pdf` needs the p(z) head (head_type 'pz'), not {model.config.head_type!r}")
    thresholds = thresholds or FlagThresholds()
    flux = np.asarray(flux, dtype=np.float32)
    n = len(flux)
    good = good_pixels(flux, ivar, mask)  # [n, pixels]
    npixels = good.sum(axis=1).astype(np.int64)
    rows = np.flatnonzero(npixels > 0)
    out = {key: np.full(n, np.nan) for key in ("z", "zerr", "quality", "anomaly", "z_net", "zerr_net")}
    out["npixels"] = npixels
    if model.refines:
        out.update({key: np.full(n, np.nan) for key in ("chi2", "deltachi2")})
        out["spectype"] = np.full(n, "", dtype="U8")
        out["npixels_fit"] = np.zeros(n, dtype=np.int64)
        vectors = max(info["num_vectors"] for info in model.config.templates["spectypes"].values())
        out["coeff"] = np.full((n, vectors), np.nan, dtype=np.float32)
    if return_embedding:
        out["embedding"] = np.full((n, model.config.d_model), np.nan, dtype=np.float32)
    if return_reconstruction:
        if autoencoder is None:
            raise ValueError(
                "`return_reconstruction` needs an autoencoder (the redshift model has no decoder)"
            )
        out["reconstruction"] = np.full(flux.shape, np.nan, dtype=np.float32)
    if return_pdf:
        out.update(
            {key: np.full((n, len(grid)), np.nan, np.float32) for key, grid in pdf_redshifts(model).items()}
        )
    if len(rows):
        _run_models(
            model, autoencoder, flux[rows], None if ivar is None else ivar[rows], good[rows], rows, out
        )
    out["zwarn"] = zwarn_flags(
        model.config,
        out["z"],
        out["quality"],
        npixels,
        out["anomaly"],
        thresholds,
        out.get("deltachi2"),
        out.get("npixels_fit"),
        out.get("spectype"),
    )
    return out


def pdf_redshifts(model: SpecPTForRedshift) -> dict[str, np.ndarray]:
    """The redshifts of the `return_pdf` arrays: `pz` (the p(z) bin centres [bins]) and, when the model refines,
    `chi2_scan` (the coarse chi^2(z) trials [trials]); float64."""
    grids = {"pz": np.expm1(model.redshift_bin_centers().double().numpy())}
    if model.refines:
        grids["chi2_scan"] = model.chi2_scan_redshifts().numpy()
    return grids


def _run_models(
    model: SpecPTForRedshift,
    autoencoder: SpecPTForSpectrumReconstruction | None,
    flux: np.ndarray,
    ivar: np.ndarray | None,
    good: np.ndarray,
    rows: np.ndarray,
    out: dict[str, np.ndarray],
) -> None:
    """Fill `out[...][rows]` from the models run on the usable spectra (flux, ivar, good: [rows, pixels])."""
    device = model.device
    f = torch.from_numpy(np.where(good, flux, 0.0).astype(np.float32)).to(device)  # [rows, pixels]
    iv = None if ivar is None else torch.from_numpy(np.where(good, ivar, 0.0).astype(np.float32)).to(device)
    m = torch.from_numpy(~good).to(device)  # [rows, pixels], True = bad
    result = model(flux=f, ivar=iv, mask=m, return_dict=True)
    out["z"][rows] = _numpy(result.redshift, len(rows))
    out["zerr"][rows] = _numpy(result.redshift_err, len(rows))
    out["quality"][rows] = _numpy(result.quality, len(rows))
    refined = result.redshift_net is not None
    out["z_net"][rows] = _numpy(result.redshift_net if refined else result.redshift, len(rows))
    out["zerr_net"][rows] = _numpy(result.redshift_err_net if refined else result.redshift_err, len(rows))
    if refined:
        out["chi2"][rows] = _numpy(result.chi2, len(rows))
        out["deltachi2"][rows] = _numpy(result.delta_chi2, len(rows))
        out["npixels_fit"][rows] = result.npixels_fit.cpu().numpy()
        out["spectype"][rows] = np.asarray(list(model.config.templates["spectypes"]))[
            result.spectype.cpu().numpy()
        ]
        out["coeff"][rows] = result.coeff.float().cpu().numpy()
    if "embedding" in out:
        out["embedding"][rows] = result.embedding.float().cpu().numpy()
    if "pz" in out:
        out["pz"][rows] = model.redshift_pdf(result.logits)[1].cpu().numpy()
    if "chi2_scan" in out:
        scan = result.chi2_scan.float()  # [rows, trials], inf where not searched
        out["chi2_scan"][rows] = torch.where(torch.isfinite(scan), scan, math.nan).cpu().numpy()
    if autoencoder is None:
        return
    rec = autoencoder(
        flux=f.to(autoencoder.device),
        ivar=None if iv is None else iv.to(autoencoder.device),
        mask=m.to(autoencoder.device),
        return_dict=True,
    )
    model_flux = (rec.reconstruction.float() * rec.scale[:, None]).to(device)  # [rows, pixels], flux units
    if iv is not None:
        chi2 = (iv * (f - model_flux) ** 2).sum(dim=1) / (~m).sum(dim=1)  # [rows]
        out["anomaly"][rows] = chi2.cpu().numpy()
    if "reconstruction" in out:
        out["reconstruction"][rows] = model_flux.cpu().numpy()


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


def _read_desi_file(path: str, config: SpecPTConfig) -> dict[str, Any]:
    if read_desi_spectra is None:
        raise ValueError(
            f"{path}: reading DESI files needs the `specpt_hf` package (pip install specpt-hf); without it pass "
            "(wave, flux, ivar) arrays or a specutils Spectrum"
        )
    records = list(read_mmu_spectra(path) if is_mmu_file(path) else read_desi_spectra(path))
    if not records:
        raise ValueError(f"{path}: no usable spectra (no good target fiber with a usable pixel)")
    stack = {key: np.stack([r[key] for r in records]) for key in ("flux", "ivar", "mask")}
    flux, ivar, mask = to_model_grid(
        config, stack["flux"], stack["ivar"], stack["mask"], desi_brz_wavelength()
    )
    meta = [{key: r[key] for key in ("targetid", "survey", "program", "healpix")} for r in records]
    return {"flux": flux, "ivar": ivar, "mask": mask, "meta": meta, "single": False, "source": path}


def prepare_input(inputs: Any, config: SpecPTConfig) -> dict[str, Any]:
    """One pipeline input -> spectra on the model's grid: `flux`, `ivar`, `mask` [n, pixels], `meta` (one dict per
    spectrum), `single` (a 1-D input) and `source` (for messages)."""
    if isinstance(inputs, (str, os.PathLike)):
        if os.path.isdir(inputs):
            raise ValueError(f"{os.fspath(inputs)}: a directory; pass its coadd-*.fits files one by one")
        return _read_desi_file(os.fspath(inputs), config)
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

    def preprocess(self, inputs: Any) -> dict[str, Any]:
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


def load_pipeline(
    model: Any = "specpt-desi", autoencoder: Any = None, device: Any = None, **kwargs: Any
) -> SpecPTRedshiftPipeline:
    """A `spectrum-redshift` pipeline from a model object, folder, Hub repo id or short name (`SHORT_NAMES`),
    optionally with an autoencoder (same kinds of reference). `kwargs` are pipeline parameters (`batch_size`,
    thresholds, `return_embedding`, ...); `device` as in transformers (-1 or "cpu" for the CPU)."""
    if not isinstance(model, PreTrainedModel):
        model = load_model(model, task="redshift")
    return SpecPTRedshiftPipeline(model=model, autoencoder=autoencoder, task=TASK, device=device, **kwargs)


__all__ = [
    "SHORT_NAMES",
    "FlagThresholds",
    "SpecPTRedshiftPipeline",
    "SpecPTZwarn",
    "load_model",
    "load_pipeline",
    "predict_spectra",
    "prepare_input",
    "resample_spectra",
    "resolve_model_name",
    "to_model_grid",
    "zwarn_flags",
]
