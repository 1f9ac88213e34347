"""`run --sidecar` and `check --sidecar` flags, their defaults, what reaches the supervisor and
the workers, and the readiness handler (Istio's 15021) without sockets."""
from __future__ import annotations

import inspect

import pytest

from meshcore import admin, cli
from meshcore.cli import build_parser, sidecar_addresses


def parse(*argv):
    return build_parser().parse_args(["run", "--config", "x", *argv])


def test_sidecar_defaults_are_istios_ports():
    assert sidecar_addresses(parse("--sidecar")) == (("0.0.0.0", 15001), ("0.0.0.0", 15006),
                                                     ("0.0.0.0", 15021))
    args = parse("--sidecar")
    assert args.admin == ("127.0.0.1", 15000) and args.outbound_traffic_policy == "ALLOW_ANY"
    assert args.prometheus == ("0.0.0.0", 15090)


def test_explicit_mode_keeps_its_defaults():
    assert sidecar_addresses(parse()) == (("127.0.0.1", 15001), None, None)
    demo = build_parser().parse_args(["demo"])
    assert demo.listen == ("127.0.0.1", 15001)


def test_each_sidecar_default_is_overridable():
    args = parse("--sidecar", "--listen", "127.0.0.1:16001", "--inbound-listen", "127.0.0.1:16006",
                 "--health", "127.0.0.1:16021", "--outbound-traffic-policy", "REGISTRY_ONLY")
    assert sidecar_addresses(args) == (("127.0.0.1", 16001), ("127.0.0.1", 16006),
                                       ("127.0.0.1", 16021))
    assert sidecar_addresses(parse("--sidecar", "--health", "off"))[2] is None
    assert sidecar_addresses(parse("--health", "127.0.0.1:16021"))[2] == ("127.0.0.1", 16021)
    with pytest.raises(SystemExit):
        parse("--outbound-traffic-policy", "DENY")


class FakeSupervisor:
    made = []

    def __init__(self, config, listen, admin_address, workers, options, **kw):
        self.args = (config, listen, admin_address, workers, options)
        FakeSupervisor.made.append(self)

    def run(self):
        return 0


@pytest.fixture
def fake_supervisor(monkeypatch):
    import meshcore.supervisor
    FakeSupervisor.made.clear()
    monkeypatch.setattr(meshcore.supervisor, "Supervisor", FakeSupervisor)
    return FakeSupervisor.made


def test_run_sidecar_passes_plain_options(fake_supervisor):
    assert cli.main(["run", "--config", "x", "--sidecar", "--outbound-traffic-policy",
                     "REGISTRY_ONLY", "--namespace", "bookinfo"]) == 0
    config, listen, admin_address, workers, options = fake_supervisor[0].args
    assert listen == ("0.0.0.0", 15001) and admin_address == ("127.0.0.1", 15000)
    assert options["health"] == ("0.0.0.0", 15021)
    assert options["sidecar"] == {"inbound_listen": ("0.0.0.0", 15006),
                                  "outbound_traffic_policy": "REGISTRY_ONLY"}
    # the config compiles in sidecar mode under that policy
    assert options["workload"]["sidecar"] is True
    assert options["workload"]["outbound_traffic_policy"] == "REGISTRY_ONLY"
    assert options["workload"]["namespace"] == "bookinfo"


def test_run_without_sidecar_passes_none(fake_supervisor):
    assert cli.main(["run", "--config", "x"]) == 0
    _, listen, _, _, options = fake_supervisor[0].args
    assert listen == ("127.0.0.1", 15001)
    assert options["sidecar"] is None and options["health"] is None
    assert options["workload"]["sidecar"] is False


@pytest.mark.parametrize("argv, problem", [
    (["--inbound-listen", "127.0.0.1:16006"], "--inbound-listen needs --sidecar"),
    (["--sidecar", "--listen", "0.0.0.0:15006"], "must differ from --listen"),
])
def test_run_rejects_inconsistent_addresses(fake_supervisor, capsys, argv, problem):
    assert cli.main(["run", "--config", "x", *argv]) == 2
    assert problem in capsys.readouterr().err
    assert not fake_supervisor


def test_workers_hand_the_sidecar_options_to_the_dataplane():
    from meshcore.io.dataplane import Dataplane
    from meshcore.worker import _sidecar_arguments
    params = inspect.signature(Dataplane.__init__).parameters
    for name, default in (("sidecar", False), ("inbound_listen", None),
                          ("outbound_traffic_policy", "ALLOW_ANY")):
        assert params[name].default == default
    assert _sidecar_arguments(None) == {"sidecar": False}
    assert _sidecar_arguments({"inbound_listen": ("0.0.0.0", 15006),
                               "outbound_traffic_policy": "REGISTRY_ONLY"}) == {
        "sidecar": True, "inbound_listen": ("0.0.0.0", 15006),
        "outbound_traffic_policy": "REGISTRY_ONLY"}


def test_check_sidecar_compiles_as_run_sidecar_would(tmp_path, capsys):
    cfg = tmp_path / "db.yaml"
    cfg.write_text("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db}
spec:
  hosts: [db.example.com]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: NONE
""")
    assert cli.main(["check", str(cfg)]) == 0
    assert "protocol TCP is not supported" in capsys.readouterr().err
    assert cli.main(["check", "--sidecar", str(cfg)]) == 0
    out = capsys.readouterr()
    assert "not supported" not in out.err and out.out.startswith("ok: ")
    assert cli.main(["check", "--sidecar", "--strict", str(cfg)]) == 0


class Sup:
    def __init__(self, state):
        self.state = state

    def readiness(self):
        return self.state == "LIVE", self.state


def call(sup, method, target):
    raw = admin.handle_health(sup, method, target)
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize("state, status, body", [
    ("LIVE", 200, b""),
    ("INITIALIZING", 503, b"not ready: INITIALIZING\n"),
    ("DRAINING", 503, b"not ready: DRAINING\n"),
])
def test_readiness_handler(state, status, body):
    assert call(Sup(state), b"GET", b"/healthz/ready") == (status, body)
    assert call(Sup(state), b"GET", b"/healthz/ready?x=1") == (status, body)
    assert call(Sup(state), b"HEAD", b"/healthz/ready") == (status, b"")


def test_readiness_port_answers_nothing_else():
    assert call(Sup("LIVE"), b"GET", b"/stats")[0] == 404
    assert call(Sup("LIVE"), b"GET", b"/healthz/readyx")[0] == 404
    assert call(Sup("LIVE"), b"POST", b"/healthz/ready")[0] == 405


def test_supervisor_readiness_is_what_the_probe_reads():
    from meshcore.supervisor import Supervisor

    class Half:
        stopping = False
        health_failed = False
        workers = []
        ready = Supervisor.ready
        health_state = Supervisor.health_state
        readiness = Supervisor.readiness
    s = Half()

    class W:
        def __init__(self, ready):
            self.ready = ready
    s.workers = [W(True), W(False)]
    assert s.readiness() == (False, "INITIALIZING")
    s.workers[1].ready = True
    assert s.readiness() == (True, "LIVE")
    s.stopping = True
    assert s.readiness() == (False, "DRAINING")
