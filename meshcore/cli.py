"""Command line: `python -m meshcore run|check|demo|bench|replay|top|envoy-config|iptables`
(also installed as `meshcore`)."""
from __future__ import annotations

import argparse
import os
import sys

from meshcore import __version__

DESCRIPTION = ("An HTTP/1.1 sidecar proxy that reads Istio YAML (ServiceEntry, WorkloadEntry, "
               "VirtualService, DestinationRule) and behaves as Istio's Envoy sidecar does.")
EPILOG = ("Try the seed article's scenarios: `python -m meshcore demo` lists them, "
          "`python -m meshcore demo retry --walkthrough` runs one. Each subcommand has its own --help.")
DEFAULT_WORKERS = max(1, min(os.cpu_count() or 1, 2))


def _hostport(text: str):
    from meshcore.io.sockets import parse_hostport
    try:
        return parse_hostport(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _optional_hostport(text: str):
    """HOST:PORT, or `off` (None)."""
    if text.strip().lower() in ("off", "none", "disabled", ""):
        return None
    return _hostport(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a number of seconds (0: off), got {text!r}")
    return value


def _labels(text: str) -> dict:
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected key=value[,key=value...], got {text!r}")
        out[key] = value
    return out


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _non_negative_int(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) > 2**31 - 1:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2147483647, got {text!r}")
    return int(text)


def _port_base(text: str) -> int:
    if not text.isdigit() or not (int(text) == 0 or 1 <= int(text) <= 65535 - 19):
        raise argparse.ArgumentTypeError(f"expected 0 or a port number up to 65516, got {text!r}")
    return int(text)


class _VersionAction(argparse.Action):
    """`--version`: the version and whether the compiled extensions load (checked only when asked)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from meshcore.buildinfo import version_line
        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshcore", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action=_VersionAction,
                        help="print the version and whether the compiled extensions are loaded, "
                             "then exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the proxy on Istio YAML",
                         description="Run the proxy: N worker processes on one listen address, "
                                     "reading Istio YAML; reloads when the files change or on SIGHUP.")
    _add_run_flags(run)

    check = sub.add_parser("check", help="validate config files; exit 1 on any error",
                           description="Validate Istio YAML as `run` would load it; print errors "
                                       "(naming file, document and field), warnings and notes.")
    check.add_argument("paths", nargs="+", metavar="FILE",
                       help="YAML/JSON file or directory of them (required)")
    check.add_argument("--workers", type=_positive_int, default=DEFAULT_WORKERS, metavar="N",
                       help="the worker count you will run with, for notes that depend on it "
                            f"(default: min(cores, 2) = {DEFAULT_WORKERS} here)")
    check.add_argument("--strict", action="store_true",
                       help="treat every warning as an error, for CI (default: warnings only "
                            "print)")
    _add_workload_flags(check)
    _add_policy_flags(check)

    demo = sub.add_parser(
        "demo", help="the seed article's scenarios: pods, proxy and the article's commands",
        description="Without SCENARIO: list the scenarios. With one: start its pods (one process "
                    "each, restarted when they crash), the proxy on the scenario's Istio YAML in "
                    "examples/, print the article's commands and stream the pods' logs until "
                    "Ctrl-C. With --walkthrough: perform the article's steps and compare.")
    _add_demo_flags(demo)
    sub.add_parser("bench", help="benchmark against direct calls, Envoy, nginx and HAProxy (from a "
                                 "source checkout; `bench --help` lists its flags)", add_help=False)
    sub.add_parser("replay", help="send the requests of a capture file again (`replay --help` "
                                  "lists its flags)", add_help=False)
    sub.add_parser("top", help="live per-cluster and per-endpoint view of a running proxy "
                               "(`top --help` lists its flags)", add_help=False)
    _add_envoy_config_parser(sub)
    _add_iptables_parser(sub)
    return parser


def _uid(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a numeric uid/gid, got {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}")
    return int(text)


def _add_iptables_parser(sub) -> None:
    p = sub.add_parser(
        "iptables", help="install Istio's capture rules (istio-iptables) in this network namespace",
        description="Redirect the pod's TCP to the sidecar as istio-iptables does (chains "
                    "ISTIO_OUTPUT, ISTIO_REDIRECT, ISTIO_IN_REDIRECT, ISTIO_INBOUND in the nat "
                    "table): outbound to --outbound-port except the proxy's uid/gid and "
                    "loopback, inbound to --inbound-port. Needs root or NET_ADMIN+NET_RAW (an "
                    "init container). Idempotent: a previous capture is removed first. Ports "
                    "15000, 15001, 15006, 15021, 15090 are never captured inbound.")
    p.add_argument("--proxy-uid", type=_uid, default=1337, metavar="UID",
                   help="the proxy's uid: its connections are not captured (default 1337)")
    p.add_argument("--proxy-gid", type=_uid, default=None, metavar="GID",
                   help="the proxy's gid: its connections are not captured either (default: the "
                        "proxy uid)")
    p.add_argument("--outbound-port", type=_port, default=15001, metavar="PORT",
                   help="where outbound TCP is redirected: the sidecar's outbound listener "
                        "(default 15001)")
    p.add_argument("--inbound-port", type=_port, default=15006, metavar="PORT",
                   help="where inbound TCP is redirected: the sidecar's inbound listener "
                        "(default 15006)")
    p.add_argument("--include-inbound-ports", default="*", metavar="PORTS",
                   help="inbound ports to capture: comma-separated, '*' for all, '' for none "
                        "(default '*')")
    p.add_argument("--exclude-inbound-ports", default="", metavar="PORTS",
                   help="inbound ports never captured, comma-separated, added to 15000, 15001, "
                        "15006, 15021, 15090 (default: none)")
    p.add_argument("--exclude-outbound-ports", default="", metavar="PORTS",
                   help="destination ports never captured outbound, comma-separated (default: "
                        "none)")
    p.add_argument("--exclude-outbound-cidrs", default="", metavar="CIDRS",
                   help="destination addresses/CIDRs never captured outbound, comma-separated "
                        "(default: none)")
    p.add_argument("--ipv6", action="store_true",
                   help="also install the rules with ip6tables (default: IPv4 only)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the iptables commands, change nothing (default: apply them)")
    p.add_argument("--clean", action="store_true",
                   help="remove the capture instead of installing it (default: install)")


def _add_envoy_config_parser(sub) -> None:
    p = sub.add_parser("envoy-config",
                       help="print the Envoy 1.40 bootstrap istiod would program for this config "
                            "(an outbound sidecar listener); default format YAML")
    p.add_argument("--config", action="append", required=True, metavar="FILE",
                   help="YAML/JSON file or directory (repeatable; required)")
    p.add_argument("--listen", type=_hostport, default=("127.0.0.1", 15001), metavar="HOST:PORT",
                   help="Envoy's outbound listener (default: 127.0.0.1:15001)")
    p.add_argument("--admin", type=_hostport, default=("127.0.0.1", 15000), metavar="HOST:PORT",
                   help="Envoy's admin interface (default: 127.0.0.1:15000)")
    p.add_argument("--access-log", default=None, metavar="PATH|stdout",
                   help="write Istio's text access log to PATH or stdout (default: off)")
    p.add_argument("--format", choices=("yaml", "json"), default="yaml",
                   help="output format (default: yaml)")


def cmd_envoy_config(args) -> int:
    from meshcore.config.compile import compile_sources
    from meshcore.config.envoy_bootstrap import envoy_bootstrap, to_json, to_yaml
    from meshcore.config.load import read_sources
    from meshcore.errors import ConfigError
    try:
        snapshot = compile_sources(read_sources(args.config))
        bootstrap = envoy_bootstrap(snapshot, listen=args.listen, admin=args.admin,
                                    access_log=args.access_log)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} error(s)", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"meshcore envoy-config: {exc}", file=sys.stderr)
        return 1
    for warning in snapshot.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    sys.stdout.write(to_json(bootstrap) if args.format == "json" else to_yaml(bootstrap))
    return 0


def _add_workload_flags(p) -> None:
    """Who this proxy is, as Istio knows a sidecar: namespace, pod labels, locality."""
    p.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE") or "default",
                   metavar="NS",
                   help="this proxy's namespace, and that of documents naming none: short names "
                        "expand to NAME.NS.svc.cluster.local, exportTo is checked against it; "
                        "also the source namespace of the Istio metrics (default: "
                        "$POD_NAMESPACE, else default)")
    p.add_argument("--labels", type=_labels, default={}, metavar="K=V[,K=V]",
                   help="this workload's labels, for sourceLabels matches and DestinationRule "
                        "workloadSelector (default: none)")
    p.add_argument("--locality", default="", metavar="REGION/ZONE/SUBZONE",
                   help="this proxy's locality, for locality load balancing (default: none)")


def _workload_options(args) -> dict:
    """Who this proxy is, and how its config compiles (compile_sources keyword arguments)."""
    return {"namespace": args.namespace, "labels": args.labels, "locality": args.locality,
            "sidecar": getattr(args, "sidecar", False),
            "outbound_traffic_policy": getattr(args, "outbound_traffic_policy", "ALLOW_ANY")}


_DEFAULT = object()  # a flag left at its default (argparse converts only string defaults)
SIDECAR_INBOUND = ("0.0.0.0", 15006)
SIDECAR_OUTBOUND = ("0.0.0.0", 15001)
SIDECAR_HEALTH = ("0.0.0.0", 15021)
EXPLICIT_LISTEN = ("127.0.0.1", 15001)


def _add_policy_flags(p) -> None:
    p.add_argument("--sidecar", action="store_true",
                   help="run as a pod's sidecar behind `meshcore iptables`: route each captured "
                        "connection by its original destination (service address and port) and "
                        "serve the inbound side (default: off, an explicit proxy on --listen)")
    p.add_argument("--outbound-traffic-policy", choices=("ALLOW_ANY", "REGISTRY_ONLY"),
                   default="ALLOW_ANY",
                   help="with --sidecar, where a destination outside the registry goes: "
                        "ALLOW_ANY passes it through to its original address, REGISTRY_ONLY "
                        "answers 502 (HTTP) or closes (TCP), as Istio's outboundTrafficPolicy "
                        "(default ALLOW_ANY)")


def _add_sidecar_flags(p) -> None:
    _add_policy_flags(p)
    p.add_argument("--inbound-listen", type=_hostport, default=None, metavar="HOST:PORT",
                   help="with --sidecar, where captured inbound connections arrive (default "
                        "0.0.0.0:15006)")
    p.add_argument("--health", type=_optional_hostport, default=_DEFAULT, metavar="HOST:PORT|off",
                   help="serve the readiness probe GET /healthz/ready here (200 once every "
                        "worker serves, 503 before and while draining) (default: 0.0.0.0:15021 "
                        "with --sidecar, else off)")


def sidecar_addresses(args) -> tuple:
    """(listen, inbound, health) after the --sidecar defaults; inbound is None without it."""
    listen = args.listen or (SIDECAR_OUTBOUND if args.sidecar else EXPLICIT_LISTEN)
    inbound = (args.inbound_listen or SIDECAR_INBOUND) if args.sidecar else None
    if args.health is _DEFAULT:
        health = SIDECAR_HEALTH if args.sidecar else None
    else:
        health = args.health  # None: --health off
    return listen, inbound, health


def _add_run_flags(p) -> None:
    p.add_argument("--config", action="append", required=True, default=None, metavar="FILE",
                   help="Istio YAML/JSON file or directory of them; repeatable (required)")
    _add_address_flags(p, run=True)
    _add_sidecar_flags(p)
    p.add_argument("--no-access-log", action="store_true",
                   help="turn the access log off (default: on, Istio's text format on stdout)")
    p.add_argument("--drain-grace", type=float, default=5.0, metavar="SECONDS",
                   help="how long in-flight requests may finish after SIGTERM (default 5)")
    p.add_argument("--no-watch", action="store_true",
                   help="do not reload when config files change (default: reload; SIGHUP always "
                        "reloads)")
    p.add_argument("--use-remote-address", action="store_true",
                   help="append the peer to x-forwarded-for, as a gateway does (default: off, as in "
                        "Istio sidecars)")
    p.add_argument("--request-headers-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="answer 408 and close when a request head takes longer (default 10)")
    p.add_argument("--max-connections", type=_non_negative_int, default=0, metavar="N",
                   help="per worker, close new client connections at once while N are open, "
                        "counted as listener downstream_global_cx_overflow (Envoy's overload "
                        "max_active_downstream_connections) (default 0: no limit)")
    p.add_argument("--stream-idle-timeout", type=_non_negative_float, default=300.0,
                   metavar="SECONDS",
                   help="end a request when no bytes moved either way for this long: 408 while "
                        "it arrives, 504 once complete, a reset once the response started "
                        "(Envoy's stream_idle_timeout; 0 turns it off) (default 300)")
    p.add_argument("--request-timeout", type=_non_negative_float, default=300.0,
                   metavar="SECONDS",
                   help="answer 408 when a request (head and body) is not received whole in this "
                        "time, so a trickled upload cannot hold an upstream connection forever "
                        "(Envoy's request_timeout, off in Envoy; 0 turns it off) (default 300)")
    p.add_argument("--admin-unsafe", action="store_true",
                   help="allow a non-loopback admin address (default: loopback only)")
    p.add_argument("--dns-refresh-rate", type=_positive_float, default=60.0, metavar="SECONDS",
                   help="re-resolve resolution: DNS names this often; a failed lookup keeps the "
                        "last good addresses (default: 60, Istio's)")
    _add_workload_flags(p)
    _add_observability_flags(p)


def _add_observability_flags(p) -> None:
    p.add_argument("--prometheus", type=_optional_hostport, default=("0.0.0.0", 15090),
                   metavar="HOST:PORT|off",
                   help="serve GET /stats/prometheus here (Istio's merged metrics port); 'off' "
                        "turns it off (default 0.0.0.0:15090; the admin port serves it too)")
    p.add_argument("--workload-name", default=None, metavar="NAME",
                   help="source_workload of the Istio metrics (default: $ISTIO_META_WORKLOAD_NAME,"
                        " else $POD_NAME without its pod suffixes, else unknown)")
    p.add_argument("--app", default=None, metavar="APP",
                   help="source_app of the Istio metrics (default: the app label in "
                        "$ISTIO_METAJSON_LABELS, else unknown)")
    p.add_argument("--version", dest="workload_version", default=None, metavar="VERSION",
                   help="source_version of the Istio metrics (default: the version label in "
                        "$ISTIO_METAJSON_LABELS, else unknown)")
    p.add_argument("--access-log-encoding", choices=("text", "json"), default="text",
                   help="access log encoding, as Istio's meshConfig.accessLogEncoding "
                        "(default text; json uses Istio's JSON field names)")
    p.add_argument("--access-log-file", default="/dev/stdout", metavar="PATH",
                   help="access log file, appended to (default /dev/stdout)")
    p.add_argument("--access-log-format", default=None, metavar="FORMAT",
                   help="access log format from Envoy command operators, e.g. "
                        "'%%START_TIME%% %%RESPONSE_CODE%%' (default: Istio's text format; with "
                        "json encoding, Istio's JSON fields)")


def _add_address_flags(p, run: bool = False) -> None:
    if run:  # the default depends on --sidecar (resolved in cmd_run)
        p.add_argument("--listen", type=_hostport, default=None, metavar="HOST:PORT",
                       help="where the proxy listens (with --sidecar: the outbound listener the "
                            "capture redirects to); each worker binds it with SO_REUSEPORT "
                            "(default 127.0.0.1:15001; 0.0.0.0:15001 with --sidecar)")
    else:
        p.add_argument("--listen", type=_hostport, default=("127.0.0.1", 15001), metavar="HOST:PORT",
                       help="where the proxy listens; each worker binds it with SO_REUSEPORT "
                            "(default 127.0.0.1:15001)")
    p.add_argument("--admin", type=_hostport, default=("127.0.0.1", 15000), metavar="HOST:PORT",
                   help="admin address (Envoy's admin endpoints; /help lists them) "
                        "(default 127.0.0.1:15000)")
    p.add_argument("--workers", type=_positive_int, default=DEFAULT_WORKERS, metavar="N",
                   help=f"worker processes (default: min(cores, 2) = {DEFAULT_WORKERS} here)")


def _add_demo_flags(p) -> None:
    from meshcore.demo.scenarios import DEFAULT_POD_PORT_BASE, SCENARIOS
    p.add_argument("scenario", nargs="?", choices=list(SCENARIOS), metavar="SCENARIO",
                   help=f"one of: {', '.join(SCENARIOS)} (default: list them)")
    p.add_argument("--walkthrough", action="store_true",
                   help="perform the article's steps, print them next to what the article reports, "
                        "exit 0 if all match and 1 if not (default: run until Ctrl-C)")
    _add_address_flags(p)
    p.add_argument("--pod-port-base", type=_port_base, default=DEFAULT_POD_PORT_BASE, metavar="N",
                   help="pods listen on N+1..N+6 (myweb), N+11..N+13 (retry-backend) and N+19 "
                        f"(sniffer); 0 picks free ports (default {DEFAULT_POD_PORT_BASE}, the "
                        "ports in examples/seed)")
    p.add_argument("--no-access-log", action="store_true",
                   help="do not stream the proxy's access log (default: streamed as [sidecar] "
                        "lines)")


def round_robin_notes(snapshot, workers: int) -> list[str]:
    """Why ROUND_ROBIN seems to skip or repeat pods when more than one worker serves."""
    from meshcore.config.policy import LB_ROUND_ROBIN
    names = sorted(c.service_host + (f" subset {c.subset}" if c.subset else "")
                   for c in snapshot.clusters.values()
                   if c.lb == LB_ROUND_ROBIN and c.ring_config is None and len(c.endpoints) > 1)
    if workers < 2 or not names:
        return []
    import textwrap
    return textwrap.wrap(f"note: ROUND_ROBIN with {workers} workers ({', '.join(names)}): each worker keeps its "
            "own cursor, as each Envoy worker thread has its own load balancer. Requests on one "
            "connection take the endpoints strictly in turn; requests on new connections land on "
            "either worker, so the turns interleave (a pod may repeat) while the counts per "
            f"endpoint stay within {workers} of each other.", width=100, subsequent_indent="  ",
                         break_on_hyphens=False)


def cmd_check(args) -> int:
    from meshcore.config.compile import compile_sources
    from meshcore.config.load import read_sources
    from meshcore.errors import ConfigError
    try:
        snapshot = compile_sources(read_sources(args.paths), **_workload_options(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} error(s)", file=sys.stderr)
        return 1
    if args.strict and snapshot.warnings:
        for warning in snapshot.warnings:
            print(f"error (--strict): {warning}", file=sys.stderr)
        print(f"{len(snapshot.warnings)} error(s) (warnings, with --strict)", file=sys.stderr)
        return 1
    for warning in snapshot.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for note in round_robin_notes(snapshot, args.workers):
        print(note)
    print(f"ok: {len(snapshot.vhosts)} virtual host names, {len(snapshot.clusters)} clusters, "
          f"{len(snapshot.warnings)} warning(s)")
    return 0


def cmd_run(args) -> int:
    from meshcore import _accel
    from meshcore.admin import is_loopback
    from meshcore.supervisor import Supervisor
    if _accel.load("loop") is None:
        why = ("MESHCORE_NO_EXTENSIONS is set" if _accel.DISABLED
               else "the compiled extensions are not built")
        print(f"meshcore: the data path is the compiled event loop (meshcore._ext.loop), and "
              f"{why}; build them with `bash scripts/bootstrap.sh` (or `pip install -e .`) and "
              "unset MESHCORE_NO_EXTENSIONS", file=sys.stderr)
        return 2
    if not is_loopback(args.admin[0]) and not args.admin_unsafe:
        print(f"meshcore: refusing admin address {args.admin[0]}: not loopback "
              "(pass --admin-unsafe to allow)", file=sys.stderr)
        return 2
    listen, inbound, health = sidecar_addresses(args)
    if args.inbound_listen is not None and not args.sidecar:
        print("meshcore: --inbound-listen needs --sidecar", file=sys.stderr)
        return 2
    if args.sidecar and inbound == listen:
        print(f"meshcore: the inbound listener {inbound[0]}:{inbound[1]} must differ from "
              "--listen", file=sys.stderr)
        return 2
    options = {"access_log": not args.no_access_log, "use_remote_address": args.use_remote_address,
               "request_headers_timeout": args.request_headers_timeout,
               "max_connections": args.max_connections,
               "stream_idle_timeout": args.stream_idle_timeout,
               "request_timeout": args.request_timeout,
               "dns_refresh_rate": args.dns_refresh_rate, "workload": _workload_options(args),
               "health": health,
               "sidecar": ({"inbound_listen": inbound,
                            "outbound_traffic_policy": args.outbound_traffic_policy}
                           if args.sidecar else None)}
    problem = _observability_options(args, options)
    if problem:
        print(f"meshcore: {problem}", file=sys.stderr)
        return 2
    sup = Supervisor(args.config, listen, args.admin, args.workers, options,
                     grace=args.drain_grace, watch=not args.no_watch)
    return sup.run()


def _observability_options(args, options: dict) -> str | None:
    """Add the metrics and access-log options; returns a problem to report, or None."""
    from meshcore.accesslog import AccessLogFormatError, compile_format
    from meshcore.metrics.labels import source_identity
    options["prometheus"] = args.prometheus
    options["source"] = source_identity(args.workload_name, args.namespace, args.app,
                                        args.workload_version, environ=os.environ)
    options["argv"] = ["meshcore"] + list(sys.argv[1:])
    options["access_log_encoding"] = args.access_log_encoding
    options["access_log_file"] = args.access_log_file
    options["access_log_format"] = args.access_log_format
    try:
        compile_format(args.access_log_format, args.access_log_encoding)
    except AccessLogFormatError as exc:
        return f"--access-log-format: {exc}"
    if args.access_log_file not in ("/dev/stdout", "-"):
        try:
            with open(args.access_log_file, "a"):
                pass
        except OSError as exc:
            return f"--access-log-file: cannot open {args.access_log_file}: {exc.strerror}"
    return None


def cmd_bench(argv) -> int:
    try:
        from bench.cli import main as bench_main
    except ImportError as exc:
        print(f"meshcore bench: the bench suite lives in bench/ of a source checkout; run it from "
              f"the repository root ({exc})", file=sys.stderr)
        return 2
    return bench_main(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":  # the suite parses its own flags
        return cmd_bench(argv[1:])
    if argv and argv[0] == "replay":
        from meshcore.replay import main as replay_main
        return replay_main(argv[1:])
    if argv and argv[0] == "top":
        from meshcore.top import main as top_main
        return top_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "check":
        return cmd_check(args)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "demo":
        from meshcore.demo import run_demo
        return run_demo(args)
    if args.command == "envoy-config":
        return cmd_envoy_config(args)
    if args.command == "iptables":
        from meshcore.sidecar.iptables import run_command
        return run_command(args)
    return 2


__all__ = ["__version__", "build_parser", "main", "round_robin_notes"]
