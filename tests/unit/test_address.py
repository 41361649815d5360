import pytest

from hostdev.host.address import PciAddress, PciAddressError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0000:3b:00.0", "0000:3b:00.0"),
        ("0000:3B:1F.7", "0000:3b:1f.7"),  # upper-case in, sysfs-style lower-case out
        ("ffff:ff:1f.7", "ffff:ff:1f.7"),
    ],
)
def test_parse_roundtrip(text: str, expected: str) -> None:
    assert str(PciAddress.parse(text)) == expected


@pytest.mark.parametrize(
    "text",
    [
        "3b:00.0",  # short form: KubeVirt's launcher rejects it
        "00000:3b:00.0",  # VMD-style 5-digit domain
        "0000:3b:00.8",  # function above 7
        "0000:3b:20.0",  # device above 1f
        " 0000:3b:00.0",
        "0000:3b:00.0,",
        "0000-3b-00.0",
        "",
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(PciAddressError, match="invalid PCI address"):
        PciAddress.parse(text)


def test_order_and_hash() -> None:
    a, b = PciAddress.parse("0000:3b:02.1"), PciAddress.parse("0000:3b:0a.0")
    assert sorted([b, a]) == [a, b]
    assert {a, PciAddress.parse("0000:3b:02.1")} == {a}
