"""End to end on real models over real gRPC on 127.0.0.1: `specthink-cloud serve` in one
process, `specthink-edge ask` in another, exactly as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge.drafter import LlamaDrafter
from shared.wire import Message, Sampling

pytestmark = pytest.mark.real_models
BIN = Path(sys.executable).parent
PROMPT = "Explain photosynthesis in five numbered steps."


def ask(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "specthink-edge"), "ask", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("SPECTHINK_")},
            **(env or {}),
        },
    )


def check_answer_structure(result: dict) -> None:
    segments = result["segments"]
    stats = result["stats"]
    assert "".join(s["text"] for s in segments) == result["text"]
    assert stats["edge_tokens"] == sum(s["tokens"] for s in segments if s["source"] == "edge")
    assert stats["cloud_tokens"] == sum(s["tokens"] for s in segments if s["source"] == "cloud")
    assert stats["takeovers"] == sum(1 for s in segments if s["source"] == "cloud")
    assert not stats["fallback"]
    # non-reasoning mode: the cloud writes the opening (100 tokens unless it ended first)
    first = segments[0]
    assert (first["source"], first["reason"]) == ("cloud", "non_reasoning_start")
    assert first["tokens"] == 100 or (len(segments) == 1 and result["finish_reason"] == "stop")
    # ... and every later cloud segment begins right after a paragraph break
    offset = 0
    for segment in segments:
        if segment["source"] == "cloud" and offset:
            assert result["text"][:offset].endswith("\n\n"), segment
            assert segment["reason"].startswith("non_reasoning_break")
            assert segment["tokens"] <= 20 + 125  # n1, plus n2 when it verified
        offset += len(segment["text"])
    assert stats["cloud_prefill_tokens"] > 0


def run_speculative(model: Path, cloud_address: str) -> dict:
    done = ask(
        PROMPT,
        "--model",
        str(model),
        "--cloud",
        cloud_address,
        "--json",
        "--mode",
        "non-reasoning",
        "--temperature",
        "0",
        "--max-tokens",
        "220",
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_speculative_answer_over_grpc_smollm2_edge_and_cloud(smollm2, smollm2_cloud):
    result = run_speculative(smollm2, smollm2_cloud.address)
    check_answer_structure(result)
    sources = {s["source"] for s in result["segments"]}
    assert sources == {"edge", "cloud"}, "both models wrote part of the answer"
    # the cloud re-used its session cache across takeovers
    assert result["stats"]["takeovers"] >= 2
    assert result["stats"]["cloud_cached_tokens"] > 0


def test_speculative_answer_across_tokenizer_families_gemma_edge(gemma, smollm2_cloud):
    result = run_speculative(gemma, smollm2_cloud.address)
    check_answer_structure(result)
    assert any(s["source"] == "edge" for s in result["segments"])


def test_edge_evaluates_only_new_tokens_after_a_takeover(smollm2):
    drafter = LlamaDrafter(smollm2, context_length=2048)
    messages = [Message("user", "Name three colours.")]
    greedy = Sampling(temperature=0)
    first = "".join(t.text for t in drafter.draft(messages, "", 24, greedy))
    cached = list(drafter.llm._input_ids)
    # a takeover appends text the edge did not write; the edge re-tokenizes everything
    text = first + " The cloud adds this sentence."
    tokens = drafter.tokenize(messages, text)
    common = next(
        (i for i, (a, b) in enumerate(zip(cached, tokens, strict=False)) if a != b),
        min(len(cached), len(tokens)),
    )
    list(drafter.draft(messages, text, 4, greedy))
    assert drafter.counters.last_evaluated == len(tokens) - common
    new_tokens = len(tokens) - len(drafter.tokenize(messages, first))
    assert drafter.counters.last_evaluated <= new_tokens + 2  # + the last sampled token
    assert drafter.counters.last_evaluated < len(tokens) // 3


def test_ask_reads_the_prompt_from_stdin_and_runs_edge_only_without_a_cloud(smollm2):
    done = ask(
        "--model", str(smollm2), "--max-tokens", "12", "--temperature", "0", stdin="Say hello."
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert "running edge-only" in done.stderr


@pytest.mark.parametrize(
    ("case", "args", "message"),
    [
        ("unknown model path", ["--model", "/nope/missing.gguf"], "model file not found"),
        ("non-GGUF file", ["--model", "{not_gguf}"], "not a GGUF model file"),
        ("malformed policy file", ["--policy", "{bad_policy}"], "not valid TOML"),
        ("unknown policy knob", ["--set", "takover_tokens=3"], "unknown policy knob"),
        ("malformed cloud address", ["--cloud", "localhost:notaport"], "cloud"),
        ("bad temperature", ["--temperature", "9"], "temperature"),
        ("bad mode", ["--mode", "fast"], "mode"),
    ],
)
def test_bad_input_is_one_line_error_and_non_zero_exit(tmp_path, smollm2, case, args, message):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("this is not a model")
    bad_policy = tmp_path / "policy.toml"
    bad_policy.write_text("takeover_tokens = = 3")
    args = [a.format(not_gguf=not_gguf, bad_policy=bad_policy) for a in args]
    if "--model" not in args:
        args += ["--model", str(smollm2)]
    done = ask("What is 2+2?", *args, "--max-tokens", "4")
    assert done.returncode != 0, case
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, done.stderr
    assert message in errors[0]


def test_empty_prompt_is_refused(smollm2):
    done = ask("   ", "--model", str(smollm2))
    assert done.returncode == 2
    assert done.stderr.strip() == "specthink-edge: error: empty prompt"


def test_unreachable_cloud_still_answers_locally_and_exits_non_zero(smollm2):
    done = ask(
        "Say hi.",
        "--model",
        str(smollm2),
        "--cloud",
        "127.0.0.1:9",
        "--mode",
        "non-reasoning",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        env={"SPECTHINK_CONNECT_TIMEOUT": "0.5"},
    )
    assert done.returncode == 5
    assert "Traceback" not in done.stderr
    assert done.stdout.strip(), "the answer is not lost"
    # one line, at the start, that says why: no retries of an address never reached
    assert done.stderr.strip().splitlines() == [
        "specthink-edge: cloud 127.0.0.1:9 unusable: connection refused (is the cloud "
        "running on that port?); writing on this machine only",
        "specthink-edge: the answer was cut at the token budget (--max-tokens)",
    ]
