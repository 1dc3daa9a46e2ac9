"""The files ``fedmeta predict`` writes, and where it may write them.

Each scan's outputs are named after its case (:func:`case_name`) and planned before any scan is read
(:func:`output_names`); ``--out`` is checked against the input, a site's data and an earlier prediction
(:func:`output_folder_problem`); every file lands by an atomic rename (:func:`save_atomically`), and a
mask's NIfTI header keeps the scan's geometry and none of its free text (:func:`mask_header`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedmeta.common.dicom import is_series_folder
from fedmeta.common.outputs import OutputRefused, Outputs, refuse_data_folder, write_atomically

SCAN_SUFFIXES = (".nii.gz", ".nii")
OUTPUT_SUFFIXES = (".nii.gz", "_overlay.png", "_probabilities.nii.gz", ".seg.dcm")


def case_name(path: Path) -> str:
    """``<case>`` for ``<case>_0000.nii.gz`` (nnU-Net's first-channel suffix), ``<case>.nii.gz``, ``<case>.nii``
    or a DICOM series folder ``<case>/``."""
    name = path.name
    if path.is_dir():
        return name
    for suffix in SCAN_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if len(name) > 5 and name.endswith("_0000"):  # nnU-Net's first channel; '_2023' is part of a name
        name = name[:-5]
    return name


def output_names(scans: list[Path], *, probabilities: bool, overlays: bool, dicom_seg: bool) -> dict[Path, list[str]]:
    """Every file predict writes for each scan; refuses two scans whose outputs would share a name."""
    kinds = [".nii.gz"] + (["_overlay.png"] if overlays else []) + (["_probabilities.nii.gz"] if probabilities else [])
    owners: dict[str, Path] = {}
    out: dict[Path, list[str]] = {}
    for scan in scans:
        names = [case_name(scan) + kind for kind in kinds]
        if dicom_seg and scan.is_dir():
            names.append(case_name(scan) + ".seg.dcm")
        for name in names:
            key = name.casefold()  # macOS and Windows file systems ignore case: Case3 and case3 are one file
            if key in owners:
                raise ValueError(f"--input: {owners[key].name} and {scan.name} would both write {name}; rename one "
                                 "of them (or pass one channel per case).")
            owners[key] = scan
        out[scan] = names
    return out


def output_folder_problem(out: Path, inputs: Path, planned: list[str], overwrite: bool) -> str | None:
    """Why predict must not write into ``out``: it is (inside) the input, holds scans or labels it did not
    write, or already holds one of the planned files (without --overwrite). Checked before any scan is read."""
    out, source = Path(out).resolve(), Path(inputs).resolve()
    source_dir = source.parent if source.is_file() else source
    if out == source_dir or source_dir in out.parents or out in source.parents:
        return (f"--out {out}: is the input folder or inside it (or holds it); masks named after their scans would "
                "overwrite them. Choose a folder of its own, e.g. a new 'masks' folder.")
    previous = previous_outputs(out) if out.is_dir() else set()
    foreign = [p.name for p in sorted(out.iterdir())
               if p.name not in previous and (p.name.endswith(SCAN_SUFFIXES) or p.name.endswith(".dcm")
                                              or is_series_folder(p))] if out.is_dir() else []
    if foreign:
        return (f"--out {out}: already holds scans, labels or DICOM files fedmeta predict did not write "
                f"({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); predict never writes over a site's "
                "data. Choose an empty folder.")
    try:
        refuse_data_folder(out, "--out")
    except OutputRefused as err:
        return str(err)
    if not out.is_dir():
        return None
    links = [name for name in planned if (out / name).is_symlink()]
    if links:
        return f"--out {out}: {', '.join(links[:3])} is a symbolic link; predict writes only plain files. Remove it."
    existing = [name for name in planned if (out / name).exists()]
    if existing and not overwrite:
        return (f"--out {out}: already holds {', '.join(existing[:3])}{' ...' if len(existing) > 3 else ''} from an "
                "earlier prediction; pass --overwrite to replace them, or choose another folder.")
    clash = [name for name in existing if name not in previous]
    if clash:
        return (f"--out {out}: {', '.join(clash[:3])} exists but no earlier prediction here wrote it; predict replaces "
                "only its own outputs. Move it away.")
    return None


def previous_outputs(out: Path) -> set[str]:
    """The files an earlier prediction in ``out`` wrote: those the folder's journal records as predict's (claimed
    before the first mask was written, so a prediction killed halfway is still known), and, from releases before
    the journal, those its predictions.json lists."""
    owned = Outputs(out, "predict").owned()
    try:
        listed = json.loads((out / "predictions.json").read_text()).get("outputs", [])
    except (OSError, ValueError, AttributeError):
        return owned
    return owned | {str(name) for name in listed if isinstance(name, str) and "/" not in name}


def summary_here(out: Path) -> bool:
    """Whether ``out`` holds a predictions.json that predict wrote (its masks and outputs listed)."""
    try:
        summary = json.loads((out / "predictions.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and isinstance(summary.get("masks"), list) and "outputs" in summary


def save_atomically(write, path: Path) -> None:
    """``write(temporary path)`` then rename onto ``path``: a crash never leaves half a mask under its name. The
    temporary file is new and exclusive (``mkstemp``): a link planted under a predictable name is never followed.
    The file gets the mode the umask gives (0644 under umask 022: a PACS upload running as another user reads it)."""
    write_atomically(path, write)


def mask_header(image, dtype, num_classes: int):
    """The scan's geometry (qform, sform, units) for an output; none of its free-text fields, which converters
    fill with patient names and protocol notes."""
    header = image.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(1, 0)
    for field in ("descrip", "aux_file", "db_name", "intent_name"):
        if field in header:
            header[field] = b""
    if hasattr(header, "extensions"):  # DICOM-derived NIfTI extensions (ecode 2, 6) carry whole headers
        header.extensions.clear()
    if "cal_min" in header:
        header["cal_min"], header["cal_max"] = 0, num_classes - 1 if dtype == np.uint8 else 1
    return header


__all__ = ["OUTPUT_SUFFIXES", "SCAN_SUFFIXES", "case_name", "mask_header", "output_folder_problem", "output_names",
           "previous_outputs", "save_atomically", "summary_here"]
