"""Test-time adaptation variants (fedmeta.common.adaptation_variants): each does what it says on tiny float64
models, and ``fine-tune`` is the adaptation every comparison ran before variants existed."""

from __future__ import annotations

import json

import pytest
import torch
from torch.func import functional_call

from fedmeta.common.adaptation import Initialisation, adaptation_curve, predict, score_site
from fedmeta.common.adaptation_variants import VARIANTS, check_applies, variant_named
from fedmeta.common.adaptation_variants.base import Variant
from fedmeta.common.algorithms.prototypes import PROTOTYPES
from fedmeta.common.data import DataConfig, SiteDataset
from fedmeta.common.losses import DiceCELoss, one_hot
from fedmeta.common.meta import adaptation_trajectory, init_step_sizes
from fedmeta.common.metrics import patient_dice, summarise_patients
from fedmeta.common.model import ModelConfig, build_model, head_parameter_names, initial_params, seeded_model
from fedmeta.common.step_selection import AUTO, choose_steps

NUM_CLASSES = 3
SIDE = 16
ALPHA = 0.1


def tiny(learner: str = "unet", norm: str = "instance"):
    config = ModelConfig(out_channels=NUM_CLASSES, channels=(4, 8), strides=(2,), num_res_units=1, learner=learner,
                         embedding_dim=4, norm=norm, groups=1)
    model = build_model(config).double()
    return model, {n: p.double() for n, p in initial_params(seeded_model(config, 0)).items()}


def support(k: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(k, 1, SIDE, SIDE, generator=generator, dtype=torch.float64)
    y = (x[:, 0] > 0.3).long() + (x[:, 0] > 1.0).long()  # classes 0, 1, 2 by intensity
    return x, y


def run(variant: str, model, params, steps: int = 3, inner_lr=ALPHA, **settings) -> list[dict[str, torch.Tensor]]:
    x, y = support()
    return list(variant_named(variant).trajectory(model, params, x, one_hot(y, NUM_CLASSES, torch.float64),
                                                  inner_steps=steps, inner_lr=inner_lr, loss_fn=DiceCELoss(NUM_CLASSES),
                                                  **settings))


def changed(before: dict, after: dict) -> set[str]:
    return {n for n in before if not torch.equal(before[n], after[n])}


def test_the_registry_holds_every_variant_with_one_line_each():
    assert list(VARIANTS) == ["fine-tune", "head-only", "norm-only", "bias-only", "proximal-0.1", "proximal-1",
                              "proximal-10", "proximal-100", "ensemble", "frozen-prototypes"]
    for name, variant in VARIANTS.items():
        assert isinstance(variant, Variant) and variant.name == name
        assert variant.description and "\n" not in variant.description
    with pytest.raises(ValueError, match="unknown adaptation variant 'fine-tuning'; valid choices: fine-tune, head-only"):
        variant_named("fine-tuning")


@pytest.mark.parametrize(("variant", "target", "applies"), [
    ("fine-tune", "prototypes", True),
    ("head-only", "fedavg", True),
    ("head-only", "anil", False),  # its fine-tune is head-only already
    ("frozen-prototypes", "prototypes", True),
    ("frozen-prototypes", "fedavg", False),
    ("frozen-prototypes", "metasgd", False),
    ("ensemble", "metasgd", True),
])
def test_which_algorithms_a_variant_applies_to(variant, target, applies):
    assert VARIANTS[variant].applies_to(target) is applies


def test_norm_only_needs_affine_normalisation():
    plain, _ = tiny()
    assert not VARIANTS["norm-only"].applies_to(plain)  # MONAI's InstanceNorm: affine=False, nothing to step
    with pytest.raises(ValueError, match="'norm-only' does not apply to UNet: .*affine=False"):
        check_applies(VARIANTS["norm-only"], plain)
    grouped, params = tiny(norm="group")
    assert VARIANTS["norm-only"].applies_to(grouped)
    trajectory = run("norm-only", grouped, params)
    norm_names = set(VARIANTS["norm-only"].names(grouped))
    assert norm_names and all(".adn.N." in n for n in norm_names)
    assert changed(params, trajectory[-1]) == norm_names


def test_fine_tune_is_the_adaptation_trajectory_of_the_inner_loop():
    model, params = tiny()
    x, y = support()
    reference = list(adaptation_trajectory(model, params, x, one_hot(y, NUM_CLASSES, torch.float64), inner_steps=3,
                                           inner_lr=ALPHA, loss_fn=DiceCELoss(NUM_CLASSES)))
    for a, b in zip(run("fine-tune", model, params), reference, strict=True):
        assert not changed(a, b)


def test_fine_tune_scores_what_adaptation_curve_scored_before_variants():
    """The old curve written out: the trajectory, the adapted model's own logits, per-patient Dice."""
    model, params = tiny()
    x, y = support(3)
    patients = [(f"p{i}", *support(4, seed=10 + i)) for i in range(2)]
    settings = dict(steps=[0, 2, 4], inner_lr=ALPHA, loss_fn=DiceCELoss(NUM_CLASSES), num_classes=NUM_CLASSES)
    curve = adaptation_curve(model, params, x, y, patients, **settings, batch_size=3)
    reference = {}
    for done, adapted in enumerate(adaptation_trajectory(model, params, x, one_hot(y, NUM_CLASSES, torch.float64),
                                                         inner_steps=4, inner_lr=ALPHA, loss_fn=DiceCELoss(NUM_CLASSES))):
        if done in (0, 2, 4):
            reference[done] = summarise_patients({pid: patient_dice(predict(model, adapted, px, 3).argmax(dim=1), py, [1, 2])
                                                  for pid, px, py in patients})
    assert curve == reference
    assert curve[4]["dice"] != curve[0]["dice"]  # the steps did something to score


def test_choosing_steps_through_fine_tune_is_choosing_them_as_before():
    model, params = tiny()
    x, y = support(4)
    settings = dict(inner_lr=ALPHA, loss_fn=DiceCELoss(NUM_CLASSES), num_classes=NUM_CLASSES, classes=[1, 2],
                    candidates=(0, 1, 3))
    assert choose_steps(model, params, x, y, **settings, variant=VARIANTS["fine-tune"]) == \
        choose_steps(model, params, x, y, **settings)


def test_head_only_leaves_every_other_parameter_as_theta():
    model, params = tiny()
    head = set(head_parameter_names(model))
    for adapted in run("head-only", model, params):
        assert changed(params, adapted) <= head
    assert changed(params, run("head-only", model, params)[-1]) == head


def test_head_only_takes_meta_sgds_step_sizes_for_the_head_alone():
    model, params = tiny()
    alphas = init_step_sizes(params, ALPHA)
    head = set(head_parameter_names(model))
    adapted = run("head-only", model, params, inner_lr=alphas)[-1]
    assert changed(params, adapted) == head
    scalar = run("head-only", model, params)[-1]  # every learned step size equal to α: the same steps
    assert all(torch.allclose(adapted[n], scalar[n]) for n in params)


def test_bias_only_steps_the_biases_alone():
    model, params = tiny()
    stepped = changed(params, run("bias-only", model, params)[-1])
    assert stepped <= {n for n in params if n.endswith(".bias")}
    assert set(head_parameter_names(model)) & stepped
    # A bias just before affine-free InstanceNorm is subtracted again with the mean: it has no gradient to step.
    assert "model.0.conv.unit0.conv.bias" not in stepped


def test_proximal_with_a_huge_mu_stays_at_theta_and_a_small_one_moves():
    from fedmeta.common.adaptation_variants.proximal import Proximal

    model, params = tiny()
    x, y = support()
    common = dict(inner_steps=5, inner_lr=ALPHA, loss_fn=DiceCELoss(NUM_CLASSES))
    target = one_hot(y, NUM_CLASSES, torch.float64)
    held = list(Proximal(1e12).trajectory(model, params, x, target, **common))[-1]
    assert all(torch.allclose(held[n], params[n], rtol=0, atol=1e-9) for n in params)
    fine = run("fine-tune", model, params, steps=5)[-1]
    pulled = run("proximal-1", model, params, steps=5)[-1]

    def distance(adapted):
        return sum(float(((adapted[n] - params[n]) ** 2).sum()) for n in params) ** 0.5

    assert 0 < distance(pulled) < distance(fine)


def test_proximal_is_fine_tune_as_mu_goes_to_zero():
    from fedmeta.common.adaptation_variants.proximal import Proximal

    model, params = tiny()
    x, y = support()
    target = one_hot(y, NUM_CLASSES, torch.float64)
    tiny_mu = list(Proximal(1e-12).trajectory(model, params, x, target, inner_steps=3, inner_lr=ALPHA,
                                              loss_fn=DiceCELoss(NUM_CLASSES)))[-1]
    fine = run("fine-tune", model, params)[-1]
    assert all(torch.allclose(tiny_mu[n], fine[n], rtol=0, atol=1e-10) for n in params)
    with pytest.raises(ValueError, match="mu=0"):
        Proximal(0)


def test_an_ensemble_of_a_model_with_itself_is_the_model():
    model, params = tiny()
    x, _ = support()
    ensemble = VARIANTS["ensemble"].logits(model, params, params, x)
    alone = functional_call(model, params, (x,))
    assert torch.allclose(torch.softmax(ensemble, dim=1), torch.softmax(alone, dim=1), rtol=0, atol=1e-12)


def test_an_ensemble_of_two_models_is_their_mean_probability():
    model, params = tiny()
    x, _ = support()
    adapted = run("fine-tune", model, params)[-1]
    mean = (torch.softmax(functional_call(model, params, (x,)), 1) + torch.softmax(functional_call(model, adapted, (x,)), 1)) / 2
    assert torch.allclose(VARIANTS["ensemble"].logits(model, params, adapted, x).exp(), mean, rtol=0, atol=1e-12)


def test_frozen_prototypes_keep_step_zeros_prototypes_while_the_encoder_moves():
    model, params = tiny("prototypes")
    frozen = run("frozen-prototypes", model, params)
    refreshed = run("fine-tune", model, params)
    assert torch.equal(frozen[0][PROTOTYPES], refreshed[0][PROTOTYPES])  # the same step 0
    assert frozen[0][PROTOTYPES].abs().sum() > 0
    for adapted in frozen[1:]:
        assert torch.equal(adapted[PROTOTYPES], frozen[0][PROTOTYPES])
        assert changed(frozen[0], adapted) - {PROTOTYPES}  # the encoder moves
    assert not torch.equal(refreshed[-1][PROTOTYPES], refreshed[0][PROTOTYPES])  # fine-tune re-pools


def test_frozen_prototypes_refuse_a_network_without_prototypes():
    model, params = tiny()
    with pytest.raises(ValueError, match="'frozen-prototypes' does not apply: .*prototype learners only"):
        run("frozen-prototypes", model, params)


def test_score_site_adapts_and_chooses_steps_with_the_variant(smoke_federation):
    small = ModelConfig(channels=(4, 8), strides=(2,))
    site = SiteDataset.load(smoke_federation / "new-sequence", DataConfig(image_size=(32, 32), spacing=(3.0, 3.0, 3.0)))
    init = Initialisation("random", initial_params(seeded_model(small, 0)), 0.1)
    settings = dict(shots=[2], steps=[0, 3, AUTO], seed=0, num_classes=4, max_images=8, auto_max_steps=3)
    fine = score_site(build_model(small), init, site, **settings)
    assert fine == score_site(build_model(small), init, site, **settings, variant="fine-tune")
    head = score_site(build_model(small), init, site, **settings, variant="head-only")
    assert head[2][0]["dice"] == fine[2][0]["dice"]  # 0 steps: θ either way
    assert head[2][3]["dice"] != fine[2][3]["dice"]
    assert head[2][AUTO]["step_choice"] != fine[2][AUTO]["step_choice"]  # chosen along the head-only trajectory
    with pytest.raises(ValueError, match="'frozen-prototypes' does not apply to UNet"):
        score_site(build_model(small), init, site, **settings, variant="frozen-prototypes")


def test_the_variants_command_writes_strict_json_and_a_table(smoke_federation, trained_checkpoint, tmp_path):
    from fedmeta.simulations.cli import main

    out = tmp_path / "variants"
    code = main(["variants", "--checkpoint", f"fomaml={trained_checkpoint}", "--sites", str(smoke_federation / "site-01"),
                 "--variants", "fine-tune,head-only,frozen-prototypes", "--shots", "1", "--steps", "0,1,auto",
                 "--seeds", "0,1", "--max-images", "8", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "variants.json").read_text())  # strict JSON: json would read NaN, the writer refuses it
    assert result["not_applicable"]["fomaml"] == {"frozen-prototypes": VARIANTS["frozen-prototypes"].why_not("fomaml")}
    cells = result["scores"]["fomaml"]["head-only"]["1"]
    assert set(cells) == {"0", "1", "auto"}
    assert len(cells["auto"]["per_seed"]) == 2 and cells["auto"]["min"] <= cells["auto"]["mean"] <= cells["auto"]["max"]
    assert cells["0"]["delta_vs_fine_tune"]["per_seed"] == [0.0, 0.0]  # 0 steps: θ either way
    table = (out / "variants.md").read_text()
    assert "| fomaml | head-only |" in table and "frozen-prototypes: it freezes a prototype classifier" in table
    assert main(["variants", "--checkpoint", "fomaml", "--sites", "x", "--out", str(tmp_path / "bad")]) == 1


def test_the_command_spells_auto_and_the_default_as_the_library_does():
    from fedmeta.common.adaptation_variants import DEFAULT
    from fedmeta.simulations.experiments import variants

    assert (variants.AUTO, variants.DEFAULT) == (AUTO, DEFAULT)


def test_the_command_names_a_bad_list_value_and_reads_auto_in_any_case(tmp_path, capsys):
    from fedmeta.simulations.experiments.variants import _step_list, handle, register

    assert _step_list("AUTO, 0,5") == [AUTO, 0, 5]
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    for option, value in (("--steps", "0,10.5"), ("--shots", "1,x"), ("--seeds", "a")):
        args = parser.parse_args(["variants", "--checkpoint", "a=/nonexistent.pt", "--sites", "x",
                                  "--out", str(tmp_path / "out"), option, value])
        assert handle(args) == 1
        assert f"{option} '{value}'" in capsys.readouterr().err


def test_the_table_shows_the_difference_at_auto_wherever_auto_is_listed():
    from fedmeta.simulations.experiments.variants import markdown_table

    def cell(mean, delta):
        return {"mean": mean, "min": mean, "max": mean, "delta_vs_fine_tune": {"mean": delta, "min": delta, "max": delta}}

    result = {"settings": {"shots": [1], "steps": ["auto", "0"], "seeds": [0], "sites": ["s"], "auto_max_steps": 20},
              "scores": {"c": {"fine-tune": {"1": {"auto": cell(0.5, 0.0), "0": cell(0.4, 0.0)}},
                               "ensemble": {"1": {"auto": cell(0.6, 0.1), "0": cell(0.4, 0.0)}}}},
              "not_applicable": {}, "variants": {}}
    table = markdown_table(result)
    assert "| Δ auto |" in table and "| c | ensemble | 0.600 [0.600–0.600] | 0.400 [0.400–0.400] | +0.100" in table
    result["settings"]["steps"] = ["0"]
    assert "| Δ 0 steps |" in markdown_table(result)


def test_a_held_out_site_of_a_federation_is_warned_about(tmp_path):
    from fedmeta.simulations.experiments.variants import _federation_role

    (tmp_path / "manifest.json").write_text(json.dumps({"sites": [{"name": "new-a", "role": "heldout", "path": "new-a"},
                                                                  {"name": "site-01", "role": "train", "path": "site-01"}]}))
    assert _federation_role(tmp_path / "new-a") == "heldout" and _federation_role(tmp_path / "site-01") == "train"
    assert _federation_role(tmp_path / "elsewhere" / "x") is None
    from fedmeta.simulations.experiments.variants import score_variants

    said: list[str] = []
    (tmp_path / "new-a").mkdir()
    with pytest.raises(FileNotFoundError):  # the warning comes first, before any checkpoint is read
        score_variants({"a": tmp_path / "missing.pt"}, [tmp_path / "new-a"], progress=said.append)
    assert said and "heldout site" in said[0] and "validation sites" in said[0]


@pytest.mark.parametrize(("changes", "message"), [
    ({"algorithm": "fomaml", "adapt-variant": "frozen-prototypes"}, "applies to algorithm 'fomaml'"),
    ({"algorithm": "prototypes", "adapt-variant": "ensemble"}, "whose adapted weights segment alone"),
    ({"adapt-variant": "fine-tuning"}, "one of fine-tune, head-only"),
    # the default network's InstanceNorm has no parameter for norm-only to step: said by the run config, not by
    # every site's evaluation round
    ({"adapt-variant": "norm-only"}, "with this network \\(model-norm='instance'\\)"),
])
def test_the_run_config_refuses_an_adapt_variant_its_sites_could_not_use(changes, message):
    from fedmeta.common.config import RunConfig

    with pytest.raises(ValueError, match=f"adapt-variant=.*{message}"):
        RunConfig.from_run_config(changes)
    assert RunConfig.from_run_config({"algorithm": "prototypes", "adapt-variant": "frozen-prototypes"}).adapt_variant \
        == "frozen-prototypes"
