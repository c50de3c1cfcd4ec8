"""Named SpecPT presets: `specpt-tiny`, `specpt-small`, `specpt-base`, `specpt-paper`.

A preset is a few config values for the backbone and for the redshift head; the config classes stay the single
source of truth for everything else. `specpt presets` prints them with their size, counted on the meta device
(nothing is allocated, so even the 1.12 B-parameter paper layout is listed instantly).

    >>> from specpt_hf.presets import preset_config, create_model
    >>> config = preset_config("specpt-small", task="redshift", z_max=1.7)
    >>> model = create_model("specpt-tiny")  # SpecPTForSpectrumReconstruction
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from .configuration_specpt import SpecPTConfig, SpecPTForRedshiftConfig
from .modeling_specpt import (
    SpecPTForRedshift,
    SpecPTForSpectrumReconstruction,
    SpecPTPreTrainedModel,
    num_tokens,
)

TASKS = ("autoencoder", "redshift")


@dataclass(frozen=True)
class Preset:
    """Config values of one preset: `backbone` for both tasks, `head` for the redshift model only."""

    description: str
    backbone: dict[str, Any]
    head: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "specpt-tiny": Preset(
        "unit tests: builds and runs in milliseconds",
        dict(
            patch_size=64,
            stem_channels=8,
            num_position_frequencies=8,
            d_model=32,
            num_layers=2,
            num_decoder_layers=1,
            num_heads=2,
            ffn_dim=64,
        ),
        dict(num_redshift_bins=32, head_hidden_size=32, head_num_blocks=1),
    ),
    "specpt-small": Preset(
        "2-core CPU: ~75 (autoencoder) / ~90 (redshift) spectra/s training, batch 32, float32",
        dict(
            patch_size=64,
            stem_channels=32,
            num_position_frequencies=16,
            d_model=128,
            num_layers=4,
            num_decoder_layers=1,
            num_heads=4,
            ffn_dim=512,
        ),
        dict(num_redshift_bins=256, head_hidden_size=256, head_num_blocks=1),
    ),
    "specpt-base": Preset(
        "GPU scale: 487 tokens of 16 pixels, 8 layers of width 512 (~2 spectra/s training on 2 CPU cores, bf16)",
        dict(
            patch_size=16,
            stem_channels=64,
            num_position_frequencies=32,
            d_model=512,
            num_layers=8,
            num_decoder_layers=2,
            num_heads=8,
            ffn_dim=2048,
        ),
        dict(num_redshift_bins=512, head_hidden_size=512, head_num_blocks=2),
    ),
    "specpt-paper": Preset(
        "the published SpecPT structure (one token per spectrum, ~1.12 B parameters)",
        dict(
            layout="paper",
            paper_conv_channels=[64, 128, 256],
            paper_conv_kernels=[41, 21, 11],
            d_model=512,
            num_layers=3,
            num_decoder_layers=3,
            num_heads=8,
            ffn_dim=2048,
            dropout=0.1,
            reconstruction_loss="l1",
        ),
        dict(head_type="paper", head_hidden_size=512, head_num_blocks=5, head_dropout=0.2),
    ),
}


def list_presets() -> list[str]:
    """Names of the presets, smallest first."""
    return list(PRESETS)


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {list_presets()}")
    return PRESETS[name]


def preset_config(name: str, task: str = "autoencoder", **overrides: Any) -> SpecPTConfig:
    """The config of preset `name` for `task` ("autoencoder" -> SpecPTConfig, "redshift" ->
    SpecPTForRedshiftConfig); keyword `overrides` replace preset or default values."""
    preset = _preset(name)
    if task == "autoencoder":
        return SpecPTConfig(**{**preset.backbone, **overrides})
    if task == "redshift":
        return SpecPTForRedshiftConfig(**{**preset.backbone, **preset.head, **overrides})
    raise ValueError(f"`task` must be one of {TASKS}, got {task!r}")


def model_class(task: str) -> type[SpecPTPreTrainedModel]:
    """SpecPTForSpectrumReconstruction for "autoencoder", SpecPTForRedshift for "redshift"."""
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS}, got {task!r}")
    return SpecPTForSpectrumReconstruction if task == "autoencoder" else SpecPTForRedshift


def create_model(name: str, task: str = "autoencoder", **overrides: Any) -> SpecPTPreTrainedModel:
    """A freshly initialised model of preset `name` for `task`."""
    return model_class(task)(preset_config(name, task, **overrides))


def count_parameters(config: SpecPTConfig, task: str = "autoencoder") -> int:
    """Number of parameters of the model for `config`, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = model_class(task)(config)
    return sum(p.numel() for p in model.parameters())


def _format_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def preset_table() -> list[dict[str, Any]]:
    """One row per preset: name, layout, parameter counts of both models, tokens per spectrum, description."""
    rows = []
    for name in list_presets():
        autoencoder = preset_config(name, "autoencoder")
        rows.append(
            {
                "name": name,
                "layout": autoencoder.layout,
                "params_autoencoder": count_parameters(autoencoder, "autoencoder"),
                "params_redshift": count_parameters(preset_config(name, "redshift"), "redshift"),
                "tokens": num_tokens(autoencoder),
                "description": PRESETS[name].description,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """`specpt presets`: list the presets with layout, parameter counts and tokens per spectrum."""
    parser = argparse.ArgumentParser(
        prog="specpt presets", description="List the named SpecPT model presets."
    )
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    parser.add_argument("--show", metavar="NAME", help="print the full configs of one preset instead")
    args = parser.parse_args(argv)

    if args.show:
        if args.show not in PRESETS:
            parser.error(f"unknown preset {args.show!r}; choose one of {list_presets()}")
        for task in TASKS:
            print(f"# {args.show} ({task})\n{preset_config(args.show, task).to_json_string(use_diff=False)}")
        return 0
    rows = preset_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = f"{'name':<14} {'layout':<7} {'params (autoencoder)':>21} {'params (redshift)':>18} {'tokens':>7}  notes"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['name']:<14} {row['layout']:<7} {_format_count(row['params_autoencoder']):>21} "
            f"{_format_count(row['params_redshift']):>18} {row['tokens']:>7}  {row['description']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
