"""Redshift accuracy of SpecPT against Redrock on the same held-out mock spectra, per class and redshift bin.

    python benchmarks/accuracy.py --model runs/specpt-small-redshift/best --out runs/benchmarks/accuracy
    python benchmarks/accuracy.py --model A B --out OUT --redrock-per-class 0     # two models; Redrock on all
    python benchmarks/accuracy.py --out OUT --redrock-per-class 500 --resume     # Redrock only, resumable
    python benchmarks/accuracy.py --quick --out /tmp/accuracy                    # an untrained tiny model

The test set is written by the mock generator with its own seed (101) and healpix range (30000+), never the
training seeds (0: `make main`, 1: benchmarks/train_specpt_small_cpu.py): --n-per-class spectra of each of
BGS, LRG, ELG, QSO (5,000 by default), in files of 500. Every model given by --model predicts all of them
through `specpt predict` (catalogs kept as specpt-{k}.fits); Redrock (templates from redrock_templates.py,
its default redshift grids, --mp processes) fits the first --redrock-per-class of each class (whole files;
below one file, the first --redrock-per-class fibers of the class's first file, `rrdesi --ntargets`, the
sky fibers among them included; 0 = all: ~1.2 CPU-core-seconds per spectrum). Without --model only Redrock runs; with
--resume, Redrock outputs already in OUT/redrock are read back instead of fitted again (so Redrock can run
ahead of, or be interrupted and continue apart from, the models; its times then cover the new fits only).
Metrics (`specpt_hf.evaluation.metrics`: NMAD, η = |Δz|/(1+z) > 0.15, bias, σ68) are computed against
the mock's true redshifts:

* `common`: the spectra every method fitted — the head-to-head comparison;
* `confident`: the part of `common` that passes Redrock's own good-redshift cut (ZWARN = 0 and DELTACHI2
  above the class's DESI cut), the sample DESI's published numbers describe, with its fraction;
* `ordinary` / `hard`: the mock's truth flags (LOW_SNR, LINE_ON_SKY, NO_LINES, LINE_OFF_GRID, BAL);
* `all`: every spectrum, for the SpecPT models.

How hard the mocks are: median per-pixel S/N in the r arm per class (the SCORES column
MEDIAN_COADD_SNR_R, which DESI's pipeline writes the same way), its percentiles, and the fraction of
each hard-case flag. Real reference: the same column for the DESI (Fuji) target spectra shipped with
specutils (three spectra: reference points, not a distribution). DESI publishes its depth as effective
time (EFFTIME, from the template S/N² TSNR2, the same bookkeeping the mock writes) and its targets as
magnitude-limited selections: per class, the mock's EFFTIME over the program's goal and the selection
magnitude against DESI's limit (DESI_DESIGN, with sources). Published accuracy figures are listed next to ours with their sources; they are
measured on real DESI spectra against Redrock or visual inspection, so they are context, not a like-for-
like comparison.

Writes accuracy.json, accuracy.md and PNG plots (z_pred vs z_true, NMAD and η vs redshift, S/N) to --out.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table, join, vstack

sys.path.insert(0, str(Path(__file__).resolve().parent))
from redrock_templates import QUICK_SETTINGS, build_templates  # noqa: E402
from run_redrock import QUICK_ZSCAN, RedrockError, redrock_missing, run_redrock  # noqa: E402
from speed import load_redshift_model, machine_info, model_label, predict_coadds  # noqa: E402

from specpt_hf.atomic import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402
from specpt_hf.data.mock import DELTACHI2_CUT, HARD_FLAGS, SPS_CLASSES, write_mock_release  # noqa: E402
from specpt_hf.data.redshifts import EXTRAGALACTIC_CLASSES as CLASSES  # noqa: E402
from specpt_hf.evaluation import metrics  # noqa: E402

MAGNITUDES = ("MAG_R", "FIBERMAG_G", "FIBERMAG_Z")
TEST_SEED = 101
TEST_HEALPIX = 30000
SPS_TEST_HEALPIX = 35000  # the sps family's held-out set (benchmarks/robustness.py)
BC03_TEST_HEALPIX = 37000  # the bc03 family's
SPECTRA_PER_FILE = 500
# Held-out sets per mock family: (classes, first healpix).
TEST_SETS = {
    "basis": (CLASSES, TEST_HEALPIX),
    "sps": (SPS_CLASSES, SPS_TEST_HEALPIX),
    "bc03": (SPS_CLASSES, BC03_TEST_HEALPIX),
}
# True-redshift bins per class, covering each mock population.
Z_BINS = {
    "bgs": (0.0, 0.1, 0.2, 0.3, 0.4, 0.6),
    "lrg": (0.4, 0.6, 0.8, 1.0, 1.1),
    "elg": (0.6, 0.8, 1.0, 1.2, 1.4, 1.65),
    "qso": (0.9, 1.5, 2.1, 2.8, 3.6),
}
# Published figures, all on real DESI spectra (context, not like-for-like).
PUBLISHED = [
    {
        "source": "SpecPT paper (Pattnaik, Kartaltepe & Binu, arXiv:2501.01070), DESI EDR, truth = Redrock",
        "bgs": {"nmad": 0.0006, "eta": 0.0020},
        "elg": {"nmad": 0.0008, "eta": 0.0080},
        "note": "the floors this project aims at",
    },
    {
        "source": "Redrock against visual inspection of DESI survey-validation spectra (project reference notes)",
        "bgs": {"velocity_precision_kms": 10, "sigma_dz_1pz": 10 / 299792.458},
        "elg": {"velocity_precision_kms": 10, "sigma_dz_1pz": 10 / 299792.458},
        "lrg": {
            "velocity_precision_kms": 40,
            "sigma_dz_1pz": 40 / 299792.458,
            "confident_fraction": 0.989,
            "eta": 0.002,
        },
        "note": "precision of confident redshifts; NMAD is not quoted",
    },
]

# DESI's published survey design, per class: the program's effective-time goal per tile (EFFTIME, the depth
# DESI's S/N bookkeeping is normalised to) and the target-selection magnitude limit.
DESI_DESIGN = {
    "bgs": {"efftime_s": 180.0, "band": "MAG_R", "limit": 19.5, "selection": "BGS Bright r < 19.5"},
    "lrg": {"efftime_s": 1000.0, "band": "FIBERMAG_Z", "limit": 21.6, "selection": "LRG z_fiber < 21.6"},
    "elg": {"efftime_s": 1000.0, "band": "FIBERMAG_G", "limit": 24.1, "selection": "ELG g_fiber < 24.1"},
    "qso": {"efftime_s": 1000.0, "band": "MAG_R", "limit": 23.0, "selection": "QSO r < 23"},
}
DESI_DESIGN_SOURCE = (
    "EFFTIME goals: Schlafly et al. 2023 (AJ 166, 259), 1000 s dark / 180 s bright; selections: Hahn et al. "
    "2023 (BGS), Zhou et al. 2023 (LRG), Raichoor et al. 2023 (ELG), Chaussidon et al. 2023 (QSO)"
)


# ------------------------------------------------------------------------------------------ test set


def make_test_set(
    root: Path,
    n_per_class: int,
    seed: int = TEST_SEED,
    spectra_per_file: int = SPECTRA_PER_FILE,
    family: str = "basis",
) -> dict[str, list[Path]]:
    """The held-out mock release of a mock `family` under `root` (its classes, its healpix range: `TEST_SETS`),
    reused when its manifest matches; coadd paths per class."""
    classes, first_healpix = TEST_SETS[family]
    return make_mock_set(root, classes, n_per_class, seed, spectra_per_file, first_healpix, family)


def make_mock_set(
    root: Path,
    classes: Sequence[str],
    n_per_class: int,
    seed: int,
    spectra_per_file: int,
    first_healpix: int,
    family: str = "basis",
) -> dict[str, list[Path]]:
    """A mock release under `root` (`write_mock_release`), written once: reused while `root/testset.json` holds
    the same settings; coadd paths per class, files in order."""
    manifest = root / "testset.json"
    wanted: dict[str, Any] = {
        "n_per_class": n_per_class,
        "seed": seed,
        "spectra_per_file": spectra_per_file,
        "first_healpix": first_healpix,
    }
    if tuple(classes) != CLASSES:
        wanted["classes"] = list(classes)
    if family != "basis":
        wanted["family"] = family
    if not (manifest.is_file() and json.loads(manifest.read_text()) == wanted):
        counts = dict.fromkeys(classes, n_per_class)
        paths = write_mock_release(
            root, counts, seed, spectra_per_file, first_healpix=first_healpix, family=family
        )
        coadds = [str(p.relative_to(root)) for p in paths if p.name.startswith("coadd-")]
        atomic_write_json(manifest.with_name("files.json"), coadds)
        atomic_write_json(manifest, wanted)
    coadds = [root / p for p in json.loads((root / "files.json").read_text())]
    per_class: dict[str, list[Path]] = {name: [] for name in classes}
    for path in coadds:  # write_mock_release goes class by class, files in order
        with fits.open(truth_path(path)) as hdul:
            per_class[str(hdul["TRUTH"].data["TARGET_CLASS"][0]).strip()].append(path)
    return per_class


def truth_path(coadd: Path) -> Path:
    return coadd.with_name(coadd.name.replace("coadd-", "truth-", 1))


def read_truth(coadds: Sequence[Path], extra: Sequence[str] = ()) -> Table:
    """TARGETID, Z, TARGET_CLASS, SPECTYPE, HARD, EFFTIME, magnitudes, the `extra` truth columns (e.g. SUBTYPE
    of stars) and SNR_R (MEDIAN_COADD_SNR_R) of every mock target."""
    parts = []
    for path in coadds:
        truth = Table.read(truth_path(path), hdu="TRUTH")
        scores = Table.read(path, hdu="SCORES")["TARGETID", "MEDIAN_COADD_SNR_R"]
        scores["SNR_R"] = scores["MEDIAN_COADD_SNR_R"].astype(np.float64)
        part = truth[["TARGETID", "Z", "TARGET_CLASS", "SPECTYPE", "HARD", "EFFTIME", *MAGNITUDES, *extra]]
        part = join(
            part,
            scores["TARGETID", "SNR_R"],
            "TARGETID",
            "left",
            keep_order=True,
            metadata_conflicts="silent",
        )
        if np.ma.is_masked(part["SNR_R"]):
            raise ValueError(f"{path}: HDU SCORES lacks targets of {truth_path(path).name}")
        part["FILE"] = path.name
        parts.append(part)
    table = vstack(parts, metadata_conflicts="silent")
    for name in ("TARGET_CLASS", "SPECTYPE", *(c for c in extra if table[c].dtype.kind in "SU")):
        table[name] = np.char.strip(np.asarray(table[name]).astype(str))
    return table


def desi_reference_snr() -> list[dict[str, Any]]:
    """MEDIAN_COADD_SNR_R and class of the real DESI target spectra with data in specutils' test files."""
    from specpt_hf.data.redshifts import target_class_of

    folder = Path(str(importlib.resources.files("specutils") / "io/default_loaders/tests/desi_test_data"))
    rows = []
    for path in sorted(folder.glob("coadd-*.fits")):
        with fits.open(path) as hdul:
            fm, scores = hdul["FIBERMAP"].data, hdul["SCORES"].data
            survey = str(hdul[0].header.get("SURVEY", "")) or None
            classes = target_class_of({c: fm[c] for c in fm.dtype.names}, survey)
            for i in np.flatnonzero(np.char.strip(np.asarray(fm["OBJTYPE"]).astype(str)) == "TGT"):
                if scores["MEDIAN_COADD_SNR_R"][i] > 0:
                    rows.append(
                        {
                            "file": path.name,
                            "targetid": int(fm["TARGETID"][i]),
                            "target_class": str(classes[i]),
                            "snr_r": float(scores["MEDIAN_COADD_SNR_R"][i]),
                        }
                    )
    return rows


# ------------------------------------------------------------------------------------------ metrics


def _percentiles(values: np.ndarray) -> dict[str, float]:
    p = np.percentile(values, [5, 16, 50, 84, 95])
    return dict(zip(("p05", "p16", "p50", "p84", "p95"), map(float, p), strict=True))


def hardness(truth: Table) -> dict[str, Any]:
    """Per class: S/N and depth (EFFTIME / DESI's goal) percentiles, the selection magnitude's percentiles and
    the share inside DESI's limit, and the fraction of each hard-case flag."""
    out = {}
    for name in CLASSES:
        sel = np.asarray(truth["TARGET_CLASS"]) == name
        if not sel.any():
            continue
        snr, hard = np.asarray(truth["SNR_R"])[sel], np.asarray(truth["HARD"])[sel]
        design = DESI_DESIGN[name]
        magnitude = np.asarray(truth[design["band"]], dtype=np.float64)[sel]
        out[name] = {
            "n": int(sel.sum()),
            "snr_r_percentiles": _percentiles(snr),
            "depth_percentiles": _percentiles(np.asarray(truth["EFFTIME"])[sel] / design["efftime_s"]),
            "magnitude_percentiles": _percentiles(magnitude),
            "within_desi_limit": float(np.mean(magnitude <= design["limit"])),
            "hard_fraction": float(np.mean(hard != 0)),
            **{f"frac_{flag.lower()}": float(np.mean((hard & bit) != 0)) for flag, bit in HARD_FLAGS.items()},
        }
    return out


def redrock_confident(table: Table) -> np.ndarray:
    """Redrock's good-redshift cut of DESI analyses: ZWARN == 0 and DELTACHI2 above the class's cut."""
    cut = np.array([DELTACHI2_CUT[c] for c in np.asarray(table["TARGET_CLASS"])])
    return (np.asarray(table["RR_ZWARN"]) == 0) & (np.asarray(table["RR_DELTACHI2"]) > cut)


def _group_metrics(z_pred: np.ndarray, z_true: np.ndarray, classes: np.ndarray) -> dict[str, dict]:
    return metrics.metrics_by_group(z_pred, z_true, classes, overall_key="all") if len(z_true) else {}


def _own_confident(table: Table, method: str) -> dict[str, Any]:
    """A method's metrics on its own confident spectra (SpecPT: ZWARN = 0; Redrock: `redrock_confident`),
    out of every spectrum it fitted, with the confident fraction per class."""
    fitted = np.isfinite(np.asarray(table[f"Z_{method}"]))
    good = redrock_confident(table) if method == "Redrock" else np.asarray(table[f"ZWARN_{method}"]) == 0
    classes = np.asarray(table["TARGET_CLASS"])
    sel = fitted & good
    fraction = {"all": float(good[fitted].mean())} if fitted.any() else {}
    for name in CLASSES:
        if (mine := fitted & (classes == name)).any():
            fraction[name] = float(good[mine].mean())
    return {
        "fraction": fraction,
        "metrics": _group_metrics(
            np.asarray(table[f"Z_{method}"])[sel], np.asarray(table["Z"])[sel], classes[sel]
        ),
    }


def evaluate(table: Table, methods: Sequence[str]) -> dict[str, Any]:
    """Metrics of every method on the `common`, `confident`, `ordinary`, `hard` and `all` subsets."""
    z_true, classes, hard = (np.asarray(table[c]) for c in ("Z", "TARGET_CLASS", "HARD"))
    fitted = np.ones(len(table), dtype=bool)
    for method in methods:
        fitted &= np.isfinite(np.asarray(table[f"Z_{method}"]))
    subsets = {"common": fitted}
    if "RR_ZWARN" in table.colnames:
        subsets["confident"] = fitted & redrock_confident(table)
    subsets["ordinary"] = fitted & (hard == 0)
    subsets["hard"] = fitted & (hard != 0)
    out: dict[str, Any] = {"subsets": {}, "by_redshift_bin": {}}
    for subset, sel in subsets.items():
        out["subsets"][subset] = {
            m: _group_metrics(np.asarray(table[f"Z_{m}"])[sel], z_true[sel], classes[sel]) for m in methods
        }
    for method in methods:
        sel = np.isfinite(np.asarray(table[f"Z_{method}"]))
        out["subsets"].setdefault("all", {})[method] = _group_metrics(
            np.asarray(table[f"Z_{method}"])[sel], z_true[sel], classes[sel]
        )
        out["by_redshift_bin"][method] = {
            name: metrics.metrics_by_redshift_bin(
                np.asarray(table[f"Z_{method}"])[fitted & (classes == name)],
                z_true[fitted & (classes == name)],
                Z_BINS[name],
            )
            for name in CLASSES
            if (fitted & (classes == name)).any()
        }
    out["own_confident"] = {method: _own_confident(table, method) for method in methods}
    if "confident" in subsets:
        out["redrock_confident_fraction"] = {
            name: float(subsets["confident"][fitted & (classes == name)].mean())
            for name in CLASSES
            if (fitted & (classes == name)).any()
        }
        spectype = np.asarray(table["RR_SPECTYPE"])
        truth_type = np.asarray(table["SPECTYPE"])
        out["redrock_spectype_correct"] = {
            name: float(
                np.mean(spectype[fitted & (classes == name)] == truth_type[fitted & (classes == name)])
            )
            for name in CLASSES
            if (fitted & (classes == name)).any()
        }
    return out


# -------------------------------------------------------------------------------------------- plots


def _color(i: int) -> str:
    return ("#3B75AF", "#C03D3E", "#4E9F50", "#8E6BB8", "#E1812C")[i % 5]


def plot_zz(table: Table, methods: Sequence[str], path: Path) -> Path:
    """z_pred against z_true, one row per method, one column per class (the `common` spectra)."""
    from matplotlib.figure import Figure

    from specpt_hf.evaluation.plots import save_figure

    fitted = np.all([np.isfinite(np.asarray(table[f"Z_{m}"])) for m in methods], axis=0)
    fig = Figure(figsize=(3.0 * len(CLASSES), 2.8 * len(methods)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(methods), len(CLASSES), squeeze=False))
    for i, method in enumerate(methods):
        for j, name in enumerate(CLASSES):
            ax = axes[i, j]
            sel = fitted & (np.asarray(table["TARGET_CLASS"]) == name)
            zt, zp = np.asarray(table["Z"])[sel], np.asarray(table[f"Z_{method}"])[sel]
            lo, hi = Z_BINS[name][0], Z_BINS[name][-1]
            ax.plot([0, 4], [0, 4], color="0.6", lw=0.8)
            ax.scatter(zt, zp, s=3 if len(zt) > 500 else 8, color=_color(i), lw=0, rasterized=True)
            ax.set(xlim=(lo - 0.05, hi + 0.05), ylim=(-0.05, max(hi + 0.1, 1.8)))
            if len(zt):
                m = metrics.redshift_metrics(zp, zt)
                ax.text(
                    0.03,
                    0.97,
                    f"NMAD {m['nmad']:.4f}\nη {100 * m['eta']:.2f} %\nn {m['n']}",
                    transform=ax.transAxes,
                    va="top",
                    fontsize=8,
                )
            ax.set_title(f"{method}: {name.upper()}", fontsize=9)
            if i == len(methods) - 1:
                ax.set_xlabel("true z")
            if j == 0:
                ax.set_ylabel("predicted z")
    return save_figure(fig, path)


def plot_vs_redshift(result: dict[str, Any], methods: Sequence[str], path: Path) -> Path:
    """NMAD (top) and η (bottom) per true-redshift bin, one column per class, one line per method."""
    from matplotlib.figure import Figure

    from specpt_hf.evaluation.plots import save_figure

    fig = Figure(figsize=(3.0 * len(CLASSES), 5.2), layout="constrained")
    axes = fig.subplots(2, len(CLASSES), squeeze=False)
    for i, method in enumerate(methods):
        for j, name in enumerate(CLASSES):
            bins = result["by_redshift_bin"].get(method, {}).get(name, [])
            zc = [b["z_center"] for b in bins if b["n"]]
            axes[0, j].plot(
                zc, [b["nmad"] for b in bins if b["n"]], "o-", color=_color(i), label=method, ms=3
            )
            axes[1, j].plot(zc, [100 * b["eta"] for b in bins if b["n"]], "o-", color=_color(i), ms=3)
            axes[0, j].set_title(name.upper(), fontsize=9)
            axes[0, j].set_yscale("log")
            axes[1, j].set_xlabel("true z")
    axes[0, 0].set_ylabel("NMAD")
    axes[1, 0].set_ylabel("η (%)")
    axes[0, 0].legend(fontsize=7)
    return save_figure(fig, path)


def plot_snr(truth: Table, reference: list[dict[str, Any]], path: Path) -> Path:
    """Histograms of the median r-arm S/N per class, real DESI spectra marked."""
    from matplotlib.figure import Figure

    from specpt_hf.evaluation.plots import save_figure

    fig = Figure(figsize=(3.0 * len(CLASSES), 2.6), layout="constrained")
    axes = fig.subplots(1, len(CLASSES), squeeze=False)[0]
    bins = np.geomspace(0.03, 100.0, 40)
    for ax, name in zip(axes, CLASSES, strict=True):
        snr = np.asarray(truth["SNR_R"])[np.asarray(truth["TARGET_CLASS"]) == name]
        ax.hist(np.clip(snr, bins[0], bins[-1]), bins=bins, color="0.55")
        real = [row["snr_r"] for row in reference if row["target_class"] == name]
        for k, value in enumerate(real):
            ax.axvline(value, color="#C03D3E", lw=1.2, label="real DESI (Fuji)" if k == 0 else None)
        ax.set(xscale="log", xlabel="median S/N per pixel, r arm", title=f"{name.upper()} (n={len(snr)})")
        if real:
            ax.legend(fontsize=7)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------- markdown


def _f(value: Any, spec: str) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and not math.isfinite(value))
        else format(value, spec)
    )


def markdown(results: dict[str, Any]) -> str:
    methods = results["methods"]
    lines = [
        f"# Accuracy benchmark ({results['machine']['date']})",
        "",
        f"Machine: {results['machine']['summary']}",
        f"Test set: {results['test_set']}",
        "",
    ]
    if results.get("quick"):
        lines += [
            "**Quick mode: a handful of spectra per class (and an untrained model unless --model); "
            "the numbers only show the script runs.**",
            "",
        ]
    if results.get("redrock_skipped"):
        lines += [f"Redrock skipped: {results['redrock_skipped']}", ""]
    for subset in ("common", "confident", "ordinary", "hard", "all"):
        block = results["metrics"]["subsets"].get(subset)
        if not block:
            continue
        lines += [
            f"## `{subset}` spectra",
            "",
            "| class | method | n | NMAD | centred NMAD | η (%) | bias | σ68 |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name in ("all", *CLASSES):
            for method in methods:
                m = block.get(method, {}).get(name)
                if m and m["n"]:
                    lines.append(
                        f"| {name} | {method} | {m['n']} | {_f(m['nmad'], '.5f')} "
                        f"| {_f(m.get('nmad_centred', float('nan')), '.5f')} | {_f(100 * m['eta'], '.2f')} "
                        f"| {_f(m['bias'], '+.5f')} | {_f(m['sigma68'], '.5f')} |"
                    )
        lines.append("")
    lines += [
        "## Each method's own confident spectra",
        "",
        "SpecPT: ZWARN = 0 (no flag bit set); Redrock: ZWARN = 0 and DELTACHI2 above the class cut. Out of every "
        "spectrum the method fitted.",
        "",
        "| class | method | confident | n | NMAD | η (%) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name in ("all", *CLASSES):
        for method in methods:
            own = results["metrics"]["own_confident"][method]
            m = own["metrics"].get(name)
            if name in own["fraction"]:
                n, nmad, eta = (m["n"], m["nmad"], 100 * m["eta"]) if m else (0, float("nan"), float("nan"))
                lines.append(
                    f"| {name} | {method} | {100 * own['fraction'][name]:.1f} % | {n} | {_f(nmad, '.5f')} "
                    f"| {_f(eta, '.2f')} |"
                )
    lines.append("")
    if "redrock_confident_fraction" in results["metrics"]:
        lines += [
            "Redrock confident fraction (ZWARN = 0, DELTACHI2 above the class cut) and SPECTYPE right:",
            "",
            "| class | confident | SPECTYPE right |",
            "| --- | ---: | ---: |",
        ]
        for name, frac in results["metrics"]["redrock_confident_fraction"].items():
            right = results["metrics"]["redrock_spectype_correct"][name]
            lines.append(f"| {name} | {100 * frac:.1f} % | {100 * right:.1f} % |")
        lines.append("")
    lines += [
        "## Per true-redshift bin (`common` spectra)",
        "",
        "| class | z range | method | n | NMAD | η (%) |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for name in CLASSES:
        for method in methods:
            for b in results["metrics"]["by_redshift_bin"].get(method, {}).get(name, []):
                if b["n"]:
                    lines.append(
                        f"| {name} | {b['z_min']:.2f}–{b['z_max']:.2f} | {method} | {b['n']} "
                        f"| {_f(b['nmad'], '.5f')} | {_f(100 * b['eta'], '.2f')} |"
                    )
    lines += [
        "",
        "## How hard the mocks are",
        "",
        "| class | n | S/N r p16 / p50 / p84 | hard | LOW_SNR | LINE_ON_SKY | NO_LINES | LINE_OFF_GRID | BAL |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, h in results["hardness"].items():
        p = h["snr_r_percentiles"]
        flags = " | ".join(f"{100 * h[f'frac_{flag.lower()}']:.1f} %" for flag in HARD_FLAGS)
        lines.append(
            f"| {name} | {h['n']} | {p['p16']:.2f} / {p['p50']:.2f} / {p['p84']:.2f} "
            f"| {100 * h['hard_fraction']:.1f} % | {flags} |"
        )
    refs = ", ".join(
        f"{r['target_class']} {r['snr_r']:.2f} ({r['file']})" for r in results["desi_reference_snr"]
    )
    lines += [
        "",
        f"Real DESI spectra, same S/N column: {refs or 'none found'}.",
        "",
        "Against DESI's published survey design: depth = the mock's EFFTIME over the program's goal, and the "
        "magnitude DESI selects the class on.",
        "",
        "| class | depth p16 / p50 / p84 | DESI goal | magnitude p50 / p95 | DESI selection | inside it |",
        "| --- | --- | ---: | --- | --- | ---: |",
    ]
    for name, h in results["hardness"].items():
        d, m, design = h["depth_percentiles"], h["magnitude_percentiles"], DESI_DESIGN[name]
        lines.append(
            f"| {name} | {d['p16']:.2f} / {d['p50']:.2f} / {d['p84']:.2f} | {design['efftime_s']:.0f} s "
            f"| {m['p50']:.2f} / {m['p95']:.2f} | {design['selection']} | {100 * h['within_desi_limit']:.1f} % |"
        )
    lines += [
        "",
        f"Sources: {DESI_DESIGN_SOURCE}.",
        "",
        "## Published figures (real DESI spectra; context)",
        "",
    ]
    for entry in PUBLISHED:
        parts = [
            f"{k.upper()} " + ", ".join(f"{field} {value:.3g}" for field, value in v.items())
            for k, v in entry.items()
            if k in CLASSES
        ]
        lines.append(f"- {entry['source']}: " + "; ".join(parts) + f" ({entry['note']})")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- run


def run_specpt(
    models: Sequence[str | None], coadds: Sequence[Path], batch_size: int, out_dir: Path
) -> dict[str, dict]:
    """`specpt predict` catalogs (`specpt-{k}.fits` in `out_dir`) of every model (None: an untrained
    specpt-tiny) on every coadd, with the wall time. A model with templates runs twice: network-only
    (`{label} network`, refinement none) and refined (`{label} refined`, its config's refinement)."""
    out = {}
    for k, model_dir in enumerate(models):
        label = model_label(model_dir) if model_dir else "specpt-tiny (untrained)"
        model = load_redshift_model("specpt-tiny", model_dir)
        refined = model.config.refinement
        variants = (
            {f"{label} network": "none", f"{label} refined": refined} if model.refines else {label: None}
        )
        for name, refine in variants.items():
            if refine is not None:
                model.config.refinement = refine
            start = time.perf_counter()
            catalog = out_dir / f"specpt-{k}{'-' + refine.replace('+', '-') if refine else ''}.fits"
            columns = predict_coadds(model, coadds, catalog, batch_size)
            out[name] = {"columns": columns, "seconds": time.perf_counter() - start}
    return out


def join_predictions(truth: Table, specpt: dict[str, dict], redrock: Table | None) -> Table:
    """Truth rows with Z_{method} (NaN where a method did not fit), each SpecPT model's ZWARN_{method} and
    Redrock's ZWARN, DELTACHI2, SPECTYPE (as RR_*; -1, NaN, '' where it did not fit)."""
    table = truth
    for label, result in specpt.items():
        columns = result["columns"]
        predicted = Table(
            {
                "TARGETID": columns["targetid"],
                f"Z_{label}": columns["z_pred"],
                f"ZWARN_{label}": columns["zwarn"],
            }
        )
        table = _left_join(table, predicted, {f"Z_{label}": np.nan, f"ZWARN_{label}": -1})
    if redrock is not None:
        fitted = redrock["TARGETID", "Z", "ZWARN", "DELTACHI2", "SPECTYPE"]
        fitted.rename_columns(
            ["Z", "ZWARN", "DELTACHI2", "SPECTYPE"], ["Z_Redrock", "RR_ZWARN", "RR_DELTACHI2", "RR_SPECTYPE"]
        )
        fills = {"Z_Redrock": np.nan, "RR_ZWARN": -1, "RR_DELTACHI2": np.nan, "RR_SPECTYPE": ""}
        table = _left_join(table, fitted, fills)
    return table


def _left_join(table: Table, other: Table, fills: dict[str, Any]) -> Table:
    """`table`'s rows, in order, with the columns of `other` matched by TARGETID; `fills` where `other` has none."""
    out = join(table, other, keys="TARGETID", join_type="left", keep_order=True, metadata_conflicts="silent")
    for name, fill in fills.items():
        if hasattr(out[name], "filled"):
            out[name] = out[name].filled(fill)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", nargs="+", help="SpecPTForRedshift folder(s) (none: Redrock only)")
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (the test set is cached in it)"
    )
    parser.add_argument("--test-dir", type=Path, help="where the test set lives (default: OUT/testset)")
    parser.add_argument("--n-per-class", type=int, default=5000, help="test spectra per class")
    parser.add_argument("--seed", type=int, default=TEST_SEED, help="mock seed of the test set")
    parser.add_argument(
        "--redrock-per-class", type=int, default=1000, help="spectra per class Redrock fits (0: all)"
    )
    parser.add_argument(
        "--templates", type=Path, help="Redrock templates (default: built into OUT/rrtemplates)"
    )
    parser.add_argument("--mp", type=int, default=os.cpu_count() or 1, help="Redrock processes")
    parser.add_argument("--no-redrock", action="store_true", help="SpecPT only")
    parser.add_argument(
        "--resume", action="store_true", help="read back Redrock outputs already in OUT/redrock"
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="6 spectra per class, coarse Redrock grid")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_per_class, args.redrock_per_class, args.batch_size = 6, 0, 16
    elif not args.model and args.no_redrock:
        parser.error("nothing to run: give --model, or leave out --no-redrock")
    if args.seed in (0, 1):
        parser.error("seeds 0 and 1 are the training seeds; the test set needs another")
    for name in ("n_per_class", "batch_size", "mp"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.redrock_per_class < 0:
        parser.error("--redrock-per-class must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Build or reuse the test set, run the models and Redrock, write accuracy.json / .md / PNGs."""
    args = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    spf = args.n_per_class if args.quick else SPECTRA_PER_FILE
    per_class = make_test_set(args.test_dir or out / "testset", args.n_per_class, args.seed, spf)
    coadds = [p for name in CLASSES for p in per_class[name]]
    truth = read_truth(coadds)
    specpt = run_specpt(args.model or ([None] if args.quick else []), coadds, args.batch_size, out)
    results: dict[str, Any] = {
        "machine": machine_info("cpu"),
        "quick": args.quick,
        "test_set": f"{args.n_per_class} per class, seed {args.seed}, healpix {TEST_HEALPIX}+",
        "specpt_seconds": {k: v["seconds"] for k, v in specpt.items()},
    }
    redrock = None
    reason = "--no-redrock" if args.no_redrock else redrock_missing()
    if reason is None:
        templates = args.templates or out / "rrtemplates"
        if not any(templates.glob("rrtemplate-*.fits")):
            build_templates(templates, **(QUICK_SETTINGS if args.quick else {}))
        n_files = math.ceil(args.redrock_per_class / spf) if args.redrock_per_class else None
        files = [p for name in CLASSES for p in per_class[name][:n_files]]
        per_file = ("--ntargets", str(args.redrock_per_class)) if 0 < args.redrock_per_class < spf else ()
        try:
            run = run_redrock(
                files,
                out / "redrock",
                templates,
                args.mp,
                QUICK_ZSCAN if args.quick else None,
                per_file,
                combined=args.quick,
                reuse=args.resume,
            )
            redrock = run.redshifts
            results["redrock"] = run.summary()
        except RedrockError as err:
            reason = str(err)
    if reason is not None:
        results["redrock_skipped"] = reason
    table = join_predictions(truth, specpt, redrock)
    methods = [*specpt, *(["Redrock"] if redrock is not None else [])]
    results["methods"] = methods
    results["metrics"] = evaluate(table, methods)
    results["hardness"] = hardness(truth)
    results["desi_reference_snr"] = desi_reference_snr()
    results["published"] = PUBLISHED
    results["plots"] = [
        str(plot_zz(table, methods, out / "accuracy_zz.png")),
        str(plot_vs_redshift(results["metrics"], methods, out / "accuracy_vs_redshift.png")),
        str(plot_snr(truth, results["desi_reference_snr"], out / "snr_r.png")),
    ]
    atomic_write(out / "predictions.ecsv", lambda tmp: table.write(tmp, format="ascii.ecsv", overwrite=True))
    atomic_write_json(out / "accuracy.json", results, default=str)
    md = markdown(results)
    atomic_write_text(out / "accuracy.md", md)
    print(md)
    print(f"wrote {out / 'accuracy.json'}, {out / 'accuracy.md'} and {len(results['plots'])} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
