"""Proximal: fine-tuning held near the initialisation by μ/2·‖φ − θ‖² (FedProx's term, Li et al. 2020, and
L2-SP, Li et al. 2018, used at test time).

The term is applied implicitly (a proximal step): after each ordinary step φ′ = φ − α·g of the support loss,

    φ ← (φ′ + αμ·θ) / (1 + αμ),

the exact minimiser of ⟨g, φ⟩ + ‖φ − φ_t‖²/(2α) + μ/2·‖φ − θ‖². Unlike adding μ(φ − θ) to the gradient, it is
stable for every μ (an explicit step diverges once αμ > 2), and μ → ∞ keeps θ exactly. With Meta-SGD's learned
step sizes α is per element (and per step). θ is step 0 as the learner prepares it: for the learners the pull
is towards the meta-learned encoder, and what the learner does after a step (prototypes re-pooled) follows the
pull; a learner's own parts are never stepped, so never pulled.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedmeta.common.adaptation_variants.base import Variant, WrappedRule, trajectory_with
from fedmeta.common.inner_loop import alpha_at

MUS = (0.1, 1.0, 10.0, 100.0)  # the fixed set the validation split chooses from (αμ per step: 0.005–5 at α = 0.05)


class ProximalRule(WrappedRule):
    def __init__(self, base, mu: float, names, step_size) -> None:
        super().__init__(base)
        self.mu, self.names, self.step_size, self.anchor = mu, list(names), step_size, None

    def prepare(self, model, params, support_x, support_y, *, create_graph, inner_steps):
        prepared = super().prepare(model, params, support_x, support_y, create_graph=create_graph,
                                   inner_steps=inner_steps)
        self.anchor = {n: prepared[n].detach() for n in self.names}
        return prepared

    def after_step(self, model, params, support_x, support_y, *, create_graph, step, inner_steps):
        pulled = dict(params)
        for n in self.names:
            alpha = alpha_at(self.step_size[n], params[n], step) if isinstance(self.step_size, Mapping) \
                else self.step_size
            pulled[n] = (params[n] + alpha * self.mu * self.anchor[n]) / (1 + alpha * self.mu)
        return super().after_step(model, pulled, support_x, support_y, create_graph=create_graph, step=step,
                                  inner_steps=inner_steps)


class Proximal(Variant):
    description = "proximal: fine-tune with μ/2·‖φ − θ‖² (an implicit proximal step), μ = {mu:g}"

    def __init__(self, mu: float) -> None:
        if not mu > 0:
            raise ValueError(f"mu={mu!r}: the proximal weight must be > 0 (mu = 0 is fine-tune).")
        self.mu = float(mu)
        self.name = f"proximal-{mu:g}"
        self.description = Proximal.description.format(mu=mu)

    def trajectory(self, model, params, support_x, support_y_onehot, *, inner_steps, inner_lr, loss_fn,
                   inner_params=None):
        return trajectory_with(model, params, support_x, support_y_onehot, inner_steps=inner_steps,
                               inner_lr=inner_lr, loss_fn=loss_fn, inner_params=inner_params,
                               rule_for=lambda rule, names, step_size: ProximalRule(rule, self.mu, names, step_size))


__all__ = ["MUS", "Proximal", "ProximalRule"]
