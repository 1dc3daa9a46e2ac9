"""Loss and metrics: one-hot outside transforms, Dice+CE inside torch.func, Dice per class."""

import pytest
import torch
from torch.func import functional_call, grad, vmap

from fedmeta.common.adaptation import adaptation_curve
from fedmeta.common.losses import DiceCELoss, dice_per_class, mean_dice, one_hot
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


def test_dice_per_class_matches_a_hand_count_and_skips_absent_classes():
    truth = torch.zeros(2, 4, 4, dtype=torch.long)
    truth[0, :2, :2] = 1  # 4 voxels of class 1
    truth[1, :, :1] = 2  # 4 voxels of class 2
    prediction = truth.clone()
    prediction[0, 0, 0] = 0  # class 1: 3 of 4 found
    prediction[1, 0, 1] = 2  # class 2: one false positive
    logits = one_hot(prediction, 4) * 10
    dice = dice_per_class(logits, truth, 4)
    assert dice.shape == (3,)
    assert float(dice[0]) == pytest.approx(2 * 3 / (3 + 4))
    assert float(dice[1]) == pytest.approx(2 * 4 / (5 + 4))
    assert torch.isnan(dice[2])  # class 3 absent from truth and prediction
    assert mean_dice(dice) == pytest.approx((6 / 7 + 8 / 9) / 2)
    # A class the truth lacks but the model predicts is an error, not "not applicable".
    prediction[1, 3, 3] = 3
    dice = dice_per_class(one_hot(prediction, 4) * 10, truth, 4)
    assert float(dice[2]) == 0.0
    assert mean_dice(dice) == pytest.approx((6 / 7 + 8 / 9 + 0) / 3)


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
    curve = adaptation_curve(model, params, x[:4], y[:4], x[4:], y[4:], steps=[0, 20, 60], inner_lr=0.1,
                             loss_fn=DiceCELoss(2), num_classes=2)
    assert list(curve) == [0, 20, 60]
    assert curve[60]["dice"] > curve[0]["dice"] + 0.2
    assert curve[60]["dice"] > 0.8
    with pytest.raises(ValueError, match=r"steps=\[-1\] must be a non-empty list of ints >= 0"):
        adaptation_curve(model, params, x[:4], y[:4], x[4:], y[4:], steps=[-1], inner_lr=0.1, loss_fn=DiceCELoss(2),
                         num_classes=2)
