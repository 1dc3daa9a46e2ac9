"""The heartbeat of long phases: a line after every period of silence, none when the phase spoke, none when quiet;
and the pace of chatty ones: at most a line per period, the first at once."""

from __future__ import annotations

import io
import time

import pytest

from fedmeta.common.progress import PROGRESS_EVERY_S, Heartbeat, paced


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _beat(**changes):
    clock, stream = Clock(), io.StringIO()
    return Heartbeat("perf meta", what="timing maml", every=10, stream=stream, clock=clock, **changes), clock, stream


def test_a_silent_phase_gets_a_line_every_period_with_its_elapsed_time_and_what_it_does():
    beat, clock, stream = _beat()
    clock.now += 9.9
    assert not beat.beat_if_due()
    clock.now += 0.1
    assert beat.beat_if_due()
    clock.now += 5
    assert not beat.beat_if_due()  # the period counts from the last line
    beat.update("peak memory of anil")
    clock.now += 25
    assert beat.beat_if_due()
    assert stream.getvalue().splitlines() == ["perf meta: still running, 10 s (timing maml)",
                                              "perf meta: still running, 40 s (peak memory of anil)"]


def test_a_line_of_the_phase_itself_puts_the_heartbeat_off():
    beat, clock, stream = _beat()
    clock.now += 8
    beat.say("perf meta: timed round 1/5 in 8 s")
    clock.now += 8
    assert not beat.beat_if_due()
    beat.touch()  # a line printed some other way (simulate's round lines)
    clock.now += 9
    assert not beat.beat_if_due()
    clock.now += 1
    assert beat.beat_if_due()
    assert stream.getvalue().splitlines() == ["perf meta: timed round 1/5 in 8 s", "perf meta: still running, 26 s (timing maml)"]


def test_quiet_prints_nothing_neither_heartbeat_nor_say():
    beat, clock, stream = _beat(quiet=True)
    with beat:
        beat.say("perf meta: timed round 1/5")
        clock.now += 60
        assert not beat.beat_if_due()
    assert stream.getvalue() == ""


def test_the_thread_speaks_while_the_phase_is_silent_and_stops_with_it():
    stream = io.StringIO()
    with Heartbeat("simulate: comparison", every=0.05, stream=stream) as beat:
        deadline = time.monotonic() + 10  # generous: a loaded machine may be slow to schedule the thread
        while "still running" not in stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
    lines = stream.getvalue().count("\n")
    assert "simulate: comparison: still running" in stream.getvalue()
    time.sleep(0.2)
    assert stream.getvalue().count("\n") == lines  # nothing after the phase ended
    assert not beat._thread


@pytest.mark.parametrize("every", [0, -1, float("nan")])
def test_a_period_that_is_not_positive_is_refused(every):
    with pytest.raises(ValueError, match="every="):
        Heartbeat("x", every=every)


def test_paced_forwards_the_first_line_at_once_then_at_most_one_per_period_from_the_last_forwarded():
    clock, said = Clock(), []
    say = paced(said.append, 5, clock=clock)
    for step in range(1, 13):  # a line offered every second
        say(f"step {step}")
        clock.now += 1
    clock.now += 0.5  # t = 12.5: 2.5 s after "step 11" was forwarded
    say("late")
    clock.now += 2.5
    say("due")  # 5 s after "step 11", however many were dropped on the way
    assert said == ["step 1", "step 6", "step 11", "due"]


def test_paced_keeps_the_projects_pace_by_default():
    clock, said = Clock(), []
    say = paced(said.append, clock=clock)
    say("a")
    clock.now += PROGRESS_EVERY_S - 1
    say("b")
    clock.now += 1
    say("c")
    assert said == ["a", "c"]
