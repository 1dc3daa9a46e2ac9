"""`fedmeta simulate` over a plan's own site folders: the run must train under the plan it names, and a site model
adapted in a federation of mixed one-channel modalities normalises its scans as adaptation did (issue 30)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmeta.simulations.cli import main
from tests.common.test_modalities import _ct_case, _write_site


def _mr_case(rng, shape=(48, 40, 12)) -> tuple[np.ndarray, np.ndarray]:
    image, label = _ct_case(rng, shape)
    return (np.abs(image + 1000.0) * 0.3).astype(np.float32), label  # MR-like: no HU, air near 0


@pytest.fixture(scope="module")
def mixed_plan(tmp_path_factory) -> Path:
    """Training sites CT and MR (one channel each, so the plan's channels are ""), a CT site held out."""
    root = tmp_path_factory.mktemp("mixed")
    sites = {}
    for seed, (name, make, channel) in enumerate((("ct-a", _ct_case, "CT"), ("mr-b", _mr_case, "MRI"),
                                                  ("ct-new", _ct_case, "CT"))):
        rng = np.random.default_rng(seed)
        cases = [make(rng) for _ in range(4)]
        sites[name] = _write_site(root / name, [c[0] for c in cases], [c[1] for c in cases], {"0": channel},
                                  zooms=(1.6, 1.6, 5.0))
    assert main(["plan", "--sites", str(sites["ct-a"]), str(sites["mr-b"]), "--heldout", str(sites["ct-new"]),
                 "--out", str(root / "plan"), "--max-image-size", "32", "--quiet"]) == 0
    return root / "plan"


def test_a_run_on_a_plan_folder_must_carry_the_plans_keys(mixed_plan, tmp_path, capsys):
    common = ["simulate", "--federation-dir", str(mixed_plan), "--engine", "inprocess", "--rounds", "1",
              "--no-baseline", "--oracle-steps", "0", "--out", str(tmp_path / "run")]
    assert main(common) == 1  # no --preset: the default run config knows no plan
    assert "holds a plan (plan.json" in capsys.readouterr().err
    edited = tmp_path / "edited.toml"
    edited.write_text((mixed_plan / "run-config.toml").read_text().replace("ct-std = ", "ct-std = 1"))
    assert main([*common, "--preset", str(edited)]) == 1
    assert "changes ct-std from the plan" in capsys.readouterr().err


def test_a_site_model_of_a_mixed_federation_names_its_own_channel(mixed_plan, tmp_path):
    import torch

    from fedmeta.client.model_card import load_site_model
    from fedmeta.common.config import RunConfig

    assert 'channels = ""' in (mixed_plan / "run-config.toml").read_text()
    run = tmp_path / "run"
    assert main(["simulate", "--federation-dir", str(mixed_plan), "--preset", str(mixed_plan / "run-config.toml"),
                 "--engine", "inprocess", "--rounds", "1", "--no-baseline", "--oracle-steps", "0", "--out", str(run),
                 "--set", "k-shot=2", "--set", "q-query=2", "--set", "eval-k-shot=2", "--set", "eval-steps=0"]) == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["adapt", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(mixed_plan.parent / "ct-new"),
                     "--shots", "2", "--steps", "1", "--out", str(tmp_path / "model"), "--allow-unsigned"]) == 0
    finally:
        torch.set_num_threads(threads)
    model = load_site_model(tmp_path / "model")
    assert RunConfig.from_run_config(model.run_config).channel_names == ("CT",)  # predict reads it as CT
    assert model.card["model"]["channels"] == ["CT"]
