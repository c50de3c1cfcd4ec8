"""The [O II] doublet's flux at a redshift (`specpt_hf.emission_lines`) and DESI's ELG criterion."""

from __future__ import annotations

import numpy as np

from specpt_hf.emission_lines import OII_VACUUM, SIGMA_KMS, desi_elg_secure, oii_flux

WAVE = 3600.0 + 0.8 * np.arange(7781)  # the DESI grid of the models


def doublet(z: float, total: float, ratio: float = 1.4) -> np.ndarray:
    """A continuum of 2 plus the [O II] doublet of `total` flux (3729 / 3726 = `ratio`) at `z`, on WAVE, the lines
    as wide as the fit assumes (SIGMA_KMS and a 0.8 A line-spread sigma)."""
    out = np.full(len(WAVE), 2.0)
    for rest, share in zip(OII_VACUUM, (1.0 / (1.0 + ratio), ratio / (1.0 + ratio)), strict=True):
        centre = rest * (1.0 + z)
        sigma = np.hypot(centre * SIGMA_KMS / 299792.458, 0.8)
        out += total * share * np.exp(-0.5 * ((WAVE - centre) / sigma) ** 2) / (np.sqrt(2 * np.pi) * sigma)
    return out


def test_flux_and_its_uncertainty_are_recovered_for_any_line_ratio():
    rng = np.random.default_rng(0)
    n, noise = 400, 0.5
    z = rng.uniform(0.2, 1.5, n)
    truth = rng.uniform(0.0, 30.0, n)
    ratio = rng.uniform(0.4, 1.5, n)
    flux = np.stack([doublet(zi, ti, ri) for zi, ti, ri in zip(z, truth, ratio, strict=True)])
    flux += rng.normal(0.0, noise, flux.shape)
    ivar = np.full(flux.shape, noise**-2)
    good = np.ones(flux.shape, bool)
    measured, measured_ivar = oii_flux(WAVE, flux, ivar, good, z, sigma_instrument=0.8)
    pull = (measured - truth) * np.sqrt(measured_ivar)
    assert abs(pull.mean()) < 0.2 and 0.85 < pull.std() < 1.25  # unbiased, errors as claimed
    assert np.all(measured_ivar > 0)


def test_no_measurement_off_the_grid_or_without_pixels_on_the_lines():
    flux = np.stack([doublet(1.0, 20.0)] * 4)
    ivar = np.ones_like(flux)
    good = np.ones(flux.shape, bool)
    line = np.abs(WAVE - OII_VACUUM[0] * 2.0) < 5.0
    good[2, line] = False  # the bluer line masked
    z = np.array([1.0, 1.7, 1.0, np.nan])  # 1.7: [O II] beyond 9824 A
    measured, measured_ivar = oii_flux(WAVE, flux, ivar, good, z, sigma_instrument=0.8)
    assert measured[0] == np.float64(measured[0]) and abs(measured[0] - 20.0) < 1.0
    assert np.isnan(measured[1:]).all() and np.isnan(measured_ivar[1:]).all()


def test_a_spectrum_measured_at_the_wrong_redshift_shows_no_doublet():
    rng = np.random.default_rng(1)
    flux = doublet(1.0, 20.0) + rng.normal(0.0, 0.3, len(WAVE))
    ivar = np.full((2, len(WAVE)), 0.3**-2)
    measured, measured_ivar = oii_flux(
        WAVE, np.stack([flux, flux]), ivar, np.ones((2, len(WAVE)), bool), np.array([1.0, 1.1]), 0.8
    )
    snr = measured * np.sqrt(measured_ivar)
    assert snr[0] > 10 and abs(snr[1]) < 4


def test_desi_elg_criterion():
    # log10(FOII_SNR) > 0.9 - 0.2 log10(DELTACHI2)
    flux = np.array([10.0, 5.0, 6.0, -10.0, np.nan, 2.0])
    ivar = np.ones(6)
    delta_chi2 = np.array([1.0, 10.0, 10.0, 100.0, 100.0, 1e5])
    assert desi_elg_secure(flux, ivar, delta_chi2).tolist() == [True, False, True, False, False, True]


def test_mock_elg_doublets_are_measured_at_their_true_flux():
    """On the mock's ELGs (their own line widths, line ratios, resolution and sky noise) the flux at the true
    redshift matches the truth's FLUX_OII_3727 + FLUX_OII_3729."""
    from specpt_hf.data.mock import generate_spectra

    mock = generate_spectra("elg", 64, seed=5)
    truth = mock["truth"]
    z = np.asarray(truth["z"], dtype=np.float64)
    expected = np.asarray(truth["flux_OII_3727"]) + np.asarray(truth["flux_OII_3729"])
    measured, measured_ivar = oii_flux(
        mock["wave"], mock["flux"], mock["ivar"], ~mock["mask"], z, sigma_instrument=0.8
    )
    bright = np.isfinite(measured) & (expected * np.sqrt(measured_ivar) > 10)
    assert bright.sum() >= 10
    assert abs(np.median(measured[bright] / expected[bright]) - 1.0) < 0.1
