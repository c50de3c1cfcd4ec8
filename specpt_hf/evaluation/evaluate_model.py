"""`specpt evaluate`: run a redshift model over a held-out split, then write metrics, plots and results.

    specpt evaluate --model runs/redshift/best --data data/parquet --out report/evaluation \
        [--autoencoder runs/autoencoder/model]

Writes to `--out`: `results.json` (metrics per class and per redshift bin, completeness / purity, uncertainty
calibration, the p(z)'s interval coverage, `model-index` for the model card), `predictions.csv` (with each p(z)'s
PIT), and the PNG plots.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel

from ..atomic import atomic_write, make_folder
from ..cli import add_debug_flag, run_reporting_errors
from ..modeling_specpt import SpecPTForRedshift, SpecPTForSpectrumReconstruction
from ..prediction import predict_dataset
from ..training.data import MissingColumnsError, ParquetSplit, load_split, stack
from . import metrics, plots
from .results import write_results_json

logger = logging.getLogger(__name__)

EVAL_COLUMNS = ("targetid", "flux", "ivar", "mask", "z", "target_class")
N_RECONSTRUCTIONS = 4


def check_model_type(model_dir: str | os.PathLike, cls: type[PreTrainedModel]) -> None:
    """ValueError naming `model_dir` unless its config.json is of `cls`'s model type (`from_pretrained` would
    otherwise build the missing parts, e.g. a redshift head, at random)."""
    model_type = PretrainedConfig.get_config_dict(str(model_dir))[0].get("model_type")
    expected = cls.config_class.model_type
    if model_type != expected:
        raise ValueError(
            f"{model_dir}: config.json has model_type {model_type!r}, a {cls.__name__} needs {expected!r}"
        )


def load_eval_split(data_dir: str | os.PathLike, split: str = "test") -> ParquetSplit:
    """The Parquet shards of `split` with the columns evaluation needs, read in place (`load_split`)."""
    try:
        return load_split(data_dir, split, EVAL_COLUMNS)
    except MissingColumnsError as error:
        raise ValueError(
            f"{Path(data_dir) / split}: Parquet shards lack column(s) {error.missing}"
        ) from error


def as_numpy(rows: dict[str, Any]) -> dict[str, np.ndarray]:
    """Stacked rows of a `ParquetSplit` (tensors, lists of text) as numpy arrays."""
    return {
        name: value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        for name, value in rows.items()
    }


def summarize(predictions: dict[str, np.ndarray]) -> dict[str, Any]:
    """Metrics of the predictions: per class (with "all"), per redshift bin, completeness / purity by quality,
    the calibration of the uncertainty and (with `pz_pit`) of p(z): the truths' shares in its central 68 % and
    95 % intervals per class."""
    z_pred, z_true = predictions["z_pred"], predictions["z"]
    classes = predictions["target_class"].astype(str)
    summary: dict[str, Any] = {
        "by_class": metrics.metrics_by_group(z_pred, z_true, classes, overall_key="all"),
        # the network's own redshifts (the same as by_class without template refinement)
        "by_class_network": metrics.metrics_by_group(
            predictions["z_net"], z_true, classes, overall_key="all"
        ),
        "by_redshift_bin": metrics.metrics_by_redshift_bin(
            z_pred, z_true, np.array([0, 0.3, 0.6, 1.0, 1.6, 4.0])
        ),
    }
    if np.isfinite(predictions["quality"]).all():
        cp = metrics.completeness_purity(z_pred, z_true, predictions["quality"], np.linspace(0, 0.95, 20))
        summary["completeness_purity"] = {key: np.asarray(value).tolist() for key, value in cp.items()}
    if np.isfinite(predictions["zerr_pred"]).all():
        summary["calibration"] = metrics.uncertainty_calibration(z_pred, z_true, predictions["zerr_pred"])
    if "pz_pit" in predictions:
        pit, known = predictions["pz_pit"], np.isfinite(predictions["pz_pit"])
        summary["pz_calibration"] = {
            name: metrics.pdf_coverage(pit[rows & known])
            for name, rows in [("all", known), *((c, classes == c) for c in np.unique(classes))]
        }
    return summary


def write_plots(predictions: dict[str, np.ndarray], out: Path, title: str) -> list[Path]:
    """The standard evaluation plots as PNGs in `out`."""
    z_pred, z_true = predictions["z_pred"], predictions["z"]
    groups = predictions["target_class"].astype(str)
    written = [
        plots.plot_redshift_comparison(
            z_pred, z_true, out / "redshift_comparison.png", groups=groups, title=title
        ),
        plots.plot_error_histogram(z_pred, z_true, out / "error_histogram.png", groups=groups, title=title),
        plots.plot_metrics_vs_redshift(
            z_pred, z_true, out / "metrics_vs_redshift.png", groups=groups, title=title
        ),
    ]
    if np.isfinite(predictions["zerr_pred"]).all():
        written.append(
            plots.plot_pull_distribution(
                z_pred,
                z_true,
                predictions["zerr_pred"],
                out / "pull_distribution.png",
                groups=groups,
                title=title,
            )
        )
    if "pz_pit" in predictions and np.isfinite(predictions["pz_pit"]).all():
        written.append(
            plots.plot_pit_histogram(predictions["pz_pit"], out / "pz_pit.png", groups=groups, title=title)
        )
    if np.isfinite(predictions["quality"]).all():
        written.append(
            plots.plot_completeness_purity(
                z_pred,
                z_true,
                predictions["quality"],
                out / "completeness_purity.png",
                groups=groups,
                title=title,
            )
        )
    return written


@torch.inference_mode()
def plot_reconstruction_examples(
    autoencoder: SpecPTForSpectrumReconstruction, dataset: ParquetSplit, path: Path
) -> Path:
    """Data, ivar-weighted model and residual for the first few spectra of each class present."""
    classes = dataset.read_column("target_class").astype(str)
    rows = [int(np.flatnonzero(classes == name)[0]) for name in sorted(set(classes))][:N_RECONSTRUCTIONS]
    picked = [dataset[row] for row in rows]
    batch = as_numpy({name: stack([row[name] for row in picked]) for name in dataset.columns})
    autoencoder.eval()
    output = autoencoder(
        flux=torch.as_tensor(batch["flux"]),
        ivar=torch.as_tensor(batch["ivar"]),
        mask=torch.as_tensor(batch["mask"]),
    )
    model_flux = (output.reconstruction * output.scale[:, None]).float().numpy()  # [examples, pixels]
    config = autoencoder.config
    wavelength = config.wavelength_start + config.wavelength_step * np.arange(config.num_pixels)
    labels = [
        f"{c.upper()} TARGETID {t}  z={z:.3f}"
        for c, t, z in zip(classes[rows], batch["targetid"], batch["z"], strict=True)
    ]
    return plots.plot_reconstructions(
        wavelength, batch["flux"], batch["ivar"], model_flux, path, mask=batch["mask"], labels=labels
    )


def evaluate_model(
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    split: str = "test",
    autoencoder_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    dataset_name: str = "DESI-like mock (specpt_hf.data.mock)",
    dataset_type: str = "specpt-mock",
    model_name: str | None = None,
) -> dict[str, Any]:
    """Evaluate `model_dir` on `split` of the prepared data in `data_dir`; write everything to `out_dir`.

    Returns the summary (see `summarize`) with the paths of the files written.
    """
    check_model_type(model_dir, SpecPTForRedshift)
    if autoencoder_dir is not None:
        check_model_type(autoencoder_dir, SpecPTForSpectrumReconstruction)
    model = SpecPTForRedshift.from_pretrained(model_dir)
    dataset = load_eval_split(data_dir, split)
    out = Path(out_dir)
    make_folder(out)
    predictions = predict_dataset(model, dataset, batch_size, pit=True)
    summary = summarize(predictions)
    name = model_name or Path(model_dir).resolve().name
    summary["results_json"] = str(
        write_results_json(
            out / "results.json",
            summary["by_class"],
            model_name=name,
            dataset_name=dataset_name,
            dataset_type=dataset_type,
            dataset_split=split,
            extra={key: value for key, value in summary.items() if key != "by_class"},
        )
    )
    summary["predictions_csv"] = str(write_predictions_csv(predictions, out / "predictions.csv"))
    summary["plots"] = [
        str(path) for path in write_plots(predictions, out, title=f"{name} on the {split} split")
    ]
    if autoencoder_dir is not None:
        autoencoder = SpecPTForSpectrumReconstruction.from_pretrained(autoencoder_dir)
        summary["plots"].append(
            str(plot_reconstruction_examples(autoencoder, dataset, out / "reconstructions.png"))
        )
    return summary


def write_predictions_csv(predictions: dict[str, np.ndarray], path: Path) -> Path:
    """One row per spectrum (its scalar columns: not the template coefficients), written atomically."""
    from astropy.table import Table

    table = Table({key: value for key, value in predictions.items() if np.ndim(value) == 1})
    return atomic_write(path, lambda tmp: table.write(tmp, format="ascii.csv", overwrite=True))


def main(argv: list[str] | None = None) -> int:
    """`specpt evaluate`; an expected error is one line on stderr and exit status 1 (`--debug`: traceback)."""
    parser = argparse.ArgumentParser(prog="specpt evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="folder of a SpecPTForRedshift model")
    parser.add_argument("--data", required=True, help="prepared data folder ({data}/{split}/*.parquet)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--autoencoder", help="folder of the stage-1 autoencoder, for reconstruction plots")
    parser.add_argument("--batch-size", type=int, default=64)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    return run_reporting_errors("evaluate", lambda: _run(args), args.debug)


def _run(args: argparse.Namespace) -> int:
    summary = evaluate_model(args.model, args.data, args.out, args.split, args.autoencoder, args.batch_size)
    for name, values in summary["by_class"].items():
        print(
            f"{name:>5}: n={values['n']:<6} NMAD={values['nmad']:.5f}  centred NMAD={values['nmad_centred']:.5f}  "
            f"eta={100 * values['eta']:.2f}%"
        )
    print(f"results: {summary['results_json']}")
    return 0
