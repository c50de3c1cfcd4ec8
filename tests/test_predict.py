"""`specpt predict`: one catalog from many coadd files, the same numbers as the model, atomic writes, resume."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.table import Table

import specpt_hf.predict as predict_module
from specpt_hf import create_model
from specpt_hf.data import ReadStats, read_desi_spectra
from specpt_hf.data.mock import write_mock_healpix
from specpt_hf.loading import load_model
from specpt_hf.predict import main, predict_catalog
from specpt_hf.prediction import FlagThresholds, SpecPTZwarn, predict_records

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    for task in ("redshift", "autoencoder"):
        create_model("specpt-tiny", task).save_pretrained(root / task)
    coadds = [
        write_mock_healpix(root / "data", cls, n, seed=i, healpix=26000 + i)[0]
        for i, (cls, n) in enumerate([("elg", 4), ("bgs", 3), ("lrg", 5)])
    ]
    # a file whose every spectrum has ivar 0: no usable spectra
    empty = root / "data" / "coadd-sv3-dark-26100.fits"
    with fits.open(coadds[0]) as hdul:
        for arm in "BRZ":
            hdul[f"{arm}_IVAR"].data[:] = 0.0
        hdul.writeto(empty)
    return {"root": root, "coadds": coadds, "empty": empty}


def reference(setup, files) -> dict[str, np.ndarray]:
    """Predictions from reading the files and calling the model directly."""
    model = load_model(setup["root"] / "redshift")
    records = [r for path in files for r in read_desi_spectra(path)]
    return predict_records(model, records, batch_size=64)


def test_catalog_has_one_row_per_usable_spectrum(setup, tmp_path):
    out = tmp_path / "catalog.fits"
    files = [*setup["coadds"], setup["empty"]]
    summary = predict_catalog(
        files,
        out,
        setup["root"] / "redshift",
        autoencoder=setup["root"] / "autoencoder",
        batch_size=3,
        progress=False,
    )
    stats = ReadStats()
    for path in files:
        list(read_desi_spectra(path, stats=stats))
    with fits.open(out) as hdul:
        header = hdul["REDSHIFTS"].header
        catalog = Table(hdul["REDSHIFTS"].data)
    assert len(catalog) == stats.spectra == summary.rows == 12
    expected = reference(setup, setup["coadds"])
    assert catalog["TARGETID"].tolist() == expected["targetid"].tolist()
    np.testing.assert_allclose(catalog["Z"], expected["z_pred"], rtol=1e-6)
    np.testing.assert_allclose(catalog["ZERR"], expected["zerr_pred"], rtol=1e-5)
    anomalous = (catalog["ANOMALY"] > FlagThresholds().max_anomaly) * int(SpecPTZwarn.ANOMALOUS)
    assert catalog["ZWARN"].tolist() == (expected["zwarn"] | anomalous).tolist()
    assert set(catalog["SOURCE"]) == {path.name for path in setup["coadds"]}
    assert np.all(np.isfinite(catalog["ANOMALY"])) and catalog["HEALPIX"].dtype.newbyteorder("=") == np.int32
    assert header["MODEL"] == str(setup["root"] / "redshift") and header["SPECPTV"] == "0.1.0"
    assert header["ZWARN2"] == "LOW_QUALITY" and header["NEMPTY"] == 1
    assert summary.empty == [str(setup["empty"].resolve())] and not summary.failed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog.fits"]  # progress folder removed


def test_parquet_and_csv_hold_the_same_catalog(setup, tmp_path):
    args = [str(p) for p in setup["coadds"][:2]] + [
        "--model",
        str(setup["root"] / "redshift"),
        "--no-progress",
    ]
    assert main([*args, "--out", str(tmp_path / "cat.parquet")]) == 0
    assert main([*args, "--out", str(tmp_path / "cat.txt"), "--format", "csv", "--weak-fit-chi2", "7.5"]) == 0
    parquet = Table.read(tmp_path / "cat.parquet", format="parquet")
    csv = Table.read(tmp_path / "cat.txt", format="ascii.ecsv")
    expected = reference(setup, setup["coadds"][:2])
    for table in (parquet, csv):
        assert table["TARGETID"].tolist() == expected["targetid"].tolist()
        np.testing.assert_allclose(table["Z"], expected["z_pred"], rtol=1e-6)
        assert table.meta["MODEL"] == str(setup["root"] / "redshift") and "ANOMALY" not in table.colnames
    assert (tmp_path / "cat.txt").read_text().splitlines()[0].startswith("# %ECSV")
    assert parquet.meta["WEAKCHI2"] == FlagThresholds().weak_fit_chi2 and csv.meta["WEAKCHI2"] == 7.5


def test_failure_midway_leaves_no_catalog_and_resume_skips_done_files(setup, tmp_path, monkeypatch):
    out = tmp_path / "catalog.fits"
    out.write_bytes(b"an older catalog")
    model = load_model(setup["root"] / "redshift")
    calls = []

    def fail_on_second_call(module, args, kwargs):
        calls.append(len(kwargs["flux"]))
        if len(calls) == 2:
            raise RuntimeError("injected failure")

    handle = model.register_forward_pre_hook(fail_on_second_call, with_kwargs=True)
    with pytest.raises(RuntimeError, match="injected failure"):
        predict_catalog(setup["coadds"], out, model, batch_size=8, progress=False)
    handle.remove()
    assert out.read_bytes() == b"an older catalog"  # untouched, no partial catalog under the final name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog.fits", "catalog.fits.progress"]
    manifest = json.loads((tmp_path / "catalog.fits.progress" / "manifest.json").read_text())
    assert list(manifest["files"]) == [str(setup["coadds"][0].resolve())]

    read = []
    original = predict_module.read_desi_spectra
    monkeypatch.setattr(
        predict_module, "read_desi_spectra", lambda path, **kw: read.append(path) or original(path, **kw)
    )
    calls.clear()
    model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(len(kwargs["flux"])), with_kwargs=True
    )
    summary = predict_catalog(setup["coadds"], out, model, batch_size=8, resume=True, progress=False)
    assert read == [p.resolve() for p in setup["coadds"][1:]] and calls == [3, 5]
    assert (summary.resumed, summary.predicted, summary.spectra) == (1, 2, 8)
    catalog = Table.read(out, hdu="REDSHIFTS")
    expected = reference(setup, setup["coadds"])
    assert catalog["TARGETID"].tolist() == expected["targetid"].tolist()
    np.testing.assert_allclose(catalog["Z"], expected["z_pred"], rtol=1e-6)
    assert not (tmp_path / "catalog.fits.progress").exists()


def test_bf16_runs_the_network_under_autocast(setup, tmp_path):
    model = load_model(setup["root"] / "redshift")
    seen = []
    model.register_forward_pre_hook(
        lambda module, args: seen.append(
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        )
    )
    for bf16 in (False, True):
        predict_catalog(setup["coadds"], tmp_path / f"{bf16}.fits", model, bf16=bf16, progress=False)
    assert seen and seen[: len(seen) // 2] == [False] * (len(seen) // 2) and all(seen[len(seen) // 2 :])
    plain, fast = (Table.read(tmp_path / f"{bf16}.fits", hdu="REDSHIFTS") for bf16 in (False, True))
    assert fast.meta["BF16"] is True and plain.meta["BF16"] is False
    assert fast["TARGETID"].tolist() == plain["TARGETID"].tolist() and np.isfinite(fast["Z"]).all()
    assert not torch.is_autocast_enabled("cpu")  # the context ends with the run


def test_resume_refuses_other_settings(setup, tmp_path):
    out = tmp_path / "catalog.fits"
    model = load_model(setup["root"] / "redshift")

    def stop(module, args):
        raise RuntimeError("stop")

    model.register_forward_pre_hook(stop)
    with pytest.raises(RuntimeError):
        predict_catalog(setup["coadds"], out, model, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        predict_catalog(
            setup["coadds"],
            out,
            model,
            resume=True,
            thresholds=FlagThresholds(min_quality=0.9),
            progress=False,
        )


def test_unreadable_and_empty_inputs(setup, tmp_path, caplog, capsys):
    broken = tmp_path / "coadd-sv3-dark-26200.fits"
    broken.write_bytes(setup["coadds"][1].read_bytes()[:50000])  # truncated
    out = tmp_path / "catalog.fits"
    model = ["--model", str(setup["root"] / "redshift"), "--no-progress"]
    assert main([str(broken), str(setup["coadds"][0]), *model, "--out", str(out)]) == 1
    assert len(Table.read(out, hdu="REDSHIFTS")) == 4
    assert "truncated" in caplog.text and (tmp_path / "catalog.fits.progress").is_dir()  # kept to retry

    shutil.rmtree(tmp_path / "catalog.fits.progress")
    nothing = tmp_path / "nothing.fits"
    assert main([str(setup["empty"]), *model, "--out", str(nothing)]) == 1
    assert not nothing.exists() and "no usable spectra" in caplog.text
    assert main([str(tmp_path / "missing.fits"), *model, "--out", str(nothing)]) == 1
    assert "missing.fits: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(setup["coadds"][0]), *model, "--out", str(nothing), "--format", "xlsx"])
