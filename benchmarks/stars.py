"""Stars: does a model call Milky Way Survey stars STAR once it has STAR templates, and what does that cost the
galaxies and quasars?

    python benchmarks/stars.py --model runs/specpt-small-cpu/redshift/best \
        --test-dir runs/benchmarks/accuracy/testset --out runs/benchmarks/stars
    python benchmarks/stars.py --quick --out /tmp/stars      # seconds: an untrained tiny model

1. STAR templates: a star training mock (class `mws`, seed 1, healpix 15000+, --n-train stars in files of 500,
   written once into OUT/stars-train) is prepared (`prepare_dataset`, OUT/stars-data) and its train split's
   labelled stars give a 5-vector STAR basis (`fit_templates`). It is added to a copy of --model (OUT/model-stars)
   next to the model's own GALAXY / QSO sets; the --model folder is only read.
2. Stars: a held-out star mock (seed 101, healpix 36000+, --n stars at the bright program's DESI depth, written
   once into OUT/stars-test) goes through `specpt predict` (`predict_catalog`) with the copy. Reported: the
   fraction with SPECTYPE STAR, with STAR and ZWARN = 0 (floor ≥ 98 %), the share of each ZWARN bit, the velocity
   error Δv = c Δz / (1 + z) of the STAR-typed stars (median |Δv|, median Δv) and the NMAD of Δz, all per SUBTYPE
   (A, F, G, K, M, WD, ... from the truth files), with the median r-arm S/N (SCORES MEDIAN_COADD_SNR_R) and depth
   (EFFTIME over the bright program's 180 s).
3. Control: the first --per-class spectra of each class's first file of the accuracy test set (seed 101, healpix
   30000+; `accuracy.make_test_set`, --test-dir) predicted, refined, by the copy and by the model without a STAR
   set: the fraction of each class called STAR, and NMAD, η and the ZWARN = 0 fraction with and without it.

Writes stars.json, stars.md, stars.png and the catalogs (stars.fits, control-star.fits, control-nostar.fits) to
--out. --quick: 8 stars, 40 training stars, 6 control spectra per class, an untrained specpt-tiny given GALAXY
templates learned from the control files themselves (a smoke test of every step, not a measurement).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from astropy.table import Table, join

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import (  # noqa: E402
    CLASSES,
    DESI_DESIGN,
    SPECTRA_PER_FILE,
    TEST_HEALPIX,
    TEST_SEED,
    make_mock_set,
    make_test_set,
    read_truth,
)
from speed import machine_info, model_label  # noqa: E402

from specpt_hf.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from specpt_hf.configuration_specpt import SpecPTForRedshiftConfig  # noqa: E402
from specpt_hf.data.mock import C_KMS  # noqa: E402
from specpt_hf.data.prepare import prepare_dataset  # noqa: E402
from specpt_hf.evaluation import metrics  # noqa: E402
from specpt_hf.evaluation.plots import _figure  # noqa: E402
from specpt_hf.modeling_specpt import SpecPTForRedshift  # noqa: E402
from specpt_hf.predict import predict_catalog  # noqa: E402
from specpt_hf.prediction import SpecPTZwarn  # noqa: E402
from specpt_hf.refinement import RestFrameTemplates, load_templates  # noqa: E402
from specpt_hf.templates import add_templates, fit_templates  # noqa: E402

STAR_TRAIN_SEED = 1
STAR_TRAIN_HEALPIX = 15000
STAR_TEST_HEALPIX = 36000
STAR_VECTORS = 5
FLOOR_STAR_GOOD = 0.98  # SPECTYPE STAR and ZWARN == 0
BRIGHT_EFFTIME = DESI_DESIGN["bgs"]["efftime_s"]  # the bright program's goal, s
SUBTYPES = ("O", "B", "A", "F", "G", "K", "M", "WD")  # display order
ZWARN_BITS = {flag.name: int(flag) for flag in SpecPTZwarn}
Z_LIMIT = int(SpecPTZwarn.AT_Z_LIMIT)  # z within a p(z) bin of z_min (no longer set for SPECTYPE STAR)


# ------------------------------------------------------------------------------------------- templates


def star_templates(
    root: Path, data_dir: Path, config: SpecPTForRedshiftConfig, n_train: int, spectra_per_file: int
) -> tuple[RestFrameTemplates, int]:
    """The STAR basis learned from the star training mock's train split, and how many stars that split holds."""
    files = make_mock_set(root, ("mws",), n_train, STAR_TRAIN_SEED, spectra_per_file, STAR_TRAIN_HEALPIX)
    summary = prepare_dataset(files["mws"], data_dir, overwrite=True, progress=False)
    templates = fit_templates(data_dir, config, {"STAR": STAR_VECTORS})
    return templates["STAR"], int(summary.rows.get("train", 0))


def model_templates(model_dir: Path) -> dict[str, RestFrameTemplates]:
    """The template sets a model folder's config.json describes (ValueError without any)."""
    described = SpecPTForRedshiftConfig.from_pretrained(model_dir).templates
    if not described:
        raise ValueError(
            f"{model_dir}: the model has no templates; add GALAXY / QSO ones with `specpt templates`"
        )
    return load_templates(model_dir / described["file"])


def with_star_set(model_dir: Path, dest: Path, star: RestFrameTemplates) -> Path:
    """Copy `model_dir` to `dest` and add `star` to its templates in place of any STAR set (the others kept)."""
    own = {name: t for name, t in model_templates(model_dir).items() if name != "STAR"}
    steps = {t.log_wavelength_step for t in own.values()}
    if steps != {star.log_wavelength_step}:
        raise ValueError(
            f"{model_dir}: its templates' ln(lambda) steps {sorted(steps)} differ from the STAR set's "
            f"{star.log_wavelength_step}; rebuild them with `specpt templates`"
        )
    if dest.resolve() == model_dir.resolve():
        raise ValueError(f"{dest}: is the model folder itself; give another --out")
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(model_dir, dest)
    add_templates(dest, {**own, "STAR": star})
    return dest


def without_star_set(model_dir: Path) -> SpecPTForRedshift:
    """The model of `model_dir` in eval mode with its templates less any STAR set."""
    model = SpecPTForRedshift.from_pretrained(model_dir).eval()
    model.set_templates({name: t for name, t in (model.templates or {}).items() if name != "STAR"})
    return model


# ------------------------------------------------------------------------------------------- prediction


def predict(model: Any, files: list[Path], catalog: Path, batch_size: int) -> Table:
    """`specpt predict` (`predict_catalog`) of `files` into `catalog`; its REDSHIFTS table."""
    summary = predict_catalog(files, catalog, model=model, batch_size=batch_size, progress=False)
    if summary.failed:
        raise OSError(f"specpt predict could not read {sorted(summary.failed)}")
    table = Table.read(catalog, hdu="REDSHIFTS")
    table["SPECTYPE"] = np.char.strip(np.asarray(table["SPECTYPE"]).astype(str))
    return table


def joined(truth: Table, catalog: Table) -> Table:
    """`truth` rows (by TARGETID) with the catalog's Z, ZWARN, SPECTYPE, DELTACHI2 as Z_PRED, ZWARN, SPECTYPE_PRED,
    DELTACHI2 (NaN / -1 / '' where the catalog has no row)."""
    predicted = catalog["TARGETID", "Z", "ZWARN", "SPECTYPE", "DELTACHI2"]
    predicted.rename_columns(["Z", "SPECTYPE"], ["Z_PRED", "SPECTYPE_PRED"])
    out = join(truth, predicted, keys="TARGETID", join_type="left", metadata_conflicts="silent")
    for name, fill in (("Z_PRED", np.nan), ("ZWARN", -1), ("SPECTYPE_PRED", ""), ("DELTACHI2", np.nan)):
        if hasattr(out[name], "filled"):
            out[name] = out[name].filled(fill)
    return out


# ---------------------------------------------------------------------------------------------- metrics


def velocity_errors(table: Table) -> np.ndarray:
    """Δv = c (z_pred - z) / (1 + z) [n], km/s, of a `joined` table."""
    z_true, z_pred = np.asarray(table["Z"], float), np.asarray(table["Z_PRED"], float)
    return C_KMS * (z_pred - z_true) / (1.0 + z_true)


def star_summary(table: Table) -> dict[str, Any]:
    """Fractions STAR and STAR & ZWARN 0, the share of each ZWARN bit, the STAR-typed stars' velocity errors, their
    r-arm S/N and depth, for the stars in `table` (a `joined` table)."""
    z_true, z_pred = np.asarray(table["Z"], float), np.asarray(table["Z_PRED"], float)
    zwarn = np.asarray(table["ZWARN"], np.int64)
    star = np.asarray(table["SPECTYPE_PRED"]) == "STAR"
    typed = star & np.isfinite(z_pred)
    dv = velocity_errors(table)  # [n], km/s
    return {
        "n": len(table),
        "star": float(star.mean()),
        "star_zwarn0": float((star & (zwarn == 0)).mean()),
        "star_zwarn0_but_z_limit": float((star & ((zwarn & ~Z_LIMIT) == 0)).mean()),
        "zwarn_bits": {name: float(((zwarn & bit) != 0).mean()) for name, bit in ZWARN_BITS.items()},
        "n_star": int(typed.sum()),
        "median_abs_dv_kms": float(np.median(np.abs(dv[typed]))) if typed.any() else float("nan"),
        "median_dv_kms": float(np.median(dv[typed])) if typed.any() else float("nan"),
        "nmad_dz": metrics.redshift_metrics(z_pred[typed], z_true[typed])["nmad"]
        if typed.any()
        else float("nan"),
        "snr_r_median": float(np.median(np.asarray(table["SNR_R"]))),
        "depth_median": float(np.median(np.asarray(table["EFFTIME"]))) / BRIGHT_EFFTIME,
        "mag_r_p05_p95": [float(v) for v in np.percentile(np.asarray(table["MAG_R"], float), [5, 95])],
    }


def by_subtype(table: Table) -> dict[str, dict[str, Any]]:
    """`star_summary` of all stars ("all") and of each SUBTYPE present."""
    subtype = np.asarray(table["SUBTYPE"])
    present = [s for s in SUBTYPES if (subtype == s).any()] + sorted(set(subtype) - set(SUBTYPES))
    return {"all": star_summary(table), **{s: star_summary(table[subtype == s]) for s in present}}


def control_summary(with_star: Table, without_star: Table) -> dict[str, dict[str, Any]]:
    """Per class (and "all"): the fraction called STAR with the STAR set, and NMAD, η and the ZWARN = 0 fraction
    with and without it (both `joined` tables over the same rows)."""
    classes = np.asarray(with_star["TARGET_CLASS"])
    out = {}
    for name in ("all", *CLASSES):
        sel = np.ones(len(classes), bool) if name == "all" else classes == name
        if not sel.any():
            continue
        row: dict[str, Any] = {
            "n": int(sel.sum()),
            "false_star": float(np.mean(np.asarray(with_star["SPECTYPE_PRED"])[sel] == "STAR")),
        }
        for label, table in (("with", with_star), ("without", without_star)):
            z_pred = np.nan_to_num(np.asarray(table["Z_PRED"], float)[sel], nan=-0.5)
            m = metrics.redshift_metrics(z_pred, np.asarray(table["Z"], float)[sel])
            row[label] = {
                "nmad": m["nmad"],
                "eta": m["eta"],
                "zwarn0": float(np.mean(np.asarray(table["ZWARN"])[sel] == 0)),
            }
        out[name] = row
    return out


def first_targets(truth: Table, files: list[Path], per_file: int) -> Table:
    """The first `per_file` truth rows of each file (the file's fibre order, as `read_desi_spectra` yields)."""
    names = np.asarray(truth["FILE"])
    keep = np.zeros(len(truth), bool)
    for path in files:
        keep[np.flatnonzero(names == path.name)[:per_file]] = True
    return truth[keep]


# --------------------------------------------------------------------------------------------- outputs


def _f(value: float, spec: str) -> str:
    return "n/a" if value is None or not np.isfinite(value) else format(value, spec)


def markdown(results: dict[str, Any]) -> str:
    stars, train = results["stars"], results["star_templates"]
    a = stars["all"]
    lines = [
        f"# Stars ({results['machine']['date']})",
        "",
        f"Machine: {results['machine']['summary']}. Model `{results['model']}` with a STAR basis of "
        f"{train['num_vectors']} vectors from {train['n_train_split']} training stars ({train['training_set']}), its "
        f"own sets kept: {', '.join(results['template_sets'])}.",
        "",
    ]
    if results.get("quick"):
        lines += [
            "**Quick mode: an untrained model and a handful of spectra; the numbers only show the script runs.**",
            "",
        ]
    lines += [
        f"## {a['n']} held-out stars ({results['test_set']})",
        "",
        f"Median r-arm S/N per pixel {a['snr_r_median']:.1f}, depth (EFFTIME / {BRIGHT_EFFTIME:.0f} s) "
        f"{a['depth_median']:.2f} at the median, r {a['mag_r_p05_p95'][0]:.1f}-{a['mag_r_p05_p95'][1]:.1f} (5-95 %). "
        f"Floor: SPECTYPE STAR and ZWARN = 0 for ≥ {100 * FLOOR_STAR_GOOD:.0f} % "
        f"({'met' if a['star_zwarn0'] >= FLOOR_STAR_GOOD else 'not met'}: {100 * a['star_zwarn0']:.1f} %). "
        "Δv and NMAD over the stars typed STAR; `but AT_Z_LIMIT`: no ZWARN bit other than AT_Z_LIMIT "
        "(z within a p(z) bin of the model's z_min; catalogs before SPECTYPE STAR was exempt set it for stars).",
        "",
        "| SUBTYPE | n | STAR | STAR, ZWARN = 0 | STAR, ZWARN = 0 but AT_Z_LIMIT | median abs(Δv) (km/s) "
        "| median Δv (km/s) | NMAD Δz | S/N r |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in stars.items():
        lines.append(
            f"| {name} | {s['n']} | {100 * s['star']:.1f} % | {100 * s['star_zwarn0']:.1f} % | "
            f"{100 * s['star_zwarn0_but_z_limit']:.1f} % | "
            f"{_f(s['median_abs_dv_kms'], '.1f')} | {_f(s['median_dv_kms'], '+.1f')} | {_f(s['nmad_dz'], '.2e')} | "
            f"{s['snr_r_median']:.1f} |"
        )
    bits = ", ".join(f"{name} {100 * v:.1f} %" for name, v in a["zwarn_bits"].items() if v)
    lines += ["", f"ZWARN bits set (share of all stars): {bits or 'none'}.", ""]
    lines += [
        f"## Control: galaxies and quasars ({results['control_set']})",
        "",
        "Refined redshifts by the model with the STAR set and without it.",
        "",
        "| class | n | called STAR | NMAD with / without | η (%) with / without | ZWARN = 0 with / without |",
        "| --- | ---: | ---: | --- | --- | --- |",
    ]
    for name, c in results["control"].items():
        w, wo = c["with"], c["without"]
        lines.append(
            f"| {name} | {c['n']} | {100 * c['false_star']:.1f} % | {w['nmad']:.5f} / {wo['nmad']:.5f} | "
            f"{100 * w['eta']:.2f} / {100 * wo['eta']:.2f} | {100 * w['zwarn0']:.1f} % / {100 * wo['zwarn0']:.1f} % |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], dv: np.ndarray, path: Path) -> Path:
    """STAR fractions per SUBTYPE, the Δv histogram of the STAR-typed stars, the control's STAR fractions."""
    stars, control = results["stars"], results["control"]
    with _figure(path, figsize=(14.0, 3.8)) as fig:
        ax_type, ax_dv, ax_control = fig.subplots(1, 3)
        names = list(stars)
        x = np.arange(len(names))
        bars = {
            "star": "STAR",
            "star_zwarn0": "STAR, ZWARN = 0",
            "star_zwarn0_but_z_limit": "… but AT_Z_LIMIT",
        }
        for i, (key, label) in enumerate(bars.items()):
            ax_type.bar(x + 0.27 * (i - 1), [100 * stars[n][key] for n in names], 0.27, label=label)
        ax_type.axhline(
            100 * FLOOR_STAR_GOOD, color="k", ls="--", lw=1, label=f"floor {100 * FLOOR_STAR_GOOD:g} %"
        )
        ax_type.set(xticks=x, xticklabels=names, ylabel="% of stars", ylim=(0, 105))
        ax_type.legend(fontsize=7)
        ax_dv.hist(np.clip(dv, -200.0, 200.0), bins=np.linspace(-200.0, 200.0, 41), color="0.55")
        ax_dv.set(xlabel="Δv = c Δz / (1 + z), km/s (STAR-typed; clipped at ±200)", ylabel="stars")
        names = list(control)
        ax_control.bar(
            np.arange(len(names)), [100 * control[n]["false_star"] for n in names], color="#C03D3E"
        )
        ax_control.set(xticks=np.arange(len(names)), xticklabels=names, ylabel="% called STAR (control)")
    return path


# ------------------------------------------------------------------------------------------------- run


def quick_model(folder: Path, coadds: list[Path]) -> Path:
    """An untrained specpt-tiny with GALAXY templates learned from `coadds` (a smoke test), saved to `folder`."""
    from refinement_frontier import quick_templates

    from specpt_hf import create_model

    torch.manual_seed(0)
    model = create_model("specpt-tiny", "redshift")
    model.save_pretrained(folder)
    add_templates(folder, quick_templates(coadds, read_truth(coadds), model))
    return folder


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, help="SpecPTForRedshift folder with GALAXY / QSO templates (read only)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (mocks, data and the model copy too)"
    )
    parser.add_argument("--test-dir", type=Path, help="the accuracy test set (default: OUT/testset)")
    parser.add_argument("--n-per-class", type=int, default=5000, help="accuracy test-set size per class")
    parser.add_argument("--per-class", type=int, default=250, help="control spectra per class")
    parser.add_argument("--n", type=int, default=1000, help="held-out stars")
    parser.add_argument("--n-train", type=int, default=3000, help="stars of the training mock")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="a few spectra, an untrained specpt-tiny")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.n_train, args.n_per_class, args.per_class = 8, 40, 6, 6
    elif args.model is None:
        parser.error("--model is required (or --quick)")
    elif not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json (not a model folder)")
    for name in ("n", "n_train", "n_per_class", "per_class", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def per_file(n: int, quick: bool) -> int:
    """Spectra per mock file: all in one with --quick, else 500 (as the accuracy test set)."""
    return n if quick else SPECTRA_PER_FILE


def star_model(args: argparse.Namespace, model_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The copy of `model_dir` with a STAR set learned from the star training mock, and how it was learned."""
    config = SpecPTForRedshiftConfig.from_pretrained(model_dir)
    star, n_train_split = star_templates(
        args.out / "stars-train",
        args.out / "stars-data",
        config,
        args.n_train,
        per_file(args.n_train, args.quick),
    )
    copy = with_star_set(model_dir, args.out / "model-stars", star)
    return copy, {
        "num_vectors": int(star.basis.shape[0]),
        "n_train_split": n_train_split,
        "training_set": f"{args.n_train} mws stars, seed {STAR_TRAIN_SEED}, healpix {STAR_TRAIN_HEALPIX}+",
    }


def run_stars(model: SpecPTForRedshift, args: argparse.Namespace) -> Table:
    """The held-out stars (written once under OUT/stars-test) predicted, joined to their truth."""
    n_file = per_file(args.n, args.quick)
    files = make_mock_set(args.out / "stars-test", ("mws",), args.n, TEST_SEED, n_file, STAR_TEST_HEALPIX)
    catalog = predict(model, files["mws"], args.out / "stars.fits", args.batch_size)
    return joined(read_truth(files["mws"], extra=("SUBTYPE",)), catalog)


def run_control(
    model: SpecPTForRedshift, model_dir: Path, files: list[Path], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """The control spectra predicted with (`model`) and without (`model_dir` less STAR) the STAR set."""
    truth = first_targets(read_truth(files), files, args.per_class)
    with_star = joined(truth, predict(model, files, args.out / "control-star.fits", args.batch_size))
    without = without_star_set(model_dir)
    without_star = joined(truth, predict(without, files, args.out / "control-nostar.fits", args.batch_size))
    return control_summary(with_star, without_star)


def main(argv: list[str] | None = None) -> int:
    """Learn STAR templates, add them to a copy of the model, predict held-out stars and the control sample."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    n_file = per_file(args.n_per_class, args.quick)
    test_set = make_test_set(args.test_dir or args.out / "testset", args.n_per_class, TEST_SEED, n_file)
    firsts = [test_set[c][0] for c in CLASSES]
    model_dir = quick_model(args.out / "specpt-tiny", firsts) if args.quick else args.model
    copy, learned = star_model(args, model_dir)
    model = SpecPTForRedshift.from_pretrained(copy).eval()
    if not model.refines:
        raise SystemExit(f"{model_dir}: refinement is off (config.refinement 'none'); nothing is typed STAR")
    stars = run_stars(model, args)
    results = {
        "machine": machine_info("cpu"),
        "quick": args.quick,
        "model": "specpt-tiny (untrained)" if args.quick else model_label(model_dir),
        "model_copy": str(copy),
        "template_sets": list(model.templates),
        "star_templates": learned,
        "test_set": f"mws, seed {TEST_SEED}, healpix {STAR_TEST_HEALPIX}+, bright program",
        "control_set": f"the first {args.per_class} spectra of each class's first accuracy test file "
        f"(seed {TEST_SEED}, healpix {TEST_HEALPIX}+)",
        "floor_star_zwarn0": FLOOR_STAR_GOOD,
        "stars": by_subtype(stars),
        "control": run_control(model, model_dir, firsts, args),
    }
    atomic_write_json(args.out / "stars.json", results)
    atomic_write_text(args.out / "stars.md", markdown(results))
    typed = (np.asarray(stars["SPECTYPE_PRED"]) == "STAR") & np.isfinite(np.asarray(stars["Z_PRED"], float))
    plot(results, velocity_errors(stars)[typed], args.out / "stars.png")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
