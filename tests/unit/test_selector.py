from pathlib import Path

import pytest

from hostdev.host import Sysfs
from hostdev.policy.selector import DeviceSelector, PfRange, SelectorError, select_devices
from hostdev.testing import scenarios


@pytest.fixture(scope="module")
def inv(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("nic")
    scenarios.sriov_nic_dual_socket(root, numvfs=4)
    return Sysfs(str(root)).discover()


def addrs(sel: dict, inv) -> list[str]:
    return [str(d.address) for d in select_devices(DeviceSelector.from_dict(sel), inv)]


@pytest.mark.parametrize(
    ("sel", "expected"),
    [
        ({}, []),  # empty selects nothing
        (
            {"vendors": ["8086"], "devices": ["1889"], "numaNodes": [1]},
            ["0000:86:02.0", "0000:86:02.1", "0000:86:02.2", "0000:86:02.3"],
        ),
        ({"pfNames": ["ens1f0#1-2"]}, ["0000:3b:02.1", "0000:3b:02.2"]),
        ({"pfNames": ["ens1f1#3"]}, ["0000:3b:0a.4"]),
        ({"pfNames": ["0000:86:00.0#0-0"]}, ["0000:86:02.0"]),
        (
            {"pfNames": ["ens2f0"], "devices": ["1889"]},
            ["0000:86:02.0", "0000:86:02.1", "0000:86:02.2", "0000:86:02.3"],
        ),
        ({"classes": ["0108"]}, ["0000:01:00.0"]),
        (
            {"classes": ["0x0200"], "devices": ["1592"]},
            ["0000:3b:00.0", "0000:3b:00.1", "0000:86:00.0"],
        ),
        ({"pciAddresses": ["0000:3B:02.0"]}, ["0000:3b:02.0"]),
        ({"vendors": ["10de"]}, []),
    ],
)
def test_selects(inv, sel: dict, expected: list[str]) -> None:
    assert addrs(sel, inv) == expected


@pytest.mark.parametrize(
    ("sel", "message"),
    [
        ({"vendor": ["8086"]}, "unknown selector field(s) ['vendor']"),
        ({"vendors": ["86"]}, "selector.vendors entry '86': expected 4 hex digits"),
        ({"vendors": "8086"}, "selector.vendors must be a list of strings"),
        ({"classes": ["2"]}, "selector.classes entry '2': expected 2, 4 or 6 hex digits"),
        ({"pciAddresses": ["3b:00.0"]}, "selector.pciAddresses: invalid PCI address '3b:00.0'"),
        ({"pfNames": ["ens1f0#7-3"]}, "range end 3 is below start 7"),
        ({"pfNames": ["ens1f0#a-b"]}, "expected NAME or NAME#FIRST-LAST"),
        ({"numaNodes": [-1]}, "selector.numaNodes must be a list of non-negative integers"),
    ],
)
def test_rejects(sel: dict, message: str) -> None:
    with pytest.raises(SelectorError) as e:
        DeviceSelector.from_dict(sel)
    assert message in str(e.value)


def test_pf_range_covers() -> None:
    r = PfRange.parse("ens1f0#2-4")
    assert [r.covers(i) for i in (1, 2, 4, 5, None)] == [False, True, True, False, False]
    assert PfRange.parse("ens1f0").covers(None)


def test_demo_tree(tmp_path: Path) -> None:
    scenarios.demo(tmp_path)
    inv = Sysfs(str(tmp_path)).discover()
    gpus = addrs({"vendors": ["10de"], "classes": ["03"]}, inv)
    assert gpus == ["0000:17:00.0", "0000:42:00.0", "0000:43:00.0"]
