"""``steps auto``: the adaptation step count is chosen from the support slices alone, with 0 as a candidate."""

from __future__ import annotations

import json

import pytest
import torch

from fedmeta.common.adaptation import Initialisation, score_site
from fedmeta.common.data import DataConfig, SiteDataset
from fedmeta.common.losses import DiceCELoss
from fedmeta.common.model import ModelConfig, build_model, initial_params, seeded_model
from fedmeta.common.step_selection import AUTO, StepChoice, candidate_steps, choose_steps, pooled_dice, support_folds

SMALL = ModelConfig(channels=(8, 16, 32), strides=(2, 2))


def _support(k: int, size: int = 32):
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(k, 1, size, size, generator=gen)
    y = (x[:, 0] > 0).long() * 2  # a class that is a function of intensity: adapting helps
    return x, y


def test_folds_hold_out_support_slices_and_halves_of_a_single_slice():
    x, y = _support(7)
    split, folds = support_folds(x, y)
    assert split == "slices" and len(folds) == 5
    held = sorted(int(i) for f in range(5) for i in range(7) if i % 5 == f)
    assert held == list(range(7))
    for adapt_x, _, check_x, _ in folds:
        assert len(adapt_x) + len(check_x) == 7 and len(check_x) >= 1
    split, folds = support_folds(*_support(1))
    assert split == "half-slice" and len(folds) == 2
    (ax, ay, cx, cy), (bx, _, dx, _) = folds
    assert ax.shape[-1] == cx.shape[-1] == 16 and torch.equal(ax, dx) and torch.equal(cx, bx)



def test_a_single_slice_is_halved_to_widths_the_network_takes_or_refused_with_the_fix():
    x, y = _support(1, size=24)  # a network downsampling by 8 takes 24 but not its halves of 12: cut to 8
    split, folds = support_folds(x, y, multiple=8)
    assert split == "half-slice" and all(f[0].shape[-1] == f[2].shape[-1] == 8 for f in folds)
    tiny = ModelConfig(channels=(4, 8, 16, 32), strides=(2, 2, 2))  # takes multiples of 8; a half of 8 is 4
    x, y = _support(1, size=8)
    with pytest.raises(ValueError, match=r"8 pixels wide.*--shots 2"):
        choose_steps(build_model(tiny), initial_params(seeded_model(tiny, 0)), x, y, inner_lr=0.1,
                     loss_fn=DiceCELoss(4), num_classes=4, classes=[2], candidates=(0, 1))

def test_pooled_dice_counts_pixels_over_the_check_slices():
    truth = torch.tensor([[0, 2], [2, 2]])
    assert pooled_dice(truth, truth, [2]) == 1.0
    assert pooled_dice(torch.zeros_like(truth), truth, [2]) == 0.0
    assert pooled_dice(torch.zeros_like(truth), torch.zeros_like(truth), [1, 2]) == 1.0  # nothing to find: right


def test_candidates_include_zero_and_the_cap():
    assert candidate_steps()[0] == 0 and candidate_steps()[-1] == 20
    assert candidate_steps(12) == (0, 1, 2, 3, 5, 7, 10, 12)
    with pytest.raises(ValueError, match="max_steps"):
        candidate_steps(-1)


def _choose(k: int, lr: float) -> StepChoice:
    model = build_model(SMALL)
    params = initial_params(seeded_model(SMALL, 0))
    x, y = _support(k)
    return choose_steps(model, params, x, y, inner_lr=lr, loss_fn=DiceCELoss(4), num_classes=4, classes=[2],
                        candidates=(0, 1, 5, 10))


def test_a_random_start_is_adapted_and_the_choice_says_why():
    choice = _choose(5, 0.1)
    assert choice.folds == 5 and choice.split == "slices"
    assert set(choice.check_dice) == {0, 1, 5, 10}
    assert choice.steps > 0  # a random θ segments nothing: the check slices say adapting helps
    assert choice.steps == choice.best and choice.check_dice[choice.steps] == max(choice.check_dice.values())
    assert choice.one_se <= choice.steps  # the rule not taken never adapts longer
    record = json.loads(json.dumps(choice.record(), allow_nan=False))
    assert record["chosen_steps"] == choice.steps and "cross-validation" in record["reason"]


def test_counts_past_a_divergence_score_zero_and_are_not_chosen():
    choice = _choose(3, 1e6)  # a huge step size: the weights stop being finite within a few steps
    assert choice.check_dice[10] == 0.0
    assert choice.steps < 10 and choice.check_dice[choice.steps] > 0


def test_the_choice_is_reproducible():
    assert _choose(2, 0.1) == _choose(2, 0.1)


def test_score_site_reports_auto_beside_the_fixed_counts(smoke_federation):
    site = SiteDataset.load(smoke_federation / "new-sequence", DataConfig(image_size=(32, 32), spacing=(3.0, 3.0, 3.0)))
    init = Initialisation("random", initial_params(seeded_model(SMALL, 0)), 0.1)
    scores = score_site(build_model(SMALL), init, site, shots=[1, 2], steps=[0, 5, AUTO], seed=0, num_classes=4,
                        max_images=0, auto_max_steps=5, one_standard_error=True)
    for k in (1, 2):
        auto = scores[k][AUTO]
        chosen = auto["chosen_steps"]
        assert chosen in (0, 1, 2, 3, 5)
        assert auto["step_choice"]["folds"] == (2 if k == 1 else 2)
        if chosen in scores[k]:
            assert auto["dice"] == scores[k][chosen]["dice"]  # the same adaptation, scored on the same patients
        other = auto["one_standard_error_rule"]  # the rule not taken, scored for judging the rule on validation
        assert other["steps"] == auto["step_choice"]["one_standard_error_steps"] and 0.0 <= other["dice"] <= 1.0
    # Unasked (a held-out claim, a site's evaluation), the rule not taken costs nothing: not scored.
    plain = score_site(build_model(SMALL), init, site, shots=[1], steps=[AUTO], seed=0, num_classes=4, max_images=0,
                       auto_max_steps=5)
    assert "one_standard_error_rule" not in plain[1][AUTO] and plain[1][AUTO]["dice"] == scores[1][AUTO]["dice"]



def test_the_reason_names_the_fewest_candidate_it_compares_with():
    choice = StepChoice(steps=10, candidates=(5, 10), check_dice={5: 0.4, 10: 0.5}, check_dice_se={5: 0.0, 10: 0.0},
                        folds=2, split="slices", best=10, one_se=10)
    assert "(5 steps: 0.400)" in choice.reason() and "0 steps" not in choice.reason()
