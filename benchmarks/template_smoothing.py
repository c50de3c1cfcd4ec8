"""Template smoothing: refined NMAD, η and ZERR calibration per class against the Gaussian sigma by which the fine
scan smooths each template set (`refinement_smoothing_kms`).

    python benchmarks/template_smoothing.py --model runs/specpt-small-cpu/redshift/best \
        --test-dir runs/benchmarks/accuracy/testset --per-class 250 --out benchmarks/results/template_smoothing
    python benchmarks/template_smoothing.py --quick --out /tmp/ts     # seconds: untrained tiny model

For each setting of the model's `refinement_smoothing_kms` (GALAXY and STAR / QSO), the first --per-class spectra
of each class's first held-out file (seed 101, accuracy.py) are refined; the coarse curve, which chooses the
minimum, is the same in every setting. Per class: NMAD, η (|Δz|/(1+z) > 0.0033, the scale of the refinement's own
errors), and the median of |Δz| / ZERR over the spectra within 0.01 (0.67 for Gaussian errors whose ZERR is right).
Writes smoothing.json and smoothing.md to --out.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import CLASSES, SPECTRA_PER_FILE, TEST_SEED, make_test_set  # noqa: E402
from refinement_frontier import quick_templates  # noqa: E402
from robustness import held_out, predict_chunks  # noqa: E402
from speed import machine_info  # noqa: E402

from specpt_hf.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from specpt_hf.loading import load_model  # noqa: E402

SETTINGS_KMS = (
    (0.0, 0.0),
    (25.0, 50.0),
    (50.0, 100.0),
    (50.0, 200.0),
    (50.0, 400.0),
    (75.0, 400.0),
    (50.0, 800.0),
)
WRONG = 0.0033  # |Δz|/(1+z) of a wrong minimum: 1000 km/s


def score(z: np.ndarray, zerr: np.ndarray, z_true: np.ndarray, classes: np.ndarray) -> dict[str, Any]:
    """{class or "all": n, nmad, eta, zerr_ratio} of refined redshifts against the truth."""
    dz = (z - z_true) / (1 + z_true)
    rows = {}
    for name in ("all", *CLASSES):
        sel = np.ones(len(z), bool) if name == "all" else classes == name
        near = sel & (np.abs(dz) < 0.01) & (zerr > 0)
        rows[name] = {
            "n": int(sel.sum()),
            "nmad": float(1.4826 * np.median(np.abs(dz[sel]))) if sel.any() else float("nan"),
            "eta": float(np.mean(np.abs(dz[sel]) > WRONG)) if sel.any() else float("nan"),
            "zerr_ratio": float(np.median(np.abs(dz[near]) / (zerr[near] / (1 + z_true[near]))))
            if near.any()
            else float("nan"),
        }
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Template smoothing",
        "",
        f"{result['machine']['summary']}, {result['machine']['date']}. Model: {result['model']}; {result['test_set']}.",
        "Refined redshifts with the fine scan's basis smoothed by a Gaussian of the given sigma (GALAXY and STAR / "
        "QSO; the model's own setting: "
        + ", ".join(f"{k} {v:g}" for k, v in result["model_smoothing_kms"].items())
        + "). η: |Δz|/(1+z) > 0.0033. |Δz|/ZERR: median over the spectra within 0.01 (0.67 where ZERR is right).",
        "",
        "| GALAXY, STAR σ (km/s) | QSO σ (km/s) | class | n | NMAD | η (%) | median abs(Δz)/ZERR |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in result["settings"]:
        for name, m in row["by_class"].items():
            if m["n"]:
                lines.append(
                    f"| {row['galaxy_kms']:g} | {row['qso_kms']:g} | {name} | {m['n']} | {m['nmad']:.2e} | "
                    f"{100 * m['eta']:.1f} | {m['zerr_ratio']:.2f} |"
                )
    return "\n".join(lines) + "\n"


def refined_test_spectra(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[Any, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The model with templates (`--model`, or with `--quick` an untrained specpt-tiny with templates from the
    test files) and the first `--per-class` held-out spectra of each class: (model, batch, z_true, classes)."""
    per_class = make_test_set(
        args.test_dir or args.out / "testset",
        6 if args.quick else 5000,
        TEST_SEED,
        6 if args.quick else SPECTRA_PER_FILE,
    )
    files = [per_class[name][0] for name in CLASSES]
    if args.quick:
        from accuracy import read_truth

        from specpt_hf import create_model

        torch.manual_seed(0)
        model = create_model("specpt-tiny", "redshift", refinement_wide_quality=1.0).eval()
        model.set_templates(quick_templates(files, read_truth(files), model))
        args.per_class = 6
    elif args.model is None:
        parser.error("--model is required (or --quick)")
    else:
        model = load_model(args.model, task="redshift")
    if not model.refines:
        parser.error(f"{args.model}: the model has no templates (add them with `specpt templates`)")
    return (model, *held_out(files, args.per_class, model.config))


def benchmark_parser(description: str) -> argparse.ArgumentParser:
    """The arguments of the benchmarks over `refined_test_spectra`: --model, --test-dir, --per-class, --quick,
    --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", help="SpecPT redshift model folder with templates")
    parser.add_argument("--test-dir", type=Path, help="held-out test set folder (default: OUT/testset)")
    parser.add_argument("--per-class", type=int, default=250, help="spectra per class")
    parser.add_argument("--quick", action="store_true", help="untrained specpt-tiny + templates, 6 per class")
    parser.add_argument("--out", type=Path, required=True)
    return parser


def write_result(
    args: argparse.Namespace, name: str, markdown_of: Callable[[dict[str, Any]], str], **fields: Any
) -> None:
    """`{name}.json` and `{name}.md` in --out: the machine, the model, the test spectra and `fields`."""
    result = {
        "machine": machine_info("cpu"),
        "model": str(args.model) if args.model else "specpt-tiny (untrained) + quick templates",
        "test_set": f"the first {args.per_class} spectra of each class's first held-out file (seed {TEST_SEED})",
        **fields,
    }
    atomic_write_json(args.out / f"{name}.json", result)
    atomic_write_text(args.out / f"{name}.md", markdown_of(result))
    print(f"wrote {args.out / f'{name}.md'}")


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model, batch, z_true, classes = refined_test_spectra(args, parser)
    default = dict(model.config.refinement_smoothing_kms)
    settings = []
    for galaxy_kms, qso_kms in SETTINGS_KMS[:2] if args.quick else SETTINGS_KMS:
        sigma = {name: qso_kms if name == "QSO" else galaxy_kms for name in model.templates}
        model.config.refinement_smoothing_kms = sigma
        out = predict_chunks(model, batch)
        rows = score(out["z"], out["zerr"], z_true, classes)
        settings.append({"galaxy_kms": galaxy_kms, "qso_kms": qso_kms, "by_class": rows})
        print(
            f"σ {galaxy_kms:g} / {qso_kms:g} km/s: "
            + ", ".join(f"{c} {m['nmad']:.2e}" for c, m in rows.items())
        )
    write_result(args, "smoothing", markdown, model_smoothing_kms=default, settings=settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
