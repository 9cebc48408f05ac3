"""What a run of the edge ends with, as values: `Outcome` for an answer, `EdgeError` for
input or setup that cannot go on. Only edge/cli.py turns them into exit codes and lines.

Exit codes: 0 done; 1 runtime failure; 2 bad input; 3 the cloud refused our credentials;
4 the cloud rejected the request; 5 the cloud could not be used at all (the answer was
written by the edge alone); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from edge.answer import Answer

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_AUTH, EXIT_REJECTED = 0, 1, 2, 3, 4
EXIT_CLOUD_UNREACHABLE = 5  # the answer was written, but by the edge alone
EXIT_INTERRUPTED = 130
PROGRAM = "specthink-edge"


def error_line(message: str) -> str:
    """The one style of an error on the edge's stderr."""
    return f"{PROGRAM}: error: {message}"


def notice_line(message: str) -> str:
    return f"{PROGRAM}: {message}"


class EdgeError(Exception):
    """Input or setup the edge cannot go on with: one line, an exit code, no traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


@dataclass(frozen=True)
class Outcome:
    """One answer and how the run ended: the exit code it calls for, and the line that says
    why (an error for codes other than 0 and 130, else a notice; "" when nothing to say).
    `refused`: the cloud refused the call (a chat cannot go on either)."""

    answer: Answer
    exit_code: int = EXIT_OK
    message: str = ""
    refused: bool = False

    @property
    def interrupted(self) -> bool:
        return self.exit_code == EXIT_INTERRUPTED

    def line(self) -> str:
        if not self.message:
            return ""
        if self.exit_code in (EXIT_OK, EXIT_INTERRUPTED):
            return notice_line(self.message)
        return error_line(self.message)


class Notices:
    """What the edge says on stderr outside an answer's events, kept in order so that
    `--json` can list it too."""

    def __init__(self) -> None:
        self.said: list[str] = []

    def __call__(self, message: str) -> None:
        self.said.append(message)
        typer.echo(notice_line(message), err=True)
