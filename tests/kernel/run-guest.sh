#!/usr/bin/env bash
# shellcheck disable=SC2054  # commas inside QEMU option strings are intended
# tests/kernel/run-guest.sh - boot ONE throw-away QEMU guest with a real Debian kernel, an
# emulated Intel VT-d IOMMU (DMA + interrupt remapping) and the PCI topology the kernel tier
# tests against, run one command in it as root, copy its output and exit status back.
# Two guests: the system's QEMU + newest installed kernel (Debian 12: QEMU 7.2, Linux 6.1), or
# with -B bookworm-backports' QEMU 10 + Linux 6.12, unpacked privately under
# $HOSTDEV_CACHE/bpo by scripts/setup.d/35-bpo-kernel.sh (nothing installed on the system).
# Adapted for hostdev from the workplace reference (../shared/reference/run-guest-test.sh).
#
# Guest PCI topology (TCG):
#   NVMe PF with SR-IOV (sriov_max_vfs=4)  behind a pxb-pcie on NUMA node 0, own group
#   e1000e                                  behind a pxb-pcie on NUMA node 1, own group
#   virtio-net                              root port on pcie.0, own group (plain device)
#   e1000e 2-function device (no ACS)       one group of 2
#   pcie-pci-bridge + 2 x e1000             one group of 3 (bridge + 2 NICs)
#   NVMe controller with a 16 MB namespace  root port on pcie.0, own group (a disk to mount)
#   igb (82576) PF, 7 VFs (igbvf)           behind the NUMA node 1 pxb-pcie; QEMU >= 8.0 (-B) only
# Guest root = the host's / over read-only 9p with a tmpfs overlay (host python + venvs run
# unchanged); cwd = the host cwd; /run/rk = the run directory on the host; RK_GUEST=1.
#
# usage: run-guest.sh [-B] [-t SECS] [-m MB] [-o RUNDIR] [-v] [--] COMMAND...   (run via bash -c)
#        run-guest.sh [-B] -C   check prerequisites only (exit 0 + versions, or 125 + the reason)
# Exit status: the guest command's; 124 on timeout; 125 when the harness itself cannot run.
# Env: HOSTDEV_CACHE (default ~/.cache/hostdev: initramfs cache in rk/, backports tree in bpo/),
# RK_HOME (run directories, default ${TMPDIR:-/tmp}/hostdev-rk), RK_TB_MB (TCG cache, 256),
# RK_APPEND (more kernel arguments).
# Packages come from scripts/setup.d/30-apt-kernel.sh and 35-bpo-kernel.sh (this installs nothing).
set -uo pipefail

CACHE=${HOSTDEV_CACHE:-$HOME/.cache/hostdev}
RK_HOME=${RK_HOME:-${TMPDIR:-/tmp}/hostdev-rk}
TIMEOUT=600 MEM=512 CPUS=2 RUN='' VERBOSE=0 CHECK=0 BPO=0
die() { echo "run-guest: $*" >&2; exit 125; }
while getopts "Bt:m:o:vCh" o; do
  case $o in
    B) BPO=1;; t) TIMEOUT=$OPTARG;; m) MEM=$OPTARG;; o) RUN=$OPTARG;; v) VERBOSE=1;; C) CHECK=1;;
    *) sed -n '3,28p' "$0" >&2; exit 125;;
  esac
done
shift $((OPTIND-1))

# ---- 1. prerequisites (each missing one named, with its fix) --------------------------------
FIX="install with: sudo scripts/setup.d/30-apt-kernel.sh"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found ($FIX)"
{ [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; } || die "no static /bin/busybox ($FIX)"
command -v cpio >/dev/null || die "cpio not found ($FIX)"
command -v modprobe >/dev/null || die "modprobe not found ($FIX)"
QEMU=qemu-system-x86_64 QEMU_L=() MODROOT=''   # MODROOT: where the guest kernel's lib/modules is
if [ "$BPO" = 1 ]; then
  MODROOT=$CACHE/bpo
  FIX="unpack it with: scripts/setup.d/35-bpo-kernel.sh"
  [ -x "$MODROOT/usr/bin/qemu-system-x86_64" ] || die "no backports QEMU under $MODROOT ($FIX)"
  QEMU=$MODROOT/usr/bin/qemu-system-x86_64
  export LD_LIBRARY_PATH=$MODROOT/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  # its firmware (bios-256k.bin, option ROMs) first, the system's second
  QEMU_L=(-L "$MODROOT/usr/share/qemu" -L "$MODROOT/usr/share/seabios" -L /usr/share/qemu -L /usr/share/seabios)
fi
KVER=$(for k in "$MODROOT"/boot/vmlinuz-*; do v=${k##*/vmlinuz-}; [ -d "$MODROOT/lib/modules/$v" ] && echo "$v"; done | sort -V | tail -1)
[ -n "$KVER" ] || die "no $MODROOT/boot/vmlinuz-* with modules in $MODROOT/lib/modules ($FIX)"
KIMG=$MODROOT/boot/vmlinuz-$KVER
[ -r "$KIMG" ] || die "kernel image $KIMG is not readable (run as root)"
[ -s "$MODROOT/lib/modules/$KVER/modules.dep" ] || die "no modules.dep for $KVER under $MODROOT/lib/modules ($FIX)"
QV=$("$QEMU" --version 2>&1 | head -1) || die "$QEMU does not run: $QV"
[ "$(id -u)" = 0 ] || die "must run as root (9p passthrough of / and the kernel image)"
HAS_IGB=0; "$QEMU" -device igb,help 2>&1 | grep -q '^igb options' && HAS_IGB=1
if [ "$CHECK" = 1 ]; then echo "run-guest: ready: $QV, kernel $KVER, igb $HAS_IGB"; exit 0; fi
[ $# -gt 0 ] || die "no command given (see -h)"
mkdir -p "$CACHE/rk" "$RK_HOME/runs" || die "cannot create $CACHE/rk or $RK_HOME/runs"
T0=$(date +%s.%N)
since() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
note() { echo "[rk +$(since)s] $*" >&2; }

# ---- 2. accelerator: KVM only when it is a real VMX/SVM KVM (nested PVM cannot boot stock) ---
if [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo && [ ! -d /sys/module/kvm_pvm ]; then
  ACC=(-accel kvm -cpu host -machine q35,kernel-irqchip=split) ACCEL=kvm
else
  ACC=(-accel "tcg,thread=multi,tb-size=${RK_TB_MB:-256}" -cpu max -machine q35) ACCEL=tcg
fi

# ---- 3. initramfs: static busybox + the modules to mount 9p and overlay ---------------------
INIT=$(cat <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
say() { echo "rk-init: $*" > /dev/console; }
bye() { poweroff -f; sleep 5; echo o > /proc/sysrq-trigger; }   # the host kills QEMU if this hangs
# For the host's hang report (sysrq keys through the monitor), and hung tasks named within 60 s.
echo 1 > /proc/sys/kernel/sysrq; echo 60 > /proc/sys/kernel/hung_task_timeout_secs
say "kernel up at $(cut -d' ' -f1 /proc/uptime)s"
while read -r m; do insmod "$m" 2>/dev/null || say "insmod $m failed"; done < /modules.order
O="trans=virtio,version=9p2000.L,msize=262144"
mount -t 9p -o $O,cache=none rkout /out || { say "FATAL: cannot mount run dir"; bye; }
fail() { say "FATAL: $*"; echo 125 > /out/rc; bye; }
mount -t 9p -o $O,ro,cache=loose rkroot /host || fail "9p root mount"
mount -t tmpfs -o mode=755 tmpfs /upper && mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/host,upperdir=/upper/u,workdir=/upper/w /newroot || fail "overlay mount"
R=/newroot
mount -t proc proc $R/proc; mount -t sysfs sysfs $R/sys; mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm $R/run $R/tmp
mount -t devpts devpts $R/dev/pts; mount -t tmpfs tmpfs $R/dev/shm; mount -t tmpfs tmpfs $R/run
# No tmpfs over /tmp: a checkout (and its venv) under the host's /tmp, as CI clones may be,
# must stay visible; the overlay's tmpfs upper layer already makes /tmp writable.
mkdir -p $R/run/rk && mount --bind /out $R/run/rk
. /out/env
KV=$(uname -r)   # a kernel that is not the host's: its modules from the private tree
if [ -n "$RK_MODDIR" ] && [ "$RK_MODDIR" != "/lib/modules/$KV" ]; then
  mkdir -p $R/lib/modules/$KV && mount --bind $R$RK_MODDIR $R/lib/modules/$KV || fail "module dir bind"
fi
hostname rk-guest
export SYSTEMD_IGNORE_CHROOT=1   # else udevadm settle says "Running in chroot, ignoring request."
if chroot $R test -x /lib/systemd/systemd-udevd; then   # real udev: module autoload, /dev perms
  chroot $R /lib/systemd/systemd-udevd --daemon --resolve-names=never
  chroot $R /bin/udevadm trigger --type=devices --action=add --subsystem-match=pci
  chroot $R /bin/udevadm settle --timeout=120 || say "udevadm settle timed out"
else                                  # no udev: coldplug by modalias
  chroot $R /sbin/modprobe -qa $(cat /sys/bus/pci/devices/*/modalias 2>/dev/null | sort -u)
fi
say "userspace ready at $(cut -d' ' -f1 /proc/uptime)s, running command"
( chroot $R /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root TERM=dumb LANG=C.UTF-8 RK_GUEST=1 SYSTEMD_IGNORE_CHROOT=1 /bin/sh -c 'cd "$1" 2>/dev/null || cd /; exec /bin/bash /run/rk/cmd.sh </dev/null' sh "$RK_CWD"
  echo $? > /out/rc ) 2>&1 | tee /out/output.log > /dev/console
say "command finished rc=$(cat /out/rc) at $(cut -d' ' -f1 /proc/uptime)s"
bye
EOF
)
MODS=""
for m in virtio_pci 9pnet_virtio 9p overlay; do
  MODS+=$(modprobe -d "${MODROOT:-/}" -S "$KVER" --show-depends "$m" 2>/dev/null | awk '$1=="insmod"{print $2}')$'\n'
done
MODS=$(printf '%s' "$MODS" | awk 'NF && !seen[$0]++')
[ -n "$MODS" ] || die "modprobe --show-depends found no 9p/overlay modules for $KVER"
SUM=$( { echo "$INIT"; echo "$MODS"; echo "$KVER"; } | sha1sum | cut -c1-12)
IRD=$CACHE/rk/initramfs-$KVER-$SUM.cpio.gz
if [ ! -s "$IRD" ]; then
  note "building $IRD"
  W=$(mktemp -d "$CACHE/rk/ir.XXXXXX") || die mktemp
  mkdir -p "$W"/{bin,proc,sys,dev,host,out,upper,newroot,lib/modules}
  cp /bin/busybox "$W/bin/busybox" && printf '%s\n' "$INIT" > "$W/init" && chmod 755 "$W/init"
  : > "$W/modules.order"
  while read -r f; do
    b=$(basename "$f"); b=${b%.xz}; b=${b%.zst}; b=${b%.gz}; dst=$W/lib/modules/$b
    case $f in *.xz) xz -dc "$f" > "$dst";; *.zst) zstd -qdc "$f" > "$dst";; *.gz) gzip -dc "$f" > "$dst";; *) cp "$f" "$dst";; esac
    echo "/lib/modules/$b" >> "$W/modules.order"
  done <<< "$MODS"
  (cd "$W" && find . | cpio -o -H newc --quiet | gzip -1 > "$IRD.$$") && mv "$IRD.$$" "$IRD" || die "cpio failed"
  rm -rf "$W"
fi

# ---- 4. run directory, command ---------------------------------------------------------------
RUN=${RUN:-$RK_HOME/runs/$(date +%Y%m%d-%H%M%S)-$$}
mkdir -p "$RUN" && rm -f "$RUN"/{rc,output.log,console.log}
printf '%s\n' "$*" > "$RUN/cmd.sh"
printf 'RK_CWD=%q\nRK_MODDIR=%q\n' "$PWD" "${MODROOT:+$MODROOT/lib/modules/$KVER}" > "$RUN/env"

# ---- 5. devices ------------------------------------------------------------------------------
DEV=(-device intel-iommu,intremap=on)   # must come before the PCI devices
DEV+=(-fsdev "local,id=fsroot,path=/,security_model=none,readonly=on,multidevs=remap"
      -device virtio-9p-pci,fsdev=fsroot,mount_tag=rkroot,bus=pcie.0,addr=0x2
      -fsdev "local,id=fsout,path=$RUN,security_model=none"
      -device virtio-9p-pci,fsdev=fsout,mount_tag=rkout,bus=pcie.0,addr=0x3)
rp=0; port() { rp=$((rp+1)); local bus=${1:-pcie.0} a; a=0x$(printf %x $((rp+3)))
  [ "$bus" != pcie.0 ] && a=0x$(printf %x $rp)
  DEV+=(-device "pcie-root-port,id=rp$rp,bus=$bus,chassis=$rp,addr=$a"); }
M0=$((MEM / 2)); M1=$((MEM - M0))
NUMA_ARGS=(-object "memory-backend-ram,id=mem0,size=${M0}M" -object "memory-backend-ram,id=mem1,size=${M1}M"
           -numa "node,nodeid=0,memdev=mem0,cpus=0" -numa "node,nodeid=1,memdev=mem1,cpus=1")
DEV+=(-device pxb-pcie,id=pxb0,bus_nr=64,numa_node=0,bus=pcie.0,addr=0x10
      -device pxb-pcie,id=pxb1,bus_nr=128,numa_node=1,bus=pcie.0,addr=0x11)
port pxb0; DEV+=(-device nvme-subsys,id=nvmess0,nqn=nqn.2024-01.io.hostdev:subsys0
            -device "nvme,id=nvme0,bus=rp$rp,serial=rkpf0,subsys=nvmess0,sriov_max_vfs=4,sriov_vq_flexible=8,sriov_vi_flexible=4")
if [ "$HAS_IGB" = 1 ]; then
  port pxb1; DEV+=(-device "igb,bus=rp$rp")
fi
port pxb1; DEV+=(-device "e1000e,bus=rp$rp")
port; DEV+=(-device "virtio-net-pci,bus=rp$rp")
port; DEV+=(-device "e1000e,bus=rp$rp,addr=0.0,multifunction=on" -device "e1000e,bus=rp$rp,addr=0.1")
port; DEV+=(-device "pcie-pci-bridge,id=pbr,bus=rp$rp" -device e1000,bus=pbr,addr=1 -device e1000,bus=pbr,addr=2)
truncate -s 16M "$RUN/disk0.img" || die "cannot create $RUN/disk0.img"   # sparse: a disk to mount
port; DEV+=(-drive "file=$RUN/disk0.img,if=none,id=disk0,format=raw" -device "nvme,bus=rp$rp,serial=rkdisk0,drive=disk0")

# no_timer_check: under TCG on a loaded host the IO-APIC timer check can fail and panic the boot
# ("timer doesn't work through Interrupt-remapped IO-APIC"; about one boot in six without it).
# lapic=notscdeadline nohz=off highres=off: a periodic local-APIC tick, which QEMU re-arms by
# itself. With the default one-shot (TSC-deadline) tick, a timer interrupt lost under TCG on a
# loaded host left a CPU asleep for good ("rcu: ... Possible timer handling issue on cpu=0");
# once both CPUs were, the guest froze without a word until the run's timeout (CI, 3 Dec).
CMDLINE="console=ttyS0 quiet intel_iommu=on iommu=pt panic=-1 no_timer_check"
CMDLINE+=" lapic=notscdeadline nohz=off highres=off ${RK_APPEND:-}"
CON=(-serial "file:$RUN/console.log")
[ "$VERBOSE" = 1 ] && CON=(-chardev "stdio,id=c0,logfile=$RUN/console.log,signal=off" -serial chardev:c0)
note "qemu: $QV, accel=$ACCEL, kernel=$KVER, igb=$HAS_IGB, mem=${MEM}M, run dir $RUN"
T1=$(date +%s.%N)
MON=$RUN/monitor.sock
timeout -k 5 "$((TIMEOUT + 60))" "$QEMU" "${QEMU_L[@]}" -nodefaults -no-reboot -display none \
  -monitor "unix:$MON,server=on,wait=off" \
  "${ACC[@]}" -m "$MEM" -smp "$CPUS" "${NUMA_ARGS[@]}" "${CON[@]}" \
  -kernel "$KIMG" -initrd "$IRD" -append "$CMDLINE" "${DEV[@]}" \
  < /dev/null > "$RUN/qemu.log" 2>&1 &
QPID=$!
trap 'kill "$QPID" 2>/dev/null; exit 125' INT TERM HUP
trap 'kill "$QPID" 2>/dev/null' EXIT
END=$((SECONDS + TIMEOUT)) DONE_AT='' TIMED_OUT=0
# hmp CMD...: each QEMU monitor command's answer, from the monitor socket.
hmp() {
  "${RK_PYTHON:-python3}" - "$MON" "$@" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(20); s.connect(sys.argv[1])
def until_prompt():
    buf = b""
    while not buf.endswith(b"(qemu) "):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace")
until_prompt()
for cmd in sys.argv[2:]:
    s.sendall(cmd.encode() + b"\n")
    print(f"### {cmd}\n{until_prompt().removesuffix('(qemu) ')}")
PY
}
# On a timeout, before QEMU is killed: where each vCPU is (twice, 10 s apart: a frozen guest
# shows the same instruction pointers), and the guest kernel's own account of every blocked task
# and every CPU (sysrq w and l, console log level 9), so a hang is explained, not just reported.
hang_report() {
  local f=$RUN/hang-report.txt
  note "guest still running after ${TIMEOUT}s: collecting a hang report ($f)"
  { hmp "info status" "info cpus" "info registers -a"
    hmp "sendkey alt-sysrq-9" "sendkey alt-sysrq-w" "sendkey alt-sysrq-l"
    sleep 10
    hmp "info cpus" "info registers -a"; } > "$f" 2>&1
  grep -E '^(### info cpus|\*? *CPU #|RIP=)' "$f" | sed 's/^/[hang] /' >&2
}
while kill -0 "$QPID" 2>/dev/null; do
  if [ -s "$RUN/rc" ]; then          # command finished: allow 15 s for a clean power-off
    DONE_AT=${DONE_AT:-$SECONDS}
    if [ $((SECONDS - DONE_AT)) -ge 15 ]; then
      note "guest finished but did not power off within 15s; killing QEMU"; kill "$QPID"; break
    fi
  elif [ "$SECONDS" -ge "$END" ]; then TIMED_OUT=1; hang_report; kill "$QPID"; break
  fi
  sleep 0.5
done
wait "$QPID"; QRC=$?
[ "$TIMED_OUT" = 1 ] && QRC=124
GT=$(awk -v a="$T1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
[ -s "$RUN/qemu.log" ] && grep -v 'has no peer' "$RUN/qemu.log" | sed 's/^/[qemu] /' >&2
[ -f "$RUN/output.log" ] && cat "$RUN/output.log"
if [ "$QRC" = 124 ] || [ "$QRC" = 137 ]; then
  note "TIMEOUT after ${TIMEOUT}s (guest ran ${GT}s); hang report in $RUN/hang-report.txt; console tail:"
  tail -60 "$RUN/console.log" >&2; exit 124
fi
if [ ! -s "$RUN/rc" ]; then
  note "guest gave no exit status (qemu rc=$QRC); console tail:"; tail -30 "$RUN/console.log" >&2; exit 125
fi
RC=$(cat "$RUN/rc")
note "guest command exit status $RC; qemu wall time ${GT}s; artefacts in $RUN"
exit "$RC"
