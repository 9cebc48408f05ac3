"""How `ask` shows an answer: streamed text on stdout, notices on stderr, or JSON lines.

On a terminal the cloud's text is coloured (or, with --mark brackets, wrapped in
[cloud]...[/cloud]) and reasoning (<think>...</think>) is dimmed or hidden; piped output
is plain text. Renderers are event sinks of the session loop.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from edge.session import Event

CLOUD_STYLE = "\x1b[36m"  # cyan: text written by the large model
THINK_STYLE = "\x1b[2m"  # dim: reasoning
RESET = "\x1b[0m"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
OPEN_CLOUD, CLOSE_CLOUD = "[cloud]", "[/cloud]"
MARKS = ("auto", "color", "brackets", "none")


class TextRenderer:
    """Streams the answer as it is written. Marks the cloud's text when `color`."""

    def __init__(
        self,
        out: IO[str] | None = None,
        err: IO[str] | None = None,
        mark: str = "auto",
        hide_thinking: bool = False,
        verbose: bool = False,
    ):
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        if mark not in MARKS:
            raise ValueError(f"mark must be one of {', '.join(MARKS)}")
        if mark == "auto":
            mark = "color" if self.out.isatty() else "none"
        self.color = mark == "color"
        self.brackets = mark == "brackets"
        self._source = ""
        self.hide_thinking = hide_thinking
        self.verbose = verbose
        self._thinking = False
        self._pending = ""  # text held back while a <think> tag may be incomplete
        self.wrote_any = False
        self._told: set[str] = set()

    def __call__(self, event: Event) -> None:
        if event.kind == "segment":
            self._switch(event.data["source"])
        elif event.kind == "text":
            self._text(event.data["source"], event.data["text"])
        elif event.kind == "fallback" and event.data.get("error") not in self._told:
            self._told.add(event.data.get("error", ""))  # each kind of failure said once
            self.notice(f"specthink-edge: {event.data['message']}")
        elif event.kind == "takeover" and self.verbose:
            self.notice(f"[takeover {event.data['reason']}, {event.data['tokens']} tokens]")
        elif event.kind == "done":
            self._flush_pending(source="edge")
            self._switch("")
            if self.wrote_any:
                self.out.write("\n")
            self.out.flush()

    def _switch(self, source: str) -> None:
        """Brackets mode: [cloud]...[/cloud] around the large model's text."""
        if self.brackets and source != self._source:
            self._flush_pending(self._source or "edge")
            if self._source == "cloud":
                self.out.write(CLOSE_CLOUD)
            if source == "cloud":
                self.out.write(OPEN_CLOUD)
        self._source = source

    def notice(self, message: str) -> None:
        self.err.write(message + "\n")
        self.err.flush()

    def _text(self, source: str, text: str) -> None:
        self._pending += text
        while self._pending:
            tag = THINK_CLOSE if self._thinking else THINK_OPEN
            at = self._pending.find(tag)
            if at >= 0:
                self._emit(source, self._pending[:at])
                self._emit_tag(tag)
                self._pending = self._pending[at + len(tag) :]
                self._thinking = not self._thinking
                continue
            keep = _partial_suffix(self._pending, tag)
            self._emit(source, self._pending[: len(self._pending) - keep])
            self._pending = self._pending[len(self._pending) - keep :]
            break
        self.out.flush()

    def _flush_pending(self, source: str) -> None:
        self._emit(source, self._pending)
        self._pending = ""

    def _emit_tag(self, tag: str) -> None:
        if self.hide_thinking:
            return
        self._emit("edge", tag, tag=True)

    def _emit(self, source: str, text: str, tag: bool = False) -> None:
        if not text or (self._thinking and self.hide_thinking and not tag):
            return
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


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class JsonLinesRenderer:
    """One JSON object per event on stdout, for scripts and apps."""

    def __init__(self, out: IO[str] | None = None):
        self.out = out or sys.stdout

    def __call__(self, event: Event) -> None:
        record: dict[str, Any] = {"event": event.kind, **event.data}
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.out.flush()


class Quiet:
    """For --json: nothing until the end."""

    def __call__(self, event: Event) -> None:
        return None
