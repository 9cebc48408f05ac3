"""The uncertainty trigger in the session loop, on a scripted drafter that reports entropies."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field

from edge.drafter_api import DraftToken
from edge.session import SessionOptions, SpeculativeSession
from shared.policy import Mode, PolicyConfig, Trigger
from shared.wire import FINISH_STOP, Message, Sampling
from tests.fakes import ScriptedCloud


@dataclass
class EntropyDrafter:
    """Writes scripted (text, entropy) tokens; records whether entropy was asked for."""

    tokens: list[tuple[str, float]]
    asked: list[bool] = field(default_factory=list)

    def draft(
        self,
        messages: Sequence[Message],
        text: str,
        max_tokens: int,
        sampling: Sampling,
        *,
        uncertainty: bool = False,
    ) -> Generator[DraftToken, None, None]:
        self.asked.append(uncertainty)
        for _ in range(max_tokens):
            if not self.tokens:
                yield DraftToken("", finish=FINISH_STOP)
                return
            piece, entropy = self.tokens.pop(0)
            yield DraftToken(piece, entropy=entropy if uncertainty else None)


def run(config: PolicyConfig, tokens: list[tuple[str, float]], replies: list[list[str]]):
    drafter = EntropyDrafter(tokens)
    cloud = ScriptedCloud(replies)
    from edge.cloud_session import CloudSession

    loop = SpeculativeSession(
        drafter, CloudSession(cloud, "s"), SessionOptions(max_tokens=200, policy=config)
    )
    return loop.run([Message("user", "q")]), drafter, cloud


def test_unsure_break_hands_over_and_sure_break_keeps_the_probe():
    config = PolicyConfig(
        mode=Mode.NON_REASONING,
        trigger=Trigger.UNCERTAINTY,
        uncertainty_threshold=1.0,
        uncertainty_window=1,  # the first probe token decides
        start_tokens=0,
        takeover_tokens=2,
    )
    tokens = [
        ("First.", 0.1),
        ("\n\n", 0.1),  # edge draft to the first break
        ("Sure", 0.2),
        (" step.", 0.3),
        ("\n\n", 0.1),  # confident probe: kept
        ("Unsure", 2.5),
        (" step", 0.1),  # unsure probe: thrown away, the cloud writes
        (" edge", 0.1),
        (" end.", 0.1),
    ]
    answer, drafter, cloud = run(config, tokens, [[" Cloud", " text."]])
    reasons = [(s.source, s.reason) for s in answer.segments]
    assert reasons[:3] == [
        ("edge", "edge_draft"),
        ("edge", "confident_probe:0.20"),
        ("cloud", "uncertainty:2.50"),
    ]
    assert "Sure step." in answer.text and "Unsure" not in answer.text
    assert " Cloud text." in answer.text
    assert len(cloud.calls) == 1  # one round trip per takeover
    assert answer.stats.takeovers == 1
    assert answer.stats.cloud_tokens == 2
    # entropy is measured for probes only, never for ordinary drafting
    assert drafter.asked[0] is False and True in drafter.asked


def test_keyword_trigger_never_asks_the_drafter_for_entropy():
    config = PolicyConfig(mode=Mode.REASONING, takeover_tokens=2)
    tokens = [("A.", 0.1), ("\n\n", 0.1), ("So", 0.1), (" B.", 0.1)]
    _, drafter, _ = run(config, tokens, [])
    assert drafter.asked and not any(drafter.asked)
