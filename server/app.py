"""fedmeta's ServerApp: federated meta-training of the shared UNet initialisation.

An own round loop over ``grid.send_and_receive`` rather than ``Strategy.start``, because start() has
no place to checkpoint, resume or survive a round with too few sites. Each round: sample training
sites, send θ, validate and aggregate their meta-gradients, step the meta-optimiser, every
``eval-every`` rounds let held-out sites adapt and report Dice, append metrics, checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedmeta.common.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint, save_checkpoint, trajectory_hash
from fedmeta.common.config import RunConfig
from fedmeta.common.protocol import (
    CONFIG_RECORD, METRICS_RECORD, PROTOCOL_VERSION, PROTOCOL_VERSION_KEY, QUERY_LOSS_AFTER, ROLE_METRIC, ROUND_KEY,
    SITE_KEY_METRIC, dice_mean_key, version_stamp,
)
from fedmeta.server.coordinator import Coordinator, RoundOutcome
from fedmeta.server.operator_metrics import OperatorMetrics
from fedmeta.server.metrics import MetricsLog

log = logging.getLogger("fedmeta.server")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = RunConfig.from_run_config(context.run_config)
    run_federation(grid, config)


def run_federation(grid: Grid, config: RunConfig) -> Coordinator:
    """The whole federated run; returns the coordinator holding the final θ (also checkpointed)."""
    operator = OperatorMetrics()
    if config.metrics_port:
        operator.serve(config.metrics_port, config.metrics_address)
    try:
        return _run_federation(grid, config, operator)
    finally:
        operator.close()


def _run_federation(grid: Grid, config: RunConfig, operator: OperatorMetrics) -> Coordinator:
    out_dir = _out_dir(config)
    coordinator = Coordinator(config)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    start_round = _maybe_resume(coordinator, config, checkpoint_path)
    metrics_log = MetricsLog(out_dir)
    metrics_log.start(resume_round=start_round if start_round > 0 else None)

    train_nodes, heldout_nodes = discover_roles(grid, config)
    log.info("federation: %d training and %d held-out sites", len(train_nodes), len(heldout_nodes))
    operator.federation(len(train_nodes), len(heldout_nodes))
    if not train_nodes:
        raise RuntimeError("no training site answered the role query; nothing to meta-train on.")

    evaluating = config.eval_every > 0 and bool(heldout_nodes)
    if start_round == 0 and evaluating:
        evaluation = _evaluate(grid, coordinator, 0, heldout_nodes, operator)
        metrics_log.append({"round": 0, "heldout": _heldout_summary(evaluation)})
        _progress(0, config, None, evaluation)

    for server_round in range(start_round + 1, config.num_rounds + 1):
        began = time.perf_counter()
        chosen, round_seed = coordinator.sample_sites(train_nodes)
        replies = list(grid.send_and_receive(
            coordinator.train_messages(server_round, chosen, round_seed), timeout=config.round_timeout
        ))
        operator.replies(replies)
        outcome = coordinator.apply_train_replies(server_round, chosen, replies)
        operator.training_round(server_round, len(chosen), outcome, QUERY_LOSS_AFTER)
        record = {
            "round": server_round,
            "sites_sampled": len(chosen),
            "sites_answered": len(outcome.accepted),
            "updated": outcome.updated,
            "dropped": [{"node_id": d.node_id, "reason": d.reason} for d in outcome.dropped],
            "train": outcome.metrics,
        }
        evaluation = None
        if evaluating and (server_round % config.eval_every == 0 or server_round == config.num_rounds):
            evaluation = _evaluate(grid, coordinator, server_round, heldout_nodes, operator)
            record["heldout"] = _heldout_summary(evaluation)
        record["seconds"] = time.perf_counter() - began
        metrics_log.append(record)
        _checkpoint(coordinator, config, server_round, checkpoint_path)
        operator.checkpointed()
        operator.round_done(server_round, record["seconds"])
        _progress(server_round, config, outcome, evaluation)
    log.info("done: %s", coordinator.counters)
    return coordinator


def discover_roles(grid: Grid, config: RunConfig) -> tuple[list[int], list[int]]:
    """Asks every connected node whether it is a training or a held-out site (scalars, no data).

    Returns both lists in site order, by the key each site reports (then node id): node ids are
    random per run, site keys are not, so sampling and aggregation order repeat across runs.
    """
    node_ids = _wait_for_nodes(grid, config)
    query = RecordDict({CONFIG_RECORD: ConfigRecord({ROUND_KEY: 0, **version_stamp()})})
    messages = [Message(query, node_id, MessageType.QUERY, group_id="roles") for node_id in node_ids]
    train, heldout, keys = [], [], {}
    for reply in grid.send_and_receive(messages, timeout=config.round_timeout):
        node_id = reply.metadata.src_node_id
        if reply.has_error() or not reply.has_content() or METRICS_RECORD not in reply.content.metric_records:
            reason = reply.error.reason if reply.has_error() else "no metrics in the reply"
            log.warning("node %d did not answer the role query (%s); leaving it out of this run", node_id, reason)
            continue
        version = reply.content.metric_records[METRICS_RECORD].get(PROTOCOL_VERSION_KEY)
        if version != PROTOCOL_VERSION:
            log.warning(
                "node %d speaks fedmeta protocol %r, this server %d; leaving it out of this run (install the "
                "same fedmeta release at the site and the server)", node_id, version, PROTOCOL_VERSION,
            )
            continue
        flag = reply.content.metric_records[METRICS_RECORD].get(ROLE_METRIC)
        if flag not in (0, 1):
            log.warning("node %d sent role flag %r; leaving it out of this run", node_id, flag)
            continue
        key = reply.content.metric_records[METRICS_RECORD].get(SITE_KEY_METRIC, 0)
        if isinstance(key, bool) or not isinstance(key, (int, float)) or not math.isfinite(key) or key != int(key):
            log.warning("node %d sent site key %r, not a whole number; leaving it out of this run", node_id, key)
            continue
        keys[int(node_id)] = (int(key), int(node_id))
        (heldout if flag == 1 else train).append(int(node_id))
    return sorted(train, key=keys.get), sorted(heldout, key=keys.get)


def _wait_for_nodes(grid: Grid, config: RunConfig) -> list[int]:
    deadline = time.monotonic() + config.node_wait_timeout
    while True:
        node_ids = sorted(int(n) for n in grid.get_node_ids())
        if len(node_ids) >= config.min_sites or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if not node_ids:
        raise RuntimeError(
            f"no site connected within node-wait-timeout={config.node_wait_timeout}s; "
            "start the SuperNodes or raise node-wait-timeout."
        )
    return node_ids


def _evaluate(grid: Grid, coordinator: Coordinator, server_round: int, heldout_nodes: list[int],
              operator: OperatorMetrics) -> RoundOutcome:
    messages = coordinator.evaluate_messages(server_round, heldout_nodes)
    replies = list(grid.send_and_receive(messages, timeout=coordinator.config.round_timeout))
    operator.replies(replies)
    evaluation = coordinator.collect_evaluation(server_round, heldout_nodes, replies)
    operator.evaluation(evaluation.metrics, coordinator.config.adaptation_steps, dice_mean_key)
    return evaluation


def _heldout_summary(evaluation: RoundOutcome) -> dict:
    return {
        "sites_answered": len(evaluation.accepted),
        "dropped": [{"node_id": d.node_id, "reason": d.reason} for d in evaluation.dropped],
        "summary": evaluation.metrics,
        "sites": {str(n): m for n, m in sorted(evaluation.accepted.items())},
    }


def _out_dir(config: RunConfig) -> Path:
    if not config.out_dir:
        raise ValueError("run config out-dir is empty; set it to an absolute folder for checkpoints and metrics.")
    out_dir = Path(config.out_dir)
    if not out_dir.is_absolute():
        raise ValueError(
            f"run config out-dir={config.out_dir!r} is relative; the ServerApp may run in another working "
            "directory, so give an absolute path."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def _maybe_resume(coordinator: Coordinator, config: RunConfig, path: Path) -> int:
    """Restores the latest checkpoint when resume=true; returns the round it ended (0 for a fresh run)."""
    if not config.resume:
        return 0
    if not path.exists():
        log.info("resume=true but %s does not exist yet; starting a fresh run", path)
        return 0
    checkpoint = load_checkpoint(path)
    if checkpoint.config_hash != trajectory_hash(config):
        changed = sorted(
            k for k, v in RunConfig.from_run_config(checkpoint.run_config).to_run_config().items()
            if config.to_run_config().get(k) != v
        ) or ["the contents of federation-dir (another federation)"]
        raise ValueError(
            f"{path} was written under a different run config (changed: {', '.join(changed)}); resuming would "
            "mix two experiments. Restore those keys, or use a new out-dir / resume=false."
        )
    coordinator.meta_optimizer.load_state_dict(checkpoint.optimizer)
    coordinator.set_rng_state(checkpoint.rng_state)
    coordinator.counters.update(checkpoint.counters)
    log.info("resumed from %s after round %d", path, checkpoint.round)
    return checkpoint.round


def _checkpoint(coordinator: Coordinator, config: RunConfig, server_round: int, path: Path) -> None:
    save_checkpoint(
        path,
        Checkpoint(
            round=server_round,
            params=coordinator.params,
            step_sizes=coordinator.step_sizes,
            optimizer=coordinator.meta_optimizer.state_dict(),
            rng_state=coordinator.rng_state(),
            config_hash=trajectory_hash(config),
            run_config=config.to_run_config(),
            counters=dict(coordinator.counters),
        ),
    )


def _progress(server_round: int, config: RunConfig, outcome: RoundOutcome | None, evaluation: RoundOutcome | None) -> None:
    parts = [f"round {server_round}/{config.num_rounds}"]
    if outcome is not None:
        parts.append(f"sites {len(outcome.accepted)}/{len(outcome.accepted) + len(outcome.dropped)}")
        if outcome.updated:
            parts.append(f"meta-loss {outcome.metrics.get(QUERY_LOSS_AFTER, float('nan')):.4f}")
        else:
            parts.append("no update")
    if evaluation is not None and evaluation.metrics:
        steps = config.adaptation_steps
        parts.append(
            "held-out Dice "
            + " ".join(f"{s}:{evaluation.metrics[dice_mean_key(s)]:.3f}" for s in steps)
            + " (adaptation steps:Dice)"
        )
    log.info(" | ".join(parts))
