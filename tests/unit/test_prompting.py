"""`shared.prompting.join_prompt`: the text, not the chat template's revision, says whether
the answer is inside a think block; one table, both template variants."""

from __future__ import annotations

import pytest

from shared.prompting import THINK_OPEN, join_prompt, template_thinks, think_prefix

HEAD = "<|im_start|>user\nHow many divisors has 196?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    ("rendered", "text", "joined"),
    [
        # the template appends the opener, the text opens the block: one <think>
        (HEAD + "<think>\n", "<think>\nSo", HEAD + "<think>\nSo"),
        # the template leaves it to the text
        (HEAD, "<think>\nSo", HEAD + "<think>\nSo"),
        # no block in the text (a non-reasoning answer): none in the prompt either way
        (HEAD + "<think>\n", "So", HEAD + "So"),
        (HEAD, "So", HEAD + "So"),
        # an opener without its newline, or with trailing blanks, is the same opener
        (HEAD + "<think>", "<think>\n", HEAD + "<think>\n"),
        (HEAD + "<think>  \n", "<think>\n", HEAD + "<think>\n"),
        # the empty answer of a reasoning model: the block is opened once
        (HEAD + "<think>\n", THINK_OPEN, HEAD + "<think>\n"),
        # a think tag earlier in the prompt is the conversation's, not the opener
        ("<think>\n" + HEAD, "x", "<think>\n" + HEAD + "x"),
        # the plain completion prompt
        ("User: hi\n\nAssistant: ", "Hello", "User: hi\n\nAssistant: Hello"),
    ],
)
def test_join_prompt(rendered: str, text: str, joined: str) -> None:
    assert join_prompt(rendered, text) == joined


def test_a_template_that_knows_the_think_block_makes_answers_open_it() -> None:
    r1_old = "{% if '</think>' in content %}...{% endif %}<｜Assistant｜>"
    r1_new = "<｜Assistant｜><think>\\n"
    assert template_thinks(r1_old) and template_thinks(r1_new)
    assert think_prefix(r1_old) == think_prefix(r1_new) == "<think>\n"
    assert think_prefix("<|im_start|>assistant\n") == "" and think_prefix(None) == ""
