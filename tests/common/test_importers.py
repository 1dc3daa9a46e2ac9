"""`fedmeta import msd|chaos` on miniature downloads with the real layouts: MSD task folders and archives (4D
multi-channel, macOS '._' files, unlabelled imagesTs, nnU-Net v2 dataset.json), hostile archives, and CHAOS CT and
MR patients as DICOM series (written with pydicom) beside PNG ground truth."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from fedmeta.common.dicom import read_series, write_series
from fedmeta.common.import_chaos import import_chaos
from fedmeta.common.import_msd import import_msd
from fedmeta.common.safe_archive import APPLEDOUBLE_REASON, ArchiveProblem
from fedmeta.common.site_layout import discover_site
from fedmeta.simulations.cli import main
from tests.miniature_datasets import APPLEDOUBLE, chaos_series

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def _nifti(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, AFFINE), path)


def brain_tumour_task(root: Path, cases=("BRATS_001", "BRATS_002"), test=("BRATS_485",)) -> Path:
    """A miniature Task01_BrainTumour as the MSD archive unpacks it: 4D [x, y, z, 4] images, '._' files."""
    task = root / "Task01_BrainTumour"
    rng = np.random.default_rng(0)
    for case in cases:
        _nifti(task / "imagesTr" / f"{case}.nii.gz", rng.normal(size=(8, 8, 5, 4)).astype(np.float32))
        _nifti(task / "labelsTr" / f"{case}.nii.gz", rng.integers(0, 4, size=(8, 8, 5)).astype(np.uint8))
        (task / "imagesTr" / f"._{case}.nii.gz").write_bytes(APPLEDOUBLE)
        (task / "labelsTr" / f"._{case}.nii.gz").write_bytes(APPLEDOUBLE)
    for case in test:
        _nifti(task / "imagesTs" / f"{case}.nii.gz", rng.normal(size=(8, 8, 5, 4)).astype(np.float32))
        (task / "imagesTs" / f"._{case}.nii.gz").write_bytes(APPLEDOUBLE)
    (task / "._dataset.json").write_bytes(APPLEDOUBLE)
    meta = {
        "name": "BRATS", "description": "Gliomas segmentation tumour and oedema in on brain images",
        "reference": "https://www.med.upenn.edu/sbia/brats2017.html", "licence": "CC-BY-SA 4.0", "release": "2.0",
        "tensorImageSize": "4D", "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": len(cases), "numTest": len(test),
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases],
        "test": [f"./imagesTs/{c}.nii.gz" for c in test],
    }
    (task / "dataset.json").write_text(json.dumps(meta))
    return task


def _tar(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


@pytest.mark.parametrize("as_archive", [False, True], ids=["folder", "tar"])
def test_a_4d_msd_task_imports_with_its_channels_test_images_and_skipped_appledouble_files(tmp_path, as_archive):
    task = brain_tumour_task(tmp_path / "download")
    source = _tar(task, tmp_path / "Task01_BrainTumour.tar") if as_archive else task
    summary = import_msd(source, tmp_path / "site")

    site = tmp_path / "site"
    meta = json.loads((site / "dataset.json").read_text())
    assert meta["modality"] == meta["channel_names"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert meta["labels"]["3"] == "enhancing tumour"
    assert [e["image"] for e in meta["training"]] == ["./imagesTr/BRATS_001.nii.gz", "./imagesTr/BRATS_002.nii.gz"]
    assert meta["test"] == ["./imagesTs/BRATS_485.nii.gz"]
    assert nib.load(site / "imagesTr" / "BRATS_001.nii.gz").shape == (8, 8, 5, 4)  # kept 4D
    assert np.array_equal(nib.load(site / "imagesTr" / "BRATS_002.nii.gz").get_fdata(),
                          nib.load(task / "imagesTr" / "BRATS_002.nii.gz").get_fdata())
    assert not list(site.rglob("._*"))
    assert (summary.cases, summary.test_images) == (2, 1)
    prefix = "Task01_BrainTumour/"
    assert summary.skipped == {prefix + name: APPLEDOUBLE_REASON for name in (
        "._dataset.json", "imagesTr/._BRATS_001.nii.gz", "imagesTr/._BRATS_002.nii.gz", "imagesTs/._BRATS_485.nii.gz",
        "labelsTr/._BRATS_001.nii.gz", "labelsTr/._BRATS_002.nii.gz")} if as_archive else summary.skipped
    if not as_archive:
        assert set(summary.skipped) == {"._dataset.json", "imagesTr/._BRATS_001.nii.gz", "imagesTr/._BRATS_002.nii.gz",
                                        "imagesTs/._BRATS_485.nii.gz", "labelsTr/._BRATS_001.nii.gz",
                                        "labelsTr/._BRATS_002.nii.gz"}
    assert json.loads((site / "import-summary.json").read_text())["cases"] == 2
    layout = discover_site(site)  # the reader fedmeta check-data uses finds exactly these cases
    assert [c.case_id for c in layout.cases] == ["BRATS_001", "BRATS_002"] and not layout.unlisted
    assert task.joinpath("imagesTr", "BRATS_001.nii.gz").is_file()  # a folder source is copied, never moved


def test_an_nnunet_v2_task_with_per_channel_files_and_name_to_value_labels(tmp_path):
    task = tmp_path / "Dataset003_Liver"
    rng = np.random.default_rng(1)
    for case in ("liver_0", "liver_1"):
        _nifti(task / "imagesTr" / f"{case}_0000.nii.gz", rng.normal(size=(6, 7, 4)).astype(np.float32))
        _nifti(task / "labelsTr" / f"{case}.nii.gz", rng.integers(0, 3, size=(6, 7, 4)).astype(np.uint8))
    _nifti(task / "imagesTs" / "liver_9_0000.nii.gz", rng.normal(size=(6, 7, 4)).astype(np.float32))
    (task / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
        "numTraining": 2, "file_ending": ".nii.gz"}))
    summary = import_msd(task, tmp_path / "site")
    meta = json.loads((tmp_path / "site" / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "liver", "2": "tumour"}
    assert meta["modality"] == {"0": "CT"}
    assert [e["label"] for e in meta["training"]] == ["./labelsTr/liver_0.nii.gz", "./labelsTr/liver_1.nii.gz"]
    assert [e["image"] for e in meta["training"]] == ["./imagesTr/liver_0.nii.gz", "./imagesTr/liver_1.nii.gz"]
    assert meta["test"] == ["./imagesTs/liver_9.nii.gz"] and summary.skipped == {}


def test_nnunet_v2_per_channel_files_are_stacked_in_channel_order(tmp_path):
    task = tmp_path / "Dataset005_Prostate"
    t2, adc = np.full((4, 4, 3), 1.0, np.float32), np.full((4, 4, 3), 2.0, np.float32)
    _nifti(task / "imagesTr" / "p_0000.nii.gz", t2)
    _nifti(task / "imagesTr" / "p_0001.nii.gz", adc)
    _nifti(task / "labelsTr" / "p.nii.gz", np.zeros((4, 4, 3), np.uint8))
    (task / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2", "1": "ADC"},
                                                   "labels": {"background": 0, "PZ": 1, "TZ": 2}}))
    import_msd(task, tmp_path / "site")
    stacked = nib.load(tmp_path / "site" / "imagesTr" / "p.nii.gz").get_fdata()
    assert stacked.shape == (4, 4, 3, 2) and stacked[..., 0].max() == 1 and stacked[..., 1].min() == 2


def _hostile(tar_path: Path, kind: str) -> None:
    with tarfile.open(tar_path, "w") as tar:
        good = tarfile.TarInfo("Task09_Spleen/dataset.json")
        good.size = 2
        tar.addfile(good, io.BytesIO(b"{}"))
        bad = tarfile.TarInfo({"dotdot": "Task09_Spleen/../../evil.txt", "absolute": "/tmp/evil.txt",
                               "symlink": "Task09_Spleen/imagesTr/link.nii.gz",
                               "hardlink": "Task09_Spleen/imagesTr/hard.nii.gz",
                               "device": "Task09_Spleen/imagesTr/dev"}[kind])
        if kind == "symlink":
            bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            bad.type, bad.linkname = tarfile.LNKTYPE, "Task09_Spleen/dataset.json"
        elif kind == "device":
            bad.type = tarfile.CHRTYPE
        else:
            bad.size = 4
        tar.addfile(bad, io.BytesIO(b"evil") if bad.isfile() else None)


@pytest.mark.parametrize("kind,words", [("dotdot", "'..'"), ("absolute", "absolute path"), ("symlink", "symbolic link"),
                                        ("hardlink", "hard link"), ("device", "device file")])
def test_a_hostile_archive_member_refuses_the_archive_and_writes_nothing(tmp_path, kind, words):
    archive = tmp_path / "dl" / "Task09_Spleen.tar"
    archive.parent.mkdir()
    _hostile(archive, kind)
    with pytest.raises(ArchiveProblem, match=words) as err:
        import_msd(archive, tmp_path / "out" / "site")
    assert "nothing was extracted" in str(err.value) and "Fix:" in str(err.value)
    assert not (tmp_path / "out" / "site").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # the scratch folder is gone too
    assert not (tmp_path / "evil.txt").exists()


def test_an_archive_larger_than_the_bound_is_refused(tmp_path):
    archive = _tar(brain_tumour_task(tmp_path / "dl"), tmp_path / "Task01_BrainTumour.tar")
    with pytest.raises(ArchiveProblem, match="more than"):
        import_msd(archive, tmp_path / "site", max_bytes=1000)


def _break(task: Path, how: str) -> None:
    meta = json.loads((task / "dataset.json").read_text())
    if how == "missing label":
        (task / "labelsTr" / "BRATS_002.nii.gz").unlink()
    elif how == "3D where 4 channels":
        _nifti(task / "imagesTr" / "BRATS_001.nii.gz", np.zeros((8, 8, 5), np.float32))
    elif how == "label grid":
        _nifti(task / "labelsTr" / "BRATS_001.nii.gz", np.zeros((8, 8, 6), np.uint8))
    elif how == "region labels":
        meta["labels"] = {"background": 0, "whole tumour": [1, 2, 3]}
    elif how == "escaping path":
        meta["training"][0]["image"] = "../../secret.nii.gz"
    elif how == "no modality":
        del meta["modality"]
    (task / "dataset.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("how,words", [
    ("missing label", "BRATS_002.nii.gz: the label map"), ("3D where 4 channels", "declares 4 channels"),
    ("label grid", "not one grid"), ("region labels", "regions"), ("escaping path", "outside the task folder"),
    ("no modality", "'modality'")])
def test_bad_tasks_are_refused_naming_the_file_and_the_fix(tmp_path, how, words):
    task = brain_tumour_task(tmp_path / "dl")
    _break(task, how)
    with pytest.raises(ValueError, match=words) as err:
        import_msd(task, tmp_path / "site")
    assert "Fix" in str(err.value) and not (tmp_path / "site").exists()


def test_an_existing_site_is_never_overwritten_and_the_cli_reports_errors(tmp_path, capsys):
    task = brain_tumour_task(tmp_path / "dl")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "mine.txt").write_text("a site's own file")
    assert main(["import", "msd", str(task), "--out", str(tmp_path / "site")]) == 2
    assert "never overwrites" in capsys.readouterr().err
    assert (tmp_path / "site" / "mine.txt").read_text() == "a site's own file"
    assert main(["import", "msd", str(task), "--out", str(tmp_path / "new")]) == 0
    out = capsys.readouterr().out
    assert "2 labelled" in out and "._dataset.json" in out and "FLAIR" in out


# --------------------------------------------------------------------------------------------- CHAOS


def _slice_masks(n: int, size: int = 12) -> np.ndarray:
    """A different square on every slice (slice k: side k + 2), so a slice put in the wrong place shows."""
    masks = np.zeros((size, size, n), dtype=bool)  # (column, row, slice) as read_series holds a series
    for k in range(n):
        masks[1 : k + 3, 2 : k + 4, k] = True
    return masks


@pytest.mark.parametrize("affine,reverse_instances", [
    (np.diag([0.8, 0.8, 2.5, 1.0]), False), (np.diag([0.8, 0.8, 2.5, 1.0]), True),
    (np.diag([-0.8, 0.8, 2.5, 1.0]), False), (np.diag([-0.8, 0.8, -2.5, 1.0]), True)],
    ids=["instances-up", "instances-down", "left-handed", "flipped-instances-down"])
def test_a_chaos_ct_patient_becomes_a_nifti_case_on_the_dicom_grid(tmp_path, affine, reverse_instances):
    root = tmp_path / "CHAOS_Train_Sets"
    patient = root / "Train_Sets" / "CT" / "1"
    masks = _slice_masks(5)
    chaos_series(patient / "DICOM_anon", patient / "Ground", masks, 255, "CT", affine, reverse_instances)
    summary = import_chaos(root, tmp_path / "site", modality="ct")

    site = tmp_path / "site"
    image = nib.load(site / "imagesTr" / "CT_1.nii.gz")
    label = np.asarray(nib.load(site / "labelsTr" / "CT_1.nii.gz").dataobj)
    reference, _ = read_series(patient / "DICOM_anon", max_voxels=10**6)
    assert np.allclose(image.affine, reference.affine)
    if np.linalg.det(affine) > 0:  # a left-handed affine comes back with its slice axis reversed (write_series)
        assert np.allclose(image.affine, affine)
    assert set(np.unique(label)) == {0, 1}
    # every slice carries its own square: the PNGs followed the instances, not the file names
    expected = masks if np.linalg.det(affine) > 0 else masks[:, :, ::-1]
    assert np.array_equal(label.astype(bool), expected)
    assert json.loads((site / "dataset.json").read_text())["labels"] == {"0": "background", "1": "liver"}
    assert summary.cases == 1 and list(summary.skipped) == ["Train_Sets/CT/1/Ground/._liver_GT_000.png"]
    assert [c.case_id for c in discover_site(site).cases] == ["CT_1"]


def test_chaos_mr_grey_values_map_to_liver_kidneys_and_spleen(tmp_path):
    root = tmp_path / "Train_Sets"
    sequence = root / "MR" / "2" / "T2SPIR"
    n = 4
    organs = np.zeros((12, 12, n), dtype=np.uint8)
    organs[1:4, 1:4], organs[5:7, 1:3], organs[8:10, 1:3], organs[1:3, 8:11] = 63, 126, 189, 252
    volume = np.random.default_rng(3).normal(size=organs.shape)
    files, _affine, _ = write_series(volume, np.diag([1.5, 1.5, 6.0, 1.0]), sequence / "DICOM_anon")
    (sequence / "Ground").mkdir()
    for k in range(n):
        Image.fromarray(organs[:, :, k].T).save(sequence / "Ground" / f"IMG-0002-{k + 1:05d}.png")
    import_chaos(root, tmp_path / "site", modality="mr")
    label = np.asarray(nib.load(tmp_path / "site" / "labelsTr" / "MR_2_T2SPIR.nii.gz").dataobj)
    expected = np.select([organs == 63, organs == 126, organs == 189, organs == 252], [1, 2, 3, 4], 0)
    assert np.array_equal(label, expected)
    assert json.loads((tmp_path / "site" / "dataset.json").read_text())["labels"]["4"] == "spleen"


@pytest.mark.parametrize("how,words", [("one png fewer", r"4 PNG\(s\) for the 5 slices"),
                                       ("stray grey", "grey values"), ("png size", "pixels, its DICOM slice")])
def test_bad_chaos_ground_truth_is_refused_naming_the_file(tmp_path, how, words):
    root = tmp_path / "Train_Sets"
    patient = root / "CT" / "7"
    chaos_series(patient / "DICOM_anon", patient / "Ground", _slice_masks(5), 255, "CT", np.diag([1.0, 1.0, 2.0, 1]))
    png = patient / "Ground" / "liver_GT_002.png"
    if how == "one png fewer":
        png.unlink()
    elif how == "stray grey":
        Image.fromarray(np.full((12, 12), 77, np.uint8)).save(png)
    else:
        Image.fromarray(np.zeros((10, 12), np.uint8)).save(png)
    with pytest.raises(ValueError, match=words) as err:
        import_chaos(root, tmp_path / "site", modality="ct")
    assert "Fix" in str(err.value) and not (tmp_path / "site").exists()


def test_chaos_without_the_modality_folder_says_what_to_give(tmp_path):
    (tmp_path / "Train_Sets" / "CT").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="Train_Sets/MR"):
        import_chaos(tmp_path, tmp_path / "site", modality="mr")
