#!/usr/bin/env bash
# Same-run A/B of meshcore at several commits (and Envoy when installed): what each change bought.
#
#   bash bench/ab_commits.sh [-r ROUNDS] [-d SECONDS] COMMIT... [HEAD]
#
# Each commit is checked out as a git worktree under $TMPDIR/meshcore-ab, its extensions built in
# place; then every target (1 worker each, plus Envoy --concurrency 1) runs behind the same nginx
# backend and the bench's C generator (closed loop, 64 connections), alternated in rounds.
# Prints rps and CPU µs per request (all the target's processes, /proc schedstat) per round, the
# medians per target, and each worker's peak RSS (VmHWM). Envoy runs a minimal bootstrap (one
# route, router filter only): the bare reference.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=4 SECS=3
while getopts "r:d:" o; do case $o in r) ROUNDS=$OPTARG ;; d) SECS=$OPTARG ;; *) exit 2 ;; esac; done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { echo "usage: $0 [-r ROUNDS] [-d SECONDS] COMMIT..." >&2; exit 2; }
PY=${PYTHON:-$PWD/.venv/bin/python}
ROOT=${TMPDIR:-/tmp}/meshcore-ab
mkdir -p "$ROOT"
GEN=$($PY -c "from bench.native import build; print(build('loadgen'))")
command -v nginx >/dev/null || { echo "nginx is needed for the backend" >&2; exit 2; }
free_port() { $PY -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }

BACKEND=$(free_port)
mkdir -p "$ROOT/nginx"
cat > "$ROOT/nginx/nginx.conf" <<EOF
worker_processes 1; pid $ROOT/nginx/nginx.pid; error_log $ROOT/nginx/error.log;
events { worker_connections 4096; }
http { access_log off; server { listen 127.0.0.1:$BACKEND; location / { return 200 "ok"; } } }
EOF
cat > "$ROOT/mesh.yaml" <<EOF
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: bench}
spec:
  hosts: [bench-service]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, ports: {http: $BACKEND}}]
EOF
nginx -p "$ROOT/nginx" -c "$ROOT/nginx/nginx.conf" -e "$ROOT/nginx/error.log"
PIDS=()
declare -A PIDOF
# CPU seconds of a process and all its descendants
cpu_of() { $PY -c "import sys; from bench import procs; print(sum((procs.cpu_sched_s(p) or procs.cpu_stat_s(p)) for p in procs.tree(int(sys.argv[1]))))" "$1"; }
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; nginx -p "$ROOT/nginx" -c "$ROOT/nginx/nginx.conf" -e "$ROOT/nginx/error.log" -s stop 2>/dev/null || true; }
trap cleanup EXIT

TARGETS=()
for c in "$@"; do
  if [ "$c" = HEAD ]; then dir=$PWD; else
    dir=$ROOT/$c
    [ -d "$dir" ] || git worktree add -q "$dir" "$c"
    (cd "$dir" && $PY setup.py build_ext --inplace -q >/dev/null 2>&1)
  fi
  port=$(free_port) admin=$(free_port)
  # commits that serve Istio's Prometheus port bind 15090 by default: several would collide
  extra=()
  (cd "$dir" && $PY -m meshcore run --help 2>/dev/null) | grep -q -- --prometheus && extra=(--prometheus off)
  (cd "$dir" && exec $PY -m meshcore run --config "$ROOT/mesh.yaml" --listen 127.0.0.1:$port \
     --admin 127.0.0.1:$admin --workers 1 --no-access-log "${extra[@]}" >/dev/null 2>&1) &
  PIDS+=($!)
  PIDOF[$c]=$!
  TARGETS+=("$c:$port")
done
ENVOY=$(command -v envoy || true); [ -n "$ENVOY" ] || ENVOY=$(dirname "$PY")/envoy
if [ -x "$ENVOY" ]; then
  port=$(free_port) admin=$(free_port)
  sed -e "s/LISTEN/$port/; s/UPSTREAM/$BACKEND/; s/ADMIN/$admin/" > "$ROOT/envoy.yaml" <<'EOF'
admin: {address: {socket_address: {address: 127.0.0.1, port_value: ADMIN}}}
static_resources:
  listeners:
  - name: l
    address: {socket_address: {address: 127.0.0.1, port_value: LISTEN}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: o
          route_config: {virtual_hosts: [{name: b, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: b, timeout: 0s}}]}]}
          http_filters: [{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]
  clusters:
  - name: b
    type: STATIC
    connect_timeout: 10s
    load_assignment: {cluster_name: b, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: UPSTREAM}}}}]}]}
EOF
  "$ENVOY" -c "$ROOT/envoy.yaml" --concurrency 1 --log-level error --disable-hot-restart >/dev/null 2>&1 &
  PIDS+=($!)
  PIDOF[envoy]=$!
  TARGETS+=("envoy:$port")
fi
sleep 4
# peak RSS under load: every target's VmHWM starts from its RSS once ready
for p in $(for n in "${!PIDOF[@]}"; do $PY -c "import sys; from bench import procs; print(*procs.tree(int(sys.argv[1])))" "${PIDOF[$n]}"; done); do
  echo 5 > "/proc/$p/clear_refs" 2>/dev/null || true
done
declare -A RESULTS CPUS
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
for r in $(seq "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    name=${t%%:*}
    "$GEN" -p "${t##*:}" -c 64 -t 1 -d 1 -w 0 -H 'Host: bench-service' >/dev/null  # warm-up
    before=$(cpu_of "${PIDOF[$name]}")
    out=$("$GEN" -p "${t##*:}" -c 64 -t 1 -d "$SECS" -w 0 -H 'Host: bench-service')
    after=$(cpu_of "${PIDOF[$name]}")
    rps=$(echo "$out" | grep -oE '"rps": [0-9.]+' | grep -oE '[0-9.]+$')
    n=$(echo "$out" | grep -oE '"requests": [0-9]+' | grep -oE '[0-9]+$')
    us=$(awk -v a="$after" -v b="$before" -v n="$n" 'BEGIN {printf "%.1f", n ? (a - b) * 1e6 / n : 0}')
    echo "round $r $name $rps rps, $us CPU µs/req"
    RESULTS[$name]="${RESULTS[$name]:-} $rps"
    CPUS[$name]="${CPUS[$name]:-} $us"
  done
done
echo "median over $ROUNDS rounds (closed loop, 64 connections, 1 worker):"
for t in "${TARGETS[@]}"; do
  name=${t%%:*}
  med=$(echo "${RESULTS[$name]}" | median)
  cpu=$(echo "${CPUS[$name]}" | median)
  hwm=""
  for p in $(pgrep -f "listen 127.0.0.1:${t##*:} " || true); do
    for c in $(pgrep -P "$p" || true); do
      grep -q spawn_main "/proc/$c/cmdline" 2>/dev/null && hwm=$(grep VmHWM "/proc/$c/status" | awk '{print $2}')
    done
  done
  echo "  $name: $med rps, $cpu CPU µs/req${hwm:+, worker peak RSS ${hwm} kB}"
done
