"""Call the SpecThink cloud directly over gRPC from an app: no edge model needed.

    python examples/app_client.py --cloud 127.0.0.1:50051 [--api-key KEY] "Your question"

It asks what model serves (GetModelInfo), has the cloud write the start of an answer
from the full conversation (a Takeover with `full`), then appends a line of the app's own
and has the cloud go on from there, sending only the new text (a Takeover with `delta`
against the text the cloud confirmed). Each takeover streams text chunks, then one final
message with the finish reason, token usage and the committed text's length and SHA-256.
See docs/api.md for every field and status code.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import uuid

import grpc

from shared.rpc import specthink_pb2 as pb
from shared.rpc import specthink_pb2_grpc as rpc


def digest(text: str) -> tuple[int, str]:
    """How a delta names its base: length in code points, SHA-256 of the UTF-8 bytes."""
    return len(text), hashlib.sha256(text.encode("utf-8")).hexdigest()


def stream(
    stub: rpc.SpecThinkStub, request: pb.TakeoverRequest, metadata: list[tuple[str, str]]
) -> tuple[str, pb.TakeoverDone]:
    """Run one takeover, printing chunks as they arrive; the text and the final message."""
    text, done = "", None
    for event in stub.Takeover(request, metadata=metadata, timeout=120):
        if event.WhichOneof("event") == "chunk":
            text += event.chunk.text
            print(event.chunk.text, end="", flush=True)
        else:
            done = event.done
    print()
    assert done is not None
    return text, done


def ask(address: str, question: str, api_key: str | None = None, max_tokens: int = 48) -> str:
    """The whole example; returns the answer text the cloud and the app wrote."""
    session = uuid.uuid4().hex  # any 1-128 chars of [A-Za-z0-9._:-]; private to your key
    metadata = [("x-session-id", session)]  # lets a gateway keep the session on one replica
    if api_key:
        metadata.append(("authorization", f"Bearer {api_key}"))
    with grpc.insecure_channel(address) as channel:  # grpc.secure_channel(...) for TLS
        stub = rpc.SpecThinkStub(channel)

        info = stub.GetModelInfo(pb.ModelInfoRequest(), metadata=metadata, timeout=10)
        print(
            f"# {info.model_id} ({info.tokenizer}), context {info.context_length}, "
            f"at most {info.max_tokens_per_takeover} tokens per takeover",
            file=sys.stderr,
        )

        # 1. Full text: the conversation and the assistant text so far (empty: start it).
        first = pb.TakeoverRequest(
            session_id=session,
            full=pb.FullText(
                messages=[pb.ChatMessage(role="user", content=question)], assistant_text=""
            ),
            sampling=pb.Sampling(temperature=0.0),  # greedy
            write=pb.WriteSpec(max_tokens=max_tokens, stop=["\n\n"]),
        )
        written, done = stream(stub, first, metadata)
        answer = written
        assert (done.committed_length, done.committed_sha256) == digest(answer)
        print(
            f"# finish={pb.FinishReason.Name(done.finish_reason)} "
            f"prompt={done.usage.prompt_tokens} generated={done.usage.generated_tokens}",
            file=sys.stderr,
        )

        # 2. Delta: append the app's own text to what the cloud confirmed, send only that.
        ours = "\n\nIn short:"
        length, sha = done.committed_length, done.committed_sha256
        second = pb.TakeoverRequest(
            session_id=session,
            delta=pb.TextDelta(base_length=length, base_sha256=sha, append=ours),
            sampling=pb.Sampling(temperature=0.0),
            write=pb.WriteSpec(max_tokens=max_tokens),
        )
        try:
            written, done = stream(stub, second, metadata)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            # the cloud lost the session (restart, eviction, another replica): resend all
            second.full.CopyFrom(first.full)
            second.full.assistant_text = answer + ours
            written, done = stream(stub, second, metadata)
        answer += ours + written
        print(
            f"# finish={pb.FinishReason.Name(done.finish_reason)} "
            f"cached={done.usage.cached_tokens} prefilled={done.usage.prefilled_tokens} "
            f"generated={done.usage.generated_tokens}",
            file=sys.stderr,
        )

        stub.EndSession(pb.EndSessionRequest(session_id=session), metadata=metadata, timeout=5)
    return answer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("question", nargs="?", default="Why is the sky blue?")
    parser.add_argument("--cloud", default=os.environ.get("SPECTHINK_CLOUD", "127.0.0.1:50051"))
    parser.add_argument("--api-key", default=os.environ.get("SPECTHINK_API_KEY"))
    args = parser.parse_args()
    try:
        ask(args.cloud, args.question, args.api_key)
    except grpc.RpcError as exc:
        print(f"app_client: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
