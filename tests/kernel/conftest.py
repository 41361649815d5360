"""tests/kernel/guest runs only inside the QEMU guest (driven by test_real_kernel.py)."""

import os

collect_ignore = [] if os.environ.get("RK_GUEST") == "1" else ["guest"]
