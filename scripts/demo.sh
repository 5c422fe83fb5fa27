#!/usr/bin/env bash
# The main job end to end on the embedded default: the upstream-converted
# hello-world overlaybd image from ../shared/testdata/overlaybd.
#
#  1. inspect its layer blob and read /hello out of the merged disk (export);
#  2. push it to a real registry on 127.0.0.1 (Debian's docker-registry);
#  3. mount it lazily with obdctl, recording a trace with eBPF while /hello
#     is read (upstream's rule: an empty trace file records; the .pb name
#     asks for this project's format, with layer digests and times);
#  4. mount it again with a cold cache, replaying that trace, and show what
#     the replay prefetched and what reading /hello then had to fetch.
# Needs root (loop devices, FUSE, eBPF). Run through `make demo`, which
# builds bin/ and installs the dependencies first.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
shared=${OBD_SHARED_TESTDATA:-$root/../shared/testdata/overlaybd}
obdctl=$root/bin/obdctl
recorder=$root/bin/obd-recorder
layout=$shared/aci-hello-world-oci
layer=$layout/blobs/sha256/022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d
want=d3f7d10e296e5c626ea78539cb38cd8dffd043bea3627da35ce3b20c0ac68014

[ -d "$shared" ] || { echo "demo: test data not found at $shared (set OBD_SHARED_TESTDATA)" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "demo: run as root (loop devices, FUSE, eBPF)" >&2; exit 1; }
work=$(mktemp -d)
registry_pid=""
cleanup() {
  "$obdctl" umount --state-root "$work/state" "$work/mnt" 2>/dev/null || true
  if [ -n "$registry_pid" ]; then
    kill "$registry_pid" 2>/dev/null || true
    wait "$registry_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
check_hello() {
  got=$(sha256sum "$1" | cut -d' ' -f1)
  echo "sha256(/hello) = $got"
  [ "$got" = "$want" ] || { echo "demo: FAILED: want $want" >&2; exit 1; }
}
stat_field() { # file jq-less field extraction: "name": number
  { grep -o "\"$2\": [0-9.e+-]*" "$1" || true; } | head -1 | awk '{print $2}'
}

echo "== 1. the hello-world layer blob"
"$obdctl" layer inspect "$layer"
tar -xzf "$shared/ext4_64.tar.gz" -C "$work" ext4_64
"$obdctl" layer export --out "$work/disk.img" "$work/ext4_64" "$layer"
debugfs -R 'cat /hello' "$work/disk.img" 2>/dev/null > "$work/hello.out"
check_hello "$work/hello.out"
rm -f "$work/disk.img"

echo
echo "== 2. a registry on 127.0.0.1"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/registry"
cat > "$work/registry/config.yml" <<CFG
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $work/registry/storage}}
http: {addr: 127.0.0.1:$port}
CFG
docker-registry serve "$work/registry/config.yml" > "$work/registry/log" 2>&1 &
registry_pid=$!
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
ref=127.0.0.1:$port/hello-world:obd
skopeo --insecure-policy copy -q --preserve-digests --dest-tls-verify=false "oci:$layout:amd64-converted" "docker://$ref"
echo "pushed $ref"

mkdir -p "$work/mnt"
common=(--insecure --state-root "$work/state" --baselayer "$work/ext4_64" --stats-file "$work/stats.json" --log-format console)

echo
echo "== 3. mount lazily and record a trace (eBPF) while /hello is read"
: > "$work/hello.trace.pb"
"$obdctl" mount "${common[@]}" --cache-dir "$work/cache1" --trace "$work/hello.trace.pb" "$ref" "$work/mnt"
check_hello "$work/mnt/hello"
"$obdctl" umount --state-root "$work/state" "$work/mnt"
echo "fetched $(stat_field "$work/stats.json" BytesFetched) bytes of a 642560-byte layer blob; trace written:"
ls -l "$work/hello.trace.pb" "$work/hello.trace.pb.ok"
"$recorder" trace inspect "$work/hello.trace.pb"

echo
echo "== 4. mount again, cache cold, replaying the trace"
"$obdctl" mount "${common[@]}" --cache-dir "$work/cache2" --trace "$work/hello.trace.pb" "$ref" "$work/mnt"
for _ in $(seq 100); do
  t=$(stat_field "$work/stats.json" trace_done_seconds); [ -n "$t" ] && break; sleep 0.1
done
before=$(stat_field "$work/stats.json" BytesFetched)
check_hello "$work/mnt/hello"
sleep 0.3
"$obdctl" umount --state-root "$work/state" "$work/mnt"
after=$(stat_field "$work/stats.json" BytesFetched)
echo "replay prefetched $(stat_field "$work/stats.json" bytes_prefetched) bytes in ${t:-?} s; reading /hello then fetched $((after - before)) more bytes"
echo "demo: ok"
