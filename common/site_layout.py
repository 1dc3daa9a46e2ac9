"""Finding a site's cases: from its ``dataset.json`` (the Medical Segmentation Decathlon layout), or by pairing
the files an image glob and a label glob match (e.g. ``*_img.nii.gz`` / ``*_seg.nii.gz``) by their common stem.

Nothing is read here but the folder, ``dataset.json`` and the files' identities; each case's volumes are checked
by :func:`fedmeta.common.validate.check_case`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmeta.common.read_limits import ReadLimits

NIFTI_SUFFIXES = (".nii.gz", ".nii")


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
    modality: str | None = None  # the first channel's name (channels[0]), as before multi-channel reading
    # The image channels dataset.json declares, in channel order ("0", "1", ...): nnU-Net v2's channel_names or
    # MSD's modality; () when it declares none (glob-paired folders, a dataset.json without either).
    channels: tuple[str, ...] = ()
    problems: list[CaseProblem] = field(default_factory=list)  # listed cases that cannot even be read
    # Files in imagesTr/ that dataset.json does not list: not cases of the site (its 'training' list is), but
    # probably meant to be, so every reader names them.
    unlisted: list[CaseProblem] = field(default_factory=list)

    @property
    def num_listed(self) -> int:
        """The site's cases: every pair its dataset.json lists (or its globs pair), readable or not."""
        return len(self.cases) + len(self.problems)


def _strip_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_site_folder(path: Path) -> bool:
    return (path / "dataset.json").is_file() or (path / "imagesTr").is_dir()



def discover_site(root: Path | str, image_glob: str | None = None, label_glob: str | None = None, *,
                  limits: ReadLimits = ReadLimits()) -> SiteLayout:
    """Find a site's cases: from its ``dataset.json``, or by pairing ``image_glob`` and ``label_glob`` files.

    ``limits.allow_paths_outside_site``: also read the files dataset.json lists outside the site folder.
    """
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
    meta, labels, entries = _read_dataset_json(dataset_json)
    channels = declared_channels(dataset_json, meta)
    layout = SiteLayout(root=root, name=str(meta.get("name") or root.name), cases=[], labels=labels,
                        label_protocol=str(meta.get("label_protocol", "standard")),
                        modality=channels[0] if channels else None, channels=channels)
    if not isinstance(entries, list):
        raise ValueError(f"{dataset_json}: 'training' is {type(entries).__name__}, not a list of "
                         "{\"image\", \"label\"} pairs; fix the file.")
    listed_images = _add_listed_cases(layout, dataset_json, entries, limits.allow_paths_outside_site)
    # Files a hospital copied in but never listed are probably meant to be used: say so.
    layout.unlisted.extend(_unlisted_images(root / "imagesTr", dataset_json, listed_images))
    return layout


MAX_CHANNELS = 8  # MSD's most is 4 (BrainTumour); the model stacks them as input channels

# Hounsfield units a CT scanner writes (12-bit: air -1024 to dense bone and metal 3071), and the value above which
# a CT voxel is body rather than air or the table's foam (nnU-Net and TotalSegmentator crop at about -500).
CT_RANGE_HU = (-1024.0, 3071.0)
CT_BODY_HU = -500.0


def channel_kind(name: str | None) -> str:
    """How a channel is normalised: ``"ct"`` for a channel named CT (nnU-Net's rule, by the dataset.json name),
    ``"mr"`` for every other name (MRI, T1w, T2, FLAIR, ADC, ...) and for an undeclared one."""
    return "ct" if name is not None and name.strip().lower() == "ct" else "mr"


def channel_order(site: str, declared: tuple[str, ...], in_channels: int,
                  channel_names: tuple[str, ...]) -> tuple[list[int], tuple[str, ...]]:
    """Which of a site's declared channels feed the model's input channels, in order, and their names.

    ``declared``: the site's dataset.json channels (() when it declares none: one unnamed channel); ``in_channels``
    and ``channel_names``: the model's (run config in-channels, channels). A site that names them in another order
    is stacked in the model's order; other names, or another count, are refused naming both lists and the fix.
    """
    if not declared:  # one unnamed channel: the run's name for it, if the run names one
        if in_channels == 1:
            return [0], channel_names or ("",)
    elif channel_names:
        wanted = [c.lower() for c in channel_names]
        have = [c.lower() for c in declared]
        if sorted(wanted) == sorted(have) and len(set(have)) == len(have):
            return [have.index(c) for c in wanted], tuple(declared[have.index(c)] for c in wanted)
    elif len(declared) == in_channels:
        return list(range(len(declared))), tuple(declared)
    run = ", ".join(channel_names) if channel_names else f"{in_channels} channel(s)"
    raise ValueError(
        f"site {site} declares the image channels ({', '.join(declared) or 'none: one channel'}) in dataset.json, but "
        f"the model takes {run} (run config in-channels={in_channels}, channels="
        f"{','.join(channel_names)!r}). Fix: run the federation with its plan (`fedmeta plan`), which sets "
        "both from the sites' dataset.json, or correct the site's dataset.json 'modality'.")


def declared_channels(dataset_json: Path, meta: dict[str, Any]) -> tuple[str, ...]:
    """The channel names ``meta`` declares in channel order: nnU-Net v2's ``channel_names`` or MSD's ``modality``
    (``{"0": "FLAIR", "1": "T1w", ...}``), or () when it declares neither; a ValueError naming the file when the
    mapping is not channels 0..C-1."""
    # nnU-Net v2's key first; a null or empty one is absent (some converters write both, one of them empty).
    declared = meta.get("channel_names") or meta.get("modality")
    if declared is None or declared == {} or declared == [] or declared == "":
        return ()
    if isinstance(declared, str):  # some converters write one channel's name alone
        declared = {"0": declared}
    elif isinstance(declared, list):
        declared = {str(i): name for i, name in enumerate(declared)}
    if not isinstance(declared, dict):
        raise ValueError(f"{dataset_json}: 'modality'/'channel_names' is {type(declared).__name__}, not a mapping of "
                         "channel index to name such as {\"0\": \"CT\"}. Fix: write it as MSD does.")
    try:
        by_index = {int(k): v.strip() for k, v in declared.items() if isinstance(v, str)}
    except (TypeError, ValueError):
        by_index = {}
    names = [by_index.get(i, "") for i in range(len(declared))]
    if (sorted(by_index) != list(range(len(declared))) or len(by_index) > MAX_CHANNELS
            or not all(_plain_name(n) for n in names) or len({n.lower() for n in names}) != len(names)):
        shown = json.dumps(declared, ensure_ascii=True)
        raise ValueError(f"{dataset_json}: 'modality'/'channel_names' {shown[:200]}{'...' if len(shown) > 200 else ''} "
                         f"must name channels \"0\", \"1\", ... in order (1 to {MAX_CHANNELS}), each with its own "
                         f"name: a string of 1 to {MAX_NAME_CHARS} printable characters, no comma. Fix: list each "
                         "channel of the images once, e.g. {\"0\": \"T2\", \"1\": \"ADC\"}.")
    return tuple(names)


MAX_NAME_CHARS = 64  # a channel's name: what fedmeta.common.fingerprint accepts in a site's report


def _plain_name(name: str) -> bool:
    """A channel name a run config's comma-separated `channels` can hold and a terminal can print as it is."""
    return 0 < len(name) <= MAX_NAME_CHARS and name.isprintable() and "," not in name


def _read_dataset_json(dataset_json: Path) -> tuple[dict[str, Any], dict[int, str], Any]:
    """``dataset.json``'s object, its labels (value -> name) and its 'training' entries; a ValueError naming
    the file and the fix when it is not UTF-8 JSON holding both."""
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
    return meta, labels, entries


def _add_listed_cases(layout: SiteLayout, dataset_json: Path, entries: list, allow_outside: bool) -> set[Path | None]:
    """Adds dataset.json's 'training' ``entries`` to ``layout``: as cases, or as ``layout.problems`` where a file
    lies outside the site folder (unless ``allow_outside``) or cannot be resolved. Returns every listed image."""
    root = layout.root
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
        escaped = [problem for problem in (_outside_site(path, inside, dataset_json, allow_outside)
                                           for path in (image, label)) if problem]
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
    return listed_images


def _unlisted_images(images_dir: Path, dataset_json: Path, listed_images: set[Path | None]) -> list[CaseProblem]:
    """The files in ``images_dir`` that dataset.json does not list (not cases of the site, each named)."""
    unlisted: list[CaseProblem] = []
    if not images_dir.is_dir():
        return unlisted
    for path in sorted(images_dir.iterdir()):
        if path.name.startswith(".") or not (path.name.endswith(NIFTI_SUFFIXES) or path.is_dir()):
            continue
        try:
            resolved = path.resolve()
        except (RuntimeError, OSError) as err:  # Python 3.11: RuntimeError("Symlink loop from ...")
            unlisted.append(CaseProblem(_strip_suffix(path.name), (
                f"{path}: cannot be resolved ({err}): a loop of symbolic links, so it is not read. Fix: "
                f"remove the link, or replace it by the scan itself.",)))
            continue
        if resolved not in listed_images and path.absolute() not in listed_images:
            unlisted.append(CaseProblem(_strip_suffix(path.name), (
                f"{path}: image is not listed in {dataset_json}'s 'training' list, so it is ignored (the list "
                "is the site's cases). Fix: add an {\"image\", \"label\"} entry for it, or remove the file.",)))
    return unlisted


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



def _outside_site(path: Path | None, inside: Path, dataset_json: Path, allow_outside: bool) -> str | None:
    """Why ``path`` may not be read as part of the site (a symlink loop, or it resolves outside the site
    folder: ``../`` or a symlink, unless ``allow_outside``), or None."""
    if path is None:
        return None
    try:
        resolved = path.resolve(strict=False)
    except (RuntimeError, OSError) as err:  # Python 3.11: RuntimeError("Symlink loop from ...")
        return (f"{path}: cannot be resolved ({err}); a symlink loop. Fix: point the entry in {dataset_json} at "
                "the file itself.")
    if resolved != inside and inside not in resolved.parents and not allow_outside:
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
