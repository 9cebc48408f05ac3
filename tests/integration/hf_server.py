"""A local imitation of the Hugging Face Hub's download URLs, for tests of edge.models.

It serves, on 127.0.0.1 and an ephemeral port, exactly what ``edge.models`` calls:

* ``GET  /api/models/{owner}/{repo}/tree/main``  JSON list of ``{type, path, size, oid,
  lfs: {oid, size, pointerSize}}`` (query strings such as ``?recursive=true`` ignored);
* ``HEAD /{owner}/{repo}/resolve/main/{file}``  like the Hub: a 302 to ``/cdn/...`` with
  ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size`` (or, with ``redirect=False``, a
  200 with ``ETag``);
* ``GET  /{owner}/{repo}/resolve/main/{file}``  the same redirect, then the bytes from
  ``/cdn/...`` with ``Range: bytes=N-`` support (206 + ``Content-Range``, 416 past the end).

Knobs (plain attributes, change them between requests):

* ``token``          require ``Authorization: Bearer <token>`` everywhere (401 otherwise);
* ``cut_after``      the next body transfer sends that many bytes, then drops the
                     connection (once; reset to None afterwards);
* ``corrupt``        flip a byte in every body served (the advertised sha256 stays right);
* ``ignore_range``   answer every GET with 200 and the whole file;
* ``redirect``       imitate the Hub's redirect to a CDN (default True);
* ``allow_head``     when False, HEAD gets 405 (a static mirror that reports no metadata).

Every request is recorded in ``requests`` as ``(method, path, headers)``.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class HubFile:
    data: bytes
    sha256: str

    @classmethod
    def of(cls, data: bytes) -> HubFile:
        return cls(data=data, sha256=hashlib.sha256(data).hexdigest())

    @classmethod
    def from_path(cls, path: Path, sha256: str | None = None) -> HubFile:
        data = path.read_bytes()
        return cls(data=data, sha256=sha256 or hashlib.sha256(data).hexdigest())


class FakeHub:
    """Repos are ``{"owner/repo": {"path/in/repo": HubFile}}``."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, HubFile]] = {}
        self.token: str | None = None
        self.cut_after: int | None = None
        self.corrupt = False
        self.ignore_range = False
        self.redirect = True
        self.allow_head = True
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- setup ---------------------------------------------------------------------
    def add(self, repo: str, path: str, file: HubFile | bytes) -> HubFile:
        hub_file = file if isinstance(file, HubFile) else HubFile.of(file)
        self.repos.setdefault(repo, {})[path] = hub_file
        return hub_file

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inspection ------------------------------------------------------------------
    def range_requests(self) -> list[str]:
        """The Range headers the client sent with its GETs of resolve URLs, in order
        (the copies that follow the redirect to ``/cdn/`` are not repeated)."""
        return [
            h["range"]
            for m, p, h in self.requests
            if m == "GET" and "range" in h and "/resolve/" in p
        ]

    def take_cut(self) -> int | None:
        with self._lock:
            cut, self.cut_after = self.cut_after, None
            return cut


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    # -- helpers ---------------------------------------------------------------------
    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, code: int, obj: object) -> None:
        self._send(code, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _authorised(self) -> bool:
        token = self.hub.token
        if token is None or self.headers.get("Authorization") == f"Bearer {token}":
            return True
        self._json(401, {"error": "Invalid username or password."})
        return False

    def _record(self) -> str:
        path = unquote(urlsplit(self.path).path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.hub.requests.append((self.command, path, headers))
        return path

    # -- routes ----------------------------------------------------------------------
    def do_HEAD(self) -> None:
        if not self.hub.allow_head:
            self._record()
            return self._send(405, b"", {"Allow": "GET"})
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        path = self._record()
        if path.startswith("/cdn/"):  # signed CDN URLs carry no Authorization
            return self._serve_cdn(path[len("/cdn/") :])
        if not self._authorised():
            return None
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/main(?:/.*)?", path)
        if m:
            return self._tree(m.group(1))
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/main/(.+)", path)
        if m:
            return self._resolve(m.group(1), m.group(2))
        return self._json(404, {"error": "Not Found"})

    def _tree(self, repo: str) -> None:
        files = self.hub.repos.get(repo)
        if files is None:
            return self._json(404, {"error": "Repository not found"})
        listing = [
            {
                "type": "file",
                "oid": hashlib.sha1(f.data).hexdigest(),
                "size": len(f.data),
                "path": name,
                "lfs": {"oid": f.sha256, "size": len(f.data), "pointerSize": 134},
            }
            for name, f in files.items()
        ]
        return self._json(200, listing)

    def _lookup(self, repo: str, name: str) -> HubFile | None:
        return self.hub.repos.get(repo, {}).get(name)

    def _resolve(self, repo: str, name: str) -> None:
        f = self._lookup(repo, name)
        if f is None:
            return self._send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound"})
        linked = {
            "X-Linked-Etag": f'"{f.sha256}"',
            "X-Linked-Size": str(len(f.data)),
            "ETag": '"' + hashlib.sha1(f.data).hexdigest() + '"',
        }
        if self.hub.redirect:
            return self._send(302, b"", {**linked, "Location": f"/cdn/{repo}/{name}"})
        if self.command == "HEAD":
            self.send_response(200)
            self.send_header("ETag", f'"{f.sha256}"')
            self.send_header("Content-Length", str(len(f.data)))
            self.end_headers()
            return None
        return self._body(f)

    def _serve_cdn(self, rest: str) -> None:
        m = re.fullmatch(r"([^/]+/[^/]+)/(.+)", rest)
        f = self._lookup(m.group(1), m.group(2)) if m else None
        if f is None:
            return self._send(404, b"NoSuchKey")
        if self.command == "HEAD":
            self.send_response(200)
            self.send_header("ETag", '"not-a-sha256"')
            self.send_header("Content-Length", str(len(f.data)))
            self.end_headers()
            return None
        return self._body(f)

    def _body(self, f: HubFile) -> None:
        data = f.data
        if self.hub.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        start = 0
        rng = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if m and not self.hub.ignore_range:
            start = int(m.group(1))
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            end = int(m.group(2)) + 1 if m.group(2) else len(data)
            body = data[start:end]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = self.hub.take_cut()
        view = memoryview(body)
        limit = len(body) if cut is None else min(cut, len(body))
        step = 1 << 20
        try:
            for i in range(0, limit, step):
                self.wfile.write(view[i : min(i + step, limit)])
            if cut is not None:
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        return None
