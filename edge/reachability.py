"""Is the configured cloud there? A quick check run in the background while the small model
loads, so that an unreachable cloud is said once, at the start, in words a person can act
on ("connection refused", "name does not resolve"), and never delays the first token.

Plain sockets say *why* an address cannot be reached (gRPC only says UNAVAILABLE); the
client's GetModelInfo (passed in as a function) then says *what* answers there. Knows
nothing of the session loop, nor of gRPC.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from shared import errors


class ModelInfo(Protocol):
    """What GetModelInfo answers (the fields the check reads)."""

    model_id: str
    context_length: int


@dataclass(frozen=True)
class Reachability:
    """What the check found: `reachable` with the model it serves, or why not."""

    reachable: bool
    why: str = ""  # for a person: "connection refused", "the API key was refused", ...
    key_refused: bool = False  # it answers, but not to our API key
    model_id: str = ""
    dtype: str = ""
    context_length: int = 0


def split_address(address: str) -> tuple[str, int]:
    """("host", port) of a checked host:port (IPv6 in brackets)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def why_unreachable(address: str, timeout_s: float) -> str | None:
    """None when a TCP connection to `address` opens within `timeout_s`, else why not."""
    host, port = split_address(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return f"the name {host!r} does not resolve"
    last = "no address to connect to"
    for family, kind, proto, _, where in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.settimeout(timeout_s)
            try:
                sock.connect(where)
                return None
            except ConnectionRefusedError:
                last = "connection refused (is the cloud running on that port?)"
            except TimeoutError:
                last = f"no answer within {timeout_s:g} s"
            except OSError as exc:
                last = exc.strerror or type(exc).__name__
    return last


def check(model_info: Callable[[], ModelInfo], address: str, timeout_s: float) -> Reachability:
    """Connect, then ask the cloud what it serves (`model_info`: the client's GetModelInfo)."""
    why = why_unreachable(address, timeout_s)
    if why is not None:
        return Reachability(False, why)
    try:
        info = model_info()
    except errors.Unauthenticated:
        return Reachability(False, "it refused the API key (SPECTHINK_API_KEY)", key_refused=True)
    except errors.SpecThinkError as exc:
        return Reachability(False, f"it does not answer as a SpecThink cloud ({exc.message})")
    return Reachability(
        True,
        model_id=info.model_id,
        dtype=getattr(info, "dtype", ""),
        context_length=info.context_length,
    )


class BackgroundCheck:
    """`check` on a daemon thread; `on_done` gets the result (it says the one line)."""

    def __init__(
        self,
        model_info: Callable[[], ModelInfo],
        address: str,
        timeout_s: float,
        on_done: Callable[[Reachability], None],
    ) -> None:
        self.result: Reachability | None = None
        self._done = threading.Event()

        def run() -> None:
            try:
                self.result = check(model_info, address, timeout_s)
            except Exception as exc:  # never let a check break the answer
                self.result = Reachability(False, f"check failed: {exc}")
            on_done(self.result)
            self._done.set()

        threading.Thread(target=run, name="cloud-check", daemon=True).start()

    def peek(self) -> Reachability | None:
        """The result if the check has finished, without waiting."""
        return self.result if self._done.is_set() else None

    def wait(self, timeout_s: float | None = None) -> Reachability | None:
        self._done.wait(timeout_s)
        return self.peek()
