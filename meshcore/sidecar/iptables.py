"""`meshcore iptables`: Istio's istio-iptables capture rules for the current network namespace.

The rules are those istio-iptables installs in REDIRECT mode (tools/istio-iptables/pkg/capture/
run.go), with Istio's chain names so operators recognise them:

    nat PREROUTING  -p tcp -j ISTIO_INBOUND          (only when some inbound port is captured)
    ISTIO_INBOUND   -p tcp --dport <excluded> -j RETURN   (the proxy's own ports, then the user's)
                    -p tcp [--dport <included>] -j ISTIO_IN_REDIRECT
    ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
    nat OUTPUT      -j ISTIO_OUTPUT
    ISTIO_OUTPUT    -p tcp|udp --dport <excluded> -j RETURN
                    -o lo -s 127.0.0.6/32 -j RETURN                  (inbound passthrough source)
                    -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337
                        -j ISTIO_IN_REDIRECT                         (the proxy calling its own pod)
                    -o lo -m owner ! --uid-owner 1337 -j RETURN      (app to app over loopback)
                    -m owner --uid-owner 1337 -j RETURN              (the proxy itself: no loop)
                    (the same three for --proxy-gid)
                    -d 127.0.0.1/32 -j RETURN
                    -d <excluded cidr> -j RETURN
                    -j ISTIO_REDIRECT
    ISTIO_REDIRECT  -p tcp -j REDIRECT --to-ports 15001

Rules of this module:
- `capture_rules(config, family)` is pure: the iptables argument vectors (without the binary) in
  the order they are applied. `cleanup_rules(listing)` is pure too: from `iptables -t nat -S`
  output, the commands that remove every jump into the ISTIO_* chains and the chains themselves.
- Idempotent: `install` removes what a previous run (or istio-iptables) left, then applies, so
  running it twice leaves one set of rules. `--clean` only removes.
- The proxy's ports (15000 admin, 15001 outbound, 15006 inbound, 15021 health, 15090 Prometheus,
  and the --outbound-port/--inbound-port given) are never captured inbound, as Istio's injector
  excludes them.
- IPv6 (`--ipv6`): the same rules through ip6tables with ::1/128 and ::6/128, and the IPv6 CIDRs of
  --exclude-outbound-cidrs. Off by default (Istio: only on dual-stack pods).
"""
from __future__ import annotations

import ipaddress
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field

__all__ = ["CHAINS", "PROXY_PORTS", "CaptureConfig", "IptablesError", "capture_rules",
           "cleanup_rules", "cleanup_plan", "parse_ports", "parse_cidrs", "install", "clean",
           "dry_run_lines"]

INBOUND = "ISTIO_INBOUND"
REDIRECT = "ISTIO_REDIRECT"
IN_REDIRECT = "ISTIO_IN_REDIRECT"
OUTPUT = "ISTIO_OUTPUT"
CHAINS = (INBOUND, REDIRECT, IN_REDIRECT, OUTPUT)  # creation order, as istio-iptables
# admin, outbound, inbound, health (Istio's 15021), Prometheus (15090): never captured inbound
PROXY_PORTS = (15000, 15001, 15006, 15021, 15090)
INBOUND_TUNNEL_PORT = 15008  # Istio's HBONE port: the proxy's own calls to it are not looped back
INBOUND_PASSTHROUGH_SOURCE = {4: "127.0.0.6/32", 6: "::6/128"}
LOOPBACK = {4: "127.0.0.1/32", 6: "::1/128"}
BINARY = {4: "iptables", 6: "ip6tables"}


class IptablesError(Exception):
    """An iptables command failed; `str()` names the command and iptables' message."""


@dataclass(frozen=True)
class CaptureConfig:
    proxy_uid: int = 1337
    proxy_gid: int | None = None  # None: the proxy uid (istio-iptables' default)
    outbound_port: int = 15001
    inbound_port: int = 15006
    include_inbound_ports: object = "*"  # "*" (every port) or a tuple of ports; () = none
    exclude_inbound_ports: tuple = ()
    exclude_outbound_ports: tuple = ()
    exclude_outbound_cidrs: tuple = field(default=())  # normalised CIDR strings, v4 and v6

    @property
    def gid(self) -> int:
        return self.proxy_uid if self.proxy_gid is None else self.proxy_gid

    def inbound_excluded(self) -> tuple[int, ...]:
        """Ports never captured inbound: the proxy's, then the user's, without repeats."""
        ports = PROXY_PORTS + (self.outbound_port, self.inbound_port) + tuple(self.exclude_inbound_ports)
        return tuple(dict.fromkeys(ports))


def parse_ports(text: str, *, allow_star: bool = False):
    """`"80,8080"` -> (80, 8080); `""` -> (); `"*"` -> "*" when allowed. Raises ValueError."""
    text = text.strip()
    if allow_star and text == "*":
        return "*"
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise ValueError(f"expected a port number 1-65535, got {item!r}"
                             + (" (or '*' for every port)" if allow_star else ""))
        out.append(int(item))
    return tuple(dict.fromkeys(out))


def parse_cidrs(text: str) -> tuple[str, ...]:
    """`"10.0.0.0/8,fd00::/8,192.168.1.1"` -> normalised CIDRs (a bare address is /32 or /128)."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValueError(f"expected an IP address or CIDR, got {item!r}") from None
    return tuple(dict.fromkeys(out))


def capture_rules(cfg: CaptureConfig, family: int = 4) -> list[list[str]]:
    """The iptables argument vectors that install the capture, in order (see module doc)."""
    if family not in (4, 6):
        raise ValueError("family must be 4 or 6")
    lo = LOOPBACK[family]
    rules: list[list[str]] = [["-t", "nat", "-N", chain] for chain in CHAINS]

    def add(chain: str, *params: str) -> None:
        rules.append(["-t", "nat", "-A", chain, *params])

    add(REDIRECT, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(cfg.outbound_port))
    add(IN_REDIRECT, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(cfg.inbound_port))

    include = cfg.include_inbound_ports
    if include:  # "*" or a non-empty tuple; () means no inbound capture at all
        add("PREROUTING", "-p", "tcp", "-j", INBOUND)
        for port in cfg.inbound_excluded():
            add(INBOUND, "-p", "tcp", "--dport", str(port), "-j", "RETURN")
        if include == "*":
            add(INBOUND, "-p", "tcp", "-j", IN_REDIRECT)
        else:
            for port in include:
                add(INBOUND, "-p", "tcp", "--dport", str(port), "-j", IN_REDIRECT)

    add("OUTPUT", "-j", OUTPUT)
    for port in cfg.exclude_outbound_ports:
        add(OUTPUT, "-p", "tcp", "--dport", str(port), "-j", "RETURN")
        add(OUTPUT, "-p", "udp", "--dport", str(port), "-j", "RETURN")
    add(OUTPUT, "-o", "lo", "-s", INBOUND_PASSTHROUGH_SOURCE[family], "-j", "RETURN")
    for kind, ident in (("--uid-owner", cfg.proxy_uid), ("--gid-owner", cfg.gid)):
        # The proxy calling its own pod through a service address: to the inbound side
        add(OUTPUT, "-o", "lo", "!", "-d", lo, "-p", "tcp", "!", "--dport", str(INBOUND_TUNNEL_PORT),
            "-m", "owner", kind, str(ident), "-j", IN_REDIRECT)
        # Anyone else over loopback (app to app in the pod): untouched
        add(OUTPUT, "-o", "lo", "-m", "owner", "!", kind, str(ident), "-j", "RETURN")
        # The proxy's own upstream connections: never captured again
        add(OUTPUT, "-m", "owner", kind, str(ident), "-j", "RETURN")
    add(OUTPUT, "-d", lo, "-j", "RETURN")
    for cidr in cfg.exclude_outbound_cidrs:
        if ipaddress.ip_network(cidr).version == family:
            add(OUTPUT, "-d", cidr, "-j", "RETURN")
    add(OUTPUT, "-j", REDIRECT)
    return rules


def cleanup_rules(listing: str) -> list[list[str]]:
    """Commands that remove the capture, from `iptables -t nat -S` output: every rule of a built-in
    chain that jumps to an ISTIO_* chain (whatever its matches), then each ISTIO_* chain that
    exists, flushed and deleted (all flushed before any is deleted: they reference each other)."""
    deletes: list[list[str]] = []
    present: list[str] = []
    for line in listing.splitlines():
        words = shlex.split(line)
        if len(words) >= 2 and words[0] == "-N" and words[1] in CHAINS:
            present.append(words[1])
        elif len(words) >= 2 and words[0] == "-A" and words[1] not in CHAINS:
            target = _target(words)
            if target in CHAINS:
                deletes.append(["-t", "nat", "-D", *words[1:]])
    order = [c for c in reversed(CHAINS) if c in present]
    return (deletes + [["-t", "nat", "-F", c] for c in order]
            + [["-t", "nat", "-X", c] for c in order])


def cleanup_plan() -> list[list[str]]:
    """What `--clean` removes when the rules are the ones `capture_rules` installs (for --dry-run;
    the real clean reads the table and also removes variants another tool left)."""
    listing = "\n".join([f"-N {c}" for c in CHAINS]
                        + [f"-A PREROUTING -p tcp -j {INBOUND}", f"-A OUTPUT -j {OUTPUT}"])
    return cleanup_rules(listing)


def _target(words: list[str]) -> str | None:
    for flag in ("-j", "-g"):
        if flag in words:
            i = words.index(flag)
            if i + 1 < len(words):
                return words[i + 1]
    return None


def dry_run_lines(cfg: CaptureConfig, families=(4,), *, clean_only: bool = False) -> list[str]:
    """The commands --dry-run prints, shell-quoted, one per line."""
    lines = []
    for family in families:
        binary = BINARY[family]
        lines.append(f"# {binary}: remove the ISTIO_* chains and jumps a previous run left")
        lines.extend(shlex.join([binary, *argv]) for argv in cleanup_plan())
        if not clean_only:
            lines.append(f"# {binary}: install the capture")
            lines.extend(shlex.join([binary, *argv]) for argv in capture_rules(cfg, family))
    return lines


# ------------------------------------------------------------------------------------------------
# The thin runner: the only part that touches the system


def _run(binary: str, argv: list[str], runner) -> subprocess.CompletedProcess:
    return runner([binary, "-w", *argv], capture_output=True, text=True)


def _binary(family: int) -> str:
    binary = shutil.which(BINARY[family])
    if binary is None:
        raise IptablesError(f"{BINARY[family]} not found on PATH (install the iptables package: "
                            "apt-get install iptables)")
    return binary


def _clean(binary: str, runner) -> int:
    listing = _run(binary, ["-t", "nat", "-S"], runner)
    if listing.returncode != 0:
        raise IptablesError(f"{binary} -t nat -S failed: {listing.stderr.strip()}")
    removed = 0
    for argv in cleanup_rules(listing.stdout):
        done = _run(binary, argv, runner)
        if done.returncode != 0:
            raise IptablesError(f"{shlex.join([binary, *argv])} failed: {done.stderr.strip()}")
        removed += 1
    return removed


def clean(families=(4,), runner=subprocess.run) -> int:
    """Remove the capture; returns how many commands it took (0: nothing was installed)."""
    return sum(_clean(_binary(f), runner) for f in families)


def install(cfg: CaptureConfig, families=(4,), runner=subprocess.run) -> int:
    """Remove any previous capture, then install this one; returns the number of rules applied.
    Raises IptablesError naming the first command that failed."""
    applied = 0
    for family in families:
        binary = _binary(family)
        _clean(binary, runner)
        for argv in capture_rules(cfg, family):
            done = _run(binary, argv, runner)
            if done.returncode != 0:
                raise IptablesError(f"{shlex.join([binary, *argv])} failed: {done.stderr.strip()}")
            applied += 1
    return applied


def run_command(args, out=None, err=None) -> int:
    """`meshcore iptables` (flags parsed by meshcore.cli): 0 done, 1 iptables failed, 2 bad flags."""
    import sys
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        cfg = CaptureConfig(
            proxy_uid=args.proxy_uid, proxy_gid=args.proxy_gid,
            outbound_port=args.outbound_port, inbound_port=args.inbound_port,
            include_inbound_ports=parse_ports(args.include_inbound_ports, allow_star=True),
            exclude_inbound_ports=parse_ports(args.exclude_inbound_ports),
            exclude_outbound_ports=parse_ports(args.exclude_outbound_ports),
            exclude_outbound_cidrs=parse_cidrs(args.exclude_outbound_cidrs))
    except ValueError as exc:
        print(f"meshcore iptables: {exc}", file=err)
        return 2
    families = (4, 6) if args.ipv6 else (4,)
    if args.dry_run:
        for line in dry_run_lines(cfg, families, clean_only=args.clean):
            print(line, file=out)
        return 0
    try:
        if args.clean:
            n = clean(families)
            print(f"meshcore iptables: removed the capture ({n} commands)" if n else
                  "meshcore iptables: no capture installed; nothing to remove", file=out)
        else:
            n = install(cfg, families)
            inbound = ("every port" if cfg.include_inbound_ports == "*" else
                       ", ".join(map(str, cfg.include_inbound_ports)) or "none")
            print(f"meshcore iptables: installed {n} rules: outbound TCP -> :{cfg.outbound_port} "
                  f"(except uid/gid {cfg.proxy_uid}/{cfg.gid} and loopback), inbound TCP "
                  f"({inbound}; never {','.join(map(str, cfg.inbound_excluded()))}) -> "
                  f":{cfg.inbound_port}", file=out)
    except IptablesError as exc:
        print(f"meshcore iptables: {exc}", file=err)
        return 1
    return 0
