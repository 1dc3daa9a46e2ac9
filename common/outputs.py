"""What a command writes: never a file it did not write, never into a site's data, and known again after a kill.

Every fedmeta writer goes through :class:`Outputs`. Before its first output, a command *claims* the names
it will write in a folder, and the claim is recorded in that folder's journal, ``.fedmeta-outputs.json``:
a run killed halfway (SIGKILL included, where no ``finally`` runs) leaves a journal that says which files
are its own, so the next run may replace them. A claim is refused, naming the file and what to do, when

- the folder is a site's data folder or inside one (``dataset.json`` beside ``imagesTr/`` or ``labelsTr/``);
- a file of that name exists that no fedmeta command recorded (a scan, a checkpoint, someone's notes);
- another command recorded it (``evaluate --json`` never replaces ``adapt``'s model card);
- this command wrote it but it changed since (a mask someone corrected by hand);
- it is this command's own and ``overwrite`` was not asked for (``--overwrite``).

Outputs are written atomically (a new exclusive temporary file, then a rename) and each file's SHA-256 is
recorded once it is in place. A command that fills a whole folder with files it does not name in advance
(``fedmeta simulate``, ``fedmeta provision``) claims the folder instead: it must be new, empty, or that
command's.

Modes: an output (a mask, a model card, a report) and the folder made for it take the mode the caller's umask
gives, as ``open`` and ``mkdir`` do (0644 and 0755 under the usual umask 022, 0600 and 0700 under 077): the
site's umask, not fedmeta, decides whether a service running as another user (a PACS upload) reads them.
Secret material asks for an explicit mode, set exactly whatever the umask: keys :data:`PRIVATE_FILE_MODE` in
:data:`PRIVATE_FOLDER_MODE` folders.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fedmeta.common.jsonio import dumps_strict

JOURNAL_NAME = ".fedmeta-outputs.json"
JOURNAL_FORMAT = "fedmeta-outputs"
FOLDER_MODE = 0o755  # a folder others may read whatever the umask (provision's consortium folder)
PRIVATE_FILE_MODE = 0o600  # secret material (a private key, the site's order key, a checkpoint), whatever the umask
PRIVATE_FOLDER_MODE = 0o700
_PROC_STATUS = "/proc/self/status"
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows: Linux (4.7 and later) shows it in
    ``/proc/self/status``. Elsewhere ``os.umask`` (which only sets) is called twice under a lock, with 077
    between the calls, so that a file another thread creates meanwhile is private rather than world-writable."""
    try:
        with open(_PROC_STATUS, encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def output_file_mode() -> int:
    """The mode of an output file: 0666 narrowed by the umask, as ``open`` gives (0644 under umask 022)."""
    return 0o666 & ~current_umask()


def output_folder_mode() -> int:
    """The mode of an output folder: 0777 narrowed by the umask, as ``mkdir`` gives (0755 under umask 022)."""
    return 0o777 & ~current_umask()


class OutputRefused(ValueError):
    """A write that would replace what the command does not own, or land in a site's data."""


def data_folder(path: Path | str) -> Path | None:
    """The site data folder ``path`` is or lies in (``dataset.json`` with ``imagesTr/`` or ``labelsTr/``), or None."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        if (folder / "dataset.json").is_file() and ((folder / "imagesTr").is_dir() or (folder / "labelsTr").is_dir()):
            return folder
    return None


def refuse_data_folder(path: Path | str, option: str) -> None:
    """Raises :class:`OutputRefused` when ``path`` is (inside) a site's data folder."""
    found = data_folder(path)
    if found is not None:
        raise OutputRefused(f"{option} {path}: {'is' if found == Path(path).resolve() else 'lies in'} the site data "
                            f"folder {found} (dataset.json, imagesTr/, labelsTr/); fedmeta never writes into a site's "
                            "data. Choose a folder outside it.")


def refuse_links(path: Path | str, within: Path | str) -> None:
    """Raises :class:`OutputRefused` when ``within``, ``path`` or a folder between them is a symbolic link: a
    writer that follows one writes outside the folder it owns (a link planted in a folder of keys is a way out)."""
    path, within = Path(path), Path(within)
    try:
        parts = path.relative_to(within).parts
    except ValueError:
        raise ValueError(f"{path} is not inside {within}") from None
    current = within
    for part in ("", *parts):
        current = current / part
        if current.is_symlink():
            raise OutputRefused(f"{current}: is a symbolic link (to {os.readlink(current)}); fedmeta writes only inside "
                                f"{within} and never through a link, which would write outside it. Replace the link "
                                "with the folder or file itself, or remove it, and run again.")


def make_folder(path: Path | str, mode: int | None = None, *, within: Path | str | None = None) -> Path:
    """``path`` and its missing parents. ``mode`` None: an output folder, it and its parents as the umask gives
    (:func:`output_folder_mode`); otherwise ``path`` gets ``mode`` and its missing parents :data:`FOLDER_MODE`,
    whatever the umask (``os.mkdir`` then ``chmod``). An existing folder is narrowed to ``mode`` when that is
    :data:`PRIVATE_FOLDER_MODE` (a key folder an older release made world-readable) and otherwise left as it
    is. With ``within``, a symbolic link from ``within`` down to ``path`` is refused (:func:`refuse_links`)
    rather than followed."""
    path = Path(path)
    private = mode == PRIVATE_FOLDER_MODE
    parents_mode = FOLDER_MODE if mode is not None else output_folder_mode()
    mode = parents_mode if mode is None else mode
    if within is not None:
        refuse_links(path, within)
    missing = []
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        missing.append(folder)
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made by a concurrent run a moment ago
            os.mkdir(folder, mode)
        os.chmod(folder, mode if folder == path else parents_mode)
    if not missing and private and not path.is_symlink() and path.stat().st_mode & 0o077:
        os.chmod(path, mode)
    return path


def write_atomically(path: Path, write: Callable[[Path], None], mode: int | None = None) -> Path:
    """``write(temporary path)`` beside ``path``, then a rename onto it: a crash never leaves half a file under its
    name. The temporary file is new and exclusive (``mkstemp``, 0600 while it is written), so a link planted
    under a predictable name is never followed; before the rename it gets ``mode`` (None: an output's mode,
    :func:`output_file_mode`). The file's bytes reach the disk (fsync) before the rename, so a power loss never
    leaves the new name on an empty file."""
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(tmp, output_file_mode() if mode is None else mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Outputs:
    """The files ``command`` writes in ``folder`` (names relative to it), guarded by the folder's journal.

    ``option`` names the argument in refusals (``--out``, ``--json``). Use :meth:`check` before the work (no
    side effect), :meth:`claim` right before the first write (records the names), then :meth:`write` (or
    :meth:`record` after a write made elsewhere) for each file.
    """

    def __init__(self, folder: Path | str, command: str, option: str = "--out") -> None:
        self.folder, self.command, self.option = Path(folder), command, option

    # ----------------------------------------------------------------------------------------------
    # ownership

    def journal(self) -> dict[str, Any]:
        """The folder's journal: ``{"folder": {...} | None, "files": {name: {"command", "sha256"}}}``."""
        try:
            data = json.loads((self.folder / JOURNAL_NAME).read_text())
        except FileNotFoundError:
            return {"format": JOURNAL_FORMAT, "version": 1, "folder": None, "files": {}}
        except (OSError, ValueError) as err:
            raise OutputRefused(f"{self.folder / JOURNAL_NAME}: not a readable fedmeta journal ({err}); it says which "
                                "files fedmeta wrote here. Restore it, or choose another folder.") from None
        if not isinstance(data, dict) or data.get("format") != JOURNAL_FORMAT or not isinstance(data.get("files"), dict):
            raise OutputRefused(f"{self.folder / JOURNAL_NAME}: not a fedmeta journal; choose another folder.")
        return data

    def owned(self) -> set[str]:
        """The names this command recorded here (whether or not they still exist)."""
        return {name for name, entry in self.journal()["files"].items() if entry.get("command") == self.command}

    def folder_owner(self) -> dict[str, Any] | None:
        """What claimed the whole folder (``{"command": ..., **detail}``), or None."""
        return self.journal().get("folder")

    def problem(self, name: str, *, overwrite: bool, recognised: Iterable[str] = ()) -> str | None:
        """Why this command must not write ``name`` now, or None. ``recognised``: names the caller knows an
        older fedmeta of this command wrote (before there were journals)."""
        path = self.folder / name
        shown = f"{self.option} {path}" if self.option else str(path)
        if path.is_symlink():
            return f"{shown}: is a symbolic link; fedmeta writes only plain files. Remove it."
        if path.is_dir():
            return f"{shown}: is a folder; choose another name."
        if not path.exists():
            return None
        journal = self.journal()
        entry = journal["files"].get(name)
        folder = journal.get("folder") or {}
        if entry is None and name not in set(recognised) and folder.get("command") != self.command:
            return (f"{shown}: exists and fedmeta {self.command} did not write it (the folder's {JOURNAL_NAME} does not "
                    "list it); fedmeta never replaces a file it did not write. Move it away or choose another name.")
        if entry is not None and entry.get("command") != self.command:
            return (f"{shown}: was written by fedmeta {entry.get('command')}, not fedmeta {self.command}; choose another "
                    "name.")
        if entry is not None and entry.get("sha256") and file_sha256(path) != entry["sha256"]:
            return (f"{shown}: changed since fedmeta {self.command} wrote it (edited by hand?); it is not replaced. "
                    "Move it away or choose another name.")
        if not overwrite:
            return (f"{shown}: already holds the output of an earlier fedmeta {self.command}; pass --overwrite to "
                    "replace it, or choose another name.")
        return None

    def check(self, names: Iterable[str], *, overwrite: bool = False, recognised: Iterable[str] = ()) -> None:
        """Raises :class:`OutputRefused` for the first name that must not be written; writes nothing."""
        refuse_data_folder(self.folder, self.option or "output")
        recognised = set(recognised)
        for name in names:
            _check_name(name)
            problem = self.problem(name, overwrite=overwrite, recognised=recognised)
            if problem:
                raise OutputRefused(problem)

    def claim(self, names: Iterable[str], *, overwrite: bool = False, recognised: Iterable[str] = ()) -> None:
        """:meth:`check`, then records ``names`` as this command's in the journal before any is written."""
        names = list(names)
        self.check(names, overwrite=overwrite, recognised=recognised)
        make_folder(self.folder)
        now = _now()

        def add(journal):
            for name in names:
                entry = journal["files"].get(name)
                if entry is None or entry.get("command") != self.command:
                    journal["files"][name] = {"command": self.command, "sha256": None, "claimed": now}

        self._update(add)

    def claim_folder(self, *, overwrite: bool = False, resume: bool = False, detail: dict[str, Any] | None = None,
                     recognised: bool = False, again: str = "pass --overwrite to replace it") -> None:
        """:meth:`check_folder`, then records the folder as this command's (with ``detail``) before any output."""
        self.check_folder(overwrite=overwrite, resume=resume, detail=detail, recognised=recognised, again=again)
        make_folder(self.folder)
        self._update(lambda journal: journal.update(folder={"command": self.command, **(detail or {}),
                                                            "claimed": _now()}))

    def check_folder(self, *, overwrite: bool = False, resume: bool = False, detail: dict[str, Any] | None = None,
                     recognised: bool = False, again: str = "pass --overwrite to replace it") -> None:
        """Whether the whole folder may be claimed; raises :class:`OutputRefused` if not, writes nothing. It must
        be new, empty (but for a journal), or this command's (then ``overwrite`` or ``resume`` is needed).
        ``recognised``: the caller knows an older fedmeta of this command made it. ``again`` says how to
        write over an earlier run of the command."""
        refuse_data_folder(self.folder, self.option or "output")
        shown = f"{self.option} {self.folder}" if self.option else str(self.folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise OutputRefused(f"{shown}: is a file; give a folder.")
        if self.folder.is_symlink():
            raise OutputRefused(f"{shown}: is a symbolic link; give the folder itself.")
        owner = self.folder_owner() if self.folder.is_dir() else None
        used = self.folder.is_dir() and any(p.name != JOURNAL_NAME for p in self.folder.iterdir())
        if used and (owner or {}).get("command") != self.command and not recognised:
            what = f"fedmeta {owner['command']}" if owner else "something other than fedmeta " + self.command
            raise OutputRefused(f"{shown}: holds files written by {what}; fedmeta {self.command} writes only into a new "
                                "or empty folder, or one it wrote. Choose another folder.")
        if used and not (overwrite or resume):
            earlier = ", ".join(f"{k} {v}" for k, v in (owner or {}).items() if k not in ("command", "claimed"))
            raise OutputRefused(f"{shown}: holds an earlier fedmeta {self.command} run{f' ({earlier})' if earlier else ''};"
                                f" {again}, or choose another folder.")

    # ----------------------------------------------------------------------------------------------
    # writing

    def write(self, name: str, write: Callable[[Path], None], mode: int | None = None) -> Path:
        """``write(temporary path)``, then renames it onto ``name`` and records its digest. The temporary file
        is new and exclusive (``mkstemp``): a link planted under a predictable name is never followed. ``mode``
        None: as the umask gives (:func:`write_atomically`)."""
        path = write_atomically(self.folder / name, write, mode)
        self.record(name)
        return path

    def write_bytes(self, name: str, data: bytes, mode: int | None = None) -> Path:
        return self.write(name, lambda tmp: tmp.write_bytes(data), mode)

    def write_text(self, name: str, text: str, mode: int | None = None) -> Path:
        return self.write_bytes(name, text.encode(), mode)

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_text(name, dumps_strict(obj, indent=2, sort_keys=True) + "\n")

    def record(self, *names: str) -> None:
        """Records the digests of ``names``, written in place by this command (after :meth:`claim`)."""
        digests = {name: file_sha256(self.folder / name) for name in names if (self.folder / name).is_file()}

        def add(journal):
            for name, digest in digests.items():
                journal["files"][name] = {"command": self.command, "sha256": digest, "written": _now()}

        self._update(add)

    def _update(self, change: Callable[[dict], None]) -> None:
        """Read, change and atomically rewrite the journal, under an exclusive lock on the folder. The journal lists
        the folder's file names: its mode is an output's (the umask's) and never more open than the folder's."""
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # two commands writing one folder never lose each other's entries
            journal = self.journal()
            change(journal)
            body = json.dumps(journal, indent=2, sort_keys=True) + "\n"
            tmp_fd, tmp_name = tempfile.mkstemp(prefix=f".{JOURNAL_NAME}.", suffix=".tmp", dir=self.folder)
            try:
                with os.fdopen(tmp_fd, "w") as handle:
                    handle.write(body)
                os.chmod(tmp_name, output_file_mode() & os.fstat(fd).st_mode & 0o666)
                os.replace(tmp_name, self.folder / JOURNAL_NAME)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp_name)
        finally:
            os.close(fd)  # releases the lock


def _check_name(name: str) -> None:
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or name == JOURNAL_NAME:
        raise ValueError(f"{name!r}: an output name is a plain path inside its folder")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


__all__ = ["FOLDER_MODE", "JOURNAL_NAME", "OutputRefused", "Outputs", "PRIVATE_FILE_MODE", "PRIVATE_FOLDER_MODE",
           "current_umask", "data_folder", "make_folder", "output_file_mode", "output_folder_mode",
           "refuse_data_folder", "refuse_links", "write_atomically"]
