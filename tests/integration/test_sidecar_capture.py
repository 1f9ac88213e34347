"""Transparent capture in network namespaces, without meshcore's data path: `meshcore iptables`
installs Istio's rules in a pod namespace and tiny test listeners (netns_tools.py) stand in for
the sidecar's 15001/15006, reading SO_ORIGINAL_DST through meshcore.sidecar.origdst."""
from __future__ import annotations

import json
import os

import pytest

from netns import PYTHON, Lab, unavailable

REASON = unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")
TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "netns_tools.py")
PROXY_UID = 1337
APP_UID = 1000


def tool(*args) -> list[str]:
    return [PYTHON, TOOLS, *map(str, args)]


def iptables(lab, pod, *flags) -> str:
    done = lab.run(pod, [PYTHON, "-m", "meshcore", "iptables", *flags])
    return done.stdout


def nat(lab, pod) -> list[str]:
    return lab.run(pod, ["iptables", "-w", "-t", "nat", "-S"]).stdout.splitlines()


def connect(lab, pod, host, port, user=None) -> str:
    return lab.run(pod, tool("connect", host, port), user=user).stdout


def first_json(text: str) -> dict:
    return json.loads(text.splitlines()[0])


@pytest.fixture
def lab():
    with Lab() as lab:
        yield lab


@pytest.fixture
def pods(lab):
    client = lab.add_pod("client")
    server = lab.add_pod("server")
    lab.spawn(server, tool("whoami", 8080, "server"))
    return client, server


def test_outbound_is_redirected_with_its_original_destination(lab, pods):
    client, server = pods
    assert connect(lab, client, server.ip, 8080) == f"server 8080 {client.ip}\n"  # no capture yet
    iptables(lab, client)
    lab.spawn(client, tool("origdst", 15001))
    seen = first_json(connect(lab, client, server.ip, 8080, user=APP_UID))
    assert seen["orig"] == [server.ip, 8080]
    # a service VIP that exists nowhere: the connect succeeds because the redirect happens first
    seen = first_json(connect(lab, client, "10.96.0.10", 80, user=APP_UID))
    assert seen["orig"] == ["10.96.0.10", 80]
    # root is not the proxy either
    assert first_json(connect(lab, client, server.ip, 8080))["orig"] == [server.ip, 8080]


def test_the_proxy_uid_is_not_captured(lab, pods):
    client, server = pods
    iptables(lab, client)
    lab.spawn(client, tool("origdst", 15001))
    # the same connection: captured for the application, direct for the proxy's uid
    assert first_json(connect(lab, client, server.ip, 8080, user=APP_UID))["orig"] == [server.ip, 8080]
    assert connect(lab, client, server.ip, 8080, user=PROXY_UID) == f"server 8080 {client.ip}\n"


def test_a_proxy_running_as_1337_reaches_the_original_destination_without_a_loop(lab, pods):
    client, server = pods
    iptables(lab, client)
    lab.spawn(client, tool("origdst", 15001, "--relay"), user=PROXY_UID)
    out = connect(lab, client, server.ip, 8080, user=APP_UID).splitlines()
    relay = json.loads(out[0])
    assert relay["orig"] == [server.ip, 8080] and relay["uid"] == PROXY_UID
    # the relay's own connection went straight to the server (captured, it would have come back
    # to 15001 and answered another JSON line)
    assert out[1:] == [f"server 8080 {client.ip}"]


def test_a_proxy_gid_is_not_captured_either(lab, pods):
    client, server = pods
    iptables(lab, client, "--proxy-uid", "1400", "--proxy-gid", "1401")
    lab.spawn(client, tool("origdst", 15001))
    assert connect(lab, client, server.ip, 8080, user=1400) == f"server 8080 {client.ip}\n"
    argv = ["setpriv", "--reuid=1500", "--regid=1401", "--clear-groups", "--"] + tool(
        "connect", server.ip, 8080)
    assert lab.run(client, argv).stdout == f"server 8080 {client.ip}\n"
    assert first_json(connect(lab, client, server.ip, 8080, user=PROXY_UID))["orig"] == [server.ip, 8080]


def test_loopback_traffic_between_containers_is_not_captured(lab, pods):
    client, _ = pods
    iptables(lab, client)
    lab.spawn(client, tool("origdst", 15001))
    lab.spawn(client, tool("whoami", 9090, "app"))
    assert connect(lab, client, "127.0.0.1", 9090, user=APP_UID) == "app 9090 127.0.0.1\n"
    # the pod's own address goes over lo too: still app to app
    assert connect(lab, client, client.ip, 9090, user=APP_UID) == f"app 9090 {client.ip}\n"


def test_excluded_outbound_ports_and_cidrs_go_direct(lab, pods):
    client, server = pods
    lab.spawn(server, tool("whoami", 8081, "server"))
    iptables(lab, client, "--exclude-outbound-ports", "8081")
    lab.spawn(client, tool("origdst", 15001))
    assert connect(lab, client, server.ip, 8081, user=APP_UID) == f"server 8081 {client.ip}\n"
    assert first_json(connect(lab, client, server.ip, 8080, user=APP_UID))["orig"] == [server.ip, 8080]
    iptables(lab, client, "--exclude-outbound-cidrs", f"{server.ip}/32")
    assert connect(lab, client, server.ip, 8080, user=APP_UID) == f"server 8080 {client.ip}\n"
    assert connect(lab, client, server.ip, 8081, user=APP_UID) == f"server 8081 {client.ip}\n"


def test_inbound_is_redirected_except_the_proxy_ports(lab, pods):
    client, server = pods
    iptables(lab, server, "--exclude-inbound-ports", "9000")
    lab.spawn(server, tool("origdst", 15006))
    for port, name in ((15021, "health"), (15090, "prometheus"), (15000, "admin"),
                       (9000, "excluded")):
        lab.spawn(server, tool("whoami", port, name))
    seen = first_json(connect(lab, client, server.ip, 8080))
    assert seen["orig"] == [server.ip, 8080] and seen["peer"][0] == client.ip
    for port, name in ((15021, "health"), (15090, "prometheus"), (15000, "admin"),
                       (9000, "excluded")):
        assert connect(lab, client, server.ip, port) == f"{name} {port} {client.ip}\n"
    # the server pod's own app reaching its own port over loopback is not inbound traffic
    assert connect(lab, server, "127.0.0.1", 8080, user=APP_UID) == "server 8080 127.0.0.1\n"


def test_only_the_included_inbound_ports_are_redirected(lab, pods):
    client, server = pods
    lab.spawn(server, tool("whoami", 8081, "other"))
    iptables(lab, server, "--include-inbound-ports", "8080")
    lab.spawn(server, tool("origdst", 15006))
    assert first_json(connect(lab, client, server.ip, 8080))["orig"] == [server.ip, 8080]
    assert connect(lab, client, server.ip, 8081) == f"other 8081 {client.ip}\n"
    iptables(lab, server, "--include-inbound-ports", "")  # no inbound capture at all
    assert connect(lab, client, server.ip, 8080) == f"server 8080 {client.ip}\n"
    assert not any("PREROUTING" in line and "ISTIO" in line for line in nat(lab, server))


def test_running_twice_leaves_one_set_and_clean_removes_everything(lab, pods):
    client, server = pods
    pristine = nat(lab, client)
    iptables(lab, client)
    once = nat(lab, client)
    assert {"-N ISTIO_INBOUND", "-N ISTIO_REDIRECT", "-N ISTIO_IN_REDIRECT",
            "-N ISTIO_OUTPUT"} <= set(once)
    iptables(lab, client)
    assert nat(lab, client) == once
    assert once.count("-A OUTPUT -j ISTIO_OUTPUT") == 1
    assert once.count("-A PREROUTING -p tcp -j ISTIO_INBOUND") == 1
    out = iptables(lab, client, "--clean")
    assert "removed" in out
    assert nat(lab, client) == pristine
    assert connect(lab, client, server.ip, 8080, user=APP_UID) == f"server 8080 {client.ip}\n"
    assert "nothing to remove" in iptables(lab, client, "--clean")


def test_clean_removes_a_capture_another_tool_installed(lab, pods):
    client, _ = pods
    pristine = nat(lab, client)
    # istio-iptables as older Istio versions wrote the jump (with -p tcp) and a stray duplicate
    for argv in (["-N", "ISTIO_OUTPUT"], ["-N", "ISTIO_REDIRECT"],
                 ["-A", "ISTIO_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "15001"],
                 ["-A", "ISTIO_OUTPUT", "-j", "ISTIO_REDIRECT"],
                 ["-A", "OUTPUT", "-p", "tcp", "-j", "ISTIO_OUTPUT"],
                 ["-A", "OUTPUT", "-p", "tcp", "-j", "ISTIO_OUTPUT"]):
        lab.run(client, ["iptables", "-w", "-t", "nat", *argv])
    iptables(lab, client)
    rules = nat(lab, client)
    assert sum("-j ISTIO_OUTPUT" in line for line in rules) == 1
    iptables(lab, client, "--clean")
    assert nat(lab, client) == pristine


def test_dry_run_changes_nothing(lab, pods):
    client, _ = pods
    pristine = nat(lab, client)
    out = iptables(lab, client, "--dry-run")
    assert "iptables -t nat -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in out
    assert nat(lab, client) == pristine


def test_ipv6_capture_and_its_original_destination(lab):
    client = lab.add_pod("client")
    server = lab.add_pod("server")
    lab.spawn(server, tool("whoami", 8080, "server", "--dual"))
    iptables(lab, client, "--ipv6")
    assert any("ISTIO_OUTPUT" in line for line in
               lab.run(client, ["ip6tables", "-w", "-t", "nat", "-S"]).stdout.splitlines())
    # one dual-stack listener, as a proxy on [::]:15001 would be
    lab.spawn(client, tool("origdst", 15001, "--dual"))
    seen = first_json(connect(lab, client, server.ip6, 8080, user=APP_UID))
    assert seen["orig"] == [server.ip6, 8080]  # IP6T_SO_ORIGINAL_DST
    seen = first_json(connect(lab, client, server.ip, 8080, user=APP_UID))
    assert seen["orig"] == [server.ip, 8080]  # an IPv4 client on the IPv6 socket: SO_ORIGINAL_DST
    # the proxy's uid is exempt over IPv6 too
    assert connect(lab, client, server.ip6, 8080, user=PROXY_UID) == f"server 8080 {client.ip6}\n"
    iptables(lab, client, "--ipv6", "--clean")
    assert not any("ISTIO" in line for line in
                   lab.run(client, ["ip6tables", "-w", "-t", "nat", "-S"]).stdout.splitlines())
