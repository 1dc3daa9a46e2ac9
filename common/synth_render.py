"""One subject at one site: the template anatomy warped into a subject, imaged by the site's scanner, labelled
by its raters, and stored as its converter stores NIfTI.

The anatomy is the ICBM 2009a nonlinear symmetric template's tissue-probability maps (Fonov et al.,
NeuroImage 54, 2011; see ``common/assets/ICBM152_NOTICE.txt``). Parameters come from
:mod:`fedmeta.common.synth_plan`.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmeta.common.synth_plan import LABEL_PROTOCOLS, PROTOCOL_LABELS
from fedmeta.common.workers import end_with_parent

ASSET_PATH = Path(__file__).resolve().parent / "assets" / "icbm152_2009a_tissue_1p5mm.npz"
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


def _asset_digest() -> str:
    return hashlib.sha256(ASSET_PATH.read_bytes()).hexdigest()[:16]

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
    lo[2] = max(lo[2], float(scanner["fov_inferior_mm"]))
    hi = FOV_HI_MM.copy()
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
    """Tissue probabilities of one subject on the site's acquisition grid.

    Returns (float32 [3, X, Y, Z] RAS probabilities of CSF, GM, WM averaged over each slice's
    profile, and the 4x4 RAS affine of the grid).
    """
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
    atrophy = float(subject["atrophy"])
    total = torch.zeros((3, *shape), dtype=torch.float32)
    for offset in offsets:
        point = points.clone()
        point[..., slice_axis] += float(offset * thickness)
        template = (point - shifted_centre) @ inverse_t + centre
        if atrophy > 0:
            # Enlarged ventricles: pull the sampling points towards the ventricles so they fill more space.
            rel = template - ventricles
            falloff = torch.exp(-(rel**2).sum(dim=-1, keepdim=True) / (2 * 22.0**2))
            template = template - (0.6 * atrophy) * falloff * rel
        total += _sample_trilinear(anatomy_t, template @ to_voxel_t + to_voxel_shift)
    total = total.numpy()
    total /= n_sub
    if atrophy > 0:
        # Cortical thinning: part of the grey-matter fraction becomes CSF, unevenly over the cortex.
        thinning = atrophy * np.clip(0.6 + 0.4 * _smooth_field(rng, (4, 5, 4), tuple(shape)), 0, 1.5)
        moved = total[1] * thinning.astype(np.float32)
        total[1] -= moved
        total[0] += moved
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = lo
    return np.clip(total, 0.0, 1.0), affine


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


def render_image(tissue: np.ndarray, site_params: dict[str, Any], subject: dict[str, Any]) -> np.ndarray:
    """The site's MR image of a subject: int16 [X, Y, Z], 12-bit, RAS."""
    scanner = site_params["scanner"]
    rng = np.random.default_rng(subject["noise_seed"])
    s = scanner["tissue_signal"]
    mu = np.array([s["csf"], s["grey_matter"], s["white_matter"]], dtype=np.float32)
    signal = np.einsum("c,c...->...", mu, tissue)
    # Smooth multiplicative B1 bias, exp(strength * field) with the field scaled to [-1, 1].
    field = _smooth_field(rng, (3, 3, 3), signal.shape)
    field /= max(float(np.abs(field).max()), 1e-6)
    signal = signal * np.exp(float(scanner["bias_strength"]) * field).astype(np.float32)
    complex_signal = _kspace_artefacts(signal, scanner, rng)
    brain = tissue.sum(axis=0) > 0.5
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

    ``spacing_mm`` (the grid's voxel size) is needed by the ventricles protocol only.
    """
    # scipy.ndimage: +0.15 s on importing fedmeta.common.synth (python -X importtime); only rendering needs it, and
    # `fedmeta synth` of a lazy preset renders nothing.
    from scipy import ndimage

    style = site_params["annotation"]
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
    protocol = style["protocol"]
    if protocol not in PROTOCOL_LABELS:
        raise ValueError(f"label protocol {protocol!r} is not known; use one of {LABEL_PROTOCOLS}.")
    if protocol == "ventricles":
        return _ventricles(labels, brain, spacing_mm)
    for value in (1, 2, 3):
        if value not in PROTOCOL_LABELS[protocol]:
            labels[labels == value] = 0
    return labels


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


def _generate_subject(job: tuple[Path, dict[str, Any], dict[str, Any], float]) -> str:
    site_dir, site_params, subject, fov_scale = job
    tissue, affine = subject_tissue(site_params, subject, fov_scale)
    image = render_image(tissue, site_params, subject)
    labels = annotate(tissue, site_params, subject, spacing_mm=np.linalg.norm(affine[:3, :3], axis=0))
    axcodes = site_params["scanner"]["storage_orientation"]
    stored_image, stored_affine = _to_storage(image, affine, axcodes)
    stored_labels, _ = _to_storage(labels, affine, axcodes)
    _write_nifti(stored_image, stored_affine, site_dir / "imagesTr" / f"{subject['id']}.nii.gz")
    _write_nifti(stored_labels, stored_affine, site_dir / "labelsTr" / f"{subject['id']}.nii.gz")
    return subject["id"]
