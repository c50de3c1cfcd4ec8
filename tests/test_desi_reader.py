"""The DESI coadd/spectra reader on the real DESI files shipped with specutils, and on damaged copies."""

from __future__ import annotations

import importlib.resources
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from specpt_hf.data.desi import (
    DESI_N_PIXELS,
    DesiFormatError,
    ReadStats,
    arm_offsets,
    desi_brz_wavelength,
    inspect_desi_file,
    merge_arms,
    parse_desi_filename,
    read_desi_chunks,
    read_desi_spectra,
    read_table_columns,
)

DATA = Path(str(importlib.resources.files("specutils") / "io/default_loaders/tests/desi_test_data"))
HEALPIX_COADD = DATA / "coadd-sv3-dark-26065.fits"
TILE_COADD = DATA / "coadd-5-169-thru20210419.fits"
HEALPIX_SPECTRA = DATA / "spectra-sv3-dark-26065.fits"
TILE_SPECTRA = DATA / "spectra-5-169-thru20210419.fits"
ALL_FILES = [HEALPIX_COADD, TILE_COADD, HEALPIX_SPECTRA, TILE_SPECTRA]


def raw_arms(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every arm's arrays straight from astropy."""
    with fits.open(path) as hdul:
        return {
            arm: {
                kind: np.array(hdul[f"{arm.upper()}_{kind}"].data)
                for kind in ("WAVELENGTH", "FLUX", "IVAR", "MASK")
            }
            for arm in "brz"
        }


def expected_good_rows(path: Path) -> list[int]:
    """Rows a DESI analysis keeps: TARGETID > 0, OBJTYPE TGT, fiber status 0, some usable pixel."""
    with fits.open(path) as hdul:
        fibermap = hdul["FIBERMAP"].data
        status = (
            fibermap["COADD_FIBERSTATUS"]
            if "COADD_FIBERSTATUS" in fibermap.names
            else fibermap["FIBERSTATUS"]
        )
        usable = sum(
            ((hdul[f"{a}_IVAR"].data > 0) & (hdul[f"{a}_MASK"].data == 0)).sum(axis=1) for a in "BRZ"
        )
        keep = (fibermap["TARGETID"] > 0) & (fibermap["OBJTYPE"] == "TGT") & (status == 0) & (usable > 0)
        return np.flatnonzero(keep).tolist()


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a DESI file with `edit(hdul)` applied."""
    with fits.open(src) as hdul:
        hdul = fits.HDUList([hdu.copy() for hdu in hdul])
        edit(hdul)
        hdul.writeto(dst)
    return dst


# ----------------------------------------------------------------------------------------- grid


def test_brz_grid_constants_and_real_arms_on_it():
    grid = desi_brz_wavelength()
    assert grid.shape == (DESI_N_PIXELS,) == (7781,)
    assert grid[0] == 3600.0 and grid[-1] == pytest.approx(9824.0, abs=1e-9)
    np.testing.assert_allclose(np.diff(grid), 0.8, atol=1e-9)
    arms = raw_arms(HEALPIX_COADD)
    offsets = arm_offsets({arm: arms[arm]["WAVELENGTH"] for arm in "brz"})
    for arm, start in offsets.items():
        wave = arms[arm]["WAVELENGTH"]
        np.testing.assert_allclose(grid[start : start + wave.size], wave, atol=1e-4)
    assert offsets == {"b": 0, "r": 2700, "z": 4900}


def test_filename_parsing():
    assert parse_desi_filename("coadd-sv3-dark-26065.fits") == {
        "survey": "sv3",
        "program": "dark",
        "healpix": 26065,
    }
    assert parse_desi_filename("coadd-5-169-thru20210419.fits") == {"petal": 5, "tileid": 169, "healpix": -1}


# ----------------------------------------------------------------------------------------- real files


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_records_are_the_good_fibers_of_the_fibermap(path):
    stats = ReadStats()
    records = list(read_desi_spectra(path, stats=stats))
    with fits.open(path) as hdul:
        fibermap = hdul["FIBERMAP"].data
        expected = [int(fibermap["TARGETID"][row]) for row in expected_good_rows(path)]
        n_fibers = len(fibermap)
    assert [r["targetid"] for r in records] == expected and expected
    assert stats.fibers == n_fibers and stats.spectra == len(records)
    assert (
        stats.unassigned + stats.non_target + stats.bad_fiberstatus + stats.no_data + stats.spectra
        == n_fibers
    )
    for record in records:
        assert record["flux"].shape == record["ivar"].shape == record["mask"].shape == (7781,)
        assert record["flux"].dtype == np.float32 and record["ivar"].dtype == np.float32
        assert record["mask"].dtype == bool
        assert record["fibermap"]["TARGETID"] == record["targetid"]
        assert np.isfinite(record["flux"]).all() and (record["ivar"] >= 0).all()
        assert not record["mask"][record["ivar"] > 0].any()  # True = bad, and every good pixel has ivar


def test_sky_and_unassigned_fibers_are_excluded_and_counted():
    stats = ReadStats()
    records = list(read_desi_spectra(HEALPIX_COADD, stats=stats))
    ids = {r["targetid"] for r in records}
    with fits.open(HEALPIX_COADD) as hdul:
        fibermap = hdul["FIBERMAP"].data
        sky = set(fibermap["TARGETID"][fibermap["OBJTYPE"] == "SKY"].tolist())
        unassigned = fibermap["TARGETID"][fibermap["TARGETID"] <= 0].tolist()
    assert sky and unassigned
    assert not ids & sky and all(i > 0 for i in ids)
    assert stats.non_target == len(sky) and stats.unassigned == len(unassigned)


def test_fibermap_row_is_plain_python():
    record = next(read_desi_spectra(HEALPIX_COADD))
    row = record["fibermap"]
    assert row["OBJTYPE"] == "TGT" and isinstance(row["OBJTYPE"], str)
    assert all(isinstance(v, (int, float, str, bool, list)) for v in row.values())
    assert isinstance(row["SV3_DESI_TARGET"], int)


def test_healpix_provenance_from_header():
    record = next(read_desi_spectra(HEALPIX_COADD))
    assert (record["survey"], record["program"], record["healpix"]) == ("sv3", "dark", 26065)


def test_tile_coadd_read():
    stats = ReadStats()
    records = list(read_desi_spectra(TILE_COADD, stats=stats))
    assert [r["targetid"] for r in records] == [39633300968442591]
    # no healpix for a tile coadd; the survey comes from its SV3_* targeting columns
    assert records[0]["healpix"] == -1 and records[0]["survey"] == "sv3"
    assert records[0]["fibermap"]["TILEID"] == 169
    assert stats.bad_fiberstatus == 1  # the TGT fiber with COADD_FIBERSTATUS 512


def _independent_merge(arms: dict, row: int, grid_index: int) -> tuple[float, float, bool]:
    """flux, ivar, bad at one brz pixel, from the raw arrays (coadd_cameras arithmetic, by hand)."""
    wavelength = 3600.0 + 0.8 * grid_index
    sum_w = sum_wf = 0.0
    seen = []
    for arm in "brz":
        hits = np.flatnonzero(np.abs(arms[arm]["WAVELENGTH"] - wavelength) < 1e-4)
        if hits.size:
            j = hits[0]
            w = float(arms[arm]["IVAR"][row, j]) if arms[arm]["MASK"][row, j] == 0 else 0.0
            sum_w += w
            sum_wf += w * float(arms[arm]["FLUX"][row, j])
            seen.append((arm, j))
    if len(seen) == 1:
        arm, j = seen[0]
        return float(arms[arm]["FLUX"][row, j]), sum_w, sum_w == 0
    return (sum_wf / sum_w if sum_w > 0 else 0.0), sum_w, sum_w == 0


@pytest.mark.parametrize("path", [HEALPIX_COADD, HEALPIX_SPECTRA], ids=lambda p: p.name)
def test_merge_matches_independent_computation(path):
    arms = raw_arms(path)
    b_r = range(2700, 2751)  # 5760-5800 Å, seen by b and r
    r_z = range(4900, 5026)  # 7520-7620 Å, seen by r and z
    singles = [0, 1234, 2699, 2751, 3500, 4899, 5026, 7000, 7780]
    for record in read_desi_spectra(path):
        row = record["row"]
        for index in [*b_r, *r_z, *singles]:
            flux, ivar, bad = _independent_merge(arms, row, index)
            assert record["flux"][index] == pytest.approx(flux, rel=1e-5, abs=1e-6), index
            assert record["ivar"][index] == pytest.approx(ivar, rel=1e-6), index
            assert bool(record["mask"][index]) == bad, index


def test_overlap_is_ivar_weighted_mean():
    """In the real data the overlap values differ between arms: the merge is not a copy of either."""
    arms = raw_arms(HEALPIX_COADD)
    record = next(r for r in read_desi_spectra(HEALPIX_COADD) if r["row"] == 4)
    index = 2720  # 5776 Å, b pixel 2720, r pixel 20
    fb, fr = arms["b"]["FLUX"][4, 2720], arms["r"]["FLUX"][4, 20]
    wb, wr = arms["b"]["IVAR"][4, 2720], arms["r"]["IVAR"][4, 20]
    assert wb > 0 and wr > 0 and fb != fr
    assert record["flux"][index] == pytest.approx((wb * fb + wr * fr) / (wb + wr), rel=1e-5)
    assert record["ivar"][index] == pytest.approx(wb + wr, rel=1e-6)


def test_compressed_mask_is_read(tmp_path):
    with fits.open(HEALPIX_SPECTRA) as hdul:
        assert isinstance(hdul["B_MASK"], fits.CompImageHDU)
        raw_mask = np.array(hdul["B_MASK"].data)
        raw_ivar = np.array(hdul["B_IVAR"].data)
    record = next(read_desi_spectra(HEALPIX_SPECTRA))
    row = record["row"]
    # b-only pixels: bad exactly where the (compressed, uint32) mask is set or ivar is 0
    expected = (raw_mask[row, :2700] != 0) | (raw_ivar[row, :2700] <= 0)
    np.testing.assert_array_equal(record["mask"][:2700], expected)

    # In the shipped file every masked pixel also has ivar 0; set mask bits on good pixels so that
    # only the compressed MASK can tell the reader they are bad.
    def flag(hdul):
        data = np.array(hdul["B_MASK"].data)
        data[row, 500:510] = 2**31 + 8  # needs the full uint32 range (BZERO = 2**31)
        hdul["B_MASK"].data = data

    path = rewrite(HEALPIX_SPECTRA, tmp_path / "spectra-sv3-dark-26065.fits", flag)
    with fits.open(path) as hdul:
        assert isinstance(hdul["B_MASK"], fits.CompImageHDU) and hdul["B_MASK"].header["BZERO"] == 2**31
    flagged = next(read_desi_spectra(path))
    assert (raw_ivar[row, 500:510] > 0).all()
    assert flagged["mask"][500:510].all() and (flagged["ivar"][500:510] == 0).all()
    np.testing.assert_array_equal(flagged["mask"][:500], record["mask"][:500])


def test_chunk_size_and_select():
    whole = list(read_desi_spectra(HEALPIX_COADD))
    one_by_one = list(read_desi_spectra(HEALPIX_COADD, chunk_size=1))
    assert [r["targetid"] for r in whole] == [r["targetid"] for r in one_by_one]
    for a, b in zip(whole, one_by_one, strict=True):
        np.testing.assert_array_equal(a["flux"], b["flux"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
    keep = whole[1]["targetid"]
    stats = ReadStats()
    selected = list(read_desi_spectra(HEALPIX_COADD, select=lambda ids: ids == keep, stats=stats))
    assert [r["targetid"] for r in selected] == [keep] and stats.not_selected == 1


def test_inspect_reports_targetids():
    info = inspect_desi_file(HEALPIX_COADD, targetids=True)
    assert info.n_fibers == 5 and info.arm_offsets == {"b": 0, "r": 2700, "z": 4900}
    assert sorted(info.targetids.tolist()) == [39627866878511337, 39627866878514741]


# ----------------------------------------------------------------------------------------- merge unit


def coadd_cameras_merge(
    flux: dict[str, np.ndarray],
    ivar: dict[str, np.ndarray],
    mask: dict[str, np.ndarray],
    offsets: dict[str, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The test oracle: the merge as DESI's coadd_cameras writes it, with its integer masks.

    Per arm, NaN/inf values and masked pixels get ivar 0 (NaN/inf flux 0). Pixels seen by one arm are
    copied with their mask; in the overlaps flux = Σ ivar·flux / Σ ivar, ivar = Σ ivar and the mask is
    the OR of the arms' masks, reset to 0 where Σ ivar > 0. Bad = mask != 0 or ivar 0. Returns flux,
    ivar, bad [n, 7781] and the NaN/inf values at otherwise good pixels per spectrum [n].
    """
    n = next(iter(flux.values())).shape[0]
    coverage = np.zeros(DESI_N_PIXELS, dtype=int)
    for arm, start in offsets.items():
        coverage[start : start + flux[arm].shape[1]] += 1
    out_flux = np.zeros((n, DESI_N_PIXELS), dtype=np.float32)
    out_ivar = np.zeros((n, DESI_N_PIXELS), dtype=np.float32)
    out_mask = np.zeros((n, DESI_N_PIXELS), dtype=np.uint32)
    weight = np.zeros((n, DESI_N_PIXELS))  # Σ ivar
    weighted = np.zeros((n, DESI_N_PIXELS))  # Σ ivar·flux
    mask_or = np.zeros((n, DESI_N_PIXELS), dtype=np.uint32)
    nonfinite = np.zeros(n, dtype=np.int64)
    for arm, start in offsets.items():
        arm_flux = np.asarray(flux[arm], dtype=np.float32)
        arm_ivar = np.asarray(ivar[arm], dtype=np.float32)
        arm_mask = np.asarray(mask[arm], dtype=np.uint32)
        finite = np.isfinite(arm_flux) & np.isfinite(arm_ivar)
        nonfinite += np.sum(~finite & (arm_mask == 0) & ~(arm_ivar <= 0), axis=1)
        arm_flux = np.where(finite, arm_flux, np.float32(0))
        arm_ivar = np.where(finite & (arm_mask == 0) & (arm_ivar > 0), arm_ivar, np.float32(0))
        pixels = start + np.arange(arm_flux.shape[1])
        alone = coverage[pixels] == 1
        out_flux[:, pixels[alone]] = arm_flux[:, alone]
        out_ivar[:, pixels[alone]] = arm_ivar[:, alone]
        out_mask[:, pixels[alone]] = arm_mask[:, alone]
        shared = pixels[~alone]
        weight[:, shared] += arm_ivar[:, ~alone]
        weighted[:, shared] += arm_ivar[:, ~alone].astype(np.float64) * arm_flux[:, ~alone]
        mask_or[:, shared] |= arm_mask[:, ~alone]
    shared = coverage > 1
    good = weight[:, shared] > 0
    out_flux[:, shared] = np.where(good, weighted[:, shared] / np.where(good, weight[:, shared], 1.0), 0.0)
    out_ivar[:, shared] = weight[:, shared]
    out_mask[:, shared] = np.where(good, np.uint32(0), mask_or[:, shared])
    return out_flux, out_ivar, (out_mask != 0) | (out_ivar <= 0), nonfinite


def test_merge_arms_mask_rules():
    offsets = {"b": 0, "r": 2}  # a toy layout on the brz grid: pixels 2-3 are seen by both arms
    flux = {"b": np.array([[1.0, 2.0, 3.0, 4.0]]), "r": np.array([[5.0, 6.0, 7.0]])}
    ivar = {"b": np.array([[1.0, 1.0, 1.0, 2.0]]), "r": np.array([[3.0, 1.0, 1.0]])}
    mask = {"b": np.array([[0, 4, 8, 0]]), "r": np.array([[0, 16, 0]])}
    merged = merge_arms(flux, ivar, mask, offsets)
    # pixel 1: b only, masked -> ivar 0, flux copied, bad
    assert merged.ivar[0, 1] == 0 and merged.flux[0, 1] == 2.0 and merged.bad[0, 1]
    # pixel 2: b masked, r good -> r's value, good
    assert merged.flux[0, 2] == 5.0 and merged.ivar[0, 2] == 3.0 and not merged.bad[0, 2]
    # pixel 3: b (ivar 2, flux 4) and r masked -> b's value only
    assert merged.flux[0, 3] == 4.0 and merged.ivar[0, 3] == 2.0 and not merged.bad[0, 3]
    # pixel 4: r only, good
    assert merged.flux[0, 4] == 7.0 and not merged.bad[0, 4]
    # beyond the arms: no data
    assert merged.bad[0, 5:].all() and (merged.ivar[0, 5:] == 0).all()
    both_masked = merge_arms(flux, ivar, {"b": np.array([[0, 0, 8, 0]]), "r": np.array([[2, 0, 0]])}, offsets)
    assert both_masked.bad[0, 2] and both_masked.ivar[0, 2] == 0 and both_masked.flux[0, 2] == 0


# ----------------------------------------------------------------------------------------- bad input


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="coadd-none"):
        list(read_desi_spectra(Path("/nonexistent/coadd-none.fits")))


def test_truncated_file(tmp_path):
    data = HEALPIX_COADD.read_bytes()
    cut = tmp_path / "coadd-sv3-dark-1.fits"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DesiFormatError, match=r"coadd-sv3-dark-1\.fits.*truncated") as info:
        list(read_desi_spectra(cut))
    assert info.value.hdu  # names the HDU
    head_only = tmp_path / "coadd-sv3-dark-2.fits"
    head_only.write_bytes(data[:20000])  # cut inside the FIBERMAP header
    with pytest.raises(DesiFormatError, match=r"coadd-sv3-dark-2\.fits.*FIBERMAP"):
        list(read_desi_spectra(head_only))


def test_not_fits(tmp_path):
    junk = tmp_path / "coadd-sv3-dark-3.fits"
    junk.write_bytes(b"this is not a FITS file at all" * 200)
    with pytest.raises(DesiFormatError, match="coadd-sv3-dark-3.fits"):
        list(read_desi_spectra(junk))


def test_missing_hdu(tmp_path):
    path = rewrite(HEALPIX_COADD, tmp_path / "coadd-sv3-dark-4.fits", lambda h: h.pop(h.index_of("Z_MASK")))
    with pytest.raises(DesiFormatError, match=r"coadd-sv3-dark-4\.fits \[HDU Z_MASK\]: missing HDU"):
        list(read_desi_spectra(path))


def test_misaligned_arms(tmp_path):
    def shift_red(hdul):
        hdul["R_WAVELENGTH"].data = hdul["R_WAVELENGTH"].data + 0.4

    path = rewrite(HEALPIX_COADD, tmp_path / "coadd-sv3-dark-5.fits", shift_red)
    with pytest.raises(DesiFormatError, match=r"coadd-sv3-dark-5\.fits.*arm r is off the 0\.8 Å lattice"):
        list(read_desi_spectra(path))


def test_mismatched_shape(tmp_path):
    def drop_row(hdul):
        hdul["B_FLUX"].data = hdul["B_FLUX"].data[:4]

    path = rewrite(HEALPIX_COADD, tmp_path / "coadd-sv3-dark-6.fits", drop_row)
    with pytest.raises(DesiFormatError, match=r"coadd-sv3-dark-6\.fits \[HDU B_FLUX\]: shape \(4, 2751\)"):
        list(read_desi_spectra(path))


def test_nan_flux_pixels_are_set_bad_and_counted(tmp_path, caplog):
    def poison(hdul):
        hdul["B_FLUX"].data[4, 100:105] = np.nan
        hdul["Z_FLUX"].data[4, 2000] = np.inf

    path = rewrite(HEALPIX_COADD, tmp_path / "coadd-sv3-dark-7.fits", poison)
    stats = ReadStats()
    with caplog.at_level(logging.WARNING):
        records = {r["row"]: r for r in read_desi_spectra(path, stats=stats)}
    record = records[4]
    assert record["mask"][100:105].all() and (record["ivar"][100:105] == 0).all()
    assert record["mask"][4900 + 2000] and np.isfinite(record["flux"]).all()
    assert not record["mask"][105]  # neighbours untouched
    assert stats.nonfinite_pixels == 6 and stats.nonfinite_spectra == 1
    assert "6 NaN/inf pixels in 1 spectra" in caplog.text


def test_all_zero_ivar_is_skipped_and_counted(tmp_path, caplog):
    def blank(hdul):
        for arm in "BRZ":
            hdul[f"{arm}_IVAR"].data[2] = 0

    path = rewrite(HEALPIX_COADD, tmp_path / "coadd-sv3-dark-8.fits", blank)
    stats = ReadStats()
    with caplog.at_level(logging.WARNING):
        records = list(read_desi_spectra(path, stats=stats))
    assert [r["row"] for r in records] == [4]
    assert stats.no_data == 1
    assert "skipped 1 spectra with no usable pixel" in caplog.text


def test_copy_of_real_file_reads_identically(tmp_path):
    copy = shutil.copy(HEALPIX_COADD, tmp_path / HEALPIX_COADD.name)
    a, b = list(read_desi_spectra(HEALPIX_COADD)), list(read_desi_spectra(copy))
    assert [r["targetid"] for r in a] == [r["targetid"] for r in b]
    np.testing.assert_array_equal(a[0]["flux"], b[0]["flux"])


# ----------------------------------------------------------------------------------------- fast paths


def _same_column(ours: np.ndarray, theirs) -> bool:
    theirs = np.asarray(theirs)
    if theirs.dtype.kind in "SU":
        return np.array_equal(np.char.strip(ours.astype(str)), np.char.strip(theirs.astype(str)))
    native = theirs.dtype.newbyteorder("=")
    return (
        ours.dtype == native and ours.shape == theirs.shape and np.array_equal(ours, theirs, equal_nan=True)
    )


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_table_columns_equal_astropy_on_real_files(path):
    with fits.open(path) as hdul:
        for hdu in hdul:
            if not isinstance(hdu, fits.BinTableHDU) or isinstance(hdu, fits.CompImageHDU):
                continue
            names, values = read_table_columns(hdu, path)
            assert names == tuple(hdu.data.dtype.names)
            for name in names:
                assert _same_column(values[name], hdu.data[name]), (hdu.name, name)
            _, some = read_table_columns(hdu, path, ["TARGETID", "NOT_A_COLUMN"])
            assert list(some) == (["TARGETID"] if "TARGETID" in names else [])


def test_table_columns_equal_astropy_for_every_column_type(tmp_path):
    n = 7
    rng = np.random.default_rng(3)
    columns = [
        fits.Column("FLAG", "L", array=rng.random(n) < 0.5),
        fits.Column("BYTE", "B", array=rng.integers(0, 255, n, dtype=np.uint8)),
        fits.Column("SHORT", "I", array=rng.integers(-999, 999, n).astype(np.int16)),
        fits.Column("INT", "J", array=rng.integers(-(2**30), 2**30, n).astype(np.int32)),
        fits.Column("LONG", "K", array=rng.integers(-(2**62), 2**62, n)),
        fits.Column(
            "FLOAT", "E", array=np.where(np.arange(n) == 2, np.nan, rng.normal(size=n)).astype(np.float32)
        ),
        fits.Column("DOUBLE", "D", array=rng.normal(size=n)),
        fits.Column("NAME", "8A", array=np.array(["TGT", "SKY", "", "TGT  ", "a", "bb", "x"])),
        fits.Column("VECTOR", "3D", array=rng.normal(size=(n, 3))),
        fits.Column("UNSIGNED", "K", bzero=2**63, array=np.arange(n, dtype=np.uint64) + 2**63 + 5),
        fits.Column("SCALED", "J", array=np.arange(n, dtype=np.int32)),  # TSCAL/TZERO added below
        fits.Column("MATRIX", "6E", dim="(3,2)", array=rng.normal(size=(n, 2, 3)).astype(np.float32)),
        fits.Column("BITS", "11X", array=rng.random((n, 11)) < 0.5),
        fits.Column("VARIABLE", "PJ()", array=[np.arange(i) for i in range(n)]),
    ]
    path = tmp_path / "table.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(columns, name="T")]).writeto(path)
    index = 1 + [c.name for c in columns].index("SCALED")
    fits.setval(path, f"TSCAL{index}", value=0.5, ext=1, after=f"TFORM{index}")
    fits.setval(path, f"TZERO{index}", value=10.0, ext=1, after=f"TSCAL{index}")
    with fits.open(path) as hdul:
        assert hdul["T"].data["SCALED"][2] == 11.0
        names, values = read_table_columns(hdul["T"], path)
        assert names == tuple(c.name for c in columns)
        for name in names:
            if name == "VARIABLE":
                assert all(
                    np.array_equal(a, b) for a, b in zip(values[name], hdul["T"].data[name], strict=True)
                )
            else:
                assert _same_column(values[name], hdul["T"].data[name]), name
        assert values["NAME"].dtype.kind == "S" and values["FLAG"].dtype == bool


def test_merge_arms_equals_coadd_cameras():
    """`merge_arms` gives the oracle's flux, ivar and bad pixels to the bit, NaN/inf and stored masks included."""
    rng = np.random.default_rng(7)
    for trial in range(40):
        n = int(rng.integers(1, 5))
        offsets = {"b": 0, "r": int(rng.integers(5, 15)), "z": int(rng.integers(18, 30))}
        flux, ivar, mask = {}, {}, {}
        for arm in offsets:
            length = int(rng.integers(3, 20))
            flux[arm] = rng.normal(size=(n, length)).astype(">f4")
            ivar[arm] = rng.choice([0.0, -1.0, 1.0, 2.5, 1e-3], size=(n, length)).astype(">f4")
            mask[arm] = rng.choice([0, 0, 0, 1, 2**31 + 8], size=(n, length)).astype(np.uint32)
            if trial % 2:
                for values in (flux[arm], ivar[arm]):
                    poison = rng.random(values.shape) < 0.1
                    values[poison] = rng.choice([np.nan, np.inf, -np.inf], size=int(poison.sum()))
        expected_flux, expected_ivar, expected_bad, expected_nonfinite = coadd_cameras_merge(
            flux, ivar, mask, offsets
        )
        # the same masks as stored under BZERO = 2**31 (int32, a good pixel is -2**31)
        stored = {arm: (m.astype(np.int64) - 2**31).astype(">i4") for arm, m in mask.items()}
        for masks, zeros in ((mask, None), (stored, dict.fromkeys(offsets, -(2**31)))):
            merged = merge_arms(flux, ivar, masks, offsets, zeros)
            assert merged.flux.tobytes() == expected_flux.tobytes(), trial  # -0.0 and 0.0 differ here
            assert merged.ivar.tobytes() == expected_ivar.tobytes(), trial
            np.testing.assert_array_equal(merged.bad, expected_bad)
            np.testing.assert_array_equal(merged.nonfinite, expected_nonfinite)


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_chunks_hold_the_records(path):
    records, record_stats = list(read_desi_spectra(path, chunk_size=3, stats=(a := ReadStats()))), a
    chunk_stats = ReadStats()
    chunks = list(read_desi_chunks(path, chunk_size=3, stats=chunk_stats, columns=["SV3_DESI_TARGET"]))
    assert chunk_stats == record_stats
    assert sum(len(chunk) for chunk in chunks) == len(records)
    i = 0
    for chunk in chunks:
        assert set(chunk.fibermap) <= {
            "TARGETID",
            "OBJTYPE",
            "COADD_FIBERSTATUS",
            "FIBERSTATUS",
            "SV3_DESI_TARGET",
        }
        for j in range(len(chunk)):
            record = records[i]
            assert (chunk.rows[j], chunk.targetid[j], chunk.source) == (
                record["row"],
                record["targetid"],
                path.name,
            )
            assert chunk.fibermap["SV3_DESI_TARGET"][j] == record["fibermap"]["SV3_DESI_TARGET"]
            assert chunk.flux[j].tobytes() == record["flux"].tobytes()
            np.testing.assert_array_equal(chunk.mask[j], record["mask"])
            assert (chunk.survey, chunk.program, chunk.healpix) == (
                record["survey"],
                record["program"],
                record["healpix"],
            )
            i += 1


def _expected_records(path: Path) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """flux, ivar, bad per good row, merged by the oracle from astropy's scaled arrays."""
    arms = raw_arms(path)
    offsets = arm_offsets({arm: arms[arm]["WAVELENGTH"] for arm in "brz"})
    flux, ivar, bad, _ = coadd_cameras_merge(
        *({a: arms[a][kind] for a in "brz"} for kind in ("FLUX", "IVAR", "MASK")), offsets
    )
    return {row: (flux[row], ivar[row], bad[row]) for row in expected_good_rows(path)}


def test_unusual_scalings_read_as_astropy_scales_them(tmp_path):
    def uint16_mask(hdul):  # stored int16 under BZERO = 32768: a good pixel is stored as -32768
        mask = np.where(hdul["B_MASK"].data > 0, 7, 0).astype(np.uint16)
        mask[4, 100:110] = 3
        hdul["B_MASK"] = fits.ImageHDU(mask, name="B_MASK")

    def scaled_flux(hdul):  # integers scaled to flux by BSCALE/BZERO: astropy applies them
        hdu = fits.ImageHDU(hdul["R_FLUX"].data.astype(np.float32), name="R_FLUX")
        hdu.scale("int16", bscale=0.01, bzero=5.0)
        hdul["R_FLUX"] = hdu

    for name, edit in (("coadd-sv3-dark-11.fits", uint16_mask), ("coadd-sv3-dark-12.fits", scaled_flux)):
        path = rewrite(HEALPIX_COADD, tmp_path / name, edit)
        expected = _expected_records(path)
        records = {r["row"]: r for r in read_desi_spectra(path)}
        assert sorted(records) == sorted(expected) == [2, 4]
        for row, (flux, ivar, bad) in expected.items():
            np.testing.assert_array_equal(records[row]["flux"], flux)
            np.testing.assert_array_equal(records[row]["ivar"], ivar)
            np.testing.assert_array_equal(records[row]["mask"], bad)
        if edit is uint16_mask:
            assert records[4]["mask"][100:110].all() and not records[4]["mask"][110]
        else:
            assert np.isclose(
                records[4]["flux"][3000], raw_arms(HEALPIX_COADD)["r"]["FLUX"][4, 300], atol=0.006
            )


@pytest.mark.parametrize("path", [HEALPIX_COADD, TILE_COADD], ids=lambda p: p.name)
def test_reader_equals_desispec_coadd_cameras_on_real_files(path):
    """Where desispec is installed (`pip install --no-deps desispec`): its own `coadd_cameras` as the oracle."""
    io = pytest.importorskip("desispec.io")
    coaddition = pytest.importorskip("desispec.coaddition")
    merged = coaddition.coadd_cameras(io.read_spectra(str(path)))
    row = {int(t): i for i, t in enumerate(merged.fibermap["TARGETID"])}
    records = list(read_desi_spectra(path))
    assert records
    for record in records:
        i = row[record["targetid"]]
        flux, ivar = merged.flux["brz"][i], merged.ivar["brz"][i]
        np.testing.assert_allclose(record["flux"], flux, rtol=1e-5, atol=1e-6 * np.abs(flux).max())
        np.testing.assert_allclose(record["ivar"], ivar, rtol=1e-5, atol=1e-6 * ivar.max())
        np.testing.assert_array_equal(record["mask"], merged.mask["brz"][i] != 0)
