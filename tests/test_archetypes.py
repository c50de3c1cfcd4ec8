"""Archetypes: the χ²(z) of whole rest-frame spectra, their whole-range choice in the refinement, the folder files and
`specpt archetypes`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_refinement import WAVELENGTH, _model_inputs, _true_templates

from specpt_hf import SpecPTForRedshift, create_model
from specpt_hf.archetypes import build_archetypes
from specpt_hf.archetypes import main as archetypes_main
from specpt_hf.hub.repo_folder import write_repo_folder
from specpt_hf.prediction import model_wavelength
from specpt_hf.presets import preset_config
from specpt_hf.refinement import RestFrameTemplates, archetype_curve, archetype_redshifts


@pytest.fixture(scope="module")
def templates() -> RestFrameTemplates:
    return _true_templates()


def _archetypes(templates: RestFrameTemplates) -> RestFrameTemplates:
    """Two whole spectra of `templates`' basis: one with the [O II] / Hα family, one with the Balmer / [O III] one."""
    basis = templates.basis.double()
    shapes = torch.stack(
        [1.5 * basis[0] + basis[2] + 4.0 * basis[3], 1.5 * basis[0] + basis[2] + 2.5 * basis[4]]
    )
    return RestFrameTemplates(templates.log_wavelength_start, templates.log_wavelength_step, shapes.float())


def test_archetype_curve_is_lowest_at_the_redshift_of_a_scaled_archetype_on_a_slope():
    wave = torch.as_tensor(model_wavelength(preset_config("specpt-tiny", "redshift")))
    step = 1e-4
    rest = np.exp(
        np.log(wave[0].item() / 3.0)
        + step * np.arange(int(np.log(3.0 * wave[-1].item() / wave[0].item()) / step))
    )
    lines = [np.exp(-0.5 * ((rest - c) / 3.0) ** 2) for c in (3728.0, 4863.0, 5008.0, 6565.0)]
    shapes = torch.tensor(
        np.stack([1.0 + 8.0 * lines[0] + 3.0 * lines[2], 1.0 + 5.0 * lines[1] + 9.0 * lines[3]])
    )
    sets = RestFrameTemplates(float(np.log(rest[0])), step, shapes.float())  # two archetypes [2, grid]
    z_true = np.array([0.35, 0.8])
    slope = 0.3 * (wave.double() - wave.double().mean()) / (wave.double().max() - wave.double().min())
    flux = torch.stack(
        [
            2.0 * torch.as_tensor(np.interp(wave / (1 + z), rest, shapes[i].numpy())) + slope
            for i, z in enumerate(z_true)
        ]
    ).float()  # archetype 0 at 0.35, archetype 1 at 0.8, tilted
    ivar = torch.full_like(flux, 100.0)
    scan_u = torch.arange(0.05, 1.0, 3 * step, dtype=torch.float64)
    chi2 = archetype_curve(sets, wave, flux, ivar, scan_u)  # [2, grid]
    np.testing.assert_allclose(scan_u[chi2.argmin(1)].numpy(), np.log1p(z_true), atol=3 * step)
    assert torch.all(chi2.min(1).values < 0.05 * chi2.median(1).values)
    per_row = archetype_curve(sets, wave.expand(2, -1), flux, ivar, scan_u)  # a grid per spectrum: the same
    torch.testing.assert_close(per_row, chi2)


def test_archetype_redshifts_choose_the_whole_ranges_minimum_within_each_sets_range(templates):
    archetypes = _archetypes(templates)
    flux, ivar = _model_inputs(templates, np.array([0.3, 0.6]), seed=2).values()
    wave = torch.from_numpy(WAVELENGTH)
    scan_u = torch.arange(0.0, math.log(3.0), 3 * templates.log_wavelength_step, dtype=torch.float64)
    u, delta = archetype_redshifts({"GALAXY": archetypes}, wave, flux, ivar, scan_u, rebin=3)
    np.testing.assert_allclose(u.numpy(), np.log1p([0.3, 0.6]), atol=4 * templates.log_wavelength_step)
    assert (delta > 100).all()  # a second minimum >= 1000 km/s away fits far worse
    prior = torch.where((scan_u - math.log1p(0.3)).abs() < 0.01, 1e9, 0.0).expand(2, -1)  # rules out z = 0.3
    moved, _ = archetype_redshifts({"GALAXY": archetypes}, wave, flux, ivar, scan_u, prior, rebin=3)
    assert abs(moved[0] - math.log1p(0.3)) > 0.01 and abs(moved[1] - math.log1p(0.6)) < 1e-3
    far = archetype_redshifts(
        {"GALAXY": archetypes},
        wave,
        *_model_inputs(templates, np.array([1.9]), seed=2).values(),
        scan_u,
        rebin=3,
    )[0]
    assert math.expm1(float(far[0])) <= 1.7  # galaxy archetypes stop where Redrock's galaxy templates do


def _misread(model: SpecPTForRedshift, z: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits, offsets, quality of a p(z) certain that the spectrum's [O III] 5007 is [O II] ([1, bins])."""
    misread = math.log1p(z) + math.log(5006.8 / 3727.0)
    bins = model.redshift_bin_centers().double()
    logits = torch.full((1, model.config.num_redshift_bins), -30.0)
    logits[0, (bins - misread).abs().argmin()] = 30.0
    return logits, torch.zeros_like(logits), torch.ones(1)


def test_archetypes_bring_back_a_fit_the_network_misread(templates):
    torch.manual_seed(0)
    model = create_model("specpt-tiny", "redshift").eval()
    model.set_templates({"GALAXY": templates})
    config = model.config
    config.refinement_wide_quality, config.refinement_wide_chi2, config.refinement_wide_delta_chi2 = (
        0.0,
        1e9,
        0.0,
    )
    config.refinement_modes, config.refinement_window, config.refinement_alias_lines = 1, 1.0, []
    config.refinement_archetype_rebin, config.refinement_archetype_gate = 3, None  # every fit is judged
    z = 0.3
    inputs = _model_inputs(templates, np.array([z]), seed=5)
    pz = _misread(model, z)

    def refine() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return model._refine(inputs["flux"], inputs["ivar"], None, None, *pz)

    alone = refine()
    assert abs(float(alone["redshift"][0]) - z) / (1 + z) > 0.15  # the templates follow the misreading
    model.set_archetypes({"GALAXY": _archetypes(templates)})
    judged = refine()
    assert abs(float(judged["redshift"][0]) - z) < 2e-5 * (1 + z)  # refitted by the templates at the truth
    expected = archetype_redshifts(
        model.archetypes,
        torch.from_numpy(WAVELENGTH),
        *inputs.values(),
        torch.log1p(model.chi2_scan_redshifts()),
        0.5 * model.pz_penalty(pz[0]),
        rebin=3,
    )[1]
    assert float(judged["delta_chi2"][0]) == pytest.approx(
        float(expected[0]), rel=1e-3
    )  # the archetypes' DELTACHI2
    torch.testing.assert_close(judged["chi2_scan"], alone["chi2_scan"])  # the templates' whole curve is kept
    config.refinement_archetype_gate = 1e-9  # no fit is doubtful enough to be judged: the templates' answer
    gated = refine()
    for key in ("redshift", "delta_chi2", "spectype"):
        torch.testing.assert_close(gated[key], alone[key], rtol=0, atol=0)


def test_archetypes_travel_with_the_model_folder(templates, tmp_path):
    torch.manual_seed(0)
    model = create_model("specpt-tiny", "redshift").eval()
    model.set_templates({"GALAXY": templates})
    model.set_archetypes({"GALAXY": _archetypes(templates)})
    model.save_pretrained(tmp_path / "model")
    loaded = SpecPTForRedshift.from_pretrained(tmp_path / "model")
    assert loaded.config.archetypes["spectypes"]["GALAXY"]["num_vectors"] == 2
    torch.testing.assert_close(loaded.archetypes["GALAXY"].basis, model.archetypes["GALAXY"].basis)
    repo = write_repo_folder(tmp_path / "model", tmp_path / "repo", repo_id="user/specpt-archetypes")
    files = [folder / "archetypes.safetensors" for folder in (repo, tmp_path / "model")]
    assert files[0].read_bytes() == files[1].read_bytes()  # the Hub repo folder carries them
    files[1].unlink()
    with pytest.raises(
        OSError, match="config.json describes archetypes in archetypes.safetensors.*specpt archetypes"
    ):
        SpecPTForRedshift.from_pretrained(tmp_path / "model")


def test_built_archetypes_cover_every_trial_redshift():
    config = preset_config("specpt-tiny", "redshift")
    built = build_archetypes(config, {"GALAXY": 1e-4}, per_type=12, count=3)
    assert list(built) == ["GALAXY"]  # no QSO archetypes for a model without QSO templates
    galaxy = built["GALAXY"]
    wave = model_wavelength(config)
    rest = np.exp(galaxy.log_wavelength.numpy())
    assert rest[0] <= wave[0] / (1 + config.z_max) and rest[-1] >= wave[-1] / (1 + config.z_min)
    assert galaxy.basis.shape[0] == 3 and bool(torch.isfinite(galaxy.basis).all())
    assert bool((galaxy.basis > 0).all())  # whole spectra: positive flux everywhere


def test_specpt_archetypes_adds_them_to_a_folder_with_templates(templates, tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model("specpt-tiny", "redshift")
    model.save_pretrained(tmp_path / "plain")
    assert archetypes_main(["--model", str(tmp_path / "plain"), "--per-type", "12", "--count", "3"]) == 1
    assert (
        "no templates" in capsys.readouterr().err
        and not (tmp_path / "plain" / "archetypes.safetensors").exists()
    )
    model.set_templates(
        {
            "GALAXY": templates,
            "QSO": RestFrameTemplates(
                templates.log_wavelength_start, templates.log_wavelength_step, templates.basis.clone()
            ),
        }
    )
    model.save_pretrained(tmp_path / "model")
    assert archetypes_main(["--model", str(tmp_path / "model"), "--per-type", "12", "--count", "3"]) == 0
    loaded = SpecPTForRedshift.from_pretrained(tmp_path / "model")
    assert sorted(loaded.archetypes) == ["GALAXY", "QSO"]
    assert all(t.basis.shape[0] == 3 for t in loaded.archetypes.values())
    with pytest.raises(SystemExit):
        archetypes_main(["--model", str(tmp_path / "model"), "--count", "0"])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("refinement_archetype_gate", 0.0),
        ("refinement_archetype_rebin", 0),
        ("refinement_archetype_prior", -1.0),
    ],
)
def test_archetype_settings_are_checked(field, value):
    from specpt_hf import SpecPTForRedshiftConfig

    with pytest.raises(ValueError, match=field):
        SpecPTForRedshiftConfig(**{field: value})


def test_a_wider_line_spread_function_gives_smoother_archetypes():
    config = preset_config("specpt-tiny", "redshift")

    def roughness(lsf_kms: float) -> float:
        basis = build_archetypes(config, {"GALAXY": 1e-4}, per_type=12, count=3, lsf_kms=lsf_kms)[
            "GALAXY"
        ].basis
        return float((basis.diff(dim=1) ** 2).sum(1).mean())  # each archetype has unit norm

    assert roughness(300.0) < 0.5 * roughness(0.0)
    with pytest.raises(SystemExit):
        archetypes_main(["--model", "unused", "--lsf-kms", "-1"])
