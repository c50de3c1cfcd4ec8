"""Robustness: the held-out mocks under each training augmentation's perturbation at a documented amplitude.

    python benchmarks/robustness.py --model runs/specpt-small-cpu/redshift/best \
        --test-dir runs/benchmarks/accuracy/testset --per-class 250 --out benchmarks/results/robustness
    python benchmarks/robustness.py --quick --out /tmp/rb      # minutes: an untrained tiny model, 8 per class

The first --per-class spectra of each class's first held-out file (seed 101) are read once, put on the model's
grid, perturbed by one of `PERTURBATIONS` at a time (specpt_hf/training/augment.py, probability 1, seeded) and
predicted (network-only and, with templates, refined). NMAD and η per class and their ratios to the unperturbed
set go to robustness.json / robustness.md, and the degradation per perturbation to robustness.png. Amplitudes
(DESI-typical): flux calibration 2 % rms per arm (DESI's calibration is good to ~1-2 %), sky residuals at 2 sigma
of the local noise on the strong sky lines, one masked span of up to 200 pixels (160 A), S/N lowered by up to
2x, a resolution / velocity-dispersion blur of up to 1 pixel sigma (~48 km/s), Galactic E(B-V) up to 0.1 (most of
the DESI footprint lies below). The second mock family the issue asks for does not exist yet: not measured.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import CLASSES, TEST_SEED, make_test_set, read_truth  # noqa: E402
from speed import machine_info  # noqa: E402

from specpt_hf.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from specpt_hf.data import read_desi_spectra  # noqa: E402
from specpt_hf.data.desi import desi_brz_wavelength  # noqa: E402
from specpt_hf.evaluation.metrics import metrics_by_group  # noqa: E402
from specpt_hf.evaluation.plots import _figure  # noqa: E402
from specpt_hf.pipeline_specpt import load_model, model_wavelength, predict_spectra, to_model_grid  # noqa: E402
from specpt_hf.training.augment import Augmentations, augment, step_generator  # noqa: E402

PERTURBATIONS: dict[str, Augmentations] = {
    "none": Augmentations(probability=1.0),
    "calibration 2 %": Augmentations(probability=1.0, calibration=0.02),
    "sky residuals 2σ": Augmentations(probability=1.0, sky_residual=2.0),
    "masked span ≤ 200 px": Augmentations(probability=1.0, masked_span=200),
    "S/N ÷ ≤ 2": Augmentations(probability=1.0, renoise=2.0),
    "blur σ ≤ 1 px": Augmentations(probability=1.0, resolution=1.0),
    "E(B-V) ≤ 0.1": Augmentations(probability=1.0, ebv=0.1),
}


def held_out(
    files: list[Path], per_class: int, config: Any
) -> tuple[dict[str, torch.Tensor], np.ndarray, np.ndarray]:
    """The first `per_class` spectra of each file on the model's grid, their true z and classes."""
    truth = read_truth(files)
    z_of = dict(zip(truth["TARGETID"].tolist(), np.asarray(truth["Z"], float).tolist(), strict=True))
    class_of = dict(zip(truth["TARGETID"].tolist(), truth["TARGET_CLASS"].tolist(), strict=True))
    records = [r for path in files for r in list(read_desi_spectra(path))[:per_class]]
    stack = {key: np.stack([r[key] for r in records]) for key in ("flux", "ivar", "mask")}
    flux, ivar, mask = to_model_grid(
        config, stack["flux"], stack["ivar"], stack["mask"], desi_brz_wavelength()
    )
    batch = {"flux": torch.tensor(flux), "ivar": torch.tensor(ivar), "mask": torch.tensor(mask)}
    ids = [r["targetid"] for r in records]
    return batch, np.array([z_of[t] for t in ids]), np.array([class_of[t] for t in ids])


def run(
    model: Any, batch: dict[str, torch.Tensor], z_true: np.ndarray, classes: np.ndarray, seed: int
) -> dict:
    """{perturbation: {"refined"|"network": metrics by class}}."""
    wave = model_wavelength(model.config)
    out = {}
    for k, (name, settings) in enumerate(PERTURBATIONS.items()):
        perturbed = augment(batch, wave, settings, step_generator(seed, k))
        columns = {"z": [], "z_net": []}
        for start in range(0, len(z_true), 64):
            part = slice(start, start + 64)
            result = predict_spectra(
                model,
                perturbed["flux"][part].numpy(),
                perturbed["ivar"][part].numpy(),
                perturbed["mask"][part].numpy(),
            )
            columns["z"].append(result["z"])
            columns["z_net"].append(result["z_net"])
        methods = {"refined": "z", "network": "z_net"} if model.refines else {"network": "z_net"}
        out[name] = {
            method: metrics_by_group(
                np.nan_to_num(np.concatenate(columns[key]), nan=-0.5), z_true, classes, overall_key="all"
            )
            for method, key in methods.items()
        }
        print(
            f"{name}: "
            + ", ".join(
                f"{m} NMAD {v['all']['nmad']:.5f} η {100 * v['all']['eta']:.1f} %"
                for m, v in out[name].items()
            )
        )
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Robustness to DESI-like perturbations",
        "",
        f"{results['test_set']}; model `{results['model']}`. Machine: {results['machine']['summary']}, "
        f"{results['machine']['date']}. Ratios are to the unperturbed set (`none`); η in percentage points.",
        "",
        "| perturbation | method | class | n | NMAD | NMAD ratio | η (%) | Δη (points) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = results["metrics"]["none"]
    for name, methods in results["metrics"].items():
        for method, by_class in methods.items():
            for cls in ("all", *CLASSES):
                m, b = by_class.get(cls), base[method].get(cls)
                if m and m["n"]:
                    ratio = m["nmad"] / b["nmad"] if b["nmad"] else float("nan")
                    lines.append(
                        f"| {name} | {method} | {cls} | {m['n']} | {m['nmad']:.5f} | {ratio:.2f} | "
                        f"{100 * m['eta']:.2f} | {100 * (m['eta'] - b['eta']):+.2f} |"
                    )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> Path:
    names = list(results["metrics"])
    base = results["metrics"]["none"]
    with _figure(path, figsize=(11.0, 4.0)) as fig:
        ax_nmad, ax_eta = fig.subplots(1, 2)
        width = 0.8 / len(base)
        for i, method in enumerate(base):
            x = np.arange(len(names)) + i * width
            ratio = [
                results["metrics"][n][method]["all"]["nmad"] / base[method]["all"]["nmad"] for n in names
            ]
            delta = [
                100 * (results["metrics"][n][method]["all"]["eta"] - base[method]["all"]["eta"])
                for n in names
            ]
            ax_nmad.bar(x, ratio, width, label=method)
            ax_eta.bar(x, delta, width, label=method)
        for ax, label, floor in ((ax_nmad, "NMAD ÷ unperturbed", 1.3), (ax_eta, "Δη (points)", 1.0)):
            ax.axhline(floor, color="k", ls="--", lw=1, label=f"floor {floor:g}")
            ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=25, ha="right")
            ax.set_ylabel(label)
        ax_nmad.legend()
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="SpecPT redshift model folder (with --quick: an untrained tiny one)")
    parser.add_argument("--test-dir", type=Path, help="held-out test set folder (default: OUT/testset)")
    parser.add_argument(
        "--n-per-class", type=int, default=5000, help="test-set size per class (as accuracy.py)"
    )
    parser.add_argument(
        "--per-class", type=int, default=250, help="spectra per class perturbed and predicted"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the perturbations")
    parser.add_argument("--quick", action="store_true", help="8 per class, an untrained specpt-tiny")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        from specpt_hf import create_model

        args.n_per_class = args.per_class = 8
        torch.manual_seed(0)
        create_model("specpt-tiny", "redshift").save_pretrained(out / "specpt-tiny")
        args.model = out / "specpt-tiny"
    if args.model is None:
        parser.error("--model is required (or --quick)")
    spf = [args.n_per_class] if args.quick else []
    per_class = make_test_set(args.test_dir or out / "testset", args.n_per_class, TEST_SEED, *spf)
    model = load_model(args.model, task="redshift")
    batch, z_true, classes = held_out([per_class[c][0] for c in CLASSES], args.per_class, model.config)
    results = {
        "machine": machine_info("cpu"),
        "test_set": f"the first {args.per_class} spectra of each class's first held-out file (seed {TEST_SEED})",
        "model": str(args.model),
        "amplitudes": {name: vars(settings) for name, settings in PERTURBATIONS.items()},
        "metrics": run(model, batch, z_true, classes, args.seed),
    }
    atomic_write_json(out / "robustness.json", results, default=str)
    atomic_write_text(out / "robustness.md", markdown(results))
    plot(results, out / "robustness.png")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
