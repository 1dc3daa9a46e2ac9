"""Re-derive the shipped anatomy asset from the ICBM152 2009a template inside nilearn's wheel.

    pip install 'fedmeta[anatomy]'
    python -m fedmeta.simulations.synthetic.derive_anatomy [--out common/assets/icbm152_2009a_tissue_1p5mm.npz]

The asset holds three tissue-probability maps (CSF, grey matter, white matter) cropped to the brain
and resampled to 1.5 mm, quantised to uint8. CSF is not shipped by nilearn; it is the brain mask
minus grey and white matter, clipped to [0, 1]. nilearn is needed here only: fedmeta reads the
asset with numpy at run time (common/synth.py). Nothing is downloaded: the template files are part of
the nilearn wheel itself.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from fedmeta.common.synth import ASSET_PATH as DEFAULT_OUT  # the asset synth reads
TISSUES = ("csf", "grey_matter", "white_matter")
TARGET_SPACING_MM = 1.5
MARGIN_MM = 6.0  # room for the random affine and elastic warp to move the brain without clipping it


def load_template_maps():
    """Return (csf, gm, wm) float32 arrays on the 1 mm template grid and its affine."""
    try:  # the optional extra: only this script needs it
        from nilearn import datasets
    except ImportError as err:  # pragma: no cover - depends on the optional extra
        raise SystemExit(
            "derive_anatomy needs nilearn, which ships the ICBM152 2009a template in its wheel. "
            "Install the optional extra: pip install 'fedmeta[anatomy]'."
        ) from err
    # These loaders read files bundled inside nilearn/datasets/data/; none of them downloads.
    gm_img = datasets.load_mni152_gm_template()
    wm_img = datasets.load_mni152_wm_template()
    mask_img = datasets.load_mni152_brain_mask()
    gm = np.asarray(gm_img.get_fdata(), dtype=np.float32)
    wm = np.asarray(wm_img.get_fdata(), dtype=np.float32)
    brain = np.asarray(mask_img.get_fdata(), dtype=np.float32)
    if not (np.allclose(gm_img.affine, wm_img.affine) and np.allclose(gm_img.affine, mask_img.affine)):
        raise SystemExit("nilearn's GM, WM and brain-mask templates are on different grids; cannot derive CSF.")
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    return csf, gm, wm, np.asarray(gm_img.affine, dtype=np.float64)


def derive(spacing_mm: float = TARGET_SPACING_MM, margin_mm: float = MARGIN_MM) -> dict[str, np.ndarray]:
    """Crop the template to the brain, anti-alias, resample to ``spacing_mm`` and quantise to uint8."""
    csf, gm, wm, affine = load_template_maps()
    source_spacing = float(abs(affine[0, 0]))
    brain = (csf + gm + wm) > 0.01
    lo = np.argwhere(brain).min(axis=0)
    hi = np.argwhere(brain).max(axis=0)
    margin = int(round(margin_mm / source_spacing))
    lo = lo - margin
    hi = hi + margin

    step = spacing_mm / source_spacing
    axes = [np.arange(lo[a], hi[a] + 1e-6, step) for a in range(3)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=0)
    # Gaussian pre-filter so the coarser grid does not alias the thin cortical ribbon.
    sigma = np.sqrt(max(step**2 - 1.0, 0.0)) / 2.355
    maps = []
    for volume in (csf, gm, wm):
        smoothed = ndimage.gaussian_filter(volume, sigma) if sigma > 0 else volume
        maps.append(ndimage.map_coordinates(smoothed, grid, order=1, mode="constant", cval=0.0))
    stack = np.clip(np.stack(maps, axis=0), 0.0, 1.0)
    quantised = np.round(stack * 255.0).astype(np.uint8)

    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * step
    new_affine[:3, 3] = affine[:3, :3] @ lo.astype(np.float64) + affine[:3, 3]
    return {
        "probabilities": quantised,  # uint8 [3, X, Y, Z], RAS, value / 255 = probability
        "affine": new_affine,
        "tissues": np.array(TISSUES),
        "source": np.array("ICBM152 2009a symmetric (nilearn wheel), CSF = brain mask - GM - WM"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the .npz asset")
    parser.add_argument("--spacing", type=float, default=TARGET_SPACING_MM, help="voxel size in mm")
    args = parser.parse_args(argv)
    asset = derive(args.spacing)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **asset)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()[:16]
    shape = asset["probabilities"].shape
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, shape {shape}, sha256 {digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
