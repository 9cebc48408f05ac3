"""Where the takeover policy's knobs come from, besides their defaults: a TOML policy file
(`--policy FILE`), and the mode that fits a model (`--mode auto`).

The policy's only file I/O is here; the knobs are checked by `shared.policy`
(`config_from_mapping`, `PolicyConfig`), which reads nothing. It imports the standard
library and `shared.policy` only.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.policy import Mode, PolicyConfig, PolicyConfigError, config_from_mapping

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
