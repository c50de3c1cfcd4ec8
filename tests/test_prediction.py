"""Batched prediction of spectrum records: same numbers as the model, unusable spectra skipped, ZWARN bits,
anomaly score, and the resampler against specutils' `FluxConservingResampler`."""

from __future__ import annotations

import importlib.resources
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import astropy.units as u
import numpy as np
import pytest
import torch
from astropy.nddata import InverseVariance
from specutils import Spectrum
from specutils.manipulation import FluxConservingResampler

from specpt_hf import create_model
from specpt_hf.data import read_desi_spectra
from specpt_hf.data.instrument import DEIMOS, DESI, HST_G102
from specpt_hf.evaluation.metrics import pdf_coverage
from specpt_hf.prediction import (
    FlagThresholds,
    InferenceStats,
    SpecPTZwarn,
    batched,
    pdf_integral_transform,
    predict_batches,
    predict_records,
    predict_spectra,
    pz_bin_edges,
    zwarn_flags,
)
from specpt_hf.resampling import FLUX_UNIT, bin_edges, resample

pytestmark = pytest.mark.usefixtures("single_thread")

DATA = Path(str(importlib.resources.files("specutils") / "io/default_loaders/tests/desi_test_data"))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return create_model("specpt-tiny", "redshift").eval(), create_model("specpt-tiny", "autoencoder").eval()


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return [
        r
        for name in ("coadd-sv3-dark-26065.fits", "coadd-5-169-thru20210419.fits")
        for r in read_desi_spectra(DATA / name)
    ]


def model_outputs(model, records):
    with torch.no_grad():
        return model(
            flux=torch.as_tensor(np.stack([np.where(r["mask"], 0.0, r["flux"]) for r in records])),
            ivar=torch.as_tensor(np.stack([r["ivar"] for r in records])),
            mask=torch.as_tensor(np.stack([r["mask"] for r in records])),
        )


def test_records_match_the_model_and_unusable_spectra_are_skipped(models, records, caplog):
    model, _ = models
    empty = {**records[0], "targetid": 7, "mask": np.ones(7781, dtype=bool)}  # the model alone would raise
    nan = {**records[1], "targetid": 8, "flux": np.full(7781, np.nan, dtype=np.float32)}
    inputs = [records[0], empty, records[1], nan, records[2]]
    stats = InferenceStats()
    with caplog.at_level(logging.WARNING, logger="specpt_hf.prediction"):
        columns = predict_records(model, inputs, batch_size=2, stats=stats)
    assert columns["targetid"].tolist() == [r["targetid"] for r in records]
    expected = model_outputs(model, records)
    np.testing.assert_allclose(columns["z_pred"], expected.redshift.numpy(), rtol=1e-6)
    np.testing.assert_allclose(columns["zerr_pred"], expected.redshift_err.numpy(), rtol=1e-5)
    np.testing.assert_allclose(columns["quality"], expected.quality.numpy(), rtol=1e-5)
    assert columns["npixels"].tolist() == [int((~r["mask"]).sum()) for r in records]
    assert (stats.spectra, stats.skipped, stats.batches) == (3, 2, 3)
    assert "skipped 2 spectra without any usable pixel" in caplog.text
    assert "anomaly" not in columns

    with pytest.raises(ValueError, match="no spectra to predict"):
        predict_records(model, [empty])
    with pytest.raises(ValueError, match="batch_size"):
        list(batched(records, 0))


def test_anomaly_is_the_reduced_chi2_of_the_reconstruction(models, records, monkeypatch):
    model, autoencoder = models
    batch = next(batched(records, 8))
    out = predict_spectra(
        model,
        batch["flux"],
        batch["ivar"],
        batch["mask"],
        autoencoder=autoencoder,
        return_reconstruction=True,
    )
    with torch.no_grad():
        rec = autoencoder(
            flux=torch.as_tensor(np.where(batch["mask"], 0.0, batch["flux"])),
            ivar=torch.as_tensor(batch["ivar"]),
            mask=torch.as_tensor(batch["mask"]),
        )
    model_flux = (rec.reconstruction * rec.scale[:, None]).numpy()
    np.testing.assert_allclose(out["reconstruction"], model_flux, rtol=1e-5, atol=1e-6)

    # A known answer: with the reconstruction fixed to a smooth spectrum, a spectrum k standard deviations
    # from it at every good pixel (on either side, at random) has reduced chi^2 = k^2 exactly.
    reconstruction = torch.linspace(1.0, 3.0, batch["flux"].shape[1])  # [pixels]
    monkeypatch.setattr(
        autoencoder,
        "forward",
        lambda flux, **_: SimpleNamespace(
            reconstruction=reconstruction.expand(len(flux), -1), scale=torch.ones(len(flux))
        ),
    )
    k = np.array([0.5, 2.0, 3.0])  # one per record
    assert len(batch["flux"]) == len(k)
    side = np.random.default_rng(0).choice([-1.0, 1.0], size=batch["flux"].shape)
    sigma = 1.0 / np.sqrt(np.where(batch["ivar"] > 0, batch["ivar"], 1.0))  # [n, pixels]
    flux = (reconstruction.numpy() + k[:, None] * side * sigma).astype(np.float32)
    columns = predict_batches(model, [{**batch, "flux": flux}], autoencoder=autoencoder)
    np.testing.assert_allclose(columns["anomaly"], k**2, rtol=1e-4)  # float32 flux: ~1e-6 rounding
    flagged = (columns["zwarn"] & SpecPTZwarn.ANOMALOUS) > 0
    assert flagged.tolist() == [False, False, True]  # 0.25, 4 and 9 against max_anomaly = 5
    assert FlagThresholds().max_anomaly == 5.0


def test_zwarn_bits():
    config = create_model("specpt-tiny", "redshift").config
    width = config.redshift_bin_width
    z = np.array(
        [
            0.5,
            0.5,
            0.5,
            math.expm1(0.5 * width),
            math.expm1(math.log1p(config.z_max) - 0.5 * width),
            np.nan,
            0.5,
        ]
    )
    quality = np.array([0.9, 0.1, 0.9, 0.9, 0.9, np.nan, np.nan])
    npixels = np.array([7000, 7000, 3000, 7000, 7000, 0, 7000])
    anomaly = np.array([1.0, 1.0, 1.0, 1.0, 1.0, np.nan, 9.0])
    flags = zwarn_flags(config, z, quality, npixels, anomaly, FlagThresholds(0.5, 0.5, 5.0))
    Z = SpecPTZwarn
    assert flags.tolist() == [
        0,
        Z.LOW_QUALITY,
        Z.LITTLE_COVERAGE,
        Z.AT_Z_LIMIT,
        Z.AT_Z_LIMIT,
        Z.NODATA | Z.LITTLE_COVERAGE,
        Z.ANOMALOUS,
    ]
    star = zwarn_flags(
        config,
        z[3:4].repeat(2),
        quality[3:4].repeat(2),
        npixels[3:4].repeat(2),
        anomaly[3:4].repeat(2),
        FlagThresholds(0.5, 0.5, 5.0),
        np.array([50.0, 50.0]),
        npixels[3:4].repeat(2),
        np.array(["GALAXY", "STAR"]),
    )
    assert star.tolist() == [Z.AT_Z_LIMIT, 0]  # a star at z ~ 0 is not at the model's limit
    # positions shared with Redrock's ZWARN
    assert (Z.LITTLE_COVERAGE, Z.LOW_QUALITY, Z.AT_Z_LIMIT, Z.NODATA) == (2, 4, 32, 512)
    assert SpecPTZwarn.names(Z.NODATA | Z.LITTLE_COVERAGE) == ["LITTLE_COVERAGE", "NODATA"]
    with pytest.raises(ValueError, match="min_quality"):
        FlagThresholds(min_quality=1.5)


def test_a_fit_no_better_than_a_smooth_continuum_is_flagged():
    config = create_model("specpt-tiny", "redshift").config
    n = 4
    args = (config, np.full(n, 0.5), np.full(n, 0.9), np.full(n, 7000), np.full(n, 1.0))
    refined = (np.full(n, 50.0), np.full(n, 7000), np.full(n, "GALAXY"))
    feature_chi2 = np.array([120.0, 0.5, -3.0, np.nan])  # CHI2_SMOOTH - CHI2
    flags = zwarn_flags(*args, FlagThresholds(), *refined, feature_chi2)
    assert flags.tolist() == [0, 0, SpecPTZwarn.SMALL_DELTA_CHI2, 0]  # NaN never sets a bit
    stricter = zwarn_flags(*args, FlagThresholds(min_feature_chi2=25.0), *refined, feature_chi2)
    assert stricter.tolist() == [0, SpecPTZwarn.SMALL_DELTA_CHI2, SpecPTZwarn.SMALL_DELTA_CHI2, 0]
    off = zwarn_flags(*args, FlagThresholds(min_feature_chi2=-math.inf), *refined, feature_chi2)
    assert off.tolist() == [0, 0, 0, 0]
    stars = (refined[0], refined[1], np.full(n, "STAR"))
    assert zwarn_flags(*args, FlagThresholds(), *stars, feature_chi2).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="min_feature_chi2"):
        FlagThresholds(min_feature_chi2=math.nan)


def test_a_weak_galaxy_fit_needs_its_oii_doublet():
    config = create_model("specpt-tiny", "redshift").config
    n = 5
    args = (config, np.full(n, 1.0), np.full(n, 0.9), np.full(n, 7000), np.full(n, 1.0))
    delta_chi2 = np.array([12.0, 12.0, 12.0, 40.0, 12.0])
    spectype = np.array(["GALAXY", "GALAXY", "QSO", "GALAXY", "GALAXY"])
    # FOII_SNR 2, 8, 2, 2, unmeasured (off the grid); DESI's cut at DELTACHI2 12 needs S/N > 4.8
    oii = (np.array([2.0, 8.0, 2.0, 2.0, np.nan]), np.ones(n))
    refined = (delta_chi2, np.full(n, 7000), spectype, np.full(n, 100.0), oii)
    flags = zwarn_flags(*args, FlagThresholds(oii_delta_chi2=25.0), *refined)
    small = SpecPTZwarn.SMALL_DELTA_CHI2
    assert flags.tolist() == [small, 0, 0, 0, 0]  # only the weak GALAXY fit without its doublet
    assert zwarn_flags(*args, FlagThresholds(), *refined).tolist() == [0] * n  # 0: off
    with pytest.raises(ValueError, match="oii_delta_chi2"):
        FlagThresholds(oii_delta_chi2=-1.0)


def test_a_fit_weak_against_both_another_redshift_and_a_smooth_continuum_is_flagged():
    config = create_model("specpt-tiny", "redshift").config
    n = 5
    args = (config, np.full(n, 1.0), np.full(n, 0.9), np.full(n, 7000), np.full(n, 1.0))
    delta_chi2 = np.array([12.0, 12.0, 40.0, 12.0, 12.0])
    feature_chi2 = np.array([12.0, 40.0, 12.0, 12.0, np.nan])  # CHI2_SMOOTH - CHI2
    spectype = np.array(["GALAXY", "QSO", "QSO", "STAR", "GALAXY"])
    refined = (delta_chi2, np.full(n, 7000), spectype, feature_chi2)
    small = SpecPTZwarn.SMALL_DELTA_CHI2
    # weak on both counts: flagged; strong on either: kept; a STAR searches no redshift; NaN sets no bit
    assert zwarn_flags(*args, FlagThresholds(), *refined).tolist() == [small, 0, 0, 0, 0]
    assert zwarn_flags(*args, FlagThresholds(weak_fit_chi2=0.0), *refined).tolist() == [0] * n
    assert zwarn_flags(*args, FlagThresholds(weak_fit_chi2=50.0), *refined).tolist() == [
        small,
        small,
        small,
        0,
        0,
    ]
    with pytest.raises(ValueError, match="weak_fit_chi2"):
        FlagThresholds(weak_fit_chi2=-1.0)


@pytest.mark.parametrize("instrument", [DEIMOS, HST_G102], ids=lambda i: i.name)
def test_resampler_agrees_with_specutils(instrument):
    """`resample` against specutils' `FluxConservingResampler`, a per-pixel loop written independently, from
    a finer (DEIMOS, 0.33 Å) and a coarser (G102, 24.5 Å) grid onto DESI's 0.8 Å grid.

    Both average the input over the same bin edges (midpoints between centres) and propagate the variance as
    Σ w² σ² / (Σ w)², in float64; only the order of the sums differs, so they agree to rounding (measured:
    2e-16). The tolerance of 1e-10 leaves room for that and none for a wrong edge or weight: input edges
    shifted by 1e-4 Å already move the flux by 3e-5 and the ivar by 4e-4 (relative).
    """
    rng = np.random.default_rng(1)
    wave = instrument.wave
    lines = wave[0] + (wave[-1] - wave[0]) * np.array([0.2, 0.45, 0.7])
    width = 3.0 * (wave[1] - wave[0])  # a few input pixels: structure on every scale of both grids
    flux = 2.0 + np.sin(wave / 40.0) + rng.normal(0.0, 0.05, wave.size)
    flux += sum(3.0 * np.exp(-0.5 * ((wave - c) / width) ** 2) for c in lines)  # emission
    flux -= 1.5 * np.exp(-0.5 * ((wave - wave.mean() - 7 * width) / width) ** 2)  # an absorption line
    ivar = rng.uniform(50.0, 200.0, wave.size)
    spectrum = Spectrum(
        flux=flux * u.Unit(FLUX_UNIT), spectral_axis=wave * u.AA, uncertainty=InverseVariance(ivar)
    )
    theirs = FluxConservingResampler(extrapolation_treatment="nan_fill")(spectrum, DESI.wave * u.AA)
    their_flux, their_ivar = theirs.flux.value, theirs.uncertainty.array

    out_flux, out_ivar, out_mask = resample(wave, flux, ivar, DESI.wave)
    covered = ~out_mask  # output pixels wholly inside the input's coverage
    assert 1000 < covered.sum() < DESI.wave.size
    np.testing.assert_allclose(out_flux[covered], their_flux[covered], rtol=1e-10)
    np.testing.assert_allclose(out_ivar[covered], their_ivar[covered], rtol=1e-10)

    # Bad input pixels get no weight here (specutils has no mask): every output pixel that overlaps none of
    # them is still specutils' value on the whole spectrum.
    bad = rng.random(wave.size) < 0.02
    masked_flux, _, masked_mask = resample(wave, flux, ivar, DESI.wave, mask=bad)
    in_edges, out_edges = bin_edges(wave), bin_edges(DESI.wave)
    first = np.searchsorted(in_edges, out_edges[:-1], side="right") - 1  # input pixel holding each left edge
    last = np.searchsorted(in_edges, out_edges[1:], side="left") - 1  # the last one starting before the right
    n_bad = np.concatenate([[0], np.cumsum(bad)])
    clean = covered & (n_bad[np.clip(last, 0, wave.size - 1) + 1] == n_bad[np.clip(first, 0, wave.size - 1)])
    assert 0 < clean.sum() < covered.sum() and not masked_mask[clean].any()
    np.testing.assert_allclose(masked_flux[clean], their_flux[clean], rtol=1e-10)


def test_predict_batches_pit_is_the_pz_mass_below_the_label(models, records):
    model = models[0]
    batch = next(batched(records, len(records)))
    batch["z"] = np.array([0.3, 1.1, np.nan])  # labels; the last spectrum has none
    pit = predict_batches(model, [batch], pit=True)["pz_pit"]  # [n]
    pz = predict_spectra(model, batch["flux"], batch["ivar"], batch["mask"], return_pdf=True)[
        "pz"
    ]  # [n, bins]
    edges = pz_bin_edges(model)  # [bins + 1], in ln(1 + z)
    np.testing.assert_allclose(edges[[0, -1]], np.log1p([model.config.z_min, model.config.z_max]), atol=1e-9)
    u = np.log1p(batch["z"][:2])
    below = np.array([p[edges[1:] <= t].sum() for p, t in zip(pz, u, strict=False)]) / pz[:2].sum(1)
    own_bin = np.array([p[(edges[:-1] <= t) & (t < edges[1:])].sum() for p, t in zip(pz, u, strict=False)])
    assert np.all(pit[:2] >= below - 1e-6) and np.all(pit[:2] <= below + own_bin / pz[:2].sum(1) + 1e-6)
    assert np.isnan(pit[2])
    assert "pz_pit" not in predict_batches(model, [batch])  # only when asked
    unlabelled = {key: value for key, value in batch.items() if key != "z"}
    assert "pz_pit" not in predict_batches(model, [unlabelled], pit=True)


def _gaussian_pdfs(centres: np.ndarray, sigma: float, edges: np.ndarray) -> np.ndarray:
    """Bin masses [n, bins] of Gaussians N(centre, sigma) over `edges`."""
    from scipy.stats import norm

    return np.diff(norm.cdf((edges[None, :] - centres[:, None]) / sigma), axis=1)


def test_pdf_integral_transform_is_uniform_and_covers_its_levels_for_calibrated_pdfs():
    rng = np.random.default_rng(3)
    edges = np.linspace(0.0, 2.0, 401)  # bins of 0.005
    truth = rng.uniform(0.5, 1.5, 20_000)
    centres = truth + rng.normal(0.0, 0.05, truth.size)  # each p(z) is N(centre, 0.05): calibrated
    pit = pdf_integral_transform(_gaussian_pdfs(centres, 0.05, edges), edges, truth)
    assert np.histogram(pit, bins=10, range=(0, 1))[0].min() > 0.9 * truth.size / 10
    coverage = pdf_coverage(pit)
    assert abs(coverage["0.68"] - 0.68) < 0.015 and abs(coverage["0.95"] - 0.95) < 0.01
    narrow = pdf_integral_transform(_gaussian_pdfs(centres, 0.02, edges), edges, truth)  # too confident
    assert pdf_coverage(narrow)["0.68"] < 0.4


def test_pdf_integral_transform_interpolates_within_a_bin_and_clips_outside():
    edges = np.array([0.0, 1.0, 2.0, 3.0])
    probability = np.array([[0.2, 0.6, 0.2]] * 4)
    pit = pdf_integral_transform(probability, edges, np.array([-1.0, 0.5, 1.5, 4.0]))
    np.testing.assert_allclose(pit, [0.0, 0.1, 0.5, 1.0])
    unnormalised = pdf_integral_transform(2 * probability[:1], edges, np.array([1.5]))
    np.testing.assert_allclose(unnormalised, [0.5])


def test_pdf_integral_transform_names_bad_arguments():
    edges = np.array([0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="probability must be"):
        pdf_integral_transform(np.ones((2, 3)), edges, np.zeros(2))
    with pytest.raises(ValueError, match="values must be 2 finite numbers"):
        pdf_integral_transform(np.ones((2, 2)), edges, np.zeros(3))
    with pytest.raises(ValueError, match="values must be 2 finite numbers"):
        pdf_integral_transform(np.ones((2, 2)), edges, np.array([0.5, np.nan]))
    with pytest.raises(ValueError, match="edges must increase"):
        pdf_integral_transform(np.ones((2, 2)), np.array([0.0, 1.0, 1.0]), np.zeros(2))
