"""The think block of a reasoning model is decided once, on the wire: the assistant text
starts with "<think>\\n", and each side joins its rendered prompt to it without doubling
it, whichever revision of the chat template it holds (some append "<think>\\n" to the
generation prompt, as newer DeepSeek-R1-Distill revisions do; some do not).

Both template variants are tried on both sides, with the paper's math prompt: the edge is
llama.cpp (its Jinja formatter) on SmolLM2-135M, the cloud is transformers' tokenizer and
`TransformersEngine.render/tokenize` on the same model, loaded into a cache of the test's
own. The two variants, and the two sides, must give the model the same prompt with
exactly one "<think>".
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.datasets import math_prompt
from edge.drafter import LlamaDrafter
from shared.prompting import THINK_OPEN, join_prompt, think_prefix
from shared.wire import Message

pytestmark = pytest.mark.real_models

# ChatML, as a reasoning model's template: the newer revision opens the think block in
# the generation prompt, the older one leaves it to the model (and only strips earlier
# turns' reasoning, which is how it knows about the block at all).
APPENDS_THINK = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
LEAVES_THINK = (
    "{% for m in messages %}{% set content = m['content'] %}"
    "{% if m['role'] == 'assistant' and '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ content }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VARIANTS = {"appends": APPENDS_THINK, "leaves": LEAVES_THINK}
MESSAGES = [Message("user", math_prompt("How many positive divisors does 196 have?"))]
THINKING = THINK_OPEN + "196 = 14^2 = 2^2 * 7^2, so"


@pytest.fixture(scope="module")
def edges(smollm2: Path) -> dict[str, LlamaDrafter]:
    return {
        name: LlamaDrafter(smollm2, context_length=1024, threads=1, chat_template=template)
        for name, template in VARIANTS.items()
    }


@pytest.fixture(scope="module")
def cloud(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    pytest.importorskip("transformers")
    from cloud.engine import TransformersEngine

    cache = tmp_path_factory.mktemp("cloud-cache")  # never the user's cache
    engine = TransformersEngine.load(str(smollm2), device="cpu", cache_dir=cache)
    yield engine


def cloud_with(engine: object, template: str) -> object:
    engine.tokenizer.chat_template = template  # type: ignore[attr-defined]
    return engine


def test_both_template_variants_are_reasoning_templates_whose_answers_open_the_block() -> None:
    assert think_prefix(APPENDS_THINK) == think_prefix(LEAVES_THINK) == THINK_OPEN
    assert think_prefix("{{ messages[0]['content'] }}") == ""  # not a reasoning model


@pytest.mark.parametrize("text", [THINKING, THINK_OPEN, "The answer is"])
def test_the_edge_gives_the_model_the_same_prompt_under_either_template(
    edges: dict[str, LlamaDrafter], text: str
) -> None:
    ids = {name: drafter.tokenize(MESSAGES, text) for name, drafter in edges.items()}
    assert ids["appends"] == ids["leaves"]
    prompt = edges["appends"].llm.detokenize(ids["appends"], special=True).decode()
    assert prompt.count("<think>") == (1 if text.startswith(THINK_OPEN) else 0)
    assert prompt.endswith(text) and "Please reason step by step" in prompt
    assert all(d.think_prefix == THINK_OPEN for d in edges.values())


@pytest.mark.parametrize("edge_variant", sorted(VARIANTS))
@pytest.mark.parametrize("cloud_variant", sorted(VARIANTS))
def test_edge_and_cloud_agree_on_the_prompt_whichever_revision_each_holds(
    edges: dict[str, LlamaDrafter], cloud: object, edge_variant: str, cloud_variant: str
) -> None:
    engine = cloud_with(cloud, VARIANTS[cloud_variant])
    for text in (THINKING, THINK_OPEN):
        edge_prompt = join_prompt(edges[edge_variant].render(MESSAGES), text)
        cloud_prompt = engine.render(MESSAGES, text)  # type: ignore[attr-defined]
        assert cloud_prompt == edge_prompt
        assert cloud_prompt.count("<think>") == 1
        assert cloud_prompt.endswith("<|im_start|>assistant\n" + text)


def test_the_cloud_tokenizes_the_same_ids_under_either_template(cloud: object) -> None:
    ids = {
        name: cloud_with(cloud, template).tokenize(MESSAGES, THINKING)  # type: ignore[attr-defined]
        for name, template in VARIANTS.items()
    }
    assert ids["appends"] == ids["leaves"]
