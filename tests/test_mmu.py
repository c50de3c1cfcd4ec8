"""Multimodal Universe input: fixture files in MMU's DESI layout (HDF5 shards, Parquet export) read, prepared and
predicted like the DESI coadds they were made from."""

from __future__ import annotations

import sys

import h5py
import numpy as np
import pytest
import torch
from astropy.io import fits

from specpt_hf.data.mmu import (
    MMU_BAD_ZWARN,
    coadd_mmu_columns,
    is_mmu_file,
    read_mmu_chunks,
    read_mmu_spectra,
    write_mmu_hdf5,
    write_mmu_parquet,
)
from specpt_hf.data.mock import write_mock_healpix
from specpt_hf.data.prepare import prepare_dataset
from specpt_hf.data.redshifts import QualityCuts
from specpt_hf.training.data import load_split

N_PIXELS = 7781
FLOAT_FIELDS = ("Z", "ZERR", "EBV", "FLUX_G", "FLUX_R", "FLUX_Z")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmu")
    files = [
        write_mock_healpix(root / "desi", cls, 8, seed=i, healpix=27000 + i)
        for i, cls in enumerate(("elg", "bgs"))
    ]
    columns = [coadd_mmu_columns(coadd, redrock) for coadd, redrock in files]
    for (coadd, _), cols in zip(files, columns, strict=True):
        healpix = coadd.stem.split("-")[-1]
        write_mmu_hdf5(root / "mmu" / "edr_sv3" / f"healpix={healpix}" / "001-of-001.hdf5", cols)
        write_mmu_parquet(root / "export" / f"{healpix}.parquet", cols)
    return root, files, columns


def test_hdf5_and_parquet_read_as_the_coadds(release):
    root, files, columns = release
    hdf5 = sorted((root / "mmu").rglob("*.hdf5"))[0]
    parquet = sorted((root / "export").glob("*.parquet"))[0]
    assert is_mmu_file(hdf5) and is_mmu_file(parquet) and not is_mmu_file(files[0][0])
    for path in (hdf5, parquet):
        (chunk,) = read_mmu_chunks(path)
        expected = columns[0]
        assert chunk["targetid"].tolist() == [int(t) for t in expected["object_id"]]
        np.testing.assert_array_equal(chunk["flux"], expected["flux"])
        np.testing.assert_array_equal(chunk["mask"], expected["mask"])
        np.testing.assert_allclose(chunk["z"], expected["Z"], rtol=1e-6)  # the export keeps float32
        assert chunk["zwarn"].tolist() == np.where(expected["ZWARN"], 0, MMU_BAD_ZWARN).tolist()
        assert set(chunk["healpix"]) == ({27000} if path == hdf5 else {-1})
    records = list(read_mmu_spectra(hdf5, chunk_size=3))
    assert [r["row"] for r in records] == list(range(len(columns[0]["object_id"])))


def test_mmu_to_shards_equals_the_coadd_path(release, tmp_path):
    root, _, _ = release
    cuts = QualityCuts(enabled=False)
    prepare_dataset(
        [root / "desi"], tmp_path / "desi", cuts=cuts, fractions=(0.5, 0.25, 0.25), progress=False
    )
    prepare_dataset([root / "mmu"], tmp_path / "mmu", cuts=cuts, fractions=(0.5, 0.25, 0.25), progress=False)
    for split in ("train", "validation", "test"):
        batches = []
        for name in ("desi", "mmu"):
            data = load_split(tmp_path / name, split, columns=("targetid", "flux", "ivar", "mask", "z"))[:]
            order = torch.argsort(data["targetid"])
            batches.append({key: value[order] for key, value in data.items()})
        desi, mmu = batches
        assert len(desi["targetid"]) and torch.equal(desi["targetid"], mmu["targetid"])
        for key in ("flux", "ivar", "mask", "z"):
            torch.testing.assert_close(mmu[key], desi[key], rtol=0, atol=0)


def test_zwarn_cut_and_bad_files(release, tmp_path, monkeypatch):
    root, _, columns = release
    summary = prepare_dataset([root / "export"], tmp_path / "cut", progress=False)
    assert summary.total_rows == sum(int(c["ZWARN"].sum()) for c in columns)  # ZWARN False (not good) dropped
    broken = tmp_path / "broken.hdf5"
    with h5py.File(broken, "w") as handle:
        handle.create_dataset("object_id", data=np.array([b"1"]))
    with pytest.raises(ValueError, match=r"broken\.hdf5.*not an MMU DESI shard"):
        list(read_mmu_chunks(broken))
    monkeypatch.setitem(sys.modules, "h5py", None)  # h5py not installed
    with pytest.raises(ValueError, match=r"needs h5py: pip install"):
        list(read_mmu_chunks(sorted((root / "mmu").rglob("*.hdf5"))[0]))
    monkeypatch.undo()
    short = {**columns[0], "lambda": columns[0]["lambda"][:, :-1], "flux": columns[0]["flux"][:, :-1]}
    write_mmu_hdf5(tmp_path / "short.hdf5", short)
    with pytest.raises(ValueError, match=r"short\.hdf5.*7781"):
        list(read_mmu_chunks(tmp_path / "short.hdf5"))


def test_predict_reads_mmu_files(release, tmp_path):
    from specpt_hf import create_model
    from specpt_hf.predict import predict_catalog

    root, files, _ = release
    torch.manual_seed(0)
    create_model("specpt-tiny", "redshift").save_pretrained(tmp_path / "model")
    predict_catalog([files[0][0]], tmp_path / "desi.fits", tmp_path / "model", progress=False)
    predict_catalog(
        [root / "mmu" / "edr_sv3" / "healpix=27000"],
        tmp_path / "mmu.fits",
        tmp_path / "model",
        progress=False,
    )
    desi, mmu = (fits.getdata(tmp_path / f"{name}.fits", "REDSHIFTS") for name in ("desi", "mmu"))
    assert desi["TARGETID"].tolist() == mmu["TARGETID"].tolist()
    np.testing.assert_array_equal(desi["Z"], mmu["Z"])
    assert set(mmu["HEALPIX"]) == {27000}


def test_pipeline_reads_an_mmu_file(release):
    from specpt_hf import create_model, load_pipeline

    root, files, _ = release
    torch.manual_seed(0)
    pipe = load_pipeline(create_model("specpt-tiny", "redshift").eval())
    from_mmu = pipe(str(sorted((root / "export").glob("*.parquet"))[0]))
    from_coadd = pipe(str(files[0][0]))
    assert [r["targetid"] for r in from_mmu] == [r["targetid"] for r in from_coadd]
    assert [r["z"] for r in from_mmu] == [r["z"] for r in from_coadd]


def test_datasets_builder_reads_mmu_files_like_prepare(release, tmp_path):
    from specpt_hf.data.builder import DesiEdrBuilder

    root, _, _ = release
    cuts = QualityCuts(enabled=False)
    builder = DesiEdrBuilder(
        config_name="all", data_dir=str(root / "mmu"), quality_cuts=cuts, cache_dir=str(tmp_path / "cache")
    )
    builder.download_and_prepare()
    prepare_dataset([root / "mmu"], tmp_path / "prepared", cuts=cuts, progress=False)
    for split in builder.info.splits:
        built = builder.as_dataset(split=split).with_format("torch")[:]
        prepared = load_split(tmp_path / "prepared", split, columns=("targetid", "flux", "z"))[:]
        order = torch.argsort(built["targetid"]), torch.argsort(prepared["targetid"])
        assert torch.equal(built["targetid"][order[0]], prepared["targetid"][order[1]])
        torch.testing.assert_close(built["flux"][order[0]], prepared["flux"][order[1]], rtol=0, atol=0)
