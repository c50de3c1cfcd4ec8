"""Milky Way Survey (MWS) stars for the DESI-like mock: SPECTYPE STAR at Z = v/c, Redrock's SUBTYPE letter.

No pip package ships an empirical or synthetic stellar library over 3600-9824 Å at DESI's resolution for
offline use (`ppxf` ships only a 1221-point Sun and Vega, and SSPs in its older releases; `pyckles`,
`milespy`, `synphot`/`stsynphot`, `fsps` and Redrock's templates download their spectra; `pystellibs` is
not on PyPI). The stars are therefore semi-analytic, like the default family's galaxy basis:

* continuum: a Planck function at T_eff with metal-line blanketing blueward of 4000 Å and the Balmer jump
  at 3646 Å, its size D (dex) peaking at A0 (≈ 0.5 dex) and falling to ≈ 0.1 dex at G and B types;
* absorption lines as Gaussian dips of equivalent widths tabulated against T_eff for dwarfs of solar
  metallicity, scaled by 10^(α [Fe/H]) and by a giant / dwarf factor; widths so no dip exceeds 70 %
  depth (saturated lines broaden). The tables are rounded trends of the Lick indices of stars (Worthey et
  al. 1994, ApJS 94, 687: G4300, Fe5270, Fe5335, Mg b, Na D, Hβ), the Ca II triplet (Cenarro et al. 2002,
  MNRAS 329, 863), the gravity-sensitive Na I 8190 doublet (Schiavon et al. 1997, ApJ 479, 902), the Ca II K
  line against [Fe/H] (Beers et al. 1999, AJ 117, 981) and the Balmer-line maximum at A0-A2 (Gray &
  Corbally 2009, Stellar Spectral Classification); expect ±30 %;
* molecular bands of K and M stars (TiO, CaH, VO) as red-degraded steps at their heads (Kirkpatrick, Henry
  & McCarthy 1991, ApJS 77, 417), growing linearly below 4200 K to TiO5 ≈ 0.8 at M0 and ≈ 0.45 at M5
  (measured ≈ 0.75 and 0.3-0.4; Reid, Hawley & Gizis 1995, AJ 110, 1838), CaH weaker in giants;
* DA white dwarfs: pressure-broadened Balmer lines three times a main-sequence star's, no metal lines;
* Hα (and Hβ) emission of active M dwarfs, the active fraction rising from 5 % at M0 to 60 % at M5
  (West et al. 2008, AJ 135, 785), EW(Hα) 1-10 Å.

The population is MWS-main-like (Cooper et al. 2023, ApJ 947, 37): 16 < r < 19, shares of halo/thick-disc
turn-off stars, K dwarfs, red giants, M dwarfs, blue horizontal-branch / A stars and white dwarfs chosen to
resemble its blue and red samples (not measured fractions); radial velocities from a disc (σ = 40 km/s) or
halo (σ = 120 km/s) component, Z = v/c as Redrock reports for stars. T_eff → spectral type follows Pecaut &
Mamajek (2013, ApJS 208, 9) for dwarfs. No interstellar reddening is applied.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .physics import C_KMS, _planck, gaussian_line

_LN0, _DLN = np.log(3300.0), 1e-4  # rest grid, 30 km/s steps
_WAVE = np.exp(np.arange(_LN0, np.log(10500.0), _DLN))
_TEFF = np.array([3000, 3500, 4000, 4500, 5000, 5500, 6000, 6500, 7000, 8000, 9000, 10000, 12000, 20000.0])
# (name, vacuum Å, minimum σ Å, [Fe/H] exponent α, giant factor, EW knots (Å) of dwarfs at _TEFF)
_BALMER = np.array([0.2, 0.3, 0.5, 1.0, 1.6, 2.3, 3.2, 5.0, 7.5, 11.0, 14.0, 13.0, 10.0, 6.0])
LINES: tuple[tuple[str, float, float, float, float, np.ndarray], ...] = (
    ("Halpha", 6564.61, 2.0, 0.0, 1.0, np.array([0.3, 0.4, 0.6, 1.0, 1.6, 2.2, 3.0, 4.5, 6.5, 10, 13, 12, 9, 5])),
    ("Hbeta", 4862.68, 2.0, 0.0, 1.0, _BALMER),
    ("Hgamma", 4341.68, 2.0, 0.0, 1.0, 0.95 * _BALMER),
    ("Hdelta", 4102.89, 2.0, 0.0, 1.0, 0.95 * _BALMER),
    ("Hepsilon", 3971.20, 2.0, 0.0, 1.0, 0.8 * _BALMER),
    ("H8", 3890.15, 2.0, 0.0, 1.0, 0.8 * _BALMER),
    ("H9", 3836.47, 2.0, 0.0, 1.0, 0.7 * _BALMER),
    ("H10", 3798.98, 2.0, 0.0, 1.0, 0.6 * _BALMER),
    ("CaII_K", 3934.78, 1.5, 0.4, 1.0, np.array([6, 9, 12, 14, 14, 12, 9, 6, 4, 2, 0.8, 0.4, 0.2, 0.1])),
    ("CaII_H", 3969.59, 1.5, 0.4, 1.0, np.array([5, 7, 10, 11, 11, 10, 7, 5, 3, 1.6, 0.6, 0.3, 0.2, 0.1])),
    ("CaI_4227", 4227.92, 1.5, 0.5, 0.7, np.array([10, 8, 5, 3, 1.8, 1.2, 0.8, 0.5, 0.3, 0.1, 0, 0, 0, 0])),
    ("G_band", 4305.61, 8.0, 0.3, 1.0, np.array([3, 4, 5.5, 6, 6, 5.5, 4.5, 3, 1.5, 0.5, 0.2, 0, 0, 0])),
    ("Fe_4384", 4384.78, 3.0, 0.5, 1.0, np.array([1.5, 2, 2.5, 2.5, 2.2, 1.8, 1.4, 1, 0.6, 0.3, 0.1, 0, 0, 0])),
    ("MgII_4482", 4482.38, 1.5, 0.0, 1.0, np.array([0, 0, 0, 0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.45, 0.4, 0.3, 0.2])),
    ("HeI_4473", 4472.73, 2.0, 0.0, 1.0, np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.3, 1.0])),
    ("Mgb", 5176.70, 5.0, 0.4, 0.8, np.array([6, 7, 7, 6, 4.5, 3.5, 2.5, 1.8, 1.2, 0.6, 0.3, 0.1, 0, 0])),
    ("Fe_5270", 5271.40, 3.0, 0.5, 1.0, np.array([2.5, 3, 3.5, 3.5, 3, 2.5, 2, 1.5, 1, 0.5, 0.2, 0, 0, 0])),
    ("Fe_5335", 5336.60, 3.0, 0.5, 1.0, np.array([2.2, 2.7, 3.1, 3.1, 2.7, 2.2, 1.8, 1.3, 0.9, 0.4, 0.2, 0, 0, 0])),
    ("NaD", 5895.60, 3.0, 0.3, 0.6, np.array([10, 9, 7, 5, 3.5, 2.5, 2, 1.5, 1, 0.6, 0.4, 0.3, 0.2, 0.1])),
    ("KI_7667", 7667.01, 2.0, 0.3, 0.5, np.array([3, 2.5, 1.2, 0.6, 0.3, 0.2, 0.1, 0, 0, 0, 0, 0, 0, 0])),
    ("KI_7701", 7701.08, 2.0, 0.3, 0.5, np.array([2.5, 2, 1, 0.5, 0.3, 0.1, 0.1, 0, 0, 0, 0, 0, 0, 0])),
    ("NaI_8186", 8185.51, 2.0, 0.3, 0.2, np.array([3.5, 3, 1.8, 0.9, 0.5, 0.3, 0.2, 0.1, 0, 0, 0, 0, 0, 0])),
    ("NaI_8197", 8197.08, 2.0, 0.3, 0.2, np.array([3, 2.5, 1.5, 0.8, 0.4, 0.3, 0.2, 0.1, 0, 0, 0, 0, 0, 0])),
    ("CaT_8500", 8500.36, 2.0, 0.3, 1.3, np.array([0.8, 1, 1.2, 1.4, 1.5, 1.5, 1.4, 1.2, 1, 0.7, 0.5, 0.4, 0.3, 0.2])),
    ("CaT_8544", 8544.44, 2.0, 0.3, 1.3, np.array([1.8, 2.2, 2.7, 3.1, 3.4, 3.4, 3.1, 2.7, 2.2, 1.6, 1.1, 0.9, 0.7, 0.4])),
    ("CaT_8665", 8664.52, 2.0, 0.3, 1.3, np.array([1.4, 1.8, 2.1, 2.5, 2.6, 2.6, 2.5, 2.1, 1.8, 1.2, 0.9, 0.7, 0.5, 0.4])),
)  # fmt: skip
# Molecular bands: (vacuum head Å, depth at full strength, e-folding width redward Å, molecule)
BANDS: tuple[tuple[float, float, float, str], ...] = (
    (4955.0, 0.3, 150.0, "TiO"),
    (5168.0, 0.4, 150.0, "TiO"),
    (5449.0, 0.35, 150.0, "TiO"),
    (5849.0, 0.3, 120.0, "TiO"),
    (6160.0, 0.5, 100.0, "TiO"),
    (6653.0, 0.4, 100.0, "TiO"),
    (7056.0, 0.8, 250.0, "TiO"),
    (7591.0, 0.5, 80.0, "TiO"),
    (8435.0, 0.3, 80.0, "TiO"),
    (8862.0, 0.3, 100.0, "TiO"),
    (6384.0, 0.3, 30.0, "CaH"),
    (6832.0, 0.4, 60.0, "CaH"),
    (7336.0, 0.3, 200.0, "VO"),
    (7853.0, 0.3, 120.0, "VO"),
)
# Dwarf T_eff scale (Pecaut & Mamajek 2013, Table 5): spectral type at the knots, hottest first.
_SPTYPES = (
    (20000, "B2"), (15000, "B5"), (10700, "B9"), (9700, "A0"), (8080, "A5"), (7220, "F0"), (6510, "F5"),
    (5920, "G0"), (5660, "G5"), (5280, "K0"), (4450, "K5"), (3850, "M0"), (3560, "M2"), (3210, "M4"),
    (3060, "M5"), (2800, "M7"),
)  # fmt: skip
# Population components: (share, T_eff range K, log g range, [Fe/H] mean and spread, halo kinematics)
COMPONENTS: dict[str, tuple[float, tuple[float, float], tuple[float, float], tuple[float, float], bool]] = {
    "turnoff": (0.45, (5600.0, 6600.0), (3.9, 4.4), (-0.6, 0.5), False),
    "kdwarf": (0.15, (4000.0, 5600.0), (4.4, 4.7), (-0.3, 0.3), False),
    "giant": (0.20, (4000.0, 5000.0), (1.5, 3.0), (-1.0, 0.6), True),
    "mdwarf": (0.12, (3000.0, 4000.0), (4.7, 5.0), (-0.2, 0.3), False),
    "bhb": (0.05, (7500.0, 9500.0), (3.0, 3.5), (-1.6, 0.4), True),
    "wd": (0.03, (8000.0, 25000.0), (7.8, 8.2), (0.0, 0.0), False),
}


def spectral_type(teff: np.ndarray, logg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(MK-like type, e.g. 'K3III', 'DA'; Redrock SUBTYPE letter, 'WD' for white dwarfs) per star."""
    knots = np.array([k[0] for k in _SPTYPES], dtype=float)
    names = [k[1] for k in _SPTYPES]
    types, letters = [], []
    for t, g in zip(teff, logg, strict=True):
        if g > 7.0:
            types.append("DA")
            letters.append("WD")
            continue
        name = names[int(np.argmin(np.abs(np.log(knots) - np.log(t))))]
        types.append(name + ("III" if g < 3.2 else "IV" if g < 4.0 else "V"))
        letters.append(name[0])
    return np.array(types), np.array(letters)


def _ews(teff: np.ndarray, logg: np.ndarray, feh: np.ndarray) -> np.ndarray:
    """Equivalent widths (Å) [n, n_lines] of `LINES` for each star."""
    giant = np.clip((4.0 - logg) / 1.5, 0.0, 1.0)  # 0 dwarfs → 1 giants
    wd = logg > 7.0
    out = np.zeros((len(teff), len(LINES)))
    for k, (name, _, _, alpha, g_factor, knots) in enumerate(LINES):
        ew = np.interp(np.log(teff), np.log(_TEFF), knots)
        ew *= 10.0 ** (alpha * np.clip(feh, -2.5, 0.5)) * (1.0 + giant * (g_factor - 1.0))
        balmer = name.startswith("H") and not name.startswith("He")
        out[:, k] = np.where(wd, 3.0 * ew if balmer else 0.0, ew)
    return out


def _continuum(teff: np.ndarray, logg: np.ndarray, feh: np.ndarray) -> np.ndarray:
    """Planck × blanketing × Balmer jump × molecular bands, [n, m], normalised at 5500 Å."""
    wave = _WAVE
    flux = _planck(wave[None, :], teff[:, None])  # [n, m]
    blue = 0.5 * (1.0 - np.tanh((wave - 4000.0) / 30.0))  # 1 blueward of 4000 Å
    blanket = 0.5 * np.clip((7500.0 - teff) / 3000.0, 0.0, 1.0) * 10.0 ** (0.25 * np.clip(feh, -2.5, 0.5))
    flux *= 1.0 - np.minimum(blanket, 0.7)[:, None] * blue[None, :]
    jump_dex = 0.5 * np.exp(-(((np.log10(teff) - 3.98) / 0.15) ** 2))
    balmer = 0.5 * (1.0 - np.tanh((wave - 3646.0) / 8.0))
    flux *= 1.0 - (1.0 - 10.0**-jump_dex)[:, None] * balmer[None, :]
    tio = np.clip((4200.0 - teff) / 1200.0, 0.0, 1.0)
    strength = {
        "TiO": tio,
        "CaH": tio * np.clip((logg - 3.0) / 1.5, 0.3, 1.0),
        "VO": np.clip((3300.0 - teff) / 500.0, 0.0, 1.0),
    }
    absorb = np.zeros_like(flux)
    for head, depth, width, molecule in BANDS:
        shape = 0.5 * (1.0 + np.tanh((wave - head) / 2.0)) * np.exp(-np.clip(wave - head, 0.0, None) / width)
        absorb += depth * strength[molecule][:, None] * shape[None, :]
    flux *= np.clip(1.0 - absorb, 0.05, None)
    return flux / flux[:, np.searchsorted(wave, 5500.0), None]


def rest_spectra(teff: np.ndarray, logg: np.ndarray, feh: np.ndarray) -> np.ndarray:
    """Rest-frame stellar f_λ on the module's grid (f(5500 Å) ≈ 1 before lines), float32 [n, m]."""
    flux = _continuum(teff, logg, feh)
    ews = _ews(teff, logg, feh)
    absorb = np.zeros_like(flux)
    for k, (_, centre, min_sigma, *_rest) in enumerate(LINES):
        ew = ews[:, k]
        sigma = np.maximum(min_sigma, ew / (0.7 * np.sqrt(2.0 * np.pi)))[:, None]
        near = np.abs(_WAVE - centre) < 8.0 * sigma.max()
        x = _WAVE[near][None, :]
        absorb[:, near] += ew[:, None] * gaussian_line(x, centre, sigma)
    return (flux * np.clip(1.0 - absorb, 0.05, None)).astype(np.float32)


def _draw_components(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    names = list(COMPONENTS)
    share = np.array([COMPONENTS[k][0] for k in names])
    comp = rng.choice(len(names), n, p=share / share.sum())
    teff, logg, feh = np.empty(n), np.empty(n), np.empty(n)
    halo = np.zeros(n, dtype=bool)
    for i, name in enumerate(names):
        sel = comp == i
        _, t_range, g_range, (f_mean, f_sd), is_halo = COMPONENTS[name]
        teff[sel] = np.exp(rng.uniform(*np.log(t_range), sel.sum()))
        logg[sel] = rng.uniform(*g_range, sel.sum())
        feh[sel] = rng.normal(f_mean, f_sd, sel.sum())
        halo[sel] = is_halo | (feh[sel] < -1.0)
    return {
        "component": np.array(names)[comp],
        "teff": teff,
        "logg": logg,
        "feh": np.clip(feh, -2.5, 0.5),
        "halo": halo,
    }


def _magnitudes(rng: np.random.Generator, component: np.ndarray) -> np.ndarray:
    """r: 16-19 with counts rising 0.3 dex/mag (high-latitude star counts); white dwarfs 17-20 (MWS_WD)."""
    n = len(component)
    u = rng.uniform(size=n)
    k = 0.3 * np.log(10.0)
    r = 19.0 + np.log(u + (1.0 - u) * np.exp(-3.0 * k)) / k  # inverse CDF of ∝ 10^(0.3 m) on [16, 19]
    return np.where(component == "wd", rng.uniform(17.0, 20.0, n), r)


def _emission(rng: np.random.Generator, teff: np.ndarray, logg: np.ndarray) -> np.ndarray:
    """EW (Å) of Hα emission: active M dwarfs (West et al. 2008), else 0."""
    n = len(teff)
    m_dwarf = (teff < 4000.0) & (logg > 4.5)
    active = rng.uniform(size=n) < np.interp(teff, [3060.0, 3850.0], [0.6, 0.05])
    return np.where(m_dwarf & active, 10.0 ** rng.uniform(0.0, 1.0, n), 0.0)


def draw(rng: np.random.Generator, n: int) -> dict[str, Any]:
    """MWS-like stars: population, rest spectra (`rest_flux`), Hα/Hβ emission (`line_lum`) and truth."""
    p = _draw_components(rng, n)
    comp, teff, logg, feh = p["component"], p["teff"], p["logg"], p["feh"]
    velocity = np.where(p["halo"], rng.normal(0.0, 120.0, n), rng.normal(-15.0, 40.0, n))
    velocity = np.clip(velocity, -500.0, 500.0)
    sptype, subtype = spectral_type(teff, logg)
    rest = rest_spectra(teff, logg, feh)
    ew_ha = _emission(rng, teff, logg)
    cont_ha = rest[:, np.searchsorted(_WAVE, 6540.0)].astype(np.float64)
    halpha = ew_ha * cont_ha
    return {
        "spectype": np.full(n, "STAR"),
        "z": velocity / C_KMS,
        "band": np.full(n, "r"),
        "mag_total": _magnitudes(rng, comp),
        "psf_to_fiber": rng.uniform(0.6, 0.8, n),
        "quiescent": np.ones(n, dtype=bool),
        "zerr_width": np.full(n, 60.0),  # km/s: unresolved lines at DESI's resolution
        "rest_flux": rest,
        "rest_ln0": float(_LN0),
        "line_names": ["Halpha", "Hbeta"],
        "line_rest": np.array([6564.61, 4862.68]),
        "line_lum": np.stack([halpha, 0.5 * halpha], axis=1),
        "line_sigma_kms": np.full((n, 2), 20.0),
        "truth": {
            "subtype": subtype,
            "sptype": sptype,
            "component": comp,
            "teff": teff,
            "logg": logg,
            "feh": feh,
            "rv": velocity,
            "ew_halpha_emission": ew_ha,
        },
    }
