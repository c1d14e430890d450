#!/usr/bin/env python3
"""Smoke test of the Windows build of echod, run under Wine and driven from Linux.

Usage: smoke.py WINE ECHOD_EXE

Checks, each with a time bound:
  1. a bad flag value exits with status 2 (so exit codes propagate through Wine);
  2. /healthz and /readyz answer 200;
  3. one echo round trip;
  4. half-close: send 256 KiB, shut down the write side, read to EOF, get the bytes back;
  5. 100 concurrent clients, each doing 5 round trips;
  6. /metrics shows the connections accepted and closed;
  7. SIGINT (a console ctrl-c under Wine) with a client still connected: /readyz turns 503,
     new connections are refused, the connected client still echoes, and once it leaves
     echod exits with status 0;
  8. a second SIGINT during a drain forces exit with status 130.

Everything stays on 127.0.0.1. Prints "N passed, N failed" at the end; exits non-zero on failure.
"""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

WINE, EXE = sys.argv[1], sys.argv[2]
HOST = "127.0.0.1"
CLIENTS = 100
ROUNDS = 5

passed = 0
failed = 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"  ok    {name}", flush=True)
    else:
        failed += 1
        print(f"  FAIL  {name} {detail}", flush=True)
    return ok


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http_get(port, path, timeout=5.0):
    """Returns (status, body) or (None, error text)."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return None, str(e)


class Echod:
    """echod.exe under Wine, on fresh loopback ports, its stderr kept in a temporary file."""

    def __init__(self, *extra):
        self.port = free_port()
        self.mport = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="echod-wine-", suffix=".log", delete=False)
        args = [WINE, EXE, "--listen", f"{HOST}:{self.port}",
                "--metrics-listen", f"{HOST}:{self.mport}", "--workers", "2", *extra]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                if http_get(self.mport, "/healthz", timeout=2)[0] == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.2)
        return False

    def interrupt(self):
        # Under Wine, SIGINT to the process is delivered as CTRL_C_EVENT.
        self.proc.send_signal(signal.SIGINT)

    def exit_code(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def dump_log(self):
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            text = f.read()
        print("---- echod log (last 40 lines) ----")
        print("\n".join(text.splitlines()[-40:]))
        print("-----------------------------------")


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def one_echo(port):
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(b"hello, echod\n")
        return recv_exact(s, 13) == b"hello, echod\n"


def half_close(port, size=256 * 1024):
    """Sends `size` bytes, shuts down the write side, reads to EOF: all must come back."""
    payload = os.urandom(size)
    with socket.create_connection((HOST, port), timeout=30) as s:
        def send():
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)

        # Send from a thread while reading here, so neither direction's buffers fill up.
        sender = threading.Thread(target=send)
        sender.start()
        got = bytearray()
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        sender.join(30)
    return bytes(got) == payload, len(got)


async def client(port, i):
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        for r in range(ROUNDS):
            msg = f"client {i} round {r} ".encode() * 8
            writer.write(msg)
            await writer.drain()
            if await reader.readexactly(len(msg)) != msg:
                return False
        writer.write_eof()
        return await reader.read() == b""
    finally:
        writer.close()


async def many_clients(port):
    results = await asyncio.wait_for(
        asyncio.gather(*(client(port, i) for i in range(CLIENTS)), return_exceptions=True), 120)
    errors = [r for r in results if r is not True]
    return len(errors), errors[:3]


def metric_sum(text, name):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until(predicate, timeout, step=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def stage(title):
    print(f"-- {title}", flush=True)
    return time.monotonic()


def main():
    t0 = stage("bad flag value exits with status 2")
    try:
        # No pipes: Wine services started by a program keep its output open after it exits.
        rc = subprocess.run([WINE, EXE, "--workers", "0"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            timeout=60).returncode
    except subprocess.TimeoutExpired:
        rc = None
    check("`echod --workers 0` exits 2", rc == 2, f"(got {rc})")

    stage("start echod.exe under Wine")
    server = Echod("--shutdown-timeout", "20s")
    try:
        t = time.monotonic()
        if not check("echod accepts connections and /healthz answers", server.wait_ready()):
            return
        print(f"  (ready after {time.monotonic() - t:.1f} s)")
        check("/readyz is 200 while serving", http_get(server.mport, "/readyz")[0] == 200)

        stage("echo")
        check("one round trip", one_echo(server.port))

        stage("half-close")
        ok, n = half_close(server.port)
        check("256 KiB echoed in full after shutdown(SHUT_WR), then EOF", ok, f"(got {n} bytes)")

        stage(f"{CLIENTS} concurrent clients x {ROUNDS} round trips")
        t = time.monotonic()
        n_err, errors = asyncio.run(many_clients(server.port))
        check(f"{CLIENTS} clients echoed", n_err == 0, f"({n_err} failed: {errors})")
        print(f"  ({time.monotonic() - t:.1f} s)")

        stage("metrics")
        expected = CLIENTS + 2

        def counted():
            status, body = http_get(server.mport, "/metrics")
            return (status == 200
                    and metric_sum(body, "echod_connections_accepted_total") >= expected
                    and metric_sum(body, "echod_connections_closed_total") >= expected
                    and metric_sum(body, "echod_connections_active") == 0)

        ok = wait_until(counted, 5)
        body = http_get(server.mport, "/metrics")[1]
        check(f"/metrics: >= {expected} accepted and closed, 0 active", ok,
              "(accepted=%s closed=%s active=%s)" % (
                  metric_sum(body, "echod_connections_accepted_total"),
                  metric_sum(body, "echod_connections_closed_total"),
                  metric_sum(body, "echod_connections_active")))

        stage("SIGINT with a client connected: drain, then exit 0")
        lingering = socket.create_connection((HOST, server.port), timeout=10)
        lingering.sendall(b"before\n")
        check("lingering client echoes", recv_exact(lingering, 7) == b"before\n")
        server.interrupt()
        check("/readyz turns 503", wait_until(
            lambda: http_get(server.mport, "/readyz", timeout=2)[0] == 503, 10))

        def refused():
            try:
                socket.create_connection((HOST, server.port), timeout=2).close()
                return False
            except OSError:
                return True

        check("listener closed: new connections refused", wait_until(refused, 10))
        lingering.sendall(b"during\n")
        check("lingering client still echoes during the drain",
              recv_exact(lingering, 7) == b"during\n")
        check("echod still running while a client is connected", server.proc.poll() is None)
        t = time.monotonic()
        lingering.close()
        rc = server.exit_code(timeout=20)
        check("echod exits 0 once the last client leaves", rc == 0, f"(got {rc})")
        if rc is not None:
            print(f"  (exited {time.monotonic() - t:.1f} s after the client left)")
    finally:
        server.stop()
        if failed:
            server.dump_log()

    stage("second SIGINT forces exit 130")
    server = Echod("--shutdown-timeout", "60s")
    try:
        if check("echod started again", server.wait_ready()):
            held = socket.create_connection((HOST, server.port), timeout=10)
            # A round trip first: the drain must have a connection echod accepted to wait for.
            held.sendall(b"hold\n")
            check("held client echoes", recv_exact(held, 5) == b"hold\n")
            server.interrupt()
            wait_until(lambda: http_get(server.mport, "/readyz", timeout=2)[0] == 503, 10)
            server.interrupt()
            rc = server.exit_code(timeout=20)
            check("second SIGINT exits 130", rc == 130, f"(got {rc})")
            held.close()
    finally:
        server.stop()
        if failed:
            server.dump_log()
    print(f"smoke: {time.monotonic() - t0:.1f} s")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # report, don't hide, an unexpected error
        check("smoke test ran to the end", False, repr(e))
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
