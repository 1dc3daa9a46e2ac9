"""`fedmeta simulate`'s comparison: held-out sites adapt each initialisation with k labelled images.

Every initialisation (meta-learned, FedAvg-trained, random) is scored on the same held-out sites,
the same support images and the same evaluation patients, by ``fedmeta.common.adaptation.adaptation_curve``
— the code a site runs in the ClientApp's evaluate — so the table compares initialisations only.
"""

from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fedmeta.common.adaptation import Initialisation, score_site
from fedmeta.common.step_selection import AUTO
from fedmeta.common.config import RunConfig
from fedmeta.common.data import SiteDataset
from fedmeta.common.model import build_model
from fedmeta.common.read_limits import ReadLimits
from fedmeta.common.synth import load_manifest
from fedmeta.simulations.experiments.figures import plot_dice_vs_steps
from fedmeta.simulations.experiments.oracle import train_oracle
from fedmeta.simulations.experiments.stats import interval



ORACLE_LABEL = "oracle (the site's own labels)"


def compare_initialisations(
    federation_dir: Path,
    inits: Sequence[Initialisation],
    config: RunConfig,
    *,
    k: int = 5,
    steps: Sequence[int] = (0, 5, 10),
    seed: int = 0,
    oracle_steps: int = 0,
    auto: bool = False,
) -> dict[str, Any]:
    """Dice per held-out site, initialisation and step count (per patient too); mean and worst site.

    ``oracle_steps`` > 0 adds the ceiling: per site, a UNet fully supervised on the site's support
    patients for that many steps (``fedmeta.simulations.experiments.oracle``), scored as it is. ``auto`` adds
    the column a hospital would get: the step count each site chooses from its k support slices
    (``fedmeta.common.step_selection``) among the counts up to the largest fixed one, after the fixed counts;
    ``chosen_steps`` records the counts chosen.
    """
    manifest = load_manifest(Path(federation_dir))
    if not manifest.heldout_sites:
        raise ValueError(f"{federation_dir} has no held-out sites; the comparison needs at least one new hospital.")
    data_config = config.data_config(limits=ReadLimits.from_environment())
    model = build_model(config.model_config())
    labels = [init.label for init in inits] + ([ORACLE_LABEL] if oracle_steps > 0 else [])
    auto_max_steps = max(steps)  # a comparison of counts up to N chooses among them: its cost stays the run's
    steps = [*steps, AUTO] if auto else list(steps)
    chosen: dict[str, dict[str, int]] = {init.label: {} for init in inits}
    per_site: dict[str, dict[str, dict[int, float]]] = {label: {} for label in labels}
    per_patient: dict[str, dict[str, dict[int, dict[str, float]]]] = {label: {} for label in labels}
    for info in manifest.heldout_sites:
        site = SiteDataset.load(info.folder(), data_config)
        splits: dict = {}  # every initialisation adapts on the same slices and is scored on the same patients
        scored = [(init, list(steps)) for init in inits]
        if oracle_steps > 0:
            oracle = train_oracle(site, config, seed=seed, steps=oracle_steps)
            scored.append((dataclasses.replace(oracle, label=ORACLE_LABEL), [0]))  # keeps the oracle's network
        for init, init_steps in scored:
            scores = score_site(model, init, site, shots=[k], steps=init_steps, seed=seed,
                                num_classes=config.num_classes, max_images=config.eval_max_images,
                                batch_size=config.eval_batch_size, splits=splits, auto_max_steps=auto_max_steps)[k]
            if AUTO in scores:
                chosen[init.label][info.name] = int(scores[AUTO]["chosen_steps"])
            # The oracle is used as it is: the same numbers whatever the adaptation budget.
            scores = {s: scores[s if s in scores else 0] for s in steps}
            per_site[init.label][info.name] = {s: float(scores[s]["dice"]) for s in steps}
            per_patient[init.label][info.name] = {s: dict(scores[s]["per_patient"]) for s in steps}
    summary = {}
    for label, sites in per_site.items():
        summary[label] = {
            "mean": {s: float(np.mean([d[s] for d in sites.values()])) for s in steps},
            "worst": {s: min(d[s] for d in sites.values()) for s in steps},
        }
    return {"k": k, "steps": list(steps), "sites": per_site, "per_patient": per_patient, "summary": summary,
            "heldout_kinds": {i.name: i.heldout_kind for i in manifest.heldout_sites}, "oracle_steps": oracle_steps,
            "chosen_steps": {label: sites for label, sites in chosen.items() if sites}}


def paired_margin(comparison: dict[str, Any], label: str, baseline: str, steps: int) -> dict[str, Any]:
    """``label`` minus ``baseline`` per held-out patient after ``steps`` steps: mean, t-interval, wins.

    Both adapted on the same support slices and scored on the same patients, so the per-patient
    difference is paired; the interval (``CONFIDENCE``) is over patients of one training run, not
    over training seeds (``fedmeta benchmark`` gives those).
    """
    differences = [
        comparison["per_patient"][label][site][steps][pid] - comparison["per_patient"][baseline][site][steps][pid]
        for site in comparison["per_patient"][label]
        for pid in comparison["per_patient"][label][site][steps]
    ]
    return {"mean": float(np.mean(differences)), "ci": interval(differences), "patients": len(differences),
            "wins": int(sum(d > 0 for d in differences)), "steps": steps, "label": label, "baseline": baseline}


def write_report(out_dir: Path, comparison: dict[str, Any], runs: dict[str, Any], title: str,
                 margin: dict[str, Any] | None = None) -> Path:
    """report.md with the comparison table, beside dice_vs_steps.png; returns the report's path."""
    out_dir = Path(out_dir)
    plot_path = plot_dice_vs_steps(comparison, out_dir / "dice_vs_steps.png")
    steps = list(comparison["steps"])
    lines = [
        f"# {title}",
        "",
        f"New-hospital adaptation on {len(next(iter(comparison['sites'].values())))} held-out site(s): "
        f"k = {comparison['k']} labelled slices; Dice per patient over the whole volume, in each site's own "
        "labels (mean over classes, then patients), then the mean over sites; worst site in brackets.",
        "",
    ]
    if margin is not None:
        ci = margin["ci"]
        lines += [
            f"**Margin** of {margin['label']} over {margin['baseline']} at {step_label(margin['steps'])}: "
            f"{margin['mean']:+.3f} Dice per patient"
            + (f" (95 % t-interval over the {margin['patients']} held-out patients [{ci[0]:+.3f}, {ci[1]:+.3f}])"
               if ci else "")
            + f"; better for {margin['wins']} of {margin['patients']} patients. The interval treats the patients "
            "(of every held-out site) as independent, and it is one training seed: `fedmeta benchmark` "
            "measures the spread over seeds.",
            "",
            f"**What this means:** {what_it_means(margin, comparison)}",
            "",
        ]
    lines += [
        "| initialisation | " + " | ".join(step_label(s) for s in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for label, summary in comparison["summary"].items():
        cells = [f"{summary['mean'][s]:.3f} ({summary['worst'][s]:.3f})" for s in steps]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if comparison.get("chosen_steps"):
        lines += ["", "Steps chosen per site (auto, from the k support slices alone): " + "; ".join(
            f"{label} " + ", ".join(f"{site} {n}" for site, n in sorted(sites.items()))
            for label, sites in comparison["chosen_steps"].items()) + "."]
    ceiling = comparison["summary"].get(ORACLE_LABEL, {}).get("mean", {}).get(steps[-1])
    if ceiling:
        lines += ["", f"The oracle is, per site, a UNet fully supervised on that site's support patients "
                  f"(early-stopped on a quarter of them, at most {comparison['oracle_steps']} steps); at "
                  f"{step_label(steps[-1])} each initialisation reaches "
                  + ", ".join(f"{label} {summary['mean'][steps[-1]] / ceiling:.0%}"
                              for label, summary in comparison["summary"].items() if label != ORACLE_LABEL)
                  + " of it."]
    lines += ["", f"Per site (Dice at {step_label(steps[-1])}):", ""]
    lines.append("| site | kind | " + " | ".join(comparison["sites"]) + " |")
    lines.append("|---|---|" + "---|" * len(comparison["sites"]))
    for site in next(iter(comparison["sites"].values())):
        cells = [f"{comparison['sites'][label][site][steps[-1]]:.3f}" for label in comparison["sites"]]
        lines.append(f"| {site} | {comparison['heldout_kinds'].get(site) or '-'} | " + " | ".join(cells) + " |")
    lines += ["", "Runs:", ""]
    for name, run in runs.items():
        lines.append(
            f"- {name}: algorithm {run['algorithm']}, {run['rounds']} rounds, "
            f"{run['local_steps_per_site_round']} local gradient steps per site and round, sites weighted "
            f"{'by their training slices' if run.get('site_weighting') == 'data' else 'one each'}, {run['seconds']:.1f} s"
            + (f", final meta-loss {run['final_meta_loss']:.4f}" if run.get("final_meta_loss") is not None else "")
            + f", dropped replies {run['dropped_replies']}, skipped rounds {run['skipped_rounds']}"
            + (f"; new sites adapt with {run['adapt_variant']}" if run.get("adapt_variant") else "")
        )
    lines += ["", f"![Dice against adaptation steps]({plot_path.name})", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def step_label(steps: int | str) -> str:
    """A column's name: "5 steps", or "auto" (the count each site chose from its support slices)."""
    return "auto (steps chosen per site)" if steps == AUTO else f"{steps} steps"


def what_it_means(margin: dict[str, Any], comparison: dict[str, Any]) -> str:
    """One line on what a simulate comparison's margin says at the size it was measured at."""
    sites = len(next(iter(comparison["sites"].values())))
    size = f"{margin['patients']} held-out patients of {sites} new site(s), one training seed"
    ci = margin["ci"]
    if not ci:
        return (f"with {size} there is no interval to judge the margin of {margin['mean']:+.3f} by: it shows the "
                "pipeline runs end to end, not which method is better (`fedmeta benchmark` measures that over seeds).")
    if ci[0] <= 0.0 <= ci[1]:
        return (f"with {size}, the margin of {margin['mean']:+.3f} is within its 95 % interval of zero: at this size "
                "the run shows that training, adaptation and scoring work end to end, not which method is better; "
                "the claim is measured over seeds by `fedmeta benchmark` (docs/results-benchmark.md).")
    direction = "ahead of" if margin["mean"] > 0 else "behind"
    return (f"with {size}, {margin['label']} is {direction} {margin['baseline']} by {abs(margin['mean']):.3f} "
            "(95 % interval excluding zero), but from one seed and a few patients: read it as a hint, and the 5-seed "
            "benchmark (docs/results-benchmark.md) as the evidence.")


__all__ = ["ORACLE_LABEL", "compare_initialisations", "paired_margin", "step_label", "what_it_means", "write_report"]
