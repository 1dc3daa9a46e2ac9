"""`fedmeta simulate`: meta-train on the synthetic federation, compare with FedAvg and a random init.

Steps: generate (or reuse) the synthetic federation; run federated meta-training with fedmeta's
ServerApp and ClientApp on Flower's Simulation Engine (``--engine ray``) or the in-process engine;
run a FedAvg-trained baseline with the same budget; adapt all initialisations on the held-out sites
and write checkpoint.pt, metrics.jsonl, results.json, report.md and dice_vs_steps.png to ``--out``.
Progress comes from the server's metrics.jsonl, so both engines print the same lines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fedmeta.common.jsonio import write_json
from fedmeta.common.progress import Heartbeat
from fedmeta.common.protocol import ALGORITHMS, FEDAVG, QUERY_LOSS_AFTER, dice_mean_key
from fedmeta.simulations.engines.processes import TreeMemorySampler
from fedmeta.simulations.experiments.budget import fedavg_epochs_for_budget, local_steps_per_round
from fedmeta.simulations.experiments.presets import load_preset, parse_sets


ENGINES = ("ray", "inprocess")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="meta-train on the synthetic federation and report new-hospital adaptation",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--preset", default="default",
                        help="smoke | default | protocols | path to a TOML file of run-config overrides (default: default)")
    parser.add_argument("--algorithm", help=" | ".join(ALGORITHMS))
    parser.add_argument("--rounds", type=int, help="federated rounds (run config num-rounds)")
    parser.add_argument("--sites", type=int, help="training sites sampled per round (sites-per-round; 0 = all)")
    parser.add_argument("--engine", choices=ENGINES, default=None,
                        help="Flower's Ray simulation (default) or in-process (the default with --attack)")
    parser.add_argument("--out", type=Path, help="output folder (default: runs/simulate-<preset>-<algorithm> on Ray, "
                                                 "runs/simulate-<preset>-<algorithm>-inprocess in process)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier fedmeta simulate run in --out (never a folder simulate did not write)")
    parser.add_argument("--seed", type=int, help="training seed (run config seed)")
    parser.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    parser.add_argument("--federation-dir", type=Path,
                        help="where the synthetic federation is generated/cached (default: ~/.cache/fedmeta); a folder "
                             "with a manifest.json (a generated federation, or `fedmeta plan --heldout`'s plan folder "
                             "over your own sites) is used as it is")
    parser.add_argument("--no-baseline", action="store_true", help="skip the FedAvg baseline run")
    parser.add_argument("--oracle-steps", type=int, default=None,
                        help="training steps of each held-out site's oracle, the ceiling in the report "
                             "(default: the preset's, 300; 0 = no oracle)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve the ServerApp's Prometheus metrics on this port during the run(s) "
                             "(run config metrics-port; http://127.0.0.1:PORT/metrics)")
    parser.add_argument("--attack", metavar="KIND[:F]",
                        help="simulated adversarial site(s): scale[:F] (x F, default 1000), signflip[:F] (x -F, "
                             "default 1), noise[:S] (N(0, S^2) instead of the gradient); in-process engine only")
    parser.add_argument("--attack-sites", type=int, default=1,
                        help="how many training sites attack (the first ones in site order; default 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other run-config override, e.g. --set inner-lr=0.1 (repeatable)")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    try:
        results = simulate(
            preset=args.preset, algorithm=args.algorithm, rounds=args.rounds, sites=args.sites,
            engine=args.engine or ("inprocess" if args.attack else "ray"), out=args.out, seed=args.seed, resume=args.resume,
            federation_root=args.federation_dir, baseline=not args.no_baseline, overwrite=args.overwrite,
            extra={**parse_sets(args.set), **({"metrics-port": args.metrics_port} if args.metrics_port else {})},
            oracle_steps=args.oracle_steps, attack=args.attack, attack_sites=args.attack_sites,
        )
    except SimulationError as err:
        print(f"fedmeta simulate: error: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"fedmeta simulate: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"report: {results['report']}")
    return 0


def default_out(preset: str, algorithm: str, engine: str) -> Path:
    """``runs/simulate-<preset>-<algorithm>`` for Ray, with ``-inprocess`` appended for the in-process engine: the
    two engines' runs of one preset never land in one folder."""
    return Path("runs") / (f"simulate-{Path(preset).stem}-{algorithm}" + ("" if engine == "ray" else f"-{engine}"))


def _plan_problem(federation: Path, manifest, config, preset) -> str | None:
    """Why a run may not train on a `fedmeta plan` folder's sites with this config, or None: the run config must be
    the plan's (its plan-sha256 the SHA-256 of plan.json, its planned keys the plan's values — a hand-edited
    run-config.toml could stack channels in another order than the plan checked), and the manifest the one that
    plan wrote (`plan --overwrite` without --heldout leaves no manifest of another plan behind, but a copy might)."""
    import hashlib
    import json

    plan_file = federation / "plan.json"
    if not plan_file.is_file():
        return None
    content = plan_file.read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    fix = f"Fix: pass --preset {federation / 'run-config.toml'} (as fedmeta plan wrote it), or re-run fedmeta plan."
    if config.plan_sha256 != digest:
        return (f"--federation-dir {federation} holds a plan (plan.json, SHA-256 {digest[:12]}...), but the run config "
                f"({preset}) carries plan-sha256={config.plan_sha256[:12] or '(none)'!r}: this run would read the sites "
                f"with another spacing, window or channel order than their plan. {fix}")
    try:
        planned = json.loads(content)["run-config"]
    except (ValueError, KeyError, TypeError):
        return f"{plan_file}: not a plan fedmeta plan wrote (no 'run-config'). Fix: re-run fedmeta plan."
    changed = sorted(key for key, value in planned.items() if getattr(config, key.replace("-", "_"), value) != value)
    if changed:
        return (f"the run config ({preset}) changes {', '.join(changed)} from the plan in {plan_file} but keeps its "
                f"plan-sha256: a run must train under the plan it names. {fix}")
    from fedmeta.common.synth import SITES_MANIFEST_KIND, sites_digest

    heldout = [info.path.name for info in manifest.heldout_sites]
    if manifest.generator_version == SITES_MANIFEST_KIND and manifest.cache_key != sites_digest(content, heldout):
        return (f"{federation / 'manifest.json'} was not written with this plan.json (its digest differs): the sites "
                "it lists are another plan's. Fix: re-run fedmeta plan --sites ... --heldout ... --out "
                f"{federation} --overwrite.")
    return None


class SimulationError(RuntimeError):
    """A run finished but not as it should (rounds missing, every reply dropped, ...)."""


def simulate(
    *,
    preset: str = "default",
    algorithm: str | None = None,
    rounds: int | None = None,
    sites: int | None = None,
    engine: str = "ray",
    out: Path | None = None,
    seed: int | None = None,
    resume: bool = False,
    federation_root: Path | None = None,
    baseline: bool = True,
    extra: dict[str, Any] | None = None,
    oracle_steps: int | None = None,
    quiet: bool = False,
    attack: str | None = None,
    attack_sites: int = 1,
    overwrite: bool = False,
) -> dict[str, Any]:
    """The whole job; returns what results.json holds. Raises on any failure.

    ``out`` (default :func:`default_out`, one folder per engine) must be new, empty, or an earlier simulate
    run's, which is replaced only with ``overwrite`` and continued with ``resume`` (``fedmeta.common.outputs``).

    ``attack`` (``fedmeta.simulations.attacks``): the first ``attack_sites`` training sites send
    poisoned replies, in the meta run and the FedAvg baseline alike (in-process engine only).
    """
    from fedmeta.common.config import RunConfig, memory_problem
    from fedmeta.common.synth import cached_federation, load_manifest

    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: choose one of {', '.join(ENGINES)}.")
    if oracle_steps is not None and oracle_steps < 0:
        raise ValueError(f"--oracle-steps {oracle_steps}: must be >= 0 (0: no oracle).")
    if attack:
        from fedmeta.simulations.attacks import parse_attack

        parse_attack(attack)  # a bad spec fails before the federation is generated
        if engine != "inprocess":
            raise ValueError("--attack runs on the in-process engine (--engine inprocess): the adversarial "
                             "sites are a ClientApp wrapper no deployed site carries.")
    overrides, driver = load_preset(preset, algorithm)
    overrides.update(extra or {})
    if rounds is not None and rounds < 1:
        raise ValueError(f"--rounds {rounds}: a simulation trains at least one round; give --rounds 1 or more.")
    for key, value in (("algorithm", algorithm), ("num-rounds", rounds), ("sites-per-round", sites), ("seed", seed)):
        if value is not None:
            overrides[key] = value
    config = RunConfig.from_run_config(overrides)
    # Every site of a simulation runs on this machine: a round that cannot fit is refused before it is built.
    problem = memory_problem(config, f"--preset {preset}", fix="lower episodes-per-site, k-shot or q-query (--set "
                             "episodes-per-site=2 k-shot=5 q-query=5 are the defaults), or run on a larger machine.")
    if problem:
        raise ValueError(problem)
    out = Path(out or default_out(preset, config.algorithm, engine)).resolve()
    from fedmeta.common.outputs import Outputs

    run_folder = Outputs(out, "simulate")
    # A Ray run and an in-process run never share a folder silently: an earlier run is replaced on request only.
    # (A folder with a checkpoint and metrics but no journal is a run of a fedmeta from before the journal.)
    earlier = (out / "checkpoint.pt").is_file() and (out / "metrics.jsonl").is_file()
    run_folder.check_folder(overwrite=overwrite, resume=resume, recognised=earlier,
                            again="pass --overwrite to replace it or --resume to continue it")

    began = time.perf_counter()
    root = (federation_root or Path.home() / ".cache" / "fedmeta").resolve()
    if (root / "manifest.json").is_file():  # a federation as it is (`fedmeta plan --heldout` over sites' folders)
        federation = root
    else:
        with Heartbeat("simulate: federation", what=f"generating or reading {driver['federation']} under {root}",
                       quiet=quiet):
            federation = Path(cached_federation(root, driver["federation"], int(driver["federation-seed"])))
    manifest = load_manifest(federation)
    plan_problem = _plan_problem(federation, manifest, config, preset)
    if plan_problem:
        raise ValueError(plan_problem)
    num_sites = len(manifest.train_sites) + len(manifest.heldout_sites)
    # Settings no round could meet with this federation: refused before any engine starts, not after a
    # round that waits and then reports every reply dropped.
    training = len(manifest.train_sites)
    if config.sites_per_round > training:
        raise ValueError(f"sites-per-round={config.sites_per_round} (--sites): the federation has {training} training "
                         f"sites; choose 1..{training}, or 0 for all.")
    if config.min_sites > training:
        raise ValueError(f"min-sites={config.min_sites}: the federation has {training} training sites, so no round "
                         f"could update θ; choose 1..{training}.")
    adversary = None
    if attack:
        if not 1 <= attack_sites < len(manifest.train_sites):
            raise ValueError(f"--attack-sites {attack_sites}: choose 1..{len(manifest.train_sites) - 1}, so that at "
                             f"least one of the {len(manifest.train_sites)} training sites is honest.")
        adversary = (parse_attack(attack), attack_sites)  # the spec was checked before the federation was built
    federation_seconds = time.perf_counter() - began
    _say(quiet, f"federation: {federation} ({len(manifest.train_sites)} training, "
                f"{len(manifest.heldout_sites)} held-out sites; ready in {federation_seconds:.1f} s)")

    config = config.replace(out_dir=str(out), federation_dir=str(federation), resume=resume)
    run_folder.claim_folder(overwrite=overwrite, resume=resume, detail={"engine": engine, "preset": str(preset),
                                                                        "algorithm": config.algorithm},
                            recognised=earlier, again="pass --overwrite to replace it or --resume to continue it")
    # Each Ray run gets a private FLWR_HOME under one short temporary folder (Ray derives Unix socket
    # paths from it); the sampler sums the memory of every process of those runs and of this one.
    flwr_homes = Path(tempfile.mkdtemp(prefix="fedmeta-"))
    memory = TreeMemorySampler(flwr_homes)
    memory.__enter__()
    try:
        with contextlib.ExitStack() as stack:
            session = None
            if engine == "ray":
                from fedmeta.simulations.engines.flower_runtime import SimulationEngine

                # One SuperLink for the meta run and its baseline (each still gets its own Ray cluster).
                with Heartbeat("simulate: engine", what="starting Flower's SuperLink", quiet=quiet):
                    session = stack.enter_context(SimulationEngine(flwr_homes / "ray"))
            oracle_steps = driver["oracle-steps"] if oracle_steps is None else oracle_steps
            return _simulate_runs(config, session, num_sites, quiet, baseline, out, federation, preset, began,
                                  federation_seconds, memory, oracle_steps, adversary, done_with_engine=stack.close)
    finally:
        memory.__exit__(None, None, None)
        shutil.rmtree(flwr_homes, ignore_errors=True)


def _simulate_runs(config, session, num_sites, quiet, baseline, out, federation, preset, began, federation_seconds,
                   memory, oracle_steps, adversary=None, done_with_engine=lambda: None) -> dict[str, Any]:
    engine = "inprocess" if session is None else "ray"
    runs = {config.algorithm: _run(config, session, num_sites, quiet, adversary)}
    baseline_config = None
    if baseline and config.algorithm != FEDAVG:
        # FedAvg as FedOpt with server SGD at lr 1: the same rounds, sites and episodes, and local
        # epochs chosen so each site makes as many gradient steps as the meta-learner does; its new sites
        # fine-tune, as FedAvg + fine-tune's authors define it, whatever the meta-learner's sites do.
        baseline_config = config.replace(
            algorithm=FEDAVG, meta_optimizer="sgd", meta_lr=1.0, meta_momentum=0.0, eval_every=0, lstm_truncation=0,
            inner_steps=fedavg_epochs_for_budget(config), out_dir=str(out / "baseline-fedavg"),
            adapt_variant="fine-tune",
        )
        _say(quiet, "baseline: FedAvg with the same budget")
        runs["fedavg (baseline)"] = _run(baseline_config, session, num_sites, quiet, adversary)
    with Heartbeat("simulate: engine", what="stopping the SuperLink", quiet=quiet):
        done_with_engine()  # the SuperLink's processes stop here: the comparison needs none of them

    from fedmeta.common.adaptation import load_initialisation, random_initialisation
    from fedmeta.common.checkpoint import CHECKPOINT_NAME
    from fedmeta.common.step_selection import AUTO
    from fedmeta.simulations.experiments.comparison import (
        compare_initialisations, paired_margin, step_label, what_it_means, write_report,
    )

    inits = [load_initialisation(out / CHECKPOINT_NAME, f"meta-learned ({config.algorithm})")[0]]
    if baseline_config is not None:
        inits.append(load_initialisation(out / "baseline-fedavg" / CHECKPOINT_NAME, "FedAvg-trained")[0])
    inits.append(random_initialisation(config))
    k, steps = config.eval_k_shot, sorted(set(config.adaptation_steps))
    _say(quiet, f"comparing initialisations on the held-out sites (k = {k}, steps {', '.join(map(str, steps))} and "
                "auto: each site chooses its steps from its support slices)"
                + "".join(f"; {init.label} adapts with {init.variant} (its run config's adapt-variant)"
                          for init in inits if init.variant != "fine-tune"))
    # One call adapts every initialisation on every held-out site (and trains the oracles): no item to count here.
    what = (f"{len(inits)} initialisations adapting on the held-out sites"
            + (f", an oracle of {int(oracle_steps)} steps per site" if int(oracle_steps) > 0 else ""))
    with Heartbeat("simulate: comparison", what=what, quiet=quiet) as beat:
        comparison = compare_initialisations(federation, inits, config, k=k, steps=steps, seed=config.seed,
                                             oracle_steps=int(oracle_steps), auto=True)
        # Judged where a hospital would be: each initialisation at the step count its site chose (auto).
        margin = (paired_margin(comparison, inits[0].label, "FedAvg-trained", AUTO)
                  if baseline_config is not None else None)
        beat.update("writing report.md and the figures")
        report = write_report(out, comparison, runs,
                              title=f"fedmeta simulate: {Path(preset).stem} preset, {config.algorithm}", margin=margin)

    results = {
        "preset": preset,
        "engine": engine,
        "federation": str(federation),
        "run_config": config.to_run_config(),
        "runs": runs,
        "comparison": comparison,
        "margin_over_fedavg": margin,
        "attack": ({"attack": str(adversary[0]), "sites": adversary[1]} if adversary else None),
        "seconds_total": time.perf_counter() - began,
        "seconds_federation": federation_seconds,
        "peak_memory_mb": memory.peak_bytes / 2**20,  # PSS of the driver and every Flower/Ray process
        "report": str(report),
    }
    write_json(out / "results.json", results)
    for label, summary in comparison["summary"].items():
        _say(quiet, f"  {label:32s} Dice " + "  ".join(f"{step_label(s)}: {summary['mean'][s]:.3f}"
                                                         for s in comparison["steps"]))
    if margin is not None:
        ci = f" [{margin['ci'][0]:+.3f}, {margin['ci'][1]:+.3f}] (95 %, over patients)" if margin["ci"] else ""
        _say(quiet, f"  margin over FedAvg-trained at {step_label(margin['steps'])}: {margin['mean']:+.3f}{ci}; "
                    f"better for {margin['wins']}/{margin['patients']} held-out patients")
        _say(quiet, f"  what this means: {what_it_means(margin, comparison)}")
    _say(quiet, f"done in {results['seconds_total']:.1f} s, peak memory {results['peak_memory_mb']:.0f} MB (whole process tree)")
    return results


def _run(config, session, num_sites: int, quiet: bool, adversary=None) -> dict[str, Any]:
    """One federated run, on the Simulation Engine `session` or (None) in process; checks what it left on
    disk, returns its summary."""
    from fedmeta.common.checkpoint import CHECKPOINT_NAME, load_checkpoint
    from fedmeta.server.metrics import METRICS_NAME, read_metrics

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not config.resume:
        (out / METRICS_NAME).unlink(missing_ok=True)
    # Until the server's first round line the engine starts (Ray: the SuperLink, the cluster, the actors' imports)
    # and nothing else prints: the heartbeat speaks then, and between rounds longer than its period.
    with Heartbeat(f"[{config.algorithm}] training", what="starting the engine and the sites", quiet=quiet) as beat:
        printer = _ProgressPrinter(out / METRICS_NAME, config, quiet, beat)
        began = time.perf_counter()
        printer.start()
        try:
            if session is None:
                from fedmeta.simulations.engines.inprocess import run_inprocess, simulation_node_configs

                client_app = None
                if adversary is not None:
                    from fedmeta.simulations.attacks import adversarial_client_app

                    client_app = adversarial_client_app(adversary[0], set(range(adversary[1])))
                run_inprocess(config.to_run_config(), simulation_node_configs(num_sites), seed=config.seed,
                              client_app=client_app)
            else:
                from fedmeta.simulations.engines.flower_runtime import source_app_dir

                try:
                    app_dir = source_app_dir()
                except FileNotFoundError as err:
                    raise SimulationError(f"--engine ray: {err}") from None
                # Returns only for a completed run; anything else raises with the status and the log tail.
                session.run(app_dir, config.to_run_config(), num_supernodes=num_sites)
        finally:
            printer.stop()
    seconds = time.perf_counter() - began

    if not (out / CHECKPOINT_NAME).exists():
        raise SimulationError(f"the run wrote no {out / CHECKPOINT_NAME}; see the log above.")
    checkpoint = load_checkpoint(out / CHECKPOINT_NAME)
    metrics = read_metrics(out / METRICS_NAME)
    stopped = next((r["stopped"] for r in metrics if "stopped" in r), None)  # the privacy budget ran out
    if checkpoint.round != config.num_rounds and stopped is None:
        raise SimulationError(f"the run stopped after round {checkpoint.round} of {config.num_rounds}.")
    trained = [r for r in metrics if r.get("round", 0) > 0]
    if config.num_rounds and not any(r.get("updated") for r in trained):
        reasons = sorted({d["reason"] for r in trained for d in r.get("dropped", [])})
        raise SimulationError(f"no round updated θ: every site's reply was dropped ({'; '.join(reasons)[:800]}).")
    last = trained[-1]["train"] if trained and trained[-1].get("train") else {}
    privacy = None
    if config.dp != "none":
        spent = [r["privacy"]["epsilon"] for r in metrics if "privacy" in r]  # the server's own figure, not recomposed
        privacy = {"dp": config.dp, "epsilon": spent[-1] if spent else 0.0,
                   "delta": config.dp_delta, "noise_multiplier": config.dp_noise_multiplier,
                   "clip_norm": config.dp_clip_norm, "stopped": stopped}
    return {
        "privacy": privacy,
        "algorithm": config.algorithm,
        "rounds": checkpoint.round,
        "local_steps_per_site_round": local_steps_per_round(config),
        "adapt_variant": config.adapt_variant,
        "site_weighting": config.weighting,
        "seconds": seconds,
        "final_meta_loss": last.get(QUERY_LOSS_AFTER),
        "dropped_replies": checkpoint.counters.get("dropped_replies", 0),
        "skipped_rounds": checkpoint.counters.get("skipped_rounds", 0),
        "out_dir": str(out),
    }


class _ProgressPrinter:
    """Prints one line per round as the server appends it to metrics.jsonl (any engine, any process); each
    line resets ``beat``'s silence and names the round the run is in."""

    def __init__(self, path: Path, config, quiet: bool, beat: Heartbeat | None = None):
        self.path, self.config, self.quiet, self.beat = path, config, quiet, beat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._printed = 0

    def start(self) -> None:
        if not self.quiet:
            self._thread.start()

    def stop(self) -> None:
        if not self.quiet:
            self._stop.set()
            self._thread.join()
            self._poll()

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self._poll()

    def _poll(self) -> None:
        if not self.path.exists():
            return
        text = self.path.read_text()  # once: the server may append between two reads
        lines = text.splitlines()
        complete = lines if text.endswith("\n") else lines[:-1]
        if len(complete) < self._printed:  # a resumed run rewrote the file up to its checkpoint
            self._printed = len(complete)
        for line in complete[self._printed:]:
            record = json.loads(line)
            print(format_round(record, self.config), flush=True)
            if self.beat is not None:
                self.beat.touch()
                if "round" in record and record["round"] < self.config.num_rounds:
                    self.beat.update(f"in round {record['round'] + 1}/{self.config.num_rounds}")
                else:
                    self.beat.update("writing the checkpoint; the engine stops")
        self._printed = max(self._printed, len(complete))


def format_round(record: dict[str, Any], config) -> str:
    if "stopped" in record:  # the server stopped early and said why (the privacy budget)
        return f"[{config.algorithm}] stopped after round {record.get('after_round')}: {record['stopped']}"
    parts = [f"[{config.algorithm}] round {record['round']:>3}/{config.num_rounds}"]
    if "sites_sampled" in record:
        parts.append(f"sites {record['sites_answered']}/{record['sites_sampled']}")
        loss = record.get("train", {}).get(QUERY_LOSS_AFTER)
        parts.append(f"meta-loss {loss:.4f}" if loss is not None else "no update")
    heldout = record.get("heldout", {}).get("summary", {})
    if heldout:
        parts.append("held-out Dice " + ", ".join(
            f"{s} steps {heldout[dice_mean_key(s)]:.3f}" for s in config.adaptation_steps if dice_mean_key(s) in heldout))
    if "privacy" in record:
        parts.append(f"epsilon {record['privacy']['epsilon']:.2f}")
    if "seconds" in record:
        parts.append(f"{record['seconds']:.1f} s")
    return " | ".join(parts)


def _say(quiet: bool, line: str) -> None:
    if not quiet:
        print(line, flush=True)


__all__ = ["format_round", "load_preset", "register", "simulate"]
