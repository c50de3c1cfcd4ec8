"""Nothing lost, nothing silent: each probe builds its bad input, checks the refusal or recovery and that
nothing was lost (input bytes unchanged, earlier outputs intact)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from astropy.io import fits

from specpt_hf.data.desi import read_desi_spectra
from specpt_hf.data.mock import write_mock_healpix, write_mock_release
from specpt_hf.data.prepare import ShardWriter, prepare_dataset
from specpt_hf.data.prepare import main as prepare_main
from specpt_hf.data.redshifts import JoinStats, QualityCuts, join_redshifts, read_redrock
from specpt_hf.evaluation.evaluate_model import load_eval_split
from specpt_hf.evaluation.evaluate_model import main as evaluate_main
from specpt_hf.evaluation.results import write_results_json
from specpt_hf.hub import main as push_main
from specpt_hf.training import train as train_module
from specpt_hf.training.checkpoint import checkpoint_dirs
from specpt_hf.training.data import load_training_data
from specpt_hf.training.settings import TrainingSettings
from specpt_hf.training.train import main as train_main
from specpt_hf.training.train import training_function

pytestmark = pytest.mark.usefixtures("single_thread")


def digest(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under `folder`."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """A small mock release (coadd + redrock files)."""
    root = tmp_path_factory.mktemp("raw")
    write_mock_release(root, {"elg": 30, "lrg": 30}, seed=5, spectra_per_file=30, progress=False)
    return root


@pytest.fixture(scope="module")
def data_dir(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "parquet"
    prepare_dataset([raw], out, fractions=(0.6, 0.2, 0.2), progress=False)
    return out


def settings_for(data_dir: Path, output_dir: Path, **overrides) -> TrainingSettings:
    values = dict(
        stage="autoencoder",
        preset="specpt-tiny",
        data_dir=str(data_dir),
        output_dir=str(output_dir),
        batch_size=8,
        max_steps=4,
        eval_steps=2,
        logging_steps=2,
        checkpointing_steps=2,
        report_to="none",
        disable_tqdm=True,
        seed=3,
    )
    return TrainingSettings(**{**values, **overrides})


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> TrainingSettings:
    """A finished tiny autoencoder run with checkpoints at steps 2 and 4."""
    settings = settings_for(data_dir, tmp_path_factory.mktemp("run") / "out")
    training_function(settings)
    return settings


def copy_run(settings: TrainingSettings, to: Path, keep_step: int = 2) -> TrainingSettings:
    """A copy of a run's output folder holding only its checkpoint `step_{keep_step}`, set to resume."""
    shutil.copytree(settings.output_dir, to)
    for folder in (to / "checkpoints").iterdir():
        if folder.name != f"step_{keep_step}":
            shutil.rmtree(folder)
    shutil.rmtree(to / "model")
    return TrainingSettings(**{**settings.to_dict(), "output_dir": str(to), "resume": True})


class Payload:
    """Unpickling it creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


# --- 1. no code execution on resume ---------------------------------------------------------------------


def test_resume_never_unpickles_a_planted_file(trained, tmp_path):
    resumed = copy_run(trained, tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "step_2"
    marker = tmp_path / "payload_ran"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"):
        torch.save(Payload(marker), checkpoint / name)
    result = training_function(resumed)
    assert not marker.exists()
    assert result.step == 4 and result.history[0]["step"] == 2  # resumed at step 2, history kept
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


# --- 2. a checkpoint killed mid-save does not block resuming ------------------------------------------------


@pytest.mark.parametrize("partial", ["empty", "no_state"])
def test_resume_skips_an_incomplete_newest_checkpoint(trained, tmp_path, partial, caplog):
    resumed = copy_run(trained, tmp_path / "run")
    good = tmp_path / "run" / "checkpoints" / "step_2"
    bad = good.with_name("step_3")
    if partial == "empty":
        bad.mkdir()
    else:  # killed before its last file
        shutil.copytree(good, bad)
        (bad / "trainer_state.json").unlink()
    before = digest(good)
    with caplog.at_level("WARNING"):
        result = training_function(resumed)
    assert f"skipping incomplete checkpoint {bad}" in caplog.text
    assert result.step == 4 and result.history[0]["step"] == 2  # from step_2, not afresh
    assert digest(good) == before or not good.exists()
    assert [p.name for p in checkpoint_dirs(resumed.output_dir)][-1] == "step_4"


def test_checkpoint_is_written_aside_and_renamed(trained, tmp_path, monkeypatch):
    """A save that dies midway leaves no `step_N` folder (only a hidden temporary one is removed)."""
    settings = settings_for(Path(trained.data_dir), tmp_path / "run", max_steps=2)

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for a kill between two files

    monkeypatch.setattr("specpt_hf.training.checkpoint.np.savez", die)
    with pytest.raises(KeyboardInterrupt):
        training_function(settings)
    assert not list((tmp_path / "run" / "checkpoints").iterdir())
    assert train_module.checkpoint_dirs(tmp_path / "run") == []


# --- 3. a dataset folder is complete or absent ------------------------------------------------------------


def test_shards_without_their_card_are_refused(data_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(data_dir, partial)
    (partial / "README.md").unlink()  # a prepare killed before its last file
    before = digest(partial)
    with pytest.raises(FileNotFoundError, match=rf"{partial}: no README\.md, so not a complete dataset"):
        load_training_data(partial, "autoencoder")
    with pytest.raises(FileNotFoundError, match=rf"{partial}: no README\.md"):
        load_eval_split(partial, "validation")
    assert train_main(["--data-dir", str(partial), "--output-dir", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out" / "model").exists()
    assert digest(partial) == before


def test_evaluation_split_is_read_in_place_and_names_a_missing_column(data_dir, tmp_path):
    split = load_eval_split(data_dir, "validation")  # the shards themselves, no `datasets` copy
    files = sorted((data_dir / "validation").glob("*.parquet"))
    assert split.files == [str(path) for path in files]
    assert len(split) == sum(pq.read_metadata(path).num_rows for path in files)
    assert split[0]["flux"].dtype == torch.float32 and split[0]["z"].dtype == torch.float64
    lacking = tmp_path / "lacking"
    shutil.copytree(data_dir, lacking)
    for path in (lacking / "validation").glob("*.parquet"):
        pq.write_table(pq.read_table(path).drop_columns(["target_class"]), path)
    with pytest.raises(
        ValueError, match=rf"{lacking / 'validation'}: Parquet shards lack column\(s\) \['target_class'\]"
    ):
        load_eval_split(lacking, "validation")


def test_a_failed_overwrite_leaves_the_previous_dataset(raw, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "parquet"
    shutil.copytree(data_dir, out)
    before = digest(out)
    real_add = ShardWriter.add_batch
    calls = []

    def fail_midway(self, batch):
        calls.append(1)
        if len(calls) > 1:
            raise OSError("disk full")
        real_add(self, batch)

    monkeypatch.setattr(ShardWriter, "add_batch", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset([raw], out, shard_size=1, chunk_size=8, overwrite=True, progress=False)
    assert len(calls) > 1  # it failed after writing shards
    assert digest(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


# --- 4. duplicated TARGETIDs are never joined to a label ----------------------------------------------------


def test_duplicate_targetids_in_a_coadd_get_no_label(tmp_path, caplog):
    coadd, redrock = write_mock_healpix(tmp_path / "raw", "elg", 12, seed=2, survey="sv3", healpix=26065)
    with fits.open(coadd, mode="update") as hdul:
        fibermap = hdul["FIBERMAP"].data
        targets = np.flatnonzero(np.char.strip(fibermap["OBJTYPE"].astype(str)) == "TGT")
        first, second = targets[:2]
        fibermap["TARGETID"][second] = fibermap["TARGETID"][first]  # two spectra, one TARGETID
        duplicated = int(fibermap["TARGETID"][first])
    before = digest(tmp_path / "raw")
    with caplog.at_level("WARNING"):
        summary = prepare_dataset([tmp_path / "raw"], tmp_path / "out", cuts=QualityCuts(enabled=False))
    assert f"{coadd.name}: 2 spectra share their TARGETID" in caplog.text
    assert summary.join_stats.duplicate_targetid == 2
    rows = [r for p in sorted((tmp_path / "out").rglob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert duplicated not in {r["targetid"] for r in rows}
    truth = fits.getdata(redrock, "REDSHIFTS")
    z_of = dict(zip(truth["TARGETID"].tolist(), truth["Z"].tolist(), strict=True))
    assert rows and all(r["z"] == z_of[r["targetid"]] for r in rows)  # every label is the spectrum's own
    assert digest(tmp_path / "raw") == before

    stats = JoinStats()  # the record path: the same spectra dropped, the same warning
    caplog.clear()
    with caplog.at_level("WARNING"):
        records = list(
            join_redshifts(
                read_desi_spectra(coadd),
                read_redrock(redrock),
                cuts=QualityCuts(enabled=False),
                stats=stats,
            )
        )
    assert stats.duplicate_targetid == 2 and f"{coadd.name}: 2 spectra share their TARGETID" in caplog.text
    assert duplicated not in {r["targetid"] for r in records}
    assert records and all(r["z"] == z_of[r["targetid"]] for r in records)


# --- 5. a model of the wrong kind is refused ----------------------------------------------------------------


def test_evaluate_refuses_an_autoencoder_folder(trained, data_dir, tmp_path, capsys):
    autoencoder = Path(trained.output_dir) / "model"
    before = digest(autoencoder)
    out = tmp_path / "evaluation"
    code = evaluate_main(["--model", str(autoencoder), "--data", str(data_dir), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert err == (
        f"specpt evaluate: {autoencoder}: config.json has model_type 'specpt', "
        "a SpecPTForRedshift needs 'specpt_redshift'\n"
    )
    assert not out.exists() and digest(autoencoder) == before


def test_push_refuses_redshift_results_on_an_autoencoder(trained, tmp_path, capsys):
    autoencoder = Path(trained.output_dir) / "model"
    results = tmp_path / "results.json"
    metrics = {"n": 10, "nmad": 0.01, "eta": 0.02, "bias": 0.0}
    write_results_json(results, {"all": metrics}, "tiny", "mock", "specpt-mock", dataset_split="test")
    before = digest(autoencoder)
    out = tmp_path / "repo"
    argv = [
        str(autoencoder),
        "--repo-id",
        "me/tiny",
        "--results",
        str(results),
        "--out",
        str(out),
        "--dry-run",
    ]
    assert push_main(argv) == 1
    err = capsys.readouterr().err
    assert f"{autoencoder}: holds a 'specpt' model, not a 'specpt_redshift' one" in err
    assert not out.exists() and digest(autoencoder) == before


# --- 6. expected errors are one line, the traceback on request -----------------------------------------------


@pytest.mark.parametrize(
    ("make_source", "message"),
    [
        (lambda tmp: _bert_folder(tmp / "bert"), "config.json has model_type 'bert', not a SpecPT model"),
        (lambda tmp: tmp / "nowhere" / "autoencoder", "nowhere/autoencoder: no such model folder"),
    ],
    ids=["bert-folder", "missing-folder"],
)
def test_train_refuses_a_pretrained_model_that_is_not_specpt(
    make_source, message, data_dir, tmp_path, capsys, monkeypatch
):
    source = make_source(tmp_path)
    capsys.readouterr()
    argv = ["--stage", "redshift", "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "out")]
    argv += ["--pretrained-model", str(source), "--max-steps", "1", "--report-to", "none"]
    assert train_main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("specpt train: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError if "bert" in message else FileNotFoundError, match=message):
        train_main([*argv, "--debug"])


def _bert_folder(folder: Path) -> Path:
    from transformers import BertConfig, BertModel

    config = BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=16)
    BertModel(config).save_pretrained(folder)
    return folder


def test_prepare_error_is_one_line_unless_debug(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "nowhere"
    argv = [str(missing), "--out", str(tmp_path / "out"), "--no-progress"]
    monkeypatch.delenv("SPECPT_DEBUG", raising=False)
    assert prepare_main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("specpt prepare: ") and str(missing) in err
    assert err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare_main([*argv, "--debug"])
    monkeypatch.setenv("SPECPT_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare_main(argv)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- specpt predict


@pytest.fixture
def predict_setup(tmp_path):
    from specpt_hf import create_model

    torch.manual_seed(0)
    create_model("specpt-tiny", "redshift").save_pretrained(tmp_path / "model")
    coadd = write_mock_healpix(tmp_path / "data", "bgs", 3, seed=5, healpix=26500)[0]
    return tmp_path, coadd


def test_predict_refuses_to_write_its_catalog_over_an_input(predict_setup, capsys):
    from specpt_hf.predict import main as predict_main

    root, coadd = predict_setup
    before = hashlib.sha256(coadd.read_bytes()).hexdigest()
    rc = predict_main([str(coadd), "--model", str(root / "model"), "--out", str(coadd), "--no-progress"])
    assert rc == 1
    assert "is one of the input files" in capsys.readouterr().err
    assert hashlib.sha256(coadd.read_bytes()).hexdigest() == before


def test_predict_flags_a_redshift_that_came_out_nan(predict_setup, tmp_path):
    from specpt_hf.loading import load_model
    from specpt_hf.prediction import SpecPTZwarn, predict_spectra

    root, _ = predict_setup
    model = load_model(root / "model")
    flux = np.ones((2, model.config.num_pixels), dtype=np.float32)
    flux[1, :2600] = 3e38  # one arm at 3e38: its squares overflow float32 inside the network
    out = predict_spectra(model, flux, np.ones_like(flux))
    assert out["zwarn"][0] & SpecPTZwarn.BAD_FIT == 0
    assert not np.isfinite(out["z"][1]) and out["zwarn"][1] & SpecPTZwarn.BAD_FIT


def test_predict_resume_refuses_a_model_whose_weights_changed(predict_setup, monkeypatch):
    from specpt_hf import create_model
    from specpt_hf.loading import load_model
    from specpt_hf.predict import ProgressStore, _run_settings, predict_catalog
    from specpt_hf.prediction import FlagThresholds

    root, coadd = predict_setup
    out = root / "catalog.fits"

    def interrupted_run() -> None:  # the progress an interrupted run leaves: its settings, no file done
        model = load_model(root / "model")
        ProgressStore(out, _run_settings(model, str(root / "model"), None, FlagThresholds()), resume=False)

    interrupted_run()
    monkeypatch.chdir(root)
    summary = predict_catalog([coadd], out, "model", resume=True, progress=False)  # same weights, other path
    assert summary.rows == 3
    interrupted_run()
    torch.manual_seed(1)
    create_model("specpt-tiny", "redshift").save_pretrained(root / "model")  # new weights, same folder
    with pytest.raises(ValueError, match="other settings"):
        predict_catalog([coadd], out, root / "model", resume=True, progress=False)


def test_corrupt_model_weights_name_the_file(predict_setup, capsys):
    from specpt_hf.predict import main as predict_main

    root, coadd = predict_setup
    weights = root / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    rc = predict_main(
        [str(coadd), "--model", str(root / "model"), "--out", str(root / "c.fits"), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "model.safetensors: not a readable safetensors file" in err and "Traceback" not in err
    assert not (root / "c.fits").exists()


# ---------------------------------------------------------------------------------------------- the pipeline


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda n, tmp: [], "the list is empty"),
        (lambda n, tmp: {"flux": np.ones(n), "ivar": np.ones(n - 10)}, "`ivar` has shape"),
        (lambda n, tmp: {"flux": np.ones((2, n)), "targetid": [1, 2, 3]}, "`targetid` has 3 values for 2"),
        (lambda n, tmp: tmp, "a directory"),
        (lambda n, tmp: {"flux": np.ones((0, n))}, "`flux` is empty"),
    ],
    ids=["empty-list", "short-ivar", "targetid-count", "directory", "no-spectra"],
)
def test_pipeline_bad_inputs_name_the_argument(make_input, message, tmp_path):
    from specpt_hf import create_model, load_pipeline

    torch.manual_seed(0)
    pipe = load_pipeline(create_model("specpt-tiny", "redshift").eval())
    with pytest.raises(ValueError, match=message):
        pipe(make_input(pipe.model.config.num_pixels, tmp_path))


# ---------------------------------------------------------------------------------------------- more of predict


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_predict_on_cuda_without_cuda_is_one_line(predict_setup, capsys):
    from specpt_hf.predict import main as predict_main

    root, coadd = predict_setup
    argv = [str(coadd), "--model", str(root / "model"), "--out", str(root / "c.fits"), "--no-progress"]
    for device, message in [
        ("cuda", "--device cuda: "),
        ("cuda:1", "--device cuda:1: "),
        ("tpu9", "not a torch"),
    ]:
        assert predict_main([*argv, "--device", device]) == 1
        err = capsys.readouterr().err
        assert err.startswith("specpt predict: ") and message in err and "Traceback" not in err
    assert not (root / "c.fits").exists()


def test_predict_out_under_a_file_names_the_file(predict_setup, capsys):
    from specpt_hf.predict import main as predict_main

    root, coadd = predict_setup
    (root / "notes").write_text("kept")
    argv = [
        str(coadd),
        "--model",
        str(root / "model"),
        "--out",
        str(root / "notes" / "c.fits"),
        "--no-progress",
    ]
    assert predict_main(argv) == 1
    assert f"{root / 'notes'} is a file" in capsys.readouterr().err
    assert (root / "notes").read_text() == "kept"


@pytest.fixture
def interrupted_predict(predict_setup):
    """A predict run over two coadds stopped after the first file, and the catalog an uninterrupted run gives."""
    from specpt_hf.loading import load_model
    from specpt_hf.predict import predict_catalog

    root, first = predict_setup
    files = [first, write_mock_healpix(root / "data", "elg", 4, seed=6, healpix=26501)[0]]
    predict_catalog(files, root / "whole.fits", root / "model", progress=False)
    model = load_model(root / "model")

    def fail_on_second_file(module, args, kwargs):
        if len(kwargs["flux"]) == 4:
            raise RuntimeError("stopped")

    model.register_forward_pre_hook(fail_on_second_file, with_kwargs=True)
    with pytest.raises(RuntimeError, match="stopped"):
        predict_catalog(files, root / "c.fits", model, progress=False)
    progress = root / "c.fits.progress"
    assert [p.name for p in sorted(progress.iterdir())] == ["manifest.json", "part-000000.npz"]
    return root, files, progress


@pytest.mark.parametrize("damaged", ["part-000000.npz", "manifest.json"])
def test_predict_resume_redoes_what_a_damaged_progress_lost(interrupted_predict, damaged, caplog):
    from astropy.table import Table

    from specpt_hf.predict import predict_catalog

    root, files, progress = interrupted_predict
    path = progress / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut short (a full disk, a bad copy)
    summary = predict_catalog(files, root / "c.fits", root / "model", resume=True, progress=False)
    assert summary.resumed == 0 and summary.predicted == 2
    assert "damaged" in caplog.text and damaged in caplog.text
    whole, resumed = Table.read(root / "whole.fits", hdu=1), Table.read(root / "c.fits", hdu=1)
    assert whole["TARGETID"].tolist() == resumed["TARGETID"].tolist()
    np.testing.assert_array_equal(whole["Z"], resumed["Z"])


def test_templates_error_is_one_line_unless_debug(predict_setup, tmp_path, capsys):
    from specpt_hf.templates import main as templates_main

    root, _ = predict_setup
    before = digest(root / "model")
    argv = [str(tmp_path / "no-data"), "--model", str(root / "model")]
    assert templates_main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("specpt templates: ") and "no-data" in err and "Traceback" not in err
    with pytest.raises(FileNotFoundError):
        templates_main([*argv, "--debug"])
    assert digest(root / "model") == before


def test_predict_names_a_negative_smoothing_in_config_json(predict_setup, tmp_path, capsys):
    from specpt_hf.predict import main as predict_main

    root, coadd = predict_setup
    config_path = root / "model" / "config.json"
    config = json.loads(config_path.read_text())
    config["refinement_smoothing_kms"] = {"QSO": -5.0}
    config_path.write_text(json.dumps(config))
    rc = predict_main(
        [str(coadd), "--model", str(root / "model"), "--out", str(tmp_path / "z.fits"), "--no-progress"]
    )
    assert rc == 1
    assert "refinement_smoothing_kms['QSO']" in capsys.readouterr().err
    assert not (tmp_path / "z.fits").exists()
