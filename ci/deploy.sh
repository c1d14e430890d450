#!/usr/bin/env bash
# CI check of echod's deployment files, each by the tool that consumes it:
#   1. deploy/Dockerfile: hadolint; podman build fed a static echod (the `builder` stage
#      replaced by --build-context); the image run with podman: echo, /healthz, /readyz,
#      /metrics, then `podman stop` during a client session: drain, exit 0, well before kill.
#   2. deploy/kubernetes: kubectl kustomize; kubernetes-validate --strict on the built-in
#      kinds (oldest and newest supported Kubernetes); ServiceMonitor and PrometheusRule
#      against strict JSON Schemas of the Prometheus Operator's CRDs; PrometheusRule in sync
#      with deploy/prometheus/rules/echod.rules.yml; grace period > delay + timeout.
#      deploy/kubernetes/bench (the echod-bench Job) the same way, its invariants (Indexed,
#      one start time that bench/fleet sets, results on stdout, the base's Service as target)
#      and its Dockerfile with hadolint.
#   3. deploy/systemd: systemd-analyze verify (must print nothing), systemd-analyze security
#      (exposure <= 1.5); socket activation and sd_notify through systemd-socket-activate.
#   4. deploy/compose.yaml: compose-spec schema, docker-compose config, mounted files exist,
#      promtool check config on the compose Prometheus config.
#
# Usage (from the repository root):  bash ci/deploy.sh
# Environment:
#   CARGO_TARGET_DIR   where the static echod is built (default: target)
#   ECHOD_STATIC_BIN   use this static echod instead of building one
#   ECHOD_DEPLOY_VENV  virtualenv for the Python tools (default: ~/.cache/echod/deploy-venv)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
START=$SECONDS
TMP=$(mktemp -d /tmp/echod-deploy.XXXXXX)
CONTAINER="echod-deploy-ci-$$"
IMAGE="localhost/echod:ci"

step() { printf '\n==> %s  [%ds]\n' "$*" $((SECONDS - START)); }
cleanup() {
    if [[ -n ${BUILD_PID:-} ]]; then kill "$BUILD_PID" 2>/dev/null || true; fi
    if command -v podman >/dev/null 2>&1; then
        podman rm -f -t 0 "$CONTAINER" >/dev/null 2>&1 || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT

# ------------------------------------------------------------------------------- build
# The compile is CPU-bound and the installs wait on the network: run them side by side.
BUILD_PID=""
if [[ -z ${ECHOD_STATIC_BIN:-} ]]; then
    TARGET_DIR=${CARGO_TARGET_DIR:-target}
    step "cargo build (static echod) started in the background"
    # The same build as deploy/Dockerfile's builder stage.
    RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_STRIP=symbols \
        CARGO_TARGET_DIR="$TARGET_DIR" \
        cargo build --release --locked --target x86_64-unknown-linux-gnu --bin echod \
        >"$TMP/build.log" 2>&1 &
    BUILD_PID=$!
fi
wait_build() {
    if ! wait "$BUILD_PID"; then
        cat "$TMP/build.log" >&2
        echo "FAIL: cargo build of the static echod" >&2
        exit 1
    fi
    BUILD_PID=""
    tail -n 1 "$TMP/build.log"
}

# ------------------------------------------------------------------------------- install
step "system packages"
declare -A NEED=(
    [podman]=podman [buildah]=buildah [runc]=runc [docker-compose]=docker-compose
    [systemd-analyze]=systemd [systemd-socket-activate]=systemd [readelf]=binutils
    [unshare]=util-linux [promtool]=prometheus
)
MISSING=()
for cmd in "${!NEED[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || MISSING+=("${NEED[$cmd]}")
done
if ((${#MISSING[@]})); then
    mapfile -t MISSING < <(printf '%s\n' "${MISSING[@]}" | sort -u)
    echo "installing: ${MISSING[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Keep packaged services (prometheus) from being started by the install: policy-rc.d
    # exit 101 = action forbidden. Only when no policy is in place already.
    POLICY=/usr/sbin/policy-rc.d
    ADDED_POLICY=""
    if [[ ! -e $POLICY ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$POLICY" && chmod +x "$POLICY" && ADDED_POLICY=1
    fi
    apt-get -o DPkg::Lock::Timeout=300 update -q >/dev/null
    apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${MISSING[@]}" >/dev/null
    if [[ -n $ADDED_POLICY ]]; then rm -f "$POLICY"; fi
fi
podman --version
docker-compose version --short
systemd-analyze --version | sed -n 1p

step "Python tools (ci/deploy/requirements.txt)"
VENV=${ECHOD_DEPLOY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/echod/deploy-venv}
REQ_HASH=$(sha256sum ci/deploy/requirements.txt | cut -d' ' -f1)
if [[ ! -x $VENV/bin/python || "$(cat "$VENV/.requirements" 2>/dev/null)" != "$REQ_HASH" ]]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r ci/deploy/requirements.txt
    echo "$REQ_HASH" >"$VENV/.requirements"
fi
export PATH="$VENV/bin:$PATH"
PY="$VENV/bin/python"
hadolint --version
kubectl version --client 2>/dev/null | sed -n 1,2p
INSTALL_DONE=$SECONDS

# ------------------------------------------------------------------------------- binary
step "static echod (x86_64-unknown-linux-gnu, crt-static)"
if [[ -n ${ECHOD_STATIC_BIN:-} ]]; then
    BIN=$ECHOD_STATIC_BIN
else
    wait_build
    BIN=$TARGET_DIR/x86_64-unknown-linux-gnu/release/echod
fi
BIN=$(realpath "$BIN")
if readelf -lW "$BIN" | grep 'program interpreter' >/dev/null; then
    echo "FAIL: $BIN is dynamically linked; the scratch image has no libc" >&2
    exit 1
fi
echo "$BIN: static, $(stat -c %s "$BIN") bytes"
BUILD_DONE=$SECONDS

# ------------------------------------------------------------------------------- Dockerfile
step "hadolint deploy/Dockerfile"
hadolint deploy/Dockerfile
echo "no findings"

step "podman build (builder stage replaced by the static binary)"
mkdir -p "$TMP/builder"
cp "$BIN" "$TMP/builder/echod"
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | sed -n 1p)
export ECHOD_EXPECT_VERSION=$VERSION
podman build --quiet -f deploy/Dockerfile --build-context "builder=$TMP/builder" \
    --build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION" -t "$IMAGE" . >/dev/null
"$PY" - "$IMAGE" "$VERSION" <<'EOF'
import json, subprocess, sys
(img,) = json.loads(subprocess.run(["podman", "image", "inspect", sys.argv[1]],
                                   capture_output=True, check=True).stdout)
cfg = img["Config"]
if (cfg.get("Labels") or {}).get("org.opencontainers.image.version") != sys.argv[2]:
    sys.exit(f"FAIL: image version label is not Cargo.toml's {sys.argv[2]}")
want = {
    "User": "65532:65532", "StopSignal": "SIGTERM", "Entrypoint": ["/echod"],
    "ExposedPorts": {"8080/tcp": {}, "9007/tcp": {}},
}
bad = {k: cfg.get(k) for k, v in want.items() if cfg.get(k) != v}
env = dict(e.split("=", 1) for e in cfg.get("Env", []))
for k, v in {"ECHOD_LISTEN": "0.0.0.0:8080", "ECHOD_METRICS_LISTEN": "0.0.0.0:9007"}.items():
    if env.get(k) != v:
        bad[k] = env.get(k)
labels = cfg.get("Labels") or {}
for k in ("title", "description", "version", "revision", "licenses"):
    if not labels.get(f"org.opencontainers.image.{k}"):
        bad[f"label {k}"] = None
if len(img["RootFS"]["Layers"]) != 1:
    bad["layers"] = len(img["RootFS"]["Layers"])
if bad:
    sys.exit(f"FAIL: image config: {bad}")
print(f"image {sys.argv[1]}: {img['Size'] / 1e6:.2f} MB, 1 layer, user 65532:65532, "
      f"STOPSIGNAL SIGTERM, OCI labels ok")
EOF

step "podman run: echo, /healthz, /readyz, /metrics; podman stop drains and exits 0"
read -r ECHO_PORT METRICS_PORT < <("$PY" ci/deploy/smoke.py free-ports 2)
podman run -d --name "$CONTAINER" --network host --runtime runc \
    --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 \
    --read-only --cap-drop ALL --security-opt no-new-privileges \
    -e "ECHOD_LISTEN=127.0.0.1:$ECHO_PORT" -e "ECHOD_METRICS_LISTEN=127.0.0.1:$METRICS_PORT" \
    "$IMAGE" >/dev/null
if ! "$PY" ci/deploy/smoke.py container "$CONTAINER" "$ECHO_PORT" "$METRICS_PORT"; then
    echo "--- container log"; podman logs "$CONTAINER" 2>&1 | tail -n 30
    exit 1
fi
echo "--- container log (tail)"
podman logs "$CONTAINER" 2>&1 | tail -n 5
podman rm -f -t 0 "$CONTAINER" >/dev/null
IMAGE_DONE=$SECONDS

# ------------------------------------------------------------------------------- Kubernetes
step "PrometheusRule in sync with deploy/prometheus/rules/echod.rules.yml"
"$PY" ci/deploy/gen-prometheusrule.py --check

step "kubectl kustomize deploy/kubernetes"
kubectl kustomize deploy/kubernetes >"$TMP/rendered.yaml"
echo "$(grep -c '^kind:' "$TMP/rendered.yaml") objects: $(grep '^kind:' "$TMP/rendered.yaml" | cut -d' ' -f2 | tr '\n' ' ')"
# The schemas are cached beside the tools that make them (keyed by requirements.txt).
"$PY" ci/deploy/split-manifests.py "$TMP/rendered.yaml" "$TMP/k8s" "$VENV/crd-schemas" \
    >"$TMP/split.txt"
echo "deployment invariants hold (grace > delay + timeout, probes, securityContext, ports)"

for version in 1.30 1.37; do
    step "kubernetes-validate --strict (Kubernetes $version): built-in kinds"
    kubernetes-validate --strict -k "$version" "$TMP/k8s/core.yaml" | tee "$TMP/kv.txt"
    if grep -qv '^INFO .* passed ' "$TMP/kv.txt"; then
        echo "FAIL: kubernetes-validate reported more than passes" >&2
        exit 1
    fi
done

step "Prometheus Operator kinds against strict JSON Schemas of the v0.80 CRDs"
CRDS=0
while read -r tag kind file schema; do
    [[ $tag == crd ]] || continue
    printf '%s: ' "$kind"
    check-jsonschema --schemafile "$schema" "$file"
    CRDS=$((CRDS + 1))
done <"$TMP/split.txt"
[[ $CRDS == 2 ]] || { echo "FAIL: expected 2 Prometheus Operator objects, got $CRDS" >&2; exit 1; }

step "kubectl kustomize deploy/kubernetes/bench (the echod-bench Job)"
kubectl kustomize deploy/kubernetes/bench >"$TMP/bench.yaml"
echo "$(grep -c '^kind:' "$TMP/bench.yaml") object(s): $(grep '^kind:' "$TMP/bench.yaml" | cut -d' ' -f2 | tr '\n' ' ')"
for version in 1.30 1.37; do
    step "kubernetes-validate --strict (Kubernetes $version): deploy/kubernetes/bench"
    kubernetes-validate --strict -k "$version" "$TMP/bench.yaml" | tee "$TMP/kv-bench.txt"
    if grep -qv '^INFO .* passed ' "$TMP/kv-bench.txt"; then
        echo "FAIL: kubernetes-validate reported more than passes" >&2
        exit 1
    fi
done

step "echod-bench Job invariants (Indexed, one start time, results on stdout, the base's Service)"
"$PY" - "$TMP/bench.yaml" "$TMP/rendered.yaml" <<'EOF'
import re, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
base = [d for d in yaml.safe_load_all(open(sys.argv[2])) if d]
errors = []
if [d["kind"] for d in docs] != ["Job"]:
    sys.exit(f"FAIL: deploy/kubernetes/bench renders {[d['kind'] for d in docs]}, expected one Job")
(job,) = docs
spec = job["spec"]
pod = spec["template"]["spec"]
(ctr,) = pod["containers"]
if spec.get("completionMode") != "Indexed":
    errors.append("completionMode is not Indexed")
if not (spec.get("parallelism") == spec.get("completions") and spec.get("parallelism", 0) >= 2):
    errors.append("parallelism must equal completions (all workers at once), at least 2")
if spec.get("backoffLimit") != 0 or pod.get("restartPolicy") != "Never":
    errors.append("a failed worker must fail the Job: backoffLimit 0, restartPolicy Never")
if not spec.get("activeDeadlineSeconds"):
    errors.append("no activeDeadlineSeconds: the Job must be bounded in time")
args = ctr.get("args", [])
for want in ("--json", "--histogram=-", "--start-at=$(START_AT)"):
    if want not in args:
        errors.append(f"args lack {want}")
env = {e["name"]: e for e in ctr.get("env", [])}
start = env.get("START_AT", {}).get("value", "")
if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", start):
    errors.append(f"START_AT {start!r} is not an RFC 3339 UTC time")
if open("bench/fleet").read().count(start) < 2:
    errors.append(f"bench/fleet does not replace START_AT's placeholder {start!r}")
field = env.get("ECHOD_BENCH_WORKER", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
if field != "metadata.annotations['batch.kubernetes.io/job-completion-index']":
    errors.append("ECHOD_BENCH_WORKER does not come from the completion index")
target = next((a.split("=", 1)[1] for a in args if a.startswith("--target=")), "")
svc = next(d for d in base if d["kind"] == "Service")
ports = {p["port"] for p in svc["spec"]["ports"] if p["name"] == "echo"}
host, _, port = target.rpartition(":")
if host != svc["metadata"]["name"] or not port.isdigit() or int(port) not in ports:
    errors.append(f"--target {target!r} is not the base's Service {svc['metadata']['name']} echo port {ports}")
sc = ctr.get("securityContext", {})
for key, value in {"runAsNonRoot": True, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False}.items():
    if sc.get(key) != value:
        errors.append(f"securityContext.{key} != {value}")
if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
    errors.append("capabilities.drop != [ALL] or seccompProfile != RuntimeDefault")
if "limits" not in ctr.get("resources", {}) or "requests" not in ctr.get("resources", {}):
    errors.append("resources need requests and limits")
for e in errors:
    print(f"invariant violated: {e}", file=sys.stderr)
if errors:
    sys.exit(1)
print(f"Job {job['metadata']['name']}: {spec['parallelism']} indexed workers against {target}, results on stdout")
EOF

step "hadolint deploy/kubernetes/bench/Dockerfile"
hadolint deploy/kubernetes/bench/Dockerfile
echo "no findings"
K8S_DONE=$SECONDS

# ------------------------------------------------------------------------------- systemd
step "systemd-analyze verify deploy/systemd/echod.service deploy/systemd/echod.socket"
# ExecStart names /usr/local/bin/echod: verify checks that it exists. Put the static binary
# there in a private mount namespace, so the host's /usr/local/bin is left alone.
unshare --mount --propagation private sh -c '
    mount -t tmpfs -o size=512m tmpfs /usr/local/bin &&
    install -m 0755 "$1" /usr/local/bin/echod &&
    systemd-analyze verify deploy/systemd/echod.service deploy/systemd/echod.socket' \
    sh "$BIN" >"$TMP/verify.txt" 2>&1 || { cat "$TMP/verify.txt"; exit 1; }
if [[ -s $TMP/verify.txt ]]; then
    echo "FAIL: systemd-analyze verify printed:" >&2
    cat "$TMP/verify.txt" >&2
    exit 1
fi
echo "clean"

step "systemd-analyze security --offline=true --threshold=15 deploy/systemd/echod.service"
systemd-analyze security --offline=true --threshold=15 deploy/systemd/echod.service \
    >"$TMP/security.txt" 2>&1 || { grep -v '^✓' "$TMP/security.txt"; exit 1; }
grep -v '^✓' "$TMP/security.txt"
grep -q 'Overall exposure level for echod.service: 1\.[0-5] ' "$TMP/security.txt" \
    || grep -q 'Overall exposure level for echod.service: 0\.' "$TMP/security.txt" \
    || { echo "FAIL: exposure above 1.5" >&2; exit 1; }

step "socket activation + sd_notify (systemd-socket-activate, NOTIFY_SOCKET)"
"$PY" ci/deploy/smoke.py socket-activation "$BIN"
SYSTEMD_DONE=$SECONDS

# ------------------------------------------------------------------------------- compose
step "check-jsonschema --builtin-schema vendor.compose-spec deploy/compose.yaml"
check-jsonschema --builtin-schema vendor.compose-spec deploy/compose.yaml

step "docker-compose -f deploy/compose.yaml config"
docker-compose -f deploy/compose.yaml config -q
docker-compose -f deploy/compose.yaml config >"$TMP/compose.yaml"
"$PY" - "$TMP/compose.yaml" <<'EOF'
import os, sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
missing = []
for name, svc in cfg["services"].items():
    for vol in svc.get("volumes", []):
        src = vol["source"] if isinstance(vol, dict) else vol.split(":")[0]
        kind = vol.get("type") if isinstance(vol, dict) else ("bind" if "/" in src else "volume")
        if kind == "bind" and not os.path.exists(src):
            missing.append(f"{name}: {src}")
        elif kind == "bind":
            print(f"  {name}: {os.path.relpath(src)} exists")
if missing:
    sys.exit(f"FAIL: bind-mount sources missing: {missing}")
EOF

step "promtool check config deploy/compose/prometheus.yml"
promtool check config deploy/compose/prometheus.yml

step "Grafana provisioning"
"$PY" - <<'EOF'
import json, yaml
ds = yaml.safe_load(open("deploy/grafana/provisioning/datasources/prometheus.yaml"))
(src,) = ds["datasources"]
assert src["type"] == "prometheus" and src["url"] == "http://prometheus:9090", src
assert src.get("isDefault") is True, "the dashboard's datasource variable starts at the default"
db = yaml.safe_load(open("deploy/grafana/provisioning/dashboards/echod.yaml"))
(prov,) = db["providers"]
compose = yaml.safe_load(open("deploy/compose.yaml"))
mounts = [v.split(":")[1] for v in compose["services"]["grafana"]["volumes"]]
assert any(m.startswith(prov["options"]["path"] + "/") for m in mounts), (prov, mounts)
dash = json.load(open("dashboards/echod.json"))
print(f"  datasource {src['name']} (default), dashboard '{dash.get('title')}' "
      f"from {prov['options']['path']}")
EOF
COMPOSE_DONE=$SECONDS

step "done"
printf 'installs %ds, binary %ds, image %ds, kubernetes %ds, systemd %ds, compose %ds; total %ds\n' \
    $((INSTALL_DONE - START)) $((BUILD_DONE - INSTALL_DONE)) $((IMAGE_DONE - BUILD_DONE)) \
    $((K8S_DONE - IMAGE_DONE)) $((SYSTEMD_DONE - K8S_DONE)) $((COMPOSE_DONE - SYSTEMD_DONE)) \
    $((SECONDS - START))
