"""Who is observed: redshifts, magnitudes and line strengths of each DESI target class's population.

`DRAWERS[target_class](rng, n)` returns a population dict (one array of n per property) that
`physics` turns into spectra; Milky Way Survey stars come from `stars`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from ..redshifts import EXTRAGALACTIC_CLASSES
from . import stars
from .physics import QSO_LINES

MOCK_CLASSES = (*EXTRAGALACTIC_CLASSES, "mws")  # and Milky Way Survey stars
# galaxy physics: the three-component basis of `physics`, or `sps` on E-MILES or (family bc03) BC03 populations
FAMILIES = ("basis", "sps", "bc03")
SPS_FAMILIES = ("sps", "bc03")
SPS_CLASSES = ("bgs", "lrg", "elg")
_DEFAULT_PROGRAM = {"bgs": "bright", "mws": "bright"}  # the others: dark


@lru_cache(maxsize=1)
def _cosmology_grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z, distance modulus, cumulative comoving volume) on a grid, Planck 2018 cosmology (astropy)."""
    from astropy.cosmology import Planck18

    z = np.linspace(0.005, 0.7, 700)
    dm = Planck18.distmod(z).value
    dvdz = Planck18.differential_comoving_volume(z).value
    cum = np.cumsum(dvdz)
    return z, dm, cum / cum[-1]


def _galaxy_common(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {
        "spectype": np.full(n, "GALAXY"),
        "psf_to_fiber": rng.uniform(0.6, 0.8, n),  # MEAN_PSF_TO_FIBER_SPECFLUX of real coadds: 0.5-0.8
        "oii_ratio": rng.uniform(1.1, 1.5, n),  # [O II] 3729/3727 for n_e ~ 10-300 cm^-3
        "sii_ratio": rng.uniform(1.15, 1.45, n),  # [S II] 6718/6733
        "sigma_gas": 10.0 ** rng.normal(np.log10(55.0), 0.15, n),  # km/s
        "log_nii_ha": rng.uniform(-1.2, -0.35, n),
        "log_oii_hb": rng.normal(0.45, 0.15, n),
        "log_sii_ha": rng.normal(-0.6, 0.1, n),
    }


def _sf_locus(log_nii_ha: np.ndarray, rng: np.random.Generator, offset: float) -> np.ndarray:
    """log([O III]5008/Hβ) of star-forming galaxies: below the Kauffmann et al. (2003) BPT demarcation
    y = 0.61/(x - 0.05) + 1.3 by `offset` dex with 0.1 dex scatter (high-z ELGs sit closer to it)."""
    y = 0.61 / (log_nii_ha - 0.05) + 1.3 - offset + rng.normal(0.0, 0.1, log_nii_ha.shape)
    return np.minimum(y, 0.8)


def _draw_bgs(rng: np.random.Generator, n: int) -> dict[str, Any]:
    """BGS Bright: r < 19.5 (Hahn et al. 2023, AJ 165, 253), drawn from the r-band luminosity function
    (Schechter M* - 5 log h = -20.44, α = -1.05; Blanton et al. 2003, ApJ 592, 819; h = 0.674) in a
    Planck18 volume, so n(z) peaks at z ≈ 0.2 and ends near 0.6 as DESI's."""
    zg, dm, cum = _cosmology_grid()
    m_star, alpha = -20.44 + 5 * np.log10(0.674), -1.05
    mgrid = np.linspace(-24.5, -16.0, 400)
    x = 10.0 ** (-0.4 * (mgrid - m_star))
    lf_cdf = np.cumsum(x ** (alpha + 1) * np.exp(-x))
    lf_cdf /= lf_cdf[-1]
    z_out, m_out, r_out = [], [], []
    while sum(len(a) for a in z_out) < n:
        k = 40 * n + 1000
        z = np.interp(rng.uniform(size=k), cum, zg)
        absmag = np.interp(rng.uniform(size=k), lf_cdf, mgrid)
        red = rng.uniform(size=k) < np.clip(0.45 + 0.3 * (-21.0 - absmag), 0.15, 0.85)
        kcorr = np.where(red, 1.1, 0.5) * z  # rough r-band K-corrections of red / blue galaxies
        r = absmag + np.interp(z, zg, dm) + kcorr
        keep = (r < 19.5) & (r > 13.0)
        z_out.append(z[keep])
        m_out.append(np.where(red, 1.0, 0.0)[keep])
        r_out.append(r[keep])
    z, quiescent, r = (np.concatenate(a)[:n] for a in (z_out, m_out, r_out))
    quiescent = quiescent.astype(bool)
    p = _galaxy_common(rng, n)
    w_old = np.where(quiescent, rng.uniform(0.85, 1.0, n), rng.uniform(0.1, 0.5, n))
    w_a = np.where(quiescent, 1.0 - w_old, rng.uniform(0.1, 0.4, n) * (1.0 - w_old))
    p.update(
        z=z,
        weights=np.stack([w_old, w_a, 1.0 - w_old - w_a], axis=1),
        ebv_gas=np.where(quiescent, 0.0, 10.0 ** rng.normal(np.log10(0.25), 0.2, n)),
        band=np.full(n, "r"),
        mag_total=r,
        # fibre magnitude: typical BGS r_fib - r ≈ 1-1.5, smaller for distant, compact galaxies
        fiber_offset=np.clip(1.35 - 1.5 * (z - 0.2) + rng.normal(0.0, 0.25, n), 0.4, 2.5),
        # Hα EW: star-forming 10-50 Å (Brinchmann et al. 2004); quiescent: weak LINER-like lines in a third
        anchor="ew_Halpha",
        anchor_value=np.where(
            quiescent,
            np.where(rng.uniform(size=n) < 0.35, rng.uniform(0.5, 3.0, n), 0.0),
            10.0 ** rng.normal(np.log10(25.0), 0.3, n),
        ),
        quiescent=quiescent,
    )
    p["log_nii_ha"] = np.where(quiescent, rng.uniform(-0.2, 0.2, n), p["log_nii_ha"])
    p["log_oiii_hb"] = np.where(quiescent, rng.uniform(-0.2, 0.4, n), _sf_locus(p["log_nii_ha"], rng, 0.25))
    return p


def _draw_lrg(rng: np.random.Generator, n: int) -> dict[str, Any]:
    """LRG: 0.4 < z < 1.1 with n(z) peaking near 0.8, z-band fibre magnitude < 21.6 (Zhou et al. 2023,
    AJ 165, 58); old stellar populations, σ_* ≈ 200-300 km/s; ~15 % with weak [O II] (LINER-like)."""
    z = np.clip(rng.normal(0.76, 0.18, n), 0.4, 1.1)
    zfib = np.clip(19.7 + 2.3 * (z - 0.4) / 0.7 + rng.normal(0.0, 0.35, n), 17.5, 21.6)
    p = _galaxy_common(rng, n)
    w_old = rng.uniform(0.88, 1.0, n)
    weak = rng.uniform(size=n) < 0.15
    p.update(
        z=z,
        weights=np.stack([w_old, 1.0 - w_old, np.zeros(n)], axis=1),
        ebv_gas=np.zeros(n),
        band=np.full(n, "z"),
        fiber_mag=zfib,
        fiber_offset=np.clip(0.8 + rng.normal(0.0, 0.2, n), 0.3, 1.5),
        anchor="ew_OII",
        anchor_value=np.where(weak, rng.uniform(2.0, 8.0, n), 0.0),
        quiescent=np.ones(n, dtype=bool),
    )
    p["log_nii_ha"] = rng.uniform(-0.2, 0.2, n)
    p["log_oiii_hb"] = rng.uniform(-0.2, 0.4, n)
    return p


def _draw_elg(rng: np.random.Generator, n: int) -> dict[str, Any]:
    """ELG (ELG_LOP): 0.6 < z < 1.6 with most at 1.1-1.6, g-band fibre magnitude < 24.1 (Raichoor et al.
    2023, AJ 165, 126); faint continua, [O II]-driven. [O II] fluxes log-normal around 5.5e-17 erg/s/cm²
    (DESI's design threshold is 8e-17 for a 7σ detection; DESI Collaboration 2016a, arXiv:1611.00036),
    brighter for brighter galaxies, so ~25-30 % fail as in DESI's ELG_LOP redshift efficiency."""
    low = rng.uniform(size=n) < 0.35
    z = np.where(low, rng.normal(0.85, 0.13, n), rng.uniform(1.05, 1.62, n))
    z = np.clip(z, 0.6, 1.63)
    gfib = 24.1 - rng.exponential(0.7, n)
    gfib = np.where(gfib < 22.0, rng.uniform(22.0, 24.1, n), gfib)
    p = _galaxy_common(rng, n)
    w_young = rng.uniform(0.5, 0.9, n)
    w_a = rng.uniform(0.0, 1.0, n) * (1.0 - w_young)
    p.update(
        z=z,
        weights=np.stack([1.0 - w_young - w_a, w_a, w_young], axis=1),
        ebv_gas=10.0 ** rng.normal(np.log10(0.2), 0.2, n),
        band=np.full(n, "g"),
        fiber_mag=gfib,
        fiber_offset=np.clip(0.6 + rng.normal(0.0, 0.2, n), 0.2, 1.2),
        anchor="flux_OII",
        anchor_value=10.0 ** (np.log10(5.5) - 0.25 * (gfib - 23.5) + rng.normal(0.0, 0.3, n)),
        quiescent=np.zeros(n, dtype=bool),
    )
    p["log_oiii_hb"] = _sf_locus(p["log_nii_ha"], rng, 0.1)
    return p


def _draw_qso(rng: np.random.Generator, n: int) -> dict[str, Any]:
    """QSO: 0.9 < z < 3.5 with about a third at z > 2.1 (Lyα QSOs), 17.5 < r < 23 (Chaussidon et al. 2023,
    ApJ 944, 107). Composite-like continuum (α_ν = -0.44 ± 0.3 below 5000 Å, Vanden Berk et al. 2001),
    line EWs scattered by 0.2 dex, FWHMs by 0.1 dex; ~12 % BALs (Trump et al. 2006, ApJS 165, 1: 10-26 %)."""
    lya = rng.uniform(size=n) < 0.35
    z = np.where(lya, 2.1 + rng.exponential(0.5, n), rng.uniform(0.9, 2.1, n))
    z = np.where(z > 3.5, rng.uniform(2.1, 3.5, n), z)
    r = 23.0 - rng.exponential(1.1, n)
    r = np.where(r < 17.5, rng.uniform(17.5, 23.0, n), r)
    n_lines = len(QSO_LINES)
    return {
        "spectype": np.full(n, "QSO"),
        "z": z,
        "band": np.full(n, "r"),
        "mag_total": r,
        "psf_to_fiber": rng.uniform(0.6, 0.8, n),
        "alpha_nu": rng.normal(-0.44, 0.3, n),
        "ew_scale": 10.0 ** rng.normal(0.0, 0.2, (n, n_lines)),
        "fwhm_scale": 10.0 ** rng.normal(0.0, 0.1, (n, n_lines)),
        "bal": rng.uniform(size=n) < 0.12,
        "bal_vmin": rng.uniform(0.0, 5000.0, n),
        "bal_width": rng.uniform(2000.0, 15000.0, n),
        "bal_depth": rng.uniform(0.3, 0.9, n),
        "quiescent": np.zeros(n, dtype=bool),
    }


DRAWERS = {"bgs": _draw_bgs, "lrg": _draw_lrg, "elg": _draw_elg, "qso": _draw_qso, "mws": stars.draw}


def _check_class_family(target_class: str, family: str) -> None:
    """Raise ValueError unless `target_class` is a mock class that `family` draws."""
    if target_class not in DRAWERS:
        raise ValueError(f"target_class must be one of {MOCK_CLASSES}, got {target_class!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if family in SPS_FAMILIES and target_class not in SPS_CLASSES:
        raise ValueError(f"the {family} family has the classes {SPS_CLASSES}, got {target_class!r}")
