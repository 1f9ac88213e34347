"""Pods as Linux network namespaces, for the sidecar tests (transparent capture needs iptables,
and iptables needs a network namespace of its own).

    with Lab() as lab:
        client = lab.add_pod("client")            # 10.213.<n>.2 and fd00:213:<n>::2, default
        server = lab.add_pod("server")            # routes via the bridge; 10.213.<n>.3 ...
        lab.run(client, ["python", "-m", "meshcore", "iptables"])
        proc = lab.spawn(server, [...])           # killed when the lab closes
        lab.run(client, [...], user=1337)         # as the proxy's uid (setpriv)

Layout: a "switch" namespace holds a bridge (the node's network, 10.213.<n>.1/24); every pod is a
namespace whose `eth0` is one end of a veth pair, the other end plugged into the bridge. Nothing is
created in the test process's own namespace, so the machine's network is never touched and every
address (10.213.<n>.0/24, and any service VIP a test routes) exists only inside the lab.

Cleanup always happens (`with` exit, even on failure): every process in the lab's namespaces is
killed (by pid, from `ip netns pids`), then the namespaces are deleted (which deletes their
interfaces and the bridge). Namespaces left by a test process that died without cleaning up
(name `mctest-<pid>-...` with that pid gone) are removed when the next lab starts.

`unavailable()` says why a lab cannot be built here (not root, no `ip`, the kernel refuses network
namespaces), or None; tests skip with that reason. iptables missing is not a reason to skip:
scripts/bootstrap.sh installs it, and a test that needs it fails saying so.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

__all__ = ["Lab", "Pod", "unavailable", "PYTHON", "REPO", "TOOLS", "shared_tempdir"]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable
TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "netns_tools.py")
PREFIX = "mctest"
_NAME = re.compile(rf"^{PREFIX}-(\d+)-")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """Why network-namespace tests cannot run here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "network namespaces need root (run the tests as root, as CI does)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"{PREFIX}-{os.getpid()}-probe{random.randrange(1 << 30)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"the kernel refuses network namespaces: ip netns add: {made.stderr.strip()}"
    try:
        veth = _ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1",
                   check=False)
        if veth.returncode != 0:
            return f"the kernel has no veth support: {veth.stderr.strip()}"
        bridge = _ip("-n", probe, "link", "add", "b0", "type", "bridge", check=False)
        if bridge.returncode != 0:
            return f"the kernel has no bridge support: {bridge.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _sweep_stale() -> None:
    """Delete namespaces a dead test process left behind."""
    listing = _ip("netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME.match(name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _kill_ns_processes(name)
            _ip("netns", "del", name, check=False)


def _kill_ns_processes(ns: str) -> None:
    pids = _ip("netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


class Pod:
    """One network namespace with `eth0` on the lab's bridge."""

    def __init__(self, name: str, ns: str, ip: str, ip6: str = ""):
        self.name = name
        self.ns = ns
        self.ip = ip
        self.ip6 = ip6

    def __repr__(self) -> str:
        return f"<Pod {self.name} {self.ip} netns {self.ns}>"


class Lab:
    def __init__(self, third_octet: int | None = None):
        self.tag = f"{PREFIX}-{os.getpid()}-{random.randrange(1 << 24):06x}"
        octet = third_octet if third_octet is not None else random.randrange(1, 250)
        self.net = f"10.213.{octet}"
        self.gateway = f"{self.net}.1"
        self.net6 = f"fd00:213:{octet:x}"  # IPv6 twin: fd00:213:<octet>::<index>/64
        self.gateway6 = f"{self.net6}::1"
        self.switch = f"{self.tag}-sw"
        self.pods: dict[str, Pod] = {}
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen] = []

    # --- lifecycle ---

    def __enter__(self) -> "Lab":
        _sweep_stale()
        try:
            self._add_ns(self.switch)
            self._in(self.switch, "link", "add", "br0", "type", "bridge")
            self._in(self.switch, "addr", "add", f"{self.gateway}/24", "dev", "br0")
            self._in(self.switch, "addr", "add", f"{self.gateway6}/64", "dev", "br0", "nodad")
            self._in(self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
        for proc in self.processes:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            for reader in getattr(proc, "readers", ()):
                reader.join(timeout=5)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        for ns in reversed(self.namespaces):
            _kill_ns_processes(ns)
            _ip("netns", "del", ns, check=False)
        self.namespaces.clear()

    # --- topology ---

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        self._in(ns, "link", "set", "lo", "up")

    def _in(self, ns: str, *args: str) -> str:
        done = _ip("-n", ns, *args, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"ip -n {ns} {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def add_pod(self, name: str) -> Pod:
        """A new pod namespace at the next free address, with a default route via the bridge."""
        index = len(self.pods) + 2
        ns = f"{self.tag}-{name}"
        ip = f"{self.net}.{index}"
        self._add_ns(ns)
        port = f"veth{index}"
        self._in(self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                 "netns", ns)
        self._in(self.switch, "link", "set", port, "master", "br0")
        self._in(self.switch, "link", "set", port, "up")
        self._in(ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        ip6 = f"{self.net6}::{index:x}"
        self._in(ns, "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad")  # usable at once
        self._in(ns, "link", "set", "eth0", "up")
        self._in(ns, "route", "add", "default", "via", self.gateway)
        self._in(ns, "-6", "route", "add", "default", "via", self.gateway6)
        pod = Pod(name, ns, ip, ip6)
        self.pods[name] = pod
        return pod

    def add_address(self, pod: Pod, address: str) -> None:
        """Give a pod one more address (a service VIP a test wants reachable)."""
        self._in(pod.ns, "addr", "add", address, "dev", "eth0")

    # --- running things inside a pod ---

    @staticmethod
    def command(pod: Pod, argv: list[str], user: int | None = None) -> list[str]:
        """The argv that runs `argv` inside `pod` (as `user`, uid and gid, when given)."""
        prefix = ["ip", "netns", "exec", pod.ns]
        if user is not None:
            prefix += ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
            if not _interpreter_public():
                # This interpreter lives under a directory only root may enter (pyenv in /root):
                # let the uid read and search directories, or it could not start Python again
                # (meshcore spawns its workers with sys.executable). Nothing else changes: the
                # process is still that uid for iptables' owner match.
                prefix += ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
            prefix.append("--")
        return prefix + [str(a) for a in argv]

    def run(self, pod: Pod, argv: list[str], *, user: int | None = None, check: bool = True,
            timeout: float = 30.0, input: str | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(self.command(pod, argv, user), capture_output=True, text=True,
                              timeout=timeout, input=input, cwd=REPO, env=_env())
        if check and done.returncode != 0:
            raise AssertionError(f"in {pod.name}: {' '.join(map(str, argv))} exited {done.returncode}\n"
                                 f"stdout: {done.stdout}\nstderr: {done.stderr}")
        return done

    def spawn(self, pod: Pod, argv: list[str], *, user: int | None = None,
              ready: str | None = "ready", timeout: float = 15.0) -> subprocess.Popen:
        """Start a process inside `pod` (killed when the lab closes). With `ready`, wait until its
        stdout prints a line starting with that word."""
        proc = subprocess.Popen(self.command(pod, argv, user), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=REPO, env=_env())
        self.processes.append(proc)
        if ready is not None:
            deadline = time.monotonic() + timeout
            import selectors
            sel = selectors.DefaultSelector()
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    proc.kill()
                    raise TimeoutError(f"in {pod.name}: {' '.join(argv)} did not print {ready!r}: "
                                       f"{proc.stderr.read() if proc.poll() is not None else ''}")
                line = proc.stdout.readline()
                if not line:
                    proc.wait()
                    raise RuntimeError(f"in {pod.name}: {' '.join(argv)} exited "
                                       f"{proc.returncode}: {proc.stderr.read()}")
                if line.startswith(ready):
                    break
            sel.close()
        # Keep reading what it prints (a full pipe would block it); `proc.lines` /
        # `proc.errors` hold it for assertions and failure messages.
        proc.lines, proc.errors = [], []
        proc.readers = [threading.Thread(target=_drain, args=(pipe, into), daemon=True)
                        for pipe, into in ((proc.stdout, proc.lines), (proc.stderr, proc.errors))]
        for reader in proc.readers:
            reader.start()
        return proc


    def wait_http(self, pod: Pod, url: str, status: int = 200, timeout: float = 20.0,
                  process: subprocess.Popen | None = None) -> None:
        """Poll `url` from inside `pod` until it answers `status` (a proxy's readiness port)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"exited {process.returncode} before {url} answered: "
                                   f"{''.join(getattr(process, 'errors', []))}")
            done = self.run(pod, [PYTHON, TOOLS, "get", url], check=False)
            last = done.stdout or done.stderr
            if done.returncode == 0 and done.stdout.startswith(f"{status} "):
                return
            time.sleep(0.2)
        raise TimeoutError(f"in {pod.name}: {url} never answered {status} (last: {last!r})")


def _drain(pipe, into: list) -> None:
    try:
        for line in pipe:
            into.append(line)
    except (OSError, ValueError):
        pass


def _interpreter_public() -> bool:
    """Whether any uid can start this interpreter and read its standard library."""
    import stat
    for path in {os.path.realpath(sys.executable), os.path.realpath(sys.base_prefix), REPO}:
        while True:
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return False
    return True


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def shared_tempdir(prefix: str = "mctest-") -> str:
    """A temporary directory other uids can read (the proxy runs as 1337 in these tests); the
    caller removes it (shutil.rmtree)."""
    import tempfile
    path = tempfile.mkdtemp(prefix=prefix)
    os.chmod(path, 0o755)
    return path
