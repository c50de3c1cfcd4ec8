"""`specpt train`: both SpecPT training stages with Accelerate.

Stage 1 (`--stage autoencoder`) pretrains `SpecPTForSpectrumReconstruction` to rebuild its input spectra.
Stage 2 (`--stage redshift`) trains `SpecPTForRedshift`, starting from the stage-1 folder
(`--pretrained-model {stage-1 out}/model`), with the encoder frozen or fine-tuned at a smaller learning rate,
and keeps the model with the best validation NMAD.

The same command runs on a laptop CPU and on many GPUs:

    specpt train --config examples/configs/specpt-small-autoencoder.yaml --data-dir data/specpt
    accelerate launch --config_file examples/accelerate/multi-gpu.yaml -m specpt_hf.cli train --config ...

`training_function(settings, model=...)` trains a model built by the caller instead (a partly frozen or a
peft/LoRA model, e.g. from `specpt_hf.finetune.adapt_to_instrument`), and `save_function=` changes how its model
folders are written (`specpt_hf.finetune.write_finetuned`: LoRA merged, adapter alongside).

Output folder: `checkpoints/step_{N}/` (full training state without pickles, written aside and renamed into
place, see `specpt_hf.training.checkpoint`; `--resume` continues from the newest complete one),
`logs/` (TensorBoard), `training_history.json` (every logged record: loss, learning rate, validation
metrics; kept across resumes), `model/` (final weights, `save_pretrained` format, with
`training_settings.yaml`), and for stage 2 `best/` (the weights with the best validation NMAD).
"""

from __future__ import annotations

import argparse
import math
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, parse_flag_from_env, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PretrainedConfig, PreTrainedModel, get_scheduler

from specpt_hf.atomic import atomic_write_json, replaced_folder
from specpt_hf.cli import add_debug_flag, run_reporting_errors
from specpt_hf.configuration_specpt import SpecPTConfig, SpecPTForRedshiftConfig
from specpt_hf.evaluation.metrics import redshift_metrics
from specpt_hf.loading import check_model_source
from specpt_hf.prediction import model_wavelength
from specpt_hf.presets import model_class, preset_config
from specpt_hf.training.augment import Augmentations, augment, step_generator
from specpt_hf.training.checkpoint import (
    CHECKPOINT_PREFIX,
    checkpoint_dirs,
    load_training_state,
    newest_checkpoint,
    save_training_state,
)
from specpt_hf.training.data import build_dataloader, load_training_data
from specpt_hf.training.settings import TrainingSettings, parse_settings

logger = get_logger(__name__)

HISTORY_NAME = "training_history.json"


@dataclass
class TrainerState:
    """Loop counters saved with every checkpoint (as JSON, `trainer_state.json`)."""

    step: int = 0
    best_nmad: float = math.inf
    best_step: int = -1
    evals_without_improvement: int = 0
    history: list[dict[str, float]] = field(
        default_factory=list
    )  # every logged record, resumed runs included

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)


@dataclass
class TrainingResult:
    """What a run produced: the trained model (final weights; a peft model stays one), its folders, the last
    optimizer step, every logged record, and the training time (validation and saving left out) and speed of
    this run."""

    model: torch.nn.Module
    model_dir: Path
    best_dir: Path | None
    step: int
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    spectra_per_second: float = 0.0


# Writes an (unwrapped) model into an empty folder; `training_function` uses `save_pretrained` without one.
SaveFunction = Callable[[torch.nn.Module, Path], None]


# --- model -----------------------------------------------------------------------------------------


def build_model(settings: TrainingSettings) -> PreTrainedModel:
    """The stage's model: from `pretrained_model` when given, else freshly initialised from the preset.

    Stage 2 from a stage-1 folder loads its backbone (`specpt.*`) and takes the head settings (redshift range,
    bins, sizes) from the preset; from a redshift-model folder it loads everything.
    """
    cls = model_class(settings.stage)
    source = check_model_source(settings.pretrained_model)[0] if settings.pretrained_model else None
    if settings.stage == "autoencoder":
        if source:
            return cls.from_pretrained(source)
        return cls(preset_config(settings.preset, "autoencoder"))
    preset = preset_config(settings.preset, "redshift", freeze_encoder=settings.freeze_encoder)
    if not source:
        return cls(preset)
    model = cls.from_pretrained(source, **head_settings(preset, source))
    if model.spectype_head is not None:  # fitted on an embedding that training changes
        logger.info(
            "%s: its spectral-type head is dropped (`specpt templates` fits one to the new model)", source
        )
        model.spectype_head, model.config.spectype_labels = None, None
    return model


def head_settings(preset: SpecPTForRedshiftConfig, pretrained_model: str) -> dict[str, Any]:
    """Config overrides for loading a redshift model from `pretrained_model`: the preset's head settings when
    the folder holds an autoencoder (no head), only `freeze_encoder` when it holds a redshift model."""
    source = PretrainedConfig.get_config_dict(pretrained_model)[0]
    if source.get("model_type") == SpecPTForRedshiftConfig.model_type:
        return {"freeze_encoder": preset.freeze_encoder}
    head_keys = set(SpecPTForRedshiftConfig().to_dict()) - set(SpecPTConfig().to_dict())
    return {key: getattr(preset, key) for key in sorted(head_keys)}


def check_model(model: torch.nn.Module, settings: TrainingSettings) -> None:
    """ValueError unless a model given to `training_function` is the stage's kind (plain or peft-wrapped) and
    the settings that say how to build a model (`pretrained_model`, `freeze_encoder`) are left unset."""
    cls = model_class(settings.stage)
    if type(getattr(model, "config", None)) is not cls.config_class:
        raise ValueError(f"stage {settings.stage!r} trains a {cls.__name__}, got a {type(model).__name__}")
    for name in ("pretrained_model", "freeze_encoder"):
        if getattr(settings, name):
            raise ValueError(
                f"setting {name!r} builds the model; with a model given, build (or freeze) it so"
            )


def is_peft_model(model: torch.nn.Module) -> bool:
    """Whether `model` is a `peft.PeftModel` (without importing peft when it is not installed)."""
    return type(model).__module__.startswith("peft.")


def parameter_groups(model: torch.nn.Module, settings: TrainingSettings) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: weight decay on matrices only; the pretrained backbone (the
    base model's weights, not peft's LoRA adapters) at `encoder_learning_rate` when set."""
    base = model.get_base_model() if is_peft_model(model) else model
    prefix = f"{base.base_model_prefix}."
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = name.removeprefix("base_model.model.")  # peft's wrapping
        backbone = name.startswith(prefix) and "lora_" not in name
        lr = (
            settings.encoder_learning_rate
            if backbone and settings.encoder_learning_rate
            else settings.learning_rate
        )
        decay = settings.weight_decay if param.ndim >= 2 else 0.0
        groups.setdefault((lr, decay), []).append(param)
    if not groups:
        raise ValueError("the model has no trainable parameter")
    return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]


# --- validation ------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, dataloader: Any, accelerator: Accelerator, stage: str
) -> dict[str, float]:
    """Validation loss, and for stage 2 NMAD / eta / bias over all processes' spectra."""
    was_training = model.training
    model.eval()
    losses, z_pred, z_true = [], [], []
    for batch in dataloader:
        outputs = model(**batch)
        batch_size = batch["labels"].shape[0]
        losses.append(accelerator.gather_for_metrics(outputs.loss.detach().float().repeat(batch_size)))
        if stage == "redshift":
            pred, true = accelerator.gather_for_metrics((outputs.redshift.float(), batch["labels"]))
            z_pred.append(pred)  # [batch]
            z_true.append(true)  # [batch]
    model.train(was_training)
    metrics = {"validation/loss": torch.cat(losses).mean().item()}
    if stage == "redshift":
        pred, true = torch.cat(z_pred).cpu().double(), torch.cat(z_true).cpu().double()
        if not torch.isfinite(pred).all():
            raise FloatingPointError(
                "validation redshifts are not finite: training diverged (lower the learning rate)"
            )
        summary = redshift_metrics(pred.numpy(), true.numpy())
        metrics.update({f"validation/{key}": float(summary[key]) for key in ("nmad", "eta", "bias")})
    return metrics


# --- checkpoints and model folders -----------------------------------------------------------------


def save_checkpoint(
    accelerator: Accelerator,
    settings: TrainingSettings,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainerState,
) -> Path:
    """Write `checkpoints/step_{step}` (aside, then renamed into place), then drop the oldest beyond the limit."""
    folder = Path(settings.output_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
    save_training_state(accelerator, folder, model, optimizer, scheduler, state.state_dict())
    if accelerator.is_main_process and settings.checkpoints_total_limit:
        for old in checkpoint_dirs(settings.output_dir)[: -settings.checkpoints_total_limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return folder


def save_model(
    accelerator: Accelerator,
    model: torch.nn.Module,
    folder: Path,
    settings: TrainingSettings,
    save_function: SaveFunction | None = None,
) -> None:
    """`save_pretrained` (safetensors + config), or `save_function(model, folder)` when given, plus the settings
    YAML, swapped into `folder` at once."""
    state_dict = accelerator.get_state_dict(model)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with replaced_folder(folder) as tmp:
            unwrapped = accelerator.unwrap_model(model)
            if save_function is None:
                unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            else:
                save_function(unwrapped, tmp)
            settings.save(tmp)
    accelerator.wait_for_everyone()


# --- the loop --------------------------------------------------------------------------------------


def use_training_attention(model: torch.nn.Module, device: torch.device) -> None:
    """Train with eager attention on a CPU: torch's sdpa has no fused CPU kernel for attention dropout, and its
    fallback trains slower than eager (benchmarks/train_throughput.py). Elsewhere the model's own choice."""
    if device.type == "cpu":
        model.set_attn_implementation("eager")


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively: on x86, AVX512-BF16 or AMX tiles as torch reports them; on
    other CPUs, or a torch that cannot tell, assumed so (the request stands)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    checks = [
        getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    return any(check is None or check() for check in checks)


def run_precision(requested: str, on_cpu: bool, native_bf16: bool) -> str:
    """The mixed precision a run uses: `requested`, except bf16 on a CPU without native bf16, where autocast is
    emulated and a step took ~10x as long as in float32 (specpt-small, 2-core AVX2 EPYC: 7 s against 0.65 s):
    float32 ("no") there."""
    if requested == "bf16" and on_cpu and not native_bf16:
        return "no"
    return requested


def make_accelerator(settings: TrainingSettings) -> Accelerator:
    """The run's Accelerator; bf16 on a CPU without native bf16 becomes float32 (`run_precision`), in `settings` too."""
    out = Path(settings.output_dir)
    on_cpu = not torch.accelerator.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")
    requested = settings.mixed_precision
    settings.mixed_precision = run_precision(requested, on_cpu, on_cpu and native_cpu_bf16())
    accelerator = Accelerator(
        mixed_precision=settings.mixed_precision,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        log_with=None if settings.report_to == "none" else settings.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        # the training order depends only on (seed, epoch) (`RowGroupWindowSampler`, which `prepare` keeps; a
        # plain shuffle would get accelerate's seedable sampler), so a resumed run sees the same batches
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=settings.seed),
    )
    if settings.mixed_precision != requested:
        logger.warning(
            "mixed_precision %r on a CPU without native bf16 (no AVX512-BF16 / AMX): float32 instead, about 10x "
            "faster here; the run's training_settings.yaml records it",
            requested,
            main_process_only=True,
        )
    return accelerator


def training_dataloaders(settings: TrainingSettings, config: SpecPTConfig) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders; stage 2 keeps the spectra within the model's redshift range."""
    z_range = (config.z_min, config.z_max) if settings.stage == "redshift" else None
    splits = load_training_data(
        settings.data_dir, settings.stage, z_range, settings.max_train_spectra, settings.max_val_spectra
    )
    num_pixels = len(splits["train"][0]["flux"])
    if num_pixels != config.num_pixels:
        raise ValueError(
            f"{settings.data_dir}: spectra have {num_pixels} pixels, the model expects {config.num_pixels}"
        )
    loaders = [
        build_dataloader(
            splits[split], settings.stage, settings.batch_size, train, settings.seed, settings.num_workers
        )
        for split, train in (("train", True), ("validation", False))
    ]
    return loaders[0], loaders[1]


def training_function(
    settings: TrainingSettings,
    model: torch.nn.Module | None = None,
    save_function: SaveFunction | None = None,
) -> TrainingResult:
    """Train one stage as `settings` say; return the trained model and where it was saved.

    Args:
        settings: the run (data, optimisation, checkpoints, output folder).
        model: train this model instead of `build_model(settings)`: e.g. a partially frozen model or a peft
            (LoRA) model of the stage's kind. Only its trainable parameters are optimised; evaluation keeps peft
            adapters active.
        save_function: writes the model folders (`model/`, `best/`) instead of `save_pretrained`, as
            `save_function(unwrapped_model, empty_folder)` (e.g. `specpt_hf.finetune.write_finetuned`).

    Accelerate fixes the mixed precision once per process: runs with different `mixed_precision` need
    separate processes.
    """
    accelerator = make_accelerator(settings)
    out = Path(settings.output_dir)
    set_seed(settings.seed)
    if model is None:
        model = build_model(settings)
    else:
        check_model(model, settings)
    if settings.consistency_renoise and getattr(model.config, "head_type", None) == "paper":
        raise ValueError("setting 'consistency_renoise' needs a p(z) head; head_type 'paper' regresses z")
    use_training_attention(model, accelerator.device)
    train_dl, val_dl = training_dataloaders(settings, model.config)

    optimizer = torch.optim.AdamW(parameter_groups(model, settings), lr=settings.learning_rate)
    # Optimizer steps per epoch on each process (its share of the batches, accumulated).
    steps_per_epoch = math.ceil(
        math.ceil(len(train_dl) / accelerator.num_processes) / accelerator.gradient_accumulation_steps
    )
    max_steps = settings.max_steps or settings.num_epochs * steps_per_epoch
    # The prepared scheduler steps once per process at every optimizer step.
    scheduler = get_scheduler(
        settings.lr_scheduler,
        optimizer,
        num_warmup_steps=settings.warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    model, optimizer, train_dl, val_dl, scheduler = accelerator.prepare(
        model, optimizer, train_dl, val_dl, scheduler
    )
    steps_per_epoch = math.ceil(len(train_dl) / accelerator.gradient_accumulation_steps)  # now exact
    max_steps = settings.max_steps or settings.num_epochs * steps_per_epoch

    state = TrainerState()
    if settings.resume:
        resume_from(accelerator, settings, model, optimizer, scheduler, state)
    if accelerator.is_main_process:
        settings.save(out)
    hparams = {k: v for k, v in settings.to_dict().items() if v is not None}
    hparams["num_processes"] = accelerator.num_processes
    accelerator.init_trackers(settings.stage, config=hparams)

    loop = _Loop(
        accelerator, settings, model, optimizer, scheduler, train_dl, val_dl, state, max_steps, save_function
    )
    stopped_early = loop.run(steps_per_epoch)

    save_model(accelerator, model, out / "model", settings, save_function)
    accelerator.end_training()
    best = out / "best" if settings.stage == "redshift" and (out / "best").is_dir() else None
    logger.info(f"model saved to {out / 'model'}", main_process_only=True)
    final = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    return TrainingResult(
        final,
        out / "model",
        best,
        state.step,
        stopped_early,
        state.history,
        loop.train_seconds,
        loop.steps_run * loop.spectra_per_step / max(loop.train_seconds, 1e-9),
    )


def resume_from(
    accelerator: Accelerator,
    settings: TrainingSettings,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainerState,
) -> Path | None:
    """Load the newest complete checkpoint (model, optimizer, scheduler, RNGs, loop counters) without
    unpickling anything; incomplete checkpoint folders are skipped with a warning."""
    found = newest_checkpoint(settings.output_dir)
    if found is None:
        logger.warning(
            f"--resume: no complete checkpoint in {settings.output_dir}/checkpoints, starting afresh"
        )
        return None
    state.load_state_dict(load_training_state(accelerator, found, model, optimizer, scheduler))
    logger.info(f"resumed from {found}", main_process_only=True)
    return found


def augmentations(settings: TrainingSettings) -> Augmentations:
    """The run's `Augmentations` from its `augment_*` settings."""
    return Augmentations(
        probability=settings.augment_probability,
        calibration=settings.augment_calibration,
        sky_residual=settings.augment_sky_residual,
        masked_span=settings.augment_masked_span,
        renoise=settings.augment_renoise,
        resolution=settings.augment_resolution,
        ebv=settings.augment_ebv,
    )


def pz_consistency(logits: torch.Tensor) -> torch.Tensor:
    """KL(p(z) of each spectrum || p(z) of its copy), batch mean, from the p(z) logits of [spectra; copies]
    [2 batch, bins]; the spectra's p(z) is the fixed target."""
    target, copy = logits.float().chunk(2)  # [batch, bins] each
    return F.kl_div(
        F.log_softmax(copy, dim=-1),
        F.log_softmax(target.detach(), dim=-1),
        log_target=True,
        reduction="batchmean",
    )


class _Loop:
    """The training loop of `training_function`, split into steps small enough to read."""

    def __init__(
        self,
        accelerator: Accelerator,
        settings: TrainingSettings,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        train_dl: DataLoader,
        val_dl: DataLoader,
        state: TrainerState,
        max_steps: int,
        save_function: SaveFunction | None = None,
    ) -> None:
        self.accelerator, self.settings, self.model = accelerator, settings, model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_dl, self.val_dl, self.state, self.max_steps = train_dl, val_dl, state, max_steps
        self.save_function = save_function
        self.spectra_per_step = (
            settings.batch_size * settings.gradient_accumulation_steps * accelerator.num_processes
        )
        # optimizer steps of this run (not before a resume) and their time without validation and saving
        self.steps_run, self.train_seconds, self.other_seconds = 0, 0.0, 0.0
        self.augmentations = augmentations(settings)
        self.wavelength = model_wavelength(accelerator.unwrap_model(model).config)  # [pixels], Angstrom

    def run(self, steps_per_epoch: int) -> bool:
        """Train until `max_steps` or early stopping; return whether it stopped early."""
        state, accum = self.state, self.accelerator.gradient_accumulation_steps
        first_step, started = state.step, time.perf_counter()
        self.model.train()
        self.progress = tqdm(
            total=self.max_steps,
            initial=state.step,
            desc=self.settings.stage,
            unit="step",
            disable=self.settings.disable_tqdm or not self.accelerator.is_local_main_process,
        )
        self._reset_window()
        try:
            for epoch in range(state.step // steps_per_epoch, math.ceil(self.max_steps / steps_per_epoch)):
                self.train_dl.set_epoch(epoch)
                seen = (state.step - epoch * steps_per_epoch) * accum  # batches of this epoch before a resume
                batches = self.accelerator.skip_first_batches(self.train_dl, seen) if seen else self.train_dl
                for batch in batches:
                    if self._train_step(batch) and self._after_step(steps_per_epoch):
                        return True
                    if state.step >= self.max_steps:
                        return False
            return False
        finally:
            self.progress.close()
            self._write_history()
            self.steps_run = state.step - first_step
            self.train_seconds = time.perf_counter() - started - self.other_seconds

    def _after_step(self, steps_per_epoch: int) -> bool:
        """Validate and checkpoint when due (in that order, so a checkpoint holds the latest best);
        True when early stopping says stop."""
        started = time.perf_counter()
        step, eval_steps = self.state.step, self.settings.eval_steps
        due = step % eval_steps == 0 if eval_steps else step % steps_per_epoch == 0
        stop = self._validate() if due or step == self.max_steps else False
        if self.settings.checkpointing_steps and step % self.settings.checkpointing_steps == 0:
            save_checkpoint(
                self.accelerator, self.settings, step, self.model, self.optimizer, self.scheduler, self.state
            )
        elapsed = time.perf_counter() - started
        self.window_start += elapsed  # the throughput counts training time only
        self.other_seconds += elapsed
        return stop

    def _train_step(self, batch: dict[str, torch.Tensor]) -> bool:
        """One forward/backward; True when it completed an optimizer step."""
        accelerator = self.accelerator
        until = self.settings.augment_until_step
        if self.augmentations.enabled and (until is None or self.state.step < until):
            generator = step_generator(self.settings.seed, self.state.step)
            batch = augment(batch, self.wavelength, self.augmentations, generator)
        with accelerator.accumulate(self.model):
            loss = self._loss(batch)
            accelerator.backward(loss)
            if accelerator.sync_gradients and self.settings.max_grad_norm > 0:
                accelerator.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        self.window_loss += loss.detach().float()
        self.window_batches += 1
        if not accelerator.sync_gradients:
            return False
        self.state.step += 1
        self.window_steps += 1
        self.progress.update(1)
        if self.state.step % self.settings.logging_steps == 0 or self.state.step == self.max_steps:
            self._log_training()
        return True

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's loss on `batch`; with `consistency_renoise`, on the batch and its renoised copy together,
        plus the copy's p(z) consistency with the spectrum's."""
        largest = self.settings.consistency_renoise
        if not largest:
            return self.model(**batch).loss
        fainter = Augmentations(
            probability=1.0, renoise=largest
        )  # every spectrum, S/N / f, f ~ U[1, largest]
        generator = step_generator(self.settings.seed, self.state.step, stream=1)
        copy = augment(batch, self.wavelength, fainter, generator)
        paired = {key: torch.cat([batch[key], copy[key]]) for key in batch}  # [2 batch, ...]
        outputs = self.model(**paired)
        return outputs.loss + self.settings.consistency_weight * pz_consistency(outputs.logits)

    def _log_training(self) -> None:
        loss = self.accelerator.reduce(self.window_loss / self.window_batches, reduction="mean").item()
        rate = self.window_steps * self.spectra_per_step / max(time.perf_counter() - self.window_start, 1e-9)
        self._log(
            {
                "train/loss": loss,
                "train/lr": self.scheduler.get_last_lr()[0],
                "train/spectra_per_second": rate,
            }
        )
        self.progress.set_postfix(loss=f"{loss:.4g}", spectra_s=f"{rate:.1f}")
        self._reset_window()

    def _validate(self) -> bool:
        """Validate, keep the best stage-2 model; True when early stopping says stop."""
        settings, state = self.settings, self.state
        metrics = evaluate(self.model, self.val_dl, self.accelerator, settings.stage)
        self._log(metrics)
        self._write_history()
        stop = False
        if settings.stage == "redshift":
            if metrics["validation/nmad"] < state.best_nmad:
                state.best_nmad, state.best_step = metrics["validation/nmad"], state.step
                state.evals_without_improvement = 0
                best = Path(settings.output_dir) / "best"
                save_model(self.accelerator, self.model, best, settings, self.save_function)
            else:
                state.evals_without_improvement += 1
                patience = settings.early_stopping_patience
                stop = patience is not None and state.evals_without_improvement >= patience
            if stop:
                logger.info(
                    f"early stopping at step {state.step}: best NMAD {state.best_nmad:.5f} at step {state.best_step}",
                    main_process_only=True,
                )
        return stop

    def _log(self, metrics: dict[str, float]) -> None:
        self.accelerator.log(metrics, step=self.state.step)
        self.state.history.append({"step": self.state.step, **metrics})

    def _write_history(self) -> None:
        """`training_history.json`: written at each validation and at the end, not at every log line."""
        if self.accelerator.is_main_process:
            path = Path(self.settings.output_dir) / HISTORY_NAME
            atomic_write_json(path, self.state.history, indent=1)

    def _reset_window(self) -> None:
        self.window_loss = torch.zeros((), device=self.accelerator.device)
        self.window_batches, self.window_steps = 0, 0
        self.window_start = time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    """`specpt train`: parse the settings, run `training_function`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = argparse.ArgumentParser(add_help=False)
    add_debug_flag(debug)
    return run_reporting_errors("train", lambda: _run(argv), debug.parse_known_args(argv)[0].debug)


def _run(argv: list[str]) -> int:
    settings = parse_settings(
        argv,
        prog="specpt train",
        description="Pretrain the SpecPT autoencoder (stage 1) or train the redshift model (stage 2).",
    )
    result = training_function(settings)
    print(
        f"model saved to {result.model_dir}"
        + (f" (best validation NMAD: {result.best_dir})" if result.best_dir else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
