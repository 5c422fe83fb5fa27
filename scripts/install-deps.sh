#!/usr/bin/env bash
# Installs every system dependency of the project's build and tests, idempotently.
# A second run on a machine that has everything returns in well under a second
# for the apt part (dpkg is queried, apt is not touched).
#
# Usage: scripts/install-deps.sh            # all groups
#        scripts/install-deps.sh build test # chosen groups
set -euo pipefail

# Package groups. "build": what make build/generate need; "test": what the tests
# drive (real loop devices, fio, ext4 tools, a registry, skopeo).
declare -A groups=(
  [build]="clang llvm libbpf-dev bpftool protobuf-compiler make git"
  [test]="fio e2fsprogs skopeo docker-registry fuse3 util-linux kmod debootstrap"
  [containerd]="runc"
)

want=("$@")
[ ${#want[@]} -eq 0 ] && want=(build test containerd)

missing=()
for g in "${want[@]}"; do
  [ -n "${groups[$g]:-}" ] || { echo "install-deps: unknown group '$g' (have: ${!groups[*]})" >&2; exit 2; }
  for p in ${groups[$g]}; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$p")
    fi
  done
done

if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || { echo "install-deps: need root to install: ${missing[*]}" >&2; exit 1; }
  echo "install-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The Debian registry package starts a system service on install; the tests run
# their own registry on a free port, so a stray one is harmless but wasteful.
if systemctl is-active --quiet docker-registry 2>/dev/null; then
  systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi

# Go tools, pinned, installed into the project's bin/tools so nothing global is touched.
root=$(cd "$(dirname "$0")/.." && pwd)
tools="$root/bin/tools"
mkdir -p "$tools"
install_go_tool() { # name module@version
  [ -x "$tools/$1" ] && return 0
  echo "install-deps: go install $2" >&2
  GOBIN="$tools" go install "$2"
}
install_go_tool staticcheck honnef.co/go/tools/cmd/staticcheck@v0.8.2
install_go_tool protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
# containerd v2 and its shim, built from Go modules (quick when present).
for g in "${want[@]}"; do
  if [ "$g" = containerd ]; then
    "$root/scripts/install-containerd.sh" >/dev/null
  fi
done
echo "install-deps: ok" >&2
