#!/usr/bin/env bash
# Builds the Go test tools of tests/tools/ (one Go module) into $HOSTDEV_TOOLS_BIN
# (default ~/.cache/hostdev/bin): kube-apiserver, helm, kubeconform, kubelet-harness,
# kubevirt-harness, dra-harness and dra-harness.test (its Go tests).
# Module downloads go to ~/.cache/hostdev/gomod, compiled packages to Go's build cache
# (~/.cache/go-build). A stamp keyed by the Go version and a hash of go.mod, go.sum, the Go
# sources and this script skips everything when nothing changed, so the warm path takes a second.
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/../../tests/tools"

cache=${HOSTDEV_CACHE:-$HOME/.cache/hostdev}
bin=${HOSTDEV_TOOLS_BIN:-$cache/bin}
export GOMODCACHE=$cache/gomod
# Read-only module files (Go's default) would make `rm -rf ~/.cache/hostdev` fail.
export GOFLAGS="-modcacherw -buildvcs=false"
# go.mod asks for Go 1.26; an older go (>= 1.21) fetches that toolchain from the module proxy.
export GOTOOLCHAIN=${GOTOOLCHAIN:-auto}

# The official tarball installs to /usr/local/go, which non-login shells may not have on PATH.
command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin
if ! command -v go >/dev/null; then
  echo "go-tools: 'go' not found; install Go >= 1.21 (https://go.dev/dl/; Debian 12's golang is too old)" >&2
  exit 1
fi

k8s_version=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
helm_version=$(go list -m -f '{{.Version}}' helm.sh/helm/v4)
kubeconform_version=$(go list -m -f '{{.Version}}' github.com/yannh/kubeconform)
kubevirt_version=$(go list -m -f '{{.Version}}' kubevirt.io/kubevirt)
tools="kube-apiserver helm kubeconform kubelet-harness kubevirt-harness dra-harness dra-harness.test"

key=$( {
  go version
  cat go.mod go.sum "$self"
  find . -name '*.go' -print0 | sort -z | xargs -0 cat
} | sha256sum | cut -d' ' -f1)
stamp=$bin/.stamp
all_present=1
for t in $tools; do [ -x "$bin/$t" ] || all_present=0; done
if [ "$all_present" = 1 ] && [ "$(cat "$stamp" 2>/dev/null)" = "$key" ]; then
  echo "go-tools: up to date in $bin ($tools)"
  exit 0
fi
# KubeVirt's host-device packages import libvirt.org/go/libvirt (cgo): the libvirt_dlopen tag
# builds it against the headers the module ships and loads libvirt only if called (never here),
# so kubevirt-harness needs a C compiler and libc headers but no libvirt headers or library.
if ! command -v "${CC:-gcc}" >/dev/null || [ ! -e /usr/include/stdlib.h ]; then
  . "$(dirname "$self")/../lib/apt.sh"
  apt_install go-tools gcc libc6-dev
fi
mkdir -p "$bin"
rm -f "$stamp"

step() {  # step NAME CMD... : run and print how long it took
  local name=$1 s=$SECONDS
  shift
  "$@"
  echo "go-tools: $name took $((SECONDS - s))s" >&2
}

step "download modules" go mod download
# -s -w: no symbol tables / DWARF (the binaries are ~40% smaller, nobody debugs them);
# -trimpath: build cache entries do not depend on where the repository is checked out.
ld="-s -w"
kv="-X k8s.io/component-base/version.gitVersion=$k8s_version"
kv+=" -X k8s.io/component-base/version.gitMajor=$(echo "$k8s_version" | cut -d. -f1 | tr -d v)"
kv+=" -X k8s.io/component-base/version.gitMinor=$(echo "$k8s_version" | cut -d. -f2)"
kv+=" -X k8s.io/component-base/version.gitTreeState=clean"
build() {  # build NAME PACKAGE [LDFLAGS [GO BUILD FLAGS...]]
  local name=$1 pkg=$2 ldflags=${3:-}
  shift $(($# < 3 ? $# : 3))
  step "build $name" go build -trimpath -ldflags="$ld $ldflags" "$@" -o "$bin/$name.new" "$pkg"
  mv -f "$bin/$name.new" "$bin/$name"
}
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$kv"
build helm helm.sh/helm/v4/cmd/helm "-X helm.sh/helm/v4/internal/version.version=$helm_version"
build kubeconform github.com/yannh/kubeconform/cmd/kubeconform "-X main.version=$kubeconform_version"
build kubelet-harness ./kubelet-harness "$kv"
build dra-harness ./dra-harness "$kv"
# Its Go tests as a binary, run by tests/draharness/test_go_tests.py (no Go needed at test time).
step "build dra-harness.test" go test -c -trimpath -vet=off -o "$bin/dra-harness.test.new" ./dra-harness
mv -f "$bin/dra-harness.test.new" "$bin/dra-harness.test"
CGO_ENABLED=1 build kubevirt-harness ./kubevirt-harness "" -tags libvirt_dlopen
echo "$key" > "$stamp"
echo "go-tools: built $tools into $bin (kubernetes $k8s_version, helm $helm_version," \
  "kubeconform $kubeconform_version, kubevirt $kubevirt_version)"
