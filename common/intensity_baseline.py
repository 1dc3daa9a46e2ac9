"""The intensity baseline: the best labelling any set of per-site intensity thresholds gives, fitted on the k support slices.

A benchmark whose labels follow from intensity is measured against this: a site's k labelled support
slices give a histogram of (normalised) intensity per class over ``bins`` bins; each bin is labelled with
its most frequent class (counts Laplace-smoothed, so ties go to the lower class), and a bin no support
voxel fell in takes the label of the nearest bin one did. That lookup is every intensity-threshold
classifier at once (an Otsu-like baseline that may read the support labels), so a model that does not
beat it has learned nothing but a threshold.

Scored exactly the way :func:`fedmeta.common.adaptation.score_site` scores a model: the same support
slices (:func:`fedmeta.common.data.adaptation_support`), the same evaluation patients
(:func:`fedmeta.common.adaptation.site_patients`), Dice per patient over the whole volume in the site's
declared classes (:mod:`fedmeta.common.metrics`), so its number sits beside the benchmark's rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedmeta.common.adaptation import site_patients
from fedmeta.common.data import SiteDataset, adaptation_support
from fedmeta.common.metrics import foreground_classes, patient_dice, summarise_patients


@dataclass(frozen=True)
class IntensityClassifier:
    """A lookup from intensity to label: ``bins`` equal bins between ``low`` and ``high`` (values outside
    fall in the end bins), each with its label."""

    low: float
    high: float
    bin_labels: Tensor  # int64 [bins]
    num_classes: int

    @property
    def bins(self) -> int:
        return int(self.bin_labels.numel())

    def predict(self, x: Tensor) -> Tensor:
        """Labels of images ``x`` [N, 1, H, W] (or any [N, 1, ...]): int64 [N, H, W]."""
        if x.dim() < 3 or x.shape[1] != 1:
            raise ValueError(f"x has shape {tuple(x.shape)}; give [N, 1, H, W] images of one channel.")
        return self.bin_labels.to(x.device)[self._bin(x[:, 0])]

    def _bin(self, values: Tensor) -> Tensor:
        width = (self.high - self.low) / self.bins
        index = torch.floor((values.double() - self.low) / width).long()
        return index.clamp(0, self.bins - 1)

    @property
    def thresholds(self) -> list[dict[str, float | int]]:
        """The lookup as intensity intervals, one per run of bins with the same label, in increasing
        intensity: ``[{"low", "high", "label"}, ...]`` (the first starts at -inf, the last ends at +inf)."""
        labels = self.bin_labels.tolist()
        width = (self.high - self.low) / self.bins
        runs: list[dict[str, float | int]] = []
        for i, label in enumerate(labels):
            if runs and runs[-1]["label"] == label:
                runs[-1]["high"] = self.low + (i + 1) * width
            else:
                runs.append({"low": self.low + i * width, "high": self.low + (i + 1) * width, "label": int(label)})
        runs[0]["low"], runs[-1]["high"] = float("-inf"), float("inf")
        return runs

    def describe(self) -> str:
        """The thresholds in one line, e.g. ``"0 < 0.12 <= 1 < 0.48 <= 2 < 0.71 <= 3"``."""
        runs = self.thresholds
        return " ".join([str(runs[0]["label"])] + [f"< {r['low']:.3g} <= {r['label']}" for r in runs[1:]])


def fit_intensity_classifier(support_x: Tensor, support_y: Tensor, num_classes: int, bins: int = 128,
                             smoothing: float = 1.0) -> IntensityClassifier:
    """The best intensity lookup for the support slices: ``support_x`` [k, 1, H, W], ``support_y`` [k, H, W]
    (class indices in 0..num_classes-1); ``bins`` equal bins between the support's lowest and highest value;
    ``smoothing`` is added to every class's count in every bin (Laplace) before the most frequent is taken."""
    if support_x.dim() < 3 or support_x.shape[1] != 1 or support_x.shape[:1] + support_x.shape[2:] != support_y.shape:
        raise ValueError(f"support_x {tuple(support_x.shape)} and support_y {tuple(support_y.shape)} must be "
                         "[k, 1, H, W] and [k, H, W].")
    if support_x.numel() == 0:
        raise ValueError("the support set is empty; give at least one labelled slice.")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins={bins!r} must be a positive integer, e.g. 128.")
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be at least 2 (background and one structure).")
    labels = support_y.reshape(-1).long()
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"support_y holds classes {int(labels.min())}..{int(labels.max())}, outside 0..{num_classes - 1}.")
    if smoothing < 0:
        raise ValueError(f"smoothing={smoothing} must be >= 0.")
    values = support_x[:, 0].reshape(-1).double()
    if not bool(torch.isfinite(values).all()):  # NaN put every voxel in bin 0, inf made every bin infinitely wide
        bad = int((~torch.isfinite(values)).sum())
        raise ValueError(f"the support slices hold {bad} non-finite intensity value(s) (NaN or infinity): no threshold "
                         "can be fitted; check the site's images (fedmeta validate) before scoring.")
    low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1.0  # a constant support: one value, every bin the same
    probe = IntensityClassifier(low, high, torch.zeros(bins, dtype=torch.long), num_classes)
    index = probe._bin(values)
    counts = torch.zeros(bins, num_classes, dtype=torch.float64)
    counts.index_put_((index, labels), torch.ones_like(values), accumulate=True)
    bin_labels = (counts + smoothing).argmax(dim=1)
    seen = counts.sum(dim=1) > 0
    if not bool(seen.all()):  # an empty bin takes the nearest bin's label that some support voxel fell in
        seen_at = torch.nonzero(seen).flatten()
        nearest = (torch.arange(bins)[:, None] - seen_at[None, :]).abs().argmin(dim=1)
        bin_labels = bin_labels[seen_at][nearest]
    return IntensityClassifier(low, high, bin_labels, num_classes)


def score_intensity_baseline(site: SiteDataset, k: int, seed: int, num_classes: int,
                             classes: Sequence[int] | None = None, max_images: int = 0,
                             bins: int = 128) -> dict[str, Any]:
    """The intensity baseline's Dice on a site at k shots, as ``score_site`` scores a model there.

    Fits on ``adaptation_support(site, k, seed)`` and scores every evaluation patient of
    ``site_patients(site, seed, max_images)``, whole volume, in ``classes`` (default: the site's declared
    and labelled foreground classes, :func:`fedmeta.common.metrics.foreground_classes`). Returns
    :func:`fedmeta.common.metrics.summarise_patients`' summary plus ``k``, ``bins``, ``eval_slices`` and
    ``thresholds`` (the fitted lookup, :attr:`IntensityClassifier.thresholds`).
    """
    if classes is None:
        classes = foreground_classes(site.label_names, num_classes, site.labelled_classes)
    support_x, support_y = adaptation_support(site, k, seed=seed)
    classifier = fit_intensity_classifier(support_x, support_y, num_classes, bins)
    patients = site_patients(site, seed, max_images)
    per_patient = {pid: patient_dice(classifier.predict(x), y, classes) for pid, x, y in patients}
    return {**summarise_patients(per_patient), "k": k, "bins": bins,
            "eval_slices": sum(len(x) for _, x, _ in patients), "thresholds": classifier.thresholds}


__all__ = ["IntensityClassifier", "fit_intensity_classifier", "score_intensity_baseline"]
