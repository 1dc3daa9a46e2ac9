"""The metric against hand-counted volumes: per patient, whole volume, the site's own labels, never NaN."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedmeta.common.jsonio import dumps_strict, loads_strict
from fedmeta.common.metrics import foreground_classes, patient_dice, summarise_patients, to_label_space


def _volume(slices: int = 4, side: int = 4) -> torch.Tensor:
    return torch.zeros(slices, side, side, dtype=torch.long)


def test_dice_counts_every_slice_of_the_volume_false_positives_on_empty_slices_included():
    truth = _volume()
    truth[1, :2, :2] = 1  # 4 voxels of class 1, all on slice 1; slices 0, 2, 3 are empty
    prediction = truth.clone()
    prediction[3, 0, 0] = 1  # a false positive on an empty slice: 2*4 / (5 + 4)
    assert patient_dice(prediction, truth, [1]) == {1: pytest.approx(8 / 9)}
    # Scored only on the slices with structure, the same prediction would have looked perfect.
    assert patient_dice(prediction[1:2], truth[1:2], [1]) == {1: 1.0}


def test_a_site_that_merges_two_classes_is_scored_in_its_own_labels():
    truth = _volume()
    truth[0, :, :2] = 2  # grey matter, 8 voxels; this site labels CSF as background
    truth[0, :, 2:] = 3  # white matter, 8 voxels
    classes = foreground_classes({0: "background (including CSF)", 2: "grey matter", 3: "white matter"}, 4)
    assert classes == [2, 3]
    prediction = truth.clone()
    prediction[2, :2, :2] = 1  # the model predicts CSF, a class this site does not have
    # CSF is background at this site: the stray prediction changes nothing, and no score is NaN.
    assert patient_dice(prediction, truth, classes) == {2: 1.0, 3: 1.0}
    assert to_label_space(prediction, classes)[2].sum() == 0
    # Predicting or not predicting CSF leaves the site's mean where it is.
    without_csf = truth.clone()
    assert patient_dice(without_csf, truth, classes) == patient_dice(prediction, truth, classes)


def test_empty_and_empty_is_one_and_predicted_but_absent_is_zero():
    truth = _volume()
    truth[0, 0, :] = 1
    prediction = truth.clone()
    assert patient_dice(prediction, truth, [1, 2]) == {1: 1.0, 2: 1.0}  # class 2: absent, not predicted
    prediction[3, 3, 3] = 2
    assert patient_dice(prediction, truth, [1, 2]) == {1: 1.0, 2: 0.0}  # class 2: absent, predicted once


def test_mean_over_classes_then_patients_with_the_worst_patient():
    per_patient = {
        "p1": {1: 1.0, 2: 0.5},  # mean 0.75
        "p2": {1: 0.25, 2: 0.25},  # mean 0.25: the worst
        "p3": {1: 1.0, 2: 1.0},  # mean 1.0
    }
    summary = summarise_patients(per_patient)
    assert summary["dice"] == pytest.approx((0.75 + 0.25 + 1.0) / 3)
    assert summary["worst_patient"] == "p2" and summary["worst_patient_dice"] == pytest.approx(0.25)
    assert summary["dice_per_class"] == {"1": pytest.approx(0.75), "2": pytest.approx(1.75 / 3)}
    assert summary["per_patient"] == {"p1": 0.75, "p2": 0.25, "p3": 1.0} and summary["patients"] == 3
    # One failed patient is visible: pooling the voxels of all three would have hidden it.
    assert summary["worst_patient_dice"] < summary["dice"] - 0.4


def test_a_patient_whose_slices_are_mostly_empty():
    truth = torch.zeros(20, 8, 8, dtype=torch.long)
    truth[10, 2:6, 2:6] = 3  # 16 voxels on one slice of twenty
    prediction = torch.zeros_like(truth)
    prediction[10, 2:6, 2:4] = 3  # 8 found
    prediction[0:19:6, 0, 0] = 3  # 4 false positives spread over empty slices (0, 6, 12, 18)
    assert patient_dice(prediction, truth, [1, 2, 3]) == {1: 1.0, 2: 1.0, 3: pytest.approx(2 * 8 / (12 + 16))}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: patient_dice(_volume(), _volume(3), [1]), "differ in shape"),
        (lambda: patient_dice(_volume(), _volume(), []), "classes is empty"),
        (lambda: summarise_patients({}), "no patient to summarise"),
        (lambda: foreground_classes({0: "background"}, 4), "no foreground class"),
    ],
)
def test_bad_arguments_are_refused_with_their_reason(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_undeclared_labels_score_every_foreground_class():
    assert foreground_classes(None, 4) == [1, 2, 3]
    assert foreground_classes({0: "bg", 1: "a", 7: "beyond the model"}, 4) == [1]


def test_strict_json_writes_null_with_a_reason_and_refuses_nan_on_reading():
    text = dumps_strict({"mean": float("nan"), "ok": 0.5, "rows": [1.0, float("inf")]})
    parsed = loads_strict(text)
    assert parsed["mean"] is None and parsed["ok"] == 0.5 and parsed["rows"] == [1.0, None]
    assert [n["path"] for n in parsed["null_values"]] == ["$.mean", "$.rows[1]"]
    assert all(n["reason"] for n in parsed["null_values"])
    with pytest.raises(ValueError, match="NaN is not JSON"):
        loads_strict(json.dumps({"x": math.nan}))
