"""`fedmeta evaluate`: a saved initialisation adapted to any site folder, scored like the benchmark."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch

from fedmeta.common.config import RunConfig
from fedmeta.common.adaptation import adaptation_curve, site_patients
from fedmeta.common.data import DataConfig, SiteDataset, adaptation_support
from fedmeta.common.jsonio import loads_strict
from fedmeta.common.losses import DiceCELoss
from fedmeta.common.metrics import foreground_classes
from fedmeta.common.model import build_model
from fedmeta.common.synth import load_manifest
from fedmeta.common.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from fedmeta.simulations.cli import main
from fedmeta.client.commands import evaluate_checkpoint, parse_counts
from fedmeta.simulations.experiments.centralised import training_node_configs
from fedmeta.simulations.engines.inprocess import run_inprocess


@pytest.fixture(scope="module")
def trained(smoke_federation, tmp_path_factory):
    """A one-round smoke federation run per algorithm that changes how θ adapts (plain, Meta-SGD, ANIL)."""
    out = {}
    manifest = load_manifest(smoke_federation)
    nodes = training_node_configs(manifest.train_sites)
    for algorithm in ("fomaml", "metasgd", "anil"):
        run_dir = tmp_path_factory.mktemp(algorithm)
        config = RunConfig(algorithm=algorithm, num_rounds=1, episodes_per_site=1, k_shot=2, q_query=2, image_size=32,
                           model_base_channels=8, model_levels=3, inner_lr=0.1, meta_lr=0.01, eval_every=0,
                           eval_max_images=16, out_dir=str(run_dir), device="cpu")
        run_inprocess(config.to_run_config(), nodes, seed=0)
        out[algorithm] = run_dir / CHECKPOINT_NAME
    return out


def test_cli_prints_the_grid_and_writes_json(trained, smoke_federation, tmp_path, capsys):
    site = load_manifest(smoke_federation).heldout_sites[0]
    report = tmp_path / "eval.json"
    code = main(["evaluate", "--checkpoint", str(trained["fomaml"]), "--data", str(site.path),
                 "--shots", "1,2", "--steps", "0,3", "--json", str(report), "--allow-unsigned"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "0 steps" in printed and "3 steps" in printed and site.name in printed
    results = loads_strict(report.read_text())  # strict JSON: no NaN anywhere
    assert results["algorithm"] == "fomaml" and results["shots"] == [1, 2] and results["steps"] == [0, 3]
    grid = results["sites"][site.name]["dice"]
    loaded = SiteDataset.load(site.path, DataConfig(image_size=(32, 32), spacing=(3.0,) * 3))
    declared = foreground_classes(loaded.label_names, 4, loaded.labelled_classes)
    for k in ("1", "2"):
        for steps in ("0", "3"):
            cell = grid[k][steps]
            assert 0.0 <= cell["worst_patient_dice"] <= cell["dice"] <= 1.0
            assert sorted(cell["dice_per_class"]) == [str(c) for c in declared]  # the site's own classes
            # Every evaluation patient's Dice, whole volume (evaluate scores them all by default).
            assert len(cell["per_patient"]) == cell["patients"] == 3  # 4 smoke patients, 1 in the support pool
            assert cell["dice"] == pytest.approx(sum(cell["per_patient"].values()) / cell["patients"])


def test_numbers_equal_a_direct_adaptation_curve(trained, smoke_federation):
    """The command adds nothing of its own: same split, same adaptation, same Dice."""
    info = load_manifest(smoke_federation).heldout_sites[1]
    results = evaluate_checkpoint(trained["fomaml"], [info.path], shots=[2], steps=[0, 2], seed=3, max_images=0)
    checkpoint = load_checkpoint(trained["fomaml"])
    config = RunConfig.from_run_config(checkpoint.run_config)
    site = SiteDataset.load(info.path, config.data_config())
    support_x, support_y = adaptation_support(site, 2, seed=3)
    patients = site_patients(site, seed=3)
    curve = adaptation_curve(build_model(config.model_config()), checkpoint.params, support_x, support_y, patients,
                             steps=[0, 2], inner_lr=config.inner_lr, loss_fn=DiceCELoss(4), num_classes=4,
                             classes=foreground_classes(site.label_names, 4))
    got = results["sites"][site.name]["dice"]["2"]
    assert got["0"]["dice"] == pytest.approx(curve[0]["dice"], abs=1e-6)
    assert got["2"]["dice"] == pytest.approx(curve[2]["dice"], abs=1e-6)
    assert got["2"]["per_patient"] == pytest.approx(curve[2]["per_patient"], abs=1e-6)
    assert got["2"]["eval_slices"] == sum(len(x) for _, x, _ in patients)


def test_metasgd_adapts_with_its_learned_step_sizes_and_anil_with_its_head(trained, smoke_federation):
    info = load_manifest(smoke_federation).heldout_sites[0]
    metasgd = evaluate_checkpoint(trained["metasgd"], [info.path], shots=[2], steps=[0, 2], max_images=16)
    assert metasgd["adaptation"]["inner_lr"] == "learned per parameter (Meta-SGD)"
    anil = evaluate_checkpoint(trained["anil"], [info.path], shots=[2], steps=[0, 2], max_images=16)
    assert anil["adaptation"] == {"inner_lr": 0.1, "lr_scale": 1.0, "head_only": True, "variant": "fine-tune"}
    for results in (metasgd, anil):
        curve = results["sites"][info.name]["dice"]["2"]
        assert curve["0"]["dice"] != curve["2"]["dice"], "adaptation changed nothing"


def test_paired_glob_folder_like_real_hospital_data(trained, smoke_federation, tmp_path):
    """A folder of *_img / *_seg NIfTI pairs (no dataset.json) evaluates like an MSD site.

    A folder without dataset.json declares no labels, so it is scored on every class: compare it with
    a site that declares them all (the standard protocol).
    """
    info = next(i for i in load_manifest(smoke_federation).heldout_sites if i.label_protocol == "standard")
    flat = tmp_path / "hospital"
    flat.mkdir()
    for image in sorted((info.path / "imagesTr").glob("*.nii.gz")):
        case = image.name.removesuffix(".nii.gz").removesuffix("_0000")
        shutil.copy(image, flat / f"{case}_img.nii.gz")
        shutil.copy(info.path / "labelsTr" / f"{case}.nii.gz", flat / f"{case}_seg.nii.gz")
    flat_results = evaluate_checkpoint(trained["fomaml"], [flat], shots=[2], steps=[0, 1], max_images=0,
                                       image_glob="*_img.nii.gz", label_glob="*_seg.nii.gz")
    msd_results = evaluate_checkpoint(trained["fomaml"], [info.path], shots=[2], steps=[0, 1], max_images=0)
    (flat_site,), (msd_site,) = flat_results["sites"].values(), msd_results["sites"].values()
    assert flat_site["patients"] == msd_site["patients"]
    assert flat_site["dice"]["2"]["1"]["dice"] == pytest.approx(msd_site["dice"]["2"]["1"]["dice"], abs=1e-6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--checkpoint", "{tmp}/missing.pt"], "missing.pt: no such file"),
        (["--checkpoint", "{tmp}/junk.pt"], "not a readable fedmeta checkpoint"),
        (["--data", "{tmp}/nowhere"], "nowhere: not a folder"),
        (["--data", "{federation}"], "is a whole federation; pass one of its site folders"),
        (["--shots", "0,5"], "--shots '0,5': expected comma-separated integers >= 1"),
        (["--steps", "five"], "--steps 'five': expected comma-separated integers >= 0"),
        (["--shots", "500"], "fewer than k=500"),
        (["--lr-scale", "0"], "--lr-scale 0.0: must be a positive number"),
        (["--json", "{tmp}/junk.pt/out.json"], "junk.pt is a file, not a folder"),
        (["--checkpoint", "{tmp}/mismatch.pt"], "its weights do not match the model its run config describes"),
        (["--checkpoint", "{tmp}/nan.pt"], "holds NaN or Inf"),
    ],
)
def test_bad_input_names_the_problem(trained, smoke_federation, tmp_path, capsys, args, message):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    good = load_checkpoint(trained["fomaml"])
    save_checkpoint(tmp_path / "mismatch.pt", replace(good, run_config={**good.run_config, "model-base-channels": 16}))
    save_checkpoint(tmp_path / "nan.pt", replace(good, params={k: v * float("nan") for k, v in good.params.items()}))
    site = load_manifest(smoke_federation).heldout_sites[0].path
    argv = {"--checkpoint": str(trained["fomaml"]), "--data": str(site)}
    for flag, value in zip(args[::2], args[1::2]):
        argv[flag] = value.format(tmp=tmp_path, federation=smoke_federation)
    code = main(["evaluate", *[x for pair in argv.items() for x in pair], "--allow-unsigned"])
    assert code == 1
    assert message in capsys.readouterr().err


def test_parse_counts_sorts_and_dedups():
    assert parse_counts("10,1,5,5", "--shots", minimum=1) == [1, 5, 10]
    assert torch.tensor(parse_counts("0", "--steps", minimum=0)).tolist() == [0]


def test_lr_scale_scales_the_adaptation_step_for_plain_and_learned_rates(trained, smoke_federation):
    info = load_manifest(smoke_federation).heldout_sites[0]
    for algorithm in ("fomaml", "metasgd"):
        plain = evaluate_checkpoint(trained[algorithm], [info.path], shots=[2], steps=[0, 2], max_images=16)
        scaled = evaluate_checkpoint(trained[algorithm], [info.path], shots=[2], steps=[0, 2], max_images=16,
                                     lr_scale=3.0)
        assert scaled["adaptation"]["lr_scale"] == 3.0 and "x3" in scaled["initialisation"]
        before, after = (r["sites"][info.name]["dice"]["2"] for r in (plain, scaled))
        assert before["0"]["dice"] == after["0"]["dice"]  # θ itself is the same
        assert before["2"]["per_patient"] != after["2"]["per_patient"]


def test_auto_steps_report_the_chosen_count_beside_the_dice_it_gives(trained, smoke_federation, tmp_path, capsys):
    """`auto` among --steps: the count chosen from the support slices, whose Dice is that fixed count's Dice."""
    from fedmeta.client import commands
    from fedmeta.common.step_selection import AUTO

    assert commands.AUTO == AUTO  # the CLI's copy of the name (it avoids importing torch for --help)
    site = load_manifest(smoke_federation).heldout_sites[0]
    report = tmp_path / "eval.json"
    code = main(["evaluate", "--checkpoint", str(trained["fomaml"]), "--data", str(site.path), "--shots", "2",
                 "--steps", "auto,0,1,2", "--max-steps", "2", "--max-images", "16", "--json", str(report),
                 "--allow-unsigned"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    results = loads_strict(report.read_text())  # strict JSON: no NaN anywhere
    assert results["steps"] == [0, 1, 2, "auto"]
    cells = results["sites"][site.name]["dice"]["2"]
    chosen = cells["auto"]["chosen_steps"]
    assert cells["auto"]["step_choice"]["candidates"] == [0, 1, 2] and chosen in (0, 1, 2)
    assert cells["auto"]["dice"] == cells[str(chosen)]["dice"]
    assert cells["auto"]["per_patient"] == cells[str(chosen)]["per_patient"]
    assert "auto: chosen steps, Dice" in printed and f"{chosen}: {cells['auto']['dice']:.3f}" in printed
    assert f"k=2: auto chose {chosen} step(s)" in printed


@pytest.mark.parametrize(("steps", "message"), [
    (["--steps", "auto,banana"], "--steps 'auto,banana': expected comma-separated integers >= 0, and/or auto"),
    (["--steps", "0,5", "--max-steps", "5"], "--max-steps 5: bounds the count auto chooses, and --steps '0,5' holds "
                                             "no auto"),
    (["--steps", "auto", "--max-steps", "-1"], "--max-steps -1: the most steps auto may choose"),
])
def test_bad_auto_steps_name_the_value_and_the_fix(tmp_path, capsys, steps, message):
    code = main(["evaluate", "--checkpoint", str(tmp_path / "never-read.pt"), "--data", str(tmp_path), *steps,
                 "--allow-unsigned"])
    assert code == 1 and message in capsys.readouterr().err
