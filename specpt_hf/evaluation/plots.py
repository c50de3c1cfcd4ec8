"""Evaluation plots written as PNG files.

Every function takes arrays, writes one PNG atomically (temporary file in the same folder, then
`os.replace`) and returns its path. Figures are built with `matplotlib.figure.Figure` and the Agg canvas,
so no pyplot state or GUI backend is touched. Points are coloured by target class when `groups` is given.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
import numpy.typing as npt
from astropy.stats import binom_conf_interval
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..atomic import atomic_write
from .metrics import (
    CATASTROPHIC_THRESHOLD,
    _as_1d,
    _check_length,
    _labels,
    completeness_purity,
    metrics_by_redshift_bin,
    pdf_coverage,
    pulls,
    redshift_errors,
    redshift_metrics,
    uncertainty_calibration,
)

CLASS_COLORS = {
    "bgs": "#3B75AF",
    "elg": "#4E9F50",
    "lrg": "#C03D3E",
    "qso": "#8E6BB8",
    "mws": "#E1812C",
    "other": "#8C6D46",
}
_EXTRA_COLORS = ("#D684BD", "#7F7F7F", "#B5BD61", "#17BECF")
_OVERALL_COLOR = "#222222"
_STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 8.5,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.6,
    "savefig.dpi": 130,
}
DZ_LABEL = r"$\Delta z/(1+z)$"
ONE_SIGMA = math.erf(1 / math.sqrt(2))  # 0.683, the confidence of the η error bars
PULL_LABEL = r"pull $(z_\mathrm{pred} - z_\mathrm{true}) / z_\mathrm{err}$"


@contextlib.contextmanager
def _figure(path: str | os.PathLike, **kwargs) -> Iterator[Figure]:
    """Yield a constrained-layout Figure in the house style; on exit write it to `path` atomically."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {path}")
    with mpl.rc_context(_STYLE):
        fig = Figure(layout="constrained", **kwargs)
        FigureCanvasAgg(fig)
        yield fig
        save_figure(fig, path)


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write `fig` as a PNG to `path` atomically and return the path."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", facecolor="white"))


def class_colors(names: Sequence[str]) -> dict[str, str]:
    """A fixed colour per DESI target class (bgs, elg, lrg, qso, mws, other), other labels from a cycle."""
    extra = iter(_EXTRA_COLORS * (1 + len(names) // len(_EXTRA_COLORS)))
    return {name: CLASS_COLORS.get(name.lower()) or next(extra) for name in names}


def _split(groups: npt.ArrayLike | None, n: int) -> list[tuple[str, np.ndarray, str]]:
    """(label, boolean selection [n], colour) per group, or one entry for the whole sample."""
    if groups is None:
        return [("all", np.ones(n, dtype=bool), _OVERALL_COLOR)]
    labels = _labels(groups, n)
    names = sorted(set(labels.tolist()))
    colors = class_colors(names)
    return [(name, labels == name, colors[name]) for name in names]


def _display(name: str) -> str:
    return name.upper() if name.lower() in CLASS_COLORS else name


def _metrics_text(metrics: dict, prefix: str = "") -> str:
    return (
        f"{prefix}NMAD {metrics['nmad']:.2g}   η {100 * metrics['eta']:.2f}%   "
        f"bias {metrics['bias']:+.1e}   n={metrics['n']}"
    )


def _point_style(n: int) -> dict:
    """Marker size and transparency that keep dense scatter plots readable."""
    return {"s": float(np.clip(300.0 / math.sqrt(max(n, 1)), 1.5, 14.0)), "alpha": 0.8 if n < 300 else 0.45}


def _nmad_or(dz: np.ndarray, default: float) -> float:
    """NMAD of `dz`, or `default` when it is empty or zero."""
    value = 1.48 * float(np.median(np.abs(dz))) if dz.size else 0.0
    return value if value > 0 else default


def _title(fig: Figure, title: str | None) -> None:
    if title:
        fig.suptitle(title, fontweight="bold")


def plot_redshift_comparison(
    z_pred: npt.ArrayLike,
    z_true: npt.ArrayLike,
    path: str | os.PathLike,
    *,
    groups: npt.ArrayLike | None = None,
    catastrophic_threshold: float = CATASTROPHIC_THRESHOLD,
    title: str | None = None,
) -> Path:
    """Predicted vs true redshift with the 1:1 line and the η bounds, plus Δz/(1+z) vs z below."""
    dz = redshift_errors(z_pred, z_true)
    z_pred, z_true = np.asarray(z_pred, dtype=np.float64), np.asarray(z_true, dtype=np.float64)
    lo = min(0.0, float(z_true.min(initial=0.0)), float(z_pred.min(initial=0.0)))
    hi = max(float(z_true.max(initial=1.0)), float(z_pred.max(initial=1.0))) * 1.05
    with _figure(path, figsize=(6.0, 7.4)) as fig:
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.6])
        line = np.linspace(lo, hi, 200)
        top.plot(line, line, color="0.3", lw=0.9, label="1:1")
        bound = {"color": "0.45", "lw": 0.9, "ls": "--"}
        for sign in (1, -1):
            label = rf"$|\Delta z|/(1+z) = {catastrophic_threshold:g}$" if sign > 0 else None
            top.plot(line, line + sign * catastrophic_threshold * (1 + line), label=label, **bound)
            bottom.axhline(sign * catastrophic_threshold, **bound)
        style = _point_style(len(z_true))
        for name, sel, color in _split(groups, len(z_true)):
            label = f"{_display(name)} (n={int(sel.sum())})"
            top.scatter(z_true[sel], z_pred[sel], color=color, label=label, lw=0, rasterized=True, **style)
            bottom.scatter(z_true[sel], dz[sel], color=color, lw=0, rasterized=True, **style)
        top.set(xlim=(lo, hi), ylim=(lo, hi), ylabel=r"$z_\mathrm{pred}$")
        top.legend(loc="upper left", markerscale=2.0)
        top.text(
            0.98,
            0.02,
            _metrics_text(redshift_metrics(z_pred, z_true)),
            transform=top.transAxes,
            ha="right",
            va="bottom",
            fontsize=8.5,
            color="0.2",
        )
        lim = 1.6 * catastrophic_threshold
        outside = np.abs(dz) > lim
        bottom.scatter(
            z_true[outside], np.clip(dz[outside], -lim, lim) * 0.97, marker="^", s=12, color="0.4", lw=0
        )  # off-scale outliers pinned to the edge
        bottom.set(ylim=(-lim, lim), xlabel=r"$z_\mathrm{true}$", ylabel=f"{DZ_LABEL}  (symlog)")
        core = _nmad_or(dz, 1e-3)
        bottom.set_yscale("symlog", linthresh=float(np.clip(3 * core, 1e-5, 0.05)), linscale=1.5)
        bottom.axhline(0.0, color="0.3", lw=0.7)
        _title(fig, title)
    return Path(path)


def plot_error_histogram(
    z_pred: npt.ArrayLike,
    z_true: npt.ArrayLike,
    path: str | os.PathLike,
    *,
    groups: npt.ArrayLike | None = None,
    catastrophic_threshold: float = CATASTROPHIC_THRESHOLD,
    bins: int = 60,
    title: str | None = None,
) -> Path:
    """Histogram of Δz/(1+z) around its core, with NMAD, η and bias (overall and per class) in the legend."""
    dz = redshift_errors(z_pred, z_true)
    overall = redshift_metrics(z_pred, z_true, catastrophic_threshold=catastrophic_threshold)
    core = overall["nmad"] if dz.size else 0.0
    half = (
        min(catastrophic_threshold, max(8.0 * core, 1e-3)) if math.isfinite(core) else catastrophic_threshold
    )
    edges = np.linspace(-half, half, bins + 1)
    with _figure(path, figsize=(7.0, 4.6)) as fig:
        ax = fig.subplots()
        for name, sel, color in _split(groups, len(dz)):
            sub = redshift_metrics(
                np.asarray(z_pred)[sel],
                np.asarray(z_true)[sel],
                catastrophic_threshold=catastrophic_threshold,
            )
            ax.hist(
                np.clip(dz[sel], -half, half),
                bins=edges,
                histtype="step",
                lw=1.6,
                color=color,
                label=_metrics_text(sub, f"{_display(name)}: "),
            )
        if groups is not None:
            ax.plot([], [], " ", label=_metrics_text(overall, "all: "))
        if math.isfinite(overall["nmad"]):
            for sign in (-1, 1):
                ax.axvline(
                    sign * overall["nmad"],
                    color="0.5",
                    lw=0.8,
                    ls=":",
                    label="±NMAD (all)" if sign > 0 else None,
                )
        ax.axvline(0.0, color="0.3", lw=0.8)
        n_out = int(np.sum(np.abs(dz) > half))
        ax.set(xlabel=f"{DZ_LABEL}   (values beyond ±{half:.3g} in the edge bins: {n_out})", ylabel="objects")
        ax.legend(loc="upper left", handlelength=1.2)
        ax.set_ylim(top=ax.get_ylim()[1] * (1.25 + 0.1 * len(ax.get_legend().get_texts())))
        _title(fig, title)
    return Path(path)


def plot_metrics_vs_redshift(
    z_pred: npt.ArrayLike,
    z_true: npt.ArrayLike,
    path: str | os.PathLike,
    *,
    edges: npt.ArrayLike | None = None,
    groups: npt.ArrayLike | None = None,
    catastrophic_threshold: float = CATASTROPHIC_THRESHOLD,
    min_count: int = 3,
    title: str | None = None,
) -> Path:
    """NMAD and η (with binomial errors) in bins of true redshift, overall and per class.

    `edges` default to equal bins over the range of z_true (about 25 objects a bin, 1 to 10 bins); bins
    with fewer than `min_count` objects, and empty ones, are not drawn. The η error bars are 68 % Wilson
    score intervals (astropy `binom_conf_interval`).
    """
    redshift_errors(z_pred, z_true)  # validates
    z_pred, z_true = np.asarray(z_pred, dtype=np.float64), np.asarray(z_true, dtype=np.float64)
    if edges is None:
        lo, hi = (float(z_true.min()), float(z_true.max())) if z_true.size else (0.0, 1.0)
        n_bins = int(np.clip(len(z_true) // 25, 1, 10))
        edges = np.linspace(lo, hi if hi > lo else lo + 0.1, n_bins + 1)
    edges = _as_1d(edges, "edges")
    series = [("all", np.ones(len(z_true), dtype=bool), _OVERALL_COLOR)] if groups is not None else []
    everything = series + _split(groups, len(z_true))
    dodge = 0.04 * float(np.min(np.diff(edges))) if len(everything) > 1 and len(edges) > 1 else 0.0
    drawn = 0
    with _figure(path, figsize=(7.0, 5.6)) as fig:
        ax_nmad, ax_eta = fig.subplots(2, 1, sharex=True)
        for k, (name, sel, color) in enumerate(everything):
            rows = metrics_by_redshift_bin(
                z_pred[sel], z_true[sel], edges, catastrophic_threshold=catastrophic_threshold
            )
            rows = [r for r in rows if r["n"] >= max(min_count, 1)]
            drawn += len(rows)
            z = np.array([r["z_center"] for r in rows]) + dodge * (k - 0.5 * (len(everything) - 1))
            eta = np.array([r["eta"] for r in rows])
            # the Wilson score interval: sensible also at η = 0 and 1
            lo, hi = binom_conf_interval(
                np.array([r["n_catastrophic"] for r in rows], dtype=np.int64),
                np.array([r["n"] for r in rows], dtype=np.int64),
                confidence_level=ONE_SIGMA,
                interval="wilson",
            )
            eta_err = np.clip(np.stack([eta - lo, hi - eta]), 0.0, None)  # [2, bins], ≥ 0 despite rounding
            kwargs = {"color": color, "marker": "o", "ms": 4, "lw": 2.0 if name == "all" else 1.4}
            ax_nmad.plot(z, [r["nmad"] for r in rows], label=_display(name), **kwargs)
            ax_eta.errorbar(z, 100 * eta, yerr=100 * eta_err, capsize=2, **kwargs)
        ax_nmad.set(ylabel="NMAD", ylim=(0, None), xlim=(edges[0], edges[-1]))
        if not drawn:
            ax_nmad.text(
                0.5,
                0.5,
                f"no bin holds {min_count} or more objects",
                transform=ax_nmad.transAxes,
                ha="center",
                va="center",
                color="0.4",
            )
        ax_eta.set(
            ylabel=rf"$\eta$ (%)  [$|\Delta z|/(1+z) > {catastrophic_threshold:g}$]",
            xlabel=r"$z_\mathrm{true}$",
            ylim=(0, None),
        )
        ax_nmad.legend(loc="upper left", ncols=min(6, len(series) + 5))
        _title(fig, title)
    return Path(path)


def plot_pull_distribution(
    z_pred: npt.ArrayLike,
    z_true: npt.ArrayLike,
    z_err: npt.ArrayLike,
    path: str | os.PathLike,
    *,
    groups: npt.ArrayLike | None = None,
    limit: float = 5.0,
    title: str | None = None,
) -> Path:
    """Calibration of the uncertainty: pulls (z_pred − z_true)/z_err against a unit Gaussian.

    The legend gives the fractions within 1σ and 2σ (68.3 % and 95.4 % when calibrated).
    """
    pull = pulls(z_pred, z_true, z_err)
    arrays = [np.asarray(a, dtype=np.float64) for a in (z_pred, z_true, z_err)]
    edges = np.linspace(-limit, limit, 51)
    with _figure(path, figsize=(7.0, 4.6)) as fig:
        ax = fig.subplots()
        x = np.linspace(-limit, limit, 400)
        ax.fill_between(x, np.exp(-0.5 * x**2) / math.sqrt(2 * math.pi), color="0.88", label="N(0, 1)")
        for name, sel, color in _split(groups, len(pull)):
            stats = uncertainty_calibration(*(a[sel] for a in arrays))
            label = (
                f"{_display(name)}: ±1σ {100 * stats['within_1sigma']:.1f}%, ±2σ "
                f"{100 * stats['within_2sigma']:.1f}%, σ68 {stats['pull_sigma68']:.2f}, n={stats['n']}"
            )
            ax.hist(
                np.clip(pull[sel], -limit, limit),
                bins=edges,
                density=bool(sel.any()),
                histtype="step",
                lw=1.6,
                color=color,
                label=label,
            )
        for s in (-2, -1, 1, 2):
            ax.axvline(s, color="0.6", lw=0.7, ls=":")
        ax.plot([], [], " ", label="calibrated: ±1σ 68.3%, ±2σ 95.4%, σ68 1.00")
        ax.set(
            xlabel=f"{PULL_LABEL}  (clipped at ±{limit:g})",
            ylabel="density",
            xlim=(-limit, limit),
        )
        ax.legend(loc="upper left", handlelength=1.2)
        ax.set_ylim(0, ax.get_ylim()[1] * (1.15 + 0.08 * len(ax.get_legend().get_texts())))
        _title(fig, title)
    return Path(path)


def plot_pit_histogram(
    pit: npt.ArrayLike,
    path: str | os.PathLike,
    *,
    groups: npt.ArrayLike | None = None,
    bins: int = 20,
    title: str | None = None,
) -> Path:
    """Calibration of p(z): the histogram of the PITs (the p(z) mass below each truth) against the uniform density
    of calibrated p(z)s. A U shape: p(z)s too narrow or misplaced; a hump: too wide. The legend gives the shares
    of truths in the central 68 % and 95 % intervals."""
    pit = np.asarray(pit, dtype=np.float64)
    with _figure(path, figsize=(7.0, 4.6)) as fig:
        ax = fig.subplots()
        ax.axhline(1.0, color="0.6", lw=1.0, ls="--", label="calibrated: uniform, 68 % / 95 %")
        for name, sel, color in _split(groups, len(pit)):
            coverage = pdf_coverage(pit[sel])
            label = f"{_display(name)}: {100 * coverage['0.68']:.1f} % / {100 * coverage['0.95']:.1f} %, n={sel.sum()}"
            ax.hist(
                pit[sel],
                bins=np.linspace(0, 1, bins + 1),
                density=bool(sel.any()),
                histtype="step",
                lw=1.6,
                color=color,
                label=label,
            )
        ax.set(xlabel="PIT: p(z) mass below the true redshift", ylabel="density", xlim=(0, 1))
        ax.legend(loc="upper center", handlelength=1.2)
        ax.set_ylim(0, ax.get_ylim()[1] * (1.15 + 0.08 * len(ax.get_legend().get_texts())))
        _title(fig, title)
    return Path(path)


def plot_completeness_purity(
    z_pred: npt.ArrayLike,
    z_true: npt.ArrayLike,
    score: npt.ArrayLike,
    path: str | os.PathLike,
    *,
    thresholds: npt.ArrayLike | None = None,
    higher_is_better: bool = True,
    groups: npt.ArrayLike | None = None,
    score_label: str = "quality threshold",
    catastrophic_threshold: float = CATASTROPHIC_THRESHOLD,
    title: str | None = None,
) -> Path:
    """Completeness and purity vs the threshold on `score`, and purity vs completeness."""
    redshift_errors(z_pred, z_true)  # validates
    score = _as_1d(score, "score")
    arrays = [np.asarray(a, dtype=np.float64) for a in (z_pred, z_true)]
    if thresholds is None:
        thresholds = np.unique(np.quantile(score, np.linspace(0, 1, 51))) if score.size else np.empty(0)
    thresholds = _as_1d(np.atleast_1d(thresholds), "thresholds")
    series = [("all", np.ones(len(score), dtype=bool), _OVERALL_COLOR)] if groups is not None else []
    direction = "≥" if higher_is_better else "≤"
    with _figure(path, figsize=(12.0, 4.0)) as fig:
        ax_c, ax_p, ax_cp = fig.subplots(1, 3)
        for name, sel, color in series + _split(groups, len(score)):
            cp = completeness_purity(
                *(a[sel] for a in arrays),
                score[sel],
                thresholds,
                higher_is_better=higher_is_better,
                catastrophic_threshold=catastrophic_threshold,
            )
            style = {"color": color, "lw": 2.2 if name == "all" else 1.5}
            ax_c.plot(cp["threshold"], cp["completeness"], label=_display(name), **style)
            ax_p.plot(cp["threshold"], cp["purity"], **style)
            ax_cp.plot(cp["completeness"], cp["purity"], **style)
        ax_c.set(
            xlabel=f"{score_label} (kept: score {direction} threshold)",
            ylabel="completeness (fraction kept)",
            ylim=(-0.02, 1.05),
        )
        ax_p.set(
            xlabel=f"{score_label} (kept: score {direction} threshold)",
            ylabel="purity (fraction not catastrophic)",
        )
        ax_cp.set(xlabel="completeness", ylabel="purity", xlim=(-0.02, 1.02))
        ax_c.legend(loc="best")
        _title(fig, title)
    return Path(path)


def _as_2d(values: npt.ArrayLike, name: str, n_pixels: int, dtype=np.float64) -> np.ndarray:
    array = np.asarray(values, dtype=dtype)
    array = array[None, :] if array.ndim == 1 else array
    if array.ndim != 2 or array.shape[1] != n_pixels:
        raise ValueError(
            f"{name} must have shape [n_spectra, {n_pixels}] or [{n_pixels}], got {np.shape(values)}"
        )
    return array


def plot_reconstructions(
    wavelength: npt.ArrayLike,
    flux: npt.ArrayLike,
    ivar: npt.ArrayLike,
    model: npt.ArrayLike,
    path: str | os.PathLike,
    *,
    mask: npt.ArrayLike | None = None,
    labels: Sequence[str] | None = None,
    max_examples: int = 4,
    title: str | None = None,
) -> Path:
    """Reconstruction examples: data with the model on top, and the residual (flux − model)·√ivar below.

    Args:
        wavelength: Å, [pixels]. flux, ivar, model: [n_spectra, pixels] (or [pixels]) in the same units.
        mask: bool [n_spectra, pixels], True = bad pixel; bad pixels and ivar == 0 are not drawn.
        labels: a caption per spectrum (target id, class, z).
    """
    wavelength = _as_1d(wavelength, "wavelength")
    n_pix = len(wavelength)
    flux, ivar, model = (
        _as_2d(a, name, n_pix) for a, name in ((flux, "flux"), (ivar, "ivar"), (model, "model"))
    )
    if not (len(flux) == len(ivar) == len(model)):
        raise ValueError(
            f"flux, ivar and model hold {len(flux)}, {len(ivar)}, {len(model)} spectra; expected equal"
        )
    bad = np.zeros(flux.shape, dtype=bool) if mask is None else _as_2d(mask, "mask", n_pix, dtype=bool)
    if bad.shape != flux.shape:
        raise ValueError(f"mask has shape {bad.shape}, expected {flux.shape}")
    if np.any(ivar < 0) or not np.all(np.isfinite(ivar)):
        raise ValueError("ivar must be finite and non-negative")
    if labels is not None and len(labels) < min(len(flux), max_examples):
        raise ValueError(f"labels has {len(labels)} entries, expected one per spectrum")
    bad = bad | (ivar <= 0) | ~np.isfinite(flux)
    n_show = max(1, min(len(flux), max_examples))
    with _figure(path, figsize=(10.0, 2.9 * n_show + 0.4)) as fig:
        grid = fig.add_gridspec(2 * n_show, 1, height_ratios=[3, 1.2] * n_show)
        for i in range(n_show):
            ax_f = fig.add_subplot(grid[2 * i])
            ax_r = fig.add_subplot(grid[2 * i + 1], sharex=ax_f)
            label = labels[i] if labels is not None else None
            _draw_reconstruction(ax_f, ax_r, wavelength, flux[i], ivar[i], model[i], bad[i], label)
        ax_r.set_xlabel("observed wavelength (Å)")
        _title(fig, title)
    return Path(path)


def _draw_reconstruction(
    ax_f: Axes,
    ax_r: Axes,
    wavelength: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    model: np.ndarray,
    bad: np.ndarray,
    label: str | None,
) -> None:
    """One spectrum: data (grey) and model on `ax_f`, normalised residual on `ax_r`."""
    good = ~bad
    data = np.where(good, flux, np.nan)
    chi = np.where(good, (flux - model) * np.sqrt(ivar), np.nan)
    ax_f.plot(wavelength, data, color="0.6", lw=0.5, label="data")
    ax_f.plot(wavelength, np.where(good, model, np.nan), color="#C03D3E", lw=0.9, label="model")
    if good.any():
        lo, hi = np.percentile(np.concatenate([flux[good], model[good]]), [0.5, 99.5])
        pad = 0.15 * (hi - lo) if hi > lo else 1.0
        ax_f.set_ylim(lo - pad, hi + pad)
        chi2 = float(np.mean(chi[good] ** 2))
        text = f"χ²/pixel {chi2:.2f}   masked {100 * bad.mean():.1f}%"
        ax_f.text(0.99, 0.97, text, transform=ax_f.transAxes, ha="right", va="top", fontsize=8.5, color="0.2")
    ax_f.set_ylabel("flux")
    ax_f.legend(loc="upper left", ncols=2)
    if label:
        ax_f.set_title(label, loc="left", fontsize=10)
    ax_f.tick_params(labelbottom=False)
    ax_r.axhspan(-1, 1, color="0.9", zorder=0)
    ax_r.plot(wavelength, chi, color="#3B75AF", lw=0.5)
    ax_r.axhline(0, color="0.3", lw=0.7)
    ax_r.set(ylim=(-5, 5), ylabel=r"$\Delta/\sigma$", xlim=(wavelength[0], wavelength[-1]))


def plot_redshift_pdf(
    pz_z: npt.ArrayLike,
    pz: npt.ArrayLike,
    path: str | os.PathLike,
    *,
    scan_z: npt.ArrayLike | None = None,
    chi2_scan: npt.ArrayLike | None = None,
    z: float | None = None,
    z_net: float | None = None,
    z_true: float | None = None,
    zoom: float = 0.03,
    title: str | None = None,
) -> Path:
    """One target's p(z) (probability per bin) above its chi^2(z) samples minus their minimum (when given), over
    the whole range (left) and within +-`zoom` of `z` (right), with the refined `z`, the network's `z_net` and
    the true `z_true` marked."""
    pz_z, pz = _as_1d(pz_z, "pz_z"), _as_1d(pz, "pz")
    _check_length(pz, "pz", len(pz_z))
    curves = [(pz_z, pz, "p(z) per bin", "linear", "#3B75AF")]
    if scan_z is not None and chi2_scan is not None:
        scan_z = _as_1d(scan_z, "scan_z")
        chi2 = np.asarray(chi2_scan, dtype=np.float64)  # [trials], NaN where not searched
        _check_length(chi2, "chi2_scan", len(scan_z))
        curves.append((scan_z, chi2 - np.nanmin(chi2), r"$\chi^2(z) - \chi^2_{\min}$", "symlog", "#4E9F50"))
    marks = [
        (z_true, "true z", "k", "-"),
        (z_net, "network z", "#8E6BB8", ":"),
        (z, "refined z", "#C03D3E", "--"),
    ]
    centre = next((v for v in (z, z_net, z_true) if v is not None and np.isfinite(v)), None)
    with _figure(path, figsize=(10.0, 2.8 * len(curves) + 0.6)) as fig:
        axes = fig.subplots(len(curves), 2, squeeze=False, width_ratios=(3, 1), sharex="col")
        for (x, y, label, scale, color), row in zip(curves, axes, strict=True):
            for ax in row:
                if scale == "linear":
                    ax.step(x, y, where="mid", color=color, lw=1.2)
                    ax.set_ylim(0, None)
                else:
                    ax.plot(x, y, ".-" if ax is row[1] else "-", color=color, lw=0.8, ms=3)
                    ax.set_yscale("symlog")
                for value, name, mark_color, style in marks:
                    if value is not None and np.isfinite(value):
                        ax.axvline(value, color=mark_color, ls=style, lw=1.0, label=f"{name} {value:.5f}")
            row[0].set_ylabel(label)
            if centre is not None:
                row[1].set_xlim(centre - zoom, centre + zoom)
        axes[-1, 0].set_xlabel("z")
        axes[-1, 1].set_xlabel(f"z (±{zoom:g})")
        axes[0, 0].legend(loc="upper right")
        _title(fig, title)
    return Path(path)
