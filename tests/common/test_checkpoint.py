"""Checkpoints: a faithful round trip, atomic replacement, and clear errors for bad files."""

from __future__ import annotations

import pytest
import torch

from fedmeta.common.checkpoint import Checkpoint, load_checkpoint, save_checkpoint


def _checkpoint(round_: int = 3) -> Checkpoint:
    generator = torch.Generator().manual_seed(round_)
    return Checkpoint(
        round=round_,
        params={"w": torch.randn(3, 4, generator=generator), "b": torch.randn(4, generator=generator)},
        step_sizes={"w": torch.full((3, 4), 0.05)},
        optimizer={"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.003, "params": [0]}]},
        rng_state={"numpy": '{"bit_generator": "PCG64", "state": {"state": 340282366920938463463374607431768211455}}'},
        config_hash="abc123",
        run_config={"inner-lr": 0.05, "algorithm": "fomaml"},
        counters={"dropped_replies": 2},
    )


def test_round_trip_is_exact(tmp_path):
    path = tmp_path / "run" / "checkpoint.pt"
    original = _checkpoint()
    save_checkpoint(path, original)
    loaded = load_checkpoint(path)
    assert loaded.round == 3 and loaded.config_hash == "abc123" and loaded.counters == {"dropped_replies": 2}
    for name in original.params:
        assert torch.equal(loaded.params[name], original.params[name])
    assert torch.equal(loaded.step_sizes["w"], original.step_sizes["w"])
    assert loaded.rng_state == original.rng_state
    assert loaded.run_config == original.run_config


class _FailsToSave:
    """Breaks torch.save halfway through a checkpoint, with an error of our own."""

    def __reduce__(self):
        raise RuntimeError("this value cannot be saved")


def test_a_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _checkpoint(1))
    broken = _checkpoint(2)
    broken.counters = {"not picklable": _FailsToSave()}  # torch.save fails mid-write
    with pytest.raises(RuntimeError, match="this value cannot be saved"):
        save_checkpoint(path, broken)
    assert load_checkpoint(path).round == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_a_later_save_replaces_the_earlier_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _checkpoint(1))
    save_checkpoint(path, _checkpoint(2))
    assert load_checkpoint(path).round == 2


def test_a_truncated_file_names_the_path_and_the_fix(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _checkpoint())
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"checkpoint\.pt: not a readable fedmeta checkpoint.*delete it"):
        load_checkpoint(path)


def test_a_format_1_checkpoint_still_loads_and_a_damaged_one_names_what_it_lacks(tmp_path):
    path = tmp_path / "checkpoint.pt"
    payload = {"format": 1, **_checkpoint().__dict__}
    del payload["privacy"]  # format 1 predates the DP accountant's field
    torch.save(payload, path)
    assert load_checkpoint(path).privacy is None
    del payload["params"]
    payload["weights"] = {}
    torch.save(payload, path)
    with pytest.raises(ValueError, match=r"checkpoint\.pt: not a complete fedmeta checkpoint \(missing params; "
                                         r"unknown weights\)"):
        load_checkpoint(path)
    torch.save({**payload, "format": 3}, path)
    with pytest.raises(ValueError, match="checkpoint format 3 is not one this fedmeta reads"):
        load_checkpoint(path)


@pytest.mark.parametrize("value, words", [
    (float("nan"), "params 'w' holds NaN or Inf"),
    (1e30, "params 'w' holds a value of magnitude 1e+30, beyond any trained weight"),
])
def test_a_checkpoint_with_broken_weights_is_refused_by_the_loader(tmp_path, value, words):
    path = tmp_path / "checkpoint.pt"
    broken = _checkpoint()
    broken.params["w"][0, 0] = value
    save_checkpoint(path, broken)
    with pytest.raises(ValueError, match=words.replace("+", r"\+")):
        load_checkpoint(path)
