"""DESI-like mock spectra from physical ingredients, written as real DESI coadd and redrock files.

The physics, in rest-frame vacuum Å and 1e-17 erg/s/cm²/Å:

* galaxy continua: a three-component stellar-population basis (old, A-star-dominated, young) with the
  4000 Å break, Balmer jump and absorption lines (Ca II H&K, G band, Mg b, Fe, Na D, Balmer series,
  Ca triplet), Calzetti (2000) dust;
* nebular emission at vacuum wavelengths with Case-B and atomic-physics ratios;
* quasars: a broken power law with broad lines (Vanden Berk et al. 2001), broad absorption lines in
  ~12 %, and a log-normal Lyα forest matched to the measured mean transmission;
* the DESI line-spread function per arm (written as RESOLUTION), and noise whose wavelength structure
  is that of real DESI coadds: the tables below were measured on the inverse variances of the real
  Fuji files shipped with specutils (see `noise_shape_from_desi_files`), and the lines they contain
  are the airglow lines ([O I] 5578.9, Na D 5891.6/5897.6, [O I] 6302.0, OH bands, the Hg 4359.6
  light-pollution line, the telluric A band at 7600 Å);
* magnitude, redshift and S/N distributions of the four DESI dark/bright target classes;
* Milky Way Survey stars (class `mws`, SPECTYPE STAR at Z = v/c; `specpt_hf.data.mock_stars`);
* a second galaxy family, `family="sps"` (E-MILES stellar populations, star-formation histories, Charlot &
  Fall dust, BPT line ratios with AGN and post-starbursts; `specpt_hf.data.mock_sps`), to hold out of
  training; the default family is `basis`.

`generate_spectra` returns arrays for any `Instrument`; `write_mock_healpix` / `write_mock_release`
write DESI-format files; `specpt mock` is the command line.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table
from tqdm.auto import tqdm

from specpt_hf.atomic import atomic_write
from specpt_hf.data.instrument import DESI, FWHM_PER_SIGMA, Arm, Instrument, apply_resolution, get_instrument

C_KMS = 299792.458
C_AA_PER_S = 2.99792458e18
TARGET_CLASSES = ("bgs", "lrg", "elg", "qso")  # the extragalactic classes, `specpt mock`'s default
MOCK_CLASSES = (*TARGET_CLASSES, "mws")  # and Milky Way Survey stars
FAMILIES = ("basis", "sps")  # galaxy physics: this module's basis, or specpt_hf.data.mock_sps
SPS_CLASSES = ("bgs", "lrg", "elg")

# Truth flags for hard cases (bit values of the `hard` truth column; 0 = an ordinary spectrum).
HARD_FLAGS: dict[str, int] = {
    "LOW_SNR": 1,  # would fail the class's DESI good-redshift cut (ZWARN or DELTACHI2 below the cut)
    "LINE_ON_SKY": 2,  # the strongest emission line sits on a strong airglow line
    "NO_LINES": 4,  # no emission line detectable at > 5 sigma
    "LINE_OFF_GRID": 8,  # the class's defining line is outside the wavelength coverage
    "BAL": 16,  # broad-absorption-line quasar
}
# Redrock ZWARN bits used here (desidatamodel / redrock.zwarning).
ZWARN_SKY, ZWARN_SMALL_DELTA_CHI2, ZWARN_NODATA = 1 << 0, 1 << 2, 1 << 9
# DESI good-redshift DELTACHI2 cuts per class (desi-data-model: BGS 40, LRG 15, ELG 25 stand-in; QSO 25);
# MWS velocities come from RVSpecfit, not Redrock cuts: ZWARN == 0 only, i.e. DELTACHI2 ≥ 9.
DELTACHI2_CUT = {"bgs": 40.0, "lrg": 15.0, "elg": 25.0, "qso": 25.0, "mws": 9.0}
_DEFAULT_PROGRAM = {"bgs": "bright", "mws": "bright"}  # the others: dark

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
# Dark-sky continuum at Kitt Peak, AB mag/arcsec² (≈ Neugent & Massey 2010, PASP 122, 1246, zenith, dark),
# through a 1.5"-diameter DESI fibre (1.767 arcsec²): sets the object's share of the photon noise.
_SKY_AB = ((4000.0, 22.7), (5500.0, 21.9), (6500.0, 21.2), (8000.0, 20.4), (9500.0, 19.8))
FIBER_AREA_ARCSEC2 = np.pi * 0.75**2
# Variance per 0.8 Å pixel in the r arm between sky lines for EFFTIME = 1000 s, from the three real
# Fuji target spectra in specutils (exposure-time scaled: 0.058, 0.081, 0.121; geometric mean 0.083).
VAR_REF_1000S = 0.083
# Nominal effective exposure times (Guy et al. 2023, AJ 165, 144; Schlafly et al. 2023, AJ 166, 259):
# dark 1000 s, bright 180 s; SV3 tiles reached ~1.2x that with repeat passes.
EFFTIME = {"dark": 1000.0, "bright": 180.0, "backup": 60.0, "other": 1000.0}

# ---------------------------------------------------------------------------------------------------
# Noise shape measured on real DESI data: the median of 1/IVAR (each spectrum scaled to its r-arm median)
# of the three target spectra with data in the specutils copies of coadd-sv3-dark-26065.fits and
# coadd-5-169-thru20210419.fits. _SKY_KNOTS: 100·log10 of the between-line variance at knots every 16 Å
# from each arm's start (plus the arm's end); _SKY_LINES: "vacuum Å:EW" of every feature rising > 50 %
# above it, EW = ∫ excess dλ / continuum in Å (a sky-line equivalent width against the sky continuum).
# `noise_shape_from_desi_files` re-derives the same shape; tests compare the two.
# ---------------------------------------------------------------------------------------------------
_SKY_KNOTS: dict[str, str] = {
    "b": (
        "226 220 211 202 194 182 182 179 167 156 153 150 143 138 133 128 125 122 120 119 110 109 103 99 "
        "99 100 99 98 95 93 92 90 88 86 85 85 84 81 79 76 75 74 74 72 72 72 72 78 94 84 74 70 68 66 64 64 "
        "64 62 62 61 60 59 57 55 53 53 53 54 51 49 49 49 48 47 41 39 40 41 39 38 38 38 36 35 35 36 36 36 "
        "35 34 33 34 34 33 31 31 32 33 29 28 30 30 29 29 28 29 30 30 29 28 29 28 27 27 27 28 28 28 27 27 "
        "27 27 28 29 29 28 28 28 28 28 31 36 37 45 55 58 66 75 81"
    ),
    "r": (
        "58 57 46 26 20 19 19 20 21 21 21 20 19 17 16 14 13 11 9 9 8 8 8 7 7 7 5 5 4 4 3 4 5 5 2 2 1 1 -1 "
        "-1 -2 -3 -4 -4 -4 -5 -5 -5 -5 -5 -6 -7 -8 -8 -8 -9 -9 -10 -11 -11 -13 -14 -15 -15 -14 -15 -16 "
        "-16 -15 -15 -9 -12 -15 -17 -17 -16 -16 -16 -17 -19 -19 -17 -17 -18 -20 -20 -19 -19 -17 -17 -18 "
        "-19 -19 -15 -14 -14 -14 -17 -17 -14 -13 -16 -17 -18 -19 -19 -18 -13 8 10 12 12 15 33 77 137 137 "
        "137"
    ),
    "z": (
        "-14 8 4 -10 -20 -20 8 -2 -15 -24 -26 -30 -30 -29 -30 -32 -32 -30 -31 -32 -36 -35 -27 -29 -30 -31 "
        "-33 -36 -34 -33 -32 -31 -34 -36 -37 -38 -38 -39 -38 -36 -38 -38 -35 -37 -38 -40 -41 -40 -34 -36 "
        "-42 -42 -39 -40 -41 -42 -42 -44 -44 -44 -46 -46 -49 -51 -50 -46 -46 -44 -44 -38 -16 -21 -30 -36 "
        "-44 -48 -48 -45 -44 -46 -49 -51 -48 -43 -45 -46 -44 -40 -39 -41 -40 -36 -41 -45 -46 -43 -41 -40 "
        "-40 -46 -49 -47 -45 -43 -48 -49 -47 -44 -47 -47 -45 -33 -20 -4 -10 -10 -8 -18 -20 -18 -11 -15 "
        "-15 -14 -16 -16 -14 -12 -15 -18 -19 -14 -12 -15 -10 -7 -13 -9 -2 -4 -16 -16 -10 6 -6"
    ),
}
_SKY_LINES: dict[str, str] = {
    "b": (
        "3605.1:1.38 3700.8:1.42 3787.2:1.08 3911.2:1.55 3926.9:2.24 4359.5:6.19 4365.5:4.28 4369.3:2.86 "
        "5462.4:1.55 5578.7:78.1"
    ),
    "r": (
        "5891.6:13.5 5897.6:7.38 5917.2:1.35 5934.8:1.29 5955.4:1.18 6237.9:4.98 6259.8:3.29 6289.5:2.51 "
        "6302.2:24.6 6308.7:3.8 6331.7:2.96 6358.2:1.67 6365.7:6.91 6467.5:2.37 6472.7:2.01 6500.6:3.82 "
        "6507.0:1.28 6535.3:4.21 6545.8:1.24 6555.6:3.63 6564.5:2.43 6579.1:3.16 6606.1:1.57 6831.1:7.76 "
        "6836.2:6.91 6843.7:1.77 6865.8:9.93 6872.4:5.64 6891.3:3.41 6902.8:3.61 6914.7:3.95 6925.3:6.66 "
        "6941.6:3.1 6951.1:7.48 6972.0:1.76 6980.5:3.79 7013.4:2.09 7050.2:1.68 7242.6:24.4 7247.2:20.5 "
        "7255.4:4.18 7278.3:24.8 7286.7:9.62 7298.0:2.78 7306.1:7.08 7318.5:19.8 7331.5:8.12 7343.1:16.9 "
        "7360.8:7.3 7371.6:15.1 7394.3:4.74 7404.1:10.4 7432.0:2.94 7440.7:5.68 7468.6:1.79 7474.4:4.38 "
        "7481.6:2.62 7485.6:2.24 7526.1:9.44 7532.6:2.29 7553.1:1.96 7559.7:1.73 7573.7:5.51 7588.2:7.45 "
        "7598.4:35 7606.3:115 7609.2:90.4 7613.9:32.3 7616.7:12.9"
    ),
    "z": (
        "7526.2:19.1 7532.7:5.27 7542.6:1.48 7560.2:4.55 7574.3:9.66 7588.4:2.87 7601.1:31.8 7606.5:26.6 "
        "7626.8:2.88 7630.5:13 7638.1:3.61 7642.2:2.58 7647.2:2.91 7651.9:2.19 7656.5:3.49 7664.5:3.77 "
        "7701.8:2.13 7715.5:26.5 7719.2:33.9 7727.7:6.03 7752.8:34.8 7762.3:9.49 7775.7:4.62 7782.8:5.59 "
        "7796.4:25.9 7802.6:0.547 7810.9:8.23 7823.9:31.6 7843.6:8.02 7855.6:31.3 7862.7:11.2 7872.6:12 "
        "7881.7:5.98 7883.3:7.08 7892.3:19 7916.0:50.4 7923.4:21.8 7933.7:9.71 7951.6:7.69 7967.1:28.7 "
        "7981.8:10.6 7995.8:35.6 8016.5:7.21 8022.6:1.25 8028.3:27.2 8054.3:5.58 8064.7:10.1 8087.4:1.69 "
        "8096.3:2.98 8105.0:5.31 8141.6:1.98 8149.5:2.41 8190.9:1.69 8197.8:2.09 8284.2:27.8 8290.9:35.9 "
        "8301.2:33 8313.3:8.42 8320.9:1.49 8346.9:97.6 8355.3:24.4 8367.2:8.94 8384.8:18.5 8401.7:61.1 "
        "8417.8:20.3 8432.7:70.8 8454.9:20.1 8467.9:46.8 8477.1:1.42 8496.1:16.3 8507.4:27.7 8541.3:6.01 "
        "8551.4:10.1 8590.9:2.62 8599.7:3.57 8624.1:11.7 8630.4:6.86 8634.2:5.3 8637.6:2.48 8653.2:3.08 "
        "8657.6:4.63 8662.3:5.35 8667.5:4.32 8672.5:3.5 8678.1:2.38 8683.8:1.53 8702.8:1.92 8709.7:2.64 "
        "8763.7:53.2 8770.2:67.8 8780.4:73.9 8793.7:22.2 8812.6:3.49 8829.6:227 8839.0:49.2 8848.7:1.72 "
        "8852.5:12.9 8865.7:2.58 8870.3:32.6 8888.7:145 8905.8:34.2 8922.4:139 8930.8:1.67 8946.1:25.9 "
        "8960.8:81.8 8973.7:2.28 8983.6:1.87 8990.7:57.8 9004.0:62.7 9020.2:0.701 9024.3:1.39 9040.9:7.35 "
        "9052.3:16.8 9072.4:2.2 9088.8:0.839 9095.5:6.18 9105.5:9.74 9120.9:1.5 9133.4:1.85 9138.8:2.51 "
        "9155.2:6.63 9163.8:5.89 9177.3:1.86 9187.0:1.15 9198.5:0.953 9219.2:4.59 9227.7:4.56 9253.5:3.03 "
        "9264.9:1.59 9281.7:1.44 9289.2:3.52 9296.7:2.73 9310.7:119 9316.3:96.9 9326.6:138 9335.0:1.18 "
        "9340.9:18.9 9346.7:9.24 9356.7:3.89 9361.0:3.57 9379.3:1220 9384.7:8.54 9389.5:5.95 9404.9:27.5 "
        "9413.2:1.35 9422.5:51.3 9430.5:6.88 9442.6:717 9451.2:3.82 9461.9:127 9472.4:1.36 9479.5:189 "
        "9484.1:9.6 9496.9:4 9505.0:93.9 9522.1:62.6 9531.8:2.51 9539.3:4.97 9547.3:2.1 9555.7:50 "
        "9563.1:2.48 9570.0:199 9583.4:1.54 9594.3:4.22 9610.5:13.8 9618.8:1.2 9623.9:27.9 9629.6:2.37 "
        "9640.1:1.9 9648.5:0.872 9656.5:2.26 9663.0:2.98 9664.9:2.83 9672.0:14.4 9676.1:1.25 9684.1:35.5 "
        "9693.8:6.09 9702.3:34 9714.6:7.86 9722.9:31.1 9740.4:16 9748.6:7.12 9760.2:1.77 9793.8:109 "
        "9802.6:19 9810.9:2.9 9815.0:8.28 9820.2:5.2"
    ),
}


@cache
def _sky_tables() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per DESI arm: knot wavelengths, knot log10 variance, sky-line wavelengths, sky-line EWs."""
    out = {}
    for arm in DESI.arms:
        knots = np.array(_SKY_KNOTS[arm.name].split(), dtype=float) / 100.0
        knot_wave = np.r_[np.arange(arm.start, arm.stop, 16.0), arm.stop]
        pairs = np.array([p.split(":") for p in _SKY_LINES[arm.name].split()], dtype=float)
        out[arm.name] = (knot_wave, knots, pairs[:, 0], pairs[:, 1])
    return out


def _line_excess(wave: np.ndarray, centres: np.ndarray, ews: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Σ_l EW_l · G(λ; λ_l, σ): sky-line variance relative to the continuum, [n_pixels]."""
    out = np.zeros_like(wave, dtype=float)
    for c, ew in zip(centres, ews, strict=True):
        near = np.abs(wave - c) < 8.0 * sigma
        if near.any():
            s = sigma[near]
            out[near] += ew * np.exp(-0.5 * ((wave[near] - c) / s) ** 2) / (s * np.sqrt(2.0 * np.pi))
    return out


def sky_variance_shape(arm: Arm, instrument: Instrument = DESI) -> np.ndarray:
    """Relative variance per pixel [n_pixels] of a sky-limited spectrum on `arm` (DESI r-arm median ≈ 1).

    DESI arms use their own measured tables. Other ground-based arms get the best DESI throughput curve at
    each wavelength and all the measured airglow lines re-rendered at their own LSF; space-based arms get a
    smooth background over a sensitivity that falls toward the band edges. Coarser pixels average more
    photons: the variance scales as 0.8 Å / pixel width.
    """
    tables = _sky_tables()
    wave = arm.wave
    sigma = np.hypot(arm.lsf_sigma(wave), arm.step / np.sqrt(12.0))
    if instrument.name == "DESI" and arm.name in tables:
        kw, kv, lw, ew = tables[arm.name]
        return 10.0 ** np.interp(wave, kw, kv) * (1.0 + _line_excess(wave, lw, ew, sigma))
    if not instrument.ground_based:
        centre, half = 0.5 * (wave[0] + wave[-1]), 0.5 * (wave[-1] - wave[0])
        throughput = np.clip(1.0 - 0.8 * ((wave - centre) / half) ** 4, 0.2, None)
        return (0.8 / arm.step) / throughput
    cont = np.min([10.0 ** np.interp(wave, kw, kv) for kw, kv, _, _ in tables.values()], axis=0)
    excess = np.zeros_like(wave)
    for name, lo, hi in (("b", 0.0, 5780.0), ("r", 5780.0, 7570.0), ("z", 7570.0, np.inf)):
        _, _, lw, ew = tables[name]
        keep = (lw >= lo) & (lw < hi)
        excess += _line_excess(wave, lw[keep], ew[keep], sigma)
    return (0.8 / arm.step) * cont * (1.0 + excess)


def strong_sky_lines(min_ew: float = 5.0) -> np.ndarray:
    """Vacuum wavelengths (Å) of the measured airglow lines with sky EW ≥ `min_ew` Å."""
    tables = _sky_tables()
    waves = [lw[ew >= min_ew] for _, _, lw, ew in tables.values()]
    return np.unique(np.round(np.concatenate(waves), 0))


def noise_shape_from_desi_files(paths: list[str | os.PathLike]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Median relative variance per DESI arm from real coadd files: {arm: (wave, var [n_pixels])}.

    Uses every OBJTYPE == 'TGT' spectrum with data; each spectrum's 1/IVAR is scaled to its r-arm median.
    This is how the module's noise tables were measured.
    """
    per_arm: dict[str, list[np.ndarray]] = {"b": [], "r": [], "z": []}
    waves: dict[str, np.ndarray] = {}
    for path in paths:
        with fits.open(path) as hdul:
            objtype = np.char.strip(np.asarray(hdul["FIBERMAP"].data["OBJTYPE"]).astype(str))
            arrays = {a: (hdul[f"{a.upper()}_IVAR"].data, hdul[f"{a.upper()}_MASK"].data) for a in per_arm}
            waves = {a: np.asarray(hdul[f"{a.upper()}_WAVELENGTH"].data, dtype=float) for a in per_arm}
            for i in np.flatnonzero(objtype == "TGT"):
                if np.median(arrays["r"][0][i]) <= 0:
                    continue
                var = {}
                for a, (ivar, mask) in arrays.items():
                    good = (ivar[i] > 0) & (mask[i] == 0)
                    var[a] = np.where(good, 1.0 / np.where(good, ivar[i], 1.0), np.nan)
                scale = np.nanmedian(var["r"])
                for a in per_arm:
                    per_arm[a].append(var[a] / scale)
    if not per_arm["r"]:
        raise ValueError(f"no target spectra with data in {[str(p) for p in paths]}")
    return {a: (waves[a], np.nanmedian(np.array(v), axis=0)) for a, v in per_arm.items()}


# ---------------------------------------------------------------------------------------------------
# Small physical helpers
# ---------------------------------------------------------------------------------------------------
def _erf(x: np.ndarray) -> np.ndarray:
    """Error function (numpy has none; torch, a core dependency, does)."""
    import torch

    return torch.special.erf(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))).numpy()


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


def healpix_nest_centre(nside: int, ipix: int) -> tuple[float, float]:
    """(RA, Dec) in degrees of a nested HEALPix pixel centre (Górski et al. 2005, ApJ 622, 759)."""
    npface = nside * nside
    face, ipf = divmod(int(ipix), npface)
    ix = iy = 0
    for bit in range(nside.bit_length()):
        ix |= ((ipf >> (2 * bit)) & 1) << bit
        iy |= ((ipf >> (2 * bit + 1)) & 1) << bit
    jrll = (2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4)
    jpll = (1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7)
    jr = jrll[face] * nside - ix - iy - 1
    if jr < nside:
        nr, z, kshift = jr, 1.0 - jr * jr / (3.0 * npface), 0
    elif jr > 3 * nside:
        nr = 4 * nside - jr
        z, kshift = -(1.0 - nr * nr / (3.0 * npface)), 0
    else:
        nr, z, kshift = nside, (2 * nside - jr) * 2.0 / (3.0 * nside), (jr - nside) & 1
    jp = (jpll[face] * nr + ix - iy + 1 + kshift) // 2
    jp = jp - 4 * nside if jp > 4 * nside else (jp + 4 * nside if jp < 1 else jp)
    phi = (jp - (kshift + 1) * 0.5) * (np.pi / 2.0) / nr
    return float(np.degrees(phi)), float(np.degrees(np.arcsin(z)))


# ---------------------------------------------------------------------------------------------------
# Rest-frame stellar-population basis
# ---------------------------------------------------------------------------------------------------
_LN_REST = np.arange(np.log(600.0), np.log(40000.0), 1e-4)  # 30 km/s steps


def _planck(wave: np.ndarray, temp: float) -> np.ndarray:
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
            absorb += ew * np.exp(-0.5 * ((wave - centre) / sigma) ** 2) / (sigma * np.sqrt(2.0 * np.pi))
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
# Populations: redshifts, magnitudes and line strengths per DESI target class
# ---------------------------------------------------------------------------------------------------
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


def _draw_mws(rng: np.random.Generator, n: int) -> dict[str, Any]:
    from specpt_hf.data import mock_stars

    return mock_stars.draw(rng, n)


DRAWERS = {"bgs": _draw_bgs, "lrg": _draw_lrg, "elg": _draw_elg, "qso": _draw_qso, "mws": _draw_mws}


# ---------------------------------------------------------------------------------------------------
# Rendering: continuum, lines, forest, LSF, noise
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
    pos = np.clip((np.log(rest) - _LN_REST[0]) / 1e-4, 0.0, len(_LN_REST) - 1.001)
    i0 = pos.astype(np.int64)
    frac = pos - i0
    flux = np.zeros_like(rest)
    for b in range(templates.shape[0]):
        flux += p["weights"][:, b, None] * (templates[b, i0] * (1.0 - frac) + templates[b, i0 + 1] * frac)
    # Calzetti (2000): stellar continuum sees E(B-V)_star = 0.44 E(B-V)_gas
    return flux * 10.0 ** (-0.4 * 0.44 * p["ebv_gas"][:, None] * calzetti_k(rest))


def _log_grid_interp(flux: np.ndarray, ln0: float, rest: np.ndarray) -> np.ndarray:
    """Row i of `flux` [n, M] (on ln λ = ln0 + 1e-4 k) at rest wavelengths `rest` [n, m], linearly; the
    edge values beyond the grid (stars: 3300-10500 Å, the sps family: 1200-10500 Å)."""
    pos = np.clip((np.log(rest) - ln0) / 1e-4, 0.0, flux.shape[1] - 1.001)
    i0 = pos.astype(np.int64)
    frac = pos - i0
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


def _add_lines(model: np.ndarray, arm: Arm, centre: np.ndarray, sigma: np.ndarray, flux: np.ndarray) -> None:
    """Add Gaussian lines integrated exactly over each pixel (flux density = ∫ over pixel / width), in place."""
    n, n_pix = model.shape
    for k in range(centre.shape[1]):
        reach = 6.0 * sigma[:, k] + 2.0 * arm.step
        rows = np.flatnonzero(
            (flux[:, k] > 0) & (centre[:, k] > arm.start - reach) & (centre[:, k] < arm.stop + reach)
        )
        if len(rows) == 0:
            continue
        mu, sig, f = centre[rows, k, None], sigma[rows, k, None], flux[rows, k, None]  # [m, 1]
        half = int(np.ceil(6.0 * sig.max() / arm.step)) + 2
        j0 = np.floor((mu[:, 0] - arm.start) / arm.step + 0.5).astype(np.int64) - half
        idx = j0[:, None] + np.arange(2 * half + 1)[None, :]  # [m, window]
        lo = arm.start + (idx - 0.5) * arm.step
        frac = 0.5 * (
            _erf((lo + arm.step - mu) / (np.sqrt(2.0) * sig)) - _erf((lo - mu) / (np.sqrt(2.0) * sig))
        )
        keep = (idx >= 0) & (idx < n_pix)
        flat = (np.broadcast_to(rows[:, None], idx.shape) * n_pix + idx)[keep]
        model += np.bincount(flat, weights=(f * frac / arm.step)[keep], minlength=n * n_pix).reshape(n, n_pix)


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
    lya, lyb, lyl = 1215.67, 1025.72, 911.75
    zp1 = (1.0 + z)[:, None]
    tau = np.where(wave < lya * zp1, 0.0018 * (wave / lya) ** 3.92, 0.0)
    tau = tau + np.where(wave < lyb * zp1, 0.16 * 0.0018 * (wave / lyb) ** 3.92, 0.0)
    g = rng.standard_normal(tau.shape)
    for _ in range(2):  # [1, 2, 1]/4 smoothing twice: unit variance restored below
        g[:, 1:-1] = 0.25 * g[:, :-2] + 0.5 * g[:, 1:-1] + 0.25 * g[:, 2:]
    g /= np.sqrt(70.0 / 256.0)
    tau_grid, amp_grid = _forest_amplitude_table(sigma_g)
    amp = np.interp(tau, tau_grid, amp_grid, left=0.0)
    trans = np.exp(-amp * np.exp(sigma_g * g - 0.5 * sigma_g**2))
    return np.where(tau > 0, trans, 1.0) * np.where(wave < lyl * zp1, 0.1, 1.0)


def _bal(p: Mapping[str, Any], wave: np.ndarray) -> np.ndarray:
    """Broad-absorption troughs blueward of N V, Si IV, C IV for the BAL quasars, [n, n_pix]."""
    rest = wave[None, :] / (1.0 + p["z"][:, None])
    trans = np.ones_like(rest)
    vmin, width = p["bal_vmin"][:, None], p["bal_width"][:, None]
    for line, weight in zip(BAL_LINES, (0.6, 0.6, 1.0), strict=True):
        v = C_KMS * (1.0 - rest / line)  # outflow velocity that absorbs at this pixel
        edge = np.clip(np.minimum(v - vmin, vmin + width - v) / 500.0, 0.0, 1.0)  # 500 km/s soft edges
        trans *= 1.0 - weight * p["bal_depth"][:, None] * edge * p["bal"][:, None]
    return trans


def _running_mean(x: np.ndarray, width: int) -> np.ndarray:
    """Running mean along the last axis with edge padding, [n, n_pix]."""
    pad = width // 2
    xp = np.pad(x, ((0, 0), (pad, pad)), mode="edge")
    c = np.cumsum(np.pad(xp, ((0, 0), (1, 0))), axis=1)
    return (c[:, width:] - c[:, :-width]) / width


def _sky_flux(wave: np.ndarray) -> np.ndarray:
    """Dark-sky continuum through a DESI fibre, 1e-17 erg/s/cm²/Å."""
    knots = np.array(_SKY_AB)
    mag = np.interp(wave, knots[:, 0], knots[:, 1]) - 2.5 * np.log10(FIBER_AREA_ARCSEC2)
    return ab_to_flambda(mag, wave)


@lru_cache(maxsize=16)
def _arm_static(arm: Arm, instrument: Instrument) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(resolution data [ndiag, n_pix], sky variance shape [n_pix], dark-sky flux [n_pix]) of an arm."""
    return arm.resolution_data(), sky_variance_shape(arm, instrument), _sky_flux(arm.wave)


def _take(p: Mapping[str, Any], rows: slice, n: int) -> dict[str, Any]:
    return {k: (v[rows] if isinstance(v, np.ndarray) and v.shape[:1] == (n,) else v) for k, v in p.items()}


def _render_arm(
    q: Mapping[str, Any],
    lines: tuple[np.ndarray, np.ndarray, np.ndarray],
    arm: Arm,
    instrument: Instrument,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Noiseless model, noisy flux, ivar, mask and line S/N of a block of spectra on one arm."""
    wave = arm.wave
    n = len(q["z"])
    sub = max(1, int(np.ceil(arm.step / 2.0)))  # integrate the continuum over coarse pixels
    offsets = ((np.arange(sub) + 0.5) / sub - 0.5) * arm.step
    model = np.mean([_continuum(q, wave + o) for o in offsets], axis=0) * q["scale"][:, None]  # [n, n_pix]
    centre, sigma, flux = lines
    _add_lines(model, arm, centre, sigma, flux)
    if q["spectype"][0] == "QSO":
        model *= _forest(q["z"], wave, rng) * _bal(q, wave)
    resolution, shape, sky = _arm_static(arm, instrument)
    model = apply_resolution(resolution, model)  # [n, n_pix]
    var = q["noise_level"][:, None] * shape[None, :] * (1.0 + np.clip(model, 0.0, None) / sky[None, :])
    mask = np.zeros((n, len(wave)), dtype=np.int32)
    for i, count in enumerate(rng.poisson(2.0, n)):  # cosmic-ray / bad-column residuals, 1-4 pixels
        for start, length in zip(rng.integers(0, len(wave), count), rng.integers(1, 5, count), strict=True):
            mask[i, start : start + length] = 1  # desispec specmask BADPIX
    obs = model + rng.standard_normal(model.shape) * np.sqrt(var)
    ivar = np.where(mask == 0, 1.0 / var, 0.0)
    # S/N² of everything a template fit can use beyond the broad (1600 Å) continuum: lines, breaks, bands
    info = (ivar * (model - _running_mean(model, 2001)) ** 2).sum(axis=1)  # [n]
    # optimal-extraction S/N of each line: F / sqrt(var · Δλ · 2√π σ_tot)
    pix = np.clip(np.round((centre - arm.start) / arm.step).astype(np.int64), 0, len(wave) - 1)
    inside = (centre >= wave[0]) & (centre <= wave[-1])
    sig_tot = np.hypot(sigma, arm.lsf_sigma(centre))
    var_at = np.take_along_axis(var, pix, axis=1)
    line_snr = np.where(inside, flux / np.sqrt(var_at * arm.step * 2.0 * np.sqrt(np.pi) * sig_tot), 0.0)
    return {
        "wave": wave,
        "flux": obs.astype(np.float32),
        "ivar": ivar.astype(np.float32),
        "mask": mask,
        "model": model.astype(np.float32),
        "resolution": resolution,
        "info": info,
        "line_snr": line_snr,
        "inside": inside,
    }


def _merge_arms(
    instrument: Instrument, arms: Mapping[str, Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Arms → merged grid as DESI's coadd_cameras does: ivar-weighted in overlaps (masked pixels weight 0),
    merged ivar = Σ ivar; mask True where no arm has a good pixel."""
    wave = instrument.wave
    n = len(next(iter(arms.values()))["flux"])
    num, den = np.zeros((n, len(wave))), np.zeros((n, len(wave)))
    model_num, model_den = np.zeros((n, len(wave))), np.zeros((n, len(wave)))
    for name, out in arms.items():
        arm = instrument.arm(name)
        j = np.searchsorted(wave, arm.wave - 1e-4)
        iv = np.where(out["mask"] == 0, out["ivar"], 0.0)
        num[:, j] += iv * out["flux"]
        den[:, j] += iv
        model_num[:, j] += out["model"]
        model_den[:, j] += 1.0
    good = den > 0
    return {
        "flux": np.where(good, num / np.where(good, den, 1.0), 0.0).astype(np.float32),
        "ivar": den.astype(np.float32),
        "mask": ~good,
        "model": (model_num / model_den).astype(np.float32),
    }


def generate_spectra(
    target_class: str,
    n: int,
    seed: int,
    instrument: Instrument | str = DESI,
    program: str | None = None,
    chunk_size: int = 256,
    family: str = "basis",
) -> dict[str, Any]:
    """Mock spectra of one DESI target class (or `mws` stars) on an instrument's grid, with their truth.

    Returns a dict: `instrument` (name), `wave` [n_pix] (merged grid), `flux`, `ivar`, `model` (noiseless)
    float32 [n, n_pix], `mask` bool [n, n_pix] (True = bad), `arms` {name: {wave, flux, ivar, mask (int32
    DESI bits), model, resolution [ndiag, n_pix]}} and `truth` {column: [n]} (z, spectype, magnitudes,
    line fluxes, efftime, redrock-like zerr / zwarn / deltachi2, `hard` flags — see HARD_FLAGS).
    `family` "sps" draws the same populations with the physics of `specpt_hf.data.mock_sps` (classes
    bgs, lrg, elg). Deterministic in (target_class, n, seed, instrument, program, family).
    """
    target_class = target_class.lower()
    _check_class_family(target_class, family)
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    instrument = get_instrument(instrument)
    program = program or _DEFAULT_PROGRAM.get(target_class, "dark")
    if program not in EFFTIME:
        raise ValueError(f"program must be one of {sorted(EFFTIME)}, got {program!r}")
    stream = [int(seed), MOCK_CLASSES.index(target_class)] + (
        [FAMILIES.index(family)] if family != "basis" else []
    )
    rng = np.random.default_rng(stream)
    p = DRAWERS[target_class](rng, n)
    if family == "sps":
        from specpt_hf.data import mock_sps

        mock_sps.apply(p, target_class, rng)
    _normalise(p)
    # SV3-like depth: nominal EFFTIME x ~1.2 with 0.12 dex spread; observing conditions 0.15 dex
    p["efftime"] = EFFTIME[program] * 10.0 ** rng.normal(0.08, 0.12, n)
    p["noise_level"] = VAR_REF_1000S * 1000.0 / p["efftime"] * 10.0 ** rng.normal(0.0, 0.15, n)
    names, centre, sigma, flux = _lines(p)
    arms: dict[str, dict[str, list[np.ndarray]]] = {arm.name: {} for arm in instrument.arms}
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        q = _take(p, rows, n)
        for arm in instrument.arms:
            out = _render_arm(q, (centre[rows], sigma[rows], flux[rows]), arm, instrument, rng)
            for key, value in out.items():
                arms[arm.name].setdefault(key, []).append(value)
    arm_out = {
        name: {k: (v[0] if k in ("wave", "resolution") else np.concatenate(v)) for k, v in d.items()}
        for name, d in arms.items()
    }
    truth = _truth(p, target_class, names, centre, sigma, flux, arm_out, instrument, rng)
    if len(instrument.arms) > 1:
        merged = _merge_arms(instrument, arm_out)
    else:
        only = next(iter(arm_out.values()))
        merged = {
            "flux": only["flux"],
            "ivar": only["ivar"],
            "mask": only["mask"] != 0,
            "model": only["model"],
        }
    public = ("wave", "flux", "ivar", "mask", "model", "resolution")
    return {
        "instrument": instrument.name,
        "program": program,
        "wave": instrument.wave,
        **merged,
        "arms": {name: {k: out[k] for k in public} for name, out in arm_out.items()},
        "truth": truth,
    }


def _check_class_family(target_class: str, family: str) -> None:
    if target_class not in DRAWERS:
        raise ValueError(f"target_class must be one of {MOCK_CLASSES}, got {target_class!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if family == "sps" and target_class not in SPS_CLASSES:
        raise ValueError(f"the sps family has the classes {SPS_CLASSES}, got {target_class!r}")


def _truth(
    p: Mapping[str, Any],
    target_class: str,
    names: list[str],
    centre: np.ndarray,
    sigma: np.ndarray,
    flux: np.ndarray,
    arms: Mapping[str, Mapping[str, np.ndarray]],
    instrument: Instrument,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Truth table, hard-case flags and redrock-like summary numbers, {column: [n]}."""
    n = len(p["z"])
    info = sum(out["info"] for out in arms.values())
    line_snr = np.max([out["line_snr"] for out in arms.values()], axis=0)  # [n, L]
    inside = np.any([out["inside"] for out in arms.values()], axis=0)
    # Redrock's Δχ² to the next-best solution is a fraction of the features' total S/N²
    deltachi2 = info * rng.uniform(0.3, 0.8, n)
    zwarn = np.where(deltachi2 < 9.0, ZWARN_SMALL_DELTA_CHI2, 0).astype(np.int64)
    qso = target_class == "qso"
    width = np.where(qso, 1700.0, np.where(p["quiescent"], 250.0, p.get("sigma_gas", np.full(n, 250.0))))
    width = p.get("zerr_width", width)
    zerr = (1.0 + p["z"]) * width / C_KMS / np.sqrt(np.maximum(info, 1.0))

    hard = np.zeros(n, dtype=np.int64)
    hard |= np.where((zwarn != 0) | (deltachi2 < DELTACHI2_CUT[target_class]), HARD_FLAGS["LOW_SNR"], 0)
    strongest = np.argmax(np.where(inside, flux, -np.inf), axis=1)
    main_centre = centre[np.arange(n), strongest]
    main_sigma = np.hypot(sigma[np.arange(n), strongest], instrument.lsf_fwhm(main_centre) / FWHM_PER_SIGMA)
    if instrument.ground_based:
        sky = strong_sky_lines(10.0)
        dist = np.abs(main_centre[:, None] - sky[None, :]).min(axis=1)
        on_sky = (dist < 1.5 * main_sigma) & inside.any(axis=1)
        if target_class == "mws":  # most stars have no emission line at all
            on_sky &= flux[np.arange(n), strongest] > 0
        hard |= np.where(on_sky, HARD_FLAGS["LINE_ON_SKY"], 0)
    if not qso and target_class != "mws":
        hard |= np.where(line_snr.max(axis=1) < 5.0, HARD_FLAGS["NO_LINES"], 0)
    key_lines = {"elg": ["OII_3727", "OII_3729"], "qso": names}.get(target_class, [])
    if key_lines:
        covered = inside[:, [names.index(k) for k in key_lines]].any(axis=1)
        hard |= np.where(~covered, HARD_FLAGS["LINE_OFF_GRID"], 0)
    if qso:
        hard |= np.where(p["bal"], HARD_FLAGS["BAL"], 0)

    snr_arm = arms["r"] if "r" in arms else next(iter(arms.values()))
    snr = np.median(snr_arm["flux"] * np.sqrt(snr_arm["ivar"]), axis=1)
    truth: dict[str, np.ndarray] = {
        "target_class": np.full(n, target_class),
        "spectype": p["spectype"],
        "z": p["z"].astype(np.float64),
        "zerr": zerr,
        "zwarn": zwarn,
        "deltachi2": deltachi2,
        "hard": hard,
        "snr_median": snr,
        "line_snr_max": line_snr.max(axis=1),
        "efftime": p["efftime"],
        "psf_to_fiber": p["psf_to_fiber"],
        **{f"mag_{b}": p[f"mag_{b}"] for b in BANDS},
        **{f"fibermag_{b}": p[f"fibermag_{b}"] for b in BANDS},
    }
    for line in ("OII_3727", "OII_3729", "Hbeta", "OIII_5008", "Halpha", "NII_6585", "Lya", "CIV", "MgII"):
        if line in names:
            truth[f"flux_{line}"] = flux[:, names.index(line)]
    if qso:
        truth["bal"] = p["bal"]
    elif "truth" in p:  # the star and sps-family modules' own columns
        truth.update(p["truth"])
    else:
        for k, name in enumerate(("old", "astar", "young")):
            truth[f"weight_{name}"] = p["weights"][:, k]
        truth["ebv_gas"] = p["ebv_gas"]
        truth["sigma_gas"] = p["sigma_gas"]
    return truth


# ---------------------------------------------------------------------------------------------------
# DESI file writers
# ---------------------------------------------------------------------------------------------------
# FIBERMAP / EXP_FIBERMAP columns and FITS formats of a Fuji healpix coadd (coadd-sv3-dark-26065.fits);
# "{T}" marks where the survey's targeting columns go.
_FIBERMAP_COLUMNS = (
    "TARGETID:K COADD_FIBERSTATUS:J TARGET_RA:D TARGET_DEC:D PMRA:E PMDEC:E REF_EPOCH:E FA_TARGET:K FA_TYPE:B "
    "OBJTYPE:3A SUBPRIORITY:D OBSCONDITIONS:J RELEASE:I BRICKNAME:8A BRICKID:J BRICK_OBJID:J MORPHTYPE:4A "
    "EBV:E FLUX_G:E FLUX_R:E FLUX_Z:E FLUX_W1:E FLUX_W2:E FLUX_IVAR_G:E FLUX_IVAR_R:E FLUX_IVAR_Z:E "
    "FLUX_IVAR_W1:E FLUX_IVAR_W2:E FIBERFLUX_G:E FIBERFLUX_R:E FIBERFLUX_Z:E FIBERTOTFLUX_G:E FIBERTOTFLUX_R:E "
    "FIBERTOTFLUX_Z:E MASKBITS:I SERSIC:E SHAPE_R:E SHAPE_E1:E SHAPE_E2:E REF_ID:K REF_CAT:2A "
    "GAIA_PHOT_G_MEAN_MAG:E GAIA_PHOT_BP_MEAN_MAG:E GAIA_PHOT_RP_MEAN_MAG:E PARALLAX:E PHOTSYS:1A "
    "PRIORITY_INIT:K NUMOBS_INIT:K {T} PLATE_RA:D PLATE_DEC:D COADD_NUMEXP:I COADD_EXPTIME:E COADD_NUMNIGHT:I "
    "COADD_NUMTILE:I MEAN_DELTA_X:E RMS_DELTA_X:E MEAN_DELTA_Y:E RMS_DELTA_Y:E MEAN_FIBER_RA:D STD_FIBER_RA:E "
    "MEAN_FIBER_DEC:D STD_FIBER_DEC:E MEAN_PSF_TO_FIBER_SPECFLUX:E"
)
_EXP_FIBERMAP_COLUMNS = (
    "TARGETID:K PRIORITY:J SUBPRIORITY:D NIGHT:J EXPID:J MJD:D TILEID:J EXPTIME:D PETAL_LOC:I DEVICE_LOC:J "
    "LOCATION:K FIBER:J FIBERSTATUS:J FIBERASSIGN_X:E FIBERASSIGN_Y:E LAMBDA_REF:E PLATE_RA:D PLATE_DEC:D "
    "NUM_ITER:K FIBER_X:D FIBER_Y:D DELTA_X:D DELTA_Y:D FIBER_RA:D FIBER_DEC:D PSF_TO_FIBER_SPECFLUX:D"
)
_TSNR2_KINDS = ("GPBDARK", "ELG", "GPBBRIGHT", "LYA", "BGS", "GPBBACKUP", "QSO", "LRG")
# TSNR2 per arm of a real dark target (TARGETID 39627866878511337, COADD_EXPTIME 1009 s); TSNR2 grows
# linearly with effective time, so mock values are these × EFFTIME / 1009 s.
_TSNR2_REF_TIME = 1009.2852
_TSNR2_REF = {
    "B": (215.532, 0.165, 39.146, 108.922, 847.353, 248.251, 4.355, 1.787),
    "R": (14639.579, 31.47, 2516.318, 0.08, 2812.748, 14130.907, 9.514, 45.135),
    "Z": (3.621e-05, 116.825, 6.463e-06, 0.0, 5246.916, 3.961e-05, 24.638, 56.17),
}
_FITS_DTYPES = {"K": "i8", "J": "i4", "I": "i2", "B": "u1", "E": "f4", "D": "f8"}
# Survey → targeting columns (desitarget); cmx has its own bit layout and is not mocked.
_SURVEY_PREFIX = {"sv1": "SV1_", "sv2": "SV2_", "sv3": "SV3_", "main": "", "special": ""}
# *_DESI_TARGET bits (desi-data-model): LRG 0, ELG 1, QSO 2, ELG_LOP 5 (SV3/main), BGS_ANY 60, MWS_ANY 61,
# SKY 32; *_BGS_TARGET: BGS_BRIGHT 1. *_MWS_TARGET (desitarget sv1/sv2/sv3 and main targetmask.yaml):
# MWS_BROAD (SV1 MWS_MAIN_BROAD) 0, MWS_WD 1, MWS_BHB 6, MWS_MAIN_BLUE 8 and MWS_MAIN_RED 11 (not in SV1).
_DESI_BITS = {"lrg": 1 << 0, "elg": 1 << 1, "qso": 1 << 2, "bgs": 1 << 60, "mws": 1 << 61}
_ELG_LOP, _SKY_BIT, _BGS_BRIGHT = 1 << 5, 1 << 32, 1 << 1
_MWS_BROAD, _MWS_WD, _MWS_BHB, _MWS_MAIN_BLUE, _MWS_MAIN_RED = 1 << 0, 1 << 1, 1 << 6, 1 << 8, 1 << 11
_MOCK_TARGETID_BIT, _SKY_TARGETID_BIT = 1 << 58, 1 << 59  # desitarget TARGETID layout (MOCK, SKY bits)
_CLASS_CODE = {name: i for i, name in enumerate(MOCK_CLASSES)}
_RELEASE = {"basis": 9010, "sps": 9011}  # the RELEASE field of mock TARGETIDs, one per family
_MORPHOLOGY = {
    "bgs": ("DEV", "EXP", "SER"),
    "lrg": ("DEV", "SER"),
    "elg": ("EXP", "REX"),
    "qso": ("PSF",),
    "mws": ("PSF",),
}
# PRIORITY_INIT, NUMOBS_INIT (main targetmask.yaml: MWS_MAIN_BLUE/RED 1500, MWS_BHB 1550, MWS_WD 2998)
_PRIORITY = {"bgs": (2100, 2), "lrg": (3200, 2), "elg": (3000, 2), "qso": (3400, 4), "mws": (1500, 1)}
_FLUX_UNIT_STR = "10**-17 erg/(s cm2 Angstrom)"
_IVAR_UNIT_STR = "10**+34 (s2 cm4 Angstrom2) / erg2"


def _column_spec(survey: str) -> list[tuple[str, str]]:
    prefix = _SURVEY_PREFIX[survey]
    if prefix:
        targets = [f"{prefix}{k}_TARGET" for k in ("DESI", "BGS", "MWS", "SCND")]
        targets += ["DESI_TARGET", "BGS_TARGET", "MWS_TARGET"]
    else:
        targets = ["DESI_TARGET", "BGS_TARGET", "MWS_TARGET", "SCND_TARGET"]
    text = _FIBERMAP_COLUMNS.replace("{T}", " ".join(f"{t}:K" for t in targets))
    return [tuple(item.split(":")) for item in text.split()]  # type: ignore[misc]


def _empty_table(spec: list[tuple[str, str]], n: int) -> Table:
    table = Table()
    for name, fmt in spec:
        if fmt.endswith("A"):
            table[name] = np.full(n, "", dtype=f"U{fmt[:-1]}")
        else:
            table[name] = np.zeros(n, dtype=_FITS_DTYPES[fmt])
    return table


def _targetid(healpix: int, target_class: str, index: np.ndarray, release: int = 9010) -> np.ndarray:
    """Positive, unique mock TARGETIDs: MOCK bit | RELEASE (9010, 9011 for the sps family) << 42 |
    BRICKID (= healpix) << 22 | OBJID."""
    objid = (_CLASS_CODE[target_class] << 19) | index.astype(np.int64)
    return (_MOCK_TARGETID_BIT | (release << 42) | (int(healpix) << 22) | objid).astype(np.int64)


def _mws_bits(truth: Mapping[str, np.ndarray], survey: str) -> tuple[np.ndarray, np.ndarray]:
    """(*_MWS_TARGET bits, PRIORITY_INIT) of mock stars: white dwarfs MWS_WD, BHB stars MWS_BHB, the rest
    MWS_MAIN_BLUE (g - r < 0.7) or MWS_MAIN_RED (Cooper et al. 2023, ApJ 947, 37); SV1 MWS_MAIN_BROAD."""
    component = truth["component"]
    blue = truth["mag_g"] - truth["mag_r"] < 0.7
    main = (
        np.where(blue, _MWS_MAIN_BLUE, _MWS_MAIN_RED) if survey != "sv1" else np.full(len(blue), _MWS_BROAD)
    )
    bits = np.select([component == "wd", component == "bhb"], [_MWS_WD, _MWS_BHB], main)
    priority = np.select([component == "wd", component == "bhb"], [2998, 1550], 1500)
    return bits.astype(np.int64), priority


def _fibermap(
    truth: Mapping[str, np.ndarray],
    target_class: str,
    survey: str,
    program: str,
    healpix: int,
    n_sky: int,
    n_unassigned: int,
    rng: np.random.Generator,
    release: int = 9010,
) -> Table:
    """FIBERMAP rows: targets, then sky fibres, then unassigned fibres (caller shuffles)."""
    n = len(truth["z"])
    total = n + n_sky + n_unassigned
    fm = _empty_table(_column_spec(survey), total)
    tgt, sky, una = slice(0, n), slice(n, n + n_sky), slice(n + n_sky, total)
    ra0, dec0 = healpix_nest_centre(64, healpix)
    fm["TARGET_RA"][:] = (ra0 + rng.uniform(-0.3, 0.3, total) / max(np.cos(np.radians(dec0)), 0.1)) % 360.0
    fm["TARGET_DEC"][:] = np.clip(dec0 + rng.uniform(-0.3, 0.3, total), -90.0, 90.0)
    fm["TARGETID"][tgt] = _targetid(healpix, target_class, np.arange(n), release)
    fm["TARGETID"][sky] = _MOCK_TARGETID_BIT | _SKY_TARGETID_BIT | (int(healpix) << 22) | np.arange(n_sky)
    fm["TARGETID"][una] = -(int(healpix) * 1000 + 1 + np.arange(n_unassigned))
    fm["OBJTYPE"][tgt], fm["OBJTYPE"][sky] = "TGT", "SKY"
    fm["COADD_FIBERSTATUS"][una] = 1  # UNASSIGNED
    fm["FA_TYPE"][tgt], fm["FA_TYPE"][sky] = 1, 4
    fm["OBSCONDITIONS"][tgt] = 4 if program == "bright" else 1
    fm["OBSCONDITIONS"][sky] = 63
    fm["SUBPRIORITY"][: n + n_sky] = rng.uniform(size=n + n_sky)
    prefix = _SURVEY_PREFIX[survey]
    desi_bits = _DESI_BITS[target_class] | (
        _ELG_LOP if target_class == "elg" and survey in ("sv3", "main") else 0
    )
    fm[f"{prefix}DESI_TARGET"][tgt] = desi_bits
    fm["FA_TARGET"][tgt] = desi_bits
    if target_class == "bgs":
        fm[f"{prefix}BGS_TARGET"][tgt] = _BGS_BRIGHT
    fm["DESI_TARGET"][sky] = _SKY_BIT
    fm["FA_TARGET"][sky] = _SKY_BIT
    fm["PRIORITY_INIT"][tgt], fm["NUMOBS_INIT"][tgt] = _PRIORITY[target_class]
    if target_class == "mws":
        fm[f"{prefix}MWS_TARGET"][tgt], fm["PRIORITY_INIT"][tgt] = _mws_bits(truth, survey)
    fm["RELEASE"][tgt], fm["PHOTSYS"][tgt] = release, "S"
    fm["REF_EPOCH"][tgt] = 2015.5
    fm["BRICKID"][tgt] = healpix
    fm["BRICK_OBJID"][tgt] = np.arange(n)
    fm["BRICKNAME"][tgt] = [
        f"{int(r * 10) % 3600:04d}{'p' if d >= 0 else 'm'}{int(abs(d) * 10):03d}"
        for r, d in zip(fm["TARGET_RA"][tgt], fm["TARGET_DEC"][tgt], strict=True)
    ]
    morph = rng.choice(_MORPHOLOGY[target_class], n)
    fm["MORPHTYPE"][tgt] = morph
    fm["SERSIC"][tgt] = np.select([morph == "DEV", morph == "SER", morph == "PSF"], [4.0, 2.5, 0.0], 1.0)
    fm["SHAPE_R"][tgt] = np.where(morph == "PSF", 0.0, rng.lognormal(np.log(1.0), 0.4, n))
    fm["SHAPE_E1"][tgt] = np.where(morph == "PSF", 0.0, rng.normal(0.0, 0.15, n))
    fm["SHAPE_E2"][tgt] = np.where(morph == "PSF", 0.0, rng.normal(0.0, 0.15, n))
    fm["EBV"][tgt] = rng.uniform(0.01, 0.08, n)
    # Legacy Surveys DR9 south 5σ depths g 24.7, r 24.2, z 23.3 (Dey et al. 2019): FLUX_IVAR in nanomaggies^-2
    for band, depth in (("G", 24.7), ("R", 24.2), ("Z", 23.3)):
        b = band.lower()
        fm[f"FLUX_{band}"][tgt] = nanomaggies(truth[f"mag_{b}"])
        fm[f"FLUX_IVAR_{band}"][tgt] = (5.0 / nanomaggies(depth)) ** 2
        fm[f"FIBERFLUX_{band}"][tgt] = nanomaggies(truth[f"fibermag_{b}"])
        fm[f"FIBERTOTFLUX_{band}"][tgt] = nanomaggies(truth[f"fibermag_{b}"])
    # WISE: beyond the spectra; typical z - W1 ≈ 0.7 (galaxies) / 1.2 (quasars) AB, W1 - W2 ≈ 0.3 / 0.6;
    # stars on the Rayleigh-Jeans tail: W1 - W2 ≈ 0 Vega = -0.64 AB, z - W1 ≈ -0.8 AB
    zw1, w1w2 = {"qso": (1.2, 0.6), "mws": (-0.8, -0.64)}.get(target_class, (0.7, 0.3))
    fm["FLUX_W1"][tgt] = nanomaggies(truth["mag_z"] - zw1)
    fm["FLUX_W2"][tgt] = nanomaggies(truth["mag_z"] - zw1 - w1w2)
    fm["FLUX_IVAR_W1"][tgt], fm["FLUX_IVAR_W2"][tgt] = 0.5, 0.08
    fm["REF_ID"][tgt] = -1
    for col in ("PLATE_RA", "MEAN_FIBER_RA"):
        fm[col][:] = fm["TARGET_RA"]
    for col in ("PLATE_DEC", "MEAN_FIBER_DEC"):
        fm[col][:] = fm["TARGET_DEC"]
    efftime = np.concatenate([truth["efftime"], np.full(n_sky + n_unassigned, EFFTIME[program])])
    nexp = np.clip(np.round(efftime / (900.0 if program == "dark" else 250.0)), 1, 8).astype(int)
    fm["COADD_NUMEXP"][:] = nexp
    fm["COADD_EXPTIME"][:] = efftime * rng.uniform(
        0.9, 1.3, total
    )  # EFFTIME/EXPTIME ~ 0.8-1.1 in good nights
    fm["COADD_NUMNIGHT"][:] = np.minimum(nexp, rng.integers(1, 3, total))
    fm["COADD_NUMTILE"][:] = np.minimum(nexp, rng.integers(1, 3, total))
    for axis in ("X", "Y"):
        fm[f"MEAN_DELTA_{axis}"][:] = rng.normal(0.0, 0.005, total)
        fm[f"RMS_DELTA_{axis}"][:] = np.abs(rng.normal(0.0, 0.01, total))
    fm["MEAN_PSF_TO_FIBER_SPECFLUX"][tgt] = truth["psf_to_fiber"]
    fm["MEAN_PSF_TO_FIBER_SPECFLUX"][sky] = 0.0
    fm["MEAN_PSF_TO_FIBER_SPECFLUX"][una] = rng.uniform(0.6, 0.8, n_unassigned)
    return fm


def _exp_fibermap(fm: Table, healpix: int, program: str, rng: np.random.Generator) -> Table:
    """One EXP_FIBERMAP row per exposure of each fibre."""
    spec = [tuple(item.split(":")) for item in _EXP_FIBERMAP_COLUMNS.split()]
    nexp = np.asarray(fm["COADD_NUMEXP"], dtype=int)
    rows = np.repeat(np.arange(len(fm)), nexp)
    exp = _empty_table(spec, len(rows))  # type: ignore[arg-type]
    k = np.concatenate([np.arange(m) for m in nexp])
    petal = rng.integers(0, 10, len(fm))[rows]
    device = rng.integers(0, 543, len(fm))[rows]
    exp["TARGETID"][:] = fm["TARGETID"][rows]
    exp["PRIORITY"][:] = fm["PRIORITY_INIT"][rows]
    exp["SUBPRIORITY"][:] = fm["SUBPRIORITY"][rows]
    exp["NIGHT"][:] = 20210405 + k
    exp["EXPID"][:] = 80000 + (healpix % 1000) * 10 + k
    exp["MJD"][:] = 59309.2 + k + rng.uniform(0.0, 0.3, len(rows))
    exp["TILEID"][:] = (1 if program == "bright" else 2) * 100 + k
    exp["EXPTIME"][:] = fm["COADD_EXPTIME"][rows] / nexp[rows]
    exp["PETAL_LOC"][:], exp["DEVICE_LOC"][:] = petal, device
    exp["LOCATION"][:] = petal * 1000 + device
    exp["FIBER"][:] = petal * 500 + device % 500
    exp["FIBERSTATUS"][:] = fm["COADD_FIBERSTATUS"][rows]
    exp["FIBERASSIGN_X"][:], exp["FIBERASSIGN_Y"][:] = rng.uniform(-400, 400, (2, len(rows)))
    exp["LAMBDA_REF"][:] = 5400.0
    exp["PLATE_RA"][:], exp["PLATE_DEC"][:] = fm["TARGET_RA"][rows], fm["TARGET_DEC"][rows]
    exp["NUM_ITER"][:] = 2
    exp["FIBER_X"][:], exp["FIBER_Y"][:] = exp["FIBERASSIGN_X"], exp["FIBERASSIGN_Y"]
    exp["DELTA_X"][:], exp["DELTA_Y"][:] = rng.normal(0.0, 0.005, (2, len(rows)))
    exp["FIBER_RA"][:], exp["FIBER_DEC"][:] = exp["PLATE_RA"], exp["PLATE_DEC"]
    exp["PSF_TO_FIBER_SPECFLUX"][:] = fm["MEAN_PSF_TO_FIBER_SPECFLUX"][rows]
    return exp


def _tsnr2(targetid: np.ndarray, efftime: np.ndarray) -> Table:
    """TSNR2 columns (per arm, then totals) in DESI's order."""
    table = Table()
    table["TARGETID"] = targetid
    scale = efftime / _TSNR2_REF_TIME
    for arm in "BRZ":
        for kind, ref in zip(_TSNR2_KINDS, _TSNR2_REF[arm], strict=True):
            table[f"TSNR2_{kind}_{arm}"] = (ref * scale).astype(np.float32)
    for k, kind in enumerate(_TSNR2_KINDS):
        table[f"TSNR2_{kind}"] = (sum(_TSNR2_REF[a][k] for a in "BRZ") * scale).astype(np.float32)
    return table


def _scores(fm: Table, arms: Mapping[str, Mapping[str, np.ndarray]], efftime: np.ndarray) -> Table:
    table = Table()
    table["TARGETID"] = fm["TARGETID"]
    for name in ("b", "r", "z"):
        out, arm = arms[name], DESI.arm(name)
        flux, ivar = out["flux"].astype(np.float64), out["ivar"].astype(np.float64)
        table[f"INTEG_COADD_FLUX_{name.upper()}"] = (flux.sum(axis=1) * arm.step).astype(np.float32)
        table[f"MEDIAN_COADD_FLUX_{name.upper()}"] = np.median(flux, axis=1).astype(np.float32)
        table[f"MEDIAN_COADD_SNR_{name.upper()}"] = np.median(flux * np.sqrt(ivar), axis=1).astype(np.float32)
    tsnr = _tsnr2(np.asarray(fm["TARGETID"]), efftime)
    for col in tsnr.colnames[1:]:
        table[col] = tsnr[col]
    return table


def _sky_spectra(n: int, program: str, rng: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
    """Sky-subtracted sky fibres: zero signal, sky-line noise."""
    level = VAR_REF_1000S * 1000.0 / EFFTIME[program] * 10.0 ** rng.normal(0.0, 0.15, n)
    out = {}
    for arm in DESI.arms:
        resolution, shape, _ = _arm_static(arm, DESI)
        var = level[:, None] * shape[None, :]
        out[arm.name] = {
            "flux": (rng.standard_normal(var.shape) * np.sqrt(var)).astype(np.float32),
            "ivar": (1.0 / var).astype(np.float32),
            "mask": np.zeros(var.shape, dtype=np.int32),
            "resolution": np.broadcast_to(resolution, (n, *resolution.shape)),
        }
    return out


def _redshifts(
    fm: Table, truth: Mapping[str, np.ndarray], arms: Mapping[str, Any], rng: np.random.Generator
) -> Table:
    """Redrock REDSHIFTS rows (column order and dtypes of Fuji redrock files)."""
    total = len(fm)
    npix = sum((arms[a]["ivar"] > 0).sum(axis=1) for a in ("b", "r", "z")).astype(np.int64)
    objtype = np.asarray(fm["OBJTYPE"])
    is_tgt = objtype == "TGT"
    z = rng.uniform(0.0, 1.5, total)
    zerr = rng.uniform(1e-4, 1e-3, total)
    zwarn = np.where(objtype == "SKY", ZWARN_SKY, ZWARN_NODATA).astype(np.int64)
    deltachi2 = rng.uniform(0.0, 5.0, total)
    spectype = np.full(total, "GALAXY", dtype="U6")
    z[is_tgt], zerr[is_tgt], zwarn[is_tgt] = truth["z"], truth["zerr"], truth["zwarn"]
    deltachi2[is_tgt], spectype[is_tgt] = truth["deltachi2"], truth["spectype"]
    coeff = np.zeros((total, 10))  # template coefficients: not modelled
    table = Table()
    table["TARGETID"] = np.asarray(fm["TARGETID"], dtype=np.int64)
    table["CHI2"] = npix * (1.0 + rng.normal(0.0, 0.02, total))
    table["COEFF"] = coeff
    table["Z"] = z.astype(np.float64)
    table["ZERR"] = zerr.astype(np.float64)
    table["ZWARN"] = zwarn
    table["NPIXELS"] = npix
    table["SPECTYPE"] = spectype
    subtype = np.full(total, "", dtype="U20")
    if "subtype" in truth:  # stars: Redrock's template subclass (A, F, G, K, M, WD, ...)
        subtype[is_tgt] = truth["subtype"]
    table["SUBTYPE"] = subtype
    table["NCOEFF"] = np.where(spectype == "QSO", 4, 10).astype(np.int64)
    table["DELTACHI2"] = deltachi2.astype(np.float64)
    return table


def _atomic_writeto(hdul: fits.HDUList, path: Path) -> None:
    """Write `hdul` (with checksums) atomically: never a half-written file under `path`."""
    atomic_write(path, lambda tmp: hdul.writeto(tmp, overwrite=True, checksum=True))


def _primary(survey: str, program: str, healpix: int, seed: int, family: str = "basis") -> fits.PrimaryHDU:
    hdu = fits.PrimaryHDU()
    for key, value in (
        ("SPGRP", "healpix"),
        ("SPGRPVAL", healpix),
        ("HPXPIXEL", healpix),
        ("HPXNSIDE", 64),
        ("HPXNEST", "True"),
        ("SURVEY", survey),
        ("PROGRAM", program),
        ("SPECPROD", "specpt-mock"),
        ("MOCKSEED", seed),
    ):
        hdu.header[key] = value
    if family != "basis":
        hdu.header["MOCKFAM"] = (family, "mock physics family (specpt_hf.data.mock)")
    return hdu


def healpix_dir(out_root: str | os.PathLike, survey: str, program: str, healpix: int) -> Path:
    """`{out_root}/healpix/{survey}/{program}/{healpix//100}/{healpix}` (the Fuji release layout)."""
    return Path(out_root) / "healpix" / survey / program / str(healpix // 100) / str(healpix)


def write_mock_healpix(
    out_root: str | os.PathLike,
    target_class: str,
    n_spectra: int,
    seed: int,
    survey: str = "sv3",
    program: str | None = None,
    healpix: int = 26065,
    n_sky: int = 2,
    n_unassigned: int = 1,
    family: str = "basis",
) -> tuple[Path, Path]:
    """Write `coadd-{survey}-{program}-{healpix}.fits` and `redrock-...fits` (plus `truth-...fits`, HDU TRUTH,
    the generator's truth by TARGETID) for `n_spectra` mock targets of one class, with `n_sky` sky fibres
    and `n_unassigned` unassigned fibres, in the release layout. Returns (coadd path, redrock path).
    The sps `family` writes TARGETIDs of RELEASE 9011 and MOCKFAM = 'sps' in the primary headers."""
    target_class = target_class.lower()
    _check_class_family(target_class, family)
    if survey not in _SURVEY_PREFIX:
        raise ValueError(f"survey must be one of {sorted(_SURVEY_PREFIX)}, got {survey!r}")
    if not 0 <= int(healpix) < 12 * 64 * 64:
        raise ValueError(f"healpix must be an nside=64 pixel (0-49151), got {healpix}")
    if n_spectra >= 1 << 19:
        raise ValueError(f"n_spectra must be < {1 << 19} per healpix file, got {n_spectra}")
    program = program or _DEFAULT_PROGRAM.get(target_class, "dark")
    mock = generate_spectra(target_class, n_spectra, seed, DESI, program, family=family)
    rng = np.random.default_rng([int(seed), int(healpix), 7])
    truth = mock["truth"]
    fm = _fibermap(
        truth, target_class, survey, program, int(healpix), n_sky, n_unassigned, rng, _RELEASE[family]
    )
    sky = _sky_spectra(n_sky, program, rng)
    arms: dict[str, dict[str, np.ndarray]] = {}
    for arm in DESI.arms:
        t, s = mock["arms"][arm.name], sky[arm.name]
        npix, res = arm.n_pixels, t["resolution"]
        arms[arm.name] = {
            "flux": np.concatenate([t["flux"], s["flux"], np.zeros((n_unassigned, npix), np.float32)]),
            "ivar": np.concatenate([t["ivar"], s["ivar"], np.zeros((n_unassigned, npix), np.float32)]),
            "mask": np.concatenate([t["mask"], s["mask"], np.zeros((n_unassigned, npix), np.int32)]),
            "resolution": np.concatenate(
                [
                    np.broadcast_to(res, (n_spectra, *res.shape)),
                    s["resolution"],
                    np.zeros((n_unassigned, *res.shape), np.float32),
                ]
            ).astype(np.float32),
        }
    order = rng.permutation(len(fm))  # fibres are not grouped by kind in real files
    fm = fm[order]
    arms = {name: {k: v[order] for k, v in d.items()} for name, d in arms.items()}
    efftime = np.concatenate([truth["efftime"], np.full(n_sky + n_unassigned, EFFTIME[program])])[order]
    exp = _exp_fibermap(fm, int(healpix), program, rng)

    hdus: list[fits.hdu.base.ExtensionHDU] = [
        fits.BinTableHDU(fm, name="FIBERMAP"),
        fits.BinTableHDU(exp, name="EXP_FIBERMAP"),
    ]
    for arm in DESI.arms:
        a, out = arm.name.upper(), arms[arm.name]
        hdus.append(fits.ImageHDU(arm.wave.astype(np.float64), name=f"{a}_WAVELENGTH"))
        hdus[-1].header["BUNIT"] = "Angstrom"
        hdus.append(fits.ImageHDU(out["flux"], name=f"{a}_FLUX"))
        hdus[-1].header["BUNIT"] = _FLUX_UNIT_STR
        hdus.append(fits.ImageHDU(out["ivar"], name=f"{a}_IVAR"))
        hdus[-1].header["BUNIT"] = _IVAR_UNIT_STR
        hdus.append(fits.ImageHDU(out["mask"].astype(np.uint32), name=f"{a}_MASK"))  # int32 + BZERO 2**31
        hdus.append(fits.ImageHDU(out["resolution"], name=f"{a}_RESOLUTION"))
    hdus.append(fits.BinTableHDU(_scores(fm, arms, efftime), name="SCORES"))

    directory = healpix_dir(out_root, survey, program, int(healpix))
    stem = f"{survey}-{program}-{int(healpix)}"
    coadd_path, redrock_path = directory / f"coadd-{stem}.fits", directory / f"redrock-{stem}.fits"
    _atomic_writeto(fits.HDUList([_primary(survey, program, int(healpix), seed, family), *hdus]), coadd_path)

    # redrock and truth rows follow the file's fibre order
    tgt_rows = np.flatnonzero(np.asarray(fm["OBJTYPE"]) == "TGT")
    truth_in_file = {k: v[order[tgt_rows]] for k, v in truth.items()}
    redshifts = _redshifts(fm, truth_in_file, arms, rng)
    redrock = fits.HDUList(
        [
            _primary(survey, program, int(healpix), seed, family),
            fits.BinTableHDU(redshifts, name="REDSHIFTS"),
            fits.BinTableHDU(fm, name="FIBERMAP"),
            fits.BinTableHDU(exp, name="EXP_FIBERMAP"),
            fits.BinTableHDU(_tsnr2(np.asarray(fm["TARGETID"]), efftime), name="TSNR2"),
        ]
    )
    _atomic_writeto(redrock, redrock_path)
    truth_table = Table({"TARGETID": np.asarray(fm["TARGETID"])[tgt_rows]})
    for key, value in truth_in_file.items():
        truth_table[key.upper()] = value
    truth_hdu = fits.BinTableHDU(truth_table, name="TRUTH")
    for flag, bit in HARD_FLAGS.items():
        truth_hdu.header[f"HARD{bit}"] = (flag, "bit of the HARD column")
    _atomic_writeto(
        fits.HDUList([_primary(survey, program, int(healpix), seed, family), truth_hdu]),
        directory / f"truth-{stem}.fits",
    )
    return coadd_path, redrock_path


def write_mock_release(
    out_root: str | os.PathLike,
    n_per_class: Mapping[str, int],
    seed: int,
    spectra_per_file: int = 500,
    survey: str = "sv3",
    first_healpix: int = 26000,
    progress: bool = True,
    family: str = "basis",
) -> list[Path]:
    """Write a mock release: per class, files of up to `spectra_per_file` targets on consecutive healpix
    pixels (BGS and MWS in the bright program, the rest in dark). Returns every coadd and redrock path
    written. The sps `family` (classes bgs, lrg, elg) draws its own files' seeds."""
    unknown = set(n_per_class) - set(MOCK_CLASSES)
    if unknown:
        raise ValueError(f"unknown target classes {sorted(unknown)}; use {MOCK_CLASSES}")
    for target_class in n_per_class:
        _check_class_family(target_class, family)
    if spectra_per_file < 1:
        raise ValueError(f"spectra_per_file must be positive, got {spectra_per_file}")
    jobs = []
    healpix = first_healpix
    for target_class, count in n_per_class.items():
        for k, start in enumerate(range(0, int(count), spectra_per_file)):
            jobs.append((target_class, min(spectra_per_file, int(count) - start), k, healpix))
            healpix += 1
    paths: list[Path] = []
    with tqdm(total=sum(j[1] for j in jobs), unit="spectra", disable=not progress, desc="mock") as bar:
        for target_class, count, k, hpx in jobs:
            key = [int(seed), _CLASS_CODE[target_class], k] + (
                [FAMILIES.index(family)] if family != "basis" else []
            )
            file_seed = int(np.random.SeedSequence(key).generate_state(1)[0])
            paths.extend(
                write_mock_healpix(
                    out_root, target_class, count, file_seed, survey=survey, healpix=hpx, family=family
                )
            )
            bar.update(count)
    return paths


def main(argv: list[str] | None = None) -> int:
    """`specpt mock --out DIR --n-per-class 200 --seed 0`: write a DESI-format mock release."""
    parser = argparse.ArgumentParser(prog="specpt mock", description=main.__doc__)
    parser.add_argument("--out", required=True, type=Path, help="release root (healpix/ goes under it)")
    parser.add_argument("--n-per-class", type=int, default=200, help="spectra per target class")
    parser.add_argument(
        "--classes",
        nargs="+",
        default=None,
        choices=MOCK_CLASSES,
        help="default: bgs lrg elg qso (sps: bgs lrg elg)",
    )
    parser.add_argument(
        "--family",
        default="basis",
        choices=FAMILIES,
        help="galaxy physics: basis (default) or sps (E-MILES, BPT)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spectra-per-file", type=int, default=500)
    parser.add_argument("--survey", default="sv3", choices=sorted(_SURVEY_PREFIX))
    args = parser.parse_args(argv)
    if args.n_per_class < 1:
        parser.error("--n-per-class must be positive")
    classes = args.classes or (SPS_CLASSES if args.family == "sps" else TARGET_CLASSES)
    counts = dict.fromkeys(classes, args.n_per_class)
    try:
        paths = write_mock_release(
            args.out, counts, args.seed, args.spectra_per_file, args.survey, family=args.family
        )
    except (ValueError, ImportError, FileNotFoundError) as err:
        parser.error(str(err))
    print(f"wrote {len(paths)} files under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
