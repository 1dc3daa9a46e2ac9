"""Miniature downloads of the public datasets fedmeta imports, with their real folder layouts, file names, headers and
label conventions (from the datasets' published descriptions) and volumes of a few thousand voxels.

- MSD (Simpson et al., 2019; medicaldecathlon.com): ``TaskNN_Name/{dataset.json, imagesTr, labelsTr, imagesTs}``,
  4D ``[x, y, z, channel]`` NIfTI for the multi-channel tasks, macOS ``._*`` AppleDouble files beside each file as the
  archives hold them. :func:`msd_task` draws Task01_BrainTumour (FLAIR, T1w, t1gd, T2w; oedema 1, non-enhancing
  tumour 2, enhancing tumour 3), Task03_Liver (CT in HU; liver 1, tumour 2; anisotropic) and Task05_Prostate (T2, ADC;
  peripheral zone 1, transition zone 2).
- CHAOS (Kavur et al., 2021): ``Train_Sets/CT/<patient>/{DICOM_anon, Ground}`` (liver 255 in the PNGs) and
  ``Train_Sets/MR/<patient>/T2SPIR/{DICOM_anon, Ground}`` (grey values 63 liver, 126 right kidney, 189 left kidney,
  252 spleen), one PNG per slice named in InstanceNumber order. :func:`chaos_train_sets` draws them.

Each case holds a learnable structure — ellipsoid organs brighter or darker than their surround, placed with a
little jitter — so that a model trained for a few steps sees something to segment; ``Hospital`` varies the scanner
(intensity scale, voxel size, orientation) between the downloads that play different hospitals.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image

from fedmeta.common.dicom import write_series

APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "  # an AppleDouble header: not NIfTI


def nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)


@dataclass(frozen=True)
class Hospital:
    """One hospital's scanner: intensity ``scale``, in-plane and slice voxel size (mm), ``flip_x`` for an affine whose
    first axis runs right-to-left (a left-handed grid, as many exports write), and the seed of its patients."""

    scale: float = 1.0
    inplane_mm: float = 1.0
    slice_mm: float = 1.0
    flip_x: bool = False
    seed: int = 0

    def affine(self) -> np.ndarray:
        affine = np.diag([self.inplane_mm, self.inplane_mm, self.slice_mm, 1.0])
        if self.flip_x:
            affine[0, 0] = -self.inplane_mm
        affine[:3, 3] = (-10.0, 20.0, -30.0)  # an origin off the world's centre, as scanners write
        return affine


def ellipsoid(shape: tuple[int, int, int], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """A boolean ellipsoid of ``radii`` voxels about ``centre`` (voxel coordinates) in a volume of ``shape``."""
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1).astype(np.float64)
    return (((grid - centre) / radii) ** 2).sum(axis=-1) <= 1.0


def _jittered_centre(shape: tuple[int, int, int], rng: np.random.Generator, offset=(0.0, 0.0)) -> np.ndarray:
    return np.array([shape[0] / 2 + offset[0] + rng.uniform(-1.5, 1.5), shape[1] / 2 + offset[1]
                     + rng.uniform(-1.5, 1.5), (shape[2] - 1) / 2])


# --------------------------------------------------------------------------------------------------------- MSD


def _brain_tumour(shape, hospital: Hospital, rng) -> tuple[np.ndarray, np.ndarray]:
    """A head of brain tissue holding a glioma: oedema (1) about a non-enhancing core (2) in an enhancing rim (3);
    4 MR channels FLAIR, T1w, t1gd, T2w of different contrast."""
    head = ellipsoid(shape, np.array(shape) / 2 - 0.5, np.array([shape[0] * 0.45, shape[1] * 0.45, shape[2] * 2.0]))
    centre = _jittered_centre(shape, rng, offset=(2.0, -1.0))
    oedema = ellipsoid(shape, centre, np.array([6.5, 6.0, 4.0]))
    rim = ellipsoid(shape, centre, np.array([4.0, 3.5, 3.0]))
    core = ellipsoid(shape, centre, np.array([2.2, 2.0, 2.0]))
    label = np.select([core, rim, oedema], [2, 3, 1], 0).astype(np.uint8)
    #            head  oedema  core  enhancing
    contrast = {"FLAIR": (300, 650, 420, 500), "T1w": (400, 330, 200, 300), "t1gd": (400, 340, 220, 900),
                "T2w": (250, 600, 800, 450)}
    channels = []
    for values in contrast.values():
        image = np.where(head, values[0], 0.0)
        for value, region in zip(values[1:], (1, 2, 3)):
            image[label == region] = value
        channels.append(np.clip(image * hospital.scale + rng.normal(0, 20 * hospital.scale, shape) * head, 0, None))
    return np.stack(channels, axis=-1).astype(np.float32), label


def _liver(shape, hospital: Hospital, rng) -> tuple[np.ndarray, np.ndarray]:
    """An abdomen in HU: air about a body of soft tissue, a bright liver (1) with a darker tumour (2), a spine."""
    body = ellipsoid(shape, np.array(shape) / 2 - 0.5, np.array([shape[0] * 0.46, shape[1] * 0.40, shape[2] * 3.0]))
    centre = _jittered_centre(shape, rng, offset=(-shape[0] * 0.12, -shape[1] * 0.05))
    liver = ellipsoid(shape, centre, np.array([shape[0] * 0.22, shape[1] * 0.18, shape[2] * 0.9])) & body
    tumour = ellipsoid(shape, centre + np.array([rng.uniform(-1, 1), rng.uniform(-1, 1), 0]),
                       np.array([shape[0] * 0.08, shape[1] * 0.07, shape[2] * 0.5]))
    spine = ellipsoid(shape, np.array([shape[0] / 2, shape[1] * 0.78, shape[2] / 2]), np.array([2.5, 2.5, 99.0]))
    label = np.select([tumour & liver, liver], [2, 1], 0).astype(np.uint8)
    hu = np.full(shape, -1000.0)
    hu[body] = 20.0 * hospital.scale
    hu[spine & body] = 500.0
    hu[label == 1] = 130.0 * hospital.scale
    hu[label == 2] = 50.0 * hospital.scale
    hu += rng.normal(0, 12, shape)
    # integer HU, as MSD's CT images hold them; nothing below -1024 (air's noise clipped, as scanners write it)
    return np.round(np.clip(hu, -1024, None)).astype(np.int16), label


def _prostate(shape, hospital: Hospital, rng) -> tuple[np.ndarray, np.ndarray]:
    """A pelvis with a prostate: transition zone (2) in front of a peripheral zone (1); channels T2 and ADC."""
    pelvis = ellipsoid(shape, np.array(shape) / 2 - 0.5, np.array([shape[0] * 0.47, shape[1] * 0.42, shape[2] * 3.0]))
    centre = _jittered_centre(shape, rng)
    gland = ellipsoid(shape, centre, np.array([shape[0] * 0.22, shape[1] * 0.2, shape[2] * 0.9]))
    transition = ellipsoid(shape, centre - np.array([0, shape[1] * 0.06, 0]),
                           np.array([shape[0] * 0.14, shape[1] * 0.12, shape[2] * 0.9]))
    label = np.select([transition, gland], [2, 1], 0).astype(np.uint8)
    t2 = np.where(pelvis, 300.0, 0.0)
    t2[label == 1], t2[label == 2] = 800.0, 450.0  # the peripheral zone is T2-bright
    adc = np.where(pelvis, 1200.0, 0.0)
    adc[label == 1], adc[label == 2] = 1800.0, 900.0
    t2 = np.clip(t2 * hospital.scale + rng.normal(0, 25, shape) * pelvis, 0, None)
    adc = np.clip(adc * hospital.scale + rng.normal(0, 60, shape) * pelvis, 0, None)
    return np.stack([t2, adc], axis=-1).astype(np.float32), label


@dataclass(frozen=True)
class MsdTask:
    """One MSD task as its archive names and describes it."""

    folder: str
    case_prefix: str
    shape: tuple[int, int, int]
    draw: object  # (shape, Hospital, rng) -> (image, label)
    meta: dict


MSD_TASKS = {
    "Task01": MsdTask("Task01_BrainTumour", "BRATS", (24, 24, 10), _brain_tumour, {
        "name": "BRATS", "description": "Gliomas segmentation tumour and oedema in on brain images",
        "reference": "https://www.med.upenn.edu/sbia/brats2017.html", "licence": "CC-BY-SA 4.0", "release": "2.0",
        "tensorImageSize": "4D", "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}}),
    "Task03": MsdTask("Task03_Liver", "liver", (40, 40, 5), _liver, {
        "name": "LiTS", "description": "Liver and tumor segmentation", "reference": "https://competitions.codalab.org/"
        "competitions/17094", "licence": "CC-BY-SA 4.0", "release": "2.0", "tensorImageSize": "3D",
        "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "cancer"}}),
    "Task05": MsdTask("Task05_Prostate", "prostate", (32, 32, 5), _prostate, {
        "name": "PROSTATE", "description": "Prostate transitional zone and peripheral zone segmentation",
        "reference": "Radboud University, Nijmegen Medical Centre", "licence": "CC-BY-SA 4.0", "release": "1.0",
        "tensorImageSize": "4D", "modality": {"0": "T2", "1": "ADC"},
        "labels": {"0": "background", "1": "PZ", "2": "TZ"}}),
}


def msd_task(root: Path, task: str, hospital: Hospital, *, cases: int = 4, test: int = 1) -> Path:
    """A miniature MSD ``task`` ('Task01', 'Task03', 'Task05') as its archive unpacks into ``root``: dataset.json,
    imagesTr/labelsTr (case numbers as MSD's, with gaps), imagesTs without labels, '._' files beside each file."""
    spec = MSD_TASKS[task]
    folder = root / spec.folder
    rng = np.random.default_rng(hospital.seed)
    affine = hospital.affine()
    numbers = [hospital.seed * 100 + 2 * i + 1 for i in range(cases + test)]
    names = [f"{spec.case_prefix}_{n:03d}.nii.gz" for n in numbers]
    for i, name in enumerate(names):
        image, label = spec.draw(spec.shape, hospital, rng)
        if hospital.flip_x:  # the same anatomy on a grid whose first axis runs the other way
            image, label = image[::-1].copy(), label[::-1].copy()
        split = "imagesTr" if i < cases else "imagesTs"
        nifti(folder / split / name, image, affine)
        (folder / split / f"._{name}").write_bytes(APPLEDOUBLE)
        if i < cases:
            nifti(folder / "labelsTr" / name, label, affine)
            (folder / "labelsTr" / f"._{name}").write_bytes(APPLEDOUBLE)
    meta = {**spec.meta, "numTraining": cases, "numTest": test,
            "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in names[:cases]],
            "test": [f"./imagesTs/{n}" for n in names[cases:]]}
    (folder / "dataset.json").write_text(json.dumps(meta, indent=4))
    (folder / "._dataset.json").write_bytes(APPLEDOUBLE)
    return folder


# ------------------------------------------------------------------------------------------------------- CHAOS


def chaos_series(dicom_folder: Path, ground: Path, masks: np.ndarray, grey: int | None, modality: str,
                 affine: np.ndarray, reverse_instances: bool = False, volume: np.ndarray | None = None,
                 png_name: str = "liver_GT_{index:03d}.png", dicom_name: str = "i{number:04d},0000b.dcm") -> list[Path]:
    """A DICOM series and its CHAOS ground truth: one PNG per slice named in InstanceNumber order, DICOM file names
    not in slice order (``reverse_instances``: instance numbers run against the slice normal, as many scanners number
    them). ``masks`` (column, row, slice) on ``affine``'s grid: booleans times ``grey``, or (``grey`` None) the PNG
    grey values themselves; ``volume``: the pixel values (default: noise). ``png_name`` and ``dicom_name`` take
    ``index`` (instance - 1) and ``instance`` / ``number`` (the file's place against the written order)."""
    volume = np.random.default_rng(2).normal(size=masks.shape) * 100 if volume is None else volume
    files, _affine, flipped = write_series(volume, affine, dicom_folder, modality=modality)
    masks = masks[:, :, ::-1] if flipped else masks  # write_series numbers instances along the written order
    grey_values = masks.astype(np.uint8) * grey if grey is not None else masks.astype(np.uint8)
    ground.mkdir(parents=True)
    n = len(files)
    renamed = []
    for k, path in enumerate(files):  # written slice k
        instance = n - k if reverse_instances else k + 1
        header = pydicom.dcmread(path)
        header.InstanceNumber = instance
        header.save_as(path)
        renamed.append(path.rename(path.with_name(dicom_name.format(number=n - k, instance=instance))))
        Image.fromarray(grey_values[:, :, k].T).save(ground / png_name.format(index=instance - 1, instance=instance))
    (ground / f"._{png_name.format(index=0, instance=1)}").write_bytes(APPLEDOUBLE)
    return renamed


CHAOS_SHAPE = {"ct": (40, 40, 5), "mr": (32, 32, 5)}
MR_GREY = {1: 63, 2: 126, 3: 189, 4: 252}  # liver, right kidney, left kidney, spleen


def _chaos_ct(shape, hospital: Hospital, rng) -> tuple[np.ndarray, np.ndarray]:
    """An abdomen in HU with a bright liver (True) on the patient's right."""
    hu, label = _liver(shape, hospital, rng)
    return hu.astype(np.float64), label > 0  # CHAOS CT annotates the liver only, tumours included


def _chaos_mr(shape, hospital: Hospital, rng) -> tuple[np.ndarray, np.ndarray]:
    """A T2-SPIR abdomen: liver, two kidneys and the spleen of distinct brightness and place; grey values as
    CHAOS's PNGs hold them."""
    body = ellipsoid(shape, np.array(shape) / 2 - 0.5, np.array([shape[0] * 0.47, shape[1] * 0.42, shape[2] * 3.0]))
    j = lambda: rng.uniform(-1.0, 1.0)  # noqa: E731
    x, y, z = shape[0], shape[1], (shape[2] - 1) / 2
    organs = {1: ellipsoid(shape, np.array([x * 0.33 + j(), y * 0.4 + j(), z]), np.array([x * 0.18, y * 0.16, 3])),
              2: ellipsoid(shape, np.array([x * 0.3 + j(), y * 0.7 + j(), z]), np.array([2.6, 3.2, 2])),
              3: ellipsoid(shape, np.array([x * 0.7 + j(), y * 0.7 + j(), z]), np.array([2.6, 3.2, 2])),
              4: ellipsoid(shape, np.array([x * 0.72 + j(), y * 0.38 + j(), z]), np.array([3.5, 3.0, 2]))}
    grey = np.zeros(shape, np.uint8)
    image = np.where(body, 200.0, 0.0)
    for value, region in organs.items():  # liver dark, kidneys bright, spleen brighter than the liver
        grey[region & body] = MR_GREY[value]
        image[region & body] = {1: 120.0, 2: 650.0, 3: 650.0, 4: 420.0}[value]
    image = np.clip(image * hospital.scale + rng.normal(0, 15, shape) * body, 0, None)
    return image, grey


def chaos_train_sets(root: Path, modality: str, hospital: Hospital, *, patients: int = 4,
                     reverse_instances: bool = False) -> Path:
    """A miniature ``CHAOS_Train_Sets`` under ``root`` holding ``Train_Sets/CT`` or ``Train_Sets/MR`` (T2SPIR) of
    ``patients`` patients (CHAOS's patient numbers are not consecutive: 1, 2, 5, 6, ...)."""
    download = root / "CHAOS_Train_Sets"
    rng = np.random.default_rng(hospital.seed)
    shape = CHAOS_SHAPE[modality]
    numbers = [1, 2, 5, 6, 8, 10, 14, 16][:patients]
    for number in numbers:
        if modality == "ct":
            volume, masks = _chaos_ct(shape, hospital, rng)
            patient = download / "Train_Sets" / "CT" / str(number)
            chaos_series(patient / "DICOM_anon", patient / "Ground", masks, 255, "CT", hospital.affine(),
                         reverse_instances, volume=volume)
        else:
            volume, grey = _chaos_mr(shape, hospital, rng)
            sequence = download / "Train_Sets" / "MR" / str(number) / "T2SPIR"
            chaos_series(sequence / "DICOM_anon", sequence / "Ground", grey, None, "MR", hospital.affine(),
                         reverse_instances, volume=volume, png_name=f"IMG-{number:04d}-{{instance:05d}}.png",
                         dicom_name=f"IMG-{number:04d}-{{number:05d}}.dcm")
    return download


__all__ = ["APPLEDOUBLE", "CHAOS_SHAPE", "Hospital", "MR_GREY", "MSD_TASKS", "MsdTask", "chaos_series",
           "chaos_train_sets", "ellipsoid", "msd_task", "nifti"]
