"""The registry is the one place an algorithm is decided: every name has an object, and no code outside it
compares the algorithm with a name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from fedmeta.common.algorithms import ALGORITHMS, Algorithm, algorithm_named, names_where
from fedmeta.common.algorithms.fedavg import FedAvg
from fedmeta.common.algorithms.maml import FOMAML
from fedmeta.common.config import RunConfig
from fedmeta.common.protocol import ALGORITHMS as WIRE_NAMES

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "client", "server", "simulations")
ALLOWED = ("common/algorithms/", "common/protocol.py")


def _names_compared(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of every comparison of something with an algorithm's name (==, !=, in, not in a literal)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        for side in [node.left, *node.comparators]:
            literals = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            found += [(node.lineno, c.value) for c in literals
                      if isinstance(c, ast.Constant) and c.value in WIRE_NAMES]
    return found


def test_no_code_outside_the_registry_compares_the_algorithm_with_a_name():
    offences = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative.startswith(ALLOWED):
                continue
            offences += [f"{relative}:{line} compares with {name!r}" for line, name in _names_compared(ast.parse(path.read_text()))]
    assert not offences, "ask the algorithm object instead (fedmeta.common.algorithms):\n" + "\n".join(offences)


def test_the_counter_sees_a_comparison():
    assert _names_compared(ast.parse('x = config.algorithm == "metasgd" or a in ("fedavg", "fedprox")')) == [
        (1, "metasgd"), (1, "fedavg"), (1, "fedprox")]


def test_every_wire_name_has_one_algorithm_object_in_the_same_order():
    assert tuple(ALGORITHMS) == WIRE_NAMES
    for name, algorithm in ALGORITHMS.items():
        assert isinstance(algorithm, Algorithm) and algorithm.name == name
        assert algorithm.description and "\n" not in algorithm.description
    with pytest.raises(ValueError, match="unknown algorithm 'mamll'; valid choices: maml, fomaml"):
        algorithm_named("mamll")
    assert names_where("second_order") == ["maml", "metasgd", "anil"]
    assert names_where("learns_step_sizes") == ["metasgd"]


@pytest.mark.parametrize(("name", "per_episode"), [("fedavg", 2 * 3), ("fedprox", 2 * 3), ("reptile", 3),
                                                   ("prototypes", 3 + 2), ("fomaml", 3 + 1), ("maml", 3 + 1),
                                                   ("lstm-optimizer", 3 + 1)])
def test_each_algorithm_states_its_cost_in_local_gradient_steps(name, per_episode):
    assert ALGORITHMS[name].local_steps(3, 2) == 2 * per_episode


def test_a_new_algorithm_is_one_class_and_one_registry_entry(monkeypatch):
    """A method registered under a new name trains through meta_gradient with nothing else edited."""
    from fedmeta.common.losses import DiceCELoss
    from fedmeta.common.meta import meta_gradient
    from fedmeta.common.model import ModelConfig, build_model, initial_params

    class HalfFOMAML(FOMAML):  # FOMAML's update, halved: a toy, but every hook comes from the class
        name = "half-fomaml"
        description = "FOMAML at half the step"

        def local_update(self, model, params, episodes, loop):
            grads, stats = super().local_update(model, params, episodes, loop)
            return {k: v / 2 for k, v in grads.items()}, stats

    monkeypatch.setitem(ALGORITHMS, HalfFOMAML.name, HalfFOMAML())
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=(4, 8), strides=(2,), num_res_units=0))
    params = initial_params(model)
    x, y = torch.randn(2, 1, 16, 16), torch.nn.functional.one_hot(torch.randint(0, 4, (2, 16, 16)), 4).permute(0, 3, 1, 2).float()
    settings = dict(inner_steps=1, inner_lr=0.1, loss_fn=DiceCELoss(4))
    half, _ = meta_gradient(model, params, [(x, y, x, y)], algorithm="half-fomaml", **settings)
    whole, _ = meta_gradient(model, params, [(x, y, x, y)], algorithm="fomaml", **settings)
    assert all(torch.equal(half[n], whole[n] / 2) for n in whole)


def test_the_run_config_asks_the_algorithm():
    assert RunConfig(algorithm="fedprox").weighting == "data" and FedAvg.data_weighted
    assert RunConfig(algorithm="metasgd").weighting == "per-site"
    assert RunConfig(algorithm="prototypes").model_config().learner == ALGORITHMS["prototypes"].learner


def test_the_round_asks_for_meta_sgds_step_sizes_by_name_and_takes_what_it_is_given():
    from fedmeta.common.federated_round import adaptation_rule
    from fedmeta.common.model import build_model

    config = RunConfig(algorithm="metasgd", image_size=32, model_base_channels=4, model_levels=2)
    model = build_model(config.model_config())
    with pytest.raises(ValueError, match=r"algorithm metasgd adapts with learned step sizes \(lr.<name>\), and none"):
        adaptation_rule(config, model, None)
    assert adaptation_rule(config, model, {}) == ({}, None)
    assert adaptation_rule(config.replace(algorithm="anil"), model, None)[1] == ALGORITHMS["anil"].adapted_names(model)
