"""The recipe models the benchmark figures come from (benchmarks/models/specpt-small-cpu-aug; -sps, trained with
the sps family mixed in; -sps-t9000, the same with templates from 9,000 spectra per type): each loads with today's
code, its network places bright mock galaxies within a few p(z) bins, and its templates refine them to a fraction of
a pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from specpt_hf.data.mock import generate_spectra
from specpt_hf.loading import load_model
from specpt_hf.prediction import model_wavelength, predict_spectra

pytestmark = pytest.mark.usefixtures("single_thread")

MODELS = Path(__file__).resolve().parents[1] / "benchmarks" / "models"


@pytest.mark.parametrize(
    "name", ["specpt-small-cpu-aug", "specpt-small-cpu-sps", "specpt-small-cpu-sps-t9000"]
)
def test_recipe_model_measures_bright_mock_galaxies(name):
    model = load_model(MODELS / name, task="redshift")
    assert model.refines and model.config.spectype_labels == ["GALAXY", "QSO"]
    for target_class in ("bgs", "lrg"):
        mock = generate_spectra(target_class, 24, seed=17)
        np.testing.assert_allclose(mock["wave"], model_wavelength(model.config))
        out = predict_spectra(model, mock["flux"], mock["ivar"], mock["mask"])
        z_true = np.asarray(mock["truth"]["z"], dtype=np.float64)
        error = np.abs(out["z"] - z_true) / (1.0 + z_true)
        assert (error < 1e-3).mean() >= 0.9, (target_class, np.sort(error))
        assert np.median(error) < 3e-4  # a p(z) bin is 0.0063 wide: the chi^2 fit does the rest
        assert (out["spectype"] == "GALAXY").mean() >= 0.9
        network = np.abs(out["z_net"] - z_true) / (1.0 + z_true)  # the trained network's own estimate
        assert np.median(network) < 0.03 and (network < 0.15).mean() >= 0.9, (target_class, np.sort(network))
