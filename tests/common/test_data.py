"""The site reader and the episode sampler, on generated sites and on hand-made variations of them."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedmeta.common.data import (
    DataConfig, SiteDataset, adaptation_patients, adaptation_support, evaluation_patients, sample_episodes,
)
from fedmeta.common.synth import load_manifest


@pytest.fixture(scope="module")
def site(smoke_federation: Path) -> SiteDataset:
    return SiteDataset.load(smoke_federation / "site-01", DataConfig())


def _owner(site: SiteDataset) -> dict[bytes, int]:
    """Which patient each slice came from, keyed by the slice's bytes."""
    return {site.images[p][s].numpy().tobytes(): p for p in range(site.num_patients) for s in range(len(site.images[p]))}


def test_reader_yields_shaped_normalised_slices(smoke_federation: Path):
    for info in load_manifest(smoke_federation).sites:
        site = SiteDataset.load(info.path, DataConfig())
        assert site.name == info.name and site.num_patients == 4 and not site.skipped
        assert site.patient_ids == [s["id"] for s in info.subjects]
        for index in range(site.num_patients):
            volume, volume_labels = site.patient(index)
            assert volume.dtype == torch.float32 and volume_labels.dtype == torch.int64
            assert volume.shape[1:] == (1, 64, 64) and volume_labels.shape == (volume.shape[0], 64, 64)
            # Episodes draw from the training view: every slice with structure, a few background ones.
            keep = site.train_slices[index]
            images, labels = volume[keep], volume_labels[keep]
            assert set(site.foreground_indices(index)) <= set(keep.tolist())
            assert images.shape[0] > 15
            assert images.abs().max() <= 5.0 + 1e-6
            tissue = images[:, 0][labels > 0]
            assert abs(float(tissue.mean())) < 1.5 and 0.3 < float(tissue.std()) < 2.0
            assert set(labels.unique().tolist()) <= ({0, 2, 3} if info.label_protocol == "csf-merged" else {0, 1, 2, 3})
            # At most 10 % of the kept slices are background-only, as configured.
            background_only = (labels.reshape(len(labels), -1).amax(dim=1) == 0).float().mean()
            assert background_only <= 0.1 + 1e-6


def test_background_slice_fraction_and_spacing(smoke_federation: Path):
    root = smoke_federation / "site-02"
    none = SiteDataset.load(root, DataConfig(background_slice_fraction=0.0))
    some = SiteDataset.load(root, DataConfig(background_slice_fraction=0.3))
    labels = none.patient(0)[1][none.train_slices[0]]
    assert bool((labels.reshape(len(labels), -1).amax(dim=1) > 0).all())
    kept = some.patient(0)[1][some.train_slices[0]]
    share = (kept.reshape(len(kept), -1).amax(dim=1) == 0).float().mean()
    assert 0.0 < float(share) <= 0.3  # the smoke FOV hugs the brain: few background slices exist
    coarse = SiteDataset.load(root, DataConfig(spacing=(4.0, 4.0, 4.0), background_slice_fraction=0.0))
    ratio = len(coarse.patient(0)[0]) / len(none.patient(0)[0])
    assert 0.4 < ratio < 0.6  # half the slices at twice the slice spacing


def test_3d_patches(smoke_federation: Path):
    site = SiteDataset.load(smoke_federation / "site-03", DataConfig(spatial_dims=3, image_size=(48, 56, 48), spacing=(3.0, 3.0, 3.0)))
    images, labels = site.patient(1)
    assert images.shape == (1, 1, 48, 56, 48) and labels.shape == (1, 48, 56, 48)
    assert labels.unique().tolist() == [0, 1, 2, 3]


def _write(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


def test_orientation_is_undone_and_glob_layout_reads_the_same(smoke_federation: Path, tmp_path: Path):
    """The same scan stored RAS and flipped/permuted (PIR), found by glob patterns, gives the same slices."""
    from nibabel import orientations as ornt

    msd = smoke_federation / "site-02"
    reference = SiteDataset.load(msd, DataConfig())
    folder = tmp_path / "hospital"
    for index, case_id in enumerate(reference.patient_ids):
        image = nib.load(msd / "imagesTr" / f"{case_id}.nii.gz")
        label = nib.load(msd / "labelsTr" / f"{case_id}.nii.gz")
        transform = ornt.ornt_transform(ornt.io_orientation(image.affine), ornt.axcodes2ornt("PIR"))
        affine = image.affine @ ornt.inv_ornt_aff(transform, image.shape)
        _write(ornt.apply_orientation(np.asanyarray(image.dataobj), transform), affine, folder / f"p{index}_img.nii.gz")
        _write(ornt.apply_orientation(np.asanyarray(label.dataobj), transform), affine, folder / f"p{index}_seg.nii.gz")
    config = DataConfig(image_glob="*_img.nii.gz", label_glob="*_seg.nii.gz")
    reread = SiteDataset.load(folder, config)
    assert reread.patient_ids == [f"p{i}" for i in range(4)] and reread.label_names is None
    for index in range(4):
        torch.testing.assert_close(reread.patient(index)[0], reference.patient(index)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reread.patient(index)[1], reference.patient(index)[1])


def test_episodes_are_seeded_shaped_and_patient_disjoint(site: SiteDataset):
    owner = _owner(site)
    episodes = sample_episodes(site, n_episodes=6, k=3, q=5, seed=7)
    assert len(episodes) == 6
    for support_x, support_y, query_x, query_y in episodes:
        assert support_x.shape == (3, 1, 64, 64) and support_y.shape == (3, 64, 64)
        assert query_x.shape == (5, 1, 64, 64) and query_y.shape == (5, 64, 64)
        assert support_y.dtype == query_y.dtype == torch.int64
        support_patients = {owner[x.numpy().tobytes()] for x in support_x}
        query_patients = {owner[x.numpy().tobytes()] for x in query_x}
        assert not support_patients & query_patients
    again = sample_episodes(site, n_episodes=6, k=3, q=5, seed=7)
    other = sample_episodes(site, n_episodes=6, k=3, q=5, seed=8)
    assert all(torch.equal(a, b) for e, f in zip(episodes, again) for a, b in zip(e, f))
    assert not all(torch.equal(a, b) for e, f in zip(episodes, other) for a, b in zip(e, f))


def test_adaptation_support_is_nested_and_never_from_an_evaluation_patient(site: SiteDataset):
    owner = _owner(site)
    support_patients, eval_patients = adaptation_patients(site, seed=3)
    assert not set(support_patients) & set(eval_patients) and len(support_patients) + len(eval_patients) == 4
    supports = {k: adaptation_support(site, k, seed=3) for k in (1, 5, 10)}
    for k, (support_x, support_y) in supports.items():
        assert support_x.shape == (k, 1, 64, 64) and support_y.shape == (k, 64, 64)
        assert {owner[x.numpy().tobytes()] for x in support_x} <= set(support_patients)
        assert bool((support_y.reshape(k, -1).amax(dim=1) > 0).all())
    assert torch.equal(supports[5][0][:1], supports[1][0]) and torch.equal(supports[10][0][:5], supports[5][0])
    assert evaluation_patients(site, seed=3) == sorted(eval_patients)
    with pytest.raises(ValueError, match="fewer than k=100000"):
        adaptation_support(site, 100000, seed=3)


def test_evaluation_patients_are_whole_volumes_bounded_by_slices(site: SiteDataset):
    everyone = evaluation_patients(site, seed=3)
    sizes = {p: len(site.images[p]) for p in everyone}
    # Whole volumes, empty slices included: more slices than the training view keeps.
    assert all(sizes[p] >= len(site.train_slices[p]) for p in everyone)
    assert any(sizes[p] > len(site.foreground_indices(p)) for p in everyone)
    one = evaluation_patients(site, seed=3, max_slices=1)  # never less than one whole patient
    assert len(one) == 1 and one[0] in everyone
    two = evaluation_patients(site, seed=3, max_slices=sum(sorted(sizes.values())[:2]) + sum(sizes.values()))
    assert two == everyone


def test_one_patient_site_cannot_make_episodes(smoke_federation: Path, tmp_path: Path):
    folder = tmp_path / "tiny"
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
        shutil.copy(smoke_federation / "site-01" / sub / "site-01_000.nii.gz", folder / sub)
    with pytest.raises(ValueError, match="exactly one"):
        SiteDataset.load(folder, DataConfig(image_glob="*/*.nii.gz", label_glob="labelsTr/*.nii.gz"))
    # Globs with folders pair an image and its label across imagesTr/ and labelsTr/.
    by_folder = SiteDataset.load(folder, DataConfig(image_glob="imagesTr/*.nii.gz", label_glob="labelsTr/*.nii.gz"))
    assert by_folder.num_patients == 1 and not by_folder.skipped
    with pytest.raises(ValueError, match="at least 2"):
        sample_episodes(by_folder, 1, 1, 1, seed=0)
    (folder / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "CSF", "2": "grey matter", "3": "white matter"},
        "training": [{"image": "./imagesTr/site-01_000.nii.gz", "label": "./labelsTr/site-01_000.nii.gz"}],
    }))
    tiny = SiteDataset.load(folder, DataConfig())
    assert tiny.num_patients == 1
    with pytest.raises(ValueError, match="at least 2"):
        sample_episodes(tiny, 1, 1, 1, seed=0)
    with pytest.raises(ValueError, match="k=0"):
        sample_episodes(tiny, 1, 0, 1, seed=0)


def test_bad_case_is_skipped_with_one_warning_or_refused_when_strict(smoke_federation: Path, tmp_path: Path):
    folder = tmp_path / "site"
    shutil.copytree(smoke_federation / "site-01", folder)
    (folder / "imagesTr" / "site-01_001.nii.gz").write_bytes(b"not a nifti")
    label = nib.load(folder / "labelsTr" / "site-01_002.nii.gz")
    _write(np.zeros(label.shape, dtype=np.uint8), label.affine, folder / "labelsTr" / "site-01_002.nii.gz")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        site = SiteDataset.load(folder, DataConfig())
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1
    assert "site-01_001" in messages[0] and "site-01_002" in messages[0] and "empty" in messages[0]
    assert site.patient_ids == ["site-01_000", "site-01_003"]
    assert [p.case_id for p in site.skipped] == ["site-01_001", "site-01_002"]
    with pytest.raises(ValueError, match="site-01_001.*cannot be read as NIfTI"):
        SiteDataset.load(folder, DataConfig(strict=True))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spatial_dims": 1}, "spatial_dims=1"),
        ({"image_size": (64,)}, "image_size"),
        ({"spatial_dims": 3}, "image_size"),
        ({"image_size": (64, 0)}, "image_size"),
        ({"spacing": (2.0, 2.0)}, "spacing"),
        ({"spacing": (2.0, -1.0, 2.0)}, "spacing"),
        ({"num_classes": 1}, "num_classes"),
        ({"background_slice_fraction": 1.0}, "background_slice_fraction"),
        ({"image_glob": "*_img.nii.gz"}, "both or neither"),
    ],
)
def test_bad_config_is_refused(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


def test_missing_folder_and_non_site_folder_say_what_to_do(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SiteDataset.load(tmp_path / "nowhere", DataConfig())
    with pytest.raises(FileNotFoundError, match="image_glob/label_glob"):
        SiteDataset.load(tmp_path, DataConfig())


def test_declared_labels_the_model_cannot_predict_are_refused(smoke_federation: Path, tmp_path: Path):
    folder = tmp_path / "site"
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
        for case in ("site-01_000", "site-01_001"):
            shutil.copy(smoke_federation / "site-01" / sub / f"{case}.nii.gz", folder / sub)
    (folder / "dataset.json").write_text(json.dumps({
        "labels": {"-1": "ignore", "0": "background", "1": "CSF", "2": "grey matter", "3": "white matter"},
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                     for c in ("site-01_000", "site-01_001")],
    }))
    with pytest.raises(ValueError, match=r"declares label values \[-1\] outside the model's classes 0..3"):
        SiteDataset.load(folder, DataConfig(strict=True))


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.05, 0.5])
def test_the_crop_centre_is_the_foreground_bounding_box_centre(fraction):
    """foreground_bounds reads the box from projections; np.argwhere, which lists every voxel, is the reference."""
    from fedmeta.common.data import box_centre, foreground_bounds

    rng = np.random.default_rng(int(fraction * 1000))
    for _ in range(50):
        mask = rng.random(tuple(rng.integers(1, 30, 3))) < fraction
        found = np.argwhere(mask)
        expected = (found.min(axis=0) + found.max(axis=0) + 1) / 2 if len(found) else np.asarray(mask.shape) / 2
        bounds = foreground_bounds(mask)
        assert (bounds is None) == (len(found) == 0)
        if bounds is not None:
            assert np.array_equal(bounds[0], found.min(axis=0)) and np.array_equal(bounds[1], found.max(axis=0))
        centre = box_centre(bounds, mask.shape)
        assert centre.dtype == expected.dtype and np.array_equal(centre, expected), (mask.shape, centre, expected)
