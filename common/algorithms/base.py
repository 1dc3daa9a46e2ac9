"""What every algorithm is: the local update a site sends, how a new site adapts, its state, cost and checks.

An :class:`Algorithm` is one small object (learn2learn's ``MAML``/``MetaSGD`` are the model: an object that
owns ``adapt()``). Its class attributes say what it accepts and needs; its methods are the few lines where
methods differ, over the one inner loop (:mod:`fedmeta.common.inner_loop`). The registry
(:data:`fedmeta.common.algorithms.ALGORITHMS`) holds one instance per name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fedmeta.common import inner_loop
from fedmeta.common.inner_loop import AdaptationRule, Episode, LossFn, Params, StepSize
from fedmeta.common.protocol import STEP_SIZE_PREFIX


@dataclass(frozen=True)
class LoopSettings:
    """One site's settings for a local update, checked: the adapted names, the step size (α, or Meta-SGD's
    learned ones), the steps, and the MAML++ / FedProx / truncation options that apply."""

    names: list[str]
    step_size: StepSize
    inner_steps: int
    loss_fn: LossFn
    proximal_mu: float = 0.0
    step_weights: list[float] | None = None
    first_order: bool = False
    truncation: int = 0
    batch_episodes: bool | None = None


class Algorithm(AdaptationRule):
    """The base: gradient steps on every parameter with the scalar inner-lr; no state beyond θ."""

    name: ClassVar[str]
    description: ClassVar[str]  # one line for reports and --help
    learner: ClassVar[str] = "unet"  # the network it trains (fedmeta.common.model.ModelConfig.learner)
    own_keys: ClassVar[tuple[str, ...]] = ()  # run-config fields (snake_case) that only this algorithm reads
    min_inner_steps: ClassVar[int] = 1  # 0: adapts without a gradient step (a learner's preparation)
    data_weighted: ClassVar[bool] = False  # site-weighting=auto weighs sites by their data (FedAvg's n_k)
    second_order: ClassVar[bool] = False  # differentiates through the inner loop (the MAML++ multi-step loss applies)
    order_annealing: ClassVar[bool] = False  # MAML++'s derivative-order annealing applies (first-order-rounds)
    learns_step_sizes: ClassVar[bool] = False  # θ carries learned step sizes (lr.<name>) beside the weights
    head_only: ClassVar[bool] = False  # adapts only the network's head (ANIL)
    proximal: ClassVar[bool] = False  # takes FedProx's proximal term (proximal-mu)
    truncates: ClassVar[bool] = False  # its unrolled inner loop may be truncated (lstm-truncation)

    # -- training: the update a site sends ---------------------------------------------------------------

    def local_update(self, model: torch.nn.Module, params: Params, episodes: Sequence[Episode],
                     loop: LoopSettings) -> tuple[Params, dict[str, float]]:
        """The update one site sends for θ (keys, shapes and dtypes of ``params``, plus ``lr.<name>`` for learned
        step sizes), averaged over ``episodes``, and the episodes' mean statistics."""
        totals = {n: torch.zeros_like(p) for n, p in params.items()}
        if isinstance(loop.step_size, Mapping):
            totals.update({STEP_SIZE_PREFIX + n: torch.zeros_like(a) for n, a in loop.step_size.items()})
        statistics = []
        for episode in episodes:
            grads, adapted, known = self.episode_update(model, params, episode, loop)
            for key, value in grads.items():
                totals[key] += value.detach()
            statistics.append(inner_loop.episode_statistics(model, loop.loss_fn, known.pop("episode", episode),
                                                            known.pop("before", params), adapted, **known))
        count = len(episodes)
        dtypes = {**{STEP_SIZE_PREFIX + n: a.dtype for n, a in _mapping(loop.step_size).items()},
                  **{n: p.dtype for n, p in params.items()}}
        return ({key: (total / count).to(dtypes[key]) for key, total in totals.items()},
                inner_loop.mean_statistics(statistics, episodes))

    def episode_update(self, model: torch.nn.Module, params: Params, episode: Episode,
                       loop: LoopSettings) -> tuple[Params, Params, dict[str, Any]]:
        """One episode's update, the adapted parameters, and the statistics it computed on the way (``before``:
        the parameters the "before" losses are taken at, when not θ; ``episode``: the episode they are taken on,
        when the update changed its query target)."""
        raise NotImplementedError

    # -- adaptation at a new site -----------------------------------------------------------------------

    def adapted_names(self, model: torch.nn.Module) -> list[str] | None:
        """The parameters the inner loop steps (None: every parameter that is not a learner's own)."""
        return None

    def step_size(self, inner_lr: float, step_sizes: Mapping[str, torch.Tensor] | None) -> StepSize:
        """The step size a site adapts with: the run's inner-lr, or the learned step sizes θ carries (the caller
        has checked they are there when ``learns_step_sizes``)."""
        return inner_lr

    def initial_step_sizes(self, params: Mapping[str, torch.Tensor], config: Any) -> Params | None:
        """The state this algorithm keeps on θ at round 0 beside the weights (learned step sizes), or None."""
        return None

    def proximal_mu(self, config: Any) -> float:
        return 0.0

    def describe_adaptation(self, step: str, steps: int) -> str:
        """How a site model was adapted, in words for the model card (``step``: the step rule in words)."""
        return step

    def released_model_note(self, path: Any) -> str | None:
        """What a site is told when it segments with the released θ itself, unadapted (raises where θ alone
        cannot segment)."""
        return None

    # -- cost and checks ----------------------------------------------------------------------------------

    def local_steps(self, inner_steps: int, episodes: int) -> int:
        """Local gradient steps (forward-backward passes on one batch) a site makes per round: the inner steps
        and the query gradient of each episode."""
        return (inner_steps + 1) * episodes

    def episodes_at_once(self, episodes: int) -> int:
        """How many episodes one backward pass holds (memory): one, unless the episodes are batched."""
        return 1

    def config_rules(self, config: Any) -> list[tuple[bool, str, str]]:
        """What this algorithm allows of a run config: ``(holds, key, problem and fix)`` in the order they are checked
        (``fedmeta.common.config.RunConfig`` refuses the first that does not hold)."""
        from fedmeta.common.algorithms import ALGORITHMS, names_where  # the registry imports this module

        name = self.name
        without_steps = " and ".join(n for n, a in ALGORITHMS.items() if not a.min_inner_steps)
        second_order, annealed = names_where("second_order"), names_where("order_annealing")
        learned = names_where("learns_step_sizes")
        return [
            (config.inner_steps >= self.min_inner_steps, "inner-steps",
             f"must be >= 1 (0 only for {without_steps}, whose adaptation needs no gradient step)."),
            (config.multi_step_loss_rounds == 0 or self.second_order, "multi-step-loss-rounds",
             f"the multi-step loss applies to {', '.join(second_order[:-1])} and {second_order[-1]}, not "
             f"algorithm={name!r}; set it to 0."),
            (config.first_order_rounds == 0 or self.order_annealing, "first-order-rounds",
             f"derivative-order annealing applies to {' and '.join(annealed)}, not algorithm={name!r} "
             f"({' and '.join(learned)} learns its step sizes through the second-order path); set it to 0."),
            (config.step_sizes == "per-element" or self.learns_step_sizes, "step-sizes",
             f"learned step sizes belong to {' and '.join(learned)}, not algorithm={name!r}; leave it at per-element."),
            (0 <= config.lstm_truncation <= config.inner_steps, "lstm-truncation",  # the unroll's range, then its owner
             f"must be in [0, inner-steps={config.inner_steps}]: the inner steps backpropagated through (0: all)."),
            (config.lstm_truncation == 0 or self.truncates, "lstm-truncation",
             f"truncates the learned optimiser's unroll; algorithm={name!r} has none. Set it to 0."),
        ]

    def check_model(self, model: torch.nn.Module) -> None:
        kind = getattr(model, "learner", None)
        wanted = None if self.learner == "unet" else self.learner
        if kind != wanted:
            raise ValueError(
                f"algorithm={self.name!r} needs " + (f"the {wanted} learner's model" if wanted else "a plain UNet")
                + f", and the model is {'a plain UNet' if kind is None else f'the {kind} learner'}; build it with "
                "fedmeta.common.model.build_model(run_config.model_config()), which picks the model for the algorithm."
            )

    def check_step_size(self, inner_lr: Any, names: list[str], params: Mapping[str, torch.Tensor]) -> StepSize:
        if isinstance(inner_lr, Mapping):
            raise ValueError(f"inner_lr is a dict of per-parameter step sizes, which only algorithm='metasgd' learns; "
                             f"pass a float for {self.name!r}.")
        return check_scalar_step_size(inner_lr)

    def check_options(self, *, inner_steps: int, proximal_mu: Any, step_weights: Sequence[float] | None,
                      first_order: bool, truncation: Any) -> tuple[float, list[float] | None, int]:
        """(μ, step weights, truncation) checked against what this algorithm accepts; each refusal names the fix."""
        from fedmeta.common.algorithms import names_where  # the registry knows who accepts what

        if isinstance(proximal_mu, bool) or not isinstance(proximal_mu, (int, float)) or not math.isfinite(proximal_mu):
            raise ValueError(f"proximal_mu must be a finite float >= 0; got {proximal_mu!r}.")
        if proximal_mu < 0:
            raise ValueError(f"proximal_mu={proximal_mu} is negative; FedProx's μ must be >= 0.")
        if proximal_mu > 0 and not self.proximal:
            raise ValueError(f"proximal_mu={proximal_mu} applies only to algorithm='fedprox'; got algorithm={self.name!r}. "
                             "Set proximal_mu=0 or use fedprox.")
        if first_order and not self.order_annealing:
            raise ValueError(f"first_order=True anneals {' or '.join(names_where('order_annealing'))}'s derivative "
                             f"order; algorithm={self.name!r} is first order already or learns step sizes that need "
                             "the second-order path.")
        weights = None
        if step_weights is not None:
            if not self.second_order:
                raise ValueError(f"step_weights (the multi-step loss) apply to {', '.join(names_where('second_order'))}; "
                                 f"algorithm={self.name!r} has no query loss inside its inner loop.")
            weights = [float(w) for w in step_weights]
            if len(weights) != inner_steps or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(f"step_weights={list(step_weights)} must be {inner_steps} finite weights >= 0 "
                                 "(one per inner step) with a positive sum.")
        if isinstance(truncation, bool) or not isinstance(truncation, int) or truncation < 0:
            raise ValueError(f"truncation={truncation!r} must be an int >= 0 (0: backpropagate through every inner step).")
        if truncation and not self.truncates:
            raise ValueError(f"truncation={truncation} truncates the learned optimiser's unrolled inner loop; "
                             f"algorithm={self.name!r} has none. Set it to 0.")
        if truncation > inner_steps:
            raise ValueError(f"truncation={truncation} exceeds inner_steps={inner_steps}; use at most {inner_steps} "
                             "(or 0 for every step).")
        return float(proximal_mu), (None if first_order else weights), truncation


class Learner(Algorithm):
    """The other families (docs/learners.md): θ holds the learner's own parts beside the UNet's
    weights, and the meta-gradient is the query loss differentiated through the whole adaptation trajectory
    (the learner's preparation, then its steps; the last ``truncation`` of them only, when set).

    A subclass names its ``network`` (whose ``learner`` is also the algorithm's name) and its one-line
    ``description``; a learner adapts without a gradient step unless it says otherwise."""

    network: ClassVar[type[torch.nn.Module]]
    min_inner_steps = 0

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.name = cls.learner = cls.network.learner

    def episode_update(self, model, params, episode, loop):
        support_x, support_y, query_x, query_y = episode
        theta = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        steps = inner_loop.trajectory(model, theta, loop.names, support_x, support_y, loop.inner_steps, loop.step_size,
                                      loop.loss_fn, rule=self, create_graph=True, truncation=loop.truncation)
        prepared, _ = next(steps)
        adapted = prepared
        for adapted, _ in steps:
            pass
        query_y = self.query_target(model, adapted, query_y)
        objective, query_loss = self.query_objective(model, adapted, query_x, query_y, loop.loss_fn)
        grads = torch.autograd.grad(objective, list(theta.values()), materialize_grads=True)
        before = {n: p.detach() for n, p in prepared.items()}
        # No step taken (the prototype learner trains at 0 inner steps): one dict for both, so the statistics see
        # that "after" is "before" and take each loss once (inner_loop.episode_statistics).
        after = before if adapted is prepared else {n: p.detach() for n, p in adapted.items()}
        return dict(zip(theta, grads)), after, {
            "query_loss_after": float(query_loss.detach()), "before": before,
            "episode": (support_x, support_y, query_x, query_y)}

    def query_target(self, model: torch.nn.Module, adapted: Params, query_y: torch.Tensor) -> torch.Tensor:
        """The query target in the label space the adapted learner segments in."""
        return query_y

    def query_objective(self, model: torch.nn.Module, adapted: Params, query_x: torch.Tensor, query_y: torch.Tensor,
                        loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the meta-gradient differentiates, the query loss reported beside the other methods'): the query
        segmentation loss, twice, unless a learner adds a term of its own (prototypes-contrastive)."""
        query_loss = inner_loop.loss(model, adapted, query_x, query_y, loss_fn)
        return query_loss, query_loss


def check_scalar_step_size(inner_lr: Any) -> float:
    if isinstance(inner_lr, bool) or not isinstance(inner_lr, (int, float)):
        raise ValueError(f"inner_lr must be a float (or, for metasgd, a dict of tensors); got {inner_lr!r}.")
    if not math.isfinite(inner_lr) or inner_lr < 0:
        raise ValueError(f"inner_lr={inner_lr!r} must be finite and >= 0 (a step size such as 0.01).")
    return float(inner_lr)


def _mapping(step_size: StepSize) -> Mapping[str, torch.Tensor]:
    return step_size if isinstance(step_size, Mapping) else {}


__all__ = ["Algorithm", "LoopSettings", "Learner", "check_scalar_step_size"]
