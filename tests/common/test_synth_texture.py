"""The texture generation (the default preset): T1 texture asset, contrast curves, deep grey nuclei,
delineation protocols, held-out protocol, progress lines; and the tissue generation kept as it was."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from fedmeta.common import synth
from fedmeta.common.synth import generate_federation, load_manifest, plan_federation


@pytest.fixture(scope="module")
def anatomy_federation(tmp_path_factory) -> Path:
    lines: list[str] = []
    root = generate_federation(tmp_path_factory.mktemp("fed") / "smoke-anatomy", "smoke-anatomy", seed=0,
                               workers=1, progress=lines.append)
    assert lines and lines[-1].startswith("rendered 20/20 subjects")
    return root


def test_texture_asset_is_the_t1_on_the_tissue_grid_with_deep_nuclei():
    t1, deep, infratentorial, levels = synth.load_texture()
    probabilities, affine = synth.load_anatomy()
    assert t1.shape == deep.shape == infratentorial.shape == probabilities.shape[1:]
    with np.load(synth.TEXTURE_ASSET_PATH) as texture, np.load(synth.ASSET_PATH) as tissue:
        np.testing.assert_array_equal(texture["affine"], tissue["affine"])
        assert texture["t1"].dtype == np.uint16 and texture["deep_grey"].dtype == np.uint8
    assert synth.TEXTURE_ASSET_PATH.stat().st_size < 3e6
    # The template's order: CSF < GM < WM in T1, and the deep nuclei between grey and white matter.
    assert 0.1 < levels[0] < levels[1] < levels[2] < 1.0
    nuclei = deep > 0.7
    assert 10 < deep.sum() * 1.5**3 / 1000 < 60  # ml: caudate, putamen, pallidum, thalamus, both sides
    assert levels[1] < np.median(t1[nuclei]) < levels[2]
    # Inside the brain's grey and white matter (not in the ventricles), and central.
    assert (probabilities[1:, nuclei].sum(axis=0) > 0.8).mean() > 0.95
    # The posterior fossa (cerebellum, brainstem): 100-300 ml of tissue, below the thalamus, none of the nuclei.
    fossa = infratentorial > 0.5
    assert 100 < (probabilities[1:, fossa].sum() * 1.5**3 / 1000) < 300 and not (fossa & nuclei).any()
    z_mm = affine[2, 2] * np.nonzero(fossa)[2] + affine[2, 3]
    assert z_mm.max() < 5.0 and np.median(z_mm) < -20.0
    notice = (synth.ASSET_PATH.parent / "ICBM152_NOTICE.txt").read_text()
    assert synth.TEXTURE_ASSET_PATH.name in notice and "Permission to use" in notice


def test_presets_carry_their_generation_and_bad_ones_are_refused():
    assert synth.PRESETS["default"].generation == "texture" and synth.PRESETS["smoke-anatomy"].generation == "texture"
    for name in ("tissue", "smoke", "protocols", "scale-10"):
        assert synth.PRESETS[name].generation == "tissue"
    old_default = dataclasses.replace(synth.PRESETS["default"], heldout_kinds=synth.HELDOUT_KINDS,
                                      train_protocols=("standard",), generation="tissue")
    assert old_default == synth.PRESETS["tissue"]  # the 1.x default, field for field
    base = synth.PRESETS["tissue"]
    for changes, match in (({"generation": "pixels"}, "generation='pixels' is not known"),
                           ({"generation": "texture"}, "do not fit generation"),
                           ({"train_protocols": ("anatomical",)}, "do not fit generation"),
                           ({"train_protocols": ("freehand",)}, "not known")):
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(base, **changes)


def test_default_plan_protocols_heldout_kinds_and_new_parameters():
    plan = plan_federation("default", 0)
    train = [s for s in plan if s["role"] == "train"]
    heldout = {s["heldout_kind"]: s for s in plan if s["role"] == "heldout"}
    assert len(train) == 8 and set(heldout) == set(synth.TEXTURE_HELDOUT_KINDS)
    assert all(10 <= s["num_patients"] <= 20 for s in plan)
    train_protocols = {s["params"]["annotation"]["protocol"] for s in train}
    assert train_protocols == {"anatomical", "cortical", "ventricular"}
    unseen = heldout["unseen-delineation"]["params"]["annotation"]["protocol"]
    assert unseen == "ventricular-cortical" and unseen not in train_protocols
    assert {s["params"]["annotation"]["extent"] for s in train} == set(synth.EXTENTS)  # both among training sites
    assert heldout["unseen-sequence"]["params"]["scanner"]["sequence"] == "FLAIR"
    for site in plan:
        scanner = site["params"]["scanner"]
        assert site["params"]["generation"] == "texture" and len(scanner["contrast_warp"]) == 2
        assert 0.03 <= scanner["texture_amplitude"] <= 0.07
        assert site["params"]["annotation"]["extent"] in synth.EXTENTS
        lo, hi = synth.DEEP_GREY_SIGNAL[scanner["sequence"]]
        assert lo <= scanner["deep_grey_signal"] <= hi
        assert all(isinstance(s["texture_seed"], int) for s in site["subjects"])
    # The tissue generation's draws come first and are untouched: the same scanners as the tissue preset.
    tissue = plan_federation("tissue", 0)
    for new, old in zip(train, tissue):
        assert new["params"]["scanner"]["inplane_mm"] == old["params"]["scanner"]["inplane_mm"]
        assert {k: v for k, v in new["subjects"][0].items() if k != "texture_seed"} == old["subjects"][0]


def test_contrast_curves_are_nonlinear_and_t2_inverts_the_t1_order():
    *_, levels = synth.load_texture()
    plan = plan_federation("default", 0)
    by_sequence = {s["params"]["scanner"]["sequence"]: s["params"]["scanner"] for s in plan}
    t = np.linspace(levels[0], levels[2], 200)
    t1w = synth.contrast_curve(by_sequence["T1w"], levels)(t)
    t2w = synth.contrast_curve(by_sequence["T2w"], levels)(t)
    assert (np.diff(t1w) > -1e-9).all() and t1w[-1] > t1w[0]  # T1w keeps the template's order
    assert t2w[0] > t2w[-1]  # T2w inverts it
    for scanner in by_sequence.values():
        curve = synth.contrast_curve(scanner, levels)
        signal = scanner["tissue_signal"]
        np.testing.assert_allclose(curve(levels), [signal["csf"], signal["grey_matter"], signal["white_matter"]])
        assert curve(0.0) == pytest.approx(0.0)
        # Not one straight line per tissue step: the midpoint between GM and WM is off the chord.
        mid = curve((levels[1] + levels[2]) / 2)
        chord = (signal["grey_matter"] + signal["white_matter"]) / 2
        assert mid != pytest.approx(chord, abs=1e-4) or scanner["contrast_warp"][1] == 0


def _subject(preset: str = "smoke-anatomy", kind: str | None = None, sequence: str | None = None):
    plan = plan_federation(preset, 0)
    site = next(s for s in plan if (kind is None or s["heldout_kind"] == kind)
                and (sequence is None or s["params"]["scanner"]["sequence"] == sequence))
    return site, site["subjects"][0]


def test_labels_follow_anatomy_and_protocol_not_intensity():
    site, subject = _subject(sequence="T1w")
    tissue, signal, affine = synth.subject_anatomy(site["params"], subject, site["fov_scale"])
    assert tissue.shape[0] == 5 and signal.shape == tissue.shape[1:]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)

    def labels(protocol: str) -> np.ndarray:
        params = {**site["params"], "annotation": {**site["params"]["annotation"], "protocol": protocol,
                                                   "label_noise": 0.0, "gm_bias_voxels": 0, "extent": extent}}
        return synth.annotate(tissue, params, subject, spacing_mm=spacing)

    extent = "cerebrum"
    cerebrum = labels("anatomical")
    extent = "whole-brain"
    anatomical, cortical = labels("anatomical"), labels("cortical")
    ventricular, combined = labels("ventricular"), labels("ventricular-cortical")
    nuclei = tissue[3] > 0.6
    assert nuclei.sum() > 50
    # The deep nuclei: grey matter where the protocol includes them, white matter (non-cortical) where not.
    assert (anatomical[nuclei] == 2).mean() > 0.9 and (cortical[nuclei] == 3).mean() > 0.9
    moved = anatomical != cortical
    assert set(np.unique(anatomical[moved]).tolist()) <= {2, 3} and moved.sum() >= nuclei.sum() * 0.9
    # Ventricles only: a strict subset of all CSF, the rest background; grey and white matter as before.
    assert ((ventricular == 1) <= (anatomical == 1)).all() and 0 < (ventricular == 1).sum() < (anatomical == 1).sum()
    assert np.array_equal(ventricular == 2, anatomical == 2) and np.array_equal(combined == 3, cortical == 3)
    # One intensity, several labels: in the same signal band lie voxels of grey and of white matter (the nuclei).
    band = (signal > np.percentile(signal[nuclei], 25)) & (signal < np.percentile(signal[nuclei], 75))
    assert (cortical[band] == 3).sum() > 20 and (cortical[band] == 2).sum() > 20
    # Cerebrum only: the cerebellum and brainstem are background, the rest as the whole-brain delineation.
    fossa = tissue[4] > 0.5
    assert (anatomical[fossa] > 0).sum() > 1000 and (cerebrum[fossa] == 0).all()  # the mask also holds non-brain
    assert np.array_equal(cerebrum[~fossa], anatomical[~fossa])
    with pytest.raises(ValueError, match="deep grey|infratentorial"):
        synth.annotate(tissue[:3], {**site["params"]}, subject, spacing_mm=spacing)


def test_within_tissue_variation_and_texture_seed_matter():
    site, subject = _subject(sequence="T1w")
    tissue, signal, _ = synth.subject_anatomy(site["params"], subject, site["fov_scale"])
    pure_wm = tissue[2] > 0.95
    spread = signal[pure_wm].std() / signal[pure_wm].mean()
    assert spread > 0.02  # the tissue generation's pure white matter is one value before noise
    other = {**subject, "texture_seed": subject["texture_seed"] + 1}
    _, other_signal, _ = synth.subject_anatomy(site["params"], other, site["fov_scale"])
    assert not np.allclose(signal, other_signal)


def test_smoke_anatomy_federation_layout_and_declared_protocols(anatomy_federation: Path):
    manifest = load_manifest(anatomy_federation)
    raw = json.loads((anatomy_federation / "manifest.json").read_text())
    assert raw["generation"] == "texture" and raw["anatomy"]["texture_asset"] == synth.TEXTURE_ASSET_PATH.name
    assert {s.heldout_kind for s in manifest.heldout_sites} == {"unseen-sequence", "unseen-delineation"}
    for site in manifest.sites:
        assert site.generation == "texture"
        meta = json.loads((site.path / "dataset.json").read_text())
        assert meta["label_protocol"] == site.label_protocol
        extent = site.params["annotation"]["extent"]
        assert meta["delineation"] == {**synth.DELINEATION_PROTOCOLS[site.label_protocol], "extent": extent}
        assert ("cerebellum" in meta["labels"]["0"]) == (extent == "cerebrum")
        assert {int(k) for k in meta["labels"]} == {0, 1, 2, 3}
        for subject in site.subjects[:2]:
            image, label, _ = synth.render_subject(site.params, subject, site.fov_scale)
            assert image.dtype == np.int16 and 0 <= image.min() and image.max() <= 4095
            assert set(np.unique(label).tolist()) == {0, 1, 2, 3}


def test_same_seed_same_texture_arrays(anatomy_federation: Path):
    import nibabel as nib

    site = load_manifest(anatomy_federation).site("site-02")
    subject = site.subjects[1]
    image, label, affine = synth.render_subject(site.params, subject, site.fov_scale)
    axcodes = site.params["scanner"]["storage_orientation"]
    written = np.asanyarray(nib.load(site.path / "imagesTr" / f"{subject['id']}.nii.gz").dataobj)
    np.testing.assert_array_equal(synth._to_storage(image, affine, axcodes)[0], written)
    written_label = np.asanyarray(nib.load(site.path / "labelsTr" / f"{subject['id']}.nii.gz").dataobj)
    np.testing.assert_array_equal(synth._to_storage(label, affine, axcodes)[0], written_label)


def test_cache_keys_follow_the_generation_and_its_assets():
    keys = {name: synth._cache_key(name, 0) for name in ("default", "tissue", "smoke", "smoke-anatomy")}
    assert len(set(keys.values())) == len(keys)
    assert synth._asset_digest("texture") != synth._asset_digest("tissue")


def test_progress_lines_come_from_worker_processes_too(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(synth, "PROGRESS_EVERY_S", 0.05)  # about a line per finished subject
    lines: list[str] = []
    generate_federation(tmp_path / "fed", "smoke", seed=0, workers=2, progress=lines.append)
    assert len(lines) >= 20 and lines[-1].startswith("rendered 20/20 subjects")
    assert any("(site-" in line or "(new-" in line for line in lines)


def test_the_head_preset_is_the_default_with_a_head_and_earlier_federations_keep_their_keys():
    assert dataclasses.replace(synth.PRESETS["head"], head=False) == synth.PRESETS["default"]
    with pytest.raises(ValueError, match="head=True needs generation='texture'"):
        dataclasses.replace(synth.PRESETS["tissue"], head=True)
    # The key a federation is cached (and a checkpoint's trajectory hashed) under: the field the head added
    # enters it only when set, so the default federation and every run trained on it are still recognised.
    # (No float work goes into the key: the same on every machine.)
    assert synth._cache_key("default", 0) == "ee46ad0ece8f672f9f94"
    assert synth._cache_key("head", 0) not in {synth._cache_key(name, 0) for name in synth.PRESETS if name != "head"}
    # Its own random streams: every site's and subject's brain is drawn as the default draws it.
    head, default = plan_federation("head", 0), plan_federation("default", 0)
    for with_head, without in zip(head, default, strict=True):
        assert {k: v for k, v in with_head["params"]["scanner"].items() if k != "head"} == without["params"]["scanner"]
        assert {**with_head["params"], "scanner": without["params"]["scanner"]} == without["params"]
        assert [{k: v for k, v in s.items() if k != "head"} for s in with_head["subjects"]] == without["subjects"]
        assert set(with_head["params"]["scanner"]["head"]) == {"fat", "muscle", "bone", "skin"}
        assert all(len(s["head"]["layers_mm"]) == len(synth.HEAD_LAYERS) for s in with_head["subjects"])


def test_the_head_is_unlabelled_tissue_whose_intensities_overlap_the_brains():
    from scipy import ndimage

    site = next(s for s in plan_federation("head", 0) if s["params"]["scanner"]["sequence"] == "T1w")
    subject = site["subjects"][0]
    tissue, signal, affine = synth.subject_anatomy(site["params"], subject, site["fov_scale"])
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    brain = tissue[:3].sum(axis=0)
    labels = synth.annotate(tissue, site["params"], subject, spacing_mm=spacing)
    depth = ndimage.distance_transform_edt(brain < 0.5, sampling=spacing)  # mm outward from the brain
    head = (depth > 4.0) & (signal > 0.0)  # clear of the raters' one-voxel dilation and label noise
    assert (labels[head] == 0).all() and head.sum() > 0.1 * (brain > 0.5).sum()
    # On T1w the marrow and scalp fat are as bright as white matter and the muscle lies between CSF and grey
    # matter: an intensity threshold that keeps the brain's tissues keeps much of the head too.
    white = signal[tissue[2] > 0.95]
    lo, hi = np.percentile(white, [5, 95])
    assert ((signal[head] > lo) & (signal[head] < 1.2 * hi)).sum() > 0.2 * head.sum()
    assert (signal[depth > 40.0] == 0).all()  # air beyond the thickest head
    # The field of view grows by the head's margin in-plane and above (below, the site's coverage decides).
    bare_site = {**site["params"], "scanner": {k: v for k, v in site["params"]["scanner"].items() if k != "head"}}
    bare_subject = {k: v for k, v in subject.items() if k != "head"}
    _, bare, _ = synth.subject_anatomy(bare_site, bare_subject, site["fov_scale"])
    assert signal.shape[0] > bare.shape[0] and signal.shape[1] > bare.shape[1] and signal.shape[2] > bare.shape[2]


def test_head_layers_lie_in_order_outward_from_the_brain():
    # A ball of brain on a 1 mm grid: each voxel outside takes its layer's signal by depth (within the smooth
    # field's third), none inside, nothing beyond the skin.
    grid = np.stack(np.meshgrid(*[np.arange(90.0)] * 3, indexing="ij"))
    radius = np.sqrt(((grid - 45.0) ** 2).sum(axis=0))
    brain = (radius <= 25.0).astype(np.float32)
    signals = {"bone": 0.04, "fat": 1.0, "muscle": 0.4, "skin": 0.55}
    layers = [2.0, 3.0, 1.5, 2.0, 4.0, 1.5]
    signal = synth.head_signal(brain, signals, {"layers_mm": layers, "thickness_seed": 7}, np.ones(3))
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(brain < 0.5)
    assert (signal[brain > 0] == 0).all()
    assert np.allclose(signal[(depth > 0.0) & (depth < 2.0 * 2 / 3)], signals["bone"])  # the inner table
    assert (signal[depth > sum(layers) * 4 / 3 + 1.0] == 0).all()  # air
    outward = [signal[(depth > d - 0.5) & (depth < d + 0.5)] for d in np.arange(1.0, 20.0)]
    # A fold cut into the brain (a pocket 3 mm wide, 10 mm deep) is skull base inside the closed outline, not
    # skin and air drawn into the head.
    pocket = (np.abs(grid[1] - 45.0) <= 3.0) & (np.abs(grid[2] - 45.0) <= 3.0) & (grid[0] >= 60.0) & (radius <= 25.0)
    folded = synth.head_signal(brain * ~pocket, signals, {"layers_mm": layers, "thickness_seed": 7}, np.ones(3))
    assert pocket.sum() > 100 and np.allclose(folded[pocket], signals["bone"])
    assert any(np.isclose(ring, signals["fat"]).mean() > 0.5 for ring in outward[2:6])  # the marrow
    assert np.allclose(np.unique(signal), sorted({0.0, *signals.values()}))  # every layer, and air
