#!/usr/bin/env bash
# The kernel tier's second guest (tests/kernel): QEMU 10 (its `igb` is an SR-IOV NIC PF, 82576,
# 7 VFs) and Linux 6.12 from bookworm-backports, unpacked privately under
# ${HOSTDEV_CACHE:-~/.cache/hostdev}/bpo (nothing is installed on the system, no apt source is
# added). A private apt configuration (lists and downloads under .../bpo-apt) resolves what a
# real install would need that this system lacks, downloads only those .debs and unpacks them.
# Idempotent: a stamp names the unpacked versions; the warm path takes well under a second.
# Needs the Debian mirror the system's apt already uses. Adapted from the workplace reference
# (run-guest-test.sh -B).
set -euo pipefail
cache=${HOSTDEV_CACHE:-$HOME/.cache/hostdev}
B=$cache/bpo A=$cache/bpo-apt
stamp=$B/.hostdev-bpo
if [ -s "$stamp" ] && [ -x "$B/usr/bin/qemu-system-x86_64" ] && ls "$B"/boot/vmlinuz-* >/dev/null 2>&1; then
  echo "bpo-kernel: $(tr '\n' ' ' < "$stamp")in $B"
  exit 0
fi
for tool in apt-get dpkg-deb depmod; do
  command -v "$tool" >/dev/null || { echo "bpo-kernel: $tool not found (Debian's apt, dpkg, kmod)" >&2; exit 1; }
done
# The mirror apt already uses (deb822 .sources or a one-line sources.list).
mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[ -n "$mirror" ] || mirror=$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$mirror" ] || { echo "bpo-kernel: no Debian mirror found in /etc/apt/sources.list{,.d}" >&2; exit 1; }
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$A/parts"
rm -rf "$A/debs" && mkdir -p "$A/debs"
# The base suites resolve the dependencies backports packages share with bookworm.
{ cat /etc/apt/sources.list 2>/dev/null || true
  echo "deb [signed-by=$keyring] $mirror bookworm-backports main"; } > "$A/sources.list"
rm -f "$A"/parts/*; cp /etc/apt/sources.list.d/*.sources "$A/parts/" 2>/dev/null || true
AO=(-o Dir::Etc::SourceList="$A/sources.list" -o Dir::Etc::SourceParts="$A/parts"
    -o Dir::State::Lists="$A/lists" -o Dir::Cache="$A/cache" -o APT::Sandbox::User="$(id -un)"
    -o Debug::NoLocking=1)
t0=$(date +%s)
timeout 300 apt-get "${AO[@]}" update -q >&2
# What a real install would fetch on this system; download only those.
pkgs=$(timeout 120 apt-get "${AO[@]}" -s install -t bookworm-backports --no-install-recommends \
       qemu-system-x86 linux-image-amd64 | awk '/^Inst /{print $2}')
[ -n "$pkgs" ] || { echo "bpo-kernel: could not resolve qemu-system-x86 + linux-image-amd64 from backports" >&2; exit 1; }
# shellcheck disable=SC2086  # one word per package
(cd "$A/debs" && timeout 900 apt-get "${AO[@]}" download -t bookworm-backports $pkgs >&2)
# Unpack into a fresh tree, then swap it in: an interrupted run leaves no half tree behind.
tmp=$(mktemp -d "$cache/bpo.new.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
for d in "$A"/debs/*.deb; do dpkg-deb -x "$d" "$tmp"; done
[ -x "$tmp/usr/bin/qemu-system-x86_64" ] || { echo "bpo-kernel: no qemu-system-x86_64 in the unpacked packages" >&2; exit 1; }
for v in "$tmp"/lib/modules/*; do depmod -b "$tmp" "${v##*/}"; done   # modules.dep + modules.alias
for d in "$A"/debs/*.deb; do dpkg-deb --show --showformat='${Package}=${Version}\n' "$d"; done \
  | grep -E '^(qemu-system-x86|linux-image-[0-9])' > "$tmp/.hostdev-bpo"
rm -rf "$B" && mv "$tmp" "$B" && trap - EXIT
rm -rf "$A/debs"   # the unpacked tree is the cache; the .debs are not needed again
echo "bpo-kernel: unpacked $(tr '\n' ' ' < "$stamp")into $B in $(( $(date +%s) - t0 ))s"
