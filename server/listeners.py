"""What a federated run tells its observers: the report of each round, and the listeners that take it.

The round loop (``fedmeta.server.app``) never writes a file or a metric itself: each round ends in a
:class:`RoundReport` (its metrics.jsonl record and the outcomes behind it), handed to every
:class:`RunListener` in turn — the metrics.jsonl log, the checkpoint writer, the release signer, the
operators' Prometheus series, the progress line in the run's log (``fedmeta.server.run_log``). An
observer is a new listener in the list the ServerApp builds; the loop does not change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the coordinator and the run config load torch and Flower (+2.7 s), which a
    # reader of metrics.jsonl (fedmeta.server.metrics: `fedmeta benchmark --help`, perf) must not wait for
    from flwr.app import Message

    from fedmeta.server.coordinator import Coordinator, RoundOutcome
    from fedmeta.server.rounds import Membership

# RoundReport.kind
BASELINE = "baseline"  # round 0: the held-out sites evaluate θ before any training
TRAINING = "training"  # a training round (and, when due, its held-out evaluation)
STOPPED = "stopped"  # the privacy budget stopped the run before this round
FAILED = "failed"  # the meta-optimiser's state broke in this round: the run stops


@dataclass
class RoundReport:
    """One line of the log of rounds (``record``, as metrics.jsonl holds it) and the outcomes behind it."""

    server_round: int
    kind: str  # BASELINE | TRAINING | STOPPED | FAILED
    record: dict[str, Any]
    outcome: RoundOutcome | None = None  # training rounds: what the sampled sites' replies did
    evaluation: RoundOutcome | None = None  # when the held-out sites evaluated θ this round

    @property
    def trained(self) -> bool:
        """A training round that ran to its end (θ may or may not have moved): it is checkpointed."""
        return self.kind == TRAINING


class RunListener:
    """Observes a federated run; every hook is optional (each does nothing unless overridden)."""

    def on_start(self, start_round: int) -> None:
        """Before the first round: ``start_round`` is the round a resumed run continues after (0: a fresh run)."""

    def on_federation(self, membership: Membership) -> None:
        """The federation as the loop sees it now: at the start, and before every round."""

    def on_replies(self, replies: Sequence[Message]) -> None:
        """Every reply that arrived in one exchange with the sites, valid or not, as soon as it is collected."""

    def on_round(self, report: RoundReport) -> None:
        """A round ended (or stopped or failed) with this report."""

    def on_run_end(self, coordinator: Coordinator) -> None:
        """The run ended as a success; ``coordinator`` holds the final θ."""

    def on_run_error(self, error: BaseException) -> None:
        """The run ends with ``error`` (it is raised on after the listeners heard it): a failure, or an
        interruption (``flwr stop`` reaches the ServerApp as SystemExit). Must not raise."""


class Listeners(RunListener):
    """Several listeners as one: each hook calls them in the order given."""

    def __init__(self, listeners: Iterable[RunListener]):
        self.listeners = list(listeners)

    def on_start(self, start_round: int) -> None:
        for listener in self.listeners:
            listener.on_start(start_round)

    def on_federation(self, membership: Membership) -> None:
        for listener in self.listeners:
            listener.on_federation(membership)

    def on_replies(self, replies: Sequence[Message]) -> None:
        for listener in self.listeners:
            listener.on_replies(replies)

    def on_round(self, report: RoundReport) -> None:
        for listener in self.listeners:
            listener.on_round(report)

    def on_run_end(self, coordinator: Coordinator) -> None:
        for listener in self.listeners:
            listener.on_run_end(coordinator)

    def on_run_error(self, error: BaseException) -> None:
        for listener in self.listeners:
            listener.on_run_error(error)


__all__ = ["BASELINE", "FAILED", "STOPPED", "TRAINING", "Listeners", "RoundReport", "RunListener"]
