"""θ is pinned bit for bit: the smoke run after 3 rounds (in-process engine, seed 0) has a known digest.

The digests were taken before the layout moved into the `fedmeta` namespace and hold after it; a
refactor that changes one bit of θ fails here. A change meant to alter the trajectory re-pins them,
saying why in its commit: FedAvg's default weighting became the sites' data (McMahan et al.), so
its default digest moved; weighted per site, it still gives the bits it gave before. Bits depend on the torch build and thread count: one thread, and the
CPU build this project pins; another build skips with the reason.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from fedmeta.common.checkpoint import CHECKPOINT_NAME, load_checkpoint
from fedmeta.common.config import RunConfig
from fedmeta.simulations.engines.inprocess import run_inprocess, simulation_node_configs
from fedmeta.simulations.experiments.presets import load_preset

PINNED_TORCH = "2.13.0+cpu"
DIGESTS = {  # (algorithm, site-weighting) -> sha256 of θ after 3 rounds
    ("fomaml", "auto"): "2badeac6eeaa58a3b4a2f23bd20969faca0458e6cee192d5689ec608bdeb11b9",
    ("metasgd", "auto"): "528f88cbb83957f6bf72925dabb6aedfcf63b68bb585cb6c0107d78f73f106c7",
    ("anil", "auto"): "ed6dedf7acf38754a0f78fb4a9901db0f1ddbc09e282f6f8c9ef0ee4b2ebd5e5",
    ("fedavg", "auto"): "9d0b2886eda9745a69b8d61ff6289d2400f3328e801a4ee69891ac76ef56ada3",  # weighted by data
    ("fedavg", "per-site"): "6927bc9381b5c2d38ea3a3a4b657f1b932c46484db440bf7954ed113c4ab8a42",  # the pre-move bits
}


def theta_digest(params: dict[str, torch.Tensor], step_sizes: dict[str, torch.Tensor] | None) -> str:
    """sha256 over θ's names and bytes in name order, then Meta-SGD's step sizes likewise."""
    digest = hashlib.sha256()
    for name in sorted(params):
        digest.update(name.encode())
        digest.update(params[name].numpy().tobytes())
    for name in sorted(step_sizes or {}):
        digest.update(b"lr." + name.encode())
        digest.update(step_sizes[name].numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.skipif(torch.__version__ != PINNED_TORCH, reason=f"digests are of torch {PINNED_TORCH}'s bits")
@pytest.mark.parametrize(("algorithm", "weighting"), sorted(DIGESTS))
def test_smoke_theta_after_three_rounds_is_bitwise_pinned(smoke_federation, tmp_path, one_thread, algorithm, weighting):
    overrides, _ = load_preset("smoke")
    config = RunConfig.from_run_config({
        **overrides, "num-rounds": 3, "algorithm": algorithm, "site-weighting": weighting, "seed": 0, "device": "cpu",
        "out-dir": str(tmp_path), "federation-dir": str(smoke_federation),
    })
    run_inprocess(config.to_run_config(), simulation_node_configs(5), seed=0)
    checkpoint = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert checkpoint.round == 3
    assert theta_digest(checkpoint.params, checkpoint.step_sizes) == DIGESTS[(algorithm, weighting)]
