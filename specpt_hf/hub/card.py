"""The README.md model card of a SpecPT repo, made from the template `MODEL_CARD.md`.

The template is itself the card of `specpt/specpt-desi`. Its YAML front matter gains a `model-index` (NMAD and
η per class, from the results JSON of `specpt evaluate`, through `huggingface_hub.ModelCardData.eval_results`),
`base_model` and `datasets`; the blocks between `<!-- specpt:NAME -->` and `<!-- /specpt:NAME -->` are filled from
the config, the weights, the training settings and the results, and the `note` block is left out.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard

from ..configuration_specpt import SpecPTConfig, SpecPTForRedshiftConfig
from ..evaluation.results import CLASS_NAMES, eval_results
from ..loading import SHORT_NAMES
from ..modeling_specpt import num_tokens
from .model_folder import SETTINGS_NAME, ModelFolder
from .repo_id import check_repo_id

CARD_TEMPLATE = Path(__file__).resolve().parents[1] / "MODEL_CARD.md"  # a link to the top-level MODEL_CARD.md
CARD_TEMPLATE_ENV = "SPECPT_MODEL_CARD"
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


def _replace_block(text: str, name: str, content: str | None) -> str:
    """Put `content` between `<!-- specpt:name -->` and `<!-- /specpt:name -->`, or remove the block and its
    markers when `content` is None (text without the block is left as is)."""
    pattern = re.compile(rf"(<!-- specpt:{name} -->\n).*?(\n<!-- /specpt:{name} -->)(\n?)", re.DOTALL)
    if content is None:
        return pattern.sub("", text)
    return pattern.sub(lambda m: m.group(1) + content.strip("\n") + m.group(2) + m.group(3), text)


def _format_value(value: float | None, digits: int = 4) -> str:
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
    short = [name for name, repo in SHORT_NAMES.items() if repo == repo_id]
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


def _eval_results(results: Mapping[str, Any]) -> list[EvalResult]:
    """The `model-index` entries of a results JSON: NMAD, centred NMAD and η per class."""
    dataset = results.get("dataset", {})
    entries = eval_results(
        results["metrics"],
        dataset_name=dataset.get("name", "evaluation data"),
        dataset_type=dataset.get("type", "unknown"),
        dataset_config=dataset.get("config"),
        dataset_split=dataset.get("split"),
        dataset_revision=dataset.get("revision"),
        metrics=("nmad", "nmad_centred", "eta"),
        catastrophic_threshold=results.get("catastrophic_threshold", 0.15),
    )
    if not entries:
        raise ValueError("the results hold no finite NMAD or η value to put in the model card")
    return entries


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
    card = ModelCard.load(path, ignore_metadata_errors=False)
    card.data.base_model = check_repo_id(base_model, "base_model") if base_model else None
    if datasets:
        card.data.datasets = list(datasets)
    card.data.model_name = repo_id.split("/")[-1] if results else None
    card.data.eval_results = _eval_results(results) if results else None
    blocks = {
        "note": None,
        "header": header_block(folder, repo_id, base_model),
        "details": details_block(folder, repo_id, settings),
        "layout": layout_block(folder.config),
        "results": results_block(results),
        "usage": usage_block(folder, repo_id, has_pipeline),
        "training": training_block(settings),
    }
    for name, content in blocks.items():
        card.text = _replace_block(card.text, name, content)
    return ModelCard(str(card), ignore_metadata_errors=False)  # re-parse: what is written is what was checked
