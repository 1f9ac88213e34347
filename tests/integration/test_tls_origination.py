"""DestinationRule `tls` through the real proxy (issue 12 item 6): meshcore originates TLS to a
local HTTPS origin whose certificates a test CA signed (openssl CLI). SIMPLE verifies the server
(caCertificates, the SNI, subjectAltNames), MUTUAL presents the client certificate, keep-alive
requests share one TLS connection, and a server that fails verification gets no request: 503."""
import socket
import ssl
import threading

import pytest

from harness import Client, Proxy, write_config
from tls_pki import HOST, OPENSSL, make_pki

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if OPENSSL is None:
        pytest.skip("the openssl command is needed to generate the test CA")
    return make_pki(tmp_path_factory.mktemp("pki"))


class HttpsOrigin:
    """A keep-alive HTTPS/1.1 origin: answers every request `200 <method> <path> via TLS`, and
    records the SNI, the client certificate's CN and the TLS connections it accepted."""

    def __init__(self, pki, require_client_cert=False):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(pki / "ca.pem")
        self.sni, self.clients, self.connections, self.requests = [], [], 0, 0
        ctx.sni_callback = lambda obj, name, c: self.sni.append(name)
        self.ctx = ctx
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw):
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as tls:
                self.connections += 1
                cert = tls.getpeercert()
                if cert:
                    self.clients.append(dict(x[0] for x in cert["subject"])["commonName"])
                buf = b""
                while True:
                    while b"\r\n\r\n" not in buf:
                        chunk = tls.recv(65536)
                        if not chunk:
                            return
                        buf += chunk
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    self.requests += 1
                    method, path = head.split(b" ")[:2]
                    body = b"%s %s via TLS" % (method, path)
                    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                % (len(body), body))
        except (ssl.SSLError, OSError):
            pass

    def close(self):
        self.sock.close()


def mesh(port: int, tls: str) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api}}
spec:
  hosts: [{HOST}]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {port}}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: api}}
spec:
  host: {HOST}
  trafficPolicy:
    tls: {tls}
"""


def _through(tmp_path, origin, tls, n=1):
    px = Proxy([write_config(str(tmp_path), mesh(origin.port, tls))], workers=1,
               extra=["--no-access-log"])
    try:
        c = Client(px.port, timeout=10)
        out = [c.request(path=f"/r{i}", host=HOST) for i in range(n)]
        c.close()
        return out, px.stop()
    finally:
        px.stop()


def test_simple_verifies_the_server_and_sends_the_service_name(tmp_path, pki):
    origin = HttpsOrigin(pki)
    try:
        replies, _ = _through(tmp_path, origin, f"{{mode: SIMPLE, caCertificates: {pki}/ca.pem}}",
                              n=3)
        assert [(r.status, r.body) for r in replies] == [
            (200, b"GET /r%d via TLS" % i) for i in range(3)]
        assert origin.sni == [HOST]  # one handshake, the service's name as SNI
        assert origin.connections == 1  # keep-alive: the pooled connection is one TLS session
    finally:
        origin.close()


def test_sni_and_subject_alt_names_from_the_rule(tmp_path, pki):
    origin = HttpsOrigin(pki)
    try:
        replies, _ = _through(tmp_path, origin, f"{{mode: SIMPLE, sni: {HOST}, caCertificates: "
                                                f"{pki}/ca.pem, subjectAltNames: [{HOST}]}}")
        assert replies[0].status == 200 and origin.sni == [HOST]
        replies, err = _through(tmp_path, origin, f"{{mode: SIMPLE, caCertificates: "
                                                  f"{pki}/ca.pem, subjectAltNames: [other.example]}}")
        assert replies[0].status == 503 and origin.requests == 1  # nothing sent to the wrong one
        assert "no subjectAltName of the server certificate" in err
    finally:
        origin.close()


def test_a_server_the_ca_did_not_sign_gets_no_request(tmp_path, pki):
    origin = HttpsOrigin(pki)
    try:
        replies, err = _through(tmp_path, origin,
                                f"{{mode: SIMPLE, caCertificates: {pki}/other-ca.pem}}")
        assert replies[0].status == 503
        assert replies[0].body.endswith(b"reset reason: connection termination")  # flag UC
        assert origin.requests == 0
        assert f"TLS to 127.0.0.1:{origin.port} (SNI {HOST}) failed" in err
    finally:
        origin.close()


def test_mutual_presents_the_client_certificate(tmp_path, pki):
    origin = HttpsOrigin(pki, require_client_cert=True)
    try:
        replies, _ = _through(tmp_path, origin, f"{{mode: MUTUAL, caCertificates: {pki}/ca.pem, "
                                                f"clientCertificate: {pki}/client.pem, "
                                                f"privateKey: {pki}/client.key}}")
        assert replies[0].status == 200 and origin.clients == ["client"]
        replies, _ = _through(tmp_path, origin, f"{{mode: SIMPLE, caCertificates: {pki}/ca.pem}}")
        assert replies[0].status == 503  # no client certificate: the origin refuses
    finally:
        origin.close()


def test_disable_stays_plaintext(tmp_path, pki):
    plain = socket.socket()
    plain.bind(("127.0.0.1", 0))
    plain.listen(1)

    class Origin:
        port = plain.getsockname()[1]

    def answer():
        conn, _ = plain.accept()
        data = conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(data.split(b"\r\n")[0]), data.split(b"\r\n")[0]))
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    try:
        replies, _ = _through(tmp_path, Origin, "{mode: DISABLE}")
        assert (replies[0].status, replies[0].body) == (200, b"GET /r0 HTTP/1.1")
    finally:
        plain.close()
