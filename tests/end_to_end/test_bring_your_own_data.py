"""Bring your own data, end to end (issue 30, "Done when"): for miniature downloads of MSD Task01 (4 MR channels),
Task03 (CT, liver + tumour), Task05 (2 MR channels) and CHAOS CT and MR (T2SPIR), three downloads that play three
hospitals go through ``fedmeta import`` -> ``check-data`` -> ``plan`` (two training sites, one held out) -> a 2-round
in-process ``simulate`` -> ``adapt`` at the held-out hospital -> ``predict``, and every mask lies in its input's own
grid: an imported NIfTI (4D for the multi-channel tasks), the same scan cropped and stored in another axis order, an
MSD imagesTs scan, and for CHAOS a DICOM series as the held-out hospital's scanner wrote it (its first axis running
right to left). Across the three hospitals the intensity scale and voxel size vary a little, one exports left-handed
grids, and a CHAOS scanner numbers its instances against the slice normal.

The downloads (tests/miniature_datasets.py) keep the datasets' folder layouts, file names, headers and label
conventions, with volumes of a few thousand voxels; one MSD download per task is its .tar, and one import runs as
the installed console command. Each dataset takes 5-15 s on 2 shared cores (one torch thread).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tarfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedmeta.common.dicom import read_series
from fedmeta.simulations.cli import main
from tests.miniature_datasets import Hospital, chaos_train_sets, msd_task

pytestmark = [pytest.mark.slow]


@dataclass(frozen=True)
class Dataset:
    """One dataset as three hospitals download it: ``source`` 'msd' (``task``) or 'chaos' (``modality``); the
    channels and classes its dataset.json declares; the last hospital is held out."""

    source: str
    task: str  # 'Task01' ... for MSD, 'ct' | 'mr' for CHAOS
    hospitals: tuple[Hospital, Hospital, Hospital]
    channels: tuple[str, ...]
    num_classes: int
    archive: int | None = None  # the hospital whose MSD download is the .tar, as medicaldecathlon.com serves it
    console: int | None = None  # the hospital imported by the installed `fedmeta` command, not in process


DATASETS = [
    pytest.param(Dataset("msd", "Task01", (Hospital(1.0, 1.0, 1.3, seed=1), Hospital(1.15, 0.9, 1.5, seed=2),
                                           Hospital(0.85, 1.1, 1.2, flip_x=True, seed=3)),
                         ("FLAIR", "T1w", "t1gd", "T2w"), 4, archive=1), id="msd-task01-braintumour-4ch"),
    pytest.param(Dataset("msd", "Task03", (Hospital(1.0, 0.8, 5.0, seed=4), Hospital(1.1, 0.7, 4.0, seed=5),
                                           Hospital(0.95, 0.9, 5.0, flip_x=True, seed=6)),
                         ("CT",), 3, archive=0), id="msd-task03-liver-ct"),
    pytest.param(Dataset("msd", "Task05", (Hospital(1.0, 0.6, 3.6, seed=7), Hospital(1.2, 0.65, 3.0, seed=8),
                                           Hospital(0.8, 0.55, 4.0, flip_x=True, seed=9)),
                         ("T2", "ADC"), 3, archive=2, console=0), id="msd-task05-prostate-2ch"),
    pytest.param(Dataset("chaos", "ct", (Hospital(1.0, 0.75, 3.0, seed=10), Hospital(1.05, 0.8, 2.5, seed=11),
                                         Hospital(0.95, 0.7, 3.0, flip_x=True, seed=12)),
                         ("CT",), 2, console=2), id="chaos-ct-liver"),
    pytest.param(Dataset("chaos", "mr", (Hospital(1.0, 1.5, 6.0, seed=13), Hospital(1.3, 1.6, 7.0, seed=14),
                                         Hospital(0.8, 1.4, 6.0, flip_x=True, seed=15)),
                         ("MR T2SPIR",), 5), id="chaos-mr-t2spir-4-organs"),
]
NAMES = ("hospital-a", "hospital-b", "hospital-c")  # a site is named by its folder; hospital-c is held out


@pytest.fixture
def one_thread():
    """One torch thread: on 2 cores shared with other work, intra-op threads on these tiny tensors only contend
    (adapt took 53 s with 2 threads beside a benchmark, 7 s with one)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(args: list[str], capsys) -> str:
    """``fedmeta ARGS`` in process; its stdout and stderr, the command and its output in the failure message."""
    code = main(args)
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert code == 0, f"fedmeta {' '.join(args)} exited {code}:\n{output[-4000:]}"
    return output


def _download(dataset: Dataset, number: int, root: Path) -> Path:
    """Hospital ``number``'s download, as the dataset's site serves it: an MSD task folder or its .tar, or a
    CHAOS_Train_Sets folder (the second hospital's scanner numbers instances against the slice normal)."""
    hospital = dataset.hospitals[number]
    if dataset.source == "msd":
        folder = msd_task(root, dataset.task, hospital, cases=4, test=1)
        if number != dataset.archive:
            return folder
        archive = root / f"{folder.name}.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(folder, arcname=folder.name)
        shutil.rmtree(folder)
        return archive
    return chaos_train_sets(root, dataset.task, hospital, patients=4, reverse_instances=number == 1)


def _import(dataset: Dataset, number: int, source: Path, site: Path, capsys) -> None:
    args = (["import", "msd", str(source), "--out", str(site)] if dataset.source == "msd"
            else ["import", "chaos", str(source), "--modality", dataset.task, "--out", str(site)])
    if number == dataset.console:
        fedmeta = Path(sys.executable).with_name("fedmeta")
        assert fedmeta.is_file(), f"{fedmeta}: the console command is not installed beside {sys.executable}"
        done = subprocess.run([str(fedmeta), *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        output = done.stdout
    else:
        output = _run(args, capsys)
    assert "skipped" in output and "AppleDouble" in output  # the '._' files every download holds are left out


def _prediction_inputs(dataset: Dataset, site: Path, download: Path, scans: Path) -> dict[str, Path]:
    """The scans ``predict`` gets, by the case name its mask takes: (a) one of the held-out site's imported images,
    and the same scan cropped and stored in another axis order; for MSD, its unlabelled imagesTs scan; (b) for
    CHAOS, a patient's DICOM series as the scanner wrote it."""
    scans.mkdir()
    meta = json.loads((site / "dataset.json").read_text())
    chosen = [site / meta["training"][0]["image"]] + [site / path for path in meta["test"]]
    inputs = {}
    for path in chosen:
        inputs[path.name.removesuffix(".nii.gz")] = shutil.copy2(path, scans / path.name)
    inputs["reoriented"] = _reoriented(chosen[0], scans / "reoriented.nii.gz")
    if dataset.source == "chaos":
        patient = sorted((download / "Train_Sets" / dataset.task.upper()).iterdir())[-1]
        series = patient / "DICOM_anon" if dataset.task == "ct" else patient / "T2SPIR" / "DICOM_anon"
        name = f"native-{dataset.task}-{patient.name}"
        inputs[name] = Path(shutil.copytree(series, scans / name))
    return inputs


def _reoriented(source: Path, target: Path) -> Path:
    """``source`` cropped by 3 voxels along its second axis and stored with its first two axes swapped: a grid of
    another shape and handedness over the same anatomy, as another export writes it."""
    image = nib.load(source)
    data = np.asarray(image.dataobj)[:, 3:]
    shift = np.eye(4)
    shift[1, 3] = 3
    affine = (image.affine @ shift)[:, [1, 0, 2, 3]]  # new voxel (i, j, k) is the cropped scan's (j, i, k)
    nib.save(nib.Nifti1Image(np.swapaxes(data, 0, 1), affine), target)
    return target


def _grid(scan: Path) -> tuple[tuple[int, ...], np.ndarray, bool]:
    """An input's spatial shape, its affine, and whether that affine is a NIfTI header's (exact) or the one
    read_series derives from the DICOM geometry (float64, against the mask's float32 header)."""
    if scan.is_dir():
        image, data = read_series(scan, max_voxels=10**7)
        return data.shape[:3], image.affine, False
    image = nib.load(scan)
    return image.shape[:3], image.affine, True


@pytest.mark.parametrize("dataset", DATASETS)
def test_import_check_plan_simulate_adapt_predict_on_a_dataset_as_hospitals_download_it(dataset, tmp_path, capsys,
                                                                                       one_thread):
    downloads, sites = [], []
    for number, name in enumerate(NAMES):
        downloads.append(_download(dataset, number, tmp_path / "downloads" / name))
        sites.append(tmp_path / "sites" / name)
        _import(dataset, number, downloads[-1], sites[-1], capsys)
        meta = json.loads((sites[-1] / "dataset.json").read_text())
        assert tuple(meta["modality"][str(i)] for i in range(len(meta["modality"]))) == dataset.channels
        # what the importer printed as `next:` passes as it is: no problem, no warning
        output = _run(["check-data", str(sites[-1])], capsys)
        assert "1/1 site(s) clean" in output and "warning" not in output, output

    plan = tmp_path / "plan"
    _run(["plan", "--sites", str(sites[0]), str(sites[1]), "--heldout", str(sites[2]), "--out", str(plan),
          "--max-image-size", "32", "--quiet"], capsys)
    planned = json.loads((plan / "plan.json").read_text())
    keys = tomllib.loads((plan / "run-config.toml").read_text())
    assert planned["choices"]["channels"]["value"] == list(dataset.channels)  # dataset.json's order
    assert keys["in-channels"] == len(dataset.channels) and keys["channels"] == ",".join(dataset.channels)
    assert keys["num-classes"] == dataset.num_classes
    if dataset.channels == ("CT",):  # a CT window from the training sites' HU, not the unplanned -1024..3071
        assert -1024 < keys["ct-clip-low"] < keys["ct-clip-high"] < 3071 and keys["ct-std"] > 0
    manifest = json.loads((plan / "manifest.json").read_text())
    assert {s["name"]: s["role"] for s in manifest["sites"]} == {"hospital-a": "train", "hospital-b": "train",
                                                                 "hospital-c": "heldout"}
    # the held-out hospital's scans against the plan: its spacing is near the federation's, its labels fit
    output = _run(["check-data", str(sites[2]), "--plan", str(plan)], capsys)
    assert "1/1 site(s) clean" in output and "warning" not in output, output

    run = tmp_path / "run"
    _run(["simulate", "--federation-dir", str(plan), "--preset", str(plan / "run-config.toml"), "--engine",
          "inprocess", "--rounds", "2", "--out", str(run), "--oracle-steps", "20", "--set", "k-shot=2",
          "--set", "q-query=2", "--set", "eval-k-shot=2"], capsys)
    results = json.loads((run / "results.json").read_text())
    assert results["run_config"]["num-rounds"] == 2 and results["run_config"]["plan-sha256"] == keys["plan-sha256"]
    heldout_dice = {(init, steps): dice for init, by_site in results["comparison"]["sites"].items()
                    for steps, dice in by_site["hospital-c"].items()}
    assert len(heldout_dice) >= 8 and all(math.isfinite(d) and 0 <= d <= 1 for d in heldout_dice.values()), \
        heldout_dice

    model = tmp_path / "model"
    _run(["adapt", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(sites[2]), "--shots", "2", "--out",
          str(model), "--allow-unsigned"], capsys)
    assert (model / "model.pt").is_file()

    inputs = _prediction_inputs(dataset, sites[2], downloads[2], tmp_path / "scans")
    masks = tmp_path / "masks"
    _run(["predict", "--model", str(model), "--input", str(tmp_path / "scans"), "--out", str(masks)], capsys)
    summary = json.loads((masks / "predictions.json").read_text())
    assert summary["refused"] == {} and sorted(m["case"] for m in summary["masks"]) == sorted(inputs)
    assert len(inputs) == 3  # (a), (a) reoriented, and an MSD imagesTs scan or (b)
    for case, scan in inputs.items():
        shape, affine, exact = _grid(scan)
        mask = nib.load(masks / f"{case}.nii.gz")
        values = np.asarray(mask.dataobj)
        assert f"{case}.nii.gz" in summary["outputs"]
        assert mask.shape == shape, f"{case}: mask {mask.shape}, input {shape}"
        if exact:
            assert np.array_equal(mask.affine, affine), f"{case}: mask affine\n{mask.affine}\ninput\n{affine}"
        else:
            assert np.allclose(mask.affine, affine, atol=1e-4), f"{case}: mask affine\n{mask.affine}\ninput\n{affine}"
        assert set(np.unique(values)) <= set(range(dataset.num_classes)), f"{case}: values {np.unique(values)}"
        listed = next(m for m in summary["masks"] if m["case"] == case)
        assert tuple(listed["shape"]) == shape and sum(listed["voxels_per_class"].values()) == values.size
