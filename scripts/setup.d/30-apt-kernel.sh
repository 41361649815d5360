#!/usr/bin/env bash
# Debian packages for the real-kernel test tier (tests/kernel): QEMU (q35 + intel-iommu + NVMe
# SR-IOV need QEMU >= 7.1; bookworm has 7.2), a stock Debian kernel + its modules for the guest,
# a static busybox + cpio for the guest's tiny initramfs, kmod (modprobe --show-depends),
# pciutils (lspci + pci.ids). Installs only what is missing; `apt-get update` only when needed.
set -euo pipefail
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
{ [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; } || missing+=(busybox-static)
command -v cpio >/dev/null || missing+=(cpio)
command -v modprobe >/dev/null || missing+=(kmod)
command -v xz >/dev/null || missing+=(xz-utils)
command -v zstd >/dev/null || missing+=(zstd)
command -v lspci >/dev/null || missing+=(pciutils)
have_kernel=0
for k in /boot/vmlinuz-*; do
  [ -e "$k" ] && [ -d "/lib/modules/${k#/boot/vmlinuz-}" ] && have_kernel=1
done
[ "$have_kernel" = 1 ] || missing+=(linux-image-amd64)
if [ ${#missing[@]} -eq 0 ]; then
  echo "apt-kernel: $(qemu-system-x86_64 --version | head -1), kernel(s) $(ls /lib/modules | tr '\n' ' ')present"
  exit 0
fi
. "$(dirname "$0")/../lib/apt.sh"
apt_install apt-kernel "${missing[@]}"
