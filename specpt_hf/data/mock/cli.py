"""`specpt mock`: a DESI-format mock release from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..redshifts import EXTRAGALACTIC_CLASSES
from .populations import FAMILIES, MOCK_CLASSES, SPS_CLASSES, SPS_FAMILIES
from .writers import _SURVEY_PREFIX, write_mock_release


def main(argv: list[str] | None = None) -> int:
    """`specpt mock --out DIR --n-per-class 200 --seed 0`: write a DESI-format mock release."""
    parser = argparse.ArgumentParser(prog="specpt mock", description=main.__doc__)
    parser.add_argument("--out", required=True, type=Path, help="release root (healpix/ goes under it)")
    parser.add_argument("--n-per-class", type=int, default=200, help="spectra per target class")
    parser.add_argument(
        "--classes",
        nargs="+",
        default=None,
        choices=MOCK_CLASSES,
        help="default: bgs lrg elg qso (sps, bc03: bgs lrg elg)",
    )
    parser.add_argument(
        "--family",
        default="basis",
        choices=FAMILIES,
        help="galaxy physics: basis (default), sps (E-MILES, BPT) or bc03 (the same on BC03 populations)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spectra-per-file", type=int, default=500)
    parser.add_argument("--survey", default="sv3", choices=sorted(_SURVEY_PREFIX))
    args = parser.parse_args(argv)
    if args.n_per_class < 1:
        parser.error("--n-per-class must be positive")
    classes = args.classes or (SPS_CLASSES if args.family in SPS_FAMILIES else EXTRAGALACTIC_CLASSES)
    counts = dict.fromkeys(classes, args.n_per_class)
    try:
        paths = write_mock_release(
            args.out, counts, args.seed, args.spectra_per_file, args.survey, family=args.family
        )
    except (ValueError, ImportError, FileNotFoundError) as err:
        parser.error(str(err))
    print(f"wrote {len(paths)} files under {args.out}")
    return 0
