#!/usr/bin/env bash
# Overhead of `obd-recorder capture`, end to end with the real binary.
#
# fio 4k random reads (QD32, direct=1, io_uring, read-only) on a block
# device, in rounds of three runs in rotating order: capture off, capture on
# that device, capture on another device only. Each capture writes its JSON
# lines to a file on tmpfs and reports its own CPU time in its summary.
# Prints per-run figures, then the median and quartiles of the per-round
# IOPS ratios (targets: >= 0.98 on the device, >= 0.995 on another device)
# and the recorder's CPU per million events (target: <= 0.5 s).
#
# The device is a loop device over a 512 MiB file on tmpfs (the CPU-bound
# worst case), or TARGET, an existing block device such as an image device
# of `obdctl mount` (the Go benchmark BenchmarkCaptureOverhead in bpf/ sets
# one up itself).
#
# Usage: sudo [TARGET=/dev/loopN] scripts/bench-capture.sh [ROUNDS=6] [SECONDS_PER_RUN=3]
# Needs root, fio, losetup, go. Everything it creates is removed on exit.
set -euo pipefail

rounds=${1:-6}
secs=${2:-3}
[ "$(id -u)" -eq 0 ] || { echo "bench-capture: needs root (loop devices, BPF)" >&2; exit 1; }
for tool in fio losetup go; do
  command -v "$tool" >/dev/null || { echo "bench-capture: needs $tool (scripts/install-deps.sh)" >&2; exit 1; }
done

repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/bench-capture.XXXXXX)
loops=()
rec_pid=
cleanup() {
  [ -n "$rec_pid" ] && kill -9 "$rec_pid" 2>/dev/null || true
  for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null || true; done
  umount -l "$work/mnt" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

(cd "$repo" && go build -o "$work/obd-recorder" ./cmd/obd-recorder)
mkdir "$work/mnt"
mount -t tmpfs -o size=700m tmpfs "$work/mnt"
# Random data, so nothing in the stack can shortcut zero pages.
head -c $((16 << 20)) /dev/urandom >"$work/mnt/other.img"
other=$(losetup --find --show --direct-io=off "$work/mnt/other.img"); loops+=("$other")
if [ -n "${TARGET:-}" ]; then
  [ -b "$TARGET" ] || { echo "bench-capture: TARGET=$TARGET is not a block device" >&2; exit 1; }
  target=$TARGET
else
  head -c $((512 << 20)) /dev/urandom >"$work/mnt/target.img"
  target=$(losetup --find --show --direct-io=off "$work/mnt/target.img"); loops+=("$target")
fi

fio_iops() { # prints read IOPS (terse v3 field 8)
  fio --name=bench --filename="$target" --readonly --rw=randread --bs=4k --iodepth=32 --ioengine=io_uring \
    --direct=1 --time_based --runtime="$secs" --output-format=terse --terse-version=3 |
    awk -F';' '{print $8}'
}

# run MODE: one fio run; capture on the device named by MODE (off|target|other).
# Prints "IOPS EVENTS LOST CAPTURE_CPU_S TOTAL_CPU_S" (the recorder's CPU while
# attached, and in all, loading the program included).
run() {
  local mode=$1 dev
  case $mode in
    off) echo "$(fio_iops) 0 0 0 0"; return ;;
    target) dev=$target ;;
    other) dev=$other ;;
  esac
  : >"$work/stderr"
  "$work/obd-recorder" capture --device "$dev" --output "$work/mnt/out.jsonl" 2>"$work/stderr" &
  rec_pid=$!
  for _ in $(seq 200); do grep -q '"capturing"' "$work/stderr" && break; sleep 0.05; done
  grep -q '"capturing"' "$work/stderr" || { cat "$work/stderr" >&2; exit 1; }
  local iops; iops=$(fio_iops)
  kill -INT "$rec_pid"; wait "$rec_pid"; rec_pid=
  rm -f "$work/mnt/out.jsonl"
  # Summary: {"events":N,"lost":N,...,"cpu_user_s":X,"cpu_sys_s":Y,"capture_cpu_s":Z,...}
  tail -n1 "$work/stderr" | awk -v iops="$iops" '
    function num(key) { return match($0, "\"" key "\":[0-9.e-]+") ? substr($0, RSTART + length(key) + 3, RLENGTH - length(key) - 3) : 0 }
    { printf "%s %d %d %.6f %.6f\n", iops, num("events"), num("lost"), num("capture_cpu_s"), num("cpu_user_s") + num("cpu_sys_s") }'
}

echo "# $(date -u +%F) $(uname -r), $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "# $rounds rounds x 3 runs of ${secs}s; target $target, other $other"
echo "round mode iops events lost capture_cpu_s total_cpu_s"
modes=(off target other)
results="$work/results"
: >"$results"
for ((r = 0; r < rounds; r++)); do
  for ((k = 0; k < 3; k++)); do
    m=${modes[$(((k + r) % 3))]}
    line="$r $m $(run "$m")"
    echo "$line" | tee -a "$results"
  done
done

awk '
  { iops[$1, $2] = $3; if ($2 == "target") { ev += $4; cpu += $6; tot += $7 } lost += $5; n = ($1 + 1 > n) ? $1 + 1 : n }
  # quantile(a, k, p): linear interpolation between the ranks of sorted a[1..k]
  function quantile(a, k, p,   i, j, t, x) {
    for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
    x = 1 + p * (k - 1); i = int(x)
    return (i >= k) ? a[k] : a[i] + (x - i) * (a[i + 1] - a[i])
  }
  END {
    for (r = 0; r < n; r++) { t[r + 1] = iops[r, "target"] / iops[r, "off"]; o[r + 1] = iops[r, "other"] / iops[r, "off"]; off += iops[r, "off"] }
    printf "iops_off_mean %.0f\n", off / n
    printf "ratio_target_median %.4f (quartiles %.4f %.4f; target >= 0.98)\n", quantile(t, n, 0.5), quantile(t, n, 0.25), quantile(t, n, 0.75)
    printf "ratio_other_median %.4f (quartiles %.4f %.4f; target >= 0.995)\n", quantile(o, n, 0.5), quantile(o, n, 0.25), quantile(o, n, 0.75)
    printf "recorder_cpu_s_per_million_events %.3f while attached, %.3f with start-up (target <= 0.5; %d events)\n",
      (ev ? cpu * 1e6 / ev : 0), (ev ? tot * 1e6 / ev : 0), ev
    printf "lost_events %d\n", lost
  }' "$results"
