"""The federation's plan (fedmeta.common.plan): merged fingerprints become run-config values, each with its reason.

Reference equivalence where a merge claims exactness: the CT window and normalisation from the merged histograms
against numpy over the pooled voxels themselves.
"""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import pytest

from fedmeta.common.config import RunConfig
from fedmeta.common.fingerprint import HU_HIGH, HU_LOW, site_fingerprint
from fedmeta.common.outputs import OutputRefused
from fedmeta.common.plan import (
    RUN_CONFIG_KEYS, histogram_moments, histogram_percentile, merge_fingerprints, weighted_median, write_plan,
)
from fedmeta.common.read_limits import ReadLimits
from fedmeta.simulations.experiments.presets import load_preset
from tests.common.test_fingerprint import ct_volumes, mr_volumes, write_site

CT_LABELS = {"0": "background", "1": "liver", "2": "tumour"}


def _fingerprint(root):
    return site_fingerprint(root, limits=ReadLimits())


@pytest.fixture
def federation(tmp_path):
    """Two CT sites (liver and tumour; another HU distribution each) and an MR site (prostate), with their voxels."""
    sites, voxels = {}, {}
    for name, seed, cases in (("ct-a", 0, 3), ("ct-b", 5, 2)):
        images, labels = ct_volumes(cases, seed=seed)
        if name == "ct-b":
            images = [np.where(l > 0, i + 400, i) for i, l in zip(images, labels)]  # contrast-enhanced: brighter
        sites[name] = _fingerprint(write_site(tmp_path / name, images, labels, (0.8, 0.8, 5.0), {"0": "CT"}, CT_LABELS))
        voxels[name] = np.concatenate([np.clip(i[l > 0], HU_LOW, HU_HIGH) for i, l in zip(images, labels)])
    images, labels = mr_volumes(2, seed=1)
    sites["mr"] = _fingerprint(write_site(tmp_path / "mr", images, labels, (1.0, 1.0, 1.2), {"0": "T2"},
                                          {"0": "background", "1": "prostate"}))
    return sites, voxels


@pytest.mark.parametrize("values, weights, expected", [
    ([1.0], [5], 1.0),
    ([3.0, 1.0, 2.0], [1, 1, 1], 2.0),
    ([0.8, 5.0], [3, 1], 0.8),  # the site with more cases carries the median
    ([0.8, 5.0], [1, 3], 5.0),
    ([1.0, 2.0], [1, 1], 1.0),  # a tie: the lower one, deterministically
])
def test_weighted_median(values, weights, expected):
    assert weighted_median(values, weights) == expected


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("percent", [0.0, 0.5, 25.0, 50.0, 99.5, 100.0])
def test_histogram_percentile_equals_numpys_over_the_voxels_it_counts(seed, percent):
    rng = np.random.default_rng(seed)
    hu = rng.integers(HU_LOW, HU_HIGH + 1, size=int(rng.integers(1, 500)))
    counts = np.bincount(hu - HU_LOW, minlength=HU_HIGH - HU_LOW + 1)
    assert histogram_percentile(counts, percent) == pytest.approx(np.percentile(hu, percent))
    mean, std = histogram_moments(counts, -100.0, 250.5)
    clipped = np.clip(hu, -100.0, 250.5)
    assert (mean, std) == pytest.approx((clipped.mean(), clipped.std()))


def test_ct_sites_plan_an_anisotropic_2d_run_with_the_window_of_their_pooled_voxels(federation):
    sites, voxels = federation
    plan = merge_fingerprints({name: sites[name] for name in ("ct-a", "ct-b")})
    pooled = np.concatenate([voxels["ct-a"], voxels["ct-b"]])
    run = plan["run-config"]
    assert abs(run["ct-clip-low"] - np.percentile(pooled, 0.5)) <= 1 and abs(run["ct-clip-high"] -
                                                                           np.percentile(pooled, 99.5)) <= 1
    windowed = np.clip(pooled, run["ct-clip-low"], run["ct-clip-high"])
    assert run["ct-mean"] == pytest.approx(windowed.mean(), abs=1e-3)
    assert run["ct-std"] == pytest.approx(windowed.std(), abs=1e-3)
    assert (run["spacing-mm"], run["slice-spacing-mm"]) == (0.8, 5.0)
    reason = plan["choices"]["spacing"]["reason"]
    assert "anisotropic" in reason and "2D" in reason and "6.2x" in reason
    assert run["channels"] == "CT" and run["in-channels"] == 1 and run["num-classes"] == 3
    # a field of view of 19.2 mm at 0.8 mm is 24 pixels, rounded up to a multiple of 8
    assert run["image-size"] == 24 and "multiple of 8" in plan["choices"]["image-size"]["reason"]
    assert set(run) == set(RUN_CONFIG_KEYS)


def test_a_near_isotropic_site_says_fedmeta_trains_2d_where_nnunet_would_train_3d(federation):
    plan = merge_fingerprints({"mr": federation[0]["mr"]})
    assert "nnU-Net would train 3D; fedmeta trains 2D" in plan["choices"]["spacing"]["reason"]
    assert plan["run-config"]["ct-std"] == 0.0 and "no site has a CT channel" in plan["choices"]["ct-window"]["reason"]


def test_a_field_of_view_over_the_budget_coarsens_the_in_plane_spacing(federation):
    sites, _ = federation
    plan = merge_fingerprints({"ct-a": sites["ct-a"]}, max_image_size=16, model_levels=3)
    run = plan["run-config"]
    assert run["image-size"] == 16 and run["spacing-mm"] == pytest.approx(19.2 / 16)
    assert "above the budget of 16" in plan["choices"]["image-size"]["reason"]
    with pytest.raises(ValueError, match=r"max_image_size \(--max-image-size\) 20: must be a positive multiple of 8"):
        merge_fingerprints({"ct-a": sites["ct-a"]}, max_image_size=20)


def test_the_label_map_says_which_site_annotates_what(federation):
    sites, _ = federation
    plan = merge_fingerprints(sites)
    labels = plan["choices"]["labels"]
    assert labels["value"]["map"]["1"] == {"ct-a": "liver", "ct-b": "liver", "mr": "prostate"}
    assert labels["value"]["annotates"]["mr"] == {"1": "prostate"}
    assert labels["value"]["annotates"]["ct-a"] == {"1": "liver", "2": "tumour"}
    assert "value 1 means 'liver' at ct-a, 'liver' at ct-b, 'prostate' at mr" in labels["reason"]
    assert plan["run-config"]["num-classes"] == 3
    # one-channel sites of different kinds train one model on any one channel
    assert plan["run-config"]["channels"] == "" and "ct-a: CT" in plan["choices"]["channels"]["reason"]


def _two_channel(report, names=("T2", "ADC")):
    """``report`` (an MR site's) as if it declared ``names``: one MR channel's statistics each."""
    report = copy.deepcopy(report)
    report["channels"] = list(names)
    report["intensity"] = [copy.deepcopy(report["intensity"][0]) for _ in names]
    return report


def test_sites_with_different_channel_sets_are_refused_naming_them(federation):
    mr = federation[0]["mr"]
    with pytest.raises(ValueError, match=r"different channel sets \(prostate-a: T2, ADC; brain: FLAIR, T1w\).*Fix:"):
        merge_fingerprints({"prostate-a": _two_channel(mr), "brain": _two_channel(mr, ("FLAIR", "T1w"))})
    with pytest.raises(ValueError, match=r"prostate-a: T2, ADC; mr: T2"):
        merge_fingerprints({"prostate-a": _two_channel(mr), "mr": mr})
    # the reader matches channel names case-insensitively, and so does the plan
    plan = merge_fingerprints({"prostate-a": _two_channel(mr), "prostate-b": _two_channel(mr, ("adc", "T2"))})
    assert plan["run-config"]["channels"] == "T2,ADC" and plan["run-config"]["in-channels"] == 2
    assert "prostate-b stack theirs in this order" in plan["choices"]["channels"]["reason"]


def test_a_refused_fingerprint_names_the_site(federation):
    bad = copy.deepcopy(federation[0]["mr"])
    bad["cases"] = 0
    with pytest.raises(ValueError, match=r"site hospital-x: its fingerprint is refused: fingerprint field cases"):
        merge_fingerprints({"hospital-x": bad})


def test_write_plan_writes_a_preset_whose_plan_sha256_is_plan_json_s(federation, tmp_path):
    plan = merge_fingerprints(federation[0])
    paths = write_plan(plan, tmp_path / "plan")
    data = paths["plan"].read_bytes()
    assert json.loads(data) == plan
    overrides, _ = load_preset(str(paths["run-config"]))
    assert overrides == {**plan["run-config"], "plan-sha256": hashlib.sha256(data).hexdigest()}
    config = RunConfig.from_run_config(overrides)  # every key is the run config's, every value within its range
    assert config.plan_sha256 == overrides["plan-sha256"] and config.trajectory_hash() != RunConfig().trajectory_hash()
    with pytest.raises(OutputRefused, match="--overwrite"):
        write_plan(plan, tmp_path / "plan")
    write_plan(plan, tmp_path / "plan", overwrite=True)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("a colleague's notes")
    with pytest.raises(OutputRefused, match=r"holds files written by something other than fedmeta plan"):
        write_plan(plan, tmp_path / "notes")
    assert (tmp_path / "notes" / "mine.txt").read_text() == "a colleague's notes"
