"""Site data validation: find a site's cases and list every problem with each, before training sees it.

One code path serves ``fedmeta check-data`` and the reader (:mod:`fedmeta.common.data`): the reader loads each
case through :func:`check_case` and skips (or, strict, refuses) the cases with problems. Every message
names the file, the problem and the fix.

A site folder is either the Medical Segmentation Decathlon layout (``dataset.json`` listing
``training`` pairs and ``labels``), or any folder of paired files matched by an image glob and a label
glob (e.g. ``*_img.nii.gz`` / ``*_seg.nii.gz``), paired by the common stem.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

NIFTI_SUFFIXES = (".nii.gz", ".nii")
AFFINE_TOLERANCE_MM = 1e-3
# The largest volume a site loads: 2^28 voxels (a 512 x 512 x 1024 CT; 1 GiB as float32). A header
# declaring more is refused before a byte of data is read; FEDMETA_MAX_VOXELS raises the cap.
DEFAULT_MAX_VOXELS = 2**28
# DEFLATE cannot compress better than about 1032:1, so a .gz whose header declares more data than that
# times its size is lying about its contents (or is a decompression bomb): refuse it without inflating.
_MAX_DEFLATE_RATIO = 1032


def max_voxels() -> int:
    """The voxel cap: ``FEDMETA_MAX_VOXELS`` when set (a positive integer), else :data:`DEFAULT_MAX_VOXELS`."""
    raw = os.environ.get("FEDMETA_MAX_VOXELS", "").strip()
    if not raw:
        return DEFAULT_MAX_VOXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"FEDMETA_MAX_VOXELS={raw!r} is not a positive whole number of voxels; unset it or give "
                         f"one such as {DEFAULT_MAX_VOXELS}.")
    return value


@dataclass(frozen=True)
class Case:
    """One patient's image and label files."""

    case_id: str
    image: Path | None
    label: Path | None


@dataclass(frozen=True)
class CaseProblem:
    """Everything wrong with one case; ``problems`` are full messages (file, problem, fix)."""

    case_id: str
    problems: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.case_id}: " + "; ".join(self.problems)


@dataclass
class SiteLayout:
    """A site folder's cases and its declared labels (None when the folder declares none)."""

    root: Path
    name: str
    cases: list[Case]
    labels: dict[int, str] | None
    label_protocol: str = "standard"
    modality: str | None = None
    problems: list[CaseProblem] = field(default_factory=list)  # listed cases that cannot even be read
    # Files in imagesTr/ that dataset.json does not list: not cases of the site (its 'training' list is), but
    # probably meant to be, so every reader names them.
    unlisted: list[CaseProblem] = field(default_factory=list)

    @property
    def num_listed(self) -> int:
        """The site's cases: every pair its dataset.json lists (or its globs pair), readable or not."""
        return len(self.cases) + len(self.problems)


@dataclass
class LoadedCase:
    """A case that passed every check: float32 image and int64 label arrays, and the nibabel images."""

    case_id: str
    image: object  # nibabel image (header and affine kept for reorientation)
    label: object
    image_data: np.ndarray
    label_data: np.ndarray


@dataclass
class SiteReport:
    """The outcome of checking one site."""

    root: Path
    name: str
    num_cases: int  # listed in dataset.json (or paired by the globs)
    case_problems: list[CaseProblem]
    site_problems: list[str]
    warnings: list[str] = field(default_factory=list)  # usable, but worth a look (e.g. a volume too thin)
    num_valid: int = 0  # of num_cases, those that pass every check: what training and adapt use
    unlisted: list[CaseProblem] = field(default_factory=list)  # files not listed, so not used

    @property
    def ok(self) -> bool:
        return not self.case_problems and not self.site_problems and not self.unlisted


def _strip_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_site_folder(path: Path) -> bool:
    return (path / "dataset.json").is_file() or (path / "imagesTr").is_dir()


def discover_site(root: Path | str, image_glob: str | None = None, label_glob: str | None = None) -> SiteLayout:
    """Find a site's cases: from its ``dataset.json``, or by pairing ``image_glob`` and ``label_glob`` files."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"site folder {root} does not exist; pass the folder that holds dataset.json.")
    if (image_glob is None) != (label_glob is None):
        raise ValueError(
            f"image_glob={image_glob!r} and label_glob={label_glob!r}: give both (e.g. '*_img.nii.gz' and "
            "'*_seg.nii.gz') or neither (an MSD folder with dataset.json)."
        )
    if image_glob is not None:
        return _discover_by_glob(root, image_glob, label_glob)
    dataset_json = root / "dataset.json"
    if not dataset_json.is_file():
        raise FileNotFoundError(
            f"{dataset_json} does not exist: {root} is neither a Medical Segmentation Decathlon folder "
            "(dataset.json, imagesTr/, labelsTr/) nor given file patterns. Add a dataset.json, or pass "
            "image_glob/label_glob (fedmeta check-data --image-glob '*_img.nii.gz' --label-glob '*_seg.nii.gz')."
        )
    try:
        meta = json.loads(dataset_json.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{dataset_json} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start} "
                         "is not valid UTF-8; JSON must be UTF-8). Fix: save the file as UTF-8, e.g. "
                         f"`iconv -f latin1 -t utf-8`.") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{dataset_json} is not valid JSON ({err}); fix or regenerate the file.") from err
    try:
        labels = {int(k): str(v) for k, v in meta["labels"].items()}
        entries = meta["training"]
    except (KeyError, AttributeError, ValueError, TypeError) as err:
        raise ValueError(
            f"{dataset_json} lacks a usable 'labels' mapping (value -> name, e.g. {{\"0\": \"background\"}}) or "
            f"'training' list of {{\"image\", \"label\"}} pairs ({type(err).__name__}: {err}); add them."
        ) from err
    modality = meta.get("modality", {})
    layout = SiteLayout(root=root, name=str(meta.get("name") or root.name), cases=[], labels=labels,
                        label_protocol=str(meta.get("label_protocol", "standard")),
                        modality=str(modality.get("0")) if isinstance(modality, dict) and modality else None)
    if not isinstance(entries, list):
        raise ValueError(f"{dataset_json}: 'training' is {type(entries).__name__}, not a list of "
                         "{\"image\", \"label\"} pairs; fix the file.")
    listed_images = set()
    inside = root.resolve()
    listed: dict[str, dict[Any, list[tuple[int, str]]]] = {"image": {}, "label": {}}  # one file -> its entries
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), (str, type(None))) for k in ("image", "label")):
            raise ValueError(f"{dataset_json}: 'training'[{index}] is {entry!r}, not an {{\"image\": path, \"label\": "
                             "path}} pair of relative paths; fix that entry.")
        image = root / entry["image"] if entry.get("image") else None
        label = root / entry["label"] if entry.get("label") else None
        case_id = _strip_suffix((image or label).name) if (image or label) else "?"
        escaped = [problem for problem in (_outside_site(path, inside, dataset_json) for path in (image, label)) if problem]
        if escaped:  # never read: a dataset.json must not make the site read files beyond its folder
            layout.problems.append(CaseProblem(case_id, tuple(escaped)))
            listed_images.add(image.absolute() if image else None)  # listed, if refused: not "unlisted" too
            continue
        listed_images.add(image.resolve() if image else None)
        for role, path in (("image", image), ("label", label)):
            if path is not None:
                listed[role].setdefault(_file_identity(path), []).append((index, entry[role]))
        layout.cases.append(Case(case_id, image, label))
    if problem := _listed_twice(dataset_json, listed):
        raise ValueError(problem)
    # Files a hospital copied in but never listed are probably meant to be used: say so.
    images_dir = root / "imagesTr"
    if images_dir.is_dir():
        for path in sorted(images_dir.iterdir()):
            if path.name.startswith(".") or not (path.name.endswith(NIFTI_SUFFIXES) or path.is_dir()):
                continue
            try:
                resolved = path.resolve()
            except (RuntimeError, OSError) as err:  # Python 3.11: RuntimeError("Symlink loop from ...")
                layout.unlisted.append(CaseProblem(_strip_suffix(path.name), (
                    f"{path}: cannot be resolved ({err}): a loop of symbolic links, so it is not read. Fix: "
                    f"remove the link, or replace it by the scan itself.",)))
                continue
            if resolved not in listed_images and path.absolute() not in listed_images:
                layout.unlisted.append(CaseProblem(_strip_suffix(path.name), (
                    f"{path}: image is not listed in {dataset_json}'s 'training' list, so it is ignored (the list "
                    "is the site's cases). Fix: add an {\"image\", \"label\"} entry for it, or remove the file.",)))
    return layout


def _file_identity(path: Path) -> Path | tuple[int, int]:
    """What makes two entries one file: its inode (hard links and every spelling of its path share it), or its
    resolved path where it cannot be read (a missing file; the case check names that)."""
    try:
        found = path.stat()
    except (OSError, RuntimeError):
        return path.resolve() if not path.is_symlink() else path.absolute()
    return found.st_dev, found.st_ino


def _listed_twice(dataset_json: Path, listed: dict[str, dict[Any, list[tuple[int, str]]]]) -> str | None:
    """Why ``dataset.json`` must be fixed before the site is read: a file (after resolving ``./``, ``//``, ``..`` and
    symbolic links) that several 'training' entries list, or None. A patient listed twice counts twice, and may be
    the support patient and a held-out patient at once, so the held-out Dice would score the support scan itself;
    one label for two images pairs a scan with another patient's annotation."""
    repeats = []
    for role, by_file in listed.items():
        for identity, entries in by_file.items():
            if len(entries) > 1:
                spelled = ", ".join(f"[{index}] {text!r}" for index, text in entries)
                shown = (dataset_json.parent / entries[0][1]).resolve()
                repeats.append(f"the {role} {shown} is listed by {len(entries)} entries ({spelled}"
                               f"{'; hard links to one file' if isinstance(identity, tuple) else ''})")
    if not repeats:
        return None
    return (f"{dataset_json}: its 'training' list names one file more than once: {'; '.join(repeats)}. Each entry must "
            "be a different patient: a patient listed twice counts twice and can be both the support and a held-out "
            "patient, so its Dice would score the scan it adapted on. Fix: keep one entry per patient (and one label "
            "per image) and remove the others.")


def _outside_site(path: Path | None, inside: Path, dataset_json: Path) -> str | None:
    """Why ``path`` may not be read as part of the site (a symlink loop, or it resolves outside the site
    folder: ``../`` or a symlink), or None. ``FEDMETA_ALLOW_PATHS_OUTSIDE_SITE=1`` allows the latter."""
    if path is None:
        return None
    try:
        resolved = path.resolve(strict=False)
    except (RuntimeError, OSError) as err:  # Python 3.11: RuntimeError("Symlink loop from ...")
        return (f"{path}: cannot be resolved ({err}); a symlink loop. Fix: point the entry in {dataset_json} at "
                "the file itself.")
    if resolved != inside and inside not in resolved.parents and os.environ.get("FEDMETA_ALLOW_PATHS_OUTSIDE_SITE") != "1":
        return (f"{path}: resolves to {resolved}, outside the site folder {inside} (a '../' path or a symlink), so it "
                f"is not read. Fix: copy the file into the site folder and list it in {dataset_json} by a relative path, "
                "or set FEDMETA_ALLOW_PATHS_OUTSIDE_SITE=1 if the site keeps its data elsewhere on purpose.")
    return None


def _discover_by_glob(root: Path, image_glob: str, label_glob: str) -> SiteLayout:
    def stems(pattern: str) -> dict[str, Path]:
        # The stem is what the wildcard matched: '*_img.nii.gz' on 'p01_img.nii.gz' gives 'p01'.
        prefix, _, suffix = pattern.partition("*")
        found = {}
        if "/" in pattern:
            # A pattern with folders ('imagesTr/*.nii.gz') is anchored at the site folder, and the
            # wildcard alone pairs an image with its label across folders.
            for path in sorted(root.glob(pattern)):
                relative = path.relative_to(root).as_posix()
                found[relative[len(prefix) : len(relative) - len(suffix)]] = path
            return found
        # A file-name pattern is searched at any depth; cases pair within one folder (one per patient).
        for path in sorted(root.rglob(pattern)):
            name = path.name
            stem = name[len(prefix) : len(name) - len(suffix)] if suffix else name[len(prefix) :]
            found[str(path.parent.relative_to(root) / stem)] = path
        return found

    if image_glob.count("*") != 1 or label_glob.count("*") != 1:
        raise ValueError(
            f"image_glob={image_glob!r} and label_glob={label_glob!r} must each hold exactly one '*', which "
            "matches the case id shared by an image and its label (e.g. '*_img.nii.gz', '*_seg.nii.gz')."
        )
    images, labels = stems(image_glob), stems(label_glob)
    if not images and not labels:
        raise FileNotFoundError(
            f"no file in {root} matches {image_glob!r} or {label_glob!r}; check the patterns and the folder."
        )
    layout = SiteLayout(root=root, name=root.name, cases=[], labels=None)
    for stem in sorted(set(images) | set(labels)):
        layout.cases.append(Case(stem.replace("/", "_"), images.get(stem), labels.get(stem)))
    # Two names for one file (a symbolic link to another case) would count one patient twice, as in dataset.json.
    for role, found in (("image", images), ("label", labels)):
        by_file: dict[Any, list[str]] = {}
        for path in found.values():
            try:
                by_file.setdefault(_file_identity(path), []).append(str(path))
            except (RuntimeError, OSError):  # a symlink loop: check_case names it
                continue
        repeats = {identity: names for identity, names in by_file.items() if len(names) > 1}
        if repeats:
            names = next(iter(repeats.values()))
            resolved = Path(names[0]).resolve()
            raise ValueError(f"{root}: {len(names)} {role} files matched by {image_glob if role == 'image' else label_glob!r} "
                             f"are one file, {resolved} ({', '.join(names)}): a symbolic or hard link makes one patient count "
                             "twice, and be both the support and a held-out patient. Fix: remove the links so each "
                             "patient's file appears once.")
    return layout


def _load_nifti(path: Path, role: str) -> tuple[object | None, np.ndarray | None, str | None]:
    import nibabel as nib

    if path.is_dir():  # a DICOM series: one folder per scan
        from fedmeta.common.dicom import SeriesProblem, read_series

        try:
            image, data = read_series(path, max_voxels=max_voxels())
        except SeriesProblem as err:
            return None, None, str(err)
        return image, data, None
    if path.is_symlink() and not path.exists():  # exists() follows the link: False for a dangling one or a loop
        return None, None, (
            f"{path}: the {role} is a symbolic link to {os.readlink(path)!r}, which leads nowhere (a missing file or "
            f"a loop of links). Fix: replace the link by the {role} file itself."
        )
    if not path.is_file():
        return None, None, (
            f"{path}: the {role} file of this case is missing. Fix: add the {role}, or drop the case from "
            "dataset.json."
        )
    max_voxels()  # a bad FEDMETA_MAX_VOXELS is the operator's error, not this file's: raise it as such
    try:
        image = nib.load(str(path))  # reads the header only: the data stays on disk until asked for
        problem = _declared_size_problem(path, image) or dtype_problem(path, image.get_data_dtype(), role)
        if problem:
            return None, None, problem
        data = np.asanyarray(image.dataobj)
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as err:
        reason = f"{type(err).__name__}: {err}"
        if _looks_truncated(err, path):
            return None, None, (
                f"{path}: the file is truncated: it ends before the data its header announces ({reason}). "
                "Fix: copy or export it again; the transfer or export was cut short."
            )
        return None, None, (
            f"{path}: cannot be read as NIfTI ({reason}); the file is corrupt or another format. Fix: export it "
            "again from the source scan as NIfTI (.nii.gz)."
        )
    return image, data, None


def dtype_problem(path: Path, dtype, role: str) -> str | None:
    """Why voxels of ``dtype`` are not a grey-level scan or a label map — colour (RGB/RGBA records), complex
    (the imaginary part would be dropped without a word) or not numbers at all — or None."""
    dtype = np.dtype(dtype)
    if dtype.fields:
        return (f"{path}: the {role} is a colour image (NIfTI data type {dtype.descr}, "
                f"{'/'.join(dtype.names)} per voxel), not a grey-level {'scan' if role == 'image' else 'label map'}. "
                f"Fix: export the {role} as one grey-level channel (e.g. the source series, not a screenshot or a "
                "rendered overlay).")
    if dtype.kind == "c":
        return (f"{path}: the {role} holds complex numbers ({dtype}); fedmeta would have to drop the imaginary part, "
                f"and the magnitude or phase is not its to choose. Fix: export the magnitude image (real-valued), "
                "e.g. numpy.abs of the data, as float32.")
    if dtype.kind not in "biuf":
        return (f"{path}: the {role} holds {dtype} values, not numbers a scan or label map is made of. Fix: export "
                "it as a real-valued (integer or float) NIfTI.")
    return None


def _declared_size_problem(path: Path, image) -> str | None:
    """What is wrong with the data size a NIfTI header declares, checked from the header and the file's
    size alone (milliseconds, nothing allocated): beyond the voxel cap, more than the file can hold
    (uncompressed), or more than DEFLATE could have packed into it (compressed)."""
    shape = tuple(int(n) for n in image.shape)
    voxels = 1
    for n in shape:
        voxels *= max(n, 0)
    cap = max_voxels()
    if voxels > cap:
        return (f"{path}: its header declares {' x '.join(map(str, shape))} = {voxels:,} voxels, more than the "
                f"{cap:,} a site loads; a real scan of this size is unusual and a damaged header is likely. Fix: "
                "export the scan again, crop or resample it, or raise FEDMETA_MAX_VOXELS if it is genuine.")
    header = image.header
    offset = int(header.get_data_offset()) if hasattr(header, "get_data_offset") else 352
    needed = offset + voxels * header.get_data_dtype().itemsize
    size = path.stat().st_size
    truncated = (f"{path}: the file is truncated: its header declares {' x '.join(map(str, shape))} "
                 f"{header.get_data_dtype()} ({needed:,} bytes with the header) but the file holds {{}}. Fix: copy or "
                 "export it again; the transfer or export was cut short.")
    if not path.name.endswith(".gz"):
        return truncated.format(f"{size:,} bytes") if size < needed else None
    if needed > _MAX_DEFLATE_RATIO * size + 1024:
        return (f"{path}: its header declares {' x '.join(map(str, shape))} {header.get_data_dtype()} ({needed:,} "
                f"bytes) but the file holds {size:,} compressed bytes, which cannot inflate to that much (DEFLATE "
                "packs at most ~1032:1): the header is damaged or the file cut short. Fix: export the scan again.")
    # Not the gzip trailer's size: a multi-member file (bgzip) records only its last member there. A
    # truncated stream within these bounds fails in nibabel's reader, having allocated at most the cap.
    return None


def _looks_truncated(err: BaseException, path: Path) -> bool:
    """Tell a file cut short (a broken copy) from one that is not NIfTI at all."""
    text = str(err).lower()
    if isinstance(err, EOFError) or "end-of-stream" in text or ("expected" in text and "bytes" in text):
        return True
    if path.name.endswith(".gz"):
        # A gzip stream cut inside the NIfTI header makes nibabel say only "cannot work out file type".
        try:
            with gzip.open(path, "rb") as stream:
                while stream.read(1 << 20):
                    pass
        except EOFError:
            return True
        except (OSError, zlib.error):
            return False
        return False
    return path.stat().st_size < 352  # shorter than a NIfTI-1 header


def _dimensions_problem(path: Path, shape: tuple[int, ...], what: str) -> str:
    colour = (" Its last axis of 3 or 4 looks like colour channels (RGB/RGBA): a screenshot or a rendered image, "
              "not the scan." if len(shape) > 3 and shape[-1] in (3, 4) else "")
    return (f"{path}: {what} has {len(shape)} dimensions (shape {tuple(shape)}), expected a 3D volume.{colour} Fix: "
            "export one 3D grey-level volume per file (split multi-channel or time series, stack 2D slices).")


def uniform_problem(path: Path, data: np.ndarray) -> str | None:
    """A scan whose voxels all hold one value has no contrast: nothing to learn from, nothing to segment."""
    if data.size and float(data.max()) == float(data.min()):
        return (f"{path}: every voxel of the image is {float(data.flat[0]):g} (a uniform volume, no contrast), so "
                "there is nothing to segment and any mask of it would be noise. Fix: export the scan again; an "
                "all-zero volume is usually a failed or blanked export.")
    return None


def check_case(case: Case, allowed_labels: set[int] | None, num_classes: int) -> tuple[list[str], LoadedCase | None]:
    """Every problem with one case, and the loaded case when there is none.

    ``allowed_labels``: the label values the site declares (dataset.json), or None for any value below
    ``num_classes``, the model's class count.
    """
    problems: list[str] = []
    if case.image is None or case.label is None:
        present = case.image or case.label
        missing = "label" if case.label is None else "image"
        return [f"{present}: has no {missing} partner. Fix: add the {missing} file for case {case.case_id!r}, "
                "or remove this file."], None
    image, image_data, error = _load_nifti(case.image, "image")
    if error:
        problems.append(error)
    label, label_data, error = _load_nifti(case.label, "label")
    if error:
        problems.append(error)
    if image is None or label is None:
        return problems, None

    # A 4D file with one volume is a 3D scan written by some converters; more volumes are not.
    if image_data.ndim == 4 and image_data.shape[3] == 1:
        image_data = image_data[..., 0]
    if label_data.ndim == 4 and label_data.shape[3] == 1:
        label_data = label_data[..., 0]
    for path, data, role in ((case.image, image_data, "image"), (case.label, label_data, "label")):
        if data.ndim != 3:
            problems.append(_dimensions_problem(path, data.shape, f"the {role}"))
    if problems:
        return problems, None

    if image_data.shape != label_data.shape:
        problems.append(
            f"{case.label}: label shape {tuple(label_data.shape)} differs from image shape "
            f"{tuple(image_data.shape)} ({case.image.name}). Fix: the label must be drawn on the image's own voxel grid; "
            "resample it onto the image."
        )
    singular = False
    for path, header_of in ((case.image, image), (case.label, label)):
        problem = affine_problem(path, header_of.affine, image_data.shape)
        if problem:
            singular = True
            problems.append(problem)
    if singular:  # the reorientation and resampling below would raise on it, or blow up
        return problems, None
    if not np.allclose(image.affine, label.affine, atol=AFFINE_TOLERANCE_MM):
        problems.append(
            f"{case.label}: affine differs from the image's ({case.image.name}) by up to "
            f"{np.abs(image.affine - label.affine).max():.3g} mm, so label and image do not overlay. Fix: write the "
            "label with the image's header (affine, qform and sform)."
        )
    image_data = np.asarray(image_data, dtype=np.float32)
    finite = np.isfinite(image_data)
    if not finite.all():
        problems.append(
            f"{case.image}: {int((~finite).sum())} voxels are NaN or Inf. Fix: re-export the scan, or replace them "
            "(e.g. by 0) before use."
        )
    elif problem := uniform_problem(case.image, image_data):
        problems.append(problem)
    if np.issubdtype(label_data.dtype, np.integer):
        rounded = np.asarray(label_data, dtype=np.int64)
    else:
        label_float = np.asarray(label_data, dtype=np.float64)
        if not np.isfinite(label_float).all():
            problems.append(f"{case.label}: label holds NaN or Inf. Fix: export the label as an integer map.")
            return problems, None
        rounded = np.rint(label_float)
        if not np.array_equal(rounded, label_float):
            problems.append(
                f"{case.label}: label holds non-integer values (e.g. {label_float[rounded != label_float].flat[0]:g}); "
                "it looks like an interpolated or probability map. Fix: export the label map with nearest-neighbour "
                "resampling, integer values only."
            )
            return problems, None
        rounded = rounded.astype(np.int64)
    low, high = int(rounded.min()), int(rounded.max())
    if low >= 0 and high < 1 << 16:  # bincount is ~10x faster than np.unique's sort on a volume
        values = set(np.flatnonzero(np.bincount(rounded.ravel())).tolist())
    else:
        values = set(int(v) for v in np.unique(rounded))
    allowed = allowed_labels if allowed_labels is not None else set(range(num_classes))
    outside = sorted(values - allowed)
    if outside:
        where = "its dataset.json 'labels'" if allowed_labels is not None else f"the model's {num_classes} classes"
        problems.append(
            f"{case.label}: label values {outside} are outside {where} {sorted(allowed)}. Fix: map them onto the "
            "declared labels (or declare them in dataset.json if the model has room for them)."
        )
    if values <= {0}:
        problems.append(
            f"{case.label}: the label is empty (background only), so it teaches nothing. Fix: add the "
            "annotation, or remove the case."
        )
    if problems:
        return problems, None
    return [], LoadedCase(case.case_id, image, label, image_data, rounded)


# Voxel sizes a scan can have (mm): beyond them the header is damaged, and resampling to the model's spacing
# would make a volume of no use (or of tens of GB: 32^3 voxels of 100 mm are 1067^3 at 3 mm).
VOXEL_MM_RANGE = (0.01, 20.0)


def affine_problem(path: Path, affine, shape: tuple[int, ...]) -> str | None:
    """What is wrong with a scan's affine — not finite, axes parallel (no orientation), voxel sizes outside
    :data:`VOXEL_MM_RANGE`, or a physical extent resampling would turn into more voxels than the cap — or None."""
    spatial = np.asarray(affine, dtype=np.float64)[:3, :3]
    if not np.isfinite(spatial).all():
        return (f"{path}: its affine is not finite, so the scan has no orientation or spacing. Fix: export it again "
                "with its header (qform/sform).")
    zooms = np.sqrt((spatial ** 2).sum(axis=0))
    if zooms.min() <= 0 or abs(np.linalg.det(spatial)) < 1e-6 * float(np.prod(zooms)):
        return (f"{path}: its affine is singular (voxel axes {spatial.round(4).tolist()}), so the scan has no "
                "orientation. Fix: export it again with its header (qform/sform), or repair the header with the "
                "scan's real voxel spacing and orientation.")
    low, high = VOXEL_MM_RANGE
    if zooms.min() < low or zooms.max() > high:
        return (f"{path}: its voxel sizes {np.round(zooms, 4).tolist()} mm are outside {low:g}-{high:g} mm: the header is "
                "damaged (a real scan's voxels are sub-millimetre to a few mm). Fix: export the scan again, or repair the "
                "header's voxel sizes.")
    extent = np.asarray(shape[:3], dtype=np.float64) * zooms
    if float(np.prod(np.maximum(extent, 1.0))) > max_voxels():  # at 1 mm, finer than any model's spacing here
        return (f"{path}: it spans {' x '.join(f'{e:.0f}' for e in extent)} mm, more than {max_voxels():,} voxels at "
                "1 mm; the header is damaged or the scan is not of a patient. Fix: export the scan again.")
    return None


def check_scan(path: Path, *, min_slices: int = 1) -> tuple[list[str], object | None, np.ndarray | None]:
    """An unlabelled scan to segment: (problems, nibabel image, float32 data). The checks ``check_case``
    applies to an image: the header's size against the file and the voxel cap before any data is read,
    one 3D volume of real numbers, an invertible finite affine, finite intensities that are not all one value, and at least ``min_slices`` voxels
    along every axis (a volume thinner than that is not a scan the model can segment)."""
    image, data, error = _load_nifti(Path(path), "image")
    if error:
        return [error], None, None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        return [_dimensions_problem(path, data.shape, "it")], None, None
    problem = affine_problem(Path(path), image.affine, data.shape)
    if problem:
        return [problem], None, None
    if min(data.shape) < min_slices:
        return [f"{path}: the volume is {' x '.join(map(str, data.shape))} voxels, thinner than {min_slices} along one "
                "axis: a localiser or a single slice, not a scan the model can segment. Fix: pass the full 3D "
                "series."], None, None
    data = np.asarray(data, dtype=np.float32)
    finite = np.isfinite(data)
    if not finite.all():
        return [f"{path}: {int((~finite).sum())} voxels are NaN or Inf. Fix: re-export the scan, or replace them "
                "(e.g. by 0) before use."], None, None
    problem = uniform_problem(Path(path), data)
    if problem:
        return [problem], None, None
    return [], image, data


def check_site(root: Path | str, *, num_classes: int = 4, k: int | None = None, q: int | None = None,
               image_glob: str | None = None, label_glob: str | None = None) -> SiteReport:
    """Check every case of one site, and that enough remain for k-shot episodes."""
    layout = discover_site(root, image_glob, label_glob)
    return check_layout(layout, num_classes=num_classes, k=k, q=q)


def check_layout(layout: SiteLayout, *, num_classes: int = 4, k: int | None = None, q: int | None = None) -> SiteReport:
    site_problems: list[str] = []
    allowed = set(layout.labels) if layout.labels is not None else None
    if allowed is not None and (bad := sorted(v for v in allowed if not 0 <= v < num_classes)):
        site_problems.append(
            f"{layout.root / 'dataset.json'}: declares label values {bad}, which the model's {num_classes} classes "
            f"(0..{num_classes - 1}) cannot predict. Fix: map them onto 0..{num_classes - 1} or configure more classes."
        )
    case_problems = list(layout.problems)
    valid, notes = 0, []
    if not layout.num_listed and layout.labels is not None:
        site_problems.append(f"{layout.root / 'dataset.json'}: its 'training' list is empty, so the site has no case. "
                             "Fix: list each case as {\"image\": \"./imagesTr/...\", \"label\": \"./labelsTr/...\"}.")
    for case in layout.cases:
        problems, loaded = check_case(case, allowed, num_classes)
        if problems:
            case_problems.append(CaseProblem(case.case_id, tuple(problems)))
        else:
            valid += 1
            note = thin_volume_warning(case.image, loaded.image_data.shape, loaded.image.affine)
            if note:
                notes.append(note)
    site_problems.extend(episode_problems(layout.root, valid, k, q))
    return SiteReport(root=layout.root, name=layout.name, num_cases=layout.num_listed, case_problems=case_problems,
                      site_problems=site_problems, warnings=notes, num_valid=valid, unlisted=list(layout.unlisted))


# A volume thinner than this (voxels, or millimetres) along an axis is a localiser or a slab: it loads, but
# holds a slice or two of anatomy, which the site's patient count and Dice then overstate.
THIN_VOXELS, THIN_MM = 3, 10.0


def thin_volume_warning(path: Path, shape: tuple[int, ...], affine) -> str | None:
    """A warning naming ``path`` when its volume is too thin along some axis to be a scan, else None."""
    zooms = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    extent = [n * z for n, z in zip(shape, zooms)]
    thin = [axis for axis in range(3) if shape[axis] < THIN_VOXELS or extent[axis] < THIN_MM]
    if not thin:
        return None
    axis = thin[0]
    return (f"{path}: the volume is only {shape[axis]} voxel(s), {extent[axis]:.1f} mm, along axis {axis} "
            f"(shape {' x '.join(map(str, shape))}): a localiser or a slab, not a whole scan; it is used, but gives "
            "the model a slice or two. Fix: export the full series, or drop the case.")


def episode_problems(root: Path, num_valid: int, k: int | None, q: int | None) -> list[str]:
    """Support and query come from different patients, so an episode needs two usable patients."""
    if num_valid >= 2:
        return []
    shots = f" for {k}-shot support and {q} query slices" if k is not None and q is not None else ""
    return [
        f"{root}: only {num_valid} usable patient(s){shots}; support and query sets must come from different "
        "patients, so a site needs at least 2. Fix: add patients, or repair the cases listed above."
    ]


def check_path(path: Path | str, *, num_classes: int = 4, k: int | None = None, q: int | None = None,
               image_glob: str | None = None, label_glob: str | None = None) -> list[SiteReport]:
    """Check one site folder, or every site of a federation root (a folder of site folders)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist or is not a folder; pass a site folder or a federation root.")
    if image_glob is not None or is_site_folder(path):
        return [check_site(path, num_classes=num_classes, k=k, q=q, image_glob=image_glob, label_glob=label_glob)]
    sites = sorted(p for p in path.iterdir() if p.is_dir() and is_site_folder(p))
    if not sites and (path / "manifest.json").is_file():
        raise FileNotFoundError(
            f"{path} is a lazy synthetic federation none of whose sites is rendered yet (each is rendered when first "
            "used). Render them with `fedmeta synth --preset PRESET --out DIR --all-sites`, or check one site folder "
            "after a run has used it."
        )
    if not sites:
        raise FileNotFoundError(
            f"{path} holds no site: neither a dataset.json here nor site folders with one below. Pass an MSD site "
            "folder, a federation root (fedmeta synth --out DIR), or --image-glob/--label-glob for other layouts."
        )
    return [check_site(site, num_classes=num_classes, k=k, q=q) for site in sites]


def format_reports(reports: list[SiteReport]) -> str:
    lines = []
    for report in reports:
        status = "ok" if report.ok else "PROBLEMS"
        ignored = f"; {len(report.unlisted)} unlisted file(s) ignored" if report.unlisted else ""
        lines.append(f"{report.name} ({report.root}): {report.num_valid}/{report.num_cases} cases usable{ignored} - "
                     f"{status}")
        for problem in report.case_problems + report.unlisted:
            lines.append(f"  case {problem.case_id}:")
            lines.extend(f"    - {message}" for message in problem.problems)
        lines.extend(f"  - {message}" for message in report.site_problems)
        lines.extend(f"  warning: {message}" for message in report.warnings)
    return "\n".join(lines)
