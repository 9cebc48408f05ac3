"""Health that looks at the engine, shown on a real `specthink-cloud serve` process (SmolLM2).

The process runs with the test-only fault switch `SPECTHINK_FAULT_INJECT=FLAG_FILE`
(cloud/faults.py): while the flag file exists, every engine step raises ("raise"), raises
a sticky CUDA error ("cuda") or hangs ("hang"); removing it heals the engine. Each test
reads the three health answers (readiness "" and "specthink.v1.SpecThink", liveness
"liveness") and the metrics that say why (`specthink:health_reason`, the error counter,
the error streak, the running step's age).

Bounds are the issue's: a broken engine is NOT_SERVING within 2 steps or 10 s; a hung one
fails liveness within the stall limit (plus the monitor's tick and some slack).
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from shared.rpc import specthink_pb2 as pb
from tests.integration.cloud_harness import collect, full_request, stub
from tests.integration.test_cloud_service import Background, wait_for

pytestmark = [pytest.mark.real_models, pytest.mark.timeout(300)]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
STALL_S = 4.0  # --engine-stall-s of the process under test
BROKEN_WITHIN_S = 10.0  # the bound for a broken engine


@dataclass
class FaultyCloud:
    address: str
    metrics_port: int
    flag: Path
    channel: grpc.Channel
    api: object
    log: Path

    def events(self, kind: str | None = None) -> list[dict[str, object]]:
        """The process's JSON log lines so far (of one event kind)."""
        lines = [line for line in self.log.read_text().splitlines() if line.startswith("{")]
        records = [json.loads(line) for line in lines]
        return [r for r in records if kind is None or r.get("event") == kind]

    def health(self, service: str = "") -> int:
        hs = health_pb2_grpc.HealthStub(self.channel)
        return hs.Check(health_pb2.HealthCheckRequest(service=service), timeout=3).status

    def probes(self) -> tuple[int, int, int]:
        """(readiness "", readiness of the SpecThink service, liveness)."""
        return (self.health(""), self.health("specthink.v1.SpecThink"), self.health("liveness"))

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(body):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def reason(self) -> str:
        m = self.metrics()
        reasons = [k for k, v in m.items() if k.startswith("specthink:health_reason{") and v]
        assert len(reasons) == 1, reasons
        return reasons[0].split("reason=")[1].rstrip("}")

    def fault(self, kind: str | None) -> None:
        if kind is None:
            self.flag.unlink(missing_ok=True)
        else:
            self.flag.write_text(kind)

    def takeover(self, session: str, max_tokens: int = 4) -> pb.TakeoverDone:
        request = full_request(
            session, "The sea is", user="Describe the sea.", max_tokens=max_tokens
        )
        request.sampling.temperature = 0.0
        _, done = collect(self.api.Takeover(request, timeout=60))  # type: ignore[attr-defined]
        return done

    def healed(self) -> None:
        """No fault, and every probe SERVING again (the canary finds the engine working)."""
        self.fault(None)
        wait_for(lambda: self.probes() == (SERVING,) * 3, timeout=30, what="SERVING again")


@pytest.fixture(scope="module")
def cloud(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultyCloud]:
    from tests.conftest import start_cloud

    tmp = tmp_path_factory.mktemp("faulty-cloud")
    flag = tmp / "fault"
    before = os.environ.get("SPECTHINK_FAULT_INJECT")
    os.environ["SPECTHINK_FAULT_INJECT"] = str(flag)
    try:
        process = start_cloud(smollm2, tmp, "--metrics-port", "0", "--engine-stall-s", str(STALL_S))
    finally:
        if before is None:
            os.environ.pop("SPECTHINK_FAULT_INJECT")
        else:
            os.environ["SPECTHINK_FAULT_INJECT"] = before
    try:
        log = process.stderr_path.read_text()
        assert "FAULT INJECTION ACTIVE" in log
        serving = next(
            json.loads(line)
            for line in log.splitlines()
            if line.startswith("{") and '"event": "serving"' in line
        )
        channel, api = stub(process.address)
        port = int(serving["metrics_port"])
        yield FaultyCloud(process.address, port, flag, channel, api, process.stderr_path)
    finally:
        flag.unlink(missing_ok=True)
        assert process.stop(timeout=60) == 0


def test_healthy_engine_is_serving_on_every_probe(cloud: FaultyCloud) -> None:
    cloud.healed()
    assert cloud.takeover("fine").usage.generated_tokens > 0
    assert cloud.reason() == "ok"
    m = cloud.metrics()
    assert m["specthink:health_status{probe=readiness}"] == 1
    assert m["specthink:health_status{probe=liveness}"] == 1


def test_engine_that_raises_on_every_step_is_not_serving_within_two_steps(
    cloud: FaultyCloud,
) -> None:
    cloud.healed()
    seen = len(cloud.events())
    cloud.fault("raise")
    broke = time.monotonic()
    # one takeover fails; no more traffic comes: the canary is the second step
    with pytest.raises(grpc.RpcError) as failed:
        cloud.takeover("broken")
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    wait_for(lambda: cloud.health() == NOT_SERVING, timeout=BROKEN_WITHIN_S, what="NOT_SERVING")
    took = time.monotonic() - broke
    assert took < BROKEN_WITHIN_S
    # readiness flipped at the second failed step (the log says when, the metrics why)
    since = cloud.events()[seen:]
    flip = next(i for i, e in enumerate(since) if e.get("reason") == "step_errors")
    assert [e["event"] for e in since[:flip]].count("engine_error") == 2
    assert str(since[flip]["detail"]).startswith("2 in a row: RuntimeError: injected fault")
    m = cloud.metrics()
    assert m["specthink:engine_consecutive_step_errors"] >= 2
    assert m["specthink:engine_step_errors_total{error=RuntimeError}"] >= 2
    assert cloud.reason() in ("step_errors", "failing")
    assert cloud.health("specthink.v1.SpecThink") == NOT_SERVING
    print(f"raise: NOT_SERVING {took:.2f} s after the fault")
    # it keeps failing for longer than the stall limit: liveness fails too (restart it)
    wait_for(lambda: cloud.health("liveness") == NOT_SERVING, timeout=STALL_S + 10, what="dead")
    assert cloud.reason() == "failing"
    cloud.healed()


def test_engine_that_recovers_is_serving_again_without_traffic(cloud: FaultyCloud) -> None:
    cloud.healed()
    cloud.fault("raise")
    with pytest.raises(grpc.RpcError):
        cloud.takeover("flaky")
    wait_for(lambda: cloud.health() == NOT_SERVING, timeout=BROKEN_WITHIN_S, what="NOT_SERVING")
    assert cloud.health("liveness") == SERVING  # not (yet) a case for a restart
    cloud.fault(None)
    healed = time.monotonic()
    wait_for(lambda: cloud.probes() == (SERVING,) * 3, timeout=15, what="the canary heals it")
    print(f"recovered: SERVING {time.monotonic() - healed:.2f} s after the fault went away")
    assert cloud.reason() == "ok"
    assert cloud.metrics()["specthink:engine_consecutive_step_errors"] == 0
    assert cloud.takeover("after").usage.generated_tokens > 0


def test_sticky_cuda_error_fails_liveness_at_once(cloud: FaultyCloud) -> None:
    cloud.healed()
    cloud.fault("cuda")
    broke = time.monotonic()
    with pytest.raises(grpc.RpcError):
        cloud.takeover("cuda")
    wait_for(lambda: cloud.health("liveness") == NOT_SERVING, timeout=5, what="not live")
    assert time.monotonic() - broke < STALL_S  # no need to wait for the stall limit
    assert cloud.health() == NOT_SERVING
    assert cloud.reason() == "sticky_error"
    cloud.healed()


def test_hung_engine_fails_liveness_within_the_stall_limit(cloud: FaultyCloud) -> None:
    cloud.healed()
    cloud.fault("hang")
    hung = time.monotonic()
    request = full_request("hung", "The sea is", user="Describe the sea.", max_tokens=4)
    stuck = Background(cloud.api.Takeover(request, timeout=120))  # type: ignore[attr-defined]
    wait_for(lambda: cloud.health("liveness") == NOT_SERVING, timeout=STALL_S + 5, what="not live")
    took = time.monotonic() - hung
    assert STALL_S <= took < STALL_S + 2.0, took
    assert cloud.health() == NOT_SERVING
    assert cloud.reason() == "stalled"
    assert cloud.metrics()["specthink:engine_step_running_seconds"] > STALL_S
    print(f"hang: liveness NOT_SERVING {took:.2f} s after the hang (limit {STALL_S} s)")
    cloud.fault(None)  # the step returns: the takeover finishes, health comes back
    stuck.join(60)
    assert stuck.error is None and stuck.done.usage.generated_tokens > 0
    cloud.healed()
    assert cloud.reason() == "ok"
