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


def test_proxy_delays_each_direction_by_half_the_round_trip_once(echo_server: int) -> None:
    proxy = ProxyThread("127.0.0.1", echo_server, rtt_ms=80, record=True)
    with proxy as port:
        received, elapsed = _round_trip(port, b"ping")
    assert received == b"ping"
    forwarded = proxy.proxy.forwarded
    # one piece each way (request, echo), each held exactly 40 ms from when it was read,
    # and written no earlier than that: 80 ms added in all, not 160
    assert [n for *_, n in forwarded] == [4, 4]
    for read_at, due, written_at, _ in forwarded:
        assert due - read_at == pytest.approx(0.040)
        assert written_at >= due - 1e-3
    assert elapsed >= 0.080 - 1e-3  # a delay can be longer on a busy machine, never shorter


def test_proxy_pipelines_a_stream_instead_of_delaying_each_chunk(echo_server: int) -> None:
    """Every piece is due one one-way delay after it was READ, whatever is queued before it:
    ten small messages sent back to back are each late by the delay, not by ten of them."""
    proxy = ProxyThread("127.0.0.1", echo_server, rtt_ms=60, record=True)
    expected = b"".join(b"%d;" % i for i in range(10))
    with proxy as port, socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(10):
            sock.sendall(b"%d;" % i)
            time.sleep(0.005)
        received = b""
        while len(received) < len(expected):
            received += sock.recv(1024)
    assert received == expected
    forwarded = proxy.proxy.forwarded
    assert sum(n for *_, n in forwarded) == 2 * len(expected)  # both ways, every byte
    for read_at, due, written_at, _ in forwarded:
        assert due - read_at == pytest.approx(0.030), "stamped when read, not when dequeued"
        assert written_at >= due - 1e-3
