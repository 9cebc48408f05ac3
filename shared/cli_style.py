"""How both command lines look: the typer settings `specthink-cloud` and `specthink-edge`
share (help options, help width, defaults shown, plain option placeholders instead of
type tags, `--version`). typer only, no runtime. Sub-apps (`app.add_typer`) take the same
settings; an app needs a callback (a group) for the placeholders to apply.

    app = typer.Typer(context_settings=CONTEXT_SETTINGS, **TYPER_SETTINGS)

    @app.callback()
    def root(
        version: Annotated[bool, typer.Option("--version", help=VERSION_HELP, is_eager=True,
                           callback=version_callback("specthink-cloud"))] = False,
    ) -> None: ...
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata
from typing import Any

import typer
from typer.core import TyperGroup, TyperOption

DISTRIBUTION = "specthink"
VERSION_HELP = "Print the version and exit."
HELP_WIDTH = 100  # wide enough that option names are never cut, narrow enough to read

CONTEXT_SETTINGS: dict[str, Any] = {
    "help_option_names": ["-h", "--help"],
    "max_content_width": HELP_WIDTH,
    "show_default": True,
}


class PlainHelpGroup(TyperGroup):
    """Commands whose options show a name where typer shows a type tag: `--port PORT`,
    not `--port <int range>` (an option's own `metavar` wins)."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            for param in command.params:
                if (
                    isinstance(param, TyperOption)
                    and param.metavar is None
                    and not (param.is_flag or param.count)
                    and param.name
                ):
                    param.metavar = param.name.upper()
        return command


TYPER_SETTINGS: dict[str, Any] = {
    "cls": PlainHelpGroup,
    "no_args_is_help": True,
    "add_completion": False,
    "pretty_exceptions_enable": False,
    # plain click help (no rich panels): option names are never cut, defaults shown in
    # [brackets], errors are two plain lines
    "rich_markup_mode": None,
}


def package_version() -> str:
    """The installed distribution's version ("unknown" in a source tree not installed)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def version_callback(prog: str) -> Callable[[bool], None]:
    """A `--version` callback that prints `<prog> <version>` and exits 0."""

    def show(value: bool) -> None:
        if value:
            typer.echo(f"{prog} {package_version()}")
            raise typer.Exit()

    return show


def version_flag(prog: str) -> Any:
    """The `--version` option of a root callback: `def root(version: bool = version_flag(
    "specthink-edge")) -> None`."""
    return typer.Option(
        False, "--version", help=VERSION_HELP, is_eager=True, callback=version_callback(prog)
    )
