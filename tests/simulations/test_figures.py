"""The figures: one look per method in every figure, none repeated in a figure, legends outside the axes,
PNG and PDF, bands only with several seeds, and `auto` steps beside the fixed counts."""

from __future__ import annotations

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from fedmeta.simulations.experiments import figures  # noqa: E402
from fedmeta.simulations.experiments.figures import (  # noqa: E402
    LOOKS, draw_dice_vs_steps, draw_learning_curves, draw_results, look_for, looks_for, plot_dice_vs_steps,
    plot_learning_curves, plot_results,
)

METHODS = ["scratch", "fedavg", "fedavg-ft", "fedprox-ft", "fomaml", "maml", "reptile", "metasgd", "anil",
           "fast-weights", "prototypes", "lstm-optimizer", "pooled-fomaml", "pooled-maml", "pooled-metasgd", "oracle",
           "intensity", "prototypes+frozen-classifier", "fedavg-ft+head-only", "prototypes+head-only",
           "someone-elses-method", "another-new-method"]
SITES = {"new-annotation": "unseen-annotation", "new-sequence": "unseen-sequence"}


def _results(seeds: int = 1, steps=(0, 1, 5), auto: str | None = None) -> dict:
    """A benchmark's results.json, as plot_results reads it, with made-up Dice; ``auto``: None (no auto
    steps), "chosen" (recorded with chosen_steps) or "unrecorded"."""
    shots = [1, 5]
    fixed = [s for s in steps if s != "auto"]
    dice = {}
    for m, name in enumerate(METHODS):
        dice[name] = {}
        for seed in range(seeds):
            dice[name][str(seed)] = {}
            for i, site in enumerate(SITES):
                by_k = {}
                for k in shots:
                    by_k[str(k)] = {str(s): {"dice": 0.2 + 0.01 * m + 0.02 * s / max(fixed) + 0.01 * seed + 0.03 * i}
                                    for s in fixed}
                    if auto:
                        by_k[str(k)]["auto"] = {"dice": 0.5 + 0.01 * m + 0.01 * seed,
                                                **({"chosen_steps": 1 + seed} if auto == "chosen" else {})}
                dice[name][str(seed)][site] = by_k
    runs = {key: {str(seed): {"curve": [{"round": r, "bytes": r * 2**20, "dice": 0.3 + 0.01 * r + 0.01 * seed}
                                        for r in (0, 2, 4)]} for seed in range(seeds)}
            for key in ("fedavg", "fedprox", "fomaml", "maml", "prototypes", "pooled-fomaml", "someone-elses-method")}
    return {
        "preset": {"steps": list(steps) + (["auto"] if auto else []), "shots": shots},
        "eval_sites": SITES, "eval_role": "heldout", "method_order": METHODS, "dice": dice, "runs": runs,
        "methods": {name: {"adapts": name not in ("fedavg", "oracle", "intensity")} for name in METHODS},
    }


def _comparison(steps=(0, 5)) -> dict:
    labels = ["meta-learned (fomaml)", "FedAvg-trained", "random init", "oracle (the site's own labels)"]
    return {"k": 2, "steps": list(steps), "summary": {
        label: {"mean": {s: 0.3 + 0.1 * i for s in steps}, "worst": {s: 0.2 + 0.1 * i for s in steps}}
        for i, label in enumerate(labels)}}


def _lines(fig) -> dict[str, tuple[str, str, str]]:
    """Label -> (colour, marker, line style) of every labelled line of the figure's first axes."""
    looks = {}
    for line in fig.axes[0].get_lines():
        label = line.get_label()
        if not label.startswith("_"):
            looks[label] = (to_hex(line.get_color()), str(line.get_marker()), line.get_linestyle())
    return looks


def _close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_the_table_gives_every_row_its_own_colour_marker_and_line():
    keys = [(look.colour, look.marker, look.linestyle) for look in LOOKS.values()]
    assert len(set(keys)) == len(keys)
    families = {}
    for look in LOOKS.values():  # a family is one colour
        families.setdefault(look.family, set()).add(look.colour)
    assert all(len(colours) == 1 for colours in families.values())
    assert len({next(iter(c)) for c in families.values()}) == len(families)  # and no two families share one


@pytest.mark.parametrize("name", ["someone-elses-method", "another-new-method", "x", "kd-meta", "BIG NAME"])
def test_a_method_beyond_the_table_never_takes_a_table_colour_and_always_the_same_one(name):
    table_colours = {look.colour.lower() for look in LOOKS.values()}
    assert look_for(name).colour.lower() not in table_colours
    assert look_for(name) == look_for(name)


@pytest.mark.parametrize("name, base, linestyle", [
    ("pooled-fomaml", "fomaml", "--"),
    ("prototypes+frozen-classifier", "prototypes", "-."),
    ("fedavg-ft+head-only", "fedavg-ft", "-."),
    ("meta-learned (maml)", "maml", "-"),
    ("FedAvg-trained", "fedavg-ft", "-"),
    ("random init", "scratch", "-"),
    ("oracle (the site's own labels)", "oracle", "--"),
])
def test_variants_and_simulate_labels_take_their_familys_colour(name, base, linestyle):
    look = look_for(name)
    assert look.colour == LOOKS[base].colour and look.linestyle == linestyle
    if "+" in name:
        assert look.marker != LOOKS[base].marker


def test_the_same_method_looks_the_same_in_every_figure():
    results = _results(seeds=2)
    steps_fig, curves_fig, simulate_fig = (draw_results(results), draw_learning_curves(results),
                                           draw_dice_vs_steps(_comparison()))
    try:
        in_steps, in_curves, in_simulate = _lines(steps_fig), _lines(curves_fig), _lines(simulate_fig)
        # fomaml: a benchmark row, a training run's learning curve, `fedmeta simulate`'s meta-learned label
        assert in_steps["FOMAML"] == in_curves["FOMAML"] == in_simulate["meta-learned (fomaml) (mean)"]
        # FedAvg's training run adapted is FedAvg + fine-tune, in simulate as in the benchmark
        assert in_steps["FedAvg + fine-tune"] == in_curves["FedAvg + fine-tune"] == in_simulate["FedAvg-trained (mean)"]
        assert in_steps["scratch (random init)"] == in_simulate["random init (mean)"]
        assert in_steps["FOMAML (pooled)"] == in_curves["FOMAML (pooled)"]
        assert in_steps["someone-elses-method"] == in_curves["someone-elses-method"]
    finally:
        for fig in (steps_fig, curves_fig, simulate_fig):
            _close(fig)


@pytest.mark.parametrize("draw", ["results", "curves", "simulate"])
def test_no_two_methods_in_a_figure_look_alike(draw):
    fig = {"results": lambda: draw_results(_results()), "curves": lambda: draw_learning_curves(_results()),
           "simulate": lambda: draw_dice_vs_steps(_comparison())}[draw]()
    try:
        looks = _lines(fig)
        assert len(looks) >= 7
        assert len(set(looks.values())) == len(looks)
    finally:
        _close(fig)


def test_two_variants_that_would_share_a_marker_are_told_apart():
    names = [f"prototypes+v{i}" for i in range(14)]  # more variants than variant markers: some collide by hash
    looks = looks_for(names)
    assert len({(lk.colour, lk.marker, lk.linestyle) for lk in looks.values()}) == len(names)


@pytest.mark.parametrize("draw", ["results", "curves", "simulate"])
def test_the_legend_lies_outside_every_axes(draw):
    fig = {"results": lambda: draw_results(_results()), "curves": lambda: draw_learning_curves(_results()),
           "simulate": lambda: draw_dice_vs_steps(_comparison())}[draw]()
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        assert len(legends) == 1
        box = legends[0].get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), f"the legend overlaps {ax.get_title()!r}"
    finally:
        _close(fig)


def test_each_figure_is_written_as_png_and_pdf(tmp_path):
    results = _results()
    written = [plot_results(results, tmp_path / "dice_vs_steps.png"),
               plot_learning_curves(results, tmp_path / "learning_curves.png"),
               plot_dice_vs_steps(_comparison(), tmp_path / "simulate.png")]
    assert [p.name for p in written] == ["dice_vs_steps.png", "learning_curves.png", "simulate.png"]
    for png in written:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
    only_pdf = plot_results(results, tmp_path / "only.png", formats=("pdf",))
    assert only_pdf.suffix == ".pdf" and not (tmp_path / "only.png").exists()


def test_an_unknown_format_is_refused_before_anything_is_drawn(tmp_path):
    with pytest.raises(ValueError, match=r"formats=\('jpeg',\).*png, pdf, svg"):
        plot_results(_results(), tmp_path / "x.png", formats=("jpeg",))
    assert not list(tmp_path.iterdir())


def _texts(fig) -> str:
    return " ".join(" ".join(t.get_text() for t in fig.findobj(Text)).split())  # wrapped lines joined


@pytest.mark.parametrize("seeds", [1, 3])
def test_one_seed_says_no_plus_minus_and_draws_no_band_several_do(seeds):
    for fig in (draw_results(_results(seeds=seeds)), draw_learning_curves(_results(seeds=seeds))):
        try:
            bands = [c for ax in fig.axes for c in ax.collections if type(c).__name__ in ("PolyCollection",
                                                                                            "FillBetweenPolyCollection")]
            if seeds == 1:
                assert "±" not in _texts(fig) and "one seed" in _texts(fig) and not bands
            else:
                assert "± 95% t-interval over 3 seeds" in _texts(fig) and bands
        finally:
            _close(fig)
    fig = draw_dice_vs_steps(_comparison())  # simulate's comparison is one training seed
    try:
        assert "±" not in _texts(fig)
    finally:
        _close(fig)


def test_auto_is_a_marker_at_the_mean_count_chosen_apart_from_the_curve():
    fig = draw_results(_results(seeds=2, steps=(0, 5, 10), auto="chosen"))
    try:
        ax = fig.axes[0]
        assert [t.get_text() for t in fig.axes[-1].get_xticklabels()] == ["0", "5", "10"]  # the bottom row's
        autos = [container.lines[0] for container in ax.containers]  # the auto points, with their interval
        # seeds 0 and 1 chose 1 and 2 steps: drawn at 1.5, one per adapting method, none for fedavg/oracle/intensity
        assert autos and {float(line.get_xdata()[0]) for line in autos} == {1.5}
        assert len(autos) == len(METHODS) - 3
        curve = next(line for line in ax.get_lines() if line.get_label() == "FOMAML")
        assert list(curve.get_xdata()) == [0, 5, 10]  # auto is not on the curve
    finally:
        _close(fig)


def test_auto_as_the_benchmark_preset_spells_it_fixed_steps_and_a_flag():
    results = _results(seeds=2, steps=(0, 5, 10), auto="chosen")
    results["preset"]["steps"], results["preset"]["auto-steps"] = [0, 5, 10], True
    fig = draw_results(results)
    try:
        assert {float(c.lines[0].get_xdata()[0]) for c in fig.axes[0].containers} == {1.5}
    finally:
        _close(fig)


def test_auto_without_a_recorded_count_gets_its_own_tick_right_of_the_fixed_ones():
    for fig in (draw_results(_results(steps=(0, 5, 10), auto="unrecorded")),
                draw_dice_vs_steps({**_comparison(steps=(0, 5, "auto"))})):
        try:
            ax = fig.axes[-1]  # the bottom row: shared x axes label only there
            labels = [t.get_text() for t in ax.get_xticklabels()]
            assert labels[-1] == "auto" and labels[:-1] == (["0", "5", "10"] if len(labels) == 4 else ["0", "5"])
            assert ax.get_xticks()[-1] > ax.get_xticks()[-2]
        finally:
            _close(fig)


def test_results_without_auto_keep_the_fixed_steps_only():
    fig = draw_results(_results(steps=(0, 1, 5)))
    try:
        assert [t.get_text() for t in fig.axes[-1].get_xticklabels()] == ["0", "1", "5"]
        assert "auto" not in _texts(fig)
    finally:
        _close(fig)


def test_titles_fit_inside_the_figure():
    results = _results()
    results["eval_sites"] = {f"a-very-long-hospital-name-{i}": "unseen-annotation-and-sequence" for i in range(4)}
    for name in METHODS:
        results["dice"][name]["0"] = {site: results["dice"][name]["0"]["new-annotation"]
                                      for site in results["eval_sites"]}
    fig = draw_results(results)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        frame = fig.bbox
        for ax in fig.axes:
            title = ax.title.get_window_extent(renderer)
            assert title.x0 >= frame.x0 - 1 and title.x1 <= frame.x1 + 1
        assert fig._suptitle.get_window_extent(renderer).x1 <= frame.x1 + 1
    finally:
        _close(fig)


def test_the_plots_are_the_ones_the_callers_import():
    from fedmeta.simulations.experiments import benchmark, comparison

    assert benchmark.plot_results is figures.plot_results and benchmark.plot_learning_curves is figures.plot_learning_curves
    assert comparison.plot_dice_vs_steps is figures.plot_dice_vs_steps
