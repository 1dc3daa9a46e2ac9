"""`fedmeta benchmark`: does the federated meta-initialisation give a new hospital a better model, faster?

Every method trains on the synthetic federation's training sites under one budget of local gradient
steps, then every held-out site ("the new hospital") adapts each initialisation with k labelled
slices for s steps and is scored by Dice on its other patients, over several seeds:

- scratch: the random initialisation the federation starts from (seeded), adapted locally only;
- fedavg: the FedAvg global model as is, never adapted (its Dice is the same at every step count);
- fedavg-ft: the same FedAvg model, fine-tuned with the grid's steps;
- fedprox-ft: FedProx, fine-tuned;
- fomaml, maml, reptile, metasgd, anil: the meta-learned initialisations, adapted as they were
  trained (Meta-SGD with its learned step sizes, ANIL its head only);
- fast-weights, prototypes, lstm-optimizer: the other meta-learning families (a generator of head
  weights from the support set, prototype matching, a learned LSTM optimiser;
  ``fedmeta.common.learners``), adapted by their own rule (prototypes: 0 steps is pure prototype
  matching, further steps fine-tune the encoder);
- pooled-fomaml, pooled-maml, pooled-metasgd: the same learners on the pooled patients of all
  training sites, without federation (the centralised bound of each family;
  ``fedmeta.simulations.experiments.centralised``);
- oracle: per new site, a UNet fully supervised on that site's own support patients
  (``fedmeta.simulations.experiments.oracle``): the ceiling each row is a fraction of.

Federated methods run fedmeta's real ServerApp and ClientApp through the in-process engine
(``fedmeta.simulations.engines.inprocess``), the same code Flower's engines run. Adaptation and scoring are
``fedmeta.common.adaptation.score_site`` (per-patient Dice over whole volumes in the site's own labels,
``fedmeta.common.metrics``), the code ``fedmeta evaluate`` and the ClientApp use.

Local gradient steps, the budget: one forward-backward pass on one batch. Per site and round a
meta-learner (FOMAML, MAML, Meta-SGD, ANIL, the fast-weight generator, the LSTM optimiser) takes
``episodes × (inner-steps + 1)`` (the support steps and the query gradient; the generator is not the
UNet and is not counted), prototypes ``episodes × (inner-steps + 2)`` (the UNet's pass over the support
set that pools the prototypes too), Reptile ``episodes × inner-steps``, FedAvg/FedProx ``episodes × 2 ×
inner-steps`` (each local epoch passes every episode's support and query batch). The driver refuses
a preset whose methods' totals differ.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmeta.common.jsonio import write_json
from fedmeta.common.protocol import (
    DATA_DIR_KEY, QUERY_LOSS_AFTER, ROLE_HELDOUT, ROLE_KEY, SITE_ID_KEY, dice_mean_key,
)
from fedmeta.simulations.experiments.budget import budget, check_equal_budget
from fedmeta.simulations.experiments.stats import CONFIDENCE, interval
from fedmeta.simulations.experiments.presets import parse_sets, read_preset_toml


DEFAULT_PRESET = "benchmark"
QUICK_PRESET = "benchmark-quick"


ORACLE = "oracle"  # the training key of the oracle row: trained per new site, not on the federation


@dataclass(frozen=True)
class Method:
    """One row of the benchmark: which training produced θ and whether the new site adapts it."""

    name: str
    training: str | None  # key of the preset's [training.<key>] table; None: never trained
    adapts: bool
    meaning: str


METHODS = (
    Method("scratch", None, True, "random init (the federation's seeded start), fine-tuned on the new site only"),
    Method("fedavg", "fedavg", False, "FedAvg global model used as is: no adaptation at any step count"),
    Method("fedavg-ft", "fedavg", True, "the same FedAvg model, fine-tuned on the new site"),
    Method("fedprox-ft", "fedprox", True, "FedProx global model, fine-tuned on the new site"),
    Method("fomaml", "fomaml", True, "federated first-order MAML initialisation, fine-tuned"),
    Method("maml", "maml", True, "federated second-order MAML initialisation, fine-tuned"),
    Method("reptile", "reptile", True, "federated Reptile initialisation, fine-tuned"),
    Method("metasgd", "metasgd", True, "federated Meta-SGD initialisation, fine-tuned with its learned step sizes"),
    Method("anil", "anil", True, "federated ANIL initialisation, head fine-tuned"),
    Method("fast-weights", "fast-weights", True,
           "federated fast-weight learner: head generated from the support set, then fine-tuned"),
    Method("prototypes", "prototypes", True,
           "federated prototype learner: support prototypes (0 steps), then encoder fine-tuned"),
    Method("lstm-optimizer", "lstm-optimizer", True,
           "federated UNet initialisation adapted by its federated learned LSTM optimiser"),
    Method("pooled-fomaml", "pooled-fomaml", True,
           "FOMAML on all training sites' pooled patients, no federation (centralised bound), fine-tuned"),
    Method("pooled-maml", "pooled-maml", True,
           "MAML on all training sites' pooled patients, no federation (centralised bound), fine-tuned"),
    Method("pooled-metasgd", "pooled-metasgd", True,
           "Meta-SGD on all training sites' pooled patients, no federation (centralised bound), fine-tuned"),
    Method("oracle", ORACLE, False,
           "per new site, a UNet fully supervised on the site's own support patients: the ceiling"),
)
METHODS_BY_NAME = {m.name: m for m in METHODS}
META_METHODS = ("fomaml", "maml", "reptile", "metasgd", "anil", "fast-weights", "prototypes", "lstm-optimizer")
# The goal the benchmark checks (issue 5): at k = 5 and 10 steps.
GOAL_SHOTS, GOAL_STEPS, GOAL_MARGIN = 5, 10, 0.03
PRESET_KEYS = {"federation", "federation-seed", "seeds", "shots", "steps", "eval-max-images", "validation-sites",
               "methods", "run-config", "training", "oracle-steps", "curve-every", "jobs"}



def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "benchmark",
        help="the new-hospital benchmark: every method, equal budget, k-shot adaptation on held-out sites",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--preset", default=None,
                        help=f"benchmark preset name or TOML path (default: {DEFAULT_PRESET}; --quick: {QUICK_PRESET})")
    parser.add_argument("--quick", action="store_true", help=f"the few-minute variant (preset {QUICK_PRESET})")
    parser.add_argument("--seeds", type=int, help="number of seeds (overrides the preset)")
    parser.add_argument("--methods", help="comma-separated subset of: " + ", ".join(METHODS_BY_NAME))
    parser.add_argument("--out", type=Path, help="output folder (default: runs/benchmark-<preset>)")
    parser.add_argument("--federation-dir", type=Path,
                        help="a generated federation (folder with manifest.json), or where the preset's federation "
                             "is generated/cached (default: ~/.cache/fedmeta)")
    parser.add_argument("--validation-sites", type=int,
                        help="tune without touching held-out sites: the last N training sites play the new "
                             "hospitals and the others train (overrides the preset)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="run-config override for every method, e.g. --set inner-lr=0.1, or for one "
                             "[training.*] table, e.g. --set training.fomaml.inner-steps=1 (repeatable)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="processes that train (method, seed) runs and evaluate seeds in parallel, each with "
                             "--threads torch threads (default: the preset's, else 1); results do not depend on it")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared 2-core machine more threads oversubscribe "
                             "the cores and ran up to 10x slower; 0 keeps torch's own choice)")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    if args.quick and args.preset:
        print("fedmeta benchmark: error: give --quick or --preset, not both.", file=sys.stderr)
        return 2
    preset = args.preset or (QUICK_PRESET if args.quick else DEFAULT_PRESET)
    if args.threads < 0:
        print(f"fedmeta benchmark: error: --threads {args.threads}: use 1 or more, or 0 for torch's default.",
              file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        results = run_benchmark(
            preset, seeds=args.seeds, out=args.out, federation_root=args.federation_dir,
            methods=args.methods.split(",") if args.methods else None,
            validation_sites=args.validation_sites, extra=parse_sets(args.set, "benchmark"), jobs=args.jobs,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"fedmeta benchmark: error: {err}", file=sys.stderr)
        return 1
    print(f"results: {results['files']['results']}\ntable: {results['files']['table']}\nplot: {results['files']['plot']}")
    return 0


# --------------------------------------------------------------------------------------------------
# the preset


def load_benchmark_preset(preset: str) -> dict[str, Any]:
    """A benchmark preset (name in simulations/presets or a TOML path), checked key by key."""
    path, values = read_preset_toml(preset, kind="benchmark preset", known_glob="benchmark*.toml")
    unknown = sorted(set(values) - PRESET_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(PRESET_KEYS))}.")
    spec = {
        "path": str(path),
        "name": path.stem,
        "federation": values.get("federation", "default"),
        "federation-seed": int(values.get("federation-seed", 0)),
        "seeds": int(values.get("seeds", 3)),
        "shots": [int(k) for k in values.get("shots", [1, 5, 10])],
        "steps": sorted({int(s) for s in values.get("steps", [0, 1, 5, 10, 20])}),
        "eval-max-images": int(values.get("eval-max-images", 128)),
        "validation-sites": int(values.get("validation-sites", 0)),
        "oracle-steps": int(values.get("oracle-steps", 300)),
        "curve-every": int(values.get("curve-every", 0)),
        "jobs": int(values.get("jobs", 1)),
        "methods": list(values.get("methods", [m.name for m in METHODS])),
        "run-config": dict(values.get("run-config", {})),
        "training": {k: dict(v) for k, v in values.get("training", {}).items()},
    }
    _check_spec(spec, path)
    return spec


def _check_spec(spec: dict[str, Any], where: Any) -> None:
    if spec["seeds"] < 1:
        raise ValueError(f"{where}: seeds={spec['seeds']} must be >= 1.")
    if not spec["shots"] or min(spec["shots"]) < 1:
        raise ValueError(f"{where}: shots={spec['shots']} must be a non-empty list of k >= 1.")
    if not spec["steps"] or min(spec["steps"]) < 0:
        raise ValueError(f"{where}: steps={spec['steps']} must be a non-empty list of step counts >= 0.")
    if spec["eval-max-images"] < 0:
        raise ValueError(f"{where}: eval-max-images={spec['eval-max-images']} must be >= 0 (0 = every evaluation patient).")
    if spec["validation-sites"] < 0:
        raise ValueError(f"{where}: validation-sites={spec['validation-sites']} must be >= 0.")
    if spec["curve-every"] < 0:
        raise ValueError(f"{where}: curve-every={spec['curve-every']} must be >= 0 (0: no learning curves).")
    if spec["jobs"] < 1:
        raise ValueError(f"{where}: jobs={spec['jobs']} must be >= 1 (processes training and evaluating in parallel).")
    if spec["oracle-steps"] < 1:
        raise ValueError(f"{where}: oracle-steps={spec['oracle-steps']} must be >= 1.")
    unknown = [m for m in spec["methods"] if m not in METHODS_BY_NAME]
    if unknown or not spec["methods"]:
        raise ValueError(f"{where}: methods {unknown or '[]'}: choose among {', '.join(METHODS_BY_NAME)}.")
    for method in spec["methods"]:
        key = METHODS_BY_NAME[method].training
        if key not in (None, ORACLE) and key not in spec["training"]:
            raise ValueError(f"{where}: method {method} needs a [training.{key}] table (its inner-steps and the like).")


def method_configs(spec: dict[str, Any], methods: list[str]):
    """RunConfig per training key the methods need, with the shared run config under each table."""
    from fedmeta.common.config import RunConfig
    from fedmeta.common.model import unet_of

    configs = {}
    for method in methods:
        key = METHODS_BY_NAME[method].training
        if key in (None, ORACLE) or key in configs:
            continue
        algorithm = key.removeprefix("pooled-")
        overrides = {**spec["run-config"], **spec["training"][key], "algorithm": algorithm, "eval-every": 0}
        try:
            configs[key] = RunConfig.from_run_config(overrides)
        except ValueError as err:
            raise ValueError(f"{spec['path']} [training.{key}]: {err}") from None
    # The UNet each method starts from must be the same; the other families add their own parts to it.
    shapes = {key: (unet_of(c.model_config()), c.image_size, c.num_classes) for key, c in configs.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(
            f"{spec['path']}: [training.*] tables give different models or image sizes ({', '.join(sorted(shapes))}); "
            "the initialisations must be comparable, so set model-*, image-size and num-classes under [run-config] only."
        )
    return configs


# --------------------------------------------------------------------------------------------------
# the run


def run_benchmark(
    preset: str = DEFAULT_PRESET,
    *,
    seeds: int | None = None,
    out: Path | None = None,
    federation_root: Path | None = None,
    federation_dir: Path | None = None,
    methods: list[str] | None = None,
    validation_sites: int | None = None,
    extra: dict[str, Any] | None = None,
    quiet: bool = False,
    jobs: int | None = None,
) -> dict[str, Any]:
    """The whole benchmark; writes results.json, results.md and dice_vs_steps.png, returns the results.

    ``federation_dir`` uses an existing federation as is (tests); otherwise the preset's federation is
    generated or reused under ``federation_root``. ``jobs`` > 1 trains the (method, seed) runs, then
    evaluates the seeds, in that many processes: every run is seeded and scored alone, so the results
    are the ones a single process gives.
    """
    from fedmeta.common.config import RunConfig
    from fedmeta.common.synth import cached_federation, load_manifest

    began = time.perf_counter()
    load_at_start = _load_average()
    spec = _with_overrides(load_benchmark_preset(preset), seeds=seeds, methods=methods,
                           validation_sites=validation_sites, extra=extra, jobs=jobs)
    names = [m.name for m in METHODS if m.name in spec["methods"]]
    configs = method_configs(spec, names)

    if federation_dir is None and federation_root is not None and (Path(federation_root) / "manifest.json").is_file():
        federation_dir = federation_root
    if federation_dir is None:
        root = (federation_root or Path.home() / ".cache" / "fedmeta").resolve()
        federation_dir = cached_federation(root, spec["federation"], spec["federation-seed"])
    federation_dir = Path(federation_dir).resolve()
    manifest = load_manifest(federation_dir)
    train_infos, eval_infos, eval_role = _split_sites(manifest, spec["validation-sites"], federation_dir)
    budgets = {key: budget(cfg, len(train_infos)) for key, cfg in configs.items()}
    total_budget = check_equal_budget(budgets, spec["path"])

    out = Path(out or Path("runs") / f"benchmark-{spec['name']}").resolve()
    from fedmeta.common.outputs import Outputs

    # The folder is new or the benchmark's own: running again continues it (finished runs are reused, the
    # tables rewritten), and never writes into another command's folder or a site's data.
    earlier = (out / "results.json").is_file() or (out / "runs").is_dir()  # a benchmark from before the journal
    Outputs(out, "benchmark").claim_folder(resume=True, detail={"preset": spec["name"]}, recognised=earlier)
    _say(quiet, f"federation {federation_dir}: training on {', '.join(i.name for i in train_infos)}; "
                f"new hospitals ({eval_role}): {', '.join(i.name for i in eval_infos)}")
    _say(quiet, f"budget: {total_budget} local gradient steps per method; seeds {spec['seeds']}; "
                f"k {spec['shots']}; steps {spec['steps']}; {spec['eval-max-images'] or 'all'} evaluation slices per site")

    from fedmeta.common.data import SiteDataset

    # The shared settings (data, classes, the scratch and oracle networks): a method of the initialisation
    # family's, never a learner's own network.
    from fedmeta.common.protocol import LEARNER_ALGORITHMS

    any_config = next((c for c in configs.values() if c.algorithm not in LEARNER_ALGORITHMS), None) \
        or RunConfig.from_run_config({**spec["run-config"], "eval-every": 0, "algorithm": "fomaml"})
    seeds_list = list(range(spec["seeds"]))
    dice: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in names}
    runs: dict[str, dict[int, dict[str, Any]]] = {key: {} for key in configs}
    inits: dict[int, dict[str, Any]] = {seed: {} for seed in seeds_list}
    if spec["jobs"] == 1:  # one seed after the other: each seed's table is printed as soon as it exists
        eval_data = [SiteDataset.load(info.folder(), any_config.data_config()) for info in eval_infos]
        for seed in seeds_list:
            for key, base in configs.items():
                runs[key][seed], inits[seed][key] = _train(*_train_args(key, base, seed, out, federation_dir, train_infos,
                                                                        eval_infos, spec, quiet))
            dice_by_method = _evaluate_seed(names, inits[seed], any_config, spec, eval_data, seed, quiet)
            for name in names:
                dice[name][seed] = dice_by_method[name]
    else:
        from fedmeta.common.meta import SECOND_ORDER

        # The costliest runs first, so the processes finish together.
        costly = SECOND_ORDER + LEARNER_ALGORITHMS
        order = sorted(((seed, key) for seed in seeds_list for key in configs),
                       key=lambda job: (configs[job[1]].algorithm not in costly, job[0]))
        trained = _in_processes(spec["jobs"], _train, [
            _train_args(key, configs[key], seed, out, federation_dir, train_infos, eval_infos, spec, quiet)
            for seed, key in order])
        for (seed, key), (info, init) in zip(order, trained):
            runs[key][seed], inits[seed][key] = info, init
        scored = _in_processes(spec["jobs"], _evaluate_seed_from_files, [
            (names, inits[seed], any_config, spec, eval_infos, seed, quiet) for seed in seeds_list])
        for seed, dice_by_method in zip(seeds_list, scored):
            for name in names:
                dice[name][seed] = dice_by_method[name]

    results = _results(spec, names, configs, budgets, total_budget, federation_dir, train_infos, eval_infos,
                       eval_role, seeds_list, runs, dice, load_at_start)
    results["seconds_total"] = time.perf_counter() - began
    files = {"results": out / "results.json", "table": out / "results.md", "plot": out / "dice_vs_steps.png"}
    if any(run.get("curve") for by_seed in runs.values() for run in by_seed.values()):
        files["curves"] = out / "learning_curves.png"
    results["files"] = {k: str(v) for k, v in files.items()}
    plot_results(results, files["plot"])
    if "curves" in files:
        plot_learning_curves(results, files["curves"])
    files["table"].write_text(format_markdown(results))
    write_json(files["results"], results)
    _say(quiet, format_goal(results["goal"]))
    _say(quiet, f"done in {results['seconds_total'] / 60:.1f} min (load average {load_at_start} at start, "
                f"{results['machine']['load_average_end']} at end)")
    return results


def _with_overrides(spec: dict[str, Any], *, seeds, methods, validation_sites, extra, jobs=None) -> dict[str, Any]:
    """The preset with the command line's overrides applied, checked again."""
    if seeds is not None:
        spec["seeds"] = seeds
    if jobs is not None:
        spec["jobs"] = jobs
    if methods is not None:
        spec["methods"] = [m.strip() for m in methods if m.strip()]
    if validation_sites is not None:
        spec["validation-sites"] = validation_sites
    for key, value in (extra or {}).items():
        # "training.<method>.<key>" overrides one [training.*] table; anything else the shared run config.
        section, _, rest = key.partition(".")
        if section == "training" and rest.count(".") == 1:
            table, setting = rest.split(".")
            if table not in spec["training"]:
                raise ValueError(f"--set {key}: the preset has no [training.{table}] table; "
                                 f"tables: {', '.join(sorted(spec['training']))}.")
            spec["training"][table][setting] = value
        else:
            spec["run-config"][key] = value
    _check_spec(spec, spec["path"])
    return spec


def _results(spec, names, configs, budgets, total_budget, federation_dir, train_infos, eval_infos, eval_role,
             seeds_list, runs, dice, load_at_start) -> dict[str, Any]:
    """Everything results.json holds (but the total time and the file names, which the caller adds)."""
    import torch

    summary = summarise(dice, spec["shots"], spec["steps"])
    goal = goal_check(summary, spec["shots"], spec["steps"],
                      dice={name: {str(seed): d for seed, d in by_seed.items()} for name, by_seed in dice.items()})
    return {
        "preset": spec,
        "federation": str(federation_dir),
        "train_sites": [i.name for i in train_infos],
        "eval_sites": {info.name: info.heldout_kind or eval_role for info in eval_infos},
        "eval_role": eval_role,
        "seeds": seeds_list,
        "method_order": names,  # results.json sorts its keys; tables and plots keep this order
        "methods": {
            name: {
                "meaning": METHODS_BY_NAME[name].meaning,
                "adapts": METHODS_BY_NAME[name].adapts,
                "training": METHODS_BY_NAME[name].training,
                "budget": budgets.get(METHODS_BY_NAME[name].training),
                "site_weighting": (configs[METHODS_BY_NAME[name].training].weighting
                                   if METHODS_BY_NAME[name].training in configs else None),
                "run_config": (configs[METHODS_BY_NAME[name].training].to_run_config()
                               if METHODS_BY_NAME[name].training in configs else None),
            }
            for name in names
        },
        "local_steps_total": total_budget,
        "runs": {key: {str(s): r for s, r in by_seed.items()} for key, by_seed in runs.items()},
        "dice": {name: {str(s): d for s, d in by_seed.items()} for name, by_seed in dice.items()},
        "summary": summary,
        "goal": goal,
        "time_to_accuracy": time_to_accuracy(runs),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average_start": load_at_start,
            "load_average_end": _load_average(),
        },
    }


def _split_sites(manifest, validation_sites: int, federation_dir: Path):
    """(training sites, sites that play the new hospital, their role)."""
    train = list(manifest.train_sites)
    if validation_sites == 0:
        if not manifest.heldout_sites:
            raise ValueError(f"{federation_dir} has no held-out sites; the benchmark needs at least one new hospital.")
        return train, list(manifest.heldout_sites), "heldout"
    if validation_sites >= len(train):
        raise ValueError(
            f"validation-sites={validation_sites} leaves no training site ({len(train)} in {federation_dir}); "
            f"use at most {len(train) - 1}."
        )
    return train[:-validation_sites], train[-validation_sites:], "validation"


def _train_args(key: str, base, seed: int, out: Path, federation_dir: Path, train_infos, eval_infos, spec, quiet: bool):
    """``_train``'s arguments for one method and seed."""
    config = base.replace(seed=seed, federation_dir=str(federation_dir), out_dir=str(out / "runs" / f"seed-{seed}" / key))
    return (key, config, federation_dir, train_infos, quiet, eval_infos, spec["curve-every"], spec["eval-max-images"])


def _in_processes(jobs: int, function, arguments: list[tuple]) -> list:
    """``[function(*a) for a in arguments]`` in ``jobs`` spawned processes, each with this process's torch
    thread count; results in the order given. A failure in one job is raised here."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    import torch

    pool = ProcessPoolExecutor(max_workers=min(jobs, len(arguments)) or 1, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(torch.get_num_threads(),))
    try:
        futures = [pool.submit(function, *args) for args in arguments]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)  # the first failure, whichever job it is
        failed = next((f for f in futures if f in done and f.exception() is not None), None)
        if failed is not None:
            failed.result()  # raises it
        results = [future.result() for future in futures]
    except BaseException:
        # A failed job (or Ctrl-C) ends the benchmark now: queued jobs never start, running ones are
        # stopped, and the error is reported without waiting for the rest.
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return results


def _worker_init(threads: int) -> None:
    import torch

    from fedmeta.common.workers import end_with_parent

    end_with_parent()  # a benchmark killed with SIGKILL (no handler runs) takes its 500 MB workers with it
    torch.set_num_threads(threads)


def _train(key: str, config, federation_dir: Path, train_infos, quiet: bool, eval_infos=(), curve_every: int = 0,
           eval_max_images: int = 0):
    """Trains one method for one seed (or reuses a finished run of the same config); (run info, Initialisation).

    Federated runs with ``curve_every`` > 0 also let the new sites (``eval_infos``, held-out nodes that
    never train) adapt θ every ``curve_every`` rounds during training, at k = GOAL_SHOTS and
    GOAL_STEPS steps: the learning curve that time-to-accuracy is read from. Evaluation reads θ and
    never moves it, so the trajectory is the one a run without it takes.
    """
    from fedmeta.common.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint, save_checkpoint, trajectory_hash
    from fedmeta.common.adaptation import load_initialisation

    out_dir = Path(config.out_dir)
    path = out_dir / CHECKPOINT_NAME
    info_path = out_dir / "run.json"
    # A finished run is reused only when it was trained on the same sites of the same federation
    # (the config hash leaves out where the data lies) by a run of the same shape.
    trained_on = {"federation": str(Path(federation_dir).resolve()), "train_sites": sorted(i.name for i in train_infos),
                  # the learning curve is part of what a run left: reuse one only if it was recorded alike
                  "curve": {"every": curve_every, "sites": sorted(i.name for i in eval_infos),
                            "eval_max_images": eval_max_images} if curve_every > 0 else None}
    reused = False
    if path.exists() and info_path.exists():
        checkpoint = load_checkpoint(path)
        previous = json.loads(info_path.read_text())
        reused = (checkpoint.config_hash == trajectory_hash(config) and checkpoint.round == config.num_rounds
                  and previous.get("trained_on") == trained_on)
    if reused:
        info = previous
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        began = time.perf_counter()
        if key.startswith("pooled-"):
            from fedmeta.simulations.experiments.centralised import run_centralised

            run = run_centralised(config, federation_dir, pooled=True, train_sites=[i.name for i in train_infos])
            save_checkpoint(path, Checkpoint(
                round=config.num_rounds, params=run.params, step_sizes=run.step_sizes,
                optimizer=run.optimizer_state, rng_state={}, config_hash=trajectory_hash(config),
                run_config=config.to_run_config(), counters={},
            ))
            last = run.rounds[-1] if run.rounds else {}
            info = {"engine": "centralised (pooled)", "final_query_loss_after": last.get("query_loss_after"),
                    "dropped_replies": 0, "skipped_rounds": 0}
        else:
            from fedmeta.server.metrics import METRICS_NAME, read_metrics
            from fedmeta.simulations.engines.inprocess import run_inprocess

            from fedmeta.simulations.experiments.centralised import training_node_configs

            # One process serves every site here; the ClientApp's site cache (bounded by bytes, 1 GiB)
            # holds the whole training federation, so no site is re-read from NIfTI each round.
            nodes = training_node_configs(train_infos)
            if curve_every > 0 and eval_infos:
                # Scored as the benchmark's own table is (same k, steps, seed and patients), so the last
                # point of FedAvg's curve is FedAvg + fine-tune's Dice in the table.
                config = config.replace(eval_every=curve_every, eval_k_shot=GOAL_SHOTS, eval_steps=str(GOAL_STEPS),
                                        eval_max_images=eval_max_images)
                nodes += [{DATA_DIR_KEY: str(info.folder()), ROLE_KEY: ROLE_HELDOUT, SITE_ID_KEY: len(nodes) + i}
                          for i, info in enumerate(sorted(eval_infos, key=lambda info: info.name))]
            run_inprocess(config.to_run_config(), nodes, seed=config.seed)
            checkpoint = load_checkpoint(path)
            if checkpoint.round != config.num_rounds:
                raise RuntimeError(f"{key} (seed {config.seed}) stopped after round {checkpoint.round} of "
                                   f"{config.num_rounds}; see {out_dir / METRICS_NAME}.")
            if checkpoint.counters.get("skipped_rounds"):
                raise RuntimeError(f"{key} (seed {config.seed}) skipped {checkpoint.counters['skipped_rounds']} "
                                   f"round(s): sites' replies were dropped; see {out_dir / METRICS_NAME}.")
            trained = [r for r in read_metrics(out_dir / METRICS_NAME) if r.get("round", 0) > 0]
            info = {"engine": "in-process Flower apps",
                    "final_query_loss_after": trained[-1]["train"].get(QUERY_LOSS_AFTER) if trained else None,
                    "dropped_replies": checkpoint.counters.get("dropped_replies", 0),
                    "skipped_rounds": checkpoint.counters.get("skipped_rounds", 0),
                    "curve": learning_curve(read_metrics(out_dir / METRICS_NAME), checkpoint, config)}
        info["seconds"] = time.perf_counter() - began
        info["trained_on"] = trained_on
        write_json(info_path, info)
    init, _ = load_initialisation(path, key)
    loss = info.get("final_query_loss_after")
    _say(quiet, f"[seed {config.seed}] {key:14s} {'reused' if reused else 'trained'} in {info['seconds']:.0f} s"
                + (f", final query loss {loss:.4f}" if loss is not None else ""))
    return {**info, "reused": reused, "checkpoint": str(path)}, init


def learning_curve(records: list[dict[str, Any]], checkpoint, config) -> list[dict[str, float]]:
    """``[{round, dice, bytes}]``: the new sites' mean Dice after adaptation at each evaluated round, and
    the payload bytes the federation exchanged up to it (θ down and the update up, fp32, per site
    that answered; Meta-SGD's step sizes count both ways). Wire framing adds about 1 % (`fedmeta perf comm`).
    """
    arrays = sum(t.numel() for t in checkpoint.params.values()) + sum(
        t.numel() for t in (checkpoint.step_sizes or {}).values())
    per_site_round = 2 * 4 * arrays  # down and up, fp32
    key = dice_mean_key(GOAL_STEPS)
    curve, sent = [], 0
    for record in records:
        sent += per_site_round * int(record.get("sites_answered", 0))
        summary = record.get("heldout", {}).get("summary", {})
        if key in summary:
            curve.append({"round": int(record["round"]), "dice": float(summary[key]), "bytes": sent})
    return curve


def time_to_accuracy(runs: dict[str, dict[int, dict[str, Any]]], target_key: str = "fedavg") -> dict[str, Any]:
    """Per method and seed: the first evaluated round (and bytes) at which the new sites' Dice after
    adaptation reaches the target, FedAvg + fine-tune's final value in the same seed; None if never."""
    out: dict[str, Any] = {}
    targets = {seed: run["curve"][-1]["dice"] for seed, run in runs.get(target_key, {}).items() if run.get("curve")}
    for key, by_seed in runs.items():
        rows = {}
        for seed, run in by_seed.items():
            curve, target = run.get("curve"), targets.get(seed)
            if not curve or target is None:
                continue
            hit = next((point for point in curve if point["dice"] >= target), None)
            rows[str(seed)] = {"target": target, "round": hit["round"] if hit else None,
                               "bytes": hit["bytes"] if hit else None, "final_dice": curve[-1]["dice"]}
        if rows:
            out[key] = rows
    return out


def _evaluate_seed_from_files(names, inits, any_config, spec, eval_infos, seed: int, quiet: bool) -> dict[str, Any]:
    """``_evaluate_seed`` in a worker process: the new sites are read there rather than shipped to it."""
    from fedmeta.common.data import SiteDataset

    sites = [SiteDataset.load(info.folder(), any_config.data_config()) for info in eval_infos]
    return _evaluate_seed(names, inits, any_config, spec, sites, seed, quiet)


def _evaluate_seed(names, inits, any_config, spec, sites, seed: int, quiet: bool) -> dict[str, Any]:
    """Dice per method, site, k and step count for one seed; every method adapts on the same slices."""
    from fedmeta.common.adaptation import Initialisation, score_site
    from fedmeta.common.model import build_model, initial_params, seeded_model

    model = build_model(any_config.model_config())
    splits: dict = {}
    out: dict[str, Any] = {}
    began = time.perf_counter()
    for name in names:
        method = METHODS_BY_NAME[name]
        if method.training is None:
            init = Initialisation(name, initial_params(seeded_model(any_config.model_config(), seed)), any_config.inner_lr)
        elif method.training != ORACLE:
            init = inits[method.training]
        steps = spec["steps"] if method.adapts else [0]
        out[name] = {}
        for site in sites:
            if method.training == ORACLE:  # its own model per site, trained on that site's support patients
                from fedmeta.simulations.experiments.oracle import train_oracle  # torch: not for `fedmeta --help`

                init = train_oracle(site, any_config, seed=seed, steps=spec["oracle-steps"])
            curve = score_site(model, init, site, shots=spec["shots"], steps=steps, seed=seed,
                               num_classes=any_config.num_classes, max_images=spec["eval-max-images"],
                               batch_size=any_config.eval_batch_size, splits=splits)
            if not method.adapts:  # the model as is: the same Dice whatever the step budget
                curve = {k: {s: by_steps[0] for s in spec["steps"]} for k, by_steps in curve.items()}
            out[name][site.name] = {str(k): {str(s): v for s, v in by_steps.items()} for k, by_steps in curve.items()}
    _say(quiet, f"[seed {seed}] evaluated {len(names)} methods on {len(sites)} site(s) in {time.perf_counter() - began:.0f} s")
    return out


# --------------------------------------------------------------------------------------------------
# summaries


def summarise(dice: dict[str, dict[int, Any]], shots: list[int], steps: list[int]) -> dict[str, Any]:
    """Per method, k and steps: mean, std and t-interval over seeds of the site mean, and the worst site."""
    summary: dict[str, Any] = {}
    for name, by_seed in dice.items():
        summary[name] = {}
        seeds = sorted(by_seed)
        sites = sorted(next(iter(by_seed.values())))
        for k in shots:
            summary[name][str(k)] = {}
            for s in steps:
                table = np.array([[by_seed[seed][site][str(k)][str(s)]["dice"] for site in sites] for seed in seeds])
                site_means_per_seed = table.mean(axis=1)  # [seeds]; Dice is never NaN
                per_site = table.mean(axis=0)  # [sites], averaged over seeds
                worst = int(np.argmin(per_site))
                ci = interval([float(v) for v in site_means_per_seed])
                summary[name][str(k)][str(s)] = {
                    "mean": float(np.mean(site_means_per_seed)),
                    "std": float(np.std(site_means_per_seed, ddof=1)) if len(seeds) > 1 else 0.0,
                    "ci": list(ci) if ci else None,
                    "worst_site": sites[worst],
                    "worst_site_dice": float(per_site[worst]),
                    "per_site": {site: float(v) for site, v in zip(sites, per_site)},
                }
    return summary


def goal_check(summary: dict[str, Any], shots: list[int], steps: list[int], dice: dict | None = None) -> dict[str, Any]:
    """The claim at k = 5 and 10 steps: a meta-learned initialisation beats FedAvg + fine-tune by
    ``GOAL_MARGIN`` Dice, in every seed; with each learner's fraction of the oracle ceiling.

    With ``dice`` (per method, seed, site), each row gets the paired margin per seed: methods share
    seeds, support slices and evaluation patients, so the per-seed difference is the fair measure
    of how often a method wins, which the seeds' spread of absolute Dice hides; their mean comes with
    a ``CONFIDENCE`` t-interval over seeds.
    """
    k, s = str(GOAL_SHOTS), str(GOAL_STEPS)
    if GOAL_SHOTS not in shots or GOAL_STEPS not in steps:
        return {"checked": False, "reason": f"the grid lacks k = {GOAL_SHOTS} or {GOAL_STEPS} steps"}

    def mean_of(name: str) -> float | None:
        return summary.get(name, {}).get(k, {}).get(s, {}).get("mean")

    fedavg_ft, oracle = mean_of("fedavg-ft"), mean_of("oracle")
    rows = {}
    for name in META_METHODS:
        if name not in summary:
            continue
        value = mean_of(name)
        pooled = mean_of(f"pooled-{name}")
        pooled = mean_of("pooled-fomaml") if pooled is None else pooled
        row = {
            "dice": value,
            "margin_over_fedavg_ft": value - fedavg_ft if fedavg_ft is not None else None,
            "fraction_of_oracle": value / oracle if oracle else None,
            "fraction_of_pooled": value / pooled if pooled else None,
        }
        if dice is not None and "fedavg-ft" in dice:
            paired = []
            for seed, sites in dice[name].items():
                other = dice["fedavg-ft"][seed]
                paired.append(float(np.mean([sites[site][k][s]["dice"] - other[site][k][s]["dice"] for site in sites])))
            row["paired_margin_per_seed"] = paired
            row["paired_margin_ci"] = interval(paired)
            row["beats_fedavg_ft_in_every_seed"] = bool(paired) and min(paired) >= GOAL_MARGIN
        rows[name] = row
    met = [n for n, r in rows.items() if r.get("beats_fedavg_ft_in_every_seed")]
    return {"checked": True, "k": GOAL_SHOTS, "steps": GOAL_STEPS, "margin": GOAL_MARGIN, "confidence": CONFIDENCE,
            "fedavg_ft": fedavg_ft, "oracle": oracle, "methods": rows, "met_by": met}


def format_goal(goal: dict[str, Any]) -> str:
    if not goal.get("checked"):
        return f"goal not checked: {goal.get('reason')}"
    lines = [f"goal at k = {goal['k']}, {goal['steps']} steps: beat FedAvg + fine-tune ({_f(goal['fedavg_ft'])}) "
             f"by >= {goal['margin']} Dice in every seed; oracle ceiling {_f(goal['oracle'])}"]
    for name, row in goal["methods"].items():
        ci = row.get("paired_margin_ci")
        lines.append(f"  {name:8s} Dice {row['dice']:.3f}  margin {_f(row['margin_over_fedavg_ft'], '+.3f')}"
                     + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")
                     + f"  of oracle {_f(row['fraction_of_oracle'], '.1%')}  "
                     + (f"per-seed margins {' '.join(_f(m, '+.3f') for m in row['paired_margin_per_seed'])}  "
                        if "paired_margin_per_seed" in row else "")
                     + ("MET" if name in goal["met_by"] else "not met"))
    return "\n".join(lines)


def format_markdown(results: dict[str, Any]) -> str:
    spec, summary = results["preset"], results["summary"]
    steps, shots = spec["steps"], spec["shots"]
    role = "validation (training) sites" if results["eval_role"] == "validation" else "held-out sites"
    machine = results["machine"]
    lines = [
        f"# fedmeta benchmark: preset `{spec['name']}`",
        "",
        f"Federation `{spec['federation']}` (seed {spec['federation-seed']}); trained on "
        f"{len(results['train_sites'])} sites, new hospitals = {role}: "
        + ", ".join(f"{n} ({kind})" for n, kind in results["eval_sites"].items())
        + f". Seeds {results['seeds']}. Dice per evaluation patient over the whole volume, per foreground class "
        "the site declares (an undeclared class is background there), mean over classes then patients, then "
        f"over sites ({spec['eval-max-images'] or 'all'} slices per site, whole patients); "
        + (f"mean ± half-width of the {CONFIDENCE:.0%} t-interval over seeds." if len(results["seeds"]) > 1
           else "one seed: no interval."),
        "",
        f"Every trained method: {results['local_steps_total']} local gradient steps (forward-backward passes on "
        "one batch) in total. Sites weigh in the server's mean by their labelled training slices (`data`, "
        "McMahan et al.'s FedAvg; capped at `max-weight-ratio` × the round's median) or one weight each "
        "(`per-site`, task-averaged MAML), as the methods table says.",
        "",
        format_goal(results["goal"]).replace("\n  ", "\n- ").replace("goal", "**Goal**", 1),
        "",
    ]
    for k in shots:
        oracle = summary.get("oracle", {}).get(str(k), {}).get(str(steps[-1]), {}).get("mean")
        lines += [f"## k = {k} labelled slices", "", "| method | " + " | ".join(f"{s} steps" for s in steps)
                  + f" | worst site ({steps[-1]} steps) | of oracle ({steps[-1]} steps) |",
                  "|---|" + "---|" * (len(steps) + 2)]
        for name in results["method_order"]:
            cells = [_mean_ci(summary[name][str(k)][str(s)]) for s in steps]
            last = summary[name][str(k)][str(steps[-1])]
            fraction = f"{last['mean'] / oracle:.1%}" if oracle else "-"
            lines.append(f"| {name} | " + " | ".join(cells)
                         + f" | {last['worst_site_dice']:.3f} ({last['worst_site']}) | {fraction} |")
        lines.append("")
    k_mid = str(GOAL_SHOTS if GOAL_SHOTS in shots else shots[0])
    s_mid = str(GOAL_STEPS if GOAL_STEPS in steps else steps[-1])
    sites = list(results["eval_sites"])
    lines += [f"## Per site, k = {k_mid}, {s_mid} steps (mean over seeds)", "",
              "| method | " + " | ".join(f"{s} ({results['eval_sites'][s]})" for s in sites) + " |",
              "|---|" + "---|" * len(sites)]
    for name in results["method_order"]:
        per_site = summary[name][k_mid][s_mid]["per_site"]
        lines.append(f"| {name} | " + " | ".join(f"{per_site[s]:.3f}" for s in sites) + " |")
    lines += _time_to_accuracy_lines(results)
    lines += ["", "## Methods and budgets", "",
              "| method | what the row is | sites weigh | episodes/site | inner steps | local steps per site-round | "
              "total | training s (mean) |", "|---|---|---|---|---|---|---|---|"]
    for name in results["method_order"]:
        method = results["methods"][name]
        b = method["budget"]
        runs = results["runs"].get(method["training"] or "", {})
        seconds = np.mean([r["seconds"] for r in runs.values()]) if runs else 0.0
        if b:
            weighting = "pooled: one update" if name.startswith("pooled-") else method["site_weighting"]
            lines.append(f"| {name} | {method['meaning']} | {weighting} | {b['episodes_per_site']} | "
                         f"{b['inner_steps']} | {b['local_steps_per_site_round']} | {b['local_steps_total']} | "
                         f"{seconds:.0f} |")
        elif method["training"] == ORACLE:
            lines.append(f"| {name} | {method['meaning']} | - | - | - | - | {spec['oracle-steps']} Adam steps per "
                         "new site, on its own data | - |")
        else:
            lines.append(f"| {name} | {method['meaning']} | - | - | - | 0 | 0 | 0 |")
    lines += ["", f"![Dice against adaptation steps]({Path(results['files']['plot']).name})", "",
              f"Machine: {machine['processor']}, {machine['cpus']} CPUs, torch {machine['torch']} "
              f"({machine['torch_threads']} threads); load average {machine['load_average_start']} at start, "
              f"{machine['load_average_end']} at end; wall time {results['seconds_total'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def plot_results(results: dict[str, Any], path: Path) -> Path:
    """Dice against adaptation steps: one row per k, one panel per kind of new site; mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = results["preset"]
    steps, shots = spec["steps"], spec["shots"]
    kinds: dict[str, list[str]] = {}
    for site, kind in results["eval_sites"].items():
        kinds.setdefault(kind, []).append(site)
    fig, axes = plt.subplots(len(shots), len(kinds), figsize=(4.2 * len(kinds), 3.2 * len(shots)), dpi=110,
                             squeeze=False, sharey=True)
    colours = plt.get_cmap("tab10")
    for row, k in enumerate(shots):
        for col, (kind, sites) in enumerate(kinds.items()):
            ax = axes[row][col]
            for i, name in enumerate(results["method_order"]):
                by_seed = results["dice"][name]
                # per seed: mean over this kind's sites; then mean ± std over seeds
                values = np.array([[np.mean([by_seed[seed][site][str(k)][str(s)]["dice"] for site in sites])
                                    for s in steps] for seed in by_seed])
                mean, std = values.mean(axis=0), values.std(axis=0)
                style = "--" if not results["methods"][name]["adapts"] else ("-." if name.startswith("pooled-") else "-")
                ax.plot(steps, mean, style, marker="o", markersize=3, color=colours(i % 10), label=name)
                if len(values) > 1:
                    ax.fill_between(steps, mean - std, mean + std, color=colours(i % 10), alpha=0.12)
            ax.set_title(f"{kind} ({', '.join(sites)}), k = {k}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.set_xticks(steps)
            if row == len(shots) - 1:
                ax.set_xlabel("adaptation steps on the new site")
            if col == 0:
                ax.set_ylabel("Dice per patient (mean)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8, frameon=False)
    fig.suptitle("New-hospital adaptation: Dice against adaptation steps (mean ± std over seeds; "
                 "dashed: no adaptation (FedAvg as is, the oracle), dash-dot: pooled learners)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if len(labels) > 5 else 0.04, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_learning_curves(results: dict[str, Any], path: Path) -> Path | None:
    """The new sites' Dice (k = GOAL_SHOTS, GOAL_STEPS steps) against training rounds, mean ± std over
    seeds, one line per federated method, and against the bytes exchanged; None without curves."""
    curves = {key: [run["curve"] for run in by_seed.values() if run.get("curve")] for key, by_seed in results["runs"].items()}
    curves = {key: runs for key, runs in curves.items() if runs}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    colours = plt.get_cmap("tab10")
    for i, (key, runs) in enumerate(sorted(curves.items())):
        length = min(len(curve) for curve in runs)  # seeds share the schedule; guard a short one
        rounds = np.array([point["round"] for point in runs[0][:length]])
        sent = np.array([point["bytes"] for point in runs[0][:length]]) / 2**30
        values = np.array([[point["dice"] for point in curve[:length]] for curve in runs])
        mean, std = values.mean(axis=0), values.std(axis=0)
        for ax, x in zip(axes, (rounds, sent)):
            ax.plot(x, mean, marker="o", markersize=2.5, color=colours(i % 10), label=key)
            if len(runs) > 1:
                ax.fill_between(x, mean - std, mean + std, color=colours(i % 10), alpha=0.12)
    role = "validation (training) sites" if results["eval_role"] == "validation" else "held-out sites"
    axes[0].set_xlabel("round")
    axes[1].set_xlabel("GiB exchanged (θ down and the update up, fp32)")
    for ax in axes:
        ax.set_ylabel(f"Dice, k = {GOAL_SHOTS}, {GOAL_STEPS} steps")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Learning curves on the {role} ({len(next(iter(curves.values())))} seed(s); mean ± std)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------


def _load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _time_to_accuracy_lines(results: dict[str, Any]) -> list[str]:
    tta = results.get("time_to_accuracy") or {}
    if not tta:
        return []
    lines = ["", f"## Time to accuracy (k = {GOAL_SHOTS}, {GOAL_STEPS} steps)", "",
             "Rounds, and payload megabytes exchanged, until the new sites' Dice after adaptation (evaluated "
             f"every {results['preset']['curve-every']} rounds during training) first reaches FedAvg + fine-tune's "
             "final value in the same seed; `never` if it does not within the budget.", "",
             "| training | " + " | ".join(f"seed {s}" for s in results["seeds"]) + " |",
             "|---|" + "---|" * len(results["seeds"])]
    for key, rows in tta.items():
        cells = []
        for seed in results["seeds"]:
            row = rows.get(str(seed))
            if row is None:
                cells.append("-")
            elif row["round"] is None:
                cells.append(f"never (final {row['final_dice']:.4f} < {row['target']:.4f})")
            else:
                cells.append(f"round {row['round']}, {row['bytes'] / 2**20:.1f} MB")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


def _mean_ci(cell: dict[str, Any]) -> str:
    """'mean ± half-width' of the t-interval, or the mean alone with one seed."""
    if cell.get("ci"):
        return f"{cell['mean']:.3f} ± {(cell['ci'][1] - cell['ci'][0]) / 2:.3f}"
    return f"{cell['mean']:.3f}"


def _f(value: float | None, fmt: str = ".3f") -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, fmt)


def _say(quiet: bool, line: str) -> None:
    if not quiet:
        print(line, flush=True)


__all__ = [
    "METHODS",
    "goal_check",
    "load_benchmark_preset",
    "register",
    "run_benchmark",
    "summarise",
]
