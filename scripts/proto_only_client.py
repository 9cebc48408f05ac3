"""A SpecThink client built from proto/ alone: N sessions take over at once, with timings.

    .venv/bin/python -m scripts.proto_only_client --address 127.0.0.1:50051 --sessions 8

It imports nothing of this project: it compiles proto/specthink/v1/specthink.proto with
grpcio-tools into a temporary folder and calls the generated stub, as an app in another
code base would (see docs/api.md). Each session has its own session id, sends its full
text, takes over `--tokens` tokens `--rounds` times, appending a stretch of text of its
own between takeovers, and ends its session. Prints one JSON object: every takeover's
latency and usage, the wall time and the aggregate tokens/s. The benchmark's concurrency
section runs it to check that a client of the wire contract alone sees the same gain.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

PROTO = Path(__file__).resolve().parents[1] / "proto" / "specthink" / "v1" / "specthink.proto"
OPENING = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the "
    "steps as his father had taught him. There were one hundred and twelve of them."
)
STRETCHES = (
    " The wind rose in the night and rattled the windows of the lamp room.",
    " By morning the sea was calm again, grey and flat as a slate.",
    " A fishing boat came in with its nets torn and its crew exhausted.",
)


def compile_stubs(folder: Path) -> tuple[Any, Any]:
    """(specthink_pb2, specthink_pb2_grpc) generated from the .proto into `folder`."""
    from grpc_tools import protoc

    rc = protoc.main(
        [
            "protoc",
            f"-I{PROTO.parent}",
            f"--python_out={folder}",
            f"--grpc_python_out={folder}",
            str(PROTO),
        ]
    )
    if rc != 0:
        raise RuntimeError(f"protoc failed ({rc})")
    sys.path.insert(0, str(folder))
    return importlib.import_module("specthink_pb2"), importlib.import_module("specthink_pb2_grpc")


def run(address: str, sessions: int, rounds: int, tokens: int, tag: str) -> dict[str, Any]:
    import grpc

    with tempfile.TemporaryDirectory() as tmp:
        pb, pb_grpc = compile_stubs(Path(tmp))
    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(sessions)
    errors: list[str] = []

    def one(i: int) -> None:
        channel = grpc.insecure_channel(address)
        stub = pb_grpc.SpecThinkStub(channel)
        session = f"proto-{tag}-{i}"
        text = f"({i}) {OPENING}"
        messages = [pb.ChatMessage(role="user", content="Continue the story.")]
        try:
            grpc.channel_ready_future(channel).result(timeout=30)
            barrier.wait(timeout=60)
            for r in range(rounds):
                request = pb.TakeoverRequest(
                    session_id=session,
                    full=pb.FullText(messages=messages, assistant_text=text),
                    sampling=pb.Sampling(temperature=0.0, top_p=1.0, top_k=0),
                    write=pb.WriteSpec(max_tokens=tokens),
                )
                started = time.perf_counter()
                written = ""
                for event in stub.Takeover(request, timeout=900):
                    if event.HasField("chunk"):
                        written += event.chunk.text
                    else:
                        done = event.done
                ended = time.perf_counter()
                with lock:
                    records.append(
                        {
                            "session": i,
                            "round": r,
                            "started": started,
                            "ended": ended,
                            "latency_s": ended - started,
                            "generated": done.usage.generated_tokens,
                            "prefilled": done.usage.prefilled_tokens,
                            "queue_s": done.timings.queue_s,
                        }
                    )
                text += written + STRETCHES[(i + r) % len(STRETCHES)]
            stub.EndSession(pb.EndSessionRequest(session_id=session), timeout=30)
        except Exception as exc:  # reported, never hidden
            with lock:
                errors.append(f"session {i}: {type(exc).__name__}: {exc}")
        finally:
            channel.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(x["ended"] for x in records) - min(x["started"] for x in records) if records else 0.0
    generated = sum(x["generated"] for x in records)
    return {
        "sessions": sessions,
        "rounds": rounds,
        "tokens": tokens,
        "takeovers": len(records),
        "generated": generated,
        "wall_s": wall,
        "aggregate_tok_s": generated / wall if wall else 0.0,
        "records": records,
        "errors": errors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--tag", default=str(time.monotonic_ns()))
    args = parser.parse_args(argv)
    result = run(args.address, args.sessions, args.rounds, args.tokens, args.tag)
    print(json.dumps(result))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
