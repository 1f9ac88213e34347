"""A throwaway PKI for the TLS tests, made with the openssl command: a CA and another CA, a server
certificate for api.example.com and a client certificate (CN client), both signed by the CA."""
import shutil
import subprocess

OPENSSL = shutil.which("openssl")
HOST = "api.example.com"


def _openssl(*args, cwd):
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d):
    """Write ca.pem/.key, other-ca.pem/.key, server.pem/.key and client.pem/.key into `d`."""
    (d / "san.cnf").write_text(f"subjectAltName=DNS:{HOST}\n")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                 f"/CN={ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.pem", cwd=d)
    for name, cn in (("server", HOST), ("client", "client")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout",
                 f"{name}.key", "-out", f"{name}.csr", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", "san.cnf",
                 cwd=d)
    return d
