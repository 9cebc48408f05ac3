"""The Speculative Thinking takeover policy: pure rules over text, no I/O, no models, no gRPC.
It imports the standard library only; reading and checking the knobs (a mapping, a TOML
policy file) and the mode that fits a model are shared/policy_config.py's.

At each paragraph break the session loop asks this module what happens next; the answer
is a `Decision` that says who writes, how much, and *why* (the rule and the keyword), so
logs, `--json` and tests can all tell why the large model took over. The rules are those
of the paper (Yang et al., "Speculative Thinking", COLM 2025, Sec. 3), with its defaults:

- A paragraph break is text ending in "\\n\\n" (tokens such as ".\\n\\n" or "?\\n\\n" end so too).
- Reasoning mode: at a break the small model drafts a short probe of the next paragraph.
  Keyword counts classify it. Neutral: the small model's probe is *kept* and it goes on.
  Affirmation or reflection/verification: the large model writes n1 tokens instead.
- Verification continuation: if what the large model wrote contains a verification
  keyword, it writes n2 more tokens in the same call (the cloud applies it, one round trip).
- Negativity counter: each takeover whose written text is negative counts; at the
  threshold, the next break gets the excessive-reflection takeover: the recap sentence,
  then n3 tokens by the large model. Then the counter resets, n3 grows, the threshold grows.
- Non-reasoning mode: the large model writes the first 100 tokens and takes over for n1
  tokens after every break; verification and excessive-reflection still apply.

Beyond the paper, `trigger = "uncertainty"` replaces the keyword rules (and "every break" in
non-reasoning mode): at each break the small model drafts its probe as usual and the loop
hands in the entropy of the small model's next-token distribution at each probe token. The
mean over the first `uncertainty_window` of them (by default the whole probe; 1 = the first
token after the break, as in GlimpRouter) at or above `uncertainty_threshold` nats hands the
pen over; below it the probe is kept. Verification continuation and the recap still apply.

`trigger = "cloud-judge"` asks the large model instead, in the call that would hand over
anyway: at each break the small model drafts its probe and the loop sends it with the
takeover call; the cloud, which holds the session's KV, prefills the new text and the probe
and scores the probe by its own likelihood (`judge_score`: the mean log-probability of the
probe's tokens, in the cloud's tokenizer); at or above `judge_threshold` it keeps the probe
(rule `cloud_accepts`), below it the probe is rolled back and it writes n1 tokens (rule
`cloud_judge`), all in one round trip. With `judge_min_uncertainty` > 0 only probes the
small model is unsure of (mean entropy at or above it) go to the judge; the others are kept
without a call. The cloud applies `judge_accepts`; the loop turns the score it returns into
the decision with `judged`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

PARAGRAPH_BREAK = "\n\n"
RECAP_TEXT = "Let me check whether there are some wrong steps:"

AFFIRMATION_KEYWORDS = ("yeah", "yes", "final answer", "confident")
REFLECTION_KEYWORDS = ("wait", "alternatively", "hold on", "another")
VERIFICATION_KEYWORDS = ("verify", "think again", "recap", "check")


class Mode(enum.StrEnum):
    REASONING = "reasoning"
    NON_REASONING = "non-reasoning"


class Trigger(enum.StrEnum):
    """What decides a takeover at a break."""

    KEYWORDS = "keywords"  # the paper's keyword rules (reasoning) or every break (non-reasoning)
    UNCERTAINTY = "uncertainty"  # the small model's own entropy over the probe
    CLOUD_JUDGE = "cloud-judge"  # the large model's likelihood of the probe, in the takeover call


class Category(enum.StrEnum):
    AFFIRMATION = "affirmation"
    REFLECTION = "reflection"
    VERIFICATION = "verification"
    NEUTRAL = "neutral"


class Polarity(enum.StrEnum):
    POSITIVE = "positive"
    NEGATIVE = "negative"
    NEUTRAL = "neutral"


class Writer(enum.StrEnum):
    EDGE = "edge"
    CLOUD = "cloud"


class Rule(enum.StrEnum):
    """Why a stretch of text was written by whom: the `reason` in --json starts with this."""

    EDGE_DRAFT = "edge_draft"  # the small model writes until the next break
    NEUTRAL_PROBE = "neutral_probe"  # the probe had no keyword: small model's text kept
    AFFIRMATION = "affirmation"  # probe was positive: large model writes n1
    REFLECTION = "reflection"  # probe was negative (reflection wins or tie): n1
    VERIFICATION = "verification"  # probe was negative, verification keywords dominate: n1
    EXCESSIVE_REFLECTION = "excessive_reflection"  # counter hit threshold: recap + n3
    NON_REASONING_START = "non_reasoning_start"  # large model writes the first tokens
    NON_REASONING_BREAK = "non_reasoning_break"  # large model writes n1 after every break
    CLOUD_ONLY = "cloud_only"  # the cloud-only baseline strategy: the large model writes all
    UNCERTAINTY = "uncertainty"  # the small model was unsure at the break: large model writes n1
    CONFIDENT_PROBE = "confident_probe"  # the small model was sure: its probe is kept
    CLOUD_JUDGE = "cloud_judge"  # the large model found the probe unlikely: it writes n1
    CLOUD_ACCEPTS = "cloud_accepts"  # the large model found the probe likely: it is kept


class PolicyConfigError(ValueError):
    """A policy file or knob is malformed; the message names the key and the problem."""


@dataclass(frozen=True)
class PolicyConfig:
    """Every knob of the method, with the paper's defaults."""

    mode: Mode = Mode.REASONING
    trigger: Trigger = Trigger.KEYWORDS
    # Mean entropy over the whole 20-token probe at 0.27 nats: half the breaks of
    # Qwen2.5-Coder-0.5B on the calibration problems (docs/results/uncertainty-calibration.json,
    # scripts/calibrate_uncertainty.py), and the most accurate speculative row of the README's
    # MATH-500 table (row probe-0.27; the first token alone at the same rate: unc-0.56).
    uncertainty_threshold: float = 0.27  # nats
    uncertainty_window: int = 20  # probe tokens whose entropy is averaged (1 = first token)
    # cloud-judge: the probe is kept when the large model's mean log-probability of its
    # tokens is at or above this (nats per token, <= 0). -0.33: 35 % of the breaks of
    # Qwen2.5-Coder-0.5B under Qwen2.5-Coder-1.5B on the calibration problems
    # (docs/results/judge-calibration.json, scripts/calibrate_judge.py); row judge-0.33
    judge_threshold: float = -0.33
    # cloud-judge: probes whose mean entropy (the small model's) is below this are kept
    # without asking the cloud (0: every probe is judged)
    judge_min_uncertainty: float = 0.0
    probe_tokens: int = 20  # look-ahead drafted by the small model at a break
    takeover_tokens: int = 20  # n1
    verify_tokens: int = 125  # n2
    recap_tokens: int = 125  # n3 at first
    recap_tokens_step: int = 25
    recap_tokens_max: int = 200
    negativity_threshold: int = 15  # c
    threshold_step: int = 5
    threshold_max: int = 30
    start_tokens: int = 100  # non-reasoning mode: the large model's opening
    recap_text: str = RECAP_TEXT
    affirmation_keywords: tuple[str, ...] = AFFIRMATION_KEYWORDS
    reflection_keywords: tuple[str, ...] = REFLECTION_KEYWORDS
    verification_keywords: tuple[str, ...] = VERIFICATION_KEYWORDS

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or value < 0):
                raise PolicyConfigError(f"policy knob {f.name!r} must be an integer >= 0")
        for name in ("uncertainty_threshold", "judge_min_uncertainty"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not (0 <= value < math.inf):
                raise PolicyConfigError(f"policy knob {name!r} must be a number >= 0")
        if not isinstance(self.judge_threshold, int | float) or not (
            -math.inf < self.judge_threshold <= 0
        ):
            raise PolicyConfigError(
                "policy knob 'judge_threshold' must be a number <= 0 (a mean log-probability)"
            )
        for name in (
            "probe_tokens",
            "takeover_tokens",
            "negativity_threshold",
            "uncertainty_window",
        ):
            if getattr(self, name) < 1:
                raise PolicyConfigError(f"policy knob {name!r} must be >= 1")
        if self.recap_tokens_max < self.recap_tokens:
            raise PolicyConfigError("recap_tokens_max must be >= recap_tokens")
        if self.threshold_max < self.negativity_threshold:
            raise PolicyConfigError("threshold_max must be >= negativity_threshold")


@dataclass(frozen=True)
class Classification:
    """Keyword counts of a stretch of text, and what they add up to."""

    category: Category
    polarity: Polarity
    keyword: str | None  # the first keyword found of the winning category
    affirmation: int = 0
    reflection: int = 0
    verification: int = 0


@dataclass(frozen=True)
class Decision:
    """Who writes next, how many tokens, and why."""

    writer: Writer
    rule: Rule
    keyword: str | None = None
    tokens: int = 0  # large-model tokens to write (0 when the edge writes)
    preamble: str = ""  # text inserted before the large model writes (the recap)
    continue_if: tuple[str, ...] = ()  # verification continuation keywords ...
    continue_tokens: int = 0  # ... and how many more tokens then
    uncertainty: float | None = None  # the measured probe uncertainty (uncertainty trigger)
    judge_threshold: float | None = None  # cloud-judge: the cloud keeps the probe at or above
    judge_score: float | None = None  # cloud-judge: the cloud's score of the probe, once known

    @property
    def asks_judge(self) -> bool:
        """The cloud decides in the call: it keeps the probe, or writes `tokens`."""
        return self.judge_threshold is not None and self.judge_score is None

    @property
    def reason(self) -> str:
        if self.judge_score is not None:
            return f"{self.rule}:{self.judge_score:.2f}"
        if self.uncertainty is not None:
            return f"{self.rule}:{self.uncertainty:.2f}"
        return f"{self.rule}:{self.keyword}" if self.keyword else str(self.rule)


@dataclass(frozen=True)
class PolicyState:
    """What the policy remembers between breaks (the escalation schedule)."""

    negativity: int = 0
    threshold: int = 15
    recap_tokens: int = 125
    takeovers: int = 0

    @classmethod
    def initial(cls, config: PolicyConfig) -> PolicyState:
        return cls(threshold=config.negativity_threshold, recap_tokens=config.recap_tokens)


# ---- text ----------------------------------------------------------------------------


def ends_paragraph(text: str) -> bool:
    """True when `text` ends at a paragraph break ("\\n\\n", however the tokens split it)."""
    return text.endswith(PARAGRAPH_BREAK)


def _count(text: str, keywords: tuple[str, ...]) -> tuple[int, str | None]:
    """Lower-cased substring counts, and the keyword that appears first in the text."""
    lowered = text.lower()
    total, first, first_at = 0, None, math.inf
    for keyword in keywords:
        hits = lowered.count(keyword)
        total += hits
        at = lowered.find(keyword)
        if hits and at < first_at:
            first, first_at = keyword, at
    return total, first


def classify(text: str, config: PolicyConfig) -> Classification:
    """The paper's scoring: affirmation count against reflection + verification count.

    More affirmation: positive. More reflection/verification: negative. A tie with any
    hit: negative ("default to reflection"). No hit: neutral.
    """
    aff, aff_kw = _count(text, config.affirmation_keywords)
    ref, ref_kw = _count(text, config.reflection_keywords)
    ver, ver_kw = _count(text, config.verification_keywords)
    counts = {"affirmation": aff, "reflection": ref, "verification": ver}
    if aff == ref == ver == 0:
        return Classification(Category.NEUTRAL, Polarity.NEUTRAL, None, **counts)
    if aff > ref + ver:
        return Classification(Category.AFFIRMATION, Polarity.POSITIVE, aff_kw, **counts)
    if ver > ref:
        return Classification(Category.VERIFICATION, Polarity.NEGATIVE, ver_kw, **counts)
    # reflection dominates, or a tie: default to reflection
    keyword = ref_kw or ver_kw or aff_kw
    return Classification(Category.REFLECTION, Polarity.NEGATIVE, keyword, **counts)


# ---- decisions -----------------------------------------------------------------------


def _cloud(config: PolicyConfig, rule: Rule, keyword: str | None, tokens: int) -> Decision:
    return Decision(
        writer=Writer.CLOUD,
        rule=rule,
        keyword=keyword,
        tokens=tokens,
        continue_if=config.verification_keywords,
        continue_tokens=config.verify_tokens,
    )


def decide_start(config: PolicyConfig) -> Decision:
    """Who writes the answer's opening."""
    if config.mode is Mode.NON_REASONING and config.start_tokens > 0:
        # Without this opening, accuracy drops sharply (paper ablation: 81.8 -> 74.2).
        return _cloud(config, Rule.NON_REASONING_START, None, config.start_tokens)
    return Decision(Writer.EDGE, Rule.EDGE_DRAFT)


def needs_probe(config: PolicyConfig, state: PolicyState) -> bool:
    """Whether the loop must draft a probe before `decide_at_break` can decide."""
    if state.negativity >= state.threshold:
        return False  # the recap comes next, whatever the probe says
    return config.trigger is not Trigger.KEYWORDS or config.mode is Mode.REASONING


def needs_uncertainty(config: PolicyConfig) -> bool:
    """Whether the loop must measure the small model's entropy over the probe."""
    if config.trigger is Trigger.CLOUD_JUDGE:
        return config.judge_min_uncertainty > 0
    return config.trigger is Trigger.UNCERTAINTY


def probe_uncertainty(entropies: Sequence[float], config: PolicyConfig) -> float:
    """The probe's uncertainty: mean entropy (nats) of its first `uncertainty_window` tokens.

    An empty probe (the small model ended at the break) is certain: 0."""
    window = list(entropies[: config.uncertainty_window])
    return sum(window) / len(window) if window else 0.0


def decide_at_break(
    config: PolicyConfig,
    state: PolicyState,
    probe: str | None,
    entropies: Sequence[float] | None = None,
) -> Decision:
    """At a paragraph break: keep the small model's probe, or hand the pen over.

    `entropies`: the small model's next-token entropy at each probe token (uncertainty
    trigger, and cloud-judge with `judge_min_uncertainty`). With cloud-judge the decision
    `asks_judge`: the cloud keeps the probe or writes, and `judged` says which."""
    if state.negativity >= state.threshold:
        recap = _cloud(config, Rule.EXCESSIVE_REFLECTION, None, state.recap_tokens)
        return replace(recap, preamble=config.recap_text)
    if config.trigger is Trigger.CLOUD_JUDGE:
        measured: float | None = None
        if config.judge_min_uncertainty > 0:
            if entropies is None:
                raise ValueError("judge_min_uncertainty needs the probe's entropies")
            measured = probe_uncertainty(entropies, config)
            if measured < config.judge_min_uncertainty:
                return Decision(Writer.EDGE, Rule.CONFIDENT_PROBE, uncertainty=measured)
        if not probe:  # the small model ended at the break: nothing to judge
            return Decision(Writer.EDGE, Rule.CONFIDENT_PROBE, uncertainty=0.0)
        ask = _cloud(config, Rule.CLOUD_JUDGE, None, config.takeover_tokens)
        return replace(ask, judge_threshold=config.judge_threshold, uncertainty=measured)
    if config.trigger is Trigger.UNCERTAINTY:
        if entropies is None:
            raise ValueError("the uncertainty trigger needs the probe's entropies")
        measured = probe_uncertainty(entropies, config)
        if measured >= config.uncertainty_threshold:
            unsure = _cloud(config, Rule.UNCERTAINTY, None, config.takeover_tokens)
            return replace(unsure, uncertainty=measured)
        return Decision(Writer.EDGE, Rule.CONFIDENT_PROBE, uncertainty=measured)
    if config.mode is Mode.NON_REASONING:
        return _cloud(config, Rule.NON_REASONING_BREAK, None, config.takeover_tokens)
    if probe is None:
        raise ValueError("reasoning mode needs the probe to decide (see needs_probe)")
    found = classify(probe, config)
    if found.polarity is Polarity.NEUTRAL:
        # Keep the probe: cheaper than the reference code's resample, same distribution.
        return Decision(Writer.EDGE, Rule.NEUTRAL_PROBE)
    rule = {
        Category.AFFIRMATION: Rule.AFFIRMATION,
        Category.REFLECTION: Rule.REFLECTION,
        Category.VERIFICATION: Rule.VERIFICATION,
    }[found.category]
    return _cloud(config, rule, found.keyword, config.takeover_tokens)


def judge_score(logprobs: Sequence[float]) -> float:
    """The large model's score of a probe: the mean log-probability (nats) of its tokens
    after the text before it. Per token, so that probes of any length compare; an empty
    probe surprises nobody: 0."""
    return sum(logprobs) / len(logprobs) if logprobs else 0.0


def judge_accepts(score: float, threshold: float) -> bool:
    """Whether the cloud keeps a probe it scored `score` (the one rule both sides apply)."""
    return score >= threshold


def judged(decision: Decision, score: float) -> Decision:
    """A decision that `asks_judge`, once the cloud has scored the probe: kept (the small
    model's probe stays, rule `cloud_accepts`) or not (the cloud writes, rule
    `cloud_judge`); the reason carries the score either way."""
    if decision.judge_threshold is None:
        raise ValueError("only a decision that asks the judge can be judged")
    if judge_accepts(score, decision.judge_threshold):
        return Decision(
            Writer.EDGE,
            Rule.CLOUD_ACCEPTS,
            uncertainty=decision.uncertainty,
            judge_threshold=decision.judge_threshold,
            judge_score=score,
        )
    return replace(decision, judge_score=score)


def after_takeover(
    config: PolicyConfig, state: PolicyState, decision: Decision, written: str
) -> PolicyState:
    """Update the counter and the escalation schedule after the large model wrote `written`."""
    if decision.writer is not Writer.CLOUD:
        return state
    takeovers = state.takeovers + 1
    if decision.rule is Rule.EXCESSIVE_REFLECTION:
        return PolicyState(
            negativity=0,
            threshold=min(state.threshold + config.threshold_step, config.threshold_max),
            recap_tokens=min(
                state.recap_tokens + config.recap_tokens_step, config.recap_tokens_max
            ),
            takeovers=takeovers,
        )
    negative = classify(written, config).polarity is Polarity.NEGATIVE
    return replace(state, negativity=state.negativity + int(negative), takeovers=takeovers)


def continuation_keyword(written: str, keywords: tuple[str, ...] | list[str]) -> str | None:
    """The verification keyword that triggers the continuation in `written`, if any."""
    lowered = written.lower()
    hits = [(lowered.find(k.lower()), k) for k in keywords if k and k.lower() in lowered]
    return min(hits)[1] if hits else None
