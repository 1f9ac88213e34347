"""Command line: `python -m meshcore run|check|demo`.

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

    demo = sub.add_parser("demo", help="start the demo backends and the proxy on examples/demo")
    _add_run_flags(demo, config_required=False)
    sub.add_parser("bench", help="run the benchmark suite in bench/ (from a source checkout)",
                   add_help=False)
    sub.add_parser("replay", help="replay a capture file: replay FILE --to HOST:PORT [--rate R]",
                   add_help=False)
    _add_envoy_config_parser(sub)
    return parser


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


def cmd_check(paths) -> int:
    from meshcore.config.compile import compile_sources
    from meshcore.config.load import read_sources
    from meshcore.errors import ConfigError
    try:
        snapshot = compile_sources(read_sources(paths))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} error(s)", file=sys.stderr)
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
               "request_headers_timeout": args.request_headers_timeout}
    sup = Supervisor(args.config, args.listen, args.admin, args.workers, options,
                     grace=args.drain_grace, watch=not args.no_watch)
    return sup.run()


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
    args = build_parser().parse_args(argv)
    if args.command == "check":
        return cmd_check(args.paths)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "demo":
        from meshcore.demo import run_demo
        return run_demo(args)
    if args.command == "envoy-config":
        return cmd_envoy_config(args)
    return 2
