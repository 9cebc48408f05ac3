"""`specthink-edge` run as a user runs it, for the end-to-end tests: a clean environment of
its own (no SPECTHINK_* of the developer's, its own config, cache and data folders), one
run to its end or one process to drive, and the structure every `--json` answer keeps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
NON_REASONING = ["--mode", "non-reasoning", "--temperature", "0"]


def edge_env(tmp: Path | None = None, **env: str) -> dict[str, str]:
    """The environment without the developer's SPECTHINK_* settings; with `tmp`, config,
    cache and data folders of the test's own, so no run reads or writes the user's."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SPECTHINK_")}
    if tmp is not None:
        base["XDG_CONFIG_HOME"] = str(tmp / "config")
        base["XDG_CACHE_HOME"] = str(tmp / "cache")
        base["XDG_DATA_HOME"] = str(tmp / "data")
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
    """The --json contract: segments concatenate to the text, counts are their sums, and
    `takeovers` is the number of cloud segments."""
    segments, stats = result["segments"], result["stats"]
    assert "".join(s["text"] for s in segments) == result["text"]
    assert stats["edge_tokens"] == sum(s["tokens"] for s in segments if s["source"] == "edge")
    assert stats["cloud_tokens"] == sum(s["tokens"] for s in segments if s["source"] == "cloud")
    assert stats["takeovers"] == sum(1 for s in segments if s["source"] == "cloud")
