"""Milky Way Survey stars in the mock: physics, targeting bits, and the round trip through the readers."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from specpt_hf.data.desi import read_desi_spectra
from specpt_hf.data.mock import C_KMS, HARD_FLAGS, generate_spectra, write_mock_healpix, write_mock_release
from specpt_hf.data.mock import stars as mock_stars
from specpt_hf.data.redshifts import join_redshifts, read_redrock


@pytest.fixture(scope="module")
def stars():
    return generate_spectra("mws", 150, seed=2)


def _ew(wave: np.ndarray, flux: np.ndarray, centre: float, half: float = 30.0) -> float:
    """Equivalent width (Å) of the dip at `centre` against the median of the ±(half..2 half) sidebands."""
    side = (np.abs(wave - centre) > half) & (np.abs(wave - centre) < 2 * half)
    core = np.abs(wave - centre) <= half
    cont = np.median(flux[side])
    return float(np.sum((1.0 - flux[core] / cont) * np.gradient(wave)[core]))


def test_stars_are_stars_at_their_velocity(stars):
    truth = stars["truth"]
    assert set(truth["spectype"]) == {"STAR"} and set(truth["target_class"]) == {"mws"}
    np.testing.assert_allclose(truth["z"], truth["rv"] / C_KMS)
    assert np.all(np.abs(truth["rv"]) <= 500) and 30 < np.std(truth["rv"]) < 200
    assert set(truth["subtype"]) <= {"A", "B", "F", "G", "K", "M", "WD"} and len(set(truth["subtype"])) >= 4
    assert np.all([s[0] == t[0] or s == "WD" for s, t in zip(truth["subtype"], truth["sptype"], strict=True)])
    assert np.all((truth["mag_r"] > 15.9) & (truth["mag_r"] < 20.1))
    assert stars["program"] == "bright"
    assert not np.any(truth["hard"] & HARD_FLAGS["NO_LINES"])  # absorption-line objects: not a hard case
    assert np.median(truth["zerr"] * C_KMS) < 10.0  # km/s


def test_stellar_features_follow_type():
    wave = mock_stars._WAVE
    teff = np.array([3100.0, 9700.0, 4500.0, 4500.0, 14000.0])
    logg = np.array([5.0, 4.2, 2.0, 4.6, 8.0])
    spec = mock_stars.rest_spectra(teff, logg, np.zeros(5)).astype(float)
    m5, a0, k_giant, k_dwarf, wd = spec
    band = lambda s, lo, hi: s[(wave > lo) & (wave < hi)].mean()  # noqa: E731
    assert band(m5, 7126, 7135) / band(m5, 7042, 7046) < 0.6  # TiO5 of a mid-M dwarf (Reid et al. 1995)
    assert band(k_dwarf, 7126, 7135) / band(k_dwarf, 7042, 7046) > 0.95
    assert _ew(wave, a0, 4862.68) > 8.0 > _ew(wave, k_dwarf, 4862.68)  # Balmer maximum at A0
    assert _ew(wave, wd, 4862.68, 60.0) > 1.5 * _ew(wave, a0, 4862.68, 60.0)  # pressure-broadened DA
    assert _ew(wave, k_giant, 8544.44, 15.0) > _ew(wave, k_dwarf, 8544.44, 15.0)  # CaT gravity (Cenarro 2002)
    assert _ew(wave, k_dwarf, 8191.0, 20.0) > _ew(wave, k_giant, 8191.0, 20.0)  # Na I 8190 gravity
    types, letters = mock_stars.spectral_type(teff, logg)
    assert types.tolist() == ["M5V", "A0V", "K5III", "K5V", "DA"] and letters.tolist() == [
        "M",
        "A",
        "K",
        "K",
        "WD",
    ]


def test_star_file_round_trip(tmp_path):
    coadd, redrock = write_mock_healpix(tmp_path, "mws", 8, seed=4, healpix=26400)
    assert coadd.parts[-4] == "bright"
    truth = fits.getdata(coadd.parent / coadd.name.replace("coadd", "truth"), "TRUTH")
    fibermap = fits.getdata(coadd, "FIBERMAP")
    tgt = np.char.strip(fibermap["OBJTYPE"].astype(str)) == "TGT"
    assert np.all(fibermap["SV3_DESI_TARGET"][tgt] == 1 << 61) and np.all(fibermap["SV3_MWS_TARGET"][tgt] > 0)
    assert set(np.char.strip(fibermap["MORPHTYPE"][tgt].astype(str))) == {"PSF"}
    table = read_redrock(redrock)
    records = list(join_redshifts(read_desi_spectra(coadd), table))
    assert len(records) == 8
    by_id = {int(t): i for i, t in enumerate(truth["TARGETID"])}
    for record in records:
        i = by_id[record["targetid"]]
        assert record["spectype"] == "STAR" and record["target_class"] == "mws"
        assert record["z"] == pytest.approx(truth["RV"][i] / C_KMS, rel=1e-12)
        assert record["flux"].shape == (7781,)
    zb = fits.getdata(redrock, "REDSHIFTS")
    rows = {int(t): i for i, t in enumerate(zb["TARGETID"])}
    subtype = [zb["SUBTYPE"][rows[int(t)]].strip() for t in truth["TARGETID"]]
    assert subtype == [s.strip() for s in truth["SUBTYPE"]]


def test_stars_never_shift_other_classes(tmp_path):
    """Adding stars to a release leaves the other classes' files and random streams as they were."""
    alone = write_mock_release(tmp_path / "a", {"elg": 3}, seed=7, spectra_per_file=3, progress=False)
    mixed = write_mock_release(
        tmp_path / "b", {"elg": 3, "mws": 2}, seed=7, spectra_per_file=3, progress=False
    )
    for path in alone:
        twin = tmp_path / "b" / path.relative_to(tmp_path / "a")
        assert twin in mixed
        with fits.open(path) as a, fits.open(twin) as b:
            for ha, hb in zip(a, b, strict=True):
                if ha.data is not None:
                    assert np.array_equal(np.asarray(ha.data), np.asarray(hb.data))
    a, b = generate_spectra("mws", 5, seed=3), generate_spectra("mws", 5, seed=3)
    np.testing.assert_array_equal(a["flux"], b["flux"])
