"""The round coordinator: which sites train, what they receive, which replies count, how θ moves.

Not a Flower ``Strategy`` (its methods take other arguments, so they carry other names): the
ServerApp's own loop calls :meth:`Coordinator.train_messages`, then
:meth:`Coordinator.apply_train_replies`, and likewise for held-out evaluation. FedOpt's pattern on
the Message API: the weighted mean of the sites' meta-gradients is a
(pseudo-)gradient for a meta-optimiser that lives across rounds (``fedmeta.common.metaopt``). Unlike Flower's
FedAvg, a reply that is late, failed or malformed is dropped with a logged reason and counted, and
the round goes on when at least ``min-sites`` replies are valid.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedmeta.common.checkpoint import Checkpoint, trajectory_hash
from fedmeta.common.config import RunConfig
from fedmeta.common.federated_round import sample_sites, site_weights, weighted_mean_scalars
from fedmeta.common.metaopt import MetaOptimizer, MetaOptimizerStateError
from fedmeta.common.model import initial_params, seeded_model
from fedmeta.common.privacy import PrivacyAccountant, RoundEvent, local_noise_split, update_norm
from fedmeta.common.protocol import (
    CONFIG_RECORD, EVAL_SEED_KEY, GRADS_RECORD, METRICS_RECORD, NUM_EXAMPLES, PARAMS_RECORD, ROUND_KEY,
    ROUND_SEED_KEY, SAMPLED_SITES_KEY, SECAGG_REFUSED, STEP_SIZE_PREFIX, TRAIN_SLICES, dice_key, dice_mean_key, dice_worst_key,
    version_stamp, worst_patient_key,
)
from fedmeta.common.records import from_array_record, pack_params
from fedmeta.server.aggregation import Aggregate, aggregate, check_finite, reply_norm_ok
from fedmeta.server.rounds import Collected

log = logging.getLogger("fedmeta.server")

# The largest training-slice count a site may report: far above any hospital's labelled slices, and
# small enough that a sum of them stays exact in float64.
MAX_TRAIN_SLICES = 2**31

# A reply this many times the round's norm bound is logged as a warning, not only scaled down.
OUTLIER_NORM_RATIO = 10.0


@dataclass
class Drop:
    node_id: int
    reason: str
    kind: str = "invalid"  # timeout | node-gone | site-error | secagg-refused | invalid | over-norm | unexpected: the operator metrics' label


@dataclass
class RoundOutcome:
    """What a round did: valid replies by node, dropped ones with reasons, and scalar summaries."""

    accepted: dict[int, dict[str, float]] = field(default_factory=dict)
    dropped: list[Drop] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    updated: bool = False
    aggregation: dict = field(default_factory=dict)  # how the replies were combined (rule, trimmed, DP noise)
    privacy: dict = field(default_factory=dict)  # DP runs: epsilon at delta after this round
    reply_norms: dict[int, float] = field(default_factory=dict)  # node -> L2 norm of its accepted reply (not DP runs)

    @property
    def failed(self) -> bool:
        """Sites answered and not one reply was usable: a sign that θ or the sites are broken."""
        return not self.accepted and any(d.kind in ("site-error", "invalid", "over-norm") for d in self.dropped)


class Coordinator:
    """Holds θ, its meta-optimiser and the server RNG; builds round messages and folds in replies.

    Node roles come from the ``query`` handshake (``fedmeta.server.rounds.Membership``); this class only needs
    the sorted ids of training and held-out nodes.
    """

    def __init__(self, config: RunConfig):
        self.config = config
        model = seeded_model(config.model_config(), config.seed)
        params = initial_params(model)
        step_sizes = config.algorithm_object.initial_step_sizes(params, config)  # Meta-SGD's; None for the others
        self.expected = {
            key: (tuple(t.shape), str(t.dtype).removeprefix("torch."))
            for key, t in pack_params_dict(params, step_sizes).items()
        }
        self.meta_optimizer = MetaOptimizer(
            params,
            optimizer=config.meta_optimizer,
            lr=config.meta_lr,
            step_sizes=step_sizes,
            momentum=config.meta_momentum,
        )
        # One generator drives site sampling and episode seeds; its state is checkpointed, so a
        # resumed run draws exactly what the uninterrupted run would have drawn.
        self.rng = np.random.Generator(np.random.PCG64(config.seed))
        self.counters = {"dropped_replies": 0, "skipped_rounds": 0, "failed_evaluations": 0}
        self._site_order: dict[int, int] = {}  # node id -> position in site order (set by sample_sites)
        self._population = 0  # training sites the last round sampled from (the accountant's n)
        # Site-level DP: ε of the rounds released so far; checkpointed, so a resumed run continues the budget.
        self.accountant = PrivacyAccountant(config.dp_delta) if config.dp != "none" else None

    # -- state for checkpoints ------------------------------------------------------------------

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self.meta_optimizer.params

    @property
    def step_sizes(self) -> dict[str, torch.Tensor] | None:
        return self.meta_optimizer.step_sizes

    def rng_state(self) -> dict[str, str]:
        # JSON keeps PCG64's 128-bit integers exact and loadable with torch.load(weights_only=True).
        return {"numpy": json.dumps(self.rng.bit_generator.state)}

    def set_rng_state(self, state: Mapping[str, str]) -> None:
        self.rng.bit_generator.state = json.loads(state["numpy"])

    def privacy_state(self) -> dict | None:
        return self.accountant.state_dict() if self.accountant is not None else None

    def set_privacy_state(self, state: Mapping | None) -> None:
        if self.accountant is not None:
            if state is None:
                raise ValueError("this run uses dp but its checkpoint holds no privacy accountant; start a new run.")
            self.accountant = PrivacyAccountant.from_state_dict(state)

    def checkpoint(self, server_round: int) -> Checkpoint:
        """Everything the round after ``server_round`` depends on, as its checkpoint."""
        return Checkpoint(
            round=server_round,
            params=self.params,
            step_sizes=self.step_sizes,
            optimizer=self.meta_optimizer.state_dict(),
            rng_state=self.rng_state(),
            config_hash=trajectory_hash(self.config),
            run_config=self.config.to_run_config(),
            counters=dict(self.counters),
            privacy=self.privacy_state(),
        )

    def restore(self, checkpoint: Checkpoint) -> None:
        """Takes up the state ``checkpoint`` holds (its run config already checked against this run's).

        Raises :class:`MetaOptimizerStateError` for a meta-optimiser state that cannot step θ any more.
        """
        self.meta_optimizer.load_state_dict(checkpoint.optimizer)
        self.set_rng_state(checkpoint.rng_state)
        self.set_privacy_state(checkpoint.privacy)
        self.counters.update(checkpoint.counters)

    # -- privacy budget -------------------------------------------------------------------------

    def planned_event(self, num_train_nodes: int) -> RoundEvent:
        """The noisiest-case DP release the next round can make: σ·C on the sum, centrally or from the sites."""
        sampled = min(self.config.sites_per_round or num_train_nodes, num_train_nodes)
        sigma = self.config.dp_noise_multiplier
        # Local DP: sites split their noise over the round's quorum and refuse to unmask fewer replies, so the
        # noisiest sum the server can obtain carries σ·C, as with central DP.
        return RoundEvent(self._accounted_population(num_train_nodes, sampled), sampled, sigma)

    def _accounted_population(self, population: int, sampled: int) -> int:
        """The n the accountant sees. Sampling amplifies privacy only against someone who does not know which
        sites were sampled: with local DP the adversary is the server, which samples, so q = 1 (n = m)."""
        return sampled if self.config.dp == "local" else population

    def budget_exceeded(self, num_train_nodes: int) -> str | None:
        """Why the next round may not run (it would take ε above dp-max-epsilon), or None."""
        if self.accountant is None or not self.config.dp_max_epsilon:
            return None
        after = self.accountant.epsilon_after(self.planned_event(num_train_nodes))
        if after <= self.config.dp_max_epsilon:
            return None
        return (f"privacy budget: one more round would take epsilon from {self.accountant.epsilon:.3f} to "
                f"{after:.3f} at delta={self.config.dp_delta:g}, above dp-max-epsilon={self.config.dp_max_epsilon:g}")

    # -- training ------------------------------------------------------------------------------

    def sample_sites(self, train_nodes: Iterable[int]) -> tuple[list[int], int]:
        """This round's training nodes and the round seed for episode sampling.

        ``train_nodes`` come in site order (``fedmeta.server.rounds.Membership.training``); the chosen ones keep it,
        and aggregation follows it, so the same seed samples and sums the same sites in every run.
        """
        nodes = [int(n) for n in train_nodes]
        self._site_order = {n: i for i, n in enumerate(nodes)}
        chosen, round_seed = sample_sites(self.rng, len(nodes), self.config.sites_per_round)
        self._population = len(nodes)
        return [nodes[i] for i in chosen], round_seed

    def train_messages(self, server_round: int, node_ids: list[int], round_seed: int) -> list[Message]:
        """One train message per node: θ (and step sizes), the round and its seed."""
        # The sampled count lets local DP split the round's noise over the sites (σ·C/√m each).
        content = self.content(server_round, {ROUND_SEED_KEY: round_seed, SAMPLED_SITES_KEY: len(node_ids)})
        # ttl: a site that wakes up after the round closed does not train on a round long gone.
        return [Message(content, node_id, MessageType.TRAIN, ttl=self.config.round_timeout, group_id=str(server_round))
                for node_id in node_ids]

    def apply_train_replies(
        self, server_round: int, sent_to: Iterable[int], replies: Collected | Iterable[Message]
    ) -> RoundOutcome:
        """Validates every reply, aggregates the valid ones in site order, steps θ.

        ``replies``: what :func:`fedmeta.server.rounds.collect` gathered (each reply attributed to the
        node it was sent to, nodes gone and how the round closed), or bare replies (by sender).
        """
        outcome = RoundOutcome()
        grads_by_node: dict[int, dict[str, torch.Tensor]] = {}
        norm_by_node: dict[int, float] = {}
        sent_to, replies = list(sent_to), _collected(replies)
        for node_id, payload in self.screen(sent_to, replies, outcome, self._validate_train):
            grads_by_node[node_id], outcome.accepted[node_id], norm_by_node[node_id] = payload
        self.note_missing(sent_to, outcome, replies)
        self.counters["dropped_replies"] += len(outcome.dropped)

        if len(outcome.accepted) < self.config.min_sites:
            self.counters["skipped_rounds"] += 1
            log.warning(
                "round %d: only %d valid replies, fewer than min-sites=%d; θ is left unchanged this round",
                server_round, len(outcome.accepted), self.config.min_sites,
            )
            return outcome

        # Site order, not arrival order: the same replies give the same bits in every run.
        order = self.in_site_order(grads_by_node)
        weights = site_weights(self.config, [outcome.accepted[n].get(TRAIN_SLICES, 1.0) for n in order])
        noise_seed = int(np.random.SeedSequence([self.config.seed, server_round, 0xD9]).generate_state(1)[0])
        combined = aggregate(self.config, [grads_by_node[n] for n in order], weights, noise_seed=noise_seed,
                             norms=[norm_by_node[n] for n in order])
        self.step(server_round, len(sent_to), outcome, combined, order, weights)
        return outcome

    def in_site_order(self, nodes: Iterable[int]) -> list[int]:
        return sorted(nodes, key=lambda n: (self._site_order.get(n, len(self._site_order)), n))

    def step(self, server_round: int, sampled: int, outcome: RoundOutcome, combined: Aggregate,
             order: list[int], weights: list[float]) -> None:
        """Steps θ with the round's combined update; fills the outcome's summaries and spends DP budget.

        A step that breaks the meta-optimiser (non-finite, out of bounds, stalled) stops the run with the
        round and each site's reply norm: no later round could undo it, and the last checkpoint is good.
        """
        outcome.aggregation = combined.record()
        if combined.norms is not None:
            outcome.reply_norms = {order[i]: norm for i, norm in enumerate(combined.norms)}
            outcome.aggregation["bounded"] = [order[i] for i in combined.bounded or []]
            self._note_bounded(server_round, combined, order)
        try:
            self.meta_optimizer.step(combined.update)
        except MetaOptimizerStateError as err:
            raise self._broken_step(server_round, err, outcome, combined, order) from None
        check_finite(self.params, server_round)
        outcome.updated = True
        if self.accountant is not None:
            outcome.privacy = self._spend(sampled, len(order))
        outcome.metrics = _summary(outcome.accepted, order, weights)

    def _note_bounded(self, server_round: int, combined: Aggregate, order: list[int]) -> None:
        """Logs the replies scaled down to the round's norm bound."""
        # Honest replies above the median are scaled a little every round (debug: the round's aggregation record in
        # metrics.jsonl lists them, and the run's log keeps one line per round); one far above the bound is a
        # hostile or broken site the operator should hear of (warning) — or, with 2 replies, the bound was set
        # by a near-zero reply: one of two sites cannot raise the bound, but it can lower it and hold the round
        # back (never move θ arbitrarily).
        far = [i for i in combined.bounded or [] if combined.norms[i] > OUTLIER_NORM_RATIO * combined.norm_bound]
        for level, which in ((logging.DEBUG, combined.bounded or []), (logging.WARNING, far)):
            if which:
                log.log(level, "round %d: %s scaled down to the norm bound %.4g (median-norm-bound=%g x the "
                        "round's median reply norm)%s", server_round,
                        ", ".join(f"node {order[i]} (norm {combined.norms[i]:.4g})" for i in which),
                        combined.norm_bound, self.config.median_norm_bound,
                        "" if level == logging.DEBUG else f": over {OUTLIER_NORM_RATIO:g}x the bound, a hostile or "
                        "broken site — or, with 2 replies, a near-zero reply set the bound")

    def _broken_step(self, server_round: int, err: MetaOptimizerStateError, outcome: RoundOutcome,
                     combined: Aggregate, order: list[int]) -> MetaOptimizerStateError:
        """The error a step that broke the meta-optimiser stops the run with: the round, its sites by reply norm
        (largest first), the last good checkpoint and what to change."""
        sites = ", ".join(f"node {n} (reply norm {outcome.reply_norms[n]:.4g})" if n in outcome.reply_norms
                          else f"node {n}" for n in sorted(order, key=lambda n: -outcome.reply_norms.get(n, 0)))
        last_good = (f"the checkpoint of round {server_round - 1} is the last good θ" if server_round > 1
                     else "no earlier round updated θ")
        return MetaOptimizerStateError(
            f"round {server_round}: {err} The replies of this round came from {sites}"
            f"{f'; each was bounded to {combined.norm_bound:.4g}' if combined.norm_bound else ''}. The run stops; "
            f"{last_good}. A reply far larger or smaller than the others is the likely cause: keep "
            "median-norm-bound on (1 by default), use a robust aggregation, sample 3 or more sites a round, or "
            "leave that site out."
        )

    def _spend(self, sampled: int, answered: int) -> dict:
        """Records the round's DP release with the accountant; returns the round record's ``privacy``."""
        sigma = self.config.dp_noise_multiplier
        if self.config.dp == "local":  # each answering site added σ·C/√q (q: the quorum of m): the sum carries σ·C·√(a/q)
            sigma *= math.sqrt(answered / local_noise_split(self.config, sampled))
        population = max(self._population, sampled)
        epsilon = self.accountant.spend(RoundEvent(self._accounted_population(population, sampled), sampled, sigma))
        record = {"epsilon": epsilon, "delta": self.config.dp_delta, "noise_multiplier": sigma,
                  "clip_norm": self.config.dp_clip_norm, "sampled": sampled, "population": population,
                  "sampling_amplification": self.config.dp != "local", "mode": self.config.dp}
        if self.config.dp_seeded_noise:
            # Noise anyone can regenerate from the run's seed protects nothing: the figure is the accountant's,
            # the guarantee is void. Said in the record itself, so no table quotes the epsilon without it.
            record["seeded_noise"] = True
            record["guarantee"] = "none: dp-seeded-noise makes the noise reproducible (simulations only)"
        return record

    # -- held-out evaluation --------------------------------------------------------------------

    def evaluate_messages(self, server_round: int, node_ids: list[int]) -> list[Message]:
        """One evaluate message per held-out node: θ (and step sizes) and the evaluation seed."""
        # A fixed seed: every evaluation adapts on the same support images, so rounds compare.
        content = self.content(server_round, {EVAL_SEED_KEY: self.config.seed})
        return [Message(content, n, MessageType.EVALUATE, ttl=self.config.round_timeout, group_id=f"eval-{server_round}")
                for n in sorted(node_ids)]

    def collect_evaluation(
        self, server_round: int, sent_to: Iterable[int], replies: Collected | Iterable[Message]
    ) -> RoundOutcome:
        """Mean and worst held-out Dice per adaptation step count (each site counts once)."""
        outcome = RoundOutcome()
        sent_to, replies = list(sent_to), _collected(replies)
        for node_id, payload in self.screen(sent_to, replies, outcome, self._validate_evaluate):
            outcome.accepted[node_id] = payload
        self.note_missing(sent_to, outcome, replies)
        self.counters["failed_evaluations"] += len(outcome.dropped)
        if outcome.accepted:
            for steps in self.config.adaptation_steps:
                values = [m[dice_key(steps)] for m in outcome.accepted.values()]
                outcome.metrics[dice_mean_key(steps)] = float(np.mean(values))
                outcome.metrics[dice_worst_key(steps)] = float(np.min(values))
        return outcome

    # -- internals ------------------------------------------------------------------------------

    def content(self, server_round: int, extra: dict[str, int]) -> RecordDict:
        return RecordDict(
            {
                PARAMS_RECORD: pack_params(self.params, self.step_sizes),
                CONFIG_RECORD: ConfigRecord(
                    {ROUND_KEY: server_round, **version_stamp(), **extra}
                ),
            }
        )

    def screen(self, sent_to, replies: Collected, outcome: RoundOutcome, validate):
        expected_nodes, seen = set(sent_to), set(replies.gone)
        for node_id, why in sorted(replies.gone.items()):
            outcome.dropped.append(Drop(node_id, f"node gone: {why}", "node-gone"))
            log.warning("node %d is gone: %s", node_id, why)
        for node_id, reply in replies.replies:
            kind = "unexpected"
            if node_id not in expected_nodes:
                reason = "reply from a node this round did not ask"
            elif node_id in seen:
                reason = "second reply from the same node"
            else:
                seen.add(node_id)
                try:
                    yield node_id, validate(reply)
                    continue
                except InvalidReply as err:
                    reason, kind = str(err), err.kind
            outcome.dropped.append(Drop(node_id, reason, kind))
            log.warning("dropped the reply of node %d: %s", node_id, reason)

    def note_missing(self, sent_to, outcome: RoundOutcome, replies: Collected) -> None:
        answered = set(outcome.accepted) | {d.node_id for d in outcome.dropped}
        if replies.closed_by == "deadline":
            reason = (f"no reply by round-deadline={self.config.round_deadline:g}s (the round closed once a quorum of "
                      f"{self.config.quorum(len(sent_to))} of {len(sent_to)} had answered)")
        else:
            reason = f"no reply before round-timeout={self.config.round_timeout:g}s"
        for node_id in sorted(set(sent_to) - answered):
            outcome.dropped.append(Drop(node_id, reason, "timeout"))
            log.warning("node %d: %s", node_id, reason)

    def _validate_train(self, reply: Message) -> tuple[dict[str, torch.Tensor], dict[str, float], float]:
        content = content_of(reply, {GRADS_RECORD, METRICS_RECORD})
        grads_record = content.array_records.get(GRADS_RECORD)
        if grads_record is None:
            raise InvalidReply(f"no ArrayRecord {GRADS_RECORD!r}")
        keys = set(grads_record.keys())
        missing, extra = sorted(set(self.expected) - keys), sorted(keys - set(self.expected))
        if missing or extra:
            raise InvalidReply(f"meta-gradient keys differ from θ: missing {missing[:3]}, unexpected {extra[:3]}")
        for key, (shape, dtype) in self.expected.items():
            array = grads_record[key]
            if tuple(array.shape) != shape or array.dtype != dtype:
                raise InvalidReply(
                    f"{key!r} is {array.dtype}{list(array.shape)}, expected {dtype}{list(shape)}"
                )
        try:
            grads = from_array_record(grads_record)
        except Exception as err:  # undecodable bytes: a corrupted or hostile reply
            raise InvalidReply(f"meta-gradient arrays do not decode ({type(err).__name__})") from None
        for key, tensor in grads.items():
            if tuple(tensor.shape) != self.expected[key][0]:
                raise InvalidReply(f"{key!r} decodes to shape {list(tensor.shape)}, not its declared shape")
            if not torch.isfinite(tensor).all():
                raise InvalidReply(f"{key!r} holds NaN or Inf")
        norm = update_norm(grads)
        if not reply_norm_ok(self.config, norm):
            raise InvalidReply(f"its L2 norm {norm:.4g} exceeds max-update-norm={self.config.max_update_norm:g}",
                               kind="over-norm")
        metrics = validated_metrics(content)
        # The weight a site claims cannot exceed what the round asked of it: one reply must not be
        # able to outweigh the federation by naming a huge example count.
        most = self.config.episodes_per_site * (self.config.k_shot + self.config.q_query)
        if metrics[NUM_EXAMPLES] > most:
            raise InvalidReply(f"{NUM_EXAMPLES} is {metrics[NUM_EXAMPLES]:g}, more than the {most} this round asked for")
        if self.config.weighting == "data":
            slices = metrics.get(TRAIN_SLICES)
            if slices is None or not 1 <= slices <= MAX_TRAIN_SLICES or slices != int(slices):
                raise InvalidReply(
                    f"{TRAIN_SLICES} is {slices!r}, expected the site's count of labelled training slices "
                    f"(1..{MAX_TRAIN_SLICES})"
                )
        return grads, metrics, norm

    def _validate_evaluate(self, reply: Message) -> dict[str, float]:
        content = content_of(reply, {METRICS_RECORD})
        metrics = validated_metrics(content)
        for steps in self.config.adaptation_steps:
            value = metrics.get(dice_key(steps))
            if value is None or not 0.0 <= value <= 1.0:
                raise InvalidReply(f"{dice_key(steps)} is {value!r}, expected a Dice in [0, 1]")
            worst = metrics.get(worst_patient_key(steps))
            if worst is not None and not 0.0 <= worst <= value:
                raise InvalidReply(f"{worst_patient_key(steps)} is {worst!r}, expected a Dice in [0, {value}]")
        return metrics


class InvalidReply(ValueError):
    """A reply the server refuses to aggregate; the message is the logged reason, ``kind`` its class."""

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.kind = kind


def _summary(accepted: Mapping[int, dict[str, float]], order: list[int], weights: list[float]) -> dict[str, float]:
    """The round's training metrics: each site's scalars weighted as its reply was, and the example and slice
    counts summed (when every site reported them)."""
    counts = (NUM_EXAMPLES, TRAIN_SLICES)
    metrics = weighted_mean_scalars([{k: v for k, v in accepted[n].items() if k not in counts} for n in order], weights)
    for key in counts:
        if all(key in accepted[n] for n in order):
            metrics[key] = float(sum(accepted[n][key] for n in order))
    return metrics


def _collected(replies: Collected | Iterable[Message]) -> Collected:
    return replies if isinstance(replies, Collected) else Collected.by_sender(replies)


def pack_params_dict(params, step_sizes) -> dict[str, torch.Tensor]:
    """θ and ``lr.<name>`` step sizes in one dict: the keys a site's meta-gradient must carry."""
    return {**params, **{STEP_SIZE_PREFIX + k: v for k, v in (step_sizes or {}).items()}}


def content_of(reply: Message, allowed: set[str]) -> RecordDict:
    if reply.has_error():
        error = reply.error
        reason = str(error.reason)
        if reason.startswith(SECAGG_REFUSED):  # the protocol broke (a wrong share, a bad list): not the site's failure
            raise InvalidReply(f"site refused: {reason[:300]}", kind="secagg-refused")
        raise InvalidReply(f"site failed (error code {error.code}): {reason[:300]}", kind="site-error")
    if not reply.has_content():
        raise InvalidReply("empty reply")
    content = reply.content
    unexpected = sorted(set(content.keys()) - allowed)
    if unexpected:
        raise InvalidReply(f"unexpected records {unexpected}")
    return content


def validated_metrics(content: RecordDict) -> dict[str, float]:
    record = content.metric_records.get(METRICS_RECORD)
    if record is None:
        raise InvalidReply(f"no MetricRecord {METRICS_RECORD!r}")
    metrics: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidReply(f"metric {key!r} is {value!r}, not a finite scalar")
        metrics[key] = float(value)
    count = metrics.get(NUM_EXAMPLES)
    if count is None or count <= 0:
        raise InvalidReply(f"{NUM_EXAMPLES} is {count!r}, expected a positive example count")
    return metrics


__all__ = ["Coordinator", "Drop", "InvalidReply", "RoundOutcome", "content_of", "validated_metrics"]
