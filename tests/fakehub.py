"""A small Hugging Face Hub stand-in on 127.0.0.1 for tests: the endpoints huggingface_hub calls.

Serves repo info (`/api/models/{id}[/revision/{rev}]`), file resolve (`/{id}/resolve/{rev}/{path}`,
HEAD and GET, with Range, ETag, X-Repo-Commit, Content-Length / Content-Range), and the upload flow
(`/api/repos/create`, `/api/models/{id}/branch/{b}`, `/api/validate-yaml`, `/api/models/{id}/preupload/{rev}`
answering "regular" for every file, `/api/models/{id}/commit/{rev}` taking the ndjson payload).
Every request is logged; `cut_once[path] = n` closes the connection after n body bytes of the
first download of `path` (a GET without Range), `cut_range_once[path] = n` of its first ranged GET;
`on_get(path)` observes downloads as they start.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlsplit


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    def commit(self, files: dict[str, bytes], branch: str, message: str) -> str:
        h = hashlib.sha1(repr((sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items()), len(self.commits), message)).encode())
        sha = h.hexdigest()
        self.commits[sha] = dict(files)
        self.branches[branch] = sha
        self.messages.append(message)
        return sha

    def at(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        sha = self.branches.get(revision, revision)
        return (sha, self.commits[sha]) if sha in self.commits else None


class FakeHub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.log: list[dict] = []
        self.cut_once: dict[str, int] = {}
        self.cut_range_once: dict[str, int] = {}  # the same for the first ranged GET (a header read)
        self.on_get: Callable[[str], None] | None = None
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- content

    def add_folder(self, repo_id: str, folder: Path, *, branch: str = "main", private: bool = False) -> str:
        files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}
        repo = self.repos.setdefault(repo_id, Repo(private=private))
        return repo.commit(files, branch, f"add {folder.name}")

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        found = self.repos[repo_id].at(revision)
        return dict(found[1]) if found else {}

    def requests(self, method: str | None = None, contains: str = "") -> list[dict]:
        with self.lock:
            return [r for r in self.log if (method is None or r["method"] == method) and contains in r["path"]]

    # -- server

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fakehub", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


_INFO = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/(.+))?$")
_ACTION = re.compile(r"^/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    # -- plumbing

    def _record(self) -> dict:
        path = unquote(urlsplit(self.path).path)
        entry = {
            "method": self.command, "path": path, "range": self.headers.get("Range"),
            "authorization": self.headers.get("Authorization"), "status": None,
        }
        with self.hub.lock:
            self.hub.log.append(entry)
        return entry

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, entry: dict, status: int, body: bytes = b"", headers: dict | None = None, *, head: bool = False):
        entry["status"] = status
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, entry: dict, status: int, data, headers: dict | None = None):
        self._send(entry, status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, entry: dict, status: int, code: str, message: str, headers: dict | None = None, head: bool = False):
        h = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json", **(headers or {})}
        self._send(entry, status, json.dumps({"error": message}).encode(), h, head=head)

    # -- verbs

    def do_HEAD(self):
        entry = self._record()
        match = _RESOLVE.match(entry["path"])
        if not match:
            return self._error(entry, 404, "NotFound", "unknown endpoint", head=True)
        self._resolve(entry, *match.groups(), head=True)

    def do_GET(self):
        entry = self._record()
        path = entry["path"]
        if match := _RESOLVE.match(path):
            return self._resolve(entry, *match.groups(), head=False)
        if (match := _INFO.match(path)) and "/preupload/" not in path:
            repo_id, revision = match.group(1), match.group(2) or "main"
            repo = self.hub.repos.get(repo_id)
            if repo is None:
                return self._error(entry, 404, "RepoNotFound", "Repository not found")
            found = repo.at(revision)
            if found is None:
                return self._error(entry, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
            sha, files = found
            return self._json(entry, 200, {
                "id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private, "tags": [],
                "siblings": [{"rfilename": name} for name in sorted(files)],
            })
        self._error(entry, 404, "NotFound", "unknown endpoint")

    def do_POST(self):
        entry = self._record()
        path = entry["path"]
        body = self._body()
        if path == "/api/repos/create":
            data = json.loads(body)
            repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
            entry["payload"] = data
            if repo_id in self.hub.repos:  # the Hub's 409 names the repo's url, which create_repo(exist_ok) returns
                h = {"X-Error-Code": "RepoExists", "X-Error-Message": "You already created this model repo",
                     "Content-Type": "application/json"}
                body = {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"}
                return self._send(entry, 409, json.dumps(body).encode(), h)
            self.hub.repos[repo_id] = Repo(private=data.get("visibility") == "private" or bool(data.get("private")))
            repo = self.hub.repos[repo_id]
            repo.commit({".gitattributes": b"*.safetensors filter=lfs\n"}, "main", "initial commit")
            return self._json(entry, 200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})
        if path == "/api/validate-yaml":
            return self._json(entry, 200, {"errors": [], "warnings": []})
        match = _ACTION.match(path)
        if not match:
            return self._error(entry, 404, "NotFound", "unknown endpoint")
        repo_id, action, revision = match.groups()
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(entry, 404, "RepoNotFound", "Repository not found")
        if action == "branch":
            if revision in repo.branches:
                return self._error(entry, 409, "BranchExists", "Branch already exists")
            repo.branches[revision] = repo.branches["main"]
            return self._json(entry, 200, {})
        found = repo.at(revision)
        if found is None:
            return self._error(entry, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        sha, files = found
        if action == "preupload":
            wanted = json.loads(body)["files"]
            entry["asked"] = sorted(f["path"] for f in wanted)
            return self._json(entry, 200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": git_blob_sha1(files[f["path"]]) if f["path"] in files else None}
                for f in wanted
            ]})
        # commit: ndjson lines {"key": "header"|"file"|"deletedFile"|..., "value": {...}}
        new_files = dict(files)
        summary = ""
        for line in body.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                content = value["content"]
                new_files[value["path"]] = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
            elif key == "deletedFile":
                new_files.pop(value["path"], None)
            else:
                return self._error(entry, 400, "BadRequest", f"fake hub does not support {key}")
        entry["committed"] = sorted(set(new_files) - set(files) | {k for k in new_files if files.get(k) != new_files[k]})
        oid = repo.commit(new_files, revision if revision in repo.branches else "main", summary)
        self._json(entry, 200, {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None})

    def _resolve(self, entry: dict, repo_id: str, revision: str, name: str, *, head: bool):
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(entry, 404, "RepoNotFound", "Repository not found", head=head)
        found = repo.at(revision)
        if found is None:
            return self._error(entry, 404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
        sha, files = found
        if name not in files:
            return self._error(entry, 404, "EntryNotFound", f"{name} does not exist", {"X-Repo-Commit": sha}, head=head)
        data = files[name]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"', "Accept-Ranges": "bytes"}
        start, stop = 0, len(data)
        status = 200
        if (spec := self.headers.get("Range")) and (m := _RANGE.match(spec)):
            start = int(m.group(1))
            stop = min(len(data), int(m.group(2)) + 1) if m.group(2) else len(data)
            if start >= len(data):
                return self._error(entry, 416, "RangeNotSatisfiable", "bad range", {"Content-Range": f"bytes */{len(data)}"}, head=head)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
        if head:
            return self._send(entry, status, data[start:stop], headers, head=True)
        whole = self.headers.get("Range") is None  # a download, not a header read
        if whole and self.hub.on_get is not None:
            self.hub.on_get(name)
        cut = (self.hub.cut_once if whole else self.hub.cut_range_once).pop(name, None)
        if cut is None:
            return self._send(entry, status, data[start:stop], headers)
        entry["status"] = status
        entry["cut_at"] = cut
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(stop - start))
        self.end_headers()
        self.wfile.write(data[start:stop][:cut])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)  # the client sees the body end early
