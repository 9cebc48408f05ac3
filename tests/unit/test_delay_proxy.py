"""The benchmark's delaying TCP proxy forwards bytes intact and adds the round-trip time."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from scripts.delay_proxy import ProxyThread


@pytest.fixture
def echo_server() -> Iterator[int]:
    """A loopback TCP echo server on a free port, one thread per connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield port
    stop.set()
    thread.join()
    listener.close()


def _round_trip(port: int, payload: bytes) -> tuple[bytes, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        sock.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            received += chunk
        return received, time.perf_counter() - started


def test_proxy_forwards_bytes_unchanged(echo_server: int) -> None:
    payload = os.urandom(300_000)  # several reads: order and completeness matter
    with ProxyThread("127.0.0.1", echo_server, rtt_ms=0) as port:
        received, _ = _round_trip(port, payload)
    assert received == payload


def test_proxy_adds_the_round_trip_time_once(echo_server: int) -> None:
    with ProxyThread("127.0.0.1", echo_server, rtt_ms=0) as port:
        _, direct = _round_trip(port, b"ping")
    with ProxyThread("127.0.0.1", echo_server, rtt_ms=80) as port:
        received, delayed = _round_trip(port, b"ping")
    assert received == b"ping"
    # request 40 ms one way + reply 40 ms the other: about 80 ms more, not 160
    assert 0.078 <= delayed < 0.078 + direct + 0.07


def test_proxy_pipelines_a_stream_instead_of_delaying_each_chunk(echo_server: int) -> None:
    """Ten small messages sent back to back arrive about one RTT later, not ten."""
    with (
        ProxyThread("127.0.0.1", echo_server, rtt_ms=60) as port,
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
    ):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        for i in range(10):
            sock.sendall(b"%d;" % i)
            time.sleep(0.005)
        expected = b"".join(b"%d;" % i for i in range(10))
        received = b""
        while len(received) < len(expected):
            received += sock.recv(1024)
        elapsed = time.perf_counter() - started
    assert received == expected
    assert 0.058 <= elapsed < 0.3
