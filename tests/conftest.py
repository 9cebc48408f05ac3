"""Fixtures for tests on real models: the bundled GGUF files and a real cloud process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge import bundled

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO / "models"
BIN = Path(sys.executable).parent


def _model(model: bundled.BundledModel) -> Path:
    try:
        return bundled.ensure(model, MODELS_DIR)
    except bundled.BundledModelError as exc:
        pytest.fail(f"{exc} (scripts/install.sh installs the test models)")


@pytest.fixture(scope="session", autouse=True)
def _converted_models_in_the_tests_cache(request: pytest.FixtureRequest) -> Iterator[None]:
    """Cloud processes the tests start convert GGUF weights into the tests' own cache
    folder (pytest's, kept between runs of this checkout), never the user's ~/.cache."""
    cache = getattr(request.config, "cache", None)
    folder = Path(cache.mkdir("specthink-engine")) if cache is not None else None
    before = os.environ.get("SPECTHINK_CACHE_DIR")
    if folder is not None:
        os.environ["SPECTHINK_CACHE_DIR"] = str(folder)
    yield
    if before is None:
        os.environ.pop("SPECTHINK_CACHE_DIR", None)
    else:
        os.environ["SPECTHINK_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return _model(bundled.SMOLLM2)


@pytest.fixture(scope="session")
def gemma() -> Path:
    return _model(bundled.GEMMA3_270M)


@dataclass
class CloudProcess:
    address: str
    process: subprocess.Popen[str]
    stderr_path: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


def start_cloud(model: Path, tmp: Path, *extra: str, port: int = 0) -> CloudProcess:
    """`specthink-cloud serve` as a user runs it; returns once it prints its address."""
    stderr_path = tmp / f"cloud-{time.monotonic_ns()}.err"
    process = subprocess.Popen(
        [
            str(BIN / "specthink-cloud"),
            "serve",
            "--model",
            str(model),
            "--port",
            str(port),
            "--device",
            "cpu",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=stderr_path.open("w"),
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # blocks until ready (or exit)
    match = re.search(r"listening on grpcs?://(\S+)", line)
    if not match:
        process.kill()
        pytest.fail(f"cloud did not start: {line!r}\n{stderr_path.read_text()[-3000:]}")
    return CloudProcess(match.group(1), process, stderr_path)


@pytest.fixture(scope="session")
def smollm2_cloud(
    smollm2: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CloudProcess]:
    cloud = start_cloud(smollm2, tmp_path_factory.mktemp("cloud"))
    yield cloud
    cloud.stop()
