"""Transfer learning to other instruments: SpecPT fine-tuned from a pretrained start versus trained from scratch.

For each instrument (DEIMOS-like, HST-grism-like mocks from `specpt_hf.data.mock` on the instrument's grid and
resolution) and each training-set size, two redshift models with the same config, data, optimizer steps, batch
size, learning-rate schedule and seeds are trained: one starting from the pretrained backbone (`--pretrained`,
loaded by `specpt_hf.finetune.adapt_to_instrument`), one from random weights (`load_weights=False`: the same
initial head, a random backbone). Both are trained by `specpt train`'s loop (`specpt_hf.finetune.finetune`),
validated once at the end, and evaluated on the same held-out test spectra (NMAD and eta, overall and per
class). The training sets are nested: the first N rows of one shuffled training pool.

The full measurement (needs a pretrained specpt-small autoencoder, e.g. from `examples/run_main_job.py` or
`specpt train --config examples/configs/specpt-small-autoencoder.yaml`):

    python benchmarks/transfer.py \\
        --pretrained runs/specpt-small-autoencoder/model --head-preset specpt-small \\
        --instruments deimos hst_g141 --grid native --n-train 500 2000 10000 \\
        --max-steps 2000 --batch-size 32 --learning-rate 3e-4 --warmup-steps 100 \\
        --n-val 500 --n-test 2000 --seeds 0 1 2 --out benchmarks/results/transfer --resume

It writes `{out}/transfer.json` (every run), `{out}/transfer.md` (the table) and `{out}/transfer.png` (NMAD and
eta against the number of training spectra, both starts); each run's model folders go to `{out}/runs/{run}/`. Cost: 2 instruments x 3 sizes x 2 starts x 3 seeds =
36 runs of 2000 steps. specpt-small trains ~90 spectra/s on the 7781-pixel DESI grid on 2 CPU cores, so a
DEIMOS run (15153 pixels) takes ~25 min there and an HST G141 run (135 pixels) ~1-2 min: ~8 h on 2 cores for all
seeds (use `--seeds 0` for ~3 h), minutes on a GPU. `--resume` keeps finished runs (`{out}/runs/*.json`) and the
mock spectra (`{out}/data/`), so an interrupted measurement continues where it stopped.

    python benchmarks/transfer.py --quick --out /tmp/transfer   # tiny numbers, a smoke run (pretrains a tiny
                                                                # autoencoder on DESI-like mocks first)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from specpt_hf.atomic import atomic_write_json, atomic_write_text
from specpt_hf.data.instrument import get_instrument
from specpt_hf.finetune import (
    FREEZE_CHOICES,
    GRIDS,
    adapt_to_instrument,
    config_wavelength,
    evaluate_redshifts,
    finetune,
    pretrain_mock_autoencoder,
    read_mock_info,
    write_instrument_dataset,
)
from specpt_hf.training import TrainingSettings

STARTS = ("pretrained", "scratch")
QUICK = dict(
    instruments=["deimos", "hst_g141"],
    n_train=[16, 48],
    n_val=16,
    n_test=24,
    max_steps=6,
    batch_size=8,
    warmup_steps=1,
    seeds=[0],
    head_preset="specpt-tiny",
)
QUICK_PRETRAIN = dict(preset="specpt-tiny", n_train=32, n_val=8, max_steps=4, batch_size=8)


@dataclass(frozen=True)
class Run:
    """One training run of the measurement."""

    instrument: str
    grid: str
    n_train: int
    start: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.instrument}-{self.grid}-n{self.n_train}-{self.start}-seed{self.seed}"


def build_model(args: argparse.Namespace, pretrained: str, run: Run) -> tuple[Any, Any]:
    """The model of one run: the pretrained start (with `--freeze` / `--lora-rank`) or the same config from
    scratch (everything trained, no adapters)."""
    scratch = run.start == "scratch"
    return adapt_to_instrument(
        pretrained,
        run.instrument,
        grid=run.grid,
        freeze="none" if scratch else args.freeze,
        lora_rank=0 if scratch else args.lora_rank,
        head_preset=args.head_preset,
        load_weights=not scratch,
        seed=run.seed,
    )


def prepare_data(args: argparse.Namespace, pretrained: str, instrument: str) -> Path:
    """The instrument's mock spectra on the grid the runs read (reused when already written the same way)."""
    model, _ = adapt_to_instrument(pretrained, instrument, grid=args.grid, head_preset=args.head_preset)
    wavelength = config_wavelength(model.config)
    folder = Path(args.out) / "data" / f"{instrument}-{args.grid}"
    splits = {"train": max(args.n_train), "validation": args.n_val, "test": args.n_test}
    info = read_mock_info(folder)
    same = info is not None and (
        info.get("instrument") == get_instrument(instrument).name
        and info.get("requested") == splits
        and info.get("seed") == args.data_seed
        and info.get("num_pixels") == len(wavelength)
        and np.isclose(info.get("wavelength_start", np.nan), wavelength[0])
    )
    if not same:
        write_instrument_dataset(folder, instrument, wavelength, splits, seed=args.data_seed, overwrite=True)
    return folder


def do_run(args: argparse.Namespace, pretrained: str, run: Run, data_dir: Path) -> dict[str, Any]:
    """Train and evaluate one run; its record (also written to `{out}/runs/{name}.json`)."""
    path = Path(args.out) / "runs" / f"{run.name}.json"
    settings = TrainingSettings(
        stage="redshift",
        data_dir=str(data_dir),
        output_dir=str(path.with_suffix("")),  # the run's model/ and best/ folders
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        eval_steps=args.max_steps,  # validate once, at the end
        max_train_spectra=run.n_train,
        max_val_spectra=args.n_val,
        mixed_precision=args.mixed_precision,
        report_to="none",
        disable_tqdm=args.no_progress,
        seed=run.seed,
    )
    setup = {
        **asdict(run),
        "settings": {k: v for k, v in settings.to_dict().items() if k != "disable_tqdm"},
        "pretrained": pretrained,
        "freeze": "none" if run.start == "scratch" else args.freeze,
        "lora_rank": 0 if run.start == "scratch" else args.lora_rank,
    }
    if args.resume and path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous.get("setup") == setup:
            print(f"{run.name}: kept from {path}")
            return previous
    print(f"\n== {run.name}", flush=True)
    model, report = build_model(args, pretrained, run)
    result = finetune(model, settings, report)
    test = evaluate_redshifts(result.model, data_dir, "test", batch_size=max(args.batch_size, 64))
    overall = test.metrics["all"]
    print(
        f"{run.name}: test NMAD {overall['nmad']:.4f}, eta {overall['eta']:.3f} ({result.train_seconds:.0f} s)"
    )
    validation = [record for record in result.history if "validation/nmad" in record]
    record = {
        "setup": setup,
        "metrics": test.metrics,
        "nmad": overall["nmad"],
        "eta": overall["eta"],
        "bias": overall["bias"],
        "n_test": overall["n"],
        "train_seconds": result.train_seconds,
        "spectra_per_second": result.spectra_per_second,
        "validation": validation[-1] if validation else {},
        "loaded_tensors": len(report.loaded),
        "trainable_parameters": report.trainable_parameters,
    }
    atomic_write_json(path, record)
    return record


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread over seeds per (instrument, n_train, start)."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for record in records:
        setup = record["setup"]
        groups.setdefault((setup["instrument"], setup["n_train"], setup["start"]), []).append(record)
    rows = []
    for (instrument, n_train, start), items in sorted(groups.items()):
        nmad, eta = np.array([r["nmad"] for r in items]), np.array([r["eta"] for r in items])
        rows.append(
            {
                "instrument": instrument,
                "n_train": n_train,
                "start": start,
                "seeds": len(items),
                "nmad": float(nmad.mean()),
                "nmad_std": float(nmad.std(ddof=1)) if len(items) > 1 else 0.0,
                "eta": float(eta.mean()),
                "eta_std": float(eta.std(ddof=1)) if len(items) > 1 else 0.0,
                "n_test": int(items[0]["n_test"]),
            }
        )
    return rows


def markdown_table(summary: list[dict[str, Any]], header: dict[str, Any]) -> str:
    """The table: one line per (instrument, n_train), both starts side by side."""
    index = {(r["instrument"], r["n_train"], r["start"]): r for r in summary}
    lines = [
        "# Transfer learning to other instruments",
        "",
        *(f"- {key}: {value}" for key, value in header.items()),
        "",
        "NMAD = 1.48 median(|dz|/(1+z)); eta = fraction with |dz|/(1+z) > 0.15; mean (std) over seeds.",
        "",
        "| instrument | n_train | NMAD pretrained | NMAD scratch | eta pretrained | eta scratch | "
        "NMAD scratch / pretrained | n_test |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for instrument, n_train in sorted({(r["instrument"], r["n_train"]) for r in summary}):
        pre, scr = index.get((instrument, n_train, "pretrained")), index.get((instrument, n_train, "scratch"))

        def cell(row: dict[str, Any] | None, key: str) -> str:
            if row is None:
                return "-"
            spread = f" ({row[key + '_std']:.4f})" if row["seeds"] > 1 else ""
            return f"{row[key]:.4f}{spread}"

        ratio = f"{scr['nmad'] / pre['nmad']:.2f}" if pre and scr and pre["nmad"] > 0 else "-"
        n_test = (pre or scr)["n_test"]
        lines.append(
            f"| {instrument} | {n_train} | {cell(pre, 'nmad')} | {cell(scr, 'nmad')} | {cell(pre, 'eta')} | "
            f"{cell(scr, 'eta')} | {ratio} | {n_test} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: list[dict[str, Any]], path: Path, title: str) -> Path:
    """NMAD (top) and eta (bottom) against n_train, one column per instrument, both starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from specpt_hf.evaluation.plots import save_figure

    instruments = sorted({r["instrument"] for r in summary})
    fig, axes = plt.subplots(2, len(instruments), figsize=(4.5 * len(instruments), 6.5), squeeze=False)
    styles = {
        "pretrained": dict(color="tab:blue", marker="o"),
        "scratch": dict(color="tab:orange", marker="s"),
    }
    for column, instrument in enumerate(instruments):
        for start in STARTS:
            rows = sorted((r for r in summary if r["instrument"] == instrument and r["start"] == start),
                          key=lambda r: r["n_train"])  # fmt: skip
            if not rows:
                continue
            n = [r["n_train"] for r in rows]
            for row_index, key in enumerate(("nmad", "eta")):
                axes[row_index, column].errorbar(
                    n, [r[key] for r in rows], yerr=[r[f"{key}_std"] for r in rows], label=start, capsize=3,
                    **styles[start],
                )  # fmt: skip
        axes[0, column].set_title(instrument)
        for row_index, label in enumerate(("NMAD", "eta (|dz|/(1+z) > 0.15)")):
            axes[row_index, column].set_xscale("log")
            axes[row_index, column].set_ylabel(label)
            axes[row_index, column].grid(alpha=0.3)
        sizes = sorted({r["n_train"] for r in summary if r["instrument"] == instrument})
        for ax in axes[:, column]:
            ax.minorticks_off()
            ax.set_xticks(sizes, labels=[f"{n:,}" for n in sizes])
        axes[1, column].set_xlabel("training spectra")
        axes[0, column].legend()
    fig.suptitle(title)
    fig.tight_layout()
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pretrained = args.pretrained
    if pretrained is None:
        print("no --pretrained given: pretraining a tiny autoencoder on DESI-like mocks (--quick)")
        pretrained = str(pretrain_mock_autoencoder(out / "pretrain", seed=0, **QUICK_PRETRAIN))
    started = time.perf_counter()
    records = []
    for instrument in args.instruments:
        data_dir = prepare_data(args, pretrained, instrument)
        for n_train in sorted(args.n_train):
            for seed in args.seeds:
                for start in STARTS:
                    run = Run(instrument, args.grid, n_train, start, seed)
                    records.append(do_run(args, pretrained, run, data_dir))
    summary = summarise(records)
    header = {
        "status": "PRELIMINARY (--quick: tiny sizes, not a measurement)" if args.quick else "full run",
        "pretrained": pretrained,
        "grid": args.grid,
        "freeze (pretrained start)": args.freeze,
        "LoRA rank (pretrained start)": args.lora_rank,
        "optimizer steps per run": args.max_steps,
        "batch size": args.batch_size,
        "learning rate": args.learning_rate,
        "seeds": " ".join(map(str, args.seeds)),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
    }
    result = {
        "header": header,
        "summary": summary,
        "runs": records,
        "seconds": time.perf_counter() - started,
    }
    atomic_write_json(out / "transfer.json", result)
    atomic_write_text(out / "transfer.md", markdown_table(summary, header))
    plot(summary, out / "transfer.png", "SpecPT transfer: pretrained start vs from scratch")
    print(markdown_table(summary, header))
    print(f"wrote {out / 'transfer.json'}, {out / 'transfer.md'}, {out / 'transfer.png'}")
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", help="pretrained SpecPT folder (autoencoder or redshift model)")
    parser.add_argument(
        "--head-preset", help="head sizes from this preset (when --pretrained is an autoencoder)"
    )
    parser.add_argument("--instruments", nargs="+", default=["deimos", "hst_g141"])
    parser.add_argument("--grid", choices=GRIDS, default="native")
    parser.add_argument("--freeze", choices=FREEZE_CHOICES, default="none", help="pretrained start only")
    parser.add_argument(
        "--lora-rank", type=int, default=0, help="LoRA adapters for the pretrained start (0: off)"
    )
    parser.add_argument("--n-train", type=int, nargs="+", default=[500, 2000, 10000])
    parser.add_argument("--n-val", type=int, default=500)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="training seeds (head init, data order)"
    )
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the mock spectra")
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", action="store_true", help="keep finished runs found in {out}/runs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run (numbers mean nothing)")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if key != "head_preset" or args.head_preset is None:
                setattr(args, key, value)
    elif args.pretrained is None:
        parser.error("--pretrained is required (or use --quick, which pretrains a tiny autoencoder)")
    for name in args.instruments:
        get_instrument(name)  # ValueError for an unknown instrument
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        measure(parse_args(argv))
    except (ValueError, OSError) as err:
        print(f"transfer: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
