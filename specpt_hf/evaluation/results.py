"""Evaluation results in the form a Hub model card needs (`model-index`), and the results JSON file.

The `model-index` is built with `huggingface_hub.EvalResult` and `eval_results_to_model_index`, so it
reads back with `huggingface_hub.ModelCardData` / `ModelCard` unchanged. Each target class contributes
one metric entry per metric (NMAD and η by default), told apart by `config` (the class) and `name`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from numbers import Number
from pathlib import Path
from typing import Any

import numpy as np
from huggingface_hub import EvalResult
from huggingface_hub.repocard_data import eval_results_to_model_index

from ..atomic import atomic_write_json
from .metrics import CATASTROPHIC_THRESHOLD

TASK_TYPE = "redshift-estimation"
TASK_NAME = "Redshift estimation"
METRIC_NAMES = {
    "nmad": "NMAD",
    "nmad_centred": "Centred NMAD",
    "eta": "Catastrophic fraction η",
    "bias": "Bias",
    "sigma68": "σ68",
}
CLASS_NAMES = {  # display names of the target classes
    "all": "all",
    "bgs": "BGS",
    "elg": "ELG",
    "lrg": "LRG",
    "qso": "QSO",
    "mws": "MWS",
    "other": "other",
}


def _per_group(results: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
    """Accept `{group: metrics}` or one flat metrics dict (taken as group "all")."""
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a non-empty mapping {group: {metric: value}} or {metric: value}")
    if all(not isinstance(value, Mapping) for value in results.values()):
        return {"all": results}
    bad = [key for key, value in results.items() if not isinstance(value, Mapping)]
    if bad:
        raise ValueError(f"results mixes groups and plain values; entries {bad} are not metric dicts")
    return results


def _usable(value: Any) -> bool:
    return isinstance(value, Number) and not isinstance(value, bool) and math.isfinite(float(value))


def _rounded(value: float, significant_digits: int | None) -> float:
    value = float(value)
    return float(f"{value:.{significant_digits}g}") if significant_digits else value


def eval_results(
    results: Mapping[str, Any],
    dataset_name: str,
    dataset_type: str,
    *,
    dataset_config: str | None = None,
    dataset_split: str | None = "test",
    dataset_revision: str | None = None,
    metrics: Sequence[str] = ("nmad", "nmad_centred", "eta"),
    catastrophic_threshold: float = CATASTROPHIC_THRESHOLD,
    significant_digits: int | None = 4,
    source_name: str | None = None,
    source_url: str | None = None,
) -> list[EvalResult]:
    """One `huggingface_hub.EvalResult` per (group, metric).

    Args:
        results: `{group: redshift_metrics(...)}` (e.g. from `metrics_by_group(..., overall_key="all")`)
            or a single metrics dict. Groups with ``n == 0`` and NaN values are left out.
        dataset_name / dataset_type: pretty name and Hub id (or local name) of the evaluation data.
        metrics: which keys of each metrics dict to report.
        significant_digits: rounding of the reported values (None keeps them exact).
    """
    unknown = [name for name in metrics if name not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"metrics {unknown} are not reportable; choose from {sorted(METRIC_NAMES)}")
    out = []
    for group, values in _per_group(results).items():
        if values.get("n", 1) == 0:
            continue
        label = CLASS_NAMES.get(str(group).lower(), str(group))
        for metric in metrics:
            if not _usable(values.get(metric)):
                continue
            out.append(
                EvalResult(
                    task_type=TASK_TYPE,
                    task_name=TASK_NAME,
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    dataset_config=dataset_config,
                    dataset_split=dataset_split,
                    dataset_revision=dataset_revision,
                    metric_type=metric,
                    metric_value=_rounded(values[metric], significant_digits),
                    metric_name=f"{METRIC_NAMES[metric]} ({label})",
                    metric_config=str(group),
                    metric_args={"threshold": float(catastrophic_threshold)} if metric == "eta" else None,
                    source_name=source_name,
                    source_url=source_url,
                )
            )
    return out


def model_index(
    results: Mapping[str, Any],
    model_name: str,
    dataset_name: str,
    dataset_type: str,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """The `model-index` list of a model card's YAML front matter (keyword arguments as `eval_results`)."""
    entries = eval_results(results, dataset_name, dataset_type, **kwargs)
    if not entries:
        raise ValueError("results hold no finite metric values to report")
    return eval_results_to_model_index(model_name, entries)


def _json_safe(value: Any) -> Any:
    """Numpy values to Python ones and NaN/inf to None, recursively, so the JSON is strict."""
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results_json(
    path: str | os.PathLike,
    results: Mapping[str, Any],
    model_name: str,
    dataset_name: str,
    dataset_type: str,
    *,
    extra: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Path:
    """Write the evaluation results and their `model-index` to a JSON file, atomically.

    The file holds ``model_name``, ``dataset``, ``task``, ``catastrophic_threshold``, ``metrics`` (the
    full-precision `results`, NaN written as null), ``model-index`` and the entries of `extra` (for example
    per-bin metrics or completeness/purity curves). Keyword arguments go to `eval_results`.
    """
    index = model_index(results, model_name, dataset_name, dataset_type, **kwargs)
    payload = {
        "model_name": model_name,
        "task": {"type": TASK_TYPE, "name": TASK_NAME},
        "dataset": index[0]["results"][0]["dataset"],
        "catastrophic_threshold": float(kwargs.get("catastrophic_threshold", CATASTROPHIC_THRESHOLD)),
        "metrics": _json_safe(_per_group(results)),
        "model-index": index,
    }
    clash = set(extra or {}) & set(payload)
    if clash:
        raise ValueError(f"extra must not redefine {sorted(clash)}")
    payload.update(_json_safe(dict(extra or {})))
    return atomic_write_json(path, payload, ensure_ascii=False, allow_nan=False)


def read_results_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by `write_results_json`; ValueError naming the file when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict) or "model-index" not in data or "metrics" not in data:
        raise ValueError(f"{path}: not an evaluation results file (no 'model-index' or 'metrics')")
    return data
