"""What a run adds to the loop's own report of an answer: the stats the session loop cannot
know (the mode and why, the edge's prompt counters, retries, a cloud that could not be used
at all) for `--json` / `--jsonl`, and the `-v` lines of speeds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge.answer import Answer
    from edge.run import Run


def report_stats(stats: dict[str, Any], run: Run) -> dict[str, Any]:
    """The loop's stats with what the run knows added (--json, --jsonl)."""
    stats["mode"] = str(run.session_options.policy.mode)
    stats["mode_reason"] = run.mode_reason
    model = run.small_model
    if model is not None:
        stats["edge_evaluated_prompt_tokens"] = model.counters.evaluated_prompt_tokens
        stats["edge_prompt_tokens"] = model.counters.prompt_tokens
    if run.transport is not None:
        stats["cloud_retries"] = run.transport.retries
    unusable = run.cloud_unusable
    if unusable is not None:
        stats["fallback"] = True
        stats["cloud_unusable"] = unusable.why
    return stats


def answer_json(answer: Answer, run: Run) -> dict[str, Any]:
    """The one JSON object of `--json`."""
    result = answer.to_json()
    # what the run said on stderr (no cloud, an unusable cloud ...), then the answer's own
    result["notices"] = [*run.say.said, *result["notices"]]
    result["strategy"] = str(run.strategy)
    report_stats(result["stats"], run)
    return result


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:.1f} tok/s" if seconds > 0 else "- tok/s"


def speed_lines(answer: Answer, run: Run) -> list[str]:
    """-v: load, prompt, edge and cloud generation apart (as Ollama's --verbose)."""
    s = answer.stats
    model = run.small_model
    counters = model.counters if model is not None else None
    total = s.edge_tokens + s.cloud_tokens
    retries = run.transport.retries if run.transport is not None else 0
    lines = [f"mode        {run.mode_reason}"]
    if model is not None:
        lines.append(f"load        {model.load_s:.2f} s (small model)")
    if counters is not None:
        cached = counters.prompt_tokens - counters.evaluated_prompt_tokens
        lines.append(
            f"prompt      {_count(counters.evaluated_prompt_tokens, 'token', 'tokens')} "
            f"evaluated of {counters.prompt_tokens} in {counters.prompt_eval_s:.2f} s "
            f"({_rate(counters.evaluated_prompt_tokens, counters.prompt_eval_s)})"
            + (f"; {cached} from the KV cache" if cached > 0 else "")
        )
    edge_gen_s = max(0.0, s.edge_draft_s - (counters.prompt_eval_s if counters else 0.0))
    lines.append(
        f"edge        {_count(s.edge_tokens, 'token', 'tokens')} in {edge_gen_s:.2f} s "
        f"({_rate(s.edge_tokens, edge_gen_s)})"
    )
    if run.transport is not None or s.cloud_tokens:
        lines.append(
            f"cloud       {_count(s.cloud_tokens, 'token', 'tokens')} in {s.cloud_wait_s:.2f} s "
            f"({_rate(s.cloud_tokens, s.cloud_wait_s)} incl. network), "
            f"{_count(s.takeovers, 'takeover', 'takeovers')}; cache {s.cloud_cached_tokens} "
            f"cached / {s.cloud_prefill_tokens} prefilled"
        )
        lines.append(
            f"faults      {_count(retries, 'retry', 'retries')}, "
            f"{_count(s.full_text_resends, 'full-text resend', 'full-text resends')}, "
            f"{_count(s.fallbacks, 'fallback', 'fallbacks')}"
        )
    lines.append(
        f"total       {_count(total, 'token', 'tokens')} in {s.wall_s:.2f} s "
        f"({_rate(total, s.wall_s)}), first token after {s.ttft_s:.2f} s"
    )
    return lines
