"""Replace a small state file atomically: a crash at any instant leaves the old or the new one."""

from __future__ import annotations

import contextlib
import os


def atomic_write(path: str, data: bytes, *, durable: bool = True, mode: int | None = None) -> None:
    """Write ``data`` to a temp file beside ``path`` and rename it over ``path``.

    ``durable``: fsync the file and its directory too, so the new content also survives a power
    loss (the rename alone only survives a killed process). ``mode``: the file's permissions
    (default: the temp file's 0600)."""
    import tempfile  # not at import: the agent's start path never writes before serving

    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
