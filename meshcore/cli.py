"""Command line: `python -m meshcore run|check|demo|top`.

The flag names of `run` (--config, --listen, --admin, --workers) are a fixed interface.
"""
from __future__ import annotations

import argparse
import os
import sys

from meshcore import __version__


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


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshcore", description=__doc__)
    parser.add_argument("--version", action="version", version=f"meshcore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the proxy")
    _add_run_flags(run)

    check = sub.add_parser("check", help="validate config files; exit non-zero on any error")
    check.add_argument("paths", nargs="+", metavar="FILE", help="YAML/JSON file or directory")
    check.add_argument("--strict", action="store_true",
                       help="treat every warning as an error, for CI (default: warnings only print)")
    _add_workload_flags(check)

    demo = sub.add_parser("demo", help="start the demo backends and the proxy on examples/demo")
    _add_run_flags(demo, config_required=False)
    sub.add_parser("bench", help="run the benchmark suite in bench/ (from a source checkout)",
                   add_help=False)
    sub.add_parser("replay", help="replay a capture file: replay FILE --to HOST:PORT [--rate R]",
                   add_help=False)
    sub.add_parser("top", help="live per-cluster and per-endpoint view of a running proxy: "
                   "top [--admin HOST:PORT] (default 127.0.0.1:15000)", add_help=False)
    return parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _labels(text: str) -> dict:
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected key=value[,key=value...], got {text!r}")
        out[key] = value
    return out


def _add_workload_flags(p):
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
    return {"namespace": args.namespace, "labels": args.labels, "locality": args.locality}


def _add_run_flags(p, config_required=True):
    p.add_argument("--config", action="append", required=config_required, default=None,
                   metavar="FILE", help="YAML/JSON file or directory (repeatable)")
    p.add_argument("--listen", type=_hostport, default=("127.0.0.1", 15001), metavar="HOST:PORT")
    p.add_argument("--admin", type=_hostport, default=("127.0.0.1", 15000), metavar="HOST:PORT")
    p.add_argument("--workers", type=_positive_int, default=max(1, min(os.cpu_count() or 1, 2)))
    p.add_argument("--no-access-log", action="store_true", help="turn the access log off")
    p.add_argument("--drain-grace", type=float, default=5.0, metavar="SECONDS",
                   help="how long in-flight requests may finish after SIGTERM")
    p.add_argument("--no-watch", action="store_true", help="do not reload when config files change")
    p.add_argument("--use-remote-address", action="store_true",
                   help="append the peer to x-forwarded-for (Envoy use_remote_address; Istio "
                        "sidecars leave it off)")
    p.add_argument("--request-headers-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="408 and close when a request head takes longer (slowloris defence)")
    p.add_argument("--admin-unsafe", action="store_true",
                   help="allow a non-loopback admin address")
    p.add_argument("--dns-refresh-rate", type=_positive_float, default=60.0, metavar="SECONDS",
                   help="re-resolve resolution: DNS names this often; a failed lookup keeps the "
                        "last good addresses (default: 60, Istio's)")
    _add_workload_flags(p)
    _add_observability_flags(p)


def _add_observability_flags(p):
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
                        "'%%START_TIME% %%RESPONSE_CODE%%\n' (default: Istio's text format; with "
                        "json encoding, Istio's JSON fields)")


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
    options = {"access_log": not args.no_access_log, "use_remote_address": args.use_remote_address,
               "request_headers_timeout": args.request_headers_timeout,
               "dns_refresh_rate": args.dns_refresh_rate, "workload": _workload_options(args)}
    problem = _observability_options(args, options)
    if problem:
        print(f"meshcore: {problem}", file=sys.stderr)
        return 2
    sup = Supervisor(args.config, args.listen, args.admin, args.workers, options,
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
    return 2
