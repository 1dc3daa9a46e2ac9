"""`fedmeta perf`'s own instruments: the process-tree memory sampler and the report."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmeta.simulations.perf.perf import format_report
from fedmeta.simulations.engines.processes import TreeMemorySampler


def test_tree_memory_counts_processes_of_the_flower_home_and_no_others(tmp_path):
    home = tmp_path / "flwr-home"
    hog = "x = bytearray(300 * 2**20); print('ready', flush=True); import time; time.sleep(30)"
    ours = subprocess.Popen([sys.executable, "-c", hog], env={**os.environ, "FLWR_HOME": str(home)},
                            stdout=subprocess.PIPE, text=True)
    stranger = subprocess.Popen([sys.executable, "-c", hog], env={**os.environ, "FLWR_HOME": str(tmp_path / "other")},
                                stdout=subprocess.PIPE, text=True)
    try:
        for process in (ours, stranger):  # both hold their 300 MB (on a loaded machine that takes a while)
            assert process.stdout.readline().strip() == "ready"
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


def _cpu_of(pid: int) -> float:
    """utime + stime of ``pid`` from /proc, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_sampler_records_each_process_role_lifetime_and_cpu(tmp_path):
    from fedmeta.simulations.engines.processes import process_role

    home = tmp_path / "flwr-home"
    # A process named like Flower's SuperExec, burning 0.5 s of CPU, saying so, then sleeping. No clock bounds
    # the test: the sampler's last reading comes after the burn (the marker file), so it holds at least 0.5 s
    # of CPU, and at most what the process's own counters say once the sampler stopped.
    burned = tmp_path / "burned"
    busy = ("import time, sys, pathlib; t = time.process_time(); exec('while time.process_time() - t < 0.5: pass'); "
            f"pathlib.Path({str(burned)!r}).touch(); time.sleep(60)")
    process = subprocess.Popen([sys.executable, "-c", busy, "flower-superexec"], env={**os.environ, "FLWR_HOME": str(home)})
    try:
        with TreeMemorySampler(home, interval_s=0.1) as sampler:
            for _ in range(600):
                if burned.exists():
                    break
                time.sleep(0.1)
            burn = _cpu_of(process.pid)  # the child's own counter once its burn is done
            time.sleep(0.5)  # a few samples after the burn
        assert burned.exists(), "the CPU-burning child never finished its burn"
        after = _cpu_of(process.pid)
        timeline = sampler.timeline()
        assert list(timeline) == ["SuperExec"]
        row = timeline["SuperExec"]
        assert row["processes"] == 1 and row["first_s"] < row["last_s"]
        # The sampler's reading is the child's counter as the kernel keeps it: between the two direct reads.
        tick = 1 / os.sysconf("SC_CLK_TCK")
        assert burn - tick <= row["cpu_s"] <= after + tick
    finally:
        process.kill()
        process.wait()
    assert process_role("ray::ClientAppActor.run") == "ClientApp actors (Ray)"
    assert process_role("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --x") == \
        "Ray services (GCS, raylet, dashboard)"
    assert process_role("python /venv/bin/flwr-simulation --runtime-api-address x") == \
        "flwr-simulation (ServerApp, Ray driver)"
    assert process_role("python /venv/bin/flwr run /app local-sim") == "flwr CLI (run, list)"


def test_import_profile_charges_a_packages_imports_to_the_package_that_made_them():
    from fedmeta.simulations.perf.perf import import_profile

    profile = import_profile("fedmeta.common.synth")  # numpy, imported by fedmeta's module
    assert profile["module"] == "fedmeta.common.synth"
    assert "numpy" in profile["by_package"] and profile["by_package"]["numpy"] > 0
    assert abs(sum(profile["by_package"].values()) - profile["import_seconds"]) < 1e-6
    assert profile["process_seconds"] >= profile["import_seconds"]


def test_the_startup_breakdown_and_the_scaling_rows_reach_the_report():
    from fedmeta.simulations.perf.perf import _startup

    timeline = {"flwr CLI (run, list)": {"first_s": 0.1, "last_s": 9.0, "cpu_s": 3.0, "processes": 2},
                "flwr-simulation (ServerApp, Ray driver)": {"first_s": 5.0, "last_s": 30.0, "cpu_s": 10.0, "processes": 1},
                "Ray services (GCS, raylet, dashboard)": {"first_s": 11.0, "last_s": 29.0, "cpu_s": 3.0, "processes": 4},
                "ClientApp actors (Ray)": {"first_s": 15.0, "last_s": 29.0, "cpu_s": 16.0, "processes": 2}}
    startup = _startup(timeline, appeared=[23.0, 25.0], round_seconds=[2.0, 2.0], seconds=31.0)
    assert [round(p["seconds"], 1) for p in startup["phases"]] == [5.0, 6.0, 4.0, 6.0]
    assert startup["startup_seconds"] == 21.0 and startup["shutdown_seconds"] == 6.0
    row = {"sites_per_round": 10, "seconds": 40.0, "seconds_per_round": 2.0, "first_round_seconds": 2.5,
           "startup_seconds": 21.0, "peak_tree_bytes": 2 * 2**30, "federation_generation_seconds": 0.1,
           "sites_rendered": 10, "federation_disk_bytes": 5 * 2**20}
    results = {
        "machine": "test",
        "sim": {"sites": 10, "rounds": 10, "bare_seconds": 10.0, "inprocess_seconds": 11.0, "ray_seconds": 40.0,
                "inprocess_vs_bare": 1.1, "ray_vs_bare": 4.0, "ray_seconds_in_rounds": 12.0,
                "ray_seconds_outside_rounds": 28.0, "ray_rounds_vs_bare": 1.2, "ray_startup": startup,
                "rounds_for_target": 400, "imports": {}},
        "scaling": {"rounds": 2, "sites_per_round": 10, "largest": 1000, "smallest": 10,
                    "by_sites": {"10": row, "1000": {**row, "peak_tree_bytes": 2.2 * 2**30}},
                    "by_sites_sampled": {"10": row, "50": {**row, "sites_per_round": 50, "seconds_per_round": 9.0}},
                    "memory_largest_vs_smallest": 1.1, "round_time_largest_vs_smallest": 1.0,
                    "first_round_largest_vs_smallest": 1.0, "round_time_more_sampled_vs_sampled": 4.5},
    }
    report = format_report(results)
    assert "| Ray cluster start | 4.0 |" in report
    assert "from about 400 rounds on" in report
    assert "| 1000 | 50 | 9.00 |" in report
    assert "| memory 1000 / 10 sites | 1.10 | ≤ 1.3 | yes |" in report


def test_the_round_clock_counts_training_rounds_and_forgets_an_earlier_runs_file(tmp_path):
    import json

    from fedmeta.simulations.perf.perf import _RoundClock

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"round": r}) + "\n" for r in (1, 2, 3)))  # a previous run's file
    clock = _RoundClock(metrics, time.monotonic())
    clock._poll()
    assert len(clock.appeared) == 3
    metrics.write_text(json.dumps({"round": 0}) + "\n")  # this run starts afresh: held-out round 0 only
    clock._poll()
    assert clock.appeared == []
    with metrics.open("a") as f:
        f.write(json.dumps({"round": 1}) + "\n" + '{"round": 2, "par')  # a line half written
    clock._poll()
    assert len(clock.appeared) == 1


def test_the_scaling_part_reports_the_thousand_site_row_in_the_issues_keys_each_run_cold(tmp_path, monkeypatch):
    """`scaling.by_sites["1000"]` and `scaling.memory_largest_vs_smallest`, without Ray: the engines are stand-ins
    that render the sites a round would sample, so what the part derives (and that every run starts from a
    federation with nothing rendered) is what is checked."""
    from fedmeta.common.config import RunConfig
    from fedmeta.common.synth import load_manifest
    from fedmeta.simulations.perf import perf

    def sampled_sites(config):
        config = RunConfig.from_run_config(config.to_run_config())
        for info in load_manifest(config.federation_dir).train_sites[:config.sites_per_round]:
            info.folder()

    def fake_ray(config, num_sites, flwr_home):
        sampled_sites(config)
        peak = (2.0 if num_sites == 10 else 2.1) * 2**30
        return {"seconds": 30.0, "round_seconds": [3.0, 2.0], "peak_tree_bytes": peak,
                "startup": {"startup_seconds": 20.0, "cpu_seconds_by_role": {perf.ROLE_SIMULATION: 9.0}}}

    def fake_inprocess(config, num_sites):
        sampled_sites(config)
        return {"seconds": 8.0, "rounds": 2, "round_seconds": [4.0, 1.0]}

    monkeypatch.setattr(perf, "run_ray_engine", fake_ray)
    monkeypatch.setattr(perf, "run_inprocess_engine", fake_inprocess)
    federation = perf._federation(1000, tmp_path / "scaling-federations", render=False)
    load_manifest(federation).train_sites[-1].folder()  # left by an earlier run: must not count as this run's
    result = perf.bench_scaling(tmp_path, counts=(10, 1000), sampled=2, more_sampled=None)
    row = result["by_sites"]["1000"]
    assert row["sites_rendered"] == 2 and row["sites_per_round"] == 2  # cold: only what this run sampled
    assert result["memory_largest_vs_smallest"] == pytest.approx(2.1 / 2.0)
    assert result["first_round_largest_vs_smallest"] == pytest.approx(1.0)
    assert row["engine_cpu_seconds"] == 9.0 and row["federation_generation_seconds"] >= 0
    assert set(result["inprocess_by_sites"]) == {"10", "1000"}
    assert "| memory 1000 / 10 sites | 1.05 | ≤ 1.3 | yes |" in format_report({"machine": "test", "scaling": result})
