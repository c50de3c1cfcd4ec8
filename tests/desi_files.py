"""Real DESI files for the data tests: the specutils coadds with a Redrock file written next to them, and the
one-spectrum-at-a-time labelled records that the batch readers must reproduce."""

from __future__ import annotations

import importlib.resources
import shutil
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table

from specpt_hf.data.builder import DesiSource, redrock_path_for
from specpt_hf.data.desi import ReadStats, read_desi_spectra
from specpt_hf.data.redshifts import JoinStats, join_redshifts, read_redrock, read_redshifts

DATA = Path(str(importlib.resources.files("specutils") / "io/default_loaders/tests/desi_test_data"))
HEALPIX = "coadd-sv3-dark-26065.fits"
TILE = "coadd-5-169-thru20210419.fits"
LRG_IDS = [39627866878511337, 39627866878514741]  # the good fibers of the healpix coadd (SV3 LRG bit)
ELG_ID = 39633300968442591  # the good fiber of the tile coadd (SV3 ELG bits)


def put(name: str, folder: Path, targetid_offset: int = 0) -> Path:
    """Copy a real coadd into `folder` with a Redrock file next to it (Z = 0.1 + 0.1 * row)."""
    folder.mkdir(parents=True, exist_ok=True)
    coadd = Path(shutil.copy(DATA / name, folder / name))
    with fits.open(coadd) as hdul:
        fibermap = Table(hdul["FIBERMAP"].data)
        header = hdul[0].header
    n = len(fibermap)
    redshifts = Table(
        {
            "TARGETID": np.asarray(fibermap["TARGETID"], dtype=np.int64) + targetid_offset,
            "Z": 0.1 + 0.1 * np.arange(n),
            "ZERR": np.full(n, 3e-5),
            "ZWARN": np.zeros(n, dtype=np.int64),
            "SPECTYPE": np.array(["GALAXY"] * n, dtype="S6"),
            "DELTACHI2": np.full(n, 200.0),
        }
    )
    fibermap["TARGETID"] = redshifts["TARGETID"]
    fits.HDUList(
        [
            fits.PrimaryHDU(header=header),
            fits.BinTableHDU(redshifts, name="REDSHIFTS"),
            fits.BinTableHDU(fibermap, name="FIBERMAP"),
        ]
    ).writeto(redrock_path_for(coadd))
    return coadd


def records_one_at_a_time(
    source: DesiSource, read_stats: ReadStats | None = None, join_stats: JoinStats | None = None
) -> list[dict[str, Any]]:
    """`source`'s labelled records, each spectrum read by `read_desi_spectra` and labelled by `join_redshifts`:
    what `DesiSource.batches` and `prepare_dataset` must hold, row for row."""
    options = {"cuts": source.cuts, "target_class": source.target_class, "stats": join_stats}
    if source.catalog is not None:
        spectra = chain.from_iterable(read_desi_spectra(p, stats=read_stats) for p in source.files)
        return list(join_redshifts(spectra, read_redshifts(source.catalog), **options))
    records: list[dict[str, Any]] = []
    for path in source.files:
        table = read_redrock(redrock_path_for(path))
        records.extend(join_redshifts(read_desi_spectra(path, stats=read_stats), table, **options))
    return records
