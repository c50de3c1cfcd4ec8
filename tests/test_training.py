"""Training with Accelerate: settings, data, both stages, resume, two processes, best model, save/load."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from accelerate.utils import set_seed
from safetensors.torch import load_file

from specpt_hf.data.builder import desi_features
from specpt_hf.presets import create_model, preset_config
from specpt_hf.training import train as train_module
from specpt_hf.training.data import (
    RowGroupWindowSampler,
    SpectrumCollator,
    build_dataloader,
    column_array,
    filter_redshift_range,
    first_rows,
    load_split,
    load_training_data,
)
from specpt_hf.training.settings import SETTINGS_NAME, TrainingSettings, parse_settings
from specpt_hf.training.train import build_model, main, parameter_groups, training_function

REPO = Path(__file__).resolve().parents[1]
LINES = (3727.1, 5008.2, 6564.6)  # [O II], [O III], H-alpha rest wavelengths, Angstrom
N_TRAIN, N_VAL, N_FAR = 64, 32, 4  # spectra per split; N_FAR train spectra lie beyond the tiny preset's z_max
ROW_GROUP = 8  # rows per Parquet row group: 8 row groups in train, 4 in validation


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_private_cache(tmp_path_factory):
    """Two shared cores: one intra-op thread per process is faster and steadier than two. A `datasets`
    cache, should anything write one, goes to a temporary folder, not the user's Hugging Face cache."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("hf_datasets_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        patch.setenv("HF_DATASETS_CACHE", str(cache))  # for the subprocesses
        yield
    torch.set_num_threads(threads)


def write_split(folder: Path, n: int, rng: np.random.Generator, n_far: int = 0) -> None:
    """Spectrum records (ARCHITECTURE.md) with emission lines at (1 + z) x rest wavelength, as two shards of
    row groups of 8 rows."""
    config = preset_config("specpt-tiny", "autoencoder")
    wave = config.wavelength_start + config.wavelength_step * np.arange(config.num_pixels)  # [pixels]
    z = np.concatenate([rng.uniform(0.05, 0.45, n - n_far), np.full(n_far, 4.5)])
    flux = 1.0 + 0.3 * (wave / 6000.0)[None] * rng.uniform(0.5, 1.5, (n, 1))  # [n, pixels]
    for rest in LINES:
        center = (1.0 + z[:, None]) * rest  # [n, 1]
        flux = flux + rng.uniform(2.0, 6.0, (n, 1)) * np.exp(-0.5 * ((wave[None] - center) / 4.0) ** 2)
    flux = (flux + 0.1 * rng.standard_normal(flux.shape)).astype(np.float32)
    ivar = np.full(flux.shape, 100.0, np.float32)
    mask = np.zeros(flux.shape, bool)
    mask[:, rng.integers(0, config.num_pixels, 40)] = True  # dead pixels
    ivar[mask] = 0.0
    columns = {
        "targetid": rng.integers(1, 2**40, n),
        "flux": list(flux),
        "ivar": list(ivar),
        "mask": list(mask),
        "z": z,
        "zerr": np.full(n, 1e-5),
        "zwarn": np.zeros(n, np.int64),
        "spectype": ["GALAXY"] * n,
        "target_class": ["elg"] * n,
        "survey": ["sv3"] * n,
        "program": ["dark"] * n,
        "healpix": np.full(n, -1, np.int64),
    }
    table = pa.table(
        columns, schema=desi_features(config.num_pixels).arrow_schema
    )  # as `specpt prepare` writes
    folder.mkdir(parents=True)
    half = n // 2
    pq.write_table(table.slice(0, half), folder / "shard-00000.parquet", row_group_size=ROW_GROUP)
    pq.write_table(table.slice(half), folder / "shard-00001.parquet", row_group_size=ROW_GROUP)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parquet")
    rng = np.random.default_rng(7)
    write_split(root / "train", N_TRAIN, rng, n_far=N_FAR)
    write_split(root / "validation", N_VAL, rng)
    (root / "README.md").write_text("---\n---\n# test spectra\n")  # the card: the folder is complete
    return root


def stage1_settings(data_dir: Path, output_dir: Path, **overrides) -> TrainingSettings:
    values = dict(
        stage="autoencoder",
        preset="specpt-tiny",
        data_dir=str(data_dir),
        output_dir=str(output_dir),
        batch_size=16,  # 4 steps per epoch
        learning_rate=3e-3,
        warmup_steps=2,
        max_steps=16,
        eval_steps=8,
        logging_steps=2,
        checkpointing_steps=6,  # step 6 is in the middle of epoch 2
        checkpoints_total_limit=2,
        seed=11,
    )
    return TrainingSettings(**{**values, **overrides})


@pytest.fixture(scope="module")
def stage1(data_dir, tmp_path_factory):
    settings = stage1_settings(data_dir, tmp_path_factory.mktemp("stage1"))
    return settings, training_function(settings)


def fixed_batch(data_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    """The first 16 validation spectra as model inputs."""
    splits = load_training_data(data_dir, stage, z_range=(0.0, 4.0) if stage == "redshift" else None)
    return next(iter(build_dataloader(splits["validation"], stage, batch_size=16, train=False)))


@torch.no_grad()
def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    return model.eval()(**batch).loss.item()


def initial_model(settings: TrainingSettings) -> torch.nn.Module:
    """The model a run starts from: `training_function` seeds, then builds it."""
    set_seed(settings.seed)
    return build_model(settings)


def loss_curve(log_dir: Path) -> list[float]:
    """`train/loss` scalars of the TensorBoard event files under `log_dir`, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(log_dir.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event files under {log_dir}"
    curve = {}
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        if "train/loss" in accumulator.Tags()["scalars"]:
            curve.update({e.step: e.value for e in accumulator.Scalars("train/loss")})
    return [curve[step] for step in sorted(curve)]


# --- settings ----------------------------------------------------------------------------------------


def test_settings_file_flags_and_saved_yaml(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("stage: redshift\nlearning_rate: 3e-4\nbatch_size: 64\nfreeze_encoder: true\n")
    settings = parse_settings(["--config", str(config), "--batch-size", "8", "--max-steps", "5"])
    assert (settings.stage, settings.learning_rate, settings.batch_size) == ("redshift", 3e-4, 8)
    assert settings.freeze_encoder is True and settings.max_steps == 5 and settings.weight_decay == 0.01

    saved = settings.save(tmp_path / "model")
    assert saved.name == SETTINGS_NAME
    assert TrainingSettings.from_yaml(saved) == settings

    config.write_text("stage: redshift\nlerning_rate: 1e-3\n")
    with pytest.raises(ValueError, match="lerning_rate"):
        parse_settings(["--config", str(config)])
    with pytest.raises(ValueError, match="batch_size"):
        TrainingSettings(batch_size=0)
    with pytest.raises(ValueError, match="freeze_encoder"):
        TrainingSettings(stage="autoencoder", freeze_encoder=True)
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        parse_settings(["--config", str(tmp_path / "nowhere.yaml")])


def test_example_configs_load_and_name_real_presets():
    files = sorted((REPO / "examples" / "configs").glob("*.yaml"))
    names = {path.stem for path in files}
    for preset in ("specpt-tiny", "specpt-small", "specpt-base", "specpt-paper"):
        assert {f"{preset}-autoencoder", f"{preset}-redshift"} <= names
    for path in files:
        settings = TrainingSettings.from_yaml(path)
        assert path.stem == f"{settings.preset}-{settings.stage}"
        preset_config(settings.preset, settings.stage)  # raises for an unknown preset
    paper = TrainingSettings.from_yaml(REPO / "examples/configs/specpt-paper-redshift.yaml")
    published = dict(
        learning_rate=1e-4, batch_size=128, lr_scheduler="cosine", warmup_steps=500, max_grad_norm=1.0
    )
    assert {name: getattr(paper, name) for name in published} == published


# --- data ----------------------------------------------------------------------------------------------


def test_redshift_range_cut_and_collate(data_dir, caplog):
    splits = load_training_data(data_dir, "redshift", z_range=(0.0, 4.0), max_val_spectra=10)
    assert len(splits["train"]) == N_TRAIN - N_FAR and len(splits["validation"]) == 10
    assert f"dropped {N_FAR} of {N_TRAIN}" in caplog.text
    assert len(load_training_data(data_dir, "autoencoder")["train"]) == N_TRAIN  # stage 1 keeps every z

    rows = [splits["train"][i] for i in range(3)]
    batch = SpectrumCollator("redshift")(rows)
    assert batch["flux"].dtype == batch["ivar"].dtype == batch["labels"].dtype == torch.float32
    assert batch["mask"].dtype == torch.bool
    assert batch["flux"].shape == batch["mask"].shape == (3, preset_config("specpt-tiny").num_pixels)
    assert torch.equal(batch["labels"], torch.stack([row["z"] for row in rows]).float())
    assert torch.equal(batch["mask"], batch["ivar"] == 0)
    auto = SpectrumCollator("autoencoder")(rows)
    assert torch.equal(auto["labels"], auto["flux"])


def test_missing_shards_are_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "train")):
        load_training_data(tmp_path, "autoencoder")
    assert (
        main(["--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "out"), "--report-to", "none"]) == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("specpt train: ") and "no Parquet shards" in err and "Traceback" not in err


def test_training_order_takes_every_row_once_and_mixes_row_groups(data_dir):
    train = load_training_data(data_dir, "autoencoder")["train"]
    groups = train.row_groups()  # [rows]
    assert np.bincount(groups).tolist() == [ROW_GROUP] * (N_TRAIN // ROW_GROUP)
    orders = set()
    for seed, epoch in ((3, 0), (3, 1), (4, 0)):
        sampler = RowGroupWindowSampler(groups, seed=seed)
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(N_TRAIN)) and list(sampler) == order  # once each, reproducible
        orders.add(tuple(order))
    assert len(orders) == 3  # the order depends on the seed and the epoch
    # windows of 2 row groups: each 2 x 8 rows of the order are 2 whole row groups, shuffled together; which
    # row groups share a window changes with the epoch
    pairs = []
    for epoch in range(2):
        sampler = RowGroupWindowSampler(groups, window=2, seed=3)
        sampler.set_epoch(epoch)
        windows = groups[list(sampler)].reshape(-1, 2 * ROW_GROUP)
        assert all(len(set(window)) == 2 and np.count_nonzero(np.diff(window)) > 1 for window in windows)
        pairs.append({frozenset(window.tolist()) for window in windows})
    assert pairs[0] != pairs[1]
    # the training loader's batches mix row groups of both shards
    files = train.group_file[groups]  # [rows] shard of each row
    batches = list(build_dataloader(train, "autoencoder", batch_size=16, train=True, seed=3).batch_sampler)
    assert len(batches) == N_TRAIN // 16
    assert all(len(set(files[batch])) == 2 and len(set(groups[batch])) > 2 for batch in batches)


@pytest.mark.parametrize("num_processes", [1, 2])
def test_a_resumed_loader_gives_the_batches_of_an_uninterrupted_one(data_dir, num_processes):
    """As `train.py` resumes: `set_epoch`, then `skip_first_batches`, on loaders prepared by accelerate."""
    from accelerate.data_loader import prepare_data_loader, skip_first_batches

    train = load_training_data(data_dir, "redshift")["train"]

    def prepared(process_index: int):
        loader = build_dataloader(train, "redshift", batch_size=8, train=True, seed=5)
        return prepare_data_loader(
            loader, num_processes=num_processes, process_index=process_index, use_seedable_sampler=True
        )

    for process in range(num_processes):
        uninterrupted = prepared(process)
        epochs = []
        for epoch in range(2):
            uninterrupted.set_epoch(epoch)
            epochs.append(list(uninterrupted))
        assert len(epochs[1]) == N_TRAIN // 8 // num_processes
        assert not torch.equal(epochs[0][0]["labels"], epochs[1][0]["labels"])
        for seen in (1, 3):
            resumed = prepared(process)  # a fresh process's loader
            resumed.set_epoch(1)
            got = list(skip_first_batches(resumed, seen))
            assert len(got) == len(epochs[1]) - seen
            for mine, theirs in zip(got, epochs[1][seen:], strict=True):
                assert torch.equal(mine["labels"], theirs["labels"]) and torch.equal(
                    mine["flux"], theirs["flux"]
                )


def test_splits_are_read_in_place_without_a_datasets_cache(data_dir, tmp_path, monkeypatch):
    cache = tmp_path / "datasets_cache"
    cache.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    splits = load_training_data(data_dir, "redshift", z_range=(0.0, 4.0), max_val_spectra=20)
    for name, split in splits.items():
        assert sum(len(batch["labels"]) for batch in build_dataloader(split, "redshift", 16, name == "train"))
    assert list(cache.iterdir()) == []


def test_rows_match_pyarrow_after_the_redshift_cut_and_row_limit(data_dir):
    table = pa.concat_tables(pq.read_table(path) for path in sorted((data_dir / "train").glob("*.parquet")))
    z = table.column("z").to_numpy()  # [rows]
    columns = ("targetid", "flux", "ivar", "mask", "z", "target_class")
    split = load_split(data_dir, "train", columns)
    cut, dropped = filter_redshift_range(split, 0.0, 0.3)
    expected = np.flatnonzero((z >= 0.0) & (z <= 0.3))  # [kept] rows in file order
    assert len(split) == N_TRAIN and len(cut) == len(expected) and dropped == N_TRAIN - len(expected)
    limit = int(np.searchsorted(expected, N_TRAIN // 2)) + 3  # 3 rows into the second shard
    rows = first_rows(cut, limit)
    assert len(rows) == limit and first_rows(cut, None) is cut and first_rows(cut, 10**6) is cut
    for i, j in enumerate(expected[:limit]):
        row = rows[i]
        assert row["targetid"].item() == table.column("targetid")[j].as_py() and row["z"].item() == z[j]
        assert row["target_class"] == table.column("target_class")[j].as_py()
        assert row["flux"].dtype == row["ivar"].dtype == torch.float32 and row["mask"].dtype == torch.bool
        for name in ("flux", "ivar", "mask"):
            np.testing.assert_array_equal(row[name].numpy(), np.asarray(table.column(name)[j].as_py()))
    batch = rows[limit - 5 :]  # a slice stacks its rows
    assert torch.equal(batch["flux"], torch.stack([rows[i]["flux"] for i in range(limit - 5, limit)]))
    assert batch["z"].shape == (5,) and batch["target_class"] == ["elg"] * 5
    with pytest.raises(IndexError):
        rows[limit]


def test_list_columns_convert_through_their_flat_values():
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)  # [rows, length]
    for list_type in (pa.list_(pa.float32()), pa.large_list(pa.float32()), pa.list_(pa.float32(), 3)):
        array = pa.array(list(rows), list_type)
        values = column_array(pa.chunked_array([array]))
        np.testing.assert_array_equal(values, rows)
        # zero copy: a read-only view of the Arrow values, after a slice's offset
        assert not values.flags.writeable and values.ctypes.data == array.values.buffers()[1].address
        sliced = column_array(pa.chunked_array([array.slice(1, 2)]))
        np.testing.assert_array_equal(sliced, rows[1:3])
        assert sliced.ctypes.data == array.values.buffers()[1].address + 3 * 4
        two_chunks = column_array(pa.chunked_array([array.slice(0, 1), array.slice(1)]))
        np.testing.assert_array_equal(two_chunks, rows)
    mask = column_array(pa.chunked_array([pa.array([[True, False], [False, False]], pa.list_(pa.bool_()))]))
    assert mask.dtype == bool and mask.tolist() == [[True, False], [False, False]]
    assert column_array(pa.chunked_array([], pa.list_(pa.float32()))).shape == (0, 0)
    with pytest.raises(ValueError, match=r"list rows of different lengths \(2 to 3 values\)"):
        column_array(pa.chunked_array([pa.array([[1.0, 2.0, 3.0], [4.0, 5.0]], pa.list_(pa.float32()))]))
    with pytest.raises(ValueError, match="1 of 2 rows are null"):
        column_array(pa.chunked_array([pa.array([[1.0], None], pa.list_(pa.float32()))]))
    scalars = column_array(pa.chunked_array([pa.array([0.5, 1.5])]))
    assert scalars.tolist() == [0.5, 1.5] and scalars.dtype == np.float64


def test_shards_with_variable_length_lists_are_read(data_dir, tmp_path):
    """Shards written with `list<float>` (not fixed-size) read as the same rows; a ragged one names its file."""
    columns = ("targetid", "flux", "ivar", "mask", "z")
    copy = tmp_path / "lists"
    (copy / "train").mkdir(parents=True)
    shutil.copy(data_dir / "README.md", copy)
    for path in sorted((data_dir / "train").glob("*.parquet")):
        table = pq.read_table(path)
        schema = pa.schema(
            pa.field(f.name, pa.list_(f.type.value_type)) if pa.types.is_fixed_size_list(f.type) else f
            for f in table.schema
        )
        pq.write_table(table.cast(schema), copy / "train" / path.name, row_group_size=ROW_GROUP)
    fixed, listed = load_split(data_dir, "train", columns), load_split(copy, "train", columns)
    written = pq.read_schema(next((copy / "train").glob("*.parquet")))
    assert written.field("flux").type == pa.list_(pa.float32())
    for name, value in listed[:].items():
        assert torch.equal(value, fixed[:][name]), name

    ragged = pq.read_table(copy / "train" / "shard-00001.parquet")
    flux = ragged.column("flux").to_pylist()
    flux[ROW_GROUP + 1] = flux[ROW_GROUP + 1][:-1]  # one spectrum of row group 1 a pixel short
    ragged = ragged.set_column(
        ragged.schema.get_field_index("flux"), "flux", pa.array(flux, pa.list_(pa.float32()))
    )
    pq.write_table(ragged, copy / "train" / "shard-00001.parquet", row_group_size=ROW_GROUP)
    split = load_split(copy, "train", columns)
    num_pixels = preset_config("specpt-tiny").num_pixels
    assert split[N_TRAIN // 2]["flux"].shape == (num_pixels,)  # row group 0 reads
    with pytest.raises(
        ValueError, match=r"shard-00001\.parquet: row group 1, column 'flux': list rows of different"
    ):
        split[N_TRAIN // 2 + ROW_GROUP]


def test_unreadable_shards_and_missing_columns_name_the_file(data_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    first, second = sorted((broken / "train").glob("*.parquet"))
    with pytest.raises(ValueError, match=rf"{first}: Parquet shard lacks column\(s\) \['redshift'\]"):
        load_split(broken, "train", ("flux", "redshift"))
    with pytest.raises(ValueError, match=rf"{first}: cannot read column 'redshift'"):
        load_split(broken, "train").read_column("redshift")

    # a damaged row group behind an intact footer: the error comes with the first read of that row group
    chunk = pq.read_metadata(second).row_group(1).column(1)  # `flux` of rows 8-15
    assert chunk.path_in_schema.startswith("flux")
    data = bytearray(second.read_bytes())
    data[chunk.data_page_offset : chunk.data_page_offset + 64] = b"\xff" * 64  # its page header
    second.write_bytes(bytes(data))
    split = load_split(broken, "train")
    assert split[N_TRAIN // 2]["flux"].shape == (
        preset_config("specpt-tiny").num_pixels,
    )  # row group 0 reads
    with pytest.raises(ValueError, match=rf"{second}: row group 1 is not readable"):
        split[N_TRAIN // 2 + ROW_GROUP]

    second.write_bytes(bytes(data[: len(data) // 2]))  # a truncated copy
    with pytest.raises(ValueError, match=rf"{second}: not a readable Parquet file"):
        load_training_data(broken, "autoencoder")


# --- stage 1 ---------------------------------------------------------------------------------------------


def test_stage1_trains_saves_and_logs(stage1, data_dir):
    settings, result = stage1
    assert result.step == settings.max_steps and not result.stopped_early
    batch = fixed_batch(data_dir, "autoencoder")
    before, after = batch_loss(initial_model(settings), batch), batch_loss(result.model, batch)
    assert after < 0.7 * before, (before, after)

    folder = Path(settings.output_dir)
    assert {"config.json", "model.safetensors", SETTINGS_NAME} <= {
        p.name for p in (folder / "model").iterdir()
    }
    assert TrainingSettings.from_yaml(folder / "model" / SETTINGS_NAME) == settings
    assert [p.name for p in train_module.checkpoint_dirs(folder)] == ["step_6", "step_12"]  # limit 2 of 3

    curve = loss_curve(folder / "logs")  # (7) TensorBoard through the Accelerate tracker
    assert len(curve) == settings.max_steps // settings.logging_steps
    assert curve[-1] < curve[0]
    assert any("validation/loss" in record for record in result.history)


def test_resumed_run_ends_with_the_same_weights(stage1, data_dir, tmp_path, monkeypatch):
    settings, uninterrupted = stage1
    resumed = stage1_settings(data_dir, tmp_path / "run", report_to="none")
    real_save = train_module.save_checkpoint

    class Interrupted(Exception):
        pass

    def save_then_stop(accelerator, run_settings, step, *objects):
        real_save(accelerator, run_settings, step, *objects)
        raise Interrupted(step)  # the run dies right after its first checkpoint (step 6, mid-epoch)

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        training_function(resumed)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    assert not (tmp_path / "run" / "model").exists()

    result = training_function(TrainingSettings(**{**resumed.to_dict(), "resume": True}))
    assert result.step == settings.max_steps
    expected = load_file(uninterrupted.model_dir / "model.safetensors")
    got = load_file(result.model_dir / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    # the history survives the interruption: the uninterrupted run's records (timings aside), also on disk
    on_disk = json.loads((tmp_path / "run" / train_module.HISTORY_NAME).read_text())
    assert on_disk == result.history
    for mine, theirs in zip(result.history, uninterrupted.history, strict=True):
        assert mine.keys() == theirs.keys()
        for key in mine.keys() - {"train/spectra_per_second"}:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-7), (mine["step"], key)


def test_two_processes_give_the_same_loss_curve_shape(stage1, data_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo), each with half the batch: same global batch."""
    settings, single = stage1
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    command += [
        "--config_file",
        str(REPO / "examples/accelerate/cpu-2proc.yaml"),
        "-m",
        "specpt_hf.cli",
        "train",
    ]
    overrides = {**settings.to_dict(), "output_dir": str(out), "batch_size": 8, "checkpointing_steps": None}
    for name, value in overrides.items():
        if value is not None:
            command += [f"--{name}", str(value)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_CONFIG_FILE", None)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    hparams = yaml.safe_load(next((out / "logs").rglob("hparams.yml")).read_text())
    assert hparams["num_processes"] == 2 and hparams["batch_size"] == 8
    two = loss_curve(out / "logs")
    one = loss_curve(Path(settings.output_dir) / "logs")
    assert len(two) == len(one)
    assert two[-1] < 0.8 * two[0] and one[-1] < 0.8 * one[0]
    # Both runs see the same spectra in each global batch; only dropout draws and summation order differ.
    assert all(abs(a - b) <= 0.1 * b for a, b in zip(two, one, strict=True)), (one, two)
    assert abs(math.log((two[-1] / two[0]) / (one[-1] / one[0]))) < math.log(1.2), (one, two)
    assert (out / "model" / "model.safetensors").is_file()


def test_cli_bf16_run_in_its_own_process(data_dir, tmp_path):
    """`specpt train` end to end with bf16 autocast on the CPU (a separate process: Accelerate fixes the
    precision once per process); on a CPU without native bf16 the run falls back to float32 and says so."""
    out = tmp_path / "bf16"
    command = [
        sys.executable,
        "-m",
        "specpt_hf.cli",
        "train",
        "--config",
        str(REPO / "examples/configs/specpt-tiny-autoencoder.yaml"),
    ]
    command += ["--data-dir", str(data_dir), "--output-dir", str(out), "--mixed-precision", "bf16"]
    command += [
        "--max-steps",
        "3",
        "--max-train-spectra",
        "32",
        "--max-val-spectra",
        "16",
        "--report-to",
        "none",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"model saved to {out / 'model'}" in done.stdout
    saved = TrainingSettings.from_yaml(out / "model" / SETTINGS_NAME)
    from specpt_hf.training.train import native_cpu_bf16

    expected = "bf16" if native_cpu_bf16() else "no"
    assert (saved.mixed_precision, saved.max_steps, saved.preset) == (expected, 3, "specpt-tiny")
    assert ("without native bf16" in done.stderr) == (expected == "no")
    weights = load_file(out / "model" / "model.safetensors")
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())


# --- stage 2 ---------------------------------------------------------------------------------------------


def stage2_settings(stage1_model: Path, data_dir: Path, output_dir: Path, **overrides) -> TrainingSettings:
    values = dict(
        stage="redshift",
        preset="specpt-tiny",
        pretrained_model=str(stage1_model),
        data_dir=str(data_dir),
        output_dir=str(output_dir),
        batch_size=16,
        learning_rate=3e-3,
        warmup_steps=2,
        max_steps=12,
        eval_steps=2,
        logging_steps=2,
        report_to="none",
        seed=5,
    )
    return TrainingSettings(**{**values, **overrides})


def test_stage2_frozen_encoder_best_model_and_reload(stage1, data_dir, tmp_path):
    _, stage1_result = stage1
    settings = stage2_settings(stage1_result.model_dir, data_dir, tmp_path / "s2", freeze_encoder=True)
    result = training_function(settings)
    batch = fixed_batch(data_dir, "redshift")
    assert batch_loss(result.model, batch) < batch_loss(initial_model(settings), batch)

    # (4) the encoder is the stage-1 encoder, untouched by training (weights and BatchNorm/other buffers)
    encoder = load_file(stage1_result.model_dir / "model.safetensors")
    trained = load_file(result.model_dir / "model.safetensors")
    shared = [name for name in trained if name.startswith("specpt.")]
    assert shared and all(torch.equal(trained[name], encoder[name]) for name in shared)
    assert not all(p.requires_grad for p in result.model.specpt.parameters())

    # (5) best/ holds the weights with the lowest validation NMAD, with the settings beside them
    nmads = [(r["validation/nmad"], r["step"]) for r in result.history if "validation/nmad" in r]
    assert len(nmads) == settings.max_steps // settings.eval_steps
    assert result.best_dir is not None and (result.best_dir / SETTINGS_NAME).is_file()
    best = type(result.model).from_pretrained(result.best_dir)
    accelerator = train_module.make_accelerator(settings)
    val = load_training_data(data_dir, "redshift", z_range=(0.0, 4.0))["validation"]
    metrics = train_module.evaluate(
        best, build_dataloader(val, "redshift", 16, False), accelerator, "redshift"
    )
    assert metrics["validation/nmad"] == pytest.approx(min(nmads)[0], rel=1e-5)

    # (6) save_pretrained -> from_pretrained gives the same weights, bit for bit, and the same predictions (with the
    # attention training used) to float32 rounding: on an AMD EPYC CPU the reloaded model's logits are 1 ulp off
    # the in-memory model's, on one thread too, while a deep copy of the in-memory model gives the same bits.
    attention = result.model.config._attn_implementation
    reloaded = type(result.model).from_pretrained(result.model_dir, attn_implementation=attention).eval()
    saved = reloaded.state_dict()
    assert all(torch.equal(value, saved[name]) for name, value in result.model.state_dict().items())
    with torch.no_grad():
        expected, got = result.model.eval()(**batch), reloaded(**batch)
    for field in ("redshift", "redshift_err", "quality", "logits"):
        torch.testing.assert_close(
            getattr(got, field), getattr(expected, field), rtol=1e-5, atol=1e-6, msg=field
        )


def test_stage2_early_stopping_and_encoder_learning_rate(stage1, data_dir, tmp_path):
    _, stage1_result = stage1
    # A learning rate far below float32 resolution leaves every weight as it is: the NMAD never improves.
    settings = stage2_settings(
        stage1_result.model_dir,
        data_dir,
        tmp_path / "s2",
        learning_rate=1e-30,
        encoder_learning_rate=1e-31,
        eval_steps=1,
        early_stopping_patience=2,
        max_steps=20,
    )
    groups = parameter_groups(initial_model(settings), settings)
    assert {group["lr"] for group in groups} == {1e-30, 1e-31}
    result = training_function(settings)
    assert result.stopped_early and result.step == 3  # best at step 1, then 2 validations without improvement
    nmads = [r["validation/nmad"] for r in result.history if "validation/nmad" in r]
    assert len(nmads) == 3 and len(set(nmads)) == 1


def test_epoch_mode_validates_each_epoch_and_resume_without_checkpoint_starts_afresh(data_dir, tmp_path):
    settings = stage1_settings(
        data_dir,
        tmp_path / "fresh",
        max_steps=None,
        num_epochs=2,
        max_train_spectra=32,  # 2 steps per epoch
        eval_steps=None,
        checkpointing_steps=None,
        resume=True,
        report_to="none",
    )
    result = training_function(settings)
    assert result.step == 4 and (tmp_path / "fresh" / "model" / "model.safetensors").is_file()
    assert [r["step"] for r in result.history if "validation/loss" in r] == [2, 4]


def test_a_model_given_by_the_caller_is_trained_and_saved(data_dir, tmp_path):
    settings = stage1_settings(
        data_dir, tmp_path / "given", max_steps=4, checkpointing_steps=None, report_to="none"
    )
    set_seed(3)
    model = create_model("specpt-tiny", "autoencoder")
    assert model.config._attn_implementation == "sdpa"  # the models' default
    model.specpt.stem.requires_grad_(False)  # a partly frozen model: only the rest is optimised
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    groups = parameter_groups(model, settings)
    assert sum(len(group["params"]) for group in groups) == sum(p.requires_grad for p in model.parameters())

    result = training_function(settings, model=model)
    assert result.model is model and result.step == 4
    assert (
        model.config._attn_implementation == "eager"
    )  # CPU training: torch's sdpa has no fused dropout kernel
    assert result.train_seconds > 0 and result.spectra_per_second > 0
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed and not any(name.startswith("specpt.stem.") for name in changed)
    saved = load_file(result.model_dir / "model.safetensors")
    assert all(torch.equal(saved[name], model.state_dict()[name]) for name in saved)

    with pytest.raises(ValueError, match="trains a SpecPTForSpectrumReconstruction, got a SpecPTForRedshift"):
        training_function(settings, model=create_model("specpt-tiny", "redshift"))
    redshift = TrainingSettings(**{**settings.to_dict(), "stage": "redshift", "pretrained_model": "x"})
    with pytest.raises(ValueError, match="pretrained_model"):
        training_function(redshift, model=create_model("specpt-tiny", "redshift"))


def test_head_ablation_trains_each_variant_from_the_same_autoencoder(data_dir, stage1, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import head_ablation

    _, pretrained = stage1
    out = tmp_path / "ablation"
    argv = ["--data", str(data_dir), "--autoencoder", str(pretrained.model_dir), "--out", str(out)]
    argv += ["--preset", "specpt-tiny", "--quick", "--no-progress", "--mixed-precision", "no"]
    variants = [
        "--variant",
        "one-hot",
        "redshift_label_sigma=0",
        "--variant",
        "soft",
        "redshift_label_sigma=1.5",
    ]
    assert head_ablation.main(argv + variants) == 0

    report = json.loads((out / "ablation.json").read_text())
    assert report["variants"] == {
        "one-hot": {"redshift_label_sigma": 0},
        "soft": {"redshift_label_sigma": 1.5},
    }
    for name, sigma in (("one-hot", 0.0), ("soft", 1.5)):
        steps = [r["step"] for r in report["history"][name] if "validation/nmad" in r]
        assert steps == [3, 6]
        assert json.loads((out / name / "model" / "config.json").read_text())["redshift_label_sigma"] == sigma
    assert (out / "ablation.md").read_text().count("| soft |") == 2

    with pytest.raises(SystemExit):
        head_ablation.main(argv + ["--variant", "bad", "redshift_label_sigma"])
    with pytest.raises(SystemExit):
        head_ablation.main(argv + ["--variant", "a", "--variant", "a"])


def test_training_on_from_a_redshift_model_drops_its_type_head(tmp_path):
    from accelerate import PartialState

    from specpt_hf import create_model

    PartialState()  # the training's logging needs it, as in `training_function`
    folder = tmp_path / "typed"
    model = create_model("specpt-tiny", "redshift")
    d_model = model.config.d_model
    model.set_spectype_head(["GALAXY", "QSO"], torch.zeros(2, d_model), torch.zeros(2))
    model.save_pretrained(folder)
    settings = TrainingSettings(stage="redshift", preset="specpt-tiny", pretrained_model=str(folder))
    continued = build_model(settings)
    assert continued.spectype_head is None and continued.config.spectype_labels is None
    assert type(model).from_pretrained(folder).spectype_head is not None  # the folder itself keeps it


def test_bf16_falls_back_to_float32_only_on_a_cpu_without_native_bf16():
    from specpt_hf.training.train import native_cpu_bf16, run_precision

    assert run_precision("bf16", on_cpu=True, native_bf16=False) == "no"
    assert run_precision("bf16", on_cpu=True, native_bf16=True) == "bf16"
    assert run_precision("bf16", on_cpu=False, native_bf16=False) == "bf16"
    assert run_precision("fp16", on_cpu=False, native_bf16=False) == "fp16"
    assert run_precision("no", on_cpu=True, native_bf16=False) == "no"
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else None
    if flags is not None and "avx2" in flags:  # x86: torch's answer agrees with the CPU's flags
        assert native_cpu_bf16() == ("avx512_bf16" in flags or "amx_tile" in flags)
