"""Mediated devices: discovery and planning on a fake node of 64 parents x 16 instances, and
create/remove rates of the node agent on a real kernel (the mtty sample in the QEMU guest of
tests/kernel). Prints figures only.

    .venv/bin/python bench/mdev.py [--repeat N]            # fake tree: discovery, plan, scan
    .venv/bin/python bench/mdev.py --kernel [--count N]    # boots the guest, runs --in-guest
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from contextlib import redirect_stdout
from pathlib import Path

from timing import timed

from hostdev.cli import main as cli
from hostdev.deviceplugin.mdev import MdevOwner, sysfs_write
from hostdev.host.mdev import discover_mdev, instance_dir, type_dir
from hostdev.host.sysfs import Sysfs
from hostdev.policy.mdev import MdevSpec, instance_health, plan_mdevs
from hostdev.testing.fakemdev import FakeMdev, FakeType
from hostdev.testing.fakesysfs import FakeHost

ROOT = Path(__file__).resolve().parents[1]


def ms(xs: list[float]) -> str:
    xs = sorted(xs)
    p99 = xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]
    return f"p50 {statistics.median(xs) * 1e3:8.2f} ms  p99 {p99 * 1e3:8.2f} ms"


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def fake(repeat: int, parents: int = 64, per_parent: int = 16) -> None:
    with tempfile.TemporaryDirectory() as d:
        h = FakeHost(Path(d))
        m = FakeMdev(h)
        owned: dict[str, str] = {}
        n = 0
        for p in range(parents):
            addr = f"0000:{0x10 + p:02x}:00.0"
            h.add_device(addr, vendor="10de", device="13f2", class_code="030000", driver="nvidia")
            m.add_parent(
                addr,
                [FakeType("nvidia-35", name="GRID M60-2Q"), FakeType("nvidia-36", cost=2)],
                per_parent * 2,
                pci=True,
            )
            for _ in range(per_parent):
                n += 1
                uuid = f"{n:08x}-0000-4000-8000-000000000000"
                m.add_instance(addr, "nvidia-35", uuid)
                owned[uuid] = "nvidia.com/m60"
        inv = discover_mdev(d)
        print(f"fake node: {len(inv.parents)} parents x {per_parent} instances = "
              f"{len(inv.instances)} instances; {load()}")  # fmt: skip
        print(f"  discover (sysfs read)     {ms(timed(lambda: discover_mdev(d), repeat))}")
        wants = {"nvidia.com/m60": MdevSpec("nvidia-35", parents * per_parent)}
        print(
            "  plan (steady state)       "
            + ms(timed(lambda: plan_mdevs(wants, inv, owned, {}), repeat))
        )
        more = {"nvidia.com/m60": MdevSpec("nvidia-35", parents * per_parent * 2)}
        print(
            f"  plan (+{parents * per_parent} creates)      "
            + ms(timed(lambda: plan_mdevs(more, inv, owned, {}), repeat))
        )
        print(
            "  health of every instance  "
            + ms(timed(lambda: [instance_health(u, inv) for u in inv.instances], repeat))
        )

        def scan() -> None:
            with redirect_stdout(io.StringIO()):
                cli(["scan", "--host-root", d, "--json"])

        print(f"  hostdev scan --json       {ms(timed(scan, max(3, repeat // 4)))}")


def in_guest(count: int, rounds: int) -> None:
    """Runs in the QEMU guest as root: mtty loaded, the agent's own create/remove passes."""
    release = os.uname().release
    ko = (
        Path(os.environ.get("HOSTDEV_CACHE", "/root/.cache/hostdev")) / "mdev" / release / "mtty.ko"
    )
    subprocess.run(["modprobe", "-a", "vfio-pci", "mdev", "vfio_iommu_type1"], check=True)
    subprocess.run(["insmod", str(ko)], check=True)
    try:
        with tempfile.TemporaryDirectory() as state:
            owner = MdevOwner(Sysfs("/"), state)
            spec = {"example.com/mtty": MdevSpec("mtty-1", count)}
            creates, removes = [], []
            for _ in range(rounds):
                t = time.perf_counter()
                r = owner.reconcile(spec)
                creates.append(time.perf_counter() - t)
                assert len(r.created) == count, r
                t = time.perf_counter()
                r = owner.reconcile({})
                removes.append(time.perf_counter() - t)
                assert len(r.removed) == count, r
            # The kernel's own share: bare writes to create/remove, no agent around them.
            raw_c, raw_r = [], []
            tdir = type_dir("/", "mtty", "mtty-1")
            for _ in range(rounds):
                uuids = [str(uuidlib.uuid4()) for _ in range(count)]
                t = time.perf_counter()
                for u in uuids:
                    sysfs_write(f"{tdir}/create", u)
                raw_c.append(time.perf_counter() - t)
                t = time.perf_counter()
                for u in uuids:
                    sysfs_write(f"{instance_dir('/', u)}/remove", "1")
                raw_r.append(time.perf_counter() - t)
        c, rm = statistics.median(creates), statistics.median(removes)
        print(f"real kernel {release} (TCG guest), mtty-1 x {count}, {rounds} rounds; {load()}")
        print(f"  create pass: median {c:.3f} s = {count / c:7.1f} instances/s "
              f"(incl. discovery, open-fd scan, state file fsync per instance)")  # fmt: skip
        print(f"  remove pass: median {rm:.3f} s = {count / rm:7.1f} instances/s")
        rc, rr = statistics.median(raw_c), statistics.median(raw_r)
        print(f"  bare sysfs writes (the kernel's share): create {count / rc:7.1f}/s, "
              f"remove {count / rr:7.1f}/s")  # fmt: skip
    finally:
        subprocess.run(["rmmod", "mtty"], check=False)


def kernel(count: int, rounds: int, bpo: bool) -> None:
    cmd = f"{sys.executable} bench/mdev.py --in-guest --count {count} --rounds {rounds}"
    t = time.monotonic()
    out = subprocess.run(
        ["bash", str(ROOT / "tests/kernel/run-guest.sh"), *(["-B"] if bpo else []), "--", cmd],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [ln for ln in out.stdout.splitlines() if not ln.startswith("[rk")]
    print("\n".join(lines) or out.stderr[-2000:])
    print(f"  (guest boot to power-off {time.monotonic() - t:.0f} s; host {load()})")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--kernel", action="store_true", help="create/remove rates in the QEMU guest")
    p.add_argument("--backports", action="store_true", help="with --kernel: the 6.12 guest")
    p.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    if args.in_guest:
        in_guest(args.count, args.rounds)
    elif args.kernel:
        kernel(args.count, args.rounds, args.backports)
    else:
        fake(args.repeat)


if __name__ == "__main__":
    main()
