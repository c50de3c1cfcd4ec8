"""The refinement's frontier: modes K and window W (p(z) bins) against NMAD, catastrophic rate and speed.

    python benchmarks/refinement_frontier.py --model runs/specpt-small-cpu/redshift/best \
        --test-dir runs/benchmarks/accuracy/testset --out runs/benchmarks/frontier
    python benchmarks/refinement_frontier.py --quick --out /tmp/frontier     # seconds: untrained tiny model

The model (with its `templates.safetensors`, `specpt templates`) runs `specpt predict` (`predict_catalog`) on the
first `--files-per-class` coadd files of each class of the accuracy test set (seed 101, `accuracy.py`), once per
setting: network-only (`none`), `peaks` with each (K, W) and number of coarse-curve vectors, and `peaks+wide` at the
config's K and W with all coarse-curve vectors and with the config default's number; then network-only, peaks K=3
with W=2 and W=4, and peaks+wide again with the network under
bfloat16 autocast (`specpt predict --bf16`; fast on CPUs with AMX / AVX512-BF16, slow elsewhere). Speed is spectra
per CPU-second (user + system of all threads) with `--threads` torch threads, end to end (read, network,
refinement, catalog), next to Redrock's per-core rate from benchmarks/results/speed/speed.json (same machine
type; `--redrock-rate` overrides it). `--only-config` runs the model's own setting alone (to time one model, e.g.
with archetypes, against another). Writes frontier.json, frontier.md and frontier.png to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table, join

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import CLASSES, make_test_set, read_truth  # noqa: E402
from speed import _cpu_seconds, load_redshift_model, machine_info, model_label, predict_coadds  # noqa: E402

from specpt_hf.atomic import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402
from specpt_hf.configuration_specpt import SpecPTForRedshiftConfig  # noqa: E402
from specpt_hf.evaluation import metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# (refinement, modes K, window W in p(z) bins, coarse vectors: 0 = all, bf16 autocast of the network)
SETTINGS = [
    ("none", 0, 0.0, 0, False),
    ("peaks", 1, 1.0, 0, False),
    ("peaks", 1, 2.0, 0, False),
    ("peaks", 3, 2.0, 0, False),
    ("peaks", 3, 4.0, 0, False),
    ("peaks", 1, 1.0, 5, False),
    ("peaks", 3, 2.0, 5, False),
    ("none", 0, 0.0, 0, True),
    ("peaks", 3, 2.0, 0, True),
    ("peaks", 3, 4.0, 0, True),
]


def redrock_rate(path: Path = REPO / "benchmarks" / "results" / "speed" / "speed.json") -> float | None:
    """Redrock's spectra per CPU-core-second, end to end, from a speed.py result (None without one)."""
    if not path.is_file():
        return None
    return json.loads(path.read_text())["redrock"].get("spectra_per_second_per_core")


def run_setting(
    model: Any,
    coadds: list[Path],
    truth: Any,
    out: Path,
    refine: str,
    modes: int,
    window: float,
    coarse: int,
    bf16: bool,
):
    """One `specpt predict` run under a refinement setting: metrics per class and spectra per CPU-second."""
    model.config.refinement, model.config.refinement_coarse_vectors = refine, coarse
    if modes:
        model.config.refinement_modes, model.config.refinement_window = modes, window
    cpu, wall = _cpu_seconds(), time.perf_counter()
    catalog = out / f"catalog-{refine}-{modes}-{window:g}-{coarse}{'-bf16' if bf16 else ''}.fits"
    columns = predict_coadds(model, coadds, catalog, batch_size=64, bf16=bf16)
    cpu, wall = _cpu_seconds() - cpu, time.perf_counter() - wall
    predicted = Table(
        {"TARGETID": columns["targetid"], "Z_PRED": columns["z_pred"], "ZWARN": columns["zwarn"]}
    )
    rows = join(predicted, truth["TARGETID", "Z", "TARGET_CLASS"], "TARGETID", keep_order=True)
    classes = np.asarray(rows["TARGET_CLASS"]).astype(str)
    by_class = metrics.metrics_by_group(
        np.asarray(rows["Z_PRED"]), np.asarray(rows["Z"]), classes, overall_key="all"
    )
    good = np.asarray(rows["ZWARN"]) == 0
    return {
        "refinement": refine,
        "modes": modes,
        "window_bins": window,
        "coarse_vectors": coarse,
        "bf16": bf16,
        "n": len(rows),
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "spectra_per_cpu_second": len(predicted) / cpu,
        "by_class": {name: {k: by_class[name][k] for k in ("n", "nmad", "eta")} for name in by_class},
        "zwarn0_fraction": {name: float(good[classes == name].mean()) for name in CLASSES if name in classes},
    }


def markdown(result: dict[str, Any]) -> str:
    rate = result["redrock_spectra_per_core_second"]
    lines = [
        f"# Refinement frontier: {result['model']}",
        "",
        f"{result['n_per_class']} test spectra per class (accuracy test set, seed 101), {result['threads']} torch "
        f"thread(s); Redrock: {rate if rate is None else f'{rate:.3f}'} spectra per core-second "
        f"({result.get('redrock_rate_source', 'benchmarks/results/speed')}). NMAD and η (|Δz|/(1+z) > 0.15) per "
        "class.",
        "",
        "| refinement | K | W (bins) | coarse vectors | network | spectra / CPU-s | × Redrock per core | "
        + " | ".join(f"{c.upper()} NMAD | {c.upper()} η (%)" for c in CLASSES)
        + " |",
        "| --- | --- | --- | --- | --- | --- | --- | " + " | ".join("--- | ---" for _ in CLASSES) + " |",
    ]
    for row in result["settings"]:
        ratio = f"{row['spectra_per_cpu_second'] / rate:.0f}" if rate else "—"
        cells = []
        for name in CLASSES:
            m = row["by_class"].get(name)
            cells += [f"{m['nmad']:.5f}", f"{100 * m['eta']:.2f}"] if m else ["—", "—"]
        k, w = (row["modes"], f"{row['window_bins']:g}") if row["modes"] else ("—", "—")
        coarse = row.get("coarse_vectors") or "all"
        lines.append(
            f"| {row['refinement']} | {k} | {w} | {coarse} | {'bf16' if row.get('bf16') else 'fp32'} | "
            f"{row['spectra_per_cpu_second']:.1f} | {ratio} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    """NMAD per class against spectra per CPU-second, one point per setting."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.subplots()
    for name in CLASSES:
        points = [(r["spectra_per_cpu_second"], r["by_class"][name]["nmad"]) for r in result["settings"]]
        ax.plot(*zip(*points, strict=True), "o-", label=name.upper(), ms=4)
    for r in result["settings"]:
        label = (
            "net"
            if r["refinement"] == "none"
            else f"{r['refinement']} K{r['modes']} W{r['window_bins']:g}"
            + (f" c{r['coarse_vectors']}" if r.get("coarse_vectors") else "")
        ) + (" bf16" if r.get("bf16") else "")
        ax.annotate(label, (r["spectra_per_cpu_second"], r["by_class"]["all"]["nmad"]), fontsize=6)
    if result["redrock_spectra_per_core_second"] and result["threads"] == 1:
        ax.axvline(
            100 * result["redrock_spectra_per_core_second"], ls="--", c="k", lw=0.8, label="100× Redrock"
        )
    ax.set(xscale="log", yscale="log", xlabel="spectra per CPU-second", ylabel="NMAD")
    ax.legend(fontsize=7)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=130))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="SpecPTForRedshift folder with templates")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--test-dir", type=Path, help="accuracy.py's test set (default: OUT/testset)")
    parser.add_argument("--files-per-class", type=int, default=1, help="500 spectra each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the per-core rate)")
    parser.add_argument("--redrock-rate", type=float, help="Redrock spectra per core-second")
    parser.add_argument(
        "--only-config",
        action="store_true",
        help="only the model's own setting (its refinement, K, W and coarse vectors; fp32), e.g. to time one model "
        "against another",
    )
    parser.add_argument(
        "--quick", action="store_true", help="untrained specpt-tiny + learned templates, 6 per class"
    )
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    n_per_class = 6 if args.quick else 5000
    per_class = make_test_set(
        args.test_dir or args.out / "testset", n_per_class, spectra_per_file=6 if args.quick else 500
    )
    coadds = [p for name in CLASSES for p in per_class[name][: args.files_per_class]]
    truth = read_truth(coadds)
    model = load_redshift_model("specpt-tiny", args.model)
    if args.quick:
        model.set_templates(quick_templates(coadds, truth, model))
    if not model.refines:
        parser.error(f"{args.model}: the model has no templates (add them with `specpt templates`)")
    default_coarse = SpecPTForRedshiftConfig().refinement_coarse_vectors
    wide = [
        ("peaks+wide", model.config.refinement_modes, model.config.refinement_window, coarse, bf16)
        for coarse in (0, default_coarse)
        for bf16 in (False, True)
    ]
    config = model.config
    own = (
        config.refinement,
        config.refinement_modes,
        config.refinement_window,
        config.refinement_coarse_vectors,
    )
    settings = [(*own, False)] if args.only_config else [*SETTINGS, *wide]
    result = {
        "machine": machine_info("cpu"),
        "model": model_label(args.model) if args.model else "specpt-tiny (untrained)",
        "threads": args.threads,
        "n_per_class": len(truth) // len(CLASSES),
        "redrock_spectra_per_core_second": args.redrock_rate or redrock_rate(),
        "redrock_rate_source": "--redrock-rate" if args.redrock_rate else "benchmarks/results/speed",
        "settings": [run_setting(model, coadds, truth, args.out, *s) for s in settings],
    }
    atomic_write_json(args.out / "frontier.json", result)
    atomic_write_text(args.out / "frontier.md", markdown(result))
    plot(result, args.out / "frontier.png")
    print(markdown(result))
    return 0


def quick_templates(coadds: list[Path], truth: Any, model: Any) -> dict:
    """Templates learned from the quick test files themselves (a smoke test, not a measurement)."""
    from specpt_hf.data.desi import read_desi_spectra
    from specpt_hf.prediction import model_wavelength
    from specpt_hf.refinement import build_templates

    records = [r for path in coadds for r in read_desi_spectra(path)]
    flux = np.stack([r["flux"] for r in records])
    ivar = np.stack([np.where(r["mask"], 0.0, r["ivar"]) for r in records])
    z_of = dict(zip(np.asarray(truth["TARGETID"]).tolist(), np.asarray(truth["Z"]), strict=True))
    z = np.array([z_of[int(r["targetid"])] for r in records])
    return {"GALAXY": build_templates(model_wavelength(model.config), flux, ivar, z, num_vectors=4)}


if __name__ == "__main__":
    sys.exit(main())
