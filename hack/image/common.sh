# Helpers shared by hack/image.sh and hack/pause-image.sh: buildah with private storage, and a
# look inside an exported OCI archive. Sourced after hack/lib.sh, never executed.

# The version of the base filesystem recipe (hack/image/base.sh). The cache key also includes
# base.sh's hash and the Debian package versions, so bump this only for changes they miss.
QP_IMAGE_BASE_RECIPE="bookworm-r1"
QP_IMAGE_CACHE="$QP_CACHE/image"
# buildah's own storage, private to this project: nothing touches /var/lib/containers.
# overlay works on this machine kind (ext4 under the cache); set QP_BUILDAH_DRIVER=vfs where it
# does not (vfs copies every layer, slower but works anywhere).
QP_BUILDAH_DRIVER="${QP_BUILDAH_DRIVER:-overlay}"
QP_BUILDAH_ROOT="$QP_IMAGE_CACHE/buildah-$QP_BUILDAH_DRIVER"
QP_BUILDAH_RUNROOT="$QP_IMAGE_CACHE/buildah-$QP_BUILDAH_DRIVER-run"
# Only FROM scratch, COPY and ADD: nothing is ever run inside a container, but chroot isolation
# keeps buildah from wanting runc or user namespaces should that change.
export BUILDAH_ISOLATION=chroot

# run_progress WHAT LOGFILE CMD...: hack/lib.sh's run_logged (output to a log file, a heartbeat
# every 20 s, the log's tail on failure), but checking every second whether the command has
# finished, so a step with nothing to do (cargo when the binaries are fresh) takes a second, not
# a whole 20 s heartbeat period.
run_progress() {
  local what="$1" logfile="$2"; shift 2
  mkdir -p "$(dirname "$logfile")"
  log "$what (log: $logfile)"
  local start=$SECONDS next=20
  ( "$@" ) >"$logfile" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if ((SECONDS - start >= next)) && kill -0 "$pid" 2>/dev/null; then
      log "  ... $what: $((SECONDS - start))s, last: $(tail -n 1 "$logfile" | cut -c1-100)"
      next=$((next + 20))
    fi
  done
  if ! wait "$pid"; then
    tail -n 30 "$logfile" >&2
    die "$what failed after $((SECONDS - start))s; full log in $logfile"
  fi
  log "$what: done in $((SECONDS - start))s"
}

# image_app_version: appVersion from the chart, the image tag everywhere.
image_app_version() {
  local v
  v="$(sed -n 's/^appVersion:[[:space:]]*["'\'']\{0,1\}\([^"'\'' ]*\)["'\'']\{0,1\}[[:space:]]*$/\1/p' \
    "$QP_ROOT/charts/queue-processor/Chart.yaml")"
  [[ -n "$v" ]] || die "no appVersion in charts/queue-processor/Chart.yaml"
  echo "$v"
}

# image_need_tools: buildah from Debian, installed the way hack/env.sh installs its packages:
# through apt when root, else a clear error. (No mmdebstrap or debootstrap: the base is made
# with apt-get download and dpkg-deb, see hack/image/base.sh. skopeo is not needed here.)
image_need_tools() {
  local missing=() t
  command -v buildah >/dev/null || missing+=(buildah)
  for t in apt-get dpkg-deb tar gzip sha256sum; do
    command -v "$t" >/dev/null || die "'$t' is missing; this script needs a Debian-based host (apt, dpkg)"
  done
  ((${#missing[@]} == 0)) && return 0
  [[ $(id -u) -eq 0 ]] || die "missing packages: ${missing[*]}; run: sudo apt-get install -y ${missing[*]}"
  run_progress "apt-get install ${missing[*]}" "$QP_IMAGE_CACHE/apt.log" bash -c \
    "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ${missing[*]}"
}

# qp_buildah ARGS...: buildah on the private storage. A signature policy of our own accepts
# anything: nothing is ever pulled (FROM scratch, --pull-never), and /etc/containers may be absent.
qp_buildah() {
  local policy="$QP_IMAGE_CACHE/policy.json"
  if [[ ! -f "$policy" ]]; then
    mkdir -p "$QP_IMAGE_CACHE"
    echo '{"default":[{"type":"insecureAcceptAnything"}]}' >"$policy"
  fi
  local cmd="$1"; shift
  case "$cmd" in
    bud|push) set -- --signature-policy "$policy" "$@" ;;
  esac
  buildah --root "$QP_BUILDAH_ROOT" --runroot "$QP_BUILDAH_RUNROOT" \
    --storage-driver "$QP_BUILDAH_DRIVER" "$cmd" "$@"
}

# image_build_archive CONTEXT_DIR OUTPUT REF [bud args...]: build CONTEXT_DIR/Containerfile and
# write it to OUTPUT as an OCI archive whose image is named REF. The image lives in the private
# storage only while it is exported; the archive is the result.
image_build_archive() {
  local ctx="$1" out="$2" ref="$3"; shift 3
  local tag="localhost/qp-image-build:$$-$RANDOM"
  mkdir -p "$(dirname "$out")"
  qp_buildah bud --pull-never --layers=false --quiet -f "$ctx/Containerfile" -t "$tag" "$@" "$ctx" >/dev/null \
    || die "buildah bud failed for $ref (storage: $QP_BUILDAH_ROOT, driver $QP_BUILDAH_DRIVER)"
  rm -f "$out.tmp"
  qp_buildah push --quiet "$tag" "oci-archive:$out.tmp:$ref" || die "buildah push to $out failed"
  mv -f "$out.tmp" "$out"
  qp_buildah rmi "$tag" >/dev/null || true
  qp_buildah rmi --prune >/dev/null 2>&1 || true
}

# image_unpack ARCHIVE DIR: unpack an OCI archive's (single-manifest) image into DIR/rootfs and
# print the uncompressed size of its layers in bytes: what the image takes once imported. Reads
# the archive itself, so it checks what a user gets.
image_unpack() {
  local archive="$1" dir="$2" index manifest layers l blob size=0 n
  rm -rf "$dir"
  mkdir -p "$dir/oci" "$dir/rootfs"
  tar -xf "$archive" -C "$dir/oci"
  index="$dir/oci/index.json"
  [[ -f "$index" ]] || die "$archive is not an OCI archive (no index.json)"
  manifest="$(grep -o '"digest":"sha256:[0-9a-f]*"' "$index" | head -n 1 | grep -o '[0-9a-f]\{64\}')"
  [[ -n "$manifest" ]] || die "no manifest in $archive"
  # The layers are everything listed after "layers" in the manifest (the config comes first).
  layers="$(sed 's/.*"layers"://' "$dir/oci/blobs/sha256/$manifest" | grep -o '"digest":"sha256:[0-9a-f]*"' | grep -o '[0-9a-f]\{64\}')"
  for l in $layers; do
    blob="$dir/oci/blobs/sha256/$l"
    # gzip (buildah's default) or uncompressed layers
    if gzip -t "$blob" 2>/dev/null; then
      n="$(gzip -dc "$blob" | wc -c)"
      gzip -dc "$blob" | tar -x -C "$dir/rootfs" --numeric-owner
    else
      n="$(wc -c <"$blob")"
      tar -x -C "$dir/rootfs" --numeric-owner -f "$blob"
    fi
    size=$((size + n))
  done
  echo "$size"
}

# mb BYTES: decimal megabytes with one digit, as buildah and registries print them.
mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1000000 }'; }

# sha_of FILES/STRINGS on stdin -> short hash for cache keys
short_sha() { sha256sum | cut -c1-16; }

# An archive is rebuilt only when an input changed: `<archive>.inputs` holds the hash of its
# inputs and its size.
# archive_current ARCHIVE INPUTS: true, with the recorded size on stdout, when ARCHIVE exists and
# was built from INPUTS; otherwise false, and the stale record is removed.
archive_current() {
  local stamp="$1.inputs"
  if [[ -f "$1" && -f "$stamp" && "$(sed -n 1p "$stamp")" == "$2" ]]; then
    sed -n 2p "$stamp"
    return 0
  fi
  rm -f "$stamp"
  return 1
}

# archive_record ARCHIVE INPUTS SIZE: remember that ARCHIVE was built from INPUTS.
archive_record() { printf '%s\n%s\n' "$2" "$3" >"$1.inputs"; }
