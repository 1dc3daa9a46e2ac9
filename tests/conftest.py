"""Shared fixtures: the smoke federation is generated once per test session."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest


def pytest_configure(config):
    # What the ClientApp keeps of a site (its random order key) goes to a folder of this session, never to the
    # home of whoever runs the tests; subprocesses the tests start inherit it.
    if "FEDMETA_HOME" not in os.environ:
        os.environ["FEDMETA_HOME"] = config._fedmeta_home = tempfile.mkdtemp(prefix="fedmeta-test-home-")


def pytest_unconfigure(config):
    home = getattr(config, "_fedmeta_home", None)
    if home:
        shutil.rmtree(home, ignore_errors=True)
        os.environ.pop("FEDMETA_HOME", None)


@pytest.fixture(scope="session")
def smoke_federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a generated `smoke` federation (3 train + 2 held-out sites, 4 patients each, seed 0)."""
    from fedmeta.common.synth import generate_federation

    return generate_federation(tmp_path_factory.mktemp("federation") / "smoke", "smoke", seed=0)


def train_smoke_run(federation: Path, run_dir: Path, **changes) -> Path:
    """A short in-process run of the smoke federation's training sites; returns its checkpoint.pt."""
    from fedmeta.common.checkpoint import CHECKPOINT_NAME
    from fedmeta.common.config import RunConfig
    from fedmeta.common.synth import load_manifest
    from fedmeta.simulations.engines.inprocess import run_inprocess
    from fedmeta.simulations.experiments.centralised import training_node_configs

    settings = dict(algorithm="fomaml", num_rounds=1, episodes_per_site=1, k_shot=2, q_query=2, image_size=32,
                    model_base_channels=8, model_levels=3, eval_every=0, device="cpu")
    config = RunConfig(**{**settings, **changes, "out_dir": str(run_dir)})
    run_inprocess(config.to_run_config(), training_node_configs(load_manifest(federation).train_sites), seed=0)
    return run_dir / CHECKPOINT_NAME


@pytest.fixture
def lazy_preset(monkeypatch):
    """Registers a small lazy preset (what the scale-N presets are, with fewer sites and patients) for one test;
    ``lazy_preset(sites=3, patients=1, heldout=("unseen-sequence",))`` returns its name."""
    from fedmeta.common import synth

    def register(sites: int = 3, patients: int = 1, heldout: tuple[str, ...] = ()) -> str:
        spec = synth.PRESETS["scale-10"]
        monkeypatch.setitem(synth.PRESETS, "tiny-lazy", synth.Preset(
            num_train_sites=sites, heldout_kinds=heldout, patients=(patients, patients), inplane_mm=spec.inplane_mm,
            slice_thickness_mm=spec.slice_thickness_mm, lazy=True))
        return "tiny-lazy"

    return register


# A benchmark preset small enough for a test (one seed, one round, shots 1 and 2, steps 0 and 2): the benchmark
# tests edit it (tests/simulations/) and the no-overwrite tests run it (tests/common/).
TINY_BENCHMARK = """
federation = "smoke"
seeds = 1
shots = [1, 2]
steps = [0, 2]
eval-max-images = 16
oracle-steps = 5
curve-every = 1

[run-config]
num-rounds = 1
episodes-per-site = 1
k-shot = 2
q-query = 2
image-size = 32
model-base-channels = 8
model-levels = 3
inner-lr = 0.1
meta-lr = 0.01
device = "cpu"

[training.fedavg]
inner-steps = 1
meta-optimizer = "sgd"
meta-lr = 1.0
[training.fedprox]
inner-steps = 1
meta-optimizer = "sgd"
meta-lr = 1.0
proximal-mu = 0.01
[training.fomaml]
inner-steps = 1
[training.maml]
inner-steps = 1
[training.reptile]
inner-steps = 2
[training.metasgd]
inner-steps = 1
[training.anil]
inner-steps = 1
[training.fast-weights]
inner-steps = 1
[training.prototypes]
inner-steps = 0
[training.prototypes-contrastive]
inner-steps = 0
[training.lstm-optimizer]
inner-steps = 1
[training.pooled-fomaml]
inner-steps = 1
[training.pooled-maml]
inner-steps = 1
[training.pooled-metasgd]
inner-steps = 1
"""


@pytest.fixture
def tiny_preset(tmp_path) -> Path:
    """TINY_BENCHMARK written to a file: what `fedmeta benchmark --preset` reads."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_BENCHMARK)
    return path
