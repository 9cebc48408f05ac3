"""Local model store and pulls from Hugging Face compatible endpoints (names, specs, the hub's file listings; one file's transfer is `edge.model_download`).

Modelled on ``ollama pull`` and ``huggingface-cli download``:

    specthink-edge models pull bartowski/DeepSeek-R1-Distill-Qwen-1.5B-GGUF:Q4_K_M
    specthink-edge models list
    specthink-edge models path bartowski/DeepSeek-R1-Distill-Qwen-1.5B-GGUF:Q4_K_M
    specthink-edge models rm bartowski/DeepSeek-R1-Distill-Qwen-1.5B-GGUF:Q4_K_M

Spec forms accepted by :func:`pull`:

* ``OWNER/REPO:QUANT``      the single ``.gguf`` in the repo whose name contains QUANT
                            (case-insensitive); a split model (``-00001-of-00003.gguf``)
                            counts as one and all its parts are downloaded.
* ``OWNER/REPO/FILE.gguf``  an explicit file (may include sub-folders).
* ``OWNER/REPO``            only when the repo holds exactly one ``.gguf``.

An optional ``hf.co/`` or ``huggingface.co/`` prefix is ignored.

Store layout (under :func:`models_dir`)::

    <models_dir>/<OWNER>--<REPO>/<FILE>.gguf            complete, verified files only
    <models_dir>/<OWNER>--<REPO>/<FILE>.gguf.partial    a download in progress (resumable)

Only the base name of the remote file is kept, so the parts of a split model lie side
by side as llama.cpp expects. A model's *name* in the store is ``OWNER/REPO/FILE.gguf``;
:func:`path` and :func:`remove` also accept ``OWNER/REPO:QUANT``, ``OWNER/REPO`` and a bare
``FILE.gguf`` when these match exactly one installed file.

A download is written to the ``.partial`` file and resumed with ``Range: bytes=N-`` when
one exists (here after a dropped connection, or in a later run after Ctrl-C). When the
expected sha256 is known (the ``sha256=`` argument, the tree API's ``lfs.oid``, or the
``X-Linked-Etag``/``ETag`` header of a HEAD on the resolve URL) the finished file is
checked against it; a mismatch removes the partial file. The file must also start with
the GGUF magic. Only then is it renamed into place with :func:`os.replace`, so the final
path never holds a half or unverified file. An existing final file of the expected size
is taken as up to date and not downloaded again.

Errors: everything a user can cause or fix (bad spec, HTTP 401/403/404, network down,
checksum mismatch, unknown model name) raises :class:`ModelError`, whose message is one
line fit for a CLI error. Programming errors propagate unchanged.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import typer

from edge.model_download import (
    GGUF_MAGIC,
    PARTIAL_SUFFIX,
    ModelError,
    auth_headers,
    download,
    http_error,
    is_gguf,
    one_line,
    reach_error,
    to_int,
    up_to_date,
)

__all__ = [
    "DEFAULT_ENDPOINT",
    "GGUF_MAGIC",
    "ModelEntry",
    "ModelError",
    "is_gguf",
    "list_models",
    "models_app",
    "models_dir",
    "path",
    "pull",
    "remove",
]

DEFAULT_ENDPOINT = "https://huggingface.co"

_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


# --------------------------------------------------------------------------- store


@dataclass(frozen=True)
class ModelEntry:
    """One installed file: ``name`` is ``OWNER/REPO/FILE.gguf`` (or ``FILE.gguf`` when it
    lies directly in the models directory)."""

    name: str
    path: Path
    size: int
    modified: datetime
    valid: bool  # starts with the GGUF magic


def models_dir() -> Path:
    """``$SPECTHINK_MODELS_DIR``, else the per-user data directory:
    ``$XDG_DATA_HOME/specthink/models`` (default ``~/.local/share``) on Linux,
    ``~/Library/Application Support/specthink/models`` on macOS,
    ``%LOCALAPPDATA%\\specthink\\models`` on Windows. Not created here."""
    env = os.environ.get("SPECTHINK_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "specthink" / "models"
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "specthink" / "models"
    xdg = os.environ.get("XDG_DATA_HOME")
    base_dir = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base_dir / "specthink" / "models"


def _repo_dirname(repo: str) -> str:
    return repo.replace("/", "--")


def _entry(file: Path, name: str) -> ModelEntry:
    st = file.stat()
    return ModelEntry(
        name=name,
        path=file,
        size=st.st_size,
        modified=datetime.fromtimestamp(st.st_mtime),
        valid=is_gguf(file),
    )


def list_models(dest_dir: Path | None = None) -> list[ModelEntry]:
    """Installed ``.gguf`` files, sorted by name (partial downloads are not listed)."""
    root = dest_dir if dest_dir is not None else models_dir()
    if not root.is_dir():
        return []
    entries: list[ModelEntry] = []
    for file in root.glob("*.gguf"):
        if file.is_file():
            entries.append(_entry(file, file.name))
    for file in root.glob("*--*/*.gguf"):
        if file.is_file():
            repo = file.parent.name.replace("--", "/", 1)
            entries.append(_entry(file, f"{repo}/{file.name}"))
    return sorted(entries, key=lambda e: e.name.lower())


def _match_installed(name: str, entries: list[ModelEntry]) -> list[ModelEntry]:
    name = _strip_hub_prefix(name.strip())
    exact = [e for e in entries if e.name == name]
    if exact:
        return exact
    if ":" in name:
        repo, quant = name.rsplit(":", 1)
        in_repo = [e for e in entries if e.name.startswith(repo + "/")]
        picked = _pick_quant([e.name.rsplit("/", 1)[1] for e in in_repo], quant)
        return [e for e in in_repo if e.name.rsplit("/", 1)[1] in picked]
    if name.count("/") == 1:
        in_repo = [e for e in entries if e.name.startswith(name + "/")]
        return [e for e in in_repo if _first_part(e.name)]
    return [e for e in entries if e.path.name == name]


def _first_part(filename: str) -> bool:
    m = _SPLIT_RE.search(filename)
    return m is None or int(m.group(1)) == 1


def path(name: str, *, dest_dir: Path | None = None) -> Path:
    """The local path of an installed model (see the module docstring for name forms)."""
    entries = list_models(dest_dir)
    found = _match_installed(name, entries)
    if len(found) == 1:
        return found[0].path
    if not found:
        if not entries:
            raise ModelError(
                f"unknown model {name!r}: no models installed in {dest_dir or models_dir()}"
            )
        raise ModelError(f"unknown model {name!r}; installed: {', '.join(e.name for e in entries)}")
    raise ModelError(
        f"{name!r} matches several models: {', '.join(e.name for e in found)}; use a full name"
    )


def remove(name: str, *, dest_dir: Path | None = None) -> Path:
    """Delete an installed model (and any partial download of it); returns its path."""
    target = path(name, dest_dir=dest_dir)
    target.unlink()
    with contextlib.suppress(FileNotFoundError):
        target.with_name(target.name + PARTIAL_SUFFIX).unlink()
    root = dest_dir if dest_dir is not None else models_dir()
    if target.parent != root:
        with contextlib.suppress(OSError):
            target.parent.rmdir()  # only when empty
    return target


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class _Spec:
    repo: str
    filename: str | None  # explicit file inside the repo
    quant: str | None


@dataclass(frozen=True)
class _RemoteFile:
    path: str  # inside the repo
    size: int | None
    sha256: str | None


def _strip_hub_prefix(spec: str) -> str:
    for prefix in ("https://huggingface.co/", "https://hf.co/", "huggingface.co/", "hf.co/"):
        if spec.startswith(prefix):
            return spec[len(prefix) :]
    return spec


def _parse_spec(spec: str) -> _Spec:
    raw = _strip_hub_prefix(spec.strip())
    quant: str | None = None
    filename: str | None = None
    if ":" in raw:
        raw, quant = raw.rsplit(":", 1)
        if not quant:
            raise ModelError(f"bad model spec {spec!r}: empty quantization after ':'")
    parts = raw.split("/")
    if len(parts) > 2:
        if quant is not None:
            raise ModelError(f"bad model spec {spec!r}: use OWNER/REPO:QUANT or OWNER/REPO/FILE")
        filename = "/".join(parts[2:])
        if not filename.lower().endswith(".gguf") or ".." in parts[2:]:
            raise ModelError(f"bad model spec {spec!r}: the file must be a .gguf file")
    repo = "/".join(parts[:2])
    if not _REPO_RE.match(repo):
        raise ModelError(
            f"bad model spec {spec!r}: expected OWNER/REPO:QUANT, OWNER/REPO/FILE.gguf "
            "or OWNER/REPO"
        )
    return _Spec(repo=repo, filename=filename, quant=quant)


def _quant_matches(filename: str, quant: str) -> bool:
    return quant.lower() in filename.rsplit("/", 1)[-1].lower()


def _pick_quant(filenames: list[str], quant: str) -> list[str]:
    """Files whose base name contains ``quant`` (case-insensitive). When several do,
    prefer those where it stands as a whole token (``Q4_0`` picks ``x-Q4_0.gguf``
    over ``x-Q4_0_4_4.gguf``)."""
    hits = [f for f in filenames if _quant_matches(f, quant)]
    if len(_group_splits(hits)) > 1:
        token = re.compile(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])", re.IGNORECASE)
        whole = [f for f in hits if token.search(f.rsplit("/", 1)[-1])]
        if whole:
            return whole
    return hits


def _group_splits(filenames: list[str]) -> list[list[str]]:
    """Group the parts of split GGUFs (``x-00001-of-00003.gguf``) into one model each."""
    groups: dict[str, list[str]] = {}
    for f in sorted(filenames):
        key = _SPLIT_RE.sub("", f) if _SPLIT_RE.search(f) else f
        groups.setdefault(key, []).append(f)
    return list(groups.values())


# --------------------------------------------------------------------------- HTTP


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
    client: httpx.Client, endpoint: str, spec: _Spec, token: str | None
) -> list[_RemoteFile]:
    """The remote file(s) the spec names: one file, or all parts of one split model."""
    if spec.filename is not None:
        return [_RemoteFile(path=spec.filename, size=None, sha256=None)]
    files = _list_repo_files(client, endpoint, spec.repo, token)
    ggufs = {f.path: f for f in files if f.path.lower().endswith(".gguf")}
    if not ggufs:
        raise ModelError(f"{spec.repo} on {endpoint} holds no .gguf file")
    if spec.quant is None:
        groups = _group_splits(list(ggufs))
        if len(groups) != 1:
            raise ModelError(
                f"{spec.repo} holds {len(groups)} GGUF models; name one with "
                f"{spec.repo}:QUANT or {spec.repo}/FILE: {', '.join(g[0] for g in groups)}"
            )
        return [ggufs[p] for p in groups[0]]
    picked = _group_splits(_pick_quant(list(ggufs), spec.quant))
    if len(picked) == 1:
        return [ggufs[p] for p in picked[0]]
    candidates = ", ".join(g[0] for g in (picked or _group_splits(list(ggufs))))
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
    parsed = _parse_spec(spec)
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
        target_dir = root / _repo_dirname(parsed.repo)
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


# --------------------------------------------------------------------------- CLI

models_app = typer.Typer(
    help="Download and manage local GGUF models (Hugging Face compatible endpoints).",
    no_args_is_help=True,
)


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(1)


@models_app.command("pull")
def _cli_pull(
    spec: str = typer.Argument(..., help="OWNER/REPO:QUANT, OWNER/REPO/FILE.gguf or OWNER/REPO."),
    endpoint: str | None = typer.Option(
        None, "--endpoint", help="Hugging Face compatible endpoint [env: HF_ENDPOINT]."
    ),
    sha256: str | None = typer.Option(None, "--sha256", help="Expected sha256 of the file."),
) -> None:
    """Download a GGUF model (resumable, checksum verified) and print its path.

    Example: specthink-edge models pull bartowski/DeepSeek-R1-Distill-Qwen-1.5B-GGUF:Q4_K_M
    """
    try:
        out = pull(spec, endpoint=endpoint, sha256=sha256)
    except ModelError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        typer.echo("\ninterrupted; run the same pull again to resume", err=True)
        raise typer.Exit(130) from None
    typer.echo(str(out))


@models_app.command("list")
def _cli_list() -> None:
    """List installed models with their sizes, and the bundled default edge model."""
    from edge import bundled

    entries = list_models()
    default = bundled.default_edge_model()
    if default is not None:
        entries.append(_entry(default, f"{bundled.SMOLLM2.name} (bundled default)"))
    if not entries:
        typer.echo(f"no models in {models_dir()} and no bundled default", err=True)
        return
    width = max(len("NAME"), *(len(e.name) for e in entries))
    typer.echo(f"{'NAME':<{width}}  {'SIZE':>10}  MODIFIED")
    for e in entries:
        size = f"{e.size / 1e6:,.1f} MB"
        flag = "" if e.valid else "  (not a GGUF file)"
        typer.echo(f"{e.name:<{width}}  {size:>10}  {e.modified:%Y-%m-%d %H:%M}{flag}")


@models_app.command("rm")
def _cli_rm(name: str = typer.Argument(..., help="Model name as shown by 'models list'.")) -> None:
    """Delete an installed model."""
    try:
        removed = remove(name)
    except ModelError as exc:
        raise _fail(exc) from None
    typer.echo(f"removed {removed}")


@models_app.command("path")
def _cli_path(
    name: str = typer.Argument(..., help="Model name as shown by 'models list'."),
) -> None:
    """Print the local path of an installed model."""
    try:
        found = path(name)
    except ModelError as exc:
        raise _fail(exc) from None
    typer.echo(str(found))
