"""Fine-tuning and evaluation of the model built for an instrument, and a small pretrained start on DESI-like
mocks (quick runs without a released checkpoint).

Training is `specpt train`'s Accelerate loop (`specpt_hf.training.training_function`, stage 2) run on the model
built by `adapt_to_instrument`: `finetune` checks the data grid and has the loop write its model folders with `write_finetuned`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from ..data.instrument import DESI
from ..evaluation.metrics import metrics_by_group
from ..prediction import predict_dataset
from ..training.data import filter_redshift_range, first_rows, load_split
from ..training.settings import TrainingSettings
from ..training.train import TrainingResult, training_function
from .adapt import AdaptationReport, merge_lora, redshift_config, write_finetuned
from .mock_dataset import check_data_grid, write_instrument_dataset


def finetune(
    model: nn.Module, settings: TrainingSettings, report: AdaptationReport | None = None
) -> TrainingResult:
    """Train `model` (from `adapt_to_instrument`) with `specpt train`'s loop, stage 2 (`training_function`), on
    `settings.data_dir` (checked against the model's grid); the folders `model/` and `best/` of
    `settings.output_dir` are written by `write_finetuned` (a LoRA model merged, its adapter alongside, `report`
    as `adaptation.json`).

    Spectra outside the model's redshift range are dropped, as `specpt train` does."""
    if settings.stage != "redshift":
        raise ValueError(
            f"fine-tuning trains a redshift model: setting 'stage' must be 'redshift', not {settings.stage!r}"
        )
    check_data_grid(settings.data_dir, redshift_config(model))
    return training_function(settings, model, functools.partial(write_finetuned, report=report))


@dataclass
class SplitEvaluation:
    """Predictions on one split and their metrics (`metrics["all"]` and per target class)."""

    z_pred: np.ndarray
    z_true: np.ndarray
    target_class: np.ndarray
    metrics: dict[str, dict[str, float | int]]
    dropped_out_of_range: int


def evaluate_redshifts(
    model: nn.Module,
    data_dir: str | os.PathLike,
    split: str = "test",
    batch_size: int = 64,
    max_spectra: int | None = None,
    progress: bool = False,
) -> SplitEvaluation:
    """NMAD, eta, bias, sigma68 of `model` on a split of `data_dir`, overall and per target class (spectra outside
    the model's redshift range are left out and counted)."""
    config = redshift_config(model)
    check_data_grid(data_dir, config)
    columns = ("flux", "ivar", "mask", "z", "target_class")
    dataset = load_split(data_dir, split, columns)
    dataset, dropped = filter_redshift_range(dataset, config.z_min, config.z_max)
    dataset = first_rows(dataset, max_spectra)
    if len(dataset) == 0:
        raise ValueError(f"{Path(data_dir) / split}: no spectra within the model's redshift range")
    plain = merge_lora(model)
    was_training = plain.training
    predicted = predict_dataset(plain, dataset, batch_size, desc=f"evaluate {split}", progress=progress)
    plain.train(was_training)
    pred, true, labels = predicted["z_pred"], predicted["z"], predicted["target_class"].astype(str)
    metrics = metrics_by_group(pred, true, labels, overall_key="all")
    return SplitEvaluation(pred, true, labels, metrics, dropped)


def pretrain_mock_autoencoder(
    out_dir: str | os.PathLike,
    *,
    preset: str = "specpt-tiny",
    n_train: int = 256,
    n_val: int = 32,
    max_steps: int = 50,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Pretrain a SpecPT autoencoder (stage 1 of `specpt train`) on DESI-like mocks; return its model folder.

    Writes `{out_dir}/data` (DESI-grid Parquet shards of all four classes) and `{out_dir}/run`."""
    out = Path(out_dir)
    data = out / "data"
    write_instrument_dataset(
        data,
        DESI,
        None,
        {"train": n_train, "validation": n_val},
        seed=seed,
        overwrite=True,
        progress=progress,
    )
    settings = TrainingSettings(
        stage="autoencoder",
        preset=preset,
        data_dir=str(data),
        output_dir=str(out / "run"),
        max_steps=max_steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=max(1, max_steps // 10),
        eval_steps=max_steps,
        logging_steps=max(1, max_steps // 5),
        report_to="none",
        seed=seed,
    )
    return training_function(settings).model_dir
