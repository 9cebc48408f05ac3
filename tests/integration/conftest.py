"""Fixtures for the engine tests on real SmolLM2-135M: one engine for the test session,
its converted weights in the tests' own cache folder (never the user's ~/.cache)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def engine_cache_dir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Where the engine tests keep converted GGUF weights: pytest's cache folder of this
    checkout (kept between runs, so SmolLM2 is dequantized once per checkout), or a
    temporary folder when the cache plugin is off."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("specthink-engine"))
    return tmp_path_factory.mktemp("specthink-engine")


@pytest.fixture(scope="session")
def smol_engine(smollm2: Path, engine_cache_dir: Path) -> Any:
    """A `TransformersEngine` on SmolLM2-135M (CPU, fp32), shared by the session's tests:
    each test uses its own session ids. float32 on every CPU: the tests compare a cached
    or batched call's greedy text with a cold one, which bf16 rounding (auto's choice on
    CPUs with AMX or AVX512-BF16) splits on near-ties."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from cloud.engine import TransformersEngine

    return TransformersEngine.load(
        str(smollm2), device="cpu", cache_dir=engine_cache_dir, dtype="float32"
    )


@pytest.fixture(scope="session")
def smol_paged(smol_engine: Any) -> Any:
    """A `PagedEngine` (`serve --engine paged`) on the same SmolLM2 weights: its own slot
    pool (16 slots of 2,048 tokens), the model object shared with `smol_engine`."""
    from cloud.engine import PagedEngine
    from tests.integration.engine_calls import like

    slots = 16 * 2048 * smol_engine.memory.bytes_per_token
    return like(smol_engine, PagedEngine, context_length=2047, max_cache_bytes=slots)


@pytest.fixture(scope="session", params=["rows", "paged"])
def smol_either(request: pytest.FixtureRequest, smol_engine: Any) -> Any:
    """Each engine path in turn, for the tests every path must pass."""
    if request.param == "rows":
        return smol_engine
    return request.getfixturevalue("smol_paged")
