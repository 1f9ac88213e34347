"""`meshcore iptables` without root: the rules as data, the cleanup plan, the runner against a
fake iptables, the CLI flags, and the sockaddr parsing of meshcore.sidecar.origdst."""
from __future__ import annotations

import io
import shlex
import socket
import struct
import sys

import pytest

from meshcore.cli import build_parser, main
from meshcore.sidecar import iptables as ipt
from meshcore.sidecar.origdst import parse_sockaddr, original_dst

# istio-iptables' golden output for its default sidecar injection (`-p 15001 -z 15006 -u 1337
# -m REDIRECT -i '*' -b '*' -d 15090,15021,15020`), from tools/istio-iptables/pkg/capture/testdata,
# rewritten with meshcore's inbound exclusions (its proxy ports instead of 15008/15020)
ISTIO_DEFAULT = """
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport 15000 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15001 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15006 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
"""


def lines(rules) -> list[str]:
    out = []
    for argv in rules:
        assert argv[:2] == ["-t", "nat"]
        out.append(" ".join(argv[2:]))
    return out


def test_default_rules_are_istios():
    assert lines(ipt.capture_rules(ipt.CaptureConfig())) == ISTIO_DEFAULT.strip().splitlines()


def test_chains_are_created_before_any_jump_to_them():
    created = set()
    for argv in ipt.capture_rules(ipt.CaptureConfig(include_inbound_ports=(80,)), 4):
        if argv[2] == "-N":
            created.add(argv[3])
            continue
        chain = argv[3]
        target = argv[argv.index("-j") + 1]
        assert chain in created or chain in ("PREROUTING", "OUTPUT")
        if target.startswith("ISTIO"):
            assert target in created


def test_ports_uid_gid_and_exclusions():
    cfg = ipt.CaptureConfig(proxy_uid=1000, proxy_gid=2000, outbound_port=16001,
                            inbound_port=16006, include_inbound_ports=(8080, 9090),
                            exclude_inbound_ports=(22, 15000), exclude_outbound_ports=(5432,),
                            exclude_outbound_cidrs=("10.0.0.0/8", "fd00::/8"))
    got = lines(ipt.capture_rules(cfg, 4))
    assert "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 16001" in got
    assert "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006" in got
    inbound = [l for l in got if l.startswith("-A ISTIO_INBOUND")]
    # the proxy's ports (and the ports it was told to use), then the user's, each once; then
    # only the included ports are redirected
    assert inbound == [f"-A ISTIO_INBOUND -p tcp --dport {p} -j RETURN"
                       for p in (15000, 15001, 15006, 15021, 15090, 16001, 16006, 22)] + [
        "-A ISTIO_INBOUND -p tcp --dport 8080 -j ISTIO_IN_REDIRECT",
        "-A ISTIO_INBOUND -p tcp --dport 9090 -j ISTIO_IN_REDIRECT"]
    assert "-A ISTIO_OUTPUT -m owner --uid-owner 1000 -j RETURN" in got
    assert "-A ISTIO_OUTPUT -m owner --gid-owner 2000 -j RETURN" in got
    # port exclusions come first in ISTIO_OUTPUT (before the proxy's self-call redirect)
    output = [l for l in got if l.startswith("-A ISTIO_OUTPUT")]
    assert output[:2] == ["-A ISTIO_OUTPUT -p tcp --dport 5432 -j RETURN",
                          "-A ISTIO_OUTPUT -p udp --dport 5432 -j RETURN"]
    # CIDR exclusions of the rule's family only, before the final redirect
    assert output[-2:] == ["-A ISTIO_OUTPUT -d 10.0.0.0/8 -j RETURN",
                           "-A ISTIO_OUTPUT -j ISTIO_REDIRECT"]
    v6 = lines(ipt.capture_rules(cfg, 6))
    assert "-A ISTIO_OUTPUT -d fd00::/8 -j RETURN" in v6
    assert not any("10.0.0.0/8" in l for l in v6)
    assert "-A ISTIO_OUTPUT -o lo -s ::6/128 -j RETURN" in v6
    assert "-A ISTIO_OUTPUT -d ::1/128 -j RETURN" in v6


def test_no_inbound_ports_means_no_prerouting_jump():
    got = lines(ipt.capture_rules(ipt.CaptureConfig(include_inbound_ports=())))
    assert not any("PREROUTING" in l or l.startswith("-A ISTIO_INBOUND") for l in got)
    assert "-N ISTIO_INBOUND" in got  # the chain exists, as istio-iptables leaves it


def test_parse_ports_and_cidrs():
    assert ipt.parse_ports("80, 8080,80") == (80, 8080)
    assert ipt.parse_ports("") == ()
    assert ipt.parse_ports("*", allow_star=True) == "*"
    for bad in ("0", "65536", "http", "-1", "80-90"):
        with pytest.raises(ValueError):
            ipt.parse_ports(bad)
    with pytest.raises(ValueError):
        ipt.parse_ports("*")
    assert ipt.parse_cidrs("10.1.2.3, 10.0.0.0/8,fd00::1/8") == ("10.1.2.3/32", "10.0.0.0/8",
                                                               "fd00::/8")
    with pytest.raises(ValueError, match="'10.0.0.0/33'"):
        ipt.parse_cidrs("10.0.0.0/33")


LISTING = """-P PREROUTING ACCEPT
-P INPUT ACCEPT
-P OUTPUT ACCEPT
-P POSTROUTING ACCEPT
-N ISTIO_INBOUND
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-N ISTIO_REDIRECT
-N KUBE-SERVICES
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A PREROUTING -j KUBE-SERVICES
-A OUTPUT -j ISTIO_OUTPUT
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
"""


def test_cleanup_removes_every_jump_then_the_chains_and_nothing_else():
    got = lines(ipt.cleanup_rules(LISTING))
    assert got == ["-D PREROUTING -p tcp -j ISTIO_INBOUND",
                   "-D OUTPUT -j ISTIO_OUTPUT",
                   "-D OUTPUT -p tcp -j ISTIO_OUTPUT",
                   "-F ISTIO_OUTPUT", "-F ISTIO_IN_REDIRECT", "-F ISTIO_REDIRECT",
                   "-F ISTIO_INBOUND",
                   "-X ISTIO_OUTPUT", "-X ISTIO_IN_REDIRECT", "-X ISTIO_REDIRECT",
                   "-X ISTIO_INBOUND"]
    assert ipt.cleanup_rules("-P OUTPUT ACCEPT\n-N KUBE-SERVICES\n") == []


class FakeIptables:
    """A nat table in memory that understands the commands the runner sends."""

    def __init__(self, fail_on: str | None = None):
        self.chains = {"PREROUTING": [], "INPUT": [], "OUTPUT": [], "POSTROUTING": []}
        self.user: list[str] = []
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, argv, capture_output, text):
        import subprocess
        self.calls.append(argv)
        assert argv[1] == "-w" and argv[2:4] == ["-t", "nat"]
        op, rest = argv[4], argv[5:]

        def result(rc=0, out="", err=""):
            return subprocess.CompletedProcess(argv, rc, out, err)
        if self.fail_on and self.fail_on in " ".join(argv):
            return result(1, err="iptables: No chain/target/match by that name.")
        if op == "-S":
            out = [f"-P {c} ACCEPT" for c in ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")]
            out += [f"-N {c}" for c in self.user]
            out += [f"-A {c} {r}" for c, rules in self.chains.items() for r in rules]
            return result(out="\n".join(out) + "\n")
        chain = rest[0]
        spec = shlex.join(rest[1:])
        if op == "-N":
            if chain in self.chains:
                return result(1, err="iptables: Chain already exists.")
            self.chains[chain] = []
            self.user.append(chain)
        elif op == "-A":
            self.chains[chain].append(spec)
        elif op == "-D":
            self.chains[chain].remove(spec)
        elif op == "-F":
            self.chains[chain].clear()
        elif op == "-X":
            assert not self.chains[chain]
            del self.chains[chain]
            self.user.remove(chain)
        return result()


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(ipt.shutil, "which", lambda name: f"/usr/sbin/{name}")
    return FakeIptables()


def test_install_is_idempotent_and_clean_restores(fake):
    cfg = ipt.CaptureConfig()
    n = ipt.install(cfg, runner=fake)
    assert n == len(ipt.capture_rules(cfg))
    first = {c: list(r) for c, r in fake.chains.items()}
    ipt.install(cfg, runner=fake)
    assert fake.chains == first
    assert fake.chains["OUTPUT"] == ["-j ISTIO_OUTPUT"]
    assert ipt.clean(runner=fake) == 2 + 4 + 4
    assert fake.chains == {"PREROUTING": [], "INPUT": [], "OUTPUT": [], "POSTROUTING": []}
    assert ipt.clean(runner=fake) == 0


def test_install_ipv6_uses_ip6tables(fake):
    ipt.install(ipt.CaptureConfig(), families=(4, 6), runner=fake)
    assert {c[0] for c in fake.calls} == {"/usr/sbin/iptables", "/usr/sbin/ip6tables"}


def test_a_failing_rule_names_the_command(monkeypatch):
    monkeypatch.setattr(ipt.shutil, "which", lambda name: f"/usr/sbin/{name}")
    with pytest.raises(ipt.IptablesError, match="REDIRECT --to-ports 15001 failed: iptables: No chain"):
        ipt.install(ipt.CaptureConfig(), runner=FakeIptables(fail_on="--to-ports 15001"))


def test_missing_binary_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(ipt.shutil, "which", lambda name: None)
    with pytest.raises(ipt.IptablesError, match="iptables not found on PATH .*apt-get install iptables"):
        ipt.install(ipt.CaptureConfig())


def run_cli(argv, capsys):
    rc = main(["iptables", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_defaults_and_help_state_them(capsys):
    args = build_parser().parse_args(["iptables"])
    assert (args.proxy_uid, args.proxy_gid, args.outbound_port, args.inbound_port) == (1337, None, 15001, 15006)
    assert (args.include_inbound_ports, args.exclude_inbound_ports, args.exclude_outbound_ports,
            args.exclude_outbound_cidrs) == ("*", "", "", "")
    assert not (args.dry_run or args.clean or args.ipv6)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["iptables", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--proxy-uid", "--proxy-gid", "--outbound-port", "--inbound-port",
                 "--include-inbound-ports", "--exclude-inbound-ports", "--exclude-outbound-ports",
                 "--exclude-outbound-cidrs", "--ipv6", "--dry-run", "--clean"):
        assert flag in text
    assert text.count("(default") >= 11


def test_cli_dry_run_prints_and_runs_nothing(capsys, monkeypatch):
    monkeypatch.setattr(ipt, "_run", lambda *a: pytest.fail("dry run ran iptables"))
    rc, out, _ = run_cli(["--dry-run", "--include-inbound-ports", "8080,9080"], capsys)
    assert rc == 0
    assert "iptables -t nat -A ISTIO_INBOUND -p tcp --dport 9080 -j ISTIO_IN_REDIRECT" in out
    assert "iptables -t nat -X ISTIO_OUTPUT" in out  # the clean-first step is shown
    rc, out, _ = run_cli(["--dry-run", "--clean"], capsys)
    assert rc == 0 and "-A ISTIO" not in out and "iptables -t nat -D OUTPUT -j ISTIO_OUTPUT" in out


@pytest.mark.parametrize("argv, problem", [
    (["--include-inbound-ports", "http"], "expected a port number 1-65535, got 'http' (or '*'"),
    (["--exclude-inbound-ports", "*"], "got '*'"),
    (["--exclude-outbound-cidrs", "10.0.0/8x"], "expected an IP address or CIDR"),
])
def test_cli_bad_values_exit_2(capsys, argv, problem):
    rc, _, err = run_cli(argv + ["--dry-run"], capsys)
    assert rc == 2 and problem in err


def test_cli_bad_port_and_uid_are_usage_errors(capsys):
    for argv in (["--outbound-port", "0"], ["--proxy-uid", "meshcore"]):
        with pytest.raises(SystemExit) as e:
            main(["iptables", *argv])
        assert e.value.code == 2


def test_cli_reports_iptables_failure_with_exit_1(capsys, monkeypatch):
    monkeypatch.setattr(ipt.shutil, "which", lambda name: None)
    rc, _, err = run_cli([], capsys)
    assert rc == 1 and "iptables not found" in err


# --- meshcore.sidecar.origdst ---

def _sockaddr_in(ip: str, port: int) -> bytes:
    return (socket.AF_INET.to_bytes(2, sys.byteorder) + struct.pack("!H", port)
            + socket.inet_aton(ip) + b"\0" * 8)


def _sockaddr_in6(ip: str, port: int) -> bytes:
    return (socket.AF_INET6.to_bytes(2, sys.byteorder) + struct.pack("!H", port) + b"\0" * 4
            + socket.inet_pton(socket.AF_INET6, ip) + b"\0" * 4)


def test_parse_sockaddr():
    assert parse_sockaddr(_sockaddr_in("10.96.0.10", 8080)) == ("10.96.0.10", 8080)
    assert parse_sockaddr(_sockaddr_in6("fd00::a", 443)) == ("fd00::a", 443)
    assert parse_sockaddr(_sockaddr_in6("::ffff:10.0.0.1", 80)) == ("::ffff:10.0.0.1", 80)
    for bad in (b"", b"\x01", socket.AF_UNIX.to_bytes(2, sys.byteorder) + b"\0" * 14,
                socket.AF_INET6.to_bytes(2, sys.byteorder) + b"\0" * 10):
        with pytest.raises(ValueError):
            parse_sockaddr(bad)


def test_original_dst_of_a_direct_connection_is_none():
    """A client that addressed the listener itself was not redirected (explicit mode)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as client:
            conn, _ = listener.accept()
            with conn:
                assert original_dst(conn) is None
                assert original_dst(conn.fileno()) is None
                conn.getsockname()  # the fd form left the socket open
            client.close()


def test_original_dst_errors_other_than_no_entry_propagate():
    class Broken:
        family = socket.AF_INET

        def getsockopt(self, *a):
            raise OSError(9, "Bad file descriptor")
    with pytest.raises(OSError):
        original_dst(Broken())


def test_original_dst_reads_the_kernel_answer():
    class Redirected:
        family = socket.AF_INET

        def getsockopt(self, level, name, size):
            assert (level, name, size) == (socket.IPPROTO_IP, 80, 16)
            return _sockaddr_in("10.96.0.10", 80)

        def getsockname(self):
            return ("10.1.0.5", 15001)
    assert original_dst(Redirected()) == ("10.96.0.10", 80)

    class Redirected6(Redirected):
        family = socket.AF_INET6

        def getsockopt(self, level, name, size):
            assert (level, name, size) == (socket.IPPROTO_IPV6, 80, 28)
            return _sockaddr_in6("fd00::10", 80)

        def getsockname(self):
            return ("fd00::5", 15001, 0, 0)
    assert original_dst(Redirected6()) == ("fd00::10", 80)
