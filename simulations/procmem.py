"""Peak memory of a run's whole process tree, as the benchmarks and `fedmeta simulate` report it.

A Flower run spreads over processes that are not our children (the SuperLink that `flwr run`
detaches, Ray's workers), so the tree is found by environment: every process whose FLWR_HOME is the
run's private one.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


class TreeMemorySampler:
    """Samples the summed PSS of this process and every process whose FLWR_HOME is ``flwr_home``
    or lies inside it (one folder can hold the private homes of several runs).

    PSS (proportional set size) splits shared pages among the processes that map them, so Ray's
    shared object store and the torch libraries every worker maps count once, not once per worker.
    """

    def __init__(self, flwr_home: Path | None, interval_s: float = 0.5):
        self.flwr_home = str(flwr_home) if flwr_home else None
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "TreeMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            self.peak_bytes = max(self.peak_bytes, self.sample())
            if self._stop.wait(self.interval_s):
                return

    def sample(self) -> int:
        total = _pss_bytes(os.getpid())
        if self.flwr_home:
            for pid in _pids():
                home = _environ_value(pid, "FLWR_HOME")
                if pid != os.getpid() and home and (home == self.flwr_home or home.startswith(self.flwr_home + "/")):
                    total += _pss_bytes(pid)
        return total


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _environ_value(pid: int, name: str) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = name.encode() + b"="
    for entry in raw.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix):].decode(errors="replace")
    return None


def _pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0
