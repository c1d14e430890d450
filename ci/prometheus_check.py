#!/usr/bin/env python3
"""Checks for echod's observability assets, used by ci/prometheus.sh (python3 stdlib only).

Subcommands:
  free-ports N              print N free TCP ports on 127.0.0.1, one per line
  lint-dashboard PATH       static checks of the Grafana dashboard (no server needed)
  live ...                  against a running echod and a Prometheus scraping it:
                            promtool-lint /metrics, compare it with the metrics contract,
                            drive echo traffic, then evaluate every dashboard query and
                            every rule expression through Prometheus' HTTP API;
                            with --echod-pid, end with SIGTERM and check the drain signals.
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

# The metrics contract: name -> (type, labels every series must carry, may be absent).
# Labelled counters appear only once incremented; accept errors may never happen.
CONTRACT = {
    "echod_connections_accepted_total": ("counter", {"listener"}, False),
    "echod_connections_active": ("gauge", set(), False),
    "echod_connections_closed_total": ("counter", {"reason"}, False),
    "echod_bytes_received_total": ("counter", set(), False),
    "echod_bytes_sent_total": ("counter", set(), False),
    "echod_connection_duration_seconds": ("histogram", set(), False),
    "echod_accept_errors_total": ("counter", {"kind"}, True),
    "echod_max_connections": ("gauge", set(), False),
    "echod_draining": ("gauge", set(), False),
    "echod_connections_rejected_total": ("counter", {"reason"}, False),
    "echod_handshake_failures_total": ("counter", {"stage"}, False),
    "echod_connections_copying": ("gauge", set(), False),
    "echod_listeners_accepting": ("gauge", set(), False),
    "echod_buffer_memory_bytes": ("gauge", set(), False),
    "echod_buffer_memory_limit_bytes": ("gauge", set(), False),
    # only on a server with a tls:// listener (the live check runs plain TCP)
    "echod_tls_certificate_expiry_timestamp_seconds": ("gauge", set(), True),
    "echod_tls_reloads_total": ("counter", {"result"}, True),
    "echod_build_info": ("gauge", {"version"}, False),
    "echod_runtime_workers": ("gauge", set(), False),
    "echod_runtime_alive_tasks": ("gauge", set(), False),
    "echod_runtime_global_queue_depth": ("gauge", set(), False),
    "echod_runtime_busy_seconds_total": ("counter", set(), False),
    "echod_udp_datagrams_received_total": ("counter", {"listener"}, False),
    "echod_udp_datagrams_sent_total": ("counter", set(), False),
    "echod_udp_bytes_received_total": ("counter", set(), False),
    "echod_udp_bytes_sent_total": ("counter", set(), False),
    "echod_udp_datagrams_dropped_total": ("counter", {"reason"}, False),
    "process_cpu_seconds_total": ("counter", set(), False),
    "process_resident_memory_bytes": ("gauge", set(), False),
    "process_virtual_memory_bytes": ("gauge", set(), False),
    "process_open_fds": ("gauge", set(), False),
    "process_max_fds": ("gauge", set(), False),
    "process_start_time_seconds": ("gauge", set(), False),
    "process_threads": ("gauge", set(), False),
}
LABEL_VALUES = {
    "reason": {"eof", "reset", "idle_timeout", "shutdown", "error", "handshake_failed", "rejected",
               "injected_close", "injected_reset"},
    "result": {"ok", "error"},
    "stage": {"proxy", "tls"},
    "kind": {"connection_aborted", "too_many_open_files", "no_buffers", "out_of_memory", "other"},
}
# Label values of one metric where they differ from LABEL_VALUES' (same label, other meaning).
METRIC_LABEL_VALUES = {
    "echod_udp_datagrams_dropped_total": {"reason": {"reserved_port", "rate_limited", "send_error", "denied"}},
    "echod_connections_rejected_total": {"reason": {"denied", "per_source_limit", "connect_rate", "untrusted_proxy"}},
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Grafana's variables, replaced before a query is sent to Prometheus.
SUBSTITUTIONS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
    "__range_s": "300",
    "__range_ms": "300000",
    "job": ".*",
    "instance": ".*",
}
VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::[A-Za-z]+)?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def substitute(expr):
    unknown = []

    def repl(m):
        name = m.group(1) or m.group(2)
        if name not in SUBSTITUTIONS:
            unknown.append(name)
            return m.group(0)
        return SUBSTITUTIONS[name]

    out = VAR_RE.sub(repl, expr)
    return out, unknown


# ------------------------------------------------------------------ dashboard queries

def walk_panels(panels):
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels", []))


def dashboard_queries(dash):
    """(panel title, refId, expr) for every Prometheus query of every panel."""
    out = []
    for p in walk_panels(dash.get("panels", [])):
        for t in p.get("targets", []):
            if "expr" in t:
                out.append((p.get("title", "?"), t.get("refId", "?"), t["expr"]))
    return out


def variable_queries(dash):
    """(variable name, PromQL equivalent, label) for label_values() template variables."""
    out = []
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        m = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*", q)
        if not m:
            fail(f"variable {v.get('name')}: cannot translate query {q!r}")
        out.append((v["name"], f"count by ({m.group(2)}) ({m.group(1)})", m.group(2)))
    return out


def cmd_lint_dashboard(args):
    with open(args.path) as f:
        dash = json.load(f)
    problems = []
    if not isinstance(dash.get("schemaVersion"), int):
        problems.append("schemaVersion missing")
    names = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    ds = names.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("template variable `datasource` (type datasource, query prometheus) missing")
    for var, metric in (("job", "label_values(echod_build_info, job)"),
                        ("instance", 'label_values(echod_build_info{job=~"$job"}, instance)')):
        v = names.get(var)
        q = v and (v["query"].get("query") if isinstance(v.get("query"), dict) else v.get("query"))
        if not v or q != metric or not v.get("multi") or not v.get("includeAll"):
            problems.append(f"template variable `{var}` must be {metric}, multi, include-all")
    rows = [p.get("title") for p in dash.get("panels", []) if p.get("type") == "row"]
    for want in ("Clients (RED)", "Process (USE)"):
        if want not in rows:
            problems.append(f"row {want!r} missing")
    ids = [p.get("id") for p in walk_panels(dash.get("panels", []))]
    if len(ids) != len(set(ids)):
        problems.append("panel ids are not unique")
    boxes = []
    for p in walk_panels(dash.get("panels", [])):
        g = p.get("gridPos") or {}
        if not all(k in g for k in ("x", "y", "w", "h")) or g["x"] + g["w"] > 24:
            problems.append(f"panel {p.get('title')!r}: bad gridPos {g}")
            continue
        for title, o in boxes:
            if g["x"] < o["x"] + o["w"] and o["x"] < g["x"] + g["w"] and g["y"] < o["y"] + o["h"] and o["y"] < g["y"] + g["h"]:
                problems.append(f"panels {title!r} and {p.get('title')!r} overlap")
        boxes.append((p.get("title"), g))
    known = set(CONTRACT) | {"up"}
    for n, (typ, _, _) in CONTRACT.items():
        if typ == "histogram":
            known |= {n + s for s in HISTOGRAM_SUFFIXES}
    metric_re = re.compile(r"\b((?:echod|process)_[A-Za-z0-9_]*|up)\b(\s*\{[^}]*\})?")
    for p in walk_panels(dash.get("panels", [])):
        if p.get("type") == "row":
            continue
        title = p.get("title", "?")
        if not p.get("description"):
            problems.append(f"panel {title!r} has no description")
        if (p.get("datasource") or {}).get("uid") != "${datasource}":
            problems.append(f"panel {title!r} does not use the $datasource variable")
        if not p.get("targets"):
            problems.append(f"panel {title!r} has no query")
        for t in p.get("targets", []):
            expr = t.get("expr", "")
            for m in metric_re.finditer(expr):
                name, sel = m.group(1), m.group(2) or ""
                if name not in known:
                    problems.append(f"panel {title!r}: {name} is not a contract metric")
                if 'job=~"$job"' not in sel or 'instance=~"$instance"' not in sel:
                    problems.append(f"panel {title!r}: {name} lacks the $job/$instance filter")
            for rng in re.findall(r"\[([^\]]*)\]", expr):
                if rng not in ("$__rate_interval", "$__range"):
                    problems.append(f"panel {title!r}: fixed range [{rng}], use $__rate_interval")
            _, unknown = substitute(expr)
            if unknown:
                problems.append(f"panel {title!r}: unknown variables {unknown}")
    for p in problems:
        print(f"  problem: {p}")
    if problems:
        fail(f"{len(problems)} problem(s) in {args.path}")
    print(f"  OK: {len(dashboard_queries(dash))} queries in {len(ids)} panels, "
          f"rows {rows}, variables {list(names)}")


# ------------------------------------------------------------------ live checks

def http_get(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode("utf-8", "replace")


def wait_until(what, predicate, timeout, interval=0.25, soft=False):
    deadline = time.monotonic() + timeout
    last_err = None
    while time.monotonic() < deadline:
        try:
            v = predicate()
            if v:
                return v
        except (OSError, urllib.error.URLError, ValueError) as e:
            last_err = e
        time.sleep(interval)
    if soft:
        print(f"  warning: timed out after {timeout:.0f}s waiting for {what}")
        return None
    fail(f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last_err})" if last_err else ""))


class Prom:
    def __init__(self, base):
        self.base = base.rstrip("/")

    def api(self, path, **params):
        url = f"{self.base}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            body = json.load(e)
        return body

    def query(self, expr):
        """(ok, result list or error text)."""
        b = self.api("query", query=expr)
        if b.get("status") != "success":
            return False, f"{b.get('errorType')}: {b.get('error')}"
        data = b["data"]
        if data["resultType"] == "scalar":
            return True, [data["result"]]
        return True, data["result"]

    def scalar(self, expr):
        ok, res = self.query(expr)
        if not ok or not res:
            return None
        return float(res[0]["value"][1])


def parse_exposition(text):
    """name -> {"type", "help", "samples": [(sample name, labels dict, value)]}."""
    fams = {}
    sample_re = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
    label_re = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            parts = line.split(None, 3)
            if len(parts) < 3:
                continue
            fam = fams.setdefault(parts[2], {"type": None, "help": None, "samples": []})
            fam["help" if parts[1] == "HELP" else "type"] = parts[3] if len(parts) > 3 else ""
            continue
        if line.startswith("#"):
            continue
        m = sample_re.match(line)
        if not m:
            fail(f"unparsable exposition line: {line!r}")
        name, labels = m.group(1), dict(label_re.findall(m.group(2) or ""))
        base = name
        for s in HISTOGRAM_SUFFIXES:
            if name.endswith(s) and name[: -len(s)] in fams and fams[name[: -len(s)]]["type"] in ("histogram", "summary"):
                base = name[: -len(s)]
        fams.setdefault(base, {"type": None, "help": None, "samples": []})["samples"].append(
            (name, labels, m.group(3)))
    return fams


def check_contract(text, after_traffic):
    fams = parse_exposition(text)
    problems = []
    for name, (typ, labels, optional) in CONTRACT.items():
        fam = fams.get(name)
        if fam is None or not fam["samples"]:
            if optional or (labels and not after_traffic):
                continue
            near = [n for n in fams if n.split("_")[:2] == name.split("_")[:2]]
            problems.append(f"{name} ({typ}) missing" + (f"; similar names exposed: {near}" if near else ""))
            continue
        if fam["type"] != typ:
            problems.append(f"{name}: TYPE {fam['type']}, contract says {typ}")
        if not fam["help"]:
            problems.append(f"{name}: no HELP text")
        for sname, slabels, _ in fam["samples"]:
            if sname.endswith("_bucket"):
                continue
            missing = labels - set(slabels)
            if missing:
                problems.append(f"{sname}: series without label(s) {sorted(missing)}: {slabels}")
            for lab, allowed in {**LABEL_VALUES, **METRIC_LABEL_VALUES.get(name, {})}.items():
                if lab in labels and slabels.get(lab) not in allowed:
                    problems.append(f"{sname}: {lab}={slabels.get(lab)!r} not in {sorted(allowed)}")
        if typ == "histogram":
            les = {s[1].get("le") for s in fam["samples"] if s[0].endswith("_bucket")}
            lefloats = {float(x) for x in les if x}
            for edge in (0.001, 3600.0):
                if edge not in lefloats:
                    problems.append(f"{name}: no bucket le={edge:g} (contract: buckets 0.001 … 3600)")
    return problems, fams


def check_values(fams, nbytes, echo_addr, udp=None):
    """What the traffic of drive_traffic() must have done to the metrics."""
    def total(name, **labels):
        return sum(float(v) for n, l, v in fams.get(name, {}).get("samples", [])
                   if n == name and all(l.get(k) == want for k, want in labels.items()))
    want = [
        ("echod_connections_accepted_total", {"listener": echo_addr}, ">=", 8),
        ("echod_connections_closed_total", {"reason": "eof"}, ">=", 6),
        ("echod_connections_closed_total", {"reason": "reset"}, ">=", 1),
        ("echod_connections_active", {}, ">=", 1),
        ("echod_bytes_received_total", {}, ">=", nbytes),
        ("echod_bytes_sent_total", {}, ">=", nbytes),
        ("echod_connection_duration_seconds_count", {}, ">=", 7),
        ("echod_draining", {}, "==", 0),
        ("echod_build_info", {}, "==", 1),
        ("echod_max_connections", {}, ">=", 1),
        ("echod_runtime_workers", {}, ">=", 1),
        ("echod_runtime_alive_tasks", {}, ">=", 1),
        ("process_open_fds", {}, ">=", 1),
        ("process_max_fds", {}, ">=", 1),
        ("process_resident_memory_bytes", {}, ">=", 1),
    ]
    problems = []
    for name, labels, op, value in want:
        fam = name[: -len("_count")] if name.endswith("_count") else name
        got = sum(float(v) for n, l, v in fams.get(fam, {}).get("samples", [])
                  if n == name and all(l.get(k) == w for k, w in labels.items()))
        if not (got >= value if op == ">=" else got == value):
            sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
            problems.append(f"after the test traffic {name}{{{sel}}} is {got:g}, expected {op} {value}")
    received, sent = total("echod_bytes_received_total"), total("echod_bytes_sent_total")
    if received != sent:
        problems.append(f"bytes received ({received:g}) != bytes sent ({sent:g}) with every echo read back")
    if udp:
        got = {
            "received": total("echod_udp_datagrams_received_total", listener=f"udp://{udp['addr']}"),
            "sent": total("echod_udp_datagrams_sent_total"),
            "bytes_received": total("echod_udp_bytes_received_total"),
            "bytes_sent": total("echod_udp_bytes_sent_total"),
            "rate_limited": total("echod_udp_datagrams_dropped_total", reason="rate_limited"),
        }
        dropped = total("echod_udp_datagrams_dropped_total")
        for key, want in (("received", udp["sent"]), ("sent", udp["echoed"]), ("bytes_received", udp["bytes_sent"]),
                          ("bytes_sent", udp["bytes_echoed"]), ("rate_limited", udp["sent"] - udp["echoed"])):
            if got[key] != want:
                problems.append(f"after the UDP test traffic the UDP {key} count is {got[key]:g}, expected {want}")
        if got["received"] != got["sent"] + dropped:
            problems.append(f"UDP datagrams received ({got['received']:g}) != echoed ({got['sent']:g}) + dropped ({dropped:g})")
    return problems


def promtool_lint(promtool, text, label):
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    out = (r.stdout + r.stderr).strip()
    if r.returncode != 0 or out:
        print(out)
        fail(f"`promtool check metrics` on {label} printed problems (exit {r.returncode})")
    print(f"  OK: promtool check metrics ({label}): no output")


def drive_traffic(host, port):
    """Several echo round trips, one client reset, one connection left open (returned)."""
    total = 0

    def roundtrip(sock, payload):
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                fail("echo connection closed early")
            got += chunk
        if got != payload:
            fail("echoed bytes differ from the bytes sent")
        return len(payload)

    for i in range(6):
        with socket.create_connection((host, port), timeout=5) as s:
            for j in range(4):
                total += roundtrip(s, bytes([(i * 7 + j) % 256]) * (1000 * (j + 1) + i))
            s.shutdown(socket.SHUT_WR)
            s.settimeout(5)
            if s.recv(1) != b"":
                fail("server sent data after the echo was complete")
    # abortive close: SO_LINGER 0 makes close() send a RST
    s = socket.create_connection((host, port), timeout=5)
    total += roundtrip(s, b"reset me " * 100)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()
    keep = socket.create_connection((host, port), timeout=5)
    total += roundtrip(keep, b"still here " * 50)
    return keep, total


def drive_udp_traffic(host, port, limit):
    """UDP datagrams within the source's rate limit, each echo checked, then a burst over it:
    the excess is dropped as rate_limited. Returns what was sent and what came back."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.connect((host, port))
    out = {"addr": f"{host}:{port}", "sent": 0, "echoed": 0, "bytes_sent": 0, "bytes_echoed": 0}
    polite = limit // 2
    for i in range(polite):
        payload = bytes([i % 256]) * (1 + 37 * i)
        s.send(payload)
        out["sent"] += 1
        out["bytes_sent"] += len(payload)
        if s.recv(70000) != payload:
            fail("a UDP echo differs from the datagram sent")
        out["echoed"] += 1
        out["bytes_echoed"] += len(payload)
    # The rest of the burst, then three times the limit: the source is held to its rate.
    burst = 4 * limit
    for i in range(burst):
        s.send(b"burst %d" % i)
        out["sent"] += 1
        out["bytes_sent"] += len(b"burst %d" % i)
    s.settimeout(0.5)
    try:
        while True:
            got = s.recv(70000)
            out["echoed"] += 1
            out["bytes_echoed"] += len(got)
    except socket.timeout:
        pass
    s.close()
    if out["echoed"] >= out["sent"]:
        fail("a UDP burst over the rate limit was answered in full")
    return out


def cmd_live(args):
    prom = Prom(args.prometheus)
    metrics_url = args.metrics_url
    host, port = args.echo.rsplit(":", 1)
    port = int(port)
    t0 = time.monotonic()

    print(f"--- waiting for echod's /metrics at {metrics_url}")
    wait_until("echod /metrics", lambda: http_get(metrics_url)[0] == 200, 20)
    for path in ("/healthz", "/readyz"):
        url = metrics_url.rsplit("/", 1)[0] + path
        try:
            status, _ = http_get(url)
        except urllib.error.HTTPError as e:
            status = e.code
        if status != 200:
            fail(f"GET {path} answered {status}, expected 200 on a serving echod")
    print("  OK: /metrics, /healthz and /readyz answer 200")
    _, before = http_get(metrics_url)
    promtool_lint(args.promtool, before, "/metrics before traffic")

    print(f"--- waiting for Prometheus ({args.prometheus}) to scrape echod")
    wait_until("Prometheus ready", lambda: http_get(args.prometheus + "/-/ready")[0] == 200, 30)
    wait_until("a successful scrape (up == 1)", lambda: prom.scalar('max(up{job="echod"})') == 1.0, 30)
    print("  OK: up{job=\"echod\"} == 1")

    print(f"--- driving echo traffic to {args.echo}")
    keep, nbytes = drive_traffic(host, port)
    print(f"  OK: 8 connections, {nbytes} bytes echoed and verified, 1 reset (SO_LINGER 0), 1 left open")
    udp = None
    if args.udp_echo:
        uhost, uport = args.udp_echo.rsplit(":", 1)
        udp = drive_udp_traffic(uhost, int(uport), args.udp_rate_limit)
        print(f"  OK: {udp['sent']} UDP datagrams sent, {udp['echoed']} echoed (checked within the rate limit), "
              f"{udp['sent'] - udp['echoed']} over it")
    t_traffic = time.time()

    # byte counters may be published up to ~1 s late: wait, then lint the fuller exposition
    def counters_caught_up():
        fams = parse_exposition(http_get(metrics_url)[1])
        def val(n):
            s = fams.get(n, {}).get("samples") or []
            return sum(float(x[2]) for x in s)
        closed = fams.get("echod_connections_closed_total", {}).get("samples") or []
        return val("echod_bytes_sent_total") >= nbytes and val("echod_bytes_received_total") >= nbytes \
            and sum(float(x[2]) for x in closed) >= 7 and val("echod_connections_active") >= 1
    wait_until("echod's counters to show the traffic (bytes, 7 closes, 1 active)", counters_caught_up, 10,
               soft=True)  # on timeout, the contract check below says what is wrong
    _, after = http_get(metrics_url)
    promtool_lint(args.promtool, after, "/metrics after traffic")

    print("--- comparing /metrics with the metrics contract")
    problems, fams = check_contract(after, after_traffic=True)
    reasons = {s[1].get("reason") for s in fams.get("echod_connections_closed_total", {}).get("samples", [])}
    for want in ("eof", "reset"):
        if want not in reasons:
            problems.append(f"echod_connections_closed_total has no reason=\"{want}\" series after "
                            f"{'clean closes' if want == 'eof' else 'a SO_LINGER 0 reset'} (got {sorted(r for r in reasons if r)})")
    problems += check_values(fams, nbytes, args.echo, udp)
    extra = sorted(n for n in fams if n.startswith("echod_") and n not in CONTRACT)
    for p in problems:
        print(f"  problem: {p}")
    if problems:
        fail(f"{len(problems)} difference(s) from the metrics contract")
    print(f"  OK: all {len(CONTRACT)} contract metrics match (type, HELP, labels)"
          + (f"; extra echod metrics: {extra}" if extra else ""))

    print("--- waiting for Prometheus to scrape the traffic a few times")
    wait_until("3 scrapes after the traffic",
               lambda: (prom.scalar('max(timestamp(up{job="echod"}))') or 0) > t_traffic + 3.5, 30)
    wait_until("2+ samples of every closed-connections series",
               lambda: (prom.scalar('min(count_over_time(echod_connections_closed_total{job="echod"}[1m]))') or 0) >= 2,
               15)

    with open(args.dashboard) as f:
        dash = json.load(f)
    failures = 0

    print(f"--- evaluating the dashboard's template variables ({args.dashboard})")
    for name, expr, label in variable_queries(dash):
        q, _ = substitute(expr)
        ok, res = prom.query(q)
        vals = sorted(r["metric"].get(label, "") for r in res) if ok else []
        good = ok and vals and all(vals)
        failures += not good
        print(f"  {'OK  ' if good else 'FAIL'} ${name}: {q} -> {vals if ok else res}")

    print("--- evaluating every dashboard query ($job,$instance -> .*, $__rate_interval -> 1m, $__range -> 5m)")
    rows = []
    for title, ref, expr in dashboard_queries(dash):
        q, unknown = substitute(expr)
        if unknown:
            rows.append(("FAIL", "-", f"{title} [{ref}]", f"unknown variables {unknown}: {expr}"))
            continue
        ok, res = prom.query(q)
        if not ok:
            rows.append(("FAIL", "err", f"{title} [{ref}]", f"{res}\n        {q}"))
        elif not res:
            rows.append(("FAIL", "0", f"{title} [{ref}]", q))
        else:
            rows.append(("OK", str(len(res)), f"{title} [{ref}]", q))
    print(f"  {'':4} {'#series':>7}  panel [ref]: expr")
    for status, n, where, q in rows:
        print(f"  {status:4} {n:>7}  {where}: {q}")
    bad = [r for r in rows if r[0] != "OK"]
    failures += len(bad)
    print(f"  {len(rows) - len(bad)} of {len(rows)} dashboard queries parse and return data")

    print("--- checking the alert rules loaded by the live Prometheus")
    b = prom.api("rules")
    groups = b.get("data", {}).get("groups", []) if b.get("status") == "success" else []
    rules = [r for g in groups for r in g.get("rules", [])]
    if not rules:
        fail("the live Prometheus loaded no rules")
    wait_until("every rule to be evaluated once",
               lambda: all(r.get("lastEvaluation", "").startswith("20") for g in prom.api("rules")["data"]["groups"]
                           for r in g["rules"]), 10)
    rules = [r for g in prom.api("rules")["data"]["groups"] for r in g["rules"]]
    print(f"  {'':4} {'#series':>7}  {'state':8} rule: expr")
    for r in rules:
        ok, res = prom.query(r["query"])
        good = ok and r.get("health") == "ok"
        failures += not good
        detail = r.get("lastError") or ("" if ok else res)
        print(f"  {'OK' if good else 'FAIL':4} {len(res) if ok else 'err':>7}  {r.get('state', r['type']):8} "
              f"{r['name']}: {' '.join(r['query'].split())}" + (f"  ({detail})" if detail else ""))
    print("  metrics the rules read, as scraped from echod (#series):")
    used = sorted({m for r in rules for m in re.findall(r"\b((?:echod|process)_[A-Za-z0-9_]+|up)\b", r["query"])})
    for name in used:
        ok, res = prom.query(f'count({name}{{job="echod"}})')
        n = int(float(res[0]["value"][1])) if ok and res else 0
        optional = CONTRACT.get(name, ("", set(), False))[2]
        good = n > 0 or optional
        failures += not good
        print(f"  {'OK' if good else 'FAIL':4} {n:>7}  {name}" + ("  (may be absent until the first error)" if optional and not n else ""))
    firing = [r["name"] for r in rules if r.get("state") == "firing"]
    if firing:
        print(f"  note: firing on the test server: {firing}")

    if args.echod_pid:
        # A drain closes idle connections at once: the client that keeps echod draining has
        # data in flight, sent until its own and echod's buffers are full, never read.
        busy = socket.socket()
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        busy.settimeout(5)
        busy.connect((host, port))
        busy.setblocking(False)
        chunk = b"x" * 65536
        for _ in range(1024):  # bounded: at most 64 MiB
            try:
                busy.send(chunk)
            except BlockingIOError:
                break
        print(f"--- SIGTERM to echod (pid {args.echod_pid}) with a client still sending")
        os.kill(args.echod_pid, signal.SIGTERM)

        def readyz_503():
            try:
                http_get(metrics_url.rsplit("/", 1)[0] + "/readyz")
            except urllib.error.HTTPError as e:
                return e.code == 503
            return False
        wait_until("/readyz to answer 503 while draining", readyz_503, 5, interval=0.05)
        fams = parse_exposition(http_get(metrics_url)[1])
        draining = [float(v) for n, _, v in fams.get("echod_draining", {}).get("samples", [])]
        if draining != [1.0]:
            failures += 1
            print(f"  FAIL: echod_draining is {draining} while draining, expected [1]")
        else:
            print("  OK: /readyz answers 503 and echod_draining is 1 while the last client is connected")
        busy.close()
    keep.close()
    if failures:
        fail(f"{failures} live check(s) failed")
    print(f"  OK: live checks passed in {time.monotonic() - t0:.1f}s")


def cmd_free_ports(args):
    socks = []
    for _ in range(args.n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    for s in socks:
        print(s.getsockname()[1])
    for s in socks:
        s.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("free-ports")
    p.add_argument("n", type=int)
    p.set_defaults(func=cmd_free_ports)
    p = sub.add_parser("lint-dashboard")
    p.add_argument("path")
    p.set_defaults(func=cmd_lint_dashboard)
    p = sub.add_parser("live")
    p.add_argument("--dashboard", required=True)
    p.add_argument("--prometheus", required=True, help="base URL of the Prometheus scraping echod")
    p.add_argument("--metrics-url", required=True, help="echod's /metrics URL")
    p.add_argument("--echo", required=True, help="HOST:PORT of echod's echo listener")
    p.add_argument("--udp-echo", help="HOST:PORT of echod's udp:// listener, if any")
    p.add_argument("--udp-rate-limit", type=int, default=50, help="echod's --udp-rate-limit")
    p.add_argument("--promtool", default="promtool")
    p.add_argument("--echod-pid", type=int, help="if given, finish with SIGTERM and check the drain signals")
    p.set_defaults(func=cmd_live)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
