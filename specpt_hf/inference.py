"""Batched redshift prediction: spectrum records or dataset batches in, one row of estimates per spectrum out.

>>> from specpt_hf.data import read_desi_spectra
>>> from specpt_hf.inference import predict_records
>>> columns = predict_records(model, read_desi_spectra("coadd-sv3-dark-26065.fits"))
>>> columns["z_pred"], columns["zerr_pred"], columns["quality"]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

import numpy as np
import torch

from .modeling_specpt import SpecPTForRedshift

# record fields carried from the input to each prediction row when present
PASSTHROUGH_FIELDS = ("targetid", "z", "target_class", "spectype", "survey", "program", "healpix")


def batched(records: Iterable[Mapping[str, Any]], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Group spectrum records into batches: a dict of arrays, one leading row per record."""
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    iterator = iter(records)
    while chunk := list(islice(iterator, batch_size)):
        keys = [key for key in chunk[0] if key in {"flux", "ivar", "mask", *PASSTHROUGH_FIELDS}]
        yield {key: np.stack([np.asarray(record[key]) for record in chunk]) for key in keys}


@torch.inference_mode()
def predict_batch(model: SpecPTForRedshift, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Run `model` on one batch (`flux`, optional `ivar` and `mask`, [batch, pixels]) and return numpy columns
    `z_pred`, `zerr_pred`, `quality` (NaN where the head gives no uncertainty) plus the passthrough fields."""
    device = model.device

    def tensor(name: str, dtype: torch.dtype) -> torch.Tensor | None:
        value = batch.get(name)
        return None if value is None else torch.as_tensor(np.asarray(value), dtype=dtype, device=device)

    output = model(
        flux=tensor("flux", torch.float32),
        ivar=tensor("ivar", torch.float32),
        mask=tensor("mask", torch.bool),
    )
    n = output.redshift.shape[0]
    nan = torch.full((n,), float("nan"))
    columns = {
        "z_pred": output.redshift.float().cpu().numpy(),
        "zerr_pred": (output.redshift_err if output.redshift_err is not None else nan).float().cpu().numpy(),
        "quality": (output.quality if output.quality is not None else nan).float().cpu().numpy(),
    }
    columns.update({key: np.asarray(batch[key]) for key in PASSTHROUGH_FIELDS if key in batch})
    return columns


def predict_batches(model: SpecPTForRedshift, batches: Iterable[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Predict every batch and concatenate the columns."""
    model.eval()
    parts = [predict_batch(model, batch) for batch in batches]
    if not parts:
        raise ValueError("no spectra to predict")
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def predict_records(
    model: SpecPTForRedshift, records: Iterable[Mapping[str, Any]], batch_size: int = 64
) -> dict[str, np.ndarray]:
    """Predict spectrum records (e.g. from `read_desi_spectra`), `batch_size` at a time."""
    return predict_batches(model, batched(records, batch_size))
