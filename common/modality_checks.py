"""What ``fedmeta check-data`` says about a usable case's intensities and spacing for the modality it declares.

These are warnings, not refusals: the case loads and trains. They name what the plan and the normalisation will
do with values a modality should not hold (CT outside the scanner's Hounsfield range, negative MR magnitudes), a
channel whose values contradict its declared modality (most often channels stacked in another order than
``dataset.json`` names them), and a voxel size far from the federation's planned spacing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedmeta.common.site_layout import CT_BODY_HU, CT_RANGE_HU, channel_kind

# Beyond this factor from the planned spacing (either way) along an axis, resampling invents or discards most of
# the detail: a header with a wrong voxel size, a localiser, or a scan from another protocol.
SPACING_FACTOR = 3.0
# An MR channel with this share of voxels at -900 or below holds air in Hounsfield units: it is a CT.
HU_AIR_SHARE = 0.2
MR_NEGATIVE_SHARE = 0.01  # a few negative voxels are reconstruction noise; more are a phase map or normalised data


def modality_warnings(path: Path, image_data: np.ndarray, zooms: np.ndarray, channels: tuple[str, ...],
                      planned_spacing: tuple[float, float, float] | None = None) -> list[str]:
    """Warnings about one usable case: ``image_data`` ``[X, Y, Z]`` or ``[X, Y, Z, C]`` as read, ``zooms`` its
    voxel sizes (mm, RAS order), ``channels`` the site's declared channel names (() = one undeclared channel),
    ``planned_spacing`` the plan's (R, A, S) spacing in mm, if a plan is given."""
    notes = []
    volumes = image_data[..., None] if image_data.ndim == 3 else image_data
    names = channels or ("",)
    for index, name in enumerate(names[:volumes.shape[-1]]):
        volume = volumes[..., index]
        which = f"channel {index} ({name})" if len(names) > 1 else (f"the image ({name})" if name else "the image")
        if channel_kind(name or None) == "ct":
            notes.extend(_ct_warnings(path, volume, which))
        else:
            notes.extend(_mr_warnings(path, volume, which, declared=bool(name)))
    if planned_spacing is not None:
        ratio = np.asarray(zooms[:3], dtype=np.float64) / np.asarray(planned_spacing, dtype=np.float64)
        far = [axis for axis in range(3) if not 1 / SPACING_FACTOR <= ratio[axis] <= SPACING_FACTOR]
        if far:
            have = " x ".join(f"{z:g}" for z in np.round(zooms[:3], 3))
            want = " x ".join(f"{s:g}" for s in planned_spacing)
            notes.append(f"{path}: voxel size {have} mm is more than {SPACING_FACTOR:g}x from the federation's planned "
                         f"spacing {want} mm along axis {'/'.join('RAS'[a] for a in far)}; resampling it to the plan "
                         "discards or invents most of its detail there. Fix: check the header's voxel size (a scan "
                         "written without its spacing has 1 mm), or leave out a localiser or another protocol's scan.")
    return notes


def _ct_warnings(path: Path, volume: np.ndarray, which: str) -> list[str]:
    low, high = CT_RANGE_HU
    notes = []
    outside = (volume < low) | (volume > high)
    if outside.any():
        share = float(outside.mean())
        notes.append(f"{path}: {share:.1%} of {which}'s voxels lie outside the CT range {low:g}..{high:g} HU (min "
                     f"{float(volume.min()):g}, max {float(volume.max()):g}); values below {low:g} are usually padding "
                     "outside the scanner's circle and values above it metal; both are clipped to the plan's window. "
                     "Fix: none needed for padding; if every value is off, the export did not apply the DICOM "
                     "RescaleSlope/RescaleIntercept — re-export in Hounsfield units.")
    if not (volume < CT_BODY_HU).any() and float(volume.max()) < 500:
        notes.append(f"{path}: {which} is declared CT but holds no air (nothing below {CT_BODY_HU:g} HU; values "
                     f"{float(volume.min()):g}..{float(volume.max()):g}), so it does not look like Hounsfield units. Fix: "
                     "check that the image channels are in dataset.json's 'modality' order, and that the scan was "
                     "exported in HU.")
    return notes


def _mr_warnings(path: Path, volume: np.ndarray, which: str, declared: bool) -> list[str]:
    notes = []
    air = float((volume <= -900).mean())
    if air >= HU_AIR_SHARE:
        what = "is declared MR" if declared else "declares no modality"
        notes.append(f"{path}: {which} {what} but {air:.0%} of its voxels are at -900 or below, as air is in a CT's "
                     "Hounsfield units; it would be z-scored as an MR image. Fix: if it is a CT, name the channel "
                     "\"CT\" in dataset.json's 'modality'; if the site has several channels, check they are stacked "
                     "in dataset.json's order.")
        return notes
    negative = float((volume < 0).mean())
    if negative > MR_NEGATIVE_SHARE:
        notes.append(f"{path}: {negative:.1%} of {which}'s voxels are negative (min {float(volume.min()):g}); MR "
                     "magnitude images are not. It is a phase or difference map, or was normalised before export. "
                     "Fix: export the magnitude image; an image already normalised is fine (fedmeta z-scores each MR "
                     "image over its foreground), but its foreground mask may then be off.")
    return notes


__all__ = ["HU_AIR_SHARE", "MR_NEGATIVE_SHARE", "SPACING_FACTOR", "modality_warnings"]
