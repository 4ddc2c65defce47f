#!/usr/bin/env bash
# A head + two worker nodes on loopback, for trying `ray job submit` (and elasticity) by hand.
#   cluster/local_cluster.sh start [PORT]   start head (0 CPUs: it only runs drivers) + 2 one-CPU workers
#   cluster/local_cluster.sh stop           stop exactly the processes this script started (by PID)
#   cluster/local_cluster.sh decode [PORT]  add a CPU-only decode node (1 CPU, resource {"decode": 1});
#                                           data.decode_nodes auto/decode then decodes there
# Token authentication is on; the token lives in $STATE/token (not ~/.ray), so `ray job submit` needs
# the two variables printed at the end. `ray stop` is avoided: it would stop every Ray on the machine.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RAY="${RAY:-$ROOT/.venv/bin/ray}"
STATE="${RAY_MMD_CLUSTER_STATE:-$ROOT/runs/.local_cluster}"
PORT="${2:-6391}"
DASH=$((PORT + 1874))  # dashboard / job server port

start() {
  mkdir -p "$STATE/logs"
  [ -f "$STATE/token" ] || python3 -c 'import secrets; print(secrets.token_hex(32))' > "$STATE/token"
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN="$(cat "$STATE/token")"
  # jobs run `python ...` with the nodes' PATH: make that the project's interpreter
  export PATH="$(dirname "$RAY"):$PATH"
  : > "$STATE/pids"
  "$RAY" start --head --block --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus=0 \
    --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASH" \
    --disable-usage-stats > "$STATE/logs/head.log" 2>&1 &
  echo $! >> "$STATE/pids"
  for _ in $(seq 60); do grep -q "Ray runtime started" "$STATE/logs/head.log" && break; sleep 1; done
  # one at a time: two raylets starting at once on one host can race for the same session files
  for i in 1 2; do
    "$RAY" start --block --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --num-cpus=1 \
      --disable-usage-stats > "$STATE/logs/worker$i.log" 2>&1 &
    echo $! >> "$STATE/pids"
    for _ in $(seq 90); do grep -q "Ray runtime started" "$STATE/logs/worker$i.log" && break; sleep 1; done
  done
  cat <<MSG
Ray cluster up: head 127.0.0.1:$PORT (0 CPUs) + 2 worker nodes (1 CPU each); logs in $STATE/logs
Submit a job from this checkout:
  export RAY_ADDRESS=http://127.0.0.1:$DASH RAY_AUTH_MODE=token RAY_AUTH_TOKEN=\$(cat $STATE/token)
  $RAY job submit --working-dir . -- python jobs/stage1.py --config jobs/configs/demo.yaml \\
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
  done
  rm -f "$STATE/pids"
  echo "stopped"
}

# ---- optional CPU-only decode node (issue 14); stopped by `stop` with the rest ----
decode() {
  [ -f "$STATE/pids" ] || { echo "start the cluster first: $0 start" >&2; exit 2; }
  local i log
  i=$(ls "$STATE/logs" | grep -c '^decode' || true)
  log="$STATE/logs/decode$((i + 1)).log"
  "$RAY" start --block --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --num-cpus=1 \
    --resources='{"decode": 1}' --disable-usage-stats > "$log" 2>&1 &
  echo $! >> "$STATE/pids"
  for _ in $(seq 90); do grep -q "Ray runtime started" "$log" && break; sleep 1; done
  echo "decode node up (1 CPU, decode: 1); log $log"
}
# ---- end decode node ----

case "${1:-start}" in
  start) start ;;
  decode) decode ;;
  stop) stop ;;
  *) echo "usage: $0 start [PORT] | stop" >&2; exit 2 ;;
esac
