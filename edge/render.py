"""How `ask` shows an answer: streamed text on stdout, notices on stderr, or JSON lines.

On a terminal the cloud's text is coloured (or, with --mark brackets, wrapped in
[cloud]...[/cloud]), reasoning (<think>...</think>) is dimmed or hidden, and a spinner on
stderr fills the wait before the first word; piped output is plain text. Renderers are
event sinks of the session loop.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable
from typing import IO, Any

from edge.answer import Event
from edge.options import Mark, choices

CLOUD_STYLE = "\x1b[36m"  # cyan: text written by the large model
CLOUD_LEGEND = "text in cyan was written by the cloud's large model"
THINK_STYLE = "\x1b[2m"  # dim: reasoning
RESET = "\x1b[0m"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
OPEN_CLOUD, CLOSE_CLOUD = "[cloud]", "[/cloud]"
SPINNER_FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
CLEAR_LINE = "\r\x1b[K"


class Spinner:
    """A spinner on a terminal's stderr until the first word is written. It shows only
    after `delay_s` (a quick answer never flashes one) and wipes its line when stopped.
    `run=False` leaves the frames to `tick` (tests drive it frame by frame)."""

    def __init__(
        self,
        err: IO[str],
        label: str = "thinking",
        interval_s: float = 0.1,
        delay_s: float = 0.3,
        run: bool = True,
    ) -> None:
        self.err = err
        self.label = label
        self.interval_s = interval_s
        self.delay_s = delay_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._shown = False
        self._frame = 0
        if run:
            threading.Thread(target=self._spin, name="spinner", daemon=True).start()

    def _spin(self) -> None:
        if self._stop.wait(self.delay_s):
            return
        while self.tick():
            if self._stop.wait(self.interval_s):
                return

    def tick(self) -> bool:
        """Show the next frame; False (and nothing written) once stopped."""
        with self._lock:
            if self._stop.is_set():
                return False
            frame = SPINNER_FRAMES[self._frame % len(SPINNER_FRAMES)]
            self.err.write(f"\r{frame} {self.label}")
            self.err.flush()
            self._shown = True
            self._frame += 1
            return True

    def stop(self) -> None:
        """Idempotent; after it returns the spinner writes nothing more."""
        with self._lock:
            if self._stop.is_set():
                return
            self._stop.set()
            if self._shown:
                self.err.write(CLEAR_LINE)
                self.err.flush()


class TextRenderer:
    """Streams the answer as it is written. Marks the cloud's text when `color` or
    `brackets`; dims (or, with `hide_thinking`, drops) <think>...</think> reasoning, even
    when a tag arrives split across chunks, or across the edge's and the cloud's text."""

    def __init__(
        self,
        out: IO[str] | None = None,
        err: IO[str] | None = None,
        mark: Mark | str = Mark.AUTO,
        hide_thinking: bool = False,
        verbose: bool = False,
        spinner: bool | Spinner | None = None,
        said: frozenset[str] = frozenset(),
    ):
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        if mark not in set(Mark):
            raise ValueError(f"mark must be {choices(Mark)}")
        # auto: colour on a terminal; with NO_COLOR (no-color.org) brackets there; piped,
        # plain text, and stderr says how much the cloud wrote
        self.tell_share = False
        if mark == Mark.AUTO:
            if not _isatty(self.out):
                mark, self.tell_share = Mark.NONE, True
            else:
                mark = Mark.BRACKETS if os.environ.get("NO_COLOR") else Mark.COLOR
        self.color = mark == Mark.COLOR
        self.brackets = mark == Mark.BRACKETS
        self._bracket_open = False  # a [cloud] written and not yet closed
        self._chars = {"edge": 0, "cloud": 0}
        self._source = ""  # whose text the brackets are open for
        self.hide_thinking = hide_thinking
        self.verbose = verbose
        self._thinking = False
        # text held back while a <think> tag may be incomplete, with each character's source
        self._pending = ""
        self._pending_sources: list[str] = []
        self.wrote_any = False
        self._closed = False
        self._told: set[str] = set(said)  # kinds of failure already said (each said once)
        self._cloud_wrote = False
        if isinstance(spinner, Spinner):
            self.spinner: Spinner | None = spinner
        else:
            show = _isatty(self.err) if spinner is None else spinner
            self.spinner = Spinner(self.err) if show else None

    def __call__(self, event: Event) -> None:
        if event.kind == "takeover" and self.spinner is not None:
            self.spinner.label = "the cloud is writing"
        elif event.kind == "judging" and self.spinner is not None:
            self.spinner.label = "the cloud is judging the next step"
        if event.kind == "segment":
            self._switch(event.data["source"])
        elif event.kind == "text":
            source = event.data["source"]
            self._cloud_wrote |= source == "cloud"
            self._chars[source] = self._chars.get(source, 0) + len(event.data["text"])
            self._text(source, event.data["text"])
        elif event.kind == "fallback" and event.data.get("error") not in self._told:
            self._told.add(event.data.get("error", ""))  # each kind of failure said once
            self.notice(f"specthink-edge: {event.data['message']}")
        elif event.kind == "judge" and self.verbose:
            verdict = "kept" if event.data["accepted"] else "rejected"
            self.notice(f"[judge {event.data['score']:.2f}: probe {verdict}]")
        elif event.kind == "takeover" and self.verbose:
            self.notice(f"[takeover {event.data['reason']}, {event.data['tokens']} tokens]")
        elif event.kind == "done":
            self.close()
            if self.color and self._cloud_wrote:
                self.notice(f"specthink-edge: {CLOUD_LEGEND}")
            if self.tell_share and self._cloud_wrote:
                cloud, total = self._chars["cloud"], sum(self._chars.values())
                self.notice(
                    f"specthink-edge: the cloud wrote {cloud} of {total} characters of this "
                    "answer (--mark brackets marks them in the text, --json lists them)"
                )
            if event.data.get("finish_reason") == "length":
                self.notice("specthink-edge: the answer was cut at the token budget (--max-tokens)")

    def close(self) -> None:
        """End the answer: flush held-back text, close marks, end the line. Idempotent,
        so an interrupted or refused answer ends cleanly too."""
        if self._closed:
            return
        self._closed = True
        self._stop_spinner()
        self._flush_pending()
        self._switch("")
        if self.wrote_any:
            self.out.write("\n")
        self.out.flush()

    def _switch(self, source: str) -> None:
        """Brackets mode: [cloud]...[/cloud] around the large model's text, opened by its
        first visible character (a takeover that wrote nothing leaves no empty pair)."""
        if self.brackets and source != self._source:
            self._flush_pending()
            if source != "cloud":  # a [cloud] opens at its first character, not here
                self._bracket(source)
        self._source = source

    def _bracket(self, source: str) -> None:
        if source == "cloud" and not self._bracket_open:
            self._stop_spinner()
            self.out.write(OPEN_CLOUD)
            self._bracket_open = True
        elif source != "cloud" and self._bracket_open:
            self.out.write(CLOSE_CLOUD)
            self._bracket_open = False

    def notice(self, message: str) -> None:
        self._stop_spinner()
        self.err.write(message + "\n")
        self.err.flush()

    def _stop_spinner(self) -> None:
        if self.spinner is not None:
            self.spinner.stop()
            self.spinner = None

    def _text(self, source: str, text: str) -> None:
        self._pending += text
        self._pending_sources += [source] * len(text)
        while self._pending:
            tag = THINK_CLOSE if self._thinking else THINK_OPEN
            at = self._pending.find(tag)
            if at >= 0:
                self._emit_upto(at)
                self._emit_tag(tag)
                self._drop(len(tag))
                self._thinking = not self._thinking
                continue
            self._emit_upto(len(self._pending) - _partial_suffix(self._pending, tag))
            break
        self.out.flush()

    def _drop(self, n: int) -> None:
        self._pending = self._pending[n:]
        self._pending_sources = self._pending_sources[n:]

    def _emit_upto(self, n: int) -> None:
        """Write the first n held characters, one run per source."""
        while n > 0:
            source = self._pending_sources[0]
            run = 1
            while run < n and self._pending_sources[run] == source:
                run += 1
            self._emit(source, self._pending[:run])
            self._drop(run)
            n -= run

    def _flush_pending(self) -> None:
        self._emit_upto(len(self._pending))

    def _emit_tag(self, tag: str) -> None:
        if self.hide_thinking:
            return
        self._emit("edge", tag, tag=True)

    def _emit(self, source: str, text: str, tag: bool = False) -> None:
        if not text or (self._thinking and self.hide_thinking and not tag):
            return
        if self.hide_thinking and not self.wrote_any and not self._thinking:
            text = text.lstrip("\n")  # the answer after a hidden <think> block starts clean
            if not text:
                return
        self._stop_spinner()  # the first visible word ends the wait (hidden thinking does not)
        if self.brackets:
            self._bracket(source)
        self.wrote_any = True
        if not self.color:
            self.out.write(text)
            return
        style = ""
        if self._thinking or tag:
            style += THINK_STYLE
        if source == "cloud":
            style += CLOUD_STYLE
        self.out.write(f"{style}{text}{RESET}" if style else text)


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream: not a terminal
        return False


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def strip_thinking(text: str) -> str:
    """The answer without its <think>...</think> reasoning (an unclosed block runs to the
    end). A chat's history keeps only this, as reasoning models expect."""
    out, rest = [], text
    while True:
        start = rest.find(THINK_OPEN)
        if start < 0:
            out.append(rest)
            break
        out.append(rest[:start])
        end = rest.find(THINK_CLOSE, start + len(THINK_OPEN))
        if end < 0:
            break
        rest = rest[end + len(THINK_CLOSE) :]
    return "".join(out).strip()


class StderrNotices:
    """For --json and --jsonl: the answer goes to stdout as JSON, and every fallback is
    still said on stderr (once per kind of failure), never silently."""

    def __init__(
        self,
        inner: Callable[[Event], None],
        err: IO[str] | None = None,
        said: frozenset[str] = frozenset(),
    ):
        self.inner = inner
        self.err = err or sys.stderr
        self._told: set[str] = set(said)  # kinds of failure already said (each said once)
        self._cloud_wrote = False

    def __call__(self, event: Event) -> None:
        if event.kind == "fallback" and event.data.get("error") not in self._told:
            self._told.add(event.data.get("error", ""))
            self.err.write(f"specthink-edge: {event.data['message']}\n")
            self.err.flush()
        self.inner(event)


class JsonLinesRenderer:
    """One JSON object per event on stdout, for scripts and apps."""

    def __init__(self, out: IO[str] | None = None):
        self.out = out or sys.stdout

    def __call__(self, event: Event) -> None:
        record: dict[str, Any] = {"event": event.kind, **event.data}
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.out.flush()


class WithStats:
    """Adds what the run knows (mode, retries, ...) to the `done` event's stats."""

    def __init__(
        self, inner: Callable[[Event], None], add: Callable[[dict[str, Any]], object]
    ) -> None:
        self.inner, self.add = inner, add

    def __call__(self, event: Event) -> None:
        if event.kind == "done":
            self.add(event.data["stats"])
        self.inner(event)


class Quiet:
    """For --json: nothing until the end."""

    def __call__(self, event: Event) -> None:
        return None
