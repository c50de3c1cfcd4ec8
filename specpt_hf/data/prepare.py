"""`specpt prepare`: DESI coadd + redshift files -> Parquet shards per split and a Hub dataset card.

Output layout::

    OUT/README.md                       dataset card (YAML front matter: configs, features, license)
    OUT/train/part-00000.parquet        shards of at most --shard-size spectra
    OUT/validation/part-00000.parquet
    OUT/test/part-00000.parquet

Spectra are streamed: a file is read a chunk of rows at a time, each chunk's labelled spectra go to
their split as one block of columns, and each split's rows go to Parquet in row groups encoded on
background threads, so memory stays bounded and encoding overlaps reading. The whole folder is written
aside, the card last, and renamed onto OUT when complete: OUT is a whole dataset or absent (readers refuse
a folder without its README.md). Read back with `datasets.load_dataset(OUT)` or `load_dataset("parquet", data_files=...)`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub import DatasetCard, DatasetCardData
from tqdm.auto import tqdm

from ..atomic import atomic_write_text, make_folder, replaced_folder
from ..cli import add_debug_flag, run_reporting_errors
from . import SPLITS
from .builder import (
    CITATION,
    DEFAULT_FRACTIONS,
    DESCRIPTION,
    HOMEPAGE,
    LICENSE,
    TARGET_CONFIGS,
    DesiSource,
    batch_to_arrow,
    check_fractions,
    collect_spectra_files,
    desi_features,
    examples_to_arrow,
    split_for_targetid,
)
from .desi import ReadStats
from .mmu import find_mmu_files, mmu_labelled_columns
from .redshifts import JoinStats, QualityCuts

logger = logging.getLogger(__name__)

SHARD_PATTERN = "part-{index:05d}.parquet"


@dataclass
class PrepareSummary:
    """What `prepare_dataset` wrote."""

    out_dir: Path
    files: int
    rows: dict[str, int]
    shards: dict[str, list[Path]]
    read_stats: ReadStats
    join_stats: JoinStats
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


class ShardWriter:
    """Writes one split's rows as Parquet shards of at most `shard_size` rows, each atomically.

    Rows come one at a time (`add`) or as batches of columns (`add_batch`) and are written in row
    groups of `row_group_size`, the same groups either way. With an `executor`, Parquet encoding runs
    on its threads while the next rows are read (pyarrow releases the GIL); at most one write per
    writer is in flight, so memory stays bounded.
    """

    def __init__(
        self,
        folder: Path,
        features: datasets.Features,
        shard_size: int,
        row_group_size: int,
        compression: str,
        executor: ThreadPoolExecutor | None = None,
    ):
        self.folder = folder
        self.executor = executor
        self._pending: Future | None = None
        self.features = features
        self.schema = features.arrow_schema
        self.shard_size = shard_size
        self.row_group_size = min(row_group_size, shard_size)
        self.compression = compression
        self.buffer: list[dict[str, Any]] = []
        self.shards: list[Path] = []
        self.rows = 0
        self._staged: list[pa.Table] = []  # rows not yet written, in order
        self._staged_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._temp: Path | None = None
        self._rows_in_shard = 0

    def add(self, example: dict[str, Any]) -> None:
        """Add one row (`record_to_example`)."""
        self.buffer.append(example)
        if len(self.buffer) + self._staged_rows >= self.row_group_size:
            self._stage_examples()
            self._write_row_groups()

    def add_batch(self, batch: Mapping[str, Any]) -> None:
        """Add rows given as columns (`batch_to_arrow`); whole row groups are written at once."""
        self._stage_examples()
        self._stage(batch_to_arrow(batch, self.schema))
        self._write_row_groups()

    def flush(self) -> None:
        """Write every row added so far (in the background with an executor)."""
        self._stage_examples()
        if self._staged:
            table = pa.concat_tables(self._staged)
            self._staged, self._staged_rows = [], 0
            self._submit(table)

    def close(self) -> None:
        """Flush and finish the open shard (a split without rows gets no shard)."""
        self.flush()
        self._wait()
        if self._writer is not None:
            self._finish()

    def abort(self) -> None:
        """Drop the shard being written (finished shards stay)."""
        with contextlib.suppress(Exception):  # the error that stopped the run is raised by the caller
            self._wait()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._temp is not None:
            self._temp.unlink(missing_ok=True)
        self.buffer.clear()
        self._staged, self._staged_rows = [], 0

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _stage(self, table: pa.Table) -> None:
        if table.num_rows:
            self._staged.append(table)
            self._staged_rows += table.num_rows

    def _stage_examples(self) -> None:
        if self.buffer:
            self._stage(examples_to_arrow(self.buffer, self.features))
            self.buffer = []

    def _write_row_groups(self) -> None:
        """Write the whole row groups staged; keep the rest."""
        if self._staged_rows < self.row_group_size:
            return
        table = pa.concat_tables(self._staged)
        full = table.num_rows - table.num_rows % self.row_group_size
        rest = table.slice(full)
        self._staged, self._staged_rows = ([rest] if rest.num_rows else []), rest.num_rows
        self._submit(table.slice(0, full))

    def _submit(self, table: pa.Table) -> None:
        self._wait()
        if self.executor is None:
            self._write(table)
        else:
            self._pending = self.executor.submit(self._write, table)

    def _write(self, table: pa.Table) -> None:
        """Write `table` a row group at a time (row groups follow the rows' order, whatever the batches)."""
        for start in range(0, table.num_rows, self.row_group_size):
            self._write_group(table.slice(start, self.row_group_size))

    def _write_group(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._writer is None:
                self._open()
            take = min(table.num_rows, self.shard_size - self._rows_in_shard)
            self._writer.write_table(table.slice(0, take), row_group_size=self.row_group_size)
            self._rows_in_shard += take
            self.rows += take
            table = table.slice(take)
            if self._rows_in_shard >= self.shard_size:
                self._finish()

    def _open(self) -> None:
        make_folder(self.folder)
        final = self.folder / SHARD_PATTERN.format(index=len(self.shards))
        self._temp = final.with_name(f".{final.name}.tmp")
        schema = self.schema
        # Dictionary encoding and statistics only pay off for the scalar columns; on the 7781-long
        # float lists they cost half the write time for nothing.
        scalars = [f.name for f in schema if not pa.types.is_fixed_size_list(f.type)]
        strings = [f.name for f in schema if pa.types.is_string(f.type)]
        self._writer = pq.ParquetWriter(
            self._temp, schema, compression=self.compression, use_dictionary=strings, write_statistics=scalars
        )
        self._rows_in_shard = 0

    def _finish(self) -> None:
        assert self._writer is not None and self._temp is not None
        self._writer.close()
        final = self.folder / SHARD_PATTERN.format(index=len(self.shards))
        os.replace(self._temp, final)
        self.shards.append(final)
        self._writer, self._temp = None, None


def check_output_folder(out_dir: Path, overwrite: bool) -> None:
    """FileExistsError naming `out_dir` when it exists, is not empty and `overwrite` is off (the whole folder
    is replaced by the new dataset)."""
    if overwrite or not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    existing = [p for split in SPLITS for p in (out_dir / split).glob("*.parquet")]
    what = f"already holds {len(existing)} Parquet shards" if existing else "is not empty"
    raise FileExistsError(f"{out_dir}: {what} (use overwrite to replace the folder)")


def prepare_dataset(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    catalog: str | os.PathLike | None = None,
    target_class: str = "all",
    shard_size: int = 5000,
    row_group_size: int = 256,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    cuts: QualityCuts | None = None,
    chunk_size: int = 256,
    compression: str = "snappy",
    skip_bad_files: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> PrepareSummary:
    """Write Parquet shards per split and a dataset card for the DESI files in `inputs`.

    `inputs` are folders (release layout or flat; their coadd-* files are used) or coadd/spectra
    files. Redshifts come from the `redrock-*` file next to each, or from `catalog`. Multimodal Universe files
    (`specpt_hf.data.mmu`: HDF5 shards or their Parquet exports) carry their own labels; given any, only they are
    read (their cuts: TARGETID > 0, a finite Z, and ZWARN good when `cuts.enabled`).

    The dataset is complete or absent: it is written into a temporary folder next to `out_dir`, the card
    (README.md) last, and renamed onto `out_dir` at the end; on any error (or a kill) `out_dir` keeps what it
    held. `overwrite` replaces the whole folder; without it a non-empty `out_dir` is a FileExistsError.
    """
    if shard_size < 1 or row_group_size < 1:
        raise ValueError(f"shard_size and row_group_size must be >= 1, got {shard_size}, {row_group_size}")
    fractions = check_fractions(fractions)
    start = time.perf_counter()
    if mmu_files := find_mmu_files(list(inputs)):
        return _prepare_mmu(
            mmu_files,
            Path(out_dir),
            shard_size,
            row_group_size,
            compression,
            fractions,
            cuts,
            chunk_size,
            overwrite,
            progress,
            start,
        )
    source = DesiSource(
        files=collect_spectra_files(inputs),
        catalog=catalog,
        target_class=target_class,
        cuts=cuts or QualityCuts(),
        chunk_size=chunk_size,
        skip_bad_files=skip_bad_files,
    )
    files = [info.path for info in source.check()]
    out = Path(out_dir)
    check_output_folder(out, overwrite)
    with replaced_folder(out) as tmp:
        rows, shards, read_stats, join_stats = _write_splits(
            source, files, tmp, shard_size, row_group_size, compression, fractions, progress
        )
        write_dataset_card(tmp, rows=rows, target_class=target_class, cuts=source.cuts, fractions=fractions)
    summary = PrepareSummary(
        out_dir=out,
        files=len(files),
        rows=rows,
        shards={split: [out / p.relative_to(tmp) for p in paths] for split, paths in shards.items()},
        read_stats=read_stats,
        join_stats=join_stats,
        seconds=time.perf_counter() - start,
    )
    logger.info("wrote %d rows %s to %s in %.1f s", summary.total_rows, rows, out, summary.seconds)
    return summary


@contextlib.contextmanager
def split_writers(
    out: Path, shard_size: int, row_group_size: int, compression: str
) -> Iterator[dict[str, ShardWriter]]:
    """A `ShardWriter` per split under `out/{split}`, encoding on shared background threads: all closed on
    success (their last rows encoded side by side), all aborted on an error."""
    with ThreadPoolExecutor(max_workers=len(SPLITS), thread_name_prefix="parquet") as executor:
        writers = {
            split: ShardWriter(
                out / split, desi_features(), shard_size, row_group_size, compression, executor
            )
            for split in SPLITS
        }
        try:
            yield writers
            for writer in writers.values():
                writer.flush()
            for writer in writers.values():
                writer.close()
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise


def _write_splits(
    source: DesiSource,
    files: list[Path],
    out: Path,
    shard_size: int,
    row_group_size: int,
    compression: str,
    fractions: Sequence[float],
    progress: bool,
) -> tuple[dict[str, int], dict[str, list[Path]], ReadStats, JoinStats]:
    """Stream the labelled spectra of `files` into Parquet shards under `out/{split}`; return the rows and
    shards per split and the read / join statistics. ValueError when no spectrum passed the selection."""
    read_stats, join_stats = ReadStats(), JoinStats()
    with split_writers(out, shard_size, row_group_size, compression) as writers:
        labelled_chunks = source.labelled_chunks(
            files, read_stats=read_stats, join_stats=join_stats, progress=progress
        )
        for labelled in labelled_chunks:  # one copy of the spectra: straight into their split
            splits = np.array([split_for_targetid(t, fractions) for t in labelled.targetid.tolist()])
            for split, writer in writers.items():
                if len(subset := np.flatnonzero(splits == split)):
                    writer.add_batch(labelled.columns(subset))
    rows = {split: writer.rows for split, writer in writers.items()}
    if not sum(rows.values()):
        raise ValueError(
            f"no spectrum passed the selection in {len(files)} files; read {read_stats.as_dict()}, "
            f"joined {join_stats.as_dict()}"
        )
    return rows, {split: writer.shards for split, writer in writers.items()}, read_stats, join_stats


def _prepare_mmu(
    files: list[Path],
    out: Path,
    shard_size: int,
    row_group_size: int,
    compression: str,
    fractions: Sequence[float],
    cuts: QualityCuts | None,
    chunk_size: int,
    overwrite: bool,
    progress: bool,
    start: float,
) -> PrepareSummary:
    """`prepare_dataset` for Multimodal Universe files: their own labels, the same shards and card."""
    cuts = cuts or QualityCuts()
    check_output_folder(out, overwrite)
    stats = JoinStats()
    with replaced_folder(out) as tmp:
        with split_writers(tmp, shard_size, row_group_size, compression) as writers:
            for path in tqdm(files, desc="reading MMU files", unit="file", disable=not progress):
                _write_mmu_file(path, writers, fractions, cuts, chunk_size, stats)
        rows = {split: writer.rows for split, writer in writers.items()}
        if not sum(rows.values()):
            raise ValueError(f"no spectrum passed the selection in {len(files)} MMU files; {stats.as_dict()}")
        write_dataset_card(tmp, rows=rows, target_class="all", cuts=cuts, fractions=fractions)
    return PrepareSummary(
        out_dir=out,
        files=len(files),
        rows=rows,
        shards={
            split: [out / p.relative_to(tmp) for p in writer.shards] for split, writer in writers.items()
        },
        read_stats=ReadStats(),
        join_stats=stats,
        seconds=time.perf_counter() - start,
    )


def _write_mmu_file(
    path: Path,
    writers: dict[str, ShardWriter],
    fractions: Sequence[float],
    cuts: QualityCuts,
    chunk_size: int,
    stats: JoinStats,
) -> None:
    """One MMU file's labelled spectra into their splits' writers."""
    for columns in mmu_labelled_columns(path, cuts, chunk_size, stats):
        splits = np.array([split_for_targetid(t, fractions) for t in columns["targetid"].tolist()])
        for split, writer in writers.items():
            if len(subset := np.flatnonzero(splits == split)):
                writer.add_batch({key: value[subset] for key, value in columns.items()})


# ----------------------------------------------------------------------------------------- card


def _size_category(n: int) -> str:
    for limit, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if n < limit:
            return name
    return "1M<n<10M"


def _card_body(rows: dict[str, int], target_class: str, cuts: QualityCuts, fractions: Sequence[float]) -> str:
    split_lines = "\n".join(
        f"| {split} | {rows[split]} | {fraction:.2f} |"
        for split, fraction in zip(SPLITS, fractions, strict=True)
    )
    cut_lines = "\n".join(f"- `{name}` = {value!r}" for name, value in vars(cuts).items())
    return f"""
# DESI EDR spectra ({target_class})

{DESCRIPTION}
## Columns

| column | type | meaning |
| --- | --- | --- |
| `targetid` | int64 | DESI TARGETID |
| `flux` | float32 x 7781 | flux density, 1e-17 erg/s/cm2/Angstrom, on the 3600-9824 Angstrom grid (0.8 Angstrom steps) |
| `ivar` | float32 x 7781 | inverse variance of `flux`; 0 where unusable |
| `mask` | bool x 7781 | **True = bad pixel** (merged DESI mask non-zero or ivar 0) |
| `z`, `zerr` | float64 | Redrock redshift and its error |
| `zwarn` | int64 | Redrock ZWARN bit mask, 0 = no warning (never inverted) |
| `spectype` | string | GALAXY / QSO / STAR |
| `target_class` | string | bgs / elg / lrg / qso / mws / other, from the targeting bits |
| `survey`, `program` | string | provenance (e.g. sv3, dark) |
| `healpix` | int64 | nside-64 nested healpix of the coadd (-1 for tile coadds) |

The wavelength of pixel `i` is `3600.0 + 0.8 * i` Angstrom (vacuum).

## Selection

Target class: `{target_class}`. Quality cuts (`specpt_hf.data.redshifts.QualityCuts`):

{cut_lines}

## Splits

Assigned by a BLAKE2b hash of the TARGETID's decimal string, so a target is always in the same split,
whatever files are added.

| split | rows | fraction |
| --- | --- | --- |
{split_lines}

## Source and license

DESI Early Data Release (Fuji), {HOMEPAGE}. DESI data are released under CC BY 4.0; please cite:

```bibtex
{CITATION}```
"""


def write_shards_card(out_dir: str | os.PathLike, target_class: str, cuts: QualityCuts | None = None) -> Path:
    """The dataset card of a folder assembled from prepared shards (`{split}/*.parquet`, e.g. several classes
    or chunks linked together), its rows counted from the Parquet footers; write it last, once every shard is in."""
    out = Path(out_dir)
    rows = {
        split: sum(pq.ParquetFile(path).metadata.num_rows for path in (out / split).glob("*.parquet"))
        for split in SPLITS
    }
    return write_dataset_card(out, rows=rows, target_class=target_class, cuts=cuts or QualityCuts())


def write_dataset_card(
    out_dir: str | os.PathLike,
    *,
    rows: dict[str, int],
    target_class: str,
    cuts: QualityCuts,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    features: datasets.Features | None = None,
    body: str | None = None,
) -> Path:
    """Write `README.md` with Hub metadata (configs, dataset_info, license, tags) atomically.

    Only splits with rows are listed (`datasets` refuses a declared split without data). `features`
    (default: `desi_features()`) and `body` (default: the DESI EDR text) serve other spectra's folders.
    """
    out = Path(out_dir)
    present = [split for split in SPLITS if rows.get(split)]
    card_data = DatasetCardData(
        license=LICENSE,
        pretty_name=f"DESI EDR spectra ({target_class})",
        task_categories=["other"],
        tags=["astronomy", "spectroscopy", "redshift", "desi", "galaxies"],
        size_categories=_size_category(sum(rows.values())),
        configs=[
            {
                "config_name": target_class,
                "default": True,
                "data_files": [{"split": split, "path": f"{split}/*.parquet"} for split in present],
            }
        ],
    )
    splits = datasets.SplitDict()
    for split in present:
        splits.add(datasets.SplitInfo(name=split, num_examples=rows[split]))
    info = datasets.DatasetInfo(features=features or desi_features(), splits=splits)
    datasets.info.DatasetInfosDict({target_class: info}).to_dataset_card_data(card_data)
    text = _card_body(rows, target_class, cuts, fractions) if body is None else body
    card = DatasetCard(f"---\n{card_data.to_yaml()}\n---\n{text}")
    return atomic_write_text(out / "README.md", str(card))


# ----------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specpt prepare",
        description="Write Parquet shards per split and a dataset card from DESI coadd + redshift files.",
    )
    parser.add_argument("inputs", nargs="+", help="folders (release layout or flat) or coadd/spectra files")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--catalog", help="redshift catalog (zpix-*, zall-pix-*, EDR VAC) instead of redrock-*"
    )
    parser.add_argument("--target-class", default="all", choices=TARGET_CONFIGS)
    parser.add_argument("--shard-size", type=int, default=5000, help="spectra per Parquet shard")
    parser.add_argument("--row-group-size", type=int, default=256, help="spectra per Parquet row group")
    parser.add_argument("--fractions", type=float, nargs=3, default=list(DEFAULT_FRACTIONS), metavar="F")
    parser.add_argument("--chunk-size", type=int, default=256, help="FIBERMAP rows read at a time")
    parser.add_argument("--compression", default="snappy", help="Parquet compression (snappy, zstd, none)")
    parser.add_argument(
        "--no-quality-cuts", action="store_true", help="keep every redshift (only the basic cuts)"
    )
    parser.add_argument("--all-spectra", action="store_true", help="keep non-primary spectra too")
    parser.add_argument(
        "--skip-bad-files", action="store_true", help="log and skip bad files instead of failing"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the --out folder (once the new one is complete)"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    add_debug_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`specpt prepare`; an expected error is one line on stderr and exit status 1 (`--debug`: traceback)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    return run_reporting_errors("prepare", lambda: _run(args), args.debug)


def _run(args: argparse.Namespace) -> int:
    cuts = QualityCuts(enabled=not args.no_quality_cuts, primary_only=not args.all_spectra)
    summary = prepare_dataset(
        args.inputs,
        args.out,
        catalog=args.catalog,
        target_class=args.target_class,
        shard_size=args.shard_size,
        row_group_size=args.row_group_size,
        fractions=args.fractions,
        cuts=cuts,
        chunk_size=args.chunk_size,
        compression=args.compression,
        skip_bad_files=args.skip_bad_files,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    rate = summary.read_stats.fibers / summary.seconds if summary.seconds else float("nan")
    print(
        f"{summary.total_rows} spectra from {summary.files} files -> {summary.out_dir} "
        f"({', '.join(f'{k} {v}' for k, v in summary.rows.items())}); {summary.seconds:.1f} s, {rate:.0f} fibers/s"
    )
    print(f"read: {summary.read_stats.as_dict()}")
    print(f"join: {summary.join_stats.as_dict()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
