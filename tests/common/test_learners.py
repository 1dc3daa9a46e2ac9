"""The other meta-learning families (fedmeta.common.algorithms: fast_weights, prototypes, lstm_optimizer) against references: finite differences in
float64 on a tiny UNet, and the learners' reductions to the initialisation family."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from fedmeta.common.algorithms import NETWORKS, algorithm_of, fast_weights, lstm_optimizer, prototypes
from fedmeta.common.algorithms.checks import meta_only_names
from fedmeta.common.config import RunConfig
from fedmeta.common.losses import DiceCELoss, one_hot
from fedmeta.common.meta import adapt, adaptation_trajectory, meta_gradient
from fedmeta.common.model import ModelConfig, build_model, head_parameter_names
from tests.common.test_meta import directional_fd, dot, random_direction  # the core's finite-difference helpers

NUM_CLASSES = 3
SIDE = 8


def tiny(learner: str):
    torch.manual_seed(0)
    config = ModelConfig(out_channels=NUM_CLASSES, channels=(3, 4), strides=(2,), num_res_units=1, learner=learner,
                         generator_width=4, embedding_dim=4, lstm_hidden=3)
    return build_model(config).double()


@pytest.fixture(scope="module")
def loss_fn():
    return DiceCELoss(NUM_CLASSES)


def make_params(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    # Random everywhere (the generator's and LSTM's zero-initialised outputs too): every path carries gradient.
    return {n: torch.randn(p.shape, generator=generator, dtype=torch.float64) * 0.5 for n, p in model.named_parameters()}


def make_episode(seed, k=2, q=2, absent=None):
    generator = torch.Generator().manual_seed(seed)

    def batch(n):
        x = torch.randn(n, 1, SIDE, SIDE, generator=generator, dtype=torch.float64)
        y = torch.randint(0, NUM_CLASSES, (n, SIDE, SIDE), generator=generator)
        if absent is not None:
            y[y == absent] = 0
        return x, one_hot(y, NUM_CLASSES, torch.float64)

    return (*batch(k), *batch(q))


def reference_query_loss(model, params, episode, steps, alpha, loss_fn):
    """The learner's adaptation written out with plain autograd (no fedmeta.common.meta), then the query loss."""
    sx, sy, qx, qy = episode
    kind = getattr(model, 'learner', None)
    own = set(meta_only_names(model, list(params)))
    names = [n for n in params if n not in own]
    with torch.enable_grad():
        p = {n: v.detach().requires_grad_(n in names) for n, v in params.items()}
        if kind == "fast-weights":
            p = fast_weights.generate(model, p, sx, sy)
        if kind == "prototypes":
            p = prototypes.with_prototypes(model, p, sx, sy)
        state = None
        for _ in range(steps):
            if kind == "prototypes":
                loss = prototypes.prototype_support_loss(model, p, sx, sy, loss_fn)
            else:
                loss = loss_fn(functional_call(model, p, (sx,)), sy)
            grads = torch.autograd.grad(loss, [p[n] for n in names])
            if kind == "lstm-optimizer":
                grads, state = lstm_optimizer.lstm_directions(p, list(grads), loss, state)
            p = {**p, **{n: (p[n] - alpha * g).detach().requires_grad_(True) for n, g in zip(names, grads)}}
            if kind == "prototypes":
                p = prototypes.with_prototypes(model, p, sx, sy)
        if kind == "prototypes":  # the query in the support's label space, by hand
            absent = [c for c in range(NUM_CLASSES) if not bool(sy[:, c].any())]
            qy = qy.clone()
            for c in absent:
                qy[:, 0] += qy[:, c]
                qy[:, c] = 0
        return float(loss_fn(functional_call(model, p, (qx,)), qy).detach())


CASES = [("fast-weights", 0), ("fast-weights", 2), ("prototypes", 0), ("prototypes", 2), ("lstm-optimizer", 1),
         ("lstm-optimizer", 2)]


@pytest.mark.parametrize(("algorithm", "inner_steps"), CASES)
def test_meta_gradient_matches_finite_differences(loss_fn, algorithm, inner_steps):
    model = tiny(algorithm)
    params, episode, alpha = make_params(model), make_episode(10), 0.3
    if algorithm == "prototypes":  # a support without class 2, a query with it: the label-space case too
        sx, sy, _, _ = make_episode(10, absent=2)
        episode = (sx, sy, *episode[2:])
    grads, stats = meta_gradient(model, params, [episode], algorithm=algorithm, inner_steps=inner_steps,
                                 inner_lr=alpha, loss_fn=loss_fn)
    assert set(grads) == set(params) and all(torch.isfinite(g).all() for g in grads.values())
    f = lambda p: reference_query_loss(model, p, episode, inner_steps, alpha, loss_fn)  # noqa: E731
    assert stats["query_loss_after"] == pytest.approx(f(params), rel=1e-12)
    # The LSTM's input preprocessing is linear with slope e^10 for gradients below e^-10 (Andrychowicz et
    # al.): smooth, but curved enough that the difference step must be smaller.
    eps, rel = (1e-7, 1e-5) if algorithm == "lstm-optimizer" else (1e-5, 1e-6)
    for seed in range(2):
        direction = random_direction(params, seed)
        assert dot(grads, direction) == pytest.approx(directional_fd(f, params, direction, eps), rel=rel, abs=1e-9)
    # The learner's own parameters alone, where a mistake would hide among the UNet's many.
    own = meta_only_names(model, list(params))
    direction = {n: (random_direction(params, 7)[n] if n in own else torch.zeros_like(p)) for n, p in params.items()}
    assert dot(grads, direction) == pytest.approx(directional_fd(f, params, direction, eps), rel=rel, abs=1e-9)


def test_the_learners_own_parameters_are_meta_learned():
    for algorithm, expected in [("fast-weights", "generator."), ("prototypes", "log_scale"), ("lstm-optimizer", "lstm.")]:
        model = tiny(algorithm)
        grads, _ = meta_gradient(model, make_params(model), [make_episode(3)], algorithm=algorithm, inner_steps=1,
                                 inner_lr=0.3, loss_fn=DiceCELoss(NUM_CLASSES))
        assert any(k.startswith(expected) and float(g.abs().sum()) > 0 for k, g in grads.items()), algorithm


def test_fast_weights_with_a_silent_generator_is_maml(loss_fn):
    """A zero last generator layer generates nothing: the UNet's meta-gradient is MAML's, the same inner loop."""
    model, plain = tiny("fast-weights"), tiny("unet")
    params = make_params(model)
    for name in ("generator.7.weight", "generator.7.bias"):
        params[name] = torch.zeros_like(params[name])
    episode = make_episode(12)
    grads, _ = meta_gradient(model, params, [episode], algorithm="fast-weights", inner_steps=2, inner_lr=0.3,
                             loss_fn=loss_fn)
    unet = {n: p for n, p in params.items() if not n.startswith("generator.")}
    maml, _ = meta_gradient(plain, unet, [episode], algorithm="maml", inner_steps=2, inner_lr=0.3, loss_fn=loss_fn)
    for name in unet:
        torch.testing.assert_close(grads[name], maml[name], rtol=1e-10, atol=1e-12)


def test_lstm_optimizer_with_zero_output_weights_is_sgd_and_its_gradient_maml(loss_fn):
    model, plain = tiny("lstm-optimizer"), tiny("unet")
    params = make_params(model)
    params["lstm.weight_out"] = torch.zeros_like(params["lstm.weight_out"])
    episode = make_episode(13)
    grads, _ = meta_gradient(model, params, [episode], algorithm="lstm-optimizer", inner_steps=2, inner_lr=0.3,
                             loss_fn=loss_fn)
    unet = {n: p for n, p in params.items() if not n.startswith("lstm.")}
    maml, _ = meta_gradient(plain, unet, [episode], algorithm="maml", inner_steps=2, inner_lr=0.3, loss_fn=loss_fn)
    for name in unet:
        torch.testing.assert_close(grads[name], maml[name], rtol=1e-10, atol=1e-12)
    assert float(grads["lstm.weight_out"].abs().sum()) > 0  # and the optimiser still learns from there
    adapted = adapt(model, params, episode[0], episode[1], inner_steps=2, inner_lr=0.3, loss_fn=loss_fn)
    sgd = adapt(plain, unet, episode[0], episode[1], inner_steps=2, inner_lr=0.3, loss_fn=loss_fn)
    for name in unet:
        torch.testing.assert_close(adapted[name], sgd[name], rtol=1e-12, atol=1e-14)


def test_lstm_truncation_backpropagates_through_the_last_steps_only(loss_fn):
    model = tiny("lstm-optimizer")
    params, episode, alpha = make_params(model), make_episode(14), 0.3
    full, _ = meta_gradient(model, params, [episode], algorithm="lstm-optimizer", inner_steps=2, inner_lr=alpha,
                            loss_fn=loss_fn, truncation=0)
    same, _ = meta_gradient(model, params, [episode], algorithm="lstm-optimizer", inner_steps=2, inner_lr=alpha,
                            loss_fn=loss_fn, truncation=2)
    last, _ = meta_gradient(model, params, [episode], algorithm="lstm-optimizer", inner_steps=2, inner_lr=alpha,
                            loss_fn=loss_fn, truncation=1)
    for name in params:
        torch.testing.assert_close(full[name], same[name], rtol=0, atol=0)
    # Reference for T = 1: the first step taken without a graph, θ passed straight through it, its state
    # a constant; then one differentiated step and the query loss.
    sx, sy, qx, qy = episode
    names = [n for n in params if not n.startswith("lstm.")]
    theta = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    loss0 = loss_fn(functional_call(model, theta, (sx,)), sy)
    g0 = torch.autograd.grad(loss0, [theta[n] for n in names])
    with torch.no_grad():
        d0, state = lstm_optimizer.lstm_directions(theta, list(g0), loss0, None)
    first = {**theta, **{n: theta[n] + (-alpha * d).detach() for n, d in zip(names, d0)}}
    loss1 = loss_fn(functional_call(model, first, (sx,)), sy)
    g1 = torch.autograd.grad(loss1, [first[n] for n in names], create_graph=True)
    d1, _ = lstm_optimizer.lstm_directions(first, list(g1), loss1, tuple(t.detach() for t in state))
    second = {**first, **{n: first[n] - alpha * d for n, d in zip(names, d1)}}
    query = loss_fn(functional_call(model, second, (qx,)), qy)
    reference = dict(zip(theta, torch.autograd.grad(query, list(theta.values()), materialize_grads=True)))
    for name in params:
        torch.testing.assert_close(last[name], reference[name], rtol=1e-10, atol=1e-12)
    assert any(not torch.allclose(last[n], full[n]) for n in params), "truncation changed nothing"


def test_prototypes_are_masked_means_and_a_class_without_support_pixels_is_never_predicted():
    features = torch.tensor([[[[1.0, 3.0]], [[0.0, 2.0]]]])  # [B=1, E=2, 1, 2]
    masks = one_hot(torch.tensor([[[0, 0]]]), 3)  # every pixel background; classes 1 and 2 absent
    pooled = prototypes.masked_average_pooling(features, masks)
    torch.testing.assert_close(pooled, torch.tensor([[2.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
    logits = prototypes.prototype_logits(torch.randn(4, 2, 5, 5), pooled, torch.tensor(3.0))
    assert (logits.argmax(dim=1) == 0).all()
    # A site whose protocol merges class 2 into background: its support shows no class 2, nor do its predictions.
    model = tiny("prototypes")
    params = make_params(model)
    sx, sy, qx, _ = make_episode(15, k=3, absent=2)
    adapted = adapt(model, params, sx, sy, inner_steps=2, inner_lr=0.3, loss_fn=DiceCELoss(NUM_CLASSES))
    assert torch.equal(adapted["prototypes"][2], torch.zeros_like(adapted["prototypes"][2]))
    with torch.no_grad():
        predicted = functional_call(model, adapted, (qx,)).argmax(dim=1)
    assert not (predicted == 2).any() and (predicted != 0).any()


@pytest.mark.parametrize("algorithm", ["fast-weights", "prototypes", "lstm-optimizer"])
def test_adaptation_trajectory_is_adapt_step_by_step_and_leaves_theta_alone(loss_fn, algorithm):
    model = tiny(algorithm)
    params = make_params(model)
    before = {n: p.clone() for n, p in params.items()}
    sx, sy, *_ = make_episode(16)
    trajectory = list(adaptation_trajectory(model, params, sx, sy, inner_steps=3, inner_lr=0.3, loss_fn=loss_fn))
    assert len(trajectory) == 4
    for steps in (0, 3):
        adapted = adapt(model, params, sx, sy, inner_steps=steps, inner_lr=0.3, loss_fn=loss_fn)
        for name in params:
            torch.testing.assert_close(adapted[name], trajectory[steps][name], rtol=0, atol=0)
            assert not adapted[name].requires_grad
    for name in params:
        assert torch.equal(params[name], before[name])
    own = meta_only_names(model, list(params))
    for name in own:  # the learner's machinery is never stepped (prototypes are recomputed, not stepped)
        if name != "prototypes":
            assert torch.equal(trajectory[-1][name], params[name])
    if algorithm == "fast-weights":  # step 0 is the generated head, the rest of θ unchanged
        head = head_parameter_names(model)
        assert all(not torch.equal(trajectory[0][n], params[n]) for n in head)
        assert all(torch.equal(trajectory[0][n], params[n]) for n in params if n not in head)


def _bad(model, loss_fn):
    params, episode = make_params(model), make_episode(20)
    ok = dict(params=params, episodes=[episode], algorithm="lstm-optimizer", inner_steps=2, inner_lr=0.1,
              loss_fn=loss_fn)
    return [
        ({**ok, "algorithm": "maml"}, r"algorithm='maml' needs a plain UNet, and the model is the lstm-optimizer learner"),
        ({**ok, "algorithm": "prototypes"}, r"needs the prototypes learner's model"),
        ({**ok, "truncation": 3}, r"truncation=3 exceeds inner_steps=2"),
        ({**ok, "truncation": -1}, r"truncation=-1 must be an int >= 0"),
        ({**ok, "inner_params": ["lstm.bias"]}, r"the lstm-optimizer learner's own parameters"),
        ({**ok, "inner_lr": float("nan")}, r"inner_lr=nan must be finite"),
    ]


def test_bad_arguments_are_refused_by_name(loss_fn):
    model = tiny("lstm-optimizer")
    for kwargs, pattern in _bad(model, loss_fn):
        with pytest.raises(ValueError, match=pattern):
            meta_gradient(model, **kwargs)
    plain = tiny("unet")
    with pytest.raises(ValueError, match=r"algorithm='fast-weights' needs the fast-weights learner's model, and the "
                                         r"model is a plain UNet"):
        meta_gradient(plain, make_params(plain), [make_episode(21)], algorithm="fast-weights", inner_steps=0,
                      inner_lr=0.1, loss_fn=loss_fn)
    with pytest.raises(ValueError, match="truncation=1 truncates the learned optimiser"):
        meta_gradient(plain, make_params(plain), [make_episode(21)], algorithm="maml", inner_steps=1, inner_lr=0.1,
                      loss_fn=loss_fn, truncation=1)
    with pytest.raises(ValueError, match="adapts in one go"):
        adapt(model, make_params(model), *make_episode(22)[:2], inner_steps=1, inner_lr=0.1, loss_fn=loss_fn,
              first_step=1)
    with pytest.raises(ValueError, match=r"learner='hyper' is not supported"):
        ModelConfig(learner="hyper")
    with pytest.raises(ValueError, match=r"embedding_dim=0 must be an integer >= 1"):
        ModelConfig(learner="prototypes", embedding_dim=0)


def test_run_config_builds_each_learner_and_checks_its_keys():
    for algorithm, cls in NETWORKS.items():
        config = RunConfig(algorithm=algorithm)
        assert type(build_model(config.model_config())) is cls
    assert algorithm_of(build_model(RunConfig(algorithm="maml").model_config())) is None
    RunConfig(algorithm="prototypes", inner_steps=0)
    RunConfig(algorithm="fast-weights", inner_steps=0)
    with pytest.raises(ValueError, match=r"inner-steps=0: must be >= 1 \(0 only for fast-weights and prototypes"):
        RunConfig(algorithm="lstm-optimizer", inner_steps=0)
    with pytest.raises(ValueError, match=r"lstm-truncation=3: must be in \[0, inner-steps=2\]"):
        RunConfig(algorithm="lstm-optimizer", inner_steps=2, lstm_truncation=3)
    with pytest.raises(ValueError, match=r"lstm-truncation=1: truncates the learned optimiser's unroll; "
                                         r"algorithm='maml'"):
        RunConfig(algorithm="maml", inner_steps=2, lstm_truncation=1)
    with pytest.raises(ValueError, match=r"prototype-dim=0: must be in \[1, 1024\]"):
        RunConfig(algorithm="prototypes", prototype_dim=0)
    # Keys added later leave older runs' trajectory hash alone at their defaults.
    assert RunConfig().trajectory_hash() == RunConfig(lstm_hidden=8, prototype_dim=32).trajectory_hash()
    # ... and a learner's sizes shape only that learner's runs.
    assert RunConfig(algorithm="maml").trajectory_hash() == RunConfig(algorithm="maml", generator_width=64).trajectory_hash()
    assert (RunConfig(algorithm="fast-weights").trajectory_hash()
            != RunConfig(algorithm="fast-weights", generator_width=64).trajectory_hash())


def test_lstm_state_is_two_numbers_per_hidden_unit_and_adapted_scalar():
    model = build_model(RunConfig(algorithm="lstm-optimizer").model_config())
    unet = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("lstm."))
    assert lstm_optimizer.lstm_state_numbers(model, unet) == 2 * 8 * unet


def test_a_prototypes_query_is_scored_in_its_supports_label_space(loss_fn):
    """A query pixel of a class the support never shows counts as background: the learner cannot predict it,
    and its loss would otherwise drive the learned scale down (a review measured 18.6 against 1.4)."""
    model = tiny("prototypes")
    params = make_params(model)
    sx, sy, *_ = make_episode(30, absent=2)
    _, _, qx, qy = make_episode(31)
    assert bool(qy[:, 2].any())
    adapted = adapt(model, params, sx, sy, inner_steps=0, inner_lr=0.1, loss_fn=loss_fn)
    moved = prototypes.in_support_label_space(model, adapted, qy)
    assert not moved[:, 2].any() and torch.equal(moved[:, 0], qy[:, 0] + qy[:, 2]) and torch.equal(moved[:, 1], qy[:, 1])
    assert torch.equal(prototypes.in_support_label_space(tiny("fast-weights"), adapted, qy), qy)
    _, stats = meta_gradient(model, params, [(sx, sy, qx, qy)], algorithm="prototypes", inner_steps=0, inner_lr=0.1,
                             loss_fn=loss_fn)
    assert stats["query_loss_after"] == pytest.approx(float(loss_fn(functional_call(model, adapted, (qx,)), moved)))


def test_a_learner_at_zero_steps_takes_each_statistic_once(monkeypatch):
    """At 0 inner steps "after" is "before": the support loss is taken once and the query loss is the one the
    meta-gradient already computed (two of three statistics-only forward passes saved), the statistics unchanged."""
    from fedmeta.common import inner_loop
    from fedmeta.common.algorithms.base import LoopSettings
    from fedmeta.common.config import RunConfig
    from fedmeta.common.losses import DiceCELoss, one_hot
    from fedmeta.common.model import build_model

    torch.manual_seed(0)
    config = RunConfig(algorithm="prototypes", inner_steps=0, image_size=32, model_levels=3, model_base_channels=8)
    model = build_model(config.model_config())
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    episodes = [(torch.randn(3, 1, 32, 32, generator=generator),
                 one_hot(torch.randint(0, 4, (3, 32, 32), generator=generator), 4, torch.float32),
                 torch.randn(3, 1, 32, 32, generator=generator),
                 one_hot(torch.randint(0, 4, (3, 32, 32), generator=generator), 4, torch.float32)) for _ in range(2)]
    loop = LoopSettings(names=list(params), step_size=0.05, inner_steps=0, loss_fn=DiceCELoss(4))
    calls = []
    counted = inner_loop.no_grad_loss
    monkeypatch.setattr(inner_loop, "no_grad_loss", lambda *a, **k: calls.append(1) or counted(*a, **k))
    _, stats = config.algorithm_object.local_update(model, params, episodes, loop)
    assert len(calls) == len(episodes)  # the support loss; was 3 per episode
    assert stats["support_loss_before"] == stats["support_loss_after"]
    assert stats["query_loss_before"] == stats["query_loss_after"]
    support = sum(counted(model, config.algorithm_object.prepare(model, params, *e[:2], create_graph=False,
                                                                  inner_steps=0), e[0], e[1], loop.loss_fn)
                  for e in episodes) / len(episodes)
    assert stats["support_loss_before"] == pytest.approx(support, rel=1e-6)
