"""Template chi^2 refinement: spectra synthesised from a rest-frame basis at known redshifts are recovered."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from specpt_hf import refinement
from specpt_hf.refinement import (
    RestFrameTemplates,
    build_templates,
    chi2_curve,
    chi2_scan,
    line_aliases,
    load_templates,
    pz_modes,
    refine_redshifts,
    save_templates,
    smooth_templates,
)

WAVELENGTH = 3600.0 + 0.8 * np.arange(7781)  # DESI's coadd grid [pixels]
LINES = (3727.0, 4861.3, 4958.9, 5006.8, 6562.8, 6583.4)  # [O II], Hbeta, [O III], Halpha, [N II]


def _true_templates() -> RestFrameTemplates:
    """Continuum slope + 4000 A break + two line families on a rest ln(lambda) grid."""
    step = 0.8 / 9824.0
    start = math.log(1800.0)
    log_wave = start + step * np.arange(int((math.log(9824.0) - start) / step) + 1)
    wave = np.exp(log_wave)
    lines = [np.exp(-0.5 * ((wave - c) / 2.0) ** 2) for c in LINES]
    basis = np.stack(
        [
            np.ones_like(wave),
            wave / 5000.0,
            1.0 / (1.0 + np.exp(-(wave - 4000.0) / 20.0)),
            lines[0] + lines[4] + 0.3 * lines[5],
            lines[1] + 0.3 * lines[2] + lines[3],
        ]
    )
    return RestFrameTemplates(start, step, torch.from_numpy(basis.astype(np.float32)))


def _spectra(
    templates: RestFrameTemplates, z: np.ndarray, seed: int = 0, noise: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """Noisy spectra [n, pixels] of random positive combinations of the basis at redshifts `z`; ivar [n, pixels]."""
    rng = np.random.default_rng(seed)
    log_rest = templates.log_wavelength.numpy()
    basis = templates.basis.numpy().astype(np.float64)
    coeff = rng.uniform([1.0, 0.0, 0.5, 2.0, 1.0], [2.0, 1.0, 1.5, 6.0, 4.0], size=(len(z), len(basis)))
    flux = np.stack(
        [
            sum(
                c * np.interp(np.log(WAVELENGTH) - np.log1p(zi), log_rest, b)
                for c, b in zip(ci, basis, strict=True)
            )
            for zi, ci in zip(z, coeff, strict=True)
        ]
    )
    flux += rng.normal(0.0, noise, flux.shape)
    return flux.astype(np.float32), np.full(flux.shape, noise**-2, dtype=np.float32)


def _refine(templates, flux, ivar, guess, **kwargs):
    candidates = torch.log1p(torch.as_tensor(guess, dtype=torch.float64))[:, None]
    kwargs = {"half_width": 0.0126, "u_range": (0.0, math.log(2.0)), **kwargs}
    return refine_redshifts(
        {"GALAXY": templates},
        torch.from_numpy(WAVELENGTH),
        torch.from_numpy(flux),
        torch.from_numpy(ivar),
        candidates,
        **kwargs,
    )


@pytest.fixture(scope="module")
def templates() -> RestFrameTemplates:
    return _true_templates()


@pytest.mark.parametrize("fine", [{}, {"fine_trials": 7, "fine_step": 2e-4}, {"fine_trials": 3}])
def test_recovers_known_redshifts_from_a_guess_a_bin_away(templates, fine):
    z = np.array([0.05, 0.21, 0.48, 0.83])
    flux, ivar = _spectra(templates, z)
    result = _refine(templates, flux, ivar, z + 0.006 * (1 + z), **fine)  # one p(z) bin off
    error = (result.redshift.numpy() - z) / (1 + z)
    assert np.abs(error).max() < 2e-5, error
    assert (result.redshift_err.numpy() > 0).all() and (result.redshift_err.numpy() < 1e-3).all()
    assert (result.delta_chi2.numpy() > 9).all()


def test_fewer_coarse_vectors_find_the_same_redshift(templates):
    z = np.array([0.05, 0.48])
    flux, ivar = _spectra(templates, z, seed=3)
    full = _refine(templates, flux, ivar, z + 0.006 * (1 + z))
    lean = _refine(templates, flux, ivar, z + 0.006 * (1 + z), coarse_vectors=4)  # one line family
    assert np.abs((lean.redshift.numpy() - z) / (1 + z)).max() < 2e-5
    torch.testing.assert_close(
        lean.coeff, full.coeff, rtol=1e-3, atol=1e-3
    )  # the fine scan fits every vector
    assert not torch.equal(lean.scan_chi2, full.scan_chi2)


def test_one_pixel_shift_moves_z_by_one_pixel(templates):
    pixel = 0.8 / 6000.0  # Delta ln(lambda) of one pixel at 6000 A
    z = np.array([0.3])
    flux, ivar = _spectra(templates, z, noise=0.01)
    shifted, _ = _spectra(templates, np.expm1(np.log1p(z) + pixel), noise=0.01)  # same seed: same galaxy
    result = _refine(
        templates, np.concatenate([flux, shifted]), np.concatenate([ivar, ivar]), np.array([0.3, 0.3])
    )
    du = np.diff(np.log1p(result.redshift.numpy().astype(np.float64)))[0]
    assert du == pytest.approx(pixel, rel=0.1)


def test_masked_pixels_weigh_nothing(templates):
    z = np.array([0.4])
    flux, ivar = _spectra(templates, z)
    reference = _refine(templates, flux, ivar, z)
    flux[:, 2000:2600] = 1e6  # garbage under ivar = 0
    ivar[:, 2000:2600] = 0.0
    flux[:, 10] = np.nan
    ivar[:, 10] = 0.0
    masked = _refine(templates, flux, ivar, z)
    assert abs(float(masked.redshift[0] - reference.redshift[0])) < 2e-5 * 1.4
    assert int(masked.npixels[0]) == int(reference.npixels[0]) - 601


def test_batch_independence(templates):
    z = np.array([0.1, 0.6, 0.9])
    flux, ivar = _spectra(templates, z, seed=3)
    together = _refine(templates, flux, ivar, z).redshift
    alone = torch.cat(
        [_refine(templates, flux[i : i + 1], ivar[i : i + 1], z[i : i + 1]).redshift for i in range(3)]
    )
    torch.testing.assert_close(together, alone)


@pytest.mark.parametrize("elements", [1, 5 * 7781 * 3, 2**30])
def test_scan_and_curve_do_not_depend_on_their_chunks(templates, monkeypatch, elements):
    """One trial of one spectrum per chunk, a few per chunk, or all at once: the same chi^2 (to float32 rounding
    of the coefficients, which the residual chi^2 feels only to second order) and coefficients."""
    z = np.array([0.1, 0.6, 0.9])
    flux, ivar = _spectra(templates, z, seed=5)
    wave, flux_t, ivar_t = torch.from_numpy(WAVELENGTH), torch.from_numpy(flux), torch.from_numpy(ivar)
    trials = torch.log1p(torch.from_numpy(z))[:, None] + 2e-4 * torch.arange(-3, 4)  # [3, 7]

    def scan_and_curve():
        chi2, coeff, npixels = chi2_scan(templates, wave, flux_t, ivar_t, trials)
        return chi2, coeff, npixels, chi2_curve(templates, wave, flux_t, ivar_t, (0, 1))[1]

    chi2, coeff, npixels, curve = scan_and_curve()
    monkeypatch.setattr(refinement, "_CPU_SCAN_ELEMENTS", {"scan": elements, "curve": elements})
    chunked = scan_and_curve()
    torch.testing.assert_close(chunked[0], chi2, rtol=1e-6, atol=0)
    torch.testing.assert_close(chunked[1], coeff, rtol=0, atol=1e-3 * float(coeff.abs().max()))
    assert torch.equal(chunked[2], npixels)
    torch.testing.assert_close(chunked[3], curve, rtol=0, atol=0)


def test_fit_reduction_matches_lapack_and_falls_back_where_not_positive_definite():
    """The vectorised LDL^T elimination against torch.linalg.solve on packed upper triangles, for positive
    definite systems and for one that is not."""
    k = 6
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, 20, k, generator=generator, dtype=torch.float64)
    a = x.transpose(-1, -2) @ x  # [4, 9, k, k], positive definite
    a[0, 0] = -a[0, 0]  # negative definite: the LU path
    b = torch.randn(4, 9, k, generator=generator, dtype=torch.float64)
    upper = torch.triu_indices(k, k)
    packed = a[..., upper[0], upper[1]].permute(2, 0, 1)  # [pairs, 4, 9]
    reduction = refinement._fit_reduction(packed, b.permute(2, 0, 1))  # [4, 9]
    expected = (b * torch.linalg.solve(a, b)).sum(-1)
    torch.testing.assert_close(reduction, expected, rtol=1e-7, atol=0)  # the ridge: 1e-9 of the diagonal


def test_local_minima_are_redrocks_candidates():
    inf = math.inf
    curve = torch.tensor([[3.0, 1.0, 2.0, 0.5, 4.0], [inf, 2.0, 1.0, 1.5, inf], [1.0, 1.0, 2.0, 3.0, 0.0]])
    expected = [
        [False, True, False, True, False],
        [False, False, True, False, False],
        [True, True, False, False, True],
    ]
    assert (
        refinement.local_minima(curve).tolist() == expected
    )  # edges and unsearched (inf) neighbours count as higher


def test_delta_chi2_compares_minima_not_the_flank_of_the_best_one(templates):
    log_wave = templates.log_wavelength.numpy()  # the rest grid of the line templates
    broad = 1.0 - 0.5 * np.exp(
        -0.5 * ((np.exp(log_wave) - 5000.0) / 60.0) ** 2
    )  # a dip ~3,600 km/s wide, no lines
    start, step = templates.log_wavelength_start, templates.log_wavelength_step
    templates = RestFrameTemplates(start, step, torch.from_numpy(broad[None].astype(np.float32)))
    observed = np.interp(np.log(WAVELENGTH) - math.log1p(0.2), log_wave, broad)[None]
    flux, ivar = observed.astype(np.float32), np.full(observed.shape, 1e4, dtype=np.float32)
    alone = _refine(templates, flux, ivar, np.array([0.2]))
    assert abs(float(alone.redshift[0]) - 0.2) < 2e-5
    assert math.isinf(float(alone.delta_chi2[0]))  # the basin's flank 1,000 km/s out is no second minimum
    two = refine_redshifts(
        {"GALAXY": templates},
        torch.from_numpy(WAVELENGTH),
        torch.from_numpy(flux),
        torch.from_numpy(ivar),
        torch.log1p(torch.tensor([[0.2, 0.6]], dtype=torch.float64)),
        half_width=0.0126,
        u_range=(0.0, math.log(2.0)),
    )
    far = two.scan_chi2[0][(two.scan_u - math.log1p(0.6)).abs() <= 0.0126]  # the second window's trials
    assert float(two.delta_chi2[0]) == pytest.approx(float(far.min() - two.scan_chi2[0].min()), rel=1e-5)


def test_windows_are_the_trials_near_a_candidate():
    scan_u = torch.arange(-10, 500).double() * 2.4e-4
    generator = torch.Generator().manual_seed(1)
    # some candidates past the grid's ends
    candidates = torch.rand(16, 4, generator=generator, dtype=torch.float64) * 0.14 - 0.01
    candidates[0, 0] = math.nan  # no window
    expected = ((scan_u[None, None] - candidates[..., None]).abs() <= 0.003).any(1)  # [batch, grid]
    assert torch.equal(refinement._windows(scan_u, candidates, 0.003), expected)


def test_chi2_minimum_at_the_truth_and_reduced_chi2_near_one(templates):
    z = np.array([0.25])
    flux, ivar = _spectra(templates, z)
    u = torch.log1p(torch.tensor([[0.25 - 0.01, 0.25, 0.25 + 0.01]], dtype=torch.float64))
    chi2, coeff, npixels = chi2_scan(
        templates, torch.from_numpy(WAVELENGTH), torch.from_numpy(flux), torch.from_numpy(ivar), u
    )
    assert int(chi2.argmin()) == 1
    assert float(chi2[0, 1] / npixels[0, 1]) == pytest.approx(1.0, abs=0.05)
    assert coeff.shape == (1, 3, 5)


def test_built_templates_recover_redshifts(templates):
    rng = np.random.default_rng(7)
    z_train = rng.uniform(0.05, 0.9, 120)
    flux, ivar = _spectra(templates, z_train, seed=1)
    learned = build_templates(WAVELENGTH, flux, ivar, z_train, num_vectors=6)
    assert learned.basis.shape[0] == 6
    assert learned.log_wavelength_start == pytest.approx(math.log(3600.0 / (1 + z_train.max())))
    z = np.array([0.15, 0.55])
    test_flux, test_ivar = _spectra(templates, z, seed=2)
    result = _refine(learned, test_flux, test_ivar, z + 0.005)
    error = (result.redshift.numpy() - z) / (1 + z)
    assert np.abs(error).max() < 5e-5, error


def test_smoothing_broadens_to_its_sigma_and_keeps_flux_and_coverage():
    step = 1e-4
    basis = np.zeros((2, 2001))
    basis[0, 1000] = 1.0  # a delta line
    basis[1, 100:1900] = 1.0  # covered range; outside stays 0
    t = RestFrameTemplates(0.0, step, torch.from_numpy(basis.astype(np.float32)))
    assert smooth_templates(t, 0.0) is t
    line, flat = smooth_templates(t, 20 * step * 299_792.458).basis.double().numpy()  # 20 grid steps
    x = np.arange(2001) - 1000
    assert line.sum() == pytest.approx(1.0, rel=1e-4)
    assert math.sqrt((line * x**2).sum() / line.sum()) == pytest.approx(20.0, rel=0.02)
    np.testing.assert_allclose(flat[100:1900], 1.0, atol=1e-6)  # renormalised at the edges, not darkened
    assert not flat[:100].any() and not flat[1900:].any()


def test_fine_smoothing_keeps_the_coarse_choice_and_the_truth(templates):
    z = np.array([0.12, 0.47, 0.83])
    flux, ivar = _spectra(templates, z, seed=3)
    plain = _refine(templates, flux, ivar, z + 0.004)
    same = _refine(templates, flux, ivar, z + 0.004, fine_smoothing_kms={"GALAXY": 0.0})
    smoothed = _refine(templates, flux, ivar, z + 0.004, fine_smoothing_kms={"GALAXY": 60.0})
    torch.testing.assert_close(same.redshift, plain.redshift, rtol=0, atol=0)
    torch.testing.assert_close(smoothed.delta_chi2, plain.delta_chi2)  # the coarse curve is untouched
    assert torch.equal(smoothed.scan_chi2, plain.scan_chi2)
    assert not torch.equal(smoothed.chi2, plain.chi2)  # the fine scan fitted the smoothed basis
    error = (smoothed.redshift.numpy() - z) / (1 + z)
    assert np.abs(error).max() < 5e-5, error


def test_weighted_coefficients_are_each_rows_weighted_least_squares():
    rng = np.random.default_rng(11)
    basis, flux = rng.normal(size=(4, 300)), rng.normal(size=(5, 300))
    weight = rng.uniform(0.0, 2.0, size=(5, 300))
    weight[:, :40] = 0.0  # pixels without weight do not count
    root = np.sqrt(weight)
    expected = [np.linalg.lstsq((basis * w).T, f * w, rcond=None)[0] for f, w in zip(flux, root, strict=True)]
    np.testing.assert_allclose(refinement._weighted_coefficients(basis, flux, weight), expected, rtol=1e-9)


def test_weighted_coefficients_need_no_spectra_by_vectors_by_pixels_array():
    import tracemalloc

    basis, flux, weight = np.ones((10, 20_000)), np.ones((100, 20_000)), np.ones((100, 20_000))
    tracemalloc.start()
    try:
        refinement._weighted_coefficients(basis, flux, weight)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * flux.nbytes  # an [n, vectors, pixels] product alone would be 10 x flux.nbytes


def test_principal_components_by_lanczos_span_the_full_eigh_subspace():
    """From LANCZOS_MIN_SPECTRA spectra on, the top vectors come from Lanczos: the same orthonormal vectors (up to
    sign) as a full eigendecomposition of the Gram matrix, and close to the eigh path's on one spectrum fewer."""
    rng = np.random.default_rng(5)
    n = refinement.LANCZOS_MIN_SPECTRA
    data = (rng.normal(size=(n, 12)) * np.geomspace(10, 0.1, 12)) @ rng.normal(size=(12, 900))  # [n, grid]
    data += 0.01 * rng.normal(size=data.shape)
    basis = refinement._principal_components(data, 6)  # [6, grid]
    values, vectors = np.linalg.eigh(data @ data.T)
    expected = (vectors[:, ::-1][:, :6] / np.sqrt(values[::-1][:6])).T @ data  # [6, grid]
    np.testing.assert_allclose(basis @ basis.T, np.eye(6), atol=1e-10)
    np.testing.assert_allclose(np.abs((basis * expected).sum(1)), 1.0, atol=1e-10)
    small = refinement._principal_components(data[: n - 1], 6)  # the eigh path
    np.testing.assert_allclose(np.abs((small * basis).sum(1)), 1.0, atol=1e-3)


def test_build_templates_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="do not match"):
        build_templates(WAVELENGTH, np.ones((3, 10)), np.ones((3, 10)), np.zeros(3))
    with pytest.raises(ValueError, match="num_vectors"):
        build_templates(WAVELENGTH[:10], np.ones((3, 10)), np.ones((3, 10)), np.zeros(3), num_vectors=4)


def test_fft_curve_matches_the_direct_fit(templates):
    """The FFT chi^2(z) on binned pixels has its minimum where the native-pixel scan has it."""
    z = np.array([0.37])
    flux, ivar = _spectra(templates, z, seed=4)
    wave, flux_t, ivar_t = torch.from_numpy(WAVELENGTH), torch.from_numpy(flux), torch.from_numpy(ivar)
    u, chi2 = chi2_curve(templates, wave, flux_t, ivar_t, (0.2, 0.4), rebin=3)
    assert abs(float(u[chi2[0].argmin()]) - math.log1p(0.37)) <= 1.5 * float(u[1] - u[0])
    direct, _, _ = chi2_scan(templates, wave, flux_t, ivar_t, u[None, ::40])
    curve = chi2[0, ::40]
    assert torch.corrcoef(torch.stack([curve, direct[0]]))[0, 1] > 0.99


def test_wide_scan_finds_a_redshift_far_from_the_guess(templates):
    z = np.array([0.62])
    flux, ivar = _spectra(templates, z, seed=5)
    near_only = _refine(templates, flux, ivar, np.array([0.2]))
    wide = _refine(templates, flux, ivar, np.array([0.2]), everywhere=torch.tensor([True]))
    assert abs(float(near_only.redshift[0]) - 0.62) > 0.1
    assert abs(float(wide.redshift[0]) - 0.62) < 2e-5 * 1.62
    assert float(wide.chi2[0]) < float(near_only.chi2[0])


@pytest.mark.parametrize("rebin, vectors", [(3, None), (9, 5), (12, 3)])
def test_wide_candidates_hold_the_truth_on_a_coarse_cheap_curve(templates, rebin, vectors):
    z = np.array([0.05, 0.33, 0.62, 0.9])
    flux, ivar = _spectra(templates, z, seed=11, noise=0.3)
    u = refinement.wide_candidates(
        {"GALAXY": templates},
        torch.from_numpy(WAVELENGTH),
        torch.from_numpy(flux),
        torch.from_numpy(ivar),
        (0.0, math.log(2.0)),
        modes=3,
        separation=0.025,
        rebin=rebin,
        vectors=vectors,
    )  # [4, 3]
    assert u.shape == (4, 3)
    assert (np.diff(np.sort(u.numpy(), 1), axis=1) >= 0.025 - 1e-12).all()  # distinct minima
    offset = np.abs(u[:, 0].numpy() - np.log1p(z))  # the lowest minimum: within the windows' half-width
    assert (offset < 0.0126).all(), offset


def test_wide_candidates_follow_a_prior_that_outweighs_the_fit(templates):
    z = np.array([0.62])
    flux, ivar = _spectra(templates, z, seed=5)
    inputs = (
        {"GALAXY": templates},
        torch.from_numpy(WAVELENGTH),
        torch.from_numpy(flux),
        torch.from_numpy(ivar),
    )
    settings = {"u_range": (0.0, math.log(2.0)), "modes": 1, "separation": 0.025, "rebin": 9, "vectors": 5}
    plain = refinement.wide_candidates(*inputs, **settings)
    elsewhere = math.log(1.2)
    prior = refinement.wide_candidates(*inputs, **settings, prior=lambda u: 1e9 * (u - elsewhere).abs()[None])
    assert abs(float(plain[0, 0]) - math.log(1.62)) < 0.0126
    assert abs(float(prior[0, 0]) - elsewhere) < 0.005


def test_smooth_chi2_is_the_weighted_legendre_fit_and_a_line_beats_it(templates):
    rng = np.random.default_rng(4)
    x = 2 * (np.log(WAVELENGTH) - np.log(WAVELENGTH[0])) / np.log(WAVELENGTH[-1] / WAVELENGTH[0]) - 1
    ivar = rng.uniform(50.0, 200.0, (2, len(WAVELENGTH)))
    ivar[:, 1000:1300] = 0.0  # masked pixels weigh nothing
    continuum = np.polynomial.legendre.legval(x, [2.0, 0.3, -0.2, 0.1, 0.05])
    flux = continuum + rng.normal(size=ivar.shape) / np.sqrt(ivar.clip(1.0))
    flux[1, 4000:4004] += 5.0  # a line no smooth continuum follows
    chi2 = refinement.smooth_chi2(
        torch.from_numpy(WAVELENGTH), torch.from_numpy(flux), torch.from_numpy(ivar)
    )
    for row in range(2):  # numpy's weighted Legendre fit as the oracle
        coeff = np.polynomial.legendre.legfit(x, flux[row], 4, w=np.sqrt(ivar[row]))
        expected = np.sum(ivar[row] * (flux[row] - np.polynomial.legendre.legval(x, coeff)) ** 2)
        assert float(chi2[row]) == pytest.approx(expected, rel=1e-9)
    per_row = torch.from_numpy(np.stack([WAVELENGTH, WAVELENGTH]))  # [batch, pixels]: each row's own grid
    again = refinement.smooth_chi2(per_row, torch.from_numpy(flux), torch.from_numpy(ivar))
    torch.testing.assert_close(again, chi2, rtol=1e-10, atol=0)
    good = (ivar[0] > 0).sum()
    assert abs(float(chi2[0]) / good - 1.0) < 0.05 and float(chi2[1]) > float(chi2[0]) + 1000


def test_model_reports_the_smooth_continuums_chi2(templates, tiny_model):
    inputs = _model_inputs(templates, np.array([0.12, 0.47]))
    tiny_model.set_templates({"GALAXY": templates})
    with torch.no_grad():
        out = tiny_model(**inputs)
    assert out.chi2_smooth.shape == out.chi2.shape == (2,)
    assert (
        out.chi2_smooth > out.chi2 + 100
    ).all()  # the templates' lines and break beat any smooth continuum


def test_a_prior_moves_the_choice_only_when_it_outweighs_the_fit(templates):
    z = np.array([0.62])
    flux, ivar = _spectra(templates, z, seed=5, noise=0.5)
    everywhere = torch.tensor([True])
    plain = _refine(templates, flux, ivar, np.array([0.2]), everywhere=everywhere)
    grid = plain.scan_u  # [grid]
    distance = (grid - math.log1p(0.62)).abs()  # [grid]
    mild = torch.where(distance < 0.002, 1.0, 0.0)[None].double()  # [1, grid]: inside 1000 km/s of the truth
    huge = torch.where(distance < 0.05, 1e9, 0.0)[None].double()
    with_mild = _refine(templates, flux, ivar, np.array([0.2]), everywhere=everywhere, prior=mild)
    with_huge = _refine(templates, flux, ivar, np.array([0.2]), everywhere=everywhere, prior=huge)
    assert abs(float(plain.redshift[0]) - 0.62) < 1e-3
    torch.testing.assert_close(with_mild.redshift, plain.redshift)
    assert float(with_mild.prior[0]) == 1.0 and float(plain.prior[0]) == 0.0
    torch.testing.assert_close(with_mild.delta_chi2, plain.delta_chi2 - 1.0)
    torch.testing.assert_close(with_mild.scan_chi2, plain.scan_chi2)  # the curve stays pure chi^2
    assert abs(float(with_huge.redshift[0]) - 0.62) > 0.04


def test_two_template_sets_pick_the_one_that_fits(templates):
    z = np.array([0.3])
    flux, ivar = _spectra(templates, z, seed=6)
    wrong = RestFrameTemplates(
        templates.log_wavelength_start, templates.log_wavelength_step, templates.basis[:2].clone()
    )
    candidates = torch.log1p(torch.tensor([[0.3]], dtype=torch.float64))
    args = (torch.from_numpy(WAVELENGTH), torch.from_numpy(flux), torch.from_numpy(ivar), candidates)
    sets = {"POOR": wrong, "GOOD": templates}
    result = refine_redshifts(sets, *args, half_width=0.01, u_range=(0.0, 0.7))
    assert int(result.spectype[0]) == 1
    assert result.coeff.shape == (1, 5)
    # a per-set prior moves the choice only when it outweighs the fit
    mild = refine_redshifts(
        sets, *args, half_width=0.01, u_range=(0.0, 0.7), set_prior={"GOOD": torch.tensor([3.0])}
    )
    huge = refine_redshifts(
        sets, *args, half_width=0.01, u_range=(0.0, 0.7), set_prior={"GOOD": torch.tensor([1e9])}
    )
    assert int(mild.spectype[0]) == 1 and int(huge.spectype[0]) == 0
    torch.testing.assert_close(mild.redshift, result.redshift)
    assert float(mild.prior[0]) == pytest.approx(3.0) and float(result.prior[0]) == 0.0
    torch.testing.assert_close(mild.scan_chi2, result.scan_chi2)  # the curve stays pure chi^2


def _star_templates() -> RestFrameTemplates:
    """A warm continuum and absorption lines (Ca II H & K, Balmer, Mg b, Na D) on a rest ln(lambda) grid."""
    step = 0.8 / 9824.0
    start = math.log(3500.0)
    wave = np.exp(start + step * np.arange(int((math.log(10000.0) - start) / step) + 1))
    absorption = [np.exp(-0.5 * ((wave - c) / 1.5) ** 2) for c in (3933.7, 3968.5, 4101.7, 4340.5, 4861.3)]
    metals = [
        np.exp(-0.5 * ((wave - c) / 1.5) ** 2) for c in (5167.3, 5172.7, 5183.6, 5889.95, 5895.9, 6562.8)
    ]
    basis = np.stack([np.ones_like(wave), 5000.0 / wave, -sum(absorption), -sum(metals)])
    return RestFrameTemplates(start, step, torch.from_numpy(basis.astype(np.float32)))


def test_stars_come_out_as_star_at_their_velocity(templates):
    from specpt_hf.refinement import SPEED_OF_LIGHT_KMS, star_range

    stars = _star_templates()
    velocity = np.array([-250.0, 180.0])  # km/s
    z_star = np.sqrt((1 + velocity / SPEED_OF_LIGHT_KMS) / (1 - velocity / SPEED_OF_LIGHT_KMS)) - 1
    star_flux, star_ivar = _spectra_from(stars, z_star, [3.0, 0.5, 0.6, 0.8], seed=8)
    galaxy_flux, galaxy_ivar = _spectra(templates, np.array([0.3]), seed=9)
    flux = np.concatenate([star_flux, galaxy_flux])
    ivar = np.concatenate([star_ivar, galaxy_ivar])
    candidates = torch.log1p(torch.tensor([[0.8], [0.2], [0.3]], dtype=torch.float64))  # the stars' far off
    result = refine_redshifts(
        {"GALAXY": templates, "STAR": stars},
        torch.from_numpy(WAVELENGTH),
        torch.from_numpy(flux),
        torch.from_numpy(ivar),
        candidates,
        half_width=0.0126,
        u_range=(0.0, math.log(2.0)),
        own_ranges={"STAR": star_range()},
    )
    assert result.spectype.tolist() == [1, 1, 0]
    np.testing.assert_allclose(result.redshift[:2].numpy(), z_star, atol=3e-5)  # 10 km/s
    assert abs(float(result.redshift[2]) - 0.3) < 2e-5 * 1.3
    assert star_range()[0] < 0 < star_range()[1]


def _spectra_from(
    templates: RestFrameTemplates, z: np.ndarray, coeff: list[float], seed: int, noise: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """Noisy spectra [n, pixels] of one combination `coeff` of the basis at redshifts `z`; ivar [n, pixels]."""
    rng = np.random.default_rng(seed)
    log_rest, basis = templates.log_wavelength.numpy(), templates.basis.numpy().astype(np.float64)
    model = [
        sum(
            c * np.interp(np.log(WAVELENGTH) - np.log1p(zi), log_rest, b)
            for c, b in zip(coeff, basis, strict=True)
        )
        for zi in z
    ]
    flux = np.stack(model) + rng.normal(0.0, noise, (len(z), len(WAVELENGTH)))
    return flux.astype(np.float32), np.full(flux.shape, noise**-2, dtype=np.float32)


def test_pz_modes_are_distinct_peaks():
    probability = torch.tensor([[0.0, 0.1, 0.5, 0.3, 0.0, 0.0, 0.05, 0.2, 0.0, 0.0]])
    assert pz_modes(probability, 2, 2).tolist() == [[2, 7]]


def test_templates_round_trip_and_broken_file(templates, tmp_path):
    path = tmp_path / "templates.safetensors"
    save_templates(path, {"GALAXY": templates})
    loaded = load_templates(path)["GALAXY"]
    torch.testing.assert_close(loaded.basis, templates.basis)
    assert loaded.log_wavelength_start == templates.log_wavelength_start
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(OSError, match="templates.safetensors.*specpt templates"):
        load_templates(path)


# ---------------------------------------------------------------------------------------------- in the model


@pytest.fixture
def tiny_model():
    from specpt_hf import create_model

    torch.manual_seed(0)
    return create_model("specpt-tiny", "redshift", refinement_wide_quality=1.0).eval()  # untrained: scan all


def _model_inputs(templates, z, seed=0):
    flux, ivar = _spectra(templates, z, seed=seed)
    return {"flux": torch.from_numpy(flux), "ivar": torch.from_numpy(ivar)}


def test_model_refines_with_its_templates_and_none_is_todays_output(templates, tiny_model):
    z = np.array([0.12, 0.47])
    inputs = _model_inputs(templates, z)
    with torch.no_grad():
        network = tiny_model(**inputs)
        tiny_model.set_templates({"GALAXY": templates})
        refined = tiny_model(**inputs)
        tiny_model.config.refinement = "none"
        off = tiny_model(**inputs)
    assert network.chi2 is None and off.chi2 is None
    for key in ("redshift", "redshift_err", "quality", "logits"):
        torch.testing.assert_close(off[key], network[key], rtol=0, atol=0)
    torch.testing.assert_close(refined.redshift_net, network.redshift, rtol=0, atol=0)
    error = (refined.redshift.numpy() - z) / (1 + z)
    assert np.abs(error).max() < 2e-5, error
    assert refined.spectype.tolist() == [0, 0] and refined.wide.all()
    tiny_model.config.refinement = "peaks+wide"
    tiny_model.config.refinement_prior = 0.0
    with torch.no_grad():
        chi2_only = tiny_model(**inputs)
    torch.testing.assert_close(chi2_only.redshift, refined.redshift)  # the fits dominate this untrained p(z)
    assert (refined.delta_chi2 <= chi2_only.delta_chi2 + 2 * math.log(1e4) + 1e-3).all()
    assert refined.chi2_scan.shape == refined.chi2_scan_z.shape and refined.chi2_scan.shape[0] == 2


def test_ambiguous_fits_are_refitted_at_the_whole_ranges_minima(templates, tiny_model):
    z = np.array([0.12, 0.47])
    inputs = _model_inputs(templates, z, seed=3)
    tiny_model.set_templates({"GALAXY": templates})
    config = tiny_model.config
    config.refinement_modes, config.refinement_window = 1, 1.0  # one narrow window at the untrained p(z) peak
    config.refinement_wide_quality, config.refinement_wide_chi2 = 0.0, 1e9  # neither gate opens
    config.refinement_alias_lines = []  # nor does a fit won at a line alias
    with torch.no_grad():
        windows = tiny_model(**inputs)
        config.refinement_wide_delta_chi2 = 1e12  # every fit counts as ambiguous
        rescanned = tiny_model(**inputs)
    assert not windows.wide.any() and rescanned.wide.all()
    error = (rescanned.redshift.numpy() - z) / (1 + z)
    assert np.abs(error).max() < 2e-5, error
    searched = np.isfinite(rescanned.chi2_scan.numpy()).sum(1)  # the windows only grow
    assert (searched > np.isfinite(windows.chi2_scan.numpy()).sum(1)).all()


def test_line_aliases_are_the_other_readings_of_a_line():
    u = torch.tensor([0.5], dtype=torch.float64)
    groups = [[3728.5, 5008.2], [1908.7, 2799.9]]  # never read across groups
    aliases = line_aliases(u, groups, spread=0.01)  # [1, 4 readings x 2 sides]
    oiii, mgii = math.log(5008.2 / 3728.5), math.log(2799.9 / 1908.7)
    centres = [0.5 - oiii, 0.5 + oiii, 0.5 - mgii, 0.5 + mgii]
    expected = [c - 0.01 for c in centres] + [c + 0.01 for c in centres]
    torch.testing.assert_close(aliases[0], torch.tensor(expected, dtype=torch.float64))
    assert line_aliases(u, [[3728.5], []], spread=0.01).shape == (1, 0)


def test_alias_lines_are_groups_of_distinct_wavelengths():
    from specpt_hf.configuration_specpt import REFINEMENT_ALIAS_LINES, SpecPTForRedshiftConfig

    assert SpecPTForRedshiftConfig().refinement_alias_lines == REFINEMENT_ALIAS_LINES
    assert SpecPTForRedshiftConfig(refinement_alias_lines=[]).refinement_alias_lines == []
    for bad in ([[3728.5, 3728.5]], [[3728.5, -1.0]], [[3728.5, math.nan]], [3728.5, 5008.2]):
        with pytest.raises(ValueError, match="refinement_alias_lines"):
            SpecPTForRedshiftConfig(refinement_alias_lines=bad)


def test_a_line_the_network_misread_is_fitted_at_its_other_reading(templates, tiny_model):
    """The network puts its whole p(z) where the spectrum's [O III] would be [O II]: the scan of that line alias
    finds the true redshift; without alias lines it stays at the misreading."""
    z = np.array([0.3])
    inputs = _model_inputs(templates, z, seed=5)
    tiny_model.set_templates({"GALAXY": templates})
    config = tiny_model.config
    config.refinement_wide_quality, config.refinement_wide_chi2 = 0.0, 1e9  # no whole-range search
    config.refinement_wide_delta_chi2 = 0.0
    config.refinement_modes, config.refinement_window = 1, 1.0  # one window, +-0.05 in ln(1 + z)
    misread = math.log1p(z[0]) + math.log(5006.8 / 3727.0)  # [O III] 5007 taken for [O II]
    bins = tiny_model.redshift_bin_centers().double()
    logits = torch.full((1, config.num_redshift_bins), -30.0)
    logits[0, (bins - misread).abs().argmin()] = 30.0  # [1, bins]: p(z) certain of the misreading
    offsets = torch.zeros_like(logits)
    quality = torch.ones(1)

    def refine() -> np.ndarray:
        with torch.no_grad():
            out = tiny_model._refine(inputs["flux"], inputs["ivar"], None, None, logits, offsets, quality)
        return out["redshift"].numpy()

    assert np.abs(refine() - z).max() < 2e-5 * (1 + z[0])
    config.refinement_alias_lines = []
    assert (np.abs(refine() - z) / (1 + z) > 0.15).all()  # a catastrophic failure near the misreading


def test_model_and_pipeline_give_stars_their_own_sign_and_no_z_limit_flag(templates):
    from specpt_hf import create_model
    from specpt_hf.prediction import SpecPTZwarn, predict_spectra
    from specpt_hf.refinement import SPEED_OF_LIGHT_KMS

    torch.manual_seed(0)
    model = create_model("specpt-tiny", "redshift", refinement_wide_quality=1.0).eval()
    model.set_templates({"GALAXY": templates, "STAR": _star_templates()})
    z_star = -250.0 / SPEED_OF_LIGHT_KMS
    star_flux, star_ivar = _spectra_from(_star_templates(), np.array([z_star]), [3.0, 0.5, 0.6, 0.8], seed=8)
    galaxy_flux, galaxy_ivar = _spectra(templates, np.array([0.3]), seed=9)
    flux, ivar = np.concatenate([star_flux, galaxy_flux]), np.concatenate([star_ivar, galaxy_ivar])
    with torch.no_grad():
        out = model(flux=torch.from_numpy(flux), ivar=torch.from_numpy(ivar))
    assert out.spectype.tolist() == [1, 0]
    assert abs(float(out.redshift[0]) - z_star) < 3e-5 and float(out.redshift[0]) < 0  # not clamped to z_min
    assert abs(float(out.redshift[1]) - 0.3) < 2e-5 * 1.3
    predicted = predict_spectra(model, flux, ivar)
    assert predicted["spectype"].tolist() == ["STAR", "GALAXY"]
    assert not predicted["zwarn"][0] & SpecPTZwarn.AT_Z_LIMIT


def test_a_star_only_model_fits_stars_with_peaks_wide():
    from specpt_hf import create_model
    from specpt_hf.refinement import SPEED_OF_LIGHT_KMS

    torch.manual_seed(0)
    model = create_model(
        "specpt-tiny", "redshift", refinement_wide_quality=1.0
    ).eval()  # every spectrum "wide"
    model.set_templates({"STAR": _star_templates()})
    z_star = 120.0 / SPEED_OF_LIGHT_KMS
    flux, ivar = _spectra_from(_star_templates(), np.array([z_star]), [3.0, 0.5, 0.6, 0.8], seed=8)
    with torch.no_grad():
        out = model(flux=torch.from_numpy(flux), ivar=torch.from_numpy(ivar))
    assert out.spectype.tolist() == [0] and not out.wide.any()  # no set searches the whole range
    assert abs(float(out.redshift[0]) - z_star) < 3e-5


def test_templates_travel_with_the_model_folder(templates, tiny_model, tmp_path):
    from transformers.testing_utils import CaptureLogger

    from specpt_hf import SpecPTForRedshift
    from specpt_hf.modeling_specpt import logger

    tiny_model.save_pretrained(tmp_path / "plain")
    with CaptureLogger(logger) as captured:
        plain = SpecPTForRedshift.from_pretrained(tmp_path / "plain")
    assert not plain.refines and "no rest-frame templates" in captured.out

    tiny_model.set_templates({"GALAXY": templates})
    tiny_model.save_pretrained(tmp_path / "with")
    assert (tmp_path / "with" / "templates.safetensors").is_file()
    loaded = SpecPTForRedshift.from_pretrained(tmp_path / "with").eval()
    assert loaded.refines and loaded.config.templates["spectypes"]["GALAXY"]["num_vectors"] == 5
    inputs = _model_inputs(templates, np.array([0.3]), seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).redshift, tiny_model(**inputs).redshift)

    (tmp_path / "with" / "templates.safetensors").unlink()
    with pytest.raises(OSError, match="with: config.json describes templates in templates.safetensors"):
        SpecPTForRedshift.from_pretrained(tmp_path / "with")


def test_spectra_outside_the_templates_get_little_coverage(templates, tiny_model):
    from specpt_hf.prediction import SpecPTZwarn, predict_spectra

    keep = (templates.log_wavelength < math.log(3300.0)).numpy()  # rest range 1800-3300 A only
    narrow = RestFrameTemplates(
        templates.log_wavelength_start,
        templates.log_wavelength_step,
        templates.basis[:, : int(keep.sum())].clone(),
    )
    tiny_model.set_templates({"GALAXY": narrow})
    flux, ivar = _spectra(templates, np.array([0.1]))  # rest 3270-8930 A: almost all outside
    out = predict_spectra(tiny_model, flux, ivar)
    assert out["npixels_fit"][0] < 0.5 * out["npixels"][0]
    assert out["zwarn"][0] & SpecPTZwarn.LITTLE_COVERAGE
    assert np.isfinite(out["chi2"][0]) and out["spectype"][0] == "GALAXY"


def _fine_span(model, scan_z: np.ndarray) -> float:
    """How far in ln(1 + z) the refined Z can lie from the coarse curve's minimum: the fine grid is centred on the
    coarse parabola's vertex (within one coarse step of the minimum) and reaches `refinement_fine_trials` // 2 fine
    steps either side; the fine parabola's vertex lies within two fine steps of an inner trial."""
    config = model.config
    coarse = np.diff(np.log1p(scan_z[:2]))[0]
    fine = (config.refinement_fine_trials // 2 + 1) * config.refinement_fine_step
    return coarse + fine + 1e-6  # + float32 rounding of Z


def test_pipeline_returns_pz_and_the_chi2_scan(templates, tiny_model):
    from specpt_hf import load_pipeline
    from specpt_hf.prediction import pdf_redshifts

    tiny_model.set_templates({"GALAXY": templates})
    flux, ivar = _spectra(templates, np.array([0.21, 0.64]), seed=3)
    rows = load_pipeline(tiny_model)({"flux": flux, "ivar": ivar}, return_pdf=True)
    grids = pdf_redshifts(tiny_model)
    for row in rows:
        assert row["pz"].shape == row["pz_z"].shape == (tiny_model.config.num_redshift_bins,)
        assert row["pz"].sum() == pytest.approx(1.0, abs=1e-5) and (row["pz"] >= 0).all()
        np.testing.assert_array_equal(row["chi2_scan_z"], grids["chi2_scan"])
        best = row["chi2_scan_z"][np.nanargmin(row["chi2_scan"])]  # the coarse minimum ...
        assert abs(np.log1p(row["z"]) - np.log1p(best)) <= _fine_span(
            tiny_model, row["chi2_scan_z"]
        )  # ... and Z
    assert "pz" not in load_pipeline(tiny_model)({"flux": flux, "ivar": ivar})[0]


def test_predict_save_pdf_writes_pz_and_chi2_scan(templates, tiny_model, tmp_path):
    from astropy.io import fits
    from astropy.table import Table

    from specpt_hf.data.mock import write_mock_healpix
    from specpt_hf.predict import predict_catalog

    tiny_model.set_templates({"GALAXY": templates})
    tiny_model.save_pretrained(tmp_path / "model")
    coadd = write_mock_healpix(tmp_path / "data", "elg", 4, seed=4, healpix=26600)[0]
    predict_catalog([coadd], tmp_path / "c.fits", tmp_path / "model", save_pdf=True, progress=False)
    predict_catalog([coadd], tmp_path / "c.parquet", tmp_path / "model", save_pdf=True, progress=False)
    with fits.open(tmp_path / "c.fits") as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "REDSHIFTS", "PZ", "PZ_Z", "CHI2SCAN", "CHI2SCAN_Z"]
        catalog, pz, scan = Table(hdul["REDSHIFTS"].data), hdul["PZ"].data, hdul["CHI2SCAN"].data
        pz_z, scan_z = hdul["PZ_Z"].data, hdul["CHI2SCAN_Z"].data
    assert pz["TARGETID"].tolist() == scan["TARGETID"].tolist() == catalog["TARGETID"].tolist()
    assert pz["PZ"].shape == (len(catalog), len(pz_z)) and scan["CHI2SCAN"].shape == (
        len(catalog),
        len(scan_z),
    )
    np.testing.assert_allclose(pz["PZ"].sum(1), 1.0, atol=1e-5)
    best = scan_z[np.nanargmin(scan["CHI2SCAN"], axis=1)]  # each row's coarse minimum, near its refined Z
    assert np.all(np.abs(np.log1p(best) - np.log1p(catalog["Z"])) <= _fine_span(tiny_model, scan_z))
    parquet = Table.read(tmp_path / "c.parquet")
    np.testing.assert_array_equal(parquet["PZ"], pz["PZ"])
    np.testing.assert_array_equal(parquet.meta["CHI2SCAN_Z"], scan_z)
    predict_catalog([coadd], tmp_path / "plain.fits", tmp_path / "model", progress=False)
    assert [h.name for h in fits.open(tmp_path / "plain.fits")] == ["PRIMARY", "REDSHIFTS"]
    assert "SPECTYPE_NET" not in catalog.colnames  # no type head
    d_model = tiny_model.config.d_model
    tiny_model.set_spectype_head(["GALAXY", "QSO"], torch.zeros(2, d_model), torch.tensor([3.0, 0.0]))
    tiny_model.save_pretrained(tmp_path / "typed")
    predict_catalog([coadd], tmp_path / "typed.fits", tmp_path / "typed", progress=False)
    assert Table.read(tmp_path / "typed.fits")["SPECTYPE_NET"].tolist() == ["GALAXY"] * len(catalog)


def test_config_smoothing_defaults_and_rejects_negative():
    from specpt_hf.configuration_specpt import REFINEMENT_SMOOTHING_KMS, SpecPTForRedshiftConfig

    assert SpecPTForRedshiftConfig().refinement_smoothing_kms == REFINEMENT_SMOOTHING_KMS
    assert SpecPTForRedshiftConfig(refinement_smoothing_kms={}).refinement_smoothing_kms == {}
    with pytest.raises(ValueError, match=r"refinement_smoothing_kms\['QSO'\]"):
        SpecPTForRedshiftConfig(refinement_smoothing_kms={"QSO": -1.0})


def test_fine_trials_must_be_odd_and_at_least_three(templates):
    from specpt_hf.configuration_specpt import SpecPTForRedshiftConfig

    assert SpecPTForRedshiftConfig().refinement_fine_trials == 7
    assert SpecPTForRedshiftConfig(refinement_fine_trials=5).refinement_fine_trials == 5
    for bad in (1, 4):
        with pytest.raises(ValueError, match="refinement_fine_trials"):
            SpecPTForRedshiftConfig(refinement_fine_trials=bad)
    flux, ivar = _spectra(templates, np.array([0.3]))
    with pytest.raises(ValueError, match="fine_trials"):
        _refine(templates, flux, ivar, np.array([0.3]), fine_trials=4)


def test_type_head_weighs_the_template_sets_and_travels_with_the_folder(templates, tiny_model, tmp_path):
    from specpt_hf.prediction import predict_spectra

    z = np.array([0.3, 0.6])
    inputs = _model_inputs(templates, z, seed=2)
    poor = RestFrameTemplates(
        templates.log_wavelength_start, templates.log_wavelength_step, templates.basis[:2].clone()
    )
    tiny_model.set_templates({"GALAXY": templates, "QSO": poor})
    d_model = tiny_model.config.d_model
    with pytest.raises(ValueError, match=r"weight \[2, "):
        tiny_model.set_spectype_head(["GALAXY", "QSO"], torch.zeros(3, d_model), torch.zeros(2))
    tiny_model.set_spectype_head(
        ["GALAXY", "QSO"], torch.zeros(2, d_model), torch.tensor([0.0, 50.0])
    )  # "QSO"
    with torch.no_grad():
        tiny_model.config.refinement_type_prior = 0.0
        off = tiny_model(**inputs)
        tiny_model.config.refinement_type_prior = (
            1e6  # penalty 2e6 x ln(1e4) for GALAXY: more than its fit gains
        )
        weighed = tiny_model(**inputs)
    assert off.spectype.tolist() == [0, 0] and weighed.spectype.tolist() == [1, 1]
    assert weighed.spectype_logits.shape == (2, 2)
    columns = predict_spectra(tiny_model, inputs["flux"].numpy(), inputs["ivar"].numpy())
    assert columns["spectype_net"].tolist() == ["QSO", "QSO"] and columns["spectype"].tolist() == [
        "QSO",
        "QSO",
    ]
    tiny_model.save_pretrained(tmp_path / "model")
    loaded = type(tiny_model).from_pretrained(tmp_path / "model").eval()
    assert loaded.config.spectype_labels == ["GALAXY", "QSO"]
    torch.testing.assert_close(loaded.spectype_head.bias, tiny_model.spectype_head.bias)
    with torch.no_grad():
        assert loaded(**inputs).spectype.tolist() == [1, 1]


def test_fit_spectype_head_separates_labelled_types(templates, tiny_model):
    from specpt_hf.templates import fit_spectype_head

    galaxy, galaxy_ivar = _spectra(templates, np.linspace(0.1, 0.8, 40), seed=4)
    rng = np.random.default_rng(5)
    slope = (WAVELENGTH / 5000.0) ** -1.5 * rng.uniform(2.0, 8.0, (40, 1))  # blue power laws
    qso = (slope + rng.normal(0.0, 0.05, slope.shape)).astype(np.float32)
    spectra = {"QSO": {"flux": qso, "ivar": galaxy_ivar}, "GALAXY": {"flux": galaxy, "ivar": galaxy_ivar}}
    accuracy = fit_spectype_head(tiny_model, spectra)
    assert tiny_model.config.spectype_labels == ["GALAXY", "QSO"]
    assert min(accuracy.values()) > 0.9, accuracy
    with torch.no_grad():
        logits = tiny_model.spectype_head(
            tiny_model.embed(torch.from_numpy(qso[:5]), torch.from_numpy(galaxy_ivar[:5]))
        )
    assert (logits.argmax(1) == 1).all()
    with pytest.raises(ValueError, match="two types"):
        fit_spectype_head(tiny_model, {"GALAXY": spectra["GALAXY"]})
