"""The server's meta-optimiser: applies aggregated meta-gradients to θ across rounds.

FedOpt's pattern (Reddi et al., 2021): the aggregate of the sites' updates is a pseudo-gradient and
an ordinary optimiser steps θ with it. The optimiser lives across rounds (its Adam moments are the
point) and round-trips through :meth:`MetaOptimizer.state_dict` for checkpoints — the one public
Flower meta-learning baseline rebuilt Adam every round, so its moments never accumulated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedmeta.common.meta import STEP_SIZE_PREFIX

OPTIMIZERS = ("adam", "sgd")

# The largest |entry| the meta-optimiser's state (θ, Adam's first moment, the square root of its second,
# SGD's momentum) may hold. No meta-gradient of a UNet on normalised images comes near it; a second
# moment above it shrinks Adam's steps below float32's resolution of θ for hundreds of rounds, so θ
# silently stops learning. It is a sanity bound, not the defence (that is the server's norm bound).
MAX_STATE = 1e15


class MetaOptimizerStateError(FloatingPointError):
    """The meta-optimiser's state is non-finite, out of bounds or stalled: θ can no longer learn."""


class MetaOptimizer:
    """Holds θ (and Meta-SGD's step sizes) and steps them with aggregated meta-gradients.

    ``step(meta_grads)`` expects exactly θ's keys, plus ``"lr.<name>"`` for each step size when
    step sizes are held. SGD with ``lr=1`` on ``fedavg`` pseudo-gradients gives θ − (θ − θ̄_local)
    = the weighted average of the sites' local models: FedAvg.
    """

    def __init__(
        self,
        params: Mapping[str, torch.Tensor],
        *,
        optimizer: str = "adam",
        lr: float,
        step_sizes: Mapping[str, torch.Tensor] | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        momentum: float = 0.0,
    ):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown meta-optimizer {optimizer!r}; valid choices: {', '.join(OPTIMIZERS)}.")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"meta lr={lr!r} must be a finite float > 0 (e.g. 1e-3 for adam, 1.0 for sgd).")
        if not params:
            raise ValueError("params is empty: the meta-optimiser needs θ to step.")
        self.kind = optimizer
        self.lr = float(lr)
        # Sorted names fix the order of the optimiser's state, so a checkpoint restores onto any
        # dict order.
        self._names = sorted(params)
        self._step_names = sorted(step_sizes) if step_sizes else []
        self._tensors = {n: params[n].detach().clone().requires_grad_(True) for n in self._names}
        self._tensors.update(
            {STEP_SIZE_PREFIX + n: step_sizes[n].detach().clone().requires_grad_(True) for n in self._step_names}
        )
        leaves = [self._tensors[k] for k in self._keys]
        if optimizer == "adam":
            self._optimizer: torch.optim.Optimizer = torch.optim.Adam(
                leaves, lr=self.lr, betas=betas, eps=eps, foreach=False
            )
        else:
            self._optimizer = torch.optim.SGD(leaves, lr=self.lr, momentum=momentum, foreach=False)

    @property
    def _keys(self) -> list[str]:
        return self._names + [STEP_SIZE_PREFIX + n for n in self._step_names]

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """θ, detached (safe to send or checkpoint)."""
        return {n: self._tensors[n].detach().clone() for n in self._names}

    @property
    def step_sizes(self) -> dict[str, torch.Tensor] | None:
        """Meta-SGD's step sizes keyed by parameter name, or None when not learned."""
        if not self._step_names:
            return None
        return {n: self._tensors[STEP_SIZE_PREFIX + n].detach().clone() for n in self._step_names}

    def step(self, meta_grads: Mapping[str, torch.Tensor]) -> None:
        """One meta-update with the aggregated gradient (keys: θ's names and ``lr.<name>``)."""
        expected = set(self._keys)
        missing, unexpected = sorted(expected - set(meta_grads)), sorted(set(meta_grads) - expected)
        if missing or unexpected:
            raise ValueError(
                f"meta_grads do not match the held parameters: missing {missing[:5]}, unexpected {unexpected[:5]}."
            )
        for key in self._keys:
            tensor, g = self._tensors[key], meta_grads[key]
            if g.shape != tensor.shape:
                raise ValueError(f"meta_grads[{key!r}] has shape {tuple(g.shape)}, expected {tuple(tensor.shape)}.")
            if not torch.isfinite(g).all():
                raise ValueError(f"meta_grads[{key!r}] holds NaN or Inf; refusing to corrupt θ.")
            tensor.grad = g.detach().to(dtype=tensor.dtype, device=tensor.device).clone()
        before = {k: self._tensors[k].detach().clone() for k in self._keys}
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        self.check_state()
        self._check_moved(before, meta_grads)

    def check_state(self) -> None:
        """Raises :class:`MetaOptimizerStateError` unless θ and every moment are finite and within MAX_STATE."""
        problems = []
        for key in self._keys:
            tensors = {"θ" if not key.startswith(STEP_SIZE_PREFIX) else "step size": self._tensors[key]}
            state = self._optimizer.state.get(self._tensors[key], {})
            if "exp_avg" in state:
                tensors["Adam's first moment"] = state["exp_avg"]
                tensors["√ of Adam's second moment"] = state["exp_avg_sq"].sqrt()
            if state.get("momentum_buffer") is not None:
                tensors["SGD's momentum"] = state["momentum_buffer"]
            for what, tensor in tensors.items():
                tensor = tensor.detach()
                if not torch.isfinite(tensor).all():
                    bad = int((~torch.isfinite(tensor)).sum())
                    problems.append(f"{what} of {key!r} is non-finite in {bad} of {tensor.numel()} entries")
                elif tensor.numel() and float(tensor.abs().max()) > MAX_STATE:
                    problems.append(f"{what} of {key!r} reaches {float(tensor.abs().max()):.3g} (bound {MAX_STATE:g})")
        if problems:
            raise MetaOptimizerStateError(
                f"the meta-optimiser's state is broken: {'; '.join(problems[:3])}"
                f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}. θ could not learn from here."
            )

    def _check_moved(self, before: Mapping[str, torch.Tensor], meta_grads: Mapping[str, torch.Tensor]) -> None:
        """Raises when most entries that received a non-zero update did not move: the step stalled."""
        pushed = moved = 0
        largest_update = largest_moment = 0.0
        for key in self._keys:
            update = meta_grads[key].detach().to(before[key].device)
            nonzero = update != 0
            pushed += int(nonzero.sum())
            moved += int((nonzero & (self._tensors[key].detach() != before[key])).sum())
            largest_update = max(largest_update, float(update.abs().max()) if update.numel() else 0.0)
            state = self._optimizer.state.get(self._tensors[key], {})
            if "exp_avg_sq" in state:
                largest_moment = max(largest_moment, float(state["exp_avg_sq"].max().sqrt()))
        if pushed and moved * 2 < pushed:
            # Two causes look alike here, and the numbers tell them apart: an update too small to register, or an
            # Adam state so large that any step it scales vanishes.
            moment = f", √ of Adam's second moment up to {largest_moment:.3g}" if self.kind == "adam" else ""
            raise MetaOptimizerStateError(
                f"the meta-update did not move θ: only {moved} of the {pushed} entries with a non-zero update changed "
                f"(largest update entry {largest_update:.3g}{moment}, lr {self.lr:g}): its steps fell below float32's "
                "resolution of θ — the update is vanishingly small or the optimiser's state has grown too large."
            )

    def state_dict(self) -> dict:
        """θ, step sizes and optimiser moments: everything needed to continue bit for bit."""
        return {
            "kind": self.kind,
            "lr": self.lr,
            "params": self.params,
            "step_sizes": self.step_sizes,
            "optimizer": self._optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(
                f"checkpoint holds a {state.get('kind')!r} meta-optimiser but this run uses {self.kind!r}; "
                "resume with the same meta-optimizer setting or start a new run."
            )
        if state.get("lr") != self.lr:
            # torch's load_state_dict would silently take the checkpoint's lr over this run's.
            raise ValueError(
                f"checkpoint meta-optimiser lr={state.get('lr')!r} differs from this run's lr={self.lr!r}; "
                "resume with the same meta-lr or start a new run."
            )
        params, step_sizes = state["params"], state.get("step_sizes") or {}
        if sorted(params) != self._names or sorted(step_sizes) != self._step_names:
            raise ValueError(
                "checkpoint parameters do not match this model (names differ); was it written for another "
                "model configuration or algorithm?"
            )
        with torch.no_grad():
            for n in self._names:
                self._tensors[n].copy_(params[n])
            for n in self._step_names:
                self._tensors[STEP_SIZE_PREFIX + n].copy_(step_sizes[n])
        self._optimizer.load_state_dict(state["optimizer"])
        # A checkpoint written before these checks existed may hold a state that froze θ: refuse to go on from it.
        self.check_state()
