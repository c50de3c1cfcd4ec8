"""The EDR downloader against a local HTTP server (127.0.0.1 only) serving real DESI files in the EDR layout."""

from __future__ import annotations

import importlib.resources
import re
import shutil
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from specpt_hf.data import download as dl

DESI_DATA = importlib.resources.files("specutils") / "io/default_loaders/tests/desi_test_data"
FAST = {"retries": 0, "backoff": 0.01, "timeout": 5.0, "progress": False}
DARK = ("sv3", "dark", 26065)
BRIGHT = ("sv3", "bright", 26065)


# ----------------------------------------------------------------------------- server


@dataclass
class ServerState:
    """What the test server does and what it saw."""

    root: Path
    honour_range: bool = True
    drop_after: int | None = None  # close the connection after this many body bytes
    drops_left: int = 0  # ... for this many responses
    extra_total: int = 0  # announce a Content-Range total this much larger than the file
    fail_with: list[int] = field(default_factory=list)  # statuses to answer first, one per request
    log: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, **entry) -> None:
        with self.lock:
            self.log.append(entry)

    def requests_for(self, name: str) -> list[dict]:
        return [e for e in self.log if e["path"].endswith("/" + name)]


class RangeHandler(BaseHTTPRequestHandler):
    """Serves files under `state.root`; supports `Range: bytes=N-` unless told to ignore it."""

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        state: ServerState = self.server.state
        path = unquote(urlsplit(self.path).path)
        local = (state.root / path.lstrip("/")).resolve()
        range_header = self.headers.get("Range")
        if not local.is_relative_to(state.root) or not local.is_file():
            state.record(path=path, range=range_header, status=404, sent=0)
            self.send_error(404)
            return
        with state.lock:
            failure = state.fail_with.pop(0) if state.fail_with else None
        if failure:
            state.record(path=path, range=range_header, status=failure, sent=0)
            self.send_response(failure)
            self.send_header("Content-Length", "0")
            self.end_headers()
            self.close_connection = True
            return
        data = local.read_bytes()
        start, status = 0, 200
        if range_header and state.honour_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
            if start >= len(data):
                state.record(path=path, range=range_header, status=416, sent=0)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header(
                "Content-Range", f"bytes {start}-{len(data) - 1}/{len(data) + state.extra_total}"
            )
        self.end_headers()
        with state.lock:
            drop = state.drop_after is not None and state.drops_left > 0
            state.drops_left -= drop
        sent = min(len(body), state.drop_after) if drop else len(body)
        state.record(path=path, range=range_header, status=status, sent=sent)  # before the client can finish
        self.wfile.write(body[:sent])
        self.close_connection = True


def write_redrock(path: Path, coadd: Path) -> None:
    """A small valid redrock file whose REDSHIFTS rows match the coadd's FIBERMAP."""
    fibermap = Table.read(coadd, hdu="FIBERMAP")
    n = len(fibermap)
    rng = np.random.default_rng(26065)
    redshifts = Table(
        {
            "TARGETID": np.asarray(fibermap["TARGETID"], np.int64),
            "Z": rng.uniform(0.1, 1.5, n),
            "ZERR": rng.uniform(1e-5, 1e-4, n),
            "ZWARN": np.where(np.asarray(fibermap["TARGETID"]) > 0, 0, 1 << 9).astype(np.int64),
            "CHI2": rng.uniform(7000, 9000, n),
            "COEFF": rng.normal(size=(n, 10)),
            "NPIXELS": np.full(n, 7781, np.int64),
            "SPECTYPE": np.array(["GALAXY"] * n),
            "SUBTYPE": np.array([""] * n),
            "NCOEFF": np.full(n, 10, np.int64),
            "DELTACHI2": rng.uniform(10, 500, n),
        }
    )
    hdus = fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(redshifts), fits.table_to_hdu(fibermap)])
    hdus[1].name, hdus[2].name = "REDSHIFTS", "FIBERMAP"
    hdus.writeto(path)


def place(root: Path, survey: str, program: str, hpx: int, coadd: Path, redrock: Path) -> None:
    folder = root / f"healpix/{survey}/{program}/{hpx // 100}/{hpx}"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(coadd, folder / f"coadd-{survey}-{program}-{hpx}.fits")
    shutil.copyfile(redrock, folder / f"redrock-{survey}-{program}-{hpx}.fits")


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """A release root holding the real coadd (and a matching redrock file) for sv3/dark and sv3/bright 26065."""
    root = tmp_path_factory.mktemp("fuji")
    coadd = Path(str(DESI_DATA / "coadd-sv3-dark-26065.fits"))
    redrock = root / "redrock.fits"
    write_redrock(redrock, coadd)
    place(root, *DARK, coadd, redrock)
    place(root, *BRIGHT, coadd, redrock)
    redrock.unlink()
    return root.resolve()


@pytest.fixture
def server(release):
    """(base_url, state) of a threaded HTTP server on 127.0.0.1 at an ephemeral port."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.state = ServerState(release)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def relpath(triple, kind: str = "coadd") -> str:
    survey, program, hpx = triple
    return f"healpix/{survey}/{program}/{hpx // 100}/{hpx}/{kind}-{survey}-{program}-{hpx}.fits"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- layout


def test_edr_file_urls_layout_and_base_url(monkeypatch):
    monkeypatch.delenv(dl.BASE_URL_ENV, raising=False)
    urls = dl.edr_file_urls("sv3", "dark", 26065)
    assert urls == {
        "coadd": f"{dl.DEFAULT_BASE_URL}/healpix/sv3/dark/260/26065/coadd-sv3-dark-26065.fits",
        "redrock": f"{dl.DEFAULT_BASE_URL}/healpix/sv3/dark/260/26065/redrock-sv3-dark-26065.fits",
    }
    assert dl.DEFAULT_BASE_URL == "https://data.desi.lbl.gov/public/edr/spectro/redux/fuji"
    monkeypatch.setenv(dl.BASE_URL_ENV, "http://127.0.0.1:1/mirror/")
    assert dl.edr_file_urls("sv1", "other", 7, kinds=("redrock",)) == {
        "redrock": "http://127.0.0.1:1/mirror/healpix/sv1/other/0/7/redrock-sv1-other-7.fits"
    }
    explicit = dl.edr_file_urls("sv1", "other", 7, kinds=("coadd",), base_url="http://127.0.0.1:2")
    assert explicit["coadd"].startswith("http://127.0.0.1:2/healpix/")
    assert dl.parse_healpix_spec("SV3/Dark/26065") == DARK
    for bad in [
        ("sv3", "dark", -1),
        ("sv3", "dark", 49152),
        ("sv3", "dark", "x1"),
        ("sv3/x", "dark", 1),
        ("sv3", "", 1),
    ]:
        with pytest.raises(ValueError, match="survey|program|healpix"):
            dl.edr_file_urls(*bad)
    with pytest.raises(ValueError, match="kinds"):
        dl.edr_file_urls("sv3", "dark", 1, kinds=("spectrum",))
    with pytest.raises(ValueError, match="SURVEY/PROGRAM/HEALPIX"):
        dl.parse_healpix_spec("sv3-dark-26065")


# ----------------------------------------------------------------------------- downloads


def test_full_download_is_byte_identical_and_rerun_skips(server, release, tmp_path):
    url, state = server
    report = dl.download_healpix([DARK, BRIGHT, DARK], tmp_path, base_url=url, workers=2, **FAST)
    assert report.ok and len(report.downloaded) == 4 and not report.skipped
    for triple in (DARK, BRIGHT):
        for kind in ("coadd", "redrock"):
            assert (tmp_path / relpath(triple, kind)).read_bytes() == (
                release / relpath(triple, kind)
            ).read_bytes()
    assert report.n_bytes == sum(
        (release / relpath(t, k)).stat().st_size for t in (DARK, BRIGHT) for k in ("coadd", "redrock")
    )
    assert not list(tmp_path.rglob("*.part"))
    with fits.open(tmp_path / relpath(DARK, "redrock")) as hdus:
        assert hdus["REDSHIFTS"].data["TARGETID"][2] == 39627866878511337
    n_requests = len(state.log)
    again = dl.download_healpix([DARK, BRIGHT], tmp_path, base_url=url, **FAST)
    assert again.ok and not again.downloaded and len(again.skipped) == 4
    assert len(state.log) == n_requests  # complete files are not even asked about


def test_resume_from_truncated_part_asks_only_for_the_rest(server, release, tmp_path):
    url, state = server
    source = (release / relpath(DARK)).read_bytes()
    part = tmp_path / (relpath(DARK) + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(source[:1_000_000])
    report = dl.download_healpix([DARK], tmp_path, kinds=("coadd",), base_url=url, **FAST)
    assert report.ok and report.n_bytes == len(source) - 1_000_000
    assert (tmp_path / relpath(DARK)).read_bytes() == source and not part.exists()
    (entry,) = state.requests_for("coadd-sv3-dark-26065.fits")
    assert entry["range"] == "bytes=1000000-" and entry["status"] == 206
    assert entry["sent"] == len(source) - 1_000_000


def test_server_ignoring_range_restarts_from_zero(server, release, tmp_path):
    url, state = server
    state.honour_range = False
    source = (release / relpath(DARK)).read_bytes()
    part = tmp_path / (relpath(DARK) + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(source[:777_777])
    report = dl.download_healpix([DARK], tmp_path, kinds=("coadd",), base_url=url, **FAST)
    assert report.ok
    assert (tmp_path / relpath(DARK)).read_bytes() == source  # not the part + the whole file appended
    (entry,) = state.requests_for("coadd-sv3-dark-26065.fits")
    assert entry["range"] == "bytes=777777-" and entry["status"] == 200 and entry["sent"] == len(source)


def test_dropped_connection_leaves_no_final_file_and_rerun_completes(server, release, tmp_path):
    url, state = server
    source = (release / relpath(DARK)).read_bytes()
    state.drop_after, state.drops_left = 300_000, 1
    final = tmp_path / relpath(DARK)
    report = dl.download_healpix([DARK], tmp_path, kinds=("coadd",), base_url=url, **FAST)
    assert not report.ok and list(report.failed) == [f"{url}/{relpath(DARK)}"]
    assert "broke after" in report.failed[f"{url}/{relpath(DARK)}"]
    assert not final.exists()
    partial = final.with_name(final.name + ".part").stat().st_size
    assert 0 < partial <= 300_000
    report = dl.download_healpix([DARK], tmp_path, kinds=("coadd",), base_url=url, **FAST)
    assert report.ok and final.read_bytes() == source
    assert state.requests_for(final.name)[-1]["range"] == f"bytes={partial}-"


def test_dropped_connection_is_retried_within_one_run(server, release, tmp_path):
    url, state = server
    state.drop_after, state.drops_left = 500_000, 2
    options = {**FAST, "retries": 3}
    report = dl.download_healpix([DARK], tmp_path, kinds=("coadd",), base_url=url, **options)
    assert report.ok
    assert (tmp_path / relpath(DARK)).read_bytes() == (release / relpath(DARK)).read_bytes()
    ranges = [e["range"] for e in state.requests_for("coadd-sv3-dark-26065.fits")]
    assert (
        len(ranges) == 3 and ranges[0] is None and ranges[1].startswith("bytes=") and ranges[2] != ranges[1]
    )


def test_server_errors_are_retried_then_reported(server, release, tmp_path):
    url, state = server
    name, options = "coadd-sv3-dark-26065.fits", {**FAST, "retries": 2}
    state.fail_with = [503, 429]
    report = dl.download_healpix([DARK], tmp_path, kinds=("coadd",), base_url=url, **options)
    assert report.ok and (tmp_path / relpath(DARK)).read_bytes() == (release / relpath(DARK)).read_bytes()
    assert [e["status"] for e in state.requests_for(name)] == [503, 429, 200]
    state.fail_with = [500, 502, 504, 503]  # one more than the retries
    report = dl.download_healpix([DARK], tmp_path / "again", kinds=("coadd",), base_url=url, **options)
    (reason,) = report.failed.values()
    assert "HTTP 504" in reason and f"{url}/{relpath(DARK)}" in reason
    assert [e["status"] for e in state.requests_for(name)][3:] == [500, 502, 504]
    assert not (tmp_path / "again" / relpath(DARK)).exists()


def test_size_mismatch_is_detected(server, release, tmp_path):
    url, state = server
    source = (release / relpath(DARK)).read_bytes()
    final = tmp_path / relpath(DARK)
    part = final.with_name(final.name + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(source[:100_000])
    state.extra_total = 4096  # the server announces a total the body cannot reach
    report = dl.download_healpix([DARK], tmp_path, kinds=("coadd",), base_url=url, **FAST)
    (reason,) = report.failed.values()
    assert "size mismatch" in reason and str(len(source) + 4096) in reason
    assert not final.exists() and not part.exists()  # an untrustworthy part is discarded
    with pytest.raises(dl.SizeMismatchError, match=re.escape(relpath(DARK))):
        part.write_bytes(source[:100_000])
        dl.download_file(f"{url}/{relpath(DARK)}", final, retries=0, timeout=5.0)


def test_stale_part_larger_than_remote_is_restarted(server, release, tmp_path):
    url, state = server
    source = (release / relpath(DARK, "redrock")).read_bytes()
    final = tmp_path / relpath(DARK, "redrock")
    part = final.with_name(final.name + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(source + b"\0" * 2880)  # left over from another version of the file
    assert dl.download_file(f"{url}/{relpath(DARK, 'redrock')}", final, retries=1, backoff=0.01, timeout=5.0)
    assert final.read_bytes() == source
    assert [e["status"] for e in state.requests_for(final.name)] == [416, 200]


def test_404_is_counted_and_others_complete(server, release, tmp_path, caplog):
    url, state = server
    absent = ("sv1", "other", 5000)
    report = dl.download_healpix([absent, DARK], tmp_path, base_url=url, workers=2, **FAST)
    assert sorted(report.missing) == sorted(f"{url}/{relpath(absent, k)}" for k in ("coadd", "redrock"))
    assert len(report.downloaded) == 2 and not report.failed and not report.ok
    assert (tmp_path / relpath(DARK)).read_bytes() == (release / relpath(DARK)).read_bytes()
    assert not (tmp_path / relpath(absent)).exists()
    assert "404" in caplog.text and relpath(absent) in caplog.text


def write_catalog(path: Path) -> None:
    rows = [  # survey, program, healpix, targetid, fiberstatus, objtype, zwarn, primary
        ("sv3", "dark", 26065, 39627866878511337, 0, "TGT", 0, True),
        ("sv3", "dark", 26065, 616088619186127404, 0, "TGT", 4, True),
        ("sv3", "bright", 26065, -2713437, 0, "SKY", 0, True),  # fails the cut: sky fiber
        ("sv1", "other", 5000, 39627866878514741, 0, "TGT", 1 << 9, True),  # fails the cut: NODATA
        ("sv1", "other", 5001, 39627866878514742, 0, "TGT", 0, False),  # fails the cut: not primary
    ]
    names = [
        "SURVEY",
        "PROGRAM",
        "HEALPIX",
        "TARGETID",
        "COADD_FIBERSTATUS",
        "OBJTYPE",
        "ZWARN",
        "ZCAT_PRIMARY",
    ]
    table = Table(rows=rows, names=names)
    hdu = fits.table_to_hdu(table)
    hdu.name = "ZCATALOG"
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path)


def test_catalog_driven_selection(server, release, tmp_path):
    url, state = server
    catalog = tmp_path / "zpix-test.fits"
    write_catalog(catalog)
    assert dl.catalog_healpix(catalog, cut=dl.good_target_cut) == [DARK]
    assert dl.catalog_healpix(catalog) == [("sv1", "other", 5000), ("sv1", "other", 5001), BRIGHT, DARK]
    report = dl.download_from_catalog(catalog, tmp_path / "out", cut=dl.good_target_cut, base_url=url, **FAST)
    assert report.ok and len(report.downloaded) == 2
    assert sorted(e["path"] for e in state.log) == sorted(
        f"/{relpath(DARK, k)}" for k in ("coadd", "redrock")
    )
    everything = dl.download_from_catalog(catalog, tmp_path / "out", base_url=url, workers=3, **FAST)
    assert len(everything.skipped) == 2 and len(everything.downloaded) == 2 and len(everything.missing) == 4
    assert (tmp_path / "out" / relpath(BRIGHT, "redrock")).is_file()


def test_catalog_without_expected_columns(tmp_path):
    catalog = tmp_path / "bad.fits"
    hdu = fits.table_to_hdu(Table({"TARGETID": [1, 2], "HEALPIX": [3, 4]}))
    hdu.name = "ZCATALOG"
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(catalog)
    with pytest.raises(ValueError, match=r"bad\.fits.*SURVEY, PROGRAM"):
        dl.catalog_healpix(catalog)
    with pytest.raises(OSError, match=r"bad\.fits has no HDU 'REDSHIFTS'"):
        dl.catalog_healpix(catalog, hdu="REDSHIFTS")


def test_refused_connection_names_the_url(tmp_path):
    base = f"http://127.0.0.1:{free_port()}"
    options = {**FAST, "retries": 1}
    with pytest.raises(dl.ServerUnreachableError, match=re.escape(f"{base}/{relpath(DARK)}")):
        dl.download_healpix([DARK], tmp_path, kinds=("coadd",), base_url=base, **options)
    assert not list(tmp_path.rglob("*.fits"))


def test_cli_download_with_env_base_url(server, release, tmp_path, monkeypatch, capsys):
    url, _ = server
    monkeypatch.setenv(dl.BASE_URL_ENV, url)
    argv = ["--healpix", "sv3/dark/26065", "--out", str(tmp_path), "--workers", "2", "--kinds", "redrock"]
    assert dl.main(argv) == 0
    assert (tmp_path / relpath(DARK, "redrock")).read_bytes() == (
        release / relpath(DARK, "redrock")
    ).read_bytes()
    assert not (tmp_path / relpath(DARK)).exists()
    assert "1 downloaded" in capsys.readouterr().out
    base = f"http://127.0.0.1:{free_port()}"
    argv = ["--healpix", "sv3/dark/26065", "--out", str(tmp_path / "x"), "--base-url", base, "--retries", "0"]
    assert dl.main(argv) == 1
    assert base in capsys.readouterr().err
