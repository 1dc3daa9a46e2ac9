"""`fedmeta simulate`: presets, errors, and one whole in-process run with its report."""

from __future__ import annotations

import pytest

from fedmeta.common.config import RunConfig
from fedmeta.common.jsonio import loads_strict
from fedmeta.simulations.cli import main
from fedmeta.simulations.experiments.presets import load_preset
from fedmeta.simulations.experiments.simulate import format_round


def test_a_presets_training_table_applies_to_its_algorithm_only():
    overrides, _ = load_preset("smoke")
    assert overrides["algorithm"] == "prototypes" and overrides["inner-steps"] == 0
    other, _ = load_preset("smoke", "maml")
    assert "inner-steps" not in other and other["k-shot"] == overrides["k-shot"]



@pytest.mark.parametrize("table, message", [
    ('training = "inner-steps=0"', r"entries must be tables"),
    ("[training.protoypes]\ninner-steps = 0", r"\[training.protoypes\]: no algorithm is called 'protoypes'; name one of"),
    ("[training.prototypes]\nbogus-key = 3", r"\[training.prototypes\]: unknown run-config key\(s\) bogus-key"),
    ("[training.prototypes]\noracle-steps = 3", r"oracle-steps configures the driver: put it at the top"),
    ('[training.prototypes]\nalgorithm = "maml"', r"sets algorithm"),
])
def test_a_malformed_training_table_names_the_file_the_table_and_the_fix(tmp_path, table, message):
    preset = tmp_path / "mine.toml"
    preset.write_text(f'algorithm = "prototypes"\n{table}\n')
    with pytest.raises(ValueError, match=f"{preset}: .*{message}"):
        load_preset(str(preset))

@pytest.mark.parametrize("preset", ["smoke", "default", "protocols", "scale-1000"])
def test_shipped_presets_are_valid_run_configs(preset):
    overrides, driver = load_preset(preset)
    config = RunConfig.from_run_config(overrides)
    assert driver["federation"] == preset
    assert config.num_rounds >= 1


def test_the_thousand_site_preset_samples_10_to_50_sites_of_a_lazy_federation():
    from fedmeta.common import synth

    overrides, driver = load_preset("scale-1000")
    assert 10 <= RunConfig.from_run_config(overrides).sites_per_round <= 50
    assert synth.PRESETS[driver["federation"]].lazy and synth.PRESETS[driver["federation"]].num_train_sites == 1000


def test_an_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="preset 'huge'.*default, protocols, scale-1000, smoke"):
        load_preset("huge")


def test_a_bad_override_exits_non_zero_with_the_key_named(tmp_path, capsys):
    code = main(["simulate", "--preset", "smoke", "--engine", "inprocess", "--out", str(tmp_path),
                 "--set", "inner-lr=-1", "--federation-dir", str(tmp_path / "fed")])
    assert code == 1
    assert "inner-lr=-1.0: must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize("args, words", [
    (["--rounds", "0"], "--rounds 0: a simulation trains at least one round"),
    (["--sites", "10"], "sites-per-round=10 (--sites): the federation has 3 training sites; choose 1..3"),
    (["--set", "min-sites=10"], "min-sites=10: the federation has 3 training sites, so no round could update"),
])
def test_settings_no_round_could_meet_are_refused_before_any_engine_starts(smoke_federation, tmp_path, capsys,
                                                                         args, words):
    root = tmp_path / "cache"
    root.mkdir()
    (root / "smoke-0").symlink_to(smoke_federation)  # the session's smoke federation, as simulate's cache holds it
    code = main(["simulate", "--preset", "smoke", "--engine", "inprocess", "--out", str(tmp_path / "out"),
                 "--federation-dir", str(root), *args])
    assert code == 1
    assert words in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_progress_lines_show_round_sites_loss_and_dice():
    config = RunConfig(num_rounds=5, eval_steps="0,5")
    line = format_round(
        {"round": 2, "sites_sampled": 3, "sites_answered": 2, "train": {"query-loss-after": 0.75},
         "heldout": {"summary": {"dice-mean-0": 0.41, "dice-mean-5": 0.62}}, "seconds": 3.2},
        config,
    )
    assert line == "[fomaml] round   2/5 | sites 2/3 | meta-loss 0.7500 | held-out Dice 0 steps 0.410, 5 steps 0.620 | 3.2 s"


def test_a_round_line_puts_the_training_heartbeat_off_and_names_the_next_round(tmp_path, capsys):
    import io

    from fedmeta.common.progress import Heartbeat
    from fedmeta.simulations.experiments.simulate import _ProgressPrinter

    now = [0.0]
    stream = io.StringIO()
    beat = Heartbeat("[fomaml] training", what="starting the engine and the sites", stream=stream, clock=lambda: now[0])
    metrics = tmp_path / "metrics.jsonl"
    printer = _ProgressPrinter(metrics, RunConfig(num_rounds=3), quiet=False, beat=beat)
    now[0] = 12.0
    assert beat.beat_if_due()  # the engine starts: nothing else speaks
    metrics.write_text('{"round": 1, "sites_sampled": 3, "sites_answered": 3, "train": {}, "seconds": 0.5}\n')
    now[0] = 20.0
    printer._poll()
    now[0] = 29.0
    assert not beat.beat_if_due()  # 9 s after the round's line
    now[0] = 30.0
    assert beat.beat_if_due()
    assert "round   1/3" in capsys.readouterr().out
    assert stream.getvalue().splitlines() == [
        "[fomaml] training: still running, 12 s (starting the engine and the sites)",
        "[fomaml] training: still running, 30 s (in round 2/3)"]


@pytest.mark.slow
def test_smoke_simulation_writes_checkpoint_metrics_results_report_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["simulate", "--preset", "smoke", "--engine", "inprocess", "--out", str(out),
                 "--federation-dir", str(tmp_path / "fed")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "round   3/3" in printed and "meta-loss" in printed and "held-out Dice" in printed
    for name in ("checkpoint.pt", "metrics.jsonl", "results.json", "report.md", "dice_vs_steps.png"):
        assert (out / name).stat().st_size > 0, name
    results = loads_strict((out / "results.json").read_text())
    labels = list(results["comparison"]["summary"])
    assert sorted(labels) == ["FedAvg-trained", "meta-learned (prototypes)", "oracle (the site's own labels)", "random init"]
    # The comparison adapts as the run config says: the smoke preset's eval-k-shot 2 and eval-steps 0,5, and at
    # the count each site chooses from its support slices (auto, among 0..5).
    assert results["comparison"]["k"] == 2 and results["comparison"]["steps"] == [0, 5, "auto"]
    for label in labels:
        for steps in ("0", "5", "auto"):
            assert 0.0 <= results["comparison"]["summary"][label]["mean"][steps] <= 1.0
    report = (out / "report.md").read_text()
    assert "| meta-learned (prototypes) |" in report and "| FedAvg-trained |" in report and "| random init |" in report
    # The claim with its uncertainty: the paired per-patient margin over FedAvg, and the ceiling.
    margin = results["margin_over_fedavg"]
    assert margin["baseline"] == "FedAvg-trained" and margin["steps"] == "auto" and margin["patients"] >= 2
    low, high = margin["ci"]
    assert low <= margin["mean"] <= high
    assert all(0 <= n <= 5 for sites in results["comparison"]["chosen_steps"].values() for n in sites.values())
    assert "**Margin** of meta-learned (prototypes) over FedAvg-trained at auto (steps chosen per site)" in report
    assert "The oracle is, per site, a UNet fully supervised" in report
    assert "margin over FedAvg-trained at auto (steps chosen per site)" in printed
    # What the number means at this size, in one line.
    assert "what this means: with " in printed and "**What this means:**" in report
    assert (out / "baseline-fedavg" / "checkpoint.pt").exists()
    assert results["runs"]["prototypes"]["rounds"] == 3 and results["peak_memory_mb"] > 0
    assert results["run_config"]["inner-steps"] == 0  # the preset's [training.prototypes] table


def test_the_fedavg_baseline_gets_the_meta_learners_local_step_budget():
    from fedmeta.common.config import RunConfig
    from fedmeta.simulations.experiments.budget import fedavg_epochs_for_budget, local_steps_per_round

    metasgd = RunConfig(algorithm="metasgd", inner_steps=3, episodes_per_site=2)
    assert local_steps_per_round(metasgd) == 8  # 2 episodes x (3 inner steps + 1 query gradient)
    epochs = fedavg_epochs_for_budget(metasgd)
    assert epochs == 2
    assert local_steps_per_round(RunConfig(algorithm="fedavg", inner_steps=epochs, episodes_per_site=2)) == 8
    assert local_steps_per_round(RunConfig(algorithm="reptile", inner_steps=4, episodes_per_site=2)) == 8
    assert fedavg_epochs_for_budget(RunConfig(algorithm="fomaml", inner_steps=1, episodes_per_site=1)) == 1
