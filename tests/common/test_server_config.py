"""The run config: pyproject's defaults, parsing Flower's run_config, and refusing bad values."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedmeta.common.config import RunConfig

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_pyproject_holds_every_default_and_they_match_the_dataclass():
    table = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert table == RunConfig().to_run_config()
    assert RunConfig.from_run_config(table) == RunConfig()


def test_values_from_toml_and_the_command_line_are_coerced():
    config = RunConfig.from_run_config({"meta-lr": 1, "resume": "true", "num-rounds": "7", "inner-lr": "0.5"})
    assert config.meta_lr == 1.0 and isinstance(config.meta_lr, float)
    assert config.resume is True
    assert config.num_rounds == 7
    assert config.inner_lr == 0.5


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("algorithm", "maml2", "unknown algorithm"),
        ("meta-optimizer", "rmsprop", "unknown meta-optimiser"),
        ("num-rounds", -1, ">= 0"),
        ("num-rounds", 2.5, "expected an integer"),
        ("inner-lr", 0, "> 0"),
        ("inner-lr", "fast", "expected a number"),
        ("k-shot", 0, ">= 1"),
        ("min-sites", 0, ">= 1"),
        ("image-size", 60, "multiple of 8"),
        ("eval-steps", "0,five", "comma-separated"),
        ("eval-steps", "", "comma-separated"),
        ("device", "tpu", "auto, cpu, cuda"),
        ("resume", "maybe", "true or false"),
        ("model-norm", "batch", "BatchNorm"),
        ("round-quorum", 1.5, "whole number of sites"),
        ("round-quorum", float("inf"), "finite"),
        ("round-timeout", float("inf"), "finite"),
        ("round-deadline", 0, "> 0 seconds"),
        ("max-missed-rounds", -1, ">= 0"),
    ],
)
def test_bad_values_name_the_key_and_the_problem(key, value, words):
    with pytest.raises(ValueError) as info:
        RunConfig.from_run_config({key: value})
    message = str(info.value)
    assert words in message
    assert key in message or key.startswith("model-")


def test_an_unknown_key_is_refused_with_the_valid_ones_listed():
    with pytest.raises(ValueError, match=r"unknown run-config key\(s\) inner-lrr.*inner-lr"):
        RunConfig.from_run_config({"inner-lrr": 0.1})


def test_trajectory_hash_ignores_where_and_how_long_but_not_what():
    base = RunConfig(out_dir="/a", num_rounds=3)
    assert base.trajectory_hash() == base.replace(out_dir="/b", num_rounds=9, resume=True, device="cpu", eval_every=3, eval_steps="0,1").trajectory_hash()
    assert base.trajectory_hash() != base.replace(inner_lr=0.2).trajectory_hash()
    assert base.trajectory_hash() != base.replace(seed=1).trajectory_hash()


def test_model_config_follows_the_width_and_depth_keys():
    model = RunConfig(model_base_channels=8, model_levels=3, num_classes=3).model_config()
    assert model.channels == (8, 16, 32)
    assert model.strides == (2, 2)
    assert model.out_channels == 3


def test_a_round_sampling_fewer_sites_than_min_sites_is_refused_and_quorum_counts_sites():
    with pytest.raises(ValueError, match="sites-per-round.*min-sites=3"):
        RunConfig(min_sites=3, sites_per_round=2)
    assert RunConfig(round_quorum=0.5).quorum(4) == 2 and RunConfig(round_quorum=1.0).quorum(4) == 4
    assert RunConfig(round_quorum=3).quorum(4) == 3 and RunConfig(round_quorum=9).quorum(4) == 4
    assert RunConfig(round_quorum=0.1, min_sites=2).quorum(4) == 2  # never below min-sites


def test_a_refused_value_or_key_is_shown_cut_to_a_line_with_its_length_not_echoed_whole():
    huge = "9" * 100_000 + "x"
    for run_config, said in (({"inner-lr": huge}, "inner-lr='999"), ({"adapt-variant": huge}, "adapt-variant='999"),
                             ({huge: 1, **{f"bogus-{i}": 1 for i in range(9)}}, "and 5 more")):
        with pytest.raises(ValueError) as refused:
            RunConfig.from_run_config(run_config)
        message = str(refused.value)
        assert said in message and len(message) < 2_000, message[:200]
        assert "100,003 characters" in message or "more" in message
