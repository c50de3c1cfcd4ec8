"""Mock data for an instrument, as Parquet shards in the project layout.

The mock data come from `specpt_hf.data.mock.generate_spectra` on the instrument's grid and resolution, written
as Parquet shards in the project layout (`{out}/{split}/part-*.parquet`, the columns of ARCHITECTURE.md, any
pixel count), so `specpt_hf.training` reads them unchanged.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..atomic import atomic_write_json, replaced_folder
from ..configuration_specpt import SpecPTConfig
from ..data import SPLITS
from ..data.builder import desi_features, record_to_example
from ..data.instrument import INSTRUMENTS, Instrument, get_instrument
from ..data.prepare import ShardWriter, check_output_folder, write_dataset_card
from ..data.redshifts import QualityCuts
from ..resampling import resample
from .instruments import instrument_sample

MOCK_INFO_NAME = "mock_info.json"
_MOCK_TARGETID_BIT = 1 << 58  # desitarget's MOCK bit


def _class_counts(classes: Mapping[str, float], n: int) -> dict[str, int]:
    """Split `n` spectra over the classes by share (largest remainder)."""
    total = float(sum(classes.values()))
    exact = {name: n * share / total for name, share in classes.items()}
    counts = {name: int(np.floor(value)) for name, value in exact.items()}
    for name in sorted(exact, key=lambda k: counts[k] - exact[k])[: n - sum(counts.values())]:
        counts[name] += 1
    return counts


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _instrument_code(instrument: Instrument) -> int:
    names = sorted(INSTRUMENTS)
    return names.index(instrument.name.lower()) + 1 if instrument.name.lower() in names else 0


def mock_chunk(
    instrument: Instrument,
    classes: Mapping[str, float],
    n: int,
    seed: int,
    wavelength: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """`n` mock spectra of the classes, shuffled, on `wavelength` (resampled, uncovered pixels masked) or on the
    instrument's grid; columns flux, ivar, mask [n, pixels] and z, zerr, zwarn, spectype, target_class [n]."""
    parts = []
    for k, (name, count) in enumerate(_class_counts(classes, n).items()):
        if count:
            parts.append((name, _generate(name, count, _derived_seed(seed, k), instrument)))
    flux = np.concatenate([d["flux"] for _, d in parts])  # [n, instrument pixels]
    ivar = np.concatenate([d["ivar"] for _, d in parts])
    mask = np.concatenate([d["mask"] for _, d in parts])
    if wavelength is not None and not _same_grid(instrument.wave, wavelength):
        flux, ivar, mask = resample(instrument.wave, flux, ivar, wavelength, mask=mask)  # [n, pixels]
    truth = {
        key: np.concatenate([d["truth"][key] for _, d in parts]) for key in ("z", "zerr", "zwarn", "spectype")
    }
    order = np.random.default_rng(_derived_seed(seed, 1_000_003)).permutation(n)
    columns = {
        "flux": flux.astype(np.float32),
        "ivar": ivar.astype(np.float32),
        "mask": mask | ~(ivar > 0),
        "target_class": np.concatenate([np.full(len(d["flux"]), name) for name, d in parts]),
        **truth,
    }
    return {key: value[order] for key, value in columns.items()}


def _generate(target_class: str, n: int, seed: int, instrument: Instrument) -> dict[str, Any]:
    from ..data.mock import generate_spectra

    return generate_spectra(target_class, n, seed, instrument=instrument)


def _same_grid(a: np.ndarray, b: np.ndarray) -> bool:
    return len(a) == len(b) and np.allclose(a, b, rtol=0.0, atol=1e-6 * float(np.max(np.abs(a))))


def read_mock_info(data_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The `mock_info.json` of a folder written by `write_instrument_dataset` (None when there is none)."""
    path = Path(data_dir) / MOCK_INFO_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err


def write_instrument_dataset(
    out_dir: str | os.PathLike,
    instrument: str | Instrument,
    wavelength: np.ndarray | None,
    splits: Mapping[str, int],
    *,
    seed: int = 0,
    classes: Mapping[str, float] | None = None,
    chunk_size: int = 256,
    shard_size: int = 2000,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, int]:
    """Mock spectra of `instrument` as Parquet shards `{out_dir}/{split}/part-*.parquet` (ARCHITECTURE.md
    columns, `z` = the mock truth) plus `mock_info.json` describing the grid and the sample.

    Args:
        wavelength: the grid to write the spectra on (e.g. `config_wavelength(model.config)`): spectra are
            resampled onto it with uncovered pixels masked. None keeps the instrument's own grid.
        splits: spectra per split, e.g. {"train": 2000, "validation": 200, "test": 500}. Each split has its own
            seeds, so a split's spectra do not depend on the other splits' sizes; rows are a shuffled class mix,
            so the first N training rows are a fair subsample.
        classes: target class -> share (default: the instrument's `INSTRUMENT_SAMPLES`).

    Returns:
        Rows written per split (spectra without any good pixel on `wavelength` are dropped and counted in
        `mock_info.json`).
    """
    instrument = get_instrument(instrument)
    classes = dict(classes or instrument_sample(instrument).classes)
    unknown = [split for split in splits if split not in SPLITS]
    if unknown or any(int(n) < 0 for n in splits.values()):
        raise ValueError(f"`splits` must map {SPLITS} to counts >= 0, got {dict(splits)}")
    grid = instrument.wave if wavelength is None else np.asarray(wavelength, dtype=float)
    out = Path(out_dir)
    check_output_folder(out, overwrite)
    with replaced_folder(out) as tmp:  # complete or absent: written aside, the card last, then renamed
        features = desi_features(len(grid))
        rows, dropped = {}, {}
        for split_code, split in enumerate(SPLITS):
            n_split = int(splits.get(split, 0))
            if not n_split:
                continue
            writer = ShardWriter(tmp / split, features, shard_size, min(256, shard_size), "snappy")
            rows[split], dropped[split] = 0, 0
            chunks = range(math.ceil(n_split / chunk_size))
            try:
                for k in tqdm(chunks, desc=f"{instrument.name} {split}", unit="chunk", disable=not progress):
                    n = min(chunk_size, n_split - k * chunk_size)
                    data = mock_chunk(instrument, classes, n, _derived_seed(seed, split_code, k), grid)
                    for i in range(n):
                        if data["mask"][i].all():
                            dropped[split] += 1
                            continue
                        index = k * chunk_size + i
                        targetid = (
                            _MOCK_TARGETID_BIT | _instrument_code(instrument) << 48 | split_code << 40 | index
                        )
                        writer.add(record_to_example(_record(data, i, targetid, instrument)))
                        rows[split] += 1
                writer.close()
            except BaseException:
                writer.abort()
                raise
        grid_values = {
            "wavelength_start": float(grid[0]),
            "wavelength_step": float(np.median(np.diff(grid))),
            "num_pixels": len(grid),
            "linear": bool(np.allclose(np.diff(grid), np.diff(grid)[0], rtol=1e-6)),
        }
        info = {"instrument": instrument.name, "seed": seed, "classes": classes, "requested": dict(splits)}
        atomic_write_json(
            tmp / MOCK_INFO_NAME, {**info, **grid_values, "rows": rows, "dropped_no_coverage": dropped}
        )
        body = f"\n# Mock {instrument.name} spectra\n\nWritten by `specpt_hf.finetune.write_instrument_dataset`.\n"
        write_dataset_card(
            tmp, rows=rows, target_class="all", cuts=QualityCuts(enabled=False), features=features, body=body
        )
    return rows


def _record(data: Mapping[str, np.ndarray], i: int, targetid: int, instrument: Instrument) -> dict[str, Any]:
    return {
        "targetid": targetid,
        "flux": data["flux"][i],
        "ivar": data["ivar"][i],
        "mask": data["mask"][i],
        "z": data["z"][i],
        "zerr": data["zerr"][i],
        "zwarn": data["zwarn"][i],
        "spectype": data["spectype"][i],
        "target_class": data["target_class"][i],
        "survey": f"mock-{instrument.name.lower()}",
        "program": "mock",
        "healpix": -1,
    }


def check_data_grid(data_dir: str | os.PathLike, config: SpecPTConfig) -> None:
    """Raise ValueError when `mock_info.json` of `data_dir` describes another grid than `config`'s."""
    info = read_mock_info(data_dir)
    if info is None:
        return
    same = (
        info["num_pixels"] == config.num_pixels
        and math.isclose(info["wavelength_start"], config.wavelength_start, rel_tol=1e-6)
        and math.isclose(info["wavelength_step"], config.wavelength_step, rel_tol=1e-6)
    )
    if not same:
        raise ValueError(
            f"{data_dir}: spectra are on a {info['num_pixels']}-pixel grid from {info['wavelength_start']:g} A in "
            f"{info['wavelength_step']:g} A steps, the model reads {config.num_pixels} pixels from "
            f"{config.wavelength_start:g} A in {config.wavelength_step:g} A steps"
        )
