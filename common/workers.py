"""Worker processes that end with the process that started them, even when it is killed with SIGKILL.

A pool worker whose parent dies without stopping it (``kill -9``, the kernel's OOM killer: no handler and
no ``finally`` run) is re-parented to init and runs on, holding its memory. Linux can signal a process when
its parent dies (``prctl(PR_SET_PDEATHSIG)``); every pool's worker initializer calls :func:`end_with_parent`.
Here in ``common`` (no Flower) so that the synthetic generator's pool and the benchmarks' can both use it.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def end_with_parent(parent_pid: int | None = None, signum: int = signal.SIGKILL) -> bool:
    """Asks the kernel to send ``signum`` to this process when its parent dies; returns whether it could (False
    elsewhere than Linux, where it does nothing).

    ``parent_pid`` (default: the multiprocessing parent of this worker) closes the race where the parent died
    before the request: then this process ends now. Linux ties the signal to the parent *thread* that started
    the worker: start pools from a thread that lives as long as the pool (the main thread, as fedmeta does).
    """
    if not sys.platform.startswith("linux"):
        return False
    if parent_pid is None:
        parent = multiprocessing.parent_process()
        parent_pid = parent.pid if parent is not None else None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):  # no C library to call: a worker that outlives its parent, as before
        return False
    if parent_pid is not None and os.getppid() != parent_pid:  # the parent is gone already: re-parented
        os.kill(os.getpid(), signum)
    return True


__all__ = ["end_with_parent"]
