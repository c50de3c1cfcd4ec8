"""Real DESI spectra through the models, and the main job (quick mode) from mock files to the report."""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from specpt_hf import SpecPTForRedshift, SpecPTForSpectrumReconstruction
from specpt_hf.data import read_desi_spectra
from specpt_hf.evaluation import read_results_json
from specpt_hf.presets import preset_config

pytestmark = pytest.mark.usefixtures("single_thread")

DATA = Path(str(importlib.resources.files("specutils") / "io/default_loaders/tests/desi_test_data"))
REAL_COADDS = [DATA / "coadd-sv3-dark-26065.fits", DATA / "coadd-5-169-thru20210419.fits"]
ROOT = Path(__file__).resolve().parents[1]


def real_batch() -> dict[str, torch.Tensor]:
    records = [record for path in REAL_COADDS for record in read_desi_spectra(path)]
    return {key: torch.as_tensor(np.stack([r[key] for r in records])) for key in ("flux", "ivar", "mask")}


@torch.inference_mode()
def test_forward_on_real_desi_spectra():
    batch = real_batch()
    assert batch["flux"].shape[1] == 7781
    torch.manual_seed(0)
    redshift = SpecPTForRedshift(preset_config("specpt-tiny", "redshift")).eval()
    out = redshift(**batch)
    for name in ("redshift", "redshift_err", "quality"):
        assert out[name].shape == (batch["flux"].shape[0],)
        assert torch.isfinite(out[name]).all(), name
    assert ((out.redshift >= 0) & (out.redshift <= redshift.config.z_max)).all()
    autoencoder = SpecPTForSpectrumReconstruction(preset_config("specpt-tiny")).eval()
    recon = autoencoder(**batch, labels=batch["flux"])
    assert recon.reconstruction.shape == batch["flux"].shape
    assert torch.isfinite(recon.reconstruction).all() and torch.isfinite(recon.loss)


def load_main_job():
    spec = importlib.util.spec_from_file_location("run_main_job", ROOT / "examples" / "run_main_job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_main_job_quick_writes_report(tmp_path, capsys):
    job = load_main_job()
    assert job.main(["--out", str(tmp_path), "--quick"]) == 0
    report = (tmp_path / "report.md").read_text()
    for name in ("all", "bgs", "lrg", "elg", "qso"):
        assert f"| {name} |" in report
    evaluation = tmp_path / "evaluation"
    for png in ("redshift_comparison", "error_histogram", "pull_distribution", "pz_pit", "reconstructions"):
        assert (evaluation / f"{png}.png").stat().st_size > 10_000
        assert f"evaluation/{png}.png" in report
    results = read_results_json(evaluation / "results.json")
    coverage = json.loads((evaluation / "results.json").read_text())["pz_calibration"]["all"]
    assert 0 <= coverage["0.68"] <= coverage["0.95"] <= 1
    assert {entry["config"] for r in results["model-index"] for entry in _metric_entries(r)} >= {"bgs", "elg"}
    real = json.loads((tmp_path / "real_desi_predictions.json").read_text())
    expected = [int(r["targetid"]) for path in job.REAL_DESI_FILES for r in read_desi_spectra(DATA / path)]
    assert [row["targetid"] for row in real] == expected
    assert all(np.isfinite([row["z"], row["zerr"], row["quality"]]).all() for row in real)
    assert str(tmp_path / "report.md") in capsys.readouterr().out

    # a second run reuses every finished step and only re-evaluates
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert job.main(["--out", str(tmp_path), "--quick"]) == 0
    assert (
        json.loads((tmp_path / "timings.json").read_text())["mock DESI files"] == timings["mock DESI files"]
    )


def _metric_entries(model_index_entry: dict) -> list[dict]:
    return [metric for result in model_index_entry["results"] for metric in result["metrics"]]
