"""The local model store and model specs: where models lie, their names, and which files a
spec means. Pulls from Hugging Face compatible endpoints are `edge.model_hub` (one file's
transfer: `edge.model_download`); the `models` sub-command is `edge.models_cli`.

Modelled on ``ollama pull`` and ``huggingface-cli download``:

    specthink-edge models pull bartowski/DeepSeek-R1-Distill-Qwen-1.5B-GGUF:Q4_K_M
    specthink-edge models list
    specthink-edge models path bartowski/DeepSeek-R1-Distill-Qwen-1.5B-GGUF:Q4_K_M
    specthink-edge models rm bartowski/DeepSeek-R1-Distill-Qwen-1.5B-GGUF:Q4_K_M

Spec forms accepted by ``edge.model_hub.pull``:

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

from edge.model_download import GGUF_MAGIC, PARTIAL_SUFFIX, ModelError, is_gguf

__all__ = [
    "GGUF_MAGIC",
    "ModelEntry",
    "ModelError",
    "is_gguf",
    "list_models",
    "models_dir",
    "path",
    "remove",
]

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


def repo_dirname(repo: str) -> str:
    return repo.replace("/", "--")


def entry(file: Path, name: str) -> ModelEntry:
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
            entries.append(entry(file, file.name))
    for file in root.glob("*--*/*.gguf"):
        if file.is_file():
            repo = file.parent.name.replace("--", "/", 1)
            entries.append(entry(file, f"{repo}/{file.name}"))
    return sorted(entries, key=lambda e: e.name.lower())


def _match_installed(name: str, entries: list[ModelEntry]) -> list[ModelEntry]:
    name = _strip_hub_prefix(name.strip())
    exact = [e for e in entries if e.name == name]
    if exact:
        return exact
    if ":" in name:
        repo, quant = name.rsplit(":", 1)
        in_repo = [e for e in entries if e.name.startswith(repo + "/")]
        picked = pick_quant([e.name.rsplit("/", 1)[1] for e in in_repo], quant)
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
    bundled_file = _bundled(name)
    if not found and bundled_file is not None:
        return bundled_file
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
class Spec:
    repo: str
    filename: str | None  # explicit file inside the repo
    quant: str | None


def _strip_hub_prefix(spec: str) -> str:
    for prefix in ("https://huggingface.co/", "https://hf.co/", "huggingface.co/", "hf.co/"):
        if spec.startswith(prefix):
            return spec[len(prefix) :]
    return spec


def parse_spec(spec: str) -> Spec:
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
    return Spec(repo=repo, filename=filename, quant=quant)


def quant_matches(filename: str, quant: str) -> bool:
    return quant.lower() in filename.rsplit("/", 1)[-1].lower()


def pick_quant(filenames: list[str], quant: str) -> list[str]:
    """Files whose base name contains ``quant`` (case-insensitive). When several do,
    prefer those where it stands as a whole token (``Q4_0`` picks ``x-Q4_0.gguf``
    over ``x-Q4_0_4_4.gguf``)."""
    hits = [f for f in filenames if quant_matches(f, quant)]
    if len(group_splits(hits)) > 1:
        token = re.compile(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])", re.IGNORECASE)
        whole = [f for f in hits if token.search(f.rsplit("/", 1)[-1])]
        if whole:
            return whole
    return hits


def group_splits(filenames: list[str]) -> list[list[str]]:
    """Group the parts of split GGUFs (``x-00001-of-00003.gguf``) into one model each."""
    groups: dict[str, list[str]] = {}
    for f in sorted(filenames):
        key = _SPLIT_RE.sub("", f) if _SPLIT_RE.search(f) else f
        groups.setdefault(key, []).append(f)
    return list(groups.values())


def _bundled(name: str) -> Path | None:
    """The file of a bundled model by the name `models list` shows (e.g. smollm2-135m),
    when its package is installed and the model is in one piece."""
    from edge import bundled

    model = bundled.ALL.get(name.strip().lower())
    parts = bundled.part_paths(model) if model is not None else None
    return parts[0] if parts is not None and len(parts) == 1 else None
