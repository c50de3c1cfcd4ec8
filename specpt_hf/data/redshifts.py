"""Redshift labels: Redrock files and redshift catalogs, target classes, quality cuts, and the join.

- `read_redrock` reads `redrock-*.fits` (HDU REDSHIFTS, FIBERMAP row-matched).
- `read_redshift_catalog` reads `zpix-*`, `zall-pix-*` and the EDR VAC (HDU ZCATALOG).
- `target_class_of` derives bgs / elg / lrg / qso / mws / other from the targeting bits, whichever survey's
  columns (CMX_TARGET, SV1_/SV2_/SV3_DESI_TARGET, DESI_TARGET, *_BGS_TARGET) a file carries.
- `QualityCuts` holds the good-redshift cuts of DESI analyses, per class.
- `join_redshifts` adds the labels to spectrum records by TARGETID, counting what does not match.

ZWARN is kept as DESI's integer bit mask (0 = no warning), never inverted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from .desi import Counts, DesiFormatError, file_provenance, open_desi_fits, read_table_columns

logger = logging.getLogger(__name__)

# Every class `target_class_of` gives a target: its targeting bits' class, or "other".
TARGET_CLASSES = ("bgs", "elg", "lrg", "qso", "mws", "other")
# The galaxy and quasar classes among them: the mock's default classes and the benchmarks' (in this order,
# which seeds the mock's random streams).
EXTRAGALACTIC_CLASSES = ("bgs", "lrg", "elg", "qso")
# One class per target: the class that drove the fiber assignment (DESI priorities QSO > LRG > ELG > BGS >
# MWS, the Milky Way Survey's stars).
CLASS_PRIORITY = ("qso", "lrg", "elg", "bgs", "mws")
REQUIRED_COLUMNS = ("TARGETID", "Z", "ZERR", "ZWARN", "SPECTYPE", "DELTACHI2")

# Redrock ZWARN bits (redrock.zwarning).
ZWARN_BITS = {
    "SKY": 0,
    "LITTLE_COVERAGE": 1,
    "SMALL_DELTA_CHI2": 2,
    "NEGATIVE_MODEL": 3,
    "MANY_OUTLIERS": 4,
    "Z_FITLIMIT": 5,
    "NEGATIVE_EMISSION": 6,
    "UNPLUGGED": 7,
    "BAD_TARGET": 8,
    "NODATA": 9,
    "BAD_MINFIT": 10,
    "POORDATA": 11,
}
ZWARN_NODATA = 1 << ZWARN_BITS["NODATA"]

# Targeting bits per column and class (desitarget: data/targetmask.yaml, sv1/sv2/sv3 *_targetmask.yaml,
# cmx/data/cmx_targetmask.yaml). *_DESI_TARGET: LRG 0, ELG 1, QSO 2, BGS_ANY 60, MWS_ANY 61; SV3/main
# ELG_LOP 5, ELG_HIP 6, main ELG_VLO 7. CMX: SV0_BGS 8, SV0_MWS 9, SV0_LRG 10, SV0_ELG 11, SV0_QSO 12,
# SV0_WD 13, SV0_QSO_Z5 14, MINI_SV_LRG 53, MINI_SV_ELG 54, MINI_SV_QSO 55, MINI_SV_BGS_BRIGHT 56,
# SV0_MWS_FAINT 57.
# SV1_BGS_TARGET: BGS_FAINT 0, BGS_BRIGHT 1, BGS_FAINT_EXT 2, BGS_LOWQ 3, BGS_FIBMAG 4;
# SV3/main BGS_TARGET: BGS_FAINT 0, BGS_BRIGHT 1, BGS_WISE 2, BGS_FAINT_HIP 3.
_SV_DESI_BITS = {"lrg": (0,), "elg": (1,), "qso": (2,), "bgs": (60,), "mws": (61,)}
TARGET_BITS: dict[str, dict[str, tuple[int, ...]]] = {
    "CMX_TARGET": {"bgs": (8, 56), "lrg": (10, 53), "elg": (11, 54), "qso": (12, 14, 55), "mws": (9, 13, 57)},
    "SV1_DESI_TARGET": _SV_DESI_BITS,
    "SV2_DESI_TARGET": _SV_DESI_BITS,
    "SV3_DESI_TARGET": {"lrg": (0,), "elg": (1, 5, 6), "qso": (2,), "bgs": (60,), "mws": (61,)},
    "DESI_TARGET": {"lrg": (0,), "elg": (1, 5, 6, 7), "qso": (2,), "bgs": (60,), "mws": (61,)},
    "SV1_BGS_TARGET": {"bgs": (0, 1, 2, 3, 4)},
    "SV2_BGS_TARGET": {"bgs": (0, 1, 2, 3, 4)},
    "SV3_BGS_TARGET": {"bgs": (0, 1, 2, 3)},
    "BGS_TARGET": {"bgs": (0, 1, 2, 3)},
}
_COLUMN_SURVEY = {
    "CMX_TARGET": "cmx",
    "SV1_DESI_TARGET": "sv1",
    "SV1_BGS_TARGET": "sv1",
    "SV2_DESI_TARGET": "sv2",
    "SV2_BGS_TARGET": "sv2",
    "SV3_DESI_TARGET": "sv3",
    "SV3_BGS_TARGET": "sv3",
    "DESI_TARGET": "main",
    "BGS_TARGET": "main",
}


# ----------------------------------------------------------------------------------------- classes


def target_classes(
    columns: Mapping[str, Any], survey: str | Sequence[str] | np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Per-class boolean arrays from targeting columns (values: arrays or scalars).

    A row uses its own survey's columns (SURVEY sv3 -> SV3_DESI_TARGET, SV3_BGS_TARGET; main ->
    DESI_TARGET, BGS_TARGET; ...); a row of unknown survey, or whose survey's columns are absent,
    uses every targeting column present.
    """
    present = [name for name in TARGET_BITS if name in columns]
    n = len(np.atleast_1d(columns[present[0]])) if present else len(np.atleast_1d(columns.get("TARGETID", 0)))
    surveys = np.broadcast_to(np.asarray("" if survey is None else survey, dtype=str), (n,))
    surveys = np.char.lower(np.char.strip(surveys))
    covered = sorted({_COLUMN_SURVEY[name] for name in present})
    unknown = ~np.isin(surveys, covered)
    flags = {name: np.zeros(n, dtype=bool) for name in CLASS_PRIORITY}
    for column in present:
        values = np.atleast_1d(np.asarray(columns[column])).astype(np.int64)
        applies = unknown | (surveys == _COLUMN_SURVEY[column])
        for name, bits in TARGET_BITS[column].items():
            bitmask = np.int64(0)
            for bit in bits:
                bitmask |= np.int64(1) << np.int64(bit)
            flags[name] |= applies & ((values & bitmask) != 0)
    return flags


def target_class_of(
    columns: Mapping[str, Any], survey: str | Sequence[str] | np.ndarray | None = None
) -> np.ndarray:
    """One class per row (str array): the first of qso, lrg, elg, bgs, mws whose bits are set, else 'other'."""
    flags = target_classes(columns, survey)
    n = len(next(iter(flags.values())))
    result = np.full(n, "other", dtype="<U5")
    for name in reversed(CLASS_PRIORITY):
        result[flags[name]] = name
    return result


# ----------------------------------------------------------------------------------------- cuts


@dataclass(frozen=True)
class QualityCuts:
    """Good-redshift cuts of DESI analyses (defaults from the DESI EDR papers).

    Always applied: TARGETID > 0, OBJTYPE == 'TGT' and COADD_FIBERSTATUS == 0 (when known), ZWARN
    NODATA bit unset, and the primary spectrum only (`primary_only`, ZCAT_PRIMARY / SV_PRIMARY).
    With `enabled`, each class also needs: BGS ZWARN == 0 and DELTACHI2 > 40; LRG ZWARN == 0,
    DELTACHI2 > 15 and Z < 1.5; ELG log10(OII_FLUX·sqrt(OII_FLUX_IVAR)) + 0.2·log10(DELTACHI2) > 0.9
    when the [OII] columns are there, else ZWARN == 0 and DELTACHI2 > 25; QSO, MWS and other ZWARN == 0
    and DELTACHI2 > their minimum (MWS stars share `other_min_deltachi2`: DESI measures their velocities
    with RVSpecfit, not with Redrock cuts).
    """

    enabled: bool = True
    primary_only: bool = True
    bgs_min_deltachi2: float = 40.0
    bgs_spectype: str | None = None
    lrg_min_deltachi2: float = 15.0
    lrg_max_z: float = 1.5
    elg_min_foii: float = 0.9
    elg_min_deltachi2: float = 25.0
    qso_min_deltachi2: float = 0.0
    other_min_deltachi2: float = 0.0


# ----------------------------------------------------------------------------------------- table


@dataclass
class RedshiftTable:
    """Redshift rows keyed by TARGETID (and SURVEY/PROGRAM when known); arrays of equal length."""

    targetid: np.ndarray  # int64
    z: np.ndarray  # float64
    zerr: np.ndarray  # float64
    zwarn: np.ndarray  # int64, DESI bit mask
    deltachi2: np.ndarray  # float64
    spectype: np.ndarray  # str
    target_class: np.ndarray  # str, "" when the table has no targeting columns
    survey: np.ndarray  # str, "" when unknown
    program: np.ndarray  # str, "" when unknown
    healpix: np.ndarray  # int64, -1 when unknown
    primary: np.ndarray  # bool
    is_target: np.ndarray  # bool, OBJTYPE == 'TGT' (True when unknown)
    fiberstatus: np.ndarray  # int64, 0 when unknown
    oii_flux: np.ndarray  # float64, NaN when unknown
    oii_flux_ivar: np.ndarray  # float64, NaN when unknown
    source: str = ""
    _order: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.targetid)

    @classmethod
    def concatenate(cls, tables: Sequence[RedshiftTable]) -> RedshiftTable:
        if not tables:
            raise ValueError("tables: need at least one RedshiftTable")
        names = [f for f in cls.__dataclass_fields__ if f not in {"source", "_order"}]
        arrays = {name: np.concatenate([getattr(t, name) for t in tables]) for name in names}
        return cls(**arrays, source=", ".join(t.source for t in tables))

    def find(self, targetid: int, survey: str = "", program: str = "") -> int | None:
        """Row of `targetid` (matching survey/program where both sides know them), or None.

        Among several candidates the primary one wins.
        """
        if self._order is None:
            self._order = np.argsort(self.targetid, kind="stable")
        ordered = self.targetid[self._order]
        lo, hi = np.searchsorted(ordered, targetid, side="left"), np.searchsorted(ordered, targetid, "right")
        candidates = self._order[lo:hi]
        for key, value in (("survey", survey), ("program", program)):
            if value and len(candidates):
                known = getattr(self, key)[candidates]
                candidates = candidates[(known == "") | (known == value)]
        if len(candidates) == 0:
            return None
        if len(candidates) > 1:
            primaries = candidates[self.primary[candidates]]
            candidates = primaries if len(primaries) else candidates
        return int(candidates[0])

    def find_many(self, targetid: np.ndarray, survey: str = "", program: str = "") -> np.ndarray:
        """`find` for an array of TARGETIDs sharing one survey/program: int64 rows, -1 where none."""
        if self._order is None:
            self._order = np.argsort(self.targetid, kind="stable")
        targetid = np.asarray(targetid, dtype=np.int64)
        ordered = self.targetid[self._order]
        lo = np.searchsorted(ordered, targetid, side="left")
        count = np.searchsorted(ordered, targetid, side="right") - lo
        rows = np.full(len(targetid), -1, dtype=np.int64)
        single = np.flatnonzero(count == 1)  # the usual case, decided here as `find` would
        candidates = self._order[lo[single]]
        usable = np.ones(len(single), dtype=bool)
        for key, value in (("survey", survey), ("program", program)):
            if value:
                known = getattr(self, key)[candidates]
                usable &= (known == "") | (known == value)
        rows[single[usable]] = candidates[usable]
        for i in np.flatnonzero(count > 1):
            found = self.find(int(targetid[i]), survey, program)
            rows[i] = -1 if found is None else found
        return rows

    def label(self, row: int) -> dict[str, Any]:
        """The label fields of one row as plain Python values."""
        return {
            "z": float(self.z[row]),
            "zerr": float(self.zerr[row]),
            "zwarn": int(self.zwarn[row]),
            "spectype": str(self.spectype[row]),
            "deltachi2": float(self.deltachi2[row]),
        }

    def quality(
        self, cuts: QualityCuts, rows: np.ndarray | None = None, classes: np.ndarray | None = None
    ) -> np.ndarray:
        """Boolean array: rows passing `cuts` for their class (`classes` overrides the table's)."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows)
        classes = self.target_class[rows] if classes is None else np.asarray(classes)
        zwarn, dchi2, z = self.zwarn[rows], self.deltachi2[rows], self.z[rows]
        ok = (self.targetid[rows] > 0) & self.is_target[rows] & (self.fiberstatus[rows] == 0)
        ok &= (zwarn & ZWARN_NODATA) == 0
        if cuts.primary_only:
            ok &= self.primary[rows]
        if not cuts.enabled:
            return ok
        clean = zwarn == 0
        with np.errstate(divide="ignore", invalid="ignore"):
            foii = np.log10(self.oii_flux[rows] * np.sqrt(self.oii_flux_ivar[rows])) + 0.2 * np.log10(dchi2)
        has_oii = np.isfinite(self.oii_flux[rows]) & np.isfinite(self.oii_flux_ivar[rows])
        bgs = clean & (dchi2 > cuts.bgs_min_deltachi2)
        if cuts.bgs_spectype:
            bgs &= self.spectype[rows] == cuts.bgs_spectype
        per_class = {
            "bgs": bgs,
            "lrg": clean & (dchi2 > cuts.lrg_min_deltachi2) & (z < cuts.lrg_max_z),
            "elg": np.where(has_oii, foii > cuts.elg_min_foii, clean & (dchi2 > cuts.elg_min_deltachi2)),
            "qso": clean & (dchi2 > cuts.qso_min_deltachi2),
        }
        passed = clean & (dchi2 > cuts.other_min_deltachi2)
        for name, mask in per_class.items():
            passed = np.where(classes == name, mask, passed)
        return ok & passed


# ----------------------------------------------------------------------------------------- readers

# Every column `_table_from_columns` looks at; a Redrock file's other columns are not decoded.
TABLE_COLUMNS = (
    *REQUIRED_COLUMNS,
    "SURVEY",
    "PROGRAM",
    "HEALPIX",
    "ZCAT_PRIMARY",
    "SV_PRIMARY",
    "OBJTYPE",
    "COADD_FIBERSTATUS",
    "FIBERSTATUS",
    "OII_FLUX",
    "OII_FLUX_IVAR",
    *TARGET_BITS,
)


def _strings(values: Any) -> np.ndarray:
    return np.char.strip(np.asarray(values).astype(str))


def _table_from_columns(
    data: Any, names: Sequence[str], provenance: Mapping[str, Any], source: str
) -> RedshiftTable:
    """Build a RedshiftTable from a FITS_rec (catalog) or merged column mapping."""
    n = len(data["TARGETID"])

    def column(name: str, default: Any, dtype: Any) -> np.ndarray:
        if name in names:
            return np.asarray(data[name]).astype(dtype)
        return np.full(n, default, dtype=dtype)

    survey = _strings(data["SURVEY"]) if "SURVEY" in names else np.full(n, provenance.get("survey", ""))
    program = _strings(data["PROGRAM"]) if "PROGRAM" in names else np.full(n, provenance.get("program", ""))
    survey, program = np.char.lower(survey.astype(str)), np.char.lower(program.astype(str))
    bits = {name: np.asarray(data[name]) for name in TARGET_BITS if name in names}
    classes = target_class_of(bits, survey) if bits else np.full(n, "", dtype="<U5")
    primary_column = next((c for c in ("ZCAT_PRIMARY", "SV_PRIMARY") if c in names), None)
    primary = np.asarray(data[primary_column]).astype(bool) if primary_column else np.ones(n, dtype=bool)
    is_target = _strings(data["OBJTYPE"]) == "TGT" if "OBJTYPE" in names else np.ones(n, dtype=bool)
    status_column = next((c for c in ("COADD_FIBERSTATUS", "FIBERSTATUS") if c in names), None)
    return RedshiftTable(
        targetid=np.asarray(data["TARGETID"]).astype(np.int64),
        z=column("Z", np.nan, np.float64),
        zerr=column("ZERR", np.nan, np.float64),
        zwarn=column("ZWARN", 0, np.int64),
        deltachi2=column("DELTACHI2", np.nan, np.float64),
        spectype=_strings(data["SPECTYPE"]),
        target_class=classes,
        survey=survey,
        program=program,
        healpix=column("HEALPIX", provenance.get("healpix", -1), np.int64),
        primary=primary,
        is_target=is_target,
        fiberstatus=column(status_column or "COADD_FIBERSTATUS", 0, np.int64),
        oii_flux=column("OII_FLUX", np.nan, np.float64),
        oii_flux_ivar=column("OII_FLUX_IVAR", np.nan, np.float64),
        source=source,
    )


def _table_hdu(hdul: Any, name: str, path: Path, load: bool = True) -> Any:
    """The table HDU `name`; with `load`, its data are read (and must be there)."""
    try:
        hdu = hdul[name]
    except KeyError:
        present = ", ".join(h.name for h in hdul)
        raise DesiFormatError(path, f"missing HDU; the file has: {present}", hdu=name) from None
    is_table = isinstance(hdu, (fits.BinTableHDU, fits.TableHDU))
    if not is_table or (load and hdu.data is None):
        raise DesiFormatError(path, "expected a binary table", hdu=name)
    return hdu


def _require(names: Sequence[str], required: Sequence[str], path: Path, hdu: str) -> None:
    missing = [name for name in required if name not in names]
    if missing:
        raise DesiFormatError(path, f"missing required columns: {', '.join(missing)}", hdu=hdu)


def read_redrock(path: str | os.PathLike) -> RedshiftTable:
    """Read a Redrock file: REDSHIFTS joined row by row with its FIBERMAP (TARGETIDs must agree)."""
    path = Path(path)
    with open_desi_fits(path) as hdul:
        z_names, redshifts = _table_columns(hdul, "REDSHIFTS", path)
        _require(z_names, REQUIRED_COLUMNS, path, "REDSHIFTS")
        f_names, fibermap = _table_columns(hdul, "FIBERMAP", path)
        _require(f_names, ("TARGETID",), path, "FIBERMAP")
        z_ids = np.asarray(redshifts["TARGETID"], dtype=np.int64)
        f_ids = np.asarray(fibermap["TARGETID"], dtype=np.int64)
        if len(z_ids) != len(f_ids) or not np.array_equal(z_ids, f_ids):
            bad = np.flatnonzero(z_ids != f_ids) if len(z_ids) == len(f_ids) else []
            detail = (
                f"first differing rows {list(bad[:5])}" if len(bad) else f"{len(z_ids)} vs {len(f_ids)} rows"
            )
            raise DesiFormatError(
                path, f"TARGETID mismatch between REDSHIFTS and FIBERMAP ({detail})", "FIBERMAP"
            )
        columns: dict[str, Any] = {**fibermap, **redshifts}
        names = tuple(dict.fromkeys((*f_names, *z_names)))
        provenance = file_provenance(path, hdul[0].header, names)
        return _table_from_columns(columns, names, provenance, path.name)


def _table_columns(hdul: Any, name: str, path: Path) -> tuple[tuple[str, ...], dict[str, np.ndarray]]:
    """Column names of a binary-table HDU and the values of the TABLE_COLUMNS it has."""
    hdu = _table_hdu(hdul, name, path, load=False)
    if not isinstance(hdu, fits.BinTableHDU):
        data = hdu.data  # an ASCII table: astropy reads it whole
        return tuple(data.dtype.names), {
            c: np.asarray(data[c]) for c in TABLE_COLUMNS if c in data.dtype.names
        }
    return read_table_columns(hdu, path, TABLE_COLUMNS)


def read_redshift_catalog(path: str | os.PathLike, hdu: str = "ZCATALOG") -> RedshiftTable:
    """Read a redshift catalog (zpix-*, zall-pix-*, the EDR VAC): one table HDU, `hdu` by name."""
    path = Path(path)
    with open_desi_fits(path, memmap=True) as hdul:
        data = _table_hdu(hdul, hdu, path).data
        _require(data.dtype.names, REQUIRED_COLUMNS, path, hdu)
        provenance = file_provenance(path, hdul[0].header, data.dtype.names)
        provenance["healpix"] = -1
        table = _table_from_columns(data, data.dtype.names, provenance, path.name)
    logger.info("%s: %d redshift rows, %d primary", path.name, len(table), int(table.primary.sum()))
    return table


def read_redshifts(path: str | os.PathLike) -> RedshiftTable:
    """Read a Redrock file (HDU REDSHIFTS) or a catalog (HDU ZCATALOG), whichever `path` is."""
    path = Path(path)
    with open_desi_fits(path) as hdul:
        names = {h.name for h in hdul}
    if "ZCATALOG" in names:
        return read_redshift_catalog(path)
    if "REDSHIFTS" in names:
        return read_redrock(path)
    raise DesiFormatError(
        path, f"neither a Redrock file nor a catalog (HDUs: {', '.join(sorted(names))})", "ZCATALOG"
    )


# ----------------------------------------------------------------------------------------- join


@dataclass
class JoinStats(Counts):
    """Counts kept by `join_redshifts`."""

    spectra: int = 0
    without_redshift: int = 0
    failed_cuts: int = 0
    other_class: int = 0
    joined: int = 0
    redshifts_without_spectrum: int = 0
    duplicate_targetid: int = 0  # spectra sharing their TARGETID with another spectrum of their file


class RedshiftJoin:
    """Matches spectra to `table` by TARGETID a batch at a time, keeping `join_redshifts`' counts.

    `match` gives, for a batch of spectra of one file, which of them are kept, their table rows
    and classes; `finish` counts the good redshift rows no spectrum matched, logs, and returns the
    `JoinStats`.
    """

    def __init__(self, table: RedshiftTable, *, cuts: QualityCuts | None = None, target_class: str = "all"):
        if target_class != "all" and target_class not in TARGET_CLASSES:
            raise ValueError(f"target_class must be 'all' or one of {TARGET_CLASSES}, got {target_class!r}")
        self.table = table
        self.cuts = cuts or QualityCuts()
        self.target_class = target_class
        self.stats = JoinStats()
        self._good = table.quality(self.cuts)
        self._seen = np.zeros(len(table), dtype=bool)
        self._duplicates: dict[str, int] = {}  # spectrum file -> spectra with a shared TARGETID

    def match(
        self,
        targetid: np.ndarray,
        survey: str = "",
        program: str = "",
        fibermap: Mapping[str, Any] | None = None,
        source: str | None = None,
        shared_targetid: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indices of the kept spectra in the batch, their table rows, their classes).

        Spectra without a redshift row, failing the quality cuts, or of another class are dropped
        and counted. Where the table has no targeting bits, the class comes from `fibermap`
        (the spectra's FIBERMAP columns, [n] each).

        Spectra flagged in `shared_targetid` ([n] bool: their TARGETID is on another row of their file
        too) are never labelled: which of them is the target the redshift belongs to cannot be told, so
        all of them are dropped, counted as `duplicate_targetid` and reported per file by `finish` (a
        warning naming the file and the count) rather than the whole file refused.
        """
        table, stats = self.table, self.stats
        targetid = np.asarray(targetid, dtype=np.int64)
        rows = table.find_many(targetid, survey or "", program or "")
        shared = np.zeros(len(targetid), bool) if shared_targetid is None else np.asarray(shared_targetid)
        if n_shared := int(shared.sum()):
            key = source or table.source
            self._duplicates[key] = self._duplicates.get(key, 0) + n_shared
        found = np.flatnonzero((rows >= 0) & ~shared)
        stats.spectra += len(targetid)
        stats.duplicate_targetid += n_shared
        stats.without_redshift += len(targetid) - len(found) - n_shared
        if logger.isEnabledFor(logging.DEBUG):
            for value in targetid[rows < 0]:
                logger.debug("TARGETID %d (%s) has no redshift", value, source)
        rows = rows[found]
        self._seen[rows] = True
        classes = np.asarray(table.target_class[rows], dtype="<U5")
        passed = self._good[rows]
        fallback = np.flatnonzero(classes == "")  # the table has no targeting bits: use the FIBERMAP
        if len(fallback):
            columns = {
                k: np.asarray(v)[found[fallback]] for k, v in (fibermap or {}).items() if k in TARGET_BITS
            }
            columns["TARGETID"] = targetid[found[fallback]]
            classes[fallback] = target_class_of(columns, survey)
            passed[fallback] = table.quality(self.cuts, rows=rows[fallback], classes=classes[fallback])
        other = (classes != self.target_class) if self.target_class != "all" else np.zeros(len(rows), bool)
        kept = ~other & passed
        stats.other_class += int(other.sum())
        stats.failed_cuts += int((~other & ~passed).sum())
        stats.joined += int(kept.sum())
        return found[kept], rows[kept], classes[kept]

    def finish(self) -> JoinStats:
        """Count the good science redshift rows that no spectrum matched, log, return the counts."""
        table = self.table
        science = (table.targetid > 0) & table.is_target & (table.fiberstatus == 0)
        self.stats.redshifts_without_spectrum = int((~self._seen & science).sum())
        _log_join(table.source, self.stats)
        for source, count in self._duplicates.items():
            logger.warning(
                "%s: %d spectra share their TARGETID with another spectrum of the file: not labelled "
                "(which one is the target is ambiguous)",
                source,
                count,
            )
        return self.stats


def join_redshifts(
    records: Iterable[dict[str, Any]],
    table: RedshiftTable,
    *,
    cuts: QualityCuts | None = None,
    target_class: str = "all",
    stats: JoinStats | None = None,
) -> Iterator[dict[str, Any]]:
    """Add z, zerr, zwarn, spectype, deltachi2 and target_class to spectrum records by TARGETID.

    Spectra without a redshift row, failing the quality cuts, of another class (`target_class`
    other than 'all') or sharing their TARGETID with another spectrum of their file are skipped; every skip is counted in `stats` and logged, and so are the
    redshift rows of good science targets (TARGETID > 0, OBJTYPE 'TGT', fiber status 0) that no
    spectrum matched. `RedshiftJoin` does the same for whole batches of spectra.
    """
    join = RedshiftJoin(table, cuts=cuts, target_class=target_class)
    for record in records:
        fibermap = {k: [v] for k, v in record.get("fibermap", {}).items()}
        survey, program = record.get("survey", ""), record.get("program", "")
        shared = [record.get("shared_targetid", False)]
        _, rows, classes = join.match(
            [record["targetid"]], survey, program, fibermap, record.get("source"), shared
        )
        if len(rows):
            yield {**record, **table.label(int(rows[0])), "target_class": str(classes[0])}
    local = join.finish()
    if stats is not None:
        stats.add(local)


def _log_join(source: str, stats: JoinStats) -> None:
    logger.info(
        "%s: %d spectra -> %d labelled (%d without redshift, %d failed quality cuts, %d other class); "
        "%d redshift rows without a spectrum",
        source,
        stats.spectra,
        stats.joined,
        stats.without_redshift,
        stats.failed_cuts,
        stats.other_class,
        stats.redshifts_without_spectrum,
    )
    if stats.without_redshift:
        logger.warning("%s: %d spectra have no redshift row", source, stats.without_redshift)
