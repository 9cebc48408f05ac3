"""The interfaces people expect from `specthink-edge`: stdin, --jsonl, -v, --system,
colours only on a terminal, --mark brackets, `chat`, and device flags.

The cloud is a real `CloudServer` in this process around the scripted engine of
test_edge_resilience (or the real SmolLM2 cloud where its cache is what is checked); the
edge is the real CLI in a subprocess, on a pseudo-terminal where a terminal matters.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest

from edge import small_model
from edge.config import auto_threads, resolve
from edge.render import CLOUD_STYLE
from shared import errors
from shared.wire import Message
from tests.e2e.test_edge_resilience import (
    BIN,
    NON_REASONING,
    ScriptedEngine,
    check_structure,
    edge,
    edge_env,
    serving,
)
from tests.integration.cloud_harness import ScriptedEngine as HarnessEngine


def four() -> HarnessEngine:
    """A cloud that answers "Four." and stops."""
    return ScriptedEngine(tokens=("Four", "."), end_after=2)


def cloud_ask(address: str, tmp: Path, *args: str, stdin: str | None = None) -> Any:
    return edge(
        "ask", "--cloud", address, "--strategy", "cloud", *args, stdin=stdin, env=edge_env(tmp)
    )


# ---- ask -------------------------------------------------------------------------------


def test_the_prompt_comes_from_stdin_when_piped(tmp_path: Path) -> None:
    engine = four()
    with serving(engine) as server:
        done = cloud_ask(server.address, tmp_path, stdin="What is 2+2?\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Four.\n"
    assert engine.calls[0].messages == (Message("user", "What is 2+2?"),)


def test_the_system_message_reaches_the_cloud(tmp_path: Path) -> None:
    engine = four()
    with serving(engine) as server:
        done = cloud_ask(server.address, tmp_path, "What is 2+2?", "--system", "Be terse.")
    assert done.returncode == 0, done.stderr
    assert engine.calls[0].messages == (
        Message("system", "Be terse."),
        Message("user", "What is 2+2?"),
    )


def test_verbose_prints_timings_and_speeds_at_the_end(tmp_path: Path) -> None:
    with serving(four()) as server:
        done = cloud_ask(server.address, tmp_path, "What is 2+2?", "-v")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Four.\n"
    said = "\n".join(done.stderr.splitlines())
    # load, prompt, edge and cloud generation apart, as Ollama's --verbose does
    for part in (
        "mode        ",
        "edge        0 tokens in",
        "cloud       2 tokens in",
        "1 takeover;",  # singular
        "faults      0 retries, 0 full-text resends, 0 fallbacks",
        "total       2 tokens in",
        "first token after",
    ):
        assert part in said, said
    assert "1 takeovers" not in said


def test_mark_brackets_shows_the_clouds_text_in_plain_output(tmp_path: Path) -> None:
    with serving(four()) as server:
        done = cloud_ask(server.address, tmp_path, "What is 2+2?", "--mark", "brackets")
    assert done.stdout == "[cloud]Four.[/cloud]\n"


def run_on_terminal(
    args: list[str], env: dict[str, str], stdin: bytes = b"", timeout: float = 120
) -> tuple[int, str]:
    """Run with stdin and stdout on a pseudo-terminal (stderr piped away); return what the
    terminal showed."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [str(BIN / "specthink-edge"), *args],
        stdin=slave,
        stdout=slave,
        stderr=subprocess.DEVNULL,
        env=env,
        close_fds=True,
    )
    os.close(slave)
    if stdin:
        os.write(master, stdin)
    shown = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                data = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            shown += data
        elif proc.poll() is not None:
            break
    code = proc.wait(timeout=10)
    os.close(master)
    return code, shown.decode("utf-8", "replace")


def test_colours_on_a_terminal_and_none_when_piped(tmp_path: Path) -> None:
    with serving(four()) as server:
        args = ["ask", "What is 2+2?", "--cloud", server.address, "--strategy", "cloud"]
        code, shown = run_on_terminal(args, edge_env(tmp_path))
        piped = edge(*args, env=edge_env(tmp_path))
    assert code == 0
    assert f"{CLOUD_STYLE}Four" in shown
    assert piped.returncode == 0 and piped.stdout == "Four.\n" and "\x1b[" not in piped.stdout


@pytest.mark.real_models
def test_jsonl_streams_segments_text_takeovers_fallbacks_and_done(
    smollm2: Path, tmp_path: Path
) -> None:
    engine = ScriptedEngine(
        tokens=("Step one.", "\n\n"), refuse=[None, errors.InternalError("device lost")]
    )
    with serving(engine) as server:
        done = edge(
            "ask",
            "Write short paragraphs.",
            "--model",
            str(smollm2),
            "--cloud",
            server.address,
            "--jsonl",
            *NON_REASONING,
            "--set",
            "start_tokens=2",
            "--set",
            "takeover_tokens=2",
            "--max-tokens",
            "6",
            env=edge_env(tmp_path),
        )
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]  # every line is JSON
    kinds = [e["event"] for e in events]
    assert kinds[:3] == ["takeover", "segment", "text"]
    assert events[0]["reason"] == "non_reasoning_start" and events[0]["tokens"] == 2
    assert events[1] == {"event": "segment", "source": "cloud", "reason": "non_reasoning_start"}
    takeovers = [e for e in events if e["event"] == "takeover"]
    assert takeovers[1]["reason"] == "non_reasoning_break"
    (fallback,) = [e for e in events if e["event"] == "fallback"]
    assert fallback["error"] == "InternalError" and "device lost" in fallback["message"]
    local = events[kinds.index("fallback") + 1]
    assert local["event"] == "segment" and local["source"] == "edge"
    assert local["reason"] == "fallback:InternalError:non_reasoning_break"
    assert kinds[-1] == "done" and kinds.count("done") == 1
    result = events[-1]
    check_structure(result)
    streamed = "".join(e["text"] for e in events if e["event"] == "text")
    assert streamed == result["text"]
    stats = result["stats"]
    assert stats["fallback"] is True and stats["takeover_attempts"] >= 2
    # takeovers counts the cloud's segments only: the failed one wrote nothing
    assert stats["takeovers"] == sum(1 for s in result["segments"] if s["source"] == "cloud")
    assert "device lost" in done.stderr, "the fallback is said on stderr too"


# ---- chat ------------------------------------------------------------------------------


def test_chat_keeps_the_conversation_in_one_cloud_session_across_turns(tmp_path: Path) -> None:
    engine = four()
    with serving(engine) as server:
        done = edge(
            "chat",
            "--cloud",
            server.address,
            "--strategy",
            "cloud",
            "--jsonl",
            "--system",
            "Be terse.",
            stdin="What is 2+2?\nAnd 2+2 again?\n/reset\nHello\n/exit\nnever sent\n",
            env=edge_env(tmp_path),
        )
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["user"] for e in events if e["event"] == "turn"] == [
        "What is 2+2?",
        "And 2+2 again?",
        "Hello",
    ]
    assert len(engine.calls) == 3
    assert len({c.session for c in engine.calls}) == 1, "one cloud session for the chat"
    system = Message("system", "Be terse.")
    assert engine.calls[1].messages == (
        system,
        Message("user", "What is 2+2?"),
        Message("assistant", "Four."),
        Message("user", "And 2+2 again?"),
    )
    assert engine.calls[2].messages == (system, Message("user", "Hello")), "/reset"
    dones = [e for e in events if e["event"] == "done"]
    assert dones[0]["stats"]["cloud_cached_tokens"] == 0
    assert dones[1]["stats"]["cloud_cached_tokens"] > 0, "turn 2 re-used the session's cache"


def test_chat_on_a_terminal_prompts_and_answers_until_exit(tmp_path: Path) -> None:
    with serving(four()) as server:
        code, shown = run_on_terminal(
            ["chat", "--cloud", server.address, "--strategy", "cloud"],
            edge_env(tmp_path),
            stdin=b"What is 2+2?\r/exit\r",
        )
    assert code == 0
    assert "> " in shown and "Four" in shown
    assert shown.count("> ") >= 2, "prompted again after the answer"


def test_chat_ends_at_end_of_input(tmp_path: Path) -> None:
    engine = four()
    with serving(engine) as server:
        done = edge(
            "chat",
            "--cloud",
            server.address,
            "--strategy",
            "cloud",
            stdin="What is 2+2?\n",
            env=edge_env(tmp_path),
        )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Four.\n" and len(engine.calls) == 1


def test_ctrl_c_in_chat_stops_the_answer_keeps_it_and_the_chat_goes_on(tmp_path: Path) -> None:
    engine = ScriptedEngine(tokens=("la ",), token_delay_s=0.05)
    with serving(engine) as server:
        proc = subprocess.Popen(
            [
                str(BIN / "specthink-edge"),
                "chat",
                "--cloud",
                server.address,
                "--strategy",
                "cloud",
                "--jsonl",
                "--max-tokens",
                "30",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=edge_env(tmp_path),
        )
        assert proc.stdin is not None
        proc.stdin.write("Sing.\n")
        proc.stdin.flush()
        assert engine.first_token.wait(60)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        stdout, stderr = proc.communicate("Again, briefly.\n", timeout=60)
    assert proc.returncode == 0, stderr
    events = [json.loads(line) for line in stdout.splitlines()]
    first, second = [e for e in events if e["event"] == "done"]
    assert first["finish_reason"] == "interrupted" and first["text"].startswith("la la")
    assert second["finish_reason"] == "length" and second["text"] == "la " * 30
    assert engine.stopped, "the interrupted call was cancelled on the server"
    # the partial answer stays in the conversation
    assert engine.calls[-1].messages[1] == Message("assistant", first["text"].strip())


@pytest.mark.real_models
def test_chat_with_a_real_cloud_reuses_its_cache_on_the_next_turn(
    smollm2: Path, smollm2_cloud: Any, tmp_path: Path
) -> None:
    done = edge(
        "chat",
        "--model",
        str(smollm2),
        "--cloud",
        smollm2_cloud.address,
        "--jsonl",
        *NON_REASONING,
        "--set",
        "start_tokens=6",
        "--max-tokens",
        "14",
        stdin="Name a colour.\nName another one.\n",
        env=edge_env(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    first, second = [e for e in events if e["event"] == "done"]
    for answer in (first, second):
        check_structure(answer)
        assert answer["stats"]["takeovers"] >= 1 and not answer["stats"]["fallback"]
        assert answer["segments"][0]["source"] == "cloud"
    assert second["stats"]["cloud_cached_tokens"] > 0, "the cloud kept the session's cache"


# ---- devices -----------------------------------------------------------------------------


class FakeLlama:
    """Stands in for llama_cpp.Llama: records how it was built."""

    built: ClassVar[list[dict[str, Any]]] = []
    metadata: ClassVar[dict[str, str]] = {}

    def __init__(self, **kwargs: Any) -> None:
        FakeLlama.built.append(kwargs)

    def n_ctx(self) -> int:
        return 2048


def fake_model(tmp: Path) -> Path:
    path = tmp / "tiny.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 64)
    return path


@pytest.mark.parametrize(
    ("flags", "env", "layers", "threads"),
    [
        ({}, {}, 0, auto_threads()),
        ({"gpu_layers": -1}, {}, -1, auto_threads()),
        ({}, {"SPECTHINK_GPU_LAYERS": "12", "SPECTHINK_THREADS": "3"}, 12, 3),
        ({"gpu_layers": 5, "threads": 1}, {"SPECTHINK_GPU_LAYERS": "12"}, 5, 1),
    ],
)
def test_gpu_layers_and_threads_reach_llama_cpp(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    flags: dict[str, int],
    env: dict[str, str],
    layers: int,
    threads: int,
) -> None:
    import llama_cpp

    monkeypatch.setattr(llama_cpp, "Llama", FakeLlama)
    monkeypatch.setattr("edge.config._default_gpu_layers", lambda: 0)  # not Apple silicon
    FakeLlama.built.clear()
    for key in [k for k in os.environ if k.startswith("SPECTHINK_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SPECTHINK_CONFIG", str(tmp_path / "config.toml"))
    (tmp_path / "config.toml").write_text("")
    cfg = resolve({"model": str(fake_model(tmp_path)), **flags})
    small_model.load_drafter(cfg)
    (built,) = FakeLlama.built
    assert built["n_gpu_layers"] == layers
    assert built["n_threads"] == threads


def test_auto_threads_is_about_the_physical_cores() -> None:
    cpus = os.cpu_count() or 1
    assert 1 <= auto_threads() <= cpus
    if cpus > 2:
        assert auto_threads() == cpus // 2
