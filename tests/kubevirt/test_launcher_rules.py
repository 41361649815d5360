"""KubeVirt v1.9.0's launcher rules that hostdev's Allocate answers and VM edits rely on, pinned
against KubeVirt's own code (tests/tools/kubevirt-harness) so a KubeVirt bump that changes one
fails here first. docs/DESIGN.md (node agent, item 4) lists them."""

from __future__ import annotations

import subprocess

import pytest

from tests.fixtures.kubevirt import KubeVirtLauncher, vmi

pytestmark = pytest.mark.kubevirt

RES = "example.com/gpu"
ENV = "PCI_RESOURCE_EXAMPLE_COM_GPU"


def _gpus(n: int) -> list[dict[str, str]]:
    return [{"name": f"g{i}", "deviceName": RES} for i in range(n)]


def _addresses(devs: list[dict[str, str]]) -> list[str]:
    return [d["pciAddress"] for d in devs]


def test_one_address_per_entry_in_env_order(kubevirt_launcher: KubeVirtLauncher) -> None:
    out = kubevirt_launcher.run(
        vmi(gpus=_gpus(2)), {ENV: "0000:18:00.0,0000:17:00.0,0000:17:00.1,0000:18:00.1"}
    )
    assert out["error"] is None
    assert _addresses(out["gpus"]) == ["0000:18:00.0", "0000:17:00.0"]  # no sorting, no grouping


def test_extra_addresses_are_ignored(kubevirt_launcher: KubeVirtLauncher) -> None:
    """Companions listed after every primary are never attached (and never refused)."""
    out = kubevirt_launcher.run(vmi(gpus=_gpus(1)), {ENV: "0000:17:00.0,0000:17:00.1"})
    assert out["error"] is None and _addresses(out["gpus"]) == ["0000:17:00.0"]


def test_too_few_addresses_only_say_the_counts_differ(kubevirt_launcher: KubeVirtLauncher) -> None:
    out = kubevirt_launcher.run(vmi(gpus=_gpus(2)), {ENV: "0000:17:00.0"})
    assert out["error"]["message"].startswith(
        "failed to create GPU host-devices: the number of device plugin GPU/s do not match"
    )


@pytest.mark.parametrize(
    "value",
    ["10000:17:00.0,0000:18:00.0", "0000:17:00.0, 0000:18:00.0", "0000:17:00.8,0000:18:00.0"],
    ids=["5-digit-domain", "space-after-comma", "function-8"],
)
def test_address_format_is_strict(kubevirt_launcher: KubeVirtLauncher, value: str) -> None:
    out = kubevirt_launcher.run(vmi(gpus=_gpus(2)), {ENV: value})
    assert out["error"]["stage"] == "gpu.CreateHostDevices"
    assert "failed to parse pci address" in out["error"]["message"]


def test_dash_stays_in_the_env_name(kubevirt_launcher: KubeVirtLauncher) -> None:
    res = "example.com/E810-VF_Fast"
    entry = [{"name": "n", "deviceName": res}]
    good = kubevirt_launcher.run(
        vmi(host_devices=entry), {"PCI_RESOURCE_EXAMPLE_COM_E810-VF_FAST": "0000:3b:02.0"}
    )
    assert _addresses(good["hostDevices"]) == ["0000:3b:02.0"]
    bad = kubevirt_launcher.run(
        vmi(host_devices=entry), {"PCI_RESOURCE_EXAMPLE_COM_E810_VF_FAST": "0000:3b:02.0"}
    )
    assert "the number of device plugin HostDevice/s do not match" in bad["error"]["message"]


def test_gpus_and_host_devices_read_the_env_separately(kubevirt_launcher: KubeVirtLauncher) -> None:
    """One resource in both lists of one VM: both builders pop the SAME first address (each has
    its own pool), so the device would be attached twice. The operator must never do that."""
    out = kubevirt_launcher.run(
        vmi(gpus=_gpus(1), host_devices=[{"name": "h", "deviceName": RES}]),
        {ENV: "0000:17:00.0,0000:18:00.0"},
    )
    assert out["error"] is None
    assert _addresses(out["gpus"]) == _addresses(out["hostDevices"]) == ["0000:17:00.0"]


@pytest.mark.parametrize(
    ("stdin", "why"),
    [
        ('{"vmi": {}, "envv": {}}', 'unknown field "envv"'),
        ('{"env": {}}', '"vmi" is required'),
        ("{", "unexpected EOF"),
    ],
)
def test_harness_bad_input_is_exit_2(
    kubevirt_launcher: KubeVirtLauncher, stdin: str, why: str
) -> None:
    """A typo in a test's input must fail loudly, not run KubeVirt on half a VMI."""
    proc = subprocess.run(
        [str(kubevirt_launcher.binary)], input=stdin, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2 and why in proc.stderr and proc.stdout == ""


def test_mediated_devices_come_from_mdev_pci_resource(kubevirt_launcher: KubeVirtLauncher) -> None:
    """MDEV_PCI_RESOURCE_<NAME> carries mdev UUIDs; a GPU's first mdev gets the display."""
    uuid = "4b20d080-1b54-4048-85b3-a6a62d165c01"
    out = kubevirt_launcher.run(vmi(gpus=_gpus(1)), {f"MDEV_{ENV}": uuid})
    assert out["error"] is None
    [dev] = out["gpus"]
    assert (dev["type"], dev["mdevUUID"], dev["display"], dev["ramfb"]) == (
        "mdev",
        uuid,
        "on",
        "on",
    )
