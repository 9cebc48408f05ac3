"""The cloud engine's session KV cache against cold prefill, on real SmolLM2-135M (CPU).

Every check compares a GREEDY continuation from a cached session with the one from a
fresh session of the same engine: same runtime, same ids, so the texts must be equal.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from cloud.decoding import EXTRA_TOKENS  # noqa: E402
from cloud.engine import TransformersEngine  # noqa: E402
from cloud.engine.kv import cache_bytes  # noqa: E402
from cloud.engine_api import EngineCancelled, EngineContextFull, Generated  # noqa: E402
from shared.wire import (  # noqa: E402
    FINISH_CONTEXT_FULL,
    FINISH_LENGTH,
    FINISH_STOP,
    FINISH_STOP_STRING,
    Message,
    Sampling,
    TextChunk,
)
from tests.integration.engine_calls import generate, like, prefill  # noqa: E402

pytestmark = pytest.mark.real_models

GREEDY = Sampling(temperature=0.0)
MSGS = [Message("system", "You are terse."), Message("user", "Tell me about the sea.")]
N = 8  # tokens per compared continuation


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def gguf(smollm2: Path) -> Path:
    return smollm2


@pytest.fixture()
def engine(smol_either: TransformersEngine) -> TransformersEngine:
    return smol_either


@pytest.fixture()
def rows(smol_engine: TransformersEngine) -> TransformersEngine:
    """The row engine alone: for what only it has (byte budgets of growing caches; the
    paged one keeps slots, tested in test_engine_paged.py), or what both paths share and
    need not run twice (loading)."""
    return smol_engine


@pytest.fixture()
def fresh_id(engine: TransformersEngine) -> Iterator[Callable[[], str]]:
    """Makes session ids unique to the test; its sessions are dropped afterwards."""
    made: list[str] = []

    def make() -> str:
        made.append(f"s{time.monotonic_ns()}-{len(made)}")
        return made[-1]

    yield make
    for sid in made:
        engine.drop(sid)


def run(
    engine: TransformersEngine,
    session: str,
    text: str,
    n: int = N,
    stop: tuple[str, ...] = (),
    should_stop=lambda: False,
    msgs: list[Message] = MSGS,
) -> tuple[list[TextChunk], Generated]:
    events = list(generate(engine, session, msgs, text, n, GREEDY, stop, should_stop))
    done = events[-1]
    assert isinstance(done, Generated)
    chunks = [e for e in events[:-1] if isinstance(e, TextChunk)]
    assert len(chunks) == len(events) - 1
    u = done.usage
    assert u.cached_tokens + u.prefilled_tokens == u.prompt_tokens
    return chunks, done


def cold(engine: TransformersEngine, text: str, n: int = N) -> Generated:
    sid = f"cold-{time.monotonic_ns()}"
    try:
        _, done = run(engine, sid, text, n)
        assert done.usage.cached_tokens == 0
        return done
    finally:
        engine.drop(sid)


def session_bytes(engine: TransformersEngine) -> int:
    return sum(cache_bytes(s.cache) for s in engine.caches.idle().values())


# ---- correctness against cold prefill --------------------------------------------------


def test_plain_appends_reuse_the_cache_and_match_cold_prefill(engine, fresh_id):
    sid = fresh_id()
    text = "The sea is"
    _, done = run(engine, sid, text)
    assert done.usage.cached_tokens == 0
    for piece in [" deep and", " blue, and", " full of fish", " that swim."]:
        before = engine.count_tokens(MSGS, text)
        text += piece
        new = engine.count_tokens(MSGS, text) - before
        _, warm = run(engine, sid, text)
        # only ~the appended tokens are computed
        assert warm.usage.prefilled_tokens <= new + 2, (warm.usage, new)
        assert warm.usage.cached_tokens >= before - 2
        assert warm.text == cold(engine, text).text


def test_continuing_with_its_own_output_prefills_about_one_token(engine, fresh_id):
    sid = fresh_id()
    text = "Waves"
    _, first = run(engine, sid, text)
    text += first.text
    _, second = run(engine, sid, text)
    assert second.usage.prefilled_tokens <= 2, second.usage
    assert second.text == cold(engine, text).text


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("The word is hel", "The word is hello world"),  # "hel" + "lo" merge into new tokens
        ("The sea is ", "The sea is blue"),  # trailing space joins the next word
        ("Numbers: 12", "Numbers: 1234"),
    ],
)
def test_append_that_retokenizes_across_the_boundary(engine, fresh_id, before, after):
    sid = fresh_id()
    run(engine, sid, before)
    _, warm = run(engine, sid, after)
    assert warm.usage.cached_tokens > 0
    assert warm.text == cold(engine, after).text


def test_shrinking_text_crops_the_cache(engine, fresh_id):
    sid = fresh_id()
    long = "The sea is deep and blue and full of fish that swim all day long."
    run(engine, sid, long)
    short = "The sea is deep and"
    _, warm = run(engine, sid, short)
    assert warm.usage.prefilled_tokens <= 2
    assert warm.text == cold(engine, short).text


def test_edited_middle_recomputes_from_the_edit(engine, fresh_id):
    sid = fresh_id()
    run(engine, sid, "The sea is deep and blue and full of fish.")
    edited = "The sea is shallow and blue and full of fish."
    _, warm = run(engine, sid, edited)
    assert 0 < warm.usage.cached_tokens < warm.usage.prompt_tokens
    assert warm.text == cold(engine, edited).text


def test_identical_text_twice_recomputes_only_the_last_token(engine, fresh_id):
    sid = fresh_id()
    _, first = run(engine, sid, "The sea")
    _, again = run(engine, sid, "The sea")
    assert again.usage.prefilled_tokens == 1
    assert again.text == first.text


def test_cold_cache_counts_a_miss_then_a_hit(engine, fresh_id):
    sid = fresh_id()
    s0 = engine.cache_stats()
    _, done = run(engine, sid, "Fish")
    assert done.usage.cached_tokens == 0
    s1 = engine.cache_stats()
    assert s1.misses == s0.misses + 1
    run(engine, sid, "Fish swim")
    assert engine.cache_stats().hits == s1.hits + 1


def test_prefill_then_generate_reuses_everything_but_the_last_token(engine, fresh_id):
    sid = fresh_id()
    text = "The sea is deep and"
    p = prefill(engine, sid, MSGS, text)
    assert p.usage.cached_tokens == 0
    assert p.usage.prefilled_tokens == p.usage.prompt_tokens
    assert prefill(engine, sid, MSGS, text).usage.prefilled_tokens == 0
    _, done = run(engine, sid, text)
    assert done.usage.prefilled_tokens == 1
    assert done.text == cold(engine, text).text


def test_chunked_prefill_matches_one_shot(gguf, engine, fresh_id):
    chunked = like(
        engine,
        prefill_chunk=5,
    )
    text = "The sea is deep and blue and full of fish that swim."
    _, done = run(chunked, "c", text)
    assert done.text == cold(engine, text).text


# ---- eviction ---------------------------------------------------------------------------


def test_memory_budget_counts_bytes_and_evicts_lru(rows, gguf):
    engine = rows
    small = like(
        engine,
        TransformersEngine,
        max_cache_bytes=1,  # replaced below once one session's size is known
    )
    small.max_cache_bytes = 1 << 40
    run(small, "a", "The sea is deep")
    one = small.cache_stats().bytes
    assert one > 0
    assert one == session_bytes(small)
    # room for about two such sessions
    small.max_cache_bytes = int(one * 2.5)
    run(small, "b", "The sea is deep")
    run(small, "c", "The sea is deep")
    stats = small.cache_stats()
    assert stats.bytes == session_bytes(small) <= small.max_cache_bytes
    assert stats.evictions == 1
    assert set(small.caches.idle()) == {"b", "c"}  # "a" was least recently used
    # the evicted session only costs a re-prefill
    _, again = run(small, "a", "The sea is deep and")
    assert again.usage.cached_tokens == 0
    assert again.text == cold(engine, "The sea is deep and").text


def test_a_budget_smaller_than_one_session_keeps_nothing(rows):
    engine = rows
    tiny = like(
        engine,
        TransformersEngine,
        max_cache_bytes=1000,
    )
    _, first = run(tiny, "a", "The sea")
    assert tiny.cache_stats().sessions == 0
    assert tiny.cache_stats().bytes == 0
    assert tiny.cache_stats().evictions == 1
    _, again = run(tiny, "a", "The sea")
    assert again.usage.cached_tokens == 0
    assert again.text == first.text


def test_idle_sessions_expire_after_the_ttl(engine):
    clock = FakeClock()
    ttl = like(
        engine,
        session_ttl_s=60,
        clock=clock,
    )
    run(ttl, "a", "The sea is")
    clock.now += 30
    _, warm = run(ttl, "a", "The sea is deep")
    assert warm.usage.cached_tokens > 0
    clock.now += 61
    _, expired = run(ttl, "a", "The sea is deep and")
    assert expired.usage.cached_tokens == 0
    assert ttl.cache_stats().evictions == 1
    assert expired.text == cold(engine, "The sea is deep and").text


# ---- cancellation, finish reasons, streaming ---------------------------------------------


def test_cancel_during_decode_leaves_a_usable_cache(engine, fresh_id):
    sid = fresh_id()
    text = "The sea is deep and blue"
    run(engine, sid, "The sea is")
    calls = 0

    def stop_after_three() -> bool:
        nonlocal calls
        calls += 1
        return calls > 4  # 1 prefill chunk + 3 decode steps, then stop

    with pytest.raises(EngineCancelled):
        run(engine, sid, text, n=20, should_stop=stop_after_three)
    held = engine.caches.idle()[sid]
    if engine.kind == "rows":
        assert all(_layer_len(layer) == len(held.ids) for layer in held.cache.layers)
    _, after = run(engine, sid, text)
    assert after.usage.cached_tokens > 0
    assert after.text == cold(engine, text).text


def test_cancel_during_prefill(engine):
    chunked = like(
        engine,
        prefill_chunk=4,
        context_length=2047,
    )
    text = "The sea is deep and blue and full of fish"
    checks = 0

    def stop_after_two_chunks() -> bool:
        nonlocal checks
        checks += 1
        return checks > 3  # the engine loop asks once a step: two 4-token chunks, then stop

    with pytest.raises(EngineCancelled):
        run(chunked, "a", text, should_stop=stop_after_two_chunks)
    kept = len(chunked.caches.idle()["a"].ids)
    assert 0 < kept < chunked.count_tokens(MSGS, text)  # cut mid-prompt: what was computed stays
    _, after = run(chunked, "a", text)
    assert after.usage.cached_tokens == kept
    assert after.text == cold(engine, text).text


def test_abandoned_stream_leaves_a_usable_cache(engine, fresh_id):
    sid = fresh_id()
    text = "The sea is deep"
    stream = generate(engine, sid, MSGS, text, 20)
    next(stream)
    next(stream)
    stream.close()
    _, after = run(engine, sid, text)
    assert after.usage.cached_tokens > 0
    assert after.text == cold(engine, text).text


def _layer_len(layer) -> int:
    return 0 if layer.keys is None or layer.keys.numel() == 0 else layer.keys.shape[-2]


def test_finish_reasons(engine, fresh_id):
    text = "The sea is"
    _, ref = run(engine, fresh_id(), text, n=12)
    assert ref.finish_reason == FINISH_LENGTH
    # 12, or a few more to finish a word cut at the budget (cloud.decoding)
    assert 12 <= ref.usage.generated_tokens <= 12 + EXTRA_TOKENS
    # a stop string inside the greedy text: included, and nothing after it
    words = ref.text.split()
    stop = words[2]
    _, cut = run(engine, fresh_id(), text, n=12, stop=("@@never", stop))
    assert cut.finish_reason == FINISH_STOP_STRING
    assert cut.text == ref.text[: ref.text.index(stop) + len(stop)]
    assert cut.text.endswith(stop)


def test_end_of_sequence_finishes_with_stop(engine, fresh_id):
    msgs = [Message("user", "What is 2+2?")]
    chunks, done = run(engine, fresh_id(), "2+2 = 4.", n=15, msgs=msgs)
    assert done.finish_reason == FINISH_STOP
    assert done.usage.generated_tokens == 1  # the EOS token, which writes no text
    assert chunks == []
    assert done.text == ""


def test_context_window(engine, fresh_id):
    small = like(
        engine,
        context_length=engine.count_tokens(MSGS, "The sea is") + 3,
    )
    _, done = run(small, "a", "The sea is", n=20)
    assert done.finish_reason == FINISH_CONTEXT_FULL
    assert done.usage.generated_tokens == 3
    with pytest.raises(EngineContextFull):
        generate(small, "a", MSGS, "The sea is deep and blue and wide", 5)


def test_stream_concatenation_is_the_generated_text(engine, fresh_id):
    msgs = [Message("user", "Écris une phrase en français avec des accents, et un emoji.")]
    text = "Voilà : « "
    sid = fresh_id()
    chunks, done = run(engine, sid, text, n=30, msgs=msgs)
    assert "".join(c.text for c in chunks) == done.text
    assert "\ufffd" not in done.text
    # every counted token's text was written: none is held back at the end
    assert sum(c.tokens for c in chunks) == done.usage.generated_tokens
    # It is the text a whole decode of the written tokens gives after the prompt. The
    # session holds the KV of every written token, or of all but the last one.
    prompt = engine.tokenize(msgs, text)
    ids = engine.caches.idle()[sid].ids
    assert ids[: len(prompt)] == prompt
    written = ids[len(prompt) :]
    assert len(written) >= done.usage.generated_tokens - 1
    tail = prompt[-6:]
    decode = engine.tokenizer.decode
    whole = decode(tail + written)[len(decode(tail)) :]
    assert done.text.startswith(whole.rstrip("\ufffd"))


def test_seeded_sampling_is_reproducible(engine, fresh_id):
    s = Sampling(temperature=0.8, top_p=0.9, top_k=40, seed=7)
    a = list(generate(engine, fresh_id(), MSGS, "The sea", 10, s))[-1]
    b = list(generate(engine, fresh_id(), MSGS, "The sea", 10, s))[-1]
    assert isinstance(a, Generated) and isinstance(b, Generated)
    assert a.text == b.text


# ---- loading ---------------------------------------------------------------------------


def test_second_load_uses_the_converted_folder(rows, gguf, engine_cache_dir, monkeypatch):
    engine = rows  # loading is the same for both paths
    import cloud.engine.weights

    gguf_loads: list[str] = []  # loads that read (and dequantize) the GGUF file itself
    real = cloud.engine.weights.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        if "gguf_file" in kwargs:
            gguf_loads.append(kwargs["gguf_file"])
        return real(*args, **kwargs)

    monkeypatch.setattr(cloud.engine.weights.AutoModelForCausalLM, "from_pretrained", spy)
    again = TransformersEngine.load(str(gguf), device="cpu", cache_dir=engine_cache_dir)
    folder = Path(again.loaded_from)
    assert gguf_loads == []  # the converted folder was read; the GGUF was not dequantized
    assert folder.parent == engine_cache_dir / "converted"
    assert (folder / "config.json").is_file()
    assert again.converted_from == gguf
    assert not list(folder.parent.glob(".*"))  # no half-written temp folder left
    assert again.info.chat_template
    assert again.info.context_length == engine.info.context_length


@pytest.mark.parametrize("bad", ["/nonexistent/model.gguf", "notes.txt", "folder", "no such thing"])
def test_bad_model_paths_raise_one_line_value_errors(bad, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "folder").mkdir()
    path = bad if bad.startswith("/") else str(tmp_path / bad)
    with pytest.raises(ValueError) as e:
        TransformersEngine.load(path, device="cpu", cache_dir=tmp_path)
    assert "\n" not in str(e.value)


def test_a_file_named_gguf_that_is_not_one(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="not a GGUF"):
        TransformersEngine.load(str(fake), device="cpu", cache_dir=tmp_path)
    assert not (tmp_path / "converted" / "fake").exists()


def test_an_unavailable_device_is_a_clear_error(gguf, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA is not available"):
        TransformersEngine.load(str(gguf), device="cuda", cache_dir=tmp_path)


# ---- the small pure pieces -------------------------------------------------------------


def test_top_p_keeps_the_smallest_set_reaching_p():
    from cloud.engine import sample

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])  # probabilities .64 .24 .09 .03
    seen = {sample(logits, Sampling(1.0, 0.8, 0), 7, draw) for draw in range(300)}
    assert seen == {0, 1}
    assert {sample(logits, Sampling(1.0, 1.0, 1), 7, draw) for draw in range(50)} == {0}
    assert sample(logits, Sampling(0.0, 0.1, 3), 7) == 0


@pytest.mark.parametrize(
    ("text", "stop", "start", "end"),
    [
        ("hello world", ["wor"], 0, 9),
        ("hello world", ["xyz"], 0, None),
        ("a. b. c.", [".", "b"], 0, 2),
        ("abc", ["abc"], 1, None),  # must start at or after `start`
        ("abc", [""], 0, None),
    ],
)
def test_find_stop(text, stop, start, end):
    from cloud.engine import find_stop

    assert find_stop(text, stop, start) == end
