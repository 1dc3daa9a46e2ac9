"""Segmenting a whole scan in its own grid: the reader's geometry applied, the model run, the geometry undone.

A scan goes through exactly what training and evaluation did to it (``fedmeta.common.data.prepare_image``):
reoriented to RAS, resampled to the model's spacing, each channel normalised by its modality (MR: z-scored
over the voxels above the mean; CT: the run's HU window and statistics), and cut to the window of the
training crop size centred on the first channel's foreground (axial slices for a 2D model, one patch for a
3D one).
The window is the model's input as it was trained: the UNet's instance normalisation makes the window's
content part of the computation, so sliding windows over the background (MONAI's sliding-window
inference was tried) change every prediction and cost the adapted model its Dice; voxels outside the
window are background. The class probabilities are put back in the resampled volume, resampled to the
scan's RAS grid (trilinear, one class at a time so that memory stays at two volumes), the arg-max taken
there, and the RAS orientation undone: the mask has the scan's shape, affine and voxel order, and holds
the consortium's label values (the model's class indices).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from nibabel import orientations
from torch.func import functional_call

from fedmeta.common.data import (
    DataConfig, channel_kind, crop_channels, prepare_image, resampling_problem, to_ras,
)


@dataclass
class Segmentation:
    """One scan's mask in the scan's own grid, and (on request) the class probabilities there."""

    mask: np.ndarray  # uint8, the scan's shape
    probabilities: np.ndarray | None  # float32 [*scan shape, C], or None
    voxel_counts: dict[int, int]  # voxels per predicted class


def _ras_orientation(affine: np.ndarray):
    return orientations.io_orientation(affine)


def _to_scan_orientation(volume: np.ndarray, transform) -> np.ndarray:
    """Undo :func:`fedmeta.common.data.to_ras`'s axis reordering and flips."""
    back = orientations.ornt_transform(orientations.axcodes2ornt("RAS"), transform)
    return np.ascontiguousarray(orientations.apply_orientation(volume, back))


@torch.no_grad()
def _window_logits(model: torch.nn.Module, params: Mapping[str, torch.Tensor], window: torch.Tensor,
                   config: DataConfig, batch_size: int) -> torch.Tensor:
    """Logits of the window ``[channels, H, W, Z]`` (2D: its axial slices; 3D: the patch): ``[classes, H, W, Z]``."""
    if config.spatial_dims == 3:
        return functional_call(model, dict(params), (window[None],))[0]
    slices = window.permute(3, 0, 1, 2)  # [Z, channels, H, W]: axial slices, as the model was trained
    out = [functional_call(model, dict(params), (slices[i:i + batch_size],)) for i in range(0, len(slices), batch_size)]
    return torch.cat(out).permute(1, 2, 3, 0)


def _uncrop(window: torch.Tensor, centre: np.ndarray, shape: tuple[int, ...], fill: float) -> torch.Tensor:
    """The inverse of :func:`fedmeta.common.data.crop_or_pad` over the leading axes: ``window`` put back
    in a volume of ``shape`` (trailing axes shared), ``fill`` elsewhere."""
    size = window.shape[:len(centre)]
    out = torch.full(tuple(shape[:len(centre)]) + tuple(window.shape[len(centre):]), fill, dtype=window.dtype)
    source, target = [], []
    for axis, n in enumerate(size):
        start = int(round(centre[axis] - n / 2))
        lo, hi = max(start, 0), min(start + n, shape[axis])
        target.append(slice(lo, max(hi, lo)))
        source.append(slice(lo - start, lo - start + max(hi - lo, 0)))
    out[tuple(target)] = window[tuple(source)]
    return out


def segment_scan(model: torch.nn.Module, params: Mapping[str, torch.Tensor], image_data: np.ndarray,
                 affine: np.ndarray, config: DataConfig, *, num_classes: int, batch_size: int = 16,
                 probabilities: bool = False, device: torch.device | str = "cpu",
                 channels: tuple[str, ...] | None = None) -> Segmentation:
    """The mask (and optionally the probabilities) of one scan, in the scan's own grid.

    ``image_data``: ``[X, Y, Z]``, or ``[X, Y, Z, C]`` with the model's ``config.in_channels`` channels in its
    order; ``channels``: their names (how each is normalised, :func:`fedmeta.common.data.channel_kind`), by
    default the run's ``config.channel_names`` (none: one MR channel)."""
    affine = np.asarray(affine, dtype=np.float64)
    transform = _ras_orientation(affine)
    image, zooms = to_ras(np.asarray(image_data, dtype=np.float32), affine)
    ras_shape = image.shape[:3]
    problem = resampling_problem("the scan", ras_shape, zooms, config)  # before the volumes below are allocated
    if problem:
        raise ValueError(problem)
    names = channels if channels is not None else (config.channel_names or ("",) * config.in_channels)
    held = image.shape[3] if image.ndim == 4 else 1
    if held != config.in_channels or len(names) != config.in_channels:
        raise ValueError(f"the scan holds {held} channel(s), the model takes {config.in_channels} "
                         f"({', '.join(config.channel_names) or 'one'}). Fix: give the scan with the model's channels "
                         "in its order (one 4D file, channels last), as the site's training images were.")
    prepared = prepare_image(image, zooms, config, tuple(channel_kind(n or None) for n in names))
    del image
    centre = prepared.centre[:config.spatial_dims] if config.spatial_dims == 2 else prepared.centre
    window = torch.from_numpy(crop_channels(prepared, centre, config.image_size)).to(device)
    image_shape = prepared.channels.shape[1:]
    del prepared
    params = {n: p.to(device) for n, p in params.items()}
    logits = _window_logits(model, params, window, config, batch_size).float().cpu()
    if logits.shape[0] != num_classes:
        raise ValueError(f"the model gives {logits.shape[0]} classes, its run config says {num_classes}")
    window_probs = torch.softmax(logits, dim=0).movedim(0, -1)  # [H, W, Z, C]: crop axes first
    background = torch.zeros(num_classes)
    background[0] = 1.0  # outside the window: background, with certainty
    probs = _uncrop(window_probs, centre, image_shape, 0.0)
    outside = _uncrop(torch.ones(window_probs.shape[:-1]), centre, image_shape, 0.0) == 0
    probs[outside] = background
    probs = probs.movedim(-1, 0)  # [C, H, W, Z]

    # Back to the RAS grid one class at a time: a running arg-max holds two volumes, not C of them.
    best = torch.full(ras_shape, -1.0)
    mask = torch.zeros(ras_shape, dtype=torch.uint8)
    scan_shape = tuple(int(n) for n in np.asarray(image_data).shape[:3])
    kept = np.empty((*scan_shape, num_classes), dtype=np.float32) if probabilities else None  # filled in place
    for c in range(num_classes):
        p = probs[c]
        if tuple(p.shape) != tuple(ras_shape):
            p = torch.nn.functional.interpolate(p[None, None], size=ras_shape, mode="trilinear",
                                                align_corners=False)[0, 0]
        better = p > best
        best = torch.where(better, p, best)
        mask[better] = c
        if kept is not None:
            kept[..., c] = _to_scan_orientation(p.numpy(), transform)
    mask_np = _to_scan_orientation(mask.numpy(), transform)
    counts = {int(v): int(n) for v, n in zip(*np.unique(mask_np, return_counts=True))}
    return Segmentation(mask_np, kept, counts)


__all__ = ["Segmentation", "segment_scan"]
