#!/usr/bin/env bash
# Builds the Kubernetes binaries from the Go module proxy: the control plane (kube-apiserver,
# kube-controller-manager, kube-scheduler), the node (kubelet, kube-proxy) and kubectl.
#
# k8s.io/kubernetes replaces its k8s.io/* dependencies with ./staging/... directories, which a
# module download does not honour. So we build from a tiny wrapper module that requires
# k8s.io/kubernetes and points every staging module at its published v0.Y.Z twin.
source "$(dirname "$0")/lib.sh"

K8S_COMMANDS=(kube-apiserver kube-controller-manager kubectl kube-scheduler kubelet kube-proxy)
missing=()
for cmd in "${K8S_COMMANDS[@]}"; do [[ -x "$K8S_BIN/$cmd" ]] || missing+=("$cmd"); done
((${#missing[@]})) || exit 0
need go "install Go 1.25 or newer (https://go.dev/dl) or apt-get install golang"
need curl "apt-get install curl"

staging_version="v0.${K8S_VERSION#v1.}"
work="$QP_CACHE/build/kubernetes-$K8S_VERSION"
mkdir -p "$work" "$K8S_BIN"
modfile="$(go env GOPROXY | cut -d, -f1)/k8s.io/kubernetes/@v/$K8S_VERSION.mod"
curl -fsSL "$modfile" -o "$work/upstream.mod" || die "cannot download $modfile: is the Go module proxy reachable?"

{
  echo "module qp.local/kubernetes-build"
  echo
  echo "go 1.25.0"
  echo
  echo "godebug default=go1.25"
  echo
  echo "require k8s.io/kubernetes $K8S_VERSION"
  echo
  grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$work/upstream.mod" \
    | awk -v v="$staging_version" '{print "replace " $1 " => " $1 " " v}'
} >"$work/go.mod"

major="${K8S_VERSION#v}"; major="${major%%.*}"
minor="${K8S_VERSION#v*.}"; minor="${minor%%.*}"
ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

build() {
  cd "$work"
  export GOFLAGS=-mod=mod CGO_ENABLED=0
  for cmd in "${missing[@]}"; do
    echo "building $cmd"
    go build -v -trimpath -ldflags "-s -w $ldflags" -o "$K8S_BIN/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd"
    mv "$K8S_BIN/$cmd.tmp" "$K8S_BIN/$cmd"
  done
}
run_logged "building Kubernetes $K8S_VERSION: ${missing[*]} (first time only, ~15-25 min on 2 cores)" "$work/build.log" build
"$K8S_BIN/kube-apiserver" --version
