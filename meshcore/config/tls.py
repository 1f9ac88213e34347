"""DestinationRule `tls` -> the upstream TLS origination policy of a cluster (config time only).

Istio's ClientTLSSettings as Envoy's UpstreamTlsContext gets them (istio/istio
cluster_tls.go): SIMPLE originates TLS and verifies the server (caCertificates, else the system
trust store; subjectAltNames, else the SNI, as Istio's auto SAN validation does); MUTUAL also
presents clientCertificate/privateKey; insecureSkipVerify turns verification off; `sni` defaults to
the request's authority (Istio's auto SNI). DISABLE (and no `tls`) is plaintext. ISTIO_MUTUAL needs
the mesh's workload certificates, which meshcore has not: plaintext, with a warning.
`credentialName` (a Kubernetes Secret) cannot be read without Kubernetes: warned and ignored.

The data path reads `ClientTlsPolicy` through meshcore.io.tls_origination (a per-worker TLS
relay the loop's pooled connections go through); `ssl_context()` builds the `ssl.SSLContext` it
describes (reads the certificate files; no network).
"""
from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

__all__ = ["ClientTlsPolicy", "tls_policy_from_istio"]


@dataclass(frozen=True, slots=True)
class ClientTlsPolicy:
    mode: str  # "SIMPLE" or "MUTUAL"
    sni: str = ""  # "" = the request's authority host (Istio auto SNI)
    ca_certificates: str = ""  # PEM file; "" = the system trust store
    ca_crl: str = ""  # PEM CRL file or ""
    subject_alt_names: tuple = ()  # () = verify against the SNI
    insecure_skip_verify: bool = False
    client_certificate: str = ""  # MUTUAL: PEM chain file
    private_key: str = ""  # MUTUAL: PEM key file

    def server_name(self, authority_host: str) -> str:
        """The SNI to send for a request to `authority_host` (port already stripped)."""
        return self.sni or authority_host

    def ssl_context(self) -> ssl.SSLContext:
        """A client SSLContext for this policy (reads the files named; raises OSError/SSLError)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # Envoy's client default
        if self.insecure_skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            if self.ca_certificates:
                ctx.load_verify_locations(cafile=self.ca_certificates)
            else:
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
            if self.ca_crl:
                ctx.load_verify_locations(cafile=self.ca_crl)
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
            # subjectAltNames are checked by the caller against the peer certificate; with none,
            # hostname checking against the SNI is Python's own.
            ctx.check_hostname = not self.subject_alt_names
        if self.mode == "MUTUAL":
            ctx.load_cert_chain(self.client_certificate, self.private_key)
        return ctx

    def peer_allowed(self, peercert: dict) -> bool:
        """After the handshake: with `subjectAltNames` set, the server certificate (as
        `SSLSocket.getpeercert()` gives it) must carry one of them (Envoy's match_subject_alt_names,
        exact); without, hostname checking against the SNI already happened in the handshake."""
        if not self.subject_alt_names or self.insecure_skip_verify:
            return True
        names = {v for k, v in peercert.get("subjectAltName", ()) if k in ("DNS", "URI", "IP Address")}
        return any(n in names for n in self.subject_alt_names)

    def describe(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__ if getattr(self, k) not in ("", (), False)}


def tls_policy_from_istio(tls) -> tuple[ClientTlsPolicy | None, list[tuple[str, str]]]:
    """(policy or None for plaintext, [(field, warning), ...]) for an istio.ClientTLSSettings."""
    warnings: list[tuple[str, str]] = []
    if tls is None:
        return None, warnings
    mode = tls.mode or "DISABLE"
    if mode == "DISABLE":
        return None, warnings
    if mode == "ISTIO_MUTUAL":
        warnings.append(("mode", "ISTIO_MUTUAL needs Istio's workload certificates, which meshcore has "
                                 "not; traffic to this destination is sent in plaintext"))
        return None, warnings
    if tls.credential_name:
        warnings.append(("credentialName", "Kubernetes Secrets cannot be read by meshcore; ignored "
                                           "(name the files with caCertificates/clientCertificate/privateKey)"))
    for attr, name in (("ca_certificates", "caCertificates"), ("ca_crl", "caCrl"),
                       ("client_certificate", "clientCertificate"), ("private_key", "privateKey")):
        path = getattr(tls, attr)
        if path and not os.path.isfile(path):
            warnings.append((name, f"file {path!r} not found; TLS connections to this destination "
                                   "will fail until it exists"))
    policy = ClientTlsPolicy(
        mode=mode,
        sni=tls.sni or "",
        ca_certificates="" if tls.insecure_skip_verify else (tls.ca_certificates or ""),
        ca_crl=tls.ca_crl or "",
        subject_alt_names=tuple(tls.subject_alt_names),
        insecure_skip_verify=bool(tls.insecure_skip_verify),
        client_certificate=(tls.client_certificate or "") if mode == "MUTUAL" else "",
        private_key=(tls.private_key or "") if mode == "MUTUAL" else "",
    )
    return policy, warnings
