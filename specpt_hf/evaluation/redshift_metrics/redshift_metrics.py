"""Spectroscopic redshift metrics (NMAD, catastrophic fraction, bias, σ68) as an `evaluate` module.

The maths lives in `specpt_hf.evaluation.metrics`; this module wraps it so that
``evaluate.load(<path to this folder>)`` works, offline, wherever `specpt_hf` is installed.
"""

import datasets
import evaluate
import numpy as np

from specpt_hf.evaluation.metrics import (
    CATASTROPHIC_THRESHOLD,
    completeness_purity,
    metrics_by_group,
    metrics_by_redshift_bin,
    redshift_metrics,
)

_CITATION = """\
@misc{pattnaik2025specpt,
  title         = {SpecPT (Spectroscopy Pre-trained Transformer) Model for Extragalactic Spectroscopy:
                   I. Architecture and Automated Redshift Measurement},
  author        = {Pattnaik, Rohan and Kartaltepe, Jeyhan S. and Binu, Clive},
  year          = {2025},
  eprint        = {2501.01070},
  archivePrefix = {arXiv},
  primaryClass  = {astro-ph.GA},
  url           = {https://arxiv.org/abs/2501.01070}
}
"""

_DESCRIPTION = """\
Accuracy of spectroscopic redshifts, measured on the normalised error dz = (z_pred - z_true) / (1 + z_true):

- NMAD = 1.48 * median(|dz|), the normalised median absolute deviation (as in the SpecPT paper);
- centred NMAD = 1.48 * median(|dz - median(dz)|), the definition most photo-z and spec-z papers quote;
- eta, the catastrophic fraction: the share of objects with |dz| > 0.15;
- bias = median(dz);
- sigma68, half the width of the 16-84 percentile interval of dz.

Optionally per group (e.g. DESI target class BGS / ELG / LRG / QSO), per bin of true redshift, and as
completeness / purity of the sample kept by a cut on a per-object score (a quality flag or an uncertainty).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): predicted redshifts.
    references (`list` of `float`): true redshifts (1 + z must be positive).
    scores (`list` of `float`, *optional*): a per-object score to cut on (the model's quality flag, or its
        redshift uncertainty with `higher_is_better=False`). Adds `completeness_purity` to the output.
    thresholds (`list` of `float`, *optional*): the cuts on `scores`; by default 51 quantiles of `scores`.
    higher_is_better (`bool`, defaults to `True`): keep objects with `score >= cut` (True) or `<= cut`.
    groups (`list` of `str`, *optional*): a label per object (target class). Adds `by_group`.
    redshift_bins (`list` of `float`, *optional*): bin edges in true redshift. Adds `by_redshift_bin`.
    catastrophic_threshold (`float`, defaults to 0.15): |dz| above which an object is catastrophic.

Returns:
    n (`int`): number of objects.
    n_catastrophic (`int`): number of catastrophic objects.
    nmad (`float`): 1.48 * median(|dz|).
    nmad_centred (`float`): 1.48 * median(|dz - median(dz)|).
    eta (`float`): catastrophic fraction, in [0, 1].
    bias (`float`): median(dz).
    sigma68 (`float`): half the 16-84 percentile width of dz.
    by_group (`dict`, with `groups`): the same metrics per group label.
    by_redshift_bin (`list`, with `redshift_bins`): the same metrics per bin, with `z_min`, `z_max`, `z_center`.
    completeness_purity (`dict`, with `scores`): lists `threshold`, `completeness`, `purity`, `n_kept`.
    Empty inputs give NaN metrics with n = 0.

Examples:
    >>> from specpt_hf.evaluation import load_metric
    >>> metric = load_metric()
    >>> results = metric.compute(
    ...     predictions=[0.101, 0.5, 1.2, 0.702],
    ...     references=[0.1, 0.5, 0.6, 0.7],
    ...     groups=["bgs", "bgs", "elg", "elg"],
    ...     scores=[0.9, 0.8, 0.1, 0.7],
    ...     thresholds=[0.0, 0.5],
    ... )
    >>> results["n"], results["n_catastrophic"], round(results["nmad"], 6), results["eta"]
    (4, 1, 0.001543, 0.25)
    >>> results["by_group"]["elg"]["eta"]
    0.5
    >>> results["completeness_purity"]["completeness"], results["completeness_purity"]["purity"]
    ([1.0, 0.75], [0.75, 1.0])
"""


def _to_python(value):
    """Numpy arrays and scalars to plain lists / Python numbers, recursively."""
    if isinstance(value, dict):
        return {key: _to_python(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_to_python(item) for item in value]
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    return value


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RedshiftMetrics(evaluate.Metric):
    """NMAD (plain and centred), catastrophic fraction, bias and σ68 of predicted redshifts."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
            reference_urls=["https://arxiv.org/abs/2501.01070"],
        )

    def _compute(
        self,
        predictions,
        references,
        scores=None,
        thresholds=None,
        higher_is_better: bool = True,
        groups=None,
        redshift_bins=None,
        catastrophic_threshold: float = CATASTROPHIC_THRESHOLD,
    ) -> dict:
        z_pred = np.asarray(predictions, dtype=np.float64)
        z_true = np.asarray(references, dtype=np.float64)
        kwargs = {"catastrophic_threshold": catastrophic_threshold}
        results: dict = redshift_metrics(z_pred, z_true, **kwargs)
        if groups is not None:
            results["by_group"] = metrics_by_group(z_pred, z_true, groups, **kwargs)
        if redshift_bins is not None:
            results["by_redshift_bin"] = metrics_by_redshift_bin(z_pred, z_true, redshift_bins, **kwargs)
        if scores is not None:
            results["completeness_purity"] = completeness_purity(
                z_pred, z_true, scores, thresholds, higher_is_better=higher_is_better, **kwargs
            )
        return _to_python(results)
