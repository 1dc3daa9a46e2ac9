"""`fedmeta plan --sites SITE... --out PLAN_DIR`: the sites' fingerprints, checked and merged, written as plan.json and
a run-config preset; refusals name the site (or the folder) and the fix."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from fedmeta.common.config import RunConfig
from fedmeta.common.data import SiteDataset
from fedmeta.simulations.cli import main
from fedmeta.simulations.experiments.presets import load_preset
from tests.common.test_fingerprint import SITE_NAME, ct_volumes, mr_volumes, write_site

CT_LABELS = {"0": "background", "1": "liver", "2": "tumour"}


@pytest.fixture
def sites(tmp_path):
    """Two CT sites and an MR site (different spacings, label sets), as folders named for the sites."""
    folders = {}
    for name, seed in (("hospital-a", 0), ("hospital-b", 3)):
        images, labels = ct_volumes(2, seed=seed)
        folders[name] = write_site(tmp_path / name, images, labels, (0.8, 0.8, 5.0), {"0": "CT"}, CT_LABELS)
    images, labels = mr_volumes(2, seed=1)
    folders["hospital-mr"] = write_site(tmp_path / "hospital-mr", images, labels, (1.0, 1.0, 1.2), {"0": "T2"},
                                        {"0": "background", "1": "prostate"})
    return folders


def test_plan_writes_plan_json_and_a_run_config_preset_and_prints_the_reasons(sites, tmp_path, capsys):
    out = tmp_path / "plan"
    assert main(["plan", "--sites", str(sites["hospital-a"]), str(sites["hospital-b"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "plan: site hospital-a: 2 case(s) fingerprinted (1/2 sites)" in printed
    assert "because the 0.5 / 99.5 percentiles of foreground HU" in printed and "anisotropic" in printed
    plan = json.loads((out / "plan.json").read_text())
    assert list(plan["sites"]) == ["hospital-a", "hospital-b"] and plan["run-config"]["channels"] == "CT"
    overrides, _ = load_preset(str(out / "run-config.toml"))
    assert overrides["plan-sha256"] == hashlib.sha256((out / "plan.json").read_bytes()).hexdigest()
    assert overrides["spacing-mm"] == 0.8 and overrides["slice-spacing-mm"] == 5.0
    assert overrides["num-classes"] == 3 and overrides["ct-std"] > 0

    # again: an earlier plan is replaced on request only
    argv = ["plan", "--sites", str(sites["hospital-a"]), "--out", str(out), "--quiet"]
    assert main(argv) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    assert list(json.loads((out / "plan.json").read_text())["sites"]) == ["hospital-a"]


def test_plan_refuses_a_non_empty_folder_it_did_not_write_before_reading_any_site(sites, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    missing = tmp_path / "no-such-site"  # were the sites read first, this one would be the error
    assert main(["plan", "--sites", str(missing), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: holds files written by something other than fedmeta plan" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("break_site, words", [
    ("missing", ["--sites", "no-such-site: does not exist", "Fix: pass the site's folder"]),
    # said once, with why (the first case's first problem) and where every problem is listed
    ("no usable case", ["site hospital-a", "none of its 2 listed case(s) is usable", "The first, patientZX81_000: ",
                        "the label file of this case is missing", "Run `fedmeta check-data"]),
    ("dataset.json", ["--sites", "dataset.json: is a file, not a site folder; pass its folder"]),
    ("twice", ["two sites named 'hospital-a'", "Fix:"]),
    ("a label name of 120 characters", ["site hospital-a", "its fingerprint is refused", "field labels.1",
                                        "1 to 64 printable characters", "Fix: correct that in the site's dataset.json"]),
])
def test_plan_errors_name_the_site_and_the_fix(sites, tmp_path, capsys, break_site, words):
    site = sites["hospital-a"]
    argv = ["plan", "--out", str(tmp_path / "plan"), "--sites", str(site)]
    if break_site == "missing":
        argv.append(str(tmp_path / "no-such-site"))
    elif break_site == "dataset.json":
        argv[-1] = str(site / "dataset.json")
    elif break_site == "no usable case":
        for label in (site / "labelsTr").iterdir():
            label.unlink()
    elif break_site.startswith("a label name"):
        meta = json.loads((site / "dataset.json").read_text())
        meta["labels"]["1"] = "liver " * 20
        (site / "dataset.json").write_text(json.dumps(meta))
    else:
        (tmp_path / "copy").mkdir()
        (tmp_path / "copy" / "hospital-a").symlink_to(site)
        argv.append(str(tmp_path / "copy" / "hospital-a"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedmeta plan: ") and all(w in err for w in words), err
    assert err.count("site hospital-a") <= 1 and SITE_NAME not in err  # the site named once, by its folder
    assert not (tmp_path / "plan" / "plan.json").exists()


def test_plan_of_sites_with_different_channel_sets_is_refused_naming_them(sites, tmp_path, capsys):
    images, labels = mr_volumes(2, seed=4, channels=2)
    two = write_site(tmp_path / "prostate-2ch", images, labels, (0.6, 0.6, 3.6), {"0": "T2", "1": "ADC"},
                     {"0": "background", "1": "prostate"})
    assert main(["plan", "--sites", str(sites["hospital-mr"]), str(two), "--out", str(tmp_path / "plan")]) == 2
    err = capsys.readouterr().err
    assert "different channel sets (hospital-mr: T2; prostate-2ch: T2, ADC)" in err and "Fix:" in err


def test_one_channel_sites_of_ct_and_mr_plan_one_model_on_any_one_channel(sites, tmp_path, capsys):
    assert main(["plan", "--quiet", "--sites", *(str(s) for s in sites.values()), "--out", str(tmp_path / "p")]) == 0
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert plan["run-config"]["channels"] == "" and plan["run-config"]["in-channels"] == 1
    assert plan["choices"]["labels"]["value"]["annotates"]["hospital-mr"] == {"1": "prostate"}
    assert "still running" not in capsys.readouterr().out


def test_the_planned_run_config_reads_two_channel_sites_whatever_their_channel_order(tmp_path):
    """The plan's keys are what the reader takes: a site that declares ADC before T2 is stacked in the plan's order."""
    rng = np.random.default_rng(0)
    sites = []
    for name, order in (("prostate-a", ("T2", "ADC")), ("prostate-b", ("ADC", "T2"))):
        _, labels = mr_volumes(2, seed=0)
        # the structure is dark in T2 and bright in ADC here, whatever the file's channel order
        images = []
        for label in labels:
            channel = {"T2": np.where(label > 0, 200.0, 1000.0), "ADC": np.where(label > 0, 1000.0, 200.0)}
            images.append(np.stack([channel[c] + rng.normal(0, 20, label.shape) for c in order], axis=-1))
        sites.append(write_site(tmp_path / name, images, labels, (0.6, 0.6, 3.6), dict(enumerate(order)),
                                {"0": "background", "1": "peripheral zone"}))
    out = tmp_path / "plan"
    assert main(["plan", "--quiet", "--sites", *map(str, sites), "--out", str(out), "--max-image-size", "16"]) == 0
    overrides, _ = load_preset(str(out / "run-config.toml"))
    config = RunConfig.from_run_config(overrides)
    assert (config.in_channels, config.channels, config.image_size) == (2, "T2,ADC", 16)
    for site in sites:
        images, labels = SiteDataset.load(site, config.data_config()).patient(0)
        assert images.shape[1:] == (2, 16, 16)
        structure = labels > 0
        assert float(images[:, 0][structure].mean()) < 0 < float(images[:, 1][structure].mean()), site.name


def _plan(argv, capsys):
    code = main(["plan", "--quiet", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_plan_without_heldout_removes_the_manifest_an_earlier_plan_wrote(sites, tmp_path, capsys):
    """`fedmeta simulate --federation-dir PLAN_DIR` trains on PLAN_DIR/manifest.json: a plan without --heldout over
    an earlier plan with it must leave none behind, and none but plan's may stay."""
    out = tmp_path / "plan"
    code, _, err = _plan(["--sites", sites["hospital-a"], "--heldout", sites["hospital-b"], "--out", out], capsys)
    assert code == 0 and (out / "manifest.json").is_file(), err
    code, printed, err = _plan(["--sites", sites["hospital-a"], sites["hospital-b"], "--out", out, "--overwrite"],
                               capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["plan.json", "run-config.toml"]
    assert f"removed {out / 'manifest.json'}, the earlier plan's held-out federation" in printed
    # --heldout again: a manifest again, recorded as plan's, so the next plan may remove it
    code, _, err = _plan(["--sites", sites["hospital-a"], "--heldout", sites["hospital-b"], "--out", out,
                          "--overwrite"], capsys)
    assert code == 0 and (out / "manifest.json").is_file(), err
    # edited by hand, or not plan's at all: refused before any site is read, and left in place
    missing = tmp_path / "no-such-site"
    for text in ('{"edited": true}', None):
        if text is None:
            journal = json.loads((out / ".fedmeta-outputs.json").read_text())
            del journal["files"]["manifest.json"]
            (out / ".fedmeta-outputs.json").write_text(json.dumps(journal))
            text = '{"someone": "else"}'
        (out / "manifest.json").write_text(text)
        code, _, err = _plan(["--sites", missing, "--out", out, "--overwrite"], capsys)
        assert code == 2 and f"--out {out / 'manifest.json'}: was not written by fedmeta plan, or changed since" in err
        assert "Fix: move it away" in err and (out / "manifest.json").read_text() == text


@pytest.mark.parametrize("options, words", [
    (["--max-image-size", "8"], "--max-image-size) 8: must be a multiple of 8 (2^(model-levels - 1) for "
                                "model-levels=4) from 16 to 1024"),
    (["--max-image-size", "64", "--model-levels", "9"], "--model-levels) 9: must be an integer in [2, 8]"),
    (["--max-image-size", "16", "--model-levels", "5"], "--max-image-size) 16: must be a multiple of 16"),
    ("a file", "cannot be written (Not a directory"),
])
def test_a_budget_or_an_out_that_cannot_work_is_refused_before_any_site_is_read(tmp_path, capsys, options, words):
    out = tmp_path / "new" / "plan"
    if options == "a file":
        (tmp_path / "notes.txt").write_text("mine")
        out, options = tmp_path / "notes.txt" / "plan", []
    missing = tmp_path / "no-such-site"  # were the sites read first, this one would be the error
    code, _, err = _plan(["--sites", missing, "--out", out, *options], capsys)
    assert code == 2 and words in err and "no-such-site" not in err, err
    assert "Fix:" in err and "Errno" not in err
    assert not (tmp_path / "new").exists()
    # a writable --out is probed and left as it was: the first error is then the missing site
    code, _, err = _plan(["--sites", missing, "--out", tmp_path / "new" / "plan"], capsys)
    assert code == 2 and "no-such-site: does not exist" in err and not (tmp_path / "new").exists()


def test_a_ct_site_exported_as_0_to_1_is_refused_by_name(sites, tmp_path, capsys):
    images, labels = ct_volumes(2, seed=7)
    scaled = [(i - i.min()) / (i.max() - i.min()) for i in images]  # a normalised export, not Hounsfield units
    unit = write_site(tmp_path / "hospital-unit", scaled, labels, (0.8, 0.8, 5.0), {"0": "CT"}, CT_LABELS)
    code, _, err = _plan(["--sites", sites["hospital-a"], unit, "--out", tmp_path / "plan"], capsys)
    assert code == 2 and f"site hospital-unit ({unit}): its CT channel 'CT' does not hold Hounsfield units" in err
    assert "within [0, 1.5]" in err and "Fix: re-export the site's CT in HU" in err
    assert not (tmp_path / "plan" / "plan.json").exists()


def _one_case_site(root, labels=None):
    images, masks = ct_volumes(1, seed=2)
    return write_site(root, images, masks, (0.8, 0.8, 5.0), {"0": "CT"}, labels or CT_LABELS)


@pytest.mark.parametrize("role, words", [
    ("training", "site one-case ({root}): only 1 usable case(s) (0 skipped); support and query come from different "
                 "patients, so a site needs at least 2. Fix: add patients"),
    ("heldout", "--heldout {root}: lists 1 case(s); a held-out site adapts on one patient's slices and is scored on "
                "another's, so it needs at least 2. Fix: add patients"),
    ("heldout unlabelled", "--heldout {root}: its dataset.json declares only background in 'labels'; a held-out site "
                           "adapts on and is scored in its own annotated structures. Fix: declare them"),
])
def test_a_site_that_cannot_take_part_is_refused_by_name_with_the_fix(sites, tmp_path, capsys, role, words):
    if role == "heldout unlabelled":
        images, masks = ct_volumes(2, seed=2)
        root = write_site(tmp_path / "one-case", images, masks, (0.8, 0.8, 5.0), {"0": "CT"}, {"0": "background"})
    else:
        root = _one_case_site(tmp_path / "one-case")
    argv = ["--sites", sites["hospital-a"], sites["hospital-b"], "--out", tmp_path / "plan"]
    argv[1:1] = [root] if role == "training" else []
    argv += ["--heldout", root] if role != "training" else []
    code, _, err = _plan(argv, capsys)
    assert code == 2 and words.format(root=root) in err, err
    assert not (tmp_path / "plan" / "plan.json").exists()


def test_a_heldout_site_with_other_channels_is_told_in_the_plans_words(sites, tmp_path, capsys):
    code, _, err = _plan(["--sites", sites["hospital-a"], sites["hospital-b"], "--heldout", sites["hospital-mr"],
                          "--out", tmp_path / "plan"], capsys)
    assert code == 2
    assert (f"--heldout {sites['hospital-mr']}: its channels (T2) differ from the training sites' (CT); the plan's "
            "model reads those. Fix: hold out a site with the same channels.") in err
    assert "run the federation with its plan" not in err  # the reader's advice, wrong inside plan


def test_names_from_a_sites_files_never_reach_the_terminal_raw(tmp_path, capsys):
    """A dataset.json name of 10 KB with escape codes, in a folder whose own name holds one: the error says the site
    once, by its folder, with every control character escaped."""
    images, masks = ct_volumes(2, seed=3)
    root = write_site(tmp_path / "hosp\x1b[2Jital", images, masks, (0.8, 0.8, 5.0), {"0": "CT"}, CT_LABELS)
    meta = json.loads((root / "dataset.json").read_text())
    meta["name"] = "\x1b[31m" + "N" * 10240
    (root / "dataset.json").write_text(json.dumps(meta))
    for label in (root / "labelsTr").iterdir():
        label.unlink()
    code, _, err = _plan(["--sites", root, "--out", tmp_path / "plan"], capsys)
    assert code == 2 and "\x1b" not in err and "hosp\\x1b[2Jital" in err and "NNNN" not in err, err
    assert err.count("none of its 2 listed case(s) is usable") == 1 and len(err) < 1500
