"""A synthetic hospital federation on real brain anatomy (ICBM152 2009a), in the MSD layout.

Every subject is the template's tissue-probability maps (CSF, grey matter, white matter; in the texture
generation also its T1 intensities and deep grey nuclei) under a random affine, a smooth elastic warp and
optional atrophy; every site turns them into an MR image with its own scanner (field strength, sequence,
resolution, slice thickness and direction, bias field, Rician noise, gain/gamma/12-bit clipping, Gibbs
ringing or motion ghosts; in the texture generation a nonlinear contrast curve, a deep grey iron term and a
per-subject texture field) and into labels with its own annotation style (threshold, one-voxel
erosion/dilation of grey matter, boundary label noise, label or delineation protocol). The ``default``
preset is the texture generation; ``tissue`` is the default of generator 1.x, image for image (see
:mod:`fedmeta.common.synth_render`). Every parameter of every site and subject is written to ``manifest.json``.

Scaled for CPU: in-plane resolution is 1.2-2.0 mm (a clinical 0.9-1.5 mm would make each volume
several times larger while the model reads 2 mm slices anyway); slice thickness keeps its 1.5-5 mm.

Layout written by :func:`generate_federation`::

    root/manifest.json
    root/<site>/dataset.json            MSD: modality, labels, training file list (+ "label_protocol")
    root/<site>/imagesTr/<site>_NNN.nii.gz   int16, 12-bit, 3D, scanner affine
    root/<site>/labelsTr/<site>_NNN.nii.gz   uint8: 0 background, 1 CSF, 2 grey matter, 3 white matter

This module writes and reads federations, rendering a lazy federation's sites when first used; the
parameters are drawn in :mod:`fedmeta.common.synth_plan`, a subject is rendered in
:mod:`fedmeta.common.synth_render`, and :mod:`fedmeta.common.synth_folders` guards what a federation
folder may hold. Every public name of those modules is importable from here too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmeta.common.progress import PROGRESS_EVERY_S, paced
from fedmeta.common.protocol import ROLE_HELDOUT, ROLE_TRAIN
from fedmeta.common.synth_folders import _refuse_to_overwrite, _remove_federation, _sweep_staging
from fedmeta.common.synth_plan import (
    DEEP_GREY_SIGNAL, DELINEATION_PROTOCOLS, EXTENTS, GENERATIONS, GENERATOR_VERSION, HEAD_CLOSING_MM, HEAD_LAYERS,
    HEAD_MARGIN_MM, HEAD_RENDERING, HEAD_SIGNAL, HELDOUT_KINDS, HELDOUT_PROTOCOLS, LABEL_PROTOCOLS, LABELS, PRESETS,
    PROTOCOL_LABELS, SCALE_COUNTS, SEQUENCES, STORAGE_ORIENTATIONS, TEXTURE_HELDOUT_KINDS, TISSUE_SIGNAL,
    TRAIN_SEQUENCES, Preset, _preset, plan_federation,
)
from fedmeta.common.synth_render import (
    ASSET_PATH, BRAIN_CENTRE_MM, FOV_HI_MM, FOV_LO_MM, SLICE_AXES, TEXTURE_ASSET_PATH, VENTRICLE_CENTRE_MM,
    _asset_digest, _generate_subject, _to_storage, _worker_init, annotate, contrast_curve, head_signal, load_anatomy,
    load_texture, render_image, render_subject, subject_anatomy, subject_tissue,
)

__all__ = [
    "ASSET_PATH", "BRAIN_CENTRE_MM", "DEEP_GREY_SIGNAL", "DELINEATION_PROTOCOLS", "EXTENTS", "FOV_HI_MM", "FOV_LO_MM",
    "GENERATIONS", "GENERATOR_VERSION", "HEAD_LAYERS", "HEAD_MARGIN_MM", "HEAD_SIGNAL", "HELDOUT_KINDS",
    "HELDOUT_PROTOCOLS", "LABELS", "LABEL_PROTOCOLS",
    "PRESETS", "PROTOCOL_LABELS", "SCALE_COUNTS", "SEQUENCES", "SLICE_AXES", "STORAGE_ORIENTATIONS",
    "TEXTURE_ASSET_PATH", "TEXTURE_HELDOUT_KINDS", "TISSUE_SIGNAL", "TRAIN_SEQUENCES", "VENTRICLE_CENTRE_MM",
    "Manifest", "Preset", "Progress", "SiteInfo", "annotate", "cached_federation", "contrast_curve",
    "federation_digest", "generate_federation", "head_signal", "load_anatomy", "load_manifest", "load_texture",
    "plan_federation",
    "render_image", "render_subject", "subject_anatomy", "subject_tissue",
    "_to_storage",  # how a site's converter stores a volume: the tests read their expected volumes through it
]

Progress = Callable[[str], None]  # receives one line of progress, e.g. "rendered 37/140 subjects (site-03), 52 s"


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
    generation: str = "tissue"  # one of GENERATIONS

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


def _sweep_partials(info: SiteInfo) -> None:
    """Removes the staging folders of renders of this site whose process is gone (killed half-way)."""
    _sweep_staging(info.path.parent, info.name)


def _render_site(info: SiteInfo) -> None:
    digest = _asset_digest(info.generation)
    if info.generator_version != GENERATOR_VERSION or (info.asset_digest and info.asset_digest != digest):
        raise ValueError(
            f"{info.path.parent} is a lazy federation made by generator {info.generator_version} (anatomy "
            f"{info.asset_digest or '?'}); this fedmeta renders with generator {GENERATOR_VERSION} (anatomy "
            f"{digest}), so site {info.name} would not match the sites rendered before. Regenerate "
            "the federation (`fedmeta synth --force`, or delete it from the cache), or use the fedmeta that made it.")
    staging = info.path.parent / f".{info.name}.partial-{os.getpid()}-{threading.get_ident()}"
    site = {"name": info.name, "role": info.role, "heldout_kind": info.heldout_kind, "params": info.params,
            "num_patients": info.num_patients, "subjects": info.subjects, "fov_scale": info.fov_scale}
    try:
        if staging.exists():
            shutil.rmtree(staging)
        _render_subjects(_stage_site(staging, site), workers=1)
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


def _render_subjects(jobs: list, workers: int | None, progress: Progress | None = None) -> None:
    """Renders every subject job, in ``workers`` spawned processes or in this one (same result).

    ``progress`` gets a line about every :data:`PROGRESS_EVERY_S` seconds while rendering, the first at once (in
    workers too: this process wakes while it waits on them), and one at the end.
    """
    if workers is None:
        workers = 1 if len(jobs) <= 30 else min(2, os.cpu_count() or 1)
    started, done, latest = time.perf_counter(), 0, ""
    say = paced(progress, PROGRESS_EVERY_S) if progress is not None else None

    def report(final: bool = False) -> None:
        if progress is not None:
            where = f" ({latest})" if latest else ""
            (progress if final else say)(f"rendered {done}/{len(jobs)} subjects{where}, "
                                         f"{time.perf_counter() - started:.0f} s")

    if workers > 1:
        # spawn, not fork: the caller may hold torch/Ray threads that a forked child would inherit.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init) as pool:
            pending = {pool.submit(_generate_subject, job): job for job in jobs}
            while pending:
                # Wakes while the workers are slow too: a due line comes at most a fifth of the period late.
                finished, _ = wait(pending, timeout=PROGRESS_EVERY_S / 5, return_when=FIRST_COMPLETED)
                for future in finished:
                    future.result()  # a worker's error stops the synth here
                    done += 1
                    latest = pending.pop(future)[0].name.split(".partial-")[0].lstrip(".")
                report()
        report(final=True)
        return
    # One thread: on a busy 2-core machine torch's thread pool made generation 3x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for job in jobs:
            _generate_subject(job)
            done += 1
            latest = job[0].name.split(".partial-")[0].lstrip(".")
            report()
    finally:
        torch.set_num_threads(threads)
    report(final=True)


def _stage_site(site_dir: Path, site: dict[str, Any]) -> list[tuple[Path, dict[str, Any], dict[str, Any], float]]:
    """Writes a site's folders and dataset.json into ``site_dir``; returns its subjects' render jobs."""
    (site_dir / "imagesTr").mkdir(parents=True)
    (site_dir / "labelsTr").mkdir(parents=True)
    (site_dir / "dataset.json").write_text(json.dumps(_dataset_json(site), indent=2, allow_nan=False))
    return [(site_dir, site["params"], subject, site["fov_scale"]) for subject in site["subjects"]]


def _site_folder(path: Any) -> str:
    """A manifest's site path, which fedmeta writes as one plain name: never a path out of the federation."""
    if not (isinstance(path, str) and re.fullmatch(r"[\w-]+", path)):
        raise ValueError(f"site path {path!r} is not a plain folder name inside the federation")
    return path


def _cache_key(preset: str, seed: int) -> str:
    # The preset's whole definition, not only its name: a preset whose sites or sizes change is a new federation;
    # and the anatomy its generation renders from (the texture generation: both assets).
    spec = dataclasses.asdict(_preset(preset))
    if spec["head"]:  # how the head is drawn and rendered: a change to it is a new federation
        spec["head"] = {"layers": HEAD_LAYERS, "signal": HEAD_SIGNAL, "margin_mm": HEAD_MARGIN_MM,
                        "closing_mm": HEAD_CLOSING_MM, "rendering": HEAD_RENDERING}
    else:  # added after 2.0: only a preset that sets it has a new key; every earlier one keeps its own
        del spec["head"]
    blob = json.dumps({"preset": preset, "spec": spec, "seed": seed, "generator": GENERATOR_VERSION,
                       "asset": _asset_digest(spec["generation"])}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _dataset_json(site: dict[str, Any]) -> dict[str, Any]:
    protocol = site["params"]["annotation"]["protocol"]
    labels = {str(k): v for k, v in PROTOCOL_LABELS[protocol].items()}
    extra: dict[str, Any] = {}
    if protocol in DELINEATION_PROTOCOLS:
        extent = site["params"]["annotation"]["extent"]
        extra = {"delineation": {**DELINEATION_PROTOCOLS[protocol], "extent": extent}}
        if extent == "cerebrum":
            labels["0"] += " and the cerebellum and brainstem (cerebrum only)"
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
        **extra,
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
                        workers: int | None = None, lazy: bool | None = None,
                        progress: Progress | None = None) -> Path:
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
    ``progress`` (e.g. ``print``) gets a line at least every few seconds while subjects are rendered.
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
    jobs = [job for site in (plan if not lazy else ()) for job in _stage_site(staging / site["name"], site)]
    try:
        _render_subjects(jobs, workers, progress)
        manifest = _manifest_json(plan, preset, seed, key, lazy, started)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, allow_nan=False))
        if root.exists():
            _remove_federation(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(root)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return root


def _manifest_json(plan: list[dict[str, Any]], preset: str, seed: int, key: str, lazy: bool,
                   started: float) -> dict[str, Any]:
    """The federation's manifest.json: what made it and every site's and subject's parameters."""
    generation = _preset(preset).generation
    anatomy: dict[str, Any] = {"asset": ASSET_PATH.name, "sha256_16": _asset_digest(generation),
                               "source": "ICBM 2009a nonlinear symmetric, via nilearn; see ICBM152_NOTICE.txt"}
    if generation == "texture":
        *_, levels = load_texture()
        anatomy.update(texture_asset=TEXTURE_ASSET_PATH.name,
                       template_t1_levels={"csf": round(float(levels[0]), 4), "grey_matter": round(float(levels[1]), 4),
                                           "white_matter": round(float(levels[2]), 4)})
    return {
        "generator_version": GENERATOR_VERSION,
        "preset": preset,
        "seed": seed,
        "cache_key": key,
        "generation": generation,
        "anatomy": anatomy,
        "labels": {str(k): v for k, v in LABELS.items()},
        "generation_seconds": round(time.perf_counter() - started, 2),
        "lazy": lazy,
        "sites": [
            {"name": s["name"], "role": s["role"], "heldout_kind": s["heldout_kind"], "path": s["name"],
             "num_patients": s["num_patients"], "params": s["params"], "subjects": s["subjects"],
             "fov_scale": s["fov_scale"], "generation": s["generation"]}
            for s in plan
        ],
    }


def cached_federation(cache_root: Path | str, preset: str = "default", seed: int = 0, *, workers: int | None = None,
                      progress: Progress | None = None) -> Path:
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
    return generate_federation(root, preset, seed, force=stale, workers=workers, progress=progress)


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
        if raw.get("kind") == SITES_MANIFEST_KIND:
            return _sites_manifest(root, raw)
        lazy = bool(raw.get("lazy", False))
        made_by = str(raw["generator_version"])
        asset = str(raw.get("anatomy", {}).get("sha256_16", ""))
        sites = [
            SiteInfo(name=s["name"], role=s["role"], heldout_kind=s["heldout_kind"], path=root / _site_folder(s["path"]),
                     num_patients=int(s["num_patients"]), params=s["params"], subjects=s.get("subjects", []),
                     lazy=lazy, fov_scale=float(s.get("fov_scale", 1.0)), generator_version=made_by,
                     asset_digest=asset, generation=str(s.get("generation", "tissue")))
            for s in raw["sites"]
        ]
        return Manifest(root=root, preset=raw["preset"], seed=int(raw["seed"]),
                        generator_version=raw["generator_version"], cache_key=raw["cache_key"], sites=sites,
                        generation_seconds=float(raw.get("generation_seconds", 0.0)))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        sites_kind = isinstance(locals().get("raw"), dict) and raw.get("kind") == SITES_MANIFEST_KIND
        fix = ("write it again with `fedmeta plan --sites ... --heldout ... --out DIR --overwrite`" if sites_kind
               else "regenerate the federation with `fedmeta synth --out DIR --force`")
        raise ValueError(f"{path} is not a valid fedmeta manifest ({type(err).__name__}: {err}); {fix}.") from err


# A federation of sites' own folders (imported public datasets, a consortium's test copies): `fedmeta plan --heldout`
# writes its manifest beside the plan; the sites stay where they are, named by absolute path, and are only read.
SITES_MANIFEST_KIND = "sites"


def sites_digest(plan_content: bytes, heldout: list[str]) -> str:
    """What a sites federation holds, as its manifest's cache key: the plan's bytes and the held-out sites' names
    (the plan is the training sites'), so a resumed run trains on the same plan and sites."""
    return hashlib.sha256(plan_content + "\n".join(sorted(heldout)).encode()).hexdigest()


def write_sites_manifest(out: Path | str, train: list[Path], heldout: list[Path], digest: str,
                         num_patients: dict[Path, int], protocols: dict[Path, str] | None = None) -> Path:
    """``out/manifest.json`` for a simulation over existing site folders: ``train`` sites meta-train, ``heldout`` sites
    play the new hospitals. ``digest`` is what the federation holds (the plan's SHA-256): the trajectory hash's
    federation part, so a resumed run trains on the same data."""
    sites, names = [], set()
    for role, folders in ((ROLE_TRAIN, train), (ROLE_HELDOUT, heldout)):
        for folder in folders:
            folder = Path(folder).resolve()
            name = re.sub(r"[^\w-]", "-", folder.name)
            if name in names:
                raise ValueError(f"two sites are named {name!r} ({folder}); give each site folder its own name.")
            names.add(name)
            sites.append({"name": name, "role": role, "heldout_kind": "new-site" if role == ROLE_HELDOUT else None,
                          "path": str(folder), "num_patients": int(num_patients[folder]),
                          "params": {"annotation": {"protocol": (protocols or {}).get(folder, "standard")}}})
    manifest = {"kind": SITES_MANIFEST_KIND, "generator_version": SITES_MANIFEST_KIND, "preset": "plan", "seed": 0,
                "cache_key": digest, "sites": sites}
    path = Path(out) / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def _sites_manifest(root: Path, raw: dict[str, Any]) -> Manifest:
    """A :data:`SITES_MANIFEST_KIND` manifest: every site an existing folder with a dataset.json, by absolute path."""
    sites, names = [], set()
    if not raw["sites"]:
        raise ValueError("it lists no site")
    for s in raw["sites"]:
        if not (isinstance(s["name"], str) and re.fullmatch(r"[\w-]+", s["name"])) or s["name"] in names:
            raise ValueError(f"site name {str(s['name'])[:80]!r} is not a plain folder name, or names two sites")
        names.add(s["name"])
        folder = Path(str(s["path"]))
        if not folder.is_absolute() or not (folder / "dataset.json").is_file():
            raise ValueError(f"site {s.get('name')!r}: {folder} is not an absolute path to a site folder with a "
                             "dataset.json (moved or deleted since `fedmeta plan` wrote this manifest?)")
        if s["role"] not in (ROLE_TRAIN, ROLE_HELDOUT):
            raise ValueError(f"site {s.get('name')!r}: role {s['role']!r} is neither {ROLE_TRAIN} nor {ROLE_HELDOUT}")
        sites.append(SiteInfo(name=str(s["name"]), role=s["role"], heldout_kind=s.get("heldout_kind"), path=folder,
                              num_patients=int(s["num_patients"]), params=dict(s["params"]),
                              generator_version=SITES_MANIFEST_KIND, generation=SITES_MANIFEST_KIND))
    return Manifest(root=root, preset=str(raw["preset"]), seed=int(raw["seed"]), generator_version=SITES_MANIFEST_KIND,
                    cache_key=str(raw["cache_key"]), sites=sites)
