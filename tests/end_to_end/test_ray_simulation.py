"""fedmeta's own ServerApp and ClientApp on Flower's Simulation Engine (Ray), through `flwr run`.

Slow: each test starts a real local SuperLink, `flwr-simulation` and a Ray cluster.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedmeta.common.checkpoint import CHECKPOINT_NAME, load_checkpoint
from fedmeta.server.metrics import METRICS_NAME, read_metrics
from fedmeta.simulations.engines.flower_runtime import SimulationEngine, run_simulation_engine, source_app_dir
from fedmeta.simulations.experiments.presets import load_preset

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def flower_processes(flwr_home: Path) -> list[int]:
    """PIDs of live processes whose environment names this FLWR_HOME: what the run left behind."""
    needle = f"FLWR_HOME={flwr_home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state not in ("Z", "X"):
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def smoke_run_config(federation: Path, out_dir: Path, **changes) -> dict:
    overrides, _driver = load_preset("smoke")
    return {**overrides, "federation-dir": str(federation), "out-dir": str(out_dir), **changes}


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the leftover-process check reads /proc")
def test_ray_simulation_trains_three_sites_for_two_rounds(federation, tmp_path):
    from fedmeta.common.synth import load_manifest

    manifest = load_manifest(federation)
    assert len(manifest.train_sites) == 3
    out_dir, flwr_home = tmp_path / "out", tmp_path / "flwr-home"
    # Partitions map to the training sites first: three supernodes are the three training sites.
    run_config = smoke_run_config(federation, out_dir, **{"num-rounds": 2, "eval-every": 0, "min-sites": 3})

    # The app folder as `fedmeta simulate --engine ray` finds it: the checkout the package runs from.
    outcome = run_simulation_engine(
        source_app_dir(), run_config, num_supernodes=3, num_cpus_per_client=1, timeout_s=600, flwr_home=flwr_home
    )

    assert outcome.ok and outcome.status == "finished:completed"
    assert outcome.run_id > 0
    checkpoint = load_checkpoint(out_dir / CHECKPOINT_NAME)
    assert checkpoint.round == 2
    assert all(torch_finite(t) for t in checkpoint.params.values())
    rounds = [r for r in read_metrics(out_dir / METRICS_NAME) if r["round"] > 0]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert record["sites_answered"] == 3, record
        assert record["updated"] is True and record["dropped"] == []
        assert math.isfinite(record["train"]["query-loss-after"])
    assert flower_processes(flwr_home) == [], "the SuperLink, SuperExec or Ray outlived the run"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the leftover-process check reads /proc")
def test_a_failed_run_is_read_from_the_superlink_and_the_next_run_shares_that_superlink(federation, tmp_path):
    # `flwr run` exits 0 here; only the SuperLink knows the ServerApp failed (no out-dir).
    flwr_home = tmp_path / "flwr-home"
    failing = smoke_run_config(federation, tmp_path / "out", **{"num-rounds": 1, "out-dir": ""})
    good = smoke_run_config(federation, tmp_path / "out", **{"num-rounds": 1, "eval-every": 0})

    with SimulationEngine(flwr_home) as engine:
        with pytest.raises(RuntimeError, match=r"finished:failed") as raised:
            engine.run(REPO_ROOT, failing, num_supernodes=3, timeout_s=300)
        assert "out-dir" in str(raised.value), "the log tail must carry the ServerApp's own reason"
        # The same SuperLink takes the next run (as `fedmeta simulate`'s baseline after its meta run).
        outcome = engine.run(REPO_ROOT, good, num_supernodes=3, timeout_s=300)
        assert outcome.ok and load_checkpoint(tmp_path / "out" / CHECKPOINT_NAME).round == 1
        first, second = (flwr_home / "logs" / f"run-{n}.log" for n in (1, 2))
        assert "Starting local SuperLink" in first.read_text()
        assert "Starting local SuperLink" not in second.read_text()
        assert not list(flwr_home.glob("app-*")), "the staged app copies are deleted once sent"

    assert flower_processes(flwr_home) == []


def torch_finite(tensor) -> bool:
    return bool(tensor.isfinite().all())
