"""A site's fingerprint (fedmeta.common.fingerprint): only declared aggregates, exact where it claims to be, and a
received report with an out-of-range statistic is refused naming the field.

The sites are tiny NIfTI folders built here: a CT site (HU, 0.8 x 0.8 x 5 mm voxels, liver and tumour), an MR site
(1 x 1 x 1.2 mm, one structure, a few negative foreground values) and a two-channel MR site (T2, ADC).
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedmeta.common.fingerprint import (
    CHANNEL_KEYS, CT_KEYS, HU_BINS, HU_HIGH, HU_LOW, LABEL_KEYS, MAX_LABELS, MR_KEYS, QUANTILES, SUMMARY_KEYS, TOP_KEYS,
    check_fingerprint, site_fingerprint,
)
from fedmeta.common.read_limits import ReadLimits

PLANTED = 1234.5678  # a voxel value no statistic may carry (placed where it is neither an extreme nor a quantile)
CASE_PREFIX = "patientZX81"  # case ids and file names the fingerprint must never hold
SITE_NAME = "SecretHospitalQ7"


def write_site(root: Path, images: list[np.ndarray], labels: list[np.ndarray], zooms, channels: dict[str, str],
               label_names: dict[str, str]) -> Path:
    """An MSD site folder: imagesTr/, labelsTr/ and dataset.json listing the cases (float32 images, uint8 labels)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    affine = np.diag([*zooms, 1.0])
    training = []
    for i, (image, label) in enumerate(zip(images, labels)):
        name = f"{CASE_PREFIX}_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (root / "dataset.json").write_text(json.dumps({
        "name": SITE_NAME, "modality": channels, "labels": label_names, "training": training,
        "numTraining": len(training)}))
    return root


def ct_volumes(cases: int, seed: int, shape=(24, 20, 6)) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Abdominal-CT-like volumes: air at -1000 HU with an out-of-field-of-view corner at -2048, a soft-tissue body,
    a liver (label 1) with a tumour (label 2) and a few bone voxels above 3071 HU (clipped by the fingerprint)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(cases):
        image = np.full(shape, -1000.0)
        image[:3, :3] = -2048.0  # outside the scanner's field of view, as many CTs store it
        image[3:-3, 3:-3] = np.rint(rng.normal(30, 40, size=(shape[0] - 6, shape[1] - 6, shape[2])))
        label = np.zeros(shape, dtype=np.uint8)
        label[6:16, 6:14, 1:5] = 1
        label[9:12, 8:11, 2:4] = 2
        liver = label > 0
        image[liver] = np.rint(rng.normal(60, 25, size=int(liver.sum())))
        image[7, 7, 2] = 3500.0  # bone or metal past the 12-bit range
        image[3, 3, 0] = PLANTED  # a background voxel: no statistic of the foreground sees it
        images.append(image)
        labels.append(label)
    return images, labels


def mr_volumes(cases: int, seed: int, shape=(20, 18, 16), channels: int = 1):
    """MR-like volumes (arbitrary units, a few negative foreground values, one structure as label 1); with
    ``channels`` > 1, 4D [X, Y, Z, C] images."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(cases):
        label = np.zeros(shape, dtype=np.uint8)
        label[5:14, 4:12, 3:12] = 1
        volume = rng.uniform(0, 2000, size=shape + (channels,))
        volume[5, 4, 3, :] = -3.0  # below zero inside the foreground (bias-field correction can do that)
        volume[9, 8, 7, 0] = PLANTED  # inside the foreground's range, not at one of its quantiles
        volume[0, 0, 0, :] = PLANTED  # and in the background
        images.append(volume[..., 0] if channels == 1 else volume)
        labels.append(label)
    return images, labels


@pytest.fixture
def ct_site(tmp_path) -> tuple[Path, list[np.ndarray], list[np.ndarray]]:
    images, labels = ct_volumes(3, seed=0)
    root = write_site(tmp_path / "folderK9-ct", images, labels, (0.8, 0.8, 5.0), {"0": "CT"},
                      {"0": "background", "1": "liver", "2": "tumour"})
    return root, images, labels


@pytest.fixture
def mr_site(tmp_path) -> tuple[Path, list[np.ndarray], list[np.ndarray]]:
    images, labels = mr_volumes(2, seed=1)
    root = write_site(tmp_path / "folderK9-mr", images, labels, (1.0, 1.0, 1.2), {"0": "T2"},
                      {"0": "background", "1": "prostate"})
    return root, images, labels


def fingerprint(root: Path) -> dict:
    return site_fingerprint(root, limits=ReadLimits())


def test_a_ct_site_reports_exact_aggregates_of_its_foreground(ct_site):
    root, images, labels = ct_site
    report = fingerprint(root)
    foreground = np.concatenate([np.clip(i[l > 0], HU_LOW, HU_HIGH) for i, l in zip(images, labels)])
    stats = report["intensity"][0]
    assert report["cases"] == 3 and report["cases-skipped"] == 0
    assert report["channels"] == ["CT"] and report["labels"] == {"0": "background", "1": "liver", "2": "tumour"}
    assert report["spacing-mm"]["median"] == pytest.approx([0.8, 0.8, 5.0])
    assert report["shape"] == {"min": [24, 20, 6], "median": [24.0, 20.0, 6.0], "max": [24, 20, 6]}
    assert report["field-of-view-mm"] == pytest.approx([19.2, 16.0, 30.0])
    assert stats["kind"] == "ct" and stats["foreground-voxels"] == foreground.size
    assert stats["mean"] == pytest.approx(foreground.mean()) and stats["std"] == pytest.approx(foreground.std())
    # Each case has fewer foreground voxels than the sample size, so the quantiles are the pooled voxels' own.
    assert stats["quantiles"] == pytest.approx(np.percentile(foreground, QUANTILES).tolist())
    assert stats["quantiles"][-1] == HU_HIGH  # 3500 HU clipped into the histogram's range
    expected = np.bincount((np.rint(foreground) - HU_LOW).astype(int), minlength=HU_BINS)
    assert stats["hu-histogram"] == expected.tolist()
    outside = sum(int(((i < HU_LOW) | (i > HU_HIGH)).sum()) for i in images) / sum(i.size for i in images)
    assert stats["fraction-outside-hu-range"] == pytest.approx(outside) and outside > 0
    voxels = sum(l.size for l in labels)
    assert report["label-fractions"]["2"] == {
        "voxel-fraction": pytest.approx(sum(int((l == 2).sum()) for l in labels) / voxels), "case-fraction": 1.0}
    assert check_fingerprint(report) == report


def test_an_mr_site_reports_its_negative_foreground_and_a_skipped_case_only_as_a_count(mr_site):
    root, images, labels = mr_site
    (root / "labelsTr" / f"{CASE_PREFIX}_001.nii.gz").unlink()  # the case is unusable now
    report = fingerprint(root)
    stats = report["intensity"][0]
    assert report["cases"] == 1 and report["cases-skipped"] == 1
    assert stats["kind"] == "mr" and set(stats) == set(CHANNEL_KEYS + MR_KEYS)
    assert stats["fraction-foreground-below-zero"] == pytest.approx(1 / int((labels[0] > 0).sum()))
    assert report["label-fractions"]["1"]["case-fraction"] == 1.0


def test_a_two_channel_site_reports_each_channel_in_dataset_json_order(tmp_path):
    images, labels = mr_volumes(2, seed=2, channels=2)
    for image in images:
        image[..., 1] *= 0.001  # ADC, in mm^2/s
    root = write_site(tmp_path / "prostate", images, labels, (0.6, 0.6, 3.6), {"0": "T2", "1": "ADC"},
                      {"0": "background", "1": "peripheral zone"})
    report = fingerprint(root)
    assert report["channels"] == ["T2", "ADC"] and len(report["intensity"]) == 2
    for channel, stats in enumerate(report["intensity"]):
        foreground = np.concatenate([i[..., channel][l > 0] for i, l in zip(images, labels)])
        assert stats["mean"] == pytest.approx(foreground.mean())
        assert stats["quantiles"] == pytest.approx(np.percentile(foreground, QUANTILES).tolist())
    check_fingerprint(report)


def _walk(obj, path="$"):
    """Every (path, key or value) of a JSON document."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield path, key
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(obj, list):
        yield path, obj
        for i, value in enumerate(obj):
            yield from _walk(value, f"{path}[{i}]")
    else:
        yield path, obj


def test_the_fingerprint_holds_no_voxel_and_no_identifier_only_the_declared_aggregates(ct_site, mr_site):
    declared_names = {"CT", "T2", "background", "liver", "tumour", "prostate", "standard", "ct", "mr",
                      "fedmeta-fingerprint"}
    allowed_keys = set(TOP_KEYS + SUMMARY_KEYS + CHANNEL_KEYS + CT_KEYS + MR_KEYS + LABEL_KEYS)
    label_keys = {str(v) for v in range(MAX_LABELS)}
    for root, _, _ in (ct_site, mr_site):
        report = fingerprint(root)
        assert set(report) == set(TOP_KEYS)
        text = json.dumps(report)
        for forbidden in (CASE_PREFIX, SITE_NAME, str(root), root.name, "nii", "imagesTr", "labelsTr"):
            assert forbidden not in text
        assert not re.search(r"\d{4}-\d{2}-\d{2}", text)  # no date
        for path, item in _walk(report):
            if isinstance(item, str):
                # a key of the schema, a label value, or a name dataset.json declares: nothing else is text
                assert item in allowed_keys | label_keys | declared_names, (path, item)
            elif isinstance(item, list):
                assert len(item) <= (HU_BINS if path.endswith("hu-histogram") else len(QUANTILES)), path
            elif isinstance(item, float):
                assert not math.isclose(item, PLANTED, abs_tol=1e-3), path


def _mutations() -> list[tuple[str, object, str]]:
    """(description, mutation of a valid CT fingerprint, the field its refusal must name)."""

    def put(path, value):
        def mutate(report):
            target = report
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
        return mutate

    def extra_key(report):
        report["site-name"] = "St Elsewhere"

    def drop_key(report):
        del report["label-fractions"]

    def short_histogram(report):
        report["intensity"][0]["hu-histogram"] = report["intensity"][0]["hu-histogram"][:-1]

    def histogram_off_by_one(report):
        report["intensity"][0]["hu-histogram"][100] += 1

    def decreasing(report):
        q = report["intensity"][0]["quantiles"]
        q[5], q[6] = q[6] + 10, q[6]

    def nine_channels(report):
        report["channels"] = [f"c{i}" for i in range(9)]

    def voxel_dump(report):
        report["intensity"][0]["quantiles"] = list(range(100_000))

    return [
        ("an undeclared key", extra_key, "site-name"),
        ("a missing key", drop_key, "label-fractions"),
        ("a voxel size of 1 micron", put(["spacing-mm", "min", 0], 0.001), "spacing-mm.min[0]"),
        ("a shape past 4096", put(["shape", "max", 2], 5000), "shape.max[2]"),
        ("negative cases", put(["cases"], -1), "cases"),
        ("a bool for a count", put(["cases-skipped"], True), "cases-skipped"),
        ("a count as text", put(["intensity", 0, "foreground-voxels"], "12"), "intensity[0].foreground-voxels"),
        ("a fraction above 1", put(["label-fractions", "1", "voxel-fraction"], 1.5),
         "label-fractions.1.voxel-fraction"),
        ("a fraction of cases no whole case makes", put(["label-fractions", "1", "case-fraction"], 0.5),
         "label-fractions.1.case-fraction"),
        ("a 4095-bin histogram", short_histogram, "intensity[0].hu-histogram"),
        ("a histogram that does not sum to the foreground", histogram_off_by_one, "intensity[0].hu-histogram"),
        ("decreasing quantiles", decreasing, "intensity[0].quantiles[6]"),
        ("a CT quantile past 3071 HU", put(["intensity", 0, "quantiles", 10], 4000.0), "intensity[0].quantiles[10]"),
        ("a mean outside the quantiles", put(["intensity", 0, "mean"], 5000.0), "intensity[0].mean"),
        ("a negative std", put(["intensity", 0, "std"], -1.0), "intensity[0].std"),
        ("an MR kind for the CT channel", put(["intensity", 0, "kind"], "mr"), "intensity[0]"),
        ("a 65-character channel name", put(["channels", 0], "C" * 65), "channels[0]"),
        ("a name with a newline", put(["labels", "1"], "liver\nP123"), "labels.1"),
        ("nine channels", nine_channels, "channels"),
        ("a label value past 255", put(["labels", "300"], "x"), "labels.300"),
        ("a non-finite number", put(["field-of-view-mm", 0], float("nan")), "(report)"),
        ("a voxel dump", voxel_dump, "intensity[0].quantiles"),
        ("another format", put(["format"], "nnunet-fingerprint"), "format"),
    ]


@pytest.mark.parametrize("what, mutate, field", _mutations(), ids=[m[0] for m in _mutations()])
def test_a_fingerprint_with_an_out_of_range_statistic_is_refused_naming_the_field(ct_site, what, mutate, field):
    report = fingerprint(ct_site[0])
    bad = copy.deepcopy(report)
    mutate(bad)
    with pytest.raises(ValueError, match=r"fingerprint field ") as refused:
        check_fingerprint(bad)
    message = str(refused.value)
    assert f"field {field}" in message and "allowed:" in message, message
    check_fingerprint(report)  # the check changed nothing of the report it was given


def test_an_oversized_report_is_refused_before_its_fields_are_read(ct_site):
    report = fingerprint(ct_site[0])
    report["labels"] = {str(v): "x" * 64 for v in range(256)} | {"padding": "y" * (1 << 20)}
    with pytest.raises(ValueError, match=r"fingerprint field \(report\).*bytes"):
        check_fingerprint(report)


def test_the_wire_form_is_strict_ascii_json_that_decodes_to_the_checked_report(ct_site):
    from fedmeta.common.fingerprint import decode_fingerprint, encode_fingerprint

    report = fingerprint(ct_site[0])
    data = encode_fingerprint(report)
    assert data.isascii() and b" " not in data  # compact: the 1 MiB bound is on what is sent
    assert decode_fingerprint(data) == check_fingerprint(report)
    bad = copy.deepcopy(report)
    bad["cases"] = 0
    with pytest.raises(ValueError, match="fingerprint field cases"):  # a site never sends what would be refused
        encode_fingerprint(bad)


@pytest.mark.parametrize("data, words", [
    ("a str", "bytes of UTF-8 JSON"),
    (b"[" * 200_000 + b"]" * 200_000, "strict UTF-8 JSON (RecursionError"),  # nested past the parser's depth
    (b"x" * ((1 << 20) + 1), "at most 1,048,576 bytes"),
    (b'{"cases": Infinity}', "strict UTF-8 JSON"),
    (b'{"cases": 1, "cases": 2}', "appears twice"),
    (b"[]", "an object with the keys"),
], ids=["not bytes", "deeply nested", "oversized", "Infinity", "a key twice", "a list"])
def test_a_received_fingerprint_that_is_not_strict_bounded_json_is_refused(data, words):
    from fedmeta.common.fingerprint import decode_fingerprint

    with pytest.raises(ValueError, match="fingerprint field") as refused:
        decode_fingerprint(data)
    assert words in str(refused.value), str(refused.value)
