"""A delaying TCP proxy on loopback: every byte is forwarded, each direction `rtt_ms / 2` late.

The benchmark puts it between the edge and the cloud to add round-trip time without
root (no tc netem, no namespaces). Each direction is a reader and a writer joined by a
queue of (due time, bytes): the reader stamps what it reads with `now + one-way delay`,
the writer sleeps until that time and writes. So the delay is latency only: a stream of
chunks is pipelined, not slowed to one chunk per delay, which is how a long link behaves.
asyncio sets TCP_NODELAY on its sockets, so Nagle adds nothing on top.

    python -m scripts.delay_proxy --target 127.0.0.1:50051 --rtt-ms 50 [--port 0]

prints `delay_proxy listening on 127.0.0.1:PORT` once it accepts connections, and runs
until SIGTERM / Ctrl-C. In Python: `with ProxyThread(host, port, rtt_ms=50) as port: ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import threading
from types import TracebackType

_CHUNK = 1 << 16


class DelayProxy:
    """Listens on `listen_host:listen_port` (0 = any free port) and forwards every
    connection to `target_host:target_port`, adding `rtt_ms / 2` in each direction."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        rtt_ms: float = 0.0,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self.target = (target_host, target_port)
        self.one_way_s = max(0.0, rtt_ms) / 2000.0
        self.listen = (listen_host, listen_port)
        self.port = 0
        self.connections = 0
        self.bytes_forwarded = 0
        # with record=True: (read_at, due_at, written_at, bytes) per forwarded piece, on the
        # event loop's clock, so tests can check the rule (due = read + one-way delay)
        self.record = False
        self.forwarded: list[tuple[float, float, float, int]] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, *self.listen)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            try:
                upstream_r, upstream_w = await asyncio.open_connection(*self.target)
            except OSError:
                client_w.close()
                return
            await asyncio.gather(
                self._pipe(client_r, upstream_w),
                self._pipe(upstream_r, client_w),
                return_exceptions=True,
            )
            for w in (client_w, upstream_w):
                w.close()
        except asyncio.CancelledError:
            client_w.close()  # the proxy is closing; end quietly
        finally:
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read -> stamp with its due time -> (queue) -> wait until due -> write."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, float, bytes] | None] = asyncio.Queue()

        async def receive() -> None:
            try:
                while data := await reader.read(_CHUNK):
                    read_at = loop.time()
                    queue.put_nowait((read_at, read_at + self.one_way_s, data))
            except (ConnectionError, OSError):
                pass
            finally:
                queue.put_nowait(None)

        async def send() -> None:
            while (item := await queue.get()) is not None:
                read_at, due, data = item
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                self.bytes_forwarded += len(data)
                if self.record:
                    self.forwarded.append((read_at, due, loop.time(), len(data)))
                await writer.drain()
            with contextlib.suppress(OSError):
                if writer.can_write_eof():
                    writer.write_eof()

        receiving = asyncio.create_task(receive())
        try:
            await send()
        except (ConnectionError, OSError):
            pass
        finally:
            receiving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiving


class ProxyThread:
    """A DelayProxy on its own event loop in a daemon thread; the context gives the port."""

    def __init__(
        self, target_host: str, target_port: int, rtt_ms: float = 0.0, record: bool = False
    ) -> None:
        self.proxy = DelayProxy(target_host, target_port, rtt_ms)
        self.proxy.record = record
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="delay-proxy", daemon=True
        )

    def __enter__(self) -> int:
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self.proxy.start(), self._loop).result(timeout=10)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


async def _serve(target: tuple[str, int], rtt_ms: float, host: str, port: int) -> None:
    proxy = DelayProxy(*target, rtt_ms=rtt_ms, listen_host=host, listen_port=port)
    bound = await proxy.start()
    print(f"delay_proxy listening on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await proxy.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time to add (ms)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0 = any)")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    if not host or not port.isdigit():
        print("delay_proxy: --target must be HOST:PORT", file=sys.stderr)
        return 2
    asyncio.run(_serve((host, int(port)), args.rtt_ms, args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
