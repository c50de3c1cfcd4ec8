"""Redrock redshift priors from SpecPT's p(z): `specpt predict --priors-out FILE`, then `rrdesi --priors FILE`.

Redrock (`redrock.priors.Priors`) reads an HDU `PRIORS` with one row per target — TARGETID, Z (the prior's
centre), SIGMA and FUNCTION — and adds the prior to its chi^2(z) before choosing minima. Its FUNCTION is read
from the first row and holds for every target:

- `gaussian` (the default here): Redrock adds ((z - Z) / SIGMA)^2 to chi^2;
- `tophat` (what DESI's QuasarNET afterburner uses): Redrock searches only |z - Z| < SIGMA / 2, so SIGMA is the
  full width of the window. Redrock 0.21's tophat uses `np.NaN`, which numpy 2 removed: with numpy >= 2 it raises
  AttributeError inside rrdesi, hence gaussian by default.

The window is centred on the catalog's Z and holds `coverage` (0.99) of the target's p(z) mass: half-width h =
the distance from Z within which the p(z) bins' mass reaches `coverage` (plus half a bin), at least `min_bins` p(z)
bins. tophat: SIGMA = 2 h; gaussian: SIGMA = h / 2.576 (so ±h is the two-sided 99 % interval). A multi-modal
p(z) gives a window wide enough to hold every mode, so Redrock decides between them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from .atomic import atomic_write

PRIOR_FUNCTIONS = ("tophat", "gaussian")
GAUSSIAN_99 = 2.576  # two-sided 99 % half-width of a unit Gaussian


def prior_halfwidths(
    pz_z: np.ndarray, pz: np.ndarray, z: np.ndarray, coverage: float = 0.99, min_bins: float = 2.0
) -> np.ndarray:
    """Half-widths in z of the windows centred on `z` [rows] holding `coverage` of each row's p(z) mass.

    Args:
        pz_z: the p(z) bin centres [bins], uniform in ln(1 + z).
        pz: the probability of each bin [rows, bins] (rows sum to 1; NaN rows give NaN).
        z: the windows' centres [rows].
        coverage: the p(z) mass each window must hold, in (0, 1].
        min_bins: the least half-width, in p(z) bins at `z`.
    """
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"`coverage` must be in (0, 1], got {coverage}")
    pz_z, pz, z = np.asarray(pz_z, np.float64), np.asarray(pz, np.float64), np.asarray(z, np.float64)
    if pz.ndim != 2 or pz.shape != (len(z), len(pz_z)):
        raise ValueError(f"`pz` must be [rows={len(z)}, bins={len(pz_z)}], got {pz.shape}")
    du = float(np.mean(np.diff(np.log1p(pz_z))))  # bin width in ln(1 + z)
    half_bin = 0.5 * du * (1.0 + pz_z)  # [bins], half a bin in z
    distance = np.abs(pz_z[None] - z[:, None]) + half_bin[None]  # [rows, bins], to each bin's far edge
    order = np.argsort(distance, axis=1)  # [rows, bins], nearest first
    mass = np.cumsum(np.take_along_axis(pz, order, axis=1), axis=1)  # [rows, bins]
    reach = np.argmax(mass >= coverage * (1.0 - 1e-6) * mass[:, -1:], axis=1)  # [rows]
    half = np.take_along_axis(distance, np.take_along_axis(order, reach[:, None], axis=1), axis=1)[:, 0]
    half = np.maximum(half, min_bins * du * (1.0 + z))
    return np.where(np.isfinite(pz).all(axis=1) & np.isfinite(z), half, np.nan)


def write_priors(
    path: str | os.PathLike,
    targetid: np.ndarray,
    z: np.ndarray,
    halfwidth: np.ndarray,
    function: str = "gaussian",
) -> Path:
    """Write Redrock's priors file (HDU PRIORS: TARGETID, Z, SIGMA, FUNCTION) atomically; rows whose window is
    not finite (no p(z)) are left out, so Redrock fits those targets without a prior."""
    if function not in PRIOR_FUNCTIONS:
        raise ValueError(f"prior function must be one of {PRIOR_FUNCTIONS}, got {function!r}")
    keep = np.isfinite(z) & np.isfinite(halfwidth)
    sigma = 2.0 * halfwidth if function == "tophat" else halfwidth / GAUSSIAN_99
    table = Table(
        {
            "TARGETID": np.asarray(targetid, np.int64)[keep],
            "Z": np.asarray(z, np.float64)[keep],
            "SIGMA": np.asarray(sigma, np.float64)[keep],
            "FUNCTION": np.full(int(keep.sum()), function),
        }
    )
    hdu = fits.table_to_hdu(table)
    hdu.name = "PRIORS"
    return atomic_write(path, lambda tmp: fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(tmp, overwrite=True))
