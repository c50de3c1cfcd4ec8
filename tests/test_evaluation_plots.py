"""Every evaluation plot writes a valid, non-empty PNG, atomically, and rejects bad input."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from specpt_hf.evaluation import (
    class_colors,
    plot_completeness_purity,
    plot_error_histogram,
    plot_metrics_vs_redshift,
    plot_pit_histogram,
    plot_pull_distribution,
    plot_reconstructions,
    plot_redshift_comparison,
    plot_redshift_pdf,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sample():
    rng = np.random.default_rng(0)
    n = 400
    groups = rng.choice(["bgs", "elg", "lrg", "qso"], n)
    z_true = np.where(groups == "bgs", rng.uniform(0.02, 0.5, n), rng.uniform(0.4, 1.6, n))
    z_err = rng.uniform(0.5, 1.5, n) * 0.001 * (1 + z_true)
    z_pred = z_true + rng.normal(0, 1, n) * z_err
    outliers = rng.random(n) < 0.05
    z_pred[outliers] = rng.uniform(0, 2, outliers.sum())
    quality = np.clip(rng.normal(0.8, 0.1, n) - 0.5 * outliers, 0, 1)
    return {"z_pred": z_pred, "z_true": z_true, "z_err": z_err, "groups": groups, "quality": quality}


@pytest.fixture(scope="module")
def spectra():
    rng = np.random.default_rng(1)
    wavelength = np.linspace(3600.0, 9824.0, 1500)
    continuum = 5 + 2 * np.sin(wavelength / 900)
    line = 15 * np.exp(-0.5 * ((wavelength - 6563 * 1.1) / 4) ** 2)
    model = np.stack([continuum + line, 0.5 * continuum, 2 * continuum])
    ivar = np.full_like(model, 4.0)
    ivar[1, 300:340] = 0.0
    flux = model + rng.normal(0, 0.5, model.shape)
    mask = np.zeros(model.shape, dtype=bool)
    mask[:, 800:830] = True
    return {"wavelength": wavelength, "flux": flux, "ivar": ivar, "model": model, "mask": mask}


def assert_png(path: Path, min_size: int = 200) -> np.ndarray:
    """A real PNG with a drawing in it; returns the image."""
    assert path.is_file() and path.stat().st_size > 5000
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert min(image.shape[:2]) >= min_size
    assert image[..., :3].std() > 0.02  # not a blank canvas
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left
    return image


@pytest.mark.parametrize("with_groups", [False, True])
def test_redshift_plots_write_pngs(tmp_path, sample, with_groups):
    groups = sample["groups"] if with_groups else None
    args = (sample["z_pred"], sample["z_true"])
    paths = [
        plot_redshift_comparison(*args, tmp_path / "comparison.png", groups=groups, title="test split"),
        plot_error_histogram(*args, tmp_path / "hist.png", groups=groups),
        plot_metrics_vs_redshift(*args, tmp_path / "vs_z.png", groups=groups),
        plot_pull_distribution(*args, sample["z_err"], tmp_path / "pull.png", groups=groups),
        plot_pit_histogram(
            np.random.default_rng(2).random(len(args[0])), tmp_path / "pit.png", groups=groups
        ),
        plot_completeness_purity(*args, sample["quality"], tmp_path / "cp.png", groups=groups),
        plot_completeness_purity(
            *args, sample["z_err"], tmp_path / "cp_err.png", higher_is_better=False, score_label="z_err"
        ),
    ]
    for path in paths:
        assert_png(path)


def test_group_colours_differ_in_the_image(tmp_path, sample):
    """With groups the class colours appear; without them the points are drawn in one dark colour."""
    grouped = assert_png(
        plot_redshift_comparison(
            sample["z_pred"], sample["z_true"], tmp_path / "g.png", groups=sample["groups"]
        )
    )
    plain = assert_png(plot_redshift_comparison(sample["z_pred"], sample["z_true"], tmp_path / "p.png"))

    def colourful(image):
        rgb = image[..., :3]
        return float(np.mean(rgb.max(axis=-1) - rgb.min(axis=-1) > 0.2))

    assert colourful(grouped) > 2 * colourful(plain)
    assert len(set(class_colors(["bgs", "elg", "lrg", "qso", "other", "xyz", "abc"]).values())) == 7


def test_reconstruction_plot(tmp_path, spectra):
    path = plot_reconstructions(
        spectra["wavelength"],
        spectra["flux"],
        spectra["ivar"],
        spectra["model"],
        tmp_path / "recon.png",
        mask=spectra["mask"],
        labels=["a", "b", "c"],
        max_examples=2,
    )
    two = assert_png(path)
    one = assert_png(
        plot_reconstructions(
            spectra["wavelength"],
            spectra["flux"][0],
            spectra["ivar"][0],
            spectra["model"][0],
            tmp_path / "one.png",
        )
    )
    assert two.shape[0] > 1.5 * one.shape[0]  # one panel pair per example


def test_existing_file_is_replaced_and_failures_leave_nothing(tmp_path, sample, spectra):
    path = tmp_path / "hist.png"
    path.write_bytes(b"old")
    plot_error_histogram(sample["z_pred"], sample["z_true"], path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError, match="z_pred has length"):
        plot_error_histogram(sample["z_pred"][:-1], sample["z_true"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="must end in .png"):
        plot_error_histogram(sample["z_pred"], sample["z_true"], tmp_path / "hist.pdf")
    with pytest.raises(ValueError, match="z_err must be positive"):
        plot_pull_distribution(sample["z_pred"], sample["z_true"], 0 * sample["z_err"], tmp_path / "pull.png")
    with pytest.raises(ValueError, match="model must have shape"):
        plot_reconstructions(
            spectra["wavelength"],
            spectra["flux"],
            spectra["ivar"],
            spectra["model"][:, :-1],
            tmp_path / "recon.png",
        )
    with pytest.raises(ValueError, match="ivar must be finite and non-negative"):
        plot_reconstructions(
            spectra["wavelength"], spectra["flux"], -spectra["ivar"], spectra["model"], tmp_path / "recon.png"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hist.png"]


def test_plots_survive_tiny_and_empty_groups(tmp_path):
    z_true = np.array([0.1, 0.2, 0.3, 1.0])
    z_pred = np.array([0.1, 0.21, 0.9, 1.0])
    groups = ["bgs", "bgs", "bgs", "qso"]  # qso has one object: no bin reaches min_count
    assert_png(plot_metrics_vs_redshift(z_pred, z_true, tmp_path / "vs_z.png", groups=groups), min_size=100)
    assert_png(plot_error_histogram(z_pred, z_true, tmp_path / "hist.png", groups=groups), min_size=100)
    empty = plot_redshift_comparison([], [], tmp_path / "empty.png")
    assert empty.read_bytes()[:8] == PNG_SIGNATURE


def test_redshift_pdf_plot_draws_both_panels_and_checks_lengths(tmp_path):
    pz_z = np.linspace(0.0, 2.0, 200)
    pz = np.exp(-0.5 * ((pz_z - 0.4) / 0.02) ** 2) + 0.5 * np.exp(-0.5 * ((pz_z - 1.1) / 0.02) ** 2)
    scan_z = np.linspace(0.0, 2.0, 2000)
    chi2 = 1000 + 5e4 * (scan_z - 0.4) ** 2
    chi2[:10] = np.nan  # not searched
    alone = assert_png(plot_redshift_pdf(pz_z, pz / pz.sum(), tmp_path / "pz.png", z=0.4))
    both = assert_png(
        plot_redshift_pdf(
            pz_z,
            pz / pz.sum(),
            tmp_path / "both.png",
            scan_z=scan_z,
            chi2_scan=chi2,
            z=0.4,
            z_net=0.41,
            z_true=0.4,
        )
    )
    assert both.shape[0] > 1.5 * alone.shape[0]  # the chi^2 row is there
    with pytest.raises(ValueError, match="chi2_scan"):
        plot_redshift_pdf(pz_z, pz, tmp_path / "bad.png", scan_z=scan_z, chi2_scan=chi2[:-1])
    assert not (tmp_path / "bad.png").exists()
