#!/usr/bin/env bash
# A local Prefect server, the work pools, the deployments and their workers, for this checkout.
#   deployments/local.sh start       # server on 127.0.0.1, pools cpu + gpu, deploy, workers
#   deployments/local.sh run NAME [prefect deployment run options]   # e.g. run 'collect-runs/demo' -p runs=8
#   deployments/local.sh env         # eval "$(deployments/local.sh env)" to use the prefect CLI yourself
#   deployments/local.sh scheduled NAME  # the runs that deployment NAME's schedule has created
#   deployments/local.sh status | stop
# State lives in ./.prefect (SQLite, logs, pids). SIMFLUENCE_PREFECT_PORT picks the port (4200).
# `stop` ends the workers, the flow runs they started and the server: SIGTERM, then SIGKILL what is
# left after SIMFLUENCE_STOP_SECONDS (10; Prefect 3.8 workers do not exit on SIGTERM alone).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
export PREFECT_HOME="${PREFECT_HOME:-$ROOT/.prefect}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
# Workers look for scheduled flow runs every 2 s instead of 10 (a local server; the demo waits
# on each of its deployment runs).
export PREFECT_WORKER_QUERY_SECONDS="${PREFECT_WORKER_QUERY_SECONDS:-2}"
export PREFECT_API_URL="http://127.0.0.1:${SIMFLUENCE_PREFECT_PORT:-4200}/api"
export SIMFLUENCE_PROJECT_DIR="$ROOT"
PREFECT="$ROOT/.venv/bin/prefect"
STATE="$PREFECT_HOME/local"
mkdir -p "$STATE"

healthy() { "$ROOT/.venv/bin/python" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1] + '/health', timeout=2)" "$PREFECT_API_URL" 2>/dev/null; }
running() { local stat; stat=$(ps -o stat= -p "$1" 2>/dev/null) && [ "${stat:0:1}" != Z ]; }  # zombies are gone
# The process of a pid file, when it runs and is still a Prefect process (pids are reused).
alive() { [ -f "$STATE/$1.pid" ] && running "$(cat "$STATE/$1.pid")" && ps -o args= -p "$(cat "$STATE/$1.pid")" | grep -q prefect; }
spawn() { local name=$1; shift; alive "$name" && return 0; setsid nohup "$@" >"$STATE/$name.log" 2>&1 < /dev/null & echo $! >"$STATE/$name.pid"; }
# A process, its session (spawn starts each in its own) and all its descendants, including the
# flow runs a worker starts in sessions of their own.
family() {
  local child
  echo "$1"; pgrep -s "$1" || true
  for child in $(pgrep -P "$1"); do family "$child"; done
}
all_gone() { local pid; for pid in "$@"; do running "$pid" && return 1; done; return 0; }
wait_gone() { local deadline=$((SECONDS + $1)); shift; until all_gone "$@"; do [ $SECONDS -ge $deadline ] && return 1; sleep 0.2; done; }
# Stop the named processes and their families: SIGTERM, then SIGKILL after a bounded wait.
# Succeeds only when every one of them is gone.
stop_all() {
  local name pids=()
  for name in "$@"; do alive "$name" && pids+=($(family "$(cat "$STATE/$name.pid")" | sort -u)); done
  if [ ${#pids[@]} -gt 0 ]; then
    kill -TERM "${pids[@]}" 2>/dev/null || true
    if ! wait_gone "${SIMFLUENCE_STOP_SECONDS:-10}" "${pids[@]}"; then
      kill -KILL "${pids[@]}" 2>/dev/null || true
      wait_gone 10 "${pids[@]}" || { echo "still running after SIGKILL: ${pids[*]}" >&2; return 1; }
    fi
  fi
  for name in "$@"; do rm -f "$STATE/$name.pid"; done
}

case "${1:-}" in
  start)
    if ! healthy; then
      spawn server "$PREFECT" server start --host 127.0.0.1 --port "${SIMFLUENCE_PREFECT_PORT:-4200}"
      for _ in $(seq 1 600); do healthy && break; sleep 0.2; done
      healthy || { echo "the Prefect server did not start; see $STATE/server.log" >&2; exit 1; }
    fi
    pools=()
    for pool in cpu gpu; do  # both at once: each is a CLI process that spends seconds importing
      { "$PREFECT" work-pool inspect "$pool" >/dev/null 2>&1 || "$PREFECT" work-pool create "$pool" --type process >/dev/null; } &
      pools+=($!)
    done
    for pid in "${pools[@]}"; do wait "$pid" || { echo "could not create the work pools" >&2; exit 1; }; done
    "$PREFECT" --no-prompt deploy --all --prefect-file deployments/prefect.yaml >"$STATE/deploy.log" 2>&1 \
      || { cat "$STATE/deploy.log" >&2; exit 1; }
    spawn worker-cpu "$PREFECT" worker start --pool cpu --limit 2 --name "cpu-$(hostname)"
    spawn worker-gpu "$PREFECT" worker start --pool gpu --limit 1 --name "gpu-$(hostname)"
    echo "Prefect UI: ${PREFECT_API_URL%/api}  (logs and pids in $STATE)"
    ;;
  run)
    shift
    log="$STATE/run-$(echo "$1" | tr '/' '_').log"
    started=$(date +%s)
    if "$PREFECT" deployment run "$@" --watch >"$log" 2>&1; then
      echo "$1: completed in $(( $(date +%s) - started )) s (log: $log)"
    else
      tail -n 40 "$log" >&2; echo "$1: failed (log: $log)" >&2; exit 1
    fi
    ;;
  env)
    echo "export PREFECT_HOME='$PREFECT_HOME' PREFECT_API_URL='$PREFECT_API_URL' PREFECT_SERVER_ANALYTICS_ENABLED=false SIMFLUENCE_PROJECT_DIR='$ROOT'"
    ;;
  scheduled)
    "$ROOT/.venv/bin/python" - "$2" <<'EOF'
import sys
from collections import Counter

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

with get_client(sync_client=True) as client:
    deployment = client.read_deployment_by_name(sys.argv[1])
    runs = [run for run in client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(
        any_=[deployment.id]))) if run.auto_scheduled]
states = Counter(run.state.type.value.lower() for run in runs)
upcoming = sorted(run.expected_start_time for run in runs if run.state.type.value == "SCHEDULED")
print(f"{sys.argv[1]}: its schedule created {len(runs)} runs ("
      + ", ".join(f"{count} {state}" for state, count in sorted(states.items())) + ")"
      + (f"; the next starts at {upcoming[0]:%Y-%m-%d %H:%M:%S %Z}" if upcoming else ""))
EOF
    ;;
  status)
    if alive server; then
      healthy && echo "server: up at ${PREFECT_API_URL%/api} (pid $(cat "$STATE/server.pid"))" \
        || echo "server: running (pid $(cat "$STATE/server.pid")) but not answering at ${PREFECT_API_URL%/api}"
    else
      healthy && echo "server: down here; another one answers at ${PREFECT_API_URL%/api}" || echo "server: down"
    fi
    for name in worker-cpu worker-gpu; do
      alive "$name" && echo "$name: running (pid $(cat "$STATE/$name.pid"))" || echo "$name: stopped"
    done
    ;;
  stop)
    # The workers first (with the flow runs they started), while the server can still record them.
    stop_all worker-cpu worker-gpu && stop_all server || exit 1
    echo "stopped"
    ;;
  *)
    sed -n '2,10p' "$0"; exit 2 ;;
esac
