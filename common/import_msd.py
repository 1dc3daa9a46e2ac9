"""`fedmeta import msd`: a Medical Segmentation Decathlon task, as its users download it, into a fedmeta site folder.

The source is a task folder (``TaskNN_Name/``) or its archive (``TaskNN_Name.tar``, unpacked by
:func:`fedmeta.common.safe_archive.extract_tar`). Its ``dataset.json`` may follow MSD (``"modality": {"0":
"FLAIR", ...}``, ``"labels": {"0": "background", ...}``, ``"training": [{"image": "./imagesTr/x.nii.gz", "label":
"./labelsTr/x.nii.gz"}]``, ``"test": ["./imagesTs/y.nii.gz"]``) or nnU-Net v2 (``"channel_names"``, ``"labels":
{"background": 0, ...}``, ``"file_ending"``, one file per channel ``imagesTr/<case>_0000.nii.gz`` and no
``training`` list). All ten MSD tasks follow the first: Task01_BrainTumour (4 MR channels), Task05_Prostate
(T2, ADC) as 4D files ``[x, y, z, channel]``, the others 3D.

Images are kept as they are (a 4D multi-channel file stays 4D; nnU-Net v2's per-channel files are stacked
into one such file, in ``channel_names`` order) and their channel names written into the site's
``dataset.json``. Only headers are read here: voxel values are ``fedmeta check-data``'s to check.
Test images (``imagesTs``, no labels) go to the site's ``imagesTs/`` and its ``test`` list, for prediction.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from fedmeta.common.safe_archive import APPLEDOUBLE_REASON, DEFAULT_MAX_BYTES, extract_tar, is_appledouble
from fedmeta.common.site_import import ImportSummary, prepare_site_folder, write_site_json, write_summary

NIFTI_SUFFIXES = (".nii.gz", ".nii")
UNLISTED_REASON = "not listed in dataset.json (not a case of the task)"
_SUBFOLDERS = ("imagesTr", "labelsTr", "imagesTs")


def import_msd(source: Path | str, out: Path | str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> ImportSummary:
    """Writes the MSD task ``source`` (folder or tar archive) as the site folder ``out``; returns the summary.

    Raises ValueError (an :class:`fedmeta.common.safe_archive.ArchiveProblem` for the archive) naming the file,
    the problem and the fix; nothing is left in ``out`` then.
    """
    source, out = Path(source), Path(out)
    if not source.exists():
        raise FileNotFoundError(f"{source}: does not exist. Fix: give the task folder (TaskNN_Name/) or its archive "
                                "(TaskNN_Name.tar) as downloaded.")
    prepare_site_folder(out)
    try:
        if source.is_dir():
            return _import_folder(source, out, source_name=str(source), skipped={}, move=False)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}-extract-", dir=out.parent) as scratch:
            skipped = extract_tar(source, Path(scratch), max_bytes=max_bytes)
            task = _task_folder(source, Path(scratch))
            prefix = task.relative_to(scratch).as_posix().removeprefix(".")
            return _import_folder(task, out, source_name=str(source), move=True,
                                  skipped=skipped, member_prefix=prefix)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # prepare_site_folder made it empty: no one else's files
        raise


def _task_folder(archive: Path, root: Path) -> Path:
    """The folder of the extracted archive that holds dataset.json (the archive's top folder, TaskNN_Name/)."""
    found = sorted(p.parent for p in [*root.glob("dataset.json"), *root.glob("*/dataset.json")])
    if len(found) != 1:
        raise ValueError(f"{archive}: holds {'no' if not found else len(found)} dataset.json at its top or in its "
                         "top folder; an MSD archive holds TaskNN_Name/dataset.json. Fix: check the download is an MSD "
                         "task archive.")
    return found[0]


def _import_folder(task: Path, out: Path, *, source_name: str, skipped: dict[str, str], move: bool,
                   member_prefix: str = "") -> ImportSummary:
    dataset_json = task / "dataset.json"
    meta = _read_json(dataset_json)
    channels = _channels(dataset_json, meta)
    labels = _labels(dataset_json, meta)
    if "training" in meta:
        training, test = _msd_entries(task, dataset_json, meta)
    else:
        training, test = _nnunet_v2_entries(task, dataset_json, meta, len(channels))
    problems: list[str] = []
    cases = []
    for images, label in training:
        case = _case_id(label)
        problems += _image_problems(images, channels, dataset_json) + _label_problems(label, images[0])
        cases.append((case, images, label))
    test_cases = []
    for images in test:
        case = _case_id(images[0], channel_suffix=len(images) > 1 or "training" not in meta)
        problems += _image_problems(images, channels, dataset_json)
        test_cases.append((case, images))
    if len({c for c, _, _ in cases}) != len(cases) or len({c for c, _ in test_cases}) != len(test_cases):
        problems.append(f"{dataset_json}: two entries share a case name; each patient must be listed once. Fix: remove "
                        "the repeated entries.")
    if not cases:
        problems.append(f"{dataset_json}: lists no labelled case ('training' is empty and labelsTr/ holds none). Fix: "
                        "import the full task folder.")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ValueError(f"{task}: cannot be imported:\n  " + "\n  ".join(shown))

    used = {p.resolve() for _c, images, label in cases for p in (*images, label)}
    used |= {p.resolve() for _c, images in test_cases for p in images}
    prefix = f"{member_prefix}/" if member_prefix else ""
    for sub in ("", *_SUBFOLDERS):
        folder = task / sub
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            name = prefix + path.relative_to(task).as_posix()
            if path.name == "dataset.json" and not sub:
                continue
            if is_appledouble(path.name):
                skipped[name] = APPLEDOUBLE_REASON
            elif sub and path.resolve() not in used:
                skipped[name] = UNLISTED_REASON

    training_out, test_out = [], []
    for case, images, label in cases:
        image_name = _write_image(images, out / "imagesTr", case, move)
        label_name = case + _suffix(label)
        _transfer(label, out / "labelsTr" / label_name, move)
        training_out.append({"image": f"./imagesTr/{image_name}", "label": f"./labelsTr/{label_name}"})
    if test_cases:
        (out / "imagesTs").mkdir()
    for case, images in test_cases:
        test_out.append(f"./imagesTs/{_write_image(images, out / 'imagesTs', case, move)}")
    extra = {key: meta[key] for key in ("reference", "licence", "license", "release") if key in meta}
    write_site_json(out, name=str(meta.get("name") or task.name), description=str(meta.get("description", "")),
                    channels=channels, labels=labels, training=training_out, test=test_out,
                    extra={**extra, "imported_from": task.name})
    summary = ImportSummary(source=source_name, site=str(out), cases=len(training_out), test_images=len(test_out),
                            channels=channels, labels=labels, skipped=dict(sorted(skipped.items())))
    write_summary(out, summary)
    return summary


def _read_json(dataset_json: Path) -> dict:
    if not dataset_json.is_file():
        raise FileNotFoundError(f"{dataset_json}: does not exist; an MSD task folder holds dataset.json, imagesTr/ and "
                                "labelsTr/. Fix: give the task folder itself (TaskNN_Name/), not its parent.")
    try:
        meta = json.loads(dataset_json.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{dataset_json}: not UTF-8 JSON ({type(err).__name__}: {err}). Fix: download the task "
                         "again, or repair the file.") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{dataset_json}: holds a {type(meta).__name__}, not an object. Fix: download the task again.")
    return meta


def _channels(dataset_json: Path, meta: dict) -> dict[str, str]:
    """Channel index -> name, from MSD's 'modality' or nnU-Net v2's 'channel_names'."""
    raw = meta.get("channel_names", meta.get("modality"))
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{dataset_json}: has no 'modality' (MSD, e.g. {{\"0\": \"CT\"}}) or 'channel_names' (nnU-Net "
                         "v2) mapping. Fix: add one naming each image channel.")
    try:
        indexed = {int(k): str(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise ValueError(f"{dataset_json}: its channel keys {list(raw)} are not channel indices 0, 1, ... Fix: key "
                         "'modality'/'channel_names' by index, e.g. {\"0\": \"T2\", \"1\": \"ADC\"}.") from None
    if sorted(indexed) != list(range(len(indexed))):
        raise ValueError(f"{dataset_json}: channel indices {sorted(indexed)} are not 0..{len(indexed) - 1}. Fix: number "
                         "the channels from 0 without gaps.")
    return {str(i): indexed[i] for i in sorted(indexed)}


def _labels(dataset_json: Path, meta: dict) -> dict[str, str]:
    """Label value -> name, from MSD's ``{"0": "background"}`` or nnU-Net v2's ``{"background": 0}``."""
    raw = meta.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{dataset_json}: has no 'labels' mapping. Fix: add one, e.g. {{\"0\": \"background\", \"1\": "
                         "\"liver\"}.")
    if any(isinstance(v, (list, tuple)) for v in raw.values()):
        raise ValueError(f"{dataset_json}: its labels are nnU-Net v2 regions (a label made of several values, "
                         f"{ {k: v for k, v in raw.items() if isinstance(v, (list, tuple))} }); fedmeta reads one value "
                         "per structure. Fix: import the dataset's original label values (list each value once).")
    if all(re.fullmatch(r"\d+", str(k)) for k in raw):  # MSD: value -> name
        labels = {int(k): str(v) for k, v in raw.items()}
    elif all(isinstance(v, int) or (isinstance(v, str) and v.isdigit()) for v in raw.values()):  # v2: name -> value
        labels = {int(v): str(k) for k, v in raw.items()}
        if len(labels) != len(raw):
            raise ValueError(f"{dataset_json}: two labels share one value ({raw}). Fix: give each structure its own value.")
    else:
        raise ValueError(f"{dataset_json}: 'labels' {raw} is neither MSD's value -> name ({{\"0\": \"background\"}}) "
                         "nor nnU-Net v2's name -> value ({\"background\": 0}). Fix: write it one of these ways.")
    if 0 not in labels:
        raise ValueError(f"{dataset_json}: 'labels' has no value 0 (background). Fix: add \"0\": \"background\".")
    return {str(v): labels[v] for v in sorted(labels)}


def _inside(task: Path, dataset_json: Path, relative: object, where: str) -> Path:
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"{dataset_json}: {where} is {relative!r}, not a relative file path. Fix: that entry.")
    path = PurePosixPath(relative)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{dataset_json}: {where} {relative!r} points outside the task folder. Fix: list files under "
                         "imagesTr/, labelsTr/ or imagesTs/ by relative paths.")
    return task / path


def _msd_entries(task: Path, dataset_json: Path, meta: dict) -> tuple[list, list]:
    entries, test = meta.get("training"), meta.get("test", [])
    if not isinstance(entries, list) or not isinstance(test, list):
        raise ValueError(f"{dataset_json}: 'training' and 'test' must be lists. Fix: download the task again.")
    training = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{dataset_json}: 'training'[{i}] is {entry!r}, not an {{\"image\", \"label\"}} pair. Fix: "
                             "that entry.")
        training.append(([_inside(task, dataset_json, entry.get("image"), f"'training'[{i}]['image']")],
                          _inside(task, dataset_json, entry.get("label"), f"'training'[{i}]['label']")))
    tests = []
    for i, entry in enumerate(test):
        # MSD lists test images as paths; some re-releases as {"image": path}
        relative = entry.get("image") if isinstance(entry, dict) else entry
        tests.append([_inside(task, dataset_json, relative, f"'test'[{i}]")])
    return training, tests


def _nnunet_v2_entries(task: Path, dataset_json: Path, meta: dict, num_channels: int) -> tuple[list, list]:
    """nnU-Net v2's raw layout: ``imagesTr/<case>_XXXX<file_ending>`` per channel, ``labelsTr/<case><file_ending>``."""
    ending = str(meta.get("file_ending", ".nii.gz"))
    if ending not in NIFTI_SUFFIXES:
        raise ValueError(f"{dataset_json}: file_ending {ending!r}; fedmeta imports NIfTI ('.nii.gz', '.nii'). Fix: "
                         "convert the images to NIfTI first.")

    def channel_files(folder: Path, case: str) -> list[Path]:
        return [folder / f"{case}_{c:04d}{ending}" for c in range(num_channels)]

    def cases_in(folder: Path) -> list[str]:
        pattern = re.compile(r"(.+)_0000" + re.escape(ending) + r"$")
        return sorted(m.group(1) for p in (folder.iterdir() if folder.is_dir() else ())
                      if not is_appledouble(p.name) and (m := pattern.match(p.name)))

    training = [(channel_files(task / "imagesTr", case), task / "labelsTr" / f"{case}{ending}")
                for case in cases_in(task / "imagesTr")]
    test = [channel_files(task / "imagesTs", case) for case in cases_in(task / "imagesTs")]
    return training, test


def _suffix(path: Path) -> str:
    return next((s for s in NIFTI_SUFFIXES if path.name.endswith(s)), "")


def _case_id(path: Path, channel_suffix: bool = False) -> str:
    stem = path.name[: -len(_suffix(path))] if _suffix(path) else path.name
    return re.sub(r"_\d{4}$", "", stem) if channel_suffix else stem


def _header(path: Path):
    import nibabel as nib  # lazy: `fedmeta import --help` loads no numpy

    return nib.load(path)


def _image_problems(images: list[Path], channels: dict[str, str], dataset_json: Path) -> list[str]:
    problems = []
    for path in images:
        if not path.is_file():
            return [f"{path}: listed in {dataset_json} but missing. Fix: extract the whole archive again (a partial "
                    "download or copy)."]
        if not path.name.endswith(NIFTI_SUFFIXES):
            return [f"{path}: not a NIfTI file (.nii.gz or .nii). Fix: convert it, or remove it from {dataset_json}."]
    try:
        shapes = [tuple(_header(p).shape) for p in images]
    except Exception as err:  # noqa: BLE001 - nibabel raises many kinds on a damaged file
        return [f"{images[0].parent}: an image listed in {dataset_json} is not a readable NIfTI file "
                f"({type(err).__name__}: {err}). Fix: download the task again."]
    n = len(channels)
    if len(images) > 1:  # one file per channel: each 3D, one grid
        if any(len(s) != 3 for s in shapes) or len(set(shapes)) > 1:
            return [f"{images[0]}: the channel files {[p.name for p in images]} have shapes {shapes}, not one 3D grid. "
                    "Fix: resample every channel onto the first channel's grid."]
        return []
    shape = shapes[0]
    if n == 1 and not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        return [f"{images[0]}: shape {shape}, but {dataset_json} declares one channel ({channels['0']}), so a 3D "
                "image. Fix: list every channel under 'modality', or give the 3D scan."]
    if n > 1 and not (len(shape) == 4 and shape[3] == n):
        return [f"{images[0]}: shape {shape}, but {dataset_json} declares {n} channels ({', '.join(channels.values())}) "
                f"that MSD stores as the 4th axis ([x, y, z, {n}]). Fix: give the 4D file of all channels, or correct "
                "'modality'."]
    return []


def _label_problems(label: Path, image: Path) -> list[str]:
    if not label.is_file():
        return [f"{label}: the label map of {image.name} is missing. Fix: extract the whole archive again."]
    try:
        shape, image_shape = tuple(_header(label).shape), tuple(_header(image).shape)
    except Exception as err:  # noqa: BLE001
        return [f"{label}: not a readable NIfTI file ({type(err).__name__}: {err}). Fix: download the task again."]
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if shape != image_shape[:3]:
        return [f"{label}: shape {shape}, its image {image.name} {image_shape[:3]}: not one grid. Fix: the label map "
                "must lie on its image's voxel grid."]
    return []


def _transfer(source: Path, target: Path, move: bool) -> None:
    if move:
        shutil.move(source, target)
    else:
        shutil.copyfile(source, target)


def _write_image(images: list[Path], folder: Path, case: str, move: bool) -> str:
    """The case's image in ``folder`` (one file as it is, or per-channel files stacked into a 4D one); its name."""
    if len(images) == 1:
        name = case + _suffix(images[0])
        _transfer(images[0], folder / name, move)
        return name
    import nibabel as nib
    import numpy as np

    first = nib.load(images[0])
    volumes = [np.asanyarray(nib.load(p).dataobj) for p in images]
    stacked = nib.Nifti1Image(np.stack(volumes, axis=-1), first.affine, first.header)
    name = f"{case}.nii.gz"
    nib.save(stacked, folder / name)
    return name


__all__ = ["import_msd"]
