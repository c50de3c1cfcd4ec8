"""The complete Hub repo folder of a SpecPT model, written in one piece.

It holds the checked weights and, when the model folder has them, `templates.safetensors`, `archetypes.safetensors` and
`training_settings.yaml` (all copied byte for byte); `config.json` as saved, with `auto_map` and, for a redshift
model, `custom_pipelines` and the pipeline's `preprocessor_config.json` (its feature extractor, with its own
`auto_map`); the code `trust_remote_code` needs; and the `README.md` card. The code is saved the
way `save_pretrained` saves it: transformers' `custom_object_save` copies the module of each class registered for
an auto class (`configuration_specpt.py`, `modeling_specpt.py`) and of the pipeline class (`pipeline_specpt.py`),
with every module they import relatively (`refinement.py`, `resampling.py`, ...), from the installed `specpt_hf`
whose classes checked the weights.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import transformers
from transformers.dynamic_module_utils import custom_object_save
from transformers.pipelines import PIPELINE_REGISTRY

from ..atomic import FILE_MODE, replaced_folder
from ..configuration_specpt import SpecPTForRedshiftConfig
from ..evaluation.results import read_results_json
from ..pipeline_specpt import SpecPTFeatureExtractor, SpecPTRedshiftPipeline
from .card import render_model_card
from .model_folder import (
    SETTINGS_NAME,
    ModelFolder,
    ModelFolderError,
    check_model_folder,
    empty_model,
    read_training_settings,
    templates_file,
)
from .repo_id import check_repo_id

logger = logging.getLogger(__name__)


def custom_pipelines() -> dict[str, dict[str, Any]]:
    """The `custom_pipelines` entry of config.json: each task registered with `SpecPTRedshiftPipeline` in the
    transformers pipeline registry, with classes named as `Pipeline.save_pretrained` names them."""
    module = SpecPTRedshiftPipeline.__module__.split(".")[-1]
    pipelines = {}
    for task, info in PIPELINE_REGISTRY.supported_tasks.items():
        if info["impl"] is not SpecPTRedshiftPipeline:
            continue
        # names resolved with getattr(transformers, name) by `pipeline(..., trust_remote_code=True)`
        pt = {cls.__name__ if hasattr(transformers, cls.__name__) else "AutoModel" for cls in info["pt"]}
        pipelines[task] = {
            "impl": f"{module}.{SpecPTRedshiftPipeline.__name__}",
            "pt": sorted(pt) or ["AutoModel"],
        }
        if "type" in info:
            pipelines[task]["type"] = info["type"]
    return pipelines


def save_remote_code(folder: ModelFolder, out: Path, config: dict[str, Any], with_pipeline: bool) -> None:
    """Copy the code files of the config and model classes (and of the pipeline class) into `out`, with the
    modules they import relatively, and fill `config["auto_map"]`, as `save_pretrained` does."""
    for obj in (folder.config, empty_model(folder.config, folder.architecture)):
        if obj._auto_class is not None:  # a bare SpecPTModel has no Auto class
            custom_object_save(obj, out, config=config)
    if with_pipeline:
        custom_object_save(SpecPTRedshiftPipeline, out)  # uses the class's module only


def write_repo_folder(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    results_json: str | os.PathLike | None = None,
    *,
    repo_id: str,
    template: str | os.PathLike | None = None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the complete Hub repo folder of the model in `model_dir` to `out_dir`; return `out_dir`.

    Checks the model folder first (`check_model_folder`). `results_json` is a file from `specpt evaluate`
    (`write_results_json`); `base_model` (the autoencoder's repo id) and `datasets` (Hub dataset ids) go into the
    card's metadata. The folder is built in a temporary folder beside `out_dir` and renamed into place;
    an existing `out_dir` is replaced only with `overwrite=True`.
    """
    repo_id = check_repo_id(repo_id)
    folder = check_model_folder(model_dir)
    is_redshift_model = isinstance(folder.config, SpecPTForRedshiftConfig)
    results = read_results_json(results_json) if results_json is not None else None
    if results is not None and not is_redshift_model:
        raise ModelFolderError(
            f"{folder.path}: holds a {folder.config.model_type!r} model, not a "
            f"{SpecPTForRedshiftConfig.model_type!r} one; the redshift results of {results_json} belong on a "
            "redshift model's card"
        )
    settings = read_training_settings(folder)
    extras = [
        templates_file(folder),
        templates_file(folder, "archetypes"),
        folder.path / SETTINGS_NAME if settings is not None else None,
    ]
    copied = folder.weight_files + [file for file in extras if file is not None]
    config = {"architectures": [folder.architecture], **copy.deepcopy(folder.config_dict)}
    pipelines = custom_pipelines() if is_redshift_model else {}
    if pipelines:
        config["custom_pipelines"] = pipelines
    card = render_model_card(
        folder,
        repo_id,
        results,
        settings,
        template,
        bool(pipelines),
        base_model=base_model,
        datasets=datasets,
    )

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite=True / --overwrite to replace it)")
    with replaced_folder(out) as tmp:
        for file in copied:
            shutil.copy2(file, tmp / file.name)
        save_remote_code(folder, tmp, config, bool(pipelines))
        if pipelines:  # the pipeline's feature extractor: AutoFeatureExtractor loads it from the repo
            SpecPTFeatureExtractor.from_model_config(folder.config).save_pretrained(tmp)
        (tmp / "config.json").write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        card.save(tmp / "README.md")
        for file in tmp.iterdir():
            os.chmod(file, FILE_MODE)
    logger.info("wrote repo folder %s for %s", out, repo_id)
    return out
