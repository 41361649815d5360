"""The name of a mediated device instance: its UUID, lower-case, as sysfs shows it.

Apart from :mod:`hostdev.host.mdev` so that code which only has to tell an instance's ID from
a PCI address (the node agent's saved lists, its held set) does not load the mdev model: the
agent's start path serves PCI functions before anything else.
"""

from __future__ import annotations

import re

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
