"""`fedmeta plan`: a simulated federation's plan from its sites' fingerprints.

Each site folder's fingerprint (:func:`fedmeta.common.fingerprint.site_fingerprint`, aggregates only) goes through
:func:`fedmeta.common.fingerprint.check_fingerprint` exactly as a report a site sent would, then the merge
(:func:`fedmeta.common.plan.merge_fingerprints`) proposes the run-config values; ``--out`` gets ``plan.json`` (each
choice and its reason) and ``run-config.toml`` (the flat keys with ``plan-sha256``; ``fedmeta simulate --preset
PLAN_DIR/run-config.toml``). In a deployment the ServerApp's first round asks the sites for the same reports.
"""

from __future__ import annotations

import argparse
import contextlib
import os
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


MANIFEST = "manifest.json"  # the held-out federation `fedmeta simulate --federation-dir PLAN_DIR` reads
SHOWN_CHARS = 80  # a name read from a site's files is printed as repr() cut to this (nothing raw reaches a terminal)
PLAIN_CHARS = 64  # a printable name up to this long (what a fingerprint's names may be) is printed as written


def shown(name: str) -> str:
    """``name`` (read from a site's dataset.json or file names) for a message: as written when it is short and
    printable (T2, case_003), else its repr() cut to :data:`SHOWN_CHARS` characters, so that a 10 KB name or a
    terminal escape code never reaches the terminal raw."""
    if name.isprintable() and len(name) <= PLAIN_CHARS:
        return name
    text = repr(name)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


def _printable(message: str) -> str:
    """``message`` with every character a terminal would act on (escape codes, NUL, carriage return) escaped: a
    folder or file name in it comes from outside fedmeta."""
    return "".join(ch if ch.isprintable() or ch == "\n" else repr(ch)[1:-1] for ch in message)


def _site_folder(folder: Path, option: str) -> None:
    """Refuses ``folder`` as a site before any site is read: missing, or a file (dataset.json itself, an image)."""
    if folder.is_file():
        raise ValueError(f"{option} {folder}: is a file, not a site folder; pass its folder ({folder.parent}), the one "
                         "that holds dataset.json, imagesTr/ and labelsTr/.")
    if not folder.is_dir():
        raise ValueError(f"{option} {folder}: does not exist. Fix: pass the site's folder, the one that holds "
                         "dataset.json.")


def site_names(sites: list[Path]) -> dict[str, Path]:
    """Each site folder by its name (the folder's); a ValueError naming both when two folders share a name, or
    naming a folder that is missing or a file."""
    named: dict[str, Path] = {}
    for site in sites:
        _site_folder(site, "--sites")
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


def _check_writable(out: Path) -> None:
    """Refuses ``--out`` when a folder cannot be made or written there (``/proc/x``, a read-only disk): found
    before minutes of reading sites, not after. Whatever the probe made is removed again."""
    import tempfile

    missing = []
    folder = out
    while not (folder.exists() or folder.is_symlink()) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    made = []
    try:
        for folder in reversed(missing):
            os.mkdir(folder)
            made.append(folder)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise ValueError(f"--out {out}: cannot be written ({err.strerror or err}: {err.filename or out}); fedmeta plan "
                         "writes plan.json and run-config.toml there. Fix: choose a folder you can write to.") from None
    finally:
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()


def _earlier_manifest(out: Path) -> Path | None:
    """PLAN_DIR/manifest.json when an earlier `fedmeta plan --heldout` wrote it (the folder's output journal says so
    and it is unchanged since), None when there is none; refused when it is anyone else's: `fedmeta simulate
    --federation-dir PLAN_DIR` trains on whatever manifest.json lists, so none but this plan's may stay there."""
    from fedmeta.common.outputs import OutputRefused, Outputs, file_sha256

    path = out / MANIFEST
    if not (path.exists() or path.is_symlink()):
        return None
    entry = Outputs(out, "plan").journal()["files"].get(MANIFEST) or {}
    # A digest of None: claimed by a plan killed while writing it, so still plan's.
    if path.is_file() and not path.is_symlink() and entry.get("command") == "plan" \
            and entry.get("sha256") in (None, file_sha256(path)):
        return path
    raise OutputRefused(f"--out {path}: was not written by fedmeta plan, or changed since; `fedmeta simulate "
                        f"--federation-dir {out}` would train on the sites it lists, whatever this plan says. Fix: "
                        "move it away, or choose another --out.")


def plan(args: argparse.Namespace) -> int:
    # numpy, nibabel and torch load here, not on `fedmeta --help`
    from fedmeta.common.outputs import OutputRefused, Outputs
    from fedmeta.common.plan import check_image_budget, format_plan, merge_fingerprints, site_problem, write_plan
    from fedmeta.common.progress import Heartbeat
    from fedmeta.common.read_limits import ReadLimits

    try:
        # Everything that needs no site's voxels is refused first, not after minutes of reading sites.
        levels = args.model_levels if args.model_levels is not None else _default_model_levels()
        check_image_budget(args.max_image_size, levels)
        Outputs(args.out, "plan").check_folder(overwrite=args.overwrite)
        _check_writable(args.out)
        earlier = _earlier_manifest(args.out)
        sites = site_names(args.sites)
        limits = ReadLimits.from_environment()
        heldout = _heldout_layouts(args.heldout, sites, args.image_glob, args.label_glob, limits)
        reports = {}
        with Heartbeat("plan", quiet=args.quiet) as beat:
            for number, (name, root) in enumerate(sites.items(), 1):
                report = _site_report(name, root, limits, args.image_glob, args.label_glob, beat)
                problem = site_problem(f"{name} ({root})", report)
                if problem:  # refused now, before the next site is read
                    raise ValueError(problem)
                reports[name] = report
                beat.say(f"plan: site {name}: {report['cases']} case(s) fingerprinted"
                         + (f", {report['cases-skipped']} skipped (fedmeta check-data lists why)"
                            if report["cases-skipped"] else "") + f" ({number}/{len(sites)} sites)")
        proposal = merge_fingerprints(reports, max_image_size=args.max_image_size, model_levels=levels)
        counts = _check_heldout(heldout, proposal)
        if earlier is not None:
            # Removed before the new plan is written: a kill in between leaves no manifest, never a stale one.
            earlier.unlink()
        paths = write_plan(proposal, args.out, overwrite=args.overwrite)
        if args.heldout:
            paths["manifest"] = _write_manifest(args.out, sites, reports, counts, paths["plan"])
    except (ValueError, OutputRefused) as err:
        print(_printable(f"fedmeta plan: {err}"), file=sys.stderr)
        return 2
    except OSError as err:  # the disk filled, a permission changed while writing
        print(_printable(f"fedmeta plan: {err.filename or args.out}: {err.strerror or err}. Fix: free or choose a "
                         "writable --out, and run again."), file=sys.stderr)
        return 2
    print(format_plan(proposal))
    print(f"wrote {paths['plan']} and {paths['run-config']}")
    if "manifest" in paths:
        print(f"wrote {paths['manifest']}: {len(sites)} training and {len(counts)} held-out site(s); simulate them "
              f"with: fedmeta simulate --federation-dir {args.out} --preset {paths['run-config']}")
    else:
        if earlier is not None:
            print(f"removed {earlier}, the earlier plan's held-out federation (this plan has no --heldout)")
        print(f"its keys override a run's config: fedmeta simulate --preset {paths['run-config']}")
    return 0


def _site_report(name: str, root: Path, limits, image_glob, label_glob, beat) -> dict:
    """The site's fingerprint, checked as the coordinator checks a received one; a ValueError that names the site
    once, and when no case is usable, the first case's first problem."""
    from fedmeta.common.fingerprint import check_fingerprint, site_fingerprint
    from fedmeta.common.validate import discover_site

    where = f"site {name} ({root})"
    try:
        layout = discover_site(root, image_glob, label_glob, limits=limits)  # dataset.json only: cheap
    except (OSError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None
    read = 0

    def progress(done: int, listed: int) -> None:
        nonlocal read
        read = done
        beat.update(f"site {name}: {done}/{listed} cases read")

    beat.update(f"site {name}: reading")
    try:
        report = site_fingerprint(root, limits=limits, image_glob=image_glob, label_glob=label_glob,
                                  progress=progress)
    except (OSError, ValueError) as err:
        if layout.num_listed and read == layout.num_listed:  # raised after reading every case: none was usable
            first = _first_problem(layout, limits)
            why = f" The first, {first.rstrip('.')}." if first else ""
            raise ValueError(f"{where}: none of its {layout.num_listed} listed case(s) is usable, so it has no "
                             f"fingerprint.{why} Run `fedmeta check-data {root}` for every case's problems, and "
                             "repair them.") from None
        # The fingerprint names the site too (by dataset.json's name, which may be anything): said once, here.
        message = str(err).removeprefix(f"site {layout.name} ({layout.root}): ")
        raise ValueError(f"{where}: {message}") from None
    try:  # the coordinator's check of a received report, as in a deployment
        return check_fingerprint(report)
    except ValueError as err:
        raise ValueError(f"{where}: its fingerprint is refused: {err} Fix: correct that in the site's dataset.json "
                         f"or scans (`fedmeta check-data {root}` lists the scans' problems).") from None


def _first_problem(layout, limits) -> str | None:
    """The first problem of a listed case of ``layout`` ("case_000: <problem>"): an unreadable one's, else the
    first case's as the fingerprint read it; None when that case has none."""
    from fedmeta.common.fingerprint import MAX_LABELS
    from fedmeta.common.validate import check_case

    if layout.problems:
        case = layout.problems[0]
        return f"{shown(case.case_id)}: {case.problems[0]}" if case.problems else None
    if not layout.cases:
        return None
    case = layout.cases[0]
    allowed = set(layout.labels) if layout.labels is not None else None
    problems, _ = check_case(case, allowed, MAX_LABELS, limits=limits, channels=layout.channels)
    return f"{shown(case.case_id)}: {problems[0]}" if problems else None


def _heldout_layouts(folders: list[Path], training: dict[str, Path], image_glob, label_glob, limits) -> dict:
    """Each held-out site folder's layout (its dataset.json only), refused when it cannot play a new hospital: a
    name taken, fewer than 2 listed cases (support and query come from different patients), or no label but
    background declared (it adapts on and is scored in its own labels). A ValueError names the site and the fix."""
    from fedmeta.common.plan import MIN_SITE_CASES
    from fedmeta.common.validate import discover_site

    names = {root.resolve().name for root in training.values()}
    layouts = {}
    for folder in folders:
        _site_folder(folder, "--heldout")
        name = folder.resolve().name
        if name in names:
            raise ValueError(f"--heldout {folder}: a site named {name!r} is already among --sites or --heldout (a site "
                             "is named by its folder). Fix: pass each site once, with its own folder name.")
        names.add(name)
        try:
            layout = discover_site(folder, image_glob, label_glob, limits=limits)
        except (OSError, ValueError) as err:
            raise ValueError(f"--heldout {folder}: {err}") from None
        if layout.num_listed < MIN_SITE_CASES:
            raise ValueError(f"--heldout {folder}: lists {layout.num_listed} case(s); a held-out site adapts on one "
                             f"patient's slices and is scored on another's, so it needs at least {MIN_SITE_CASES}. "
                             "Fix: add patients to its dataset.json, or hold out another site.")
        if not any(value > 0 for value in (layout.labels or {})):
            declared = ("declares no labels (no dataset.json 'labels')" if layout.labels is None
                        else "its dataset.json declares only background in 'labels'")
            raise ValueError(f"--heldout {folder}: {declared}; a held-out site adapts on and is "
                             "scored in its own annotated structures. Fix: declare them in its dataset.json, e.g. "
                             "\"labels\": {\"0\": \"background\", \"1\": \"liver\"}, as its label files hold them.")
        layouts[folder.resolve()] = layout
    return layouts


def _check_heldout(layouts: dict, proposal: dict) -> dict[Path, int]:
    """Each held-out site's listed cases, once checked against the plan from what its dataset.json declares (its
    channels stack into the plan's; its label values fit num-classes): a new hospital's voxels never shape the
    plan, as they would not in a deployment. A ValueError names the site and the fix."""
    from fedmeta.common.config import RunConfig
    from fedmeta.common.site_layout import channel_order

    config = RunConfig.from_run_config(proposal["run-config"]).data_config()
    planned = ", ".join(config.channel_names) or "one channel each: " + ", ".join(
        dict.fromkeys(name for info in proposal["sites"].values() for name in info["channels"]) or ["undeclared"])
    found: dict[Path, int] = {}
    for folder, layout in layouts.items():
        try:
            channel_order(str(folder), layout.channels, config.in_channels, config.channel_names)  # the reader's own test of what the model takes
        except ValueError:
            declared = ", ".join(shown(c) for c in layout.channels) or "none declared: one channel"
            raise ValueError(f"--heldout {folder}: its channels ({declared}) differ from the training sites' "
                             f"({planned}); the plan's model reads those. Fix: hold out a site with the same "
                             "channels.") from None
        beyond = sorted(v for v in (layout.labels or {}) if v >= config.num_classes)
        if beyond:
            raise ValueError(f"--heldout {folder}: declares label values {beyond}, beyond the plan's num-classes="
                             f"{config.num_classes} (from the training sites' labels). Fix: map the site's structure "
                             f"onto 1..{config.num_classes - 1} in its labels and dataset.json, as a new hospital's "
                             "annotation takes the model's free classes.")
        found[folder] = layout.num_listed
    return found


def _write_manifest(out: Path, training: dict[str, Path], reports: dict, heldout: dict[Path, int],
                    plan_file: Path) -> Path:
    """PLAN_DIR/manifest.json over the sites' own folders, recorded as the plan's output; the federation's digest is
    the plan's SHA-256 and the held-out sites' folder names, so a resumed run trains on the same plan and sites."""
    from fedmeta.common.outputs import Outputs
    from fedmeta.common.synth import sites_digest, write_sites_manifest

    outputs = Outputs(out, "plan")
    outputs.claim([MANIFEST], overwrite=True)  # in the journal before it is written: a kill leaves it plan's
    train = [root.resolve() for root in training.values()]
    counts = {root.resolve(): int(reports[name]["cases"]) for name, root in training.items()} | heldout
    digest = sites_digest(plan_file.read_bytes(), [p.name for p in heldout])
    path = write_sites_manifest(out, train, list(heldout), digest, counts)
    outputs.record(path.name)
    return path


__all__ = ["HELP", "MANIFEST", "plan", "register", "shown", "site_names"]
