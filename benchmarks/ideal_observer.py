"""The ideal observer at lower S/N: what a template fit that knows each spectrum exactly loses when the S/N drops.

    python benchmarks/ideal_observer.py --per-class 1000 --out benchmarks/results/ideal_observer \
        --robustness benchmarks/results/robustness/recipe-sps-t9000/robustness.json     # ~5 min on 2 cores
    python benchmarks/ideal_observer.py --per-class 250 --z-range 0 4 \
        --out benchmarks/results/ideal_observer-whole-range --robustness ...                     # ~1 min
    python benchmarks/ideal_observer.py --per-class 250 --z-range 0 4 --template rest \
        --out benchmarks/results/ideal_observer-perfect-archetypes-no-prior --robustness ...      # ~1 min
    python benchmarks/ideal_observer.py --per-class 250 --z-range 0 4 --template rest --prior-model runs/ref-arch \
        --prior-share 0.25 --out benchmarks/results/ideal_observer-perfect-archetypes-share-0.25 --robustness ...
    python benchmarks/ideal_observer.py --quick --out /tmp/io                                 # seconds

(... : benchmarks/results/robustness/recipe-sps-t9000-archetypes/robustness.json, SpecPT's refined rows beside.)

robustness.py's "S/N ÷ ≤ 2" row asks how much SpecPT loses when the noise grows. This script asks how much a
template fit that knew each spectrum exactly would lose on the same spectra. The first --per-class spectra of each
class of the accuracy test set (seed 101: the same generator seeds as its files, `release_file_seed`) are
regenerated with their noiseless models (the mock's `model`: pixel-integrated, through DESI's line-spread function,
arms merged). Each spectrum is fitted with one template, its own noiseless model (a cubic spline through its
pixels: smooth, so the truth's own pixels are not a kink that pins the fit), redshifted to every trial z by
stretching its wavelengths (trial step --step in ln(1 + z)), with a free positive amplitude. The trial with the
largest χ² gain over the class's redshift range (the truths' range ± 0.05; with --z-range, one range for every
class, the class not known) wins, refined within ± 2 steps with the
template evaluated at the data's own pixels (a parabola through the best of 81 trials).

This is the likelihood fit with a perfect template and a known class, given every advantage: a stretched template
lacks the wavelengths the truth's model did not cover (those pixels count as template 0, which favours the
truth). It runs at the spectra's own depth and after dividing each S/N by f ~ U[1, --factor] (ivar / f², Gaussian
noise of variance (f² - 1) / ivar added: training/augment.py's `renoise` at probability 1, as robustness.py applies
it; seeded per class). NMAD and η (|Δz| / (1 + z) > 0.15) per class and over all classes, and the changes from the
own depth, go to ideal_observer.json and ideal_observer.md, each spectrum's fits to ideal_observer.ecsv. With
--robustness, SpecPT's refined rows of a robustness.json sit beside them.

With --template rest, each spectrum's template is instead its own rest-frame model (`rest_frame_models`: the same
draws, every rest wavelength a trial needs, so nothing favours the truth at the edges), through the archetypes'
line-spread function, fitted as the model's refinement fits an archetype (`archetype_curve`: free amplitude ≥ 0, a
Legendre polynomial of ARCHETYPE_DEGREE beside it) at every step of the archetypes' grid: a perfect archetype
library. With --prior-model, that model's p(z) penalty on the same spectra is added as its refinement adds it to the
archetypes' χ² (`refinement_archetype_prior` x `pz_penalty`; `--prior-share` overrides the share).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import scipy.fft
import torch
from astropy.table import Table, vstack
from scipy.interpolate import CubicSpline
from scipy.ndimage import gaussian_filter1d
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import CLASSES, SPECTRA_PER_FILE, TEST_SEED  # noqa: E402
from robustness import predict_chunks  # noqa: E402
from speed import machine_info  # noqa: E402

from specpt_hf.archetypes import LSF_KMS, rest_log_grid  # noqa: E402
from specpt_hf.atomic import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402
from specpt_hf.data.mock import C_KMS, generate_spectra, release_file_seed, rest_frame_models  # noqa: E402
from specpt_hf.evaluation.metrics import metrics_by_group  # noqa: E402
from specpt_hf.loading import load_model  # noqa: E402
from specpt_hf.refinement import ARCHETYPE_DEGREE, RestFrameTemplates, archetype_curve  # noqa: E402
from specpt_hf.training.augment import Augmentations, augment, step_generator  # noqa: E402

STEP = 1e-5  # trial step in ln(1 + z), ~3 km/s
REST_STEP = 8.143654062031658e-05  # --template rest: the archetypes' ln(lambda) grid step (the reference's templates')
TEMPLATES = ("model", "rest")
RANGE_PADDING = 0.05  # the trial range: the class's true redshifts ± this


def spectra_with_models(target_class: str, n: int, seed: int = TEST_SEED) -> dict[str, Any]:
    """The first `n` spectra of a class in the accuracy test set (files of SPECTRA_PER_FILE), with their noiseless
    models: `generate_spectra`'s wave, flux, ivar (0 on masked pixels), model [n, pixels] and true z."""
    parts = []
    for k, start in enumerate(range(0, n, SPECTRA_PER_FILE)):
        mock = generate_spectra(target_class, SPECTRA_PER_FILE, release_file_seed(seed, target_class, k))
        rows = slice(0, min(SPECTRA_PER_FILE, n - start))
        parts.append(
            {
                "flux": mock["flux"][rows].astype(np.float64),
                "ivar": np.where(mock["mask"][rows], 0.0, mock["ivar"][rows]).astype(np.float64),
                "model": mock["model"][rows].astype(np.float64),
                "z": mock["truth"]["z"][rows],
            }
        )
    out = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    out["wave"] = np.asarray(mock["wave"], float)
    return out


def rest_models(target_class: str, n: int, rest: np.ndarray, seed: int = TEST_SEED) -> np.ndarray:
    """The rest-frame models [n, len(rest)] of `spectra_with_models`' spectra (the same draws: `rest_frame_models`, no
    line-spread function, no noise), each normalised to unit length."""
    parts = []
    for k, start in enumerate(range(0, n, SPECTRA_PER_FILE)):
        flux = rest_frame_models(
            target_class, SPECTRA_PER_FILE, release_file_seed(seed, target_class, k), rest
        )
        parts.append(flux["flux"][: min(SPECTRA_PER_FILE, n - start)].astype(np.float64))
    models = np.concatenate(parts)
    return models / np.linalg.norm(models, axis=1, keepdims=True)


def own_archetype_redshifts(
    wave: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    rest: np.ndarray,
    models: np.ndarray,
    trials: torch.Tensor,
    prior: torch.Tensor | None = None,
) -> np.ndarray:
    """The z [n] of each spectrum's lowest χ² with its own rest-frame model (`models` [n, len(rest)] on the uniform
    ln λ grid `rest`, through a LSF_KMS line-spread function) as its one archetype: the refinement's
    `archetype_curve` (free amplitude >= 0, ARCHETYPE_DEGREE Legendre calibration) at `trials` [t] (u = ln(1 + z)),
    plus `prior` [n, t] (χ² units) if given. A perfect archetype library: the archetypes' answer with no library
    gap."""
    step = float(np.log(rest[1] / rest[0]))
    smooth = gaussian_filter1d(models, LSF_KMS / C_KMS / step, axis=1)  # [n, grid]
    wavelength = torch.as_tensor(wave)
    z = np.empty(len(flux))
    for i in range(len(flux)):
        own = RestFrameTemplates(float(np.log(rest[0])), step, torch.as_tensor(smooth[i : i + 1]).float())
        chi2 = archetype_curve(
            own,
            wavelength,
            torch.as_tensor(flux[i : i + 1]).float(),
            torch.as_tensor(ivar[i : i + 1]).float(),
            trials,
            1,
        )[0]  # [t]
        if prior is not None:
            chi2 = chi2 + prior[i]
        z[i] = float(torch.expm1(trials[chi2.argmin()]))
    return z


def archetype_prior(
    model: Any, flux: np.ndarray, ivar: np.ndarray, trials: torch.Tensor
) -> torch.Tensor | None:
    """The p(z) penalty [n, t] that `model`'s refinement adds to its archetypes' χ² at `trials` (u = ln(1 + z)):
    `refinement_archetype_prior` x -2 `refinement_prior` ln p(z), from its network on these spectra."""
    batch = {"flux": flux.astype(np.float32), "ivar": ivar.astype(np.float32), "mask": ivar <= 0}
    pz = predict_chunks(model, batch, 128, return_pdf=True)["pz"]  # [n, bins]
    log_p = torch.log(torch.as_tensor(pz).double().clamp(min=1e-300))
    penalty = model.pz_penalty(log_p, trials)  # [n, t], None where the model has no p(z) prior
    return None if penalty is None else model.config.refinement_archetype_prior * penalty


def lower_snr(
    flux: np.ndarray, ivar: np.ndarray, factor: float, generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(flux, ivar) [n, pixels] with each spectrum's S/N divided by f ~ U[1, factor]: the training augmentation
    `renoise` at probability 1, as robustness.py applies it."""
    batch = {"flux": torch.tensor(flux), "ivar": torch.tensor(ivar), "mask": torch.tensor(ivar <= 0)}
    lowered = augment(
        batch, np.empty(flux.shape[1]), Augmentations(probability=1.0, renoise=factor), generator
    )
    return lowered["flux"].double().numpy(), lowered["ivar"].double().numpy()


def best_redshifts(
    wave: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    model: np.ndarray,
    z_true: np.ndarray,
    z_range: tuple[float, float],
    step: float = STEP,
) -> np.ndarray:
    """The maximum-likelihood z [n] of each spectrum with its own noiseless `model` (on `wave`, at `z_true`) as the
    one template, free positive amplitude, trials every `step` in ln(1 + z) within `z_range`, the best refined
    locally (`_local_peak`: up to 2 steps, possibly beyond the range).

    On a log-wavelength grid u (spacing `step`), data and weights are binned to their nearest node and the
    template (a cubic spline through `model`) sampled; the amplitude-fitted χ² gain at shift k,
    max(Σ w f T(u + k·step), 0)² / Σ w T²(u + k·step), is two cross-correlations (FFT). A template shifted by k is the spectrum at 1 + z = (1 + z_true) e^(-k·step).
    """
    u0, size = np.log(wave[0]), int(np.ceil(np.log(wave[-1] / wave[0]) / step)) + 1
    node = np.rint((np.log(wave) - u0) / step).astype(np.int64)  # [pixels]
    grid = np.exp(u0 + step * np.arange(size))  # [size]
    length = scipy.fft.next_fast_len(2 * size, real=True)
    shifts = np.fft.fftfreq(length, 1.0 / length) * step  # circular index -> shift k · step in ln λ
    z_out = np.empty(len(flux))
    for i in range(len(flux)):
        data = np.bincount(node, weights=ivar[i] * flux[i], minlength=size)  # [size]
        weight = np.bincount(node, weights=ivar[i], minlength=size)
        spline = CubicSpline(wave, model[i])
        template = spline(grid)  # [size]
        spectra = scipy.fft.rfft(np.stack([data, weight, template, template**2]), n=length)  # [4, freq]
        cross = scipy.fft.irfft(np.conj(spectra[:2]) * spectra[2:], n=length)  # [2, length]: Σ D T, Σ W T²
        gain = np.where(
            cross[1] > 0, np.clip(cross[0], 0.0, None) ** 2 / np.where(cross[1] > 0, cross[1], 1), 0
        )
        log_z = np.log1p(z_true[i]) - shifts  # [length] ln(1 + z) of each shift
        allowed = (log_z >= np.log1p(z_range[0])) & (log_z <= np.log1p(z_range[1]))
        best = int(np.argmax(np.where(allowed, gain, -1.0)))
        shift = _local_peak(wave, flux[i], ivar[i], spline, shifts[best], step)
        z_out[i] = np.expm1(np.log1p(z_true[i]) - shift)
    return z_out


def _local_peak(
    wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray, model: CubicSpline, shift: float, step: float
) -> float:
    """The shift (in ln λ) of the largest χ² gain within ± 2 steps of `shift`, the template evaluated at the data's
    pixels (no grid): 81 trials, then the vertex of the parabola through the best and its neighbours."""
    shifts = shift + np.linspace(-2.0, 2.0, 81) * step  # [trials]
    stretched = np.clip(wave[None, :] * np.exp(shifts)[:, None], wave[0], wave[-1])  # [trials, pixels]
    template = model(stretched)  # edge values beyond the edges: no pixel drops in or out as the shift moves
    numerator = np.clip(template @ (ivar * flux), 0.0, None)  # [trials]
    denominator = (template**2) @ ivar
    gain = np.where(denominator > 0, numerator**2 / np.where(denominator > 0, denominator, 1.0), 0.0)
    k = int(np.clip(np.argmax(gain), 1, len(gain) - 2))
    curvature = gain[k - 1] - 2.0 * gain[k] + gain[k + 1]
    offset = np.clip(0.5 * (gain[k - 1] - gain[k + 1]) / curvature, -0.5, 0.5) if curvature < 0 else 0.0
    return float(shifts[k] + offset * (shifts[1] - shifts[0]))


def run(
    per_class: int,
    factor: float,
    seed: int,
    step: float = STEP,
    z_range: tuple[float, float] | None = None,
    template: str = "model",
    prior_model: Any = None,
) -> Table:
    """The fits of per_class spectra per class: CLASS, Z (true), and the fitted Z at the own depth and at S/N ÷ ≤
    factor (columns of `depth_columns(factor)`), trials within `z_range` (default: the class's true redshifts ±
    RANGE_PADDING); `template` "model": each spectrum's noiseless observed model (`best_redshifts`), "rest": its
    rest-frame model as its one archetype (`own_archetype_redshifts`), with `prior_model`'s p(z) penalty if given."""
    columns = depth_columns(factor)
    parts = []
    for k, target_class in enumerate(tqdm(CLASSES, desc="ideal observer", unit="class")):
        s = spectra_with_models(target_class, per_class)
        lo, hi = z_range or (max(0.0, s["z"].min() - RANGE_PADDING), s["z"].max() + RANGE_PADDING)
        depths = [(s["flux"], s["ivar"]), lower_snr(s["flux"], s["ivar"], factor, step_generator(seed, k))]
        part = Table({"CLASS": np.full(len(s["z"]), target_class), "Z": s["z"]})
        if template == "rest":
            rest = np.exp(
                rest_log_grid(s["wave"], lo, hi, REST_STEP)
            )  # [grid]: every rest wavelength a trial needs
            models = rest_models(target_class, per_class, rest)
            trials = torch.arange(np.log1p(lo), np.log1p(hi), REST_STEP, dtype=torch.float64)  # [t]
        for column, (flux, ivar) in zip(columns.values(), depths, strict=True):
            if template == "rest":
                prior = None if prior_model is None else archetype_prior(prior_model, flux, ivar, trials)
                part[column] = own_archetype_redshifts(s["wave"], flux, ivar, rest, models, trials, prior)
            else:
                part[column] = best_redshifts(s["wave"], flux, ivar, s["model"], s["z"], (lo, hi), step)
        parts.append(part)
    return vstack(parts)


def depth_columns(factor: float) -> dict[str, str]:
    """{depth name: column of the fits table}."""
    return {"own depth": "Z_OWN", f"S/N ÷ ≤ {factor:g}": "Z_LOWER"}


def metrics(fitted: Table, factor: float) -> dict[str, Any]:
    """{depth: metrics by class and "all"} of a `run` table."""
    labels, truth = np.asarray(fitted["CLASS"]).astype(str), np.asarray(fitted["Z"], float)
    return {
        name: metrics_by_group(np.asarray(fitted[column], float), truth, labels, overall_key="all")
        for name, column in depth_columns(factor).items()
    }


def markdown(results: dict[str, Any]) -> str:
    own, lowered = list(results["metrics"])
    specpt = results.get("specpt_refined")
    head = f"| class | n | NMAD {own} | NMAD {lowered} | NMAD ratio | η {own} (%) | η {lowered} (%) | Δη (points) |"
    rule = "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    if specpt:
        head += " SpecPT refined NMAD ratio | SpecPT refined Δη (points) |"
        rule += " ---: | ---: |"
    lines = [
        "# The ideal observer at lower S/N",
        "",
        f"{results['test_set']}. Machine: {results['machine']['summary']}, {results['machine']['date']}. "
        + fit_description(results),
        "",
        head,
        rule,
    ]
    for cls, a in results["metrics"][own].items():
        b = results["metrics"][lowered][cls]
        row = (
            f"| {cls} | {a['n']} | {a['nmad']:.6f} | {b['nmad']:.6f} | {b['nmad'] / a['nmad']:.2f} | "
            f"{100 * a['eta']:.2f} | {100 * b['eta']:.2f} | {100 * (b['eta'] - a['eta']):+.2f} |"
        )
        if specpt:
            ratio, delta = specpt.get(cls, (float("nan"), float("nan")))
            row += f" {ratio:.2f} | {delta:+.2f} |"
        lines.append(row)
    if specpt:
        lines += [
            "",
            f"SpecPT: the refined rows of {results['robustness']} (its first 250 spectra per class).",
        ]
    return "\n".join(lines) + "\n"


def fit_description(results: dict[str, Any]) -> str:
    """What the table's fits are, for its caption."""
    z_range = results.get("z_range")
    over = f"z {z_range[0]:g} to {z_range[1]:g}, the class not known" if z_range else "its class's range"
    if results.get("template") == "rest":
        return (
            f"Each spectrum fitted with its own rest-frame model as its one archetype (LSF {LSF_KMS:g} km/s, free "
            f"amplitude, degree-{ARCHETYPE_DEGREE} Legendre calibration, the refinement's archetype χ², trials every "
            f"{REST_STEP:.3g} "
            f"in ln(1 + z) over {over}, "
            + (
                f"plus {results['prior_share']:g} x the p(z) prior of {results['prior_model']}"
                if results.get("prior_model")
                else "no prior"
            )
            + "): a perfect archetype library. η in %, its change in points."
        )
    return (
        f"Each spectrum fitted with its own noiseless model as the one template (free amplitude, trials every "
        f"{results['step']:g} in ln(1 + z) over {over}): the best any template fit can do. η in %, its change in "
        "points."
    )


def specpt_rows(path: Path, perturbation: str) -> dict[str, tuple[float, float]]:
    """{class: (refined NMAD ratio, Δη in points)} of `perturbation` in a robustness.json, against its `none` row."""
    metrics = json.loads(path.read_text())["metrics"]
    if perturbation not in metrics:
        raise ValueError(f"{path}: no {perturbation!r} row; it has {sorted(metrics)}")
    base, row = metrics["none"]["refined"], metrics[perturbation]["refined"]
    return {c: (row[c]["nmad"] / base[c]["nmad"], 100 * (row[c]["eta"] - base[c]["eta"])) for c in row}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=1000, help="spectra per class (default 1000)")
    parser.add_argument("--factor", type=float, default=2.0, help="largest S/N reduction factor (default 2)")
    parser.add_argument("--step", type=float, default=STEP, help="trial step in ln(1 + z)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the added noise")
    parser.add_argument(
        "--z-range",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="trial redshifts for every class (default: each class's true redshifts ± RANGE_PADDING); "
        "e.g. 0 4, SpecPT's whole range, where the class is not known",
    )
    parser.add_argument(
        "--template",
        choices=TEMPLATES,
        default="model",
        help="model: each spectrum's noiseless observed model (default); rest: its rest-frame model as its one "
        "archetype, through the refinement's archetype χ² (a perfect archetype library, no prior)",
    )
    parser.add_argument(
        "--prior-model",
        type=Path,
        help="with --template rest: add this SpecPTForRedshift's p(z) penalty on the same spectra, as its "
        "refinement adds it to its archetypes' χ² (refinement_archetype_prior x its p(z) prior)",
    )
    parser.add_argument(
        "--prior-share",
        type=float,
        help="with --prior-model: this share of its p(z) prior instead of its refinement_archetype_prior",
    )
    parser.add_argument("--robustness", type=Path, help="a robustness.json whose refined S/N rows go beside")
    parser.add_argument("--quick", action="store_true", help="8 spectra per class")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.factor <= 1.0:
        parser.error(f"--factor is a S/N reduction factor > 1, got {args.factor}")
    if args.per_class < 1:
        parser.error(f"--per-class must be positive, got {args.per_class}")
    per_class = 8 if args.quick else args.per_class
    specpt = specpt_rows(args.robustness, f"S/N ÷ ≤ {args.factor:g}") if args.robustness else None
    results = {
        "machine": machine_info("cpu"),
        "test_set": f"the first {per_class} spectra of each class of the accuracy test set (seed {TEST_SEED})",
        "step": args.step,
        "factor": args.factor,
        "z_range": args.z_range,
        "template": args.template,
        "prior_model": args.prior_model and str(args.prior_model),
    }
    if args.z_range and not 0.0 <= args.z_range[0] < args.z_range[1]:
        parser.error(f"--z-range must be 0 <= LOW < HIGH, got {args.z_range}")
    if args.prior_model and args.template != "rest":
        parser.error("--prior-model needs --template rest")
    if args.prior_share is not None and not args.prior_model:
        parser.error("--prior-share needs --prior-model")
    prior_model = load_model(args.prior_model, task="redshift") if args.prior_model else None
    if args.prior_share is not None:
        prior_model.config.refinement_archetype_prior = args.prior_share
    if prior_model is not None:
        results["prior_share"] = prior_model.config.refinement_archetype_prior
    fitted = run(
        per_class,
        args.factor,
        args.seed,
        args.step,
        args.z_range and tuple(args.z_range),
        args.template,
        prior_model,
    )
    results["metrics"] = metrics(fitted, args.factor)
    if specpt:
        results["robustness"], results["specpt_refined"] = str(args.robustness), specpt
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(
        args.out / "ideal_observer.ecsv", lambda tmp: fitted.write(tmp, format="ascii.ecsv", overwrite=True)
    )
    atomic_write_json(args.out / "ideal_observer.json", results)
    atomic_write_text(args.out / "ideal_observer.md", markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
