"""Every command README.md and examples/README.md show is run here, so the docs cannot go stale.

Which code blocks run (the rule for whoever edits the README):
- A fenced block whose info string is `sh` holds commands and is run. Any other block (`text`,
  `yaml`, `console`, no info string) is shown output or config and is never run.
- Each line of an `sh` block is one command (a trailing backslash continues it); blank lines and
  `#` comments are left to bash. Every command must exit 0 within COMMAND_TIMEOUT_S seconds.
- An HTML comment on the line right above the fence changes that:
    <!-- readme-test: skip REASON -->  the block is not run; REASON says why, e.g.
                                       `a benchmark: minutes of load on every core`.
    <!-- readme-test: background -->   each command is started and left running (as "in one
                                       terminal ..."): the test waits until the proxy's admin
                                       `/ready` answers 200, runs the blocks that follow in the same
                                       `##` section, then stops it with Ctrl-C (SIGINT); it must
                                       exit 0.
  Any other `readme-test:` comment fails the test, so a typo cannot skip a block silently.

The sandbox: commands run with bash (`set -eo pipefail`) from the repository root, with this
interpreter's bin directory first on PATH (`python` is the venv's) and HOME in a temporary
directory. Every port comes from the test: the proxy's default addresses in the text
(127.0.0.1:15001 and 127.0.0.1:15000) are replaced by free ports, `meshcore run` and `meshcore demo`
get `--listen`/`--admin` with those ports, and `meshcore demo` gets `--pod-port-base 0` (pods on
free ports). `bash scripts/demo.sh ARGS` runs as `python -m meshcore demo ARGS`: the suite runs after
scripts/bootstrap.sh (scripts/test.sh calls it), and test_demo_script_only_builds_then_runs_demo
checks that this is all scripts/demo.sh does.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", os.path.join("examples", "README.md"))
COMMAND_TIMEOUT_S = 240
DIRECTIVE = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    doc: str                 # the file, relative to the repository root
    line: int                # 1-based line of the opening fence
    section: str             # the enclosing `##` heading
    commands: list[str]
    mode: str = "run"        # run | skip | background
    reason: str = ""
    problems: list[str] = field(default_factory=list)


def parse_readme(text: str, name: str = "README.md") -> list[Block]:
    """The README's `sh` blocks, with their directives (see the module doc)."""
    blocks, section, lines = [], "", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        fence = re.match(r"^(```+|~~~+)\s*(\S*)", line)
        if not fence:
            i += 1
            continue
        marker, info = fence.group(1), fence.group(2)
        body = []
        i += 1
        while i < len(lines) and not lines[i].startswith(marker):
            body.append(lines[i])
            i += 1
        start = i - len(body)  # 1-based line of the fence is start
        i += 1
        directive = DIRECTIVE.match(lines[start - 2]) if start >= 2 else None
        if info != "sh":
            if directive:
                blocks.append(Block(name, start, section, [], "skip", problems=[
                    f"{name}:{start}: a readme-test directive above a `{info or 'plain'}` block, "
                    "which is never run"]))
            continue
        block = Block(name, start, section, _commands(body))
        if directive:
            words = directive.group(1)
            if words == "background":
                block.mode = "background"
            elif words.startswith("skip"):
                block.mode, block.reason = "skip", words[4:].strip()
                if not block.reason:
                    block.problems.append(f"{name}:{start}: `readme-test: skip` needs a reason")
            else:
                block.problems.append(f"{name}:{start}: unknown directive `readme-test: {words}`")
        blocks.append(block)
    return blocks


def _commands(body: list[str]) -> list[str]:
    out, pending = [], ""
    for line in body:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command = (pending + line).strip()
        pending = ""
        if command and not command.startswith("#"):
            out.append(command)
    return out


def sandboxed(command: str, listen: int, admin: int) -> str:
    """The command as the sandbox runs it (see the module doc)."""
    command = re.sub(r"\bbash scripts/demo\.sh\b", "python -m meshcore demo", command)
    command = command.replace("127.0.0.1:15001", f"127.0.0.1:{listen}")
    command = command.replace("127.0.0.1:15000", f"127.0.0.1:{admin}")
    addresses = f"--listen 127.0.0.1:{listen} --admin 127.0.0.1:{admin}"
    command = re.sub(r"\bmeshcore demo\b", f"meshcore demo {addresses} --pod-port-base 0", command)
    return re.sub(r"\bmeshcore run\b", f"meshcore run {addresses}", command)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sandbox:
    def __init__(self, tmp: str):
        self.tmp = tmp
        self.listen, self.admin = _free_port(), _free_port()
        bindir = os.path.dirname(sys.executable)
        self.env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
                        HOME=tmp, PYTHONUNBUFFERED="1")
        self.background: list[tuple[str, subprocess.Popen, str]] = []

    def run(self, block: Block, command: str) -> None:
        cmd = sandboxed(command, self.listen, self.admin)
        proc = subprocess.run(["bash", "-c", "set -eo pipefail\n" + cmd], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        assert proc.returncode == 0, (
            f"{block.doc}:{block.line} ({block.section}): `{command}` exited {proc.returncode}\n"
            f"ran as: {cmd}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")

    def start(self, block: Block, command: str) -> None:
        cmd = sandboxed(command, self.listen, self.admin)
        log = os.path.join(self.tmp, f"background-{len(self.background)}.log")
        with open(log, "wb") as out:
            proc = subprocess.Popen(["bash", "-c", "exec " + cmd], cwd=REPO, env=self.env,
                                    stdout=out, stderr=subprocess.STDOUT)
        self.background.append((command, proc, log))
        deadline = time.monotonic() + COMMAND_TIMEOUT_S
        while time.monotonic() < deadline:
            assert proc.poll() is None, (f"{block.doc}:{block.line}: `{command}` exited "
                                         f"{proc.returncode} before it was ready:\n{_tail(log)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{block.doc}:{block.line}: `{command}` not ready:\n{_tail(log)}")

    def stop_background(self) -> None:
        failures = []
        for command, proc, log in self.background:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    failures.append(f"`{command}` did not stop on Ctrl-C:\n{_tail(log)}")
                    continue
            if proc.returncode != 0:
                failures.append(f"`{command}` exited {proc.returncode} on Ctrl-C:\n{_tail(log)}")
        self.background.clear()
        assert not failures, "\n".join(failures)


def _tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-4000:]


def _sections() -> dict[str, list[Block]]:
    """"doc: section" -> its `sh` blocks (a block before any `##` heading: section "(top)")."""
    out: dict[str, list[Block]] = {}
    for doc in DOCS:
        with open(os.path.join(REPO, doc)) as f:
            for block in parse_readme(f.read(), doc):
                out.setdefault(f"{doc}: {block.section or '(top)'}", []).append(block)
    return out


SECTIONS = _sections()


@pytest.mark.parametrize("section", list(SECTIONS))
def test_doc_section_commands_work(section):
    blocks = SECTIONS[section]
    problems = [p for b in blocks for p in b.problems]
    assert not problems, "\n".join(problems)
    runnable = [b for b in blocks if b.mode != "skip"]
    if not runnable:
        return  # every block here says why it is not run (checked above)
    if any("curl " in c for b in runnable for c in b.commands) and shutil.which("curl") is None:
        pytest.skip("the commands use curl, which is not installed here")
    with tempfile.TemporaryDirectory(prefix="meshcore-readme-") as tmp:
        box = Sandbox(tmp)
        try:
            for block in runnable:
                for command in block.commands:
                    if block.mode == "background":
                        box.start(block, command)
                    else:
                        box.run(block, command)
        finally:
            box.stop_background()


def test_the_readme_shows_commands_at_all():
    blocks = [b for bs in SECTIONS.values() for b in bs if b.mode != "skip"]
    assert sum(len(b.commands) for b in blocks if b.doc == "README.md") >= 5
    assert any("--walkthrough" in c for b in blocks for c in b.commands)


def test_demo_script_only_builds_then_runs_demo():
    with open(os.path.join(REPO, "scripts", "demo.sh")) as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines == ["set -euo pipefail", 'cd "$(dirname "$0")/.."', "bash scripts/bootstrap.sh",
                     'exec .venv/bin/python -m meshcore demo "$@"']


def test_the_rule_runs_sh_blocks_and_honours_directives():
    text = "\n".join([
        "## A", "```sh", "echo one \\", "  two", "# a comment", "", "echo three", "```",
        "```text", "not run", "```",
        "<!-- readme-test: skip needs the network -->", "```sh", "curl example.org", "```",
        "## B", "<!-- readme-test: background -->", "```sh", "python -m meshcore demo retry", "```",
        "<!-- readme-test: skip -->", "```sh", "x", "```",
        "<!-- readme-test: sometimes -->", "```sh", "y", "```",
    ])
    a1, a2, b1, b2, b3 = parse_readme(text)
    assert (a1.section, a1.mode, a1.commands) == ("A", "run", ["echo one    two", "echo three"])
    assert (a2.mode, a2.reason) == ("skip", "needs the network")
    assert (b1.section, b1.mode) == ("B", "background")
    assert b2.problems == ["README.md:22: `readme-test: skip` needs a reason"]
    assert b3.problems == ["README.md:26: unknown directive `readme-test: sometimes`"]


def test_the_sandbox_moves_every_port():
    cmd = sandboxed("bash scripts/demo.sh retry --walkthrough", 1001, 1000)
    assert cmd == ("python -m meshcore demo --listen 127.0.0.1:1001 --admin 127.0.0.1:1000 "
                   "--pod-port-base 0 retry --walkthrough")
    assert sandboxed("curl -s http://127.0.0.1:15000/stats", 1001, 1000) == "curl -s http://127.0.0.1:1000/stats"
    assert "--listen 127.0.0.1:1001" in sandboxed("python -m meshcore run --config x", 1001, 1000)
