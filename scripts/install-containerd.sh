#!/usr/bin/env bash
# Builds containerd v2 (containerd, ctr, containerd-shim-runc-v2) from the Go
# modules at the version go.mod pins, into a versioned prefix, once.
# `go install ...@version` refuses containerd (its go.mod has exclude
# directives), so the commands are built from inside this module, whose go.mod
# lists them as tools. A second run with the binaries present returns at once.
#
# Prints the bin directory on stdout.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
version=$(go list -m -f '{{.Version}}' github.com/containerd/containerd/v2)
prefix=${OBD_CONTAINERD_PREFIX:-/opt/obdtrace/containerd-$version}
cmds=(containerd ctr containerd-shim-runc-v2)

missing=0
for c in "${cmds[@]}"; do [ -x "$prefix/bin/$c" ] || missing=1; done
if [ $missing -eq 1 ]; then
  echo "install-containerd: building containerd $version into $prefix (a few minutes, once)" >&2
  tmp=$(mktemp -d "${prefix%/*}/.build-XXXXXX" 2>/dev/null || { mkdir -p "${prefix%/*}"; mktemp -d "${prefix%/*}/.build-XXXXXX"; })
  trap 'rm -rf "$tmp"' EXIT
  pkgs=()
  for c in "${cmds[@]}"; do pkgs+=("github.com/containerd/containerd/v2/cmd/$c"); done
  go build -tags no_btrfs -o "$tmp/" "${pkgs[@]}"
  mkdir -p "$prefix"
  rm -rf "$prefix/bin"
  mv "$tmp" "$prefix/bin"
  trap - EXIT
fi
echo "$prefix/bin"
