"""`fedmeta perf`'s own instruments: the process-tree memory sampler and the report."""

import os
import subprocess
import sys
import time

from fedmeta.simulations.perf.perf import format_report
from fedmeta.simulations.engines.processes import TreeMemorySampler


def test_tree_memory_counts_processes_of_the_flower_home_and_no_others(tmp_path):
    home = tmp_path / "flwr-home"
    hog = "x = bytearray(300 * 2**20); import time; time.sleep(30)"
    ours = subprocess.Popen([sys.executable, "-c", hog], env={**os.environ, "FLWR_HOME": str(home)})
    stranger = subprocess.Popen([sys.executable, "-c", hog], env={**os.environ, "FLWR_HOME": str(tmp_path / "other")})
    try:
        time.sleep(3)  # let both touch their 300 MB
        alone = TreeMemorySampler(None).sample()
        with_tree = TreeMemorySampler(home).sample()
        assert with_tree - alone > 250 * 2**20, "the run's process is not counted"
        assert with_tree - alone < 450 * 2**20, "a process of another FLWR_HOME is counted too"
    finally:
        for process in (ours, stranger):
            process.kill()
            process.wait()


def test_report_states_each_target_and_whether_it_is_met():
    results = {
        "machine": "test",
        "sim": {"sites": 10, "rounds": 10, "bare_seconds": 10.0, "inprocess_seconds": 11.0, "ray_seconds": 20.0,
                "inprocess_vs_bare": 1.1, "ray_vs_bare": 2.0, "ray_seconds_in_rounds": 12.0,
                "ray_seconds_outside_rounds": 8.0, "ray_rounds_vs_bare": 1.2},
        "comm": {"fomaml": {"model_fp32_bytes": 100, "reply_bytes": 101, "reply_vs_model": 1.01, "reply_vs_payload": 1.01}},
    }
    report = format_report(results)
    assert "| Ray / bare loop | 2.00 | ≤ 1.25 | no |" in report
    assert "| fomaml reply / fp32 model | 1.01 | ≤ 1.05 | yes |" in report
    assert "8.0 s start-up and shutdown" in report
