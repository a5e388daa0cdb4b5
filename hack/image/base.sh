#!/usr/bin/env bash
# base.sh ROOTFS: the runtime image's base filesystem, made from Debian packages.
#
# One recipe for both ways the image is built: the `base` stage of the repository's Containerfile
# runs it inside debian:bookworm-slim, and hack/image.sh runs it on a Debian 12 host (where it
# uses the host's apt configuration and package lists, so no registry and no debootstrap).
#
# What the image needs is what `ldd` shows for the release binaries: libc, libm, libgcc_s,
# libz, libssl3 and libcrypto3, plus the dynamic loader and a CA bundle. So the base is only the
# packages that ship those (libc6, libgcc-s1, zlib1g, libssl3, ca-certificates), unpacked with
# `dpkg-deb -x` (no maintainer scripts, no dpkg database, no shell), then pruned. Result: about
# 10 MB, owned by root, nothing set-uid, no /bin/sh.
#
# Bump QP_IMAGE_BASE_RECIPE in hack/image/common.sh when the output changes in a way the script's
# own hash would not show (hack/image.sh keys its cache on that version, this file's hash and
# the package versions).
set -euo pipefail

# gcc-12-base holds only the copyright file libgcc-s1's documentation links to.
PACKAGES=(libc6 libgcc-s1 gcc-12-base zlib1g libssl3 ca-certificates)
# `base.sh --packages` lists them (hack/image.sh keys its cache on their versions).
if [[ "${1:-}" == --packages ]]; then echo "${PACKAGES[*]}"; exit 0; fi
ROOTFS="${1:?usage: base.sh ROOTFS | base.sh --packages}"
ARCH_TRIPLET="$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)"

say() { printf '[base] %s\n' "$*" >&2; }

[[ ! -e "$ROOTFS" ]] || [[ -z "$(ls -A "$ROOTFS")" ]] || { say "$ROOTFS is not empty"; exit 1; }
mkdir -p "$ROOTFS"
debs="$(mktemp -d)"
trap 'rm -rf "$debs"' EXIT

# apt-get download fetches exactly the candidate versions of the host's (or the stage's) apt
# configuration, mirrors and proxies included. As root, apt's _apt sandbox user cannot write to
# a private temporary directory, so downloads run as root (they are only unpacked, never run).
download() { (cd "$debs" && apt-get -q -o APT::Sandbox::User=root download "${PACKAGES[@]}"); }
if ! download >&2; then
  [[ $(id -u) -eq 0 ]] || { say "apt-get download failed; run 'sudo apt-get update' and retry"; exit 1; }
  say "apt-get download failed; running apt-get update once and retrying"
  apt-get -q update >&2
  download >&2
fi

mkdir -p "$ROOTFS/var/lib/dpkg/status.d"
for deb in "$debs"/*.deb; do
  pkg="$(dpkg-deb -f "$deb" Package)"
  say "unpacking $pkg $(dpkg-deb -f "$deb" Version)"
  dpkg-deb -x "$deb" "$ROOTFS"
  # The distroless convention: one status file per package, so image scanners (trivy, grype,
  # syft) know which Debian packages and versions are inside without a dpkg database.
  { dpkg-deb -f "$deb" Package Version Architecture Source Maintainer; echo "Status: install ok installed"; } \
    >"$ROOTFS/var/lib/dpkg/status.d/$pkg"
done

cd "$ROOTFS"

# The CA bundle, as update-ca-certificates would make it: every certificate ca-certificates
# ships, concatenated in name order (built from the package, not copied from the host, so a
# host's private CAs never end up in the image). OpenSSL's default locations (Debian's
# OPENSSLDIR is /usr/lib/ssl; the openssl package that normally links them is not installed)
# point at it too, for librdkafka; rustls finds it through SSL_CERT_FILE or the same path.
mkdir -p etc/ssl/certs usr/lib/ssl
find usr/share/ca-certificates/mozilla -name '*.crt' | LC_ALL=C sort | xargs cat >etc/ssl/certs/ca-certificates.crt
[[ $(grep -c 'BEGIN CERTIFICATE' etc/ssl/certs/ca-certificates.crt) -gt 100 ]] || { say "CA bundle looks empty"; exit 1; }
ln -sfn ../../../etc/ssl/certs usr/lib/ssl/certs
ln -sfn ../../../etc/ssl/certs/ca-certificates.crt usr/lib/ssl/cert.pem

# Prune: documentation except licences, manual pages, lintian overrides, iconv modules (nothing
# here converts character sets), the CA sources (bundled above), update-ca-certificates (a shell
# script) and glibc's debugging/profiling preload libraries.
rm -rf usr/share/man usr/share/lintian usr/share/locale usr/share/info usr/share/ca-certificates \
  usr/sbin etc/ca-certificates "usr/lib/$ARCH_TRIPLET/gconv"
rm -f "lib/$ARCH_TRIPLET"/{libmemusage.so,libpcprofile.so,libc_malloc_debug.so.0,libthread_db.so.1}
rm -rf usr/share/doc/*/examples
find usr/share/doc -type f ! -name copyright -delete
find usr/share/doc -depth -type d -empty -delete

# A passwd and group file naming the image's user (65532, the distroless "nonroot" convention),
# name resolution from files then DNS, a world-writable /tmp, and the OS identification scanners
# read. There is no shell: the login shell named here does not exist on purpose.
cat >etc/passwd <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
PASSWD
cat >etc/group <<'GROUP'
root:x:0:
nonroot:x:65532:
nogroup:x:65534:
GROUP
echo 'hosts: files dns' >etc/nsswitch.conf
for f in os-release debian_version; do
  if [[ -e /etc/$f ]]; then cp -L "/etc/$f" "etc/$f"; fi
done
mkdir -p tmp root home/nonroot
chmod 1777 tmp
chmod 0700 root
chmod 0755 home/nonroot
if [[ $(id -u) -eq 0 ]]; then chown 65532:65532 home/nonroot; fi

# No shell, nothing set-uid, and the loader every binary names.
[[ ! -e bin/sh && ! -e usr/bin/sh ]] || { say "a shell slipped into the base"; exit 1; }
[[ -z "$(find . -perm /6000 -type f)" ]] || { say "set-uid/set-gid files in the base"; exit 1; }
[[ -e lib64/ld-linux-x86-64.so.2 || "$ARCH_TRIPLET" != x86_64-linux-gnu ]] || { say "no dynamic loader"; exit 1; }
say "base filesystem ready: $(du -sh . | cut -f1)"
