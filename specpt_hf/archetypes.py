"""Archetypes for a redshift model: whole rest-frame spectra that judge its refinement's fits over the whole range
(`specpt archetypes`, see `SpecPTForRedshift.set_archetypes` and `config.refinement_archetype_*`).

    specpt archetypes --model runs/main/redshift          # adds archetypes.safetensors, described in config.json

A basis fits any combination of its vectors, so at low S/N a few noisy pixels can be fitted at a wrong redshift;
an archetype is one physical spectrum with a free positive amplitude (Redrock's archetypes), so it cannot. They come
from the mock's physics (`specpt_hf.data.mock.rest_frame_models`: continua of the basis and E-MILES families, emission
lines with BPT ratios, quasars with the forest's mean transmission): `--per-type` noiseless spectra drawn per type,
through a Gaussian line-spread function, and the `--count` members nearest the k-means centres of their shapes.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from scipy.cluster.vq import kmeans2
from scipy.ndimage import gaussian_filter1d

from .cli import add_debug_flag, run_reporting_errors
from .configuration_specpt import SpecPTForRedshiftConfig
from .data.mock import C_KMS, rest_frame_models
from .modeling_specpt import ARCHETYPES_NAME
from .prediction import model_wavelength
from .refinement import RestFrameTemplates, describe_templates, load_templates
from .templates import add_templates

logger = logging.getLogger(__name__)

SEED = (
    7  # the archetypes' draws (the recipe's training mocks use seed 1, the benchmarks' test sets 101 and 202)
)
LSF_KMS = 50.0  # Gaussian sigma of the line-spread function (DESI: ~25-65 km/s)
SPS_SHARE = 0.4  # galaxies from the E-MILES (`sps`) family, as the CPU recipe trains; the rest from `basis`


def archetype_draws(sps_share: float = SPS_SHARE) -> dict[str, list[tuple[str, str, float]]]:
    """{type: [(mock class, family, share of the type's draws)]}: galaxies from BGS, LRG and ELG, `sps_share` of
    them from the `sps` family; quasars from the QSO physics."""
    families = [
        (family, share) for family, share in (("basis", 1 - sps_share), ("sps", sps_share)) if share > 0
    ]
    return {
        "GALAXY": [(c, f, s / 3) for c in ("bgs", "lrg", "elg") for f, s in families],
        "QSO": [("qso", "basis", 1.0)],
    }


def rest_log_grid(wavelength: np.ndarray, z_min: float, z_max: float, step: float) -> np.ndarray:
    """ln(rest wavelength / Å) every `step`, covering what observed `wavelength` [pixels] sees between `z_min` and
    `z_max`, a step beyond each end: no trial redshift leaves a pixel without a rest value."""
    start = np.log(wavelength[0] / (1 + z_max)) - step
    return np.arange(start, np.log(wavelength[-1] / (1 + z_min)) + 2 * step, step)


def build_archetypes(
    config: SpecPTForRedshiftConfig,
    steps: dict[str, float],
    per_type: int = 3000,
    count: int = 16,
    sps_share: float = SPS_SHARE,
    seed: int = SEED,
    lsf_kms: float = LSF_KMS,
) -> dict[str, RestFrameTemplates]:
    """Per type of `steps` ({type: ln(lambda) step, e.g. the templates'}) that `archetype_draws` knows: `count`
    archetypes of `per_type` drawn noiseless spectra, on a grid covering every rest wavelength the model's pixels
    see between its z_min and z_max, so no trial redshift leaves pixels without an archetype ([count, grid])."""
    wavelength = model_wavelength(config)
    out = {}
    for name, draws in archetype_draws(sps_share).items():
        if name not in steps:
            continue
        step = steps[name]
        log_rest = rest_log_grid(wavelength, config.z_min, config.z_max, step)  # [grid]
        rest, start = np.exp(log_rest), log_rest[0]
        spectra = np.concatenate(
            [
                rest_frame_models(cls, max(1, round(share * per_type)), seed, rest, family)["flux"]
                for cls, family, share in draws
            ]
        )  # [n, grid]
        if lsf_kms > 0:
            spectra = gaussian_filter1d(spectra, lsf_kms / C_KMS / step, axis=1)
        spectra /= np.linalg.norm(spectra, axis=1, keepdims=True)
        out[name] = RestFrameTemplates(
            float(start), step, torch.from_numpy(medoids(spectra, count, seed)).float()
        )
    return out


def medoids(spectra: np.ndarray, count: int, seed: int) -> np.ndarray:
    """The members of `spectra` [n, grid] nearest the centres of `count` k-means clusters of their shapes (on every
    fourth grid point: enough to cluster shapes) [<= count, grid]."""
    coarse = spectra[:, ::4]  # [n, grid / 4]
    centres, label = kmeans2(coarse, min(count, len(spectra)), rng=seed, minit="++")
    members = [
        np.flatnonzero(label == k)[np.linalg.norm(coarse[label == k] - c, axis=1).argmin()]
        for k, c in enumerate(centres)
        if (label == k).any()
    ]
    return spectra[members]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specpt archetypes",
        description="Archetypes that judge a redshift model's refinement (see specpt_hf.archetypes).",
    )
    parser.add_argument("--model", required=True, type=Path, help="SpecPTForRedshift folder with templates")
    parser.add_argument("--count", type=int, default=16, help="archetypes per type (default 16)")
    parser.add_argument("--per-type", type=int, default=3000, help="spectra drawn per type (default 3000)")
    parser.add_argument(
        "--sps-share",
        type=float,
        default=SPS_SHARE,
        help=f"galaxies from the E-MILES family (default {SPS_SHARE})",
    )
    parser.add_argument("--seed", type=int, default=SEED, help=f"seed of the draws (default {SEED})")
    parser.add_argument(
        "--lsf-kms",
        type=float,
        default=LSF_KMS,
        help=f"Gaussian sigma of the instrument's line-spread function in km/s (default {LSF_KMS:g}, DESI)",
    )
    add_debug_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.count < 1 or args.per_type < args.count:
        parser.error(f"need 1 <= --count <= --per-type, got --count {args.count}, --per-type {args.per_type}")
    if not args.lsf_kms >= 0:
        parser.error(f"--lsf-kms must be >= 0, got {args.lsf_kms}")
    if not 0 <= args.sps_share <= 1:
        parser.error(f"--sps-share must be in [0, 1], got {args.sps_share}")
    if not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json (not a model folder)")
    return run_reporting_errors("archetypes", lambda: _run(args), args.debug)


def _run(args: argparse.Namespace) -> int:
    config = SpecPTForRedshiftConfig.from_pretrained(args.model)
    if not config.templates:
        raise ValueError(
            f"{args.model}: no templates to refit the archetypes' choices; add them with `specpt templates`"
        )
    templates = load_templates(args.model / config.templates["file"])
    steps = {name: t.log_wavelength_step for name, t in templates.items()}
    archetypes = build_archetypes(
        config, steps, args.per_type, args.count, args.sps_share, args.seed, args.lsf_kms
    )
    path = add_templates(args.model, archetypes, "archetypes")
    for name, info in describe_templates(archetypes, ARCHETYPES_NAME)["spectypes"].items():
        print(
            f"{name}: {info['num_vectors']} archetypes, rest {info['rest_wavelength_min']:.0f}-{info['rest_wavelength_max']:.0f} A"
        )
    print(f"wrote {path} and described it in {args.model / 'config.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
