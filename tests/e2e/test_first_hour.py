"""What a new user meets first, on real models over real sockets: the mode that fits the
model, a cloud that cannot be reached said once and why, the uncertainty trigger, config
show naming the cloud's model, -h and --version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.test_speculative_e2e import BIN, PROMPT, ask, check_answer_structure

pytestmark = pytest.mark.real_models


def test_a_non_reasoning_model_without_mode_hands_over_to_the_cloud(smollm2, smollm2_cloud):
    done = ask(
        "Explain photosynthesis in three short steps.",
        "--model", str(smollm2),
        "--cloud", smollm2_cloud.address,
        "--json", "--temperature", "0", "--max-tokens", "140",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    check_answer_structure(result)
    assert result["stats"]["mode"] == "non-reasoning"
    assert result["stats"]["mode_reason"].startswith("non-reasoning (auto: no <think> block")
    assert result["stats"]["cloud_tokens"] > 0


def test_a_mode_set_in_a_policy_file_is_honoured(smollm2, tmp_path: Path):
    policy = tmp_path / "policy.toml"
    policy.write_text('mode = "reasoning"\n')
    done = ask(
        "Say hi.", "--model", str(smollm2), "--policy", str(policy),
        "--json", "--max-tokens", "8", "--temperature", "0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)["stats"]
    assert stats["mode"] == "reasoning"
    assert stats["mode_reason"] == f"reasoning (set in {policy})"


def test_a_cloud_name_that_does_not_resolve_is_one_line(smollm2):
    done = ask(
        "Say hi.", "--model", str(smollm2), "--cloud", "no-such-host.invalid:50051",
        "--max-tokens", "8", "--temperature", "0",
    )  # fmt: skip
    assert done.returncode == 5
    assert done.stdout.strip(), "the answer is not lost"
    lines = done.stderr.strip().splitlines()
    # the cloud is one line; the other says the 8-token budget cut the answer
    assert lines[-1] == "specthink-edge: the answer was cut at the token budget (--max-tokens)"
    assert len(lines) == 2, done.stderr
    assert "no-such-host.invalid:50051 unusable: the name 'no-such-host.invalid'" in lines[0]
    assert "does not resolve" in lines[0]


def test_the_uncertainty_trigger_hands_over_and_names_itself(smollm2, smollm2_cloud):
    done = ask(
        PROMPT,  # several paragraphs
        "--model", str(smollm2),
        "--cloud", smollm2_cloud.address,
        "--set", "trigger=uncertainty",
        "--set", "uncertainty_threshold=0",  # every break is "unsure": hand over each time
        "--set", "start_tokens=0",
        "--json", "--temperature", "0", "--max-tokens", "160",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    cloud = [s for s in result["segments"] if s["source"] == "cloud"]
    assert cloud, "at least one break"
    for segment in cloud:
        rule, _, value = segment["reason"].partition(":")
        assert rule == "uncertainty"
        assert float(value.split("+")[0]) >= 0
    assert result["stats"]["takeovers"] == len(cloud)


def test_the_uncertainty_trigger_keeps_confident_probes(smollm2, smollm2_cloud):
    done = ask(
        PROMPT,  # several paragraphs
        "--model", str(smollm2),
        "--cloud", smollm2_cloud.address,
        "--set", "trigger=uncertainty",
        "--set", "uncertainty_threshold=1000",  # never unsure: the edge writes every break
        "--set", "start_tokens=0",
        "--json", "--temperature", "0", "--max-tokens", "120",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["stats"]["cloud_tokens"] == 0
    kept = [s["reason"] for s in result["segments"] if s["reason"].startswith("confident_probe:")]
    assert kept, result["segments"]


def test_config_show_says_which_model_the_cloud_serves(smollm2_cloud, tmp_path: Path):
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECTHINK_")}
    (tmp_path / "config.toml").write_text("")
    env |= {
        "SPECTHINK_CLOUD": smollm2_cloud.address,
        "SPECTHINK_CONFIG": str(tmp_path / "config.toml"),
    }
    done = subprocess.run(
        [str(BIN / "specthink-edge"), "config", "show", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)["cloud_status"]
    assert status["reachable"] is True
    assert status["model_id"].endswith(".gguf")


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_is_there_under_both_names(flag):
    import subprocess

    done = subprocess.run(
        [str(BIN / "specthink-edge"), "ask", flag], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    assert "--max-tokens" in done.stdout and "--mode" in done.stdout


def test_version_prints_the_package_version():
    import subprocess
    from importlib.metadata import version

    done = subprocess.run(
        [str(BIN / "specthink-edge"), "--version"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    assert done.stdout.strip() == f"specthink-edge {version('specthink')}"
