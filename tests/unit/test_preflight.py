"""The cheap checks `serve` runs before it loads a model (cloud.preflight), as a table."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cloud.preflight import ServeChecks, model_problem, port_problem, serve_problems


@pytest.fixture
def models(tmp_path: Path) -> Path:
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text("{}")
    (tmp_path / "no-config").mkdir()
    (tmp_path / "good.gguf").write_bytes(b"GGUF" + b"\0" * 16)
    (tmp_path / "bad.gguf").write_bytes(b"PK\3\4 a zip file")
    (tmp_path / "weights.bin").write_bytes(b"\0")
    return tmp_path


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("folder", None),
        ("good.gguf", None),
        ("no-config", "no config.json"),
        ("bad.gguf", "no GGUF magic"),
        ("weights.bin", "expected a .gguf file"),
        ("absent.gguf", "no such model file or folder"),
        ("absent-folder", "no such model file or folder"),
    ],
)
def test_model_paths(models: Path, name: str, problem: str | None) -> None:
    found = model_problem(str(models / name))
    assert (found is None) if problem is None else (found is not None and problem in found)


@pytest.mark.parametrize("hub_id", ["HuggingFaceTB/SmolLM2-135M-Instruct", "org/model.v2"])
def test_a_hub_id_is_left_to_the_loader(hub_id: str) -> None:
    assert model_problem(hub_id) is None


def test_a_taken_port_names_the_flag_and_the_reason() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        problem = port_problem("--metrics-port", "127.0.0.1", port)
    assert problem == (
        f"--metrics-port {port}: cannot listen on 127.0.0.1:{port} (Address already in use)"
    )
    assert port_problem("--port", "127.0.0.1", 0) is None


def test_an_unknown_host_is_one_line() -> None:
    problem = port_problem("--port", "no-such-host.invalid", 5)
    assert problem is not None and problem.startswith("--host no-such-host.invalid:")


def test_good_flags_have_no_problems(models: Path) -> None:
    checks = ServeChecks(model=str(models / "folder"), device="cuda:1", dtype="BFloat16", port=0)
    assert serve_problems(checks) == []


def test_the_same_port_twice_is_refused(models: Path) -> None:
    checks = ServeChecks(model=str(models / "folder"), port=50999, metrics_port=50999)
    assert serve_problems(checks) == ["--metrics-port 50999: the same port as --port"]
