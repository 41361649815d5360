# Sourced by scripts/setup.d/*: install Debian packages that are missing, as a fresh CI machine
# needs. apt-get update runs only when the lists do not know a package, or once more when an
# install fails on stale lists (a fresh image's lists may be old: 404 on superseded versions).
apt_install() {  # apt_install TAG PACKAGE...
  local tag=$1; shift
  if [ "$(id -u)" -ne 0 ]; then
    echo "$tag: missing $*; run as root or: sudo apt-get install -y --no-install-recommends $*" >&2
    return 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-cache show "$@" >/dev/null 2>&1; then
    timeout 300 apt-get update -q
  fi
  # --no-install-recommends: only what the tests use (no initramfs-tools, firmware, docs).
  if ! timeout 900 apt-get install -y -q --no-install-recommends "$@"; then
    timeout 300 apt-get update -q
    timeout 900 apt-get install -y -q --no-install-recommends "$@"
  fi
  echo "$tag: installed $*"
}
