"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


def make_spectra(
    batch: int = 3,
    num_pixels: int = 300,
    seed: int = 0,
    bad_fraction: float = 0.1,
    wavelength_start: float = 3600.0,
    wavelength_step: float = 0.8,
) -> dict[str, torch.Tensor]:
    """Fake galaxy-like spectra on a linear grid: a sloped continuum, a few Gaussian emission lines, Gaussian
    noise with its `ivar`, and a random `mask` (True = bad pixel) that also has ivar = 0.

    Returns a dict with `flux`, `ivar`, `mask` [batch, num_pixels] and `wavelength` [num_pixels]."""
    generator = torch.Generator().manual_seed(seed)
    wavelength = wavelength_start + wavelength_step * torch.arange(num_pixels, dtype=torch.float32)
    x = (wavelength - wavelength.mean()) / (wavelength.max() - wavelength.min() + 1e-6)  # [-0.5, 0.5]
    level = 0.5 + 2.0 * torch.rand(batch, 1, generator=generator)  # [batch, 1]
    slope = 0.5 * torch.randn(batch, 1, generator=generator)  # [batch, 1]
    flux = level * (1.0 + slope * x)  # [batch, pixels]
    for _ in range(3):
        centre = wavelength[0] + (wavelength[-1] - wavelength[0]) * torch.rand(batch, 1, generator=generator)
        width = 2.0 + 4.0 * torch.rand(batch, 1, generator=generator)
        flux = flux + 3.0 * level * torch.exp(-0.5 * ((wavelength - centre) / width) ** 2)
    sigma = 0.1 * level.expand(batch, num_pixels)  # [batch, pixels]
    flux = flux + sigma * torch.randn(batch, num_pixels, generator=generator)
    ivar = 1.0 / sigma**2
    mask = torch.rand(batch, num_pixels, generator=generator) < bad_fraction
    ivar = torch.where(mask, 0.0, ivar)
    return {"flux": flux, "ivar": ivar, "mask": mask, "wavelength": wavelength}


@pytest.fixture
def spectra_factory() -> Callable[..., dict[str, torch.Tensor]]:
    """`make_spectra(batch, num_pixels, seed, bad_fraction, ...)`: fake spectra with flux, ivar, mask, wavelength."""
    return make_spectra


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests with one torch thread (tiny models are much faster that way on a shared CPU, where
    two threads wait on each other). Opt in with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
