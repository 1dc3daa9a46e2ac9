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
  ``fedmeta.common.algorithms``), adapted by their own rule (prototypes: 0 steps is pure prototype
  matching, further steps fine-tune the encoder);
- pooled-fomaml, pooled-maml, pooled-metasgd: the same learners on the pooled patients of all
  training sites, without federation (the centralised bound of each family;
  ``fedmeta.simulations.experiments.centralised``);
- oracle: per new site, a UNet fully supervised on that site's own support patients, early-stopped on a
  quarter of them (``fedmeta.simulations.experiments.oracle``): the ceiling each row is a fraction of; a
  row above it is flagged;
- intensity: per new site, intensity thresholds fitted on the k support slices
  (``fedmeta.common.intensity_baseline``): what a federation whose labels follow intensity gives for free.

Every adapting row is scored at the preset's fixed step counts and at "auto", the count each site
chooses from its k support slices alone (``fedmeta.common.step_selection``): the main column.

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
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from fedmeta.common.jsonio import write_json
from fedmeta.common.outputs import OutputRefused, Outputs, write_atomically
from fedmeta.common.protocol import FOMAML
from fedmeta.common.read_limits import ReadLimits
from fedmeta.simulations.experiments.benchmark_preset import (
    AUTO, DEFAULT_PRESET, METHODS, METHODS_BY_NAME, QUICK_PRESET, _check_spec, load_benchmark_preset, method_configs,
    step_columns,
)
from fedmeta.simulations.experiments.benchmark_report import (
    above_oracle, above_oracle_lines, format_goal, format_markdown, format_paired, goal_check, paired_rows, summarise,
    time_to_accuracy,
)
from fedmeta.simulations.experiments.benchmark_runs import (
    _evaluate_seed, _evaluate_seed_from_files, _in_processes, _say, _train, _train_args, progress,
)
from fedmeta.simulations.experiments.benchmark_runs import _worker_init  # noqa: F401 - imported from here by tests
from fedmeta.simulations.experiments.budget import budget, check_equal_budget
from fedmeta.simulations.experiments.figures import plot_learning_curves, plot_results
from fedmeta.simulations.experiments.presets import parse_sets

# torch and the fedmeta modules that load it (config, synth, data, meta) are imported inside the functions that
# use them: `fedmeta benchmark --help` does not wait seconds for them.


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
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite --out's tables, figures and summaries from its results.json (after a change to "
                             "the report), training and scoring nothing")
    parser.add_argument("--paired", nargs=2, metavar=("DIR:ROW", "DIR:ROW"),
                        help="compare two finished benchmarks' rows seed by seed (the first minus the second), e.g. "
                             "runs/benchmark-anatomy:prototypes runs/benchmark-anatomy-fedavg-160:fedavg-ft; only "
                             "where both scored the same patients; trains and scores nothing")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared 2-core machine more threads oversubscribe "
                             "the cores and ran up to 10x slower; 0 keeps torch's own choice)")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    if args.quick and args.preset:
        print("fedmeta benchmark: error: give --quick or --preset, not both.", file=sys.stderr)
        return 2
    preset = args.preset or (QUICK_PRESET if args.quick else DEFAULT_PRESET)
    if args.paired:
        try:
            (label_a, a, row_a), (label_b, b, row_b) = (_finished(value) for value in args.paired)
            table = format_paired(paired_rows(a, row_a, b, row_b), label_a, label_b)
        except (ValueError, OSError) as err:
            print(f"fedmeta benchmark: error: --paired: {err}", file=sys.stderr)
            return 1
        print(table)  # outside the try: a reader that goes away (| head) is no error in the files read
        return 0
    if args.report_only:
        if args.out is None:
            print("fedmeta benchmark: error: --report-only rewrites a finished benchmark's report: give its --out.",
                  file=sys.stderr)
            return 2
        ignored = [option for option, given in (
            ("--preset", args.preset), ("--quick", args.quick), ("--seeds", args.seeds), ("--methods", args.methods),
            ("--federation-dir", args.federation_dir), ("--validation-sites", args.validation_sites),
            ("--set", args.set), ("--jobs", args.jobs)) if given]
        if ignored:
            print(f"fedmeta benchmark: error: --report-only rewrites the report of the run in --out as it ran; "
                  f"{', '.join(ignored)} would change nothing. Drop them, or run the benchmark without --report-only.",
                  file=sys.stderr)
            return 2
        try:
            results = rewrite_report(args.out)
        except (ValueError, OSError) as err:
            print(f"fedmeta benchmark: error: {err}", file=sys.stderr)
            return 1
        print(format_goal(results["goal"]))
        print(f"table: {results['files']['table']}\nplot: {results['files']['plot']}")
        return 0
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
        with progress(quiet, f"federation {spec['federation']} (seed {spec['federation-seed']}): generating or "
                             f"reading it under {root}"):
            federation_dir = cached_federation(root, spec["federation"], spec["federation-seed"])
    federation_dir = Path(federation_dir).resolve()
    manifest = load_manifest(federation_dir)
    train_infos, eval_infos, eval_role = _split_sites(manifest, spec["validation-sites"], federation_dir)
    budgets = {key: budget(cfg, len(train_infos)) for key, cfg in configs.items()}
    total_budget = check_equal_budget(budgets, spec["path"])

    out = Path(out or Path("runs") / f"benchmark-{spec['name']}").resolve()
    # The folder is new or the benchmark's own: running again continues it (finished runs are reused, the
    # tables rewritten), and never writes into another command's folder or a site's data.
    earlier = (out / "results.json").is_file() or (out / "runs").is_dir()  # a benchmark from before the journal
    Outputs(out, "benchmark").claim_folder(resume=True, detail={"preset": spec["name"]}, recognised=earlier)
    _say(quiet, f"federation {federation_dir}: training on {', '.join(i.name for i in train_infos)}; "
                f"new hospitals ({eval_role}): {', '.join(i.name for i in eval_infos)}")
    _say(quiet, f"budget: {total_budget} local gradient steps per method; seeds {spec['seeds']}; "
                f"k {spec['shots']}; steps {step_columns(spec)}"
                + (f" (auto: chosen from the support slices, up to {spec['auto-max-steps']})" if spec["auto-steps"] else "")
                + f"; {spec['eval-max-images'] or 'all'} evaluation slices per site; oracle: early-stopped, at most "
                  f"{spec['oracle-steps']} Adam steps")

    from fedmeta.common.data import SiteDataset

    # The shared settings (data, classes, the scratch and oracle networks): a method of the initialisation
    # family's, never a learner's own network.
    any_config = next((c for c in configs.values() if c.model_config().learner == "unet"), None) \
        or RunConfig.from_run_config({**spec["run-config"], "eval-every": 0, "algorithm": FOMAML})
    seeds_list = list(range(spec["seeds"]))
    dice: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in names}
    oracle: dict[int, dict[str, Any]] = {}  # per seed and site: how the oracle's training ended
    runs: dict[str, dict[int, dict[str, Any]]] = {key: {} for key in configs}
    inits: dict[int, dict[str, Any]] = {seed: {} for seed in seeds_list}
    if spec["jobs"] == 1:  # one seed after the other: each seed's table is printed as soon as it exists
        with progress(quiet, "reading the new sites"):
            eval_data = [SiteDataset.load(info.folder(), any_config.data_config(limits=ReadLimits.from_environment()))
                         for info in eval_infos]
        for seed in seeds_list:
            for key, base in configs.items():
                runs[key][seed], inits[seed][key] = _train(*_train_args(key, base, seed, out, federation_dir, train_infos,
                                                                        eval_infos, spec, quiet))
            dice_by_method, oracle[seed] = _evaluate_seed(names, inits[seed], any_config, spec, eval_data, seed, quiet)
            for name in names:
                dice[name][seed] = dice_by_method[name]
    else:
        def costly(config: RunConfig) -> bool:  # second order, or a learner's network: the longest runs
            return config.algorithm_object.second_order or config.model_config().learner != "unet"

        # The costliest runs first, so the processes finish together.
        order = sorted(((seed, key) for seed in seeds_list for key in configs),
                       key=lambda job: (not costly(configs[job[1]]), job[0]))
        trained = _in_processes(spec["jobs"], _train, [
            _train_args(key, configs[key], seed, out, federation_dir, train_infos, eval_infos, spec, quiet)
            for seed, key in order], quiet=quiet, what="training runs")
        for (seed, key), (info, init) in zip(order, trained):
            runs[key][seed], inits[seed][key] = info, init
        scored = _in_processes(spec["jobs"], _evaluate_seed_from_files, [
            (names, inits[seed], any_config, spec, eval_infos, seed, quiet) for seed in seeds_list],
            quiet=quiet, what="seeds' evaluations")
        for seed, (dice_by_method, oracle[seed]) in zip(seeds_list, scored):
            for name in names:
                dice[name][seed] = dice_by_method[name]

    results = _results(spec, names, configs, budgets, total_budget, federation_dir, train_infos, eval_infos,
                       eval_role, seeds_list, runs, dice, oracle, load_at_start)
    results["seconds_total"] = time.perf_counter() - began
    files = _report_files(out, runs)
    results["files"] = {k: str(v) for k, v in files.items()}
    with progress(quiet, "writing the figures and tables"):
        _write_report(results, files)
    _say(quiet, format_goal(results["goal"]))
    for line in above_oracle_lines(results):
        _say(quiet, line)
    _say(quiet, f"done in {results['seconds_total'] / 60:.1f} min (load average {load_at_start} at start, "
                f"{results['machine']['load_average_end']} at end)")
    return results


def _analysis(dice: dict[str, dict[str, Any]], runs: dict[str, dict[Any, Any]], shots: list[int],
              columns: list[int | str]) -> dict[str, Any]:
    """What results.json derives from the Dice cells (per method, seed as a string, site) and the training runs:
    the summary, the goal, the cells above the oracle and the time to accuracy — for a run and for --report-only."""
    summary = summarise(dice, shots, columns)
    return {"summary": summary, "goal": goal_check(summary, shots, columns, dice=dice),
            "above_oracle": above_oracle(summary, shots, columns), "time_to_accuracy": time_to_accuracy(runs)}


def _report_files(out: Path, runs: dict[str, dict[Any, Any]]) -> dict[str, Path]:
    """The files a benchmark's report writes in ``out``; learning curves only when a run recorded one."""
    files = {"results": out / "results.json", "table": out / "results.md", "plot": out / "dice_vs_steps.png"}
    if any(run.get("curve") for by_seed in runs.values() for run in by_seed.values()):
        files["curves"] = out / "learning_curves.png"
    return files


def _write_report(results: dict[str, Any], files: dict[str, Path], table: str | None = None) -> None:
    """The figures, results.md and results.json, each written beside its name and renamed onto it (a crash leaves
    no half file, a link planted under a name is replaced, not followed); ``table``: the markdown, if made."""
    table = format_markdown(results) if table is None else table
    plot_results(results, files["plot"])
    if "curves" in files:
        plot_learning_curves(results, files["curves"])
    write_atomically(files["table"], lambda tmp: tmp.write_text(table))
    write_atomically(files["results"], lambda tmp: write_json(tmp, results))


REPORT_ONLY_MAX_BYTES = 256 * 2**20  # a 5-seed benchmark's results.json is about 5 MB


def _read_results(path: Path, needs: tuple[str, ...]) -> dict[str, Any]:
    """A benchmark's results.json, strict, bounded in size, holding the top-level keys ``needs``; what is wrong
    with it named."""
    from fedmeta.common.jsonio import loads_strict

    size = path.stat().st_size
    if size > REPORT_ONLY_MAX_BYTES:
        raise ValueError(f"{path}: {size / 2**20:.0f} MiB, more than a benchmark's results.json holds "
                         f"(at most {REPORT_ONLY_MAX_BYTES // 2**20} MiB here); it is not one of fedmeta benchmark's.")
    try:
        results = loads_strict(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not readable as strict JSON ({err}).") from None
    missing = [key for key in needs if not isinstance(results, dict) or key not in results]
    if missing:
        raise ValueError(f"{path}: lacks {', '.join(repr(k) for k in missing)}: not the results of this fedmeta "
                         "version's benchmark. Run the same benchmark again with this version (into the same --out, "
                         "finished trainings are reused).")
    return results


def _finished(value: str) -> tuple[str, dict[str, Any], str]:
    """``DIR:ROW`` -> (label, DIR's results, ROW)."""
    folder, _, row = value.rpartition(":")
    if not folder or not row:
        raise ValueError(f"{value!r}: give DIR:ROW, a finished benchmark's --out and one of its rows, e.g. "
                         "runs/benchmark-anatomy:prototypes.")
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no results.json; give the --out of a finished fedmeta benchmark.")
    results = _read_results(path, needs=("dice", "preset", "step_columns", "federation", "eval_sites"))
    return f"{row} ({Path(folder).name})", results, row


def rewrite_report(out: Path) -> dict[str, Any]:
    """A finished benchmark's summaries, goal, tables and figures computed again from its ``results.json`` (its
    Dice per method, seed, site and cell, and its runs), as the report code now writes them; nothing is trained
    or scored. Only into a folder fedmeta benchmark wrote (its journal says so, or it holds a benchmark's results
    from before journals); everything is computed before the first file is written. Returns the rewritten results."""
    out = Path(out).absolute()
    path = out / "results.json"
    outputs = Outputs(out, "benchmark")
    # A folder (not a link or a file) that fedmeta benchmark claimed, or one no command claimed (a benchmark from
    # before journals: its results.json is checked below); another command's folder is refused.
    owner = outputs.folder_owner() if out.is_dir() and not out.is_symlink() else None
    outputs.check_folder(resume=True, recognised=owner is None)
    if path.is_symlink():
        raise OutputRefused(f"{path}: is a symbolic link; --report-only reads and writes only plain files. Remove it.")
    if not path.is_file():
        raise FileNotFoundError(f"--out {out}: no results.json; --report-only rewrites the report of a finished "
                                "fedmeta benchmark (run it without --report-only first).")
    results = _read_results(path, needs=("preset", "method_order", "methods", "dice", "runs", "step_columns"))
    try:
        shots, order = [int(k) for k in results["preset"]["shots"]], list(results["method_order"])
        if not order or not shots:
            raise ValueError("no method or no k to report")
        # The file sorts its keys; the tables keep the methods' order (and their trainings' order).
        dice = {name: results["dice"][name] for name in order}
        keys = dict.fromkeys(results["methods"][name]["training"] for name in order)
        runs = {key: results["runs"][key] for key in keys if key in results["runs"]}
        columns = [c if c == AUTO else int(c) for c in results["step_columns"]]  # as step_columns gives them
        results.update(_analysis(dice, runs, shots, columns))
        files = _report_files(out, runs)
        results["files"] = {k: str(v) for k, v in files.items()}
        table = format_markdown(results)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, StopIteration) as err:
        raise ValueError(f"{path}: its contents are not a benchmark's results as this fedmeta version writes them "
                         f"({type(err).__name__}: {str(err)[:200]}); nothing was rewritten. Run the benchmark again "
                         "with this version (finished trainings are reused).") from None
    _write_report(results, files, table)
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
             seeds_list, runs, dice, oracle, load_at_start) -> dict[str, Any]:
    """Everything results.json holds (but the total time and the file names, which the caller adds)."""
    import torch

    columns = step_columns(spec)
    analysis = _analysis({name: {str(seed): d for seed, d in by_seed.items()} for name, by_seed in dice.items()},
                         runs, spec["shots"], columns)
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
                "variant": METHODS_BY_NAME[name].variant if METHODS_BY_NAME[name].adapts else None,
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
        "summary": analysis["summary"],
        "step_columns": [str(c) for c in columns],  # "auto" first in the tables when present
        "goal": analysis["goal"],
        "above_oracle": analysis["above_oracle"],
        # per seed and new site: the oracle's Adam steps, the step kept, why it stopped, its validation patients
        "oracle": {str(seed): by_site for seed, by_site in oracle.items() if by_site},
        "time_to_accuracy": analysis["time_to_accuracy"],
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


def _load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


__all__ = [
    "METHODS",
    "goal_check",
    "load_benchmark_preset",
    "method_configs",
    "register",
    "run_benchmark",
    "summarise",
]
