"""The documented app example (examples/app_client.py) runs against a real server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.cloud_harness import ScriptedEngine, running_server, write_key_file

REPO = Path(__file__).resolve().parents[2]
KEY = "app-example-key-0123456789"
pytestmark = pytest.mark.timeout(60)


def test_app_example_streams_a_full_takeover_then_a_delta(tmp_path: Path) -> None:
    from examples.app_client import ask

    engine = ScriptedEngine(tokens=("Light", " scatters", "."))
    with running_server(engine, api_key_file=write_key_file(tmp_path, KEY)) as server:
        answer = ask(server.address, "Why is the sky blue?", api_key=KEY, max_tokens=3)
    assert answer == "Light scatters.\n\nIn short:Light scatters."
    # the second call sent only the delta: the engine saw the whole text, as committed
    assert engine.calls[1].assistant_text == "Light scatters.\n\nIn short:"
    assert len(engine.dropped) == 1  # EndSession


def test_app_example_runs_as_a_script(tmp_path: Path) -> None:
    with running_server(ScriptedEngine(), api_key_file=write_key_file(tmp_path, KEY)) as server:
        result = subprocess.run(
            [sys.executable, "examples/app_client.py", "--cloud", server.address, "Hi?"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "SPECTHINK_API_KEY": KEY, "PYTHONPATH": str(REPO)},
        )
    assert result.returncode == 0, result.stderr
    assert "Hello there, friend." in result.stdout
    assert "finish=FINISH_REASON_LENGTH" in result.stderr
