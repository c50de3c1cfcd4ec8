"""The whole SpecPT job on the embedded default data, from DESI-format files to a report.

    python examples/run_main_job.py --out report            # the full job (`make main`)
    python examples/run_main_job.py --out /tmp/r --quick    # a small smoke run of every step

Steps (each skipped when its output already exists, so an interrupted job continues where it stopped):
1. write DESI-format mock coadd + redrock files for BGS, LRG, ELG and QSO (`specpt_hf.data.mock`);
2. prepare Parquet shards with train/validation/test splits (`specpt_hf.data.prepare`);
3. pretrain the autoencoder, 4. train the redshift head (`specpt_hf.training`, Accelerate);
5. learn GALAXY and QSO rest-frame templates from the training split (`specpt_hf.templates`), so predictions
   refine the network's redshift by a chi^2 fit (`specpt_hf.refinement`);
6. evaluate on the held-out test split (`specpt_hf.evaluation`): network-only and refined side by side;
7. predict redshifts for the REAL DESI spectra shipped with `specutils`;
8. write `{out}/report.md` with the metrics, the plots and the predictions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from specpt_hf.atomic import atomic_write_json, atomic_write_text
from specpt_hf.data import read_desi_spectra, target_class_of
from specpt_hf.data.mock import write_mock_release
from specpt_hf.data.prepare import prepare_dataset
from specpt_hf.data.redshifts import EXTRAGALACTIC_CLASSES
from specpt_hf.evaluation.evaluate_model import evaluate_model
from specpt_hf.modeling_specpt import TEMPLATES_NAME, SpecPTForRedshift
from specpt_hf.prediction import predict_records
from specpt_hf.templates import build_model_templates
from specpt_hf.training.settings import TrainingSettings
from specpt_hf.training.train import training_function

CONFIGS = Path(__file__).resolve().parent / "configs"
REAL_DESI_FILES = ("coadd-sv3-dark-26065.fits", "coadd-5-169-thru20210419.fits")

# full job: sized to finish in under 20 minutes on 2 CPU cores; quick: a smoke run of every step
PLANS = {
    "full": dict(
        preset="specpt-small", n_per_class=2000, autoencoder_steps=600, redshift_steps=2000, eval_steps=400
    ),
    "quick": dict(preset="specpt-tiny", n_per_class=40, autoencoder_steps=4, redshift_steps=6, eval_steps=3),
}


AUGMENTATIONS = [  # the amplitudes `--no-augment` sets to 0
    f.name
    for f in dataclasses.fields(TrainingSettings)
    if f.name.startswith("augment_") and f.name != "augment_probability"
]


class StepTimer:
    """Runs the job's steps, printing a header for each and keeping their wall times in a JSON file, so the
    timings survive an interrupted and continued job."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seconds: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    def __call__(self, name: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        print(f"\n== {name}", flush=True)
        start = time.perf_counter()
        result = function(*args, **kwargs)
        self.seconds[name] = time.perf_counter() - start
        atomic_write_json(self.path, self.seconds)
        return result


def train_stage(stage: str, plan: dict[str, Any], data: Path, runs: Path, pretrained: Path | None) -> Path:
    """Train one stage from its preset's settings file; return the model folder it wrote."""
    preset = plan["preset"]
    off = {name: 0 for name in AUGMENTATIONS} if not plan.get("augment", True) else {}
    settings = TrainingSettings.from_yaml(
        CONFIGS / f"{preset}-{stage}.yaml",
        **off,
        data_dir=str(data),
        output_dir=str(runs / stage),
        max_steps=plan[f"{stage}_steps"],
        eval_steps=plan["eval_steps"],
        checkpointing_steps=plan["eval_steps"],
        pretrained_model=str(pretrained) if pretrained else None,
        resume=(runs / stage / "checkpoints").exists(),
    )
    training_function(settings)
    return runs / stage / ("best" if stage == "redshift" else "model")


def predict_real_desi(model_dir: Path) -> list[dict[str, Any]]:
    """Redshift estimates for the real DESI coadds that ship with specutils."""
    model = SpecPTForRedshift.from_pretrained(model_dir)
    folder = resources.files("specutils") / "io/default_loaders/tests/desi_test_data"
    rows = []
    for name in REAL_DESI_FILES:
        records = list(read_desi_spectra(Path(str(folder / name))))
        classes = target_class_of(
            {k: np.array([r["fibermap"][k] for r in records]) for k in records[0]["fibermap"]}
        )
        predictions = predict_records(model, records)
        for i, record in enumerate(records):
            rows.append(
                dict(
                    file=name,
                    targetid=int(record["targetid"]),
                    target_class=str(classes[i]),
                    z=float(predictions["z_pred"][i]),
                    zerr=float(predictions["zerr_pred"][i]),
                    z_net=float(predictions["z_net"][i]),
                    quality=float(predictions["quality"][i]),
                    spectype=str(predictions["spectype"][i]) if "spectype" in predictions else "",
                    deltachi2=float(predictions["deltachi2"][i])
                    if "deltachi2" in predictions
                    else float("nan"),
                )
            )
    return rows


def write_report(
    out: Path, plan: dict[str, Any], summary: dict[str, Any], real: list[dict], timings: dict
) -> Path:
    """`report.md`: metrics per class, plots, the predictions on real DESI spectra, timings."""
    lines = [
        "# SpecPT report",
        "",
        f"Preset `{plan['preset']}`, {plan['n_per_class']} mock spectra per class (BGS, LRG, ELG, QSO) before the "
        f"DESI good-redshift cuts, {plan['autoencoder_steps']} autoencoder steps + {plan['redshift_steps']} "
        f"redshift steps. Machine: {platform.machine()}, {os.cpu_count()} CPU cores.",
        "",
        "## Held-out test split (mock DESI spectra)",
        "",
        "Network: the p(z) head's own redshift; refined: the chi^2 fit of the rest-frame templates around the "
        "p(z) modes (the model's output).",
        "",
        "| class | n | network NMAD | network η (%) | refined NMAD | refined centred NMAD | refined η (%) "
        "| NMAD gain | bias | σ68 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in summary["by_class"].items():
        net = summary["by_class_network"][name]
        gain = net["nmad"] / m["nmad"] if m["nmad"] > 0 else float("inf")
        lines.append(
            f"| {name} | {m['n']} | {net['nmad']:.5f} | {100 * net['eta']:.2f} | {m['nmad']:.5f} | "
            f"{m['nmad_centred']:.5f} | {100 * m['eta']:.2f} | {gain:.1f}× | {m['bias']:+.5f} | {m['sigma68']:.5f} |"
        )
    lines += [
        "",
        "NMAD = 1.48·median(|Δz|/(1+z)); centred NMAD = 1.48·median(|Δz/(1+z) − median|); "
        "η = fraction with |Δz|/(1+z) > 0.15.",
        "",
    ]
    lines += [f"![{Path(p).stem}]({Path(p).relative_to(out)})" for p in summary["plots"]]
    lines += [
        "",
        "## Real DESI spectra (shipped with specutils; no labels, the model was trained on mocks)",
        "",
        "| file | TARGETID | class | z | zerr | SPECTYPE | DELTACHI2 | network z | quality |",
        "| --- | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for row in real:
        lines.append(
            f"| {row['file']} | {row['targetid']} | {row['target_class']} | {row['z']:.4f} | {row['zerr']:.5f} "
            f"| {row['spectype']} | {row['deltachi2']:.1f} | {row['z_net']:.4f} | {row['quality']:.2f} |"
        )
    lines += ["", "## Timings", "", "| step | seconds |", "| --- | ---: |"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in timings.items()]
    return atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


def run(out: Path, plan: dict[str, Any], seed: int = 0) -> Path:
    """Every step of the job; returns the report path."""
    out.mkdir(parents=True, exist_ok=True)
    mock, data, runs = out / "data" / "mock", out / "data" / "parquet", out / "runs"
    step = StepTimer(out / "timings.json")
    if not (mock / "healpix").exists():
        step(
            "mock DESI files",
            write_mock_release,
            mock,
            dict.fromkeys(EXTRAGALACTIC_CLASSES, plan["n_per_class"]),
            seed,
        )
    if not (data / "README.md").exists():
        step("prepare Parquet", prepare_dataset, [mock], data, overwrite=True)
    autoencoder = runs / "autoencoder" / "model"
    if not (autoencoder / "config.json").exists():
        step("pretrain autoencoder", train_stage, "autoencoder", plan, data, runs, None)
    redshift = runs / "redshift" / "best"
    if not (redshift / "config.json").exists():
        step("train redshift head", train_stage, "redshift", plan, data, runs, autoencoder)
    if not (redshift / TEMPLATES_NAME).exists():
        step("rest-frame templates", build_model_templates, redshift, data)
    summary = step(
        "evaluate",
        evaluate_model,
        redshift,
        data,
        out / "evaluation",
        "test",
        autoencoder,
        model_name=plan["preset"],
    )
    real = step("predict real DESI", predict_real_desi, redshift)
    atomic_write_json(out / "real_desi_predictions.json", real)
    return write_report(out, plan, summary, real, step.seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("report"), help="report folder")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run of every step")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mock data")
    parser.add_argument(
        "--no-augment", action="store_true", help="train without the recipes' augmentations (for comparison)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    plan = {**PLANS["quick" if args.quick else "full"], "augment": not args.no_augment}
    report = run(args.out, plan, args.seed)
    print(f"\n{report.read_text(encoding='utf-8')}\nreport: {report.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
