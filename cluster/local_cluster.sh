#!/usr/bin/env bash
# A head + two worker nodes on loopback, for trying `ray job submit` (and elasticity) by hand.
#   cluster/local_cluster.sh start [PORT]   head (0 CPUs: it only runs drivers) + 2 one-CPU workers;
#                                           returns once `ray job submit` works (or fails, stopping all)
#   cluster/local_cluster.sh stop           stop exactly the processes this script started (by PID)
#   cluster/local_cluster.sh decode         add a CPU-only decode node (1 CPU, resource {"decode": 1});
#                                           data.decode_nodes auto/decode then decodes there
#   cluster/local_cluster.sh env            print the exports a client needs (eval "$(... env)")
# Safety: the dashboard/job API listens on 127.0.0.1 only, token auth is on, and the token lives in
# $STATE/token (mode 0600, not ~/.ray); clients read it through RAY_AUTH_TOKEN_PATH, so the token is
# never on a command line or in a printed message.
# Each node gets its own --temp-dir (Ray supports one per node): three nodes sharing one session dir
# unpack every job's working dir into the same runtime_resources folder at once, and jobs then fail
# with ModuleNotFoundError for files that are in the upload. Each node also gets its own agent ports.
# `ray stop` is avoided: it would stop every Ray on the machine.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RAY="${RAY:-$ROOT/.venv/bin/ray}"
STATE="${RAY_MMD_CLUSTER_STATE:-$ROOT/runs/.local_cluster}"
PORT="${2:-6391}"
DASH=$((PORT + 1874))    # dashboard / job API port
READY_TIMEOUT_S="${RAY_MMD_CLUSTER_READY_S:-120}"

client_env() {
  echo "export RAY_ADDRESS=http://127.0.0.1:$(cat "$STATE/dash") RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE/token"
}

node_ports() {  # distinct agent ports per node i (0 = head): several nodes on one host must not share them
  local i=$1
  echo "--dashboard-agent-listen-port=$((PORT + 10 + i)) --dashboard-agent-grpc-port=$((PORT + 20 + i))" \
       "--runtime-env-agent-port=$((PORT + 30 + i)) --metrics-export-port=$((PORT + 40 + i))" \
       "--node-manager-port=$((PORT + 50 + i)) --object-manager-port=$((PORT + 60 + i))"
}

wait_started() {  # log file, seconds
  for _ in $(seq "$2"); do
    grep -q "Ray runtime started" "$1" && return 0
    sleep 1
  done
  echo "local_cluster: a node did not start in $2 s; see $1" >&2
  return 1
}

start() {
  if [ -f "$STATE/pids" ]; then
    for pid in $(cat "$STATE/pids"); do
      if kill -0 "$pid" 2>/dev/null; then
        echo "local_cluster: already running from $STATE (pid $pid); run '$0 stop' first" >&2
        exit 2
      fi
    done
  fi
  [ -x "$RAY" ] || { echo "local_cluster: no ray at $RAY: run 'make setup' or set RAY=/path/to/ray" >&2; exit 2; }
  mkdir -p "$STATE/logs"
  (umask 077; [ -s "$STATE/token" ] || python3 -c 'import secrets; print(secrets.token_hex(32))' > "$STATE/token")
  chmod 600 "$STATE/token"
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE/token"
  unset RAY_AUTH_TOKEN RAY_ADDRESS
  # jobs run `python ...` with the nodes' PATH: make that the project's interpreter
  export PATH="$(dirname "$RAY"):$PATH"
  # short temp dirs: Ray's socket paths must stay under ~100 characters
  TMPROOT="$(mktemp -d /tmp/rmc.XXXXXX)"
  echo "$TMPROOT" > "$STATE/tmproot"
  echo "$DASH" > "$STATE/dash"
  : > "$STATE/pids"
  trap 'echo "local_cluster: start failed; stopping what was started" >&2; stop >/dev/null' ERR
  # setsid: each node in its own process group, so `stop` can end the node's children too
  # shellcheck disable=SC2046
  setsid "$RAY" start --head --block --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus=0 \
    --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASH" \
    --ray-client-server-port=$((PORT + 1)) --temp-dir="$TMPROOT/n0" $(node_ports 0) \
    --disable-usage-stats > "$STATE/logs/head.log" 2>&1 &
  echo $! >> "$STATE/pids"
  wait_started "$STATE/logs/head.log" 60
  # one at a time: two raylets registering at once on one host can race
  for i in 1 2; do
    # shellcheck disable=SC2046
    setsid "$RAY" start --block --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --num-cpus=1 \
      --temp-dir="$TMPROOT/n$i" $(node_ports "$i") \
      --disable-usage-stats > "$STATE/logs/worker$i.log" 2>&1 &
    echo $! >> "$STATE/pids"
    wait_started "$STATE/logs/worker$i.log" 90
  done
  # Ready = a job can be submitted. Right after start the job API answers "No available agent to
  # submit job" for some seconds: submit a no-op job (no working dir) until one succeeds.
  local deadline=$((SECONDS + READY_TIMEOUT_S)) out=""
  until out=$("$RAY" job submit --address "http://127.0.0.1:$DASH" --submission-id "ready-$(date +%s%N)" \
                -- python -c pass 2>&1); do
    if [ $SECONDS -ge $deadline ]; then
      echo "local_cluster: the job API did not accept a job in ${READY_TIMEOUT_S} s: ${out##*$'\n'}" >&2
      false
    fi
    sleep 1
  done
  trap - ERR
  cat <<MSG
Ray cluster up and accepting jobs: head 127.0.0.1:$PORT (0 CPUs) + 2 worker nodes (1 CPU each); logs in $STATE/logs
Submit a job from this checkout:
  $(client_env)
  ray job submit --working-dir . -- python jobs/stage1.py --config jobs/configs/demo.yaml \\
      --storage $ROOT/runs --data $ROOT/data/demo
  (the job runs in a copy of the working dir: give --storage/--data as absolute paths or gs:// URLs)
Stop it:  $0 stop
MSG
}

stop() {
  [ -f "$STATE/pids" ] || { echo "no cluster started from $STATE"; return 0; }
  # workers first, then the head; `ray start --block` tears its node's processes down on SIGTERM
  tac "$STATE/pids" | while read -r pid; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in $(cat "$STATE/pids"); do
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL "$pid" 2>/dev/null || true
    kill -KILL -- "-$pid" 2>/dev/null || true  # anything of that node left in its process group
  done
  rm -f "$STATE/pids"
  if [ -f "$STATE/tmproot" ]; then
    case "$(cat "$STATE/tmproot")" in /tmp/rmc.*) rm -rf "$(cat "$STATE/tmproot")" ;; esac
    rm -f "$STATE/tmproot"
  fi
  echo "stopped"
}

# ---- optional CPU-only decode node (issue 14); stopped by `stop` with the rest ----
decode() {
  [ -f "$STATE/pids" ] || { echo "start the cluster first: $0 start" >&2; exit 2; }
  local i log
  i=$(($(wc -l < "$STATE/pids") + 1))  # node index: its own temp dir and agent ports, like the others
  log="$STATE/logs/decode$i.log"
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE/token"
  export PATH="$(dirname "$RAY"):$PATH"
  # shellcheck disable=SC2046
  setsid "$RAY" start --block --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --num-cpus=1 \
    --resources='{"decode": 1}' --temp-dir="$(cat "$STATE/tmproot")/n$i" $(node_ports "$i") \
    --disable-usage-stats > "$log" 2>&1 &
  echo $! >> "$STATE/pids"
  wait_started "$log" 90
  echo "decode node up (1 CPU, decode: 1); log $log"
}
# ---- end decode node ----

case "${1:-start}" in
  start) start ;;
  decode) decode ;;
  stop) stop ;;
  env) client_env ;;
  *) echo "usage: $0 start [PORT] | decode [PORT] | stop | env" >&2; exit 2 ;;
esac
