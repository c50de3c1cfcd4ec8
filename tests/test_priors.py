"""Redrock priors from p(z): the window's width, the file's layout, and Redrock reading it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from astropy.io import fits

from specpt_hf.priors import GAUSSIAN_99, prior_halfwidths, write_priors

PZ_Z = np.expm1(np.log1p(0.0) + (np.arange(600) + 0.5) * 0.002)  # bins uniform in ln(1 + z), like the model's


def gaussian_pz(*modes: tuple[float, float, float]) -> np.ndarray:
    """p(z) per bin: a sum of (weight, centre, sigma) Gaussians in z, normalised [bins]."""
    pz = sum(w * np.exp(-0.5 * ((PZ_Z - c) / s) ** 2) for w, c, s in modes)
    return pz / pz.sum()


def test_a_single_mode_gives_its_99_percent_interval():
    sigma = 0.02
    half = prior_halfwidths(PZ_Z, gaussian_pz((1.0, 0.8, sigma))[None], np.array([0.8]))[0]
    assert half == pytest.approx(GAUSSIAN_99 * sigma, rel=0.1)  # binned: within a bin or so


def test_two_modes_give_a_window_over_both():
    pz = gaussian_pz((0.7, 0.5, 0.01), (0.3, 1.1, 0.01))
    half = prior_halfwidths(PZ_Z, pz[None], np.array([0.5]))[0]
    assert 0.6 < half < 0.7  # reaches past the second mode at 1.1
    narrow = prior_halfwidths(PZ_Z, pz[None], np.array([0.5]), coverage=0.6)[0]
    assert narrow < 0.05


def test_the_window_is_never_under_min_bins_and_nan_rows_stay_nan():
    sharp = np.zeros((2, len(PZ_Z)))
    sharp[0, 300] = 1.0
    sharp[1] = np.nan
    z = np.array([PZ_Z[300], 0.3])
    half = prior_halfwidths(PZ_Z, sharp, z, min_bins=2.0)
    assert half[0] == pytest.approx(2.0 * 0.002 * (1 + z[0]), rel=1e-6) and np.isnan(half[1])
    with pytest.raises(ValueError, match="coverage"):
        prior_halfwidths(PZ_Z, sharp, z, coverage=0.0)
    with pytest.raises(ValueError, match="`pz` must be"):
        prior_halfwidths(PZ_Z, sharp[:, :-1], z)


@pytest.mark.parametrize("function", ["tophat", "gaussian"])
def test_priors_file_has_redrocks_layout(tmp_path, function):
    path = write_priors(
        tmp_path / "p.fits", [5, 6, 7], np.array([0.1, 0.2, 0.3]), np.array([0.01, np.nan, 0.03]), function
    )
    with fits.open(path) as hdul:
        data = hdul["PRIORS"].data
        assert data.columns.names == ["TARGETID", "Z", "SIGMA", "FUNCTION"]
    assert data["TARGETID"].tolist() == [5, 7]  # no window, no prior: Redrock fits it unconstrained
    expected = [0.02, 0.06] if function == "tophat" else [0.01 / GAUSSIAN_99, 0.03 / GAUSSIAN_99]
    np.testing.assert_allclose(data["SIGMA"], expected)
    assert set(data["FUNCTION"]) == {function}
    with pytest.raises(ValueError, match="prior function"):
        write_priors(tmp_path / "q.fits", [1], np.array([0.1]), np.array([0.01]), "box")


def test_predict_priors_out_is_read_by_redrock(tmp_path):
    from specpt_hf import create_model
    from specpt_hf.data.mock import write_mock_healpix
    from specpt_hf.predict import main as predict_main

    torch.manual_seed(0)
    create_model("specpt-tiny", "redshift").save_pretrained(tmp_path / "model")
    coadd = write_mock_healpix(tmp_path / "data", "elg", 5, seed=3, healpix=26700)[0]
    argv = [
        str(coadd),
        "--model",
        str(tmp_path / "model"),
        "--out",
        str(tmp_path / "c.fits"),
        "--no-progress",
    ]
    assert predict_main([*argv, "--priors-out", str(tmp_path / "priors.fits")]) == 0
    catalog = fits.getdata(tmp_path / "c.fits", "REDSHIFTS")
    priors = fits.getdata(tmp_path / "priors.fits", "PRIORS")
    assert priors["TARGETID"].tolist() == catalog["TARGETID"].tolist()
    np.testing.assert_array_equal(priors["Z"], catalog["Z"])
    assert (priors["SIGMA"] > 0).all() and set(priors["FUNCTION"]) == {"gaussian"}
    assert [h.name for h in fits.open(tmp_path / "c.fits")] == [
        "PRIMARY",
        "REDSHIFTS",
    ]  # no PZ without --save-pdf
    assert predict_main([*argv, "--priors-out", str(coadd)]) == 1  # never over an input

    redrock = pytest.importorskip("redrock.priors")
    prior = redrock.Priors(str(tmp_path / "priors.fits"))
    row = priors[0]
    grid = np.array([row["Z"], row["Z"] + row["SIGMA"]])
    np.testing.assert_allclose(prior.eval(int(row["TARGETID"]), grid), [0.0, 1.0])  # Redrock's chi^2 penalty
