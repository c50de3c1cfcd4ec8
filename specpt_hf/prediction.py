"""Prediction: spectra on the model's grid in, redshifts, flags and catalog columns out.

One batched loop serves `specpt predict`, the `spectrum-redshift` pipeline, evaluation and fine-tuning:

>>> from specpt_hf.data import read_desi_spectra
>>> from specpt_hf.prediction import predict_records
>>> columns = predict_records(model, read_desi_spectra("coadd-sv3-dark-26065.fits"))
>>> columns["z_pred"], columns["zerr_pred"], columns["quality"], columns["zwarn"]

- `to_model_grid`: arrays on any grid -> flux, ivar, mask on the model's grid (resampled where needed);
- `predict_spectra`: one batch [n, pixels] -> numpy columns [n] (`z`, `zerr`, `zwarn`, ...), NaN and the NODATA
  bit for spectra without a usable pixel;
- `predict_batch`, `predict_batches`, `predict_records`, `predict_dataset`: batches, spectrum records or dataset
  rows -> catalog columns
  (`z_pred`, `zerr_pred`, ...), spectra without a usable pixel left out, counted in `InferenceStats` and logged;
- `SpecPTZwarn`, `FlagThresholds`, `zwarn_flags`: the ZWARN-like bit mask.

Shipped with the pipeline as remote code: it imports only numpy, torch and the files next to it.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from itertools import islice
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .configuration_specpt import SpecPTConfig, SpecPTForRedshiftConfig
from .emission_lines import desi_elg_secure, oii_flux
from .modeling_specpt import SpecPTForRedshift, SpecPTForSpectrumReconstruction
from .resampling import good_pixels, resample

logger = logging.getLogger(__name__)


class SpecPTZwarn(enum.IntFlag):
    """Bits of the `zwarn` / `ZWARN` flag of SpecPT predictions (0 = no warning; never inverted).

    Bit positions follow Redrock's ZWARN where the meaning corresponds, so `ZWARN == 0` cuts read the same:

    - bit 1 `LITTLE_COVERAGE` (Redrock: same): fewer than `min_coverage` of the model's pixels are good, or (with
      refinement) fewer than `min_coverage` of the good pixels lie inside the winning templates' rest range.
    - bit 2 `LOW_QUALITY` (Redrock: SMALL_DELTA_CHI2): `quality` (p(z) mass near the peak) below `min_quality`;
      with template refinement, as in Redrock, DELTACHI2 below `min_delta_chi2` (alias `SMALL_DELTA_CHI2`), or
      a fit that beats a smooth continuum with no redshift (CHI2_SMOOTH) by less than `min_feature_chi2` (not for
      a STAR, whose fit searches no redshift range: a star's continuum is often fitted better by the smooth series
      than by a few STAR vectors), or a GALAXY fit with DELTACHI2 below `oii_delta_chi2` that fails DESI's ELG
      criterion on its [O II] doublet at the fitted redshift (`emission_lines.desi_elg_secure`; where the doublet
      is on the grid), or a fit whose DELTACHI2 and CHI2_SMOOTH - CHI2 are both below `weak_fit_chi2` (neither
      another redshift nor a featureless continuum fits much worse; not for a STAR).
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
        min_feature_chi2 (`float`, defaults to 0.0): with refinement, `SMALL_DELTA_CHI2` where CHI2_SMOOTH - CHI2
            is below this: at 0, a template fit no better than a smooth redshift-free continuum (a fit to noise,
            or to a continuum without features) is flagged. `-inf` turns it off.
        oii_delta_chi2 (`float`, defaults to 0.0): with refinement, a GALAXY fit whose DELTACHI2 is below this
            must also pass DESI's ELG [O II] criterion, log10(FOII_SNR) > 0.9 - 0.2 log10(DELTACHI2), or gets
            `SMALL_DELTA_CHI2`. 0 turns it off.
        weak_fit_chi2 (`float`, defaults to 16.0): with refinement, `SMALL_DELTA_CHI2` where DELTACHI2 and
            CHI2_SMOOTH - CHI2 are both below this: a fit that beats neither the next redshift nor a smooth
            continuum by this much rests on a feature too weak to place (not for a STAR). 0 turns it off. Chosen
            on two tuning sets (`benchmarks/zwarn_thresholds.py`, seeds 202 and 303, 6,000 mock ELGs): the most
            ELGs kept at ZWARN = 0 with their η at most 0.6 %, before the line aliases joined the refinement (16:
            75.7 % kept, η 0.55 %; off: 76.5 %, 0.94 %; with the aliases 16 keeps 75.7 % at 0.46 %).
    """

    min_quality: float = 0.5
    min_coverage: float = 0.5
    max_anomaly: float = 5.0
    min_delta_chi2: float = 9.0
    min_feature_chi2: float = 0.0
    oii_delta_chi2: float = 0.0
    weak_fit_chi2: float = 16.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_quality <= 1.0 or not 0.0 <= self.min_coverage <= 1.0:
            raise ValueError(
                f"`min_quality` and `min_coverage` must be in [0, 1], got {self.min_quality}, {self.min_coverage}"
            )
        if not self.max_anomaly > 0:
            raise ValueError(f"`max_anomaly` must be > 0, got {self.max_anomaly}")
        if not self.min_delta_chi2 >= 0:
            raise ValueError(f"`min_delta_chi2` must be >= 0, got {self.min_delta_chi2}")
        for name in ("oii_delta_chi2", "weak_fit_chi2"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}")
        if math.isnan(self.min_feature_chi2) or self.min_feature_chi2 == math.inf:
            raise ValueError(f"`min_feature_chi2` must be a number or -inf, got {self.min_feature_chi2}")

    def as_dict(self) -> dict[str, float]:
        return {field.name: getattr(self, field.name) for field in fields(self)}


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
            # flux-conserving, inverse variance propagated, model pixels not covered by the input masked
            out_flux, out_ivar, out_mask = resample(wave, flux, ivar, model_wavelength(config), mask=mask)
            return (
                out_flux.astype(np.float32),
                None if ivar is None else out_ivar.astype(np.float32),
                out_mask,
            )
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
    feature_chi2: np.ndarray | None = None,
    oii: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """`SpecPTZwarn` bit mask [n] (int64) from the predictions and the thresholds (NaN never sets a bit);
    `delta_chi2`, `npixels_fit`, `spectype`, `feature_chi2` (CHI2_SMOOTH - CHI2) and `oii` (the [O II] doublet's
    flux and its ivar at the fitted redshift) come from template refinement (None: network-only). A STAR sits
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
        if feature_chi2 is not None:  # not for a STAR: its fit searches no redshift range for a feature
            featureless = feature_chi2 < thresholds.min_feature_chi2
            if delta_chi2 is not None:
                weak = thresholds.weak_fit_chi2
                featureless |= (feature_chi2 < weak) & (delta_chi2 < weak)
            ambiguous |= featureless if spectype is None else featureless & (spectype != "STAR")
        if oii is not None and spectype is not None:  # a faint galaxy's redshift rests on its [O II] doublet
            measured = np.isfinite(oii[0])
            weak = (spectype == "GALAXY") & measured & (delta_chi2 < thresholds.oii_delta_chi2)
            ambiguous |= weak & ~desi_elg_secure(*oii, delta_chi2)
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
    also `chi2`, `deltachi2`, `chi2_smooth`, `oii_flux`, `oii_flux_ivar` (float64; the [O II] doublet at `z`, NaN
    without ivar), `spectype` (str), `npixels_fit` (int64) and `coeff` [n, vectors];
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
        out.update(
            {
                key: np.full(n, np.nan)
                for key in ("chi2", "deltachi2", "chi2_smooth", "oii_flux", "oii_flux_ivar")
            }
        )
        out["spectype"] = np.full(n, "", dtype="U8")
        out["npixels_fit"] = np.zeros(n, dtype=np.int64)
        vectors = max(info["num_vectors"] for info in model.config.templates["spectypes"].values())
        out["coeff"] = np.full((n, vectors), np.nan, dtype=np.float32)
    if model.spectype_head is not None:
        out["spectype_net"] = np.full(n, "", dtype="U8")
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
        if model.refines and ivar is not None:
            out["oii_flux"][rows], out["oii_flux_ivar"][rows] = oii_flux(
                model_wavelength(model.config),
                flux[rows],
                ivar[rows],
                good[rows],
                out["z"][rows],
                sigma_instrument=model.config.wavelength_step,  # DESI's line-spread sigma is ~1 pixel
            )
    out["zwarn"] = zwarn_of_columns(model.config, out, thresholds)
    return out


def zwarn_of_columns(
    config: SpecPTForRedshiftConfig, columns: dict[str, np.ndarray], thresholds: FlagThresholds
) -> np.ndarray:
    """`zwarn_flags` of `predict_spectra`'s columns [n] (with or without the refinement's)."""
    refined = "deltachi2" in columns
    return zwarn_flags(
        config,
        columns["z"],
        columns["quality"],
        columns["npixels"],
        columns["anomaly"],
        thresholds,
        columns.get("deltachi2"),
        columns.get("npixels_fit"),
        columns.get("spectype"),
        columns["chi2_smooth"] - columns["chi2"] if refined else None,
        (columns["oii_flux"], columns["oii_flux_ivar"]) if refined else None,
    )


def pz_bin_edges(model: SpecPTForRedshift) -> np.ndarray:
    """The edges of the p(z) bins in u = ln(1 + z), float64 [bins + 1]."""
    config = model.config
    return math.log1p(config.z_min) + config.redshift_bin_width * np.arange(config.num_redshift_bins + 1)


def pdf_integral_transform(probability: np.ndarray, edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """PIT [n]: the probability each p(z) puts below its true value, for `probability` [n, bins] (each row the mass
    of the bins, spread evenly within a bin) over bins with `edges` [bins + 1] (increasing, e.g. `pz_bin_edges`)
    and finite `values` [n] in the same units; 0 below the first edge, 1 above the last. Calibrated p(z)s give
    PITs uniform on [0, 1] (`specpt_hf.evaluation.metrics.pdf_coverage` reads them)."""
    probability = np.asarray(probability, dtype=np.float64)
    edges, values = np.asarray(edges, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if probability.ndim != 2 or probability.shape[1] != len(edges) - 1:
        raise ValueError(
            f"probability must be [n, {len(edges) - 1}] for {len(edges)} edges, got {probability.shape}"
        )
    if values.shape != (len(probability),) or not np.isfinite(values).all():
        raise ValueError(f"values must be {len(probability)} finite numbers, got shape {values.shape}")
    if np.any(np.diff(edges) <= 0):
        raise ValueError("edges must increase")
    total = probability.sum(1, keepdims=True)  # [n, 1]
    cdf = np.concatenate([np.zeros_like(total), np.cumsum(probability, 1)], 1) / np.where(
        total > 0, total, 1.0
    )
    bin_index = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)  # [n]
    within = np.clip((values - edges[bin_index]) / np.diff(edges)[bin_index], 0.0, 1.0)  # [n]
    rows = np.arange(len(values))
    return cdf[rows, bin_index] + within * (cdf[rows, bin_index + 1] - cdf[rows, bin_index])


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
        out["chi2_smooth"][rows] = _numpy(result.chi2_smooth, len(rows))
        out["npixels_fit"][rows] = result.npixels_fit.cpu().numpy()
        out["spectype"][rows] = np.asarray(list(model.config.templates["spectypes"]))[
            result.spectype.cpu().numpy()
        ]
        out["coeff"][rows] = result.coeff.float().cpu().numpy()
    if "spectype_net" in out:
        labels = np.asarray(model.config.spectype_labels)
        out["spectype_net"][rows] = labels[result.spectype_logits.argmax(1).cpu().numpy()]
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
# Batches and records -> catalog columns
# ----------------------------------------------------------------------------------------------------------------

# record fields carried from the input to each prediction row when present
PASSTHROUGH_FIELDS = ("targetid", "z", "target_class", "spectype", "survey", "program", "healpix")
# prediction columns: name in the output <- name in `predict_spectra`
PREDICTION_COLUMNS = {
    "z_pred": "z",
    "zerr_pred": "zerr",
    "quality": "quality",
    "zwarn": "zwarn",
    "npixels": "npixels",
    "z_net": "z_net",
    "zerr_net": "zerr_net",
}
# with template refinement also
REFINEMENT_COLUMNS = (
    "chi2",
    "deltachi2",
    "chi2_smooth",
    "spectype",
    "coeff",
    "npixels_fit",
    "oii_flux",
    "oii_flux_ivar",
)
TYPE_COLUMNS = ("spectype_net",)  # with a spectral-type head
PDF_COLUMNS = ("pz", "chi2_scan")  # [n, bins] and [n, trials], with `return_pdf`


@dataclass
class InferenceStats:
    """Counts kept while predicting; the functions below add to the object they are given."""

    spectra: int = 0  # predicted
    skipped: int = 0  # left out: no usable pixel
    batches: int = 0


def batched(records: Iterable[Mapping[str, Any]], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Group spectrum records into batches: a dict of arrays, one leading row per record."""
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    iterator = iter(records)
    while chunk := list(islice(iterator, batch_size)):
        keys = [key for key in chunk[0] if key in {"flux", "ivar", "mask", *PASSTHROUGH_FIELDS}]
        yield {key: np.stack([np.asarray(record[key]) for record in chunk]) for key in keys}


def predict_batch(
    model: SpecPTForRedshift,
    batch: Mapping[str, Any],
    *,
    autoencoder: SpecPTForSpectrumReconstruction | None = None,
    thresholds: FlagThresholds | None = None,
    stats: InferenceStats | None = None,
    return_pdf: bool = False,
    pit: bool = False,
) -> dict[str, np.ndarray]:
    """Run `model` on one batch (`flux`, optional `ivar` and `mask`, [batch, pixels] on the model's grid).

    Returns numpy columns for the spectra with a usable pixel: `z_pred`, `zerr_pred`, `quality` (NaN where the head
    gives none), `zwarn` (`SpecPTZwarn` bits), `npixels`, `z_net`, `zerr_net`, the `REFINEMENT_COLUMNS` when the
    model refines, `anomaly` (with an autoencoder), `pz` and `chi2_scan` (with `return_pdf`, see `predict_spectra`),
    `pz_pit` (with `pit`, a `z` label in `batch` and the p(z) head: the p(z) mass below the label, see
    `pdf_integral_transform`; NaN where the label is missing) and the passthrough fields present in `batch`.
    """
    ivar = batch.get("ivar")
    mask = batch.get("mask")
    pit = pit and "z" in batch and model.config.head_type == "pz"
    result = predict_spectra(
        model,
        np.asarray(batch["flux"]),
        None if ivar is None else np.asarray(ivar),
        None if mask is None else np.asarray(mask, dtype=bool),
        autoencoder=autoencoder,
        thresholds=thresholds,
        return_pdf=return_pdf or pit,
    )
    keep = result["npixels"] > 0
    columns = {name: result[key][keep] for name, key in PREDICTION_COLUMNS.items()}
    extra = (*REFINEMENT_COLUMNS, *TYPE_COLUMNS, *(PDF_COLUMNS if return_pdf else ()))
    columns.update({key: result[key][keep] for key in extra if key in result})
    if pit:
        label = np.log1p(np.asarray(batch["z"], dtype=np.float64)[keep])  # [n]; NaN where unlabelled
        known = np.isfinite(label)
        columns["pz_pit"] = np.full(len(label), np.nan)
        columns["pz_pit"][known] = pdf_integral_transform(
            result["pz"][keep][known], pz_bin_edges(model), label[known]
        )
    if autoencoder is not None:
        columns["anomaly"] = result["anomaly"][keep]
    columns.update({key: np.asarray(batch[key])[keep] for key in PASSTHROUGH_FIELDS if key in batch})
    if stats is not None:
        stats.spectra += int(keep.sum())
        stats.skipped += int((~keep).sum())
        stats.batches += 1
    return columns


def predict_batches(
    model: SpecPTForRedshift,
    batches: Iterable[Mapping[str, Any]],
    *,
    autoencoder: SpecPTForSpectrumReconstruction | None = None,
    thresholds: FlagThresholds | None = None,
    stats: InferenceStats | None = None,
    pit: bool = False,
) -> dict[str, np.ndarray]:
    """Predict every batch and concatenate the columns (`pit`: see `predict_batch`); spectra without usable pixels
    are skipped and logged.

    Raises:
        ValueError: when no spectrum at all could be predicted.
    """
    model.eval()
    if autoencoder is not None:
        autoencoder.eval()
    stats = stats if stats is not None else InferenceStats()
    skipped_before = stats.skipped
    parts = [
        predict_batch(model, batch, autoencoder=autoencoder, thresholds=thresholds, stats=stats, pit=pit)
        for batch in batches
    ]
    skipped = stats.skipped - skipped_before
    if skipped:
        logger.warning("skipped %d spectra without any usable pixel (all masked or ivar 0)", skipped)
    parts = [part for part in parts if len(part["z_pred"])]
    if not parts:
        raise ValueError(f"no spectra to predict ({skipped} without any usable pixel)")
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def predict_records(
    model: SpecPTForRedshift,
    records: Iterable[Mapping[str, Any]],
    batch_size: int = 64,
    **kwargs: Any,
) -> dict[str, np.ndarray]:
    """Predict spectrum records (e.g. from `read_desi_spectra`), `batch_size` at a time; `kwargs` as for
    `predict_batches` (`autoencoder`, `thresholds`, `stats`)."""
    return predict_batches(model, batched(records, batch_size), **kwargs)


def predict_dataset(
    model: SpecPTForRedshift,
    dataset: Any,
    batch_size: int = 64,
    *,
    desc: str = "predicting",
    progress: bool = True,
    **kwargs: Any,
) -> dict[str, np.ndarray]:
    """Predict every row of a dataset whose slices are dicts of stacked rows (a `ParquetSplit`, a numpy- or
    torch-formatted `datasets.Dataset`), `batch_size` rows at a time, with a progress bar; `kwargs` as for
    `predict_batches`."""
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    starts = tqdm(range(0, len(dataset), batch_size), desc=desc, unit="batch", disable=not progress)
    return predict_batches(model, (dataset[start : start + batch_size] for start in starts), **kwargs)
