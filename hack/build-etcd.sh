#!/usr/bin/env bash
# Builds etcd from the Go module proxy. Debian's etcd (3.4) is older than Kubernetes 1.35
# supports. go.etcd.io/etcd/server/v3 is itself a main package but carries local replace lines,
# so it is built from a wrapper module that requires it (the published api/client modules at the
# same version then satisfy those replaces).
source "$(dirname "$0")/lib.sh"

[[ -x "$ETCD_BIN/etcd" ]] && exit 0
need go "install Go 1.25 or newer (https://go.dev/dl) or apt-get install golang"

work="$QP_CACHE/build/etcd-$ETCD_VERSION"
mkdir -p "$work" "$ETCD_BIN"
cat >"$work/go.mod" <<MOD
module qp.local/etcd-build

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
MOD

build() {
  cd "$work"
  export GOFLAGS=-mod=mod CGO_ENABLED=0
  go build -v -trimpath -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION" \
    -o "$ETCD_BIN/etcd.tmp" go.etcd.io/etcd/server/v3
  mv "$ETCD_BIN/etcd.tmp" "$ETCD_BIN/etcd"
}
run_logged "building etcd $ETCD_VERSION (first time only, ~2-5 min)" "$work/build.log" build
"$ETCD_BIN/etcd" --version | head -1
