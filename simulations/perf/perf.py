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
- ``inference``: a whole 512 x 512 x N CT (``--slices``, default 400) segmented in its own grid by the previous
  implementation and the current one, each in a fresh process (``--threads``, default 2): wall time, the
  model's share, peak resident memory, their ratios, whether the masks agree, and issue 30's target (60 s, 4 GB)
  (fedmeta.simulations.perf.inference).

``fedmeta perf`` alone runs them all; ``--quick`` shrinks each for a look in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from fedmeta.common.outputs import OutputRefused, Outputs, make_folder
from fedmeta.common.progress import Heartbeat
from fedmeta.common.protocol import FOMAML, METASGD
from fedmeta.simulations.engines.processes import ROLE_SIMULATION, TreeMemorySampler
from fedmeta.simulations.perf import inference, meta_step
from fedmeta.simulations.perf.engine_runs import (
    _config, _disk_bytes, _federation, _round_seconds, import_profile, run_bare, run_inprocess_engine, run_ray_engine,
)
from fedmeta.simulations.perf.engine_runs import _RoundClock, _startup  # noqa: F401 - imported from here by tests
from fedmeta.simulations.perf.report import TARGETS, format_report

# torch, Flower and the fedmeta modules that load them (config, synth, model, meta, the apps, the in-process
# engine) are imported inside the functions that use them: `fedmeta perf --help` does not wait seconds for them.

PARTS = ("sim", "scaling", "comm", "meta", "episodes", "secagg", "inference")


# --------------------------------------------------------------------------------------------------
# The parts


def _silent(part: str) -> Heartbeat:
    """The progress of a part called without one (a test, a notebook): nothing printed."""
    return Heartbeat(f"perf {part}", quiet=True)


def bench_sim(work: Path, *, sites: int = 10, rounds: int = 10, beat: Heartbeat | None = None) -> dict[str, Any]:
    """Ray vs in-process vs bare loop on the same meta-training; ``beat`` says each run as it ends."""
    from fedmeta.common.config import RunConfig

    beat = beat or _silent("sim")

    federation = _federation(sites, work / "federations")
    # The meta-training a user runs: the default model and episodes (ENGINE_CONFIG's tiny model
    # would make the comparison one of start-up times alone).
    defaults = RunConfig()
    base = dict(num_rounds=rounds, image_size=defaults.image_size, model_base_channels=defaults.model_base_channels,
                model_levels=defaults.model_levels, episodes_per_site=defaults.episodes_per_site,
                k_shot=defaults.k_shot, q_query=defaults.q_query, inner_steps=defaults.inner_steps,
                inner_lr=defaults.inner_lr, meta_lr=defaults.meta_lr)
    beat.update(f"the bare loop, {rounds} rounds")
    bare = run_bare(_config(federation, work / "sim-bare", **base))
    beat.say(f"perf sim: bare loop, {rounds} rounds in {bare['seconds']:.0f} s (1/3)")
    beat.update(f"the in-process engine, {rounds} rounds")
    inproc = run_inprocess_engine(_config(federation, work / "sim-inprocess", **base), sites)
    beat.say(f"perf sim: in-process engine in {inproc['seconds']:.0f} s (2/3)")
    beat.update(f"Flower's Simulation Engine (Ray), {rounds} rounds")
    ray = run_ray_engine(_config(federation, work / "sim-ray", **base), sites, work / "flwr-sim")
    beat.say(f"perf sim: Simulation Engine (Ray) in {ray['seconds']:.0f} s (3/3)")
    beat.update("import profiles of the ClientApp and the ServerApp in fresh interpreters")
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
                  more_sampled: int | None = 50, beat: Heartbeat | None = None) -> dict[str, Any]:
    """Time per round and peak process-tree memory at several federation sizes, ``sampled`` sites per round.

    The federations are lazy (a site is rendered the first time it is sampled), so a round's time
    holds the first use of the sites it samples — reading (and rendering) their data — as a real
    simulation's does: the first round is that cold round at every size, later rounds at a small
    federation find their sites loaded. ``more_sampled``: one more run at the largest size with that
    many sites per round, to show what round time follows.
    """
    from fedmeta.common.synth import load_manifest

    beat = beat or _silent("scaling")
    runs = len(counts) + bool(more_sampled) + 2  # the Ray runs, then two in-process runs
    done = 0

    def said(line: str) -> None:
        nonlocal done
        done += 1
        beat.say(f"perf scaling: {line} ({done}/{runs})")

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
        beat.update(f"{count} sites, {min(per_round, count)} per round, on the Simulation Engine")
        federation, generation = cold(count)
        config = _config(federation, work / name, num_rounds=rounds, sites_per_round=min(per_round, count))
        ray = run_ray_engine(config, count, work / f"flwr-{name}")
        said(f"{count} sites, {min(per_round, count)} per round, Simulation Engine in {ray['seconds']:.0f} s")
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
        beat.update(f"{count} sites on the in-process engine")
        with TreeMemorySampler(None) as sampler:
            run = run_inprocess_engine(config, count)
        said(f"{count} sites, in-process engine in {run['seconds']:.0f} s")
        inprocess[str(count)] = {"seconds": run["seconds"], "first_round_seconds": run["round_seconds"][0],
                                 "seconds_per_round": sum(run["round_seconds"]) / len(run["round_seconds"]),
                                 "peak_tree_bytes": sampler.peak_bytes}
    result["inprocess_by_sites"] = inprocess
    result["inprocess_first_round_largest_vs_smallest"] = (inprocess[str(counts[-1])]["first_round_seconds"]
                                                           / inprocess[str(counts[0])]["first_round_seconds"])
    return result


def bench_comm(work: Path, *, algorithms=(FOMAML, METASGD), beat: Heartbeat | None = None) -> dict[str, Any]:
    """Wire bytes of each train reply against the fp32 size of the arrays it carries.

    Measured on the default model size (the ratio depends on it: names and metrics are a fixed
    cost), with the reply serialised exactly as Flower sends it (``message_to_proto``).
    """
    from flwr.app import MessageType
    from flwr.common.serde import message_to_proto

    from fedmeta.client.app import app as client_app
    from fedmeta.common.algorithms import ALGORITHMS
    from fedmeta.common.config import RunConfig
    from fedmeta.common.model import build_model
    from fedmeta.simulations.engines.inprocess import run_inprocess, simulation_node_configs

    beat = beat or _silent("comm")
    federation = _federation(10, work / "federations")
    rows = {}
    for algorithm in algorithms:
        beat.update(f"one round of {algorithm}, replies measured")
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
        arrays = 2 if ALGORITHMS[algorithm].learns_step_sizes else 1  # Meta-SGD also sends ∂L/∂α, one per parameter
        model_bytes = 4 * numel
        reply_bytes = max(sizes)
        rows[algorithm] = {
            "model_fp32_bytes": model_bytes,
            "reply_bytes": reply_bytes,
            "reply_vs_model": reply_bytes / model_bytes,
            "reply_vs_payload": reply_bytes / (arrays * model_bytes),
        }
        beat.say(f"perf comm: {algorithm} measured ({len(rows)}/{len(algorithms)})")
    return rows


def bench_secagg(work: Path, *, sites: int = 10, rounds: int = 3, beat: Heartbeat | None = None) -> dict[str, Any]:
    """Plain aggregation against SecAgg+ on the same federation, rounds and seed: bytes and seconds per round."""
    from flwr.common.serde import message_to_proto

    from fedmeta.client.app import app as client_app
    from fedmeta.common.config import RunConfig
    from fedmeta.simulations.engines.inprocess import run_inprocess, simulation_node_configs

    beat = beat or _silent("secagg")
    federation = _federation(sites, work / "federations")
    defaults = RunConfig()
    rows = {}
    for mode in ("none", "secagg+"):
        beat.update(f"{rounds} rounds with secure aggregation {mode}")
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
        beat.say(f"perf secagg: {rounds} rounds with secure aggregation {mode} ({len(rows)}/2)")
    plain, secure = rows["none"], rows["secagg+"]
    return {"sites": sites, "rounds": rounds, "plain": plain, "secagg": secure,
            "bytes_vs_plain": (secure["bytes_down_per_site_round"] + secure["bytes_up_per_site_round"])
            / (plain["bytes_down_per_site_round"] + plain["bytes_up_per_site_round"]),
            "seconds_vs_plain": secure["seconds_per_round"] / plain["seconds_per_round"]}


def bench_episode_runs(work: Path, *, counts=(2, 4), rounds: int = 5, repeats: int = 2,
                       beat: Heartbeat | None = None) -> dict[str, Any]:
    """Whole bare-loop runs (10 sites, default model, FOMAML) with each site's episodes in a loop and
    batched, alternated: what sets ``fedmeta.common.meta.BATCH_FROM`` (the micro-benchmark alone favours
    batching more than a whole run does)."""
    from fedmeta.common import meta
    from fedmeta.common.config import RunConfig

    beat = beat or _silent("episodes")
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
                    beat.update(f"a whole bare-loop run, {count} episodes per site, {name}")
                    seconds[name].append(run_bare(config)["seconds"])
                    beat.say(f"perf episodes: bare-loop run, {count} episodes per site, {name}: "
                             f"{seconds[name][-1]:.0f} s")
            loop_s, vmap_s = min(seconds["loop"]), min(seconds["vmap"])
            rows[str(count)] = {"loop_seconds": loop_s, "vmap_seconds": vmap_s, "vmap_vs_loop": vmap_s / loop_s}
    finally:
        meta.BATCH_FROM = saved
    return {"sites": 10, "rounds": rounds, "by_episodes": rows}


def meta_step_summary(*, quick: bool, beat: Heartbeat | None = None) -> dict[str, Any]:
    setting = meta_step.SETTINGS["2d"]
    table = meta_step.summarise(meta_step.measure(setting, repeats=2 if quick else 5, beat=beat))
    return {"setting": setting.name, "table": table}


_PART_MEANING = {
    "sim": "the same meta-training on the bare loop, the in-process engine and the Simulation Engine",
    "scaling": "rounds at several federation sizes on the Simulation Engine, then in process",
    "comm": "wire bytes of a train reply",
    "meta": "one episode of every algorithm, timed and its peak memory measured",
    "episodes": "episodes in a loop against batched, then whole bare-loop runs",
    "secagg": "plain aggregation against SecAgg+",
    "inference": "a whole CT segmented by the previous and the current implementation, each in a fresh process",
}


def _run_part(part: str, work: Path, args: argparse.Namespace, beat: Heartbeat) -> dict[str, Any]:
    if part == "sim":
        return bench_sim(work, rounds=3 if args.quick else 10, beat=beat)
    if part == "scaling":
        return (bench_scaling(work, counts=(10, 1000), more_sampled=None, beat=beat) if args.quick
                else bench_scaling(work, beat=beat))
    if part == "comm":
        return bench_comm(work, beat=beat)
    if part == "meta":
        return meta_step_summary(quick=args.quick, beat=beat)
    if part == "episodes":
        setting = meta_step.SETTINGS["2d"]
        from fedmeta.common.devices import pick_device  # loads torch: not for perf --help

        device = str(pick_device(args.device))
        return {"setting": setting.name, "device": device, "rows": meta_step.measure_episodes(
            setting, device=device, repeats=2 if args.quick else 5,
            cases=meta_step.EPISODE_CASES[:2] if args.quick else meta_step.EPISODE_CASES, beat=beat),
            "runs": bench_episode_runs(work, rounds=3 if args.quick else 5, repeats=1 if args.quick else 2, beat=beat)}
    if part == "secagg":
        return bench_secagg(work, rounds=2 if args.quick else 3, beat=beat)
    if part == "inference":
        slices = args.slices if args.slices is not None else (100 if args.quick else inference.TARGET_SLICES)
        return inference.bench_inference(work, case=inference.InferenceCase(slices=slices), threads=args.threads,
                                         beat=beat)
    raise ValueError(f"perf part {part!r}: choose from {', '.join(PARTS)}.")


def _machine() -> str:
    import torch

    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, load {os.getloadavg()[0]:.1f}"


def _outputs(out: Path):
    """perf's guard on its two files: it replaces its own earlier figures, never a file it did not write."""
    return Outputs(out.parent, "perf", option=""), [out.name, out.with_suffix(".md").name]


def _earlier_perf(out: Path) -> list[str]:
    """perf's own files from before the journal: a perf.json holding its machine readings, and its report."""
    try:
        earlier = json.loads(out.read_text())
    except (OSError, ValueError):
        return []
    return [out.name, out.with_suffix(".md").name] if isinstance(earlier, dict) and "machine_after" in earlier else []


def run(args: argparse.Namespace) -> int:
    outputs, names = _outputs(Path(args.out))
    try:  # before minutes of measuring, not after
        outputs.check(names, overwrite=True, recognised=_earlier_perf(Path(args.out)))
    except OutputRefused as err:
        print(f"fedmeta perf: error: {err}", file=sys.stderr)
        return 1
    parts = args.parts or list(PARTS)
    work = Path(args.work or tempfile.mkdtemp(prefix="fedmeta-perf-")).resolve()
    results: dict[str, Any] = {"machine": _machine(), "quick": args.quick, "work": str(work)}
    chosen = [part for part in PARTS if part in parts]
    try:
        for number, part in enumerate(chosen, 1):
            print(f"perf {part} ({number}/{len(chosen)}): {_PART_MEANING[part]}", flush=True)
            with Heartbeat(f"perf {part}", what="imports and the federation") as beat:
                results[part] = _run_part(part, work, args, beat)
            beat.say(f"perf {part}: done in {beat.elapsed:.0f} s")
    except Exception as err:
        print(f"fedmeta perf: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    results["machine_after"] = _machine()
    report = format_report(results)
    print(report)
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
        help="performance figures (simulation overhead, scaling, communication, meta-step cost, whole-CT inference); "
             "alias: bench",
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
    meta.add_argument("--cases", type=meta_step.parse_cases, default=None, metavar="CASE,...",
                      help="only these cases, comma-separated (fomaml among them: every ratio is to it), e.g. "
                           "fomaml,maml,prototypes (default: every algorithm and plain-fwd-bwd)")
    ct = bench.add_argument_group("perf inference")
    ct.add_argument("--slices", type=_positive, default=None,
                    help=f"axial slices of the 512 x 512 CT (default: {inference.TARGET_SLICES}; 100 with --quick)")
    ct.add_argument("--threads", type=_positive, nargs="+", default=[inference.TARGET_THREADS], metavar="N",
                    help=f"torch threads, one run of each implementation per count (default: "
                         f"{inference.TARGET_THREADS}), e.g. --threads 1 2")
    bench.set_defaults(handler=_dispatch)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number; give e.g. 400 (--slices) or 2 "
                                         "(--threads).")
    return value


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
