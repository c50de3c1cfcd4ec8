"""Parquet shards -> a map-style torch `Dataset` read with pyarrow -> torch batches for both training stages.

The shards are the ones `specpt prepare` writes, `{data_dir}/{split}/*.parquet`, one spectrum record per
row (see ARCHITECTURE.md): `flux`, `ivar` (float32 lists), `mask` (bool list, True = bad pixel), `z`, ...
A folder without its dataset card (`{data_dir}/README.md`, written last) is refused as partial.

`ParquetSplit` reads the shards in place (no copy into the `datasets` cache) one row group at a time and keeps
the last few decoded row groups; `RowGroupWindowSampler` orders the training rows so that this cache suffices
while each batch still mixes row groups of every file (the shards' row groups hold one target class each).
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

logger = logging.getLogger(__name__)

DATASET_CARD = "README.md"  # written last by `specpt prepare`: a folder without it is partial
SPECTRUM_COLUMNS = ("flux", "ivar", "mask")
STAGE_COLUMNS = {"autoencoder": SPECTRUM_COLUMNS, "redshift": (*SPECTRUM_COLUMNS, "z")}
WINDOW = 16  # row groups whose rows a training window shuffles together = decoded row groups kept per process
READ_ERRORS = (OSError, ValueError, pa.ArrowException)  # a missing, truncated or corrupt Parquet file
PARQUET = ds.ParquetFileFormat()
LOCAL_FILES = pyarrow.fs.LocalFileSystem()


class MissingColumnsError(ValueError):
    """A Parquet shard lacks columns a reader needs (`missing`)."""

    def __init__(self, path: str, missing: list[str]) -> None:
        super().__init__(f"{path}: Parquet shard lacks column(s) {missing}")
        self.path, self.missing = path, missing


def split_files(data_dir: str | os.PathLike, split: str) -> list[str]:
    """The Parquet shards of one split, sorted; `FileNotFoundError` naming the folder if there are none or
    if `data_dir` lacks its dataset card (`README.md`, written last: without it the dataset is partial)."""
    folder = Path(data_dir) / split
    files = sorted(str(path) for path in folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"no Parquet shards for split {split!r}: {folder}/*.parquet (run `specpt prepare`)"
        )
    check_complete(data_dir)
    return files


def check_complete(data_dir: str | os.PathLike) -> None:
    """`FileNotFoundError` naming `data_dir` unless it holds its dataset card, `README.md`."""
    card = Path(data_dir) / DATASET_CARD
    if not card.is_file():
        raise FileNotFoundError(
            f"{data_dir}: no {DATASET_CARD}, so not a complete dataset (an interrupted `specpt prepare`?); "
            "run `specpt prepare` again"
        )


def column_array(column: pa.ChunkedArray) -> np.ndarray:
    """A decoded column as numpy: [rows, length] for a list column (all rows of one length), else [rows].

    Numbers without nulls in one chunk come without a copy, as read-only views of the Arrow buffers; booleans
    (bit-packed in Arrow), strings (an object array of `str`) and combined chunks are copies. `ValueError` for a
    list column with null rows or rows of different lengths.
    """
    array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()  # one chunk: no copy
    if isinstance(array, (pa.FixedSizeListArray, pa.ListArray, pa.LargeListArray)):
        return list_array(array)
    return array.to_numpy(zero_copy_only=False)


def list_array(array: pa.Array) -> np.ndarray:
    """[rows, length] the values of a list array whose rows share one length, through the flat values."""
    if array.null_count:
        raise ValueError(f"{array.null_count} of {len(array)} rows are null, not lists")
    if isinstance(array, pa.FixedSizeListArray):
        length = array.type.list_size
    else:
        lengths = np.diff(array.offsets.to_numpy())  # [rows] (`offsets` accounts for a slice)
        length = int(lengths[0]) if len(lengths) else 0
        if len(lengths) and (lengths != length).any():
            raise ValueError(
                f"list rows of different lengths ({lengths.min()} to {lengths.max()} values), "
                "not arrays of one shape"
            )
    values = array.flatten().to_numpy(zero_copy_only=False)  # the rows' values, after a slice's offset
    return values.reshape(len(array), length)


def as_tensor(array: np.ndarray) -> torch.Tensor | np.ndarray:
    """A decoded column as a tensor sharing its memory (object arrays of text stay numpy).

    A read-only view of Arrow buffers gives a tensor torch would warn about once as not writable: the cached
    row groups are never written to (the collator and slicing stack rows into new tensors).
    """
    if array.dtype == object:
        return array
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="The given NumPy array is not writable", category=UserWarning
        )
        return torch.from_numpy(array)


class ParquetSplit(Dataset):
    """The rows of Parquet shards as a map-style dataset of row dicts (`{column: tensor or str}`), read in place.

    An index of the row groups (file, row group, first row) comes from the files' metadata; a row is read by
    decoding its whole row group (only `columns`), and the last `cache_groups` decoded row groups are kept, per
    process. `subset` and `read_column` give the row selections (redshift cut, row limits) without decoding
    the spectra. Slicing (`split[a:b]`) gives one dict of stacked tensors (lists for text columns). A row's
    tensors are views of the cached row group, mostly of the decoded Arrow buffers themselves (`column_array`):
    never change them in place (copy first).
    """

    def __init__(self, files: Sequence[str], columns: Sequence[str], cache_groups: int = WINDOW) -> None:
        self.files, self.columns, self.cache_groups = list(files), tuple(columns), cache_groups
        group_file, group_number, group_rows = [], [], []
        for file_index, path in enumerate(self.files):
            try:
                with pq.ParquetFile(path) as parquet:
                    names, metadata = parquet.schema_arrow.names, parquet.metadata
            except READ_ERRORS as error:
                raise ValueError(f"{path}: not a readable Parquet file ({error})") from error
            missing = [name for name in self.columns if name not in names]
            if missing:
                raise MissingColumnsError(path, missing)
            for number in range(metadata.num_row_groups):
                group_file.append(file_index)
                group_number.append(number)
                group_rows.append(metadata.row_group(number).num_rows)
        self.group_file = np.asarray(group_file, dtype=np.int64)  # [groups] index into `files`
        self.group_number = np.asarray(group_number, dtype=np.int64)  # [groups] row group within its file
        self.group_start = np.concatenate([[0], np.cumsum(group_rows, dtype=np.int64)])  # [groups + 1]
        self.positions = np.arange(
            self.group_start[-1]
        )  # [rows] this dataset's rows over all files, ascending
        self._cache: OrderedDict[int, dict[str, torch.Tensor | np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int | slice) -> dict[str, Any]:
        if isinstance(index, slice):
            rows = [self[i] for i in range(*index.indices(len(self)))]
            return {name: stack([row[name] for row in rows]) for name in self.columns}
        position = int(self.positions[range(len(self))[index]])  # IndexError out of range
        group = int(np.searchsorted(self.group_start, position, side="right")) - 1
        arrays = self._decoded(group)
        offset = position - int(self.group_start[group])
        return {name: arrays[name][offset] for name in self.columns}  # tensors (0-d for scalars), str

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers start with an empty cache
        return {**self.__dict__, "_cache": OrderedDict()}

    def row_groups(self) -> np.ndarray:
        """[rows] the row group (index over all files) of each row, ascending."""
        return np.searchsorted(self.group_start, self.positions, side="right") - 1

    def subset(self, rows: np.ndarray | slice) -> ParquetSplit:
        """The rows `rows` selects (a bool mask, a slice or ascending indices), sharing the index."""
        subset = copy.copy(self)  # with an empty cache (`__getstate__`)
        subset.positions = self.positions[rows]
        return subset

    def read_column(self, name: str) -> np.ndarray:
        """[rows] one scalar column of this dataset's rows, read without the others (e.g. `z` for a cut)."""
        values = []
        for path in self.files:
            try:
                with pq.ParquetFile(path) as parquet:
                    values.append(column_array(parquet.read(columns=[name]).column(name)))
            except (KeyError, *READ_ERRORS) as error:  # KeyError: no such column
                raise ValueError(f"{path}: cannot read column {name!r} ({error})") from error
        return np.concatenate(values)[self.positions]

    def _decoded(self, group: int) -> dict[str, torch.Tensor | np.ndarray]:
        """Row group `group` decoded (`{column: [rows] or [rows, length]}`: tensors, object arrays of text), from
        the cache when there."""
        if group in self._cache:
            self._cache.move_to_end(group)
            return self._cache[group]
        path, number = self.files[self.group_file[group]], int(self.group_number[group])
        # Decoded into the system allocator's memory: with Arrow's default pool (mimalloc in the Linux wheels)
        # and the decoded row groups kept here, the CPU recipe's loader spent ~3x the system time on fresh pages
        # and gave ~25% fewer batches/s. `ParquetFile` takes no memory pool; a fragment does. Reading the footer
        # again on each decode costs ~0.2 ms against ~30 ms to decode 256 spectra, so no metadata is kept.
        try:
            fragment = PARQUET.make_fragment(path, filesystem=LOCAL_FILES, row_groups=[number])
            table = fragment.to_table(columns=list(self.columns), memory_pool=pa.system_memory_pool())
        except READ_ERRORS as error:
            raise ValueError(f"{path}: row group {number} is not readable ({error})") from error
        arrays = {}
        for name in self.columns:
            try:
                arrays[name] = as_tensor(column_array(table.column(name)))
            except (ValueError, pa.ArrowException) as error:  # e.g. lists of different lengths
                raise ValueError(f"{path}: row group {number}, column {name!r}: {error}") from error
        self._cache[group] = arrays
        if len(self._cache) > self.cache_groups:
            self._cache.popitem(last=False)
        return arrays


def stack(values: list[Any]) -> torch.Tensor | list[Any]:
    """Cells of one column stacked into a tensor ([rows, ...]), or kept as a list for text."""
    return torch.stack(values) if values and isinstance(values[0], torch.Tensor) else values


class RowGroupWindowSampler(Sampler[int]):
    """Training order that mixes row groups yet decodes each once per epoch: each epoch a seeded permutation of
    the row groups, cut into windows of `window` row groups whose rows are shuffled together.

    Every row comes once per epoch; the order depends only on (`seed`, epoch), set by `set_epoch` (accelerate's
    prepared loaders call it at each `__iter__`; a plain DataLoader repeats epoch 0 without it). A loader reading
    in this order needs `window` decoded row groups at a time (`ParquetSplit`'s cache).
    """

    def __init__(self, row_groups: np.ndarray, window: int = WINDOW, seed: int = 0) -> None:
        # row_groups: [rows] row group of each dataset row, ascending (`ParquetSplit.row_groups()`)
        starts = np.flatnonzero(np.diff(row_groups)) + 1
        self.bounds = np.concatenate([[0], starts, [len(row_groups)]])  # [groups + 1] rows of each group
        self.window, self.seed, self.epoch = window, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.bounds) - 1)  # [groups]
        for first in range(0, len(order), self.window):
            groups = order[first : first + self.window]
            rows = np.concatenate([np.arange(self.bounds[g], self.bounds[g + 1]) for g in groups])
            yield from rows[rng.permutation(len(rows))].tolist()


def load_split(
    data_dir: str | os.PathLike, split: str, columns: Sequence[str] = SPECTRUM_COLUMNS
) -> ParquetSplit:
    """One split's shards as a `ParquetSplit` of `columns`; `ValueError` naming a shard that is unreadable or
    lacks one of them."""
    return ParquetSplit(split_files(data_dir, split), columns)


def filter_redshift_range(dataset: ParquetSplit, z_min: float, z_max: float) -> tuple[ParquetSplit, int]:
    """Keep rows with `z_min <= z <= z_max` (reading only `z`); return the kept rows and how many were dropped."""
    z = dataset.read_column("z")  # [rows]
    kept = dataset.subset((z >= z_min) & (z <= z_max))
    return kept, len(dataset) - len(kept)


def first_rows(dataset: ParquetSplit, limit: int | None) -> ParquetSplit:
    """The first `limit` rows (all of them when `limit` is None or larger than the dataset)."""
    if limit is None or limit >= len(dataset):
        return dataset
    return dataset.subset(slice(0, limit))


@dataclass
class SpectrumCollator:
    """Stack spectrum rows into model inputs: float32 `flux`, `ivar`, bool `mask` and the stage's `labels`.

    Stage `"autoencoder"` reconstructs the input, so `labels` is `flux`; stage `"redshift"` uses `z`.
    """

    stage: str

    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        flux = torch.stack([torch.as_tensor(row["flux"]) for row in rows]).float()  # [batch, pixels]
        ivar = torch.stack([torch.as_tensor(row["ivar"]) for row in rows]).float()  # [batch, pixels]
        mask = torch.stack([torch.as_tensor(row["mask"]) for row in rows]).bool()  # [batch, pixels]
        if self.stage == "autoencoder":
            labels = flux
        else:
            labels = torch.stack([torch.as_tensor(row["z"]) for row in rows]).float()  # [batch]
        return {"flux": flux, "ivar": ivar, "mask": mask, "labels": labels}


def build_dataloader(
    dataset: ParquetSplit,
    stage: str,
    batch_size: int,
    train: bool,
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader over `dataset`: training draws rows in `RowGroupWindowSampler` order (seeded by `seed` and
    the epoch) and drops a ragged end; validation reads the rows in order.

    The loader's own generator (its worker seeds) keeps the global torch RNG (dropout) untouched by data
    loading, so a resumed run draws the same dropout masks as an uninterrupted one.
    """
    sampler = RowGroupWindowSampler(dataset.row_groups(), seed=seed) if train else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train and len(dataset) >= batch_size,
        collate_fn=SpectrumCollator(stage),
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed) if train else None,
        persistent_workers=num_workers > 0,
    )


def load_training_data(
    data_dir: str | os.PathLike,
    stage: str,
    z_range: tuple[float, float] | None = None,
    max_train_spectra: int | None = None,
    max_val_spectra: int | None = None,
) -> dict[str, ParquetSplit]:
    """The `train` and `validation` splits for `stage`, cut to `z_range` (stage 2) and to the row limits."""
    columns = STAGE_COLUMNS[stage]
    splits = {}
    for split, limit in (("train", max_train_spectra), ("validation", max_val_spectra)):
        dataset = load_split(data_dir, split, columns)
        if z_range is not None:
            dataset, dropped = filter_redshift_range(dataset, *z_range)
            if dropped:
                logger.warning(
                    "%s: dropped %d of %d spectra with z outside the model's range [%g, %g]",
                    split,
                    dropped,
                    dropped + len(dataset),
                    *z_range,
                )
        dataset = first_rows(dataset, limit)
        if len(dataset) == 0:
            raise ValueError(f"{Path(data_dir) / split}: no spectra left to train on")
        splits[split] = dataset
    return splits
