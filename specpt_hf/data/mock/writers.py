"""Mock spectra written as a DESI release: coadd, redrock and truth files per nside-64 healpix pixel, in the
column order, data types and units of Fuji's healpix files, under the release's directory layout.

`write_mock_healpix` writes one pixel's files for one target class; `write_mock_release` a set of classes
over consecutive pixels with seeds derived from one seed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table
from tqdm.auto import tqdm

from specpt_hf.atomic import atomic_write
from specpt_hf.data.instrument import DESI

from .noise import EFFTIME, VAR_REF_1000S
from .physics import nanomaggies
from .populations import _DEFAULT_PROGRAM, FAMILIES, MOCK_CLASSES, _check_class_family
from .render import HARD_FLAGS, ZWARN_NODATA, ZWARN_SKY, _arm_static, generate_spectra

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
_RELEASE = {"basis": 9010, "sps": 9011, "bc03": 9012}  # the RELEASE field of mock TARGETIDs, one per family
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
    """Positive, unique mock TARGETIDs: MOCK bit | RELEASE (9010; 9011, 9012 for the sps, bc03 families) << 42 |
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
    The sps and bc03 `family` write TARGETIDs of RELEASE 9011, 9012 and MOCKFAM = family in the primary headers."""
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


def release_file_seed(seed: int, target_class: str, k: int, family: str = "basis") -> int:
    """The `generate_spectra` seed of the `k`-th file (from 0) of a class in `write_mock_release(seed=seed)`."""
    key = [int(seed), _CLASS_CODE[target_class], int(k)] + (
        [FAMILIES.index(family)] if family != "basis" else []
    )
    return int(np.random.SeedSequence(key).generate_state(1)[0])


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
    written. The sps and bc03 `family` (classes bgs, lrg, elg) draw their own files' seeds."""
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
            paths.extend(
                write_mock_healpix(
                    out_root,
                    target_class,
                    count,
                    release_file_seed(seed, target_class, k, family),
                    survey=survey,
                    healpix=hpx,
                    family=family,
                )
            )
            bar.update(count)
    return paths
