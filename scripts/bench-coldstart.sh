#!/usr/bin/env bash
# The cold-start benchmark (issue #7): Debian bookworm images with python3
# and python3-numpy, and with python3 and python3-django (debootstrap from
# this machine's apt mirror, cached under /var/cache/obdtrace/testdata),
# converted with `obdctl convert`, and the upstream hello-world image, each
# started cold through an emulated 25 Mbit/s, 40 ms RTT link in four
# variants (no prefetch, trace replay, full prefetch before start, warm
# cache), ROUNDS rounds interleaved.
# Writes a table and a PNG chart per image into OUT (default docs/).
#
# Usage: scripts/bench-coldstart.sh [--rounds N] [--out DIR] [--only IMAGE]
#        (IMAGE: hello-world, python3-numpy, python3-numpy-zstd, python3-django, python3-django-zstd)
#        scripts/bench-coldstart.sh --build-image   # only build and cache the images
# Needs root (loop devices, FUSE, mount, eBPF, chroot, debootstrap).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${OBDTRACE_TEST_CACHE:-/var/cache/obdtrace/testdata}
rounds=3 out=$root/docs only="" build_only=""
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) rounds=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --build-image) build_only=1; shift ;;
    *) echo "bench-coldstart: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "bench-coldstart: run as root" >&2; exit 1; }

# apt_mirror prints the Debian mirror apt uses here (first non-security URI).
apt_mirror() {
  local uri
  uri=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

# rootfs_tar NAME PACKAGES builds (once) a bookworm minbase rootfs with the
# comma-separated PACKAGES, cached as debian-bookworm-NAME.tar, and prints
# its path.
rootfs_tar() {
  local tar=$cache/debian-bookworm-$1.tar
  if [ -s "$tar" ]; then echo "$tar"; return; fi
  mkdir -p "$cache"
  local tmp
  tmp=$(mktemp -d "$cache/rootfs.XXXXXX")
  echo "bench-coldstart: debootstrap bookworm minbase + $2 from $(apt_mirror)" >&2
  debootstrap --variant=minbase --include="$2" bookworm "$tmp/rootfs" "$(apt_mirror)" >"$tmp/log" 2>&1 ||
    { tail -30 "$tmp/log" >&2; rm -rf "$tmp"; exit 1; }
  # Nothing a benchmark reads lives in apt's download cache: leave it out.
  rm -rf "$tmp/rootfs/var/cache/apt/archives/"*.deb "$tmp/rootfs/var/lib/apt/lists/"*_Packages
  tar --numeric-owner --xattrs --xattrs-include='*' --sort=name --mtime=@0 -C "$tmp/rootfs" -cf "$tmp/rootfs.tar" .
  mv "$tmp/rootfs.tar" "$tar"
  rm -rf "$tmp"
  echo "$tar"
}

# oci_layout DIR TAR writes a one-layer OCI image layout (uncompressed tar
# layer, tag latest) for the rootfs TAR, unless DIR already holds it.
oci_layout() {
  local dir=$1 tar=$2 ld cd md
  [ -f "$dir/index.json" ] && return
  mkdir -p "$dir/blobs/sha256"
  ld=$(sha256sum "$tar" | cut -d' ' -f1)
  ln -f "$tar" "$dir/blobs/sha256/$ld" 2>/dev/null || cp "$tar" "$dir/blobs/sha256/$ld"
  printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["python3"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' "$ld" >"$dir/config"
  cd=$(sha256sum "$dir/config" | cut -d' ' -f1)
  mv "$dir/config" "$dir/blobs/sha256/$cd"
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%d}]}' \
    "$cd" "$(stat -c %s "$dir/blobs/sha256/$cd")" "$ld" "$(stat -c %s "$tar")" >"$dir/manifest"
  md=$(sha256sum "$dir/manifest" | cut -d' ' -f1)
  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%d,"annotations":{"org.opencontainers.image.ref.name":"latest"}}]}' \
    "$md" "$(stat -c %s "$dir/manifest")" >"$dir/index.json"
  mv "$dir/manifest" "$dir/blobs/sha256/$md"
  echo '{"imageLayoutVersion":"1.0.0"}' >"$dir/oci-layout"
}

obdctl=$root/bin/obdctl
if ! { [ -x "$obdctl" ] && "$obdctl" convert --help 2>/dev/null | grep -q -- --compression; }; then
  (cd "$root" && go build -o bin/obdctl ./cmd/obdctl)
fi

# image NAME PACKAGES builds the rootfs, its OCI layout and the converted
# images, once each (obdctl convert caches layers by chain id and setting,
# and the same input gives the same digests): NAME-obd in upstream's format
# (ZFile LZ4 in 4 KiB blocks) and NAME-zstd-obd (zstd in 64 KiB blocks).
image() {
  local tar src=$cache/$1-oci dst=$cache/$1-obd dst_zstd=$cache/$1-zstd-obd
  tar=$(rootfs_tar "$1" "$2")
  echo "bench-coldstart: rootfs tar $tar ($(stat -c %s "$tar") bytes)" >&2
  oci_layout "$src" "$tar"
  if [ ! -f "$dst/index.json" ]; then
    "$obdctl" convert --mkfs --log-format console "oci:$src:latest" "oci:$dst:obd" >&2
  fi
  if [ ! -f "$dst_zstd/index.json" ]; then
    "$obdctl" convert --mkfs --compression zstd --block-size 64 --log-format console "oci:$src:latest" "oci:$dst_zstd:obd" >&2
  fi
  echo "bench-coldstart: converted images in $dst and $dst_zstd; layer blobs:" >&2
  for f in "$dst"/blobs/sha256/* "$dst_zstd"/blobs/sha256/*; do
    if [ "$(stat -c %s "$f")" -gt 1048576 ]; then ls -l "$f" >&2; fi
  done
}
# python3 importing numpy and a set of standard modules; a Django
# application answering its first request.
image python3-numpy python3,python3-numpy
image python3-django python3,python3-django
[ -n "$build_only" ] && exit 0

# The benchmark: every image, the four variants interleaved per round. The
# tables land in $out/coldstart-*.md (for docs/benchmarks.md) and the charts
# in $out/coldstart-*.png.
bench=ColdStart
[ -n "$only" ] && bench="$bench/^$only\$"
cd "$root"
OBDTRACE_COLDSTART=1 OBDTRACE_COLDSTART_CACHE=$cache OBDTRACE_COLDSTART_ROUNDS=$rounds OBDTRACE_COLDSTART_OUT=$out \
  go test -run '^$' -bench "^Benchmark${bench}" -benchtime 1x -timeout 90m ./internal/coldstart
for f in "$out"/coldstart-*.md; do echo; cat "$f"; done
