"""A new hospital adopts the model: `fedmeta adapt` then `fedmeta predict` on a held-out site of the smoke
federation. Masks lie in each scan's own grid, are named after their scans, score what `adapt` reported, and
beat the unadapted initialisation's; the release is verified; bad scans and altered models are refused."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedmeta.client.model_card import CARD_JSON, CARD_MD, MODEL_FILE, load_site_model
from fedmeta.client.prediction_files import case_name
from fedmeta.common.metrics import patient_dice
from fedmeta.common.outputs import JOURNAL_NAME
from fedmeta.common.synth import load_manifest
from fedmeta.simulations.cli import main
from tests.conftest import train_smoke_run
from tests.common.test_release import _key_pair


@pytest.fixture(scope="module")
def release(smoke_federation, tmp_path_factory) -> tuple[Path, Path]:
    """A short run of the smoke federation, signed by the consortium: (checkpoint, public key)."""
    run_dir = tmp_path_factory.mktemp("adopt-run")
    checkpoint = train_smoke_run(smoke_federation, run_dir, num_rounds=3, episodes_per_site=2, inner_lr=0.1,
                                 meta_lr=0.01)
    private, public = _key_pair(run_dir, "consortium")
    assert main(["sign", str(checkpoint), "--key", str(private)]) == 0
    return checkpoint, public


@pytest.fixture(scope="module")
def heldout_site(smoke_federation) -> Path:
    return smoke_federation / load_manifest(smoke_federation).heldout_sites[0].path


def _adapt(checkpoint, public, site, out, *extra) -> int:
    return main(["adapt", "--checkpoint", str(checkpoint), "--public-key", str(public), "--data", str(site),
                 "--shots", "5", "--out", str(out), "--device", "cpu", *extra])


def _mask_dice(masks: Path, site: Path, classes) -> dict[str, float]:
    """Per-patient Dice of written masks against the site's label files (the same metric adapt reports)."""
    out = {}
    for label in sorted((site / "labelsTr").glob("*.nii.gz")):
        mask = masks / label.name
        truth = torch.from_numpy(np.asarray(nib.load(label).dataobj).astype(np.int64))
        pred = torch.from_numpy(np.asarray(nib.load(mask).dataobj).astype(np.int64))
        scores = patient_dice(pred, truth, classes)
        out[label.name] = sum(scores.values()) / len(scores)
    return out


def test_adapt_then_predict_writes_masks_in_each_scans_grid_that_score_what_adapt_reported(release, heldout_site,
                                                                                            tmp_path):
    checkpoint, public = release
    assert _adapt(checkpoint, public, heldout_site, tmp_path / "model", "--steps", "20") == 0
    assert _adapt(checkpoint, public, heldout_site, tmp_path / "init", "--steps", "0") == 0
    card = json.loads((tmp_path / "model" / CARD_JSON).read_text())
    assert card["initialisation"]["release_verified"] and card["adaptation"]["steps"] == 20
    # The data's fingerprint describes the scans as read: every patient, their voxel sizes.
    first = nib.load(sorted((heldout_site / "imagesTr").glob("*.nii.gz"))[0])
    assert card["data"]["patients"] == len(list((heldout_site / "imagesTr").glob("*.nii.gz")))
    assert card["data"]["median_voxel_mm"] == pytest.approx(list(first.header.get_zooms()[:3]), abs=0.05)
    assert card["dice"]["held_out_patients"] >= 1 and "Dice on held-out patients" in (tmp_path / "model" / CARD_MD).read_text()
    # No file name and no patient identifier in the card: it may leave the site with the model.
    text = (tmp_path / "model" / CARD_JSON).read_text() + (tmp_path / "model" / CARD_MD).read_text()
    for scan in (heldout_site / "imagesTr").glob("*.nii.gz"):
        assert case_name(scan) not in text and scan.name not in text

    # --steps 0 writes the initialisation itself.
    init_model = load_site_model(tmp_path / "init")
    released = torch.load(checkpoint, weights_only=True)["params"]
    assert all(torch.equal(init_model.params[n], released[n]) for n in released)

    for model in ("model", "init"):
        assert main(["predict", "--model", str(tmp_path / model), "--input", str(heldout_site / "imagesTr"),
                     "--out", str(tmp_path / f"masks-{model}"), "--device", "cpu"]) == 0
    scans = sorted((heldout_site / "imagesTr").glob("*.nii.gz"))
    for scan in scans:  # named after the scan, in the scan's own grid
        mask = nib.load(tmp_path / "masks-model" / f"{case_name(scan)}.nii.gz")
        image = nib.load(scan)
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
        assert nib.aff2axcodes(mask.affine) == nib.aff2axcodes(image.affine)
        assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1, 2, 3}
        assert (tmp_path / "masks-model" / f"{case_name(scan)}_overlay.png").stat().st_size > 1000

    # The held-out patients' masks score exactly what the card says (same metric, same masks).
    classes = card["dice"]["classes"]
    held = _heldout_indices(heldout_site)
    for model in ("model", "init"):
        scored = list(_mask_dice(tmp_path / f"masks-{model}", heldout_site, classes).values())
        reported = json.loads((tmp_path / model / CARD_JSON).read_text())["dice"]["after"]["per_patient"]
        assert np.allclose([reported[f"patient-{i}"] for i in range(1, len(held) + 1)], [scored[p] for p in held],
                           atol=1e-9)
    adapted_mean = np.mean(sorted(_mask_dice(tmp_path / "masks-model", heldout_site, classes).values()))
    init_mean = np.mean(sorted(_mask_dice(tmp_path / "masks-init", heldout_site, classes).values()))
    assert card["dice"]["after"]["dice"] > card["dice"]["before"]["dice"]
    assert adapted_mean > init_mean, (adapted_mean, init_mean)


@pytest.mark.parametrize(("umask", "file_mode", "folder_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)],
                         ids=["022", "077"])
def test_masks_and_cards_take_the_mode_the_umask_gives(release, heldout_site, tmp_path, umask, file_mode,
                                                       folder_mode):
    """A PACS upload that runs as another user reads the masks under the usual umask 022; under 077 nobody else
    does. The site's own umask decides, not fedmeta."""
    checkpoint, public = release
    previous = os.umask(umask)
    try:
        assert _adapt(checkpoint, public, heldout_site, tmp_path / "model", "--steps", "0") == 0
        assert main(["predict", "--model", str(tmp_path / "model"), "--input", str(heldout_site / "imagesTr"),
                     "--out", str(tmp_path / "results" / "masks"), "--device", "cpu"]) == 0
    finally:
        os.umask(previous)
    written = [*(tmp_path / "model").iterdir(), *(tmp_path / "results" / "masks").iterdir()]
    assert {CARD_JSON, CARD_MD, MODEL_FILE, "predictions.json"} <= {p.name for p in written}
    assert any(p.name.endswith("_overlay.png") for p in written) and any(p.name.endswith(".nii.gz") for p in written)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in written} == {p.name: file_mode for p in written}
    for folder in (tmp_path / "model", tmp_path / "results", tmp_path / "results" / "masks"):
        assert stat.S_IMODE(folder.stat().st_mode) == folder_mode, folder


def _heldout_indices(site: Path) -> list[int]:
    """The patients (indices in label-file order) adapt holds out with seed 0."""
    from types import SimpleNamespace

    from fedmeta.common.data import adaptation_patients

    _, held = adaptation_patients(SimpleNamespace(num_patients=len(list((site / "labelsTr").glob("*.nii.gz"))),
                                                  root=site), 0)
    return sorted(held)


def test_adapt_verifies_the_release(release, heldout_site, tmp_path):
    checkpoint, public = release
    copy = tmp_path / "checkpoint.pt"
    for suffix in ("", ".sig", ".release.json"):
        shutil.copy(f"{checkpoint}{suffix}", f"{copy}{suffix}")
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    assert _adapt(copy, public, heldout_site, tmp_path / "tampered", "--steps", "1") == 1
    assert not (tmp_path / "tampered" / MODEL_FILE).exists()
    unsigned = tmp_path / "unsigned.pt"
    shutil.copy(checkpoint, unsigned)
    assert main(["adapt", "--checkpoint", str(unsigned), "--data", str(heldout_site), "--out",
                 str(tmp_path / "u"), "--steps", "1"]) == 1
    assert main(["adapt", "--checkpoint", str(unsigned), "--data", str(heldout_site), "--out",
                 str(tmp_path / "u"), "--steps", "1", "--allow-unsigned"]) == 0
    assert json.loads((tmp_path / "u" / CARD_JSON).read_text())["initialisation"]["release_verified"] is False


def test_the_release_key_defaults_to_the_site_bundles_pinned_copy(release, heldout_site, tmp_path, monkeypatch,
                                                                   capsys):
    from fedmeta.common.release import key_fingerprint, load_public_key

    checkpoint, public = release
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEDMETA_RELEASE_KEY", raising=False)
    adapt = ["adapt", "--checkpoint", str(checkpoint), "--data", str(heldout_site), "--out", "m", "--steps", "0",
             "--overwrite"]  # run again below: the site model of the previous call is adapt's own
    # A release.pub lying here without a bundle's pin (it may have come with the checkpoint) is not taken.
    shutil.copy(public, tmp_path / "release.pub")
    assert main(adapt) == 1
    assert "no --public-key" in capsys.readouterr().err
    # In a site bundle, site.json pins its fingerprint (fedmeta provision writes it): then it is the default.
    (tmp_path / "site.json").write_text(json.dumps({"release_key_sha256": key_fingerprint(load_public_key(public))}))
    assert main(adapt) == 0
    assert "verified" in capsys.readouterr().out
    # A bundle whose release.pub was swapped for another key is refused, naming the pin.
    _other_private, other_public = _key_pair(tmp_path / "m", "other")
    shutil.copy(other_public, tmp_path / "release.pub")
    assert main(adapt) == 1
    assert "its fingerprint is not the one site.json pins" in capsys.readouterr().err


def test_predict_refuses_bad_scans_by_name_and_segments_the_rest(release, heldout_site, tmp_path, capsys):
    checkpoint, public = release
    scans = tmp_path / "scans"
    scans.mkdir()
    good = sorted((heldout_site / "imagesTr").glob("*.nii.gz"))[0]
    shutil.copy(good, scans / good.name)
    thin = nib.Nifti1Image(np.ones((40, 40, 2), np.float32), np.eye(4))
    nib.save(thin, scans / "thin.nii.gz")
    (scans / "broken.nii.gz").write_bytes(b"not a scan")
    out = tmp_path / "masks"
    # A release used directly: verified like adapt does.
    assert main(["predict", "--model", str(checkpoint), "--public-key", str(public), "--input", str(scans),
                 "--out", str(out), "--device", "cpu", "--no-overlays"]) == 0
    summary = json.loads((out / "predictions.json").read_text())
    assert [m["case"] for m in summary["masks"]] == [case_name(good)]
    assert "thinner than 3" in summary["refused"]["thin.nii.gz"]
    assert "broken.nii.gz" in summary["refused"]["broken.nii.gz"]
    assert not list(out.glob("*.png"))


def test_predict_refuses_an_altered_site_model(release, heldout_site, tmp_path, capsys):
    checkpoint, public = release
    assert _adapt(checkpoint, public, heldout_site, tmp_path / "model", "--steps", "0") == 0
    weights = tmp_path / "model" / MODEL_FILE
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01
    weights.write_bytes(bytes(data))
    assert main(["predict", "--model", str(tmp_path / "model"), "--input", str(heldout_site / "imagesTr"),
                 "--out", str(tmp_path / "masks")]) == 1
    assert "SHA-256 differs from the one its model card records" in capsys.readouterr().err


@pytest.mark.parametrize("name, case", [("a_0000.nii.gz", "a"), ("a.nii.gz", "a"), ("b_1.nii", "b_1"),
                                        ("c_0001.nii", "c_0001"), ("scan_2023.nii.gz", "scan_2023")])
def test_masks_are_named_after_their_scans(name, case):
    assert case_name(Path(name)) == case


def test_predict_never_writes_over_scans_or_labels(release, heldout_site, tmp_path, capsys):
    checkpoint, public = release
    site = tmp_path / "site"
    shutil.copytree(heldout_site, site)
    before = {p: p.read_bytes() for p in site.rglob("*.nii.gz")}
    model = tmp_path / "model"
    assert _adapt(checkpoint, public, site, model, "--steps", "0") == 0
    for out, words in ((site / "imagesTr", "is the input folder or inside it"),
                       (site / "imagesTr" / "masks", "is the input folder or inside it"),
                       (site / "labelsTr", "already holds scans, labels or DICOM files fedmeta predict did not write")):
        assert main(["predict", "--model", str(model), "--input", str(site / "imagesTr"), "--out", str(out),
                     "--no-overlays"]) == 1
        assert words in capsys.readouterr().err
    assert {p: p.read_bytes() for p in site.rglob("*.nii.gz")} == before  # not a byte changed
    # An earlier prediction is replaced only on request.
    command = ["predict", "--model", str(model), "--input", str(site / "imagesTr"), "--out", str(tmp_path / "m"),
               "--no-overlays"]
    assert main(command) == 0 and main(command) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert main([*command, "--overwrite"]) == 0
    # A folder an earlier prediction wrote is still not trusted with what it did not write.
    shutil.copy(sorted((site / "imagesTr").glob("*.nii.gz"))[0], tmp_path / "m" / "patient_scan.nii.gz")
    assert main([*command, "--overwrite"]) == 1
    assert "did not write (patient_scan.nii.gz)" in capsys.readouterr().err
    # Names that differ only in case are one file on macOS and Windows.
    twins = tmp_path / "twins"
    twins.mkdir()
    for name in ("Case3.nii.gz", "case3.nii.gz"):
        shutil.copy(sorted((site / "imagesTr").glob("*.nii.gz"))[0], twins / name)
    assert main(["predict", "--model", str(model), "--input", str(twins), "--out", str(tmp_path / "t")]) == 1
    assert "would both write" in capsys.readouterr().err


def test_predict_masks_carry_the_scans_geometry_but_none_of_its_free_text(release, heldout_site, tmp_path):
    checkpoint, public = release
    scans = tmp_path / "scans"
    scans.mkdir()
    source = nib.load(sorted((heldout_site / "imagesTr").glob("*.nii.gz"))[0])
    header = source.header.copy()
    header["descrip"] = b"PatientName=DOE^JOHN"
    header.extensions.append(nib.nifti1.Nifti1Extension(6, b"PatientName=DOE^JOHN PatientID=12345"))
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj), source.affine, header), scans / "x_0000.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.diag([100.0, 100.0, 100.0, 1.0])),
             scans / "huge-voxels.nii.gz")
    assert main(["predict", "--model", str(checkpoint), "--public-key", str(public), "--input", str(scans), "--out",
                 str(tmp_path / "out"), "--probabilities", "--no-overlays", "--device", "cpu"]) == 0
    mask = nib.load(tmp_path / "out" / "x.nii.gz")
    assert b"DOE" not in mask.header["descrip"].tobytes() and np.allclose(mask.get_qform(), source.get_qform())
    assert not mask.header.extensions and b"DOE" not in (tmp_path / "out" / "x.nii.gz").read_bytes()
    probabilities = nib.load(tmp_path / "out" / "x_probabilities.nii.gz")
    assert probabilities.shape == (*source.shape, 4) and np.allclose(probabilities.get_qform(), source.get_qform())
    summary = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert "outside 0.01-20 mm" in summary["refused"]["huge-voxels.nii.gz"]


def test_adapt_refuses_absurd_steps_and_a_site_model_given_as_a_checkpoint(release, heldout_site, tmp_path, capsys):
    checkpoint, public = release
    assert _adapt(checkpoint, public, heldout_site, tmp_path / "m", "--steps", "1000000000") == 1
    assert "--steps 1000000000" in capsys.readouterr().err
    assert _adapt(checkpoint, public, heldout_site, tmp_path / "m", "--steps", "0") == 0
    assert main(["adapt", "--checkpoint", str(tmp_path / "m" / MODEL_FILE), "--allow-unsigned", "--data",
                 str(heldout_site), "--out", str(tmp_path / "m2")]) == 1
    assert "a site model written by fedmeta adapt" in capsys.readouterr().err


def test_a_scan_whose_outputs_fail_halfway_leaves_nothing_behind(release, heldout_site, tmp_path, monkeypatch):
    from fedmeta.client import predict

    checkpoint, public = release
    scans = sorted((heldout_site / "imagesTr").glob("*.nii.gz"))[:2]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for scan in scans:
        shutil.copy(scan, inputs / scan.name)
    real = predict.overlay_montage

    def failing(image, mask, path, title, **kwargs):
        if title == case_name(scans[0]):
            raise OSError("disk full")
        return real(image, mask, path, title, **kwargs)

    monkeypatch.setattr(predict, "overlay_montage", failing)
    command = ["predict", "--model", str(checkpoint), "--public-key", str(public), "--input", str(inputs),
               "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert main(command) == 0
    summary = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert list(summary["refused"]) == [scans[0].name] and len(summary["masks"]) == 1
    assert not (tmp_path / "out" / f"{case_name(scans[0])}.nii.gz").exists()  # nothing unlisted left behind
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["predictions.json", JOURNAL_NAME, *summary["outputs"]])  # the journal: what predict owns here
    monkeypatch.setattr(predict, "overlay_montage", real)
    assert main([*command, "--overwrite"]) == 0  # the folder is still predict's own


def test_predict_refuses_a_site_model_with_non_finite_weights(release, heldout_site, tmp_path, capsys):
    """The card's digest only detects damage; weights are checked as every loader checks them."""
    from fedmeta.client.model_card import save_site_model

    checkpoint, public = release
    assert _adapt(checkpoint, public, heldout_site, tmp_path / "model", "--steps", "0") == 0
    model = load_site_model(tmp_path / "model")
    name = sorted(model.params)[0]
    model.params[name] = model.params[name].clone().fill_(float("nan"))
    save_site_model(tmp_path / "model", model.params, model.run_config, model.card)  # a consistent card, broken θ
    assert main(["predict", "--model", str(tmp_path / "model"), "--input", str(heldout_site / "imagesTr"),
                 "--out", str(tmp_path / "masks")]) == 1
    assert f"params {name!r} holds NaN or Inf" in capsys.readouterr().err


def test_adapt_chooses_its_steps_from_the_support_slices_by_default_and_saves_what_that_count_gives(
        release, heldout_site, tmp_path, capsys):
    """No --steps: the count is chosen by cross-validation on the support slices (the card says which and why), and
    the weights are those a fixed --steps of that count writes."""
    checkpoint, public = release
    capsys.readouterr()
    assert _adapt(checkpoint, public, heldout_site, tmp_path / "auto", "--max-steps", "3") == 0
    printed = capsys.readouterr().out
    adaptation = json.loads((tmp_path / "auto" / CARD_JSON).read_text())["adaptation"]
    choice, chosen = adaptation["step_choice"], adaptation["steps"]
    assert adaptation["steps_requested"] == "auto" and chosen == choice["chosen_steps"]
    assert choice["candidates"] == [0, 1, 2, 3] and chosen in choice["candidates"]
    assert choice["rule"] == "highest-check-dice" and choice["split"] == "slices" and choice["folds"] == 5
    assert sorted(choice["check_dice"]) == ["0", "1", "2", "3"]
    assert choice["reason"].startswith(f"{chosen} step(s) chosen from [0, 1, 2, 3] by 5-fold cross-validation")
    assert choice["reason"] in (tmp_path / "auto" / CARD_MD).read_text()
    assert (f"after {chosen} step(s) (auto: {chosen} of [0..3], highest-check-dice over 5 folds of the support slices)"
            in printed)
    assert "choosing steps" in printed

    assert _adapt(checkpoint, public, heldout_site, tmp_path / "fixed", "--steps", str(chosen)) == 0
    fixed, auto = load_site_model(tmp_path / "fixed"), load_site_model(tmp_path / "auto")
    assert sorted(fixed.params) == sorted(auto.params)
    assert all(torch.equal(fixed.params[n], auto.params[n]) for n in fixed.params)
    assert fixed.card["dice"] == auto.card["dice"]
    # A fixed count is recorded as asked, with no choice and no line about one.
    assert fixed.card["adaptation"]["steps_requested"] == chosen and fixed.card["adaptation"]["step_choice"] is None
    assert "steps chosen" not in (tmp_path / "fixed" / CARD_MD).read_text()


def test_adapt_auto_on_a_site_with_one_patient_and_one_slice_splits_the_slice(release, heldout_site, tmp_path,
                                                                             capsys):
    """One usable patient and k = 1: the slice's two halves are the folds; nothing is left to score on."""
    checkpoint, public = release
    site = tmp_path / "one-patient"
    shutil.copytree(heldout_site, site)
    meta = json.loads((site / "dataset.json").read_text())
    for entry in meta["training"][1:]:
        for key in ("image", "label"):
            (site / entry[key]).unlink()
    meta["training"], meta["numTraining"] = meta["training"][:1], 1
    (site / "dataset.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["adapt", "--checkpoint", str(checkpoint), "--public-key", str(public), "--data", str(site),
                 "--shots", "1", "--max-steps", "2", "--out", str(tmp_path / "m"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    card = json.loads((tmp_path / "m" / CARD_JSON).read_text())
    choice = card["adaptation"]["step_choice"]
    assert choice["split"] == "half-slice" and choice["folds"] == 2 and card["adaptation"]["support_patients"] == 1
    assert card["adaptation"]["steps"] == choice["chosen_steps"] and card["dice"]["held_out_patients"] == 0
    assert "the two halves of the support slice" in printed and "adapted with" in printed


@pytest.mark.parametrize(("steps", "message"), [
    (["--steps", "banana"], "--steps 'banana': give auto (the default: the count is chosen from the support slices) "
                            "or a number of gradient steps from 0 to 10,000, e.g. --steps 10."),
    (["--steps", "-1"], "--steps -1: gradient steps, an integer from 0"),
    (["--steps=--5"], "--steps '--5': give auto"),  # not 'invalid literal for int()'
    (["--steps", "\u00b2"], "--steps '\u00b2': give auto"),
    (["--steps", "10.5"], "--steps '10.5': give auto"),
    (["--steps", "5", "--max-steps", "5"], "--max-steps 5: bounds the count --steps auto chooses; with --steps 5"),
    (["--max-steps", "10001"], "--max-steps 10001: the most steps --steps auto may choose, an integer from 0 to 10,000"),
])
def test_adapt_refuses_steps_it_cannot_take_by_value_and_fix(release, heldout_site, tmp_path, capsys, steps, message):
    checkpoint, public = release
    assert _adapt(checkpoint, public, heldout_site, tmp_path / "m", *steps) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m" / MODEL_FILE).exists()


def test_adapt_takes_a_variant_records_it_and_refuses_those_a_site_model_cannot_hold(release, heldout_site, tmp_path,
                                                                                     capsys):
    checkpoint, public = release
    assert _adapt(checkpoint, public, heldout_site, tmp_path / "head", "--variant", "head-only", "--steps", "2") == 0
    card = json.loads((tmp_path / "head" / CARD_JSON).read_text())
    assert card["adaptation"]["variant"] == "head-only"
    capsys.readouterr()
    assert _adapt(checkpoint, public, heldout_site, tmp_path / "ens", "--variant", "ensemble") == 1
    err = capsys.readouterr().err
    assert "--variant ensemble: it predicts from more than the adapted weights" in err and "fine-tune" in err
    assert _adapt(checkpoint, public, heldout_site, tmp_path / "frozen", "--variant", "frozen-prototypes") == 1
    assert "does not apply" in capsys.readouterr().err and not (tmp_path / "frozen" / MODEL_FILE).exists()
