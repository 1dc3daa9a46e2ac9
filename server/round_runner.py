"""One round from the server's side: the sites it asks, the replies it folds into θ, the record it leaves.

:class:`RoundRunner` waits for enough training sites, samples them, sends θ (in the clear, or under
SecAgg+: ``fedmeta.server.secure_aggregation``), has the :class:`~fedmeta.server.coordinator.Coordinator`
validate and aggregate the replies and step θ, lets the held-out sites adapt and report Dice when an
evaluation is due, and returns the round's :class:`~fedmeta.server.listeners.RoundReport`. What it
learns while a round runs (the federation's size, the bytes of the replies) it tells the listeners at
once; everything else they read from the report.
"""

from __future__ import annotations

import logging
import time

from flwr.serverapp import Grid

from fedmeta.common.metaopt import MetaOptimizerStateError
from fedmeta.server.coordinator import Coordinator, RoundOutcome
from fedmeta.server.listeners import BASELINE, FAILED, STOPPED, TRAINING, RoundReport, RunListener
from fedmeta.server.rounds import Membership, collect, wait_for_training_sites
from fedmeta.server.secure_aggregation import secure_training_round

log = logging.getLogger("fedmeta.server")


class RoundRunner:
    """Runs the rounds of one federation and reports each; ``listeners`` hear what is collected as it comes."""

    def __init__(self, grid: Grid, coordinator: Coordinator, membership: Membership, listeners: RunListener):
        self.grid, self.coordinator, self.membership, self.listeners = grid, coordinator, membership, listeners
        self.config = coordinator.config

    def join(self) -> None:
        """Waits for min-sites training sites, and lets every site connected at the start answer its role."""
        wait_for_training_sites(self.grid, self.membership, self.config, settle=True)
        log.info("federation: %d training and %d held-out sites", len(self.membership.training()),
                 len(self.membership.heldout()))
        self.listeners.on_federation(self.membership)

    def baseline(self) -> RoundReport | None:
        """Round 0: the held-out sites evaluate θ before any training; None when nothing evaluates."""
        if self.config.eval_every <= 0 or not self.membership.heldout():
            return None
        evaluation = self.evaluate(0)
        return RoundReport(0, BASELINE, {"round": 0, "heldout": heldout_summary(evaluation)}, evaluation=evaluation)

    def train(self, server_round: int) -> RoundReport:
        """One training round, and the held-out evaluation when one is due; a STOPPED or FAILED report when the
        round could not run (the privacy budget) or broke θ's meta-optimiser."""
        began = time.perf_counter()
        # Membership is re-read every round: late and restarted sites join, departed ones leave.
        train_nodes = wait_for_training_sites(self.grid, self.membership, self.config)
        self.listeners.on_federation(self.membership)
        over_budget = self.coordinator.budget_exceeded(len(train_nodes))
        if over_budget:  # before sampling: a resumed run with a larger budget draws what this one would have
            return self._stopped(server_round, over_budget)
        chosen, round_seed = self.coordinator.sample_sites(train_nodes)
        try:
            outcome, closed_by, took_part = self._exchange(server_round, chosen, round_seed)
        except MetaOptimizerStateError as err:  # θ can no longer learn: said in the log of rounds, then loudly
            return RoundReport(server_round, FAILED, {"round": server_round, "failed": str(err)})
        self.membership.record(chosen, took_part)
        record = training_record(server_round, len(chosen), outcome, closed_by, self.membership.benched())
        evaluation = None
        if self._evaluation_due(server_round):
            self.membership.refresh(self.grid)  # a held-out site that joined late is evaluated too
            if self.membership.heldout():
                evaluation = self.evaluate(server_round)
                record["heldout"] = heldout_summary(evaluation)
        record["seconds"] = time.perf_counter() - began
        return RoundReport(server_round, TRAINING, record, outcome, evaluation)

    def evaluate(self, server_round: int) -> RoundOutcome:
        """The held-out sites adapt θ and report Dice (each site counts once)."""
        config, nodes = self.config, self.membership.heldout()
        collected = collect(self.grid, self.coordinator.evaluate_messages(server_round, nodes),
                            quorum=config.quorum(len(nodes)), deadline=config.round_deadline,
                            timeout=config.round_timeout)
        self.listeners.on_replies(collected.messages)
        evaluation = self.coordinator.collect_evaluation(server_round, nodes, collected)
        self.membership.record(nodes, evaluation.accepted)
        self.membership.expect_late(collected, f"the evaluation of round {server_round}")
        return evaluation

    def _exchange(self, server_round: int, chosen: list[int], round_seed: int) -> tuple[RoundOutcome, str, set[int]]:
        """Sends θ to the chosen sites and folds their replies in: (outcome, how the round closed, who took part)."""
        config = self.config
        if config.secure_aggregation == "none":
            collected = collect(self.grid, self.coordinator.train_messages(server_round, chosen, round_seed),
                                quorum=config.quorum(len(chosen)), deadline=config.round_deadline,
                                timeout=config.round_timeout)
            self.listeners.on_replies(collected.messages)
            outcome = self.coordinator.apply_train_replies(server_round, chosen, collected)
            self.membership.expect_late(collected, f"round {server_round}")
            return outcome, collected.closed_by, set(outcome.accepted)
        # Four exchanges per round; the server learns only the sum (fedmeta.server.secure_aggregation).
        received, outcome, took_part = secure_training_round(self.grid, self.coordinator, server_round, chosen,
                                                             round_seed)
        self.listeners.on_replies(received)
        return outcome, "secagg", took_part

    def _evaluation_due(self, server_round: int) -> bool:
        every = self.config.eval_every
        return every > 0 and (server_round % every == 0 or server_round == self.config.num_rounds)

    def _stopped(self, server_round: int, why: str) -> RoundReport:
        log.warning("stopping before round %d: %s; θ of round %d is final", server_round, why, server_round - 1)
        record = {"stopped": why, "after_round": server_round - 1,
                  "privacy": {"epsilon": self.coordinator.accountant.epsilon, "delta": self.config.dp_delta}}
        return RoundReport(server_round, STOPPED, record)


def training_record(server_round: int, sampled: int, outcome: RoundOutcome, closed_by: str,
                    benched: list[int]) -> dict:
    """A training round's line in metrics.jsonl (less ``heldout`` and ``seconds``, which come later)."""
    record = {
        "round": server_round,
        "sites_sampled": sampled,
        "sites_answered": len(outcome.accepted),
        "updated": outcome.updated,
        "closed_by": closed_by,
        "dropped": [{"node_id": d.node_id, "reason": d.reason, "kind": d.kind} for d in outcome.dropped],
        "train": outcome.metrics,
    }
    if outcome.aggregation:
        record["aggregation"] = outcome.aggregation
    if outcome.reply_norms:  # in site order, by node: who sent how large a reply (none under DP or SecAgg)
        record["reply_norms"] = [{"node_id": n, "norm": norm} for n, norm in outcome.reply_norms.items()]
    if outcome.privacy:
        record["privacy"] = outcome.privacy
    if benched:
        record["benched"] = benched
    return record


def heldout_summary(evaluation: RoundOutcome) -> dict:
    """A held-out evaluation's part of a round's line: who answered, who was dropped, Dice by site and overall."""
    return {
        "sites_answered": len(evaluation.accepted),
        "dropped": [{"node_id": d.node_id, "reason": d.reason, "kind": d.kind} for d in evaluation.dropped],
        "summary": evaluation.metrics,
        "sites": {str(n): m for n, m in sorted(evaluation.accepted.items())},
    }


__all__ = ["RoundRunner", "heldout_summary", "training_record"]
