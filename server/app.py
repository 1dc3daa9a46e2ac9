"""fedmeta's ServerApp: federated meta-training of the shared UNet initialisation.

An own round loop over the Grid's ``push_messages``/``pull_messages`` (``fedmeta.server.rounds``)
rather than ``Strategy.start``, because start() has no place to checkpoint, resume or survive a round
with too few sites, and ``send_and_receive`` waits the full timeout for a hung site. Each round: sample training
sites, send θ, validate and aggregate their meta-gradients, step the meta-optimiser, every
``eval-every`` rounds let held-out sites adapt and report Dice, append metrics, checkpoint.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmeta.common.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint, save_checkpoint, trajectory_hash
from fedmeta.common.config import RunConfig
from fedmeta.common.metaopt import MetaOptimizerStateError
from fedmeta.common.protocol import QUERY_LOSS_AFTER, dice_mean_key
from fedmeta.server.coordinator import Coordinator, RoundOutcome
from fedmeta.server.rounds import Membership, collect, wait_for_training_sites
from fedmeta.server.secure_aggregation import secure_training_round
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
    if config.release_key:  # a key that cannot sign must stop the run now, not after its last round
        from fedmeta.common.release import load_private_key

        load_private_key(config.release_key)
    coordinator = Coordinator(config)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    start_round = _maybe_resume(coordinator, config, checkpoint_path)
    metrics_log = MetricsLog(out_dir)
    metrics_log.start(resume_round=start_round if start_round > 0 else None)

    membership = Membership(config)
    wait_for_training_sites(grid, membership, config, settle=True)
    log.info("federation: %d training and %d held-out sites", len(membership.training()), len(membership.heldout()))
    operator.federation(membership)

    evaluating = config.eval_every > 0
    if start_round == 0 and evaluating and membership.heldout():
        evaluation = _evaluate(grid, coordinator, 0, membership, operator)
        metrics_log.append({"round": 0, "heldout": _heldout_summary(evaluation)})
        _progress(0, config, None, evaluation)

    failed_in_a_row, updated_rounds, over_budget = 0, 0, None
    for server_round in range(start_round + 1, config.num_rounds + 1):
        began = time.perf_counter()
        # Membership is re-read every round: late and restarted sites join, departed ones leave.
        train_nodes = wait_for_training_sites(grid, membership, config)
        operator.federation(membership)
        over_budget = coordinator.budget_exceeded(len(train_nodes))
        if over_budget:  # before sampling: a resumed run with a larger budget draws what this one would have
            log.warning("stopping before round %d: %s; θ of round %d is final", server_round, over_budget,
                        server_round - 1)
            metrics_log.append({"stopped": over_budget, "after_round": server_round - 1,
                                "privacy": {"epsilon": coordinator.accountant.epsilon, "delta": config.dp_delta}})
            break
        chosen, round_seed = coordinator.sample_sites(train_nodes)
        try:
            if config.secure_aggregation == "none":
                collected = collect(grid, coordinator.train_messages(server_round, chosen, round_seed),
                                    quorum=config.quorum(len(chosen)), deadline=config.round_deadline,
                                    timeout=config.round_timeout)
                operator.replies(collected.messages)
                outcome = coordinator.apply_train_replies(server_round, chosen, collected)
                membership.expect_late(collected, f"round {server_round}")
                closed_by, took_part = collected.closed_by, set(outcome.accepted)
            else:  # four exchanges per round; the server learns only the sum (fedmeta.server.secure_aggregation)
                received, outcome, took_part = secure_training_round(grid, coordinator, server_round, chosen,
                                                                     round_seed)
                operator.replies(received)
                closed_by = "secagg"
        except MetaOptimizerStateError as err:  # θ can no longer learn: said in the log of rounds, then loudly
            metrics_log.append({"round": server_round, "failed": str(err)})
            raise RunFailed(str(err)) from None
        membership.record(chosen, took_part)
        operator.training_round(server_round, len(chosen), outcome, QUERY_LOSS_AFTER)
        record = {
            "round": server_round,
            "sites_sampled": len(chosen),
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
        if membership.benched():
            record["benched"] = membership.benched()
        evaluation = None
        if evaluating and (server_round % config.eval_every == 0 or server_round == config.num_rounds):
            membership.refresh(grid)  # a held-out site that joined late is evaluated too
            if membership.heldout():
                evaluation = _evaluate(grid, coordinator, server_round, membership, operator)
                record["heldout"] = _heldout_summary(evaluation)
        record["seconds"] = time.perf_counter() - began
        metrics_log.append(record)
        _checkpoint(coordinator, config, server_round, checkpoint_path)
        operator.checkpointed()
        operator.round_done(server_round, record["seconds"])
        _progress(server_round, config, outcome, evaluation)
        updated_rounds += outcome.updated
        failed_in_a_row = failed_in_a_row + 1 if outcome.failed else 0
        if config.max_failed_rounds and failed_in_a_row >= config.max_failed_rounds:
            reasons = sorted({d.reason for d in outcome.dropped})
            raise RunFailed(
                f"every reply failed in {failed_in_a_row} rounds in a row (rounds {server_round - failed_in_a_row + 1}"
                f"-{server_round}; last reasons: {'; '.join(reasons)[:600]}); θ or the sites are broken, so the run "
                f"stops. The checkpoint holds round {server_round}; fix the cause and resume, or raise max-failed-rounds."
            )
    if start_round < config.num_rounds and not updated_rounds and not over_budget:
        raise RunFailed(f"no round from {start_round + 1} to {config.num_rounds} updated θ; see the dropped replies "
                        "in metrics.jsonl.")
    if config.release_key:
        from fedmeta.common.release import sign

        release = sign(checkpoint_path, config.release_key, overwrite=True)  # a resumed run signs its θ again
        log.info("signed release %s (round %d): %s.sig", release["release_id"], release["round"], checkpoint_path)
    log.info("done: %s", coordinator.counters)
    return coordinator


class RunFailed(RuntimeError):
    """A federated run that must not be reported as a success (every reply failing, no update at all)."""


def _evaluate(grid: Grid, coordinator: Coordinator, server_round: int, membership: Membership,
              operator: OperatorMetrics) -> RoundOutcome:
    config = coordinator.config
    nodes = membership.heldout()
    collected = collect(grid, coordinator.evaluate_messages(server_round, nodes), quorum=config.quorum(len(nodes)),
                        deadline=config.round_deadline, timeout=config.round_timeout)
    operator.replies(collected.messages)
    evaluation = coordinator.collect_evaluation(server_round, nodes, collected)
    membership.record(nodes, evaluation.accepted)
    membership.expect_late(collected, f"the evaluation of round {server_round}")
    operator.evaluation(evaluation.metrics, config.adaptation_steps, dice_mean_key)
    return evaluation


def _heldout_summary(evaluation: RoundOutcome) -> dict:
    return {
        "sites_answered": len(evaluation.accepted),
        "dropped": [{"node_id": d.node_id, "reason": d.reason, "kind": d.kind} for d in evaluation.dropped],
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
    from fedmeta.common.outputs import make_folder, refuse_data_folder

    refuse_data_folder(out_dir, "run config out-dir")  # checkpoints never land among a site's scans
    return make_folder(out_dir)


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
    try:
        coordinator.meta_optimizer.load_state_dict(checkpoint.optimizer)
    except MetaOptimizerStateError as err:
        raise RunFailed(f"{path} (round {checkpoint.round}) cannot be resumed: {err} Start a new run (resume=false "
                        "or a new out-dir), or resume from a checkpoint written before the state broke.") from None
    coordinator.set_rng_state(checkpoint.rng_state)
    coordinator.set_privacy_state(checkpoint.privacy)
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
            privacy=coordinator.privacy_state(),
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
