"""Template chi^2 redshift refinement: rest-frame bases learned from labelled spectra, fitted on each spectrum's own
pixels around the network's candidate redshifts.

>>> templates = build_templates(wavelength, flux, ivar, z, num_vectors=10)  # labelled training spectra
>>> result = refine_redshifts(templates, wavelength, flux, ivar, candidates=torch.log1p(z_net)[:, None])
>>> result.redshift, result.redshift_err, result.chi2, result.delta_chi2

All redshift arithmetic is in u = ln(1 + z): a spectrum at redshift z is the rest-frame template at
ln(lambda) - u. Pixels with ivar = 0 weigh nothing; pixels whose rest wavelength falls outside the templates' grid
weigh nothing and are counted in `RefinementResult.npixels`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SPEED_OF_LIGHT_KMS = 299_792.458
_SCAN_ELEMENTS = 2**24  # template samples per chunk of the chi^2 scan (bounds its memory)


@dataclass
class RestFrameTemplates:
    """A rest-frame basis on a uniform ln(lambda) grid.

    Args:
        log_wavelength_start (`float`): ln(lambda / Angstrom) of the first grid point.
        log_wavelength_step (`float`): grid step in ln(lambda).
        basis (`torch.Tensor` of shape `(vectors, grid)`): the basis vectors (0 where no training spectrum reached).
    """

    log_wavelength_start: float
    log_wavelength_step: float
    basis: torch.Tensor

    @property
    def log_wavelength(self) -> torch.Tensor:
        """ln(lambda / Angstrom) of the grid points, [grid]."""
        index = torch.arange(self.basis.shape[1], dtype=torch.float64)
        return self.log_wavelength_start + index * self.log_wavelength_step  # [grid]


@dataclass
class RefinementResult:
    """Per-spectrum outcome of [`refine_redshifts`], tensors of shape `(batch,)` unless stated.

    Args:
        redshift: z at the parabola's minimum of chi^2(z).
        redshift_err: (1 + z) x the half-width of chi^2 within Delta chi^2 = 1 of the minimum.
        chi2: the best chi^2.
        delta_chi2: chi^2 of the best trial at least `exclusion_kms` away minus the best chi^2 (inf without one).
        coeff (`(batch, vectors)`): the template coefficients at the best trial.
        npixels: pixels that entered the fit at the best trial (ivar > 0 and inside the templates' grid).
    """

    redshift: torch.Tensor
    redshift_err: torch.Tensor
    chi2: torch.Tensor
    delta_chi2: torch.Tensor
    coeff: torch.Tensor
    npixels: torch.Tensor


def _spectrum_norm(flux: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Median |flux| over the good pixels of each spectrum [n] (1 where that is 0)."""
    norm = np.nanmedian(np.where(good, np.abs(flux), np.nan), axis=1)
    return np.where(np.isfinite(norm) & (norm > 0), norm, 1.0)


def build_templates(
    wavelength: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    redshift: np.ndarray,
    num_vectors: int = 10,
    log_wavelength_step: float | None = None,
    iterations: int = 5,
) -> RestFrameTemplates:
    """Learn a rest-frame basis from labelled spectra by weighted PCA (expectation-maximisation: pixels without
    weight are filled with the current reconstruction, then the SVD is repeated).

    Args:
        wavelength: observed wavelengths [pixels], Angstrom.
        flux, ivar: [n, pixels]; ivar = 0 (or non-finite flux) marks a bad pixel.
        redshift: the spectra's redshifts [n].
        num_vectors: basis size.
        log_wavelength_step: rest grid step in ln(lambda); defaults to the finest observed step.
        iterations: EM iterations after the first SVD.
    """
    wavelength = np.asarray(wavelength, dtype=np.float64)
    flux = np.asarray(flux, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    redshift = np.asarray(redshift, dtype=np.float64)
    if flux.shape != ivar.shape or flux.shape[1:] != wavelength.shape or len(redshift) != len(flux):
        raise ValueError(
            f"flux {flux.shape}, ivar {ivar.shape}, wavelength {wavelength.shape} and redshift "
            f"{redshift.shape} do not match"
        )
    if not 1 <= num_vectors <= len(flux):
        raise ValueError(
            f"`num_vectors` must be in [1, {len(flux)}] (the number of spectra), got {num_vectors}"
        )
    log_wave = np.log(wavelength)
    step = log_wavelength_step or float(np.diff(log_wave).min())
    u = np.log1p(redshift)
    start = log_wave[0] - u.max()
    grid = start + step * np.arange(int(math.ceil((log_wave[-1] - u.min() - start) / step)) + 1)  # [grid]

    good = (ivar > 0) & np.isfinite(flux) & np.isfinite(ivar)
    norm = _spectrum_norm(flux, good)[:, None]  # [n, 1]
    rest_flux = np.zeros((len(flux), len(grid)))
    rest_weight = np.zeros((len(flux), len(grid)))
    for i in range(len(flux)):
        observed = grid + u[i]  # rest grid in the spectrum's observed ln(lambda)
        inside = (observed >= log_wave[0]) & (observed <= log_wave[-1])
        values = np.where(good[i], flux[i], 0.0) / norm[i]
        weights = np.where(good[i], ivar[i], 0.0) * norm[i] ** 2
        rest_flux[i] = np.where(inside, np.interp(observed, log_wave, values), 0.0)
        rest_weight[i] = np.where(inside, np.interp(observed, log_wave, weights), 0.0)
        # a rest pixel next to a bad observed pixel is only as good as its worst neighbour
        rest_weight[i] *= np.interp(observed, log_wave, good[i].astype(float)) == 1.0

    covered = rest_weight > 0  # [n, grid]
    mean = (rest_weight * rest_flux).sum(0) / np.maximum(rest_weight.sum(0), 1e-30)  # [grid]
    filled = np.where(covered, rest_flux, mean)
    for _ in range(iterations + 1):
        _, _, vt = np.linalg.svd(filled, full_matrices=False)
        basis = vt[:num_vectors]  # [vectors, grid]
        coeff = _weighted_coefficients(basis, rest_flux, rest_weight)  # [n, vectors]
        filled = np.where(covered, rest_flux, coeff @ basis)
    basis = np.where(covered.any(0), basis, 0.0)
    return RestFrameTemplates(float(grid[0]), step, torch.from_numpy(basis.astype(np.float32)))


def _weighted_coefficients(basis: np.ndarray, flux: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Least-squares coefficients [n, vectors] of each row of `flux` on `basis` under `weight` [n, grid]."""
    a = np.einsum("kg,ng,lg->nkl", basis, weight, basis) + 1e-9 * np.eye(len(basis))  # [n, k, k]
    b = np.einsum("kg,ng,ng->nk", basis, weight, flux)  # [n, k]
    return np.linalg.solve(a, b[..., None])[..., 0]


def _sample_basis(templates: RestFrameTemplates, log_rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear interpolation of the basis at rest ln(lambda) [...]: values [..., vectors] and inside-grid mask."""
    basis = templates.basis.to(log_rest.device)  # [k, grid]
    position = (log_rest - templates.log_wavelength_start) / templates.log_wavelength_step  # [...]
    inside = (position >= 0) & (position <= basis.shape[1] - 1)
    position = position.clamp(0, basis.shape[1] - 1.000001)
    left = position.floor().long()
    frac = (position - left).float()[..., None]  # [..., 1]
    values = basis.T[left] * (1 - frac) + basis.T[left + 1] * frac  # [..., k]
    return values, inside


def chi2_scan(
    templates: RestFrameTemplates,
    wavelength: torch.Tensor,
    flux: torch.Tensor,
    ivar: torch.Tensor,
    trial_u: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """chi^2 of the best linear template fit at each trial u = ln(1 + z).

    Args:
        wavelength: observed wavelengths [pixels] or [batch, pixels], Angstrom.
        flux, ivar: [batch, pixels]; ivar = 0 marks pixels that weigh nothing.
        trial_u: [batch, trials].

    Returns:
        chi2 [batch, trials], coefficients [batch, trials, vectors], fitted pixels [batch, trials].
    """
    batch, pixels = flux.shape
    log_wave = torch.log(wavelength.to(torch.float64)).expand(batch, pixels)  # [batch, pixels]
    weight = torch.where(torch.isfinite(flux) & (ivar > 0), ivar, 0.0).float()  # [batch, pixels]
    flux = torch.where(weight > 0, flux, 0.0).float()  # [batch, pixels]
    chunk = max(1, _SCAN_ELEMENTS // (batch * pixels * templates.basis.shape[0]))
    parts = []
    for trials in trial_u.split(chunk, dim=1):  # [batch, t]
        log_rest = log_wave[:, None, :] - trials.to(torch.float64)[..., None]  # [batch, t, pixels]
        values, inside = _sample_basis(templates, log_rest)  # [batch, t, pixels, k], [batch, t, pixels]
        w = weight[:, None, :] * inside  # [batch, t, pixels]
        weighted = values * w[..., None]  # [batch, t, pixels, k]
        a = torch.einsum("btpk,btpl->btkl", weighted, values).double()  # [batch, t, k, k]
        b = torch.einsum("btpk,bp->btk", weighted, flux).double()  # [batch, t, k]
        a = a + 1e-9 * a.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(
            a.shape[-1], dtype=a.dtype, device=a.device
        )
        coeff = torch.linalg.solve(a, b)  # [batch, t, k]
        total = (w * flux[:, None, :] ** 2).sum(-1, dtype=torch.float64)  # [batch, t], fitted pixels only
        chi2 = total - (b * coeff).sum(-1)  # [batch, t]
        parts.append((chi2, coeff.float(), (w > 0).sum(-1)))
    chi2, coeff, npixels = (torch.cat(part, dim=1) for part in zip(*parts, strict=True))
    return chi2, coeff, npixels


def _parabola(
    u: torch.Tensor, chi2: torch.Tensor, best: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vertex of the parabola through the best trial and its neighbours on a uniform grid: u, sigma_u
    (Delta chi^2 = 1) and chi^2 at the vertex, each [batch]. At the grid's edge the trial itself is kept."""
    step = u[:, 1] - u[:, 0]  # [batch]
    inner = best.clamp(1, u.shape[1] - 2)[:, None]  # [batch, 1]
    c_minus, c_0, c_plus = (chi2.gather(1, inner + shift)[:, 0] for shift in (-1, 0, 1))
    curvature = (c_plus - 2 * c_0 + c_minus) / step**2  # [batch], d2 chi2 / du2
    shift = torch.where(curvature > 0, -(c_plus - c_minus) / (2 * step * curvature), 0.0).clamp(-step, step)
    at_edge = (best == 0) | (best == u.shape[1] - 1)
    u_best = torch.where(at_edge, u.gather(1, best[:, None])[:, 0], u.gather(1, inner)[:, 0] + shift)
    sigma = torch.where(curvature > 0, torch.sqrt(2.0 / curvature.clamp(min=1e-30)), step)
    vertex = torch.where(at_edge, chi2.gather(1, best[:, None])[:, 0], c_0 - 0.5 * curvature * shift**2)
    return u_best, sigma, vertex


def refine_redshifts(
    templates: RestFrameTemplates,
    wavelength: torch.Tensor,
    flux: torch.Tensor,
    ivar: torch.Tensor,
    candidates: torch.Tensor,
    half_width: float = 0.02,
    coarse_step: float = 3e-4,
    fine_step: float = 2e-5,
    exclusion_kms: float = 1000.0,
) -> RefinementResult:
    """Scan chi^2(z) over +-`half_width` in u around each candidate, then a fine grid (+-2 coarse steps, step
    `fine_step`) around the best coarse trial and a parabola at its minimum.

    Args:
        wavelength: [pixels] or [batch, pixels], Angstrom; flux, ivar: [batch, pixels].
        candidates: candidate u = ln(1 + z) per spectrum [batch, modes] (e.g. the p(z) peaks).
    """
    if candidates.dim() != 2 or candidates.shape[0] != flux.shape[0]:
        raise ValueError(f"`candidates` must be [batch, modes], got {tuple(candidates.shape)}")
    device = flux.device
    offsets = torch.arange(-half_width, half_width + coarse_step / 2, coarse_step, device=device)  # [g]
    coarse_u = (candidates.to(torch.float64)[..., None] + offsets.double()).flatten(1)  # [batch, modes * g]
    coarse_chi2, _, _ = chi2_scan(templates, wavelength, flux, ivar, coarse_u)  # [batch, modes * g]
    best = coarse_chi2.argmin(1)  # [batch]
    u_coarse = coarse_u.gather(1, best[:, None])  # [batch, 1]

    fine_offsets = torch.arange(
        -2 * coarse_step, 2 * coarse_step + fine_step / 2, fine_step, device=device
    ).double()  # [f]
    fine_u = u_coarse + fine_offsets  # [batch, f]
    fine_chi2, fine_coeff, fine_npix = chi2_scan(templates, wavelength, flux, ivar, fine_u)  # [batch, f], ...
    fine_best = fine_chi2.argmin(1)  # [batch]
    u_best, sigma_u, chi2 = _parabola(fine_u, fine_chi2, fine_best)

    far = (coarse_u - u_best[:, None]).abs() > exclusion_kms / SPEED_OF_LIGHT_KMS  # [batch, modes * g]
    second = torch.where(far, coarse_chi2, math.inf).min(1).values  # [batch]
    z = torch.expm1(u_best)
    return RefinementResult(
        redshift=z.float(),
        redshift_err=((1 + z) * sigma_u).float(),
        chi2=chi2.float(),
        delta_chi2=(second - chi2).float(),
        coeff=fine_coeff.gather(1, fine_best[:, None, None].expand(-1, 1, fine_coeff.shape[-1]))[:, 0],
        npixels=fine_npix.gather(1, fine_best[:, None])[:, 0],
    )


__all__ = ["RefinementResult", "RestFrameTemplates", "build_templates", "chi2_scan", "refine_redshifts"]
