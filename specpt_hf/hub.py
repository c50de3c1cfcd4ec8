"""`specpt push`: turn a trained SpecPT model folder into a complete Hub repo folder, then upload it.

    specpt push runs/redshift/best --repo-id my-org/specpt-desi --results eval/results.json
    specpt push runs/redshift/best --repo-id my-org/specpt-desi --dry-run --out hub/specpt-desi

The repo folder holds `config.json` (with `auto_map`, and `custom_pipelines` when the package has the
`spectrum-redshift` pipeline), `model.safetensors`, the code files `trust_remote_code` needs, the pipeline file,
`training_settings.yaml` when the model folder has one, and a `README.md` model card made from the template
`MODEL_CARD.md`: its YAML front matter gains a `model-index` (NMAD and η per class, from the results JSON of
`specpt evaluate`), and the blocks between `<!-- specpt:NAME -->` and `<!-- /specpt:NAME -->` are filled from
the config, the weights, the training settings and the results. The folder is written to a temporary folder
next to its destination and renamed into place, so it is either complete or absent.

The upload uses `huggingface_hub` (`HfApi.create_repo(exist_ok=True)` + `upload_folder`) against
`HF_ENDPOINT` (or `--endpoint`) with the token from `HF_TOKEN` or `hf auth login`. The token is never
printed, logged or written.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from huggingface_hub import CommitInfo, HfApi, ModelCard
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from safetensors import SafetensorError, safe_open
from transformers.dynamic_module_utils import get_relative_imports
from transformers.pipelines import PIPELINE_REGISTRY

from .atomic import FILE_MODE, replaced_folder
from .cli import add_debug_flag, run_reporting_errors
from .configuration_specpt import SpecPTConfig, SpecPTForRedshiftConfig
from .evaluation.results import CLASS_NAMES, METRIC_NAMES, eval_results, read_results_json
from .modeling_specpt import (
    SpecPTForRedshift,
    SpecPTForSpectrumReconstruction,
    SpecPTModel,
    SpecPTPreTrainedModel,
    num_tokens,
)

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
CARD_TEMPLATE = PACKAGE_DIR / "MODEL_CARD.md"  # a link to the top-level MODEL_CARD.md, copied into wheels
CARD_TEMPLATE_ENV = "SPECPT_MODEL_CARD"
PIPELINE_MODULE = "pipeline_specpt"
SETTINGS_NAME = "training_settings.yaml"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
FOREIGN_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
DEFAULT_COMMIT_MESSAGE = "Upload SpecPT model"
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
# training settings that describe the run (paths, workers and logging are left out of the card)
CARD_SETTINGS = (
    "stage",
    "preset",
    "freeze_encoder",
    "max_train_spectra",
    "batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "encoder_learning_rate",
    "weight_decay",
    "lr_scheduler",
    "warmup_steps",
    "max_steps",
    "num_epochs",
    "max_grad_norm",
    "mixed_precision",
    "early_stopping_patience",
    "seed",
)


class ModelFolderError(ValueError):
    """The model folder cannot be published as it is (missing or foreign weights, a foreign config)."""


class HubError(OSError):
    """The Hub could not be reached or refused the request."""


class HubUnreachableError(HubError):
    """No answer from the Hub endpoint (connection refused, DNS, timeout, offline mode)."""


class HubRefusedError(HubError):
    """The Hub answered with an HTTP error."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


# ---------------------------------------------------------------------------------------------- model folder


@dataclass
class ModelFolder:
    """A checked SpecPT model folder: its config (as saved and as a config object) and weight files."""

    path: Path
    config_dict: dict[str, Any]
    config: SpecPTConfig
    architecture: str
    weight_files: list[Path]
    num_parameters: int


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
    with torch.device("meta"):
        expected = {
            key: tuple(t.shape) for key, t in MODEL_CLASSES[architecture](config).state_dict().items()
        }
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


# ---------------------------------------------------------------------------------------------- code files


def _code_source(module: str, model_dir: Path) -> Path:
    """`module`.py from the model folder (it travels with the weights) or else from this package."""
    for folder in (model_dir, PACKAGE_DIR):
        if (folder / f"{module}.py").is_file():
            return folder / f"{module}.py"
    raise ModelFolderError(f"{model_dir / (module + '.py')}: code file missing here and in {PACKAGE_DIR}")


def code_files(modules: Iterable[str], model_dir: Path) -> dict[str, Path]:
    """File name -> source for `modules` and every module they import relatively (`from .x import y`)."""
    files: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        module = todo.pop()
        if f"{module}.py" in files:
            continue
        source = _code_source(module, model_dir)
        files[f"{module}.py"] = source
        todo.extend(name.split(".")[0] for name in get_relative_imports(str(source)))
    return files


def pipeline_info() -> dict[str, dict[str, Any]]:
    """The `custom_pipelines` entry for config.json when the package ships `pipeline_specpt.py`, read from the
    transformers pipeline registry the module registers with; empty when there is no pipeline."""
    if not (PACKAGE_DIR / f"{PIPELINE_MODULE}.py").is_file():
        return {}
    module_name = f"{__package__}.{PIPELINE_MODULE}"
    importlib.import_module(module_name)
    tasks = {}
    for task, info in PIPELINE_REGISTRY.supported_tasks.items():
        impl = info.get("impl")
        if getattr(impl, "__module__", None) != module_name:
            continue
        # names resolved with getattr(transformers, name) by `pipeline(..., trust_remote_code=True)`
        pt = [
            cls.__name__ if hasattr(transformers, cls.__name__) else "AutoModel" for cls in info.get("pt", ())
        ]
        entry = {"impl": f"{PIPELINE_MODULE}.{impl.__name__}", "pt": sorted(set(pt)) or ["AutoModel"]}
        if "type" in info:
            entry["type"] = info["type"]
        tasks[task] = entry
    return tasks


def short_names() -> dict[str, str]:
    """Short model names (`specpt-desi`, ...) -> repo ids, from the loading module when the package has it."""
    try:
        module = importlib.import_module(f"{__package__}.loading")
    except ImportError:
        return {}
    return dict(getattr(module, "SHORT_NAMES", {}))


def repo_config(folder: ModelFolder, pipelines: Mapping[str, Any]) -> dict[str, Any]:
    """config.json of the repo: the saved one, with `auto_map` (and `custom_pipelines`) filled in."""
    config = dict(folder.config_dict)
    config.setdefault("architectures", [folder.architecture])
    config.setdefault(
        "auto_map",
        {
            "AutoConfig": f"configuration_specpt.{type(folder.config).__name__}",
            "AutoModel": f"modeling_specpt.{folder.architecture}",
        },
    )
    if pipelines and folder.config.model_type == SpecPTForRedshiftConfig.model_type:
        config["custom_pipelines"] = dict(pipelines)
    return config


# ---------------------------------------------------------------------------------------------- model card


def _replace_block(text: str, name: str, content: str | None) -> str:
    """Put `content` between `<!-- specpt:name -->` and `<!-- /specpt:name -->`, or remove the block and its
    markers when `content` is None (text without the block is left as is)."""
    pattern = re.compile(rf"(<!-- specpt:{name} -->\n).*?(\n<!-- /specpt:{name} -->)(\n?)", re.DOTALL)
    if content is None:
        return pattern.sub("", text)
    return pattern.sub(lambda m: m.group(1) + content.strip("\n") + m.group(2) + m.group(3), text)


def _format_value(value: float, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def results_block(results: Mapping[str, Any] | None) -> str:
    """The results table (per class, then per redshift bin) and how the numbers were measured."""
    if not results:
        return (
            "No evaluation results were given when this card was written "
            "(`specpt push --results results.json` fills this section)."
        )
    dataset = results.get("dataset", {})
    lines = [
        f"Measured with `specpt evaluate` on the `{dataset.get('split', 'test')}` split of "
        f"{dataset.get('name', 'the evaluation data')} (`{dataset.get('type', '?')}`); truth = the catalog "
        f"redshift (Redrock for DESI data). Δz = (z_pred − z_true)/(1 + z_true); NMAD = 1.48·median(|Δz|); "
        "centred NMAD = 1.48·median(|Δz − median Δz|); "
        f"η = fraction with |Δz| > {results.get('catastrophic_threshold', 0.15):g}; bias = median(Δz); "
        "σ68 = half the 16–84 % range of Δz.",
        "",
        "| class | spectra | NMAD | centred NMAD | η (%) | bias | σ68 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for group, values in results["metrics"].items():
        if not isinstance(values, Mapping) or not values.get("n"):
            continue
        lines.append(
            f"| {CLASS_NAMES.get(str(group).lower(), group)} | {values['n']} | "
            f"{_format_value(values.get('nmad'))} | {_format_value(values.get('nmad_centred'))} | "
            f"{_percent(values.get('eta'))} | {_format_value(values.get('bias'), 3)} | "
            f"{_format_value(values.get('sigma68'))} |"
        )
    bins = results.get("by_redshift_bin")  # [{z_min, z_max, n, nmad, eta, ...}] from `specpt evaluate`
    if isinstance(bins, Mapping):
        bins = [{"label": label, **values} for label, values in bins.items() if isinstance(values, Mapping)]
    rows = [b for b in bins or [] if isinstance(b, Mapping) and b.get("n")]
    if rows:
        lines += ["", "| true z | spectra | NMAD | η (%) |", "| --- | ---: | ---: | ---: |"]
        for values in rows:
            label = values.get("label") or f"{values.get('z_min', '?'):g}–{values.get('z_max', '?'):g}"
            lines.append(
                f"| {label} | {values['n']} | {_format_value(values.get('nmad'))} | {_percent(values.get('eta'))} |"
            )
    return "\n".join(lines)


def details_block(folder: ModelFolder, repo_id: str, settings: Mapping[str, Any] | None) -> str:
    """A table of what the checkpoint is: class, layout, size, grid, normalisation, redshift head."""
    config = folder.config
    rows = [
        ("repo", f"`{repo_id}`"),
        ("class", f"`{folder.architecture}` (`model_type` `{config.model_type}`)"),
        ("preset", f"`{settings['preset']}`" if settings and settings.get("preset") else "—"),
        ("layout", f"`{config.layout}`"),
        ("parameters", f"{folder.num_parameters:,}"),
        ("tokens per spectrum", f"{num_tokens(config)}"),
        ("transformer", f"{config.num_layers} layers, d_model {config.d_model}, {config.num_heads} heads"),
        (
            "input grid",
            f"{config.num_pixels} pixels, {config.wavelength_start:g}–{config.wavelength_end:g} Å, "
            f"step {config.wavelength_step:g} Å (vacuum)",
        ),
        ("normalisation", f"`{config.normalization}` (the model divides each spectrum by it)"),
    ]
    if isinstance(config, SpecPTForRedshiftConfig):
        head = f"`{config.head_type}`"
        if config.head_type == "pz":
            head += f", {config.num_redshift_bins} p(z) bins uniform in ln(1+z)"
        rows += [("redshift head", head), ("redshift range", f"{config.z_min:g} ≤ z ≤ {config.z_max:g}")]
    return "\n".join(["| | |", "| --- | --- |", *(f"| {key} | {value} |" for key, value in rows)])


def usage_block(folder: ModelFolder, repo_id: str, has_pipeline: bool) -> str:
    """How to load and run this checkpoint."""
    if not isinstance(folder.config, SpecPTForRedshiftConfig):
        return f"""```python
from specpt_hf import SpecPTForSpectrumReconstruction, SpecPTForRedshift

autoencoder = SpecPTForSpectrumReconstruction.from_pretrained("{repo_id}")
out = autoencoder(flux=flux, ivar=ivar, mask=mask)      # [batch, {folder.config.num_pixels}] each; mask True = bad
model_flux = out.reconstruction * out.scale[:, None]     # back to flux units

# start a redshift model from this encoder (the head is initialised, the encoder loaded)
model = SpecPTForRedshift.from_pretrained("{repo_id}", z_max=1.7)
```

Without `specpt_hf` installed: `transformers.AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)`."""
    pipeline = (
        f"""
from transformers import pipeline

estimator = pipeline("spectrum-redshift", model="{repo_id}", trust_remote_code=True)
estimator("coadd-sv3-dark-26065.fits")  # DESI coadd, (wave, flux, ivar) or a specutils Spectrum
"""
        if has_pipeline
        else ""
    )
    short = [name for name, repo in short_names().items() if repo == repo_id]
    short_note = (
        f"\n\nWith `specpt_hf` installed, the short name `{short[0]}` works too "
        f"(`specpt_hf.load_model`, `specpt_hf.load_pipeline`, `specpt predict --model {short[0]}`)."
        if short
        else ""
    )
    return f"""```python
from specpt_hf import SpecPTForRedshift

model = SpecPTForRedshift.from_pretrained("{repo_id}").eval()
out = model(flux=flux, ivar=ivar, mask=mask)  # [batch, {folder.config.num_pixels}] each; mask True = bad
out.redshift, out.redshift_err, out.quality  # [batch] each
z_grid, p_z = model.redshift_pdf(out.logits)  # the full p(z)

# without specpt_hf installed
from transformers import AutoModel

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)
{pipeline}```

A redshift catalog in the Redrock style from many DESI coadd files:

```bash
specpt predict coadd-*.fits --model {repo_id} --out catalog.fits
```{short_note}"""


def training_block(settings: Mapping[str, Any] | None) -> str:
    if not settings:
        return "The model folder held no `training_settings.yaml`."
    skip = {"num_epochs"} if settings.get("max_steps") is not None else set()  # max_steps overrides it
    rows = [
        (key, settings[key]) for key in CARD_SETTINGS if settings.get(key) is not None and key not in skip
    ]
    table = "\n".join(["| setting | value |", "| --- | --- |", *(f"| `{k}` | `{v}` |" for k, v in rows)])
    return f"{table}\n\nThe full settings of the run are in [`{SETTINGS_NAME}`]({SETTINGS_NAME})."


def header_block(folder: ModelFolder, repo_id: str, base_model: str | None = None) -> str:
    """Title and one paragraph: what the model does and what it was trained from."""
    kind = (
        "measures spectroscopic redshifts of galaxy and quasar spectra, with an uncertainty and a quality score"
        if isinstance(folder.config, SpecPTForRedshiftConfig)
        else "rebuilds galaxy spectra from a compact embedding (the pretrained SpecPT encoder)"
    )
    text = f"`{repo_id}` is a SpecPT model ({folder.architecture}) that {kind}."
    if base_model:
        text += (
            f" It was trained from the pretrained autoencoder [`{base_model}`](https://huggingface.co/{base_model}), "
            "which also gives an anomaly score (how badly a spectrum is rebuilt)."
        )
    return f"# {repo_id.split('/')[-1]}\n\n{text}"


def layout_block(config: SpecPTConfig) -> str:
    """What the layout of this checkpoint does with a spectrum."""
    if config.layout == "paper":
        return (
            "**Layout `paper`.** The published SpecPT structure: a stack of strided convolutions and a max-pool, "
            "flattened and projected to one token per spectrum, a transformer encoder (and, in the autoencoder, a "
            "decoder and two dense layers back to the pixels). Its redshift head's attention acts within one "
            "spectrum (defect 2 below is fixed); the other defects are kept, for comparison with the paper."
        )
    return (
        f"**Layout `tokens`.** A convolutional stem cuts the spectrum into wavelength tokens of {config.patch_size} "
        "pixels, each with features of its central wavelength; a transformer encoder attends across the tokens; "
        "bad pixels (`mask` True or `ivar == 0`) are zeroed before anything sees them and tokens without a good "
        "pixel are ignored by attention; each spectrum is pooled on its own."
    )


def _template_path(template: str | os.PathLike | None) -> Path:
    path = Path(template or os.environ.get(CARD_TEMPLATE_ENV) or CARD_TEMPLATE)
    if not path.is_file():
        raise FileNotFoundError(
            f"model card template not found: {path} (pass `template=` / --card-template, or set {CARD_TEMPLATE_ENV})"
        )
    return path


def render_model_card(
    folder: ModelFolder,
    repo_id: str,
    results: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    template: str | os.PathLike | None = None,
    has_pipeline: bool = False,
    base_model: str | None = None,
    datasets: list[str] | None = None,
) -> ModelCard:
    """The README.md card of `repo_id`: the template's front matter with `model-index` from `results` (a results
    JSON as read by `read_results_json`), `base_model` and `datasets` (Hub ids) when given, and its `specpt:*`
    blocks filled in."""
    path = _template_path(template)
    card = ModelCard(path.read_text(encoding="utf-8"), ignore_metadata_errors=False)
    card.data.base_model = _check_repo_id(base_model) if base_model else None
    if datasets:
        card.data.datasets = list(datasets)
    if results:
        dataset = results.get("dataset", {})
        entries = eval_results(
            results["metrics"],
            dataset_name=dataset.get("name", "evaluation data"),
            dataset_type=dataset.get("type", "unknown"),
            dataset_config=dataset.get("config"),
            dataset_split=dataset.get("split"),
            dataset_revision=dataset.get("revision"),
            metrics=tuple(name for name in ("nmad", "nmad_centred", "eta") if name in METRIC_NAMES),
            catastrophic_threshold=results.get("catastrophic_threshold", 0.15),
        )
        if not entries:
            raise ValueError("the results hold no finite NMAD or η value to put in the model card")
        card.data.model_name = repo_id.split("/")[-1]
        card.data.eval_results = entries
    else:
        card.data.model_name, card.data.eval_results = None, None
    text = _replace_block(card.text, "note", None)
    text = _replace_block(text, "header", header_block(folder, repo_id, base_model))
    text = _replace_block(text, "details", details_block(folder, repo_id, settings))
    text = _replace_block(text, "layout", layout_block(folder.config))
    text = _replace_block(text, "results", results_block(results))
    text = _replace_block(text, "usage", usage_block(folder, repo_id, has_pipeline))
    text = _replace_block(text, "training", training_block(settings))
    card.text = text
    return ModelCard(str(card), ignore_metadata_errors=False)  # re-parse: what is written is what was checked


# ---------------------------------------------------------------------------------------------- repo folder


def _read_settings(path: Path) -> dict[str, Any] | None:
    file = path / SETTINGS_NAME
    if not file.is_file():
        return None
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ModelFolderError(f"{file}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{file}: expected a mapping of settings")
    return data


def _check_repo_id(repo_id: str) -> str:
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id or "") or ".." in repo_id or "--" in repo_id:
        raise ValueError(f"repo id must look like ORG/NAME (letters, digits, '-', '_', '.'), got {repo_id!r}")
    return repo_id


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
    repo_id = _check_repo_id(repo_id)
    folder = check_model_folder(model_dir)
    results = read_results_json(results_json) if results_json is not None else None
    if results is not None and folder.config.model_type != SpecPTForRedshiftConfig.model_type:
        raise ModelFolderError(
            f"{folder.path}: holds a {folder.config.model_type!r} model, not a "
            f"{SpecPTForRedshiftConfig.model_type!r} one; the redshift results of {results_json} belong on a "
            "redshift model's card"
        )
    settings = _read_settings(folder.path)
    pipelines = pipeline_info() if folder.config.model_type == SpecPTForRedshiftConfig.model_type else {}
    config = repo_config(folder, pipelines)
    modules = {value.split(".")[0] for value in config["auto_map"].values()}
    modules |= {entry["impl"].split(".")[0] for entry in pipelines.values()}
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
        for file in folder.weight_files:
            shutil.copy2(file, tmp / file.name)
        for name, source in code_files(modules, folder.path).items():
            shutil.copy2(source, tmp / name)
        if settings is not None:
            shutil.copy2(folder.path / SETTINGS_NAME, tmp / SETTINGS_NAME)
        templates = (folder.config_dict.get("templates") or {}).get("file")
        if templates:  # the refinement's rest-frame templates (described in config.json)
            if not (folder.path / templates).is_file():
                raise ModelFolderError(
                    f"{folder.path / templates}: missing, but config.json describes templates in it "
                    "(rebuild it with `specpt templates`)"
                )
            shutil.copy2(folder.path / templates, tmp / templates)
        (tmp / "config.json").write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        card.save(tmp / "README.md")
        for file in tmp.iterdir():
            os.chmod(file, FILE_MODE)
    logger.info("wrote repo folder %s for %s", out, repo_id)
    return out


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "no answer": the HTTP client's transport errors and the OS's connection errors."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _refused(err: HfHubHTTPError, where: str) -> HubRefusedError:
    status = err.response.status_code if err.response is not None else None
    reason = getattr(err.response, "reason_phrase", "") if err.response is not None else ""
    server = (err.server_message or "").strip().splitlines()
    detail = f": {server[0]}" if server else ""
    hint = {
        401: " Check the token (HF_TOKEN or `hf auth login`): it is missing, invalid or expired.",
        403: " The token has no write access to this namespace.",
        404: " The repo or revision does not exist, or the token cannot see it.",
    }.get(status or 0, "")
    return HubRefusedError(f"{where} failed: the Hub answered HTTP {status} {reason}{detail}.{hint}", status)


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    endpoint: str | None = None,
) -> CommitInfo:
    """Create `repo_id` if needed (`exist_ok`) and upload `folder` to it (on branch `revision`, created from main
    when missing). Raises `HubUnreachableError` / `HubRefusedError` naming the endpoint and the repo, never the
    token."""
    repo_id = _check_repo_id(repo_id)
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelFolderError(f"{folder / 'config.json'}: missing; write the repo folder first")
    api = HfApi(endpoint=endpoint, token=token)
    where = f"pushing {folder} to {repo_id} at {api.endpoint}"
    try:
        api.create_repo(repo_id, private=private or None, exist_ok=True, repo_type="model")
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=commit_message,
            repo_type="model",
        )
    except HfHubHTTPError as err:
        raise _refused(err, where) from None
    except OfflineModeIsEnabled:
        raise HubUnreachableError(f"{where} failed: HF_HUB_OFFLINE is set, so nothing is sent") from None
    except _transport_errors() as err:
        raise HubUnreachableError(f"{where} failed: the Hub could not be reached ({err})") from None
    logger.info("pushed %s to %s (%s)", folder, repo_id, info.commit_url)
    return info


# ---------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specpt push", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "model_dir", type=Path, help="model folder (save_pretrained output, e.g. runs/redshift/best)"
    )
    parser.add_argument("--repo-id", required=True, help="ORG/NAME of the Hub repo")
    parser.add_argument("--results", type=Path, help="results.json from `specpt evaluate` (fills the card)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", help="branch to push to (created from main when missing)")
    parser.add_argument("--commit-message", default=DEFAULT_COMMIT_MESSAGE)
    parser.add_argument(
        "--dry-run", action="store_true", help="write the repo folder (needs --out), upload nothing"
    )
    parser.add_argument("--out", type=Path, help="where to write the repo folder (kept after the upload)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument(
        "--base-model", help="repo id of the autoencoder the model was trained from (card metadata)"
    )
    parser.add_argument(
        "--dataset", action="append", help="Hub id of a training data set (card metadata; repeatable)"
    )
    parser.add_argument(
        "--card-template", type=Path, help=f"model card template (default: {CARD_TEMPLATE.name})"
    )
    parser.add_argument("--endpoint", help=f"Hub URL (default: HF_ENDPOINT or {hub_constants.ENDPOINT})")
    add_debug_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`specpt push`: write the repo folder, then upload it (the token comes from HF_TOKEN or `hf auth login`)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.dry_run and args.out is None:
        parser.error("--dry-run needs --out FOLDER")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_reporting_errors("push", lambda: _run(args), args.debug)


def _run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="specpt-push-") as scratch:
        out = args.out or Path(scratch) / args.repo_id.split("/")[-1]
        write_repo_folder(
            args.model_dir,
            out,
            args.results,
            repo_id=args.repo_id,
            template=args.card_template,
            base_model=args.base_model,
            datasets=args.dataset,
            overwrite=args.overwrite,
        )
        if args.out is not None:
            print(f"repo folder: {out}")
        if args.dry_run:
            return 0
        info = push_to_hub(
            out,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            endpoint=args.endpoint,
        )
    print(f"pushed to {info.commit_url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
