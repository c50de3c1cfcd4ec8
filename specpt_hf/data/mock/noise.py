"""The noise of a sky-limited spectrum: its wavelength structure measured on real DESI coadds, the dark-sky
continuum and the programs' effective exposure times.

`sky_variance_shape` gives the relative variance per pixel of any instrument's arm: DESI's own tables, the
measured airglow lines re-rendered at another ground-based arm's resolution, or a smooth background from
space. The lines in the tables are the airglow lines ([O I] 5578.9, Na D 5891.6/5897.6, [O I] 6302.0, OH
bands), the Hg 4359.6 light-pollution line and the telluric A band at 7600 Å.
"""

from __future__ import annotations

import os
from functools import cache

import numpy as np
from astropy.io import fits

from specpt_hf.data.instrument import DESI, Arm, Instrument

from .physics import ab_to_flambda, gaussian_line

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
            out[near] += ew * gaussian_line(wave[near], c, s)
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


def _sky_flux(wave: np.ndarray) -> np.ndarray:
    """Dark-sky continuum through a DESI fibre, 1e-17 erg/s/cm²/Å."""
    knots = np.array(_SKY_AB)
    mag = np.interp(wave, knots[:, 0], knots[:, 1]) - 2.5 * np.log10(FIBER_AREA_ARCSEC2)
    return ab_to_flambda(mag, wave)
