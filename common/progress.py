"""Progress lines for long phases: a heartbeat while a phase has nothing to say, a pace when it has too much.

A phase with items to count says so itself ("trained round 3/8"); a phase without (an engine starting, a
library call that runs for minutes) gets a line every ``every`` seconds from a daemon thread::

    with Heartbeat("perf meta", quiet=quiet) as beat:
        for i, case in enumerate(cases, 1):
            beat.update(f"timing {case}")              # the "(what)" of the next heartbeat line
            ...
            beat.say(f"perf meta: timed {case} ({i}/{len(cases)})")  # printed; the heartbeat waits again

prints, when a case takes longer than ``every``, ``perf meta: still running, 40 s (timing maml)``.
A line the phase printed some other way (another thread's, a subprocess's) counts when it calls
:meth:`Heartbeat.touch`. ``quiet`` silences both the heartbeat and :meth:`Heartbeat.say`.

The other way round, a phase with a line per item (a case read, a step taken, a subject rendered) says one
every so often, not thousands: :func:`paced` forwards at most one line per ``every_s`` seconds, the first
always::

    say = paced(progress)
    for done in range(1, steps + 1):
        ...
        say(f"  adapting: step {done}/{steps}")
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

EVERY_S = 10.0
# A long phase (reading a site, adapting) says where it is at least this often: a hospital's log that stays
# quiet for long reads as a hang (issue 27).
PROGRESS_EVERY_S = 5.0


class Heartbeat:
    """Prints ``<phase>: still running, <s> s (<what>)`` every ``every`` seconds unless the phase printed since.

    Args:
        phase: names the phase at the start of each line (``"simulate: comparison"``).
        what: what the phase is doing now, in brackets at the end; :meth:`update` changes it.
        every: seconds of silence before a heartbeat line, > 0.
        quiet: print nothing at all (the command's ``--quiet``).
        stream: where lines go; default: ``sys.stdout`` as it is when a line is printed (pytest's capsys
            swaps it).
        clock: seconds, monotonic; tests give their own.
    """

    def __init__(self, phase: str, *, what: str = "", every: float = EVERY_S, quiet: bool = False,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if not every > 0:
            raise ValueError(f"every={every!r}: the seconds between heartbeat lines must be > 0.")
        self.phase, self.what, self.every, self.quiet = phase, what, float(every), quiet
        self._stream, self._clock = stream, clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._began = self._last = clock()

    def __enter__(self) -> "Heartbeat":
        self._began = self._last = self._clock()
        if not self.quiet:
            self._thread = threading.Thread(target=self._loop, name=f"heartbeat: {self.phase}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def elapsed(self) -> float:
        """Seconds since the phase began."""
        return self._clock() - self._began

    def update(self, what: str) -> None:
        """What the phase does now: the bracket of the next heartbeat line (prints nothing itself)."""
        with self._lock:
            self.what = what

    def touch(self) -> None:
        """The phase printed a line some other way: the heartbeat waits ``every`` seconds from now."""
        with self._lock:
            self._last = self._clock()

    def say(self, line: str) -> None:
        """Prints ``line`` (unless quiet) and counts it as the phase's own progress line."""
        with self._lock:
            self._last = self._clock()
            if not self.quiet:
                self._print(line)

    def beat_if_due(self) -> bool:
        """Prints the heartbeat line if the phase has been silent ``every`` seconds; True if it did. The
        thread calls this; a test may call it with its own clock."""
        with self._lock:
            now = self._clock()
            if self.quiet or now - self._last < self.every:
                return False
            self._last = now
            self._print(f"{self.phase}: still running, {now - self._began:.0f} s" + (f" ({self.what})" if self.what else ""))
            return True

    def _print(self, line: str) -> None:
        print(line, file=self._stream or sys.stdout, flush=True)

    def _loop(self) -> None:
        while True:
            with self._lock:
                wait = max(0.05, self._last + self.every - self._clock())
            if self._stop.wait(wait):
                return
            self.beat_if_due()


def paced(progress: Callable[[str], None], every_s: float = PROGRESS_EVERY_S, *,
          clock: Callable[[], float] = time.monotonic) -> Callable[[str], None]:
    """``progress`` at most once per ``every_s`` seconds (the first line always): a long loop shows it is alive
    without a line per item. ``clock``: seconds, monotonic; tests give their own."""
    last = -math.inf

    def say(line: str) -> None:
        nonlocal last
        now = clock()
        if now - last >= every_s:
            last = now
            progress(line)

    return say


__all__ = ["EVERY_S", "PROGRESS_EVERY_S", "Heartbeat", "paced"]
