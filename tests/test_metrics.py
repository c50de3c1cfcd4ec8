"""Redshift metrics, the offline `evaluate` module and the model-card results."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard_data import model_index_to_eval_results

from specpt_hf.evaluation import (
    METRIC_MODULE_PATH,
    bias,
    catastrophic,
    catastrophic_fraction,
    completeness_purity,
    eval_results,
    metrics_by_group,
    metrics_by_redshift_bin,
    model_index,
    nmad,
    nmad_centred,
    pdf_coverage,
    pulls,
    read_results_json,
    redshift_errors,
    redshift_metrics,
    sigma68,
    uncertainty_calibration,
    write_results_json,
)


def gaussian_sample(n: int, sigma: float, offset: float = 0.0, seed: int = 0):
    """z_true uniform in [0, 2] and z_pred with Δz/(1+z) ~ N(offset, sigma)."""
    rng = np.random.default_rng(seed)
    z_true = rng.uniform(0.0, 2.0, n)
    dz = rng.normal(offset, sigma, n)
    return z_true + dz * (1 + z_true), z_true, dz


# ---------------------------------------------------------------- plain metrics


def test_redshift_errors_formula():
    z_true = np.array([0.0, 1.0, 0.5])
    z_pred = np.array([0.1, 1.2, 0.5])
    np.testing.assert_allclose(redshift_errors(z_pred, z_true), [0.1, 0.1, 0.0])
    np.testing.assert_allclose(redshift_errors([2.0], [1.0]), [0.5])  # lists work too


def test_gaussian_scatter_gives_sigma():
    sigma = 0.002
    z_pred, z_true, dz = gaussian_sample(40_000, sigma)
    # 1.48 * median(|N(0, σ)|) = 1.48 * 0.67449 σ
    assert nmad(z_pred, z_true) == pytest.approx(1.48 * 0.67449 * sigma, rel=0.03)
    assert nmad(z_pred, z_true) == pytest.approx(sigma, rel=0.03)
    assert sigma68(z_pred, z_true) == pytest.approx(sigma, rel=0.03)
    assert abs(bias(z_pred, z_true)) < 0.02 * sigma
    # against an independent computation on the drawn errors
    assert nmad(z_pred, z_true) == pytest.approx(1.48 * np.median(np.abs(dz)), rel=1e-9)
    assert catastrophic_fraction(z_pred, z_true) == 0.0


def test_centred_nmad_ignores_a_constant_bias():
    sigma, offset = 0.001, 0.004
    z_pred, z_true, dz = gaussian_sample(40_000, sigma, offset=offset, seed=2)
    assert nmad_centred(z_pred, z_true) == pytest.approx(sigma, rel=0.03)  # the offset does not count
    assert nmad(z_pred, z_true) > 3 * sigma  # the SpecPT-paper NMAD takes |Δz| about zero: it does
    assert nmad_centred(z_pred, z_true) == pytest.approx(
        1.48 * np.median(np.abs(dz - np.median(dz))), rel=1e-9
    )
    assert redshift_metrics(z_pred, z_true)["nmad_centred"] == nmad_centred(z_pred, z_true)
    assert math.isnan(nmad_centred([], []))


def test_bias_recovers_offset():
    z_pred, z_true, _ = gaussian_sample(20_000, 0.001, offset=0.004, seed=1)
    assert bias(z_pred, z_true) == pytest.approx(0.004, abs=3e-5)
    assert sigma68(z_pred, z_true) == pytest.approx(0.001, rel=0.04)


def test_planted_outliers_give_exact_eta():
    rng = np.random.default_rng(2)
    n, n_out = 1000, 37
    z_true = rng.uniform(0.1, 1.5, n)
    z_pred = z_true + rng.normal(0, 0.001, n) * (1 + z_true)
    idx = rng.choice(n, n_out, replace=False)
    z_pred[idx] = z_true[idx] + rng.choice([-1, 1], n_out) * rng.uniform(0.2, 0.6, n_out) * (1 + z_true[idx])
    assert catastrophic_fraction(z_pred, z_true) == n_out / n
    result = redshift_metrics(z_pred, z_true)
    assert result["n"] == n and result["n_catastrophic"] == n_out and result["eta"] == n_out / n
    # outliers barely move the robust scatter
    assert result["nmad"] == pytest.approx(0.001, rel=0.1)


def test_catastrophic_threshold_is_strict_and_configurable():
    z_true = np.zeros(4)
    z_pred = np.array([0.15, 0.150001, -0.2, 0.06])
    assert catastrophic_fraction(z_pred, z_true) == 0.5
    assert catastrophic_fraction(z_pred, z_true, threshold=0.05) == 1.0
    assert catastrophic(z_pred, z_true).tolist() == [False, True, True, False]
    assert catastrophic(z_pred, z_true, threshold=0.05).all()
    assert redshift_metrics(z_pred, z_true, catastrophic_threshold=0.1)["n_catastrophic"] == 3


def test_redshift_metrics_matches_single_functions():
    z_pred, z_true, _ = gaussian_sample(500, 0.01, seed=3)
    result = redshift_metrics(z_pred, z_true)
    assert set(result) == {"n", "n_catastrophic", "nmad", "nmad_centred", "eta", "bias", "sigma68"}
    assert result["nmad"] == nmad(z_pred, z_true)
    assert result["nmad_centred"] == nmad_centred(z_pred, z_true)
    assert result["bias"] == bias(z_pred, z_true)
    assert result["sigma68"] == sigma68(z_pred, z_true)
    assert result["eta"] == catastrophic_fraction(z_pred, z_true)
    assert all(isinstance(v, int | float) and not isinstance(v, np.generic) for v in result.values())


def test_empty_inputs_give_nan_not_crash():
    result = redshift_metrics([], [])
    assert result["n"] == 0 and result["n_catastrophic"] == 0
    assert all(math.isnan(result[k]) for k in ("nmad", "eta", "bias", "sigma68"))
    assert math.isnan(nmad([], [])) and math.isnan(catastrophic_fraction([], []))
    assert metrics_by_group([], [], []) == {}
    cp = completeness_purity([], [], [], [0.5])
    assert (
        np.isnan(cp["completeness"]).all() and np.isnan(cp["purity"]).all() and cp["n_kept"].tolist() == [0]
    )
    assert uncertainty_calibration([], [], [])["n"] == 0


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([0.1, 0.2], [0.1]), "z_pred has length 2"),
        (([0.1], [np.nan]), "z_true has 1 non-finite"),
        (([np.inf], [0.1]), "z_pred has 1 non-finite"),
        (([0.1], [-1.0]), "z_true must satisfy 1 \\+ z_true > 0"),
        (([[0.1]], [[0.1]]), "z_true must be 1-D"),
        ((["a"], [0.1]), "z_pred must be numeric"),
    ],
)
def test_bad_inputs_name_the_argument(args, match):
    with pytest.raises(ValueError, match=match):
        redshift_metrics(*args)


def test_bad_auxiliary_inputs_name_the_argument():
    z = [0.1, 0.2, 0.3]
    with pytest.raises(ValueError, match="groups has length 2"):
        metrics_by_group(z, z, ["a", "b"])
    with pytest.raises(ValueError, match="score has 1 non-finite"):
        completeness_purity(z, z, [0.1, np.nan, 0.2], [0.5])
    with pytest.raises(ValueError, match="edges must hold at least two strictly increasing"):
        metrics_by_redshift_bin(z, z, [0.0, 0.5, 0.5])
    with pytest.raises(ValueError, match="catastrophic_threshold must be a positive"):
        redshift_metrics(z, z, catastrophic_threshold=-0.1)
    with pytest.raises(ValueError, match="z_err must be positive"):
        pulls(z, z, [0.1, 0.0, 0.1])
    with pytest.raises(ValueError, match="overall_key 'a' is also a label"):
        metrics_by_group(z, z, ["a", "b", "a"], overall_key="a")


# ---------------------------------------------------------------- splits


def test_metrics_by_group_equals_manual_selection():
    z_pred, z_true, _ = gaussian_sample(900, 0.003, seed=4)
    groups = np.array(["elg", "bgs", "qso"] * 300)
    z_pred[np.flatnonzero(groups == "qso")[:10]] += 1.0
    out = metrics_by_group(z_pred, z_true, groups, overall_key="all")
    assert list(out) == ["all", "bgs", "elg", "qso"]
    assert out["all"] == redshift_metrics(z_pred, z_true)
    for name in ("bgs", "elg", "qso"):
        sel = groups == name
        assert out[name] == redshift_metrics(z_pred[sel], z_true[sel])
        assert out[name]["n"] == 300


def test_metrics_by_redshift_bin_assignment():
    z_true = np.array([0.0, 0.2, 0.5, 0.7, 1.0, 1.5, -0.5])
    z_pred = z_true.copy()
    z_pred[3] += 0.5 * (1 + z_true[3])  # the only catastrophic object, in bin [0.5, 1.0)
    rows = metrics_by_redshift_bin(z_pred, z_true, [0.0, 0.5, 1.0, 1.2])
    assert [(r["z_min"], r["z_max"]) for r in rows] == [(0.0, 0.5), (0.5, 1.0), (1.0, 1.2)]
    assert [r["n"] for r in rows] == [2, 2, 1]  # 1.0 falls in the closed last bin, 1.5 and -0.5 are out
    assert [r["n_catastrophic"] for r in rows] == [0, 1, 0]
    assert rows[1]["eta"] == 0.5 and rows[1]["z_center"] == 0.75
    empty = metrics_by_redshift_bin(z_pred, z_true, [2.0, 3.0])[0]
    assert empty["n"] == 0 and math.isnan(empty["nmad"])


# ---------------------------------------------------------------- completeness / purity and calibration


def test_completeness_purity_small_exact_case():
    z_true = np.zeros(5)
    z_pred = np.array([0.0, 0.0, 0.5, 0.0, 0.9])  # objects 2 and 4 are catastrophic
    quality = np.array([0.9, 0.8, 0.7, 0.3, 0.1])
    cp = completeness_purity(z_pred, z_true, quality, [0.0, 0.2, 0.5, 0.85, 0.95])
    np.testing.assert_allclose(cp["completeness"], [1.0, 0.8, 0.6, 0.2, 0.0])
    np.testing.assert_allclose(cp["purity"][:4], [3 / 5, 3 / 4, 2 / 3, 1.0])
    assert math.isnan(cp["purity"][4])  # nothing kept
    assert cp["n_kept"].tolist() == [5, 4, 3, 1, 0]
    # the same cut expressed on an uncertainty: smaller is better
    zerr = 1.0 - quality
    low = completeness_purity(z_pred, z_true, zerr, [1.0, 0.8, 0.5, 0.15], higher_is_better=False)
    np.testing.assert_allclose(low["completeness"], cp["completeness"][:4])
    np.testing.assert_allclose(low["purity"], cp["purity"][:4])


def test_completeness_is_monotonic_and_purity_rises_with_an_informative_score():
    rng = np.random.default_rng(5)
    n = 2000
    z_true = rng.uniform(0, 1.5, n)
    bad = rng.random(n) < 0.1
    z_pred = np.where(bad, z_true + 0.5 * (1 + z_true), z_true)
    quality = np.where(bad, rng.uniform(0, 0.6, n), rng.uniform(0.3, 1.0, n))
    cp = completeness_purity(z_pred, z_true, quality, np.linspace(0, 1, 21))
    assert np.all(np.diff(cp["completeness"]) <= 0)
    assert cp["completeness"][0] == 1.0 and cp["purity"][0] == pytest.approx(1 - bad.mean())
    assert cp["purity"][14] == 1.0  # quality >= 0.7 keeps no catastrophic object
    default = completeness_purity(z_pred, z_true, quality)
    assert np.all(np.diff(default["threshold"]) > 0) and np.all(np.diff(default["completeness"]) <= 0)
    rising = completeness_purity(z_pred, z_true, quality, np.linspace(0, 1, 21), higher_is_better=False)
    assert np.all(np.diff(rising["completeness"]) >= 0)


def test_uncertainty_calibration_of_gaussian_errors():
    rng = np.random.default_rng(6)
    n = 20_000
    z_true = rng.uniform(0, 1, n)
    z_err = rng.uniform(0.001, 0.003, n)
    z_pred = z_true + rng.normal(0, 1, n) * z_err
    calib = uncertainty_calibration(z_pred, z_true, z_err)
    assert calib["within_1sigma"] == pytest.approx(0.6827, abs=0.01)
    assert calib["within_2sigma"] == pytest.approx(0.9545, abs=0.006)
    assert calib["pull_sigma68"] == pytest.approx(1.0, rel=0.03)
    over = uncertainty_calibration(z_pred, z_true, 2 * z_err)  # overestimated errors
    assert over["pull_sigma68"] == pytest.approx(0.5, rel=0.03)
    np.testing.assert_allclose(pulls(z_pred, z_true, z_err), (z_pred - z_true) / z_err)


# ---------------------------------------------------------------- evaluate module, offline

OFFLINE_SCRIPT = textwrap.dedent(
    """
    import doctest, json, sys
    import evaluate
    from specpt_hf.evaluation import METRIC_MODULE_PATH, load_metric

    data = json.loads(sys.argv[1])
    metric = load_metric()
    out = {"folder": metric.compute(**data)}
    by_file = evaluate.load(str(METRIC_MODULE_PATH / "redshift_metrics.py"))
    out["file"] = by_file.compute(predictions=data["predictions"], references=data["references"])
    half = len(data["predictions"]) // 2
    for sl in (slice(0, half), slice(half, None)):
        by_file.add_batch(predictions=data["predictions"][sl], references=data["references"][sl])
    out["batched"] = by_file.compute()
    out["empty"] = metric.compute(predictions=[], references=[])
    module = sys.modules[type(metric).__module__]
    out["module_file"] = module.__file__
    out["citation"] = metric.citation
    out["doctest"] = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)._asdict()
    print(json.dumps(out))
    """
)


def test_evaluate_module_offline_matches_plain_functions(tmp_path):
    rng = np.random.default_rng(7)
    n = 60
    z_true = rng.uniform(0, 1.5, n)
    z_pred = z_true + rng.normal(0, 0.002, n) * (1 + z_true)
    z_pred[:5] += 0.4
    groups = rng.choice(["bgs", "elg", "lrg"], n)
    score = rng.uniform(0, 1, n)
    data = {
        "predictions": z_pred.tolist(),
        "references": z_true.tolist(),
        "groups": groups.tolist(),
        "scores": score.tolist(),
        "thresholds": [0.0, 0.3, 0.6],
        "redshift_bins": [0.0, 0.5, 1.0, 1.5],
    }
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_METRICS_CACHE": str(tmp_path / "metrics"),
    }
    proc = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, json.dumps(data)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    expected = redshift_metrics(z_pred, z_true)
    for key, value in expected.items():
        assert out["folder"][key] == pytest.approx(value, rel=1e-12)
        assert out["file"][key] == pytest.approx(value, rel=1e-12)
        assert out["batched"][key] == pytest.approx(value, rel=1e-12)
    by_group = metrics_by_group(z_pred, z_true, groups)
    assert list(out["folder"]["by_group"]) == list(by_group)
    for name, values in by_group.items():
        assert out["folder"]["by_group"][name] == pytest.approx(values, rel=1e-12)
    bins = metrics_by_redshift_bin(z_pred, z_true, data["redshift_bins"])
    assert [r["n"] for r in out["folder"]["by_redshift_bin"]] == [r["n"] for r in bins]
    assert [r["nmad"] for r in out["folder"]["by_redshift_bin"]] == pytest.approx([r["nmad"] for r in bins])
    cp = completeness_purity(z_pred, z_true, score, data["thresholds"])
    assert out["folder"]["completeness_purity"]["completeness"] == pytest.approx(cp["completeness"].tolist())
    assert out["folder"]["completeness_purity"]["purity"] == pytest.approx(cp["purity"].tolist())
    assert out["empty"]["n"] == 0 and math.isnan(out["empty"]["nmad"])
    # evaluate copied the script into the fresh modules cache and imported it from there
    assert out["module_file"].startswith(str(tmp_path / "modules"))
    assert "2501.01070" in out["citation"]
    assert out["doctest"]["attempted"] >= 4 and out["doctest"]["failed"] == 0
    assert (METRIC_MODULE_PATH / "redshift_metrics.py").is_file()


# ---------------------------------------------------------------- model-card results


@pytest.fixture
def per_class():
    z_pred, z_true, _ = gaussian_sample(300, 0.001, seed=8)
    groups = np.array(["bgs", "elg", "lrg"] * 100)
    z_pred[:6] += 0.8
    results = metrics_by_group(z_pred, z_true, groups, overall_key="all")
    results["qso"] = redshift_metrics([], [])  # an empty class: left out of the model index
    return results


def test_model_index_structure(per_class):
    index = model_index(per_class, "specpt-small", "DESI EDR mock", "desi-edr-mock", dataset_split="test")
    assert len(index) == 1 and index[0]["name"] == "specpt-small"
    (result,) = index[0]["results"]
    assert result["task"] == {"type": "redshift-estimation", "name": "Redshift estimation"}
    assert result["dataset"] == {"name": "DESI EDR mock", "type": "desi-edr-mock", "split": "test"}
    metrics = result["metrics"]
    assert len(metrics) == 3 * 4  # NMAD, centred NMAD and η for all, bgs, elg, lrg; qso is empty
    by_key = {(m["type"], m["config"]): m for m in metrics}
    assert by_key[("nmad", "bgs")]["name"] == "NMAD (BGS)"
    assert by_key[("nmad_centred", "elg")]["name"] == "Centred NMAD (ELG)"
    assert by_key[("nmad_centred", "elg")]["value"] == pytest.approx(
        per_class["elg"]["nmad_centred"], rel=1e-3
    )
    assert by_key[("nmad", "bgs")]["value"] == pytest.approx(per_class["bgs"]["nmad"], rel=1e-3)
    assert by_key[("eta", "all")]["value"] == pytest.approx(per_class["all"]["eta"], rel=1e-3)
    assert by_key[("eta", "elg")]["args"] == {"threshold": 0.15}
    assert not any(cfg == "qso" for _, cfg in by_key)


def test_results_json_round_trips_through_huggingface_hub(tmp_path, per_class):
    path = write_results_json(
        tmp_path / "eval" / "results.json",
        per_class,
        "specpt-small",
        "DESI EDR mock",
        "desi-edr-mock",
        extra={"by_redshift_bin": [{"z_min": 0.0, "nmad": np.float64("nan")}]},
    )
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary file left behind
    data = read_results_json(path)
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert data["metrics"]["qso"]["nmad"] is None and data["metrics"]["bgs"]["n"] == 100
    assert data["by_redshift_bin"][0]["nmad"] is None

    name, results = model_index_to_eval_results(data["model-index"])
    assert name == "specpt-small" and all(isinstance(r, EvalResult) for r in results)
    assert results == eval_results(per_class, "DESI EDR mock", "desi-edr-mock")

    card_data = ModelCardData(model_name=name, eval_results=results, library_name="transformers")
    assert card_data.to_dict()["model-index"] == data["model-index"]
    from_yaml = ModelCardData(**{"model-index": data["model-index"]})
    assert from_yaml.eval_results == results
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n# specpt-small\n")
    assert card.data.to_dict()["model-index"] == data["model-index"]


def test_results_inputs_are_checked(tmp_path, per_class):
    flat = model_index(per_class["bgs"], "m", "d", "d")  # a single metrics dict counts as "all"
    assert {m["config"] for m in flat[0]["results"][0]["metrics"]} == {"all"}
    with pytest.raises(ValueError, match="not reportable"):
        model_index(per_class, "m", "d", "d", metrics=("accuracy",))
    with pytest.raises(ValueError, match="no finite metric values"):
        model_index({"qso": per_class["qso"]}, "m", "d", "d")
    with pytest.raises(ValueError, match="extra must not redefine"):
        write_results_json(tmp_path / "r.json", per_class, "m", "d", "d", extra={"metrics": {}})
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        read_results_json(tmp_path / "bad.json")


def test_pdf_coverage_counts_the_pits_inside_central_intervals():
    pit = np.array([0.5, 0.2, 0.8, 0.01, 0.99, 0.15])  # |pit - 0.5|: 0, 0.3, 0.3, 0.49, 0.49, 0.35
    assert pdf_coverage(pit) == {"0.68": 0.5, "0.95": 4 / 6}  # 0.68: |.| <= 0.34; 0.95: |.| <= 0.475
    assert pdf_coverage(pit, levels=(0.5,)) == {"0.5": 1 / 6}
    assert math.isnan(pdf_coverage([])["0.68"])
