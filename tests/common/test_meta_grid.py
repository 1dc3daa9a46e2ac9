"""Every algorithm × inner steps × adapted parameters × normalisation against a plain-autograd reference.

torchopt's pattern: the functional core and an independent re-implementation run on identical tiny
inputs in float64 and must agree, over a grid of settings rather than a few hand-picked points.
The reference below shares nothing with ``fedmeta.common.meta`` but the model and the loss.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.func import functional_call

from fedmeta.common.losses import DiceCELoss, one_hot
from fedmeta.common.meta import meta_gradient
from fedmeta.common.model import ModelConfig, build_model, head_parameter_names
from fedmeta.common.protocol import INITIALISATION_ALGORITHMS, STEP_SIZE_PREFIX

NUM_CLASSES = 4  # divisible by the group count, so group norm can normalise the output block too
SIDE = 8
ALPHA = 0.05
MU = 0.1


def _model(norm: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(out_channels=NUM_CLASSES, channels=(4, 8), strides=(2,), num_res_units=1, norm=norm, groups=2)
    return build_model(config).double()


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {n: torch.randn(p.shape, generator=generator, dtype=torch.float64) * 0.5 for n, p in model.named_parameters()}


def _episodes(count: int = 2):
    generator = torch.Generator().manual_seed(2)

    def batch(n):
        x = torch.randn(n, 1, SIDE, SIDE, generator=generator, dtype=torch.float64)
        y = torch.randint(0, NUM_CLASSES, (n, SIDE, SIDE), generator=generator)
        return x, one_hot(y, NUM_CLASSES, torch.float64)

    return [(*batch(2), *batch(2)) for _ in range(count)]


def _sgd(model, params, names, x, y, steps, alpha, loss_fn, *, create_graph, anchor=None):
    """``steps`` plain SGD steps on ``names`` (FedProx's proximal term when ``anchor`` is given)."""
    for _ in range(steps):
        loss = loss_fn(functional_call(model, params, (x,)), y)
        if anchor is not None:
            loss = loss + 0.5 * MU * sum(((params[n] - anchor[n]) ** 2).sum() for n in names)
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph)
        params = dict(params)
        for n, g in zip(names, grads):
            a = alpha[n] if isinstance(alpha, dict) else alpha
            params[n] = params[n] - a * (g if create_graph else g.detach())
            if not create_graph:
                params[n] = params[n].detach().requires_grad_(True)
    return params


def reference(model, theta, episodes, algorithm, inner_steps, names, loss_fn):
    """The update a site sends, written out per algorithm (FIELD.md §1), averaged over episodes."""
    if algorithm in ("fedavg", "fedprox"):
        local = {n: p.detach().requires_grad_(True) for n, p in theta.items()}
        anchor = {n: p.detach() for n, p in theta.items()} if algorithm == "fedprox" else None
        for _ in range(inner_steps):
            for sx, sy, qx, qy in episodes:
                local = _sgd(model, local, names, sx, sy, 1, ALPHA, loss_fn, create_graph=False, anchor=anchor)
                local = _sgd(model, local, names, qx, qy, 1, ALPHA, loss_fn, create_graph=False, anchor=anchor)
        return {n: theta[n] - local[n].detach() for n in theta}
    total: dict[str, torch.Tensor] = {}
    for sx, sy, qx, qy in episodes:
        leaves = {n: p.detach().requires_grad_(True) for n, p in theta.items()}
        if algorithm == "reptile":
            adapted = _sgd(model, leaves, names, sx, sy, inner_steps, ALPHA, loss_fn, create_graph=False)
            grads = {n: theta[n] - adapted[n].detach() for n in theta}
        elif algorithm == "fomaml":
            adapted = _sgd(model, leaves, names, sx, sy, inner_steps, ALPHA, loss_fn, create_graph=False)
            adapted = {n: p.detach().requires_grad_(True) for n, p in adapted.items()}
            query = loss_fn(functional_call(model, adapted, (qx,)), qy)
            grads = dict(zip(adapted, torch.autograd.grad(query, list(adapted.values()))))
        else:  # maml, anil, metasgd: through the inner loop
            alphas = {n: torch.full_like(theta[n], ALPHA).requires_grad_(True) for n in names}
            step = alphas if algorithm == "metasgd" else ALPHA
            adapted = _sgd(model, leaves, names, sx, sy, inner_steps, step, loss_fn, create_graph=True)
            query = loss_fn(functional_call(model, adapted, (qx,)), qy)
            inputs = dict(leaves)
            if algorithm == "metasgd":
                inputs.update({STEP_SIZE_PREFIX + n: a for n, a in alphas.items()})
            grads = dict(zip(inputs, torch.autograd.grad(query, list(inputs.values()), allow_unused=True)))
            grads = {k: torch.zeros_like(inputs[k]) if g is None else g for k, g in grads.items()}
        for key, value in grads.items():
            total[key] = total.get(key, 0) + value.detach() / len(episodes)
    return total


GRID = [
    (algorithm, steps, head_only, norm)
    for algorithm, steps, head_only, norm in itertools.product(INITIALISATION_ALGORITHMS, (1, 2), (False, True), ("instance", "group"))
    # ANIL adapts the head by definition; the others are tried with every parameter and with the head only.
    if not (algorithm == "anil" and not head_only)
]


@pytest.mark.parametrize(("algorithm", "inner_steps", "head_only", "norm"), GRID)
def test_meta_gradient_matches_the_reference(algorithm, inner_steps, head_only, norm):
    model = _model(norm)
    theta = _params(model)
    episodes = _episodes()
    loss_fn = DiceCELoss(NUM_CLASSES)
    names = head_parameter_names(model) if head_only else list(theta)
    grads, stats = meta_gradient(
        model, theta, episodes, algorithm=algorithm, inner_steps=inner_steps,
        inner_lr=ALPHA, loss_fn=loss_fn, inner_params=names if head_only else None,
        proximal_mu=MU if algorithm == "fedprox" else 0.0,
    )
    expected = reference(model, theta, episodes, algorithm, inner_steps, names, loss_fn)
    assert sorted(grads) == sorted(expected)
    assert any(float(g.abs().max()) > 0 for g in grads.values()), "the update is zero everywhere"
    for key, value in expected.items():
        torch.testing.assert_close(grads[key], value, rtol=1e-9, atol=1e-12, msg=f"{algorithm}: {key}")
    assert stats["num_examples"] == sum(int(e[0].shape[0]) + int(e[2].shape[0]) for e in episodes)
