"""Tests of the SpecPT configs, the Auto-class registration, the presets and the generated hub configs."""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as hf_logging

from specpt_hf import (
    SpecPTConfig,
    SpecPTForRedshift,
    SpecPTForRedshiftConfig,
    SpecPTForSpectrumReconstruction,
    count_parameters,
    create_model,
    list_presets,
    preset_config,
)
from specpt_hf import presets as presets_module

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")


def _init_arguments(cls) -> list[str]:
    return [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "kwargs")]


@pytest.mark.parametrize("cls", [SpecPTConfig, SpecPTForRedshiftConfig])
def test_every_argument_is_typed_defaulted_and_documented(cls):
    signature = inspect.signature(cls.__init__)
    for name in _init_arguments(cls):
        parameter = signature.parameters[name]
        assert parameter.annotation is not inspect.Parameter.empty, name
        assert parameter.default is not inspect.Parameter.empty, name
        assert f"{name} (`" in cls.__doc__, f"{name} is not documented in {cls.__name__}"


def test_defaults_carry_the_desi_grid_and_redshift_range():
    config = SpecPTForRedshiftConfig()
    assert (config.num_pixels, config.wavelength_start, config.wavelength_step) == (7781, 3600.0, 0.8)
    assert config.wavelength_end == pytest.approx(3600.0 + 7780 * 0.8)
    assert (config.z_min, config.z_max, config.normalization) == (0.0, 4.0, "median")
    assert config.head_hidden_size == config.d_model
    assert config.redshift_bin_width == pytest.approx(torch.log(torch.tensor(5.0)).item() / 512)


def test_round_trip_through_json(tmp_path):
    config = SpecPTForRedshiftConfig(
        d_model=64, num_heads=4, z_max=1.7, paper_conv_channels=[8, 16], paper_conv_kernels=[5, 3]
    )
    config.save_pretrained(tmp_path)
    loaded = SpecPTForRedshiftConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "specpt_redshift"


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (SpecPTConfig, {"layout": "cnn"}, "layout"),
        (SpecPTConfig, {"normalization": "max"}, "normalization"),
        (SpecPTConfig, {"pooling": "max"}, "pooling"),
        (SpecPTConfig, {"reconstruction_loss": "mse"}, "reconstruction_loss"),
        (SpecPTConfig, {"d_model": 30, "num_heads": 4}, "num_heads"),
        (SpecPTConfig, {"num_pixels": 0}, "num_pixels"),
        (SpecPTConfig, {"patch_size": 0}, "patch_size"),
        (SpecPTConfig, {"stem_kernel_size": 4}, "stem_kernel_size"),
        (SpecPTConfig, {"dropout": 1.0}, "dropout"),
        (SpecPTConfig, {"paper_conv_kernels": [41, 21]}, "paper_conv"),
        (SpecPTForRedshiftConfig, {"head_type": "mdn"}, "head_type"),
        (SpecPTForRedshiftConfig, {"z_min": 1.0, "z_max": 0.5}, "z_max"),
        (SpecPTForRedshiftConfig, {"num_redshift_bins": 1}, "num_redshift_bins"),
        (SpecPTForRedshiftConfig, {"redshift_offset_bound": 0.0}, "redshift_offset_bound"),
        (SpecPTForRedshiftConfig, {"redshift_label_sigma": -1.0}, "redshift_label_sigma"),
    ],
)
def test_invalid_values_raise(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


def test_redshift_config_from_autoencoder_folder(tmp_path):
    backbone = preset_config("specpt-tiny", "autoencoder")
    backbone.save_pretrained(tmp_path)
    logger = hf_logging.get_logger("transformers.configuration_utils")
    with CaptureLogger(logger) as captured:
        config = SpecPTForRedshiftConfig.from_pretrained(tmp_path, z_max=1.7)
    assert "to instantiate a model of type" not in captured.out
    assert isinstance(config, SpecPTForRedshiftConfig) and config.model_type == "specpt_redshift"
    assert config.d_model == backbone.d_model and config.patch_size == backbone.patch_size
    assert config.z_max == 1.7 and config.head_hidden_size == backbone.d_model


def test_auto_classes_return_what_was_saved(tmp_path):
    for task, model_cls, config_cls in [
        ("autoencoder", SpecPTForSpectrumReconstruction, SpecPTConfig),
        ("redshift", SpecPTForRedshift, SpecPTForRedshiftConfig),
    ]:
        folder = tmp_path / task
        create_model("specpt-tiny", task).save_pretrained(folder)
        assert type(AutoConfig.from_pretrained(folder)) is config_cls
        model = AutoModel.from_pretrained(folder)
        assert type(model) is model_cls


def test_save_pretrained_writes_auto_map_and_code(tmp_path):
    create_model("specpt-tiny", "redshift").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_specpt.SpecPTForRedshiftConfig",
        "AutoModel": "modeling_specpt.SpecPTForRedshift",
    }
    assert config["architectures"] == ["SpecPTForRedshift"]
    assert {"configuration_specpt.py", "modeling_specpt.py", "model.safetensors"} <= {
        p.name for p in tmp_path.iterdir()
    }


# ---------------------------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------------------------


def test_presets_are_listed_and_build_configs():
    assert list_presets() == ["specpt-tiny", "specpt-small", "specpt-base", "specpt-paper"]
    for name in list_presets():
        assert type(preset_config(name)) is SpecPTConfig
        assert type(preset_config(name, "redshift")) is SpecPTForRedshiftConfig
    assert preset_config("specpt-paper").layout == "paper"
    assert preset_config("specpt-paper", "redshift").head_type == "paper"
    assert preset_config("specpt-small", "redshift", z_max=1.7, num_layers=1).z_max == 1.7
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("specpt-huge")
    with pytest.raises(ValueError, match="task"):
        preset_config("specpt-tiny", "classification")


def _published_parameter_count() -> int:
    """The published layout counted by hand (conv stack, projection, 3 + 3 transformer layers, dense decoder)."""
    convs = [(1, 64, 41), (64, 128, 21), (128, 256, 11)]
    total = sum(c_in * c_out * k + c_out + 2 * c_out for c_in, c_out, k in convs)  # conv + BatchNorm
    flat, d, ff = 256 * 487, 512, 2048
    attention = 4 * d * d + 4 * d
    feed_forward = 2 * d * ff + ff + d
    total += flat * d + d  # projection
    total += 3 * (attention + feed_forward + 2 * 2 * d)  # encoder layers
    total += 3 * (2 * attention + feed_forward + 3 * 2 * d)  # decoder layers
    total += d * flat + flat + flat * 7781 + 7781  # dense decoder
    return total


def test_paper_preset_has_the_published_size_on_meta():
    count = count_parameters(preset_config("specpt-paper"), "autoencoder")
    assert count == _published_parameter_count()
    assert 1.11e9 < count < 1.13e9


@pytest.mark.parametrize("name", ["specpt-tiny", "specpt-small", "specpt-base", "specpt-paper"])
@pytest.mark.parametrize("task", ["autoencoder", "redshift"])
def test_every_preset_runs_forward_and_backward(name, task, spectra_factory):
    """Each preset's structure at a shrunken size (the real sizes only on meta for base and paper)."""
    shrink = {}
    if name == "specpt-base":
        shrink = dict(
            d_model=32, num_heads=2, ffn_dim=64, num_layers=1, num_decoder_layers=1, stem_channels=8
        )
    if name == "specpt-paper":
        shrink = dict(num_pixels=600, paper_conv_channels=[4, 8, 8], d_model=32, num_heads=2, ffn_dim=64)
    config = preset_config(name, task, **shrink)
    torch.manual_seed(0)
    model = presets_module.model_class(task)(config)
    spectra = spectra_factory(batch=2, num_pixels=config.num_pixels)
    labels = spectra["flux"] if task == "autoencoder" else torch.tensor([0.3, 1.2])
    out = model(spectra["flux"], ivar=spectra["ivar"], mask=spectra["mask"], labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    if task == "autoencoder":
        assert out.reconstruction.shape == (2, config.num_pixels)
    else:
        assert out.redshift.shape == (2,)


def test_presets_command_prints_the_table(capsys):
    assert presets_module.main([]) == 0
    text = capsys.readouterr().out
    for name in list_presets():
        assert name in text
    assert "1.12 B" in text  # the paper layout, counted on meta
    assert presets_module.main(["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {row["name"]: row for row in rows}
    assert by_name["specpt-base"]["tokens"] == 487 and by_name["specpt-paper"]["tokens"] == 1
    assert by_name["specpt-tiny"]["params_autoencoder"] == sum(
        p.numel() for p in create_model("specpt-tiny").parameters()
    )
    assert presets_module.main(["--show", "specpt-small"]) == 0
    assert '"model_type": "specpt_redshift"' in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# hub configs
# ---------------------------------------------------------------------------------------------------------------


def _hub_script():
    spec = importlib.util.spec_from_file_location(
        "make_hub_configs", ROOT / "examples" / "make_hub_configs.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hub_configs_match_the_presets():
    script = _hub_script()
    folder = ROOT / "hub_configs"
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == sorted(script.variants())
    assert script.stale(folder) == [], "hub_configs/ is out of date: run python examples/make_hub_configs.py"


def test_hub_config_is_what_save_pretrained_writes(tmp_path):
    """The generated config.json equals save_pretrained's, apart from version and dtype."""
    script = _hub_script()
    create_model("specpt-tiny", "redshift").save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key in ("transformers_version", "dtype"):
        saved.pop(key, None)
    assert json.loads(script.render("specpt-tiny", "redshift")) == saved


def test_hub_script_writes_atomically(tmp_path, caplog):
    script = _hub_script()
    caplog.set_level(logging.WARNING)
    assert script.main(["--out", str(tmp_path)]) == 0
    assert script.stale(tmp_path) == []
    assert not list(tmp_path.rglob("*.tmp"))
    (tmp_path / "specpt-base-redshift" / "config.json").write_text("{}")
    assert script.main(["--out", str(tmp_path), "--check"]) == 1
