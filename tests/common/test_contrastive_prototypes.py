"""Prototypes with a contrastive pair loss (fedmeta.common.algorithms.contrastive_prototypes): the loss itself, the
learner's reduction to prototypes at λ = 0, and its meta-gradient against finite differences in float64."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedmeta.common.adaptation_variants import VARIANTS
from fedmeta.common.algorithms import ALGORITHMS, NETWORKS, algorithm_of
from fedmeta.common.algorithms.contrastive_prototypes import (
    ContrastivePrototypeUNet, contrastive_loss, pixel_pairs_loss, sample_pixels,
)
from fedmeta.common.config import RunConfig
from fedmeta.common.losses import DiceCELoss
from fedmeta.common.meta import meta_gradient
from fedmeta.common.model import ModelConfig, build_model
from fedmeta.common.protocol import PROTOTYPES_CONTRASTIVE
from tests.common.test_learners import NUM_CLASSES, make_episode, make_params, reference_query_loss
from tests.common.test_meta import directional_fd, dot, random_direction

CONFIG = ModelConfig(out_channels=NUM_CLASSES, channels=(3, 4), strides=(2,), num_res_units=1, embedding_dim=4,
                     learner=PROTOTYPES_CONTRASTIVE)


def tiny(weight: float = 0.5):
    torch.manual_seed(0)
    model = build_model(CONFIG).double()
    model.contrastive_weight = weight
    return model


def test_the_loss_is_zero_for_separated_embeddings_and_positive_otherwise():
    labels = torch.tensor([0, 0, 1, 1, 2])
    corners = torch.eye(3, dtype=torch.float64)  # orthogonal: d = √2 > margin 1
    separated = corners[labels] * torch.tensor([1.0, 3.0, 2.0, 0.5, 1.0], dtype=torch.float64)[:, None]  # norm is free
    assert contrastive_loss(separated, labels, margin=1.0) == 0
    assert contrastive_loss(separated, labels, margin=1.5) > 0  # √2 < 1.5: negatives inside the margin
    pulled_apart = separated.clone()
    pulled_apart[1] = torch.tensor([1.0, 0.2, 0.0], dtype=torch.float64)  # a positive pair not at d = 0
    assert contrastive_loss(pulled_apart, labels, margin=1.0) > 0
    collapsed = torch.ones(5, 3, dtype=torch.float64)  # every class on one point: the negatives pay m²/2
    assert contrastive_loss(collapsed, labels, margin=1.0) == pytest.approx(0.5 * 16 / 20)


def test_the_loss_has_a_gradient_where_two_pixels_coincide():
    embeddings = torch.ones(3, 2, dtype=torch.float64, requires_grad=True)
    contrastive_loss(embeddings, torch.tensor([0, 0, 1])).backward()
    assert torch.isfinite(embeddings.grad).all()


def test_pixels_are_drawn_class_balanced_from_the_labels_alone():
    labels = torch.zeros(1000, dtype=torch.long)
    labels[:10] = 1  # a rare class
    drawn = sample_pixels(labels, 400)
    assert torch.equal(drawn, sample_pixels(labels, 400))
    assert 120 < int((labels[drawn] == 1).sum()) < 280  # about half, though 1 % of the pixels
    features = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    one_class = torch.zeros(1, NUM_CLASSES, 8, 8, dtype=torch.float64)
    one_class[:, 0] = 1
    assert pixel_pairs_loss(features, one_class, 1.0, 16) == 0


def test_it_is_registered_as_a_prototype_learner():
    algorithm = ALGORITHMS[PROTOTYPES_CONTRASTIVE]
    assert NETWORKS[PROTOTYPES_CONTRASTIVE] is ContrastivePrototypeUNet
    assert algorithm.own_keys == ("prototype_dim",) and algorithm.min_inner_steps == 0
    model = build_model(RunConfig(algorithm=PROTOTYPES_CONTRASTIVE).model_config())
    assert type(model) is ContrastivePrototypeUNet and algorithm_of(model) is algorithm
    assert VARIANTS["frozen-prototypes"].applies_to(PROTOTYPES_CONTRASTIVE)
    with pytest.raises(ValueError, match="contrastive_weight=-1"):
        ContrastivePrototypeUNet(num_classes=3, embedding_dim=4, contrastive_weight=-1, **_unet())


def _unet():
    return dict(spatial_dims=2, in_channels=1, out_channels=4, channels=(3, 4), strides=(2,), num_res_units=0)


@pytest.mark.parametrize("inner_steps", [0, 1])
def test_without_the_pair_loss_it_is_prototypes(inner_steps):
    model = tiny(weight=0.0)
    prototypes = build_model(dataclasses.replace(CONFIG, learner="prototypes")).double()
    params, episode = make_params(model), make_episode(4, absent=2)
    settings = dict(inner_steps=inner_steps, inner_lr=0.3, loss_fn=DiceCELoss(NUM_CLASSES))
    ours, our_stats = meta_gradient(model, params, [episode], algorithm=PROTOTYPES_CONTRASTIVE, **settings)
    theirs, their_stats = meta_gradient(prototypes, params, [episode], algorithm="prototypes", **settings)
    assert our_stats == their_stats
    assert all(torch.allclose(ours[n], theirs[n], rtol=1e-12, atol=1e-14) for n in theirs)


def test_the_meta_gradient_matches_finite_differences():
    model = tiny(weight=0.5)
    reference = build_model(dataclasses.replace(CONFIG, learner="prototypes")).double()
    params, episode, alpha, loss_fn = make_params(model), make_episode(10), 0.3, DiceCELoss(NUM_CLASSES)
    grads, _ = meta_gradient(model, params, [episode], algorithm=PROTOTYPES_CONTRASTIVE, inner_steps=1,
                             inner_lr=alpha, loss_fn=loss_fn)

    def objective(p):
        # The prototype learner's query loss (the test's own reference), plus λ times the pair loss at the adapted
        # embedding, taken from the reference trajectory of one step.
        from fedmeta.common.algorithms.prototypes import prototype_support_loss, with_prototypes
        from torch.func import functional_call

        sx, sy, qx, qy = episode
        with torch.enable_grad():
            q = {n: v.detach().requires_grad_(True) for n, v in p.items()}
            q = with_prototypes(reference, q, sx, sy)
            names = [n for n in q if n not in ("prototypes", "log_scale")]
            g = torch.autograd.grad(prototype_support_loss(reference, q, sx, sy, loss_fn), [q[n] for n in names])
            q = {**q, **{n: q[n] - alpha * gn for n, gn in zip(names, g)}}
            q = with_prototypes(reference, q, sx, sy)
            features = functional_call(reference, q, (qx,), {"embed_only": True})
            pairs = float(pixel_pairs_loss(features, qy, model.margin, model.pixels).detach())
        return reference_query_loss(reference, p, episode, 1, alpha, loss_fn) + 0.5 * pairs

    for seed in range(2):
        direction = random_direction(params, seed)
        assert dot(grads, direction) == pytest.approx(directional_fd(objective, params, direction, 1e-5), rel=1e-6,
                                                      abs=1e-9)
