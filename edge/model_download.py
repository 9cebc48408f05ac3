"""One file over HTTP into the model store: resumable, locked, verified, renamed into place.

Boundary: `edge.model_hub` resolves specs and the hub's file listings and calls
`download` per file; this module fetches one URL. The file is written to
``FINAL.partial`` (resumed with ``Range: bytes=N-``, locked against a second pull of it),
checked against the expected sha256 and size and for the GGUF magic, then renamed to
FINAL with `os.replace`, so FINAL never holds a half or unverified file. Every failure a
user can cause or fix raises `ModelError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx

try:  # POSIX only; without it concurrent pulls of one file are not detected.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

GGUF_MAGIC = b"GGUF"
PARTIAL_SUFFIX = ".partial"
USER_AGENT = "specthink/0.1 (models)"

_MAX_ATTEMPTS = 5  # per file: the first try plus resumes after dropped connections
_RETRY_PAUSE_S = 0.5
_CHUNK = 1 << 20


class ModelError(Exception):
    """A user-facing failure of the model store; ``str(e)`` is one line for the CLI."""


def is_gguf(file: Path) -> bool:
    """True when ``file`` starts with the GGUF magic bytes."""
    try:
        with open(file, "rb") as f:
            return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


# ---- HTTP answers as one-line errors


def http_error(resp: httpx.Response, what: str, endpoint: str, token: str | None) -> ModelError:
    code = resp.status_code
    if code == 401:
        if token:
            return ModelError(
                f"{what}: the token was rejected by {endpoint} (HTTP 401); "
                "set HF_TOKEN to a valid token"
            )
        return ModelError(
            f"{what}: authentication required by {endpoint} (HTTP 401); set HF_TOKEN "
            "(the repo may be private or gated, or the name may be wrong)"
        )
    if code == 403:
        return ModelError(
            f"{what}: access denied by {endpoint} (HTTP 403); accept the model's terms on "
            "its page and set HF_TOKEN to a token of that account"
        )
    if code == 404:
        return ModelError(f"{what}: no such repo/file on {endpoint} (HTTP 404)")
    if code == 429:
        return ModelError(f"{what}: rate limited by {endpoint} (HTTP 429); try again later")
    return ModelError(f"{what}: HTTP {code} from {endpoint}")


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def reach_error(exc: httpx.HTTPError, endpoint: str) -> ModelError:
    return ModelError(f"cannot reach {endpoint}: {one_line(exc)}")


def auth_headers(token: str | None) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def to_int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


# ---- the transfer


class _Progress:
    """A one-line ``\\r`` progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, label: str, total: int | None, enabled: bool) -> None:
        self.label = label
        self.total = total
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.monotonic()
        self.start_bytes: int | None = None
        self.last = 0.0

    def update(self, done: int, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.start_bytes is None:
            self.start_bytes = done
        if not force and now - self.last < 0.1:
            return
        self.last = now
        rate = (done - self.start_bytes) / max(now - self.start, 1e-6) / 1e6
        mb = done / 1e6
        if self.total:
            pct = 100.0 * done / self.total
            line = f"{self.label}  {pct:5.1f}%  {mb:,.1f}/{self.total / 1e6:,.1f} MB"
        else:
            line = f"{self.label}  {mb:,.1f} MB"
        sys.stderr.write(f"\r{line}  {rate:,.1f} MB/s\x1b[K")
        sys.stderr.flush()

    def close(self, done: int) -> None:
        if self.enabled:
            self.update(done, force=True)
            sys.stderr.write("\n")
            sys.stderr.flush()


@contextlib.contextmanager
def _locked_partial(partial: Path) -> Iterator[IO[bytes]]:
    """Open the partial file for appending, refusing a second concurrent pull of it."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "ab") as fh:
        if fcntl is not None:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                raise ModelError(
                    f"another pull of {partial.name[: -len(PARTIAL_SUFFIX)]} is in progress"
                ) from exc
        try:
            yield fh
        finally:
            # Keep a partial that holds bytes (to resume), not an empty one from a failed
            # start; never touch a file that another pull has since put at that path.
            with contextlib.suppress(OSError):
                st = os.fstat(fh.fileno()) if not fh.closed else None
                if st is not None and st.st_size == 0 and os.path.samestat(st, partial.stat()):
                    partial.unlink()


def _hash_file(file: Path, hasher: Any) -> None:
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)


def download(
    client: httpx.Client,
    url: str,
    final: Path,
    *,
    endpoint: str,
    what: str,
    token: str | None,
    size: int | None,
    sha256: str | None,
    progress: bool,
) -> Path:
    """Fetch ``url`` into ``final.partial`` (resuming it), verify, rename into place."""
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    with _locked_partial(partial) as fh:
        hasher = hashlib.sha256()
        done = partial.stat().st_size
        if size is not None and done > size:
            fh.truncate(0)
            done = 0
        if done:
            _hash_file(partial, hasher)
        bar = _Progress(f"pulling {final.name}", size, progress)
        complete = size is not None and done == size
        attempt = 0
        while not complete:
            attempt += 1
            # Byte offsets must refer to the file itself, never to a compressed encoding.
            headers = {**auth_headers(token), "Accept-Encoding": "identity"}
            if done:
                headers["Range"] = f"bytes={done}-"
            try:
                with client.stream("GET", url, headers=headers, follow_redirects=True) as resp:
                    if resp.status_code == 416 and done:
                        # Nothing left past `done`: either we hold the whole file (the size
                        # was unknown) or the partial is longer than the remote file.
                        total = to_int(resp.headers.get("content-range", "").rpartition("/")[2])
                        if total == done:
                            break
                        fh.truncate(0)
                        done, hasher = 0, hashlib.sha256()
                        continue
                    if resp.status_code == 206 and done:
                        start = _content_range_start(resp.headers.get("content-range"))
                        if start != done:  # resumed somewhere else: distrust it, restart
                            fh.truncate(0)
                            done, hasher = 0, hashlib.sha256()
                            continue
                    elif resp.status_code == 200:
                        # The server ignored our Range (or there was none): start over.
                        if done:
                            fh.truncate(0)
                            done, hasher = 0, hashlib.sha256()
                    else:
                        raise http_error(resp, what, endpoint, token)
                    if size is None:
                        length = to_int(resp.headers.get("content-length"))
                        size = done + length if length is not None else None
                        bar.total = size
                    # Raw network chunks, so a dropped connection loses no received byte.
                    for chunk in resp.iter_raw():
                        fh.write(chunk)
                        hasher.update(chunk)
                        done += len(chunk)
                        bar.update(done)
                fh.flush()
                complete = size is None or done >= size
            except httpx.TransportError as exc:
                fh.flush()
                if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout) and not done:
                    raise reach_error(exc, endpoint) from exc
                if attempt >= _MAX_ATTEMPTS:
                    raise ModelError(
                        f"{what}: download interrupted after {done:,} bytes ({one_line(exc)}); "
                        "run the same pull again to resume"
                    ) from exc
                time.sleep(_RETRY_PAUSE_S * attempt)
                continue
            if not complete and attempt >= _MAX_ATTEMPTS:
                raise ModelError(
                    f"{what}: the server kept ending the transfer early at {done:,} of "
                    f"{size:,} bytes; run the same pull again to resume"
                )
        bar.close(done)

        got = hasher.hexdigest()
        wrong = None
        if sha256 is not None and got != sha256:
            wrong = f"checksum mismatch: expected {sha256}, got {got}"
        elif size is not None and done != size:
            wrong = f"size mismatch: expected {size:,} bytes, got {done:,}"
        elif not is_gguf(partial):
            wrong = "not a GGUF file (no GGUF magic)"
        if wrong is not None:
            fh.close()
            partial.unlink(missing_ok=True)
            raise ModelError(f"{what}: {wrong}; the partial download was removed")
        os.fsync(fh.fileno())
        os.replace(partial, final)
    return final


def _content_range_start(value: str | None) -> int | None:
    m = re.match(r"^\s*bytes\s+(\d+)-", value or "")
    return int(m.group(1)) if m else None


def up_to_date(final: Path, size: int | None, pinned: str | None) -> bool:
    """An installed file of the expected size is kept; with a pinned sha256 it must also
    match it (the file is then downloaded again, replacing it atomically)."""
    if not final.is_file() or size is None or final.stat().st_size != size:
        return False
    if pinned is None:
        return True
    hasher = hashlib.sha256()
    _hash_file(final, hasher)
    return hasher.hexdigest() == pinned
