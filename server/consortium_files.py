"""The consortium folder ``fedmeta provision`` keeps: writing inside it and never through a link, its registry,
and what one call wrote (the layout: ``fedmeta.server.provision``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from fedmeta.common.outputs import FOLDER_MODE, PRIVATE_FOLDER_MODE, OutputRefused, make_folder, refuse_links


@dataclass
class Provisioned:
    """What one call wrote (``created``), kept (``kept``) and when each certificate expires."""

    out: Path
    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    expiry: dict[str, str] = field(default_factory=dict)
    rekeyed: list[str] = field(default_factory=list)  # sites whose registered key changed


def is_consortium(out: Path) -> bool:
    """Whether ``out`` holds a consortium an older fedmeta provision made (a registry, before the output journal)."""
    try:
        registry = json.loads((out / "registry.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(registry, dict) and isinstance(registry.get("sites"), dict) and "address" in registry


def read_registry(out: Path) -> dict:
    path = out / "registry.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); restore it from a backup or provision a new folder.") from None


def write_file(path: Path, data: bytes, mode: int, *, out: Path) -> None:
    """Writes ``path`` (inside the consortium folder ``out``) with ``mode`` from its creation on (a private key is
    never world-readable, even briefly); a folder made for a private key is 0700, any other 0755, whatever the
    caller's umask. A symbolic link on the way from ``out`` (folder or file) is refused, never followed."""
    make_folder(path.parent, PRIVATE_FOLDER_MODE if mode & 0o077 == 0 else FOLDER_MODE, within=out)
    refuse_links(path, out)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, mode)  # the umask may have narrowed it
    os.replace(tmp, path)


def refuse_links_in(out: Path, paths: list[Path]) -> None:
    """Raises :class:`OutputRefused` naming every symbolic link among ``paths`` (inside ``out``), the folders
    above them and, below those that are folders, every entry provision writes over."""
    links = []
    for path in sorted(set(paths)):
        parts = path.relative_to(out).parts
        link = next((out.joinpath(*parts[:depth]) for depth in range(len(parts) + 1)
                     if out.joinpath(*parts[:depth]).is_symlink()), None)
        if link is not None:
            links.append(link)
            continue
        for folder, subfolders, files in os.walk(path):  # does not descend into linked folders, lists them
            links += [Path(folder) / name for name in (*subfolders, *files) if (Path(folder) / name).is_symlink()]
    if links:
        shown = ", ".join(f"{link} -> {os.readlink(link)}" for link in sorted(set(links)))
        raise OutputRefused(f"{shown}: symbolic link(s) in the consortium folder {out}; provision writes only inside it "
                            "and never through a link, which would put keys and start scripts outside it. Replace each "
                            "link with the folder or file itself, or remove it, and run again (nothing was written).")


__all__ = ["Provisioned", "is_consortium", "read_registry", "refuse_links_in", "write_file"]
