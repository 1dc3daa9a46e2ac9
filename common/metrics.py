"""Segmentation scores as the field reports them: Dice per patient, over the whole volume, in the site's labels.

- **The site's label space.** A site scores only the foreground classes it declares (its
  ``dataset.json`` labels); a class it does not declare is background there, so a prediction of
  it counts as background. A site that merges CSF into background is scored on grey and white matter
  alone, and whether the model still predicts CSF cannot move its score.
- **Per patient, whole volume.** Dice is computed per declared class over every slice of one
  patient's volume, empty slices included (a false positive on a slice with no structure counts),
  then averaged over the classes, then over the patients. The worst patient is reported beside the
  mean, so one failed patient is not averaged away.
- **Never NaN.** A class absent from both the truth and the prediction of a patient scores 1 (the
  model was right that it is not there; BraTS scores empty-and-empty the same way); absent from the
  truth but predicted, 0. So every mean is over a fixed set of numbers, and every JSON is strict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch


def foreground_classes(label_names: Mapping[int, str] | None, num_classes: int,
                       labelled: Iterable[int] | None = None) -> list[int]:
    """The foreground classes a site is scored on: those it declares (all 1..C-1 when it declares none)
    and, given ``labelled`` (the classes its labels hold), that some patient actually has.

    A class declared but labelled in no patient cannot be scored: it would give 1 to every patient
    whose prediction also lacks it, and lift the mean for nothing.
    """
    declared = range(1, num_classes) if label_names is None else (int(v) for v in label_names)
    classes = sorted(c for c in declared if 0 < c < num_classes)
    if labelled is not None:
        present = set(labelled)
        classes = [c for c in classes if c in present]
    if not classes:
        raise ValueError(
            f"the site declares labels {sorted(label_names) if label_names is not None else 'none'} and no "
            f"foreground class among the model's 1..{num_classes - 1} is labelled in any of its patients; "
            "there is nothing to score. Fix dataset.json's 'labels' or the label files."
        )
    return classes


def to_label_space(prediction: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """``prediction`` (class indices) with every class outside ``classes`` set to background 0."""
    if prediction.numel() == 0:
        return prediction
    keep = torch.zeros(int(max(int(prediction.max()), *classes)) + 1, dtype=torch.bool, device=prediction.device)
    keep[list(classes)] = True
    return torch.where(keep[prediction], prediction, torch.zeros_like(prediction))


def patient_dice(prediction: torch.Tensor, truth: torch.Tensor, classes: Sequence[int]) -> dict[int, float]:
    """Dice per class of one patient's whole volume (integer maps of one shape, any number of dims).

    ``prediction`` is first mapped into the site's label space (:func:`to_label_space`); a class
    empty in both scores 1.0, empty in the truth alone 0.0.
    """
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and truth {tuple(truth.shape)} differ in shape.")
    if not classes:
        raise ValueError("classes is empty: name at least one foreground class to score.")
    prediction = to_label_space(prediction.long(), classes)
    scores = {}
    for c in classes:
        predicted, true = prediction == c, truth == c
        denominator = int(predicted.sum()) + int(true.sum())
        scores[int(c)] = 1.0 if denominator == 0 else 2.0 * int((predicted & true).sum()) / denominator
    return scores


def summarise_patients(per_patient: Mapping[str, Mapping[int, float]]) -> dict:
    """Mean over classes, then over patients; the worst patient; each class's mean over patients.

    Returns ``{"dice", "worst_patient_dice", "worst_patient", "dice_per_class", "per_patient",
    "patients"}`` with ``per_patient`` mapping each patient id to its mean over classes.
    """
    if not per_patient:
        raise ValueError("no patient to summarise; the site needs at least one evaluation patient.")
    means = {pid: sum(scores.values()) / len(scores) for pid, scores in per_patient.items()}
    worst = min(means, key=lambda pid: (means[pid], pid))
    classes = sorted({c for scores in per_patient.values() for c in scores})
    return {
        "dice": sum(means.values()) / len(means),
        "worst_patient_dice": means[worst],
        "worst_patient": worst,
        "dice_per_class": {str(c): sum(s[c] for s in per_patient.values()) / len(per_patient) for c in classes},
        "per_patient": dict(means),
        "patients": len(means),
    }


__all__ = ["foreground_classes", "patient_dice", "summarise_patients", "to_label_space"]
