"""Lower S/N, SpecPT beside Redrock: the same held-out spectra at their own depth and with noise added.

    python benchmarks/noise_redrock.py --model runs/specpt-small-cpu/redshift/best \
        --test-dir runs/benchmarks/accuracy/testset --templates runs/benchmarks/rrtemplates \
        --out runs/benchmarks/noise_redrock                                    # ~10 min on 2 cores
    python benchmarks/noise_redrock.py --quick --out /tmp/nr     # seconds: an untrained tiny model, 4 per class

robustness.py measures SpecPT alone when the S/N drops; this script asks how much of that loss template fitting
shares. The first coadd file of each --classes of the accuracy test set (seed 101) is copied with its S/N divided
by --factor: in every arm, ivar -> ivar / factor^2 and Gaussian noise of variance (factor^2 - 1) / ivar added to the
flux (seeded; the SCORES MEDIAN_COADD_SNR_* divided too), so the copy is the same sky at a shorter exposure. SpecPT (`specpt
predict`: network-only and refined) and Redrock (`rrdesi`, the first --per-class targets of each file, --mp
processes) fit both files. NMAD, η (|Δz| / (1 + z) > 0.15) and the ZWARN = 0 sample per class and method on those
targets, and the change from the original depth, go to noise_redrock.json and noise_redrock.md in --out. Without
Redrock the SpecPT rows are still written and the reason is recorded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table, join

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import CLASSES, make_test_set, read_truth, truth_path  # noqa: E402
from redrock_templates import QUICK_SETTINGS, build_templates  # noqa: E402
from refinement_frontier import quick_templates  # noqa: E402
from refinement_sweep import score  # noqa: E402
from run_redrock import QUICK_ZSCAN, RedrockError, redrock_missing, run_redrock  # noqa: E402
from speed import load_redshift_model, machine_info, model_label, predict_coadds  # noqa: E402

from specpt_hf.atomic import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402

ARMS = ("B", "R", "Z")


def lower_snr(source: Path, target: Path, factor: float, seed: int) -> Path:
    """A copy of the coadd `source` at `target` (and its truth file beside it) with the S/N divided by `factor`."""
    rng = np.random.default_rng(seed)
    with fits.open(source) as hdus:
        for arm in ARMS:
            flux = hdus[f"{arm}_FLUX"].data.astype(np.float64)  # [targets, pixels]
            ivar = hdus[f"{arm}_IVAR"].data.astype(np.float64)  # [targets, pixels]
            good = ivar > 0
            sigma = np.sqrt((factor**2 - 1.0) / np.where(good, ivar, 1.0))  # [targets, pixels]
            noise = np.where(good, rng.standard_normal(flux.shape) * sigma, 0.0)
            hdus[f"{arm}_FLUX"].data = (flux + noise).astype(np.float32)
            hdus[f"{arm}_IVAR"].data = (ivar / factor**2).astype(np.float32)
        scores = hdus["SCORES"].data
        for name in scores.columns.names:
            if name.startswith("MEDIAN_COADD_SNR_"):
                scores[name] = scores[name] / factor
        atomic_write(target, lambda tmp: hdus.writeto(tmp, overwrite=True))
    truth = truth_path(target)
    atomic_write(truth, lambda tmp: tmp.write_bytes(truth_path(source).read_bytes()))
    return target


def score_table(table: Table, z_column: str, zwarn_column: str) -> dict[str, dict[str, Any]]:
    """refinement_sweep's `score` (NMAD, η and the ZWARN = 0 sample per class) of a joined truth + fit table."""
    return score(
        np.asarray(table[z_column], float),
        np.asarray(table[zwarn_column]),
        np.asarray(table["Z"], float),
        np.asarray(table["TARGET_CLASS"]).astype(str),
    )


def first_targets(truth: Table, per_class: int) -> Table:
    """The first `per_class` targets of each file (Redrock's `--ntargets`)."""
    keep = np.zeros(len(truth), bool)
    for name in np.unique(truth["FILE"]):
        keep[np.flatnonzero(truth["FILE"] == name)[:per_class]] = True
    return truth[keep]


def run_depth(
    model: Any, coadds: list[Path], args: argparse.Namespace, work: Path, templates: Path | None
) -> tuple[dict[str, Any], str | None]:
    """Scores of SpecPT (network-only, refined) and Redrock on the first --per-class targets of `coadds`."""
    truth = first_targets(read_truth(coadds), args.per_class)
    refinement = model.config.refinement
    methods = [("network", "none")] + ([("refined", refinement)] if model.refines else [])
    rows = {}
    for method, refine in methods:
        model.config.refinement = refine
        columns = predict_coadds(model, coadds, work / f"specpt-{method}.fits", args.batch_size)
        predicted = Table(
            {"TARGETID": columns["targetid"], "Z_PRED": columns["z_pred"], "ZWARN": columns["zwarn"]}
        )
        rows[method] = score_table(join(truth, predicted, "TARGETID"), "Z_PRED", "ZWARN")
    model.config.refinement = refinement
    reason = redrock_missing() if templates is not None else "no Redrock templates"
    if reason is None:
        try:
            run = run_redrock(
                coadds,
                work / "redrock",
                templates,
                n_processes=args.mp,
                zscan=QUICK_ZSCAN if args.quick else None,
                extra_args=["--ntargets", str(args.per_class)],
            )
            fitted = run.redshifts["TARGETID", "Z", "ZWARN"]
            fitted.rename_columns(["Z", "ZWARN"], ["Z_RR", "ZWARN_RR"])
            rows["redrock"] = score_table(join(truth, fitted, "TARGETID"), "Z_RR", "ZWARN_RR")
        except RedrockError as err:
            reason = str(err)
    return rows, reason


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# S/N ÷ {result['factor']:g}: SpecPT and Redrock ({result['machine']['date']})",
        "",
        f"Model `{result['model']}`; the first {result['per_class']} targets of each class's first test file "
        f"(seed 101), at their own depth and with the S/N divided by {result['factor']:g} (noise added). "
        "η in %; Δ: the lower S/N minus the original depth.",
        "",
        "| method | class | n | NMAD | NMAD ÷ S/N | η | η ÷ S/N | Δη (points) | ZWARN = 0: kept, η | ÷ S/N |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    full, low = result["depths"]["original"], result["depths"]["lower"]
    for method in full:
        for name, a in full[method].items():
            b = low[method][name]
            lines.append(
                f"| {method} | {name} | {a['n']} | {a['nmad']:.5f} | {b['nmad']:.5f} | {100 * a['eta']:.1f} "
                f"| {100 * b['eta']:.1f} | {100 * (b['eta'] - a['eta']):+.1f} "
                f"| {100 * a['zwarn0_kept']:.1f} %, {100 * a['zwarn0_eta']:.2f} % "
                f"| {100 * b['zwarn0_kept']:.1f} %, {100 * b['zwarn0_eta']:.2f} % |"
            )
    if result.get("redrock_skipped"):
        lines += ["", f"Redrock skipped: {result['redrock_skipped']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, help="SpecPTForRedshift folder (with templates: refined rows too)"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--test-dir", type=Path, help="accuracy.py's test set (default: OUT/testset)")
    parser.add_argument("--templates", type=Path, help="Redrock templates (default: built into OUT)")
    parser.add_argument("--classes", nargs="+", choices=CLASSES, default=["bgs", "elg"])
    parser.add_argument("--per-class", type=int, default=120, help="targets per class fitted by both")
    parser.add_argument("--factor", type=float, default=2.0, help="the S/N is divided by this (> 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the added noise")
    parser.add_argument("--mp", type=int, default=2, help="Redrock processes")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="untrained specpt-tiny + learned templates, 4 per class, coarse Redrock",
    )
    args = parser.parse_args(argv)
    if not args.factor > 1.0:
        parser.error(f"--factor must be > 1, got {args.factor}")
    if args.per_class < 1:
        parser.error(f"--per-class must be >= 1, got {args.per_class}")
    if args.quick:
        args.per_class = min(args.per_class, 4)
    args.out.mkdir(parents=True, exist_ok=True)
    per_class = make_test_set(
        args.test_dir or args.out / "testset",
        6 if args.quick else 5000,
        spectra_per_file=6 if args.quick else 500,
    )
    originals = [per_class[name][0] for name in args.classes]
    lowered = [
        lower_snr(path, args.out / "lower-snr" / path.name, args.factor, args.seed + k)
        for k, path in enumerate(originals)
    ]
    templates = args.templates or args.out / "rrtemplates"
    if redrock_missing() is None and not any(templates.glob("rrtemplate-*.fits")):
        build_templates(templates, **(QUICK_SETTINGS if args.quick else {}))
    model = load_redshift_model("specpt-tiny", args.model)
    if args.quick:
        model.set_templates(quick_templates(originals, read_truth(originals), model))
    result: dict[str, Any] = {
        "machine": machine_info("cpu"),
        "model": model_label(args.model) if args.model else "specpt-tiny (untrained)",
        "factor": args.factor,
        "per_class": args.per_class,
        "depths": {},
    }
    for depth, coadds in (("original", originals), ("lower", lowered)):
        work = args.out / depth
        work.mkdir(exist_ok=True)
        result["depths"][depth], reason = run_depth(model, coadds, args, work, templates)
        if reason is not None:
            result["redrock_skipped"] = reason
    atomic_write_json(args.out / "noise_redrock.json", result)
    atomic_write_text(args.out / "noise_redrock.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
