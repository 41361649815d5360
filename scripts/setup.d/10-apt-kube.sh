#!/usr/bin/env bash
# Debian packages for the real-API-server test tier (tests/kube): etcd (Debian 12 ships 3.4,
# which kube-apiserver's etcd3 storage still talks to) and openssl (throw-away test PKI).
# Installs only what is missing; `apt-get update` runs only when a package is not yet known.
set -euo pipefail
missing=()
command -v etcd >/dev/null || missing+=(etcd-server)
command -v openssl >/dev/null || missing+=(openssl)
if [ ${#missing[@]} -eq 0 ]; then
  echo "apt-kube: etcd $(etcd --version | sed -n 's/^etcd Version: //p'), openssl present"
  exit 0
fi
. "$(dirname "$0")/../lib/apt.sh"
apt_install apt-kube "${missing[@]}"
# The package's systemd unit starts a system etcd on :2379; tests run their own on free ports,
# so stop it where systemd is running (in a container there is none and nothing started).
if [ -d /run/systemd/system ]; then
  systemctl disable --now etcd >/dev/null 2>&1 || true
fi
