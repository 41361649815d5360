"""The node agent's DRA front end (driver ``pci.hostdev.io``): ResourceSlices of this node's
units, the kubelet DRA plugin (registration, prepare/unprepare with CDI and KEP-5304 device
metadata, health), and the checkpoints of prepared claims. See :mod:`.frontend`."""
