"""Redrock files, redshift catalogs, target classes, quality cuts and the TARGETID join."""

from __future__ import annotations

import importlib.resources
import logging
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from specpt_hf.data.desi import DesiFormatError, read_desi_spectra
from specpt_hf.data.redshifts import (
    ZWARN_NODATA,
    JoinStats,
    QualityCuts,
    RedshiftJoin,
    join_redshifts,
    read_redrock,
    read_redshift_catalog,
    read_redshifts,
    target_class_of,
    target_classes,
)

DATA = Path(str(importlib.resources.files("specutils") / "io/default_loaders/tests/desi_test_data"))
HEALPIX_COADD = DATA / "coadd-sv3-dark-26065.fits"


def redshift_columns(targetid, z=None, zwarn=None, deltachi2=None, spectype=None) -> Table:
    """REDSHIFTS columns with the Redrock names and dtypes."""
    n = len(targetid)
    return Table(
        {
            "TARGETID": np.asarray(targetid, dtype=np.int64),
            "CHI2": np.full(n, 7000.0),
            "COEFF": np.zeros((n, 10)),
            "Z": np.asarray(z if z is not None else np.linspace(0.1, 0.9, n), dtype=np.float64),
            "ZERR": np.full(n, 2e-5),
            "ZWARN": np.asarray(zwarn if zwarn is not None else np.zeros(n), dtype=np.int64),
            "NPIXELS": np.full(n, 7700, dtype=np.int64),
            "SPECTYPE": np.asarray(spectype if spectype is not None else ["GALAXY"] * n, dtype="S6"),
            "SUBTYPE": np.asarray([""] * n, dtype="S20"),
            "NCOEFF": np.full(n, 10, dtype=np.int64),
            "DELTACHI2": np.asarray(
                deltachi2 if deltachi2 is not None else np.full(n, 100.0), dtype=np.float64
            ),
        }
    )


def write_redrock(coadd: Path, out: Path, shuffle_fibermap: bool = False, **columns) -> Path:
    """A Redrock file for `coadd`: REDSHIFTS + its FIBERMAP, row-matched."""
    with fits.open(coadd) as hdul:
        fibermap = Table(hdul["FIBERMAP"].data)
        header = hdul[0].header
    redshifts = redshift_columns(fibermap["TARGETID"], **columns)
    if shuffle_fibermap:
        fibermap = fibermap[::-1]
    fits.HDUList(
        [
            fits.PrimaryHDU(header=header),
            fits.BinTableHDU(redshifts, name="REDSHIFTS"),
            fits.BinTableHDU(fibermap, name="FIBERMAP"),
        ]
    ).writeto(out)
    return out


def write_catalog(path: Path, rows: dict, hdu: str = "ZCATALOG") -> Path:
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU(Table(rows), name=hdu)]).writeto(path)
    return path


# ----------------------------------------------------------------------------------------- classes


def test_target_classes_per_survey_prefix():
    cases = [
        ({"SV1_DESI_TARGET": [1 << 0]}, "lrg"),
        ({"SV1_DESI_TARGET": [1 << 1]}, "elg"),
        ({"SV1_DESI_TARGET": [1 << 5]}, "other"),  # SV1 bit 5 is LRG_SV_OPT's sub-bit, not an ELG bit
        ({"SV2_DESI_TARGET": [1 << 2]}, "qso"),
        ({"SV3_DESI_TARGET": [1 << 5]}, "elg"),  # ELG_LOP
        ({"SV3_DESI_TARGET": [1 << 6]}, "elg"),  # ELG_HIP
        ({"SV3_DESI_TARGET": [1 << 60]}, "bgs"),
        ({"DESI_TARGET": [1 << 7]}, "elg"),  # main ELG_VLO
        ({"DESI_TARGET": [1 << 32]}, "other"),  # SKY
        ({"BGS_TARGET": [1 << 1]}, "bgs"),
        ({"SV1_BGS_TARGET": [1 << 4]}, "bgs"),  # BGS_FIBMAG
        ({"CMX_TARGET": [1 << 8]}, "bgs"),  # SV0_BGS
        ({"CMX_TARGET": [1 << 10]}, "lrg"),  # SV0_LRG
        ({"CMX_TARGET": [1 << 11]}, "elg"),  # SV0_ELG
        ({"CMX_TARGET": [1 << 55]}, "qso"),  # MINI_SV_QSO
        ({"SV3_DESI_TARGET": [(1 << 1) | (1 << 2)]}, "qso"),  # ELG and QSO: QSO wins
        ({"SV3_DESI_TARGET": [(1 << 0) | (1 << 1)]}, "lrg"),  # LRG and ELG: LRG wins
        ({"SV3_DESI_TARGET": [1 << 61]}, "mws"),  # MWS_ANY
        ({"DESI_TARGET": [(1 << 60) | (1 << 61)]}, "bgs"),  # BGS and MWS: BGS wins
        ({"CMX_TARGET": [1 << 13]}, "mws"),  # SV0_WD
    ]
    for columns, expected in cases:
        assert target_class_of(columns)[0] == expected, columns


def test_target_class_uses_the_rows_survey_columns():
    columns = {"SV3_DESI_TARGET": np.array([1, 0]), "DESI_TARGET": np.array([2, 2])}
    # sv3 rows read SV3_DESI_TARGET only; main rows DESI_TARGET; unknown survey reads both (QSO > LRG > ELG)
    assert target_class_of(columns, np.array(["sv3", "sv3"])).tolist() == ["lrg", "other"]
    assert target_class_of(columns, np.array(["main", "main"])).tolist() == ["elg", "elg"]
    assert target_class_of(columns).tolist() == ["lrg", "elg"]
    flags = target_classes(columns)
    assert flags["lrg"].tolist() == [True, False] and flags["elg"].tolist() == [True, True]


def test_real_fibermap_classes():
    with fits.open(HEALPIX_COADD) as hdul:
        fibermap = hdul["FIBERMAP"].data
        classes = target_class_of({n: fibermap[n] for n in fibermap.names}, "sv3")
    # rows 2 and 4: SV3_DESI_TARGET 2162697 = LRG (bit 0) | bits 3, 16, 21
    assert classes.tolist() == ["other", "other", "lrg", "other", "lrg"]


# ----------------------------------------------------------------------------------------- redrock


def test_read_redrock(tmp_path):
    path = write_redrock(HEALPIX_COADD, tmp_path / "redrock-sv3-dark-26065.fits", zwarn=[0, 0, 4, 0, 0])
    table = read_redrock(path)
    with fits.open(HEALPIX_COADD) as hdul:
        targetid = hdul["FIBERMAP"].data["TARGETID"]
    np.testing.assert_array_equal(table.targetid, targetid)
    assert table.zwarn.dtype == np.int64 and table.zwarn.tolist() == [0, 0, 4, 0, 0]
    assert table.spectype.tolist() == ["GALAXY"] * 5
    assert table.target_class.tolist() == ["other", "other", "lrg", "other", "lrg"]
    assert table.is_target.tolist() == [False, False, True, False, True]  # '', '', TGT, SKY, TGT
    assert set(table.survey) == {"sv3"} and set(table.program) == {"dark"} and set(table.healpix) == {26065}
    assert table.find(int(targetid[4])) == 4 and table.find(123) is None
    assert table.label(2) == {"z": 0.5, "zerr": 2e-5, "zwarn": 4, "spectype": "GALAXY", "deltachi2": 100.0}


def test_redrock_targetid_mismatch(tmp_path):
    path = write_redrock(HEALPIX_COADD, tmp_path / "redrock-sv3-dark-26065.fits", shuffle_fibermap=True)
    with pytest.raises(
        DesiFormatError, match=r"redrock-sv3-dark-26065\.fits \[HDU FIBERMAP\]: TARGETID mismatch"
    ):
        read_redrock(path)


def test_redrock_missing_hdu(tmp_path):
    path = tmp_path / "redrock-sv3-dark-1.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU(redshift_columns([1, 2]), name="REDSHIFTS")]).writeto(
        path
    )
    with pytest.raises(DesiFormatError, match=r"redrock-sv3-dark-1\.fits \[HDU FIBERMAP\]: missing HDU"):
        read_redrock(path)


# ----------------------------------------------------------------------------------------- catalogs


def catalog_rows() -> dict:
    # target 11 observed in sv1 (not primary) and sv3 (primary); 12 a bright-time BGS; 13 sky
    return {
        "TARGETID": np.array([11, 11, 12, 13], dtype=np.int64),
        "SURVEY": np.array(["sv1", "sv3", "sv3", "sv3"]),
        "PROGRAM": np.array(["dark", "dark", "bright", "dark"]),
        "HEALPIX": np.array([100, 100, 200, 100], dtype=np.int32),
        "Z": np.array([0.80, 0.81, 0.2, 0.0]),
        "ZERR": np.full(4, 1e-4),
        "ZWARN": np.array([0, 0, 0, 1], dtype=np.int64),
        "SPECTYPE": np.array(["GALAXY", "GALAXY", "GALAXY", "GALAXY"]),
        "DELTACHI2": np.array([30.0, 60.0, 50.0, 1.0]),
        "COADD_FIBERSTATUS": np.zeros(4, dtype=np.int32),
        "OBJTYPE": np.array(["TGT", "TGT", "TGT", "SKY"]),
        "ZCAT_PRIMARY": np.array([False, True, True, True]),
        "SV1_DESI_TARGET": np.array([2, 0, 0, 0], dtype=np.int64),
        "SV3_DESI_TARGET": np.array([0, 2, 1 << 60, 0], dtype=np.int64),
        "SV3_BGS_TARGET": np.array([0, 0, 2, 0], dtype=np.int64),
    }


def test_read_catalog_and_find_by_survey(tmp_path):
    table = read_redshift_catalog(write_catalog(tmp_path / "zall-pix-fuji.fits", catalog_rows()))
    assert len(table) == 4
    assert table.target_class.tolist() == ["elg", "elg", "bgs", "other"]
    assert table.primary.tolist() == [False, True, True, True]
    assert table.find(11, "sv1", "dark") == 0
    assert table.find(11, "sv3", "dark") == 1
    assert table.find(11) == 1  # the primary one
    assert table.find(11, "sv2", "dark") is None
    assert table.healpix.tolist() == [100, 100, 200, 100]
    assert read_redshifts(tmp_path / "zall-pix-fuji.fits").targetid.tolist() == [11, 11, 12, 13]


def test_catalog_without_required_columns(tmp_path):
    rows = catalog_rows()
    del rows["ZWARN"], rows["DELTACHI2"]
    path = write_catalog(tmp_path / "zpix-sv3-dark.fits", rows)
    with pytest.raises(DesiFormatError, match=r"zpix-sv3-dark\.fits \[HDU ZCATALOG\].*ZWARN, DELTACHI2"):
        read_redshift_catalog(path)


def test_catalog_with_wrong_hdu(tmp_path):
    path = write_catalog(tmp_path / "zpix-sv3-dark.fits", catalog_rows(), hdu="SOMETHING")
    with pytest.raises(DesiFormatError, match=r"zpix-sv3-dark\.fits.*neither a Redrock file nor a catalog"):
        read_redshifts(path)
    with pytest.raises(DesiFormatError, match=r"\[HDU ZCATALOG\]: missing HDU"):
        read_redshift_catalog(path)


# ----------------------------------------------------------------------------------------- cuts


def quality_table(tmp_path, rows: dict):
    base = {
        "SURVEY": np.array(["sv3"] * len(rows["TARGETID"])),
        "PROGRAM": np.array(["dark"] * len(rows["TARGETID"])),
        "ZERR": np.full(len(rows["TARGETID"]), 1e-4),
        "SPECTYPE": np.array(["GALAXY"] * len(rows["TARGETID"])),
    }
    return read_redshift_catalog(write_catalog(tmp_path / "zpix-sv3-dark.fits", {**base, **rows}))


def test_quality_cuts_per_class(tmp_path):
    bgs, lrg, elg, qso = 1 << 60, 1 << 0, 1 << 1, 1 << 2
    table = quality_table(
        tmp_path,
        {
            "TARGETID": np.arange(1, 11, dtype=np.int64),
            "SV3_DESI_TARGET": np.array([bgs, bgs, lrg, lrg, lrg, elg, elg, qso, qso, bgs], dtype=np.int64),
            "Z": np.array([0.1, 0.1, 0.8, 0.8, 1.6, 1.0, 1.0, 2.0, 2.0, 0.1]),
            "ZWARN": np.array([0, 0, 0, 0, 0, 0, 4, 0, 1, 0], dtype=np.int64),
            "DELTACHI2": np.array([41.0, 40.0, 16.0, 15.0, 100.0, 26.0, 100.0, 10.0, 100.0, 1000.0]),
        },
    )
    expected = [True, False, True, False, False, True, False, True, False, True]
    assert table.quality(QualityCuts()).tolist() == expected
    # configurable: a stricter BGS cut, or the class cuts switched off
    stricter = table.quality(QualityCuts(bgs_min_deltachi2=100.0)).tolist()
    assert stricter[0] is False and stricter[9] is True
    assert table.quality(QualityCuts(enabled=False)).all()


def test_quality_always_cuts(tmp_path):
    table = quality_table(
        tmp_path,
        {
            "TARGETID": np.array([1, 2, 3, 4, -5], dtype=np.int64),
            "SV3_DESI_TARGET": np.full(5, 1 << 60, dtype=np.int64),
            "Z": np.full(5, 0.1),
            "ZWARN": np.array([0, ZWARN_NODATA, 0, 0, 0], dtype=np.int64),
            "DELTACHI2": np.full(5, 100.0),
            "ZCAT_PRIMARY": np.array([True, True, False, True, True]),
            "COADD_FIBERSTATUS": np.array([0, 0, 0, 8, 0], dtype=np.int32),
        },
    )
    assert table.quality(QualityCuts(enabled=False)).tolist() == [True, False, False, False, False]
    assert table.quality(QualityCuts(enabled=False, primary_only=False)).tolist() == [
        True,
        False,
        True,
        False,
        False,
    ]


def test_elg_oii_cut(tmp_path):
    # log10(OII_FLUX * sqrt(OII_FLUX_IVAR)) + 0.2 log10(DELTACHI2) > 0.9
    table = quality_table(
        tmp_path,
        {
            "TARGETID": np.array([1, 2], dtype=np.int64),
            "SV3_DESI_TARGET": np.array([2, 2], dtype=np.int64),
            "Z": np.array([1.0, 1.0]),
            "ZWARN": np.array([4, 0], dtype=np.int64),  # the [OII] cut does not look at ZWARN
            "DELTACHI2": np.array([10.0, 10.0]),
            "OII_FLUX": np.array([10.0, 1.0]),  # 10 * sqrt(1) -> log 1 + 0.2 = 1.2 ; 1 -> 0 + 0.2
            "OII_FLUX_IVAR": np.array([1.0, 1.0]),
        },
    )
    assert table.quality(QualityCuts()).tolist() == [True, False]


# ----------------------------------------------------------------------------------------- join


def test_join_real_spectra_with_redrock(tmp_path, caplog):
    path = write_redrock(HEALPIX_COADD, tmp_path / "redrock-sv3-dark-26065.fits", z=[0, 0, 0.51, 0, 0.73])
    stats = JoinStats()
    with caplog.at_level(logging.INFO):
        joined = list(join_redshifts(read_desi_spectra(HEALPIX_COADD), read_redrock(path), stats=stats))
    assert [(r["targetid"], r["z"], r["target_class"]) for r in joined] == [
        (39627866878511337, 0.51, "lrg"),
        (39627866878514741, 0.73, "lrg"),
    ]
    assert joined[0]["zwarn"] == 0 and isinstance(joined[0]["zwarn"], int)
    assert joined[0]["flux"].shape == (7781,)
    assert stats.joined == 2 and stats.without_redshift == 0 and stats.redshifts_without_spectrum == 0
    assert "2 spectra -> 2 labelled" in caplog.text


def test_join_counts_mismatches_and_filters(tmp_path, caplog):
    records = list(read_desi_spectra(HEALPIX_COADD))
    keep, lost = records[0]["targetid"], records[1]["targetid"]
    rows = {
        "TARGETID": np.array([keep, 777, 778], dtype=np.int64),  # `lost` has no row; 777, 778 no spectrum
        "Z": np.array([0.5, 0.6, 0.7]),
        "ZERR": np.full(3, 1e-4),
        "ZWARN": np.zeros(3, dtype=np.int64),
        "SPECTYPE": np.array(["GALAXY"] * 3),
        "DELTACHI2": np.full(3, 100.0),
    }
    table = read_redshift_catalog(write_catalog(tmp_path / "zpix-sv3-dark.fits", rows))
    assert set(table.target_class) == {""}  # no targeting columns: the spectra's FIBERMAP decides
    stats = JoinStats()
    with caplog.at_level(logging.INFO):
        joined = list(join_redshifts(records, table, stats=stats))
    assert [r["targetid"] for r in joined] == [keep] and joined[0]["target_class"] == "lrg"
    assert stats.without_redshift == 1 and stats.redshifts_without_spectrum == 2
    assert (
        "1 spectra have no redshift row" in caplog.text
        and "2 redshift rows without a spectrum" in caplog.text
    )
    assert lost not in {r["targetid"] for r in joined}
    other = JoinStats()
    assert list(join_redshifts(records, table, target_class="elg", stats=other)) == []
    assert other.other_class == 1
    with pytest.raises(ValueError, match="target_class"):
        list(join_redshifts(records, table, target_class="galaxies"))


# ----------------------------------------------------------------------------------------- batches


def test_find_many_agrees_with_find(tmp_path):
    rows = catalog_rows()
    rows["SURVEY"][2] = ""  # a row of unknown survey matches any
    table = read_redshift_catalog(write_catalog(tmp_path / "zall-pix-fuji.fits", rows))
    ids = np.array([11, 12, 13, 99, 11, 12], dtype=np.int64)
    for survey in ("", "sv1", "sv2", "sv3"):
        for program in ("", "dark", "bright"):
            expected = [table.find(int(t), survey, program) for t in ids]
            assert table.find_many(ids, survey, program).tolist() == [
                -1 if r is None else r for r in expected
            ]


def _reference_join(records, table, cuts, target_class):
    """`join_redshifts`' rules one record at a time, written out: (targetid, row, class) kept, counts."""
    good, kept, counts = table.quality(cuts), [], JoinStats()
    for record in records:
        counts.spectra += 1
        row = table.find(record["targetid"], record.get("survey", ""), record.get("program", ""))
        if row is None:
            counts.without_redshift += 1
            continue
        name, passed = str(table.target_class[row]), bool(good[row])
        if not name:
            fibermap = {k: [v] for k, v in record["fibermap"].items()}
            name = str(target_class_of(fibermap, record.get("survey"))[0])
            passed = bool(table.quality(cuts, rows=np.array([row]), classes=np.array([name]))[0])
        if target_class != "all" and name != target_class:
            counts.other_class += 1
        elif not passed:
            counts.failed_cuts += 1
        else:
            counts.joined += 1
            kept.append((record["targetid"], row, name))
    return kept, counts


@pytest.mark.parametrize("with_bits", [True, False], ids=["table-bits", "fibermap-bits"])
def test_batch_join_follows_the_record_rules(tmp_path, with_bits):
    path = DATA / "coadd-5-169-thru20210419.fits"
    records = [*read_desi_spectra(HEALPIX_COADD), *read_desi_spectra(path)]
    ids = np.array([r["targetid"] for r in records], dtype=np.int64)
    n = len(ids) + 3
    rows = {
        "TARGETID": np.concatenate([ids, ids[:2], [5]]),  # the first two twice (sv1 and sv3), one stray
        "SURVEY": np.array(["sv3"] * len(ids) + ["sv1", "sv1", "sv3"]),
        "PROGRAM": np.array(["dark"] * n),
        "Z": np.linspace(0.2, 1.8, n),
        "ZERR": np.full(n, 1e-4),
        "ZWARN": np.array([0, 4] + [0] * (n - 2), dtype=np.int64),
        "SPECTYPE": np.array(["GALAXY"] * n),
        "DELTACHI2": np.linspace(10.0, 90.0, n),
        "ZCAT_PRIMARY": np.array([False, True] + [True] * (len(ids) - 2) + [True, False, True]),
    }
    if with_bits:
        rows["SV3_DESI_TARGET"] = np.array([1, 2, 4] * n, dtype=np.int64)[:n]
    table = read_redshift_catalog(write_catalog(tmp_path / "zpix-sv3-dark.fits", rows))
    for target_class in ("all", "lrg", "elg"):
        for cuts in (QualityCuts(), QualityCuts(enabled=False, primary_only=False)):
            expected, expected_counts = _reference_join(records, table, cuts, target_class)
            if target_class == "all" and not cuts.enabled:
                assert len(expected) == len(records)  # the duplicated targets each found once
            join = RedshiftJoin(table, cuts=cuts, target_class=target_class)
            got = []
            batches = [
                [r for r in records if r["source"] == name] for name in (HEALPIX_COADD.name, path.name)
            ]
            for batch in batches:  # one batch per file: a file's spectra share survey and program
                fibermap = {k: np.array([r["fibermap"][k] for r in batch]) for k in batch[0]["fibermap"]}
                index, label_rows, classes = join.match(
                    [r["targetid"] for r in batch], batch[0]["survey"], batch[0]["program"], fibermap
                )
                got += [
                    (batch[i]["targetid"], int(r), str(c))
                    for i, r, c in zip(index, label_rows, classes, strict=True)
                ]
            counts = join.finish()
            assert got == expected and expected_counts.spectra == counts.spectra
            assert {k: v for k, v in counts.as_dict().items() if k != "redshifts_without_spectrum"} == {
                k: v for k, v in expected_counts.as_dict().items() if k != "redshifts_without_spectrum"
            }
            per_record = JoinStats()
            joined = list(
                join_redshifts(records, table, cuts=cuts, target_class=target_class, stats=per_record)
            )
            assert [(r["targetid"], r["target_class"]) for r in joined] == [(t, c) for t, _, c in expected]
            assert per_record == counts
    assert expected_counts.failed_cuts + expected_counts.other_class > 0


def test_redrock_table_equals_the_whole_file_read(tmp_path):
    """Only the needed columns are decoded, and they give what astropy's full read gives."""
    path = write_redrock(
        HEALPIX_COADD,
        tmp_path / "redrock-sv3-dark-26065.fits",
        z=[0.1, 0.2, 0.51, 0.3, 0.73],
        zwarn=[0, 4, 0, 0, 1],
    )
    table = read_redrock(path)
    with fits.open(path) as hdul:
        redshifts, fibermap = hdul["REDSHIFTS"].data, hdul["FIBERMAP"].data
        np.testing.assert_array_equal(table.targetid, redshifts["TARGETID"])
        np.testing.assert_array_equal(table.z, redshifts["Z"])
        np.testing.assert_array_equal(table.zerr, redshifts["ZERR"])
        np.testing.assert_array_equal(table.zwarn, redshifts["ZWARN"])
        np.testing.assert_array_equal(table.deltachi2, redshifts["DELTACHI2"])
        assert table.spectype.tolist() == [s.strip() for s in redshifts["SPECTYPE"]]
        columns = {name: fibermap[name] for name in fibermap.names}
        assert table.target_class.tolist() == target_class_of(columns, "sv3").tolist()
        assert table.is_target.tolist() == [o.strip() == "TGT" for o in fibermap["OBJTYPE"]]
        np.testing.assert_array_equal(table.fiberstatus, fibermap["COADD_FIBERSTATUS"])
    assert (table.survey.tolist(), table.program.tolist()) == (["sv3"] * 5, ["dark"] * 5)
