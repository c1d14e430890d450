#!/usr/bin/env python3
"""Live checks of a deployed echod, used by ci/deploy.sh. Standard library only.

    smoke.py free-ports N
        Print N free TCP ports on 127.0.0.1.

    smoke.py container NAME ECHO_PORT METRICS_PORT [--podman PODMAN]
        echod runs in container NAME (host network). Check echo, /healthz, /readyz and
        /metrics (echod_build_info must carry $ECHOD_EXPECT_VERSION, when set); then `podman stop -t 30` it while a client is connected, and check the
        drain: /readyz turns 503, the connected client is still echoed, new connections
        are refused, and once the client leaves echod exits 0 well before the kill.

    smoke.py socket-activation ECHOD_BIN
        Run ECHOD_BIN under systemd-socket-activate, as echod.socket would (LISTEN_FDS,
        LISTEN_PID), with a NOTIFY_SOCKET as Type=notify provides. Check READY=1, echo through
        the passed socket, then SIGTERM: STOPPING=1 and exit status 0.

Every wait is bounded; a failed check exits non-zero with the reason.
"""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HOST = "127.0.0.1"


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def ok(msg):
    print(f"  ok: {msg}")


def free_ports(n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind((HOST, 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def http_get(port, path, timeout=2.0):
    """(status, body) of GET path, or (None, error text) when the port does not answer."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as e:
        return None, str(e)
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None, f"bad response: {head[:80]!r}"
    if b"transfer-encoding: chunked" in head.lower():
        body = dechunk(body)
    return status, body.decode("utf-8", "replace")


def dechunk(body):
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return out


def wait_for(what, predicate, timeout):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.05)
    fail(f"{what}: not within {timeout} s (last: {last!r})")


def echo_roundtrip(sock, payload, timeout=5.0):
    """Send payload from a thread while reading it back, so large payloads cannot deadlock."""
    sock.settimeout(timeout)
    sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
    sender.start()
    got = bytearray()
    while len(got) < len(payload):
        try:
            chunk = sock.recv(65536)
        except OSError as e:
            fail(f"echo: {e} after {len(got)} of {len(payload)} bytes")
        if not chunk:
            break
        got += chunk
    sender.join(timeout)
    if bytes(got) != payload:
        fail(f"echo returned {len(got)} bytes differing from the {len(payload)} sent")


def check_echo(port):
    with socket.create_connection((HOST, port), timeout=5) as s:
        echo_roundtrip(s, b"hello, echod\n")
        payload = os.urandom(1 << 20)
        echo_roundtrip(s, payload)
    ok(f"echo on {HOST}:{port}: a line and 1 MiB of random bytes came back intact")
    clients = [socket.create_connection((HOST, port), timeout=5) for _ in range(20)]
    for i, c in enumerate(clients):
        echo_roundtrip(c, f"client {i}\n".encode())
    for c in clients:
        c.close()
    ok("20 concurrent clients echoed")


def metric_samples(text):
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_labels, _, value = line.rpartition(" ")
            samples[name_labels] = value
    return samples


def check_http(metrics_port, min_accepted=0):
    status, body = wait_for("GET /readyz answers 200",
                            lambda: (lambda r: r if r[0] == 200 else None)(http_get(metrics_port, "/readyz")),
                            10)
    ok("/readyz 200")
    status, body = http_get(metrics_port, "/healthz")
    if status != 200:
        fail(f"/healthz answered {status}: {body[:200]}")
    ok("/healthz 200")
    status, body = http_get(metrics_port, "/metrics")
    if status != 200:
        fail(f"/metrics answered {status}: {body[:200]}")
    samples = metric_samples(body)
    names = {k.split("{")[0] for k in samples}
    for want in ("echod_connections_accepted_total", "echod_draining", "echod_max_connections",
                 "echod_build_info"):
        if want not in names:
            fail(f"/metrics lacks {want}; has {sorted(names)[:40]}")
    version = os.environ.get("ECHOD_EXPECT_VERSION")
    if version and f'echod_build_info{{version="{version}"}}' not in samples:
        fail(f"echod_build_info does not report version {version} (the image label)")
    if samples.get("echod_draining") != "0":
        fail(f"echod_draining is {samples.get('echod_draining')} before any signal")
    accepted = sum(float(v) for k, v in samples.items()
                   if k.startswith("echod_connections_accepted_total"))
    if accepted < min_accepted:
        fail(f"echod_connections_accepted_total is {accepted:g}, want >= {min_accepted}")
    max_conn = float(samples["echod_max_connections"])
    ok(f"/metrics: {len(samples)} samples, accepted={accepted:g}, max_connections={max_conn:g}")
    return max_conn


def container(name, echo_port, metrics_port, podman):
    check_http(metrics_port)
    check_echo(echo_port)
    max_conn = check_http(metrics_port, min_accepted=21)
    if not 0 < max_conn <= 4096:
        fail(f"echod_max_connections {max_conn:g} does not follow the container's nofile 4096")
    ok("max_connections follows the container's open-files limit")

    # Drain: a client stays connected through the SIGTERM.
    held = socket.create_connection((HOST, echo_port), timeout=5)
    echo_roundtrip(held, b"before stop\n")
    start = time.monotonic()
    stop = subprocess.Popen([podman, "stop", "-t", "30", name],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for("/readyz turns 503 after SIGTERM",
             lambda: http_get(metrics_port, "/readyz")[0] == 503, 10)
    ok(f"/readyz 503 {time.monotonic() - start:.2f} s after the stop began")
    status, body = http_get(metrics_port, "/metrics")
    if status == 200 and metric_samples(body).get("echod_draining") != "1":
        fail("echod_draining is not 1 while draining")

    def refused():
        try:
            socket.create_connection((HOST, echo_port), timeout=1).close()
            return False
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    wait_for("new echo connections are refused while draining", refused, 10)
    ok("listeners closed: new connections refused")
    echo_roundtrip(held, b"still served while draining\n")
    ok("the connected client is still echoed during the drain")
    if stop.poll() is not None:
        fail(f"podman stop returned while a client was still connected: {stop.stdout.read()}")
    held.close()
    try:
        out, _ = stop.communicate(timeout=40)
    except subprocess.TimeoutExpired:
        stop.kill()
        fail("podman stop still running after 40 s")
    elapsed = time.monotonic() - start
    if stop.returncode != 0:
        fail(f"podman stop exited {stop.returncode}: {out}")
    code = subprocess.run([podman, "inspect", name, "--format", "{{.State.ExitCode}}"],
                          capture_output=True, text=True, check=True).stdout.strip()
    print(f"  podman stop -t 30 took {elapsed:.2f} s; container exit code {code}")
    if elapsed >= 10:
        fail(f"stop took {elapsed:.2f} s: echod did not exit on SIGTERM before the kill")
    if code != "0":
        fail(f"container exit code {code}, want 0 after a clean drain")
    ok("drained and exited 0 well before the 30 s kill")


def socket_activation(echod_bin):
    echo_port, metrics_port = free_ports(2)
    with tempfile.TemporaryDirectory() as tmp:
        notify_path = os.path.join(tmp, "notify")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        notify.settimeout(0.1)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path,
                   ECHOD_METRICS_LISTEN=f"{HOST}:{metrics_port}",
                   # Must be ignored in favour of the passed socket.
                   ECHOD_LISTEN=f"{HOST}:{free_ports(1)[0]}",
                   ECHOD_SHUTDOWN_TIMEOUT="5s", RUST_LOG="info")
        proc = subprocess.Popen(
            ["systemd-socket-activate", "--listen", f"{HOST}:{echo_port}",
             "--fdname", "echo", "-E", "NOTIFY_SOCKET", "-E", "ECHOD_METRICS_LISTEN",
             "-E", "ECHOD_LISTEN", "-E", "ECHOD_SHUTDOWN_TIMEOUT", "-E", "RUST_LOG", echod_bin],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        messages = []

        def drain_notify():
            try:
                while True:
                    messages.append(notify.recv(4096).decode())
            except (socket.timeout, BlockingIOError):
                pass
        try:
            # systemd-socket-activate binds at once and starts echod at the first connection.
            def connect():
                try:
                    return socket.create_connection((HOST, echo_port), timeout=5)
                except ConnectionRefusedError:
                    return None
            client = wait_for("systemd-socket-activate listening", connect, 10)
            echo_roundtrip(client, b"through the passed socket\n", timeout=10)
            ok(f"echo through the socket passed by systemd-socket-activate on port {echo_port}")

            def ready():
                drain_notify()
                return any("READY=1" in m for m in messages)
            wait_for("READY=1 on NOTIFY_SOCKET", ready, 10)
            ok(f"READY=1 on NOTIFY_SOCKET ({'; '.join(m.replace(chr(10), ' ') for m in messages)})")
            status, body = http_get(metrics_port, "/readyz")
            if status != 200:
                fail(f"/readyz {status}")
            client.close()
            proc.send_signal(signal.SIGTERM)

            def stopping():
                drain_notify()
                return any("STOPPING=1" in m for m in messages)
            wait_for("STOPPING=1 on NOTIFY_SOCKET after SIGTERM", stopping, 10)
            ok("STOPPING=1 on NOTIFY_SOCKET after SIGTERM")
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                fail("echod did not exit within 15 s of SIGTERM")
            if proc.returncode != 0:
                fail(f"exit status {proc.returncode} after SIGTERM, want 0")
            ok("exit status 0 after SIGTERM")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            log = proc.stdout.read() if proc.stdout else ""
            if log.strip():
                print("  echod log:\n    " + "\n    ".join(log.strip().splitlines()[-15:]))
            notify.close()


def main(argv):
    if len(argv) >= 2 and argv[0] == "free-ports":
        print(" ".join(map(str, free_ports(int(argv[1])))))
    elif len(argv) >= 4 and argv[0] == "container":
        podman = argv[argv.index("--podman") + 1] if "--podman" in argv else "podman"
        container(argv[1], int(argv[2]), int(argv[3]), podman)
    elif len(argv) == 2 and argv[0] == "socket-activation":
        socket_activation(argv[1])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
