"""What an edge setting's value may be: kinds that parse raw text or TOML values, checks on
the typed value, and the cloud address's syntax.

Boundary: pure parsing, no files, no environment, no sources. A failure raises
:class:`BadValue` with a message that lacks where the value came from; :mod:`edge.config`
adds that and raises its ``ConfigError``.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class BadValue(Exception):
    """A value failed to parse or check; the message lacks the source (config.py adds it)."""


# --------------------------------------------------------------------------- kinds
# A kind turns a raw value into a typed one: ``text`` for environment variables,
# ``value`` for TOML values and flags (already typed, but strings are accepted from flags).


@dataclass(frozen=True)
class ValueKind:
    label: str  # "a number", "an integer", ...
    text: Callable[[str], object]
    value: Callable[[object], object]


def _int_text(s: str) -> int:
    s = s.strip()
    if not re.fullmatch(r"[+-]?\d+", s):
        raise BadValue("must be an integer")
    return int(s)


def _int_value(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, str):
            return _int_text(v)
        raise BadValue("must be an integer")
    return v


def _float_text(s: str) -> float:
    try:
        f = float(s.strip())
    except ValueError:
        raise BadValue("must be a number") from None
    if math.isnan(f):
        raise BadValue("must be a number")
    return f


def _float_value(v: object) -> float:
    if isinstance(v, str):
        return _float_text(v)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise BadValue("must be a number")
    if math.isnan(v):
        raise BadValue("must be a number")
    return float(v)


_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}


def _bool_text(s: str) -> bool:
    t = s.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise BadValue("must be one of 1/0/true/false/yes/no")


def _bool_value(v: object) -> bool:
    if isinstance(v, bool):
        return v
    raise BadValue("must be true or false")


def _str_text(s: str) -> str:
    if not s.strip():
        raise BadValue("must not be empty")
    return s.strip()


def _str_value(v: object) -> str:
    if not isinstance(v, str):
        raise BadValue("must be a string")
    return _str_text(v)


INT = ValueKind("an integer", _int_text, _int_value)
FLOAT = ValueKind("a number", _float_text, _float_value)
BOOL = ValueKind("a boolean", _bool_text, _bool_value)
STR = ValueKind("a string", _str_text, _str_value)
PATH = ValueKind("a path", _str_text, _str_value)  # a STR that gets ~ expanded (see _finish)


def choice(*options: str) -> ValueKind:
    def text(s: str) -> str:
        t = s.strip().lower()
        if t not in options:
            raise BadValue("must be one of " + ", ".join(options))
        return t

    def value(v: object) -> str:
        if not isinstance(v, str):
            raise BadValue("must be one of " + ", ".join(options))
        return text(v)

    return ValueKind("one of " + ", ".join(options), text, value)


# --------------------------------------------------------------------------- checks

Check = Callable[[Any], None]  # raises BadValue


def between(
    lo: float | None, hi: float | None, *, lo_open: bool = False, hi_open: bool = False
) -> Check:
    def check(v: float) -> None:
        ok = (lo is None or (v > lo if lo_open else v >= lo)) and (
            hi is None or (v < hi if hi_open else v <= hi)
        )
        if ok and math.isfinite(v):
            return
        if lo is not None and hi is not None:
            left, right = ("(" if lo_open else "["), (")" if hi_open else "]")
            if not lo_open and not hi_open:
                raise BadValue(f"must be between {lo} and {hi}")
            raise BadValue(f"must be in {left}{lo}, {hi}{right}")
        if lo is not None:
            raise BadValue(f"must be {'>' if lo_open else '>='} {lo}")
        raise BadValue(f"must be {'<' if hi_open else '<='} {hi}")

    return check


_HOST_PORT = re.compile(r"(?P<host>\[[^\[\]]+\]|[^\s:/\[\]@]+):(?P<port>\d{1,5})")
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")


CLOUD_SCHEMES = ("grpc://", "grpcs://")  # as `specthink-cloud serve` prints its address


def split_cloud_address(address: str) -> tuple[str, bool]:
    """(``host:port``, whether the address asks for TLS: ``grpcs://``)."""
    for scheme in CLOUD_SCHEMES:
        if address.startswith(scheme):
            return address[len(scheme) :].rstrip("/"), scheme == "grpcs://"
    return address, False


def host_port(v: str) -> None:
    """``host:port``, port 1..65535; an IPv6 host goes in brackets: ``[::1]:50051``; the
    ``grpc://`` or ``grpcs://`` (TLS) the cloud prints may lead."""
    v, _ = split_cloud_address(v)
    if "://" in v:
        raise BadValue("must be host:port, grpc://host:port or grpcs://host:port")
    m = _HOST_PORT.fullmatch(v)
    if m is None:
        raise BadValue("must be host:port (e.g. localhost:50051, [::1]:50051)")
    host, port = m.group("host"), int(m.group("port"))
    if not 1 <= port <= 65535:
        raise BadValue(f"port must be between 1 and 65535, got {port}")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise BadValue(f"{host} is not an IPv6 address") from None
    elif not _HOSTNAME.fullmatch(host):
        raise BadValue(f"{host!r} is not a host name or address")
