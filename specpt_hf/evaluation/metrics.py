"""Redshift metrics as plain numpy functions.

All metrics work on the normalised error Δz/(1+z) = (z_pred − z_true) / (1 + z_true):

- NMAD = 1.48 · median(|Δz|/(1+z)) (the SpecPT paper's definition, not centred on the median),
- centred NMAD = 1.48 · median(|Δz/(1+z) − median(Δz/(1+z))|) (the usual photo-z / spec-z definition, blind to
  a constant bias),
- η, the catastrophic fraction: share of objects with |Δz|/(1+z) > 0.15,
- bias = median(Δz/(1+z)),
- σ68 = half the width of the 16–84 percentile interval of Δz/(1+z).

For p(z)s: the coverage of central intervals from the PITs (the p(z) mass below each truth,
`specpt_hf.prediction.pdf_integral_transform`), which calibrated p(z)s give at their nominal levels.

Every function validates its inputs (1-D, equal lengths, finite, 1 + z_true > 0) and raises a ValueError
naming the offending argument. Empty inputs give NaN metrics with ``n = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

NMAD_SCALE = 1.48
CATASTROPHIC_THRESHOLD = 0.15
METRIC_KEYS = ("n", "n_catastrophic", "nmad", "nmad_centred", "eta", "bias", "sigma68")


def _as_1d(values: npt.ArrayLike, name: str) -> np.ndarray:
    """Return `values` as a finite float64 1-D array, or raise a ValueError naming `name`."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be numeric, got {type(values).__name__}: {error}") from None
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    bad = ~np.isfinite(array)
    if bad.any():
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite values (NaN or inf), first at index {int(np.argmax(bad))}"
        )
    return array


def _check_length(array: np.ndarray, name: str, n: int) -> None:
    if len(array) != n:
        raise ValueError(f"{name} has length {len(array)}, expected {n} (the length of z_true)")


def _validate(z_pred: npt.ArrayLike, z_true: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate a pair of redshift arrays; z_true must satisfy 1 + z_true > 0."""
    z_true = _as_1d(z_true, "z_true")
    z_pred = _as_1d(z_pred, "z_pred")
    _check_length(z_pred, "z_pred", len(z_true))
    bad = z_true <= -1.0
    if bad.any():
        raise ValueError(f"z_true must satisfy 1 + z_true > 0; {int(bad.sum())} values have z_true <= -1")
    return z_pred, z_true


def _check_threshold(threshold: float, name: str) -> float:
    threshold = float(threshold)
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"{name} must be a positive number, got {threshold}")
    return threshold


def _labels(groups: npt.ArrayLike, n: int) -> np.ndarray:
    """Group labels as a 1-D array of strings of length n."""
    labels = np.asarray(groups)
    if labels.ndim != 1:
        raise ValueError(f"groups must be 1-D, got shape {labels.shape}")
    _check_length(labels, "groups", n)
    return labels.astype(str)


def redshift_errors(z_pred: npt.ArrayLike, z_true: npt.ArrayLike) -> np.ndarray:
    """Normalised redshift errors Δz/(1+z_true) = (z_pred − z_true) / (1 + z_true), float64 [n]."""
    z_pred, z_true = _validate(z_pred, z_true)
    return (z_pred - z_true) / (1.0 + z_true)


def _nmad(dz: np.ndarray) -> float:
    return float(NMAD_SCALE * np.median(np.abs(dz))) if dz.size else math.nan


def _nmad_centred(dz: np.ndarray) -> float:
    return float(NMAD_SCALE * np.median(np.abs(dz - np.median(dz)))) if dz.size else math.nan


def _eta(dz: np.ndarray, threshold: float) -> float:
    return float(np.mean(np.abs(dz) > threshold)) if dz.size else math.nan


def _bias(dz: np.ndarray) -> float:
    return float(np.median(dz)) if dz.size else math.nan


def _sigma68(dz: np.ndarray) -> float:
    if not dz.size:
        return math.nan
    p16, p84 = np.percentile(dz, [16.0, 84.0])
    return float(0.5 * (p84 - p16))


def _summary(dz: np.ndarray, threshold: float) -> dict[str, float | int]:
    return {
        "n": int(dz.size),
        "n_catastrophic": int(np.sum(np.abs(dz) > threshold)),
        "nmad": _nmad(dz),
        "nmad_centred": _nmad_centred(dz),
        "eta": _eta(dz, threshold),
        "bias": _bias(dz),
        "sigma68": _sigma68(dz),
    }


def nmad(z_pred: npt.ArrayLike, z_true: npt.ArrayLike) -> float:
    """Normalised median absolute deviation, 1.48 · median(|Δz|/(1+z_true)); NaN when empty."""
    return _nmad(redshift_errors(z_pred, z_true))


def nmad_centred(z_pred: npt.ArrayLike, z_true: npt.ArrayLike) -> float:
    """NMAD about the median error, 1.48 · median(|Δz/(1+z) − median(Δz/(1+z))|); NaN when empty."""
    return _nmad_centred(redshift_errors(z_pred, z_true))


def catastrophic(
    z_pred: npt.ArrayLike, z_true: npt.ArrayLike, threshold: float = CATASTROPHIC_THRESHOLD
) -> np.ndarray:
    """Per object, whether it is a catastrophic failure: |Δz|/(1+z_true) > `threshold` (strictly), bool [n]."""
    threshold = _check_threshold(threshold, "threshold")
    return np.abs(redshift_errors(z_pred, z_true)) > threshold


def catastrophic_fraction(
    z_pred: npt.ArrayLike, z_true: npt.ArrayLike, threshold: float = CATASTROPHIC_THRESHOLD
) -> float:
    """η: fraction of objects with |Δz|/(1+z_true) > `threshold` (strictly); NaN when empty."""
    threshold = _check_threshold(threshold, "threshold")
    return _eta(redshift_errors(z_pred, z_true), threshold)


def bias(z_pred: npt.ArrayLike, z_true: npt.ArrayLike) -> float:
    """Median of Δz/(1+z_true); NaN when empty."""
    return _bias(redshift_errors(z_pred, z_true))


def sigma68(z_pred: npt.ArrayLike, z_true: npt.ArrayLike) -> float:
    """Half the width of the 16–84 percentile interval of Δz/(1+z_true); NaN when empty."""
    return _sigma68(redshift_errors(z_pred, z_true))


def redshift_metrics(
    z_pred: npt.ArrayLike,
    z_true: npt.ArrayLike,
    *,
    catastrophic_threshold: float = CATASTROPHIC_THRESHOLD,
) -> dict[str, float | int]:
    """All summary metrics at once.

    Returns:
        `{"n", "n_catastrophic", "nmad", "nmad_centred", "eta", "bias", "sigma68"}`; `eta` is the catastrophic
        fraction.
    """
    threshold = _check_threshold(catastrophic_threshold, "catastrophic_threshold")
    return _summary(redshift_errors(z_pred, z_true), threshold)


def metrics_by_group(
    z_pred: npt.ArrayLike,
    z_true: npt.ArrayLike,
    groups: npt.ArrayLike,
    *,
    catastrophic_threshold: float = CATASTROPHIC_THRESHOLD,
    overall_key: str | None = None,
) -> dict[str, dict[str, float | int]]:
    """`redshift_metrics` per group (e.g. target class), keyed by the group label as a string.

    Groups come out sorted by label. With `overall_key` (e.g. ``"all"``) the metrics of the whole sample
    come first under that key.
    """
    threshold = _check_threshold(catastrophic_threshold, "catastrophic_threshold")
    dz = redshift_errors(z_pred, z_true)
    labels = _labels(groups, len(dz))
    names = sorted(set(labels.tolist()))
    if overall_key is not None and overall_key in names:
        raise ValueError(f"overall_key {overall_key!r} is also a label in groups; choose another overall_key")
    out: dict[str, dict[str, float | int]] = {}
    if overall_key is not None:
        out[overall_key] = _summary(dz, threshold)
    for name in names:
        out[name] = _summary(dz[labels == name], threshold)
    return out


def metrics_by_redshift_bin(
    z_pred: npt.ArrayLike,
    z_true: npt.ArrayLike,
    edges: Sequence[float] | npt.ArrayLike,
    *,
    catastrophic_threshold: float = CATASTROPHIC_THRESHOLD,
) -> list[dict[str, float | int]]:
    """`redshift_metrics` in bins of true redshift.

    Bins are ``[edges[i], edges[i+1])``, the last one closed; objects outside the edges are left out.
    Each entry holds ``z_min``, ``z_max``, ``z_center`` and the metrics (NaN with ``n = 0`` for empty bins).
    """
    threshold = _check_threshold(catastrophic_threshold, "catastrophic_threshold")
    dz = redshift_errors(z_pred, z_true)
    z_true = np.asarray(z_true, dtype=np.float64)
    edges = _as_1d(edges, "edges")
    if len(edges) < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"edges must hold at least two strictly increasing values, got {edges.tolist()}")
    index = np.searchsorted(edges, z_true, side="right") - 1  # [n], bin of each object
    index[z_true == edges[-1]] = len(edges) - 2
    out = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        entry: dict[str, float | int] = {
            "z_min": float(lo),
            "z_max": float(hi),
            "z_center": float(0.5 * (lo + hi)),
        }
        entry.update(_summary(dz[index == i], threshold))
        out.append(entry)
    return out


def completeness_purity(
    z_pred: npt.ArrayLike,
    z_true: npt.ArrayLike,
    score: npt.ArrayLike,
    thresholds: npt.ArrayLike | None = None,
    *,
    higher_is_better: bool = True,
    catastrophic_threshold: float = CATASTROPHIC_THRESHOLD,
) -> dict[str, np.ndarray]:
    """Completeness and purity of the sample kept by a cut on a per-object score.

    An object is kept when ``score >= t`` (`higher_is_better`, e.g. a quality flag) or ``score <= t``
    (otherwise, e.g. the redshift uncertainty). Completeness is the fraction of all objects kept; purity is
    the fraction of kept objects that are not catastrophic (NaN when none is kept).

    Args:
        thresholds: cuts to evaluate; by default 51 quantiles of `score` (duplicates dropped).

    Returns:
        ``{"threshold", "completeness", "purity", "n_kept"}``, arrays of the length of `thresholds`.
    """
    threshold = _check_threshold(catastrophic_threshold, "catastrophic_threshold")
    dz = redshift_errors(z_pred, z_true)
    score = _as_1d(score, "score")
    _check_length(score, "score", len(dz))
    if thresholds is None:
        cuts = np.unique(np.quantile(score, np.linspace(0.0, 1.0, 51))) if score.size else np.empty(0)
    else:
        cuts = _as_1d(np.atleast_1d(thresholds), "thresholds")
    good = np.abs(dz) <= threshold  # [n]
    kept = score[None, :] >= cuts[:, None] if higher_is_better else score[None, :] <= cuts[:, None]  # [t, n]
    n_kept = kept.sum(axis=1)
    n_good = (kept & good[None, :]).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        completeness = n_kept / len(dz)  # NaN when there are no objects
        purity = np.where(n_kept > 0, n_good / np.maximum(n_kept, 1), np.nan)
    return {
        "threshold": cuts,
        "completeness": completeness.astype(np.float64),
        "purity": purity.astype(np.float64),
        "n_kept": n_kept.astype(np.int64),
    }


def pulls(z_pred: npt.ArrayLike, z_true: npt.ArrayLike, z_err: npt.ArrayLike) -> np.ndarray:
    """Pulls (z_pred − z_true) / z_err, float64 [n]; `z_err` must be positive."""
    z_pred, z_true = _validate(z_pred, z_true)
    z_err = _as_1d(z_err, "z_err")
    _check_length(z_err, "z_err", len(z_true))
    bad = z_err <= 0
    if bad.any():
        raise ValueError(f"z_err must be positive; {int(bad.sum())} values are <= 0")
    return (z_pred - z_true) / z_err


def uncertainty_calibration(
    z_pred: npt.ArrayLike, z_true: npt.ArrayLike, z_err: npt.ArrayLike
) -> dict[str, float | int]:
    """How well `z_err` describes the actual errors, from the pull distribution.

    For calibrated Gaussian uncertainties the pulls follow N(0, 1): 68.3 % fall within 1σ and 95.4 % within
    2σ, with median 0 and σ68 of 1.

    Returns:
        ``{"n", "pull_median", "pull_sigma68", "within_1sigma", "within_2sigma"}`` (NaN when empty).
    """
    pull = pulls(z_pred, z_true, z_err)
    if not pull.size:
        nan = math.nan
        return {"n": 0, "pull_median": nan, "pull_sigma68": nan, "within_1sigma": nan, "within_2sigma": nan}
    return {
        "n": int(pull.size),
        "pull_median": float(np.median(pull)),
        "pull_sigma68": _sigma68(pull),
        "within_1sigma": float(np.mean(np.abs(pull) <= 1.0)),
        "within_2sigma": float(np.mean(np.abs(pull) <= 2.0)),
    }


def pdf_coverage(pit: npt.ArrayLike, levels: Sequence[float] = (0.68, 0.95)) -> dict[str, float]:
    """{f"{level:g}": share of truths inside the central `level` interval of their p(z)} from PITs (calibrated
    p(z)s: each share equals its level; below it, the p(z)s are too narrow or in the wrong place)."""
    pit = _as_1d(pit, "pit")
    return {
        f"{level:g}": float(np.mean(np.abs(pit - 0.5) <= level / 2)) if pit.size else math.nan
        for level in levels
    }
