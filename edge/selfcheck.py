"""Does the installed llama.cpp runtime decode on this CPU? Run by scripts/install.sh and by
`specthink-edge doctor`.

A llama.cpp build can load a model and then die in its first `llama_decode` (a native build
on a CPU with AMX did: SIGSEGV). A crash cannot be caught in-process, so the decode runs in a
child process and the parent turns its death into one line that says what failed and how to
rebuild. The decode itself is edge/drafter.py's (the one module importing llama_cpp).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

DECODE_TOKENS = 4
REBUILD_HINT = (
    "rebuild it with: rm -rf ~/.cache/specthink/wheels && make install "
    "(or set CMAKE_ARGS, e.g. CMAKE_ARGS='-DGGML_NATIVE=OFF', before it)"
)


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    message: str  # one line for a person
    system_info: str = ""


def child_command(model: str) -> list[str]:
    return [sys.executable, "-m", "edge.selfcheck", "--child", model]


def run_check(command: Sequence[str], timeout_s: float = 300.0) -> CheckResult:
    """Run the decode in `command` (a child process) and judge how it ended."""
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return CheckResult(
            False,
            f"llama.cpp did not decode {DECODE_TOKENS} tokens within "
            f"{timeout_s:g} s; {REBUILD_HINT}",
        )
    info = next((ln for ln in done.stdout.splitlines() if ln.startswith("system_info: ")), "")
    info = info.removeprefix("system_info: ")
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        return CheckResult(
            False,
            f"llama.cpp crashed ({name}) decoding {DECODE_TOKENS} tokens with the bundled model; "
            f"this build does not run on this CPU; {REBUILD_HINT}",
            info,
        )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return CheckResult(False, f"llama.cpp could not decode: {last}", info)
    decoded = next((ln for ln in done.stdout.splitlines() if ln.startswith("decoded: ")), "")
    return CheckResult(True, f"llama.cpp decodes on this CPU ({decoded or 'ok'})", info)


def check_runtime(model: str) -> CheckResult:
    return run_check(child_command(model))


def _child(model: str) -> int:
    from edge.drafter import decode_probe, system_info

    print("system_info: " + system_info(), flush=True)
    decoded, took = decode_probe(model, DECODE_TOKENS)
    print(f"decoded: {decoded} tokens in {took:.2f} s", flush=True)
    return 0 if decoded == DECODE_TOKENS else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--child"]:
        return _child(args[1])
    from edge import bundled

    default = bundled.default_edge_model()
    if default is None:
        print(f"install: cannot check llama.cpp: {bundled.SMOLLM2.install_hint}", file=sys.stderr)
        return 1
    model = str(default)
    result = check_runtime(model)
    if result.system_info:
        print(f"install: llama.cpp built with: {result.system_info}", file=sys.stderr)
    print(f"install: {result.message}", file=sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
