"""Run a command's work in a child process so the command returns even when a kernel read does not.

A read of a PF's ``sriov_numvfs`` while its unbind waits for a VF's VFIO user sleeps in the
kernel, uninterruptibly, until the user lets go. Discovery gives up on such a read after a
deadline and leaves its thread behind (:mod:`hostdev.host.bounded`), but Linux ends a process
only once every thread has left the kernel: ``hostdev scan`` would print its report and then
hang at exit. So the console command forks before any thread exists; the child does the work,
closes its output and reports its exit status through a pipe; the parent exits with that status
at once. A child held up in the kernel ends by itself later (init reaps it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Callable
from types import FrameType

from hostdev.host import bounded


def _child(fn: Callable[[], int], w: int) -> None:
    code = 1
    try:
        code = fn()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # report it, as the interpreter would, then exit like it does
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        if bounded.stuck():
            # Our output must end now, not when the kernel lets the stuck reader go.
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
        os.write(w, bytes([code & 0xFF]))
        os._exit(code & 0xFF)


def run_detached(fn: Callable[[], int]) -> int:
    """``fn()``'s exit status, returned as soon as ``fn`` is done (see the module docstring)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(fn, w)
    os.close(w)

    def forward(signum: int, _frame: FrameType | None) -> None:
        os.kill(pid, signum)  # the child decides (Ctrl-C: it stops; the parent follows)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    with os.fdopen(r, "rb") as pipe:
        status = pipe.read(1)
    if status:
        # The child may still be leaving the kernel: reap it if it is gone, else leave it.
        os.waitpid(pid, os.WNOHANG)
        return status[0]
    _, wstatus = os.waitpid(pid, 0)  # it died without reporting (killed)
    code = os.waitstatus_to_exitcode(wstatus)
    return 128 - code if code < 0 else code or 1
