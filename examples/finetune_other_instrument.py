"""Fine-tune a pretrained SpecPT on spectra from another instrument: Keck/DEIMOS-like or HST/WFC3-grism-like mocks.

    # DEIMOS on its own 0.33 A grid, the whole model fine-tuned from a pretrained autoencoder
    python examples/finetune_other_instrument.py --pretrained runs/specpt-small-autoencoder/model \\
        --instrument deimos --grid native --freeze none --n-train 2000 --max-steps 1500 --out runs/ft-deimos

    # HST G102 resampled onto the model's DESI grid (coverage-masked), LoRA adapters + a new head
    python examples/finetune_other_instrument.py --pretrained runs/specpt-small-autoencoder/model \\
        --instrument hst_g102 --grid resample --lora --lora-rank 8 --out runs/ft-g102

    # a smoke run in seconds (pretrains a tiny autoencoder on DESI-like mocks when --pretrained is not given)
    python examples/finetune_other_instrument.py --instrument hst_g141 --quick --out /tmp/ft

    # on several GPUs / processes (not with --quick, whose pretraining step runs in one process)
    accelerate launch examples/finetune_other_instrument.py --pretrained ... --instrument deimos --out ...

Steps: write mock spectra of the instrument (its grid and line-spread function, `specpt_hf.data.mock`) as Parquet
shards on the model's grid; build the redshift model for the instrument (`specpt_hf.finetune`: resampled or
native grid, freezing, LoRA); fine-tune with `specpt train`'s Accelerate loop (`specpt_hf.finetune.finetune`),
which saves `{out}/model` and `{out}/best` with `save_pretrained` (LoRA merged, adapter alongside); evaluate NMAD
and eta on the held-out test split. `{out}/results.json` holds the metrics and what was loaded.
Grid `resample` needs the instrument to overlap the model's grid: HST G141 does not overlap DESI's, use `native`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from accelerate import PartialState

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

INSTRUMENT_CHOICES = ("deimos", "hst_g102", "hst_g141")
# --quick: tiny numbers, so the whole script runs in seconds on a CPU
QUICK = dict(
    n_train=48,
    n_val=16,
    n_test=24,
    max_steps=6,
    batch_size=8,
    warmup_steps=1,
    eval_steps=3,
    head_preset="specpt-tiny",
)
QUICK_PRETRAIN = dict(preset="specpt-tiny", n_train=32, n_val=8, max_steps=4, batch_size=8)


def _same_request(info: dict[str, Any] | None, request: dict[str, Any]) -> bool:
    """Whether an existing mock folder holds what is asked for (so it can be reused)."""
    if info is None:
        return False
    return all(info.get(key) == value for key, value in request.items())


def prepare_data(data_dir: Path, config: Any, args: argparse.Namespace) -> dict[str, int]:
    """Mock spectra on the model's grid, reused when the folder already holds the same request."""
    splits = {"train": args.n_train, "validation": args.n_val, "test": args.n_test}
    wavelength = config_wavelength(config)
    request = {
        "instrument": get_instrument(args.instrument).name,
        "seed": args.seed,
        "requested": splits,
        "num_pixels": len(wavelength),
        "wavelength_start": float(wavelength[0]),
    }
    info = read_mock_info(data_dir)
    if _same_request(info, request):
        print(f"reusing the mock spectra in {data_dir}")
        return info["rows"]
    return write_instrument_dataset(
        data_dir, args.instrument, wavelength, splits, seed=args.seed, overwrite=True
    )


def training_function(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Adapt, write the data, fine-tune, evaluate, save; return the results written to `results.json`."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = PartialState()
    pretrained = args.pretrained
    if pretrained is None:
        print("no --pretrained given: pretraining a tiny autoencoder on DESI-like mocks (--quick)")
        pretrained = str(pretrain_mock_autoencoder(out / "pretrain", seed=args.seed, **QUICK_PRETRAIN))

    model, report = adapt_to_instrument(
        pretrained,
        args.instrument,
        grid=args.grid,
        freeze=args.freeze,
        lora_rank=args.lora_rank if args.lora else 0,
        lora_alpha=args.lora_alpha,
        native_step=args.native_step,
        head_preset=config["head_preset"],
        seed=args.seed,
    )
    print(report.summary())
    data_dir = Path(args.data_dir) if args.data_dir else out / "data"
    with state.main_process_first():  # the main process writes the spectra, the others then reuse them
        rows = prepare_data(data_dir, model.config, args)
    print(f"mock spectra in {data_dir}: {rows}")

    settings = TrainingSettings(
        stage="redshift",
        data_dir=str(data_dir),
        output_dir=str(out),
        max_steps=config["max_steps"],
        batch_size=config["batch_size"],
        learning_rate=args.learning_rate,
        encoder_learning_rate=args.encoder_learning_rate,
        warmup_steps=config["warmup_steps"],
        eval_steps=config["eval_steps"],
        mixed_precision=args.mixed_precision,
        report_to="none",
        seed=args.seed,
    )
    result = finetune(
        model, settings, report
    )  # saves {out}/model (and best/): LoRA merged, adapter alongside
    validation = [record for record in result.history if "validation/nmad" in record]
    for record in validation:
        print(
            f"step {record['step']}: validation NMAD {record['validation/nmad']:.4f}, "
            f"eta {record['validation/eta']:.3f}"
        )
    test = evaluate_redshifts(result.model, data_dir, "test", batch_size=config["batch_size"])
    if not state.is_main_process:
        return {}
    results = {
        "instrument": report.instrument,
        "grid": args.grid,
        "freeze": args.freeze,
        "lora_rank": report.lora_rank,
        "pretrained": str(pretrained),
        "settings": settings.to_dict(),
        "rows": rows,
        "train_seconds": result.train_seconds,
        "spectra_per_second": result.spectra_per_second,
        "validation_history": validation,
        "test": test.metrics,
        "test_dropped_out_of_range": test.dropped_out_of_range,
        "adaptation": report.to_dict(),
        "model_dir": str(result.model_dir),
    }
    with tempfile.NamedTemporaryFile("w", dir=out, suffix=".tmp", delete=False, encoding="utf-8") as tmp:
        json.dump(results, tmp, indent=2)
    os.replace(tmp.name, out / "results.json")
    overall = test.metrics["all"]
    print(
        f"test ({overall['n']} spectra): NMAD {overall['nmad']:.4f}, eta {overall['eta']:.3f}, "
        f"bias {overall['bias']:+.4f}; model saved to {result.model_dir}"
    )
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", help="pretrained SpecPT folder (autoencoder or redshift model)")
    parser.add_argument("--instrument", choices=INSTRUMENT_CHOICES, default="deimos")
    parser.add_argument(
        "--grid", choices=GRIDS, default="native", help="resample onto the model's grid or native"
    )
    parser.add_argument(
        "--native-step", type=float, help="pixel step (A) of the native grid (default: its own)"
    )
    parser.add_argument(
        "--freeze", choices=FREEZE_CHOICES, default="none", help="pretrained parts kept fixed"
    )
    parser.add_argument("--lora", action="store_true", help="LoRA adapters on the encoder layers (peft)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: 2 x rank)")
    parser.add_argument("--n-train", type=int, default=2000, help="training spectra")
    parser.add_argument("--n-val", type=int, default=300, help="validation spectra")
    parser.add_argument("--n-test", type=int, default=1000, help="test spectra")
    parser.add_argument("--max-steps", type=int, default=1500, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument(
        "--encoder-learning-rate", type=float, help="learning rate of the pretrained backbone"
    )
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--eval-steps", type=int, default=250)
    parser.add_argument(
        "--head-preset", help="head sizes from this preset (when --pretrained is an autoencoder)"
    )
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", help="folder for the mock Parquet shards (default: {out}/data)")
    parser.add_argument("--out", required=True, help="output folder (model/, best/, data/, results.json)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    args = parser.parse_args(argv)
    if args.pretrained is None and not args.quick:
        parser.error("--pretrained is required (or use --quick, which pretrains a tiny autoencoder)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = {
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "warmup_steps": args.warmup_steps,
        "eval_steps": args.eval_steps,
        "head_preset": args.head_preset,
    }
    if args.quick:
        config.update({k: v for k, v in QUICK.items() if k in config})
        args.n_train, args.n_val, args.n_test = QUICK["n_train"], QUICK["n_val"], QUICK["n_test"]
        config["head_preset"] = args.head_preset or QUICK["head_preset"]
    try:
        training_function(config, args)
    except (ValueError, OSError) as err:
        print(f"finetune_other_instrument: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
