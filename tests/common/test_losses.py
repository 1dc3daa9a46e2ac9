"""Loss: one-hot outside transforms, Dice+CE inside torch.func; the adaptation curve it drives."""

import pytest
import torch
from torch.func import functional_call, grad, vmap

from fedmeta.common.adaptation import adaptation_curve
from fedmeta.common.losses import DiceCELoss, one_hot
from fedmeta.common.model import ModelConfig, build_model, initial_params


def test_one_hot_layout_and_range_errors():
    labels = torch.tensor([[[0, 1], [2, 3]]])
    encoded = one_hot(labels, 4)
    assert encoded.shape == (1, 4, 2, 2) and encoded.dtype == torch.float32
    assert torch.equal(encoded.argmax(1), labels)
    with pytest.raises(ValueError, match=r"label values \[4\] lie outside the model's classes 0..3"):
        one_hot(torch.tensor([[0, 4]]), 4)
    with pytest.raises(ValueError, match="non-integer"):
        one_hot(torch.tensor([[0.5]]), 4)


def test_dice_ce_loss_runs_under_grad_and_vmap_and_refuses_integer_targets():
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=(4, 8), strides=(2,)))
    params = initial_params(model)
    loss_fn = DiceCELoss(4)
    x = torch.randn(3, 2, 1, 16, 16)
    y = one_hot(torch.randint(0, 4, (6, 16, 16)), 4).view(3, 2, 4, 16, 16)
    per_episode = vmap(lambda xi, yi: loss_fn(functional_call(model, params, (xi,)), yi))(x, y)
    looped = torch.stack([loss_fn(functional_call(model, params, (x[i],)), y[i]) for i in range(3)])
    torch.testing.assert_close(per_episode, looped)
    grads = grad(lambda p: loss_fn(functional_call(model, p, (x[0],)), y[0]))(params)
    assert set(grads) == set(params)
    with pytest.raises(ValueError, match="pass one-hot targets"):
        loss_fn(torch.randn(2, 4, 16, 16), torch.randint(0, 4, (2, 16, 16)))


def test_adaptation_curve_improves_dice_on_the_support_distribution():
    torch.manual_seed(0)
    model = build_model(ModelConfig(out_channels=2, channels=(8, 16), strides=(2,)))
    params = initial_params(model)
    # A learnable task: the label is the bright square.
    x = torch.randn(8, 1, 16, 16) * 0.1
    y = torch.zeros(8, 16, 16, dtype=torch.long)
    for i in range(8):
        r, c = 2 + i % 6, 3 + (i * 2) % 6
        x[i, 0, r : r + 6, c : c + 6] += 2.0
        y[i, r : r + 6, c : c + 6] = 1
    patients = [("p1", x[4:6], y[4:6]), ("p2", x[6:], y[6:])]
    curve = adaptation_curve(model, params, x[:4], y[:4], patients, steps=[0, 20, 60], inner_lr=0.1,
                             loss_fn=DiceCELoss(2), num_classes=2)
    assert list(curve) == [0, 20, 60]
    assert curve[60]["dice"] > curve[0]["dice"] + 0.2
    assert curve[60]["dice"] > 0.8
    assert sorted(curve[60]["per_patient"]) == ["p1", "p2"] and curve[60]["patients"] == 2
    assert curve[60]["worst_patient_dice"] == min(curve[60]["per_patient"].values())
    with pytest.raises(ValueError, match=r"steps=\[-1\] must be a non-empty list of ints >= 0"):
        adaptation_curve(model, params, x[:4], y[:4], patients, steps=[-1], inner_lr=0.1, loss_fn=DiceCELoss(2),
                         num_classes=2)
    with pytest.raises(ValueError, match="no evaluation patient"):
        adaptation_curve(model, params, x[:4], y[:4], [], steps=[0], inner_lr=0.1, loss_fn=DiceCELoss(2),
                         num_classes=2)
