"""`fedmeta perf meta` (registered by fedmeta.simulations.perf.perf): time and peak memory of one site episode for each algorithm, side by side.

Every figure is a ratio measured in the same run against FOMAML, and FOMAML against the same
number of plain forward/backward passes (``inner_steps + 1`` of ``nn.Module`` autograd with
``torch.optim.SGD``), so a noisy machine moves numerator and denominator together.

Two tables: every case at the same inner steps (the setting's), and every case as the benchmark trains
it (``as_trained``: the inner steps and episodes per site-round of the first benchmark preset that trains
it), per episode and per site-round. The benchmark matches the local-step budget per site-round, so a
method with cheap episodes runs more of them: the site-round is the cost training pays.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated``; on CPU there is no allocator counter, so
each case runs once in a fresh child process and reports the growth of its peak resident set
(``VmHWM``, reset once model and data are in place) over what they already took.

The other families (fast-weights, prototypes, lstm-optimizer) run on their own networks (the same
UNet plus their parts) with the same episode; the learned optimiser's row also gives the size of its
state while adapting (h and c per adapted scalar) — training keeps every step's gates for the backward
pass on top, which the peak memory includes.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from fedmeta.common.jsonio import write_json
from fedmeta.common.progress import Heartbeat
from fedmeta.common.protocol import ALGORITHMS, FOMAML, LSTM_OPTIMIZER, MAML, PROTOTYPES

PLAIN = "plain-fwd-bwd"
CASES = (*ALGORITHMS, PLAIN)
# Where the as-trained table reads each case's training: the first of these benchmark presets with a
# [training.<case>] table (benchmark-anatomy: where the prototype learner is the recommended method).
AS_TRAINED_PRESETS = ("benchmark-anatomy", "benchmark-converged", "benchmark")
PROTOTYPES_TARGET = 2.5  # issue 27: the recommended method's time per episode, as trained, within 2.5x FOMAML's


def parse_cases(text: str) -> tuple[str, ...]:
    """``--cases fomaml,maml,prototypes``: the cases to measure, in CASES order; FOMAML is always among them."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CASES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--cases {text!r}: unknown case(s) {', '.join(unknown) or '(none given)'}; "
                                         f"choose among {', '.join(CASES)}, comma-separated.")
    if FOMAML not in names:
        raise argparse.ArgumentTypeError(f"--cases {text!r}: every ratio is to FOMAML, so fomaml must be among them.")
    return tuple(case for case in CASES if case in names)


@dataclass(frozen=True)
class BenchSetting:
    name: str
    spatial_dims: int
    image_size: tuple[int, ...]
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    k: int = 5
    q: int = 5
    inner_steps: int = 5
    inner_lr: float = 0.01


SETTINGS = {
    "2d": BenchSetting("2d (default model, 64x64)", 2, (64, 64), (16, 32, 64, 128), (2, 2, 2)),
    "3d": BenchSetting("3d (32^3 patches)", 3, (32, 32, 32), (8, 16, 32, 64), (2, 2, 2)),
}


def _learner(case: str) -> str:
    from fedmeta.common.algorithms import ALGORITHMS as REGISTRY  # loads torch: not for `fedmeta perf --help`

    return REGISTRY[case].learner if case in REGISTRY else "unet"


def _network(setting: BenchSetting, case: str, device: str, seed: int = 0):
    """The model and θ a case runs on: the UNet, or the UNet with the case's learner parts."""
    import torch

    from fedmeta.common.model import ModelConfig, build_model, initial_params

    torch.manual_seed(seed)
    config = ModelConfig(spatial_dims=setting.spatial_dims, channels=setting.channels, strides=setting.strides,
                         learner=_learner(case))
    model = build_model(config).to(device)
    return model, {n: p.to(device) for n, p in initial_params(model).items()}


def _setup(setting: BenchSetting, device: str, seed: int = 0, case: str = "fomaml"):
    import torch

    from fedmeta.common.losses import DiceCELoss, one_hot
    from fedmeta.common.model import ModelConfig

    model, params = _network(setting, case, device, seed)
    config = ModelConfig(spatial_dims=setting.spatial_dims, channels=setting.channels, strides=setting.strides)
    generator = torch.Generator().manual_seed(seed)

    def batch(n):
        x = torch.randn(n, 1, *setting.image_size, generator=generator).to(device)
        y = torch.randint(0, config.out_channels, (n, *setting.image_size), generator=generator)
        return x, one_hot(y, config.out_channels).to(device)

    episode = (*batch(setting.k), *batch(setting.q))
    return model, params, episode, DiceCELoss(config.out_channels)


def _one_run(case: str, setting: BenchSetting, model, params, episode, loss_fn):
    import torch

    from fedmeta.common.algorithms import ALGORITHMS as REGISTRY  # with torch, as meta_gradient below
    from fedmeta.common.meta import meta_gradient

    if case == PLAIN:
        # The reference cost: the same number of forward/backward passes, the ordinary way. A copy,
        # so the module's own weights (never read by meta_gradient) stay as they were.
        model = copy.deepcopy(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=setting.inner_lr)
        support_x, support_y, query_x, query_y = episode
        for step in range(setting.inner_steps + 1):
            x, y = (support_x, support_y) if step < setting.inner_steps else (query_x, query_y)
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            optimizer.step()
        return
    meta_gradient(
        model, params, [episode], algorithm=case, inner_steps=setting.inner_steps, inner_lr=setting.inner_lr,
        loss_fn=loss_fn, proximal_mu=0.01 if REGISTRY[case].proximal else 0.0,
    )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _peak_memory_in_child(case: str, setting: BenchSetting, device: str, queue) -> None:
    import torch

    from fedmeta.common.workers import end_with_parent

    end_with_parent()  # ends with a perf run killed with SIGKILL
    model, params, episode, loss_fn = _setup(setting, device, case=case)
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_peak_rss()
    _one_run(case, setting, model, params, episode, loss_fn)
    _sync(device)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _peak_rss() - base
    queue.put(max(int(peak), 0))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> int:
    """Resets the peak resident set to the current one (Linux) and returns it, in bytes.

    ``ru_maxrss`` cannot serve: it survives fork+exec, so a spawned child starts with its parent's
    peak. Writing 5 to ``/proc/self/clear_refs`` resets ``VmHWM``.
    """
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def _peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def peak_memory(case: str, setting: BenchSetting, device: str) -> int:
    """Peak memory of one episode of ``case``, in a fresh spawned process (bytes)."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_peak_memory_in_child, args=(case, setting, device, queue))
    process.start()
    try:
        peak = queue.get(timeout=1800)
    finally:
        process.join(timeout=60)
    if process.exitcode not in (0, None):
        raise RuntimeError(f"benchmark case {case!r} failed in its child process (exit {process.exitcode}).")
    return peak


def measure(setting: BenchSetting, device: str = "cpu", repeats: int = 5, cases=CASES,
            beat: Heartbeat | None = None, inner_steps: Mapping[str, int] | None = None) -> dict[str, dict]:
    """Returns case -> {seconds, peak_bytes, parameters} of one episode.

    Timing runs in this process, the cases interleaved round-robin, so a load that comes and goes
    on a shared machine touches every case alike; the median of ``repeats`` rounds is kept.
    ``beat``: says each warm-up, timed round and memory case as it ends (silent without).
    ``inner_steps``: a case's own inner steps (the as-trained table); the others run at the setting's.
    """
    beat = beat or Heartbeat("perf meta", quiet=True)
    name = setting.name.split(" ")[0]
    settings = {case: replace(setting, inner_steps=(inner_steps or {}).get(case, setting.inner_steps))
                for case in cases}
    _, _, episode, loss_fn = _setup(setting, device)
    networks = {case: _network(setting, case, device) for case in cases}
    for i, case in enumerate(cases, 1):  # warm-up: first-call allocations and lazy initialisation
        beat.update(f"warming up {case}")
        began = time.perf_counter()
        _one_run(case, settings[case], *networks[case], episode, loss_fn)
        beat.say(f"perf meta {name}: warmed up {case} ({i}/{len(cases)}) in {time.perf_counter() - began:.0f} s")
    beat.say(f"perf meta {name}: timing {repeats} round(s) of every case")
    times: dict[str, list[float]] = {case: [] for case in cases}
    for repeat in range(repeats):
        began = time.perf_counter()
        for case in cases:
            beat.update(f"timing {case}, round {repeat + 1}/{repeats}")
            _sync(device)
            start = time.perf_counter()
            _one_run(case, settings[case], *networks[case], episode, loss_fn)
            _sync(device)
            times[case].append(time.perf_counter() - start)
        beat.say(f"perf meta {name}: timed round {repeat + 1}/{repeats} in {time.perf_counter() - began:.0f} s")
    results = {}
    for i, case in enumerate(cases, 1):  # peak memory: one fresh process per case
        beat.update(f"peak memory of {case} in a child process")
        results[case] = {"seconds": statistics.median(times[case]),
                         "peak_bytes": peak_memory(case, settings[case], device),
                         "parameters": sum(p.numel() for p in networks[case][1].values())}
        beat.say(f"perf meta {name}: peak memory of {case} ({i}/{len(cases)}): "
                 f"{results[case]['peak_bytes'] / 2**20:.1f} MB")
    if LSTM_OPTIMIZER in results:
        from fedmeta.common.algorithms.lstm_optimizer import LSTM_PREFIX, lstm_state_numbers

        model, params = networks[LSTM_OPTIMIZER]
        adapted = sum(p.numel() for n, p in params.items() if not n.startswith(LSTM_PREFIX))
        results[LSTM_OPTIMIZER]["state_bytes"] = 4 * lstm_state_numbers(model, adapted)  # fp32 h and c
    return results


# Site rounds of several episodes: (episodes, inner steps). 2 x 1 is the default run config.
EPISODE_CASES = ((2, 1), (4, 1), (2, 3), (2, 5))


def measure_episodes(setting: BenchSetting, device: str = "cpu", repeats: int = 5,
                     cases=EPISODE_CASES, algorithms=("fomaml", "maml"), beat: Heartbeat | None = None) -> list[dict]:
    """A site's episodes one after the other (the loop) against all at once (torch.func.vmap), side by side.

    For each (episodes, inner steps) and algorithm: median seconds of both, their ratio, and how far
    the batched meta-gradient is from the loop's (relative L2 over every parameter: rounding only,
    tests/common/test_meta.py checks equality in float64). MAML's batched path is not in fedmeta's training
    (measured no faster); it is timed here, through the same vmapped episode with a second-order
    gradient, to keep that measurement. ``beat``: says each row as it ends (silent without).
    """
    from fedmeta.common.algorithms import ALGORITHMS as REGISTRY  # with torch, as meta_gradient below
    from fedmeta.common.meta import meta_gradient

    beat = beat or Heartbeat("perf episodes", quiet=True)
    model, params = _network(setting, "fomaml", device)
    loss_fn = _setup(setting, device)[3]
    rows = []
    for count, steps in cases:
        episodes = [_setup(setting, device, seed=seed)[2] for seed in range(1, count + 1)]
        for algorithm in algorithms:
            beat.update(f"{algorithm}, {count} episodes x {steps} inner steps, loop against vmap")

            def loop():
                return meta_gradient(model, params, episodes, algorithm=algorithm, inner_steps=steps,
                                     inner_lr=setting.inner_lr, loss_fn=loss_fn, batch_episodes=False)[0]

            def batched():
                if not REGISTRY[algorithm].second_order:  # FOMAML's batched path is fedmeta's own
                    return meta_gradient(model, params, episodes, algorithm=algorithm, inner_steps=steps,
                                         inner_lr=setting.inner_lr, loss_fn=loss_fn, batch_episodes=True)[0]
                return _maml_batched(model, params, episodes, steps, setting.inner_lr, loss_fn)

            reference, candidate = loop(), batched()  # warm-up, and the two results compared
            times: dict[str, list[float]] = {"loop": [], "vmap": []}
            for _ in range(repeats):
                for name, fn in (("loop", loop), ("vmap", batched)):
                    _sync(device)
                    start = time.perf_counter()
                    fn()
                    _sync(device)
                    times[name].append(time.perf_counter() - start)
            difference = sum(float(((candidate[n] - reference[n]) ** 2).sum()) for n in reference) ** 0.5
            size = sum(float((reference[n] ** 2).sum()) for n in reference) ** 0.5
            loop_s, vmap_s = statistics.median(times["loop"]), statistics.median(times["vmap"])
            rows.append({"algorithm": algorithm, "episodes": count, "inner_steps": steps, "loop_seconds": loop_s,
                         "vmap_seconds": vmap_s, "vmap_vs_loop": vmap_s / loop_s,
                         "relative_difference": difference / size if size else 0.0})
            beat.say(f"perf episodes: {algorithm}, {count} episodes x {steps} inner steps timed "
                     f"({len(rows)}/{len(cases) * len(algorithms)}): vmap / loop {vmap_s / loop_s:.2f}")
    return rows


def _maml_batched(model, params, episodes, steps, inner_lr, loss_fn):
    """MAML's meta-gradient with the episodes vmapped (timing only; see measure_episodes)."""
    import torch
    from torch.func import functional_call, grad, vmap

    def loss(p, x, y):
        return loss_fn(functional_call(model, p, (x,)), y)

    def episode(theta, support_x, support_y, query_x, query_y):
        def query_loss(start):
            adapted = start
            for _ in range(steps):
                g = grad(loss)(adapted, support_x, support_y)
                adapted = {n: adapted[n] - inner_lr * g[n] for n in adapted}
            return loss(adapted, query_x, query_y), adapted

        grads, adapted = grad(query_loss, has_aux=True)(theta)
        # The loop's statistics, from the same forward passes it makes (a fair race).
        with torch.no_grad():
            loss(theta, query_x, query_y)
            loss(theta, support_x, support_y)
            loss({n: v.detach() for n, v in adapted.items()}, support_x, support_y)
        return grads

    theta = {n: p.detach() for n, p in params.items()}
    stacked = [torch.stack([e[i] for e in episodes]) for i in range(4)]
    grads = vmap(episode, in_dims=(None, 0, 0, 0, 0))(theta, *stacked)
    return {n: grads[n].mean(0) for n in params}


def format_episodes(title: str, rows: list[dict]) -> str:
    lines = [f"## {title}", "", "| algorithm | episodes | inner steps | loop ms | vmap ms | vmap / loop | "
             "relative difference |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['algorithm']} | {r['episodes']} | {r['inner_steps']} | {r['loop_seconds'] * 1e3:.0f} | "
                     f"{r['vmap_seconds'] * 1e3:.0f} | {r['vmap_vs_loop']:.2f} | {r['relative_difference']:.1e} |")
    return "\n".join(lines)


def summarise(results: dict[str, dict]) -> dict[str, dict]:
    """Adds ratios: time and memory against FOMAML, and FOMAML's time against plain passes."""
    reference = results["fomaml"]
    table = {}
    for case, r in results.items():
        table[case] = {
            **r,
            "time_vs_fomaml": r["seconds"] / reference["seconds"],
            "memory_vs_fomaml": (r["peak_bytes"] / reference["peak_bytes"]) if reference["peak_bytes"] else float("nan"),
        }
    table["targets"] = {
        "maml_time_vs_fomaml": table[MAML]["time_vs_fomaml"] if MAML in table else float("nan"),
        "maml_target": 3.0,
        "fomaml_time_vs_plain": reference["seconds"] / results[PLAIN]["seconds"] if PLAIN in results else float("nan"),
        "fomaml_target": 1.3,
    }
    return table


def format_table(title: str, table: dict[str, dict]) -> str:
    lines = [f"## {title}", "", "| case | ms / episode | × FOMAML time | peak MB | × FOMAML memory | parameters |",
             "|---|---:|---:|---:|---:|---:|"]
    for case in CASES:
        if case not in table:
            continue
        r = table[case]
        lines.append(
            f"| {case} | {r['seconds'] * 1e3:.1f} | {r['time_vs_fomaml']:.2f} | {r['peak_bytes'] / 2**20:.1f} | "
            f"{r['memory_vs_fomaml']:.2f} | {r.get('parameters', 0):,} |"
        )
    t = table["targets"]
    if "state_bytes" in table.get(LSTM_OPTIMIZER, {}):
        lines += ["", f"lstm-optimizer state while adapting (h and c per adapted scalar, fp32): "
                      f"{table['lstm-optimizer']['state_bytes'] / 2**20:.1f} MB (training also keeps every "
                      "unrolled step's gates: in the peak memory)"]
    lines += [
        "",
        f"MAML / FOMAML time: {t['maml_time_vs_fomaml']:.2f} (target ≤ {t['maml_target']}); "
        f"FOMAML / plain forward-backward: {t['fomaml_time_vs_plain']:.2f} (target ≤ {t['fomaml_target']})",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class Training:
    """How the benchmark trains a case: inner steps per episode, episodes per site-round, and the preset saying so."""

    inner_steps: int
    episodes: int
    preset: str


def as_trained(cases=CASES, presets=AS_TRAINED_PRESETS) -> dict[str, Training]:
    """Each case's training from the first of ``presets`` with its [training.<case>] table, read through the
    benchmark's own RunConfig (so a table's missing key takes the preset's [run-config], then the default).

    The plain passes take FOMAML's (the reference they time); a case no preset trains is left out.
    """
    from fedmeta.simulations.experiments.benchmark_preset import METHODS, load_benchmark_preset, method_configs

    trained: dict[str, Training] = {}
    for preset in presets:
        spec = load_benchmark_preset(preset)
        wanted = [c for c in cases if c not in trained and c in spec["training"]]
        methods = [m.name for m in METHODS if m.training in wanted]
        for case, config in method_configs(spec, methods).items():
            trained[case] = Training(config.inner_steps, config.episodes_per_site, spec["name"])
    if PLAIN in cases and FOMAML in trained:
        trained[PLAIN] = trained[FOMAML]
    return {case: trained[case] for case in cases if case in trained}


def _round_cost(case: str, training: Training) -> tuple[int, int]:
    """(local gradient steps per site-round, episodes one backward pass holds) from the case's algorithm."""
    if case == PLAIN:
        return (training.inner_steps + 1) * training.episodes, 1
    from fedmeta.common.algorithms import ALGORITHMS as REGISTRY  # loads torch: not for `fedmeta perf --help`

    algorithm = REGISTRY[case]
    return algorithm.local_steps(training.inner_steps, training.episodes), algorithm.episodes_at_once(training.episodes)


def summarise_as_trained(results: dict[str, dict], trained: Mapping[str, Training]) -> dict[str, dict]:
    """Per episode and per site-round, each against FOMAML's as trained.

    A site-round is ``episodes`` episodes one after the other: ``episodes`` times the episode's time, and the
    episode's peak memory times the episodes one backward pass holds (one, unless the algorithm batches them).
    """
    rows = {}
    for case, r in results.items():
        local_steps, at_once = _round_cost(case, trained[case])
        rows[case] = {**r, **asdict(trained[case]), "local_steps": local_steps,
                      "round_seconds": r["seconds"] * trained[case].episodes,
                      "round_peak_bytes": r["peak_bytes"] * at_once}
    reference = rows[FOMAML]
    for row in rows.values():
        for key, ratio in (("seconds", "time_vs_fomaml"), ("round_seconds", "round_time_vs_fomaml"),
                           ("peak_bytes", "memory_vs_fomaml"), ("round_peak_bytes", "round_memory_vs_fomaml")):
            row[ratio] = row[key] / reference[key] if reference[key] else float("nan")
    rows["targets"] = {
        "prototypes_time_vs_fomaml": rows[PROTOTYPES]["time_vs_fomaml"] if PROTOTYPES in rows else float("nan"),
        "prototypes_target": PROTOTYPES_TARGET,
    }
    return rows


def format_as_trained(title: str, table: dict[str, dict]) -> str:
    lines = [f"## {title}", "",
             "| case | inner steps | episodes / site-round | local steps / site-round | ms / episode | "
             "× FOMAML time | peak MB | × FOMAML memory | ms / site-round | × FOMAML time | peak MB / site-round | "
             "× FOMAML memory | "
             "preset |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for case in CASES:
        if case not in table:
            continue
        r = table[case]
        lines.append(
            f"| {case} | {r['inner_steps']} | {r['episodes']} | {r['local_steps']} | {r['seconds'] * 1e3:.1f} | "
            f"{r['time_vs_fomaml']:.2f} | {r['peak_bytes'] / 2**20:.1f} | {r['memory_vs_fomaml']:.2f} | "
            f"{r['round_seconds'] * 1e3:.1f} | {r['round_time_vs_fomaml']:.2f} | {r['round_peak_bytes'] / 2**20:.1f} | "
            f"{r['round_memory_vs_fomaml']:.2f} | {r['preset']} |"
        )
    t = table["targets"]
    lines += ["", f"prototypes / FOMAML time per episode, as trained: {t['prototypes_time_vs_fomaml']:.2f} "
                  f"(target ≤ {t['prototypes_target']}); a site-round is its episodes one after the other, at the "
                  "matched local-step budget"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from fedmeta.common.devices import pick_device  # with torch: a perf run's --help stays light

    device = str(pick_device(args.device))
    cases = args.cases or CASES
    trained = as_trained(cases)
    report = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "load": os.getloadavg()[0], "settings": {}}
    sections = []
    for key in args.settings:
        setting = SETTINGS[key]
        print(f"perf meta {key}: {len(cases)} cases at {setting.inner_steps} inner steps, then {len(trained)} as the "
              f"benchmark trains them; {args.repeats} timed round(s) each, then each case's peak memory in a child "
              f"process ({device})", flush=True)
        with Heartbeat(f"perf meta {key}") as beat:
            table = summarise(measure(setting, device=device, repeats=args.repeats, cases=cases, beat=beat))
            trained_table = summarise_as_trained(measure(
                setting, device=device, repeats=args.repeats, cases=tuple(trained), beat=beat,
                inner_steps={case: t.inner_steps for case, t in trained.items()}), trained)
        report["settings"][key] = {"setting": asdict(setting), "results": table, "as_trained": trained_table}
        sections += [
            format_table(f"{setting.name}, k={setting.k} q={setting.q}, {setting.inner_steps} inner steps, {device}",
                         table),
            format_as_trained(f"{setting.name}, k={setting.k} q={setting.q}, as the benchmark trains each, {device}",
                              trained_table),
        ]
        print(sections[-2], sections[-1], sep="\n\n", end="\n\n", flush=True)
    report["load_after"] = os.getloadavg()[0]
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, report)
        heading = (f"# fedmeta perf meta ({device}, torch {report['torch']}, {report['threads']} threads, load "
                   f"{report['load']:.1f} before, {report['load_after']:.1f} after)")
        out.with_suffix(".md").write_text("\n\n".join([heading, *sections]) + "\n")
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    from fedmeta.simulations.cli import main

    sys.exit(main(["perf", "meta", *sys.argv[1:]]))
