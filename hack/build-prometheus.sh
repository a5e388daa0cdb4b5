#!/usr/bin/env bash
# Builds a Prometheus with Kubernetes service discovery from the Go module proxy, for the
# end-to-end tests that scrape pods through the API server. Debian's prometheus (which serves
# everything else here: rules, consoles, promtool) is built without kubernetes_sd_configs
# ("field kubernetes_sd_configs not found in type config.ScrapeConfig"). Only that discovery
# mechanism is compiled in (build tags remove_all_sd,enable_kubernetes_sd), which keeps the
# build to a few minutes; the web UI's assets are not embedded (the HTTP API is all we use).
source "$(dirname "$0")/lib.sh"

[[ -x "$PROMETHEUS_SD_BIN/prometheus" ]] && exit 0
need go "install Go 1.25 or newer (https://go.dev/dl) or apt-get install golang"
mkdir -p "$PROMETHEUS_SD_BIN"
build() {
  CGO_ENABLED=0 GOBIN="$PROMETHEUS_SD_BIN" go install -trimpath -tags remove_all_sd,enable_kubernetes_sd \
    -ldflags "-s -w -X github.com/prometheus/common/version.Version=$PROMETHEUS_SD_VERSION" \
    "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_SD_MODULE_VERSION"
}
run_logged "building Prometheus $PROMETHEUS_SD_VERSION with Kubernetes discovery (first time only, ~3-6 min)" \
  "$QP_CACHE/build/prometheus-$PROMETHEUS_SD_VERSION.log" build
"$PROMETHEUS_SD_BIN/prometheus" --version | head -1
