"""Bearer-token authentication for the cloud's RPCs (health and reflection stay open).

Keys come from a file, one per line (blank lines and # comments ignored). A caller is
known by a short id derived from its key, never by the key itself; sessions are private
to that id.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

from shared import errors

ANONYMOUS = "anonymous"


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


class ApiKeys:
    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode("utf-8") for k in keys]
        if not self._keys:
            raise ValueError("no API keys given")

    @classmethod
    def from_file(cls, path: str | Path) -> ApiKeys:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read API key file {path}: {exc.strerror}") from None
        keys = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not keys:
            raise ValueError(f"API key file {path} holds no key")
        if any(len(k) < 16 for k in keys):
            raise ValueError(f"API key file {path}: keys must be at least 16 characters")
        return cls(keys)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        """The caller's key id, or Unauthenticated."""
        header = next((v for k, v in metadata if k == "authorization"), None)
        if header is None:
            raise errors.Unauthenticated("missing 'authorization: Bearer <key>' metadata")
        value = header.decode("utf-8", "replace") if isinstance(header, bytes) else header
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise errors.Unauthenticated("authorization must be 'Bearer <key>'")
        presented = token.strip().encode("utf-8")
        matched = False
        for known in self._keys:  # compare against every key: no timing hint of which
            matched |= hmac.compare_digest(presented, known)
        if not matched:
            raise errors.Unauthenticated("invalid API key")
        return key_id(token.strip())
