#!/usr/bin/env bash
# hack/pause-image.sh: the pod sandbox image containerd needs (its `sandbox_image`), made here
# because no registry is reachable: hack/pause/pause.c built static, alone on scratch, exported
# as an OCI archive for `ctr -n k8s.io images import`.
#
#   hack/pause-image.sh [--ref NAME:TAG] [--output FILE]
#
#   --ref      image reference, default registry.k8s.io/pause:3.10 (match containerd's config)
#   --output   default target/image/pause.oci.tar
#
# The static binary is cached in $QP_CACHE/image keyed by the source's and the compiler's hash.
# stdout gets one line: `image REF archive FILE size N MB`.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
source "$QP_ROOT/hack/image/common.sh"

REF="registry.k8s.io/pause:3.10"
OUTPUT=""
usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit "${1:-0}"; }
while (($#)); do
  case "$1" in
    --ref) REF="${2:?--ref needs an image reference}"; shift 2 ;;
    --ref=*) REF="${1#*=}"; shift ;;
    --output|-o) OUTPUT="${2:?--output needs a file name}"; shift 2 ;;
    --output=*) OUTPUT="${1#*=}"; shift ;;
    -h|--help) usage 0 ;;
    *) log "unknown argument: $1"; usage 1 ;;
  esac
done
cd "$QP_ROOT"
OUTPUT="${OUTPUT:-target/image/pause.oci.tar}"
[[ "$OUTPUT" == /* ]] || OUTPUT="$QP_ROOT/$OUTPUT"
mkdir -p "$QP_ROOT/target/image"
WORK="$(mktemp -d "$QP_ROOT/target/image/work.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

image_need_tools
need gcc "install gcc and libc6-dev (apt-get install gcc libc6-dev)"
[[ -f /usr/lib/x86_64-linux-gnu/libc.a || -n "$(gcc -print-file-name=libc.a | grep /)" ]] \
  || die "static glibc (libc.a) is missing: apt-get install libc6-dev"

# 1. The static binary, cached.
KEY="$({ cat hack/pause/pause.c; gcc --version | head -n 1; } | short_sha)"
BIN="$QP_IMAGE_CACHE/pause-$KEY/pause"
if [[ ! -x "$BIN" ]]; then
  mkdir -p "$(dirname "$BIN")"
  gcc -static -Os -s -Wall -Wextra -Werror -o "$BIN.tmp" hack/pause/pause.c || die "building pause failed"
  mv -f "$BIN.tmp" "$BIN"
  log "pause built: $BIN"
fi
# It must really stop on SIGTERM (a sandbox that ignores it delays every pod deletion).
"$BIN" 2>/dev/null &
pid=$!
sleep 0.2
kill -TERM "$pid"
rc=0
wait "$pid" || rc=$?
[[ $rc -eq 0 ]] || die "$BIN did not exit cleanly on SIGTERM (status $rc)"

# 2. The image, rebuilt only when the binary or the reference changed.
mkdir -p "$WORK/ctx"
cp "$BIN" "$WORK/ctx/pause"
cat >"$WORK/ctx/Containerfile" <<'EOF'
FROM scratch
COPY pause /pause
# 65535 like the upstream pause image; the kubelet may override it from the pod's securityContext.
USER 65535:65535
LABEL org.opencontainers.image.title="pause" \
      org.opencontainers.image.description="Pod sandbox for containerd's sandbox_image, built from hack/pause/pause.c" \
      org.opencontainers.image.source="https://github.com/queue-processor/queue-processor" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["/pause"]
EOF
INPUTS="$({ echo "$REF $QP_BUILDAH_DRIVER"; cat "$WORK/ctx/Containerfile" "$BIN"; } | short_sha)"
if SIZE="$(archive_current "$OUTPUT" "$INPUTS")"; then
  log "pause image up to date ($OUTPUT)"
else
  log "building $REF with buildah"
  image_build_archive "$WORK/ctx" "$OUTPUT" "$REF"
  SIZE="$(image_unpack "$OUTPUT" "$WORK/unpacked")"
  [[ -x "$WORK/unpacked/rootfs/pause" ]] || die "no /pause in $OUTPUT"
  archive_record "$OUTPUT" "$INPUTS" "$SIZE"
fi
echo "image $REF archive ${OUTPUT#"$QP_ROOT"/} size $(mb "$SIZE")"
