"""Choose a ZWARN threshold on tuning sets: the model runs once per set, the flags are recomputed for each value.

    python benchmarks/zwarn_thresholds.py --model benchmarks/models/specpt-small-cpu-aug \
        --test-dir runs/benchmarks/tuning/testset runs/benchmarks/tuning-303/testset --seed 202 303 \
        --n-per-class 2000 4000 --field weak_fit_chi2 --values 0 10 12 14 15 16 17 18 20 25 \
        --out runs/benchmarks/zwarn_alias            # -> benchmarks/results/zwarn_thresholds/alias_lines/galaxy
    (the same with --config 'refinement_alias_lines=[[3728.5, 5008.2, 6564.6], [1215.67, 1549.5, 1908.7, 2799.9]]'
    -> .../alias_lines/galaxy+quasar, and with --config 'refinement_alias_lines=[]' -> .../alias_lines/off and
    .../weak_fit_chi2)
    python benchmarks/zwarn_thresholds.py --model benchmarks/models/specpt-small-cpu-aug \
        --test-dir runs/benchmarks/accuracy/testset --seed 101 --n-per-class 5000 --evaluate \
        --field weak_fit_chi2 --values 0 16 --config 'refinement_alias_lines=[]' \
        --out runs/benchmarks/zwarn_weak_test        # -> benchmarks/results/zwarn_thresholds/weak_fit_chi2/test
    python benchmarks/zwarn_thresholds.py --model benchmarks/models/specpt-small-cpu-aug \
        --test-dir runs/benchmarks/tuning/testset --field oii_delta_chi2 --values 0 12 16 20 25 30 40 60 100 \
        --set weak_fit_chi2=0 --config 'refinement_alias_lines=[]' \
        --out runs/benchmarks/zwarn_oii              # -> benchmarks/results/zwarn_thresholds
    python benchmarks/zwarn_thresholds.py --quick --out /tmp/zwarn      # seconds: untrained tiny model

Each tuning set is drawn like accuracy.py's test set with another seed (`make_test_set`; `--test-dir`, `--seed`
and `--n-per-class` pair up): settings are chosen there, never on the test set. For each value of one
`FlagThresholds` field (`--field`; the others keep their defaults or the values of `--set`), per class of all sets
together: η of all spectra, and the ZWARN = 0 sample's fraction kept, catastrophic rate η (|Δz|/(1+z) > 0.15) and
count of failures. `--config FIELD=JSON` changes a model setting first (e.g. `refinement_alias_lines=[]`). The
predictions are kept in OUT/columns-SEED.npz and reused while the model, its settings and the set are the same,
so further fields need no model run. Writes thresholds.json and thresholds.md to --out, with a count per class of
the template set that won each fit (SPECTYPE), its failures and its DELTACHI2 below `min_delta_chi2`. `--evaluate`
runs values already chosen on the tuning sets on accuracy.py's test set (seed 101), for the record.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import CLASSES, make_test_set  # noqa: E402
from refinement_sweep import quick_setup  # noqa: E402
from robustness import held_out, predict_chunks  # noqa: E402
from speed import machine_info  # noqa: E402

from specpt_hf.atomic import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402
from specpt_hf.evaluation.metrics import catastrophic, catastrophic_fraction  # noqa: E402
from specpt_hf.loading import load_model  # noqa: E402
from specpt_hf.prediction import FlagThresholds, zwarn_of_columns  # noqa: E402


def model_digest(model: Any, folder: Path) -> str:
    """SHA-256 of a model folder's weights and templates and of the model's settings as loaded (config.json with
    today's defaults filled in): what its predictions depend on."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name in ("model.safetensors", "templates.safetensors"):
        if (folder / name).is_file():
            digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def predictions(model: Any, files: list[Path], per_file: int, cache: Path, key: str) -> dict[str, np.ndarray]:
    """`predict_spectra`'s columns [n] (those ZWARN reads among them), with the true z and class, of the first
    `per_file` spectra of each file (all of them when `per_file` is at least a file's size); read from `cache` when
    it was written for the same `key` (model and tuning set)."""
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as stored:
            if str(stored["key"]) == key:
                return {name: stored[name] for name in stored.files if name != "key"}
    batch, z_true, classes = held_out(files, per_file, model.config)
    columns = predict_chunks(model, batch, 128)  # every [n] column of predict_spectra
    columns.update(z_true=z_true, target_class=classes)

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:  # a file object: np.savez would add ".npz" to a path
            np.savez(handle, key=key, **columns)

    atomic_write(cache, write)
    return columns


def score(columns: dict[str, np.ndarray], zwarn: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per class: n, η of every spectrum (`eta_all`), and the ZWARN = 0 sample's kept fraction, η and failures."""
    out = {}
    for name in [*CLASSES, "all"]:
        rows = columns["target_class"] == name if name != "all" else np.ones(len(zwarn), bool)
        kept = rows & (zwarn == 0)
        eta = (
            catastrophic_fraction(columns["z"][kept], columns["z_true"][kept]) if kept.any() else float("nan")
        )
        out[name] = {
            "n": int(rows.sum()),
            "eta_all": catastrophic_fraction(columns["z"][rows], columns["z_true"][rows]),
            "kept": float(kept.sum() / max(rows.sum(), 1)),
            "eta": eta,
            "failures": round(eta * kept.sum()) if kept.any() else 0,
        }
    return out


def fitted_as(columns: dict[str, np.ndarray], min_delta_chi2: float) -> dict[str, dict[str, dict[str, int]]]:
    """Per class and winning template set (SPECTYPE): how many spectra, how many of them catastrophic failures, and
    how many with DELTACHI2 below `min_delta_chi2` (flagged whatever the other thresholds); {} without refinement."""
    if "spectype" not in columns:
        return {}
    failed = catastrophic(columns["z"], columns["z_true"])
    small = columns["deltachi2"] < min_delta_chi2
    out: dict[str, dict[str, dict[str, int]]] = {name: {} for name in CLASSES}
    for name in CLASSES:
        rows = columns["target_class"] == name
        for kind in np.unique(columns["spectype"][rows]):
            won = rows & (columns["spectype"] == kind)
            out[name][str(kind)] = {
                "n": int(won.sum()),
                "failures": int((won & failed).sum()),
                "small_delta_chi2": int((won & small).sum()),
            }
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# ZWARN's `{result['field']}`: {result['model']}",
        "",
        f"{result['n']} spectra of {', '.join(f'`{p}`' for p in result['test_dirs'])} (seeds "
        f"{', '.join(map(str, result['seeds']))}); machine: {result['machine']['summary']}, "
        f"{result['machine']['date']}; {result['purpose']}. Other thresholds at their defaults"
        f"{''.join(f', {k} = {v:g}' for k, v in result['fixed'].items())}; kept and η in %"
        f"{''.join(f'; model setting {k} = {json.dumps(v)}' for k, v in result['config'].items())}.",
        "",
        "| value | class | n | η of all | ZWARN = 0 kept | η | failures kept |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["values"]:
        for name, m in row["by_class"].items():
            lines.append(
                f"| {row['value']:g} | {name} | {m['n']} | {100 * m['eta_all']:.2f} | {100 * m['kept']:.1f} | "
                f"{100 * m['eta']:.2f} | "
                f"{m['failures']} |"
            )
    if result["fitted_as"]:
        lines += [
            "",
            f"Which template set won (SPECTYPE), per class; DELTACHI2 < {result['min_delta_chi2']:g} is flagged "
            "whatever the value above:",
            "",
            "| class | set | n | failures | DELTACHI2 below |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for name, kinds in result["fitted_as"].items():
            for kind, m in kinds.items():
                lines.append(f"| {name} | {kind} | {m['n']} | {m['failures']} | {m['small_delta_chi2']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="SpecPTForRedshift folder")
    parser.add_argument(
        "--test-dir", type=Path, nargs="+", help="where the tuning sets live (default: OUT/tuningset-SEED)"
    )
    parser.add_argument("--seed", type=int, nargs="+", default=[202], help="mock seed of each tuning set")
    parser.add_argument(
        "--n-per-class", type=int, nargs="+", default=[2000], help="spectra per class of each set"
    )
    fields = [f.name for f in dataclasses.fields(FlagThresholds)]
    parser.add_argument("--field", default="min_delta_chi2", choices=fields, help="a FlagThresholds field")
    parser.add_argument("--values", type=float, nargs="+", help="values of --field")
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="FIELD=VALUE", help="other FlagThresholds fields held fixed"
    )
    parser.add_argument(
        "--config",
        nargs="+",
        default=[],
        metavar="FIELD=JSON",
        help="model config fields to override, e.g. refinement_alias_lines=[] (part of the cache key)",
    )
    parser.add_argument(
        "--evaluate", action="store_true", help="values already chosen, on the test set (seed 101 allowed)"
    )
    parser.add_argument("--quick", action="store_true", help="untrained specpt-tiny, 6 spectra per class")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if any(seed in (0, 1) or (seed == 101 and not args.evaluate) for seed in args.seed):
        parser.error(
            "seeds 0 and 1 draw the training set and 101 the test set (only with --evaluate); tune on another"
        )
    if len(args.n_per_class) == 1:
        args.n_per_class = args.n_per_class * len(args.seed)
    paired = [args.n_per_class] + ([args.test_dir] if args.test_dir else [])
    if any(len(values) != len(args.seed) for values in paired):
        parser.error("--test-dir and --n-per-class need one value per --seed")
    try:
        args.fixed = {name: float(value) for name, value in (item.split("=", 1) for item in args.set)}
        dataclasses.replace(FlagThresholds(), **args.fixed)
    except (ValueError, TypeError) as error:
        parser.error(f"--set takes FlagThresholds FIELD=VALUE pairs: {error}")
    try:
        args.overrides = {
            name: json.loads(value) for name, value in (item.split("=", 1) for item in args.config)
        }
    except ValueError as error:
        parser.error(f"--config takes FIELD=JSON pairs: {error}")
    if args.quick:
        args.n_per_class = [6] * len(args.seed)
        args.values = args.values or [9.0, 25.0]
    elif args.model is None:
        parser.error("--model is required (or --quick)")
    if not args.values:
        parser.error("--values is required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.model = args.out / "specpt-tiny"
        if not (args.model / "templates.safetensors").is_file():
            quick_setup(args.out)
    test_dirs = args.test_dir or [args.out / f"tuningset-{seed}" for seed in args.seed]
    model = load_model(args.model, task="redshift")
    for name, value in args.overrides.items():
        if not hasattr(model.config, name):
            raise SystemExit(f"--config: {args.model} has no config field {name!r}")
        setattr(model.config, name, value)
    digest = model_digest(model, Path(args.model))
    sets = []
    for test_dir, seed, n_per_class in zip(test_dirs, args.seed, args.n_per_class, strict=True):
        spf = [n_per_class] if args.quick else []
        per_class = make_test_set(test_dir, n_per_class, seed, *spf)
        files = [path for name in CLASSES for path in per_class[name]]
        key = f"{digest}|{seed}|{n_per_class}"
        sets.append(predictions(model, files, n_per_class, args.out / f"columns-{seed}.npz", key))
    columns = {name: np.concatenate([c[name] for c in sets]) for name in sets[0]}
    min_delta_chi2 = dataclasses.replace(FlagThresholds(), **args.fixed).min_delta_chi2
    rows = []
    for value in args.values:
        thresholds = dataclasses.replace(FlagThresholds(), **{**args.fixed, args.field: value})
        rows.append(
            {"value": value, "by_class": score(columns, zwarn_of_columns(model.config, columns, thresholds))}
        )
    result = {
        "machine": machine_info("cpu"),
        "model": str(args.model),
        "test_dirs": [str(path) for path in test_dirs],
        "seeds": args.seed,
        "n": int(len(columns["z"])),
        "field": args.field,
        "fixed": args.fixed,
        "config": args.overrides,
        "purpose": "evaluation of chosen values" if args.evaluate else "tuning",
        "values": rows,
        "min_delta_chi2": min_delta_chi2,
        "fitted_as": fitted_as(columns, min_delta_chi2),
    }
    atomic_write_json(args.out / "thresholds.json", result)
    atomic_write_text(args.out / "thresholds.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
