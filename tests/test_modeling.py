"""Tests of the SpecPT models: shapes, losses, save/load, weight transfer, batch independence, masks, bad input."""

from __future__ import annotations

import copy
import math
from collections import defaultdict

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.testing_utils import CaptureLogger

from specpt_hf import (
    SpecPTConfig,
    SpecPTForRedshift,
    SpecPTForRedshiftConfig,
    SpecPTForSpectrumReconstruction,
    SpecPTModel,
)
from specpt_hf import modeling_specpt as modeling

LAYOUTS = ["tokens", "paper"]
pytestmark = pytest.mark.usefixtures("single_thread")


class SpecPTModelTester:
    """Tiny configs and inputs for every SpecPT model (300 pixels, width 16)."""

    def __init__(
        self, layout: str = "tokens", batch_size: int = 3, num_pixels: int = 300, **overrides
    ) -> None:
        self.layout = layout
        self.batch_size = batch_size
        self.num_pixels = num_pixels
        self.overrides = overrides

    def backbone_kwargs(self) -> dict:
        common = dict(num_pixels=self.num_pixels, d_model=16, num_heads=2, ffn_dim=32, initializer_range=0.02)
        if self.layout == "paper":
            layout = dict(
                layout="paper", paper_conv_channels=[4, 8, 8], paper_conv_kernels=[9, 5, 3], num_layers=1
            )
            return {**common, **layout, "num_decoder_layers": 1}
        return {
            **common,
            "patch_size": 16,
            "stem_channels": 8,
            "num_position_frequencies": 4,
            "num_layers": 2,
        }

    def get_config(self, task: str = "autoencoder") -> SpecPTConfig:
        kwargs = {**self.backbone_kwargs(), **self.overrides}
        if task == "autoencoder":
            return SpecPTConfig(**kwargs)
        head = dict(num_redshift_bins=16, head_num_blocks=1, z_min=0.0, z_max=2.0)
        return SpecPTForRedshiftConfig(**{**head, **kwargs})

    def num_tokens(self) -> int:
        return 1 if self.layout == "paper" else math.ceil(self.num_pixels / 16)

    def prepare_inputs(
        self, factory, seed: int = 0, batch_size: int | None = None
    ) -> dict[str, torch.Tensor]:
        spectra = factory(batch=batch_size or self.batch_size, num_pixels=self.num_pixels, seed=seed)
        return {key: spectra[key] for key in ("flux", "ivar", "mask")}

    def redshift_labels(self, batch_size: int | None = None) -> torch.Tensor:
        return torch.linspace(0.05, 1.9, batch_size or self.batch_size)


def build(model_class, config):
    torch.manual_seed(0)
    return model_class(config)


def tiny_model(task: str, layout: str = "tokens", **overrides):
    tester = SpecPTModelTester(layout, **overrides)
    cls = SpecPTForSpectrumReconstruction if task == "autoencoder" else SpecPTForRedshift
    return tester, build(cls, tester.get_config(task))


# ---------------------------------------------------------------------------------------------------------------
# shapes, losses, gradients
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["attention", "mean"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backbone_output_shapes(layout, pooling, spectra_factory):
    tester = SpecPTModelTester(layout, pooling=pooling)
    model = build(SpecPTModel, tester.get_config()).eval()
    out = model(**tester.prepare_inputs(spectra_factory))
    b, t = tester.batch_size, tester.num_tokens()
    assert out.last_hidden_state.shape == (b, t, 16)
    assert out.pooled.shape == (b, 16)
    assert out.token_padding_mask.shape == (b, t) and out.token_padding_mask.dtype == torch.bool
    assert out.token_wavelength.shape == (b, t)
    assert out.scale.shape == (b,) and (out.scale > 0).all()
    assert torch.isfinite(out.pooled).all()


def test_token_wavelengths_follow_the_grid(spectra_factory):
    tester = SpecPTModelTester()
    model = build(SpecPTModel, tester.get_config()).eval()
    out = model(**tester.prepare_inputs(spectra_factory))
    # first token: pixels 0..15 of 3600 + 0.8 i -> mean 3606 A; tokens step by 16 pixels = 12.8 A
    assert out.token_wavelength[0, 0].item() == pytest.approx(3600.0 + 0.8 * 7.5)
    assert torch.allclose(
        out.token_wavelength[0].diff(), torch.full((tester.num_tokens() - 1,), 12.8), atol=1e-3
    )


@pytest.mark.parametrize("loss_kind", ["chi2", "l1"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reconstruction_forward_backward(layout, loss_kind, spectra_factory):
    tester, model = tiny_model("autoencoder", layout, reconstruction_loss=loss_kind)
    inputs = tester.prepare_inputs(spectra_factory)
    out = model(**inputs, labels=inputs["flux"])
    assert out.reconstruction.shape == (tester.batch_size, tester.num_pixels)
    assert out.embedding.shape == (tester.batch_size, 16)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"


def test_reconstruction_loss_weights_pixels_by_ivar():
    reconstruction = torch.zeros(1, 4)
    target = torch.tensor([[1.0, 1.0, 2.0, 5.0]])
    ivar = torch.tensor([[1.0, 4.0, 1.0, 0.0]])
    good = ivar > 0
    chi2 = modeling.reconstruction_loss(reconstruction, target, ivar, good, "chi2")
    l1 = modeling.reconstruction_loss(reconstruction, target, ivar, good, "l1")
    assert chi2.item() == pytest.approx((1 * 1 + 4 * 1 + 1 * 4) / 3)
    assert l1.item() == pytest.approx((1 + 1 + 2) / 3)


@pytest.mark.parametrize(
    ("layout", "head_type"), [("tokens", "pz"), ("tokens", "paper"), ("paper", "pz"), ("paper", "paper")]
)
def test_redshift_forward_backward(layout, head_type, spectra_factory):
    tester, model = tiny_model("redshift", layout, head_type=head_type)
    inputs = tester.prepare_inputs(spectra_factory)
    out = model(**inputs, labels=tester.redshift_labels())
    b = tester.batch_size
    assert out.redshift.shape == (b,) and out.embedding.shape == (b, 16)
    assert torch.isfinite(out.loss) and out.loss.dim() == 0
    if head_type == "pz":
        assert out.logits.shape == out.offsets.shape == out.log_sigma.shape == (b, 16)
        assert out.redshift_err.shape == out.quality.shape == (b,)
        assert ((out.redshift >= 0.0) & (out.redshift <= 2.0)).all()
        assert (out.redshift_err > 0).all()
        assert ((out.quality >= 0) & (out.quality <= 1)).all()
        assert (out.offsets.abs() <= 1.0).all()
    else:
        assert out.redshift_err is None and out.quality is None and out.logits is None
        assert (out.redshift >= 0.0).all()
    out.loss.backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"


def test_other_wavelength_grid(spectra_factory):
    """The tokens layout takes another grid through `wavelength`; the paper layout refuses another length."""
    tester, model = tiny_model("redshift")
    spectra = spectra_factory(batch=2, num_pixels=200, wavelength_start=5000.0, wavelength_step=1.0)
    out = model.eval()(spectra["flux"], ivar=spectra["ivar"], wavelength=spectra["wavelength"])
    assert out.redshift.shape == (2,)
    encoded = model.specpt(spectra["flux"], wavelength=spectra["wavelength"])
    assert encoded.token_wavelength[0, 0].item() == pytest.approx(5007.5)
    _, paper = tiny_model("autoencoder", "paper")
    with pytest.raises(ValueError, match="paper"):
        paper(spectra["flux"], wavelength=spectra["wavelength"])


# ---------------------------------------------------------------------------------------------------------------
# the p(z) head
# ---------------------------------------------------------------------------------------------------------------


def test_pz_prediction_from_known_outputs():
    _, model = tiny_model("redshift")
    bins, width = 16, math.log(3.0) / 16
    logits = torch.full((2, bins), -30.0)
    logits[0, 5] = 10.0  # all mass in bin 5
    logits[1, 9:12] = 0.0  # mass spread over bins 9, 10, 11
    offsets = torch.zeros(2, bins)
    offsets[0, 5] = 0.25
    log_sigma = torch.full((2, bins), math.log(0.1))
    z, err, quality = model._predict_pz(logits, offsets, log_sigma)
    u0 = (5 + 0.5 + 0.25) * width
    assert z[0].item() == pytest.approx(math.expm1(u0), rel=1e-5)
    assert err[0].item() == pytest.approx((1 + math.expm1(u0)) * 0.1 * width, rel=1e-4)
    assert quality[0].item() == pytest.approx(1.0, abs=1e-6)
    spread = math.sqrt(2 / 3) * width  # three equal bins: variance 2/3 bin widths^2
    assert err[1].item() == pytest.approx((1 + z[1].item()) * math.hypot(0.1 * width, spread), rel=1e-4)
    assert quality[1].item() == pytest.approx(1.0, abs=1e-6)


def test_redshift_pdf_is_normalised():
    _, model = tiny_model("redshift")
    logits = torch.randn(2, 16)
    z, probability = model.redshift_pdf(logits)
    assert z.shape == (16,) and (z.diff() > 0).all() and z[0] > 0.0 and z[-1] < 2.0
    assert torch.allclose(probability.sum(-1), torch.ones(2))
    _, density = model.redshift_pdf(logits, density=True)
    dz = (1 + z) * model.config.redshift_bin_width  # width of each bin in z
    assert torch.allclose((density * dz).sum(-1), torch.ones(2), atol=1e-5)


def test_pz_loss_prefers_the_true_bin():
    _, model = tiny_model("redshift")
    labels = torch.tensor([0.5])
    true_bin = int(math.log1p(0.5) / model.config.redshift_bin_width)
    offsets, log_sigma = torch.zeros(1, 16), torch.zeros(1, 16)
    right, wrong = torch.zeros(1, 16), torch.zeros(1, 16)
    right[0, true_bin], wrong[0, (true_bin + 5) % 16] = 5.0, 5.0
    assert model._pz_loss(labels, right, offsets, log_sigma) < model._pz_loss(
        labels, wrong, offsets, log_sigma
    )


def test_soft_bin_target_is_a_gaussian_centred_on_the_true_redshift():
    _, model = tiny_model("redshift", redshift_label_sigma=1.5)
    position = torch.tensor([7.3, 8.0])  # true ln(1 + z), in bin widths
    target = model._bin_target(position, position.floor().long())  # [2, bins]
    centers = torch.arange(model.config.num_redshift_bins) + 0.5
    assert torch.allclose(target.sum(-1), torch.ones(2))
    assert torch.allclose((target * centers).sum(-1), position, atol=1e-3)
    assert (
        target[0].argmax() == 7 and target[0, 6] > target[0, 9]
    )  # peak in the true bin, falls off with distance


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_soft_labels_make_a_near_miss_cheaper_than_a_far_one(sigma):
    _, model = tiny_model("redshift", redshift_label_sigma=sigma)
    labels = torch.tensor([0.5])
    true_bin = int(math.log1p(0.5) / model.config.redshift_bin_width)
    offsets, log_sigma = torch.zeros(1, 16), torch.zeros(1, 16)
    near, far = torch.zeros(1, 16), torch.zeros(1, 16)
    near[0, true_bin + 1], far[0, true_bin - 5] = 5.0, 5.0
    gap = model._pz_loss(labels, far, offsets, log_sigma) - model._pz_loss(labels, near, offsets, log_sigma)
    if sigma == 0:  # one-hot: any wrong bin costs the same
        assert abs(gap) < 1e-5
    else:
        assert gap > 1.0


@pytest.mark.parametrize("head_type", ["pz", "paper"])
def test_redshift_model_learns(head_type, spectra_factory):
    """A few optimiser steps on four fixed spectra lower the loss substantially."""
    tester, model = tiny_model("redshift", head_type=head_type, dropout=0.0, head_dropout=0.0)
    inputs = tester.prepare_inputs(spectra_factory, batch_size=4)
    labels = tester.redshift_labels(4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5 * abs(losses[0]), losses


# ---------------------------------------------------------------------------------------------------------------
# save / load, transfer, initialisation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("model_class", [SpecPTModel, SpecPTForSpectrumReconstruction, SpecPTForRedshift])
def test_save_load_round_trip(model_class, layout, tmp_path, spectra_factory):
    tester = SpecPTModelTester(layout)
    task = "redshift" if model_class is SpecPTForRedshift else "autoencoder"
    model = build(model_class, tester.get_config(task)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    loaded, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    inputs = tester.prepare_inputs(spectra_factory)
    with torch.no_grad():
        expected, actual = model(**inputs).to_tuple(), loaded(**inputs).to_tuple()
    for a, e in zip(actual, expected, strict=True):
        assert torch.equal(a, e)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_autoencoder_to_redshift_transfer(layout, tmp_path, spectra_factory):
    tester, autoencoder = tiny_model("autoencoder", layout)
    # make the BatchNorm statistics non-trivial so that their transfer is visible
    autoencoder.train()(**tester.prepare_inputs(spectra_factory))
    autoencoder.save_pretrained(tmp_path)

    logger = modeling.logger
    with CaptureLogger(logger) as captured:
        model, info = SpecPTForRedshift.from_pretrained(
            tmp_path, output_loading_info=True, num_redshift_bins=16
        )
    assert model.config.model_type == "specpt_redshift" and model.config.num_redshift_bins == 16
    assert info["missing_keys"] and all(key.startswith("head.") for key in info["missing_keys"])
    assert info["unexpected_keys"] and all(key.startswith("decoder.") for key in info["unexpected_keys"])
    for group in ("loaded", "newly initialised", "unused", "specpt.encoder", "head.", "decoder."):
        assert group in captured.out, captured.out

    source = autoencoder.specpt.state_dict()
    for key, value in model.specpt.state_dict().items():
        assert torch.equal(value, source[key]), key
    # the head was initialised here: finite, with the configured spread
    for name, param in model.head.named_parameters():
        assert torch.isfinite(param).all(), name
        if name.endswith("weight") and param.dim() == 2:
            assert 0.5 * 0.02 < param.std().item() < 2 * 0.02, (name, param.std().item())
    for name, buffer in model.named_buffers():
        assert torch.isfinite(buffer.float()).all(), name
    out = model(**tester.prepare_inputs(spectra_factory))
    assert torch.isfinite(out.redshift).all()

    backbone, info = SpecPTModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert all(torch.equal(v, source[k]) for k, v in backbone.state_dict().items())


def test_non_persistent_buffers_are_rebuilt_on_load(tmp_path):
    tester, autoencoder = tiny_model("autoencoder")
    autoencoder.save_pretrained(tmp_path)
    model = SpecPTForRedshift.from_pretrained(tmp_path)
    expected = modeling.SpecPTWavelengthEncoding.default_frequencies(4)
    assert torch.equal(model.specpt.stem.position.frequencies, expected)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("model_class", [SpecPTForSpectrumReconstruction, SpecPTForRedshift])
def test_init_weights_covers_every_tensor(model_class, layout):
    """Built on meta (as transformers does), materialised as NaN: `initialize_weights` must fill everything."""
    task = "redshift" if model_class is SpecPTForRedshift else "autoencoder"
    config = SpecPTModelTester(layout).get_config(task)
    with torch.device("meta"):
        model = model_class(config)
    model.to_empty(device="cpu")
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            tensor.data.fill_(float("nan"))
    model.initialize_weights()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.isfinite(tensor.float()).all(), name


def test_freeze_encoder(tmp_path, spectra_factory):
    tester, autoencoder = tiny_model("autoencoder", "paper")
    autoencoder.save_pretrained(tmp_path)
    model = SpecPTForRedshift.from_pretrained(tmp_path, freeze_encoder=True)
    assert model.config.freeze_encoder
    assert not any(p.requires_grad for p in model.specpt.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    model.train()
    assert model.head.training and not model.specpt.training
    running_mean = model.specpt.stem.blocks[0].norm.running_mean.clone()
    out = model(**tester.prepare_inputs(spectra_factory), labels=tester.redshift_labels())
    out.loss.backward()
    assert torch.equal(model.specpt.stem.blocks[0].norm.running_mean, running_mean)  # BatchNorm fixed


# ---------------------------------------------------------------------------------------------------------------
# behaviour: batch independence, masks, tuple/dict
# ---------------------------------------------------------------------------------------------------------------


def _outputs(model, inputs):
    with torch.no_grad():
        return [t for t in model(**inputs).to_tuple() if t.dim() > 0]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("task", ["autoencoder", "redshift", "backbone"])
def test_batch_independence(task, layout, spectra_factory):
    tester = SpecPTModelTester(layout)
    model = build(SpecPTModel, tester.get_config()) if task == "backbone" else tiny_model(task, layout)[1]
    model.eval()
    inputs = tester.prepare_inputs(spectra_factory, seed=1, batch_size=4)
    alone = _outputs(model, {k: v[:1] for k, v in inputs.items()})
    for seed in (2, 3):
        mates = tester.prepare_inputs(spectra_factory, seed=seed, batch_size=4)
        batch = {k: torch.cat([inputs[k][:1], mates[k][1:]]) for k in inputs}
        for single, batched in zip(alone, _outputs(model, batch), strict=True):
            assert torch.allclose(single[0], batched[0], atol=1e-5), (single[0], batched[0])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("task", ["autoencoder", "redshift"])
def test_bad_pixels_cannot_change_outputs(task, layout, spectra_factory):
    tester, model = tiny_model(task, layout)
    model.eval()
    inputs = tester.prepare_inputs(spectra_factory)
    labels = inputs["flux"].clone() if task == "autoencoder" else tester.redshift_labels()
    zero_ivar = inputs["ivar"] == 0
    assert zero_ivar.any()
    changed = dict(
        inputs, flux=torch.where(zero_ivar, 1e6 * torch.randn_like(inputs["flux"]), inputs["flux"])
    )
    changed["flux"][inputs["mask"]] = float("nan")
    changed_labels = torch.where(zero_ivar, -7.0, labels) if task == "autoencoder" else labels
    with torch.no_grad():
        reference = model(**inputs, labels=labels).to_tuple()
        result = model(**changed, labels=changed_labels).to_tuple()
    for a, b in zip(reference, result, strict=True):
        assert torch.equal(a, b)
    # ...while a change at a good pixel does change them
    moved = dict(inputs, flux=inputs["flux"] * torch.linspace(0.5, 2.0, tester.num_pixels))
    key = "reconstruction" if task == "autoencoder" else "embedding"
    with torch.no_grad():
        assert not torch.allclose(model(**moved)[key], model(**inputs)[key])


def test_mask_and_ivar_zero_are_equivalent(spectra_factory):
    tester, model = tiny_model("redshift")
    model.eval()
    inputs = tester.prepare_inputs(spectra_factory)
    by_mask = dict(inputs, ivar=torch.where(inputs["mask"], 1.0, inputs["ivar"]))
    by_ivar = dict(inputs, mask=None)
    with torch.no_grad():
        assert torch.equal(model(**by_mask).redshift, model(**by_ivar).redshift)


def test_normalisation_makes_outputs_scale_free(spectra_factory):
    tester, model = tiny_model("redshift")
    model.eval()
    inputs = tester.prepare_inputs(spectra_factory)
    scaled = dict(inputs, flux=inputs["flux"] * 1e3, ivar=inputs["ivar"] * 1e-6)
    with torch.no_grad():
        a, b = model(**inputs), model(**scaled)
    assert torch.allclose(a.logits, b.logits, atol=1e-4)
    assert torch.allclose(
        b.scale if hasattr(b, "scale") else model.specpt(**scaled).scale,
        1e3 * model.specpt(**inputs).scale,
        rtol=1e-5,
    )


@pytest.mark.parametrize("task", ["autoencoder", "redshift"])
def test_tuple_dict_equivalence(task, spectra_factory):
    tester, model = tiny_model(task)
    model.eval()
    inputs = tester.prepare_inputs(spectra_factory)
    labels = inputs["flux"] if task == "autoencoder" else tester.redshift_labels()
    with torch.no_grad():
        as_dict = model(**inputs, labels=labels, return_dict=True)
        as_tuple = model(**inputs, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    keys = [k for k, v in as_dict.items() if v is not None]
    assert len(as_tuple) == len(keys)
    for key, value in zip(keys, as_tuple, strict=True):
        assert torch.equal(as_dict[key], value), key


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------


def _bad_cases(inputs):
    flux, ivar, mask = inputs["flux"], inputs["ivar"], inputs["mask"]
    good = (ivar > 0).nonzero()[0].tolist()
    nan_flux, inf_flux, negative_ivar, no_good = flux.clone(), flux.clone(), ivar.clone(), ivar.clone()
    nan_flux[good[0], good[1]] = float("nan")
    inf_flux[good[0], good[1]] = float("inf")
    negative_ivar[0, 3] = -1.0
    no_good[1] = 0.0
    return {
        "wrong pixel count": (dict(flux=flux[:, :-1]), "pixels"),
        "1-d flux": (dict(flux=flux[0]), "flux"),
        "integer flux": (dict(flux=flux.long()), "flux"),
        "nan flux": (dict(flux=nan_flux, ivar=ivar), "NaN"),
        "inf flux": (dict(flux=inf_flux, ivar=ivar), "NaN/inf"),
        "negative ivar": (dict(flux=flux, ivar=negative_ivar), "ivar"),
        "ivar shape": (dict(flux=flux, ivar=ivar[:, :-1]), "ivar"),
        "mask shape": (dict(flux=flux, mask=mask[:2]), "mask"),
        "float mask": (dict(flux=flux, mask=mask.float()), "mask"),
        "no good pixel": (dict(flux=flux, ivar=no_good), "no good pixel"),
        "not a tensor": (dict(flux=flux.tolist()), "flux"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "wrong pixel count",
        "1-d flux",
        "integer flux",
        "nan flux",
        "inf flux",
        "negative ivar",
        "ivar shape",
        "mask shape",
        "float mask",
        "no good pixel",
        "not a tensor",
    ],
)
def test_bad_input_raises_value_error(case, spectra_factory):
    tester, model = tiny_model("redshift")
    kwargs, message = _bad_cases(tester.prepare_inputs(spectra_factory))[case]
    with pytest.raises(ValueError, match=message):
        model(**kwargs)


def test_unknown_arguments_are_rejected(spectra_factory):
    tester, model = tiny_model("redshift")
    inputs = tester.prepare_inputs(spectra_factory)
    with pytest.raises(TypeError, match="ivars"):
        model(inputs["flux"], ivars=inputs["ivar"])


def test_nan_flux_at_bad_pixels_is_allowed(spectra_factory):
    tester, model = tiny_model("autoencoder")
    inputs = tester.prepare_inputs(spectra_factory)
    flux = torch.where(inputs["mask"], float("nan"), inputs["flux"])
    out = model(flux, mask=inputs["mask"], labels=flux)
    assert torch.isfinite(out.loss) and torch.isfinite(out.reconstruction).all()


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([0.1, 2.5, 0.3], "outside"),
        ([0.1, float("nan"), 0.3], "NaN"),
        ([-0.1, 0.2, 0.3], "outside"),
        ([0.1, 0.2], "one redshift"),
    ],
)
def test_bad_redshift_labels(labels, message, spectra_factory):
    tester, model = tiny_model("redshift")
    with pytest.raises(ValueError, match=message):
        model(**tester.prepare_inputs(spectra_factory), labels=torch.tensor(labels))


def test_bad_reconstruction_labels(spectra_factory):
    tester, model = tiny_model("autoencoder")
    inputs = tester.prepare_inputs(spectra_factory)
    with pytest.raises(ValueError, match="labels"):
        model(**inputs, labels=inputs["flux"][:, :10])


# ---------------------------------------------------------------------------------------------------------------
# attention: implementations, torch's transformer modules, legacy checkpoints, outputs, checkpointing
# ---------------------------------------------------------------------------------------------------------------

IMPLEMENTATIONS = ["eager", "sdpa"]


def _layer_config(layout: str, implementation: str) -> SpecPTConfig:
    config = SpecPTModelTester(layout).get_config()
    config._attn_implementation = implementation
    return config


def _token_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """States [3, 7, 16] and a key padding [3, 7] (True = ignored) that leaves every row some tokens."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 7, 16, generator=generator)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 5:] = True
    padding[2, :3] = True
    return hidden, padding


def _stack(layer: torch.nn.Module) -> torch.nn.Module:
    """A module holding `layer` as `layers.0`, as the encoders and decoders do."""
    stack = torch.nn.Module()
    stack.layers = torch.nn.ModuleList([layer])
    return stack


def _converted(legacy: torch.nn.Module, new: torch.nn.Module) -> torch.nn.Module:
    """`new` with the weights of `legacy` (torch's modules) through `convert_legacy_state_dict`, strictly."""
    new.load_state_dict(modeling.convert_legacy_state_dict(legacy.state_dict()), strict=True)
    return new


def _randomise(module: torch.nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(0.3 * torch.randn_like(param))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_encoder_layer_matches_torch_transformer_encoder_layer(layout, implementation):
    """Same weights, same results as `nn.TransformerEncoderLayer` with the settings SpecPT used (pre-norm GELU for
    `tokens`, post-norm ReLU for `paper`), key padding included, in its fused inference path and with gradients."""
    config = _layer_config(layout, implementation)
    paper = layout == "paper"
    legacy = _stack(
        torch.nn.TransformerEncoderLayer(
            16, 2, 32, 0.1, "relu" if paper else "gelu", 1e-5, batch_first=True, norm_first=not paper
        )
    )
    _randomise(legacy)
    new = _converted(legacy, _stack(modeling.SpecPTEncoderLayer(config))).layers[0].eval()
    legacy = legacy.layers[0].eval()
    hidden, padding = _token_batch()
    mask = modeling.key_padding_mask(config, hidden, padding)
    expected = legacy(hidden, src_key_padding_mask=padding)  # with gradients: the unfused path
    torch.testing.assert_close(new(hidden, mask), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # torch's fused inference path
        torch.testing.assert_close(
            new(hidden, mask), legacy(hidden, src_key_padding_mask=padding), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_decoder_layer_matches_torch_transformer_decoder_layer(implementation):
    config = _layer_config("paper", implementation)
    legacy = _stack(torch.nn.TransformerDecoderLayer(16, 2, 32, 0.1, layer_norm_eps=1e-5, batch_first=True))
    _randomise(legacy)
    new = _converted(legacy, _stack(modeling.SpecPTDecoderLayer(config))).layers[0].eval()
    hidden, _ = _token_batch()
    context, _ = _token_batch(seed=1)
    torch.testing.assert_close(
        new(hidden, context), legacy.layers[0].eval()(hidden, context), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_cross_attention_matches_torch_multihead_attention(implementation):
    """A learned query over padded tokens, as in the attention pooling and the paper head."""
    config = _layer_config("tokens", implementation)
    legacy = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    _randomise(legacy)
    new = _converted(legacy, modeling.SpecPTAttention(config))
    hidden, padding = _token_batch()
    query = torch.randn(1, 1, 16).expand(3, -1, -1)
    mask = modeling.key_padding_mask(config, query, padding, hidden)
    expected, _ = legacy(query, hidden, hidden, key_padding_mask=padding, need_weights=False)
    actual, weights = new(query, mask, hidden)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    if implementation == "eager":
        assert weights.shape == (3, 2, 1, 7) and torch.all(weights.transpose(1, 3)[padding] == 0)


def _legacy_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s weights under the names torch's transformer modules give them: packed q/k/v `in_proj_*`,
    `linear1/2`, `norm1/2/3`, `multihead_attn`."""
    legacy, packed = {}, defaultdict(dict)
    for key, tensor in model.state_dict().items():
        for name, old in (
            (".mlp.fc", ".linear"),
            (".layer_norm", ".norm"),
            (".cross_attn.", ".multihead_attn."),
        ):
            key = key.replace(name, old)
        module, _, projection_kind = key.rpartition(".")
        module, _, projection = module.rpartition(".")
        if projection in ("q_proj", "k_proj", "v_proj"):
            packed[f"{module}.in_proj_{projection_kind}"][projection] = tensor
        else:
            legacy[key] = tensor
    for key, parts in packed.items():
        legacy[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])  # [3 d_model(, d_model)]
    return legacy


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    ("model_class", "head_type"),
    [
        (SpecPTModel, None),
        (SpecPTForSpectrumReconstruction, None),
        (SpecPTForRedshift, "pz"),
        (SpecPTForRedshift, "paper"),
    ],
)
def test_legacy_checkpoints_load(model_class, head_type, layout, tmp_path, spectra_factory):
    tester = SpecPTModelTester(layout, **({"head_type": head_type} if head_type else {}))
    config = tester.get_config("redshift" if model_class is SpecPTForRedshift else "autoencoder")
    model = build(model_class, config).eval()
    legacy = _legacy_state_dict(model)
    assert any(key.endswith("in_proj_weight") for key in legacy) and not any(
        "q_proj" in key for key in legacy
    )
    config.save_pretrained(tmp_path)
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})

    loaded, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    by_hook = build(model_class, config).eval()
    by_hook.load_state_dict(legacy)
    inputs = tester.prepare_inputs(spectra_factory)
    with torch.no_grad():
        expected = model(**inputs).to_tuple()
        for other in (loaded, by_hook):
            for a, e in zip(other(**inputs).to_tuple(), expected, strict=True):
                assert torch.equal(a, e)
    # saved again, it is in the new layout
    loaded.save_pretrained(tmp_path / "again")
    assert set(load_file(tmp_path / "again" / "model.safetensors")) == set(model.state_dict())


def test_convert_legacy_state_dict_leaves_other_weights_alone():
    _, model = tiny_model("autoencoder")
    weights = model.state_dict()
    converted = modeling.convert_legacy_state_dict(weights)
    assert converted.keys() == weights.keys()
    assert all(converted[key] is tensor for key, tensor in weights.items())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("task", ["autoencoder", "redshift"])
def test_attention_implementations_agree(task, layout, tmp_path, spectra_factory):
    tester, model = tiny_model(task, layout)
    assert model.config._attn_implementation == "sdpa"  # the default
    model.save_pretrained(tmp_path)
    cls = type(model)
    inputs = tester.prepare_inputs(spectra_factory)
    inputs["mask"][0, :40] = True  # two tokens without a good pixel
    outputs = {}
    for implementation in IMPLEMENTATIONS:
        loaded = cls.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        assert loaded.config._attn_implementation == implementation
        with torch.no_grad():
            outputs[implementation] = loaded(**inputs).to_tuple()
    for eager, sdpa in zip(*outputs.values(), strict=True):
        torch.testing.assert_close(eager, sdpa, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hidden_states_and_attentions(layout, spectra_factory):
    tester = SpecPTModelTester(layout)
    config = tester.get_config()
    model = build(SpecPTModel, config).eval()
    model.set_attn_implementation("eager")  # the one that computes attention weights
    inputs = tester.prepare_inputs(spectra_factory)
    inputs["mask"][0, :40] = True  # tokens 0 and 1 of spectrum 0 hold no good pixel
    with torch.no_grad():
        plain = model(**inputs)
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
    assert plain.hidden_states is None and plain.attentions is None
    b, t = tester.batch_size, tester.num_tokens()
    assert len(out.hidden_states) == config.num_layers + 1 and len(out.attentions) == config.num_layers
    assert all(h.shape == (b, t, 16) for h in out.hidden_states)
    last = out.hidden_states[-1] if layout == "paper" else model.encoder.norm(out.hidden_states[-1])
    torch.testing.assert_close(last, out.last_hidden_state)
    for weights in out.attentions:
        assert weights.shape == (b, 2, t, t)
        torch.testing.assert_close(weights.sum(-1), torch.ones(b, 2, t))
        assert torch.all(weights.transpose(1, 3)[out.token_padding_mask] == 0)  # padded tokens are no keys
    if layout == "tokens":
        assert out.token_padding_mask[0, :2].all()
    torch.testing.assert_close(out.last_hidden_state, plain.last_hidden_state)


@pytest.mark.parametrize("task", ["autoencoder", "redshift"])
def test_task_models_return_the_backbone_states(task, spectra_factory):
    tester, model = tiny_model(task, output_hidden_states=True)
    model.eval().set_attn_implementation("eager")  # the one that computes attention weights
    inputs = tester.prepare_inputs(spectra_factory)
    with torch.no_grad():
        out = model(**inputs)  # the config asks for the hidden states
        backbone = model.specpt(**inputs, output_hidden_states=True)
        as_tuple = model(**inputs, output_hidden_states=False, return_dict=False)
    assert len(out.hidden_states) == 3
    for a, b in zip(out.hidden_states, backbone.hidden_states, strict=True):
        assert torch.equal(a, b)
    assert not any(isinstance(value, tuple) for value in as_tuple)
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    assert len(attentions) == 2 and attentions[0].shape == (3, 2, tester.num_tokens(), tester.num_tokens())
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="eager"):  # sdpa computes no weights
        model(**inputs, output_attentions=True)


def _gradients(model, inputs, labels) -> dict[str, torch.Tensor]:
    torch.manual_seed(5)  # the same dropout masks
    model.train()
    model(**inputs, labels=labels).loss.backward()
    return {name: param.grad for name, param in model.named_parameters()}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("task", ["autoencoder", "redshift"])
def test_gradient_checkpointing_gives_the_same_gradients(task, layout, spectra_factory):
    tester, model = tiny_model(task, layout)
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable()
    layers = [m for m in checkpointed.modules() if isinstance(m, modeling.GradientCheckpointingLayer)]
    decoder_layers = model.config.num_decoder_layers if task == "autoencoder" else 0
    assert len(layers) == model.config.num_layers + decoder_layers
    assert all(layer.gradient_checkpointing for layer in layers)
    calls = []
    layers[0].mlp.register_forward_hook(lambda *args: calls.append(1))
    inputs = tester.prepare_inputs(spectra_factory)
    labels = inputs["flux"] if task == "autoencoder" else tester.redshift_labels()
    expected = _gradients(model, inputs, labels)
    actual = _gradients(checkpointed, inputs, labels)
    assert len(calls) == 2  # the forward pass and its recomputation in the backward pass
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-5, atol=1e-7, msg=name)
