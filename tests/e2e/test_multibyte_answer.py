"""A CJK and emoji answer written in 3-token takeovers, as a user runs it: real cloud
(`specthink-cloud serve`, SmolLM2) and real edge CLI (Qwen2.5-Coder-0.5B, which writes
Chinese). Every takeover ends inside or next to a multi-byte character, on both sides;
none may be lost or come back as U+FFFD."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from edge import bundled
from tests.conftest import _model, start_cloud
from tests.e2e.edge_runs import NON_REASONING, check_structure, edge, edge_env

pytestmark = pytest.mark.real_models

PROMPT = (
    "Continue this list of foods to 10 items, in Chinese with an emoji each, one item per "
    "paragraph:\n\n1. 面包 🍞\n\n2. 米饭 🍚\n\n3. 苹果 🍎"
)


def test_a_cjk_and_emoji_answer_in_3_token_takeovers_loses_no_character(
    smollm2: Path, tmp_path: Path
) -> None:
    qwen = _model(bundled.QWEN25_CODER_05B)
    cloud = start_cloud(smollm2, tmp_path)
    try:
        done = edge(
            "ask",
            PROMPT,
            "--model",
            str(qwen),
            "--cloud",
            cloud.address,
            "--json",
            *NON_REASONING,
            "--set",
            "start_tokens=3",
            "--set",
            "takeover_tokens=3",
            "--max-tokens",
            "80",
            env=edge_env(tmp_path),
        )
    finally:
        cloud.stop(signal.SIGKILL)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    check_structure(result)
    cloud_segments = [s for s in result["segments"] if s["source"] == "cloud"]
    assert len(cloud_segments) >= 3, "several short takeovers happened"
    assert any(ord(c) > 0x2FFF for c in result["text"]), "the answer has CJK or emoji"
    assert "\ufffd" not in result["text"]
    for segment in result["segments"]:
        # tokens counted as written are in the text: a segment never holds tokens only
        assert segment["text"] or not segment["tokens"], segment
        assert "\ufffd" not in segment["text"]
