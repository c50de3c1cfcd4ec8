"""DESI-like mock spectra from physical ingredients, written as real DESI coadd and redrock files.

The physics, in rest-frame vacuum Å and 1e-17 erg/s/cm²/Å:

* galaxy continua: a three-component stellar-population basis (old, A-star-dominated, young) with the
  4000 Å break, Balmer jump and absorption lines (Ca II H&K, G band, Mg b, Fe, Na D, Balmer series,
  Ca triplet), Calzetti (2000) dust;
* nebular emission at vacuum wavelengths with Case-B and atomic-physics ratios;
* quasars: a broken power law with broad lines (Vanden Berk et al. 2001), broad absorption lines in
  ~12 %, and a log-normal Lyα forest matched to the measured mean transmission;
* the DESI line-spread function per arm (written as RESOLUTION), and noise whose wavelength structure
  is that of real DESI coadds: the tables of `noise` were measured on the inverse variances of the real
  Fuji files shipped with specutils (see `noise_shape_from_desi_files`), and the lines they contain
  are the airglow lines ([O I] 5578.9, Na D 5891.6/5897.6, [O I] 6302.0, OH bands, the Hg 4359.6
  light-pollution line, the telluric A band at 7600 Å);
* magnitude, redshift and S/N distributions of the four DESI dark/bright target classes;
* Milky Way Survey stars (class `mws`, SPECTYPE STAR at Z = v/c; `stars`);
* a second galaxy family, `family="sps"` (E-MILES stellar populations, star-formation histories, Charlot &
  Fall dust, BPT line ratios with AGN and post-starbursts; `sps`), and a third, `family="bc03"`, the same
  physics on BC03 populations, to hold out of training; the default family is `basis`.

The modules, in the order a spectrum passes through them:

* `populations`: redshifts, magnitudes and line strengths per target class (`DRAWERS`);
* `physics`: line lists, the stellar basis, dust, continua, emission lines, forest and BAL troughs;
  `stars` and `sps` bring their own rest-frame spectra and lines;
* `noise`: the sky-limited variance per pixel, measured on real DESI coadds;
* `render`: `generate_spectra`, the spectra on an instrument's arms with noise, and their truth;
  `rest_frame_models`, the same objects' noiseless rest-frame spectra (template shapes);
* `writers`: `write_mock_healpix` / `write_mock_release`, the DESI-format files (`release_file_seed`: which
  `generate_spectra` seed made a release's file);
* `cli`: `specpt mock`, the command line (also `python -m specpt_hf.data.mock`).

`generate_spectra` returns arrays for any `Instrument`; everything listed here is importable from
`specpt_hf.data.mock`.
"""

from __future__ import annotations

from .cli import main
from .noise import (
    EFFTIME,
    FIBER_AREA_ARCSEC2,
    VAR_REF_1000S,
    noise_shape_from_desi_files,
    sky_variance_shape,
    strong_sky_lines,
)
from .physics import (
    ABSORPTION,
    BAL_LINES,
    BANDS,
    C_AA_PER_S,
    C_KMS,
    CASE_B,
    NEBULAR_LINES,
    QSO_LINES,
    ab_to_flambda,
    calzetti_k,
    d4000n,
    nanomaggies,
    rest_templates,
)
from .populations import DRAWERS, FAMILIES, MOCK_CLASSES, SPS_CLASSES, SPS_FAMILIES
from .render import (
    DELTACHI2_CUT,
    HARD_FLAGS,
    ZWARN_NODATA,
    ZWARN_SKY,
    ZWARN_SMALL_DELTA_CHI2,
    generate_spectra,
    rest_frame_models,
)
from .writers import (
    healpix_dir,
    healpix_nest_centre,
    release_file_seed,
    write_mock_healpix,
    write_mock_release,
)

__all__ = [
    "ABSORPTION",
    "BAL_LINES",
    "BANDS",
    "CASE_B",
    "C_AA_PER_S",
    "C_KMS",
    "DELTACHI2_CUT",
    "DRAWERS",
    "EFFTIME",
    "FAMILIES",
    "FIBER_AREA_ARCSEC2",
    "HARD_FLAGS",
    "MOCK_CLASSES",
    "NEBULAR_LINES",
    "QSO_LINES",
    "SPS_CLASSES",
    "SPS_FAMILIES",
    "VAR_REF_1000S",
    "ZWARN_NODATA",
    "ZWARN_SKY",
    "ZWARN_SMALL_DELTA_CHI2",
    "ab_to_flambda",
    "calzetti_k",
    "d4000n",
    "generate_spectra",
    "healpix_dir",
    "healpix_nest_centre",
    "main",
    "nanomaggies",
    "noise_shape_from_desi_files",
    "release_file_seed",
    "rest_frame_models",
    "rest_templates",
    "sky_variance_shape",
    "strong_sky_lines",
    "write_mock_healpix",
    "write_mock_release",
]
