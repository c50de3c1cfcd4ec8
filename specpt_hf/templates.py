"""`specpt templates`: rest-frame templates for a redshift model, learned from its labelled training shards.

    specpt templates DATA_DIR --model MODEL_DIR            # writes MODEL_DIR/templates.safetensors (+ type head)
    specpt templates DATA_DIR --model MODEL_DIR --galaxy-vectors 10 --qso-vectors 6 --star-vectors 5

One basis per spectral type (GALAXY, QSO, STAR: the shards' `spectype`, on real data Redrock's labels; a type
without labelled spectra gets none) by weighted
EM-PCA (`specpt_hf.refinement.build_templates`) of the `train` split's spectra with `zwarn == 0`, each shifted
to its rest frame on a ln(lambda) grid as fine as the observed pixels. The model folder's config.json then
describes them (`templates`), and `SpecPTForRedshift.from_pretrained` loads them: inference refines the network's
redshift by chi^2 (`config.refinement`); STAR templates are fitted to every spectrum within +-1000 km/s of rest, so
stars come out as SPECTYPE STAR rather than as a galaxy at some redshift.

With two types or more, the same spectra also fit the model's spectral-type head (`fit_spectype_head`: a linear
layer on the frozen network's embedding), whose p(type) weighs the template sets in the chi^2 choice
(`config.refinement_type_prior`); `--no-type-head` skips it.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from .atomic import atomic_write_text
from .cli import add_debug_flag, run_reporting_errors
from .configuration_specpt import SpecPTForRedshiftConfig
from .modeling_specpt import ARCHETYPES_NAME, TEMPLATES_NAME, SpecPTForRedshift
from .prediction import model_wavelength
from .refinement import RestFrameTemplates, build_templates, describe_templates, save_templates
from .training.data import split_files

logger = logging.getLogger(__name__)

SPECTYPES = ("GALAXY", "QSO", "STAR")
DEFAULT_VECTORS = {"GALAXY": 10, "QSO": 6, "STAR": 5}
COLUMNS = ["flux", "ivar", "mask", "z", "zwarn", "spectype"]


def read_labelled(
    data_dir: str | os.PathLike, split: str, max_per_type: int, seed: int = 0
) -> dict[str, dict[str, np.ndarray]]:
    """Up to `max_per_type` spectra of each spectral type with `zwarn == 0` from a split's shards, drawn at
    random (`seed`): per type `flux`, `ivar` ([n, pixels], ivar 0 at masked pixels) and `z` [n]."""
    files = split_files(data_dir, split)
    labels = [pq.read_table(file, columns=["z", "zwarn", "spectype"]) for file in files]
    rng = np.random.default_rng(seed)
    chosen: dict[str, list[tuple[int, int]]] = {}
    for spectype in SPECTYPES:
        rows = [
            (f, int(r))
            for f, table in enumerate(labels)
            for r in np.flatnonzero(
                (np.asarray(table["spectype"]) == spectype) & (np.asarray(table["zwarn"]) == 0)
            )
        ]
        if rows:
            pick = rng.choice(len(rows), size=min(max_per_type, len(rows)), replace=False)
            chosen[spectype] = sorted(rows[i] for i in pick)
    out: dict[str, dict[str, list[np.ndarray]]] = {t: {"flux": [], "ivar": [], "z": []} for t in chosen}
    for f, file in enumerate(tqdm(files, desc="reading shards", unit="file")):
        wanted = {t: [r for g, r in rows if g == f] for t, rows in chosen.items()}
        if not any(wanted.values()):
            continue
        table = pq.read_table(file, columns=["flux", "ivar", "mask", "z"])
        for spectype, rows in wanted.items():
            if not rows:
                continue
            part = table.take(rows)
            flux = np.asarray(part["flux"].combine_chunks().flatten()).reshape(len(rows), -1)
            ivar = np.asarray(part["ivar"].combine_chunks().flatten()).reshape(len(rows), -1)
            mask = np.asarray(part["mask"].combine_chunks().flatten()).reshape(len(rows), -1)
            out[spectype]["flux"].append(flux)
            out[spectype]["ivar"].append(np.where(mask, 0.0, ivar).astype(np.float32))
            out[spectype]["z"].append(np.asarray(part["z"]))
    return {t: {key: np.concatenate(values) for key, values in parts.items()} for t, parts in out.items()}


def fit_templates(
    data_dir: str | os.PathLike,
    config: SpecPTForRedshiftConfig,
    num_vectors: dict[str, int],
    max_per_type: int = 3000,
    split: str = "train",
    seed: int = 0,
) -> dict[str, RestFrameTemplates]:
    """One rest-frame basis per spectral type present in the split, on the model's wavelength grid."""
    return learn_templates(
        _read_some(data_dir, split, max_per_type, seed), config, num_vectors, data_dir, split
    )


def _read_some(
    data_dir: str | os.PathLike, split: str, max_per_type: int, seed: int
) -> dict[str, dict[str, np.ndarray]]:
    spectra = read_labelled(data_dir, split, max_per_type, seed)
    if not spectra:
        raise ValueError(f"{Path(data_dir) / split}: no spectra with zwarn == 0 and spectype in {SPECTYPES}")
    return spectra


def learn_templates(
    spectra: dict[str, dict[str, np.ndarray]],
    config: SpecPTForRedshiftConfig,
    num_vectors: dict[str, int],
    data_dir: str | os.PathLike,
    split: str,
) -> dict[str, RestFrameTemplates]:
    """One rest-frame basis per type of `spectra` (`read_labelled`'s, from `data_dir`'s `split`)."""
    wavelength = model_wavelength(config)
    templates = {}
    for spectype, arrays in spectra.items():
        if arrays["flux"].shape[1] != len(wavelength):
            raise ValueError(
                f"{Path(data_dir) / split}: spectra have {arrays['flux'].shape[1]} pixels, the model's grid "
                f"{len(wavelength)}"
            )
        vectors = min(num_vectors[spectype], len(arrays["z"]))
        logger.info("%s: %d vectors from %d spectra", spectype, vectors, len(arrays["z"]))
        templates[spectype] = build_templates(
            wavelength, arrays["flux"], arrays["ivar"], arrays["z"], vectors
        )
    return templates


def fit_spectype_head(
    model: SpecPTForRedshift,
    spectra: dict[str, dict[str, np.ndarray]],
    l2: float = 1e-3,
    batch_size: int = 256,
) -> dict[str, float]:
    """Fit the model's spectral-type head: multinomial logistic regression (L-BFGS, L2 penalty `l2` on the
    standardised embedding) of the type on the frozen network's embedding of `spectra` ({type: {flux, ivar}}, as
    `read_labelled` returns them; equal numbers per type, so p(type) carries no population fractions). Installs it
    with `set_spectype_head` and returns its accuracy per type on those spectra."""
    labels = sorted(spectra)
    if len(labels) < 2:
        raise ValueError(f"a type head needs labelled spectra of two types or more, got {labels}")
    embedding, target = [], []
    model.eval()
    for index, name in enumerate(labels):
        flux, ivar = (torch.from_numpy(spectra[name][key]) for key in ("flux", "ivar"))  # [n, pixels]
        for start in tqdm(range(0, len(flux), batch_size), desc=f"type head: {name}", unit="batch"):
            with torch.no_grad():
                part = slice(start, start + batch_size)
                embedding.append(model.embed(flux[part], ivar[part]).double())  # [b, d_model]
        target.append(torch.full((len(flux),), index))
    x, y = torch.cat(embedding), torch.cat(target)  # [n, d_model], [n]
    mean, scale = x.mean(0), x.std(0).clamp(min=1e-6)  # [d_model]
    linear = torch.nn.Linear(x.shape[1], len(labels), dtype=torch.float64)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (
            torch.nn.functional.cross_entropy(linear((x - mean) / scale), y) + l2 * linear.weight.pow(2).sum()
        )
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        weight = linear.weight / scale  # [types, d_model]: standardisation folded in
        bias = linear.bias - weight @ mean  # [types]
        predicted = (x @ weight.T + bias).argmax(1)  # [n]
    model.set_spectype_head(labels, weight.float(), bias.float())
    return {name: float((predicted[y == i] == i).double().mean()) for i, name in enumerate(labels)}


def add_templates(
    model_dir: str | os.PathLike, templates: dict[str, RestFrameTemplates], kind: str = "templates"
) -> Path:
    """Write rest-frame sets into a redshift model folder, `templates.safetensors` (or `archetypes.safetensors` with
    `kind="archetypes"`), and describe them in its config.json's `kind` entry (both written atomically)."""
    model_dir = Path(model_dir)
    name = {"templates": TEMPLATES_NAME, "archetypes": ARCHETYPES_NAME}[kind]
    config = SpecPTForRedshiftConfig.from_pretrained(model_dir)
    save_templates(model_dir / name, templates)
    setattr(config, kind, describe_templates(templates, name))
    atomic_write_text(model_dir / "config.json", config.to_json_string())
    return model_dir / name


def build_model_templates(
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    num_vectors: dict[str, int] | None = None,
    max_per_type: int = 3000,
    split: str = "train",
    seed: int = 0,
    type_head: bool = True,
) -> dict[str, RestFrameTemplates]:
    """Learn templates from `data_dir`'s labelled `split` on the model's grid and add them to `model_dir`; with
    `type_head` and two types or more, fit the spectral-type head on the same spectra too (`add_spectype_head`)."""
    config = SpecPTForRedshiftConfig.from_pretrained(model_dir)
    spectra = _read_some(data_dir, split, max_per_type, seed)
    templates = learn_templates(spectra, config, num_vectors or DEFAULT_VECTORS, data_dir, split)
    add_templates(model_dir, templates)
    if type_head and len(spectra) > 1:
        accuracy = add_spectype_head(model_dir, spectra)
        logger.info("type head, accuracy on its training spectra: %s", accuracy)
    return templates


def add_spectype_head(
    model_dir: str | os.PathLike, spectra: dict[str, dict[str, np.ndarray]]
) -> dict[str, float]:
    """Fit the spectral-type head of the redshift model in `model_dir` on `spectra` ([`fit_spectype_head`]) and
    write its weights and config.json back (each file replaced atomically, config.json last)."""
    model_dir = Path(model_dir)
    model = SpecPTForRedshift.from_pretrained(model_dir)
    accuracy = fit_spectype_head(model, spectra)
    with tempfile.TemporaryDirectory(prefix=".type-head.", dir=model_dir) as tmp:
        model.save_pretrained(tmp)
        written = sorted(Path(tmp).iterdir(), key=lambda path: path.name == "config.json")  # config.json last
        for path in written:
            path.chmod(0o644)
            os.replace(path, model_dir / path.name)
    return accuracy


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specpt templates",
        description="Rest-frame templates for a redshift model (see specpt_hf.templates).",
    )
    parser.add_argument("data_dir", type=Path, help="prepared dataset (Parquet shards under train/)")
    parser.add_argument("--model", required=True, type=Path, help="SpecPTForRedshift folder to add them to")
    parser.add_argument("--split", default="train", help="split to learn from (default: train)")
    parser.add_argument("--galaxy-vectors", type=int, default=10, help="GALAXY basis size (default 10)")
    parser.add_argument("--qso-vectors", type=int, default=6, help="QSO basis size (default 6)")
    parser.add_argument("--star-vectors", type=int, default=5, help="STAR basis size (default 5)")
    parser.add_argument("--max-per-type", type=int, default=3000, help="spectra per type (default 3000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random draw of spectra")
    parser.add_argument(
        "--no-type-head", action="store_true", help="do not fit the spectral-type head on the same spectra"
    )
    add_debug_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for name in ("galaxy_vectors", "qso_vectors", "star_vectors", "max_per_type"):
        if getattr(args, name) < 1:
            _parser().error(f"--{name.replace('_', '-')} must be >= 1")
    if not (args.model / "config.json").is_file():
        _parser().error(f"--model {args.model}: no config.json (not a model folder)")
    return run_reporting_errors("templates", lambda: _run(args), args.debug)


def _run(args: argparse.Namespace) -> int:
    vectors = {"GALAXY": args.galaxy_vectors, "QSO": args.qso_vectors, "STAR": args.star_vectors}
    templates = build_model_templates(
        args.model, args.data_dir, vectors, args.max_per_type, args.split, args.seed, not args.no_type_head
    )
    described = describe_templates(templates, TEMPLATES_NAME)["spectypes"]
    for name, info in described.items():
        print(
            f"{name}: {info['num_vectors']} vectors, rest {info['rest_wavelength_min']:.0f}-"
            f"{info['rest_wavelength_max']:.0f} A"
        )
    print(f"wrote {args.model / TEMPLATES_NAME} and described it in {args.model / 'config.json'}")
    labels = SpecPTForRedshiftConfig.from_pretrained(args.model).spectype_labels
    if labels and not args.no_type_head:
        print(f"fitted the spectral-type head over {labels} (model.safetensors)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
