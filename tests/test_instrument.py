"""Instrument grids and line spread, resolution matrices, flux-conserving resampling."""

from __future__ import annotations

import importlib.resources

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import InverseVariance

from specpt_hf.data.instrument import (
    DEIMOS,
    DESI,
    HST_G102,
    HST_G141,
    apply_resolution,
    bin_edges,
    get_instrument,
    resample,
)

DESI_DATA = importlib.resources.files("specutils") / "io/default_loaders/tests/desi_test_data"


def test_desi_arms_and_merged_grid():
    assert [(a.name, a.n_pixels) for a in DESI.arms] == [("b", 2751), ("r", 2326), ("z", 2881)]
    assert DESI.n_pixels == 7781
    assert DESI.coverage == (3600.0, 9824.0)
    np.testing.assert_allclose(np.diff(DESI.wave), 0.8, atol=1e-9)
    for arm in DESI.arms:  # every arm sits on the merged lattice
        idx = np.searchsorted(DESI.wave, arm.wave[0] - 1e-6)
        np.testing.assert_allclose(DESI.wave[idx : idx + arm.n_pixels], arm.wave, atol=1e-6)


def test_desi_grid_matches_real_file():
    with fits.open(str(DESI_DATA / "coadd-sv3-dark-26065.fits")) as hdul:
        for arm in DESI.arms:
            np.testing.assert_allclose(arm.wave, hdul[f"{arm.name.upper()}_WAVELENGTH"].data, atol=1e-4)


def test_desi_lsf_matches_real_resolution_matrices():
    """The LSF sigma of each arm is within 8 % of the second moment of the real RESOLUTION rows."""
    offsets = np.arange(5, -6, -1)
    with fits.open(str(DESI_DATA / "coadd-sv3-dark-26065.fits")) as hdul:
        good = np.flatnonzero(np.median(hdul["R_IVAR"].data, axis=1) > 0)
        for arm in DESI.arms:
            res = hdul[f"{arm.name.upper()}_RESOLUTION"].data[good].mean(axis=0).astype(float)  # [11, n]
            norm = res.sum(axis=0)
            mean = (res * offsets[:, None]).sum(axis=0) / norm
            var = (res * (offsets[:, None] - mean) ** 2).sum(axis=0) / norm
            real_sigma = np.sqrt(np.clip(var - 1.0 / 12.0, 0, None)) * arm.step  # Å, pixel boxcar removed
            for lo in np.linspace(arm.start + 50, arm.stop - 150, 5):
                sl = (arm.wave > lo) & (arm.wave < lo + 100)
                np.testing.assert_allclose(arm.lsf_sigma(lo + 50), np.median(real_sigma[sl]), rtol=0.08)
    # and the published design ranges are respected to within the measured sharpening
    assert 2000 < DESI.resolving_power(3600.0) < 2600
    assert 4000 < DESI.resolving_power(7000.0) < 5200
    assert 5000 < DESI.resolving_power(9000.0) < 5800


def test_resolution_data_layout_and_action():
    arm = DESI.arm("r")
    data = arm.resolution_data()
    assert data.shape == (11, arm.n_pixels) and data.dtype == np.float32
    np.testing.assert_allclose(data.sum(axis=0), 1.0, atol=1e-6)
    np.testing.assert_allclose(data[:, 1000], data[::-1, 1000], atol=1e-7)  # symmetric LSF
    delta = np.zeros((1, arm.n_pixels))
    delta[0, 1000] = 1.0
    out = apply_resolution(data, delta)[0]
    assert out.sum() == pytest.approx(1.0, abs=1e-6)
    pix = np.arange(arm.n_pixels) - 1000
    sigma_pix = np.sqrt((out * pix**2).sum())
    expected = np.hypot(arm.lsf_sigma(arm.wave[1000]) / arm.step, np.sqrt(1 / 12))
    assert sigma_pix == pytest.approx(expected, rel=0.03)


def test_other_instruments():
    assert DEIMOS.coverage[0] == 4500.0 and DEIMOS.coverage[1] == pytest.approx(9500.0, abs=0.33)
    assert DEIMOS.resolving_power(7000.0) == pytest.approx(5000.0, rel=1e-6)
    assert HST_G102.resolving_power(10000.0) == pytest.approx(210.0, rel=1e-6)
    assert HST_G141.resolving_power(14000.0) == pytest.approx(130.0, rel=1e-6)
    assert np.diff(HST_G102.wave)[0] == pytest.approx(24.5) and np.diff(HST_G141.wave)[0] == pytest.approx(
        46.5
    )
    assert HST_G102.coverage[0] >= 8000 and HST_G102.coverage[1] <= 11500 + 24.5
    assert not HST_G141.ground_based and DEIMOS.ground_based
    assert HST_G141.arms[0].resolution_data().shape[0] >= 11
    assert get_instrument("hst_g141") is HST_G141
    with pytest.raises(ValueError, match="unknown instrument"):
        get_instrument("sdss")


def test_resample_conserves_flux_and_propagates_ivar():
    wave = np.arange(4000.0, 6000.0, 1.0)
    flux = 2.0 + 50.0 * np.exp(-0.5 * ((wave - 5000.3) / 2.0) ** 2)
    ivar = np.full_like(wave, 4.0)
    new_wave = np.arange(4100.0, 5900.0, 3.0)  # every output pixel = exactly 3 input pixels
    out_flux, out_ivar, out_mask = resample(wave, flux, ivar, new_wave)
    assert not out_mask.any()
    sel = (wave > 4100.0 - 1.5) & (wave < new_wave[-1] + 1.5)
    assert (out_flux * 3.0).sum() == pytest.approx(flux[sel].sum() * 1.0, rel=1e-10)
    np.testing.assert_allclose(out_ivar, 3 * 4.0)  # mean of 3 equal-variance pixels
    # a 1.5-pixel output bin: weights 1 and 0.5 -> var = (1 + 0.25) σ² / 1.5²
    f2, i2, m2 = resample(wave, flux, ivar, np.array([4500.25, 4501.75]))
    assert not m2.any()
    assert i2[0] == pytest.approx(1.5**2 / (1.25 * 0.25))
    assert f2[0] == pytest.approx((flux[500] * 1.0 + flux[501] * 0.5) / 1.5)


def test_resample_agrees_with_specutils_flux_conserving_resampler():
    """specutils' FluxConservingResampler as the oracle where both apply (all input pixels good, output inside)."""
    import astropy.units as u
    from astropy.nddata import InverseVariance
    from specutils import Spectrum
    from specutils.manipulation import FluxConservingResampler

    rng = np.random.default_rng(3)
    wave = np.sort(rng.uniform(5000.0, 6000.0, 700))  # uneven input pixels
    flux = 2.0 + np.sin(wave / 7.0) + rng.normal(0.0, 0.1, wave.shape)
    ivar = rng.uniform(1.0, 9.0, wave.shape)
    new_wave = np.linspace(5050.0, 5950.0, 313)
    unit = u.Unit("1e-17 erg / (s cm2 Angstrom)")
    spectrum = Spectrum(
        flux=flux * unit, spectral_axis=wave * u.AA, uncertainty=InverseVariance(ivar / unit**2)
    )
    expected = FluxConservingResampler()(spectrum, new_wave * u.AA)
    out_flux, out_ivar, out_mask = resample(wave, flux, ivar, new_wave)
    assert not out_mask.any()
    np.testing.assert_allclose(out_flux, expected.flux.value, rtol=1e-10)
    np.testing.assert_allclose(out_ivar, expected.uncertainty.array, rtol=1e-10)


def test_resample_batched_and_upsampling():
    wave = np.linspace(5000, 6000, 501)
    flux = np.stack([np.full(501, 1.0), np.linspace(0, 1, 501)])  # [2, 501]
    out_flux, out_ivar, out_mask = resample(wave, flux, np.ones_like(flux), np.linspace(5100, 5900, 2001))
    assert out_flux.shape == (2, 2001)
    np.testing.assert_allclose(out_flux[0], 1.0)
    np.testing.assert_allclose(
        out_flux[1], np.interp(np.linspace(5100, 5900, 2001), wave, flux[1]), atol=2e-3
    )


def test_resample_masks_coverage_and_bad_input():
    wave = np.arange(5000.0, 5100.0, 1.0)  # input covers 4999.5-5099.5
    flux = np.ones_like(wave)
    ivar = np.ones_like(wave)
    mask = np.zeros(wave.shape, dtype=bool)
    mask[50] = True
    flux[50] = 1e6  # a masked spike must not leak
    ivar[60:70] = 0.0  # no good input under 5059.5-5069.5
    new_wave = np.arange(4990.5, 5115.0, 2.0)  # 2 Å pixels, edges at odd + 0.5 ... starting 4989.5
    out_flux, out_ivar, out_mask = resample(wave, flux, ivar, new_wave, mask=mask)
    edges = bin_edges(new_wave)
    outside = (edges[:-1] < 4999.5) | (edges[1:] > 5099.5)
    no_good = (edges[:-1] >= 5059.5) & (edges[1:] <= 5069.5)
    np.testing.assert_array_equal(out_mask, outside | no_good)
    assert outside.sum() >= 10 and no_good.sum() == 5
    np.testing.assert_allclose(out_flux[~out_mask], 1.0)  # the spike at 5050 is gone
    spike_bin = np.flatnonzero((edges[:-1] <= 5050.0) & (edges[1:] > 5050.0))[0]
    assert out_ivar[spike_bin] == pytest.approx(1.0)  # one good 1 Å pixel of two: weight 1 over 1 Å
    assert np.all(out_ivar[out_mask] == 0) and np.all(out_flux[out_mask] == 0)


def test_resample_specutils_spectrum():
    from specutils import Spectrum

    wave = np.linspace(4000.0, 5000.0, 1001)
    flux = 3.0 + np.sin(wave / 30.0)
    ivar = np.full_like(wave, 9.0)
    mask = np.zeros_like(wave, dtype=bool)
    mask[100:110] = True
    new_wave = np.linspace(4100.0, 4900.0, 200)
    expected = resample(wave, flux, ivar, new_wave, mask=mask)
    unit = 1e-17 * u.erg / u.s / u.cm**2 / u.AA
    spec = Spectrum(
        flux=(flux * 1e-17) * (u.erg / u.s / u.cm**2 / u.AA),
        spectral_axis=(wave / 10.0) * u.nm,
        uncertainty=InverseVariance(ivar / 1e-34 * (u.erg / u.s / u.cm**2 / u.AA) ** -2),
        mask=mask,
    )
    got = resample(spec, new_wave=new_wave)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # f_nu input is converted to f_lambda
    spec_nu = Spectrum(
        flux=(flux * unit).to(u.mJy, u.spectral_density(wave * u.AA)), spectral_axis=wave * u.AA
    )
    f_nu_flux, _, _ = resample(spec_nu, new_wave=new_wave)
    np.testing.assert_allclose(f_nu_flux, resample(wave, flux, None, new_wave)[0], rtol=1e-6)
    with pytest.raises(ValueError, match="either a specutils Spectrum"):
        resample(spec, flux, new_wave=new_wave)


def test_resample_bad_arguments():
    wave = np.linspace(4000.0, 5000.0, 10)
    with pytest.raises(ValueError, match="strictly increasing"):
        resample(wave[::-1], np.ones(10), None, wave)
    with pytest.raises(ValueError, match="pixels"):
        resample(wave, np.ones(9), None, wave)
    with pytest.raises(ValueError, match="new_wave"):
        resample(wave, np.ones(10))
    assert len(bin_edges(wave)) == 11


def test_resample_onto_an_instrument_and_from_a_frequency_axis():
    from specutils import Spectrum

    wave = np.linspace(4400.0, 9600.0, 2000)
    flux = 2.0 + np.cos(wave / 40.0)
    onto = resample(wave, flux, np.full_like(wave, 4.0), DEIMOS)  # the instrument's merged grid
    expected = resample(wave, flux, np.full_like(wave, 4.0), DEIMOS.wave)
    for a, b in zip(onto, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    assert onto[0].shape == (DEIMOS.n_pixels,) and not onto[2].all()

    unit = 1e-17 * u.erg / u.s / u.cm**2 / u.AA
    frequency = (wave * u.AA).to(u.THz, u.spectral())  # decreasing
    spec = Spectrum(flux=(flux * unit)[::-1], spectral_axis=frequency[::-1])  # increasing frequency
    np.testing.assert_allclose(
        resample(spec, new_wave=DEIMOS.wave)[0], resample(wave, flux, None, DEIMOS.wave)[0], rtol=1e-6
    )
