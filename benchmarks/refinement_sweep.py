"""Choose a setting of the chi^2 refinement on a validation split: one config field, several values.

    python benchmarks/refinement_sweep.py --model runs/main-aug/runs/redshift/best \
        --data runs/main-aug/data/parquet --out runs/benchmarks/refinement_prior          # the p(z) prior's weight
    python benchmarks/refinement_sweep.py --model M --data DATA --field refinement_wide_delta_chi2 \
        --values 0 9 16 25 --out runs/benchmarks/wide_delta_chi2
    python benchmarks/refinement_sweep.py --model M --data DATA --perturbation "S/N ÷ ≤ 2" \
        --values 0 1 2 4 --out runs/benchmarks/refinement_prior_low_snr    # the split at lower S/N
    python benchmarks/refinement_sweep.py --quick --out /tmp/sweep      # seconds: untrained tiny model

The model (with its `templates.safetensors`) refines every spectrum of the prepared dataset's `--split` (validation
by default: settings are chosen there, never on the test set) once per value of the config field `--field`
(default `refinement_prior`, the weight of the network's p(z)): NMAD, catastrophic rate η (|Δz|/(1+z) > 0.15), its
own ZWARN = 0 sample (`specpt predict`'s flags: the fraction kept and its η) per class, and spectra per CPU-second.
With --perturbation, the split is first perturbed as robustness.py perturbs its spectra (one of its
`PERTURBATIONS`, probability 1, seeded). Writes sweep.json and sweep.md to --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from robustness import PERTURBATIONS, perturb, predict_chunks  # noqa: E402
from speed import _cpu_seconds, machine_info  # noqa: E402

from specpt_hf.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from specpt_hf.evaluation import metrics  # noqa: E402
from specpt_hf.modeling_specpt import SpecPTForRedshift  # noqa: E402
from specpt_hf.prediction import model_wavelength  # noqa: E402
from specpt_hf.training.data import load_split  # noqa: E402

PRIOR_WEIGHTS = (0.0, 1.0, 2.0, 4.0, 6.0, 10.0, 30.0)


def score(z_pred: np.ndarray, zwarn: np.ndarray, z_true: np.ndarray, classes: np.ndarray) -> dict[str, Any]:
    """NMAD, η and the ZWARN = 0 sample (kept fraction, its η) per class and overall."""
    by_class = metrics.metrics_by_group(z_pred, z_true, classes, overall_key="all")
    confident = zwarn == 0
    out = {}
    for name, m in by_class.items():
        rows = np.ones(len(z_true), bool) if name == "all" else classes == name
        kept = rows & confident
        out[name] = {
            "n": m["n"],
            "nmad": m["nmad"],
            "eta": m["eta"],
            "zwarn0_kept": float(kept.sum() / max(rows.sum(), 1)),
            "zwarn0_eta": metrics.catastrophic_fraction(z_pred[kept], z_true[kept])
            if kept.any()
            else float("nan"),
        }
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# `{result['field']}` of the refinement: {result['model']}",
        "",
        f"{result['n']} spectra of `{result['data']}` ({result['split']} split"
        + (f", perturbed: {result['perturbation']}" if result.get("perturbation") else "")
        + "); machine: "
        f"{result['machine']['summary']}, {result['machine']['date']}. η in %; ZWARN as `specpt predict` sets it; speed in "
        "spectra per CPU-second (all threads, refinement included).",
        "",
        "| value | spectra / CPU-s | class | n | NMAD | η (%) | ZWARN = 0 kept (%) | ZWARN = 0 η (%) |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["values"]:
        for name, m in row["by_class"].items():
            lines.append(
                f"| {row['value']:g} | {row['spectra_per_cpu_second']:.1f} | {name} | {m['n']} | {m['nmad']:.5f} | "
                f"{100 * m['eta']:.2f} | {100 * m['zwarn0_kept']:.1f} | {100 * m['zwarn0_eta']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def quick_setup(out: Path) -> tuple[Path, Path]:
    """An untrained specpt-tiny with templates learned from a small mock dataset, and that dataset."""
    from specpt_hf import create_model
    from specpt_hf.data.mock import write_mock_release
    from specpt_hf.data.prepare import prepare_dataset
    from specpt_hf.templates import build_model_templates

    data = out / "data"
    if not (data / "README.md").is_file():
        write_mock_release(out / "mock", dict.fromkeys(("bgs", "elg"), 30), 7, 30, progress=False)
        prepare_dataset([out / "mock"], data, overwrite=True, progress=False)
    torch.manual_seed(0)
    create_model("specpt-tiny", "redshift").save_pretrained(out / "specpt-tiny")
    build_model_templates(out / "specpt-tiny", data, {"GALAXY": 4}, split="train")
    return out / "specpt-tiny", data


def model_and_split(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[SpecPTForRedshift, dict[str, torch.Tensor], np.ndarray, np.ndarray]:
    """The model with templates (--model) and every row of --data's --split: (model, its flux / ivar / mask
    [n, pixels], z [n], target classes [n])."""
    model = SpecPTForRedshift.from_pretrained(args.model).eval()
    if not model.refines:
        parser.error(f"{args.model}: the model has no templates (add them with `specpt templates`)")
    rows = load_split(args.data, args.split, ("flux", "ivar", "mask", "z", "target_class"))[:]
    batch = {key: rows[key] for key in ("flux", "ivar", "mask")}  # [n, pixels] each
    return model, batch, rows["z"].double().numpy(), np.asarray(rows["target_class"], dtype=str)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="SpecPTForRedshift folder with templates")
    parser.add_argument("--data", type=Path, help="prepared dataset (Parquet shards, `specpt prepare`)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--field", default="refinement_prior", help="a numeric `refinement_*` config field")
    parser.add_argument(
        "--values", type=float, nargs="+", help=f"values of --field (refinement_prior: {PRIOR_WEIGHTS})"
    )
    parser.add_argument(
        "--perturbation",
        choices=[name for name in PERTURBATIONS if name != "none"],
        help="perturb the split first, as robustness.py does (e.g. 'S/N ÷ ≤ 2')",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the perturbation")
    parser.add_argument("--quick", action="store_true", help="untrained specpt-tiny on a small mock")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.model, args.data = quick_setup(args.out)
        args.split, args.values = "train", args.values or [0.0, 4.0]
    if args.model is None or args.data is None:
        parser.error("--model and --data are required (or --quick)")
    if args.values is None:
        if args.field != "refinement_prior":
            parser.error("--values is required with --field")
        args.values = list(PRIOR_WEIGHTS)
    model, batch, z_true, classes = model_and_split(args, parser)
    kind = type(getattr(model.config, args.field, None))
    if not args.field.startswith("refinement_") or kind not in (int, float):
        parser.error(
            f"--field: {args.field!r} is not a numeric refinement_* field of SpecPT's redshift config"
        )
    if kind is int and any(value != int(value) for value in args.values):
        parser.error(f"--values: {args.field} takes whole numbers, got {args.values}")
    if args.perturbation:
        batch = perturb(batch, model_wavelength(model.config), args.perturbation, args.seed)
    rows = []
    for value in args.values:
        value = kind(value)
        setattr(model.config, args.field, value)
        cpu = _cpu_seconds()
        out = predict_chunks(model, batch, 128)
        rows.append(
            {
                "value": value,
                "spectra_per_cpu_second": len(z_true) / (_cpu_seconds() - cpu),
                "by_class": score(out["z"], out["zwarn"], z_true, classes),
            }
        )
    result = {
        "machine": machine_info("cpu"),
        "model": str(args.model),
        "data": str(args.data),
        "split": args.split,
        "n": int(len(z_true)),
        "field": args.field,
        "perturbation": args.perturbation,
        "values": rows,
    }
    atomic_write_json(args.out / "sweep.json", result)
    atomic_write_text(args.out / "sweep.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
