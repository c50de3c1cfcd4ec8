"""Redshift evaluation: metrics (plain functions and an `evaluate` module), plots and model-card results."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .metrics import (
    CATASTROPHIC_THRESHOLD,
    NMAD_SCALE,
    bias,
    catastrophic,
    catastrophic_fraction,
    completeness_purity,
    metrics_by_group,
    metrics_by_redshift_bin,
    nmad,
    nmad_centred,
    pdf_coverage,
    pulls,
    redshift_errors,
    redshift_metrics,
    sigma68,
    uncertainty_calibration,
)
from .plots import (
    class_colors,
    plot_completeness_purity,
    plot_error_histogram,
    plot_metrics_vs_redshift,
    plot_pit_histogram,
    plot_pull_distribution,
    plot_reconstructions,
    plot_redshift_comparison,
    plot_redshift_pdf,
    save_figure,
)
from .results import eval_results, model_index, read_results_json, write_results_json

if TYPE_CHECKING:
    import evaluate

METRIC_MODULE_PATH = Path(__file__).resolve().with_name("redshift_metrics")


def load_metric(**kwargs: Any) -> evaluate.EvaluationModule:
    """The packaged `evaluate` module: ``evaluate.load(<.../evaluation/redshift_metrics>, **kwargs)``.

    Loads from the installed package, so it needs no network (works with ``HF_EVALUATE_OFFLINE=1``).
    """
    import evaluate

    return evaluate.load(str(METRIC_MODULE_PATH), **kwargs)


__all__ = [
    "CATASTROPHIC_THRESHOLD",
    "METRIC_MODULE_PATH",
    "NMAD_SCALE",
    "bias",
    "catastrophic",
    "catastrophic_fraction",
    "class_colors",
    "completeness_purity",
    "eval_results",
    "load_metric",
    "metrics_by_group",
    "metrics_by_redshift_bin",
    "model_index",
    "nmad",
    "nmad_centred",
    "pdf_coverage",
    "plot_completeness_purity",
    "plot_redshift_pdf",
    "plot_error_histogram",
    "plot_metrics_vs_redshift",
    "plot_pit_histogram",
    "plot_pull_distribution",
    "plot_reconstructions",
    "plot_redshift_comparison",
    "pulls",
    "read_results_json",
    "redshift_errors",
    "redshift_metrics",
    "save_figure",
    "sigma68",
    "uncertainty_calibration",
    "write_results_json",
]
