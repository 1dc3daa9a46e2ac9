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
        paths = write_plan(proposal, args.out, overwrite=args.overwrite)
    except (FileNotFoundError, ValueError, OutputRefused) as err:
        print(f"fedmeta plan: {err}", file=sys.stderr)
        return 2
    print(format_plan(proposal))
    print(f"wrote {paths['plan']} and {paths['run-config']}")
    print(f"its keys override a run's config: fedmeta simulate --preset {paths['run-config']}")
    return 0


__all__ = ["HELP", "plan", "register", "site_names"]
