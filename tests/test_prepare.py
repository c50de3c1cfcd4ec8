"""`specpt prepare`: Parquet shards and dataset card from the real DESI files, read back with `datasets`."""

from __future__ import annotations

import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import DatasetCard

from specpt_hf.data.builder import (
    DesiSource,
    collect_spectra_files,
    desi_features,
    examples_to_arrow,
    record_to_example,
    split_for_targetid,
)
from specpt_hf.data.desi import DesiFormatError, read_desi_spectra
from specpt_hf.data.prepare import ShardWriter, main, prepare_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from desi_files import ELG_ID, HEALPIX, LRG_IDS, TILE, put, records_one_at_a_time  # noqa: E402


@pytest.fixture
def flat(tmp_path) -> Path:
    folder = tmp_path / "in"
    put(HEALPIX, folder)
    put(TILE, folder)
    return folder


def parquet_files(out: Path) -> list[Path]:
    return sorted(out.rglob("*.parquet"))


def test_prepare_writes_shards_and_card(flat, tmp_path):
    out = tmp_path / "out"
    summary = prepare_dataset([flat], out, progress=False)
    assert summary.total_rows == 3 and summary.files == 2
    assert summary.read_stats.fibers == 10 and summary.join_stats.joined == 3
    for targetid in [*LRG_IDS, ELG_ID]:
        split = split_for_targetid(targetid)
        table = pq.read_table(out / split / "part-00000.parquet")
        assert targetid in table.column("targetid").to_pylist()
    assert not list(out.rglob("*.tmp"))
    card = DatasetCard.load(out / "README.md")
    assert card.data.license == "cc-by-4.0"
    config = card.data.configs[0]
    assert config["config_name"] == "all" and config["default"] is True
    assert {f["split"] for f in config["data_files"]} == {s for s, n in summary.rows.items() if n}
    features = datasets.Features._from_yaml_list(card.data.dataset_info["features"])
    assert features == desi_features()
    assert "True = bad pixel" in card.text and "3600.0 + 0.8 * i" in card.text


def test_read_back_with_load_dataset(flat, tmp_path):
    out = tmp_path / "out"
    prepare_dataset([flat], out, progress=False)
    records = {r["targetid"]: r for r in read_desi_spectra(flat / HEALPIX)}
    # the folder as a Hub dataset: the card's YAML decides configs, splits and features
    dataset = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    assert set(dataset) <= {"train", "validation", "test"}
    rows = {row["targetid"]: row for split in dataset.values() for row in split}
    assert sorted(rows) == sorted([*LRG_IDS, ELG_ID])
    for targetid in LRG_IDS:
        np.testing.assert_array_equal(
            np.asarray(rows[targetid]["flux"], np.float32), records[targetid]["flux"]
        )
        np.testing.assert_array_equal(
            np.asarray(rows[targetid]["ivar"], np.float32), records[targetid]["ivar"]
        )
        assert rows[targetid]["mask"] == records[targetid]["mask"].tolist()
        assert rows[targetid]["target_class"] == "lrg" and rows[targetid]["healpix"] == 26065
    assert rows[ELG_ID]["target_class"] == "elg" and rows[ELG_ID]["z"] == pytest.approx(0.5)
    # plain parquet, map-style and streaming
    files = {split: str(out / split / "*.parquet") for split in dataset}
    plain = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "cache2"))
    assert plain[next(iter(files))].features == desi_features()
    streamed = datasets.load_dataset("parquet", data_files=files, streaming=True)
    seen = {row["targetid"]: row for split in files for row in streamed[split]}
    assert sorted(seen) == sorted(rows)
    assert len(seen[LRG_IDS[0]]["flux"]) == 7781 and seen[LRG_IDS[0]]["zwarn"] == 0


def test_shard_size_and_overwrite(flat, tmp_path):
    out = tmp_path / "out"
    summary = prepare_dataset([flat], out, shard_size=1, fractions=(1.0, 0.0, 0.0), progress=False)
    assert [p.name for p in parquet_files(out)] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert summary.rows == {"train": 3, "validation": 0, "test": 0}
    assert [pq.read_metadata(p).num_rows for p in parquet_files(out)] == [1, 1, 1]
    with pytest.raises(FileExistsError, match="already holds 3 Parquet shards"):
        prepare_dataset([flat], out, progress=False)
    prepare_dataset([flat], out, shard_size=10, fractions=(1.0, 0.0, 0.0), overwrite=True, progress=False)
    assert [p.name for p in parquet_files(out)] == ["part-00000.parquet"]


def test_bad_file_stops_before_writing(flat, tmp_path, caplog):
    bad = flat / TILE
    bad.write_bytes(bad.read_bytes()[:400_000])
    out = tmp_path / "out"
    with pytest.raises(DesiFormatError, match=r"(?s)coadd-5-169-thru20210419\.fits.*truncated"):
        prepare_dataset([flat], out, progress=False)
    assert not parquet_files(out) and not (out / "README.md").exists()
    with caplog.at_level(logging.WARNING):
        summary = prepare_dataset([flat], out, skip_bad_files=True, progress=False)
    assert summary.files == 1 and summary.total_rows == 2
    assert "skipping bad file" in caplog.text


def test_missing_redrock_and_no_rows(tmp_path):
    folder = tmp_path / "in"
    put(HEALPIX, folder)
    (folder / HEALPIX.replace("coadd-", "redrock-")).unlink()
    with pytest.raises(DesiFormatError, match=r"redrock-sv3-dark-26065\.fits: no Redrock file"):
        prepare_dataset([folder], tmp_path / "out", progress=False)
    put(HEALPIX, tmp_path / "in2")
    with pytest.raises(ValueError, match="no spectrum passed the selection"):
        prepare_dataset([tmp_path / "in2"], tmp_path / "out", target_class="bgs", progress=False)
    with pytest.raises(FileNotFoundError, match="nowhere: no such file or folder"):
        prepare_dataset([tmp_path / "nowhere"], tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no coadd-\*\.fits files found in .*empty"):
        prepare_dataset([tmp_path / "empty"], tmp_path / "out", progress=False)


def test_cli(flat, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [str(flat / HEALPIX), str(flat / TILE), "--out", str(out), "--target-class", "lrg", "--no-progress"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "2 spectra from 2 files" in printed and "'other_class': 1" in printed
    rows = [r for p in parquet_files(out) for r in pq.read_table(p).to_pylist()]
    assert sorted(r["targetid"] for r in rows) == LRG_IDS
    assert DatasetCard.load(out / "README.md").data.configs[0]["config_name"] == "lrg"
    with pytest.raises(SystemExit):
        main(["--out", str(out)])  # no inputs


def _examples(n: int, n_pixels: int = 11) -> list[dict]:
    rng = np.random.default_rng(n)
    return [
        {
            "targetid": 100 + i,
            "flux": rng.normal(size=n_pixels).astype(np.float32),
            "ivar": rng.random(n_pixels).astype(np.float32),
            "mask": rng.random(n_pixels) < 0.3,
            "z": 0.1 * i,
            "zerr": 1e-4,
            "zwarn": i % 3,
            "spectype": "GALAXY",
            "target_class": "elg",
            "survey": "sv3",
            "program": "dark",
            "healpix": 26065,
        }
        for i in range(n)
    ]


def _columns(examples: list[dict]) -> dict:
    return {name: np.array([e[name] for e in examples]) for name in examples[0]}


@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "thread"])
def test_rows_and_batches_make_the_same_shards(tmp_path, threaded):
    features = desi_features(n_pixels=11)
    examples = _examples(23)
    layouts = {}
    with ThreadPoolExecutor(max_workers=2) as executor:
        for how in ("rows", "batches", "mixed"):
            writer = ShardWriter(tmp_path / how, features, 10, 4, "snappy", executor if threaded else None)
            if how == "rows":
                for example in examples:
                    writer.add(example)
            elif how == "batches":
                for start in (0, 3, 4, 13):  # batches of 3, 1, 9 and 10 rows
                    stop = {0: 3, 3: 4, 4: 13, 13: 23}[start]
                    writer.add_batch(_columns(examples[start:stop]))
            else:
                writer.add(examples[0])
                writer.add_batch(_columns(examples[1:6]))
                for example in examples[6:9]:
                    writer.add(example)
                writer.add_batch(_columns(examples[9:]))
            writer.close()
            shards = sorted((tmp_path / how).glob("*.parquet"))
            assert writer.rows == 23 and [p.name for p in shards] == [p.name for p in writer.shards]
            layouts[how] = [
                (
                    pq.read_table(p),
                    [
                        pq.read_metadata(p).row_group(i).num_rows
                        for i in range(pq.read_metadata(p).num_row_groups)
                    ],
                )
                for p in shards
            ]
    expected = examples_to_arrow(examples, features)
    assert [len(t) for t, _ in layouts["rows"]] == [10, 10, 3]
    assert all(max(groups) <= 4 for _, groups in layouts["rows"])
    for how in ("batches", "mixed"):
        assert [groups for _, groups in layouts[how]] == [groups for _, groups in layouts["rows"]]
        for (ours, _), (theirs, _) in zip(layouts[how], layouts["rows"], strict=True):
            assert ours.equals(theirs)
    assert pa.concat_tables([t for t, _ in layouts["batches"]]).equals(expected)


def test_prepared_rows_are_the_records_rows(flat, tmp_path):
    """The batch path writes, split by split and in order, what the one-record-at-a-time path makes."""
    out = tmp_path / "out"
    summary = prepare_dataset([flat], out, fractions=(0.4, 0.3, 0.3), cuts=None, progress=False)
    source = DesiSource(files=collect_spectra_files([flat]))
    examples = [record_to_example(r) for r in records_one_at_a_time(source)]
    assert summary.total_rows == len(examples) == 3
    features = desi_features()
    for split in ("train", "validation", "test"):
        mine = [e for e in examples if split_for_targetid(e["targetid"], (0.4, 0.3, 0.3)) == split]
        shards = sorted((out / split).glob("*.parquet"))
        assert summary.rows[split] == len(mine)
        if mine:
            assert pa.concat_tables([pq.read_table(p) for p in shards]).equals(
                examples_to_arrow(mine, features)
            )
        else:
            assert not shards
