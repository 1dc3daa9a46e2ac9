"""A learned optimiser (Andrychowicz et al. 2016; Ravi & Larochelle 2017): one coordinate-wise LSTM, shared by
every parameter, corrects each inner SGD step, θ ← θ − α (g + w·h); its output weights start at zero, so it
starts as SGD (and its meta-gradient as MAML's) and learns away from it (docs/learners.md)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from monai.networks.nets import UNet
from torch import nn

from fedmeta.common import protocol
from fedmeta.common.algorithms.base import Learner

LSTM_PREFIX = "lstm."  # the coordinate-wise LSTM's parameters
# Andrychowicz et al.'s gradient preprocessing: (log|g| / p, sign g) when |g| >= e^-p, else (-1, e^p g).
PREPROCESS_P = 10.0
LSTM_INPUTS = 4  # the preprocessed gradient (2) and the preprocessed loss (2), per coordinate


class LearnedOptimizerUNet(UNet):
    """The UNet plus a coordinate-wise LSTM that corrects its inner SGD steps."""

    learner = protocol.LSTM_OPTIMIZER

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


class LSTMOptimizer(Learner):
    network = LearnedOptimizerUNet
    description = "a learned LSTM optimiser corrects every inner SGD step"
    own_keys = ("lstm_hidden", "lstm_truncation")
    min_inner_steps = 1  # its adaptation is its learned steps
    truncates = True

    def direction(self, model):
        return lstm_directions

    def describe_adaptation(self, step: str, steps: int) -> str:
        return f"the consortium's learned LSTM optimiser (a learned correction of {step})"


__all__ = ["LSTMOptimizer", "LSTM_PREFIX", "LearnedOptimizerUNet", "lstm_directions", "lstm_state_numbers", "preprocess"]
