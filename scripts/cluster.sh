#!/usr/bin/env bash
# A local test control plane (etcd + kube-apiserver on 127.0.0.1, KubeVirt + hostdev CRDs),
# the same one the pytest fixture `kube_apiserver` starts (tests/fixtures/kube.py).
#   scripts/cluster.sh up     start (restarts a running one), prints `export KUBECONFIG=...`
#   scripts/cluster.sh down   stop it
# State, logs and PKI live in $HOSTDEV_CLUSTER_DIR (default ~/.cache/hostdev/cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
cmd=${1:-}
case "$cmd" in
  up | down) ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
dir=${HOSTDEV_CLUSTER_DIR:-$HOME/.cache/hostdev/cluster}
if [ "$cmd" = up ]; then
  scripts/setup.d/10-apt-kube.sh
  scripts/setup.d/20-go-tools.sh
fi
exec .venv/bin/python -m tests.fixtures.kube "$cmd" --dir "$dir"
