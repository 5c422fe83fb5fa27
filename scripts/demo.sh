#!/usr/bin/env bash
# The main job end to end on the embedded default: the upstream-converted
# hello-world overlaybd image from ../shared/testdata/overlaybd.
#
# Today it inspects the image's layer blob, merges it onto the ext4 baselayer,
# exports the virtual disk as a sparse file and reads /hello out of it with
# debugfs, checking its sha256. Run through `make demo`, which builds bin/ and
# installs the dependencies first.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
shared=${OBD_SHARED_TESTDATA:-$root/../shared/testdata/overlaybd}
obdctl=$root/bin/obdctl
layer=$shared/aci-hello-world-oci/blobs/sha256/022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d
want=d3f7d10e296e5c626ea78539cb38cd8dffd043bea3627da35ce3b20c0ac68014

[ -d "$shared" ] || { echo "demo: test data not found at $shared (set OBD_SHARED_TESTDATA)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== the hello-world layer blob"
"$obdctl" layer inspect "$layer"

echo
echo "== merge it onto the ext4 baselayer and export the 64 GiB disk (sparse)"
tar -xzf "$shared/ext4_64.tar.gz" -C "$work" ext4_64
"$obdctl" layer export --out "$work/disk.img" "$work/ext4_64" "$layer"
echo "apparent size $(du -h --apparent-size "$work/disk.img" | cut -f1), on disk $(du -h "$work/disk.img" | cut -f1)"

echo
echo "== read /hello from the disk with debugfs"
debugfs -R 'ls -l /' "$work/disk.img" 2>/dev/null
got=$(debugfs -R 'cat /hello' "$work/disk.img" 2>/dev/null | sha256sum | cut -d' ' -f1)
echo "sha256(/hello) = $got"
if [ "$got" != "$want" ]; then
  echo "demo: FAILED: want $want" >&2
  exit 1
fi
echo "demo: ok, /hello matches the original image"
