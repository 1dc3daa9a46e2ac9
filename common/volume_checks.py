"""Reading one volume (a NIfTI file or a DICOM series folder) and what can be wrong with it on its own.

Every check that needs no partner: the header's declared size against the file and the voxel cap before
any data is read, the data type, the dimensions, the affine, and the intensities. :func:`check_scan` applies
them to a scan to segment; :func:`fedmeta.common.validate.check_case` to a case's image and label.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from fedmeta.common.read_limits import DEFAULT_MAX_VOXELS, ReadLimits

# DEFLATE cannot compress better than about 1032:1, so a .gz whose header declares more data than that
# times its size is lying about its contents (or is a decompression bomb): refuse it without inflating.
_MAX_DEFLATE_RATIO = 1032


def _load_nifti(path: Path, role: str, limits: ReadLimits = ReadLimits()
                ) -> tuple[object | None, np.ndarray | None, str | None]:
    """``path`` as (nibabel image, voxel data, None), or (None, None, the problem) when it cannot be read within
    ``limits``."""
    # nibabel: +0.14 s on this module's import (python -X importtime); `fedmeta synth` imports it (through
    # fedmeta.common.data) and, for a lazy preset, reads no volume. The ClientApp has it from MONAI anyway.
    import nibabel as nib

    if path.is_dir():  # a DICOM series: one folder per scan
        # fedmeta.common.dicom loads pydicom and nibabel (+0.13 s): only a DICOM series folder needs them.
        from fedmeta.common.dicom import SeriesProblem, read_series

        try:
            image, data = read_series(path, max_voxels=limits.max_voxels)
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
    try:
        image = nib.load(str(path))  # reads the header only: the data stays on disk until asked for
        problem = (_declared_size_problem(path, image, limits.max_voxels)
                   or dtype_problem(path, image.get_data_dtype(), role))
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


def _declared_size_problem(path: Path, image, cap: int) -> str | None:
    """What is wrong with the data size a NIfTI header declares, checked from the header and the file's
    size alone (milliseconds, nothing allocated): beyond the voxel cap ``cap``, more than the file can hold
    (uncompressed), or more than DEFLATE could have packed into it (compressed)."""
    shape = tuple(int(n) for n in image.shape)
    voxels = 1
    for n in shape:
        voxels *= max(n, 0)
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


def _non_finite_problem(path: Path, data: np.ndarray) -> str | None:
    """Voxels of a scan that are NaN or Inf: a failed export, or values no model input may hold."""
    finite = np.isfinite(data)
    if not finite.all():
        return (f"{path}: {int((~finite).sum())} voxels are NaN or Inf. Fix: re-export the scan, or replace them "
                "(e.g. by 0) before use.")
    return None


# Voxel sizes a scan can have (mm): beyond them the header is damaged, and resampling to the model's spacing
# would make a volume of no use (or of tens of GB: 32^3 voxels of 100 mm are 1067^3 at 3 mm).
VOXEL_MM_RANGE = (0.01, 20.0)


def affine_problem(path: Path, affine, shape: tuple[int, ...], *, max_voxels: int = DEFAULT_MAX_VOXELS) -> str | None:
    """What is wrong with a scan's affine — not finite, axes parallel (no orientation), voxel sizes outside
    :data:`VOXEL_MM_RANGE`, or a physical extent resampling would turn into more voxels than ``max_voxels`` —
    or None."""
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
    if float(np.prod(np.maximum(extent, 1.0))) > max_voxels:  # at 1 mm, finer than any model's spacing here
        return (f"{path}: it spans {' x '.join(f'{e:.0f}' for e in extent)} mm, more than {max_voxels:,} voxels at "
                "1 mm; the header is damaged or the scan is not of a patient. Fix: export the scan again.")
    return None


def ras_grid(shape, affine) -> tuple[tuple[int, ...], np.ndarray]:
    """The shape and voxel sizes (mm) :func:`fedmeta.common.data.to_ras` gives a volume of ``shape``, from the header
    alone."""
    from nibabel import orientations  # lazy: nibabel's import is paid only where a volume is read

    affine = np.asarray(affine, dtype=np.float64)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    ras_shape, ras_zooms = [0] * 3, np.zeros(3)
    for axis, (ras_axis, _) in enumerate(orientations.io_orientation(affine)):
        ras_shape[int(ras_axis)], ras_zooms[int(ras_axis)] = int(shape[axis]), zooms[axis]
    return tuple(ras_shape), ras_zooms


def check_scan(path: Path, *, min_slices: int = 1, limits: ReadLimits = ReadLimits(), channels: int = 1
               ) -> tuple[list[str], object | None, np.ndarray | None]:
    """An unlabelled scan to segment: (problems, nibabel image, float32 data). The checks ``check_case``
    applies to an image: the header's size against the file and ``limits.max_voxels`` before any data is
    read, one 3D volume of real numbers, an invertible finite affine, finite intensities that are not all one
    value, and at least ``min_slices`` voxels along every axis (a volume thinner than that is not a scan the
    model can segment). ``channels`` > 1: a 4D scan with that many volumes (the model's input channels, last)."""
    image, data, error = _load_nifti(Path(path), "image", limits)
    if error:
        return [error], None, None
    if data.ndim == 4 and data.shape[3] == 1 and channels == 1:
        data = data[..., 0]
    if channels > 1 and not (data.ndim == 4 and data.shape[3] == channels):
        return [f"{path}: the model takes {channels} channels, the scan holds "
                f"{data.shape[3] if data.ndim == 4 else 1} (shape {tuple(data.shape)}). Fix: write the scan as one 4D "
                f"NIfTI of {channels} volumes in the order of the model's channels (its run config's `channels`), as "
                "the site's training images are."], None, None
    if channels == 1 and data.ndim != 3:
        return [_dimensions_problem(path, data.shape, "it")], None, None
    problem = affine_problem(Path(path), image.affine, data.shape[:3], max_voxels=limits.max_voxels)
    if problem:
        return [problem], None, None
    if min(data.shape[:3]) < min_slices:
        return [f"{path}: the volume is {' x '.join(map(str, data.shape))} voxels, thinner than {min_slices} along one "
                "axis: a localiser or a single slice, not a scan the model can segment. Fix: pass the full 3D "
                "series."], None, None
    data = np.asarray(data, dtype=np.float32)
    problem = _non_finite_problem(path, data)
    # Each channel on its own: a blank channel beside a good one is as useless as a blank scan.
    for index in range(data.shape[3] if data.ndim == 4 else 1):
        if problem:
            break
        problem = uniform_problem(Path(path), data[..., index] if data.ndim == 4 else data)
        if problem and data.ndim == 4:
            problem = problem.replace("every voxel of the image", f"every voxel of channel {index}")
    if problem:
        return [problem], None, None
    return [], image, data
