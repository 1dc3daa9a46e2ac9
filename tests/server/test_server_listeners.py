"""The ServerApp's loop and its listeners: what each listener hears, the failure policy, and an observer
added without editing the loop."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass

import pytest
import torch

from fedmeta.common.checkpoint import CHECKPOINT_NAME, load_checkpoint
from fedmeta.common.config import RunConfig
from fedmeta.common.protocol import QUERY_LOSS_AFTER, dice_mean_key
from fedmeta.server.app import FailurePolicy, RunFailed, run_federation
from fedmeta.server.coordinator import Coordinator, Drop, RoundOutcome
from fedmeta.server.listeners import BASELINE, FAILED, STOPPED, TRAINING, Listeners, RoundReport, RunListener
from fedmeta.server.metrics import METRICS_NAME, MetricsLog, read_metrics
from fedmeta.server.operator_metrics import OperatorMetrics
from fedmeta.server.round_runner import heldout_summary, training_record

SMALL = dict(model_base_channels=4, model_levels=2, image_size=16)


class Recorder(RunListener):
    """Writes down every hook it hears, in order."""

    def __init__(self, name: str = "recorder", heard: list | None = None):
        self.name, self.heard = name, heard if heard is not None else []

    def on_start(self, start_round):
        self.heard.append((self.name, "start", start_round))

    def on_federation(self, membership):
        self.heard.append((self.name, "federation", len(membership.training())))

    def on_replies(self, replies):
        self.heard.append((self.name, "replies", len(replies)))

    def on_round(self, report):
        self.heard.append((self.name, "round", report))

    def on_run_end(self, coordinator):
        self.heard.append((self.name, "end", coordinator))


def _training_report(server_round: int, outcome: RoundOutcome, sampled: int = 3) -> RoundReport:
    record = training_record(server_round, sampled, outcome, "all", [])
    record["seconds"] = 1.5
    return RoundReport(server_round, TRAINING, record, outcome)


def _failed_outcome(reason: str = "'w' holds NaN or Inf") -> RoundOutcome:
    return RoundOutcome(dropped=[Drop(1, reason, "invalid"), Drop(2, reason, "invalid")])


def _updated_outcome() -> RoundOutcome:
    return RoundOutcome(accepted={1: {}, 2: {}}, updated=True, metrics={QUERY_LOSS_AFTER: 0.25})


# -- the listeners, one by one --------------------------------------------------------------------


def test_listeners_hear_every_hook_in_the_order_they_were_given():
    heard: list = []
    first, second = Recorder("first", heard), Recorder("second", heard)
    listeners = Listeners([first, second])
    report = RoundReport(0, BASELINE, {"round": 0})
    listeners.on_start(2)
    listeners.on_replies([])
    listeners.on_round(report)
    listeners.on_run_end("θ")
    assert heard == [("first", "start", 2), ("second", "start", 2), ("first", "replies", 0), ("second", "replies", 0),
                     ("first", "round", report), ("second", "round", report), ("first", "end", "θ"),
                     ("second", "end", "θ")]


def test_a_listener_that_overrides_nothing_ignores_every_hook():
    quiet = RunListener()
    quiet.on_start(0)
    quiet.on_replies([])
    quiet.on_round(RoundReport(1, FAILED, {"round": 1, "failed": "broken"}))
    quiet.on_run_end(None)


@pytest.mark.parametrize("kind, trained", [(BASELINE, False), (TRAINING, True), (STOPPED, False), (FAILED, False)])
def test_only_a_training_report_counts_as_a_trained_round(kind, trained):
    assert RoundReport(1, kind, {}).trained is trained


def test_the_metrics_log_writes_every_kind_of_report_and_a_resumed_run_keeps_the_rounds_it_covers(tmp_path):
    metrics = MetricsLog(tmp_path)
    metrics.on_start(0)
    records = [{"round": 0, "heldout": {}}, {"round": 1, "updated": True}, {"round": 2, "failed": "broken"}]
    for record, kind in zip(records, (BASELINE, TRAINING, FAILED)):
        metrics.on_round(RoundReport(record["round"], kind, record))
    assert read_metrics(tmp_path / METRICS_NAME) == records
    MetricsLog(tmp_path).on_start(1)
    assert read_metrics(tmp_path / METRICS_NAME) == records[:2]


def test_the_training_record_carries_only_the_sections_the_round_has():
    outcome = RoundOutcome(accepted={5: {"num-examples": 4.0}}, dropped=[Drop(7, "late", "timeout")], updated=True,
                           metrics={"num-examples": 4.0}, reply_norms={5: 2.0})
    record = training_record(3, 2, outcome, "deadline", [9])
    assert record == {"round": 3, "sites_sampled": 2, "sites_answered": 1, "updated": True, "closed_by": "deadline",
                      "dropped": [{"node_id": 7, "reason": "late", "kind": "timeout"}], "train": {"num-examples": 4.0},
                      "reply_norms": [{"node_id": 5, "norm": 2.0}], "benched": [9]}
    assert set(training_record(3, 2, RoundOutcome(), "all", [])) == {
        "round", "sites_sampled", "sites_answered", "updated", "closed_by", "dropped", "train"}


def test_the_heldout_summary_lists_sites_by_node_id_as_text():
    evaluation = RoundOutcome(accepted={12: {"dice-step-0": 0.5}, 3: {"dice-step-0": 0.25}},
                              metrics={"dice-mean-0": 0.375})
    summary = heldout_summary(evaluation)
    assert list(summary["sites"]) == ["3", "12"] and summary["summary"] == {"dice-mean-0": 0.375}
    assert summary["sites_answered"] == 2 and summary["dropped"] == []


def _sample(registry, name: str, **labels) -> float | None:
    return registry.get_sample_value(name, labels or None)


def test_the_operator_metrics_follow_the_reports_a_run_hands_them():
    operator = OperatorMetrics(adaptation_steps=(0, 3))
    outcome = RoundOutcome(accepted={1: {}}, dropped=[Drop(2, "late", "timeout")], updated=True,
                           metrics={QUERY_LOSS_AFTER: 0.75}, privacy={"epsilon": 1.5})
    evaluation = RoundOutcome(accepted={9: {}}, metrics={dice_mean_key(0): 0.25, dice_mean_key(3): 0.5})
    report = _training_report(4, outcome)
    report.evaluation = evaluation
    operator.on_round(RoundReport(4, FAILED, {"round": 4, "failed": "broken"}))  # a failed round exports nothing
    assert _sample(operator.registry, "fedmeta_rounds_total") == 0
    operator.on_round(report)
    r = operator.registry
    assert _sample(r, "fedmeta_round") == 4 and _sample(r, "fedmeta_rounds_total") == 1
    assert _sample(r, "fedmeta_sites_sampled_total") == 3 and _sample(r, "fedmeta_sites_answered_total") == 1
    assert _sample(r, "fedmeta_sites_dropped_total", reason="timeout") == 1
    assert _sample(r, "fedmeta_meta_loss") == 0.75 and _sample(r, "fedmeta_dp_epsilon") == 1.5
    assert _sample(r, "fedmeta_heldout_dice", steps="3") == 0.5
    assert _sample(r, "fedmeta_round_duration_seconds_sum") == 1.5
    assert _sample(r, "fedmeta_last_checkpoint_timestamp_seconds") > 0
    operator.on_round(RoundReport(0, BASELINE, {"round": 0}, evaluation=RoundOutcome(metrics={dice_mean_key(0): 0.125})))
    assert _sample(r, "fedmeta_heldout_dice", steps="0") == 0.125 and _sample(r, "fedmeta_rounds_total") == 1


# -- the failure policy ---------------------------------------------------------------------------


@dataclass
class _Config:
    num_rounds: int = 5
    max_failed_rounds: int = 2


def test_a_broken_meta_optimiser_fails_the_run_with_the_rounds_own_words():
    with pytest.raises(RunFailed, match=r"^round 3: the state is broken$"):
        FailurePolicy(_Config(), 0).judge(RoundReport(3, FAILED, {"round": 3, "failed": "round 3: the state is broken"}))


def test_failed_rounds_in_a_row_stop_the_run_naming_the_rounds_and_the_reasons():
    policy = FailurePolicy(_Config(max_failed_rounds=2), 0)
    policy.judge(_training_report(1, _failed_outcome()))
    policy.judge(_training_report(2, _updated_outcome()))  # an updated round resets the count
    policy.judge(_training_report(3, _failed_outcome()))
    with pytest.raises(RunFailed, match=r"every reply failed in 2 rounds in a row \(rounds 3-4; last reasons: 'w' holds "
                                        r"NaN or Inf\).*checkpoint holds round 4.*raise max-failed-rounds\.$"):
        policy.judge(_training_report(4, _failed_outcome()))


def test_without_max_failed_rounds_failing_rounds_go_on_but_a_run_that_never_updated_fails_at_its_end():
    policy = FailurePolicy(_Config(num_rounds=3, max_failed_rounds=0), 1)
    for server_round in (2, 3):
        policy.judge(_training_report(server_round, _failed_outcome()))
    with pytest.raises(RunFailed, match=r"^no round from 2 to 3 updated θ; see the dropped replies in metrics\.jsonl\.$"):
        policy.judge_run()


@pytest.mark.parametrize("case", ["updated", "stopped", "nothing left to run"])
def test_a_run_that_updated_was_stopped_by_its_budget_or_had_no_round_left_succeeds(case):
    start = 5 if case == "nothing left to run" else 0
    policy = FailurePolicy(_Config(num_rounds=5), start)
    if case == "updated":
        policy.judge(_training_report(1, _updated_outcome()))
    elif case == "stopped":
        policy.judge(RoundReport(1, STOPPED, {"stopped": "privacy budget", "after_round": 0}))
    policy.judge_run()


# -- the whole loop, with an observer of our own ------------------------------------------------------


def test_an_observer_passed_to_the_run_hears_what_fedmeta_own_listeners_write(smoke_federation, tmp_path, caplog):
    from fedmeta.common.synth import load_manifest
    from fedmeta.server.server_metrics import STATE_NAME, read_state
    from fedmeta.simulations.engines.inprocess import run_inprocess, simulation_node_configs

    manifest = load_manifest(smoke_federation)
    sites = len(manifest.train_sites) + len(manifest.heldout_sites)
    config = RunConfig(**SMALL, episodes_per_site=1, k_shot=2, q_query=2, eval_k_shot=2, eval_steps="0,1",
                       eval_every=2, num_rounds=2, node_wait_timeout=0.0, out_dir=str(tmp_path),
                       federation_dir=str(smoke_federation))
    recorder = Recorder()
    ran: list[Coordinator] = []

    def server_app(grid, context):
        ran.append(run_federation(grid, RunConfig.from_run_config(context.run_config), observers=[recorder]))

    with caplog.at_level(logging.INFO, logger="fedmeta.server"):
        run_inprocess(config.to_run_config(), simulation_node_configs(sites), server_app=server_app)

    hooks = [entry[1] for entry in recorder.heard]
    assert hooks[0] == "start" and recorder.heard[0][2] == 0 and hooks[-1] == "end" and recorder.heard[-1][2] is ran[0]
    reports = [entry[2] for entry in recorder.heard if entry[1] == "round"]
    assert [(r.server_round, r.kind) for r in reports] == [(0, BASELINE), (1, TRAINING), (2, TRAINING)]
    # Every exchange's replies were heard: the round-0 evaluation, two training rounds, round 2's evaluation.
    assert hooks.count("replies") == 4 and hooks.count("federation") == 3
    # The reports are the lines of metrics.jsonl, in order, and the last training round is the checkpoint.
    written = read_metrics(tmp_path / METRICS_NAME)
    assert [json.loads(json.dumps(r.record)) for r in reports] == written
    assert reports[2].evaluation is not None and reports[1].evaluation is None
    checkpoint = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert checkpoint.round == 2
    assert all(torch.equal(checkpoint.params[k], ran[0].params[k]) for k in checkpoint.params)
    assert math.isfinite(reports[2].record["seconds"])
    # The run's log: a start line, one line per round, a final line (fedmeta.server.run_log).
    progress = [r.getMessage().split(" | ")[0] for r in caplog.records
                if r.name == "fedmeta.server" and re.match(r"start:|round \d+/|done:", r.getMessage())]
    assert progress == ["start: fomaml, rounds 1-2", "round 0/2", "round 1/2", "round 2/2", "done: round 2/2"]
    # The operators' state in the out-dir (fedmeta server-metrics serves it): the run is over, at round 2.
    state = {family.name: family.samples for family in read_state(tmp_path / STATE_NAME)}
    assert state["fedmeta_round"][0].value == 2 and state["fedmeta_run_active"][0].value == 0
    assert {s.labels["state"]: s.value for s in state["fedmeta_run_state"]}["completed"] == 1
