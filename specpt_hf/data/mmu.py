"""Multimodal Universe (MMU) DESI spectra: the HDF5 shards of `MultimodalUniverse/desi` and their Parquet exports.

Layout (`scripts/desi/desi.py` of MultimodalUniverse): shards `<config>/healpix=<N>/*.hdf5` (configs `edr_sv3`,
`dr1_main`) holding per target `spectrum_flux`, `spectrum_ivar`, `spectrum_mask`, `spectrum_lambda`,
`spectrum_lsf_sigma` (7781 pixels, 3600-9824 A by 0.8 A: DESI's coadd grid), the catalogue fields `Z`, `ZERR`,
`ZWARN`, `EBV`, fluxes, and `object_id` (the TARGETID as a string). The Parquet exports (`load_dataset(
"MultimodalUniverse/desi")`, `Dataset.to_parquet`) hold the same as a `spectrum` struct of `flux`, `ivar`,
`lsf_sigma`, `lambda`, `mask` plus the scalar columns. Field names are matched without regard to case.

Pitfalls, handled here:
- `ZWARN` in the exports is `not bool(ZWARN)`: True means GOOD. A boolean ZWARN becomes `zwarn` 0 (good) or
  `MMU_BAD_ZWARN` (-1: some bit was set, which one is lost); an integer ZWARN (raw HDF5 shards) is DESI's mask.
- `mask` is already `(mask > 0) | (ivar < 1e-6)`, True = bad, the convention of this package's shards.
- There is no TARGETID column (it is `object_id`, a string) and no SPECTYPE: records get `spectype` "" and
  `target_class` "" (unknown; the DESI targeting bits are not in MMU).

`read_mmu_chunks(path)` yields column batches like `read_desi_chunks` gives for coadds; `prepare_dataset` and
`specpt predict` take MMU files (`*.hdf5`, `*.h5`, or Parquet with a `spectrum` column) wherever they take coadds.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import atomic_write
from .desi import DesiFormatError, desi_brz_wavelength

logger = logging.getLogger(__name__)

HDF5_SUFFIXES = (".hdf5", ".h5")
MMU_BAD_ZWARN = -1  # a boolean ZWARN False (not good): DESI's bits are not kept by MMU
SPECTRUM_FIELDS = ("flux", "ivar", "mask", "lambda")
_HEALPIX_FOLDER = re.compile(r"healpix=(\d+)")


def is_mmu_file(path: str | os.PathLike) -> bool:
    """An MMU HDF5 shard (by suffix) or a Parquet file whose schema has a `spectrum` struct."""
    path = Path(path)
    if path.suffix.lower() in HDF5_SUFFIXES:
        return True
    if path.suffix.lower() != ".parquet":
        return False
    try:
        return "spectrum" in pq.read_schema(path).names
    except (OSError, ValueError):
        return False


def _healpix(path: Path) -> int:
    match = _HEALPIX_FOLDER.search(str(path.parent))
    return int(match.group(1)) if match else -1


def _scalars(get: Any, names: list[str], path: Path, rows: slice) -> dict[str, np.ndarray]:
    """targetid, z, zerr, zwarn of `rows`, from a case-insensitive field lookup `get(name)`."""
    lower = {name.lower(): name for name in names}

    def field(name: str, required: bool = True) -> np.ndarray | None:
        if name not in lower:
            if required:
                raise DesiFormatError(path, f"no {name!r} field (has {sorted(names)})")
            return None
        return np.asarray(get(lower[name], rows))

    object_id = field("object_id")
    try:
        targetid = np.array(
            [int(value.decode() if isinstance(value, bytes) else value) for value in object_id]
        )
    except ValueError as err:
        raise DesiFormatError(path, f"object_id is not a TARGETID ({err})") from None
    n = len(targetid)
    zwarn = field("zwarn", required=False)
    if zwarn is None:
        zwarn = np.zeros(n, np.int64)
    elif zwarn.dtype == bool:
        zwarn = np.where(zwarn, 0, MMU_BAD_ZWARN).astype(np.int64)  # MMU: True = good
    z, zerr = field("z", required=False), field("zerr", required=False)
    return {
        "targetid": targetid.astype(np.int64),
        "z": np.full(n, np.nan) if z is None else z.astype(np.float64),
        "zerr": np.full(n, np.nan) if zerr is None else zerr.astype(np.float64),
        "zwarn": zwarn.astype(np.int64),
    }


def _spectra(flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray, wave: np.ndarray, path: Path) -> dict:
    """flux, ivar, mask (True = bad) on DESI's grid, checked; non-finite values become 0 and bad pixels, as in
    `read_desi_spectra`, and so do pixels with ivar <= 0."""
    grid = desi_brz_wavelength()
    if flux.shape[1:] != grid.shape or wave.shape[-1] != grid.size:
        raise DesiFormatError(path, f"spectra of {flux.shape[-1]} pixels; MMU DESI spectra have {grid.size}")
    if not np.allclose(wave.reshape(-1, grid.size)[0], grid, rtol=0, atol=0.01):
        raise DesiFormatError(path, "spectrum lambda is not DESI's coadd grid (3600-9824 A by 0.8 A)")
    broken = ~np.isfinite(flux) | ~np.isfinite(ivar)  # [n, pixels]
    return {
        "flux": np.where(broken, 0.0, flux).astype(np.float32),
        "ivar": np.where(broken, 0.0, ivar).astype(np.float32),
        "mask": mask.astype(bool) | broken | ~(ivar > 0),
    }


def _hdf5_chunks(path: Path, chunk_size: int) -> Iterator[dict[str, np.ndarray]]:
    try:
        import h5py
    except ImportError:
        raise DesiFormatError(
            path, "reading MMU HDF5 shards needs h5py: pip install 'specpt-hf[mmu]'"
        ) from None

    with h5py.File(path, "r") as data:
        names = list(data.keys())
        missing = [f"spectrum_{f}" for f in SPECTRUM_FIELDS if f"spectrum_{f}" not in data]
        if missing:
            raise DesiFormatError(path, f"no {missing} datasets: not an MMU DESI shard")
        n = len(data["object_id"]) if "object_id" in data else 0
        for start in range(0, n, chunk_size):
            rows = slice(start, min(start + chunk_size, n))
            columns = _scalars(lambda name, r: data[name][r], names, path, rows)
            spectra = [data[f"spectrum_{f}"][rows] for f in SPECTRUM_FIELDS]
            yield {**columns, **_spectra(*spectra, path)}


def _parquet_chunks(path: Path, chunk_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Only the columns used are decoded (not `lsf_sigma`, the photometry); `lambda` from the first row only."""
    handle = pq.ParquetFile(path)
    names = handle.schema_arrow.names
    spectrum_type = handle.schema_arrow.field("spectrum").type
    if not pa.types.is_struct(spectrum_type):
        raise DesiFormatError(
            path, f"the spectrum column is {spectrum_type}, not MMU's struct of {SPECTRUM_FIELDS}"
        )
    missing = [f for f in SPECTRUM_FIELDS if spectrum_type.get_field_index(f) < 0]
    if missing:
        raise DesiFormatError(path, f"the spectrum struct has no {missing} field(s)")
    scalars = [name for name in names if name.lower() in ("object_id", "z", "zerr", "zwarn")]
    columns = [f"spectrum.{f}" for f in ("flux", "ivar", "mask")] + scalars
    first = next(handle.iter_batches(batch_size=1, columns=["spectrum.lambda"])).column("spectrum")  # 1 row
    wave = np.asarray(first.field("lambda")[0].values.to_numpy(zero_copy_only=False))
    for batch in handle.iter_batches(batch_size=chunk_size, columns=columns):
        yield _parquet_batch(batch, names, path, wave)


def _parquet_batch(batch: Any, names: list[str], path: Path, wave: np.ndarray) -> dict[str, np.ndarray]:
    """One Arrow record batch of an MMU Parquet export (spectrum.flux/ivar/mask + scalars) -> columns."""
    columns = _scalars(
        lambda name, _: batch.column(name).to_numpy(zero_copy_only=False), names, path, slice(None)
    )
    spectrum = batch.column("spectrum")
    spectra = []
    for field in ("flux", "ivar", "mask"):
        values = spectrum.field(field)  # list<...> [rows]
        flat = np.asarray(values.flatten().to_numpy(zero_copy_only=False))
        spectra.append(flat.reshape(len(values), -1))  # [rows, pixels]
    return {**columns, **_spectra(*spectra, wave, path)}


def read_mmu_chunks(path: str | os.PathLike, chunk_size: int = 256) -> Iterator[dict[str, np.ndarray]]:
    """Column batches of one MMU file: targetid, z, zerr, zwarn [n] and flux, ivar, mask [n, 7781], plus the file's
    `healpix` (from its `healpix=N` folder, else -1) and `source` (file name). DesiFormatError names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    chunks = (
        _hdf5_chunks(path, chunk_size)
        if path.suffix.lower() in HDF5_SUFFIXES
        else _parquet_chunks(path, chunk_size)
    )
    for chunk in chunks:
        n = len(chunk["targetid"])
        chunk.update(healpix=np.full(n, _healpix(path), np.int64), source=path.name)
        yield chunk


def read_mmu_spectra(path: str | os.PathLike, chunk_size: int = 256) -> Iterator[dict[str, Any]]:
    """One record per target of an MMU file, with the keys of `read_desi_spectra` (survey and program "") and
    the labels `z`, `zerr`, `zwarn` (see the module docstring)."""
    offset = 0
    for chunk in read_mmu_chunks(path, chunk_size):
        for i in range(len(chunk["targetid"])):
            yield {
                "targetid": int(chunk["targetid"][i]),
                "flux": chunk["flux"][i],
                "ivar": chunk["ivar"][i],
                "mask": chunk["mask"][i],
                "z": float(chunk["z"][i]),
                "zerr": float(chunk["zerr"][i]),
                "zwarn": int(chunk["zwarn"][i]),
                "survey": "",
                "program": "",
                "healpix": int(chunk["healpix"][i]),
                "source": chunk["source"],
                "row": offset + i,
            }
        offset += len(chunk["targetid"])


def mmu_labelled_columns(
    path: str | os.PathLike, cuts: Any = None, chunk_size: int = 256, stats: Any = None
) -> Iterator[dict[str, np.ndarray]]:
    """Dataset columns (`desi_features`) of one MMU file's labelled spectra, a chunk at a time.

    Kept: TARGETID > 0, a finite Z, a usable pixel, and with `cuts.enabled` (a `QualityCuts`) a good ZWARN;
    TARGETIDs on two rows of the file get no label (reported). Counts go to `stats` (a `JoinStats`).
    """
    from .redshifts import JoinStats, QualityCuts

    cuts, stats = cuts or QualityCuts(), stats if stats is not None else JoinStats()
    chunks = list(read_mmu_chunks(path, chunk_size))
    if not chunks:
        return
    _, inverse, counts = np.unique(
        np.concatenate([c["targetid"] for c in chunks]), return_inverse=True, return_counts=True
    )
    shared = np.split(counts[inverse] > 1, np.cumsum([len(c["targetid"]) for c in chunks])[:-1])
    if n_shared := int(sum(s.sum() for s in shared)):
        logger.warning(
            "%s: %d spectra share their TARGETID with another spectrum of the file: not labelled",
            Path(path).name,
            n_shared,
        )
    for chunk, duplicated in zip(chunks, shared, strict=True):
        good = (chunk["targetid"] > 0) & np.isfinite(chunk["z"]) & ~duplicated
        good &= ~chunk["mask"].all(axis=1)  # at least one usable pixel
        if cuts.enabled:
            good &= chunk["zwarn"] == 0
        stats.spectra += len(good)
        stats.duplicate_targetid += int(duplicated.sum())
        stats.failed_cuts += int((~good & ~duplicated).sum())
        stats.joined += int(good.sum())
        keep, n = np.flatnonzero(good), int(good.sum())
        if n:
            keys = ("targetid", "flux", "ivar", "mask", "z", "zerr", "zwarn", "healpix")
            yield {
                **{key: chunk[key][keep] for key in keys},
                **{key: np.full(n, "") for key in ("spectype", "target_class", "survey", "program")},
            }


def find_mmu_files(inputs: list[str | os.PathLike]) -> list[Path]:
    """The MMU files among `inputs` (files, or folders searched recursively), sorted within each folder."""
    found: list[Path] = []
    for item in map(Path, inputs):
        candidates = [item] if item.is_file() else sorted(p for p in item.rglob("*") if p.is_file())
        found += [p for p in candidates if is_mmu_file(p)]
    return found


# ------------------------------------------------------------------------------------------------ writing


def coadd_mmu_columns(coadd: str | os.PathLike, redrock: str | os.PathLike) -> dict[str, np.ndarray]:
    """What MMU's `build_parent_sample` keeps of a coadd: its good fibres' brz spectra (mask folded with
    ivar < 1e-6), `object_id` strings, Z, ZERR, `ZWARN` as `not bool(ZWARN)`; for tests and benchmarks."""
    from .desi import read_desi_spectra
    from .redshifts import read_redrock

    records = list(read_desi_spectra(coadd))
    labels = read_redrock(redrock)
    rows = labels.find_many(np.array([r["targetid"] for r in records], dtype=np.int64), "", "")
    ivar = np.stack([r["ivar"] for r in records])
    n = len(records)
    return {
        "object_id": np.array([str(r["targetid"]) for r in records]),
        "flux": np.stack([r["flux"] for r in records]),
        "ivar": ivar,
        "mask": np.stack([r["mask"] for r in records]) | (ivar < 1e-6),
        "lambda": np.tile(desi_brz_wavelength().astype(np.float32), (n, 1)),
        "lsf_sigma": np.full((n, ivar.shape[1]), 0.9, np.float32),
        "Z": labels.z[rows],
        "ZERR": labels.zerr[rows],
        "ZWARN": labels.zwarn[rows] == 0,
        "EBV": np.full(n, 0.02),
        **{f"FLUX_{band}": np.ones(n) for band in "GRZ"},
    }


MMU_FLOAT_FIELDS = ("Z", "ZERR", "EBV", "FLUX_G", "FLUX_R", "FLUX_Z")
MMU_SPECTRUM_KEYS = ("flux", "ivar", "lsf_sigma", "lambda", "mask")


def write_mmu_hdf5(path: str | os.PathLike, columns: dict[str, np.ndarray]) -> Path:
    """An HDF5 shard in MMU's layout (`spectrum_*` datasets, catalogue fields, `object_id` bytes), atomically."""
    import h5py

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as handle:
            for key in MMU_SPECTRUM_KEYS:
                handle.create_dataset(f"spectrum_{key}", data=columns[key])
            for key in (*MMU_FLOAT_FIELDS, "ZWARN"):
                handle.create_dataset(key, data=columns[key])
            handle.create_dataset("object_id", data=columns["object_id"].astype("S"))

    return atomic_write(path, write)


def write_mmu_parquet(path: str | os.PathLike, columns: dict[str, np.ndarray]) -> Path:
    """A Parquet file as `load_dataset("MultimodalUniverse/desi")` gives it (MMU's own features, lower-case
    catalogue names) saved with `Dataset.to_parquet`, atomically."""
    import datasets

    n_pixels = columns["flux"].shape[1]
    spectrum = {k: datasets.Value("bool" if k == "mask" else "float32") for k in MMU_SPECTRUM_KEYS}
    features = datasets.Features(
        {
            "spectrum": datasets.Sequence(feature=spectrum, length=n_pixels),
            **{name.lower(): datasets.Value("float32") for name in MMU_FLOAT_FIELDS},
            "ZWARN": datasets.Value("bool"),
            "object_id": datasets.Value("string"),
        }
    )
    rows = {
        "spectrum": [{k: columns[k][i] for k in spectrum} for i in range(len(columns["object_id"]))],
        **{name.lower(): columns[name] for name in MMU_FLOAT_FIELDS},
        "ZWARN": columns["ZWARN"],
        "object_id": columns["object_id"],
    }
    table = datasets.Dataset.from_dict(rows, features=features)
    return atomic_write(path, lambda tmp: table.to_parquet(str(tmp)))
