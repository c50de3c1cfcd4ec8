"""Training augmentations: each one's physical property, determinism, and a resumed run equal to an uninterrupted one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from specpt_hf.data.desi import desi_brz_wavelength
from specpt_hf.training import train as train_module
from specpt_hf.training.augment import Augmentations, augment, step_generator
from specpt_hf.training.settings import TrainingSettings
from specpt_hf.training.train import pz_consistency, training_function

WAVE = desi_brz_wavelength()  # [7781]


def batch(n: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """Noisy flat spectra (truth 1, sigma 0.1) with a masked stretch; `truth` kept for the checks."""
    rng = np.random.default_rng(seed)
    ivar = np.full((n, WAVE.size), 100.0, np.float32)
    mask = np.zeros((n, WAVE.size), bool)
    mask[:, 3000:3050] = True
    ivar[mask] = 0.0
    flux = (1.0 + rng.normal(0, 0.1, (n, WAVE.size))).astype(np.float32)
    return {
        "flux": torch.from_numpy(flux),
        "ivar": torch.from_numpy(ivar),
        "mask": torch.from_numpy(mask),
        "labels": torch.rand(n),
    }


ALL = Augmentations(
    probability=1.0, calibration=0.02, sky_residual=2.0, masked_span=200, renoise=2.0, ebv=0.1
)


def test_off_returns_the_batch_and_labels_are_never_touched():
    data = batch()
    assert augment(data, WAVE, Augmentations(), step_generator(0, 0)) is data
    out = augment(data, WAVE, ALL, step_generator(0, 0))
    assert out["labels"] is data["labels"]


def test_same_seed_and_step_same_draw_other_step_other_draw():
    a, b = (augment(batch(), WAVE, ALL, step_generator(3, 7)) for _ in range(2))
    c = augment(batch(), WAVE, ALL, step_generator(3, 8))
    assert all(torch.equal(a[k], b[k]) for k in ("flux", "ivar", "mask"))
    assert not torch.equal(a["flux"], c["flux"])


def test_masked_pixels_stay_masked_and_weightless():
    data = batch()
    out = augment(data, WAVE, ALL, step_generator(0, 1))
    assert out["mask"][data["mask"]].all() and (out["ivar"][out["mask"]] == 0).all()
    assert out["mask"].sum() > data["mask"].sum()  # the masked spans came on top


def test_calibration_and_extinction_keep_the_signal_to_noise():
    data = batch()
    for settings in (
        Augmentations(probability=1.0, calibration=0.02),
        Augmentations(probability=1.0, ebv=0.1),
    ):
        out = augment(data, WAVE, settings, step_generator(0, 2))
        good = ~data["mask"]
        snr_before = (data["flux"] * data["ivar"].sqrt())[good]
        snr_after = (out["flux"] * out["ivar"].sqrt())[good]
        torch.testing.assert_close(snr_after, snr_before, rtol=1e-4, atol=1e-4)
    scale = augment(data, WAVE, Augmentations(probability=1.0, calibration=0.02), step_generator(0, 2))[
        "flux"
    ]
    ratio = scale / data["flux"]  # [batch, pixels]
    assert 0.005 < float(ratio.std(dim=1).mean()) < 0.05  # distortions of the requested rms ...
    arm = np.searchsorted([5780.0, 7570.0], WAVE)
    within = torch.from_numpy(
        (np.diff(arm) == 0) & ~data["mask"][0, 1:].numpy() & ~data["mask"][0, :-1].numpy()
    )
    assert (
        float(ratio.diff(dim=1)[:, within].abs().max()) < 1e-3
    )  # ... smooth within an arm (the arms differ)
    red = (
        augment(data, WAVE, Augmentations(probability=1.0, ebv=0.1), step_generator(0, 3))["flux"]
        / data["flux"]
    )
    assert (red[:, 100] < red[:, -100]).all() and (red <= 1.0).all()  # bluer light is dimmed more


def test_renoise_ivar_is_the_inverse_variance_of_the_new_flux():
    data = batch(n=256)
    out = augment(data, WAVE, Augmentations(probability=1.0, renoise=3.0), step_generator(0, 4))
    good = ~data["mask"]
    pull = ((out["flux"] - 1.0) * out["ivar"].sqrt())[good]  # truth is 1: unit variance if ivar is right
    assert float(pull.var()) == pytest.approx(1.0, rel=0.02)
    assert float((data["ivar"][good] / out["ivar"][good]).max()) <= 9.0 + 1e-3  # S/N down by at most 3


def test_the_consistency_copy_lowers_every_spectrum_and_keeps_ivar_the_inverse_variance():
    data = batch(n=256)
    fainter = Augmentations(probability=1.0, renoise=2.0)  # the copy `consistency_renoise` 2 trains on
    copy = augment(data, WAVE, fainter, step_generator(0, 4, stream=1))
    good = ~data["mask"]
    pull = ((copy["flux"] - 1.0) * copy["ivar"].sqrt())[good]  # truth is 1: unit variance if ivar is right
    assert float(pull.var()) == pytest.approx(1.0, rel=0.02)
    factor = (data["ivar"][:, 0] / copy["ivar"][:, 0]).sqrt()  # [batch] S/N reduction of each spectrum
    assert float(factor.min()) >= 1.0 and float(factor.max()) <= 2.0 + 1e-5 and float(factor.std()) > 0.2
    assert copy["labels"] is data["labels"] and torch.equal(copy["mask"], data["mask"])
    assert (copy["ivar"][data["mask"]] == 0).all()
    again = augment(data, WAVE, fainter, step_generator(0, 4, stream=1))
    assert torch.equal(again["flux"], copy["flux"])
    other = augment(data, WAVE, fainter, step_generator(0, 4))
    assert not torch.equal(other["flux"], copy["flux"])  # stream 1 is not the augmentations' stream
    with pytest.raises(ValueError, match="> 1"):
        Augmentations(probability=1.0, renoise=1.0)


def test_pz_consistency_is_zero_for_equal_p_z_and_moves_only_the_copy():
    target = torch.randn(4, 30)
    assert float(pz_consistency(torch.cat([target, target + 5.0]))) == pytest.approx(0.0, abs=1e-6)
    logits = torch.cat([target, torch.randn(4, 30)]).requires_grad_()
    loss = pz_consistency(logits)
    loss.backward()
    assert float(loss.detach()) > 0.01
    assert (logits.grad[:4] == 0).all() and (logits.grad[4:] != 0).any()  # the spectrum's p(z) is the target


def test_consistency_training_is_resumable_and_acts(tmp_path, monkeypatch):
    values = dict(stage="redshift", consistency_renoise=2.0)
    assert_resumed_run_matches(tmp_path, monkeypatch, values, off={"consistency_renoise": 0.0})


def test_consistency_settings_are_checked():
    with pytest.raises(ValueError, match="consistency_renoise"):
        TrainingSettings(stage="redshift", consistency_renoise=0.5)
    with pytest.raises(ValueError, match="consistency_renoise"):
        TrainingSettings(stage="autoencoder", consistency_renoise=2.0)
    with pytest.raises(ValueError, match="consistency_weight"):
        TrainingSettings(stage="redshift", consistency_renoise=2.0, consistency_weight=-1.0)


def test_resolution_blur_conserves_flux_and_keeps_ivar_the_inverse_variance():
    data = batch(n=256)
    line = torch.zeros(WAVE.size)
    line[5000] = 50.0  # an unresolved emission line on the flat continuum
    lined = {**data, "flux": data["flux"] + line}
    out = augment(lined, WAVE, Augmentations(probability=1.0, resolution=2.0), step_generator(0, 6))
    window = slice(4980, 5021)
    torch.testing.assert_close(
        out["flux"][:, window].sum(1), lined["flux"][:, window].sum(1), rtol=0.02, atol=0.5
    )
    assert float(out["flux"][:, 5000].mean()) < 0.8 * float(lined["flux"][:, 5000].mean())  # the line widened
    good = ~data["mask"]
    blurred = augment(data, WAVE, Augmentations(probability=1.0, resolution=2.0), step_generator(0, 7))
    pull = ((blurred["flux"] - 1.0) * blurred["ivar"].sqrt())[good]
    assert float(pull.var()) == pytest.approx(1.0, rel=0.03)
    assert (blurred["ivar"][data["mask"]] == 0).all()


def test_sky_residuals_sit_on_sky_lines_only():
    from specpt_hf.data.mock import strong_sky_lines

    data = batch()
    out = augment(data, WAVE, Augmentations(probability=1.0, sky_residual=3.0), step_generator(0, 5))
    changed = (out["flux"] - data["flux"]).abs().amax(dim=0) > 1e-3  # [pixels]
    lines = strong_sky_lines(10.0)
    near = np.abs(WAVE[:, None] - lines[None]).min(axis=1) < 5.0  # within 5 sigma of a line
    assert changed.any() and not changed.numpy()[~near].any()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="augment_renoise"):
        Augmentations(renoise=0.5)
    with pytest.raises(ValueError, match="augment_probability"):
        Augmentations(probability=2.0)


def assert_resumed_run_matches(tmp_path, monkeypatch, values: dict, off: dict) -> None:
    """A tiny run with the settings `values`, cut after its first checkpoint and resumed, ends with the weights of
    the uninterrupted run, and those differ from a run with the settings `off` (the settings acted)."""
    from specpt_hf.data.mock import write_mock_release
    from specpt_hf.data.prepare import prepare_dataset

    write_mock_release(tmp_path / "raw", {"elg": 24, "lrg": 24}, seed=5, spectra_per_file=24, progress=False)
    prepare_dataset([tmp_path / "raw"], tmp_path / "data", fractions=(0.6, 0.2, 0.2), progress=False)
    values = dict(
        preset="specpt-tiny", data_dir=str(tmp_path / "data"), batch_size=8, max_steps=4, eval_steps=2,
        logging_steps=2, checkpointing_steps=2, report_to="none", disable_tqdm=True, seed=3, **values,
    )  # fmt: skip
    whole = training_function(TrainingSettings(**values, output_dir=str(tmp_path / "whole")))
    real_save = train_module.save_checkpoint

    def save_then_stop(accelerator, run_settings, step, *objects):
        real_save(accelerator, run_settings, step, *objects)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        training_function(TrainingSettings(**values, output_dir=str(tmp_path / "cut")))
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    resumed = training_function(TrainingSettings(**values, output_dir=str(tmp_path / "cut"), resume=True))
    expected, got = (load_file(r.model_dir / "model.safetensors") for r in (whole, resumed))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    plain = training_function(TrainingSettings(**{**values, **off}, output_dir=str(tmp_path / "plain")))
    differs = load_file(plain.model_dir / "model.safetensors")
    assert any(not torch.equal(differs[name], expected[name]) for name in expected)


def test_a_resumed_augmented_run_ends_with_the_same_weights(tmp_path, monkeypatch):
    amplitudes = dict(
        augment_calibration=0.02, augment_sky_residual=2.0, augment_masked_span=100, augment_renoise=2.0,
        augment_resolution=1.0, augment_ebv=0.1,
    )  # fmt: skip
    values = dict(stage="autoencoder", augment_probability=0.7, **amplitudes)
    assert_resumed_run_matches(tmp_path, monkeypatch, values, off={name: 0 for name in amplitudes})


def test_augment_until_step_augments_only_the_first_steps(tmp_path, monkeypatch):
    from specpt_hf.data.mock import write_mock_release
    from specpt_hf.data.prepare import prepare_dataset

    write_mock_release(tmp_path / "raw", {"elg": 16}, seed=6, spectra_per_file=16, progress=False)
    prepare_dataset([tmp_path / "raw"], tmp_path / "data", fractions=(0.6, 0.2, 0.2), progress=False)
    augmented_steps = []

    def recording(seed, step):
        augmented_steps.append(step)
        return step_generator(seed, step)

    monkeypatch.setattr(train_module, "step_generator", recording)
    settings = TrainingSettings(
        stage="autoencoder", preset="specpt-tiny", data_dir=str(tmp_path / "data"), batch_size=4, max_steps=5,
        eval_steps=5, logging_steps=5, checkpointing_steps=5, report_to="none", disable_tqdm=True,
        augment_probability=1.0, augment_calibration=0.02, augment_until_step=2, output_dir=str(tmp_path / "run"),
    )  # fmt: skip
    training_function(settings)
    assert augmented_steps == [0, 1]
    with pytest.raises(ValueError, match="augment_until_step"):
        TrainingSettings(augment_until_step=0)
