"""Redshift labels: Redrock files and redshift catalogs, target classes, quality cuts, and the join.

- `read_redrock` reads `redrock-*.fits` (HDU REDSHIFTS, FIBERMAP row-matched).
- `read_redshift_catalog` reads `zpix-*`, `zall-pix-*` and the EDR VAC (HDU ZCATALOG).
- `target_class_of` derives bgs / elg / lrg / qso / other from the targeting bits, whichever survey's
  columns (CMX_TARGET, SV1_/SV2_/SV3_DESI_TARGET, DESI_TARGET, *_BGS_TARGET) a file carries.
- `QualityCuts` holds the good-redshift cuts of DESI analyses, per class.
- `join_redshifts` adds the labels to spectrum records by TARGETID, counting what does not match.

ZWARN is kept as DESI's integer bit mask (0 = no warning), never inverted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .desi import DesiFormatError, file_provenance, open_desi_fits

logger = logging.getLogger(__name__)

TARGET_CLASSES = ("bgs", "elg", "lrg", "qso", "other")
# One class per target: the class that drove the fiber assignment (DESI priorities QSO > LRG > ELG > BGS).
CLASS_PRIORITY = ("qso", "lrg", "elg", "bgs")
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
# cmx/data/cmx_targetmask.yaml). *_DESI_TARGET: LRG 0, ELG 1, QSO 2, BGS_ANY 60; SV3/main ELG_LOP 5,
# ELG_HIP 6, main ELG_VLO 7. CMX: SV0_BGS 8, SV0_LRG 10, SV0_ELG 11, SV0_QSO 12, SV0_QSO_Z5 14,
# MINI_SV_LRG 53, MINI_SV_ELG 54, MINI_SV_QSO 55, MINI_SV_BGS_BRIGHT 56.
# SV1_BGS_TARGET: BGS_FAINT 0, BGS_BRIGHT 1, BGS_FAINT_EXT 2, BGS_LOWQ 3, BGS_FIBMAG 4;
# SV3/main BGS_TARGET: BGS_FAINT 0, BGS_BRIGHT 1, BGS_WISE 2, BGS_FAINT_HIP 3.
_SV_DESI_BITS = {"lrg": (0,), "elg": (1,), "qso": (2,), "bgs": (60,)}
TARGET_BITS: dict[str, dict[str, tuple[int, ...]]] = {
    "CMX_TARGET": {"bgs": (8, 56), "lrg": (10, 53), "elg": (11, 54), "qso": (12, 14, 55)},
    "SV1_DESI_TARGET": _SV_DESI_BITS,
    "SV2_DESI_TARGET": _SV_DESI_BITS,
    "SV3_DESI_TARGET": {"lrg": (0,), "elg": (1, 5, 6), "qso": (2,), "bgs": (60,)},
    "DESI_TARGET": {"lrg": (0,), "elg": (1, 5, 6, 7), "qso": (2,), "bgs": (60,)},
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
    """One class per row (str array): the first of qso, lrg, elg, bgs whose bits are set, else 'other'."""
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
    when the [OII] columns are there, else ZWARN == 0 and DELTACHI2 > 25; QSO and other ZWARN == 0
    and DELTACHI2 > their minimum.
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


def _table_hdu(hdul: Any, name: str, path: Path) -> Any:
    try:
        hdu = hdul[name]
    except KeyError:
        present = ", ".join(h.name for h in hdul)
        raise DesiFormatError(path, f"missing HDU; the file has: {present}", hdu=name) from None
    if hdu.data is None or not hasattr(hdu, "columns"):
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
        redshifts = _table_hdu(hdul, "REDSHIFTS", path).data
        _require(redshifts.dtype.names, REQUIRED_COLUMNS, path, "REDSHIFTS")
        fibermap = _table_hdu(hdul, "FIBERMAP", path).data
        _require(fibermap.dtype.names, ("TARGETID",), path, "FIBERMAP")
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
        columns: dict[str, Any] = {name: fibermap[name] for name in fibermap.dtype.names}
        columns.update({name: redshifts[name] for name in redshifts.dtype.names})
        provenance = file_provenance(path, hdul[0].header, tuple(columns))
        return _table_from_columns(columns, tuple(columns), provenance, path.name)


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
class JoinStats:
    """Counts kept by `join_redshifts`."""

    spectra: int = 0
    without_redshift: int = 0
    failed_cuts: int = 0
    other_class: int = 0
    joined: int = 0
    redshifts_without_spectrum: int = 0

    def add(self, other: JoinStats) -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def join_redshifts(
    records: Iterable[dict[str, Any]],
    table: RedshiftTable,
    *,
    cuts: QualityCuts | None = None,
    target_class: str = "all",
    stats: JoinStats | None = None,
) -> Iterator[dict[str, Any]]:
    """Add z, zerr, zwarn, spectype, deltachi2 and target_class to spectrum records by TARGETID.

    Spectra without a redshift row, failing the quality cuts, or of another class (`target_class`
    other than 'all') are skipped; every skip is counted in `stats` and logged, and so are the
    redshift rows of good science targets (TARGETID > 0, OBJTYPE 'TGT', fiber status 0) that no
    spectrum matched.
    """
    if target_class != "all" and target_class not in TARGET_CLASSES:
        raise ValueError(f"target_class must be 'all' or one of {TARGET_CLASSES}, got {target_class!r}")
    cuts = cuts or QualityCuts()
    local = JoinStats()
    good = table.quality(cuts)
    seen = np.zeros(len(table), dtype=bool)
    for record in records:
        local.spectra += 1
        row = table.find(record["targetid"], record.get("survey", ""), record.get("program", ""))
        if row is None:
            local.without_redshift += 1
            logger.debug("TARGETID %d (%s) has no redshift", record["targetid"], record.get("source"))
            continue
        seen[row] = True
        name = str(table.target_class[row])
        passed = bool(good[row])
        if not name:  # the table has no targeting bits: use the spectrum's FIBERMAP
            fibermap = record.get("fibermap", {})
            name = str(target_class_of({k: [v] for k, v in fibermap.items()}, record.get("survey"))[0])
            passed = bool(table.quality(cuts, rows=np.array([row]), classes=np.array([name]))[0])
        if target_class != "all" and name != target_class:
            local.other_class += 1
            continue
        if not passed:
            local.failed_cuts += 1
            continue
        local.joined += 1
        yield {**record, **table.label(row), "target_class": name}
    science = (table.targetid > 0) & table.is_target & (table.fiberstatus == 0)
    local.redshifts_without_spectrum = int((~seen & science).sum())
    _log_join(table.source, local)
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
