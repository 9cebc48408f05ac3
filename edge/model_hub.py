"""Pulls from Hugging Face compatible endpoints: the hub's file listings and metadata over
HTTP, then each file's transfer (`edge.model_download`) into the store (`edge.models`).
Errors a user can cause or fix are `ModelError`, one line each.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from edge.model_download import (
    ModelError,
    auth_headers,
    download,
    http_error,
    one_line,
    reach_error,
    to_int,
    up_to_date,
)
from edge.models import Spec, group_splits, models_dir, parse_spec, pick_quant, repo_dirname

DEFAULT_ENDPOINT = "https://huggingface.co"

_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class _RemoteFile:
    path: str  # inside the repo
    size: int | None
    sha256: str | None


def _normalise_sha(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    value = value.strip('"').lower()
    return value if _SHA256_RE.match(value) else None  # git sha1 ETags are not checksums


def _list_repo_files(
    client: httpx.Client, endpoint: str, repo: str, token: str | None
) -> list[_RemoteFile]:
    """All files of the repo at ``main``: the tree API (paginated with ``Link``), falling
    back to the model info API's ``siblings``."""
    what = f"listing {repo}"
    url: str | None = (
        f"{endpoint}/api/models/{repo}/tree/main?recursive=True"  # as huggingface_hub sends it
    )
    files: list[_RemoteFile] = []
    try:
        while url:
            resp = client.get(url, headers=auth_headers(token), follow_redirects=True)
            if resp.status_code in (404, 405) and not files:
                return _list_repo_siblings(client, endpoint, repo, token)
            if resp.status_code != 200:
                raise http_error(resp, what, endpoint, token)
            items = _json(resp, what)
            if not isinstance(items, list):
                raise ModelError(f"{what}: unexpected answer from {endpoint}")
            for item in items:
                if isinstance(item, dict) and item.get("type", "file") == "file":
                    lfs = item.get("lfs") or {}
                    files.append(
                        _RemoteFile(
                            path=str(item.get("path", "")),
                            size=_int_or_none(lfs.get("size", item.get("size"))),
                            sha256=_normalise_sha(lfs.get("oid") or lfs.get("sha256")),
                        )
                    )
            nxt = resp.links.get("next", {}).get("url")
            url = str(httpx.URL(url).join(nxt)) if nxt else None
    except httpx.TransportError as exc:
        raise reach_error(exc, endpoint) from exc
    return files


def _list_repo_siblings(
    client: httpx.Client, endpoint: str, repo: str, token: str | None
) -> list[_RemoteFile]:
    what = f"listing {repo}"
    resp = client.get(
        f"{endpoint}/api/models/{repo}?blobs=true",
        headers=auth_headers(token),
        follow_redirects=True,
    )
    if resp.status_code != 200:
        raise http_error(resp, what, endpoint, token)
    info = _json(resp, what)
    siblings = info.get("siblings") if isinstance(info, dict) else None
    if not isinstance(siblings, list):
        raise ModelError(f"{what}: unexpected answer from {endpoint}")
    files = []
    for s in siblings:
        if isinstance(s, dict) and s.get("rfilename"):
            lfs = s.get("lfs") or {}
            files.append(
                _RemoteFile(
                    path=str(s["rfilename"]),
                    size=_int_or_none(lfs.get("size", s.get("size"))),
                    sha256=_normalise_sha(lfs.get("sha256") or lfs.get("oid")),
                )
            )
    return files


def _json(resp: httpx.Response, what: str) -> Any:
    try:
        return resp.json()
    except ValueError as exc:
        raise ModelError(f"{what}: the endpoint did not answer with JSON") from exc


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and value >= 0 else None


def _resolve_files(
    client: httpx.Client, endpoint: str, spec: Spec, token: str | None
) -> list[_RemoteFile]:
    """The remote file(s) the spec names: one file, or all parts of one split model."""
    if spec.filename is not None:
        return [_RemoteFile(path=spec.filename, size=None, sha256=None)]
    files = _list_repo_files(client, endpoint, spec.repo, token)
    ggufs = {f.path: f for f in files if f.path.lower().endswith(".gguf")}
    if not ggufs:
        raise ModelError(f"{spec.repo} on {endpoint} holds no .gguf file")
    if spec.quant is None:
        groups = group_splits(list(ggufs))
        if len(groups) != 1:
            raise ModelError(
                f"{spec.repo} holds {len(groups)} GGUF models; name one with "
                f"{spec.repo}:QUANT or {spec.repo}/FILE: {', '.join(g[0] for g in groups)}"
            )
        return [ggufs[p] for p in groups[0]]
    picked = group_splits(pick_quant(list(ggufs), spec.quant))
    if len(picked) == 1:
        return [ggufs[p] for p in picked[0]]
    candidates = ", ".join(g[0] for g in (picked or group_splits(list(ggufs))))
    if not picked:
        raise ModelError(
            f"no .gguf in {spec.repo} matches {spec.quant!r}; candidates: {candidates}"
        )
    raise ModelError(
        f"{spec.quant!r} is ambiguous in {spec.repo}; candidates: {candidates}; "
        f"use {spec.repo}/FILE"
    )


def _resolve_url(endpoint: str, repo: str, filename: str) -> str:
    return f"{endpoint}/{repo}/resolve/main/{filename}"


def _head_metadata(
    client: httpx.Client, url: str, endpoint: str, what: str, token: str | None
) -> tuple[int | None, str | None]:
    """(size, sha256) from a HEAD on the resolve URL. The Hub answers with a redirect to
    its CDN carrying ``X-Linked-Etag``/``X-Linked-Size``; relative redirects (renamed
    repos) are followed, the CDN is not asked."""
    headers = auth_headers(token)
    try:
        for _ in range(5):
            resp = client.head(url, headers=headers, follow_redirects=False)
            if resp.status_code in (401, 403, 404):
                raise http_error(resp, what, endpoint, token)
            sha = _normalise_sha(resp.headers.get("x-linked-etag"))
            size = _int_or_none(to_int(resp.headers.get("x-linked-size")))
            if sha or size:
                return size, sha
            location = resp.headers.get("location")
            if resp.is_redirect and location and not httpx.URL(location).is_absolute_url:
                url = str(resp.url.join(location))
                continue
            if resp.status_code == 200:
                return (
                    _int_or_none(to_int(resp.headers.get("content-length"))),
                    _normalise_sha(resp.headers.get("etag")),
                )
            return None, None
    except httpx.TransportError as exc:
        raise reach_error(exc, endpoint) from exc
    return None, None


def pull(
    spec: str,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    dest_dir: Path | None = None,
    progress: bool = True,
    client: httpx.Client | None = None,
    sha256: str | None = None,
) -> Path:
    """Download a GGUF into the store and return its local path (for a split model, the
    path of its first part). ``endpoint`` defaults to ``$HF_ENDPOINT`` or the Hub, ``token``
    to ``$HF_TOKEN``, ``dest_dir`` to :func:`models_dir`. ``sha256`` pins the expected
    checksum (for a single file) over the one the endpoint reports."""
    parsed = parse_spec(spec)
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    token = token or os.environ.get("HF_TOKEN") or None
    pinned = None
    if sha256 is not None:
        pinned = _normalise_sha(sha256)
        if pinned is None:
            raise ModelError(f"--sha256 must be 64 hex digits, got {sha256!r}")
    root = dest_dir if dest_dir is not None else models_dir()
    own_client = client is None
    http = client or httpx.Client(timeout=_TIMEOUT, follow_redirects=True)
    try:
        files = _resolve_files(http, endpoint, parsed, token)
        if pinned is not None and len(files) != 1:
            raise ModelError("--sha256 applies to a single file; this model is split in parts")
        target_dir = root / repo_dirname(parsed.repo)
        paths = []
        for remote in files:
            what = f"{parsed.repo}/{remote.path}"
            url = _resolve_url(endpoint, parsed.repo, remote.path)
            size, sha = remote.size, remote.sha256
            if sha is None or size is None:
                head_size, head_sha = _head_metadata(http, url, endpoint, what, token)
                size = size if size is not None else head_size
                sha = sha or head_sha
            sha = pinned or sha
            final = target_dir / remote.path.rsplit("/", 1)[-1]
            if up_to_date(final, size, pinned):
                paths.append(final)
                continue
            paths.append(
                download(
                    http,
                    url,
                    final,
                    endpoint=endpoint,
                    what=what,
                    token=token,
                    size=size,
                    sha256=sha,
                    progress=progress,
                )
            )
        return paths[0]
    except httpx.TransportError as exc:
        raise reach_error(exc, endpoint) from exc
    except httpx.InvalidURL as exc:
        raise ModelError(f"bad endpoint {endpoint!r}: {one_line(exc)}") from exc
    except OSError as exc:  # the local side: disk full, permissions, read-only store
        raise ModelError(f"cannot write to {root}: {one_line(exc)}") from exc
    finally:
        if own_client:
            http.close()
