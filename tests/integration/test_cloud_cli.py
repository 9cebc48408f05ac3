"""`specthink-cloud serve` in its first hour: help, --version, one line per bad flag before
anything heavy, the port bound before the model loads (health NOT_SERVING meanwhile),
and a signal while loading. The loader is replaced where a test needs loading to last."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from cloud.cli import app
from shared.cli_style import package_version
from tests.integration.cloud_harness import collect, full_request, stub
from tests.integration.test_cloud_security import certs  # noqa: F401 (a fixture)
from tests.integration.test_cloud_service import wait_for

pytestmark = pytest.mark.timeout(120)
BIN = Path(sys.executable).parent
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A folder that passes the cheap checks (it has a config.json)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


@pytest.fixture
def restore_process_state() -> Iterator[None]:
    """serve installs signal handlers and a logging handler; put both back."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    root = list(logging.getLogger().handlers)
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    logging.getLogger().handlers[:] = root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---- help and version ------------------------------------------------------------------


def test_short_help_works_and_shows_every_option_whole_with_its_default() -> None:
    result = CliRunner().invoke(app, ["serve", "-h"], terminal_width=80)
    assert result.exit_code == 0, result.output
    names = [
        "--model",
        "--host",
        "--port",
        "--device",
        "--dtype",
        "--api-key-file",
        "--metrics-port",
        "--tls-cert",
        "--tls-key",
        "--tls-client-ca",
        "--drain-grace-s",
        "--max-waiting",
        "--max-cache-bytes",
        "--session-ttl-s",
        "--reflection / --no-reflection",
        "--log-prompts / --no-log-prompts",
        "--cache-dir",
    ]
    for name in names:
        assert name in result.output, f"{name} missing or cut in:\n{result.output}"
    for default in ("[default: 127.0.0.1]", "[default: 50051;", "[default: auto]"):
        assert default in result.output
    assert re.search(r"<(str|int|float|path|bool)[^>]*>", result.output) is None


def test_root_short_help_and_version() -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["-h"]).exit_code == 0
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"specthink-cloud {package_version()}"
    assert package_version() != "unknown"


# ---- bad flags: one line each, before anything loads ------------------------------------


def test_every_bad_flag_is_one_line_and_exit_2_before_loading(tmp_path: Path) -> None:
    empty_keys = tmp_path / "keys.txt"
    empty_keys.write_text("# no keys yet\n")
    result = CliRunner().invoke(
        app,
        [
            "serve",
            "--model",
            str(tmp_path / "no-such-model"),
            "--dtype",
            "fp16",
            "--device",
            "tpu",
            "--api-key-file",
            str(empty_keys),
            "--tls-cert",
            str(tmp_path / "cert.pem"),
        ],
    )
    assert result.exit_code == 2
    lines = _errors(result.stderr)
    assert len(lines) == 5, lines
    assert all(line.startswith("specthink-cloud: error: ") for line in lines)
    assert "no such model" in lines[0] and "tpu" in lines[1] and "fp16" in lines[2]
    assert "holds no key" in lines[3] and "--tls-key" in lines[4]
    assert "Traceback" not in result.output and "loading" not in result.stderr


def test_unreadable_key_file_and_mismatched_tls_pair_are_caught_before_loading(
    model_dir: Path,
    certs: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    result = CliRunner().invoke(
        app,
        [
            "serve",
            "--model",
            str(model_dir),
            "--api-key-file",
            str(tmp_path / "absent-keys"),
            "--tls-cert",
            str(certs / "server.pem"),
            "--tls-key",
            str(certs / "client.key"),  # another certificate's key
            "--tls-client-ca",
            str(certs / "ca.key"),  # a key, not a certificate
        ],
    )
    assert result.exit_code == 2
    lines = _errors(result.stderr)
    assert len(lines) == 3, lines
    assert "cannot read API key file" in lines[0]
    assert "server.pem" in lines[1] and "client.key" in lines[1]
    assert "--tls-client-ca" in lines[2]
    assert "loading" not in result.stderr


def test_a_good_tls_pair_passes_the_checks(certs: Path) -> None:  # noqa: F811
    from cloud.preflight import tls_problems

    assert tls_problems(certs / "server.pem", certs / "server.key", certs / "ca.pem") == []


def test_taken_port_is_one_line_and_the_model_is_never_loaded(model_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [str(BIN / "specthink-cloud"), "serve", "--model", str(model_dir), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2
    lines = _errors(done.stderr)
    assert lines == [
        f"specthink-cloud: error: --port {port}: cannot listen on 127.0.0.1:{port} "
        "(Address already in use)"
    ], done.stderr
    assert done.stdout == ""


# ---- the port is served while the model loads ------------------------------------------


def _block_loading(monkeypatch: pytest.MonkeyPatch, release: threading.Event) -> list[Any]:
    from cloud.engine import TransformersEngine

    calls: list[Any] = []

    def slow_load(model: str, **kwargs: Any) -> Any:
        calls.append((model, kwargs))
        while not release.wait(0.02):  # a signal handler may raise here
            pass
        raise ValueError(f"{model}: cannot load (a test model)")

    monkeypatch.setattr(TransformersEngine, "load", staticmethod(slow_load))
    return calls


def test_health_is_not_serving_and_takeovers_unavailable_while_loading_then_sigterm_exits_0(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, restore_process_state: None
) -> None:
    release = threading.Event()
    calls = _block_loading(monkeypatch, release)
    port = _free_port()
    seen: dict[str, Any] = {}

    def probe() -> None:
        try:
            channel, api = stub(f"127.0.0.1:{port}")
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="")

            def status() -> Any:
                try:
                    return health.Check(check, timeout=2).status
                except grpc.RpcError:
                    return None

            seen["health"] = wait_for(status, timeout=60, what="health while loading")
            with pytest.raises(grpc.RpcError) as loading:
                collect(api.Takeover(full_request("early"), timeout=5))
            seen["takeover"] = (loading.value.code(), loading.value.details())
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # as an orchestrator stops a slow pod
            release.set()

    threading.Thread(target=probe, daemon=True).start()
    result = CliRunner().invoke(
        app, ["serve", "--model", str(model_dir), "--port", str(port), "--dtype", "float32"]
    )
    assert seen["health"] == NOT_SERVING
    assert seen["takeover"][0] == grpc.StatusCode.UNAVAILABLE
    assert "loading" in seen["takeover"][1]
    assert calls and calls[0][1]["dtype"] == "float32"
    assert result.exit_code == 0, result.output
    assert "stopped while loading" in result.stderr
    assert "listening on" not in result.stdout


def test_a_load_error_is_one_line_and_frees_the_port(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, restore_process_state: None
) -> None:
    release = threading.Event()
    release.set()
    _block_loading(monkeypatch, release)
    port = _free_port()
    result = CliRunner().invoke(app, ["serve", "--model", str(model_dir), "--port", str(port)])
    assert result.exit_code == 2
    errors = [ln for ln in _errors(result.stderr) if "error:" in ln]
    assert errors == [f"specthink-cloud: error: {model_dir}: cannot load (a test model)"]
    assert "Traceback" not in result.output
    with socket.socket() as again:  # the server bound before loading has let go
        again.bind(("127.0.0.1", port))


def test_help_is_plain_text_within_the_help_width_without_type_tags() -> None:
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert max(len(line) for line in result.output.splitlines()) <= 100
    assert re.search(r"<(str|int|float|path|bool)[^>]*>", result.output) is None
    assert "--port PORT" in result.output and "╭" not in result.output


def test_ctrl_c_while_loading_exits_130_as_an_interrupted_command(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, restore_process_state: None
) -> None:
    release = threading.Event()
    calls = _block_loading(monkeypatch, release)
    port = _free_port()

    def interrupt() -> None:
        wait_for(lambda: bool(calls) or None, timeout=60, what="loading to start")
        os.kill(os.getpid(), signal.SIGINT)
        release.set()

    threading.Thread(target=interrupt, daemon=True).start()
    result = CliRunner().invoke(app, ["serve", "--model", str(model_dir), "--port", str(port)])
    assert result.exit_code == 130, result.output
    assert "stopped while loading the model (SIGINT)" in result.stderr


def test_a_drain_during_warm_up_never_reports_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from cloud.server import CloudServer, ServerOptions
    from tests.integration.cloud_harness import ScriptedEngine

    server = CloudServer(ScriptedEngine(), ServerOptions(port=0, reflection=False))
    with caplog.at_level(logging.INFO, logger="specthink.cloud"):
        server.start(warm_up=server.admission.close)  # Ctrl-C lands while it warms up
    server.stop_now()
    events = [r.getMessage() for r in caplog.records]
    assert not any('"event": "serving"' in e for e in events), events


def test_a_hub_id_that_is_not_cached_fails_in_seconds_when_the_hub_is_unreachable(
    tmp_path: Path,
) -> None:
    import time

    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),  # an empty cache
        "HF_ENDPOINT": f"http://127.0.0.1:{_free_port()}",  # nothing listens there
    }
    env.pop("HF_HUB_OFFLINE", None)
    started = time.monotonic()
    done = subprocess.run(
        [str(BIN / "specthink-cloud"), "serve", "--model", "Qwen/Qwen2.5-0.5B", "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    took = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    errors = [line for line in _errors(done.stderr) if "error:" in line]
    assert len(errors) == 1 and "not in the local Hugging Face cache" in errors[0], done.stderr
    assert "cannot be reached" in errors[0]
    assert took < 30  # imports included; the download client's retries took ~50 s
