"""The PNG overlay ``fedmeta predict`` writes beside each mask: a few slices with the mask over the scan."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def overlay_montage(image: np.ndarray, mask: np.ndarray, path: Path, title: str, panels: int = 6) -> None:
    """A row of axial slices through the mask's extent with the mask over the scan, for a quick look.

    ``image`` and ``mask``: one scan's voxels and its mask, the same 3D shape in the scan's own grid; the
    through-plane axis is the shortest one (else the last).
    """
    # Lazy: matplotlib.pyplot costs ~0.4 s to import (python -X importtime), paid only when overlays are drawn.
    import matplotlib

    matplotlib.use("Agg")
    # After use("Agg"): the file-only backend is chosen before pyplot loads (and the lazy reason above).
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap  # lazy, as matplotlib above

    axis = int(np.argmin(image.shape)) if min(image.shape) * 2 < max(image.shape) else 2  # the through-plane axis
    has = np.flatnonzero(np.moveaxis(mask, axis, 0).reshape(mask.shape[axis], -1).any(axis=1))
    lo, hi = (int(has[0]), int(has[-1])) if len(has) else (0, mask.shape[axis] - 1)
    picks = np.unique(np.linspace(lo, hi, num=min(panels, hi - lo + 1)).round().astype(int))
    colours = ListedColormap([(0, 0, 0, 0), (0.9, 0.2, 0.2, 0.5), (0.2, 0.8, 0.2, 0.5), (0.2, 0.4, 1.0, 0.5),
                              (1.0, 0.8, 0.1, 0.5), (0.8, 0.2, 0.9, 0.5)] + [(1, 1, 1, 0.5)] * 250)
    fig, axes = plt.subplots(1, len(picks), figsize=(2.4 * len(picks), 2.6), squeeze=False)
    for ax, index in zip(axes[0], picks):
        ax.imshow(np.take(image, index, axis=axis).T, cmap="gray", origin="lower")
        ax.imshow(np.take(mask, index, axis=axis).T, cmap=colours, vmin=0, vmax=255, origin="lower",
                  interpolation="nearest")
        ax.set_title(f"slice {index}", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


__all__ = ["overlay_montage"]
