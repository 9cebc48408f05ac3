"""The cloud judge on real parts: a judged prefill on SmolLM2-135M (both engine paths)
scores the probe as a plain forward of the model reads it, wherever its chunks fall, and a
rejected probe is rolled back (the next write equals one that never saw it); then a judged
takeover over gRPC on `specthink-cloud serve`: the verdict first, a kept probe committed,
a rejected one replaced by the cloud's text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cloud.engine_api import Generated, GenerateRequest
from shared.rpc import specthink_pb2 as pb
from shared.wire import Message, text_digest
from tests.conftest import CloudProcess
from tests.integration.cloud_harness import full_request, stub
from tests.integration.engine_calls import generate, like, loop_of, prefill, release

pytestmark = [pytest.mark.real_models, pytest.mark.timeout(300)]

MESSAGES = (Message("user", "What is 12 times 7? Explain."),)
TEXT = "We multiply 12 by 7.\n\n"
PROBE = "12 times 7 is 84, so the answer is 84."


def _judge(engine: Any, session: str, text: str = TEXT, probe: str = PROBE) -> Any:
    request = GenerateRequest(session, MESSAGES, text, probe=probe)
    return loop_of(engine).prefill(request, lambda: False)


def _reference(engine: Any, text: str = TEXT, probe: str = PROBE) -> list[float]:
    """Each probe token's log-probability from one plain forward over the whole prompt."""
    import torch

    head = engine.tokenize(MESSAGES, text)
    ids = engine.tokenize(MESSAGES, text + probe)
    start = next((i for i, (a, b) in enumerate(zip(head, ids, strict=False)) if a != b), len(head))
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [float(logprobs[p - 1, ids[p]]) for p in range(start, len(ids))]


def _written(events: Any) -> tuple[str, Generated]:
    text, done = "", None
    for item in events:
        if isinstance(item, Generated):
            done = item
        else:
            text += item.text
    assert done is not None
    return text, done


def test_a_judged_prefill_scores_the_probe_as_a_plain_forward_does(smol_either: Any) -> None:
    expected = _reference(smol_either)
    cold = _judge(smol_either, "judge-cold")
    assert len(cold.probe_logprobs) == len(expected) >= 5
    assert cold.probe_logprobs == pytest.approx(expected, abs=2e-3)
    # the text already cached (the usual delta): the same scores from the cached prefix on
    prefill(smol_either, "judge-warm", MESSAGES, TEXT)
    warm = _judge(smol_either, "judge-warm")
    assert warm.usage.cached_tokens > 0
    assert warm.probe_logprobs == pytest.approx(expected, abs=2e-3)


def test_scores_do_not_depend_on_where_prefill_chunks_fall(smol_either: Any) -> None:
    options: dict[str, Any] = {"prefill_chunk": 4}
    if smol_either.kind == "paged":
        options.update(context_length=2047, max_cache_bytes=smol_either.max_cache_bytes)
    small = like(smol_either, **options)
    try:
        chunked = _judge(small, "judge-chunks")
        assert chunked.probe_logprobs == pytest.approx(_reference(smol_either), abs=2e-3)
    finally:
        release(small)


def test_a_rejected_probe_is_rolled_back_and_a_kept_one_is_reused(smol_either: Any) -> None:
    never_saw, _ = _written(generate(smol_either, "judge-none", MESSAGES, TEXT, 12))
    _judge(smol_either, "judge-rolled")
    # rejected: the cloud writes after TEXT; the probe's KV must not leak into it
    after, done = _written(generate(smol_either, "judge-rolled", MESSAGES, TEXT, 12))
    assert after == never_saw
    assert done.usage.cached_tokens == done.usage.prompt_tokens - 1  # TEXT's tokens re-used
    # kept: the next call on TEXT + PROBE finds every token but the last in the cache
    _judge(smol_either, "judge-kept")
    _, kept = _written(generate(smol_either, "judge-kept", MESSAGES, TEXT + PROBE, 4))
    assert kept.usage.cached_tokens == kept.usage.prompt_tokens - 1


def _judged(cloud: CloudProcess, session: str, accept_at: float) -> list[Any]:
    request = full_request(session, TEXT, user=MESSAGES[0].content, max_tokens=6)
    request.sampling.temperature = 0.0
    request.judge.probe = PROBE
    request.judge.accept_at_or_above = accept_at
    _, api = stub(cloud.address)
    return list(api.Takeover(request, timeout=240))


def test_a_judged_takeover_over_grpc_keeps_or_replaces_the_probe(
    smollm2_cloud: CloudProcess,
) -> None:
    # kept: any score is above -1000; the verdict, then done alone
    kept = _judged(smollm2_cloud, "judge-grpc-kept", -1000.0)
    assert [e.WhichOneof("event") for e in kept] == ["verdict", "done"]
    verdict, done = kept[0].verdict, kept[1].done
    assert verdict.accepted and verdict.probe_tokens >= 5 and verdict.score < 0
    assert verdict.prefill_s > 0
    assert done.finish_reason == pb.FINISH_REASON_PROBE_ACCEPTED
    assert done.usage.generated_tokens == 0
    assert (done.committed_length, done.committed_sha256) == text_digest(TEXT + PROBE)
    # replaced: no probe scores 0; the verdict, the cloud's text, done
    replaced = _judged(smollm2_cloud, "judge-grpc-replaced", 0.0)
    kinds = [e.WhichOneof("event") for e in replaced]
    assert kinds[0] == "verdict" and kinds[-1] == "done" and set(kinds[1:-1]) == {"chunk"}
    assert not replaced[0].verdict.accepted
    assert replaced[0].verdict.score == pytest.approx(verdict.score, abs=1e-3)
    written = "".join(e.chunk.text for e in replaced[1:-1])
    done = replaced[-1].done
    assert done.usage.generated_tokens == 6
    assert (done.committed_length, done.committed_sha256) == text_digest(TEXT + written)
    assert not written.startswith(PROBE[:10])


@pytest.mark.parametrize(
    "probe, accept_at, message",
    [
        ("", -1.0, "judge.probe"),
        ("x" * 5000, -1.0, "judge.probe"),
        ("fine", 0.5, "accept_at_or_above"),
        ("fine", float("nan"), "accept_at_or_above"),
    ],
)
def test_bad_judge_fields_are_refused_before_any_work(
    smollm2_cloud: CloudProcess, probe: str, accept_at: float, message: str
) -> None:
    import grpc

    request = full_request("judge-bad", TEXT, user="q", max_tokens=4)
    request.judge.probe = probe
    request.judge.accept_at_or_above = accept_at
    _, api = stub(smollm2_cloud.address)
    with pytest.raises(grpc.RpcError) as caught:
        list(api.Takeover(request, timeout=60))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (caught.value.details() or "")


def test_a_judged_prefill_beside_a_running_write_scores_the_same(smol_either: Any) -> None:
    """A judged prefill sent while another session decodes (whose steps the paged path
    shares with the probe's chunk, one forward for both): a plain forward's scores all the
    same, and the write goes on."""
    import threading

    written: list[str] = []
    writer = threading.Thread(
        target=lambda: written.append(
            _written(generate(smol_either, "judge-beside-w", MESSAGES, "Let us", 48))[0]
        )
    )
    writer.start()
    try:
        beside = _judge(smol_either, "judge-beside")
    finally:
        writer.join()
    assert written and written[0]
    assert beside.probe_logprobs == pytest.approx(_reference(smol_either), abs=2e-3)


def test_the_judge_benchmark_reports_the_probes_cost_beside_a_decode_step(smollm2) -> None:
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "scripts.bench_judge", "--model", str(smollm2), "--threads", "1",
         "--context", "120", "--delta", "30", "--probe", "12"],
        capture_output=True, text=True, timeout=240, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout[: done.stdout.rindex("}") + 1])
    assert report["probe_tokens_scored"] >= 8 and report["decode_step_s"] > 0
    assert report["plain_s"] > 0 and report["judged_s"] > 0
    assert done.stdout.strip().splitlines()[-1].startswith("judge at a break: 30 new tokens")
