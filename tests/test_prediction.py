"""Batched prediction of spectrum records: same numbers as the model, unusable spectra skipped, ZWARN bits,
anomaly score, and the pipeline's resampler against `specpt_hf.data.instrument.resample`."""

from __future__ import annotations

import importlib.resources
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from specpt_hf import create_model
from specpt_hf.data import read_desi_spectra
from specpt_hf.data.instrument import DEIMOS, DESI, HST_G102, resample
from specpt_hf.prediction import (
    FlagThresholds,
    InferenceStats,
    SpecPTZwarn,
    batched,
    predict_batches,
    predict_records,
    predict_spectra,
    resample_spectra,
    zwarn_flags,
)

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


def test_anomaly_is_the_reduced_chi2_of_the_reconstruction(models, records):
    model, autoencoder = models
    batch = next(batched(records, 8))
    columns = predict_batches(model, [batch], autoencoder=autoencoder)
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
    good = ~batch["mask"]
    chi2 = np.where(good, batch["ivar"] * (batch["flux"] - model_flux) ** 2, 0.0).sum(1) / good.sum(1)
    np.testing.assert_allclose(columns["anomaly"], chi2, rtol=1e-4)
    np.testing.assert_allclose(out["reconstruction"], model_flux, rtol=1e-5, atol=1e-6)
    flagged = (columns["zwarn"] & SpecPTZwarn.ANOMALOUS) > 0
    assert flagged.tolist() == (chi2 > FlagThresholds().max_anomaly).tolist()


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


@pytest.mark.parametrize("instrument", [DEIMOS, HST_G102], ids=lambda i: i.name)
def test_resampler_agrees_with_the_instrument_module(instrument):
    rng = np.random.default_rng(1)
    wave = instrument.wave
    flux = 1.0 + 0.3 * np.sin(wave / 50.0)[None] + 0.05 * rng.standard_normal((2, len(wave)))
    ivar = rng.uniform(50.0, 200.0, (2, len(wave)))
    mask = rng.random((2, len(wave))) < 0.1
    ours = resample_spectra(wave, flux, ivar, mask, DESI.wave)
    theirs = resample(wave, flux, ivar, DESI.wave, mask=mask)
    np.testing.assert_array_equal(ours[2], theirs[2])
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-5)
    covered = ~ours[2][0]
    assert covered.any() and not covered.all()
