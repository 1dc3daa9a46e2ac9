"""One measured run of each engine for `fedmeta perf`: the bare loop, the in-process engine and Flower's
Simulation Engine (Ray), with the Ray run's start-up taken apart; and what an import costs a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fedmeta.server.metrics import METRICS_NAME, read_metrics
from fedmeta.simulations.engines.processes import ROLE_ACTORS, ROLE_RAY_SERVICES, ROLE_SIMULATION, TreeMemorySampler

# The fedmeta modules that load torch or Flower (synth, config, centralised, the engines) are imported inside the
# functions that use them: `fedmeta perf --help` does not wait seconds for them.

# The engine is under test, not the model: a small UNet on 32x32 slices keeps a round short, so
# what the engines add stands out (a larger model only dilutes the ratios towards 1).
ENGINE_CONFIG = dict(
    image_size=32, model_base_channels=8, model_levels=3, episodes_per_site=1, k_shot=2, q_query=2,
    inner_steps=1, inner_lr=0.1, meta_lr=0.01, eval_every=0, node_wait_timeout=60.0,
)


def _federation(count: int, root: Path, *, render: bool = True) -> Path:
    """The lazy ``scale-<count>`` federation; ``render``: its training sites rendered now, so that what
    a part times is the engine, not the generator (the scaling part leaves them to first use)."""
    from fedmeta.common.synth import cached_federation, load_manifest

    federation = Path(cached_federation(root, f"scale-{count}", 0))
    if render:
        for info in load_manifest(federation).train_sites:
            info.folder()
    return federation


def _disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _config(federation: Path, out_dir: Path, **changes):
    from fedmeta.common.config import RunConfig

    return RunConfig(**{**ENGINE_CONFIG, "federation_dir": str(federation), "out_dir": str(out_dir), **changes})


def _round_seconds(out_dir: Path) -> list[float]:
    return [r["seconds"] for r in read_metrics(out_dir / METRICS_NAME) if r.get("round", 0) > 0]


def run_bare(config) -> dict[str, Any]:
    from fedmeta.simulations.experiments.centralised import run_centralised

    began = time.perf_counter()
    run = run_centralised(config, config.federation_dir, pooled=False)
    return {"seconds": time.perf_counter() - began, "rounds": len(run.rounds)}


def run_inprocess_engine(config, num_sites: int) -> dict[str, Any]:
    from fedmeta.simulations.engines.inprocess import run_inprocess, simulation_node_configs

    began = time.perf_counter()
    run_inprocess(config.to_run_config(), simulation_node_configs(num_sites), seed=config.seed)
    seconds = time.perf_counter() - began
    rounds = _round_seconds(Path(config.out_dir))
    return {"seconds": seconds, "rounds": len(rounds), "round_seconds": rounds}


def run_ray_engine(config, num_sites: int, flwr_home: Path) -> dict[str, Any]:
    from fedmeta.simulations.engines.flower_runtime import run_simulation_engine, source_app_dir

    app_dir = source_app_dir()
    (Path(config.out_dir) / METRICS_NAME).unlink(missing_ok=True)  # a reused --work folder: not this run's rounds
    with TreeMemorySampler(flwr_home) as sampler, \
            _RoundClock(Path(config.out_dir) / METRICS_NAME, sampler.started) as clock:
        run_simulation_engine(app_dir, config.to_run_config(), num_supernodes=num_sites, flwr_home=flwr_home)
        seconds = time.monotonic() - sampler.started
    rounds = _round_seconds(Path(config.out_dir))
    return {"seconds": seconds, "rounds": len(rounds), "round_seconds": rounds, "peak_tree_bytes": sampler.peak_bytes,
            "startup": _startup(sampler.timeline(), clock.appeared, rounds, seconds)}


class _RoundClock:
    """When each round's line appeared in the server's metrics.jsonl (seconds after `origin`, ±0.1 s)."""

    def __init__(self, path: Path, origin: float, interval_s: float = 0.1):
        self.path, self.origin, self.interval_s = path, origin, interval_s
        self.appeared: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "_RoundClock":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._poll()

    def _poll(self) -> None:
        try:
            text = self.path.read_bytes()
        except OSError:
            return
        lines = 0
        for line in text.splitlines():
            try:
                lines += json.loads(line).get("round", 0) > 0  # training rounds, as _round_seconds counts them
            except (ValueError, AttributeError):
                break  # a line being written: counted at the next poll
        now = time.monotonic() - self.origin
        if lines < len(self.appeared):  # the file was started afresh: what was counted was an earlier run's
            del self.appeared[lines:]
        while len(self.appeared) < lines:
            self.appeared.append(now)


# Phases of a Simulation Engine run, each ending when the named role's first process appears.
_PHASES = (
    (ROLE_SIMULATION, "flwr CLI, SuperLink, SuperExec, app bundle"),
    (ROLE_RAY_SERVICES, "flwr-simulation: imports, app install, ServerApp import"),
    (ROLE_ACTORS, "Ray cluster start"),
)


def _startup(timeline: dict[str, dict[str, float]], appeared: list[float], round_seconds: list[float],
             seconds: float) -> dict[str, Any]:
    """Where a Simulation Engine run's time outside its rounds goes (process first sightings, 0.5 s apart)."""
    phases, previous = [], 0.0
    for role, label in _PHASES:
        if role in timeline:
            at = timeline[role]["first_s"]
            phases.append({"phase": label, "seconds": at - previous})
            previous = at
    first_round_start = appeared[0] - round_seconds[0] if appeared and round_seconds else None
    last_round_end = appeared[-1] if appeared else None
    if first_round_start is not None:
        phases.append({"phase": "actors import the ClientApp; ServerApp's set-up", "seconds": first_round_start - previous})
    return {
        "phases": phases,
        "startup_seconds": first_round_start,
        "shutdown_seconds": None if last_round_end is None else seconds - last_round_end,
        "cpu_seconds_by_role": {role: row["cpu_s"] for role, row in timeline.items()},
        "processes_by_role": {role: row["processes"] for role, row in timeline.items()},
    }


def import_profile(module: str) -> dict[str, Any]:
    """Seconds a fresh interpreter takes to import `module`, and who in it costs what.

    From ``python -X importtime``: every module's own time goes to the outermost package outside
    fedmeta that (directly or not) imported it — scipy and matplotlib loaded by MONAI count as MONAI's,
    as they would be gone without it. What every Ray actor (the ClientApp) or the ServerApp pays before
    its first message.
    """
    began = time.perf_counter()
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                            capture_output=True, text=True, check=True)
    wall = time.perf_counter() - began
    rows = []  # (depth, own seconds, module), in importtime's order: children before their parent
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, _cumulative, name = line.split(":", 1)[1].split("|", 2)
        rows.append(((len(name) - len(name.lstrip())) // 2, int(own) / 1e6, name.strip()))
    by_package: dict[str, float] = {}
    path: list[str] = []  # read backwards, a parent comes before its children: the stack is the import path
    for depth, own, name in reversed(rows):
        del path[depth:]
        path.append(name)
        owner = next((part.split(".")[0] for part in path if part.split(".")[0] != "fedmeta"), "fedmeta")
        by_package[owner] = by_package.get(owner, 0.0) + own
    ranked = sorted(by_package.items(), key=lambda item: -item[1])
    shown = dict(ranked[:5])
    shown["other"] = sum(value for _, value in ranked[5:])
    return {"module": module, "process_seconds": wall, "import_seconds": sum(by_package.values()),
            "by_package": shown}
