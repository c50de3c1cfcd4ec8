"""Loading SpecPT models by local folder, Hub repo id or short name, with clear errors before any weights are read.

>>> from specpt_hf.loading import load_model
>>> model = load_model("specpt-desi")            # a short name (`SHORT_NAMES`), a repo id or a folder

Shipped with the pipeline as remote code: it imports only huggingface_hub, safetensors, transformers and the
model files next to it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from huggingface_hub import is_offline_mode
from safetensors import SafetensorError, safe_open
from transformers import PretrainedConfig

from .configuration_specpt import SpecPTConfig, SpecPTForRedshiftConfig
from .modeling_specpt import SpecPTForRedshift, SpecPTForSpectrumReconstruction

# Short model names -> Hub repo ids. `specpt-desi`: the redshift model trained on DESI EDR spectra;
# `specpt-desi-autoencoder`: the pretrained autoencoder it starts from (also gives the anomaly score).
SHORT_NAMES: dict[str, str] = {
    "specpt-desi": "specpt/specpt-desi",
    "specpt-desi-autoencoder": "specpt/specpt-desi-autoencoder",
}
MODEL_TYPES = {"redshift": SpecPTForRedshiftConfig.model_type, "autoencoder": SpecPTConfig.model_type}


def resolve_model_name(name_or_path: str | os.PathLike) -> str:
    """A local folder as is, a short name (`SHORT_NAMES`) as its repo id, anything else unchanged."""
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        return name
    return SHORT_NAMES.get(name, name)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")


def _unavailable(name: str, repo: str, error: Exception) -> OSError:
    where = f"{name!r} (Hub repo {repo!r})" if name != repo else repr(repo)
    if is_offline_mode():
        return OSError(
            f"{where} is neither a local folder nor in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids "
            f"downloading it: download it once with network access (unset HF_HUB_OFFLINE, e.g. `hf download {repo}`), "
            "or pass the path of a local model folder"
        )
    return OSError(
        f"cannot load {where}: it is not a local folder and the Hub refused or could not be reached ({error}). "
        "Check the name, the network and HF_ENDPOINT, or pass the path of a local model folder"
    )


def _check_weights(folder: Path) -> None:
    """OSError naming the file when a local folder's safetensors weights are truncated or not safetensors."""
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError, ValueError) as error:  # broken header or buffer
            raise OSError(
                f"{path}: not a readable safetensors file ({error}); it is truncated or corrupt: copy or "
                "download the model folder again"
            ) from None


def check_model_source(
    name_or_path: str | os.PathLike, task: str | None = None, **hub_kwargs: Any
) -> tuple[str, str]:
    """(folder or repo id, model_type) of a SpecPT model, checked before any weights are read.

    Raises:
        FileNotFoundError: a path that does not exist.
        OSError: a model that cannot be fetched (offline: says to download it or pass a folder), or a folder
            without weights or with broken ones.
        ValueError: a folder holding another kind of model (foreign `model_type`, or the other SpecPT task).
    """
    if task is not None and task not in MODEL_TYPES:
        raise ValueError(f"`task` must be one of {tuple(MODEL_TYPES)} or None, got {task!r}")
    name = os.fspath(name_or_path)
    repo = resolve_model_name(name)
    local = os.path.isdir(repo)
    if not local and _looks_like_path(name):
        raise FileNotFoundError(f"{name}: no such model folder")
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(repo, **hub_kwargs)
    except OSError as error:
        if local:
            raise OSError(f"{repo}: not a model folder (no readable config.json: {error})") from error
        raise _unavailable(name, repo, error) from error
    model_type = config_dict.get("model_type")
    if model_type not in MODEL_TYPES.values():
        raise ValueError(
            f"{name}: config.json has model_type {model_type!r}, not a SpecPT model {tuple(MODEL_TYPES.values())}"
        )
    if task is not None and model_type != MODEL_TYPES[task]:
        other = "autoencoder" if task == "redshift" else "redshift"
        raise ValueError(
            f"{name}: holds a SpecPT {other} model (model_type {model_type!r}), not a {task} model"
        )
    if local and not any(
        os.path.isfile(os.path.join(repo, f)) for f in ("model.safetensors", "model.safetensors.index.json")
    ):
        raise OSError(f"{repo}: no model.safetensors; the model folder is incomplete")
    if local:
        _check_weights(Path(repo))
    return repo, model_type


def load_model(
    name_or_path: str | os.PathLike, task: str | None = None, **kwargs: Any
) -> SpecPTForRedshift | SpecPTForSpectrumReconstruction:
    """Load a SpecPT model from a local folder, a Hub repo id or a short name, in eval mode.

    Args:
        name_or_path: folder, repo id, or a key of `SHORT_NAMES` (`specpt-desi`, `specpt-desi-autoencoder`).
        task: `"redshift"` or `"autoencoder"` to insist on that kind of model; None takes what the folder holds.
        kwargs: passed to `from_pretrained` (`revision`, `cache_dir`, `token`, `local_files_only`, `dtype`, ...).

    Raises:
        The errors of `check_model_source`.
    """
    name = os.fspath(name_or_path)
    hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
    repo, model_type = check_model_source(name, task, **hub_kwargs)
    local = os.path.isdir(repo)
    cls = SpecPTForRedshift if model_type == MODEL_TYPES["redshift"] else SpecPTForSpectrumReconstruction
    try:
        model = cls.from_pretrained(repo, **kwargs)
    except OSError as error:
        if local:
            raise
        raise _unavailable(name, repo, error) from error
    return model.eval()
