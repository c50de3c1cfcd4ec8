"""Parquet shards -> `datasets.Dataset` -> torch batches for both training stages.

The shards are the ones `specpt prepare` writes, `{data_dir}/{split}/*.parquet`, one spectrum record per
row (see ARCHITECTURE.md): `flux`, `ivar` (float32 lists), `mask` (bool list, True = bad pixel), `z`, ...
A folder without its dataset card (`{data_dir}/README.md`, written last) is refused as partial.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader

logger = logging.getLogger(__name__)

DATASET_CARD = "README.md"  # written last by `specpt prepare`: a folder without it is partial
SPECTRUM_COLUMNS = ("flux", "ivar", "mask")
STAGE_COLUMNS = {"autoencoder": SPECTRUM_COLUMNS, "redshift": (*SPECTRUM_COLUMNS, "z")}


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


def load_split(
    data_dir: str | os.PathLike,
    split: str,
    columns: Sequence[str] = SPECTRUM_COLUMNS,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """One split as a `datasets.Dataset` holding only `columns`, formatted as torch tensors."""
    files = split_files(data_dir, split)
    dataset = datasets.load_dataset("parquet", data_files={split: files}, split=split, cache_dir=cache_dir)
    missing = [name for name in columns if name not in dataset.column_names]
    if missing:
        raise ValueError(f"{Path(data_dir) / split}: Parquet shards lack column(s) {missing}")
    dataset = dataset.select_columns(list(columns))
    return dataset.with_format("torch")


def filter_redshift_range(
    dataset: datasets.Dataset, z_min: float, z_max: float
) -> tuple[datasets.Dataset, int]:
    """Keep rows with `z_min <= z <= z_max`; return the kept rows and how many were dropped."""

    def in_range(z: torch.Tensor) -> torch.Tensor:  # z: [rows]
        return (z >= z_min) & (z <= z_max)

    kept = dataset.filter(in_range, input_columns="z", batched=True, desc=f"z in [{z_min}, {z_max}]")
    return kept, len(dataset) - len(kept)


def first_rows(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    """The first `limit` rows (all of them when `limit` is None or larger than the dataset)."""
    if limit is None or limit >= len(dataset):
        return dataset
    return dataset.select(range(limit))


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
    dataset: datasets.Dataset,
    stage: str,
    batch_size: int,
    train: bool,
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader over `dataset`; training shuffles with its own seeded generator and drops a ragged end.

    The own generator keeps the global torch RNG (dropout) untouched by data loading, so a resumed run
    draws the same dropout masks as an uninterrupted one.
    """
    generator = torch.Generator().manual_seed(seed) if train else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train and len(dataset) >= batch_size,
        collate_fn=SpectrumCollator(stage),
        num_workers=num_workers,
        generator=generator,
        persistent_workers=num_workers > 0,
    )


def load_training_data(
    data_dir: str | os.PathLike,
    stage: str,
    z_range: tuple[float, float] | None = None,
    max_train_spectra: int | None = None,
    max_val_spectra: int | None = None,
    cache_dir: str | None = None,
) -> dict[str, datasets.Dataset]:
    """The `train` and `validation` splits for `stage`, cut to `z_range` (stage 2) and to the row limits."""
    columns = STAGE_COLUMNS[stage]
    splits = {}
    for split, limit in (("train", max_train_spectra), ("validation", max_val_spectra)):
        dataset = load_split(data_dir, split, columns, cache_dir=cache_dir)
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
