"""edge.config: precedence flag > env > file > default, error messages that name their source,
the [edge] table, API-key masking, address and bool parsing, and the `config show` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge import config
from edge.config import SETTINGS, ConfigError, resolve
from edge.config_cli import config_app

# One distinct (flag value, env text, file TOML literal, file value) per setting, so each
# layer's winner is recognisable. A setting added to SETTINGS without a row here fails
# test_every_setting_has_precedence_samples.
SAMPLES: dict[str, tuple[object, str, str, object]] = {
    "cloud": ("flag.example:1", "env.example:2", '"file.example:3"', "file.example:3"),
    "api_key": ("flag-key-0001", "env-key-0002", '"file-key-0003"', "file-key-0003"),
    "model": ("flag.gguf", "env.gguf", '"file.gguf"', "file.gguf"),
    "max_tokens": (100, "200", "300", 300),
    "temperature": (0.1, "0.2", "0.3", 0.3),
    "top_p": (0.5, "0.6", "0.7", 0.7),
    "top_k": (10, "20", "30", 30),
    "seed": (1, "2", "3", 3),
    "mode": ("non-reasoning", "non-reasoning", '"non-reasoning"', "non-reasoning"),
    "strategy": ("edge", "cloud", '"edge"', "edge"),
    "policy_file": ("/flag/p.toml", "/env/p.toml", '"/file/p.toml"', "/file/p.toml"),
    "gpu_layers": (7, "8", "9", 9),
    "threads": (3, "4", "5", 5),
    "context_length": (1024, "2048", "4096", 4096),
    "connect_timeout_s": (1.5, "2.5", "3.5", 3.5),
    "takeover_timeout_s": (10.0, "20.0", "40.0", 40.0),
    "first_chunk_timeout_s": (1.0, "2.0", "3.0", 3.0),
    "stall_timeout_s": (4.0, "6.0", "7.0", 7.0),
    "tls": (True, "yes", "true", True),
    "tls_ca_file": ("/flag/ca.pem", "/env/ca.pem", '"/file/ca.pem"', "/file/ca.pem"),
    "tls_cert_file": ("/flag/c.pem", "/env/c.pem", '"/file/c.pem"', "/file/c.pem"),
    "tls_key_file": ("/flag/k.pem", "/env/k.pem", '"/file/k.pem"', "/file/k.pem"),
    "models_dir": ("/flag/models", "/env/models", '"/file/models"', "/file/models"),
}
EXPECTED_FROM_ENV: dict[str, object] = {
    "max_tokens": 200, "temperature": 0.2, "top_p": 0.6, "top_k": 20, "seed": 2,
    "gpu_layers": 8, "threads": 4, "context_length": 2048, "connect_timeout_s": 2.5,
    "takeover_timeout_s": 20.0, "first_chunk_timeout_s": 2.0, "stall_timeout_s": 6.0,
    "tls": True,
}  # fmt: skip
# Settings that cannot be set alone: the companion is given as a flag.
COMPANION = {"tls_cert_file": "tls_key_file", "tls_key_file": "tls_cert_file"}

ENV_VAR = {s.name: s.env for s in SETTINGS}
DEFAULTS = {
    "cloud": None, "api_key": None, "model": None, "max_tokens": 2048, "temperature": 0.6,
    "top_p": 0.95, "top_k": 50, "seed": None, "mode": "auto", "strategy": "speculative",
    "policy_file": None, "threads": None, "context_length": 8192, "connect_timeout_s": 3.0,
    "takeover_timeout_s": 30.0, "first_chunk_timeout_s": 5.0, "stall_timeout_s": 5.0,
    "tls": False, "tls_ca_file": None, "tls_cert_file": None,
    "tls_key_file": None, "models_dir": None,
}  # fmt: skip


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def no_specthink_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Clear SPECTHINK_* from the real environment; point the default app dir at tmp."""
    import os

    for key in list(os.environ):
        if key.startswith("SPECTHINK_"):
            monkeypatch.delenv(key)
    app_dir = tmp_path / "appdir"
    monkeypatch.setattr(config.typer, "get_app_dir", lambda name: str(app_dir / name))
    return app_dir / "specthink" / "config.toml"


# --------------------------------------------------------------------------- defaults


def test_defaults_when_nothing_is_set(no_specthink_env: Path) -> None:
    cfg = resolve({}, env={})
    for name, value in DEFAULTS.items():
        assert getattr(cfg, name) == value, name
        assert cfg.source(name) == "default"
    assert cfg.gpu_layers in (0, -1)
    assert cfg.source("gpu_layers") == "default"
    assert cfg.config_file == no_specthink_env
    assert cfg.config_file_exists is False


def test_default_config_file_is_read_from_the_app_dir(no_specthink_env: Path) -> None:
    no_specthink_env.parent.mkdir(parents=True)
    no_specthink_env.write_text("top_k = 7\n")
    cfg = resolve({}, env={})
    assert cfg.top_k == 7
    assert cfg.source("top_k") == f"file {no_specthink_env}"
    assert cfg.config_file_exists is True


@pytest.mark.parametrize(
    ("system", "machine", "expected"),
    [
        ("Darwin", "arm64", -1),
        ("Darwin", "x86_64", 0),
        ("Linux", "aarch64", 0),
        ("Linux", "x86_64", 0),
    ],
)
def test_gpu_layers_default_is_all_on_apple_silicon_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, system: str, machine: str, expected: int
) -> None:
    monkeypatch.setattr(config.platform, "system", lambda: system)
    monkeypatch.setattr(config.platform, "machine", lambda: machine)
    cfg = resolve({}, env={}, config_path=write(tmp_path, ""))
    assert cfg.gpu_layers == expected
    assert cfg.source("gpu_layers") == "default"


@pytest.mark.parametrize(("cpus", "threads"), [(16, 8), (8, 4), (3, 1), (2, 2), (1, 1), (None, 1)])
def test_auto_threads_is_half_the_logical_cpus(
    monkeypatch: pytest.MonkeyPatch, cpus: int | None, threads: int
) -> None:
    monkeypatch.setattr(config.os, "cpu_count", lambda: cpus)
    assert config.auto_threads() == threads


# --------------------------------------------------------------------------- precedence


def test_every_setting_has_precedence_samples() -> None:
    assert set(SAMPLES) == {s.name for s in SETTINGS}


@pytest.mark.parametrize("layers", ["flag+env+file", "env+file", "file", "none"])
@pytest.mark.parametrize("name", list(SAMPLES))
def test_precedence_flag_beats_env_beats_file_beats_default(
    tmp_path: Path, name: str, layers: str
) -> None:
    flag, env_text, file_literal, file_value = SAMPLES[name]
    flags: dict[str, object | None] = {n: None for n in SAMPLES}
    env: dict[str, str] = {}
    file_text = ""
    if "flag" in layers:
        flags[name] = flag
    if "env" in layers:
        env[ENV_VAR[name]] = env_text
    if "file" in layers:
        file_text = f"{name} = {file_literal}\n"
    if name in COMPANION and layers != "none":
        flags[COMPANION[name]] = "/companion.pem"
    path = write(tmp_path, file_text)

    cfg = resolve(flags, env=env, config_path=path)

    expected: dict[str, tuple[object, str]] = {
        "flag+env+file": (flag, "flag"),
        "env+file": (EXPECTED_FROM_ENV.get(name, env_text), f"env {ENV_VAR[name]}"),
        "file": (file_value, f"file {path}"),
        "none": (DEFAULTS.get(name, cfg.gpu_layers), "default"),
    }
    value, source = expected[layers]
    assert getattr(cfg, name) == value
    assert cfg.source(name) == source
    # Every other setting is untouched by this one's layers.
    for other in SAMPLES:
        if other not in (name, COMPANION.get(name)):
            assert cfg.source(other) == "default", other


def test_env_values_are_parsed_to_their_types(tmp_path: Path) -> None:
    env = {
        "SPECTHINK_MAX_TOKENS": " 512 ",
        "SPECTHINK_TEMPERATURE": "1",
        "SPECTHINK_MODE": "Non-Reasoning",
    }
    cfg = resolve({}, env=env, config_path=write(tmp_path, ""))
    assert cfg.max_tokens == 512 and type(cfg.max_tokens) is int
    assert cfg.temperature == 1.0 and type(cfg.temperature) is float
    assert cfg.mode == "non-reasoning"


def test_empty_env_value_counts_as_not_set(tmp_path: Path) -> None:
    path = write(tmp_path, 'cloud = "file.example:3"\n')
    cfg = resolve({}, env={"SPECTHINK_CLOUD": "", "SPECTHINK_TEMPERATURE": "  "}, config_path=path)
    assert cfg.cloud == "file.example:3"
    assert cfg.source("cloud") == f"file {path}"
    assert cfg.source("temperature") == "default"


def test_flags_are_validated_and_named_in_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        resolve({"temperature": 3.0}, env={}, config_path=write(tmp_path, ""))
    assert str(exc.value) == "--temperature=3.0: temperature must be between 0 and 2"


def test_unknown_flag_name_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="temprature"):
        resolve({"temprature": 1.0}, env={}, config_path=write(tmp_path, ""))


# --------------------------------------------------------------------------- env errors


@pytest.mark.parametrize(
    ("var", "text", "problem"),
    [
        ("SPECTHINK_TEMPERATURE", "abc", "temperature must be a number"),
        ("SPECTHINK_TEMPERATURE", "nan", "temperature must be a number"),
        ("SPECTHINK_TEMPERATURE", "2.5", "temperature must be between 0 and 2"),
        ("SPECTHINK_TOP_P", "0", "top_p must be in (0, 1]"),
        ("SPECTHINK_TOP_P", "1.01", "top_p must be in (0, 1]"),
        ("SPECTHINK_TOP_K", "1001", "top_k must be between 0 and 1000"),
        ("SPECTHINK_MAX_TOKENS", "1.5", "max_tokens must be an integer"),
        ("SPECTHINK_MAX_TOKENS", "0", "max_tokens must be between 1 and 131072"),
        ("SPECTHINK_MAX_TOKENS", "131073", "max_tokens must be between 1 and 131072"),
        ("SPECTHINK_GPU_LAYERS", "-2", "gpu_layers must be >= -1"),
        ("SPECTHINK_CONNECT_TIMEOUT", "0", "connect_timeout_s must be > 0"),
        ("SPECTHINK_TAKEOVER_TIMEOUT", "inf", "takeover_timeout_s must be > 0"),
        ("SPECTHINK_MODE", "fast", "mode must be one of auto, reasoning, non-reasoning"),
        ("SPECTHINK_STRATEGY", "both", "strategy must be one of speculative, edge, cloud"),
        ("SPECTHINK_TLS", "maybe", "tls must be one of 1/0/true/false/yes/no"),
    ],
)
def test_env_errors_name_the_variable_and_value(
    tmp_path: Path, var: str, text: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        resolve({}, env={var: text}, config_path=write(tmp_path, ""))
    assert str(exc.value) == f"{var}={text}: {problem}"


def test_env_error_does_not_reveal_the_api_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        resolve({"api_key": "   "}, env={}, config_path=write(tmp_path, ""))
    assert "api_key must not be empty" in str(exc.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", True), ("true", True), ("TRUE", True), ("yes", True), (" Yes ", True),
     ("0", False), ("false", False), ("False", False), ("no", False), ("NO", False)],
)  # fmt: skip
def test_bool_env_accepts_1_0_true_false_yes_no(tmp_path: Path, text: str, expected: bool) -> None:
    cfg = resolve({}, env={"SPECTHINK_TLS": text}, config_path=write(tmp_path, ""))
    assert cfg.tls is expected
    assert cfg.source("tls") == "env SPECTHINK_TLS"


@pytest.mark.parametrize("text", ["on", "off", "2", "y", "t"])
def test_bool_env_rejects_other_words(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match=rf"^SPECTHINK_TLS={text}: "):
        resolve({}, env={"SPECTHINK_TLS": text}, config_path=write(tmp_path, ""))


# --------------------------------------------------------------------------- cloud address


@pytest.mark.parametrize(
    "address",
    ["localhost:50051", "10.0.0.1:1", "[::1]:50051", "cloud.example.com:65535",
     "[fe80::1%eth0]:443", "my_host:8080"],
)  # fmt: skip
def test_valid_cloud_addresses_are_accepted(tmp_path: Path, address: str) -> None:
    cfg = resolve({}, env={"SPECTHINK_CLOUD": address}, config_path=write(tmp_path, ""))
    assert cfg.cloud == address


@pytest.mark.parametrize(
    "address",
    ["localhost", "localhost:0", "localhost:65536", "localhost:99999", "http://host:80",
     "::1:50051", "[nothost]:1", "host name:1", ":50051", "host:port", "host:80/path",
     "-bad-:80", "[::1]"],
)  # fmt: skip
def test_invalid_cloud_address_is_rejected(tmp_path: Path, address: str) -> None:
    with pytest.raises(ConfigError, match=r"^SPECTHINK_CLOUD=.*: cloud "):
        resolve({}, env={"SPECTHINK_CLOUD": address}, config_path=write(tmp_path, ""))
    with pytest.raises(ConfigError, match=r"^--cloud=.*: cloud "):
        resolve({"cloud": address}, env={}, config_path=write(tmp_path, ""))


# --------------------------------------------------------------------------- file


def test_edge_table_and_dashed_keys_are_read(tmp_path: Path) -> None:
    path = write(tmp_path, 'cloud = "c.example:9"\n[edge]\ntop-k = 5\nmax_tokens = 64\n')
    cfg = resolve({}, env={}, config_path=path)
    assert (cfg.cloud, cfg.top_k, cfg.max_tokens) == ("c.example:9", 5, 64)
    for name in ("cloud", "top_k", "max_tokens"):
        assert cfg.source(name) == f"file {path}"


def test_key_set_both_at_top_level_and_in_edge_table_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "top_k = 5\n[edge]\ntop-k = 6\n")
    with pytest.raises(ConfigError, match="set twice"):
        resolve({}, env={}, config_path=path)


@pytest.mark.parametrize("text", ["temprature = 0.5\n", "[edge]\ntemprature = 0.5\n"])
def test_unknown_file_key_is_rejected_with_a_suggestion(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        resolve({}, env={}, config_path=path)
    message = str(exc.value)
    assert message.startswith(f"{path}: unknown key '")
    assert "temprature'" in message
    assert "did you mean 'temperature'" in message


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('temperature = "hot"', "temperature must be a number"),
        ("max_tokens = 1.5", "max_tokens must be an integer"),
        ("top_k = true", "top_k must be an integer"),
        ('tls = "yes"', "tls must be true or false"),
        ("cloud = 50051", "cloud must be a string"),
        ("top_p = 0.0", "top_p must be in (0, 1]"),
        ('mode = "fast"', "mode must be one of auto, reasoning, non-reasoning"),
    ],
)
def test_file_errors_name_the_file_and_key(tmp_path: Path, line: str, problem: str) -> None:
    path = write(tmp_path, f"[edge]\n{line}\n")
    with pytest.raises(ConfigError) as exc:
        resolve({}, env={}, config_path=path)
    key = line.split(" =")[0]
    message = str(exc.value)
    assert message.startswith(f"{path}: edge.{key} = ")
    assert message.endswith(f": {problem}")
    assert "\n" not in message


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "temperature = = 1\n")
    with pytest.raises(ConfigError, match=rf"^{path}: invalid TOML: "):
        resolve({}, env={}, config_path=path)


def test_explicit_config_file_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=rf"^SPECTHINK_CONFIG={missing}: no such config file"):
        resolve({}, env={"SPECTHINK_CONFIG": str(missing)})


def test_relative_paths_in_file_are_relative_to_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'policy_file = "policy.toml"\nmodels_dir = "/abs/models"\n')
    cfg = resolve({}, env={}, config_path=path)
    assert cfg.policy_file == str(tmp_path / "policy.toml")
    assert cfg.models_dir == "/abs/models"


def test_client_cert_without_key_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tls_cert_file is set \(env SPECTHINK_TLS_CERT\)"):
        resolve({}, env={"SPECTHINK_TLS_CERT": "/c.pem"}, config_path=write(tmp_path, ""))


# --------------------------------------------------------------------------- masking

KEY = "sk-secret-value-9876"


def test_api_key_is_masked_in_rows_and_repr(tmp_path: Path) -> None:
    cfg = resolve({}, env={"SPECTHINK_API_KEY": KEY}, config_path=write(tmp_path, ""))
    assert cfg.api_key == KEY  # code gets the real key
    rows = {name: (value, source) for name, value, source in cfg.rows()}
    assert rows["api_key"] == ("****9876", "env SPECTHINK_API_KEY")
    assert KEY not in repr(cfg)
    assert all(KEY not in value for _, value, _ in cfg.rows())


@pytest.mark.parametrize(
    ("secret", "masked"), [("abcdefgh", "****efgh"), ("short", "****"), ("", "****")]
)
def test_short_secrets_are_masked_completely(secret: str, masked: str) -> None:
    assert config.mask_secret(secret) == masked


def test_rows_cover_every_setting_in_table_order(tmp_path: Path) -> None:
    cfg = resolve({}, env={}, config_path=write(tmp_path, ""))
    assert [r[0] for r in cfg.rows()] == [s.name for s in SETTINGS]


def test_effective_config_is_read_only(tmp_path: Path) -> None:
    cfg = resolve({}, env={}, config_path=write(tmp_path, ""))
    with pytest.raises(AttributeError):
        cfg.temperature = 1.0
    with pytest.raises(KeyError):
        cfg.source("nope")


# --------------------------------------------------------------------------- config show


def test_config_show_masks_key_and_names_sources(no_specthink_env: Path, tmp_path: Path) -> None:
    path = write(tmp_path, f'[edge]\napi_key = "{KEY}"\ntemperature = 0.9\n')
    result = CliRunner().invoke(
        config_app, ["show"], env={"SPECTHINK_CONFIG": str(path), "SPECTHINK_TOP_K": "12"}
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert KEY not in out
    lines = out.splitlines()
    header = lines[0].split()
    assert header == ["NAME", "VALUE", "SOURCE"]
    # Aligned columns: cut every row at the header's VALUE and SOURCE offsets.
    v, s = lines[0].index("VALUE"), lines[0].index("SOURCE")
    table = lines[1 : 1 + len(SETTINGS)]
    rows = {ln[:v].strip(): (ln[v:s].strip(), ln[s:]) for ln in table}
    assert list(rows) == [st.name for st in SETTINGS]
    assert all(ln[v - 2 : v] == "  " and ln[s - 2 : s] == "  " for ln in table)
    assert rows["api_key"] == ("****9876", f"file {path}")
    assert rows["temperature"] == ("0.9", f"file {path}")
    assert rows["top_k"] == ("12", "env SPECTHINK_TOP_K")
    assert rows["max_tokens"] == ("2048", "default")
    assert f"config file: {path} (exists)" in out


def test_config_show_json_masks_key(no_specthink_env: Path, tmp_path: Path) -> None:
    path = write(tmp_path, "")
    result = CliRunner().invoke(
        config_app,
        ["show", "--json"],
        env={"SPECTHINK_CONFIG": str(path), "SPECTHINK_API_KEY": KEY},
    )
    assert result.exit_code == 0, result.output
    assert KEY not in result.stdout
    doc = json.loads(result.stdout)
    assert doc["config_file"] == str(path)
    assert doc["config_file_exists"] is True
    assert doc["settings"]["api_key"] == {"value": "****9876", "source": "env SPECTHINK_API_KEY"}
    assert doc["settings"]["max_tokens"] == {"value": 2048, "source": "default"}
    assert set(doc["settings"]) == {s.name for s in SETTINGS}


def test_config_show_reports_a_missing_default_file(no_specthink_env: Path) -> None:
    result = CliRunner().invoke(config_app, ["show"])
    assert result.exit_code == 0, result.output
    assert f"config file: {no_specthink_env} (not found)" in result.stdout


def test_config_show_error_is_one_line_exit_2_no_traceback(
    no_specthink_env: Path, tmp_path: Path
) -> None:
    path = write(tmp_path, "temprature = 0.5\n")
    result = CliRunner().invoke(config_app, ["show"], env={"SPECTHINK_CONFIG": str(path)})
    assert result.exit_code == 2
    assert result.stdout == ""
    assert (
        result.stderr
        == f"specthink-edge: error: {path}: unknown key 'temprature' (did you mean 'temperature'?)\n"
    )
    assert "Traceback" not in result.output
