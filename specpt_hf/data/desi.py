"""Read DESI `coadd-*` and `spectra-*` files and merge the b, r, z arms onto the 7781-pixel brz grid.

The merge follows DESI's own `desispec.coaddition.coadd_cameras`: the arms share one 0.8 Å lattice
(aligned to 1e-4 Å or it is an error); pixels seen by one arm are copied; in the overlaps
flux = Σ ivar·flux / Σ ivar with ivar set to 0 where the arm's mask is set, ivar = Σ ivar, the
integer masks are OR-ed and a pixel whose merged ivar is positive gets mask 0.

Records are yielded one fiber at a time while the file is read in chunks of rows, so memory stays
bounded whatever the size of the file (`read_desi_chunks` gives the same spectra a chunk at a time,
as 2-d arrays, to code that works on whole blocks such as `specpt prepare`). Each record is a dict
(see ARCHITECTURE.md):

- ``targetid`` (int), ``flux`` / ``ivar`` (float32 [7781]), ``mask`` (bool [7781], **True = bad pixel**:
  the merged DESI mask is non-zero or the merged ivar is 0),
- ``survey``, ``program`` (str, "" when unknown), ``healpix`` (int, -1 for tile coadds),
- ``fibermap`` (the FIBERMAP row as a dict of plain Python values), ``source`` (file name), ``row``.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
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


class Counts:
    """Mixin for dataclasses of integer counters: add another instance field by field, or export as a dict."""

    def add(self, other: Counts) -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class ReadStats(Counts):
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
    ivar: np.ndarray  # float32, 0 where unusable
    bad: np.ndarray  # bool, True = bad pixel (masked, zero ivar or seen by no arm)
    nonfinite: np.ndarray  # int64 [n_spectra], NaN/inf values found at otherwise good pixels


@dataclass
class SpectraChunk:
    """The good spectra of a run of FIBERMAP rows of one file, merged; spectra are [n, 7781]."""

    rows: np.ndarray  # int64 [n], FIBERMAP row of each spectrum
    targetid: np.ndarray  # int64 [n]
    flux: np.ndarray  # float32 [n, 7781]
    ivar: np.ndarray  # float32 [n, 7781], 0 where unusable
    mask: np.ndarray  # bool [n, 7781], True = bad pixel
    fibermap: Mapping[str, np.ndarray]  # FIBERMAP columns read, each [n, ...]
    survey: str
    program: str
    healpix: int
    source: str  # file name
    # bool [n]: the TARGETID is on another FIBERMAP row of the same file too (which spectrum is that target's
    # is ambiguous, so the redshift join labels neither); None: not known (all unique)
    shared_targetid: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)


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


@dataclass(frozen=True)
class _GridLayout:
    """Where each arm lands on the brz grid: copied runs, overlap runs, and uncovered pixels."""

    copied: dict[str, list[tuple[int, int, int]]]  # arm -> (arm start, arm stop, grid start)
    shared: dict[str, list[tuple[int, int, int]]]  # arm -> (arm start, arm stop, overlap column)
    shared_pixels: np.ndarray  # grid pixels seen by more than one arm
    uncovered: list[tuple[int, int]]  # grid runs seen by no arm


@functools.lru_cache(maxsize=64)
def _grid_layout(placement: tuple[tuple[str, int, int], ...]) -> _GridLayout:
    """Layout for arms given as (arm, grid offset, n pixels)."""
    coverage = np.zeros(DESI_N_PIXELS, dtype=np.int8)
    for _, start, length in placement:
        coverage[start : start + length] += 1
    shared_pixels = np.flatnonzero(coverage > 1)
    copied: dict[str, list[tuple[int, int, int]]] = {}
    shared: dict[str, list[tuple[int, int, int]]] = {}
    for arm, start, length in placement:
        copied[arm], shared[arm] = [], []
        for a, b, is_shared in _runs(coverage[start : start + length] > 1):
            if is_shared:
                shared[arm].append((a, b, int(np.searchsorted(shared_pixels, start + a))))
            else:
                copied[arm].append((a, b, start + a))
    uncovered = [(a, b) for a, b, empty in _runs(coverage == 0) if empty]
    return _GridLayout(copied, shared, shared_pixels, uncovered)


def merge_arms(
    flux: Mapping[str, np.ndarray],
    ivar: Mapping[str, np.ndarray],
    mask: Mapping[str, np.ndarray],
    offsets: Mapping[str, int],
    mask_zero: Mapping[str, int] | None = None,
) -> MergedArms:
    """Merge per-arm [n_spectra, n_arm_pixels] arrays onto the brz grid (coadd_cameras semantics).

    NaN/inf flux or ivar make that arm's pixel unusable (flux 0, ivar 0) before merging.
    Pixels seen by one arm are copied (flux as is, ivar 0 where masked); in the overlaps
    flux = Σ ivar·flux / Σ ivar (0 where Σ ivar = 0) and ivar = Σ ivar; a pixel is bad where its
    merged ivar is 0 (so a masked pixel of one arm is good when another arm sees it). The arms'
    arrays are read as given (big-endian or memory-mapped: no native copy is made first).
    `mask_zero` is the stored value of a zero (good) mask per arm when the masks come unscaled
    (BZERO not applied); by default a good pixel's mask is 0.
    """
    n_spectra = next(iter(flux.values())).shape[0]
    layout = _grid_layout(tuple((arm, int(start), np.shape(flux[arm])[1]) for arm, start in offsets.items()))
    out_flux = np.empty((n_spectra, DESI_N_PIXELS), dtype=np.float32)
    out_ivar = np.empty((n_spectra, DESI_N_PIXELS), dtype=np.float32)
    bad = np.empty((n_spectra, DESI_N_PIXELS), dtype=bool)
    for a, b in layout.uncovered:
        out_flux[:, a:b], out_ivar[:, a:b], bad[:, a:b] = 0, 0, True
    n_shared = layout.shared_pixels.size
    weight = np.zeros((n_spectra, n_shared), dtype=np.float64)  # Σ ivar in the overlaps
    weighted = np.zeros((n_spectra, n_shared), dtype=np.float64)  # Σ ivar·flux
    nonfinite = np.zeros(n_spectra, dtype=np.int64)
    for arm in offsets:
        zero = 0 if mask_zero is None else mask_zero[arm]
        for a, b, g in layout.copied[arm]:
            cols = slice(g, g + b - a)
            nonfinite += _clean_into(
                flux[arm][:, a:b],
                ivar[arm][:, a:b],
                mask[arm][:, a:b] == zero,
                out_flux[:, cols],
                out_ivar[:, cols],
                bad[:, cols],
            )
        for a, b, k in layout.shared[arm]:
            arm_flux, arm_ivar, bad_values = _clean_arm(
                flux[arm][:, a:b], ivar[arm][:, a:b], mask[arm][:, a:b] != zero
            )
            nonfinite += bad_values
            cols = slice(k, k + b - a)
            weight[:, cols] += arm_ivar
            weighted[:, cols] += arm_ivar.astype(np.float64) * arm_flux
    if n_shared:
        good = weight > 0
        out_flux[:, layout.shared_pixels] = np.where(good, weighted / np.where(good, weight, 1.0), 0.0)
        out_ivar[:, layout.shared_pixels] = weight
        bad[:, layout.shared_pixels] = ~good
    return MergedArms(out_flux, out_ivar, bad, nonfinite)


def _clean_into(
    flux: np.ndarray,
    ivar: np.ndarray,
    clear: np.ndarray,
    out_flux: np.ndarray,
    out_ivar: np.ndarray,
    bad: np.ndarray,
) -> np.ndarray | int:
    """`_clean_arm` written into output views: flux, ivar (0 where unusable) and bad; NaN/inf counts.

    `clear` is True where the arm's mask is 0.
    """
    np.copyto(out_flux, flux)  # [n_spectra, n_run], native float32
    np.copyto(out_ivar, ivar)
    np.greater(out_ivar, 0, out=bad)  # usable so far; False for NaN
    bad &= clear
    bad_values: np.ndarray | int = 0
    if not (np.isfinite(out_flux).all() and np.isfinite(out_ivar).all()):
        finite = np.isfinite(out_flux) & np.isfinite(out_ivar)
        bad_values = np.sum(~finite & clear & ~(out_ivar <= 0), axis=1)
        bad &= finite
        out_flux[~finite] = 0
    np.logical_not(bad, out=bad)
    np.copyto(out_ivar, 0, where=bad)
    return bad_values


def _clean_arm(
    flux: np.ndarray, ivar: np.ndarray, masked: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Native-endian copies with ivar 0 where masked, negative or not finite, and NaN/inf flux set to 0.

    Also returns, per spectrum, how many NaN/inf values sat at otherwise good pixels.
    """
    flux = np.asarray(flux, dtype=np.float32)  # [n_spectra, n_arm]
    ivar = np.asarray(ivar, dtype=np.float32)
    finite = np.isfinite(flux) & np.isfinite(ivar)
    if finite.all():
        bad_values = np.zeros(flux.shape[0], dtype=np.int64)
    else:
        bad_values = np.sum(~finite & ~masked & ~(ivar <= 0), axis=1)
        flux = np.where(finite, flux, np.float32(0))
    usable = finite & ~masked & (ivar > 0)
    return flux, np.where(usable, ivar, np.float32(0)), bad_values


# ----------------------------------------------------------------------------------------- files


@contextmanager
def open_desi_fits(
    path: str | os.PathLike, memmap: bool = False, *, do_not_scale_image_data: bool = False
) -> Iterator[fits.HDUList]:
    """Open a FITS file read-only, loading every header and checking it is not truncated.

    Raises FileNotFoundError for a missing file and DesiFormatError for a corrupt or truncated one.
    astropy refuses to memory-map scaled (BZERO) images such as MASK unless they are read as stored
    (`do_not_scale_image_data`, astropy's option: no BSCALE/BZERO applied), which is how
    `read_desi_chunks` maps the arrays; large catalogs use `memmap=True` so that only the columns
    used are read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    size = path.stat().st_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyUserWarning)
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        try:
            hdul = fits.open(
                path, memmap=memmap, lazy_load_hdus=True, do_not_scale_image_data=do_not_scale_image_data
            )
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
        # the data offset and padded size astropy computed from the header (the HDU's own `fileinfo`,
        # which reads no table column, unlike `HDUList.fileinfo`)
        info = hdu.fileinfo()
        end = info["datLoc"] + info["datSpan"]
        if end > size:
            name = hdu.name or str(index)
            raise DesiFormatError(
                path, f"file is truncated: the HDU needs {end} bytes, the file has {size}", hdu=name
            )
    if size % 2880:
        logger.warning("%s: size %d is not a multiple of 2880 bytes; the file may be damaged", path, size)


class _HduIndex:
    """The HDUs of an open file by name, looked up as astropy does (first match wins).

    Indexed once: astropy's lookup by name reads the name of every HDU before the one asked for,
    which for a small file costs more than reading its arrays.
    """

    def __init__(self, hdul: fits.HDUList):
        self.hdul = hdul
        self.by_name: dict[str, Any] = {}
        for hdu in hdul:
            self.by_name.setdefault(str(hdu.name).strip().upper(), hdu)

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, int):
            return self.hdul[key]
        try:
            return self.by_name[key.strip().upper()]
        except KeyError:
            raise KeyError(f"Extension {key!r} not found.") from None

    def __iter__(self) -> Iterator[Any]:
        return iter(self.hdul)


_Hdus = fits.HDUList | _HduIndex


def _hdu(hdul: _Hdus, name: str, path: Path) -> Any:
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


def _fibermap(hdul: _Hdus, path: Path) -> fits.FITS_rec:
    hdu = _hdu(hdul, "FIBERMAP", path)
    if not isinstance(hdu, fits.BinTableHDU):
        raise DesiFormatError(path, "FIBERMAP is not a binary table", hdu="FIBERMAP")
    data = _read(hdu, None, path)
    if "TARGETID" not in data.dtype.names:
        raise DesiFormatError(path, "FIBERMAP has no TARGETID column", hdu="FIBERMAP")
    return data


# Binary-table columns read straight from the rows' bytes (FITS standard 4.0, section 7.3): bytes per
# element and numpy type per TFORM code. Bit (X), complex (C, M) and variable-length (P, Q) columns,
# and columns with TSCAL/TZERO/TDIM, are converted by astropy instead.
_TFORM = re.compile(r"^\s*(?P<repeat>\d*)(?P<code>[LXBIJKAEDCMPQ])")
_TFORM_BYTES = {
    "L": 1,
    "B": 1,
    "I": 2,
    "J": 4,
    "K": 8,
    "A": 1,
    "E": 4,
    "D": 8,
    "C": 8,
    "M": 16,
    "P": 8,
    "Q": 16,
}
_TFORM_TYPES = {"L": "u1", "B": "u1", "I": ">i2", "J": ">i4", "K": ">i8", "E": ">f4", "D": ">f8", "A": "S"}


@dataclass(frozen=True)
class _TableColumn:
    name: str
    code: str
    repeat: int
    offset: int  # byte offset in a row
    direct: bool  # readable without astropy's conversions


def _table_layout(header: fits.Header) -> list[_TableColumn] | None:
    """Every column of a binary table from its header, or None if the TFORMs do not add up to NAXIS1."""
    columns, offset = [], 0
    for i in range(1, int(header.get("TFIELDS", 0)) + 1):
        match = _TFORM.match(str(header.get(f"TFORM{i}", "")))
        if match is None:
            return None
        code, repeat = match["code"], int(match["repeat"] or 1)
        width = (repeat + 7) // 8 if code == "X" else repeat * _TFORM_BYTES[code]
        scaled = any(f"{key}{i}" in header for key in ("TSCAL", "TZERO", "TDIM"))
        name = str(header.get(f"TTYPE{i}", "")).strip()
        columns.append(
            _TableColumn(name, code, repeat, offset, code in _TFORM_TYPES and repeat > 0 and not scaled)
        )
        offset += width
    return columns if offset == int(header.get("NAXIS1", -1)) else None


# Header keywords a table layout depends on; the layout is reused for a table whose cards for these
# are byte-for-byte those of a table seen before (the FIBERMAPs of a release share their columns).
_LAYOUT_KEYWORD = re.compile(rb"(?:TTYPE|TFORM|TSCAL|TZERO|TDIM)\d+ *$|(?:NAXIS1|TFIELDS|CONTINUE) *$")
_LAYOUTS: dict[tuple[bytes, ...], list[_TableColumn] | None] = {}


def _file_bytes(path: Path, offset: int, size: int) -> bytes:
    """`size` bytes of the file from `offset` (fewer at its end)."""
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read(size)


def _cached_layout(hdu: fits.BinTableHDU, path: Path) -> list[_TableColumn] | None:
    """`_table_layout` of a table HDU of the file `path`, cached by its column cards.

    None when the HDU's header is not found as is in `path` at the offset astropy gives (`HDU.fileinfo`):
    an HDU not read from a file, or a compressed (e.g. gzipped) file, whose offsets are those of the
    decompressed stream. Such tables are read by astropy.
    """
    info = hdu.fileinfo()
    if info is None:
        return None
    size = info["datLoc"] - info["hdrLoc"]
    try:
        raw = _file_bytes(path, info["hdrLoc"], size)
    except OSError as error:
        raise DesiFormatError(path, f"cannot read header ({error})", hdu=hdu.name) from error
    if not raw.startswith(b"XTENSION"):
        return None
    key = tuple(raw[i : i + 80] for i in range(0, size, 80) if _LAYOUT_KEYWORD.match(raw[i : i + 8]))
    if key not in _LAYOUTS:
        if len(_LAYOUTS) >= 256:
            _LAYOUTS.clear()
        _LAYOUTS[key] = _table_layout(hdu.header)
    return _LAYOUTS[key]


def read_table_columns(
    hdu: fits.BinTableHDU, path: str | os.PathLike, columns: Iterable[str] | None = None
) -> tuple[tuple[str, ...], dict[str, np.ndarray]]:
    """A binary table's column names and the values of `columns` (default: all) that it has.

    `hdu` is read from the file `path`. Only the columns asked for are decoded, from the table's bytes
    in the file (at the offset `HDU.fileinfo` gives): astropy's table reading builds every column of a
    wide table (a FIBERMAP has about 70) before giving any, which costs more than reading the spectra.
    Values are those astropy gives, as native-endian numpy arrays ([n_rows] or [n_rows, ...]):
    integers and floats, logical columns as bool, strings as bytes. Scaled (TSCAL/TZERO, unsigned),
    TDIM-shaped, bit and variable-length columns, and tables of compressed files, are left to astropy.
    """
    path = Path(path)
    layout = _cached_layout(hdu, path)
    if layout is None:  # let astropy read (or reject) a table we do not lay out ourselves
        data = _table_data(hdu, path)
        names = tuple(data.dtype.names)
        wanted = names if columns is None else [name for name in dict.fromkeys(columns) if name in names]
        return names, {name: _native(data[name]) for name in wanted}
    names = tuple(column.name for column in layout)
    by_name = {column.name: column for column in reversed(layout)}  # the first of duplicate names
    wanted = [
        by_name[name] for name in dict.fromkeys(names if columns is None else columns) if name in by_name
    ]
    direct = [column for column in wanted if column.direct]
    values = _direct_columns(hdu, path, direct) if direct else {}
    if len(direct) < len(wanted):
        data = _table_data(hdu, path)
        values.update({c.name: _native(data[c.name]) for c in wanted if not c.direct})
    return names, {column.name: values[column.name] for column in wanted}


def _table_data(hdu: fits.BinTableHDU, path: Path) -> fits.FITS_rec:
    """The table as astropy reads it (FITS_rec: columns scaled, logical as bool)."""
    try:
        data = hdu.data
    except (OSError, ValueError, TypeError, IndexError, EOFError) as error:
        raise DesiFormatError(path, f"cannot read data ({error})", hdu=hdu.name) from error
    if data is None:
        raise DesiFormatError(path, "HDU has no data", hdu=hdu.name)
    return data


def _direct_columns(hdu: fits.BinTableHDU, path: Path, columns: list[_TableColumn]) -> dict[str, np.ndarray]:
    n_rows, row_bytes = int(hdu.header.get("NAXIS2", 0)), int(hdu.header["NAXIS1"])
    try:
        raw = _file_bytes(path, hdu.fileinfo()["datLoc"], n_rows * row_bytes)
    except OSError as error:
        raise DesiFormatError(path, f"cannot read data ({error})", hdu=hdu.name) from error
    if len(raw) != n_rows * row_bytes:
        raise DesiFormatError(
            path, f"table data is truncated ({len(raw)} of {n_rows * row_bytes} bytes)", hdu.name
        )
    record = np.dtype(
        {
            "names": [c.name for c in columns],
            "formats": [_numpy_format(c) for c in columns],
            "offsets": [c.offset for c in columns],
            "itemsize": row_bytes,
        }
    )
    rows = np.ndarray((n_rows,), dtype=record, buffer=raw)
    values = {}
    for column in columns:
        field = rows[column.name]
        if column.code == "L":
            values[column.name] = field == ord("T")
        elif column.code == "A":
            values[column.name] = np.array(field)
        else:
            values[column.name] = _native(field)
    return values


def _numpy_format(column: _TableColumn) -> Any:
    """The numpy format of a directly read column: bytes for strings, a sub-array for repeats."""
    if column.code == "A":
        return f"S{column.repeat}"
    return (_TFORM_TYPES[column.code], (column.repeat,)) if column.repeat > 1 else _TFORM_TYPES[column.code]


def _native(values: Any) -> np.ndarray:
    """A native-endian copy of a column (plain ndarray)."""
    values = np.asarray(values)
    return (
        values.astype(values.dtype.newbyteorder("=")) if values.dtype.byteorder == ">" else np.array(values)
    )


def _check_arm_shapes(hdul: _Hdus, arm: str, n_fibers: int, path: Path) -> int:
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
    with open_desi_fits(path) as opened:
        hdul = _HduIndex(opened)
        info = _inspect_open(hdul, path)
        if targetids:
            fibermap = _fibermap_columns(hdul, path, ())
            good = np.asarray(fibermap["TARGETID"], dtype=np.int64)[_fiber_selection(fibermap, ReadStats())]
            info = replace(info, targetids=good)
        return info


def _inspect_open(hdul: _Hdus, path: Path) -> DesiFileInfo:
    hdu = _hdu(hdul, "FIBERMAP", path)
    if not isinstance(hdu, fits.BinTableHDU):
        raise DesiFormatError(path, "FIBERMAP is not a binary table", hdu="FIBERMAP")
    header = hdu.header  # column names from the header: parsing the table costs more than the check
    layout = _cached_layout(hdu, path)
    names = (
        tuple(column.name for column in layout)
        if layout is not None
        else tuple(
            str(header.get(f"TTYPE{i}", "")).strip() for i in range(1, int(header.get("TFIELDS", 0)) + 1)
        )
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


def _fiber_selection(columns: Mapping[str, np.ndarray], stats: ReadStats) -> np.ndarray:
    """Rows to keep: assigned (TARGETID > 0), OBJTYPE == 'TGT', fiber status 0; drops are counted."""
    targetid = np.asarray(columns["TARGETID"], dtype=np.int64)
    unassigned = targetid <= 0
    if "OBJTYPE" in columns:
        objtype = np.char.strip(np.asarray(columns["OBJTYPE"]).astype(str))
        unassigned |= objtype == ""
        non_target = ~unassigned & (objtype != "TGT")
    else:
        non_target = np.zeros_like(unassigned)
    status_column = next((c for c in _FIBERSTATUS_COLUMNS if c in columns), None)
    status = np.asarray(columns[status_column]) if status_column else np.zeros(len(targetid), np.int64)
    bad_status = ~unassigned & ~non_target & (status != 0)
    stats.unassigned += int(unassigned.sum())
    stats.non_target += int(non_target.sum())
    stats.bad_fiberstatus += int(bad_status.sum())
    return ~(unassigned | non_target | bad_status)


def _plain_rows(columns: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """FIBERMAP rows (columns of equal length) as dicts of plain Python values (str stripped)."""
    lists = {}
    for name, values in columns.items():
        values = np.asarray(values)
        if values.dtype.kind in "SU":
            values = np.char.strip(values.astype(str))
        lists[name] = values.tolist()
    n = len(next(iter(lists.values()), []))
    return [{name: values[i] for name, values in lists.items()} for i in range(n)]


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
    rows at a time. `shared_targetid` marks a record whose TARGETID is on another row of the file too.
    """
    for chunk in read_desi_chunks(path, stats=stats, select=select, chunk_size=chunk_size):
        fibers = _plain_rows(chunk.fibermap)
        provenance = {"survey": chunk.survey, "program": chunk.program, "healpix": chunk.healpix}
        for i, fiber in enumerate(fibers):
            yield {
                "targetid": int(fiber["TARGETID"]),
                "flux": chunk.flux[i],
                "ivar": chunk.ivar[i],
                "mask": chunk.mask[i],
                **provenance,
                "fibermap": fiber,
                "source": chunk.source,
                "row": int(chunk.rows[i]),
                "shared_targetid": bool(chunk.shared_targetid[i]),  # another row of the file has its TARGETID
            }


def read_desi_chunks(
    path: str | os.PathLike,
    *,
    stats: ReadStats | None = None,
    select: Selector | None = None,
    chunk_size: int = 256,
    columns: Iterable[str] | None = None,
) -> Iterator[SpectraChunk]:
    """The spectra of `read_desi_spectra`, a `SpectraChunk` of up to `chunk_size` rows at a time.

    `columns` names the FIBERMAP columns to carry (those the file has; TARGETID, OBJTYPE and the
    fiber status are always read); the default is every column.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    path = Path(path)
    file_stats = ReadStats(files=1)
    # The arrays are read as stored, memory-mapped: merging reads them straight from the page cache
    # (no copy into fresh memory first), and a good MASK pixel is the stored value of 0 (-2**31 under
    # BZERO = 2**31) instead of astropy converting every value to uint32.
    with open_desi_fits(path, memmap=True, do_not_scale_image_data=True) as opened:
        hdul = _HduIndex(opened)
        info = _inspect_open(hdul, path)
        mask_zero = _stored_mask_zero(hdul)
        if mask_zero is not None:
            yield from _read_open(hdul, info, mask_zero, file_stats, select, chunk_size, columns)
    if mask_zero is None:  # scaled FLUX/IVAR or an unusual MASK scaling: astropy scales everything
        with open_desi_fits(path) as opened:
            hdul = _HduIndex(opened)
            info = _inspect_open(hdul, path)
            yield from _read_open(hdul, info, None, file_stats, select, chunk_size, columns)
    _log_file(path, file_stats)
    if stats is not None:
        stats.add(file_stats)


def _stored_mask_zero(hdul: _Hdus) -> dict[str, int] | None:
    """Per arm, the stored MASK value that means 0 when images are read unscaled.

    None if FLUX or IVAR are scaled, or a MASK is scaled other than by an integer BZERO.
    """
    zeros = {}
    for arm in DESI_ARMS:
        prefix = arm.upper()
        for kind in ("FLUX", "IVAR"):
            header = hdul[f"{prefix}_{kind}"].header
            if header.get("BSCALE", 1) != 1 or header.get("BZERO", 0) != 0:
                return None
        header = hdul[f"{prefix}_MASK"].header
        bscale, bzero, bitpix = header.get("BSCALE", 1), header.get("BZERO", 0), int(header.get("BITPIX", 0))
        if bscale != 1 or bzero != int(bzero) or (bitpix < 0 and bzero != 0):
            return None
        if bitpix > 0:
            limits = np.iinfo(np.uint8 if bitpix == 8 else np.dtype(f"i{bitpix // 8}"))
            if not limits.min <= -int(bzero) <= limits.max:
                return None
        zeros[arm] = -int(bzero)
    return zeros


def _read_open(
    hdul: _Hdus,
    info: DesiFileInfo,
    mask_zero: dict[str, int] | None,
    file_stats: ReadStats,
    select: Selector | None,
    chunk_size: int,
    columns: Iterable[str] | None,
) -> Iterator[SpectraChunk]:
    path = info.path
    fibermap = _fibermap_columns(hdul, path, columns)
    n_rows = len(fibermap["TARGETID"])
    if n_rows != info.n_fibers:
        raise DesiFormatError(path, f"{n_rows} rows, header says {info.n_fibers}", hdu="FIBERMAP")
    file_stats.fibers = info.n_fibers
    keep = _fiber_selection(fibermap, file_stats)
    targetid = np.asarray(fibermap["TARGETID"], dtype=np.int64)
    _, inverse, counts = np.unique(targetid, return_inverse=True, return_counts=True)
    shared = counts[inverse] > 1  # [rows]
    if select is not None:
        chosen = np.asarray(select(targetid), dtype=bool)
        file_stats.not_selected = int((keep & ~chosen).sum())
        keep &= chosen
    for rows in _chunks(np.flatnonzero(keep), chunk_size):
        chunk = _read_chunk(hdul, rows, targetid, fibermap, info, mask_zero, file_stats)
        if len(chunk):
            chunk.shared_targetid = shared[chunk.rows]
            yield chunk


def _fibermap_columns(hdul: _Hdus, path: Path, columns: Iterable[str] | None) -> dict[str, np.ndarray]:
    if columns is None:  # every column, exactly as astropy gives them
        data = _fibermap(hdul, path)
        return {name: np.asarray(data[name]) for name in data.dtype.names}
    hdu = _hdu(hdul, "FIBERMAP", path)
    if not isinstance(hdu, fits.BinTableHDU):
        raise DesiFormatError(path, "FIBERMAP is not a binary table", hdu="FIBERMAP")
    names, values = read_table_columns(hdu, path, ["TARGETID", "OBJTYPE", *_FIBERSTATUS_COLUMNS, *columns])
    if "TARGETID" not in names:
        raise DesiFormatError(path, "FIBERMAP has no TARGETID column", hdu="FIBERMAP")
    return values


def _read_chunk(
    hdul: _Hdus,
    rows: np.ndarray,
    targetid: np.ndarray,
    fibermap: Mapping[str, np.ndarray],
    info: DesiFileInfo,
    mask_zero: dict[str, int] | None,
    stats: ReadStats,
) -> SpectraChunk:
    span = slice(int(rows[0]), int(rows[-1]) + 1)
    local = None if len(rows) == span.stop - span.start else rows - rows[0]
    arrays: dict[str, dict[str, np.ndarray]] = {"FLUX": {}, "IVAR": {}, "MASK": {}}
    for arm in DESI_ARMS:
        for kind, store in arrays.items():
            data = _read(hdul[f"{arm.upper()}_{kind}"], span, info.path)
            store[arm] = data if local is None else data[local]
    merged = merge_arms(arrays["FLUX"], arrays["IVAR"], arrays["MASK"], info.arm_offsets, mask_zero)
    stats.nonfinite_spectra += int(np.count_nonzero(merged.nonfinite))
    stats.nonfinite_pixels += int(merged.nonfinite.sum())
    usable = ~merged.bad.all(axis=1)
    n_usable = int(usable.sum())
    stats.no_data += len(rows) - n_usable
    stats.spectra += n_usable
    flux, ivar, bad = merged.flux, merged.ivar, merged.bad
    if n_usable < len(rows):
        rows, flux, ivar, bad = rows[usable], flux[usable], ivar[usable], bad[usable]
    return SpectraChunk(
        rows=rows,
        targetid=targetid[rows],
        flux=flux,
        ivar=ivar,
        mask=bad,
        fibermap={name: values[rows] for name, values in fibermap.items()},
        survey=info.survey,
        program=info.program,
        healpix=info.healpix,
        source=info.path.name,
    )


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
