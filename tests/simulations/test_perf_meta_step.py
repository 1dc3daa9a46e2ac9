"""The meta-step micro-benchmark: its ratios from known measurements, and one real run of every case."""

import math
import re

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


def test_as_trained_reads_each_case_from_the_benchmark_presets():
    from fedmeta.simulations.perf.meta_step import Training, as_trained

    trained = as_trained(("fomaml", "maml", "prototypes", PLAIN))
    # The recommended method as benchmark-anatomy trains it: no inner step, 4 episodes per site-round.
    assert trained["prototypes"] == Training(inner_steps=0, episodes=4, preset="benchmark-anatomy")
    assert trained["maml"] == Training(inner_steps=3, episodes=2, preset="benchmark-anatomy")
    assert (trained["fomaml"].inner_steps, trained["fomaml"].episodes) == (3, 2)  # anatomy trains no FOMAML
    assert trained[PLAIN] == trained["fomaml"]  # the plain passes time FOMAML's


def test_as_trained_summary_scales_episodes_to_a_site_round():
    from fedmeta.simulations.perf.meta_step import Training, format_as_trained, summarise_as_trained

    trained = {"fomaml": Training(3, 2, "p"), "prototypes": Training(0, 4, "p"), PLAIN: Training(3, 2, "p")}
    measured = {"fomaml": {"seconds": 0.04, "peak_bytes": 100}, "prototypes": {"seconds": 0.03, "peak_bytes": 150},
                PLAIN: {"seconds": 0.032, "peak_bytes": 80}}
    table = summarise_as_trained(measured, trained)
    prototypes = table["prototypes"]
    assert prototypes["time_vs_fomaml"] == pytest.approx(0.75)
    assert prototypes["round_seconds"] == pytest.approx(0.12)
    assert prototypes["round_time_vs_fomaml"] == pytest.approx(1.5)
    assert prototypes["memory_vs_fomaml"] == pytest.approx(1.5)
    assert prototypes["round_memory_vs_fomaml"] == pytest.approx(1.5)  # one episode after the other: one's peak
    # The benchmark's matched budget: 4 x (support pass + query gradient) = 2 x (3 + 1) = 8 local steps.
    assert [table[c]["local_steps"] for c in ("fomaml", "prototypes", PLAIN)] == [8, 8, 8]
    assert table["targets"]["prototypes_time_vs_fomaml"] == pytest.approx(0.75)
    text = format_as_trained("known", table)
    assert "| prototypes | 0 | 4 | 8 | 30.0 | 0.75 | 0.0 | 1.50 | 120.0 | 1.50 | 0.0 | 1.50 | p |" in text
    assert "prototypes / FOMAML time per episode, as trained: 0.75 (target ≤ 2.5)" in text


def test_the_as_trained_measurement_runs_each_case_at_its_own_inner_steps(monkeypatch):
    from fedmeta.simulations.perf import meta_step

    seen = []
    one_run = meta_step._one_run
    monkeypatch.setattr(meta_step, "_one_run", lambda case, setting, *rest: (seen.append((case, setting.inner_steps)),
                                                                             one_run(case, setting, *rest))[1])
    trained = meta_step.as_trained(("fomaml", "prototypes"))
    measured = meta_step.measure(TINY, repeats=1, cases=tuple(trained),
                                 inner_steps={case: t.inner_steps for case, t in trained.items()})
    assert sorted(set(seen)) == [("fomaml", 3), ("prototypes", 0)]  # not the setting's 2
    table = meta_step.summarise_as_trained(measured, trained)
    for case in trained:
        assert table[case]["seconds"] > 0  # a time was taken; its size depends on the CPU and its load
        # One episode at a time (prototypes) or all at once (a batched case): the site-round's peak follows.
        at_once = meta_step._round_cost(case, trained[case])[1]
        assert table[case]["round_peak_bytes"] == table[case]["peak_bytes"] * at_once
        assert table[case]["round_seconds"] == pytest.approx(trained[case].episodes * table[case]["seconds"])


@pytest.mark.parametrize("text, problem", [
    ("fomaml,mamll", "unknown case(s) mamll"),
    ("maml,prototypes", "fomaml must be among them"),
    (",", "(none given)"),
])
def test_bad_cases_are_refused_with_the_reason(text, problem):
    import argparse

    from fedmeta.simulations.perf.meta_step import parse_cases

    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(problem)):
        parse_cases(text)


def test_cases_are_kept_in_table_order():
    from fedmeta.simulations.perf.meta_step import parse_cases

    assert parse_cases(f"prototypes, {PLAIN},fomaml") == ("fomaml", "prototypes", PLAIN)
