"""Archetypes at lower S/N: do whole spectra tell the truth from the refinement's wrong answers where the model's
rest-frame bases cannot?

    python benchmarks/archetypes.py --model benchmarks/models/specpt-small-cpu-sps-t9000 \
        --data runs/recipe-sps/data --out benchmarks/results/archetypes       # ~8 min on 2 cores
    python benchmarks/archetypes.py ... --source physical --per-type 3000 --out benchmarks/results/archetypes-physical
    python benchmarks/archetypes.py --quick --out /tmp/arch                      # seconds: untrained tiny model

The model's bases fit any combination of their vectors, so a few lines of noise can be fitted at a wrong redshift.
An archetype is one whole spectrum with a free positive amplitude (Redrock's archetypes; here with a Legendre
polynomial of --degree in observed ln(lambda) for the calibration). --archetypes per type, from --source:
- `learned` (default): from the training split (--per-type labelled spectra per type), each spectrum's coefficients
  on its type's basis at its redshift, their directions clustered by k-means, each centre's spectrum an archetype;
- `physical`: noiseless rest-frame spectra of the mock's own physics, as `specpt archetypes` builds them
  (`specpt_hf.archetypes.build_archetypes`: --per-type drawn per type, seed `SEED`, through a `LSF_KMS` line-spread
  function, the members nearest the k-means centres of their unit-normalised shapes): templates that know how the
  spectra were made, but not each one;
- `physical-sps`: the same with the galaxies drawn from the `sps` family only (E-MILES populations, BPT lines).
Their χ²(z) is the refinement's `archetype_curve` (FFT cross-correlations on binned pixels); galaxy archetypes are
scanned to z = 1.7 (`ARCHETYPE_MAX_REDSHIFT`, as Redrock's galaxy templates). This compares answers outside the
model; `config.refinement_archetype_*` is how the model itself uses archetypes.

The split (--split, validation by default) is refined as the model is configured, at its own depth and after
dividing the S/N by up to 2 (robustness.py's "S/N ÷ ≤ 2", seed 0). Reported per depth:
- for the refined failures (|Δz| / (1 + z) > 0.15), how often the archetypes' lowest χ² within ± 2 coarse trials of
  the truth is below that at the answer, and how often the model's bases' is (all vectors, every set);
- η per class of six answers (`ANSWERS`): the model's; the archetypes' whole-range minimum of χ² alone, and of χ² +
  `PRIOR_SHARE` x the p(z) penalty; a re-ranking that keeps the model's answer unless a candidate (the `CANDIDATES`
  lowest minima of the refinement's χ² + priors and of its χ² alone, at least 0.01 apart in ln(1 + z)) scores
  lower by `MARGIN` in archetype χ² + `PRIOR_SHARE` x p(z) penalty; a joint choice among the same candidates, by
  archetype χ² + the templates' whole-range coarse χ² + `JOINT_PRIOR_SHARE` x p(z) penalty; and the candidate
  nearest the truth (what a perfect re-ranking of the same candidates would answer). The re-ranking's settings were
  chosen on the reference's validation split with learned archetypes.
Writes archetypes.json and archetypes.md to --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.cluster.vq import kmeans2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import SPECTRA_PER_FILE, TEST_SEED, TEST_SETS, make_test_set  # noqa: E402
from failure_causes import template_chi2  # noqa: E402
from refinement_sweep import model_and_split, quick_setup  # noqa: E402
from robustness import held_out, perturb, predict_chunks  # noqa: E402
from speed import machine_info  # noqa: E402

from specpt_hf.archetypes import LSF_KMS, SEED, build_archetypes  # noqa: E402
from specpt_hf.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from specpt_hf.evaluation.metrics import CATASTROPHIC_THRESHOLD, metrics_by_group  # noqa: E402
from specpt_hf.loading import load_model  # noqa: E402
from specpt_hf.prediction import model_wavelength, pdf_redshifts  # noqa: E402
from specpt_hf.refinement import (  # noqa: E402
    RestFrameTemplates,
    archetype_scan,
    chi2_curve,
    chi2_scan,
    local_minima,
)
from specpt_hf.templates import read_labelled  # noqa: E402

TYPES = ("GALAXY", "QSO")
CANDIDATES = 3  # lowest minima taken from each curve
SEPARATION = 0.01  # between candidates, in ln(1 + z)
NEAR_TRIALS = 2  # coarse trials either side of a redshift where its χ² is looked up
PRIOR_SHARE = 0.5  # of the model's p(z) penalty added to the archetypes' χ²
MARGIN = 10.0  # χ² units by which a candidate must beat the model's answer
# --source: the share of galaxy archetypes from the sps family's physics (E-MILES populations, BPT lines); the rest
# from the basis family. `physical`: as the sps recipe mixes them (specpt_hf.archetypes' default); `physical-sps`:
# none from the basis family that 60 % of the recipe's spectra come from
SPS_SHARES = {"physical": 0.4, "physical-sps": 1.0}
PERTURBATION = "S/N ÷ ≤ 2"
ANSWERS = ("model", "archetypes alone", "archetypes, whole range", "re-ranked", "joint", "best candidate")
JOINT_PRIOR_SHARE = 0.25  # of the p(z) penalty in the joint score (the model's `refinement_archetype_prior`)


def learn_archetypes(
    model: Any, data: Path, per_type: int, archetypes: int, seed: int = 0
) -> dict[str, RestFrameTemplates]:
    """Per type of `TYPES`: the spectra of `archetypes` k-means centres of the directions of the training spectra's
    coefficients on the model's basis at their redshifts, on the basis's rest grid ([archetypes, grid])."""
    spectra = read_labelled(data, "train", per_type, seed)
    wavelength = torch.as_tensor(model_wavelength(model.config))
    out = {}
    for name in TYPES:
        if name not in spectra or name not in model.templates:
            continue
        s, basis = spectra[name], model.templates[name]
        u = torch.as_tensor(np.log1p(s["z"]))[:, None]  # [n, 1]
        coeff = chi2_scan(basis, wavelength, torch.as_tensor(s["flux"]), torch.as_tensor(s["ivar"]), u)[1][
            :, 0
        ]
        directions = coeff.double().numpy()  # [n, vectors]
        directions /= np.linalg.norm(directions, axis=1, keepdims=True).clip(min=1e-30)
        k = min(archetypes, len(directions))
        centres, _ = kmeans2(directions, k, rng=seed, minit="++")  # [k, vectors]
        centres /= np.linalg.norm(centres, axis=1, keepdims=True).clip(min=1e-30)
        spectra_k = torch.from_numpy(centres).float() @ basis.basis.float()  # [k, grid]
        out[name] = RestFrameTemplates(basis.log_wavelength_start, basis.log_wavelength_step, spectra_k)
    return out


def lowest_minima(curve: np.ndarray, scan_u: np.ndarray, count: int) -> np.ndarray:
    """Indices [n, count] of each row's `count` lowest local minima ([`local_minima`]) at least `SEPARATION` apart
    (-1: none)."""
    work = np.where(local_minima(torch.as_tensor(curve)).numpy(), curve, np.inf)  # [n, grid]
    out = np.full((len(curve), count), -1)
    for c in range(count):
        best = work.argmin(1)
        out[:, c] = np.where(np.isfinite(work[np.arange(len(best)), best]), best, -1)
        work = np.where(np.abs(scan_u[None] - scan_u[best][:, None]) > SEPARATION, work, np.inf)
    return out


def nearest_trial(scan_u: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Index [n] of the trial of the uniform grid `scan_u` nearest to each ln(1 + z) (z [n], clipped at 0)."""
    step = scan_u[1] - scan_u[0]
    return np.clip(np.rint((np.log1p(np.clip(z, 0, None)) - scan_u[0]) / step), 0, len(scan_u) - 1).astype(
        int
    )


def near(curve: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The lowest value of each row of `curve` [n, grid] within ± NEAR_TRIALS of `index` [n, c] (inf at -1)."""
    window = np.clip(index[..., None] + np.arange(-NEAR_TRIALS, NEAR_TRIALS + 1), 0, curve.shape[1] - 1)
    values = curve[np.arange(len(curve))[:, None, None], window].min(-1)  # [n, c]
    return np.where(index >= 0, values, np.inf)


def answers(
    model: Any,
    batch: dict[str, Any],
    archetypes: dict[str, RestFrameTemplates],
    scan_u: np.ndarray,
    degree: int = 2,
    rebin: int = 3,
) -> dict[str, np.ndarray]:
    """The model's refined z, the archetypes' whole-range z and the re-ranked z [n], the archetypes' χ² at each
    trial (`archetype_chi2` [n, grid]), the trial nearest the model's answer (`answer` [n]) and the re-ranking's
    candidate trials (`candidates` [n, c], -1: none); `seconds` of the model's prediction and of the archetype curves."""
    start = time.perf_counter()
    out = predict_chunks(model, batch, 128, return_pdf=True)
    seconds = {"model": time.perf_counter() - start}
    z_model = np.nan_to_num(out["z"], nan=-0.5)
    flux = torch.as_tensor(np.asarray(batch["flux"]), dtype=torch.float32)
    ivar = torch.where(
        torch.as_tensor(np.asarray(batch["mask"])), 0.0, torch.as_tensor(np.asarray(batch["ivar"]))
    )
    wavelength = torch.as_tensor(model_wavelength(model.config))
    u = torch.as_tensor(scan_u)
    start = time.perf_counter()
    arch = archetype_scan(archetypes, wavelength, flux, ivar.float(), u, rebin, degree).numpy()  # [n, grid]
    seconds["archetypes"] = time.perf_counter() - start
    log_p = torch.log(torch.as_tensor(out["pz"]).double().clamp(min=1e-300))
    prior = model.pz_penalty(log_p, u)  # [n, grid], the refinement's p(z) penalty (None: no prior)
    penalty = np.zeros_like(arch) if prior is None else prior.numpy()
    chi2 = np.nan_to_num(out["chi2_scan"], nan=np.inf)  # [n, grid]
    star = out["spectype"] == "STAR"
    whole = np.expm1(scan_u[(arch + PRIOR_SHARE * penalty).argmin(1)])
    alone = np.expm1(scan_u[arch.argmin(1)])
    answer = nearest_trial(scan_u, z_model)  # [n]
    candidates = np.concatenate(
        [
            lowest_minima(chi2 + penalty, scan_u, CANDIDATES),
            lowest_minima(chi2, scan_u, CANDIDATES),
            answer[:, None],
        ],
        1,
    )  # [n, 2 x CANDIDATES + 1]
    score = near(arch, candidates) + PRIOR_SHARE * np.take_along_axis(penalty, candidates.clip(min=0), 1)
    pick = candidates[np.arange(len(score)), score.argmin(1)]
    switch = ~star & (score[:, -1] - score.min(1) > MARGIN) & (np.abs(scan_u[pick] - scan_u[answer]) > 0.003)
    tmpl = templates_curve(model, wavelength, flux, ivar.float(), scan_u)  # [n, grid]
    joint = near(arch, candidates) + near(tmpl, candidates)
    joint += JOINT_PRIOR_SHARE * np.take_along_axis(penalty, candidates.clip(min=0), 1)  # [n, c]
    pick_joint = candidates[np.arange(len(joint)), joint.argmin(1)]
    return {
        "model": z_model,
        "joint": np.where(star, z_model, np.expm1(scan_u[pick_joint])),
        "archetypes alone": np.where(star, z_model, alone),
        "archetypes, whole range": np.where(star, z_model, whole),
        "re-ranked": np.where(switch, np.expm1(scan_u[pick]), z_model),
        "archetype_chi2": arch,
        "answer": answer,
        "candidates": candidates,
        "seconds": seconds,
    }


def templates_curve(
    model: Any, wavelength: torch.Tensor, flux: torch.Tensor, ivar: torch.Tensor, scan_u: np.ndarray
) -> np.ndarray:
    """The templates' coarse χ² [n, grid] over the whole of `scan_u` (every vector, the refinement's rebin; the lowest
    set at each trial, STAR left out): what they say at every candidate, not only inside the windows searched."""
    step = scan_u[1] - scan_u[0]
    curves = []
    for name, t in model.templates.items():
        if name == "STAR":
            continue
        u, chi2 = chi2_curve(
            t, wavelength, flux, ivar, (scan_u[0], scan_u[-1]), model.config.refinement_rebin
        )
        index = np.clip(np.rint((scan_u - u[0].item()) / step).astype(int), 0, len(u) - 1)
        curves.append(chi2.numpy()[:, index])
    return np.min(curves, axis=0)


def best_candidate(candidates: np.ndarray, scan_u: np.ndarray, z_true: np.ndarray) -> np.ndarray:
    """The candidate [n] of `candidates` [n, c] (trial indices, -1: none) nearest each truth: what a perfect
    re-ranking of the refinement's candidates would answer."""
    u = np.where(candidates >= 0, scan_u[candidates.clip(min=0)], np.inf)  # [n, c]
    pick = np.abs(u - np.log1p(z_true)[:, None]).argmin(1)
    return np.expm1(u[np.arange(len(u)), pick])


def truth_preferred(
    model: Any, batch: dict[str, Any], result: dict[str, np.ndarray], z_true: np.ndarray, scan_u: np.ndarray
) -> dict[str, Any]:
    """For the model's failures: how many, and in how many the archetypes' / the bases' χ² is lower near the truth
    than near the answer."""
    failed = np.abs(result["model"] - z_true) / (1 + z_true) > CATASTROPHIC_THRESHOLD
    truth = nearest_trial(scan_u, z_true)
    at = {
        name: near(result["archetype_chi2"], index[:, None])[:, 0]
        for name, index in (("truth", truth), ("answer", result["answer"]))
    }
    rows = {key: np.asarray(value)[failed] for key, value in batch.items()}
    pca_truth = template_chi2(model, rows, z_true[failed])
    pca_answer = template_chi2(model, rows, np.clip(result["model"][failed], 0, None))
    return {
        "failures": int(failed.sum()),
        "archetypes_prefer_truth": int((at["truth"] < at["answer"])[failed].sum()),
        "bases_prefer_truth": int((pca_truth < pca_answer).sum()),
    }


def markdown(result: dict[str, Any]) -> str:
    source = {
        "learned": "k-means of training spectra's coefficients on the model's bases",
        "physical": f"noiseless spectra of the mock's physics (seed {SEED}, LSF {LSF_KMS:g} km/s)",
        "physical-sps": f"noiseless spectra of the mock's physics, galaxies from the sps family only (seed "
        f"{SEED}, LSF {LSF_KMS:g} km/s)",
    }[result.get("source", "learned")]
    split = result["split"] if result["split"].startswith("first") else f"{result['split']} split"
    lines = [
        f"# Archetypes at lower S/N: {result['model']}",
        "",
        f"{result['n']} spectra of `{result['data']}` ({split}); {result['archetypes']} archetypes per "
        f"type from {result['per_type']} spectra per type ({source}), polynomial degree {result['degree']}, "
        f"{result.get('rebin', 3)} grid points per χ² bin; machine: "
        f"{result['machine']['summary']}, {result['machine']['date']}. η in % (|Δz| / (1 + z) > 0.15). The "
        "re-ranking's settings were chosen on the reference's validation split (runs/recipe-sps/data).",
        "",
        "| depth | failures | archetypes prefer the truth | bases prefer the truth |",
        "| --- | ---: | ---: | ---: |",
    ]
    for depth, d in result["depths"].items():
        t = d["truth_preferred"]
        lines.append(
            f"| {depth} | {t['failures']} | {t['archetypes_prefer_truth']} | {t['bases_prefer_truth']} |"
        )
    classes = list(next(iter(result["depths"].values()))["eta"]["model"])
    lines += [
        "",
        "| depth | answer | " + " | ".join(classes) + " |",
        "| --- | --- |" + " ---: |" * len(classes),
    ]
    for depth, d in result["depths"].items():
        for method, by_class in d["eta"].items():
            lines.append(
                f"| {depth} | {method} | " + " | ".join(f"{100 * by_class[c]:.2f}" for c in classes) + " |"
            )
    timed = {depth: d["ms_per_spectrum"] for depth, d in result["depths"].items() if "ms_per_spectrum" in d}
    if timed:
        lines += ["", "Wall-clock ms per spectrum (torch's threads on this machine): "]
        lines[-1] += "; ".join(
            f"{depth}: the model's prediction {t['model']:.1f}, the archetypes' χ²(z) {t['archetypes']:.1f}"
            for depth, t in timed.items()
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="SpecPTForRedshift folder with templates")
    parser.add_argument("--data", type=Path, help="prepared dataset (Parquet shards, `specpt prepare`)")
    parser.add_argument("--split", default="validation")
    parser.add_argument(
        "--per-type", type=int, default=4000, help="training spectra per type for the archetypes"
    )
    parser.add_argument("--archetypes", type=int, default=32, help="archetypes per type")
    parser.add_argument(
        "--source",
        choices=("learned", *SPS_SHARES),
        default="learned",
        help="learned: k-means of the training spectra's coefficients on the model's bases; physical: noiseless "
        "spectra of the mock's own physics (--per-type drawn per type, seed SEED); physical-sps: the "
        "same with galaxies from the sps family only",
    )
    parser.add_argument("--degree", type=int, default=2, help="Legendre degree beside each archetype")
    parser.add_argument(
        "--rebin",
        type=int,
        default=3,
        help="archetype grid points per bin of their χ²(z) (the refinement's: 3)",
    )
    parser.add_argument(
        "--test-dir",
        type=Path,
        help="instead of --split: the first --per-class spectra of each class of this accuracy test set (seed "
        f"{TEST_SEED}, as robustness.py reads them)",
    )
    parser.add_argument("--per-class", type=int, default=250, help="spectra per class with --test-dir")
    parser.add_argument(
        "--family",
        choices=tuple(TEST_SETS),
        default="basis",
        help="the mock family of --test-dir (bc03 / sps: robustness.py's held-out family set, one file per class)",
    )
    parser.add_argument("--quick", action="store_true", help="untrained specpt-tiny on a small mock")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.model, args.data = quick_setup(args.out)
        args.split, args.archetypes, args.per_type = "train", 4, 40
    if args.model is None or (args.data is None and (args.test_dir is None or args.source == "learned")):
        parser.error("--model and --data are required (or --quick; --test-dir with a physical --source)")
    if args.test_dir is None:
        model, batch, z_true, classes = model_and_split(args, parser)
    else:
        model = load_model(args.model, task="redshift")
        per_file = 8 if args.quick else SPECTRA_PER_FILE
        n = 5000 if args.family == "basis" and not args.quick else per_file  # as accuracy.py / robustness.py
        per_class = make_test_set(args.test_dir, n, TEST_SEED, per_file, family=args.family)
        files = [per_class[c][0] for c in TEST_SETS[args.family][0]]
        batch, z_true, classes = held_out(files, args.per_class, model.config)
    if args.source in SPS_SHARES:
        steps = {name: t.log_wavelength_step for name, t in model.templates.items() if name in TYPES}
        archetypes = build_archetypes(
            model.config, steps, args.per_type, args.archetypes, SPS_SHARES[args.source]
        )
    else:
        archetypes = learn_archetypes(model, args.data, args.per_type, args.archetypes)
    scan_u = np.log1p(pdf_redshifts(model)["chi2_scan"])
    depths = {}
    for depth in ("own depth", PERTURBATION):
        spectra = batch if depth == "own depth" else perturb(batch, model_wavelength(model.config), depth, 0)
        result = answers(model, spectra, archetypes, scan_u, args.degree, args.rebin)
        result["best candidate"] = best_candidate(result["candidates"], scan_u, z_true)
        eta = {
            method: {
                c: m["eta"]
                for c, m in metrics_by_group(result[method], z_true, classes, overall_key="all").items()
            }
            for method in ANSWERS
        }
        depths[depth] = {
            "truth_preferred": truth_preferred(model, spectra, result, z_true, scan_u),
            "eta": eta,
            "ms_per_spectrum": {k: 1e3 * v / len(z_true) for k, v in result["seconds"].items()},
        }
        print(depth, depths[depth]["truth_preferred"], {m: round(100 * e["all"], 2) for m, e in eta.items()})
    result = {
        "machine": machine_info("cpu"),
        "model": str(args.model),
        "data": str(args.test_dir or args.data),
        "split": f"first {args.per_class} per class, {args.family} family" if args.test_dir else args.split,
        "n": len(z_true),
        "per_type": args.per_type,
        "archetypes": args.archetypes,
        "source": args.source,
        "degree": args.degree,
        "rebin": args.rebin,
        "depths": depths,
    }
    atomic_write_json(args.out / "archetypes.json", result)
    atomic_write_text(args.out / "archetypes.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
