"""Flux-conserving resampling of spectra onto another wavelength grid, and `specutils.Spectrum` -> arrays.

Every wavelength is in vacuum Angstrom, every flux density in 1e-17 erg/s/cm2/A (DESI's unit), and every mask
follows the project convention: True = bad pixel.

This module imports only numpy (and astropy for `specutils` objects): it ships as remote code next to
`pipeline_specpt.py`, which imports it relatively, so it must not import `specpt_hf`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FLUX_UNIT = "1e-17 erg / (s cm2 Angstrom)"


def bin_edges(centres: np.ndarray) -> np.ndarray:
    """Pixel edges [n+1] from increasing pixel centres [n] (midpoints; half a pixel beyond the ends)."""
    centres = np.asarray(centres, dtype=float)
    if centres.ndim != 1 or len(centres) < 2 or np.any(np.diff(centres) <= 0):
        raise ValueError("wavelengths must be a 1-D, strictly increasing array of at least 2 pixels")
    mid = 0.5 * (centres[1:] + centres[:-1])
    return np.concatenate([[2 * centres[0] - mid[0]], mid, [2 * centres[-1] - mid[-1]]])


def good_pixels(flux: np.ndarray, ivar: np.ndarray | None, mask: np.ndarray | None) -> np.ndarray:
    """True where a pixel is usable: finite flux, not masked, and (with ivar) finite ivar > 0."""
    good = np.isfinite(flux)
    if mask is not None:
        good &= ~np.asarray(mask).astype(bool)
    if ivar is not None:
        good &= np.isfinite(ivar) & (ivar > 0)
    return good


def spectrum_arrays(spectrum: Any) -> dict[str, np.ndarray | None]:
    """wave (Angstrom, increasing), flux (1e-17 erg/s/cm2/A), ivar and mask from a `specutils.Spectrum`.

    The flux may be in any spectral flux density (f_lambda or f_nu) or dimensionless (used as is); the uncertainty
    of any astropy kind (converted through its standard deviation, a flux-like quantity); the mask True = bad as
    in NDData. A decreasing spectral axis (e.g. frequency) is reversed.
    """
    import astropy.units as u
    from astropy.nddata import StdDevUncertainty

    wave = spectrum.spectral_axis.to(u.AA, equivalencies=u.spectral())
    density = u.spectral_density(wave)
    if spectrum.flux.unit.physical_type == "dimensionless":
        flux, unit = spectrum.flux.value, None
    else:
        unit = u.Unit(FLUX_UNIT)
        try:
            flux = spectrum.flux.to_value(unit, equivalencies=density)
        except u.UnitConversionError as error:
            raise ValueError(
                f"Spectrum flux unit {spectrum.flux.unit} is not a spectral flux density"
            ) from error
    ivar = None
    if spectrum.uncertainty is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            std = spectrum.uncertainty.represent_as(StdDevUncertainty)
            sigma = std.quantity if std.unit is not None else std.array * spectrum.flux.unit
            sigma = sigma.value if unit is None else sigma.to_value(unit, equivalencies=density)
            sigma = np.asarray(sigma, dtype=np.float64)
            ivar = np.where(np.isfinite(sigma) & (sigma > 0), 1.0 / sigma**2, 0.0)
    mask = None if spectrum.mask is None else np.asarray(spectrum.mask, dtype=bool)
    arrays = {
        "wave": np.asarray(wave.value, dtype=np.float64),
        "flux": np.asarray(flux, dtype=np.float64),
        "ivar": ivar,
        "mask": mask,
    }
    if len(arrays["wave"]) > 1 and arrays["wave"][1] < arrays["wave"][0]:  # e.g. a frequency axis
        arrays = {k: None if v is None else np.ascontiguousarray(v[..., ::-1]) for k, v in arrays.items()}
    return arrays


def resample(
    wave: Any,
    flux: np.ndarray | None = None,
    ivar: np.ndarray | None = None,
    new_wave: Any = None,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flux-conserving resampling onto `new_wave` (pixel centres, Angstrom) with inverse variance propagated.

    Each output pixel is the overlap-weighted mean of the good input pixels it overlaps (bin-edge
    integration, so the integral of f dlambda is conserved); its variance is that of a weighted sum,
    sum(w_j^2 sigma_j^2) / (sum w_j)^2. Bad input pixels (mask True, ivar <= 0, non-finite) get weight 0.
    Output pixels not entirely inside the input's coverage, or with no good input, are masked.

    `specutils.manipulation.FluxConservingResampler` does the same bin-edge integration, but loops in
    Python over output pixels one spectrum at a time, and lets one zero-ivar input pixel give infinite
    variance to every output pixel it touches (no per-pixel weights for bad input), which would wipe out
    whole coarse grism pixels; this version is vectorised over spectra and pixels and drops bad input.

    Args:
        wave: input pixel centres [n_in] (Angstrom), or a `specutils.Spectrum` (then leave flux/ivar/mask out).
        flux: [..., n_in] flux density (1e-17 erg/s/cm2/A).
        ivar: [..., n_in] inverse variance (None: all pixels weight-1 good, output ivar is 0).
        new_wave: output pixel centres [n_out] (Angstrom), or an object with a `wave` array (an `Instrument`).
        mask: [..., n_in] bool or int, nonzero = bad.

    Returns:
        flux [..., n_out] float64, ivar [..., n_out] float64 (0 where masked), mask [..., n_out] bool.
    """
    if new_wave is None:
        raise ValueError("resample: new_wave is required")
    if not isinstance(wave, np.ndarray) and hasattr(wave, "spectral_axis"):
        if flux is not None or ivar is not None or mask is not None:
            raise ValueError("resample: pass either a specutils Spectrum or wave/flux/ivar arrays, not both")
        arrays = spectrum_arrays(wave)
        wave, flux, ivar, mask = (arrays[key] for key in ("wave", "flux", "ivar", "mask"))
    new_wave = getattr(new_wave, "wave", new_wave)
    if flux is None:
        raise ValueError("resample: flux is required")
    in_edges, out_edges = bin_edges(wave), bin_edges(new_wave)
    flux = np.asarray(flux, dtype=float)
    if flux.shape[-1] != len(in_edges) - 1:
        raise ValueError(f"resample: flux has {flux.shape[-1]} pixels but wave has {len(in_edges) - 1}")
    has_ivar = ivar is not None
    ivar = np.ones_like(flux) if ivar is None else np.broadcast_to(np.asarray(ivar, dtype=float), flux.shape)
    good = good_pixels(flux, ivar, mask)  # [..., n_in]

    weights, index = _overlap_matrix(in_edges, out_edges)  # [n_out, k] each
    w = weights * good[..., index]  # [..., n_out, k]
    f = np.where(good, flux, 0.0)[..., index]  # [..., n_out, k]
    var = np.where(good, 1.0 / np.where(good, ivar, 1.0), 0.0)[..., index]  # [..., n_out, k]
    wsum = w.sum(axis=-1)  # [..., n_out]
    ok = wsum > 0
    safe = np.where(ok, wsum, 1.0)
    out_flux = np.where(ok, (w * f).sum(axis=-1) / safe, 0.0)
    out_var = (w**2 * var).sum(axis=-1) / safe**2
    inside = (out_edges[:-1] >= in_edges[0] - 1e-9) & (out_edges[1:] <= in_edges[-1] + 1e-9)  # [n_out]
    out_mask = ~(ok & inside)
    if has_ivar:
        out_ivar = np.where(~out_mask & (out_var > 0), 1.0 / np.where(out_var > 0, out_var, 1.0), 0.0)
    else:
        out_ivar = np.zeros_like(out_flux)
    out_flux = np.where(out_mask, 0.0, out_flux)
    return out_flux, out_ivar, out_mask


def _overlap_matrix(in_edges: np.ndarray, out_edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Overlap lengths (Angstrom) of each output pixel with the input pixels it touches, as a dense band:
    weights [n_out, k] and input indices [n_out, k] (k = the most input pixels one output pixel touches)."""
    n_in = len(in_edges) - 1
    first = np.clip(np.searchsorted(in_edges, out_edges[:-1], side="right") - 1, 0, n_in - 1)  # [n_out]
    last = np.clip(np.searchsorted(in_edges, out_edges[1:], side="left") - 1, 0, n_in - 1)  # [n_out]
    k = int(max(1, (last - first).max() + 1))
    index = np.minimum(first[:, None] + np.arange(k)[None, :], n_in - 1)  # [n_out, k]
    lo = np.maximum(in_edges[index], out_edges[:-1, None])
    hi = np.minimum(in_edges[index + 1], out_edges[1:, None])
    weights = np.clip(hi - lo, 0.0, None)
    weights[first[:, None] + np.arange(k)[None, :] > last[:, None]] = 0.0  # beyond the last overlapping pixel
    return weights, index


__all__ = ["FLUX_UNIT", "bin_edges", "good_pixels", "resample", "spectrum_arrays"]
