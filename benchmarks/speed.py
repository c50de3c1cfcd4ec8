"""Inference speed, memory, scale and size: SpecPT presets against Redrock on the same DESI coadd files.

    python benchmarks/speed.py --out runs/benchmarks/speed                  # CPU: tiny, small vs Redrock
    python benchmarks/speed.py --out runs/benchmarks/speed --max-scale 10000   # cap the scaling run
    python benchmarks/speed.py --out /tmp/speed --quick                        # seconds: a CI smoke test
    python benchmarks/speed.py --out runs/benchmarks/attention --presets specpt-small --attention eager sdpa \
        --redrock-per-file 0 --scales                                         # inference: eager vs sdpa
    python benchmarks/speed.py --out runs/benchmarks/speed-gpu --device cuda --presets specpt-small specpt-base
    python benchmarks/speed.py --out runs/benchmarks/speed-refined --presets specpt-small --model M --bf16 \
        --scales                                 # a trained model with its templates, fp32 and bf16 network

What is measured (all on mock DESI coadd files written first, 4 classes x --n-per-class spectra):

* throughput, coadd files to catalog with `specpt predict` (`predict_catalog`: read + merge the arms on a
  reader thread, predict, write the FITS catalog), in spectra/s and spectra per CPU-second (user + system
  time of all threads). Per preset, with 1 torch thread ("per core") and with all cores. The weights are
  freshly initialised (speed does not depend on their values) unless --model is given (with its templates,
  its template refinement runs too). --bf16 adds a run of each with the network under bfloat16 autocast
  (`specpt predict --bf16`; fast on CPUs with AMX / AVX512-BF16).
* Redrock (`rrdesi`, one process: one core) on the first --redrock-per-file fibres of the same files, in
  the same run; its CPU-core-seconds per spectrum end to end and for the fit alone (the "Computing
  redshifts" time in its log, without start-up and template rebinning). The ratio per core is spectra
  per CPU-second, SpecPT's 1-thread run over Redrock's, both ways.
* scaling: wall time and peak resident memory (getrusage in a fresh process per size) of the same
  pipeline at 1k, 10k, 100k spectra (the files repeated as hard links), for --scale-preset.
* size: parameters and MB (float32) of each preset's autoencoder and redshift model (meta device), and
  FLOPs per spectrum of the redshift model (torch.utils.flop_counter, one spectrum, the paper layout too).
* --device cuda: bf16 autocast, a batch-size sweep of the model alone on GPU-resident spectra, the end to
  end rate at the best batch size, and the rate of only reading the files (spectra/s and MB/s).
"""

from __future__ import annotations

import argparse
import importlib
import math
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import suppress
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from redrock_templates import QUICK_SETTINGS, build_templates  # noqa: E402
from run_redrock import QUICK_ZSCAN, RedrockError, log_path, redrock_missing, run_redrock  # noqa: E402

from specpt_hf.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from specpt_hf.data.redshifts import EXTRAGALACTIC_CLASSES as CLASSES  # noqa: E402

SPEED_SEED = 202  # mock seed of the speed inputs (training recipes use 0 and 1)
SPEED_HEALPIX = 40000
CPU_PRESETS = ("specpt-tiny", "specpt-small")
ALL_PRESETS = ("specpt-tiny", "specpt-small", "specpt-base", "specpt-paper")
FLOOR_RATIO_PER_CORE = 100.0  # specpt-small vs Redrock, spectra per CPU core
GPU_BATCHES = (64, 256, 1024, 4096)


# ------------------------------------------------------------------------------------------- inputs


def make_inputs(folder: Path, n_per_class: int, seed: int = SPEED_SEED) -> list[Path]:
    """One mock coadd per class (n_per_class targets each) under `folder`, reused when already there."""
    from specpt_hf.data.mock import write_mock_healpix

    files = []
    for k, name in enumerate(CLASSES):
        program = "bright" if name == "bgs" else "dark"
        path = folder / "healpix" / "sv3" / program / str((SPEED_HEALPIX + k) // 100) / str(SPEED_HEALPIX + k)
        coadd = path / f"coadd-sv3-{program}-{SPEED_HEALPIX + k}.fits"
        stamp = path / f".n{n_per_class}-seed{seed}"
        if not (coadd.is_file() and stamp.is_file()):
            coadd, _ = write_mock_healpix(folder, name, n_per_class, seed + k, healpix=SPEED_HEALPIX + k)
            stamp.touch()
        files.append(coadd)
    return files


def load_redshift_model(preset: str | None = None, model_dir: str | os.PathLike | None = None):
    """A SpecPTForRedshift in eval mode: from `model_dir`, else preset `preset` freshly initialised."""
    from specpt_hf.modeling_specpt import SpecPTForRedshift
    from specpt_hf.presets import create_model

    if model_dir is not None:
        if not Path(model_dir).is_dir():
            raise FileNotFoundError(f"model folder not found: {model_dir}")
        return SpecPTForRedshift.from_pretrained(model_dir).eval()
    return create_model(preset, "redshift").eval()


def model_label(path: str | os.PathLike) -> str:
    """A model folder named from its run: `runs/specpt-small-redshift/best` -> `specpt-small-redshift/best`,
    `runs/specpt-small-cpu/redshift/best` -> `specpt-small-cpu/redshift/best`, `my-model` -> `my-model`."""
    parts = Path(path).resolve().parts
    start = len(parts) - 1
    while start > 0 and parts[start] in {"best", "model", "redshift", "autoencoder"}:
        start -= 1
    return "/".join(parts[start:])


def iter_records(files: Iterable[Path], limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Spectrum records of `files` in order (at most `limit`), streamed a chunk at a time."""
    from specpt_hf.data.desi import read_desi_spectra

    records = chain.from_iterable(read_desi_spectra(path) for path in files)
    return islice(records, limit) if limit is not None else records


def predict_coadds(
    model, files: Sequence[Path], catalog: Path, batch_size: int = 256, bf16: bool = False
) -> dict[str, np.ndarray]:
    """Coadd files to redshift catalog with `specpt predict` (`predict_catalog`: a reader thread feeding
    batches to the model, the FITS catalog written atomically); its TARGETID, Z, ZERR, ZWARN, QUALITY
    columns read back as `targetid`, `z_pred`, `zerr_pred`, `zwarn`, `quality`; `bf16`: the network under
    bfloat16 autocast (`specpt predict --bf16`)."""
    from astropy.table import Table

    from specpt_hf.predict import predict_catalog

    summary = predict_catalog(
        files, catalog, model=model, batch_size=batch_size, device=model.device, progress=False, bf16=bf16
    )
    if summary.failed:
        raise OSError(f"specpt predict could not read {sorted(summary.failed)}: {summary.failed}")
    table = Table.read(catalog, hdu="REDSHIFTS")
    names = {
        "TARGETID": "targetid",
        "Z": "z_pred",
        "ZERR": "zerr_pred",
        "ZWARN": "zwarn",
        "QUALITY": "quality",
    }
    return {new: np.asarray(table[old]) for old, new in names.items()}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_specpt(
    model, files: Sequence[Path], threads: int, batch_size: int, workdir: Path, bf16: bool = False
) -> dict[str, float]:
    """Wall and CPU time of `predict_coadds` with `threads` torch threads (after one warm-up batch); `bf16`: the
    network under bfloat16 autocast."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        predict_coadds(model, files[:1], workdir / "warm-up.fits", batch_size, bf16)  # allocator, kernels
        cpu, start = _cpu_seconds(), time.perf_counter()
        columns = predict_coadds(model, files, workdir / "specpt-catalog.fits", batch_size, bf16)
        wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    finally:
        torch.set_num_threads(previous)
    n = len(columns["z_pred"])
    return {
        "refinement": model.config.refinement if model.refines else "none",
        "threads": threads,
        "n_spectra": n,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "spectra_per_second": n / wall,
        "spectra_per_cpu_second": n / cpu if cpu > 0 else math.nan,
    }


# ------------------------------------------------------------------------------------------ redrock


def redrock_fit_seconds(log: Path) -> float | None:
    """The "Computing redshifts: X seconds" line of an rrdesi log (the fit without start-up), or None."""
    if not log.is_file():
        return None
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("Computing redshifts:") and "seconds" in line:
            return float(line.split(":")[1].split()[0])
    return None


def time_redrock(
    files: Sequence[Path], templates: Path, workdir: Path, per_file: int, zscan: dict[str, str] | None
) -> dict[str, Any]:
    """Redrock on the first `per_file` fibres of each file in one rrdesi run on one core (one start-up
    and template rebinning for all: the setting most favourable to Redrock); end-to-end and fit-only costs."""
    run = run_redrock(
        files,
        workdir / "redrock",
        templates,
        n_processes=1,
        zscan=zscan,
        extra_args=["--ntargets", str(per_file)],
        combined=True,
    )
    fit = [redrock_fit_seconds(log_path(p)) for p in run.outputs]
    summary = run.summary()
    summary["fit_seconds"] = sum(fit) if all(f is not None for f in fit) else None
    summary["fit_cpu_core_seconds_per_spectrum"] = (
        summary["fit_seconds"] / run.n_spectra if summary["fit_seconds"] is not None else None
    )
    summary["zscan"] = zscan or "redrock defaults"
    return summary


# ------------------------------------------------------------------------------------------ scaling


def _rss_mb() -> float:
    """Current resident set size (MB) from /proc, or NaN where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return math.nan


def repeated_files(files: Sequence[Path], per_file: int, n: int, folder: Path) -> list[Path]:
    """Hard links to `files`, repeated in order until they hold at least `n` spectra (`per_file` each):
    distinct paths for `specpt predict` (which drops duplicates), no extra disk space."""
    out = []
    for k in range(math.ceil(n / per_file)):
        source = files[k % len(files)]
        target = folder / f"rep{k // len(files):05d}" / source.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(source, target)
        out.append(target)
    return out


def scale_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: predict about `job['n']` spectra from the repeated files; time and memory."""
    import torch

    torch.set_num_threads(job["threads"])
    model = load_redshift_model(job["preset"], job.get("model_dir"))
    files = [Path(p) for p in job["files"]]
    catalog = Path(job["catalog"])
    predict_coadds(model, files[:1], catalog, job["batch_size"])  # warm-up
    baseline = _rss_mb()
    links = repeated_files(files, job["per_file"], job["n"], Path(job["links"]))
    start, cpu = time.perf_counter(), _cpu_seconds()
    columns = predict_coadds(model, links, catalog, job["batch_size"])
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {
        "n_spectra": len(columns["z_pred"]),
        "n_files": len(links),
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "spectra_per_second": len(columns["z_pred"]) / wall,
        "rss_after_warmup_mb": baseline,
        "peak_rss_mb": peak,
    }


def run_scaling(
    files: Sequence[Path],
    sizes: Sequence[int],
    preset: str,
    threads: int,
    batch_size: int,
    per_file: int,
    workdir: Path,
) -> list[dict[str, Any]]:
    """`scale_worker` at each size, each in its own spawned process (peak memory is per process)."""
    from tqdm.auto import tqdm

    rows = []
    context = multiprocessing.get_context("spawn")
    # imported by module name, so the worker pickles also when this file runs as __main__
    worker = importlib.import_module("speed").scale_worker
    for n in tqdm(sizes, desc="scaling", unit="size"):
        job = {
            "n": n,
            "preset": preset,
            "threads": threads,
            "batch_size": batch_size,
            "files": [str(p) for p in files],
            "per_file": per_file,
            "catalog": str(workdir / f"scale-{n}.fits"),
            "links": str(workdir / "links"),
        }
        with context.Pool(1, maxtasksperchild=1) as pool:
            rows.append({"preset": preset, "threads": threads, **pool.apply(worker, (job,))})
        (workdir / f"scale-{n}.fits").unlink(missing_ok=True)
    return rows


# ------------------------------------------------------------------------------------- size, FLOPs


def model_size(preset: str) -> dict[str, Any]:
    """Parameters (meta device: nothing allocated) and float32 MB of both models of a preset."""
    from specpt_hf.modeling_specpt import num_tokens
    from specpt_hf.presets import count_parameters, preset_config

    row: dict[str, Any] = {"preset": preset, "tokens": num_tokens(preset_config(preset))}
    for task in ("autoencoder", "redshift"):
        n = count_parameters(preset_config(preset, task), task)
        row[f"params_{task}"] = n
        row[f"mb_fp32_{task}"] = n * 4 / 2**20
    return row


def flops_per_spectrum(preset: str) -> float:
    """FLOPs of one redshift-model forward pass on one spectrum (a real batch of 1 on the CPU: the input
    checks read values, which the meta device cannot)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = load_redshift_model(preset)
    pixels = model.config.num_pixels
    flux = torch.ones(1, pixels)  # [1, pixels]
    model.requires_grad_(False)  # FlopCounterMode's module tracker trips on parameters that require grad
    model.set_attn_implementation("eager")  # the CPU sdpa kernel has no FLOP formula: count the matmuls
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(flux=flux, ivar=torch.ones_like(flux), mask=torch.zeros_like(flux, dtype=torch.bool))
    del model
    return float(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------- GPU


def read_rate(files: Sequence[Path]) -> dict[str, float]:
    """Spectra/s and MB/s of only reading the files into records (the I/O bound of the pipeline)."""
    size = sum(p.stat().st_size for p in files)
    start = time.perf_counter()
    n = sum(1 for _ in iter_records(files))
    wall = time.perf_counter() - start
    return {
        "n_spectra": n,
        "seconds": wall,
        "spectra_per_second": n / wall,
        "mb_per_second": size / 2**20 / wall,
    }


def gpu_sweep(
    label: str,
    preset: str | None,
    files: Sequence[Path],
    model_dir: str | None,
    batches: Sequence[int],
    workdir: Path,
) -> list[dict]:
    """bf16 model-only throughput on GPU-resident spectra per batch size, plus end to end at the best size."""
    import torch

    model = load_redshift_model(preset, model_dir).to("cuda")
    records = list(iter_records(files))
    flux = torch.as_tensor(np.stack([r["flux"] for r in records]), device="cuda")  # [n, pixels]
    ivar = torch.as_tensor(np.stack([r["ivar"] for r in records]), device="cuda")
    mask = torch.as_tensor(np.stack([r["mask"] for r in records]), device="cuda")
    rows = []
    for batch in batches:
        reps = math.ceil(batch / len(records))
        fb, ib, mb = (t.repeat(reps, 1)[:batch] for t in (flux, ivar, mask))  # [batch, pixels]
        try:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                model(flux=fb, ivar=ib, mask=mb)  # warm-up
                torch.cuda.synchronize()
                steps, start = 0, time.perf_counter()
                while steps < 5 or time.perf_counter() - start < 2.0:
                    model(flux=fb, ivar=ib, mask=mb)
                    steps += 1
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
            rows.append(
                {
                    "preset": label,
                    "batch_size": batch,
                    "model_spectra_per_second": steps * batch / wall,
                    "max_memory_mb": torch.cuda.max_memory_allocated() / 2**20,
                }
            )
        except torch.OutOfMemoryError:
            rows.append({"preset": label, "batch_size": batch, "model_spectra_per_second": None, "oom": True})
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    best = max(
        (r for r in rows if r.get("model_spectra_per_second")),
        key=lambda r: r["model_spectra_per_second"],
        default=None,
    )
    if best is None:  # every batch size ran out of memory
        return rows
    start = time.perf_counter()
    columns = predict_coadds(model, files, workdir / "gpu-catalog.fits", best["batch_size"], bf16=True)
    torch.cuda.synchronize()
    best["end_to_end_spectra_per_second"] = len(columns["z_pred"]) / (time.perf_counter() - start)
    return rows


# ------------------------------------------------------------------------------------------- report


def ratios(specpt: list[dict], redrock: dict | None) -> list[dict]:
    """Spectra per CPU-second (user + system time of every thread: torch's and the file reader's) of SpecPT's
    1-thread run over Redrock's (one process: end to end, and the fit alone), per preset."""
    if not redrock:
        return []
    rr_e2e = redrock["n_spectra"] / redrock["cpu_seconds"] if redrock["cpu_seconds"] else math.nan
    rr_fit = (
        1.0 / redrock["fit_cpu_core_seconds_per_spectrum"]
        if redrock.get("fit_cpu_core_seconds_per_spectrum")
        else math.nan
    )
    out = []
    for row in specpt:
        if row["threads"] != 1:
            continue
        rate = row["spectra_per_cpu_second"]
        entry = {
            "preset": row["preset"],
            "specpt_spectra_per_core_second": rate,
            "redrock_spectra_per_core_second": rr_e2e,
            "ratio_per_core": rate / rr_e2e,
            "ratio_per_core_vs_redrock_fit_only": rate / rr_fit,
        }
        if row["preset"] == "specpt-small" or row.get("refinement", "none") != "none":  # the refinement's too
            entry["floor"] = FLOOR_RATIO_PER_CORE
            entry["meets_floor"] = bool(entry["ratio_per_core_vs_redrock_fit_only"] >= FLOOR_RATIO_PER_CORE)
        out.append(entry)
    return out


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def markdown(results: dict[str, Any]) -> str:
    """The results as markdown tables."""
    lines = [
        f"# Speed benchmark ({results['machine']['date']})",
        "",
        f"Machine: {results['machine']['summary']}",
        "",
    ]
    if results.get("quick"):
        lines += [
            "**Quick mode: tiny inputs (and a coarse Redrock z grid); the numbers only show the script runs.**",
            "",
        ]
    lines += [
        "## Coadd files to catalog",
        "",
        "| method | threads / processes | spectra | wall s | spectra/s | spectra per CPU-s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["specpt"]:
        lines.append(
            f"| {row['preset']} | {row['threads']} | {row['n_spectra']} | {_fmt(row['wall_seconds'])} "
            f"| {_fmt(row['spectra_per_second'])} | {_fmt(row['spectra_per_cpu_second'])} |"
        )
    rr = results.get("redrock")
    if rr:
        lines.append(
            f"| Redrock (end to end) | {rr['n_processes']} | {rr['n_spectra']} | {_fmt(rr['wall_seconds'])} "
            f"| {_fmt(rr['spectra_per_second'])} | {_fmt(rr['spectra_per_second_per_core'])} |"
        )
        if rr.get("fit_seconds"):
            lines.append(
                f"| Redrock (fit only) | 1 | {rr['n_spectra']} | {_fmt(rr['fit_seconds'])} "
                f"| {_fmt(rr['n_spectra'] / rr['fit_seconds'])} | {_fmt(rr['n_spectra'] / rr['fit_seconds'])} |"
            )
    else:
        lines.append(f"| Redrock | skipped: {results.get('redrock_skipped', '')} | | | | |")
    if results["ratios"]:
        lines += [
            "",
            "## Per CPU core: spectra per CPU-second, SpecPT (1 torch thread) / Redrock (1 process)",
            "",
            "| preset | vs Redrock end to end | vs Redrock fit only | floor |",
            "| --- | ---: | ---: | --- |",
        ]
        for r in results["ratios"]:
            floor = f"≥ {r['floor']:g}×: {'met' if r['meets_floor'] else 'NOT met'}" if "floor" in r else ""
            lines.append(
                f"| {r['preset']} | {_fmt(r['ratio_per_core'], '.0f')}× "
                f"| {_fmt(r['ratio_per_core_vs_redrock_fit_only'], '.0f')}× | {floor} |"
            )
    if results["scaling"]:
        lines += [
            "",
            "## Scaling (fresh process per size)",
            "",
            "| preset | threads | spectra | wall s | spectra/s | RSS after warm-up MB | peak RSS MB |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in results["scaling"]:
            lines.append(
                f"| {r['preset']} | {r['threads']} | {r['n_spectra']} | {_fmt(r['wall_seconds'])} "
                f"| {_fmt(r['spectra_per_second'])} | {_fmt(r['rss_after_warmup_mb'], '.0f')} "
                f"| {_fmt(r['peak_rss_mb'], '.0f')} |"
            )
    lines += [
        "",
        "## Model size and cost",
        "",
        "| preset | tokens | params (autoencoder) | params (redshift) | MB fp32 (redshift) | GFLOP / spectrum (redshift) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["size"]:
        gflop = r.get("flops_redshift")
        lines.append(
            f"| {r['preset']} | {r['tokens']} | {r['params_autoencoder']:,} | {r['params_redshift']:,} "
            f"| {r['mb_fp32_redshift']:.1f} | {_fmt(gflop / 1e9 if gflop else None, '.3f')} |"
        )
    if results.get("gpu"):
        lines += [
            "",
            "## GPU (bf16 autocast)",
            "",
            "| preset | batch | model spectra/s | end to end spectra/s | max memory MB |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for r in results["gpu"]["sweep"]:
            lines.append(
                f"| {r['preset']} | {r['batch_size']} | {_fmt(r.get('model_spectra_per_second'), '.0f')} "
                f"| {_fmt(r.get('end_to_end_spectra_per_second'), '.0f')} | {_fmt(r.get('max_memory_mb'), '.0f')} |"
            )
        rate = results["gpu"]["read_rate"]
        lines.append(
            f"\nReading the files alone: {rate['spectra_per_second']:.0f} spectra/s, {rate['mb_per_second']:.0f} MB/s."
        )
    return "\n".join(lines) + "\n"


def machine_info(device: str) -> dict[str, str]:
    import platform

    import torch

    cpu = "unknown CPU"
    with suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    summary = f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}, Python {platform.python_version()}"
    if device == "cuda":
        summary += f", GPU {torch.cuda.get_device_name()}"
    return {"summary": summary, "date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu_count": str(os.cpu_count())}


def write_outputs(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    json_path = atomic_write_json(out / "speed.json", results, default=str)
    md_path = atomic_write_text(out / "speed.md", markdown(results))
    return json_path, md_path


# ---------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (inputs are cached in it)")
    parser.add_argument(
        "--presets", nargs="+", choices=ALL_PRESETS, help="default: tiny, small (base, paper on cuda)"
    )
    parser.add_argument("--model", help="also time this trained SpecPTForRedshift folder")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--attention",
        nargs="+",
        choices=("eager", "sdpa"),
        help="time each model with each attention implementation (default: the models' own, sdpa)",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="also time each model with the network under bfloat16 autocast (CPU)",
    )
    parser.add_argument("--n-per-class", type=int, default=250, help="spectra per class in the input files")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="threads of the 'all cores' run"
    )
    parser.add_argument("--templates", type=Path, help="Redrock templates (default: built into --out)")
    parser.add_argument(
        "--redrock-per-file", type=int, default=25, help="targets per file Redrock fits (0: skip)"
    )
    parser.add_argument("--scales", type=int, nargs="*", default=[1000, 10000, 100000], help="scaling sizes")
    parser.add_argument("--max-scale", type=int, help="drop scaling sizes above this")
    parser.add_argument("--scale-preset", default="specpt-small", choices=ALL_PRESETS)
    parser.add_argument(
        "--flops-presets",
        nargs="*",
        default=list(ALL_PRESETS),
        choices=ALL_PRESETS,
        help="presets whose FLOPs are counted (the paper model allocates ~300 MB)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 spectra per class, coarse Redrock grid, tiny scales"
    )
    args = parser.parse_args(argv)
    if args.presets is None:
        args.presets = (
            list(CPU_PRESETS) if args.device == "cpu" else ["specpt-small", "specpt-base", "specpt-paper"]
        )
    if args.quick:
        args.n_per_class, args.batch_size, args.redrock_per_file = 3, 8, min(args.redrock_per_file, 1)
        args.scales, args.presets = [6, 12], ["specpt-tiny"]
        args.scale_preset, args.flops_presets = "specpt-tiny", ["specpt-tiny", "specpt-small"]
    if args.max_scale is not None:
        args.scales = [s for s in args.scales if s <= args.max_scale]
    for name in ("n_per_class", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure throughput, scaling, size and FLOPs; write speed.json and speed.md into --out."""
    args = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    files = make_inputs(out / "inputs", args.n_per_class)
    results: dict[str, Any] = {
        "machine": machine_info(args.device),
        "quick": args.quick,
        "specpt": [],
        "scaling": [],
    }
    with tempfile.TemporaryDirectory(prefix="speed-", dir=out) as tmp:
        work = Path(tmp)
        # Redrock first: its numba kernels and processes then do not overlap with torch's threads.
        reason = redrock_missing() if args.redrock_per_file else "--redrock-per-file 0"
        if reason is None:
            templates = args.templates or out / "rrtemplates"
            if not any(templates.glob("rrtemplate-*.fits")):
                build_templates(templates, **(QUICK_SETTINGS if args.quick else {}))
            try:
                results["redrock"] = time_redrock(
                    files, templates, work, args.redrock_per_file, QUICK_ZSCAN if args.quick else None
                )
            except RedrockError as err:
                reason = str(err)
        if reason is not None:
            results["redrock_skipped"] = reason
        sources = [(preset, None) for preset in args.presets] + (
            [(model_label(args.model), args.model)] if args.model else []
        )
        for name, model_dir in sources if args.device == "cpu" else []:
            model = load_redshift_model(None if model_dir else name, model_dir)
            for attention in args.attention or [None]:
                label = name
                if attention:
                    model.set_attn_implementation(attention)
                    label = f"{name} ({attention})"
                for bf16 in (False, True) if args.bf16 else (False,):
                    for threads in sorted({1, args.threads}):
                        timing = time_specpt(model, files, threads, args.batch_size, work, bf16)
                        results["specpt"].append({"preset": label + (" (bf16)" if bf16 else ""), **timing})
        results["ratios"] = ratios(results["specpt"], results.get("redrock"))
        if args.scales:
            results["scaling"] = run_scaling(
                files, args.scales, args.scale_preset, args.threads, args.batch_size, args.n_per_class, work
            )
        results["size"] = [model_size(p) for p in ALL_PRESETS]
        for row in results["size"]:
            row["flops_redshift"] = (
                flops_per_spectrum(row["preset"]) if row["preset"] in args.flops_presets else None
            )
        if args.device == "cuda":
            results["gpu"] = {"read_rate": read_rate(files), "sweep": []}
            for name, model_dir in sources:
                preset = None if model_dir else name
                results["gpu"]["sweep"] += gpu_sweep(name, preset, files, model_dir, GPU_BATCHES, work)
    json_path, md_path = write_outputs(results, out)
    print(markdown(results))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
