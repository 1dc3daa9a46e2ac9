"""`fedmeta benchmark`: the driver end to end on the smoke federation, budgets, presets, summaries."""

from __future__ import annotations

import json
import math

import pytest

from fedmeta.common.config import RunConfig
from fedmeta.common.jsonio import loads_strict
from fedmeta.common.model import unet_of
from fedmeta.simulations.experiments.budget import budget, check_equal_budget, local_steps_per_round
from fedmeta.simulations.experiments.benchmark import (
    METHODS, goal_check, load_benchmark_preset,
    method_configs, summarise,
)
from fedmeta.simulations.cli import main
from tests.conftest import TINY_BENCHMARK


def test_driver_end_to_end_every_method_and_cell_is_present_and_finite(smoke_federation, tiny_preset, tmp_path, capsys):
    out = tmp_path / "out"
    with_auto = tmp_path / "tiny-auto.toml"  # the fixed counts and auto, the main column
    with_auto.write_text(tiny_preset.read_text().replace("steps = [0, 2]", 'steps = [0, 2, "auto"]'))
    code = main(["benchmark", "--preset", str(with_auto), "--out", str(out),
                 "--federation-dir", str(smoke_federation)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    results = loads_strict((out / "results.json").read_text())
    names = [m.name for m in METHODS]
    assert sorted(results["methods"]) == sorted(names) and results["method_order"] == names
    sites = ["new-annotation", "new-sequence"]
    assert sorted(results["eval_sites"]) == sites
    for name in names:
        for site in sites:
            for k in ("1", "2"):
                for steps in ("0", "2", "auto"):
                    cell = results["dice"][name]["0"][site][k][steps]
                    assert math.isfinite(cell["dice"]) and 0.0 <= cell["dice"] <= 1.0, (name, site, k, steps)
                    assert cell["patients"] >= 1 and cell["eval_slices"] >= 16  # whole patients, covering 16 slices
                    assert cell["worst_patient_dice"] <= cell["dice"]
        for k in ("1", "2"):
            for steps in ("0", "2", "auto"):
                assert math.isfinite(results["summary"][name][k][steps]["mean"]), (name, k, steps)
            # auto: every adapting row chose its steps (0 to the grid's largest, 2) from its support slices alone
            auto = results["dice"][name]["0"][sites[0]][k]["auto"]
            if results["methods"][name]["adapts"]:
                assert auto["chosen_steps"] in (0, 1, 2) and auto["step_choice"]["chosen_steps"] == auto["chosen_steps"]
                if auto["chosen_steps"] != 1:  # 1 step is a candidate the grid does not report
                    assert auto["dice"] == results["dice"][name]["0"][sites[0]][k][str(auto["chosen_steps"])]["dice"]
            else:  # FedAvg as is, the oracle, the intensity baseline: the same summary in every column
                assert auto == results["dice"][name]["0"][sites[0]][k]["0"]
    # FedAvg as is: the same number at every step count, equal to FedAvg + fine-tune before it adapts.
    for site in sites:
        fedavg, fine_tuned = results["dice"]["fedavg"]["0"][site]["2"], results["dice"]["fedavg-ft"]["0"][site]["2"]
        assert fedavg["0"]["dice"] == fedavg["2"]["dice"] == fine_tuned["0"]["dice"]
    # A variant row scores the same θ adapted another way: the prototype learner's checkpoint, its step-0
    # prototypes kept as the classifier; before any step the two rows are the same model.
    frozen = results["methods"]["prototypes+frozen-prototypes"]
    assert frozen["training"] == "prototypes" and frozen["variant"] == "frozen-prototypes"
    assert results["methods"]["prototypes"]["variant"] == "fine-tune"
    for site in sites:
        assert (results["dice"]["prototypes+frozen-prototypes"]["0"][site]["2"]["0"]["dice"]
                == results["dice"]["prototypes"]["0"][site]["2"]["0"]["dice"])
    # One budget for every trained method, counted and reported.
    totals = {name: m["budget"]["local_steps_total"] for name, m in results["methods"].items() if m["budget"]}
    assert set(totals.values()) == {results["local_steps_total"]} == {3 * 2}  # 1 round x 3 sites x 2 passes
    assert results["methods"]["reptile"]["budget"]["inner_steps"] == 2
    for name in ("results.md", "dice_vs_steps.png", "learning_curves.png"):
        assert (out / name).stat().st_size > 0
    table = (out / "results.md").read_text()
    assert "| fedavg-ft |" in table and "| pooled-fomaml |" in table and "local steps per site-round" in table
    for row in ("oracle", "pooled-maml", "pooled-metasgd", "intensity"):  # the ceiling, the bounds, the baseline
        assert f"| {row} |" in table and row in results["dice"]
    assert "| method | auto | 0 steps | 2 steps | worst site (auto) | of oracle (auto) |" in table
    assert results["step_columns"] == ["0", "2", "auto"] and "0.0 MB" not in table
    # The intensity baseline varies with k, not with steps; the oracle's training is recorded per seed and site
    # (a smoke site has one support patient: nothing to validate on, trained to the cap).
    assert results["dice"]["intensity"]["0"][sites[0]]["1"]["2"]["k"] == 1
    assert {r["stopped"] for r in results["oracle"]["0"].values()} == {"one support patient"}
    assert sorted(results["oracle"]["0"]) == sites and results["oracle"]["0"][sites[0]]["steps"] == 5
    assert "5 Adam steps (the cap) per new site: no new site has a second support patient" in table
    assert all(f"above the oracle: {flag['method']}" in printed for flag in results["above_oracle"])
    # Time to accuracy: each federated method's learning curve on the new sites (rounds 0 and 1), the
    # bytes exchanged so far, and the first round that reaches FedAvg + fine-tune's final Dice.
    curve = results["runs"]["fomaml"]["0"]["curve"]
    assert [point["round"] for point in curve] == [0, 1] and curve[0]["bytes"] == 0 < curve[1]["bytes"]
    tta = results["time_to_accuracy"]
    assert set(tta) >= {"fedavg", "fomaml", "maml", "metasgd"} and "pooled-fomaml" not in tta
    assert tta["fedavg"]["0"]["round"] is not None  # FedAvg reaches its own final value
    assert "## Time to accuracy" in table
    # The oracle is the model as is (no adaptation): one number whatever the step count.
    for site in sites:
        oracle = results["dice"]["oracle"]["0"][site]["2"]
        assert oracle["0"]["dice"] == oracle["2"]["dice"]
    assert "[seed 0] pooled-fomaml" in printed

    # --report-only writes the same tables and summaries again from results.json, training and scoring nothing.
    table_before = (out / "results.md").read_text()
    (out / "results.md").write_text("stale")
    assert main(["benchmark", "--report-only", "--out", str(out)]) == 0
    assert (out / "results.md").read_text() == table_before
    assert loads_strict((out / "results.json").read_text()) == results
    # ... replacing a link planted under an output's name rather than writing through it, refusing options that
    # would change nothing, and results it cannot read, before writing anything.
    elsewhere = tmp_path / "elsewhere.md"
    elsewhere.write_text("a file of someone else's")
    (out / "results.md").unlink()
    (out / "results.md").symlink_to(elsewhere)
    assert main(["benchmark", "--report-only", "--out", str(out)]) == 0
    assert elsewhere.read_text() == "a file of someone else's" and not (out / "results.md").is_symlink()
    capsys.readouterr()
    assert main(["benchmark", "--report-only", "--out", str(out), "--seeds", "3"]) == 2
    assert "--seeds would change nothing" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    damaged = json.loads((out / "results.json").read_text())
    damaged["dice"]["fomaml"]["0"].pop(sites[0])
    (broken / "results.json").write_text(json.dumps(damaged))
    assert main(["benchmark", "--report-only", "--out", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "its contents are not a benchmark's results" in err and "KeyError" in err
    assert sorted(p.name for p in broken.iterdir()) == ["results.json"]

    # A second run reuses a finished training run of the same config and gives the same numbers.
    assert main(["benchmark", "--preset", str(with_auto), "--out", str(out), "--methods", "fomaml",
                 "--federation-dir", str(smoke_federation)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["runs"]["fomaml"]["0"]["reused"]
    assert again["dice"]["fomaml"] == results["dice"]["fomaml"]
    # ... but not a run trained on other sites: with a validation split it trains afresh.
    assert main(["benchmark", "--preset", str(tiny_preset), "--out", str(out), "--methods", "fomaml",
                 "--validation-sites", "1", "--federation-dir", str(smoke_federation)]) == 0
    split = json.loads((out / "results.json").read_text())
    assert not split["runs"]["fomaml"]["0"]["reused"]


def test_a_longer_budget_continues_a_shorter_run_and_ends_bitwise_where_a_fresh_run_ends(
        smoke_federation, tiny_preset, tmp_path, capsys):
    import torch

    from fedmeta.common.checkpoint import load_checkpoint

    every_2 = tmp_path / "every-2.toml"  # held-out curve points every 2 rounds: a 1-round run's last is off the grid
    every_2.write_text(tiny_preset.read_text().replace("curve-every = 1", "curve-every = 2"))

    def bench(out, rounds):
        assert main(["benchmark", "--preset", str(every_2), "--out", str(out), "--methods", "fomaml",
                     "--federation-dir", str(smoke_federation), "--set", f"num-rounds={rounds}"]) == 0
        return json.loads((out / "results.json").read_text())["runs"]["fomaml"]["0"], capsys.readouterr().out

    bench(tmp_path / "longer", 1)
    run_dir = tmp_path / "longer" / "runs" / "seed-0" / "fomaml"
    continued, _ = bench(tmp_path / "longer", 3)
    fresh, _ = bench(tmp_path / "fresh", 3)
    assert continued["continued_from_round"] == 1 and not continued["reused"] and "continued_from_round" not in fresh
    assert [p["round"] for p in continued["curve"]] == [p["round"] for p in fresh["curve"]] == [0, 2, 3]
    assert continued["curve"] == fresh["curve"]
    a = load_checkpoint(run_dir / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "fresh" / "runs" / "seed-0" / "fomaml" / "checkpoint.pt")
    assert a.round == b.round == 3 and all(torch.equal(a.params[n], b.params[n]) for n in a.params)
    # Killed after its last round's checkpoint but before its record: continued by no rounds, nothing lost.
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({"trained_on": info["trained_on"], "seconds": 5.0, "finished": False}))
    again, _ = bench(tmp_path / "longer", 3)
    # Same machine, same test: the continued curve is the fresh one's; its seconds add this stretch's (>= 0, on any
    # CPU and load) to the 5.0 the record held.
    assert again["continued_from_round"] == 3 and again["curve"] == fresh["curve"] and again["seconds"] >= 5.0
    # ... killed part way (here: its record says unfinished at round 3 of 4): continued from its checkpoint.
    (run_dir / "run.json").write_text(json.dumps({"trained_on": info["trained_on"], "seconds": "?", "finished": False}))
    again, _ = bench(tmp_path / "longer", 4)
    assert again["continued_from_round"] == 3 and [p["round"] for p in again["curve"]] == [0, 2, 4]
    # What cannot be continued is trained again, saying why: metrics that do not cover the checkpoint's rounds,
    # a damaged record, a checkpoint past the budget.
    (run_dir / "metrics.jsonl").unlink()
    again, printed = bench(tmp_path / "longer", 5)
    assert "continued_from_round" not in again and [p["round"] for p in again["curve"]] == [0, 2, 4, 5]
    assert "training from round 0 again: its metrics.jsonl does not cover rounds 1-4" in printed
    (run_dir / "run.json").write_text("[]")
    again, printed = bench(tmp_path / "longer", 5)
    assert "continued_from_round" not in again and "holds list, not a run's record" in printed
    again, printed = bench(tmp_path / "longer", 2)
    assert "its checkpoint is at round 5, past num-rounds 2" in printed


def test_parallel_jobs_give_the_numbers_one_process_gives(smoke_federation, tiny_preset, tmp_path):
    from fedmeta.simulations.experiments.benchmark import run_benchmark

    methods = ["fedavg-ft", "maml", "oracle"]
    serial = run_benchmark(str(tiny_preset), out=tmp_path / "serial", federation_dir=smoke_federation,
                           methods=methods, seeds=2, quiet=True)
    parallel = run_benchmark(str(tiny_preset), out=tmp_path / "parallel", federation_dir=smoke_federation,
                             methods=methods, seeds=2, quiet=True, jobs=2)
    assert parallel["dice"] == serial["dice"] and parallel["preset"]["jobs"] == 2
    for key in ("fedavg", "maml"):
        for seed in ("0", "1"):
            assert parallel["runs"][key][seed]["curve"] == serial["runs"][key][seed]["curve"]


def test_validation_split_keeps_heldout_sites_out(smoke_federation, tiny_preset, tmp_path):
    from fedmeta.simulations.experiments.benchmark import run_benchmark

    results = run_benchmark(str(tiny_preset), out=tmp_path / "val", federation_dir=smoke_federation,
                            methods=["scratch", "fomaml"], validation_sites=1, quiet=True)
    assert results["eval_role"] == "validation"
    assert list(results["eval_sites"]) == ["site-03"] and results["train_sites"] == ["site-01", "site-02"]
    assert results["local_steps_total"] == 1 * 2 * 2


@pytest.mark.parametrize(
    ("algorithm", "episodes", "inner_steps", "expected"),
    [("fomaml", 2, 3, 8), ("maml", 2, 3, 8), ("metasgd", 2, 3, 8), ("anil", 2, 3, 8), ("reptile", 2, 4, 8),
     ("fedavg", 2, 2, 8), ("fedprox", 2, 2, 8), ("lstm-optimizer", 2, 3, 8),
     # the generator is not a UNet pass; the prototypes' pass over the support set is
     ("fast-weights", 2, 3, 8), ("prototypes", 4, 0, 8), ("prototypes", 2, 2, 8)],
)
def test_local_steps_are_counted_per_algorithm(algorithm, episodes, inner_steps, expected):
    config = RunConfig(algorithm=algorithm, episodes_per_site=episodes, inner_steps=inner_steps)
    assert local_steps_per_round(config) == expected
    assert budget(config.replace(num_rounds=10, sites_per_round=4), 8)["local_steps_total"] == 10 * 4 * expected
    assert budget(config.replace(num_rounds=10, sites_per_round=0), 8)["local_steps_total"] == 10 * 8 * expected


def test_unequal_budgets_are_refused_with_the_totals(tiny_preset, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY_BENCHMARK.replace("[training.reptile]\ninner-steps = 2", "[training.reptile]\ninner-steps = 5"))
    spec = load_benchmark_preset(str(bad))
    configs = method_configs(spec, spec["methods"])
    with pytest.raises(ValueError, match=r"budgets of local gradient steps differ .*reptile: 15"):
        check_equal_budget({k: budget(c, 3) for k, c in configs.items()}, bad)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: "rounds = 3\n" + t, "unknown key\\(s\\) rounds; valid keys"),
        (lambda t: t + "\nrounds = 3\n", "\\[training.pooled-metasgd\\]: unknown run-config key\\(s\\) rounds"),
        (lambda t: t.replace("oracle-steps = 5", "oracle-steps = 0"), "oracle-steps=0 must be >= 1"),
        (lambda t: t.replace("seeds = 1", "seeds = 0"), "seeds=0 must be >= 1"),
        (lambda t: t.replace("shots = [1, 2]", "shots = [0]"), "shots=\\[0\\]"),
        (lambda t: "methods = ['fomaml', 'magic']\n" + t, "methods \\['magic'\\]: choose among"),
        (lambda t: t.replace("[training.anil]\ninner-steps = 1", ""), "needs a \\[training.anil\\] table"),
        (lambda t: t.replace("inner-lr = 0.1", "inner-lr = -1"), "\\[training.fedavg\\]: run config inner-lr"),
        # a row says how it adapts: a run config's adapt-variant would be stored and never scored
        (lambda t: t.replace("[training.prototypes]", "[training.prototypes]\nadapt-variant = 'frozen-prototypes'"),
         "\\[training.prototypes\\]: adapt-variant = 'frozen-prototypes': a benchmark row says how it adapts"),
    ],
)
def test_bad_presets_name_the_problem(tmp_path, edit, message):
    path = tmp_path / "p.toml"
    path.write_text(edit(TINY_BENCHMARK))
    with pytest.raises(ValueError, match=message):
        spec = load_benchmark_preset(str(path))
        method_configs(spec, spec["methods"])


def test_unknown_preset_lists_the_shipped_ones(capsys):
    assert main(["benchmark", "--preset", "nope"]) == 1
    err = capsys.readouterr().err
    assert "benchmark preset 'nope'" in err and "benchmark-quick" in err


@pytest.mark.parametrize("preset", ["benchmark", "benchmark-quick", "benchmark-tune", "benchmark-converged",
                                    "benchmark-protocols", "benchmark-curves", "benchmark-anatomy-curves",
                                    "benchmark-anatomy", "benchmark-anatomy-tissue", "benchmark-anatomy-fedavg-160",
                                    "benchmark-anatomy-head"])
def test_shipped_presets_are_valid_and_budget_matched(preset):
    spec = load_benchmark_preset(preset)
    configs = method_configs(spec, spec["methods"])
    if preset in ("benchmark-tune", "benchmark-curves", "benchmark-anatomy-curves"):  # never the held-out sites
        assert spec["validation-sites"] > 0
    elif preset in ("benchmark-converged", "benchmark-protocols", "benchmark-anatomy", "benchmark-anatomy-tissue"):
        # The anatomy claim carries the rows its validation split chose (FedAvg + fine-tune and the prototype learner).
        claimed = {"prototypes"} if preset.startswith("benchmark-anatomy") else {"maml", "metasgd"}
        assert {"fedavg-ft", "oracle", *claimed} <= set(spec["methods"]) and spec["validation-sites"] == 0
        assert spec["seeds"] >= 3 and spec["jobs"] == 2 and spec["auto-steps"]  # auto, the headline
        assert spec["oracle-steps"] >= 2000  # a cap, not a fixed budget: the oracle stops early
    elif preset == "benchmark-anatomy-head":  # the anatomy claim, key for key, on the federation with the head on
        anatomy = load_benchmark_preset("benchmark-anatomy")
        assert {k: v for k, v in spec.items() if k not in ("name", "path", "federation")} == {
            k: v for k, v in anatomy.items() if k not in ("name", "path", "federation")}
        assert (spec["federation"], anatomy["federation"]) == ("head", "default")
    elif preset == "benchmark-anatomy-fedavg-160":  # the claim's FedAvg + fine-tune at twice its rounds, nothing else
        anatomy = load_benchmark_preset("benchmark-anatomy")
        own = ("methods", "name", "path", "run-config", "training")
        assert spec["methods"] == ["fedavg", "fedavg-ft"] and {k: v for k, v in spec.items() if k not in own} == {
            k: v for k, v in anatomy.items() if k not in own}
        assert spec["run-config"] == {**anatomy["run-config"], "num-rounds": 160}
        assert spec["training"] == {"fedavg": anatomy["training"]["fedavg"]}
    else:
        assert set(spec["methods"]) == {m.name for m in METHODS} and spec["validation-sites"] == 0
    if preset == "benchmark-anatomy":
        assert {"intensity", "prototypes", "scratch", "fedavg"} <= set(spec["methods"]) and spec["seeds"] == 5
        assert spec["shots"] == [1, 5, 10] and spec["steps"] == [0, 1, 5, 10, 20]
    if preset == "benchmark-anatomy-tissue":  # benchmark-anatomy's protocol, only the federation differs
        anatomy = load_benchmark_preset("benchmark-anatomy")
        own = ("federation", "name", "path")
        assert spec["federation"] == "tissue" and {k: v for k, v in spec.items() if k not in own} == {
            k: v for k, v in anatomy.items() if k not in own}
    if preset == "benchmark-converged":  # the numbers docs/results-benchmark.md gives: the tissue generation
        from fedmeta.common.synth_plan import PRESETS

        assert spec["federation"] == "tissue" and PRESETS["tissue"].generation == "tissue"
    assert check_equal_budget({k: budget(c, 8) for k, c in configs.items()}, preset) > 0
    assert len({unet_of(c.model_config()) for c in configs.values()}) == 1  # learners add their parts to it


def test_summary_mean_std_over_seeds_and_worst_site():
    def cell(value):
        return {"1": {"0": {"dice": value}}}

    dice = {"m": {0: {"a": cell(0.6), "b": cell(0.2)}, 1: {"a": cell(0.8), "b": cell(0.4)}}}
    summary = summarise(dice, [1], [0])["m"]["1"]["0"]
    assert summary["mean"] == pytest.approx(0.5)  # seeds' site means 0.4 and 0.6
    assert summary["std"] == pytest.approx(math.sqrt(0.02))  # sample std of (0.4, 0.6)
    assert summary["worst_site"] == "b" and summary["worst_site_dice"] == pytest.approx(0.3)


def test_goal_check_reports_margin_and_fractions_of_the_oracle_and_the_pooled_bound():
    def row(value):
        return {"5": {"10": {"mean": value}}}

    summary = {"fedavg-ft": row(0.70), "pooled-fomaml": row(0.80), "pooled-maml": row(0.90), "oracle": row(0.95),
               "fomaml": row(0.78), "maml": row(0.76), "reptile": row(0.72),
               "prototypes": row(0.74), "prototypes+frozen-prototypes": row(0.77)}
    goal = goal_check(summary, [5], [10])
    # a variant row (one θ adapted another way) is judged beside its method, after it
    assert list(goal["methods"])[-2:] == ["prototypes", "prototypes+frozen-prototypes"]
    assert goal["methods"]["prototypes+frozen-prototypes"]["margin_over_fedavg_ft"] == pytest.approx(0.07)
    assert goal["met_by"] == []  # without per-seed margins nothing can be met in every seed
    assert goal["methods"]["reptile"]["margin_over_fedavg_ft"] == pytest.approx(0.02)
    assert goal["methods"]["fomaml"]["fraction_of_oracle"] == pytest.approx(0.78 / 0.95)
    assert goal["methods"]["fomaml"]["fraction_of_pooled"] == pytest.approx(0.975)
    assert goal["methods"]["maml"]["fraction_of_pooled"] == pytest.approx(0.76 / 0.90)  # its own family's bound
    assert not goal_check(summary, [1], [10])["checked"]


def test_set_reaches_one_training_table_and_the_budget_check_sees_it(smoke_federation, tiny_preset, tmp_path):
    from fedmeta.simulations.experiments.benchmark import run_benchmark

    with pytest.raises(ValueError, match=r"budgets of local gradient steps differ .*fomaml: 9"):
        run_benchmark(str(tiny_preset), out=tmp_path, federation_dir=smoke_federation,
                      extra={"training.fomaml.inner-steps": "2"}, quiet=True)
    with pytest.raises(ValueError, match=r"no \[training.fomal\] table"):
        run_benchmark(str(tiny_preset), out=tmp_path, federation_dir=smoke_federation,
                      extra={"training.fomal.inner-steps": "2"}, quiet=True)


def test_goal_check_gives_paired_margins_per_seed():
    def cell(value):
        return {"5": {"10": {"dice": value}}}

    dice = {"fedavg-ft": {"0": {"a": cell(0.5), "b": cell(0.3)}, "1": {"a": cell(0.7), "b": cell(0.5)}},
            "maml": {"0": {"a": cell(0.6), "b": cell(0.3)}, "1": {"a": cell(0.7), "b": cell(0.4)}}}
    summary = summarise(dice, [5], [10])
    goal = goal_check(summary, [5], [10], dice=dice)
    assert goal["methods"]["maml"]["paired_margin_per_seed"] == pytest.approx([0.05, -0.05])
    low, high = goal["methods"]["maml"]["paired_margin_ci"]
    assert low == pytest.approx(-0.05 * 12.706, rel=1e-3) and high == pytest.approx(0.05 * 12.706, rel=1e-3)  # t(0.975, 1)
    assert goal["met_by"] == []  # one seed lost: not "in every seed"
    assert goal["methods"]["maml"]["margin_over_fedavg_ft"] == pytest.approx(0.0)


def test_two_benchmarks_rows_pair_seed_by_seed_only_on_the_same_patients():
    from fedmeta.simulations.experiments.benchmark_report import format_paired, paired_rows

    def results(row, values, patients=3):
        dice = {row: {str(seed): {site: {"5": {"auto": {"dice": v + 0.01 * i, "patients": patients, "eval_slices": 40}}}
                                  for i, site in enumerate(("a", "b"))}
                      for seed, v in enumerate(values)}}
        return {"federation": "f", "seeds": [0, 1, 2], "eval_sites": {"a": "x", "b": "y"}, "dice": dice,
                "preset": {"shots": [5]}, "step_columns": ["auto"]}

    paired = paired_rows(results("prototypes", [0.6, 0.7, 0.8]), "prototypes",
                         results("fedavg-ft", [0.5, 0.5, 0.5]), "fedavg-ft")
    cell = paired["5"]["auto"]
    assert cell["per_seed"] == pytest.approx([0.1, 0.2, 0.3]) and cell["mean"] == pytest.approx(0.2)
    assert cell["ci"][0] < 0.2 < cell["ci"][1]
    assert "k =  5, auto: +0.200" in format_paired(paired, "A", "B")
    with pytest.raises(ValueError, match="scored on 3 patients .* against 4 .*cannot be paired"):
        paired_rows(results("p", [0.6] * 3), "p", results("q", [0.5] * 3, patients=4), "q")
    # two runs of different lengths pair over the seeds both ran (a seed fixes the split)
    fewer = paired_rows(results("p", [0.6, 0.7, 0.8]), "p", results("q", [0.5, 0.5]), "q")
    assert fewer["seeds"] == [0, 1] and fewer["5"]["auto"]["per_seed"] == pytest.approx([0.1, 0.2])
    other = {**results("q", [0.5] * 3), "eval_sites": {"a": "x"}}
    with pytest.raises(ValueError, match="differ in eval_sites"):
        paired_rows(results("p", [0.6] * 3), "p", other, "q")
    with pytest.raises(ValueError, match="no row 'r'"):
        paired_rows(results("p", [0.6] * 3), "r", other, "q")


def test_paired_into_a_reader_that_goes_away_ends_quietly(tmp_path):
    # `fedmeta benchmark --paired A B | head`: the real command, its reader gone before it prints.
    import subprocess
    import sys

    def results(row, values):
        dice = {row: {str(seed): {site: {"5": {"auto": {"dice": v, "patients": 3, "eval_slices": 40}}}
                                  for site in ("a", "b")} for seed, v in enumerate(values)}}
        return {"federation": "f", "seeds": [0, 1, 2], "eval_sites": {"a": "x", "b": "y"}, "dice": dice,
                "preset": {"shots": [5]}, "step_columns": ["auto"]}

    for name, row, values in (("a", "p", [0.6, 0.7, 0.8]), ("b", "q", [0.5, 0.5, 0.5])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results(row, values)))
    command = [sys.executable, "-m", "fedmeta.simulations.cli", "benchmark", "--paired", f"{tmp_path / 'a'}:p",
               f"{tmp_path / 'b'}:q"]
    assert "k =  5, auto: +0.200" in subprocess.run(command, capture_output=True, text=True, check=True).stdout
    gone = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    gone.stdout.close()
    _, err = gone.communicate(timeout=120)
    assert gone.returncode == 141 and not err, err.decode()
