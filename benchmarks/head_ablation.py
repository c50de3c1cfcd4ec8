"""Redshift-head ablation: stage 2 trained from the same autoencoder on the same data, with the same steps, seed
and schedule, once per head variant; validation NMAD, eta and bias after each evaluation, side by side.

    python benchmarks/head_ablation.py --data runs/specpt-small-cpu/data \
        --autoencoder runs/specpt-small-cpu/autoencoder/model --out runs/benchmarks/head-ablation \
        --variant one-hot redshift_label_sigma=0 --variant soft-1 redshift_label_sigma=1 --steps 3000
    python benchmarks/head_ablation.py ... --quick        # a few steps each: a smoke test

A variant is a name and `SpecPTForRedshiftConfig` settings (`key=value`, on top of `--preset`'s head). Each
runs in its own process (Accelerate fixes the precision once per process), writes `{out}/{name}/` like
`specpt train`, and resumes from its newest checkpoint when run again. The validation split is the one
`specpt train` uses for model selection (never the benchmarks' test sets); `{out}/ablation.md` and `.json`
hold the table.
"""

from __future__ import annotations

import argparse
import multiprocessing
from pathlib import Path
from typing import Any

import yaml

from specpt_hf.atomic import atomic_write_json, atomic_write_text

METRICS = ("validation/nmad", "validation/eta", "validation/bias")


def parse_variant(name: str, settings: list[str]) -> tuple[str, dict[str, Any]]:
    """('soft-1', ['redshift_label_sigma=1']) -> ('soft-1', {'redshift_label_sigma': 1.0})."""
    overrides = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--variant {name}: expected key=value, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    return name, overrides


def train_variant(job: dict[str, Any]) -> list[dict[str, float]]:
    """Train one variant (in its own process); its training history."""
    from specpt_hf import SpecPTForRedshift
    from specpt_hf.presets import preset_config
    from specpt_hf.training.settings import TrainingSettings
    from specpt_hf.training.train import head_settings, training_function

    preset = preset_config(job["preset"], "redshift", **job["overrides"])
    model = SpecPTForRedshift.from_pretrained(job["autoencoder"], **head_settings(preset, job["autoencoder"]))
    settings = TrainingSettings(
        stage="redshift",
        preset=job["preset"],
        data_dir=job["data"],
        output_dir=job["output_dir"],
        max_val_spectra=job["val_spectra"],
        batch_size=job["batch_size"],
        learning_rate=job["learning_rate"],
        encoder_learning_rate=job["learning_rate"],
        warmup_steps=min(200, job["steps"] // 10),
        max_steps=job["steps"],
        eval_steps=job["eval_steps"],
        checkpointing_steps=job["eval_steps"],
        early_stopping_patience=None,
        mixed_precision=job["mixed_precision"],
        disable_tqdm=job["quiet"],
        report_to="none",
        logging_steps=50,
        resume=True,
    )
    return training_function(settings, model=model).history


def table(results: dict[str, list[dict[str, float]]]) -> str:
    """Markdown: one row per (variant, validation step)."""
    lines = ["| variant | step | NMAD | η | bias |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, history in results.items():
        for record in history:
            if METRICS[0] in record:
                nmad, eta, bias = (record[key] for key in METRICS)
                lines.append(f"| {name} | {record['step']} | {nmad:.5f} | {100 * eta:.2f} % | {bias:+.5f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="prepared data folder (`specpt prepare` output)")
    parser.add_argument("--autoencoder", required=True, help="stage-1 model folder every variant starts from")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        required=True,
        metavar=("NAME", "KEY=VALUE"),
        help="a name and its head settings; repeat for each variant",
    )
    parser.add_argument("--preset", default="specpt-small")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--eval-steps", type=int, default=1000)
    parser.add_argument("--val-spectra", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="bf16")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--quick", action="store_true", help="6 steps, 16 validation spectra")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval_steps, args.val_spectra, args.batch_size = 6, 3, 16, 4
    try:
        args.variants = [parse_variant(v[0], v[1:]) for v in args.variant]
    except ValueError as error:
        parser.error(str(error))
    names = [name for name, _ in args.variants]
    if len(set(names)) != len(names):
        parser.error(f"--variant names must differ, got {names}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jobs = [
        {
            "preset": args.preset,
            "overrides": overrides,
            "autoencoder": args.autoencoder,
            "data": args.data,
            "output_dir": str(args.out / name),
            "val_spectra": args.val_spectra,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "steps": args.steps,
            "eval_steps": args.eval_steps,
            "mixed_precision": args.mixed_precision,
            "quiet": args.no_progress,
        }
        for name, overrides in args.variants
    ]
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        histories = pool.map(train_variant, jobs, chunksize=1)
    results = dict(zip([name for name, _ in args.variants], histories, strict=True))
    markdown = table(results)
    print(markdown)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {name: overrides for name, overrides in args.variants}
    atomic_write_text(args.out / "ablation.md", f"{markdown}\n")
    atomic_write_json(
        args.out / "ablation.json", {"variants": settings, "steps": args.steps, "history": results}, indent=1
    )
    print(f"wrote {args.out / 'ablation.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
