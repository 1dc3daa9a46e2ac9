"""What an operator reads in ``flwr log <run-id>`` and ``flwr run --stream``: one line per round.

Flower 1.41 runs the ServerApp in a process of its own (``flwr-serverapp`` in a deployment,
``flwr-simulation`` in a simulation) and mirrors that process's stdout and stderr, write by write,
into the run's log on the SuperLink (``flwr.supercore.logger.mirror_output_to_queue``, uploaded by
``start_log_uploader``); ``flwr log`` and ``flwr run --stream`` print that log. Python's logging
reaches it only through a handler writing to those streams, and ``fedmeta.server`` had none: its INFO
lines were dropped and its warnings came out bare through logging's last resort. :func:`to_run_log`
gives it one while the ServerApp runs under Flower, and :class:`ProgressLog` writes a start line, one
line per round and a final line::

    fedmeta INFO: start: fomaml, rounds 1-10, dp central
    fedmeta INFO: round 3/10 | sites sampled 4, answered 3, dropped 1 (timeout 1) | closed at round-deadline
    (quorum met) | benched 1 | epsilon 1.84 | meta-loss 0.4321 | checkpoint written /runs/exp1/checkpoint.pt
    fedmeta INFO: done: round 10/10 | epsilon 3.12 | replies dropped 2, rounds without update 0, failed
    evaluations 0 | final checkpoint /runs/exp1/checkpoint.pt

(each a single line). Counts and drop kinds only: no node ids, no site's own words (a site's error
text may name its files), ASCII only (a ServerApp's stdout may not encode ``ε``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from flwr.supercore.constant import TaskType

from fedmeta.common.config import RunConfig
from fedmeta.common.protocol import QUERY_LOSS_AFTER, dice_mean_key
from fedmeta.server.coordinator import Coordinator, RoundOutcome
from fedmeta.server.listeners import BASELINE, FAILED, STOPPED, TRAINING, RoundReport, RunListener
from fedmeta.server.operator_metrics import DROP_KINDS

log = logging.getLogger("fedmeta.server")

LINE_FORMAT = "fedmeta %(levelname)s: %(message)s"
# How a round closed (fedmeta.server.rounds.Collected.closed_by), when it did not simply have every reply in.
_CLOSED = {"deadline": "closed at round-deadline (quorum met)", "timeout": "closed at round-timeout"}


# -- the lines ------------------------------------------------------------------------------------------


def start_line(config: RunConfig, start_round: int) -> str:
    """``start: fomaml, rounds 1-10`` (``resume after round 4: ...`` for a resumed run), and DP or SecAgg+ when on."""
    head = f"resume after round {start_round}" if start_round else "start"
    rounds = (f"rounds {start_round + 1}-{config.num_rounds}" if start_round < config.num_rounds
              else "no round left to run")
    parts = [config.algorithm, rounds]
    if config.dp != "none":
        parts.append(f"dp {config.dp}")
    if config.secure_aggregation != "none":
        parts.append(config.secure_aggregation)
    return f"{head}: {', '.join(parts)}"


def round_line(report: RoundReport, config: RunConfig, checkpoint: Path | None) -> str | None:
    """The round's one line; None for a report that has none of its own (the privacy budget's stop is the
    final line's, and is warned about where it happens)."""
    if report.kind == STOPPED:
        return None
    parts = [f"round {report.server_round}/{config.num_rounds}"]
    if report.kind == FAILED:
        return f"{parts[0]} | failed: {report.record['failed'][:300]}"  # θ's meta-optimiser, in fedmeta's own words
    outcome, record = report.outcome, report.record
    if report.kind == TRAINING and outcome is not None:
        parts.append(f"sites sampled {record['sites_sampled']}, answered {len(outcome.accepted)}, "
                     f"{_dropped(outcome)}")
        if record.get("closed_by") in _CLOSED:
            parts.append(_CLOSED[record["closed_by"]])
        if record.get("benched"):
            parts.append(f"benched {len(record['benched'])}")
        if outcome.privacy:
            parts.append(f"epsilon {outcome.privacy['epsilon']:.2f}")
        if outcome.updated and QUERY_LOSS_AFTER in outcome.metrics:
            parts.append(f"meta-loss {outcome.metrics[QUERY_LOSS_AFTER]:.4f}")
        elif not outcome.updated:
            parts.append("no update")
    evaluation = report.evaluation
    if evaluation is not None:
        parts.append(_heldout(evaluation, config))
    if report.trained and checkpoint is not None:
        parts.append(f"checkpoint written {checkpoint}")
    return " | ".join(parts)


def done_line(coordinator: Coordinator, last_round: int, stopped: str, checkpoint: Path | None) -> str:
    """The run's last line after a success: how far it got, ε spent, what went missing on the way, θ's file."""
    parts = [f"done: round {last_round}/{coordinator.config.num_rounds}"]
    if stopped:
        parts.append(f"stopped by {stopped.split(':', 1)[0]}")  # "privacy budget: one more round ..." -> its name
    if coordinator.accountant is not None:
        parts.append(f"epsilon {coordinator.accountant.epsilon:.2f}")
    counters = coordinator.counters
    parts.append(f"replies dropped {counters['dropped_replies']}, rounds without update {counters['skipped_rounds']}, "
                 f"failed evaluations {counters['failed_evaluations']}")
    if checkpoint is not None and last_round:
        parts.append(f"final checkpoint {checkpoint}")
    return " | ".join(parts)


def error_line(error: BaseException, last_round: int) -> str:
    """The run's last line when it ends with ``error``: its kind only (Flower logs the error itself next)."""
    if isinstance(error, Exception):
        return f"failed after round {last_round}: {type(error).__name__} (the error follows)"
    return f"stopped after round {last_round} ({type(error).__name__}: interrupted)"


def _dropped(outcome: RoundOutcome) -> str:
    kinds = Counter(d.kind for d in outcome.dropped)
    if not kinds:
        return "dropped 0"
    order = [k for k in DROP_KINDS if k in kinds] + sorted(set(kinds) - set(DROP_KINDS))
    return f"dropped {len(outcome.dropped)} ({', '.join(f'{k} {kinds[k]}' for k in order)})"


def _heldout(evaluation: RoundOutcome, config: RunConfig) -> str:
    steps = [s for s in config.adaptation_steps if dice_mean_key(s) in evaluation.metrics]
    if steps:
        dice = "/".join(f"{evaluation.metrics[dice_mean_key(s)]:.3f}" for s in steps)
        text = f"held-out Dice {dice} after {'/'.join(str(s) for s in steps)} steps"
    else:
        text = "held-out Dice none"  # no held-out site answered usably
    if evaluation.dropped:
        text += f", held-out {_dropped(evaluation)}"
    return text


# -- the listener and the handler ---------------------------------------------------------------------


class ProgressLog(RunListener):
    """Logs the start line, one line per round and the final line on ``fedmeta.server`` at INFO."""

    def __init__(self, config: RunConfig, checkpoint: Path | None = None):
        self.config, self.checkpoint = config, checkpoint
        self.last_round, self.stopped = 0, ""

    def on_start(self, start_round: int) -> None:
        self.last_round = start_round
        log.info(start_line(self.config, start_round))

    def on_round(self, report: RoundReport) -> None:
        if report.trained:
            self.last_round = report.server_round
        if report.kind == STOPPED:
            self.stopped = str(report.record["stopped"])
        line = round_line(report, self.config, self.checkpoint)
        if line is not None:
            log.info(line)

    def on_run_end(self, coordinator: Coordinator) -> None:
        log.info(done_line(coordinator, self.last_round, self.stopped, self.checkpoint))

    def on_run_error(self, error: BaseException) -> None:
        log.error(error_line(error, self.last_round))


def in_flower_runtime() -> bool:
    """Whether this process is Flower's ServerApp process, whose output is the run's log (Flower tells its own
    processes apart by the same name: ``flwr.supercore.exit``). fedmeta's in-process engine runs the ServerApp in
    the researcher's own command, whose console shows rounds its own way."""
    return sys.argv[0].endswith((TaskType.SERVER_APP.value, TaskType.SIMULATION.value))


@contextlib.contextmanager
def to_run_log(stream: TextIO | None = None) -> Iterator[None]:
    """While the ``with`` lasts, ``fedmeta.server`` logs INFO and above to ``stream`` (default: stdout, as it is
    now). When logging is configured already (a handler on the way to the root), no handler is added: each line
    would be printed twice."""
    logger = logging.getLogger("fedmeta.server")
    handler = None
    if not logger.hasHandlers():
        handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
        handler.setFormatter(logging.Formatter(LINE_FORMAT))
        logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.setLevel(level)
        if handler is not None:
            logger.removeHandler(handler)
            handler.flush()


__all__ = ["LINE_FORMAT", "ProgressLog", "done_line", "error_line", "in_flower_runtime", "round_line", "start_line",
           "to_run_log"]
