"""`specpt plot-mock`: example mock spectra of each DESI class next to a real DESI spectrum."""

from __future__ import annotations

import argparse
import importlib.resources
from pathlib import Path
from typing import Any

import numpy as np

from specpt_hf.atomic import make_folder
from specpt_hf.data.instrument import DESI
from specpt_hf.data.mock import NEBULAR_LINES, QSO_LINES, generate_spectra
from specpt_hf.data.redshifts import EXTRAGALACTIC_CLASSES

REAL_FILE = "coadd-sv3-dark-26065.fits"
_LABELS = {
    "OII_3729": "[OII]",
    "Hbeta": "Hβ",
    "OIII_5008": "[OIII]",
    "Halpha": "Hα",
    "Lya": "Lyα",
    "CIV": "CIV",
}
_LABELS |= {"CIII": "CIII]", "MgII": "MgII"}
_ABSORPTION_LABELS = {"K": 3934.78, "H": 3969.59, "G band": 4305.61, "Mg b": 5176.7, "Na D": 5895.6}


def real_desi_spectrum(path: str | Path | None = None) -> dict[str, Any]:
    """The highest-S/N target of a real DESI coadd (default: the Fuji healpix coadd shipped with specutils),
    read through the project's DESI reader and merged onto the brz grid."""
    from specpt_hf.data.desi import read_desi_spectra

    if path is None:
        path = importlib.resources.files("specutils") / "io/default_loaders/tests/desi_test_data" / REAL_FILE
    records = list(read_desi_spectra(Path(str(path))))
    if not records:
        raise ValueError(f"{path}: no target spectra to plot")
    snr = [np.median(r["flux"] * np.sqrt(r["ivar"])) for r in records]
    return records[int(np.argmax(snr))] | {"path": Path(str(path))}


def _smooth(flux: np.ndarray, bad: np.ndarray, width: int = 7) -> np.ndarray:
    """Boxcar smoothing that ignores bad pixels."""
    good = (~bad).astype(float)
    kernel = np.ones(width)
    num = np.convolve(np.where(bad, 0.0, flux), kernel, mode="same")
    den = np.convolve(good, kernel, mode="same")
    return np.where(den > 0, num / np.maximum(den, 1.0), np.nan)


def _panel(
    ax: Any, wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray, bad: np.ndarray, title: str
) -> None:
    sigma = np.where(ivar > 0, 1.0 / np.sqrt(np.where(ivar > 0, ivar, 1.0)), np.nan)
    smooth = _smooth(flux, bad)
    ax.plot(wave, np.where(bad, np.nan, flux), color="0.75", lw=0.3, label="flux")
    ax.plot(wave, smooth, color="C0", lw=0.7, label="flux, 7-pixel boxcar")
    ax.plot(wave, sigma, color="C3", lw=0.4, alpha=0.8, label="1σ noise")
    lo, hi = np.nanpercentile(smooth, [1, 99.5])
    ax.set_ylim(min(lo, 0.0) - 0.1 * (hi - lo), hi + 0.35 * (hi - lo))
    ax.set_xlim(DESI.coverage)
    ax.set_title(title, loc="left", fontsize=9)
    ax.set_ylabel("$F_\\lambda$ [$10^{-17}$ erg s$^{-1}$ cm$^{-2}$ Å$^{-1}$]", fontsize=7)


def _mark_lines(ax: Any, z: float, lines: dict[str, float], color: str) -> None:
    top = ax.get_ylim()[1]
    for label, rest in lines.items():
        obs = rest * (1.0 + z)
        if DESI.coverage[0] < obs < DESI.coverage[1]:
            ax.axvline(obs, color=color, lw=0.6, ls=":", alpha=0.8)
            ax.text(obs, top, label, fontsize=6, color=color, ha="center", va="top", rotation=90)


def plot_mock(out: Path, seed: int = 0, real_path: str | Path | None = None) -> Path:
    """Draw one mock spectrum per class (the median-S/N one of a small draw) and the real spectrum."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(EXTRAGALACTIC_CLASSES) + 1, 1, figsize=(13, 2.6 * (len(EXTRAGALACTIC_CLASSES) + 1)), sharex=True
    )
    for ax, target_class in zip(axes, EXTRAGALACTIC_CLASSES, strict=False):
        mock = generate_spectra(target_class, 9, seed)
        truth = mock["truth"]
        # the typical one: median continuum S/N (BGS, LRG) or median line S/N (ELG, QSO)
        key = "line_snr_max" if target_class in ("elg", "qso") else "snr_median"
        i = int(np.argsort(truth[key])[len(truth["z"]) // 2])
        title = (
            f"mock {target_class.upper()}  z = {truth['z'][i]:.3f}   r-arm median S/N = {truth['snr_median'][i]:.2f}"
            f"   hard flags = {truth['hard'][i]}"
        )
        _panel(ax, mock["wave"], mock["flux"][i], mock["ivar"][i], mock["mask"][i], title)
        ax.plot(mock["wave"], mock["model"][i], color="k", lw=0.5, alpha=0.7, label="noiseless model")
        names = QSO_LINES if target_class == "qso" else NEBULAR_LINES
        emission = {
            _LABELS[k]: (v[0] if isinstance(v, tuple) else v) for k, v in names.items() if k in _LABELS
        }
        _mark_lines(ax, float(truth["z"][i]), emission, "C2")
        if target_class in ("bgs", "lrg"):
            _mark_lines(ax, float(truth["z"][i]), _ABSORPTION_LABELS, "C4")
    real = real_desi_spectrum(real_path)
    bad = np.asarray(real["mask"], dtype=bool)
    _panel(
        axes[-1],
        DESI.wave,
        real["flux"],
        real["ivar"],
        bad,
        f"real DESI: {real['path'].name}, TARGETID {real['targetid']}",
    )
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=4, fontsize=8, frameon=False)
    axes[-1].set_xlabel("vacuum wavelength [Å]")
    fig.tight_layout(rect=(0, 0, 1, 0.975))
    make_folder(out.parent)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    """`specpt plot-mock --out fig.png`: mock spectra per class next to a real DESI spectrum."""
    parser = argparse.ArgumentParser(prog="specpt plot-mock", description=main.__doc__)
    parser.add_argument("--out", type=Path, default=Path("mock_spectra.png"), help="PNG to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--real", type=Path, default=None, help="a real DESI coadd (default: the specutils copy)"
    )
    args = parser.parse_args(argv)
    print(f"wrote {plot_mock(args.out, args.seed, args.real)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
