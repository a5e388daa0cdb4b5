# Shared settings for the hack/ scripts: pinned versions, cache and runtime locations, logging.
# Sourced, never executed. Everything built or downloaded lives in $QP_CACHE, keyed by version,
# so a second `make env-up` is fast and nothing large ever lands in the repository.

set -euo pipefail

# Versions. Kubernetes 1.35 is inside k8s-openapi 0.29's supported range (1.33..1.37) and is the
# newest line whose patch releases the Go module proxy serves here; etcd 3.6.5 is the etcd client
# version that Kubernetes 1.35.4 itself pins.
K8S_VERSION="${K8S_VERSION:-v1.35.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.5}"
HELM_VERSION="${HELM_VERSION:-v4.3.1}"
KUBE_SCORE_VERSION="${KUBE_SCORE_VERSION:-v1.20.0}"
KAFKA_VERSION="${KAFKA_VERSION:-4.3.1}"
LOG4J_VERSION="${LOG4J_VERSION:-2.25.4}"
# Prometheus 3.16 is published as the Go module version v0.316.0.
PROMETHEUS_SD_VERSION="${PROMETHEUS_SD_VERSION:-3.16.0}"
PROMETHEUS_SD_MODULE_VERSION="v0.3${PROMETHEUS_SD_VERSION#3.}"
# The load generator `make bench` drives the gateway with (hack/bench-tools.sh).
VEGETA_VERSION="${VEGETA_VERSION:-v12.13.0}"

QP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
QP_CACHE="${QP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/queue-processor}"
QP_RUN="${QP_RUN:-$QP_ROOT/.qp-env}"
QP_ENV_FILE="$QP_RUN/env"

K8S_BIN="$QP_CACHE/kubernetes-$K8S_VERSION/bin"
ETCD_BIN="$QP_CACHE/etcd-$ETCD_VERSION/bin"
HELM_BIN="$QP_CACHE/helm-$HELM_VERSION/bin"
KUBE_SCORE_BIN="$QP_CACHE/tools/kube-score-$KUBE_SCORE_VERSION"
KAFKA_LIBS="$QP_CACHE/kafka-$KAFKA_VERSION-log4j-$LOG4J_VERSION/libs"
PROMETHEUS_SD_BIN="$QP_CACHE/prometheus-$PROMETHEUS_SD_VERSION/bin"
VEGETA_BIN="$QP_CACHE/tools/vegeta-$VEGETA_VERSION"

log() { printf '\033[1m[qp]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[31m[qp] error:\033[0m %s\n' "$*" >&2; exit 1; }

need() {
  # need <command> <how to get it>
  command -v "$1" >/dev/null 2>&1 || die "'$1' is not installed: $2"
}

# Run a long command with its output in a log file, printing a heartbeat every 20 s so the
# first (cold) build shows it is alive. On failure the tail of the log is shown.
run_logged() {
  local what="$1" logfile="$2"; shift 2
  mkdir -p "$(dirname "$logfile")"
  log "$what (log: $logfile)"
  local start=$SECONDS
  ( "$@" ) >"$logfile" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 20 &
    wait $! || true
    kill -0 "$pid" 2>/dev/null && log "  ... $what: $((SECONDS - start))s, last: $(tail -n 1 "$logfile" | cut -c1-100)"
  done
  if ! wait "$pid"; then
    tail -n 30 "$logfile" >&2
    die "$what failed after $((SECONDS - start))s; full log in $logfile"
  fi
  log "$what: done in $((SECONDS - start))s"
}

# services_up: start every local service (installing what is missing), reusing those already
# running, and arrange for exactly the ones this run started to be stopped when the calling
# script exits. Output of env.sh goes to stderr so callers can keep stdout for results.
QP_SERVICES=(node-network etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet
  kube-proxy kafka redis redis-cluster prometheus)
services_up() {
  local s already=()
  for s in "${QP_SERVICES[@]}"; do
    bash "$QP_ROOT/hack/env.sh" is-up "$s" && already+=("$s")
  done
  QP_STARTED=()
  trap '_services_cleanup' EXIT INT TERM
  local t0=$SECONDS
  bash "$QP_ROOT/hack/env.sh" up >&2
  for s in "${QP_SERVICES[@]}"; do
    [[ " ${already[*]} " == *" $s "* ]] || QP_STARTED+=("$s")
  done
  log "services ready in $((SECONDS - t0))s"
}

_services_cleanup() {
  local rc=$?
  if ((${#QP_STARTED[@]})); then
    log "stopping services this run started: ${QP_STARTED[*]}"
    # `down` also checks that the node left nothing on the host; that failing fails the run.
    bash "$QP_ROOT/hack/env.sh" down "${QP_STARTED[@]}" >&2 || { log "stopping services failed"; rc=1; }
  fi
  exit $rc
}
