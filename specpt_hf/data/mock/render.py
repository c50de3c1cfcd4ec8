"""Observing a population: its spectra through an instrument's arms (pixel-integrated lines, the line-spread
function, sky-limited noise, masked pixels), the arms merged as DESI's coadds do, and the truth table with
its hard-case flags and Redrock-like summary numbers. `generate_spectra` is the entry point.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np

from specpt_hf.data.instrument import DESI, FWHM_PER_SIGMA, Arm, Instrument, apply_resolution, get_instrument

from . import sps
from .noise import EFFTIME, VAR_REF_1000S, _sky_flux, sky_variance_shape, strong_sky_lines
from .physics import (
    BANDS,
    C_KMS,
    _bal,
    _continuum,
    _forest,
    _lines,
    _normalise,
    gaussian_line,
    mean_forest_transmission,
)
from .populations import _DEFAULT_PROGRAM, DRAWERS, FAMILIES, MOCK_CLASSES, SPS_FAMILIES, _check_class_family

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


def _erf(x: np.ndarray) -> np.ndarray:
    """Error function (numpy has none; torch, a core dependency, does)."""
    import torch

    return torch.special.erf(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))).numpy()


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


def _running_mean(x: np.ndarray, width: int) -> np.ndarray:
    """Running mean along the last axis with edge padding, [n, n_pix]."""
    pad = width // 2
    xp = np.pad(x, ((0, 0), (pad, pad)), mode="edge")
    c = np.cumsum(np.pad(xp, ((0, 0), (1, 0))), axis=1)
    return (c[:, width:] - c[:, :-width]) / width


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
        model *= _forest(q["z"], wave, rng) * _bal(q, wave[None, :] / (1.0 + q["z"][:, None]))
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


def _draw_population(
    target_class: str, n: int, seed: int, family: str
) -> tuple[dict[str, Any], np.random.Generator]:
    """The objects of a population (its physics and magnitudes) and the generator that goes on to observe them."""
    stream = [int(seed), MOCK_CLASSES.index(target_class)] + (
        [FAMILIES.index(family)] if family != "basis" else []
    )
    rng = np.random.default_rng(stream)
    p = DRAWERS[target_class](rng, n)
    if family in SPS_FAMILIES:
        sps.apply(p, target_class, rng, family)
    _normalise(p)
    return p, rng


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
    `family` "sps" (E-MILES) or "bc03" (BC03) draws the same populations with the physics of
    `specpt_hf.data.mock.sps` (classes bgs, lrg, elg). Deterministic in (target_class, n, seed, instrument,
    program, family).
    """
    target_class = target_class.lower()
    _check_class_family(target_class, family)
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    instrument = get_instrument(instrument)
    program = program or _DEFAULT_PROGRAM.get(target_class, "dark")
    if program not in EFFTIME:
        raise ValueError(f"program must be one of {sorted(EFFTIME)}, got {program!r}")
    p, rng = _draw_population(target_class, n, seed, family)
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


def rest_frame_models(
    target_class: str, n: int, seed: int, rest_wavelength: np.ndarray, family: str = "basis"
) -> dict[str, np.ndarray]:
    """Noiseless rest-frame spectra of a population: what each source emits, before the instrument.

    The population is drawn as `generate_spectra` draws it (the same `target_class`, `n`, `seed`, `family` give the
    same objects), and each spectrum is its observed-frame continuum and emission lines evaluated at
    `rest_wavelength` × (1 + z) [m] (Å): f_λ(λ(1 + z)), the shape a template fit stretches. Quasars carry the mean
    Lyα-forest transmission (no fluctuations) and their BAL troughs. No line-spread function, no noise.
    Returns `flux` float32 [n, m] and `z` [n].
    """
    target_class = target_class.lower()
    _check_class_family(target_class, family)
    p, _ = _draw_population(target_class, n, seed, family)
    rest = np.asarray(rest_wavelength, dtype=np.float64)  # [m]
    observed = rest[None, :] * (1.0 + p["z"][:, None])  # [n, m]
    flux = _continuum(p, observed) * p["scale"][:, None]  # [n, m]
    _, centre, sigma, line_flux = _lines(p)  # [n, L]
    for k in range(centre.shape[1]):
        c, s = centre[:, k, None], sigma[:, k, None]
        flux += line_flux[:, k, None] * gaussian_line(observed, c, s)
    if p["spectype"][0] == "QSO":
        flux *= mean_forest_transmission(p["z"], observed) * _bal(p, rest)
    return {"flux": flux.astype(np.float32), "z": np.asarray(p["z"])}


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
