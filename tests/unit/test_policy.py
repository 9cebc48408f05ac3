"""Table tests of every rule of the policy (Speculative Thinking, Yang et al., COLM 2025: the
control loop of its method), on scripted text, no models."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared import policy, policy_config
from shared.policy import (
    Category,
    Decision,
    Mode,
    Polarity,
    PolicyConfig,
    PolicyConfigError,
    PolicyState,
    Rule,
    Writer,
)

CFG = PolicyConfig()
NON_REASONING = PolicyConfig(mode=Mode.NON_REASONING)


@pytest.mark.parametrize(
    ("text", "category", "polarity", "keyword"),
    [
        ("So the answer is 4.", Category.NEUTRAL, Polarity.NEUTRAL, None),
        ("Yes, that works.", Category.AFFIRMATION, Polarity.POSITIVE, "yes"),
        (
            "I am confident the final answer is 4.",
            Category.AFFIRMATION,
            Polarity.POSITIVE,
            "confident",
        ),
        ("Wait, that is wrong.", Category.REFLECTION, Polarity.NEGATIVE, "wait"),
        (
            "Alternatively, use the formula.",
            Category.REFLECTION,
            Polarity.NEGATIVE,
            "alternatively",
        ),
        ("Hold on, 3 is odd.", Category.REFLECTION, Polarity.NEGATIVE, "hold on"),
        ("Another way is to factor.", Category.REFLECTION, Polarity.NEGATIVE, "another"),
        ("Let me verify this.", Category.VERIFICATION, Polarity.NEGATIVE, "verify"),
        ("Let me think again.", Category.VERIFICATION, Polarity.NEGATIVE, "think again"),
        ("To recap: x = 2.", Category.VERIFICATION, Polarity.NEGATIVE, "recap"),
        ("Let me check the sum.", Category.VERIFICATION, Polarity.NEGATIVE, "check"),
        # case-insensitive substring counts
        ("WAIT. Something is off.", Category.REFLECTION, Polarity.NEGATIVE, "wait"),
        # the tie rule: one affirmation, one reflection -> negative (default to reflection)
        ("Yes, but wait.", Category.REFLECTION, Polarity.NEGATIVE, "wait"),
        ("Yes. Let me check.", Category.VERIFICATION, Polarity.NEGATIVE, "check"),
        # more affirmation than reflection + verification -> positive
        ("Yes, yes, wait.", Category.AFFIRMATION, Polarity.POSITIVE, "yes"),
        # reflection + verification together outweigh affirmation
        ("Yes. Wait, let me check.", Category.REFLECTION, Polarity.NEGATIVE, "wait"),
    ],
)
def test_probe_classification(text, category, polarity, keyword):
    found = policy.classify(text, CFG)
    assert (found.category, found.polarity, found.keyword) == (category, polarity, keyword)


@pytest.mark.parametrize(
    ("probe", "writer", "rule", "keyword", "tokens"),
    [
        ("The area is 12.", Writer.EDGE, Rule.NEUTRAL_PROBE, None, 0),
        ("Yes, so the area is 12.", Writer.CLOUD, Rule.AFFIRMATION, "yes", 20),
        ("Wait, the area", Writer.CLOUD, Rule.REFLECTION, "wait", 20),
        ("Let me check the area", Writer.CLOUD, Rule.VERIFICATION, "check", 20),
        ("Yes, but wait", Writer.CLOUD, Rule.REFLECTION, "wait", 20),
    ],
)
def test_decision_at_break_in_reasoning_mode(probe, writer, rule, keyword, tokens):
    decision = policy.decide_at_break(CFG, PolicyState.initial(CFG), probe)
    assert (decision.writer, decision.rule, decision.keyword, decision.tokens) == (
        writer,
        rule,
        keyword,
        tokens,
    )


def test_neutral_probe_keeps_small_model_text():
    decision = policy.decide_at_break(CFG, PolicyState.initial(CFG), "Then x = 3.")
    assert decision == Decision(Writer.EDGE, Rule.NEUTRAL_PROBE)
    assert decision.reason == "neutral_probe"


def test_takeover_carries_verification_continuation_knobs():
    decision = policy.decide_at_break(CFG, PolicyState.initial(CFG), "Wait,")
    assert decision.continue_if == ("verify", "think again", "recap", "check")
    assert decision.continue_tokens == 125
    assert decision.reason == "reflection:wait"


@pytest.mark.parametrize(
    ("written", "keyword"),
    [
        ("so x = 2. Let me verify: 2+2=4", "verify"),
        ("Let me CHECK this and recap", "check"),
        ("so x = 2 and we are done", None),
        ("", None),
    ],
)
def test_verification_continuation_keyword(written, keyword):
    assert policy.continuation_keyword(written, CFG.verification_keywords) == keyword


def test_reasoning_mode_starts_with_small_model():
    assert policy.decide_start(CFG) == Decision(Writer.EDGE, Rule.EDGE_DRAFT)


def test_non_reasoning_start_gives_large_model_first_100_tokens():
    decision = policy.decide_start(NON_REASONING)
    assert (decision.writer, decision.rule, decision.tokens) == (
        Writer.CLOUD,
        Rule.NON_REASONING_START,
        100,
    )


def test_non_reasoning_takes_over_after_every_break_without_probe():
    state = PolicyState.initial(NON_REASONING)
    assert not policy.needs_probe(NON_REASONING, state)
    decision = policy.decide_at_break(NON_REASONING, state, None)
    assert (decision.writer, decision.rule, decision.tokens) == (
        Writer.CLOUD,
        Rule.NON_REASONING_BREAK,
        20,
    )


def test_reasoning_mode_needs_a_probe():
    assert policy.needs_probe(CFG, PolicyState.initial(CFG))
    with pytest.raises(ValueError):
        policy.decide_at_break(CFG, PolicyState.initial(CFG), None)


def _negative_takeovers(config: PolicyConfig, state: PolicyState, n: int) -> PolicyState:
    decision = policy.decide_at_break(config, state, "Wait,")
    for _ in range(n):
        state = policy.after_takeover(config, state, decision, "Hmm, wait, maybe not.")
    return state


def test_counter_counts_only_negative_takeovers():
    state = PolicyState.initial(CFG)
    decision = policy.decide_at_break(CFG, state, "Wait,")
    state = policy.after_takeover(CFG, state, decision, "Yes, so x = 2.")
    state = policy.after_takeover(CFG, state, decision, "So x = 2.")
    assert (state.negativity, state.takeovers) == (0, 2)
    state = policy.after_takeover(CFG, state, decision, "Wait, no.")
    assert (state.negativity, state.takeovers) == (1, 3)


def test_counter_reaching_threshold_fires_recap_at_next_break():
    state = _negative_takeovers(CFG, PolicyState.initial(CFG), 14)
    assert policy.decide_at_break(CFG, state, "Wait,").rule is Rule.REFLECTION
    state = _negative_takeovers(CFG, state, 1)
    assert state.negativity == 15
    assert not policy.needs_probe(CFG, state)
    decision = policy.decide_at_break(CFG, state, None)
    assert decision.rule is Rule.EXCESSIVE_REFLECTION
    assert decision.preamble == "Let me check whether there are some wrong steps:"
    assert decision.tokens == 125


@pytest.mark.parametrize(
    ("recaps", "threshold", "recap_tokens"),
    [(0, 15, 125), (1, 20, 150), (2, 25, 175), (3, 30, 200), (4, 30, 200), (6, 30, 200)],
)
def test_escalation_schedule(recaps, threshold, recap_tokens):
    state = PolicyState.initial(CFG)
    for _ in range(recaps):
        state = _negative_takeovers(CFG, state, state.threshold)
        recap = policy.decide_at_break(CFG, state, None)
        state = policy.after_takeover(CFG, state, recap, "wait wait wait")
        assert state.negativity == 0
    assert (state.threshold, state.recap_tokens) == (threshold, recap_tokens)


def test_excessive_reflection_applies_in_non_reasoning_mode_too():
    state = _negative_takeovers(NON_REASONING, PolicyState.initial(NON_REASONING), 15)
    assert policy.decide_at_break(NON_REASONING, state, None).rule is Rule.EXCESSIVE_REFLECTION


@pytest.mark.parametrize(
    ("text", "is_break"),
    [
        ("x = 2.\n\n", True),
        ("x = 2.\n\n\n", True),
        ("Is it?\n\n", True),
        ("Step 1:\n\n", True),
        ("x = 2.\n", False),
        ("x = 2.\n\nWait", False),
        ("", False),
    ],
)
def test_paragraph_break_variants(text, is_break):
    assert policy.ends_paragraph(text) is is_break


def test_policy_file_overrides_knobs(tmp_path: Path):
    path = tmp_path / "policy.toml"
    path.write_text(
        '[policy]\nmode = "non-reasoning"\ntakeover_tokens = 30\nnegativity_threshold = 3\n'
        'reflection_keywords = ["Wait"]\n'
    )
    config = policy_config.load_policy_file(path)
    assert config.mode is Mode.NON_REASONING
    assert (config.takeover_tokens, config.negativity_threshold) == (30, 3)
    assert config.reflection_keywords == ("wait",)
    assert config.verify_tokens == 125  # untouched knobs keep the paper's default


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("takeover_tokens = ", "not valid TOML"),
        ("takover_tokens = 3", "unknown policy knob 'takover_tokens'"),
        ('takeover_tokens = "many"', "must be an integer"),
        ("takeover_tokens = 0", "must be >= 1"),
        ("negativity_threshold = -1", "must be an integer >= 0"),
        ('mode = "fast"', "'reasoning' or 'non-reasoning'"),
        ("reflection_keywords = [1]", "list of non-empty strings"),
        ("recap_tokens = 500", "recap_tokens_max must be >= recap_tokens"),
    ],
)
def test_malformed_policy_file_is_rejected_with_reason(tmp_path: Path, content, message):
    path = tmp_path / "policy.toml"
    path.write_text(content)
    with pytest.raises(PolicyConfigError, match=message):
        policy_config.load_policy_file(path)


def test_missing_policy_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(PolicyConfigError, match="cannot read policy file"):
        policy_config.load_policy_file(tmp_path / "nope.toml")


# ---- the uncertainty trigger (beyond the paper) ----------------------------------------

UNSURE = PolicyConfig(
    trigger=policy.Trigger.UNCERTAINTY, uncertainty_threshold=1.5, uncertainty_window=1
)
UNSURE_NR = PolicyConfig(
    mode=Mode.NON_REASONING,
    trigger=policy.Trigger.UNCERTAINTY,
    uncertainty_threshold=1.5,
    uncertainty_window=1,
)


@pytest.mark.parametrize(
    ("config", "probe", "entropies", "writer", "rule", "reason"),
    [
        # at or above the threshold: the large model writes n1, the reason names the value
        (UNSURE, "So x = 2.", [2.31, 0.1], Writer.CLOUD, Rule.UNCERTAINTY, "uncertainty:2.31"),
        (UNSURE, "So x = 2.", [1.5], Writer.CLOUD, Rule.UNCERTAINTY, "uncertainty:1.50"),
        # below it the probe is kept, whatever keywords it holds
        (
            UNSURE,
            "Wait, x = 2.",
            [0.42, 5.0],
            Writer.EDGE,
            Rule.CONFIDENT_PROBE,
            "confident_probe:0.42",
        ),
        # an empty probe (the small model ended) is certain
        (UNSURE, "", [], Writer.EDGE, Rule.CONFIDENT_PROBE, "confident_probe:0.00"),
        # non-reasoning mode: replaces "every break"
        (UNSURE_NR, "So x = 2.", [0.2], Writer.EDGE, Rule.CONFIDENT_PROBE, "confident_probe:0.20"),
        (UNSURE_NR, "So x = 2.", [3.0], Writer.CLOUD, Rule.UNCERTAINTY, "uncertainty:3.00"),
    ],
)
def test_uncertainty_trigger_decides_on_the_probe_entropy(
    config, probe, entropies, writer, rule, reason
):
    decision = policy.decide_at_break(config, PolicyState.initial(config), probe, entropies)
    assert (decision.writer, decision.rule, decision.reason) == (writer, rule, reason)
    if writer is Writer.CLOUD:
        assert decision.tokens == config.takeover_tokens
        assert decision.continue_tokens == config.verify_tokens  # continuation still applies


def test_uncertainty_window_averages_the_first_probe_tokens():
    config = PolicyConfig(trigger=policy.Trigger.UNCERTAINTY, uncertainty_window=3)
    assert policy.probe_uncertainty([1.0, 2.0, 3.0, 100.0], config) == pytest.approx(2.0)
    assert policy.probe_uncertainty([4.0], config) == pytest.approx(4.0)


def test_uncertainty_trigger_probes_in_both_modes_but_not_before_a_recap():
    assert policy.needs_probe(UNSURE_NR, PolicyState.initial(UNSURE_NR))
    assert policy.needs_uncertainty(UNSURE_NR) and not policy.needs_uncertainty(CFG)
    full = PolicyState(negativity=15, threshold=15)
    assert not policy.needs_probe(UNSURE, full)
    recap = policy.decide_at_break(UNSURE, full, None, None)
    assert recap.rule is Rule.EXCESSIVE_REFLECTION


def test_uncertainty_trigger_without_entropies_is_a_programming_error():
    with pytest.raises(ValueError, match="entropies"):
        policy.decide_at_break(UNSURE, PolicyState.initial(UNSURE), "x", None)


def test_non_reasoning_opening_can_be_switched_off():
    config = PolicyConfig(mode=Mode.NON_REASONING, start_tokens=0)
    assert policy.decide_start(config).writer is Writer.EDGE


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"trigger": "entropy"}, "'keywords' or 'uncertainty'"),
        ({"uncertainty_threshold": "high"}, "must be a number"),
        ({"uncertainty_threshold": -1}, ">= 0"),
        ({"uncertainty_window": 0}, ">= 1"),
    ],
)
def test_bad_uncertainty_knobs_are_refused_with_reason(knobs, message):
    with pytest.raises(PolicyConfigError, match=message):
        policy_config.config_from_mapping(knobs)


def test_uncertainty_knobs_from_strings():
    config = policy_config.config_from_mapping(
        {"trigger": "uncertainty", "uncertainty_threshold": "2.5", "uncertainty_window": 2}
    )
    assert (config.trigger, config.uncertainty_threshold, config.uncertainty_window) == (
        policy.Trigger.UNCERTAINTY,
        2.5,
        2,
    )


R1_TEMPLATE = "{% for m in messages %}...{% endfor %}<｜Assistant｜><think>\n"
R1_OLD_TEMPLATE = "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}"
CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}"


@pytest.mark.parametrize(
    ("template", "names", "mode", "why"),
    [
        (R1_TEMPLATE, ["x"], Mode.REASONING, "<think>"),
        (R1_OLD_TEMPLATE, [], Mode.REASONING, "<think>"),
        (CHATML, ["DeepSeek-R1-Distill-Qwen-1.5B"], Mode.REASONING, "reasoning family"),
        (None, ["QwQ-32B-Preview"], Mode.REASONING, "reasoning family"),
        (CHATML, ["SmolLM2-135M-Instruct", "smollm2"], Mode.NON_REASONING, "no <think>"),
        (None, ["gemma-3-270m"], Mode.NON_REASONING, "no <think>"),
        # a word that only contains a family name does not count
        (CHATML, ["Qwen2.5-Coder-0.5B-Instruct", "r1x-chat"], Mode.NON_REASONING, "no <think>"),
    ],
)
def test_auto_mode_follows_the_model(template, names, mode, why):
    chosen, reason = policy_config.infer_mode(template, names)
    assert chosen is mode
    assert why in reason


def test_policy_file_knobs_are_read_without_defaults(tmp_path: Path):
    path = tmp_path / "p.toml"
    path.write_text('[policy]\nmode = "non-reasoning"\n')
    assert policy_config.read_policy_file(path) == {"mode": "non-reasoning"}
