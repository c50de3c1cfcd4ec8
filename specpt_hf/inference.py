"""Batched redshift prediction: spectrum records or dataset batches in, one row of estimates per spectrum out.

>>> from specpt_hf.data import read_desi_spectra
>>> from specpt_hf.inference import predict_records
>>> columns = predict_records(model, read_desi_spectra("coadd-sv3-dark-26065.fits"))
>>> columns["z_pred"], columns["zerr_pred"], columns["quality"], columns["zwarn"]

Spectra without any usable pixel (all masked, ivar 0, or NaN) cannot be predicted: they are left out of the
output (with their passthrough fields, so rows stay aligned), counted in `InferenceStats.skipped` and logged.
The model and the flags are those of `specpt_hf.pipeline_specpt.predict_spectra`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np

from .modeling_specpt import SpecPTForRedshift, SpecPTForSpectrumReconstruction
from .pipeline_specpt import FlagThresholds, predict_spectra

logger = logging.getLogger(__name__)

# record fields carried from the input to each prediction row when present
PASSTHROUGH_FIELDS = ("targetid", "z", "target_class", "spectype", "survey", "program", "healpix")
# prediction columns: name in the output <- name in `predict_spectra`
PREDICTION_COLUMNS = {
    "z_pred": "z",
    "zerr_pred": "zerr",
    "quality": "quality",
    "zwarn": "zwarn",
    "npixels": "npixels",
    "z_net": "z_net",
    "zerr_net": "zerr_net",
}
# with template refinement also
REFINEMENT_COLUMNS = ("chi2", "deltachi2", "spectype", "coeff", "npixels_fit")
PDF_COLUMNS = ("pz", "chi2_scan")  # [n, bins] and [n, trials], with `return_pdf`


@dataclass
class InferenceStats:
    """Counts kept while predicting; the functions below add to the object they are given."""

    spectra: int = 0  # predicted
    skipped: int = 0  # left out: no usable pixel
    batches: int = 0


def batched(records: Iterable[Mapping[str, Any]], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Group spectrum records into batches: a dict of arrays, one leading row per record."""
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    iterator = iter(records)
    while chunk := list(islice(iterator, batch_size)):
        keys = [key for key in chunk[0] if key in {"flux", "ivar", "mask", *PASSTHROUGH_FIELDS}]
        yield {key: np.stack([np.asarray(record[key]) for record in chunk]) for key in keys}


def predict_batch(
    model: SpecPTForRedshift,
    batch: Mapping[str, Any],
    *,
    autoencoder: SpecPTForSpectrumReconstruction | None = None,
    thresholds: FlagThresholds | None = None,
    stats: InferenceStats | None = None,
    return_pdf: bool = False,
) -> dict[str, np.ndarray]:
    """Run `model` on one batch (`flux`, optional `ivar` and `mask`, [batch, pixels] on the model's grid).

    Returns numpy columns for the spectra with a usable pixel: `z_pred`, `zerr_pred`, `quality` (NaN where the head
    gives none), `zwarn` (`SpecPTZwarn` bits), `npixels`, `z_net`, `zerr_net`, the `REFINEMENT_COLUMNS` when the
    model refines, `anomaly` (with an autoencoder), `pz` and `chi2_scan` (with `return_pdf`, see `predict_spectra`)
    and the passthrough fields present in `batch`.
    """
    ivar = batch.get("ivar")
    mask = batch.get("mask")
    result = predict_spectra(
        model,
        np.asarray(batch["flux"]),
        None if ivar is None else np.asarray(ivar),
        None if mask is None else np.asarray(mask, dtype=bool),
        autoencoder=autoencoder,
        thresholds=thresholds,
        return_pdf=return_pdf,
    )
    keep = result["npixels"] > 0
    columns = {name: result[key][keep] for name, key in PREDICTION_COLUMNS.items()}
    columns.update({key: result[key][keep] for key in (*REFINEMENT_COLUMNS, *PDF_COLUMNS) if key in result})
    if autoencoder is not None:
        columns["anomaly"] = result["anomaly"][keep]
    columns.update({key: np.asarray(batch[key])[keep] for key in PASSTHROUGH_FIELDS if key in batch})
    if stats is not None:
        stats.spectra += int(keep.sum())
        stats.skipped += int((~keep).sum())
        stats.batches += 1
    return columns


def predict_batches(
    model: SpecPTForRedshift,
    batches: Iterable[Mapping[str, Any]],
    *,
    autoencoder: SpecPTForSpectrumReconstruction | None = None,
    thresholds: FlagThresholds | None = None,
    stats: InferenceStats | None = None,
) -> dict[str, np.ndarray]:
    """Predict every batch and concatenate the columns; spectra without usable pixels are skipped and logged.

    Raises:
        ValueError: when no spectrum at all could be predicted.
    """
    model.eval()
    if autoencoder is not None:
        autoencoder.eval()
    stats = stats if stats is not None else InferenceStats()
    skipped_before = stats.skipped
    parts = [
        predict_batch(model, batch, autoencoder=autoencoder, thresholds=thresholds, stats=stats)
        for batch in batches
    ]
    skipped = stats.skipped - skipped_before
    if skipped:
        logger.warning("skipped %d spectra without any usable pixel (all masked or ivar 0)", skipped)
    parts = [part for part in parts if len(part["z_pred"])]
    if not parts:
        raise ValueError(f"no spectra to predict ({skipped} without any usable pixel)")
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def predict_records(
    model: SpecPTForRedshift,
    records: Iterable[Mapping[str, Any]],
    batch_size: int = 64,
    **kwargs: Any,
) -> dict[str, np.ndarray]:
    """Predict spectrum records (e.g. from `read_desi_spectra`), `batch_size` at a time; `kwargs` as for
    `predict_batches` (`autoencoder`, `thresholds`, `stats`)."""
    return predict_batches(model, batched(records, batch_size), **kwargs)
