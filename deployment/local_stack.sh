#!/usr/bin/env bash
# The production shape on one machine: PostgreSQL → MLflow server, Prefect server, cpu + gpu workers.
#   deployment/local_stack.sh start | stop | status
# Everything binds to 127.0.0.1; state lives under $LIDGATE_HOME/stack. Needs `make venv` first and the
# PostgreSQL server binaries (Debian: apt-get install -y postgresql; `pg_config --bindir` finds them).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
export LIDGATE_HOME=${LIDGATE_HOME:-$REPO/lidgate-home}
STACK=$LIDGATE_HOME/stack
PG_PORT=${PG_PORT:-55432}
MLFLOW_PORT=${MLFLOW_PORT:-5055}
PREFECT_PORT=${PREFECT_PORT:-4205}
VENV=$REPO/.venv/bin
PGBIN=$(pg_config --bindir 2>/dev/null || echo /usr/lib/postgresql/15/bin)
# PostgreSQL refuses to run as root: use the postgres account when we are root.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
export LIDGATE_REPO=$REPO MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false PREFECT_HOME=$STACK/prefect
# the server may call webhook receivers on this machine (`lidgate watch --listen 127.0.0.1:PORT`)
export MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true MLFLOW_WEBHOOK_ALLOWED_SCHEMES=https,http
# a new webhook takes effect once the server's webhook cache expires (MLflow's default: 60 s)
export MLFLOW_WEBHOOK_CACHE_TTL=5

wait_http() { for _ in $(seq 1 60); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 1; done; echo "timeout waiting for $1" >&2; return 1; }

start() {
  mkdir -p "$STACK/logs" "$PREFECT_HOME"
  if [ ! -d "$STACK/pg" ]; then
    mkdir -p "$STACK/pg"; [ "$(id -u)" = 0 ] && chown postgres "$STACK/pg" "$STACK"
    as_pg "$PGBIN/initdb" -D "$STACK/pg" -A trust -U postgres >/dev/null
  fi
  as_pg "$PGBIN/pg_ctl" -w -D "$STACK/pg" -l "$STACK/pg/server.log" start \
    -o "-p $PG_PORT -k $STACK/pg -c listen_addresses=127.0.0.1" >/dev/null
  as_pg "$PGBIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres mlflow 2>/dev/null || true
  nohup "$VENV/mlflow" server --backend-store-uri "postgresql://postgres@127.0.0.1:$PG_PORT/mlflow" \
    --artifacts-destination "$LIDGATE_HOME/mlartifacts" --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    >"$STACK/logs/mlflow.log" 2>&1 & echo $! >"$STACK/mlflow.pid"
  nohup "$VENV/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" >"$STACK/logs/prefect.log" 2>&1 &
  echo $! >"$STACK/prefect.pid"
  wait_http "http://127.0.0.1:$MLFLOW_PORT/health"
  wait_http "http://127.0.0.1:$PREFECT_PORT/api/health"
  "$VENV/python" -m flows.deployments apply "${LIDGATE_CONFIG:-$REPO/examples/mnist/lidgate.yaml}"
  for pool in cpu gpu; do
    nohup "$VENV/prefect" worker start --pool "$pool" >"$STACK/logs/worker-$pool.log" 2>&1 &
    echo $! >"$STACK/worker-$pool.pid"
  done
  echo "MLflow  $MLFLOW_TRACKING_URI"; echo "Prefect $PREFECT_API_URL"
  echo "export MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI PREFECT_API_URL=$PREFECT_API_URL LIDGATE_HOME=$LIDGATE_HOME"
}

stop_pid() {  # TERM, wait up to 10 s, then KILL the process and its children
  local pid=$1
  pkill -TERM -P "$pid" 2>/dev/null || true; kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  pkill -KILL -P "$pid" 2>/dev/null || true; kill -KILL "$pid" 2>/dev/null || true
}

stop() {
  for f in "$STACK"/worker-*.pid "$STACK/prefect.pid" "$STACK/mlflow.pid"; do
    [ -f "$f" ] && { stop_pid "$(cat "$f")"; rm -f "$f"; }
  done
  [ -d "$STACK/pg" ] && as_pg "$PGBIN/pg_ctl" -w -D "$STACK/pg" stop >/dev/null 2>&1 || true
}

status() {
  curl -fs "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null && echo "mlflow: up" || echo "mlflow: down"
  curl -fs "http://127.0.0.1:$PREFECT_PORT/api/health" >/dev/null && echo "prefect: up" || echo "prefect: down"
}

case "${1:-}" in start) start ;; stop) stop ;; status) status ;; *) echo "usage: $0 start|stop|status"; exit 2 ;; esac
