"""What a hospital runs on its own data: `fedmeta check-data` and `fedmeta evaluate`.

``check-data`` lists every problem with a site folder before it joins a federation.
``evaluate`` answers how well a saved initialisation adapts to the site, given k labelled slices.
Any checkpoint the ServerApp wrote (its run config names the model and the adaptation rule: Meta-SGD
adapts with its learned step sizes, ANIL only its head) on any site folder — a generated site, an
MSD task folder, or paired ``*_img``/``*_seg`` files. The site's patients are split once per seed
into a support pool and evaluation patients (``fedmeta.common.data.adaptation_patients``); θ is
fine-tuned on k support slices by ``fedmeta.common.adaptation.adaptation_curve``, the inner step
training and the ClientApp use, and scored by Dice per evaluation patient over the whole volume in the
site's own labels (``fedmeta.common.adaptation.score_site``, which ``fedmeta simulate`` and
``fedmeta benchmark`` score with too).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from fedmeta.common.read_limits import ReadLimits
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# fedmeta.common loads inside the handlers: `fedmeta --help` imports every command module, and fedmeta.common.config
# alone pulls in torch (~4 s, python -X importtime).

DEFAULT_SHOTS = (1, 5, 10)
METRIC = ("Dice per evaluation patient over the whole volume, per foreground class the site declares (an "
          "undeclared class is background), mean over classes then patients; a class absent from truth and "
          "prediction scores 1")
DEFAULT_STEPS = (0, 1, 5, 10, 20)
AUTO = "auto"  # fedmeta.common.step_selection.AUTO, here without its torch import (`fedmeta --help`)
# --lr-scale multiplies the step size the consortium trained with; beyond this, adaptation diverges for any
# network (and a smaller scale that still diverges is refused by name, step and all).
MAX_LR_SCALE = 1000.0


def register(subparsers: argparse._SubParsersAction) -> None:
    check = subparsers.add_parser(
        "check-data",
        help="list every problem with a site's (or a federation's) data; exit 1 if any",
        description="Checks each case (readable, 3D, image/label shapes and affines agree, no NaN/Inf, label "
        "values declared, labels not empty, partner file present) and each site (enough patients for "
        "episodes whose support and query come from different patients).",
    )
    check.add_argument("root", type=Path, help="a site folder (dataset.json) or a federation root")
    check.add_argument("--k", type=int, default=5, help="support slices per episode (default 5)")
    check.add_argument("--q", type=int, default=10, help="query slices per episode (default 10)")
    check.add_argument("--num-classes", type=int, default=None,
                       help="classes the model predicts (default: --plan's, else the labels each site's dataset.json "
                            "declares, else 4)")
    check.add_argument("--image-glob", default=None, help="for non-MSD folders, e.g. '*_img.nii.gz'")
    check.add_argument("--label-glob", default=None, help="for non-MSD folders, e.g. '*_seg.nii.gz'")
    check.add_argument("--plan", type=Path, default=None,
                       help="the federation's plan (fedmeta plan's folder, or its run-config.toml): also warn about "
                            "voxel sizes far from its spacing, and take its num-classes")
    check.set_defaults(handler=check_data)

    parser = subparsers.add_parser(
        "evaluate",
        help="adapt a saved initialisation to a site with k labelled slices and report Dice",
        description="Adapt a saved initialisation to a site with k labelled slices and report Dice on its "
        "other patients.",
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint.pt written by the ServerApp")
    parser.add_argument("--data", type=Path, required=True, action="append",
                        help="site folder (dataset.json + imagesTr/labelsTr, or use --image-glob/--label-glob); repeatable")
    parser.add_argument("--shots", default=",".join(map(str, DEFAULT_SHOTS)),
                        help="labelled support slices k, comma-separated (default: 1,5,10)")
    parser.add_argument("--steps", default=",".join(map(str, DEFAULT_STEPS)),
                        help="adaptation step counts, comma-separated (default: 0,1,5,10,20; each at most 10,000, "
                             "fedmeta's cap on every step count); 'auto' among them also scores the count chosen "
                             "from the k support slices alone, as fedmeta adapt chooses it, e.g. 0,5,10,auto")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="with auto in --steps: the largest count it may choose (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the support/evaluation patient split (default 0)")
    parser.add_argument("--max-images", type=int, default=0,
                        help="bound the evaluation slices per site, in whole patients taken in a seeded order "
                             "(default 0: every evaluation patient)")
    parser.add_argument("--image-glob", help="for non-MSD folders, e.g. '*_img.nii.gz'")
    parser.add_argument("--label-glob", help="for non-MSD folders, e.g. '*_seg.nii.gz'")
    parser.add_argument("--lr-scale", type=float, default=1.0,
                        help="multiply the adaptation step size (the run's inner-lr, or Meta-SGD's learned rates) by "
                             "this factor, e.g. to tune fine-tuning on a validation site (default 1; at most 1000; an "
                             "adaptation that diverges is refused)")
    parser.add_argument("--variant", default=None,
                        help="how each site adapts (default: what the checkpoint's run config names, adapt-variant): "
                             "fine-tune, head-only, norm-only, bias-only, proximal-0.1|1|10|100, ensemble or "
                             "frozen-prototypes "
                             "(fedmeta.common.adaptation_variants)")
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a --json file an earlier fedmeta evaluate wrote (never another file)")
    parser.add_argument("--public-key", type=Path,
                        help="the consortium's Ed25519 release key (PEM): the checkpoint must carry a signature "
                             "(fedmeta sign) that verifies with it (default: $FEDMETA_RELEASE_KEY, else release.pub "
                             "in the current folder, as fedmeta provision ships it in each site bundle)")
    parser.add_argument("--allow-unsigned", action="store_true",
                        help="use a checkpoint without checking a signature (your own runs; never a release)")
    parser.set_defaults(handler=evaluate)


def check_data(args: argparse.Namespace) -> int:
    # fedmeta.common.validate loads numpy: +45-85 ms on `fedmeta check-data --help` (and evaluate, adapt, predict),
    # which import this module (python -X importtime).
    from fedmeta.common.validate import check_path, format_reports

    try:
        planned, num_classes, channels = None, args.num_classes, None
        if args.plan is not None:
            planned, planned_classes, channels = planned_spacing(args.plan)
            num_classes = planned_classes if num_classes is None else num_classes
        reports = check_path(args.root, num_classes=num_classes, k=args.k, q=args.q,
                             image_glob=args.image_glob, label_glob=args.label_glob,
                             limits=ReadLimits.from_environment(), planned_spacing=planned,
                             planned_channels=channels)
    except (FileNotFoundError, ValueError) as err:
        print(f"fedmeta check-data: {err}", file=sys.stderr)
        return 2
    print(format_reports(reports))
    bad = [r for r in reports if not r.ok]
    print(f"{len(reports) - len(bad)}/{len(reports)} site(s) clean")
    return 1 if bad else 0


def planned_spacing(plan: Path) -> tuple[tuple[float, float, float], int, tuple[int, tuple[str, ...]]]:
    """The (R, A, S) spacing in mm, the class count and the (in-channels, channel names) a plan (``fedmeta plan``'s
    folder or its run-config.toml) sets; a ValueError naming the file when it is not one."""
    import tomllib

    path = plan / "run-config.toml" if plan.is_dir() else plan
    try:
        keys = tomllib.loads(path.read_text(encoding="utf-8"))
        in_plane = float(keys["spacing-mm"])
        between = float(keys.get("slice-spacing-mm", 0.0)) or in_plane
        names = tuple(c.strip() for c in str(keys.get("channels", "")).split(",") if c.strip())
        return (in_plane, in_plane, between), int(keys.get("num-classes", 4)), (int(keys.get("in-channels", 1)), names)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"--plan {plan}: {path} is not a plan's run-config.toml with spacing-mm ({type(err).__name__}: "
                         f"{err}). Fix: pass the folder `fedmeta plan --out` wrote.") from None


def output_problem(path: Path | None, option: str) -> str | None:
    """Why ``path`` cannot be written (checked before the work, not after it), or None."""
    if path is None:
        return None
    if path.is_dir():
        return f"{option} {path}: is a folder; give a file name, e.g. {path / 'results.json'}."
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{option} {path}: {parent} is a file, not a folder; choose another path."
            if not os.access(parent, os.W_OK):
                return f"{option} {path}: {parent} is not writable; choose another path."
            return None
    return None


def evaluate(args: argparse.Namespace) -> int:
    try:
        problem = output_problem(args.json, "--json")
        if problem:
            raise ValueError(problem)
        json_out = _json_output(args.json)
        if json_out is not None:  # refused before the work, not after it
            json_out.check([args.json.name], overwrite=args.overwrite)
        shots = parse_counts(args.shots, "--shots", minimum=1)
        from fedmeta.common.config import MAX_STEPS  # torch, MONAI: +2 s on this module's import (--help)

        steps = parse_steps(args.steps, maximum=MAX_STEPS)
        if args.max_steps is not None and not 0 <= args.max_steps <= MAX_STEPS:
            raise ValueError(f"--max-steps {args.max_steps}: the most steps auto may choose, an integer from 0 to "
                             f"{MAX_STEPS:,}; the default, 20, suits a few-shot adaptation.")
        if args.max_steps is not None and AUTO not in steps:
            raise ValueError(f"--max-steps {args.max_steps}: bounds the count auto chooses, and --steps {args.steps!r} "
                             "holds no auto. Drop --max-steps, or add auto to --steps (e.g. 0,5,10,auto).")
        args.public_key = default_public_key(args.public_key)
        release = verified_release(args)
        results = evaluate_checkpoint(
            args.checkpoint, args.data, shots=shots, steps=steps, seed=args.seed, max_images=args.max_images,
            image_glob=args.image_glob, label_glob=args.label_glob, lr_scale=args.lr_scale,
            limits=ReadLimits.from_environment(), auto_max_steps=args.max_steps, variant=args.variant,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"fedmeta evaluate: error: {err}", file=sys.stderr)
        return 1
    results["release"] = release or {"verified": False}
    print(format_table(results))
    if json_out is not None:
        try:
            json_out.claim([args.json.name], overwrite=args.overwrite)
            json_out.write_json(args.json.name, results)
        except ValueError as err:  # the file appeared while evaluating
            print(f"fedmeta evaluate: error: {err}", file=sys.stderr)
            return 1
        print(f"written: {args.json}")
    return 0


def _json_output(path: Path | None):
    """The guarded writer of ``--json`` (``fedmeta.common.outputs``): never a file evaluate did not write."""
    from fedmeta.common.outputs import Outputs  # +8 ms on this module's import: check-data/predict --help

    return None if path is None else Outputs(Path(path).parent, "evaluate", option="--json")


def default_public_key(given: Path | None) -> Path | None:
    """``--public-key``; else ``$FEDMETA_RELEASE_KEY``; else ``./release.pub`` when this is a site bundle whose
    ``site.json`` (written by ``fedmeta provision``) pins that key's fingerprint. A ``release.pub`` lying in
    the current folder without that pin is not taken: it may have come with the checkpoint it would verify."""
    if given is not None:
        return given
    env = os.environ.get("FEDMETA_RELEASE_KEY")
    if env:
        return Path(env)
    bundled, site_json = Path("release.pub"), Path("site.json")
    if not bundled.is_file() or not site_json.is_file():
        return None
    # fedmeta.common.release loads cryptography: +19 ms on this module's import (check-data/predict --help).
    from fedmeta.common.release import key_fingerprint, load_public_key

    try:
        pinned = json.loads(site_json.read_text()).get("release_key_sha256")
    except (OSError, ValueError, AttributeError):
        pinned = None
    if not pinned:
        return None
    if key_fingerprint(load_public_key(bundled)) != pinned:
        raise ValueError(f"{bundled.resolve()}: its fingerprint is not the one {site_json} pins "
                         f"({str(pinned)[:16]}...): the file was replaced. Restore the bundle's release.pub, or pass the "
                         "consortium's key with --public-key.")
    return bundled


def verified_release(args: argparse.Namespace) -> dict | None:
    """The checkpoint's signed release metadata, checked before the checkpoint is used (fedmeta.common.release)."""
    from fedmeta.common.release import verify  # cryptography: lazy, see default_public_key

    if not args.checkpoint.is_file():
        return None  # evaluate_checkpoint names the missing file
    if args.public_key is not None and Path(args.public_key).resolve().parent == args.checkpoint.resolve().parent:
        print(f"warning: the key {args.public_key} lies beside the checkpoint it verifies; a key that travels with "
              "the file proves nothing. Use the consortium's key from your site bundle.", file=sys.stderr)
    release = verify(args.checkpoint, args.public_key, allow_unsigned=args.allow_unsigned)
    if release is None:
        print(f"warning: {args.checkpoint} is used unverified (--allow-unsigned)", file=sys.stderr)
    else:
        print(f"release {release['release_id']} verified (round {release['round']}, key "
              f"{release['signing_key_sha256'][:16]})")
    return {"verified": True, **release} if release else None


def parse_counts(text: str, option: str, *, minimum: int, maximum: int | None = None,
                 name_value: bool = True) -> list[int]:
    """'1,5,10' -> [1, 5, 10], refusing anything else (or a count above ``maximum``) with the option named (and the
    value, unless ``option`` already names it: ``name_value=False``)."""
    said = f"{option} {text!r}" if name_value else option
    try:
        values = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v < minimum for v in values):
        raise ValueError(f"{said}: expected comma-separated integers >= {minimum}, e.g. "
                         f"{'1,5,10' if minimum else '0,5,10'}.")
    if maximum is not None and max(values) > maximum:
        raise ValueError(f"{said}: {max(values):,} is more than the {maximum:,} fedmeta allows (few-shot "
                         "adaptation takes 5-50 steps; this many would run for days). Give smaller counts, e.g. 0,5,10.")
    return sorted(set(values))


def parse_steps(text: str, *, maximum: int) -> list[int | str]:
    """'0,5,10,auto' -> [0, 5, 10, 'auto']: step counts as :func:`parse_counts` reads them, and ``auto`` (the count
    chosen from the support slices, ``fedmeta.common.step_selection``) last."""
    parts = [part.strip() for part in str(text).split(",") if part.strip()]
    auto = [AUTO] if any(part.lower() == AUTO for part in parts) else []
    counts = [part for part in parts if part.lower() != AUTO]
    if auto and not counts:
        return auto
    try:
        values = [int(part) for part in counts]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise ValueError(f"--steps {text!r}: expected comma-separated integers >= 0, and/or auto (the count chosen "
                         "from the support slices), e.g. 0,5,10,auto.")
    return parse_counts(",".join(counts), f"--steps {text!r}", minimum=0, maximum=maximum, name_value=False) + auto


def evaluate_checkpoint(
    checkpoint: Path | str,
    data: Sequence[Path | str],
    *,
    shots: Sequence[int] = DEFAULT_SHOTS,
    steps: Sequence[int | str] = DEFAULT_STEPS,
    seed: int = 0,
    max_images: int | None = None,
    image_glob: str | None = None,
    label_glob: str | None = None,
    lr_scale: float = 1.0,
    limits: ReadLimits = ReadLimits(),
    auto_max_steps: int | None = None,
    variant: str | None = None,
    progress=print,
) -> dict[str, Any]:
    """Every number of ``fedmeta evaluate``: per site, k and step count, Dice (mean and per class). ``steps`` may
    hold ``"auto"``: the count chosen from the k support slices alone (candidates up to ``auto_max_steps``,
    default 20), reported with ``chosen_steps`` and its ``step_choice`` record beside the Dice. ``variant``: how
    each site adapts (None: the checkpoint's ``adapt-variant``)."""
    # torch and MONAI: +2 s on this module's import, which every client command's --help pays (python -X importtime).
    from fedmeta.common.adaptation import load_initialisation
    from fedmeta.common.data import SiteDataset  # torch: as above
    from fedmeta.common.model import build_model  # torch, MONAI: as above
    from fedmeta.common.adaptation_variants import check_applies, variant_named  # torch: as above
    from fedmeta.client.adapt import reading_progress  # torch: as above

    if not (math.isfinite(lr_scale) and 0 < lr_scale <= MAX_LR_SCALE):
        raise ValueError(f"--lr-scale {lr_scale}: must be a positive number at most {MAX_LR_SCALE:g}, e.g. 0.5 or 2 (a "
                         f"step size more than {MAX_LR_SCALE:g} times the one the consortium trained with diverges).")
    init, config = load_initialisation(checkpoint)
    if lr_scale != 1.0:
        scaled = ({n: a * lr_scale for n, a in init.inner_lr.items()} if isinstance(init.inner_lr, dict)
                  else init.inner_lr * lr_scale)
        init = dataclasses.replace(init, inner_lr=scaled, label=f"{init.label}, step size x{lr_scale:g}")
    if variant is not None:
        init = dataclasses.replace(init, variant=variant_named(variant).name)  # an unknown name: refused here
    data_config = config.data_config(
                             image_glob=image_glob, label_glob=label_glob, limits=limits)
    max_images = 0 if max_images is None else max_images
    if max_images < 0:
        raise ValueError(f"--max-images {max_images}: must be >= 0 (0 scores every evaluation patient).")
    model = build_model(config.model_config())
    check_applies(variant_named(init.variant), model)  # before any site is read
    sites = {}
    for root in data:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"--data {root}: not a folder; pass a site folder (dataset.json, imagesTr/, labelsTr/).")
        if (root / "manifest.json").is_file() and not (root / "dataset.json").is_file():
            raise ValueError(f"--data {root} is a whole federation; pass one of its site folders, e.g. {root}/<site>.")
        progress(f"loading site {root}")
        site = SiteDataset.load(root, data_config, on_case=reading_progress(progress))
        progress(f"loaded site {site.name}: {site.num_patients} usable patient(s)")
        sites[site.name] = {
            "path": str(root),
            "patients": site.num_patients,
            "skipped_cases": len(site.skipped),
            "dice": _str_keys(_scored(model, init, site, checkpoint, lr_scale, shots=shots, steps=steps, seed=seed,
                                      num_classes=config.num_classes, max_images=max_images,
                                      batch_size=config.eval_batch_size, auto_max_steps=auto_max_steps,
                                      progress=progress)),
        }
    return {
        "checkpoint": str(checkpoint),
        "initialisation": init.label,
        "algorithm": config.algorithm,
        "adaptation": {"inner_lr": "learned per parameter (Meta-SGD)" if isinstance(init.inner_lr, dict)
                       else init.inner_lr, "lr_scale": lr_scale, "head_only": init.head_only,
                       "variant": init.variant},
        "shots": list(shots),
        "steps": list(steps),
        "seed": seed,
        "max_images": max_images,
        "metric": METRIC,
        "sites": sites,
    }


def _scored(model, init, site, checkpoint, lr_scale: float, *, shots, steps, progress, **options) -> dict:
    """``score_site`` for ``fedmeta evaluate``, one k at a time (a progress line each): a diverged adaptation is
    refused naming the checkpoint, the site, the step, and what to try, rather than reported as a Dice of 0."""
    from fedmeta.common.adaptation import AdaptationDiverged, score_site  # torch, MONAI: see evaluate_checkpoint

    scored, splits = {}, {}
    try:
        for k in shots:
            progress(f"site {site.name}, k={k}: "
                     + ("choosing steps from the support slices, then " if AUTO in steps else "")
                     + f"adapting {', '.join(map(str, steps))} step(s) and scoring the evaluation patients")
            scored.update(score_site(model, init, site, shots=[k], steps=steps, splits=splits, refuse_diverged=True,
                                     progress=lambda line: progress(f"site {site.name}, {line}"), **options))
            if AUTO in steps:
                progress(f"site {site.name}, k={k}: auto chose {scored[k][AUTO]['chosen_steps']} step(s)")
        return scored
    except AdaptationDiverged as err:
        smaller = f"e.g. --lr-scale {lr_scale / 10:g}" if lr_scale > 1 else "e.g. --lr-scale 0.1"
        raise ValueError(f"{checkpoint} on site {site.name} ({site.root}): {err} (step size x{lr_scale:g}). Fix: pass a "
                         f"smaller --lr-scale ({smaller}; 1 is the step size the consortium trained with) or fewer "
                         "--steps.") from None


def format_table(results: dict[str, Any]) -> str:
    steps = results["steps"]
    lines = [f"{results['initialisation']}: Dice per patient (whole volume, the site's own labels), mean over "
             f"each site's evaluation patients, worst patient in brackets, after adapting on k labelled slices "
             f"({results['adaptation'].get('variant', 'fine-tune')}, seed {results['seed']})", ""]
    header = ["site", "k"] + [f"{s} steps" if s != AUTO else "auto: chosen steps, Dice" for s in steps]
    rows = [header]
    for name, site in results["sites"].items():
        for k, curve in site["dice"].items():
            rows.append([name, str(k)] + [(f"{curve[AUTO]['chosen_steps']}: " if s == AUTO else "")
                                          + f"{_fmt(curve[str(s)]['dice'])} ({_fmt(curve[str(s)]['worst_patient_dice'])})"
                                          for s in steps])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "nan"


def _str_keys(nested: dict) -> dict:
    # JSON object keys are strings; converting here keeps what is printed and what is written alike.
    return {str(k): _str_keys(v) if isinstance(v, dict) else v for k, v in nested.items()}


__all__ = ["default_public_key", "evaluate_checkpoint", "format_table", "output_problem", "parse_counts", "parse_steps",
           "register", "verified_release"]
