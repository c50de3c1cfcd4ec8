"""Spectrograph descriptions (wavelength grid, line-spread function) and flux-conserving resampling.

Every wavelength here is in vacuum Ångström, every flux density in 1e-17 erg/s/cm²/Å (DESI's unit),
and every mask follows the project convention: True = bad pixel.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))  # 2.3548
FLUX_UNIT = "1e-17 erg / (s cm2 Angstrom)"


@dataclass(frozen=True, eq=False)
class Arm:
    """One camera (or the only one) of a spectrograph: a linear wavelength grid and its line spread.

    Args:
        name (`str`): camera name (`b`, `r`, `z` for DESI).
        start, stop, step (`float`): first and last pixel centre and pixel width, vacuum Å.
        fwhm_knots (`tuple[tuple[float, float], ...]`): (wavelength Å, LSF FWHM Å) pairs, linearly
            interpolated (constant outside).
    """

    name: str
    start: float
    stop: float
    step: float
    fwhm_knots: tuple[tuple[float, float], ...]

    @cached_property
    def wave(self) -> np.ndarray:
        """Pixel centres, float64 [n_pixels]."""
        n = int(round((self.stop - self.start) / self.step)) + 1
        return self.start + self.step * np.arange(n)

    @property
    def n_pixels(self) -> int:
        return len(self.wave)

    def lsf_fwhm(self, wave: np.ndarray | float) -> np.ndarray:
        """Line-spread FWHM in Å at `wave`."""
        knots = np.asarray(self.fwhm_knots, dtype=float)
        return np.interp(wave, knots[:, 0], knots[:, 1])

    def lsf_sigma(self, wave: np.ndarray | float) -> np.ndarray:
        """Gaussian LSF sigma in Å at `wave`."""
        return self.lsf_fwhm(wave) / FWHM_PER_SIGMA

    def resolving_power(self, wave: np.ndarray | float) -> np.ndarray:
        """R = λ / FWHM."""
        return np.asarray(wave, dtype=float) / self.lsf_fwhm(wave)

    def resolution_data(self, ndiag: int | None = None) -> np.ndarray:
        """Band-diagonal resolution matrix in DESI's storage layout, float32 [ndiag, n_pixels].

        DESI stores a `scipy.sparse.dia_matrix` with offsets `ndiag//2 ... -(ndiag//2)`:
        `data[k, j] = R[j - offset_k, j]`, so column j (the spread of input pixel j) sums to 1.
        Each column is the Gaussian LSF sampled on the pixel lattice, its variance widened by the
        pixel boxcar (step²/12).
        """
        sigma_pix = np.hypot(self.lsf_sigma(self.wave) / self.step, np.sqrt(1.0 / 12.0))  # [n_pixels]
        if ndiag is None:
            ndiag = max(11, 2 * int(np.ceil(5.0 * sigma_pix.max())) + 1)
        half = ndiag // 2
        offsets = np.arange(half, -half - 1, -1)  # [ndiag]
        # row - column = -offset: the displacement of the output pixel from the input pixel
        kernel = np.exp(-0.5 * (offsets[:, None] / sigma_pix[None, :]) ** 2)  # [ndiag, n_pixels]
        return (kernel / kernel.sum(axis=0, keepdims=True)).astype(np.float32)


@dataclass(frozen=True, eq=False)
class Instrument:
    """A spectrograph: its arms (cameras), whether it observes through the atmosphere, and a note.

    Args:
        name (`str`): short name (`DESI`, `DEIMOS`, `HST_G102`, `HST_G141`).
        arms (`tuple[Arm, ...]`): the cameras, blue to red.
        ground_based (`bool`, *optional*, defaults to `True`): airglow sky lines enter the noise.
        reference (`str`, *optional*): where the numbers come from.
    """

    name: str
    arms: tuple[Arm, ...]
    ground_based: bool = True
    reference: str = ""

    @cached_property
    def wave(self) -> np.ndarray:
        """The merged grid, float64 [n_pixels]: one lattice when the arms share it (DESI brz),
        else the sorted union of the arms' pixel centres."""
        steps = {arm.step for arm in self.arms}
        if len(self.arms) == 1:
            return self.arms[0].wave
        step = steps.pop() if len(steps) == 1 else None
        start = min(arm.start for arm in self.arms)
        aligned = step is not None and all(
            abs((arm.start - start) / step - round((arm.start - start) / step)) < 1e-6 for arm in self.arms
        )
        if aligned:
            stop = max(arm.stop for arm in self.arms)
            return start + step * np.arange(int(round((stop - start) / step)) + 1)
        return np.unique(np.concatenate([arm.wave for arm in self.arms]))

    @property
    def n_pixels(self) -> int:
        return len(self.wave)

    @property
    def coverage(self) -> tuple[float, float]:
        """First and last pixel centre, Å."""
        return float(self.wave[0]), float(self.wave[-1])

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise ValueError(f"{self.name} has no arm {name!r}; arms are {[a.name for a in self.arms]}")

    def lsf_fwhm(self, wave: np.ndarray | float) -> np.ndarray:
        """LSF FWHM (Å) of the arm covering `wave` (the bluer arm in an overlap)."""
        wave = np.asarray(wave, dtype=float)
        out = self.arms[-1].lsf_fwhm(wave)
        for arm in reversed(self.arms[:-1]):
            out = np.where(wave <= arm.stop, arm.lsf_fwhm(wave), out)
        return out

    def resolving_power(self, wave: np.ndarray | float) -> np.ndarray:
        return np.asarray(wave, dtype=float) / self.lsf_fwhm(wave)


# DESI: three arms on one 0.8 Å lattice (desidatamodel; DESI Collaboration 2022, AJ 164, 207, "Overview of
# the Instrumentation for DESI"). The published design resolving power is R = 2000-3200 (b), 3200-4100 (r),
# 4100-5100 (z) (DESI Collaboration 2016b, arXiv:1611.00037, Table 1.1). The extracted resolution matrices
# of real Fuji coadds are sharper: their second moments (pixel boxcar removed) give an LSF sigma of
# ~0.63 Å (b), ~0.59 Å (r), 0.69-0.76 Å (z), i.e. R ≈ 2450-3900, 4150-5500, 4650-5600 (measured on the
# specutils copies of coadd-sv3-dark-26065.fits). The mock must match what the files carry, so the knots
# below are those measurements; tests/test_instrument.py checks them against the real matrices.
DESI = Instrument(
    name="DESI",
    arms=(
        Arm("b", 3600.0, 5800.0, 0.8, ((3600.0, 1.47), (4500.0, 1.50), (5800.0, 1.49))),
        Arm("r", 5760.0, 7620.0, 0.8, ((5760.0, 1.39), (6800.0, 1.40), (7620.0, 1.38))),
        Arm("z", 7520.0, 9824.0, 0.8, ((7520.0, 1.62), (8900.0, 1.63), (9400.0, 1.67), (9824.0, 1.78))),
    ),
    reference="DESI Collaboration 2022 AJ 164 207; 2016b arXiv:1611.00037; LSF measured on Fuji coadds",
)

# Keck/DEIMOS (Faber et al. 2003, SPIE 4841, 1657): the 1200G grating gives 0.33 Å/pixel and R ≈ 5000-6000
# with a 0.75-1" slit (DEEP2: Newman et al. 2013, ApJS 208, 5, FWHM ≈ 1.4 Å at 7800 Å); the 600ZD grating
# spans ≈ 5000 Å. "DEIMOS-like" here is the 600ZD-like span 4500-9500 Å at the 1200G pixel scale and a
# constant R = 5000.
DEIMOS = Instrument(
    name="DEIMOS",
    arms=(Arm("deimos", 4500.0, 9500.0, 0.33, ((4500.0, 4500.0 / 5000.0), (9500.0, 9500.0 / 5000.0))),),
    reference="Faber et al. 2003 SPIE 4841 1657; Newman et al. 2013 ApJS 208 5",
)

# HST/WFC3 IR grisms (WFC3 Instrument Handbook, Dressel et al., Table 8.1 / Sect. 8.2): G102 covers
# 800-1150 nm at 24.5 Å/pixel with R = 210 at 1.0 µm; G141 covers 1075-1700 nm at 46.5 Å/pixel with
# R = 130 at 1.4 µm. A grism's resolution element is a fixed number of pixels, so the FWHM is constant
# in Å (R grows with λ).
HST_G102 = Instrument(
    name="HST_G102",
    arms=(Arm("g102", 8000.0, 11500.0, 24.5, ((8000.0, 10000.0 / 210.0), (11500.0, 10000.0 / 210.0))),),
    ground_based=False,
    reference="WFC3 Instrument Handbook, Table 8.1 (G102: 24.5 Å/pix, R=210 at 1 µm)",
)
HST_G141 = Instrument(
    name="HST_G141",
    arms=(Arm("g141", 10750.0, 17000.0, 46.5, ((10750.0, 14000.0 / 130.0), (17000.0, 14000.0 / 130.0))),),
    ground_based=False,
    reference="WFC3 Instrument Handbook, Table 8.1 (G141: 46.5 Å/pix, R=130 at 1.4 µm)",
)

INSTRUMENTS: dict[str, Instrument] = {inst.name.lower(): inst for inst in (DESI, DEIMOS, HST_G102, HST_G141)}


def get_instrument(name: str | Instrument) -> Instrument:
    """Look an instrument up by (case-insensitive) name."""
    if isinstance(name, Instrument):
        return name
    try:
        return INSTRUMENTS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown instrument {name!r}; known: {sorted(INSTRUMENTS)}") from None


def bin_edges(centres: np.ndarray) -> np.ndarray:
    """Pixel edges [n+1] from increasing pixel centres [n] (midpoints; half a pixel beyond the ends)."""
    centres = np.asarray(centres, dtype=float)
    if centres.ndim != 1 or len(centres) < 2 or np.any(np.diff(centres) <= 0):
        raise ValueError("wavelengths must be a 1-D, strictly increasing array of at least 2 pixels")
    mid = 0.5 * (centres[1:] + centres[:-1])
    return np.concatenate([[2 * centres[0] - mid[0]], mid, [2 * centres[-1] - mid[-1]]])


def _from_specutils(spectrum: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(wave Å, flux 1e-17 erg/s/cm²/Å, ivar, mask) from a `specutils.Spectrum` (flux of any spectral-density
    unit; uncertainty of any astropy NDUncertainty kind; mask True = bad as in NDData)."""
    import astropy.units as u
    from astropy.nddata import StdDevUncertainty

    wave = spectrum.spectral_axis.to(u.AA, equivalencies=u.spectral())
    unit = u.Unit(FLUX_UNIT)
    flux = spectrum.flux.to(unit, equivalencies=u.spectral_density(wave))
    ivar = None
    if spectrum.uncertainty is not None:
        # via the standard deviation, a flux-like quantity that converts like the flux (f_nu -> f_lambda too)
        std = spectrum.uncertainty.represent_as(StdDevUncertainty)
        sigma = std.quantity if std.unit is not None else std.array * spectrum.flux.unit
        sigma = np.asarray(sigma.to(unit, equivalencies=u.spectral_density(wave)).value, dtype=float)
        with np.errstate(divide="ignore"):
            ivar = np.where(np.isfinite(sigma) & (sigma > 0), 1.0 / sigma**2, 0.0)
    mask = None if spectrum.mask is None else np.asarray(spectrum.mask, dtype=bool)
    return np.asarray(wave.value, dtype=float), np.asarray(flux.value, dtype=float), ivar, mask


def resample(
    wave: Any,
    flux: np.ndarray | None = None,
    ivar: np.ndarray | None = None,
    new_wave: np.ndarray | Instrument | None = None,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flux-conserving resampling onto `new_wave` (pixel centres, Å) with inverse variance propagated.

    Each output pixel is the overlap-weighted mean of the good input pixels it overlaps (bin-edge
    integration, so ∫ f dλ is conserved); its variance is that of a weighted sum,
    Σ (w_j)² σ_j² / (Σ w_j)². Bad input pixels (mask True, ivar ≤ 0, non-finite) get weight 0.
    Output pixels not entirely inside the input's coverage, or with no good input, are masked.

    `specutils.manipulation.FluxConservingResampler` does the same bin-edge integration, but loops in
    Python over output pixels one spectrum at a time, and lets one zero-ivar input pixel give infinite
    variance to every output pixel it touches (no per-pixel weights for bad input), which would wipe out
    whole coarse grism pixels; this version is vectorised over spectra and pixels and drops bad input.

    Args:
        wave: input pixel centres [n_in] (Å), or a `specutils.Spectrum` (then leave flux/ivar/mask out).
        flux: [..., n_in] flux density (1e-17 erg/s/cm²/Å).
        ivar: [..., n_in] inverse variance (None: all pixels weight-1 good, output ivar is 0).
        new_wave: output pixel centres [n_out] (Å) or an `Instrument` (its merged grid).
        mask: [..., n_in] bool or int, nonzero = bad.

    Returns:
        flux [..., n_out] float64, ivar [..., n_out] float64 (0 where masked), mask [..., n_out] bool.
    """
    if new_wave is None:
        raise ValueError("resample: new_wave is required")
    if not isinstance(wave, np.ndarray) and hasattr(wave, "spectral_axis"):
        if flux is not None or ivar is not None or mask is not None:
            raise ValueError("resample: pass either a specutils Spectrum or wave/flux/ivar arrays, not both")
        wave, flux, ivar, mask = _from_specutils(wave)
    if isinstance(new_wave, Instrument):
        new_wave = new_wave.wave
    if flux is None:
        raise ValueError("resample: flux is required")
    in_edges, out_edges = bin_edges(wave), bin_edges(np.asarray(new_wave, dtype=float))
    flux = np.asarray(flux, dtype=float)
    if flux.shape[-1] != len(in_edges) - 1:
        raise ValueError(f"resample: flux has {flux.shape[-1]} pixels but wave has {len(in_edges) - 1}")
    has_ivar = ivar is not None
    ivar = np.ones_like(flux) if ivar is None else np.broadcast_to(np.asarray(ivar, dtype=float), flux.shape)
    good = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)
    if mask is not None:
        good &= ~np.broadcast_to(np.asarray(mask).astype(bool), flux.shape)

    weights, index = _overlap_matrix(in_edges, out_edges)  # [n_out, k] each
    w = weights * good[..., index]  # [..., n_out, k]
    f = np.where(good, flux, 0.0)[..., index]  # [..., n_out, k]
    var = np.where(good, 1.0 / np.where(good, ivar, 1.0), 0.0)[..., index]
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
    """Overlap lengths (Å) of each output pixel with the input pixels it touches, as a dense band:
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


def apply_resolution(data: np.ndarray, model: np.ndarray) -> np.ndarray:
    """Multiply spectra by band-diagonal resolution matrices stored in DESI's layout.

    Args:
        data: [ndiag, n_pixels] (one matrix for all) or [n_spectra, ndiag, n_pixels].
        model: [n_spectra, n_pixels] flux on the same pixels.

    Returns:
        [n_spectra, n_pixels]: out[:, i] = Σ_k data[..., k, i + off_k] · model[:, i + off_k].
    """
    ndiag, n_pix = data.shape[-2], data.shape[-1]
    if model.shape[-1] != n_pix:
        raise ValueError(f"apply_resolution: model has {model.shape[-1]} pixels, resolution has {n_pix}")
    half = ndiag // 2
    out = np.zeros(np.broadcast_shapes(model.shape, data.shape[:-2] + (n_pix,)), dtype=np.float64)
    for k, off in enumerate(range(half, -half - 1, -1)):
        diag = data[..., k, :]  # [..., n_pixels], indexed by the input column j = i + off
        if off >= 0:
            out[..., : n_pix - off] += diag[..., off:] * model[..., off:]
        else:
            out[..., -off:] += diag[..., : n_pix + off] * model[..., : n_pix + off]
    return out
