"""A loopback Hugging Face Hub for tests: the real `huggingface_hub` client talks HTTP to it on 127.0.0.1.

It owns just enough of the Hub's HTTP API for `snapshot_download`, `hf_hub_download`, `model_info`,
`repo_info`, `list_repo_files` and `list_repo_tree` (huggingface_hub 2.4, diffusers' loaders), with the
status codes and headers the Hub sends, so the client's own error mapping and cache layout are what get
tested — nothing of the client is mocked:

    GET      /api/models/{owner}/{name}[/revision/{rev}]     model info: `sha`, `siblings`, `gated`, `private`
    GET      /api/models/{owner}/{name}/tree/{rev}[/{dir}]   tree listing (`?recursive=true`), LFS metadata
    HEAD/GET /{owner}/{name}/resolve/{rev}/{path}            file bytes; `Range: bytes=N-` answers 206
    GET      /api/agent-harnesses                            empty registry (the client may ask, for its User-Agent)

Repos are snapshots of local folders, read once when added, so a commit never changes under a test.
Files with a binary suffix or of 10 MB and more are "LFS" files, as the Hub's default `.gitattributes`
makes them: their ETag is the sha256 of the content (the client names the cache blob after it) and the
tree lists `lfs.oid`; other files carry the git blob sha1, as on the Hub. Headers on `resolve`:
`ETag`, `X-Repo-Commit`, `X-Linked-Etag`, `X-Linked-Size`, `Accept-Ranges`. LFS files are served
directly rather than through a redirect to a CDN host.

Errors are modelled on the Hub's (the client picks its exception from the `X-Error-Code` header):

    unknown or private repo, no token          401  RepoNotFound     -> RepositoryNotFoundError
    unknown or private repo, valid token       404  RepoNotFound     -> RepositoryNotFoundError
    gated repo file, no token                  401  GatedRepo        -> GatedRepoError
    gated repo file, valid token not granted   403  GatedRepo        -> GatedRepoError
    token the server does not know (any repo)  401  (no code)        -> HfHubHTTPError, status 401
    unknown revision                           404  RevisionNotFound -> RevisionNotFoundError
    unknown file                               404  EntryNotFound    -> RemoteEntryNotFoundError
                                                                        (an EntryNotFoundError)

A gated repo's info and file list are public, as on the Hub; only its files need a granted token.

Using it (`hub_server` is the pytest fixture at the bottom, a factory of started servers):

    hub = hub_server()
    sha = hub.add_repo("owner/tiny", folder)                  # public, branch "main"
    hub.add_repo("owner/gated", folder, gated=True)
    hub.add_token("hf_good", "owner/gated")                   # a user token granted that repo
    hub.add_revision("owner/tiny", other_folder, "v2")        # a second commit, under ref "v2"
    hub.break_download("owner/tiny", "unet/big.safetensors", after_bytes=11 << 20)
    env = hub.client_env(tmp_path / "hf_home")                # for a subprocess client
    subprocess.run([sys.executable, "train.py", ...], env=env, timeout=120)
    hub.downloads("owner/tiny")                               # files whose bytes were sent, in order
    hub.served_count("owner/tiny", "unet/config.json"); hub.requests  # the full request log

The client reads `HF_ENDPOINT`, `HF_HOME`, `HF_HUB_CACHE` and `HF_HUB_OFFLINE` once, at import. So:
- subprocess clients (`python train.py ...`, the main consumer) get them from `client_env`, which also
  removes any `HF_TOKEN` of the developer's and points `HF_HOME` at a test folder so no token file is read;
- in-process clients use `patch_client(monkeypatch, hf_home)`, which patches `huggingface_hub.constants`
  the same way. diffusers and transformers keep their own copies of some of these constants, so code
  that goes through their loaders is tested in a subprocess.

What the 2.4 client does that tests (and the model loader) should know:
- it resumes a broken-off GET itself (`Range: bytes=N-`) after a 1 s pause, but only from whole 10 MiB
  chunks it has already received: a file broken off before 10 MiB is fetched again from byte 0 (200);
- a download that fails is not resumed by a later process: its temporary file is deleted;
- it reads the token from `HF_TOKEN` (or `HUGGING_FACE_HUB_TOKEN`) or the token file, never `HF_API_TOKEN`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

HOST = "127.0.0.1"

# The Hub's default .gitattributes sends these to LFS; any file of 10 MB or more goes there too.
LFS_SUFFIXES = frozenset(
    {".safetensors", ".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle", ".h5", ".msgpack", ".onnx",
     ".npy", ".npz", ".gguf", ".zip", ".tar", ".gz", ".tgz", ".7z", ".arrow", ".parquet", ".model"}
)
LFS_MIN_SIZE = 10 * 1024 * 1024

# The client streams downloads in chunks of this size and can only resume from a chunk boundary.
CLIENT_CHUNK_SIZE = 10 * 1024 * 1024

INVALID_TOKEN_MESSAGE = "Invalid credentials in Authorization header"  # the client matches this text
COMMIT_DATE = "2024-01-01T00:00:00.000Z"
SERVE_POLL_S = 0.05
IDLE_CONNECTION_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a file, which the Hub uses as ETag and `oid` for non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The Git LFS pointer file committed in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class HubFile:
    path: str
    content: bytes
    lfs_sha256: str | None  # set for LFS files

    @property
    def size(self) -> int:
        return len(self.content)

    @property
    def git_oid(self) -> str:
        """The blob id git stores: of the pointer for an LFS file, of the content otherwise."""
        if self.lfs_sha256 is None:
            return git_blob_sha1(self.content)
        return git_blob_sha1(lfs_pointer(self.lfs_sha256, self.size))

    @property
    def etag(self) -> str:
        return self.lfs_sha256 or git_blob_sha1(self.content)

    def tree_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": self.git_oid, "size": self.size, "path": self.path}
        if self.lfs_sha256 is not None:
            pointer_size = len(lfs_pointer(self.lfs_sha256, self.size))
            entry["lfs"] = {"oid": self.lfs_sha256, "size": self.size, "pointerSize": pointer_size}
        return entry

    def sibling(self, with_metadata: bool) -> dict[str, Any]:
        if not with_metadata:
            return {"rfilename": self.path}
        sibling: dict[str, Any] = {"rfilename": self.path, "size": self.size, "blobId": self.git_oid}
        if self.lfs_sha256 is not None:
            pointer_size = len(lfs_pointer(self.lfs_sha256, self.size))
            sibling["lfs"] = {"sha256": self.lfs_sha256, "size": self.size, "pointerSize": pointer_size}
        return sibling


def read_folder(folder: Path) -> dict[str, HubFile]:
    """Every file under `folder` (symlinks followed, `.git` skipped) as a repo file keyed by its posix path."""
    if not folder.is_dir():
        raise FileNotFoundError(f"Cannot serve {folder} as a repo: it is not a folder.")
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file() or rel == ".git" or rel.startswith(".git/"):
            continue
        content = path.read_bytes()
        is_lfs = path.suffix.lower() in LFS_SUFFIXES or len(content) >= LFS_MIN_SIZE
        files[rel] = HubFile(rel, content, hashlib.sha256(content).hexdigest() if is_lfs else None)
    return files


def commit_sha(repo_id: str, revision: str, files: dict[str, HubFile]) -> str:
    """A fixed 40-hex commit id: the same repo, revision name and content always give the same sha."""
    digest = hashlib.sha1(f"{repo_id}\0{revision}\0".encode())
    for path, hub_file in sorted(files.items()):
        digest.update(f"{path}\0{hub_file.etag}\0".encode())
    return digest.hexdigest()


@dataclass
class HubRepo:
    repo_id: str
    gated: bool
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag name -> commit sha
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)  # commit sha -> files

    def resolve(self, revision: str) -> str | None:
        """The commit sha a revision (branch, tag or full commit sha) names, or None."""
        if revision in self.commits:
            return revision
        return self.refs.get(revision)


@dataclass
class LoggedRequest:
    """One request as the server saw it. `status` and the routing fields are set before any body byte
    is sent, so a client that has returned always finds its requests complete in the log."""

    method: str
    path: str  # URL path, percent-decoded, without the query
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    status: int = 0
    repo_id: str | None = None
    revision: str | None = None
    filename: str | None = None  # set for `resolve` requests
    content_bytes: int = 0  # body length announced in Content-Length (a broken-off GET sent fewer)
    broken: bool = False  # closed by `break_download` before the body was complete

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")

    @property
    def range(self) -> str | None:
        return self.headers.get("range")

    @property
    def served_content(self) -> bool:
        """A GET on `resolve` that answered with file bytes (200 or 206), broken off or not."""
        return self.method == "GET" and self.filename is not None and self.status in (200, 206)


@dataclass
class _Response:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    break_after: int | None = None  # send only this many body bytes, then close


class HubServer:
    """The loopback Hub: add repos, tokens and broken downloads, start it, point a client at `url`."""

    def __init__(self) -> None:
        self._repos: dict[str, HubRepo] = {}
        self._grants: dict[str, set[str]] = {}  # valid token -> repo ids it may read when gated/private
        self._breaks: dict[tuple[str, str], list[int | None]] = {}  # (repo, file) -> [after_bytes, times]
        self._log: list[LoggedRequest] = []
        self._lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("The hub server is not running: call start() or use it as a context manager.")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """The value for `HF_ENDPOINT`."""
        return f"http://{HOST}:{self.port}"

    def start(self) -> HubServer:
        if self._httpd is not None:
            raise RuntimeError("The hub server is already running.")
        self._httpd = _HTTPServer((HOST, 0), _Handler, self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": SERVE_POLL_S}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, close every open connection (idle keep-alives included) and free the port."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.close_connections()
        self._httpd.server_close()
        assert self._thread is not None
        self._thread.join(timeout=STOP_TIMEOUT_S)
        self._httpd, self._thread = None, None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- content ---------------------------------------------------------------------------------

    def add_repo(
        self, repo_id: str, folder: Path | str, *, revision: str = "main", gated: bool = False, private: bool = False
    ) -> str:
        """Serve `folder` as model repo `repo_id` ("owner/name") at branch `revision`; return its commit sha.

        A gated repo's files need a token granted with `add_token`; a private repo is invisible
        (RepoNotFound) to every other request.
        """
        _check_repo_id(repo_id)
        with self._lock:
            if repo_id in self._repos:
                raise ValueError(f"Repo {repo_id!r} is already served; use add_revision to add a commit.")
            self._repos[repo_id] = HubRepo(repo_id, gated=gated, private=private)
        return self.add_revision(repo_id, folder, revision)

    def add_revision(self, repo_id: str, folder: Path | str, revision: str) -> str:
        """Add a commit with the content of `folder` to a served repo, named by branch or tag `revision`."""
        files = read_folder(Path(folder))
        sha = commit_sha(repo_id, revision, files)
        with self._lock:
            repo = self._repos.get(repo_id)
            if repo is None:
                raise KeyError(f"Repo {repo_id!r} is not served; add it with add_repo first.")
            repo.commits[sha] = files
            repo.refs[revision] = sha
        return sha

    def add_token(self, token: str, *repo_ids: str) -> None:
        """Make `token` a valid user token, granted access to the gated or private `repo_ids`."""
        with self._lock:
            self._grants.setdefault(token, set()).update(repo_ids)

    def break_download(self, repo_id: str, filename: str, *, after_bytes: int | None = None, times: int = 1) -> None:
        """Make the next `times` GETs of a file send the full Content-Length, then close after `after_bytes`
        body bytes (default: half the body). Later GETs, and `Range` requests, are served normally.

        The client resumes with `Range` only past whole 10 MiB chunks (`CLIENT_CHUNK_SIZE`): break a
        larger file after more than that to see a 206; below it the client simply starts over.
        """
        if times < 1:
            raise ValueError(f"times must be at least 1, got {times}.")
        with self._lock:
            self._breaks[(repo_id, filename)] = [after_bytes, times]

    # -- the log ---------------------------------------------------------------------------------

    @property
    def requests(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._log)

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    def downloads(self, repo_id: str | None = None) -> list[str]:
        """Files whose bytes were sent (GET answered 200 or 206), in order, for one repo or all."""
        return [
            r.filename
            for r in self.requests
            if r.served_content and r.filename is not None and repo_id in (None, r.repo_id)
        ]

    def served_count(self, repo_id: str, filename: str) -> int:
        """How many GETs of this file were answered with its bytes (broken-off ones included)."""
        return sum(1 for r in self.requests if r.served_content and (r.repo_id, r.filename) == (repo_id, filename))

    # -- pointing clients at it ------------------------------------------------------------------

    def client_env(
        self, hf_home: Path | str, *, offline: bool = False, base: dict[str, str] | None = None
    ) -> dict[str, str]:
        """Environment for a subprocess client: this endpoint, a cache under `hf_home/hub`, no ambient token.

        Add `HF_TOKEN` (or whatever variable the program maps onto the client's `token=`) yourself.
        """
        env = dict(os.environ if base is None else base)
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN", "HUGGINGFACE_HUB_CACHE",
                     "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE", "HUGGINGFACE_CO_STAGING", "HF_TOKEN_PATH"):
            env.pop(name, None)
        no_proxy = ",".join(p for p in (env.get("NO_PROXY") or env.get("no_proxy"), HOST, "localhost") if p)
        env.update(
            HF_ENDPOINT=self.url,
            HF_HOME=str(hf_home),
            HF_HUB_CACHE=str(Path(hf_home) / "hub"),
            HF_HUB_OFFLINE="1" if offline else "0",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            NO_PROXY=no_proxy,
            no_proxy=no_proxy,
        )
        return env

    def patch_client(self, monkeypatch: pytest.MonkeyPatch, hf_home: Path | str, *, offline: bool = False) -> None:
        """Point the in-process `huggingface_hub` at this server and a cache under `hf_home/hub`, as
        `client_env` does for a subprocess (the client read its environment at import)."""
        from huggingface_hub import constants

        hf_home = str(hf_home)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
        monkeypatch.setattr(constants, "ENDPOINT", self.url)
        url_template = self.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url_template)
        monkeypatch.setattr(constants, "HF_HOME", hf_home)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", os.path.join(hf_home, "hub"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", os.path.join(hf_home, "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", os.path.join(hf_home, "stored_tokens"))
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", os.path.join(hf_home, ".agent_harnesses.json"))

    # -- request handling (called from the server's threads) ------------------------------------

    def _handle(self, handler: _Handler, method: str) -> None:
        split = urlsplit(handler.path)
        raw_segments = split.path.split("/")[1:]
        entry = LoggedRequest(
            method=method,
            path=unquote(split.path),
            query={k: v[-1] for k, v in parse_qs(split.query).items()},
            headers={k.lower(): v for k, v in handler.headers.items()},
        )
        response = self._route(method, raw_segments, entry)
        entry.status = response.status
        entry.content_bytes = len(response.body)
        entry.broken = response.break_after is not None
        with self._lock:
            self._log.append(entry)
        _write(handler, response, head_only=method == "HEAD")

    def _route(self, method: str, segments: list[str], entry: LoggedRequest) -> _Response:
        if method not in ("GET", "HEAD"):
            return _json_error(405, None, f"Method {method} is not supported by the test hub.")
        if segments == ["api", "agent-harnesses"]:
            return _json(200, {"standardEnvVars": [], "harnesses": {}})
        if len(segments) >= 4 and segments[:2] == ["api", "models"]:
            entry.repo_id = f"{unquote(segments[2])}/{unquote(segments[3])}"
            return self._api(entry, segments[4:])
        if len(segments) >= 5 and segments[2] == "resolve":
            entry.repo_id = f"{unquote(segments[0])}/{unquote(segments[1])}"
            entry.revision = unquote(segments[3])
            entry.filename = unquote("/".join(segments[4:]))
            return self._resolve(entry)
        return _json_error(404, None, "Sorry, we can't find the page you are looking for.")

    def _authorize(self, entry: LoggedRequest, *, files: bool) -> tuple[HubRepo | None, _Response | None]:
        """The repo the request names, or the Hub's answer when the caller may not see it."""
        token = _bearer_token(entry.authorization)
        with self._lock:
            repo = self._repos.get(entry.repo_id or "")
            valid = token is not None and token in self._grants
            granted = valid and entry.repo_id in self._grants[token]  # type: ignore[index]
        if token is not None and not valid:
            return None, _json_error(401, None, INVALID_TOKEN_MESSAGE)
        if repo is None or (repo.private and not granted):
            # The Hub answers 401 to anonymous callers so as not to tell which private repos exist.
            return None, _json_error(404 if valid else 401, "RepoNotFound", "Repository not found")
        if repo.gated and files and not granted:
            if valid:
                message = (f"Access to model {repo.repo_id} is restricted and you are not in the authorized list."
                           f" Visit https://huggingface.co/{repo.repo_id} to ask for access.")
                return None, _json_error(403, "GatedRepo", message)
            message = (f"Access to model {repo.repo_id} is restricted. You must have access to it"
                       " and be authenticated to access it. Please log in.")
            return None, _json_error(401, "GatedRepo", message)
        return repo, None

    def _api(self, entry: LoggedRequest, rest: list[str]) -> _Response:
        repo, denied = self._authorize(entry, files=False)
        if denied is not None:
            return denied
        assert repo is not None
        if not rest:
            entry.revision = "main"
        elif rest[0] in ("revision", "tree") and len(rest) >= 2:
            entry.revision = unquote(rest[1])
        else:
            return _json_error(404, None, "Sorry, we can't find the page you are looking for.")
        sha = repo.resolve(entry.revision)
        if sha is None:
            return _json_error(404, "RevisionNotFound", f"Invalid rev id: {entry.revision}")
        files = repo.commits[sha]
        if rest and rest[0] == "tree":
            folder = unquote("/".join(rest[2:])).strip("/")
            recursive = entry.query.get("recursive", "false").lower() in ("1", "true")
            listing = _tree(files, folder, recursive)
            if listing is None:
                return _json_error(404, "EntryNotFound", f"{folder} does not exist on \"{entry.revision}\"")
            return _json(200, listing)
        with_metadata = entry.query.get("blobs", "false").lower() in ("1", "true")
        return _json(200, _model_info(repo, sha, files, with_metadata))

    def _resolve(self, entry: LoggedRequest) -> _Response:
        repo, denied = self._authorize(entry, files=True)
        if denied is not None:
            return denied
        assert repo is not None and entry.revision is not None and entry.filename is not None
        sha = repo.resolve(entry.revision)
        if sha is None:
            return _json_error(404, "RevisionNotFound", f"Invalid rev id: {entry.revision}")
        hub_file = repo.commits[sha].get(entry.filename)
        if hub_file is None:
            return _json_error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": sha})

        headers = {
            "Content-Type": _content_type(hub_file.path),
            "Accept-Ranges": "bytes",
            "ETag": f'"{hub_file.etag}"',
            "X-Repo-Commit": sha,
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(Path(hub_file.path).name)};",
        }
        if hub_file.lfs_sha256 is not None:
            headers["X-Linked-Etag"] = f'"{hub_file.lfs_sha256}"'
            headers["X-Linked-Size"] = str(hub_file.size)

        start = _range_start(entry.range)
        if start is not None and start >= hub_file.size:
            headers["Content-Range"] = f"bytes */{hub_file.size}"
            return _Response(416, headers)
        if start is not None and start > 0:
            headers["Content-Range"] = f"bytes {start}-{hub_file.size - 1}/{hub_file.size}"
            response = _Response(206, headers, hub_file.content[start:])
        else:
            response = _Response(200, headers, hub_file.content)
        if entry.method == "GET":
            response.break_after = self._take_break(repo.repo_id, hub_file.path, len(response.body))
        return response

    def _take_break(self, repo_id: str, filename: str, body_size: int) -> int | None:
        """Consume one planned break of this file, if any: how many body bytes to send before closing."""
        with self._lock:
            plan = self._breaks.get((repo_id, filename))
            if plan is None:
                return None
            after_bytes, times = plan
            if times == 1:
                del self._breaks[(repo_id, filename)]
            else:
                plan[1] = times - 1  # type: ignore[operator]
        after = body_size // 2 if after_bytes is None else after_bytes
        return max(0, min(after, body_size - 1))


def _check_repo_id(repo_id: str) -> None:
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise ValueError(f"A served repo id must look like 'owner/name', got {repo_id!r}.")


def _bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else authorization


def _range_start(range_header: str | None) -> int | None:
    """The first byte asked by `Range: bytes=N-` or `bytes=N-M` (the end is ignored: the client never
    sends one), or None when there is no Range header the server understands."""
    match = re.fullmatch(r"\s*bytes=(\d+)-(\d*)\s*", range_header or "")
    return int(match.group(1)) if match else None


def _content_type(path: str) -> str:
    if path.endswith(".json"):
        return "application/json; charset=utf-8"
    if path.endswith((".txt", ".md", ".yaml", ".yml", ".py")):
        return "text/plain; charset=utf-8"
    return "application/octet-stream"


def _tree(files: dict[str, HubFile], folder: str, recursive: bool) -> list[dict[str, Any]] | None:
    """The tree API's listing of `folder` ("" for the root): folders first, as the Hub lists them."""
    prefix = f"{folder}/" if folder else ""
    inside = [path for path in files if path.startswith(prefix)]
    if folder and not inside:
        return None
    dirs: set[str] = set()
    listed_files: list[HubFile] = []
    for path in inside:
        parts = path[len(prefix):].split("/")
        depth = len(parts) if recursive else 1
        for i in range(1, min(depth, len(parts) - 1) + 1):
            dirs.add(prefix + "/".join(parts[:i]))
        if recursive or len(parts) == 1:
            listed_files.append(files[path])
    dir_entries = [
        {"type": "directory", "oid": hashlib.sha1(f"tree\0{d}".encode()).hexdigest(), "size": 0, "path": d}
        for d in sorted(dirs)
    ]
    return dir_entries + [f.tree_entry() for f in sorted(listed_files, key=lambda f: f.path)]


def _model_info(repo: HubRepo, sha: str, files: dict[str, HubFile], with_metadata: bool) -> dict[str, Any]:
    owner = repo.repo_id.split("/")[0]
    return {
        "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
        "id": repo.repo_id,
        "modelId": repo.repo_id,
        "author": owner,
        "sha": sha,
        "lastModified": COMMIT_DATE,
        "createdAt": COMMIT_DATE,
        "private": repo.private,
        "gated": "manual" if repo.gated else False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "library_name": "diffusers" if "model_index.json" in files else None,
        "siblings": [files[path].sibling(with_metadata) for path in sorted(files)],
        "usedStorage": sum(f.size for f in files.values()),
    }


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> _Response:
    return _Response(
        status, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, json.dumps(payload).encode()
    )


def _json_error(status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> _Response:
    error_headers = {"X-Error-Message": message, **(headers or {})}
    if code is not None:
        error_headers["X-Error-Code"] = code
    return _json(status, {"error": message}, error_headers)


def _write(handler: _Handler, response: _Response, *, head_only: bool) -> None:
    handler.send_response(response.status)
    for name, value in response.headers.items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(response.body)))
    if response.break_after is not None:
        handler.send_header("Connection", "close")
    handler.end_headers()
    if head_only:
        return
    if response.break_after is None:
        handler.wfile.write(response.body)
        return
    # Broken-off download: the promised Content-Length is never reached. Closing gracefully (FIN, not RST)
    # makes the client see a short body, as when a proxy or the network drops a long transfer.
    handler.wfile.write(response.body[: response.break_after])
    handler.wfile.flush()
    handler.close_connection = True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the Hub; the client pools connections
    timeout = IDLE_CONNECTION_TIMEOUT_S
    server: _HTTPServer

    def do_GET(self) -> None:
        self.server.hub._handle(self, "GET")

    def do_HEAD(self) -> None:
        self.server.hub._handle(self, "HEAD")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.server.hub._handle(self, "POST")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log is HubServer.requests


class _HTTPServer(ThreadingHTTPServer):
    """Threading server that remembers open connections so `stop` can close idle keep-alives."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[_Handler], hub: HubServer) -> None:
        self.hub = hub
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = super().get_request()
        with self._connections_lock:
            self._connections.add(connection)
        return connection, address

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the client hung up mid-response (it gave up, or its process ended): not a server bug
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer


@pytest.fixture
def hub_server() -> Iterator[Callable[[], HubServer]]:
    """Factory of started loopback hubs: `hub = hub_server()`. Every hub it made stops at teardown."""
    servers: list[HubServer] = []

    def start() -> HubServer:
        server = HubServer().start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
