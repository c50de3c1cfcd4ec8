"""The benchmark scripts in benchmarks/: each one's --quick mode, plus the pieces they are built from.

Redrock is optional (`pip install -e .[bench]` + `pip install --no-deps desispec desitarget`); without it the
Redrock parts are skipped and the scripts are checked to report the skip.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from astropy.io import fits
from astropy.table import Table

from specpt_hf.evaluation.metrics import NMAD_SCALE
from specpt_hf.presets import count_parameters, preset_config

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import accuracy  # noqa: E402
import archetypes  # noqa: E402
import attention_kernels  # noqa: E402
import compare_predictions  # noqa: E402
import failure_causes  # noqa: E402
import fine_scan  # noqa: E402
import ideal_observer  # noqa: E402
import noise_redrock  # noqa: E402
import parquet_writers  # noqa: E402
import prepare_rate  # noqa: E402
import redrock_priors  # noqa: E402
import redrock_subset  # noqa: E402
import redrock_templates  # noqa: E402
import refinement_frontier  # noqa: E402
import refinement_sweep  # noqa: E402
import robustness  # noqa: E402
import run_redrock  # noqa: E402
import speed  # noqa: E402
import stars  # noqa: E402
import template_smoothing  # noqa: E402
import train_specpt_small_cpu as recipe  # noqa: E402
import train_throughput  # noqa: E402
import zwarn_thresholds  # noqa: E402

REDROCK_MISSING = run_redrock.redrock_missing()
needs_redrock = pytest.mark.skipif(
    REDROCK_MISSING is not None, reason=f"Redrock not installed: {REDROCK_MISSING}"
)


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> Path:
    """Quick Redrock templates, built once for the module."""
    folder = tmp_path_factory.mktemp("rrtemplates")
    redrock_templates.build_templates(folder, **redrock_templates.QUICK_SETTINGS)
    return folder


# ------------------------------------------------------------------------------------------- templates


def test_pca_basis_spans_the_generating_vectors():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3, 500))  # [3, m]
    spectra = rng.normal(size=(40, 3)) @ vectors  # [40, m]
    basis, power = redrock_templates.pca_basis(spectra.astype(np.float32), 3, chunk=128)
    assert basis.shape == (3, 500)
    np.testing.assert_allclose(np.linalg.norm(basis, axis=1), 1.0, rtol=1e-6)
    projected = vectors @ basis.T @ basis  # projection onto the basis
    np.testing.assert_allclose(projected, vectors, atol=1e-3 * np.abs(vectors).max())
    assert power.sum() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="n_vectors"):
        redrock_templates.pca_basis(spectra, 41)


def test_template_files_have_redrock_layout_and_fit_new_mock_spectra(templates):
    listed = (templates / redrock_templates.LIST_FILE).read_text().split()
    assert [name for name in listed if name.endswith(".fits")] == [
        "rrtemplate-GALAXY-None-vmock-1.fits",
        "rrtemplate-QSO-None-vmock-1.fits",
    ]
    with fits.open(templates / "rrtemplate-GALAXY-None-vmock-1.fits") as hdul:
        header, basis = hdul["BASIS_VECTORS"].header, hdul["BASIS_VECTORS"].data
        assert (header["RRTYPE"], header["RRMETHOD"], header["LOGLAM"]) == ("GALAXY", "PCA", 0)
        assert basis.shape == (redrock_templates.QUICK_SETTINGS["galaxy_vectors"], header["NAXIS1"])
        wave = header["CRVAL1"] + header["CDELT1"] * np.arange(header["NAXIS1"])
    # a fresh draw of the mock's galaxies (another seed) is reproduced by the basis to a few per cent
    spectra = redrock_templates.rest_frame_spectra("elg", 20, seed=4321, wave=wave)
    spectra /= np.median(spectra, axis=1, keepdims=True)

    def relative_residual(vectors: np.ndarray) -> float:
        coeff, *_ = np.linalg.lstsq(vectors.T, spectra.T, rcond=None)
        residual = spectra - (vectors.T @ coeff).T
        return float(np.sqrt((residual**2).mean() / (spectra**2).mean()))

    assert relative_residual(basis) < 0.1
    assert relative_residual(basis) < 0.5 * relative_residual(basis[:1])
    with pytest.raises(ValueError, match="GALAXY and/or QSO"):
        redrock_templates.build_templates(templates, types=["STAR"])


@needs_redrock
def test_redrock_reads_the_templates(templates):
    from redrock.templates import Template

    galaxy = Template(str(templates / "rrtemplate-GALAXY-None-vmock-1.fits"))
    qso = Template(str(templates / "rrtemplate-QSO-None-vmock-1.fits"))
    assert (galaxy.template_type, galaxy.method, galaxy.igm_model) == ("GALAXY", "PCA", "None")
    assert (qso.template_type, qso.igm_model, qso.nbasis) == ("QSO", "Calura12", 3)
    assert galaxy.wave[0] < 3600 / 2.7 and galaxy.wave[-1] > 9824 / 0.995  # DESI at -0.005 < z < 1.7
    assert qso.wave[0] < 3600 / 7.0 and qso.wave[-1] > 9824 / 1.05  # DESI at 0.05 < z < 6


# ----------------------------------------------------------------------------------------- redrock


@needs_redrock
def test_run_redrock_quick_fits_the_mock(tmp_path):
    assert run_redrock.main(["--quick", "--out", str(tmp_path)]) == 0
    timing = json.loads((tmp_path / "redrock_timing.json").read_text())
    table = Table.read(tmp_path / "redrock.ecsv")
    assert timing["n_spectra"] == len(table) == 4  # 3 targets + 1 sky fibre
    assert timing["cpu_seconds"] > 0 and timing["cpu_core_seconds_per_spectrum"] > 0
    assert np.isfinite(np.asarray(table["Z"])).all()
    assert set(np.asarray(table["SPECTYPE"])) <= {"GALAXY", "QSO"}


@needs_redrock
def test_redrock_priors_quick_runs_redrock_with_and_without_the_priors(tmp_path, templates):
    argv = ["--quick", "--out", str(tmp_path), "--templates", str(templates)]
    assert redrock_priors.main(argv) == 0
    results = json.loads((tmp_path / "redrock_priors.json").read_text())
    assert set(results["metrics"]) == {"SpecPT", "Redrock", "Redrock + SpecPT priors"}
    assert results["n_common"] > 0 and results["metrics"]["Redrock"]["all"]["n"] == results["n_common"]
    priors = fits.getdata(tmp_path / "specpt-priors.fits", "PRIORS")
    assert len(priors) == len(Table.read(tmp_path / "specpt.fits", hdu="REDSHIFTS"))
    for run in ("redrock", "redrock-priors"):
        assert list((tmp_path / run).glob("redrock-*.fits"))
    assert "| all | Redrock + SpecPT priors |" in (tmp_path / "redrock_priors.md").read_text()


def test_redrock_priors_compares_the_targets_every_method_fitted():
    truth = Table(
        {"TARGETID": [5, 3, 9, 7], "Z": [0.5, 0.3, 0.9, 0.7], "TARGET_CLASS": ["elg", "lrg", "elg", "qso"]}
    )
    tables = {
        "A": Table({"TARGETID": [9, 5, 3], "Z": [0.9, 0.5, 0.8]}),  # 0.3 -> 0.8: an outlier
        "B": Table({"TARGETID": [3, 9, 7, 1], "Z": [0.3, 0.9, 0.7, 2.0]}),  # 1 is no target
    }
    result = redrock_priors.compare(truth, tables)
    assert result["n_common"] == 2  # TARGETIDs 3 and 9
    a, b = result["metrics"]["A"], result["metrics"]["B"]
    assert a["all"]["n"] == b["all"]["n"] == 2 and set(a) == {"all", "elg", "lrg"}
    assert a["lrg"]["eta"] == 1.0 and a["elg"]["eta"] == 0.0 and b["all"]["eta"] == 0.0


def test_join_predictions_fills_what_a_method_did_not_fit():
    truth = Table({"TARGETID": [5, 3, 9], "Z": [0.5, 0.3, 0.9]})
    specpt = {
        "m": {"columns": {"targetid": np.array([9, 5, 4]), "z_pred": [0.8, 0.4, 1.0], "zwarn": [0, 4, 0]}}
    }
    redrock = Table(
        {
            "TARGETID": [3, 9],
            "Z": [0.31, 0.91],
            "ZWARN": [0, 0],
            "DELTACHI2": [50.0, 9.0],
            "SPECTYPE": ["GALAXY", "QSO"],
        }
    )
    table = accuracy.join_predictions(truth, specpt, redrock)
    assert table["TARGETID"].tolist() == [5, 3, 9]  # the truth's rows, in order
    np.testing.assert_array_equal(table["Z_m"], [0.4, np.nan, 0.8])
    assert table["ZWARN_m"].tolist() == [4, -1, 0]
    np.testing.assert_array_equal(table["Z_Redrock"], [np.nan, 0.31, 0.91])
    assert table["RR_ZWARN"].tolist() == [-1, 0, 0] and table["RR_SPECTYPE"].tolist() == ["", "GALAXY", "QSO"]
    np.testing.assert_array_equal(table["RR_DELTACHI2"], [np.nan, 50.0, 9.0])
    assert accuracy.join_predictions(truth, {}, None)["TARGETID"].tolist() == [5, 3, 9]


def test_robustness_quick_writes_every_perturbation(tmp_path):
    assert robustness.main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "robustness.json").read_text())
    assert list(results["metrics"]) == list(robustness.PERTURBATIONS)
    assert all(results["metrics"][name]["network"]["all"]["n"] == 32 for name in results["metrics"])
    sigma = {name: results["metrics"][name]["network"]["all"]["sigma_z"] for name in results["metrics"]}
    assert all(value > 0 for value in sigma.values())
    assert (tmp_path / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| masked span ≤ 200 px | network | all | 32 |" in (tmp_path / "robustness.md").read_text()
    if "second_family_skipped" in results:  # no BC03 library
        return
    family = results["second_family"]
    assert family["family"] == "bc03" and "healpix 37000+" in family["test_set"]
    rows = family["metrics"]["network"]
    assert [rows[cls]["n"] for cls in ("all", "bgs", "lrg", "elg")] == [24, 8, 8, 8]
    basis = results["metrics"]["none"]["network"]
    assert rows["lrg"]["basis_nmad"] == basis["lrg"]["nmad"] and rows["all"]["basis_n"] == 24
    assert rows["bgs"]["nmad_ratio"] == pytest.approx(rows["bgs"]["nmad"] / basis["bgs"]["nmad"])
    assert "| network | elg | 8 |" in (tmp_path / "robustness.md").read_text()
    assert "## A held-out mock family (`bc03`)" in (tmp_path / "robustness.md").read_text()
    files = sorted(p.name for p in (tmp_path / "testset-bc03").rglob("coadd-*.fits"))
    assert files == ["coadd-sv3-bright-37000.fits", "coadd-sv3-dark-37001.fits", "coadd-sv3-dark-37002.fits"]
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "testset-bc03").rglob("coadd-*.fits")}
    again = accuracy.make_test_set(tmp_path / "testset-bc03", 8, accuracy.TEST_SEED, 8, family="bc03")
    assert sorted(p for paths in again.values() for p in paths) == sorted(stamps)  # reused, not written again
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_robustness_takes_the_sps_family(tmp_path):
    argv = ["--quick", "--perturbations", "none", "--family", "sps", "--out", str(tmp_path)]
    assert robustness.main(argv) == 0
    results = json.loads((tmp_path / "robustness.json").read_text())
    if "second_family_skipped" in results:  # no E-MILES library
        return
    assert results["family"] == results["second_family"]["family"] == "sps"
    assert "healpix 35000+" in results["second_family"]["test_set"]
    assert "E-MILES stellar populations" in (tmp_path / "robustness.md").read_text()


def test_refinement_frontier_quick_runs_every_setting(tmp_path):
    assert refinement_frontier.main(["--quick", "--out", str(tmp_path), "--redrock-rate", "1.0"]) == 0
    rows = json.loads((tmp_path / "frontier.json").read_text())["settings"]
    settings = [(r["refinement"], r["modes"], r["window_bins"], r["coarse_vectors"], r["bf16"]) for r in rows]
    assert settings[: len(refinement_frontier.SETTINGS)] == [tuple(s) for s in refinement_frontier.SETTINGS]
    wide = settings[len(refinement_frontier.SETTINGS) :]  # all vectors and the default number, fp32 and bf16
    assert [(s[0], s[3], s[4]) for s in wide] == [
        ("peaks+wide", coarse, bf16) for coarse in (0, 7) for bf16 in (False, True)
    ]
    assert sum(s[-1] for s in settings) == 5  # network-only, two peaks and two peaks+wide with bf16 autocast
    assert all(r["spectra_per_cpu_second"] > 0 and r["by_class"]["all"]["n"] == 24 for r in rows)
    text = (tmp_path / "frontier.md").read_text()
    assert "| peaks | 3 | 2 | 5 | fp32 |" in text and "| peaks | 3 | 2 | all | bf16 |" in text


def test_refinement_frontier_only_config_runs_the_models_own_setting(tmp_path):
    argv = ["--quick", "--only-config", "--out", str(tmp_path), "--redrock-rate", "2.0"]
    assert refinement_frontier.main(argv) == 0
    result = json.loads((tmp_path / "frontier.json").read_text())
    (row,) = result["settings"]
    config = refinement_frontier.load_redshift_model("specpt-tiny", None).config  # the quick model's
    assert (row["refinement"], row["modes"], row["window_bins"], row["coarse_vectors"], row["bf16"]) == (
        config.refinement,
        config.refinement_modes,
        config.refinement_window,
        config.refinement_coarse_vectors,
        False,
    )
    assert result["redrock_rate_source"] == "--redrock-rate"
    assert "Redrock: 2.000 spectra per core-second (--redrock-rate)" in (tmp_path / "frontier.md").read_text()


def test_lower_snr_copy_is_the_same_sky_at_a_shorter_exposure(tmp_path):
    (source, *_) = accuracy.make_test_set(tmp_path / "testset", 6, accuracy.TEST_SEED, 6)["elg"]
    target = noise_redrock.lower_snr(source, tmp_path / "low" / source.name, 2.0, seed=3)
    assert accuracy.truth_path(target).read_bytes() == accuracy.truth_path(source).read_bytes()
    with fits.open(source) as a, fits.open(target) as b:
        for arm in noise_redrock.ARMS:
            ivar, flux = a[f"{arm}_IVAR"].data.astype(float), a[f"{arm}_FLUX"].data.astype(float)
            good = ivar > 0
            np.testing.assert_allclose(b[f"{arm}_IVAR"].data, ivar / 4.0, rtol=1e-6)
            added = (b[f"{arm}_FLUX"].data - flux)[good] * np.sqrt(ivar[good])  # in the original sigmas
            assert np.std(added) == pytest.approx(np.sqrt(3.0), rel=0.02)  # variance (4 - 1) / ivar
            assert np.array_equal(b[f"{arm}_FLUX"].data[~good], a[f"{arm}_FLUX"].data[~good])
        snr = "MEDIAN_COADD_SNR_R"
        np.testing.assert_allclose(b["SCORES"].data[snr], a["SCORES"].data[snr] / 2.0, rtol=1e-6)


def test_ideal_observer_finds_each_spectrum_with_its_own_model():
    s = ideal_observer.spectra_with_models("elg", 6)
    z_range = (0.5, 1.8)
    z = ideal_observer.best_redshifts(s["wave"], s["model"], s["ivar"], s["model"], s["z"], z_range)
    np.testing.assert_allclose(z, s["z"], atol=1e-5)  # noiseless: the truth, to a fraction of a 1e-5 step
    noisy = ideal_observer.best_redshifts(s["wave"], s["flux"], s["ivar"], s["model"], s["z"], z_range)
    assert np.all(np.abs(noisy - s["z"]) / (1 + s["z"]) < 0.15)
    narrow = ideal_observer.best_redshifts(s["wave"], s["model"], s["ivar"], s["model"], s["z"], (0.1, 0.2))
    assert np.all((narrow > 0.1 - 1e-4) & (narrow < 0.2 + 1e-4))  # inside, or up to 2 local steps beyond


def test_ideal_observer_lowers_each_spectrums_snr_by_one_factor():
    s = ideal_observer.spectra_with_models("bgs", 20)
    flux, ivar = ideal_observer.lower_snr(s["flux"], s["ivar"], 2.0, torch.Generator().manual_seed(0))
    good = s["ivar"] > 0
    ratio = np.where(good, s["ivar"] / np.where(ivar > 0, ivar, 1), np.nan)  # f² per pixel
    per_spectrum = np.nanmedian(ratio, axis=1)
    assert np.all((per_spectrum >= 1.0) & (per_spectrum <= 4.0)) and np.ptp(per_spectrum) > 0.5
    np.testing.assert_allclose(
        ratio[good], np.broadcast_to(per_spectrum[:, None], good.shape)[good], rtol=1e-4
    )
    assert np.array_equal(ivar[~good], np.zeros((~good).sum())) and not np.array_equal(
        flux[good], s["flux"][good]
    )


def test_ideal_observer_quick_puts_specpt_beside(tmp_path):
    row = {"all": {"nmad": 1e-4, "eta": 0.01}, "elg": {"nmad": 2e-4, "eta": 0.02}}
    lower = {"all": {"nmad": 2e-4, "eta": 0.05}, "elg": {"nmad": 5e-4, "eta": 0.12}}
    metrics = {"none": {"refined": row}, "S/N ÷ ≤ 2": {"refined": lower}}
    (tmp_path / "robustness.json").write_text(json.dumps({"metrics": metrics}))
    argv = ["--quick", "--out", str(tmp_path / "io"), "--robustness", str(tmp_path / "robustness.json")]
    assert ideal_observer.main(argv) == 0
    result = json.loads((tmp_path / "io" / "ideal_observer.json").read_text())
    assert list(result["metrics"]) == ["own depth", "S/N ÷ ≤ 2"]
    assert [result["metrics"]["own depth"][c]["n"] for c in ("all", *accuracy.CLASSES)] == [32, 8, 8, 8, 8]
    assert result["specpt_refined"]["elg"] == pytest.approx([2.5, 10.0])
    assert "| 2.50 | +10.00 |" in (tmp_path / "io" / "ideal_observer.md").read_text()
    fitted = Table.read(tmp_path / "io" / "ideal_observer.ecsv")
    assert fitted.colnames == ["CLASS", "Z", "Z_OWN", "Z_LOWER"] and len(fitted) == 32
    assert ideal_observer.metrics(fitted, 2.0) == result["metrics"]
    with pytest.raises(ValueError, match="no 'S/N ÷ ≤ 3' row"):
        ideal_observer.specpt_rows(tmp_path / "robustness.json", "S/N ÷ ≤ 3")


def test_ideal_observer_own_archetype_finds_each_noiseless_spectrum():
    s = ideal_observer.spectra_with_models("elg", 4)
    trials = torch.arange(0.0, np.log1p(2.0), ideal_observer.REST_STEP, dtype=torch.float64)
    rest = np.exp(
        np.arange(np.log(s["wave"][0] / 3.0) - 1e-3, np.log(s["wave"][-1]) + 1e-3, ideal_observer.REST_STEP)
    )
    models = ideal_observer.rest_models("elg", 4, rest)
    np.testing.assert_allclose(np.linalg.norm(models, axis=1), 1.0)
    z = ideal_observer.own_archetype_redshifts(s["wave"], s["model"], s["ivar"], rest, models, trials)
    np.testing.assert_allclose(z, s["z"], atol=1e-3)  # within a few archetype steps of the truth
    far = torch.full((4, len(trials)), 1e9, dtype=torch.float64)
    far[:, :10] = 0.0  # a prior that allows only z < 0.001
    held = ideal_observer.own_archetype_redshifts(s["wave"], s["model"], s["ivar"], rest, models, trials, far)
    assert np.all(held < 1e-3)


def test_ideal_observer_perfect_archetypes_with_a_models_prior(tmp_path):
    from specpt_hf import create_model

    torch.manual_seed(0)
    create_model("specpt-tiny", "redshift").save_pretrained(tmp_path / "tiny")
    argv = ["--quick", "--template", "rest", "--z-range", "0", "4", "--prior-model", str(tmp_path / "tiny")]
    assert ideal_observer.main([*argv, "--prior-share", "0.5", "--out", str(tmp_path / "io")]) == 0
    result = json.loads((tmp_path / "io" / "ideal_observer.json").read_text())
    assert result["template"] == "rest" and result["prior_share"] == 0.5
    text = (tmp_path / "io" / "ideal_observer.md").read_text()
    assert "its own rest-frame model as its one archetype" in text and "plus 0.5 x the p(z) prior of" in text
    assert result["metrics"]["own depth"]["all"]["n"] == 32


def test_ideal_observer_prior_model_needs_rest_templates(tmp_path):
    with pytest.raises(SystemExit):
        ideal_observer.main(["--quick", "--prior-model", str(tmp_path), "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        ideal_observer.main(["--quick", "--template", "rest", "--prior-share", "0.5", "--out", str(tmp_path)])


def test_ideal_observer_whole_range_when_the_class_is_not_known(tmp_path):
    assert ideal_observer.main(["--quick", "--z-range", "0", "4", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "ideal_observer.json").read_text())
    assert result["z_range"] == [0.0, 4.0]
    assert "over z 0 to 4, the class not known" in (tmp_path / "ideal_observer.md").read_text()
    fitted = Table.read(tmp_path / "ideal_observer.ecsv")
    assert np.all((fitted["Z_OWN"] > -1e-3) & (fitted["Z_OWN"] < 4.001))
    assert np.mean(np.abs(fitted["Z_OWN"] - fitted["Z"]) / (1 + fitted["Z"]) < 0.15) > 0.9
    with pytest.raises(SystemExit):
        ideal_observer.main(["--quick", "--z-range", "2", "1", "--out", str(tmp_path)])


@pytest.mark.parametrize(
    ("source", "spectra"),
    [("learned", []), ("physical", ["--test-dir", "TMP/testset", "--per-class", "8"])],
)
def test_archetypes_quick_reports_both_depths(tmp_path, source, spectra):
    spectra = [arg.replace("TMP", str(tmp_path)) for arg in spectra]
    assert archetypes.main(["--quick", "--source", source, *spectra, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "archetypes.json").read_text())
    assert list(result["depths"]) == ["own depth", "S/N ÷ ≤ 2"] and result["source"] == source
    if spectra:  # the test set's first 8 spectra of each of the four classes
        assert result["n"] == 32 and result["split"] == "first 8 per class, basis family"
    for depth in result["depths"].values():
        counts = depth["truth_preferred"]
        assert 0 <= counts["archetypes_prefer_truth"] <= counts["failures"]
        assert 0 <= counts["bases_prefer_truth"] <= counts["failures"]
        assert list(depth["eta"]) == list(archetypes.ANSWERS)
        eta = depth["eta"]["model"]["all"]
        assert counts["failures"] == round(eta * result["n"])
        assert depth["eta"]["best candidate"]["all"] <= eta  # the model's answer is one of the candidates
    assert "| S/N ÷ ≤ 2 | best candidate |" in (tmp_path / "archetypes.md").read_text()


def test_best_candidate_is_the_one_nearest_the_truth():
    scan_u = np.arange(0.0, 1.0, 0.01)
    candidates = np.array([[10, 50, -1], [-1, 70, 20]])
    z = archetypes.best_candidate(candidates, scan_u, np.expm1(np.array([0.49, 0.18])))
    np.testing.assert_allclose(np.log1p(z), [0.50, 0.20])


def test_failure_causes_tells_templates_priors_and_search_apart():
    scan_u = np.arange(0.0, 1.0, 0.001)  # [trials]
    z_true = np.full(4, 0.5)
    z = np.array([0.502, 1.2, 1.2, 1.2])  # right; then three failures at z = 1.2
    chi2_truth, chi2_answer = (
        np.full(4, 100.0),
        np.array([100.0, 50.0, 120.0, 120.0]),
    )  # row 1: the answer fits
    searched = np.full((4, len(scan_u)), 200.0)
    searched[3, np.abs(scan_u - np.log1p(0.5)) <= 2 * failure_causes.NEAR] = (
        np.nan
    )  # row 3 never searched the truth
    cause = failure_causes.causes(z, chi2_truth, chi2_answer, searched, scan_u, z_true)
    assert cause.tolist() == ["", "templates", "priors", "search"]
    in_modes = np.array([True, True, False, False])  # the right answer's and row 1's p(z) held the truth
    whole = np.array([0.5, 1.2, 0.5, 0.5])
    tally = failure_causes.tally(cause, in_modes, whole, z_true, np.array(["elg"] * 4))
    assert tally["elg"] == {
        "n": 4,
        "failures": 3,
        "templates": 1,
        "priors": 1,
        "search": 1,
        "truth_in_pz_modes": 1,
        "whole_range_failures": 1,
    }
    assert tally["bgs"]["n"] == 0 and tally["all"]["failures"] == 3


def test_failure_causes_truth_in_modes_looks_within_the_refinement_window():
    from specpt_hf import create_model
    from specpt_hf.prediction import pdf_redshifts

    model = create_model("specpt-tiny", "redshift")
    config = model.config
    u = np.log1p(pdf_redshifts(model)["pz"])  # [bins]
    pz = np.full((3, len(u)), 1e-6)
    peak = len(u) // 2
    pz[:, peak] = 1.0  # the strongest mode, at the same bin for all three; weaker ones at both ends
    pz[:, [0, -1]] = 1e-3
    width = config.refinement_window * config.redshift_bin_width
    z_true = np.expm1(u[peak] + np.array([0.0, 0.9 * width, 3.0 * width]))
    assert config.refinement_modes == 3 and len(u) > 20
    assert failure_causes.truth_in_modes(model, pz, z_true).tolist() == [True, True, False]


def test_failure_causes_template_chi2_is_lowest_at_the_truth_of_a_template_spectrum():
    import torch

    from specpt_hf import create_model
    from specpt_hf.prediction import model_wavelength
    from specpt_hf.refinement import RestFrameTemplates

    model = create_model("specpt-tiny", "redshift")
    wave = model_wavelength(model.config)
    step = 1e-4
    rest = np.exp(np.log(wave[0] / 3.0) + step * np.arange(int(np.log(3.0 * wave[-1] / wave[0]) / step)))
    line = np.exp(-0.5 * ((rest - 3728.0) / 2.0) ** 2) + 0.3 * np.exp(-0.5 * ((rest - 5008.0) / 2.0) ** 2)
    basis = torch.tensor(np.stack([np.ones_like(rest), 20.0 * line]))  # [vectors, rest pixels]
    model.set_templates({"GALAXY": RestFrameTemplates(float(np.log(rest[0])), step, basis)})
    z_true = np.array([0.6, 0.9])
    flux = np.stack([np.interp(wave / (1 + z), rest, 1.0 + 20.0 * line) for z in z_true]).astype(np.float32)
    batch = {"flux": flux, "ivar": np.full_like(flux, 100.0), "mask": np.zeros(flux.shape, bool)}
    at_truth = failure_causes.template_chi2(model, batch, z_true)
    elsewhere = failure_causes.template_chi2(model, batch, z_true + 0.3)
    assert np.all(at_truth < 1.0) and np.all(elsewhere > 100.0 * at_truth + 10.0)


def test_failure_causes_quick_counts_both_sets(tmp_path):
    assert failure_causes.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "failure_causes.json").read_text())
    assert list(result["perturbations"]) == ["none", "S/N ÷ ≤ 2"]
    for rows in result["perturbations"].values():
        assert rows["all"]["n"] == 24
        assert rows["all"]["failures"] == sum(rows["all"][c] for c in failure_causes.CAUSES)
    for rows in result["pz_coverage"].values():
        assert set(rows) == {"all", "bgs", "elg", "lrg", "qso"}
        assert 0 <= rows["all"]["0.68"] <= rows["all"]["0.95"] <= 1
    assert "| S/N ÷ ≤ 2 | elg | 6 |" in (tmp_path / "failure_causes.md").read_text()
    assert "| S/N ÷ ≤ 2 | all |" in (tmp_path / "failure_causes.md").read_text().split("in 68 % interval")[1]


def test_noise_redrock_quick_scores_both_depths(tmp_path, templates):
    argv = ["--quick", "--out", str(tmp_path), "--templates", str(templates), "--mp", "1"]
    assert noise_redrock.main(argv) == 0
    result = json.loads((tmp_path / "noise_redrock.json").read_text())
    methods = ["network", "refined"] + (["redrock"] if REDROCK_MISSING is None else [])
    for depth in ("original", "lower"):
        assert list(result["depths"][depth]) == methods
        assert result["depths"][depth]["refined"]["bgs"]["n"] == 4
    assert ("redrock_skipped" in result) == (REDROCK_MISSING is not None)
    assert "| refined | elg | 4 |" in (tmp_path / "noise_redrock.md").read_text()


def test_template_smoothing_quick_scores_each_setting(tmp_path):
    assert template_smoothing.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "smoothing.json").read_text())
    expected = [list(s) for s in template_smoothing.SETTINGS_KMS[:2]]
    assert [[row["galaxy_kms"], row["qso_kms"]] for row in result["settings"]] == expected
    assert result["model_smoothing_kms"] == {"GALAXY": 50.0, "QSO": 400.0, "STAR": 50.0}
    for row in result["settings"]:
        assert row["by_class"]["all"]["n"] == 24 and row["by_class"]["all"]["nmad"] >= 0
    assert "| 25 | 50 | all | 24 |" in (tmp_path / "smoothing.md").read_text()


def test_fine_scan_quick_scores_each_setting(tmp_path):
    assert fine_scan.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "fine_scan.json").read_text())
    assert [[row["trials"], row["step"]] for row in result["settings"]] == [
        list(s) for s in fine_scan.SETTINGS[:2]
    ]
    assert result["model_setting"] == {"trials": 7, "step": 2e-4}
    for row in result["settings"]:
        assert row["by_class"]["all"]["n"] == 24 and row["ms_per_spectrum"] > 0
    assert "| 5 | 0.0002 | all | 24 |" in (tmp_path / "fine_scan.md").read_text()


def test_robustness_runs_only_the_chosen_perturbations(tmp_path):
    assert robustness.main(["--quick", "--perturbations", "blur σ ≤ 1 px", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "robustness.json").read_text())
    assert list(results["metrics"]) == ["none", "blur σ ≤ 1 px"] == list(results["amplitudes"])


def test_robustness_config_overrides_are_parsed_recorded_and_checked(tmp_path, capsys):
    argv = ["--quick", "--perturbations", "blur σ ≤ 1 px", "--out", str(tmp_path)]
    overrides = ["refinement_wide_quality=1.01", "refinement=peaks", 'refinement_smoothing_kms={"QSO": 100}']
    assert robustness.main([*argv, "--config", *overrides]) == 0
    results = json.loads((tmp_path / "robustness.json").read_text())
    assert results["config_overrides"] == {
        "refinement_wide_quality": 1.01,
        "refinement": "peaks",
        "refinement_smoothing_kms": {"QSO": 100},
    }
    assert "Config override: `refinement_wide_quality = 1.01`." in (tmp_path / "robustness.md").read_text()
    with pytest.raises(SystemExit):
        robustness.main([*argv, "--config", "no_such_field=1"])
    assert "no_such_field=1" in capsys.readouterr().err


def test_refinement_sweep_quick_scores_each_value(tmp_path):
    assert refinement_sweep.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert result["field"] == "refinement_prior"
    assert [row["value"] for row in result["values"]] == [0.0, 4.0]
    for row in result["values"]:
        m = row["by_class"]["all"]
        assert m["n"] == result["n"] > 0 and 0 <= m["zwarn0_kept"] <= 1 and m["nmad"] >= 0
        assert row["spectra_per_cpu_second"] > 0
    assert "| 4 |" in (tmp_path / "sweep.md").read_text()


def test_refinement_sweep_perturbs_the_split_first(tmp_path):
    plain, lower = tmp_path / "plain", tmp_path / "lower"
    assert refinement_sweep.main(["--quick", "--out", str(plain), "--values", "4"]) == 0
    assert (
        refinement_sweep.main(
            ["--quick", "--out", str(lower), "--values", "4", "--perturbation", "S/N ÷ ≤ 2"]
        )
        == 0
    )
    a, b = (json.loads((folder / "sweep.json").read_text()) for folder in (plain, lower))
    assert a["perturbation"] is None and b["perturbation"] == "S/N ÷ ≤ 2" and a["n"] == b["n"]
    assert a["values"][0]["by_class"]["all"]["nmad"] != b["values"][0]["by_class"]["all"]["nmad"]
    assert "split, perturbed: S/N ÷ ≤ 2)" in (lower / "sweep.md").read_text()


def test_refinement_sweep_other_fields(tmp_path, capsys):
    field = ["--field", "refinement_wide_delta_chi2", "--values", "0", "25"]
    assert refinement_sweep.main(["--quick", "--out", str(tmp_path), *field]) == 0
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert result["field"] == "refinement_wide_delta_chi2"
    assert [row["value"] for row in result["values"]] == [0.0, 25.0]
    with pytest.raises(SystemExit):
        refinement_sweep.main(["--quick", "--out", str(tmp_path), "--field", "refinement", "--values", "1"])
    assert "not a numeric refinement_* field" in capsys.readouterr().err


def test_refinement_sweep_takes_whole_numbers_for_an_integer_field(tmp_path, capsys):
    field = ["--field", "refinement_wide_rebin", "--values", "3", "9"]
    assert refinement_sweep.main(["--quick", "--out", str(tmp_path), *field]) == 0
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert [row["value"] for row in result["values"]] == [3, 9]
    with pytest.raises(SystemExit):
        refinement_sweep.main(["--quick", "--out", str(tmp_path), *field[:3], "2.5"])
    assert "takes whole numbers" in capsys.readouterr().err


def test_stars_quick_types_stars_and_leaves_the_model_alone(tmp_path):
    assert stars.main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "stars.json").read_text())
    assert results["template_sets"] == ["GALAXY", "STAR"] and results["star_templates"]["num_vectors"] == 5
    everyone = results["stars"]["all"]
    assert everyone["n"] == 8 == sum(s["n"] for name, s in results["stars"].items() if name != "all")
    # STAR is fitted within +-1000 km/s for every spectrum, so even an untrained network's stars come out STAR
    assert everyone["star"] >= 0.5 and everyone["median_abs_dv_kms"] < 100.0
    assert 0.0 <= everyone["star_zwarn0"] <= everyone["star_zwarn0_but_z_limit"] <= everyone["star"]
    assert set(everyone["zwarn_bits"]) == set(stars.ZWARN_BITS) and everyone["snr_r_median"] > 0
    control = results["control"]
    assert [control[name]["n"] for name in ("all", *accuracy.CLASSES)] == [24, 6, 6, 6, 6]
    assert all(0.0 <= c["false_star"] <= 1.0 and set(c) >= {"with", "without"} for c in control.values())
    # the STAR set went into the copy only; the given model folder keeps its GALAXY set alone
    given = json.loads((tmp_path / "specpt-tiny" / "config.json").read_text())["templates"]["spectypes"]
    copied = json.loads((tmp_path / "model-stars" / "config.json").read_text())["templates"]["spectypes"]
    assert list(given) == ["GALAXY"] and list(copied) == ["GALAXY", "STAR"]
    assert sorted(p.name for p in (tmp_path / "stars-train").rglob("coadd-*.fits")) == [
        "coadd-sv3-bright-15000.fits"
    ]
    assert sorted(p.name for p in (tmp_path / "stars-test").rglob("coadd-*.fits")) == [
        "coadd-sv3-bright-36000.fits"
    ]
    assert (tmp_path / "stars.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| all | 8 |" in (tmp_path / "stars.md").read_text()
    for catalog in ("stars.fits", "control-star.fits", "control-nostar.fits"):
        assert len(Table.read(tmp_path / catalog, hdu="REDSHIFTS")) > 0


def test_run_redrock_rejects_bad_inputs(tmp_path, templates):
    expected = FileNotFoundError if REDROCK_MISSING is None else run_redrock.RedrockError
    with pytest.raises(expected):
        run_redrock.run_redrock([tmp_path / "coadd-missing.fits"], tmp_path / "out", templates)
    with pytest.raises(expected):
        run_redrock.run_redrock(
            [tmp_path / "coadd-missing.fits"], tmp_path / "out", tmp_path / "no-templates"
        )
    with pytest.raises(ValueError, match="n_processes"):
        run_redrock.run_redrock([], tmp_path, templates, n_processes=0)
    assert run_redrock.output_name(Path("coadd-sv3-dark-26001.fits")) == "redrock-sv3-dark-26001.fits"
    cmd = run_redrock.rrdesi_command([Path("a.fits")], Path("o.fits"), 2, {"galaxy": "-0.005,1.7,3e-4"})
    assert "--zscan-galaxy=-0.005,1.7,3e-4" in cmd and cmd[cmd.index("--mp") + 1] == "2"


# ---------------------------------------------------------------------------------------- accuracy


def test_accuracy_quick(tmp_path, templates):
    assert accuracy.main(["--quick", "--out", str(tmp_path), "--templates", str(templates)]) == 0
    results = json.loads((tmp_path / "accuracy.json").read_text())
    untrained = "specpt-tiny (untrained)"
    everything = results["metrics"]["subsets"]["all"][untrained]
    assert {name: everything[name]["n"] for name in accuracy.CLASSES} == dict.fromkeys(accuracy.CLASSES, 6)
    for name, h in results["hardness"].items():
        p = h["snr_r_percentiles"]
        assert 0 < p["p05"] <= p["p50"] <= p["p95"], name
        assert 0.0 <= h["hard_fraction"] <= 1.0
        d, m = h["depth_percentiles"], h["magnitude_percentiles"]
        assert 0.3 < d["p05"] <= d["p50"] <= d["p95"] < 3.0, name  # EFFTIME near the program's DESI goal
        assert 10.0 < m["p05"] <= m["p95"] < 30.0 and 0.0 <= h["within_desi_limit"] <= 1.0, name
    assert {r["target_class"] for r in results["desi_reference_snr"]} <= {"bgs", "lrg", "elg", "qso", "other"}
    for method in results["methods"]:  # each method's own confident spectra: the fraction and the n agree
        own = results["metrics"]["own_confident"][method]
        assert 0.0 <= own["fraction"]["all"] <= 1.0
        assert own["metrics"].get("all", {"n": 0})["n"] == round(24 * own["fraction"]["all"]), method
    predictions = Table.read(tmp_path / "predictions.ecsv")
    assert len(predictions) == 24 and len(set(predictions["TARGETID"])) == 24
    for name in ("accuracy_zz.png", "accuracy_vs_redshift.png", "snr_r.png", "accuracy.md"):
        assert (tmp_path / name).stat().st_size > 0
    if REDROCK_MISSING is None:
        assert results["methods"] == [untrained, "Redrock"]
        common = results["metrics"]["subsets"]["common"]["Redrock"]["all"]
        assert common["n"] == 24
        # templates from the mock's own basis: Redrock finds most redshifts even on the coarse quick grid
        assert common["nmad"] < 0.01 and common["eta"] <= 0.25
        assert np.isfinite(np.asarray(predictions["Z_Redrock"])).all()
        # --resume reads the Redrock output back instead of fitting again; its times cover no spectrum
        argv = ["--quick", "--out", str(tmp_path), "--templates", str(templates), "--resume"]
        assert accuracy.main(argv) == 0
        again = json.loads((tmp_path / "accuracy.json").read_text())
        assert (
            again["redrock"]["n_reused"] == again["redrock"]["n_spectra"] == results["redrock"]["n_spectra"]
        )
        assert (
            again["metrics"]["subsets"]["common"]["Redrock"]
            == results["metrics"]["subsets"]["common"]["Redrock"]
        )
    else:
        assert results["methods"] == [untrained] and "redrock_skipped" in results


def test_accuracy_refuses_training_seeds(tmp_path):
    with pytest.raises(SystemExit):
        accuracy.main(["--quick", "--out", str(tmp_path), "--seed", "1"])
    with pytest.raises(SystemExit):
        accuracy.main(["--out", str(tmp_path), "--no-redrock"])  # neither a model nor Redrock


# ------------------------------------------------------------------------------------------- speed


def test_model_labels_name_the_run():
    assert speed.model_label("runs/specpt-small-redshift/best") == "specpt-small-redshift/best"
    assert speed.model_label("runs/specpt-small-cpu/redshift/best") == "specpt-small-cpu/redshift/best"
    assert speed.model_label("runs/my-model") == "my-model"


def test_speed_quick(tmp_path, templates):
    argv = [
        "--quick",
        "--out",
        str(tmp_path),
        "--templates",
        str(templates),
        "--max-scale",
        "6",
        "--threads",
        "1",
        "--bf16",
    ]
    assert speed.main(argv) == 0
    results = json.loads((tmp_path / "speed.json").read_text())
    row, bf16 = results["specpt"]  # --threads 1: only the 1-thread run, with an fp32 and a bf16 network
    assert row["preset"] == "specpt-tiny" and row["n_spectra"] == 12 and row["spectra_per_second"] > 0
    assert bf16["preset"] == "specpt-tiny (bf16)" and bf16["n_spectra"] == 12 and row["refinement"] == "none"
    (scale,) = results["scaling"]
    assert scale["n_spectra"] == 6 and scale["peak_rss_mb"] >= scale["rss_after_warmup_mb"] > 0
    sizes = {r["preset"]: r for r in results["size"]}
    assert set(sizes) == set(speed.ALL_PRESETS)
    assert sizes["specpt-paper"]["params_autoencoder"] > 1e9 > sizes["specpt-paper"]["params_redshift"]
    assert 0 < sizes["specpt-tiny"]["flops_redshift"] < sizes["specpt-small"]["flops_redshift"]
    assert sizes["specpt-paper"]["flops_redshift"] is None  # not counted in quick mode
    if REDROCK_MISSING is None:
        assert results["redrock"]["n_spectra"] == 4  # one fibre of each of the 4 files
        assert [r["preset"] for r in results["ratios"]] == ["specpt-tiny", "specpt-tiny (bf16)"]
        assert all(r["ratio_per_core"] > 0 for r in results["ratios"])
    else:
        assert "redrock_skipped" in results and not results["ratios"]


# ------------------------------------------------------------------------- preparation and training rates


def test_prepare_rate_mmu_reads_the_same_spectra_from_mmu_shards(capsys):
    assert prepare_rate.main(["--quick", "--mmu"]) == 0
    printed = capsys.readouterr().out
    assert "MMU HDF5 reader" in printed and re.search(r"MMU / DESI: \d+\.\d+", printed)


def test_prepare_rate_quick_compares_prepare_with_the_raw_read(capsys):
    assert prepare_rate.main(["--quick"]) == 0
    out = capsys.readouterr().out
    fibers, written = (int(n) for n in re.search(r"(\d+) fibers, (\d+) spectra written", out).groups())
    assert 0 < written <= fibers
    assert float(re.search(r"prepare / raw rate: ([\d.]+) \(best passes\)", out).group(1)) > 0


def test_train_throughput_quick_times_the_training_step(tmp_path):
    argv = ["--quick", "--presets", "specpt-tiny", "--stages", "redshift", "--precisions", "fp32"]
    assert train_throughput.main([*argv, "--json", str(tmp_path / "rows.json")]) == 0
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert (row["preset"], row["stage"], row["precision"], row["batch_size"]) == (
        "specpt-tiny",
        "redshift",
        "fp32",
        16,
    )
    assert row["parameters"] == count_parameters(preset_config("specpt-tiny", "redshift"), "redshift")
    assert row["spectra_per_second"] == pytest.approx(16 / (row["step_ms"] / 1e3))
    with pytest.raises(SystemExit):  # the 1.12 B-parameter paper autoencoder is refused on the CPU
        train_throughput.parse_args(["--presets", "specpt-paper"])


def _write_predictions(folder: Path, targetid, classes, z, z_pred, model: str) -> None:
    folder.mkdir()
    table = Table({"TARGETID": targetid, "TARGET_CLASS": classes, "Z": z})
    table[f"Z_{model} network"] = z
    table[f"Z_{model} refined"] = z_pred
    table.write(folder / "predictions.ecsv", format="ascii.ecsv")


def test_compare_predictions_counts_shared_and_own_failures_on_matched_targets(tmp_path):
    n = 40
    z = np.linspace(0.1, 1.5, n)
    classes = np.array(["elg"] * 30 + ["qso"] * 10)
    first, second = z.copy(), z.copy()
    first[[0, 1, 2, 3, 4, 5, 30]] += 0.5  # ELG failures 0-5, one QSO failure
    second[[0, 1, 6]] += 0.5  # shares 0 and 1, adds 6
    offsets = np.linspace(-0.002, 0.002, 10)  # small QSO errors: no failures, a known NMAD
    second[30:] += offsets * (1 + z[30:])
    order = np.random.default_rng(0).permutation(n)  # rows are matched by TARGETID, not by position
    ids = np.arange(100, 100 + n)
    _write_predictions(tmp_path / "a", ids, classes, z, first, "m1")
    _write_predictions(tmp_path / "b", ids[order], classes[order], z[order], second[order], "m2")
    out = tmp_path / "out"
    argv = [str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "A", "B", "--out", str(out)]
    assert compare_predictions.main(argv) == 0
    result = json.loads((out / "comparison.json").read_text())["refined"]
    elg, qso = result["elg"], result["qso"]
    assert (elg["n"], elg["both"], elg["first_only"], elg["second_only"]) == (30, 2, 4, 1)
    assert elg["eta"] == pytest.approx([6 / 30, 3 / 30])
    assert elg["p_value"] == pytest.approx(0.375)  # 1 of 5 discordant failures: two-sided binomial
    assert (qso["both"], qso["first_only"], qso["second_only"]) == (0, 1, 0)
    assert qso["nmad"][1] == pytest.approx(NMAD_SCALE * np.median(np.abs(offsets - np.median(offsets))))
    assert "| ELG | 30 |" in (out / "comparison.md").read_text()
    network = json.loads((out / "comparison.json").read_text())["network"]["elg"]  # the unperturbed column
    assert (network["both"], network["first_only"], network["second_only"]) == (0, 0, 0)


def test_compare_predictions_refuses_other_test_sets_and_missing_columns(tmp_path):
    z = np.array([0.1, 0.2])
    _write_predictions(tmp_path / "a", [1, 2], ["elg", "elg"], z, z, "m")
    _write_predictions(tmp_path / "b", [1, 2], ["elg", "elg"], z + 0.1, z, "m")
    with pytest.raises(SystemExit):
        compare_predictions.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="different true redshifts"):
        compare_predictions.compare(
            *(
                compare_predictions.method_redshifts(
                    compare_predictions.read_predictions(tmp_path / name), "refined", tmp_path / name
                )
                for name in ("a", "b")
            )
        )
    table = Table.read(tmp_path / "a" / "predictions.ecsv")
    with pytest.raises(ValueError, match="expected one `Z_... refined` column"):
        compare_predictions.method_column(table["TARGETID", "Z"], "refined", tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="predictions.ecsv"):
        compare_predictions.read_predictions(tmp_path / "missing")


def test_attention_kernels_quick_times_each_kernel_at_the_training_shape(tmp_path):
    argv = ["--quick", "--presets", "specpt-tiny", "--precisions", "fp32", "--dropouts", "0", "0.1"]
    assert attention_kernels.main([*argv, "--json", str(tmp_path / "rows.json")]) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    config = preset_config("specpt-tiny", "redshift")
    tokens = math.ceil(config.num_pixels / config.patch_size)
    heads, head_dim = config.num_heads, config.d_model // config.num_heads
    assert {tuple(r["shape"]) for r in rows} == {(16, heads, tokens, head_dim)}
    assert {(r["kernel"], r["dropout"]) for r in rows} == {
        (k, p) for k in attention_kernels.KERNELS for p in (0.0, 0.1)
    }
    refused = {(r["kernel"], r["dropout"]) for r in rows if r["ms"] is None}
    assert refused == {("sdpa-flash", 0.1)}  # torch's fused CPU kernel has no attention dropout
    assert all(r["ms"] > 0 for r in rows if r["ms"] is not None)
    with pytest.raises(SystemExit):
        attention_kernels.parse_args(["--presets", "specpt-huge"])


# ------------------------------------------------------------------------------------ training recipe


def test_training_recipe_plan_fits_the_budget():
    args = recipe.parse_args(["--work", "w"])
    plan = recipe.make_plan(args)
    total = plan.data_minutes + plan.ae_minutes + plan.rs_minutes
    assert total <= 3 * 60 * 0.95 + 1e-6 and plan.ae_steps > 1000 and plan.rs_steps > plan.ae_steps
    cmd = recipe.train_command(args, "redshift", plan.rs_steps, Path("w"))
    assert "--resume" in cmd and cmd[cmd.index("--max-steps") + 1] == str(plan.rs_steps)
    assert cmd[cmd.index("--pretrained-model") + 1] == str(Path("w") / "autoencoder" / "model")
    assert Path(cmd[cmd.index("--config") + 1]).is_file()
    assert "--augment-probability" not in cmd  # the config's augmentations
    for probability in ("0", "0.1"):
        control = recipe.parse_args(["--work", "w", "--augment-probability", probability])
        cmd = recipe.train_command(control, "redshift", plan.rs_steps, Path("w"))
        assert cmd[cmd.index("--augment-probability") + 1] == probability
        assert "--augment-probability" not in recipe.train_command(control, "autoencoder", 10, Path("w"))
    seeded = recipe.parse_args(["--work", "w", "--train-seed", "7"])
    assert recipe.train_command(seeded, "redshift", 10, Path("w"))[-2:] == ["--seed", "7"]
    assert "--seed" not in recipe.train_command(seeded, "autoencoder", 10, Path("w"))
    assert "--seed" not in recipe.train_command(recipe.parse_args(["--work", "w"]), "redshift", 10, Path("w"))
    clean_end = recipe.parse_args(["--work", "w", "--augment-until", "0.7"])
    cmd = recipe.train_command(clean_end, "redshift", 1000, Path("w"))
    assert cmd[cmd.index("--augment-until-step") + 1] == "700"
    assert "--augment-until-step" not in recipe.train_command(clean_end, "autoencoder", 1000, Path("w"))
    with pytest.raises(SystemExit):
        recipe.parse_args(["--work", "w", "--augment-until", "1.5"])


def test_training_recipe_quick_data_step_is_resumable(tmp_path, capsys):
    argv = ["--work", str(tmp_path), "--quick", "--steps", "data"]
    assert recipe.main(argv) == 0
    shards = {
        split: sorted((tmp_path / "data" / split).glob("*.parquet")) for split in ("train", "validation")
    }
    assert shards["train"] and all(p.name.startswith("chunk000-") for p in shards["train"])
    assert not list(tmp_path.glob("mock-chunk*")) and not list(tmp_path.glob("prep-chunk*"))
    before = {p: p.stat().st_mtime_ns for p in shards["train"]}
    capsys.readouterr()
    assert recipe.main(argv) == 0  # done chunks are skipped
    assert "data chunk" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in shards["train"]} == before


def test_training_recipe_quick_builds_templates_from_template_spectra_per_type(tmp_path, caplog):
    """All four steps on specpt-tiny; the templates step learns each basis from --template-spectra spectra."""
    argv = ["--work", str(tmp_path), "--quick", "--template-spectra", "7"]
    with caplog.at_level(logging.INFO, logger="specpt_hf.templates"):
        assert recipe.main(argv) == 0
    model = tmp_path / "redshift" / "best"
    assert (model / "templates.safetensors").is_file()
    learned = [r.getMessage() for r in caplog.records if "vectors from" in r.getMessage()]
    assert sorted(m.split(":")[0] for m in learned) == ["GALAXY", "QSO"]
    assert all(m.endswith("from 7 spectra") for m in learned), learned
    with pytest.raises(SystemExit):
        recipe.parse_args(["--work", "w", "--template-spectra", "0"])


def test_training_recipe_without_quality_cuts_keeps_every_mock_spectrum(tmp_path):
    zwarn = {}
    for name, flags in (("cut", []), ("all", ["--no-quality-cuts"])):
        assert recipe.main(["--work", str(tmp_path / name), "--quick", "--steps", "data", *flags]) == 0
        shards = (tmp_path / name / "data").rglob("*.parquet")
        zwarn[name] = np.concatenate(
            [pq.read_table(path, columns=["zwarn"])["zwarn"].to_numpy() for path in shards]
        )
    assert len(zwarn["all"]) == 4 * 40  # --quick: 40 per class, none dropped
    assert len(zwarn["cut"]) < len(zwarn["all"])
    assert np.any(zwarn["all"] != 0) and np.all(zwarn["cut"] == 0)
    assert "`enabled` = False" in (tmp_path / "all" / "data" / "README.md").read_text()


def _releases(work: Path) -> tuple[np.ndarray, np.ndarray]:
    """TARGETID RELEASE fields and target classes of every row of a recipe's shards."""
    tables = [
        pq.read_table(p, columns=["targetid", "target_class"]) for p in (work / "data").rglob("*.parquet")
    ]
    release = np.concatenate([(t["targetid"].to_numpy() >> 42) & 0xFFFF for t in tables])
    return release, np.concatenate([t["target_class"].to_numpy(zero_copy_only=False) for t in tables])


def test_training_recipe_mixes_in_the_sps_family(tmp_path):
    """--sps-fraction 1: every BGS, LRG and ELG file in the sps family (TARGETID RELEASE 9011), QSOs basis;
    --sps-extra 0.5: the basis files plus half as many sps spectra on top."""
    pytest.importorskip("ppxf")
    argv = ["--work", str(tmp_path / "fraction"), "--quick", "--steps", "data", "--sps-fraction", "1"]
    assert recipe.main(argv) == 0
    release, classes = _releases(tmp_path / "fraction")
    assert set(release[classes == "qso"]) == {9010} and set(release[classes != "qso"]) == {9011}
    argv = ["--work", str(tmp_path / "extra"), "--quick", "--steps", "data", "--sps-extra", "0.5"]
    assert recipe.main(argv) == 0
    release, classes = _releases(tmp_path / "extra")
    galaxies = classes != "qso"
    assert set(release[classes == "qso"]) == {9010} and set(release[galaxies]) == {9010, 9011}
    assert 0.2 < (release[galaxies] == 9011).mean() < 0.5  # 20 of 60 per class written, before the cuts
    for flag, value in (("--sps-fraction", "1.5"), ("--sps-extra", "-1")):
        with pytest.raises(SystemExit):
            recipe.parse_args(["--work", "w", flag, value])


def test_parquet_writers_quick_writes_the_same_rows_both_ways(tmp_path, capsys):
    rows = parquet_writers.make_rows(5)
    for name, write in parquet_writers.WRITERS.items():
        write(rows, tmp_path / name)
        table = pq.read_table(tmp_path / name)
        assert table["targetid"].to_pylist() == list(range(5)), name
        expected = np.stack([row["flux"] for row in rows()])
        np.testing.assert_array_equal(np.stack(table["flux"].to_numpy(zero_copy_only=False)), expected)
    assert parquet_writers.main(["--out", str(tmp_path / "out"), "--quick"]) == 0
    result = json.loads((tmp_path / "out" / "parquet_writers.json").read_text())
    assert result["rows"] == 200 and result["ShardWriter"]["best_rows_per_s"] > 0
    assert "ShardWriter / datasets" in capsys.readouterr().out


def test_redrock_subset_takes_the_first_targets_of_each_class_first_file(tmp_path):
    from astropy.table import Table

    rows = 6  # per file: two files per class, the first file's first 4 rows are the subset
    table = Table(
        {
            "TARGETID": np.arange(8 * rows),
            "Z": np.full(8 * rows, 1.0),
            "TARGET_CLASS": np.repeat(["bgs", "lrg", "elg", "qso"], 2 * rows),
            "FILE": np.tile(np.repeat(["b.fits", "a.fits"], rows), 4),
        }
    )
    z_net = np.full(len(table), 1.0)
    z_net[table["FILE"] == "a.fits"] = 3.0  # catastrophic, but only in a.fits: the first file of every class
    z_net[np.flatnonzero(table["FILE"] == "a.fits").reshape(4, rows)[:, 4:]] = 1.0  # beyond the first 4 rows
    table["Z_m network"], table["Z_m refined"] = z_net, np.full(len(table), 1.002)
    table.write(tmp_path / "predictions.ecsv")
    assert redrock_subset.main([str(tmp_path), "--per-class", "4"]) == 0
    result = json.loads((tmp_path / "redrock_subset.json").read_text())
    assert set(result) == {"network", "refined"} and set(result["network"]) == {"bgs", "lrg", "elg", "qso"}
    network = result["network"].values()
    assert all(v["n"] == 4 and v["eta"] == 1.0 and v["nmad"] == pytest.approx(NMAD_SCALE) for v in network)
    assert all(
        v["eta"] == 0.0 and v["nmad"] == pytest.approx(1e-3 * NMAD_SCALE) for v in result["refined"].values()
    )


def test_zwarn_thresholds_counts_the_winning_template_set_per_class():
    columns = {
        "target_class": np.array(["elg", "elg", "elg", "qso"]),
        "spectype": np.array(["GALAXY", "QSO", "QSO", "QSO"]),
        "z": np.array([1.0, 1.0, 2.0, 2.0]),
        "z_true": np.array([1.0, 1.0, 1.0, 2.0]),
        "deltachi2": np.array([30.0, 2.0, 50.0, 8.9]),
    }
    table = zwarn_thresholds.fitted_as(columns, 9.0)
    assert table["elg"] == {
        "GALAXY": {"n": 1, "failures": 0, "small_delta_chi2": 0},
        "QSO": {"n": 2, "failures": 1, "small_delta_chi2": 1},
    }
    assert table["qso"] == {"QSO": {"n": 1, "failures": 0, "small_delta_chi2": 1}}
    assert table["bgs"] == {} and zwarn_thresholds.fitted_as({"z": columns["z"]}, 9.0) == {}


def test_zwarn_thresholds_quick_recomputes_the_flags_from_one_model_run(tmp_path):
    argv = ["--quick", "--out", str(tmp_path), "--values", "0", "9", "1e9"]
    assert zwarn_thresholds.main(argv) == 0
    result = json.loads((tmp_path / "thresholds.json").read_text())
    assert result["field"] == "min_delta_chi2" and result["n"] == 24
    kept = [row["by_class"]["all"]["kept"] for row in result["values"]]
    assert kept[0] >= kept[1] >= kept[2] == 0.0  # a higher threshold keeps no more; 1e9 flags every spectrum
    assert sum(m["n"] for kinds in result["fitted_as"].values() for m in kinds.values()) == 24
    cache = tmp_path / "columns-202.npz"
    written = cache.stat().st_mtime_ns
    assert zwarn_thresholds.main([*argv[:3], "--field", "min_feature_chi2", "--values", "0"]) == 0
    assert cache.stat().st_mtime_ns == written  # the model did not run again
    assert json.loads((tmp_path / "thresholds.json").read_text())["field"] == "min_feature_chi2"
    # a second tuning set pools with the first; --set holds another field fixed
    pooled = [*argv[:3], "--seed", "202", "303", "--values", "1e9", "--set", "weak_fit_chi2=0"]
    assert zwarn_thresholds.main(pooled) == 0
    result = json.loads((tmp_path / "thresholds.json").read_text())
    assert result["n"] == 48 and result["seeds"] == [202, 303] and result["fixed"] == {"weak_fit_chi2": 0.0}
    assert cache.stat().st_mtime_ns == written and (tmp_path / "columns-303.npz").is_file()
    assert result["values"][0]["by_class"]["all"]["kept"] == 0.0
    with pytest.raises(SystemExit):  # a field that FlagThresholds does not have
        zwarn_thresholds.main([*argv[:3], "--values", "9", "--set", "no_such_field=1"])
    # a model setting overridden is part of the cache key: the model runs again
    assert zwarn_thresholds.main([*argv[:3], "--values", "9", "--config", "refinement_alias_lines=[]"]) == 0
    result = json.loads((tmp_path / "thresholds.json").read_text())
    assert result["config"] == {"refinement_alias_lines": []} and cache.stat().st_mtime_ns != written
    all_eta = result["values"][0]["by_class"]["all"]["eta_all"]
    assert 0.0 <= all_eta <= 1.0
    with pytest.raises(SystemExit):  # the test set's seed only evaluates values already chosen
        zwarn_thresholds.main(
            [
                "--model",
                str(tmp_path / "specpt-tiny"),
                "--seed",
                "101",
                "--values",
                "9",
                "--out",
                str(tmp_path),
            ]
        )
