"""Template chi^2 redshift refinement: rest-frame bases learned from labelled spectra, fitted on each spectrum's own
pixels around the network's candidate redshifts.

>>> templates = build_templates(wavelength, flux, ivar, z, num_vectors=10)  # labelled training spectra
>>> result = refine_redshifts(templates, wavelength, flux, ivar, candidates=torch.log1p(z_net)[:, None])
>>> result.redshift, result.redshift_err, result.chi2, result.delta_chi2

All redshift arithmetic is in u = ln(1 + z): a spectrum at redshift z is the rest-frame template at
ln(lambda) - u. Pixels with ivar = 0 weigh nothing; pixels whose rest wavelength falls outside the templates' grid
weigh nothing and are counted in `RefinementResult.npixels`.

Archetypes ([`archetype_curve`], [`archetype_redshifts`]) are whole rest-frame spectra, each fitted with one free
positive amplitude and a calibration polynomial: their whole-range chi^2(z) judges the fits a basis is unsure of.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_write

SPEED_OF_LIGHT_KMS = 299_792.458
STAR_VELOCITY_KMS = 1000.0  # STAR templates are fitted within +-this line-of-sight velocity
SMOOTH_DEGREE = 4  # Legendre degree in ln(lambda) of the redshift-free continuum of `smooth_chi2`
# Elements of the largest intermediate per chunk of the chi^2 scan and curve. On a CPU the chunks are sized to stay
# in cache: 2^24-element chunks ran 2.4x (scan) and 1.5x (curve) slower on 2 Xeon cores; elsewhere they only bound
# the memory.
_CPU_SCAN_ELEMENTS = {"scan": 2**20, "curve": 2**22}
_SCAN_ELEMENTS = 2**24


def _chunk_elements(device: torch.device, kind: str) -> int:
    """Elements per chunk of the `kind` ("scan" or "curve") computation on `device`."""
    return _CPU_SCAN_ELEMENTS[kind] if device.type == "cpu" else _SCAN_ELEMENTS


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
    cache: dict = field(default_factory=dict, repr=False, compare=False)  # derived tables, by device

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
        delta_chi2: chi^2 (+ prior) of the lowest local minimum of the coarse curve at least `exclusion_kms`
            away minus the best one's, as Redrock's DELTACHI2 (inf without one).
        coeff (`(batch, vectors)`): the template coefficients at the best trial.
        npixels: pixels that entered the fit at the best trial (ivar > 0 and inside the templates' grid).
        spectype: index of the winning template set.
        prior: the priors' chi^2 penalty at the chosen trial (p(z) and type; 0 without a prior).
        scan_u (`(trials,)`), scan_chi2 (`(batch, trials)`): the coarse chi^2(z) curve (u = ln(1 + z); binned
            pixels) of the set chosen at each trial: the lowest chi^2 + `set_prior` (the lowest chi^2 without one).
    """

    redshift: torch.Tensor
    redshift_err: torch.Tensor
    chi2: torch.Tensor
    delta_chi2: torch.Tensor
    coeff: torch.Tensor
    npixels: torch.Tensor
    spectype: torch.Tensor
    prior: torch.Tensor
    scan_u: torch.Tensor
    scan_chi2: torch.Tensor


def _spectrum_norm(flux: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Median |flux| over the good pixels of each spectrum [n] (1 where that is 0)."""
    norm = np.nanmedian(np.where(good, np.abs(flux), np.nan), axis=1)
    return np.where(np.isfinite(norm) & (norm > 0), norm, 1.0)


LANCZOS_MIN_SPECTRA = 500  # `build_templates` with this many spectra or more: top eigenvectors by Lanczos


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
    flux = np.asarray(flux, dtype=np.float32)
    ivar = np.asarray(ivar, dtype=np.float32)
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
    # [n, grid] float32: the spectra in their rest frames are the memory of this function (9,000 spectra on a
    # 24,000-point grid: 0.9 GB per array)
    rest_flux = np.zeros((len(flux), len(grid)), dtype=np.float32)
    rest_weight = np.zeros((len(flux), len(grid)), dtype=np.float32)
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
    mean = (rest_weight * rest_flux).sum(0, dtype=np.float64) / np.maximum(
        rest_weight.sum(0, dtype=np.float64), 1e-30
    )  # [grid]
    filled = np.where(covered, rest_flux, mean.astype(np.float32))  # [n, grid]
    for _ in range(iterations + 1):
        basis = _principal_components(filled, num_vectors)  # [vectors, grid]
        coeff = _weighted_coefficients(basis, rest_flux, rest_weight)  # [n, vectors]
        np.copyto(filled, coeff.astype(np.float32) @ basis, where=~covered)
    basis = np.where(covered.any(0), basis, 0.0)
    return RestFrameTemplates(float(grid[0]), step, torch.from_numpy(basis.astype(np.float32)))


def smooth_templates(templates: RestFrameTemplates, smoothing_kms: float) -> RestFrameTemplates:
    """The set with each basis vector convolved with a Gaussian of `smoothing_kms` over the covered grid points
    (non-zero in some vector; the kernel renormalised at the edges of that range); the set itself for 0."""
    if smoothing_kms <= 0:
        return templates
    from astropy.convolution import Gaussian1DKernel, convolve

    basis = templates.basis.double().cpu().numpy()  # [vectors, grid]
    inside = (basis != 0).any(0)  # [grid]
    kernel = Gaussian1DKernel(smoothing_kms / SPEED_OF_LIGHT_KMS / templates.log_wavelength_step)
    rows = np.where(inside, basis, np.nan)
    smoothed = np.stack([convolve(row, kernel, boundary="extend", preserve_nan=True) for row in rows])
    basis = torch.from_numpy(np.where(inside, smoothed, 0.0).astype(np.float32)).to(templates.basis.device)
    return RestFrameTemplates(templates.log_wavelength_start, templates.log_wavelength_step, basis)


def _smoothed(templates: RestFrameTemplates, smoothing_kms: float) -> RestFrameTemplates:
    """[`smooth_templates`], cached on the set."""
    key = ("smoothed", float(smoothing_kms))
    if key not in templates.cache:
        templates.cache[key] = smooth_templates(templates, smoothing_kms)
    return templates.cache[key]


def _principal_components(data: np.ndarray, num_vectors: int) -> np.ndarray:
    """The leading right singular vectors [vectors, grid] of `data` [n, grid], from the top eigenvectors of the
    n x n Gram matrix (n spectra << grid points): by Lanczos (ARPACK, to machine precision, fixed start vector)
    for `LANCZOS_MIN_SPECTRA` spectra or more, where a full `eigh` would cost O(n^3), else by `eigh`."""
    gram = (data @ data.T).astype(np.float64)  # [n, n]
    if len(gram) >= LANCZOS_MIN_SPECTRA:
        from scipy.sparse.linalg import eigsh

        values, vectors = eigsh(gram, k=num_vectors, which="LA", v0=np.ones(len(gram)), tol=0)
    else:
        values, vectors = np.linalg.eigh(gram)
    order = np.argsort(values)[::-1][:num_vectors]  # descending
    top = vectors[:, order] / np.sqrt(np.maximum(values[order], 1e-300))  # [n, vectors]
    return top.T.astype(data.dtype) @ data  # [vectors, grid], orthonormal rows


def _weighted_coefficients(
    basis: np.ndarray, flux: np.ndarray, weight: np.ndarray, chunk: int = 1024
) -> np.ndarray:
    """Least-squares coefficients [n, vectors] (float64) of each row of `flux` on `basis` under `weight` [n, grid],
    `chunk` rows at a time in float64 (no [n, vectors, grid] product, no float64 copy of the inputs)."""
    k = len(basis)
    basis = basis.astype(np.float64)
    pairs = (basis[:, None, :] * basis[None, :, :]).reshape(k * k, -1)  # [k * k, grid]
    parts = []
    for start in range(0, len(flux), chunk):
        w = weight[start : start + chunk].astype(np.float64, copy=False)  # [chunk, grid]
        a = (w @ pairs.T).reshape(-1, k, k) + 1e-9 * np.eye(k)  # [chunk, k, k]
        b = (w * flux[start : start + chunk]) @ basis.T  # [chunk, k]
        parts.append(np.linalg.solve(a, b[..., None])[..., 0])
    return np.concatenate(parts)


def _interpolation_table(templates: RestFrameTemplates, device: torch.device) -> torch.Tensor:
    """[grid, 2 x vectors]: each grid point's basis values and the slopes to the next point (cached)."""
    key = ("table", str(device))
    if key not in templates.cache:
        values = templates.basis.T.float()  # [grid, k]
        slopes = torch.diff(values, dim=0, append=values[-1:])  # [grid, k]
        templates.cache[key] = torch.cat([values, slopes], 1).contiguous().to(device)
    return templates.cache[key]


def _sample_basis(templates: RestFrameTemplates, log_rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear interpolation of the basis at rest ln(lambda) [...]: values [..., vectors] and inside-grid mask."""
    table = _interpolation_table(templates, log_rest.device)  # [grid, 2k]
    grid, k = table.shape[0], table.shape[1] // 2
    position = (log_rest - templates.log_wavelength_start) / templates.log_wavelength_step  # [...]
    inside = (position >= 0) & (position <= grid - 1)
    position = position.clamp(0, grid - 1).float()
    left = position.floor()
    rows = torch.index_select(table, 0, left.long().flatten()).view(*left.shape, 2 * k)  # [..., 2k]
    return torch.addcmul(rows[..., :k], rows[..., k:], (position - left)[..., None]), inside


def _solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Coefficients [..., k] of the normal equations a [..., k, k] x = b [..., k] (float64; a tiny ridge keeps
    trials with little coverage solvable; a trial whose system stays singular gets coefficients 0, no fit)."""
    ridge = 1e-9 * a.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=1e-30)  # [...]
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    coeff, info = torch.linalg.solve_ex(a + ridge[..., None, None] * eye, b)
    return torch.where((info == 0)[..., None] & torch.isfinite(coeff), coeff, 0.0)


def _fit_reduction(packed: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """b^T a^-1 b [...] (float64), the chi^2 a best linear fit removes, for symmetric normal matrices a given by
    their upper triangles `packed` [k(k+1)/2, ...] (rows of `torch.triu_indices` order; any float dtype) and
    b [k, ...].

    An LDL^T elimination vectorised over the n systems (each step one in-place update of a row of every matrix),
    in float64 with a tiny ridge on the diagonal: batched LAPACK calls cost about a microsecond per 10 x 10 matrix
    on a CPU, this a few tens of nanoseconds. A system with a pivot <= 0 (not positive definite) is solved by
    [`_solve`] instead."""
    k = b.shape[0]
    starts = [row * k - row * (row - 1) // 2 for row in range(k)]  # index of (row, row) in `packed`
    a = packed.to(torch.float64, memory_format=torch.contiguous_format, copy=True)  # [pairs, ...], eliminated
    rhs = b.to(torch.float64, memory_format=torch.contiguous_format, copy=True)  # [k, ...]
    a[starts] += 1e-9 * a[starts].mean(0).clamp(min=1e-30)
    reduction = torch.zeros_like(rhs[0])  # [...]
    positive = torch.ones_like(reduction, dtype=torch.bool)  # [...]
    for j in range(k):
        pivot = a[starts[j]]  # [...]
        positive &= pivot > 0
        inverse = pivot.reciprocal()
        reduction.addcmul_(rhs[j] * rhs[j], inverse)
        for i in range(j + 1, k):
            factor = a[starts[j] + i - j] * inverse  # [...], a_ji / a_jj
            a[starts[i] : starts[i] + k - i].addcmul_(
                factor, a[starts[j] + i - j : starts[j] + k - j], value=-1.0
            )
            rhs[i].addcmul_(factor, rhs[j], value=-1.0)
    failed = ~positive | ~torch.isfinite(reduction)
    if failed.any():
        full = packed[:, failed].double().T[:, _pair_index(k, packed.device)].view(-1, k, k)  # [failed, k, k]
        right = b[:, failed].double().T  # [failed, k]
        solution = _solve(full, right)  # [failed, k]
        reduction[failed] = sum(right[:, i] * solution[:, i] for i in range(k))  # in one order for any batch
    return reduction


def _good_weight(flux: torch.Tensor, ivar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (ivar, 0 at bad pixels) and flux (0 at bad pixels), float64 [batch, pixels]."""
    weight = torch.where(torch.isfinite(flux) & torch.isfinite(ivar) & (ivar > 0), ivar, 0.0).double()
    return weight, torch.where(weight > 0, flux, 0.0).double()


def chi2_scan(
    templates: RestFrameTemplates,
    wavelength: torch.Tensor,
    flux: torch.Tensor,
    ivar: torch.Tensor,
    trial_u: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """chi^2 of the best linear template fit at each trial u = ln(1 + z), on the spectrum's own pixels, over every
    good pixel: a pixel whose rest wavelength falls outside the templates' grid counts with a model of 0, so
    trials stay comparable.

    Args:
        wavelength: observed wavelengths [pixels] or [batch, pixels], Angstrom.
        flux, ivar: [batch, pixels]; ivar = 0 marks pixels that weigh nothing.
        trial_u: [batch, trials].

    Returns:
        chi2 [batch, trials], coefficients [batch, trials, vectors], fitted pixels [batch, trials].
    """
    batch, pixels = flux.shape
    log_wave = torch.log(wavelength.to(torch.float64)).expand(batch, pixels)  # [batch, pixels]
    weight, flux = (x.float() for x in _good_weight(flux, ivar))  # [batch, pixels]
    per_trial = pixels * templates.basis.shape[0]  # basis samples of one spectrum at one trial
    elements = _chunk_elements(flux.device, "scan")
    trial_chunk = max(1, elements // per_trial)
    row_chunk = max(1, elements // (per_trial * trial_u.shape[1]))
    parts = []
    for rows in torch.arange(batch, device=flux.device).split(row_chunk):
        row_parts = [
            _fit_trials(templates, log_wave[rows], weight[rows], flux[rows], trials)
            for trials in trial_u[rows].split(trial_chunk, dim=1)  # [rows, t]
        ]
        parts.append([torch.cat(part, dim=1) for part in zip(*row_parts, strict=True)])
    chi2, coeff, npixels = (torch.cat(part) for part in zip(*parts, strict=True))
    return chi2, coeff, npixels


def _fit_trials(
    templates: RestFrameTemplates,
    log_wave: torch.Tensor,
    weight: torch.Tensor,
    flux: torch.Tensor,
    trial_u: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """chi^2 of the best linear fit [b, t] (float64), its coefficients [b, t, k] and fitted pixels [b, t] for
    spectra at log_wave (float64), weight, flux (float32, 0 at bad pixels) [b, pixels] and trials u [b, t].

    chi^2 is summed from the residuals, not as sum(w f^2) - b^T a^-1 b: at high S/N those two terms are ~1e4 times
    chi^2, and float32 normal equations would leave errors of order 10 in their difference."""
    log_rest = log_wave[:, None, :] - trial_u.to(torch.float64)[..., None]  # [b, t, pixels]
    values, inside = _sample_basis(templates, log_rest)  # [b, t, pixels, k], [b, t, pixels]
    w = weight[:, None, :] * inside  # [b, t, pixels]
    weighted = values * w[..., None]  # [b, t, pixels, k]
    a = (weighted.transpose(-1, -2) @ values).double()  # [b, t, k, k]
    b = (weighted.transpose(-1, -2) @ flux[:, None, :, None])[..., 0].double()  # [b, t, k]
    coeff = _solve(a, b).float()  # [b, t, k]
    model = (values @ coeff[..., None])[..., 0] * inside  # [b, t, pixels]; 0 outside the templates' grid
    chi2 = (weight[:, None, :] * (flux[:, None, :] - model) ** 2).sum(-1, dtype=torch.float64)  # [b, t]
    return chi2, coeff, (w > 0).sum(-1)


def _coarse_basis(templates: RestFrameTemplates, rebin: int) -> tuple[torch.Tensor, float, float]:
    """The basis averaged over `rebin` grid points [k, coarse grid] (float64), its first ln(lambda) and step."""
    k, grid = templates.basis.shape
    n = grid // rebin
    basis = templates.basis.double()[:, : n * rebin].reshape(k, n, rebin).mean(-1)  # [k, n]
    start = templates.log_wavelength_start + (rebin - 1) / 2 * templates.log_wavelength_step
    return basis, start, rebin * templates.log_wavelength_step


def _fft_length(n: int) -> int:
    """The smallest 2^a 3^b >= n (fast FFT sizes)."""
    return min(2**a * 3**b for a in range(n.bit_length() + 1) for b in range(4) if 2**a * 3**b >= n)


def _template_spectra(
    templates: RestFrameTemplates, rebin: int, length: int, device: torch.device
) -> torch.Tensor:
    """rfft [k(k+1)/2 + k, length // 2 + 1] of the products basis_k x basis_l (k <= l), then of basis_k, on the
    coarse grid (cached per rebin, FFT length and device)."""
    key = ("fft", rebin, length, str(device))
    if key not in templates.cache:
        basis, _, _ = _coarse_basis(templates, rebin)  # [k, n]
        upper = torch.triu_indices(len(basis), len(basis))  # [2, k(k+1)/2]
        signals = torch.cat([basis[upper[0]] * basis[upper[1]], basis])  # [k(k+1)/2 + k, n]
        templates.cache[key] = torch.fft.rfft(signals.float().to(device), n=length)
    return templates.cache[key]


def chi2_curve(
    templates: RestFrameTemplates,
    wavelength: torch.Tensor,
    flux: torch.Tensor,
    ivar: torch.Tensor,
    u_range: tuple[float, float],
    rebin: int = 3,
    trials: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """chi^2(z) of the best linear template fit at every step of `rebin` template grid points over
    u = ln(1 + z) in `u_range`, for each spectrum at once: the spectrum is binned onto the templates' coarse
    ln(lambda) grid (inverse-variance weighted) and the normal equations of all trial redshifts come from
    FFT cross-correlations (float32) of its weights with the basis products.

    Args:
        trials: [batch, t] indices into the u grid: solve only there (default: everywhere).

    Returns:
        u [grid] (float64) and chi2 [batch, grid or t] (float64; pixels outside the templates count with model 0).
    """
    basis, start, step = _coarse_basis(templates, rebin)  # [k, n]
    k, n_rest = basis.shape
    batch, pixels = flux.shape
    device = flux.device
    weight, flux = _good_weight(flux, ivar)  # [batch, pixels]
    log_wave = torch.log(wavelength.to(device, torch.float64)).expand(batch, pixels)
    index = torch.round((log_wave - start) / step).long()  # [batch, pixels], on the templates' coarse grid
    first = int(index.min())
    n_obs = int(index.max()) - first + 1
    binned_w = torch.zeros(batch, n_obs, dtype=torch.float64, device=device).scatter_add_(
        1, index - first, weight
    )
    binned_wf = torch.zeros_like(binned_w).scatter_add_(1, index - first, weight * flux)  # [batch, n_obs]
    total = (binned_wf**2 / binned_w.clamp(min=1e-300)).sum(-1)  # [batch]

    length = _fft_length(n_obs + n_rest - 1)  # no circular wrap-around
    spectra = _template_spectra(templates, rebin, length, device)  # [m, length // 2 + 1], complex64
    r = torch.arange(math.ceil(u_range[0] / step), math.floor(u_range[1] / step) + 1, device=device)  # [grid]
    lag = (first - r) % length  # [grid]: observed bin i meets template bin i + first - r
    lag = lag.expand(batch, -1) if trials is None else lag[trials]  # [batch, t]
    pairs = k * (k + 1) // 2
    chi2 = []
    chunk = max(1, _chunk_elements(device, "curve") // (len(spectra) * length))
    for rows in torch.arange(batch, device=device).split(chunk):
        x = torch.fft.rfft(torch.stack([binned_w[rows], binned_wf[rows]], 1).float(), n=length)  # [b, 2, f]
        at = lag[rows, None]  # [b, 1, t]
        corr_a = torch.fft.irfft(x[:, :1].conj() * spectra[None, :pairs], n=length)  # [b, pairs, length]
        corr_b = torch.fft.irfft(x[:, 1:].conj() * spectra[None, pairs:], n=length)  # [b, k, length]
        corr_a = corr_a.gather(2, at.expand(-1, pairs, -1)).transpose(0, 1)  # [pairs, b, t]
        corr_b = corr_b.gather(2, at.expand(-1, k, -1)).transpose(0, 1)  # [k, b, t]
        chi2.append(total[rows, None] - _fit_reduction(corr_a, corr_b))  # [b, t]
    return r.double() * step, torch.cat(chi2)


def _pair_index(k: int, device: torch.device) -> torch.Tensor:
    """[k * k]: for entry (i, j) of a k x k symmetric matrix, its index among the upper-triangle pairs in
    `torch.triu_indices` order."""
    upper = torch.triu_indices(k, k)
    index = torch.zeros(k, k, dtype=torch.long)
    index[upper[0], upper[1]] = torch.arange(upper.shape[1])
    index[upper[1], upper[0]] = torch.arange(upper.shape[1])
    return index.flatten().to(device)


def _parabola(u: torch.Tensor, chi2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vertex of the parabola through three equally spaced trials u [batch, 3], chi2 [batch, 3]: u (at most two
    steps from the middle trial), sigma_u (Delta chi^2 = 1) and chi^2 there, each [batch]. Where chi^2 is not
    convex the lowest trial is kept."""
    step = u[:, 1] - u[:, 0]  # [batch]
    c_minus, c_0, c_plus = chi2.unbind(1)
    curvature = (c_plus - 2 * c_0 + c_minus) / step**2  # [batch], d2 chi2 / du2
    convex = curvature > 0
    slope = (c_plus - c_minus) / (2 * step)  # [batch], d chi2 / du at the middle trial
    shift = (-slope / curvature).clamp(-2 * step, 2 * step)  # [batch]
    lowest = chi2.argmin(1, keepdim=True)  # [batch, 1]
    u_best = torch.where(convex, u[:, 1] + shift, u.gather(1, lowest)[:, 0])
    sigma = torch.where(convex, torch.sqrt(2.0 / curvature.clamp(min=1e-30)), step)
    at_vertex = c_0 + slope * shift + 0.5 * curvature * shift**2  # [batch]
    vertex = torch.where(convex, at_vertex, chi2.gather(1, lowest)[:, 0])
    return u_best, sigma, vertex


def _coarse_vertex(scan_u: torch.Tensor, scan_chi2: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """u [batch] of the parabola's vertex through the best coarse trial and its two neighbours (within one step
    of the trial), or the trial itself where a neighbour was not searched or chi^2 is not convex there."""
    step = scan_u[1] - scan_u[0]
    inner = best.clamp(1, len(scan_u) - 2)  # [batch]
    c_minus, c_0, c_plus = (scan_chi2.gather(1, (inner + shift)[:, None])[:, 0] for shift in (-1, 0, 1))
    curvature = c_plus - 2 * c_0 + c_minus  # [batch], in steps
    usable = (inner == best) & torch.isfinite(c_minus + c_plus) & (curvature > 0)
    shift = torch.where(usable, -(c_plus - c_minus) / (2 * curvature), 0.0).nan_to_num(0.0).clamp(-1, 1)
    return scan_u[best] + shift * step


def _searched_curve(
    templates: RestFrameTemplates,
    wavelength: torch.Tensor,
    flux: torch.Tensor,
    ivar: torch.Tensor,
    u_range: tuple[float, float],
    rebin: int,
    searched: torch.Tensor,
) -> torch.Tensor:
    """[`chi2_curve`] solved only at the `searched` trials ([batch, grid] bool), inf elsewhere [batch, grid]."""
    count = searched.sum(1)  # [batch]
    trials = torch.sort(searched.float(), dim=1, descending=True, stable=True).indices[
        :, : int(count.max())
    ]  # [batch, t]
    _, chi2 = chi2_curve(templates, wavelength, flux, ivar, u_range, rebin, trials)  # [batch, t]
    valid = torch.arange(trials.shape[1], device=flux.device)[None] < count[:, None]  # [batch, t]
    full = torch.full(searched.shape, math.inf, dtype=chi2.dtype, device=flux.device)
    return full.scatter(1, trials, torch.where(valid, chi2, math.inf))


def _leading(templates: RestFrameTemplates, vectors: int | None) -> RestFrameTemplates:
    """The set's first `vectors` basis vectors as a set of its own (cached), or the set itself."""
    if vectors is None or vectors >= templates.basis.shape[0]:
        return templates
    key = ("leading", vectors)
    if key not in templates.cache:
        basis = templates.basis[:vectors].clone()
        templates.cache[key] = RestFrameTemplates(
            templates.log_wavelength_start, templates.log_wavelength_step, basis
        )
    return templates.cache[key]


def scan_grid(
    template_sets: dict[str, RestFrameTemplates], u_range: tuple[float, float], rebin: int
) -> torch.Tensor:
    """The u = ln(1 + z) trials of the coarse chi^2 curve: multiples of `rebin` template ln(lambda) steps inside
    `u_range`, float64 [grid]."""
    steps = {t.log_wavelength_step for t in template_sets.values()}
    if len(steps) != 1:
        raise ValueError(f"template sets must share one ln(lambda) step, got {sorted(steps)}")
    step = rebin * steps.pop()
    return torch.arange(math.ceil(u_range[0] / step), math.floor(u_range[1] / step) + 1).double() * step


def _windows(scan_u: torch.Tensor, candidates: torch.Tensor, half_width: float) -> torch.Tensor:
    """[batch, grid] bool: trials of the uniform grid `scan_u` [grid] within `half_width` of any candidate
    [batch, modes] (NaN: none), from each window's first and last index (no [batch, modes, grid] comparison)."""
    n = len(scan_u)
    step = float(scan_u[1] - scan_u[0]) if n > 1 else 1.0
    position = (candidates - float(scan_u[0])) / step  # [batch, modes], in steps
    finite = torch.isfinite(position)
    position = position.nan_to_num(0.0)
    first = torch.ceil(position - half_width / step).clamp(0, n).long()  # [batch, modes]
    end = (torch.floor(position + half_width / step) + 1).clamp(0, n).long()  # [batch, modes], exclusive
    inside = (finite & (end > first)).long()  # [batch, modes]
    edges = torch.zeros(len(candidates), n + 1, dtype=torch.long, device=scan_u.device)
    edges.scatter_add_(1, first, inside).scatter_add_(1, end, -inside)
    return edges.cumsum(1)[:, :n] > 0


def star_range(velocity_kms: float = STAR_VELOCITY_KMS) -> tuple[float, float]:
    """The u = ln(1 + z) range of a star moving at up to `velocity_kms` along the line of sight."""
    beta = velocity_kms / SPEED_OF_LIGHT_KMS
    return 0.5 * math.log((1 - beta) / (1 + beta)), 0.5 * math.log((1 + beta) / (1 - beta))


def scan_span(
    u_range: tuple[float, float], own_ranges: dict[str, tuple[float, float]] | None = None
) -> tuple[float, float]:
    """The u range the coarse grid covers: `u_range` and every set's own range."""
    ranges = [u_range, *(own_ranges or {}).values()]
    return min(low for low, _ in ranges), max(high for _, high in ranges)


def refine_redshifts(
    template_sets: dict[str, RestFrameTemplates],
    wavelength: torch.Tensor,
    flux: torch.Tensor,
    ivar: torch.Tensor,
    candidates: torch.Tensor,
    half_width: float,
    u_range: tuple[float, float],
    everywhere: torch.Tensor | None = None,
    prior: torch.Tensor | None = None,
    set_prior: dict[str, torch.Tensor] | None = None,
    own_ranges: dict[str, tuple[float, float]] | None = None,
    coarse_vectors: int | None = None,
    fine_smoothing_kms: dict[str, float] | None = None,
    rebin: int = 3,
    fine_step: float = 2e-4,
    fine_trials: int = 7,
    exclusion_kms: float = 1000.0,
) -> RefinementResult:
    """Redshifts from chi^2(z): the coarse curve of every template set over `u_range` ([`chi2_curve`]), its
    lowest point within +-`half_width` of a candidate (or anywhere, for rows with `everywhere`) and the vertex of
    the parabola through it and its neighbours, then `fine_trials` trials `fine_step` apart about that vertex on the
    spectrum's own pixels with the winning set and a parabola through the best of them and its neighbours.

    Args:
        template_sets: rest-frame bases by spectral type (e.g. GALAXY, QSO).
        wavelength: [pixels] or [batch, pixels], Angstrom; flux, ivar: [batch, pixels].
        candidates: candidate u = ln(1 + z) per spectrum [batch, modes] (e.g. the p(z) peaks).
        half_width: half-width in u of the window searched around each candidate.
        u_range: (lowest, highest) u of the coarse curve.
        everywhere: [batch] bool, rows whose minimum may lie anywhere in `u_range`.
        prior: [batch, grid] penalty in chi^2 units on the coarse grid (-2 ln p(z), e.g. the network's p(z)),
            added to chi^2 when choosing the minimum and in `delta_chi2`; `chi2` and `scan_chi2` stay pure.
        set_prior: [batch] penalty in chi^2 units per template set (e.g. -2 ln p(type) of a type classifier),
            added to that set's curve when choosing the set and the minimum (a set not named: 0).
        own_ranges: template sets searched over the whole of their own u range for every spectrum and nowhere
            else (e.g. STAR over stellar velocities); the coarse grid spans `u_range` and these.
        coarse_vectors: fit only each set's first this many vectors in the coarse curve (None: all); the fine
            scan always fits them all.
        fine_smoothing_kms: Gaussian sigma (km/s) per set by which the fine scan's basis is smoothed (missing: 0).
            A basis learned from noisy spectra carries their pixel noise, and the scan samples it at the pixels'
            centres: both make chi^2(z) jagged on a pixel's scale, which moves the fine minimum and shrinks its
            parabola's width (ZERR). The coarse curve, which chooses the minimum and the spectral type, keeps the
            basis as it is: a smoothed basis fits other types' spectra more easily.
    """
    if candidates.dim() != 2 or candidates.shape[0] != flux.shape[0]:
        raise ValueError(f"`candidates` must be [batch, modes], got {tuple(candidates.shape)}")
    own_ranges = own_ranges or {}
    span = scan_span(u_range, own_ranges)
    scan_u = scan_grid(template_sets, span, rebin).to(flux.device)  # [grid], the grid of `chi2_curve`
    near = _windows(scan_u, candidates.double(), half_width)  # [batch, grid]
    if everywhere is not None:
        near |= everywhere[:, None]
    near &= (scan_u >= u_range[0]) & (scan_u <= u_range[1])
    curves = []
    for name, t in template_sets.items():
        searched = near
        if name in own_ranges:
            low, high = own_ranges[name]
            searched = ((scan_u >= low) & (scan_u <= high)).expand_as(near)  # [batch, grid]
        coarse = _leading(t, coarse_vectors)
        curves.append(_searched_curve(coarse, wavelength, flux, ivar, span, rebin, searched))
    scan = torch.stack(curves)  # [sets, batch, grid]
    by_set = _set_penalty(template_sets, set_prior, scan)  # [sets, batch, 1]
    spectype = (scan + by_set).argmin(0)  # [batch, grid], the chosen set at each trial
    scan_chi2 = scan.gather(0, spectype[None])[0]  # [batch, grid], its chi^2; inf outside the searched trials
    penalty = by_set.expand_as(scan).gather(0, spectype[None])[0]  # [batch, grid], its type penalty
    if prior is not None:
        penalty = penalty + prior.to(scan_chi2)
    posterior = scan_chi2 + penalty  # [batch, grid]
    best = posterior.argmin(1)  # [batch]
    winner = spectype.gather(1, best[:, None])[:, 0]  # [batch]

    if fine_trials < 3 or fine_trials % 2 == 0:
        raise ValueError(f"`fine_trials` must be odd and >= 3, got {fine_trials}")
    fine_u, fine_chi2, fine_coeff, fine_npix = _fine_scan(
        {name: _smoothed(t, (fine_smoothing_kms or {}).get(name, 0.0)) for name, t in template_sets.items()},
        winner,
        wavelength,
        flux,
        ivar,
        _coarse_vertex(scan_u, scan_chi2, best),
        fine_step,
        fine_trials,
    )
    fine_best = fine_chi2.argmin(1)  # [batch]
    around = fine_best.clamp(1, fine_u.shape[1] - 2)[:, None] + torch.arange(-1, 2, device=flux.device)
    u_best, sigma_u, chi2 = _parabola(fine_u.gather(1, around), fine_chi2.gather(1, around))
    rows = torch.arange(flux.shape[0], device=flux.device)
    z = torch.expm1(u_best)
    far = (scan_u[None] - u_best[:, None]).abs() > exclusion_kms / SPEED_OF_LIGHT_KMS  # [batch, grid]
    second = torch.where(far & local_minima(posterior), posterior, math.inf).min(1).values  # [batch]
    return RefinementResult(
        redshift=z.float(),
        redshift_err=((1 + z) * sigma_u).float(),
        chi2=chi2.float(),
        delta_chi2=(second - posterior.gather(1, best[:, None])[:, 0]).float(),
        coeff=fine_coeff[rows, fine_best],
        npixels=fine_npix[rows, fine_best],
        spectype=winner,
        prior=penalty.gather(1, best[:, None])[:, 0].float(),
        scan_u=scan_u,
        scan_chi2=scan_chi2,
    )


def _set_penalty(
    template_sets: dict[str, RestFrameTemplates],
    set_prior: dict[str, torch.Tensor] | None,
    scan: torch.Tensor,
) -> torch.Tensor:
    """The per-set penalties [sets, batch, 1] of `set_prior` ({name: [batch]}; 0 for a set not named) in the dtype
    and device of the curves `scan` [sets, batch, grid]."""
    zero = torch.zeros(scan.shape[1], dtype=scan.dtype, device=scan.device)  # [batch]
    rows = [(set_prior or {}).get(name, zero).to(zero) for name in template_sets]
    return torch.stack(rows)[:, :, None]


def local_minima(curve: torch.Tensor) -> torch.Tensor:
    """[batch, grid] bool: the finite trials of `curve` [batch, grid] no higher than either neighbour (a missing
    or unsearched (inf) neighbour counts as higher), as Redrock's `find_minima` picks the candidates whose
    DELTACHI2 it compares."""
    padded = torch.nn.functional.pad(curve, (1, 1), value=math.inf)  # [batch, grid + 2]
    return curve.isfinite() & (curve <= padded[:, :-2]) & (curve <= padded[:, 2:])


def rows_wavelength(wavelength: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The wavelengths of `rows` [n]: a shared grid ([pixels] or [1, pixels]) as it is, or those rows' own
    [n, pixels] of a per-row grid [batch, pixels]."""
    return wavelength if wavelength.dim() == 1 or wavelength.shape[0] == 1 else wavelength[rows]


def _fine_scan(
    template_sets: dict[str, RestFrameTemplates],
    winner: torch.Tensor,
    wavelength: torch.Tensor,
    flux: torch.Tensor,
    ivar: torch.Tensor,
    centre: torch.Tensor,
    step: float,
    trials: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """chi^2 on each spectrum's own pixels with its winning set (`winner` [batch], an index into `template_sets`)
    at `trials` trials `step` apart in u about `centre` [batch], walked downhill from the middle three: one more
    trial is fitted beside the lowest fitted one while that is at an end of those fitted, so the lowest ends with a
    fitted neighbour on each side (or at the end of the trials), at about half the fits of all trials.

    Returns u [batch, trials], chi2 [batch, trials] (inf where not fitted), coefficients [batch, trials, vectors]
    and fitted pixels [batch, trials]."""
    batch, device = flux.shape[0], flux.device
    half = trials // 2
    fine_u = centre[:, None] + step * torch.arange(-half, half + 1, device=device)  # [batch, trials]
    vectors = max(t.basis.shape[0] for t in template_sets.values())
    chi2 = torch.full_like(fine_u, math.inf)  # [batch, trials]
    coeff = torch.zeros(batch, trials, vectors, device=device)  # [batch, trials, vectors]
    npixels = torch.zeros_like(fine_u, dtype=torch.long)  # [batch, trials]

    def fit(rows: torch.Tensor, columns: torch.Tensor) -> None:  # rows [n], columns [n, c]
        for i, t in enumerate(template_sets.values()):
            chosen = winner[rows] == i
            r, c = rows[chosen], columns[chosen]
            if len(r):
                wave = rows_wavelength(wavelength, r)
                chi2_t, coeff_t, npix_t = chi2_scan(t, wave, flux[r], ivar[r], fine_u[r[:, None], c])
                chi2[r[:, None], c], npixels[r[:, None], c] = chi2_t, npix_t
                coeff[r[:, None], c, : coeff_t.shape[-1]] = coeff_t

    rows = torch.arange(batch, device=device)
    fit(rows, half + torch.arange(-1, 2, device=device).expand(batch, -1))
    low, high = torch.full_like(rows, half - 1), torch.full_like(rows, half + 1)  # [batch], fitted span
    for _ in range(half - 1):
        lowest = chi2.argmin(1)  # [batch]
        left, right = (lowest == low) & (low > 0), (lowest == high) & (high < trials - 1)
        grow = (left | right).nonzero()[:, 0]
        if len(grow) == 0:
            break
        fit(grow, torch.where(left, low - 1, high + 1)[grow, None])
        low, high = low - left.long(), high + right.long()
    return fine_u, chi2, coeff, npixels


def smooth_chi2(
    wavelength: torch.Tensor, flux: torch.Tensor, ivar: torch.Tensor, degree: int = SMOOTH_DEGREE
) -> torch.Tensor:
    """chi^2 [batch] (float64) of the best smooth continuum with no redshift: a Legendre series of `degree` in
    ln(lambda) across each spectrum's range, fitted to its good pixels (wavelength [pixels] or [batch, pixels],
    flux and ivar [batch, pixels]). A template fit that does not beat it found no feature to place a redshift on."""
    weight, flux = _good_weight(flux, ivar)  # [batch, pixels]
    log_wave = torch.log(wavelength.to(flux.device, torch.float64)).reshape(
        -1, flux.shape[1]
    )  # [1 or batch, pixels]
    low, high = log_wave.min(1, keepdim=True).values, log_wave.max(1, keepdim=True).values  # [1 or batch, 1]
    x = 2 * (log_wave - low) / (high - low).clamp(min=1e-12) - 1  # [1 or batch, pixels], in [-1, 1]
    basis = torch.stack(
        [torch.special.legendre_polynomial_p(x, n) for n in range(degree + 1)], -1
    )  # [1 or batch, pixels, terms]: once for a shared grid
    terms = degree + 1
    products = (basis[..., :, None] * basis[..., None, :]).flatten(-2)  # [1 or batch, pixels, terms^2]
    weighted_flux = weight * flux  # [batch, pixels]
    if len(basis) == 1:  # one grid for every spectrum: two matrix products
        a, b = weight @ products[0], weighted_flux @ basis[0]  # [batch, terms^2], [batch, terms]
    else:
        a, b = (weight[:, None] @ products)[:, 0], (weighted_flux[:, None] @ basis)[:, 0]
    a = a.view(-1, terms, terms)  # [batch, terms, terms]
    coeff = _solve(a, b)  # [batch, terms]
    fitted = (coeff[:, None, :] @ a @ coeff[:, :, None])[:, 0, 0]  # c^T a c
    return (weighted_flux * flux).sum(1) - 2 * (b * coeff).sum(1) + fitted  # sum w (f - model)^2, in float64


def wide_candidates(
    template_sets: dict[str, RestFrameTemplates],
    wavelength: torch.Tensor,
    flux: torch.Tensor,
    ivar: torch.Tensor,
    u_range: tuple[float, float],
    modes: int,
    separation: float,
    rebin: int,
    vectors: int | None = None,
    prior: Callable[[torch.Tensor], torch.Tensor] | None = None,
    set_prior: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """u = ln(1 + z) [batch, modes] of the `modes` lowest minima, at least `separation` apart in u, of a cheap
    chi^2(z) over the whole of `u_range`: [`chi2_curve`] of each set's first `vectors` vectors with the spectrum
    binned `rebin` template steps wide, plus its `set_prior` ({name: [batch]}), the lowest set at each trial, plus
    `prior(u)` ([batch, grid]) if given.
    Binning keeps every line's flux, so a coarse curve still finds the basins that a windowed scan then resolves.

    Args:
        template_sets: the sets searched over `u_range` (not those with a range of their own, e.g. STAR).
        wavelength: [pixels] or [batch, pixels], Angstrom; flux, ivar: [batch, pixels].
    """
    curves = [
        chi2_curve(_leading(t, vectors), wavelength, flux, ivar, u_range, rebin)
        for t in template_sets.values()
    ]
    u = curves[0][0]  # [grid], shared by the sets
    scan = torch.stack([chi2 for _, chi2 in curves])  # [sets, batch, grid]
    score = (scan + _set_penalty(template_sets, set_prior, scan)).min(0).values  # [batch, grid]
    if prior is not None:
        score = score + prior(u)
    steps = max(1, math.ceil(separation / float(u[1] - u[0]))) if len(u) > 1 else 1
    return u[pz_modes(-score.nan_to_num(math.inf), modes, steps)]  # [batch, modes]


ARCHETYPE_DEGREE = 2  # Legendre degree in observed ln(lambda) beside each archetype (calibration)
# archetypes scanned no further, as Redrock's galaxy templates (0.005 < z < 1.7)
ARCHETYPE_MAX_REDSHIFT = {"GALAXY": 1.7}


def archetype_curve(
    archetypes: RestFrameTemplates,
    wavelength: torch.Tensor,
    flux: torch.Tensor,
    ivar: torch.Tensor,
    scan_u: torch.Tensor,
    rebin: int = 3,
    degree: int = ARCHETYPE_DEGREE,
    chunk: int = 16,
) -> torch.Tensor:
    """chi^2 [batch, grid] (float64) of the best archetype (one whole rest-frame spectrum, free amplitude >= 0) plus
    a Legendre polynomial of `degree` in observed ln(lambda), at the trials `scan_u` [grid], for spectra flux, ivar
    [batch, pixels] at `wavelength` ([pixels] or [batch, pixels]), binned onto the archetypes' grid coarsened by
    `rebin` (trials are rounded to its steps). An archetype cannot fit a few noisy pixels by a combination of
    vectors, as a basis can; FFT cross-correlations give every trial at once."""
    basis, start, step = _coarse_basis(archetypes, rebin)  # [k, n_rest]
    k, n_rest = basis.shape
    device = flux.device
    basis = basis.to(device)
    weight, flux = _good_weight(flux, ivar)  # [batch, pixels]
    log_wave = torch.log(wavelength.to(device, torch.float64)).expand_as(flux)
    index = torch.round((log_wave - start) / step).long()  # [batch, pixels], on the coarse grid
    first = int(index.min())
    n_obs = int(index.max()) - first + 1
    w = torch.zeros(len(flux), n_obs, dtype=torch.float64, device=device).scatter_add_(
        1, index - first, weight
    )  # [batch, n_obs]
    wf = torch.zeros_like(w).scatter_add_(1, index - first, weight * flux)
    x = np.linspace(-1, 1, n_obs)
    poly = torch.as_tensor(np.polynomial.legendre.legvander(x, degree), device=device)  # [n_obs, d]
    eye = torch.eye(degree + 1, dtype=torch.float64, device=device)
    inverse = torch.linalg.inv(torch.einsum("bo,od,oe->bde", w, poly, poly) + 1e-9 * eye)  # [batch, d, d]
    residual = (
        wf / w.clamp(min=1e-300) - (inverse @ (wf @ poly)[..., None])[..., 0] @ poly.T
    )  # [batch, n_obs]
    chi2_poly = (w * residual**2).sum(1)  # [batch], the polynomial alone
    length = _fft_length(n_obs + n_rest - 1)
    spectra = torch.fft.rfft(torch.cat([basis, basis**2]).float(), n=length)  # [2k, f]
    shift, trial = torch.unique(torch.round(scan_u.to(device) / step).long(), return_inverse=True)  # [shifts]
    lag = (first - shift) % length  # [shifts]: each coarse step once, however many trials round to it
    chi2 = []
    for rows in torch.arange(len(flux), device=device).split(chunk):
        signals = torch.cat(
            [(w * residual)[rows, None], w[rows, None] * poly.T, w[rows, None]], 1
        )  # [b, d+2, n_obs]
        x_f = torch.fft.rfft(signals.float(), n=length)[:, :, None].conj()  # [b, d+2, 1, f]
        linear = torch.fft.irfft(x_f[:, :-1] * spectra[:k], n=length)[
            ..., lag
        ].double()  # [b, d+1, k, shifts]
        square = torch.fft.irfft(x_f[:, -1] * spectra[k:], n=length)[..., lag].double()  # [b, k, shifts]
        s, p = (
            linear[:, 0],
            linear[:, 1:],
        )  # archetype · residual [b, k, shifts]; · polynomials [b, d, k, shifts]
        projected = torch.einsum("bde,bekg->bdkg", inverse[rows], p)  # [b, d, k, shifts]
        denominator = square - (p * projected).sum(1)  # [b, k, shifts]
        gain = torch.where((s > 0) & (denominator > 0), s**2 / denominator.clamp(min=1e-30), 0.0)
        chi2.append(chi2_poly[rows, None] - gain.max(1).values)
    return torch.cat(chi2)[:, trial]  # [batch, grid]


def archetype_scan(
    archetypes: dict[str, RestFrameTemplates],
    wavelength: torch.Tensor,
    flux: torch.Tensor,
    ivar: torch.Tensor,
    scan_u: torch.Tensor,
    rebin: int = 6,
    degree: int = ARCHETYPE_DEGREE,
) -> torch.Tensor:
    """chi^2 [batch, grid] of the best archetype of any set at each trial `scan_u` [grid] ([`archetype_curve`]),
    each set within its `ARCHETYPE_MAX_REDSHIFT` (inf beyond)."""
    z = torch.expm1(scan_u)  # [grid]
    curves = [
        archetype_curve(t, wavelength, flux, ivar, scan_u, rebin, degree).masked_fill(
            z > ARCHETYPE_MAX_REDSHIFT.get(name, math.inf), math.inf
        )
        for name, t in archetypes.items()
    ]  # [batch, grid] each
    return torch.stack(curves).min(0).values


def archetype_redshifts(
    archetypes: dict[str, RestFrameTemplates],
    wavelength: torch.Tensor,
    flux: torch.Tensor,
    ivar: torch.Tensor,
    scan_u: torch.Tensor,
    prior: torch.Tensor | None = None,
    rebin: int = 6,
    exclusion_kms: float = 1000.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The archetypes' choice over the whole of `scan_u` [grid]: u [batch] of the lowest [`archetype_scan`] (+ `prior`
    [batch, grid] in chi^2 units), and DELTACHI2 [batch]: the lowest other local minimum at least `exclusion_kms`
    away minus it, as Redrock's."""
    score = archetype_scan(archetypes, wavelength, flux, ivar, scan_u, rebin)  # [batch, grid]
    if prior is not None:
        score = score + prior.to(score)
    best = score.argmin(1)  # [batch]
    far = (scan_u[None] - scan_u[best][:, None]).abs() > exclusion_kms / SPEED_OF_LIGHT_KMS  # [batch, grid]
    second = torch.where(far & local_minima(score), score, math.inf).min(1).values  # [batch]
    return scan_u[best], second - score.gather(1, best[:, None])[:, 0]


def line_aliases(u: torch.Tensor, groups: Sequence[Sequence[float]], spread: float) -> torch.Tensor:
    """Candidates u = ln(1 + z) [batch, 2 x aliases] where the line that puts a spectrum at `u` [batch] would be
    another line of its group (rest wavelengths; `groups` of lines that may be read as one another): u + ln(λ_i /
    λ_j) for every ordered pair i != j within a group, each as two candidates `spread` below and above it, so that
    windows of half-width `spread` about them cover twice the width of one (`u`'s own error carries over to its
    aliases). [batch, 0] without a group of two lines."""
    ratios = [a / b for lines in groups for a in lines for b in lines if a != b]
    shifts = torch.tensor([math.log(r) for r in ratios], dtype=u.dtype, device=u.device)  # [aliases]
    aliases = u[:, None] + shifts  # [batch, aliases]
    return torch.cat([aliases - spread, aliases + spread], 1)  # [batch, 2 x aliases]


def pz_modes(probability: torch.Tensor, modes: int, separation: int) -> torch.Tensor:
    """Indices [batch, modes] of the `modes` highest p(z) bins at least `separation` bins apart (greedy: the
    highest bin, then the highest outside +-separation of those taken, ...); probability [batch, bins]."""
    index = torch.arange(probability.shape[1], device=probability.device)  # [bins]
    left = probability.clone()
    picked = []
    for _ in range(min(modes, probability.shape[1])):
        peak = left.argmax(1)  # [batch]
        picked.append(peak)
        left = left.masked_fill((index[None] - peak[:, None]).abs() < separation, -math.inf)
    return torch.stack(picked, 1)  # [batch, modes]


def save_templates(path: str | Path, template_sets: dict[str, RestFrameTemplates]) -> None:
    """Write template sets to a safetensors file atomically (`{name}.basis` tensors; grids in the metadata)."""
    tensors = {f"{name}.basis": t.basis.float().contiguous() for name, t in template_sets.items()}
    metadata = {"spectypes": ",".join(template_sets)}
    for name, t in template_sets.items():
        metadata[f"{name}.log_wavelength_start"] = repr(t.log_wavelength_start)
        metadata[f"{name}.log_wavelength_step"] = repr(t.log_wavelength_step)
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_templates(path: str | Path) -> dict[str, RestFrameTemplates]:
    """Template sets from a file written by [`save_templates`]; a clear OSError when it is missing or broken."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            names = [name for name in metadata.get("spectypes", "").split(",") if name]
            sets = {
                name: RestFrameTemplates(
                    float(metadata[f"{name}.log_wavelength_start"]),
                    float(metadata[f"{name}.log_wavelength_step"]),
                    f.get_tensor(f"{name}.basis"),
                )
                for name in names
            }
    except (SafetensorError, OSError, ValueError, KeyError) as error:  # truncated, foreign or incomplete
        raise OSError(
            f"{path}: not a readable template file ({error}); rebuild it with `specpt templates`"
        ) from error
    if not sets:
        raise OSError(f"{path}: holds no template sets (metadata 'spectypes' is empty)")
    return sets


def describe_templates(template_sets: dict[str, RestFrameTemplates], file: str) -> dict[str, Any]:
    """The `config.templates` entry: file name and, per set, vectors and rest-frame range in Angstrom."""
    spectypes = {}
    for name, t in template_sets.items():
        grid = t.log_wavelength
        spectypes[name] = {
            "num_vectors": int(t.basis.shape[0]),
            "rest_wavelength_min": round(float(np.exp(grid[0])), 2),
            "rest_wavelength_max": round(float(np.exp(grid[-1])), 2),
            "log_wavelength_step": t.log_wavelength_step,
        }
    return {"file": file, "spectypes": spectypes}


__all__ = [
    "ARCHETYPE_MAX_REDSHIFT",
    "RefinementResult",
    "RestFrameTemplates",
    "archetype_curve",
    "archetype_redshifts",
    "archetype_scan",
    "build_templates",
    "chi2_curve",
    "chi2_scan",
    "describe_templates",
    "load_templates",
    "pz_modes",
    "refine_redshifts",
    "save_templates",
    "scan_span",
    "smooth_templates",
    "star_range",
]
