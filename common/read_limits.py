"""What a site may read: the largest volume it loads, and whether its dataset.json may point outside its folder.

Read from the environment once, where fedmeta starts (a command, the ClientApp), with
:meth:`ReadLimits.from_environment`; the readers and checks below take a :class:`ReadLimits` as an
argument and read no environment variable themselves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

# The largest volume a site loads: 2^28 voxels (a 512 x 512 x 1024 CT; 1 GiB as float32). A header
# declaring more is refused before a byte of data is read; FEDMETA_MAX_VOXELS raises the cap.
DEFAULT_MAX_VOXELS = 2**28


@dataclass(frozen=True)
class ReadLimits:
    """The voxel cap and whether files listed outside the site folder are read (both off the defaults only
    where an operator says so: ``FEDMETA_MAX_VOXELS``, ``FEDMETA_ALLOW_PATHS_OUTSIDE_SITE=1``)."""

    max_voxels: int = DEFAULT_MAX_VOXELS
    allow_paths_outside_site: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_voxels, bool) or not isinstance(self.max_voxels, int) or self.max_voxels <= 0:
            raise ValueError(f"max_voxels={self.max_voxels!r} is not a positive whole number of voxels; give one "
                             f"such as {DEFAULT_MAX_VOXELS}.")

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> ReadLimits:
        """The limits the operator set: ``FEDMETA_MAX_VOXELS`` when set (a positive integer, else a ValueError
        naming it), and ``FEDMETA_ALLOW_PATHS_OUTSIDE_SITE=1``. For the edges only: commands and the ClientApp."""
        environ = os.environ if environ is None else environ
        raw = environ.get("FEDMETA_MAX_VOXELS", "").strip()
        value = DEFAULT_MAX_VOXELS
        if raw:
            try:
                value = int(raw)
            except ValueError:
                value = 0
            if value <= 0:
                raise ValueError(f"FEDMETA_MAX_VOXELS={raw!r} is not a positive whole number of voxels; unset it or "
                                 f"give one such as {DEFAULT_MAX_VOXELS}.")
        return cls(max_voxels=value,
                   allow_paths_outside_site=environ.get("FEDMETA_ALLOW_PATHS_OUTSIDE_SITE") == "1")


__all__ = ["DEFAULT_MAX_VOXELS", "ReadLimits"]
