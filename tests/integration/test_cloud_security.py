"""Auth, per-key session isolation, TLS / mutual TLS and request validation, on a real
gRPC server on 127.0.0.1 with a scripted engine."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge.cloud_client import ClientOptions, GrpcCloud
from shared import errors
from shared.rpc import specthink_pb2 as pb
from shared.wire import FullText, Message, Sampling, TakeoverCall, TakeoverDone, WriteSpec
from tests.integration.cloud_harness import (
    ScriptedEngine,
    bearer,
    collect,
    delta_request,
    full_request,
    running_server,
    stub,
    write_key_file,
)

pytestmark = pytest.mark.timeout(60)

KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-fedcba9876543210"


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as failed:
        if hasattr(call, "__next__"):
            collect(call)  # type: ignore[arg-type]
        else:
            call()  # type: ignore[operator]
    return failed.value.code()


# ---- auth and isolation ---------------------------------------------------------------


def test_missing_or_wrong_key_is_unauthenticated_but_health_stays_open(tmp_path: Path) -> None:
    with running_server(api_key_file=write_key_file(tmp_path, KEY_A, KEY_B)) as server:
        channel, api = stub(server.address)
        assert _code(api.Takeover(full_request())) == grpc.StatusCode.UNAUTHENTICATED
        assert (
            _code(api.Takeover(full_request(), metadata=bearer("not-a-key-at-all-000")))
            == grpc.StatusCode.UNAUTHENTICATED
        )
        assert (
            _code(api.Takeover(full_request(), metadata=[("authorization", KEY_A)]))
            == grpc.StatusCode.UNAUTHENTICATED
        )  # no "Bearer" scheme
        assert (
            _code(lambda: api.GetModelInfo(pb.ModelInfoRequest()))
            == grpc.StatusCode.UNAUTHENTICATED
        )
        assert (
            _code(lambda: api.EndSession(pb.EndSessionRequest(session_id="x")))
            == grpc.StatusCode.UNAUTHENTICATED
        )
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            health.Check(health_pb2.HealthCheckRequest()).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        _text, done = collect(api.Takeover(full_request(), metadata=bearer(KEY_A)))
        assert done.usage.generated_tokens == 5


def test_one_key_cannot_read_extend_or_end_another_keys_session(tmp_path: Path) -> None:
    with running_server(api_key_file=write_key_file(tmp_path, KEY_A, KEY_B)) as server:
        _, api = stub(server.address)
        secret = "A's secret working."
        text_a, _ = collect(api.Takeover(full_request("shared", secret), metadata=bearer(KEY_A)))
        held_by_a = secret + text_a
        with pytest.raises(grpc.RpcError) as refused:
            collect(api.Takeover(delta_request("shared", held_by_a, ""), metadata=bearer(KEY_B)))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert secret not in (refused.value.details() or "")
        ended = api.EndSession(pb.EndSessionRequest(session_id="shared"), metadata=bearer(KEY_B))
        assert ended.existed is False
        # B writing its own "shared" session leaves A's untouched
        text_b, done_b = collect(api.Takeover(full_request("shared", "B."), metadata=bearer(KEY_B)))
        assert secret not in text_b and done_b.committed_length == len("B." + text_b)
        collect(api.Takeover(delta_request("shared", held_by_a, " on"), metadata=bearer(KEY_A)))
        assert (
            api.EndSession(
                pb.EndSessionRequest(session_id="shared"), metadata=bearer(KEY_A)
            ).existed
            is True
        )


# ---- TLS ------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    d = tmp_path_factory.mktemp("certs")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=specthink-test-ca",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            cwd=d,
        )
    return d


def _creds(certs: Path, client_cert: bool) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        (certs / "ca.pem").read_bytes(),
        (certs / "client.key").read_bytes() if client_cert else None,
        (certs / "client.pem").read_bytes() if client_cert else None,
    )


def test_tls_serves_a_client_that_trusts_the_ca_and_refuses_plaintext(certs: Path) -> None:
    with running_server(tls_cert=certs / "server.pem", tls_key=certs / "server.key") as server:
        _, api = stub(server.address, _creds(certs, client_cert=False))
        assert api.GetModelInfo(pb.ModelInfoRequest(), timeout=5).model_id == "scripted-model"
        _, plain = stub(server.address)
        assert (
            _code(lambda: plain.GetModelInfo(pb.ModelInfoRequest(), timeout=2))
            == grpc.StatusCode.UNAVAILABLE
        )


def test_mutual_tls_refuses_a_client_without_a_certificate(certs: Path) -> None:
    with running_server(
        tls_cert=certs / "server.pem", tls_key=certs / "server.key", tls_client_ca=certs / "ca.pem"
    ) as server:
        _, anonymous = stub(server.address, _creds(certs, client_cert=False))
        assert (
            _code(lambda: anonymous.GetModelInfo(pb.ModelInfoRequest(), timeout=3))
            == grpc.StatusCode.UNAVAILABLE
        )
        _, api = stub(server.address, _creds(certs, client_cert=True))
        assert api.GetModelInfo(pb.ModelInfoRequest(), timeout=5).model_id == "scripted-model"


def test_edge_client_speaks_mutual_tls_with_an_api_key(certs: Path, tmp_path: Path) -> None:
    with running_server(
        tls_cert=certs / "server.pem",
        tls_key=certs / "server.key",
        tls_client_ca=certs / "ca.pem",
        api_key_file=write_key_file(tmp_path, KEY_A),
    ) as server:
        cloud = GrpcCloud(
            ClientOptions(
                address=f"localhost:{server.port}",
                api_key=KEY_A,
                tls=True,
                tls_ca_file=certs / "ca.pem",
                tls_cert_file=certs / "client.pem",
                tls_key_file=certs / "client.key",
            )
        )
        call = TakeoverCall(
            "edge-1",
            FullText((Message("user", "hi"),), ""),
            Sampling(temperature=0),
            WriteSpec(max_tokens=3),
        )
        events = list(cloud.takeover(call))
        assert isinstance(events[-1], TakeoverDone) and len(events) == 4
        cloud.close()


# ---- validation -----------------------------------------------------------------------


def _req(**changes: object) -> pb.TakeoverRequest:
    req = full_request("v", max_tokens=4)
    for path, value in changes.items():
        target: object = req
        *parents, leaf = path.split("__")
        for p in parents:
            target = getattr(target, p)
        field = getattr(target, leaf)
        if isinstance(value, list):
            del field[:]
            field.extend(value)  # type: ignore[attr-defined]
        else:
            setattr(target, leaf, value)
    return req


def _bad_roles() -> pb.TakeoverRequest:
    req = full_request("v")
    req.full.messages.add(role="tool", content="x")
    return req


def _no_messages() -> pb.TakeoverRequest:
    req = pb.TakeoverRequest(session_id="v")
    req.full.assistant_text = "x"
    req.write.max_tokens = 4
    return req


def _bad_sha() -> pb.TakeoverRequest:
    req = delta_request("v", "", "x")
    req.delta.base_sha256 = "ABC"
    return req


def _long_base() -> pb.TakeoverRequest:
    req = delta_request("v", "", "x")
    req.delta.base_length = 10**9
    return req


def _no_text() -> pb.TakeoverRequest:
    req = pb.TakeoverRequest(session_id="v")
    req.write.max_tokens = 4
    return req


BAD = [
    ("nan temperature", _req(sampling__temperature=float("nan")), "temperature"),
    ("inf temperature", _req(sampling__temperature=float("inf")), "temperature"),
    ("negative temperature", _req(sampling__temperature=-0.5), "temperature"),
    ("temperature above 2", _req(sampling__temperature=2.5), "temperature"),
    ("nan top_p", _req(sampling__top_p=float("nan")), "top_p"),
    ("negative top_p", _req(sampling__top_p=-0.1), "top_p"),
    ("top_p above 1", _req(sampling__top_p=1.5), "top_p"),
    ("top_k above 1000", _req(sampling__top_k=5000), "top_k"),
    ("zero max_tokens", _req(write__max_tokens=0), "max_tokens"),
    ("huge max_tokens", _req(write__max_tokens=2**32 - 1), "max_tokens"),
    ("huge continue_tokens", _req(write__continue_tokens=10**6), "continue_tokens"),
    ("too many stop strings", _req(write__stop=[f"s{i}" for i in range(9)]), "stop"),
    ("empty stop string", _req(write__stop=[""]), "stop"),
    ("long stop string", _req(write__stop=["x" * 65]), "stop"),
    ("too many keywords", _req(write__continue_if_contains=["k"] * 33), "continue_if"),
    ("long preamble", _req(write__preamble="p" * 513), "preamble"),
    ("empty session id", _req(session_id=""), "session_id"),
    ("session id with slash", _req(session_id="a/b"), "session_id"),
    ("session id with space", _req(session_id="a b"), "session_id"),
    ("session id too long", _req(session_id="s" * 129), "session_id"),
    ("bad sha", _bad_sha(), "base_sha256"),
    ("base longer than limit", _long_base(), "base_length"),
    ("oversize text", _req(full__assistant_text="x" * 400_001), "too long"),
    ("bad role", _bad_roles(), "role"),
    ("no messages", _no_messages(), "messages"),
    ("no text", _no_text(), "full or delta"),
]


@pytest.fixture(scope="module")
def plain_server():  # type: ignore[no-untyped-def]
    with running_server(ScriptedEngine()) as server:
        yield server


@pytest.mark.parametrize(("name", "request_", "mentions"), BAD, ids=[b[0] for b in BAD])
def test_bad_request_is_invalid_argument_naming_the_field(
    plain_server, name: str, request_: pb.TakeoverRequest, mentions: str
) -> None:
    _, api = stub(plain_server.address)
    with pytest.raises(grpc.RpcError) as bad:
        collect(api.Takeover(request_))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad.value.details()
    assert mentions in (bad.value.details() or "")


def test_invalid_utf8_is_invalid_argument_not_internal(plain_server) -> None:
    channel, _ = stub(plain_server.address)
    raw = channel.unary_stream(
        "/specthink.v1.SpecThink/Takeover",
        request_serializer=lambda b: b,
        response_deserializer=pb.TakeoverEvent.FromString,
    )
    # field 1 (session_id), length 2, bytes that are not UTF-8
    with pytest.raises(grpc.RpcError) as bad:
        list(raw(b"\x0a\x02\xff\xfe"))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in (bad.value.details() or "")
    unary = channel.unary_unary(
        "/specthink.v1.SpecThink/EndSession",
        request_serializer=lambda b: b,
        response_deserializer=pb.EndSessionResponse.FromString,
    )
    with pytest.raises(grpc.RpcError) as bad2:
        unary(b"\x0a\x03\xc3\x28\x41")
    assert bad2.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_message_over_the_grpc_limit_is_resource_exhausted(plain_server) -> None:
    _, api = stub(plain_server.address)
    huge = full_request("v", user="x" * (5 << 20))
    with pytest.raises(grpc.RpcError) as big:
        collect(api.Takeover(huge))
    assert big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_edge_client_reports_validation_as_invalid_request(plain_server) -> None:
    cloud = GrpcCloud(ClientOptions(address=plain_server.address))
    call = TakeoverCall("bad id!", FullText((Message("user", "hi"),), ""))
    with pytest.raises(errors.InvalidRequest, match="session_id"):
        list(cloud.takeover(call))
    cloud.close()
