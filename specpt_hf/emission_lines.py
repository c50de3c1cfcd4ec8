"""The [O II] λλ3727, 3730 doublet's flux at a given redshift, as DESI measures it for its ELG redshift cut.

DESI calls an ELG redshift secure when log10(FOII_SNR) > 0.9 - 0.2 log10(DELTACHI2) (Raichoor et al. 2023, AJ 165,
126, section 3.2): a faint emission-line galaxy's redshift rests on its [O II] doublet, so a fit whose redshift
puts no significant doublet where [O II] should be is not trusted unless its DELTACHI2 is large. `oii_flux` fits,
at each spectrum's redshift, two Gaussians at the doublet's observed wavelengths (free amplitudes, so any line
ratio) on a local linear continuum, by ivar-weighted linear least squares over a window of ±`HALF_WINDOW` Å
(observed); the flux is the sum of the two amplitudes.

Shipped with the model as remote code: it imports only numpy.
"""

from __future__ import annotations

import numpy as np

OII_VACUUM = (3727.092, 3729.875)  # Å, vacuum rest wavelengths of the doublet
SIGMA_KMS = 70.0  # the lines' velocity dispersion assumed by the fit (DESI ELGs: ~50-80 km/s)
HALF_WINDOW = 40.0  # Å (observed) either side of the doublet's centre: lines plus continuum
MIN_LINE_PIXELS = 4  # good pixels within 2 sigma of each line for a measurement


def oii_flux(
    wave: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    good: np.ndarray,
    z: np.ndarray,
    sigma_instrument: float,
) -> tuple[np.ndarray, np.ndarray]:
    """[O II] doublet flux and its inverse variance [n] at redshifts `z` [n], from spectra on a linear grid.

    Args:
        wave: pixel centres [pixels] (Å, vacuum, evenly spaced).
        flux, ivar, good: [n, pixels]; `good` False where a pixel is unusable (weightless).
        z: the redshift of each spectrum [n] (NaN: no measurement).
        sigma_instrument: the instrument's Gaussian line-spread sigma (Å), added in quadrature to `SIGMA_KMS`.

    Returns:
        `flux` (1e-17 erg/s/cm² when `flux` is in 1e-17 erg/s/cm²/Å) and `flux_ivar` [n], float64; NaN where the
        doublet falls off the grid or too few good pixels cover either line.
    """
    n = len(flux)
    step = float(wave[1] - wave[0])
    half = int(np.ceil(HALF_WINDOW / step))
    centre = np.outer(1.0 + np.nan_to_num(z, nan=-1.0), OII_VACUUM)  # [n, 2] observed line centres
    mid = np.rint((centre.mean(axis=1) - wave[0]) / step).astype(
        np.int64
    )  # [n] pixel of the doublet's middle
    pixels = mid[:, None] + np.arange(-half, half + 1)  # [n, w]
    inside = (pixels >= 0) & (pixels < len(wave))
    pixels = np.clip(pixels, 0, len(wave) - 1)
    lam = wave[pixels]  # [n, w]
    rows = np.arange(n)[:, None]
    weight = np.where(inside & good[rows, pixels], ivar[rows, pixels], 0.0).astype(np.float64)  # [n, w]
    data = flux[rows, pixels].astype(np.float64)  # [n, w]

    sigma = np.hypot(centre * SIGMA_KMS / 299792.458, sigma_instrument)  # [n, 2]
    offset = (lam[:, None, :] - centre[:, :, None]) / sigma[:, :, None]  # [n, 2, w]
    lines = np.exp(-0.5 * offset**2) / (np.sqrt(2.0 * np.pi) * sigma[:, :, None])  # unit-flux Gaussians
    slope = (lam - centre.mean(axis=1, keepdims=True)) / HALF_WINDOW  # [n, w]
    design = np.concatenate([lines, np.ones_like(slope)[:, None], slope[:, None]], axis=1)  # [n, 4, w]

    covered = ((np.abs(offset) < 2.0) & (weight[:, None, :] > 0)).sum(axis=2)  # [n, 2]
    valid = (
        np.isfinite(z)
        & (centre[:, 0] - wave[0] > 2.0 * sigma[:, 0])
        & (wave[-1] - centre[:, 1] > 2.0 * sigma[:, 1])
        & (covered >= MIN_LINE_PIXELS).all(axis=1)
    )
    normal = np.einsum("npw,nqw,nw->npq", design, design, weight)  # [n, 4, 4]
    rhs = np.einsum("npw,nw,nw->np", design, weight, data)  # [n, 4]
    normal[~valid] = np.eye(4)  # placeholders: their answer is replaced by NaN below
    valid &= np.linalg.cond(normal) < 1e12
    normal[~valid] = np.eye(4)
    covariance = np.linalg.inv(normal)  # [n, 4, 4]
    amplitude = np.einsum("npq,nq->np", covariance, rhs)  # [n, 4]
    total = amplitude[:, 0] + amplitude[:, 1]
    variance = covariance[:, 0, 0] + covariance[:, 1, 1] + 2.0 * covariance[:, 0, 1]
    with np.errstate(divide="ignore"):
        flux_ivar = 1.0 / variance
    return np.where(valid, total, np.nan), np.where(valid, flux_ivar, np.nan)


def desi_elg_secure(oii_flux: np.ndarray, oii_flux_ivar: np.ndarray, delta_chi2: np.ndarray) -> np.ndarray:
    """DESI's ELG redshift criterion [n] (bool): log10(FOII_SNR) > 0.9 - 0.2 log10(DELTACHI2), FOII_SNR the
    doublet's flux times the square root of its inverse variance; False where either is NaN or not positive."""
    snr = oii_flux * np.sqrt(oii_flux_ivar)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log10(snr) > 0.9 - 0.2 * np.log10(delta_chi2)
