"""One subject at one site: the template anatomy warped into a subject, imaged by the site's scanner, labelled
by its raters, and stored as its converter stores NIfTI.

The anatomy is the ICBM 2009a nonlinear symmetric template's tissue-probability maps (Fonov et al.,
NeuroImage 54, 2011; see ``common/assets/ICBM152_NOTICE.txt``). Parameters come from
:mod:`fedmeta.common.synth_plan`.

Two generations (a preset's ``generation``):

- ``tissue``: a voxel's signal is sum(tissue fraction x one signal per tissue and sequence), so a label is,
  up to noise, bias and partial volume, a function of intensity.
- ``texture``: the template's own T1 intensities (myelination gradients, deep nuclei between grey and white
  matter) times a smooth per-subject texture field, through the site's nonlinear contrast curve (PCHIP
  through the template's CSF/GM/WM T1 levels mapped to the sequence's signals, with a site-specific warp
  between them), with an iron term on the deep grey nuclei; labels follow anatomy and the site's
  delineation protocol (cortex with or without the deep nuclei, all CSF or the ventricles only), never
  the rendered intensity.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmeta.common.synth_plan import (
    DELINEATION_PROTOCOLS, HEAD_CLOSING_MM, HEAD_LAYERS, HEAD_MARGIN_MM, LABEL_PROTOCOLS, PROTOCOL_LABELS,
)
from fedmeta.common.workers import end_with_parent

ASSET_PATH = Path(__file__).resolve().parent / "assets" / "icbm152_2009a_tissue_1p5mm.npz"
TEXTURE_ASSET_PATH = ASSET_PATH.parent / "icbm152_2009a_t1_1p5mm.npz"  # the texture generation: T1 and deep grey
# Where the subject's world lies: the template's brain extent in mm (RAS), with a little room.
BRAIN_CENTRE_MM = np.array([0.0, -18.0, 8.0])
VENTRICLE_CENTRE_MM = np.array([0.0, -14.0, 14.0])
FOV_LO_MM = np.array([-78.0, -113.0, -76.0])
FOV_HI_MM = np.array([78.0, 80.0, 88.0])
SLICE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


@lru_cache(maxsize=1)
def load_anatomy() -> tuple[np.ndarray, np.ndarray]:
    """The shipped tissue probabilities: float32 [3 (CSF, GM, WM), X, Y, Z] in RAS, and their affine."""
    if not ASSET_PATH.is_file():
        raise FileNotFoundError(
            f"the anatomy asset {ASSET_PATH} is missing from this installation; reinstall fedmeta, or "
            "re-derive it with `pip install 'fedmeta[anatomy]' && python -m fedmeta.simulations.synthetic.derive_anatomy`."
        )
    with np.load(ASSET_PATH, allow_pickle=False) as asset:
        probabilities = asset["probabilities"].astype(np.float32) / 255.0
        affine = asset["affine"].astype(np.float64)
    # uint8 rounding can push the sum a hair above one; renormalise where it does.
    total = probabilities.sum(axis=0, keepdims=True)
    probabilities /= np.maximum(total, 1.0)
    return probabilities, affine


@lru_cache(maxsize=1)
def load_texture() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The shipped T1 texture, on the tissue asset's grid: (T1 float32 [X, Y, Z] in [0, 1], deep grey
    nuclei float32 [X, Y, Z] (share of each voxel), infratentorial membership float32 [X, Y, Z] (cerebellum
    and brainstem), the template's T1 levels of CSF, GM, WM float64 [3])."""
    if not TEXTURE_ASSET_PATH.is_file():
        raise FileNotFoundError(
            f"the T1 texture asset {TEXTURE_ASSET_PATH} is missing from this installation; reinstall fedmeta, or "
            "re-derive it with `pip install 'fedmeta[anatomy]' && python -m fedmeta.simulations.synthetic.derive_anatomy "
            "--asset texture`.")
    with np.load(TEXTURE_ASSET_PATH, allow_pickle=False) as asset:
        t1 = asset["t1"].astype(np.float32) / 65535.0
        deep = asset["deep_grey"].astype(np.float32) / 255.0
        infratentorial = asset["infratentorial"].astype(np.float32) / 255.0
        levels = asset["t1_levels"].astype(np.float64)
        affine = asset["affine"].astype(np.float64)
    if not np.allclose(affine, load_anatomy()[1]):
        raise ValueError(f"{TEXTURE_ASSET_PATH} is not on the grid of {ASSET_PATH}; re-derive both with derive_anatomy.")
    return t1, deep, infratentorial, levels


def _asset_digest(generation: str = "tissue") -> str:
    """The anatomy a generation renders from, in 16 hex digits (the tissue asset's digest for ``tissue``)."""
    tissue = hashlib.sha256(ASSET_PATH.read_bytes()).hexdigest()[:16]
    if generation == "tissue":
        return tissue
    texture = hashlib.sha256(TEXTURE_ASSET_PATH.read_bytes()).hexdigest()[:16]
    return hashlib.sha256(f"{tissue}+{texture}".encode()).hexdigest()[:16]

def _rotation(degrees: list[float]) -> np.ndarray:
    rx, ry, rz = np.deg2rad(degrees)
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return z @ y @ x


def _site_grid(scanner: dict[str, Any], fov_scale: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Voxel spacing [3], FOV origin [3] (RAS, mm) and shape of a site's acquisition grid."""
    spacing = np.full(3, float(scanner["inplane_mm"]))
    spacing[SLICE_AXES[scanner["slice_axis"]]] = float(scanner["slice_thickness_mm"])
    lo = FOV_LO_MM.copy()
    hi = FOV_HI_MM.copy()
    if scanner.get("head"):  # room for the head on every side but below, where the site's coverage stops
        lo[:2] -= HEAD_MARGIN_MM
        hi += HEAD_MARGIN_MM
    lo[2] = max(lo[2], float(scanner["fov_inferior_mm"]))
    if fov_scale != 1.0:
        lo = BRAIN_CENTRE_MM + fov_scale * (lo - BRAIN_CENTRE_MM)
        hi = BRAIN_CENTRE_MM + fov_scale * (hi - BRAIN_CENTRE_MM)
    shape = np.maximum(np.floor((hi - lo) / spacing).astype(int) + 1, 2)
    return spacing, lo, shape


def _smooth_field(rng: np.random.Generator, control: tuple[int, int, int], shape) -> np.ndarray:
    """A smooth random field on ``shape``: Gaussian noise on a coarse control grid, spread by Gaussian
    radial basis functions one axis at a time (far cheaper than spline-zooming the whole volume)."""
    field = rng.standard_normal(control)
    for axis, (n, c) in enumerate(zip(shape, control)):
        x = np.linspace(0.0, 1.0, int(n))[:, None]
        centres = np.linspace(0.0, 1.0, c)[None, :]
        basis = np.exp(-((x - centres) ** 2) / (2 * (1.0 / max(c - 1, 1)) ** 2))
        basis /= basis.sum(axis=1, keepdims=True)
        field = np.moveaxis(np.tensordot(basis, np.moveaxis(field, axis, 0), axes=(1, 0)), 0, axis)
    return field.astype(np.float32)


def _sample_trilinear(volume, voxel):
    """Sample ``volume`` (tensor [C, X, Y, Z]) at voxel coordinates (tensor [X', Y', Z', 3], x-y-z order).

    Trilinear, zero outside; returns [C, X', Y', Z']. torch's grid_sample does all channels in one
    pass, several times faster than scipy's map_coordinates per channel, which dominated generation.
    """
    sizes = torch.tensor(volume.shape[1:], dtype=voxel.dtype)
    # grid_sample's last grid axis is ordered (W, H, D), the reverse of the volume's axes.
    grid = (voxel / (sizes - 1) * 2 - 1).flip(-1)[None]
    sampled = torch.nn.functional.grid_sample(
        volume[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    return sampled[0]


def subject_tissue(site_params: dict[str, Any], subject: dict[str, Any], fov_scale: float = 1.0):
    """Tissue probabilities of one subject on the site's acquisition grid (the ``tissue`` generation).

    Returns (float32 [3, X, Y, Z] RAS probabilities of CSF, GM, WM averaged over each slice's
    profile, and the 4x4 RAS affine of the grid).
    """
    tissue, _, affine = _warp_subject(site_params, subject, fov_scale, texture=False)
    return tissue, affine


def subject_anatomy(site_params: dict[str, Any], subject: dict[str, Any], fov_scale: float = 1.0):
    """One subject of the ``texture`` generation on the site's acquisition grid, before the scanner's acquisition.

    Returns (float32 [5, X, Y, Z]: CSF, GM, WM probabilities, the deep grey nuclei's share of the voxel
    (part of GM + WM) and the infratentorial membership (cerebellum, brainstem), each averaged over the
    slice profile; float32 [X, Y, Z]: the site's signal of the
    subject's T1 texture through its contrast curve, averaged over the slice profile (partial volume of
    signals, not of tissues); the 4x4 RAS affine of the grid).
    """
    return _warp_subject(site_params, subject, fov_scale, texture=True)


def contrast_curve(scanner: dict[str, Any], t1_levels: np.ndarray):
    """The site's nonlinear map from template T1 (in [0, 1]) to relative signal: a PCHIP curve (monotone
    between its anchors, so no overshoot) through 0 -> 0, the template's CSF/GM/WM T1 levels -> the site's
    tissue signals, the midpoints between them moved by the site's ``contrast_warp`` (a share of half the
    step), and 1 -> white matter continued at half the GM-to-WM slope."""
    from scipy.interpolate import PchipInterpolator  # lazy: see annotate

    s = scanner["tissue_signal"]
    signal = [float(s["csf"]), float(s["grey_matter"]), float(s["white_matter"])]
    t_csf, t_gm, t_wm = (float(v) for v in t1_levels)
    warp = [float(w) for w in scanner["contrast_warp"]]
    mids = [(a + b) / 2 + w * abs(b - a) / 2 for a, b, w in zip(signal[:-1], signal[1:], warp)]
    top = signal[2] + 0.5 * (signal[2] - signal[1]) / (t_wm - t_gm) * (1.0 - t_wm)
    x = [0.0, t_csf, (t_csf + t_gm) / 2, t_gm, (t_gm + t_wm) / 2, t_wm, 1.0]
    y = [0.0, signal[0], mids[0], signal[1], mids[1], signal[2], max(top, 0.0)]
    return PchipInterpolator(np.asarray(x), np.asarray(y), extrapolate=True)


def _warp_subject(site_params: dict[str, Any], subject: dict[str, Any], fov_scale: float, *, texture: bool):
    """The subject's anatomy sampled on the site's grid: (tissue [3 or 4, X, Y, Z], signal [X, Y, Z] or None, affine)."""
    anatomy, anatomy_affine = load_anatomy()
    scanner = site_params["scanner"]
    spacing, lo, shape = _site_grid(scanner, fov_scale)
    slice_axis = SLICE_AXES[scanner["slice_axis"]]
    thickness = float(scanner["slice_thickness_mm"])
    # Thick slices integrate the anatomy over their profile: sample sub-slices every ~1.5 mm, average.
    n_sub = max(1, int(round(thickness / 1.5)))
    offsets = (np.arange(n_sub) + 0.5) / n_sub - 0.5

    rng = np.random.default_rng(subject["elastic_seed"])
    elastic = np.stack([_smooth_field(rng, (5, 6, 5), tuple(shape)) for _ in range(3)], axis=-1)
    elastic *= float(subject["elastic_amplitude_mm"]) / max(float(np.abs(elastic).max()), 1e-6)

    axes = [lo[a] + spacing[a] * np.arange(shape[a]) for a in range(3)]
    world = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).astype(np.float32)  # [X, Y, Z, 3] mm
    points = torch.from_numpy(world + elastic)
    # Subject = R S (template - c) + c + t; sample the template at the inverse image of each point.
    forward = _rotation(subject["rotation_deg"]) @ np.diag(subject["scale"])
    inverse_t = torch.from_numpy(np.linalg.inv(forward).T.astype(np.float32))
    to_voxel = np.linalg.inv(anatomy_affine)
    to_voxel_t = torch.from_numpy(to_voxel[:3, :3].T.astype(np.float32))
    to_voxel_shift = torch.from_numpy(to_voxel[:3, 3].astype(np.float32))
    centre = torch.from_numpy(BRAIN_CENTRE_MM.astype(np.float32))
    shifted_centre = centre + torch.tensor(subject["translation_mm"], dtype=torch.float32)
    ventricles = torch.from_numpy(VENTRICLE_CENTRE_MM.astype(np.float32))
    anatomy_t = torch.from_numpy(anatomy)
    curve = texture_field = None
    if texture:
        t1, deep, infratentorial, t1_levels = load_texture()
        # Channels: CSF, GM, WM, deep grey share, infratentorial, T1. One grid_sample for all six.
        anatomy_t = torch.cat([anatomy_t, torch.from_numpy(deep)[None], torch.from_numpy(infratentorial)[None],
                               torch.from_numpy(t1)[None]])
        curve = contrast_curve(scanner, t1_levels)
        # Within-tissue variation of this subject: a smooth multiplicative field on its T1 (regional
        # myelination and iron beyond the template's average), at a coarse and a finer scale.
        texture_rng = np.random.default_rng(subject["texture_seed"])
        coarse = _smooth_field(texture_rng, (6, 7, 6), tuple(shape))
        fine = _smooth_field(texture_rng, (14, 17, 14), tuple(shape))
        field = coarse / max(float(np.abs(coarse).max()), 1e-6) + 0.5 * fine / max(float(np.abs(fine).max()), 1e-6)
        texture_field = 1.0 + float(site_params["scanner"]["texture_amplitude"]) * field / 1.5
    atrophy = float(subject["atrophy"])
    total = torch.zeros((anatomy_t.shape[0] - (1 if texture else 0), *shape), dtype=torch.float32)
    signal = np.zeros(tuple(shape), dtype=np.float32) if texture else None
    for offset in offsets:
        point = points.clone()
        point[..., slice_axis] += float(offset * thickness)
        template = (point - shifted_centre) @ inverse_t + centre
        if atrophy > 0:
            # Enlarged ventricles: pull the sampling points towards the ventricles so they fill more space.
            rel = template - ventricles
            falloff = torch.exp(-(rel**2).sum(dim=-1, keepdim=True) / (2 * 22.0**2))
            template = template - (0.6 * atrophy) * falloff * rel
        sampled = _sample_trilinear(anatomy_t, template @ to_voxel_t + to_voxel_shift)
        if texture:
            # The contrast curve acts on each sub-slice's T1, then the slice averages signals (partial volume).
            signal += curve(np.clip(sampled[-1].numpy() * texture_field, 0.0, 1.0)).astype(np.float32)
            sampled = sampled[:-1]
        total += sampled
    total = total.numpy()
    total /= n_sub
    if texture:
        signal /= n_sub
    if atrophy > 0:
        # Cortical thinning: part of the grey-matter fraction becomes CSF, unevenly over the cortex.
        thinning = atrophy * np.clip(0.6 + 0.4 * _smooth_field(rng, (4, 5, 4), tuple(shape)), 0, 1.5)
        moved = total[1] * thinning.astype(np.float32)
        total[1] -= moved
        total[0] += moved
        if texture:
            s = scanner["tissue_signal"]
            signal += moved * np.float32(float(s["csf"]) - float(s["grey_matter"]))
            # The deep nuclei keep their volume: thinning is cortical (their share is of GM + WM).
            total[3] = np.minimum(total[3], total[1] + total[2])
    if texture:
        # Iron in the deep grey nuclei darkens them on T2-weighted sequences (site- and sequence-specific).
        signal *= 1.0 + float(scanner["deep_grey_signal"]) * np.clip(total[3], 0.0, 1.0)
        if scanner.get("head"):
            signal += head_signal(total[:3].sum(axis=0), scanner["head"], subject["head"], spacing)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = lo
    return np.clip(total, 0.0, 1.0), (np.clip(signal, 0.0, None) if texture else None), affine


def head_signal(brain: np.ndarray, signals: dict[str, float], head: dict[str, Any],
                spacing: np.ndarray) -> np.ndarray:
    """The head around a brain on the site's grid (the ``head`` preset), float32 like ``brain``.

    ``brain`` is the share of each voxel that is brain (CSF + GM + WM). The skull follows the brain's
    closed outline (the brain's mask closed by a HEAD_CLOSING_MM ball), not every fold of it: the pockets
    the closing fills, under the temporal lobes and around the brainstem, are the skull base, bone. A voxel
    outside the outline lies at some depth from it (mm, on the grid's own spacing); that depth, over a
    smooth field that thickens and thins the whole head by up to a third, falls in one of HEAD_LAYERS'
    layers (the subject's thicknesses, ``head["layers_mm"]``) or beyond them, in air. Each voxel takes its
    layer's signal (``signals``, the site's) times the share of the voxel the brain leaves. Labels never
    see it: no protocol labels the head.
    """
    from scipy import ndimage  # lazy: see annotate

    sampling = [float(s) for s in spacing]
    # Closing by distances (dilate by R, then erode by R): two distance transforms, no 3D structuring element.
    dilated = ndimage.distance_transform_edt(brain < 0.5, sampling=sampling) <= HEAD_CLOSING_MM
    outline = ndimage.distance_transform_edt(dilated, sampling=sampling) > HEAD_CLOSING_MM
    depth = ndimage.distance_transform_edt(~outline, sampling=sampling).astype(np.float32)
    field = _smooth_field(np.random.default_rng(int(head["thickness_seed"])), (4, 5, 4), brain.shape)
    thickness = 1.0 + field / (3.0 * max(float(np.abs(field).max()), 1e-6))
    edges = np.cumsum([float(t) for t in head["layers_mm"]])
    layer = np.searchsorted(edges, depth / thickness, side="right")  # 0 inside the outline; len(edges): air
    values = np.array([float(signals[tissue]) for tissue, _ in HEAD_LAYERS] + [0.0], dtype=np.float32)
    return values[layer] * (1.0 - np.clip(brain, 0.0, 1.0)).astype(np.float32)


def _kspace_artefacts(signal: np.ndarray, scanner: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Gibbs ringing (truncated k-space) or motion ghosts (phase errors on alternate k-space lines)."""
    artefact = scanner["artefact"]
    if artefact == "none":
        return signal.astype(np.complex64)
    slice_axis = SLICE_AXES[scanner["slice_axis"]]
    phase_axis = [a for a in range(3) if a != slice_axis][int(rng.integers(0, 2))]
    kspace = np.fft.fftshift(np.fft.fft(signal, axis=phase_axis), axes=phase_axis)
    n = signal.shape[phase_axis]
    index = [None, None, None]
    index[phase_axis] = slice(None)
    if artefact == "gibbs":
        keep = max(4, int(round(n * float(scanner["gibbs_kspace_fraction"]))))
        window = np.zeros(n, dtype=np.float32)
        start = (n - keep) // 2
        window[start : start + keep] = 1.0
        kspace *= window[tuple(index)]
    elif artefact == "motion":
        # A phase error phi on every other line puts a ghost at half the FOV with amplitude |sin(phi / 2)|.
        phi = 2.0 * np.arcsin(float(scanner["ghost_amplitude"]))
        phase = np.where(np.arange(n) % 2 == 0, 0.0, phi)
        kspace *= np.exp(1j * phase)[tuple(index)]
    else:
        raise ValueError(f"artefact={artefact!r} is not known; use 'none', 'gibbs' or 'motion'.")
    return np.fft.ifft(np.fft.ifftshift(kspace, axes=phase_axis), axis=phase_axis).astype(np.complex64)


def render_image(tissue: np.ndarray, site_params: dict[str, Any], subject: dict[str, Any],
                 signal: np.ndarray | None = None) -> np.ndarray:
    """The site's MR image of a subject: int16 [X, Y, Z], 12-bit, RAS.

    ``signal`` (float32 [X, Y, Z], the ``texture`` generation's, :func:`subject_anatomy`) is the subject's
    relative signal before acquisition; without it (the ``tissue`` generation) each voxel's signal is its
    tissue fractions times the site's one signal per tissue.
    """
    scanner = site_params["scanner"]
    rng = np.random.default_rng(subject["noise_seed"])
    if signal is None:
        s = scanner["tissue_signal"]
        mu = np.array([s["csf"], s["grey_matter"], s["white_matter"]], dtype=np.float32)
        signal = np.einsum("c,c...->...", mu, tissue[:3])
    # Smooth multiplicative B1 bias, exp(strength * field) with the field scaled to [-1, 1].
    field = _smooth_field(rng, (3, 3, 3), signal.shape)
    field /= max(float(np.abs(field).max()), 1e-6)
    signal = signal * np.exp(float(scanner["bias_strength"]) * field).astype(np.float32)
    complex_signal = _kspace_artefacts(signal, scanner, rng)
    brain = tissue[:3].sum(axis=0) > 0.5
    sigma = float(signal[brain].mean()) / float(scanner["snr"]) if brain.any() else 0.01
    noisy = np.abs(
        complex_signal
        + rng.normal(0.0, sigma, signal.shape).astype(np.float32)
        + 1j * rng.normal(0.0, sigma, signal.shape).astype(np.float32)
    )  # Rician magnitude
    reference = float(np.percentile(noisy[brain], 99.0)) if brain.any() else 1.0
    levels = 2 ** int(scanner["bits"]) - 1
    scaled = float(scanner["gain"]) * np.power(np.clip(noisy / reference, 0.0, None), float(scanner["gamma"]))
    return np.clip(np.round(scaled * 0.75 * levels), 0, levels).astype(np.int16)


def annotate(tissue: np.ndarray, site_params: dict[str, Any], subject: dict[str, Any],
             spacing_mm: np.ndarray | None = None) -> np.ndarray:
    """The site's manual labels of a subject: uint8 [X, Y, Z], values in its protocol's PROTOCOL_LABELS.

    ``tissue`` is [3, X, Y, Z] (CSF, GM, WM: the ``tissue`` generation) or [5, X, Y, Z] with the deep grey
    nuclei's share and the infratentorial membership (the ``texture`` generation, whose protocols say where
    the nuclei go, and whose ``extent`` says whether the cerebellum and brainstem are labelled). Labels come from
    the anatomy and the protocol alone, never from the rendered image. ``spacing_mm`` (the grid's voxel
    size) is needed by the protocols that label the ventricles only.
    """
    # scipy.ndimage: +0.15 s on importing fedmeta.common.synth (python -X importtime); only rendering needs it, and
    # `fedmeta synth` of a lazy preset renders nothing.
    from scipy import ndimage

    style = site_params["annotation"]
    protocol = style["protocol"]
    if protocol not in PROTOCOL_LABELS:
        raise ValueError(f"label protocol {protocol!r} is not known; use one of {LABEL_PROTOCOLS}.")
    outside = None
    if protocol in DELINEATION_PROTOCOLS:
        if style.get("extent", "whole-brain") == "cerebrum":  # cerebellum and brainstem left unlabelled
            outside = tissue[4] > 0.5 if tissue.shape[0] > 4 else None
            if outside is None:
                raise ValueError("a cerebrum-only delineation needs the infratentorial membership: tissue [5, X, Y, Z].")
        tissue = _protocol_scores(tissue, DELINEATION_PROTOCOLS[protocol])
    elif tissue.shape[0] != 3:
        raise ValueError(f"label protocol {protocol!r} is one of the tissue generation's: it labels CSF, GM and WM "
                         f"probabilities [3, X, Y, Z], not {tissue.shape[0]} channels.")
    brain = tissue.sum(axis=0) > float(style["threshold"])
    order = np.argsort(-tissue, axis=0)
    first = order[0].astype(np.uint8) + 1
    second = order[1].astype(np.uint8) + 1
    labels = np.where(brain, first, 0).astype(np.uint8)
    bias = int(style["gm_bias_voxels"])
    if bias > 0:  # this rater draws the cortex a voxel thick into CSF and white matter
        grown = ndimage.binary_dilation(labels == 2, iterations=bias) & (labels > 0)
        labels[grown] = 2
    elif bias < 0:  # ... or a voxel thin; the peeled voxels take their second most likely tissue
        gm = labels == 2
        peeled = gm & ~ndimage.binary_erosion(gm, iterations=-bias)
        labels[peeled] = np.where(second[peeled] == 2, first[peeled], second[peeled])
    rate = float(style["label_noise"])
    if rate > 0:
        rng = np.random.default_rng(subject["noise_seed"] + 1)
        for axis in range(3):
            neighbour = np.roll(labels, 1 if rng.random() < 0.5 else -1, axis=axis)
            boundary = (neighbour != labels) & (rng.random(labels.shape) < rate / 3)
            labels[boundary] = neighbour[boundary]
    if protocol == "ventricles":
        return _ventricles(labels, brain, spacing_mm)
    if protocol in DELINEATION_PROTOCOLS and DELINEATION_PROTOCOLS[protocol]["csf"] == "ventricles":
        labels[(labels == 1) & (_ventricles(labels, brain, spacing_mm) == 0)] = 0  # sulcal and cisternal CSF
    if outside is not None:
        labels[outside] = 0
    if protocol in DELINEATION_PROTOCOLS:
        return labels
    for value in (1, 2, 3):
        if value not in PROTOCOL_LABELS[protocol]:
            labels[labels == value] = 0
    return labels


def _protocol_scores(tissue: np.ndarray, protocol: dict[str, str]) -> np.ndarray:
    """A delineation protocol's share of each label (CSF, GM, WM: float32 [3, X, Y, Z]) in a voxel of
    ``tissue`` (CSF, GM, WM, deep grey share[, ...] [4+, X, Y, Z]): the deep nuclei go to grey matter
    (``grey: cortex+deep``) or to white matter, the label of non-cortical cerebral tissue (``cortex``)."""
    if tissue.shape[0] < 4:
        raise ValueError(f"a delineation protocol needs the deep grey nuclei: tissue [5, X, Y, Z], not {tissue.shape[0]} channels.")
    csf, gm, wm, deep = tissue[:4]
    parenchyma = gm + wm
    share = np.clip(deep / np.maximum(parenchyma, 1e-6), 0.0, 1.0)  # of this voxel's GM + WM, in the nuclei
    cortex, white, nuclei = gm * (1.0 - share), wm * (1.0 - share), parenchyma * share
    if protocol["grey"] == "cortex+deep":
        return np.stack([csf, cortex + nuclei, white]).astype(np.float32)
    return np.stack([csf, cortex, white + nuclei]).astype(np.float32)


def _ventricles(labels: np.ndarray, brain: np.ndarray, spacing_mm: np.ndarray | None) -> np.ndarray:
    """Ventricular CSF: CSF enclosed by parenchyma in its axial plane and over 12 mm inside the brain
    (sulcal CSF opens to the surface or lies near it), as label 1; everything else 0."""
    from scipy import ndimage  # lazy: see annotate

    if spacing_mm is None:
        raise ValueError("the ventricles protocol needs the grid's voxel spacing (spacing_mm).")
    parenchyma = (labels == 2) | (labels == 3)
    enclosed = np.zeros_like(parenchyma)
    for z in range(labels.shape[2]):  # the grid is RAS: axis 2 is axial whatever the acquisition plane
        enclosed[:, :, z] = ndimage.binary_fill_holes(parenchyma[:, :, z])
    deep = ndimage.distance_transform_edt(brain, sampling=[float(v) for v in spacing_mm]) > 12.0
    return np.where((labels == 1) & enclosed & deep, 1, 0).astype(np.uint8)


def _to_storage(array: np.ndarray, affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """Reorder an RAS array the way the site's converter stores it, keeping world positions."""
    # nibabel: +0.14 s on importing fedmeta.common.synth (python -X importtime); only rendering needs it, and
    # `fedmeta synth` of a lazy preset renders nothing.
    import nibabel as nib
    from nibabel import orientations as ornt  # lazy: see above

    transform = ornt.ornt_transform(ornt.axcodes2ornt("RAS"), ornt.axcodes2ornt(tuple(axcodes)))
    stored = ornt.apply_orientation(array, transform)
    new_affine = affine @ ornt.inv_ornt_aff(transform, array.shape)
    assert nib.aff2axcodes(new_affine) == tuple(axcodes)
    return np.ascontiguousarray(stored), new_affine


def _write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib  # lazy: see _to_storage

    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)  # scanner coordinates
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))


def _worker_init() -> None:
    end_with_parent()  # a synth killed with SIGKILL takes its rendering workers with it
    torch.set_num_threads(1)  # one process per core already; more threads only contend


def render_subject(site_params: dict[str, Any], subject: dict[str, Any], fov_scale: float = 1.0):
    """One subject as its site images and labels it, in RAS: (image int16 [X, Y, Z], labels uint8 [X, Y, Z],
    affine 4x4), by the site's generation (its ``generation`` parameter; ``tissue`` where it has none)."""
    if site_params.get("generation", "tissue") == "texture":
        tissue, signal, affine = subject_anatomy(site_params, subject, fov_scale)
    else:
        (tissue, affine), signal = subject_tissue(site_params, subject, fov_scale), None
    image = render_image(tissue, site_params, subject, signal)
    labels = annotate(tissue, site_params, subject, spacing_mm=np.linalg.norm(affine[:3, :3], axis=0))
    return image, labels, affine


def _generate_subject(job: tuple[Path, dict[str, Any], dict[str, Any], float]) -> str:
    site_dir, site_params, subject, fov_scale = job
    image, labels, affine = render_subject(site_params, subject, fov_scale)
    axcodes = site_params["scanner"]["storage_orientation"]
    stored_image, stored_affine = _to_storage(image, affine, axcodes)
    stored_labels, _ = _to_storage(labels, affine, axcodes)
    _write_nifti(stored_image, stored_affine, site_dir / "imagesTr" / f"{subject['id']}.nii.gz")
    _write_nifti(stored_labels, stored_affine, site_dir / "labelsTr" / f"{subject['id']}.nii.gz")
    return subject["id"]
