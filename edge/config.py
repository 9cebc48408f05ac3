"""Effective edge settings: flags > SPECTHINK_* environment > config file > defaults, each value with where it came from.

Every setting is one row of :data:`SETTINGS` (name, kind, default, environment variable,
check, help). :func:`resolve` walks that table once per setting and takes the first
layer that gives a value:

1. a command-line flag (``flags[name]`` not None),
2. the environment variable (``SPECTHINK_*``; an empty value counts as not set),
3. the config file,
4. the default (for ``gpu_layers`` it depends on the machine: -1, all layers, on Apple
   silicon for Metal, else 0).

Config file: TOML at ``$SPECTHINK_CONFIG``, else ``<typer app dir "specthink">/config.toml``
(``~/.config/specthink/config.toml`` on Linux). Keys are the setting names, with dashes or
underscores, at top level or under ``[edge]``::

    cloud = "cloud.example.com:50051"
    [edge]
    temperature = 0.7
    gpu-layers = -1

A missing default file means "no file"; a missing file named by ``$SPECTHINK_CONFIG`` (or
the ``config_path`` argument) is an error, since it is most likely a typo. Relative paths
in the file are taken relative to the file's folder; ``~`` is expanded everywhere.

Errors: anything a user can cause (unknown key, wrong type, out of range, bad address,
unreadable TOML) raises :class:`ConfigError` with a one-line message that names where the
value came from, e.g. ``SPECTHINK_TEMPERATURE=abc: temperature must be a number``.

The API key is never shown in full: :meth:`EffectiveConfig.rows`, ``repr`` and
``config show`` print ``****`` and its last 4 characters.
"""

from __future__ import annotations

import difflib
import json
import os
import platform
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import typer

from edge.config_values import (
    BOOL,
    FLOAT,
    INT,
    PATH,
    STR,
    BadValue,
    Check,
    ValueKind,
    between,
    choice,
    host_port,
)
from edge.options import Strategy

__all__ = [
    "CONFIG_ENV",
    "SETTINGS",
    "ConfigError",
    "EffectiveConfig",
    "Setting",
    "auto_threads",
    "config_file_path",
    "mask_secret",
    "resolve",
]

CONFIG_ENV = "SPECTHINK_CONFIG"


class ConfigError(ValueError):
    """A bad setting; the message is one line and names the source of the value."""


# --------------------------------------------------------------------------- defaults


def _default_gpu_layers() -> int:
    """-1 (offload every layer) on Apple silicon, where Metal is always there; else 0 (CPU)."""
    if platform.system() == "Darwin" and platform.machine() in ("arm64", "aarch64"):
        return -1
    return 0


def auto_threads() -> int:
    """Threads used when ``threads`` is unset: about the number of physical cores."""
    n = os.cpu_count() or 1
    return max(1, n // 2) if n > 2 else n


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Setting:
    name: str
    kind: ValueKind
    default: object  # a value, or a zero-argument callable computing it
    env: str
    check: Check | None
    help: str
    secret: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def default_value(self) -> object:
        return self.default() if callable(self.default) else self.default


S = Setting
#: The one table of edge settings. Order is display order.
# fmt: off
SETTINGS: tuple[Setting, ...] = (
    S("cloud", STR, None, "SPECTHINK_CLOUD", host_port,
      "cloud address host:port (or grpc:// / grpcs:// as the cloud prints it)"),
    S("api_key", STR, None, "SPECTHINK_API_KEY", None, "API key for the cloud", secret=True),
    S("model", STR, None, "SPECTHINK_MODEL", None, "GGUF file or installed model name"),
    S("max_tokens", INT, 2048, "SPECTHINK_MAX_TOKENS", between(1, 131072), "answer token limit"),
    S("temperature", FLOAT, 0.6, "SPECTHINK_TEMPERATURE", between(0, 2), "sampling temperature"),
    S("top_p", FLOAT, 0.95, "SPECTHINK_TOP_P", between(0, 1, lo_open=True), "nucleus sampling"),
    S("top_k", INT, 50, "SPECTHINK_TOP_K", between(0, 1000), "top-k sampling (0 = off)"),
    S("seed", INT, None, "SPECTHINK_SEED", between(0, 2**32 - 1), "sampling seed"),
    S("mode", choice("auto", "reasoning", "non-reasoning"), "auto", "SPECTHINK_MODE", None,
      "reasoning or not (auto: what fits the model)"),
    S("strategy", choice(*Strategy), Strategy.SPECULATIVE.value, "SPECTHINK_STRATEGY",
      None, "who writes the answer"),
    S("policy_file", PATH, None, "SPECTHINK_POLICY_FILE", None, "takeover policy overrides"),
    S("gpu_layers", INT, _default_gpu_layers, "SPECTHINK_GPU_LAYERS", between(-1, None),
      "layers offloaded to the GPU (-1 = all)"),
    S("threads", INT, None, "SPECTHINK_THREADS", between(1, 1024),
      "llama.cpp threads (unset = physical cores)"),
    S("context_length", INT, 8192, "SPECTHINK_CONTEXT_LENGTH", between(1, 2**20),
      "edge model context window"),
    S("connect_timeout_s", FLOAT, 3.0, "SPECTHINK_CONNECT_TIMEOUT", between(0, None, lo_open=True),
      "seconds to reach the cloud"),
    S("takeover_timeout_s", FLOAT, 30.0, "SPECTHINK_TAKEOVER_TIMEOUT",
      between(0, None, lo_open=True), "seconds for one cloud takeover"),
    S("first_chunk_timeout_s", FLOAT, 5.0, "SPECTHINK_FIRST_CHUNK_TIMEOUT", between(0, None),
      "seconds without a first word before asking if the cloud is alive (0 = off)"),
    S("stall_timeout_s", FLOAT, 5.0, "SPECTHINK_STALL_TIMEOUT", between(0, None),
      "seconds of silence from a writing cloud before the edge goes on (0 = off)"),
    S("tls", BOOL, False, "SPECTHINK_TLS", None, "use TLS to the cloud"),
    S("tls_ca_file", PATH, None, "SPECTHINK_TLS_CA", None, "CA bundle for the cloud's cert"),
    S("tls_cert_file", PATH, None, "SPECTHINK_TLS_CERT", None, "client certificate (mTLS)"),
    S("tls_key_file", PATH, None, "SPECTHINK_TLS_KEY", None, "client key (mTLS)"),
    S("models_dir", PATH, None, "SPECTHINK_MODELS_DIR", None, "local model store"),
)
# fmt: on
del S
_BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}

Source = str  # "flag", "env SPECTHINK_X", "file /path/config.toml", "default"


# --------------------------------------------------------------------------- result


class EffectiveConfig:
    """The resolved settings: ``cfg.temperature``, ``cfg.source("temperature")``, ``cfg.rows()``.

    Read-only. The annotations below only give type checkers the attribute types; values
    live in one dict filled from :data:`SETTINGS` (checked to match at import).
    """

    cloud: str | None
    api_key: str | None
    model: str | None
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    mode: Literal["auto", "reasoning", "non-reasoning"]
    strategy: Strategy
    policy_file: str | None
    gpu_layers: int
    threads: int | None
    context_length: int
    connect_timeout_s: float
    takeover_timeout_s: float
    first_chunk_timeout_s: float
    stall_timeout_s: float
    tls: bool
    tls_ca_file: str | None
    tls_cert_file: str | None
    tls_key_file: str | None
    models_dir: str | None

    __slots__ = ("_sources", "_values", "config_file", "config_file_exists")

    def __init__(
        self,
        values: Mapping[str, object],
        sources: Mapping[str, Source],
        config_file: Path,
        config_file_exists: bool,
    ) -> None:
        missing = set(_BY_NAME) - set(values)
        if missing:
            raise ValueError(f"missing settings: {sorted(missing)}")
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_sources", dict(sources))
        object.__setattr__(self, "config_file", config_file)
        object.__setattr__(self, "config_file_exists", config_file_exists)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("EffectiveConfig is read-only")

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={_display(_BY_NAME[n], v)!r}" for n, v in self._values.items())
        return f"EffectiveConfig({inner})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EffectiveConfig):
            return NotImplemented
        return self._values == other._values and self._sources == other._sources

    __hash__ = None  # type: ignore[assignment]

    def source(self, name: str) -> Source:
        """Where ``name`` came from: "flag", "env SPECTHINK_X", "file /path", or "default"."""
        if name not in _BY_NAME:
            raise KeyError(f"unknown setting {name!r}")
        return self._sources[name]

    def as_dict(self) -> dict[str, object]:
        """Every setting's value (the API key in full: for code, not for display)."""
        return dict(self._values)

    def rows(self) -> list[tuple[str, str, str]]:
        """``(name, display value, source)`` per setting, the API key masked."""
        return [
            (s.name, _display(s, self._values[s.name]), self._sources[s.name]) for s in SETTINGS
        ]


def mask_secret(secret: str) -> str:
    """``****`` plus the last 4 characters; only ``****`` when that would reveal half or more."""
    return "****" + secret[-4:] if len(secret) >= 8 else "****"


def _display(s: Setting, v: object) -> str:
    if v is None:
        if s.name == "threads":
            return f"auto ({auto_threads()})"
        return "-"
    if s.secret:
        return mask_secret(str(v))
    if isinstance(v, bool):
        return "true" if v else "false"
    if s.name == "gpu_layers" and v == -1:
        return "-1 (all)"
    return str(v)


def json_value(s: Setting, v: object) -> object:
    if s.secret and v is not None:
        return mask_secret(str(v))
    return v


_annotated = set(EffectiveConfig.__annotations__)
if _annotated != set(_BY_NAME):  # pragma: no cover - guards edits to the table
    raise AssertionError(
        f"EffectiveConfig annotations differ from SETTINGS: {_annotated ^ set(_BY_NAME)}"
    )


# --------------------------------------------------------------------------- resolving


def config_file_path(env: Mapping[str, str] | None = None) -> tuple[Path, bool]:
    """The config file's path, and whether it was named explicitly (``$SPECTHINK_CONFIG``)."""
    env = os.environ if env is None else env
    named = env.get(CONFIG_ENV, "").strip()
    if named:
        return Path(named).expanduser(), True
    return Path(typer.get_app_dir("specthink")) / "config.toml", False


def _read_file(path: Path, explicit: bool, env_named: bool) -> dict[str, tuple[str, object]]:
    """``{setting name: (key as written, raw value)}`` from the TOML file; {} if none."""
    where = f"{CONFIG_ENV}={path}" if env_named else str(path)
    if not path.exists():
        if explicit:
            raise ConfigError(f"{where}: no such config file")
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read: {exc}") from None

    out: dict[str, tuple[str, object]] = {}

    def take(table: Mapping[str, object], prefix: str) -> None:
        for key, value in table.items():
            if not prefix and key == "edge":
                continue
            shown = prefix + key
            name = key.replace("-", "_")
            if name not in _BY_NAME:
                hint = difflib.get_close_matches(name, list(_BY_NAME), n=1)
                tip = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise ConfigError(f"{path}: unknown key '{shown}'{tip}")
            if name in out:
                raise ConfigError(f"{path}: '{shown}' set twice (as '{out[name][0]}' too)")
            out[name] = (shown, value)

    take(data, "")
    edge = data.get("edge")
    if edge is not None:
        if not isinstance(edge, dict):
            raise ConfigError(f"{path}: 'edge' must be a table ([edge])")
        take(edge, "edge.")
    return out


def _finish(s: Setting, value: object, base: Path | None) -> object:
    """Check the typed value; expand ``~`` in paths (relative file paths join ``base``)."""
    if s.check is not None:
        s.check(value)
    if s.kind is PATH and isinstance(value, str):
        p = Path(value).expanduser()
        if base is not None and not p.is_absolute():
            p = base / p
        return str(p)
    return value


def resolve(
    flags: Mapping[str, object | None],
    env: Mapping[str, str] | None = None,
    config_path: Path | None = None,
) -> EffectiveConfig:
    """Resolve every setting: flag (not None) > env (non-empty) > config file > default.

    ``flags`` keys are setting names; an unknown key is a programming error (ValueError).
    ``env`` defaults to ``os.environ``; ``config_path`` to :func:`config_file_path`. Raises
    :class:`ConfigError` for anything a user can fix.
    """
    unknown = set(flags) - set(_BY_NAME)
    if unknown:
        raise ValueError(f"unknown setting(s) in flags: {sorted(unknown)}")
    env = os.environ if env is None else env
    env_named = False
    if config_path is None:
        config_path, env_named = config_file_path(env)
        explicit = env_named
    else:
        config_path, explicit = Path(config_path).expanduser(), True
    file_values = _read_file(config_path, explicit, env_named)
    file_source = f"file {config_path}"

    values: dict[str, object] = {}
    sources: dict[str, Source] = {}
    for s in SETTINGS:
        flag = flags.get(s.name)
        raw_env = env.get(s.env, "")
        loc = ""
        raw: object = None
        try:
            if flag is not None:
                loc, sep, raw, source = s.flag, "=", flag, "flag"
                value = _finish(s, s.kind.value(flag), None)
            elif raw_env.strip():
                loc, sep, raw, source = s.env, "=", raw_env, f"env {s.env}"
                value = _finish(s, s.kind.text(raw_env), None)
            elif s.name in file_values:
                key, raw = file_values[s.name]
                loc, sep, source = f"{config_path}: {key}", " = ", file_source
                value = _finish(s, s.kind.value(raw), config_path.parent)
            else:
                source, value = "default", s.default_value()
        except BadValue as exc:
            shown = mask_secret(str(raw)) if s.secret else _raw_repr(raw, sep)
            raise ConfigError(f"{loc}{sep}{shown}: {s.name} {exc}") from None
        values[s.name], sources[s.name] = value, source

    for a, b in (("tls_cert_file", "tls_key_file"), ("tls_key_file", "tls_cert_file")):
        if values[a] is not None and values[b] is None:
            raise ConfigError(
                f"{a} is set ({sources[a]}) but {b} is not: a client certificate needs its key"
            )
    return EffectiveConfig(values, sources, config_path, config_path.is_file())


def _raw_repr(v: object, sep: str) -> str:
    """A raw value as the user wrote it: env/flag text as is, file values TOML-like."""
    if sep == "=":
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, dict):
        return "{...}"
    return repr(v)
