"""The meta-step micro-benchmark: its ratios from known measurements, and one real run of every case."""

import math

import pytest

from fedmeta.simulations.perf.meta_step import PLAIN, BenchSetting, format_table, measure, summarise

TINY = BenchSetting("tiny", 2, (16, 16), (4, 8), (2,), k=2, q=2, inner_steps=2)


def test_summary_ratios_come_from_the_measurements():
    measured = {
        "fomaml": {"seconds": 0.02, "peak_bytes": 100},
        "maml": {"seconds": 0.05, "peak_bytes": 250},
        PLAIN: {"seconds": 0.016, "peak_bytes": 80},
    }
    table = summarise(measured)
    assert table["maml"]["time_vs_fomaml"] == pytest.approx(2.5)
    assert table["maml"]["memory_vs_fomaml"] == pytest.approx(2.5)
    assert table[PLAIN]["time_vs_fomaml"] == pytest.approx(0.8)
    assert table["targets"]["maml_time_vs_fomaml"] == pytest.approx(2.5)
    assert table["targets"]["fomaml_time_vs_plain"] == pytest.approx(1.25)
    text = format_table("known", table)
    assert "| maml | 50.0 | 2.50 |" in text
    assert "MAML / FOMAML time: 2.50 (target ≤ 3.0); FOMAML / plain forward-backward: 1.25 (target ≤ 1.3)" in text


def test_a_zero_reference_memory_gives_nan_not_a_crash():
    table = summarise({"fomaml": {"seconds": 1.0, "peak_bytes": 0}, "maml": {"seconds": 2.0, "peak_bytes": 10}})
    assert math.isnan(table["maml"]["memory_vs_fomaml"])
    assert math.isnan(table["targets"]["fomaml_time_vs_plain"])  # no plain case measured


def test_every_case_runs_and_is_measured():
    import io

    from fedmeta.common.progress import Heartbeat

    cases = ("fomaml", "prototypes", "lstm-optimizer", PLAIN)  # each case is a child process: keep them few
    said = io.StringIO()
    measured = measure(TINY, repeats=1, cases=cases, beat=Heartbeat("perf meta", stream=said))
    assert sorted(measured) == sorted(cases)
    # `perf meta` ran 18 minutes silent: each stage now says so as it ends
    lines = [line for line in said.getvalue().splitlines() if "still running" not in line]
    stages = [line.split(":")[1].split("(")[0].strip() for line in lines]  # "perf meta tiny: <stage> (i/n) ..."
    n = len(cases)
    assert stages[:n] == [f"warmed up {c}" for c in cases] and stages[n] == "timing 1 round"
    assert stages[n + 1].startswith("timed round 1/1 in ")
    assert stages[n + 2:] == [f"peak memory of {c}" for c in cases]
    for case in cases:
        assert measured[case]["seconds"] > 0 and math.isfinite(measured[case]["seconds"])
        assert isinstance(measured[case]["peak_bytes"], int) and measured[case]["peak_bytes"] >= 0
    # The other families run on their own networks; the learned optimiser's state is counted.
    assert measured["prototypes"]["parameters"] != measured["fomaml"]["parameters"]
    lstm_parts = measured["lstm-optimizer"]["parameters"] - measured["fomaml"]["parameters"]
    assert lstm_parts > 0 and measured["lstm-optimizer"]["state_bytes"] == 4 * 2 * 8 * measured["fomaml"]["parameters"]


def test_the_episode_benchmark_times_loop_and_vmap_and_finds_the_same_gradients():
    from fedmeta.simulations.perf.meta_step import format_episodes, measure_episodes

    rows = measure_episodes(TINY, repeats=1, cases=((2, 1),))
    assert [(r["algorithm"], r["episodes"], r["inner_steps"]) for r in rows] == [("fomaml", 2, 1), ("maml", 2, 1)]
    for row in rows:
        assert row["loop_seconds"] > 0 and row["vmap_seconds"] > 0
        assert row["vmap_vs_loop"] == pytest.approx(row["vmap_seconds"] / row["loop_seconds"])
        assert row["relative_difference"] < 1e-4  # float32 rounding; tests/common/test_meta.py: equal in float64
    assert "| fomaml | 2 | 1 |" in format_episodes("tiny", rows)
