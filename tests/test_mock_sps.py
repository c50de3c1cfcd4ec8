"""The sps and bc03 mock families: E-MILES and BC03 populations, star-formation histories, BPT line ratios, files and readers."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from specpt_hf.data import mock
from specpt_hf.data.desi import read_desi_spectra
from specpt_hf.data.mock import generate_spectra, write_mock_healpix
from specpt_hf.data.mock import sps as mock_sps
from specpt_hf.data.redshifts import join_redshifts, read_redrock


def _library_available() -> bool:
    try:
        mock_sps.emiles_library()
    except (ImportError, FileNotFoundError):
        return False
    return True


def _bc03_available() -> bool:
    try:
        mock_sps.bc03_file().stat()
    except (ImportError, FileNotFoundError):
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _library_available(), reason="E-MILES SSPs not installed (specpt-hf[sps])"
)
needs_bc03 = pytest.mark.skipif(not _bc03_available(), reason="BC03 SSPs not installed (specpt-hf[sps])")
LIBRARY_FAMILIES = ["sps", pytest.param("bc03", marks=needs_bc03)]


@pytest.fixture(scope="module")
def bgs():
    return generate_spectra("bgs", 160, seed=5, family="sps")


def test_library_units_and_grid():
    """150 E-MILES SSPs in L☉/Å per M☉ formed: M_V of the 10 Gyr solar SSP as the MILES mass table's 7.13."""
    wave, ages, mets, ssp = mock_sps.emiles_library()
    assert ssp.shape == (6, 25, len(wave)) and np.all(np.isfinite(ssp)) and np.all(ssp >= 0)
    assert ages[0] == pytest.approx(0.0631) and ages[-1] == pytest.approx(15.8489)
    np.testing.assert_allclose(mets, mock_sps.EMILES_METALLICITIES)
    v = (wave > 5060) & (wave < 5900)
    flux_10pc = (
        float(ssp[4, np.argmin(np.abs(ages - 10.0)), v].mean()) * mock_sps.L_SUN / (4 * np.pi * 3.0857e19**2)
    )
    assert -2.5 * np.log10(flux_10pc / 3.63e-9) == pytest.approx(7.127, abs=0.1)
    young = mock_sps.young_bin_spectra()
    uv, red = np.searchsorted(wave, 2000.0), np.searchsorted(wave, 8000.0)
    assert young[4, uv] / ssp[4, 0, uv] > young[4, red] / ssp[4, 0, red] > 1.0  # younger stars: bluer


@needs_bc03
def test_bc03_library_units_and_grid():
    """BC03 (Chabrier IMF) in L☉/Å per M☉ formed: the 9 Gyr solar SSP has M_V ≈ 6.8, brighter per M☉ formed
    than E-MILES's unimodal-IMF 7.13; 7 metallicities, ages 5 Myr-14 Gyr every 0.1 dex."""
    wave, ages, mets, ssp = mock_sps.bc03_library()
    assert ssp.shape == (7, len(ages), len(wave)) and np.all(np.isfinite(ssp)) and np.all(ssp >= 0)
    assert ages[0] == pytest.approx(0.005, rel=0.01) and 14.0 < ages[-1] <= mock_sps.BC03_AGE_RANGE[1]
    np.testing.assert_allclose(np.diff(np.log10(ages)), 0.1, atol=0.02)
    np.testing.assert_allclose(mets, np.log10([0.005, 0.02, 0.2, 0.4, 1.0, 2.5, 5.0]))
    v = (wave > 5060) & (wave < 5900)
    flux_10pc = (
        float(ssp[4, np.argmin(np.abs(ages - 9.0)), v].mean()) * mock_sps.L_SUN / (4 * np.pi * 3.0857e19**2)
    )
    assert 6.5 < -2.5 * np.log10(flux_10pc / 3.63e-9) < 7.1


def test_bc03_library_names_a_bad_file(tmp_path, monkeypatch):
    path = tmp_path / "grid.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros(3), name="WAVELENGTHS_AA")]).writeto(path)
    with pytest.raises(ValueError, match="grid.fits: not a BC03 grid"):
        mock_sps.bc03_library.__wrapped__(str(path))
    monkeypatch.setenv("SPECPT_BC03_FILE", str(path))
    assert mock_sps.bc03_file() == path
    with pytest.raises(ImportError, match=r"specpt-hf\[sps\].*SPECPT_NO_SUCH_FILE"):
        mock_sps._shipped_file("SPECPT_NO_SUCH_FILE", "no_such_package_xyz", "grid.fits", "a grid")
    with pytest.raises(ValueError, match="library must be one of"):
        mock_sps.ssp_library("fsps")


@pytest.mark.parametrize("library", ["emiles", pytest.param("bc03", marks=needs_bc03)])
def test_library_on_vacuum_wavelengths(library):
    """MILES is in air: Ca II K and H of the 10 Gyr solar SSP lie at their vacuum wavelengths (1.1 Å redder)."""
    wave, ages, mets, ssp = mock_sps.ssp_library(library)
    flux = ssp[int(np.argmin(np.abs(mets))), np.argmin(np.abs(ages - 10.0))]
    for air, vacuum in ((3933.663, 3934.777), (3968.468, 3969.591)):  # NIST ASD
        i = int(np.argmin(np.where(np.abs(wave - air) < 3.0, flux, np.inf)))
        y = flux[i - 1 : i + 2].astype(np.float64)
        centre = wave[i] + 0.5 * (y[0] - y[2]) / (y[0] - 2 * y[1] + y[2]) * (wave[i + 1] - wave[i])
        assert abs(centre - vacuum) < 0.3 < abs(centre - air)


def test_star_formation_histories():
    ages = mock_sps.emiles_library()[1]
    sfh = {
        "onset": np.array([2.0, 8.0]),
        "tau": np.array([1e4, 0.5]),
        "psb": np.array([False, True]),
        "burst_age": np.array([0.0, 0.5]),
        "burst_frac": np.array([0.0, 0.3]),
    }
    mass, sfr0 = mock_sps.mass_in_age_bins(sfh, ages)
    np.testing.assert_allclose(mass.sum(axis=1), 1.0)
    assert sfr0[0] == pytest.approx(2.0 / 2.0 * 1e-9, rel=0.02)  # SFR ∝ t: SFR(now) = 2/T per M☉
    assert sfr0[1] == 0.0 and mass[1, ages < 0.4].sum() == 0.0  # quenched after the burst
    assert mass[1, (ages > 0.45) & (ages < 0.7)].sum() == pytest.approx(0.3, abs=0.05)


def test_bpt_kinds_and_line_ratios(bgs):
    t = bgs["truth"]
    kinds = t["kind"]
    assert set(kinds) <= set(mock_sps.KINDS) and {"sf", "passive", "liner"} <= set(kinds)
    n2, o3 = t["log_n2"], t["log_o3"]
    sf, comp = kinds == "sf", kinds == "composite"
    sey, lin = kinds == "seyfert", kinds == "liner"
    assert np.all(o3[sf] < mock_sps.kauffmann03(n2[sf]))
    assert np.all((o3[comp] > mock_sps.kauffmann03(n2[comp])) & (o3[comp] < mock_sps.kewley01(n2[comp])))
    agn = sey | lin
    assert np.all(o3[agn] > mock_sps.kewley01(n2[agn]))
    assert np.all(o3[sey] > mock_sps.schawinski07(n2[sey])) and np.all(
        o3[lin] < mock_sps.schawinski07(n2[lin])
    )
    assert np.all((n2[sf] > -1.6) & (n2[sf] < -0.2))  # Maiolino et al. (2008) N2 over 12+log(O/H) 8.4-8.9
    assert np.all(np.isnan(n2[kinds == "passive"]))
    # observed fluxes carry the same ratios (dust changes [N II]/Hα by < 0.01 dex) and a Balmer decrement
    lines = t["flux_Halpha"] > 0
    np.testing.assert_allclose(
        np.log10(t["flux_NII_6585"][lines] / t["flux_Halpha"][lines]), n2[lines], atol=0.01
    )
    decrement = t["flux_Halpha"][lines] / t["flux_Hbeta"][lines]
    assert np.all(decrement >= 2.86 * (1 - 1e-6))
    assert np.all(t["ew_halpha"][sf] > 3.0) and np.all(t["ew_halpha"][kinds == "passive"] == 0.0)


def test_stellar_populations_by_kind(bgs):
    t = bgs["truth"]
    kinds = t["kind"]
    assert np.median(t["d4000n"][kinds == "passive"]) > 1.7 > 1.4 > np.median(t["d4000n"][kinds == "sf"])
    psb = kinds == "psb"
    if psb.any():  # E+A: strong Balmer absorption (Goto 2007: EW(Hδ) > 5 Å)
        assert np.median(t["hdelta_a"][psb]) > 4.0 > np.median(t["hdelta_a"][kinds == "passive"])
    assert np.all(t["age_mass"] > 0) and np.all(t["age_onset"] <= 13.8)


def test_family_is_a_separate_stream():
    sps, basis = generate_spectra("elg", 20, seed=1, family="sps"), generate_spectra("elg", 20, seed=1)
    assert not np.allclose(sps["truth"]["z"], basis["truth"]["z"])
    assert "weight_old" in basis["truth"] and "weight_old" not in sps["truth"]
    np.testing.assert_array_equal(generate_spectra("elg", 20, seed=1, family="sps")["flux"], sps["flux"])
    low = (sps["truth"]["hard"] & mock.HARD_FLAGS["LOW_SNR"]) != 0
    assert low.mean() < 0.7  # the same DESI ELG populations: [O II]-driven, some fail
    with pytest.raises(ValueError, match="sps family"):
        generate_spectra("qso", 3, seed=0, family="sps")
    with pytest.raises(ValueError, match="family"):
        generate_spectra("elg", 3, seed=0, family="fsps")


@pytest.mark.parametrize("family", LIBRARY_FAMILIES)
def test_sps_files_through_the_readers(tmp_path, family):
    coadd, redrock = write_mock_healpix(tmp_path, "lrg", 5, seed=3, healpix=26500, family=family)
    assert fits.getheader(coadd, 0)["MOCKFAM"] == family
    truth = fits.getdata(coadd.parent / coadd.name.replace("coadd", "truth"), "TRUTH")
    assert set(truth["FAMILY"]) == {family} and "KIND" in truth.names and "D4000N" in truth.names
    release = {"sps": 9011, "bc03": 9012}[family]
    assert np.all((truth["TARGETID"] >> 42) & 0xFFFF == release)  # RELEASE field: never a basis TARGETID
    records = list(join_redshifts(read_desi_spectra(coadd), read_redrock(redrock)))
    z = dict(zip(truth["TARGETID"].tolist(), truth["Z"].tolist(), strict=True))
    assert len(records) == 5
    for r in records:
        assert r["target_class"] == "lrg" and r["spectype"] == "GALAXY" and r["z"] == z[r["targetid"]]
    assert (
        mock.main(
            ["--out", str(tmp_path / "cli"), "--n-per-class", "2", "--family", family, "--classes", "elg"]
        )
        == 0
    )
    assert len(list((tmp_path / "cli").rglob("coadd-*.fits"))) == 1
    with pytest.raises(SystemExit):
        mock.main(["--out", str(tmp_path / "bad"), "--family", family, "--classes", "qso"])


@needs_bc03
def test_bc03_continua_differ_from_emiles_at_equal_populations():
    """The same star-formation history and metallicity on the two libraries: close in shape (both MILES stars
    over 3540-7350 Å), not the same spectrum."""
    ages = {lib: mock_sps.ssp_library(lib)[1] for lib in mock_sps.SSP_LIBRARIES}
    sfh = {
        "onset": np.array([10.0]),
        "tau": np.array([0.5]),
        "psb": np.array([False]),
        "burst_age": np.array([0.0]),
        "burst_frac": np.array([0.0]),
    }
    wave = mock_sps.ssp_library("emiles")[0]
    optical = (wave > 4000) & (wave < 7000)
    flux = {}
    for lib in mock_sps.SSP_LIBRARIES:
        mass, _ = mock_sps.mass_in_age_bins(sfh, ages[lib])
        f = mock_sps.stellar_continuum(mass, np.array([0.0]), np.array([150.0]), lib)[0]
        flux[lib] = f / np.median(f[optical])
    ratio = flux["bc03"][optical] / flux["emiles"][optical]
    assert ratio.min() > 0.8 and ratio.max() < 1.25 and np.std(ratio) > 0.005


def test_halpha_follows_the_star_formation_rate_in_each_library_imf():
    """Star-formers' Hα per unit SFR is Kennicutt's (Salpeter-like E-MILES) or Kennicutt & Evans's (Kroupa,
    for BC03's Chabrier IMF): the same draws give lines 10^41.27 / 1.26e41 times brighter on BC03."""
    p = {
        "z": np.full(6, 0.8),
        "oii_ratio": np.full(6, 1.4),
        "sii_ratio": np.full(6, 1.3),
        "sigma_gas": np.full(6, 60.0),
    }
    kind = np.array(["sf"] * 6)
    bare = np.ones((6, len(mock_sps.ssp_library("emiles")[0])), dtype=np.float32)
    sfr0, oh = np.full(6, 1e-10), np.full(6, 8.6)
    halpha = {
        lib: mock_sps._emission_lines(np.random.default_rng(3), p, kind, bare, sfr0, oh, lib)["ew_halpha"]
        for lib in mock_sps.SSP_LIBRARIES
    }
    np.testing.assert_allclose(halpha["bc03"] / halpha["emiles"], 10**41.27 / 1.26e41, rtol=1e-6)
