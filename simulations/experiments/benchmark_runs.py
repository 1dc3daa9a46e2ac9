"""One seed of the benchmark: train a method's initialisation (or reuse a finished run of it), in worker processes
when asked, and score every method on the new sites."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from fedmeta.common.jsonio import write_json
from fedmeta.common.outputs import write_atomically
from fedmeta.common.protocol import (
    DATA_DIR_KEY, QUERY_LOSS_AFTER, ROLE_HELDOUT, ROLE_KEY, SITE_ID_KEY, dice_mean_key,
)
from fedmeta.common.read_limits import ReadLimits
from fedmeta.common.workers import end_with_parent
from fedmeta.server.metrics import METRICS_NAME, read_metrics
from fedmeta.simulations.experiments.benchmark_preset import (
    AUTO, GOAL_SHOTS, GOAL_STEPS, INTENSITY, METHODS_BY_NAME, ORACLE, step_columns,
)

# torch and the fedmeta modules that load torch or Flower (data, model, checkpoint, adaptation, the in-process
# engine, centralised, oracle) are imported inside the functions that use them: `fedmeta benchmark --help` does
# not wait seconds for them.


def _train_args(key: str, base, seed: int, out: Path, federation_dir: Path, train_infos, eval_infos, spec, quiet: bool):
    """``_train``'s arguments for one method and seed."""
    config = base.replace(seed=seed, federation_dir=str(federation_dir), out_dir=str(out / "runs" / f"seed-{seed}" / key))
    return (key, config, federation_dir, train_infos, quiet, eval_infos, spec["curve-every"], spec["eval-max-images"])


def _in_processes(jobs: int, function, arguments: list[tuple], quiet: bool = True, what: str = "jobs") -> list:
    """``[function(*a) for a in arguments]`` in ``jobs`` spawned processes, each with this process's torch
    thread count; results in the order given. A failure in one job is raised here. Unless ``quiet``, this
    process says how many of ``what`` have finished whenever no process has printed for HEARTBEAT_S
    (while the workers start, import torch and read their sites, none of them can)."""
    import torch

    global _shared_last_line
    context = multiprocessing.get_context("spawn")
    _shared_last_line = context.Value("d", _last_line[0])  # one clock of the last line, for every process
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(arguments)) or 1, mp_context=context,
                               initializer=_worker_init, initargs=(torch.get_num_threads(), _shared_last_line))
    try:
        futures = [pool.submit(function, *args) for args in arguments]
        workers = min(jobs, len(arguments))
        with progress(quiet, lambda: f"{sum(f.done() for f in futures)} of {len(futures)} {what} finished "
                                     f"({workers} process{'es' if workers > 1 else ''})"):
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
    finally:
        _shared_last_line = None
    pool.shutdown()
    return results


def _worker_init(threads: int, last_line=None) -> None:
    """A worker's set-up: its torch threads, and ``last_line``, the clock of the last line any process printed."""
    import torch

    global _shared_last_line
    end_with_parent()  # a benchmark killed with SIGKILL (no handler runs) takes its 500 MB workers with it
    torch.set_num_threads(threads)
    _shared_last_line = last_line


def _train(key: str, config, federation_dir: Path, train_infos, quiet: bool, eval_infos=(), curve_every: int = 0,
           eval_max_images: int = 0):
    """Trains one method for one seed (or reuses a finished run of the same config); (run info, Initialisation).

    Federated runs with ``curve_every`` > 0 also let the new sites (``eval_infos``, held-out nodes that
    never train) adapt θ every ``curve_every`` rounds during training, at k = GOAL_SHOTS and
    GOAL_STEPS steps: the learning curve that time-to-accuracy is read from. Evaluation reads θ and
    never moves it, so the trajectory is the one a run without it takes.
    """
    from fedmeta.common.adaptation import load_initialisation
    from fedmeta.common.checkpoint import CHECKPOINT_NAME, load_checkpoint, trajectory_hash

    out_dir = Path(config.out_dir)
    path = out_dir / CHECKPOINT_NAME
    info_path = out_dir / "run.json"
    # A finished run is reused only when it was trained on the same sites of the same federation
    # (the config hash leaves out where the data lies) by a run of the same shape.
    trained_on = {"federation": str(Path(federation_dir).resolve()), "train_sites": sorted(i.name for i in train_infos),
                  # the learning curve is part of what a run left: reuse one only if it was recorded alike
                  "curve": {"every": curve_every, "sites": sorted(i.name for i in eval_infos),
                            "eval_max_images": eval_max_images} if curve_every > 0 else None}
    reused, continued_from, previous, why = False, 0, {}, ""
    if path.exists() and info_path.exists():
        checkpoint = load_checkpoint(path)
        previous, why = _run_info(info_path)
        same = checkpoint.config_hash == trajectory_hash(config) and previous.get("trained_on") == trained_on
        reused = same and checkpoint.round == config.num_rounds and previous.get("finished", True) is not False
        # A shorter run of the same trajectory (finished under a smaller num-rounds, or killed part way) is
        # continued from its checkpoint rather than trained again: num-rounds is not in the trajectory hash
        # and a resumed run is bitwise the uninterrupted one (tests/simulations/test_inprocess.py), so a
        # 400-round budget after a 240-round benchmark costs 160 rounds. Only with its metrics for every round
        # up to the checkpoint, which the learning curve is read from. A run killed after its last round's
        # checkpoint but before its run.json is continued by no rounds. The pooled bound is no federated run
        # and has nothing to resume.
        if same and not reused and not key.startswith("pooled-"):
            if 0 < checkpoint.round <= config.num_rounds and _rounds_logged(out_dir / METRICS_NAME, checkpoint.round):
                continued_from = checkpoint.round
            elif checkpoint.round <= config.num_rounds:
                why = f"its {METRICS_NAME} does not cover rounds 1-{checkpoint.round} of its checkpoint"
            else:  # a checkpoint holds θ at its last round only
                why = f"its checkpoint is at round {checkpoint.round}, past num-rounds {config.num_rounds}"
        elif not same and not why:
            why = "its checkpoint was trained under another run config, federation or curve"
        if why and not reused and not continued_from:
            _say(quiet, f"[seed {config.seed}] {key}: training from round 0 again: {why} ({out_dir})")
    if reused:
        info = previous
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not continued_from:
            path.unlink(missing_ok=True)
        # Written before training so that a benchmark killed part way knows what its checkpoint was
        # trained on when it is run again; "seconds" counts every stretch of training that led to the
        # checkpoint (a killed stretch's time is lost with it).
        earlier = _seconds(previous.get("seconds")) if continued_from else 0.0
        _write_run_info(info_path, {"trained_on": trained_on, "seconds": earlier, "finished": False})
        began = time.perf_counter()
        with progress(quiet, lambda: f"[seed {config.seed}] {key}: training, round "
                                     f"{_rounds_done(out_dir / METRICS_NAME)}/{config.num_rounds}"
                                     + (f" (continued from round {continued_from})" if continued_from else "")):
            info = _train_run(key, config.replace(resume=bool(continued_from)), path, out_dir, federation_dir,
                              train_infos, eval_infos, curve_every, eval_max_images)
        info["seconds"] = earlier + time.perf_counter() - began
        info["trained_on"] = trained_on
        if continued_from:
            info["continued_from_round"] = continued_from
        _write_run_info(info_path, info)
    init, _ = load_initialisation(path, key)
    loss = info.get("final_query_loss_after")
    done = "reused" if reused else f"continued from round {continued_from}" if continued_from else "trained"
    _say(quiet, f"[seed {config.seed}] {key:14s} {done} in {_seconds(info.get('seconds')):.0f} s"
                + (f", final query loss {loss:.4f}" if loss is not None else ""))
    return {**info, "reused": reused, "checkpoint": str(path)}, init


def _run_info(path: Path) -> tuple[dict[str, Any], str]:
    """A training run's run.json, and why it cannot be used ("" when it can): damaged, it is as if absent."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return {}, f"{path} is unreadable ({type(err).__name__})"
    return (info, "") if isinstance(info, dict) else ({}, f"{path} holds {type(info).__name__}, not a run's record")


def _seconds(value: Any) -> float:
    """A recorded training time in seconds, or 0 where run.json holds no number."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else 0.0


def _write_run_info(path: Path, info: dict[str, Any]) -> None:
    """run.json written beside its name and renamed (the report's idiom): a benchmark killed while writing it
    leaves the old one."""
    write_atomically(path, lambda tmp: write_json(tmp, info))


def _rounds_logged(metrics_path: Path, rounds: int) -> bool:
    """Whether ``metrics_path`` records every training round from 1 to ``rounds``."""
    try:
        logged = {int(r["round"]) for r in read_metrics(metrics_path) if "sites_answered" in r}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return set(range(1, rounds + 1)) <= logged


def _train_run(key: str, config, path: Path, out_dir: Path, federation_dir: Path, train_infos, eval_infos,
               curve_every: int, eval_max_images: int) -> dict[str, Any]:
    """Trains one method for one seed into ``path``; the run's info (without its time)."""
    from fedmeta.common.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, trajectory_hash

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
    return info


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
    every = int(config.eval_every)
    for record in records:
        sent += per_site_round * int(record.get("sites_answered", 0))
        summary = record.get("heldout", {}).get("summary", {})
        done = int(record.get("round", 0))
        # Every `every` rounds and at the last: a run continued to more rounds also kept the points its shorter
        # run took at its own last round, which a run of the longer budget never took.
        if key in summary and (every <= 0 or done % every == 0 or done == config.num_rounds):
            curve.append({"round": done, "dice": float(summary[key]), "bytes": sent})
    return curve


def _evaluate_seed_from_files(names, inits, any_config, spec, eval_infos, seed: int,
                              quiet: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """``_evaluate_seed`` in a worker process: the new sites are read there rather than shipped to it."""
    from fedmeta.common.data import SiteDataset

    sites = [SiteDataset.load(info.folder(), any_config.data_config(limits=ReadLimits.from_environment())) for info in eval_infos]
    return _evaluate_seed(names, inits, any_config, spec, sites, seed, quiet)


def _evaluate_seed(names, inits, any_config, spec, sites, seed: int, quiet: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Dice per method, site, k and step column; the oracle's training record per site) for one seed.

    Every method adapts on the same slices and is scored on the same patients. The step columns are the
    preset's fixed counts and, with ``auto-steps``, "auto" (the count chosen from the support slices
    alone). A row that does not adapt (FedAvg as is, the oracle, the intensity baseline) has the same
    summary in every column.
    """
    from fedmeta.common.adaptation import Initialisation, score_site
    from fedmeta.common.model import build_model, initial_params, seeded_model

    model = build_model(any_config.model_config())
    columns = step_columns(spec)
    splits: dict = {}
    out: dict[str, Any] = {}
    oracle_fits: dict[str, Any] = {}
    began = time.perf_counter()
    with progress(quiet, f"[seed {seed}] evaluating") as beat:
        for name in names:
            method = METHODS_BY_NAME[name]
            if method.training is None:
                init = Initialisation(name, initial_params(seeded_model(any_config.model_config(), seed)), any_config.inner_lr)
            elif method.training not in (ORACLE, INTENSITY):
                init = inits[method.training]
            out[name] = {}
            for site in sites:
                beat.status = f"[seed {seed}] evaluating {name} on {site.name}"
                if method.training == INTENSITY:
                    curve = _intensity_curve(site, spec, seed, any_config.num_classes)
                else:
                    if method.training == ORACLE:  # its own model per site, trained on that site's support patients
                        fit = _fit_oracle(site, any_config, spec, seed, quiet, beat)
                        init, oracle_fits[site.name] = fit.init, fit.record()
                    curve = score_site(model, init, site, shots=spec["shots"], steps=columns if method.adapts else [0],
                                       seed=seed, num_classes=any_config.num_classes, max_images=spec["eval-max-images"],
                                       batch_size=any_config.eval_batch_size, splits=splits,
                                       auto_max_steps=spec["auto-max-steps"], variant=method.variant,
                                       # the rule not taken, scored where a choice between rules is made
                                       one_standard_error=spec["validation-sites"] > 0)
                if not method.adapts:  # the model as is: the same Dice whatever the step budget
                    curve = {k: {s: by_steps[0] for s in columns} for k, by_steps in curve.items()}
                out[name][site.name] = {str(k): {str(s): v for s, v in by_steps.items()} for k, by_steps in curve.items()}
            chosen = [cell["chosen_steps"] for by_k in out[name].values() for by_steps in by_k.values()
                      for cell in [by_steps.get(AUTO, {})] if "chosen_steps" in cell]
            _say(quiet, f"[seed {seed}] evaluated {name} on {len(sites)} site(s) ({time.perf_counter() - began:.0f} s so far)"
                        + (f"; auto chose {sum(chosen) / len(chosen):.1f} steps on average" if chosen else ""))
    _say(quiet, f"[seed {seed}] evaluated {len(names)} methods on {len(sites)} site(s) in {time.perf_counter() - began:.0f} s")
    return out, oracle_fits


def _fit_oracle(site, config, spec, seed: int, quiet: bool, beat):
    """The oracle of one site, its validation scorings shown on the heartbeat and its end said in one line."""
    from fedmeta.simulations.experiments.oracle import ONE_SUPPORT_PATIENT, fit_oracle  # torch: not for `fedmeta --help`

    def show(line: str) -> None:
        beat.status = f"[seed {seed}] {line}"

    fit = fit_oracle(site, config, seed=seed, max_steps=spec["oracle-steps"], eval_every=spec["oracle-eval-every"],
                     patience=spec["oracle-patience"], progress=show)
    how = ("one support patient: nothing to validate on, trained to the cap" if fit.stopped == ONE_SUPPORT_PATIENT
           else f"{fit.stopped} at step {fit.steps}, kept step {fit.best_step} (validation Dice {fit.validation_dice:.3f} "
                f"on {len(fit.validation_patients)} patient(s))")
    _say(quiet, f"[seed {seed}] oracle {site.name}: {fit.steps} of at most {fit.max_steps} Adam steps; {how}")
    return fit


def _intensity_curve(site, spec, seed: int, num_classes: int) -> dict[int, dict[int, dict[str, Any]]]:
    """The intensity baseline's summary per k (``{k: {0: summary}}``, as ``score_site`` gives a row that does not adapt)."""
    from fedmeta.common.intensity_baseline import score_intensity_baseline  # torch: not for `fedmeta --help`
    from fedmeta.common.metrics import foreground_classes

    classes = foreground_classes(site.label_names, num_classes, site.labelled_classes)
    return {k: {0: score_intensity_baseline(site, k, seed, num_classes, classes, max_images=spec["eval-max-images"])}
            for k in spec["shots"]}


# --------------------------------------------------------------------------------------------------
# progress: a line at least every HEARTBEAT_S seconds in every phase, in every process

HEARTBEAT_S = 8.0
_last_line = [time.monotonic()]  # when this process last printed a line (time.monotonic: one clock for every process)
_shared_last_line = None  # with worker processes: a multiprocessing.Value, when any of them last printed a line


class progress:  # noqa: N801 - used as a context manager, like open()
    """While the block runs, prints ``status`` (a string, or a callable giving one) with the time elapsed
    whenever this process has printed nothing for HEARTBEAT_S seconds; ``status`` may change as the block
    goes. Quiet: nothing, and no thread."""

    def __init__(self, quiet: bool, status) -> None:
        self.quiet, self.status = quiet, status
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "progress":
        if not self.quiet:
            self._began = time.monotonic()
            self._thread = threading.Thread(target=self._beat, name="benchmark-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def _beat(self) -> None:
        while not self._done.wait(0.5):
            shared = _shared_last_line.value if _shared_last_line is not None else 0.0
            if time.monotonic() - max(_last_line[0], shared) >= HEARTBEAT_S:
                try:
                    status = self.status() if callable(self.status) else self.status
                except Exception as err:  # a progress line must never end the benchmark
                    status = f"(progress unavailable: {err})"
                _say(False, f"{status} ({time.monotonic() - self._began:.0f} s)")


def _rounds_done(metrics_path: Path) -> int:
    """Rounds a running federation has finished: its metrics.jsonl lines that record a training round."""
    try:
        with open(metrics_path, encoding="utf-8") as lines:
            return sum(1 for line in lines if '"sites_answered"' in line)
    except OSError:
        return 0


def _say(quiet: bool, line: str) -> None:
    if not quiet:
        print(line, flush=True)
        _last_line[0] = time.monotonic()
        if _shared_last_line is not None:
            _shared_last_line.value = _last_line[0]
