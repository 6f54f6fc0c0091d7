#!/usr/bin/env bash
# Build the CPU image and run it for real, behind the nginx gateway config (docker/nginx.conf).
# Called by .ci/run; also runs alone (as root):  docker/smoke.sh
#
#  1. podman, debootstrap and nginx: installed with apt-get if missing; FAILS if impossible
#  2. base image debian:bookworm-slim: made with debootstrap unless cached (docker/base-image.sh)
#  3. build docker/Dockerfile with podman (the CA bundle as a build secret, checked absent after)
#  4. a model store on a volume: a copy of the embedded default model when the repo has one
#     (model_store/cifar10-atop/<v>/, "real" mode), else a tiny random model made by the
#     exporter ("tiny" mode: schema checks only)
#  5. two replicas: read-only root fs, tmpfs /tmp, non-root, all capabilities dropped
#  6. host nginx with docker/nginx.conf (upstreams pointed at the replicas): real CIFAR-10
#     images through the gateway, request ids, hidden routes, body and rate limits, balancing
#  7. hot swap: a new version published into the mounted store is served by every replica
#  8. SIGTERM: each replica drains and exits 0
# Prints the time of each step; the whole run must stay under 10 minutes (FAIL otherwise).
#
# Environment: SMOKE_IMAGE (tag to build, default localhost/atop-defense:smoke),
# SMOKE_CIFAR (CIFAR-10 test archive), PYTHON (interpreter with the repo's dev extras),
# SMOKE_KEEP=1 (leave containers running for inspection).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
IMAGE=${SMOKE_IMAGE:-localhost/atop-defense:smoke}
BASE=docker.io/library/debian:bookworm-slim
BUDGET_S=600
T0=$(date +%s)
TLAST=$T0
step() {
  local now
  now=$(date +%s)
  printf '\n== %s   [previous step %ss, total %ss]\n' "$1" $((now - TLAST)) $((now - T0))
  TLAST=$now
}
fail() {
  echo "smoke: FAIL: $*" >&2
  exit 1
}

# ---------------------------------------------------------------- 1. tools
step "container tools"
[ "$(id -u)" = 0 ] || fail "run as root: podman builds here as root with chroot isolation"
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v nginx >/dev/null || missing+=(nginx)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} with apt-get"
  command -v apt-get >/dev/null || fail "${missing[*]} missing and no apt-get to install them"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}" runc; } \
    >/tmp/atop-smoke-apt.log 2>&1 ||
    { tail -20 /tmp/atop-smoke-apt.log >&2; fail "could not install ${missing[*]} (apt-get log above)"; }
fi
for t in podman debootstrap nginx; do
  command -v "$t" >/dev/null || fail "$t is still not installed"
done
podman --version
nginx -v 2>&1
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

# Containers get these limits explicitly: podman's defaults for root (nofile and nproc of 1M+)
# cannot be set where root lacks CAP_SYS_RESOURCE, as on this CI host.
RUN_LIMITS=(--ulimit nofile=16384:16384 --ulimit nproc=16384:16384)

# ---------------------------------------------------------------- 2. base image
step "base image $BASE"
docker/base-image.sh "$BASE"

# ---------------------------------------------------------------- 3. build
step "build $IMAGE (docker/Dockerfile)"
CA=${SMOKE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
secret=()
[ -s "$CA" ] && secret=(--secret "id=build_ca,src=$CA")
work=$(mktemp -d /var/tmp/atop-smoke.XXXXXX)
chmod 755 "$work"
tb=$(date +%s)
nice -n 19 podman build --format docker --isolation chroot --pull=never "${secret[@]}" \
  -f docker/Dockerfile -t "$IMAGE" . >"$work/build.log" 2>&1 ||
  { tail -40 "$work/build.log" >&2; fail "image build failed (log above)"; }
build_s=$(($(date +%s) - tb))
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo "built in ${build_s}s; image size $((size / 1000000)) MB; embedded store:"
podman run --rm "${RUN_LIMITS[@]}" --entrypoint atop "$IMAGE" store list 2>/dev/null | sed 's/^/    /' ||
  fail "atop store list fails in the image"
if [ -s "$CA" ]; then
  # Nothing of the build-time CA bundle may be in the image: look for its last certificate.
  needle=$(awk '/BEGIN CERT/{n=0} {n++; if (n==3) l=$0} END{print l}' "$CA")
  podman save --format docker-archive -o "$work/image.tar" "$IMAGE" >/dev/null 2>&1
  if grep -qaF -- "$needle" "$work/image.tar"; then fail "the build CA bundle leaked into $IMAGE"; fi
  rm -f "$work/image.tar"
  echo "build CA bundle: not in any layer of the image"
fi

# ---------------------------------------------------------------- 4. model store
step "model store on a volume"
store=$work/store
mkdir -m 755 "$store"
mode=$(
  OMP_NUM_THREADS=1 nice -n 19 "$PY" - "$store" "$work/export" <<'EOF'
import sys
from pathlib import Path

import model_store
from tests import service_fixtures as sf

store, work = Path(sys.argv[1]), Path(sys.argv[2])
embedded = model_store.list_versions(model_store.default_store(), sf.MODEL)
if embedded:  # the repo's default model: the same one the image embeds
    src, mode = embedded[-1], "real"
    model_store.verify(src.path)
else:  # none yet: a tiny random model, exported the way tests/service_fixtures.py does
    import torch

    torch.set_num_threads(1)
    src, mode = sf.export_tiny(work / "store", work / "ckpt"), "tiny"
sf.republish(store, src)
print(mode)
EOF
) || fail "could not prepare the model store"
echo "mode: $mode (store $store: $(ls "$store/cifar10-atop"))"
if [ "$mode" = real ]; then
  # The embedded copy must be intact inside the image (sha256 of every file).
  out=$(podman run --rm "${RUN_LIMITS[@]}" --entrypoint atop "$IMAGE" store verify cifar10-atop 2>&1) ||
    { echo "$out" >&2; fail "the embedded model does not verify inside the image"; }
  echo "$out" | grep -v systemd | sed 's/^/    /'
else
  echo "no embedded model in model_store/cifar10-atop/: tiny test model, schema checks only"
fi

# ---------------------------------------------------------------- 5. replicas
step "start 2 replicas (read-only root fs, non-root)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cids=()
ngx_pid=
cleanup() {
  local rc=$?
  if [ $rc -ne 0 ]; then
    for c in "${cids[@]}"; do
      echo "--- logs of $c" >&2
      podman logs --tail 30 "$c" 2>&1 | grep -v 'systemd' >&2 || true
    done
    [ -f "$work/nginx.log" ] && { echo "--- nginx" >&2; tail -20 "$work/nginx.log" >&2; }
  fi
  [ -n "$ngx_pid" ] && kill "$ngx_pid" 2>/dev/null && wait "$ngx_pid" 2>/dev/null
  if [ "${SMOKE_KEEP:-0}" != 1 ]; then
    for c in "${cids[@]}"; do podman rm -f "$c" >/dev/null 2>&1 || true; done
    chmod -R u+w "$work" 2>/dev/null || true
    rm -rf "$work"
  fi
  exit $rc
}
trap cleanup EXIT
ports=()
for i in 1 2; do
  p=$(free_port)
  ports+=("$p")
  cid=$(podman run -d --name "atop-smoke-$i-$$" "${RUN_LIMITS[@]}" \
    --read-only --read-only-tmpfs=false --tmpfs /tmp:rw,size=64m,mode=1777 \
    --cap-drop ALL --security-opt no-new-privileges \
    -v "$store:/models:ro" -e ATOP_STORE=/models -e ATOP_POLL_INTERVAL_S=1 \
    -e ATOP_INTRA_OP_THREADS=1 -e ATOP_SPINNING=false -e ATOP_QUEUE_SIZE=4096 \
    -p "127.0.0.1:$p:8000" --stop-timeout 30 "$IMAGE" 2>"$work/run-$i.err") ||
    { cat "$work/run-$i.err" >&2; fail "podman run failed"; }
  cids+=("$cid")
done
for i in 0 1; do
  url=http://127.0.0.1:${ports[$i]}
  ok=
  for _ in $(seq 120); do
    if python3 -c "import urllib.request as u, sys; u.urlopen(sys.argv[1] + '/readyz', timeout=2)" "$url" 2>/dev/null; then
      ok=1
      break
    fi
    [ "$(podman inspect --format '{{.State.Running}}' "${cids[$i]}")" = true ] || fail "replica $((i + 1)) exited"
    sleep 0.5
  done
  [ -n "$ok" ] || fail "replica $((i + 1)) not ready after 60 s"
  echo "  ok  replica $((i + 1)) ready on $url"
done
c=${cids[0]}
uid=$(podman exec "$c" id -u 2>/dev/null)
[ "$uid" = 10001 ] || fail "the service runs as uid $uid, not 10001"
echo "  ok  runs as uid 10001 (non-root)"
if podman exec "$c" sh -c 'touch /opt/atop/x' 2>/dev/null; then fail "root filesystem is writable"; fi
podman exec "$c" sh -c 'touch /tmp/x && rm /tmp/x' 2>/dev/null || fail "/tmp is not writable"
echo "  ok  root filesystem read-only, /tmp writable (tmpfs)"
podman healthcheck run "$c" >/dev/null 2>&1 || fail "the image HEALTHCHECK does not pass"
echo "  ok  HEALTHCHECK (python urllib on /healthz) passes"
if podman exec "$c" python3 -c 'import torch' 2>/dev/null; then fail "torch is installed in the image"; fi
echo "  ok  no torch in the image"

# ---------------------------------------------------------------- 6. gateway
step "nginx gateway (docker/nginx.conf) in front of the replicas"
gw_pub=$(free_port)
gw_ops=$(free_port)
python3 - docker/nginx.conf "$work/nginx.conf" "$gw_pub" "$gw_ops" "${ports[@]}" <<'EOF'
import sys
src, dst, pub, ops, *replicas = sys.argv[1:]
conf = open(src).read()
upstream = "server atop:8000 max_fails=3 fail_timeout=10s;"
assert conf.count(upstream) == 1 and conf.count("listen 8080;") == 1 and conf.count("listen 8081;") == 1
servers = "\n        ".join(f"server 127.0.0.1:{p} max_fails=3 fail_timeout=10s;" for p in replicas)
conf = conf.replace(upstream, servers)
conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{pub};").replace("listen 8081;", f"listen 127.0.0.1:{ops};")
open(dst, "w").write(conf)
EOF
mkdir -p "$work/nginx"
nginx -t -q -e stderr -p "$work/nginx" -c "$work/nginx.conf" -g "pid $work/nginx.pid;" ||
  fail "nginx -t rejects docker/nginx.conf"
echo "  ok  nginx -t"
nginx -e stderr -p "$work/nginx" -c "$work/nginx.conf" -g "pid $work/nginx.pid; daemon off;" \
  >"$work/nginx.log" 2>&1 &
ngx_pid=$!
for _ in $(seq 50); do
  python3 -c "import urllib.request as u, sys; u.urlopen(sys.argv[1], timeout=1)" \
    "http://127.0.0.1:$gw_pub/gateway/healthz" 2>/dev/null && break
  sleep 0.1
done
replica_args=()
for p in "${ports[@]}"; do replica_args+=(--replica "http://127.0.0.1:$p"); done
CIFAR=${SMOKE_CIFAR:-$REPO/../shared/data/cifar10/cifar10-test.tar.gz}
python3 docker/smoke_check.py gateway --public "http://127.0.0.1:$gw_pub" \
  --ops "http://127.0.0.1:$gw_ops" "${replica_args[@]}" --mode "$mode" --cifar "$CIFAR" ||
  fail "gateway checks"

# ---------------------------------------------------------------- 7. hot swap
step "hot swap: publish version 2 into the mounted store"
"$PY" - "$store" <<'EOF' || fail "could not publish version 2"
import sys
from pathlib import Path

import model_store
from tests import service_fixtures as sf

store = Path(sys.argv[1])
mv = sf.republish(store, model_store.get_version(store, sf.MODEL, 1))
print(f"published {mv.name} v{mv.version}")
EOF
python3 docker/smoke_check.py wait-version "${replica_args[@]}" --version 2 \
  --public "http://127.0.0.1:$gw_pub" || fail "hot swap"

# ---------------------------------------------------------------- 8. graceful stop
step "SIGTERM: drain and exit"
python3 docker/smoke_check.py drain --replica "http://127.0.0.1:${ports[0]}" --container "${cids[0]}" \
  --cifar "$CIFAR" || fail "requests in flight at SIGTERM were not all answered"
for i in 0 1; do
  c=${cids[$i]}
  podman stop --time 30 "$c" >/dev/null 2>&1 # replica 1: already stopped by the drain check
  code=$(podman inspect --format '{{.State.ExitCode}}' "$c")
  [ "$code" = 0 ] || fail "replica $((i + 1)) exited with $code after SIGTERM"
  logs=$(podman logs "$c" 2>&1)
  grep -q 'Application shutdown complete' <<<"$logs" || fail "replica $((i + 1)) did not shut down cleanly"
  echo "  ok  replica $((i + 1)): SIGTERM -> 'Application shutdown complete', exit code 0"
done

step "done"
total=$(($(date +%s) - T0))
echo "smoke: PASS in ${total}s (image build ${build_s}s, image $((size / 1000000)) MB, mode $mode)"
[ "$total" -le "$BUDGET_S" ] || fail "took ${total}s, over the ${BUDGET_S}s budget"
