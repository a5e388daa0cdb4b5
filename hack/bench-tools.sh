#!/usr/bin/env bash
# The outside yardsticks `make bench` measures the project against, installed from the
# registries and cached by version (never in the repository):
#
#   vegeta  an open-loop HTTP load generator (Go module proxy), for the gateway's capacity
#   kcat    a bare librdkafka consumer (Debian), for the worker's throughput ceiling
#
# Prints `export` lines for the paths (QP_VEGETA, QP_KCAT), which hack/bench.sh evaluates.
source "$(dirname "$0")/lib.sh"

if ! command -v kcat >/dev/null; then
  [[ $(id -u) -eq 0 ]] || die "kcat is not installed; run: sudo apt-get install -y kcat"
  run_logged "apt-get install kcat" "$QP_CACHE/build/apt-kcat.log" bash -c \
    "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kcat"
fi

if [[ ! -x "$VEGETA_BIN/vegeta" ]]; then
  need go "install Go 1.25 or newer (https://go.dev/dl) or apt-get install golang"
  mkdir -p "$VEGETA_BIN"
  build() {
    CGO_ENABLED=0 GOBIN="$VEGETA_BIN" GOFLAGS=-mod=mod go install -trimpath -ldflags "-s -w" \
      "github.com/tsenart/vegeta/v12@$VEGETA_VERSION"
  }
  run_logged "building vegeta $VEGETA_VERSION (first time only, ~1 min)" \
    "$QP_CACHE/build/vegeta-$VEGETA_VERSION.log" build
fi

echo "export QP_VEGETA=$VEGETA_BIN/vegeta"
echo "export QP_KCAT=$(command -v kcat)"
