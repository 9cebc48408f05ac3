"""The takeover policy a run uses: the knobs from --policy FILE, --mode and --set (each
checked, one line on error), and the mode decided once the small model is known
(`--mode auto`). The rules themselves are shared/policy.py (pure); reading and checking
the knobs and the mode that fits a model are shared/policy_config.py's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from edge.config import EffectiveConfig
from edge.outcome import EdgeError

if TYPE_CHECKING:
    from edge.drafter import LlamaDrafter
    from shared.policy import PolicyConfig


@dataclass(frozen=True)
class PolicyChoice:
    """The policy knobs as given, and where the mode comes from (None: `--mode auto`,
    decided by `with_mode` once the model is loaded)."""

    config: PolicyConfig
    mode_source: str | None


def knob_value(value: str) -> int | str:
    """A --set / --variant value: an integer when it reads as one (the policy checks)."""
    try:
        return int(value)
    except ValueError:
        return value


def policy_choice(cfg: EffectiveConfig, knobs: Sequence[str]) -> PolicyChoice:
    """Policy knobs from --policy FILE, then --mode, then --set (each checked, one line on
    error). A mode from the file is honoured unless --mode (flag, env or config) names one."""
    from shared import policy, policy_config

    try:
        table: dict[str, object] = {}
        mode_source: str | None = None
        if cfg.policy_file:
            table = policy_config.read_policy_file(cfg.policy_file)
            if "mode" in table:
                mode_source = f"set in {cfg.policy_file}"
        config = policy_config.config_from_mapping(table)
        overrides: dict[str, object] = {}
        if cfg.mode != "auto":
            overrides["mode"] = cfg.mode
            source = cfg.source("mode")
            mode_source = "--mode" if source == "flag" else source
        elif cfg.source("mode") != "default":
            mode_source = None  # an explicit `auto` beats the file
        for knob in knobs:
            key, sep, value = knob.partition("=")
            if not sep:
                raise policy.PolicyConfigError(f"--set expects KEY=VALUE, got {knob!r}")
            overrides[key.strip()] = knob_value(value.strip())
            if key.strip() == "mode":
                mode_source = "--set mode"
        return PolicyChoice(policy_config.config_from_mapping(overrides, config), mode_source)
    except policy.PolicyConfigError as exc:
        raise EdgeError(str(exc)) from None


def with_mode(choice: PolicyChoice, drafter: LlamaDrafter | None) -> tuple[PolicyConfig, str]:
    """The policy with its mode decided, and why (for -v and --json): as given, or, under
    `--mode auto`, the mode that fits the loaded small model."""
    from shared.policy_config import infer_mode

    config = choice.config
    if choice.mode_source is not None:
        return config, f"{config.mode} ({choice.mode_source})"
    if drafter is None:  # the cloud strategy loads no small model: the mode is unused
        return config, f"{config.mode} (auto; no small model loaded)"
    mode, why = infer_mode(drafter.chat_template_text, drafter.model_names)
    return replace(config, mode=mode), f"{mode} (auto: {why})"
