"""Beyond one MR channel: CT normalised in Hounsfield units, multi-channel sites stacked in the run's channel order,
and inference seeing what training saw (issue 30, item 1). The brain federations' inputs are unchanged bit for bit:
``test_one_mr_channel_is_prepared_as_before`` and the pinned smoke runs elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedmeta.common.data import (
    DataConfig, SiteDataset, channel_kind, head_mask, normalise_intensity, prepare_image,
)
from fedmeta.common.inference import segment_scan
from fedmeta.common.model import ModelConfig, build_model
from fedmeta.common.validate import check_case, check_scan, check_site, discover_site


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    grid = np.indices(shape).astype(np.float64)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def _ct_case(rng, shape=(48, 40, 12), offset=(0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """Air (-1000 HU) around an elliptic body (soft tissue ~40 HU, fat -100) off the field's centre, with a
    'liver' (~60 HU) labelled 1."""
    image = np.full(shape, -1000.0) + rng.normal(0, 5, shape)
    centre = (shape[0] / 2 + offset[0], shape[1] / 2 + offset[1], shape[2] / 2)
    body = _ellipsoid(shape, centre, (shape[0] / 4, shape[1] / 4, shape[2]))
    image[body] = -100 + rng.normal(0, 10, int(body.sum()))
    organ = _ellipsoid(shape, centre, (shape[0] / 8, shape[1] / 8, shape[2]))
    image[organ] = 60 + rng.normal(0, 10, int(organ.sum()))
    return image.astype(np.float32), organ.astype(np.uint8)


def _write_site(root: Path, images: list[np.ndarray], labels: list[np.ndarray], channels: dict[str, str],
                zooms=(0.8, 0.8, 5.0), label_names=None) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    affine = np.diag([*zooms, 1.0])
    entries = []
    for i, (image, label) in enumerate(zip(images, labels)):
        nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / f"case{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / f"case{i}.nii.gz"))
        entries.append({"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"})
    meta = {"name": root.name, "modality": channels, "labels": label_names or {"0": "background", "1": "organ"},
            "training": entries}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def ct_site(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    cases = [_ct_case(rng, offset=(6, -5)) for _ in range(3)]
    return _write_site(tmp_path / "ct", [c[0] for c in cases], [c[1] for c in cases], {"0": "CT"})


def _mr_pair(rng, shape=(32, 32, 8)) -> tuple[np.ndarray, np.ndarray]:
    """A T2 and an ADC volume (different contrast, different units) and a lesion labelled 1."""
    body = _ellipsoid(shape, (16, 16, 4), (12, 12, 8))
    lesion = _ellipsoid(shape, (16, 16, 4), (4, 4, 8))
    # magnitude images: noise never takes a voxel below zero (Rician background)
    t2 = np.abs(np.where(body, 300.0, 5.0) + np.where(lesion, 400.0, 0.0) + rng.normal(0, 3, shape))
    adc = np.abs(np.where(body, 1500.0, 0.0) - np.where(lesion, 900.0, 0.0) + rng.normal(0, 20, shape))
    return np.stack([t2, adc], axis=-1).astype(np.float32), lesion.astype(np.uint8)


@pytest.fixture
def prostate_site(tmp_path) -> Path:
    rng = np.random.default_rng(1)
    cases = [_mr_pair(rng) for _ in range(3)]
    return _write_site(tmp_path / "prostate", [c[0] for c in cases], [c[1] for c in cases],
                       {"0": "T2", "1": "ADC"}, zooms=(2.0, 2.0, 2.0))


def test_channel_kind_follows_nnunet_ct_by_name_everything_else_per_image():
    assert [channel_kind(n) for n in ("CT", "ct", " CT ", "MRI", "T1w", "ADC", "", None)] == \
        ["ct", "ct", "ct", "mr", "mr", "mr", "mr", "mr"]


def test_one_mr_channel_is_prepared_as_before():
    """The brain path: resampled, z-scored over the voxels above the mean, centred on them; nothing else."""
    rng = np.random.default_rng(2)
    volume = (rng.random((20, 24, 16)) * 100).astype(np.float32)
    prepared = prepare_image(volume, np.array([2.0, 2.0, 2.0]), DataConfig(spacing=(2.0, 2.0, 2.0)), ("mr",))
    expected = normalise_intensity(volume)
    assert np.array_equal(prepared.channels[0], expected)
    found = np.argwhere(head_mask(expected))
    assert np.array_equal(prepared.centre, (found.min(axis=0) + found.max(axis=0) + 1) / 2)
    assert prepared.fill == (float(expected.min()),)


def test_ct_is_clipped_to_the_window_and_standardised_with_the_planned_statistics(ct_site):
    planned = DataConfig(spacing=(1.6, 1.6, 5.0), image_size=(32, 32), num_classes=2, ct_window=(-200.0, 200.0),
                         ct_mean=10.0, ct_std=50.0)
    site = SiteDataset.load(ct_site, planned)
    assert site.channel_names == ("CT",)
    values = torch.cat([image.flatten() for image in site.images])
    # Air (-1000 HU) clips to -200, i.e. (-200 - 10) / 50 = -4.2; nothing lies outside the window.
    assert float(values.min()) == pytest.approx(-4.2, abs=1e-5)
    assert float(values.max()) <= (200 - 10) / 50 + 1e-5
    # Unplanned: each image over its own body (> -500 HU), so the body has mean ~0 and std ~1.
    unplanned = SiteDataset.load(ct_site, DataConfig(spacing=(1.6, 1.6, 5.0), image_size=(32, 32), num_classes=2))
    image, label = unplanned.patient(0)
    body_values = image[image > -4.0]  # air lies ~13 SD of soft tissue below it; partial-volume voxels between
    assert abs(float(body_values.mean())) < 0.5 and float(image.min()) < -10


def test_the_ct_crop_is_centred_on_the_body_not_the_field_of_view(ct_site):
    """The body lies off the field's centre; the crop follows it (the window above -500 HU), so the label is whole."""
    config = DataConfig(spacing=(1.6, 1.6, 5.0), image_size=(16, 16), num_classes=2)
    site = SiteDataset.load(ct_site, config)
    loaded = check_case(discover_site(ct_site).cases[0], {0, 1}, 2)[1]
    organ_voxels_native = int(loaded.label_data.sum())
    _, labels = site.patient(0)
    assert float(labels.sum()) * (1.6 * 1.6) / (0.8 * 0.8) == pytest.approx(organ_voxels_native, rel=0.15)
    # The body's centre: native voxel (24 + 6, 20 - 5) of 0.8 mm, i.e. (15, 7.5) at 1.6 mm; the field's is (12, 10).
    prepared = prepare_image(loaded.image_data, np.array([0.8, 0.8, 5.0]), config, ("ct",))
    assert np.abs(prepared.centre[:2] - [15.0, 7.5]).max() <= 1.0, prepared.centre
    assert prepared.extent[0] * 1.6 == pytest.approx(48 / 2 * 0.8, abs=2 * 1.6)  # the body's width (-500 HU), not 38 mm


def test_a_two_channel_site_is_stacked_in_the_runs_channel_order(prostate_site):
    base = dict(spacing=(2.0, 2.0, 2.0), image_size=(32, 32), num_classes=2, in_channels=2)
    in_order = SiteDataset.load(prostate_site, DataConfig(**base, channel_names=("T2", "ADC")))
    swapped = SiteDataset.load(prostate_site, DataConfig(**base, channel_names=("adc", "t2")))
    unnamed = SiteDataset.load(prostate_site, DataConfig(**base))
    assert in_order.images[0].shape[1] == 2 and in_order.channel_names == ("T2", "ADC")
    assert swapped.channel_names == ("ADC", "T2")
    assert torch.equal(in_order.images[0][:, 0], swapped.images[0][:, 1])
    assert torch.equal(in_order.images[0][:, 1], swapped.images[0][:, 0])
    assert torch.equal(in_order.images[0], unnamed.images[0])
    # each channel z-scored on its own: T2 and ADC have different units but both end up standardised
    for c in range(2):
        assert float(in_order.images[0][:, c].max()) < 6.0


def test_a_site_whose_channels_the_model_does_not_take_is_refused_with_the_fix(prostate_site):
    with pytest.raises(ValueError, match=r"declares the image channels \(T2, ADC\).*in-channels=1.*fedmeta plan"):
        SiteDataset.load(prostate_site, DataConfig(spacing=(2.0, 2.0, 2.0), image_size=(32, 32), num_classes=2))
    with pytest.raises(ValueError, match=r"T2, ADC.*FLAIR, ADC"):
        SiteDataset.load(prostate_site, DataConfig(spacing=(2.0, 2.0, 2.0), image_size=(32, 32), num_classes=2,
                                                   in_channels=2, channel_names=("FLAIR", "ADC")))


def test_a_case_without_one_volume_per_declared_channel_is_named(prostate_site):
    rng = np.random.default_rng(3)
    image, label = _mr_pair(rng)
    nib.save(nib.Nifti1Image(image[..., :1], np.diag([2.0, 2.0, 2.0, 1.0])), str(prostate_site / "imagesTr" / "case0.nii.gz"))
    report = check_site(prostate_site, num_classes=2)
    problems = " ".join(p for case in report.case_problems for p in case.problems)
    assert "declares 2 channels (T2, ADC)" in problems and "case0.nii.gz" in problems and "Fix:" in problems
    assert report.num_valid == 2


def test_a_multi_volume_image_at_a_single_channel_site_says_how_to_declare_channels(tmp_path):
    rng = np.random.default_rng(4)
    image, label = _mr_pair(rng)
    site = _write_site(tmp_path / "undeclared", [image, image], [label, label], {"0": "MRI"})
    problems = " ".join(p for case in check_site(site, num_classes=2).case_problems for p in case.problems)
    assert "4 dimensions" in problems and "name each in dataset.json's 'modality'" in problems


def test_dataset_json_channel_declarations(tmp_path):
    rng = np.random.default_rng(5)
    image, label = _mr_pair(rng)
    site = _write_site(tmp_path / "s", [image], [label], {"0": "T2", "1": "ADC"})
    assert discover_site(site).channels == ("T2", "ADC")
    meta = json.loads((site / "dataset.json").read_text())
    meta["channel_names"] = {"1": "ADC", "0": "T2"}  # nnU-Net v2's key wins; the order is the indices'
    (site / "dataset.json").write_text(json.dumps(meta))
    assert discover_site(site).channels == ("T2", "ADC")
    meta["channel_names"] = {"0": "T2", "2": "ADC"}
    (site / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"dataset.json.*must name channels \"0\", \"1\""):
        discover_site(site)


def _model(in_channels: int) -> torch.nn.Module:
    return build_model(ModelConfig(spatial_dims=2, in_channels=in_channels, out_channels=2, channels=(4, 8),
                                   strides=(2,), num_res_units=0))


def test_a_two_channel_scan_is_segmented_in_its_own_grid(prostate_site):
    config = DataConfig(spacing=(3.0, 3.0, 3.0), image_size=(32, 32), num_classes=2, in_channels=2,
                        channel_names=("T2", "ADC"))
    model = _model(2)
    params = dict(model.named_parameters())
    problems, image, data = check_scan(prostate_site / "imagesTr" / "case1.nii.gz", channels=2)
    assert not problems and data.shape == (32, 32, 8, 2)
    result = segment_scan(model, params, data, image.affine, config, num_classes=2)
    assert result.mask.shape == (32, 32, 8)
    with pytest.raises(ValueError, match="holds 1 channel"):
        segment_scan(model, params, data[..., 0], image.affine, config, num_classes=2)
    problems, _, _ = check_scan(prostate_site / "imagesTr" / "case1.nii.gz", channels=3)
    assert "takes 3 channels, the scan holds 2" in problems[0]


def test_inference_on_ct_uses_the_training_preprocessing(ct_site):
    """The window the model sees at inference equals the training input of the same case."""
    config = DataConfig(spacing=(1.6, 1.6, 5.0), image_size=(32, 32), num_classes=2, channel_names=("CT",))
    site = SiteDataset.load(ct_site, config)
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _model(1)

        def forward(self, x):
            seen.append(x.clone())
            return self.inner(x)

    model = Recorder()
    loaded = check_case(discover_site(ct_site).cases[0], {0, 1}, 2)[1]
    segment_scan(model, dict(model.named_parameters()), loaded.image_data, loaded.image.affine, config,
                 num_classes=2, batch_size=64)
    window = torch.cat(seen)
    assert torch.equal(window, site.images[0])


# ----------------------------------------------------------------------------------------------------
# check-data knows the modality (issue 30, item 5): warnings, the case stays usable


def _warnings(site: Path, **kwargs) -> str:
    report = check_site(site, num_classes=2, **kwargs)
    assert report.num_valid == report.num_cases  # warnings never make a case unusable
    return "\n".join(report.warnings)


def test_check_data_names_ct_values_outside_the_scanners_range(ct_site):
    image_path = ct_site / "imagesTr" / "case1.nii.gz"
    image = nib.load(str(image_path))
    data = np.asarray(image.dataobj, dtype=np.float32)
    data[:4] = -3024.0  # padding outside the scanner's circle, as some vendors write it
    nib.save(nib.Nifti1Image(data, image.affine), str(image_path))
    notes = _warnings(ct_site)
    assert "case1.nii.gz" in notes and "outside the CT range -1024..3071 HU" in notes and "min -3024" in notes
    assert "case0.nii.gz" not in notes


def test_check_data_says_a_ct_channel_without_air_is_not_in_hounsfield_units(tmp_path):
    rng = np.random.default_rng(6)
    image, label = _ct_case(rng)
    scaled = ((image + 1024) / 4096).astype(np.float32)  # exported as 0..1, not HU
    site = _write_site(tmp_path / "scaled", [scaled, scaled], [label, label], {"0": "CT"})
    notes = _warnings(site)
    assert "declared CT but holds no air" in notes and "'modality' order" in notes


def test_check_data_names_negative_mr_values_and_an_mr_channel_that_is_a_ct(tmp_path):
    rng = np.random.default_rng(7)
    mr, label = _mr_pair(rng)
    shifted = mr.copy()
    shifted[..., 0] -= 200.0  # T2 with negatives: a normalised or difference image
    site = _write_site(tmp_path / "mr", [shifted, shifted], [label, label], {"0": "T2", "1": "ADC"})
    notes = _warnings(site)
    assert "of channel 0 (T2)'s voxels are negative" in notes and "channel 1" not in notes
    ct, ct_label = _ct_case(rng)
    swapped = np.stack([ct, (ct + 1024) / 10], axis=-1).astype(np.float32)  # dataset.json says MR first, CT second
    site = _write_site(tmp_path / "swapped", [swapped, swapped], [ct_label, ct_label], {"0": "MRI", "1": "CT"})
    notes = _warnings(site)
    assert "channel 0 (MRI) is declared MR" in notes and "stacked in dataset.json's order" in notes
    assert "channel 1 (CT) is declared CT but holds no air" in notes


def test_check_data_with_a_plan_names_a_spacing_far_from_the_federations(ct_site, tmp_path, capsys):
    from fedmeta.simulations.cli import main

    plan = tmp_path / "plan"
    plan.mkdir()
    (plan / "run-config.toml").write_text('spacing-mm = 0.8\nslice-spacing-mm = 1.0\nnum-classes = 2\n')
    assert main(["check-data", str(ct_site), "--plan", str(plan), "--k", "1", "--q", "1"]) == 0  # warnings only
    out = capsys.readouterr().out
    assert "more than 3x from the federation's planned spacing 0.8 x 0.8 x 1 mm along axis S" in out
    (plan / "run-config.toml").write_text('image-size = 64\n')
    assert main(["check-data", str(ct_site), "--plan", str(plan)]) == 2
    assert "is not a plan's run-config.toml with spacing-mm" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# refusals a hostile review asked for


@pytest.mark.parametrize("declared, problem", [
    ({"0": None}, "not a string"), ({"0": {"a": 1}}, "not a string"), ({"0": 7}, "not a string"),
    ({"0": "T2\x00\x1b[31mRED"}, "control characters"), ({"0": "x" * 10_000}, "10 KB"),
    ({"0": "T2", "1": "t2"}, "the same name twice, case aside"), ({"0": "T2,ADC"}, "a comma"),
])
def test_channel_names_that_a_run_config_or_a_terminal_cannot_hold_are_refused(tmp_path, declared, problem):
    rng = np.random.default_rng(8)
    image, label = _mr_pair(rng)
    site = _write_site(tmp_path / "s", [image], [label], declared)
    with pytest.raises(ValueError, match="printable characters, no comma") as refused:
        discover_site(site)
    assert "\x1b" not in str(refused.value) and len(str(refused.value)) < 1000, problem


def test_a_null_channel_names_falls_back_to_modality(tmp_path):
    rng = np.random.default_rng(9)
    image, label = _ct_case(rng)
    site = _write_site(tmp_path / "s", [image], [label], {"0": "CT"})
    meta = json.loads((site / "dataset.json").read_text())
    meta["channel_names"] = None
    (site / "dataset.json").write_text(json.dumps(meta))
    assert discover_site(site).channels == ("CT",)


def test_run_config_refuses_unnamed_channels_and_an_image_too_small_for_the_unet():
    from fedmeta.common.config import RunConfig

    with pytest.raises(ValueError, match="run config channels='': must name in-channels=2 channels"):
        RunConfig(in_channels=2)
    assert RunConfig(in_channels=2, channels="T2,ADC").model_config().in_channels == 2
    with pytest.raises(ValueError, match="image-size=8: .* at least 16: instance norm"):
        RunConfig(image_size=8)


def test_check_data_with_a_plan_names_a_site_whose_channels_the_plan_cannot_take(ct_site, tmp_path, capsys):
    from fedmeta.simulations.cli import main

    plan = tmp_path / "plan"
    plan.mkdir()
    (plan / "run-config.toml").write_text('spacing-mm = 1.6\nslice-spacing-mm = 5.0\nin-channels = 2\n'
                                          'channels = "T2,ADC"\nnum-classes = 2\n')
    assert main(["check-data", str(ct_site), "--plan", str(plan)]) == 1
    out = capsys.readouterr().out
    assert "declares the image channels ('CT'), but the plan's model takes T2, ADC" in out


def test_check_data_warns_about_names_a_fingerprint_refuses(tmp_path):
    rng = np.random.default_rng(10)
    image, label = _ct_case(rng)
    site = _write_site(tmp_path / "s", [image, image], [label, label], {"0": "CT"},
                       label_names={"0": "background", "1": "l" * 100})
    notes = "\n".join(check_site(site, num_classes=2).warnings)
    assert "the name of label 1 is empty, longer than 64 characters" in notes and "fedmeta plan" in notes


def test_predict_refuses_a_blank_channel_of_a_multi_channel_scan(tmp_path):
    rng = np.random.default_rng(11)
    image, _ = _mr_pair(rng)
    image[..., 1] = 5.0
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(image, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    problems, _, _ = check_scan(path, channels=2)
    assert "every voxel of channel 1 is 5" in problems[0]


def test_a_sites_manifest_with_duplicate_names_or_no_site_is_refused_with_the_plan_fix(ct_site, tmp_path):
    from fedmeta.common.synth import load_manifest, write_sites_manifest

    out = tmp_path / "plan"
    out.mkdir()
    write_sites_manifest(out, [ct_site], [], "d" * 64, {ct_site.resolve(): 3})
    assert [s.name for s in load_manifest(out).sites] == ["ct"]
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["sites"] = manifest["sites"] * 2
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="names two sites.*fedmeta plan --sites"):
        load_manifest(out)
    manifest["sites"] = []
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="lists no site.*fedmeta plan --sites"):
        load_manifest(out)


def test_nan_in_one_channel_names_the_channel(prostate_site):
    image = nib.load(str(prostate_site / "imagesTr" / "case2.nii.gz"))
    data = np.asarray(image.dataobj, dtype=np.float32)
    data[0, 0, 0, 1] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), str(prostate_site / "imagesTr" / "case2.nii.gz"))
    problems = " ".join(p for case in check_site(prostate_site, num_classes=2).case_problems for p in case.problems)
    assert "1 voxels of channel 1 (ADC) are NaN or Inf" in problems


def test_a_scan_wider_than_the_window_is_segmented_with_a_note(ct_site):
    """The body (an ellipse of 24 x 20 voxels of 0.8 mm) is wider than a 16 x 1.6 mm window: segmented, and said."""
    config = DataConfig(spacing=(1.6, 1.6, 5.0), image_size=(8, 8), num_classes=2, channel_names=("CT",))
    loaded = check_case(discover_site(ct_site).cases[0], {0, 1}, 2)[1]
    model = _model(1)
    result = segment_scan(model, dict(model.named_parameters()), loaded.image_data, loaded.image.affine, config,
                          num_classes=2)
    assert result.mask.shape == loaded.image_data.shape
    assert len(result.notes) == 1 and "wider than the model's window (R 19 mm against 13 mm" in result.notes[0]
    wide = DataConfig(spacing=(1.6, 1.6, 5.0), image_size=(32, 32), num_classes=2, channel_names=("CT",))
    assert segment_scan(model, dict(model.named_parameters()), loaded.image_data, loaded.image.affine, wide,
                        num_classes=2).notes == []
