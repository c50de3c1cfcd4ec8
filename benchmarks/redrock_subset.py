"""SpecPT's metrics on the spectra of a Redrock run that fitted the first N targets of each class's first file.

    python benchmarks/redrock_subset.py runs/benchmarks/accuracy-recipe --per-class 250

`accuracy.py --redrock-per-class N` fits the first N targets of each class's first test file with Redrock. A later
`accuracy.py --no-redrock` run of a new model predicts every test spectrum; this script reads its
`predictions.ecsv` (truth, file and one `Z_{method}` column per SpecPT method) and computes NMAD and η of each
method on those same N spectra per class, so that they sit beside the committed Redrock figures. Methods whose
label contains `refined` are reported as `refined`, the others as `network`. Writes redrock_subset.json into the
folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table

from specpt_hf.atomic import atomic_write_json
from specpt_hf.evaluation import metrics

CLASSES = ("bgs", "lrg", "elg", "qso")


def subset_metrics(predictions: Table, per_class: int) -> dict[str, dict[str, dict[str, Any]]]:
    """{network | refined: {class: {n, nmad, eta}}} on the first `per_class` rows of each class's first file."""
    methods = [name for name in predictions.colnames if name.startswith("Z_")]
    if not methods:
        raise ValueError("the predictions hold no `Z_{method}` column")
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for column in methods:
        kind = "refined" if "refined" in column else "network"
        for cls in CLASSES:
            rows = predictions[predictions["TARGET_CLASS"] == cls]
            if not len(rows):
                continue
            first = sorted(set(rows["FILE"]))[0]
            rows = rows[rows["FILE"] == first][:per_class]
            summary = metrics.redshift_metrics(np.asarray(rows[column]), np.asarray(rows["Z"]))
            out.setdefault(kind, {})[cls] = {
                "n": len(rows),
                "nmad": summary["nmad"],
                "eta": summary["eta"],
            }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path, help="an accuracy.py output folder (with predictions.ecsv)")
    parser.add_argument("--per-class", type=int, default=250, help="the Redrock run's --redrock-per-class")
    args = parser.parse_args(argv)
    path = args.folder / "predictions.ecsv"
    if not path.is_file():
        parser.error(f"{path}: no such file (run accuracy.py with --out {args.folder} first)")
    result = subset_metrics(Table.read(path), args.per_class)
    atomic_write_json(args.folder / "redrock_subset.json", result)
    for kind, classes in result.items():
        print(kind, {cls: f"NMAD {v['nmad']:.5f}, η {100 * v['eta']:.1f} %" for cls, v in classes.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
