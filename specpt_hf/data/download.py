"""Resumable downloader for the public DESI EDR healpix layout.

Files are fetched from `{base_url}/healpix/{survey}/{program}/{healpix//100}/{healpix}/` into the same
layout under a local folder. Every file is written to `NAME.part` first and moved to its final name with
`os.replace` only once its size matches what the server announced, so a file under its final name is
always complete; an interrupted `.part` is resumed with an HTTP Range request on the next attempt.
Retries follow one urllib3 `Retry` policy (`retry_policy`).

Example:

    specpt download --healpix sv3/dark/26065 sv3/bright/26065 --out data/edr
    specpt download --catalog zpix-sv3-dark.fits --good-targets --out data/edr --workers 4
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
from astropy.io import fits
from astropy.table import Table
from requests.adapters import HTTPAdapter
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from urllib3.exceptions import ReadTimeoutError
from urllib3.util import Retry

from ..atomic import make_folder

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://data.desi.lbl.gov/public/edr/spectro/redux/fuji"
BASE_URL_ENV = "SPECPT_DESI_URL"
DEFAULT_KINDS: tuple[str, ...] = ("coadd", "redrock")
# file kinds that sit side by side in a healpix directory under the name `{kind}-{survey}-{program}-{hpx}.fits`
KNOWN_KINDS: tuple[str, ...] = ("coadd", "redrock", "emline", "qso_qn", "qso_mgii")
N_HEALPIX_NSIDE64 = 12 * 64**2
CHUNK_SIZE = 1 << 16  # bytes per write; a dropped connection loses at most the chunk in flight
RETRY_STATUSES = (429, 500, 502, 503, 504)  # answers worth asking again after a pause
_NAME_RE = re.compile(r"^[a-z0-9]+$")
_CONTENT_RANGE_RE = re.compile(r"^bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)$")

Triple = tuple[str, str, int]
TableCut = Callable[[Table], np.ndarray]


class DownloadError(OSError):
    """A file could not be downloaded."""


class ServerUnreachableError(DownloadError):
    """The server refused the connection or could not be reached (the whole run stops)."""


class SizeMismatchError(DownloadError):
    """The bytes received do not match the size the server announced."""


class RemoteNotFoundError(DownloadError, FileNotFoundError):
    """The server answered 404 for one file."""


class _Transient(Exception):
    """A transfer that broke off, or a partial file the server disagrees with: resumed or restarted."""


@dataclass
class DownloadReport:
    """What a download run did.

    Attributes:
        downloaded (`list[Path]`): files fetched in this run.
        skipped (`list[Path]`): files already complete locally (not contacted).
        missing (`list[str]`): URLs the server answered with 404.
        failed (`dict[str, str]`): URL -> reason, for files that failed after the retries.
        n_bytes (`int`): bytes received in this run.
    """

    downloaded: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    n_bytes: int = 0

    @property
    def ok(self) -> bool:
        """True when every requested file is present locally."""
        return not self.missing and not self.failed

    def summary(self) -> str:
        return (
            f"{len(self.downloaded)} downloaded ({self.n_bytes / 1e6:.1f} MB), {len(self.skipped)} already "
            f"complete, {len(self.missing)} not found (404), {len(self.failed)} failed"
        )


# ----------------------------------------------------------------------------- layout


def resolve_base_url(base_url: str | None = None) -> str:
    """`base_url`, else `$SPECPT_DESI_URL`, else the public EDR (fuji) root; without a trailing slash."""
    url = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    return url.rstrip("/")


def _check_triple(survey: str, program: str, healpix: int) -> Triple:
    for name, value in (("survey", survey), ("program", program)):
        if not isinstance(value, str) or not _NAME_RE.match(value):
            raise ValueError(f"{name} must be a lower-case name such as 'sv3' or 'dark', got {value!r}")
    try:
        hpx = int(healpix)
    except (TypeError, ValueError):
        hpx = -1
    if hpx != healpix or not 0 <= hpx < N_HEALPIX_NSIDE64:
        raise ValueError(f"healpix must be an nside-64 pixel in [0, {N_HEALPIX_NSIDE64}), got {healpix!r}")
    return survey, program, hpx


def _check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = (kinds,)
    unknown = [k for k in kinds if k not in KNOWN_KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KNOWN_KINDS}, got {tuple(kinds)!r}")
    return tuple(kinds)


def edr_relpath(survey: str, program: str, healpix: int, kind: str = "coadd") -> str:
    """Path of one file relative to the release root, e.g. `healpix/sv3/dark/260/26065/coadd-sv3-dark-26065.fits`."""
    survey, program, hpx = _check_triple(survey, program, healpix)
    (kind,) = _check_kinds((kind,))
    return f"healpix/{survey}/{program}/{hpx // 100}/{hpx}/{kind}-{survey}-{program}-{hpx}.fits"


def edr_file_urls(
    survey: str,
    program: str,
    healpix: int,
    kinds: Sequence[str] = DEFAULT_KINDS,
    base_url: str | None = None,
) -> dict[str, str]:
    """URLs of the `kinds` files of one healpix, as `{kind: url}`; `base_url` defaults as in `resolve_base_url`."""
    root = resolve_base_url(base_url)
    return {kind: f"{root}/{edr_relpath(survey, program, healpix, kind)}" for kind in _check_kinds(kinds)}


def parse_healpix_spec(spec: str) -> Triple:
    """Parse `SURVEY/PROGRAM/HEALPIX` (e.g. `sv3/dark/26065`)."""
    parts = spec.strip().split("/")
    if len(parts) != 3 or not parts[2].isdigit():
        raise ValueError(f"expected SURVEY/PROGRAM/HEALPIX such as 'sv3/dark/26065', got {spec!r}")
    return _check_triple(parts[0].lower(), parts[1].lower(), int(parts[2]))


# ----------------------------------------------------------------------------- one file


def _parse_content_range(value: str | None, url: str) -> tuple[int | None, int | None]:
    """`bytes START-END/TOTAL` -> (START, TOTAL); `*` parts give None."""
    match = _CONTENT_RANGE_RE.match((value or "").strip())
    if not match:
        raise _Transient(f"unparsable Content-Range {value!r} from {url}")
    start = int(match.group(1)) if match.group(1) is not None else None
    total = None if match.group(3) == "*" else int(match.group(3))
    return start, total


def _int_header(response: requests.Response, name: str) -> int | None:
    value = response.headers.get(name)
    return int(value) if value is not None and value.strip().isdigit() else None


class _Progress:
    """Thread-safe byte counter feeding a tqdm bar whose total grows as sizes become known."""

    def __init__(self, bar: tqdm) -> None:
        self.bar, self.lock, self.n_bytes = bar, threading.Lock(), 0

    def expect(self, n: int) -> None:
        with self.lock:
            self.bar.total = (self.bar.total or 0) + n
            self.bar.refresh()

    def add(self, n: int) -> None:
        with self.lock:
            self.n_bytes += n
            self.bar.update(n)


def retry_policy(retries: int, backoff: float) -> Retry:
    """At most `retries` retries of a request (refused or dropped connection, no answer within the timeout,
    an answer in `RETRY_STATUSES`) or of a transfer; the n-th waits `backoff * 2**(n - 1)` s (none for the
    first) or as long as the server's Retry-After asks."""
    return Retry(
        total=retries, status_forcelist=RETRY_STATUSES, backoff_factor=backoff, raise_on_status=False
    )


def _open(session: requests.Session, url: str, offset: int, timeout: float) -> requests.Response:
    """GET `url` from byte `offset` (the session's adapter retries as its policy says)."""
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = session.get(url, headers=headers, stream=True, timeout=timeout)
    except (requests.ReadTimeout, requests.ConnectionError) as err:
        if _no_answer(err):
            raise DownloadError(f"no answer from {url} within {timeout} s") from err
        raise ServerUnreachableError(f"cannot reach {url}: {err}") from err  # refused, unresolved, ...
    status = response.status_code
    if status == 404:
        response.close()
        raise RemoteNotFoundError(f"not found (HTTP 404): {url}")
    if status not in (200, 206, 416):  # RETRY_STATUSES land here once the retries are spent
        response.close()
        raise DownloadError(f"HTTP {status} {response.reason} from {url}")
    return response


def _no_answer(err: requests.RequestException) -> bool:
    """Whether the server was reached but did not answer in time (the last retry's reason, if retried)."""
    reason = getattr(err.args[0], "reason", None) if err.args else None
    return isinstance(err, requests.ReadTimeout) or isinstance(reason, ReadTimeoutError)


def _transfer_once(
    session: requests.Session, url: str, dest: Path, timeout: float, progress: _Progress
) -> None:
    """One attempt: resume or restart `dest.part`, verify its size, move it to `dest`."""
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    with _open(session, url, offset, timeout) as response:
        if response.status_code == 416:  # nothing left after `offset`: complete, or a stale larger part
            _, total = _parse_content_range(response.headers.get("Content-Range"), url)
            if total != offset:
                part.unlink(missing_ok=True)
                raise _Transient(
                    f"stale partial file {part} ({offset} bytes, server has {total}); restarting"
                )
            os.replace(part, dest)
            return
        if response.status_code == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"), url)
            if start != offset:
                part.unlink(missing_ok=True)
                raise _Transient(f"{url} answered from byte {start} instead of {offset}; restarting")
        else:  # 200: the whole file, whether or not a Range was asked for
            offset, total = 0, _int_header(response, "Content-Length")
        expected = _int_header(response, "Content-Length")
        received = _stream(response, part, offset, total, progress)
    size = part.stat().st_size
    if (expected is not None and received != expected) or (total is not None and size != total):
        part.unlink()
        raise SizeMismatchError(
            f"size mismatch for {url}: have {size} bytes ({received} in this response), server announced "
            f"{total if total is not None else '?'} (Content-Length {expected})"
        )
    os.replace(part, dest)


def _stream(
    response: requests.Response, part: Path, offset: int, total: int | None, progress: _Progress
) -> int:
    """Append (offset > 0) or write the body to `part`; returns the number of bytes received."""
    outstanding = 0 if total is None else total - offset
    progress.expect(outstanding)
    received = 0
    try:
        with open(part, "ab" if offset else "wb") as fh:
            for chunk in response.iter_content(CHUNK_SIZE):
                fh.write(chunk)
                received += len(chunk)
                progress.add(len(chunk))
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
        raise _Transient(
            f"connection to {response.url} broke after {offset + received} bytes: {err}"
        ) from err
    finally:
        progress.expect(
            received - outstanding
        )  # the bar total becomes: bytes received + bytes still expected
    return received


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 60.0,
    session: requests.Session | None = None,
    progress: _Progress | None = None,
) -> bool:
    """Fetch `url` to `dest` (resumable, size-checked, atomic). Returns False if `dest` already existed.

    Requests and transfers are retried under `retry_policy(retries, backoff)`: the session's adapter
    retries each request, and a transfer that breaks off is resumed from `dest.part` (one whose size
    the server contradicts is restarted). A given `session` keeps its own adapters.

    Raises `RemoteNotFoundError` (a `FileNotFoundError`) on 404, `ServerUnreachableError` when the server
    cannot be reached, and `DownloadError` (incl. `SizeMismatchError`) for other failures; each names `url`.
    """
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    dest = Path(dest)
    if dest.exists():
        return False
    make_folder(dest.parent)
    progress = progress or _Progress(tqdm(disable=True))
    policy = retry_policy(retries, backoff)
    own_session = session is None
    session = session or _new_session(policy)
    try:
        while True:
            try:
                _transfer_once(session, url, dest, timeout, progress)
                return True
            except (_Transient, SizeMismatchError) as err:
                if policy.total == 0:  # no retry left
                    if isinstance(err, SizeMismatchError):
                        raise
                    raise DownloadError(f"{err} (gave up after {retries} retries)") from err
                policy = policy.increment(method="GET", url=url, error=err)
                logger.info("retrying %s in %.2g s (%s)", url, policy.get_backoff_time(), err)
                policy.sleep()
    finally:
        if own_session:
            session.close()


def _new_session(policy: Retry) -> requests.Session:
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=policy)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    # byte counts must be those of the file itself, never of a compressed transfer
    session.headers.update({"Accept-Encoding": "identity", "User-Agent": "specpt-hf downloader"})
    return session


# ----------------------------------------------------------------------------- many files


def download_healpix(
    healpix: Iterable[Triple],
    out: str | os.PathLike,
    *,
    kinds: Sequence[str] = DEFAULT_KINDS,
    base_url: str | None = None,
    workers: int = 4,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> DownloadReport:
    """Download the `kinds` files of each `(survey, program, healpix)` into `out` in the EDR layout.

    Files already under their final name are skipped without contacting the server. A 404 is logged
    and counted in `report.missing`; other per-file failures go to `report.failed`; a server that
    cannot be reached raises `ServerUnreachableError` naming the URL.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    root, out = resolve_base_url(base_url), Path(out)
    kinds = _check_kinds(kinds)
    jobs = {}  # url -> local path
    for triple in dict.fromkeys(_check_triple(*t) for t in healpix):
        for kind in kinds:
            rel = edr_relpath(*triple, kind)
            jobs[f"{root}/{rel}"] = out / rel
    report = DownloadReport()
    todo = {url: path for url, path in jobs.items() if not path.exists()}
    report.skipped = [path for url, path in jobs.items() if url not in todo]
    file_bar = tqdm(
        total=len(jobs), initial=len(report.skipped), unit="file", desc="files", disable=not progress
    )
    byte_bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="bytes", disable=not progress)
    counter = _Progress(byte_bar)
    options = {"retries": retries, "backoff": backoff, "timeout": timeout, "progress": counter}
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(download_file, url, path, **options): url for url, path in todo.items()}
            try:
                for future in as_completed(futures):
                    _record(report, futures[future], todo[futures[future]], future)
                    file_bar.update()
            except ServerUnreachableError:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    finally:
        file_bar.close()
        byte_bar.close()
        report.n_bytes = counter.n_bytes
    return report


def _record(report: DownloadReport, url: str, path: Path, future) -> None:
    try:
        fetched = future.result()
    except RemoteNotFoundError:
        logger.warning("not found (HTTP 404): %s", url)
        report.missing.append(url)
    except ServerUnreachableError:
        raise
    except (DownloadError, OSError) as err:
        logger.error("failed: %s", err)
        report.failed[url] = str(err)
    else:
        (report.downloaded if fetched else report.skipped).append(path)


# ----------------------------------------------------------------------------- catalogs


def _text_column(table: Table, name: str) -> np.ndarray:
    values = np.asarray(table[name])
    if values.dtype.kind == "S":
        values = np.char.decode(values, "ascii")
    return np.char.lower(np.char.strip(values.astype(str)))


def good_target_cut(table: Table) -> np.ndarray:
    """Minimal DESI cut: COADD_FIBERSTATUS == 0, OBJTYPE == 'TGT', TARGETID > 0, ZWARN NODATA (bit 9)
    unset, and the primary spectrum (ZCAT_PRIMARY or SV_PRIMARY) where the catalog has that column."""
    keep = (
        (np.asarray(table["COADD_FIBERSTATUS"]) == 0)
        & (_text_column(table, "OBJTYPE") == "tgt")
        & (np.asarray(table["TARGETID"]) > 0)
        & ((np.asarray(table["ZWARN"]).astype(np.int64) & (1 << 9)) == 0)
    )
    for primary in ("ZCAT_PRIMARY", "SV_PRIMARY"):
        if primary in table.colnames:
            return keep & np.asarray(table[primary]).astype(bool)
    return keep


def catalog_healpix(
    catalog: str | os.PathLike, *, cut: TableCut | None = None, hdu: str = "ZCATALOG"
) -> list[Triple]:
    """Sorted unique `(survey, program, healpix)` of the rows of `catalog[hdu]` that pass `cut`."""
    try:
        hdus = fits.open(catalog, memmap=True)
    except (OSError, ValueError) as err:
        raise OSError(f"cannot read redshift catalog {catalog}: {err}") from err
    with hdus:
        if hdu not in hdus:
            names = [h.name for h in hdus]
            raise OSError(f"redshift catalog {catalog} has no HDU {hdu!r} (it has {names})")
        return _select_healpix(Table.read(hdus[hdu]), cut, f"redshift catalog {catalog} (HDU {hdu})")


def _select_healpix(table: Table, cut: TableCut | None, where: str) -> list[Triple]:
    missing = [c for c in ("SURVEY", "PROGRAM", "HEALPIX") if c not in table.colnames]
    if missing:
        raise ValueError(f"{where} lacks column(s) {', '.join(missing)}")
    keep = np.ones(len(table), bool)
    if cut is not None:
        try:
            keep = np.asarray(cut(table), dtype=bool)
        except KeyError as err:
            raise ValueError(f"{where}: the cut needs column {err}") from err
        if keep.shape != (len(table),):
            raise ValueError(f"{where}: the cut returned shape {keep.shape} for {len(table)} rows")
    surveys, programs = _text_column(table, "SURVEY")[keep], _text_column(table, "PROGRAM")[keep]
    pixels = np.asarray(table["HEALPIX"])[keep]
    triples = set(zip(surveys.tolist(), programs.tolist(), pixels.tolist(), strict=True))
    try:
        return sorted(_check_triple(*t) for t in triples)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def download_from_catalog(
    catalog: str | os.PathLike,
    out: str | os.PathLike,
    *,
    cut: TableCut | None = None,
    hdu: str = "ZCATALOG",
    **kwargs,
) -> DownloadReport:
    """Download the files of every healpix that holds a catalog row passing `cut` (see `download_healpix`)."""
    triples = catalog_healpix(catalog, cut=cut, hdu=hdu)
    logger.info("%s: %d healpix selected", catalog, len(triples))
    return download_healpix(triples, out, **kwargs)


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specpt download", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--healpix", nargs="+", metavar="SURVEY/PROGRAM/HPX", help="e.g. sv3/dark/26065")
    source.add_argument(
        "--catalog", type=Path, help="redshift catalog (HDU ZCATALOG: SURVEY, PROGRAM, HEALPIX)"
    )
    parser.add_argument(
        "--good-targets", action="store_true", help="with --catalog: only rows passing good_target_cut"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="local root; the EDR layout is recreated below it"
    )
    parser.add_argument(
        "--base-url", default=None, help=f"release root (default ${BASE_URL_ENV} or {DEFAULT_BASE_URL})"
    )
    parser.add_argument("--kinds", nargs="+", default=list(DEFAULT_KINDS), choices=KNOWN_KINDS)
    parser.add_argument("--workers", type=int, default=4, help="concurrent downloads (default 4)")
    parser.add_argument("--retries", type=int, default=3, help="retries per file on transient errors")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to connect / between bytes")
    args = parser.parse_args(argv)
    options = {"kinds": args.kinds, "base_url": args.base_url, "workers": args.workers}
    options.update(retries=args.retries, timeout=args.timeout)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        with logging_redirect_tqdm():
            if args.catalog is not None:
                cut = good_target_cut if args.good_targets else None
                report = download_from_catalog(args.catalog, args.out, cut=cut, **options)
            else:
                report = download_healpix([parse_healpix_spec(s) for s in args.healpix], args.out, **options)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
