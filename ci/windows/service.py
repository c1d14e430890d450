#!/usr/bin/env python3
"""echod.exe --service under Wine's service control manager, driven from Linux.

Usage: service.py WINE ECHOD_EXE

Registers echod.exe as a service (`sc create NAME binPath= "... --service --listen ..."`),
starts it (`net start`), echoes through it, then stops it (`net stop`) with a client still
connected, and checks that the stop drains as ctrl-c does: /readyz turns 503, new connections
are refused, the connected client still echoes, and once it leaves the service stops with
exit code 0. The service is deleted at the end, also on failure.

Everything stays on 127.0.0.1; every wait is bounded. Prints "N passed, N failed" at the end;
exits non-zero on failure.
"""

import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

WINE, EXE = sys.argv[1], sys.argv[2]
HOST = "127.0.0.1"
NAME = "echod-ci"

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


def http_status(port, path, timeout=5.0):
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def wine(*args, timeout=60):
    """Runs a Wine program; returns (exit status, output)."""
    try:
        p = subprocess.run([WINE, *args], stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s"
    out = (p.stdout + p.stderr).decode(errors="replace")
    return p.returncode, out


def wait_for(what, predicate, within=30.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    print(f"  (timed out after {within} s waiting for {what})", flush=True)
    return False


def echo(sock, data):
    sock.sendall(data)
    back = b""
    while len(back) < len(data):
        chunk = sock.recv(len(data) - len(back))
        if not chunk:
            break
        back += chunk
    return back == data


def connect(port, timeout=5.0):
    return socket.create_connection((HOST, port), timeout=timeout)


def refused(port):
    try:
        with connect(port, timeout=2.0):
            return False
    except OSError:
        return True


def query():
    code, out = wine("sc", "query", NAME)
    return out


def main():
    code, winpath = wine("winepath", "-w", EXE)
    winpath = winpath.strip().splitlines()[-1] if code == 0 and winpath.strip() else EXE
    port, mport = free_port(), free_port()
    bin_path = (f'"{winpath}" --service --listen {HOST}:{port} --metrics-listen {HOST}:{mport} '
                f'--workers 2 --shutdown-timeout 30s')
    wine("sc", "delete", NAME)  # a service left by an earlier, interrupted run
    code, out = wine("sc", "create", NAME, "binPath=", bin_path)
    if not check("sc create", code == 0, out):
        return
    try:
        run(port, mport)
    finally:
        wine("net", "stop", NAME, timeout=60)
        code, out = wine("sc", "delete", NAME)
        check("sc delete", code == 0, out)


def run(port, mport):
    code, out = wine("net", "start", NAME, timeout=90)
    if not check("net start", code == 0, out):
        print(query())
        return
    # Wine's `net start` may return before the service reports RUNNING; follow the state.
    if not check("sc query: RUNNING", wait_for("RUNNING", lambda: "RUNNING" in query()), query()):
        return
    check("/readyz answers 200 while running",
          wait_for("/readyz 200", lambda: http_status(mport, "/readyz", 2.0) == 200))
    try:
        client = connect(port)
    except OSError as e:
        check("connect to the service's listener", False, str(e))
        return
    client.settimeout(10.0)
    check("echo through the service", echo(client, b"x"))

    # Wine's `net stop` sends the stop and returns without waiting for STOPPED (Windows' waits):
    # the state is followed with `sc query` instead.
    stop = subprocess.Popen([WINE, "net", "stop", NAME], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        check("net stop: /readyz turns 503 (draining)",
              wait_for("/readyz 503", lambda: http_status(mport, "/readyz", 2.0) == 503))
        check("net stop: new connections are refused",
              wait_for("the listener to close", lambda: refused(port)))
        check("the connected client still echoes during the drain", echo(client, b"y"))
        status = query()
        check("the service waits for the client: STOP_PENDING", "STOP_PENDING" in status, status)
        client.close()
        check("STOPPED once the client left",
              wait_for("STOPPED", lambda: "STOPPED" in query(), within=60.0), query())
        try:
            out = stop.communicate(timeout=60)[0].decode(errors="replace")
            check("net stop succeeded", stop.returncode == 0, out)
        except subprocess.TimeoutExpired:
            check("net stop succeeded", False, "timed out after 60 s")
    finally:
        if stop.poll() is None:
            stop.kill()
            stop.wait()
    status = query()
    check("the service is STOPPED", "STOPPED" in status, status)
    m = re.search(r"WIN32_EXIT_CODE\s*:\s*(\d+)", status)
    s = re.search(r"SERVICE_EXIT_CODE\s*:\s*(\d+)", status)
    check("with exit code 0", m is not None and m.group(1) == "0" and (s is None or s.group(1) == "0"),
          status)


main()
print(f"\nservice: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
