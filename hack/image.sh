#!/usr/bin/env bash
# hack/image.sh: build the queue-processor runtime image on this machine, with no registry and
# no container engine, and export it as an OCI archive (`make image`).
#
#   hack/image.sh [--profile release|debug] [--no-build] [--output FILE] [--print-archive]
#
#   --profile release   (default) cargo build --release -p qp-operator -p qp-worker
#   --profile debug     use target/debug binaries (built with `cargo build --workspace --bins`,
#                       the same command as `make build` and hack/test.sh, so nothing rebuilds)
#   --no-build          take the binaries of that profile as they are (the caller built them)
#   --output FILE       default target/image/queue-processor-<appVersion>.oci.tar (release) or
#                       queue-processor-<appVersion>-debug.oci.tar; the image name is the same
#   --print-archive     print only the archive's absolute path on stdout (for scripts: test.sh)
#
# The image is the runtime stage of the repository's Containerfile, built by buildah from the
# very same lines (cut out between the `>>> runtime stage` / `<<< runtime stage` markers), after
# two stub stages that stand in for the Containerfile's `base` and `build` stages:
#   base   the filesystem hack/image/base.sh makes from Debian packages on this host, cached in
#          $QP_CACHE/image keyed by recipe version, base.sh's hash and the package versions;
#   build  the two binaries from this host's cargo, debug info stripped (objcopy --strip-debug).
# The image reference is ghcr.io/queue-processor/queue-processor:<appVersion of the chart>, the
# chart's default, so importing the archive into a node's containerd is all a cluster needs.
#
# stdout gets one line: `image REF archive FILE size N MB` (size = uncompressed layers), or with
# --print-archive the archive's path alone. Everything else goes to stderr.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
source "$QP_ROOT/hack/image/common.sh"

PROFILE=release
BUILD=1
OUTPUT=""
PRINT_ARCHIVE=0
usage() { sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit "${1:-0}"; }
while (($#)); do
  case "$1" in
    --profile) PROFILE="${2:?--profile needs release or debug}"; shift 2 ;;
    --profile=*) PROFILE="${1#*=}"; shift ;;
    --no-build) BUILD=0; shift ;;
    --print-archive) PRINT_ARCHIVE=1; shift ;;
    --output|-o) OUTPUT="${2:?--output needs a file name}"; shift 2 ;;
    --output=*) OUTPUT="${1#*=}"; shift ;;
    -h|--help) usage 0 ;;
    *) log "unknown argument: $1"; usage 1 ;;
  esac
done
[[ "$PROFILE" == release || "$PROFILE" == debug ]] || die "--profile must be release or debug, not '$PROFILE'"

cd "$QP_ROOT"
APP_VERSION="$(image_app_version)"
REF="ghcr.io/queue-processor/queue-processor:$APP_VERSION"
suffix=""
[[ "$PROFILE" == release ]] || suffix="-$PROFILE"
OUTPUT="${OUTPUT:-target/image/queue-processor-$APP_VERSION$suffix.oci.tar}"
[[ "$OUTPUT" == /* ]] || OUTPUT="$QP_ROOT/$OUTPUT"
mkdir -p "$QP_ROOT/target/image"
WORK="$(mktemp -d "$QP_ROOT/target/image/work.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
T0=$SECONDS

image_need_tools
need objcopy "install binutils (apt-get install binutils)"

# The Containerfile's runtime stage, and its version label's default, which docker/podman users
# get: it should follow the chart.
RUNTIME_STAGE="$(sed -n '/^# >>> runtime stage/,/^# <<< runtime stage/p' Containerfile)"
[[ "$RUNTIME_STAGE" == *"FROM scratch AS runtime"* ]] || die "Containerfile: no runtime stage between the '# >>> runtime stage' and '# <<< runtime stage' markers"
default_version="$(sed -n 's/^ARG VERSION=//p' <<<"$RUNTIME_STAGE")"
[[ "$default_version" == "$APP_VERSION" ]] \
  || log "warning: Containerfile's ARG VERSION=$default_version differs from the chart's appVersion $APP_VERSION (this build labels $APP_VERSION)"

# ---------------------------------------------------------------------------------------------
# 1. The binaries.
if ((BUILD)); then
  need cargo "install Rust with rustup (https://rustup.rs)"
  if [[ "$PROFILE" == release ]]; then
    run_progress "cargo build --release (qp-operator, qp-worker)" "$QP_ROOT/target/image/cargo-release.log" \
      cargo build --release -p qp-operator -p qp-worker
  else
    run_progress "cargo build (debug, workspace binaries)" "$QP_ROOT/target/image/cargo-debug.log" \
      cargo build --workspace --bins
  fi
fi
mkdir -p "$WORK/ctx"
for b in qp-operator qp-worker; do
  src="$QP_ROOT/target/$PROFILE/$b"
  [[ -x "$src" ]] || die "$src is missing; build it (cargo build$([[ $PROFILE == release ]] && echo ' --release') -p $b) or drop --no-build"
  objcopy --strip-debug "$src" "$WORK/ctx/$b"
done

# ---------------------------------------------------------------------------------------------
# 2. The base filesystem, cached. The key covers the recipe and the exact package versions apt
#    would fetch now, so a Debian security update makes a new base.
# shellcheck disable=SC2046 # word splitting wanted: a list of package names
base_versions="$(apt-cache policy $(bash hack/image/base.sh --packages) 2>/dev/null \
  | awk '/^[^ ]/{p=$1} /Candidate:/{print p, $2}')"
BASE_KEY="$QP_IMAGE_BASE_RECIPE-$({ cat hack/image/base.sh; echo "$base_versions"; } | short_sha)"
BASE_TAR="$QP_IMAGE_CACHE/base-$BASE_KEY.tar"
if [[ ! -f "$BASE_TAR" ]]; then
  mkdir -p "$QP_IMAGE_CACHE"
  base_dir="$(mktemp -d "$QP_IMAGE_CACHE/base-$BASE_KEY.XXXXXX")"
  run_progress "base filesystem from Debian packages ($BASE_KEY)" "$QP_IMAGE_CACHE/base-$BASE_KEY.log" \
    bash hack/image/base.sh "$base_dir"
  # Deterministic tar: sorted, fixed times, numeric owners.
  tar --sort=name --mtime=@0 --numeric-owner -C "$base_dir" -cf "$base_dir.tar" .
  mv -f "$base_dir.tar" "$BASE_TAR"
  rm -rf "$base_dir"
  log "base filesystem cached: $BASE_TAR ($(mb "$(stat -c %s "$BASE_TAR")"))"
else
  log "base filesystem: cached $BASE_TAR"
fi
cp "$BASE_TAR" "$WORK/ctx/base.tar"

# ---------------------------------------------------------------------------------------------
# 3. The image: stub stages + the Containerfile's runtime stage, verbatim.
cat >"$WORK/ctx/Containerfile" <<EOF
# Generated by hack/image.sh: stand-ins for the Containerfile's base and build stages, then its
# runtime stage unchanged.
FROM scratch AS base
ADD base.tar /rootfs/
FROM scratch AS build
COPY qp-operator qp-worker /out/

$RUNTIME_STAGE
EOF

# Up to date? The archive is rebuilt only when an input changed.
INPUTS="$({ echo "$REF $QP_BUILDAH_DRIVER"; cat "$WORK/ctx/Containerfile"; sha256sum "$BASE_TAR" "$WORK/ctx/qp-operator" "$WORK/ctx/qp-worker" | cut -d' ' -f1; } | short_sha)"
if SIZE="$(archive_current "$OUTPUT" "$INPUTS")"; then
  log "image up to date ($OUTPUT)"
else
  log "building $REF with buildah ($QP_BUILDAH_DRIVER storage in $QP_BUILDAH_ROOT)"
  image_build_archive "$WORK/ctx" "$OUTPUT" "$REF" --build-arg "VERSION=$APP_VERSION"

  # 4. Check what was written: unpack the archive and run both binaries as the image's user.
  SIZE="$(image_unpack "$OUTPUT" "$WORK/unpacked")"
  rootfs="$WORK/unpacked/rootfs"
  [[ ! -e "$rootfs/bin/sh" && ! -e "$rootfs/usr/bin/sh" ]] || die "the image has a shell"
  if [[ $(id -u) -eq 0 ]] && command -v chroot >/dev/null; then
    for b in qp-operator qp-worker; do
      chroot --userspec=65532:65532 "$rootfs" "/usr/local/bin/$b" --help >"$WORK/$b-help.txt" 2>&1 \
        || { cat "$WORK/$b-help.txt" >&2; die "/usr/local/bin/$b --help fails inside the image"; }
    done
    log "checked: qp-operator and qp-worker run in the image as 65532:65532"
  else
    log "not root: skipped running the binaries inside the unpacked image"
  fi
  archive_record "$OUTPUT" "$INPUTS" "$SIZE"
fi

log "image ready in $((SECONDS - T0))s"
summary="image $REF archive ${OUTPUT#"$QP_ROOT"/} size $(mb "$SIZE")"
if ((PRINT_ARCHIVE)); then
  log "$summary"
  echo "$OUTPUT"
else
  echo "$summary"
fi
