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
    RUN_CONFIG_KEYS, check_image_budget, histogram_moments, histogram_percentile, merge_fingerprints, min_image_size,
    site_problem, weighted_median, write_plan,
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
    ([32.0, 96.0], [4, 4], 64.0),  # a tie between two equal sites: their mean, as np.median, not the lower one
    ([1.0, 2.0, 7.0], [2, 0, 2], 4.0),  # a value of weight 0 takes no part, even where the tie is
])
def test_weighted_median(values, weights, expected):
    assert weighted_median(values, weights) == expected


@pytest.mark.parametrize("seed", range(20))
def test_weighted_median_equals_numpys_median_of_the_repeated_values(seed):
    """Reference equivalence: sites weighted by cases are the cases' values pooled."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 7))
    values = rng.choice([0.7, 0.8, 1.0, 1.5, 3.0, 5.0], size=n).tolist()  # repeated values, as spacings are
    weights = rng.integers(1, 5, size=n).tolist()
    assert weighted_median(values, weights) == pytest.approx(np.median(np.repeat(values, weights)), abs=1e-12)


def test_weighted_median_refuses_weights_without_a_positive_one():
    with pytest.raises(ValueError, match=r"weights \[0, 0\] hold no positive weight"):
        weighted_median([1.0, 2.0], [0, 0])


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


@pytest.mark.parametrize("max_image_size, model_levels, words", [
    (20, 4, r"max_image_size \(--max-image-size\) 20: must be a multiple of 8 .* from 16 to 1024"),
    (8, 4, r"max_image_size \(--max-image-size\) 8: .*instance norm needs at least 2 pixels .* so 16 is the least"),
    (0, 4, r"max_image_size \(--max-image-size\) 0: .*Fix: e.g. --max-image-size 256"),
    (2048, 4, r"max_image_size \(--max-image-size\) 2048: .* to 1024"),
    (True, 4, r"max_image_size \(--max-image-size\) True"),
    (256, 1, r"model_levels \(--model-levels\) 1: must be an integer in \[2, 8\]"),
    (256, 9, r"model_levels \(--model-levels\) 9: must be an integer in \[2, 8\].*Fix: e.g. --model-levels 4"),
    (256, "4", r"model_levels \(--model-levels\) '4'"),
])
def test_an_image_budget_out_of_range_is_refused_naming_the_value_and_the_least(max_image_size, model_levels, words):
    with pytest.raises(ValueError, match=words):
        check_image_budget(max_image_size, model_levels)
    with pytest.raises(ValueError, match=words):  # the merge checks it again
        merge_fingerprints({"x": {}}, max_image_size=max_image_size, model_levels=model_levels)


def _with_field_of_view(report, mm):
    report = copy.deepcopy(report)
    report["field-of-view-mm"] = [mm, mm, report["field-of-view-mm"][2]]
    return report


def test_a_field_of_view_below_the_unets_least_image_is_raised_to_it_with_the_reason(federation):
    """0.02 mm voxels or a localiser: a field of view of 1.6 mm at 0.8 mm would be 2 pixels, rounded up to 8, and
    the UNet's deepest level 1 pixel, where instance norm fails in training."""
    report = _with_field_of_view(federation[0]["ct-a"], 1.6)
    for levels, least in ((4, 16), (3, 8), (5, 32)):
        plan = merge_fingerprints({"ct-a": report}, model_levels=levels)
        assert plan["run-config"]["image-size"] == least == min_image_size(levels)
        reason = plan["choices"]["image-size"]["reason"]
        assert f"raised to {least}, the least the UNet takes (instance norm needs 2 pixels a side after " \
               f"{levels - 1} halvings)" in reason
        RunConfig.from_run_config({**plan["run-config"], "model-levels": levels})  # the run config takes it
    assert check_image_budget(4, 2) == 2 and min_image_size(2) == 4  # 2 levels: 2 pixels after one halving
    plan = merge_fingerprints({"ct-a": federation[0]["ct-a"]})  # 24 pixels: nothing raised
    assert plan["run-config"]["image-size"] == 24 and "raised" not in plan["choices"]["image-size"]["reason"]


def test_two_equal_sites_plan_the_mean_field_of_view_and_the_reason_names_the_cropped_one(federation):
    mr = federation[0]["mr"]  # 1 mm in-plane, 2 cases
    plan = merge_fingerprints({"narrow": _with_field_of_view(mr, 32.0), "wide": _with_field_of_view(mr, 96.0)})
    assert plan["run-config"]["image-size"] == 64  # 64 mm at 1 mm: not the narrow site's 32 mm
    reason = plan["choices"]["image-size"]["reason"]
    assert "field of view 64.0 mm" in reason
    assert "Cropped: the median in-plane field of view of wide 96.0 mm (50 % more) exceeds the image's 64.0 mm " \
           "side by more than 25 %" in reason and "narrow 32" not in reason
    # within a quarter of the image's side: nothing said
    plan = merge_fingerprints({"a": _with_field_of_view(mr, 60.0), "b": _with_field_of_view(mr, 70.0)})
    assert plan["run-config"]["image-size"] == 72 and "Cropped" not in plan["choices"]["image-size"]["reason"]


def _ct_quantiles(report, low, high, outside=0.0):
    """``report`` (a CT site's) as if its foreground spanned [low, high] (quantiles, mean and std to match)."""
    report = copy.deepcopy(report)
    stats = report["intensity"][0]
    stats["quantiles"] = np.linspace(low, high, len(stats["quantiles"])).tolist()
    stats["mean"], stats["std"] = (low + high) / 2, (high - low) / 4
    stats["fraction-outside-hu-range"] = outside
    return report


@pytest.mark.parametrize("low, high, outside, words", [
    (0.0, 1.0, 0.0, r"quantiles are 0.1 and 0.9, within \[0, 1.5\]: values scaled to 0..1, not HU"),
    (38.0, 42.0, 0.0, r"quantiles are 38.4 and 41.6, within 5 HU of each other"),
    (-1024.0, -1024.0, 1.0, r"every voxel lies outside the \[-1024, 3071\] HU a CT holds"),
])
def test_a_ct_site_whose_values_are_not_hounsfield_units_is_refused_by_name(federation, low, high, outside, words):
    sites, _ = federation
    bad = _ct_quantiles(sites["ct-b"], low, high, outside)
    with pytest.raises(ValueError, match=r"site ct-b: its CT channel 'CT' does not hold Hounsfield units: "
                       r"(its foreground's 0.5 and 99.5 % )?" + words
                       + r".*Fix: re-export the site's CT in HU .*`fedmeta check-data`"):
        merge_fingerprints({"ct-a": sites["ct-a"], "ct-b": bad})
    assert site_problem("ct-a", sites["ct-a"]) is None  # a CT in HU passes
    assert site_problem("ct-a", _ct_quantiles(sites["ct-a"], -100.0, 200.0)) is None


def test_a_site_with_fewer_than_two_usable_cases_is_refused_by_name(federation):
    one = copy.deepcopy(federation[0]["mr"])
    one["cases"] = 1
    one["label-fractions"] = {key: {**entry, "case-fraction": 1.0} for key, entry in one["label-fractions"].items()}
    with pytest.raises(ValueError, match=r"site hospital-1: only 1 usable case\(s\) \(0 skipped\); support and "
                                         r"query come from different patients, so a site needs at least 2. Fix: add"):
        merge_fingerprints({"mr": federation[0]["mr"], "hospital-1": one})


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
