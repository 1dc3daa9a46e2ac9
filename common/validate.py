"""Site data validation: find a site's cases and list every problem with each, before training sees it.

One code path serves ``fedmeta check-data`` and the reader (:mod:`fedmeta.common.data`): the reader loads each
case through :func:`check_case` and skips (or, strict, refuses) the cases with problems. Every message
names the file, the problem and the fix.

A site folder is either the Medical Segmentation Decathlon layout (``dataset.json`` listing
``training`` pairs and ``labels``), or any folder of paired files matched by an image glob and a label
glob (e.g. ``*_img.nii.gz`` / ``*_seg.nii.gz``), paired by the common stem.

Finding the cases is :mod:`fedmeta.common.site_layout`'s, reading one volume and its own checks
:mod:`fedmeta.common.volume_checks`'s; their names are importable from here too. What a site may read
(the voxel cap, files outside the site folder) is a :class:`ReadLimits` argument: the checks read no
environment variable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedmeta.common.read_limits import DEFAULT_MAX_VOXELS, ReadLimits
from fedmeta.common.site_layout import (
    NIFTI_SUFFIXES, Case, CaseProblem, SiteLayout, channel_order, discover_site, is_site_folder,
)
from fedmeta.common.volume_checks import (
    VOXEL_MM_RANGE, _dimensions_problem, _load_nifti, _non_finite_problem, affine_problem, check_scan, dtype_problem,
    ras_grid, uniform_problem,
)

AFFINE_TOLERANCE_MM = 1e-3


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


def check_case(case: Case, allowed_labels: set[int] | None, num_classes: int, *,
               limits: ReadLimits = ReadLimits(), channels: tuple[str, ...] = ()) -> tuple[list[str], LoadedCase | None]:
    """Every problem with one case, and the loaded case when there is none.

    ``allowed_labels``: the label values the site declares (dataset.json), or None for any value below
    ``num_classes``, the model's class count. ``limits``: the voxel cap both files are read within.
    ``channels``: the image channels the site declares (:attr:`SiteLayout.channels`); with more than one, the
    image is 4D with one volume per channel (MSD's BrainTumour, Prostate) and loads as ``[X, Y, Z, C]``.
    """
    if case.image is None or case.label is None:
        present = case.image or case.label
        missing = "label" if case.label is None else "image"
        return [f"{present}: has no {missing} partner. Fix: add the {missing} file for case {case.case_id!r}, "
                "or remove this file."], None
    problems, volumes = _read_pair(case, limits, channels)
    if volumes is None:
        return problems, None
    image, image_data, label, label_data = volumes
    singular = _grid_problems(case, image, label, image_data.shape[:3], label_data.shape, limits, problems)
    if singular:  # the reorientation and resampling below would raise on it, or blow up
        return problems, None
    image_data = np.asarray(image_data, dtype=np.float32)
    if problem := _non_finite_problem(case.image, image_data):
        if image_data.ndim == 4:  # which channel: a site fixes one sequence's export, not the case
            bad = [f"{index} ({name})" for index, name in enumerate(channels)
                   if not np.isfinite(image_data[..., index]).all()]
            problem = problem.replace("voxels are NaN or Inf", f"voxels of channel {', '.join(bad)} are NaN or Inf")
        problems.append(problem)
    elif image_data.ndim == 3:
        if problem := uniform_problem(case.image, image_data):
            problems.append(problem)
    else:  # a channel with no contrast is as useless as a blank scan, whatever the other channels hold
        for index, name in enumerate(channels):
            if problem := uniform_problem(case.image, image_data[..., index]):
                problems.append(problem.replace("every voxel of the image", f"every voxel of channel {index} ({name})"))
    rounded = _integer_labels(case.label, label_data, problems)
    if rounded is None:
        return problems, None
    problems.extend(_label_value_problems(case.label, rounded, allowed_labels, num_classes))
    if problems:
        return problems, None
    return [], LoadedCase(case.case_id, image, label, image_data, rounded)


def _read_pair(case: Case, limits: ReadLimits, channels: tuple[str, ...] = ()) -> tuple[list[str], tuple | None]:
    """The case's (problems, (image, image data, label, label data)): the label read as one 3D volume, the image as
    one 3D volume or (``channels`` declares more than one) one 4D volume per channel; or the problems and None."""
    problems: list[str] = []
    image, image_data, error = _load_nifti(case.image, "image", limits)
    if error:
        problems.append(error)
    label, label_data, error = _load_nifti(case.label, "label", limits)
    if error:
        problems.append(error)
    if image is None or label is None:
        return problems, None

    # A 4D file with one volume is a 3D scan written by some converters; more volumes are not.
    if image_data.ndim == 4 and image_data.shape[3] == 1:
        image_data = image_data[..., 0]
    if label_data.ndim == 4 and label_data.shape[3] == 1:
        label_data = label_data[..., 0]
    if len(channels) > 1:
        if problem := channels_problem(case.image, image_data.shape, channels):
            problems.append(problem)
    elif image_data.ndim != 3:
        problems.append(_dimensions_problem(case.image, image_data.shape, "the image")
                        + (" If the volumes are channels (e.g. T2 and ADC), name each in dataset.json's 'modality' "
                           "({\"0\": \"T2\", \"1\": \"ADC\"})." if image_data.ndim == 4 else ""))
    if label_data.ndim != 3:
        problems.append(_dimensions_problem(case.label, label_data.shape, "the label"))
    if problems:
        return problems, None
    return problems, (image, image_data, label, label_data)


def channels_problem(path: Path, shape: tuple[int, ...], channels: tuple[str, ...]) -> str | None:
    """Why an image of ``shape`` is not one volume per declared channel (4D, channels last), or None."""
    if len(shape) == 4 and shape[3] == len(channels):
        return None
    held = f"{shape[3]} volumes" if len(shape) == 4 else f"{len(shape)} dimensions (shape {tuple(shape)})"
    return (f"{path}: dataset.json declares {len(channels)} channels ({', '.join(channels)}), but the image holds {held}, "
            f"not a 4D volume of {len(channels)} channels (shape X x Y x Z x {len(channels)}). Fix: write every case "
            "with all its channels in dataset.json's order (`fedmeta import msd` stacks nnU-Net's per-channel "
            "files), or correct dataset.json's 'modality'.")


def _grid_problems(case: Case, image, label, image_shape: tuple[int, ...], label_shape: tuple[int, ...],
                   limits: ReadLimits, problems: list[str]) -> bool:
    """Appends to ``problems`` what keeps the label from overlaying the image (another shape, a broken or another
    affine); returns whether an affine is singular (nothing more can be checked)."""
    if image_shape != label_shape:
        problems.append(
            f"{case.label}: label shape {tuple(label_shape)} differs from image shape "
            f"{tuple(image_shape)} ({case.image.name}). Fix: the label must be drawn on the image's own voxel grid; "
            "resample it onto the image."
        )
    singular = False
    for path, header_of in ((case.image, image), (case.label, label)):
        problem = affine_problem(path, header_of.affine, image_shape, max_voxels=limits.max_voxels)
        if problem:
            singular = True
            problems.append(problem)
    if singular:
        return True
    if not np.allclose(image.affine, label.affine, atol=AFFINE_TOLERANCE_MM):
        problems.append(
            f"{case.label}: affine differs from the image's ({case.image.name}) by up to "
            f"{np.abs(image.affine - label.affine).max():.3g} mm, so label and image do not overlay. Fix: write the "
            "label with the image's header (affine, qform and sform)."
        )
    return False


def _integer_labels(path: Path, label_data: np.ndarray, problems: list[str]) -> np.ndarray | None:
    """The label map as int64, or None (the reason appended to ``problems``) when it holds NaN, Inf or
    non-integer values."""
    if np.issubdtype(label_data.dtype, np.integer):
        rounded = np.asarray(label_data, dtype=np.int64)
    else:
        label_float = np.asarray(label_data, dtype=np.float64)
        if not np.isfinite(label_float).all():
            problems.append(f"{path}: label holds NaN or Inf. Fix: export the label as an integer map.")
            return None
        rounded = np.rint(label_float)
        if not np.array_equal(rounded, label_float):
            problems.append(
                f"{path}: label holds non-integer values (e.g. {label_float[rounded != label_float].flat[0]:g}); "
                "it looks like an interpolated or probability map. Fix: export the label map with nearest-neighbour "
                "resampling, integer values only."
            )
            return None
        rounded = rounded.astype(np.int64)
    return rounded


def _label_value_problems(path: Path, rounded: np.ndarray, allowed_labels: set[int] | None,
                          num_classes: int) -> list[str]:
    """Label values outside the declared labels (or the model's classes), and a label with no structure."""
    problems = []
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
            f"{path}: label values {outside} are outside {where} {sorted(allowed)}. Fix: map them onto the "
            "declared labels (or declare them in dataset.json if the model has room for them)."
        )
    if values <= {0}:
        problems.append(
            f"{path}: the label is empty (background only), so it teaches nothing. Fix: add the "
            "annotation, or remove the case."
        )
    return problems


def check_site(root: Path | str, *, num_classes: int | None = 4, k: int | None = None, q: int | None = None,
               image_glob: str | None = None, label_glob: str | None = None,
               limits: ReadLimits = ReadLimits(), planned_spacing: tuple[float, float, float] | None = None,
               planned_channels: tuple[int, tuple[str, ...]] | None = None) -> SiteReport:
    """Check every case of one site, and that enough remain for k-shot episodes (files read within ``limits``)."""
    layout = discover_site(root, image_glob, label_glob, limits=limits)
    return check_layout(layout, num_classes=num_classes, k=k, q=q, limits=limits, planned_spacing=planned_spacing,
                        planned_channels=planned_channels)


def check_layout(layout: SiteLayout, *, num_classes: int | None = 4, k: int | None = None, q: int | None = None,
                 limits: ReadLimits = ReadLimits(), planned_spacing: tuple[float, float, float] | None = None,
                 planned_channels: tuple[int, tuple[str, ...]] | None = None) -> SiteReport:
    """Check every case of a discovered site, and that enough remain for k-shot episodes. Usable cases are also
    checked against their declared modality and, given the plan's ``planned_spacing`` (mm, R/A/S), its spacing
    (:mod:`fedmeta.common.modality_checks`: warnings, the case stays usable). ``num_classes`` None: no plan yet,
    so the classes the site's dataset.json declares (4 where it declares none)."""
    from fedmeta.common.modality_checks import modality_warnings  # lazy: it imports site_layout's constants only

    site_problems: list[str] = []
    allowed = set(layout.labels) if layout.labels is not None else None
    if num_classes is None:
        num_classes = max(allowed) + 1 if allowed else 4
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
        problems, loaded = check_case(case, allowed, num_classes, limits=limits, channels=layout.channels)
        if problems:
            case_problems.append(CaseProblem(case.case_id, tuple(problems)))
        else:
            valid += 1
            note = thin_volume_warning(case.image, loaded.image_data.shape[:3], loaded.image.affine)
            if note:
                notes.append(note)
            _, zooms = ras_grid(loaded.image_data.shape[:3], loaded.image.affine)  # volume_checks': no torch
            notes.extend(modality_warnings(case.image, loaded.image_data, zooms, layout.channels, planned_spacing))
    site_problems.extend(episode_problems(layout.root, valid, k, q))
    notes.extend(_name_warnings(layout))
    if planned_channels is not None:
        site_problems.extend(_channel_problems(layout, planned_channels))
    return SiteReport(root=layout.root, name=layout.name, num_cases=layout.num_listed, case_problems=case_problems,
                      site_problems=site_problems, warnings=notes, num_valid=valid, unlisted=list(layout.unlisted))


def _name_warnings(layout: SiteLayout) -> list[str]:
    """Label names and the label protocol a site's fingerprint may not carry (fedmeta.common.fingerprint): the site
    trains, but `fedmeta plan` and the plan round refuse its report."""
    from fedmeta.common.site_layout import MAX_NAME_CHARS

    odd = [f"label {value}" for value, name in (layout.labels or {}).items()
           if not (0 < len(name) <= MAX_NAME_CHARS and name.isprintable())]
    if not (layout.label_protocol.isprintable() and len(layout.label_protocol) <= MAX_NAME_CHARS):
        odd.append("label_protocol")
    if not odd:
        return []
    return [f"{layout.root / 'dataset.json'}: the name of {', '.join(odd[:5])} is empty, longer than {MAX_NAME_CHARS} "
            "characters or not printable; the site trains, but `fedmeta plan` (and a deployment's plan round) refuse "
            f"its fingerprint. Fix: give each a short printable name (at most {MAX_NAME_CHARS} characters)."]


def _channel_problems(layout: SiteLayout, planned: tuple[int, tuple[str, ...]]) -> list[str]:
    """Why the plan's model cannot take this site's channels (in-channels, channels), or nothing: the reader's own
    test (:func:`fedmeta.common.site_layout.channel_order`), in check-data's words."""
    in_channels, names = planned
    try:
        channel_order(layout.name, layout.channels, in_channels, names)
    except ValueError:  # the reader's words name a run config; check-data's name the plan
        pass
    else:
        return []
    declared = ", ".join(repr(c)[:40] for c in layout.channels) or "none: one channel"
    wanted = ", ".join(names) if names else f"{in_channels} channel(s) of any name"
    return [f"{layout.root / 'dataset.json'}: declares the image channels ({declared}), but the plan's model takes "
            f"{wanted}. The site cannot train or adapt with this federation. Fix: a site of the federation's "
            "modality, or correct dataset.json's 'modality' if it names the channels wrongly."]


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


def check_path(path: Path | str, *, num_classes: int | None = 4, k: int | None = None, q: int | None = None,
               image_glob: str | None = None, label_glob: str | None = None,
               limits: ReadLimits = ReadLimits(), planned_spacing: tuple[float, float, float] | None = None,
               planned_channels: tuple[int, tuple[str, ...]] | None = None) -> list[SiteReport]:
    """Check one site folder, or every site of a federation root (a folder of site folders)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist or is not a folder; pass a site folder or a federation root.")
    if image_glob is not None or is_site_folder(path):
        return [check_site(path, num_classes=num_classes, k=k, q=q, image_glob=image_glob, label_glob=label_glob,
                           limits=limits, planned_spacing=planned_spacing, planned_channels=planned_channels)]
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
    return [check_site(site, num_classes=num_classes, k=k, q=q, limits=limits, planned_spacing=planned_spacing,
                       planned_channels=planned_channels) for site in sites]


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

__all__ = [
    "AFFINE_TOLERANCE_MM", "DEFAULT_MAX_VOXELS", "NIFTI_SUFFIXES", "THIN_MM", "THIN_VOXELS", "VOXEL_MM_RANGE", "Case",
    "CaseProblem", "LoadedCase", "ReadLimits", "SiteLayout", "SiteReport", "affine_problem", "check_case",
    "channels_problem", "check_layout", "check_path", "check_scan", "check_site", "discover_site", "dtype_problem", "episode_problems",
    "format_reports", "is_site_folder", "thin_volume_warning", "uniform_problem",
    "_load_nifti",  # reads one file as check_case does: the tests probe its refusals one by one
]
