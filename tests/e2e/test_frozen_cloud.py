"""A real `specthink-cloud serve` frozen with SIGSTOP in the middle of a takeover: the
process keeps its sockets open and answers nothing (as a paused VM, a stuck device or a
silent network drop would). The real edge CLI must notice it by its stall timeout, not by
the takeover budget, write the rest of the answer itself, and say so."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import start_cloud
from tests.e2e.edge_runs import NON_REASONING, check_structure, edge_env, edge_process

pytestmark = pytest.mark.real_models


def test_cloud_frozen_mid_answer_is_given_up_and_the_edge_completes_the_answer(
    smollm2: Path, tmp_path: Path
) -> None:
    cloud = start_cloud(smollm2, tmp_path)
    frozen_at: float | None = None
    noticed_at: float | None = None
    events: list[dict] = []
    try:
        proc = edge_process(
            "ask",
            "Write three short paragraphs about how bread is made.",
            "--model",
            str(smollm2),
            "--cloud",
            cloud.address,
            "--jsonl",
            *NON_REASONING,
            "--max-tokens",
            "160",
            # the whole takeover budget would be 30 + 0.5 s per token: 130 s for the opening
            env=edge_env(tmp_path, SPECTHINK_STALL_TIMEOUT="4", SPECTHINK_FIRST_CHUNK_TIMEOUT="4"),
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            event = json.loads(line)
            events.append(event)
            if frozen_at is None and event["event"] == "text" and event["source"] == "cloud":
                os.kill(cloud.process.pid, signal.SIGSTOP)  # mid-opening: it stops talking
                frozen_at = time.monotonic()
            if noticed_at is None and event["event"] == "fallback":
                noticed_at = time.monotonic()
        stderr = proc.stderr.read() if proc.stderr else ""
        proc.wait(timeout=300)
    finally:
        os.kill(cloud.process.pid, signal.SIGCONT)
        cloud.stop(signal.SIGKILL)
    assert frozen_at is not None, "the cloud never wrote"
    assert proc.returncode == 0, stderr  # the cloud wrote part of it: not "unusable"
    done = events[-1]
    assert done["event"] == "done"
    check_structure(done)
    # noticed by the stall watch (not by the 130 s budget), and said so
    first_fallback = next(e for e in events if e["event"] == "fallback")
    assert first_fallback["error"] == "Stalled"
    assert "no text for 4 s" in first_fallback["message"]
    assert "stopped answering" in stderr and "written locally" in stderr
    # the answer completes: what the cloud sent is kept, the edge wrote the rest
    received = "".join(e["text"] for e in events if e["event"] == "text" and e["source"] == "cloud")
    first, *others = done["segments"]
    assert first["source"] == "cloud" and first["text"] and done["text"].startswith(first["text"])
    assert received.startswith(first["text"])
    assert any(s["reason"].startswith("fallback:Stalled:") for s in others)
    assert done["stats"]["fallback"] is True and done["stats"]["edge_tokens"] > 0
    assert done["finish_reason"] in ("length", "stop")
    assert noticed_at is not None
    # a measurement for the report, not an assertion on the clock
    print(f"\nfrozen -> edge wrote on: {noticed_at - frozen_at:.1f} s (stall timeout 4 s)")
