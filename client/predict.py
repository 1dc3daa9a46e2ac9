"""``fedmeta predict``: a hospital segments its scans with its site model (or a consortium release).

One NIfTI mask per scan in the scan's own grid (``fedmeta.common.inference.segment_scan``), optionally its
class probabilities, an overlay PNG and, for a DICOM series, a DICOM Segmentation; a scan the model cannot
handle is refused with the reason and the others go on. What is written where: ``fedmeta.client.prediction_files``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from fedmeta.client.model_card import load_site_model
from fedmeta.client.overlays import overlay_montage
from fedmeta.client.prediction_files import (
    SCAN_SUFFIXES, case_name, mask_header, output_folder_problem, output_names, previous_outputs, save_atomically,
    summary_here,
)
from fedmeta.common.adaptation import load_initialisation
from fedmeta.common.config import RunConfig
from fedmeta.common.data import ras_grid, resampling_problem
from fedmeta.common.devices import pick_device
from fedmeta.common.dicom import is_series_folder, write_segmentation
from fedmeta.common.inference import segment_scan
from fedmeta.common.jsonio import write_json
from fedmeta.common.model import build_model
from fedmeta.common.outputs import Outputs
from fedmeta.common.read_limits import ReadLimits
from fedmeta.common.release import verify
from fedmeta.common.validate import check_scan

# A volume with fewer voxels than this along an axis is a localiser or a slice, not a scan to segment.
MIN_SCAN_SLICES = 3


def command_device(requested: str) -> torch.device:
    """``--device`` of fedmeta adapt and predict (``fedmeta.common.devices.pick_device``); a device this machine
    lacks is a ValueError, the commands' usage error, printed with the others."""
    try:
        return pick_device(requested)
    except RuntimeError as err:
        raise ValueError(str(err)) from None


def scan_paths(source: Path) -> list[Path]:
    """The scans ``--input`` names: a NIfTI file, a DICOM series folder, or a folder of NIfTI files and/or
    series folders (sorted)."""
    source = Path(source)
    if source.is_file():
        if not source.name.endswith(SCAN_SUFFIXES):
            raise ValueError(f"--input {source}: not a NIfTI file (.nii.gz or .nii) or a DICOM series folder.")
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"--input {source}: no such file or folder.")
    if is_series_folder(source):
        return [source]
    scans = sorted(p for p in source.iterdir() if not p.name.startswith(".") and (
        (p.is_file() and p.name.endswith(SCAN_SUFFIXES)) or is_series_folder(p)))
    if not scans:
        raise ValueError(f"--input {source}: holds no .nii.gz or .nii file and no DICOM series folder.")
    return scans  # two scans that would write one mask: refused by output_names, with every output kind


def segment_loaded(model, params, config, image_data, affine, device, probabilities: bool = False,
                   limits: ReadLimits = ReadLimits(), channels: tuple[str, ...] | None = None):
    """``segment_scan`` with the run config's preprocessing, classes and batch size: the masks predict writes and
    adapt scores. ``channels``: the scan's channel names in the model's order (default: the run config's)."""
    return segment_scan(model, params, image_data, np.asarray(affine), config.data_config(limits=limits),
                        num_classes=config.num_classes, batch_size=config.eval_batch_size,
                        probabilities=probabilities, device=device, channels=channels)


def predict_scans(model_path: Path, inputs: Path, out: Path, *, public_key: Path | None = None,
                  allow_unsigned: bool = False, probabilities: bool = False, overlays: bool = True,
                  dicom_seg: bool = False, overwrite: bool = False, device: str = "auto",
                  limits: ReadLimits = ReadLimits(), progress=print) -> dict[str, Any]:
    """One mask per scan into ``out`` (``<case>.nii.gz``); returns a summary with the refused scans. A scan
    that cannot be segmented (bad file, too large, a failure while segmenting or writing) is refused by name,
    and the others go on."""
    dev = command_device(device)
    model_path = Path(model_path)
    scans = scan_paths(inputs)
    planned = output_names(scans, probabilities=probabilities, overlays=overlays, dicom_seg=dicom_seg)
    problem = output_folder_problem(out, inputs, [n for names in planned.values() for n in names], overwrite)
    if problem:
        raise ValueError(problem)
    if model_path.is_file():  # a consortium checkpoint used as it is: the release must verify
        release = verify(model_path, public_key, allow_unsigned=allow_unsigned)
        init, config = load_initialisation(model_path)
        note = config.algorithm_object.released_model_note(model_path)  # refuses θ that cannot segment alone
        if note:
            progress(note)
        params = init.params
        source = {"checkpoint": str(model_path), "release_id": (release or {}).get("release_id"),
                  "release_verified": bool(release)}
        label_names: dict = {}
    else:
        site_model = load_site_model(model_path)
        config = RunConfig.from_run_config(site_model.run_config)
        params = site_model.params
        # The card's word, not a verified fact: anyone who can write the model folder can rewrite the card.
        source = {"site_model": str(model_path), "card_release_id": site_model.card["initialisation"].get("release_id"),
                  "card_authenticated": False}
        label_names = site_model.card.get("model", {}).get("label_names", {})
    out = Path(out)
    # Every name this batch may write is recorded before the first is written: a re-run after a kill (SIGKILL
    # runs no `finally`, so predictions.json may never be written) knows these files are predict's own.
    journal = Outputs(out, "predict")
    journal.claim([*(n for names in planned.values() for n in names), "predictions.json"], overwrite=True,
                  recognised=previous_outputs(out) | {"predictions.json"} if summary_here(out) else ())
    model = build_model(config.model_config()).to(dev)
    progress(f"segmenting {len(scans)} scan(s) with {model_path} on {dev}")
    # What the folder holds of predict's own (the journal also lists names claimed but never written).
    written, refused, notes, outputs = [], {}, {}, sorted(n for n in previous_outputs(out) if (out / n).is_file())
    try:
        for i, scan in enumerate(scans, 1):
            began = time.perf_counter()
            try:
                entry = _predict_one(scan, out, model, params, config, label_names, dev, probabilities=probabilities,
                                     overlays=overlays, dicom_seg=dicom_seg, limits=limits,
                                     progress=lambda what: progress(f"[{i}/{len(scans)}] {scan.name}: {what}"))
            except _Refused as err:
                refused[scan.name] = str(err)
            except MemoryError:
                refused[scan.name] = f"{scan}: segmenting it ran out of memory; free memory or crop the scan."
            except Exception as err:  # noqa: BLE001 - one scan's failure never ends the batch; its type only (no data)
                refused[scan.name] = f"{scan}: segmenting or writing it failed ({type(err).__name__}); the others went on."
            if scan.name in refused:
                progress(f"[{i}/{len(scans)}] {scan.name}: refused: {refused[scan.name]}")
                continue
            if entry.get("warnings"):
                notes[scan.name] = entry["warnings"]
            journal.record(*entry["files"])
            outputs = sorted(set(outputs) | set(entry.pop("files")))
            entry["seconds"] = round(time.perf_counter() - began, 3)
            written.append(entry)
            progress(f"[{i}/{len(scans)}] {scan.name} -> {entry['case']}.nii.gz ({entry['seconds']:.1f} s)")
    finally:  # what was written is listed even when the batch is interrupted
        summary = {"model": source, "device": str(dev), "masks": written, "refused": refused, "warnings": notes,
                   "outputs": outputs}
        save_atomically(lambda tmp: write_json(tmp, summary), out / "predictions.json")
        journal.record("predictions.json")
    return summary


def _predict_one(scan: Path, out: Path, model, params, config, label_names: dict, dev, *, probabilities: bool,
                 overlays: bool, dicom_seg: bool, limits: ReadLimits, progress=print) -> dict[str, Any]:
    """One scan: checked, segmented, its outputs written (each atomically); raises _Refused with the reason.
    ``progress`` hears each phase (reading, segmenting, writing): a large scan takes a while in each."""
    name = case_name(scan)
    progress("reading")
    problems, image, data = check_scan(scan, min_slices=MIN_SCAN_SLICES, limits=limits,  # a uniform scan is refused here
                                       channels=config.in_channels)
    if problems:
        raise _Refused(problems[0])
    problem = resampling_problem(scan, *ras_grid(data.shape, image.affine), config.data_config(limits=limits))
    if problem:
        raise _Refused(problem)
    progress(f"segmenting {'x'.join(map(str, data.shape))} voxels")
    result = segment_loaded(model, params, config, data, image.affine, dev, probabilities, limits)
    progress("writing " + ", ".join(["mask"] + ["probabilities"] * probabilities + ["overlay"] * overlays
                                    + ["DICOM SEG"] * (dicom_seg and scan.is_dir())))
    files: list[str] = []
    try:  # a scan's outputs are all written or none stays: a refused scan leaves nothing unlisted behind
        header = mask_header(image, np.uint8, config.num_classes)
        files.append(f"{name}.nii.gz")
        save_atomically(lambda tmp: nib.save(nib.Nifti1Image(result.mask, image.affine, header), str(tmp)),
                        out / files[-1])
        if probabilities:
            prob_header = mask_header(image, np.float32, config.num_classes)
            files.append(f"{name}_probabilities.nii.gz")
            save_atomically(lambda tmp: nib.save(nib.Nifti1Image(result.probabilities, image.affine, prob_header),
                                                 str(tmp)), out / files[-1])
        if overlays:
            files.append(f"{name}_overlay.png")
            # The first channel: the one the crop is centred on (CT, or the first MR sequence).
            first = data[..., 0] if data.ndim == 4 else data
            save_atomically(lambda tmp: overlay_montage(first, result.mask, tmp, title=name), out / files[-1])
    except BaseException:
        for written in files:
            (out / written).unlink(missing_ok=True)
        raise
    entry: dict[str, Any] = {"case": name, "shape": list(result.mask.shape),
                             "voxels_per_class": {str(k): v for k, v in result.voxel_counts.items()}}
    for note in result.notes:
        progress(f"warning: {note}")
    if result.notes:
        entry["warnings"] = list(result.notes)
    if dicom_seg and scan.is_dir():
        try:
            save_atomically(lambda tmp: write_segmentation(scan, result.mask, tmp, num_classes=config.num_classes,
                                                           label_names=label_names), out / f"{name}.seg.dcm")
            files.append(f"{name}.seg.dcm")
            entry["dicom_seg"] = files[-1]
        except Exception as err:  # noqa: BLE001 - the series lacks what a SEG must reference; the mask stands
            entry["dicom_seg"] = (f"not written ({type(err).__name__}): the series lacks an attribute a DICOM SEG "
                                  "must reference (e.g. FrameOfReferenceUID, StudyInstanceUID)")
    return {**entry, "files": files}


class _Refused(Exception):
    """A scan the model cannot handle, with the reason."""


__all__ = ["MIN_SCAN_SLICES", "command_device", "predict_scans", "scan_paths", "segment_loaded"]
