"""Run Redrock (DESI's template fitter, `rrdesi`) on DESI coadd files and time it.

    python benchmarks/run_redrock.py COADD_OR_DIR... --templates runs/benchmarks/rrtemplates --out runs/redrock [--mp 2]
    python benchmarks/run_redrock.py --quick      # a tiny mock file, quick templates, a coarse redshift grid

Each coadd file gets its own `rrdesi` process (as in DESI's pipeline: one redrock file per coadd), with
`RR_TEMPLATE_DIR` set to the template folder (see `redrock_templates.py`) and BLAS / OpenMP / numba pinned
to one thread, so `--mp N` means N CPU cores. Output: `redrock-*.fits` per coadd, their REDSHIFTS rows in
one table (`redrock.ecsv`), and `redrock_timing.json`: wall time, CPU time (user + system of every rrdesi
process and its workers, from getrusage), CPU-core-seconds per spectrum and peak resident memory.
Redrock fits every fibre in a file, sky fibres included; "per spectrum" counts the rows it returns.

Needs the `bench` extra: `pip install -e .[bench]` and `pip install --no-deps desispec desitarget`.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.table import Table, vstack
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from redrock_templates import QUICK_SETTINGS, build_templates  # noqa: E402

from specpt_hf.atomic import atomic_write, atomic_write_json  # noqa: E402

REDSHIFT_COLUMNS = ("TARGETID", "Z", "ZERR", "ZWARN", "SPECTYPE", "DELTACHI2", "CHI2", "NPIXELS")
# Coarse redshift grids for --quick only (10x Redrock's default steps).
QUICK_ZSCAN = {"galaxy": "-0.005,1.7,3e-3", "qso": "0.05,4.0,5e-3"}
COMBINED_NAME = "redrock-combined.fits"
_RRDESI = "import sys; from redrock.external.desi import rrdesi; rrdesi(sys.argv[1:])"
_ONE_THREAD = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


class RedrockError(RuntimeError):
    """rrdesi failed on a file, or Redrock is not installed."""


def redrock_missing() -> str | None:
    """None when `rrdesi` can run here, else why not (a missing package)."""
    try:
        import redrock.external.desi  # noqa: F401
    except ImportError as err:
        return (
            f"redrock's DESI entry point cannot be imported ({err}); install it with `pip install -e .[bench]` "
            "and `pip install --no-deps desispec desitarget`"
        )
    return None


@dataclass
class RedrockRun:
    """What one benchmark run of Redrock produced and cost."""

    redshifts: Table  # REDSHIFTS rows of every file (REDSHIFT_COLUMNS)
    wall_seconds: float
    cpu_seconds: float  # user + system time of the rrdesi processes and their workers
    max_rss_mb: float  # largest resident set of any rrdesi process
    n_processes: int
    n_reused: int = 0  # spectra read back from an earlier run's outputs (not in the times)
    files: list[Path] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)

    @property
    def n_spectra(self) -> int:
        return len(self.redshifts)

    @property
    def n_timed(self) -> int:
        """Spectra fitted in this run (the times cover these)."""
        return self.n_spectra - self.n_reused

    @property
    def cpu_seconds_per_spectrum(self) -> float:
        return self.cpu_seconds / self.n_timed if self.n_timed else float("nan")

    @property
    def spectra_per_second(self) -> float:
        return self.n_timed / self.wall_seconds if self.n_timed and self.wall_seconds > 0 else float("nan")

    def summary(self) -> dict:
        return {
            "n_files": len(self.files),
            "n_spectra": self.n_spectra,
            "n_reused": self.n_reused,
            "n_processes": self.n_processes,
            "wall_seconds": self.wall_seconds,
            "cpu_seconds": self.cpu_seconds,
            "cpu_core_seconds_per_spectrum": self.cpu_seconds_per_spectrum,
            "spectra_per_second": self.spectra_per_second,
            "spectra_per_second_per_core": self.n_timed / self.cpu_seconds
            if self.cpu_seconds and self.n_timed
            else float("nan"),
            "max_rss_mb": self.max_rss_mb,
        }


def collect_coadds(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """coadd-*.fits files given directly or found (recursively) under folders, sorted."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(path.rglob("coadd-*.fits")))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such coadd file or folder: {path}")
    if not files:
        raise FileNotFoundError(f"no coadd-*.fits files in {[str(i) for i in inputs]}")
    return files


def output_name(coadd: Path) -> str:
    """`coadd-sv3-dark-26001.fits` -> `redrock-sv3-dark-26001.fits` (DESI's naming)."""
    name = coadd.name
    return "redrock-" + name[len("coadd-") :] if name.startswith("coadd-") else f"redrock-{name}"


def rrdesi_command(
    coadds: Sequence[Path],
    output: Path,
    n_processes: int,
    zscan: dict[str, str] | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line that runs `rrdesi` on `coadds` (one output file) with this interpreter."""
    cmd = [
        sys.executable,
        "-c",
        _RRDESI,
        "-i",
        *map(str, coadds),
        "-o",
        str(output),
        "--mp",
        str(n_processes),
    ]
    for kind, value in (zscan or {}).items():
        cmd.append(f"--zscan-{kind}={value}")  # "=": the value may start with "-"
    return cmd + list(extra)


def _environment(template_dir: Path) -> dict[str, str]:
    env = dict(os.environ, RR_TEMPLATE_DIR=str(template_dir))
    env.update(dict.fromkeys(_ONE_THREAD, "1"))
    return env


def log_path(output: Path) -> Path:
    """`redrock-X.fits` -> `rrdesi-X.log` next to it."""
    return output.with_name(f"rrdesi-{output.stem[len('redrock-') :]}.log")


def read_redshifts(path: Path) -> Table:
    """The REDSHIFTS HDU of a redrock file, REDSHIFT_COLUMNS only, SPECTYPE as plain str."""
    table = Table.read(path, hdu="REDSHIFTS")
    missing = [c for c in REDSHIFT_COLUMNS if c not in table.colnames]
    if missing:
        raise ValueError(f"{path}: REDSHIFTS HDU lacks column(s) {missing}")
    table = table[list(REDSHIFT_COLUMNS)]
    table["SPECTYPE"] = np.char.strip(np.asarray(table["SPECTYPE"]).astype(str))
    table.meta = {}
    return table


def run_redrock(
    coadds: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    template_dir: str | os.PathLike,
    n_processes: int = 1,
    zscan: dict[str, str] | None = None,
    extra_args: Sequence[str] = (),
    combined: bool = False,
    progress: bool = True,
    reuse: bool = False,
) -> RedrockRun:
    """Run `rrdesi` on each coadd (one process tree per file, `n_processes` workers); time the whole.

    Writes `redrock-*.fits` and `rrdesi-*.log` into `out_dir`; with `combined`, one rrdesi run fits
    all files into `redrock-combined.fits` (one start-up and template rebinning for all). With `reuse`, an
    output already in `out_dir` is read back instead of fitted again (resuming an interrupted run; the times
    cover only what this run fitted). Raises `RedrockError` when Redrock is missing or a run fails (with the end
    of its log), `FileNotFoundError` for a missing input.
    """
    if n_processes < 1:
        raise ValueError(f"n_processes must be >= 1, got {n_processes}")
    reason = redrock_missing()
    if reason:
        raise RedrockError(reason)
    template_dir = Path(template_dir)
    if not any(template_dir.glob("rrtemplate-*.fits")):
        raise FileNotFoundError(f"no rrtemplate-*.fits in template folder {template_dir}")
    files = [Path(p) for p in coadds]
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"coadd file not found: {path}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = _environment(template_dir)
    outputs, tables, reused = [], [], 0
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    groups = [(files, out / COMBINED_NAME)] if combined else [([f], out / output_name(f)) for f in files]
    for group, target in tqdm(groups, desc="redrock", unit="run", disable=not progress):
        if reuse and (earlier := _read_earlier(target)) is not None:
            outputs.append(target)
            tables.append(earlier)
            reused += len(earlier)
            continue
        log = log_path(target)
        with open(log, "w", encoding="utf-8") as handle:
            done = subprocess.run(
                rrdesi_command(group, target, n_processes, zscan, extra_args),
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if done.returncode != 0 or not target.is_file():
            tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-15:])
            raise RedrockError(
                f"rrdesi failed on {[str(g) for g in group]} (exit {done.returncode}); end of {log}:\n{tail}"
            )
        outputs.append(target)
        tables.append(read_redshifts(target))
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return RedrockRun(
        redshifts=vstack(tables, metadata_conflicts="silent"),
        wall_seconds=wall,
        cpu_seconds=cpu,
        max_rss_mb=after.ru_maxrss / 1024.0,  # Linux: KiB
        n_processes=n_processes,
        n_reused=reused,
        files=files,
        outputs=outputs,
    )


def _read_earlier(target: Path) -> Table | None:
    """An earlier run's complete output (None when missing or unreadable, e.g. cut off mid-write)."""
    try:
        return read_redshifts(target) if target.is_file() else None
    except (OSError, KeyError, ValueError):
        return None


def write_run(run: RedrockRun, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """`redrock.ecsv` (all REDSHIFTS rows) and `redrock_timing.json` in `out_dir`, written atomically."""
    out = Path(out_dir)
    table_path = atomic_write(
        out / "redrock.ecsv", lambda tmp: run.redshifts.write(tmp, format="ascii.ecsv", overwrite=True)
    )
    timing_path = atomic_write_json(
        out / "redrock_timing.json", {**run.summary(), "files": [str(p) for p in run.files]}
    )
    return table_path, timing_path


def quick_inputs(folder: Path, n_spectra: int = 3, seed: int = 424242) -> tuple[list[Path], Path]:
    """A one-file mock release (BGS) and quick templates under `folder`, for smoke tests."""
    from specpt_hf.data.mock import write_mock_healpix

    coadd, _ = write_mock_healpix(folder / "mock", "bgs", n_spectra, seed, n_sky=1, n_unassigned=0)
    templates = folder / "rrtemplates"
    build_templates(templates, **QUICK_SETTINGS)
    return [coadd], templates


def main(argv: list[str] | None = None) -> int:
    """Run Redrock on coadd files; write the redshift table and the timing."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("inputs", nargs="*", help="coadd files or folders holding them")
    parser.add_argument("--templates", type=Path, help="Redrock template folder (redrock_templates.py)")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--mp", type=int, default=1, help="rrdesi worker processes (= CPU cores)")
    parser.add_argument("--zscan-galaxy", help="zmin,zmax,dz of the GALAXY scan (default: Redrock's)")
    parser.add_argument("--zscan-qso", help="zmin,zmax,dz of the QSO scan (default: Redrock's)")
    parser.add_argument("--quick", action="store_true", help="a 3-spectrum mock file and a coarse z grid")
    args = parser.parse_args(argv)
    if args.mp < 1:
        parser.error("--mp must be >= 1")
    zscan = {k: v for k, v in (("galaxy", args.zscan_galaxy), ("qso", args.zscan_qso)) if v}
    with tempfile.TemporaryDirectory(prefix="specpt-redrock-") as tmp:
        if args.quick:
            files, templates = quick_inputs(Path(tmp))
            zscan = {**QUICK_ZSCAN, **zscan}
            out = args.out or Path(tmp) / "out"
        else:
            if not args.inputs or args.templates is None or args.out is None:
                parser.error("give coadd inputs, --templates and --out (or --quick)")
            files, templates, out = collect_coadds(args.inputs), args.templates, args.out
        try:
            run = run_redrock(files, out, templates, args.mp, zscan)
        except RedrockError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        table_path, timing_path = write_run(run, out)
        s = run.summary()
        print(
            f"{s['n_spectra']} spectra from {s['n_files']} files with {s['n_processes']} process(es): "
            f"{s['wall_seconds']:.1f} s wall, {s['cpu_seconds']:.1f} CPU s, "
            f"{s['cpu_core_seconds_per_spectrum']:.2f} CPU-core-s per spectrum, peak RSS {s['max_rss_mb']:.0f} MB"
        )
        print(f"redshifts: {table_path}\ntiming: {timing_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
