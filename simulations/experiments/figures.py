"""The figures of `fedmeta benchmark` and `fedmeta simulate`: Dice against adaptation steps, learning curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedmeta.simulations.experiments.benchmark_preset import GOAL_SHOTS, GOAL_STEPS

# matplotlib is imported inside the plotting functions: `fedmeta benchmark --help` does not wait for it.


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


def plot_dice_vs_steps(comparison: dict[str, Any], path: Path) -> Path:
    # matplotlib loads only when a plot is drawn, with the file-only backend chosen before pyplot.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = comparison["steps"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, summary in comparison["summary"].items():
        ax.plot(steps, [summary["mean"][s] for s in steps], marker="o", label=f"{label} (mean)")
        ax.plot(steps, [summary["worst"][s] for s in steps], linestyle=":", alpha=0.6,
                color=ax.lines[-1].get_color(), label=f"{label} (worst site)")
    ax.set_xlabel("adaptation steps on the new hospital's support set")
    ax.set_ylabel("Dice per patient (mean over sites)")
    ax.set_title(f"Held-out sites, k = {comparison['k']} labelled slices")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = ["plot_dice_vs_steps", "plot_learning_curves", "plot_results"]
