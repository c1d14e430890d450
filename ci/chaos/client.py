#!/usr/bin/env python3
"""Clients and checks for the chaos suite (ci/chaos.sh); Python standard library only.

Each subcommand drives echod (inside the network namespace the suite made; this process runs
there too), checks one of echod's promises, prints its figures as `  name: value` lines and exits
0, or prints what broke and exits 1. Every wait is bounded; a faulty server makes a subcommand
fail, never hang.

    client.py --addr HOST:PORT [--metrics HOST:PORT] [--pid PID] SUBCOMMAND ...
        stream [--conns K] [--bytes N] [--sigterm]     (--sigterm needs --pid)
        sizes --sizes 1,536,65536
        many [--conns 2000] [--msgs 3] [--size 1000]   (needs --metrics)
        reset [--others K] [--bytes N] [--reset-after B]   (needs --metrics)
        blackhole --idle-bound S --flight-bound S      (needs --metrics)
        backpressure [--conns K] [--bytes N]           (needs --pid)

With --pid, echod's memory (VmRSS at the start, VmHWM at the end) is reported too.

The fault rules a subcommand installs itself (those that need a client's port) go into the
suite's table: `table inet chaos`, chain `out` (hook output), created by ci/chaos.sh.
"""

import argparse
import errno
import os
import random
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request

CHUNK = 64 * 1024


class Failed(Exception):
    """A broken promise: the message says which, and what was seen."""


def figure(name, value):
    print(f"  {name}: {value}", flush=True)


def mib(n):
    return f"{n / (1 << 20):.2f} MiB"


def parse_addr(text):
    host, _, port = text.rpartition(":")
    return host, int(port)


def pattern(seed, n):
    return random.Random(seed).randbytes(n)


def reset_on_close(sock):
    """Makes close() send an RST (SO_LINGER 0), so churned connections leave no TIME_WAIT."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def nft(rule):
    """Adds one rule to the suite's output chain (this process runs inside the namespace)."""
    cmd = ["nft", "add", "rule", "inet", "chaos", "out"] + rule.split()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise Failed(f"nft {rule!r}: {done.stderr.strip()}")


# --------------------------------------------------------------------------- metrics

def scrape(metrics_addr, timeout=5.0):
    host, port = parse_addr(metrics_addr)
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as response:
        return response.read().decode()


def metric(exposition, name, labels=""):
    """Sum of the samples of `name` whose label set contains `labels` (as tests/integration/common does)."""
    total = 0.0
    for line in exposition.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        series_name, _, series_labels = series.partition("{")
        if series_name == name and labels in series_labels:
            total += float(value)
    return total


def closes_by_reason(exposition):
    reasons = {}
    for reason in ("eof", "reset", "idle_timeout", "shutdown", "error"):
        reasons[reason] = int(metric(exposition, "echod_connections_closed_total", f'reason="{reason}"'))
    return reasons


def wait_metric(metrics_addr, what, check, within):
    """Scrapes every 50 ms until check(exposition) holds; returns (exposition, seconds waited)."""
    start = time.monotonic()
    deadline = start + within
    last = ""
    while True:
        try:
            last = scrape(metrics_addr)
            if check(last):
                return last, time.monotonic() - start
        except OSError as err:
            last = f"(scrape failed: {err})"
        if time.monotonic() > deadline:
            raise Failed(f"timed out after {within:.0f}s waiting for {what}; last scrape:\n"
                         + "\n".join(line for line in last.splitlines() if line.startswith("echod_conn")))
        time.sleep(0.05)


def wait_idle_server(metrics_addr, within=30.0):
    """Waits until echod has no connection open (the promise: none stuck)."""
    exposition, waited = wait_metric(
        metrics_addr, "echod_connections_active == 0",
        lambda m: metric(m, "echod_connections_active") == 0, within)
    return exposition, waited


# --------------------------------------------------------------------------- memory

def vm_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise Failed(f"no {key} for pid {pid}")


class Rss:
    """Follows echod's resident memory while a subcommand runs: `start` is its VmRSS at the
    start, `peak` its high-water mark (VmHWM), read every 50 ms until echod exits or the
    subcommand ends."""

    def __init__(self, pid):
        self.pid = pid
        self.start = vm_kib(pid, "VmRSS") if pid else 0
        self.peak = vm_kib(pid, "VmHWM") if pid else 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        if pid:
            self.thread.start()

    def _sample(self):
        while not self.done.wait(0.05):
            try:
                self.peak = vm_kib(self.pid, "VmHWM")
            except (OSError, Failed):
                return  # echod exited (a drain the subcommand asked for)

    def stop(self):
        self.done.set()
        self.thread.join(2) if self.pid else None
        if self.pid:
            figure("echod memory", f"RSS {self.start} KiB at the start, peak {self.peak} KiB (VmHWM)")


# --------------------------------------------------------------------------- stream

class Stream:
    """One full-duplex verified echo: a writer thread sends `data` then half-closes; the reader
    checks every byte and expects a clean EOF (not a reset) right after the last one."""

    def __init__(self, addr, data, timeout, name, sock=None):
        self.addr, self.data, self.timeout, self.name = addr, data, timeout, name
        self.sock = sock
        self.received = 0
        self.longest_wait = 0.0
        self.error = None
        self.exception = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def join(self, deadline):
        self.thread.join(max(0.0, deadline - time.monotonic()))
        if self.thread.is_alive():
            raise Failed(f"{self.name}: still running at the deadline "
                         f"({mib(self.received)} of {mib(len(self.data))} back)")

    def _run(self):
        try:
            self._echo()
        except (OSError, Failed) as err:
            self.exception = err
            self.error = f"{self.name}: {type(err).__name__}: {err} after {mib(self.received)} back"

    def _echo(self):
        sock = self.sock or socket.create_connection(self.addr, timeout=self.timeout)
        sock.settimeout(self.timeout)
        write_error = []

        def writer():
            try:
                view = memoryview(self.data)
                offset = 0
                while offset < len(view):
                    offset += sock.send(view[offset:offset + CHUNK])
                sock.shutdown(socket.SHUT_WR)
            except OSError as err:
                write_error.append(err)

        w = threading.Thread(target=writer, daemon=True)
        w.start()
        with sock:
            last = time.monotonic()
            while True:
                chunk = sock.recv(256 * 1024)
                now = time.monotonic()
                self.longest_wait = max(self.longest_wait, now - last)
                last = now
                if not chunk:
                    break
                end = self.received + len(chunk)
                if end > len(self.data):
                    raise Failed(f"{end - len(self.data)} bytes more than were sent")
                if self.data[self.received:end] != chunk:
                    bad = next(i for i, (a, b) in enumerate(zip(self.data[self.received:end], chunk)) if a != b)
                    raise Failed(f"byte {self.received + bad} differs")
                self.received = end
            w.join(self.timeout)
            if write_error:
                raise write_error[0]
            if self.received != len(self.data):
                raise Failed(f"EOF after {self.received} of {len(self.data)} bytes")


def cmd_stream(args):
    """K concurrent streams of N bytes: every byte back, then a clean EOF. With --sigterm, echod
    is sent SIGTERM once every stream is under way: the drain must let them all finish."""
    addr = parse_addr(args.addr)
    deadline = time.monotonic() + args.deadline
    start = time.monotonic()
    streams = [Stream(addr, pattern(i, args.bytes), args.timeout, f"stream {i}").start()
               for i in range(args.conns)]
    if args.sigterm:
        # Under way: each stream has had an eighth of its bytes (at most 256 KiB) echoed.
        want = min(args.bytes // 8, 256 * 1024)
        while not all(s.received >= want or not s.thread.is_alive() for s in streams):
            if time.monotonic() > deadline:
                raise Failed("streams did not get under way before the deadline")
            time.sleep(0.01)
        os.kill(args.pid, signal.SIGTERM)
        figure("SIGTERM sent after", f"{time.monotonic() - start:.2f} s, "
               f"{mib(sum(s.received for s in streams))} echoed by then")
    for s in streams:
        s.join(deadline)
    errors = [s.error for s in streams if s.error]
    if errors:
        raise Failed("; ".join(errors))
    took = time.monotonic() - start
    total = sum(s.received for s in streams)
    figure("bytes verified", f"{total} ({args.conns} x {mib(args.bytes)}), each ended by a clean EOF")
    figure("time", f"{took:.2f} s ({total / took / (1 << 20):.2f} MiB/s echoed); longest wait for "
           f"echoed bytes {max(s.longest_wait for s in streams):.2f} s")


def cmd_sizes(args):
    """One connection, one message of each size in turn, each echoed exactly; then a clean EOF."""
    sizes = [int(s) for s in args.sizes.split(",")]
    sock = socket.create_connection(parse_addr(args.addr), timeout=args.timeout)
    with sock:
        for i, size in enumerate(sizes):
            data = pattern(1000 + i, size)
            sender = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
            sender.start()
            back = bytearray()
            while len(back) < size:
                chunk = sock.recv(size - len(back))
                if not chunk:
                    raise Failed(f"EOF after {len(back)} of a {size}-byte message")
                back += chunk
            sender.join(args.timeout)
            if bytes(back) != data:
                raise Failed(f"the {size}-byte message came back altered")
        sock.shutdown(socket.SHUT_WR)
        if sock.recv(1) != b"":
            raise Failed("data after the last echo")
    figure("messages verified", f"{len(sizes)} ({sum(sizes)} bytes, sizes {args.sizes}), then a clean EOF")


# --------------------------------------------------------------------------- many

class Many:
    """Thousands of connections on one selector: each connects, echoes `msgs` messages, waits
    until all are served (all open at once), then half-closes and expects a clean EOF."""

    CONNECTING, SENDING, RECEIVING, WAITING, CLOSING, DONE = range(6)

    def __init__(self, args):
        self.args = args
        self.addr = parse_addr(args.addr)
        self.sel = selectors.DefaultSelector()
        self.conns = {}
        self.failures = []
        self.connect_times = []

    def open(self, i):
        sock = socket.socket()
        sock.setblocking(False)
        err = sock.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            raise Failed(f"connection {i}: connect: {os.strerror(err)}")
        c = {"id": i, "sock": sock, "state": self.CONNECTING, "msg": 0, "out": b"", "sent": 0,
             "back": bytearray(), "t0": time.monotonic()}
        self.conns[sock.fileno()] = c
        self.sel.register(sock, selectors.EVENT_WRITE, c)

    def next_message(self, c):
        c["out"] = os.urandom(self.args.size)
        c["sent"] = 0
        c["back"] = bytearray()
        c["state"] = self.SENDING
        self.sel.modify(c["sock"], selectors.EVENT_READ | selectors.EVENT_WRITE, c)

    def fail(self, c, why):
        self.failures.append(f"connection {c['id']}: {why}")
        self.sel.unregister(c["sock"])
        c["sock"].close()
        c["state"] = self.DONE

    def step(self, c, events):
        sock = c["sock"]
        try:
            if c["state"] == self.CONNECTING:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    return self.fail(c, f"connect: {os.strerror(err)}")
                self.connect_times.append(time.monotonic() - c["t0"])
                self.next_message(c)
                return
            if events & selectors.EVENT_WRITE and c["state"] == self.SENDING:
                c["sent"] += sock.send(c["out"][c["sent"]:])
                if c["sent"] == len(c["out"]):
                    c["state"] = self.RECEIVING
                    self.sel.modify(sock, selectors.EVENT_READ, c)
            if events & selectors.EVENT_READ:
                chunk = sock.recv(65536)
                if c["state"] == self.CLOSING:
                    if chunk:
                        return self.fail(c, "data after the last echo")
                    self.sel.unregister(sock)
                    sock.close()
                    c["state"] = self.DONE
                    return
                if not chunk:
                    return self.fail(c, f"EOF in state {c['state']} after message {c['msg']}")
                if c["state"] == self.WAITING:
                    return self.fail(c, "unexpected data while waiting")
                c["back"] += chunk
                if len(c["back"]) > c["sent"]:
                    return self.fail(c, "more bytes back than sent")
                if len(c["back"]) == len(c["out"]):
                    if bytes(c["back"]) != c["out"]:
                        return self.fail(c, f"message {c['msg']} came back altered")
                    c["msg"] += 1
                    if c["msg"] < self.args.msgs:
                        self.next_message(c)
                    else:
                        c["state"] = self.WAITING
                        self.sel.modify(sock, selectors.EVENT_READ, c)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as err:
            self.fail(c, f"{type(err).__name__}: {err}")

    def count(self, state):
        return sum(1 for c in self.conns.values() if c["state"] == state)

    def run(self):
        n = self.args.conns
        start = time.monotonic()
        deadline = start + self.args.deadline
        opened = 0
        phase = "serving"
        served_at = None
        while True:
            now = time.monotonic()
            if now > deadline:
                states = {name: self.count(s) for name, s in (
                    ("connecting", self.CONNECTING), ("sending", self.SENDING),
                    ("receiving", self.RECEIVING), ("waiting", self.WAITING),
                    ("closing", self.CLOSING))}
                raise Failed(f"deadline reached in phase {phase}: {states}; failures: {self.failures[:5]}")
            # Open new connections while fewer than `ramp` handshakes are pending.
            while opened < n and self.count(self.CONNECTING) < self.args.ramp:
                self.open(opened)
                opened += 1
            for key, events in self.sel.select(timeout=0.05):
                self.step(key.data, events)
            if self.failures:
                raise Failed(f"{len(self.failures)} connection(s) failed: {self.failures[:5]}")
            if phase == "serving" and opened == n and self.count(self.WAITING) == n:
                served_at = time.monotonic() - start
                active = metric(scrape(self.args.metrics), "echod_connections_active")
                if active != n:
                    raise Failed(f"all {n} served and open, but echod_connections_active = {active}")
                for c in self.conns.values():
                    c["sock"].shutdown(socket.SHUT_WR)
                    c["state"] = self.CLOSING
                phase = "closing"
            if phase == "closing" and self.count(self.DONE) == n:
                break
        total = time.monotonic() - start
        times = sorted(self.connect_times)
        figure("clients served", f"{n}, all open at once (echod_connections_active = {n}), "
               f"{self.args.msgs} x {self.args.size} B each verified, then a clean EOF each")
        figure("time", f"all served after {served_at:.2f} s, all closed after {total:.2f} s")
        figure("connect time", f"median {times[len(times) // 2] * 1000:.0f} ms, "
               f"max {times[-1] * 1000:.0f} ms (a lost SYN costs 1 s)")


def cmd_many(args):
    Many(args).run()
    exposition, waited = wait_idle_server(args.metrics)
    closes = closes_by_reason(exposition)
    figure("after the last close", f"echod_connections_active 0 within {waited:.2f} s; closes {closes}")
    if closes["eof"] < args.conns:
        raise Failed(f"expected {args.conns} clean closes, saw {closes}")


# --------------------------------------------------------------------------- reset

def cmd_reset(args):
    """A reset injected into one connection mid-stream ends that connection only: it is counted
    as `reason="reset"`, and the other streams, running at the same time, finish exactly."""
    addr = parse_addr(args.addr)
    echo_port = addr[1]
    before = closes_by_reason(scrape(args.metrics))
    deadline = time.monotonic() + args.deadline
    # The victim connects first; once its port is known, echod's packets to it are rejected
    # with a TCP reset (sent to echod, as if from the client) after --reset-after bytes. Resets
    # themselves pass, so echod's kernel can reset the victim's side in turn.
    victim_sock = socket.create_connection(addr, timeout=args.timeout)
    port = victim_sock.getsockname()[1]
    nft(f"tcp sport {echo_port} tcp dport {port} tcp flags & rst == 0 "
        f"quota over {args.reset_after} bytes reject with tcp reset")
    victim = Stream(addr, pattern(99, args.bytes), args.timeout, "victim", sock=victim_sock).start()
    others = [Stream(addr, pattern(i, args.bytes), args.timeout, f"stream {i}") for i in range(args.others)]
    for s in others:
        s.start()
    victim.join(deadline)
    for s in others:
        s.join(deadline)
    errors = [s.error for s in others if s.error]
    if errors:
        raise Failed("a reset of one connection disturbed others: " + "; ".join(errors))
    if victim.exception is None:
        raise Failed(f"the victim got all {args.bytes} bytes back: no reset was injected")
    if not isinstance(victim.exception, (ConnectionResetError, BrokenPipeError)):
        raise Failed(f"the victim ended by something other than a reset: {victim.error}")
    exposition, _ = wait_idle_server(args.metrics)
    after = closes_by_reason(exposition)
    delta = {k: after[k] - before[k] for k in after}
    figure("victim", f"ended by {type(victim.exception).__name__} after {mib(victim.received)} echoed "
           f"(reset injected after {args.reset_after} bytes from echod)")
    figure("others", f"{args.others} x {mib(args.bytes)} verified with a clean EOF, at the same time")
    figure("closes counted", f"{delta}")
    if delta["reset"] != 1 or delta["eof"] != args.others or sum(delta.values()) != args.others + 1:
        raise Failed(f"expected 1 reset and {args.others} eof closes, saw {delta}")


# --------------------------------------------------------------------------- blackhole

class Pump:
    """A connection kept busy: a writer and a reader thread that verify the echo until stopped.
    Once its packets are dropped, both block; stop() lets them go."""

    def __init__(self, addr):
        self.sock = socket.create_connection(addr, timeout=10)
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.data = pattern(7, 4 << 20)
        self.doubled = self.data + self.data
        self.sent = 0
        self.received = 0
        self.error = None
        self.stop_flag = threading.Event()
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._write, self._read)]
        for t in self.threads:
            t.start()

    def _write(self):
        while not self.stop_flag.is_set():
            off = self.sent % len(self.data)
            try:
                self.sent += self.sock.send(self.data[off:off + CHUNK])
            except socket.timeout:
                continue
            except OSError:
                return

    def _read(self):
        while not self.stop_flag.is_set():
            try:
                chunk = self.sock.recv(CHUNK)
            except socket.timeout:
                continue
            except OSError:
                return
            if not chunk:
                return
            off = self.received % len(self.data)
            if self.doubled[off:off + len(chunk)] != chunk:
                self.error = f"echo altered at byte {self.received}"
                return
            self.received += len(chunk)

    def stop(self):
        self.stop_flag.set()
        for t in self.threads:
            t.join(2)
        reset_on_close(self.sock)
        self.sock.close()


def blackhole(port):
    """Drops everything to and from one client port, as if the peer vanished."""
    nft(f"tcp sport {port} drop")
    nft(f"tcp dport {port} drop")


def wait_for_free(metrics_addr, closes_before, bound):
    """Seconds until echod counts one more close than `closes_before`, and the reason."""
    total = sum(closes_before.values())
    exposition, waited = wait_metric(
        metrics_addr, "the vanished peer's connection to be closed",
        lambda m: sum(closes_by_reason(m).values()) > total, bound + 10)
    after = closes_by_reason(exposition)
    reasons = [k for k in after if after[k] > closes_before[k]]
    return waited, reasons, after


def queued_echo(addr, timeout):
    """Connects while echod is at its limit (the handshake completes in the kernel's backlog)
    and sends a message whose echo arrives once echod accepts: returns the socket and a thread
    whose `seconds` is how long the echo took."""
    sock = socket.create_connection(addr, timeout=timeout)
    result = {}

    def run():
        t0 = time.monotonic()
        try:
            sock.sendall(b"slot?")
            back = b""
            while len(back) < 5:
                chunk = sock.recv(5 - len(back))
                if not chunk:
                    break
                back += chunk
            result["ok"] = back == b"slot?"
        except OSError as err:
            result["error"] = str(err)
        result["seconds"] = time.monotonic() - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return sock, t, result


def cmd_blackhole(args):
    """A vanished peer, idle and with data in flight, is freed within its bound and its slot
    serves the next client (echod runs with --max-connections 1)."""
    addr = parse_addr(args.addr)
    figures = {}
    for kind, bound in (("idle", args.idle_bound), ("in flight", args.flight_bound)):
        closes = closes_by_reason(scrape(args.metrics))
        if kind == "idle":
            holder = socket.create_connection(addr, timeout=10)
            holder.sendall(b"x")
            if holder.recv(1) != b"x":
                raise Failed("the idle peer's echo failed before the blackhole")
            # Let the client's (delayed) ACK of the echo leave: idle means nothing unacknowledged.
            time.sleep(0.3)
            port = holder.getsockname()[1]
            stop = holder.close
        else:
            pump = Pump(addr)
            while pump.received < (1 << 20):
                if pump.error or not all(t.is_alive() for t in pump.threads):
                    raise Failed(f"the streaming peer failed before the blackhole: {pump.error}")
                time.sleep(0.01)
            port = pump.port
            stop = pump.stop
        blackhole(port)
        # The slot is taken: the next client waits in the backlog until the vanished one is freed.
        waiting, waiter, result = queued_echo(addr, bound + 10)
        waited, reasons, closes = wait_for_free(args.metrics, closes, bound)
        waiter.join(bound + 10)
        if result.get("ok") is not True:
            raise Failed(f"{kind}: the next client was not served after the slot freed: {result}")
        waiting.close()
        stop()
        # The queued client's close is counted before the next phase starts.
        wait_idle_server(args.metrics)
        figure(f"blackholed peer, {kind}", f"freed {waited:.2f} s after its packets were dropped "
               f"(bound {bound:.1f} s), closed as {','.join(reasons)}; the queued client's echo "
               f"came {result['seconds']:.2f} s after it connected")
        figures[kind] = waited
        if waited > bound + args.slack:
            raise Failed(f"{kind}: freed after {waited:.2f} s, bound {bound} s (+{args.slack} s slack)")
        if waited < bound / 2:
            raise Failed(f"{kind}: freed after {waited:.2f} s, too early for the {bound} s bound: "
                         "something else closed it")
    exposition, _ = wait_idle_server(args.metrics)
    figure("after both", f"echod_connections_active 0; closes {closes_by_reason(exposition)}")


# --------------------------------------------------------------------------- backpressure

def sysctl_max(name):
    with open(f"/proc/sys/net/ipv4/{name}") as f:
        return int(f.read().split()[2])


def cmd_backpressure(args):
    """Through a rate-limited link: a client that sends but never reads is stopped by
    backpressure after a bounded amount, while streams alongside finish exactly, and echod's
    memory stays within its per-connection bound."""
    addr = parse_addr(args.addr)
    deadline = time.monotonic() + args.deadline
    rss = args.rss
    # The non-reader: writes until nothing more goes for a whole second.
    hog = socket.create_connection(addr, timeout=10)
    hog.setblocking(False)
    streams = [Stream(addr, pattern(i, args.bytes), args.timeout, f"stream {i}").start()
               for i in range(args.conns)]
    block = b"\xa5" * CHUNK
    hog_sent = 0
    last_progress = time.monotonic()
    while time.monotonic() - last_progress < 1.0:
        if time.monotonic() > deadline:
            raise Failed(f"the non-reading client was never stopped: {mib(hog_sent)} sent")
        try:
            hog_sent += hog.send(block)
            last_progress = time.monotonic()
        except BlockingIOError:
            time.sleep(0.01)
    stalled_at = hog_sent
    for s in streams:
        s.join(deadline)
    # Still stopped after the streams finished: nothing more was taken from the non-reader.
    try:
        hog_sent += hog.send(block)
    except BlockingIOError:
        pass
    rss.done.set()
    rss.thread.join(2)
    errors = [s.error for s in streams if s.error]
    if errors:
        raise Failed("; ".join(errors))
    # What backpressure allows in flight: the client's send buffer, echod's receive buffer, its
    # echo buffers and loop (3 x 256 KiB), echod's send buffer and the client's receive buffer.
    allowed = 2 * (sysctl_max("tcp_wmem") + sysctl_max("tcp_rmem")) + 3 * 256 * 1024
    figure("non-reading client", f"stopped after {mib(stalled_at)} "
           f"(buffers on the path allow at most {mib(allowed)}); {mib(hog_sent - stalled_at)} more taken "
           "while the streams ran")
    total = sum(s.received for s in streams)
    figure("streams alongside", f"{args.conns} x {mib(args.bytes)} = {total} bytes verified, clean EOF each")
    grew = rss.peak - rss.start
    per_conn_bound = 3 * 256  # KiB of echo buffers per connection, at most
    bound = (args.conns + 1) * per_conn_bound * 2 + 16 * 1024
    figure("echod memory bound", f"grew {grew} KiB at most (bound {bound} KiB = "
           f"2 x {args.conns + 1} connections x 768 KiB + 16 MiB)")
    if stalled_at > allowed or hog_sent - stalled_at > CHUNK:
        raise Failed("backpressure did not hold on the non-reading client")
    if grew > bound:
        raise Failed(f"echod's memory grew by {grew} KiB, more than {bound} KiB")
    reset_on_close(hog)
    hog.close()


# --------------------------------------------------------------------------- main

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--addr", required=True, help="echod's echo address, HOST:PORT")
    p.add_argument("--metrics", help="echod's HTTP endpoint, HOST:PORT")
    p.add_argument("--timeout", type=float, default=30.0, help="longest wait for one socket operation")
    p.add_argument("--deadline", type=float, default=90.0, help="longest the whole subcommand may take")
    p.add_argument("--pid", type=int, help="echod's process id: its memory is sampled and reported")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stream")
    s.add_argument("--conns", type=int, default=4)
    s.add_argument("--bytes", type=int, default=4 << 20)
    s.add_argument("--sigterm", action="store_true",
                   help="send echod (--pid) SIGTERM once every stream is under way")
    s = sub.add_parser("sizes")
    s.add_argument("--sizes", required=True)
    s = sub.add_parser("many")
    s.add_argument("--conns", type=int, default=2000)
    s.add_argument("--msgs", type=int, default=3)
    s.add_argument("--size", type=int, default=1000)
    s.add_argument("--ramp", type=int, default=200, help="most handshakes pending at once")
    s = sub.add_parser("reset")
    s.add_argument("--others", type=int, default=4)
    s.add_argument("--bytes", type=int, default=2 << 20)
    s.add_argument("--reset-after", type=int, default=256 * 1024)
    s = sub.add_parser("blackhole")
    s.add_argument("--idle-bound", type=float, required=True)
    s.add_argument("--flight-bound", type=float, required=True)
    s.add_argument("--slack", type=float, default=2.5)
    s = sub.add_parser("backpressure")
    s.add_argument("--conns", type=int, default=8)
    s.add_argument("--bytes", type=int, default=2 << 20)
    args = p.parse_args()
    if args.cmd in ("many", "reset", "blackhole") and not args.metrics:
        p.error(f"{args.cmd} needs --metrics")
    if (args.cmd == "backpressure" or getattr(args, "sigterm", False)) and not args.pid:
        p.error(f"{args.cmd} needs --pid")
    rss = None
    try:
        rss = Rss(args.pid)
        args.rss = rss
        {"stream": cmd_stream, "sizes": cmd_sizes, "many": cmd_many, "reset": cmd_reset,
         "blackhole": cmd_blackhole, "backpressure": cmd_backpressure}[args.cmd](args)
    except Failed as err:
        print(f"  FAILED: {err}", flush=True)
        return 1
    except OSError as err:
        print(f"  FAILED: {type(err).__name__}: {err}", flush=True)
        return 1
    finally:
        if rss:
            rss.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
