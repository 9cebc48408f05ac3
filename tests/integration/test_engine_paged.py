"""The paged engine (`serve --engine paged`) on real SmolLM2-135M (CPU): its KV pool holds
whole sessions in slots, rows move only when the decode batch changes, and a step that runs
out of memory sheds rows instead of failing them (both engines).

The behaviour every engine shares (batched = alone, prefix reuse, cancellation, finish
reasons) is tested on both paths by test_engine_batching.py and test_engine_cache.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from cloud.engine import PagedEngine, TransformersEngine  # noqa: E402
from cloud.engine_api import Generated  # noqa: E402
from cloud.engine_thread import EngineThread  # noqa: E402
from shared.wire import Message, Sampling  # noqa: E402
from tests.integration.engine_calls import generate, like  # noqa: E402

pytestmark = pytest.mark.real_models

GREEDY = Sampling(temperature=0.0)
SEA = [Message("user", "Tell me about the sea.")]


def text_of(target, session: str, text: str, n: int = 8) -> Generated:
    done = list(generate(target, session, SEA, text, n))[-1]
    assert isinstance(done, Generated)
    return done


def paged_like(engine: TransformersEngine, slots: int, context: int = 511) -> PagedEngine:
    size = slots * (context + 1) * engine.memory.bytes_per_token
    return like(engine, PagedEngine, context_length=context, max_cache_bytes=size)


def test_the_pool_holds_a_whole_number_of_slots_and_evicts_the_least_recent(smol_engine):
    paged = paged_like(smol_engine, slots=2)
    assert paged.memory.slots == 2 and paged.info.engine == "paged"
    assert paged.pool.keys.shape[1] == 2 and paged.pool.keys.shape[3] == 512
    for session in ("a", "b", "c"):
        text_of(paged, session, "The sea is")
    assert set(paged.caches.idle()) == {"b", "c"}  # "a" was least recently used
    assert paged.cache_stats().evictions == 1
    again = text_of(paged, "a", "The sea is deep")
    assert again.usage.cached_tokens == 0  # evicted: re-prefilled, same text as cold
    assert again.text == text_of(smol_engine, f"cold-{time.monotonic_ns()}", "The sea is deep").text
    warm = text_of(paged, "c", "The sea is deep")
    assert warm.usage.cached_tokens > 0


def together(loop: EngineThread, texts: dict[str, str], n: int) -> dict[str, Generated]:
    out: dict[str, Generated] = {}

    def one(session: str, text: str) -> None:
        out[session] = text_of(loop, session, text, n)

    threads = [threading.Thread(target=one, args=item) for item in texts.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return out


def test_rows_move_only_when_the_batch_changes_never_per_step(smol_engine):
    paged = paged_like(smol_engine, slots=8)
    loop = EngineThread(paged, max_running=4)
    try:
        texts = {f"s{i}": f"Story {i}: the sea" for i in range(4)}
        done = together(loop, texts, 24)
        assert all(d.usage.generated_tokens >= 24 for d in done.values())
        assert loop.steps >= 24 and max(loop.batch_sizes) >= 2
        # each call joins the decode rows once and leaves once: at most two moves a call,
        # however many steps ran (the row engine re-stacked the batch at every change)
        assert paged.pool.exchanges <= 2 * len(texts)
    finally:
        loop.close()


class OutOfMemoryAbove:
    """Wraps a model: a forward over more than `rows` decoding rows raises torch's
    OutOfMemoryError, as a CUDA allocation that does not fit would."""

    def __init__(self, model, rows: int) -> None:
        self.model, self.rows, self.raised = model, rows, 0

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        ids = kwargs["input_ids"]
        layout = kwargs.get("slot_step")
        rows = layout.rows if layout is not None else (ids.shape[0] if ids.shape[1] == 1 else 0)
        if rows > self.rows:
            self.raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(*args, **kwargs)


@pytest.fixture(params=["rows", "paged"])
def tight(request, smol_engine) -> Iterator[tuple[TransformersEngine, OutOfMemoryAbove]]:
    """An engine whose device holds 2 decoding rows at most."""
    model = OutOfMemoryAbove(smol_engine.model, rows=2)
    cls = TransformersEngine if request.param == "rows" else PagedEngine
    size = 8 * 512 * smol_engine.memory.bytes_per_token
    engine = like(smol_engine, cls, model, context_length=511, max_cache_bytes=size)
    yield engine, model


def test_an_injected_out_of_memory_sheds_rows_and_every_takeover_completes(tight, smol_engine):
    engine, model = tight
    loop = EngineThread(engine, max_running=6)
    try:
        texts = {f"oom{i}-{time.monotonic_ns()}": f"Waves {i} crash on the" for i in range(6)}
        done = together(loop, texts, 10)
        assert set(done) == set(texts)  # no takeover failed
        assert model.raised >= 1 and loop.sheds >= 1
        assert max(loop.batch_sizes) <= 2
        for session, text in texts.items():
            alone = text_of(smol_engine, f"alone-{session}", text, 10)
            assert done[session].text == alone.text  # the shed rows lost nothing
    finally:
        loop.close()


def test_serve_engine_paged_with_a_context_length_serves_and_says_so(smollm2, tmp_path):
    from shared.rpc import specthink_pb2 as pb
    from tests.conftest import start_cloud
    from tests.integration.cloud_harness import full_request, stub

    cloud = start_cloud(smollm2, tmp_path, "--engine", "paged", "--context-length", "1024")
    try:
        _, api = stub(cloud.address)
        info = api.GetModelInfo(pb.ModelInfoRequest(), timeout=30)
        assert (info.engine, info.context_length) == ("paged", 1024)
        assert info.max_running >= 1
        request = full_request("paged-cli", user="Tell me about the sea.", max_tokens=6)
        request.sampling.temperature = 0.0
        events = list(api.Takeover(request, timeout=120))
        done = events[-1].done
        assert done.usage.generated_tokens >= 6
        assert "".join(e.chunk.text for e in events[:-1]).strip()
    finally:
        cloud.stop()
    err = cloud.stderr_path.read_text()
    assert "engine paged" in err and "memory plan: weights" in err
    assert "sessions of context 1,024 tokens" in err and "peak host RSS while loading" in err


def test_the_engine_names_serve_accepts_are_the_engines_there_are():
    from cloud.engine import ENGINES
    from cloud.preflight import ENGINE_NAMES

    assert set(ENGINE_NAMES) == {"auto", *ENGINES}
