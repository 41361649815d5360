#!/usr/bin/env bash
# The kernel tier's mediated devices: the kernel's own vfio-mdev sample drivers (mtty, mdpy),
# built out of tree for each guest kernel the tier boots (the system's /boot kernel and the
# backports one unpacked by 35-bpo-kernel.sh) into ${HOSTDEV_CACHE:-~/.cache/hostdev}/mdev/<kver>/.
# Sources: the samples from the matching Debian linux-source-<series> package, built against
# that kernel's linux-headers packages; both are downloaded and unpacked privately (nothing is
# installed on the system). Idempotent: a kernel whose modules are built is skipped (warm path
# well under a second). Needs gcc, make and the Debian mirror apt already uses.
set -euo pipefail
cache=${HOSTDEV_CACHE:-$HOME/.cache/hostdev}
M=$cache/mdev A=$cache/bpo-apt
kvers=()
for k in /boot/vmlinuz-* "$cache"/bpo/boot/vmlinuz-*; do
  [ -e "$k" ] && kvers+=("${k##*/vmlinuz-}")
done
[ ${#kvers[@]} -gt 0 ] || { echo "mdev-samples: no guest kernel found (run 30-apt-kernel.sh, 35-bpo-kernel.sh)" >&2; exit 1; }
todo=()
for kver in "${kvers[@]}"; do
  [ -s "$M/$kver/mtty.ko" ] || todo+=("$kver")
done
if [ ${#todo[@]} -eq 0 ]; then
  echo "mdev-samples: $(cd "$M" && ls -d */ | tr -d / | tr '\n' ' ')built in $M"
  exit 0
fi
missing=()
command -v gcc >/dev/null || missing+=(gcc)
command -v make >/dev/null || missing+=(make)
command -v xz >/dev/null || missing+=(xz-utils)
if [ ${#missing[@]} -gt 0 ]; then
  . "$(dirname "$0")/../lib/apt.sh"
  apt_install mdev-samples "${missing[@]}"
fi
# The private apt configuration of 35-bpo-kernel.sh (base suites + backports): run it first.
[ -s "$A/sources.list" ] || { echo "mdev-samples: $A/sources.list missing: run 35-bpo-kernel.sh first" >&2; exit 1; }
AO=(-o Dir::Etc::SourceList="$A/sources.list" -o Dir::Etc::SourceParts="$A/parts"
    -o Dir::State::Lists="$A/lists" -o Dir::Cache="$A/cache" -o APT::Sandbox::User="$(id -un)"
    -o Debug::NoLocking=1)
ls "$A"/lists/*Packages* >/dev/null 2>&1 || timeout 300 apt-get "${AO[@]}" update -q >&2
for kver in "${todo[@]}"; do
  t0=$(date +%s)
  abi=${kver%-amd64}                        # 6.1.0-57 | 6.12.95+deb12
  series=$(echo "$kver" | cut -d. -f1,2)    # 6.1 | 6.12
  # The image's package version names the matching headers and source.
  if [ -e "/boot/vmlinuz-$kver" ]; then
    ver=$(dpkg-query -W -f='${Version}' "linux-image-$kver" 2>/dev/null || true)
    kbuild=linux-kbuild-$series
  else
    ver=$(sed -n "s/^linux-image-$kver=//p" "$cache/bpo/.hostdev-bpo")
    kbuild=linux-kbuild-$abi
  fi
  pkgs=("linux-headers-$kver=$ver" "linux-headers-$abi-common=$ver" "$kbuild=$ver")
  if apt-cache "${AO[@]}" show "linux-source-$series=$ver" >/dev/null 2>&1; then
    pkgs+=("linux-source-$series=$ver")
  else
    pkgs+=("linux-source-$series")   # the series' newest: the samples change little within one
  fi
  work=$(mktemp -d "$cache/mdev.new.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && timeout 900 apt-get "${AO[@]}" download "${pkgs[@]}" >&2)
  for d in "$work"/linux-headers-*.deb "$work"/linux-kbuild-*.deb; do dpkg-deb -x "$d" "$work/root"; done
  mkdir -p "$work/src"
  # Only samples/vfio-mdev/ out of the source tarball (xz: the whole stream is read once).
  dpkg-deb --fsys-tarfile "$work"/linux-source-*.deb \
    | tar -xO --wildcards '*/usr/src/linux-source-*.tar.xz' \
    | xz -dc | tar -x -C "$work/src" --wildcards '*/samples/vfio-mdev/*' --strip-components=3
  rm -f "$work"/*.deb
  # The flavour's Makefile includes the common tree by absolute path: point it at ours.
  sed -i "s#/usr/src/#$work/root/usr/src/#g" "$work/root/usr/src/linux-headers-$kver/Makefile"
  printf 'obj-m := mtty.o mdpy.o\n' > "$work/src/Kbuild"
  # CONFIG_DEBUG_INFO_BTF_MODULES= : 6.12's headers would run pahole on the modules otherwise.
  make -s -C "$work/root/usr/src/linux-headers-$kver" M="$work/src" \
    CONFIG_DEBUG_INFO_BTF_MODULES= modules >&2
  mkdir -p "$M/$kver.new"
  cp "$work"/src/*.ko "$M/$kver.new/"
  echo "$kver ${pkgs[*]}" > "$M/$kver.new/.hostdev-mdev"
  rm -rf "${M:?}/$kver" && mv "$M/$kver.new" "$M/$kver"
  rm -rf "$work" && trap - EXIT
  echo "mdev-samples: built $(cd "$M/$kver" && ls ./*.ko | tr '\n' ' ')for $kver in $(( $(date +%s) - t0 ))s"
done
