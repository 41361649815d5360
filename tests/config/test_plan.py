"""Table-driven planner tests: every transition and every refusal, on fake sysfs trees."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from hostdev.host.address import PciAddress
from hostdev.host.sysfs import Sysfs
from hostdev.policy.guards import GuardFacts
from hostdev.policy.nodeconfig import parse_node_config
from hostdev.policy.plan import plan
from hostdev.testing.fakesysfs import FakeHost

A = PciAddress.parse
NIC = "0000:05:00.0"  # plain NIC on e1000e, netdev eno1
GPU, AUDIO = "0000:17:00.0", "0000:17:00.1"
PF = "0000:3b:00.0"  # E810 PF (ice), netdev ens1f0, VFs at 3b:02.x
VF0, VF1 = "0000:3b:02.0", "0000:3b:02.1"
DISK = "0000:01:00.0"  # boot NVMe


def node(root: Path, *, iommu: bool = True, vfio: bool = True, numvfs: int = 2) -> FakeHost:
    h = FakeHost(root, iommu="intel" if iommu else None, vfio_loaded=vfio)
    h.add_device("0000:00:00.0", vendor="8086", device="09a2", class_code="060000")
    h.add_device(DISK, vendor="144d", device="a80a", class_code="010802", driver="nvme")
    h.add_device(
        NIC, vendor="8086", device="10d3", class_code="020000", driver="e1000e", netdev="eno1"
    )
    g = h.new_group() if iommu else None
    h.add_device(GPU, vendor="10de", device="2236", class_code="030200", driver="nvidia", group=g)
    h.add_device(
        AUDIO, vendor="10de", device="1aef", class_code="040300", driver="snd_hda_intel", group=g
    )
    h.add_pf(
        PF, vendor="8086", device="1592", vf_device="1889", totalvfs=8, numvfs=numvfs,
        vf_driver="iavf", netdev="ens1f0", vf_offset=0x10,
    )  # fmt: skip
    return h


@dataclass
class Case:
    id: str
    spec: dict[str, Any]
    expect: list[str] = field(default_factory=list)  # "kind addr value|expect"
    refused: list[str] = field(default_factory=list)  # substrings, one per refusal
    overridable: bool | None = None
    pending: bool = False
    originals: Mapping[str, str | None] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    tree: Callable[[FakeHost], None] | None = None
    build: dict[str, Any] = field(default_factory=dict)
    autoprobe: Mapping[str, bool] = field(default_factory=dict)  # remembered by hostdev
    busy: tuple[str, ...] = ()  # devices whose reads time out (the device lock is held)
    held: int | None = None  # steps the (first) refusal holds back


def steps_of(p: Any) -> list[str]:
    out = []
    for s in p.steps:
        tail = s.expect if s.kind == "probe" else s.value
        out.append(f"{s.kind} {s.address}" + (f" {tail}" if tail else ""))
    return out


def autoprobe_off(h: FakeHost) -> None:
    (h.device_dir(PF) / "sriov_drivers_autoprobe").write_text("0\n")


def vfs_unbound(h: FakeHost) -> None:
    autoprobe_off(h)
    h.bind(VF0, None)
    h.bind(VF1, None)


def vfs_on_vfio(h: FakeHost) -> None:
    h.bind(VF0, "vfio-pci")
    h.bind(VF1, "vfio-pci")


ON_VFIO = {A(VF0): "vfio-pci", A(VF1): "vfio-pci"}
HELD = {"/dev/vfio/6": ("pid 9 (qemu-kvm)",)}
VF_RULE = {"selector": {"pfNames": ["ens1f0#0-1"]}, "resourceName": "example.com/vf"}
RESTORE_VF1 = [
    f"driver-override {VF1}",
    f"unbind {VF1} vfio-pci",
    f"probe {VF1} iavf",
    f"forget {VF1}",
]

BIND_NIC = [
    f"remember {NIC} e1000e",
    f"driver-override {NIC} vfio-pci",
    f"unbind {NIC} e1000e",
    f"probe {NIC} vfio-pci",
]

CASES = [
    # ---- transitions ------------------------------------------------------------------------
    Case("bind-plain-device", {"devices": [{"pciAddress": NIC}]}, BIND_NIC),
    Case(
        "already-bound-is-converged",
        {"devices": [{"pciAddress": NIC}]},
        [],
        tree=lambda h: h.bind(NIC, "vfio-pci"),
        originals={NIC: "e1000e"},
    ),
    Case(
        "vfio-variant-driver-satisfies-vfio-pci",
        {"devices": [{"pciAddress": NIC}]},
        [],
        tree=lambda h: h.bind(NIC, "mlx5_vfio_pci"),
    ),
    Case(
        "driverless-device-binds-without-unbind",
        {"devices": [{"pciAddress": NIC}]},
        [f"remember {NIC}", f"driver-override {NIC} vfio-pci", f"probe {NIC} vfio-pci"],
        tree=lambda h: h.bind(NIC, None),
    ),
    Case(
        "numvfs-from-zero",
        {"pfs": [{"pciAddress": PF, "numVfs": 4}]},
        [f"set-numvfs {PF} 4"],
        pending=True,
        build={"numvfs": 0},
    ),
    Case(
        "numvfs-change-goes-through-zero-and-forgets-vfs",
        {"pfs": [{"pfName": "ens1f0", "numVfs": 4}]},
        [f"set-numvfs {PF} 0", f"forget {VF0}", f"set-numvfs {PF} 4"],
        pending=True,
        originals={VF0: "iavf"},
        tree=lambda h: h.bind(VF0, "vfio-pci"),
    ),
    Case(
        "numvfs-to-zero",
        {"pfs": [{"pciAddress": PF, "numVfs": 0}]},
        [f"set-numvfs {PF} 0"],
        pending=True,
    ),
    Case("numvfs-unchanged", {"pfs": [{"pciAddress": PF, "numVfs": 2}]}, []),
    Case(
        "restore-to-original",
        {},
        [
            f"driver-override {NIC}",
            f"unbind {NIC} vfio-pci",
            f"probe {NIC} e1000e",
            f"forget {NIC}",
        ],
        originals={NIC: "e1000e"},
        tree=lambda h: h.bind(NIC, "vfio-pci"),
        facts={"driver_overrides": {A(NIC): "vfio-pci"}},
    ),
    Case(
        "restore-to-no-driver",
        {},
        [f"driver-override {VF0}", f"unbind {VF0} vfio-pci", f"forget {VF0}"],
        originals={VF0: None},
        tree=lambda h: h.bind(VF0, "vfio-pci"),
        facts={"driver_overrides": {A(VF0): "vfio-pci"}},
    ),
    Case("already-restored-forget-only", {}, [f"forget {NIC}"], originals={NIC: "e1000e"}),
    Case(
        "crash-left-override-on-host-driver",
        {},
        [f"driver-override {NIC}", f"forget {NIC}"],
        originals={NIC: "e1000e"},
        facts={"driver_overrides": {A(NIC): "vfio-pci"}},
    ),
    Case(
        "crash-left-device-unbound-with-override",
        {"devices": [{"pciAddress": NIC}]},
        [f"probe {NIC} vfio-pci"],
        originals={NIC: "e1000e"},
        tree=lambda h: h.bind(NIC, None),
        facts={"driver_overrides": {A(NIC): "vfio-pci"}},
    ),
    Case(
        "gone-device-is-forgotten",
        {},
        ["forget 0000:99:00.0"],
        originals={"0000:99:00.0": "ixgbe"},
    ),
    Case(
        "group-companion-bound-too",
        {"devices": [{"pciAddress": GPU, "resourceName": "example.com/a10"}]},
        [
            f"remember {GPU} nvidia",
            f"driver-override {GPU} vfio-pci",
            f"unbind {GPU} nvidia",
            f"probe {GPU} vfio-pci",
            f"remember {AUDIO} snd_hda_intel",
            f"driver-override {AUDIO} vfio-pci",
            f"unbind {AUDIO} snd_hda_intel",
            f"probe {AUDIO} vfio-pci",
        ],
    ),
    Case(
        "crash-left-companion-unbound-is-finished",
        {"devices": [{"pciAddress": GPU}]},
        [f"probe {AUDIO} vfio-pci"],
        originals={GPU: "nvidia", AUDIO: "snd_hda_intel"},
        tree=lambda h: (h.bind(GPU, "vfio-pci"), h.bind(AUDIO, None)),
        facts={"driver_overrides": {A(GPU): "vfio-pci", A(AUDIO): "vfio-pci"}},
    ),
    Case(
        "companion-on-pci-stub-left-alone",
        {"devices": [{"pciAddress": GPU}]},
        [
            f"remember {GPU} nvidia",
            f"driver-override {GPU} vfio-pci",
            f"unbind {GPU} nvidia",
            f"probe {GPU} vfio-pci",
        ],
        tree=lambda h: h.bind(AUDIO, "pci-stub"),
    ),
    Case(
        "pin-moves-device-back-to-host-driver",
        {"devices": [{"pciAddress": NIC, "driver": "e1000e"}]},
        [f"unbind {NIC} vfio-pci", f"probe {NIC} e1000e"],
        originals={NIC: "e1000e"},
        tree=lambda h: h.bind(NIC, "vfio-pci"),
        facts={"driver_overrides": {A(NIC): "e1000e"}},
    ),
    Case(
        "selector-picks-vfs-by-pf-name-and-range",
        {"devices": [{"selector": {"pfNames": ["ens1f0#1"]}, "resourceName": "example.com/vf"}]},
        [
            f"remember {VF1} iavf",
            f"driver-override {VF1} vfio-pci",
            f"unbind {VF1} iavf",
            f"probe {VF1} vfio-pci",
        ],
    ),
    Case(
        "unsafe-override-lets-a-routed-nic-go",
        {"devices": [{"pciAddress": NIC, "allowUnsafe": True}]},
        BIND_NIC,
        facts={"default_route_ifaces": frozenset({"eno1"})},
    ),
    # ---- refusals ---------------------------------------------------------------------------
    Case(
        "iommu-off",
        {"devices": [{"pciAddress": NIC}]},
        refused=["the IOMMU is off on this node"],
        overridable=False,
        build={"iommu": False, "vfio": False},
    ),
    Case(
        "vfio-pci-not-loaded",
        {"devices": [{"pciAddress": NIC}]},
        refused=["the vfio-pci driver is not loaded: run `modprobe vfio-pci`"],
        build={"vfio": False},
    ),
    Case(
        "default-route",
        {"devices": [{"pciAddress": NIC}]},
        refused=[f"{NIC} carries the default route (via eno1)"],
        overridable=True,
        facts={"default_route_ifaces": frozenset({"eno1"})},
    ),
    Case(
        "address-on-up-interface",
        {"devices": [{"pciAddress": NIC}]},
        refused=[f"{NIC} has an address on an up interface (eno1: 10.0.0.0/24 (connected route))"],
        overridable=True,
        facts={"addressed_ifaces": {"eno1": ("10.0.0.0/24 (connected route)",)}},
    ),
    Case(
        "mounted-filesystem",
        {"devices": [{"pciAddress": DISK}]},
        refused=[f"{DISK} hosts a mounted filesystem (nvme0n1p2 on /)"],
        overridable=True,
        facts={"mounts": {A(DISK): ("nvme0n1p2 on /",)}},
    ),
    Case(
        "host-driver-nodes-held-open",
        {"devices": [{"pciAddress": DISK}]},
        refused=[f"{DISK}'s device nodes are held open (/dev/nvme0 by pid 7 (smartd))"],
        overridable=True,
        facts={
            "device_nodes": {A(DISK): ("/dev/nvme0", "/dev/nvme0n1")},
            "open_nodes": {"/dev/nvme0": ("pid 7 (smartd)",)},
        },
    ),
    Case(
        "restore-refused-while-vfio-group-open",
        {},
        refused=["/dev/vfio/3 is held open by pid 9 (qemu-kvm) (a running VM owns the group)"],
        overridable=False,
        originals={NIC: "e1000e"},
        tree=lambda h: h.bind(NIC, "vfio-pci"),
        facts={"open_nodes": {"/dev/vfio/3": ("pid 9 (qemu-kvm)",)}},
    ),
    Case(
        "restore-refused-while-iommufd-cdev-open",
        {},
        refused=["/dev/vfio/devices/vfio0 is held open by pid 9 (qemu-kvm) (a running VM owns"],
        overridable=False,
        originals={NIC: "e1000e"},
        tree=lambda h: h.bind(NIC, "vfio-pci"),
        facts={
            "device_nodes": {A(NIC): ("/dev/vfio/devices/vfio0",)},
            "open_nodes": {"/dev/vfio/devices/vfio0": ("pid 9 (qemu-kvm)",)},
        },
    ),
    Case(
        "restore-from-another-host-driver-refused-when-busy",
        {},
        refused=[f"{NIC} carries the default route (via eno1)"],
        overridable=False,
        originals={NIC: "e1000e"},
        tree=lambda h: h.bind(NIC, "igb"),
        facts={"default_route_ifaces": frozenset({"eno1"})},
    ),
    Case(
        "numvfs-change-refused-while-vf-group-open",
        {"pfs": [{"pciAddress": PF, "numVfs": 4, "allowUnsafe": True}]},
        refused=[f"VF {VF0} is in use: /dev/vfio/6 is held open by pid 9 (qemu-kvm)"],
        overridable=False,
        tree=lambda h: h.bind(VF0, "vfio-pci"),
        facts={"open_nodes": {"/dev/vfio/6": ("pid 9 (qemu-kvm)",)}},
    ),
    Case(
        "group-with-pinned-companion",
        {"devices": [{"pciAddress": GPU}, {"pciAddress": AUDIO, "driver": "snd_hda_intel"}]},
        refused=[f"also holds {AUDIO}, which must stay on host driver snd_hda_intel"],
        overridable=False,
    ),
    Case(
        "unsafe-companion-blocks-whole-group",
        {"devices": [{"pciAddress": GPU}]},
        refused=[f"group 4 ({GPU}, {AUDIO}): refused to bind to vfio-pci: {AUDIO}'s device nodes"],
        overridable=True,
        facts={
            "device_nodes": {A(AUDIO): ("/dev/snd/pcmC0D3p",)},
            "open_nodes": {"/dev/snd/pcmC0D3p": ("pid 5 (pipewire)",)},
        },
    ),
    Case(
        "numvfs-above-total",
        {"pfs": [{"pciAddress": PF, "numVfs": 9}]},
        refused=["numVfs 9 is above sriov_totalvfs 8"],
        overridable=False,
    ),
    Case(
        "pf-without-driver",
        {"pfs": [{"pciAddress": PF, "numVfs": 4}]},
        refused=["the PF has no driver"],
        tree=lambda h: h.bind(PF, None),
    ),
    Case(
        "pf-carries-default-route",
        {"pfs": [{"pciAddress": PF, "numVfs": 4}]},
        refused=[f"{PF} carries the default route (via ens1f0); changing VFs resets"],
        overridable=True,
        facts={"default_route_ifaces": frozenset({"ens1f0"})},
    ),
    Case(
        "pf-not-found",
        {"pfs": [{"pciAddress": "0000:aa:00.0", "numVfs": 1}]},
        refused=["PF 0000:aa:00.0 is not on this node"],
    ),
    Case(
        "pf-name-not-found",
        {"pfs": [{"pfName": "ens9", "numVfs": 1}]},
        refused=["no PCI function has a netdev named ens9"],
    ),
    Case("not-sriov", {"pfs": [{"pciAddress": NIC, "numVfs": 1}]}, refused=["not SR-IOV capable"]),
    Case(
        "device-not-present",
        {"devices": [{"pciAddress": "0000:aa:00.0"}]},
        refused=["not present on this node"],
    ),
    # ---- a PF driver change destroys its VFs (issue 11, 1) -----------------------------------
    Case(
        "pf-move-refused-while-a-vf-is-held-even-with-allow-unsafe",
        {"devices": [{"pciAddress": PF, "allowUnsafe": True}]},
        refused=[
            f"VF {VF0} is in use: /dev/vfio/6 is held open by pid 9 (qemu-kvm) (a running VM "
            f"owns the group); moving PF {PF} from ice to vfio-pci destroys its 2 VF(s) "
            f"({VF0}, {VF1})"
        ],
        overridable=False,
        tree=lambda h: h.bind(VF0, "vfio-pci"),
        facts={"open_nodes": HELD},
    ),
    Case(
        "pf-move-refused-while-a-vf-is-allocated",
        {"devices": [{"pciAddress": PF, "allowUnsafe": True}]},
        refused=[f"VF {VF1} is allocated to pod vms/virt-launcher-a-x (example.com/vf)"],
        overridable=False,
        facts={"allocated": {A(VF1): "pod vms/virt-launcher-a-x (example.com/vf)"}},
    ),
    Case(
        "pf-move-refused-while-a-vf-is-wanted-the-vf-still-binds",
        {"devices": [{"pciAddress": PF, "allowUnsafe": True}, VF_RULE]},
        [
            *(
                f"{k} {VF0}{v}"
                for k, v in [
                    ("remember", " iavf"),
                    ("driver-override", " vfio-pci"),
                    ("unbind", " iavf"),
                    ("probe", " vfio-pci"),
                ]
            ),
            *(
                f"{k} {VF1}{v}"
                for k, v in [
                    ("remember", " iavf"),
                    ("driver-override", " vfio-pci"),
                    ("unbind", " iavf"),
                    ("probe", " vfio-pci"),
                ]
            ),
        ],
        refused=[f"VF {VF0} is wanted in the desired state; VF {VF1} is wanted"],
        overridable=False,
    ),
    Case(
        "pf-move-to-a-host-driver-refused-while-a-vf-is-host-used",
        {"devices": [{"pciAddress": PF, "driver": "ixgbe", "allowUnsafe": True}]},
        refused=[f"VF {VF0} carries the default route (via ens1f0v0)"],
        overridable=False,
        tree=lambda h: h.add_netdev(VF0, "ens1f0v0"),
        facts={"default_route_ifaces": frozenset({"ens1f0v0"})},
    ),
    Case(
        "pf-move-needs-allow-unsafe-and-names-what-it-destroys",
        {"devices": [{"pciAddress": PF}]},
        refused=[f"moving PF {PF} from ice to vfio-pci destroys its 2 VF(s) ({VF0}, {VF1})"],
        overridable=True,
    ),
    Case(
        "pf-move-with-allow-unsafe-forgets-the-vfs-it-destroys",
        {"devices": [{"pciAddress": PF, "allowUnsafe": True}]},
        [
            f"forget {VF0}",
            f"remember {PF} ice",
            f"driver-override {PF} vfio-pci",
            f"unbind {PF} ice",
            f"probe {PF} vfio-pci",
        ],
        pending=True,
        originals={VF0: "iavf"},
    ),
    Case(
        "contradiction-pf-selected-for-vfio-with-numvfs",
        {
            "pfs": [{"pciAddress": PF, "numVfs": 4}],
            "devices": [{"selector": {"vendors": ["8086"], "devices": ["1592"]}}],
        },
        refused=["contradiction: the PF is wanted on vfio-pci and with numVfs 4"],
        overridable=False,
    ),
    Case(
        "numvfs-on-a-pf-bound-to-vfio-pci",
        {"pfs": [{"pciAddress": PF, "numVfs": 4}]},
        refused=["the PF is on vfio-pci, which makes no VFs for the host"],
        overridable=False,
        tree=lambda h: (h.set_numvfs(PF, 0), h.bind(PF, "vfio-pci")),
    ),
    Case(
        "numvfs-waits-while-the-pf-goes-back-to-its-driver",
        {"pfs": [{"pciAddress": PF, "numVfs": 4}]},
        [f"driver-override {PF}", f"unbind {PF} vfio-pci", f"probe {PF} ice", f"forget {PF}"],
        pending=True,
        originals={PF: "ice"},
        tree=lambda h: (h.set_numvfs(PF, 0), h.bind(PF, "vfio-pci")),
        facts={"driver_overrides": {A(PF): "vfio-pci"}},
    ),
    # ---- a refused change leaves what only served it alone (issue 11, 3) ------------------
    Case(
        "refused-resize-holds-back-the-vf-restores",
        {
            "pfs": [{"pciAddress": PF, "numVfs": 1}],
            "devices": [VF_RULE | {"selector": {"pfNames": ["ens1f0#0"]}}],
        },
        [],
        refused=[f"{PF} carries the default route (via ens1f0)"],
        overridable=True,
        held=4,
        originals={VF0: "iavf", VF1: "iavf"},
        tree=vfs_on_vfio,
        facts={"default_route_ifaces": frozenset({"ens1f0"}), "driver_overrides": ON_VFIO},
    ),
    Case(
        "refused-release-holds-back-the-vf-restores",
        {"pfs": [{"pciAddress": PF, "numVfs": 0}]},
        [],
        refused=[f"{PF} carries the default route (via ens1f0)"],
        held=8,
        originals={VF0: "iavf", VF1: "iavf"},
        tree=vfs_on_vfio,
        facts={"default_route_ifaces": frozenset({"ens1f0"}), "driver_overrides": ON_VFIO},
    ),
    Case(
        "busy-pf-its-vfs-are-not-touched",
        {"devices": [VF_RULE]},
        [],
        refused=[f"{PF}: busy: the kernel holds the device lock"],
        busy=(PF,),
    ),
    Case(
        "busy-pf-holds-a-vf-that-is-being-removed",
        {},
        [],
        refused=[f"{VF0}: refused to change it now: {PF}: busy: the kernel holds the device"],
        originals={VF0: "iavf"},
        # mid-removal: its PF's virtfn link, its physfn link and its driver link are gone
        tree=lambda h: (
            (h.device_dir(PF) / "virtfn0").unlink(),
            (h.device_dir(VF0) / "physfn").unlink(),
            h.bind(VF0, None),
        ),
        busy=(PF,),
    ),
    Case(
        "busy-pf-numvfs-refused-once-and-its-vf-mid-removal-held",
        {"pfs": [{"pciAddress": PF, "numVfs": 0}]},
        [],
        refused=[f"{PF}: refused to set numVfs 0: busy: the kernel holds the device lock"],
        held=2,  # VF0's restore (probe iavf, forget): it is being removed
        originals={VF0: "iavf"},
        tree=lambda h: (
            (h.device_dir(PF) / "virtfn0").unlink(),
            (h.device_dir(VF0) / "physfn").unlink(),
            h.bind(VF0, None),
        ),
        busy=(PF,),
    ),
    # ---- sriov_drivers_autoprobe around VFs meant for vfio-pci (issue 11, 2) --------------
    Case(
        "autoprobe-off-before-creating-vfs-for-vfio",
        {"pfs": [{"pciAddress": PF, "numVfs": 2}], "devices": [VF_RULE]},
        [f"remember-autoprobe {PF} 1", f"set-autoprobe {PF} 0", f"set-numvfs {PF} 2"],
        pending=True,
        build={"numvfs": 0},
    ),
    Case(
        "autoprobe-off-when-an-explicit-address-is-a-future-vf",
        {"pfs": [{"pciAddress": PF, "numVfs": 2}], "devices": [{"pciAddress": VF1}]},
        [f"remember-autoprobe {PF} 1", f"set-autoprobe {PF} 0", f"set-numvfs {PF} 2"],
        pending=True,
        build={"numvfs": 0},
    ),
    Case(
        "autoprobe-untouched-for-host-vfs",
        {"pfs": [{"pciAddress": PF, "numVfs": 2}]},
        [f"set-numvfs {PF} 2"],
        pending=True,
        build={"numvfs": 0},
    ),
    Case(
        "autoprobe-already-off-by-the-admin",
        {"pfs": [{"pciAddress": PF, "numVfs": 2}], "devices": [VF_RULE]},
        [f"set-numvfs {PF} 2"],
        pending=True,
        build={"numvfs": 0},
        tree=autoprobe_off,
    ),
    Case(
        "new-vfs-remember-the-host-driver-then-autoprobe-comes-back",
        {
            "pfs": [{"pciAddress": PF, "numVfs": 2}],
            "devices": [VF_RULE | {"selector": {"pfNames": ["ens1f0#0"]}}],
        },
        [
            f"remember {VF0} iavf",
            f"driver-override {VF0} vfio-pci",
            f"probe {VF0} vfio-pci",
            f"set-autoprobe {PF} 1",
            f"forget-autoprobe {PF}",
            f"probe {VF1} iavf",
        ],
        tree=vfs_unbound,
        autoprobe={PF: True},
        facts={"would_bind": {A(VF0): "iavf", A(VF1): "iavf"}},
    ),
    Case(
        "vf-restore-names-its-driver-while-autoprobe-is-off",
        {
            "pfs": [{"pciAddress": PF, "numVfs": 2}],
            "devices": [VF_RULE | {"selector": {"pfNames": ["ens1f0#0"]}}],
        },
        [
            f"driver-override {VF1} iavf",
            f"unbind {VF1} vfio-pci",
            f"probe {VF1} iavf",
            f"driver-override {VF1}",
            f"forget {VF1}",
            f"set-autoprobe {PF} 1",
            f"forget-autoprobe {PF}",
        ],
        originals={VF0: "iavf", VF1: "iavf"},
        tree=lambda h: (vfs_unbound(h), vfs_on_vfio(h)),
        autoprobe={PF: True},
        facts={"driver_overrides": ON_VFIO},
    ),
    Case(
        "vf-restore-with-autoprobe-on",
        {
            "pfs": [{"pciAddress": PF, "numVfs": 2}],
            "devices": [VF_RULE | {"selector": {"pfNames": ["ens1f0#0"]}}],
        },
        RESTORE_VF1,
        originals={VF0: "iavf", VF1: "iavf"},
        tree=vfs_on_vfio,
        facts={"driver_overrides": ON_VFIO},
    ),
    # ---- addresses (issue 11, 4) ------------------------------------------------------------
    Case(
        "address-32-on-up-interface",
        {"devices": [{"pciAddress": NIC}]},
        refused=[f"{NIC} has an address on an up interface (eno1: 203.0.113.5/32)"],
        overridable=True,
        facts={"addressed_ifaces": {"eno1": ("203.0.113.5/32",)}},
    ),
    Case(
        "up-interface-whose-addresses-cannot-be-read",
        {"devices": [{"pciAddress": NIC}]},
        refused=[f"{NIC}'s interface eno1 is up and its IPv4 addresses cannot be read"],
        overridable=True,
        facts={"unverified_ifaces": frozenset({"eno1"})},
    ),
    Case(
        "two-rules-disagree",
        {
            "devices": [
                {"selector": {"pfNames": ["ens1f0"]}, "resourceName": "example.com/a"},
                {
                    "selector": {"vendors": ["8086"], "devices": ["1889"]},
                    "resourceName": "example.com/b",
                },
            ]
        },
        refused=["selected by two rules with different wishes"] * 2,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_plan(case: Case, tmp_path: Path) -> None:
    h = node(tmp_path, **case.build)
    if case.tree is not None:
        case.tree(h)
    inv = Sysfs(str(h.root)).discover()
    busy = "busy: the kernel holds the device lock (unbind in progress?)"
    devices = {
        a: replace(d, busy=busy) if str(a) in case.busy else d for a, d in inv.devices.items()
    }
    inv = replace(inv, devices=devices)
    facts = GuardFacts(**case.facts)
    originals = {A(k): v for k, v in case.originals.items()}
    autoprobe = {A(k): v for k, v in case.autoprobe.items()}
    p = plan(parse_node_config(case.spec), inv, facts, originals, autoprobe)
    print(p.render())
    assert steps_of(p) == case.expect
    assert len(p.refusals) == len(case.refused), p.refusals
    if case.held is not None:
        assert p.refusals[0].held == case.held
        assert f"with {case.held} dependent step(s) held back" in p.refusals[0].describe()
    for r, want in zip(p.refusals, case.refused, strict=True):
        assert want in r.describe()
        if case.overridable is not None:
            assert r.overridable is case.overridable
            assert ("allowUnsafe" in r.describe()) is case.overridable
    assert bool(p.pending) is case.pending
    if not case.refused and not case.expect and not case.pending:
        assert p.converged and "nothing to do" in p.render()


def test_vfs_of_a_changing_pf_wait_for_the_next_round(tmp_path: Path) -> None:
    h = node(tmp_path)
    inv = Sysfs(str(h.root)).discover()
    spec = {"pfs": [{"pciAddress": PF, "numVfs": 4}], "devices": [{"pciAddress": VF0}]}
    p = plan(parse_node_config(spec), inv, GuardFacts(), {})
    # VF0 is about to vanish; its successor is for vfio-pci: no host driver may probe it first
    assert [s.kind for s in p.steps] == [
        "remember-autoprobe",
        "set-autoprobe",
        "set-numvfs",
        "set-numvfs",
    ]
    assert not p.refusals and p.pending


def test_resources_are_reported_for_resolved_devices(tmp_path: Path) -> None:
    h = node(tmp_path)
    inv = Sysfs(str(h.root)).discover()
    spec = {"devices": [{"selector": {"pfNames": ["ens1f0"]}, "resourceName": "example.com/vf"}]}
    p = plan(parse_node_config(spec), inv, GuardFacts(), {})
    assert p.resources == {A(VF0): "example.com/vf", A(VF1): "example.com/vf"}


def test_plan_is_pure_and_repeatable(tmp_path: Path) -> None:
    h = node(tmp_path)
    inv = Sysfs(str(h.root)).discover()
    cfg = parse_node_config(
        {"devices": [{"pciAddress": GPU}], "pfs": [{"pciAddress": PF, "numVfs": 3}]}
    )
    assert plan(cfg, inv, GuardFacts(), {}) == plan(cfg, inv, GuardFacts(), {})
    assert plan(cfg, inv, GuardFacts(), {}).to_dict()["converged"] is False
