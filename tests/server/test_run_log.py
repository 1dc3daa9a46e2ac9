"""The run's log for operators (``fedmeta.server.run_log``): the start line, one line per round, the final line,
and the handler that puts them where Flower mirrors the ServerApp's output into ``flwr log``."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedmeta.common.config import RunConfig
from fedmeta.common.protocol import QUERY_LOSS_AFTER, dice_mean_key
from fedmeta.server.coordinator import Drop, RoundOutcome
from fedmeta.server.listeners import BASELINE, FAILED, STOPPED, TRAINING, RoundReport
from fedmeta.server.round_runner import heldout_summary, training_record
from fedmeta.server.run_log import (
    ProgressLog, done_line, error_line, in_flower_runtime, round_line, start_line, to_run_log,
)

CONFIG = RunConfig(num_rounds=10, eval_steps="0,5")
CHECKPOINT = Path("/runs/exp1/checkpoint.pt")


def _training(server_round: int, outcome: RoundOutcome, *, sampled: int = 4, closed_by: str = "all",
              benched: tuple[int, ...] = (), evaluation: RoundOutcome | None = None) -> RoundReport:
    record = training_record(server_round, sampled, outcome, closed_by, list(benched))
    if evaluation is not None:
        record["heldout"] = heldout_summary(evaluation)
    record["seconds"] = 1.0
    return RoundReport(server_round, TRAINING, record, outcome, evaluation)


UPDATED = RoundOutcome(accepted={11: {}, 12: {}, 13: {}, 14: {}}, updated=True, metrics={QUERY_LOSS_AFTER: 0.43214})
AT_DEADLINE = RoundOutcome(
    accepted={11: {}, 12: {}}, updated=True, metrics={QUERY_LOSS_AFTER: 0.5}, privacy={"epsilon": 1.8412},
    dropped=[Drop(13, "no reply by the close of the round", "timeout"),
             Drop(14, "site failed (error code 0): FileNotFoundError: /data/anon-17/imagesTr/case-3.nii.gz",
                  "site-error"),
             Drop(15, "no reply by the close of the round", "timeout")])
NO_UPDATE = RoundOutcome(accepted={11: {}}, dropped=[Drop(12, "node gone: it left", "node-gone"),
                                                     Drop(13, "'w' holds NaN", "invalid")])
HELDOUT = RoundOutcome(accepted={21: {}, 22: {}}, metrics={dice_mean_key(0): 0.41234, dice_mean_key(5): 0.70151})
HELDOUT_DROPPED = RoundOutcome(accepted={21: {}}, metrics={dice_mean_key(0): 0.4, dice_mean_key(5): 0.6},
                               dropped=[Drop(22, "no reply", "timeout")])

LINES = [
    ("every site in", _training(3, UPDATED),
     "round 3/10 | sites sampled 4, answered 4, dropped 0 | meta-loss 0.4321 | checkpoint written "
     "/runs/exp1/checkpoint.pt"),
    ("closed at the deadline, drops by kind, benched, DP", _training(4, AT_DEADLINE, sampled=5, closed_by="deadline",
                                                                     benched=(15, 16)),
     "round 4/10 | sites sampled 5, answered 2, dropped 3 (timeout 2, site-error 1) | closed at round-deadline "
     "(quorum met) | benched 2 | epsilon 1.84 | meta-loss 0.5000 | checkpoint written /runs/exp1/checkpoint.pt"),
    ("no update, closed at the timeout", _training(5, NO_UPDATE, sampled=3, closed_by="timeout"),
     "round 5/10 | sites sampled 3, answered 1, dropped 2 (node-gone 1, invalid 1) | closed at round-timeout | "
     "no update | checkpoint written /runs/exp1/checkpoint.pt"),
    ("with its held-out evaluation", _training(10, UPDATED, evaluation=HELDOUT_DROPPED),
     "round 10/10 | sites sampled 4, answered 4, dropped 0 | meta-loss 0.4321 | held-out Dice 0.400/0.600 after "
     "0/5 steps, held-out dropped 1 (timeout 1) | checkpoint written /runs/exp1/checkpoint.pt"),
    ("the baseline", RoundReport(0, BASELINE, {"round": 0, "heldout": heldout_summary(HELDOUT)}, evaluation=HELDOUT),
     "round 0/10 | held-out Dice 0.412/0.702 after 0/5 steps"),
    ("a broken meta-optimiser", RoundReport(6, FAILED, {"round": 6, "failed": "round 6: adam's state holds NaN"}),
     "round 6/10 | failed: round 6: adam's state holds NaN"),
]


@pytest.mark.parametrize("report, expected", [case[1:] for case in LINES], ids=[case[0] for case in LINES])
def test_a_round_is_one_line_of_counts_in_the_fields_words(report, expected):
    line = round_line(report, CONFIG, CHECKPOINT)
    assert line == expected
    assert "\n" not in line and line.isascii()


def test_no_node_id_or_site_text_reaches_the_line():
    line = round_line(_training(4, AT_DEADLINE, sampled=5, closed_by="deadline", benched=(15, 16)), CONFIG, CHECKPOINT)
    assert "FileNotFoundError" not in line and "anon-17" not in line
    assert not any(str(node) in line for node in (11, 12, 13, 14, 15, 16))


def test_the_privacy_budgets_stop_has_no_round_line_of_its_own():
    stopped = RoundReport(7, STOPPED, {"stopped": "privacy budget: one more round would take epsilon from 2.9 to 3.2",
                                       "after_round": 6})
    assert round_line(stopped, CONFIG, CHECKPOINT) is None


@pytest.mark.parametrize("changes, start_round, expected", [
    ({}, 0, "start: fomaml, rounds 1-10"),
    ({"algorithm": "reptile", "dp": "central"}, 4, "resume after round 4: reptile, rounds 5-10, dp central"),
    ({"secure_aggregation": "secagg+"}, 0, "start: fomaml, rounds 1-10, secagg+"),
    ({}, 10, "resume after round 10: fomaml, no round left to run"),
])
def test_the_start_line_says_what_runs_and_from_which_round(changes, start_round, expected):
    config = RunConfig(**{"num_rounds": 10, **changes})
    assert start_line(config, start_round) == expected


def _coordinator(epsilon: float | None = None) -> SimpleNamespace:
    return SimpleNamespace(config=CONFIG, accountant=None if epsilon is None else SimpleNamespace(epsilon=epsilon),
                           counters={"dropped_replies": 3, "skipped_rounds": 1, "failed_evaluations": 0})


def test_the_final_line_says_how_far_the_run_got_and_where_its_theta_is():
    assert done_line(_coordinator(), 10, "", CHECKPOINT) == (
        "done: round 10/10 | replies dropped 3, rounds without update 1, failed evaluations 0 | final checkpoint "
        "/runs/exp1/checkpoint.pt")
    stopped = "privacy budget: one more round would take epsilon from 2.9 to 3.2"
    assert done_line(_coordinator(2.91), 6, stopped, CHECKPOINT) == (
        "done: round 6/10 | stopped by privacy budget | epsilon 2.91 | replies dropped 3, rounds without update 1, "
        "failed evaluations 0 | final checkpoint /runs/exp1/checkpoint.pt")
    assert error_line(RuntimeError("site text /data/x"), 3) == "failed after round 3: RuntimeError (the error follows)"
    assert error_line(SystemExit(0), 3) == "stopped after round 3 (SystemExit: interrupted)"


def test_the_listener_logs_start_rounds_and_end_on_fedmeta_server(caplog):
    progress = ProgressLog(CONFIG, CHECKPOINT)
    with caplog.at_level(logging.INFO, logger="fedmeta.server"):
        progress.on_start(0)
        progress.on_round(_training(1, UPDATED))
        progress.on_round(RoundReport(2, STOPPED, {"stopped": "privacy budget: no more", "after_round": 1}))
        progress.on_run_end(_coordinator(1.0))
    lines = [r.getMessage() for r in caplog.records if r.name == "fedmeta.server"]
    assert lines[0] == "start: fomaml, rounds 1-10" and lines[1].startswith("round 1/10 | ")
    assert lines[2].startswith("done: round 1/10 | stopped by privacy budget | epsilon 1.00") and len(lines) == 3


def test_the_handler_writes_to_the_stream_while_the_run_lasts_and_is_removed_after(monkeypatch):
    logger = logging.getLogger("fedmeta.server")
    # As in Flower's ServerApp process: no handler on the way to the root (pytest puts its own on the root).
    monkeypatch.setattr(logger, "propagate", False)
    level, handlers = logger.level, list(logger.handlers)
    stream = io.StringIO()
    with to_run_log(stream):
        ProgressLog(CONFIG, CHECKPOINT).on_round(_training(3, UPDATED))
        logger.warning("node 7 left the federation")
        logger.debug("not for operators")
    logger.info("after the run")
    assert stream.getvalue().splitlines() == [
        "fedmeta INFO: round 3/10 | sites sampled 4, answered 4, dropped 0 | meta-loss 0.4321 | checkpoint written "
        "/runs/exp1/checkpoint.pt",
        "fedmeta WARNING: node 7 left the federation",
    ]
    assert logger.level == level and logger.handlers == handlers


def test_no_second_handler_where_logging_is_configured_already(caplog):
    stream = io.StringIO()
    with caplog.at_level(logging.INFO), to_run_log(stream):  # pytest's handler sits on the root
        logging.getLogger("fedmeta.server").info("once")
    assert stream.getvalue() == "" and [r.getMessage() for r in caplog.records] == ["once"]


@pytest.mark.parametrize("argv0, expected", [
    ("/opt/venv/bin/flwr-serverapp", True), ("/usr/local/bin/flwr-simulation", True), ("/usr/bin/fedmeta", False),
    ("-c", False),
])
def test_only_flowers_serverapp_processes_log_to_the_run_log(monkeypatch, argv0, expected):
    monkeypatch.setattr("sys.argv", [argv0])
    assert in_flower_runtime() is expected
