"""The figures of `fedmeta benchmark` and `fedmeta simulate`: Dice against adaptation steps, learning curves.

Every method has one look (colour, marker, line style) in every figure, from one table, :data:`LOOKS`: a
family shares a colour and its members differ by marker; a pooled (centralised) learner is its family's
look dashed; a variant (``prototypes+frozen-classifier``) its family's colour with its own marker, dash-dot;
a method the table does not know gets a colour no table row uses. Several seeds draw a band (mean ± the
95 % t-interval half-width over seeds, said on the axis); one seed draws plain lines. Each figure is
written once per format (PNG and PDF by default, same stem), legends outside the axes.
"""

from __future__ import annotations

import textwrap
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedmeta.common.outputs import write_atomically
from fedmeta.simulations.experiments.benchmark_preset import GOAL_SHOTS, GOAL_STEPS
from fedmeta.simulations.experiments.stats import CONFIDENCE, interval

# matplotlib is imported inside the plotting functions: `fedmeta benchmark --help` does not wait for it.

AUTO = "auto"  # the step count a site chooses from its support slices (fedmeta.common.step_selection.AUTO)
FORMATS = ("png", "pdf")
_KNOWN_FORMATS = ("png", "pdf", "svg")


@dataclass(frozen=True)
class Look:
    """How one method is drawn: a matplotlib colour, marker and line style, and its name in a legend."""

    colour: str
    marker: str
    linestyle: str
    label: str
    family: str


# The one table. Colours: Okabe-Ito and Tableau hues, one per family; markers: one per method, never reused.
#    name              family            colour     marker  line   legend
_TABLE = (
    ("scratch",        "scratch",        "#8C564B", "x",    "-",   "scratch (random init)"),
    ("fedavg",         "fedavg",         "#0072B2", "s",    "-",   "FedAvg (no adaptation)"),
    ("fedavg-ft",      "fedavg",         "#0072B2", "D",    "-",   "FedAvg + fine-tune"),
    ("fedprox-ft",     "fedavg",         "#0072B2", "P",    "-",   "FedProx + fine-tune"),
    ("maml",           "maml",           "#D55E00", "o",    "-",   "MAML"),
    ("fomaml",         "maml",           "#D55E00", "v",    "-",   "FOMAML"),
    ("maml++",         "maml",           "#D55E00", "^",    "-",   "MAML++"),
    ("metasgd",        "metasgd",        "#CC79A7", "*",    "-",   "Meta-SGD"),
    ("anil",           "anil",           "#009E73", "h",    "-",   "ANIL"),
    ("reptile",        "reptile",        "#E69F00", "p",    "-",   "Reptile"),
    ("fast-weights",   "fast-weights",   "#17BECF", "<",    "-",   "fast weights"),
    ("prototypes",     "prototypes",     "#9467BD", ">",    "-",   "prototypes"),
    ("prototypes-contrastive", "prototypes", "#9467BD", "8",  "-",   "prototypes + contrastive loss"),
    ("lstm-optimizer", "lstm-optimizer", "#BCBD22", "d",    "-",   "LSTM optimiser"),
    ("oracle",         "oracle",         "#000000", "",     "--",  "oracle (ceiling)"),
    ("intensity",      "intensity",      "#7F7F7F", "",     ":",   "intensity threshold"),
)
LOOKS: dict[str, Look] = {name: Look(colour, marker, line, label, family)
                          for name, family, colour, marker, line, label in _TABLE}
# Other spellings of table rows: training keys (learning curves) and `fedmeta simulate`'s labels.
_ALIASES = {"fedprox": "fedprox-ft", "fedavg-trained": "fedavg-ft", "random init": "scratch", "random": "scratch",
            "maml-plus-plus": "maml++", "meta-sgd": "metasgd", "lstm-optimiser": "lstm-optimizer"}
POOLED_PREFIX = "pooled-"
VARIANT_SEPARATOR = "+"
_VARIANT_MARKERS = ("1", "2", "3", "4", "8", "H", "X", "+", "|", "_")  # none of them in the table
_FALLBACK_COLOURS = ("#393B79", "#637939", "#8C6D31", "#843C39", "#7B4173", "#E7298A", "#1B9E77", "#66A61E",
                     "#A6761D", "#3182BD")  # none of them in the table
_FALLBACK_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h", "p", "<", ">", "d", "8", "H")


def _stable(text: str) -> int:
    return zlib.crc32(text.encode())  # Python's hash() of a str changes between runs


def _table_key(name: str) -> str | None:
    """The table row ``name`` is, spelled as a key, an alias or `fedmeta simulate`'s label; None if none."""
    key = name.strip().lower()
    if key.startswith("meta-learned (") and key.endswith(")"):  # simulate: "meta-learned (fomaml)"
        key = key[len("meta-learned ("):-1]
    if key.startswith("oracle"):  # simulate: "oracle (the site's own labels)"
        return "oracle"
    key = _ALIASES.get(key, key)
    return key if key in LOOKS else None


_USED_AS_IS = ("oracle", "intensity")  # families scored as they are: no `auto` point to draw
_ADAPTED = {"fedavg": "fedavg-ft", "fedprox": "fedprox-ft"}  # a training key -> the method its model adapted is


def _in_table_order(names: Iterable[str]) -> list[str]:
    """Table rows first, in the table's order (a pooled learner after the rows), then the rest by name."""
    order = {name: i for i, name in enumerate(LOOKS)}

    def rank(name: str) -> tuple[int, int, str]:
        key = _table_key(_ADAPTED.get(name, name))
        if key is not None:
            return (0, order[key], name)
        pooled = _table_key(name[len(POOLED_PREFIX):]) if name.startswith(POOLED_PREFIX) else None
        return (1, order[pooled], name) if pooled is not None else (2, 0, name)

    return sorted(names, key=rank)


def look_for(name: str) -> Look:
    """The look of method ``name`` in any figure: the table's row, a pooled or ``+`` variant of one, or a fallback."""
    key = _table_key(name)
    if key is not None:
        look = LOOKS[key]
        return look if key == name else replace(look, label=name)  # simulate's own labels stay as they are
    lowered = name.strip().lower()
    if lowered.startswith(POOLED_PREFIX):
        rest = name.strip()[len(POOLED_PREFIX):]
        base = look_for(rest)
        return replace(base, linestyle="--", label=f"{base.label} (pooled)" if rest in LOOKS else name)
    if VARIANT_SEPARATOR in lowered:
        base_name, variant = name.split(VARIANT_SEPARATOR, 1)
        base = look_for(base_name)
        marker = _VARIANT_MARKERS[_stable(variant.strip().lower()) % len(_VARIANT_MARKERS)]
        return replace(base, marker=marker, linestyle="-.", label=name)
    digest = _stable(lowered)
    return Look(_FALLBACK_COLOURS[digest % len(_FALLBACK_COLOURS)],
                _FALLBACK_MARKERS[(digest // len(_FALLBACK_COLOURS)) % len(_FALLBACK_MARKERS)], "-", name, lowered)


def looks_for(names: Iterable[str]) -> dict[str, Look]:
    """The looks of the methods of one figure, no two alike: table rows as they are, then any derived or
    fallback look that would repeat one of them moves to its next marker."""
    names = list(dict.fromkeys(names))
    looks = {name: look_for(name) for name in names}
    taken = {(lk.colour, lk.marker, lk.linestyle) for name, lk in looks.items() if _table_key(name) is not None}
    for name in names:
        if _table_key(name) is not None:
            continue
        look = looks[name]
        markers = _VARIANT_MARKERS + _FALLBACK_MARKERS
        start = markers.index(look.marker) if look.marker in markers else 0
        for shift in range(len(markers) + 1):
            if (look.colour, look.marker, look.linestyle) not in taken:
                break
            look = replace(look, marker=markers[(start + shift + 1) % len(markers)])
        looks[name] = look
        taken.add((look.colour, look.marker, look.linestyle))
    return looks


def _line_kwargs(look: Look) -> dict[str, Any]:
    return {"color": look.colour, "marker": look.marker or None, "linestyle": look.linestyle, "label": look.label,
            "markersize": 4, "linewidth": 1.3}


def band_label(seeds: int) -> str:
    """What the shading is, for an axis label; no ± with one seed, where there is none."""
    if seeds > 1:
        return f"band: mean ± {CONFIDENCE:.0%} t-interval over {seeds} seeds"
    return "one seed"


def _mean_and_half_width(values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``values`` [seeds, points] -> the mean [points] and the t-interval half-width [points] (None for one seed)."""
    mean = values.mean(axis=0)
    if len(values) < 2:
        return mean, None
    half = np.array([(lambda ci: (ci[1] - ci[0]) / 2)(interval([float(v) for v in column])) for column in values.T])
    return mean, half


def _check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    formats = tuple(str(f).lower().lstrip(".") for f in formats)
    unknown = [f for f in formats if f not in _KNOWN_FORMATS]
    if not formats or unknown:
        raise ValueError(f"formats={formats!r}: give one or more of {', '.join(_KNOWN_FORMATS)}.")
    return formats


def _save(fig, path: Path, formats: Sequence[str]) -> Path:
    """Writes ``fig`` once per format beside ``path`` (same stem); returns the PNG's path (else the first)."""
    import matplotlib.pyplot as plt

    formats = _check_formats(formats)
    path = Path(path)
    written = [path.with_suffix(f".{fmt}") for fmt in formats]
    try:
        for target in written:  # beside the name, then renamed onto it: never through a link planted there
            write_atomically(target, lambda tmp, fmt=target.suffix[1:]: fig.savefig(
                tmp, format=fmt, bbox_inches="tight", dpi=200 if fmt == "png" else None,
                metadata={"Software": "fedmeta"} if fmt == "png" else None))
    finally:
        plt.close(fig)
    return next((p for p in written if p.suffix == ".png"), written[0])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # the file-only backend, chosen before pyplot loads
    import matplotlib.pyplot as plt

    return plt


def _steps_axis(steps: Sequence[Any], tick: bool) -> tuple[list[int], bool, float | None]:
    """The fixed step counts, whether `auto` is among the steps, and where its own tick goes (``tick``: some
    `auto` result records no count chosen), right of the largest fixed count; None without one."""
    fixed = [int(s) for s in steps if str(s) != AUTO]
    has_auto = any(str(s) == AUTO for s in steps)
    if not (has_auto and tick):
        return fixed, has_auto, None
    span = (max(fixed) - min(fixed)) if len(fixed) > 1 else 1
    return fixed, has_auto, (max(fixed) if fixed else 0) + max(1.0, 0.15 * span)


def _set_steps_ticks(ax, fixed: list[int], auto_tick: float | None) -> None:
    ticks, labels = list(fixed), [str(s) for s in fixed]
    if auto_tick is not None:
        ticks.append(auto_tick)
        labels.append(AUTO)
    ax.set_xticks(ticks, labels)


def _draw_auto(ax, x: float, value: float, look: Look, half: float | None = None) -> None:
    """The `auto` point: the method's marker, hollow and larger, apart from its curve (no legend entry)."""
    ax.errorbar([x], [value], yerr=None if half is None else [[half], [half]], color=look.colour,
                marker=look.marker or "o", markersize=7, markerfacecolor="white", markeredgewidth=1.3,
                linestyle="none", capsize=2, zorder=3)


def _figure_legend(fig, handles, labels, *, note: str | None = None) -> None:
    """One legend for the figure, below every axes (constrained layout makes room for it)."""
    columns = min(len(labels), 4)
    fig.legend(handles, labels, loc="outside lower center", ncol=columns, fontsize=8, frameon=False,
               title=note, title_fontsize=8)


def _chars(fig, fontsize: float) -> int:
    """About how many characters of ``fontsize`` points fit across ``fig`` (an average glyph is ~0.55 em)."""
    return max(20, int(fig.get_figwidth() * 72 / (0.55 * fontsize)) - 4)


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width=width, break_on_hyphens=False))


def plot_results(results: dict[str, Any], path: Path, formats: Sequence[str] = FORMATS) -> Path:
    """:func:`draw_results` written to ``path`` in each of ``formats`` (same stem); returns the PNG's path."""
    formats = _check_formats(formats)  # before the drawing, not after
    return _save(draw_results(results), path, formats)


def draw_results(results: dict[str, Any]):
    """Dice against adaptation steps: one row per k, one panel per kind of new site, one line per method
    (mean over seeds; with several seeds, a band of the t-interval over seeds). A method's `auto` steps,
    where the preset has them, are a hollow marker at the mean count chosen (an `auto` tick if none is
    recorded). Returns the matplotlib Figure."""
    plt = _pyplot()
    spec = results["preset"]
    shots = spec["shots"]
    # "auto" among the steps, or (the preset as the benchmark reads it) fixed counts and an "auto-steps" flag
    steps = list(spec["steps"]) + ([AUTO] if spec.get("auto-steps") and AUTO not in spec["steps"] else [])
    seeds = max((len(by_seed) for by_seed in results["dice"].values()), default=1)
    kinds: dict[str, list[str]] = {}
    for site, kind in results["eval_sites"].items():
        kinds.setdefault(kind, []).append(site)
    names = list(results["method_order"])
    looks = looks_for(names)
    autos = {name: _auto_entries(results["dice"][name]) for name in names
             if results["methods"].get(name, {}).get("adapts", True)}  # a model used as is has no steps to choose
    unrecorded = any(entry.get("chosen_steps") is None for entries in autos.values() for entry in entries)
    fixed, has_auto, auto_tick = _steps_axis(steps, unrecorded)
    fig, axes = plt.subplots(len(shots), len(kinds), figsize=(3.4 * len(kinds) + 0.4, 2.6 * len(shots) + 0.6),
                             squeeze=False, sharey=True, sharex=True, layout="constrained")
    for row, k in enumerate(shots):
        for col, (kind, sites) in enumerate(kinds.items()):
            ax = axes[row][col]
            for name in names:
                by_seed = results["dice"][name]
                look = looks[name]
                # per seed: mean over this kind's sites; then the mean (and interval) over seeds
                values = np.array([[np.mean([by_seed[seed][site][str(k)][str(s)]["dice"] for site in sites])
                                    for s in fixed] for seed in by_seed])  # [seeds, steps]
                mean, half = _mean_and_half_width(values)
                ax.plot(fixed, mean, **_line_kwargs(look))
                if half is not None:
                    ax.fill_between(fixed, mean - half, mean + half, color=look.colour, alpha=0.12, linewidth=0)
                if has_auto and name in autos:
                    _draw_panel_auto(ax, by_seed, sites, str(k), look, auto_tick)
            ax.set_title(_wrap(f"{kind} ({', '.join(sites)}), k = {k}", 44), fontsize=8)
            ax.grid(alpha=0.3)
            _set_steps_ticks(ax, fixed, auto_tick)
            if row == len(shots) - 1:
                ax.set_xlabel("adaptation steps on the new site", fontsize=8)
            if col == 0:
                ax.set_ylabel(_wrap(f"Dice per patient ({band_label(seeds)})", 32), fontsize=8)
            ax.tick_params(labelsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    notes = ["dashed: pooled (centralised) training; black dashed: the oracle ceiling"]
    if has_auto:
        notes.append("hollow marker: steps chosen per site (auto)"
                     + (", at the mean count chosen" if not unrecorded else ""))
    _figure_legend(fig, handles, labels, note="; ".join(notes))
    fig.suptitle(_wrap("New-hospital adaptation: Dice against adaptation steps", _chars(fig, 10)), fontsize=10)
    return fig


def _auto_entries(by_seed: dict) -> list[dict[str, Any]]:
    """Every `auto` result of one method: per seed, site and k."""
    return [entry[AUTO] for by_site in by_seed.values() for by_k in by_site.values() for entry in by_k.values()
            if AUTO in entry]


def _draw_panel_auto(ax, by_seed: dict, sites: list[str], k: str, look: Look, auto_tick: float | None) -> None:
    """One method's `auto` point in one panel: the mean Dice over seeds (of the mean over ``sites``), at the
    mean count chosen there, or at the `auto` tick when a count is not recorded."""
    seeds = [seed for seed in by_seed if all(AUTO in by_seed[seed][site][k] for site in sites)]
    if not seeds:
        return
    entries = [by_seed[seed][site][k][AUTO] for seed in seeds for site in sites]
    values = np.array([[np.mean([by_seed[seed][site][k][AUTO]["dice"] for site in sites])] for seed in seeds])
    mean, half = _mean_and_half_width(values)
    chosen = [e["chosen_steps"] for e in entries if e.get("chosen_steps") is not None]
    x = float(np.mean(chosen)) if len(chosen) == len(entries) else auto_tick
    if x is not None:
        _draw_auto(ax, x, float(mean[0]), look, None if half is None else float(half[0]))


def plot_learning_curves(results: dict[str, Any], path: Path, formats: Sequence[str] = FORMATS) -> Path | None:
    """:func:`draw_learning_curves` written to ``path`` in each of ``formats``; the PNG's path, None without curves."""
    formats = _check_formats(formats)
    fig = draw_learning_curves(results)
    return None if fig is None else _save(fig, path, formats)


def draw_learning_curves(results: dict[str, Any]):
    """The new sites' Dice (k = GOAL_SHOTS, GOAL_STEPS steps) against training rounds and against the bytes
    exchanged, one line per federated method (a band of the t-interval over seeds with several); the
    Figure, None without curves."""
    curves = {key: [run["curve"] for run in by_seed.values() if run.get("curve")] for key, by_seed in results["runs"].items()}
    curves = {key: runs for key, runs in curves.items() if runs}
    if not curves:
        return None
    plt = _pyplot()
    seeds = max(len(runs) for runs in curves.values())
    # A curve is the new sites' Dice after adaptation: FedAvg's training run is drawn as FedAvg + fine-tune.
    method = {key: _ADAPTED.get(key, key) for key in curves}
    looks = looks_for(method[key] for key in _in_table_order(curves))
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.0), layout="constrained")
    for key in _in_table_order(curves):
        runs, look = curves[key], looks[method[key]]
        length = min(len(curve) for curve in runs)  # seeds share the schedule; guard a short one
        rounds = np.array([point["round"] for point in runs[0][:length]])
        sent = np.array([point["bytes"] for point in runs[0][:length]]) / 2**30
        mean, half = _mean_and_half_width(np.array([[point["dice"] for point in curve[:length]] for curve in runs]))
        for ax, x in zip(axes, (rounds, sent)):
            ax.plot(x, mean, **_line_kwargs(look))
            if half is not None:
                ax.fill_between(x, mean - half, mean + half, color=look.colour, alpha=0.12, linewidth=0)
    role = "validation (training) sites" if results["eval_role"] == "validation" else "held-out sites"
    axes[0].set_xlabel("round", fontsize=8)
    axes[1].set_xlabel(_wrap("GiB exchanged (θ down and the update up, fp32)", 40), fontsize=8)
    axes[0].set_ylabel(_wrap(f"Dice, k = {GOAL_SHOTS}, {GOAL_STEPS} steps ({band_label(seeds)})", 34), fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    handles, labels = axes[0].get_legend_handles_labels()
    _figure_legend(fig, handles, labels)
    fig.suptitle(_wrap(f"Learning curves on the {role}", _chars(fig, 10)), fontsize=10)
    return fig


def plot_dice_vs_steps(comparison: dict[str, Any], path: Path, formats: Sequence[str] = FORMATS) -> Path:
    """:func:`draw_dice_vs_steps` written to ``path`` in each of ``formats``; returns the PNG's path."""
    formats = _check_formats(formats)
    return _save(draw_dice_vs_steps(comparison), path, formats)


def draw_dice_vs_steps(comparison: dict[str, Any]):
    """`fedmeta simulate`'s figure: each initialisation's Dice on the held-out sites against adaptation steps,
    the mean over sites (solid) and the worst site (dotted, hollow markers); one training seed, so no band.
    Returns the Figure."""
    plt = _pyplot()
    fixed, has_auto, auto_tick = _steps_axis(comparison["steps"], True)  # its summary keeps no count chosen
    looks = looks_for(comparison["summary"])
    fig, ax = plt.subplots(figsize=(6.4, 3.4), layout="constrained")
    for label, summary in comparison["summary"].items():
        look = looks[label]
        ax.plot(fixed, [summary["mean"][s] for s in fixed], **{**_line_kwargs(look), "label": f"{look.label} (mean)"})
        ax.plot(fixed, [summary["worst"][s] for s in fixed], color=look.colour, marker=look.marker or None,
                markerfacecolor="white", markersize=4, linestyle=":", linewidth=1.0, alpha=0.8,
                label=f"{look.label} (worst site)")
        if auto_tick is not None and AUTO in summary["mean"] and look.family not in _USED_AS_IS:
            _draw_auto(ax, auto_tick, summary["mean"][AUTO], look)
    ax.set_xlabel("adaptation steps on the new hospital's support set", fontsize=8)
    ax.set_ylabel("Dice per patient (mean over held-out sites)", fontsize=8)
    ax.set_title(_wrap(f"Held-out sites, k = {comparison['k']} labelled slices, one training seed", 60), fontsize=9)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=7)
    _set_steps_ticks(ax, fixed, auto_tick)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False,
              title="large hollow: steps chosen per site (auto)" if has_auto else None, title_fontsize=7)
    return fig


__all__ = ["AUTO", "FORMATS", "LOOKS", "Look", "band_label", "draw_dice_vs_steps", "draw_learning_curves",
           "draw_results", "look_for", "looks_for", "plot_dice_vs_steps", "plot_learning_curves", "plot_results"]
