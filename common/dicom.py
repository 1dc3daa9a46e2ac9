"""DICOM series in, as hospitals export them: one folder per series, read with pydicom, geometry from the headers.

A site folder may list a DICOM series wherever it lists a NIfTI image (``dataset.json``: ``"image":
"./imagesTr/<case>"``, a folder holding one series; the label is a NIfTI map on the series' grid), and
``fedmeta predict`` takes series folders as input. :func:`read_series` turns a series into what the NIfTI
reader gives (an in-memory ``Nifti1Image``: voxel data and an RAS affine), so every check and every step
after it is the NIfTI path's.

Geometry (DICOM PS3.3 C.7.6.2): a pixel at row r, column c of a slice lies at
``ImagePositionPatient + c·Δc·X + r·Δr·Y`` in LPS millimetres, X and Y the row and column direction
cosines of ``ImageOrientationPatient`` and (Δr, Δc) = ``PixelSpacing``; slices are ordered along X × Y by
their position, and the slice step is the distance between consecutive positions (not
``SliceThickness``, which may differ from it). The affine maps (c, r, slice) to RAS: LPS with x and y negated.

Privacy: nothing of a header but geometry, pixel data and the series UID (to check one series per folder)
is read into fedmeta's objects; no header value enters a message, a log line or a file fedmeta writes
(the DICOM tests check that patient names and IDs appear nowhere). Headers are read without pixel data
first, so the voxel cap is checked before a pixel is decoded.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

# Slices whose spacing differs from the series' median step by more than this share are a gap (a missing
# file) or a second stack: the volume would be stretched, so the series is refused.
SPACING_TOLERANCE = 0.1
_REQUIRED = ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns")


class SeriesProblem(ValueError):
    """A series that cannot be read as one 3D volume; the message names the folder or file and the fix."""


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_series_folder(path: Path) -> bool:
    """Whether ``path`` is a folder holding DICOM files (Part 10, with the 'DICM' preamble)."""
    path = Path(path)
    return path.is_dir() and any(_is_dicom_file(p) for p in _files(path))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def read_series(folder: Path, *, max_voxels: int):
    """The series in ``folder`` as ``(Nifti1Image, float32 data)``; raises :class:`SeriesProblem`.

    ``max_voxels``: the largest volume read; a larger series is refused from its headers, before a pixel is
    decoded.
    """
    folder = Path(folder)
    headers = _read_headers(folder)
    geometry = [_geometry(path, header) for path, header in headers]
    rows, cols = geometry[0]["rows"], geometry[0]["cols"]
    if rows * cols * len(headers) > max_voxels:
        raise SeriesProblem(f"{folder}: {len(headers)} slices of {rows} x {cols} = {rows * cols * len(headers):,} "
                            f"voxels, more than the {max_voxels:,} a site loads. Fix: crop or resample the series, or "
                            "raise FEDMETA_MAX_VOXELS if it is genuine.")
    _check_one_stack(headers, geometry)
    order, affine = _stack_affine(folder, geometry)
    headers, geometry = [headers[i] for i in order], [geometry[i] for i in order]
    data = _read_pixels(headers, geometry, rows, cols)
    return nib.Nifti1Image(data, affine), data


def _read_headers(folder: Path) -> list:
    """Every DICOM file's ``(path, header)`` in ``folder``, pixel data not read; one series, every file an image
    with its image plane attributes, or a :class:`SeriesProblem`."""
    files = [p for p in _files(folder) if _is_dicom_file(p)]
    if not files:
        raise SeriesProblem(f"{folder}: holds no DICOM file (Part 10, 'DICM' preamble). Fix: export the series as "
                            "DICOM files, one folder per series.")
    headers = []
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as err:  # noqa: BLE001 - pydicom raises many kinds on a damaged file
            raise SeriesProblem(f"{path}: not a readable DICOM file ({type(err).__name__}). Fix: export the series "
                                "again.") from None
        if "SeriesInstanceUID" not in header or "Rows" not in header:
            raise SeriesProblem(f"{path}: not a readable DICOM file (no series or image attributes: damaged, or not "
                                "an image). Fix: export the series again, or remove the file.")
        headers.append((path, header))
    series = {str(h.get("SeriesInstanceUID", "")) for _, h in headers}
    if len(series) > 1:
        raise SeriesProblem(f"{folder}: holds {len(series)} series; fedmeta reads one series per folder (one scan per "
                            "patient). Fix: move each series into its own folder.")
    for path, header in headers:
        missing = [tag for tag in _REQUIRED if tag not in header]
        if missing:
            raise SeriesProblem(f"{path}: lacks {', '.join(missing)}, so the scan has no geometry. Fix: export the "
                                "series with its image plane attributes (an MR/CT image, not a secondary capture).")
    return headers


def _check_one_stack(headers: list, geometry: list[dict]) -> None:
    """Raises a :class:`SeriesProblem` naming the first slice whose size, orientation or pixel spacing differs
    from the first file's: not one volume."""
    rows, cols = geometry[0]["rows"], geometry[0]["cols"]
    orientation, spacing = geometry[0]["orientation"], geometry[0]["spacing"]
    for (path, _header), g in zip(headers, geometry):
        if (g["rows"], g["cols"]) != (rows, cols):
            raise SeriesProblem(f"{path}: {g['rows']} x {g['cols']} pixels, other slices {rows} x {cols}: "
                                "not one volume. Fix: one series per folder.")
        if not np.allclose(g["orientation"], orientation, atol=1e-4):
            raise SeriesProblem(f"{path}: its slice orientation differs from the series' first slice (a localiser or "
                                "a second stack). Fix: keep one stack of parallel slices in the folder.")
        if not np.allclose(g["spacing"], spacing, rtol=1e-3):
            raise SeriesProblem(f"{path}: its pixel spacing differs from the series' first slice: not one volume. "
                                "Fix: keep one stack of slices of one resolution in the folder.")


def _stack_affine(folder: Path, geometry: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """The slices' order along the slice normal, and the 4x4 RAS affine of the volume they stack into (the
    module docstring's geometry); a :class:`SeriesProblem` where they are not evenly spaced."""
    orientation, spacing = geometry[0]["orientation"], geometry[0]["spacing"]
    x, y = orientation[:3], orientation[3:]
    normal = np.cross(x, y)
    if not np.isfinite(normal).all() or np.linalg.norm(normal) < 0.5:
        raise SeriesProblem(f"{folder}: ImageOrientationPatient {orientation.tolist()} is not two unit vectors at right "
                            "angles. Fix: export the series again.")
    positions = np.asarray([g["position"] for g in geometry])
    depth = positions @ normal
    order = np.argsort(depth, kind="stable")
    positions, depth = positions[order], depth[order]
    steps = np.diff(depth)
    if len(geometry) > 1:
        step = float(np.median(steps))
        if step <= 0 or np.any(np.abs(steps - step) > SPACING_TOLERANCE * step):
            raise SeriesProblem(f"{folder}: its slices are not evenly spaced along the slice normal (steps "
                                f"{np.round(steps, 3).tolist()[:8]} mm): a missing slice or two stacks. Fix: export the "
                                "complete series, one stack per folder.")
        slice_vector = (positions[-1] - positions[0]) / (len(geometry) - 1)
    else:
        slice_vector = normal * (geometry[0]["thickness"] or float(min(spacing)))
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = x * spacing[1], y * spacing[0], slice_vector, positions[0]
    return order, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS


def _read_pixels(headers: list, geometry: list[dict], rows: int, cols: int) -> np.ndarray:
    """The slices' rescaled pixels, in the order given, as float32 ``[columns, rows, slices]`` (the affine's axes)."""
    data = np.empty((cols, rows, len(headers)), dtype=np.float32)
    for k, ((path, _header), g) in enumerate(zip(headers, geometry)):
        try:
            pixels = pydicom.dcmread(path).pixel_array.astype(np.float32)
        except Exception as err:  # noqa: BLE001 - an unsupported transfer syntax, a cut file
            # The exception's type only: pydicom's messages can quote header values.
            raise SeriesProblem(f"{path}: its pixel data cannot be decoded ({type(err).__name__}). Fix: export the "
                                "series uncompressed (or install the pydicom decoder for its transfer syntax).") from None
        if pixels.shape != (rows, cols):
            raise SeriesProblem(f"{path}: pixel data of shape {pixels.shape}, not {rows} x {cols} (a multi-frame or "
                                "colour image). Fix: export single-frame greyscale slices.")
        data[:, :, k] = (pixels * g["slope"] + g["intercept"]).T  # (rows, cols) -> (col, row): the affine's axes
    return data


def _geometry(path: Path, header) -> dict:
    """One slice's geometry and rescale, as numbers; a value that does not parse is named by attribute, never
    quoted (a damaged or hostile header could hold anything, a patient's name included)."""
    attribute = ""
    try:
        attribute = "Rows/Columns"
        rows, cols = int(header.Rows), int(header.Columns)
        attribute = "ImageOrientationPatient"
        orientation = np.asarray([float(v) for v in header.ImageOrientationPatient], dtype=np.float64)
        attribute = "ImagePositionPatient"
        position = np.asarray([float(v) for v in header.ImagePositionPatient], dtype=np.float64)
        attribute = "PixelSpacing"
        spacing = np.asarray([float(v) for v in header.PixelSpacing], dtype=np.float64)  # (between rows, columns)
        attribute = "RescaleSlope/RescaleIntercept"
        slope = float(header.get("RescaleSlope", 1) or 1)
        intercept = float(header.get("RescaleIntercept", 0) or 0)
        attribute = "SliceThickness"
        thickness = float(header.get("SliceThickness", 0) or 0)
    except Exception as err:  # noqa: BLE001 - ValueError, TypeError, pydicom's own
        raise SeriesProblem(f"{path}: its {attribute} does not read as numbers ({type(err).__name__}). Fix: export the "
                            "series again.") from None
    if (orientation.shape != (6,) or position.shape != (3,) or spacing.shape != (2,) or rows < 1 or cols < 1
            or not all(np.isfinite(v).all() for v in (orientation, position, spacing, slope, intercept, thickness))
            or spacing.min() <= 0):
        raise SeriesProblem(f"{path}: its image plane attributes are malformed (6 direction cosines, 3 position values, "
                            "2 positive pixel spacings, finite rescale). Fix: export the series again.")
    return {"rows": rows, "cols": cols, "orientation": orientation, "position": position, "spacing": spacing,
            "slope": slope, "intercept": intercept, "thickness": thickness}


def write_series(volume: np.ndarray, affine: np.ndarray, folder: Path, *, patient_name: str = "Anonymous",
                 patient_id: str = "0", modality: str = "MR", study_uid: str | None = None,
                 series_uid: str | None = None) -> tuple[list[Path], np.ndarray, bool]:
    """Writes a 3D volume (RAS affine, any axis order as a NIfTI holds it) as a single-frame DICOM series.

    For tests and demos: the inverse of :func:`read_series` (axes (column, row, slice)), int16 pixels with a
    rescale slope so that the intensities round-trip to 1/30000 of their range. Returns the files, the RAS
    affine :func:`read_series` will give the series, and whether the slice axis was reversed to get it
    (DICOM orders slices along row × column direction; a left-handed affine runs the other way), so that a
    label map can be written on the series' grid.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    volume = np.asarray(volume, dtype=np.float64)
    affine = np.asarray(affine, dtype=np.float64).copy()
    flipped = bool(np.linalg.det(affine[:3, :3]) < 0)
    if flipped:
        volume = volume[:, :, ::-1]
        affine[:3, 3] += (volume.shape[2] - 1) * affine[:3, 2]
        affine[:3, 2] *= -1
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    col_vec, row_vec, slice_vec = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    dc, dr = float(np.linalg.norm(col_vec)), float(np.linalg.norm(row_vec))
    low, high = float(volume.min()), float(volume.max())
    slope = max(high - low, 1e-6) / 30000.0
    study_uid, series_uid = study_uid or generate_uid(), series_uid or generate_uid()
    frame_uid = generate_uid()
    written = []
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "A1"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, k + 1
        ds.Manufacturer = "fedmeta"
        ds.ImageOrientationPatient = [float(v) for v in (*(col_vec / dc), *(row_vec / dr))]
        ds.ImagePositionPatient = [float(v) for v in lps[:3, 3] + k * slice_vec]
        ds.PixelSpacing = [dr, dc]
        ds.SliceThickness = float(np.linalg.norm(slice_vec))
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{low:.10g}"
        pixels = np.round((volume[:, :, k].T - low) / float(ds.RescaleSlope)).astype(np.int16)
        ds.PixelData = pixels.tobytes()
        path = folder / f"slice-{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written, affine, flipped


def write_segmentation(folder: Path, mask: np.ndarray, path: Path, *, num_classes: int,
                       label_names: dict | None = None) -> Path:
    """A DICOM Segmentation object (highdicom) of ``mask`` — on the grid :func:`read_series` gave the series in
    ``folder`` — referencing that series, one segment per foreground class. The codes are a private scheme
    (``99FEDMETA``): fedmeta does not claim SNOMED meanings for a consortium's label values. The object
    carries the source series' patient and study attributes, as DICOM requires: it stays at the site."""
    # highdicom (with pydicom's code dictionary): +0.17 s on top of what `fedmeta predict` and `adapt` load (python
    # -X importtime); only a DICOM SEG output needs it, a NIfTI prediction never does.
    import highdicom as hd
    from pydicom.sr.codedict import codes  # lazy: see highdicom above

    files = [p for p in _files(Path(folder)) if _is_dicom_file(p)]
    sources = [pydicom.dcmread(p) for p in files]
    normal = np.cross(*np.split(np.asarray(sources[0].ImageOrientationPatient, dtype=np.float64), 2))
    sources.sort(key=lambda d: float(np.asarray([float(v) for v in d.ImagePositionPatient]) @ normal))
    frames = np.stack([mask[:, :, k].T for k in range(mask.shape[2])]).astype(np.uint8)  # (slice, row, col)
    names = {int(k): str(v) for k, v in (label_names or {}).items()}
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=c, segment_label=names.get(c, f"class {c}")[:64],
            segmented_property_category=hd.sr.CodedConcept("F-01", "99FEDMETA", "fedmeta class"),
            segmented_property_type=hd.sr.CodedConcept(f"C-{c}", "99FEDMETA", names.get(c, f"class {c}")[:64]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name="fedmeta", family=codes.cid7162.ArtificialIntelligence, version=_version()),
        )
        for c in range(1, num_classes)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=900,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="fedmeta",
        manufacturer_model_name="fedmeta site model", software_versions=_version(), device_serial_number="0",
    )
    seg.save_as(path)
    return Path(path)


def _version() -> str:
    try:
        return version("fedmeta")
    except PackageNotFoundError:
        return "0"


__all__ = ["SeriesProblem", "is_series_folder", "read_series", "write_segmentation", "write_series"]
