"""The site data reader, one path for synthetic and real hospital data, and the episode sampler.

A site folder (MSD layout with dataset.json, or paired files matched by globs) is read case by case
through :func:`fedmeta.common.validate.check_case`; cases with problems are skipped with one warning (or
refused, ``strict``). Each usable case is reoriented to RAS, resampled to ``DataConfig.spacing``, normalised
per channel by its modality (MR: a robust z-score over the voxels above the mean; CT: clipped to a HU window
and standardised with the federation's statistics, :func:`normalise_ct`), cropped/padded around the
foreground of its first channel (MR: the voxels above the mean; CT: the body above -500 HU) to ``image_size``
and cut into axial slices (2D) or one centred patch (3D). A site's channels (dataset.json's ``modality``) are
stacked in the run's ``channels`` order as the model's input channels. Every slice of a patient's volume is kept, so a patient can be scored over its
whole volume (``fedmeta.common.metrics``); episodes draw from the training slices only (every slice
with a structure and a few background-only ones, :func:`select_slices`).

Layouts: 2D images ``[N, C, H, W]`` float32 with labels ``[N, H, W]`` int64, where H runs along the
patient's left-right axis (R) and W along posterior-anterior (A) of an axial slice; 3D ``[N, C, H, W, D]``
and ``[N, H, W, D]``; C is ``DataConfig.in_channels`` (1 for the brain federations).
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fedmeta.common.read_limits import ReadLimits
from fedmeta.common.site_layout import CT_BODY_HU, CT_RANGE_HU, MAX_CHANNELS, channel_kind, channel_order
from fedmeta.common.volume_checks import ras_grid
from fedmeta.common.validate import (
    CaseProblem, LoadedCase, check_case, discover_site, episode_problems, thin_volume_warning,
)

Episode = tuple[Tensor, Tensor, Tensor, Tensor]


# Loaded label maps are kept as uint8 (class indices < 256) and handed out as int64: a site held in
# memory for a whole run takes 5 bytes a voxel instead of 12.
# A site's random order key, which the ClientApp of earlier releases kept in the data folder (now under
# FEDMETA_HOME, fedmeta.client.site): still read there, and known to the generator as fedmeta's own.
SITE_KEY_FILE = ".fedmeta-site-key"
LABEL_STORAGE = torch.uint8

@dataclass(frozen=True)
class DataConfig:
    """How a site's volumes become model inputs."""

    spatial_dims: int = 2  # 2: axial slices; 3: patches
    image_size: tuple[int, ...] = (64, 64)  # H, W (2D) or H, W, D (3D patch)
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)  # mm after resampling (R, A, S)
    num_classes: int = 4
    background_slice_fraction: float = 0.1  # at most this share of a patient's slices is background-only
    image_glob: str | None = None  # for non-MSD folders, e.g. "*_img.nii.gz"
    label_glob: str | None = None  # e.g. "*_seg.nii.gz" (paired by the part '*' matched)
    strict: bool = False  # raise on a bad case instead of skip + warn
    in_channels: int = 1  # the model's input channels: a site's declared channels, stacked
    channel_names: tuple[str, ...] = ()  # their order (dataset.json names); () = any one channel
    ct_window: tuple[float, float] = CT_RANGE_HU  # HU every CT channel is clipped to
    ct_mean: float = 0.0  # the federation's CT statistics after clipping (fedmeta plan) ...
    ct_std: float = 0.0  # ... 0: none planned, each CT image is standardised over its own body
    # The voxel cap and files outside the site folder: ReadLimits.from_environment() where fedmeta starts.
    limits: ReadLimits = ReadLimits()

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims={self.spatial_dims} is not supported; use 2 (axial slices) or 3 (patches).")
        if len(self.image_size) != self.spatial_dims or any(s <= 0 for s in self.image_size):
            raise ValueError(
                f"image_size={self.image_size} must hold {self.spatial_dims} positive sizes for spatial_dims="
                f"{self.spatial_dims}, e.g. {(64, 64) if self.spatial_dims == 2 else (80, 96, 80)}."
            )
        if len(self.spacing) != 3 or any(not math.isfinite(s) or s <= 0 for s in self.spacing):
            raise ValueError(f"spacing={self.spacing} must be three positive voxel sizes in mm, e.g. (2.0, 2.0, 2.0).")
        if not 2 <= self.num_classes <= 256:
            raise ValueError(f"num_classes={self.num_classes} must be 2 (background and one structure) to 256 "
                             "(labels are held as uint8).")
        if not 0.0 <= self.background_slice_fraction < 1.0:
            raise ValueError(
                f"background_slice_fraction={self.background_slice_fraction} must lie in [0, 1): it is the share "
                "of background-only slices kept beside the slices that contain structures."
            )
        if (self.image_glob is None) != (self.label_glob is None):
            raise ValueError(
                f"image_glob={self.image_glob!r} and label_glob={self.label_glob!r}: give both or neither."
            )
        object.__setattr__(self, "channel_names", tuple(str(c) for c in self.channel_names))
        object.__setattr__(self, "ct_window", tuple(float(v) for v in self.ct_window))
        if not 1 <= self.in_channels <= MAX_CHANNELS:
            raise ValueError(f"in_channels={self.in_channels} must be 1 to {MAX_CHANNELS} (a site's image channels).")
        if self.channel_names and len(self.channel_names) != self.in_channels:
            raise ValueError(f"channel_names={self.channel_names} names {len(self.channel_names)} channels, but "
                             f"in_channels={self.in_channels}; name every input channel once, in order.")
        low, high = self.ct_window
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"ct_window={self.ct_window} must be two finite HU values, low < high, e.g. (-1024, 3071).")
        if not (math.isfinite(self.ct_mean) and math.isfinite(self.ct_std) and self.ct_std >= 0):
            raise ValueError(f"ct_mean={self.ct_mean}, ct_std={self.ct_std} must be finite with ct_std >= 0 "
                             "(0: standardise each CT image over its own body).")
        if not isinstance(self.limits, ReadLimits):
            raise TypeError(f"limits={self.limits!r} must be a fedmeta.common.read_limits.ReadLimits, e.g. "
                            "ReadLimits.from_environment().")


# ----------------------------------------------------------------------------------------------------
# one volume


def to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder a volume's axes and flips to the closest RAS orientation; returns (data, voxel sizes in mm)."""
    # nibabel: +0.14 s on this module's import (python -X importtime), which `fedmeta synth` pays for a lazy preset
    # that reads no volume (fedmeta.common.synth imports this module); the ClientApp has it from MONAI anyway.
    from nibabel import orientations

    transform = orientations.io_orientation(affine)
    reoriented = orientations.apply_orientation(data, transform)
    new_affine = affine @ orientations.inv_ornt_aff(transform, data.shape)
    zooms = np.sqrt((new_affine[:3, :3] ** 2).sum(axis=0))
    return np.ascontiguousarray(reoriented), zooms


def resampled_shape(shape, zooms, spacing) -> tuple[int, ...]:
    """The voxel grid a volume of ``shape`` and voxel sizes ``zooms`` (mm) has at ``spacing`` mm."""
    target = np.round(np.asarray(shape[:3]) * np.asarray(zooms) / np.asarray(spacing))
    return tuple(int(n) for n in np.maximum(target, 1))


def resampling_problem(name, shape, zooms, config: DataConfig) -> str | None:
    """Why ``name``'s volume must not be resampled and cropped for ``config`` — the grid at ``config.spacing``, or
    the model's window over it, would hold more voxels than ``config.limits.max_voxels`` — or None. Checked
    from the header before anything is allocated: a damaged run config (a spacing of 0.01 mm, an image size of
    4096) would otherwise ask for terabytes."""
    target = resampled_shape(shape, zooms, config.spacing)
    window = tuple(config.image_size) + (target[2],) if config.spatial_dims == 2 else tuple(config.image_size)
    cap = config.limits.max_voxels
    for what, grid in (("resampled", target), ("cropped to the model's window", window)):
        voxels = math.prod(grid)
        if voxels > cap:
            extent = " x ".join(f"{n * z:.0f}" for n, z in zip(shape[:3], zooms))
            return (f"{name}: {what} for the model's spacing {'/'.join(f'{s:g}' for s in config.spacing)} mm and "
                    f"image size {'x'.join(map(str, config.image_size))}, this {extent} mm scan would become "
                    f"{' x '.join(map(str, grid))} = {voxels:,} voxels ({voxels * 4 / 2**30:,.1f} GiB as float32), "
                    f"more than the {cap:,} voxels ({cap * 4 / 2**30:,.1f} GiB) a site loads. The model's run config "
                    "is damaged or not meant for scans (its spacing-mm or image-size). Fix: use the consortium's "
                    "release as published, or raise FEDMETA_MAX_VOXELS if the size is genuine.")
    return None


def resample_label(label: np.ndarray, zooms: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """A label map resampled (nearest) to ``spacing`` mm; :func:`resample`'s label half."""
    target = resampled_shape(label.shape, zooms, spacing)
    if target == tuple(label.shape):
        return label
    return torch.nn.functional.interpolate(torch.from_numpy(label.astype(np.float32))[None, None], size=target,
                                           mode="nearest-exact")[0, 0].numpy().astype(np.int64)


def resample(image: np.ndarray, label: np.ndarray, zooms: np.ndarray, spacing: tuple[float, float, float]):
    """Resample an RAS image (trilinear) and label (nearest) to ``spacing`` mm.

    The residual rotation of an oblique scan is ignored, as nnU-Net does. torch's interpolate is used
    rather than MONAI's Spacing: 15 ms against 250 ms a volume here, and a site loads 10-20 of them.
    """
    shape = np.asarray(image.shape)
    target = resampled_shape(image.shape, zooms, spacing)
    if target == tuple(shape):
        return image, label
    image_t = torch.nn.functional.interpolate(torch.from_numpy(image)[None, None], size=target, mode="trilinear",
                                              align_corners=False)
    label_t = torch.nn.functional.interpolate(torch.from_numpy(label.astype(np.float32))[None, None], size=target,
                                              mode="nearest-exact")
    return image_t[0, 0].numpy(), label_t[0, 0].numpy().astype(np.int64)


def head_mask(image: np.ndarray) -> np.ndarray:
    """Voxels brighter than the volume's mean: the head, whatever the background noise (a classic heuristic)."""
    return image > image.mean()


ZSCORE_LIMIT = 5.0


def normalise_ct(image: np.ndarray, window: tuple[float, float], mean: float, std: float) -> np.ndarray:
    """CT in Hounsfield units, nnU-Net's recipe: clipped to ``window`` (the federation's foreground 0.5-99.5
    percentiles when planned) and standardised with the federation's foreground ``mean`` and ``std``; with no
    plan (``std == 0``), over the image's own body (above :data:`CT_BODY_HU`) instead."""
    low, high = window
    clipped = np.clip(image, low, high)
    if std <= 0:
        body = image > CT_BODY_HU
        values = clipped[body] if body.any() else clipped
        mean, std = float(values.mean()), float(values.std())
    return ((clipped - mean) / max(std, 1e-6)).astype(np.float32)


def resample_image(image: np.ndarray, zooms: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """One RAS volume resampled (trilinear) to ``spacing`` mm; :func:`resample`'s image half."""
    target = resampled_shape(image.shape, zooms, spacing)
    if target == tuple(image.shape):
        return image
    return torch.nn.functional.interpolate(torch.from_numpy(image)[None, None], size=target, mode="trilinear",
                                           align_corners=False)[0, 0].numpy()


@dataclass
class PreparedImage:
    """A scan's channels as the model sees them before the crop: ``[C, X, Y, Z]`` at the model's spacing, and the
    centre of its first channel's foreground (the crop's centre), and each channel's padding value."""

    channels: np.ndarray
    centre: np.ndarray
    fill: tuple[float, ...]
    extent: np.ndarray | None = None  # the foreground's bounding box, voxels per axis (0: none found)


def prepare_image(image: np.ndarray, zooms: np.ndarray, config: DataConfig, kinds: tuple[str, ...]) -> PreparedImage:
    """An RAS image (``[X, Y, Z]``, or ``[X, Y, Z, C]`` with channels in the model's order) resampled to the model's
    spacing and normalised per channel by ``kinds`` (:func:`channel_kind`); one path for training, evaluation and
    inference, so the model sees at inference what it saw in training. One MR channel is what fedmeta did before
    it read CT and multi-channel scans, bit for bit."""
    volumes = image[..., None] if image.ndim == 3 else image
    if volumes.shape[-1] != len(kinds):
        raise ValueError(f"the image has {volumes.shape[-1]} channel(s), the model takes {len(kinds)}")
    channels, centre, fill = [], None, []
    for index, kind in enumerate(kinds):
        volume = resample_image(np.ascontiguousarray(volumes[..., index], dtype=np.float32), zooms, config.spacing)
        if kind == "ct":
            normalised = normalise_ct(volume, config.ct_window, config.ct_mean, config.ct_std)
            foreground = volume > CT_BODY_HU
        else:
            normalised = normalise_intensity(volume)
            foreground = head_mask(normalised)
        if index == 0:  # the crop's centre, and what a window smaller than the foreground would cut off
            bounds = foreground_bounds(foreground)
            centre = box_centre(bounds, foreground.shape)
            extent = np.zeros(foreground.ndim, dtype=np.int64) if bounds is None else bounds[1] - bounds[0] + 1
        channels.append(normalised)
        fill.append(float(normalised.min()))
    return PreparedImage(np.stack(channels), centre, tuple(fill), extent)


def foreground_bounds(foreground: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The first and last foreground voxel along each axis (the bounding box), or None when there is none.

    Read from the mask's projections on each axis: ``np.argwhere`` would list every foreground voxel, 24 bytes each
    (0.25 GB for a CT's body at 256 x 256 x 400, twice that while it is built), for the same two corners."""
    if not foreground.any():
        return None
    low, high = [], []
    for axis in range(foreground.ndim):
        hit = np.flatnonzero(foreground.any(axis=tuple(a for a in range(foreground.ndim) if a != axis)))
        low.append(hit[0])
        high.append(hit[-1])
    return np.asarray(low), np.asarray(high)


def box_centre(bounds: tuple[np.ndarray, np.ndarray] | None, shape: tuple[int, ...]) -> np.ndarray:
    """The centre in voxels of a bounding box (:func:`foreground_bounds`), or of a volume of ``shape`` without one."""
    return np.asarray(shape) / 2 if bounds is None else (bounds[0] + bounds[1] + 1) / 2



def crop_channels(prepared: PreparedImage, centre: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Each channel of ``prepared`` cropped/padded (its own fill) to ``size`` around ``centre``: ``[C, *size, ...]``."""
    return np.stack([crop_or_pad(volume, centre, size, fill) for volume, fill in zip(prepared.channels, prepared.fill)])


def normalise_intensity(image: np.ndarray) -> np.ndarray:
    """Robust z-score: clip the top 0.5 % of head intensities (bright artefacts), standardise over the head,
    then clip to +-5 SD so that the background of a low-contrast scan (PD: head SD ~10 % of its mean, so
    background at -10 SD) does not dwarf its tissue contrast."""
    mask = head_mask(image)
    if not mask.any():
        return np.zeros_like(image, dtype=np.float32)
    top = float(np.percentile(image[mask], 99.5))
    clipped = np.minimum(image, top)
    mean = float(clipped[mask].mean())
    std = float(clipped[mask].std())
    z = (clipped - mean) / max(std, 1e-6)
    return np.clip(z, -ZSCORE_LIMIT, ZSCORE_LIMIT).astype(np.float32)


def crop_or_pad(volume: np.ndarray, centre: np.ndarray, size: tuple[int, ...], fill: float) -> np.ndarray:
    """A window of ``size`` over the leading axes of ``volume`` centred on ``centre``, padded with ``fill``."""
    out = np.full(tuple(size) + volume.shape[len(size):], fill, dtype=volume.dtype)
    source, target = [], []
    for axis, n in enumerate(size):
        start = int(round(centre[axis] - n / 2))
        lo, hi = max(start, 0), min(start + n, volume.shape[axis])
        source.append(slice(lo, max(hi, lo)))
        target.append(slice(lo - start, lo - start + max(hi - lo, 0)))
    out[tuple(target)] = volume[tuple(source)]
    return out


def prepare_case(loaded: LoadedCase, config: DataConfig,
                 kinds: tuple[str, ...] = ("mr",)) -> tuple[Tensor, Tensor, np.ndarray]:
    """One validated case as model inputs (see the module docstring for layouts) and its training slices.

    ``kinds``: each input channel's normalisation (:func:`channel_kind`), the image's channels already in the
    model's order. 2D: every axial slice of the volume, and the indices of those episodes may draw
    (:func:`select_slices`); 3D: the one centred patch, index 0.
    """
    image, zooms = to_ras(loaded.image_data, np.asarray(loaded.image.affine, dtype=np.float64))
    problem = resampling_problem(f"case {loaded.case_id}", image.shape[:3], zooms, config)
    if problem:
        raise ValueError(problem)
    label, _ = to_ras(loaded.label_data, np.asarray(loaded.image.affine, dtype=np.float64))
    prepared = prepare_image(image, zooms, config, kinds)
    label = resample_label(label, zooms, config.spacing)
    centre = prepared.centre
    if config.spatial_dims == 3:
        image = crop_channels(prepared, centre, config.image_size)  # [C, H, W, D]
        label = crop_or_pad(label, centre, config.image_size, 0)
        patch_image = torch.from_numpy(image)[None].contiguous()
        return patch_image, torch.from_numpy(label)[None].contiguous().to(LABEL_STORAGE), np.zeros(1, dtype=np.int64)
    image = crop_channels(prepared, centre[:2], config.image_size)  # [C, H, W, Z]
    label = crop_or_pad(label, centre[:2], config.image_size, 0)
    keep = select_slices(label, config.background_slice_fraction)
    images = torch.from_numpy(np.ascontiguousarray(image.transpose(3, 0, 1, 2)))  # [Z, C, H, W]
    labels = torch.from_numpy(np.ascontiguousarray(label.transpose(2, 0, 1)))
    return images, labels.to(LABEL_STORAGE), keep.astype(np.int64)


def select_slices(label: np.ndarray, background_fraction: float) -> np.ndarray:
    """Indices of the axial slices to keep: every slice with a structure, plus background-only slices
    spread evenly over the rest so that they make up at most ``background_fraction`` of the kept slices."""
    has_structure = label.reshape(-1, label.shape[-1]).any(axis=0)
    foreground = np.flatnonzero(has_structure)
    background = np.flatnonzero(~has_structure)
    wanted = int(math.floor(background_fraction / (1 - background_fraction) * len(foreground) + 1e-9))
    wanted = min(wanted, len(background))
    if wanted > 0:
        background = background[np.round(np.linspace(0, len(background) - 1, wanted)).astype(int)]
    else:
        background = background[:0]
    return np.sort(np.concatenate([foreground, background]))


# ----------------------------------------------------------------------------------------------------
# a site


@dataclass
class SiteDataset:
    """All usable patients of one site, preprocessed and held in memory (a few MB for 2D)."""

    name: str
    root: Path
    config: DataConfig
    patient_ids: list[str]
    images: list[Tensor]  # per patient, the whole volume: [N, C, H, W] (2D) or [N, C, H, W, D]
    labels: list[Tensor]  # per patient: [N, H, W] or [N, H, W, D]
    train_slices: list[np.ndarray]  # per patient: indices into images[p] that episodes draw from
    skipped: list[CaseProblem] = field(default_factory=list)  # bad cases and every reason
    ignored: list[CaseProblem] = field(default_factory=list)  # files in imagesTr/ dataset.json does not list
    label_names: dict[int, str] | None = None  # the site's declared labels (None: not declared)
    label_protocol: str = "standard"
    channel_names: tuple[str, ...] = ("",)  # the input channels in the model's order ("" = one undeclared channel)

    @classmethod
    def load(cls, root: Path | str, config: DataConfig,
             on_case: Callable[[LoadedCase], None] | None = None) -> "SiteDataset":
        """Read a site folder; bad cases are skipped with one warning (``config.strict``: raise instead).
        ``on_case`` sees each usable case as read (raw voxels, header), before it is preprocessed."""
        root = Path(root)
        layout = discover_site(root, config.image_glob, config.label_glob, limits=config.limits)
        allowed = set(layout.labels) if layout.labels is not None else None
        skipped = list(layout.problems)
        patient_ids, images, labels, train_slices = [], [], [], []
        # Declared labels the model cannot predict (negative, or past its classes) spoil every case alike.
        undeclarable = sorted(v for v in allowed if not 0 <= v < config.num_classes) if allowed is not None else []
        order, channel_names = channel_order(f"{layout.name} ({root})", layout.channels, config.in_channels,
                                             config.channel_names)
        kinds = tuple(channel_kind(name or None) for name in channel_names)
        for case in layout.cases:
            problems, loaded = check_case(case, allowed, config.num_classes, limits=config.limits,
                                          channels=layout.channels)
            if loaded is not None and undeclarable:
                problems = [f"{case.label}: dataset.json declares label values {undeclarable} outside the model's "
                            f"classes 0..{config.num_classes - 1}. Fix: remap the labels or configure more classes."]
            if problems:
                skipped.append(CaseProblem(case.case_id, tuple(problems)))
                continue
            note = thin_volume_warning(case.image, loaded.image_data.shape[:3], loaded.image.affine)
            if note:
                warnings.warn(note, UserWarning, stacklevel=2)
            if on_case is not None:
                on_case(loaded)
            if loaded.image_data.ndim == 4 and order != list(range(len(order))):  # the run's channel order
                loaded.image_data = np.ascontiguousarray(loaded.image_data[..., order])
            case_images, case_labels, case_slices = prepare_case(loaded, config, kinds)
            patient_ids.append(case.case_id)
            images.append(case_images)
            labels.append(case_labels)
            train_slices.append(case_slices)
        if layout.unlisted:  # dataset.json's 'training' list is the site: what it leaves out is not read
            listing = "\n".join(f"  - {problem}" for problem in layout.unlisted)
            warnings.warn(f"site {layout.name} ({root}): {len(layout.unlisted)} file(s) in imagesTr/ not used:\n"
                          f"{listing}", UserWarning, stacklevel=2)
        if skipped:
            listing = "\n".join(f"  - {problem}" for problem in skipped)
            message = (f"site {layout.name} ({root}): {len(skipped)} of {layout.num_listed} listed case(s) "
                       f"unusable:\n{listing}")
            if config.strict:
                raise ValueError(message + "\nFix them (fedmeta check-data lists the same), or load with strict=False to skip them.")
            warnings.warn(message + "\nThey are skipped; `fedmeta check-data` lists the fixes.", UserWarning, stacklevel=2)
        if not patient_ids:
            what = "has no usable case" if layout.num_listed else "lists no case (dataset.json's 'training' is empty)"
            raise ValueError(f"site {layout.name} ({root}) {what}; run `fedmeta check-data {root}` for the fixes.")
        return cls(name=layout.name, root=root, config=config, patient_ids=patient_ids, images=images, labels=labels,
                   train_slices=train_slices, skipped=skipped, ignored=list(layout.unlisted), label_names=layout.labels,
                   label_protocol=layout.label_protocol, channel_names=channel_names)

    @property
    def num_patients(self) -> int:
        return len(self.patient_ids)

    @cached_property
    def labelled_classes(self) -> frozenset[int]:
        """Every class value that some patient's labels hold (scanned once per loaded site)."""
        return frozenset(int(v) for labels in self.labels for v in torch.unique(labels).tolist())

    @property
    def num_slices(self) -> int:
        """Slices episodes draw from, over every patient (a site's training data, as FedAvg weighs it)."""
        return sum(len(s) for s in self.train_slices)

    def patient(self, index: int) -> tuple[Tensor, Tensor]:
        """(images, labels) of one patient: [N, 1, H, W] float32 and [N, H, W] int64 (2D)."""
        if not -self.num_patients <= index < self.num_patients:
            raise IndexError(f"patient index {index} is out of range for site {self.name} with {self.num_patients} patients.")
        return self.images[index], self.labels[index].long()

    def foreground_indices(self, index: int) -> np.ndarray:
        """Slices (or patches) of one patient that contain a structure."""
        labels = self.labels[index]
        return np.flatnonzero(labels.reshape(len(labels), -1).any(dim=1).numpy())


# ----------------------------------------------------------------------------------------------------
# episodes


def _check_counts(site: SiteDataset, **counts: int) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer.")
    if site.num_patients < 2:
        raise ValueError(episode_problems(site.root, site.num_patients, counts.get("k"), counts.get("q"))[0])


def _gather(site: SiteDataset, picks: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    images = torch.stack([site.images[p][s] for p, s in picks])
    labels = torch.stack([site.labels[p][s] for p, s in picks]).long()
    return images, labels


def _draw(rng: np.random.Generator, pool: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    # Without replacement when the pool allows it; a tiny site still yields full-sized episodes.
    index = rng.choice(len(pool), size=n, replace=len(pool) < n)
    return [pool[i] for i in index]


def sample_episodes(site: SiteDataset, n_episodes: int, k: int, q: int, seed: int) -> list[Episode]:
    """Seeded episodes ``(support_x [k,1,H,W], support_y [k,H,W], query_x [q,1,H,W], query_y [q,H,W])``.

    In every episode the patients are split at random into two disjoint groups (half each, at least
    one), support slices are drawn from the first and query slices from the second, so the meta-objective
    measures generalisation to another patient of the site, as adaptation to a new hospital will.
    """
    _check_counts(site, n_episodes=n_episodes, k=k, q=q)
    rng = np.random.default_rng(seed)
    episodes = []
    for _ in range(n_episodes):
        order = rng.permutation(site.num_patients)
        cut = max(1, site.num_patients // 2)
        support_pool = [(int(p), int(s)) for p in order[:cut] for s in site.train_slices[p]]
        query_pool = [(int(p), int(s)) for p in order[cut:] for s in site.train_slices[p]]
        support = _gather(site, _draw(rng, support_pool, k))
        query = _gather(site, _draw(rng, query_pool, q))
        episodes.append((support[0], support[1], query[0], query[1]))
    return episodes


def adaptation_patients(site: SiteDataset, seed: int) -> tuple[list[int], list[int]]:
    """The seeded split of a site's patients into a support pool (a quarter, at least one) and evaluation."""
    if site.num_patients < 2:
        raise ValueError(episode_problems(site.root, site.num_patients, None, None)[0])
    order = [int(p) for p in np.random.default_rng(seed).permutation(site.num_patients)]
    cut = max(1, min(site.num_patients - 1, round(site.num_patients / 4)))
    return order[:cut], order[cut:]


def adaptation_support(site: SiteDataset, k: int, seed: int) -> tuple[Tensor, Tensor]:
    """The k labelled slices a new site adapts with, from its support patients.

    Returns ``(support_x [k,1,H,W], support_y [k,H,W])``. For one seed the support sets are nested
    over k (the 1-shot slice is in the 5-shot set, ...) and never touch an evaluation patient, so an
    adaptation curve over k compares like with like.
    """
    _check_counts(site, k=k)
    support_patients, _ = adaptation_patients(site, seed)
    rng = np.random.default_rng([seed, 1])
    # Round-robin over the pool's patients, each in a seeded order: k slices span as many patients as they can.
    queues = [[(p, int(s)) for s in rng.permutation(site.foreground_indices(p))] for p in support_patients]
    ordered = [queue[i] for i in range(max(map(len, queues), default=0)) for queue in queues if i < len(queue)]
    if len(ordered) < k:
        raise ValueError(
            f"site {site.name} has only {len(ordered)} labelled slices in its support pool of {len(support_patients)} "
            f"patient(s), fewer than k={k}. Fix: use a smaller k or add patients to the site."
        )
    return _gather(site, ordered[:k])


def evaluation_patients(site: SiteDataset, seed: int, max_slices: int = 0) -> list[int]:
    """The patients a new site is scored on (whole volumes): its non-support patients, in index order.

    ``max_slices`` > 0 bounds the cost: whole patients are taken in a seeded order until they hold at
    least that many slices (so 256 slices of 70-slice volumes is 4 patients). A patient is never cut:
    Dice is per volume.
    """
    _, patients = adaptation_patients(site, seed)
    if max_slices <= 0:
        return sorted(patients)
    order = [patients[i] for i in np.random.default_rng([seed, 2]).permutation(len(patients))]
    chosen, total = [], 0
    for p in order:
        if total >= max_slices:
            break
        chosen.append(p)
        total += len(site.images[p])
    return sorted(chosen)


def site_seed(round_seed: int, site_name: str) -> int:
    """Each site's own episode seed for a round: different sites, different draws; stable across runs."""
    return (int(round_seed) * 1_000_003 + zlib.crc32(site_name.encode())) % (2**31 - 1)
