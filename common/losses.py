"""The segmentation loss, which works inside torch.func transforms (scores: fedmeta.common.metrics).

The training loss is MONAI's Dice + cross-entropy on one-hot targets. MONAI's ``to_onehot_y=True``
path scatters in place, which ``torch.func.vmap`` refuses, so targets are one-hot encoded once,
outside any transform, by :func:`one_hot`.
"""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss as _MonaiDiceCELoss


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
