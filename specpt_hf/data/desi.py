"""Read DESI `coadd-*` and `spectra-*` files and merge the b, r, z arms onto the 7781-pixel brz grid.

The merge follows DESI's own `desispec.coaddition.coadd_cameras`: the arms share one 0.8 Å lattice
(aligned to 1e-4 Å or it is an error); pixels seen by one arm are copied; in the overlaps
flux = Σ ivar·flux / Σ ivar with ivar set to 0 where the arm's mask is set, ivar = Σ ivar, the
integer masks are OR-ed and a pixel whose merged ivar is positive gets mask 0.

Records are yielded one fiber at a time while the file is read in chunks of rows, so memory stays
bounded whatever the size of the file. Each record is a dict (see ARCHITECTURE.md):

- ``targetid`` (int), ``flux`` / ``ivar`` (float32 [7781]), ``mask`` (bool [7781], **True = bad pixel**:
  the merged DESI mask is non-zero or the merged ivar is 0),
- ``survey``, ``program`` (str, "" when unknown), ``healpix`` (int, -1 for tile coadds),
- ``fibermap`` (the FIBERMAP row as a dict of plain Python values), ``source`` (file name), ``row``.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning

logger = logging.getLogger(__name__)

# The merged ("brz") DESI grid: 3600.0-9824.0 Å (vacuum) in 0.8 Å steps.
DESI_WAVE_START = 3600.0
DESI_WAVE_STEP = 0.8
DESI_N_PIXELS = 7781
DESI_WAVE_END = DESI_WAVE_START + DESI_WAVE_STEP * (DESI_N_PIXELS - 1)
DESI_ARMS = ("b", "r", "z")
WAVE_TOLERANCE = 1e-4  # Å, the alignment tolerance of coadd_cameras
FLUX_UNIT = "1e-17 erg / (s cm2 Angstrom)"

_FIBERSTATUS_COLUMNS = ("COADD_FIBERSTATUS", "FIBERSTATUS")
_HEALPIX_NAME = re.compile(
    r"^(?P<kind>[a-z]+)-(?P<survey>[a-z0-9]+)-(?P<program>[a-z]+)-(?P<healpix>\d+)\.fits"
)
_TILE_NAME = re.compile(r"^(?P<kind>[a-z]+)-(?P<petal>\d)-(?P<tileid>\d+)-(?P<group>[a-z]*\d+)\.fits")
# Survey implied by the targeting columns of a FIBERMAP, most specific first.
_SURVEY_COLUMNS = (
    ("CMX_TARGET", "cmx"),
    ("SV1_DESI_TARGET", "sv1"),
    ("SV2_DESI_TARGET", "sv2"),
    ("SV3_DESI_TARGET", "sv3"),
    ("DESI_TARGET", "main"),
)


# `select(targetids) -> bool array`: which good fibers to read (e.g. one split's TARGETIDs).
Selector = Callable[[np.ndarray], np.ndarray]


def desi_brz_wavelength() -> np.ndarray:
    """The merged DESI wavelength grid in Å (vacuum), float64 [7781]."""
    return DESI_WAVE_START + DESI_WAVE_STEP * np.arange(DESI_N_PIXELS, dtype=np.float64)


class DesiFormatError(ValueError):
    """A DESI file that cannot be read as documented; the message names the file and the HDU."""

    def __init__(self, path: str | os.PathLike, problem: str, hdu: str | None = None):
        self.path = str(path)
        self.hdu = hdu
        self.problem = problem
        where = f"{self.path}" + (f" [HDU {hdu}]" if hdu else "")
        super().__init__(f"{where}: {problem}")


@dataclass
class ReadStats:
    """Counts kept while reading; `read_desi_spectra` adds to the object it is given."""

    files: int = 0
    fibers: int = 0
    spectra: int = 0
    unassigned: int = 0
    non_target: int = 0
    bad_fiberstatus: int = 0
    not_selected: int = 0
    no_data: int = 0
    nonfinite_spectra: int = 0
    nonfinite_pixels: int = 0

    def add(self, other: ReadStats) -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class DesiFileInfo:
    """What a file holds, from its headers and FIBERMAP (no spectra read)."""

    path: Path
    n_fibers: int
    survey: str
    program: str
    healpix: int
    arm_offsets: dict[str, int]
    targetids: np.ndarray | None = None  # int64, good fibers' TARGETIDs (when asked for)


@dataclass
class MergedArms:
    """Arms merged onto the brz grid; arrays are [n_spectra, 7781]."""

    flux: np.ndarray  # float32
    ivar: np.ndarray  # float32
    mask: np.ndarray  # uint32, the DESI bit mask after merging
    nonfinite: np.ndarray  # int64 [n_spectra], NaN/inf values found at otherwise good pixels

    @property
    def bad(self) -> np.ndarray:
        """Boolean mask, True = bad pixel (non-zero mask or zero ivar)."""
        return (self.mask != 0) | (self.ivar <= 0)


# ----------------------------------------------------------------------------------------- grid


def arm_offsets(waves: Mapping[str, np.ndarray], path: str | os.PathLike = "<arrays>") -> dict[str, int]:
    """Index of each arm's first pixel on the brz grid; error if an arm is off the 0.8 Å lattice."""
    grid = desi_brz_wavelength()
    offsets: dict[str, int] = {}
    problems: list[str] = []
    for arm, wave in waves.items():
        wave = np.asarray(wave, dtype=np.float64)
        start = int(round((wave[0] - DESI_WAVE_START) / DESI_WAVE_STEP))
        if wave.ndim != 1 or start < 0 or start + wave.size > DESI_N_PIXELS:
            problems.append(f"arm {arm} ({wave[0]:.4f}-{wave[-1]:.4f} Å) lies outside the brz grid")
            continue
        offset = float(np.max(np.abs(grid[start : start + wave.size] - wave)))
        if not offset <= WAVE_TOLERANCE:
            problems.append(f"arm {arm} is off the 0.8 Å lattice by up to {offset:.4g} Å")
            continue
        offsets[arm] = start
    if problems:
        hdus = ", ".join(f"{arm.upper()}_WAVELENGTH" for arm in waves)
        raise DesiFormatError(
            path,
            f"arms {', '.join(waves)} do not align (tolerance {WAVE_TOLERANCE} Å): " + "; ".join(problems),
            hdu=hdus,
        )
    return offsets


def _runs(flags: np.ndarray) -> list[tuple[int, int, bool]]:
    """Runs of equal values in a boolean array as (start, stop, value)."""
    edges = (np.flatnonzero(np.diff(flags.astype(np.int8))) + 1).tolist()
    bounds = [0, *edges, len(flags)]
    return [(a, b, bool(flags[a])) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def merge_arms(
    flux: Mapping[str, np.ndarray],
    ivar: Mapping[str, np.ndarray],
    mask: Mapping[str, np.ndarray],
    offsets: Mapping[str, int],
) -> MergedArms:
    """Merge per-arm [n_spectra, n_arm_pixels] arrays onto the brz grid (coadd_cameras semantics).

    NaN/inf flux or ivar make that arm's pixel unusable (flux 0, ivar 0) before merging.
    Pixels seen by one arm are copied (flux as is, ivar 0 where masked); in the overlaps
    flux = Σ ivar·flux / Σ ivar (0 where Σ ivar = 0), ivar = Σ ivar, and the mask is the OR of the
    arms' masks, reset to 0 where Σ ivar > 0.
    """
    n_spectra = next(iter(flux.values())).shape[0]
    lengths = {arm: np.shape(flux[arm])[1] for arm in offsets}
    coverage = np.zeros(DESI_N_PIXELS, dtype=np.int8)
    for arm, start in offsets.items():
        coverage[start : start + lengths[arm]] += 1
    shared = np.flatnonzero(coverage > 1)  # grid pixels seen by more than one arm
    out_flux = np.zeros((n_spectra, DESI_N_PIXELS), dtype=np.float32)
    out_ivar = np.zeros((n_spectra, DESI_N_PIXELS), dtype=np.float32)
    out_mask = np.zeros((n_spectra, DESI_N_PIXELS), dtype=np.uint32)
    weight = np.zeros((n_spectra, shared.size), dtype=np.float64)  # Σ ivar in the overlaps
    weighted = np.zeros((n_spectra, shared.size), dtype=np.float64)  # Σ ivar·flux
    mask_or = np.zeros((n_spectra, shared.size), dtype=np.uint32)
    nonfinite = np.zeros(n_spectra, dtype=np.int64)
    for arm, start in offsets.items():
        arm_flux, arm_ivar, arm_mask, bad_values = _clean_arm(flux[arm], ivar[arm], mask[arm])
        nonfinite += bad_values
        for a, b, is_shared in _runs(coverage[start : start + lengths[arm]] > 1):
            if not is_shared:  # copied
                grid = slice(start + a, start + b)
                out_flux[:, grid], out_ivar[:, grid], out_mask[:, grid] = (
                    arm_flux[:, a:b],
                    arm_ivar[:, a:b],
                    arm_mask[:, a:b],
                )
                continue
            k = int(np.searchsorted(shared, start + a))
            cols = slice(k, k + b - a)
            weight[:, cols] += arm_ivar[:, a:b]
            weighted[:, cols] += arm_ivar[:, a:b].astype(np.float64) * arm_flux[:, a:b]
            mask_or[:, cols] |= arm_mask[:, a:b]
    good = weight > 0
    out_flux[:, shared] = np.where(good, weighted / np.where(good, weight, 1.0), 0.0)
    out_ivar[:, shared] = weight
    out_mask[:, shared] = np.where(good, np.uint32(0), mask_or)
    return MergedArms(out_flux, out_ivar, out_mask, nonfinite)


def _clean_arm(
    flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Native-endian copies with ivar 0 where masked, negative or not finite, and NaN/inf flux set to 0.

    Also returns, per spectrum, how many NaN/inf values sat at otherwise good pixels.
    """
    flux = np.asarray(flux, dtype=np.float32)  # [n_spectra, n_arm]
    ivar = np.asarray(ivar, dtype=np.float32)
    mask = np.asarray(mask, dtype=np.uint32)
    finite = np.isfinite(flux) & np.isfinite(ivar)
    if finite.all():
        bad_values = np.zeros(flux.shape[0], dtype=np.int64)
    else:
        bad_values = np.sum(~finite & (mask == 0) & ~(ivar <= 0), axis=1)
        flux = np.where(finite, flux, np.float32(0))
    usable = finite & (mask == 0) & (ivar > 0)
    return flux, np.where(usable, ivar, np.float32(0)), mask, bad_values


# ----------------------------------------------------------------------------------------- files


@contextmanager
def open_desi_fits(path: str | os.PathLike, memmap: bool = False) -> Iterator[fits.HDUList]:
    """Open a FITS file read-only, loading every header and checking it is not truncated.

    Raises FileNotFoundError for a missing file and DesiFormatError for a corrupt or truncated one.
    Spectra files are read without memmap: astropy refuses to memory-map scaled (BZERO) images such
    as MASK, and `.section` reads only the rows asked for anyway. Large catalogs use `memmap=True`
    so that only the columns used are read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    size = path.stat().st_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyUserWarning)
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        try:
            hdul = fits.open(path, memmap=memmap, lazy_load_hdus=True)
            n_hdus = len(hdul)  # reads every header
        except (OSError, ValueError, TypeError, IndexError) as error:
            raise DesiFormatError(path, f"not a readable FITS file ({error})") from error
    try:
        _check_spans(hdul, n_hdus, size, path)
        yield hdul
    finally:
        hdul.close()


def _check_spans(hdul: fits.HDUList, n_hdus: int, size: int, path: Path) -> None:
    for index in range(n_hdus):
        hdu = hdul[index]
        # The data offset and padded size astropy computed from the header (`HDUList.fileinfo` gives
        # the same numbers but parses every table's columns first).
        end = hdu._data_offset + hdu._data_size
        if end > size:
            name = hdu.name or str(index)
            raise DesiFormatError(
                path, f"file is truncated: the HDU needs {end} bytes, the file has {size}", hdu=name
            )
    if size % 2880:
        logger.warning("%s: size %d is not a multiple of 2880 bytes; the file may be damaged", path, size)


def _hdu(hdul: fits.HDUList, name: str, path: Path) -> Any:
    try:
        return hdul[name]
    except KeyError:
        present = ", ".join(h.name for h in hdul)
        hint = " (the file may be truncated)" if path.stat().st_size % 2880 else ""
        raise DesiFormatError(path, f"missing HDU; the file has: {present}{hint}", hdu=name) from None


def _read(hdu: Any, rows: slice | None, path: Path) -> np.ndarray:
    try:
        data = hdu.data if rows is None else hdu.section[rows]
    except (OSError, ValueError, TypeError, IndexError, EOFError) as error:
        raise DesiFormatError(path, f"cannot read data ({error})", hdu=hdu.name) from error
    if data is None:
        raise DesiFormatError(path, "HDU has no data", hdu=hdu.name)
    return np.asarray(data)


def _fibermap(hdul: fits.HDUList, path: Path) -> fits.FITS_rec:
    hdu = _hdu(hdul, "FIBERMAP", path)
    if not isinstance(hdu, fits.BinTableHDU):
        raise DesiFormatError(path, "FIBERMAP is not a binary table", hdu="FIBERMAP")
    data = _read(hdu, None, path)
    if "TARGETID" not in data.dtype.names:
        raise DesiFormatError(path, "FIBERMAP has no TARGETID column", hdu="FIBERMAP")
    return data


def _check_arm_shapes(hdul: fits.HDUList, arm: str, n_fibers: int, path: Path) -> int:
    prefix = arm.upper()
    wave_hdu = _hdu(hdul, f"{prefix}_WAVELENGTH", path)
    if len(wave_hdu.shape) != 1:
        raise DesiFormatError(path, f"expected a 1-d wavelength array, got {wave_hdu.shape}", wave_hdu.name)
    n_wave = wave_hdu.shape[0]
    for kind in ("FLUX", "IVAR", "MASK"):
        hdu = _hdu(hdul, f"{prefix}_{kind}", path)
        if tuple(hdu.shape) != (n_fibers, n_wave):
            raise DesiFormatError(
                path,
                f"shape {tuple(hdu.shape)} does not match FIBERMAP rows x {prefix}_WAVELENGTH "
                f"({n_fibers}, {n_wave})",
                hdu=hdu.name,
            )
    return n_wave


def parse_desi_filename(path: str | os.PathLike) -> dict[str, Any]:
    """survey/program/healpix from `coadd-sv3-dark-26065.fits`, or petal/tileid from `coadd-5-169-thru20210419.fits`."""
    name = Path(path).name
    if match := _TILE_NAME.match(name):
        return {"petal": int(match["petal"]), "tileid": int(match["tileid"]), "healpix": -1}
    if match := _HEALPIX_NAME.match(name):
        return {"survey": match["survey"], "program": match["program"], "healpix": int(match["healpix"])}
    return {}


def file_provenance(path: str | os.PathLike, header: fits.Header, columns: tuple[str, ...]) -> dict[str, Any]:
    """survey, program, healpix of a file: header keywords first, then the file name, then the columns."""
    from_name = parse_desi_filename(path)
    survey = str(header.get("SURVEY", "") or from_name.get("survey", "")).strip()
    program = str(header.get("PROGRAM", "") or header.get("FAPRGRM", "") or from_name.get("program", ""))
    healpix = header.get("HPXPIXEL")
    if healpix is None and str(header.get("SPGRP", "")).strip() == "healpix":
        healpix = header.get("SPGRPVAL")
    if healpix is None:
        healpix = from_name.get("healpix", -1)
    if not survey:
        survey = next((name for column, name in _SURVEY_COLUMNS if column in columns), "")
    return {"survey": survey.lower(), "program": program.strip().lower(), "healpix": int(healpix)}


def inspect_desi_file(path: str | os.PathLike, *, targetids: bool = False) -> DesiFileInfo:
    """Check a coadd/spectra file's structure (HDUs, shapes, grid, completeness) from its headers.

    With `targetids`, the FIBERMAP is read too and the TARGETIDs of the good fibers returned.
    """
    path = Path(path)
    with open_desi_fits(path) as hdul:
        info = _inspect_open(hdul, path)
        if targetids:
            fibermap = _fibermap(hdul, path)
            good = np.asarray(fibermap["TARGETID"], dtype=np.int64)[_fiber_selection(fibermap, ReadStats())]
            info = replace(info, targetids=good)
        return info


def _inspect_open(hdul: fits.HDUList, path: Path) -> DesiFileInfo:
    hdu = _hdu(hdul, "FIBERMAP", path)
    if not isinstance(hdu, fits.BinTableHDU):
        raise DesiFormatError(path, "FIBERMAP is not a binary table", hdu="FIBERMAP")
    header = hdu.header  # column names from the header: parsing the table costs more than the check
    names = tuple(
        str(header.get(f"TTYPE{i}", "")).strip() for i in range(1, int(header.get("TFIELDS", 0)) + 1)
    )
    if "TARGETID" not in names:
        raise DesiFormatError(path, "FIBERMAP has no TARGETID column", hdu="FIBERMAP")
    n_fibers = int(header["NAXIS2"])
    waves = {}
    for arm in DESI_ARMS:
        _check_arm_shapes(hdul, arm, n_fibers, path)
        waves[arm] = _read(hdul[f"{arm.upper()}_WAVELENGTH"], None, path)
    offsets = arm_offsets(waves, path)
    meta = file_provenance(path, hdul[0].header, names)
    return DesiFileInfo(path, n_fibers, meta["survey"], meta["program"], meta["healpix"], offsets)


# ----------------------------------------------------------------------------------------- fibers


def _fiber_selection(fibermap: fits.FITS_rec, stats: ReadStats) -> np.ndarray:
    """Rows to keep: assigned (TARGETID > 0), OBJTYPE == 'TGT', fiber status 0; drops are counted."""
    names = fibermap.dtype.names
    targetid = np.asarray(fibermap["TARGETID"], dtype=np.int64)
    unassigned = targetid <= 0
    if "OBJTYPE" in names:
        objtype = np.char.strip(np.asarray(fibermap["OBJTYPE"]).astype(str))
        unassigned |= objtype == ""
        non_target = ~unassigned & (objtype != "TGT")
    else:
        non_target = np.zeros_like(unassigned)
    status_column = next((c for c in _FIBERSTATUS_COLUMNS if c in names), None)
    status = np.asarray(fibermap[status_column]) if status_column else np.zeros(len(targetid), np.int64)
    bad_status = ~unassigned & ~non_target & (status != 0)
    stats.unassigned += int(unassigned.sum())
    stats.non_target += int(non_target.sum())
    stats.bad_fiberstatus += int(bad_status.sum())
    return ~(unassigned | non_target | bad_status)


def _plain_rows(fibermap: fits.FITS_rec, rows: np.ndarray) -> list[dict[str, Any]]:
    """FIBERMAP rows as dicts of plain Python values (str stripped)."""
    columns = {}
    for name in fibermap.dtype.names:
        values = np.asarray(fibermap[name])[rows]
        if values.dtype.kind in "SU":
            values = np.char.strip(values.astype(str))
        columns[name] = values.tolist()
    return [{name: values[i] for name, values in columns.items()} for i in range(len(rows))]


def _chunks(rows: np.ndarray, chunk_size: int) -> Iterator[np.ndarray]:
    """Split sorted row indices into groups spanning at most `chunk_size` consecutive rows."""
    start = 0
    while start < len(rows):
        stop = int(np.searchsorted(rows, rows[start] + chunk_size, side="left"))
        yield rows[start:stop]
        start = stop


def read_desi_spectra(
    path: str | os.PathLike,
    *,
    stats: ReadStats | None = None,
    select: Selector | None = None,
    chunk_size: int = 256,
) -> Iterator[dict[str, Any]]:
    """Yield one record per good fiber of a DESI `coadd-*` or `spectra-*` file (healpix or tile).

    Sky and other non-target fibers, unassigned fibers and fibers with a non-zero (COADD_)FIBERSTATUS
    are dropped; spectra without a single usable pixel are skipped; NaN/inf values are set bad.
    All are counted in `stats` and logged. `select(targetids) -> bool array` keeps a subset of the
    good fibers (rows it rejects are neither read nor merged). The file is read once, `chunk_size`
    rows at a time.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    path = Path(path)
    file_stats = ReadStats(files=1)
    with open_desi_fits(path) as hdul:
        info = _inspect_open(hdul, path)
        fibermap = _fibermap(hdul, path)
        if len(fibermap) != info.n_fibers:
            raise DesiFormatError(path, f"{len(fibermap)} rows, header says {info.n_fibers}", hdu="FIBERMAP")
        file_stats.fibers = info.n_fibers
        keep = _fiber_selection(fibermap, file_stats)
        targetid = np.asarray(fibermap["TARGETID"], dtype=np.int64)
        if select is not None:
            chosen = np.asarray(select(targetid), dtype=bool)
            file_stats.not_selected = int((keep & ~chosen).sum())
            keep &= chosen
        provenance = {"survey": info.survey, "program": info.program, "healpix": info.healpix}
        for rows in _chunks(np.flatnonzero(keep), chunk_size):
            yield from _read_chunk(hdul, fibermap, rows, info, provenance, file_stats)
    _log_file(path, file_stats)
    if stats is not None:
        stats.add(file_stats)


def _read_chunk(
    hdul: fits.HDUList,
    fibermap: fits.FITS_rec,
    rows: np.ndarray,
    info: DesiFileInfo,
    provenance: dict[str, Any],
    stats: ReadStats,
) -> Iterator[dict[str, Any]]:
    span = slice(int(rows[0]), int(rows[-1]) + 1)
    local = rows - rows[0]
    arrays: dict[str, dict[str, np.ndarray]] = {"FLUX": {}, "IVAR": {}, "MASK": {}}
    for arm in DESI_ARMS:
        for kind, store in arrays.items():
            store[arm] = _read(hdul[f"{arm.upper()}_{kind}"], span, info.path)[local]
    merged = merge_arms(arrays["FLUX"], arrays["IVAR"], arrays["MASK"], info.arm_offsets)
    bad = merged.bad  # [n_rows, 7781]
    fibers = _plain_rows(fibermap, rows)
    for i, row in enumerate(rows):
        if merged.nonfinite[i]:
            stats.nonfinite_spectra += 1
            stats.nonfinite_pixels += int(merged.nonfinite[i])
        if bad[i].all():
            stats.no_data += 1
            continue
        stats.spectra += 1
        yield {
            "targetid": int(fibers[i]["TARGETID"]),
            "flux": merged.flux[i],
            "ivar": merged.ivar[i],
            "mask": bad[i],
            **provenance,
            "fibermap": fibers[i],
            "source": info.path.name,
            "row": int(row),
        }


def _log_file(path: Path, stats: ReadStats) -> None:
    logger.info(
        "%s: %d fibers -> %d spectra (dropped %d unassigned, %d sky/non-target, %d bad fiber status)",
        path.name,
        stats.fibers,
        stats.spectra,
        stats.unassigned,
        stats.non_target,
        stats.bad_fiberstatus,
    )
    if stats.no_data:
        logger.warning("%s: skipped %d spectra with no usable pixel (all ivar 0)", path.name, stats.no_data)
    if stats.nonfinite_spectra:
        logger.warning(
            "%s: %d NaN/inf pixels in %d spectra set bad",
            path.name,
            stats.nonfinite_pixels,
            stats.nonfinite_spectra,
        )
