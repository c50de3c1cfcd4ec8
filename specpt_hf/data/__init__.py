"""DESI data: reading coadd/spectra and Redrock files, redshift labels, the `datasets` builder, Parquet.

`desi` and `redshifts` need only numpy and astropy; the builder and `prepare_dataset` (which need
`datasets` and `pyarrow`) are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .desi import (
    DESI_ARMS,
    DESI_N_PIXELS,
    DESI_WAVE_END,
    DESI_WAVE_START,
    DESI_WAVE_STEP,
    DesiFormatError,
    ReadStats,
    desi_brz_wavelength,
    inspect_desi_file,
    merge_arms,
    read_desi_spectra,
)
from .redshifts import (
    EXTRAGALACTIC_CLASSES,
    TARGET_CLASSES,
    JoinStats,
    QualityCuts,
    RedshiftTable,
    join_redshifts,
    read_redrock,
    read_redshift_catalog,
    read_redshifts,
    target_class_of,
)

SPLITS = ("train", "validation", "test")  # the dataset splits (`split_for_targetid`), in order

_LAZY = {
    "DesiEdrBuilder": "builder",
    "DesiEdrConfig": "builder",
    "desi_features": "builder",
    "record_to_example": "builder",
    "split_for_targetid": "builder",
    "prepare_dataset": "prepare",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DESI_ARMS",
    "DESI_N_PIXELS",
    "DESI_WAVE_END",
    "DESI_WAVE_START",
    "DESI_WAVE_STEP",
    "EXTRAGALACTIC_CLASSES",
    "SPLITS",
    "TARGET_CLASSES",
    "DesiFormatError",
    "JoinStats",
    "QualityCuts",
    "ReadStats",
    "RedshiftTable",
    "desi_brz_wavelength",
    "inspect_desi_file",
    "join_redshifts",
    "merge_arms",
    "read_desi_spectra",
    "read_redrock",
    "read_redshift_catalog",
    "read_redshifts",
    "target_class_of",
    *_LAZY,
]
