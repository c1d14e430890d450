#!/usr/bin/env python3
"""Split rendered Kubernetes manifests for validation, and check echod's own invariants.

    split-manifests.py RENDERED.yaml OUTDIR SCHEMADIR

Writes OUTDIR/core.yaml (built-in kinds, for kubernetes-validate), one file per
monitoring.coreos.com object (OUTDIR/<kind>-<name>.yaml) and, for each such kind, a strict
JSON Schema (SCHEMADIR/<kind>.schema.json, made once and kept: importing the models takes
seconds) from the Prometheus Operator's CRD models
(the cloudcoil-models-prometheus-operator package): every object that lists its properties
rejects any other, the way kubectl's strict field validation rejects unknown fields.
Prints one line per file, `crd KIND FILE SCHEMA` for the custom resources.
"""
import json
import re
import sys
from pathlib import Path

import yaml

CRD_GROUP = "monitoring.coreos.com/"


def ecma_pattern(pattern: str) -> str:
    """Go's `(?i)` flag is no ECMA-262 regex: spell the letters out as [aA] instead."""
    if "(?i)" not in pattern:
        return pattern
    out, escaped, in_class = [], False, False
    for ch in pattern.replace("(?i)", ""):
        if escaped:
            out.append(ch)
            escaped = False
        elif ch == "\\":
            out.append(ch)
            escaped = True
        elif ch in "[]":
            in_class = ch == "["
            out.append(ch)
        elif ch.isalpha() and ch.lower() != ch.upper():
            both = ch.lower() + ch.upper()
            out.append(both if in_class else f"[{both}]")
        else:
            out.append(ch)
    return "".join(out)


def strict(node):
    """Close every JSON Schema object that lists its properties."""
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        if isinstance(node.get("pattern"), str):
            node["pattern"] = ecma_pattern(node["pattern"])
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)
    return node


def crd_schema(kind: str) -> dict:
    from cloudcoil.models.prometheus_operator import v1  # noqa: PLC0415

    schema = strict(getattr(v1, kind).model_json_schema())
    # A manifest must name its kind and itself; the models make those optional.
    schema["properties"]["apiVersion"] = {"const": "monitoring.coreos.com/v1"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def duration_seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text):
        total += float(number) * units[unit]
    return total


def check_invariants(docs):
    """What the deployment promises beyond schema validity."""
    errors = []
    by_kind = {d["kind"]: d for d in docs}
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
                 "NetworkPolicy", "ServiceMonitor", "PrometheusRule"):
        if kind not in by_kind:
            errors.append(f"missing {kind}")
    dep = by_kind.get("Deployment")
    if dep:
        pod = dep["spec"]["template"]["spec"]
        (ctr,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in ctr.get("env", [])}
        delay = duration_seconds(env.get("ECHOD_SHUTDOWN_DELAY", "0s"))
        timeout = duration_seconds(env.get("ECHOD_SHUTDOWN_TIMEOUT", "25s"))
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if not grace > delay + timeout:
            errors.append(f"terminationGracePeriodSeconds {grace} <= delay {delay} + timeout {timeout}")
        ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
        if ports != {"echo": 8080, "metrics": 9007}:
            errors.append(f"container ports {ports}")
        probes = {k: ctr.get(k, {}).get("httpGet", {}).get("path")
                  for k in ("startupProbe", "livenessProbe", "readinessProbe")}
        if probes != {"startupProbe": "/healthz", "livenessProbe": "/healthz",
                      "readinessProbe": "/readyz"}:
            errors.append(f"probes {probes}")
        sc = ctr.get("securityContext", {})
        want = {"runAsNonRoot": True, "readOnlyRootFilesystem": True,
                "allowPrivilegeEscalation": False}
        for key, value in want.items():
            if sc.get(key) != value:
                errors.append(f"securityContext.{key} != {value}")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            errors.append("capabilities.drop != [ALL]")
        seccomp = sc.get("seccompProfile") or pod.get("securityContext", {}).get("seccompProfile")
        if (seccomp or {}).get("type") != "RuntimeDefault":
            errors.append("seccompProfile != RuntimeDefault")
        if "limits" not in ctr.get("resources", {}) or "requests" not in ctr["resources"]:
            errors.append("resources need requests and limits")
    svc = by_kind.get("Service")
    mon = by_kind.get("ServiceMonitor")
    if svc and mon:
        names = {p["name"] for p in svc["spec"]["ports"]}
        for ep in mon["spec"]["endpoints"]:
            if ep.get("port") not in names:
                errors.append(f"ServiceMonitor port {ep.get('port')} not on the Service")
        sel = mon["spec"]["selector"].get("matchLabels", {})
        if any(svc["metadata"].get("labels", {}).get(k) != v for k, v in sel.items()):
            errors.append("ServiceMonitor selector does not match the Service's labels")
    return errors


def main() -> int:
    rendered, outdir, schemadir = map(Path, sys.argv[1:4])
    outdir.mkdir(parents=True, exist_ok=True)
    schemadir.mkdir(parents=True, exist_ok=True)
    docs = [d for d in yaml.safe_load_all(rendered.read_text()) if d]
    core = [d for d in docs if not d["apiVersion"].startswith(CRD_GROUP)]
    (outdir / "core.yaml").write_text(yaml.safe_dump_all(core, sort_keys=False))
    print(f"core {outdir / 'core.yaml'}")
    schemas = {}
    for doc in docs:
        if not doc["apiVersion"].startswith(CRD_GROUP):
            continue
        kind = doc["kind"]
        if kind not in schemas:
            schemas[kind] = schemadir / f"{kind}.schema.json"
            if not schemas[kind].exists():
                tmp = schemas[kind].with_suffix(".tmp")
                tmp.write_text(json.dumps(crd_schema(kind), indent=1))
                tmp.replace(schemas[kind])
        path = outdir / f"{kind}-{doc['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        print(f"crd {kind} {path} {schemas[kind]}")
    errors = check_invariants(docs)
    for error in errors:
        print(f"invariant violated: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
