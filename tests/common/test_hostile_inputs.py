"""Every hostile input gets a named refusal (the file or value, the problem, the fix; no traceback) or a correct
result, and `fedmeta check-data` counts what `fedmeta adapt` reads."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedmeta.common.adaptation import load_initialisation
from fedmeta.common.checkpoint import load_checkpoint
from fedmeta.common.config import MAX_STEPS, RunConfig, memory_problem
from fedmeta.common.data import DataConfig, SiteDataset, resampling_problem
from fedmeta.common.validate import ReadLimits, check_scan, check_site
from fedmeta.simulations.cli import main

CASE = "site-01_001"


@pytest.fixture
def site(smoke_federation: Path, tmp_path: Path) -> Path:
    """A copy of the smoke federation's site-01 (4 patients, MSD layout) to damage."""
    folder = tmp_path / "site-01"
    shutil.copytree(smoke_federation / "site-01", folder)
    return folder


def _image(folder: Path, case: str = CASE) -> Path:
    return folder / "imagesTr" / f"{case}.nii.gz"


def _rewrite(path: Path, array: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, nib.load(path).affine), str(path))


def _voxels(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def _check_data(folder: Path, capsys) -> tuple[int, str]:
    code = main(["check-data", str(folder)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out + captured.err


def _load(folder: Path) -> tuple[SiteDataset, list[str]]:
    """What adapt and evaluate read (SiteDataset.load), and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = SiteDataset.load(folder, DataConfig(image_size=(32, 32)))
    return loaded, [str(w.message) for w in caught]


# ---------------------------------------------------------------------------------------------------
# images that are not grey-level real numbers


def _rgb_record(path: Path) -> None:
    grey = _voxels(path).astype(np.uint8)
    rgb = np.zeros(grey.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = rgb["G"] = rgb["B"] = grey
    _rewrite(path, rgb)


def _rgb_channels(path: Path) -> None:
    grey = _voxels(path).astype(np.uint8)
    _rewrite(path, np.stack([grey] * 3, axis=-1))


def _complex(path: Path) -> None:
    _rewrite(path, _voxels(path).astype(np.complex64) * (1 + 1j))


def _uniform(path: Path) -> None:
    _rewrite(path, np.zeros(_voxels(path).shape, dtype=np.float32))


NOT_GREY = [
    ("rgb-dtype", _rgb_record, "is a colour image"),
    ("rgb-trailing-axis", _rgb_channels, "looks like colour channels (RGB/RGBA)"),
    ("complex64", _complex, "holds complex numbers (complex64)"),
    ("all-zero", _uniform, "every voxel of the image is 0 (a uniform volume, no contrast)"),
]


@pytest.mark.parametrize("name, damage, words", NOT_GREY, ids=[n for n, _, _ in NOT_GREY])
def test_an_image_that_is_not_a_grey_level_scan_is_refused_by_name_in_check_data_and_skipped_by_adapt(
        site, capsys, name, damage, words):
    damage(_image(site))
    code, out = _check_data(site, capsys)
    assert code == 1 and words in out and str(_image(site)) in out and "Fix:" in out
    assert "3/4 cases usable - PROBLEMS" in out
    loaded, said = _load(site)  # adapt's reader: the same check, the case skipped with the same words
    assert loaded.num_patients == 3 and CASE not in loaded.patient_ids
    assert any(words in message for message in said)


@pytest.mark.parametrize("name, damage, words", NOT_GREY, ids=[n for n, _, _ in NOT_GREY])
def test_predict_refuses_the_same_scans_with_the_same_words(site, name, damage, words):
    damage(_image(site))
    problems, image, data = check_scan(_image(site), min_slices=3)
    assert image is None and len(problems) == 1 and words in problems[0] and str(_image(site)) in problems[0]


def test_a_complex_label_is_refused_too(site, capsys):
    label = site / "labelsTr" / f"{CASE}.nii.gz"
    _rewrite(label, _voxels(label).astype(np.complex64))
    code, out = _check_data(site, capsys)
    assert code == 1 and "the label holds complex numbers" in out and str(label) in out


# ---------------------------------------------------------------------------------------------------
# the site's cases: dataset.json is the source of truth


def test_a_symlink_loop_in_imagesTr_is_named_and_the_listed_cases_still_load(site, capsys):
    (site / "imagesTr" / "a.nii.gz").symlink_to("b.nii.gz")
    (site / "imagesTr" / "b.nii.gz").symlink_to("a.nii.gz")
    code, out = _check_data(site, capsys)
    assert code == 1 and "4/4 cases usable; 2 unlisted file(s) ignored - PROBLEMS" in out
    assert f"{site / 'imagesTr' / 'a.nii.gz'}: cannot be resolved" in out and "a loop of symbolic links" in out
    loaded, said = _load(site)
    assert loaded.num_patients == 4 and any("a loop of symbolic links" in m for m in said)


def test_a_listed_file_that_is_a_symlink_loop_is_named(site, capsys):
    image = _image(site)
    image.unlink()
    image.symlink_to(image.name)  # a link to itself
    code, out = _check_data(site, capsys)
    assert code == 1 and "3/4 cases usable" in out and str(image) in out and "loop of symbolic links" in out


def test_check_data_counts_the_cases_dataset_json_lists_which_are_the_cases_adapt_reads(site, capsys):
    meta = json.loads((site / "dataset.json").read_text())
    meta["training"] = meta["training"][:2]
    (site / "dataset.json").write_text(json.dumps(meta))
    code, out = _check_data(site, capsys)
    assert code == 1 and "2/2 cases usable; 2 unlisted file(s) ignored - PROBLEMS" in out
    assert "site-01_002.nii.gz: image is not listed in" in out and "so it is ignored" in out
    loaded, said = _load(site)
    assert loaded.patient_ids == ["site-01_000", "site-01_001"] and len(loaded.ignored) == 2 and not loaded.skipped
    assert any("2 file(s) in imagesTr/ not used" in m and "site-01_003" in m for m in said)


def test_an_empty_training_list_is_zero_cases_not_a_negative_count(site, capsys):
    meta = json.loads((site / "dataset.json").read_text())
    meta["training"] = []
    (site / "dataset.json").write_text(json.dumps(meta))
    code, out = _check_data(site, capsys)
    assert code == 1 and "0/0 cases usable; 4 unlisted file(s) ignored" in out and "-4/" not in out
    assert f"{site / 'dataset.json'}: its 'training' list is empty" in out
    report = check_site(site)
    assert (report.num_valid, report.num_cases) == (0, 0)
    with pytest.raises(ValueError, match=r"lists no case \(dataset.json's 'training' is empty\)"):
        _load(site)


def test_a_dataset_json_that_is_not_utf8_is_named(site, capsys):
    dataset_json = site / "dataset.json"
    dataset_json.write_bytes(dataset_json.read_bytes().replace(b'"site-01"', b'"site-\xe901"', 1))
    assert main(["check-data", str(site)]) == 2
    err = capsys.readouterr().err
    assert f"{dataset_json} is not UTF-8 text (byte 0xe9" in err and "Fix: save the file as UTF-8" in err
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        _load(site)


# ---------------------------------------------------------------------------------------------------
# checkpoints and site models are data: their weights and run config are checked


def _tampered(checkpoint: Path, into: Path, *, params=None, **run_config) -> Path:
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if params is not None:
        payload["params"] = params(payload["params"])
    payload["run_config"] = {**payload["run_config"], **run_config}
    out = into / "checkpoint.pt"
    torch.save(payload, out)
    return out


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64, torch.float16, torch.bool])
def test_weights_that_are_not_float32_are_refused_by_name(trained_checkpoint, tmp_path, dtype):
    path = _tampered(trained_checkpoint, tmp_path, params=lambda p: {n: t.round().to(dtype) for n, t in p.items()})
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=rf"checkpoint.pt: params '.+' holds {name} values, not float32"):
        load_checkpoint(path)


HOSTILE_RUN_CONFIGS = [
    ({"spacing-mm": 0.01}, "spacing-mm=0.01: must be a voxel size in mm in [0.1, 20]"),
    ({"image-size": 4096}, "image-size=4096: must be at most 1024 pixels a side"),
    ({"model-levels": 20}, "model-levels=20: must be in [2, 8]"),
    ({"model-base-channels": 100000}, "model-base-channels=100000: must be in [1, 256]"),
    ({"model-base-channels": 256, "model-levels": 8, "image-size": 256},
     "the network has 13,822,842,541 parameters (51.5 GiB as float32), more than the 100,000,000"),
    ({"inner-steps": 1_000_000_000}, "inner-steps=1000000000: must be at most 10,000"),
    ({"eval-steps": "0,1000000000"}, "eval-steps='0,1000000000': must be comma-separated integers from 0 to 10,000"),
    ({"generator-width": 10**7}, "generator-width=10000000: must be in [1, 1024]"),
]


@pytest.mark.parametrize("changes, words", HOSTILE_RUN_CONFIGS, ids=[next(iter(c)) for c, _ in HOSTILE_RUN_CONFIGS])
def test_a_checkpoints_run_config_is_held_to_the_clis_ranges(trained_checkpoint, tmp_path, changes, words):
    path = _tampered(trained_checkpoint, tmp_path, **changes)
    with pytest.raises(ValueError) as refused:
        load_initialisation(path)
    assert str(path) in str(refused.value) and words in str(refused.value)
    with pytest.raises(ValueError) as refused:
        RunConfig.from_run_config(changes)  # the same range for --set and a preset
    assert words in str(refused.value)


def test_a_run_config_too_large_for_this_machine_is_refused_with_the_estimate_and_the_limit(monkeypatch):
    import os

    config = RunConfig(image_size=1024, model_base_channels=64)
    pages = os.sysconf("SC_PAGE_SIZE")
    monkeypatch.setattr(os, "sysconf", lambda name: pages if name == "SC_PAGE_SIZE" else 2**33 // pages)  # 8 GiB
    problem = memory_problem(config, "x/checkpoint.pt")
    assert problem.startswith("x/checkpoint.pt: its run config (image-size=1024, model-base-channels=64")
    assert f"needs about {config.memory_estimate() / 2**30:,.1f} GiB" in problem and "this machine's 8.0 GiB" in problem
    assert memory_problem(RunConfig(), "x/checkpoint.pt") is None


def test_a_volume_resampled_beyond_the_voxel_cap_is_refused_before_it_is_allocated():
    config = DataConfig(spacing=(0.1, 0.1, 0.1))  # the smallest spacing a run config may give
    problem = resampling_problem("scan.nii.gz", (180, 220, 180), np.ones(3), config)
    assert problem.startswith("scan.nii.gz: resampled for the model's spacing 0.1/0.1/0.1 mm")
    assert "1800 x 2200 x 1800 = 7,128,000,000 voxels" in problem and "more than the 268,435,456 voxels" in problem
    assert resampling_problem("scan.nii.gz", (180, 220, 180), np.ones(3), DataConfig()) is None
    small = DataConfig(image_size=(64, 64), limits=ReadLimits(max_voxels=1000))
    problem = resampling_problem("scan.nii.gz", (10, 10, 10), np.full(3, 2.0), small)
    assert "cropped to the model's window" in problem and "64 x 64 x 10 = 40,960 voxels" in problem


def test_evaluate_refuses_a_billion_steps_by_name(trained_checkpoint, site, capsys):
    code = main(["evaluate", "--checkpoint", str(trained_checkpoint), "--allow-unsigned", "--data", str(site),
                 "--steps", "0,1000000000"])
    err = capsys.readouterr().err
    assert code == 1 and "--steps '0,1000000000': 1,000,000,000 is more than the 10,000 fedmeta allows" in err
    assert "10,000" in _help(["evaluate", "--help"], capsys) and MAX_STEPS == 10_000


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit):
        main(argv)
    return capsys.readouterr().out


def test_adapt_refuses_steps_beyond_the_cap_and_says_so_in_its_help(trained_checkpoint, site, tmp_path, capsys):
    code = main(["adapt", "--checkpoint", str(trained_checkpoint), "--allow-unsigned", "--data", str(site),
                 "--out", str(tmp_path / "model"), "--steps", str(MAX_STEPS + 1)])
    assert code == 1 and "--steps 10001: gradient steps, an integer from 0" in capsys.readouterr().err
    assert "at most 10,000" in " ".join(_help(["adapt", "--help"], capsys).split())


# ---------------------------------------------------------------------------------------------------
# predict: a uniform scan is refused, not given a mask of noise


def test_predict_refuses_an_all_zero_scan_by_name_and_segments_the_rest(trained_checkpoint, site, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    for case in ("site-01_000", CASE):
        shutil.copy(_image(site, case), scans / f"{case}.nii.gz")
    _uniform(scans / f"{CASE}.nii.gz")
    assert main(["predict", "--model", str(trained_checkpoint), "--allow-unsigned", "--input", str(scans),
                 "--out", str(tmp_path / "masks"), "--no-overlays", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"{CASE}.nii.gz: refused: {scans / CASE}.nii.gz: every voxel of the image is 0" in out
    summary = json.loads((tmp_path / "masks" / "predictions.json").read_text())
    assert "uniform volume, no contrast" in summary["refused"][f"{CASE}.nii.gz"]
    assert [m["case"] for m in summary["masks"]] == ["site-01_000"]
    assert not (tmp_path / "masks" / f"{CASE}.nii.gz").exists()


def test_a_site_models_stored_run_config_is_held_to_the_same_ranges(trained_checkpoint, tmp_path):
    from fedmeta.client.model_card import CARD_JSON, MODEL_FILE, SITE_MODEL_FORMAT, SITE_MODEL_VERSION, load_site_model
    from fedmeta.common.outputs import file_sha256

    checkpoint = torch.load(trained_checkpoint, map_location="cpu", weights_only=True)
    model = tmp_path / "model"
    model.mkdir()
    # Whoever can write the folder can rewrite the card's digest too: the run config itself must be checked.
    torch.save({"format": SITE_MODEL_FORMAT, "version": SITE_MODEL_VERSION, "params": checkpoint["params"],
                "run_config": {**checkpoint["run_config"], "spacing-mm": 0.01}}, model / MODEL_FILE)
    card = {"format": SITE_MODEL_FORMAT, "model_sha256": file_sha256(model / MODEL_FILE)}
    (model / CARD_JSON).write_text(json.dumps(card))
    with pytest.raises(ValueError) as refused:
        load_site_model(model)
    message = str(refused.value)
    assert str(model / MODEL_FILE) in message and "spacing-mm=0.01: must be a voxel size" in message


# ---------------------------------------------------------------------------------------------------
# dataset.json listing one file twice


def _listing(site: Path, entries: list[dict]) -> None:
    meta = json.loads((site / "dataset.json").read_text())
    meta["training"] = entries
    (site / "dataset.json").write_text(json.dumps(meta))


def test_one_case_listed_four_times_in_four_spellings_is_refused_by_check_data_adapt_and_evaluate(
        trained_checkpoint, site, tmp_path, capsys):
    label = f"./labelsTr/{CASE}.nii.gz"
    _listing(site, [{"image": spelled, "label": label} for spelled in
                    (f"imagesTr/{CASE}.nii.gz", f"./imagesTr/{CASE}.nii.gz", f"imagesTr//{CASE}.nii.gz",
                     f"./imagesTr/../imagesTr/{CASE}.nii.gz")])
    words = (f"{site / 'dataset.json'}: its 'training' list names one file more than once: the image "
             f"{(site / 'imagesTr' / f'{CASE}.nii.gz').resolve()} is listed by 4 entries ([0] 'imagesTr/{CASE}.nii.gz', "
             f"[1] './imagesTr/{CASE}.nii.gz', [2] 'imagesTr//{CASE}.nii.gz'")
    assert main(["check-data", str(site)]) == 2
    err = capsys.readouterr().err
    assert words in err and "Fix: keep one entry per patient" in err and "cases usable" not in err
    with pytest.raises(ValueError, match="its 'training' list names one file more than once"):
        _load(site)  # adapt's and evaluate's reader
    code = main(["adapt", "--checkpoint", str(trained_checkpoint), "--allow-unsigned", "--data", str(site),
                 "--out", str(tmp_path / "model"), "--steps", "0", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code != 0 and words in err and "Traceback" not in err and not (tmp_path / "model").exists()
    code = main(["evaluate", "--checkpoint", str(trained_checkpoint), "--allow-unsigned", "--data", str(site)])
    err = capsys.readouterr().err
    assert code != 0 and words in err and "Traceback" not in err


def test_one_label_listed_for_two_images_is_refused_by_name(site, capsys):
    meta = json.loads((site / "dataset.json").read_text())
    entries = meta["training"]
    entries[1] = {**entries[1], "label": entries[0]["label"]}
    _listing(site, entries)
    label = (site / entries[0]["label"]).resolve()
    assert main(["check-data", str(site)]) == 2
    err = capsys.readouterr().err
    assert f"names one file more than once: the label {label} is listed by 2 entries ([0] " in err
    assert "(and one label per image)" in err


def test_a_glob_site_whose_image_is_a_link_to_another_case_is_refused(site):
    (site / "imagesTr" / "site-01_009.nii.gz").symlink_to(f"{CASE}.nii.gz")
    (site / "labelsTr" / "site-01_009.nii.gz").symlink_to(f"{CASE}.nii.gz")
    from fedmeta.common.validate import discover_site

    with pytest.raises(ValueError, match=r"2 image files matched by 'imagesTr/\*.nii.gz' are one file"):
        discover_site(site, "imagesTr/*.nii.gz", "labelsTr/*.nii.gz")


# ---------------------------------------------------------------------------------------------------
# episodes and shots: capped, and held to the machine's memory

EPISODE_CAPS = [
    ("episodes-per-site", 100_000_000, "episodes-per-site=100000000: must be at most 1,000 (a site holds"),
    ("k-shot", 1001, "k-shot=1001: must be at most 1,000 slices"),
    ("q-query", 10**9, "q-query=1000000000: must be at most 1,000 slices"),
    ("eval-k-shot", 5000, "eval-k-shot=5000: must be at most 1,000 slices"),
]


@pytest.mark.parametrize("key, value, words", EPISODE_CAPS, ids=[k for k, _, _ in EPISODE_CAPS])
def test_episode_and_shot_counts_are_capped_for_set_and_stored_configs(trained_checkpoint, tmp_path, key, value, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        RunConfig.from_run_config({key: value})
    path = _tampered(trained_checkpoint, tmp_path, **{key: value})
    with pytest.raises(ValueError, match=re.escape(words)):
        load_initialisation(path)


def test_simulate_refuses_a_hundred_million_episodes_before_building_anything(tmp_path, capsys):
    code = main(["simulate", "--preset", "smoke", "--engine", "inprocess", "--set", "episodes-per-site=100000000",
                 "--rounds", "1", "--no-baseline", "--oracle-steps", "0", "--out", str(tmp_path / "run"),
                 "--federation-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 1 and "episodes-per-site=100000000: must be at most 1,000" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def _machine_of(monkeypatch, gib: int) -> None:
    import os

    pages = os.sysconf("SC_PAGE_SIZE")
    monkeypatch.setattr(os, "sysconf", lambda name: pages if name == "SC_PAGE_SIZE" else gib * 2**30 // pages)


def test_the_memory_estimate_counts_the_episodes_a_round_holds_at_once(monkeypatch):
    small = RunConfig(episodes_per_site=2, k_shot=5, q_query=5)
    large = small.replace(episodes_per_site=1000, k_shot=1000, q_query=1000)
    held = 1000 * 2000 * 64 * 64 * (4 + 8 + 4 * 4)  # image, int64 label and one-hot target of every slice
    assert large.memory_estimate() - small.memory_estimate() >= held
    _machine_of(monkeypatch, 8)
    problem = memory_problem(large, "--preset smoke", fix="lower them.")
    assert problem.startswith("--preset smoke: its run config (") and problem.endswith("Fix: lower them.")
    assert "episodes-per-site=1000, k-shot=1000, q-query=1000" in problem and "this machine's 8.0 GiB" in problem
    assert memory_problem(small, "--preset smoke") is None


def test_simulate_refuses_episodes_that_fit_the_caps_but_not_the_machine(monkeypatch, tmp_path, capsys):
    _machine_of(monkeypatch, 8)
    code = main(["simulate", "--preset", "smoke", "--engine", "inprocess", "--set", "episodes-per-site=1000",
                 "--set", "k-shot=1000", "--set", "q-query=1000", "--rounds", "1", "--no-baseline",
                 "--oracle-steps", "0", "--out", str(tmp_path / "run"), "--federation-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 1 and "--preset smoke: its run config (" in err and "this machine's 8.0 GiB" in err
    assert "episodes-per-site=1000, k-shot=1000, q-query=1000" in err and "Fix: lower episodes-per-site" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------------------
# stored fields of checkpoints and model cards of the wrong kind


def _rewritten(checkpoint: Path, into: Path, **fields) -> Path:
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    payload.update(fields)
    out = into / "checkpoint.pt"
    torch.save(payload, out)
    return out


HOSTILE_CHECKPOINT_FIELDS = [
    ({"run_config": ["algorithm", 1]}, "'run_config' is a list, not a mapping of run-config keys to values"),
    ({"run_config": {1: "fomaml", "inner-lr": 0.05}}, "'run_config' has key(s) 1 that are not text"),
    ({"round": "three"}, "'round' is 'three', not a whole number of rounds >= 0"),
    ({"round": True}, "'round' is True, not a whole number of rounds >= 0"),
    ({"privacy": "garbage"}, "'privacy' is 'garbage', not the DP accountant's {'delta': ..., 'history': [...]}"),
    ({"privacy": {"delta": "x", "history": []}}, "'privacy' 'delta' is 'x', not a number in (0, 1)"),
    ({"privacy": {"delta": 1e-5, "history": [[3, 3, "big"]]}}, "'privacy' 'history'[0] is [3, 3, 'big'], not [sites"),
    ({"counters": {"dropped_replies": "2"}}, "'counters' is {'dropped_replies': '2'}, not a mapping of names to whole"),
    ({"config_hash": 7}, "'config_hash' is 7, not text"),
]


@pytest.mark.parametrize("fields, words", HOSTILE_CHECKPOINT_FIELDS, ids=[str(f)[:30] for f, _ in HOSTILE_CHECKPOINT_FIELDS])
def test_a_checkpoint_field_of_the_wrong_kind_is_refused_naming_the_file_and_the_field(
        trained_checkpoint, tmp_path, capsys, site, fields, words):
    path = _rewritten(trained_checkpoint, tmp_path, **fields)
    with pytest.raises(ValueError) as refused:
        load_checkpoint(path)
    assert str(refused.value).startswith(f"{path}: not a checkpoint fedmeta wrote: ") and words in str(refused.value)
    code = main(["evaluate", "--checkpoint", str(path), "--allow-unsigned", "--data", str(site)])
    err = capsys.readouterr().err
    assert code != 0 and words in err and "Traceback" not in err


STORED_RUN_CONFIGS = [
    (["algorithm"], "the run config is a list, not a mapping of kebab-case keys"),
    ({1: 2}, "run-config key(s) 1 are not text"),
    ({"image-size": 10**400}, "expected an integer"),
]


@pytest.mark.parametrize("run_config, words", STORED_RUN_CONFIGS, ids=["list", "int-key", "huge-int"])
def test_from_run_config_refuses_what_is_not_a_mapping_of_text_keys(run_config, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        RunConfig.from_run_config(run_config)


def _site_model(trained_checkpoint: Path, folder: Path, *, run_config=..., **card_changes) -> Path:
    """A site model folder as adapt writes it, with its card's digest right, from the trained checkpoint."""
    from fedmeta.client.model_card import CARD_JSON, MODEL_FILE, SITE_MODEL_FORMAT, SITE_MODEL_VERSION
    from fedmeta.common.outputs import file_sha256

    checkpoint = torch.load(trained_checkpoint, map_location="cpu", weights_only=True)
    folder.mkdir()
    torch.save({"format": SITE_MODEL_FORMAT, "version": SITE_MODEL_VERSION, "params": checkpoint["params"],
                "run_config": checkpoint["run_config"] if run_config is ... else run_config}, folder / MODEL_FILE)
    card = {"format": SITE_MODEL_FORMAT, "version": SITE_MODEL_VERSION, "model_sha256": file_sha256(folder / MODEL_FILE),
            "initialisation": {"sha256": "0" * 64, "round": 1, "algorithm": "fomaml", "release_id": None},
            "model": {"label_names": {"0": "background", "1": "tumour"}}}
    for key, value in card_changes.items():
        if value is ...:
            card.pop(key)
        else:
            card[key] = value
    (folder / CARD_JSON).write_text(json.dumps(card))
    return folder


def _predict(model: Path, site: Path, tmp_path: Path, capsys) -> tuple[int, str]:
    scans = tmp_path / "scans"
    scans.mkdir(exist_ok=True)
    shutil.copy(_image(site), scans / f"{CASE}.nii.gz")
    code = main(["predict", "--model", str(model), "--input", str(scans), "--out", str(tmp_path / "masks"),
                 "--no-overlays", "--device", "cpu"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.err


HOSTILE_CARDS = [
    ({"initialisation": ...}, "model-card.json: its field 'initialisation' is missing, not the section"),
    ({"initialisation": "fomaml"}, "model-card.json: its field 'initialisation' is str, not the section"),
    ({"initialisation": {"release_id": 3}}, "model-card.json: its field 'initialisation.release_id' is int, not text"),
    ({"model": []}, "model-card.json: its field 'model' is list, not the section"),
    ({"model": ...}, "model-card.json: its field 'model' is missing"),
    ({"model": {"label_names": ["tumour"]}}, "model-card.json: its field 'model.label_names' is not a mapping"),
]


@pytest.mark.parametrize("changes, words", HOSTILE_CARDS, ids=[str(c)[:30] for c, _ in HOSTILE_CARDS])
def test_a_model_card_whose_sections_are_missing_or_of_the_wrong_kind_is_refused_by_predict(
        trained_checkpoint, site, tmp_path, capsys, changes, words):
    model = _site_model(trained_checkpoint, tmp_path / "model", **changes)
    code, err = _predict(model, site, tmp_path, capsys)
    assert code != 0 and f"{model / 'model-card.json'}: its field" in err and words in err
    assert not (tmp_path / "masks" / f"{CASE}.nii.gz").exists()


def test_the_unaltered_card_of_these_tests_is_accepted(trained_checkpoint, site, tmp_path, capsys):
    model = _site_model(trained_checkpoint, tmp_path / "model")
    code, _ = _predict(model, site, tmp_path, capsys)
    assert code == 0 and (tmp_path / "masks" / f"{CASE}.nii.gz").exists()


@pytest.mark.parametrize("run_config, words", [
    ([1, 2], "model.pt: its 'run_config' is list, not the mapping"),
    ([], "model.pt: its 'run_config' is list, not the mapping"),
    ({1: "fomaml"}, "model.pt: its stored run config is refused (run-config key(s) 1 are not text"),
], ids=["list", "empty-list", "int-key"])
def test_a_site_models_run_config_of_the_wrong_kind_is_refused_by_predict(trained_checkpoint, site, tmp_path, capsys,
                                                                          run_config, words):
    model = _site_model(trained_checkpoint, tmp_path / "model", run_config=run_config)
    code, err = _predict(model, site, tmp_path, capsys)
    assert code != 0 and str(model / "model.pt") in err and words in err


# ---------------------------------------------------------------------------------------------------
# an adaptation that diverges is refused, not scored as Dice 0


@pytest.mark.parametrize("scale", ["1e30", "1001", "inf", "0"])
def test_evaluate_refuses_an_lr_scale_outside_its_range(trained_checkpoint, site, capsys, scale):
    code = main(["evaluate", "--checkpoint", str(trained_checkpoint), "--allow-unsigned", "--data", str(site),
                 "--lr-scale", scale])
    err = capsys.readouterr().err
    assert code == 1 and f"--lr-scale {float(scale)}: must be a positive number at most 1000" in err
    assert "at most 1000" in " ".join(_help(["evaluate", "--help"], capsys).split())


def test_evaluate_refuses_an_adaptation_whose_weights_diverge_naming_the_step_and_the_fix(
        trained_checkpoint, site, tmp_path, capsys):
    path = _tampered(trained_checkpoint, tmp_path, **{"inner-lr": 1e27})  # x1000 of it still diverges
    code = main(["evaluate", "--checkpoint", str(path), "--allow-unsigned", "--data", str(site), "--shots", "2",
                 "--steps", "0,5", "--lr-scale", "1000"])
    captured = capsys.readouterr()
    err = captured.err
    assert code == 1 and "Traceback" not in err and "Dice" not in captured.out
    assert f"{path} on site site-01 ({site}): adaptation diverged: after step 1 of 5 the adapted weights" in err
    assert "(step size x1000). Fix: pass a smaller --lr-scale (e.g. --lr-scale 100;" in err


def test_adaptation_curve_raises_the_step_at_which_the_weights_broke():
    from fedmeta.common.adaptation import AdaptationDiverged, check_adapted

    check_adapted({"w": torch.full((2,), 1e6)}, step=3, inner_steps=5)  # the largest plausible weight passes
    with pytest.raises(AdaptationDiverged, match=r"after step 3 of 5 the adapted weights hold NaN or Inf \(e.g. 'b'\)"):
        check_adapted({"w": torch.ones(2), "b": torch.tensor([0.0, float("nan")])}, step=3, inner_steps=5)
    with pytest.raises(AdaptationDiverged, match="reach magnitude 1e\\+07, beyond any trained weight") as raised:
        check_adapted({"w": torch.full((2,), 1e7)}, step=2, inner_steps=5)
    assert raised.value.step == 2


def test_adapt_refuses_weights_that_diverge_and_writes_no_model(trained_checkpoint, site, tmp_path, capsys):
    path = _tampered(trained_checkpoint, tmp_path, **{"inner-lr": 1e30})
    code = main(["adapt", "--checkpoint", str(path), "--allow-unsigned", "--data", str(site), "--shots", "2",
                 "--steps", "5", "--out", str(tmp_path / "model"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and not (tmp_path / "model" / "model.pt").exists()
    assert f"{path} on {site}: adaptation diverged: after step 1 of 5 the adapted weights" in err
    assert "SGD, step size 1e+30 (the run's inner-lr)). Fix: adapt with --steps 0, or more --shots" in err


def test_a_hard_link_to_another_case_is_the_same_patient_and_refused(tmp_path):
    import json as _json
    import os as _os

    from fedmeta.common.validate import discover_site

    site = tmp_path / "site"
    (site / "imagesTr").mkdir(parents=True)
    (site / "labelsTr").mkdir()
    for folder in ("imagesTr", "labelsTr"):
        (site / folder / "a.nii.gz").write_bytes(b"x")
        _os.link(site / folder / "a.nii.gz", site / folder / "hl.nii.gz")
    (site / "dataset.json").write_text(_json.dumps({"labels": {"0": "background", "1": "tissue"}, "training": [
        {"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"},
        {"image": "./imagesTr/hl.nii.gz", "label": "./labelsTr/hl.nii.gz"}]}))
    with pytest.raises(ValueError, match=r"names one file more than once: the image .*a.nii.gz is listed by 2 entries "
                                         r".*hard links to one file"):
        discover_site(site)


def test_a_site_key_file_is_only_a_plain_key_and_is_never_written_through_a_link(tmp_path):
    import hashlib

    from fedmeta.client.site import persisted_site_key

    home = tmp_path / "home"
    data = tmp_path / "data"
    data.mkdir()
    kept = tmp_path / "home" / "site-keys" / hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:24]
    kept.parent.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    kept.symlink_to(victim)
    key = persisted_site_key(data, home)
    assert victim.read_text() == "precious" and not kept.is_symlink() and kept.read_text().strip() == str(key)
    for garbage in ("1_0", "-5", "0", "99999999999999999999", "\u0663\u0664"):
        (data / ".fedmeta-site-key").write_text(garbage + "\n")
        assert persisted_site_key(data, home) == key, garbage  # not a key: the kept one stands
