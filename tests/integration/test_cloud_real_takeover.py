"""The takeover's promises on a real cloud: `specthink-cloud serve` on SmolLM2-135M
(transformers, CPU) over a real socket. The verification continuation after the model
writes "check", the recap with its preamble, a full context, and `--dtype`.

Prompts are chosen so that the small model behaves as needed at temperature 0; the
assertions check the protocol (token counts, commits, which path ran), not the text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cloud.dtypes import read_cpu_bf16_flags, resolve_dtype
from shared.policy import RECAP_TEXT, VERIFICATION_KEYWORDS, continuation_keyword
from shared.rpc import specthink_pb2 as pb
from shared.wire import text_digest
from tests.conftest import CloudProcess, start_cloud
from tests.integration.cloud_harness import full_request, stub

pytestmark = [pytest.mark.real_models, pytest.mark.timeout(300)]


def _takeover(cloud: CloudProcess, request: pb.TakeoverRequest) -> tuple[list[Any], Any]:
    request.sampling.temperature = 0.0
    _, api = stub(cloud.address)
    events = list(api.Takeover(request, timeout=240))
    assert events[-1].WhichOneof("event") == "done"
    return [e.chunk for e in events[:-1]], events[-1].done


def _first_tokens(chunks: list[Any], n: int) -> str:
    """The text of the chunks that hold the first `n` tokens (the first stretch)."""
    text, tokens = "", 0
    for chunk in chunks:
        if tokens >= n:
            break
        text, tokens = text + chunk.text, tokens + chunk.tokens
    return text


def _logged_takeovers(cloud: CloudProcess, session: str) -> list[dict[str, Any]]:
    lines = cloud.stderr_path.read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    return [r for r in records if r.get("event") == "takeover" and r.get("session") == session]


def test_real_cloud_writes_check_then_continue_tokens_more_in_one_call(
    smollm2_cloud: CloudProcess,
) -> None:
    request = full_request(
        "real-verify",
        user="Check whether 91 is prime.",
        max_tokens=8,
        continue_if_contains=list(VERIFICATION_KEYWORDS),
        continue_tokens=12,
    )
    chunks, done = _takeover(smollm2_cloud, request)
    first = _first_tokens(chunks, 8)
    assert continuation_keyword(first, VERIFICATION_KEYWORDS) == "check", first
    assert done.continued and done.continued_on == "check"
    # the usage of both parts summed: 8, then up to 12 more (fewer only at end of answer)
    assert 8 < done.usage.generated_tokens <= 8 + 12
    assert done.usage.generated_tokens == sum(c.tokens for c in chunks)
    if done.usage.generated_tokens < 20:
        assert done.finish_reason == pb.FINISH_REASON_END_OF_SEQUENCE
    written = "".join(c.text for c in chunks)
    assert (done.committed_length, done.committed_sha256) == text_digest(written)
    assert len(_logged_takeovers(smollm2_cloud, "real-verify")) == 1  # one commit, one call


def test_real_cloud_recap_streams_its_preamble_first_and_commits_it(
    smollm2_cloud: CloudProcess,
) -> None:
    before = "Subtract 3 from both sides: x = 4.\n\n"
    request = full_request(
        "real-recap",
        before,
        user="Solve x + 3 = 7.",
        max_tokens=20,
        preamble=RECAP_TEXT,  # the policy's excessive-reflection takeover, as the edge sends it
        continue_if_contains=list(VERIFICATION_KEYWORDS),
        continue_tokens=10,
    )
    chunks, done = _takeover(smollm2_cloud, request)
    assert (chunks[0].text, chunks[0].tokens) == (RECAP_TEXT, 0)
    model_text = _first_tokens(chunks[1:], 20)
    assert model_text.strip(), "the model wrote nothing after the recap"
    # "check" in the preamble is the cloud's own sentence: only the model's text counts
    assert done.continued == bool(continuation_keyword(model_text, VERIFICATION_KEYWORDS))
    assert done.usage.generated_tokens == sum(c.tokens for c in chunks)
    written = "".join(c.text for c in chunks)
    assert (done.committed_length, done.committed_sha256) == text_digest(before + written)


def test_real_cloud_ends_a_text_over_its_context_with_context_full(
    smollm2_cloud: CloudProcess,
) -> None:
    _, api = stub(smollm2_cloud.address)
    window = api.GetModelInfo(pb.ModelInfoRequest(), timeout=30).context_length
    long_text = "one two three four five six seven eight nine ten. " * (window // 8)
    assert len(long_text) < 400_000  # within the wire's size limit: only the window is full
    chunks, done = _takeover(smollm2_cloud, full_request("real-full", long_text, max_tokens=5))
    assert chunks == []
    assert done.finish_reason == pb.FINISH_REASON_CONTEXT_FULL
    assert done.usage.generated_tokens == 0
    assert (done.committed_length, done.committed_sha256) == text_digest(long_text)


def test_real_cloud_reports_the_auto_dtype_it_chose(smollm2_cloud: CloudProcess) -> None:
    _, api = stub(smollm2_cloud.address)
    info = api.GetModelInfo(pb.ModelInfoRequest(), timeout=30)
    expected = resolve_dtype("auto", "cpu", read_cpu_bf16_flags())
    assert info.dtype == expected.name
    assert f"dtype {expected.name} ({expected.reason})" in smollm2_cloud.stderr_path.read_text()


def test_real_cloud_loads_in_the_dtype_asked_for(smollm2: Path, tmp_path: Path) -> None:
    cloud = start_cloud(smollm2, tmp_path, "--dtype", "bfloat16")
    try:
        _, api = stub(cloud.address)
        assert api.GetModelInfo(pb.ModelInfoRequest(), timeout=30).dtype == "bfloat16"
        chunks, done = _takeover(cloud, full_request("bf16", user="Say hi.", max_tokens=4))
        assert done.usage.generated_tokens > 0 and "".join(c.text for c in chunks)
    finally:
        assert cloud.stop() == 0
