"""Training checkpoints that load without unpickling: `checkpoints/step_{N}/` holds

    model.safetensors      the (unwrapped) model's weights
    optimizer.pt           `optimizer.state_dict()`, read back with `torch.load(weights_only=True)`
    scheduler.pt           `scheduler.state_dict()`, the same way
    trainer_state.json     the loop counters and history, plus Accelerate's step and the grad scaler
    rng_{process}.npz      each process's Python / NumPy / torch RNG states (`np.load(allow_pickle=False)`)

Accelerate's `save_state` / `load_state` are not used: its `load_state` unpickles `*.pkl` files (custom and
RNG states), so a file planted in a checkpoint folder would run code on `--resume`. Nothing here reads a
pickle, and files other than the ones above are ignored.

A checkpoint is written into a temporary folder next to its final place and renamed into place when
complete (`specpt_hf.atomic.replaced_folder`); a folder that still lacks one of the files (killed by an old
version mid-save, or in Accelerate's format) is skipped on resume with a warning.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from safetensors.torch import load_model, save_model

from specpt_hf.atomic import replaced_folder

logger = get_logger(__name__)

CHECKPOINT_PREFIX = "step_"
MODEL_NAME = "model.safetensors"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
STATE_NAME = "trainer_state.json"
CHECKPOINT_FILES = (MODEL_NAME, OPTIMIZER_NAME, SCHEDULER_NAME, STATE_NAME)


def rng_name(process_index: int) -> str:
    return f"rng_{process_index}.npz"


def checkpoint_step(folder: Path) -> int | None:
    """N of a `step_N` folder name, None for any other name."""
    digits = folder.name.removeprefix(CHECKPOINT_PREFIX)
    return int(digits) if folder.name.startswith(CHECKPOINT_PREFIX) and digits.isdigit() else None


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds every file of a checkpoint."""
    return all((folder / name).is_file() for name in CHECKPOINT_FILES)


def all_checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Every `{output_dir}/checkpoints/step_{N}` folder, complete or not, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """The complete `{output_dir}/checkpoints/step_{N}` folders, oldest first."""
    return [p for p in all_checkpoint_dirs(output_dir) if is_complete(p)]


# --- RNG states ----------------------------------------------------------------------------------------


def rng_state() -> dict[str, np.ndarray]:
    """This process's Python, NumPy and torch (CPU and CUDA) RNG states as plain arrays."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": np.array([version, *words], dtype=np.int64),
        "python_gauss": np.array([np.nan if gauss is None else gauss]),
        "numpy_keys": np.asarray(keys, dtype=np.uint32),
        "numpy_meta": np.array([pos, has_gauss, cached], dtype=np.float64),
        "torch": torch.get_rng_state().numpy(),
    }
    if torch.cuda.is_available():
        for index, cuda in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda_{index}"] = cuda.numpy()
    return state


def set_rng_state(state: dict[str, np.ndarray]) -> None:
    """Restore the states of `rng_state()`."""
    python, gauss = state["python"].tolist(), float(state["python_gauss"][0])
    random.setstate((python[0], tuple(python[1:]), None if np.isnan(gauss) else gauss))
    pos, has_gauss, cached = state["numpy_meta"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"], int(pos), int(has_gauss), cached))
    torch.set_rng_state(torch.from_numpy(state["torch"].copy()))
    cuda = [torch.from_numpy(state[k].copy()) for k in sorted(state) if k.startswith("cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --- save and load -------------------------------------------------------------------------------------


def save_training_state(
    accelerator: Accelerator,
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
) -> Path:
    """Write the checkpoint into a temporary folder and rename it onto `folder` when complete (main process;
    the other processes send their RNG states)."""
    rng_states = gather_object([rng_state()])  # one per process, in process order
    if accelerator.is_main_process:
        with replaced_folder(folder) as tmp:
            save_model(accelerator.unwrap_model(model), str(tmp / MODEL_NAME))
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_NAME)
            torch.save(scheduler.state_dict(), tmp / SCHEDULER_NAME)
            for index, state in enumerate(rng_states):
                np.savez(tmp / rng_name(index), **state)
            extra = {"accelerator_step": accelerator.step}
            if accelerator.scaler is not None:
                extra["scaler"] = accelerator.scaler.state_dict()
            text = json.dumps({"trainer": trainer_state, **extra}, indent=1) + "\n"
            (tmp / STATE_NAME).write_text(text, encoding="utf-8")  # last: the folder is complete
    accelerator.wait_for_everyone()
    return folder


def load_training_state(
    accelerator: Accelerator,
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:
    """Load a checkpoint of `save_training_state` into the prepared objects; return the trainer state."""
    load_model(accelerator.unwrap_model(model), str(folder / MODEL_NAME), device=str(accelerator.device))
    optimizer.load_state_dict(torch.load(folder / OPTIMIZER_NAME, map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / SCHEDULER_NAME, map_location="cpu", weights_only=True))
    saved = json.loads((folder / STATE_NAME).read_text(encoding="utf-8"))
    accelerator.step = int(saved.get("accelerator_step", 0))
    if accelerator.scaler is not None and "scaler" in saved:
        accelerator.scaler.load_state_dict(saved["scaler"])
    rng_file = folder / rng_name(accelerator.process_index)
    if rng_file.is_file():
        with np.load(rng_file, allow_pickle=False) as arrays:
            set_rng_state({name: arrays[name] for name in arrays.files})
    else:
        logger.warning(f"{rng_file}: missing (other number of processes?), RNG states not restored")
    return saved["trainer"]


def newest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint; newer incomplete folders are skipped with a warning."""
    for folder in reversed(all_checkpoint_dirs(output_dir)):
        if is_complete(folder):
            return folder
        missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
        logger.warning(f"--resume: skipping incomplete checkpoint {folder} (no {', '.join(missing)})")
    return None
