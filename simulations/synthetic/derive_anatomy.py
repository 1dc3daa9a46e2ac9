"""Re-derive the shipped anatomy assets from the ICBM152 2009a template inside nilearn's wheel.

    pip install 'fedmeta[anatomy]'
    python -m fedmeta.simulations.synthetic.derive_anatomy [--asset tissue|texture|all] [--out-dir common/assets]

Two assets on one grid (the brain's bounding box plus a margin, 1.5 mm, the same affine):

- ``icbm152_2009a_tissue_1p5mm.npz`` (the ``tissue`` generation): three tissue-probability maps (CSF,
  grey matter, white matter), uint8. CSF is not shipped by nilearn; it is the brain mask minus grey
  and white matter, clipped to [0, 1].
- ``icbm152_2009a_t1_1p5mm.npz`` (the ``texture`` generation): the template's T1 intensities (uint16,
  value / 65535 = the template rescaled to [0, 1] as nilearn loads it), the deep grey nuclei (uint8
  fraction of each voxel: caudate, putamen, pallidum, thalamus; see :func:`deep_grey_map`) and the
  T1 levels of CSF, grey and white matter (the median T1 where a tissue's probability is over 0.9), and
  the infratentorial region (uint8 membership: cerebellum and brainstem; see :func:`infratentorial_map`).

An asset whose arrays come out the same as the file already there is left untouched (npz bytes hold
timestamps; the generator's cache keys hold the asset's digest). nilearn is needed here only: fedmeta
reads the assets with numpy at run time (common/synth_render.py). Nothing is downloaded: the template
files are part of the nilearn wheel itself.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from fedmeta.common.synth_render import ASSET_PATH, TEXTURE_ASSET_PATH  # the assets synth reads

TISSUES = ("csf", "grey_matter", "white_matter")
TARGET_SPACING_MM = 1.5
MARGIN_MM = 6.0  # room for the random affine and elastic warp to move the brain without clipping it
# The deep grey nuclei (both hemispheres, x mirrored): (centre, semi-axes) in MNI mm, ellipsoids that hold
# each nucleus with a little room; inside them, a voxel is a nucleus where the T1 is darker than the
# internal capsule (see deep_grey_map). Centres from the Harvard-Oxford subcortical atlas' centroids.
NUCLEI_MM = {
    "caudate head": ((12.0, 13.0, 8.0), (6.0, 10.0, 9.0)),
    "caudate body": ((15.0, -6.0, 19.0), (5.0, 12.0, 6.0)),
    "putamen": ((25.0, 2.0, 1.0), (6.0, 15.0, 9.0)),
    "pallidum": ((19.0, -4.0, -1.0), (4.0, 8.0, 5.0)),
    "thalamus": ((11.0, -18.0, 7.0), (8.0, 12.0, 8.0)),
}
CAPSULE_T1 = 0.835  # template T1 between the pallidum (~0.79) and the internal capsule (~0.83-0.87)
CAPSULE_WIDTH = 0.05


def _nilearn_datasets():
    try:  # the optional extra: only this script needs it
        from nilearn import datasets
    except ImportError as err:  # pragma: no cover - depends on the optional extra
        raise SystemExit(
            "derive_anatomy needs nilearn, which ships the ICBM152 2009a template in its wheel. "
            "Install the optional extra: pip install 'fedmeta[anatomy]'."
        ) from err
    return datasets


def load_template_maps():
    """Return (csf, gm, wm) float32 arrays on the 1 mm template grid and its affine."""
    datasets = _nilearn_datasets()
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


def load_template_t1(affine: np.ndarray) -> np.ndarray:
    """The skull-stripped T1 template (float32, [0, 1]) on the 1 mm grid of the tissue maps."""
    t1_img = _nilearn_datasets().load_mni152_template(resolution=1)  # bundled in the wheel; rescaled to [0, 1]
    if not np.allclose(t1_img.affine, affine):
        raise SystemExit("nilearn's T1 template is not on the grid of its tissue maps; cannot derive the T1 asset.")
    return np.asarray(t1_img.get_fdata(), dtype=np.float32)


def deep_grey_map(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The share of each voxel (1 mm grid) that belongs to a deep grey nucleus: caudate, putamen, pallidum, thalamus.

    nilearn's wheel holds no subcortical atlas, so the nuclei are found in the anatomy itself: inside
    soft ellipsoids around each nucleus (:data:`NUCLEI_MM`), brain tissue (grey + white matter, not
    the ventricles) whose T1 is darker than the internal capsule. The template's own tissue maps call
    the caudate grey, the putamen and thalamus mixed and the pallidum mostly white matter; a
    delineation protocol calls all four deep grey whatever their intensity.
    """
    axes = [np.arange(n, dtype=np.float32) for n in t1.shape]
    ijk = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    mm = ijk @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)
    inside = np.zeros(t1.shape, dtype=np.float32)
    for centre, radii in NUCLEI_MM.values():
        for side in (-1.0, 1.0):
            c = np.array([side * centre[0], centre[1], centre[2]], dtype=np.float32)
            d = np.sqrt((((mm - c) / np.asarray(radii, dtype=np.float32)) ** 2).sum(axis=-1))
            inside = np.maximum(inside, 1.0 / (1.0 + np.exp(np.minimum((d - 1.0) / 0.08, 50.0))))
    darker = np.clip((CAPSULE_T1 - ndimage.gaussian_filter(t1, 0.7)) / CAPSULE_WIDTH + 0.5, 0.0, 1.0)
    return np.clip(inside * darker * (gm + wm), 0.0, 1.0).astype(np.float32)


def infratentorial_map(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Membership (float32 [0, 1], 1 mm grid) of the posterior fossa: the cerebellum and the brainstem.

    Below a tent that models the tentorium cerebelli (z < -8 mm - 0.3 |x| - 0.12 mm per mm behind y = -60,
    behind y = -32) and the brainstem (|x| < 14, -45 < y < -12, z < -4), softened by 2 mm. A cerebrum-only
    delineation (annotation extent ``cerebrum``) leaves it unlabelled. A geometric model, not a segmentation:
    it separates the cerebellum from the occipital and temporal lobes that lie on the tentorium to within a
    few mm in the template.
    """
    axes = [np.arange(n, dtype=np.float32) for n in shape]
    ijk = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    mm = ijk @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)
    x, y, z = mm[..., 0], mm[..., 1], mm[..., 2]
    tent = -8.0 - 0.3 * np.abs(x) - 0.12 * np.clip(-60.0 - y, 0.0, None)
    cerebellum = (z < tent) & (y < -32.0)
    brainstem = (np.abs(x) < 14.0) & (y > -45.0) & (y < -12.0) & (z < -4.0)
    return np.clip(ndimage.gaussian_filter((cerebellum | brainstem).astype(np.float32), 2.0), 0.0, 1.0)


def _grid(csf, gm, wm, affine, spacing_mm: float, margin_mm: float):
    """The asset grid: sampling coordinates [3, X, Y, Z] on the 1 mm grid, its affine, and the anti-alias sigma."""
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
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * step
    new_affine[:3, 3] = affine[:3, :3] @ lo.astype(np.float64) + affine[:3, 3]
    return grid, new_affine, sigma


def _resample(volume: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
    smoothed = ndimage.gaussian_filter(volume, sigma) if sigma > 0 else volume
    return ndimage.map_coordinates(smoothed, grid, order=1, mode="constant", cval=0.0)


def derive(spacing_mm: float = TARGET_SPACING_MM, margin_mm: float = MARGIN_MM) -> dict[str, np.ndarray]:
    """The tissue asset: crop the template to the brain, anti-alias, resample to ``spacing_mm``, quantise to uint8."""
    csf, gm, wm, affine = load_template_maps()
    grid, new_affine, sigma = _grid(csf, gm, wm, affine, spacing_mm, margin_mm)
    stack = np.clip(np.stack([_resample(v, grid, sigma) for v in (csf, gm, wm)], axis=0), 0.0, 1.0)
    quantised = np.round(stack * 255.0).astype(np.uint8)
    return {
        "probabilities": quantised,  # uint8 [3, X, Y, Z], RAS, value / 255 = probability
        "affine": new_affine,
        "tissues": np.array(TISSUES),
        "source": np.array("ICBM152 2009a symmetric (nilearn wheel), CSF = brain mask - GM - WM"),
    }


def derive_texture(spacing_mm: float = TARGET_SPACING_MM, margin_mm: float = MARGIN_MM) -> dict[str, np.ndarray]:
    """The texture asset, on the tissue asset's grid: T1 intensities (uint16), deep grey nuclei (uint8), T1 levels."""
    csf, gm, wm, affine = load_template_maps()
    t1 = load_template_t1(affine)
    grid, new_affine, sigma = _grid(csf, gm, wm, affine, spacing_mm, margin_mm)
    deep = deep_grey_map(t1, gm, wm, affine)
    t1_grid = np.clip(_resample(t1, grid, sigma), 0.0, 1.0)
    tissue_grid = [_resample(v, grid, sigma) for v in (csf, gm, wm)]
    levels = np.array([np.median(t1_grid[p > 0.9]) for p in tissue_grid], dtype=np.float32)
    return {
        "t1": np.round(t1_grid * 65535.0).astype(np.uint16),  # [X, Y, Z], RAS, value / 65535 = T1 in [0, 1]
        "deep_grey": np.round(np.clip(_resample(deep, grid, sigma), 0.0, 1.0) * 255.0).astype(np.uint8),
        "t1_levels": levels,  # median T1 of CSF, grey matter, white matter (probability > 0.9)
        "infratentorial": np.round(np.clip(_resample(infratentorial_map(affine, t1.shape), grid, sigma), 0.0, 1.0)
                                   * 255.0).astype(np.uint8),  # [X, Y, Z] membership x 255: cerebellum, brainstem
        "affine": new_affine,
        "nuclei": np.array(list(NUCLEI_MM)),
        "source": np.array("ICBM152 2009a symmetric T1 (nilearn wheel), rescaled to [0, 1]; deep grey nuclei "
                           "from ellipsoids x (T1 darker than the internal capsule) x (GM + WM); "
                           "infratentorial region below a model tentorium"),
    }


def _write(out: Path, asset: dict[str, np.ndarray]) -> str:
    """Writes ``asset`` to ``out`` unless the file there already holds the same arrays; returns what happened."""
    if out.is_file():
        with np.load(out, allow_pickle=False) as old:
            if set(old.files) == set(asset) and all(np.array_equal(old[k], v) for k, v in asset.items()):
                return f"{out} unchanged (same arrays; its bytes and digest kept)"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **asset)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()[:16]
    return f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, sha256 {digest})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--asset", choices=("tissue", "texture", "all"), default="all", help="which asset to derive")
    parser.add_argument("--out-dir", type=Path, default=ASSET_PATH.parent, help="where to write the .npz assets")
    parser.add_argument("--spacing", type=float, default=TARGET_SPACING_MM, help="voxel size in mm")
    args = parser.parse_args(argv)
    if args.asset in ("tissue", "all"):
        print(_write(args.out_dir / ASSET_PATH.name, derive(args.spacing)))
    if args.asset in ("texture", "all"):
        print(_write(args.out_dir / TEXTURE_ASSET_PATH.name, derive_texture(args.spacing)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
