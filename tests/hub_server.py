"""A Hub-compatible HTTP server on 127.0.0.1 for tests: the part of the Hugging Face Hub API that
`huggingface_hub` uses to create a model repo, upload a folder and download files from it.

    with LocalHub(tmp_path, tokens={"hf_write": "alice"}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", ...}

Endpoints (model repos):

| method | path | what |
| --- | --- | --- |
| POST | /api/repos/create | create a repo (409 with its url when it exists) |
| GET | /api/models/{repo}[/revision/{rev}] | model info: sha, private, siblings |
| GET | /api/models/{repo}/tree/{rev}[/{path}] | file listing (`?recursive=1`) |
| POST | /api/models/{repo}/preupload/{rev} | upload mode per file: "lfs" for `lfs_patterns`, else "regular" |
| POST | /{repo}.git/info/lfs/objects/batch | LFS batch API, "basic" transfer |
| PUT | /_lfs/upload/{oid} | LFS object upload (sha256 and size checked) |
| POST | /_lfs/verify/{oid} | LFS verify |
| POST | /api/models/{repo}/branch/{branch} | create a branch (from `startingPoint`, default main) |
| POST | /api/models/{repo}/commit/{rev} | ndjson commit: header, file (base64), lfsFile, deletedFile, deletedFolder |
| HEAD, GET | /{repo}/resolve/{rev}/{path} | file download with ETag, X-Repo-Commit, Content-Length, X-Linked-* |
| POST | /api/validate-yaml | README.md metadata check (YAML mapping, `model-index` fields) |
| GET | /api/whoami-v2 | the token's user |

Uploads need `Authorization: Bearer <token>` with a token from `tokens`; private repos need it to be read.
Xet storage is not offered (its token endpoints answer 501), so clients must upload LFS files through the
LFS batch API: set `HF_HUB_DISABLE_XET=1` (or `huggingface_hub.constants.HF_HUB_DISABLE_XET = True`).
`refuse = 401 | 403 | 500 ...` makes every request fail with that status. Every request is logged as
(method, path, status) in `requests`; headers and bodies are never logged.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
REV = r"(?P<rev>[^/]+)"
DEFAULT_BRANCH = "main"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub gives as ETag of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FileEntry:
    """One file of a commit: its git blob id, size and, for LFS files, the sha256 of the content."""

    blob_id: str
    size: int
    lfs_oid: str | None = None


@dataclass
class Commit:
    oid: str
    parent: str | None
    summary: str
    files: dict[str, FileEntry]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)  # oid -> commit
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit oid

    def resolve(self, revision: str) -> Commit | None:
        """A branch name or a full or abbreviated (7+ characters) commit id."""
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        if len(revision) < 7:
            return None
        return next((c for oid, c in self.commits.items() if oid.startswith(revision)), None)


def card_metadata_errors(readme: str) -> list[str]:
    """What the Hub would reject in a README.md's YAML front matter: YAML that does not parse or is not a
    mapping, and a `model-index` without the fields the Hub needs (name; task.type; dataset name and type;
    metric type and value)."""
    match = re.match(r"^---\n(.*?)\n---\n", readme, re.DOTALL)
    if not match:
        return []
    try:
        metadata = yaml.safe_load(match.group(1))
    except yaml.YAMLError as error:
        return [f"invalid YAML: {error}"]
    if not isinstance(metadata, dict):
        return ["the YAML front matter must be a mapping"]
    errors = []
    for i, model in enumerate(metadata.get("model-index") or []):
        if not isinstance(model, dict) or not model.get("name"):
            errors.append(f'"model-index[{i}].name" is required')
            continue
        for j, result in enumerate(model.get("results") or []):
            where = f"model-index[{i}].results[{j}]"
            if not (result.get("task") or {}).get("type"):
                errors.append(f'"{where}.task.type" is required')
            dataset = result.get("dataset") or {}
            if not dataset.get("name") or not dataset.get("type"):
                errors.append(f'"{where}.dataset" needs a name and a type')
            for k, metric in enumerate(result.get("metrics") or []):
                if not metric.get("type") or not isinstance(metric.get("value"), (int, float, str)):
                    errors.append(f'"{where}.metrics[{k}]" needs a type and a value')
    return errors


class HubError(Exception):
    """An HTTP error answered with the Hub's `X-Error-Code` / `X-Error-Message` headers."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


class LocalHub:
    """The server and its state; a context manager that serves on an ephemeral port in a thread."""

    def __init__(
        self,
        root: str | Path,
        tokens: dict[str, str] | None = None,
        lfs_patterns: tuple[str, ...] = ("*.safetensors", "*.bin", "*.pt", "*.png"),
    ) -> None:
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "lfs").mkdir(parents=True, exist_ok=True)
        self.tokens = dict(tokens or {})
        self.lfs_patterns = lfs_patterns
        self.repos: dict[str, Repo] = {}
        self.refuse: int | None = None
        self.requests: list[tuple[str, str, int]] = []
        self.lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LocalHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- content store -----------------------------------------------------------------------------

    def _blob_path(self, entry: FileEntry) -> Path:
        return self.root / "lfs" / entry.lfs_oid if entry.lfs_oid else self.root / "blobs" / entry.blob_id

    def read_file(self, repo_id: str, path: str, revision: str = DEFAULT_BRANCH) -> bytes:
        """The content of `path` in `repo_id` at `revision` (for assertions in tests)."""
        commit = self.repos[repo_id].resolve(revision)
        assert commit is not None, f"{repo_id} has no revision {revision}"
        return self._blob_path(commit.files[path]).read_bytes()

    def files(self, repo_id: str, revision: str = DEFAULT_BRANCH) -> dict[str, FileEntry]:
        commit = self.repos[repo_id].resolve(revision)
        return dict(commit.files) if commit else {}

    def is_lfs(self, path: str) -> bool:
        return any(fnmatch.fnmatch(Path(path).name, pattern) for pattern in self.lfs_patterns)

    # -- helpers for the handler -------------------------------------------------------------------

    def user_for(self, authorization: str | None) -> str | None:
        if not authorization or not authorization.startswith("Bearer "):
            return None
        return self.tokens.get(authorization.removeprefix("Bearer ").strip())

    def repo_for_read(self, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user is None):
            status = 401 if user is None else 404
            raise HubError(status, "Repository not found", "RepoNotFound")
        return repo

    def commit_for(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(unquote(revision))
        if commit is None:
            raise HubError(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound")
        return commit

    def new_commit(self, repo: Repo, branch: str, summary: str, files: dict[str, FileEntry]) -> Commit:
        parent = repo.refs.get(branch)
        digest = hashlib.sha1(
            json.dumps(
                [parent, summary, time.time_ns(), sorted((p, e.blob_id) for p, e in files.items())]
            ).encode()
        ).hexdigest()
        commit = Commit(digest, parent, summary, files)
        repo.commits[digest] = commit
        repo.refs[branch] = digest
        return commit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    @property
    def hub(self) -> LocalHub:
        return self.server.hub  # type: ignore[attr-defined]

    # -- plumbing ----------------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(
        self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False
    ) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and not head:
            self.wfile.write(body)
        with self.hub.lock:
            self.hub.requests.append((self.command, urlsplit(self.path).path, status))

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self._send(status, body, {"Content-Type": "application/json", **(headers or {})})

    def _error(self, error: HubError, head: bool = False) -> None:
        headers = {"X-Error-Message": error.message, "Content-Type": "application/json"}
        if error.code:
            headers["X-Error-Code"] = error.code
        if error.commit:
            headers["X-Repo-Commit"] = error.commit
        self._send(error.status, json.dumps({"error": error.message}).encode(), headers, head=head)

    def _dispatch(self, routes: list[tuple[str, Any]]) -> None:
        # the body must be read even when the request is refused, or the connection gets out of step
        body = self._body() if self.command in ("POST", "PUT") else b""
        head = self.command == "HEAD"
        if self.hub.refuse is not None:
            status = self.hub.refuse
            self._error(HubError(status, f"refused with HTTP {status} (test server)"), head=head)
            return
        split = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        user = self.hub.user_for(self.headers.get("Authorization"))
        for pattern, handler in routes:
            match = re.fullmatch(pattern, split.path)
            if match:
                try:
                    with self.hub.lock:
                        handler(self, body=body, query=query, user=user, **match.groupdict())
                except HubError as error:
                    self._error(error, head=head)
                return
        self._error(HubError(404, f"no route for {self.command} {split.path}"), head=head)

    def do_GET(self) -> None:
        self._dispatch(GET_ROUTES)

    def do_HEAD(self) -> None:
        self._dispatch(GET_ROUTES)

    def do_POST(self) -> None:
        self._dispatch(POST_ROUTES)

    def do_PUT(self) -> None:
        self._dispatch(PUT_ROUTES)

    def validate_yaml(self, body: bytes, query: dict, user: str | None) -> None:
        errors = [
            {"message": message} for message in card_metadata_errors(json.loads(body).get("content", ""))
        ]
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    # -- account and repos -------------------------------------------------------------------------

    def whoami(self, body: bytes, query: dict, user: str | None) -> None:
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        self._json(200, {"type": "user", "name": user, "orgs": [], "auth": {"type": "access_token"}})

    def create_repo(self, body: bytes, query: dict, user: str | None) -> None:
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        payload = json.loads(body or b"{}")
        if payload.get("type", "model") != "model":
            raise HubError(400, "this test server only hosts model repos")
        name, organization = payload.get("name"), payload.get("organization") or user
        if not name or not re.fullmatch(r"[\w.-]+", name):
            raise HubError(400, f"invalid repo name {name!r}")
        repo_id = f"{organization}/{name}"
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            self._json(409, {"error": "You already created this model repo", "url": url})
            return
        private = payload.get("private", payload.get("visibility") == "private") or False
        repo = Repo(repo_id, bool(private))
        self.hub.repos[repo_id] = repo
        self.hub.new_commit(repo, DEFAULT_BRANCH, "initial commit", {})
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def model_info(
        self, body: bytes, query: dict, user: str | None, repo: str, rev: str = DEFAULT_BRANCH
    ) -> None:
        hosted = self.hub.repo_for_read(repo, user)
        commit = self.hub.commit_for(hosted, rev)
        siblings = [
            {"rfilename": path, "size": entry.size, "blobId": entry.blob_id}
            | (
                {"lfs": {"sha256": entry.lfs_oid, "size": entry.size, "pointerSize": 134}}
                if entry.lfs_oid
                else {}
            )
            for path, entry in sorted(commit.files.items())
        ]
        self._json(
            200,
            {
                "id": repo,
                "modelId": repo,
                "author": repo.split("/")[0],
                "sha": commit.oid,
                "private": hosted.private,
                "disabled": False,
                "gated": False,
                "tags": [],
                "siblings": siblings,
                "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            },
        )

    def tree(
        self, body: bytes, query: dict, user: str | None, repo: str, rev: str, path: str | None = None
    ) -> None:
        commit = self.hub.commit_for(self.hub.repo_for_read(repo, user), rev)
        prefix = (unquote(path).strip("/") + "/") if path else ""
        recursive = query.get("recursive", "").lower() in ("1", "true")
        entries, folders = [], set()
        for file_path, entry in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            rest = file_path[len(prefix) :]
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                folder = prefix + "/".join(parts[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    entries.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": folder})
            if recursive or len(parts) == 1:
                item = {"type": "file", "oid": entry.blob_id, "size": entry.size, "path": file_path}
                if entry.lfs_oid:
                    item["lfs"] = {"oid": entry.lfs_oid, "size": entry.size, "pointerSize": 134}
                entries.append(item)
        if path and not entries:
            raise HubError(404, f"{prefix} does not exist on {rev}", "EntryNotFound", commit.oid)
        self._json(200, entries)

    # -- uploads -----------------------------------------------------------------------------------

    def _writable(self, repo: str, user: str | None) -> Repo:
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        hosted = self.hub.repos.get(repo)
        if hosted is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return hosted

    def preupload(self, body: bytes, query: dict, user: str | None, repo: str, rev: str) -> None:
        commit = self.hub.commit_for(self._writable(repo, user), rev)
        files = []
        for item in json.loads(body)["files"]:
            existing = commit.files.get(item["path"])
            files.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if self.hub.is_lfs(item["path"]) else "regular",
                    "shouldIgnore": False,
                    "oid": existing.blob_id if existing else None,
                }
            )
        self._json(200, {"files": files, "commitOid": commit.oid})

    def xet_token(self, body: bytes, query: dict, user: str | None, repo: str, kind: str, rev: str) -> None:
        raise HubError(501, "this test server has no Xet storage; upload with HF_HUB_DISABLE_XET=1 (LFS)")

    def lfs_batch(self, body: bytes, query: dict, user: str | None, repo: str) -> None:
        self._writable(repo, user)
        payload = json.loads(body)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(422, "only 'upload' with the 'basic' transfer is supported")
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], int(obj["size"])
            item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not (self.hub.root / "lfs" / oid).is_file():
                item["actions"] = {
                    "upload": {"href": f"{self.hub.url}/_lfs/upload/{oid}?size={size}", "expires_in": 900},
                    "verify": {"href": f"{self.hub.url}/_lfs/verify/{oid}", "expires_in": 900},
                }
            objects.append(item)
        self._json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def lfs_upload(self, body: bytes, query: dict, user: str | None, oid: str) -> None:
        if hashlib.sha256(body).hexdigest() != oid or len(body) != int(query.get("size", -1)):
            raise HubError(400, f"LFS object {oid}: content does not match its oid and size")
        path = self.hub.root / "lfs" / oid
        tmp = path.with_suffix(".part")
        tmp.write_bytes(body)
        tmp.replace(path)
        self._send(200)

    def lfs_verify(self, body: bytes, query: dict, user: str | None, oid: str) -> None:
        payload = json.loads(body)
        path = self.hub.root / "lfs" / oid
        if payload.get("oid") != oid or not path.is_file() or path.stat().st_size != payload.get("size"):
            raise HubError(404, f"LFS object {oid} not uploaded")
        self._json(200, {"success": True})

    def commit(self, body: bytes, query: dict, user: str | None, repo: str, rev: str) -> None:
        hosted = self._writable(repo, user)
        branch = unquote(rev)
        if branch not in hosted.refs:
            raise HubError(404, f"Invalid rev id: {branch} (commits go to a branch)", "RevisionNotFound")
        parent = self.hub.commit_for(hosted, branch)
        files = dict(parent.files)
        summary = ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
                if value.get("parentCommit") and value["parentCommit"] != parent.oid:
                    raise HubError(412, "parent commit is not the head of the branch")
            elif key == "file":
                data = base64.b64decode(value["content"])
                blob_id = git_blob_sha1(data)
                (self.hub.root / "blobs" / blob_id).write_bytes(data)
                files[value["path"]] = FileEntry(blob_id, len(data))
            elif key == "lfsFile":
                oid, size = value["oid"], int(value["size"])
                if not (self.hub.root / "lfs" / oid).is_file():
                    raise HubError(422, f"{value['path']}: LFS object {oid} was never uploaded")
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
                files[value["path"]] = FileEntry(git_blob_sha1(pointer.encode()), size, oid)
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: e for p, e in files.items() if not p.startswith(prefix)}
            else:
                raise HubError(422, f"unsupported commit operation {key!r}")
        commit = self.hub.new_commit(hosted, branch, summary, files)
        self._json(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.hub.url}/{repo}/commit/{commit.oid}",
                "pullRequestUrl": None,
            },
        )

    def create_branch(self, body: bytes, query: dict, user: str | None, repo: str, branch: str) -> None:
        hosted = self._writable(repo, user)
        branch = unquote(branch)
        if branch in hosted.refs:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = (json.loads(body or b"{}") or {}).get("startingPoint") or DEFAULT_BRANCH
        hosted.refs[branch] = self.hub.commit_for(hosted, start).oid
        self._send(200)

    # -- downloads ---------------------------------------------------------------------------------

    def resolve(self, body: bytes, query: dict, user: str | None, repo: str, rev: str, path: str) -> None:
        head = self.command == "HEAD"
        commit = self.hub.commit_for(self.hub.repo_for_read(repo, user), rev)
        path = unquote(path)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit.oid)
        data = self.hub._blob_path(entry).read_bytes()
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{entry.lfs_oid or entry.blob_id}"',
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        if entry.lfs_oid:
            headers |= {"X-Linked-Etag": f'"{entry.lfs_oid}"', "X-Linked-Size": str(entry.size)}
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and not head:
            start = int(match.group(1))
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self._send(206, data[start:], headers)
            return
        self._send(200, data, headers, head=head)


GET_ROUTES = [
    (r"/api/whoami-v2", _Handler.whoami),
    (rf"/api/models/{REPO}", _Handler.model_info),
    (rf"/api/models/{REPO}/revision/{REV}", _Handler.model_info),
    (rf"/api/models/{REPO}/tree/{REV}(?:/(?P<path>.+))?", _Handler.tree),
    (rf"/api/models/{REPO}/xet-(?P<kind>read|write)-token/{REV}", _Handler.xet_token),
    (rf"/{REPO}/resolve/{REV}/(?P<path>.+)", _Handler.resolve),
]
POST_ROUTES = [
    (r"/api/repos/create", _Handler.create_repo),
    (r"/api/validate-yaml", _Handler.validate_yaml),
    (rf"/api/models/{REPO}/preupload/{REV}", _Handler.preupload),
    (rf"/api/models/{REPO}/commit/{REV}", _Handler.commit),
    (rf"/api/models/{REPO}/xet-(?P<kind>read|write)-token/{REV}", _Handler.xet_token),
    (rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", _Handler.create_branch),
    (rf"/{REPO}\.git/info/lfs/objects/batch", _Handler.lfs_batch),
    (r"/_lfs/verify/(?P<oid>[0-9a-f]{64})", _Handler.lfs_verify),
]
PUT_ROUTES = [(r"/_lfs/upload/(?P<oid>[0-9a-f]{64})", _Handler.lfs_upload)]
