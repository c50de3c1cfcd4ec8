"""Training augmentations: the imperfections of real DESI spectra, applied on the fly to a batch.

Each one is switched on by a non-zero amplitude (`Augmentations`, set from the training settings `augment_*`) and
hits a spectrum with probability `probability`. They act on the model-grid batch of `SpectrumCollator`
(`flux`, `ivar`, `mask` [batch, pixels]) with a torch generator seeded from (run seed, step), so a run and its
resumption draw the same perturbations; nothing is written to the shards.

- `calibration`: a smooth multiplicative distortion per arm (b < 5780 A < r < 7570 A < z): 1 + a low-order
  Legendre series of rms `calibration` (flux-calibration and throughput errors; DESI quotes ~1-2 %), flux and
  ivar scaled consistently (ivar / s^2).
- `sky_residual`: sky-subtraction residuals at the strong airglow lines of the mock's measured sky
  (`strong_sky_lines`), Gaussian lines of 1 A sigma whose peak is `sky_residual` x the local noise, signed.
- `masked_span`: the longest masked span, in pixels (a cosmic ray, bad columns): one span of up to that length,
  set to mask = True, ivar = 0 (the flux is left: masked pixels weigh nothing).
- `renoise`: the largest S/N reduction factor f (> 1): noise of variance (f^2 - 1)/ivar added and ivar / f^2,
  so that ivar stays the inverse variance of the new flux.
- `resolution`: resolution and velocity-dispersion jitter, a Gaussian blur of sigma drawn in [0, `resolution`]
  pixels (1 pixel = 0.8 A, ~48 km/s at 5000 A); masked pixels are left out of the blur and the variance is
  propagated (ivar of the blurred flux), so the flux is conserved and ivar stays its inverse variance.
- `ebv`: Galactic extinction, E(B-V) drawn uniformly in [0, `ebv`] (Fitzpatrick 1999, R_V = 3.1, from
  `dust_extinction`); flux x 10^(-0.4 A), ivar / that^2.

Masked pixels stay masked by every augmentation, and none of them unmasks one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

ARM_EDGES = (5780.0, 7570.0)  # b | r | z, Angstrom
CALIBRATION_ORDER = 3  # Legendre terms 1..3 per arm
SKY_LINE_SIGMA = 1.0  # Angstrom


@dataclass(frozen=True)
class Augmentations:
    """Amplitudes of the augmentations (0 = off) and the chance that each hits a spectrum."""

    probability: float = 0.5
    calibration: float = 0.0
    sky_residual: float = 0.0
    masked_span: int = 0
    renoise: float = 0.0
    resolution: float = 0.0
    ebv: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"augment_probability must be in [0, 1], got {self.probability}")
        for name in ("calibration", "sky_residual", "masked_span", "resolution", "ebv"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment_{name} must be >= 0, got {getattr(self, name)}")
        if self.renoise and self.renoise <= 1.0:
            raise ValueError(f"augment_renoise is a S/N reduction factor > 1 (or 0: off), got {self.renoise}")

    @property
    def enabled(self) -> bool:
        return any(
            (self.calibration, self.sky_residual, self.masked_span, self.renoise, self.resolution, self.ebv)
        )


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The generator of one training step: the same (seed, step) draws the same perturbations; `stream` > 0
    gives another independent stream of the same step."""
    entropy = [seed, step] + ([stream] if stream else [])
    return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))


def augment(
    batch: dict[str, torch.Tensor],
    wavelength: np.ndarray,
    settings: Augmentations,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """A perturbed copy of `batch` (flux, ivar, mask [batch, pixels] on `wavelength`, Angstrom); labels kept."""
    if not settings.enabled:
        return batch
    device = batch["flux"].device
    flux, ivar, mask = (
        batch[key].detach().cpu().clone() for key in ("flux", "ivar", "mask")
    )  # drawn on the CPU
    wave = torch.as_tensor(wavelength, dtype=torch.float64)  # [pixels]
    n = len(flux)

    def hit() -> torch.Tensor:  # [batch] bool
        return torch.rand(n, generator=generator) < settings.probability

    if settings.calibration:
        scale = _calibration(wave, n, settings.calibration, generator)  # [batch, pixels]
        scale = torch.where(hit()[:, None], scale, torch.ones_like(scale)).float()
        flux, ivar = flux * scale, ivar / scale**2
    if settings.sky_residual:
        flux = flux + hit()[:, None] * _sky_residuals(wave, ivar, settings.sky_residual, generator)
    if settings.masked_span:
        span = _masked_span(n, wave.numel(), settings.masked_span, generator) & hit()[:, None]
        mask, ivar = mask | span, torch.where(span, torch.zeros_like(ivar), ivar)
    if settings.renoise:
        factor = 1.0 + (settings.renoise - 1.0) * torch.rand(n, generator=generator)  # [batch]
        factor = torch.where(hit(), factor, torch.ones_like(factor))[:, None]
        sigma = torch.where(ivar > 0, torch.sqrt((factor**2 - 1.0) / ivar.clamp(min=1e-30)), 0.0)
        flux = flux + sigma * torch.randn(flux.shape, generator=generator)
        ivar = ivar / factor**2
    if settings.resolution:
        blurred = _blur(flux, ivar, mask, settings.resolution, generator)
        rows = hit()[:, None]
        flux, ivar = torch.where(rows, blurred[0], flux), torch.where(rows, blurred[1], ivar)
    if settings.ebv:
        ebv = settings.ebv * torch.rand(n, generator=generator) * hit()  # [batch]
        transmission = _transmission(wave, ebv)  # [batch, pixels]
        flux, ivar = flux * transmission, ivar / transmission**2
    ivar = torch.where(mask, torch.zeros_like(ivar), ivar)  # masked pixels stay weightless
    perturbed = {"flux": flux.float(), "ivar": ivar.float(), "mask": mask}
    return {**batch, **{key: value.to(device) for key, value in perturbed.items()}}


def _calibration(wave: torch.Tensor, n: int, rms: float, generator: torch.Generator) -> torch.Tensor:
    """1 + sum_k c_k P_k(x) per arm, x in [-1, 1] across the arm, c_k ~ N(0, rms / sqrt(order)) [n, pixels]."""
    arm = torch.bucketize(wave, torch.tensor(ARM_EDGES, dtype=wave.dtype))  # [pixels] 0, 1, 2
    scale = torch.ones(n, wave.numel(), dtype=torch.float64)
    for index in range(3):
        inside = arm == index
        if not inside.any():
            continue
        w = wave[inside]
        x = 2.0 * (w - w.min()) / max(float(w.max() - w.min()), 1e-9) - 1.0  # [arm pixels]
        legendre = torch.stack(_legendre(x, CALIBRATION_ORDER))  # [order, arm pixels]
        coeff = torch.randn(n, CALIBRATION_ORDER, generator=generator, dtype=torch.float64)
        scale[:, inside] += (rms / math.sqrt(CALIBRATION_ORDER)) * coeff @ legendre
    return scale.clamp(min=0.5)


def _legendre(x: torch.Tensor, order: int) -> list[torch.Tensor]:
    """P_1 .. P_order at x (Bonnet's recursion)."""
    p_prev, p = torch.ones_like(x), x
    out = [p]
    for k in range(1, order):
        p_prev, p = p, ((2 * k + 1) * x * p - k * p_prev) / (k + 1)
        out.append(p)
    return out


def _sky_residuals(
    wave: torch.Tensor, ivar: torch.Tensor, amplitude: float, generator: torch.Generator
) -> torch.Tensor:
    """Signed Gaussian residuals at the strong sky lines, peak `amplitude` x the local sigma [batch, pixels]."""
    from ..data.mock import strong_sky_lines

    lines = torch.as_tensor(strong_sky_lines(10.0), dtype=wave.dtype)
    lines = lines[(lines > wave[0]) & (lines < wave[-1])]  # [lines]
    profile = torch.exp(-0.5 * ((wave[None] - lines[:, None]) / SKY_LINE_SIGMA) ** 2)  # [lines, pixels]
    signs = torch.randn(len(ivar), len(lines), generator=generator, dtype=wave.dtype)  # [batch, lines]
    sigma = torch.where(ivar > 0, ivar.clamp(min=1e-30).rsqrt(), torch.zeros_like(ivar))  # [batch, pixels]
    return (amplitude * (signs @ profile)).float() * sigma


def _masked_span(n: int, pixels: int, longest: int, generator: torch.Generator) -> torch.Tensor:
    """One span of 1..`longest` pixels per spectrum at a random place [n, pixels] bool."""
    length = torch.randint(1, longest + 1, (n,), generator=generator)  # [n]
    start = (torch.rand(n, generator=generator) * (pixels - length)).long()  # [n]
    index = torch.arange(pixels)[None]  # [1, pixels]
    return (index >= start[:, None]) & (index < (start + length)[:, None])


def _blur(
    flux: torch.Tensor, ivar: torch.Tensor, mask: torch.Tensor, sigma_max: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flux and ivar after a Gaussian blur of sigma ~ U(0, `sigma_max`) pixels per spectrum, over good pixels only."""
    n = len(flux)
    half = max(1, math.ceil(4 * sigma_max))
    sigma = (sigma_max * torch.rand(n, generator=generator)).clamp(min=1e-3).double()  # [n], pixels
    offsets = torch.arange(-half, half + 1, dtype=torch.float64)  # [k]
    kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)  # [n, k]
    kernel = kernel / kernel.sum(dim=1, keepdim=True)

    def convolve(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:  # [n, pixels]
        return torch.nn.functional.conv1d(values[None], weights[:, None], padding=half, groups=n)[0]

    good = (~mask).double()  # [n, pixels]
    variance = torch.where(ivar > 0, 1.0 / ivar.double().clamp(min=1e-30), 0.0)
    norm = convolve(good, kernel).clamp(min=1e-12)  # [n, pixels], the kernel's weight on good pixels
    blurred = convolve(flux.double() * good, kernel) / norm
    blurred_var = convolve(variance * good, kernel**2) / norm**2
    new_ivar = torch.where(mask | (blurred_var <= 0), 0.0, 1.0 / blurred_var.clamp(min=1e-30))
    return blurred.float(), new_ivar.float()


def _transmission(wave: torch.Tensor, ebv: torch.Tensor) -> torch.Tensor:
    """10^(-0.4 A_lambda) for E(B-V) `ebv` [batch] under Fitzpatrick (1999), R_V = 3.1 [batch, pixels]."""
    import astropy.units as u
    from dust_extinction.parameter_averages import F99

    a_over_ebv = torch.as_tensor(F99(Rv=3.1)(wave.numpy() * u.AA) * 3.1, dtype=torch.float64)  # A / E(B-V)
    return torch.pow(10.0, -0.4 * ebv[:, None].double() * a_over_ebv[None]).float()
