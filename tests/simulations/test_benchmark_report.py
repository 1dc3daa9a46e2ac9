"""The benchmark's report on fabricated results (no training): the auto column, the rows above the oracle, the
oracle's early stopping, time to accuracy; and the oracle's early stopping on a real site."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fedmeta.common.jsonio import loads_strict
from fedmeta.simulations.experiments.benchmark_preset import AUTO, load_benchmark_preset, step_columns
from fedmeta.simulations.experiments.benchmark_report import (
    above_oracle, above_oracle_lines, format_markdown, goal_check, summarise, time_to_accuracy,
)
from tests.simulations.test_benchmark import TINY_BENCHMARK


def _cell(dice: float, chosen: int | None = None) -> dict:
    cell = {"dice": dice}
    if chosen is not None:
        cell["chosen_steps"] = chosen
    return cell


def _dice(values: dict[str, tuple[float, float, float]], adapts: dict[str, bool]) -> dict:
    """Per method: (Dice at 0 steps, at 10 steps, at auto) on two sites, two seeds; site b 0.1 lower."""
    dice = {}
    for name, (zero, ten, auto) in values.items():
        dice[name] = {}
        for seed in ("0", "1"):
            dice[name][seed] = {}
            for site, shift in (("a", 0.0), ("b", -0.1)):
                by_steps = {"0": _cell(zero + shift), "10": _cell(ten + shift),
                            "auto": _cell(auto + shift, chosen=3 if seed == "0" else 5) if adapts[name]
                            else _cell(zero + shift)}
                dice[name][seed][site] = {"5": by_steps}
    return dice


def _results(dice: dict, runs: dict | None = None, oracle: dict | None = None) -> dict:
    spec = {"name": "fabricated", "federation": "smoke", "federation-seed": 0, "steps": [0, 10], "auto-steps": True,
            "auto-max-steps": 10, "shots": [5], "eval-max-images": 0, "curve-every": 5, "oracle-steps": 3000,
            "oracle-eval-every": 25, "oracle-patience": 4}
    columns = step_columns(spec)
    summary = summarise(dice, [5], columns)
    names = list(dice)
    return {
        "preset": spec, "summary": summary, "eval_role": "heldout", "eval_sites": {"a": "unseen-a", "b": "unseen-b"},
        "train_sites": ["t1", "t2"], "seeds": [0, 1], "method_order": names, "local_steps_total": 8,
        "goal": goal_check(summary, [5], columns, dice=dice), "above_oracle": above_oracle(summary, [5], columns),
        "methods": {n: {"meaning": n, "adapts": True, "training": None if n != "oracle" else "oracle", "budget": None}
                    for n in names},
        "runs": runs or {}, "time_to_accuracy": time_to_accuracy(runs or {}), "oracle": oracle or {},
        "files": {"plot": "dice_vs_steps.png"}, "seconds_total": 60.0,
        "machine": {"processor": "x", "cpus": 2, "torch": "t", "torch_threads": 1, "load_average_start": [],
                    "load_average_end": []},
    }


ADAPTS = {"fedavg-ft": True, "maml": True, "oracle": False}


def test_auto_is_the_main_column_with_the_mean_steps_chosen_and_the_fixed_count_beside_it():
    dice = _dice({"fedavg-ft": (0.5, 0.6, 0.62), "maml": (0.4, 0.62, 0.70), "oracle": (0.9, 0.9, 0.9)}, ADAPTS)
    results = _results(dice)
    auto = results["summary"]["maml"]["5"]["auto"]
    assert auto["chosen_steps_mean"] == pytest.approx(4.0) and auto["chosen_steps_per_site"] == {"a": 4.0, "b": 4.0}
    assert "chosen_steps_mean" not in results["summary"]["oracle"]["5"]["auto"]  # a row that does not adapt
    goal = results["goal"]
    assert goal["steps"] == AUTO and goal["met_by"] == ["maml"]  # +0.08 at auto in both seeds
    assert goal["fixed"]["steps"] == 10 and goal["fixed"]["met_by"] == []  # +0.02 at 10 steps
    assert goal["methods"]["maml"]["paired_margin_per_seed"] == pytest.approx([0.08, 0.08])
    loads_strict(json.dumps(results, allow_nan=False))  # strict JSON: "auto" is a key like "0" and "10"
    table = format_markdown(results)
    assert "| method | auto | 0 steps | 10 steps | worst site (auto) | of oracle (auto) |" in table
    assert "| maml | 0.650 ± 0.000 (4.0 steps) | 0.350 ± 0.000 | 0.570 ± 0.000 |" in table
    assert "## Per site, k = 5, auto" in table and "0.700 (4.0 steps)" in table and "## Per site, k = 5, 10 steps" in table
    assert "at 10 steps, a fixed count (for comparison)" in table and "above the oracle" not in table.lower()


def test_a_grid_without_auto_keeps_the_fixed_headline():
    dice = _dice({"fedavg-ft": (0.5, 0.6, 0.6), "maml": (0.4, 0.7, 0.7)}, {"fedavg-ft": False, "maml": False})
    summary = summarise(dice, [5], [0, 10])
    goal = goal_check(summary, [5], [0, 10], dice=dice)
    assert goal["steps"] == 10 and "fixed" not in goal and goal["met_by"] == ["maml"]


def test_every_cell_above_the_oracle_is_flagged_once_per_case():
    # maml is above the oracle at auto only (0.95 > 0.9 on site a, 0.85 > 0.8 on b), fedavg-ft at 10 steps only.
    dice = _dice({"fedavg-ft": (0.5, 0.92, 0.6), "maml": (0.4, 0.7, 0.95), "oracle": (0.9, 0.9, 0.9)}, ADAPTS)
    results = _results(dice)
    flagged = {(f["method"], f["steps"], f["site"]) for f in results["above_oracle"]}
    assert flagged == {(name, steps, site) for name, steps in (("maml", "auto"), ("fedavg-ft", "10"))
                       for site in ("a", "b", None)}
    lines = above_oracle_lines(results)
    assert "above the oracle: maml, k = 5, site a (oracle 0.900): auto 0.950" in lines
    assert "above the oracle: fedavg-ft, k = 5, mean over sites (oracle 0.850): 10 steps 0.870" in lines
    table = format_markdown(results)
    assert "## Above the oracle" in table and "(above the oracle)" in table  # the fraction flagged, not 102 %
    beaten = _results(_dice({"fedavg": (0.95, 0.95, 0.95), "oracle": (0.9, 0.9, 0.9)}, {"fedavg": False, "oracle": False}))
    assert "above the oracle: fedavg, k = 5, site a (oracle 0.900): 0.950 at every step count" in above_oracle_lines(beaten)
    del results["above_oracle"]  # a results.json from before the flag: computed from its summary
    assert above_oracle_lines(results) == lines


def test_time_to_accuracy_says_already_at_round_0_and_counts_bytes_up_to_the_round():
    def run(*points):
        return {"curve": [{"round": r, "dice": d, "bytes": b} for r, d, b in points]}

    runs = {"fedavg": {0: run((0, 0.30, 0), (5, 0.50, 10 * 2**20), (10, 0.60, 20 * 2**20)),
                       1: run((0, 0.65, 0), (5, 0.55, 10 * 2**20), (10, 0.60, 20 * 2**20))},
            "maml": {0: run((0, 0.30, 0), (5, 0.61, 10 * 2**20), (10, 0.70, 20 * 2**20)),
                     1: run((0, 0.65, 0), (5, 0.50, 10 * 2**20), (10, 0.55, 20 * 2**20))}}
    tta = time_to_accuracy(runs)
    assert tta["maml"]["0"] == {"target": 0.60, "round": 5, "bytes": 10 * 2**20, "final_dice": 0.70, "start_dice": 0.30,
                                "already_at_start": False}
    assert tta["maml"]["1"]["already_at_start"] and tta["fedavg"]["1"]["already_at_start"]
    dice = _dice({"fedavg-ft": (0.5, 0.6, 0.6), "oracle": (0.9, 0.9, 0.9)}, ADAPTS)
    table = format_markdown(_results(dice, runs=runs))
    assert "| maml | round 5, 10.0 MB | already at round 0 (start 0.6500 ≥ 0.6000) |" in table
    assert "| fedavg | round 10, 20.0 MB | already at round 0" in table
    assert "round 0, 0.0 MB" not in table and "in seed(s) 1, so in those seeds the target measures no training" in table


def test_the_oracle_row_reports_its_early_stopping_per_site_and_seed():
    dice = _dice({"fedavg-ft": (0.5, 0.6, 0.6), "oracle": (0.9, 0.9, 0.9)}, ADAPTS)
    record = {"steps": 640, "best_step": 540, "max_steps": 3000, "stopped": "early-stopped", "validation_dice": 0.71,
              "train_patients": ["p1", "p2"], "validation_patients": ["p3"], "validation_curve": []}
    oracle = {"0": {"a": record, "b": {**record, "steps": 3000, "best_step": 3000, "stopped": "one support patient",
                                       "validation_dice": None, "validation_patients": []}},
              "1": {"a": {**record, "steps": 440}, "b": {**record, "steps": 3000, "stopped": "one support patient",
                                                         "validation_dice": None}}}
    table = format_markdown(_results(dice, oracle=oracle))
    assert ("early-stopped on its validation patients at 1820 Adam steps (median; 440–3000), cap 3000; stopped "
            "early in 2 of 4 site-seeds; b: one support patient, nothing to validate on, trained to the cap") in table
    assert "| a | 640 (early-stopped; kept 540, validation 0.710) | 440 (early-stopped; kept 540, validation 0.710) |" in table
    assert "| b | 3000 (one support patient: to the cap) |" in table


@pytest.mark.parametrize(
    ("steps", "expected"),
    [("[0, 2]", ([0, 2], False)), ('[2, 0, "auto"]', ([0, 2], True)), ('["auto", 5]', ([5], True))],
)
def test_auto_is_read_from_the_preset_steps_array(tmp_path, steps, expected):
    path = tmp_path / "p.toml"
    path.write_text(TINY_BENCHMARK.replace("steps = [0, 2]", f"steps = {steps}"))
    spec = load_benchmark_preset(str(path))
    assert (spec["steps"], spec["auto-steps"]) == expected and spec["auto-max-steps"] == max(expected[0])
    assert step_columns(spec) == expected[0] + ([AUTO] if expected[1] else [])


@pytest.mark.parametrize(
    ("steps", "message"),
    [('["auto"]', "at least one fixed step count"), ('[0, "best"]', "neither step counts"),
     ("[0, true]", "neither step counts")],
)
def test_bad_step_arrays_name_the_problem(tmp_path, steps, message):
    path = tmp_path / "p.toml"
    path.write_text(TINY_BENCHMARK.replace("steps = [0, 2]", f"steps = {steps}"))
    with pytest.raises(ValueError, match=message):
        load_benchmark_preset(str(path))


def test_the_oracle_stops_when_its_validation_patients_stop_improving(smoke_federation):
    from fedmeta.common.config import RunConfig
    from fedmeta.common.data import SiteDataset, adaptation_patients
    from fedmeta.simulations.experiments.oracle import fit_oracle, oracle_patients

    config = RunConfig(image_size=32, model_base_channels=8, model_levels=3)
    site = SiteDataset.load(smoke_federation / "new-sequence", config.data_config())
    # A smoke site has one support patient: nothing to validate on, so the oracle trains to the cap.
    single = fit_oracle(site, config, seed=0, max_steps=3)
    assert (single.stopped, single.steps, single.validation_patients) == ("one support patient", 3, ())
    # Eight patients (each twice): two support patients, one trains and one validates. With lr 0 the validation
    # Dice never improves after the first scoring, so it stops after `patience` more and keeps the first.
    doubled = dataclasses.replace(site, patient_ids=[f"{p}-{i}" for i in (0, 1) for p in site.patient_ids],
                                  images=site.images * 2, labels=site.labels * 2, train_slices=site.train_slices * 2)
    train, validation = oracle_patients(doubled, seed=0)
    support, evaluation = adaptation_patients(doubled, 0)
    assert len(train) == len(validation) == 1 and sorted(train + validation) == sorted(support)
    assert not set(validation) & set(evaluation)  # never an evaluation patient
    fit = fit_oracle(doubled, config, seed=0, max_steps=100, eval_every=2, patience=2, lr=0.0)
    assert (fit.stopped, fit.steps, fit.best_step) == ("early-stopped", 6, 2)
    assert [step for step, _ in fit.curve] == [2, 4, 6] and fit.record()["validation_patients"] == [
        doubled.patient_ids[validation[0]]]


def test_the_report_gives_dice_per_class_over_the_sites_that_declare_it():
    dice = _dice({"fedavg-ft": (0.3, 0.5, 0.55), "intensity": (0.4, 0.4, 0.4), "oracle": (0.7, 0.7, 0.7)},
                 {"fedavg-ft": True, "intensity": False, "oracle": False})
    for name, per_class in (("fedavg-ft", {"1": 0.2, "2": 0.8}), ("intensity", {"1": 0.0, "2": 0.9}),
                            ("oracle", {"1": 0.6, "2": 0.8})):
        for seed in dice[name].values():
            seed["a"]["5"]["auto"]["dice_per_class"] = dict(per_class)
            seed["b"]["5"]["auto"]["dice_per_class"] = {"2": per_class["2"] - 0.2}  # site b declares no class 1
    table = format_markdown({**_results(dice), "dice": dice})
    section = table[table.index("## Per class, k = 5, auto"):]
    assert "| method | class 1 | class 2 |" in section
    assert "| intensity | 0.000 | 0.800 |" in section and "| oracle | 0.600 | 0.700 |" in section
