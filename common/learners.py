"""The other meta-learning families: a fast-weight generator, prototype segmentation, a learned optimiser.

Each learner is the MONAI UNet with what its family meta-learns beside the UNet's weights registered as
ordinary parameters. So θ — ``dict(model.named_parameters())`` — holds them too, and they travel, are
aggregated, clipped, masked, checkpointed and resumed exactly as the UNet's weights are; no transport
knows they exist. What makes each a different learner is how a site adapts θ to its support set, the
three rules below, which the one inner loop (:mod:`fedmeta.common.meta`) calls in training and at a
new site alike:

- ``fast-weights`` (task-conditioned weight generation, a hypernetwork: Ha et al. 2017; Gidaris &
  Komodakis 2018; LGM-Net, Li et al. 2019): a generator g_φ embeds the support images *and* their masks,
  averages the embedding over the support set and maps it to an update of the UNet's head (ANIL's last
  block): head ← head + g_φ(S). Adaptation is one forward pass, optionally followed by SGD steps.
- ``prototypes`` (PANet, Wang et al. 2019; ADNet, Hansen et al. 2022 for medical images): the UNet emits
  an embedding per pixel; masked average pooling of the support embeddings gives one prototype per class
  (background included), and a pixel's logits are the cosine similarities to the prototypes times a
  learned scale. No gradient step at the new site; fine-tuning the encoder on the support set's own
  segmentation (its prototypes segmenting it) is optional. A class no support pixel shows has no
  prototype and is never predicted: a site's own label protocol falls out of its support masks.
- ``lstm-optimizer`` (Andrychowicz et al. 2016; Ravi & Larochelle 2017): one coordinate-wise LSTM, shared
  by every parameter, reads each coordinate's preprocessed gradient and the preprocessed loss and
  corrects its SGD step: θ ← θ − α (g + w·h). Its output weights w start at zero, so the learned optimiser
  starts as SGD (and its meta-gradient as MAML's) and learns away from it.

Shapes: images ``[B, 1, *spatial]``, one-hot masks ``[B, C, *spatial]``, embeddings ``[B, E, *spatial]``,
prototypes ``[C, E]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from monai.networks.nets import UNet
from torch import nn
from torch.func import functional_call

from fedmeta.common.unet import head_parameter_names

Params = dict[str, torch.Tensor]

GENERATOR_PREFIX = "generator."  # fast-weights: the generator's parameters
PROTOTYPES = "prototypes"  # prototypes: the site's class prototypes [C, E] (computed, never meta-learned)
PROTOTYPE_LOG_SCALE = "log_scale"  # prototypes: log of the cosine similarities' learned scale (temperature)
LSTM_PREFIX = "lstm."  # lstm-optimizer: the coordinate-wise LSTM's parameters
# Andrychowicz et al.'s gradient preprocessing: (log|g| / p, sign g) when |g| >= e^-p, else (-1, e^p g).
PREPROCESS_P = 10.0
LSTM_INPUTS = 4  # the preprocessed gradient (2) and the preprocessed loss (2), per coordinate
PROTOTYPE_INITIAL_SCALE = 20.0  # PANet's alpha


class FastWeightUNet(UNet):
    """The UNet plus a generator of head updates from the support set (images and one-hot masks)."""

    learner = "fast-weights"

    def __init__(self, *, num_classes: int, generator_width: int, **unet) -> None:
        super().__init__(**unet)
        self.head_names = head_parameter_names(self)
        head = dict(self.named_parameters())
        outputs = sum(head[n].numel() for n in self.head_names)
        conv = nn.Conv2d if self.dimensions == 2 else nn.Conv3d
        width = generator_width
        last = nn.Linear(width, outputs)
        # Zero: the generator starts by changing nothing, so training starts from the plain UNet.
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.generator = nn.Sequential(
            conv(self.in_channels + num_classes, width, 3, stride=2, padding=1), nn.ReLU(),
            conv(width, width, 3, stride=2, padding=1), nn.ReLU(),
            _SetMean(), nn.Linear(width, width), nn.ReLU(), last,
        )

    @staticmethod
    def is_own_parameter(name: str) -> bool:
        return name.startswith(GENERATOR_PREFIX)

    @classmethod
    def from_model_config(cls, config, **unet) -> "FastWeightUNet":
        """Built from a ``fedmeta.common.model.ModelConfig`` (``unet``: the UNet's keyword arguments)."""
        return cls(num_classes=config.out_channels, generator_width=config.generator_width, **unet)


class PrototypeUNet(UNet):
    """The UNet as a pixel embedding (``embedding_dim`` channels) matched to class prototypes by cosine."""

    learner = "prototypes"

    def __init__(self, *, num_classes: int, embedding_dim: int, **unet) -> None:
        super().__init__(**{**unet, "out_channels": embedding_dim})
        # Every adaptation replaces these with its support set's prototypes: θ's own are never used (they
        # start at zero, and their meta-gradient is zero).
        self.prototypes = nn.Parameter(torch.zeros(num_classes, embedding_dim))
        self.log_scale = nn.Parameter(torch.tensor(math.log(PROTOTYPE_INITIAL_SCALE)))

    @staticmethod
    def is_own_parameter(name: str) -> bool:
        return name in (PROTOTYPES, PROTOTYPE_LOG_SCALE)

    @classmethod
    def from_model_config(cls, config, **unet) -> "PrototypeUNet":
        return cls(num_classes=config.out_channels, embedding_dim=config.embedding_dim, **unet)

    def forward(self, x: torch.Tensor, embed_only: bool = False) -> torch.Tensor:
        """Class logits ``[B, C, *spatial]``; with ``embed_only`` the embedding ``[B, E, *spatial]``."""
        features = super().forward(x)
        return features if embed_only else prototype_logits(features, self.prototypes, self.log_scale)


class LearnedOptimizerUNet(UNet):
    """The UNet plus a coordinate-wise LSTM that corrects its inner SGD steps."""

    learner = "lstm-optimizer"

    def __init__(self, *, hidden: int, **unet) -> None:
        super().__init__(**unet)
        self.lstm = CoordinateLSTM(hidden)

    @staticmethod
    def is_own_parameter(name: str) -> bool:
        return name.startswith(LSTM_PREFIX)

    @classmethod
    def from_model_config(cls, config, **unet) -> "LearnedOptimizerUNet":
        return cls(hidden=config.lstm_hidden, **unet)


class CoordinateLSTM(nn.Module):
    """One LSTM cell applied to every coordinate of the UNet separately (its weights shared by all)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(hidden)
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden, LSTM_INPUTS).uniform_(-bound, bound))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden, hidden).uniform_(-bound, bound))
        bias = torch.zeros(4 * hidden)
        bias[hidden:2 * hidden] = 1.0  # forget gate open: the cell remembers across steps from the start
        self.bias = nn.Parameter(bias)
        self.weight_out = nn.Parameter(torch.zeros(hidden))  # zero: the optimiser starts as SGD


class _SetMean(nn.Module):
    """Mean over the support set and every spatial position: one embedding for the whole set, ``[1, C]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(0, *range(2, x.dim()))).unsqueeze(0)


LEARNERS = {FastWeightUNet.learner: FastWeightUNet, PrototypeUNet.learner: PrototypeUNet,
            LearnedOptimizerUNet.learner: LearnedOptimizerUNet}


def learner_of(model: torch.nn.Module) -> str | None:
    """The family of ``model`` (a key of :data:`LEARNERS`), or None for a plain UNet."""
    return getattr(model, "learner", None)


def meta_only_names(model: torch.nn.Module, names: Sequence[str]) -> list[str]:
    """The names that are the learner's own machinery, not the UNet's: never stepped by the inner loop."""
    own = getattr(model, "is_own_parameter", None)
    return [n for n in names if own(n)] if own is not None else []


# --------------------------------------------------------------------------------------------------
# fast-weights


def generate(model: FastWeightUNet, params: Mapping[str, torch.Tensor], support_x: torch.Tensor,
             support_y: torch.Tensor) -> Params:
    """``params`` with the head replaced by head + g_φ(support images, support masks)."""
    generator = {n[len(GENERATOR_PREFIX):]: p for n, p in params.items() if n.startswith(GENERATOR_PREFIX)}
    inputs = torch.cat([support_x, support_y.to(support_x.dtype)], dim=1)
    delta = functional_call(model.generator, generator, (inputs,)).reshape(-1)
    out, offset = dict(params), 0
    for name in model.head_names:
        size = params[name].numel()
        out[name] = params[name] + delta[offset:offset + size].view_as(params[name])
        offset += size
    return out


# --------------------------------------------------------------------------------------------------
# prototypes


def masked_average_pooling(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Class prototypes ``[C, E]``: the mean embedding under each class's mask; zero for a class with no pixel."""
    masks = masks.to(features.dtype)
    totals = torch.einsum("be...,bc...->ce", features, masks)
    counts = masks.sum(dim=(0, *range(2, masks.dim())))
    return torch.where(counts[:, None] > 0, totals / counts.clamp_min(1e-12)[:, None], torch.zeros_like(totals))


def prototype_logits(features: torch.Tensor, prototypes: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, C, *spatial]``: scale · cos(embedding, prototype); a class without a prototype scores
    −2·scale, below every cosine, so it is never predicted."""
    cosine = torch.einsum("be...,ce->bc...", nn.functional.normalize(features, dim=1, eps=1e-8),
                          nn.functional.normalize(prototypes, dim=1, eps=1e-8))
    scale = log_scale.exp()
    present = (prototypes.detach() != 0).any(dim=1).view(1, -1, *([1] * (features.dim() - 2)))
    return torch.where(present, scale * cosine, -2 * scale)


def with_prototypes(model: PrototypeUNet, params: Mapping[str, torch.Tensor], support_x: torch.Tensor,
                    support_y: torch.Tensor) -> Params:
    """``params`` with the prototypes of the support set under the current embedding."""
    features = functional_call(model, dict(params), (support_x,), {"embed_only": True})
    return {**params, PROTOTYPES: masked_average_pooling(features, support_y)}


def in_support_label_space(model: torch.nn.Module, adapted: Mapping[str, torch.Tensor],
                            target: torch.Tensor) -> torch.Tensor:
    """A prototypes query target with every class the support showed no pixel of moved to background.

    The support set is the label protocol a prototype learner segments in: a class without a prototype
    can never be predicted, and a query pixel of it would only push the learned scale down and every
    embedding away from every prototype. For the other learners ``target`` is returned as it is.
    """
    if learner_of(model) != PrototypeUNet.learner:
        return target
    absent = (adapted[PROTOTYPES].detach() == 0).all(dim=1)  # [C]
    if not bool(absent[1:].any()):
        return target
    shape = (1, -1, *([1] * (target.dim() - 2)))
    moved = (target * absent.view(shape).to(target.dtype)).sum(dim=1)
    kept = target * (~absent).view(shape).to(target.dtype)
    return torch.cat([kept[:, :1] + moved.unsqueeze(1), kept[:, 1:]], dim=1)


def prototype_support_loss(model: PrototypeUNet, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                           y: torch.Tensor, loss_fn) -> torch.Tensor:
    """The fine-tuning objective: the support set segmented by its own prototypes (PANet's support loss)."""
    features = functional_call(model, dict(params), (x,), {"embed_only": True})
    return loss_fn(prototype_logits(features, masked_average_pooling(features, y), params[PROTOTYPE_LOG_SCALE]), y)


# --------------------------------------------------------------------------------------------------
# lstm-optimizer


def preprocess(values: torch.Tensor) -> torch.Tensor:
    """Andrychowicz et al.'s preprocessing of a gradient (or loss) ``[N]`` into ``[N, 2]``: magnitude and sign
    on a log scale, linear below e^-p, so coordinates of any scale feed the LSTM values of order one."""
    magnitude = values.abs()
    large = magnitude >= math.exp(-PREPROCESS_P)
    log_part = torch.where(large, magnitude.clamp_min(math.exp(-PREPROCESS_P)).log() / PREPROCESS_P,
                           -torch.ones_like(values))
    sign_part = torch.where(large, torch.sign(values), values * math.exp(PREPROCESS_P))
    return torch.stack([log_part, sign_part], dim=1)


LSTMState = tuple[torch.Tensor, torch.Tensor]


def lstm_directions(params: Mapping[str, torch.Tensor], grads: Sequence[torch.Tensor], loss: torch.Tensor,
                    state: LSTMState | None) -> tuple[list[torch.Tensor], LSTMState]:
    """The learned optimiser's step directions g + w·h, one per gradient, and its new state (h, c) ``[N, H]``.

    Every coordinate of every tensor is one row of one batched LSTM cell: N is the number of adapted
    scalars, H the hidden size; the state costs 2·N·H numbers.
    """
    flat = torch.cat([g.reshape(-1) for g in grads])
    inputs = torch.cat([preprocess(flat), preprocess(loss.reshape(1)).expand(flat.numel(), 2)], dim=1)
    weight_ih, weight_hh = params[LSTM_PREFIX + "weight_ih"], params[LSTM_PREFIX + "weight_hh"]
    hidden_size = weight_hh.shape[1]
    if state is None:
        zeros = flat.new_zeros(flat.numel(), hidden_size)
        state = (zeros, zeros)
    hidden, cell = state
    gates = inputs @ weight_ih.T + hidden @ weight_hh.T + params[LSTM_PREFIX + "bias"]
    input_gate, forget_gate, candidate, output_gate = gates.chunk(4, dim=1)
    cell = torch.sigmoid(forget_gate) * cell + torch.sigmoid(input_gate) * torch.tanh(candidate)
    hidden = torch.sigmoid(output_gate) * torch.tanh(cell)
    directions = flat + hidden @ params[LSTM_PREFIX + "weight_out"]
    out, offset = [], 0
    for g in grads:
        out.append(directions[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    return out, (hidden, cell)


def lstm_state_numbers(model: torch.nn.Module, adapted: int) -> int:
    """Numbers the learned optimiser's state holds while adapting ``adapted`` scalars: (h, c) per coordinate."""
    return 2 * adapted * model.lstm.weight_hh.shape[1]


__all__ = ["FastWeightUNet", "GENERATOR_PREFIX", "LEARNERS", "LSTM_PREFIX", "LearnedOptimizerUNet",
           "PROTOTYPES", "PROTOTYPE_LOG_SCALE", "PrototypeUNet", "generate", "learner_of", "lstm_directions",
           "in_support_label_space", "lstm_state_numbers", "masked_average_pooling", "meta_only_names", "preprocess", "prototype_logits",
           "prototype_support_loss", "with_prototypes"]
