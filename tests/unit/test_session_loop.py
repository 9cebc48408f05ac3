"""The session loop with a scripted drafter and a scripted cloud: segments, sources,
reasons, the delta/full-text protocol, FAILED_PRECONDITION recovery and fallbacks."""

from __future__ import annotations

import pytest

from edge.session import Answer, CloudRefused, CloudSession, SessionOptions, SpeculativeSession
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
