"""The takeover policy's configuration: its knobs from a mapping (a TOML table, --set
overrides), each checked, from a TOML policy file (`--policy FILE`), and the mode that
fits a model (`--mode auto`).

The policy's only file I/O is here; `shared.policy` (the rules and `PolicyConfig`, whose
own checks run on every config) reads nothing. It imports the standard library and
`shared.policy` only.
"""

from __future__ import annotations

import enum
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from shared.policy import Mode, PolicyConfig, PolicyConfigError, Trigger

# a family name as a whole word of the model's name: DeepSeek-R1-Distill-..., QwQ-32B, ...
_REASONING_NAME = re.compile(r"(?<![a-z0-9])(r1|qwq|reasoning|reasoner|thinking)(?![a-z0-9])")


def infer_mode(chat_template: str | None, model_names: Sequence[str]) -> tuple[Mode, str]:
    """The mode that fits a model (`--mode auto`), and why: reasoning when its chat template
    has a think block or its name is of a reasoning family, else non-reasoning."""
    if chat_template and "think>" in chat_template:
        return Mode.REASONING, "its chat template has a <think> block"
    for name in model_names:
        if name and _REASONING_NAME.search(name.lower()):
            return Mode.REASONING, f"its name {name!r} is of a reasoning family"
    return (
        Mode.NON_REASONING,
        "no <think> block in its chat template, no reasoning family in its name",
    )


_KEYWORD_KNOBS = ("affirmation_keywords", "reflection_keywords", "verification_keywords")
_ENUM_KNOBS: dict[str, type[enum.StrEnum]] = {"mode": Mode, "trigger": Trigger}


def config_from_mapping(
    values: Mapping[str, Any], base: PolicyConfig | None = None
) -> PolicyConfig:
    """Build a config from a mapping (a TOML table or CLI overrides), checking every key."""
    base = base or PolicyConfig()
    known = {f.name: f for f in fields(PolicyConfig)}
    changes: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise PolicyConfigError(f"unknown policy knob {key!r} (known: {', '.join(known)})")
        if name in _ENUM_KNOBS:
            kind = _ENUM_KNOBS[name]
            try:
                value = kind(value)
            except ValueError:
                choices = " or ".join(repr(str(v)) for v in kind)
                raise PolicyConfigError(
                    f"policy knob {name!r} must be {choices}, not {value!r}"
                ) from None
        elif name in ("uncertainty_threshold", "judge_threshold", "judge_min_uncertainty"):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise PolicyConfigError(
                    f"policy knob {key!r} must be a number, not {value!r}"
                ) from None
        elif name in _KEYWORD_KNOBS:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",")]
            if not isinstance(value, list | tuple) or not all(
                isinstance(v, str) and v.strip() for v in value
            ):
                raise PolicyConfigError(f"policy knob {key!r} must be a list of non-empty strings")
            value = tuple(v.lower() for v in value)
        elif name == "recap_text":
            if not isinstance(value, str) or not value.strip():
                raise PolicyConfigError("policy knob 'recap_text' must be a non-empty string")
        elif isinstance(value, bool) or not isinstance(value, int):
            raise PolicyConfigError(f"policy knob {key!r} must be an integer, not {value!r}")
        changes[name] = value
    return replace(base, **changes)


def load_policy_file(path: str | Path, base: PolicyConfig | None = None) -> PolicyConfig:
    """Read a TOML policy file: knobs at the top level or under a [policy] table."""
    return config_from_mapping(read_policy_file(path), base)


def read_policy_file(path: str | Path) -> dict[str, Any]:
    """The knobs a TOML policy file sets (unchecked: `config_from_mapping` checks them)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise PolicyConfigError(f"cannot read policy file {path}: {exc.strerror}") from None
    try:
        table = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PolicyConfigError(f"policy file {path} is not valid TOML: {exc}") from None
    if isinstance(table.get("policy"), dict):
        table = table["policy"]
    return table
