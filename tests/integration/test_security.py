"""TLS, mutual TLS and bearer-token auth, with certificates made at run time (``cryptography``):
a plaintext client is refused by a TLS server, a client certificate from the wrong CA (or none)
is refused under mTLS, a wrong or missing token is UNAUTHENTICATED, the right ones are served,
and health checks need no token."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import AdaptiveClient, Unauthenticated, Unavailable
from client.process import SERVING as PROCESS_SERVING
from client.process import ServerProcess
from client.synthetic import SHAPE, cnn, plain, write_family
from server import security
from server.settings import ServeOptions
from tests.harness import RunningServer, serve_in_thread

TOKEN = "s3cret-token-0123456789"
SERVING_STATUS = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _issue(name: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None = None, *,
           ca: bool = False, server: bool = False) -> tuple[Pem, x509.Name,
                                                            ec.EllipticCurvePrivateKey]:
    """A P-256 certificate for ``name``, self-signed when ``issuer`` is None."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:  # the client checks the address it dialled against these
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    pem = Pem(cert.public_bytes(serialization.Encoding.PEM),
              key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()))
    return pem, subject, key


@dataclass(frozen=True)
class Pki:
    ca: Pem
    server: Pem
    client: Pem
    rogue_client: Pem  # signed by a CA the server does not trust
    dir: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, ca_name, ca_key = _issue("test CA", ca=True)
    server, _, _ = _issue("localhost", (ca_name, ca_key), server=True)
    client, _, _ = _issue("client", (ca_name, ca_key))
    _rogue_ca, rogue_name, rogue_key = _issue("rogue CA", ca=True)
    rogue_client, _, _ = _issue("client", (rogue_name, rogue_key))
    for label, pem in (("ca", ca), ("server", server)):
        (d / f"{label}.crt").write_bytes(pem.cert)
        (d / f"{label}.key").write_bytes(pem.key)
    (d / "token").write_text(TOKEN + "\n")
    return Pki(ca, server, client, rogue_client, d)


@pytest.fixture(scope="module")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cheap variant: these tests are about the transport, and it warms up in no time."""
    root = tmp_path_factory.mktemp("tiny") / "family"
    torch.manual_seed(0)
    return write_family(root, [plain(root, "fast", 0.9, cnn(2, 1), 0.03)], name="tiny")


def _serve(family: Path, pki: Pki, *, mtls: bool, token: bool) -> Iterator[RunningServer]:
    opts = ServeOptions(threads=1, tls_cert=str(pki.dir / "server.crt"),
                        tls_key=str(pki.dir / "server.key"),
                        tls_client_ca=str(pki.dir / "ca.crt") if mtls else None,
                        auth_token_file=str(pki.dir / "token") if token else None)
    with serve_in_thread(family, options=opts, metrics=False) as running:
        yield running


@pytest.fixture(scope="module")
def tls_server(tiny_family: Path, pki: Pki) -> Iterator[RunningServer]:
    yield from _serve(tiny_family, pki, mtls=False, token=False)


@pytest.fixture(scope="module")
def mtls_token_server(tiny_family: Path, pki: Pki) -> Iterator[RunningServer]:
    yield from _serve(tiny_family, pki, mtls=True, token=True)


X = np.zeros((1, *SHAPE), np.float32)


def test_tls_server_refuses_plaintext_and_serves_tls(tls_server: RunningServer, pki: Pki) -> None:
    with AdaptiveClient(tls_server.target, model="tiny") as plaintext:
        with pytest.raises(Unavailable):
            plaintext.infer(X, timeout=5)
        assert plaintext.health(timeout=5) == "UNREACHABLE"
    with AdaptiveClient(tls_server.target, model="tiny", root_certificates=pki.ca.cert) as c:
        assert c.health() == "SERVING"
        assert c.infer(X).variant == "fast"


def test_tls_client_refuses_a_server_it_does_not_trust(tls_server: RunningServer,
                                                       pki: Pki) -> None:
    with AdaptiveClient(tls_server.target, model="tiny",
                        root_certificates=pki.rogue_client.cert) as c, \
            pytest.raises(Unavailable):
        c.infer(X, timeout=5)


def test_mtls_refuses_missing_or_wrong_client_certificates(mtls_token_server: RunningServer,
                                                           pki: Pki) -> None:
    target = mtls_token_server.target
    with AdaptiveClient(target, model="tiny", root_certificates=pki.ca.cert, token=TOKEN) as c, \
            pytest.raises(Unavailable):
        c.infer(X, timeout=5)  # no client certificate
    with AdaptiveClient(target, model="tiny", root_certificates=pki.ca.cert,
                        client_cert=pki.rogue_client.cert, client_key=pki.rogue_client.key,
                        token=TOKEN) as c, pytest.raises(Unavailable):
        c.infer(X, timeout=5)  # a certificate from a CA the server does not trust
    with AdaptiveClient(target, model="tiny", root_certificates=pki.ca.cert,
                        client_cert=pki.client.cert, client_key=pki.client.key,
                        token=TOKEN) as c:
        assert c.infer(X).variant == "fast"


@pytest.mark.parametrize("token", [None, "wrong", TOKEN[:-1], TOKEN + "x", "Bearer " + TOKEN,
                                   TOKEN.upper()])
def test_missing_or_wrong_token_is_unauthenticated(mtls_token_server: RunningServer, pki: Pki,
                                                   token: str | None) -> None:
    with AdaptiveClient(mtls_token_server.target, model="tiny", root_certificates=pki.ca.cert,
                        client_cert=pki.client.cert, client_key=pki.client.key,
                        token=token) as c:
        with pytest.raises(Unauthenticated, match="bearer token"):
            c.infer(X, timeout=5)
        with pytest.raises(Unauthenticated):
            c.variants()
        assert c.health() == "SERVING"  # health is exempt: probes carry no secrets


def test_right_token_is_served_and_refusals_are_counted(mtls_token_server: RunningServer,
                                                        pki: Pki) -> None:
    registry = mtls_token_server.server.engine.metrics.registry
    before = registry.get_sample_value("adaptive_auth_failures_total")
    with AdaptiveClient(mtls_token_server.target, model="tiny", root_certificates=pki.ca.cert,
                        client_cert=pki.client.cert, client_key=pki.client.key,
                        token=TOKEN) as c:
        assert c.infer(X).variant == "fast"
        assert [v.name for v in c.variants()] == ["fast"]
    with grpc.secure_channel(mtls_token_server.target, grpc.ssl_channel_credentials(
            pki.ca.cert, pki.client.key, pki.client.cert)) as ch:
        reflection = ch.unary_unary("/grpc.reflection.v1alpha.ServerReflection/"
                                    "ServerReflectionInfo")
        with pytest.raises(grpc.RpcError) as info:  # only health is exempt
            reflection(b"", timeout=5)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert registry.get_sample_value("adaptive_auth_failures_total") == before + 1


def test_cli_health_and_infer_speak_tls_and_tokens(mtls_token_server: RunningServer, pki: Pki,
                                                   tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from client.cli import main as cli_main

    (tmp_path / "client.crt").write_bytes(pki.client.cert)
    (tmp_path / "client.key").write_bytes(pki.client.key)
    np.save(tmp_path / "x.npy", X)
    creds = ["--tls-ca", str(pki.dir / "ca.crt"), "--tls-cert", str(tmp_path / "client.crt"),
             "--tls-key", str(tmp_path / "client.key")]
    target = ["--target", mtls_token_server.target]
    assert cli_main(["health", *target, *creds]) == 0
    assert cli_main(["infer", *target, *creds, "--token-file", str(pki.dir / "token"),
                     str(tmp_path / "x.npy")]) == 0
    assert cli_main(["infer", *target, *creds, str(tmp_path / "x.npy")]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


# --- What a peer without the token can cost: nothing is read, listed or held for it -----------

def _secure(target: str, pki: Pki) -> grpc.Channel:
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(
        pki.ca.cert, pki.client.key, pki.client.cert))


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    code: grpc.StatusCode = info.value.code()
    return code


BEARER = (("authorization", f"Bearer {TOKEN}"),)


def test_without_the_token_no_method_can_be_told_from_another(mtls_token_server: RunningServer,
                                                              pki: Pki) -> None:
    with _secure(mtls_token_server.target, pki) as ch:
        unknown = ch.unary_unary("/no.Such/Method")
        unknown_in_known = ch.unary_unary("/inference.GRPCInferenceService/NoSuchMethod")
        watch = health_pb2_grpc.HealthStub(ch).Watch
        for call in (lambda: unknown(b"", timeout=5), lambda: unknown_in_known(b"", timeout=5),
                     lambda: next(watch(health_pb2.HealthCheckRequest(), timeout=5))):
            assert _code(call) is grpc.StatusCode.UNAUTHENTICATED
        # With the token the difference shows: the method does not exist.
        assert (_code(lambda: unknown(b"", timeout=5, metadata=BEARER))
                is grpc.StatusCode.UNIMPLEMENTED)
        # Check stays open: kubelet's gRPC probes carry no secrets.
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                    timeout=5).status == SERVING_STATUS


def _peak_rss_mib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("VmHWM:"))) // 1024


@pytest.fixture(scope="module")
def token_process(tiny_family: Path, pki: Pki) -> Iterator[tuple[ServerProcess, str]]:
    """A plaintext ``serve`` process with a token: its memory is its own to measure."""
    p = ServerProcess([str(tiny_family), "--port", "0", "--metrics-port", "-1", "--threads", "1",
                       "--auth-token-file", str(pki.dir / "token")])
    try:
        target = f"127.0.0.1:{p.port()}"
        p.wait_for(PROCESS_SERVING)
        yield p, target
    finally:
        p.stop()


def test_large_bodies_without_the_token_are_refused_unread(
        token_process: tuple[ServerProcess, str]) -> None:
    proc, target = token_process
    n, body = 6, b"\0" * (48 << 20)  # under --max-message-mb: only the token refuses them
    before = _peak_rss_mib(proc.proc.pid)
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", -1)]) as ch:
        infer = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        futures = [infer.future(body, timeout=60) for _ in range(n)]
        codes = {f.exception().code() for f in futures}  # type: ignore[union-attr]
    assert codes == {grpc.StatusCode.UNAUTHENTICATED}
    # Read in full (the old unary refusal) the six would have raised the peak by ~600 MiB.
    grown = _peak_rss_mib(proc.proc.pid) - before
    assert grown < 96, f"peak RSS grew {grown} MiB for {n} refused bodies of 48 MiB"
    with AdaptiveClient(target, model="tiny", token=TOKEN) as c:
        assert c.infer(X).variant == "fast"  # and the server is as it was


def test_watch_streams_beyond_the_cap_are_refused(tiny_family: Path, pki: Pki,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(security, "MAX_WATCH_STREAMS", 3)
    with contextlib.contextmanager(_serve)(tiny_family, pki, mtls=False, token=True) as running:
        health = running.server.health
        with grpc.secure_channel(running.target,
                                 grpc.ssl_channel_credentials(pki.ca.cert)) as ch:
            stub = health_pb2_grpc.HealthStub(ch)

            def watch() -> Any:
                return stub.Watch(health_pb2.HealthCheckRequest(), timeout=30, metadata=BEARER)

            streams = [watch() for _ in range(3)]
            assert [next(s).status for s in streams] == [SERVING_STATUS] * 3
            assert health.watching == 3
            assert _code(lambda: next(watch())) is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING_STATUS
            streams.pop().cancel()  # a slot comes free when a stream ends, however it ends
            deadline = time.monotonic() + 30
            while health.watching > 2 and time.monotonic() < deadline:
                time.sleep(0.02)  # the server sees the cancellation on its own loop
            streams.append(watch())
            assert next(streams[-1]).status == SERVING_STATUS
            for s in streams:
                s.cancel()
