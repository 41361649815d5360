"""Ready-made fake hosts for tests, benchmarks and ``hostdev scan --host-root`` demos.

Each function builds one realistic node under ``root`` and returns its :class:`FakeHost`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from hostdev.testing.fakesysfs import FakeHost

# Real ids (pci.ids): Intel E810-C and its VF, NVIDIA A10 + HDMI audio, A100, Samsung NVMe.
E810 = ("8086", "1592", "1889")
A10, A10_AUDIO, A100 = "2236", "1aef", "20b5"
NVME = ("144d", "a80a")


def _platform(h: FakeHost) -> None:
    """Host bridge, a root port and a boot NVMe on its host driver: present on every node."""
    h.add_device("0000:00:00.0", vendor="8086", device="09a2", class_code="060000", numa=0)
    h.add_bridge("0000:00:1c.0", numa=0)
    h.add_device(
        "0000:01:00.0",
        vendor=NVME[0],
        device=NVME[1],
        class_code="010802",
        driver="nvme",
        numa=0,
    )


def _nvidia(
    h: FakeHost, addr: str, device: str, *, group: int, numa: int, driver: str = "vfio-pci"
) -> None:
    cls = "040300" if device == A10_AUDIO else "030200"
    h.add_device(
        addr, vendor="10de", device=device, class_code=cls, driver=driver, group=group, numa=numa
    )


def _a10_with_audio(
    h: FakeHost, audio_driver: str = "vfio-pci", *, bus: str = "17", numa: int = 0
) -> None:
    """An A10 at <bus>:00.0 and its HDMI audio function at <bus>:00.1, sharing one group."""
    g = h.new_group()
    _nvidia(h, f"0000:{bus}:00.0", A10, group=g, numa=numa)
    _nvidia(h, f"0000:{bus}:00.1", A10_AUDIO, group=g, numa=numa, driver=audio_driver)


def _a100_pair_behind_switch(h: FakeHost, bus: int, numa: int) -> None:
    """A PCIe switch without ACS at <bus>: its ports and two A100s (<bus+2>, <bus+3>) in one group
    (bridges do not count against viability)."""
    g = h.new_group()
    h.add_bridge(f"0000:{bus:02x}:00.0", group=g, numa=numa)  # switch upstream port
    h.add_bridge(f"0000:{bus + 1:02x}:00.0", group=g, numa=numa)  # downstream port 1
    h.add_bridge(f"0000:{bus + 1:02x}:01.0", group=g, numa=numa)  # downstream port 2
    _nvidia(h, f"0000:{bus + 2:02x}:00.0", A100, group=g, numa=numa)
    _nvidia(h, f"0000:{bus + 3:02x}:00.0", A100, group=g, numa=numa)


def sriov_nic_dual_socket(root: Path | str, *, numvfs: int = 4, iommufd: bool = False) -> FakeHost:
    """Two sockets; an E810 with 2 PFs on socket 0 and one on socket 1; VFs on vfio-pci."""
    h = FakeHost(Path(root), iommufd=iommufd)
    _platform(h)
    for addr, numa, name in (
        ("0000:3b:00.0", 0, "ens1f0"),
        ("0000:3b:00.1", 0, "ens1f1"),
        ("0000:86:00.0", 1, "ens2f0"),
    ):
        offset = 0x10 + (0x40 if addr.endswith(".1") else 0)
        h.add_pf(
            addr,
            vendor=E810[0],
            device=E810[1],
            vf_device=E810[2],
            numvfs=numvfs,
            numa=numa,
            netdev=name,
            vf_offset=offset,
        )
    return h


def gpu_with_audio(root: Path | str) -> FakeHost:
    """A GPU and its HDMI audio function in one group, both on vfio-pci: viable, 2 members."""
    h = FakeHost(Path(root))
    _platform(h)
    h.add_bridge("0000:00:01.0", numa=0)
    _a10_with_audio(h)
    return h


def two_gpus_with_audio(root: Path | str) -> FakeHost:
    """Two A10s, each with its HDMI audio function in its own group: 17:00.0/.1 on NUMA 0,
    65:00.0/.1 on NUMA 1, all on vfio-pci (two units of two functions)."""
    h = FakeHost(Path(root))
    _platform(h)
    _a10_with_audio(h)
    _a10_with_audio(h, bus="65", numa=1)
    return h


def gpus_behind_switch_without_acs(root: Path | str, *, switches: int = 1) -> FakeHost:
    """Two identical GPUs behind a PCIe switch without ACS: one group holding both GPUs and
    the switch ports (bridges do not count against viability). ``switches`` > 1 adds more such
    switches (buses 0x40, 0x80, ...), alternating NUMA nodes 1, 0, ..."""
    h = FakeHost(Path(root))
    _platform(h)
    for i in range(switches):
        _a100_pair_behind_switch(h, 0x40 * (i + 1), numa=(i + 1) % 2)
    return h


def single_function_gpus(root: Path | str, *, count: int = 2) -> FakeHost:
    """``count`` A100s, each alone in its group (buses 0x21, 0x22, ...): single-function units."""
    h = FakeHost(Path(root))
    _platform(h)
    for i in range(count):
        _nvidia(h, f"0000:{0x21 + i:02x}:00.0", A100, group=h.new_group(), numa=0)
    return h


def group_member_on_host_driver(root: Path | str) -> FakeHost:
    """A GPU on vfio-pci whose audio function is still on snd_hda_intel: group not viable."""
    h = FakeHost(Path(root))
    _platform(h)
    _a10_with_audio(h, audio_driver="snd_hda_intel")
    return h


def iommu_off(root: Path | str) -> FakeHost:
    """The same kind of server with VT-d off: no groups, no vfio, nothing assignable."""
    h = FakeHost(Path(root), iommu=None, vfio_loaded=False)
    _platform(h)
    h.add_device(
        "0000:17:00.0", vendor="10de", device=A10, class_code="030200", driver="nvidia", numa=0
    )
    h.add_pf(
        "0000:3b:00.0",
        vendor=E810[0],
        device=E810[1],
        vf_device=E810[2],
        numvfs=0,
        numa=0,
        netdev="ens1f0",
    )
    return h


def sriov_scale(root: Path | str, *, pfs: int = 8, vfs: int = 128) -> FakeHost:
    """``pfs`` E810 PFs with ``vfs`` VFs each on vfio-pci (benchmarks: 8x128, 16x256)."""
    h = FakeHost(Path(root))
    _platform(h)
    for i in range(pfs):
        bus = 0x10 + i * 2
        h.add_pf(
            f"0000:{bus:02x}:00.0",
            vendor=E810[0],
            device=E810[1],
            vf_device=E810[2],
            totalvfs=max(vfs, 256),
            numvfs=vfs,
            numa=i % 2,
            netdev=f"ens{i + 1}f0",
            vf_offset=0x80 if vfs <= 128 else 0x100,
        )
    return h


def demo(root: Path | str) -> FakeHost:
    """Everything above on one node (for ``hostdev scan --host-root`` demos)."""
    h = sriov_nic_dual_socket(root, numvfs=2)
    _a10_with_audio(h)
    g = h.new_group()
    h.add_bridge("0000:40:00.0", group=g, numa=1)
    _nvidia(h, "0000:42:00.0", A100, group=g, numa=1)
    _nvidia(h, "0000:43:00.0", A100, group=g, numa=1, driver="nvidia")
    return h


SCENARIOS: dict[str, Callable[[Path], FakeHost]] = {
    "sriov-nic-dual-socket": sriov_nic_dual_socket,
    "gpu-with-audio": gpu_with_audio,
    "two-gpus-with-audio": two_gpus_with_audio,
    "single-function-gpus": single_function_gpus,
    "gpus-behind-switch-without-acs": gpus_behind_switch_without_acs,
    "group-member-on-host-driver": group_member_on_host_driver,
    "iommu-off": iommu_off,
    "sriov-8x128": sriov_scale,
    "demo": demo,
}


def main() -> None:
    """``python -m hostdev.testing.scenarios NAME DIR``: write a scenario tree (for demos)."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("name", choices=sorted(SCENARIOS))
    p.add_argument("dir", type=Path)
    args = p.parse_args()
    SCENARIOS[args.name](args.dir)
    print(args.dir)


if __name__ == "__main__":
    main()
