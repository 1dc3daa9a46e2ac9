"""Metrics for the consortium's operators: the ServerApp's Prometheus series, in its out-dir and on ``/metrics``.

Every run writes its series to ``server-metrics.prom`` in its out-dir at its start, before and after
every round and at its end, which ``fedmeta server-metrics`` serves between runs too
(``fedmeta.server.server_metrics``). The ServerApp serves them itself only while it runs, when run config
``metrics-port`` is set (``metrics-address`` defaults to loopback; a coordinator whose Prometheus runs
elsewhere sets it to the interface Prometheus reaches). Every series lives in a registry of its own, so
two runs in one process never share a counter, and the HTTP server stops with the run. Names follow
Prometheus' conventions: the ``fedmeta_`` prefix, base units (``_seconds``, ``_bytes``), ``_total`` for
counters. ``deploy/`` dashboards query exactly :data:`METRIC_NAMES`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Message
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.openmetrics.exposition import generate_latest

from fedmeta.common.protocol import QUERY_LOSS_AFTER, dice_mean_key
from fedmeta.server.coordinator import Coordinator, RoundOutcome
from fedmeta.server.listeners import RoundReport, RunListener
from fedmeta.server.rounds import Membership
from fedmeta.server.server_metrics import write_state

log = logging.getLogger("fedmeta.server")

# The exported series (as a scrape shows them: counters end in _total, histograms add _bucket/_sum/_count).
METRIC_NAMES = (
    "fedmeta_round",
    "fedmeta_rounds_total",
    "fedmeta_round_duration_seconds",
    "fedmeta_training_sites",
    "fedmeta_heldout_sites",
    "fedmeta_benched_sites",
    "fedmeta_sites_sampled_total",
    "fedmeta_sites_answered_total",
    "fedmeta_sites_dropped_total",
    "fedmeta_received_bytes_total",
    "fedmeta_meta_loss",
    "fedmeta_heldout_dice",
    "fedmeta_last_checkpoint_timestamp_seconds",
    "fedmeta_dp_epsilon",
    "fedmeta_run_active",
    "fedmeta_run_state",
    "fedmeta_run_updated_timestamp_seconds",
)
DROP_KINDS = ("timeout", "node-gone", "site-error", "secagg-refused", "invalid", "over-norm", "unexpected")
# How a run ends: completed (its last round, or the privacy budget, stopped it), failed (an error), stopped
# (interrupted: `flwr stop`, a signal).
RUN_STATES = ("running", "completed", "failed", "stopped")


class OperatorMetrics(RunListener):
    """The server's series, updated as the run reports its rounds; ``serve(port)`` exposes them over HTTP.

    ``adaptation_steps``: the held-out evaluation's step counts (run config ``eval-steps``), one Dice series each.
    ``state_path``: where the series are written whenever they change (the run's out-dir/server-metrics.prom).
    """

    def __init__(self, adaptation_steps: Iterable[int] = (), state_path: Path | None = None) -> None:
        self.adaptation_steps = tuple(adaptation_steps)
        self.state_path = state_path
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.round = Gauge("fedmeta_round", "Last finished training round", registry=r)
        self.rounds = Counter("fedmeta_rounds", "Training rounds finished by this server process", registry=r)
        self.round_duration = Histogram(
            "fedmeta_round_duration_seconds", "Wall time of a round (training and, when due, held-out evaluation)",
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800), registry=r)
        self.training_sites = Gauge("fedmeta_training_sites", "Training sites that may be sampled now", registry=r)
        self.heldout_sites = Gauge("fedmeta_heldout_sites", "Held-out (evaluation-only) sites online", registry=r)
        self.benched_sites = Gauge("fedmeta_benched_sites",
                                   "Sites left out after missing max-missed-rounds rounds in a row", registry=r)
        self.sampled = Counter("fedmeta_sites_sampled", "Site requests sent (train messages)", registry=r)
        self.answered = Counter("fedmeta_sites_answered", "Valid site replies aggregated", registry=r)
        self.dropped = Counter("fedmeta_sites_dropped", "Site replies dropped, by reason", ["reason"], registry=r)
        self.received = Counter("fedmeta_received_bytes", "Array payload bytes received from sites", registry=r)
        self.meta_loss = Gauge("fedmeta_meta_loss", "Mean query loss after adaptation, last updated round", registry=r)
        self.heldout_dice = Gauge("fedmeta_heldout_dice", "Held-out sites' mean Dice after k-shot adaptation",
                                  ["steps"], registry=r)
        self.checkpoint_time = Gauge("fedmeta_last_checkpoint_timestamp_seconds",
                                     "Unix time of the last checkpoint written", registry=r)
        self.dp_epsilon = Gauge("fedmeta_dp_epsilon", "Site-level DP epsilon spent so far (at run config dp-delta)",
                                registry=r)
        self.run_active = Gauge("fedmeta_run_active", "1 while the ServerApp runs, 0 once the run ended", registry=r)
        self.run_state = Gauge("fedmeta_run_state", "1 for the run's state: running, completed, failed or stopped",
                               ["state"], registry=r)
        self.updated = Gauge("fedmeta_run_updated_timestamp_seconds",
                             "Unix time the ServerApp last wrote these series (its start, every round, its end)",
                             registry=r)
        for kind in DROP_KINDS:  # every reason exists from the start, so a rate() never sees a gap
            self.dropped.labels(reason=kind)
        self._server = None
        self._write_failed = False

    def serve(self, port: int, address: str = "127.0.0.1") -> None:
        """Starts the HTTP endpoint (a daemon thread); a port in use is reported and the run goes on."""
        try:
            self._server, _thread = start_http_server(port, addr=address, registry=self.registry)
        except Exception as err:  # noqa: BLE001 - operators' metrics must never stop the federation
            log.error("operator metrics: cannot listen on %s:%d (%s); the run goes on without /metrics", address, port, err)
            return
        log.info("operator metrics on http://%s:%d/metrics", address, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- what the run reports (fedmeta.server.listeners) ------------------------------------------

    def on_start(self, start_round: int) -> None:
        self.round.set(start_round)  # a resumed run continues after its checkpoint's round
        self._set_state("running")

    def on_federation(self, membership: Membership) -> None:
        """Site counts as the round loop sees them now."""
        self.training_sites.set(len(membership.training()))
        self.heldout_sites.set(len(membership.heldout()))
        self.benched_sites.set(len(membership.benched()))
        self._write()

    def on_replies(self, replies: Iterable[Message]) -> None:
        """Counts the array bytes of every reply that arrived (valid or not): what the server received."""
        total = 0
        for reply in replies:
            if reply.has_content():
                total += sum(len(array.data) for record in reply.content.array_records.values()
                             for array in record.values())
        self.received.inc(total)

    def on_round(self, report: RoundReport) -> None:
        if report.trained:
            self._training(report.outcome, report.record["sites_sampled"])
        if report.evaluation is not None:
            self._evaluation(report.evaluation.metrics)
        if report.trained:  # the checkpoint writer takes each round before this listener
            self.checkpoint_time.set(time.time())
            self.round.set(report.server_round)
            self.rounds.inc()
            self.round_duration.observe(report.record["seconds"])
        self._write()

    def on_run_end(self, coordinator: Coordinator) -> None:
        self._set_state("completed")

    def on_run_error(self, error: BaseException) -> None:
        self._set_state("failed" if isinstance(error, Exception) else "stopped")

    def _set_state(self, state: str) -> None:
        for name in RUN_STATES:
            self.run_state.labels(state=name).set(name == state)
        self.run_active.set(state == "running")
        self._write()

    def _write(self) -> None:
        """Writes the series to ``state_path``; a failure is logged once and never stops the federation."""
        if self.state_path is None:
            return
        self.updated.set(time.time())
        try:
            write_state(self.state_path, generate_latest(self.registry))
        except Exception as err:  # noqa: BLE001 - operators' metrics must never stop the federation
            if not self._write_failed:
                self._write_failed = True
                log.error("operator metrics: cannot write %s (%s); fedmeta server-metrics will not see this run",
                          self.state_path, err)

    def _training(self, outcome: RoundOutcome, sampled: int) -> None:
        self.sampled.inc(sampled)
        self.answered.inc(len(outcome.accepted))
        for drop in outcome.dropped:
            self.dropped.labels(reason=drop.kind).inc()
        if outcome.updated and QUERY_LOSS_AFTER in outcome.metrics:
            self.meta_loss.set(outcome.metrics[QUERY_LOSS_AFTER])
        if outcome.privacy:
            self.dp_epsilon.set(outcome.privacy["epsilon"])

    def _evaluation(self, metrics: dict[str, float]) -> None:
        for s in self.adaptation_steps:
            if dice_mean_key(s) in metrics:
                self.heldout_dice.labels(steps=str(s)).set(metrics[dice_mean_key(s)])


__all__ = ["DROP_KINDS", "METRIC_NAMES", "RUN_STATES", "OperatorMetrics"]
