#!/usr/bin/env bash
# The compose stack (ops/compose.yaml) without Docker: the project's own Kafka launcher,
# `loraloop serve`, `loraloop learn` and Debian's prometheus binary (Grafana too, where a
# grafana-server binary is installed), as background processes of this machine.
#
#   scripts/local-stack.sh up       start everything (state and logs in out/stack/)
#   scripts/local-stack.sh status   what runs, and the URLs
#   scripts/local-stack.sh down     stop what `up` started (by the pids it recorded)
#
# Ports: Kafka 9092, gRPC 50051, metrics 9464 (server) / 9465 (learner), Prometheus 9090,
# Grafana 3000; override with KAFKA_PORT, GRPC_PORT, SERVER_METRICS_PORT,
# LEARNER_METRICS_PORT, PROMETHEUS_PORT, GRAFANA_PORT.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
STATE="${STACK_DIR:-$ROOT/out/stack}"
PY="${PY:-$ROOT/.venv/bin/python}"
KAFKA_PORT="${KAFKA_PORT:-9092}"
GRPC_PORT="${GRPC_PORT:-50051}"
SERVER_METRICS_PORT="${SERVER_METRICS_PORT:-9464}"
LEARNER_METRICS_PORT="${LEARNER_METRICS_PORT:-9465}"
PROMETHEUS_PORT="${PROMETHEUS_PORT:-9090}"
GRAFANA_PORT="${GRAFANA_PORT:-3000}"

export LORALOOP_KAFKA_BOOTSTRAP="127.0.0.1:$KAFKA_PORT"
export LORALOOP_PORT="$GRPC_PORT"
export LORALOOP_SERVER_METRICS_PORT="$SERVER_METRICS_PORT"
export LORALOOP_LEARNER_METRICS_PORT="$LEARNER_METRICS_PORT"
export LORALOOP_ADAPTER_STORE="${LORALOOP_ADAPTER_STORE:-$STATE/adapters}"
export LORALOOP_LOG_JSON="${LORALOOP_LOG_JSON:-true}"
export TOKENIZERS_PARALLELISM=false

# start NAME READY-PATTERN TIMEOUT COMMAND...: run in the background, wait for a log line.
start() {
  local name="$1" ready="$2" timeout="$3"
  shift 3
  if [ -f "$STATE/$name.pid" ] && kill -0 "$(cat "$STATE/$name.pid")" 2>/dev/null; then
    echo "$name already running (pid $(cat "$STATE/$name.pid"))"
    return
  fi
  "$@" >"$STATE/$name.log" 2>&1 &
  echo $! >"$STATE/$name.pid"
  local waited=0
  until grep -qE "$ready" "$STATE/$name.log" 2>/dev/null; do
    if ! kill -0 "$(cat "$STATE/$name.pid")" 2>/dev/null; then
      echo "$name exited; its log ($STATE/$name.log):" >&2
      tail -n 30 "$STATE/$name.log" >&2
      exit 1
    fi
    if [ "$waited" -ge "$timeout" ]; then
      echo "$name not ready after ${timeout}s; see $STATE/$name.log" >&2
      exit 1
    fi
    sleep 1
    waited=$((waited + 1))
  done
  echo "$name started (pid $(cat "$STATE/$name.pid"))"
}

prometheus_config() {
  cat >"$STATE/prometheus.yml" <<YAML
global:
  scrape_interval: 5s
  evaluation_interval: 5s
rule_files:
  - $ROOT/ops/prometheus/alerts.yml
scrape_configs:
  - job_name: loraloop-server
    static_configs:
      - targets: ["127.0.0.1:$SERVER_METRICS_PORT"]
  - job_name: loraloop-learner
    static_configs:
      - targets: ["127.0.0.1:$LEARNER_METRICS_PORT"]
YAML
}

up() {
  mkdir -p "$STATE"
  start kafka "Kafka ready at" 180 \
    "$PY" -m loraloop.cli kafka --port "$KAFKA_PORT" --data-dir "$STATE/kafka"
  start learner "learner consuming" 300 "$PY" -m loraloop.cli learn
  start server "listening on" 300 "$PY" -m loraloop.cli serve
  if command -v prometheus >/dev/null 2>&1; then
    prometheus_config
    start prometheus "Server is ready to receive web requests" 60 \
      prometheus --config.file="$STATE/prometheus.yml" --storage.tsdb.path="$STATE/prometheus" \
      --web.listen-address="127.0.0.1:$PROMETHEUS_PORT"
  else
    echo "prometheus not installed (scripts/install-ops-tools.sh installs it): skipped"
  fi
  if command -v grafana-server >/dev/null 2>&1 || command -v grafana >/dev/null 2>&1; then
    local home
    home="$(dirname "$(dirname "$(readlink -f "$(command -v grafana-server || command -v grafana)")")")/share/grafana"
    mkdir -p "$STATE/grafana"
    PROMETHEUS_URL="http://127.0.0.1:$PROMETHEUS_PORT" DASHBOARDS_DIR="$ROOT/ops/grafana" \
    GF_PATHS_PROVISIONING="$ROOT/ops/grafana/provisioning" GF_PATHS_DATA="$STATE/grafana" \
    GF_SERVER_HTTP_PORT="$GRAFANA_PORT" GF_SERVER_HTTP_ADDR=127.0.0.1 \
    GF_AUTH_ANONYMOUS_ENABLED=true GF_AUTH_ANONYMOUS_ORG_ROLE=Viewer \
      start grafana "HTTP Server Listen" 120 \
      "$(command -v grafana-server || command -v grafana)" ${GRAFANA_SUBCOMMAND:-} --homepath "$home"
  else
    echo "grafana-server not installed (not in Debian): skipped; Prometheus has the metrics"
  fi
  status
}

status() {
  for name in kafka learner server prometheus grafana; do
    if [ -f "$STATE/$name.pid" ] && kill -0 "$(cat "$STATE/$name.pid")" 2>/dev/null; then
      echo "  $name: running (pid $(cat "$STATE/$name.pid"), log $STATE/$name.log)"
    else
      echo "  $name: not running"
    fi
  done
  echo "gRPC       127.0.0.1:$GRPC_PORT"
  echo "metrics    http://127.0.0.1:$SERVER_METRICS_PORT/metrics  http://127.0.0.1:$LEARNER_METRICS_PORT/metrics"
  echo "Prometheus http://127.0.0.1:$PROMETHEUS_PORT    Grafana http://127.0.0.1:$GRAFANA_PORT"
}

down() {
  # Reverse order: the server flushes its events while Kafka is still up.
  for name in grafana prometheus server learner kafka; do
    local pidfile="$STATE/$name.pid"
    [ -f "$pidfile" ] || continue
    local pid
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
      echo "$name stopped"
    fi
    rm -f "$pidfile"
  done
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|status|down" >&2; exit 2 ;;
esac
