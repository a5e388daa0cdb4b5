#!/usr/bin/env bash
# Builds helm from the Go module proxy (helm.sh/helm/v4/cmd/helm has no replace lines, so a
# plain `go install` works).
source "$(dirname "$0")/lib.sh"

[[ -x "$HELM_BIN/helm" ]] && exit 0
need go "install Go 1.25 or newer (https://go.dev/dl) or apt-get install golang"
mkdir -p "$HELM_BIN"
build() {
  CGO_ENABLED=0 GOBIN="$HELM_BIN" go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
}
run_logged "building helm $HELM_VERSION (first time only, ~2-4 min)" "$QP_CACHE/build/helm-$HELM_VERSION.log" build
"$HELM_BIN/helm" version --short
