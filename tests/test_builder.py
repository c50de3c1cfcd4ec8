"""The `datasets` builder on the real DESI files, the TARGETID-hash splits and the row conversion."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
from astropy.io import fits
from astropy.table import Table

from specpt_hf.data.builder import (
    SPLITS,
    DesiEdrBuilder,
    DesiSource,
    batch_to_arrow,
    collect_spectra_files,
    desi_features,
    examples_to_arrow,
    find_spectra_files,
    record_to_example,
    redrock_path_for,
    split_for_targetid,
)
from specpt_hf.data.desi import DesiFormatError, ReadStats, read_desi_spectra
from specpt_hf.data.redshifts import JoinStats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from desi_files import DATA, ELG_ID, HEALPIX, LRG_IDS, TILE, put, records_one_at_a_time  # noqa: E402


def build(tmp_path: Path, config: str = "all", **kwargs) -> DesiEdrBuilder:
    builder = DesiEdrBuilder(config_name=config, cache_dir=str(tmp_path / "cache"), **kwargs)
    builder.download_and_prepare()
    return builder


def rows_of(builder: DesiEdrBuilder) -> dict[int, dict]:
    rows = {}
    for split in builder.info.splits:
        for row in builder.as_dataset(split=split):
            rows[row["targetid"]] = {**row, "split": split}
    return rows


# ----------------------------------------------------------------------------------------- splits


def test_split_is_the_documented_hash():
    for targetid in [39627866878511337, 1, 616088619186127404, -2713437]:
        digest = hashlib.blake2b(str(targetid).encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "big") / 2**64
        expected = "train" if u < 0.8 else "validation" if u < 0.9 else "test"
        assert split_for_targetid(targetid) == expected
        assert split_for_targetid(np.int64(targetid)) == expected


def test_split_fractions():
    ids = np.arange(10**15, 10**15 + 20000)
    counts = {s: 0 for s in SPLITS}
    for targetid in ids:
        counts[split_for_targetid(targetid)] += 1
    assert abs(counts["train"] / 20000 - 0.8) < 0.015
    assert abs(counts["validation"] / 20000 - 0.1) < 0.01
    assert {split_for_targetid(t, (0.0, 0.0, 1.0)) for t in ids[:100]} == {"test"}
    for bad in [(0.5, 0.5), (0.8, 0.1, 0.2), (1.2, -0.1, -0.1)]:
        with pytest.raises(ValueError, match="fractions"):
            split_for_targetid(1, bad)


def test_split_stable_across_processes():
    ids = [39627866878511337, 39633300968442591, 42, 7, 123456789]
    code = (
        "from specpt_hf.data.builder import split_for_targetid as s;"
        f"print(','.join(s(t, (0.34, 0.33, 0.33)) for t in {ids}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().split(",") == [split_for_targetid(t, (0.34, 0.33, 0.33)) for t in ids]


# ----------------------------------------------------------------------------------------- rows


def test_features_follow_the_record_table():
    features = desi_features()
    assert list(features) == [
        "targetid", "flux", "ivar", "mask", "z", "zerr", "zwarn",
        "spectype", "target_class", "survey", "program", "healpix",
    ]  # fmt: skip
    assert features["flux"] == datasets.List(datasets.Value("float32"), length=7781)
    assert features["mask"] == datasets.List(datasets.Value("bool"), length=7781)
    assert features["zwarn"] == datasets.Value("int64") and features["targetid"] == datasets.Value("int64")
    assert "True at BAD pixels" in DesiEdrBuilder(config_name="all")._info().description


def test_record_to_arrow_round_trip():
    record = next(read_desi_spectra(DATA / HEALPIX))
    record.update(z=0.5, zerr=1e-4, zwarn=4, spectype="GALAXY", target_class="lrg")
    example = record_to_example(record)
    table = examples_to_arrow([example, example], desi_features())
    assert table.schema.equals(desi_features().arrow_schema)
    dataset = datasets.Dataset(table)
    assert dataset.features == desi_features()
    row = dataset[1]
    np.testing.assert_array_equal(np.asarray(row["flux"], dtype=np.float32), record["flux"])
    assert row["mask"] == record["mask"].tolist() and row["zwarn"] == 4 and row["survey"] == "sv3"


# ----------------------------------------------------------------------------------------- builder


def test_builder_release_layout(tmp_path):
    root = tmp_path / "fuji"
    put(HEALPIX, root / "healpix" / "sv3" / "dark" / "260" / "26065")
    put(TILE, root / "tiles" / "cumulative" / "169" / "20210419")  # outside healpix/: not read
    assert [p.name for p in find_spectra_files(root)] == [HEALPIX]
    builder = build(tmp_path, data_dir=str(root))
    rows = rows_of(builder)
    assert sorted(rows) == LRG_IDS
    records = {r["targetid"]: r for r in read_desi_spectra(DATA / HEALPIX)}
    for targetid, row in rows.items():
        assert row["split"] == split_for_targetid(targetid)
        assert len(row["flux"]) == 7781
        np.testing.assert_array_equal(np.asarray(row["flux"], dtype=np.float32), records[targetid]["flux"])
        assert row["mask"] == records[targetid]["mask"].tolist()
        assert (row["survey"], row["program"], row["healpix"]) == ("sv3", "dark", 26065)
        assert row["target_class"] == "lrg" and row["spectype"] == "GALAXY" and row["zwarn"] == 0
    assert rows[LRG_IDS[1]]["z"] == pytest.approx(0.5)  # row 4 of the file


def test_builder_configs_by_class(tmp_path):
    flat = tmp_path / "flat"
    put(HEALPIX, flat)
    put(TILE, flat)
    assert sorted(rows_of(build(tmp_path, "lrg", data_dir=str(flat)))) == LRG_IDS
    elg = rows_of(build(tmp_path, "elg", data_dir=str(flat)))
    assert list(elg) == [ELG_ID] and elg[ELG_ID]["healpix"] == -1
    assert sorted(rows_of(build(tmp_path, "all", data_dir=str(flat)))) == sorted([*LRG_IDS, ELG_ID])


def test_builder_with_catalog(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(DATA / HEALPIX, flat / HEALPIX)  # no redrock file: the catalog has the redshifts
    catalog = tmp_path / "zall-pix-edr-vac.fits"
    rows = {
        "TARGETID": np.array(LRG_IDS, dtype=np.int64),
        "SURVEY": np.array(["sv3", "sv3"]),
        "PROGRAM": np.array(["dark", "dark"]),
        "HEALPIX": np.array([26065, 26065], dtype=np.int32),
        "Z": np.array([0.71, 0.92]),
        "ZERR": np.full(2, 1e-4),
        "ZWARN": np.array([0, 4], dtype=np.int64),  # the second fails the LRG cut
        "SPECTYPE": np.array(["GALAXY", "GALAXY"]),
        "DELTACHI2": np.array([90.0, 90.0]),
        "ZCAT_PRIMARY": np.array([True, True]),
        "SV3_DESI_TARGET": np.array([1, 1], dtype=np.int64),
    }
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU(Table(rows), name="ZCATALOG")]).writeto(catalog)
    built = rows_of(build(tmp_path, "lrg", data_dir=str(flat), catalog=str(catalog)))
    assert list(built) == [LRG_IDS[0]] and built[LRG_IDS[0]]["z"] == pytest.approx(0.71)


def test_builder_missing_redrock(tmp_path):
    flat = tmp_path / "flat"
    put(HEALPIX, flat)
    redrock_path_for(flat / HEALPIX).unlink()
    with pytest.raises(DesiFormatError, match=r"redrock-sv3-dark-26065\.fits: no Redrock file"):
        build(tmp_path, data_dir=str(flat))


def test_builder_targetid_mismatch(tmp_path):
    flat = tmp_path / "flat"
    put(HEALPIX, flat, targetid_offset=1)  # the Redrock file describes other targets
    # errors raised while examples are generated reach the caller wrapped by `datasets`
    with pytest.raises(datasets.exceptions.DatasetGenerationError) as info:
        build(tmp_path, data_dir=str(flat))
    assert isinstance(info.value.__cause__, DesiFormatError)
    assert "redrock-sv3-dark-26065.fits: TARGETID mismatch" in str(info.value.__cause__)


def test_builder_bad_file_fails_early_or_is_skipped(tmp_path):
    flat = tmp_path / "flat"
    put(HEALPIX, flat)
    bad = put(TILE, flat)
    bad.write_bytes(bad.read_bytes()[:500_000])
    with pytest.raises(
        DesiFormatError, match=r"(?s)1 bad input file.*coadd-5-169-thru20210419\.fits.*truncated"
    ):
        build(tmp_path, data_dir=str(flat))
    rows = rows_of(build(tmp_path, data_dir=str(flat), skip_bad_files=True))
    assert sorted(rows) == LRG_IDS


def test_builder_needs_data(tmp_path):
    with pytest.raises(ValueError, match="data_dir"):
        build(tmp_path)


# ----------------------------------------------------------------------------------------- batches


def _catalog(path: Path, ids: list[int]) -> Path:
    n = len(ids)
    rows = {
        "TARGETID": np.array(ids, dtype=np.int64),
        "SURVEY": np.array(["sv3"] * n),
        "PROGRAM": np.array(["dark"] * n),
        "Z": np.linspace(0.3, 0.9, n),
        "ZERR": np.full(n, 1e-4),
        "ZWARN": np.array([0, 4, 0][:n], dtype=np.int64),
        "SPECTYPE": np.array(["GALAXY"] * n),
        "DELTACHI2": np.full(n, 90.0),
    }
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU(Table(rows), name="ZCATALOG")]).writeto(path)
    return path


@pytest.mark.parametrize("target_class", ["all", "lrg", "elg"])
@pytest.mark.parametrize("with_catalog", [False, True], ids=["redrock", "catalog"])
def test_batches_hold_the_records_rows(tmp_path, target_class, with_catalog):
    flat = tmp_path / "flat"
    put(HEALPIX, flat)
    put(TILE, flat)
    catalog = _catalog(tmp_path / "zpix-sv3-dark.fits", [*LRG_IDS, ELG_ID]) if with_catalog else None
    files = collect_spectra_files([flat])
    source = DesiSource(files=files, catalog=catalog, target_class=target_class, chunk_size=2)
    stats = [ReadStats(), JoinStats(), ReadStats(), JoinStats()]
    examples = [record_to_example(r) for r in records_one_at_a_time(source, stats[0], stats[1])]
    batches = list(source.batches(read_stats=stats[2], join_stats=stats[3]))
    assert stats[0] == stats[2] and stats[1] == stats[3]
    assert examples and sum(len(b["targetid"]) for b in batches) == len(examples)
    features = desi_features()
    expected = examples_to_arrow(examples, features)
    got = pa.concat_tables([batch_to_arrow(b, features) for b in batches])
    assert got.equals(expected)
    # chunk_size=2: a file's spectra come in batches of at most two rows of that file
    assert all(len(set(b["healpix"])) == 1 and len(b["targetid"]) <= 2 for b in batches)


def test_batch_to_arrow_equals_examples_to_arrow():
    rng = np.random.default_rng(5)
    features = desi_features(n_pixels=13)  # not a multiple of 8: the bit-packed masks must line up
    batch = {
        "targetid": np.arange(5, dtype=np.int64),
        "flux": rng.normal(size=(5, 13)).astype(np.float32),
        "ivar": rng.random((5, 13)).astype(np.float64),  # converted to float32
        "mask": rng.random((5, 13)) < 0.3,
        "z": rng.random(5),
        "zerr": rng.random(5),
        "zwarn": np.array([0, 4, 0, 1, 0]),
        "spectype": np.array(["GALAXY", "QSO", "STAR", "GALAXY", "QSO"]),
        "target_class": np.array(["bgs", "elg", "lrg", "qso", "other"]),
        "survey": np.array(["sv3"] * 5),
        "program": np.array(["dark"] * 5),
        "healpix": np.full(5, 26065),
    }
    examples = [{name: values[i] for name, values in batch.items()} for i in range(5)]
    expected = examples_to_arrow([record_to_example(e) for e in examples], features)
    got = batch_to_arrow(batch, features)
    assert got.equals(expected) and got.schema.equals(features.arrow_schema)
    assert got.column("mask").to_pylist() == batch["mask"].tolist()
    assert batch_to_arrow(batch, features.arrow_schema).equals(got)
    with pytest.raises(ValueError, match="flux: every row needs 13 values"):
        batch_to_arrow({**batch, "flux": batch["flux"][:, :12]}, features)
