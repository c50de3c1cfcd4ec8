"""Plot one target's p(z) and chi^2(z) from a catalog written by `specpt predict --save-pdf`.

    specpt predict coadd-sv3-dark-30010.fits --model runs/specpt-small-cpu/redshift/best --out cat.fits --save-pdf
    python examples/plot_pdf.py cat.fits --out pdf.png [--targetid N] [--truth redrock-sv3-dark-30010.fits]

Without --targetid the target whose p(z) is most multi-modal is shown: the largest p(z) mass outside
+-5 bins of its highest bin (among spectra with a chi^2 scan). --truth: a FITS file whose REDSHIFTS HDU holds the
true Z by TARGETID (a mock's redrock file).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from astropy.io import fits

from specpt_hf.evaluation import plot_redshift_pdf

WINDOW = 5  # bins either side of the peak counted as "the peak"


def mass_away_from_peak(pz: np.ndarray) -> np.ndarray:
    """p(z) mass more than WINDOW bins from each row's highest bin [rows]."""
    index = np.arange(pz.shape[1])
    far = np.abs(index[None] - pz.argmax(1)[:, None]) > WINDOW  # [rows, bins]
    return (pz * far).sum(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("catalog", type=Path, help="FITS catalog from `specpt predict --save-pdf`")
    parser.add_argument("--out", type=Path, required=True, help="PNG path")
    parser.add_argument("--targetid", type=int, help="target to plot (default: the most multi-modal p(z))")
    parser.add_argument("--truth", type=Path, help="FITS file with HDU REDSHIFTS (TARGETID, Z): the true z")
    args = parser.parse_args(argv)
    with fits.open(args.catalog) as hdul:
        if "PZ" not in hdul:
            parser.error(f"{args.catalog}: no PZ HDU (write the catalog with `specpt predict --save-pdf`)")
        catalog, pz, pz_z = hdul["REDSHIFTS"].data, hdul["PZ"].data["PZ"], hdul["PZ_Z"].data
        scan = hdul["CHI2SCAN"].data["CHI2SCAN"] if "CHI2SCAN" in hdul else None
        scan_z = hdul["CHI2SCAN_Z"].data if "CHI2SCAN" in hdul else None
    if args.targetid is None:
        row = int(np.argmax(mass_away_from_peak(pz)))
    else:
        rows = np.flatnonzero(catalog["TARGETID"] == args.targetid)
        if not len(rows):
            parser.error(f"{args.catalog}: no TARGETID {args.targetid}")
        row = int(rows[0])
    target = catalog[row]
    z_true = None
    if args.truth is not None:
        truth = fits.getdata(args.truth, "REDSHIFTS")
        match = np.flatnonzero(truth["TARGETID"] == target["TARGETID"])
        z_true = float(truth["Z"][match[0]]) if len(match) else None
    title = f"TARGETID {target['TARGETID']} ({target['SOURCE'].strip()})\nQUALITY {target['QUALITY']:.2f}"
    if "DELTACHI2" in catalog.names:
        title += f", SPECTYPE {target['SPECTYPE'].strip()}, DELTACHI2 {target['DELTACHI2']:.1f}"
    path = plot_redshift_pdf(
        pz_z,
        pz[row],
        args.out,
        scan_z=scan_z,
        chi2_scan=None if scan is None else scan[row],
        z=float(target["Z"]),
        z_net=float(target["Z_NET"]),
        z_true=z_true,
        title=title,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
