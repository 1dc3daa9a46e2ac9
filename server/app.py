"""fedmeta's ServerApp: federated meta-training of the shared UNet initialisation.

An own round loop over the Grid's ``push_messages``/``pull_messages`` (``fedmeta.server.rounds``)
rather than ``Strategy.start``, because start() has no place to checkpoint, resume or survive a round
with too few sites, and ``send_and_receive`` waits the full timeout for a hung site. This module is the
loop and when it stops: each round (``fedmeta.server.round_runner``) samples training sites, sends θ,
validates and aggregates their meta-gradients, steps the meta-optimiser and, every ``eval-every``
rounds, lets held-out sites adapt and report Dice; its report goes to the run's listeners
(``fedmeta.server.listeners``), which append it to metrics.jsonl, checkpoint, export the operators'
metrics (``fedmeta.server.operator_metrics``) and write the round's line in the run's log
(``fedmeta.server.run_log``: ``flwr log``), and at the end sign the release. With ``plan-round = true`` the run
is one fingerprint round instead (``fedmeta.server.plan_round``): the plan is written and nothing is trained.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmeta.common.checkpoint import CHECKPOINT_NAME, load_checkpoint, trajectory_hash
from fedmeta.common.config import RunConfig
from fedmeta.common.metaopt import MetaOptimizerStateError
from fedmeta.common.outputs import make_folder, refuse_data_folder
from fedmeta.server.checkpoints import CheckpointWriter, ReleaseSigner
from fedmeta.server.coordinator import Coordinator
from fedmeta.server.listeners import FAILED, STOPPED, Listeners, RoundReport, RunListener
from fedmeta.server.metrics import MetricsLog
from fedmeta.server.operator_metrics import OperatorMetrics
from fedmeta.server.plan_round import run_plan_round
from fedmeta.server.round_runner import RoundRunner
from fedmeta.server.rounds import Membership
from fedmeta.server.run_log import ProgressLog, in_flower_runtime, to_run_log
from fedmeta.server.server_metrics import STATE_NAME

log = logging.getLogger("fedmeta.server")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = RunConfig.from_run_config(context.run_config)
    # Under Flower, the process's output is the run's log (`flwr log`); elsewhere the caller's console.
    with to_run_log() if in_flower_runtime() else contextlib.nullcontext():
        if config.plan_round:  # a deployment's plan from the sites' fingerprints, and no training
            run_plan_round(grid, config, _out_dir(config))
        else:
            run_federation(grid, config)


def run_federation(grid: Grid, config: RunConfig, observers: Sequence[RunListener] = ()) -> Coordinator:
    """The whole federated run; returns the coordinator holding the final θ (also checkpointed).

    ``observers`` hear the run after fedmeta's own listeners (``fedmeta.server.listeners``).
    """
    out_dir = _out_dir(config)
    operator = OperatorMetrics(config.adaptation_steps, state_path=out_dir / STATE_NAME)
    if config.metrics_port:
        operator.serve(config.metrics_port, config.metrics_address)
    try:
        return _run_federation(grid, config, out_dir, operator, observers)
    finally:
        operator.close()


def _run_federation(grid: Grid, config: RunConfig, out_dir: Path, operator: OperatorMetrics,
                    observers: Sequence[RunListener]) -> Coordinator:
    checkpoint_path = out_dir / CHECKPOINT_NAME
    # Before anything else: a release key that cannot sign stops the run now, not after its last round.
    signer = [ReleaseSigner(config.release_key, checkpoint_path)] if config.release_key else []
    coordinator = Coordinator(config)
    start_round = _maybe_resume(coordinator, config, checkpoint_path)
    # Each round is logged, then checkpointed, then exported (the operators' metrics carry the checkpoint's
    # time), then printed; at the end the release is signed before the run is exported and printed as done.
    listeners = Listeners([MetricsLog(out_dir), CheckpointWriter(coordinator, checkpoint_path), *signer, operator,
                           ProgressLog(config, checkpoint_path), *observers])
    listeners.on_start(start_round)
    try:
        _run_rounds(grid, config, coordinator, start_round, listeners)
    except BaseException as err:  # SystemExit too: `flwr stop` interrupts the ServerApp with it
        listeners.on_run_error(err)
        raise
    return coordinator


def _run_rounds(grid: Grid, config: RunConfig, coordinator: Coordinator, start_round: int,
                listeners: Listeners) -> None:
    runner = RoundRunner(grid, coordinator, Membership(config), listeners)
    runner.join()
    baseline = runner.baseline() if start_round == 0 else None
    if baseline is not None:
        listeners.on_round(baseline)

    policy = FailurePolicy(config, start_round)
    for server_round in range(start_round + 1, config.num_rounds + 1):
        report = runner.train(server_round)
        listeners.on_round(report)
        policy.judge(report)
        if report.kind == STOPPED:
            break
    policy.judge_run()
    listeners.on_run_end(coordinator)


class RunFailed(RuntimeError):
    """A federated run that must not be reported as a success (every reply failing, no update at all)."""


class FailurePolicy:
    """When a run stops as a failure: θ's meta-optimiser broke, every reply failed in max-failed-rounds
    rounds in a row, or no round updated θ."""

    def __init__(self, config: RunConfig, start_round: int):
        self.config, self.start_round = config, start_round
        self.failed_in_a_row, self.updated_rounds, self.stopped = 0, 0, False

    def judge(self, report: RoundReport) -> None:
        """Raises :class:`RunFailed` after a round that must end the run (its report already taken)."""
        if report.kind == FAILED:
            raise RunFailed(report.record["failed"])
        if report.kind == STOPPED:
            self.stopped = True
            return
        outcome, server_round = report.outcome, report.server_round
        self.updated_rounds += outcome.updated
        self.failed_in_a_row = self.failed_in_a_row + 1 if outcome.failed else 0
        if self.config.max_failed_rounds and self.failed_in_a_row >= self.config.max_failed_rounds:
            reasons = sorted({d.reason for d in outcome.dropped})
            raise RunFailed(
                f"every reply failed in {self.failed_in_a_row} rounds in a row (rounds "
                f"{server_round - self.failed_in_a_row + 1}-{server_round}; last reasons: {'; '.join(reasons)[:600]}); "
                f"θ or the sites are broken, so the run stops. The checkpoint holds round {server_round}; fix the cause "
                "and resume, or raise max-failed-rounds."
            )

    def judge_run(self) -> None:
        """Raises :class:`RunFailed` when the rounds ran (none stopped by the privacy budget) and none updated θ."""
        if self.start_round < self.config.num_rounds and not self.updated_rounds and not self.stopped:
            raise RunFailed(f"no round from {self.start_round + 1} to {self.config.num_rounds} updated θ; see the "
                            "dropped replies in metrics.jsonl.")


def _out_dir(config: RunConfig) -> Path:
    if not config.out_dir:
        raise ValueError("run config out-dir is empty; set it to an absolute folder for checkpoints and metrics.")
    out_dir = Path(config.out_dir)
    if not out_dir.is_absolute():
        raise ValueError(
            f"run config out-dir={config.out_dir!r} is relative; the ServerApp may run in another working "
            "directory, so give an absolute path."
        )
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
        coordinator.restore(checkpoint)
    except MetaOptimizerStateError as err:
        raise RunFailed(f"{path} (round {checkpoint.round}) cannot be resumed: {err} Start a new run (resume=false "
                        "or a new out-dir), or resume from a checkpoint written before the state broke.") from None
    log.info("resumed from %s after round %d", path, checkpoint.round)
    return checkpoint.round


__all__ = ["RunFailed", "app", "run_federation"]
