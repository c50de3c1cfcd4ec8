"""The sources' spectra: line lists, the galaxy stellar-population basis, dust, nebular and quasar lines, the
Lyα forest and BAL troughs, in rest-frame vacuum Å and 1e-17 erg/s/cm²/Å.

`_continuum` and `_lines` turn a population (`populations.DRAWERS`, or the stars and the sps family that
bring their own rest spectra) into observed-frame continua and emission lines; `_normalise` ties them to
the population's magnitudes.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np

from specpt_hf.data.instrument import FWHM_PER_SIGMA

C_KMS = 299792.458
C_AA_PER_S = 2.99792458e18

# ---------------------------------------------------------------------------------------------------
# Line lists, vacuum Å (SDSS line table, classic.sdss.org/dr7/algorithms/linestable; NIST ASD).
# Emission-line ratios: Hα/Hβ = 2.86, Hγ/Hβ = 0.468, Hδ/Hβ = 0.259 (Case B, T = 1e4 K, n_e = 100 cm^-3;
# Osterbrock & Ferland 2006, Table 4.2); [O III] 5008/4960 = 2.98 and [N II] 6585/6550 ≈ 3
# (Storey & Zeippen 2000, MNRAS 312, 813); [O II] 3729/3727 from 0.35 (dense) to 1.5 (low density) and
# [S II] 6718/6733 from 0.44 to 1.45 (Osterbrock & Ferland 2006, Fig. 5.8).
# ---------------------------------------------------------------------------------------------------
NEBULAR_LINES: dict[str, float] = {
    "OII_3727": 3727.092,
    "OII_3729": 3729.875,
    "NeIII_3870": 3869.86,
    "Hdelta": 4102.89,
    "Hgamma": 4341.68,
    "Hbeta": 4862.68,
    "OIII_4960": 4960.295,
    "OIII_5008": 5008.240,
    "OI_6302": 6302.046,
    "NII_6550": 6549.86,
    "Halpha": 6564.61,
    "NII_6585": 6585.27,
    "SII_6718": 6718.29,
    "SII_6733": 6732.67,
}
CASE_B = {"Halpha": 2.86, "Hgamma": 0.468, "Hdelta": 0.259}

# Stellar absorption features: (vacuum Å, minimum sigma Å, rest EW Å in the old / A-star / young basis).
# Strengths follow Lick-index values of early-type galaxies (Worthey et al. 1994, ApJS 94, 687; Trager
# et al. 1998, ApJS 116, 1) and Balmer lines of A-star-dominated (E+A) spectra, EW(Hδ) > 5 Å (Dressler &
# Gunn 1983, ApJ 270, 7; Goto 2007, MNRAS 381, 187).
ABSORPTION: tuple[tuple[str, float, float, tuple[float, float, float]], ...] = (
    ("MgII_2799", 2799.49, 3.0, (3.0, 2.0, 1.5)),
    ("H11", 3771.70, 2.0, (0.5, 3.0, 2.0)),
    ("H10", 3798.98, 2.0, (0.8, 4.0, 2.5)),
    ("H9", 3836.47, 2.0, (1.0, 5.0, 3.0)),
    ("H8", 3890.15, 2.0, (1.0, 6.0, 4.0)),
    ("CaII_K", 3934.78, 4.0, (12.0, 6.0, 1.5)),
    ("CaII_H", 3969.59, 4.0, (10.0, 5.0, 1.0)),
    ("Hepsilon", 3971.20, 2.0, (0.0, 6.0, 4.0)),
    ("Hdelta", 4102.89, 2.5, (1.0, 8.0, 5.0)),
    ("G_band", 4305.61, 8.0, (5.0, 2.5, 0.5)),
    ("Hgamma", 4341.68, 2.5, (1.5, 7.0, 4.5)),
    ("Hbeta", 4862.68, 2.5, (1.8, 6.0, 4.0)),
    ("Mgb", 5176.70, 6.0, (5.0, 2.0, 0.5)),
    ("Fe5270", 5271.40, 4.0, (2.8, 1.5, 0.3)),
    ("Fe5335", 5336.60, 4.0, (2.5, 1.2, 0.3)),
    ("NaD", 5895.60, 4.0, (4.0, 1.5, 0.5)),
    ("Halpha", 6564.61, 2.5, (1.5, 5.0, 3.5)),
    ("CaT_8500", 8500.36, 3.0, (1.5, 0.8, 0.3)),
    ("CaT_8544", 8544.44, 3.0, (3.5, 1.8, 0.6)),
    ("CaT_8665", 8664.52, 3.0, (3.0, 1.5, 0.5)),
)

# Quasar broad lines: (vacuum Å, rest EW Å, FWHM km/s), after the SDSS composite (Vanden Berk et al. 2001,
# AJ 122, 549, Table 2; Lyα and N V split, EWs rounded). Narrow [O III] with FWHM 500 km/s.
QSO_LINES: dict[str, tuple[float, float, float]] = {
    "Lyb_OVI": (1033.82, 9.0, 4000.0),
    "Lya": (1215.67, 75.0, 3500.0),
    "NV": (1240.81, 15.0, 3000.0),
    "SiIV_OIV": (1399.80, 8.0, 4500.0),
    "CIV": (1549.48, 24.0, 4000.0),
    "HeII": (1640.42, 2.5, 4000.0),
    "CIII": (1908.73, 21.0, 5000.0),
    "MgII": (2799.49, 32.0, 4000.0),
    "Hgamma": (4341.68, 13.0, 4000.0),
    "Hbeta": (4862.68, 46.0, 4500.0),
    "OIII_4960": (4960.295, 4.4, 500.0),
    "OIII_5008": (5008.240, 13.0, 500.0),
    "Halpha": (6564.61, 195.0, 4000.0),
}
BAL_LINES = (1240.81, 1396.76, 1549.48)  # N V, Si IV, C IV troughs

# DECam-like top-hat bands (Å) used to tie spectra to magnitudes (Dey et al. 2019, AJ 157, 168).
BANDS: dict[str, tuple[float, float]] = {"g": (4000.0, 5500.0), "r": (5600.0, 7100.0), "z": (8400.0, 9900.0)}


# ---------------------------------------------------------------------------------------------------
# Dust and photometry
# ---------------------------------------------------------------------------------------------------
def calzetti_k(wave_rest: np.ndarray) -> np.ndarray:
    """Calzetti et al. (2000, ApJ 533, 682) attenuation curve k(λ), R_V = 4.05 (λ in Å, clipped to 0.12-2.2 µm)."""
    lam = np.clip(np.asarray(wave_rest, dtype=float) / 1e4, 0.12, 2.2)
    blue = 2.659 * (-2.156 + 1.509 / lam - 0.198 / lam**2 + 0.011 / lam**3) + 4.05
    red = 2.659 * (-1.857 + 1.040 / lam) + 4.05
    return np.clip(np.where(lam < 0.63, blue, red), 0.0, None)


def ab_to_flambda(mag: np.ndarray, wave: np.ndarray | float) -> np.ndarray:
    """AB magnitude → f_λ in 1e-17 erg/s/cm²/Å at `wave` Å."""
    fnu = 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) + 48.6))
    return fnu * C_AA_PER_S / np.asarray(wave, dtype=float) ** 2 / 1e-17


def nanomaggies(mag: np.ndarray) -> np.ndarray:
    """AB magnitude → flux in nanomaggies (Legacy Surveys FLUX_* columns)."""
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - 22.5))


# ---------------------------------------------------------------------------------------------------
# Rest-frame stellar-population basis
# ---------------------------------------------------------------------------------------------------
LY_ALPHA, LY_BETA, LY_LIMIT = 1215.67, 1025.72, 911.75  # Å, vacuum
_LN_REST = np.arange(np.log(600.0), np.log(40000.0), 1e-4)  # 30 km/s steps


def gaussian_line(wave: np.ndarray, centre: np.ndarray | float, sigma: np.ndarray | float) -> np.ndarray:
    """A unit-area Gaussian profile at `wave` (Å; broadcast with `centre` and `sigma`, Å): a line of flux (or
    equivalent width) 1."""
    return np.exp(-0.5 * ((wave - centre) / sigma) ** 2) / (sigma * np.sqrt(2.0 * np.pi))


def _planck(wave: np.ndarray, temp: np.ndarray | float) -> np.ndarray:
    """Planck f_λ up to a constant at `wave` Å and temperature `temp` K (broadcast against each other)."""
    return wave**-5.0 / np.expm1(1.4388e8 / (wave * temp))


@lru_cache(maxsize=1)
def rest_templates() -> tuple[np.ndarray, np.ndarray]:
    """Rest-frame basis: (wave Å [m], templates [3, m]) = old, A-star-dominated, young; f_λ(5500 Å) = 1.

    Continua are blends of stellar black bodies (old: K giants and G turn-off stars; A-star: 9000 K plus
    an old component; young: B stars), with the 4000 Å break as a metal-blanketing step and the Balmer
    jump at 3646 Å; absorption lines are Gaussian dips of the rest EWs in `ABSORPTION`, at least 200 km/s
    (old) / 120 km/s wide. D4000_n (Balogh et al. 1999) comes out ≈ 1.9 / 1.3 / 1.05, the values of
    quiescent, post-starburst and star-forming galaxies (Kauffmann et al. 2003, MNRAS 341, 33).
    """
    wave = np.exp(_LN_REST)
    step = lambda edge, width: 0.5 * (1.0 - np.tanh((wave - edge) / (2.0 * width)))  # noqa: E731  1 blueward
    old = 0.55 * _planck(wave, 4000.0) + 0.35 * _planck(wave, 4900.0) + 0.10 * _planck(wave, 6300.0)
    old /= np.interp(5500.0, wave, old)
    old *= 1.0 - 0.36 * step(3990.0, 20.0)
    astar = 0.7 * _planck(wave, 9000.0) + 0.3 * _planck(wave, 5200.0)
    astar *= (1.0 - 0.40 * step(3646.0, 8.0)) * (1.0 - 0.12 * step(3990.0, 20.0))
    young = 0.6 * _planck(wave, 20000.0) + 0.4 * _planck(wave, 11000.0)
    young *= 1.0 - 0.15 * step(3646.0, 8.0)
    templates = np.stack([old, astar, young])
    for k, min_kms in enumerate((200.0, 120.0, 120.0)):
        absorb = np.zeros_like(wave)
        for _, centre, min_sigma, ews in ABSORPTION:
            ew = ews[k]
            # depth ≤ 0.7: saturated lines broaden instead of going black
            sigma = max(min_sigma, centre * min_kms / C_KMS, ew / (0.7 * np.sqrt(2.0 * np.pi)))
            absorb += ew * gaussian_line(wave, centre, sigma)
        templates[k] *= np.clip(1.0 - absorb, 0.05, None)
    templates /= np.array([np.interp(5500.0, wave, t) for t in templates])[:, None]
    return wave, templates


def d4000n(wave: np.ndarray, flam: np.ndarray) -> np.ndarray:
    """Narrow 4000 Å break (Balogh et al. 1999): <f_ν>(4000-4100) / <f_ν>(3850-3950), on the last axis."""
    fnu = flam * wave**2
    red = (wave >= 4000.0) & (wave <= 4100.0)
    blue = (wave >= 3850.0) & (wave <= 3950.0)
    return fnu[..., red].mean(axis=-1) / fnu[..., blue].mean(axis=-1)


# ---------------------------------------------------------------------------------------------------
# Observed-frame source spectra: continuum, magnitudes, emission lines, forest, BAL troughs
# ---------------------------------------------------------------------------------------------------
def _continuum(p: Mapping[str, Any], wave: np.ndarray) -> np.ndarray:
    """Unscaled observed-frame f_λ [n, m] at observed wavelengths `wave` [m] or [n, m]."""
    z = p["z"][:, None]
    rest = np.broadcast_to(wave, (len(z), np.shape(wave)[-1])) / (1.0 + z)  # [n, m]
    if "rest_flux" in p:  # one rest-frame spectrum per object (stars, the sps family)
        return _log_grid_interp(p["rest_flux"], p["rest_ln0"], rest)
    if p["spectype"][0] == "QSO":
        slope = -(2.0 + p["alpha_nu"])[:, None]  # f_λ ∝ λ^(-2-α_ν)
        blue = (rest / 1450.0) ** slope
        red = (5000.0 / 1450.0) ** slope * (rest / 5000.0) ** 0.45  # α_ν = -2.45 beyond 5000 Å
        return np.where(rest < 5000.0, blue, red)
    _, templates = rest_templates()
    i0, frac = _log_grid_position(rest, _LN_REST[0], len(_LN_REST))
    flux = np.zeros_like(rest)
    for b in range(templates.shape[0]):
        flux += p["weights"][:, b, None] * (templates[b, i0] * (1.0 - frac) + templates[b, i0 + 1] * frac)
    # Calzetti (2000): stellar continuum sees E(B-V)_star = 0.44 E(B-V)_gas
    return flux * 10.0 ** (-0.4 * 0.44 * p["ebv_gas"][:, None] * calzetti_k(rest))


def _log_grid_position(rest: np.ndarray, ln0: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower grid index (int64) and fraction to the next, [n, m], of rest wavelengths `rest` [n, m] on the
    grid ln λ = ln0 + 1e-4 k (k < size), clipped to the grid."""
    pos = np.clip((np.log(rest) - ln0) / 1e-4, 0.0, size - 1.001)
    i0 = pos.astype(np.int64)
    return i0, pos - i0


def _log_grid_interp(flux: np.ndarray, ln0: float, rest: np.ndarray) -> np.ndarray:
    """Row i of `flux` [n, M] (on ln λ = ln0 + 1e-4 k) at rest wavelengths `rest` [n, m], linearly; the
    edge values beyond the grid (stars: 3300-10500 Å, the sps family: 1200-10500 Å)."""
    i0, frac = _log_grid_position(rest, ln0, flux.shape[1])
    lo, hi = np.take_along_axis(flux, i0, axis=1), np.take_along_axis(flux, i0 + 1, axis=1)
    return lo * (1.0 - frac) + hi * frac


def _band_fnu(p: Mapping[str, Any], band: str, scale: np.ndarray | float = 1.0) -> np.ndarray:
    """Mean f_ν (erg/s/cm²/Hz) of the continuum through a top-hat band, [n]."""
    wave = np.linspace(*BANDS[band], 48)
    flam = _continuum(p, wave) * np.asarray(scale).reshape(-1, 1)
    return (flam * 1e-17 * wave**2 / C_AA_PER_S).mean(axis=1)


def _normalise(p: dict[str, Any]) -> None:
    """Set p['scale'] so the spectrum matches its magnitude, and fill total / fibre magnitudes in g, r, z.

    DESI calibrates fibre spectra for point-source aperture losses, so a galaxy's spectrum carries its
    fibre flux divided by the PSF-to-fibre fraction; a quasar's carries its total flux."""
    if p["spectype"][0] in ("QSO", "STAR"):  # point sources
        p["fiber_offset"] = -2.5 * np.log10(p["psf_to_fiber"])
    elif "mag_total" in p:
        p["fiber_mag"] = p["mag_total"] + p["fiber_offset"]
    else:
        p["mag_total"] = p["fiber_mag"] - p["fiber_offset"]
    spec_mag = p["mag_total"] + p["fiber_offset"] + 2.5 * np.log10(p["psf_to_fiber"])
    band = p["band"][0]
    target = 10.0 ** (-0.4 * (spec_mag + 48.6))
    p["scale"] = target / _band_fnu(p, band)
    for b in BANDS:
        m_spec = -2.5 * np.log10(_band_fnu(p, b, p["scale"])) - 48.6
        p[f"mag_{b}"] = m_spec - p["fiber_offset"] - 2.5 * np.log10(p["psf_to_fiber"])
        p[f"fibermag_{b}"] = p[f"mag_{b}"] + p["fiber_offset"]


def _lines(p: Mapping[str, Any]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Emission lines: names, observed centres [n, L] (Å), sigmas [n, L] (Å), fluxes [n, L] (1e-17 erg/s/cm²)."""
    z = p["z"][:, None]
    if "line_lum" in p:  # rest-frame luminosities in the units of `rest_flux` × Å
        centre = p["line_rest"][None, :] * (1.0 + z)
        flux = p["line_lum"] * (p["scale"] * (1.0 + p["z"]))[:, None]
        return list(p["line_names"]), centre, centre * p["line_sigma_kms"] / C_KMS, flux
    if p["spectype"][0] == "QSO":
        names = list(QSO_LINES)
        rest, ew, fwhm = (np.array([v[i] for v in QSO_LINES.values()]) for i in range(3))
        centre = rest[None, :] * (1.0 + z)
        sigma = centre * fwhm[None, :] * p["fwhm_scale"] / (FWHM_PER_SIGMA * C_KMS)
        cont = _continuum(p, centre) * p["scale"][:, None]
        return names, centre, sigma, ew[None, :] * p["ew_scale"] * (1.0 + z) * cont
    names = list(NEBULAR_LINES)
    rest = np.array(list(NEBULAR_LINES.values()))
    n = len(p["z"])
    oii = 10.0 ** p["log_oii_hb"]
    sii = 2.86 * 10.0 ** p["log_sii_ha"]
    quiescent = p["quiescent"]
    rel = {
        "Hbeta": np.ones(n),
        **{k: np.full(n, v) for k, v in CASE_B.items()},
        "OIII_5008": 10.0 ** p["log_oiii_hb"],
        "OIII_4960": 10.0 ** p["log_oiii_hb"] / 2.98,
        "NII_6585": 2.86 * 10.0 ** p["log_nii_ha"],
        "NII_6550": 2.86 * 10.0 ** p["log_nii_ha"] / 3.0,
        "OII_3727": oii / (1.0 + p["oii_ratio"]),
        "OII_3729": oii * p["oii_ratio"] / (1.0 + p["oii_ratio"]),
        "SII_6718": sii * p["sii_ratio"] / (1.0 + p["sii_ratio"]),
        "SII_6733": sii / (1.0 + p["sii_ratio"]),
        "NeIII_3870": np.where(quiescent, 0.02, 0.08) * oii,
        "OI_6302": np.where(quiescent, 0.15, 0.03) * 2.86,
    }
    rel_obs = np.stack([rel[k] for k in names], axis=1) * 10.0 ** (
        -0.4 * p["ebv_gas"][:, None] * calzetti_k(rest)[None, :]
    )  # [n, L]
    centre = rest[None, :] * (1.0 + z)
    kind, line = p["anchor"].split("_", 1)
    if line == "OII":
        idx = [names.index("OII_3727"), names.index("OII_3729")]
        anchor_wave = 3728.5
    else:
        idx = [names.index(line)]
        anchor_wave = NEBULAR_LINES[line]
    anchor_rel = rel_obs[:, idx].sum(axis=1)
    if kind == "ew":
        cont = _continuum(p, np.full((n, 1), anchor_wave) * (1.0 + z))[:, 0] * p["scale"]
        total = p["anchor_value"] * (1.0 + p["z"]) * cont
    else:
        total = p["anchor_value"]
    flux = rel_obs * (total / anchor_rel)[:, None]
    sigma = centre * p["sigma_gas"][:, None] / C_KMS
    return names, centre, sigma, flux


@lru_cache(maxsize=1)
def _forest_amplitude_table(sigma_g: float = 1.2) -> tuple[np.ndarray, np.ndarray]:
    """Log-normal forest F = exp(-A·exp(σg - σ²/2)), g ~ N(0, 1): τ_eff = -ln<F> as a function of A
    (Gauss-Hermite quadrature), to invert for the A that gives a target τ_eff."""
    x, w = np.polynomial.hermite_e.hermegauss(64)
    w = w / w.sum()
    amp = np.geomspace(1e-4, 50.0, 400)
    mean_f = (w[None, :] * np.exp(-amp[:, None] * np.exp(sigma_g * x[None, :] - 0.5 * sigma_g**2))).sum(
        axis=1
    )
    return -np.log(mean_f), amp


def _forest(z: np.ndarray, wave: np.ndarray, rng: np.random.Generator, sigma_g: float = 1.2) -> np.ndarray:
    """Lyα + Lyβ forest transmission [n, n_pix], mean τ_eff(z) = 0.0018 (1+z)^3.92 (Faucher-Giguère et al.
    2008, ApJ 681, 831), Lyβ τ = 0.16 τ_α (oscillator strengths × wavelengths), flux 10 % below the
    Lyman limit; fluctuations a log-normal field smoothed over ~2 pixels (Bi & Davidsen 1997, ApJ 479, 523)."""
    tau = _forest_tau_eff(z, wave)
    g = rng.standard_normal(tau.shape)
    for _ in range(2):  # [1, 2, 1]/4 smoothing twice: unit variance restored below
        g[:, 1:-1] = 0.25 * g[:, :-2] + 0.5 * g[:, 1:-1] + 0.25 * g[:, 2:]
    g /= np.sqrt(70.0 / 256.0)
    tau_grid, amp_grid = _forest_amplitude_table(sigma_g)
    amp = np.interp(tau, tau_grid, amp_grid, left=0.0)
    trans = np.exp(-amp * np.exp(sigma_g * g - 0.5 * sigma_g**2))
    return np.where(tau > 0, trans, 1.0) * _lyman_limit(z, wave)


def _forest_tau_eff(z: np.ndarray, wave: np.ndarray) -> np.ndarray:
    """Mean Lyα + Lyβ forest optical depth τ_eff [n, m] at observed `wave` [m] or [n, m] of sources at `z` [n]."""
    zp1 = (1.0 + z)[:, None]
    tau = np.where(wave < LY_ALPHA * zp1, 0.0018 * (wave / LY_ALPHA) ** 3.92, 0.0)
    return tau + np.where(wave < LY_BETA * zp1, 0.16 * 0.0018 * (wave / LY_BETA) ** 3.92, 0.0)


def _lyman_limit(z: np.ndarray, wave: np.ndarray) -> np.ndarray:
    """Transmission below the Lyman limit: 0.1 blueward of 911.75 Å rest, else 1, [n, m]."""
    return np.where(wave < LY_LIMIT * (1.0 + z)[:, None], 0.1, 1.0)


def mean_forest_transmission(z: np.ndarray, wave: np.ndarray) -> np.ndarray:
    """The forest's mean transmission exp(-τ_eff) (no fluctuations), with the Lyman limit, [n, m]."""
    return np.exp(-_forest_tau_eff(z, wave)) * _lyman_limit(z, wave)


def _bal(p: Mapping[str, Any], rest: np.ndarray) -> np.ndarray:
    """Broad-absorption troughs blueward of N V, Si IV, C IV for the BAL quasars at rest wavelengths `rest` [n, n_pix]
    or [n_pix], [n, n_pix]."""
    rest = np.broadcast_to(rest, (len(p["bal"]), np.shape(rest)[-1]))
    trans = np.ones_like(rest)
    vmin, width = p["bal_vmin"][:, None], p["bal_width"][:, None]
    for line, weight in zip(BAL_LINES, (0.6, 0.6, 1.0), strict=True):
        v = C_KMS * (1.0 - rest / line)  # outflow velocity that absorbs at this pixel
        edge = np.clip(np.minimum(v - vmin, vmin + width - v) / 500.0, 0.0, 1.0)  # 500 km/s soft edges
        trans *= 1.0 - weight * p["bal_depth"][:, None] * edge * p["bal"][:, None]
    return trans
