"""Two models on the same test spectra: η per class, the failures they share, and whether the difference is chance.

    python benchmarks/compare_predictions.py runs/benchmarks/accuracy-a runs/benchmarks/accuracy-b \
        --labels seed42 seed1 --out benchmarks/results/compare/seed-spread

Each folder is an `accuracy.py` output (its `predictions.ecsv`, one `Z_{model} {method}` column per method). Rows
are matched by TARGETID (`astropy.table.join`). Per class: NMAD and η of both, the catastrophic failures
(|Δz| / (1 + z) > 0.15) of both, of the first only and of the second only, and McNemar's exact test on the failures
only one model has (two-sided binomial p-value of the split between them): a small p says the η difference is
larger than the choice of test spectra explains. Two runs of one recipe with different seeds measure the spread
between training runs, the yardstick for a recipe change. Both methods are compared, the network's redshift and the
refined one. Writes comparison.json and comparison.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table, join
from redrock_subset import CLASSES
from scipy.stats import binomtest

from specpt_hf.atomic import atomic_write_json, atomic_write_text
from specpt_hf.evaluation import metrics

METHODS = ("network", "refined")


def method_column(predictions: Table, method: str, path: Path) -> str:
    """The one `Z_... {method}` column of an accuracy.py predictions table."""
    columns = [c for c in predictions.colnames if c.startswith("Z_") and c.endswith(f" {method}")]
    if len(columns) != 1:
        raise ValueError(f"{path}: expected one `Z_... {method}` column, found {columns or 'none'}")
    return columns[0]


def read_predictions(folder: Path) -> Table:
    """The `predictions.ecsv` of an accuracy.py output folder."""
    path = folder / "predictions.ecsv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (an accuracy.py --out folder holds one)")
    return Table.read(path)


def method_redshifts(predictions: Table, method: str, path: Path) -> Table:
    """TARGETID, TARGET_CLASS, Z and one method's redshift (`network` or `refined`, as column `Z_PRED`)."""
    out = predictions["TARGETID", "TARGET_CLASS", "Z"]
    out["Z_PRED"] = predictions[method_column(predictions, method, path)]
    return out


def compare(first: Table, second: Table) -> dict[str, dict[str, Any]]:
    """{class: {n, nmad, eta (each a pair), both, first_only, second_only, p_value}} on the shared TARGETIDs."""
    joined = join(first, second, keys=["TARGETID"], table_names=["1", "2"], join_type="inner")
    if not np.array_equal(joined["Z_1"], joined["Z_2"]):
        raise ValueError(
            "the two folders give different true redshifts for the same TARGETID: not one test set"
        )
    out: dict[str, dict[str, Any]] = {}
    for cls in CLASSES:
        rows = joined[joined["TARGET_CLASS_1"] == cls]
        if not len(rows):
            continue
        z = np.asarray(rows["Z_1"])
        predictions = [np.asarray(rows["Z_PRED_1"]), np.asarray(rows["Z_PRED_2"])]
        failed = [metrics.catastrophic(p, z) for p in predictions]
        first_only = int(np.sum(failed[0] & ~failed[1]))
        second_only = int(np.sum(failed[1] & ~failed[0]))
        discordant = first_only + second_only
        out[cls] = {
            "n": len(rows),
            "nmad": [metrics.nmad(p, z) for p in predictions],
            "eta": [float(np.mean(f)) for f in failed],
            "both": int(np.sum(failed[0] & failed[1])),
            "first_only": first_only,
            "second_only": second_only,
            "p_value": binomtest(second_only, discordant).pvalue if discordant else 1.0,
        }
    return out


def format_table(result: dict[str, dict[str, Any]], labels: list[str]) -> str:
    a, b = labels
    lines = [
        f"| class | n | NMAD {a} / {b} | η {a} / {b} | failures of both | {a} only | {b} only | McNemar p |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for cls, r in result.items():
        lines.append(
            f"| {cls.upper()} | {r['n']} | {r['nmad'][0]:.5f} / {r['nmad'][1]:.5f} "
            f"| {100 * r['eta'][0]:.2f} / {100 * r['eta'][1]:.2f} % | {r['both']} | {r['first_only']} "
            f"| {r['second_only']} | {r['p_value']:.3g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folders", type=Path, nargs=2, help="two accuracy.py output folders")
    parser.add_argument("--labels", nargs=2, help="names for the two models (default: the folder names)")
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for comparison.json and comparison.md"
    )
    args = parser.parse_args(argv)
    labels = args.labels or [folder.name for folder in args.folders]
    try:
        tables = [read_predictions(folder) for folder in args.folders]
        result = {
            method: compare(
                *(method_redshifts(t, method, f) for t, f in zip(tables, args.folders, strict=True))
            )
            for method in METHODS
        }
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    record = {"folders": [str(f) for f in args.folders], "labels": labels}
    atomic_write_json(args.out / "comparison.json", {**record, **result})
    text = "\n\n".join(
        f"{method}: {labels[0]} against {labels[1]}\n\n{format_table(result[method], labels)}"
        for method in METHODS
    )
    atomic_write_text(args.out / "comparison.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
