"""What a federation folder may hold: refusing to write over anything fedmeta did not write, removing a
federation it did, and sweeping the staging folders of renders killed half-way."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from fedmeta.common.data import SITE_KEY_FILE
from fedmeta.common.outputs import JOURNAL_NAME, Outputs, file_sha256
from fedmeta.common.synth_plan import GENERATOR_VERSION

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
        try:
            dead = _dead_staging(stale, name)
        except FileNotFoundError:  # another worker swept it while this one looked inside: already gone
            continue
        if dead:
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


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: no pid is that large
        return False
    except PermissionError:
        return True
    return True


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
