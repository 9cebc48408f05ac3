"""Continuous batching on real SmolLM2-135M (CPU): several sessions decoded together by the
engine loop, each as if it ran alone; and the end of a takeover loses nothing.

Greedy texts of one runtime are compared with each other (batched vs alone, the same
weights and ids); timing is never asserted: the loop's step counters say what ran.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from cloud.decoding import EXTRA_TOKENS, is_word_char
from cloud.engine import TransformersEngine
from cloud.engine_api import Generated, GenerateRequest
from cloud.engine_thread import EngineThread
from shared.wire import FINISH_LENGTH, Message, Sampling, TextChunk
from tests.integration.engine_calls import generate

pytestmark = pytest.mark.real_models

GREEDY = Sampling(temperature=0.0)
SEA = [Message("system", "You are terse."), Message("user", "Tell me about the sea.")]


@pytest.fixture()
def engine(smol_either: TransformersEngine) -> TransformersEngine:
    return smol_either


@pytest.fixture()
def loop(engine: TransformersEngine) -> Iterator[EngineThread]:
    loop = EngineThread(engine, max_running=8)
    yield loop
    loop.close()


def sid(name: str) -> str:
    return f"{name}-{time.monotonic_ns()}"


def call(
    target: TransformersEngine | EngineThread,
    session: str,
    text: str,
    n: int,
    msgs: list[Message] = SEA,
) -> tuple[list[TextChunk], Generated]:
    events = list(generate(target, session, msgs, text, n))
    done = events[-1]
    assert isinstance(done, Generated)
    return [e for e in events[:-1] if isinstance(e, TextChunk)], done


def together(loop: EngineThread, calls: dict[str, str], n: int) -> dict[str, Generated]:
    """Each (session -> text) from its own thread at the same time, like gRPC workers."""
    out: dict[str, Generated] = {}
    errors: list[BaseException] = []

    def one(session: str, text: str) -> None:
        try:
            out[session] = call(loop, session, text, n)[1]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=item) for item in calls.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    return out


def test_sessions_decoded_together_write_what_each_writes_alone(engine, loop):
    texts = {
        sid("short"): "Waves",
        sid("mid"): "The sea is deep and",
        sid("long"): "Fish swim in the deep blue water of the ocean, far from the shore, where",
    }
    alone = {s: call(engine, sid("alone"), t, 10)[1].text for s, t in texts.items()}
    steps_before = sum(loop.batch_sizes.values())
    batched = together(loop, texts, 10)
    assert {s: d.text for s, d in batched.items()} == alone
    assert max(loop.batch_sizes) >= 2  # they shared decode steps
    assert sum(loop.batch_sizes.values()) - steps_before < 3 * 10


def test_prompts_prefilled_in_one_forward_continue_as_each_does_alone(engine):
    warm = {sid("w1"): "The sea is", sid("w2"): "Fish swim in the deep blue water of the ocean"}
    for s, t in warm.items():
        call(engine, s, t, 1)  # these sessions hold their text; the third is cold
    texts = {  # the longest prompt first: it sets the chunk length of the step
        sid("cold"): "Boats",
        **{s: t + " deep and wide, and" for s, t in warm.items()},
    }
    alone = {s: call(engine, sid("alone"), t, 8)[1] for s, t in texts.items()}
    runs = [
        engine.plan_generate(GenerateRequest(s, tuple(SEA), t, 8, GREEDY), lambda: False)
        for s, t in texts.items()
    ]
    for r in runs:
        engine.start(r)
    engine.prefill_step(runs, sharing=False)  # all three prompts' new tokens: one forward
    assert not any(r.prefilling for r in runs)
    while not all(r.done for r in runs):
        engine.decode_step([r for r in runs if not r.done])
    engine.finish(runs)
    for r in runs:
        done = r.outcome()
        assert done.text == alone[r.session].text
        assert done.usage.prefilled_tokens < done.usage.prompt_tokens or r.session not in warm
        engine.drop(r.session)


def test_each_session_prefills_only_its_new_text_while_others_run(engine, loop):
    texts = {sid("a"): "The sea", sid("b"): "Waves crash on", sid("c"): "A ship sails"}
    held: dict[str, int] = {}  # tokens each session's cache holds after its last call
    for round_ in range(3):
        done = together(loop, texts, 6)
        for s, d in done.items():
            u = d.usage
            if round_:  # only the text it has not seen is prefilled (+1-2 at the seam)
                assert u.cached_tokens >= held[s] - 2, (u, held[s])
                assert u.prefilled_tokens <= u.prompt_tokens - held[s] + 2, (u, held[s])
            held[s] = u.prompt_tokens + u.generated_tokens - 1
            texts[s] += d.text + " And then"
    assert max(loop.batch_sizes) >= 2


def test_end_session_while_its_call_runs_leaves_no_cache_behind(engine, loop):
    session = sid("ended")
    stream = generate(loop, session, SEA, "The sea is", 200)
    next(stream)  # running: its cache is checked out (a row of the batch)
    assert session in engine.caches.running()
    assert loop.drop(session) is True  # EndSession, or the text store's TTL eviction
    stream.close()  # the caller goes away; the call leaves at the next step
    assert session not in engine.caches.idle()
    assert session not in engine.caches.running()


def chain(engine: TransformersEngine, msgs: list[Message], text: str, calls: int, n: int):
    """`calls` takeovers of n tokens, each continuing the text the previous one wrote."""
    session = sid("chain")
    results = []
    for _ in range(calls):
        chunks, done = call(engine, session, text, n, msgs)
        results.append((chunks, done))
        text += done.text
    engine.drop(session)
    return results


@pytest.mark.parametrize(
    ("msgs", "text"),
    [
        ([Message("user", "Write a list of animal emoji.")], "1. 🐶 dog\n2. 🐱 cat\n3."),
        ([Message("user", "用中文写一句关于大海的话。")], "大海是"),
        ([Message("user", "Translate to Japanese: The sea is beautiful.")], "海は"),
    ],
    ids=["emoji", "chinese", "japanese"],
)
def test_three_token_takeovers_lose_no_character(engine, msgs, text):
    results = chain(engine, msgs, text, calls=8, n=3)
    extended = 0
    for chunks, done in results:
        assert "\ufffd" not in done.text
        assert "".join(c.text for c in chunks) == done.text
        if done.finish_reason == FINISH_LENGTH:
            # every token counted was written: none is held back as half a character
            assert sum(c.tokens for c in chunks) == done.usage.generated_tokens
            assert done.usage.generated_tokens <= 3 + EXTRA_TOKENS
            extended += done.usage.generated_tokens > 3
    assert extended, "no takeover ended inside a character: the case was not exercised"


def test_a_takeover_cut_inside_a_word_finishes_the_word(engine):
    results = chain(engine, SEA, "The sea is", calls=10, n=3)
    for (_, done), (next_chunks, _) in itertools.pairwise(results):
        within = done.usage.generated_tokens < 3 + EXTRA_TOKENS
        if done.finish_reason == FINISH_LENGTH and within and done.text and next_chunks:
            # the model's own next token did not go on with the last word
            ends_in_word = is_word_char(done.text[-1])
            assert not (ends_in_word and is_word_char(next_chunks[0].text[0])), (
                done.text,
                next_chunks[0].text,
            )
