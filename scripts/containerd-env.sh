#!/usr/bin/env bash
# A throwaway containerd with obd-snapshotter registered as a proxy snapshot
# plugin, everything under one temporary directory: for tests and for trying
# the snapshotter out without touching the machine's containerd.
#
#   scripts/containerd-env.sh start [DIR]   start both; print containerd's socket
#   scripts/containerd-env.sh restart-snapshotter DIR
#   scripts/containerd-env.sh stop DIR      remove containers and tasks, stop both
#                                           (by the PIDs start recorded), tear
#                                           down image servers, remove DIR
#   scripts/containerd-env.sh env DIR       print shell exports for ctr / obdctl
#
# Then, for example:
#   eval "$(scripts/containerd-env.sh env "$DIR")"
#   ctr run --rm --snapshotter overlaybd IMAGE c1
#
# Environment:
#   OBD_SNAPSHOTTER_BIN   obd-snapshotter to run (default: built into DIR/bin)
#   OBD_SNAPSHOTTER_NAME  proxy plugin name (default: overlaybd)
#   CONTAINERD_BIN_DIR    containerd, ctr, shim (default: scripts/install-containerd.sh)
#   OBD_KEEP=1            stop leaves DIR in place
#   OBD_* settings of the snapshotter (OBD_REGISTRY_INSECURE=host:port,
#   OBD_BASELAYER=...) are passed through; see docs/snapshotter.md.
# Needs root (mounts, loop devices, FUSE).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
name=${OBD_SNAPSHOTTER_NAME:-overlaybd}

die() { echo "containerd-env: $*" >&2; exit 1; }

bin_dir() {
  if [ -n "${CONTAINERD_BIN_DIR:-}" ]; then echo "$CONTAINERD_BIN_DIR"; else "$repo/scripts/install-containerd.sh"; fi
}

platform() {
  case $(uname -m) in
    x86_64) echo linux/amd64 ;;
    aarch64) echo linux/arm64 ;;
    *) echo "linux/$(uname -m)" ;;
  esac
}

# wait_socket PATH PID LOG: until PATH is a socket, or the process died.
wait_socket() {
  for _ in $(seq 1 200); do
    [ -S "$1" ] && return 0
    kill -0 "$2" 2>/dev/null || { tail -n 20 "$3" >&2; die "process $2 exited; log: $3"; }
    sleep 0.05
  done
  die "no socket at $1 after 10s; log: $3"
}

start_snapshotter() {
  local dir=$1 sbin=${OBD_SNAPSHOTTER_BIN:-$dir/bin/obd-snapshotter}
  if [ -z "${OBD_SNAPSHOTTER_BIN:-}" ] && [ ! -x "$sbin" ]; then
    (cd "$repo" && go build -o "$dir/bin/" ./cmd/obd-snapshotter) || die "go build obd-snapshotter failed"
  fi
  rm -f "$dir/snapshotter.sock"
  # setsid: a Ctrl-C in the calling shell must not reach the daemon.
  setsid "$sbin" --root "$dir/snapshotter" --address "$dir/snapshotter.sock" --log-format json \
    >>"$dir/snapshotter.log" 2>&1 </dev/null &
  echo $! >"$dir/snapshotter.pid"
  wait_socket "$dir/snapshotter.sock" "$(cat "$dir/snapshotter.pid")" "$dir/snapshotter.log"
}

write_config() {
  local dir=$1 plat
  plat=$(platform)
  cat >"$dir/containerd.toml" <<EOF
version = 3
root = "$dir/containerd/root"
state = "$dir/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.blockfile", "io.containerd.snapshotter.v1.erofs"]

[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"

[proxy_plugins.$name]
  type = "snapshot"
  address = "$dir/snapshotter.sock"
  [proxy_plugins.$name.exports]
    # ctr pull (the transfer service) then passes the image reference and
    # manifest digest as labels, as CRI pulls do.
    enable_remote_snapshot_annotations = "true"

[plugins."io.containerd.transfer.v1.local"]
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "$plat"
    snapshotter = "overlayfs"
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "$plat"
    snapshotter = "$name"
EOF
}

start() {
  [ "$(id -u)" -eq 0 ] || die "needs root"
  local dir=${1:-}
  if [ -z "$dir" ]; then dir=$(mktemp -d /tmp/obd-containerd.XXXXXX); fi
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  [ -f "$dir/containerd.pid" ] && kill -0 "$(cat "$dir/containerd.pid")" 2>/dev/null && die "already running in $dir"
  local cbin
  cbin=$(bin_dir)
  echo "$cbin" >"$dir/bin-dir"
  start_snapshotter "$dir"
  write_config "$dir"
  rm -f "$dir/containerd.sock"
  PATH="$cbin:$PATH" setsid "$cbin/containerd" --config "$dir/containerd.toml" \
    >>"$dir/containerd.log" 2>&1 </dev/null &
  echo $! >"$dir/containerd.pid"
  wait_socket "$dir/containerd.sock" "$(cat "$dir/containerd.pid")" "$dir/containerd.log"
  echo "$dir/containerd.sock"
}

# stop_pid FILE: SIGTERM the PID in FILE, SIGKILL after 10s.
stop_pid() {
  [ -f "$1" ] || return 0
  local pid
  pid=$(cat "$1")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$1"
}

# remove_workloads DIR: kill and delete every task and container, in every
# namespace, so the shims exit and the snapshots go.
remove_workloads() {
  local dir=$1 cbin ctr ns
  [ -S "$dir/containerd.sock" ] || return 0
  cbin=$(cat "$dir/bin-dir")
  ctr=("$cbin/ctr" --address "$dir/containerd.sock")
  for ns in $("${ctr[@]}" namespaces list -q 2>/dev/null); do
    for t in $("${ctr[@]}" -n "$ns" tasks list -q 2>/dev/null); do
      "${ctr[@]}" -n "$ns" tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true
    done
    for t in $("${ctr[@]}" -n "$ns" tasks list -q 2>/dev/null); do
      for _ in $(seq 1 50); do
        "${ctr[@]}" -n "$ns" tasks delete "$t" >/dev/null 2>&1 && break
        sleep 0.1
      done
    done
    for c in $("${ctr[@]}" -n "$ns" containers list -q 2>/dev/null); do
      "${ctr[@]}" -n "$ns" containers delete "$c" >/dev/null 2>&1 || true
    done
  done
}

stop() {
  local dir=${1:?usage: containerd-env.sh stop DIR}
  [ -d "$dir" ] || die "$dir: no such directory"
  dir=$(cd "$dir" && pwd)
  remove_workloads "$dir"
  stop_pid "$dir/containerd.pid"
  stop_pid "$dir/snapshotter.pid"
  local sbin=${OBD_SNAPSHOTTER_BIN:-$dir/bin/obd-snapshotter}
  if [ -x "$sbin" ]; then
    "$sbin" stop-servers --root "$dir/snapshotter" --log-format json >>"$dir/snapshotter.log" 2>&1 ||
      echo "containerd-env: stop-servers failed; see $dir/snapshotter.log" >&2
  fi
  # Whatever is still mounted below DIR (a killed shim's rootfs), deepest first.
  awk -v d="$dir/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done
  if [ "${OBD_KEEP:-0}" != 1 ]; then rm -rf "$dir"; fi
}

env_exports() {
  local dir=${1:?usage: containerd-env.sh env DIR}
  dir=$(cd "$dir" && pwd)
  echo "export CONTAINERD_ADDRESS=$dir/containerd.sock"
  echo "export CONTAINERD_SNAPSHOTTER=$name"
  echo "export PATH=$(cat "$dir/bin-dir"):\$PATH"
}

case ${1:-} in
  start) start "${2:-}" ;;
  stop) stop "${2:-}" ;;
  restart-snapshotter)
    dir=${2:?usage: containerd-env.sh restart-snapshotter DIR}
    dir=$(cd "$dir" && pwd)
    stop_pid "$dir/snapshotter.pid"
    start_snapshotter "$dir"
    ;;
  env) env_exports "${2:-}" ;;
  *) die "usage: $0 start [DIR] | stop DIR | restart-snapshotter DIR | env DIR" ;;
esac
