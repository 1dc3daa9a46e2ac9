"""How far a per-site intensity threshold gets on a synthetic federation: the intensity baseline's Dice per site.

    python -m fedmeta.simulations.synthetic.intensity_check --preset default [--k 5] [--seed 0] [--cache DIR]

Each site is read the way the benchmark reads it (its presets' data settings: image-size 64, spacing-mm
3.0, num-classes 4, the DataConfig that RunConfig.data_config() builds) and scored by
:func:`fedmeta.common.intensity_baseline.score_intensity_baseline` at k support slices: the number a
trained model must beat for a federation to measure more than thresholding. The federation is generated
into ``--cache`` (default ``~/.cache/fedmeta``, the benchmark's cache: ``<preset>-<seed>``) when not there yet.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "fedmeta"  # where fedmeta benchmark caches its federations


def intensity_dice(root: Path, k: int = 5, seed: int = 0, image_size: int = 64, spacing_mm: float = 3.0,
                   max_images: int = 0) -> list[dict]:
    """Per site of the federation at ``root``: ``{"site", "role", "kind", "sequence", "protocol", "dice",
    "dice_per_class", "thresholds"}`` of the intensity baseline at ``k`` shots."""
    from fedmeta.common.config_sections import Model
    from fedmeta.common.data import SiteDataset
    from fedmeta.common.intensity_baseline import score_intensity_baseline
    from fedmeta.common.read_limits import ReadLimits
    from fedmeta.common.synth import load_manifest

    model = Model(image_size=image_size, spacing_mm=spacing_mm)
    config = model.data_config(limits=ReadLimits.from_environment())
    rows = []
    for info in (manifest := load_manifest(root)).train_sites + manifest.heldout_sites:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # thin-volume notes: the benchmark reads the same
            site = SiteDataset.load(info.folder(), config)
        score = score_intensity_baseline(site, k, seed, config.num_classes, max_images=max_images)
        rows.append({"site": info.name, "role": info.role, "kind": info.heldout_kind or "",
                     "sequence": info.params["scanner"]["sequence"], "protocol": info.label_protocol,
                     "dice": score["dice"], "dice_per_class": score["dice_per_class"],
                     "thresholds": score["thresholds"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", help="federation preset (default: default)")
    parser.add_argument("--federation-seed", type=int, default=0, help="the federation's seed (default 0)")
    parser.add_argument("--root", type=Path, default=None, help="a generated federation to read instead of the cache")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where federations are generated")
    parser.add_argument("--k", type=int, default=5, help="support slices per site (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="support/evaluation split seed (default 0)")
    args = parser.parse_args(argv)
    from fedmeta.common.synth import cached_federation

    root = args.root or cached_federation(args.cache, args.preset, args.federation_seed,
                                          progress=lambda line: print(line, flush=True))
    rows = intensity_dice(root, k=args.k, seed=args.seed)
    print(f"intensity baseline, k={args.k}, seed {args.seed}: {root}")
    for row in rows:
        per_class = " ".join(f"{c}:{v:.2f}" for c, v in row["dice_per_class"].items())
        print(f"  {row['site']:16s} {row['role']:7s} {row['sequence']:5s} {row['protocol']:21s} "
              f"dice {row['dice']:.3f}  ({per_class}) {row['kind']}")
    train = [r["dice"] for r in rows if r["role"] == "train"]
    held = [r["dice"] for r in rows if r["role"] != "train"]
    print(f"  mean: train {sum(train) / len(train):.3f}" + (f", held-out {sum(held) / len(held):.3f}" if held else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
