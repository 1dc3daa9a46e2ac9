"""DICOM in, DICOM out: a site folder of DICOM series (written here from the synthetic federation with pydicom)
is read like its NIfTI twin; adapt and predict work on it; predict writes a DICOM SEG referencing the series;
no patient name or ID from a header reaches any output, log line or file fedmeta writes besides that SEG."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedmeta.common.data import DataConfig, SiteDataset
from fedmeta.common.dicom import read_series, write_series
from fedmeta.common.synth import load_manifest
from fedmeta.common.validate import check_path
from fedmeta.simulations.cli import main

PATIENT_NAME, PATIENT_ID = "Doe^Jane", "MRN-98765"


def dicom_site(nifti_site: Path, out: Path) -> Path:
    """The NIfTI site as DICOM series (imagesTr/<case>/) with NIfTI labels on each series' grid."""
    meta = json.loads((nifti_site / "dataset.json").read_text())
    (out / "labelsTr").mkdir(parents=True)
    training = []
    for i, entry in enumerate(meta["training"]):
        image = nib.load(nifti_site / entry["image"])
        label = np.asarray(nib.load(nifti_site / entry["label"]).dataobj)
        case = Path(entry["label"]).name.removesuffix(".nii.gz")
        _files, affine, flipped = write_series(np.asarray(image.dataobj, dtype=np.float32), image.affine,
                                               out / "imagesTr" / case, patient_name=PATIENT_NAME,
                                               patient_id=f"{PATIENT_ID}-{i}")
        label = label[:, :, ::-1] if flipped else label
        nib.save(nib.Nifti1Image(np.ascontiguousarray(label).astype(np.uint8), affine),
                 out / "labelsTr" / f"{case}.nii.gz")
        training.append({"image": f"./imagesTr/{case}", "label": f"./labelsTr/{case}.nii.gz"})
    (out / "dataset.json").write_text(json.dumps({**meta, "training": training}))
    return out


@pytest.fixture(scope="module")
def checkpoint(trained_checkpoint) -> Path:
    """The smoke federation's one-round run (unsigned: adapt runs with --allow-unsigned)."""
    return trained_checkpoint


@pytest.fixture(scope="module")
def sites(smoke_federation, tmp_path_factory):
    nifti = smoke_federation / load_manifest(smoke_federation).heldout_sites[0].path
    return nifti, dicom_site(nifti, tmp_path_factory.mktemp("dicom") / nifti.name)


def test_a_series_reads_back_as_the_volume_it_was_written_from(smoke_federation, tmp_path):
    scan = sorted((smoke_federation / "site-01" / "imagesTr").glob("*.nii.gz"))[0]
    image = nib.load(scan)
    data = np.asarray(image.dataobj, dtype=np.float32)
    _files, affine, flipped = write_series(data, image.affine, tmp_path / "s")
    read, voxels = read_series(tmp_path / "s", max_voxels=2**28)
    assert np.allclose(read.affine, affine, atol=1e-4)
    # The same voxels in space: the read affine maps voxel (i, j, k) where the NIfTI's mapped it (k reversed
    # when the NIfTI's affine was left-handed), intensities within the int16 rescale step.
    expected = data[:, :, ::-1] if flipped else data
    assert np.abs(voxels - expected).max() <= (data.max() - data.min()) / 30000 + 1e-4


def test_a_dicom_site_loads_as_its_nifti_twin(sites):
    nifti, dicom = sites
    (report,) = check_path(dicom)
    assert report.ok, report
    config = DataConfig(image_size=(32, 32))
    a, b = SiteDataset.load(nifti, config), SiteDataset.load(dicom, config)
    assert a.patient_ids == b.patient_ids
    for x, y, lx, ly in zip(a.images, b.images, a.labels, b.labels):
        assert torch.equal(lx, ly)  # the same anatomy at the same place, after reorientation to RAS
        assert float((x - y).abs().max()) < 0.01


def test_adapt_and_predict_on_dicom_write_nifti_masks_and_a_dicom_seg_and_leak_no_identifier(
        sites, checkpoint, tmp_path, capsys, caplog):
    import highdicom as hd
    import pydicom

    _nifti, dicom = sites
    caplog.set_level(logging.DEBUG)
    assert main(["check-data", str(dicom)]) == 0
    assert main(["adapt", "--checkpoint", str(checkpoint), "--allow-unsigned", "--data", str(dicom), "--shots", "2",
                 "--steps", "2", "--out", str(tmp_path / "model"), "--device", "cpu"]) == 0
    assert main(["predict", "--model", str(tmp_path / "model"), "--input", str(dicom / "imagesTr"), "--out",
                 str(tmp_path / "masks"), "--dicom-seg", "--device", "cpu"]) == 0
    series = sorted(p for p in (dicom / "imagesTr").iterdir())
    for folder in series:
        mask = nib.load(tmp_path / "masks" / f"{folder.name}.nii.gz")
        read, _ = read_series(folder, max_voxels=2**28)
        assert mask.shape == read.shape and np.allclose(mask.affine, read.affine)
        seg = hd.seg.segread(tmp_path / "masks" / f"{folder.name}.seg.dcm")
        source = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
        assert seg.SeriesInstanceUID != source.SeriesInstanceUID
        referenced = {r.SeriesInstanceUID for r in seg.ReferencedSeriesSequence}
        assert referenced == {source.SeriesInstanceUID}
        assert len(seg.SegmentSequence) == 3
    # Nothing fedmeta printed, logged or wrote (the SEG aside, which DICOM requires to carry them) names a patient.
    out = capsys.readouterr()
    texts = [out.out, out.err, caplog.text]
    for path in [*(tmp_path / "model").iterdir(), *(tmp_path / "masks").iterdir()]:
        if not path.name.endswith(".seg.dcm"):
            texts.append(path.read_bytes().decode("latin-1"))
    for text in texts:
        assert PATIENT_NAME not in text and PATIENT_ID not in text and "Doe" not in text


def test_broken_series_are_refused_by_name(sites, tmp_path):
    _nifti, dicom = sites
    site = tmp_path / "site"
    shutil.copytree(dicom, site)
    folders = sorted(p for p in (site / "imagesTr").iterdir())
    files = sorted(folders[0].iterdir())
    files[len(files) // 2].unlink()  # a missing slice: the volume would be stretched
    other = sorted(folders[1].iterdir())[0]
    shutil.copy(other, folders[2] / "intruder.dcm")  # a slice of another series
    (folders[3] / "slice-0000.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    (report,) = check_path(site)
    messages = {p.case_id: " ".join(p.problems) for p in report.case_problems}
    assert "not evenly spaced" in messages[folders[0].name] and str(folders[0]) in messages[folders[0].name]
    assert "holds 2 series" in messages[folders[2].name]
    assert "not a readable DICOM file" in messages[folders[3].name]


def test_a_malformed_header_value_is_named_by_attribute_never_quoted(sites, tmp_path, capsys):
    import pydicom

    _nifti, dicom = sites
    site = tmp_path / "site"
    shutil.copytree(dicom, site)
    folder = sorted((site / "imagesTr").iterdir())[0]
    victim = sorted(folder.iterdir())[3]
    dataset = pydicom.dcmread(victim)
    del dataset.RescaleSlope  # written back as text: a hostile or damaged value, not a number, not to be echoed
    dataset.add_new(0x00281053, "LO", "DOE^JOHN")
    dataset.save_as(victim)
    assert main(["check-data", str(site)]) == 1
    output = capsys.readouterr()
    assert f"{victim}: its RescaleSlope/RescaleIntercept does not read as numbers" in output.out
    assert "DOE" not in output.out + output.err


def test_a_series_a_dicom_seg_cannot_reference_still_gets_its_mask_and_the_batch_goes_on(sites, checkpoint, tmp_path):
    import pydicom

    _nifti, dicom = sites
    inputs = tmp_path / "series"
    shutil.copytree(dicom / "imagesTr", inputs)
    broken = sorted(inputs.iterdir())[0]
    for path in broken.iterdir():
        dataset = pydicom.dcmread(path)
        del dataset.FrameOfReferenceUID
        dataset.save_as(path)
    assert main(["predict", "--model", str(checkpoint), "--allow-unsigned", "--input", str(inputs), "--out",
                 str(tmp_path / "out"), "--dicom-seg", "--no-overlays", "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(summary["masks"]) == len(list(inputs.iterdir())) and not summary["refused"]
    (first, *rest) = summary["masks"]
    assert first["dicom_seg"].startswith("not written") and all(m["dicom_seg"].endswith(".seg.dcm") for m in rest)
