"""The run config by concern: sections of the flat RunConfig, hashing declared beside each field, and the
trajectory hash unchanged (a checkpoint resumes only under the same hash)."""

from __future__ import annotations

import dataclasses
from dataclasses import fields

import pytest

from fedmeta.common import config_sections
from fedmeta.common.config import _HASHED_WHEN_SET, _NOT_HASHED, RunConfig
from fedmeta.common.config_sections import (
    Evaluation, InnerLoop, Learners, Liveness, Model, Privacy, Robustness, Runtime, SecureAggregation, Training,
    hash_rule,
)

SECTIONS = {"training": Training, "inner_loop": InnerLoop, "learners": Learners, "model": Model,
            "evaluation": Evaluation, "runtime": Runtime, "liveness": Liveness, "privacy": Privacy,
            "robustness": Robustness, "secagg": SecureAggregation}

# Hashes written by the code before the sections (sha256 of sorted JSON: the same on every machine). A change here
# means checkpoints of such runs no longer resume.
PINNED_HASHES = [
    ({}, None, "d87332437cc99bbf"),
    (dict(algorithm="maml", inner_lr=0.1, num_rounds=3), "abc123", "3d8748379a249697"),
    (dict(algorithm="metasgd", step_sizes="per-layer-step", inner_steps=3), None, "6ac0ba8aef6536f1"),
    (dict(algorithm="fast-weights", generator_width=16), None, "80f76f977c29aa3e"),
    (dict(algorithm="fast-weights", prototype_dim=8, lstm_hidden=4), None, "ded75e5847db8e10"),  # others' keys
    (dict(algorithm="lstm-optimizer", lstm_hidden=4, lstm_truncation=1), None, "43269b90f855e238"),
    (dict(algorithm="anil", first_order_rounds=3, multi_step_loss_rounds=2), None, "16e99a1acdbef18e"),
    (dict(dp="local", secure_aggregation="secagg+", secagg_clip_range=20.0, secagg_threshold=0.7, secagg_levels=1024),
     None, "476c93ac5bc4c46f"),
    (dict(aggregation="krum", krum_byzantine=2, max_update_norm=5.0), None, "798278f791953491"),
    (dict(median_norm_bound=0.0), None, "a99ce7c504953ee4"),  # the default before median-norm-bound existed
    (dict(num_rounds=99, resume=True, out_dir="/x", device="cpu", round_timeout=5.0, eval_every=0, eval_steps="0,1",
          metrics_port=9000, release_key="k.pem", dp_max_epsilon=3.0, max_failed_rounds=0), None, "d87332437cc99bbf"),
    (dict(max_weight_ratio=10, meta_lr=1), None, "be735d3cd7ef9dff"),  # an int where a float is declared
]


@pytest.mark.parametrize("changes, federation, expected", PINNED_HASHES)
def test_the_trajectory_hash_is_the_one_written_before_the_sections(changes, federation, expected):
    assert RunConfig(**changes).trajectory_hash(federation) == expected


def test_the_hash_declarations_beside_the_fields_are_the_lists_kept_by_hand_before():
    """The keys never hashed, hashed only when set (at what value), and hashed only for one learner."""
    assert _NOT_HASHED == {"num_rounds", "resume", "out_dir", "federation_dir", "device", "round_timeout",
                           "round_deadline", "round_quorum", "max_missed_rounds", "node_wait_timeout", "eval_every",
                           "eval_k_shot", "eval_steps", "eval_batch_size", "eval_max_images", "adapt_variant", "metrics_port",
                           "metrics_address", "dp_max_epsilon", "max_failed_rounds", "release_key",
                           "plan_round"}
    assert _HASHED_WHEN_SET == {
        "multi_step_loss_rounds": 0, "first_order_rounds": 0, "step_sizes": "per-element", "dp": "none",
        "dp_clip_norm": 1.0, "dp_noise_multiplier": 1.0, "dp_delta": 1e-5, "dp_seeded_noise": False,
        "aggregation": "mean", "aggregation_trim": 0.2, "krum_byzantine": 1, "max_update_norm": 0.0,
        "median_norm_bound": 0.0, "secure_aggregation": "none", "secagg_threshold": 0.6, "secagg_neighbours": 0,
        "secagg_clip_range": 8.0, "secagg_levels": 0, "generator_width": 32, "prototype_dim": 32, "lstm_hidden": 8,
        "lstm_truncation": 0,
        # issue 30: a site's channels and CT normalisation, from `fedmeta plan`
        "in_channels": 1, "channels": "", "slice_spacing_mm": 0.0, "ct_clip_low": -1024.0, "ct_clip_high": 3071.0,
        "ct_mean": 0.0, "ct_std": 0.0, "plan_sha256": ""}
    from fedmeta.common.algorithms import ALGORITHMS

    owned = {f.name for f in fields(RunConfig) if hash_rule(f).algorithm_own}
    owners: dict[str, list[str]] = {}
    for name, a in ALGORITHMS.items():
        for key in a.own_keys:
            owners.setdefault(key, []).append(name)
    assert owners == {"generator_width": ["fast-weights"], "prototype_dim": ["prototypes", "prototypes-contrastive"],
                      "lstm_hidden": ["lstm-optimizer"], "lstm_truncation": ["lstm-optimizer"]}
    assert owned == set(owners), "a key an algorithm owns is declared with algorithm_key, and only those"


def test_every_key_lives_in_exactly_one_section_and_the_run_config_is_their_union():
    names = [f.name for section in SECTIONS.values() for f in fields(section)]
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(f.name for f in fields(RunConfig))
    assert not set(SECTIONS) & set(names)  # a section's attribute never shadows a key


def test_sections_are_attributes_holding_the_config_values():
    config = RunConfig(algorithm="maml", inner_lr=0.2, dp="central", dp_clip_norm=0.5, aggregation="mean",
                       secure_aggregation="none", eval_steps="0,3")
    assert config.privacy.dp_clip_norm == 0.5 and config.inner_loop.inner_lr == 0.2
    assert config.privacy == Privacy(dp="central", dp_clip_norm=0.5)
    assert config.training.algorithm == "maml" and config.evaluation.adaptation_steps == (0, 3)
    for name, section in SECTIONS.items():
        part = getattr(config, name)
        assert type(part) is section
        assert all(getattr(part, f.name) == getattr(config, f.name) for f in fields(section))
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(part, fields(section)[0].name, None)


def test_the_flat_interface_is_unchanged():
    config = RunConfig(inner_lr=0.1, k_shot=3)
    assert config.inner_lr == 0.1 and config.replace(k_shot=4).k_shot == 4 and config.replace(k_shot=4) != config
    assert RunConfig.from_run_config(config.to_run_config()) == config
    assert dataclasses.asdict(config)["inner_lr"] == 0.1 and len(dataclasses.asdict(config)) == len(fields(RunConfig))
    assert len({RunConfig(inner_lr=0.1, k_shot=3), config}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.inner_lr = 1.0  # type: ignore[misc]
    assert next(iter(config.to_run_config())) == "algorithm"


# A section built alone refuses its own bad keys with the message the whole run config gives.
BAD_SECTION_VALUES = [
    (Training, dict(algorithm="bogus")), (Training, dict(min_sites=3, sites_per_round=2)),
    (Training, dict(meta_lr=float("nan"))), (InnerLoop, dict(inner_steps=-1)), (InnerLoop, dict(step_sizes="x")),
    (Learners, dict(prototype_dim=0)), (Model, dict(model_levels=9)), (Model, dict(image_size=60)),
    (Evaluation, dict(eval_steps="a,b")), (Runtime, dict(device="tpu")), (Liveness, dict(round_quorum=2.5)),
    (Privacy, dict(dp_delta=1.0)), (Robustness, dict(median_norm_bound=0.5)),
    (SecureAggregation, dict(secagg_levels=1)),
]


@pytest.mark.parametrize("section, bad", BAD_SECTION_VALUES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_a_section_alone_refuses_its_own_keys_with_the_run_configs_message(section, bad):
    with pytest.raises(ValueError) as whole:
        RunConfig(**bad)
    with pytest.raises(ValueError) as alone:
        section(**bad)
    assert str(alone.value) == str(whole.value) and str(whole.value).startswith("run config ")


def test_what_differs_by_algorithm_is_still_refused_by_the_run_config():
    with pytest.raises(ValueError, match=r"inner-steps=0: must be >= 1 \(0 only for fast-weights and prototypes"):
        RunConfig(algorithm="maml", inner_steps=0)
    assert RunConfig(algorithm="prototypes", inner_steps=0).inner_steps == 0
    assert InnerLoop(inner_steps=0).inner_steps == 0  # alone, the section does not know the algorithm
    with pytest.raises(ValueError, match=r"lstm-truncation=2: must be in \[0, inner-steps=1\]"):
        RunConfig(algorithm="lstm-optimizer", lstm_truncation=2)
    with pytest.raises(ValueError, match="learned step sizes belong to metasgd"):
        RunConfig(step_sizes="per-layer-step")
    assert RunConfig(algorithm="fedprox").weighting == "data" and RunConfig(algorithm="maml").weighting == "per-site"
    assert RunConfig(algorithm="prototypes").model_config().learner == "prototypes"
    assert RunConfig(algorithm="fomaml").model_config().learner == "unet"


def test_the_meta_optimisers_are_named_once():
    from fedmeta.common import config, metaopt

    assert config.META_OPTIMIZERS is metaopt.OPTIMIZERS is config_sections.META_OPTIMIZERS
