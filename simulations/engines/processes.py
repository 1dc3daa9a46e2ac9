"""The processes of a Flower run: stopping every one of them, and measuring their memory; and
`workers_end_with_signal`, under which every `fedmeta` command runs, so that SIGTERM, SIGINT or SIGHUP ends
a command's workers with it (SIGKILL runs no handler: pool workers end with their parent through
`fedmeta.common.workers.end_with_parent`, called in each pool's initializer).

A Flower run spreads over processes that are not our children (the SuperLink that `flwr run`
detaches, a SuperExec, Ray's workers). Both jobs find them the same way, through /proc: by their
parent links and by a variable in their environment (a run's tag, or its private FLWR_HOME).
Elsewhere than Linux, stopping falls back to `ps`; memory sampling counts this process only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

# Every process the Flower runtime starts, directly or through Flower, carries this variable.
TAG_VAR = "FEDMETA_RUNTIME_TAG"
_GRACE_S = 10.0



def stop_processes(roots: set[int], tag: str | None, grace_s: float = _GRACE_S) -> set[int]:
    """Stop `roots`, the processes tagged `tag` (none if None) and all their descendants; return the
    PIDs still alive afterwards.

    The tree is frozen with SIGSTOP first, so that no process can start a child (a SuperExec
    relaunching a ClientApp, Ray restarting a worker) or be re-parented to init between the
    moment we list the tree and the moment we signal it; then SIGTERM (Flower and Ray shut
    down cleanly on it), SIGCONT, and SIGKILL for whatever outlives the grace period.
    """
    start_times: dict[int, int] = {}
    frontier = (set(roots) | _tagged_or_none(tag)) - {os.getpid()}
    while frontier:
        for pid in frontier:
            start = _start_time(pid)
            if start is None:
                continue
            start_times[pid] = start
            _signal(pid, start, signal.SIGSTOP)
        frontier = (_descendants(set(start_times)) | _tagged_or_none(tag)) - set(start_times) - {os.getpid()}
    for pid, start in start_times.items():
        _signal(pid, start, signal.SIGTERM)
        _signal(pid, start, signal.SIGCONT)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not any(_alive(pid, start) for pid, start in start_times.items()):
            return set()
        time.sleep(0.2)
    for pid, start in start_times.items():
        _signal(pid, start, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        survivors = {pid for pid, start in start_times.items() if _alive(pid, start)}
        if not survivors:
            return set()
        time.sleep(0.2)
    return survivors


def tagged(tag: str) -> set[int]:
    return {pid for pid in _pids() if _environ_has(pid, TAG_VAR, tag)}


def _tagged_or_none(tag: str | None) -> set[int]:
    return tagged(tag) if tag is not None else set()


def _pids() -> list[int]:
    proc = Path("/proc")
    if proc.is_dir():
        return [int(entry.name) for entry in proc.iterdir() if entry.name.isdigit()]
    result = subprocess.run(["ps", "-A", "-o", "pid="], capture_output=True, text=True, check=False)
    return [int(line) for line in result.stdout.split() if line.isdigit()]


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is [0], ppid [1], starttime [19])."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after its last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def _start_time(pid: int) -> int | None:
    """A PID's start time, to tell it apart from a later process that reuses the number."""
    if Path("/proc").is_dir():
        fields = _stat(pid)
        if fields is None or fields[0] in ("Z", "X"):
            return None
        return int(fields[19])
    try:
        os.kill(pid, 0)
    except OSError:
        return None
    return 0


def _alive(pid: int, start: int) -> bool:
    return _start_time(pid) == start


def _signal(pid: int, start: int, signum: signal.Signals) -> None:
    if _alive(pid, start):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _descendants(pids: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    if Path("/proc").is_dir():
        for pid in _pids():
            fields = _stat(pid)
            if fields is not None and fields[0] not in ("Z", "X"):
                children.setdefault(int(fields[1]), []).append(pid)
    else:
        result = subprocess.run(
            ["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True, check=False
        )
        for line in result.stdout.splitlines():
            pid, ppid = (int(field) for field in line.split())
            children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    stack = list(pids)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _environ_has(pid: int, name: str, value: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, not ours, or no /proc
        return False
    return f"{name}={value}".encode() in environ.split(b"\0")


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



# --------------------------------------------------------------------------------------------------
# A command's workers end with it


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that `finally` blocks and
    `with` exits run (Python's default for SIGTERM is to die without running them)."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"terminated by signal {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def workers_end_with_signal() -> Iterator[None]:
    """Within it, SIGTERM, SIGINT and SIGHUP (the terminal or ssh session closed) first stop every
    descendant of this process (pool workers, a child that measures memory, `flwr` and the Flower
    processes started as children), then raise Terminated (SIGTERM, SIGHUP) or KeyboardInterrupt
    (SIGINT) in the main thread. A signal this process was started ignoring stays ignored: `nohup`
    (SIGHUP) and a shell's background job (SIGINT) keep the command running, as they ask.

    Stopping the workers before raising is what keeps a signal from hanging or leaking: a
    ProcessPoolExecutor's `with` exit would otherwise wait for every queued job, and a worker whose
    parent died is re-parented to init and runs on. Processes that are not descendants (the
    SuperLink that `flwr run` detaches, and Ray below it) are stopped by their engine's exit, which
    the raised exception runs. While that unwinding runs, further SIGTERM/SIGINT are dropped (a
    no-op handler rather than SIG_IGN, which a process started meanwhile would inherit),
    so a second Ctrl-C cannot cut an engine's stop short; each of its steps is bounded.

    Outside the main thread (where signal handlers cannot be set) it changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = tuple(signum for signum in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None))
                    if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN)
    previous = {signum: signal.getsignal(signum) for signum in signums}

    def ignore(signum: int, frame: object) -> None:
        pass

    def stop(signum: int, frame: object) -> None:
        for each in signums:
            signal.signal(each, ignore)
        stop_processes(_descendants({os.getpid()}) - _resource_tracker(), None)
        raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)

    for signum in signums:
        signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def run_command(command: Callable[[], int | None], prog: str) -> int:
    """``command()``'s exit code, run under `workers_end_with_signal`; after SIGTERM 143, after SIGHUP 129 and
    after SIGINT 130 (128 + the signal, as a shell reports a process it ended), with one line on stderr, not a
    traceback."""
    try:
        with workers_end_with_signal():
            return int(command() or 0)
    except Terminated as stop:
        hangup = stop.signum == getattr(signal, "SIGHUP", None)
        print(f"{prog}: terminated" + (" (SIGHUP: its terminal or session closed)" if hangup else ""), file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # The reader went away (`fedmeta benchmark --paired ... | head`): end quietly, as a shell tool does,
        # rather than with a traceback; stdout now leads nowhere so the interpreter's last flush cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + getattr(signal, "SIGPIPE", 13)


def _resource_tracker() -> set[int]:
    """multiprocessing's resource tracker: it ignores SIGTERM by design and ends by itself once this
    process exits (after it frees what the dead workers left), so it is left out of the stop."""
    # Imported here: every fedmeta command loads this module at start, and most never start a pool.
    from multiprocessing import resource_tracker

    pid = getattr(resource_tracker._resource_tracker, "_pid", None)
    return {pid} if pid else set()


# --------------------------------------------------------------------------------------------------
# Memory of a run's process tree


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
        # Each process of the tree as sampled: its role (`process_role`), when it was first and last
        # seen (seconds after the sampler started) and the CPU seconds it had used when last seen.
        self.processes: dict[int, dict] = {}
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "TreeMemorySampler":
        self.started = time.monotonic()
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
            now = time.monotonic() - self.started
            for pid in _pids():
                home = _environ_value(pid, "FLWR_HOME")
                if pid != os.getpid() and home and (home == self.flwr_home or home.startswith(self.flwr_home + "/")):
                    total += _pss_bytes(pid)
                    self._seen(pid, now)
        return total

    def _seen(self, pid: int, now: float) -> None:
        fields = _stat(pid)
        if fields is None:
            return
        entry = self.processes.get(pid)
        if entry is None or entry["start"] != fields[19]:  # a new process, or a reused PID
            entry = self.processes[pid] = {"start": fields[19], "first_s": now}
        # Read again each time: a Ray worker takes its actor's name only once it runs it.
        entry["role"] = process_role(_cmdline(pid))
        entry["last_s"] = now
        entry["cpu_s"] = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime + stime

    def timeline(self) -> dict[str, dict[str, float]]:
        """Per role: when its first process appeared, when its last was last seen, CPU seconds, count."""
        roles: dict[str, dict[str, float]] = {}
        for entry in self.processes.values():
            row = roles.setdefault(entry["role"], {"first_s": entry["first_s"], "last_s": entry["last_s"],
                                                   "cpu_s": 0.0, "processes": 0})
            row["first_s"] = min(row["first_s"], entry["first_s"])
            row["last_s"] = max(row["last_s"], entry["last_s"])
            row["cpu_s"] += entry["cpu_s"]
            row["processes"] += 1
        return dict(sorted(roles.items(), key=lambda item: item[1]["first_s"]))


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

# The roles a report names (fedmeta.simulations.perf reads these three).
ROLE_ACTORS = "ClientApp actors (Ray)"
ROLE_RAY_SERVICES = "Ray services (GCS, raylet, dashboard)"
ROLE_SIMULATION = "flwr-simulation (ServerApp, Ray driver)"

# What each process of a Flower simulation is, from its command line (first match wins).
_ROLES = (
    ("ray::ClientAppActor", ROLE_ACTORS),
    ("ray::", "Ray agents and idle workers"),
    ("default_worker.py", "Ray agents and idle workers"),
    ("/ray/", ROLE_RAY_SERVICES),
    ("flwr-simulation", ROLE_SIMULATION),
    ("flower-superexec", "SuperExec"),
    ("flower-superlink", "SuperLink"),
    ("flower-supernode", "SuperNode"),
    ("bin/flwr ", "flwr CLI (run, list)"),
)


def process_role(cmdline: str) -> str:
    return next((role for needle, role in _ROLES if needle in cmdline), "other")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


__all__ = ["TAG_VAR", "Terminated", "TreeMemorySampler", "process_role", "run_command", "stop_processes", "tagged",
           "workers_end_with_signal"]
