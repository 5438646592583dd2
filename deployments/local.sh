#!/usr/bin/env bash
# A local Prefect server, the work pools, the deployments and their workers, for this checkout.
#   deployments/local.sh start       # server on 127.0.0.1, pools cpu + gpu, deploy, workers
#   deployments/local.sh run NAME [prefect deployment run options]   # e.g. run 'collect-runs/demo' -p runs=8
#   deployments/local.sh env         # eval "$(deployments/local.sh env)" to use the prefect CLI yourself
#   deployments/local.sh status | stop
# State lives in ./.prefect (SQLite, logs, pids). SIMFLUENCE_PREFECT_PORT picks the port (4200).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
export PREFECT_HOME="${PREFECT_HOME:-$ROOT/.prefect}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_API_URL="http://127.0.0.1:${SIMFLUENCE_PREFECT_PORT:-4200}/api"
export SIMFLUENCE_PROJECT_DIR="$ROOT"
PREFECT="$ROOT/.venv/bin/prefect"
STATE="$PREFECT_HOME/local"
mkdir -p "$STATE"

healthy() { "$ROOT/.venv/bin/python" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1] + '/health', timeout=2)" "$PREFECT_API_URL" 2>/dev/null; }
alive() { [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }
spawn() { local name=$1; shift; alive "$name" && return 0; setsid nohup "$@" >"$STATE/$name.log" 2>&1 < /dev/null & echo $! >"$STATE/$name.pid"; }

case "${1:-}" in
  start)
    if ! healthy; then
      spawn server "$PREFECT" server start --host 127.0.0.1 --port "${SIMFLUENCE_PREFECT_PORT:-4200}"
      for _ in $(seq 1 120); do healthy && break; sleep 1; done
      healthy || { echo "the Prefect server did not start; see $STATE/server.log" >&2; exit 1; }
    fi
    for pool in cpu gpu; do
      "$PREFECT" work-pool inspect "$pool" >/dev/null 2>&1 || "$PREFECT" work-pool create "$pool" --type process >/dev/null
    done
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
  status)
    healthy && echo "server: up at ${PREFECT_API_URL%/api}" || echo "server: down"
    for name in worker-cpu worker-gpu; do alive "$name" && echo "$name: running" || echo "$name: stopped"; done
    ;;
  stop)
    for name in worker-cpu worker-gpu server; do
      if alive "$name"; then kill -- "-$(cat "$STATE/$name.pid")" 2>/dev/null || kill "$(cat "$STATE/$name.pid")"; fi
      rm -f "$STATE/$name.pid"
    done
    echo "stopped"
    ;;
  *)
    sed -n '2,8p' "$0"; exit 2 ;;
esac
