"""The benchmark's summaries: statistics over seeds, the goal check, time to accuracy and the Markdown report
(the plots are in ``fedmeta.simulations.experiments.figures``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fedmeta.simulations.experiments.benchmark_preset import GOAL_MARGIN, GOAL_SHOTS, GOAL_STEPS, META_METHODS, ORACLE
from fedmeta.simulations.experiments.stats import CONFIDENCE, interval


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
