"""Allocation units and the GetPreferredAllocation policy. Pure.

Design (kubelet-compatible group-as-unit): the kubelet counts device IDs, and a VFIO group can
be opened by one process (one VM) only. So the functions of one resource that share an IOMMU
group form ONE allocatable unit, advertised as ONE kubelet device whose ID is the unit's lowest
PCI address; Allocate of that ID hands out every address of the unit. Requesting N devices of a
resource therefore means N groups. On SR-IOV NICs (one VF per group) unit = VF.

Primary function: KubeVirt attaches exactly ONE address per ``hostDevices``/``gpus`` entry, and
asks the kubelet for one device per entry. The address a unit contributes to the VM is its
*primary*: its lowest address, which is also its kubelet device ID (so PodResources, NodeState
allocations and the VM agree on which function a VM holds). For a multi-function device whose
function 0 the resource selects (GPU .0 + HDMI audio .1, USB .2, ...), that is function 0, the
function that carries the device. Only functions the resource's selector matched are candidates:
a selector that matched only the audio function makes a unit whose primary is the audio
function; the GPU beside it is no part of the resource. The other functions of a unit are its
*companions*: the VM's pod gets their group (``/dev/vfio/<group>``), so nothing else can use
them, but KubeVirt attaches none of them. A group of two GPUs behind a switch without ACS is one
unit too, whose second GPU is a companion: select by class and place GPUs in ACS-capable slots
to get one GPU per unit. No class ranking is attempted: it would part the device ID from the
attached address, and within one resource units normally hold one kind of function anyway.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from hostdev.host.address import PciAddress
from hostdev.host.model import PciDevice

Strategy = Literal["spread", "pack"]


@dataclass(frozen=True, slots=True)
class AllocUnit:
    """What one kubelet device ID stands for."""

    id: str  # lowest member address, the kubelet device ID
    addresses: tuple[PciAddress, ...]  # sorted; addresses[0] is the id
    group: int | None  # None: the device has no IOMMU group (never healthy)
    numa_node: int | None
    pf: PciAddress | None  # the PF of the (first) VF, None for non-VFs

    @property
    def primary(self) -> PciAddress:
        """The function KubeVirt attaches for this unit (see the module docstring)."""
        return self.addresses[0]

    @property
    def companions(self) -> tuple[PciAddress, ...]:
        """The unit's other functions: handed over with the group, attached by no VM entry."""
        return self.addresses[1:]

    @property
    def pf_key(self) -> str:
        # Non-VFs are their own "PF" for spreading purposes (mdev instances, no address: their
        # UUID).
        if self.pf is not None:
            return str(self.pf)
        return str(self.addresses[0]) if self.addresses else self.id


def build_units(devices: Iterable[PciDevice]) -> tuple[AllocUnit, ...]:
    """Group a resource's devices into units (one per IOMMU group), ordered by ID."""
    by_key: dict[tuple[int, int | str], list[PciDevice]] = {}
    for d in devices:
        key: tuple[int, int | str] = (
            (0, d.iommu_group) if d.iommu_group is not None else (1, str(d.address))
        )
        by_key.setdefault(key, []).append(d)
    units = []
    for (_, _), devs in by_key.items():
        devs.sort(key=lambda d: d.address)
        first = devs[0]
        numa = next((d.numa_node for d in devs if d.numa_node is not None), None)
        pf = next((d.physfn for d in devs if d.physfn is not None), None)
        units.append(
            AllocUnit(
                id=str(first.address),
                addresses=tuple(d.address for d in devs),
                group=first.iommu_group,
                numa_node=numa,
                pf=pf,
            )
        )
    units.sort(key=lambda u: u.addresses[0])
    return tuple(units)


def kubevirt_addresses(units: Sequence[AllocUnit]) -> tuple[PciAddress, ...]:
    """The ``PCI_RESOURCE_<NAME>`` list for ``units`` (one per allocated kubelet device, in the
    order the kubelet named them): every unit's primary first, then every unit's companions.

    virt-launcher takes one address per VM entry from the front of the list, so the first N
    addresses must be the N units' primaries; never fewer addresses than devices."""
    return tuple(u.primary for u in units) + tuple(a for u in units for a in u.companions)


def multi_function_note(resource: str, unit: AllocUnit) -> str:
    """The warning status carries for a unit of several functions."""
    others = ", ".join(map(str, unit.companions))
    return (
        f"{resource}: {unit.primary} and {others} share IOMMU group {unit.group} and form one "
        f"unit, of which a VM entry attaches {unit.primary} only (the rest go along with the "
        'group, unattached); a class selector (e.g. classes: ["0302"] for 3D controllers) '
        "serves one function per unit"
    )


def preferred_allocation(
    units: Mapping[str, AllocUnit],
    available: Sequence[str],
    must_include: Sequence[str],
    size: int,
    strategy: Strategy = "spread",
) -> list[str]:
    """Choose ``size`` IDs from ``available``, always keeping ``must_include``.

    Order of concerns: must-include first; then one NUMA node (the must-include devices' node,
    else a node that can satisfy the whole request: the fullest for ``spread``, the tightest fit
    for ``pack``), spilling to other nodes only when it cannot; within that, ``spread`` takes
    round-robin across PFs (fault isolation, bandwidth), ``pack`` fills one PF before the next
    (keeps whole PFs free). Deterministic: ties break on addresses. Unknown IDs (the kubelet
    knows devices this process has not seen yet) are used last, in sorted order.
    """
    chosen: list[str] = []
    seen: set[str] = set()
    for i in must_include:
        if i not in seen:
            chosen.append(i)
            seen.add(i)
    need = size - len(chosen)
    if need <= 0:
        return chosen
    pool = [units[i] for i in sorted(set(available) - seen) if i in units]
    unknown = sorted(i for i in set(available) - seen if i not in units)

    per_numa = Counter(u.numa_node for u in pool)
    anchor = Counter(units[i].numa_node for i in chosen if i in units)
    if anchor:
        # The node most must-include devices sit on (lowest id on a tie; unknown NUMA last).
        target = min(anchor, key=lambda n: (-anchor[n], _numa_key(n)))
    else:
        target = _pick_numa(per_numa, need, strategy)
    numa_order = sorted(per_numa, key=lambda n: (n != target, *_numa_rank(per_numa, n, strategy)))

    taken_per_pf = Counter(units[i].pf_key for i in chosen if i in units)
    for numa in numa_order:
        if need <= 0:
            break
        cands = [u for u in pool if u.numa_node == numa]
        picked = _pick_from(cands, need, taken_per_pf, strategy)
        chosen.extend(u.id for u in picked)
        need -= len(picked)
    chosen.extend(unknown[: max(need, 0)])
    return chosen


def _numa_key(n: int | None) -> tuple[int, int]:
    return (1, 0) if n is None else (0, n)


def _numa_rank(per_numa: Counter[int | None], n: int | None, strategy: Strategy) -> tuple[int, ...]:
    count = per_numa[n]
    return (-count if strategy == "spread" else count, *_numa_key(n))


def _pick_numa(per_numa: Counter[int | None], need: int, strategy: Strategy) -> int | None:
    if not per_numa:
        return None
    fitting = [n for n in per_numa if per_numa[n] >= need]
    nodes = fitting or list(per_numa)
    if not fitting:
        # Nothing fits on one node: start with the fullest to cross as few nodes as possible.
        return min(nodes, key=lambda n: (-per_numa[n], *_numa_key(n)))
    return min(nodes, key=lambda n: _numa_rank(per_numa, n, strategy))


def _pick_from(
    cands: list[AllocUnit], need: int, taken: Counter[str], strategy: Strategy
) -> list[AllocUnit]:
    by_pf: dict[str, list[AllocUnit]] = {}
    for u in cands:  # cands are sorted by id, so each PF's list is too
        by_pf.setdefault(u.pf_key, []).append(u)
    picked: list[AllocUnit] = []
    while need > 0 and by_pf:
        if strategy == "spread":
            # The PF with the fewest already taken, then the one with the most left.
            pf = min(by_pf, key=lambda p: (taken[p], -len(by_pf[p]), p))
        else:
            # Keep filling the PF already in use; else the one with the fewest left (best fit).
            pf = min(by_pf, key=lambda p: (-taken[p], len(by_pf[p]), p))
        unit = by_pf[pf].pop(0)
        if not by_pf[pf]:
            del by_pf[pf]
        taken[pf] += 1
        picked.append(unit)
        need -= 1
    return picked
