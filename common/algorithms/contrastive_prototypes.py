"""Prototypes with a contrastive (Siamese) objective on the pixel embedding: the prototype learner
(:mod:`fedmeta.common.algorithms.prototypes`, PANet) whose query loss adds λ times a margin loss over pairs of
query pixels (Hadsell, Chopra & LeCun 2006, "Dimensionality reduction by learning an invariant mapping"):

    L_pair = ½·d²                      for two pixels of the same class,
             ½·max(0, m − d)²          for two pixels of different classes,

with d the Euclidean distance between the two pixels' L2-normalised embeddings (the cosine space the prototypes
match in, so d ∈ [0, 2] and d² = 2 − 2·cos). The prototype loss pulls each pixel towards its class's support
mean; the pair loss asks the embedding itself to keep classes apart by a margin, whatever the support set —
the metric-learning family's answer to an embedding that fine-tuning on a few slices can bend (issue 27).

Pairs: ``PIXELS`` query pixels are drawn, class-balanced (each class present gets an equal share of the draw),
with a generator seeded by :data:`PAIR_SEED`, so the draw depends on the labels alone: the loss is a
deterministic function of θ (finite differences and a bitwise resume hold), and every pair among the drawn
pixels counts. Adaptation at a new site is the prototype learner's, unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from fedmeta.common import protocol
from fedmeta.common.algorithms.prototypes import PROTOTYPE_LOG_SCALE, PROTOTYPES, PrototypeUNet, Prototypes, \
    in_support_label_space, prototype_logits

# λ: the pair loss is an auxiliary term (at most ½·m² per pair), kept below the prototype loss it regularises.
CONTRASTIVE_WEIGHT = 0.1
MARGIN = 1.0  # on the unit sphere: different classes at least 60° apart (d = 1 ⇔ cos = 0.5)
PIXELS = 256  # pixels drawn per query set: 256² pairs
PAIR_SEED = 0


class ContrastivePrototypeUNet(PrototypeUNet):
    """The prototype learner's network (same parameters), trained with the pair loss beside the prototype loss."""

    learner = protocol.PROTOTYPES_CONTRASTIVE

    def __init__(self, *, num_classes: int, embedding_dim: int, contrastive_weight: float = CONTRASTIVE_WEIGHT,
                 margin: float = MARGIN, pixels: int = PIXELS, **unet) -> None:
        super().__init__(num_classes=num_classes, embedding_dim=embedding_dim, **unet)
        if not contrastive_weight >= 0 or not margin > 0 or pixels < 2:
            raise ValueError(f"contrastive_weight={contrastive_weight} must be >= 0, margin={margin} > 0 and "
                             f"pixels={pixels} >= 2 (a pair).")
        self.contrastive_weight, self.margin, self.pixels = float(contrastive_weight), float(margin), int(pixels)


def contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = MARGIN) -> torch.Tensor:
    """Hadsell et al.'s loss, the mean over every ordered pair of distinct rows: ``embeddings [N, E]`` (compared after
    L2 normalisation), ``labels [N]`` integer classes."""
    z = nn.functional.normalize(embeddings, dim=1, eps=1e-8)
    # d² from the Gram matrix: cdist's gradient is NaN at d = 0, which every pixel has with itself.
    squared = (2 - 2 * z @ z.T).clamp_min(0)
    same = labels[:, None] == labels[None, :]
    distance = squared.clamp_min(torch.finfo(squared.dtype).tiny).sqrt()  # the clamp's zero gradient meets sqrt's
    pair = torch.where(same, squared, (margin - distance).clamp_min(0) ** 2) / 2
    off_diagonal = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return pair[off_diagonal].mean()


def sample_pixels(labels: torch.Tensor, count: int, seed: int = PAIR_SEED) -> torch.Tensor:
    """Indices of ``count`` pixels of the flat label map ``labels [P]``, each class present drawn equally often
    (with replacement where a class has fewer pixels); seeded, so the draw depends on the labels alone."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    counts = torch.bincount(labels.cpu(), minlength=int(labels.max()) + 1).to(torch.float64)
    weights = 1.0 / counts.clamp_min(1)[labels.cpu()]
    return torch.multinomial(weights, count, replacement=True, generator=generator).to(labels.device)


def pixel_pairs_loss(features: torch.Tensor, target: torch.Tensor, margin: float, pixels: int) -> torch.Tensor:
    """:func:`contrastive_loss` over pixels drawn from ``features [B, E, *spatial]`` and the one-hot ``target
    [B, C, *spatial]``; 0 when the target holds one class only (no negative pair to push apart)."""
    labels = target.argmax(dim=1).reshape(-1)
    if bool((labels == labels[0]).all()):
        return features.sum() * 0
    flat = features.movedim(1, -1).reshape(-1, features.shape[1])
    chosen = sample_pixels(labels, pixels)
    return contrastive_loss(flat[chosen], labels[chosen], margin)


class ContrastivePrototypes(Prototypes):
    description = "prototypes with a contrastive (Siamese) margin loss on pixel pairs of the embedding"
    network = ContrastivePrototypeUNet
    own_keys = ("prototype_dim",)

    def query_objective(self, model, adapted, query_x, query_y, loss_fn):
        """The prototype learner's query loss + λ·pair loss; the prototype part is what is reported, comparable
        with the other methods."""
        segmentation, pairs = self.query_losses(model, adapted, query_x, query_y, loss_fn)
        return segmentation + model.contrastive_weight * pairs, segmentation

    def query_losses(self, model, adapted, query_x, query_y, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
        """(prototype segmentation loss, pair loss) of the query set, from one pass of the embedding."""
        features = functional_call(model, dict(adapted), (query_x,), {"embed_only": True})
        logits = prototype_logits(features, adapted[PROTOTYPES], adapted[PROTOTYPE_LOG_SCALE])
        return loss_fn(logits, query_y), pixel_pairs_loss(features, query_y, model.margin, model.pixels)

    def query_target(self, model, adapted, query_y):
        # The prototype learner's label space: PrototypeUNet stands for the model (the function asks its kind).
        return in_support_label_space(PrototypeUNet, adapted, query_y)


__all__ = ["CONTRASTIVE_WEIGHT", "MARGIN", "PAIR_SEED", "PIXELS", "ContrastivePrototypeUNet", "ContrastivePrototypes",
           "contrastive_loss", "pixel_pairs_loss", "sample_pixels"]
