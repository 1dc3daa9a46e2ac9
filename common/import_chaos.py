"""`fedmeta import chaos`: the CHAOS challenge's training sets (DICOM series + PNG ground truth) into a site folder.

Layout of the download (``CHAOS_Train_Sets/Train_Sets/``, or that folder itself)::

    CT/<patient>/DICOM_anon/*.dcm       CT/<patient>/Ground/*.png          (liver: 255)
    MR/<patient>/T2SPIR/DICOM_anon/*.dcm                MR/<patient>/T2SPIR/Ground/*.png
    MR/<patient>/T1DUAL/DICOM_anon/{InPhase,OutPhase}/*.dcm  MR/<patient>/T1DUAL/Ground/*.png
    (MR grey values 63 liver, 126 right kidney, 189 left kidney, 252 spleen)

Each series is read by :func:`fedmeta.common.dicom.read_series` (slices ordered by ImagePositionPatient
along the slice normal, affine from the image plane attributes). The ground-truth PNGs are named in the
order of the slices' InstanceNumber; that order is checked to run monotonically along the slice normal
before the n-th PNG is put on the n-th slice, and the PNG count and size are checked against the series.
Output: one NIfTI image and one label map per patient (MR: per patient and sequence), labels 1 liver (CT),
or 1 liver, 2 right kidney, 3 left kidney, 4 spleen (MR).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fedmeta.common.read_limits import ReadLimits
from fedmeta.common.safe_archive import APPLEDOUBLE_REASON, is_appledouble
from fedmeta.common.site_import import ImportSummary, prepare_site_folder, write_site_json, write_summary

CT_LABELS = {"0": "background", "1": "liver"}
MR_LABELS = {"0": "background", "1": "liver", "2": "right kidney", "3": "left kidney", "4": "spleen"}
# CHAOS's own evaluation reads grey-value bands, not exact values (resampled or re-saved PNGs drift a little).
MR_GREY_BANDS = ((55, 70, 1), (110, 135, 2), (175, 200, 3), (240, 255, 4))
CT_GREY_BANDS = ((128, 255, 1),)
# --sequence: the MR series a site holds (one channel per site: a site's cases share their channels)
MR_SEQUENCES = {"T2SPIR": ("T2SPIR", "DICOM_anon"), "InPhase": ("T1DUAL", "DICOM_anon/InPhase"),
                "OutPhase": ("T1DUAL", "DICOM_anon/OutPhase")}


@dataclass(frozen=True)
class _Series:
    case: str
    dicom: Path
    ground: Path


def import_chaos(root: Path | str, out: Path | str, *, modality: str, sequence: str = "T2SPIR",
                 limits: ReadLimits = ReadLimits()) -> ImportSummary:
    """Writes CHAOS's ``modality`` ('ct' or 'mr'; MR: one ``sequence``) training patients as the site ``out``."""
    root, out = Path(root), Path(out)
    if modality not in ("ct", "mr"):
        raise ValueError(f"--modality {modality!r}: CHAOS has 'ct' and 'mr'. Fix: pass one of them.")
    if sequence not in MR_SEQUENCES:
        raise ValueError(f"--sequence {sequence!r}: CHAOS's MR sequences are {', '.join(MR_SEQUENCES)}. Fix: pass one.")
    base = _modality_folder(root, modality)
    skipped: dict[str, str] = {}
    series = _find_series(base, modality, sequence, skipped, root)
    prepare_site_folder(out)
    try:
        training = []
        for item in series:
            _write_case(item, out, modality, limits)
            training.append({"image": f"./imagesTr/{item.case}.nii.gz", "label": f"./labelsTr/{item.case}.nii.gz"})
        channels = {"0": "CT"} if modality == "ct" else {"0": f"MR {sequence}"}
        labels = CT_LABELS if modality == "ct" else MR_LABELS
        write_site_json(out, name=f"CHAOS_{modality.upper()}" + ("" if modality == "ct" else f"_{sequence}"),
                        description="CHAOS challenge training set (Kavur et al., Medical Image Analysis 2021), imported "
                                    "by fedmeta from DICOM series and PNG ground truth",
                        channels=channels, labels=labels, training=training, test=[],
                        extra={"reference": "https://chaos.grand-challenge.org", "licence": "CC-BY-SA 4.0"})
        summary = ImportSummary(source=str(root), site=str(out), cases=len(training), channels=channels, labels=labels,
                                skipped=dict(sorted(skipped.items())))
        write_summary(out, summary)
        return summary
    except BaseException:
        import shutil

        shutil.rmtree(out, ignore_errors=True)  # prepare_site_folder made it empty: only our own files
        raise


def _modality_folder(root: Path, modality: str) -> Path:
    for candidate in (root / modality.upper(), root / "Train_Sets" / modality.upper()):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"{root}: holds no {modality.upper()}/ or Train_Sets/{modality.upper()}/ folder. Fix: give "
                            "the extracted CHAOS_Train_Sets folder (it holds Train_Sets/CT and Train_Sets/MR).")


def _patients(base: Path, skipped: dict[str, str], root: Path) -> list[Path]:
    patients = []
    for path in sorted(base.iterdir(), key=lambda p: _natural(p.name)):
        if is_appledouble(path.name):
            skipped[str(path.relative_to(root))] = APPLEDOUBLE_REASON
        elif path.is_dir() and not path.name.startswith("."):
            patients.append(path)
    if not patients:
        raise ValueError(f"{base}: holds no patient folder. Fix: extract the whole CHAOS archive.")
    return patients


def _find_series(base: Path, modality: str, sequence: str, skipped: dict[str, str], root: Path) -> list[_Series]:
    found = []
    for patient in _patients(base, skipped, root):
        if modality == "ct":
            found.append(_Series(f"CT_{patient.name}", patient / "DICOM_anon", patient / "Ground"))
        else:
            folder, dicom = MR_SEQUENCES[sequence]
            found.append(_Series(f"MR_{patient.name}_{sequence}", patient / folder / dicom, patient / folder / "Ground"))
    for item in found:
        for folder, what in ((item.dicom, "DICOM series"), (item.ground, "ground-truth PNGs")):
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder}: missing; CHAOS keeps the {what} of each patient there. Fix: "
                                        "extract the whole CHAOS archive again.")
        for path in [*item.dicom.iterdir(), *item.ground.iterdir()]:
            if is_appledouble(path.name):
                skipped[str(path.relative_to(root))] = APPLEDOUBLE_REASON
    return found


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _instance_order(folder: Path) -> list[int]:
    """For the slices in the order :func:`read_series` stacks them (ascending along the slice normal), each slice's
    rank by InstanceNumber; a ValueError where instance numbers do not run monotonically along the normal."""
    import numpy as np
    import pydicom

    headers = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        with open(path, "rb") as handle:
            handle.seek(128)
            if handle.read(4) != b"DICM":
                continue
        header = pydicom.dcmread(path, stop_before_pixels=True)
        if "InstanceNumber" not in header:
            raise ValueError(f"{path}: has no InstanceNumber, so its ground-truth PNG cannot be matched (CHAOS names "
                             "the PNGs in instance order). Fix: export the series with instance numbers.")
        orientation = np.asarray([float(v) for v in header.ImageOrientationPatient])
        depth = float(np.asarray([float(v) for v in header.ImagePositionPatient]) @ np.cross(orientation[:3],
                                                                                              orientation[3:]))
        headers.append((depth, int(header.InstanceNumber), path))
    headers.sort(key=lambda h: h[0])
    instances = [h[1] for h in headers]
    if len(set(instances)) != len(instances):
        raise ValueError(f"{folder}: two slices share an InstanceNumber; the PNGs cannot be matched to slices. Fix: "
                         "export the series again.")
    steps = np.diff(instances)
    if len(steps) and not (np.all(steps > 0) or np.all(steps < 0)):
        raise ValueError(f"{folder}: the slices' instance numbers do not run in one direction along the slice normal "
                         "(ImagePositionPatient), so the instance-ordered PNGs would be put on the wrong slices. Fix: "
                         "check the series is one stack, exported completely.")
    ranks = np.argsort(np.argsort(instances))
    return [int(r) for r in ranks]


def _read_png(path: Path, bands: tuple, shape: tuple[int, int]):
    import numpy as np
    from PIL import Image  # matplotlib's dependency; only CHAOS's ground truth needs it

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image)
    except Exception as err:  # noqa: BLE001 - Pillow raises many kinds on a damaged file
        raise ValueError(f"{path}: not a readable PNG ({type(err).__name__}). Fix: extract the archive again.") from None
    if pixels.ndim == 3:  # grey saved as RGB(A): every colour channel equal
        if not np.all(pixels[..., :3] == pixels[..., :1]):
            raise ValueError(f"{path}: a colour image; CHAOS ground truth is grey values. Fix: use the original PNG.")
        pixels = pixels[..., 0]
    if pixels.shape != shape:
        raise ValueError(f"{path}: {pixels.shape[0]} x {pixels.shape[1]} pixels, its DICOM slice {shape[0]} x "
                         f"{shape[1]}: not this series' ground truth. Fix: keep each series' own Ground folder.")
    labels = np.zeros(pixels.shape, dtype=np.uint8)
    known = pixels == 0
    for low, high, value in bands:
        inside = (pixels >= low) & (pixels <= high)
        labels[inside], known = value, known | inside
    if not known.all():
        values = sorted({int(v) for v in np.unique(pixels[~known])})[:8]
        raise ValueError(f"{path}: grey values {values} are no CHAOS structure (bands {[b[:2] for b in bands]}). Fix: "
                         "use the original ground truth, or the other --modality.")
    return labels


def _write_case(item: _Series, out: Path, modality: str, limits: ReadLimits) -> None:
    import nibabel as nib
    import numpy as np

    from fedmeta.common.dicom import read_series

    image, data = read_series(item.dicom, max_voxels=limits.max_voxels)  # data: [columns, rows, slices]
    ranks = _instance_order(item.dicom)
    pngs = sorted((p for p in item.ground.iterdir() if p.suffix.lower() == ".png" and not is_appledouble(p.name)),
                  key=lambda p: _natural(p.name))
    if len(pngs) != data.shape[2]:
        raise ValueError(f"{item.ground}: {len(pngs)} PNG(s) for the {data.shape[2]} slices of {item.dicom}: the ground "
                         "truth does not cover the series. Fix: extract both folders again from the CHAOS archive.")
    bands = CT_GREY_BANDS if modality == "ct" else MR_GREY_BANDS
    label = np.zeros(data.shape, dtype=np.uint8)
    rows_cols = (data.shape[1], data.shape[0])
    for k, rank in enumerate(ranks):
        label[:, :, k] = _read_png(pngs[rank], bands, rows_cols).T  # (rows, cols) -> the series' (col, row)
    image.set_data_dtype(np.float32)
    nib.save(image, out / "imagesTr" / f"{item.case}.nii.gz")
    nib.save(nib.Nifti1Image(label, image.affine), out / "labelsTr" / f"{item.case}.nii.gz")


__all__ = ["CT_LABELS", "MR_GREY_BANDS", "MR_LABELS", "MR_SEQUENCES", "import_chaos"]
