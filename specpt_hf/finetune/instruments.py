"""Instruments for fine-tuning: what they observe (`INSTRUMENT_SAMPLES`), their grids as config values
(`native_grid`), and their coverage of a model's grid (`coverage_mask`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..configuration_specpt import SpecPTConfig
from ..data.instrument import Instrument, get_instrument
from ..prediction import model_wavelength as config_wavelength  # a config's grid, float64 [num_pixels]
from ..resampling import bin_edges


@dataclass(frozen=True)
class InstrumentSample:
    """The mock targets an instrument observes (class -> share) and the redshift range of its head."""

    classes: Mapping[str, float]
    z_min: float
    z_max: float


# DEIMOS: DEEP2-like galaxies (z ~ 0.7-1.4) plus brighter low-z ones; the mock classes reach z = 1.63.
# WFC3 grisms: slitless emission-line galaxies (H-alpha, [O III], [O II]) and quasars up to z ~ 3.5.
INSTRUMENT_SAMPLES: dict[str, InstrumentSample] = {
    "desi": InstrumentSample({"bgs": 0.25, "lrg": 0.25, "elg": 0.3, "qso": 0.2}, 0.0, 4.0),
    "deimos": InstrumentSample({"bgs": 0.2, "lrg": 0.3, "elg": 0.5}, 0.0, 1.7),
    "hst_g102": InstrumentSample({"elg": 0.8, "qso": 0.2}, 0.0, 3.6),
    "hst_g141": InstrumentSample({"elg": 0.8, "qso": 0.2}, 0.0, 3.6),
}


def instrument_sample(instrument: str | Instrument) -> InstrumentSample:
    """The default targets and redshift range of `instrument` (ValueError for an instrument without one)."""
    name = get_instrument(instrument).name.lower()
    if name not in INSTRUMENT_SAMPLES:
        raise ValueError(f"no default sample for instrument {name!r}; known: {sorted(INSTRUMENT_SAMPLES)}")
    return INSTRUMENT_SAMPLES[name]


def native_grid(instrument: str | Instrument, step: float | None = None) -> dict[str, float | int]:
    """The instrument's grid as config values (`wavelength_start`, `wavelength_step`, `num_pixels`).

    A linear grid is taken as it is; a grid that is not linear (arms with different steps) becomes a linear grid
    over the same range with the median pixel step. `step` forces another step (e.g. to oversample a grism).
    """
    wave = get_instrument(instrument).wave
    steps = np.diff(wave)
    linear = np.allclose(steps, steps[0], rtol=1e-6, atol=0.0)
    if step is None and linear:
        return {
            "wavelength_start": float(wave[0]),
            "wavelength_step": float(steps[0]),
            "num_pixels": len(wave),
        }
    step = float(np.median(steps)) if step is None else float(step)
    if not step > 0:
        raise ValueError(f"`step` must be > 0, got {step}")
    num_pixels = int(np.floor((wave[-1] - wave[0]) / step + 1e-9)) + 1
    return {"wavelength_start": float(wave[0]), "wavelength_step": step, "num_pixels": num_pixels}


def coverage_mask(config: SpecPTConfig, instrument: str | Instrument) -> np.ndarray:
    """Model pixels (of `config`'s grid) lying entirely inside the instrument's coverage, bool [num_pixels].

    Raises:
        ValueError: when fewer pixels than one token (`patch_size`; 1 for the `paper` layout) are covered.
    """
    instrument = get_instrument(instrument)
    model_edges = bin_edges(config_wavelength(config))
    data_edges = bin_edges(instrument.wave)
    covered = (model_edges[:-1] >= data_edges[0] - 1e-9) & (model_edges[1:] <= data_edges[-1] + 1e-9)
    needed = config.patch_size if config.layout == "tokens" else 1
    if covered.sum() < needed:
        low, high = instrument.coverage
        raise ValueError(
            f"{instrument.name} covers {low:.0f}-{high:.0f} A but the model's grid spans "
            f"{config.wavelength_start:.0f}-{config.wavelength_end:.0f} A: {int(covered.sum())} model pixels are "
            f"covered, at least {needed} are needed for grid='resample'; use grid='native'"
        )
    return covered
