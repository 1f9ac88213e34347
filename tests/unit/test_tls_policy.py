"""DestinationRule `tls` compiled into ClientTlsPolicy (meshcore.config.tls), and the SSLContext it
describes checked against a local TLS server with a CA the test generates (openssl CLI).
This proves the policy is the one Istio's fields mean; tests/integration/test_tls_origination.py
proves the data path originates TLS with it."""
from __future__ import annotations

import os
import socket
import ssl
import sys
import textwrap
import threading

import pytest

from meshcore.config.compile import compile_sources
from meshcore.config.tls import ClientTlsPolicy, tls_policy_from_istio
from meshcore.errors import ConfigError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
from tls_pki import OPENSSL, make_pki  # noqa: E402 (the integration tests' PKI helper)


def compile_dr(tls_yaml: str):
    text = textwrap.dedent("""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: ext}
    spec: {hosts: [api.example.com], ports: [{number: 80, name: http, protocol: HTTP, targetPort: 443}],
           resolution: STATIC, endpoints: [{address: 10.0.0.1}]}
    ---
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: ext}
    spec:
      host: api.example.com
      trafficPolicy:
        tls: """) + tls_yaml + "\n"
    return compile_sources({"tls.yaml": text.encode()})


CLUSTER = "outbound|80||api.example.com"


def test_modes_compile_into_the_policy(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    s = compile_dr(f"{{mode: SIMPLE, sni: api.example.com, caCertificates: {ca}, subjectAltNames: [api.example.com]}}")
    assert s.clusters[CLUSTER].tls == ClientTlsPolicy("SIMPLE", sni="api.example.com", ca_certificates=str(ca),
                                                      subject_alt_names=("api.example.com",))
    assert s.warnings == ()
    assert compile_dr("{mode: DISABLE}").clusters[CLUSTER].tls is None
    s = compile_dr("{mode: ISTIO_MUTUAL}")
    assert s.clusters[CLUSTER].tls is None
    assert any("tls.mode: ISTIO_MUTUAL needs Istio's workload certificates" in w for w in s.warnings)
    s = compile_dr("{mode: SIMPLE, insecureSkipVerify: true}")
    assert s.clusters[CLUSTER].tls.insecure_skip_verify and s.clusters[CLUSTER].tls.server_name("a.b") == "a.b"
    s = compile_dr("{mode: MUTUAL, clientCertificate: /nonexistent/c.pem, privateKey: /nonexistent/k.pem}")
    assert s.clusters[CLUSTER].tls.mode == "MUTUAL"
    assert any("clientCertificate: file '/nonexistent/c.pem' not found" in w for w in s.warnings)
    s = compile_dr("{mode: SIMPLE, credentialName: my-secret}")
    assert any("Kubernetes Secrets cannot be read" in w for w in s.warnings)


def test_tls_validation_parity():
    with pytest.raises(ConfigError) as ei:
        compile_dr("{mode: MUTUAL}")
    assert ei.value.problems == [
        "tls.yaml: DestinationRule ext: spec.trafficPolicy.tls.clientCertificate: client certificate required for mutual tls",
        "tls.yaml: DestinationRule ext: spec.trafficPolicy.tls.privateKey: private key required for mutual tls"]
    with pytest.raises(ConfigError) as ei:
        compile_dr("{mode: SIMPLE, insecureSkipVerify: true, caCertificates: /x.pem}")
    assert "cannot specify CaCertificates or CredentialName or SubjectAltNames when InsecureSkipVerify" \
        in ei.value.problems[0]
    assert tls_policy_from_istio(None) == (None, [])


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if OPENSSL is None:
        pytest.skip("the openssl command is needed to generate the test CA")
    return make_pki(tmp_path_factory.mktemp("pki"))


def _server(pki, require_client_cert: bool):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki / "ca.pem")
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    seen = {}

    def serve():
        conn, _ = lsock.accept()
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                seen["client_cert"] = tls.getpeercert() is not None and bool(tls.getpeercert())
                tls.sendall(b"hello")
        except (ssl.SSLError, OSError) as e:
            seen["error"] = e
        finally:
            lsock.close()

    threading.Thread(target=serve, daemon=True).start()
    return lsock.getsockname()[1], seen


def _handshake(policy: ClientTlsPolicy, port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with policy.ssl_context().wrap_socket(raw, server_hostname=policy.server_name("api.example.com")) as tls:
            return tls.recv(5)


def test_simple_origination_verifies_the_server(pki):
    port, _ = _server(pki, False)
    assert _handshake(ClientTlsPolicy("SIMPLE", ca_certificates=str(pki / "ca.pem")), port) == b"hello"
    port, _ = _server(pki, False)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(ClientTlsPolicy("SIMPLE", ca_certificates=str(pki / "other-ca.pem")), port)
    port, _ = _server(pki, False)
    with pytest.raises(ssl.SSLCertVerificationError):  # the SNI is the name the certificate must carry
        _handshake(ClientTlsPolicy("SIMPLE", sni="wrong.example.com", ca_certificates=str(pki / "ca.pem")), port)
    port, _ = _server(pki, False)
    assert _handshake(ClientTlsPolicy("SIMPLE", insecure_skip_verify=True), port) == b"hello"


def test_subject_alt_names_are_checked_after_the_handshake(pki):
    policy = ClientTlsPolicy("SIMPLE", ca_certificates=str(pki / "ca.pem"), subject_alt_names=("api.example.com",))
    port, _ = _server(pki, False)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with policy.ssl_context().wrap_socket(raw, server_hostname="10.0.0.1") as tls:  # SNI irrelevant here
            assert policy.peer_allowed(tls.getpeercert())
            other = ClientTlsPolicy("SIMPLE", ca_certificates=str(pki / "ca.pem"), subject_alt_names=("x.test",))
            assert not other.peer_allowed(tls.getpeercert())


def test_mutual_origination_presents_the_client_certificate(pki):
    port, seen = _server(pki, True)
    policy = ClientTlsPolicy("MUTUAL", ca_certificates=str(pki / "ca.pem"),
                             client_certificate=str(pki / "client.pem"), private_key=str(pki / "client.key"))
    assert _handshake(policy, port) == b"hello"
    assert seen.get("client_cert") is True
