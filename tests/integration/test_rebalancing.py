"""Scale-out reaches edges already connected: two real `specthink-cloud serve` processes
(SmolLM2) behind a round-robin TCP proxy on 127.0.0.1 (what kube-proxy does for a
ClusterIP Service: it picks a backend per new TCP connection), and a pool of edges
(the edge's own transport, `edge.cloud_client.GrpcCloud`, and
`edge.cloud_session.CloudSession`) taking over again and again.

Replica A serves alone; the edges connect to it. Replica B starts and joins the proxy's
list. Without a connection age the edges would stay on A for ever (an HTTP/2 connection
lives as long as both ends do); with `--max-connection-age-s` A closes each connection
(GOAWAY) once it is that old, the edges reconnect through the proxy, and B receives
takeovers within max_connection_age (+10% jitter, + the grace for calls in flight).
Sessions that land on B resend their text in full (FAILED_PRECONDITION, then full
text): no takeover fails, and the resends are counted on both sides.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge.cloud_client import ClientOptions, GrpcCloud
from edge.cloud_session import CloudSession
from shared.wire import Message, Sampling, TakeoverDone, TextChunk, WriteSpec
from tests.integration.test_cloud_service import wait_for

pytestmark = [pytest.mark.real_models, pytest.mark.timeout(300)]
AGE_S = 4.0  # --max-connection-age-s of both replicas
GRACE_S = 60.0  # --max-connection-age-grace-s: longer than any takeover, even on a busy CPU
EDGES = 4


class RoundRobinProxy:
    """A TCP proxy on 127.0.0.1 that sends each new connection to the next backend.

    It listens on `fronts` ports (one per edge: gRPC channels to the same address inside
    one process share one connection, and real edges are separate processes)."""

    def __init__(self, backends: list[str], fronts: int) -> None:
        self.backends = list(backends)
        self.connections: Counter[str] = Counter()  # new connections per backend
        self.first_connection: dict[str, float] = {}  # backend -> monotonic time
        self._turn = itertools.count()
        self._listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(fronts)]
        self.addresses = [f"127.0.0.1:{sock.getsockname()[1]}" for sock in self._listeners]
        self._open: list[socket.socket] = []
        self._closed = False
        self._lock = threading.Lock()
        for sock in self._listeners:
            threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def add(self, backend: str) -> None:
        self.backends.append(backend)

    def _accept(self, listener: socket.socket) -> None:
        while not self._closed:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                backend = self.backends[next(self._turn) % len(self.backends)]
            host, port = backend.rsplit(":", 1)
            try:
                upstream = socket.create_connection((host, int(port)), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self.connections[backend] += 1
                self.first_connection.setdefault(backend, time.monotonic())
                self._open += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:  # one side closed: close both (a GOAWAY'd connection ends here)
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        for listener in self._listeners:
            listener.close()
        for s in self._open:
            with contextlib.suppress(OSError):
                s.close()


def _metrics_port(stderr: Path) -> int:
    for line in stderr.read_text().splitlines():
        if line.startswith("{") and '"event": "serving"' in line:
            return int(json.loads(line)["metrics_port"])
    raise AssertionError("no serving line")


def _scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


class Edge:
    """One edge: its own channel to the proxy and one session, taking over in a loop."""

    def __init__(self, address: str, name: str) -> None:
        self.transport = GrpcCloud(ClientOptions(address=address, takeover_timeout_s=60))
        self.session = CloudSession(self.transport, name)
        self.takeovers = 0
        self.longest_s = 0.0  # the longest takeover, from call to final message
        self.failures: list[BaseException] = []
        self.text = "The sea is"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Edge:
        self._thread.start()
        return self

    def _run(self) -> None:
        messages = [Message("user", "Describe the sea in a few words.")]
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                written = ""
                for event in self.session.takeover(
                    messages, self.text, Sampling(temperature=0.0), WriteSpec(max_tokens=2)
                ):
                    if isinstance(event, TextChunk):
                        written += event.text
                    else:
                        assert isinstance(event, TakeoverDone)
                self.text += written + " and"
                self.takeovers += 1
                self.longest_s = max(self.longest_s, time.monotonic() - started)
            except Exception as exc:
                self.failures.append(exc)
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.transport.close()


@pytest.fixture
def replicas(smollm2: Path, tmp_path: Path) -> Iterator[list]:
    from tests.conftest import start_cloud

    started: list = []
    flags = (
        "--metrics-port",
        "0",
        "--max-connection-age-s",
        str(AGE_S),
        "--max-connection-age-grace-s",
        str(GRACE_S),
    )

    def start() -> object:
        cloud = start_cloud(smollm2, tmp_path, *flags)
        started.append(cloud)
        return cloud

    yield [start]
    for cloud in started:
        cloud.stop(timeout=60)


def test_new_replica_gets_new_connections_within_max_connection_age(replicas: list) -> None:
    (start,) = replicas
    a = start()
    proxy = RoundRobinProxy([a.address], fronts=EDGES)
    edges = [Edge(address, f"edge-{i}").start() for i, address in enumerate(proxy.addresses)]
    try:
        wait_for(lambda: all(e.takeovers >= 1 for e in edges), timeout=120, what="edges on A")
        b = start()  # loads its model while the edges keep working on A
        b_metrics = _metrics_port(b.stderr_path)
        assert _scrape(b_metrics).get("specthink:takeovers_total{finish_reason=length}", 0) == 0
        proxy.add(b.address)
        joined = time.monotonic()
        # every edge's connection is closed once it is AGE_S (+10% jitter) old; the edge's
        # next call (after the one in flight, which finishes on the old connection within
        # the grace) opens a new one. The proxy alternates, so of the first two, one is B's.
        wait_for(lambda: proxy.connections[b.address], timeout=AGE_S + 60, what="B connected")
        took = proxy.first_connection[b.address] - joined
        bound = AGE_S * 1.1 + max(e.longest_s for e in edges) + 1.0
        print(
            f"rebalancing: first connection to B {took:.2f} s after B joined (age {AGE_S} s, "
            f"longest takeover {max(e.longest_s for e in edges):.2f} s)"
        )
        assert took <= bound
        wait_for(
            lambda: _scrape(b_metrics).get("specthink:takeovers_total{finish_reason=length}", 0),
            timeout=120,
            what="a takeover on the new replica",
        )
        served = time.monotonic() - joined
        print(f"rebalancing: first takeover done on B {served:.2f} s after B joined")
        before = sum(e.takeovers for e in edges)
        wait_for(lambda: sum(e.takeovers for e in edges) >= before + EDGES, timeout=120)
    finally:
        for e in edges:
            e.stop()
        proxy.close()
    # the edges never noticed: no takeover failed, moved sessions resent their text in full
    assert [e.failures for e in edges] == [[]] * EDGES
    resends = sum(e.session.full_text_resends for e in edges)
    on_b = _scrape(b_metrics)
    assert resends >= 1
    assert on_b.get("specthink:request_errors_total{code=FAILED_PRECONDITION}", 0) >= 1
    assert on_b.get("specthink:session_cache_misses_total", 0) >= 1
    print(f"connections per replica: {dict(proxy.connections)}; full-text resends: {resends}")
