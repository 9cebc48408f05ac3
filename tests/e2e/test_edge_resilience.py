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
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from cloud.server import CloudServer, ServerOptions
from cloud.validation import Limits
from shared import errors
from tests.conftest import start_cloud
from tests.e2e.edge_runs import (  # noqa: F401  (test_edge_cli imports them from here)
    BIN,
    NON_REASONING,
    check_structure,
    edge,
    edge_env,
    edge_process,
    error_lines,
)
from tests.integration.cloud_harness import ScriptedEngine as HarnessEngine

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
    finally:
        silent.close()
    assert silent.accepted, "the edge did try the cloud"
    assert done.returncode == 5, done.stderr  # answered, but by the edge alone
    result = json.loads(done.stdout)
    check_structure(result)
    stats = result["stats"]
    assert stats["fallback"] is True and stats["cloud_tokens"] == 0
    assert result["text"].strip(), "the answer is not lost"
    assert "Traceback" not in done.stderr
    # the background check finds it out (the first takeover waits for it): one line that
    # says why, and no retries of an address that never answered
    assert "does not answer as a SpecThink cloud" in stats["cloud_unusable"]
    assert "no connection within 0.5 s" in stats["cloud_unusable"]
    assert stats.get("cloud_retries", 0) == 0
    said = [line for line in done.stderr.splitlines() if "cloud" in line]
    assert len(said) == 1 and "unusable" in said[0], done.stderr
    # the time the edge spent writing is not counted as time waiting on the cloud
    assert stats["cloud_wait_s"] + stats["edge_draft_s"] <= stats["wall_s"] + 0.05


@pytest.mark.real_models
def test_busy_cloud_that_never_starts_writing_costs_the_takeover_budget_then_falls_back(
    smollm2: Path, tmp_path: Path
) -> None:
    """The engine accepts and never writes while the server still answers (a stuck device
    behind a live process, or a long queue): liveness checks pass, so the edge waits, but
    only for the takeover budget."""
    engine = ScriptedEngine(gate=threading.Event())  # accepts, then never writes
    with serving(engine) as server:
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
            env=edge_env(
                tmp_path, SPECTHINK_TAKEOVER_TIMEOUT="1.5", SPECTHINK_FIRST_CHUNK_TIMEOUT="0.5"
            ),
        )
        wait_for(lambda: bool(engine.stopped))
        assert engine.stopped, "the cloud saw the deadline and stopped working"
    assert done.returncode == 5, done.stderr
    result = json.loads(done.stdout)
    check_structure(result)
    assert result["stats"]["fallback"] is True
    assert result["segments"][0]["reason"].startswith("fallback:DeadlineExceeded:cloud_only")
    assert result["text"].strip()
    assert len(engine.calls) == 1, "a timed-out takeover is not retried past its budget"
    assert "takeover timeout (1.5 s" in done.stderr
    assert "Stalled" not in done.stderr, "a cloud that answers liveness checks is not frozen"


def wait_for(condition: Callable[[], bool], limit_s: float = 60.0) -> None:
    """Poll until `condition` holds (or give up after a generous limit; the caller asserts)."""
    deadline = time.monotonic() + limit_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.real_models
def test_cloud_that_goes_silent_mid_answer_is_given_up_after_the_stall_timeout(
    smollm2: Path, tmp_path: Path
) -> None:
    """The engine writes, then hangs mid-answer without closing anything: the edge keeps
    what arrived, gives the call up after its stall timeout (not the takeover budget of
    1000 s here) and writes the rest locally."""
    gate = threading.Event()
    gate.set()
    engine = ScriptedEngine(tokens=("One", " two", " three"), gate=gate)

    def hang_after_first_token() -> None:
        if engine.first_token.wait(120):
            gate.clear()

    threading.Thread(target=hang_after_first_token, daemon=True).start()
    with serving(engine) as server:
        done = edge(
            "ask",
            "Count.",
            "--model",
            str(smollm2),
            "--cloud",
            server.address,
            "--strategy",
            "cloud",
            "--json",
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            env=edge_env(tmp_path, SPECTHINK_TAKEOVER_TIMEOUT="1000", SPECTHINK_STALL_TIMEOUT="1"),
        )
        wait_for(lambda: bool(engine.stopped))
        assert engine.stopped, "the cancelled call stopped the engine too"
    assert done.returncode == 0, done.stderr  # the cloud did write: not "unusable"
    result = json.loads(done.stdout)
    check_structure(result)
    first, *rest = result["segments"]
    assert first["source"] == "cloud" and result["text"].startswith("One")
    assert any(s["reason"].startswith("fallback:Stalled:cloud_only") for s in rest)
    assert "stopped answering" in done.stderr and "no text for 1 s" in done.stderr


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
    # one error line, last (the background check may have said why before it)
    errors_said = [x for x in error_lines(done.stderr) if x.startswith("specthink-edge: error: ")]
    assert len(errors_said) == 1 and error_lines(done.stderr)[-1] == errors_said[0]
    assert "API key" in errors_said[0]
    assert not engine.calls


def test_invalid_request_ends_with_one_line_and_exit_4(tmp_path: Path) -> None:
    engine = ScriptedEngine()  # the cloud strategy asks for 64 tokens a call; 8 allowed
    with serving(engine, limits=Limits(max_tokens_per_takeover=8)) as server:
        done = edge(
            "ask",
            "Tell me about bread.",
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
def test_text_too_long_for_the_cloud_is_written_by_the_edge_not_thrown_away(
    smollm2: Path, tmp_path: Path
) -> None:
    engine = ScriptedEngine()
    with serving(engine, limits=Limits(max_text_chars=64)) as server:
        done = edge(
            "ask",
            "Tell me everything about " + "bread " * 40,
            "--model",
            str(smollm2),
            "--cloud",
            server.address,
            "--json",
            *NON_REASONING,
            "--max-tokens",
            "8",
            env=edge_env(tmp_path),
        )
    assert done.returncode == 5, done.stderr  # answered, by the edge alone: not exit 4
    result = json.loads(done.stdout)
    check_structure(result)
    assert result["text"].strip() and result["stats"]["cloud_tokens"] == 0
    assert result["stats"]["cloud_full"] is True
    assert result["segments"][0]["reason"].startswith("edge_alone:context_full:")
    assert "no longer fits the cloud" in done.stderr and "Traceback" not in done.stderr
    assert not engine.calls


@pytest.mark.real_models
def test_cloud_whose_context_fills_up_mid_answer_hands_the_rest_to_the_edge(
    smollm2: Path, tmp_path: Path
) -> None:
    from cloud.engine_api import EngineContextFull

    engine = ScriptedEngine(tokens=("First.", "\n\n"))
    engine.refuse = [None, EngineContextFull("prompt is 5000 tokens; the window is 4096")]
    with serving(engine) as server:
        done = edge(
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
            "--max-tokens",
            "16",
            env=edge_env(tmp_path),
        )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    check_structure(result)
    assert result["text"].startswith("First.\n\n")
    assert result["stats"]["cloud_full"] is True
    assert len(engine.calls) == 2, "no takeover is tried after the context is full"
    assert result["segments"][-1]["reason"].startswith("edge_alone:context_full:")
    assert result["stats"]["edge_tokens"] > 0


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
        wait_for(lambda: bool(engine.stopped))
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
    one, sent while that wait is on, exits at once instead of waiting for it."""
    engine = ScriptedEngine(tokens=("one ",), token_delay_s=0.1, drop_delay_s=20)
    ending = threading.Event()
    drop = engine.drop

    def slow_drop(session: str) -> bool:
        ending.set()  # the edge is now waiting on EndSession
        return drop(session)

    engine.drop = slow_drop  # type: ignore[method-assign]
    with serving(engine) as server:
        proc = _interrupted_ask(engine, server, tmp_path)
        assert ending.wait(60), "the first Ctrl-C's clean-up never reached EndSession"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted; the partial answer is kept" in stderr
    assert "interrupted again; exiting now" in stderr, "the second Ctrl-C did not wait"
