"""`fedmeta variants`: every test-time adaptation variant scored on validation sites, for trained checkpoints.

Fine-tuning a meta-learned start on unfamiliar data can lose what it began with (issue 27: prototypes best at
0 steps on a real scan, down 0.11 with steps). The variants of :mod:`fedmeta.common.adaptation_variants` try to
keep it. This scores every variant that applies to each checkpoint × k × steps (the fixed counts and ``auto``)
× seeds on the sites it is given — the **validation** sites: a variant is promoted on these numbers, so the
held-out test sites must never be passed here. Per seed the score is the mean over sites of the per-patient
Dice (``fedmeta.common.adaptation.score_site``: every variant and checkpoint adapts on the very same support
slices and is scored on the very same patients); the table gives the mean over seeds and its min–max, and
each variant's paired difference from ``fine-tune``.

    fedmeta variants --checkpoint fedavg=runs/a/checkpoint.pt --checkpoint prototypes=runs/b/checkpoint.pt \\
        --sites FEDERATION/site-02,FEDERATION/site-03 --seeds 0,1,2 --out runs/variants
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

# torch and numpy load inside the work: `fedmeta variants --help` answers without them.
AUTO = "auto"  # fedmeta.common.step_selection.AUTO
DEFAULT = "fine-tune"  # fedmeta.common.adaptation_variants.DEFAULT
SHOTS = (1, 5, 10)
STEPS: tuple[int | str, ...] = (0, 5, 10, 20, AUTO)
SEEDS = (0, 1, 2)
RESULTS_NAME, TABLE_NAME = "variants.json", "variants.md"
SCORE_LINE_EVERY_S = 10.0  # a line per scored variant at most this often (common.progress paces adapt at 5 s)


def score_variants(
    checkpoints: Mapping[str, Path | str],
    sites: Sequence[Path | str],
    *,
    variants: Sequence[str] | None = None,
    shots: Sequence[int] = SHOTS,
    steps: Sequence[int | str] = STEPS,
    seeds: Sequence[int] = SEEDS,
    max_images: int | None = None,
    progress: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Dice of every applicable variant of each checkpoint on ``sites`` (site folders), strict-JSON ready.

    ``variants``: names (default: every registered one); one that does not apply to a checkpoint (frozen
    prototypes on a plain UNet, norm-only on affine-free InstanceNorm) is listed under ``not_applicable`` with the
    reason. ``max_images`` bounds each site's evaluation slices, whole patients (None: the checkpoint's
    eval-max-images; 0: every patient). ``auto`` chooses its count from the support slices, up to the largest
    fixed count (20 without one). Returns ``{"settings", "checkpoints", "variants", "not_applicable", "scores"}``
    where ``scores[checkpoint][variant][k][steps]`` holds ``per_seed`` (the mean over sites), ``mean``, ``min``,
    ``max``, ``per_site`` (a list over seeds per site), ``delta_vs_fine_tune`` (the paired difference per seed,
    when fine-tune is scored) and, for ``auto``, ``chosen_steps`` (per seed, per site).
    """
    from fedmeta.common.adaptation import load_initialisation, score_site
    from fedmeta.common.adaptation_variants import VARIANTS, variant_named
    from fedmeta.common.data import SiteDataset
    from fedmeta.common.model import build_model
    from fedmeta.common.outputs import file_sha256
    from fedmeta.common.progress import paced
    from fedmeta.common.read_limits import ReadLimits

    names = list(VARIANTS) if variants is None else [variant_named(v).name for v in variants]
    shots, steps, seeds = _checked(shots, steps, seeds)
    if not checkpoints:
        raise ValueError("no --checkpoint: give at least one NAME=PATH of a trained run's checkpoint.pt.")
    if not sites:
        raise ValueError("no --sites: give the validation site folders to score on.")
    fixed = [s for s in steps if s != AUTO]
    auto_max = max(fixed) if fixed else None
    say = progress or (lambda line: None)
    for site in sites:
        role = _federation_role(Path(site))
        if role is not None and role != "train":
            say(f"warning: {site} is a {role} site of its federation (its manifest.json says so): a variant promoted "
                "on it is chosen on the test sites. Pass validation sites (training sites kept out of training, e.g. "
                "the benchmark's validation-sites) instead.")
    started, say_done = time.monotonic(), paced(say, SCORE_LINE_EVERY_S)
    result: dict[str, Any] = {
        "settings": {"shots": list(shots), "steps": [str(s) for s in steps], "seeds": list(seeds),
                     "sites": [str(Path(s)) for s in sites], "max_images": max_images, "auto_max_steps": auto_max},
        "checkpoints": {}, "variants": {n: VARIANTS[n].description for n in names}, "not_applicable": {}, "scores": {},
    }
    for label, path in checkpoints.items():
        init, config = load_initialisation(path, label)
        model = build_model(config.model_config())
        data_config = config.data_config(limits=ReadLimits.from_environment())
        loaded = [SiteDataset.load(Path(site), data_config) for site in sites]
        site_names = _unique_names(loaded)
        bound = config.eval_max_images if max_images is None else max_images
        result["checkpoints"][label] = {"path": str(path), "algorithm": config.algorithm, "round": init.round,
                                        "sha256": file_sha256(Path(path)), "max_images": bound}
        reasons = {n: VARIANTS[n].why_not(config.algorithm) or VARIANTS[n].why_not(model) for n in names}
        result["not_applicable"][label] = {n: r for n, r in reasons.items() if r is not None}
        scored = [n for n in names if reasons[n] is None]
        # raw[variant][seed][site][k][steps] -> summary
        raw: dict[str, dict[int, dict[str, dict]]] = {n: {} for n in scored}
        for seed in seeds:
            splits: dict = {}  # every variant adapts on the same slices and is scored on the same patients
            for site, site_name in zip(loaded, site_names):
                for name in scored:
                    raw[name].setdefault(seed, {})[site_name] = score_site(
                        model, init, site, shots=shots, steps=steps, seed=seed, num_classes=config.num_classes,
                        max_images=bound, batch_size=config.eval_batch_size, splits=splits, auto_max_steps=auto_max,
                        variant=name)
                    say_done(f"  variants: {label} seed {seed} {site_name} {name} done "
                             f"({time.monotonic() - started:.0f} s)")
        result["scores"][label] = _summarise(raw, site_names, shots, steps, seeds)
        say(f"variants: {label} scored: {len(scored)} variant(s), {len(names) - len(scored)} not applicable "
            f"({time.monotonic() - started:.0f} s)")
    return result


def _summarise(raw, site_names, shots, steps, seeds) -> dict[str, Any]:
    import numpy as np

    out: dict[str, Any] = {}
    for name, by_seed in raw.items():
        out[name] = {}
        for k in shots:
            out[name][str(k)] = {}
            for s in steps:
                per_site = {site: [float(by_seed[seed][site][k][s]["dice"]) for seed in seeds] for site in site_names}
                per_seed = [float(np.mean([per_site[site][i] for site in site_names])) for i in range(len(seeds))]
                cell: dict[str, Any] = {"per_seed": per_seed, "mean": float(np.mean(per_seed)), "min": min(per_seed),
                                        "max": max(per_seed), "per_site": per_site,
                                        "worst_site": float(np.mean([min(v[i] for v in per_site.values())
                                                                     for i in range(len(seeds))]))}
                if s == AUTO:
                    cell["chosen_steps"] = {site: [int(by_seed[seed][site][k][s]["chosen_steps"]) for seed in seeds]
                                            for site in site_names}
                out[name][str(k)][str(s)] = cell
    if DEFAULT in out:
        for name in out:
            for k, cells in out[name].items():
                for s, cell in cells.items():
                    delta = [a - b for a, b in zip(cell["per_seed"], out[DEFAULT][k][s]["per_seed"])]
                    cell["delta_vs_fine_tune"] = {"per_seed": delta, "mean": float(np.mean(delta)), "min": min(delta),
                                                  "max": max(delta)}
    return out


def markdown_table(result: Mapping[str, Any]) -> str:
    """The results as markdown: per k, a row per checkpoint and variant, a column per step count."""
    settings = result["settings"]
    steps = settings["steps"]
    lines = [
        "# Test-time adaptation variants (validation sites)",
        "",
        f"Sites: {', '.join(Path(s).name for s in settings['sites'])}; seeds {settings['seeds']}. Each cell: mean over "
        "seeds of the mean over sites of per-patient Dice [min–max over seeds]; `auto` chooses its count from the "
        f"support slices alone (up to {settings['auto_max_steps']}). Δ: paired difference from fine-tune at the same "
        "k and steps, mean [min, max] over seeds.",
        "",
    ]
    judged = AUTO if AUTO in steps else steps[-1]  # the column the Δ is shown for: auto when scored
    for k in settings["shots"]:
        lines += [f"## k = {k}", "", "| checkpoint | variant | " + " | ".join(f"{s} steps" if s != AUTO else AUTO
                                                                              for s in steps)
                  + f" | Δ {judged if judged == AUTO else f'{judged} steps'} |",
                  "|---|---|" + "---|" * (len(steps) + 1)]
        for label, by_variant in result["scores"].items():
            for name, cells in by_variant.items():
                row = [f"{cells[str(k)][s]['mean']:.3f} [{cells[str(k)][s]['min']:.3f}–{cells[str(k)][s]['max']:.3f}]"
                       for s in steps]
                delta = cells[str(k)][judged].get("delta_vs_fine_tune")
                shown = "" if delta is None or name == DEFAULT else \
                    f"{delta['mean']:+.3f} [{delta['min']:+.3f}, {delta['max']:+.3f}]"
                lines.append(f"| {label} | {name} | " + " | ".join(row) + f" | {shown} |")
        lines.append("")
    skipped = [(label, name, why) for label, reasons in result["not_applicable"].items() for name, why in reasons.items()]
    if skipped:
        lines += ["Not applicable:", ""] + [f"- {label}, {name}: {why}" for label, name, why in skipped] + [""]
    lines += ["Variants:", ""] + [f"- `{name}`: {text}" for name, text in result["variants"].items()] + [""]
    return "\n".join(lines)


def _checked(shots, steps, seeds):
    shots = [int(k) for k in shots]
    if not shots or any(k < 1 for k in shots):
        raise ValueError(f"--shots {shots}: labelled slices per site, integers >= 1 such as 1,5,10.")
    parsed: list[int | str] = []
    for s in steps:
        if s == AUTO:
            parsed.append(AUTO)
        elif isinstance(s, int) and not isinstance(s, bool) and s >= 0:
            parsed.append(s)
        else:
            raise ValueError(f"--steps {list(steps)}: step counts >= 0 or '{AUTO}', such as 0,5,10,20,{AUTO}.")
    if not parsed or len(set(parsed)) != len(parsed):
        raise ValueError(f"--steps {list(steps)}: give each count once, e.g. 0,5,10,20,{AUTO}.")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {seeds}: distinct integers, e.g. 0,1,2.")
    return shots, parsed, seeds


def _federation_role(site: Path) -> str | None:
    """The role (train, heldout) a synthetic federation's manifest.json beside ``site`` gives it, or None when
    there is no readable manifest (a real site: nothing tells, and nothing is said)."""
    import json

    try:
        manifest = json.loads((site.parent / "manifest.json").read_text())
        roles = {str(s.get("path") or s.get("name")): s.get("role") for s in manifest.get("sites", [])}
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    role = roles.get(site.name)
    return str(role) if role is not None else None


def _unique_names(sites) -> list[str]:
    names = [site.name for site in sites]
    if len(set(names)) != len(names):
        names = [str(site.root) for site in sites]
    return names


# -- the command ---------------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "variants", help="score every test-time adaptation variant of trained checkpoints on validation sites",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH",
                        help="a trained run's checkpoint.pt and the name its rows carry (repeatable)")
    parser.add_argument("--sites", action="append", required=True, metavar="DIR[,DIR...]",
                        help="validation site folders (comma-separated or repeated); never the held-out test sites")
    parser.add_argument("--variants", default="all",
                        help="comma-separated names, or all (default): fedmeta.common.adaptation_variants.VARIANTS "
                             "(fine-tune, head-only, norm-only, bias-only, proximal-MU, ensemble, frozen-prototypes)")
    parser.add_argument("--shots", default=",".join(map(str, SHOTS)), help="k values (default 1,5,10)")
    parser.add_argument("--steps", default=",".join(map(str, STEPS)), help="step counts and auto (default 0,5,10,20,auto)")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="support/evaluation splits (default 0,1,2)")
    parser.add_argument("--max-images", type=int, default=None,
                        help="evaluation slices per site, whole patients (default: the checkpoint's eval-max-images; 0 = all)")
    parser.add_argument("--out", type=Path, default=Path("runs/variants"), help="output folder (default runs/variants)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier fedmeta variants output in --out")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from fedmeta.common.outputs import OutputRefused, Outputs

    try:
        checkpoints = _pairs(args.checkpoint)
        sites = [Path(part) for value in args.sites for part in value.split(",") if part]
        outputs = Outputs(args.out, "variants")
        outputs.check([RESULTS_NAME, TABLE_NAME], overwrite=args.overwrite)
        result = score_variants(
            checkpoints, sites, variants=None if args.variants == "all" else _list(args.variants),
            shots=_integers("--shots", args.shots, "1,5,10"), steps=_step_list(args.steps),
            seeds=_integers("--seeds", args.seeds, "0,1,2"), max_images=args.max_images)
        outputs.claim([RESULTS_NAME, TABLE_NAME], overwrite=args.overwrite)
        outputs.write_json(RESULTS_NAME, result)
        outputs.write_text(TABLE_NAME, markdown_table(result))
    except (ValueError, FileNotFoundError, OutputRefused) as err:
        print(f"fedmeta variants: error: {err}", file=sys.stderr)
        return 1
    print(f"results: {args.out / RESULTS_NAME}\ntable: {args.out / TABLE_NAME}")
    return 0


def _list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _integers(option: str, value: str, example: str) -> list[int]:
    """``--shots``/``--seeds`` as integers, or a ValueError naming the value and an example."""
    try:
        return [int(part) for part in _list(value)]
    except ValueError:
        raise ValueError(f"{option} {value!r}: comma-separated integers, e.g. {option} {example}.") from None


def _step_list(value: str) -> list[int | str]:
    """``--steps``: counts and ``auto`` (any case), or a ValueError naming the value and an example."""
    steps: list[int | str] = []
    for part in _list(value):
        if part.lower() == AUTO:
            steps.append(AUTO)
            continue
        try:
            steps.append(int(part))
        except ValueError:
            raise ValueError(f"--steps {value!r}: {part!r} is neither a step count nor {AUTO}; give e.g. "
                             f"--steps 0,5,10,20,{AUTO}.") from None
    return steps


def _pairs(values: Sequence[str]) -> dict[str, Path]:
    pairs: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--checkpoint {value!r}: give NAME=PATH, e.g. prototypes=runs/proto/checkpoint.pt.")
        if name in pairs:
            raise ValueError(f"--checkpoint {value!r}: the name {name!r} is given twice; each row needs its own name.")
        pairs[name] = Path(path)
    return pairs


__all__ = ["SEEDS", "SHOTS", "STEPS", "markdown_table", "register", "score_variants"]
