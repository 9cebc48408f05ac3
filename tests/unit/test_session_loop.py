"""The session loop with a scripted drafter and a scripted cloud: segments, sources,
reasons, the delta/full-text protocol, FAILED_PRECONDITION recovery and fallbacks."""

from __future__ import annotations

import pytest

from edge.answer import Answer, CloudRefused
from edge.cloud_session import CloudSession
from edge.session import SessionOptions, SpeculativeSession
from shared import errors
from shared.policy import Mode, PolicyConfig
from shared.wire import FullText, Message, TextDelta
from tests.fakes import ScriptedCloud, ScriptedDrafter

MESSAGES = [Message("user", "What is 2+2?")]


def run(
    drafter, cloud, *, mode=Mode.REASONING, strategy="speculative", max_tokens=200, **knobs
) -> tuple[Answer, CloudSession | None, list]:
    events: list = []
    session = CloudSession(cloud, "s1") if cloud is not None else None
    options = SessionOptions(
        strategy=strategy, max_tokens=max_tokens, policy=PolicyConfig(mode=mode, **knobs)
    )
    answer = SpeculativeSession(drafter, session, options, sink=events.append).run(MESSAGES)
    return answer, session, events


def assert_consistent(answer: Answer) -> None:
    assert "".join(s.text for s in answer.segments) == answer.text
    assert answer.stats.edge_tokens == sum(s.tokens for s in answer.segments if s.source == "edge")
    assert answer.stats.cloud_tokens == sum(
        s.tokens for s in answer.segments if s.source == "cloud"
    )


def test_neutral_probe_keeps_small_model_text_and_reflection_hands_over():
    drafter = ScriptedDrafter(
        [
            "Add",
            " them",
            ".\n\n",  # first paragraph
            "So",
            " 2+2",
            "=4",
            ".\n\n",  # probe 1: neutral, kept
            "Wait",
            ",",
            " hmm",
        ]
    )  # probe 2: reflection, discarded
    cloud = ScriptedCloud(replies=[["Yes", " it", " is", " 4", "."]], end_of_sequence_on_last=True)
    answer, _, _ = run(drafter, cloud)
    assert [(s.source, s.reason) for s in answer.segments] == [
        ("edge", "edge_draft"),
        ("edge", "neutral_probe"),
        ("cloud", "reflection:wait"),
    ]
    assert answer.text == "Add them.\n\nSo 2+2=4.\n\nYes it is 4."
    assert "Wait" not in answer.text  # the reflective probe was replaced
    assert answer.stats.probe_tokens_discarded == 3
    assert answer.finish_reason == "stop"  # the cloud's end of sequence ends the answer
    assert (answer.stats.takeovers, answer.stats.edge_tokens, answer.stats.cloud_tokens) == (
        1,
        7,
        5,
    )
    assert_consistent(answer)


def test_one_takeover_makes_exactly_one_call_with_verification_knobs():
    drafter = ScriptedDrafter(["A", ".\n\n", "Let", " me", " check"])
    cloud = ScriptedCloud(replies=[["ok"]], end_of_sequence_on_last=True)
    answer, _, _ = run(drafter, cloud)
    assert len(cloud.calls) == 1
    write = cloud.calls[0].write
    assert (write.max_tokens, write.continue_tokens) == (20, 125)
    assert "check" in write.continue_if
    assert answer.segments[-1].reason == "verification:check"


def test_non_reasoning_mode_cloud_opens_then_takes_over_after_every_break():
    drafter = ScriptedDrafter(["x", " is", " 2", ".\n\n", "y", " is", " 3", ".\n\n", "done"])
    opening = ["Let", " us", " see", ".\n\n"]
    cloud = ScriptedCloud(replies=[opening, ["First", ","], ["Second", ".\n\n"], ["End"]])
    answer, _, _ = run(drafter, cloud, mode=Mode.NON_REASONING, max_tokens=120)
    sources = [(s.source, s.reason) for s in answer.segments]
    assert sources[0] == ("cloud", "non_reasoning_start")
    assert cloud.calls[0].write.max_tokens == 100
    # every cloud segment after the opening starts right after a paragraph break
    at = 0
    for segment in answer.segments:
        if segment.source == "cloud" and at:
            assert answer.text[:at].endswith("\n\n"), segment
            assert segment.reason == "non_reasoning_break"
        at += len(segment.text)
    assert_consistent(answer)


def test_delta_protocol_sends_only_new_text_against_confirmed_base():
    drafter = ScriptedDrafter(["P", ".\n\n", "Wait", "!\n\n", "Q", ".\n\n", "Hold on", "R"])
    cloud = ScriptedCloud(replies=[["A", ".", " "], ["B"]], end_of_sequence_on_last=True)
    answer, _, _ = run(drafter, cloud)
    first, second = cloud.calls
    assert isinstance(first.text, FullText)
    assert first.text.assistant_text == "P.\n\n"
    assert isinstance(second.text, TextDelta)
    assert second.text.base_length == len("P.\n\nA. ")
    assert second.text.append == "Q.\n\n"  # only what the edge wrote since
    assert answer.text == "P.\n\nA. Q.\n\nB"


def test_cloud_restart_is_recovered_by_full_text_resend():
    drafter = ScriptedDrafter(["P", ".\n\n", "Wait\n\n", "Q", ".\n\n", "Wait", "R"])
    cloud = ScriptedCloud(replies=[["A", " "], ["B"]], end_of_sequence_on_last=True)
    session = CloudSession(cloud, "s1")
    options = SessionOptions(max_tokens=100)
    loop = SpeculativeSession(drafter, session, options)
    original = cloud.takeover

    def restart_before_second_call(call):
        if len(cloud.calls) == 1:
            cloud.restart()  # the cloud lost its state between the takeovers
        return original(call)

    cloud.takeover = restart_before_second_call  # type: ignore[method-assign]
    answer = loop.run(MESSAGES)
    kinds = [type(c.text).__name__ for c in cloud.calls]
    assert kinds == ["FullText", "TextDelta", "FullText"]
    assert answer.stats.full_text_resends == 1
    assert answer.text == "P.\n\nA Q.\n\nB"
    assert not answer.stats.fallback


def test_unavailable_cloud_falls_back_to_local_writing_and_says_so():
    drafter = ScriptedDrafter(["P", ".\n\n", "Wait\n\n", "x", "y", "z"])
    cloud = ScriptedCloud(replies=[], fail_with=[errors.Unavailable("connection refused")])
    answer, _, events = run(drafter, cloud)
    assert answer.stats.fallback and answer.stats.fallbacks == 1
    fallback_segment = next(s for s in answer.segments if s.reason.startswith("fallback"))
    assert fallback_segment.source == "edge"
    assert fallback_segment.reason == "fallback:Unavailable:reflection:wait"
    assert any(e.kind == "fallback" for e in events)
    assert answer.text == "P.\n\nxyz"
    assert_consistent(answer)


def test_cloud_failing_mid_stream_keeps_what_it_sent():
    drafter = ScriptedDrafter(["P", ".\n\n", "Wait\n\n", "local"])
    cloud = ScriptedCloud(replies=[["c1", "c2", "c3", "c4"]], fail_after_tokens=2)
    answer, _, _ = run(drafter, cloud)
    assert answer.text == "P.\n\nc1c2local"
    cloud_segment = next(s for s in answer.segments if s.source == "cloud")
    assert (cloud_segment.text, cloud_segment.tokens) == ("c1c2", 2)
    assert answer.stats.fallback
    assert_consistent(answer)


def test_unauthenticated_cloud_stops_with_the_partial_answer():
    drafter = ScriptedDrafter(["P", ".\n\n", "Wait"])
    cloud = ScriptedCloud(replies=[], fail_with=[errors.Unauthenticated("bad key")])
    with pytest.raises(CloudRefused) as caught:
        run(drafter, cloud)
    assert isinstance(caught.value.error, errors.Unauthenticated)
    assert caught.value.answer.text == "P.\n\n"


def test_token_budget_bounds_the_answer():
    drafter = ScriptedDrafter(["a"] * 500, end_when_empty=False)
    answer, _, _ = run(drafter, None, strategy="edge", max_tokens=37)
    assert answer.stats.edge_tokens == 37
    assert answer.finish_reason == "length"


def test_edge_strategy_never_calls_the_cloud():
    drafter = ScriptedDrafter(["P", ".\n\n", "Wait", " no", ".\n\n", "end"])
    cloud = ScriptedCloud(replies=[["never"]])
    answer, _, _ = run(drafter, cloud, strategy="edge")
    assert cloud.calls == []
    assert answer.text == "P.\n\nWait no.\n\nend"
    assert {s.source for s in answer.segments} == {"edge"}


def test_cloud_strategy_lets_the_large_model_write_everything():
    drafter = ScriptedDrafter(["never"])
    cloud = ScriptedCloud(replies=[["A", ".\n\n"], ["B"]], end_of_sequence_on_last=True)
    answer, _, _ = run(drafter, cloud, strategy="cloud")
    assert drafter.calls == []
    assert answer.text == "A.\n\nB"
    assert {s.source for s in answer.segments} == {"cloud"}
    assert isinstance(cloud.calls[1].text, TextDelta)


def test_excessive_reflection_recap_is_written_by_the_cloud_with_its_preamble():
    # threshold 1: the first negative takeover arms the recap for the next break
    drafter = ScriptedDrafter(["P", ".\n\n", "Wait", "Q", ".\n\n"])
    cloud = ScriptedCloud(
        replies=[["Wait", ",", " no", ".\n\n"], [" step", " 1"]], end_of_sequence_on_last=True
    )
    answer, _, _ = run(drafter, cloud, negativity_threshold=1)
    recap_call = cloud.calls[1]
    assert recap_call.write.preamble == "Let me check whether there are some wrong steps:"
    assert recap_call.write.max_tokens == 125
    recap = answer.segments[-1]
    assert (recap.source, recap.reason) == ("cloud", "excessive_reflection")
    assert recap.text == "Let me check whether there are some wrong steps: step 1"
    assert recap.tokens == 2  # the preamble is not counted as written tokens
    assert_consistent(answer)


def test_prefill_ahead_warms_the_cloud_and_the_takeover_sends_only_the_rest():
    drafter = ScriptedDrafter(["a", "b", "c", "d", "e", ".\n\n", "Wait\n\n"])
    cloud = ScriptedCloud(replies=[["opening", " "], ["X"]], end_of_sequence_on_last=True)
    session = CloudSession(cloud, "s1")
    options = SessionOptions(
        max_tokens=100, prefill_every=2, policy=PolicyConfig(mode=Mode.NON_REASONING)
    )
    answer = SpeculativeSession(drafter, session, options).run(MESSAGES)
    assert cloud.prefills, "the edge pushed its text ahead of the takeover"
    assert answer.stats.cloud_prefills == len(cloud.prefills)
    last = cloud.calls[-1]
    assert isinstance(last.text, TextDelta)
    # only what the edge wrote after the last prefill travels with the takeover
    assert len(last.text.append) < len("abcde.\n\n")
    assert answer.text == "opening abcde.\n\nX"
    assert answer.stats.full_text_resends == 0


# ---- a cloud the text has outgrown --------------------------------------------------------


def test_context_full_cloud_keeps_its_text_and_the_edge_writes_the_rest_alone():
    drafter = ScriptedDrafter(
        ["P", ".\n\n", "Wait", "\n\n", "edge", " goes", " on", ".\n\n", "end"]
    )
    cloud = ScriptedCloud(replies=[["c1", "c2"]], finish_reasons=["context_full"])
    answer, _, events = run(drafter, cloud)
    assert answer.text == "P.\n\nc1c2edge goes on.\n\nend"
    assert len(cloud.calls) == 1, "no more takeovers once the text outgrew the cloud"
    rest = answer.segments[-1]
    assert (rest.source, rest.reason) == ("edge", "edge_alone:context_full:reflection:wait")
    assert answer.stats.cloud_full and answer.stats.fallback
    assert answer.finish_reason == "stop"
    assert [e.data["error"] for e in events if e.kind == "fallback"] == ["ContextFull"]
    assert "no longer fits the cloud" in answer.notices[0]
    assert_consistent(answer)


def test_a_refusal_for_size_is_no_bad_request_the_answer_goes_on_locally():
    drafter = ScriptedDrafter(["P", ".\n\n", "Wait", "\n\n", "x", ".\n\n", "Hold on", "y"])
    too_long = errors.TextTooLong("text too long: 900 characters, limit 64")
    cloud = ScriptedCloud(replies=[], fail_with=[too_long])
    answer, _, _ = run(drafter, cloud)  # no CloudRefused: nothing is thrown away
    assert answer.text == "P.\n\nx.\n\nHold ony"
    assert len(cloud.calls) == 1
    assert answer.stats.cloud_full and answer.stats.cloud_tokens == 0
    assert answer.segments[-1].reason == "edge_alone:context_full:reflection:wait"
    assert_consistent(answer)


def test_a_bad_request_that_is_not_about_size_still_stops_with_the_partial_answer():
    drafter = ScriptedDrafter(["P", ".\n\n", "Wait"])
    cloud = ScriptedCloud(replies=[], fail_with=[errors.InvalidRequest("bad top_p")])
    with pytest.raises(CloudRefused) as caught:
        run(drafter, cloud)
    assert caught.value.answer.text == "P.\n\n"


def test_the_cloud_strategy_goes_on_with_the_edge_when_its_context_is_full():
    drafter = ScriptedDrafter(["edge", " rest"])
    cloud = ScriptedCloud(replies=[["A", ".\n\n"]], finish_reasons=["context_full"])
    answer, _, _ = run(drafter, cloud, strategy="cloud")
    assert answer.text == "A.\n\nedge rest"
    assert [s.source for s in answer.segments] == ["cloud", "edge"]
    assert len(cloud.calls) == 1


# ---- counters that follow the text --------------------------------------------------------


def test_takeovers_count_the_cloud_segments_not_the_failed_attempts():
    drafter = ScriptedDrafter(["P", ".\n\n", "Wait\n\n", "x", ".\n\n", "Wait", "\n\n", "z"])
    cloud = ScriptedCloud(replies=[["B", "."]], fail_with=[errors.Unavailable("refused"), None])
    answer, _, _ = run(drafter, cloud)
    cloud_segments = [s for s in answer.segments if s.source == "cloud"]
    assert len(cloud_segments) == 1 and cloud_segments[0].text == "B."
    assert answer.stats.takeovers == 1
    assert (answer.stats.takeover_attempts, answer.stats.fallbacks) == (2, 1)
    assert_consistent(answer)


def test_the_fallback_writes_what_is_left_of_n1_and_stops_at_the_next_break():
    drafter = ScriptedDrafter(["P", ".\n\n", "Wait\n\n", "a", "b", ".\n\n", "Wait", "R"])
    cloud = ScriptedCloud(
        replies=[["c1", "c2", "c3"], ["S"]], fail_after_tokens=2, end_of_sequence_on_last=True
    )
    answer, _, _ = run(drafter, cloud, takeover_tokens=10)
    # the stand-in is asked for n1 - what the cloud wrote (8), never n1 + n2 (10 + 125) ...
    fallback_call = next(c for c in drafter.calls if c[0] == "P.\n\nc1c2")
    assert fallback_call[1] == 8
    # ... and it stops at the break, where the policy decides again
    fallback = next(s for s in answer.segments if s.reason.startswith("fallback:"))
    assert fallback.text == "ab.\n\n"
    assert len(cloud.calls) == 2
    assert_consistent(answer)


def test_the_negativity_counter_counts_only_what_the_cloud_wrote():
    # the cloud writes two neutral tokens and dies; the edge's stand-in is full of "wait"
    drafter = ScriptedDrafter(["P", ".\n\n", "Wait\n\n", " wait", " wait", " hold on"])
    cloud = ScriptedCloud(replies=[["fine", ".", " more"]], fail_after_tokens=2)
    session = CloudSession(cloud, "s1")
    loop = SpeculativeSession(drafter, session, SessionOptions(max_tokens=100))
    answer = loop.run(MESSAGES)
    assert "wait wait" in answer.text
    assert loop.state.negativity == 0, "the edge's fallback text is not the large model's"
    assert loop.state.takeovers == 1


def test_a_takeover_where_the_cloud_wrote_nothing_leaves_the_policy_state_alone():
    drafter = ScriptedDrafter(["P", ".\n\n", "Wait\n\n", "x", "y"])
    cloud = ScriptedCloud(replies=[], fail_with=[errors.Unavailable("refused")])
    loop = SpeculativeSession(drafter, CloudSession(cloud, "s1"), SessionOptions(max_tokens=50))
    loop.run(MESSAGES)
    assert (loop.state.negativity, loop.state.takeovers) == (0, 0)


# ---- a background prefill is waited for only so long --------------------------------------


class SlowPrefillCloud(ScriptedCloud):
    """A scripted cloud whose Prefill hangs until released (a slow or stuck cloud)."""

    def __init__(self, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        import threading

        self.release = threading.Event()

    def prefill(self, session_id, body):  # type: ignore[no-untyped-def]
        self.release.wait(30)
        return super().prefill(session_id, body)


def test_a_takeover_does_not_wait_for_a_prefill_past_its_bound_and_sends_the_full_text():
    drafter = ScriptedDrafter(["a", "b", ".\n\n"])
    cloud = SlowPrefillCloud(replies=[["opening", " "], ["X"]], end_of_sequence_on_last=True)
    session = CloudSession(cloud, "s1", prefill_wait_s=0.05)
    options = SessionOptions(
        max_tokens=100, prefill_every=2, policy=PolicyConfig(mode=Mode.NON_REASONING)
    )
    try:
        answer = SpeculativeSession(drafter, session, options).run(MESSAGES)
    finally:
        cloud.release.set()
    assert answer.text == "opening ab.\n\nX"
    assert answer.stats.cloud_prefills_abandoned == 1
    # the cloud may or may not have taken the abandoned prefill: the next call is whole
    assert isinstance(cloud.calls[-1].text, FullText)


# ---- the think block is decided on the wire -----------------------------------------------


def test_a_reasoning_answer_opens_its_think_block_in_the_text_the_cloud_receives():
    drafter = ScriptedDrafter(["Let", " me", " see", ".\n\n", "Wait", ",", " no"])
    cloud = ScriptedCloud(replies=[["Right", "."]], end_of_sequence_on_last=True)
    session = CloudSession(cloud, "s1")
    options = SessionOptions(max_tokens=100, think_prefix="<think>\n")
    answer = SpeculativeSession(drafter, session, options).run(MESSAGES)
    assert answer.text == "<think>\nLet me see.\n\nRight."
    assert drafter.calls[0][0] == "<think>\n", "the small model continues inside the block"
    call = cloud.calls[0].text
    assert isinstance(call, FullText) and call.assistant_text.startswith("<think>\n")
    opening = answer.segments[0]
    assert (opening.source, opening.text, opening.tokens, opening.reason) == (
        "edge",
        "<think>\n",
        0,
        "think_block",
    )
    assert_consistent(answer)
