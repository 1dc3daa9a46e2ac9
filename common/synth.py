"""A synthetic hospital federation on real brain anatomy (ICBM152 2009a), in the MSD layout.

Every subject is the template's tissue-probability maps (CSF, grey matter, white matter) under a random
affine, a smooth elastic warp and optional atrophy; every site turns them into an MR image with its own
scanner (field strength, sequence, resolution, slice thickness and direction, bias field, Rician noise,
gain/gamma/12-bit clipping, Gibbs ringing or motion ghosts) and into labels with its own annotation
style (threshold, one-voxel erosion/dilation of grey matter, boundary label noise, label protocol).
Recipe: FIELD.md §3. Every parameter of every site and subject is written to ``manifest.json``.

Scaled for CPU: in-plane resolution is 1.2-2.0 mm (the recipe's 0.9-1.5 mm would make each volume
several times larger while the model reads 2 mm slices anyway); slice thickness keeps its 1.5-5 mm.

Layout written by :func:`generate_federation`::

    root/manifest.json
    root/<site>/dataset.json            MSD: modality, labels, training file list (+ "fedmeta" block)
    root/<site>/imagesTr/<site>_NNN.nii.gz   int16, 12-bit, 3D, scanner affine
    root/<site>/labelsTr/<site>_NNN.nii.gz   uint8: 0 background, 1 CSF, 2 grey matter, 3 white matter
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fedmeta.common.data import SITE_KEY_FILE
from fedmeta.common.protocol import ROLE_HELDOUT, ROLE_TRAIN

GENERATOR_VERSION = "1.1"  # 1.1: label protocols beyond csf-merged, the unseen-anatomy held-out site
ASSET_PATH = Path(__file__).resolve().parent / "assets" / "icbm152_2009a_tissue_1p5mm.npz"

LABELS = {0: "background", 1: "CSF", 2: "grey matter", 3: "white matter"}
# What a site's raters label (the label values stay the consortium's; an unlabelled class is background):
#   standard   CSF, grey matter and white matter;  csf-merged  grey and white matter (CSF is background);
#   gm-only    grey matter;  wm-only  white matter;
#   ventricles label 1 on ventricular CSF only (deep CSF enclosed by the parenchyma), no other class.
LABEL_PROTOCOLS = ("standard", "csf-merged", "gm-only", "wm-only", "ventricles")
PROTOCOL_LABELS = {
    "standard": {0: "background", 1: "CSF", 2: "grey matter", 3: "white matter"},
    "csf-merged": {0: "background (including CSF)", 2: "grey matter", 3: "white matter"},
    "gm-only": {0: "background (including CSF and white matter)", 2: "grey matter"},
    "wm-only": {0: "background (including CSF and grey matter)", 3: "white matter"},
    "ventricles": {0: "background (including sulcal CSF and brain tissue)", 1: "ventricles"},
}
SEQUENCES = ("T1w", "T2w", "PD", "FLAIR")
TRAIN_SEQUENCES = ("T1w", "T2w", "PD")  # FLAIR is kept back for the unseen-sequence site
# Held-out (new-hospital) sites: a new mix of seen scanner settings; a sequence no training site has
# (FLAIR); the CSF-merged protocol; anatomy beyond every training site's range (strong atrophy and
# warps outside the training ranges: a guard against an initialisation that only learned the
# generator's usual brains); and, in the `protocols` federation, a protocol (white matter only) and a
# structure definition (ventricles only) that no training site labels.
HELDOUT_KINDS = ("unseen-mix", "unseen-sequence", "unseen-annotation", "unseen-anatomy")
HELDOUT_PROTOCOLS = {"unseen-annotation": "csf-merged", "unseen-protocol": "wm-only", "unseen-structure": "ventricles"}

# Relative equilibrium signal of (CSF, grey matter, white matter) per sequence at 1.5 T. T1w: WM > GM > CSF;
# T2w and PD invert the GM/WM order (CSF brightest on T2w); FLAIR is T2-like with the CSF nulled.
TISSUE_SIGNAL = {
    "T1w": (0.22, 0.58, 0.86),
    "T2w": (1.00, 0.62, 0.44),
    "PD": (0.90, 0.82, 0.66),
    "FLAIR": (0.07, 0.74, 0.52),
}
# Where the subject's world lies: the template's brain extent in mm (RAS), with a little room.
BRAIN_CENTRE_MM = np.array([0.0, -18.0, 8.0])
VENTRICLE_CENTRE_MM = np.array([0.0, -14.0, 14.0])
FOV_LO_MM = np.array([-78.0, -113.0, -76.0])
FOV_HI_MM = np.array([78.0, 80.0, 88.0])
STORAGE_ORIENTATIONS = ("RAS", "LAS", "LPS", "RPI")  # NIfTI from different converters (FSL, DICOM, ...)
SLICE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


@dataclass(frozen=True)
class Preset:
    """Size and ranges of one federation preset."""

    num_train_sites: int
    heldout_kinds: tuple[str, ...]
    patients: tuple[int, int]  # inclusive range of patients per site
    inplane_mm: tuple[float, float]
    slice_thickness_mm: tuple[float, float]
    fov_scale: float = 1.0  # < 1 shrinks the field of view around the brain centre (smoke volumes)
    train_sequences: tuple[str, ...] | None = None  # fixed per-site sequences; None draws them
    train_protocols: tuple[str, ...] = ("standard",)  # label protocols, cycled over the training sites
    # Lazy: generating writes the manifest only, and a site's volumes are rendered the first time it is
    # used (`SiteInfo.folder`), so a federation of a thousand sites costs what its sampled sites cost.
    lazy: bool = False


PRESETS: dict[str, Preset] = {
    # Tiny: 5 sites x 4 patients at ~2.5 mm, a few seconds. Sequences fixed so the tests can rely on a
    # T1w and a T2w training site.
    "smoke": Preset(
        num_train_sites=3,
        heldout_kinds=("unseen-sequence", "unseen-annotation"),
        patients=(4, 4),
        inplane_mm=(2.2, 2.6),
        slice_thickness_mm=(2.5, 4.0),
        train_sequences=("T1w", "T2w", "PD"),
    ),
    "default": Preset(
        num_train_sites=8,
        heldout_kinds=HELDOUT_KINDS,
        patients=(10, 20),
        inplane_mm=(1.2, 2.0),
        slice_thickness_mm=(1.5, 5.0),
    ),
    # Protocol-heterogeneous consortium, where one FedAvg head is ill-posed: training sites label
    # every tissue, tissue without CSF, or grey matter only; new hospitals ask for white matter only
    # or for the ventricles (a structure no training site delineates), plus the unseen-anatomy site.
    # Volumes as in `default`, so its scanners and anatomy are a like-for-like comparison.
    "protocols": Preset(
        num_train_sites=8,
        heldout_kinds=("unseen-protocol", "unseen-structure", "unseen-anatomy"),
        patients=(10, 20),
        inplane_mm=(1.2, 2.0),
        slice_thickness_mm=(1.5, 5.0),
        train_protocols=("standard", "csf-merged", "gm-only"),
    ),
}
# Scaling federations (`fedmeta perf scaling`, `fedmeta simulate --preset scale-1000`): many small
# training sites (3 patients each, smoke-sized volumes) and the smoke preset's two new hospitals, lazy:
# a site is rendered when first sampled, so generation time and disk follow the sites used.
SCALE_COUNTS = (10, 30, 100, 1000)
for _count in SCALE_COUNTS:
    PRESETS[f"scale-{_count}"] = Preset(
        num_train_sites=_count,
        heldout_kinds=("unseen-sequence", "unseen-annotation"),
        patients=(3, 3),
        inplane_mm=(2.2, 2.6),
        slice_thickness_mm=(2.5, 4.0),
        lazy=True,
    )
del _count


@dataclass
class SiteInfo:
    """One site of a generated federation, as recorded in its manifest."""

    name: str
    role: str  # ROLE_TRAIN | ROLE_HELDOUT
    heldout_kind: str | None  # one of HELDOUT_KINDS (or HELDOUT_PROTOCOLS' keys) for held-out sites
    path: Path  # where its folder is (in a lazy federation, may not be yet: see `folder`)
    num_patients: int
    params: dict[str, Any]
    subjects: list[dict[str, Any]] = field(default_factory=list)
    lazy: bool = False
    fov_scale: float = 1.0
    # Set by load_manifest from the manifest: which generator and anatomy made (and may render) the site.
    generator_version: str = GENERATOR_VERSION
    asset_digest: str = ""

    @property
    def label_protocol(self) -> str:
        return str(self.params["annotation"]["protocol"])

    def folder(self) -> Path:
        """The site's folder, rendered now if its federation is lazy and nobody has used the site yet.

        The same files an eager federation holds (every subject has its own seed). Safe when several
        processes ask at once: each renders into its own staging folder, the first rename wins; what
        a render killed half-way left is removed here.
        """
        if not self.lazy:
            return self.path
        _sweep_partials(self)
        if not self.path.is_dir():
            _render_site(self)
        elif not (self.path / "dataset.json").is_file():
            raise FileNotFoundError(
                f"{self.path} is a folder without dataset.json in a lazy federation: not a site fedmeta rendered "
                "(its renders appear whole). Delete that folder; the site is rendered again when next used.")
        return self.path


@dataclass
class Manifest:
    """The top-level record of a generated federation."""

    root: Path
    preset: str
    seed: int
    generator_version: str
    cache_key: str
    sites: list[SiteInfo]
    generation_seconds: float = 0.0  # what writing it took (a lazy federation: the manifest alone)

    @property
    def train_sites(self) -> list[SiteInfo]:
        return sorted((s for s in self.sites if s.role == ROLE_TRAIN), key=lambda s: s.name)

    @property
    def heldout_sites(self) -> list[SiteInfo]:
        return sorted((s for s in self.sites if s.role == ROLE_HELDOUT), key=lambda s: s.name)

    def site(self, name: str) -> SiteInfo:
        for info in self.sites:
            if info.name == name:
                return info
        raise KeyError(f"site {name!r} is not in the federation at {self.root}; sites: {[s.name for s in self.sites]}")


# ----------------------------------------------------------------------------------------------------
# anatomy


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


# ----------------------------------------------------------------------------------------------------
# parameters


def _rng(seed: int, *path: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *path]))


def _uniform(rng: np.random.Generator, lo: float, hi: float, digits: int = 3) -> float:
    return round(float(rng.uniform(lo, hi)), digits)


def _draw_site_params(rng: np.random.Generator, preset: Preset, sequence: str, kind: str | None,
                      protocol: str = "standard") -> dict[str, Any]:
    """Scanner, population and annotation parameters of one site (all plain JSON values)."""
    field_t = float(rng.choice([1.5, 3.0]))
    jitter = rng.uniform(0.92, 1.08, size=3)  # vendor/coil differences in relative tissue signal
    signal = np.asarray(TISSUE_SIGNAL[sequence]) * jitter
    if field_t == 3.0:
        # Longitudinal relaxation times converge at 3 T, so the GM/WM contrast shrinks a little.
        mid = (signal[1] + signal[2]) / 2
        signal[1:] = mid + 0.85 * (signal[1:] - mid)
    slice_axis = str(rng.choice(["axial", "axial", "axial", "coronal", "sagittal"]))
    artefact = str(rng.choice(["none", "none", "gibbs", "motion"]))
    snr_lo, snr_hi = (10.0, 28.0) if field_t == 1.5 else (18.0, 40.0)
    bias_lo, bias_hi = (0.05, 0.2) if field_t == 1.5 else (0.15, 0.4)
    params: dict[str, Any] = {
        "scanner": {
            "field_strength_t": field_t,
            "sequence": sequence,
            "tissue_signal": {"csf": round(float(signal[0]), 4), "grey_matter": round(float(signal[1]), 4),
                              "white_matter": round(float(signal[2]), 4)},
            "inplane_mm": _uniform(rng, *preset.inplane_mm, digits=2),
            "slice_thickness_mm": _uniform(rng, *preset.slice_thickness_mm, digits=2),
            "slice_axis": slice_axis,
            "storage_orientation": str(rng.choice(STORAGE_ORIENTATIONS)),
            "bias_strength": _uniform(rng, bias_lo, bias_hi),
            "snr": _uniform(rng, snr_lo, snr_hi, digits=1),
            "gain": _uniform(rng, 0.75, 1.35),
            "gamma": _uniform(rng, 0.8, 1.25),
            "bits": 12,
            "artefact": artefact,
            "gibbs_kspace_fraction": _uniform(rng, 0.35, 0.6) if artefact == "gibbs" else None,
            "ghost_amplitude": _uniform(rng, 0.04, 0.12) if artefact == "motion" else None,
            # Coverage: some sites stop above the cerebellum; the top of the head is always in view.
            "fov_inferior_mm": _uniform(rng, -76.0, -35.0, digits=1),
        },
        "population": {
            "atrophy_mean": _uniform(rng, 0.0, 0.25),
            "atrophy_sd": 0.05,
        },
        "annotation": {
            "protocol": "standard",
            "threshold": _uniform(rng, 0.4, 0.6),
            "gm_bias_voxels": int(rng.choice([-1, 0, 1])),  # one-voxel erosion (-1) / dilation (+1) of GM
            "label_noise": _uniform(rng, 0.0, 0.05),  # share of boundary voxels given a neighbour's label
        },
    }
    params["annotation"]["protocol"] = HELDOUT_PROTOCOLS.get(kind or "", protocol)
    if kind == "unseen-anatomy":
        # Beyond the training range on purpose: training sites draw atrophy means 0-0.25 and subjects
        # clipped at 0.4, scale 0.92-1.08, rotation +-10 deg, elastic 1.5-4 mm (see _draw_subject_params).
        params["population"] = {"atrophy_mean": _uniform(rng, 0.45, 0.55), "atrophy_sd": 0.05,
                                "anatomy": "beyond-training-range"}
    return params


def _draw_subject_params(rng: np.random.Generator, site_params: dict[str, Any]) -> dict[str, Any]:
    population = site_params["population"]
    if population.get("anatomy") == "beyond-training-range":
        return _draw_unseen_anatomy(rng, population)
    atrophy = float(np.clip(rng.normal(population["atrophy_mean"], population["atrophy_sd"]), 0.0, 0.4))
    return {
        "rotation_deg": [round(float(v), 2) for v in rng.uniform(-10.0, 10.0, size=3)],
        "scale": [round(float(v), 4) for v in rng.uniform(0.92, 1.08, size=3)],
        "translation_mm": [round(float(v), 2) for v in rng.uniform(-4.0, 4.0, size=3)],
        "elastic_amplitude_mm": _uniform(rng, 1.5, 4.0, digits=2),
        "elastic_seed": int(rng.integers(0, 2**31 - 1)),
        "atrophy": round(atrophy, 4),
        "noise_seed": int(rng.integers(0, 2**31 - 1)),
    }


def _draw_unseen_anatomy(rng: np.random.Generator, population: dict[str, Any]) -> dict[str, Any]:
    """A subject outside every training range: enlarged ventricles and thin cortex (atrophy 0.45-0.6),
    head size 10-16 % off the template (training: within 8 %), rotation 12-20 deg, elastic 5-7 mm."""
    atrophy = float(np.clip(rng.normal(population["atrophy_mean"], population["atrophy_sd"]), 0.45, 0.6))
    side = rng.choice([-1.0, 1.0], size=3)
    return {
        "rotation_deg": [round(float(v), 2) for v in rng.choice([-1.0, 1.0], size=3) * rng.uniform(12.0, 20.0, size=3)],
        "scale": [round(float(v), 4) for v in 1.0 + side * rng.uniform(0.10, 0.16, size=3)],
        "translation_mm": [round(float(v), 2) for v in rng.uniform(-4.0, 4.0, size=3)],
        "elastic_amplitude_mm": _uniform(rng, 5.0, 7.0, digits=2),
        "elastic_seed": int(rng.integers(0, 2**31 - 1)),
        "atrophy": round(atrophy, 4),
        "noise_seed": int(rng.integers(0, 2**31 - 1)),
    }


def plan_federation(preset: str, seed: int) -> list[dict[str, Any]]:
    """Every site's name, role, kind and parameters, and its subjects' parameters (no image work)."""
    spec = _preset(preset)
    plan: list[dict[str, Any]] = []
    rng = _rng(seed, 0)
    if spec.train_sequences is not None:
        sequences = list(spec.train_sequences)
    else:
        # Every training sequence appears at least twice; the order is seeded.
        pool = [TRAIN_SEQUENCES[i % len(TRAIN_SEQUENCES)] for i in range(spec.num_train_sites)]
        sequences = [str(s) for s in rng.permutation(pool)]
    entries: list[tuple[str, str, str | None, str]] = []
    width = max(2, len(str(len(sequences))))  # site-0001 .. site-1000: names sort in site order
    for i, sequence in enumerate(sequences):
        entries.append((f"site-{i + 1:0{width}d}", ROLE_TRAIN, None, sequence))
    # Protocols are assigned in site order, after every draw, so a federation whose training sites all
    # label the standard way draws exactly what it drew before protocols existed.
    protocols = [spec.train_protocols[i % len(spec.train_protocols)] for i in range(len(sequences))]
    for kind in spec.heldout_kinds:
        if kind == "unseen-sequence":
            sequence = "FLAIR"
        else:
            sequence = str(rng.choice(TRAIN_SEQUENCES))
        entries.append((f"new-{kind.removeprefix('unseen-')}", ROLE_HELDOUT, kind, sequence))
    for index, (name, role, kind, sequence) in enumerate(entries, start=1):
        site_rng = _rng(seed, 1, index)
        params = _draw_site_params(site_rng, spec, sequence, kind,
                                   protocols[index - 1] if role == ROLE_TRAIN else "standard")
        num_patients = int(site_rng.integers(spec.patients[0], spec.patients[1] + 1))
        subjects = []
        for p in range(num_patients):
            subject = _draw_subject_params(_rng(seed, 2, index, p), params)
            subjects.append({"id": f"{name}_{p:03d}", **subject})
        plan.append({"name": name, "role": role, "heldout_kind": kind, "num_patients": num_patients,
                     "params": params, "subjects": subjects, "fov_scale": spec.fov_scale})
    return plan


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not known; choose one of: {', '.join(PRESETS)}.")
    return PRESETS[name]


# ----------------------------------------------------------------------------------------------------
# one subject at one site


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
    import torch

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
    import torch

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
    from scipy import ndimage

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
    import nibabel as nib
    from nibabel import orientations as ornt

    transform = ornt.ornt_transform(ornt.axcodes2ornt("RAS"), ornt.axcodes2ornt(tuple(axcodes)))
    stored = ornt.apply_orientation(array, transform)
    new_affine = affine @ ornt.inv_ornt_aff(transform, array.shape)
    assert nib.aff2axcodes(new_affine) == tuple(axcodes)
    return np.ascontiguousarray(stored), new_affine


def _write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)  # scanner coordinates
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))


def _worker_init() -> None:
    import torch

    from fedmeta.common.workers import end_with_parent

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


# ----------------------------------------------------------------------------------------------------
# the federation


def _sweep_partials(info: SiteInfo) -> None:
    """Removes the staging folders of renders of this site whose process is gone (killed half-way)."""
    _sweep_staging(info.path.parent, info.name)


_STAGING = re.compile(r"\.partial-(\d+)(-\d+)?")  # after ".<name>": the writing process's pid (and thread)


def _staging_pid(entry: Path, name: str) -> int | None:
    """The pid of the process that stages ``name`` in ``entry`` (``.<name>.partial-<pid>[-<thread>]``), or None."""
    prefix = f".{name}"
    match = _STAGING.fullmatch(entry.name[len(prefix):]) if entry.name.startswith(prefix) else None
    return int(match.group(1)) if match else None


def _sweep_staging(folder: Path, name: str) -> None:
    """Removes the staging folders of ``name`` in ``folder`` whose process is gone: a synth or a site render
    killed half-way (SIGKILL runs no ``finally``) leaves one; a live process's is left alone, and so is one that
    holds anything a render does not write (its name alone does not make it fedmeta's)."""
    for stale in folder.glob(f".{glob.escape(name)}.partial-*"):
        if _dead_staging(stale, name):
            shutil.rmtree(stale, ignore_errors=True)


def _dead_staging(entry: Path, name: str) -> bool:
    """Whether ``entry`` is a staging folder of ``name`` that a process now gone left, holding only what a render
    writes: NIfTI volumes, dataset.json and manifest.json, in plain folders (no link, no other file)."""
    pid = _staging_pid(entry, name)
    if pid is None or pid == os.getpid() or entry.is_symlink() or not entry.is_dir() or _process_alive(pid):
        return False
    for path in entry.rglob("*"):
        if path.is_symlink() or not (path.is_dir() or path.name.endswith(".nii.gz")
                                     or path.name in ("dataset.json", "manifest.json")):
            return False
    return True


def _render_site(info: SiteInfo) -> None:
    import threading

    if info.generator_version != GENERATOR_VERSION or (info.asset_digest and info.asset_digest != _asset_digest()):
        raise ValueError(
            f"{info.path.parent} is a lazy federation made by generator {info.generator_version} (anatomy "
            f"{info.asset_digest or '?'}); this fedmeta renders with generator {GENERATOR_VERSION} (anatomy "
            f"{_asset_digest()}), so site {info.name} would not match the sites rendered before. Regenerate "
            "the federation (`fedmeta synth --force`, or delete it from the cache), or use the fedmeta that made it.")
    staging = info.path.parent / f".{info.name}.partial-{os.getpid()}-{threading.get_ident()}"
    site = {"name": info.name, "role": info.role, "heldout_kind": info.heldout_kind, "params": info.params,
            "num_patients": info.num_patients, "subjects": info.subjects}
    try:
        if staging.exists():
            shutil.rmtree(staging)
        (staging / "imagesTr").mkdir(parents=True)
        (staging / "labelsTr").mkdir(parents=True)
        (staging / "dataset.json").write_text(json.dumps(_dataset_json(site), indent=2, allow_nan=False))
        _render_subjects([(staging, info.params, subject, info.fov_scale) for subject in info.subjects], workers=1)
        try:
            staging.rename(info.path)
        except OSError:
            if not info.path.is_dir():  # not a lost race: a real failure
                raise
    except OSError as err:
        raise OSError(
            f"site {info.name} of the lazy federation {info.path.parent} is rendered on first use, but it could not "
            f"be written there ({err.strerror or err}: {err.filename or staging}). Make the federation folder "
            "writable, or render every site where it is writable first (`fedmeta synth --preset "
            "PRESET --out DIR --all-sites`) and use that copy.") from err
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _site_folder(path: Any) -> str:
    """A manifest's site path, which fedmeta writes as one plain name: never a path out of the federation."""
    if not (isinstance(path, str) and re.fullmatch(r"[\w-]+", path)):
        raise ValueError(f"site path {path!r} is not a plain folder name inside the federation")
    return path


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: no pid is that large
        return False
    except PermissionError:
        return True
    return True


def _cache_key(preset: str, seed: int) -> str:
    # The preset's whole definition, not only its name: a preset whose sites or sizes change is a new federation.
    spec = dataclasses.asdict(_preset(preset))
    blob = json.dumps({"preset": preset, "spec": spec, "seed": seed, "generator": GENERATOR_VERSION,
                       "asset": _asset_digest()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _dataset_json(site: dict[str, Any]) -> dict[str, Any]:
    protocol = site["params"]["annotation"]["protocol"]
    labels = {str(k): v for k, v in PROTOCOL_LABELS[protocol].items()}
    return {
        "name": site["name"],
        "description": f"fedmeta synthetic site ({site['role']}"
        + (f", {site['heldout_kind']}" if site["heldout_kind"] else "")
        + "): brain tissue segmentation on ICBM152 2009a anatomy",
        "reference": "fedmeta common/synth.py; anatomy: ICBM 2009a (see common/assets/ICBM152_NOTICE.txt)",
        "licence": "derived from ICBM 2009a; MNI/McGill notice applies",
        "release": GENERATOR_VERSION,
        "tensorImageSize": "3D",
        "modality": {"0": site["params"]["scanner"]["sequence"]},
        "labels": labels,
        "label_protocol": protocol,
        "numTraining": site["num_patients"],
        "numTest": 0,
        "training": [
            {"image": f"./imagesTr/{s['id']}.nii.gz", "label": f"./labelsTr/{s['id']}.nii.gz"}
            for s in site["subjects"]
        ],
        "test": [],
    }


def _is_cached(root: Path, key: str) -> bool:
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if manifest.get("cache_key") != key:
        return False
    if manifest.get("lazy"):
        return True  # sites are rendered when used; a rendered one is complete (it was renamed into place)
    return all(
        len(list((root / site["name"] / "labelsTr").glob("*.nii.gz"))) == site["num_patients"]
        for site in manifest["sites"]
    )


def generate_federation(out_dir: Path, preset: str = "default", seed: int = 0, *, force: bool = False,
                        workers: int | None = None, lazy: bool | None = None) -> Path:
    """Write a synthetic federation to ``out_dir`` (its root) and return the root.

    Cached: when ``out_dir`` already holds the federation of the same (preset, seed, generator version,
    anatomy asset), it is returned at once. A folder holding anything else is refused unless
    ``force=True``, which replaces a previous fedmeta federation: one whose manifest.json is a fedmeta
    federation manifest and that holds nothing fedmeta did not write (any other entry, a user's file in a
    site folder included, is refused and named, with or without ``force``).
    ``workers`` processes render subjects in parallel (default: up to 2 for the larger presets); the
    result does not depend on it, since every subject has its own seed. ``lazy`` (default: the
    preset's; the ``scale-*`` presets are lazy) writes the manifest alone and leaves each site to be
    rendered when first used (:meth:`SiteInfo.folder`); ``lazy=False`` renders every site now.
    """
    root = Path(out_dir)
    _preset(preset)  # an unknown preset is refused before the folder is touched
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer.")
    seed = int(seed)
    key = _cache_key(preset, seed)
    if _is_cached(root, key) and not force:
        if lazy is False:  # asked for every site now: render those not used yet
            for info in load_manifest(root).sites:
                info.folder()
        return root
    _refuse_to_overwrite(root, force, preset, seed)

    started = time.perf_counter()
    plan = plan_federation(preset, seed)
    lazy = _preset(preset).lazy if lazy is None else bool(lazy)
    _sweep_staging(root.parent, root.name)  # what a synth killed half-way (kill -9) left beside the root
    staging = root.parent / f".{root.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    jobs = []
    for site in plan if not lazy else ():
        site_dir = staging / site["name"]
        (site_dir / "imagesTr").mkdir(parents=True)
        (site_dir / "labelsTr").mkdir(parents=True)
        (site_dir / "dataset.json").write_text(json.dumps(_dataset_json(site), indent=2, allow_nan=False))
        jobs.extend((site_dir, site["params"], subject, site["fov_scale"]) for subject in site["subjects"])
    try:
        _render_subjects(jobs, workers)
        manifest = {
            "generator_version": GENERATOR_VERSION,
            "preset": preset,
            "seed": seed,
            "cache_key": key,
            "anatomy": {"asset": ASSET_PATH.name, "sha256_16": _asset_digest(),
                        "source": "ICBM 2009a nonlinear symmetric, via nilearn; see ICBM152_NOTICE.txt"},
            "labels": {str(k): v for k, v in LABELS.items()},
            "generation_seconds": round(time.perf_counter() - started, 2),
            "lazy": lazy,
            "sites": [
                {"name": s["name"], "role": s["role"], "heldout_kind": s["heldout_kind"], "path": s["name"],
                 "num_patients": s["num_patients"], "params": s["params"], "subjects": s["subjects"],
                 "fov_scale": s["fov_scale"]}
                for s in plan
            ],
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, allow_nan=False))
        if root.exists():
            _remove_federation(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(root)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return root


def cached_federation(cache_root: Path | str, preset: str = "default", seed: int = 0, *, workers: int | None = None) -> Path:
    """The federation of (preset, seed) in fedmeta's own cache folder ``cache_root/<preset>-<seed>``.

    fedmeta owns that folder, so a federation left there by an older generator (same preset and
    seed, another cache key) is replaced; anything else there is refused as :func:`generate_federation` does.
    """
    root = Path(cache_root) / f"{preset}-{seed}"
    stale = False
    if (root / "manifest.json").is_file():
        try:
            old = json.loads((root / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        stale = (old.get("preset") == preset and old.get("seed") == seed and "cache_key" in old
                 and old["cache_key"] != _cache_key(preset, seed))
    return generate_federation(root, preset, seed, force=stale, workers=workers)


def _refuse_to_overwrite(root: Path, force: bool, preset: str = "", seed: int = -1) -> None:
    """Refuses, always, a non-empty folder that is not a fedmeta federation or that holds anything fedmeta did
    not write (:func:`_not_ours`); another federation unless ``force``."""
    if root.is_symlink():
        raise FileExistsError(f"{root} is a symbolic link (to {os.readlink(root)}); give the folder itself.")
    if not (root.exists() and any(root.iterdir())):
        return
    if not (root / "manifest.json").is_file():
        raise FileExistsError(
            f"{root} is not empty and holds no fedmeta manifest.json; refusing to write a federation "
            "into it. Choose an empty or new folder."
        )
    foreign = _not_ours(root)
    if foreign:
        shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
        raise FileExistsError(
            f"{root} holds a fedmeta federation but also what fedmeta did not write there: {shown}. It is not "
            "replaced, not even with --force (that would delete them). Move them out of the folder, or choose "
            "another folder.")
    if not force:
        old = json.loads((root / "manifest.json").read_text())
        what = (f"a different federation (preset={old.get('preset')!r}, seed={old.get('seed')!r}, generator "
                f"{old.get('generator_version')!r})")
        if (old.get("preset"), old.get("seed"), old.get("generator_version")) == (preset, seed, GENERATOR_VERSION):
            what = (f"preset {preset!r}, seed {seed} as an older definition of that preset (or another anatomy "
                    "asset) made it: not the federation this fedmeta generates")
        raise FileExistsError(
            f"{root} already holds {what}; pass force=True (`fedmeta synth --force`) to replace it, or choose "
            "another folder."
        )


def _federation_sites(root: Path) -> list[dict[str, Any]]:
    """The sites ``root/manifest.json`` lists, when it is a fedmeta federation manifest; otherwise a
    FileExistsError that says so (a web app's manifest.json is not a federation, whatever --force says)."""
    path = root / "manifest.json"
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise TypeError("not a JSON object")
        for key, kind in (("generator_version", str), ("preset", str), ("seed", int), ("cache_key", str),
                          ("sites", list)):
            if not isinstance(raw.get(key), kind):
                raise ValueError(f"no {key!r} ({kind.__name__})")
        for site in raw["sites"]:
            # One plain name per site, as generate_federation writes it: never a path out of the folder.
            if not (isinstance(site, dict) and isinstance(site.get("path"), str) and re.fullmatch(r"[\w-]+", site["path"])
                    and all(isinstance(s, dict) and re.fullmatch(r"[\w-]+", str(s.get("id", "")))
                            for s in site.get("subjects", []))):
                raise ValueError(f"site entry {str(site)[:80]!r} is not one fedmeta writes")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise FileExistsError(
            f"{root} holds a manifest.json that is not a fedmeta federation manifest ({type(err).__name__}: {err}); "
            "fedmeta replaces only a federation it generated, never another folder. Choose an empty or new folder."
        ) from None
    return raw["sites"]


def _not_ours(root: Path) -> list[str]:
    """What ``root`` holds that fedmeta did not write (relative paths, sorted): anything but the manifest, the site
    folders it lists with their dataset.json and listed volumes, a dead render's staging folder, and the files
    fedmeta's output journal records unchanged (a ``synth --preview`` drawn there)."""
    sites = _federation_sites(root)
    from fedmeta.common.outputs import JOURNAL_NAME, Outputs, file_sha256

    journal = Outputs(root, "synth").journal()["files"] if (root / JOURNAL_NAME).is_file() else {}
    foreign = []
    by_folder = {site["path"]: site for site in sites}
    for entry in sorted(root.iterdir()):
        name = entry.name
        if entry.is_symlink():
            foreign.append(f"{name} (a symbolic link)")
        elif name in ("manifest.json", JOURNAL_NAME) or (
                name in journal and entry.is_file() and journal[name].get("sha256") == file_sha256(entry)):
            continue
        elif name in by_folder and entry.is_dir():
            foreign += [f"{name}/{inner}" for inner in _not_in_site(entry, by_folder[name])]
        else:
            pid = next((pid for site in by_folder if (pid := _staging_pid(entry, site)) is not None), None)
            if pid is not None and _process_alive(pid):
                foreign.append(f"{name}/ (a site being rendered now by process {pid})")
            elif not any(_dead_staging(entry, site) for site in by_folder):  # a name alone is not a render's
                foreign.append(name + ("/" if entry.is_dir() else ""))
    return foreign


def _not_in_site(folder: Path, site: dict[str, Any]) -> list[str]:
    """What a site folder holds beyond what synth writes there (dataset.json, imagesTr/ and labelsTr/ with the listed
    subjects' volumes)."""
    volumes = {f"{subject['id']}.nii.gz" for subject in site.get("subjects", [])}
    foreign = []
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            foreign.append(f"{entry.name} (a symbolic link)")
        elif entry.name in ("dataset.json", SITE_KEY_FILE) and entry.is_file():  # the key: a run's ClientApp kept it
            continue
        elif entry.name in ("imagesTr", "labelsTr") and entry.is_dir():
            foreign += [f"{entry.name}/{inner.name}" + (" (a symbolic link)" if inner.is_symlink() else "")
                        for inner in sorted(entry.iterdir())
                        if inner.name not in volumes or inner.is_symlink() or not inner.is_file()]
        else:
            foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    return foreign


def _remove_federation(root: Path) -> None:
    """Removes a federation fedmeta generated, entry by entry, checked again now (rendering took a while): what
    appeared meanwhile is refused, not deleted, and the folder itself goes only once empty."""
    _refuse_to_overwrite(root, force=True)
    for entry in root.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    root.rmdir()


def _render_subjects(jobs: list, workers: int | None) -> None:
    """Renders every subject job, in ``workers`` spawned processes or in this one (same result)."""
    if workers is None:
        workers = 1 if len(jobs) <= 30 else min(2, os.cpu_count() or 1)
    if workers > 1:
        import multiprocessing

        # spawn, not fork: the caller may hold torch/Ray threads that a forked child would inherit.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init) as pool:
            list(pool.map(_generate_subject, jobs, chunksize=4))
        return
    import torch

    # One thread: on a busy 2-core machine torch's thread pool made generation 3x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for job in jobs:
            _generate_subject(job)
    finally:
        torch.set_num_threads(threads)


def federation_digest(root: Path | str) -> str:
    """What a generated federation holds, in one string (its manifest's cache key: preset, seed,
    generator version and anatomy asset); the same wherever the folder is moved."""
    return load_manifest(root).cache_key


def load_manifest(root: Path | str) -> Manifest:
    """Read ``root/manifest.json`` of a generated federation."""
    root = Path(root)
    path = root / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: {root} is not a generated fedmeta federation. Generate one with "
            "`fedmeta synth --out DIR`, or read a single site folder with fedmeta.common.data.SiteDataset.load."
        )
    try:
        raw = json.loads(path.read_text())
        lazy = bool(raw.get("lazy", False))
        made_by = str(raw["generator_version"])
        asset = str(raw.get("anatomy", {}).get("sha256_16", ""))
        sites = [
            SiteInfo(name=s["name"], role=s["role"], heldout_kind=s["heldout_kind"], path=root / _site_folder(s["path"]),
                     num_patients=int(s["num_patients"]), params=s["params"], subjects=s.get("subjects", []),
                     lazy=lazy, fov_scale=float(s.get("fov_scale", 1.0)), generator_version=made_by,
                     asset_digest=asset)
            for s in raw["sites"]
        ]
        return Manifest(root=root, preset=raw["preset"], seed=int(raw["seed"]),
                        generator_version=raw["generator_version"], cache_key=raw["cache_key"], sites=sites,
                        generation_seconds=float(raw.get("generation_seconds", 0.0)))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{path} is not a valid fedmeta manifest ({type(err).__name__}: {err}); regenerate the federation "
            "with `fedmeta synth --out DIR --force`."
        ) from err
