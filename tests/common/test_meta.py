"""The meta-learning core against references: finite differences and plain-autograd re-implementations.

Everything runs in float64 on a tiny MONAI UNet so finite differences are trustworthy.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from fedmeta.common.losses import DiceCELoss, one_hot
from fedmeta.common.meta import adapt, init_step_sizes, meta_gradient
from fedmeta.common.protocol import INITIALISATION_ALGORITHMS
from fedmeta.common.metaopt import MetaOptimizer
from fedmeta.common.model import ModelConfig, build_model, head_parameter_names

NUM_CLASSES = 3
SIDE = 8


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = ModelConfig(out_channels=NUM_CLASSES, channels=(3, 4), strides=(2,), num_res_units=1)
    return build_model(config).double()


@pytest.fixture(scope="module")
def loss_fn():
    return DiceCELoss(NUM_CLASSES)


def make_params(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    # Random, not zero-centred init: the PReLU slopes and biases then give the loss real curvature.
    return {n: torch.randn(p.shape, generator=generator, dtype=torch.float64) * 0.5 for n, p in model.named_parameters()}


def make_episode(seed, k=2, q=2):
    generator = torch.Generator().manual_seed(seed)

    def batch(n):
        x = torch.randn(n, 1, SIDE, SIDE, generator=generator, dtype=torch.float64)
        y = torch.randint(0, NUM_CLASSES, (n, SIDE, SIDE), generator=generator)
        return x, one_hot(y, NUM_CLASSES, torch.float64)

    return (*batch(k), *batch(q))


def reference_adapt(model, params, x, y, steps, alpha, loss_fn, names=None, create_graph=True):
    """Plain-autograd SGD inner loop, independent of fedmeta.common.meta."""
    names = list(params) if names is None else names
    adapted = dict(params)
    for step in range(steps):
        loss = loss_fn(functional_call(model, adapted, (x,)), y)
        grads = torch.autograd.grad(loss, [adapted[n] for n in names], create_graph=create_graph)
        for n, g in zip(names, grads):
            a = alpha[n] if isinstance(alpha, dict) else alpha
            if isinstance(a, torch.Tensor) and a.dim() == g.dim() + 1:  # one rate per step (LSLR)
                a = a[min(step, a.shape[0] - 1)]
            adapted[n] = adapted[n] - a * (g if create_graph else g.detach())
    return adapted


def query_loss_after_adaptation(model, params, episode, steps, alpha, loss_fn, names=None):
    sx, sy, qx, qy = episode
    with torch.enable_grad():
        p = {n: v.detach().requires_grad_(True) for n, v in params.items()}
        adapted = reference_adapt(model, p, sx, sy, steps, alpha, loss_fn, names, create_graph=False)
        return float(loss_fn(functional_call(model, adapted, (qx,)), qy).detach())


def directional_fd(f, params, direction, eps=1e-5):
    plus = {n: params[n] + eps * direction[n] for n in params}
    minus = {n: params[n] - eps * direction[n] for n in params}
    return (f(plus) - f(minus)) / (2 * eps)


def dot(a, b):
    return sum(float((a[n] * b[n]).sum()) for n in b)


def random_direction(params, seed):
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=generator, dtype=p.dtype) for n, p in params.items()}


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inner_steps", [2, 3])
def test_maml_matches_finite_differences_through_the_inner_loop(model, loss_fn, inner_steps):
    params, episode, alpha = make_params(model), make_episode(10), 0.3
    grads, _ = meta_gradient(model, params, [episode], algorithm="maml", inner_steps=inner_steps,
                             inner_lr=alpha, loss_fn=loss_fn)
    f = lambda p: query_loss_after_adaptation(model, p, episode, inner_steps, alpha, loss_fn)  # noqa: E731
    for seed in range(3):
        direction = random_direction(params, seed)
        numeric = directional_fd(f, params, direction)
        assert dot(grads, direction) == pytest.approx(numeric, rel=1e-6, abs=1e-9)
    # And coordinate by coordinate on a few entries of the first conv.
    name = next(iter(params))
    for index in range(3):
        direction = {n: torch.zeros_like(p) for n, p in params.items()}
        direction[name].view(-1)[index] = 1.0
        assert float(grads[name].view(-1)[index]) == pytest.approx(directional_fd(f, params, direction), rel=1e-6, abs=1e-9)


def test_fomaml_differs_from_finite_differences_and_equals_query_gradient_at_adapted(model, loss_fn):
    params, episode, alpha, steps = make_params(model), make_episode(11), 0.3, 2
    fo, _ = meta_gradient(model, params, [episode], algorithm="fomaml", inner_steps=steps, inner_lr=alpha, loss_fn=loss_fn)
    so, _ = meta_gradient(model, params, [episode], algorithm="maml", inner_steps=steps, inner_lr=alpha, loss_fn=loss_fn)

    # Reference: gradient of the query loss at the detached θ′.
    sx, sy, qx, qy = episode
    p = {n: v.clone().requires_grad_(True) for n, v in params.items()}
    adapted = {n: v.detach().requires_grad_(True)
               for n, v in reference_adapt(model, p, sx, sy, steps, alpha, loss_fn, create_graph=False).items()}
    loss = loss_fn(functional_call(model, adapted, (qx,)), qy)
    reference = dict(zip(adapted, torch.autograd.grad(loss, list(adapted.values()))))
    for n in params:
        torch.testing.assert_close(fo[n], reference[n], rtol=1e-10, atol=1e-12)

    f = lambda q: query_loss_after_adaptation(model, q, episode, steps, alpha, loss_fn)  # noqa: E731
    direction = random_direction(params, 5)
    numeric = directional_fd(f, params, direction)
    maml_error = abs(dot(so, direction) - numeric)
    fomaml_error = abs(dot(fo, direction) - numeric)
    assert maml_error < 1e-6 * max(1.0, abs(numeric))
    assert fomaml_error > 1e3 * maml_error, "FOMAML should miss the second-order term that MAML keeps"


def test_metasgd_with_equal_step_sizes_is_exactly_maml(model, loss_fn):
    params, episodes, alpha = make_params(model), [make_episode(12), make_episode(13)], 0.2
    maml, maml_stats = meta_gradient(model, params, episodes, algorithm="maml", inner_steps=2, inner_lr=alpha, loss_fn=loss_fn)
    step_sizes = init_step_sizes(params, alpha)
    msgd, msgd_stats = meta_gradient(model, params, episodes, algorithm="metasgd", inner_steps=2, inner_lr=step_sizes,
                                     loss_fn=loss_fn)
    assert set(msgd) == set(params) | {f"lr.{n}" for n in params}
    for n in params:
        torch.testing.assert_close(msgd[n], maml[n], rtol=0, atol=1e-14)
    assert msgd_stats == pytest.approx(maml_stats)


def test_metasgd_step_size_gradients_match_finite_differences(model, loss_fn):
    params, episode, steps = make_params(model), make_episode(14), 2
    step_sizes = {n: a + 0.05 * torch.rand_like(a) for n, a in init_step_sizes(params, 0.2).items()}
    grads, _ = meta_gradient(model, params, [episode], algorithm="metasgd", inner_steps=steps, inner_lr=step_sizes,
                             loss_fn=loss_fn)
    lr_grads = {n: grads[f"lr.{n}"] for n in params}
    f = lambda alphas: query_loss_after_adaptation(model, params, episode, steps, alphas, loss_fn)  # noqa: E731
    for seed in range(2):
        direction = random_direction(step_sizes, 100 + seed)
        assert dot(lr_grads, direction) == pytest.approx(directional_fd(f, step_sizes, direction), rel=1e-6, abs=1e-9)
    # The step-size gradient is not θ's gradient (a known bug of the public Flower baseline).
    assert any(not torch.allclose(lr_grads[n], grads[n]) for n in params)


def test_metasgd_accepts_a_float_as_the_initial_step_size(model, loss_fn):
    params, episode = make_params(model), make_episode(15)
    from_float, _ = meta_gradient(model, params, [episode], algorithm="metasgd", inner_steps=1, inner_lr=0.1, loss_fn=loss_fn)
    from_dict, _ = meta_gradient(model, params, [episode], algorithm="metasgd", inner_steps=1,
                                 inner_lr=init_step_sizes(params, 0.1), loss_fn=loss_fn)
    for key in from_dict:
        torch.testing.assert_close(from_float[key], from_dict[key], rtol=0, atol=0)


def test_reptile_with_one_step_is_alpha_times_the_support_gradient(model, loss_fn):
    params, episode, alpha = make_params(model), make_episode(16), 0.25
    grads, _ = meta_gradient(model, params, [episode], algorithm="reptile", inner_steps=1, inner_lr=alpha, loss_fn=loss_fn)
    sx, sy, _, _ = episode
    p = {n: v.clone().requires_grad_(True) for n, v in params.items()}
    support_grad = torch.autograd.grad(loss_fn(functional_call(model, p, (sx,)), sy), list(p.values()))
    for n, g in zip(p, support_grad):
        torch.testing.assert_close(grads[n], alpha * g, rtol=1e-10, atol=1e-13)


def test_fedavg_pseudo_gradients_with_server_sgd_lr_1_are_weighted_averaging(model, loss_fn):
    params, alpha, epochs = make_params(model), 0.1, 2
    sites = [[make_episode(20), make_episode(21)], [make_episode(22, k=3, q=1)], [make_episode(23, k=1, q=1)]]
    updates, weights, local_models = [], [], []
    for episodes in sites:
        grads, stats = meta_gradient(model, params, episodes, algorithm="fedavg", inner_steps=epochs, inner_lr=alpha,
                                     loss_fn=loss_fn)
        updates.append(grads)
        weights.append(stats["num_examples"])
        # Reference local training: plain autograd SGD through support then query, per epoch.
        local = {n: v.clone() for n, v in params.items()}
        for _ in range(epochs):
            for sx, sy, qx, qy in episodes:
                for x, y in ((sx, sy), (qx, qy)):
                    local = {n: v.detach().requires_grad_(True) for n, v in local.items()}
                    g = torch.autograd.grad(loss_fn(functional_call(model, local, (x,)), y), list(local.values()))
                    local = {n: v.detach() - alpha * gi for (n, v), gi in zip(local.items(), g)}
        local_models.append(local)
    assert weights == [8.0, 4.0, 2.0]
    total = sum(weights)
    aggregate = {n: sum(w * u[n] for w, u in zip(weights, updates)) / total for n in params}
    server = MetaOptimizer(params, optimizer="sgd", lr=1.0)
    server.step(aggregate)
    fedavg = {n: sum(w * m[n] for w, m in zip(weights, local_models)) / total for n in params}
    for n in params:
        torch.testing.assert_close(server.params[n], fedavg[n], rtol=1e-12, atol=1e-12)


def test_fedprox_pulls_the_local_model_towards_theta(model, loss_fn):
    params, episodes = make_params(model), [make_episode(24)]
    plain, _ = meta_gradient(model, params, episodes, algorithm="fedavg", inner_steps=3, inner_lr=0.2, loss_fn=loss_fn)
    prox, _ = meta_gradient(model, params, episodes, algorithm="fedprox", inner_steps=3, inner_lr=0.2, loss_fn=loss_fn,
                            proximal_mu=2.0)
    norm = lambda g: math.sqrt(sum(float((v ** 2).sum()) for v in g.values()))  # noqa: E731
    assert norm(prox) < norm(plain)
    zero_mu, _ = meta_gradient(model, params, episodes, algorithm="fedprox", inner_steps=3, inner_lr=0.2, loss_fn=loss_fn)
    for n in params:
        torch.testing.assert_close(zero_mu[n], plain[n], rtol=0, atol=0)


def test_anil_adapts_only_the_head_but_returns_every_meta_gradient(model, loss_fn):
    params, episode, alpha, steps = make_params(model), make_episode(30), 0.3, 2
    head = head_parameter_names(model)
    body = [n for n in params if n not in head]
    assert head and body
    sx, sy, qx, qy = episode
    adapted = adapt(model, params, sx, sy, inner_steps=steps, inner_lr=alpha, loss_fn=loss_fn, inner_params=head)
    for n in body:
        assert torch.equal(adapted[n], params[n]), f"{n} is not in the head but moved in the inner loop"
    assert any(not torch.equal(adapted[n], params[n]) for n in head)

    grads, _ = meta_gradient(model, params, [episode], algorithm="anil", inner_steps=steps, inner_lr=alpha, loss_fn=loss_fn)
    assert set(grads) == set(params)
    for n in body:
        assert float(grads[n].abs().sum()) > 0, f"no meta-gradient for body parameter {n}"
    f = lambda p: query_loss_after_adaptation(model, p, episode, steps, alpha, loss_fn, names=head)  # noqa: E731
    direction = random_direction(params, 7)
    assert dot(grads, direction) == pytest.approx(directional_fd(f, params, direction), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("algorithm", INITIALISATION_ALGORITHMS)
def test_grads_have_the_keys_shapes_and_dtypes_of_params_and_stats_are_floats(model, loss_fn, algorithm):
    params = make_params(model)
    episodes = [make_episode(40), make_episode(41, k=3, q=1)]
    grads, stats = meta_gradient(model, params, episodes, algorithm=algorithm, inner_steps=1, inner_lr=0.1,
                                 loss_fn=loss_fn)
    step_keys = {f"lr.{n}" for n in params} if algorithm == "metasgd" else set()
    assert set(grads) == set(params) | step_keys
    for n, p in params.items():
        assert grads[n].shape == p.shape and grads[n].dtype == p.dtype
        assert not grads[n].requires_grad
        assert torch.isfinite(grads[n]).all()
    assert set(stats) == {"support_loss_before", "support_loss_after", "query_loss_before", "query_loss_after",
                          "num_examples"}
    assert all(type(v) is float for v in stats.values())
    assert stats["num_examples"] == 8.0
    if algorithm != "anil":  # adapting the whole model on the support set must lower its loss
        assert stats["support_loss_after"] < stats["support_loss_before"]


def test_meta_gradient_is_averaged_over_episodes(model, loss_fn):
    params, a, b = make_params(model), make_episode(50), make_episode(51)
    both, _ = meta_gradient(model, params, [a, b], algorithm="maml", inner_steps=1, inner_lr=0.1, loss_fn=loss_fn)
    ga, _ = meta_gradient(model, params, [a], algorithm="maml", inner_steps=1, inner_lr=0.1, loss_fn=loss_fn)
    gb, _ = meta_gradient(model, params, [b], algorithm="maml", inner_steps=1, inner_lr=0.1, loss_fn=loss_fn)
    for n in params:
        torch.testing.assert_close(both[n], (ga[n] + gb[n]) / 2, rtol=1e-12, atol=1e-14)


def test_meta_gradient_does_not_touch_the_model_or_params(model, loss_fn):
    params = make_params(model)
    before_model = {n: p.detach().clone() for n, p in model.named_parameters()}
    before_params = {n: p.clone() for n, p in params.items()}
    meta_gradient(model, params, [make_episode(60)], algorithm="maml", inner_steps=2, inner_lr=0.1, loss_fn=loss_fn)
    for n, p in model.named_parameters():
        assert torch.equal(p, before_model[n])
    for n in params:
        assert torch.equal(params[n], before_params[n])


def test_zero_inner_steps_maml_is_the_plain_query_gradient(model, loss_fn):
    params, episode = make_params(model), make_episode(61)
    grads, stats = meta_gradient(model, params, [episode], algorithm="maml", inner_steps=0, inner_lr=0.1, loss_fn=loss_fn)
    _, _, qx, qy = episode
    p = {n: v.clone().requires_grad_(True) for n, v in params.items()}
    reference = torch.autograd.grad(loss_fn(functional_call(model, p, (qx,)), qy), list(p.values()))
    for n, g in zip(p, reference):
        torch.testing.assert_close(grads[n], g, rtol=1e-12, atol=1e-14)
    assert stats["query_loss_before"] == stats["query_loss_after"]


# --------------------------------------------------------------------------------------------------
# Bad arguments: each raises its own message.


def _bad_cases(model):
    params = make_params(model)
    episode = make_episode(70)
    name = next(iter(params))
    nan_x = episode[0].clone()
    nan_x[0, 0, 0, 0] = float("nan")
    wrong_shape = dict(params)
    wrong_shape[name] = torch.zeros(7, dtype=torch.float64)
    missing = dict(params)
    missing.pop(name)
    extra = {**params, "lr.extra": torch.zeros(1, dtype=torch.float64)}
    nan_params = dict(params)
    nan_params[name] = params[name].clone().fill_(float("inf"))
    ok = dict(params=params, episodes=[episode], algorithm="maml", inner_steps=1, inner_lr=0.1)
    return [
        ("unknown algorithm", {**ok, "algorithm": "maml2"}, r"unknown algorithm 'maml2'; valid choices: maml, fomaml"),
        ("negative steps", {**ok, "inner_steps": -1}, r"inner_steps=-1 is negative"),
        ("float steps", {**ok, "inner_steps": 1.5}, r"inner_steps must be an int >= 0"),
        ("bool steps", {**ok, "inner_steps": True}, r"inner_steps must be an int >= 0"),
        ("negative lr", {**ok, "inner_lr": -0.1}, r"inner_lr=-0.1 must be finite and >= 0"),
        ("nan lr", {**ok, "inner_lr": float("nan")}, r"inner_lr=nan must be finite"),
        ("dict lr for maml", {**ok, "inner_lr": init_step_sizes(params, 0.1)}, r"only algorithm='metasgd' learns"),
        ("partial metasgd lr", {**ok, "algorithm": "metasgd", "inner_lr": {name: torch.tensor(0.1)}},
         r"one step size per adapted parameter: missing"),
        ("nan input", {**ok, "episodes": [(nan_x, *episode[1:])]}, r"episode 0 support_x holds NaN or Inf"),
        ("empty episodes", {**ok, "episodes": []}, r"episodes must be a non-empty list"),
        ("short episode", {**ok, "episodes": [episode[:3]]}, r"episode 0 must be a 4-tuple"),
        ("count mismatch", {**ok, "episodes": [(episode[0], episode[1][:1], *episode[2:])]},
         r"images and targets disagree in count"),
        ("wrong shape", {**ok, "params": wrong_shape}, r"has shape \(7,\) but the model expects"),
        ("missing key", {**ok, "params": missing}, r"params do not match UNet: missing"),
        ("extra key", {**ok, "params": extra}, r"unexpected \['lr.extra'\]"),
        ("non-finite params", {**ok, "params": nan_params}, r"holds NaN or Inf values; θ must be finite"),
        ("unknown inner param", {**ok, "inner_params": ["nope"]}, r"inner_params names \['nope'\] are not parameters"),
        ("empty inner params", {**ok, "inner_params": []}, r"inner_params is empty"),
        ("mu for maml", {**ok, "proximal_mu": 0.1}, r"proximal_mu=0.1 applies only to algorithm='fedprox'"),
        ("negative mu", {**ok, "algorithm": "fedprox", "proximal_mu": -1.0}, r"proximal_mu=-1.0 is negative"),
    ]


def test_bad_arguments_raise_their_own_message(model, loss_fn):
    for label, kwargs, pattern in _bad_cases(model):
        with pytest.raises(ValueError, match=pattern):
            meta_gradient(model, loss_fn=loss_fn, **kwargs)


def test_non_callable_loss_is_refused(model):
    with pytest.raises(ValueError, match="loss_fn must be callable"):
        meta_gradient(model, make_params(model), [make_episode(71)], algorithm="maml", inner_steps=1, inner_lr=0.1,
                      loss_fn="dice")


# --------------------------------------------------------------------------------------------------
# The meta-optimiser


@pytest.mark.parametrize("kind,lr", [("adam", 1e-2), ("sgd", 0.5)])
def test_meta_optimizer_state_round_trips_bit_for_bit(model, kind, lr):
    params = make_params(model)
    step_sizes = init_step_sizes(params, 0.1)
    gens = [random_direction({**params, **{f"lr.{n}": a for n, a in step_sizes.items()}}, s) for s in range(3)]
    straight = MetaOptimizer(params, optimizer=kind, lr=lr, step_sizes=step_sizes, momentum=0.9 if kind == "sgd" else 0)
    for g in gens:
        straight.step(g)
    first = MetaOptimizer(params, optimizer=kind, lr=lr, step_sizes=step_sizes, momentum=0.9 if kind == "sgd" else 0)
    for g in gens[:2]:
        first.step(g)
    state = first.state_dict()
    resumed = MetaOptimizer(make_params(model, seed=99), optimizer=kind, lr=lr, step_sizes=step_sizes,
                            momentum=0.9 if kind == "sgd" else 0)
    resumed.load_state_dict(state)
    resumed.step(gens[2])
    for n in params:
        assert torch.equal(resumed.params[n], straight.params[n])
    for n in step_sizes:
        assert torch.equal(resumed.step_sizes[n], straight.step_sizes[n])


def test_meta_optimizer_adam_keeps_its_moments_across_rounds(model):
    """Adam's second step differs from a fresh Adam's first: its state accumulates across rounds."""
    params = make_params(model)
    g1, g2 = random_direction(params, 3), random_direction(params, 4)
    persistent = MetaOptimizer(params, lr=0.01)
    persistent.step(g1)
    after_one = persistent.params
    persistent.step(g2)
    rebuilt = MetaOptimizer(after_one, lr=0.01)
    rebuilt.step(g2)
    assert any(not torch.allclose(persistent.params[n], rebuilt.params[n]) for n in params)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(optimizer="adamw", lr=0.1), r"unknown meta-optimizer 'adamw'; valid choices: adam, sgd"),
        (dict(lr=0.0), r"meta lr=0.0 must be a finite float > 0"),
        (dict(lr=float("inf")), r"meta lr=inf must be a finite float > 0"),
    ],
)
def test_meta_optimizer_bad_arguments(model, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MetaOptimizer(make_params(model), **kwargs)


def test_meta_optimizer_refuses_mismatched_or_non_finite_gradients(model):
    params = make_params(model)
    opt = MetaOptimizer(params, lr=0.1)
    name = next(iter(params))
    with pytest.raises(ValueError, match="missing"):
        opt.step({n: g for n, g in params.items() if n != name})
    bad = {n: torch.zeros_like(p) for n, p in params.items()}
    bad[name] = bad[name].fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN or Inf; refusing to corrupt θ"):
        opt.step(bad)
    with pytest.raises(ValueError, match="holds a 'adam' meta-optimiser but this run uses 'sgd'"):
        MetaOptimizer(params, optimizer="sgd", lr=1.0).load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match=r"lr=0.1 differs from this run's lr=0.2"):
        MetaOptimizer(params, lr=0.2).load_state_dict(opt.state_dict())


def test_the_run_config_names_the_same_algorithms_and_optimisers_as_the_core():
    from fedmeta.common import config, metaopt
    from fedmeta.common.algorithms import ALGORITHMS

    assert config.ALGORITHMS == tuple(ALGORITHMS)  # the wire's names are the registry's, in its order
    assert config.META_OPTIMIZERS == metaopt.OPTIMIZERS


# --------------------------------------------------------------------------------------------------
# MAML++ options: the multi-step loss and derivative-order annealing


def multi_step_query_loss(model, params, episode, steps, alpha, loss_fn, weights):
    """Σ_j w_j L_Q(θ_j), θ_j after j SGD steps on the support set (plain autograd, no graph kept)."""
    sx, sy, qx, qy = episode
    total, adapted = 0.0, params
    with torch.enable_grad():
        for j in range(steps):
            adapted = reference_adapt(model, {n: v.detach().requires_grad_(True) for n, v in adapted.items()},
                                      sx, sy, 1, alpha, loss_fn, create_graph=False)
            total += weights[j] * float(loss_fn(functional_call(model, adapted, (qx,)), qy).detach())
    return total


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
def test_multi_step_loss_matches_finite_differences(model, loss_fn, algorithm):
    params, episode, alpha, steps = make_params(model), make_episode(21), 0.3, 3
    weights = [0.2, 0.3, 0.5]
    grads, _ = meta_gradient(model, params, [episode], algorithm=algorithm, inner_steps=steps, inner_lr=alpha,
                             loss_fn=loss_fn, step_weights=weights)
    f = lambda p: multi_step_query_loss(model, p, episode, steps, alpha, loss_fn, weights)  # noqa: E731
    for seed in range(2):
        direction = random_direction(params, seed)
        assert dot(grads, direction) == pytest.approx(directional_fd(f, params, direction), rel=1e-6, abs=1e-9)
    if algorithm == "metasgd":  # the step sizes' gradient too: perturb every α by the same direction
        alphas = init_step_sizes(params, alpha)
        g = lambda a: multi_step_query_loss(model, params, episode, steps, a, loss_fn, weights)  # noqa: E731
        direction = random_direction(alphas, 7)
        numeric = directional_fd(g, alphas, direction, eps=1e-6)
        analytic = sum(float((grads["lr." + n] * direction[n]).sum()) for n in alphas)
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9)
    # Weight on the last step only is plain MAML.
    last_only, _ = meta_gradient(model, params, [episode], algorithm=algorithm, inner_steps=steps, inner_lr=alpha,
                                 loss_fn=loss_fn, step_weights=[0.0, 0.0, 1.0])
    plain, _ = meta_gradient(model, params, [episode], algorithm=algorithm, inner_steps=steps, inner_lr=alpha,
                             loss_fn=loss_fn)
    for n in plain:
        torch.testing.assert_close(last_only[n], plain[n], rtol=1e-12, atol=1e-14)


def test_multi_step_loss_weights_anneal_to_the_last_step():
    from fedmeta.common.meta import multi_step_loss_weights

    assert multi_step_loss_weights(3, 1, 10) == pytest.approx([1 / 3] * 3)
    middle = multi_step_loss_weights(3, 6, 10)
    assert middle[0] == middle[1] == pytest.approx(1 / 3 * 0.5) and sum(middle) == pytest.approx(1.0)
    assert multi_step_loss_weights(3, 11, 10) is None  # after the annealing: plain last-step meta-loss
    assert multi_step_loss_weights(3, 1, 0) is None and multi_step_loss_weights(1, 1, 10) is None


def test_first_order_annealing_is_fomaml_and_refused_where_it_means_nothing(model, loss_fn):
    params, episode = make_params(model), make_episode(22)
    annealed, _ = meta_gradient(model, params, [episode], algorithm="maml", inner_steps=2, inner_lr=0.3,
                                loss_fn=loss_fn, first_order=True)
    fomaml, _ = meta_gradient(model, params, [episode], algorithm="fomaml", inner_steps=2, inner_lr=0.3, loss_fn=loss_fn)
    for n in fomaml:
        torch.testing.assert_close(annealed[n], fomaml[n], rtol=0, atol=0)
    head = head_parameter_names(model)
    anil_fo, _ = meta_gradient(model, params, [episode], algorithm="anil", inner_steps=2, inner_lr=0.3,
                               loss_fn=loss_fn, first_order=True)
    fomaml_head, _ = meta_gradient(model, params, [episode], algorithm="fomaml", inner_steps=2, inner_lr=0.3,
                                   loss_fn=loss_fn, inner_params=head)
    for n in fomaml_head:
        torch.testing.assert_close(anil_fo[n], fomaml_head[n], rtol=0, atol=0)
    with pytest.raises(ValueError, match="first_order=True anneals maml or anil"):
        meta_gradient(model, params, [episode], algorithm="metasgd", inner_steps=2, inner_lr=0.3, loss_fn=loss_fn,
                      first_order=True)
    with pytest.raises(ValueError, match="multi-step loss"):
        meta_gradient(model, params, [episode], algorithm="fomaml", inner_steps=2, inner_lr=0.3, loss_fn=loss_fn,
                      step_weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="2 finite weights"):
        meta_gradient(model, params, [episode], algorithm="maml", inner_steps=2, inner_lr=0.3, loss_fn=loss_fn,
                      step_weights=[1.0])


def test_run_config_refuses_maml_plus_plus_keys_where_they_mean_nothing():
    from fedmeta.common.config import RunConfig

    with pytest.raises(ValueError, match="multi-step-loss-rounds.*fomaml"):
        RunConfig(algorithm="fomaml", multi_step_loss_rounds=5)
    with pytest.raises(ValueError, match="first-order-rounds.*metasgd"):
        RunConfig(algorithm="metasgd", first_order_rounds=5)
    assert RunConfig(algorithm="maml", multi_step_loss_rounds=5, first_order_rounds=3).first_order_rounds == 3


def test_keys_added_later_at_their_default_leave_the_trajectory_hash_as_before():
    """MAML++'s and the privacy / robustness keys: checkpoints written before them still resume."""
    import hashlib
    import json as _json
    from dataclasses import asdict

    from fedmeta.common.config import _HASHED_WHEN_SET, _NOT_HASHED, RunConfig

    config = RunConfig(algorithm="maml", median_norm_bound=0.0)  # every later key at its "unset" value
    before = {k: v for k, v in asdict(config).items() if k not in _NOT_HASHED and k not in _HASHED_WHEN_SET}
    assert config.trajectory_hash() == hashlib.sha256(_json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert "dp" in _HASHED_WHEN_SET and "aggregation" in _HASHED_WHEN_SET
    # The default's hash before these keys existed, still given with the norm bound off: median-norm-bound's
    # default (1) changes the trajectory, so a checkpoint from before it resumes only with it set to 0.
    assert RunConfig(median_norm_bound=0.0).trajectory_hash() == "a99ce7c504953ee4"
    assert RunConfig().trajectory_hash() != "a99ce7c504953ee4"
    for changed in (dict(multi_step_loss_rounds=5), dict(dp="central"), dict(aggregation="median")):
        assert RunConfig(algorithm="maml", **changed).trajectory_hash() != config.trajectory_hash()


def test_per_layer_per_step_step_sizes_match_finite_differences_and_equal_maml_when_equal(model, loss_fn):
    """MAML++'s LSLR: one learned step size per parameter tensor and inner step."""
    params, episode, steps = make_params(model), make_episode(21), 2
    equal = init_step_sizes(params, 0.2, per_layer_steps=steps)
    assert all(a.shape == (steps,) + (1,) * params[n].dim() for n, a in equal.items())
    maml, _ = meta_gradient(model, params, [episode], algorithm="maml", inner_steps=steps, inner_lr=0.2, loss_fn=loss_fn)
    lslr, _ = meta_gradient(model, params, [episode], algorithm="metasgd", inner_steps=steps, inner_lr=equal,
                            loss_fn=loss_fn)
    for n in params:
        torch.testing.assert_close(lslr[n], maml[n], rtol=0, atol=1e-14)
        assert lslr[f"lr.{n}"].shape == equal[n].shape
    step_sizes = {n: a + 0.05 * torch.rand_like(a) for n, a in equal.items()}
    grads, _ = meta_gradient(model, params, [episode], algorithm="metasgd", inner_steps=steps, inner_lr=step_sizes,
                             loss_fn=loss_fn)
    lr_grads = {n: grads[f"lr.{n}"] for n in params}
    f = lambda alphas: query_loss_after_adaptation(model, params, episode, steps, alphas, loss_fn)  # noqa: E731
    direction = random_direction(step_sizes, 7)
    assert dot(lr_grads, direction) == pytest.approx(directional_fd(f, step_sizes, direction), rel=1e-6, abs=1e-9)
    # Each step has its own rate: the two steps' gradients differ.
    assert any(not torch.allclose(g[0], g[1]) for g in lr_grads.values())


def test_adapting_in_parts_uses_each_steps_own_rate(model, loss_fn):
    params, (support_x, support_y, _, _) = make_params(model), make_episode(22)
    rates = {n: torch.tensor([0.3, 0.1, 0.05], dtype=p.dtype).reshape((3,) + (1,) * p.dim()) for n, p in params.items()}
    whole = adapt(model, params, support_x, support_y, inner_steps=4, inner_lr=rates, loss_fn=loss_fn)
    part = adapt(model, params, support_x, support_y, inner_steps=1, inner_lr=rates, loss_fn=loss_fn)
    part = adapt(model, part, support_x, support_y, inner_steps=3, inner_lr=rates, loss_fn=loss_fn, first_step=1)
    for n in params:
        torch.testing.assert_close(part[n], whole[n], rtol=0, atol=1e-12)
    wrong = adapt(model, params, support_x, support_y, inner_steps=1, inner_lr=rates, loss_fn=loss_fn)
    wrong = adapt(model, wrong, support_x, support_y, inner_steps=3, inner_lr=rates, loss_fn=loss_fn)  # restarts at step 0
    assert any(not torch.allclose(wrong[n], whole[n]) for n in params)


def test_run_config_step_sizes_key():
    from fedmeta.common.config import RunConfig

    assert RunConfig(algorithm="metasgd", step_sizes="per-layer-step", inner_steps=3).per_layer_steps == 3
    assert RunConfig(algorithm="metasgd").per_layer_steps == 0
    with pytest.raises(ValueError, match="step-sizes.*maml"):
        RunConfig(algorithm="maml", step_sizes="per-layer-step")
    with pytest.raises(ValueError, match="step-sizes"):
        RunConfig(algorithm="metasgd", step_sizes="per-layer")
    assert (RunConfig(algorithm="metasgd", step_sizes="per-layer-step").trajectory_hash()
            != RunConfig(algorithm="metasgd").trajectory_hash())


# --------------------------------------------------------------------------------------------------
# FOMAML's episodes batched (torch.func.vmap): the loop's numbers


@pytest.mark.parametrize("inner_steps, chunk, head_only", [(1, 4, False), (2, 2, False), (0, 4, False), (2, 4, True)])
def test_batched_fomaml_equals_the_loop_in_float64(model, loss_fn, monkeypatch, inner_steps, chunk, head_only):
    from fedmeta.common.algorithms import maml as meta_module  # FOMAML's batching lives with the MAML family

    monkeypatch.setattr(meta_module, "EPISODE_CHUNK", chunk)  # 3 episodes in chunks of 2: the chunked path
    params = make_params(model)
    episodes = [make_episode(seed) for seed in (11, 12, 13)]
    # ANIL annealed to first order is FOMAML on the head alone: the batched path adapts a subset too.
    algorithm, extra = ("anil", {"first_order": True}) if head_only else ("fomaml", {})
    loop, loop_stats = meta_gradient(model, params, episodes, algorithm=algorithm, inner_steps=inner_steps,
                                     inner_lr=0.1, loss_fn=loss_fn, batch_episodes=False, **extra)
    batched, batched_stats = meta_gradient(model, params, episodes, algorithm=algorithm, inner_steps=inner_steps,
                                           inner_lr=0.1, loss_fn=loss_fn, batch_episodes=True, **extra)
    assert batched.keys() == loop.keys()
    for name in loop:
        assert batched[name].dtype == loop[name].dtype == torch.float64
        torch.testing.assert_close(batched[name], loop[name], rtol=1e-10, atol=1e-13)
    assert batched_stats.keys() == loop_stats.keys()
    for key in loop_stats:
        assert batched_stats[key] == pytest.approx(loop_stats[key], rel=1e-12), key
    # The default batches from BATCH_FROM episodes on (measured faster only there) and loops below it.
    monkeypatch.setattr(meta_module, "BATCH_FROM", 3)
    default, _ = meta_gradient(model, params, episodes, algorithm=algorithm, inner_steps=inner_steps, inner_lr=0.1,
                               loss_fn=loss_fn, **extra)
    assert all(torch.equal(default[n], batched[n]) for n in loop)
    monkeypatch.setattr(meta_module, "BATCH_FROM", 4)
    default, _ = meta_gradient(model, params, episodes, algorithm=algorithm, inner_steps=inner_steps, inner_lr=0.1,
                               loss_fn=loss_fn, **extra)
    assert all(torch.equal(default[n], loop[n]) for n in loop)


def test_batching_is_refused_where_it_does_not_apply_and_mixed_shapes_fall_back_to_the_loop(model, loss_fn):
    params = make_params(model)
    episodes = [make_episode(1), make_episode(2)]
    with pytest.raises(ValueError, match="batch_episodes=True batches FOMAML.*'maml'"):
        meta_gradient(model, params, episodes, algorithm="maml", inner_steps=1, inner_lr=0.1, loss_fn=loss_fn,
                      batch_episodes=True)
    mixed = [make_episode(1), make_episode(2), make_episode(3), make_episode(4, k=3)]  # BATCH_FROM of them
    with pytest.raises(ValueError, match="differ in shape"):
        meta_gradient(model, params, mixed, algorithm="fomaml", inner_steps=1, inner_lr=0.1, loss_fn=loss_fn,
                      batch_episodes=True)
    auto, _ = meta_gradient(model, params, mixed, algorithm="fomaml", inner_steps=1, inner_lr=0.1, loss_fn=loss_fn)
    loop, _ = meta_gradient(model, params, mixed, algorithm="fomaml", inner_steps=1, inner_lr=0.1, loss_fn=loss_fn,
                            batch_episodes=False)
    assert all(torch.equal(auto[n], loop[n]) for n in loop)


def test_a_model_with_active_dropout_keeps_the_loop():
    """vmap draws dropout masks differently from the loop: the default loops, and asking to batch is refused."""
    from fedmeta.common.losses import DiceCELoss
    from fedmeta.common.model import ModelConfig, build_model

    net = build_model(ModelConfig(out_channels=NUM_CLASSES, channels=(3, 4), strides=(2,), dropout=0.2)).double()
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    episodes = [make_episode(seed) for seed in range(4)]
    loss = DiceCELoss(NUM_CLASSES)
    meta_gradient(net, params, episodes, algorithm="fomaml", inner_steps=1, inner_lr=0.1, loss_fn=loss)  # no error
    with pytest.raises(ValueError, match="dropout is active"):
        meta_gradient(net, params, episodes, algorithm="fomaml", inner_steps=1, inner_lr=0.1, loss_fn=loss,
                      batch_episodes=True)
