"""Release recipe of `specpt-desi`: DESI EDR spectra -> Parquet -> autoencoder -> redshift model -> card -> Hub.

On a machine with network and GPUs (the Hub token in HF_TOKEN):

    # first release: BGS and ELG
    python examples/release.py --out release --raw-dir edr --catalog zall-pix-edr.fits --classes bgs elg
    # then LRG and QSO join: only their files are downloaded; a new --out redoes everything after that
    python examples/release.py --out release-v2 --raw-dir edr --catalog zall-pix-edr.fits \
        --classes bgs elg lrg qso

    # data in one process, training on 8 GPUs, then evaluation and push
    python examples/release.py --out release --catalog zall-pix-edr.fits --stop-after prepare
    accelerate launch --config_file examples/accelerate/multi-gpu.yaml examples/release.py --out release \
        --catalog zall-pix-edr.fits --stop-after redshift
    python examples/release.py --out release --catalog zall-pix-edr.fits

    # a local rehearsal: a mock release instead of the download, the tiny preset, a few steps, a local Hub
    python examples/release.py --out /tmp/rel --mock 200 --preset specpt-tiny --autoencoder-steps 20 \
        --redshift-steps 20 --repo-id me/specpt-test --hub-endpoint http://127.0.0.1:8080

Steps, each skipped when its output exists (so a stopped run continues where it stopped):

1. data: download the coadd + redrock files of every healpix holding a good target of `--classes`, from a
   redshift catalog (`--catalog`) or a list (`--healpix sv3/dark/26065 ...`), with `specpt_hf.data.download`
   (files already present are not fetched again); or write a mock release (`--mock N` spectra per class);
2. prepare: one Parquet set per class (`specpt_hf.data.prepare.prepare_dataset`, DESI good-redshift cuts,
   TARGETID-hash splits), joined into `{out}/data/train-set/{split}/`;
3. pretrain the autoencoder, 4. train the redshift model (`specpt_hf.training`, settings from
   `examples/configs/{preset}-{stage}.yaml`, `--resume` from the newest checkpoint);
5. rest-frame templates for the redshift model's chi^2 refinement, from the training split
   (`specpt_hf.templates`: GALAXY and QSO bases in `templates.safetensors`, described in its config.json);
   then evaluate on the test split (`specpt_hf.evaluation.evaluate_model`);
6. write both repo folders with their model cards (`specpt_hf.hub.write_repo_folder`);
7. push them (`specpt_hf.hub.push_to_hub`): `{repo_id}-autoencoder`, then `{repo_id}`. A push whose folder is
   unchanged since the last successful push of this run is skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import PartialState
from astropy.table import Table

from specpt_hf.data.builder import SPLITS
from specpt_hf.data.download import (
    DownloadReport,
    download_from_catalog,
    download_healpix,
    good_target_cut,
    parse_healpix_spec,
)
from specpt_hf.data.mock import write_mock_release
from specpt_hf.data.prepare import prepare_dataset, write_shards_card
from specpt_hf.data.redshifts import EXTRAGALACTIC_CLASSES, target_class_of
from specpt_hf.evaluation.evaluate_model import evaluate_model
from specpt_hf.hub import push_to_hub, write_repo_folder
from specpt_hf.loading import SHORT_NAMES
from specpt_hf.modeling_specpt import TEMPLATES_NAME
from specpt_hf.templates import build_model_templates
from specpt_hf.training.settings import TrainingSettings
from specpt_hf.training.train import training_function

CONFIGS = Path(__file__).resolve().parent / "configs"
STEPS = ("data", "prepare", "autoencoder", "redshift", "templates", "evaluate", "card", "push")


def step(name: str, done: bool, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run one step of the recipe unless its output exists; print what happens and how long it took."""
    if done:
        print(f"== {name}: done before, skipped", flush=True)
        return None
    print(f"== {name}", flush=True)
    start = time.perf_counter()
    result = function(*args, **kwargs)
    print(f"== {name}: {time.perf_counter() - start:.1f} s", flush=True)
    return result


# --------------------------------------------------------------------------------------------- 1. data


def class_cut(classes: tuple[str, ...]) -> Callable[[Table], np.ndarray]:
    """Catalog rows that pass DESI's minimal good-target cut and belong to one of `classes`."""

    def cut(table: Table) -> np.ndarray:
        columns = {name: np.asarray(table[name]) for name in table.colnames}
        survey = np.char.lower(np.char.strip(np.asarray(table["SURVEY"]).astype(str)))
        return good_target_cut(table) & np.isin(target_class_of(columns, survey), classes)

    return cut


def download_edr(args: argparse.Namespace, raw: Path) -> DownloadReport:
    """Download the files of the wanted classes, one class after the other (BGS first)."""
    options = {"base_url": args.base_url, "workers": args.workers}
    if args.healpix:
        report = download_healpix([parse_healpix_spec(spec) for spec in args.healpix], raw, **options)
    else:
        report = DownloadReport()
        for target_class in args.classes:
            print(f"   {target_class}: healpix of {args.catalog}", flush=True)
            part = download_from_catalog(args.catalog, raw, cut=class_cut((target_class,)), **options)
            report.downloaded += part.downloaded
            report.skipped += part.skipped
            report.missing += part.missing
            report.failed.update(part.failed)
            report.n_bytes += part.n_bytes
    print(f"   {report.summary()}", flush=True)
    if report.missing:
        raise OSError(f"{len(report.missing)} file(s) not found on the server, e.g. {report.missing[0]}")
    if report.failed:
        raise OSError(f"{len(report.failed)} file(s) failed to download; run the recipe again to retry them")
    return report


def get_data(args: argparse.Namespace, raw: Path) -> None:
    if args.mock:
        counts = dict.fromkeys(args.classes, args.mock)
        write_mock_release(raw, counts, args.seed, progress=False)
        (raw / "MOCK_DONE").write_text(json.dumps(counts) + "\n", encoding="utf-8")
    else:
        download_edr(args, raw)


# --------------------------------------------------------------------------------------------- 2. prepare


def prepare_classes(raw: Path, data: Path, classes: tuple[str, ...]) -> Path:
    """A Parquet set per class (each resumable on its own), then their shards linked into one training set."""
    for target_class in classes:
        out = data / "by-class" / target_class
        if not (out / "README.md").exists():
            print(f"   {target_class}", flush=True)
            prepare_dataset([raw], out, target_class=target_class, overwrite=True, progress=False)
    train_set = data / "train-set"
    tmp = data / ".train-set.tmp"
    if tmp.exists():
        for path in sorted(tmp.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        tmp.rmdir()
    for split in SPLITS:
        (tmp / split).mkdir(parents=True)
        for target_class in classes:
            for shard in sorted((data / "by-class" / target_class / split).glob("*.parquet")):
                os.link(shard, tmp / split / f"{target_class}-{shard.name}")
    write_shards_card(tmp, "+".join(classes))  # last: a folder with its card is complete
    os.replace(tmp, train_set)
    return train_set


# --------------------------------------------------------------------------------------------- 3-4. training


def train_stage(
    args: argparse.Namespace, stage: str, data: Path, runs: Path, pretrained: Path | None
) -> None:
    """Train one stage from the preset's settings file (checkpoints every `--eval-steps`, resumed if present)."""
    overrides: dict[str, Any] = {
        "data_dir": str(data),
        "output_dir": str(runs / stage),
        "resume": (runs / stage / "checkpoints").exists(),
        "pretrained_model": str(pretrained) if pretrained else None,
    }
    steps = args.autoencoder_steps if stage == "autoencoder" else args.redshift_steps
    if steps:
        overrides["max_steps"] = steps
    if args.eval_steps:
        overrides.update(eval_steps=args.eval_steps, checkpointing_steps=args.eval_steps)
    settings = TrainingSettings.from_yaml(CONFIGS / f"{args.preset}-{stage}.yaml", **overrides)
    training_function(settings)


# --------------------------------------------------------------------------------------------- 5. evaluate


def evaluate(args: argparse.Namespace, redshift: Path, autoencoder: Path, data: Path, out: Path) -> Path:
    """Metrics on the test split; results.json names the data set the way the model card shows it."""
    if args.mock:
        name, kind = f"DESI-like mock ({', '.join(c.upper() for c in args.classes)})", "specpt-mock"
    else:
        name, kind = f"DESI EDR ({', '.join(c.upper() for c in args.classes)}, good redshifts)", "desi-edr"
    evaluate_model(
        redshift,
        data,
        out,
        "test",
        autoencoder,
        dataset_name=name,
        dataset_type=kind,
        model_name=args.repo_id.split("/")[-1],
    )
    return out / "results.json"


# --------------------------------------------------------------------------------------------- 6-7. card, push


def folder_digest(folder: Path) -> str:
    """sha256 over the names and contents of the files of a repo folder."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def push(args: argparse.Namespace, folder: Path, repo_id: str) -> None:
    """Upload `folder` unless this exact folder was pushed to `repo_id` before; remember the push."""
    marker = folder.with_name(f"{folder.name}.pushed.json")
    digest = folder_digest(folder)
    if marker.exists():
        previous = json.loads(marker.read_text(encoding="utf-8"))
        if previous.get("digest") == digest and previous.get("repo_id") == repo_id:
            print(f"   {repo_id}: unchanged since {previous['commit_url']}, skipped", flush=True)
            return
    info = push_to_hub(
        folder,
        repo_id,
        private=args.private,
        commit_message=f"SpecPT release ({args.preset}, {'+'.join(args.classes)})",
        endpoint=args.hub_endpoint,
    )
    record = {"repo_id": repo_id, "digest": digest, "commit_url": info.commit_url}
    tmp = marker.with_name(f".{marker.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, marker)
    print(f"   {repo_id}: {info.commit_url}", flush=True)


# --------------------------------------------------------------------------------------------- the recipe


def run(args: argparse.Namespace) -> int:
    """Every step of the recipe up to `--stop-after`; data, evaluation and the Hub only on the main process."""
    state = PartialState()
    out = args.out
    raw, data, runs = args.raw_dir or out / "data" / "raw", out / "data", out / "runs"
    autoencoder, redshift = runs / "autoencoder" / "model", runs / "redshift" / "best"
    evaluation, hub = out / "evaluation", out / "hub"
    last = STEPS.index(args.stop_after)
    names = {"autoencoder": f"{args.repo_id}-autoencoder", "redshift": args.repo_id}
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        step("data", args.mock is not None and (raw / "MOCK_DONE").exists(), get_data, args, raw)
        if last >= STEPS.index("prepare"):
            step("prepare", (data / "train-set").is_dir(), prepare_classes, raw, data, tuple(args.classes))
    state.wait_for_everyone()
    if last >= STEPS.index("autoencoder"):
        done = (autoencoder / "config.json").exists()
        step("pretrain autoencoder", done, train_stage, args, "autoencoder", data / "train-set", runs, None)
    if last >= STEPS.index("redshift"):
        done = (redshift / "config.json").exists()
        step(
            "train redshift model", done, train_stage, args, "redshift", data / "train-set", runs, autoencoder
        )
    if not state.is_main_process or last < STEPS.index("templates"):
        return 0
    done = (redshift / TEMPLATES_NAME).exists()
    step("templates", done, build_model_templates, redshift, data / "train-set")
    if last < STEPS.index("evaluate"):
        return 0
    results = evaluation / "results.json"
    done = results.exists()
    step("evaluate", done, evaluate, args, redshift, autoencoder, data / "train-set", evaluation)
    if last >= STEPS.index("card"):
        print("== model cards", flush=True)
        write_repo_folder(autoencoder, hub / "autoencoder", repo_id=names["autoencoder"], overwrite=True)
        write_repo_folder(
            redshift,
            hub / "redshift",
            results,
            repo_id=names["redshift"],
            base_model=names["autoencoder"],
            overwrite=True,
        )
        print(f"   {hub / 'autoencoder'}\n   {hub / 'redshift'}", flush=True)
    if last >= STEPS.index("push") and not args.dry_run:
        print("== push", flush=True)
        for stage in ("autoencoder", "redshift"):
            push(args, hub / stage, names[stage])
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="working folder (data, runs, evaluation, hub)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--catalog", type=Path, help="EDR redshift catalog (e.g. zall-pix-edr.fits)")
    source.add_argument("--healpix", nargs="+", metavar="SURVEY/PROGRAM/HPX", help="healpix to download")
    source.add_argument(
        "--mock", type=int, metavar="N", help="no download: a mock release, N spectra per class"
    )
    parser.add_argument("--raw-dir", type=Path, help="where the DESI files go (default: {out}/data/raw)")
    parser.add_argument("--base-url", help="EDR release root to download from (default: the public EDR)")
    parser.add_argument("--workers", type=int, default=4, help="concurrent downloads")
    parser.add_argument("--classes", nargs="+", default=["bgs", "elg"], choices=EXTRAGALACTIC_CLASSES)
    parser.add_argument(
        "--preset", default="specpt-base", help="preset with settings files in examples/configs/"
    )
    parser.add_argument(
        "--autoencoder-steps", type=int, help="optimizer steps of stage 1 (default: settings)"
    )
    parser.add_argument("--redshift-steps", type=int, help="optimizer steps of stage 2 (default: settings)")
    parser.add_argument(
        "--eval-steps", type=int, help="validate and checkpoint every N steps (default: settings)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the mock release")
    parser.add_argument(
        "--repo-id", default=SHORT_NAMES["specpt-desi"], help="Hub repo of the redshift model"
    )
    parser.add_argument("--hub-endpoint", help="Hub URL (default: HF_ENDPOINT or the public Hub)")
    parser.add_argument("--private", action="store_true", help="create the repos as private")
    parser.add_argument("--dry-run", action="store_true", help="write the repo folders, push nothing")
    parser.add_argument("--stop-after", choices=STEPS, default="push", help="last step to run")
    args = parser.parse_args(argv)
    if args.mock is not None and args.mock < 1:
        parser.error("--mock needs N >= 1")
    if not (CONFIGS / f"{args.preset}-autoencoder.yaml").is_file():
        parser.error(f"no settings files for preset {args.preset!r} in {CONFIGS}")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
