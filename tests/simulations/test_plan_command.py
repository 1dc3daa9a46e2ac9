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
from tests.common.test_fingerprint import ct_volumes, mr_volumes, write_site

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
    ("missing", ["site no-such-site", "does not exist"]),
    ("no usable case", ["site hospital-a", "none of its 2 listed case(s) is usable", "fedmeta check-data"]),
    ("twice", ["two sites named 'hospital-a'", "Fix:"]),
    ("a label name of 120 characters", ["site hospital-a", "its fingerprint is refused", "field labels.1",
                                        "1 to 64 printable characters", "Fix: correct that in the site's dataset.json"]),
])
def test_plan_errors_name_the_site_and_the_fix(sites, tmp_path, capsys, break_site, words):
    site = sites["hospital-a"]
    argv = ["plan", "--out", str(tmp_path / "plan"), "--sites", str(site)]
    if break_site == "missing":
        argv.append(str(tmp_path / "no-such-site"))
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
