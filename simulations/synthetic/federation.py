"""The synthetic federation's commands: `fedmeta synth` (generate it) and `fedmeta show-sites` (look at it)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fedmeta.common.outputs import Outputs, refuse_data_folder
from fedmeta.common.read_limits import ReadLimits

# The generator, the data readers and checks (fedmeta.common.synth, .validate, .data), numpy, nibabel and
# matplotlib are imported inside the functions that use them: `fedmeta synth --help` does not wait for them.

# Label overlay colours (RGBA) for 0 background, 1 CSF, 2 grey matter, 3 white matter.
VIEW_HEIGHT_MM = 15.0
OVERLAY_COLOURS = [(0, 0, 0, 0), (0.1, 0.55, 1.0, 0.55), (1.0, 0.35, 0.2, 0.45), (1.0, 0.9, 0.2, 0.4)]


def register(subparsers: argparse._SubParsersAction) -> None:
    synth = subparsers.add_parser(
        "synth",
        help="generate the synthetic hospital federation (real ICBM152 anatomy, per-site scanners and annotators)",
        description="Write a federation of MSD-layout sites and a manifest.json to --out. Cached: the same "
        "preset and seed in the same folder return at once.",
    )
    synth.add_argument("--out", type=Path, required=True, help="federation root folder to write")
    # No argparse choices: the scale-N sizes live in fedmeta.common.synth (numpy), which a CLI start does
    # not import; an unknown preset is refused with the list by generate_federation.
    synth.add_argument("--preset", default="default", metavar="PRESET",
                       help="default: 8 train + 4 held-out (unseen mix, sequence, delineation protocol, anatomy) "
                       "with real T1 texture, deep grey nuclei and per-site delineation protocols; smoke-anatomy: that "
                       "generation at 3 train + 2 held-out tiny sites; tissue: the default of generator 1.x (one signal "
                       "per tissue: 8 train + 4 held-out: unseen mix, sequence, annotation, anatomy); smoke: 3 train + "
                       "2 held-out tiny sites of that generation (seconds); protocols: 8 train sites labelling different "
                       "structures + 3 held-out (white matter only, ventricles only, unseen anatomy); scale-N (N = 10, "
                       "30, 100, 1000): N "
                       "small train sites (3 patients, smoke-sized) + the smoke preset's 2 held-out, lazy (the "
                       "manifest now, each site rendered when first used; --all-sites renders them all now)")
    synth.add_argument("--seed", type=int, default=0, help="seed of every site and subject (default 0)")
    synth.add_argument("--force", action="store_true",
                       help="replace a different federation already in --out (one fedmeta generated, holding nothing "
                       "fedmeta did not write; anything else is refused)")
    synth.add_argument("--workers", type=int, default=None, help="processes rendering subjects (default: up to 2)")
    synth.add_argument("--all-sites", action="store_true",
                       help="render every site now, also for a lazy preset (scale-N)")
    synth.add_argument("--preview", type=Path, default=None, help="also draw one slice per site to this PNG")
    synth.add_argument("--overwrite", action="store_true",
                       help="replace a --preview PNG that an earlier synth or show-sites drew (never another file)")
    synth.set_defaults(handler=_synth)

    show = subparsers.add_parser(
        "show-sites",
        help="draw one slice per site with its label overlay (PNG)",
        description="One axial slice of each site's first patient, raw and with its labels, to see the "
        "sites' heterogeneity at a glance.",
    )
    show.add_argument("root", type=Path, help="a federation root (fedmeta synth --out) or one site folder")
    show.add_argument("--out", type=Path, required=True, help="PNG file to write")
    show.add_argument("--overwrite", action="store_true",
                      help="replace a PNG that an earlier show-sites or synth --preview drew (never another file)")
    show.set_defaults(handler=_show_sites)


def _synth(args: argparse.Namespace) -> int:
    from fedmeta.common.synth import generate_federation, load_manifest

    started = time.perf_counter()
    try:
        refuse_data_folder(args.out, "--out")
        if args.preview is not None:  # refused before the federation is generated, not after
            _preview_outputs(args.preview, "--preview").check([args.preview.name], overwrite=args.overwrite)
        root = generate_federation(args.out, args.preset, args.seed, force=args.force, workers=args.workers,
                                   lazy=False if args.all_sites else None,
                                   progress=lambda line: print(line, flush=True))
    except (FileExistsError, ValueError) as err:
        print(f"fedmeta synth: {err}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    manifest = load_manifest(root)
    rendered = sum(info.path.is_dir() for info in manifest.sites)
    print(f"federation {root} (preset {manifest.preset}, seed {manifest.seed}) ready in {elapsed:.1f} s; "
          f"{rendered} of {len(manifest.sites)} sites rendered" + (" (the others when first used)"
                                                                 if rendered < len(manifest.sites) else ""))
    for site in (manifest.train_sites + manifest.heldout_sites)[:40]:
        scanner = site.params["scanner"]
        kind = f" [{site.heldout_kind}]" if site.heldout_kind else ""
        print(f"  {site.name:16s} {site.role:7s} {site.num_patients:3d} patients  {scanner['sequence']:5s} "
              f"{scanner['field_strength_t']} T  {scanner['inplane_mm']}x{scanner['slice_thickness_mm']} mm "
              f"{scanner['slice_axis']:8s} artefact={scanner['artefact']} labels={site.label_protocol}{kind}")
    if len(manifest.sites) > 40:
        print(f"  ... and {len(manifest.sites) - 40} more sites (manifest.json lists them all)")
    if args.preview is not None:
        if len(manifest.sites) > PREVIEW_SITES:
            print(f"preview: the {len(manifest.heldout_sites)} new hospitals and the first "
                  f"{PREVIEW_SITES - len(manifest.heldout_sites)} training sites of {len(manifest.sites)}")
        try:
            draw_sites(root, args.preview, overwrite=args.overwrite, option="--preview")
        except ValueError as err:
            print(f"fedmeta synth: {err}", file=sys.stderr)
            return 2
        print(f"preview: {args.preview}")
    return 0


def _show_sites(args: argparse.Namespace) -> int:
    try:
        draw_sites(args.root, args.out, overwrite=args.overwrite)
    except (FileNotFoundError, ValueError) as err:
        print(f"fedmeta show-sites: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


PREVIEW_SITES = 24


def _site_folders(root: Path) -> list[tuple[Path, str]]:
    """(site folder, caption prefix) for a federation root (manifest order: train, then held-out) or one site."""
    from fedmeta.common.synth import load_manifest
    from fedmeta.common.validate import is_site_folder

    if (root / "manifest.json").is_file():
        manifest = load_manifest(root)
        # At most PREVIEW_SITES panels (every new hospital, then the first training sites): a figure of a
        # thousand sites is unreadable, and in a lazy federation each panel renders its site first.
        heldout = manifest.heldout_sites[:PREVIEW_SITES]
        shown = manifest.train_sites[:PREVIEW_SITES - len(heldout)] + heldout
        return [(s.folder(), f"{s.name} ({s.heldout_kind or s.role})") for s in shown]
    if is_site_folder(root):
        return [(root, root.name)]
    sites = sorted(p for p in root.iterdir() if p.is_dir() and is_site_folder(p))
    if not sites:
        raise FileNotFoundError(f"{root} holds no site folder (dataset.json); pass a federation root or a site folder.")
    return [(p, p.name) for p in sites]


def _preview_outputs(out: Path, option: str):
    """The guarded writer of a preview PNG (``fedmeta.common.outputs``): synth --preview and show-sites draw the
    same figure, so both record it as show-sites'."""
    return Outputs(Path(out).parent, "show-sites", option=option)


def draw_sites(root: Path | str, out: Path | str, *, overwrite: bool = False, option: str = "--out") -> Path:
    """One axial slice per site (first usable patient), raw on top and with its labels below. ``out`` is replaced
    only when an earlier preview drew it and ``overwrite`` is set; never another file, never in a site's data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from fedmeta.common.data import to_ras
    from fedmeta.common.validate import check_case, discover_site

    root, out = Path(root), Path(out)
    outputs = _preview_outputs(out, option)
    outputs.check([out.name], overwrite=overwrite)
    sites = _site_folders(root)
    fig, axes = plt.subplots(2, len(sites), figsize=(2.3 * len(sites), 6.0), squeeze=False)
    overlay = ListedColormap(OVERLAY_COLOURS)
    for column, (folder, caption) in enumerate(sites):
        limits = ReadLimits.from_environment()
        layout = discover_site(folder, limits=limits)
        allowed = set(layout.labels) if layout.labels is not None else None
        loaded = next((c for _, c in (check_case(case, allowed, 256, limits=limits) for case in layout.cases) if c is not None), None)
        top, bottom = axes[0, column], axes[1, column]
        top.set_title(f"{caption}\n{layout.modality or '?'} · labels: {layout.label_protocol}", fontsize=8)
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
        if loaded is None:
            top.text(0.5, 0.5, "no usable case\n(fedmeta check-data)", ha="center", va="center", fontsize=8)
            continue
        affine = np.asarray(loaded.image.affine, dtype=np.float64)
        image, zooms = to_ras(loaded.image_data, affine)
        label, _ = to_ras(loaded.label_data, affine)
        # The slice nearest 15 mm above the origin: through the lateral ventricles in MNI-like scanner space.
        ras_affine = nib.as_closest_canonical(loaded.image).affine
        z = int(np.clip(round((VIEW_HEIGHT_MM - ras_affine[2, 3]) / ras_affine[2, 2]), 0, image.shape[2] - 1))
        # Rows of the picture run anterior to posterior, columns right to left (radiological view).
        picture = np.rot90(image[:, :, z])
        labels = np.rot90(label[:, :, z])
        extent = (0, image.shape[0] * zooms[0], 0, image.shape[1] * zooms[1])
        vmax = float(np.percentile(picture, 99.5)) or 1.0
        for ax in (top, bottom):
            ax.imshow(picture, cmap="gray", vmin=0, vmax=vmax, extent=extent, interpolation="nearest")
        bottom.imshow(np.clip(labels, 0, 3), cmap=overlay, vmin=0, vmax=3, extent=extent, interpolation="nearest")
        bottom.set_xlabel(f"{zooms[0]:.1f}x{zooms[1]:.1f}x{zooms[2]:.1f} mm · {loaded.case_id}", fontsize=7)
    handles = [Patch(color=OVERLAY_COLOURS[i][:3], label=name) for i, name in ((1, "CSF"), (2, "grey matter"), (3, "white matter"))]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    outputs.claim([out.name], overwrite=overwrite)
    suffix = out.suffix.lstrip(".") or "png"
    outputs.write(out.name, lambda tmp: fig.savefig(tmp, dpi=90, format=suffix))
    plt.close(fig)
    return out
