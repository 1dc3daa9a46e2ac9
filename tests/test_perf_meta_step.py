"""The meta-step micro-benchmark runs end to end and reports what it claims (not how fast)."""

import math

from fedmeta.simulations.perf.meta_step import PLAIN, BenchSetting, format_table, measure, summarise

TINY = BenchSetting("tiny", 2, (16, 16), (4, 8), (2,), k=2, q=2, inner_steps=2)


def test_benchmark_measures_every_case_and_reports_ratios():
    cases = ("fomaml", "maml", PLAIN)
    table = summarise(measure(TINY, repeats=1, cases=cases))
    for case in cases:
        assert table[case]["seconds"] > 0
        assert table[case]["peak_bytes"] >= 0
        assert math.isfinite(table[case]["time_vs_fomaml"])
    assert table["fomaml"]["time_vs_fomaml"] == 1.0
    assert table["targets"]["maml_time_vs_fomaml"] == table["maml"]["time_vs_fomaml"]
    assert table["targets"]["fomaml_time_vs_plain"] == table["fomaml"]["seconds"] / table[PLAIN]["seconds"]
    # Second-order MAML keeps the inner loop's graph: it needs more memory than FOMAML.
    assert table["maml"]["peak_bytes"] > table["fomaml"]["peak_bytes"]
    text = format_table("tiny", table)
    assert "| maml |" in text and "target ≤ 3.0" in text
