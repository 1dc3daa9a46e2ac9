"""The coordinator's exporter (``fedmeta server-metrics``): every ServerApp writes its series to its out-dir, and
one long-lived process serves the last state of every run, between runs too (a real process, scraped over HTTP)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from fedmeta.common.protocol import QUERY_LOSS_AFTER
from fedmeta.server.coordinator import Drop, RoundOutcome
from fedmeta.server.listeners import TRAINING, RoundReport
from fedmeta.server.operator_metrics import METRIC_NAMES, OperatorMetrics
from fedmeta.server.round_runner import training_record
from fedmeta.server.server_metrics import (
    EXPORTER_METRIC_NAMES, MAX_DEPTH, STATE_NAME, read_state, state_files, write_state,
)
from fedmeta.simulations.engines.flower_runtime import _free_ports
from tests.client.test_site_metrics import _scrape  # one scrape helper for both exporters


def _value(families: dict[str, list], family: str, **labels) -> float:
    found = [s.value for s in families[family] if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (family, labels, families[family])
    return found[0]


def _training(server_round: int, dropped: tuple[str, ...] = (), epsilon: float | None = None) -> RoundReport:
    outcome = RoundOutcome(accepted={1: {}, 2: {}}, dropped=[Drop(9, "no reply", kind) for kind in dropped],
                           updated=True, metrics={QUERY_LOSS_AFTER: 0.5},
                           privacy={"epsilon": epsilon} if epsilon is not None else {})
    record = training_record(server_round, 2 + len(dropped), outcome, "all", [])
    record["seconds"] = 2.0
    return RoundReport(server_round, TRAINING, record, outcome)


def _run(out_dir: Path) -> OperatorMetrics:
    out_dir.mkdir(parents=True)
    return OperatorMetrics(adaptation_steps=(0, 5), state_path=out_dir / STATE_NAME)


def test_the_exporter_serves_every_runs_last_state_between_runs_and_skips_broken_files(tmp_path):
    runs = tmp_path / "runs"
    finished = _run(runs / "exp-a")
    finished.on_start(0)
    finished.on_round(_training(1, dropped=("timeout",), epsilon=0.75))
    finished.on_round(_training(2, dropped=("timeout", "node-gone"), epsilon=1.5))
    finished.on_run_end(None)
    running = _run(runs / "consortium" / "exp-b")
    running.on_start(4)  # a resumed run, before its first round
    (runs / "broken").mkdir()
    (runs / "broken" / STATE_NAME).write_text("fedmeta_round 3\n{{ not metrics\n")
    (runs / "cut").mkdir()  # cut after a whole line, as a writer that was not atomic leaves it: every line parses
    (runs / "cut" / STATE_NAME).write_bytes(b"".join((runs / "exp-a" / STATE_NAME).read_bytes().splitlines(True)[:-3]))

    port = _free_ports(1)[0]
    exporter = subprocess.Popen([sys.executable, "-m", "fedmeta.simulations.cli", "server-metrics", "--dir", str(runs),
                                 "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        first = _scrape(port)
        running.on_round(_training(5))
        running.on_run_error(RuntimeError("every reply failed"))  # the second run ends too, as a failure
        second = _scrape(port)
    finally:
        exporter.send_signal(signal.SIGTERM)
        code = exporter.wait(timeout=20)
    output = exporter.stdout.read().decode()
    assert code == 0, output
    with pytest.raises(OSError):  # stopped: the port is closed
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)

    # Every series the ServerApp's own endpoint has (the dashboards query these), and the exporter's own.
    served = {name.removesuffix("_total") for name in first}
    assert {name.removesuffix("_total") for name in (*METRIC_NAMES, *EXPORTER_METRIC_NAMES)} <= served
    # The finished run: its last values, held; the running one: active, at the round it resumed after.
    a, b = {"run": "exp-a"}, {"run": "consortium/exp-b"}
    assert _value(first, "fedmeta_round", **a) == 2 and _value(first, "fedmeta_run_active", **a) == 0
    assert _value(first, "fedmeta_run_state", state="completed", **a) == 1
    assert _value(first, "fedmeta_run_state", state="running", **a) == 0
    assert _value(first, "fedmeta_sites_dropped", reason="timeout", **a) == 2
    assert _value(first, "fedmeta_sites_dropped", reason="node-gone", **a) == 1
    assert _value(first, "fedmeta_sites_answered", **a) == 4 and _value(first, "fedmeta_dp_epsilon", **a) == 1.5
    assert _value(first, "fedmeta_round", **b) == 4 and _value(first, "fedmeta_run_active", **b) == 1
    assert _value(first, "fedmeta_run_state", state="running", **b) == 1
    # The two broken files are skipped and counted, never served in part.
    assert _value(first, "fedmeta_server_runs") == 2 and _value(first, "fedmeta_server_unreadable_state_files") == 2
    assert {s.labels["run"] for s in first["fedmeta_round"]} == {"exp-a", "consortium/exp-b"}
    assert output.count("skipped") == 2 and "broken" in output and "Missing # EOF" in output  # each said once
    # Read again at every scrape: the second run ended, and both are still served.
    assert _value(second, "fedmeta_round", **b) == 5 and _value(second, "fedmeta_run_active", **b) == 0
    assert _value(second, "fedmeta_run_state", state="failed", **b) == 1
    assert _value(second, "fedmeta_round", **a) == 2 and _value(second, "fedmeta_server_runs") == 2


@pytest.mark.parametrize("text, problem", [
    ("", "Missing # EOF"),
    ("# TYPE fedmeta_round gauge\nfedmeta_round 3.0\n", "Missing # EOF"),
    ("fedmeta_round{ 3\n# EOF\n", "Invalid"),
    ("# TYPE node_load1 gauge\nnode_load1 3.0\n# EOF\n", "not a ServerApp series"),
    ("# TYPE fedmeta_server_runs gauge\nfedmeta_server_runs 9.0\n# EOF\n", "not a ServerApp series"),
    ("# " + "x" * (1 << 20) + "\n# EOF\n", "larger than"),
])
def test_a_state_file_that_is_not_whole_is_refused(tmp_path, text, problem):
    path = tmp_path / STATE_NAME
    path.write_text(text)
    with pytest.raises(ValueError, match=problem):
        read_state(path)


def test_state_files_are_found_below_the_runs_folder_but_not_in_hidden_or_too_deep_folders(tmp_path):
    wanted = [tmp_path / STATE_NAME, tmp_path / "a" / STATE_NAME, tmp_path / "b/c" / STATE_NAME]
    deep = tmp_path.joinpath(*["d"] * (MAX_DEPTH + 1), STATE_NAME)
    for path in (*wanted, deep, tmp_path / ".trash" / STATE_NAME):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# EOF\n")
    assert sorted(state_files(tmp_path)) == sorted(wanted)


def test_the_state_is_replaced_whole_and_a_failure_to_write_never_stops_the_run(tmp_path, caplog):
    path = tmp_path / STATE_NAME
    write_state(path, b"# EOF\n")
    write_state(path, b"# TYPE fedmeta_round gauge\nfedmeta_round 1.0\n# EOF\n")
    assert [f.name for f in read_state(path)] == ["fedmeta_round"] and os.listdir(tmp_path) == [STATE_NAME]
    operator = OperatorMetrics(state_path=tmp_path / "gone" / STATE_NAME)  # a folder that does not exist
    operator.on_start(0)
    operator.on_round(_training(1))
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "cannot write" in errors[0]  # said once, and the run goes on


def test_the_exporter_refuses_a_bad_port_and_a_missing_folder_with_the_fix(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fedmeta.simulations.cli", "server-metrics", *args],
                              capture_output=True, text=True, timeout=60)

    bad_port = run("--dir", str(tmp_path), "--port", "70000")
    assert bad_port.returncode == 2 and "--port 70000 is not a TCP port" in bad_port.stderr
    missing = run("--dir", str(tmp_path / "nowhere"), "--port", "9100")
    assert missing.returncode == 2 and "is not a folder; give the folder the runs' out-dirs are in" in missing.stderr
