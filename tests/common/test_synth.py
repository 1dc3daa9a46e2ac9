"""The synthetic federation: anatomy asset, layout, determinism, caching, heterogeneity, labels."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedmeta.common import synth
from fedmeta.common.synth import generate_federation, load_manifest, plan_federation


def _arrays(site_dir: Path, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    image = np.asanyarray(nib.load(site_dir / "imagesTr" / f"{case_id}.nii.gz").dataobj)
    label = np.asanyarray(nib.load(site_dir / "labelsTr" / f"{case_id}.nii.gz").dataobj)
    return image, label


def _render(site: dict, subject: dict) -> tuple[np.ndarray, np.ndarray]:
    tissue, affine = synth.subject_tissue(site["params"], subject, site["fov_scale"])
    image = synth.render_image(tissue, site["params"], subject)
    label = synth.annotate(tissue, site["params"], subject)
    axcodes = site["params"]["scanner"]["storage_orientation"]
    return synth._to_storage(image, affine, axcodes)[0], synth._to_storage(label, affine, axcodes)[0]


def test_anatomy_asset_is_a_cropped_tissue_probability_volume():
    probabilities, affine = synth.load_anatomy()
    assert probabilities.shape[0] == 3 and probabilities.dtype == np.float32
    assert np.allclose(np.diag(affine)[:3], 1.5)
    total = probabilities.sum(axis=0)
    assert total.max() <= 1.0 + 1e-6 and probabilities.min() >= 0.0
    # A brain: ~1.1-1.7 l of tissue, GM > WM > CSF by volume in the ICBM template.
    volumes_ml = probabilities.sum(axis=(1, 2, 3)) * 1.5**3 / 1000
    assert 1000 < volumes_ml.sum() < 2000
    assert volumes_ml[1] > volumes_ml[2] > volumes_ml[0] > 50
    assert synth.ASSET_PATH.stat().st_size < 5e6
    notice = (synth.ASSET_PATH.parent / "ICBM152_NOTICE.txt").read_text()
    assert "Louis Collins" in notice and "McGill University" in notice and "Permission to use" in notice


def test_smoke_layout_manifest_and_msd_files(smoke_federation: Path):
    manifest = load_manifest(smoke_federation)
    assert [s.name for s in manifest.train_sites] == ["site-01", "site-02", "site-03"]
    assert {s.heldout_kind for s in manifest.heldout_sites} == {"unseen-sequence", "unseen-annotation"}
    assert manifest.heldout_sites == sorted(manifest.heldout_sites, key=lambda s: s.name)
    for site in manifest.sites:
        meta = json.loads((site.path / "dataset.json").read_text())
        assert meta["tensorImageSize"] == "3D" and meta["numTraining"] == site.num_patients == 4
        assert meta["modality"]["0"] == site.params["scanner"]["sequence"]
        assert len(site.subjects) == site.num_patients and "rotation_deg" in site.subjects[0]
        for entry in meta["training"]:
            image = nib.load(site.path / entry["image"])
            label = nib.load(site.path / entry["label"])
            assert image.ndim == 3 and image.shape == label.shape
            assert np.allclose(image.affine, label.affine)
            assert "".join(nib.aff2axcodes(image.affine)) == site.params["scanner"]["storage_orientation"]
            zooms = sorted(float(z) for z in image.header.get_zooms())
            scanner = site.params["scanner"]
            assert np.allclose(zooms, sorted([scanner["inplane_mm"]] * 2 + [scanner["slice_thickness_mm"]]), atol=1e-3)
            assert image.get_data_dtype() == np.int16
            data = np.asanyarray(image.dataobj)
            assert data.min() >= 0 and data.max() <= 4095


def test_same_seed_same_arrays_different_seed_different(smoke_federation: Path):
    assert plan_federation("smoke", 0) == plan_federation("smoke", 0)
    plan = plan_federation("smoke", 0)
    site = plan[1]
    subject = site["subjects"][2]
    image, label = _render(site, subject)
    written_image, written_label = _arrays(smoke_federation / site["name"], subject["id"])
    np.testing.assert_array_equal(image, written_image)  # the whole chain, re-run, gives the written arrays
    np.testing.assert_array_equal(label, written_label)

    other = plan_federation("smoke", 1)
    assert other[1]["params"] != site["params"]
    other_image, _ = _render(other[1], other[1]["subjects"][2])
    assert other_image.shape != image.shape or not np.array_equal(other_image, image)
    # Same site, another subject: a different brain.
    second_image, _ = _render(site, site["subjects"][3])
    assert not np.array_equal(second_image, image)


def test_the_manifest_records_how_long_generation_took(smoke_federation: Path):
    # A record for the reader, not a timed test: how fast is for benchmarks, not for assertions.
    seconds = json.loads((smoke_federation / "manifest.json").read_text())["generation_seconds"]
    assert isinstance(seconds, float) and math.isfinite(seconds) and seconds > 0


@pytest.mark.slow
def test_parallel_generation_matches_serial(smoke_federation: Path, tmp_path: Path):
    root = generate_federation(tmp_path / "again", "smoke", seed=0, workers=2)
    for site in load_manifest(root).sites:
        for subject in site.subjects:
            for a, b in zip(_arrays(site.path, subject["id"]), _arrays(smoke_federation / site.name, subject["id"])):
                np.testing.assert_array_equal(a, b)


def test_cached_second_call_is_instant_and_other_contents_are_refused(smoke_federation: Path, tmp_path: Path):
    # Cached means nothing is rendered or written again: every file keeps its modification time.
    before = {p: p.stat().st_mtime_ns for p in smoke_federation.rglob("*") if p.is_file()}
    assert generate_federation(smoke_federation, "smoke", seed=0) == smoke_federation
    assert {p: p.stat().st_mtime_ns for p in smoke_federation.rglob("*") if p.is_file()} == before
    with pytest.raises(FileExistsError, match="different federation.*force=True"):
        generate_federation(smoke_federation, "smoke", seed=1)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a federation")
    with pytest.raises(FileExistsError, match="holds no fedmeta manifest"):
        generate_federation(foreign, "smoke", seed=0, force=True)
    assert (foreign / "notes.txt").exists()


def test_the_cache_replaces_a_federation_from_an_older_generator(smoke_federation: Path, tmp_path: Path):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(smoke_federation, cache / "smoke-0")
    manifest = json.loads((cache / "smoke-0" / "manifest.json").read_text())
    before = {p: p.stat().st_mtime_ns for p in (cache / "smoke-0").rglob("*") if p.is_file()}
    assert synth.cached_federation(cache, "smoke", 0) == cache / "smoke-0"  # current: reused as is, untouched
    assert {p: p.stat().st_mtime_ns for p in (cache / "smoke-0").rglob("*") if p.is_file()} == before
    manifest.update(cache_key="from-generator-1.0", generator_version="1.0")
    (cache / "smoke-0" / "manifest.json").write_text(json.dumps(manifest))
    synth.cached_federation(cache, "smoke", 0)  # stale: regenerated in place
    assert json.loads((cache / "smoke-0" / "manifest.json").read_text())["generator_version"] == synth.GENERATOR_VERSION
    (cache / "default-0").mkdir()
    (cache / "default-0" / "mine.txt").write_text("not a federation")
    with pytest.raises(FileExistsError, match="holds no fedmeta manifest"):
        synth.cached_federation(cache, "default", 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"preset": "huge"}, "preset='huge' is not known"), ({"seed": -1}, "non-negative"), ({"seed": 1.5}, "non-negative")],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        generate_federation(tmp_path / "x", **kwargs)


def test_tissue_preset_plan_sizes_and_heldout_kinds():
    # The default of generator 1.x, kept as the tissue preset (test_synth_texture.py: the new default).
    plan = plan_federation("tissue", 0)
    train = [s for s in plan if s["role"] == "train"]
    heldout = {s["heldout_kind"]: s for s in plan if s["role"] == "heldout"}
    assert len(train) == 8 and set(heldout) == {"unseen-mix", "unseen-sequence", "unseen-annotation", "unseen-anatomy"}
    sizes = [s["num_patients"] for s in plan]
    assert all(10 <= n <= 20 for n in sizes) and len(set(sizes)) > 3  # uneven sites
    train_sequences = [s["params"]["scanner"]["sequence"] for s in train]
    assert all(train_sequences.count(seq) >= 2 for seq in synth.TRAIN_SEQUENCES)
    assert heldout["unseen-sequence"]["params"]["scanner"]["sequence"] not in train_sequences
    assert all(s["params"]["annotation"]["protocol"] == "standard" for s in train)
    assert heldout["unseen-annotation"]["params"]["annotation"]["protocol"] == "csf-merged"
    mix = heldout["unseen-mix"]["params"]
    assert mix["scanner"]["sequence"] in synth.TRAIN_SEQUENCES and mix["annotation"]["protocol"] == "standard"
    assert 0.4 <= mix["annotation"]["threshold"] <= 0.6 and 1.2 <= mix["scanner"]["inplane_mm"] <= 2.0
    # The unseen-anatomy site lies outside every training range (atrophy, head size, rotation, warp).
    train_subjects = [subject for site in train for subject in site["subjects"]]
    for subject in heldout["unseen-anatomy"]["subjects"]:
        assert subject["atrophy"] > max(t["atrophy"] for t in train_subjects)
        assert all(abs(v - 1.0) >= 0.10 for v in subject["scale"])
        assert all(abs(v) >= 12.0 for v in subject["rotation_deg"]) and subject["elastic_amplitude_mm"] >= 5.0
    assert max(t["elastic_amplitude_mm"] for t in train_subjects) <= 4.0


def test_protocols_preset_mixes_label_protocols_and_holds_out_unseen_ones():
    plan = plan_federation("protocols", 0)
    train = [s["params"]["annotation"]["protocol"] for s in plan if s["role"] == "train"]
    heldout = {s["heldout_kind"]: s["params"]["annotation"]["protocol"] for s in plan if s["role"] == "heldout"}
    assert set(train) == {"standard", "csf-merged", "gm-only"}
    assert heldout == {"unseen-protocol": "wm-only", "unseen-structure": "ventricles", "unseen-anatomy": "standard"}
    assert not set(heldout.values()) - {"standard"} & set(train)  # asked for by no training site


def test_annotation_protocols_keep_only_their_classes():
    plan = plan_federation("protocols", 0)
    site = next(s for s in plan if s["heldout_kind"] == "unseen-structure")
    subject = site["subjects"][0]
    tissue, affine = synth.subject_tissue(site["params"], subject, fov_scale=0.7)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)

    def labels(protocol: str) -> np.ndarray:
        params = {**site["params"], "annotation": {**site["params"]["annotation"], "protocol": protocol}}
        return synth.annotate(tissue, params, subject, spacing_mm=spacing)

    standard = labels("standard")
    for protocol, kept in (("csf-merged", {2, 3}), ("gm-only", {2}), ("wm-only", {3})):
        out = labels(protocol)
        assert set(np.unique(out).tolist()) == {0, *kept}, protocol
        for value in kept:
            assert np.array_equal(out == value, standard == value), (protocol, value)
    ventricles = labels("ventricles")
    assert set(np.unique(ventricles).tolist()) == {0, 1}
    assert ((ventricles == 1) <= (standard == 1)).all()  # a subset of the CSF: the deep, enclosed part
    assert 0 < (ventricles == 1).sum() < (standard == 1).sum()
    with pytest.raises(ValueError, match="spacing"):
        synth.annotate(tissue, site["params"], subject)


def _tissue_medians(site_dir: Path, case_id: str) -> dict[int, float]:
    image, label = _arrays(site_dir, case_id)
    return {c: float(np.median(image[label == c])) for c in (1, 2, 3) if (label == c).any()}


def test_sites_are_heterogeneous_and_t2_inverts_the_t1_contrast(smoke_federation: Path):
    manifest = load_manifest(smoke_federation)
    by_sequence = {s.params["scanner"]["sequence"]: s for s in manifest.sites}
    t1 = _tissue_medians(by_sequence["T1w"].path, by_sequence["T1w"].subjects[0]["id"])
    t2 = _tissue_medians(by_sequence["T2w"].path, by_sequence["T2w"].subjects[0]["id"])
    assert t1[3] > t1[2] > t1[1]  # T1w: white matter brightest, CSF darkest
    assert t2[1] > t2[2] > t2[3]  # T2w: inverted
    flair = _tissue_medians(by_sequence["FLAIR"].path, by_sequence["FLAIR"].subjects[0]["id"])
    assert flair[2] > flair[1] and flair[3] > flair[1]  # CSF nulled
    # Per-site tissue statistics (GM/WM ratio of medians) differ from site to site.
    ratios = [(lambda m: m[2] / m[3])(_tissue_medians(s.path, s.subjects[0]["id"])) for s in manifest.sites]
    assert len({round(r, 2) for r in ratios}) == len(ratios)


def test_labels_stay_within_each_sites_declared_set(smoke_federation: Path):
    for site in load_manifest(smoke_federation).sites:
        declared = {int(k) for k in json.loads((site.path / "dataset.json").read_text())["labels"]}
        seen: set[int] = set()
        for subject in site.subjects:
            seen |= set(np.unique(_arrays(site.path, subject["id"])[1]).tolist())
        assert seen <= declared, (site.name, seen, declared)
        if site.label_protocol == "csf-merged":
            assert declared == {0, 2, 3} and 1 not in seen
        else:
            assert seen == {0, 1, 2, 3}


def test_cli_synth_with_preview_and_show_sites(smoke_federation: Path, tmp_path: Path, capsys):
    import matplotlib.image as mpimg

    from fedmeta.simulations.cli import main

    preview = tmp_path / "preview.png"
    assert main(["synth", "--out", str(smoke_federation), "--preset", "smoke", "--seed", "0",
                 "--preview", str(preview)]) == 0
    out = capsys.readouterr().out
    assert "new-sequence" in out and "FLAIR" in out and "csf-merged" in out
    picture = mpimg.imread(preview)
    assert picture.shape[1] > 1.5 * picture.shape[0]  # five site columns side by side
    assert picture[..., :3].std() > 0.1  # not a blank canvas
    single = tmp_path / "one.png"
    assert main(["show-sites", str(smoke_federation / "site-02"), "--out", str(single)]) == 0
    assert single.stat().st_size > 5000
    assert main(["synth", "--out", str(smoke_federation), "--preset", "smoke", "--seed", "3"]) == 2
    assert "force" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# Lazy federations (the scale-N presets): the manifest now, a site's volumes when first used


@pytest.fixture
def tiny_lazy(lazy_preset):
    """A 3-site lazy preset, one patient per site, one new hospital."""
    return lazy_preset(sites=3, patients=1, heldout=("unseen-sequence",))


def test_a_lazy_federation_renders_each_site_on_first_use_the_same_files_as_an_eager_one(tiny_lazy, tmp_path):
    lazy_root = generate_federation(tmp_path / "lazy", tiny_lazy, seed=3)
    assert sorted(p.name for p in lazy_root.iterdir()) == ["manifest.json"]  # nothing rendered yet
    manifest = load_manifest(lazy_root)
    assert all(info.lazy and not info.path.exists() for info in manifest.sites)
    eager_root = generate_federation(tmp_path / "eager", tiny_lazy, seed=3, lazy=False)
    assert all((eager_root / info.name / "dataset.json").is_file() for info in manifest.sites)

    first = manifest.train_sites[1]
    assert first.folder() == lazy_root / first.name
    assert sorted(p.name for p in lazy_root.iterdir()) == ["manifest.json", first.name]  # that site alone
    assert json.loads((first.path / "dataset.json").read_text()) == json.loads(
        (eager_root / first.name / "dataset.json").read_text())
    for subject in first.subjects:
        for a, b in zip(_arrays(first.path, subject["id"]), _arrays(eager_root / first.name, subject["id"])):
            np.testing.assert_array_equal(a, b)
    mtime = (first.path / "dataset.json").stat().st_mtime_ns
    assert load_manifest(lazy_root).site(first.name).folder() == first.path  # rendered once, then reused
    assert (first.path / "dataset.json").stat().st_mtime_ns == mtime
    # The cache check does not ask for every site of a lazy federation, and asking for all renders the rest.
    assert generate_federation(lazy_root, tiny_lazy, seed=3) == lazy_root
    assert len([p for p in lazy_root.iterdir() if p.is_dir()]) == 1
    generate_federation(lazy_root, tiny_lazy, seed=3, lazy=False)
    assert sorted(p.name for p in lazy_root.iterdir() if p.is_dir()) == sorted(i.name for i in manifest.sites)


def test_sites_asked_for_at_once_by_several_workers_render_once_and_leave_no_partial_folder(tiny_lazy, tmp_path):
    import threading

    root = generate_federation(tmp_path / "lazy", tiny_lazy, seed=0)
    infos = [load_manifest(root).train_sites[0] for _ in range(3)]  # three workers, three manifest copies
    # A render killed half-way, by a pid no process can have (above pid_max): a finished child's pid could be
    # reused meanwhile on a busy machine.
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1 if Path("/proc/sys/kernel/pid_max").exists() else 2**31 - 1
    stale = root / f".{infos[0].name}.partial-{dead}-1"
    (stale / "imagesTr").mkdir(parents=True)
    errors: list[BaseException] = []

    def ask(info):
        try:
            info.folder()
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=ask, args=(info,)) for info in infos]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", infos[0].name]
    assert len(list((root / infos[0].name / "labelsTr").glob("*.nii.gz"))) == infos[0].num_patients


def test_the_thousand_site_preset_plans_its_sites_in_site_order():
    plan = plan_federation("scale-1000", 0)
    train = [site["name"] for site in plan if site["role"] == "train"]
    assert len(train) == 1000 and train == sorted(train)  # zero-padded: the manifest's order is the sites' order
    assert train[0] == "site-0001" and train[-1] == "site-1000"
    assert [site["heldout_kind"] for site in plan if site["role"] == "heldout"] == ["unseen-sequence",
                                                                                    "unseen-annotation"]
    assert {site["num_patients"] for site in plan} == {3}
    assert synth.PRESETS["scale-1000"].lazy and not synth.PRESETS["default"].lazy
    # Smaller federations keep their names.
    assert [site["name"] for site in plan_federation("smoke", 0)][:3] == ["site-01", "site-02", "site-03"]


def test_a_changed_preset_is_a_new_federation_for_the_cache(tiny_lazy, monkeypatch):
    key = synth._cache_key(tiny_lazy, 0)
    monkeypatch.setitem(synth.PRESETS, tiny_lazy, dataclass_replace(synth.PRESETS[tiny_lazy], patients=(2, 2)))
    assert synth._cache_key(tiny_lazy, 0) != key


def dataclass_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def test_a_lazy_site_explains_what_stops_its_render_and_sweeps_what_a_killed_render_left(tiny_lazy, tmp_path,
                                                                                        monkeypatch):
    import subprocess
    import sys

    root = generate_federation(tmp_path / "lazy", tiny_lazy, seed=0)
    info = load_manifest(root).train_sites[0]
    info.folder()
    # Another process rendered the site; one killed half-way left its staging folder: the next use sweeps it.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = root / f".{info.name}.partial-{dead.stdout.strip()}-7"
    (stale / "imagesTr").mkdir(parents=True)
    assert load_manifest(root).site(info.name).folder() == info.path and not stale.exists()
    # A folder a user made there is not a rendered site: named, with the way out.
    other = load_manifest(root).train_sites[1]
    other.path.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{other.path}.*without dataset.json.*Delete that folder"):
        other.folder()
    other.path.rmdir()
    # Made by another generator: rendering now would mix two generators' sites in one federation.
    other.generator_version = "0.9"
    with pytest.raises(ValueError, match="made by generator 0.9.*Regenerate the federation"):
        other.folder()
    # A federation folder nobody may write to (a read-only mount; root may write anywhere, so the write fails
    # by hand here): the site, the folder and the fix are named, and no staging folder is left.
    third = load_manifest(root).train_sites[2]

    def read_only(jobs, workers):
        raise OSError(30, "Read-only file system", str(jobs[0][0]))

    monkeypatch.setattr(synth, "_render_subjects", read_only)
    with pytest.raises(OSError, match=f"site {third.name} of the lazy federation {root}.*Read-only.*--all-sites"):
        third.folder()
    assert not third.path.exists() and not list(root.glob(f".{third.name}.partial-*"))


def test_a_federation_from_an_older_definition_of_the_preset_is_named_as_such(tiny_lazy, tmp_path, monkeypatch):
    root = generate_federation(tmp_path / "lazy", tiny_lazy, seed=0)
    monkeypatch.setitem(synth.PRESETS, tiny_lazy, dataclass_replace(synth.PRESETS[tiny_lazy], patients=(2, 2)))
    with pytest.raises(FileExistsError, match="older definition of that preset.*force=True"):
        generate_federation(root, tiny_lazy, seed=0)


# ----------------------------------------------------------------------------------------------------
# Replacing a federation (--force): only a fedmeta federation, and only what fedmeta wrote in it


def _contents(folder: Path) -> dict[str, bytes | None]:
    return {p.relative_to(folder).as_posix(): None if p.is_dir() else p.read_bytes() for p in folder.rglob("*")}


@pytest.mark.parametrize("manifest", [
    {"name": "web app"},  # someone's project folder
    "not json {",
    # A manifest shaped like ours whose site path leads out of the folder: never a federation fedmeta wrote.
    {"generator_version": "1.1", "preset": "smoke", "seed": 0, "cache_key": "x",
     "sites": [{"name": "a", "path": "../elsewhere", "subjects": []}]},
], ids=["foreign", "not-json", "path-out"])
def test_force_never_replaces_a_folder_whose_manifest_is_not_a_fedmeta_federation(tmp_path, capsys, manifest):
    from fedmeta.simulations.cli import main

    project = tmp_path / "p"
    (project / "src").mkdir(parents=True)
    (project / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    (project / "notes.txt").write_text("precious")
    (project / "src" / "main.py").write_text("code")
    before = _contents(project)
    for force in ([], ["--force"]):
        assert main(["synth", "--out", str(project), "--preset", "smoke", *force]) == 2
        err = capsys.readouterr().err
        assert f"{project} holds a manifest.json that is not a fedmeta federation manifest" in err
        assert "force" not in err.replace(str(project), "")  # --force cannot help here, so it is not suggested
    assert _contents(project) == before
    assert not list(tmp_path.glob(".p.partial-*"))


def test_force_replaces_a_federation_only_when_it_holds_nothing_but_what_fedmeta_wrote(tiny_lazy, tmp_path, capsys):
    from fedmeta.common.outputs import Outputs
    from fedmeta.simulations.cli import main

    root = generate_federation(tmp_path / "fed", tiny_lazy, seed=0, lazy=False)
    site = load_manifest(root).train_sites[0]
    Outputs(root, "show-sites").write_bytes("preview.png", b"a preview fedmeta drew")  # fedmeta's, journalled
    mine = {"notes.txt": "precious", f"{site.name}/README": "about this site",
            f"{site.name}/imagesTr/extra_001.nii.gz": "a scan added by hand"}
    for name, text in mine.items():
        (root / name).write_text(text)
    (root / "results").mkdir()
    before = _contents(root)
    assert main(["synth", "--out", str(root), "--preset", tiny_lazy, "--seed", "1", "--force"]) == 2
    err = capsys.readouterr().err
    assert (f"{root} holds a fedmeta federation but also what fedmeta did not write there: notes.txt, results/, "
            f"{site.name}/README, {site.name}/imagesTr/extra_001.nii.gz. It is not replaced, not even with --force") in err
    assert "preview.png" not in err.split("write there:")[1]
    assert _contents(root) == before
    # Without them (and with the preview edited by hand: no longer what fedmeta drew) still refused, naming it.
    for name in mine:
        (root / name).unlink()
    (root / "results").rmdir()
    (root / "preview.png").write_bytes(b"edited")
    with pytest.raises(FileExistsError, match=r"did not write there: preview\.png\. It is not replaced"):
        generate_federation(root, tiny_lazy, seed=1, force=True)
    Outputs(root, "show-sites").record("preview.png")  # drawn again by fedmeta: its own once more
    assert main(["synth", "--out", str(root), "--preset", tiny_lazy, "--seed", "1", "--force"]) == 0
    assert load_manifest(root).seed == 1 and not (root / "preview.png").exists()


def test_a_staging_folder_left_by_a_killed_synth_is_removed_by_the_next_run(tiny_lazy, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".fed.partial-{dead.stdout.strip()}"  # what `kill -9` of a synth leaves beside its root
    (stale / "site-01" / "imagesTr").mkdir(parents=True)
    live = tmp_path / f".fed.partial-{os.getppid()}"  # a synth still running: left alone
    live.mkdir()
    other = tmp_path / ".fed.partial-notes"  # not a staging folder name fedmeta makes
    other.mkdir()
    generate_federation(tmp_path / "fed", tiny_lazy, seed=0)
    assert not stale.exists() and live.is_dir() and other.is_dir()


def test_a_federation_whose_sites_took_part_in_a_run_is_still_fedmetas_to_replace(tmp_path):
    from fedmeta.common.data import SITE_KEY_FILE

    root = generate_federation(tmp_path / "smoke", "smoke", seed=0)
    (root / "site-01" / SITE_KEY_FILE).write_text("123\n")  # what a run's ClientApp kept there before 2026-12
    generate_federation(root, "smoke", seed=0, force=True)
    assert not (root / "site-01" / SITE_KEY_FILE).exists()


def test_a_staging_folder_is_fedmetas_only_when_it_holds_only_what_a_render_writes(tmp_path):
    import json as _json

    root = generate_federation(tmp_path / "fed", "smoke", seed=0)
    planted = root / ".site-01.partial-999999999"  # a dead pid's name, but a user's file inside
    planted.mkdir()
    (planted / "thesis.docx").write_text("precious")
    huge = root / ".site-01.partial-99999999999999999999999"  # no pid is that large: not alive, not a crash
    (huge / "imagesTr").mkdir(parents=True)
    with pytest.raises(FileExistsError, match=r"\.site-01\.partial-999999999/"):
        generate_federation(root, "smoke", seed=0, force=True)
    assert (planted / "thesis.docx").read_text() == "precious"
    planted.joinpath("thesis.docx").unlink()
    generate_federation(root, "smoke", seed=0, force=True)  # now only render leftovers: swept with the rest
    # A manifest whose site path leads out of the federation is refused wherever it is read.
    manifest = _json.loads((root / "manifest.json").read_text())
    manifest["sites"][0]["path"] = "../escaped"
    (root / "manifest.json").write_text(_json.dumps(manifest))
    with pytest.raises(ValueError, match=r"site path '../escaped' is not a plain folder name"):
        load_manifest(root)
