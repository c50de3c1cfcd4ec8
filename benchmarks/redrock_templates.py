"""Redrock templates built from the mock's own physics, so the template fitter gets the truth's ingredients.

    python benchmarks/redrock_templates.py --out runs/benchmarks/rrtemplates          # GALAXY (10) + QSO (4 vectors)
    python benchmarks/redrock_templates.py --out /tmp/rrtemplates --quick        # a few hundred spectra, coarse grid
    RR_TEMPLATE_DIR=runs/benchmarks/rrtemplates rrdesi -i coadd-*.fits -o redrock.fits

The recipe is Redrock's own (`rrgaltemplate` in the redrock package): many noiseless rest-frame spectra,
each divided by its median, and their principal components without mean subtraction. The spectra come
from `specpt_hf.data.mock` itself: its BGS / LRG / ELG populations (the three-component stellar basis,
Calzetti dust, nebular lines with their ratios) for GALAXY, and its quasar population (broken power law,
broad lines, BAL troughs, the Lyman-limit drop) for QSO. The Lyα forest is left out of the QSO spectra:
Redrock applies its own IGM model (`RRIGM`, Calura et al. 2012, τ = 0.0023 (1+z)^3.64, close to the mock's
Faucher-Giguère et al. 2008 law). The spectra are new random draws (seed 20240601 by default), not the
benchmark's test spectra.

File format (read by `redrock.templates.Template`): one image, EXTNAME BASIS_VECTORS, [n_vectors, n_wave]
float64, with CRVAL1 / CDELT1 (LOGLAM = 1: log10 Å), RRTYPE, RRSUBTYP, VERSION, RRMETHOD = PCA, RRIGM;
named `rrtemplate-{RRTYPE}-None-v{VERSION}.fits` and listed in `templates-default.txt`, the directory
layout Redrock finds through `RR_TEMPLATE_DIR`. No REDSHIFTS HDU: the redshift grids are Redrock's
defaults (GALAXY −0.005 < z < 1.7 in log10(1+z) steps of 3e-4, QSO 0.05 < z < 6 in steps of 5e-4).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from tqdm.auto import tqdm

from specpt_hf.atomic import atomic_write, atomic_write_text
from specpt_hf.data.instrument import Arm
from specpt_hf.data.mock import DRAWERS, physics, render
from specpt_hf.data.redshifts import EXTRAGALACTIC_CLASSES

VERSION = "mock-1"
DEFAULT_SEED = 20240601
LIST_FILE = "templates-default.txt"
# Small, coarse templates for smoke tests (`--quick` of every benchmark script): seconds to build.
QUICK_SETTINGS = {"n_galaxy": 120, "n_qso": 60, "galaxy_vectors": 5, "qso_vectors": 3, "galaxy_step": 1.0}
# DESI's GALAXY templates mix ELG : LRG : BGS as 10000 : 5000 : 5000 (redrock's rrgaltemplate).
GALAXY_MIX = {"elg": 0.5, "lrg": 0.25, "bgs": 0.25}
# Rest-frame coverage: GALAXY for 3600-9824 Å observed at -0.005 < z < 1.7 (with margin), QSO down to the
# Lyman limit region of z = 6 and up to z = 0.05.
GALAXY_RANGE = (1250.0, 10000.0)
QSO_RANGE = (500.0, 9400.0)


@dataclass(frozen=True)
class TemplateSpec:
    """One template file: Redrock type, rest grid, number of basis vectors, number of input spectra."""

    rrtype: str
    n_vectors: int
    n_spectra: int
    wave: np.ndarray  # rest-frame Å [n_wave]
    loglam: bool  # the grid is uniform in log10(λ) (else in λ)
    igm: str


def galaxy_grid(step: float = 0.2) -> np.ndarray:
    """Linear rest-frame grid for GALAXY (Å); 0.2 Å resolves 50 km/s lines at the highest redshifts."""
    n = int(round((GALAXY_RANGE[1] - GALAXY_RANGE[0]) / step)) + 1
    return GALAXY_RANGE[0] + step * np.arange(n)


def qso_grid(dlog10: float = 1e-4) -> np.ndarray:
    """Log10-uniform rest-frame grid for QSO (Å), 69 km/s per pixel for dlog10 = 1e-4 (the BOSS eigenspectra)."""
    lo, hi = np.log10(QSO_RANGE[0]), np.log10(QSO_RANGE[1])
    return 10.0 ** np.arange(lo, hi + dlog10 / 2, dlog10)


def _rest_arm(wave: np.ndarray) -> Arm:
    """An `Arm` on the template grid, for the mock's pixel-integrated line renderer (linear grids only)."""
    step = float(np.median(np.diff(wave)))
    return Arm("rest", float(wave[0]), float(wave[-1]), step, ((float(wave[0]), 0.0), (float(wave[-1]), 0.0)))


def _add_lines_rest(
    model: np.ndarray, wave: np.ndarray, centre: np.ndarray, sigma: np.ndarray, flux: np.ndarray
):
    """Add Gaussian lines (rest-frame centre / sigma / flux [n, L]) to `model` [n, m] in place."""
    if np.allclose(np.diff(wave), wave[1] - wave[0], rtol=1e-6):
        render._add_lines(model, _rest_arm(wave), centre, sigma, flux)
        return
    edges = np.concatenate([[wave[0]], 0.5 * (wave[1:] + wave[:-1]), [wave[-1]]])  # log grid: bin edges
    width = np.diff(edges)
    for k in range(centre.shape[1]):
        lo = (edges[None, :-1] - centre[:, k, None]) / (np.sqrt(2.0) * sigma[:, k, None])  # [n, m]
        hi = (edges[None, 1:] - centre[:, k, None]) / (np.sqrt(2.0) * sigma[:, k, None])
        model += flux[:, k, None] * 0.5 * (render._erf(hi) - render._erf(lo)) / width[None, :]


def rest_frame_spectra(target_class: str, n: int, seed: int, wave: np.ndarray) -> np.ndarray:
    """Noiseless rest-frame spectra [n, m] of one mock target class on `wave` (Å), before the LSF.

    Each row is the mock's observed-frame flux density evaluated at λ_obs = λ_rest (1 + z) — the same
    continuum, dust and line fluxes as `generate_spectra`, with no Lyα forest and no noise.
    """
    rng = np.random.default_rng([int(seed), EXTRAGALACTIC_CLASSES.index(target_class), 99])
    p = DRAWERS[target_class](rng, n)
    physics._normalise(p)  # the scale ties line fluxes to continua as in the mock
    _, centre, sigma, flux = physics._lines(p)  # observed frame [n, L]
    zp1 = 1.0 + p["z"][:, None]
    rest_p = {**p, "z": np.zeros(n)}
    model = physics._continuum(rest_p, wave) * p["scale"][:, None]  # [n, m]
    # f_obs(λ_rest (1+z)) of a line of flux F at c, σ equals that of flux F/(1+z) at c/(1+z), σ/(1+z)
    _add_lines_rest(model, wave, centre / zp1, sigma / zp1, flux / zp1)
    if target_class == "qso":
        model *= physics._bal(rest_p, wave)
        model *= np.where(wave < 911.75, 0.1, 1.0)[
            None, :
        ]  # the mock's Lyman-limit drop, fixed in the rest frame
    return model


def galaxy_spectra(n: int, seed: int, wave: np.ndarray, chunk: int = 256) -> np.ndarray:
    """[n, m] float32 rest-frame GALAXY inputs, ELG : LRG : BGS as in GALAXY_MIX, each divided by its median."""
    counts = {name: int(round(frac * n)) for name, frac in GALAXY_MIX.items()}
    counts["elg"] += n - sum(counts.values())
    return _stack(counts, seed, wave, chunk)


def qso_spectra(n: int, seed: int, wave: np.ndarray, chunk: int = 256) -> np.ndarray:
    """[n, m] float32 rest-frame QSO inputs, each divided by its median."""
    return _stack({"qso": n}, seed, wave, chunk)


def _stack(counts: dict[str, int], seed: int, wave: np.ndarray, chunk: int) -> np.ndarray:
    out = np.empty((sum(counts.values()), len(wave)), dtype=np.float32)
    row = 0
    with tqdm(total=len(out), desc="rest-frame spectra", unit="spectra", leave=False) as bar:
        for name, count in counts.items():
            for k, start in enumerate(range(0, count, chunk)):
                size = min(chunk, count - start)
                block = rest_frame_spectra(name, size, seed + 1000 * k, wave)
                out[row : row + size] = block / np.median(block, axis=1, keepdims=True)
                row += size
                bar.update(size)
    return out


def pca_basis(spectra: np.ndarray, n_vectors: int, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Top principal components of `spectra` [n, m] without mean subtraction (as Redrock's templates).

    Solved through the [n, n] Gram matrix, so memory stays at the input's size. Returns (basis
    [n_vectors, m] float64 with unit-norm rows, fraction of the total power each one carries [n_vectors]).
    """
    n, m = spectra.shape
    if not 1 <= n_vectors <= n:
        raise ValueError(f"n_vectors must be between 1 and the number of spectra ({n}), got {n_vectors}")
    gram = np.zeros((n, n))
    for start in range(0, m, chunk):
        block = spectra[:, start : start + chunk].astype(np.float64)  # [n, chunk]
        gram += block @ block.T
    eigval, eigvec = np.linalg.eigh(gram)  # ascending
    order = np.argsort(eigval)[::-1][:n_vectors]
    values, vectors = np.clip(eigval[order], 0.0, None), eigvec[:, order]  # [k], [n, k]
    basis = np.empty((n_vectors, m))
    for start in range(0, m, chunk):
        basis[:, start : start + chunk] = vectors.T @ spectra[:, start : start + chunk].astype(np.float64)
    basis /= np.linalg.norm(basis, axis=1, keepdims=True)
    return basis, values / max(np.trace(gram), np.finfo(float).tiny)


def template_hdulist(spec: TemplateSpec, basis: np.ndarray, power: np.ndarray, seed: int) -> fits.HDUList:
    """The Redrock template file: BASIS_VECTORS image [n_vectors, n_wave] with its header keys."""
    header = fits.Header()
    if spec.loglam:
        header["CRVAL1"] = (float(np.log10(spec.wave[0])), "log10 first rest wavelength [Angstrom]")
        header["CDELT1"] = (float(np.log10(spec.wave[1] / spec.wave[0])), "log10 wavelength step")
        header["LOGLAM"] = (1, "wavelength grid sampled in log10(lambda)")
    else:
        header["CRVAL1"] = (float(spec.wave[0]), "first rest-frame wavelength [Angstrom]")
        header["CDELT1"] = (float(spec.wave[1] - spec.wave[0]), "wavelength step [Angstrom]")
        header["LOGLAM"] = (0, "wavelength grid linear in lambda")
    header["RRTYPE"] = (spec.rrtype, "Redrock spectral type")
    header["RRSUBTYP"] = ("", "Redrock subtype")
    header["VERSION"] = (VERSION, "template version")
    header["RRMETHOD"] = ("PCA", "linear fit, coefficients of any sign")
    header["RRIGM"] = (spec.igm, "IGM model Redrock applies blueward of Lya")
    header["INSPEC"] = ("specpt_hf.data.mock", "source of the input spectra")
    header["NSPEC"] = (spec.n_spectra, "number of noiseless input spectra")
    header["SEED"] = (int(seed), "seed of the input spectra")
    header["POWER"] = (float(power.sum()), "fraction of the inputs' power in the basis")
    header["EXTNAME"] = "BASIS_VECTORS"
    return fits.HDUList([fits.PrimaryHDU(basis.astype(np.float64), header=header)])


def template_filename(rrtype: str) -> str:
    """`rrtemplate-{RRTYPE}-None-v{VERSION}.fits`: the name Redrock derives from TEMNAM/TEMVER header keys."""
    return f"rrtemplate-{rrtype}-None-v{VERSION}.fits"


def build_templates(
    out_dir: str | os.PathLike,
    *,
    types: Sequence[str] = ("GALAXY", "QSO"),
    n_galaxy: int = 4000,
    n_qso: int = 2000,
    galaxy_vectors: int = 10,
    qso_vectors: int = 4,
    galaxy_step: float = 0.2,
    qso_dlog10: float = 1e-4,
    seed: int = DEFAULT_SEED,
) -> list[Path]:
    """Write the Redrock templates into `out_dir` (a folder to use as RR_TEMPLATE_DIR) and the list file.

    Returns the template paths. `types` is any of GALAXY and QSO.
    """
    unknown = set(types) - {"GALAXY", "QSO"}
    if unknown or not types:
        raise ValueError(f"types must be GALAXY and/or QSO, got {list(types)}")
    out = Path(out_dir)
    paths = []
    for rrtype in types:
        if rrtype == "GALAXY":
            spec = TemplateSpec("GALAXY", galaxy_vectors, n_galaxy, galaxy_grid(galaxy_step), False, "None")
            spectra = galaxy_spectra(spec.n_spectra, seed, spec.wave)
        else:
            spec = TemplateSpec("QSO", qso_vectors, n_qso, qso_grid(qso_dlog10), True, "Calura12")
            spectra = qso_spectra(spec.n_spectra, seed, spec.wave)
        basis, power = pca_basis(spectra, spec.n_vectors)
        del spectra
        hdul = template_hdulist(spec, basis, power, seed)
        path = out / template_filename(rrtype)
        atomic_write(path, lambda tmp, h=hdul: h.writeto(tmp, overwrite=True, checksum=True))
        paths.append(path)
    listing = "# Redrock templates built by benchmarks/redrock_templates.py from the mock physics\n"
    listing += "".join(f"{p.name}\n" for p in paths)
    atomic_write_text(out / LIST_FILE, listing)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Build GALAXY and QSO Redrock templates from the mock's spectral basis."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="template folder (use it as RR_TEMPLATE_DIR)")
    parser.add_argument("--types", nargs="+", default=["GALAXY", "QSO"], choices=["GALAXY", "QSO"])
    parser.add_argument("--n-galaxy", type=int, default=4000, help="noiseless galaxy spectra in the PCA")
    parser.add_argument("--n-qso", type=int, default=2000, help="noiseless quasar spectra in the PCA")
    parser.add_argument("--galaxy-vectors", type=int, default=10, help="GALAXY basis vectors (DESI: 10)")
    parser.add_argument("--qso-vectors", type=int, default=4, help="QSO basis vectors (DESI v1.0: 4)")
    parser.add_argument("--galaxy-step", type=float, default=0.2, help="GALAXY rest-frame pixel (Å)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument(
        "--quick", action="store_true", help="QUICK_SETTINGS: 120 galaxies, 60 quasars, 1 Å grid"
    )
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK_SETTINGS.items():
            setattr(args, name, value)
    for name in ("n_galaxy", "n_qso", "galaxy_vectors", "qso_vectors"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.galaxy_step <= 0:
        parser.error("--galaxy-step must be positive")
    paths = build_templates(
        args.out,
        types=args.types,
        n_galaxy=args.n_galaxy,
        n_qso=args.n_qso,
        galaxy_vectors=args.galaxy_vectors,
        qso_vectors=args.qso_vectors,
        galaxy_step=args.galaxy_step,
        seed=args.seed,
    )
    for path in paths:
        with fits.open(path) as hdul:
            h = hdul["BASIS_VECTORS"].header
            print(
                f"{path}: {h['RRTYPE']} {hdul[0].data.shape[0]} vectors x {h['NAXIS1']} pixels, power {h['POWER']:.6f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
