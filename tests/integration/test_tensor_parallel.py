"""`serve --tensor-parallel 2` on CPU (and on 2 GPUs where there are): torchrun starts two
processes (gloo on CPU, NCCL on CUDA), each holds half of Qwen2.5-Coder-0.5B (transformers'
tensor-parallel plan; SmolLM2's 9 heads do not split in two), rank 0 serves gRPC on
127.0.0.1 and the other rank replays its engine calls.

Greedy text over real gRPC equals the one-process engine's on the same prompt (alone,
after a delta on a cached session, and two takeovers decoded in one batch), and at exit
both ranks report the same engine calls, step for step."""

from __future__ import annotations

import gc
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edge import bundled
from shared.rpc import specthink_pb2 as pb
from shared.wire import Message
from tests.conftest import BIN, MODELS_DIR, REPO
from tests.integration.cloud_harness import delta_request, full_request, stub

pytestmark = [pytest.mark.real_models, pytest.mark.timeout(240)]

TOKENS = 16
QUESTIONS = ("What is 7*8?", "Name the capital of France.")


@pytest.fixture(scope="module")
def qwen05() -> Path:
    try:
        return bundled.ensure(bundled.QWEN25_CODER_05B, MODELS_DIR)
    except bundled.BundledModelError as exc:
        pytest.fail(f"{exc} (scripts/install.sh installs the test models)")


def _two_gpus() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.device_count() >= 2)


def _greedy_alone(model: Path, cache_dir: Path, device: str) -> dict[tuple[str, str], str]:
    """The one-process engine's greedy text for each (question, assistant text) used below."""
    pytest.importorskip("torch")
    from cloud.engine import TransformersEngine
    from tests.integration.engine_calls import GREEDY, generate, release

    engine = TransformersEngine.load(
        str(model), device=device, cache_dir=cache_dir, dtype="float32"
    )
    texts: dict[tuple[str, str], str] = {}

    def write(question: str, assistant_text: str) -> str:
        *_, done = generate(
            engine, "ref", [Message("user", question)], assistant_text, TOKENS, GREEDY
        )
        texts[(question, assistant_text)] = done.text
        return str(done.text)

    for question in QUESTIONS:
        first = write(question, "")
        write(question, first + "\n\nIn short:")
    release(engine)
    return texts  # the engine goes with this frame


def _takeover(address: str, request: pb.TakeoverRequest) -> str:
    request.sampling.temperature = 0.0
    _, api = stub(address)
    events = list(api.Takeover(request, timeout=120))
    assert events[-1].WhichOneof("event") == "done"
    return "".join(e.chunk.text for e in events[:-1])


def _calls(stderr: str, who: str) -> str:
    match = re.search(rf"rank {who}: (?:rank 0 closed; calls run|calls sent): (.*)", stderr)
    assert match, f"no call summary for rank {who}:\n{stderr[-3000:]}"
    return match.group(1).strip()


# gloo on CPU everywhere; NCCL where a machine has 2+ GPUs (the device check's)
@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if _two_gpus() else [])])
def test_two_ranks_write_the_one_process_greedy_text_in_lockstep(
    qwen05: Path, engine_cache_dir: Path, tmp_path: Path, device: str
) -> None:
    expected = _greedy_alone(qwen05, engine_cache_dir, device)
    gc.collect()
    stderr_path = tmp_path / "torchrun.err"
    process = subprocess.Popen(
        [
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "cloud.cli",
            "serve",
            "--tensor-parallel",
            "2",
            "--model",
            str(qwen05),
            "--port",
            "0",
            "--device",
            device,
            "--dtype",
            "float32",
            "--max-running",
            "2",
            "--max-cache-bytes",
            str(256 << 20),
            "--cache-dir",
            str(engine_cache_dir),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=stderr_path.open("w"),
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        start_new_session=True,  # the test ends the whole job, torchrun and its ranks
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"listening on grpc://(\S+)", line)
        assert match, f"did not serve: {line!r}\n{stderr_path.read_text()[-3000:]}"
        address = match.group(1)

        # one takeover, then a delta on its cached session
        for i, question in enumerate(QUESTIONS[:1]):
            first = _takeover(address, full_request(f"a{i}", user=question, max_tokens=TOKENS))
            assert first == expected[(question, "")]
            ours = "\n\nIn short:"
            more = _takeover(address, delta_request(f"a{i}", first, ours, max_tokens=TOKENS))
            assert more == expected[(question, first + ours)]

        # two takeovers at once: decoded together, one batched forward per step
        def one_of_two(i: int) -> str:
            request = full_request(f"b{i}", user=QUESTIONS[i], max_tokens=TOKENS)
            return _takeover(address, request)

        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(one_of_two, range(len(QUESTIONS))))
        assert got == [expected[(q, "")] for q in QUESTIONS]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # torchrun passes it on; rank 0 drains
        process.wait(timeout=60)
    stderr = stderr_path.read_text()
    assert "drained, bye" in stderr
    assert _calls(stderr, "0") == _calls(stderr, "1")
    assert re.search(r"decode \d+", _calls(stderr, "0"))


def test_tensor_parallel_without_torchrun_says_how_to_launch() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    out = subprocess.run(
        [sys.executable, "-m", "cloud.cli", "serve", "--model", "m.gguf", "--tensor-parallel", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "torchrun --nproc-per-node 2 -m cloud.cli serve --tensor-parallel 2" in lines[0]
