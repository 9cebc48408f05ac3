"""The shared look of both command lines (shared.cli_style), on a small typer app
driven through typer's CliRunner, as a user types it."""

from __future__ import annotations

import re
from typing import Annotated

import typer
from typer.testing import CliRunner

from shared.cli_style import (
    CONTEXT_SETTINGS,
    HELP_WIDTH,
    TYPER_SETTINGS,
    VERSION_HELP,
    package_version,
    version_callback,
)

app = typer.Typer(help="A tool.", context_settings=CONTEXT_SETTINGS, **TYPER_SETTINGS)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help=VERSION_HELP, is_eager=True, callback=version_callback("tool")
        ),
    ] = False,
) -> None:
    """A tool."""


@app.command()
def run(
    a_rather_long_option_name_for_the_cache: Annotated[
        int, typer.Option(metavar="BYTES", help="Budget.")
    ] = 2048,
    json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
    note: Annotated[
        str, typer.Option(help="A long help text that a wide terminal must still wrap. " * 4)
    ] = "",
    name: Annotated[str, typer.Option(help="Who.")] = "world",
) -> None:
    """Run it."""
    typer.echo(f"hello {name} {a_rather_long_option_name_for_the_cache} {json}")


def test_short_and_long_help_options_both_work() -> None:
    runner = CliRunner()
    for flag in ("-h", "--help"):
        for args in ([flag], ["run", flag]):
            result = runner.invoke(app, args)
            assert result.exit_code == 0, result.output
            assert "Usage:" in result.output


def test_version_prints_the_program_and_package_version_and_exits_0() -> None:
    result = CliRunner().invoke(app, ["--version", "run"])
    assert result.exit_code == 0
    assert result.output == f"tool {package_version()}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", package_version())


def test_help_shows_defaults_and_whole_option_names_at_80_columns() -> None:
    result = CliRunner().invoke(app, ["run", "-h"], terminal_width=80)
    out = result.output
    assert "--a-rather-long-option-name-for-the-cache BYTES" in out
    assert "[default: 2048]" in out and "[default: world]" in out
    assert all(len(line) <= 80 for line in out.splitlines())


def test_help_has_no_type_tags_or_boxes() -> None:
    out = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).output
    assert re.search(r"<(str|int|float|bool|path)[^>]*>", out) is None
    assert "--json " in out and "BOOLEAN" not in out
    assert "╭" not in out  # plain click help, not a rich panel that cuts names
    assert all(len(line) <= HELP_WIDTH for line in out.splitlines())


def test_no_arguments_shows_help() -> None:
    result = CliRunner().invoke(app, [])
    assert "Usage:" in result.output and "run" in result.output
