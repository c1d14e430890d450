#!/usr/bin/env python3
"""Runs every shell example of README.md as written, against a live echod.

Every ```sh (or ```bash, ```shell) block is an example. For each block the runner makes a
scratch directory, runs the block's setup, starts the servers it asks for (by default
`echod --listen 127.0.0.1:8080 --metrics-listen 127.0.0.1:9007`, the ports the README uses)
and waits for their start-up line, then runs each command of the block in turn with a timeout,
runs the block's checks, and stops the servers with SIGTERM, which must end in exit status 0.
A failure names the file and line of the command, with its output. Exit status: 0 when every
example passed, 1 when one failed, 2 on a usage error or a malformed directive.

A block's needs are said in an HTML comment right before it (invisible on a rendered page):

    <!-- example
    packages: socat netcat-openbsd      Debian packages the block uses (--install gets them)
    setup: openssl req -x509 ...        run first, in the scratch directory; repeatable
    server: echod --listen 127.0.0.1:8443 --tls-cert cert.pem ...   replaces the default
                                        server; repeatable; `server: none` for no server
    input: hello                        each command's standard input (`\\n` for newlines;
                                        a newline is added); default: none (/dev/null)
    check: grep -qx hello out.2         run after the commands; repeatable; out.N and err.N
                                        hold the Nth command's stdout and stderr
    cleanup: rm -f /tmp/blob            run at the end, also after a failure; repeatable
    timeout: 60s                        per command, setup, check (default 30s)
    cwd: repo                           run the commands in the repository, not the scratch
                                        directory (setup, servers and checks stay there)
    -->

or, for one directive, `<!-- example: skip: why this block cannot run here -->`. A directive
comment that is not followed by a shell block, or an unknown key, is an error.

Commands run with bash (`-o pipefail`); a line ending in `\\` continues on the next; blank
lines and lines starting with `#` are skipped. echod and echod-bench are first on PATH: the
binaries next to $ECHOD_BIN (default target/debug/echod). As root, with `ip` available, the
whole run happens inside a network namespace of its own (only a loopback), so the README's
fixed ports never collide with anything else on the machine (--no-namespace to opt out).

Usage: ci/readme_examples.py [--install] [--no-namespace] [--list] [FILE ...]
"""

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SERVER = "echod --listen 127.0.0.1:8080 --metrics-listen 127.0.0.1:9007"
DEFAULT_TIMEOUT = 30.0
SHELLS = {"sh", "bash", "shell"}
REPEATABLE = {"setup", "server", "check", "cleanup"}
SINGLE = {"skip", "packages", "input", "timeout", "cwd"}
START_LINE = "echod started"
IN_NAMESPACE_ENV = "ECHOD_README_NAMESPACE"


class Malformed(Exception):
    pass


@dataclass
class Command:
    line: int
    text: str


@dataclass
class Example:
    path: Path
    line: int  # the opening fence
    commands: list
    directives: dict = field(default_factory=dict)

    def get(self, key, default=None):
        return self.directives.get(key, default)

    def where(self, line=None):
        return f"{self.path.name}:{line or self.line}"


# --------------------------------------------------------------------------- parsing

def parse_duration(text, where):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*", text)
    if not m:
        raise Malformed(f"{where}: timeout {text!r}: use e.g. 500ms, 30s, 2m")
    value = float(m.group(1))
    return value * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]


def parse_directives(body, where):
    """`key: value` lines of an example comment (the first may follow `example:` directly)."""
    directives = {}
    for raw in body.splitlines():
        entry = raw.strip()
        if not entry:
            continue
        key, sep, value = entry.partition(":")
        key = key.strip()
        if not sep or not (key in REPEATABLE or key in SINGLE):
            raise Malformed(f"{where}: unknown example directive {entry!r} "
                            f"(known: {', '.join(sorted(REPEATABLE | SINGLE))})")
        value = value.strip()
        if key in REPEATABLE:
            directives.setdefault(key, []).append(value)
        elif key in directives:
            raise Malformed(f"{where}: directive {key!r} given twice")
        else:
            directives[key] = value
    if "timeout" in directives:
        directives["timeout"] = parse_duration(directives["timeout"], where)
    if directives.get("cwd", "scratch") not in ("scratch", "repo"):
        raise Malformed(f"{where}: cwd must be `scratch` or `repo`")
    if "skip" in directives and not directives["skip"]:
        raise Malformed(f"{where}: skip needs a reason")
    for server in directives.get("server", []):
        if server != "none" and shlex.split(server)[:1] != ["echod"]:
            raise Malformed(f"{where}: a server must be an echod command line (or `none`)")
    return directives


def parse(path):
    """The shell blocks of a Markdown file, each with the directives of the comment before it."""
    lines = path.read_text().splitlines()
    examples = []
    pending = None  # (line, directives) of an example comment waiting for its block
    i = 0
    while i < len(lines):
        text = lines[i]
        stripped = text.strip()
        fence = re.match(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)", text)
        if stripped.startswith("<!--") and re.match(r"<!--\s*example\b", stripped):
            start = i
            chunk = [stripped]
            while "-->" not in chunk[-1]:
                i += 1
                if i >= len(lines):
                    raise Malformed(f"{path.name}:{start + 1}: example comment never closed")
                chunk.append(lines[i])
            inner = "\n".join(chunk)
            inner = re.sub(r"^<!--\s*example\s*:?", "", inner.strip()).rsplit("-->", 1)[0]
            pending = (start + 1, parse_directives(inner, f"{path.name}:{start + 1}"))
        elif fence:
            marker, info = fence.group(1), fence.group(2).lower()
            start = i
            body = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(marker):
                body.append((i + 1, lines[i]))
                i += 1
            if info in SHELLS:
                example = Example(path, start + 1, commands(body))
                if pending:
                    example.directives = pending[1]
                    pending = None
                examples.append(example)
            elif pending:
                raise Malformed(f"{path.name}:{pending[0]}: example comment before a "
                                f"```{info} block, which is not run")
        elif stripped and pending:
            raise Malformed(f"{path.name}:{pending[0]}: example comment not followed by a shell block")
        i += 1
    if pending:
        raise Malformed(f"{path.name}:{pending[0]}: example comment not followed by a shell block")
    return examples


def commands(body):
    """Commands of a block: `\\` continues a line; blank lines and comments are skipped."""
    out = []
    current, first = [], None
    for number, text in body:
        if not current and (not text.strip() or text.lstrip().startswith("#")):
            continue
        if first is None:
            first = number
        if text.rstrip().endswith("\\"):
            current.append(text.rstrip())  # bash joins the lines itself
            continue
        current.append(text)
        out.append(Command(first, "\n".join(current)))
        current, first = [], None
    if current:
        out.append(Command(first, "\n".join(current)))
    return out


# --------------------------------------------------------------------------- running

class Failure(Exception):
    pass


def tail(text, n=15):
    lines = text.rstrip().splitlines()
    return "\n".join("      " + line for line in lines[-n:]) or "      (nothing)"


class Server:
    """One echod of an example: started through bash in the scratch directory, ready when it
    logs its start-up line (read from a pipe), stopped with SIGTERM."""

    def __init__(self, command, cwd, env, where):
        self.command, self.where = command, where
        self.log = []
        self.proc = subprocess.Popen(["bash", "-c", "exec " + command], cwd=cwd, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if not self.ready.wait(15) or self.proc.poll() is not None:
            self.kill()
            raise Failure(f"{where}: server `{command}` did not start; its log:\n" + tail("\n".join(self.log)))

    def _read(self):
        for line in self.proc.stderr:
            self.log.append(line.rstrip("\n"))
            if START_LINE in line:
                self.ready.set()
        self.ready.set()  # exited: the waiter checks poll()

    def stop(self):
        """SIGTERM; echod drains and must exit 0 (bounded by its own shutdown timeout)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.kill()
            raise Failure(f"{self.where}: server `{self.command}` did not exit within 40 s of SIGTERM")
        self.reader.join(5)
        if rc != 0:
            raise Failure(f"{self.where}: server `{self.command}` exited with {rc} after SIGTERM; its log:\n"
                          + tail("\n".join(self.log)))

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def run_shell(text, cwd, env, timeout, stdin_text, where, what, out_path=None, err_path=None):
    """Runs `text` with bash -o pipefail in its own process group; the whole group is ended
    at the timeout. Returns (stdout, stderr)."""
    proc = subprocess.Popen(["bash", "-o", "pipefail", "-c", text], cwd=cwd, env=env,
                            stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    t0 = time.monotonic()
    try:
        out, err = proc.communicate(stdin_text.encode() if stdin_text is not None else None, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        raise Failure(f"{where}: {what} did not finish within {timeout:g} s:\n      $ {text}\n"
                      f"    stdout:\n{tail(out.decode(errors='replace'))}\n"
                      f"    stderr:\n{tail(err.decode(errors='replace'))}")
    finally:
        # Anything the command left running in its group (a background job) ends with it.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    took = time.monotonic() - t0
    if out_path:
        out_path.write_bytes(out)
        err_path.write_bytes(err)
    if proc.returncode != 0:
        raise Failure(f"{where}: {what} exited with {proc.returncode} after {took:.1f} s:\n      $ {text}\n"
                      f"    stdout:\n{tail(out.decode(errors='replace'))}\n"
                      f"    stderr:\n{tail(err.decode(errors='replace'))}")
    return took


def run_example(example, env):
    timeout = example.get("timeout", DEFAULT_TIMEOUT)
    scratch = Path(tempfile.mkdtemp(prefix="echod-readme-"))
    env = dict(env, EXAMPLE_DIR=str(scratch))
    cwd = ROOT if example.get("cwd") == "repo" else scratch
    stdin_text = None
    if "input" in example.directives:
        stdin_text = example.get("input").replace("\\n", "\n") + "\n"
    servers = []
    started = time.monotonic()
    try:
        for setup in example.get("setup", []):
            run_shell(setup, scratch, env, timeout, None, example.where(), "setup")
        for command in example.get("server", [DEFAULT_SERVER]):
            if command != "none":
                servers.append(Server(command, scratch, env, example.where()))
        for n, command in enumerate(example.commands, 1):
            took = run_shell(command.text, cwd, env, timeout, stdin_text, example.where(command.line),
                             "command", scratch / f"out.{n}", scratch / f"err.{n}")
            print(f"  {example.where(command.line)}: ok in {took:.2f} s: {command.text.splitlines()[0]}")
        for check in example.get("check", []):
            run_shell(check, scratch, env, timeout, None, example.where(), "check")
            print(f"  {example.where()}: check ok: {check}")
        while servers:
            servers.pop().stop()
    finally:
        for server in servers:
            server.kill()
        for cleanup in example.get("cleanup", []):
            try:
                run_shell(cleanup, scratch, env, timeout, None, example.where(), "cleanup")
            except Failure as err:
                print(f"  warning: {err}")
        shutil.rmtree(scratch, ignore_errors=True)
    return time.monotonic() - started


# --------------------------------------------------------------------------- packages

def missing_packages(examples):
    wanted = sorted({p for e in examples if "skip" not in e.directives
                     for p in e.get("packages", "").split()})
    if not shutil.which("dpkg-query"):
        return []  # not Debian: a missing tool shows up as the command's failure
    missing = []
    for package in wanted:
        done = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
        if done.stdout.strip() != "install ok installed":
            missing.append(package)
    return missing


def install(packages):
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL, check=True)
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)


# --------------------------------------------------------------------------- namespace

def in_namespace(argv):
    """Re-runs this script inside a fresh network namespace (root only); None when it cannot."""
    if os.environ.get(IN_NAMESPACE_ENV) or os.geteuid() != 0 or not shutil.which("ip"):
        return None
    name = f"echod-readme-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        return None
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        env = dict(os.environ, **{IN_NAMESPACE_ENV: name})
        return subprocess.run(["ip", "netns", "exec", name, sys.executable, __file__, *argv], env=env).returncode
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


# --------------------------------------------------------------------------- main

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", type=Path, default=[ROOT / "README.md"])
    p.add_argument("--install", action="store_true", help="apt-get install the packages the examples need")
    p.add_argument("--no-namespace", action="store_true", help="run on the machine's own loopback")
    p.add_argument("--list", action="store_true", help="list the examples and their directives, run nothing")
    args = p.parse_args()

    try:
        examples = [e for path in args.files for e in parse(path.resolve())]
    except (Malformed, OSError) as err:
        print(f"readme examples: {err}", file=sys.stderr)
        return 2
    if args.list:
        for e in examples:
            print(f"{e.where()}: {len(e.commands)} command(s) {e.directives}")
        return 0

    missing = missing_packages(examples)
    if missing:
        if args.install and os.geteuid() == 0:
            print(f"readme examples: installing {' '.join(missing)}")
            install(missing)
        else:
            print(f"readme examples: missing packages: {' '.join(missing)} (apt-get install, or --install as root)",
                  file=sys.stderr)
            return 1

    if not args.no_namespace:
        rc = in_namespace(sys.argv[1:])
        if rc is not None:
            return rc

    echod = Path(os.environ.get("ECHOD_BIN", ROOT / "target" / "debug" / "echod")).resolve()
    bench = echod.with_name("echod-bench" + echod.suffix)
    if not echod.is_file() or not bench.is_file():
        print(f"readme examples: need {echod} and {bench} (cargo build --bins, or set ECHOD_BIN)", file=sys.stderr)
        return 1
    env = dict(os.environ, PATH=f"{echod.parent}{os.pathsep}{os.environ.get('PATH', '')}", REPO=str(ROOT),
               NO_COLOR="1")
    where = os.environ.get(IN_NAMESPACE_ENV)
    print(f"readme examples: {len(examples)} shell blocks in {', '.join(str(f) for f in args.files)}; "
          f"echod {echod}; " + (f"in network namespace {where}" if where else "on the machine's loopback"))

    failed = passed = skipped = commands_run = 0
    for e in examples:
        if "skip" in e.directives:
            skipped += 1
            print(f"{e.where()}: skipped: {e.get('skip')}")
            continue
        print(f"{e.where()}: {len(e.commands)} command(s)")
        try:
            took = run_example(e, env)
            passed += 1
            commands_run += len(e.commands)
            print(f"{e.where()}: ok in {took:.1f} s")
        except Failure as err:
            failed += 1
            print(f"FAILED {err}")
    print(f"readme examples: {commands_run} commands in {passed} of {passed + failed} blocks passed; "
          f"{failed} blocks failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
