"""A learned optimiser (Andrychowicz et al. 2016; Ravi & Larochelle 2017): one coordinate-wise LSTM, shared by
every parameter, corrects each inner SGD step, θ ← θ − α (g + w·h); its output weights start at zero, so it
starts as SGD (and its meta-gradient as MAML's) and learns away from it (:mod:`fedmeta.common.learners`)."""

from __future__ import annotations

from fedmeta.common import learners
from fedmeta.common.algorithms.base import Learner


class LSTMOptimizer(Learner):
    name = "lstm-optimizer"
    description = "a learned LSTM optimiser corrects every inner SGD step"
    learner = learners.LearnedOptimizerUNet.learner
    own_keys = ("lstm_hidden", "lstm_truncation")
    truncates = True

    def direction(self, model):
        return learners.lstm_directions

    def describe_adaptation(self, step: str, steps: int) -> str:
        return f"the consortium's learned LSTM optimiser (a learned correction of {step})"


__all__ = ["LSTMOptimizer"]
