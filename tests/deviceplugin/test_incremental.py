"""Targeted rescans (HostView.refresh + dirty sets) must end where a full scan ends."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from hostdev.deviceplugin.api.deviceplugin.v1beta1 import api_pb2 as pb
from hostdev.deviceplugin.hostview import HostView
from hostdev.deviceplugin.metrics import Metrics
from hostdev.deviceplugin.plugin import ResourcePlugin
from hostdev.deviceplugin.resources import parse_resources
from hostdev.host import PciAddress, Sysfs
from hostdev.testing.fakesysfs import FakeHost
from hostdev.testing.scenarios import sriov_nic_dual_socket

SELECTORS = [
    {"devices": ["1889"]},
    {"pfNames": ["ens1f0#1-2", "ens2f0"]},
    {"vendors": ["10de"]},
]


def _plugin(host: Path, selector: dict[str, object]) -> ResourcePlugin:
    (cfg,) = parse_resources([{"resourceName": "example.com/x", "selector": selector}])
    return ResourcePlugin(cfg, Sysfs(str(host)), "/nonexistent", Metrics())


def _devices(p: ResourcePlugin) -> list[pb.Device]:
    """The plugin's current ListAndWatch list, read with the generated stubs."""
    return list(pb.ListAndWatchResponse.FromString(p._snapshot).devices)


def _state(p: ResourcePlugin) -> dict[str, tuple[tuple[str, ...], bool, str | None]]:
    return {
        k: (tuple(str(a) for a in v.unit.addresses), v.verdict.healthy, v.verdict.reason)
        for k, v in p.devices.items()
    }


def _vf(h: FakeHost, pf: str, i: int) -> str:
    return str(h.vf_address(pf, i))


Step = Callable[[FakeHost], list[str]]
STEPS: list[Step] = [
    lambda h: (h.bind(_vf(h, "0000:3b:00.0", 1), "iavf"), [_vf(h, "0000:3b:00.0", 1)])[1],
    lambda h: (h.bind(_vf(h, "0000:3b:00.0", 1), "vfio-pci"), [_vf(h, "0000:3b:00.0", 1)])[1],
    lambda h: (h.set_numvfs("0000:86:00.0", 4), [_vf(h, "0000:86:00.0", i) for i in (2, 3)])[1],
    lambda h: (h.bind("0000:17:00.1", "snd_hda_intel"), ["0000:17:00.1"])[1],
    lambda h: (h.bind("0000:17:00.1", "vfio-pci"), ["0000:17:00.1"])[1],
    lambda h: (h.set_numvfs("0000:3b:00.0", 1), [_vf(h, "0000:3b:00.0", i) for i in (1, 2)])[1],
]


@pytest.mark.parametrize("selector", SELECTORS)
def test_targeted_rescans_match_a_full_scan(tmp_path: Path, selector: dict[str, object]) -> None:
    h = sriov_nic_dual_socket(tmp_path, numvfs=3)
    g = h.new_group()
    for fn, dev, cls in (("0", "2236", "030200"), ("1", "1aef", "040300")):
        h.add_device(
            f"0000:17:00.{fn}",
            vendor="10de",
            device=dev,
            class_code=cls,
            driver="vfio-pci",
            group=g,
            numa=0,
        )
    view = HostView(Sysfs(str(tmp_path)))
    live = _plugin(tmp_path, selector)
    live.update(view.full())
    for step in STEPS:
        addrs = step(h)
        inv = view.refresh(PciAddress.parse(a) for a in addrs)
        live.update(inv, view.last_dirty)
        fresh = _plugin(tmp_path, selector)
        fresh.update(Sysfs(str(tmp_path)).discover())
        assert _state(live) == _state(fresh)
        assert [d.ID for d in _devices(live)] == list(fresh.devices)
        assert [d.health for d in _devices(live)] == [d.health for d in _devices(fresh)]
