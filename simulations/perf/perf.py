"""`fedmeta perf` (alias `fedmeta bench`): performance figures, each a ratio of two things measured in the same run.

- ``sim``: the same meta-training (10 sites, 10 rounds, the default model and episodes) through
  Flower's Simulation Engine (Ray), through the in-process engine, and as a bare loop over
  ``fedmeta.common.meta`` (fedmeta.simulations.experiments.centralised, ``pooled=False``): wall time and ratios to the bare
  loop, with Ray's start-up split out.
- ``scaling``: 10, 30, 100 and 1,000 simulated sites on the Simulation Engine, 10 sampled per round
  (and 1,000 with 50 sampled): time per round, start-up, peak memory (PSS, so shared pages count
  once) of the whole process tree, and what the lazy federation generated and rendered.
- ``comm``: bytes a site's train reply takes on the wire (Flower's protobuf) against the fp32 size
  of what it stands for (θ, and Meta-SGD's step sizes).
- ``meta``: the meta-step micro-benchmark (fedmeta.simulations.perf.meta_step), summarised.
- ``episodes``: a site's episodes in a loop against batched with ``torch.func.vmap`` (FOMAML, which
  fedmeta batches by default, and MAML, which it does not), side by side: time ratio and difference.
- ``secagg``: one federation (default model, every site every round) with plain aggregation and with
  SecAgg+, side by side in one run: wire bytes both ways per site and round (Flower's protobuf,
  every stage's messages) and seconds per round, and their ratios.

``fedmeta perf`` alone runs them all; ``--quick`` shrinks each for a look in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedmeta.simulations.engines.processes import (
    ROLE_ACTORS, ROLE_RAY_SERVICES, ROLE_SIMULATION, TreeMemorySampler,
)
from fedmeta.simulations.perf import meta_step


PARTS = ("sim", "scaling", "comm", "meta", "episodes", "secagg")
TARGETS = {"ray_vs_bare": 1.25, "memory_largest_vs_smallest": 1.3, "bytes_vs_fp32": 1.05, "maml_vs_fomaml": 3.0,
           "fomaml_vs_plain": 1.3}

# The engine is under test, not the model: a small UNet on 32x32 slices keeps a round short, so
# what the engines add stands out (a larger model only dilutes the ratios towards 1).
ENGINE_CONFIG = dict(
    image_size=32, model_base_channels=8, model_levels=3, episodes_per_site=1, k_shot=2, q_query=2,
    inner_steps=1, inner_lr=0.1, meta_lr=0.01, eval_every=0, node_wait_timeout=60.0,
)


# --------------------------------------------------------------------------------------------------
# The engines, one run each


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
    from fedmeta.server.metrics import METRICS_NAME, read_metrics

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
    from fedmeta.server.metrics import METRICS_NAME
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
        import threading

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
    import subprocess

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


# --------------------------------------------------------------------------------------------------
# The four parts


def bench_sim(work: Path, *, sites: int = 10, rounds: int = 10) -> dict[str, Any]:
    """Ray vs in-process vs bare loop on the same meta-training."""
    from fedmeta.common.config import RunConfig

    federation = _federation(sites, work / "federations")
    # The meta-training a user runs: the default model and episodes (ENGINE_CONFIG's tiny model
    # would make the comparison one of start-up times alone).
    defaults = RunConfig()
    base = dict(num_rounds=rounds, image_size=defaults.image_size, model_base_channels=defaults.model_base_channels,
                model_levels=defaults.model_levels, episodes_per_site=defaults.episodes_per_site,
                k_shot=defaults.k_shot, q_query=defaults.q_query, inner_steps=defaults.inner_steps,
                inner_lr=defaults.inner_lr, meta_lr=defaults.meta_lr)
    bare = run_bare(_config(federation, work / "sim-bare", **base))
    inproc = run_inprocess_engine(_config(federation, work / "sim-inprocess", **base), sites)
    ray = run_ray_engine(_config(federation, work / "sim-ray", **base), sites, work / "flwr-sim")
    in_rounds = sum(ray["round_seconds"])
    outside = ray["seconds"] - in_rounds
    # Start-up and shutdown are a fixed cost per run, rounds a cost per round: from this run's own figures,
    # the number of rounds from which Ray / bare loop would be within the target.
    margin = TARGETS["ray_vs_bare"] * bare["seconds"] / rounds - in_rounds / rounds
    return {
        "sites": sites, "rounds": rounds,
        "bare_seconds": bare["seconds"], "inprocess_seconds": inproc["seconds"], "ray_seconds": ray["seconds"],
        "inprocess_vs_bare": inproc["seconds"] / bare["seconds"],
        "ray_vs_bare": ray["seconds"] / bare["seconds"],
        # Where Ray's time goes: its rounds (ServerApp's own clock) and everything else, which is
        # start-up (SuperLink, Ray cluster, app install, actors) and shutdown.
        "ray_seconds_in_rounds": in_rounds,
        "ray_seconds_outside_rounds": ray["seconds"] - in_rounds,
        "ray_rounds_vs_bare": in_rounds / bare["seconds"],
        "inprocess_seconds_in_rounds": sum(inproc["round_seconds"]),
        "ray_startup": ray["startup"],
        "rounds_for_target": math.ceil(outside / margin) if margin > 0 else None,
        # What a ClientApp actor and the ServerApp import before their first message, in fresh interpreters.
        "imports": {"clientapp": import_profile("fedmeta.client.app"), "serverapp": import_profile("fedmeta.server.app")},
    }


def bench_scaling(work: Path, *, counts=(10, 30, 100, 1000), rounds: int = 2, sampled: int = 10,
                  more_sampled: int | None = 50) -> dict[str, Any]:
    """Time per round and peak process-tree memory at several federation sizes, ``sampled`` sites per round.

    The federations are lazy (a site is rendered the first time it is sampled), so a round's time
    holds the first use of the sites it samples — reading (and rendering) their data — as a real
    simulation's does: the first round is that cold round at every size, later rounds at a small
    federation find their sites loaded. ``more_sampled``: one more run at the largest size with that
    many sites per round, to show what round time follows.
    """
    from fedmeta.common.synth import load_manifest

    def cold(count: int):
        # Its own federations, cold for every run: sites rendered by another part or an earlier run (a reused
        # --work) would make this run's first round warm at some sizes and not at others.
        federation = _federation(count, work / "scaling-federations", render=False)
        generation = load_manifest(federation)
        for info in generation.sites:
            if info.path.is_dir():
                shutil.rmtree(info.path)
        return federation, generation

    def one(count: int, per_round: int, name: str) -> dict[str, Any]:
        federation, generation = cold(count)
        config = _config(federation, work / name, num_rounds=rounds, sites_per_round=min(per_round, count))
        ray = run_ray_engine(config, count, work / f"flwr-{name}")
        rendered = [info for info in generation.sites if info.path.is_dir()]
        return {
            "sites_per_round": min(per_round, count),
            "seconds": ray["seconds"],
            "seconds_per_round": sum(ray["round_seconds"]) / max(1, len(ray["round_seconds"])),
            "first_round_seconds": ray["round_seconds"][0],
            "startup_seconds": ray["startup"]["startup_seconds"],
            # Flower's Simulation Engine polls every simulated node's inbox every 0.1 s (flwr 1.41,
            # server/superlink/fleet/vce/vce_api.py): this process's CPU grows with the sites that exist.
            "engine_cpu_seconds": ray["startup"]["cpu_seconds_by_role"].get(ROLE_SIMULATION, 0.0),
            "peak_tree_bytes": ray["peak_tree_bytes"],
            "federation_generation_seconds": generation.generation_seconds,
            "sites_rendered": len(rendered),
            "federation_disk_bytes": _disk_bytes(federation),
        }

    rows = {str(count): one(count, sampled, f"scaling-{count}") for count in counts}
    smallest, largest = rows[str(counts[0])], rows[str(counts[-1])]
    result = {
        "rounds": rounds, "sites_per_round": sampled, "by_sites": rows,
        "memory_largest_vs_smallest": largest["peak_tree_bytes"] / smallest["peak_tree_bytes"],
        "round_time_largest_vs_smallest": largest["seconds_per_round"] / smallest["seconds_per_round"],
        # Both cold: the first round samples and first reads `sampled` sites at either size.
        "first_round_largest_vs_smallest": largest["first_round_seconds"] / smallest["first_round_seconds"],
        "largest": counts[-1], "smallest": counts[0],
    }
    if more_sampled:
        more = one(counts[-1], more_sampled, f"scaling-{counts[-1]}-sampled-{more_sampled}")
        result["by_sites_sampled"] = {str(sampled): largest, str(more_sampled): more}
        result["round_time_more_sampled_vs_sampled"] = more["seconds_per_round"] / largest["seconds_per_round"]
    # fedmeta's own code without Flower's engine: the in-process engine (the same ServerApp and ClientApp,
    # messages handed over directly) at the smallest and largest sizes, cold too.
    inprocess = {}
    for count in (counts[0], counts[-1]):
        federation, _ = cold(count)
        config = _config(federation, work / f"scaling-inprocess-{count}", num_rounds=rounds,
                         sites_per_round=min(sampled, count))
        with TreeMemorySampler(None) as sampler:
            run = run_inprocess_engine(config, count)
        inprocess[str(count)] = {"seconds": run["seconds"], "first_round_seconds": run["round_seconds"][0],
                                 "seconds_per_round": sum(run["round_seconds"]) / len(run["round_seconds"]),
                                 "peak_tree_bytes": sampler.peak_bytes}
    result["inprocess_by_sites"] = inprocess
    result["inprocess_first_round_largest_vs_smallest"] = (inprocess[str(counts[-1])]["first_round_seconds"]
                                                           / inprocess[str(counts[0])]["first_round_seconds"])
    return result


def bench_comm(work: Path, *, algorithms=("fomaml", "metasgd")) -> dict[str, Any]:
    """Wire bytes of each train reply against the fp32 size of the arrays it carries.

    Measured on the default model size (the ratio depends on it: names and metrics are a fixed
    cost), with the reply serialised exactly as Flower sends it (``message_to_proto``).
    """
    from flwr.app import MessageType
    from flwr.common.serde import message_to_proto

    from fedmeta.client.app import app as client_app
    from fedmeta.common.config import RunConfig
    from fedmeta.common.model import build_model
    from fedmeta.simulations.engines.inprocess import run_inprocess, simulation_node_configs

    federation = _federation(10, work / "federations")
    rows = {}
    for algorithm in algorithms:
        sizes: list[int] = []

        def measuring_client(message, context, sizes=sizes):
            reply = client_app(message, context)
            if message.metadata.message_type == MessageType.TRAIN and reply.has_content():
                sizes.append(message_to_proto(reply).ByteSize())
            return reply

        defaults = RunConfig()
        config = _config(federation, work / f"comm-{algorithm}", num_rounds=1, sites_per_round=2, algorithm=algorithm,
                         image_size=defaults.image_size, model_base_channels=defaults.model_base_channels,
                         model_levels=defaults.model_levels)
        run_inprocess(config.to_run_config(), simulation_node_configs(10), client_app=measuring_client)
        numel = sum(p.numel() for p in build_model(config.model_config()).parameters())
        arrays = 2 if algorithm == "metasgd" else 1  # Meta-SGD also sends ∂L/∂α, one per parameter
        model_bytes = 4 * numel
        reply_bytes = max(sizes)
        rows[algorithm] = {
            "model_fp32_bytes": model_bytes,
            "reply_bytes": reply_bytes,
            "reply_vs_model": reply_bytes / model_bytes,
            "reply_vs_payload": reply_bytes / (arrays * model_bytes),
        }
    return rows


def bench_secagg(work: Path, *, sites: int = 10, rounds: int = 3) -> dict[str, Any]:
    """Plain aggregation against SecAgg+ on the same federation, rounds and seed: bytes and seconds per round."""
    from flwr.common.serde import message_to_proto

    from fedmeta.client.app import app as client_app
    from fedmeta.common.config import RunConfig
    from fedmeta.simulations.engines.inprocess import run_inprocess, simulation_node_configs

    federation = _federation(sites, work / "federations")
    defaults = RunConfig()
    rows = {}
    for mode in ("none", "secagg+"):
        sizes = {"down": 0, "up": 0}

        def measuring_client(message, context, sizes=sizes):
            reply = client_app(message, context)
            if message.metadata.message_type.startswith("train"):  # every stage of the round, both ways
                sizes["down"] += message_to_proto(message).ByteSize()
                sizes["up"] += message_to_proto(reply).ByteSize()
            return reply

        out = work / f"secagg-{mode}"
        config = _config(federation, out, num_rounds=rounds, secure_aggregation=mode, site_weighting="per-site",
                         image_size=defaults.image_size, model_base_channels=defaults.model_base_channels,
                         model_levels=defaults.model_levels)
        run_inprocess(config.to_run_config(), simulation_node_configs(sites), client_app=measuring_client)
        seconds = _round_seconds(out)
        per_site_round = sites * rounds
        rows[mode] = {"bytes_down_per_site_round": sizes["down"] / per_site_round,
                      "bytes_up_per_site_round": sizes["up"] / per_site_round,
                      "seconds_per_round": sum(seconds) / len(seconds)}
    plain, secure = rows["none"], rows["secagg+"]
    return {"sites": sites, "rounds": rounds, "plain": plain, "secagg": secure,
            "bytes_vs_plain": (secure["bytes_down_per_site_round"] + secure["bytes_up_per_site_round"])
            / (plain["bytes_down_per_site_round"] + plain["bytes_up_per_site_round"]),
            "seconds_vs_plain": secure["seconds_per_round"] / plain["seconds_per_round"]}


def bench_episode_runs(work: Path, *, counts=(2, 4), rounds: int = 5, repeats: int = 2) -> dict[str, Any]:
    """Whole bare-loop runs (10 sites, default model, FOMAML) with each site's episodes in a loop and
    batched, alternated: what sets ``fedmeta.common.meta.BATCH_FROM`` (the micro-benchmark alone favours
    batching more than a whole run does)."""
    from fedmeta.common import meta
    from fedmeta.common.config import RunConfig

    federation = _federation(10, work / "federations")
    defaults = RunConfig()
    rows = {}
    saved = meta.BATCH_FROM  # the default's threshold, which every caller of meta_gradient follows
    try:
        for count in counts:
            config = _config(federation, work / f"episodes-{count}", num_rounds=rounds, episodes_per_site=count,
                             image_size=defaults.image_size, model_base_channels=defaults.model_base_channels,
                             model_levels=defaults.model_levels, k_shot=defaults.k_shot, q_query=defaults.q_query,
                             inner_steps=defaults.inner_steps, inner_lr=defaults.inner_lr, meta_lr=defaults.meta_lr)
            seconds: dict[str, list[float]] = {"loop": [], "vmap": []}
            for _ in range(repeats):
                for name, batch_from in (("loop", count + 1), ("vmap", 2)):
                    meta.BATCH_FROM = batch_from
                    seconds[name].append(run_bare(config)["seconds"])
            loop_s, vmap_s = min(seconds["loop"]), min(seconds["vmap"])
            rows[str(count)] = {"loop_seconds": loop_s, "vmap_seconds": vmap_s, "vmap_vs_loop": vmap_s / loop_s}
    finally:
        meta.BATCH_FROM = saved
    return {"sites": 10, "rounds": rounds, "by_episodes": rows}


def meta_step_summary(*, quick: bool) -> dict[str, Any]:
    setting = meta_step.SETTINGS["2d"]
    table = meta_step.summarise(meta_step.measure(setting, repeats=2 if quick else 5))
    return {"setting": setting.name, "table": table}


# --------------------------------------------------------------------------------------------------
# Report


def format_report(results: dict[str, Any]) -> str:
    lines = [f"# fedmeta perf ({results['machine']})", ""]
    checks = []
    if "sim" in results:
        s = results["sim"]
        lines += [
            f"## Simulation overhead: {s['sites']} sites, {s['rounds']} rounds",
            "", "| engine | wall s | × bare loop |", "|---|---:|---:|",
            f"| bare loop (fedmeta.common.meta) | {s['bare_seconds']:.1f} | 1.00 |",
            f"| in-process engine | {s['inprocess_seconds']:.1f} | {s['inprocess_vs_bare']:.2f} |",
            f"| Flower Simulation Engine (Ray) | {s['ray_seconds']:.1f} | {s['ray_vs_bare']:.2f} |",
            "",
            f"Ray: {s['ray_seconds_in_rounds']:.1f} s in rounds ({s['ray_rounds_vs_bare']:.2f} × bare), "
            f"{s['ray_seconds_outside_rounds']:.1f} s start-up and shutdown.",
            "",
        ]
        if s.get("rounds_for_target"):
            lines += [f"Start-up and shutdown are a fixed cost per run: with these per-round times, Ray / bare loop "
                      f"is within {TARGETS['ray_vs_bare']} from about {s['rounds_for_target']} rounds on.", ""]
        lines += _startup_lines(s)
        checks.append(("Ray / bare loop", s["ray_vs_bare"], TARGETS["ray_vs_bare"]))
    if "scaling" in results:
        c = results["scaling"]
        lines += [f"## Scaling on the Simulation Engine ({c['sites_per_round']} sites sampled per round, "
                  f"{c['rounds']} rounds)", "",
                  "| sites | sampled / round | s / round | first round s | start-up s | peak memory of the process "
                  "tree (MB, PSS) | federation generated in s | sites rendered | federation on disk (MB) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        rows = [(count, row) for count, row in c["by_sites"].items()]
        if "by_sites_sampled" in c:
            rows += [(c["largest"], row) for sampled, row in c["by_sites_sampled"].items()
                     if int(sampled) != c["sites_per_round"]]
        for count, row in rows:
            lines.append(f"| {count} | {row['sites_per_round']} | {row['seconds_per_round']:.2f} | "
                         f"{row['first_round_seconds']:.2f} | {row['startup_seconds']:.1f} | "
                         f"{row['peak_tree_bytes'] / 2**20:.0f} | {row['federation_generation_seconds']:.1f} | "
                         f"{row['sites_rendered']} | {row['federation_disk_bytes'] / 2**20:.0f} |")
        if "inprocess_by_sites" in c:
            lines += ["", "In-process engine (the same apps, no Flower engine), cold too:", "",
                      "| sites | s / round | first round s | whole run s | peak memory (MB, PSS) |",
                      "|---:|---:|---:|---:|---:|"]
            lines += [f"| {count} | {row['seconds_per_round']:.2f} | {row['first_round_seconds']:.2f} | "
                      f"{row['seconds']:.1f} | {row['peak_tree_bytes'] / 2**20:.0f} |"
                      for count, row in c["inprocess_by_sites"].items()]
        engine_cpu = [f"{count}: {row['engine_cpu_seconds']:.1f} s" for count, row in c["by_sites"].items()
                      if "engine_cpu_seconds" in row]
        if engine_cpu:
            lines += ["", "CPU of the flwr-simulation process (ServerApp, Ray driver; Flower polls every simulated "
                          "node's inbox every 0.1 s): " + ", ".join(engine_cpu) + "."]
        lines += ["", f"{c['largest']} / {c['smallest']} sites: memory {c['memory_largest_vs_smallest']:.2f}×, "
                      f"seconds per round {c['round_time_largest_vs_smallest']:.2f}×, first (cold) round "
                      f"{c['first_round_largest_vs_smallest']:.2f}×"
                      + (f"; {c['largest']} sites with {list(c['by_sites_sampled'])[-1]} sampled per round / "
                         f"{c['sites_per_round']}: seconds per round {c['round_time_more_sampled_vs_sampled']:.2f}×"
                         if "by_sites_sampled" in c else "")
                      + (f"; in-process engine, first round {c['inprocess_first_round_largest_vs_smallest']:.2f}×"
                         if "inprocess_first_round_largest_vs_smallest" in c else "") + ".", ""]
        checks.append((f"memory {c['largest']} / {c['smallest']} sites", c["memory_largest_vs_smallest"],
                       TARGETS["memory_largest_vs_smallest"]))
    if "comm" in results:
        lines += ["## Communication per site and round (default model)", "",
                  "| algorithm | model fp32 bytes | reply bytes | × model | × arrays sent |", "|---|---:|---:|---:|---:|"]
        for algorithm, row in results["comm"].items():
            lines.append(f"| {algorithm} | {row['model_fp32_bytes']} | {row['reply_bytes']} | "
                         f"{row['reply_vs_model']:.3f} | {row['reply_vs_payload']:.3f} |")
        lines.append("")
        checks.append(("fomaml reply / fp32 model", results["comm"]["fomaml"]["reply_vs_model"], TARGETS["bytes_vs_fp32"]))
    if "meta" in results:
        lines.append(meta_step.format_table(results["meta"]["setting"], results["meta"]["table"]))
        lines.append("")
        t = results["meta"]["table"]["targets"]
        checks.append(("MAML / FOMAML time", t["maml_time_vs_fomaml"], TARGETS["maml_vs_fomaml"]))
        checks.append(("FOMAML / plain forward-backward", t["fomaml_time_vs_plain"], TARGETS["fomaml_vs_plain"]))
    if "episodes" in results:
        e = results["episodes"]
        lines += [meta_step.format_episodes(f"A site's episodes: loop or batched (torch.func.vmap), {e['setting']}, "
                                            f"{e.get('device', 'cpu')}", e["rows"]), ""]
        if "runs" in e:
            r = e["runs"]
            lines += [f"Whole bare-loop runs, FOMAML, {r['sites']} sites, {r['rounds']} rounds (fastest of the repeats):",
                      "", "| episodes per site | loop s | vmap s | vmap / loop |", "|---:|---:|---:|---:|"]
            lines += [f"| {count} | {row['loop_seconds']:.1f} | {row['vmap_seconds']:.1f} | {row['vmap_vs_loop']:.2f} |"
                      for count, row in r["by_episodes"].items()]
            lines.append("")
    if "secagg" in results:
        g = results["secagg"]
        lines += [f"## Secure aggregation (SecAgg+) against plain aggregation: {g['sites']} sites, {g['rounds']} rounds, "
                  "default model", "", "| aggregation | bytes down / site / round | bytes up / site / round | "
                  "s / round |", "|---|---:|---:|---:|"]
        for label, row in (("plain", g["plain"]), ("secagg+", g["secagg"])):
            lines.append(f"| {label} | {row['bytes_down_per_site_round']:.0f} | {row['bytes_up_per_site_round']:.0f} | "
                         f"{row['seconds_per_round']:.2f} |")
        lines += ["", f"SecAgg+ / plain: bytes {g['bytes_vs_plain']:.3f}×, seconds per round "
                      f"{g['seconds_vs_plain']:.2f}×.", ""]
    lines += ["## Targets", "", "| figure | measured | target | met |", "|---|---:|---:|---|"]
    for name, value, target in checks:
        lines.append(f"| {name} | {value:.2f} | ≤ {target} | {'yes' if value <= target else 'no'} |")
    return "\n".join(lines)


def _startup_lines(s: dict[str, Any]) -> list[str]:
    startup = s.get("ray_startup")
    if not startup:
        return []
    lines = ["### Where the Simulation Engine's start-up goes", "",
             "| phase (each ends when the next process appears) | s |", "|---|---:|"]
    lines += [f"| {phase['phase']} | {phase['seconds']:.1f} |" for phase in startup["phases"]]
    if startup["shutdown_seconds"] is not None:
        lines.append(f"| after the last round: ServerApp's end, Ray shutdown, `flwr list`, processes stopped | "
                     f"{startup['shutdown_seconds']:.1f} |")
    lines += ["", "| process role | processes | CPU s |", "|---|---:|---:|"]
    lines += [f"| {role} | {startup['processes_by_role'][role]} | {cpu:.1f} |"
              for role, cpu in startup["cpu_seconds_by_role"].items()]
    lines.append("")
    for label, profile in s.get("imports", {}).items():
        parts = ", ".join(f"{name} {seconds:.2f}" for name, seconds in profile["by_package"].items())
        lines.append(f"Importing the {label} (`{profile['module']}`) in a fresh interpreter: "
                     f"{profile['process_seconds']:.1f} s in all, imports {profile['import_seconds']:.2f} s: {parts}.")
    lines.append("")
    return lines


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _machine() -> str:
    import platform

    import torch

    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, load {os.getloadavg()[0]:.1f}"


def _outputs(out: Path):
    """perf's guard on its two files: it replaces its own earlier figures, never a file it did not write."""
    from fedmeta.common.outputs import Outputs

    return Outputs(out.parent, "perf", option=""), [out.name, out.with_suffix(".md").name]


def _earlier_perf(out: Path) -> list[str]:
    """perf's own files from before the journal: a perf.json holding its machine readings, and its report."""
    import json

    try:
        earlier = json.loads(out.read_text())
    except (OSError, ValueError):
        return []
    return [out.name, out.with_suffix(".md").name] if isinstance(earlier, dict) and "machine_after" in earlier else []


def run(args: argparse.Namespace) -> int:
    from fedmeta.common.outputs import OutputRefused

    outputs, names = _outputs(Path(args.out))
    try:  # before minutes of measuring, not after
        outputs.check(names, overwrite=True, recognised=_earlier_perf(Path(args.out)))
    except OutputRefused as err:
        print(f"fedmeta perf: error: {err}", file=sys.stderr)
        return 1
    parts = args.parts or list(PARTS)
    work = Path(args.work or tempfile.mkdtemp(prefix="fedmeta-perf-")).resolve()
    results: dict[str, Any] = {"machine": _machine(), "quick": args.quick, "work": str(work)}
    try:
        if "sim" in parts:
            results["sim"] = bench_sim(work, rounds=3 if args.quick else 10)
        if "scaling" in parts:
            results["scaling"] = (bench_scaling(work, counts=(10, 1000), more_sampled=None) if args.quick
                                  else bench_scaling(work))
        if "comm" in parts:
            results["comm"] = bench_comm(work)
        if "meta" in parts:
            results["meta"] = meta_step_summary(quick=args.quick)
        if "episodes" in parts:
            setting = meta_step.SETTINGS["2d"]
            device = args.device if args.device != "auto" else ("cuda" if _cuda() else "cpu")
            results["episodes"] = {"setting": setting.name, "device": device, "rows": meta_step.measure_episodes(
                setting, device=device, repeats=2 if args.quick else 5,
                cases=meta_step.EPISODE_CASES[:2] if args.quick else meta_step.EPISODE_CASES),
                "runs": bench_episode_runs(work, rounds=3 if args.quick else 5, repeats=1 if args.quick else 2)}
        if "secagg" in parts:
            results["secagg"] = bench_secagg(work, rounds=2 if args.quick else 3)
    except Exception as err:
        print(f"fedmeta perf: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    results["machine_after"] = _machine()
    report = format_report(results)
    print(report)
    from fedmeta.common.outputs import make_folder

    out = Path(args.out)
    make_folder(out.parent)
    outputs.claim(names, overwrite=True, recognised=_earlier_perf(out))
    outputs.write_json(out.name, results)
    outputs.write_text(out.with_suffix(".md").name, report + "\n")
    print(f"\nwrote {out} and {out.with_suffix('.md')}")
    return 0


def register(subparsers) -> None:
    # `perf`, not `bench`: `fedmeta benchmark` is the research benchmark; `bench` stays as an alias.
    bench = subparsers.add_parser(
        "perf", aliases=["bench"],
        help="performance figures (simulation overhead, scaling, communication, meta-step cost); alias: bench",
        description=__doc__.split("\n\n")[0],
    )
    bench.add_argument("parts", nargs="*", metavar="PART",
                       help=f"which to run: {', '.join(PARTS)} (default: all). `perf meta` alone runs the full "
                            "meta-step micro-benchmark (2D and 3D, options below)")
    bench.add_argument("--quick", action="store_true", help="smaller runs, a few minutes in all")
    bench.add_argument("--out", default=None, help="JSON results, a .md table beside it (default: runs/perf/perf.json)")
    bench.add_argument("--work", default=None, help="scratch folder for federations and runs (default: a temp dir)")
    meta = bench.add_argument_group("perf meta")
    meta.add_argument("--settings", nargs="+", choices=sorted(meta_step.SETTINGS), default=["2d", "3d"])
    meta.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    meta.add_argument("--repeats", type=int, default=5, help="timed runs per case (median reported)")
    bench.set_defaults(handler=_dispatch)


def _dispatch(args: argparse.Namespace) -> int:
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        print(f"fedmeta perf: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}.", file=sys.stderr)
        return 2
    if args.parts == ["meta"]:
        return meta_step.run(args)
    args.out = args.out or "runs/perf/perf.json"
    return run(args)


if __name__ == "__main__":
    from fedmeta.simulations.cli import main

    sys.exit(main(["perf", *sys.argv[1:]]))
