"""Redrock with SpecPT's priors against Redrock alone, on the same held-out mock spectra.

    python benchmarks/redrock_priors.py --model runs/specpt-small-cpu/redshift/best \
        --test-dir runs/benchmarks/accuracy/testset --per-class 100 --out benchmarks/results/redrock_priors
    python benchmarks/redrock_priors.py --quick --out /tmp/rp    # minutes: tiny set, quick templates, coarse grid

SpecPT (`specpt predict --priors-out`) writes Redrock's priors file from each target's p(z) (a window about Z
holding 99 % of it; `--function`); `rrdesi` then fits the first --per-class fibers of each class's first test file
twice, alone and with `--priors`, with the templates of redrock_templates.py and one process (`--mp`). Output:
redrock_priors.json and .md — NMAD, centred NMAD and η per class of SpecPT, Redrock and Redrock + priors on the
spectra all three fitted, and Redrock's CPU-core-seconds per spectrum in each run. Needs the `bench` extra
(see run_redrock.py). Redrock evaluates every trial redshift either way: the prior changes which minimum wins,
not how many trials are fitted, so it buys robustness, not speed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table, join

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import CLASSES, TEST_SEED, make_test_set, read_truth  # noqa: E402
from redrock_templates import QUICK_SETTINGS, build_templates  # noqa: E402
from run_redrock import QUICK_ZSCAN, run_redrock  # noqa: E402
from speed import machine_info  # noqa: E402

from specpt_hf.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from specpt_hf.evaluation.metrics import metrics_by_group  # noqa: E402
from specpt_hf.predict import predict_catalog  # noqa: E402

QUICK_PER_CLASS = 6


def fit_all(args: argparse.Namespace, files: list[Path], out: Path) -> dict[str, Any]:
    """SpecPT's catalog and priors, then Redrock alone and with them; the three redshift tables and times."""
    priors = out / "specpt-priors.fits"
    summary = predict_catalog(
        files,
        out / "specpt.fits",
        args.model,
        priors_out=priors,
        priors_function=args.function,
        progress=False,
    )
    specpt = Table.read(out / "specpt.fits", hdu="REDSHIFTS")
    templates = args.templates or out / "rrtemplates"
    if not any(templates.glob("rrtemplate-*.fits")):
        build_templates(templates, **(QUICK_SETTINGS if args.quick else {}))
    per_file = ("--ntargets", str(args.per_class))
    zscan = QUICK_ZSCAN if args.quick else None
    alone = run_redrock(files, out / "redrock", templates, args.mp, zscan, per_file, reuse=args.resume)
    with_priors = run_redrock(
        files,
        out / "redrock-priors",
        templates,
        args.mp,
        zscan,
        (*per_file, "--priors", str(priors)),
        reuse=args.resume,
    )
    return {
        "tables": {
            "SpecPT": specpt,
            "Redrock": alone.redshifts,
            "Redrock + SpecPT priors": with_priors.redshifts,
        },
        "timing": {
            "SpecPT": summary.seconds,
            "Redrock": alone.summary(),
            "Redrock + SpecPT priors": with_priors.summary(),
        },
    }


def compare(truth: Table, tables: dict[str, Table]) -> dict[str, Any]:
    """Metrics per class of every method on the targets every method fitted."""
    common = truth["TARGETID", "Z", "TARGET_CLASS"]
    for i, table in enumerate(tables.values()):
        fitted = table["TARGETID", "Z"]
        fitted.rename_column("Z", f"Z_{i}")
        common = join(common, fitted, "TARGETID", keep_order=True, metadata_conflicts="silent")
    classes = np.asarray(common["TARGET_CLASS"]).astype(str)
    z_true = np.asarray(common["Z"], float)
    metrics = {
        name: metrics_by_group(np.asarray(common[f"Z_{i}"], float), z_true, classes, overall_key="all")
        for i, name in enumerate(tables)
    }
    return {"n_common": len(common), "metrics": metrics}


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Redrock with SpecPT priors",
        "",
        f"{results['test_set']}; model `{results['model']}`; prior function `{results['function']}`; "
        f"{results['n_common']} spectra fitted by all three. Machine: {results['machine']['summary']}, {results['machine']['date']}.",
        "",
        "| class | method | n | NMAD | centred NMAD | η (%) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name in ("all", *CLASSES):
        for method, by_class in results["metrics"].items():
            m = by_class.get(name)
            if m and m["n"]:
                lines.append(
                    f"| {name} | {method} | {m['n']} | {m['nmad']:.5f} | {m['nmad_centred']:.5f} | {100 * m['eta']:.2f} |"
                )
    lines += ["", "| run | CPU-core-seconds per spectrum | wall seconds |", "| --- | ---: | ---: |"]
    for method in ("Redrock", "Redrock + SpecPT priors"):
        t = results["timing"][method]
        lines.append(f"| {method} | {t['cpu_core_seconds_per_spectrum']:.3f} | {t['wall_seconds']:.0f} |")
    lines.append(f"| SpecPT (`predict_catalog`, incl. loading) | | {results['timing']['SpecPT']:.0f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", help="SpecPT redshift model folder (default with --quick: an untrained tiny one)"
    )
    parser.add_argument("--test-dir", type=Path, help="held-out test set folder (default: OUT/testset)")
    parser.add_argument(
        "--n-per-class", type=int, default=5000, help="test-set size per class (as accuracy.py)"
    )
    parser.add_argument(
        "--per-class", type=int, default=100, help="fibers fitted per class (rrdesi --ntargets)"
    )
    parser.add_argument("--function", choices=("gaussian", "tophat"), default="gaussian", help="prior shape")
    parser.add_argument(
        "--templates", type=Path, help="Redrock template folder (default: OUT/rrtemplates, built)"
    )
    parser.add_argument("--mp", type=int, default=1, help="rrdesi processes (CPU cores)")
    parser.add_argument("--resume", action="store_true", help="reuse Redrock outputs already in OUT")
    parser.add_argument("--quick", action="store_true", help="a tiny set, quick templates, a coarse grid")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_per_class = args.per_class = QUICK_PER_CLASS
    if args.model is None and not args.quick:
        parser.error("--model is required (or --quick)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.model is None:  # --quick: an untrained specpt-tiny
        from specpt_hf import create_model

        args.model = out / "specpt-tiny"
        create_model("specpt-tiny", "redshift").save_pretrained(args.model)
    spf = args.n_per_class if args.quick else None
    per_class = make_test_set(
        args.test_dir or out / "testset", args.n_per_class, TEST_SEED, *([spf] if spf else [])
    )
    files = [per_class[name][0] for name in CLASSES]
    fitted = fit_all(args, files, out)
    results = {
        "machine": machine_info("cpu"),
        "test_set": f"the first {args.per_class} fibers of each class's first held-out file (seed {TEST_SEED})",
        "model": str(args.model),
        "function": args.function,
        **compare(read_truth(files), fitted["tables"]),
        "timing": fitted["timing"],
    }
    atomic_write_json(out / "redrock_priors.json", results, default=str)
    md = markdown(results)
    atomic_write_text(out / "redrock_priors.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
