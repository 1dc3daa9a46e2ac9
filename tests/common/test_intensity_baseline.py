"""The intensity baseline: the best per-site intensity lookup, fitted on the support slices and scored as a model is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedmeta.common.data import DataConfig, SiteDataset
from fedmeta.common.intensity_baseline import fit_intensity_classifier, score_intensity_baseline
from fedmeta.common.synth import load_manifest


def _stripes(values: list[float], labels: list[int], k: int = 2, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """k images [k, 1, size, size] of vertical stripes: stripe i has intensity values[i] and label labels[i]."""
    width = size // len(values)
    x = torch.zeros(k, 1, size, size, dtype=torch.float64)
    y = torch.zeros(k, size, size, dtype=torch.long)
    for i, (v, c) in enumerate(zip(values, labels)):
        x[:, 0, :, i * width:(i + 1) * width] = v
        y[:, :, i * width:(i + 1) * width] = c
    return x, y


def test_separable_intensities_are_segmented_exactly_and_thresholds_read_in_order():
    x, y = _stripes([0.0, 0.3, 0.6, 0.9], [0, 1, 2, 3])
    classifier = fit_intensity_classifier(x, y, num_classes=4, bins=16)
    assert torch.equal(classifier.predict(x), y)
    runs = classifier.thresholds
    assert [r["label"] for r in runs] == [0, 1, 2, 3]
    assert runs[0]["low"] == float("-inf") and runs[-1]["high"] == float("inf")
    assert all(a["high"] == b["low"] for a, b in zip(runs, runs[1:]))
    # Empty bins between the stripes take the nearest labelled bin: 0.25 is nearer 0.3 (class 1) than 0.0.
    assert classifier.predict(torch.full((1, 1, 2, 2), 0.25)).unique().tolist() == [1]
    assert classifier.predict(torch.full((1, 1, 2, 2), 5.0)).unique().tolist() == [3]  # beyond the range: end bin
    assert "<" in classifier.describe()


def test_two_classes_at_one_intensity_cannot_both_be_found():
    # Classes 2 and 3 share the intensity 0.6 (3 in twice the pixels of 2): the lookup must give that
    # intensity one label, the more frequent, and class 2 is never predicted.
    x, y = _stripes([0.0, 0.6, 0.6, 0.6], [0, 2, 3, 3])
    prediction = fit_intensity_classifier(x, y, num_classes=4, bins=32).predict(x)
    assert 2 not in prediction.unique().tolist()
    assert (prediction == 3).sum() == (y >= 2).sum()


@pytest.mark.parametrize(
    "x_shape, y_shape, kwargs, match",
    [((2, 1, 4, 4), (2, 4, 5), {}, "must be"),
     ((2, 2, 4, 4), (2, 4, 4), {}, "must be"),
     ((0, 1, 4, 4), (0, 4, 4), {}, "empty"),
     ((2, 1, 4, 4), (2, 4, 4), {"bins": 0}, "bins=0"),
     ((2, 1, 4, 4), (2, 4, 4), {"num_classes": 1}, "num_classes=1"),
     ((2, 1, 4, 4), (2, 4, 4), {"smoothing": -1.0}, "smoothing")],
)
def test_bad_arguments_are_refused(x_shape, y_shape, kwargs, match):
    arguments = {"num_classes": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        fit_intensity_classifier(torch.rand(x_shape), torch.zeros(y_shape, dtype=torch.long), **arguments)
    with pytest.raises(ValueError, match="outside 0..3"):
        fit_intensity_classifier(torch.rand(2, 1, 4, 4), torch.full((2, 4, 4), 4), num_classes=4)



@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_support_intensity_is_refused_not_binned(bad):
    x = torch.rand(2, 1, 4, 4)
    x[0, 0, 0, 0] = bad
    y = (x[:, 0] > 0.5).long()
    with pytest.raises(ValueError, match="1 non-finite intensity value"):
        fit_intensity_classifier(x, y, num_classes=4)


def test_a_constant_support_of_one_class_labels_everything_that_class():
    classifier = fit_intensity_classifier(torch.full((2, 1, 4, 4), 0.5), torch.full((2, 4, 4), 2), num_classes=4)
    assert classifier.predict(torch.randn(1, 1, 4, 4) * 10).unique().tolist() == [2] and classifier.describe() == "2"

def test_on_the_tissue_generation_intensity_nearly_decides_the_label(smoke_federation: Path):
    # The smoke federation is the tissue generation: a label there is close to a function of intensity, so
    # the lookup fitted on 5 slices is high on grey and white matter wherever both are labelled.
    config = DataConfig(image_size=(64, 64), spacing=(3.0, 3.0, 3.0), num_classes=4)
    info = next(s for s in load_manifest(smoke_federation).train_sites if s.params["scanner"]["sequence"] == "T2w")
    site = SiteDataset.load(info.path, config)
    score = score_intensity_baseline(site, k=5, seed=0, num_classes=4)
    assert score["k"] == 5 and score["patients"] >= 1 and score["eval_slices"] > 0
    assert score["dice_per_class"]["2"] > 0.75 and score["dice_per_class"]["3"] > 0.7
    again = score_intensity_baseline(site, k=5, seed=0, num_classes=4)
    assert again["dice"] == score["dice"]  # seeded: the same support and patients
    only_gm = score_intensity_baseline(site, k=5, seed=0, num_classes=4, classes=[2])
    assert set(only_gm["dice_per_class"]) == {"2"}
