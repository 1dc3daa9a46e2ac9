"""The benchmark's summaries: statistics over seeds, the goal check, the rows above the oracle, time to accuracy
and the Markdown report (the plots are in ``fedmeta.simulations.experiments.figures``).

Step columns are the preset's fixed counts and, when the preset asks for it, "auto" (the count each site
chooses from its k support slices alone): the main column, reported first. results.json from before the
auto column (no ``auto-steps`` in its preset, no oracle records) still reads.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fedmeta.simulations.experiments.benchmark_preset import (
    AUTO, GOAL_MARGIN, GOAL_SHOTS, GOAL_STEPS, INTENSITY, META_METHODS, METHODS, ORACLE, step_columns,
)
from fedmeta.simulations.experiments.stats import CONFIDENCE, interval

ORACLE_ROW = "oracle"


def time_to_accuracy(runs: dict[str, dict[int, dict[str, Any]]], target_key: str = "fedavg") -> dict[str, Any]:
    """Per method and seed: the first evaluated round (and the cumulative payload bytes up to it) at which the
    new sites' Dice after adaptation reaches the target, FedAvg + fine-tune's final value in the same seed;
    None if never. ``already_at_start``: reached at round 0, before any training (the untrained start's
    Dice, ``start_dice``, is at or above the target: that seed's target says nothing about training)."""
    out: dict[str, Any] = {}
    targets = {seed: run["curve"][-1]["dice"] for seed, run in runs.get(target_key, {}).items() if run.get("curve")}
    for key, by_seed in runs.items():
        rows = {}
        for seed, run in by_seed.items():
            curve, target = run.get("curve"), targets.get(seed)
            if not curve or target is None:
                continue
            hit = next((point for point in curve if point["dice"] >= target), None)
            start = curve[0]["dice"] if curve[0]["round"] == 0 else None
            rows[str(seed)] = {"target": target, "round": hit["round"] if hit else None,
                               "bytes": hit["bytes"] if hit else None, "final_dice": curve[-1]["dice"],
                               "start_dice": start, "already_at_start": bool(hit) and hit["round"] == 0}
        if rows:
            out[key] = rows
    return out


def summarise(dice: dict[str, dict[int, Any]], shots: list[int], steps: list[int | str]) -> dict[str, Any]:
    """Per method, k and step column: mean, std and t-interval over seeds of the site mean, and the worst
    site; at "auto" also the mean number of steps chosen (over seeds and sites, and per site)."""
    summary: dict[str, Any] = {}
    for name, by_seed in dice.items():
        summary[name] = {}
        seeds = sorted(by_seed, key=int)  # "10" after "9": seeds come as ints or as results.json's strings
        sites = sorted(next(iter(by_seed.values())))
        for k in shots:
            summary[name][str(k)] = {}
            for s in steps:
                cells = [[by_seed[seed][site][str(k)][str(s)] for site in sites] for seed in seeds]
                table = np.array([[cell["dice"] for cell in row] for row in cells])
                site_means_per_seed = table.mean(axis=1)  # [seeds]; Dice is never NaN
                per_site = table.mean(axis=0)  # [sites], averaged over seeds
                worst = int(np.argmin(per_site))
                ci = interval([float(v) for v in site_means_per_seed])
                entry = summary[name][str(k)][str(s)] = {
                    "mean": float(np.mean(site_means_per_seed)),
                    "std": float(np.std(site_means_per_seed, ddof=1)) if len(seeds) > 1 else 0.0,
                    "ci": list(ci) if ci else None,
                    "worst_site": sites[worst],
                    "worst_site_dice": float(per_site[worst]),
                    "per_site": {site: float(v) for site, v in zip(sites, per_site)},
                }
                if all("chosen_steps" in cell for row in cells for cell in row):
                    chosen = np.array([[cell["chosen_steps"] for cell in row] for row in cells], dtype=float)
                    entry["chosen_steps_mean"] = float(chosen.mean())
                    entry["chosen_steps_per_site"] = {site: float(v) for site, v in zip(sites, chosen.mean(axis=0))}
    return summary


def goal_check(summary: dict[str, Any], shots: list[int], steps: list[int | str], dice: dict | None = None) -> dict[str, Any]:
    """The claim at k = 5: a meta-learned initialisation beats FedAvg + fine-tune by ``GOAL_MARGIN`` Dice, in
    every seed; with each learner's fraction of the oracle ceiling. Judged at "auto" when the grid has it
    (each site chooses its steps from its support slices), else at ``GOAL_STEPS``; with "auto", the same
    check at ``GOAL_STEPS`` is kept beside it under ``fixed``.

    With ``dice`` (per method, seed, site), each row gets the paired margin per seed: methods share
    seeds, support slices and evaluation patients, so the per-seed difference is the fair measure
    of how often a method wins, which the seeds' spread of absolute Dice hides; their mean comes with
    a ``CONFIDENCE`` t-interval over seeds.
    """
    headline = AUTO if AUTO in steps else GOAL_STEPS
    if GOAL_SHOTS not in shots or headline not in steps:
        return {"checked": False, "reason": f"the grid lacks k = {GOAL_SHOTS} or {GOAL_STEPS} steps"}
    goal = {"checked": True, "k": GOAL_SHOTS, "steps": headline, "margin": GOAL_MARGIN, "confidence": CONFIDENCE,
            **_goal_at(summary, str(GOAL_SHOTS), str(headline), dice)}
    if headline == AUTO and GOAL_STEPS in steps:
        goal["fixed"] = {"steps": GOAL_STEPS, **_goal_at(summary, str(GOAL_SHOTS), str(GOAL_STEPS), dice)}
    return goal


def _goal_at(summary: dict[str, Any], k: str, s: str, dice: dict | None) -> dict[str, Any]:
    """goal_check's rows at one k and step column."""
    def cell(name: str) -> dict[str, Any]:
        return summary.get(name, {}).get(k, {}).get(s, {})

    fedavg_ft, oracle = cell("fedavg-ft").get("mean"), cell(ORACLE_ROW).get("mean")
    rows = {}
    # Every meta-learned row, a variant row (one θ adapted another way) beside its method.
    for name in [m.name for m in METHODS if m.training in META_METHODS and m.name in summary]:
        value = cell(name)["mean"]
        pooled = cell(f"pooled-{name}").get("mean")
        pooled = cell("pooled-fomaml").get("mean") if pooled is None else pooled
        row = {
            "dice": value,
            "margin_over_fedavg_ft": value - fedavg_ft if fedavg_ft is not None else None,
            "fraction_of_oracle": value / oracle if oracle else None,
            "fraction_of_pooled": value / pooled if pooled else None,
        }
        if "chosen_steps_mean" in cell(name):
            row["chosen_steps_mean"] = cell(name)["chosen_steps_mean"]
        if dice is not None and "fedavg-ft" in dice:
            paired = []
            for seed, sites in dice[name].items():
                other = dice["fedavg-ft"][seed]
                paired.append(float(np.mean([sites[site][k][s]["dice"] - other[site][k][s]["dice"] for site in sites])))
            row["paired_margin_per_seed"] = paired
            row["paired_margin_ci"] = interval(paired)
            row["beats_fedavg_ft_in_every_seed"] = bool(paired) and min(paired) >= GOAL_MARGIN
        rows[name] = row
    return {"fedavg_ft": fedavg_ft, "fedavg_ft_chosen_steps_mean": cell("fedavg-ft").get("chosen_steps_mean"),
            "oracle": oracle, "methods": rows,
            "met_by": [n for n, r in rows.items() if r.get("beats_fedavg_ft_in_every_seed")]}


def paired_rows(a: dict[str, Any], row_a: str, b: dict[str, Any], row_b: str) -> dict[str, Any]:
    """Row ``row_a`` of benchmark results ``a`` minus row ``row_b`` of ``b``, paired per seed (the mean over sites of
    each seed's difference), for every k and step column both hold: ``{k: {column: {mean, ci, per_seed}}}``.

    Two benchmarks pair only where their new sites adapted on the same slices and were scored on the same patients:
    the same federation and sites, the seeds both ran (a seed fixes the split), and in every cell the same patients
    and evaluation slices (what a preset fixes: eval-max-images, the federation). Otherwise a ValueError says what
    differs. ``seeds`` in the result: the seeds paired."""
    for results, row in ((a, row_a), (b, row_b)):
        if row not in results.get("dice", {}):
            rows = ", ".join(sorted(results.get("dice", {})))
            raise ValueError(f"no row {row!r} in that benchmark; its rows: {rows}.")
    for key in ("federation", "eval_sites"):
        if a.get(key) != b.get(key):
            raise ValueError(f"the two benchmarks differ in {key} ({a.get(key)!r} against {b.get(key)!r}): their rows "
                             "were not scored on the same patients and cannot be paired.")
    dice_a, dice_b = a["dice"][row_a], b["dice"][row_b]
    seeds = sorted(set(dice_a) & set(dice_b), key=int)
    if not seeds:
        raise ValueError(f"the two benchmarks share no seed ({sorted(dice_a)} against {sorted(dice_b)}): "
                         "nothing pairs.")
    out: dict[str, Any] = {"seeds": [int(s) for s in seeds]}
    shots = [str(k) for k in a["preset"]["shots"] if k in b["preset"]["shots"]]
    columns = [c for c in a["step_columns"] if c in b["step_columns"]]
    for k in shots:
        out[k] = {}
        for column in columns:
            per_seed = []
            for seed in seeds:
                differences = []
                for site, by_k in dice_a[seed].items():
                    cell_a, cell_b = by_k[k][column], dice_b[seed][site][k][column]
                    if (cell_a["patients"], cell_a["eval_slices"]) != (cell_b["patients"], cell_b["eval_slices"]):
                        raise ValueError(f"seed {seed}, {site}, k = {k}: scored on {cell_a['patients']} patients "
                                         f"({cell_a['eval_slices']} slices) against {cell_b['patients']} "
                                         f"({cell_b['eval_slices']}); the rows cannot be paired.")
                    differences.append(cell_a["dice"] - cell_b["dice"])
                per_seed.append(float(np.mean(differences)))
            ci = interval(per_seed)
            out[k][column] = {"mean": float(np.mean(per_seed)), "ci": list(ci) if ci else None, "per_seed": per_seed}
    return out


def format_paired(paired: dict[str, Any], label_a: str, label_b: str) -> str:
    lines = [f"{label_a} minus {label_b}, Dice, paired per seed (mean over sites; seeds "
             f"{', '.join(map(str, paired['seeds']))}), mean [95% interval]; per seed"]
    for k, by_column in paired.items():
        if k == "seeds":
            continue
        for column, cell in by_column.items():
            ci = f"[{_f(cell['ci'][0], '+.3f')}, {_f(cell['ci'][1], '+.3f')}]" if cell["ci"] else ""
            lines.append(f"  k = {k:>2}, {column:>4}: {_f(cell['mean'], '+.3f')} {ci}  "
                         + " ".join(_f(v, "+.3f") for v in cell["per_seed"]))
    return "\n".join(lines)


def format_goal(goal: dict[str, Any]) -> str:
    if not goal.get("checked"):
        return f"goal not checked: {goal.get('reason')}"
    lines = [f"goal at k = {goal['k']}, {_column_words(goal['steps'], goal['k'])}: beat FedAvg + fine-tune "
             f"({_f(goal['fedavg_ft'])}{_chosen(goal.get('fedavg_ft_chosen_steps_mean'), ', ')}) by >= {goal['margin']} "
             f"Dice in every seed; oracle ceiling {_f(goal['oracle'])}"]
    lines += _goal_rows(goal)
    fixed = goal.get("fixed")
    if fixed:
        lines += ["", f"at {fixed['steps']} steps, a fixed count (for comparison): FedAvg + fine-tune "
                      f"{_f(fixed['fedavg_ft'])}; oracle {_f(fixed['oracle'])}"]
        lines += _goal_rows(fixed)
    return "\n".join(lines)


def _goal_rows(goal: dict[str, Any]) -> list[str]:
    lines = []
    for name, row in goal["methods"].items():
        ci = row.get("paired_margin_ci")
        lines.append(f"  {name:8s} Dice {row['dice']:.3f}{_chosen(row.get('chosen_steps_mean'))}  "
                     f"margin {_f(row['margin_over_fedavg_ft'], '+.3f')}"
                     + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")
                     + f"  of oracle {_fraction(row['fraction_of_oracle'])}  "
                     + (f"per-seed margins {' '.join(_f(m, '+.3f') for m in row['paired_margin_per_seed'])}  "
                        if "paired_margin_per_seed" in row else "")
                     + ("MET" if name in goal["met_by"] else "not met"))
    return lines


def above_oracle(summary: dict[str, Any], shots: list[int], steps: list[int | str]) -> list[dict[str, Any]]:
    """Every cell of a row (not the oracle) above the oracle at the same k: mean over sites (``site`` None) or one
    site's mean over seeds. A ceiling that an adapted row exceeds is not one, so the report flags each."""
    if ORACLE_ROW not in summary:
        return []
    flags = []
    for name, by_k in summary.items():
        if name == ORACLE_ROW:
            continue
        for k in shots:
            for s in steps:
                cell, oracle = by_k[str(k)][str(s)], summary[ORACLE_ROW][str(k)][str(s)]
                pairs = [(None, cell["mean"], oracle["mean"])] + [
                    (site, value, oracle["per_site"][site]) for site, value in cell["per_site"].items()
                    if site in oracle["per_site"]]
                for site, value, ceiling in pairs:
                    if value > ceiling:
                        flags.append({"method": name, "k": k, "steps": str(s), "site": site, "dice": value,
                                      "oracle": ceiling})
    return flags


def above_oracle_lines(results: dict[str, Any]) -> list[str]:
    """One line per (method, k, site or mean) above the oracle, naming each step column where it is."""
    flags = results.get("above_oracle")
    if flags is None:  # a results.json from before the flag
        flags = above_oracle(results["summary"], results["preset"]["shots"], step_columns(results["preset"]))
    cases: dict[tuple, list[dict[str, Any]]] = {}
    for flag in flags:
        cases.setdefault((flag["method"], flag["k"], flag["site"]), []).append(flag)
    columns = step_columns(results["preset"])
    lines = []
    for (method, k, site), found in cases.items():
        where = "mean over sites" if site is None else f"site {site}"
        if len(found) == len(columns) > 1 and len({f["dice"] for f in found}) == 1:  # a row that does not adapt
            cells = f"{found[0]['dice']:.3f} at every step count"
        else:
            cells = ", ".join(f"{_column_name(f['steps'])} {f['dice']:.3f}" for f in found)
        lines.append(f"above the oracle: {method}, k = {k}, {where} (oracle {found[0]['oracle']:.3f}): {cells}")
    return lines


def format_markdown(results: dict[str, Any]) -> str:
    spec, summary = results["preset"], results["summary"]
    steps, shots = spec["steps"], spec["shots"]
    columns = step_columns(spec)
    shown = ([AUTO] if AUTO in columns else []) + list(steps)  # the main column first
    head = AUTO if AUTO in columns else steps[-1]
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
    ]
    if AUTO in columns:
        lines += [f"**auto**, the main column: each new site chooses its number of adaptation steps (0 to "
                  f"{spec.get('auto-max-steps', max(steps))}) from its k support slices alone, by cross-validation "
                  "over them (their two halves when k = 1), the count with the highest mean check Dice "
                  "(`fedmeta.common.step_selection`), as a hospital would; in brackets the mean number of steps "
                  "chosen. The fixed counts beside it are read with hindsight no hospital has.", ""]
    lines += [format_goal(results["goal"]).replace("\n  ", "\n- ").replace("goal", "**Goal**", 1), ""]
    flags = above_oracle_lines(results)
    if flags:
        lines += ["## Above the oracle", "",
                  "The oracle is meant as a ceiling; these rows are above it, so read their \"of oracle\" as a "
                  "flag, not a fraction:", ""] + [f"- {line}" for line in flags] + [""]
    for k in shots:
        oracle = summary.get(ORACLE_ROW, {}).get(str(k), {}).get(str(head), {}).get("mean")
        lines += [f"## k = {k} labelled slices", "", "| method | " + " | ".join(_column_name(s) for s in shown)
                  + f" | worst site ({_column_name(head)}) | of oracle ({_column_name(head)}) |",
                  "|---|" + "---|" * (len(shown) + 2)]
        for name in results["method_order"]:
            cells = [_mean_ci(summary[name][str(k)][str(s)]) for s in shown]
            last = summary[name][str(k)][str(head)]
            fraction = _fraction(last["mean"] / oracle) if oracle else "-"
            lines.append(f"| {name} | " + " | ".join(cells)
                         + f" | {last['worst_site_dice']:.3f} ({last['worst_site']}) | {fraction} |")
        lines.append("")
    k_mid = str(GOAL_SHOTS if GOAL_SHOTS in shots else shots[0])
    fixed_mid = GOAL_STEPS if GOAL_STEPS in steps else steps[-1]
    sites = list(results["eval_sites"])
    for column in ([AUTO] if AUTO in columns else []) + [fixed_mid]:
        lines += [f"## Per site, k = {k_mid}, {_column_name(column)} (mean over seeds)", "",
                  "| method | " + " | ".join(f"{s} ({results['eval_sites'][s]})" for s in sites) + " |",
                  "|---|" + "---|" * len(sites)]
        for name in results["method_order"]:
            cell = summary[name][k_mid][str(column)]
            chosen = cell.get("chosen_steps_per_site", {})
            lines.append(f"| {name} | " + " | ".join(
                f"{cell['per_site'][s]:.3f}" + (f" ({chosen[s]:.1f} steps)" if s in chosen else "") for s in sites) + " |")
        lines.append("")
    lines += _per_class_lines(results, k_mid, AUTO if AUTO in columns else fixed_mid)
    lines += _time_to_accuracy_lines(results)
    lines += _oracle_lines(results)
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
            lines.append(f"| {name} | {method['meaning']} | - | - | - | - | {_oracle_budget(results)} | - |")
        elif method["training"] == INTENSITY:
            lines.append(f"| {name} | {method['meaning']} | - | - | - | - | no gradient step: fitted per new site "
                         "on its k support slices | - |")
        else:
            lines.append(f"| {name} | {method['meaning']} | - | - | - | 0 | 0 | 0 |")
    lines += ["", f"![Dice against adaptation steps]({Path(results['files']['plot']).name})", "",
              f"Machine: {machine['processor']}, {machine['cpus']} CPUs, torch {machine['torch']} "
              f"({machine['torch_threads']} threads); load average {machine['load_average_start']} at start, "
              f"{machine['load_average_end']} at end; wall time {results['seconds_total'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def _oracle_records(results: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(seed, site, record) for seed, by_site in (results.get("oracle") or {}).items()
            for site, record in by_site.items()]


def _oracle_budget(results: dict[str, Any]) -> str:
    """The oracle's training in the methods table: "early-stopped at 640 Adam steps (median), cap 3000"."""
    spec, records = results["preset"], _oracle_records(results)
    if not records:  # a results.json from before early stopping: a fixed number of steps
        return f"{spec['oracle-steps']} Adam steps per new site, on its own data"
    taken = [record["steps"] for _, _, record in records]
    stopped = sum(record["stopped"] == "early-stopped" for _, _, record in records)
    if all(record["stopped"] == "one support patient" for _, _, record in records):
        return (f"{spec['oracle-steps']} Adam steps (the cap) per new site: no new site has a second support patient "
                "to validate on, so none could stop early")
    text = (f"early-stopped on its validation patients at {float(np.median(taken)):.0f} Adam steps (median; "
            f"{min(taken)}–{max(taken)}), cap {spec['oracle-steps']}; stopped early in {stopped} of {len(records)} "
            "site-seeds")
    single = sorted({site for _, site, record in records if record["stopped"] == "one support patient"})
    if single:
        text += f"; {', '.join(single)}: one support patient, nothing to validate on, trained to the cap"
    return text


def _oracle_lines(results: dict[str, Any]) -> list[str]:
    """Per new site and seed: the Adam steps the oracle took and why it stopped."""
    records = _oracle_records(results)
    if not records:
        return []
    seeds = sorted({seed for seed, _, _ in records}, key=int)
    sites = sorted({site for _, site, _ in records})
    by = {(seed, site): record for seed, site, record in records}
    lines = ["", "## The oracle's training", "",
             f"Adam steps per new site and seed (cap {results['preset']['oracle-steps']}), the step whose weights "
             "were kept and their validation Dice: the support patients are split into oracle-training and "
             f"oracle-validation patients (a quarter), scored every {results['preset'].get('oracle-eval-every', '-')} "
             f"steps, stopped after {results['preset'].get('oracle-patience', '-')} scorings without improvement.", "",
             "| site | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for site in sites:
        cells = []
        for seed in seeds:
            record = by.get((seed, site))
            if record is None:
                cells.append("-")
            elif record["stopped"] == "one support patient":
                cells.append(f"{record['steps']} (one support patient: to the cap)")
            else:
                cells.append(f"{record['steps']} ({record['stopped']}; kept {record['best_step']}, validation "
                             f"{_f(record['validation_dice'])})")
        lines.append(f"| {site} | " + " | ".join(cells) + " |")
    return lines


def _per_class_lines(results: dict[str, Any], k: str, column: Any) -> list[str]:
    """Dice per class at ``k`` and ``column``: where a row's Dice comes from (what an intensity lookup cannot give
    shows here). Per seed the mean over the sites that declare the class, then the mean over seeds."""
    per_row: dict[str, dict[str, float]] = {}
    for name in results["method_order"]:
        by_class: dict[str, list[float]] = {}
        for seed_cells in results.get("dice", {}).get(name, {}).values():
            sites: dict[str, list[float]] = {}
            for site_cells in seed_cells.values():
                for c, value in (site_cells.get(k, {}).get(str(column), {}).get("dice_per_class") or {}).items():
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        sites.setdefault(str(c), []).append(float(value))
            for c, values in sites.items():
                by_class.setdefault(c, []).append(float(np.mean(values)))
        per_row[name] = {c: float(np.mean(v)) for c, v in by_class.items()}
    classes = sorted({c for row in per_row.values() for c in row}, key=lambda c: (len(c), c))
    if not classes:
        return []
    lines = [f"## Per class, k = {k}, {_column_name(column)} (mean over seeds)", "",
             "Dice of each label value over the sites that declare it (in the synthetic federations 1 is CSF, 2 grey "
             "matter, 3 white matter, as each site's protocol draws them).", "",
             "| method | " + " | ".join(f"class {c}" for c in classes) + " |", "|---|" + "---|" * len(classes)]
    for name, row in per_row.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" if c in row else "-" for c in classes) + " |")
    return lines


def _time_to_accuracy_lines(results: dict[str, Any]) -> list[str]:
    tta = results.get("time_to_accuracy") or {}
    if not tta:
        return []
    lines = ["", f"## Time to accuracy (k = {GOAL_SHOTS}, {GOAL_STEPS} steps)", "",
             "Rounds, and the payload megabytes exchanged up to that round (θ down and the update up, fp32, every "
             "site that answered, summed over rounds), until the new sites' Dice after adaptation (evaluated "
             f"every {results['preset']['curve-every']} rounds during training) first reaches FedAvg + fine-tune's "
             "final value in the same seed; `never` if it does not within the budget; `already at round 0` if "
             "the untrained start reaches it.", "",
             "| training | " + " | ".join(f"seed {s}" for s in results["seeds"]) + " |",
             "|---|" + "---|" * len(results["seeds"])]
    trivial = {}
    for key, rows in tta.items():
        cells = []
        for seed in results["seeds"]:
            row = rows.get(str(seed))
            if row is None:
                cells.append("-")
            elif row["round"] is None:
                cells.append(f"never (final {row['final_dice']:.4f} < {row['target']:.4f})")
            elif row.get("already_at_start") or (row["round"] == 0 and "already_at_start" not in row):
                start = row.get("start_dice")
                cells.append("already at round 0" + (f" (start {start:.4f} ≥ {row['target']:.4f})" if start is not None else ""))
                trivial[str(seed)] = row["target"]
            else:
                cells.append(f"round {row['round']}, {row['bytes'] / 2**20:.1f} MB")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    if trivial:
        lines += ["", "Already at round 0: the untrained start's Dice is at or above the target (FedAvg + fine-tune's "
                      "final value) in seed(s) " + ", ".join(trivial) + ", so in those seeds the target measures no "
                      "training; read time to accuracy only where a method needed rounds to reach it."]
    return lines


def _mean_ci(cell: dict[str, Any]) -> str:
    """'mean ± half-width' of the t-interval, or the mean alone with one seed; at auto, the mean steps chosen."""
    text = f"{cell['mean']:.3f}"
    if cell.get("ci"):
        text += f" ± {(cell['ci'][1] - cell['ci'][0]) / 2:.3f}"
    return text + _chosen(cell.get("chosen_steps_mean"))


def _column_name(column: int | str) -> str:
    return "auto" if str(column) == AUTO else f"{column} steps"


def _column_words(column: int | str, k: int) -> str:
    return (f"steps auto (chosen per site from its {k} support slices)" if str(column) == AUTO
            else f"{column} steps")


def _chosen(steps: float | None, joint: str | None = None) -> str:
    """The mean steps auto chose: " (3.4 steps)", or ", 3.4 steps" inside brackets already open (``joint``)."""
    if steps is None:
        return ""
    return f"{joint}{steps:.1f} steps" if joint else f" ({steps:.1f} steps)"


def _fraction(value: float | None) -> str:
    """A row's fraction of the oracle; above 1 it is flagged, not printed as a share of a ceiling."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.1%} (above the oracle)" if value > 1 else f"{value:.1%}"


def _f(value: float | None, fmt: str = ".3f") -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, fmt)
