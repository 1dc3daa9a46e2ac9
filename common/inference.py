"""Segmenting a whole scan in its own grid: the reader's geometry applied, the model run, the geometry undone.

A scan goes through exactly what training and evaluation did to it (``fedmeta.common.data.prepare_image``):
reoriented to RAS, resampled to the model's spacing, each channel normalised by its modality (MR: z-scored
over the voxels above the mean; CT: the run's HU window and statistics), and cut to the window of the
training crop size centred on the first channel's foreground (axial slices for a 2D model, one patch for a
3D one).

The window is the model's input as it was trained: the UNet's instance normalisation makes the window's
content part of the computation, so sliding windows over the background (MONAI's sliding-window
inference was tried) change every prediction and cost the adapted model its Dice; voxels outside the
window are background. For CT, a plan (``fedmeta plan``) sets image-size to hold the federation's median
in-plane field of view (512 x 0.78 mm scans: 256 pixels at 1.56 mm, the whole 400 mm field), so only a body
wider than that window is cut, and its voxels outside are called background (docs/inference.md: why not
sliding windows for the rest).

The class probabilities are put in the resampled volume as each batch of slices leaves the model (background
with certainty outside the window), then resampled to the scan's RAS grid: torch's trilinear kernel is, bit
for bit, a linear pass along the slices, then along Y, then along X (each rounded to float32;
tests/common/test_inference.py), so after the pass along the slices the other two run a chunk of output
slices at a time and no class volume of the scan's size is held. The arg-max is taken per chunk (ties to the
lower class) and written straight into the scan's voxel order through a view that undoes the RAS orientation:
the mask has the scan's shape, affine and voxel order, and holds the consortium's label values (the model's
class indices). Masks and probabilities equal those of the previous implementation (commit a057a3a: whole
class volumes) bit for bit wherever it was deterministic itself: torch's softmax computes the elements at the
edges of its vector blocks without vectors, so for a window whose slice is not a multiple of 16 pixels (never
the case for a UNet of 4 levels) a probability's last bit may move, as it already did with the thread count.
``fedmeta perf inference`` measures both on a 512 x 512 x 400 CT (docs/inference.md): 0.3-0.6x the time
outside the model's forward pass (which is now three quarters of it), 0.42-0.47x the peak memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import nibabel
import numpy as np
import torch
from nibabel import orientations
from torch.func import functional_call

from fedmeta.common.data import (
    DataConfig, channel_kind, crop_channels, prepare_image, resampling_problem, to_ras,
)

# Bytes of class probabilities (classes x the scan's in-plane grid x slices) resampled to the scan's grid at once:
# the back-resampling's temporaries are a few of these, whatever the scan's size, instead of class volumes of
# the scan's size (at 512 x 512 x 400, 0.4 GB each).
CHUNK_BYTES = 32 * 2**20


@dataclass
class Segmentation:
    """One scan's mask in the scan's own grid, and (on request) the class probabilities there."""

    mask: np.ndarray  # uint8, the scan's shape (in NIfTI's Fortran order, x fastest)
    probabilities: np.ndarray | None  # float32 [*scan shape, C] (Fortran order too), or None
    voxel_counts: dict[int, int]  # voxels per predicted class
    notes: list[str] = field(default_factory=list)  # what the caller should know (a body wider than the window)


def _scan_view(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``array`` (the scan's voxel order over its first three axes) seen in RAS order, as
    :func:`fedmeta.common.data.to_ras` reorders the scan: a view, so what is written into it lands in ``array``
    in the scan's own order (the inverse of to_ras, without a copy of the volume)."""
    view = orientations.apply_orientation(array, orientations.io_orientation(affine))
    if not np.may_share_memory(view, array):  # nibabel 5 flips and transposes views; a copy would drop the writes
        raise RuntimeError(f"nibabel {nibabel.__version__}: orientations.apply_orientation returned a copy, not a view, "
                           "of the output volume, and fedmeta.common.inference writes the mask through it. Fix: install "
                           "nibabel 5.x (pip install 'nibabel>=5,<6'), with which fedmeta is tested.")
    return view


def _placement(centre: np.ndarray, size: tuple[int, ...], shape: tuple[int, ...]) -> tuple[tuple[slice, ...], ...]:
    """Where a window of ``size`` centred on ``centre`` lies in a volume of ``shape`` (leading axes): the volume's
    slices and the window's, the inverse of :func:`fedmeta.common.data.crop_or_pad` (same rounding)."""
    target, source = [], []
    for axis, n in enumerate(size):
        start = int(round(centre[axis] - n / 2))
        lo, hi = max(start, 0), min(start + n, shape[axis])
        target.append(slice(lo, max(hi, lo)))
        source.append(slice(lo - start, lo - start + max(hi - lo, 0)))
    return tuple(target), tuple(source)


def _class_probabilities(model: torch.nn.Module, params: Mapping[str, torch.Tensor], window: torch.Tensor,
                         centre: np.ndarray, shape: tuple[int, ...], config: DataConfig, num_classes: int,
                         batch_size: int, device: torch.device | str) -> torch.Tensor:
    """The model's class probabilities over the resampled scan, float32 ``[classes, Z, X, Y]`` (``shape`` is
    ``(X, Y, Z)``; slices ahead of the in-plane axes, the layout the model's slices come in): the window's where it
    lies, background with certainty elsewhere.

    ``window``: ``[channels, H, W, Z]`` (2D: run as axial slices, ``batch_size`` at a time, each batch's softmax
    put in place as it comes, so the window's logits are never held whole) or ``[channels, H, W, D]`` (3D: one
    patch)."""
    probs = torch.zeros((num_classes, shape[2], shape[0], shape[1]))
    probs[0] = 1.0  # outside the window: background, with certainty
    target, source = _placement(centre, tuple(window.shape[1:1 + len(centre)]), shape)
    params = {n: p.to(device) for n, p in params.items()}

    def run(batch: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, params, (batch.to(device),)).float().cpu()
        if logits.shape[1] != num_classes:
            raise ValueError(f"the model gives {logits.shape[1]} classes, its run config says num-classes="
                             f"{num_classes}. Fix: segment with the run config the model was trained with (its "
                             "checkpoint's or site model card's).")
        return logits

    with torch.inference_mode():
        if config.spatial_dims == 3:
            patch = torch.softmax(run(window[None])[0], dim=0)  # [classes, H, W, D]
            probs.permute(0, 2, 3, 1)[(slice(None), *target)] = patch[(slice(None), *source)]
            return probs
        slices = window.permute(3, 0, 1, 2)  # [Z, channels, H, W]: axial slices, as the model was trained
        for z in range(0, len(slices), batch_size):
            logits = run(slices[z:z + batch_size])  # [B, classes, H, W]
            # Per voxel, torch's softmax over the classes is the whole window's, bit for bit wherever its vector blocks
            # line up (slices of a multiple of 16 pixels; see the module docstring and
            # tests/simulations/test_perf_inference.py).
            batch = torch.softmax(logits, dim=1).transpose(0, 1)  # [classes, B, H, W]
            probs[:, z:z + len(logits), target[0], target[1]] = batch[:, :, source[0], source[1]]
    return probs


def _linear(volume: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """``volume`` resampled to ``size`` along ``axis`` with torch's linear kernel (align_corners=False, as the
    trilinear resampling of ``fedmeta.common.data``); unchanged when the axis has that size already."""
    if volume.shape[axis] == size:
        return volume
    moved = volume.movedim(axis, -1)
    rows = torch.nn.functional.interpolate(moved.reshape(-1, 1, moved.shape[-1]), size=size, mode="linear",
                                           align_corners=False)
    return rows.reshape(*moved.shape[:-1], size).movedim(-1, axis)


def _to_scan_grid(probs: torch.Tensor, ras_shape: tuple[int, ...], mask_ras: np.ndarray,
                  kept_ras: np.ndarray | None) -> np.ndarray:
    """Resamples ``probs`` (``[classes, Z, X', Y']``: the model's grid in-plane, already resampled along Z by
    :func:`_linear`) to ``ras_shape`` ``(X, Y, Z)`` and writes the arg-max into ``mask_ras`` (and the probabilities
    into ``kept_ras``, ``[X, Y, Z, classes]``), a chunk of output slices at a time; returns the voxels per class.

    torch's trilinear kernel evaluates each voxel as a linear interpolation along Z, then Y, then X, rounding each
    to float32: the three passes done in that order with its linear kernel give the same bits
    (tests/common/test_inference.py). The passes along Y and X do not mix slices, so they run per chunk of output
    slices. The arg-max runs in numpy: single-threaded, it is faster here than torch's thread pool starting a
    parallel region per operation on a chunk (docs/inference.md)."""
    classes = probs.shape[0]
    # The whole-volume arg-max kept the running best with torch.where(p > best, p, best), under which a NaN never
    # wins; without a NaN anywhere, np.maximum is the same and faster.
    finite = not bool(torch.isnan(probs).any())
    step = max(1, CHUNK_BYTES // (4 * classes * ras_shape[0] * ras_shape[1]))
    counts = np.zeros(classes, dtype=np.int64)
    for z in range(0, ras_shape[2], step):
        part = _linear(_linear(probs[:, z:z + step], 3, ras_shape[1]), 2, ras_shape[0])  # [classes, dz, X, Y]
        part = part.transpose(2, 3).contiguous().numpy()  # [classes, dz, Y, X]: the last pass's memory order, no copy
        # A running arg-max over the classes, exactly the whole-volume one's: strictly greater wins, so ties keep the
        # lower class; it starts from -1, below every probability.
        best = np.full_like(part[0], -1.0)
        better = np.empty_like(part[0], dtype=bool)
        labels = np.zeros_like(part[0], dtype=np.uint8)
        for c in range(classes):
            np.greater(part[c], best, out=better)
            if c:
                np.putmask(labels, better, c)
            if c < classes - 1:
                if finite:
                    np.maximum(best, part[c], out=best)
                else:
                    np.putmask(best, better, part[c])
        mask_ras[:, :, z:z + step] = labels.transpose(2, 1, 0)
        if classes <= 16:  # a comparison per class beats bincount's conversion of every label to int64 (3x here)
            present = [np.count_nonzero(labels == c) for c in range(1, classes)]
            counts += [labels.size - sum(present), *present]
        else:
            counts += np.bincount(labels.ravel(), minlength=classes)
        if kept_ras is not None:
            kept_ras[:, :, z:z + step] = part.transpose(3, 2, 1, 0)
    return counts


def segment_scan(model: torch.nn.Module, params: Mapping[str, torch.Tensor], image_data: np.ndarray,
                 affine: np.ndarray, config: DataConfig, *, num_classes: int, batch_size: int = 16,
                 probabilities: bool = False, device: torch.device | str = "cpu",
                 channels: tuple[str, ...] | None = None) -> Segmentation:
    """The mask (and optionally the probabilities) of one scan, in the scan's own grid.

    ``image_data``: ``[X, Y, Z]``, or ``[X, Y, Z, C]`` with the model's ``config.in_channels`` channels in its
    order; ``channels``: their names (how each is normalised, :func:`fedmeta.common.data.channel_kind`), by
    default the run's ``config.channel_names`` (none: one MR channel). ``batch_size``: axial slices per forward
    pass of a 2D model (the run's eval-batch-size): time and memory; oneDNN may pick another convolution
    algorithm for another batch size, which can move a probability's last bits.

    Memory beyond the scan itself: the RAS copy of the scan and ``prepare_image``'s work while preprocessing,
    then the model-grid volume and its class probabilities, the mask, and chunks of :data:`CHUNK_BYTES`
    (``probabilities=True`` adds the float32 probabilities of the scan's size that it returns).
    """
    affine = np.asarray(affine, dtype=np.float64)
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
    window = torch.from_numpy(crop_channels(prepared, centre, config.image_size))
    model_shape = prepared.channels.shape[1:]
    notes = _cropped_notes(prepared.extent, config)
    del prepared

    # NIfTI's own voxel order (x fastest, as nibabel reads and writes it): a chunk of axial slices is one block of it.
    scan_shape = tuple(int(n) for n in np.shape(image_data)[:3])
    mask = np.empty(scan_shape, dtype=np.uint8, order="F")
    kept = np.empty((*scan_shape, num_classes), dtype=np.float32, order="F") if probabilities else None
    probs = _class_probabilities(model, params, window, centre, model_shape, config, num_classes, batch_size, device)
    del window
    probs = _linear(probs, 1, ras_shape[2])  # along the slices first, as torch's trilinear kernel (_to_scan_grid)
    kept_ras = None if kept is None else _scan_view(kept, affine)
    counts = _to_scan_grid(probs, ras_shape, _scan_view(mask, affine), kept_ras)
    return Segmentation(mask, kept, {c: int(n) for c, n in enumerate(counts) if n}, notes)


def _cropped_notes(extent: np.ndarray | None, config: DataConfig) -> list[str]:
    """A note when the scan's foreground (CT: the body) is wider than the model's window: its voxels outside the
    window are called background, as in training, but a hospital should know its scan was cut."""
    if extent is None:
        return []
    axes = range(len(config.image_size))
    cut = [a for a in axes if extent[a] > config.image_size[a]]
    if not cut:
        return []
    spacing = config.spacing
    sizes = ", ".join(f"{'RAS'[a]} {extent[a] * spacing[a]:.0f} mm against {config.image_size[a] * spacing[a]:.0f} mm"
                      for a in cut)
    return [f"the scan's foreground is wider than the model's window ({sizes}): what lies outside the window is "
            "labelled background without being looked at. Fix: plan the federation with a larger --max-image-size "
            "(or a coarser spacing) if such scans are the site's usual, or check that the scan is not a whole-body one."]


__all__ = ["Segmentation", "segment_scan"]
