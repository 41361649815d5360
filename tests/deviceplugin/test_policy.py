"""Pure policy: env-var rule, names, units, health verdicts, preferred allocation."""

from __future__ import annotations

import pytest

from hostdev.host import PciAddress, PciDevice
from hostdev.host.model import IommuGroup
from hostdev.policy.allocation import (
    AllocUnit,
    build_units,
    kubevirt_addresses,
    preferred_allocation,
)
from hostdev.policy.health import FreshGroup, recheck_unit, unit_health
from hostdev.policy.naming import (
    MDEV_PREFIX,
    ResourceNameError,
    env_collisions,
    resource_env_var,
    socket_generation,
    socket_name,
    validate_resource_name,
)


@pytest.mark.parametrize(
    ("name", "var"),
    [
        ("example.com/e810_vf", "PCI_RESOURCE_EXAMPLE_COM_E810_VF"),
        ("nvidia.com/GA102GL_A10", "PCI_RESOURCE_NVIDIA_COM_GA102GL_A10"),
        ("intel.com/qat-vf", "PCI_RESOURCE_INTEL_COM_QAT-VF"),
        ("a.b.c/x.y", "PCI_RESOURCE_A_B_C_X_Y"),
    ],
)
def test_env_var_rule_matches_kubevirt(name: str, var: str) -> None:
    assert resource_env_var(name) == var


@pytest.mark.parametrize(
    ("names", "refused"),
    [
        (["example.com/vf.a", "example.com/vf_a"], [("example.com/vf.a", "example.com/vf_a")]),
        (["example.com/vf_a", "Example.com/VF.A"], [("example.com/vf_a", "Example.com/VF.A")]),
        (["a.io/x", "a.io/x", "a.io/y"], []),  # the same name twice is one resource
        (["a.io/x-y", "a.io/x_y"], []),  # '-' stays '-'
        (
            ["a.io/b.c", "a.io/b_c", "a.io/B.C", "a.io/b.c"],
            [("a.io/b.c", "a.io/b_c"), ("a.io/b.c", "a.io/B.C")],
        ),
    ],
)
def test_env_var_collisions_keep_the_first_name(
    names: list[str], refused: list[tuple[str, str]]
) -> None:
    got = env_collisions(names)
    assert [(c.first, c.second) for c in got] == refused
    for c in got:
        assert c.env_var == resource_env_var(c.first) == resource_env_var(c.second)
        assert resource_env_var(c.first, MDEV_PREFIX) == resource_env_var(c.second, MDEV_PREFIX)
        assert c.first in c.message and c.second in c.message and c.env_var in c.message
        assert c.message.endswith(f"{c.second} is refused, rename it")


def test_mdev_prefix() -> None:
    assert resource_env_var("nvidia.com/grid", "MDEV_PCI_RESOURCE") == (
        "MDEV_PCI_RESOURCE_NVIDIA_COM_GRID"
    )


@pytest.mark.parametrize(
    "bad", ["nodomain", "Example.com/x", "a.com/", "/x", "a.com/-x", "kubernetes.io/x"]
)
def test_bad_resource_names_are_refused(bad: str) -> None:
    with pytest.raises(ResourceNameError, match="invalid resource name"):
        validate_resource_name(bad)


def test_socket_name_is_a_plain_file_name() -> None:
    assert socket_name("example.com/e810_vf") == "hostdev-example.com_e810_vf.sock"


def test_later_socket_generations_are_suffixed_and_never_another_resources_name() -> None:
    assert socket_name("example.com/e810_vf", 1) == "hostdev-example.com_e810_vf.sock"
    assert socket_name("example.com/e810_vf", 2) == "hostdev-example.com_e810_vf~2.sock"
    # '-' and digits may end a resource name: a "-2" suffix would be example.com/nic-2's socket
    assert socket_name("example.com/nic", 2) != socket_name("example.com/nic-2")
    with pytest.raises(ValueError, match="generation 0"):
        socket_name("example.com/nic", 0)


@pytest.mark.parametrize(
    ("file_name", "generation"),
    [
        ("hostdev-example.com_nic.sock", 1),
        ("hostdev-example.com_nic~2.sock", 2),
        ("hostdev-example.com_nic~17.sock", 17),
        ("hostdev-example.com_nic-2.sock", None),  # example.com/nic-2's own socket
        ("hostdev-example.com_nic-2~2.sock", None),
        ("hostdev-example.com_nic~1.sock", None),  # generation 1 is the plain name only
        ("hostdev-example.com_nic~02.sock", None),
        ("hostdev-example.com_nic~.sock", None),
        ("hostdev-example.com_nic~x.sock", None),
        ("hostdev-example.com_nic~2.sock.tmp", None),
        ("hostdev-example.com_ni.sock", None),
        ("kubelet.sock", None),
    ],
)
def test_socket_generation_reads_only_this_resources_sockets(
    file_name: str, generation: int | None
) -> None:
    assert socket_generation("example.com/nic", file_name) == generation
    if generation is not None:
        assert socket_name("example.com/nic", generation) == file_name


def _dev(
    addr: str,
    group: int | None,
    numa: int | None = 0,
    pf: str | None = None,
    driver: str | None = "vfio-pci",
) -> PciDevice:
    return PciDevice(
        PciAddress.parse(addr),
        "8086",
        "1889",
        None,
        None,
        "020000",
        driver,
        group,
        numa,
        physfn=PciAddress.parse(pf) if pf else None,
    )


def test_functions_sharing_a_group_are_one_unit_with_the_lowest_address_as_id() -> None:
    units = build_units([_dev("0000:17:00.1", 5), _dev("0000:17:00.0", 5), _dev("0000:18:00.0", 6)])
    assert [(u.id, [str(a) for a in u.addresses]) for u in units] == [
        ("0000:17:00.0", ["0000:17:00.0", "0000:17:00.1"]),
        ("0000:18:00.0", ["0000:18:00.0"]),
    ]


def test_health_requires_vfio_driver_viable_group_and_node() -> None:
    a = PciAddress.parse("0000:17:00.0")
    ok_group = {5: IommuGroup(5, (a,), True, None, True)}
    assert unit_health((a,), 5, {a: _dev(str(a), 5)}, ok_group).healthy
    v = unit_health((a,), 5, {a: _dev(str(a), 5, driver="ixgbevf")}, ok_group)
    assert not v.healthy and "ixgbevf" in (v.reason or "")
    v = unit_health((a,), 5, {}, ok_group)
    assert not v.healthy and "gone" in (v.reason or "")
    no_node = {5: IommuGroup(5, (a,), True, None, False)}
    v = unit_health((a,), 5, {a: _dev(str(a), 5)}, no_node)
    assert not v.healthy and "/dev/vfio/5" in (v.reason or "")
    bad = {5: IommuGroup(5, (a,), False, "not viable: x", True)}
    assert not unit_health((a,), 5, {a: _dev(str(a), 5)}, bad).healthy
    assert not unit_health((a,), None, {a: _dev(str(a), None)}, ok_group).healthy


def test_kubevirt_list_is_every_primary_first_in_request_order_then_companions() -> None:
    units = build_units(
        [
            _dev("0000:17:00.0", 5),
            _dev("0000:17:00.1", 5),
            _dev("0000:18:00.0", 6),
            _dev("0000:65:00.0", 7),
            _dev("0000:65:00.1", 7),
            _dev("0000:65:00.2", 7),
        ]
    )
    by_id = {u.id: u for u in units}
    assert [str(by_id[i].primary) for i in by_id] == list(by_id)  # primary == kubelet ID
    got = kubevirt_addresses([by_id["0000:65:00.0"], by_id["0000:18:00.0"], by_id["0000:17:00.0"]])
    assert [str(a) for a in got] == [
        "0000:65:00.0",  # one primary per kubelet device, as the kubelet ordered them
        "0000:18:00.0",
        "0000:17:00.0",
        "0000:65:00.1",  # companions: never attached, never counted as an entry
        "0000:65:00.2",
        "0000:17:00.1",
    ]
    assert kubevirt_addresses([]) == ()


def _fresh(
    members: list[PciDevice] | None, *, extra: tuple[PciDevice, ...] = (), node: bool = True
) -> FreshGroup:
    devs = {d.address: d for d in [*(members or []), *extra]}
    listed = None if members is None else tuple(d.address for d in members)
    return FreshGroup(5, listed, devs, node)


def test_recheck_judges_the_whole_group_as_read_now() -> None:
    gpu, audio = _dev("0000:17:00.0", 5), _dev("0000:17:00.1", 5)
    unit = (gpu.address,)
    bridge = PciDevice(
        PciAddress.parse("0000:16:00.0"), "8086", "1234", None, None, "060400", "pcieport", 5, 0
    )
    assert recheck_unit(unit, 5, _fresh([gpu, audio, bridge])).healthy  # bridges aside
    stub = _dev("0000:17:00.1", 5, driver="pci-stub")
    assert recheck_unit(unit, 5, _fresh([gpu, stub]), [gpu.address, stub.address]).healthy
    none = _dev("0000:17:00.1", 5, driver=None)
    assert recheck_unit(unit, 5, _fresh([gpu, none])).healthy
    variant = _dev("0000:17:00.1", 5, driver="nvgrace_gpu_vfio_pci")
    assert recheck_unit(unit, 5, _fresh([gpu, variant])).healthy

    snd = _dev("0000:17:00.1", 5, driver="snd_hda_intel")
    v = recheck_unit(unit, 5, _fresh([gpu, snd]))
    assert v.reason == (
        "IOMMU group 5 of 0000:17:00.0 cannot be assigned: 0000:17:00.1 is bound to host driver "
        "snd_hda_intel; bind it to vfio-pci as well (VFIO assigns an IOMMU group whole: every "
        "function in it except bridges must be on vfio-pci, pci-stub or no driver)"
    )
    usb = _dev("0000:17:00.2", 5, driver="xhci_hcd")
    v = recheck_unit(unit, 5, _fresh([gpu, snd, usb]))
    assert (
        "0000:17:00.1 is bound to host driver snd_hda_intel and 0000:17:00.2 is bound to host "
        "driver xhci_hcd; bind them to vfio-pci as well"
    ) in (v.reason or "")

    v = recheck_unit(unit, 5, _fresh([gpu, audio]), advertised=[gpu.address])
    assert v.reason == (
        "IOMMU group 5 of 0000:17:00.0 changed since it was advertised (members now "
        "0000:17:00.0, 0000:17:00.1; were 0000:17:00.0); it is judged again at the agent's "
        "next rescan"
    )
    moved = _dev("0000:17:00.0", 9)
    v = recheck_unit(unit, 5, _fresh([audio], extra=(moved,)))
    assert v.reason == (
        "0000:17:00.0 moved from IOMMU group 5 to group 9; it is advertised again once the "
        "agent has re-read it"
    )
    assert recheck_unit(unit, 5, _fresh([audio])).reason == "0000:17:00.0 is gone from the PCI bus"
    v = recheck_unit(unit, 5, _fresh(None, extra=(gpu,)))
    assert v.reason == "IOMMU group 5 of 0000:17:00.0 no longer exists"
    v = recheck_unit(unit, 5, _fresh([gpu, audio], node=False))
    assert v.reason == (
        "/dev/vfio/5 (IOMMU group 5 of 0000:17:00.0) does not exist: check that the vfio-pci "
        "module is loaded and the group is bound to it"
    )


def _units() -> dict[str, AllocUnit]:
    # NUMA 0: PF A (3 VFs), PF B (2 VFs); NUMA 1: PF C (4 VFs).
    devs = []
    g = 10
    for pf, bus, n, numa in (
        ("0000:3b:00.0", 0x3B, 3, 0),
        ("0000:3b:00.1", 0x3C, 2, 0),
        ("0000:86:00.0", 0x86, 4, 1),
    ):
        for i in range(n):
            devs.append(_dev(f"0000:{bus:02x}:02.{i}", g, numa, pf))
            g += 1
    return {u.id: u for u in build_units(devs)}


def test_preferred_spreads_across_pfs_on_one_numa_node() -> None:
    units = _units()
    got = preferred_allocation(units, sorted(units), [], 2, "spread")
    # Both nodes fit; spread takes the fullest (NUMA 0, 5 free) and one VF from each of its PFs.
    assert got == ["0000:3b:02.0", "0000:3c:02.0"]
    got = preferred_allocation(units, sorted(units), ["0000:3b:02.2"], 3, "spread")
    assert got[0] == "0000:3b:02.2"
    assert sorted(got[1:]) == ["0000:3b:02.0", "0000:3c:02.0"]  # NUMA 0, other PF first


def test_preferred_packs_onto_one_pf_when_asked() -> None:
    units = _units()
    got = preferred_allocation(units, sorted(units), [], 2, "pack")
    # Tightest NUMA node that fits (NUMA 1, 4 free), one PF filled first.
    assert got == ["0000:86:02.0", "0000:86:02.1"]
    # On NUMA 0 (forced by must-include on PF A), pack stays on PF A.
    got = preferred_allocation(units, sorted(units), ["0000:3b:02.1"], 3, "pack")
    assert got == ["0000:3b:02.1", "0000:3b:02.0", "0000:3b:02.2"]


def test_preferred_spills_to_other_numa_only_when_needed_and_is_deterministic() -> None:
    units = _units()
    got = preferred_allocation(units, sorted(units), [], 6, "spread")
    assert len(got) == 6 and len(set(got)) == 6
    assert sum(units[i].numa_node == 0 for i in got) == 5  # the whole fullest node first
    assert got == preferred_allocation(units, list(reversed(sorted(units))), [], 6, "spread")


def test_preferred_keeps_must_include_and_never_exceeds_available() -> None:
    units = _units()
    avail = ["0000:3b:02.0", "0000:86:02.3"]
    got = preferred_allocation(units, avail, ["0000:86:02.3"], 5, "spread")
    assert got[0] == "0000:86:02.3" and sorted(got) == sorted(avail)
