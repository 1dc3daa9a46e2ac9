"""How many adaptation steps a new site takes, chosen from its k labelled slices alone (``--steps auto``).

A hospital that adapts the consortium's θ has only its k labelled support slices: no evaluation patient
may tell it when to stop. Read at one fixed count ("10 steps"), a comparison measures which method's
adaptation happens to suit that count — on real data the leader changed with the count, and fine-tuning
a meta-learned start could lose what it began with. So the count is chosen the way a hospital can:

- **cross-validation over the support set**: the k slices are dealt into ``min(k, 5)`` folds; each fold
  adapts on the other slices along one trajectory and is scored, at every candidate count, on its own
  slices (Dice in the site's classes, pooled over the fold's slices). With one slice there is nothing to
  hold out, so its two halves (left and right of the slice) are the folds: adapt on one, score the other;
- **0 steps is a candidate**: θ as it is (or as its learner prepares it: prototypes, a generated head);
- **the highest mean check Dice**, the fewest steps among equals. On the anatomy federation's validation
  sites (issue 27; docs/results-benchmark.md) it beat the one-standard-error rule (Breiman et al. 1984;
  Hastie et al., *Elements of Statistical Learning* §7.10: the fewest steps within one standard error of
  the best), which with folds of one or two slices is so wide that it kept adaptation too short: better in
  10 of 16 site × k × method cases, equal in 4, worse in 2, +0.02 Dice on average. That rule's count is still
  computed and recorded (``StepChoice.one_se``), so the choice can be judged again on other data.

The chosen count is then run on all k slices. The choice costs ``folds × max(candidates)`` inner
steps on at most k − 1 slices (or half a slice) each: a few times the adaptation itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedmeta.common.losses import one_hot
from fedmeta.common.meta import StepSize, adaptation_trajectory
from fedmeta.common.metrics import to_label_space

AUTO = "auto"
# Candidate step counts: every count a comparison reports (0, 1, 5, 10, 20) and the ones between that a
# hospital might settle on. Dense near 0, where a meta-learned start changes fastest.
CANDIDATE_STEPS = (0, 1, 2, 3, 5, 7, 10, 15, 20)
MAX_FOLDS = 5
RULE = "highest-check-dice"  # the fewest steps among the highest mean check Dice


@dataclass(frozen=True)
class StepChoice:
    """The count :func:`choose_steps` chose and the evidence it chose it on (strict-JSON record: :meth:`record`)."""

    steps: int
    candidates: tuple[int, ...]
    check_dice: dict[int, float]  # mean over folds of each fold's pooled check Dice, per candidate
    check_dice_se: dict[int, float]  # its standard error over folds (0 with one fold)
    folds: int
    split: str  # "slices" (held-out support slices) | "half-slice" (k = 1: the slice's two halves)
    best: int  # the candidate with the highest mean check Dice (the fewest steps among equals): what is chosen
    one_se: int  # the fewest steps within one standard error of the best: the rule not taken, recorded
    per_fold: list[dict[int, float]] = field(default_factory=list)

    def reason(self) -> str:
        """One line a model card or a log can carry: what was chosen and why."""
        held = "each half of the one labelled slice" if self.split == "half-slice" else "held-out support slices"
        return (f"{self.steps} step(s) chosen from {list(self.candidates)} by {self.folds}-fold cross-validation on "
                f"{held}: the highest mean check Dice, {self.check_dice[self.steps]:.3f} ({self.candidates[0]} steps: "
                f"{self.check_dice[self.candidates[0]]:.3f})")

    def record(self) -> dict[str, Any]:
        return {
            "chosen_steps": self.steps,
            "rule": RULE,
            "split": self.split,
            "folds": self.folds,
            "candidates": list(self.candidates),
            "check_dice": {str(s): round(d, 4) for s, d in self.check_dice.items()},
            "check_dice_se": {str(s): round(d, 4) for s, d in self.check_dice_se.items()},
            "one_standard_error_steps": self.one_se,
            "reason": self.reason(),
        }


def candidate_steps(max_steps: int | None = None) -> tuple[int, ...]:
    """:data:`CANDIDATE_STEPS` up to ``max_steps`` (which joins them when it is not one)."""
    if max_steps is None:
        return CANDIDATE_STEPS
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
        raise ValueError(f"max_steps={max_steps!r}: the most steps auto may choose, an integer >= 0.")
    return tuple(sorted({s for s in CANDIDATE_STEPS if s <= max_steps} | {max_steps}))


def support_folds(support_x: torch.Tensor, support_y: torch.Tensor, max_folds: int = MAX_FOLDS, multiple: int = 1):
    """``(split, [(adapt_x, adapt_y, check_x, check_y), ...])`` for the k support slices.

    k ≥ 2: slice i goes to fold i mod min(k, max_folds) (the support set's order is already the seeded
    draw). k = 1: the slice's left and right halves, each adapting for the other; a fully convolutional
    network takes half a slice as it takes a whole one, when the half's width is a multiple of what the
    network downsamples by (``multiple``: a UNet's product of strides): each half is cut to the largest
    such width, and a slice too narrow for any is refused with the fix.
    """
    k = len(support_x)
    if k == 0:
        raise ValueError("no support slice: choosing steps needs at least one labelled slice.")
    if k == 1:
        width = support_x.shape[-1]
        multiple = max(1, int(multiple))
        half = width // 2 // multiple * multiple
        if half == 0:
            raise ValueError(f"with one support slice, --steps auto checks each half of it on the other, and a slice "
                             f"{width} pixels wide has no half {multiple} or more pixels wide (a multiple of "
                             f"{multiple}, what the network takes). Fix: give a fixed --steps, or --shots 2 or more.")
        left = (support_x[..., :half], support_y[..., :half])
        right = (support_x[..., half:2 * half], support_y[..., half:2 * half])
        return "half-slice", [(*left, *right), (*right, *left)]
    n = min(k, max_folds)
    folds = []
    for f in range(n):
        check = torch.tensor([i % n == f for i in range(k)])
        folds.append((support_x[~check], support_y[~check], support_x[check], support_y[check]))
    return "slices", folds


def pooled_dice(prediction: torch.Tensor, truth: torch.Tensor, classes: Sequence[int]) -> float:
    """Dice per class pooled over every pixel of ``prediction``/``truth`` (the check slices of a fold), mean over
    the classes present in either; 1.0 when none is (an empty check region predicted empty)."""
    prediction = to_label_space(prediction.long(), classes)
    scores = []
    for c in classes:
        p, t = prediction == c, truth == c
        total = int(p.sum()) + int(t.sum())
        if total:
            scores.append(2.0 * int((p & t).sum()) / total)
    return sum(scores) / len(scores) if scores else 1.0


def choose_steps(
    model: torch.nn.Module,
    params,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    *,
    inner_lr: StepSize,
    loss_fn,
    num_classes: int,
    classes: Sequence[int],
    inner_params: Sequence[str] | None = None,
    candidates: Sequence[int] = CANDIDATE_STEPS,
    max_folds: int = MAX_FOLDS,
    variant=None,
    progress: Callable[[str], None] | None = None,
) -> StepChoice:
    """The number of adaptation steps for this support set (module docstring): ``support_y`` an integer label
    map ``[k, H, W]``; the other arguments as :func:`fedmeta.common.adaptation.adaptation_curve` takes them.

    A fold whose adapted weights stop being finite scores 0 from that step on (that count diverged there).
    ``variant``: a :class:`fedmeta.common.adaptation_variants.Variant` whose trajectory and prediction each fold
    uses, so the count is chosen for the adaptation that will run (None: plain fine-tuning).
    """
    candidates = tuple(sorted(set(int(s) for s in candidates)))
    if not candidates or candidates[0] < 0:
        raise ValueError(f"candidates={list(candidates)} must be step counts >= 0, e.g. {list(CANDIDATE_STEPS)}.")
    if not classes:
        raise ValueError("classes is empty: name the site's foreground classes to score the check slices on.")
    # A UNet (every fedmeta network is one) takes widths that are multiples of its strides' product.
    multiple = math.prod(int(v) for v in getattr(model, "strides", ()) or (1,))
    split, folds = support_folds(support_x, support_y.long(), max_folds, multiple)
    dtype = next(iter(params.values())).dtype
    per_fold: list[dict[int, float]] = []
    for fold, (adapt_x, adapt_y, check_x, check_y) in enumerate(folds, start=1):
        if progress is not None:
            progress(f"choosing steps: fold {fold}/{len(folds)} ({candidates[-1]} steps on {len(adapt_x)} "
                     f"{'half-slice' if split == 'half-slice' else 'slice(s)'})")
        scores: dict[int, float] = {}
        adapt_along = adaptation_trajectory if variant is None else variant.trajectory
        trajectory = adapt_along(model, params, adapt_x, one_hot(adapt_y, num_classes, dtype),
                                 inner_steps=candidates[-1], inner_lr=inner_lr, loss_fn=loss_fn,
                                 inner_params=inner_params)
        prepared = None
        for done, adapted in enumerate(trajectory):
            prepared = adapted if prepared is None else prepared
            if done not in candidates:
                continue
            if not all(bool(torch.isfinite(t).all()) for t in adapted.values()):
                scores.update({s: 0.0 for s in candidates if s >= done})
                break
            with torch.no_grad():
                logits = torch.func.functional_call(model, adapted, (check_x,)) if variant is None \
                    else variant.logits(model, prepared, adapted, check_x)
            scores[done] = pooled_dice(logits.argmax(dim=1), check_y, classes)
        per_fold.append(scores)
    mean = {s: sum(f[s] for f in per_fold) / len(per_fold) for s in candidates}
    se = {s: _standard_error([f[s] for f in per_fold]) for s in candidates}
    best = max(candidates, key=lambda s: (mean[s], -s))
    one_se = min(s for s in candidates if mean[s] >= mean[best] - se[best])
    return StepChoice(steps=best, candidates=candidates, check_dice=mean, check_dice_se=se, folds=len(folds),
                      split=split, best=best, one_se=one_se, per_fold=per_fold)


def _standard_error(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return 0.0
    m = sum(values) / n
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


__all__ = ["AUTO", "CANDIDATE_STEPS", "MAX_FOLDS", "RULE", "StepChoice", "candidate_steps", "choose_steps",
           "pooled_dice", "support_folds"]
