"""The DESI EDR `datasets` builder, the TARGETID-hash splits, and the record -> row conversion.

Use it directly (loading scripts are gone from `datasets`)::

    builder = DesiEdrBuilder(config_name="bgs", data_dir="/data/edr/spectro/redux/fuji")
    builder.download_and_prepare()
    ds = builder.as_dataset(split="train")

`data_dir` holds coadd files in the release layout (`healpix/{survey}/{program}/{hpx//100}/{hpx}/`)
or flat, each with its `redrock-*` file side by side, unless `catalog=` names a redshift catalog.
`specpt prepare` (prepare.py) writes the same rows as Parquet shards for the Hub.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from . import SPLITS
from .desi import (
    DESI_N_PIXELS,
    DESI_WAVE_END,
    DESI_WAVE_START,
    DESI_WAVE_STEP,
    DesiFileInfo,
    DesiFormatError,
    ReadStats,
    Selector,
    SpectraChunk,
    inspect_desi_file,
    read_desi_chunks,
)
from .mmu import find_mmu_files, mmu_labelled_columns
from .redshifts import (
    TARGET_BITS,
    TARGET_CLASSES,
    JoinStats,
    QualityCuts,
    RedshiftJoin,
    RedshiftTable,
    read_redrock,
    read_redshifts,
)

logger = logging.getLogger(__name__)

TARGET_CONFIGS = ("bgs", "elg", "lrg", "qso", "mws", "all")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
LICENSE = "cc-by-4.0"
HOMEPAGE = "https://data.desi.lbl.gov/doc/releases/edr/"
CITATION = """\
@article{DESI2024EDR,
  title   = {The Early Data Release of the Dark Energy Spectroscopic Instrument},
  author  = {{DESI Collaboration}},
  journal = {The Astronomical Journal},
  volume  = {168},
  pages   = {58},
  year    = {2024},
  eprint  = {2306.06308},
  archivePrefix = {arXiv},
}
"""
DESCRIPTION = f"""\
DESI Early Data Release (Fuji) spectra with their redshifts. Each row is one coadded spectrum, its
b, r and z arms merged onto one grid as DESI's coadd_cameras does: {DESI_N_PIXELS} pixels from
{DESI_WAVE_START:.1f} to {DESI_WAVE_END:.1f} Angstrom (vacuum) in {DESI_WAVE_STEP} Angstrom steps. `flux` is in 1e-17 erg/s/cm2/Angstrom, `ivar` is its inverse variance
(0 where unusable), and `mask` is True at BAD pixels (merged DESI mask non-zero or ivar 0).
`z`, `zerr`, `zwarn` (the DESI bit mask, 0 = no warning), `spectype` come from Redrock;
`target_class` (bgs, elg, lrg, qso, mws, other) from the targeting bits. Only science targets (OBJTYPE TGT,
TARGETID > 0, fiber status 0), primary spectra and redshifts passing the DESI quality cuts of their
class are kept. Splits are fixed by a hash of TARGETID, so a galaxy is always in the same split.
"""

_SPECTRA_PREFIXES = ("coadd-", "spectra-")


# ----------------------------------------------------------------------------------------- rows


def desi_features(n_pixels: int = DESI_N_PIXELS) -> datasets.Features:
    """The row schema (ARCHITECTURE.md); `mask` True = bad pixel."""
    return datasets.Features(
        {
            "targetid": datasets.Value("int64"),
            "flux": datasets.List(datasets.Value("float32"), length=n_pixels),
            "ivar": datasets.List(datasets.Value("float32"), length=n_pixels),
            "mask": datasets.List(datasets.Value("bool"), length=n_pixels),
            "z": datasets.Value("float64"),
            "zerr": datasets.Value("float64"),
            "zwarn": datasets.Value("int64"),
            "spectype": datasets.Value("string"),
            "target_class": datasets.Value("string"),
            "survey": datasets.Value("string"),
            "program": datasets.Value("string"),
            "healpix": datasets.Value("int64"),
        }
    )


def record_to_example(record: dict[str, Any]) -> dict[str, Any]:
    """A labelled spectrum record -> one dataset row (numpy arrays for the spectra, plain scalars)."""
    return {
        "targetid": int(record["targetid"]),
        "flux": np.asarray(record["flux"], dtype=np.float32),
        "ivar": np.asarray(record["ivar"], dtype=np.float32),
        "mask": np.asarray(record["mask"], dtype=bool),
        "z": float(record["z"]),
        "zerr": float(record["zerr"]),
        "zwarn": int(record["zwarn"]),
        "spectype": str(record["spectype"]),
        "target_class": str(record["target_class"]),
        "survey": str(record.get("survey", "")),
        "program": str(record.get("program", "")),
        "healpix": int(record.get("healpix", -1)),
    }


def examples_to_arrow(examples: Sequence[dict[str, Any]], features: datasets.Features) -> pa.Table:
    """Rows from `record_to_example` -> an Arrow table with `features`' schema (and its metadata)."""
    schema = features.arrow_schema
    batch: dict[str, Any] = {}
    for name in schema.names:
        values = [example[name] for example in examples]
        if pa.types.is_fixed_size_list(schema.field(name).type):
            dtype = schema.field(name).type.value_type.to_pandas_dtype()
            sizes = {np.shape(value) for value in values}
            if len(sizes) > 1:
                raise ValueError(f"{name}: every row needs {schema.field(name).type.list_size} values")
            values = np.stack(values).astype(dtype, copy=False) if values else np.empty((0, 0), dtype)
        batch[name] = values
    return batch_to_arrow(batch, features, n_rows=len(examples))


def batch_to_arrow(
    batch: Mapping[str, Any], features: datasets.Features | pa.Schema, n_rows: int | None = None
) -> pa.Table:
    """Columns of rows (spectra as [n_rows, n_pixels] arrays) -> an Arrow table with `features`' schema.

    The spectra are wrapped without copying where their dtype and layout already fit. `features`
    may be given as its Arrow schema (`features.arrow_schema`, which takes time to build).
    """
    schema = features if isinstance(features, pa.Schema) else features.arrow_schema
    n_rows = len(batch[schema.names[0]]) if n_rows is None else n_rows
    columns = []
    for name in schema.names:
        arrow_type = schema.field(name).type
        if pa.types.is_fixed_size_list(arrow_type):
            size = arrow_type.list_size
            dtype = arrow_type.value_type.to_pandas_dtype()
            values = np.ascontiguousarray(batch[name], dtype=dtype).reshape(-1)
            if values.size != size * n_rows:
                raise ValueError(f"{name}: every row needs {size} values")
            if pa.types.is_boolean(arrow_type.value_type):  # Arrow's bit-packed layout, LSB first
                bits = pa.py_buffer(np.packbits(values, bitorder="little"))
                flat = pa.Array.from_buffers(pa.bool_(), values.size, [None, bits])
            else:
                flat = pa.array(values, type=arrow_type.value_type)
            columns.append(pa.FixedSizeListArray.from_arrays(flat, size))
        else:
            columns.append(pa.array(batch[name], type=arrow_type))
    return pa.Table.from_arrays(columns, schema=schema)


@dataclass
class LabelledChunk:
    """The spectra of a `SpectraChunk` that passed the redshift join.

    `index` points into the chunk, `rows` into `table` (their labels), `classes` are their classes.
    """

    chunk: SpectraChunk
    table: RedshiftTable
    index: np.ndarray  # int64 [n], sorted
    rows: np.ndarray  # int64 [n]
    classes: np.ndarray  # str [n]

    def __len__(self) -> int:
        return len(self.index)

    @property
    def targetid(self) -> np.ndarray:
        return self.chunk.targetid[self.index]

    def columns(self, subset: np.ndarray | None = None) -> dict[str, Any]:
        """Dataset columns (`desi_features`) of these spectra, or of `subset` (indices) of them.

        The spectra are the chunk's own arrays when every row is taken, else one copy.
        """
        index, rows, classes = self.index, self.rows, self.classes
        if subset is not None:
            index, rows, classes = index[subset], rows[subset], classes[subset]
        chunk, table, n = self.chunk, self.table, len(index)

        def take(values: np.ndarray) -> np.ndarray:
            return values if n == len(chunk) else values[index]  # sorted and complete: every row

        return {
            "targetid": chunk.targetid[index],
            "flux": take(chunk.flux),
            "ivar": take(chunk.ivar),
            "mask": take(chunk.mask),
            "z": table.z[rows],
            "zerr": table.zerr[rows],
            "zwarn": table.zwarn[rows],
            "spectype": table.spectype[rows].astype(str),
            "target_class": classes.astype(str),
            "survey": np.full(n, chunk.survey),
            "program": np.full(n, chunk.program),
            "healpix": np.full(n, chunk.healpix, dtype=np.int64),
        }


def label_chunk(chunk: SpectraChunk, join: RedshiftJoin) -> LabelledChunk | None:
    """Join a chunk's spectra with their redshifts (`RedshiftJoin.match`); None if none is kept."""
    index, rows, classes = join.match(
        chunk.targetid, chunk.survey, chunk.program, chunk.fibermap, chunk.source, chunk.shared_targetid
    )
    return LabelledChunk(chunk, join.table, index, rows, classes) if len(index) else None


# ----------------------------------------------------------------------------------------- splits


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    return values  # type: ignore[return-value]


def split_for_targetid(targetid: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """'train', 'validation' or 'test' from a hash of TARGETID (BLAKE2b of its decimal string).

    Stable across processes, machines and Python versions; a target never changes split when
    files are added.
    """
    train, validation, _ = check_fractions(fractions)
    digest = hashlib.blake2b(str(int(targetid)).encode("ascii"), digest_size=8).digest()
    position = int.from_bytes(digest, "big") / 2.0**64  # uniform in [0, 1)
    if position < train:
        return "train"
    return "validation" if position < train + validation else "test"


def split_selector(split: str, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> Selector:
    """A `select` function for `read_desi_spectra` keeping the TARGETIDs of one split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    fractions = check_fractions(fractions)

    def select(targetids: np.ndarray) -> np.ndarray:
        return np.array([split_for_targetid(t, fractions) == split for t in targetids], dtype=bool)

    return select


# ----------------------------------------------------------------------------------------- files


def find_spectra_files(root: str | os.PathLike, prefix: str = "coadd-") -> list[Path]:
    """`coadd-*.fits` files under `root`: a flat folder or the release layout.

    When `root` has a `healpix/` folder (the release's redux directory), only that tree is searched,
    so tile coadds of the same targets are not mixed in.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such file or folder")
    base = root / "healpix" if (root / "healpix").is_dir() else root
    return sorted(base.rglob(f"{prefix}*.fits"))


def redrock_path_for(spectra_path: str | os.PathLike) -> Path:
    """The Redrock file next to a coadd/spectra file (`coadd-X.fits` -> `redrock-X.fits`)."""
    path = Path(spectra_path)
    for prefix in _SPECTRA_PREFIXES:
        if path.name.startswith(prefix):
            return path.with_name("redrock-" + path.name[len(prefix) :])
    raise ValueError(f"{path}: not a coadd-* or spectra-* file name")


def collect_spectra_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand folders into their coadd files and keep files as given (sorted, without duplicates)."""
    inputs = list(inputs)
    files: list[Path] = []
    for item in inputs:
        files.extend(find_spectra_files(item))
    unique = sorted({path.resolve(): path for path in files}.values())
    if not unique:
        raise FileNotFoundError(f"no coadd-*.fits files found in {', '.join(map(str, inputs))}")
    return unique


@dataclass
class DesiSource:
    """What to read: spectra files, where their redshifts are, which class, which cuts."""

    files: list[Path]
    catalog: str | os.PathLike | None = None
    target_class: str = "all"
    cuts: QualityCuts = field(default_factory=QualityCuts)
    chunk_size: int = 256
    skip_bad_files: bool = False

    def __post_init__(self) -> None:
        if self.target_class not in TARGET_CONFIGS:
            raise ValueError(f"target_class must be one of {TARGET_CONFIGS}, got {self.target_class!r}")

    def check(self, targetids: bool = False) -> list[DesiFileInfo]:
        """Check every file's structure before reading; return what the usable files hold.

        Bad files raise one error listing them all, or are logged and dropped with `skip_bad_files`.
        With `targetids`, the good fibers' TARGETIDs are read as well.
        """
        problems: list[tuple[Path, str]] = []
        good: list[DesiFileInfo] = []
        for path in tqdm(self.files, desc="checking files", unit="file", disable=len(self.files) < 50):
            try:
                info = inspect_desi_file(path, targetids=targetids)
                if self.catalog is None and not redrock_path_for(path).is_file():
                    raise FileNotFoundError(f"{redrock_path_for(path)}: no Redrock file next to {path.name}")
                good.append(info)
            except (DesiFormatError, OSError) as error:
                problems.append((path, str(error)))
        if problems and not self.skip_bad_files:
            listing = "\n  ".join(message for _, message in problems)
            raise DesiFormatError(problems[0][0], f"{len(problems)} bad input file(s):\n  {listing}")
        for _, message in problems:
            logger.warning("skipping bad file: %s", message)
        return good

    def batches(
        self,
        files: Sequence[Path] | None = None,
        *,
        select: Selector | None = None,
        read_stats: ReadStats | None = None,
        join_stats: JoinStats | None = None,
        progress: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """The labelled spectra of `files` (default: all) as batches of dataset columns.

        Each batch is a dict of `desi_features` columns for up to `chunk_size` spectra of one file,
        the spectra as [n, 7781] arrays (`batch_to_arrow` makes an Arrow table of it).
        """
        for labelled in self.labelled_chunks(
            files, select=select, read_stats=read_stats, join_stats=join_stats, progress=progress
        ):
            yield labelled.columns()

    def labelled_chunks(
        self,
        files: Sequence[Path] | None = None,
        *,
        select: Selector | None = None,
        read_stats: ReadStats | None = None,
        join_stats: JoinStats | None = None,
        progress: bool = False,
    ) -> Iterator[LabelledChunk]:
        """`batches` before the columns are made: each chunk's spectra with their redshift rows."""
        files = self.files if files is None else list(files)
        bar = tqdm(files, desc="reading DESI files", unit="file", disable=not progress)
        if self.catalog is not None:
            join = RedshiftJoin(self.catalog_table, cuts=self.cuts, target_class=self.target_class)
            for path in bar:
                for chunk in self._read_chunks(path, select, read_stats):
                    if (labelled := label_chunk(chunk, join)) is not None:
                        yield labelled
            local = join.finish()
            if join_stats is not None:
                join_stats.add(local)
            return
        for path in bar:
            yield from self._join_redrock_chunks(path, select, read_stats, join_stats)

    @cached_property
    def catalog_table(self) -> RedshiftTable:
        """The redshift catalog, read once (each split's pass reuses it)."""
        if self.catalog is None:
            raise ValueError("catalog: no redshift catalog was given")
        return read_redshifts(self.catalog)

    def _read_chunks(
        self, path: Path, select: Selector | None, stats: ReadStats | None
    ) -> Iterator[SpectraChunk]:
        try:
            yield from read_desi_chunks(
                path,
                stats=stats,
                select=select,
                chunk_size=self.chunk_size,
                columns=("TARGETID", *TARGET_BITS),
            )
        except DesiFormatError as error:
            if not self.skip_bad_files:
                raise
            logger.warning("skipping the rest of a bad file: %s", error)

    def _redrock_table(self, path: Path) -> RedshiftTable | None:
        try:
            return read_redrock(redrock_path_for(path))
        except (DesiFormatError, OSError) as error:
            if not self.skip_bad_files:
                raise
            logger.warning("skipping %s: %s", path.name, error)
            return None

    def _join_redrock_chunks(
        self, path: Path, select: Selector | None, read_stats: ReadStats | None, join_stats: JoinStats | None
    ) -> Iterator[LabelledChunk]:
        table = self._redrock_table(path)
        if table is None:
            return
        join = RedshiftJoin(table, cuts=self.cuts, target_class=self.target_class)
        for chunk in self._read_chunks(path, select, read_stats):
            if (labelled := label_chunk(chunk, join)) is not None:
                yield labelled
        self._end_redrock(path, join.finish(), join_stats)

    def _end_redrock(self, path: Path, local: JoinStats, join_stats: JoinStats | None) -> None:
        if join_stats is not None:
            join_stats.add(local)
        if local.spectra and local.without_redshift == local.spectra:
            error = DesiFormatError(
                redrock_path_for(path),
                f"TARGETID mismatch: none of the {local.spectra} spectra of {path.name} has a row here",
            )
            if not self.skip_bad_files:
                raise error
            logger.warning("%s", error)


# ----------------------------------------------------------------------------------------- builder


@dataclass
class DesiEdrConfig(datasets.BuilderConfig):
    """A DESI EDR configuration: one target class (or 'all') and where the files are.

    Args:
        target_class (`str`, *optional*, defaults to `"all"`): bgs, elg, lrg, qso, mws or all.
        files (`list[str]`, *optional*): coadd files to read instead of searching `data_dir`.
        catalog (`str`, *optional*): a redshift catalog (zpix-*, zall-pix-*, EDR VAC) instead of
            the Redrock files next to each coadd.
        quality_cuts (`QualityCuts`, *optional*): the good-redshift cuts.
        fractions (`tuple[float, float, float]`, *optional*, defaults to `(0.8, 0.1, 0.1)`): split sizes.
        chunk_size (`int`, *optional*, defaults to 256): FIBERMAP rows read at a time.
        skip_bad_files (`bool`, *optional*, defaults to `False`): log and skip bad files instead of failing.
    """

    target_class: str = "all"
    files: list[str] | None = None
    catalog: str | None = None
    quality_cuts: QualityCuts = field(default_factory=QualityCuts)
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    chunk_size: int = 256
    skip_bad_files: bool = False


class DesiEdrBuilder(datasets.GeneratorBasedBuilder):
    """DESI EDR spectra on the 7781-pixel brz grid with Redrock redshifts, one config per target class."""

    VERSION = datasets.Version("1.0.0")
    BUILDER_CONFIG_CLASS = DesiEdrConfig
    BUILDER_CONFIGS = [
        DesiEdrConfig(name=name, target_class=name, description=f"DESI EDR {name} spectra")
        for name in TARGET_CONFIGS
    ]
    DEFAULT_CONFIG_NAME = "all"

    def __init__(self, *args: Any, dataset_name: str | None = "desi_edr", **kwargs: Any):
        super().__init__(*args, dataset_name=dataset_name, **kwargs)

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description=DESCRIPTION,
            features=desi_features(),
            homepage=HOMEPAGE,
            license=LICENSE,
            citation=CITATION,
        )

    def _source(self) -> DesiSource:
        config: DesiEdrConfig = self.config
        if config.files:
            files = collect_spectra_files(config.files)
        elif config.data_dir:
            files = collect_spectra_files([config.data_dir])
        else:
            raise ValueError("data_dir: give the folder holding the DESI coadd files (or files=[...])")
        return DesiSource(
            files=files,
            catalog=config.catalog,
            target_class=config.target_class,
            cuts=config.quality_cuts,
            chunk_size=config.chunk_size,
            skip_bad_files=config.skip_bad_files,
        )

    def _split_generators(self, dl_manager: datasets.DownloadManager) -> list[datasets.SplitGenerator]:
        fractions = check_fractions(self.config.fractions)
        if mmu := find_mmu_files(
            self.config.files or ([self.config.data_dir] if self.config.data_dir else [])
        ):
            cuts, size = (
                self.config.quality_cuts,
                self.config.chunk_size,
            )  # Multimodal Universe: labelled already
            reachable = {
                split_for_targetid(t, fractions)
                for path in mmu
                for columns in mmu_labelled_columns(path, cuts, size)
                for t in columns["targetid"].tolist()
            }
            return [
                datasets.SplitGenerator(name=split, gen_kwargs={"source": None, "files": mmu, "split": split})
                for split in SPLITS
                if split in reachable
            ]
        source = self._source()
        infos = source.check(targetids=True)
        files = [info.path for info in infos]
        # Splits no good fiber can reach are left out (`datasets` refuses a split without data).
        reachable = {split_for_targetid(t, fractions) for info in infos for t in info.targetids}
        return [
            datasets.SplitGenerator(name=split, gen_kwargs={"source": source, "files": files, "split": split})
            for split in SPLITS
            if split in reachable
        ]

    def _generate_examples(self, source: DesiSource | None, files: list[Path], split: str):
        if source is None:
            yield from self._mmu_examples(files, split)
            return
        select = split_selector(split, self.config.fractions)
        read_stats, join_stats = ReadStats(), JoinStats()
        chunks = source.labelled_chunks(files, select=select, read_stats=read_stats, join_stats=join_stats)
        for labelled in chunks:  # read a chunk at a time, yielded a row at a time
            columns = labelled.columns()
            for i, row in enumerate(labelled.chunk.rows[labelled.index].tolist()):
                example = record_to_example({name: values[i] for name, values in columns.items()})
                yield f"{labelled.chunk.source}:{row}", example
        logger.info("%s split: read %s; joined %s", split, read_stats.as_dict(), join_stats.as_dict())

    def _mmu_examples(self, files: list[Path], split: str):
        for path in files:
            for columns in mmu_labelled_columns(path, self.config.quality_cuts, self.config.chunk_size):
                for i, targetid in enumerate(columns["targetid"].tolist()):
                    if split_for_targetid(targetid, self.config.fractions) == split:
                        example = record_to_example({name: values[i] for name, values in columns.items()})
                        yield f"{path.name}:{targetid}", example


__all__ = [
    "CITATION",
    "DESCRIPTION",
    "DesiEdrBuilder",
    "DesiEdrConfig",
    "DesiSource",
    "SPLITS",
    "TARGET_CLASSES",
    "TARGET_CONFIGS",
    "collect_spectra_files",
    "desi_features",
    "LabelledChunk",
    "batch_to_arrow",
    "examples_to_arrow",
    "find_spectra_files",
    "label_chunk",
    "record_to_example",
    "redrock_path_for",
    "split_for_targetid",
    "split_selector",
]
