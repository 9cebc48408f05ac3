"""The cloud as an operated service: health transitions, graceful drain, Prometheus
metrics, server reflection, JSON logs; on a real gRPC server on 127.0.0.1 with a
scripted engine, plus one real `specthink-cloud serve` process on SmolLM2. No
wall-clock bounds: the tests assert which path ran."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from cloud.cli import app
from cloud.server import CloudServer, ServerOptions
from shared.rpc import specthink_pb2 as pb
from tests.integration.cloud_harness import (
    ScriptedEngine,
    collect,
    delta_request,
    full_request,
    running_server,
    stub,
)
from tests.integration.test_cloud_service import Background, wait_for

pytestmark = pytest.mark.timeout(90)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _health(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status


# ---- health ---------------------------------------------------------------------------


def test_health_is_not_serving_until_warm_up_ends() -> None:
    release = threading.Event()
    server = CloudServer(ScriptedEngine(), ServerOptions(port=0))
    starting = threading.Thread(target=server.start, kwargs={"warm_up": release.wait})
    starting.start()
    try:
        channel, _ = stub(server.address)
        wait_for(lambda: _health(channel) == NOT_SERVING, what="health answers")
        assert _health(channel, "specthink.v1.SpecThink") == NOT_SERVING
        time.sleep(0.1)
        assert _health(channel) == NOT_SERVING
        release.set()
        starting.join(5)
        assert _health(channel) == SERVING
        assert _health(channel, "specthink.v1.SpecThink") == SERVING
    finally:
        release.set()
        server.stop_now()


def test_server_listens_before_the_model_is_attached_and_answers_unavailable() -> None:
    server = CloudServer(None, ServerOptions(port=0))
    try:
        server.listen()
        channel, api = stub(server.address)
        assert _health(channel) == NOT_SERVING
        for call in (
            lambda: collect(api.Takeover(full_request("early"), timeout=5)),
            lambda: api.GetModelInfo(pb.ModelInfoRequest(), timeout=5),
        ):
            with pytest.raises(grpc.RpcError) as loading:
                call()
            assert loading.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "loading" in (loading.value.details() or "")
        engine = ScriptedEngine()
        server.attach(engine)
        server.start()
        assert _health(channel) == SERVING
        assert api.GetModelInfo(pb.ModelInfoRequest(), timeout=5).dtype == "float32"
        _, done = collect(api.Takeover(full_request("later", max_tokens=2)))
        assert done.usage.generated_tokens == 2 and len(engine.calls) == 1
    finally:
        server.stop_now()


def test_admission_follows_the_batch_limit_of_the_engine_attached() -> None:
    engine = ScriptedEngine()
    engine.info = SimpleNamespace(**{**vars(engine.info), "max_running": 3})  # type: ignore[assignment]
    server = CloudServer(None, ServerOptions(port=0))
    try:
        assert server.admission.limits.max_running == 1
        server.attach(engine)
        assert server.admission.limits.max_running == 3
    finally:
        server.stop_now()


# ---- drain ----------------------------------------------------------------------------


def test_drain_flips_health_refuses_new_calls_and_lets_in_flight_finish() -> None:
    engine = ScriptedEngine(token_delay_s=0.05)
    with running_server(engine, drain_grace_s=10.0) as server:
        channel, api = stub(server.address)
        in_flight = Background(api.Takeover(full_request("busy", max_tokens=30)))
        wait_for(lambda: engine.of("token"), what="in-flight decoding")
        drain = threading.Thread(target=server.drain)
        drain.start()
        wait_for(lambda: _health(channel) == NOT_SERVING, what="NOT_SERVING")
        with pytest.raises(grpc.RpcError) as refused:
            collect(api.Takeover(full_request("new")))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        in_flight.join(10)
        assert in_flight.error is None and in_flight.done.usage.generated_tokens == 30
        drain.join(10)
        assert not drain.is_alive()


def test_drain_ends_a_takeover_that_outlives_the_grace_with_unavailable() -> None:
    # token 2 never gets its turn: only the end of the grace can stop the takeover
    engine = ScriptedEngine(gate=threading.Event(), gate_from=2)
    with running_server(engine, drain_grace_s=0.3) as server:
        _, api = stub(server.address)
        in_flight = Background(api.Takeover(full_request("slow", max_tokens=400)))
        wait_for(lambda: len(engine.of("token")) == 2, what="in-flight decoding")
        server.drain()
        assert server.servicer.stopping.is_set()  # the grace ran out: streams were ended
        in_flight.join(5)
        assert in_flight.error is not None
        assert in_flight.error.code() == grpc.StatusCode.UNAVAILABLE
        assert engine.stopped and not engine.of("done")


# ---- metrics --------------------------------------------------------------------------


def _scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            if "le" not in s.labels:
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def test_metrics_are_served_over_http_and_count_what_happened() -> None:
    with running_server(ScriptedEngine(), metrics_port=0) as server:
        assert server.metrics_port
        _, api = stub(server.address)
        text, _ = collect(api.Takeover(full_request("m", "Start.", max_tokens=5)))
        collect(api.Takeover(delta_request("m", "Start." + text, " Next", max_tokens=3)))
        with pytest.raises(grpc.RpcError):
            collect(api.Takeover(full_request("m", max_tokens=0)))
        with pytest.raises(grpc.RpcError):
            collect(api.Takeover(delta_request("other", "", "x")))
        m = _scrape(server.metrics_port)
    assert m["specthink:takeovers_total{finish_reason=length}"] == 2
    assert m["specthink:generation_tokens_total"] == 8
    assert m["specthink:request_errors_total{code=INVALID_ARGUMENT}"] == 1
    assert m["specthink:request_errors_total{code=FAILED_PRECONDITION}"] == 1
    assert m["specthink:e2e_request_latency_seconds_count"] == 2
    assert m["specthink:time_to_first_token_seconds_count"] == 2
    assert m["specthink:request_queue_time_seconds_count"] == 2
    assert m["specthink:session_cache_hits_total"] == 1
    assert m["specthink:session_cache_misses_total"] == 1
    assert m["specthink:prompt_tokens_total"] > 0
    assert m["specthink:prefix_cache_hits_total"] > 0
    assert m["specthink:num_requests_waiting"] == 0  # the HPA scales on this one
    assert m["specthink:num_requests_running"] == 0
    assert m["specthink:active_sessions"] == 1


# ---- reflection -----------------------------------------------------------------------


def _list_services(channel: grpc.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    [response] = list(stub.ServerReflectionInfo(iter([request]), timeout=3))
    return [s.name for s in response.list_services_response.service]


def test_reflection_lists_the_service_and_can_be_switched_off() -> None:
    with running_server() as server:
        channel, _ = stub(server.address)
        assert "specthink.v1.SpecThink" in _list_services(channel)
        assert "grpc.health.v1.Health" in _list_services(channel)
    with running_server(reflection=False) as server:
        channel, _ = stub(server.address)
        with pytest.raises(grpc.RpcError) as off:
            _list_services(channel)
        assert off.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_serve_has_a_no_reflection_flag() -> None:
    result = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200)
    assert "--no-reflection" in result.output and "--log-prompts" in result.output


# ---- logs -----------------------------------------------------------------------------


def test_logs_are_json_with_request_and_session_ids_and_no_prompt_text(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "my private question about taxes"
    with caplog.at_level(logging.INFO, logger="specthink.cloud"), running_server() as server:
        _, api = stub(server.address)
        collect(
            api.Takeover(
                full_request("logged", secret, user=secret), metadata=[("x-request-id", "req-42")]
            )
        )
        with pytest.raises(grpc.RpcError):
            collect(api.Takeover(full_request("logged", secret, max_tokens=0)))
    records = [json.loads(r.getMessage()) for r in caplog.records if r.getMessage().startswith("{")]
    takeover = next(r for r in records if r["event"] == "takeover")
    assert takeover["request_id"] == "req-42" and takeover["session"] == "logged"
    error = next(r for r in records if r["event"] == "error")
    assert error["code"] == "INVALID_ARGUMENT" and error["session"] == "logged"
    assert error["request_id"] != "req-42"
    assert all(secret not in r.getMessage() for r in caplog.records)


def test_logs_carry_the_text_only_with_log_prompts(caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.INFO, logger="specthink.cloud"),
        running_server(log_prompts=True) as server,
    ):
        _, api = stub(server.address)
        collect(api.Takeover(full_request("logged", "visible text")))
    assert any("visible text" in r.getMessage() for r in caplog.records)


# ---- the real process -----------------------------------------------------------------


@pytest.mark.real_models
@pytest.mark.timeout(420)
def test_real_serve_process_answers_then_exits_zero_after_sigterm(
    smollm2: Path, tmp_path: Path
) -> None:
    from tests.conftest import start_cloud

    # a grace long enough for the in-flight takeover even on a loaded machine: the test is
    # that the drain lets it finish, not how fast
    cloud = start_cloud(smollm2, tmp_path, "--metrics-port", "0", "--drain-grace-s", "200")
    try:
        channel, api = stub(cloud.address)
        assert _health(channel) == SERVING
        assert "SmolLM2" in api.GetModelInfo(pb.ModelInfoRequest(), timeout=10).model_id
        request = full_request("real", "The sea is", user="Describe the sea.", max_tokens=16)
        request.sampling.temperature = 0.0
        call = api.Takeover(request, timeout=120)
        first = next(call)  # the takeover is under way: the drain must let it finish
        assert first.WhichOneof("event") == "chunk"
        in_flight = Background(call)
        cloud.process.send_signal(signal.SIGTERM)
        assert cloud.process.wait(timeout=230) == 0
        in_flight.join(5)
        assert in_flight.error is None, in_flight.error
        assert in_flight.done.usage.generated_tokens > 0 and in_flight.text
        assert in_flight.done.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        log = cloud.stderr_path.read_text()
        assert '"event": "drained"' in log and '"event": "takeover"' in log
    finally:
        if cloud.process.poll() is None:
            cloud.process.kill()
