"""The saved model folder `specpt push` publishes, checked before anything is written: a SpecPT config.json that
loads, safetensors weights with exactly the tensors its model has, and the optional training settings."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open

from ..configuration_specpt import SpecPTConfig, SpecPTForRedshiftConfig
from ..modeling_specpt import (
    SpecPTForRedshift,
    SpecPTForSpectrumReconstruction,
    SpecPTModel,
    SpecPTPreTrainedModel,
)

SETTINGS_NAME = "training_settings.yaml"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
FOREIGN_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
CONFIG_CLASSES: dict[str, type[SpecPTConfig]] = {
    SpecPTConfig.model_type: SpecPTConfig,
    SpecPTForRedshiftConfig.model_type: SpecPTForRedshiftConfig,
}
MODEL_CLASSES: dict[str, type[SpecPTPreTrainedModel]] = {
    cls.__name__: cls for cls in (SpecPTForRedshift, SpecPTForSpectrumReconstruction, SpecPTModel)
}
DEFAULT_ARCHITECTURE = {
    SpecPTConfig.model_type: "SpecPTForSpectrumReconstruction",
    SpecPTForRedshiftConfig.model_type: "SpecPTForRedshift",
}


class ModelFolderError(ValueError):
    """The model folder cannot be published as it is (missing or foreign weights, a foreign config)."""


@dataclass
class ModelFolder:
    """A checked SpecPT model folder: its config (as saved and as a config object) and weight files."""

    path: Path
    config_dict: dict[str, Any]
    config: SpecPTConfig
    architecture: str
    weight_files: list[Path]
    num_parameters: int


def empty_model(config: SpecPTConfig, architecture: str) -> SpecPTPreTrainedModel:
    """The `architecture` model of `config` on the meta device: its class and tensor shapes, no memory."""
    with torch.device("meta"):
        return MODEL_CLASSES[architecture](config)


def _read_config_dict(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelFolderError(
            f"{config_file}: missing; not a saved model folder (save_pretrained writes it)"
        )
    try:
        config_dict = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFolderError(f"{config_file}: not valid JSON ({err})") from None
    if not isinstance(config_dict, dict):
        raise ModelFolderError(f"{config_file}: expected a JSON object")
    model_type = config_dict.get("model_type")
    if model_type not in CONFIG_CLASSES:
        raise ModelFolderError(
            f"{config_file}: model_type {model_type!r} is not a SpecPT model "
            f"(expected one of {sorted(CONFIG_CLASSES)})"
        )
    return config_dict


def _weight_files(path: Path) -> list[Path]:
    index = path / WEIGHTS_INDEX_NAME
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ModelFolderError(f"{index}: not a safetensors index ({err!r})") from None
        missing = [name for name in shards if not (path / name).is_file()]
        if missing:
            raise ModelFolderError(f"{index}: shard(s) {missing} are missing from {path}")
        return [index] + [path / name for name in shards]
    foreign = [name for name in FOREIGN_WEIGHTS if (path / name).exists()]
    foreign += sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if foreign:
        raise ModelFolderError(
            f"{path / foreign[0]}: weights are not in safetensors format; SpecPT repos ship {WEIGHTS_NAME} only "
            "(load the model and call save_pretrained(folder) to convert)"
        )
    raise ModelFolderError(f"{path / WEIGHTS_NAME}: missing; the model folder {path} has no weights")


def _checkpoint_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        if file.name == WEIGHTS_INDEX_NAME:
            continue
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelFolderError(f"{file}: not a readable safetensors file ({err})") from None
    return shapes


def _key_summary(keys: Iterable[str], limit: int = 6) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def check_model_folder(model_dir: str | os.PathLike) -> ModelFolder:
    """Check that `model_dir` is a publishable SpecPT folder: a SpecPT config.json that loads, safetensors
    weights, and exactly the tensors (names and shapes) that the config's model has. Raises `ModelFolderError`
    naming the file at fault."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelFolderError(f"{path}: not a folder")
    config_dict = _read_config_dict(path)
    try:
        config = CONFIG_CLASSES[config_dict["model_type"]].from_pretrained(path)
    except (ValueError, TypeError, OSError) as err:
        raise ModelFolderError(f"{path / 'config.json'}: {err}") from None
    architecture = (config_dict.get("architectures") or [DEFAULT_ARCHITECTURE[config.model_type]])[0]
    if architecture not in MODEL_CLASSES:
        raise ModelFolderError(
            f"{path / 'config.json'}: architecture {architecture!r} is not one of {sorted(MODEL_CLASSES)}"
        )
    files = _weight_files(path)
    shapes = _checkpoint_shapes(files)
    expected = {key: tuple(t.shape) for key, t in empty_model(config, architecture).state_dict().items()}
    where = files[0]
    missing, unexpected = set(expected) - set(shapes), set(shapes) - set(expected)
    if missing:
        raise ModelFolderError(f"{where}: lacks tensors that {architecture} needs: {_key_summary(missing)}")
    if unexpected:
        raise ModelFolderError(
            f"{where}: has tensors that {architecture} does not use: {_key_summary(unexpected)}"
        )
    wrong = {key for key in expected if expected[key] != shapes[key]}
    if wrong:
        key = sorted(wrong)[0]
        raise ModelFolderError(
            f"{where}: {len(wrong)} tensor(s) have shapes that do not match config.json, e.g. {key}: "
            f"{list(shapes[key])} in the file, {list(expected[key])} from the config"
        )
    num_parameters = sum(int(torch.Size(shape).numel()) for shape in shapes.values())
    return ModelFolder(path, config_dict, config, architecture, files, num_parameters)


def read_training_settings(folder: ModelFolder) -> dict[str, Any] | None:
    """The folder's `training_settings.yaml` as a mapping, or None when it has none."""
    file = folder.path / SETTINGS_NAME
    if not file.is_file():
        return None
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ModelFolderError(f"{file}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{file}: expected a mapping of settings")
    return data


def templates_file(folder: ModelFolder, key: str = "templates") -> Path | None:
    """The file of rest-frame sets that config.json's `key` entry describes (`templates`: the refinement's
    templates; `archetypes`), or None when it describes none."""
    name = (folder.config_dict.get(key) or {}).get("file")
    if not name:
        return None
    if not (folder.path / name).is_file():
        raise ModelFolderError(
            f"{folder.path / name}: missing, but config.json describes {key} in it (rebuild it with `specpt {key}`)"
        )
    return folder.path / name
