"""Never lose the answer: `specthink-edge ask`, run as a user runs it, against clouds that
die, stall, refuse, restart or reject it.

Most scenarios use a real `cloud.server.CloudServer` on 127.0.0.1 in this process around
`ScriptedEngine` (exactly `cloud.engine_api.Engine`, with no model), so faults are exact
and cheap; the SIGKILL one kills a real `specthink-cloud serve`. The edge is always the real
CLI in a subprocess; where it has to write on alone it loads the small SmolLM2 GGUF.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from cloud.server import CloudServer, ServerOptions
from cloud.validation import Limits
from shared import errors
from tests.conftest import start_cloud
from tests.integration.cloud_harness import ScriptedEngine as HarnessEngine

BIN = Path(sys.executable).parent
GOOD_KEY = "k" * 24


# ---- a scripted cloud engine ------------------------------------------------------------


def ScriptedEngine(**options: Any) -> HarnessEngine:
    """The cloud harness's scripted engine, writing a paragraph per two tokens by default."""
    options.setdefault("tokens", ("Step one.", "\n\n"))
    return HarnessEngine(**options)


@contextmanager
def serving(engine: HarnessEngine, port: int = 0, **options: Any) -> Iterator[CloudServer]:
    """A started CloudServer on 127.0.0.1 around `engine`."""
    server = CloudServer(
        engine, ServerOptions(host="127.0.0.1", port=port, drain_grace_s=1.0, **options)
    )
    server.start()
    try:
        yield server
    finally:
        stop_server(server)


def stop_server(server: CloudServer) -> None:
    stop_now = getattr(server, "stop_now", None)
    if stop_now is not None:
        stop_now()
    else:  # pragma: no cover - an older CloudServer
        server.server.stop(grace=None).wait()


# ---- the edge, as a user runs it --------------------------------------------------------


def edge_env(tmp: Path | None = None, **env: str) -> dict[str, str]:
    """The environment without the developer's SPECTHINK_* settings or config file."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SPECTHINK_")}
    if tmp is not None:
        base["XDG_CONFIG_HOME"] = str(tmp / "config")
    base["PYTHONUNBUFFERED"] = "1"
    return {**base, **env}


def edge(
    *args: str,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "specthink-edge"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or edge_env(),
    )


def edge_process(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "specthink-edge"), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or edge_env(),
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def check_structure(result: dict[str, Any]) -> None:
    segments, stats = result["segments"], result["stats"]
    assert "".join(s["text"] for s in segments) == result["text"]
    assert stats["edge_tokens"] == sum(s["tokens"] for s in segments if s["source"] == "edge")
    assert stats["cloud_tokens"] == sum(s["tokens"] for s in segments if s["source"] == "cloud")


NON_REASONING = ["--mode", "non-reasoning", "--temperature", "0"]


# ---- a cloud that dies, stalls or never answers -----------------------------------------


@pytest.mark.real_models
def test_cloud_killed_mid_answer_keeps_what_arrived_and_writes_on_locally(
    smollm2: Path, tmp_path: Path
) -> None:
    cloud = start_cloud(smollm2, tmp_path)
    try:
        proc = edge_process(
            "ask",
            "Write two short paragraphs about how bread is made.",
            "--model",
            str(smollm2),
            "--cloud",
            cloud.address,
            "--jsonl",
            *NON_REASONING,
            "--max-tokens",
            "40",
            env=edge_env(tmp_path, SPECTHINK_CONNECT_TIMEOUT="1"),
        )
        assert proc.stdout is not None
        events = []
        for line in proc.stdout:  # the cloud writes the opening: kill it once text arrives
            events.append(json.loads(line))
            if events[-1]["event"] == "text" and events[-1]["source"] == "cloud":
                cloud.process.kill()
                break
        rest, stderr = proc.communicate(timeout=300)
    finally:
        cloud.stop(signal.SIGKILL)
    events += [json.loads(line) for line in rest.splitlines()]
    received = "".join(e["text"] for e in events if e["event"] == "text" and e["source"] == "cloud")
    assert proc.returncode == 0, stderr
    done = events[-1]
    assert done["event"] == "done"
    check_structure(done)
    assert done["stats"]["fallback"] is True
    assert done["text"].startswith(received) and received, "what arrived is kept"
    first, *others = done["segments"]
    assert first["source"] == "cloud" and first["text"] == received
    assert any(s["reason"].startswith("fallback:") and s["source"] == "edge" for s in others)
    assert done["stats"]["edge_tokens"] > 0, "the edge wrote on"
    assert any(e["event"] == "fallback" for e in events)
    # ... and it is said on stderr, once
    notices = [line for line in stderr.splitlines() if "writing locally" in line]
    assert len(notices) == 1, stderr
    assert "Traceback" not in stderr


class SilentListener:
    """A TCP port that accepts connections and never says a word (no HTTP/2 preface)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.mark.real_models
def test_cloud_that_never_answers_costs_the_connect_timeout_then_the_edge_answers_alone(
    smollm2: Path, tmp_path: Path
) -> None:
    silent = SilentListener()
    try:
        started = time.monotonic()
        done = edge(
            "ask",
            "Say hi.",
            "--model",
            str(smollm2),
            "--cloud",
            silent.address,
            "--json",
            *NON_REASONING,
            "--max-tokens",
            "6",
            env=edge_env(tmp_path, SPECTHINK_CONNECT_TIMEOUT="0.5"),
        )
        elapsed = time.monotonic() - started
    finally:
        silent.close()
    assert silent.accepted, "the edge did try the cloud"
    assert done.returncode == 5, done.stderr  # answered, but by the edge alone
    result = json.loads(done.stdout)
    check_structure(result)
    assert result["stats"]["fallback"] is True and result["stats"]["cloud_tokens"] == 0
    assert result["text"].strip(), "the answer is not lost"
    assert result["segments"][0]["reason"].startswith("fallback:Unavailable:")
    assert "cannot reach the cloud" in done.stderr and "0.5 s" in done.stderr
    # three attempts of 0.5 s, then the circuit is open: no endless waiting
    assert result["stats"]["cloud_retries"] == 2
    assert elapsed < 60
    # the time the edge spent writing is not counted as time waiting on the cloud
    stats = result["stats"]
    assert 1.5 <= stats["cloud_wait_s"] < 10
    assert stats["cloud_wait_s"] + stats["edge_draft_s"] <= stats["wall_s"] + 0.05


@pytest.mark.real_models
def test_stalled_takeover_hits_the_takeover_timeout_and_falls_back(
    smollm2: Path, tmp_path: Path
) -> None:
    engine = ScriptedEngine(gate=threading.Event())  # accepts, then never writes
    with serving(engine) as server:
        started = time.monotonic()
        done = edge(
            "ask",
            "Say hi.",
            "--model",
            str(smollm2),
            "--cloud",
            server.address,
            "--strategy",
            "cloud",
            "--json",
            "--max-tokens",
            "6",
            "--temperature",
            "0",
            env=edge_env(tmp_path, SPECTHINK_TAKEOVER_TIMEOUT="1.5"),
        )
        elapsed = time.monotonic() - started
        time.sleep(0.2)
        assert engine.stopped, "the cloud saw the deadline and stopped working"
    assert done.returncode == 5, done.stderr
    result = json.loads(done.stdout)
    check_structure(result)
    assert result["stats"]["fallback"] is True
    assert result["segments"][0]["reason"].startswith("fallback:DeadlineExceeded:cloud_only")
    assert result["text"].strip()
    assert len(engine.calls) == 1, "a timed-out takeover is not retried past its budget"
    assert "takeover timeout (1.5 s" in done.stderr
    assert elapsed < 60


def test_overloaded_cloud_is_retried_after_its_hint_and_no_fallback(tmp_path: Path) -> None:
    engine = ScriptedEngine(
        tokens=("Four", "."),
        end_after=2,
        refuse=[errors.Overloaded("queue full", retry_after_s=0.4) for _ in range(2)],
    )
    with serving(engine) as server:
        done = edge(
            "ask",
            "What is 2+2?",
            "--cloud",
            server.address,
            "--strategy",
            "cloud",
            "--json",
            env=edge_env(tmp_path),
        )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["text"] == "Four."
    assert result["stats"]["fallback"] is False
    assert result["stats"]["cloud_retries"] == 2
    assert len(engine.calls) == 3
    gaps = [b.at - a.at for a, b in zip(engine.calls, engine.calls[1:], strict=False)]
    assert all(gap >= 0.35 for gap in gaps), f"the retry hint was not honoured: {gaps}"
    assert done.stderr.count("Overloaded (queue full); retry") == 2


def test_cloud_restart_between_takeovers_costs_a_full_text_resend_never_text(
    smollm2: Path, tmp_path: Path
) -> None:
    """The edge is paused (SIGSTOP) while its first takeover is answered, the cloud is
    restarted on the same port, the edge resumes: its next delta meets a cloud that holds
    nothing (FAILED_PRECONDITION) and is sent again as full text."""
    before = ScriptedEngine(tokens=("First paragraph.", "\n\n"))
    after = ScriptedEngine(tokens=("Next one.", "\n\n"))
    edge_pid: list[int] = []

    def pause_edge(index: int) -> None:
        if index == 0:
            os.kill(edge_pid[0], signal.SIGSTOP)

    before.on_call = pause_edge
    server = CloudServer(before, ServerOptions(host="127.0.0.1", port=0, drain_grace_s=1.0))
    server.start()
    port = server.port
    proc = edge_process(
        "ask",
        "Write short paragraphs.",
        "--model",
        str(smollm2),
        "--cloud",
        server.address,
        "--json",
        *NON_REASONING,
        "--set",
        "start_tokens=2",
        "--set",
        "takeover_tokens=2",
        "--max-tokens",
        "8",
        env=edge_env(tmp_path),
    )
    edge_pid.append(proc.pid)
    try:
        assert before.finished.wait(120), "the first takeover never came"
        time.sleep(0.5)  # the final message is on its way to the (paused) edge
        stop_server(server)
        with serving(after, port=port):
            os.kill(proc.pid, signal.SIGCONT)
            stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
    assert proc.returncode == 0, stderr
    result = json.loads(stdout)
    check_structure(result)
    stats = result["stats"]
    assert stats["fallback"] is False
    assert stats["full_text_resends"] >= 1
    assert result["text"] == "First paragraph.\n\n" + "Next one.\n\n" * 3, "no text lost"
    assert all(s["source"] == "cloud" for s in result["segments"])
    # the restarted cloud got the whole answer so far, once, then deltas again
    assert after.calls[0].assistant_text == "First paragraph.\n\n"
    assert "sending the full text again" in stderr


# ---- refusals that retrying cannot fix ---------------------------------------------------


def test_wrong_api_key_ends_with_one_line_and_exit_3(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(GOOD_KEY + "\n")
    engine = ScriptedEngine()
    with serving(engine, api_key_file=keys) as server:
        done = edge(
            "ask",
            "What is 2+2?",
            "--cloud",
            server.address,
            "--strategy",
            "cloud",
            env=edge_env(tmp_path, SPECTHINK_API_KEY="x" * 24),
        )
    assert done.returncode == 3
    assert "Traceback" not in done.stderr
    (line,) = error_lines(done.stderr)
    assert line.startswith("specthink-edge: error: ") and "API key" in line
    assert not engine.calls


def test_invalid_request_ends_with_one_line_and_exit_4(tmp_path: Path) -> None:
    engine = ScriptedEngine()
    with serving(engine, limits=Limits(max_text_chars=64)) as server:
        done = edge(
            "ask",
            "Tell me everything about " + "bread " * 40,
            "--cloud",
            server.address,
            "--strategy",
            "cloud",
            env=edge_env(tmp_path, SPECTHINK_API_KEY=GOOD_KEY),
        )
    assert done.returncode == 4, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = error_lines(done.stderr)
    assert line.startswith("specthink-edge: error: ") and "rejected the request" in line
    assert not engine.calls


@pytest.mark.real_models
def test_local_only_never_contacts_the_cloud(smollm2: Path, tmp_path: Path) -> None:
    engine = ScriptedEngine()
    with serving(engine) as server:
        done = edge(
            "ask",
            "Say hi.",
            "--model",
            str(smollm2),
            "--cloud",
            server.address,
            "--local-only",
            "--json",
            "--max-tokens",
            "4",
            "--temperature",
            "0",
            env=edge_env(tmp_path),
        )
        assert len(server.sessions) == 0
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["strategy"] == "edge" and result["stats"]["cloud_tokens"] == 0
    assert not engine.calls and not engine._held


# ---- Ctrl-C ------------------------------------------------------------------------------


def _interrupted_ask(
    engine: HarnessEngine, server: CloudServer, tmp_path: Path, *extra: str
) -> subprocess.Popen[str]:
    proc = edge_process(
        "ask",
        "Count slowly.",
        "--cloud",
        server.address,
        "--strategy",
        "cloud",
        "--max-tokens",
        "200",
        *extra,
        env=edge_env(tmp_path),
    )
    assert engine.first_token.wait(60), "the cloud never started writing"
    time.sleep(0.5)  # a few more tokens reach the screen
    proc.send_signal(signal.SIGINT)
    return proc


def test_ctrl_c_cancels_the_cloud_call_keeps_the_partial_answer_and_exits_130(
    tmp_path: Path,
) -> None:
    engine = ScriptedEngine(tokens=("one ", "two ", "three "), token_delay_s=0.1)
    with serving(engine) as server:
        proc = _interrupted_ask(engine, server, tmp_path)
        stdout, stderr = proc.communicate(timeout=30)
        deadline = time.monotonic() + 5
        while not engine.stopped and time.monotonic() < deadline:
            time.sleep(0.05)
    assert proc.returncode == 130, stderr
    assert engine.stopped, "the server stopped working on the cancelled call"
    _, written = engine.stopped[0]
    assert written < 200
    assert stdout.startswith("one two three one"), "the partial answer stays on stdout"
    assert "interrupted" in stderr and "Traceback" not in stderr


def test_ctrl_c_with_json_prints_the_partial_answer(tmp_path: Path) -> None:
    engine = ScriptedEngine(tokens=("one ", "two "), token_delay_s=0.1)
    with serving(engine) as server:
        proc = _interrupted_ask(engine, server, tmp_path, "--json")
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    result = json.loads(stdout)
    assert result["finish_reason"] == "interrupted"
    assert result["text"].startswith("one two ")
    check_structure(result)


def test_second_ctrl_c_exits_at_once(tmp_path: Path) -> None:
    """The first Ctrl-C's clean-up waits on the cloud (EndSession, slow here); a second
    one does not wait for it."""
    engine = ScriptedEngine(tokens=("one ",), token_delay_s=0.1, drop_delay_s=20)
    with serving(engine) as server:
        proc = _interrupted_ask(engine, server, tmp_path)
        time.sleep(0.3)
        assert proc.poll() is None, "still cleaning up after the first Ctrl-C"
        second = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        exited_after = time.monotonic() - second
    assert proc.returncode == 130
    assert exited_after < 1.0
