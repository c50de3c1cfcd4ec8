"""The DESI-like mock: physics, determinism, noise shape, and the DESI file formats it writes."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from specpt_hf.data import mock
from specpt_hf.data.instrument import DEIMOS, DESI, HST_G102, HST_G141
from specpt_hf.data.mock import (
    HARD_FLAGS,
    NEBULAR_LINES,
    ZWARN_SMALL_DELTA_CHI2,
    d4000n,
    generate_spectra,
    healpix_nest_centre,
    noise_shape_from_desi_files,
    release_file_seed,
    rest_frame_models,
    rest_templates,
    sky_variance_shape,
    write_mock_healpix,
    write_mock_release,
)

DESI_DATA = importlib.resources.files("specutils") / "io/default_loaders/tests/desi_test_data"
REAL_COADDS = [str(DESI_DATA / "coadd-sv3-dark-26065.fits"), str(DESI_DATA / "coadd-5-169-thru20210419.fits")]


@pytest.fixture(scope="module")
def elgs():
    return generate_spectra("elg", 60, seed=3)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("mock")
    coadd, redrock = write_mock_healpix(root, "elg", 6, seed=11, survey="sv3", healpix=26065)
    return root, coadd, redrock


def test_deterministic_by_seed():
    a, b = generate_spectra("qso", 8, seed=5), generate_spectra("qso", 8, seed=5)
    c = generate_spectra("qso", 8, seed=6)
    np.testing.assert_array_equal(a["flux"], b["flux"])
    np.testing.assert_array_equal(a["truth"]["z"], b["truth"]["z"])
    assert not np.array_equal(a["truth"]["z"], c["truth"]["z"])


@pytest.mark.parametrize(
    ("target_class", "zmin", "zmax"),
    [("bgs", 0.0, 0.6), ("lrg", 0.4, 1.1), ("elg", 0.6, 1.63), ("qso", 0.9, 3.5)],
)
def test_class_redshifts_and_shapes(target_class, zmin, zmax):
    out = generate_spectra(target_class, 40, seed=1)
    z = out["truth"]["z"]
    assert np.all((z >= zmin) & (z <= zmax))
    assert np.ptp(z) > 0.2 * (zmax - zmin)  # a distribution, not a constant
    assert out["flux"].shape == (40, 7781) and out["flux"].dtype == np.float32
    assert out["mask"].dtype == bool and out["mask"].mean() < 0.05
    if target_class == "bgs":
        assert np.all(out["truth"]["mag_r"] < 19.5 + 1e-6)
    assert set(np.unique(out["truth"]["spectype"])) == {"QSO" if target_class == "qso" else "GALAXY"}


def test_templates_have_4000A_breaks():
    wave, templates = rest_templates()
    d_old, d_astar, d_young = d4000n(wave, templates)
    assert 1.7 < d_old < 2.2 and 1.15 < d_astar < 1.45 and d_young < 1.15
    ca_k = np.argmin(np.abs(wave - 3934.78))
    side = np.argmin(np.abs(wave - 3905.0))
    assert templates[0, ca_k] < 0.7 * templates[0, side]  # Ca II K absorption in the old population


def test_oii_peak_at_redshifted_wavelength(elgs):
    """The [O II] doublet of the noiseless model peaks within 1.5 pixels of (1+z)·λ_rest."""
    z, model, wave = elgs["truth"]["z"], elgs["model"], elgs["wave"]
    strong = np.flatnonzero(elgs["truth"]["flux_OII_3729"] > 8.0)
    assert len(strong) >= 5
    for i in strong:
        centre = 3728.5 * (1 + z[i])
        window = np.abs(wave - centre) < 25.0
        peak = wave[window][np.argmax(model[i, window])]
        doublet = np.array([NEBULAR_LINES["OII_3727"], NEBULAR_LINES["OII_3729"]]) * (1 + z[i])
        assert np.min(np.abs(doublet - peak)) < 1.5 * 0.8


@pytest.mark.parametrize(("target_class", "family"), [("elg", "basis"), ("lrg", "sps"), ("qso", "basis")])
def test_rest_frame_models_are_the_observed_objects_at_rest(target_class, family):
    """The same objects as `generate_spectra`'s, whose rest-frame spectrum stretched by 1 + z is its noiseless model
    (up to the line-spread function and, for quasars, the forest's fluctuations), and whose lines keep their
    observed fluxes / (1 + z)."""
    observed = generate_spectra(target_class, 6, seed=4, family=family)
    rest = np.exp(np.arange(np.log(900.0), np.log(11000.0), 1e-4))
    models = rest_frame_models(target_class, 6, seed=4, rest_wavelength=rest, family=family)
    np.testing.assert_array_equal(models["z"], observed["truth"]["z"])
    assert models["flux"].shape == (6, len(rest)) and models["flux"].dtype == np.float32
    box = np.ones(41) / 41  # 33 A: beyond the line-spread function
    for i, z in enumerate(models["z"]):
        stretched = np.interp(observed["wave"], rest * (1 + z), models["flux"][i])
        smooth = np.convolve(stretched, box, "same")[50:-50]
        truth = np.convolve(observed["model"][i], box, "same")[50:-50]
        limit = 0.1 if target_class == "qso" and z > 2.0 else 0.01  # the forest's fluctuations
        assert np.median(np.abs(smooth / truth - 1)) < limit
    if target_class == "elg":
        truth = observed["truth"]
        i = int(np.argmax(truth["flux_OII_3729"]))
        window = np.abs(rest - 3728.5) < 15.0
        continuum = np.median(models["flux"][i, (np.abs(rest - 3728.5) > 20) & (np.abs(rest - 3728.5) < 60)])
        line = np.trapezoid(models["flux"][i, window] - continuum, rest[window])
        expected = (truth["flux_OII_3727"][i] + truth["flux_OII_3729"][i]) / (1 + truth["z"][i])
        np.testing.assert_allclose(line, expected, rtol=0.05)


def test_balmer_decrement_and_dust():
    truth = generate_spectra("bgs", 80, seed=2)["truth"]
    ratio = truth["flux_Halpha"] / np.where(truth["flux_Hbeta"] > 0, truth["flux_Hbeta"], np.nan)
    has = np.isfinite(ratio) & (truth["flux_Halpha"] > 0)
    np.testing.assert_allclose(ratio[has & (truth["ebv_gas"] == 0)], 2.86, rtol=1e-6)
    assert np.all(ratio[has & (truth["ebv_gas"] > 0)] > 2.86)


def test_noise_shape_follows_real_desi():
    """The tabulated noise shape and the mock's own ivar both track the real DESI 1/ivar."""
    real = noise_shape_from_desi_files(REAL_COADDS)
    faint = generate_spectra("elg", 30, seed=4)
    for arm in DESI.arms:
        wave, real_var = real[arm.name]
        ok = np.isfinite(real_var) & (real_var > 0)
        table = sky_variance_shape(arm)
        assert np.corrcoef(np.log(table[ok]), np.log(real_var[ok]))[0, 1] > 0.9
        ivar = faint["arms"][arm.name]["ivar"].astype(float)
        mock_var = np.nanmedian(np.where(ivar > 0, 1.0 / np.where(ivar > 0, ivar, 1), np.nan), axis=0)
        assert np.corrcoef(np.log(mock_var[ok]), np.log(real_var[ok]))[0, 1] > 0.8
    # and it is far from flat: sky lines make the z-arm variance jump by > 10x
    z_shape = sky_variance_shape(DESI.arm("z"))
    assert z_shape.max() / np.median(z_shape) > 10


def test_hard_cases_and_redrock_numbers(elgs):
    truth = elgs["truth"]
    low = (truth["hard"] & HARD_FLAGS["LOW_SNR"]) != 0
    assert 0.03 < low.mean() < 0.6  # DESI ELG_LOP: ~25-30 % fail
    np.testing.assert_array_equal(truth["zwarn"] == ZWARN_SMALL_DELTA_CHI2, truth["deltachi2"] < 9)
    assert np.all(low[truth["deltachi2"] < 25])
    assert np.all((truth["zerr"] > 0) & (truth["zerr"] < 0.01))
    qso = generate_spectra("qso", 60, seed=3)["truth"]
    assert 0 < ((qso["hard"] & HARD_FLAGS["BAL"]) != 0).mean() < 0.35
    np.testing.assert_array_equal((qso["hard"] & HARD_FLAGS["BAL"]) != 0, qso["bal"])


def test_other_instruments_share_physics():
    for inst in (DEIMOS, HST_G102, HST_G141):
        out = generate_spectra("elg", 5, seed=0, instrument=inst)
        assert out["flux"].shape == (5, inst.n_pixels)
        assert out["instrument"] == inst.name
        np.testing.assert_array_equal(out["wave"], inst.wave)
    # same seed, same physics: identical redshifts on every instrument
    z_desi = generate_spectra("elg", 5, seed=0)["truth"]["z"]
    np.testing.assert_array_equal(generate_spectra("elg", 5, seed=0, instrument=DEIMOS)["truth"]["z"], z_desi)
    # a space grism has no airglow lines: smooth variance
    shape = sky_variance_shape(HST_G141.arms[0], HST_G141)
    assert np.abs(np.diff(np.log(shape))).max() < 0.3
    assert np.abs(np.diff(np.log(sky_variance_shape(DESI.arm("z"))))).max() > 1.0
    ground = sky_variance_shape(DEIMOS.arms[0], DEIMOS)  # airglow lines re-rendered at R = 5000
    assert np.abs(np.diff(np.log(ground))).max() > 1.0
    # Hα of a low-z BGS lands at (1+z)·6564.61 on the G102 grid when z puts it there
    bgs = generate_spectra("bgs", 30, seed=9, instrument=HST_G102)
    for i in np.flatnonzero(bgs["truth"]["flux_Halpha"] > 300)[:3]:
        centre = 6564.61 * (1 + bgs["truth"]["z"][i])
        if HST_G102.coverage[0] + 100 < centre < HST_G102.coverage[1] - 100:
            window = np.abs(bgs["wave"] - centre) < 100
            peak = bgs["wave"][window][np.argmax(bgs["model"][i, window])]
            assert abs(peak - centre) < 24.5


def test_bad_arguments():
    with pytest.raises(ValueError, match="target_class"):
        generate_spectra("star", 3, 0)
    with pytest.raises(ValueError, match="n must be positive"):
        generate_spectra("elg", 0, 0)
    with pytest.raises(ValueError, match="survey"):
        write_mock_healpix("/nonexistent", "elg", 2, 0, survey="cmx")
    with pytest.raises(ValueError, match="unknown target classes"):
        write_mock_release("/nonexistent", {"stars": 2}, 0)


def test_healpix_centre():
    assert healpix_nest_centre(1, 0) == pytest.approx((45.0, np.degrees(np.arcsin(2 / 3))))
    ra, dec = healpix_nest_centre(64, 26065)  # the real file's targets sit at RA 216.9-217.1, Dec 3.2-3.3
    assert abs(ra - 217.0) < 0.7 and abs(dec - 3.3) < 0.7


def test_coadd_format_matches_real_file(written):
    root, coadd, _ = written
    assert coadd == root / "healpix/sv3/dark/260/26065/coadd-sv3-dark-26065.fits"
    assert not list(coadd.parent.glob(".*tmp"))
    with fits.open(coadd) as mine, fits.open(REAL_COADDS[0]) as real:
        assert [h.name for h in mine] == [h.name for h in real]
        for name in ("FIBERMAP", "EXP_FIBERMAP", "SCORES"):
            assert [(c.name, c.format) for c in mine[name].columns] == [
                (c.name, c.format) for c in real[name].columns
            ]
        for key in ("SPGRP", "SPGRPVAL", "HPXNSIDE", "HPXPIXEL", "SURVEY", "PROGRAM"):
            assert mine[0].header[key] == real[0].header[key]
        n = len(mine["FIBERMAP"].data)
        assert n == 6 + 2 + 1
        for arm in "BRZ":
            npix = real[f"{arm}_WAVELENGTH"].data.shape[0]
            np.testing.assert_allclose(
                mine[f"{arm}_WAVELENGTH"].data, real[f"{arm}_WAVELENGTH"].data, atol=1e-6
            )
            for ext in ("FLUX", "IVAR", "MASK", "RESOLUTION"):
                assert mine[f"{arm}_{ext}"].header["BITPIX"] == real[f"{arm}_{ext}"].header["BITPIX"]
                assert mine[f"{arm}_{ext}"].header.get("BUNIT") == real[f"{arm}_{ext}"].header.get("BUNIT")
            assert mine[f"{arm}_MASK"].header["BZERO"] == 2147483648
            assert mine[f"{arm}_FLUX"].data.shape == (n, npix)
            res = mine[f"{arm}_RESOLUTION"].data
            assert res.shape == (n, 11, npix) and res.dtype.itemsize == 4
            objtype = mine["FIBERMAP"].data["OBJTYPE"]
            np.testing.assert_allclose(res[objtype != ""].sum(axis=1), 1.0, atol=1e-5)
            assert np.all(res[objtype == ""] == 0) and np.all(mine[f"{arm}_IVAR"].data[objtype == ""] == 0)


def test_fibermap_targeting_and_ids(written):
    _, coadd, _ = written
    fm = fits.getdata(coadd, "FIBERMAP")
    objtype = np.char.strip(fm["OBJTYPE"].astype(str))
    tgt = objtype == "TGT"
    assert tgt.sum() == 6 and (objtype == "SKY").sum() == 2 and (objtype == "").sum() == 1
    assert np.all(fm["TARGETID"][tgt] > 0) and len(np.unique(fm["TARGETID"])) == len(fm)
    assert np.all(fm["TARGETID"][objtype == ""] < 0)
    assert np.all(fm["SV3_DESI_TARGET"][tgt] & (1 << 1))  # ELG bit
    assert not np.any(fm["SV3_DESI_TARGET"][tgt] & ((1 << 0) | (1 << 2) | (1 << 60)))
    assert np.all(fm["DESI_TARGET"][objtype == "SKY"] == 1 << 32)
    assert np.all(fm["COADD_FIBERSTATUS"][tgt] == 0) and np.all(fm["COADD_FIBERSTATUS"][objtype == ""] == 1)


def test_redrock_file(written):
    _, coadd, redrock = written
    with fits.open(redrock) as hdul, fits.open(coadd) as co:
        assert [h.name for h in hdul] == ["PRIMARY", "REDSHIFTS", "FIBERMAP", "EXP_FIBERMAP", "TSNR2"]
        zb = hdul["REDSHIFTS"].data
        expected = {"TARGETID": "K", "CHI2": "D", "COEFF": "10D", "Z": "D", "ZERR": "D", "ZWARN": "K"}
        expected |= {"NPIXELS": "K", "SPECTYPE": "6A", "SUBTYPE": "20A", "NCOEFF": "K", "DELTACHI2": "D"}
        assert {c.name: c.format for c in hdul["REDSHIFTS"].columns} == expected
        for name in ("FIBERMAP", "TSNR2"):  # row-matched
            np.testing.assert_array_equal(hdul[name].data["TARGETID"], zb["TARGETID"])
        assert set(hdul["EXP_FIBERMAP"].data["TARGETID"]) == set(zb["TARGETID"])
        np.testing.assert_array_equal(zb["TARGETID"], co["FIBERMAP"].data["TARGETID"])
        truth = fits.getdata(coadd.parent / coadd.name.replace("coadd", "truth"), "TRUTH")
        rows = {t: i for i, t in enumerate(zb["TARGETID"])}
        idx = [rows[t] for t in truth["TARGETID"]]
        np.testing.assert_array_equal(zb["Z"][idx], truth["Z"])
        assert np.all(np.char.strip(zb["SPECTYPE"][idx].astype(str)) == "GALAXY")
        objtype = np.char.strip(co["FIBERMAP"].data["OBJTYPE"].astype(str))
        assert np.all(zb["ZWARN"][objtype == "SKY"] & 1) and np.all(zb["ZWARN"][objtype == ""] & (1 << 9))


def test_release_and_cli(tmp_path):
    paths = write_mock_release(tmp_path, {"bgs": 3, "qso": 5}, seed=0, spectra_per_file=3, progress=False)
    assert len(paths) == 2 * 3
    assert all(p.exists() for p in paths)
    assert {p.parts[-4] for p in paths} == {"bright", "dark"}
    ids = np.concatenate(
        [fits.getdata(p, "FIBERMAP")["TARGETID"] for p in paths if p.name.startswith("coadd")]
    )
    assert len(np.unique(ids)) == len(ids)
    assert mock.main(["--out", str(tmp_path / "cli"), "--n-per-class", "2", "--classes", "lrg"]) == 0
    assert len(list((tmp_path / "cli").rglob("coadd-sv3-dark-*.fits"))) == 1


def test_release_file_seed_regenerates_a_release_file(tmp_path):
    paths = write_mock_release(tmp_path, {"elg": 4}, seed=7, spectra_per_file=2, progress=False)
    coadds = sorted(p for p in paths if p.name.startswith("coadd"))

    def found(rows: np.ndarray, coadd: Path) -> bool:  # every row among the file's fibres (shuffled there)
        written = fits.getdata(coadd, "R_FLUX")
        return all(np.any(np.all(written == row, axis=1)) for row in rows)

    for k, coadd in enumerate(coadds):  # files on consecutive healpix pixels, in order
        assert found(generate_spectra("elg", 2, release_file_seed(7, "elg", k))["arms"]["r"]["flux"], coadd)
    assert not found(
        generate_spectra("elg", 2, release_file_seed(7, "elg", 1))["arms"]["r"]["flux"], coadds[0]
    )
    assert release_file_seed(7, "elg", 0) != release_file_seed(7, "elg", 0, family="bc03")


def test_plot_command(tmp_path):
    from specpt_hf.data import plots

    out = tmp_path / "fig.png"
    assert plots.main(["--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 50_000


def test_files_readable_by_project_reader(written):
    """The project's own DESI reader reads the mock back (3 non-target fibres dropped)."""
    desi = pytest.importorskip("specpt_hf.data.desi")
    _, coadd, _ = written
    records = list(desi.read_desi_spectra(Path(coadd)))
    assert len(records) == 6
    assert records[0]["flux"].shape == (7781,)
