#!/usr/bin/env bash
# `make demo`: the whole system on this machine, no cluster needed.
#
#   1. installs and starts Kafka, Redis and Prometheus (only those; reuses running ones)
#   2. builds qp-operator, qp-worker and the demo driver (release)
#   3. creates the Kafka topic and starts `qp-operator local` with examples/demo-queueprocessor.yaml
#      (addresses taken from .qp-env/env), which runs worker processes and the gateway
#   4. submits a burst of requests through the gateway and prints a live table every second
#      while the workers scale up, drain the backlog and scale back; then a summary and the
#      Prometheus dashboard URL
#
# Ctrl-C stops the demo cleanly (local mode drains its workers). The services stay up so the
# dashboard keeps working; the last lines say how to stop them.
#
# Settings (environment): DEMO_REQUESTS (default 3000), DEMO_TIMEOUT seconds (default 150),
# QP_PORT_BASE (default 17000; the demo uses ports base+20 .. base+28).
source "$(dirname "$0")/lib.sh"
cd "$QP_ROOT"

need cargo "install Rust with rustup (https://rustup.rs)"

SERVICES=(kafka redis prometheus)
DEMO_REQUESTS="${DEMO_REQUESTS:-3000}"
DEMO_TIMEOUT="${DEMO_TIMEOUT:-150}"
QP_PORT_BASE="${QP_PORT_BASE:-17000}"
OPERATOR_PORT=$((QP_PORT_BASE + 20))
# Workers count up from BASE_PORT; the gateway gets the port below it.
BASE_PORT=$((QP_PORT_BASE + 22))
DEMO_DIR="$QP_RUN/demo"
QP_FILE="$DEMO_DIR/queueprocessor.yaml"

already=()
for s in "${SERVICES[@]}"; do
  bash hack/env.sh is-up "$s" && already+=("$s")
done

local_pid=""
stop_local() {
  [[ -n "$local_pid" ]] || return 0
  if kill -0 "$local_pid" 2>/dev/null; then
    log "stopping local mode (its workers finish what they hold first)"
    kill -TERM "$local_pid" 2>/dev/null || true
    local deadline=$((SECONDS + 40))
    while kill -0 "$local_pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
  fi
  # Anything left of its process group (it runs in a session of its own), and the scrape
  # targets it could not remove if it had to be killed.
  kill -KILL -- "-$local_pid" 2>/dev/null || true
  wait "$local_pid" 2>/dev/null || true
  rm -f "$QP_PROMETHEUS_TARGETS/demo.json"
  local_pid=""
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_local
  local started=()
  for s in "${SERVICES[@]}"; do
    [[ " ${already[*]} " == *" $s "* ]] || started+=("$s")
  done
  if ((${#started[@]})); then
    log "left running for the dashboard: ${started[*]}; stop them with: bash hack/env.sh stop ${started[*]}"
  else
    log "the services were running before the demo and still are (make env-status)"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

t0=$SECONDS
log "starting ${SERVICES[*]} (installed and built on first use; cached afterwards)"
bash hack/env.sh up "${SERVICES[@]}"
log "services ready in $((SECONDS - t0))s"

log "building the release binaries"
cargo build --release --bin qp-operator --bin qp-worker --bin qp-demo
BIN="$QP_ROOT/target/release"

# Shell variables only: exported, they would reach the worker processes as configuration.
# shellcheck disable=SC1090
source "$QP_ENV_FILE"

# The example with this environment's addresses.
mkdir -p "$DEMO_DIR"
sed -E -e "s|^([[:space:]]*bootstrapServers:).*|\1 $QP_KAFKA_BOOTSTRAP|" \
  -e "s|^([[:space:]]*url:).*|\1 $QP_REDIS_URL|" \
  examples/demo-queueprocessor.yaml >"$QP_FILE"

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in $(seq "$OPERATOR_PORT" $((BASE_PORT + 6))); do
  port_free "$p" || die "port $p on 127.0.0.1 is in use (is another demo running? \`ss -ltnp 'sport = :$p'\`);
  pick other ports with QP_PORT_BASE=<n> make demo"
done

"$BIN/qp-demo" setup -f "$QP_FILE" --partitions 12

# The gateway's tokens Secret as local mode reads it (<dir>/<secret>/<key>): one client, `demo`,
# with a fresh token per run, readable only by us.
SECRETS_DIR="$DEMO_DIR/secrets"
mkdir -p "$SECRETS_DIR/demo-gateway"
chmod 700 "$SECRETS_DIR"
(umask 077 && echo "demo:$(openssl rand -hex 32)" >"$SECRETS_DIR/demo-gateway/tokens")

log "starting local mode: qp-operator local -f $QP_FILE (logs: $DEMO_DIR/logs)"
mkdir -p "$DEMO_DIR/logs"
setsid "$BIN/qp-operator" local -f "$QP_FILE" --worker-bin "$BIN/qp-worker" \
  --listen "127.0.0.1:$OPERATOR_PORT" --base-port "$BASE_PORT" \
  --prometheus-targets "$QP_PROMETHEUS_TARGETS/demo.json" --log-dir "$DEMO_DIR/logs" \
  --secrets-dir "$SECRETS_DIR" >"$DEMO_DIR/logs/qp-operator.log" 2>&1 </dev/null &
local_pid=$!
log "local mode: status http://127.0.0.1:$OPERATOR_PORT/status.json, gateway http://127.0.0.1:$((BASE_PORT - 1)) (token of client demo in $SECRETS_DIR/demo-gateway/tokens)"

rc=0
"$BIN/qp-demo" run -f "$QP_FILE" --operator "http://127.0.0.1:$OPERATOR_PORT" \
  --requests "$DEMO_REQUESTS" --timeout "$DEMO_TIMEOUT" --secrets-dir "$SECRETS_DIR" || rc=$?
if ! kill -0 "$local_pid" 2>/dev/null; then
  tail -n 20 "$DEMO_DIR/logs/qp-operator.log" >&2
  die "local mode exited during the demo (log: $DEMO_DIR/logs/qp-operator.log)"
fi
stop_local
log "demo done in $((SECONDS - t0))s; worker logs in $DEMO_DIR/logs"
exit "$rc"
