"""`fedmeta plan`: a simulated federation's plan from its sites' fingerprints.

Each site folder's fingerprint (:func:`fedmeta.common.fingerprint.site_fingerprint`, aggregates only) goes through
:func:`fedmeta.common.fingerprint.check_fingerprint` exactly as a report a site sent would, then the merge
(:func:`fedmeta.common.plan.merge_fingerprints`) proposes the run-config values; ``--out`` gets ``plan.json`` (each
choice and its reason) and ``run-config.toml`` (the flat keys with ``plan-sha256``; ``fedmeta simulate --preset
PLAN_DIR/run-config.toml``). In a deployment the ServerApp's first round asks the sites for the same reports.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "plan a federation from its sites' fingerprints (spacing, 2D, image size, CT window, labels): plan.json + " \
       "run-config.toml"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan", help=HELP,
        description="Reads each site folder once and keeps only aggregate statistics (docs/planning.md lists them and "
        "what they reveal), checks them as a received report is checked, merges them the way nnU-Net plans a "
        "dataset, and writes plan.json (every choice with its reason) and run-config.toml (a fedmeta simulate "
        "--preset file) into --out.")
    parser.add_argument("--sites", type=Path, nargs="+", required=True, metavar="SITE",
                        help="site folders (dataset.json, imagesTr/, labelsTr/), one per site; a site is named by "
                             "its folder")
    parser.add_argument("--heldout", type=Path, nargs="+", default=[], metavar="SITE",
                        help="site folders that play new hospitals in a simulation: never fingerprinted (the plan is "
                             "the training sites'), only checked against it (channels, label values); with them "
                             "PLAN_DIR also gets a manifest.json, and `fedmeta simulate --federation-dir PLAN_DIR "
                             "--preset PLAN_DIR/run-config.toml` trains on --sites and adapts at --heldout")
    parser.add_argument("--out", type=Path, required=True, metavar="PLAN_DIR",
                        help="the folder to write plan.json and run-config.toml into (new, empty, or an earlier "
                             "fedmeta plan's with --overwrite)")
    parser.add_argument("--max-image-size", type=int, default=256,
                        help="the largest 2D slice the model takes, pixels a side, a multiple of 2^(model-levels - 1) "
                             "(default 256); a larger field of view coarsens the in-plane spacing")
    parser.add_argument("--model-levels", type=int, default=None,
                        help="the UNet's levels (default: the run config's model-levels): the image size is a multiple "
                             "of 2^(levels - 1)")
    parser.add_argument("--image-glob", help="for folders without dataset.json, e.g. '*_img.nii.gz' (every site)")
    parser.add_argument("--label-glob", help="for folders without dataset.json, e.g. '*_seg.nii.gz' (every site)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier fedmeta plan in --out (never a folder plan did not write)")
    parser.add_argument("--quiet", action="store_true", help="print the plan only, no progress lines")
    parser.set_defaults(handler=plan)


def site_names(sites: list[Path]) -> dict[str, Path]:
    """Each site folder by its name (the folder's); a ValueError naming both when two folders share a name."""
    named: dict[str, Path] = {}
    for site in sites:
        name = site.resolve().name
        if name in named:
            raise ValueError(f"--sites {named[name]} and {site}: two sites named {name!r} (a site is named by its "
                             "folder). Fix: give each site's folder its own name, or pass the site once.")
        named[name] = site
    return named


def _default_model_levels() -> int:
    """The run config's model-levels default (pyproject's [tool.flwr.app.config], as RunConfig holds it)."""
    from fedmeta.common.config import RunConfig

    return RunConfig().model_levels


def plan(args: argparse.Namespace) -> int:
    # numpy, nibabel and torch load here, not on `fedmeta --help`
    from fedmeta.common.fingerprint import check_fingerprint, site_fingerprint
    from fedmeta.common.outputs import OutputRefused, Outputs
    from fedmeta.common.plan import format_plan, merge_fingerprints, write_plan
    from fedmeta.common.progress import Heartbeat
    from fedmeta.common.read_limits import ReadLimits

    try:
        levels = args.model_levels if args.model_levels is not None else _default_model_levels()
        sites = site_names(args.sites)
        limits = ReadLimits.from_environment()
        # refused before any site is read, not after minutes of reading
        Outputs(args.out, "plan").check_folder(overwrite=args.overwrite)
        reports = {}
        with Heartbeat("plan", quiet=args.quiet) as beat:
            for number, (name, root) in enumerate(sites.items(), 1):
                def progress(read: int, listed: int, name=name) -> None:
                    beat.update(f"site {name}: {read}/{listed} cases read")

                beat.update(f"site {name}: reading")
                try:
                    report = site_fingerprint(root, limits=limits, image_glob=args.image_glob,
                                              label_glob=args.label_glob, progress=progress)
                except (FileNotFoundError, ValueError) as err:
                    raise ValueError(f"site {name} ({root}): {err}") from None
                try:  # the coordinator's check of a received report, as in a deployment
                    reports[name] = check_fingerprint(report)
                except ValueError as err:
                    raise ValueError(f"site {name} ({root}): its fingerprint is refused: {err} Fix: correct that in "
                                     f"the site's dataset.json or scans (`fedmeta check-data {root}` lists the scans' "
                                     "problems).") from None
                beat.say(f"plan: site {name}: {report['cases']} case(s) fingerprinted"
                         + (f", {report['cases-skipped']} skipped (fedmeta check-data lists why)"
                            if report["cases-skipped"] else "") + f" ({number}/{len(sites)} sites)")
        proposal = merge_fingerprints(reports, max_image_size=args.max_image_size, model_levels=levels)
        heldout = _heldout_sites(args.heldout, sites, proposal, args.image_glob, args.label_glob, limits)
        paths = write_plan(proposal, args.out, overwrite=args.overwrite)
        if args.heldout:
            paths["manifest"] = _write_manifest(args.out, sites, reports, heldout, paths["plan"])
    except (FileNotFoundError, ValueError, OutputRefused) as err:
        print(f"fedmeta plan: {err}", file=sys.stderr)
        return 2
    print(format_plan(proposal))
    print(f"wrote {paths['plan']} and {paths['run-config']}")
    if "manifest" in paths:
        print(f"wrote {paths['manifest']}: {len(sites)} training and {len(heldout)} held-out site(s); simulate them "
              f"with: fedmeta simulate --federation-dir {args.out} --preset {paths['run-config']}")
    else:
        print(f"its keys override a run's config: fedmeta simulate --preset {paths['run-config']}")
    return 0


def _heldout_sites(folders: list[Path], training: dict[str, Path], proposal: dict, image_glob, label_glob,
                   limits) -> dict[Path, int]:
    """Each held-out site folder and its listed cases, checked against the plan from what its dataset.json declares
    (its channels stack into the plan's; its label values fit num-classes): a new hospital's voxels never shape
    the plan, as they would not in a deployment. A ValueError names the site and the fix."""
    from fedmeta.common.config import RunConfig
    from fedmeta.common.data import channel_order
    from fedmeta.common.validate import discover_site

    config = RunConfig.from_run_config(proposal["run-config"]).data_config()
    names = {root.resolve().name for root in training.values()}
    found: dict[Path, int] = {}
    for folder in folders:
        name = folder.resolve().name
        if name in names:
            raise ValueError(f"--heldout {folder}: a site named {name!r} is already among --sites or --heldout (a site "
                             "is named by its folder). Fix: pass each site once, with its own folder name.")
        names.add(name)
        layout = discover_site(folder, image_glob, label_glob, limits=limits)
        channel_order(f"{name} ({folder})", layout.channels, config)  # refuses channels the plan's model cannot take
        beyond = sorted(v for v in (layout.labels or {}) if v >= config.num_classes)
        if beyond:
            raise ValueError(f"--heldout {folder}: declares label values {beyond}, beyond the plan's num-classes="
                             f"{config.num_classes} (from the training sites' labels). Fix: map the site's structure "
                             f"onto 1..{config.num_classes - 1} in its labels and dataset.json, as a new hospital's "
                             "annotation takes the model's free classes.")
        found[folder.resolve()] = layout.num_listed
    return found


def _write_manifest(out: Path, training: dict[str, Path], reports: dict, heldout: dict[Path, int],
                    plan_file: Path) -> Path:
    """PLAN_DIR/manifest.json over the sites' own folders, recorded as the plan's output; the federation's digest is
    the plan's SHA-256 and the held-out sites' folder names, so a resumed run trains on the same plan and sites."""
    import hashlib

    from fedmeta.common.outputs import Outputs
    from fedmeta.common.synth import write_sites_manifest

    train = [root.resolve() for root in training.values()]
    counts = {root.resolve(): int(reports[name]["cases"]) for name, root in training.items()} | heldout
    digest = hashlib.sha256(plan_file.read_bytes() + "\n".join(sorted(p.name for p in heldout)).encode()).hexdigest()
    path = write_sites_manifest(out, train, list(heldout), digest, counts)
    Outputs(out, "plan").record(path.name)
    return path


__all__ = ["HELP", "plan", "register", "site_names"]
