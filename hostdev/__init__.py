"""hostdev: PCI passthrough for KubeVirt."""

__version__ = "0.1.0"
