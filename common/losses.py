"""Segmentation loss and metrics that work inside torch.func transforms.

The training loss is MONAI's Dice + cross-entropy on one-hot targets. MONAI's ``to_onehot_y=True``
path scatters in place, which ``torch.func.vmap`` refuses, so targets are one-hot encoded once,
outside any transform, by :func:`one_hot`.
"""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss as _MonaiDiceCELoss
from monai.metrics import DiceMetric


def one_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Label map ``[B, *spatial]`` (integers) -> one-hot ``[B, C, *spatial]`` of ``dtype``.

    Raises a ValueError naming the offending values when a label lies outside ``0..num_classes-1``.
    """
    if labels.is_floating_point():
        if not torch.equal(labels, labels.round()):
            raise ValueError("labels must hold integer class indices; got non-integer floating values.")
        labels = labels.long()
    if labels.numel():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            found = sorted(int(v) for v in torch.unique(labels) if v < 0 or v >= num_classes)
            raise ValueError(
                f"label values {found} lie outside the model's classes 0..{num_classes - 1}; "
                "remap the labels or raise num_classes (model out_channels)."
            )
    return torch.nn.functional.one_hot(labels.long(), num_classes).movedim(-1, 1).to(dtype)


class DiceCELoss:
    """Dice + cross-entropy for logits ``[B, C, *spatial]`` against one-hot targets of the same shape.

    A thin wrapper over MONAI's ``DiceCELoss(softmax=True)``: Dice is computed per image and class
    (background included, so a site whose labels merge a class into background still trains) and
    averaged; cross-entropy takes the class index from the one-hot target.
    """

    def __init__(self, num_classes: int, *, lambda_dice: float = 1.0, lambda_ce: float = 1.0):
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} must be >= 2 (background and a structure).")
        self.num_classes = num_classes
        self._loss = _MonaiDiceCELoss(
            softmax=True, to_onehot_y=False, lambda_dice=lambda_dice, lambda_ce=lambda_ce
        )

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.shape != logits.shape:
            raise ValueError(
                f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}; "
                "pass one-hot targets made with fedmeta.common.losses.one_hot(labels, num_classes)."
            )
        return self._loss(logits, target)


@torch.no_grad()
def dice_per_class(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice of the arg-max prediction per foreground class, pooled over the whole batch.

    logits ``[B, C, *spatial]``, labels ``[B, *spatial]`` integers. Returns ``[C-1]`` (background
    excluded); a class absent from both prediction and truth gives NaN, so callers average with
    ``nanmean``. The batch is pooled into one volume (MONAI's DiceMetric over ``[1, C, B*H, W]``) so
    slices with a tiny structure do not dominate the score, as a per-slice mean would let them.
    """
    prediction = one_hot(logits.argmax(dim=1), num_classes)
    truth = one_hot(labels, num_classes)
    # [B, C, H, W] -> [1, C, B*H, W]: one pooled image.
    prediction = prediction.movedim(0, 1).flatten(1, 2).unsqueeze(0)
    truth = truth.movedim(0, 1).flatten(1, 2).unsqueeze(0)
    # ignore_empty=False: a class the site never labels but the model predicts scores 0 (MONAI's
    # ignore_empty=True would hide exactly the error a different labelling protocol provokes).
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    dice = metric(prediction, truth)[0].float()
    spatial = tuple(range(2, truth.ndim))
    absent_from_both = (truth.sum(dim=spatial) == 0)[0, 1:] & (prediction.sum(dim=spatial) == 0)[0, 1:]
    return torch.where(absent_from_both, torch.full_like(dice, float("nan")), dice)


def mean_dice(per_class: torch.Tensor) -> float:
    """Mean over the classes that were scored (NaN classes skipped); NaN if none was."""
    return float(torch.nanmean(per_class)) if per_class.numel() else float("nan")
