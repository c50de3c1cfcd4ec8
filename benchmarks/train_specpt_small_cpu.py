"""The 3-hour, 2-core CPU training recipe for `specpt-small`, resumable: mock data, prepare, stage 1, stage 2.

    python benchmarks/train_specpt_small_cpu.py --work runs/specpt-small-cpu            # the full run
    python benchmarks/train_specpt_small_cpu.py --work runs/specpt-small-cpu --dry-run  # print the plan only
    python benchmarks/train_specpt_small_cpu.py --work /tmp/t --quick                   # minutes: smoke test
    python benchmarks/train_specpt_small_cpu.py --work runs/control --augment-probability 0   # stage 2 unaugmented
    python benchmarks/train_specpt_small_cpu.py --work runs/clean-end --augment-until 0.7      # last 30 % unaugmented
    python benchmarks/train_specpt_small_cpu.py --work runs/all-labels --no-quality-cuts       # faint spectra too
    python benchmarks/train_specpt_small_cpu.py --work runs/sps --sps-fraction 0.4   # 40 % of galaxies from `sps`
    python benchmarks/train_specpt_small_cpu.py --work runs/sps-extra --sps-extra 0.4  # 40 % more, from `sps`
    python benchmarks/train_specpt_small_cpu.py --work runs/seed7 --train-seed 7      # stage 2 with another seed
    nohup python benchmarks/train_specpt_small_cpu.py --work runs/specpt-small-cpu > train.log 2>&1 &

Give it the machine: with other CPU work on the same 2 cores, torch's two OpenMP threads wait on each other and a
step takes 3.6-10 s instead of ~0.3-0.45 s (measured); on shared cores set OMP_NUM_THREADS=1 (~1 s/step there).
Other work can share the cores if it runs under `nice -n 19`, one process at a time (measured 2026-12-05:
stage 1 at 2.35 steps/s alone, 2.0-2.3 beside one such process, 0.25 beside four).

The control run for robustness.py (`--augment-probability 0`: stage 2 without the augmentations), or one with
another probability, with the augmentations in the first part of stage 2 only (`--augment-until`) or with another
stage-2 seed (`--train-seed`, the spread between runs), can share an augmented run's data and stage 1: hard-link them into its --work first
(`cp -al RUN/data RUN/autoencoder RUN/.chunk* W/`).

Run the same command again after an interruption: finished steps are skipped (marker files in --work),
an interrupted mock chunk is redone, and an interrupted training stage continues from its newest checkpoint
(`specpt train --resume`). The model to benchmark is `{work}/redshift/best` (best validation NMAD).

Steps and wall-clock plan (`--hours 3` on 2 cores; printed at the start, rates are flags):

1. data: `--n-per-class` mock spectra per class (BGS, LRG, ELG, QSO) from training seed 1 (file seeds
   SeedSequence([1, chunk, class, file]); the benchmarks' test sets use 101 and 202) on healpix 10000-14999
   (the test sets use 30000+ and 40000+), generated and prepared
   (`prepare_dataset`, DESI quality cuts unless `--no-quality-cuts`, TARGETID-hash splits 80/10/10) a chunk
   at a time, the coadd
   files deleted after each chunk (a coadd holds ~0.43 MB per spectrum, the Parquet rows ~0.07 MB);
   ~100 spectra/s to generate on one core.
2. stage 1, autoencoder: `examples/configs/specpt-small-autoencoder.yaml` (bf16 autocast, batch 32,
   lr 5e-4 cosine), `--max-steps` from its share of the remaining time at --ae-rate spectra/s.
3. stage 2, redshift: `examples/configs/specpt-small-redshift.yaml` on the stage-1 model (encoder
   fine-tuned at the head's rate), validation every 1000 steps on 1000 spectra, early stopping after 6;
4. templates: GALAXY and QSO rest-frame bases from the training split added to the model folder, and the
   spectral-type head fitted on the same spectra (`specpt_hf.templates.build_model_templates`, ~3 min for
   `--template-spectra` 3000 per type; 9000 take ~5 min and 7 GB), so the benchmarks refine its redshifts.

The stage shares (25 % / 75 % of what the data step leaves, minus 5 % for validation and checkpoints: the
redshift head gains more from steps than the autoencoder) and rates (100 / 105 spectra/s: specpt-small, bf16,
batch 32, this 2-core machine, from the training progress bars) set the step counts; measure the rates on another machine and pass them. On a CPU without AVX512-BF16 / AMX
training runs float32 (`specpt train` falls back by itself; `--no-bf16` asks for it anywhere): pass lower rates.

A GPU run that aims at the published floors (BGS NMAD ≤ 0.0006, η ≤ 0.2 %; ELG NMAD ≤ 0.0008, η ≤ 0.8 %)
needs what the CPU budget cannot buy: data on the paper's scale (~0.5 M spectra: `--n-per-class 125000`,
~1.4 core-hours of mock generation per 0.5 M, run chunks in parallel with `--jobs`), a bigger model
(`--preset specpt-base`: 487 tokens, 8 layers of width 512; ~26 GFLOP per spectrum), and many more steps
(e.g. 50k steps of batch 128 per stage, bf16):

    python benchmarks/train_specpt_small_cpu.py --work runs/specpt-base-gpu --preset specpt-base \
        --n-per-class 125000 --jobs 8 --ae-steps 50000 --rs-steps 50000 --batch-size 128 \
        --accelerate-config examples/accelerate/multi-gpu.yaml
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specpt_hf.data.redshifts import QualityCuts

REPO = Path(__file__).resolve().parents[1]
TRAIN_SEED = 1  # never 101 (accuracy test set) or 202 (speed inputs)
CLASSES = ("bgs", "lrg", "elg", "qso")
CHUNK_PER_CLASS = 2500  # spectra per class per chunk: ~4.3 GB of coadds on disk at a time
STEPS = ("data", "autoencoder", "redshift", "templates")


@dataclass(frozen=True)
class Plan:
    """Step counts and the expected minutes of each step."""

    n_per_class: int
    n_spectra: int
    chunks: int
    data_minutes: float
    ae_steps: int
    ae_minutes: float
    rs_steps: int
    rs_minutes: float

    def table(self) -> str:
        total = self.data_minutes + self.ae_minutes + self.rs_minutes
        return "\n".join(
            [
                f"{'step':<34} {'size':>22} {'minutes':>8}",
                f"{'1 mock + prepare':<34} {f'{self.n_spectra} spectra, {self.chunks} chunks':>22} "
                f"{self.data_minutes:>8.0f}",
                f"{'2 stage 1 (autoencoder)':<34} {f'{self.ae_steps} steps':>22} {self.ae_minutes:>8.0f}",
                f"{'3 stage 2 (redshift)':<34} {f'{self.rs_steps} steps':>22} {self.rs_minutes:>8.0f}",
                f"{'total (+5 % validation, I/O)':<34} {'':>22} {total / 0.95:>8.0f}",
            ]
        )


def make_plan(args: argparse.Namespace) -> Plan:
    """Step counts that fit `args.hours` at the given rates (explicit --ae-steps / --rs-steps win)."""
    from specpt_hf.data.mock.populations import SPS_CLASSES

    n_total = round((len(CLASSES) + len(SPS_CLASSES) * args.sps_extra) * args.n_per_class)
    data_minutes = n_total / args.mock_rate / max(args.jobs, 1) / 60 + n_total / args.prepare_rate / 60
    left = max(args.hours * 60 * 0.95 - data_minutes, 0.0)
    ae_steps = args.ae_steps or max(1, int(0.25 * left * 60 * args.ae_rate / args.batch_size))
    rs_steps = args.rs_steps or max(1, int(0.75 * left * 60 * args.rs_rate / args.batch_size))
    return Plan(
        n_per_class=args.n_per_class,
        n_spectra=n_total,
        chunks=math.ceil(args.n_per_class / args.chunk_per_class),
        data_minutes=data_minutes,
        ae_steps=ae_steps,
        ae_minutes=ae_steps * args.batch_size / args.ae_rate / 60,
        rs_steps=rs_steps,
        rs_minutes=rs_steps * args.batch_size / args.rs_rate / 60,
    )


def _mock_file(job: tuple[str, int, int, int, str, str]) -> None:
    """One mock healpix file (runs in a worker process)."""
    from specpt_hf.data.mock import write_mock_healpix

    target_class, count, seed, healpix, out, family = job
    write_mock_healpix(out, target_class, count, seed, healpix=healpix, family=family)


def make_chunk(
    work: Path,
    chunk: int,
    per_class: int,
    jobs: int,
    progress: bool,
    cuts: QualityCuts,
    sps_fraction: float = 0.0,
    sps_extra: float = 0.0,
) -> None:
    """Generate one chunk of mock files (the first `sps_fraction` of each sps class's files in the `sps` family,
    and `sps_extra` × `per_class` more spectra of each sps class in it after them), prepare it with `cuts`, move its
    shards into {work}/data, delete the files."""
    import numpy as np

    from specpt_hf.data.mock.populations import SPS_CLASSES
    from specpt_hf.data.prepare import prepare_dataset

    mock, prep = work / f"mock-chunk{chunk:03d}", work / f"prep-chunk{chunk:03d}"
    shutil.rmtree(mock, ignore_errors=True)
    spf = 500
    file_jobs = []
    for c, name in enumerate(CLASSES):
        sps = name in SPS_CLASSES
        n_sps = round(sps_fraction * math.ceil(per_class / spf)) if sps else 0
        extra = round(sps_extra * per_class) if sps else 0
        files = [
            (min(spf, per_class - start), "sps" if k < n_sps else "basis")
            for k, start in enumerate(range(0, per_class, spf))
        ] + [(min(spf, extra - start), "sps") for start in range(0, extra, spf)]
        for k, (count, family) in enumerate(files):
            healpix = 10000 + chunk * 100 + c * 25 + k
            seed = int(np.random.SeedSequence([TRAIN_SEED, chunk, c, k]).generate_state(1)[0])
            file_jobs.append((name, count, seed, healpix, str(mock), family))
    if jobs == 1:
        for job in file_jobs:
            _mock_file(job)
    else:  # spawn: forking a process that runs torch threads can deadlock
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_mock_file, file_jobs))
    prepare_dataset([mock], prep, cuts=cuts, overwrite=True, progress=progress)
    for split_dir in prep.iterdir():
        if split_dir.is_dir():
            target = work / "data" / split_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for shard in split_dir.glob("*.parquet"):
                os.replace(shard, target / f"chunk{chunk:03d}-{shard.name}")
    shutil.rmtree(mock)
    shutil.rmtree(prep)


def train_command(args: argparse.Namespace, stage: str, steps: int, work: Path) -> list[str]:
    """`specpt train` for one stage, through `accelerate launch` when a config is given."""
    preset = args.preset
    config = (
        REPO
        / "examples"
        / "configs"
        / f"{preset}-{'autoencoder' if stage == 'autoencoder' else 'redshift'}.yaml"
    )
    if args.accelerate_config:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            args.accelerate_config,
            "-m",
            "specpt_hf.cli",
            "train",
        ]
    else:
        cmd = [sys.executable, "-m", "specpt_hf.cli", "train"]
    cmd += [
        "--config",
        str(config),
        "--data-dir",
        str(work / "data"),
        "--output-dir",
        str(work / stage),
        "--max-steps",
        str(steps),
        "--batch-size",
        str(args.batch_size),
        "--resume",
        "--report-to",
        "none",
    ]
    if args.no_bf16:
        cmd += ["--mixed-precision", "no"]
    if stage == "redshift":
        cmd += [
            "--pretrained-model",
            str(work / "autoencoder" / "model"),
            "--eval-steps",
            str(args.eval_steps),
            "--max-val-spectra",
            str(args.max_val_spectra),
            "--checkpointing-steps",
            str(args.eval_steps),
        ]
    else:
        cmd += ["--eval-steps", str(args.eval_steps), "--max-val-spectra", str(args.max_val_spectra)]
    if args.warmup_steps is not None:
        cmd += ["--warmup-steps", str(args.warmup_steps)]
    if args.augment_probability is not None and stage == "redshift":
        cmd += ["--augment-probability", f"{args.augment_probability:g}"]
    if args.train_seed is not None and stage == "redshift":
        cmd += ["--seed", str(args.train_seed)]
    if args.augment_until is not None and stage == "redshift":
        cmd += ["--augment-until-step", str(max(1, round(args.augment_until * steps)))]
    return cmd


def run_stage(args: argparse.Namespace, stage: str, steps: int, work: Path) -> None:
    """Run one training stage unless its final model is there; stream its output."""
    done = work / stage / "model" / "config.json"
    if done.is_file():
        print(f"[skip] {stage}: {done.parent} exists", flush=True)
        return
    cmd = train_command(args, stage, steps, work)
    print(f"[run] {stage}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    print(f"[done] {stage} in {(time.perf_counter() - start) / 60:.1f} min", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, required=True, help="working folder (data, runs, markers)")
    parser.add_argument(
        "--preset", default="specpt-small", choices=("specpt-tiny", "specpt-small", "specpt-base")
    )
    parser.add_argument("--hours", type=float, default=3.0, help="wall-clock budget of the whole recipe")
    parser.add_argument("--n-per-class", type=int, default=12500, help="training mock spectra per class")
    parser.add_argument(
        "--chunk-per-class", type=int, default=CHUNK_PER_CLASS, help="spectra per class per chunk"
    )
    parser.add_argument("--jobs", type=int, default=1, help="processes generating mock files")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ae-steps", type=int, help="stage-1 steps (default: from the plan)")
    parser.add_argument("--rs-steps", type=int, help="stage-2 steps (default: from the plan)")
    parser.add_argument("--warmup-steps", type=int, help="override the configs' warm-up steps")
    parser.add_argument(
        "--eval-steps", type=int, default=1000, help="validate (and checkpoint) every N steps"
    )
    parser.add_argument("--max-val-spectra", type=int, default=1000, help="validation spectra per check")
    parser.add_argument("--ae-rate", type=float, default=100.0, help="stage-1 training spectra/s (plan)")
    parser.add_argument("--rs-rate", type=float, default=105.0, help="stage-2 training spectra/s (plan)")
    parser.add_argument("--mock-rate", type=float, default=100.0, help="mock spectra/s per process (plan)")
    parser.add_argument("--prepare-rate", type=float, default=400.0, help="prepare spectra/s (plan)")
    parser.add_argument("--no-bf16", action="store_true", help="float32 (CPUs without native bf16)")
    parser.add_argument(
        "--no-quality-cuts",
        action="store_true",
        help="keep every mock spectrum in the shards, also those below DESI's confident-redshift cuts "
        "(their labels are the mock's truth)",
    )
    parser.add_argument(
        "--sps-fraction",
        type=float,
        default=0.0,
        help="share of the BGS, LRG and ELG mock files written in the `sps` family (E-MILES populations, "
        "BPT lines; needs `pip install specpt-hf[sps]`); the rest and all QSOs in the default family",
    )
    parser.add_argument(
        "--sps-extra",
        type=float,
        default=0.0,
        help="`sps`-family BGS, LRG and ELG spectra added on top of the basis ones, as a share of --n-per-class",
    )
    parser.add_argument(
        "--augment-probability",
        type=float,
        help="stage 2's probability of each training augmentation (default: the config's; 0: the control run)",
    )
    parser.add_argument(
        "--augment-until",
        type=float,
        help="augment only this fraction of stage 2's steps, the first ones (default: all of them)",
    )
    parser.add_argument(
        "--template-spectra",
        type=int,
        default=3000,
        help="training spectra per spectral type for the templates and the type head (default 3000)",
    )
    parser.add_argument(
        "--train-seed",
        type=int,
        help="stage 2's seed (weights of the head, data order, dropout; default: the config's): a second seed on "
        "the same data and stage 1 measures the spread between training runs",
    )
    parser.add_argument(
        "--accelerate-config", help="launch training through `accelerate launch` with this file"
    )
    parser.add_argument(
        "--steps", nargs="+", choices=STEPS, default=list(STEPS), help="steps to run (default: all)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the commands, run nothing")
    parser.add_argument("--quick", action="store_true", help="specpt-tiny, 40 spectra per class, a few steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.n_per_class, args.chunk_per_class = "specpt-tiny", 40, 40
        args.ae_steps, args.rs_steps, args.batch_size, args.eval_steps = 3, 4, 8, 2
        args.max_val_spectra, args.warmup_steps = 16, 1
    counts = ("n_per_class", "chunk_per_class", "jobs", "batch_size", "eval_steps", "max_val_spectra")
    for name in (*counts, "template_spectra"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.augment_until is not None and not 0 < args.augment_until <= 1:
        parser.error(f"--augment-until is a fraction of stage 2's steps in (0, 1], got {args.augment_until}")
    if not 0 <= args.sps_fraction <= 1:
        parser.error(f"--sps-fraction is a share in [0, 1], got {args.sps_fraction}")
    if args.sps_extra < 0:
        parser.error(f"--sps-extra is a share >= 0, got {args.sps_extra}")
    if args.hours <= 0:
        parser.error("--hours must be positive")
    if (
        math.ceil(args.chunk_per_class / 500) + math.ceil(args.chunk_per_class * args.sps_extra / 500) > 25
        or math.ceil(args.n_per_class / args.chunk_per_class) > 50
    ):
        parser.error("at most 12500 spectra per class per chunk and 50 chunks (healpix 10000-14999)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Print the plan, then run the steps that are not done yet."""
    args = parse_args(argv)
    plan = make_plan(args)
    print(
        f"{args.preset} on {os.cpu_count()} cores, budget {args.hours:g} h, work folder {args.work}\n{plan.table()}\n",
        flush=True,
    )
    if args.dry_run:
        for stage, steps in (("autoencoder", plan.ae_steps), ("redshift", plan.rs_steps)):
            print(" ".join(train_command(args, stage, steps, args.work)))
        return 0
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    from specpt_hf.data.redshifts import QualityCuts

    start = time.perf_counter()
    cuts = QualityCuts(enabled=not args.no_quality_cuts)
    for chunk in range(plan.chunks) if "data" in args.steps else []:
        marker = work / f".chunk{chunk:03d}.done"
        if marker.is_file():
            continue
        per_class = min(args.chunk_per_class, args.n_per_class - chunk * args.chunk_per_class)
        print(f"[run] data chunk {chunk + 1}/{plan.chunks}: {per_class} spectra per class", flush=True)
        make_chunk(work, chunk, per_class, args.jobs, not args.quick, cuts, args.sps_fraction, args.sps_extra)
        marker.touch()
    if "data" in args.steps and not (work / "data" / "README.md").is_file():
        from specpt_hf.data.prepare import write_shards_card

        write_shards_card(work / "data", "+".join(CLASSES), cuts=cuts)  # last: the folder is complete
    print(f"[done] data in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    try:
        for stage, steps in (("autoencoder", plan.ae_steps), ("redshift", plan.rs_steps)):
            if stage in args.steps:
                run_stage(args, stage, steps, work)
    except subprocess.CalledProcessError as err:
        print(f"error: {err}; run the same command again to resume", file=sys.stderr)
        return 1
    best = work / "redshift" / "best"
    model = best if best.is_dir() else work / "redshift" / "model"
    if "templates" in args.steps and (model / "config.json").is_file():
        from specpt_hf.modeling_specpt import TEMPLATES_NAME
        from specpt_hf.templates import build_model_templates

        if not (model / TEMPLATES_NAME).is_file():
            print(
                f"[run] templates: GALAXY and QSO rest-frame bases from up to {args.template_spectra} spectra "
                f"per type of {work / 'data'}",
                flush=True,
            )
            build_model_templates(model, work / "data", max_per_type=args.template_spectra)
    if "redshift" not in args.steps:
        return 0
    print(
        f"total {(time.perf_counter() - start) / 60:.1f} min; model: {model}\n"
        f"benchmark it: python benchmarks/accuracy.py --model {model} --out runs/benchmarks/accuracy"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
