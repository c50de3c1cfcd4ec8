"""Parquet write rate of `specpt prepare`'s `ShardWriter` against `datasets` writing the same rows.

    python benchmarks/parquet_writers.py --out benchmarks/results/parquet_writers     # 2000 rows, 3 rounds
    python benchmarks/parquet_writers.py --out /tmp/pw --quick                         # seconds: a smoke test

Both write the same DESI-grid rows (7781-pixel flux, ivar, mask and the scalar columns, `desi_features`) to
snappy-compressed Parquet in row groups of 256, one row at a time as `prepare` hands them over:

* "ShardWriter": `specpt_hf.data.prepare.ShardWriter` (rows staged as Arrow columns, written by pyarrow);
* "datasets": `datasets.Dataset.from_generator(rows, features=...)` then `Dataset.to_parquet` (the library's
  own path: its Arrow cache first, then Parquet), the cache removed afterwards.

The two alternate for `--rounds` rounds in one process; the best round of each is the headline. Results:
`parquet_writers.json` and `.md` in --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from specpt_hf.atomic import atomic_write_text  # noqa: E402
from specpt_hf.data.builder import desi_features  # noqa: E402
from specpt_hf.data.prepare import ShardWriter  # noqa: E402

ROW_GROUP = 256


def make_rows(n: int, seed: int = 0) -> Callable[[], Iterator[dict[str, Any]]]:
    """A generator function over `n` random DESI-grid rows (the same rows on every call)."""
    rng = np.random.default_rng(seed)
    pixels = desi_features()["flux"].length
    flux = rng.normal(size=(n, pixels)).astype(np.float32)
    ivar = rng.uniform(0.5, 2.0, size=(n, pixels)).astype(np.float32)
    mask = rng.random((n, pixels)) < 0.01
    scalars = {"z": 0.5, "zerr": 1e-4, "zwarn": 0, "spectype": "GALAXY", "target_class": "bgs"}
    scalars |= {"survey": "sv3", "program": "dark", "healpix": 26065}

    def rows() -> Iterator[dict[str, Any]]:
        for i in range(n):
            yield {"targetid": i, "flux": flux[i], "ivar": ivar[i], "mask": mask[i], **scalars}

    return rows


def write_shardwriter(rows: Callable[[], Iterator[dict[str, Any]]], out: Path) -> None:
    writer = ShardWriter(
        out, desi_features(), shard_size=5000, row_group_size=ROW_GROUP, compression="snappy"
    )
    for row in rows():
        writer.add(row)
    writer.close()


def write_datasets(rows: Callable[[], Iterator[dict[str, Any]]], out: Path) -> None:
    cache = Path(tempfile.mkdtemp(prefix="hf-cache-"))
    try:
        dataset = datasets.Dataset.from_generator(rows, features=desi_features(), cache_dir=str(cache))
        out.mkdir(parents=True)
        dataset.to_parquet(str(out / "part-00000.parquet"), batch_size=ROW_GROUP)  # snappy by default
    finally:
        shutil.rmtree(cache, ignore_errors=True)


WRITERS = {"ShardWriter": write_shardwriter, "datasets": write_datasets}


def time_writers(n_rows: int, rounds: int) -> dict[str, dict[str, float]]:
    """Best and median rows/s and the Parquet size (MB) of each writer."""
    rows = make_rows(n_rows)
    rates: dict[str, list[float]] = {name: [] for name in WRITERS}
    sizes: dict[str, float] = {}
    datasets.disable_progress_bars()
    for _ in range(rounds):
        for name, write in WRITERS.items():
            out = Path(tempfile.mkdtemp(prefix="pw-")) / "train"
            start = time.perf_counter()
            write(rows, out)
            rates[name].append(n_rows / (time.perf_counter() - start))
            sizes[name] = sum(p.stat().st_size for p in out.rglob("*.parquet")) / 1e6
            shutil.rmtree(out.parent)
    return {
        name: {"best_rows_per_s": max(r), "median_rows_per_s": float(np.median(r)), "parquet_mb": sizes[name]}
        for name, r in rates.items()
    }


def markdown(results: dict[str, dict[str, float]], n_rows: int) -> str:
    lines = [
        f"# Parquet writers: {n_rows} DESI-grid rows, row groups of {ROW_GROUP}, snappy",
        "",
        "| writer | best rows/s | median rows/s | Parquet MB |",
        "| --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['best_rows_per_s']:.0f} | {r['median_rows_per_s']:.0f} | {r['parquet_mb']:.0f} |"
        )
    ratio = results["ShardWriter"]["best_rows_per_s"] / results["datasets"]["best_rows_per_s"]
    return "\n".join([*lines, "", f"ShardWriter / datasets: {ratio:.1f}x", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON and markdown results")
    parser.add_argument("--rows", type=int, default=2000, help="rows written per pass")
    parser.add_argument("--rounds", type=int, default=3, help="alternating passes per writer")
    parser.add_argument("--quick", action="store_true", help="200 rows, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.rounds = 200, 1
    if args.rows < 1 or args.rounds < 1:
        parser.error("--rows and --rounds must be >= 1")
    results = time_writers(args.rows, args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "parquet_writers.json", json.dumps({"rows": args.rows, **results}, indent=2))
    report = markdown(results, args.rows)
    atomic_write_text(args.out / "parquet_writers.md", report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
