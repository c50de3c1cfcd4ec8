"""Fine-tuning on other instruments: native and resampled grids, weight transfer, freezing, LoRA, the example
script and the transfer benchmark (tiny sizes)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from specpt_hf.data.builder import desi_features
from specpt_hf.data.instrument import DEIMOS, HST_G141, Arm, Instrument
from specpt_hf.data.mock import generate_spectra
from specpt_hf.finetune import (
    LORA_FEED_FORWARD_MODULES,
    LORA_TARGET_MODULES,
    MOCK_INFO_NAME,
    adapt_to_instrument,
    config_wavelength,
    coverage_mask,
    evaluate_redshifts,
    finetune,
    merge_lora,
    mock_chunk,
    native_grid,
    save_finetuned,
    write_instrument_dataset,
)
from specpt_hf.modeling_specpt import SpecPTForRedshift, SpecPTForSpectrumReconstruction
from specpt_hf.presets import create_model, preset_config
from specpt_hf.training import TrainingSettings
from specpt_hf.training import train as train_module
from specpt_hf.training.data import build_dataloader, load_training_data

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A specpt-tiny autoencoder folder whose weights differ from any seed-0 initialisation."""
    torch.manual_seed(1234)
    model = create_model("specpt-tiny")
    folder = tmp_path_factory.mktemp("pretrained") / "autoencoder"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def g141_data(pretrained, tmp_path_factory) -> Path:
    """HST G141 mocks on the native grid (135 pixels): 32 train, 8 validation, 8 test spectra."""
    model, _ = adapt_to_instrument(pretrained, "hst_g141", grid="native", head_preset="specpt-tiny")
    folder = tmp_path_factory.mktemp("g141")
    splits = {"train": 32, "validation": 8, "test": 8}
    write_instrument_dataset(
        folder, "hst_g141", config_wavelength(model.config), splits, seed=3, progress=False
    )
    return folder


def three_steps(data_dir: Path, output_dir: Path) -> TrainingSettings:
    """Three optimizer steps of stage 2 on `data_dir` (validated at the last one)."""
    return TrainingSettings(
        stage="redshift",
        data_dir=str(data_dir),
        output_dir=str(output_dir),
        max_steps=3,
        batch_size=8,
        warmup_steps=1,
        learning_rate=1e-2,
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def load_script(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# --- grids and weight transfer -------------------------------------------------------------------


def test_native_grid_loads_the_pretrained_backbone_and_runs_on_the_instrument_grid(pretrained):
    autoencoder = SpecPTForSpectrumReconstruction.from_pretrained(pretrained)
    model, report = adapt_to_instrument(pretrained, "hst_g141", grid="native", head_preset="specpt-tiny")

    assert (model.config.num_pixels, model.config.wavelength_start, model.config.wavelength_step) == (
        HST_G141.n_pixels,
        HST_G141.wave[0],
        46.5,
    )
    backbone = {k: v for k, v in autoencoder.state_dict().items() if k.startswith("specpt.")}
    assert backbone and sorted(backbone) == [k for k in report.loaded]
    target = model.state_dict()
    for name, tensor in backbone.items():
        torch.testing.assert_close(target[name], tensor, rtol=0, atol=0, msg=name)
    assert all(name.startswith("head.") for name in report.new)
    assert all(name.startswith("decoder.") for name in report.unused) and report.unused
    assert not report.mismatched and not report.head_loaded

    spectra = generate_spectra("elg", 3, seed=5, instrument="hst_g141")
    inputs = {key: torch.as_tensor(spectra[key]) for key in ("flux", "ivar", "mask")}
    model.eval()
    with torch.no_grad():
        output = model(**inputs)
        encoded = model.specpt(**inputs)
    assert output.redshift.shape == (3,) and torch.isfinite(output.redshift).all()
    first_token = HST_G141.wave[: model.config.patch_size].mean()
    assert encoded.token_wavelength[0, 0].item() == pytest.approx(first_token, rel=1e-5)


def test_native_grid_of_an_instrument_with_unequal_arm_steps_is_linearised():
    instrument = Instrument(
        "TWO_ARM",
        (
            Arm("blue", 4000.0, 6000.0, 1.0, ((4000.0, 2.0),)),
            Arm("red", 6002.0, 7002.0, 2.0, ((6000.0, 4.0),)),
        ),
    )
    grid = native_grid(instrument)
    assert grid["wavelength_start"] == 4000.0 and grid["wavelength_step"] == 1.0
    assert grid["wavelength_start"] + (grid["num_pixels"] - 1) * grid["wavelength_step"] == pytest.approx(
        7002.0
    )
    assert native_grid(HST_G141) == {"wavelength_start": 10750.0, "wavelength_step": 46.5, "num_pixels": 135}
    assert native_grid(HST_G141, step=11.625)["num_pixels"] == 4 * 134 + 1


def test_resample_mode_masks_the_pixels_the_instrument_does_not_cover():
    config = preset_config("specpt-tiny", "redshift")
    wave = config_wavelength(config)
    covered = coverage_mask(config, DEIMOS)
    assert covered[(wave > 4501) & (wave < 9499)].all() and not covered[(wave < 4499) | (wave > 9501)].any()

    data = mock_chunk(DEIMOS, {"lrg": 1.0, "elg": 1.0}, 3, seed=2, wavelength=wave)
    assert data["flux"].shape == (3, config.num_pixels)
    assert data["mask"][:, ~covered].all()
    assert (data["ivar"][:, ~covered] == 0).all() and (data["flux"][:, ~covered] == 0).all()
    assert (~data["mask"][:, covered]).mean() > 0.95
    assert np.isfinite(data["flux"]).all() and sorted(set(data["target_class"])) <= ["elg", "lrg"]


def test_resample_mode_without_overlap_is_refused(pretrained):
    with pytest.raises(ValueError, match=r"HST_G141 covers .* 0 model pixels .* grid='native'"):
        adapt_to_instrument(pretrained, "hst_g141", grid="resample")
    model, report = adapt_to_instrument(pretrained, "hst_g102", grid="resample", head_preset="specpt-tiny")
    assert model.config.num_pixels == 7781 and 0 < report.covered_pixels < 7781


def test_a_redshift_model_keeps_its_head_only_for_the_same_redshift_range(pretrained, tmp_path):
    model, _ = adapt_to_instrument(pretrained, "hst_g141", grid="native", head_preset="specpt-tiny", seed=7)
    save_finetuned(model, tmp_path / "g141")
    head = {k: v for k, v in state(model).items() if k.startswith("head.")}

    same, report = adapt_to_instrument(tmp_path / "g141", "hst_g141", grid="native")
    assert report.head_loaded and report.source_type == "specpt_redshift" and not report.new
    for name, tensor in head.items():
        torch.testing.assert_close(same.state_dict()[name], tensor, rtol=0, atol=0)

    other, report = adapt_to_instrument(tmp_path / "g141", "hst_g141", grid="native", z_max=2.0)
    assert not report.head_loaded and other.config.z_max == 2.0
    assert sorted(report.new) == sorted(head) and set(report.unused) == set(head)


def test_a_folder_that_is_not_specpt_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=str(tmp_path) + ".*'bert'"):
        adapt_to_instrument(tmp_path, "deimos")
    with pytest.raises(ValueError, match="`freeze`"):
        adapt_to_instrument(tmp_path, "deimos", freeze="head")


# --- data ----------------------------------------------------------------------------------------


def test_instrument_shards_follow_the_project_layout(g141_data, pretrained, tmp_path):
    from specpt_hf.training import TrainingSettings, training_function
    from specpt_hf.training.data import load_training_data

    info = json.loads((g141_data / MOCK_INFO_NAME).read_text())
    assert info["rows"] == {"train": 32, "validation": 8, "test": 8} and info["num_pixels"] == 135
    shards = sorted(g141_data.glob("*/*.parquet"))
    assert {path.parent.name for path in shards} == {"train", "validation", "test"}
    table = pq.read_table(shards[0])
    assert table.schema.names == desi_features(135).arrow_schema.names
    splits = load_training_data(g141_data, "redshift", (0.0, 3.6))
    assert len(splits["train"]) == 32 and splits["train"][0]["flux"].shape == (135,)
    classes = pq.read_table(g141_data / "train").column("target_class").to_pylist()
    assert set(classes) == {"elg", "qso"}

    # `specpt train` (stage 2) reads them unchanged, starting from a native-grid model folder
    model, _ = adapt_to_instrument(pretrained, "hst_g141", grid="native", head_preset="specpt-tiny")
    save_finetuned(model, tmp_path / "start")
    settings = TrainingSettings(
        stage="redshift",
        pretrained_model=str(tmp_path / "start"),
        data_dir=str(g141_data),
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        batch_size=8,
        warmup_steps=1,
        report_to="none",
    )
    result = training_function(settings)
    assert result.step == 2 and result.model.config.num_pixels == 135


def test_existing_shards_are_not_overwritten_by_default(g141_data):
    with pytest.raises(FileExistsError, match="overwrite"):
        write_instrument_dataset(g141_data, "hst_g141", None, {"train": 4}, progress=False)


# --- freezing and LoRA ---------------------------------------------------------------------------


@pytest.mark.parametrize("freeze, fixed", [("encoder", "specpt."), ("stem", "specpt.stem.")])
def test_frozen_parts_stay_unchanged_after_training(pretrained, g141_data, tmp_path, freeze, fixed):
    model, _ = adapt_to_instrument(
        pretrained, "hst_g141", grid="native", freeze=freeze, head_preset="specpt-tiny"
    )
    before = state(model)
    result = finetune(model, three_steps(g141_data, tmp_path / "run"))
    after = state(result.model)
    assert result.step == 3 and result.history[-1]["step"] == 3 and "validation/nmad" in result.history[-1]
    assert result.train_seconds > 0 and result.spectra_per_second > 0
    unchanged = {name for name in before if torch.equal(before[name], after[name])}
    assert {name for name in before if name.startswith(fixed)} <= unchanged
    assert any(name.startswith("head.") for name in set(before) - unchanged)
    if freeze == "stem":
        assert any(name.startswith("specpt.encoder.") for name in set(before) - unchanged)


@pytest.mark.parametrize("targets", [LORA_TARGET_MODULES, LORA_FEED_FORWARD_MODULES])
def test_lora_trains_adapters_and_the_new_head_only(pretrained, g141_data, tmp_path, targets):
    model, report = adapt_to_instrument(
        pretrained,
        "hst_g141",
        grid="native",
        freeze="encoder",
        lora_rank=2,
        lora_targets=targets,
        head_preset="specpt-tiny",
    )
    assert any(name.endswith("mlp.fc1") for name in report.lora_modules)
    attention = [name for name in report.lora_modules if ".self_attn." in name]
    expected = 4 * 2 if targets == LORA_TARGET_MODULES else 0  # q, k, v, out of specpt-tiny's 2 layers
    assert len(attention) == expected
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or ".modules_to_save." in name for name in trainable)
    base = {k: v for k, v in state(model).items() if "lora_" not in k and "modules_to_save" not in k}

    result = finetune(model, three_steps(g141_data, tmp_path / "run"), report)
    after = state(result.model)
    for name, tensor in base.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in after if "lora_B" in k)

    # evaluation sees the adapters: the peft model and the merged plain model agree
    spectra = generate_spectra("elg", 4, seed=9, instrument="hst_g141")
    inputs = {key: torch.as_tensor(spectra[key]) for key in ("flux", "ivar", "mask")}
    peft_model = result.model.eval()
    merged = merge_lora(peft_model).eval()
    with torch.no_grad():
        adapted = peft_model(**inputs).logits
        plain = merged(**inputs).logits
        with peft_model.disable_adapter():
            without = peft_model(**inputs).logits
    torch.testing.assert_close(plain, adapted, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, without, atol=1e-4)
    # ... and so does the training loop's validation (at step 3, on the final weights)
    settings = three_steps(g141_data, tmp_path / "check")
    val = load_training_data(g141_data, "redshift", (merged.config.z_min, merged.config.z_max))["validation"]
    loader = build_dataloader(val, "redshift", 8, train=False)
    metrics = train_module.evaluate(merged, loader, train_module.make_accelerator(settings), "redshift")
    for key in ("validation/loss", "validation/nmad"):  # skipping the adapters moves both by > 1e-5
        assert result.history[-1][key] == pytest.approx(metrics[key], rel=1e-6), key

    folder = save_finetuned(peft_model, tmp_path / "lora", report)
    # the training loop saved its model folder the same way: merged weights, the adapter, the adaptation report
    for saved in (folder, result.model_dir):
        assert (saved / "lora_adapter" / "adapter_config.json").is_file()
        assert json.loads((saved / "adaptation.json").read_text())["lora_rank"] == 2
        reloaded = SpecPTForRedshift.from_pretrained(saved).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**inputs).logits, plain, rtol=1e-5, atol=1e-5)
    metrics = evaluate_redshifts(peft_model, g141_data).metrics
    assert metrics["all"]["n"] == 8 and np.isfinite(metrics["all"]["nmad"])


def test_encoder_learning_rate_reaches_the_backbone_but_not_the_adapters(pretrained, g141_data, tmp_path):
    model, _ = adapt_to_instrument(
        pretrained, "hst_g141", grid="native", freeze="none", lora_rank=2, head_preset="specpt-tiny"
    )
    settings = TrainingSettings(
        **{**three_steps(g141_data, tmp_path).to_dict(), "learning_rate": 1e-3, "encoder_learning_rate": 1e-5}
    )
    lr = {
        id(p): group["lr"]
        for group in train_module.parameter_groups(model, settings)
        for p in group["params"]
    }
    names = {name: lr.get(id(p)) for name, p in model.named_parameters()}
    assert {name for name, value in names.items() if value is not None} == {
        name for name, p in model.named_parameters() if p.requires_grad
    }
    backbone = {n for n, v in names.items() if ".specpt." in n and "lora_" not in n and v is not None}
    assert backbone and all(".modules_to_save." in n for n in backbone)  # stem, pooler, final norm
    assert {names[n] for n in backbone} == {1e-5}
    assert {names[n] for n, v in names.items() if v is not None and n not in backbone} == {1e-3}
    assert any("lora_" in n for n, v in names.items() if v == 1e-3)


# --- the example script and the transfer benchmark -----------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        ["--instrument", "hst_g141", "--grid", "native", "--freeze", "none"],
        [
            "--instrument",
            "hst_g102",
            "--grid",
            "resample",
            "--freeze",
            "encoder",
            "--lora",
            "--lora-rank",
            "2",
        ],
    ],
)
def test_example_quick_runs_end_to_end(pretrained, tmp_path, options):
    example = load_script(ROOT / "examples" / "finetune_other_instrument.py", "finetune_other_instrument")
    out = tmp_path / "out"
    assert example.main([*options, "--pretrained", str(pretrained), "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert np.isfinite(results["test"]["all"]["nmad"]) and results["test"]["all"]["n"] == 24
    model = SpecPTForRedshift.from_pretrained(out / "model")
    expected = 135 if "hst_g141" in options else 7781
    assert model.config.num_pixels == expected and (out / "model" / "adaptation.json").is_file()


def test_example_refuses_resampling_without_overlap(pretrained, tmp_path, capsys):
    example = load_script(ROOT / "examples" / "finetune_other_instrument.py", "finetune_other_instrument")
    out = tmp_path / "out"
    argv = ["--instrument", "hst_g141", "--grid", "resample", "--pretrained", str(pretrained), "--quick"]
    assert example.main([*argv, "--out", str(out)]) == 2
    assert "grid='native'" in capsys.readouterr().err
    assert not (out / "model").exists()


def test_transfer_benchmark_quick_writes_its_table(pretrained, tmp_path, capsys):
    transfer = load_script(ROOT / "benchmarks" / "transfer.py", "transfer_benchmark")
    out = tmp_path / "transfer"
    argv = ["--quick", "--pretrained", str(pretrained), "--out", str(out), "--no-progress"]
    assert transfer.main(argv) == 0
    result = json.loads((out / "transfer.json").read_text())
    runs = {(r["setup"]["instrument"], r["setup"]["n_train"], r["setup"]["start"]): r for r in result["runs"]}
    assert len(runs) == 8 and {start for *_, start in runs} == {"pretrained", "scratch"}
    assert all(r["loaded_tensors"] > 0 for (*_, start), r in runs.items() if start == "pretrained")
    assert all(r["loaded_tensors"] == 0 for (*_, start), r in runs.items() if start == "scratch")
    table = (out / "transfer.md").read_text()
    assert "PRELIMINARY" in table
    for instrument in ("deimos", "hst_g141"):
        for n_train in (16, 48):
            assert f"| {instrument} | {n_train} |" in table
    assert (out / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --resume keeps the finished runs
    capsys.readouterr()
    assert transfer.main([*argv, "--resume"]) == 0
    assert capsys.readouterr().out.count(": kept from ") == 8
    again = json.loads((out / "transfer.json").read_text())
    assert [r["nmad"] for r in again["runs"]] == [r["nmad"] for r in result["runs"]]
