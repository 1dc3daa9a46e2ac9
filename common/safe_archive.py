"""Unpacking a downloaded dataset archive without trusting it: regular files and folders only, inside the target.

Every member is checked before a byte is written: an absolute path, a ``..`` component, a symbolic or hard
link, a device file or FIFO refuses the whole archive (a dataset has none of them; an archive that does was
made to write outside its folder); the members' total size and count are bounded. Extraction then also runs
under tarfile's ``"data"`` filter (Python 3.11.4+, PEP 706), which enforces the same rules again.
macOS AppleDouble files (``._name``, resource forks the official MSD archives carry beside every file) are
not extracted: they are not images.
"""

from __future__ import annotations

import stat
import sys
import tarfile
from pathlib import Path, PurePosixPath

DEFAULT_MAX_BYTES = 128 * 2**30  # MSD's largest task (Task03_Liver) is about 27 GB
DEFAULT_MAX_MEMBERS = 100_000
APPLEDOUBLE_REASON = "macOS AppleDouble metadata ('._' file), not an image"


class ArchiveProblem(ValueError):
    """An archive that is not extracted; the message names the archive, the member and the fix."""


def is_appledouble(name: str) -> bool:
    return PurePosixPath(name).name.startswith("._")


def member_problem(member: tarfile.TarInfo) -> str | None:
    """Why ``member`` may not be extracted, or None."""
    path = PurePosixPath(member.name)
    if member.name.startswith(("/", "\\")) or path.is_absolute() or (len(member.name) > 1 and member.name[1] == ":"):
        return "an absolute path"
    if ".." in path.parts or ".." in PurePosixPath(member.name.replace("\\", "/")).parts:
        return "a '..' component (a path outside the archive's folder)"
    if member.issym() or member.islnk():
        return f"a {'symbolic' if member.issym() else 'hard'} link (to {member.linkname!r})"
    if not (member.isfile() or member.isdir()):
        return "a device file, FIFO or other special file"
    if member.isfile() and member.mode & (stat.S_ISUID | stat.S_ISGID):
        return "a set-user-ID or set-group-ID file"
    return None


def extract_tar(archive: Path, dest: Path, *, max_bytes: int = DEFAULT_MAX_BYTES,
                max_members: int = DEFAULT_MAX_MEMBERS) -> dict[str, str]:
    """Extracts ``archive`` (a tar, compressed or not) into ``dest``; returns the members not extracted, with why.

    Raises :class:`ArchiveProblem` before writing anything where a member is unsafe or the archive is larger
    than ``max_bytes`` / ``max_members``.
    """
    archive, dest = Path(archive), Path(dest)
    if sys.version_info < (3, 11, 4):  # pragma: no cover - the project requires 3.11; the filter came in 3.11.4
        raise ArchiveProblem(f"{archive}: safe extraction needs Python 3.11.4 or later (tarfile's 'data' filter); "
                             f"this is {sys.version.split()[0]}. Fix: upgrade Python, or extract the archive yourself "
                             "and import the folder.")
    try:
        tar = tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, OSError) as err:
        raise ArchiveProblem(f"{archive}: not a readable tar archive ({type(err).__name__}: {err}). Fix: download it "
                             "again (an MSD task is TaskNN_Name.tar), or import the extracted folder.") from None
    skipped: dict[str, str] = {}
    with tar:
        members, total = [], 0
        for count, member in enumerate(tar, start=1):
            if count > max_members:
                raise ArchiveProblem(f"{archive}: more than {max_members:,} members; a dataset archive has fewer. Fix: "
                                     "check the download, or extract it yourself and import the folder.")
            if problem := member_problem(member):
                raise ArchiveProblem(f"{archive}: member {member.name!r} is {problem}; nothing was extracted (a "
                                     "dataset archive holds regular files and folders only). Fix: download the "
                                     "archive again from the dataset's own site.")
            if is_appledouble(member.name):
                skipped[member.name] = APPLEDOUBLE_REASON
                continue
            total += member.size
            if total > max_bytes:
                raise ArchiveProblem(f"{archive}: its members hold more than {max_bytes / 2**30:,.1f} GiB; nothing was "
                                     "extracted. Fix: pass a larger --max-extract-gb if the archive is genuine.")
            members.append(member)
        dest.mkdir(parents=True, exist_ok=True)
        try:
            tar.extractall(dest, members=members, filter="data")
        except (tarfile.TarError, OSError) as err:
            raise ArchiveProblem(f"{archive}: extraction failed ({type(err).__name__}: {err}). Fix: check the free "
                                 f"space under {dest} and download the archive again.") from None
    return skipped


__all__ = ["APPLEDOUBLE_REASON", "ArchiveProblem", "DEFAULT_MAX_BYTES", "extract_tar", "is_appledouble"]
