"""The cloud-judge trigger: the pure policy (score in, decision out) and the session loop
against a scripted cloud that judges (one call per break, the verdict first)."""

from __future__ import annotations

import math

import pytest

from edge.cloud_session import CloudSession
from edge.session import SessionOptions, SpeculativeSession
from shared import errors
from shared.policy import (
    Mode,
    PolicyConfig,
    PolicyConfigError,
    PolicyState,
    Rule,
    Trigger,
    Writer,
    decide_at_break,
    judge_accepts,
    judge_score,
    judged,
    needs_probe,
    needs_uncertainty,
)
from shared.policy_config import config_from_mapping
from shared.wire import FINISH_PROBE_ACCEPTED, FullText, Message, TextDelta, text_digest
from tests.fakes import ScriptedCloud
from tests.unit.test_uncertainty_trigger import EntropyDrafter

JUDGE = PolicyConfig(
    mode=Mode.NON_REASONING,
    trigger=Trigger.CLOUD_JUDGE,
    judge_threshold=-1.0,
    start_tokens=0,
    takeover_tokens=2,
    probe_tokens=2,
)

# ---- the policy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "score, writer, rule, reason",
    [
        (-0.41, Writer.EDGE, Rule.CLOUD_ACCEPTS, "cloud_accepts:-0.41"),
        (-1.0, Writer.EDGE, Rule.CLOUD_ACCEPTS, "cloud_accepts:-1.00"),  # at the threshold
        (-1.84, Writer.CLOUD, Rule.CLOUD_JUDGE, "cloud_judge:-1.84"),
        (-12.0, Writer.CLOUD, Rule.CLOUD_JUDGE, "cloud_judge:-12.00"),
    ],
)
def test_the_judges_score_decides_and_names_itself(score, writer, rule, reason):
    ask = decide_at_break(JUDGE, PolicyState.initial(JUDGE), "Then x = 3.", None)
    assert ask.asks_judge and ask.writer is Writer.CLOUD and ask.tokens == 2
    assert ask.judge_threshold == -1.0
    decision = judged(ask, score)
    assert (decision.writer, decision.rule, decision.reason) == (writer, rule, reason)
    assert not decision.asks_judge
    assert judge_accepts(score, -1.0) is (writer is Writer.EDGE)
    if writer is Writer.CLOUD:  # it writes n1 with the verification continuation
        assert decision.tokens == 2 and decision.continue_if


def test_the_score_is_the_mean_log_probability_per_token():
    assert judge_score([-0.5, -1.5, -4.0]) == pytest.approx(-2.0)
    assert judge_score([]) == 0.0  # nothing to be surprised by


def test_every_break_asks_the_judge_in_both_modes_but_not_before_a_recap():
    for mode in Mode:
        config = PolicyConfig(mode=mode, trigger=Trigger.CLOUD_JUDGE)
        state = PolicyState.initial(config)
        assert needs_probe(config, state)
        assert not needs_uncertainty(config)  # no entropy needed unless combined
        assert decide_at_break(config, state, "probe", None).asks_judge
        recap_due = PolicyState(negativity=15, threshold=15)
        assert not needs_probe(config, recap_due)
        assert decide_at_break(config, recap_due, None).rule is Rule.EXCESSIVE_REFLECTION


def test_an_empty_probe_is_kept_without_a_call():
    decision = decide_at_break(JUDGE, PolicyState.initial(JUDGE), "", None)
    assert decision.writer is Writer.EDGE and not decision.asks_judge


def test_combined_with_uncertainty_only_unsure_probes_go_to_the_judge():
    config = PolicyConfig(trigger=Trigger.CLOUD_JUDGE, judge_min_uncertainty=0.5)
    state = PolicyState.initial(config)
    assert needs_uncertainty(config)
    sure = decide_at_break(config, state, "probe", [0.1, 0.2])
    assert (sure.writer, sure.rule, sure.reason) == (
        Writer.EDGE,
        Rule.CONFIDENT_PROBE,
        "confident_probe:0.15",
    )
    unsure = decide_at_break(config, state, "probe", [0.9, 0.7])
    assert unsure.asks_judge and unsure.uncertainty == pytest.approx(0.8)
    assert judged(unsure, -3.0).reason == "cloud_judge:-3.00"  # the judge's score names it


def test_only_a_decision_that_asks_can_be_judged():
    keep = decide_at_break(PolicyConfig(trigger=Trigger.UNCERTAINTY), PolicyState(), "p", [0.0])
    with pytest.raises(ValueError):
        judged(keep, -1.0)


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"judge_threshold": "0.5"}, "<= 0"),
        ({"judge_threshold": "nan"}, "<= 0"),
        ({"judge_threshold": "-inf"}, "<= 0"),
        ({"judge_threshold": "abc"}, "must be a number"),
        ({"judge_min_uncertainty": "-1"}, ">= 0"),
        ({"trigger": "judge"}, "'cloud-judge'"),
    ],
)
def test_bad_judge_knobs_are_refused_with_the_reason(knobs, message):
    with pytest.raises(PolicyConfigError, match=message):
        config_from_mapping(knobs)


def test_judge_knobs_parse_from_strings():
    config = config_from_mapping(
        {"trigger": "cloud-judge", "judge_threshold": "-1.25", "judge_min_uncertainty": "0.3"}
    )
    assert config.trigger is Trigger.CLOUD_JUDGE
    assert (config.judge_threshold, config.judge_min_uncertainty) == (-1.25, 0.3)


# ---- the loop --------------------------------------------------------------------------


def run(tokens, cloud: ScriptedCloud, config: PolicyConfig = JUDGE):
    loop = SpeculativeSession(
        EntropyDrafter(tokens),
        CloudSession(cloud, "s"),
        SessionOptions(max_tokens=200, policy=config),
    )
    return loop.run([Message("user", "q")])


TOKENS = [
    ("First.", 0.1),
    ("\n\n", 0.1),  # the first break
    ("Good", 0.2),
    (" step.", 0.3),
    ("\n\n", 0.1),  # probe 1: the judge keeps it
    ("Bad", 2.5),
    (" step", 0.1),  # probe 2: the judge rejects it; the cloud writes
    (" edge", 0.1),
    (" end.", 0.1),
]


def test_a_kept_probe_stays_and_a_rejected_one_is_replaced_in_one_call_each():
    cloud = ScriptedCloud([[" Cloud", " text."]], judge_scores=[-0.41, -1.84])
    answer = run(list(TOKENS), cloud)
    reasons = [(s.source, s.reason) for s in answer.segments]
    assert reasons[:3] == [
        ("edge", "edge_draft"),
        ("edge", "cloud_accepts:-0.41"),
        ("cloud", "cloud_judge:-1.84"),
    ]
    assert "Good step." in answer.text and "Bad" not in answer.text
    assert " Cloud text." in answer.text
    # one call per judged break, each carrying the probe and the threshold
    assert [c.judge.probe for c in cloud.calls if c.judge] == ["Good step.", "Bad step"]
    assert all(c.judge.accept_at == -1.0 for c in cloud.calls if c.judge)
    assert len(cloud.calls) == 2
    s = answer.stats
    assert (s.judge_calls, s.judge_accepts, s.takeovers, s.takeover_attempts) == (2, 1, 1, 1)
    assert s.probe_tokens_discarded == 2  # the rejected probe, nothing of the kept one
    assert s.cloud_tokens == 2


def test_after_a_kept_probe_the_next_call_is_a_delta_on_text_that_holds_it():
    cloud = ScriptedCloud([[" Cloud", " text."]], judge_scores=[-0.41, -1.84])
    run(list(TOKENS), cloud)
    first, second = cloud.calls
    assert isinstance(first.text, FullText)
    # the cloud confirmed text + probe: the second call is a delta on exactly that
    assert isinstance(second.text, TextDelta)
    kept = "First.\n\nGood step."
    assert (second.text.base_length, second.text.base_sha256) == text_digest(kept)
    assert second.text.append == "\n\n"  # what the edge wrote after the kept probe


def test_a_judged_call_that_fails_before_its_verdict_keeps_the_probe():
    cloud = ScriptedCloud([], fail_with=[errors.Unavailable("down")] * 2)
    answer = run(list(TOKENS), cloud)
    reasons = [s.reason for s in answer.segments]
    assert reasons[1] == "fallback:Unavailable:cloud_judge"
    assert "Good step." in answer.text  # the small model's probe stands
    assert answer.stats.fallbacks >= 1 and answer.stats.judge_accepts == 0
    assert answer.stats.takeovers == 0


def test_a_cloud_that_does_not_judge_writes_as_before():
    cloud = ScriptedCloud([[" C1."], [" C2."]])  # no judge_scores: it ignores the probe
    answer = run(list(TOKENS), cloud)
    clouds = [s for s in answer.segments if s.source == "cloud"]
    assert clouds and all(s.reason == "cloud_judge" for s in clouds)
    assert "Good" not in answer.text  # nothing kept without a verdict
    assert answer.stats.judge_accepts == 0


def test_the_edge_follows_what_the_cloud_did_when_its_reading_differs():
    # the cloud keeps probes down to -2.0; the edge sent -1.0, which would reject -1.84
    cloud = ScriptedCloud([[" Cloud", " text."]], judge_scores=[-0.41, -1.84], judges_at=-2.0)
    answer = run(list(TOKENS), cloud)
    assert [s.reason for s in answer.segments][1:3] == [
        "cloud_accepts:-0.41",
        "cloud_accepts:-1.84",
    ]
    assert "Bad step" in answer.text and answer.stats.takeovers == 0


def test_finish_reason_of_a_kept_probe_does_not_end_the_answer():
    cloud = ScriptedCloud([], judge_scores=[0.0, 0.0])
    answer = run(list(TOKENS), cloud)
    assert answer.text.endswith("Bad step edge end.")
    assert answer.finish_reason != FINISH_PROBE_ACCEPTED
    assert not math.isnan(answer.stats.judge_wait_s)
