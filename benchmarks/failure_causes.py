"""Why refined redshifts fail: each catastrophic failure of the held-out spectra, unperturbed and under one of
robustness.py's perturbations (default S/N ÷ ≤ 2), put down to the templates, the priors or the search.

    python benchmarks/failure_causes.py --model benchmarks/models/specpt-small-cpu-sps-t9000 \
        --test-dir runs/benchmarks/accuracy/testset --per-class 250 --out benchmarks/results/failure_causes
    python benchmarks/failure_causes.py --quick --out /tmp/fc     # seconds: untrained tiny model + quick templates

The spectra are robustness.py's (the first --per-class of each class's first held-out file, seed 101), perturbed
exactly as there (the same --seed and perturbation stream), so the failures are the ones its table counts. Each
set is predicted as the model is configured (with the coarse χ²(z) curve, NaN where not searched). The templates'
lowest χ² within ± `NEAR` in ln(1 + z) of the true redshift and of the answer (every template set with all its
vectors, no prior) then puts each failure (|Δz| / (1 + z) > 0.15) down to

- `templates`: the templates fit the answer at least as well as the truth: no search or prior would help;
- `priors`: the truth fits better and the coarse curve was searched near it: the p(z) and spectral-type penalties
  chose the answer;
- `search`: the truth fits better but lay outside every window searched (p(z) modes, aliases, whole range).

Beside the causes: the failures whose truth lies within the search window of one of the network's p(z) modes (the
`refinement_modes` strongest, as the refinement takes them), a measure of how often p(z) points at the truth at
all, and the network's p(z) calibration over every spectrum: the share of truths inside the central 68 % and 95 %
intervals of their p(z) (from the PIT). The set is predicted a second time with every spectrum searched over the
whole range (`refinement_wide_quality` above 1; priors kept), and its failures go beside. Writes
failure_causes.json and failure_causes.md to --out.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import CLASSES  # noqa: E402
from robustness import PERTURBATIONS, perturb, predict_chunks  # noqa: E402
from template_smoothing import benchmark_parser, refined_test_spectra, write_result  # noqa: E402

from specpt_hf.evaluation.metrics import CATASTROPHIC_THRESHOLD, pdf_coverage  # noqa: E402
from specpt_hf.prediction import (  # noqa: E402
    model_wavelength,
    pdf_integral_transform,
    pdf_redshifts,
    pz_bin_edges,
)
from specpt_hf.refinement import chi2_scan, pz_modes, star_range  # noqa: E402

NEAR = 0.003  # half-width in ln(1 + z) of "at the truth" and "at the answer" (~900 km/s)
CAUSES = ("templates", "priors", "search")


def predict_with_scan(model: Any, batch: dict[str, Any], whole_range: bool) -> dict[str, np.ndarray]:
    """`predict_spectra` columns with the coarse χ² curve (`chi2_scan` [n, trials], NaN where not searched), as
    configured or with every spectrum searched over the whole range."""
    keep = model.config.refinement_wide_quality
    model.config.refinement_wide_quality = 1.01 if whole_range else keep
    try:
        return predict_chunks(model, batch, return_pdf=True)
    finally:
        model.config.refinement_wide_quality = keep


def lowest_near(curve: np.ndarray, scan_u: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The lowest finite χ² [n] of each row of `curve` [n, trials] within ± NEAR of `u` [n] (inf: none)."""
    near = np.abs(scan_u[None, :] - u[:, None]) <= NEAR  # [n, trials]
    return np.where(near & np.isfinite(curve), curve, np.inf).min(axis=1)


def template_chi2(model: Any, batch: dict[str, Any], z: np.ndarray, trials: int = 31) -> np.ndarray:
    """The templates' lowest χ² [n] within ± NEAR of each `z` [n] (`trials` trials, every template set, all its
    vectors, no prior; STAR at stellar velocities only): how well the model's templates can fit each spectrum
    there."""
    flux = torch.as_tensor(np.asarray(batch["flux"]), dtype=torch.float32)  # [n, pixels]
    ivar = torch.as_tensor(np.asarray(batch["ivar"]), dtype=torch.float32)
    ivar = torch.where(torch.as_tensor(np.asarray(batch["mask"])), 0.0, ivar)
    u = torch.as_tensor(np.log1p(z))[:, None] + torch.linspace(-NEAR, NEAR, trials, dtype=torch.float64)
    wavelength = torch.as_tensor(model_wavelength(model.config))
    best = []
    for name, templates in model.templates.items():
        chi2 = chi2_scan(templates, wavelength, flux, ivar, u)[0]  # [n, trials]
        if name == "STAR":  # fitted over stellar velocities only, as the refinement does
            low, high = star_range()
            chi2 = torch.where((u >= low) & (u <= high), chi2, torch.inf)
        best.append(chi2.min(1).values)
    return torch.stack(best).min(0).values.double().numpy()


def truth_in_modes(model: Any, pz: np.ndarray, z_true: np.ndarray) -> np.ndarray:
    """[n] bool: the true redshift lies within the refinement's window (± `refinement_window` bins) of one of the
    `refinement_modes` strongest modes of p(z) (`pz` [n, bins], at the bins' centres)."""
    config = model.config
    separation = max(1, math.ceil(2 * config.refinement_window))
    peaks = pz_modes(torch.as_tensor(pz), config.refinement_modes, separation).numpy()  # [n, modes]
    u_modes = model.redshift_bin_centers().double().numpy()[peaks]  # [n, modes]
    half_width = config.refinement_window * config.redshift_bin_width
    return (np.abs(u_modes - np.log1p(z_true)[:, None]) <= half_width).any(1)


def pz_coverage(model: Any, pz: np.ndarray, z_true: np.ndarray, classes: np.ndarray) -> dict[str, Any]:
    """{class or "all": the shares of true redshifts inside the central 68 % and 95 % intervals of the network's
    p(z) (`pz` [n, bins]; calibrated: 0.68 and 0.95)}."""
    pit = pdf_integral_transform(pz, pz_bin_edges(model), np.log1p(z_true))
    return {name: pdf_coverage(pit[sel]) for name, sel in class_rows(classes).items()}


def class_rows(classes: np.ndarray) -> dict[str, np.ndarray]:
    """{"all" and each of CLASSES: its rows [n] bool}."""
    return {
        name: np.ones(len(classes), bool) if name == "all" else classes == name for name in ("all", *CLASSES)
    }


def causes(
    z: np.ndarray,
    chi2_truth: np.ndarray,
    chi2_answer: np.ndarray,
    searched: np.ndarray,
    scan_u: np.ndarray,
    z_true: np.ndarray,
) -> np.ndarray:
    """Per spectrum: "" where the answer `z` is right, else the cause of its failure (one of `CAUSES`), from the
    templates' χ² near the truth and near the answer [n] and the coarse χ² curve as searched ([n, trials] at
    `scan_u` = ln(1 + z), NaN where not searched)."""
    failed = ~(np.abs(z - z_true) / (1 + z_true) <= CATASTROPHIC_THRESHOLD)  # NaN counts as a failure
    truth_searched = np.isfinite(lowest_near(searched, scan_u, np.log1p(z_true)))
    cause = np.where(chi2_answer <= chi2_truth, "templates", np.where(truth_searched, "priors", "search"))
    return np.where(failed, cause, "")


def tally(
    cause: np.ndarray, in_modes: np.ndarray, z_whole: np.ndarray, z_true: np.ndarray, classes: np.ndarray
) -> dict[str, Any]:
    """{class or "all": n, failures, each cause's count, the failures whose truth lies near a p(z) mode
    (`in_modes` [n]) and the failures of the whole-range prediction}."""
    whole_failed = ~(np.abs(z_whole - z_true) / (1 + z_true) <= CATASTROPHIC_THRESHOLD)
    rows = {}
    for name, sel in class_rows(classes).items():
        rows[name] = {
            "n": int(sel.sum()),
            "failures": int((cause[sel] != "").sum()),
            **{c: int((cause[sel] == c).sum()) for c in CAUSES},
            "truth_in_pz_modes": int(((cause[sel] != "") & in_modes[sel]).sum()),
            "whole_range_failures": int(whole_failed[sel].sum()),
        }
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Why refined redshifts fail",
        "",
        f"{result['machine']['summary']}, {result['machine']['date']}. Model: {result['model']}; {result['test_set']}, "
        f"perturbed as robustness.py does (seed {result['seed']}). A failure (|Δz| / (1 + z) > 0.15) is `templates` "
        f"where the templates' lowest χ² within ± {NEAR:g} in ln(1 + z) of the answer (every set, all vectors, no "
        "prior) is no higher than near the truth, `priors` where the truth fits better and the coarse curve was "
        "searched near it, `search` where it fits better but was not searched. `in p(z) modes`: failures whose truth "
        "lies within the search window of one of the network's p(z) modes. The last column: failures when every "
        "spectrum is searched over the whole range (priors kept).",
        "",
        "| perturbation | class | n | failures | templates | priors | search | in p(z) modes | whole range: failures |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, rows in result["perturbations"].items():
        for cls, r in rows.items():
            lines.append(
                f"| {name} | {cls} | {r['n']} | {r['failures']} | {r['templates']} | {r['priors']} | "
                f"{r['search']} | {r['truth_in_pz_modes']} | {r['whole_range_failures']} |"
            )
    lines += [
        "",
        "The network's p(z) (every spectrum, not only the failures): the share of true redshifts inside the central "
        "68 % and 95 % intervals of their p(z) (calibrated: 68 and 95 %).",
        "",
        "| perturbation | class | in 68 % interval (%) | in 95 % interval (%) |",
        "| --- | --- | ---: | ---: |",
    ]
    for name, rows in result["pz_coverage"].items():
        for cls, c in rows.items():
            lines.append(f"| {name} | {cls} | {100 * c['0.68']:.1f} | {100 * c['0.95']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--perturbation",
        default="S/N ÷ ≤ 2",
        choices=[name for name in PERTURBATIONS if name != "none"],
        help="the perturbation beside the unperturbed set (default: S/N ÷ ≤ 2)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the perturbations (robustness.py's)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model, batch, z_true, classes = refined_test_spectra(args, parser)
    scan_z = pdf_redshifts(model)["chi2_scan"]
    result, coverage = {}, {}
    for name in ("none", args.perturbation):
        perturbed = perturb(batch, model_wavelength(model.config), name, args.seed)
        configured = predict_with_scan(model, perturbed, whole_range=False)
        whole = predict_with_scan(model, perturbed, whole_range=True)
        answer = np.nan_to_num(configured["z"], nan=-0.5)
        chi2_truth, chi2_answer = (template_chi2(model, perturbed, z) for z in (z_true, answer))
        cause = causes(answer, chi2_truth, chi2_answer, configured["chi2_scan"], np.log1p(scan_z), z_true)
        in_modes = truth_in_modes(model, configured["pz"], z_true)
        result[name] = tally(cause, in_modes, whole["z"], z_true, classes)
        coverage[name] = pz_coverage(model, configured["pz"], z_true, classes)
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in result[name]["all"].items()))
    write_result(args, "failure_causes", markdown, seed=args.seed, perturbations=result, pz_coverage=coverage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
