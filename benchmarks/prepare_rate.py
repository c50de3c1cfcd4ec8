"""Preparation rate (spectra/s) of `specpt prepare` against the raw rate of reading the FITS arms.

    python benchmarks/prepare_rate.py                    # the real DESI files from specutils, copied
    python benchmarks/prepare_rate.py --rows-per-file 500   # the same rows tiled to coadd-sized files
    python benchmarks/prepare_rate.py DIR_OR_FILES...    # your own coadd (+ redrock) files
    python benchmarks/prepare_rate.py --quick

"raw" opens each file with astropy and reads the b, r, z WAVELENGTH, FLUX, IVAR and MASK HDUs, nothing
else. "prepare" is `prepare_dataset`: read, merge the arms, select fibers, join redshifts, write
Parquet. Both run on a warm page cache (one untimed read first) and count input fibers.
"""

from __future__ import annotations

import argparse
import importlib.resources
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from specpt_hf.data.builder import collect_spectra_files
from specpt_hf.data.desi import DESI_ARMS
from specpt_hf.data.prepare import prepare_dataset

REAL_FILES = ("coadd-sv3-dark-26065.fits", "coadd-5-169-thru20210419.fits")


def real_data_dir() -> Path:
    return Path(str(importlib.resources.files("specutils") / "io/default_loaders/tests/desi_test_data"))


def _tiled(hdul: fits.HDUList, n_rows: int) -> fits.HDUList:
    """The file's fibers repeated to `n_rows` rows, TARGETIDs made unique."""
    fibermap = hdul["FIBERMAP"].data
    reps = int(np.ceil(n_rows / len(fibermap)))
    table = Table(np.tile(np.asarray(fibermap), reps)[:n_rows])
    copy = np.arange(n_rows) // len(fibermap)
    ids = np.asarray(table["TARGETID"], dtype=np.int64)
    table["TARGETID"] = np.where(ids > 0, ids + copy * 10_000_000, ids - copy * 10_000_000)
    out = [fits.PrimaryHDU(header=hdul[0].header), fits.BinTableHDU(table, name="FIBERMAP")]
    for arm in DESI_ARMS:
        prefix = arm.upper()
        out.append(fits.ImageHDU(hdul[f"{prefix}_WAVELENGTH"].data, name=f"{prefix}_WAVELENGTH"))
        for kind in ("FLUX", "IVAR", "MASK", "RESOLUTION"):
            data = hdul[f"{prefix}_{kind}"].data
            out.append(fits.ImageHDU(np.resize(data, (n_rows, *data.shape[1:])), name=f"{prefix}_{kind}"))
    return fits.HDUList(out)


def write_redrock(coadd: Path) -> None:
    """A Redrock-format file for a coadd (labels are placeholders: Z 0.5, ZWARN 0, DELTACHI2 100)."""
    with fits.open(coadd) as hdul:
        fibermap = hdul["FIBERMAP"].data
        n = len(fibermap)
        redshifts = Table(
            {
                "TARGETID": np.asarray(fibermap["TARGETID"], dtype=np.int64),
                "Z": np.full(n, 0.5),
                "ZERR": np.full(n, 1e-4),
                "ZWARN": np.zeros(n, dtype=np.int64),
                "SPECTYPE": np.full(n, "GALAXY"),
                "DELTACHI2": np.full(n, 100.0),
            }
        )
        out = fits.HDUList(
            [
                fits.PrimaryHDU(header=hdul[0].header),
                fits.BinTableHDU(redshifts, name="REDSHIFTS"),
                fits.BinTableHDU(fibermap, name="FIBERMAP"),
            ]
        )
        out.writeto(coadd.with_name(coadd.name.replace("coadd-", "redrock-", 1)), overwrite=True)


def make_inputs(folder: Path, copies: int, rows_per_file: int) -> list[Path]:
    """Copies of the real files (optionally tiled to `rows_per_file` fibers) with Redrock files."""
    files = []
    for copy in range(copies):
        names = (f"coadd-sv3-dark-{26065 + copy}.fits", f"coadd-5-{169 + copy}-thru20210419.fits")
        for name, target_name in zip(REAL_FILES, names, strict=True):
            target = folder / target_name
            if rows_per_file:
                with fits.open(real_data_dir() / name) as hdul:
                    _tiled(hdul, rows_per_file).writeto(target)
            else:
                shutil.copy(real_data_dir() / name, target)
            write_redrock(target)
            files.append(target)
    return files


def raw_read(files: list[Path]) -> int:
    """Read every arm's WAVELENGTH, FLUX, IVAR and MASK with astropy; return the number of fibers."""
    fibers = 0
    for path in files:
        with fits.open(path, memmap=False) as hdul:
            for arm in DESI_ARMS:
                for kind in ("WAVELENGTH", "FLUX", "IVAR", "MASK"):
                    data = hdul[f"{arm.upper()}_{kind}"].data
            fibers += data.shape[0]
    return fibers


def best_time(function, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "inputs", nargs="*", help="coadd files or folders (default: the specutils DESI files)"
    )
    parser.add_argument("--catalog", help="redshift catalog for your own files (else redrock-* side by side)")
    parser.add_argument("--copies", type=int, default=4, help="copies of each real file (default input)")
    parser.add_argument("--rows-per-file", type=int, default=0, help="tile the real fibers to this many rows")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the best is reported")
    parser.add_argument("--quick", action="store_true", help="one copy, one run")
    args = parser.parse_args(argv)
    if args.quick:
        args.copies, args.repeat = 1, 1
    with tempfile.TemporaryDirectory(prefix="specpt-bench-") as tmp:
        tmp = Path(tmp)
        if args.inputs:
            files = collect_spectra_files(args.inputs)
        else:
            (tmp / "in").mkdir()
            files = make_inputs(tmp / "in", args.copies, args.rows_per_file)
        raw_read(files)  # warm the page cache
        raw_seconds, fibers = best_time(lambda: raw_read(files), args.repeat)

        def prepare():
            return prepare_dataset(files, tmp / "out", catalog=args.catalog, overwrite=True, progress=False)

        prep_seconds, summary = best_time(prepare, args.repeat)
    written = summary.total_rows
    rows = [
        ("raw FITS read (astropy: b/r/z wave, flux, ivar, mask)", raw_seconds, fibers / raw_seconds),
        ("prepare (read + merge + select + join + Parquet)", prep_seconds, fibers / prep_seconds),
    ]
    print(f"{len(files)} files, {fibers} fibers, {written} spectra written, best of {args.repeat}\n")
    print(f"| {'step':<56} | {'seconds':>8} | {'fibers/s':>9} |")
    print(f"| {'-' * 56} | {'-' * 8} | {'-' * 9} |")
    for name, seconds, rate in rows:
        print(f"| {name:<56} | {seconds:>8.3f} | {rate:>9.0f} |")
    print(
        f"\nprepare / raw rate: {rows[1][2] / rows[0][2]:.2f}  (written spectra/s: {written / prep_seconds:.0f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
