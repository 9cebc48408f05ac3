"""How an answer looks: the text renderer fed session events, chunk by chunk."""

from __future__ import annotations

import io
import json

import pytest

from edge.answer import Event
from edge.render import (
    CLEAR_LINE,
    CLOUD_STYLE,
    RESET,
    SPINNER_FRAMES,
    THINK_STYLE,
    JsonLinesRenderer,
    Spinner,
    StderrNotices,
    TextRenderer,
    strip_thinking,
)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def render(
    pieces: list[tuple[str, str]], *, out: io.StringIO | None = None, **options: object
) -> tuple[str, str]:
    """Feed (source, text) chunks, a segment event at each change of source, then done."""
    out = out if out is not None else io.StringIO()
    err = io.StringIO()
    renderer = TextRenderer(out=out, err=err, **options)  # type: ignore[arg-type]
    source = ""
    for who, text in pieces:
        if who != source:
            renderer(Event("segment", {"source": who, "reason": "r"}))
            source = who
        renderer(Event("text", {"source": who, "text": text}))
    renderer(Event("done", {}))
    return out.getvalue(), err.getvalue()


def chunks(text: str, source: str = "edge") -> list[tuple[str, str]]:
    return [(source, ch) for ch in text]


def test_piped_output_is_the_plain_text_with_a_final_newline() -> None:
    out, _ = render([("edge", "Hello "), ("cloud", "world"), ("edge", ".")])
    assert out == "Hello world.\n"


def test_on_a_terminal_the_clouds_text_is_coloured() -> None:
    out, _ = render([("edge", "Hello "), ("cloud", "world")], out=Tty())
    assert out == f"Hello {CLOUD_STYLE}world{RESET}\n"


def test_mark_none_on_a_terminal_is_plain() -> None:
    out, _ = render([("cloud", "world")], out=Tty(), mark="none")
    assert "\x1b[" not in out


def test_brackets_mark_the_clouds_stretches() -> None:
    out, _ = render(
        [("edge", "a "), ("cloud", "b"), ("cloud", "c"), ("edge", " d")], mark="brackets"
    )
    assert out == "a [cloud]bc[/cloud] d\n"


def test_brackets_close_at_the_end_of_the_answer() -> None:
    out, _ = render([("edge", "a "), ("cloud", "b")], mark="brackets")
    assert out == "a [cloud]b[/cloud]\n"


@pytest.mark.parametrize("split", [1, 2, 3, 5])
def test_thinking_is_dimmed_even_when_tags_arrive_split_across_chunks(split: int) -> None:
    text = "<think>Let me see.</think>The answer is 4."
    pieces = [("edge", text[i : i + split]) for i in range(0, len(text), split)]
    out, _ = render(pieces, out=Tty())
    plain = out.replace(THINK_STYLE, "").replace(RESET, "")
    assert plain == text + "\n"
    # every piece of the reasoning is dim, the answer is not
    thinking, answer = out.split("</think>")
    assert all(part.startswith(THINK_STYLE) for part in thinking.split(RESET) if part)
    assert THINK_STYLE not in answer.replace(RESET, "")


@pytest.mark.parametrize("split", [1, 2, 4, 7])
def test_hide_thinking_drops_the_reasoning_and_its_tags(split: int) -> None:
    text = "<think>\nHmm, 2+2.\n\nWait, yes.\n</think>\n\nThe answer is 4."
    pieces = [("edge", text[i : i + split]) for i in range(0, len(text), split)]
    out, _ = render(pieces, hide_thinking=True)
    assert out == "The answer is 4.\n"


def test_a_tag_split_between_the_edges_and_the_clouds_text_is_still_found() -> None:
    out, _ = render(
        [("edge", "<think>Hmm.</thi"), ("cloud", "nk>Four")], out=Tty(), hide_thinking=True
    )
    assert out == f"{CLOUD_STYLE}Four{RESET}\n"


def test_the_clouds_reasoning_is_dim_and_coloured() -> None:
    out, _ = render([("edge", "<think>"), ("cloud", "Wait.")], out=Tty())
    assert f"{THINK_STYLE}{CLOUD_STYLE}Wait.{RESET}" in out


def test_text_that_only_looks_like_a_tag_is_not_swallowed() -> None:
    out, _ = render(chunks("a <thin b <t"), hide_thinking=True)
    assert out == "a <thin b <t\n"


def test_unfinished_thinking_is_hidden_to_the_end() -> None:
    out, _ = render(chunks("<think>still going"), hide_thinking=True)
    assert out == ""


def test_each_kind_of_fallback_is_said_once_on_stderr() -> None:
    out, err = io.StringIO(), io.StringIO()
    renderer = TextRenderer(out=out, err=err)
    for _ in range(3):
        renderer(
            Event(
                "fallback",
                {"message": "cloud Unavailable; writing locally", "error": "Unavailable"},
            )
        )
    renderer(Event("fallback", {"message": "cloud DeadlineExceeded", "error": "DeadlineExceeded"}))
    assert err.getvalue().count("Unavailable") == 1
    assert err.getvalue().count("DeadlineExceeded") == 1
    assert out.getvalue() == ""


def test_takeovers_are_shown_on_stderr_only_when_verbose() -> None:
    err = io.StringIO()
    TextRenderer(out=io.StringIO(), err=err, verbose=True)(
        Event("takeover", {"reason": "reflection:wait", "tokens": 20})
    )
    assert "reflection:wait" in err.getvalue()
    quiet = io.StringIO()
    TextRenderer(out=io.StringIO(), err=quiet)(Event("takeover", {"reason": "x", "tokens": 1}))
    assert quiet.getvalue() == ""


def test_the_judges_verdicts_are_shown_only_when_verbose() -> None:
    err = io.StringIO()
    renderer = TextRenderer(out=io.StringIO(), err=err, verbose=True)
    renderer(Event("judge", {"score": -0.41, "accepted": True, "reason": "cloud_accepts:-0.41"}))
    renderer(Event("judge", {"score": -1.84, "accepted": False, "reason": "cloud_judge:-1.84"}))
    assert "[judge -0.41: probe kept]" in err.getvalue()
    assert "[judge -1.84: probe rejected]" in err.getvalue()
    quiet = io.StringIO()
    TextRenderer(out=io.StringIO(), err=quiet)(
        Event("judge", {"score": -1.0, "accepted": True, "reason": "r"})
    )
    assert quiet.getvalue() == ""


def test_close_ends_an_interrupted_answer_once() -> None:
    out = io.StringIO()
    renderer = TextRenderer(out=out, mark="brackets")
    renderer(Event("segment", {"source": "cloud", "reason": "r"}))
    renderer(Event("text", {"source": "cloud", "text": "half <th"}))
    renderer.close()
    renderer.close()
    assert out.getvalue() == "[cloud]half <th[/cloud]\n"


def test_json_lines_are_one_event_each() -> None:
    out = io.StringIO()
    renderer = JsonLinesRenderer(out=out)
    renderer(Event("takeover", {"reason": "affirmation:yes", "tokens": 20}))
    renderer(Event("text", {"source": "cloud", "text": "Yes\n"}))
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines == [
        {"event": "takeover", "reason": "affirmation:yes", "tokens": 20},
        {"event": "text", "source": "cloud", "text": "Yes\n"},
    ]


def test_json_modes_still_say_fallbacks_on_stderr() -> None:
    seen: list[Event] = []
    err = io.StringIO()
    sink = StderrNotices(seen.append, err=err)
    event = Event(
        "fallback", {"message": "cloud Unavailable; writing locally", "error": "Unavailable"}
    )
    sink(event)
    sink(event)
    assert seen == [event, event]
    assert err.getvalue() == "specthink-edge: cloud Unavailable; writing locally\n"


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("<think>a</think>\n\nFour.", "Four."),
        ("Four.", "Four."),
        ("<think>a</think>B<think>c</think>D", "BD"),
        ("A<think>unclosed", "A"),
    ],
)
def test_chat_history_keeps_the_answer_without_its_reasoning(text: str, kept: str) -> None:
    assert strip_thinking(text) == kept


def test_a_spinner_fills_the_wait_on_a_terminal_and_is_wiped_before_the_first_word() -> None:
    out, err = Tty(), Tty()
    spinner = Spinner(err, run=False)  # its frames are driven here, one by one
    renderer = TextRenderer(out=out, err=err, spinner=spinner)
    assert spinner.tick() and spinner.tick()
    renderer(Event("segment", {"source": "edge", "reason": "r"}))
    renderer(Event("text", {"source": "edge", "text": "Hi"}))
    shown = err.getvalue()
    assert not spinner.tick(), "the first word stopped it"
    assert err.getvalue() == shown, "nothing more after the first word"
    assert shown == f"\r{SPINNER_FRAMES[0]} thinking\r{SPINNER_FRAMES[1]} thinking{CLEAR_LINE}"
    assert out.getvalue() == "Hi"


def test_a_spinner_that_never_showed_writes_nothing_when_stopped() -> None:
    err = Tty()
    spinner = Spinner(err, run=False)
    spinner.stop()
    assert not spinner.tick() and err.getvalue() == ""


def test_hidden_thinking_keeps_the_spinner_going() -> None:
    renderer = TextRenderer(out=Tty(), err=Tty(), hide_thinking=True)
    renderer(Event("text", {"source": "edge", "text": "<think>hmm"}))
    assert renderer.spinner is not None
    renderer(Event("text", {"source": "edge", "text": "</think>Four"}))
    assert renderer.spinner is None


def test_no_spinner_when_stderr_is_not_a_terminal() -> None:
    assert TextRenderer(out=Tty(), err=io.StringIO()).spinner is None
