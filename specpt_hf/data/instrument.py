"""Spectrograph descriptions (wavelength grid, line-spread function) and resolution matrices.

Every wavelength here is in vacuum Ångström, every flux density in 1e-17 erg/s/cm²/Å (DESI's unit),
and every mask follows the project convention: True = bad pixel. Flux-conserving resampling (`resample`,
`bin_edges`) lives in `specpt_hf.resampling` and is re-exported here; `resample` takes an `Instrument` as
`new_wave` (its merged grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from specpt_hf.resampling import FLUX_UNIT, bin_edges, resample

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))  # 2.3548


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


__all__ = [
    "DEIMOS",
    "DESI",
    "FLUX_UNIT",
    "FWHM_PER_SIGMA",
    "HST_G102",
    "HST_G141",
    "INSTRUMENTS",
    "Arm",
    "Instrument",
    "apply_resolution",
    "bin_edges",
    "get_instrument",
    "resample",
]
