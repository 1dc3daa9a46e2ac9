"""Nothing is overwritten that a command did not write (``fedmeta.common.outputs``), and a killed run's files are
still its own."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fedmeta.common.outputs import JOURNAL_NAME, OutputRefused, Outputs, data_folder, make_folder
from fedmeta.common.synth import load_manifest
from fedmeta.simulations.cli import main
from tests.common.test_release import _key_pair


@pytest.fixture
def site(tmp_path) -> Path:
    """A folder in a site's data layout (only its shape matters here)."""
    site = tmp_path / "site"
    (site / "imagesTr").mkdir(parents=True)
    (site / "labelsTr").mkdir()
    (site / "dataset.json").write_text("{}")
    return site


# --------------------------------------------------------------------------------------------------
# the shared helper


def test_a_claim_refuses_a_file_it_did_not_write_another_commands_file_and_an_edited_one(tmp_path):
    out = Outputs(tmp_path, "evaluate")
    (tmp_path / "notes.json").write_text("mine")
    with pytest.raises(OutputRefused, match="fedmeta evaluate did not write it"):
        out.check(["notes.json"], overwrite=True)
    out.claim(["report.json"])
    out.write_text("report.json", "{}")
    with pytest.raises(OutputRefused, match="pass --overwrite"):
        out.check(["report.json"])
    out.check(["report.json"], overwrite=True)
    with pytest.raises(OutputRefused, match="written by fedmeta evaluate, not fedmeta adapt"):
        Outputs(tmp_path, "adapt").check(["report.json"], overwrite=True)
    (tmp_path / "report.json").write_text('{"corrected": true}')
    with pytest.raises(OutputRefused, match="changed since fedmeta evaluate wrote it"):
        out.check(["report.json"], overwrite=True)
    (tmp_path / "link.json").symlink_to(tmp_path / "notes.json")
    with pytest.raises(OutputRefused, match="symbolic link"):
        out.check(["link.json"], overwrite=True)
    assert (tmp_path / "notes.json").read_text() == "mine"


def test_nothing_is_written_into_a_site_data_folder(site):
    assert data_folder(site / "imagesTr" / "masks") == site.resolve()
    with pytest.raises(OutputRefused, match="never writes into a site's data"):
        Outputs(site / "models", "adapt").check(["model.pt"])
    with pytest.raises(OutputRefused, match="never writes into a site's data"):
        Outputs(site, "simulate").check_folder()


def test_a_folder_claim_needs_a_new_empty_or_own_folder(tmp_path):
    run = Outputs(tmp_path / "run", "simulate")
    run.claim_folder(detail={"engine": "ray"})
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"theta")
    with pytest.raises(OutputRefused, match=r"earlier fedmeta simulate run \(engine ray\); pass --overwrite"):
        run.check_folder()
    run.check_folder(overwrite=True)
    run.check_folder(resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "thesis.tex").write_text("x")
    with pytest.raises(OutputRefused, match="holds files written by something other than fedmeta simulate"):
        Outputs(tmp_path / "other", "simulate").check_folder(overwrite=True)


def test_folders_take_their_mode_whatever_the_umask(tmp_path):
    previous = os.umask(0)
    try:
        make_folder(tmp_path / "a" / "keys", 0o700)
    finally:
        os.umask(previous)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "a" / "keys").stat().st_mode & 0o777 == 0o700
    os.chmod(tmp_path / "a" / "keys", 0o777)  # an older release's key folder: narrowed when used again
    make_folder(tmp_path / "a" / "keys", 0o700)
    assert (tmp_path / "a" / "keys").stat().st_mode & 0o777 == 0o700


# --------------------------------------------------------------------------------------------------
# the commands


def test_evaluate_json_never_replaces_a_checkpoint_or_a_label_file(tmp_path, site, capsys):
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"not json")
    label = site / "labelsTr" / "case_000.nii.gz"
    label.write_bytes(b"label")
    for target, words in ((checkpoint, "fedmeta evaluate did not write it"),
                          (label, "never writes into a site's data")):
        assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(site), "--json", str(target),
                     "--allow-unsigned"]) == 1
        assert words in capsys.readouterr().err
    assert checkpoint.read_bytes() == b"not json" and label.read_bytes() == b"label"


def test_adapt_never_replaces_a_site_model_silently(tmp_path, capsys):
    """Refused before the checkpoint is even read: an existing site model is adapt's own only with --overwrite."""
    from fedmeta.client.model_card import CARD_JSON, MODEL_FILE, SITE_MODEL_FILES

    model = tmp_path / "model"
    Outputs(model, "adapt").claim(SITE_MODEL_FILES)
    for name in SITE_MODEL_FILES:
        Outputs(model, "adapt").write_text(name, "earlier")
    argv = ["adapt", "--checkpoint", str(tmp_path / "absent.pt"), "--data", str(tmp_path), "--out", str(model),
            "--allow-unsigned"]
    assert main(argv) == 1
    assert f"{model / MODEL_FILE}: already holds the output of an earlier fedmeta adapt; pass --overwrite" in \
        capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 1  # now it gets as far as the (absent) checkpoint
    assert "absent.pt" in capsys.readouterr().err
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / CARD_JSON).write_text("a colleague's")
    assert main([*argv[:-2], str(foreign), "--allow-unsigned", "--overwrite"]) == 1
    assert "fedmeta adapt did not write it" in capsys.readouterr().err
    assert (model / MODEL_FILE).read_text() == "earlier"


def _checkpoint_and_key(trained_checkpoint, folder: Path) -> tuple[Path, Path, Path]:
    checkpoint = folder / "checkpoint.pt"
    shutil.copy(trained_checkpoint, checkpoint)
    return checkpoint, *_key_pair(folder, "consortium")


def test_sign_refuses_files_it_did_not_write_and_replaces_its_own_on_request(trained_checkpoint, tmp_path, capsys):
    checkpoint, private, _public = _checkpoint_and_key(trained_checkpoint, tmp_path)
    sig = Path(f"{checkpoint}.sig")
    sig.write_text("someone's notes")
    assert main(["sign", str(checkpoint), "--key", str(private)]) == 1
    assert "fedmeta sign did not write it" in capsys.readouterr().err
    assert sig.read_text() == "someone's notes"
    sig.unlink()
    assert main(["sign", str(checkpoint), "--key", str(private)]) == 0
    assert main(["sign", str(checkpoint), "--key", str(private)]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["sign", str(checkpoint), "--key", str(private), "--overwrite"]) == 0


def test_a_release_signed_before_the_journal_is_still_signs_own(trained_checkpoint, tmp_path):
    from fedmeta.common.release import sign

    checkpoint, private, _public = _checkpoint_and_key(trained_checkpoint, tmp_path)
    sign(checkpoint, private)
    (tmp_path / JOURNAL_NAME).unlink()  # as an older fedmeta left it
    sign(checkpoint, private, overwrite=True)


def test_provision_refuses_a_folder_it_did_not_make_and_a_data_folder(tmp_path, site, capsys):
    from fedmeta.server.provision import provision

    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "registry.json").write_text('{"something": "else"}')
    for out, words in ((tmp_path / "home", "holds files written by something other than fedmeta provision"),
                       (site / "consortium", "never writes into a site's data")):
        assert main(["provision", "--out", str(out), "--server-name", "localhost", "--site", "a"]) == 1
        assert words in capsys.readouterr().err
    assert (tmp_path / "home" / "registry.json").read_text() == '{"something": "else"}'
    assert not (site / "consortium").exists()
    # A consortium an older fedmeta made (no journal) is still provision's own.
    out = provision(tmp_path / "c", server_names=["localhost"], sites=["a"]).out
    (out / JOURNAL_NAME).unlink()
    assert provision(out, sites=["b"]).created


def test_provision_under_umask_000_keeps_key_folders_private(tmp_path):
    from fedmeta.server.provision import provision

    previous = os.umask(0)
    try:
        out = provision(tmp_path / "c", server_names=["localhost"], sites=["a"]).out
    finally:
        os.umask(previous)
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    for folder in ("ca", "superlink", "release", "sites/a"):
        assert modes[folder] == 0o700, folder
    assert modes["."] == modes["sites"] == 0o755
    for key in ("ca/ca.key", "superlink/server.key", "release/release.key", "sites/a/site.key"):
        assert modes[key] == 0o600, key
    assert not [name for name, mode in modes.items() if mode & 0o002], "nothing is world-writable"


def _tree(folder: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every entry below ``folder`` with its mode and (for a file) its bytes, links not followed."""
    return {p.relative_to(folder).as_posix(): (p.lstat().st_mode, None if p.is_dir() else p.read_bytes())
            for p in folder.rglob("*")}


@pytest.mark.parametrize("planted", ["sites/gamma", "sites/a/compose.yaml", "sites/a", "superlink"])
def test_provision_never_writes_through_a_symbolic_link_in_the_consortium(tmp_path, capsys, planted):
    """A link planted in the consortium folder (a site's bundle folder, a file in one, a key folder) would take keys
    and start scripts, and a chmod 0700, outside it: refused, naming the link, with nothing written anywhere."""
    from fedmeta.server.provision import provision

    out = provision(tmp_path / "c", server_names=["localhost"], sites=["a"]).out
    victim = tmp_path / "victim"
    link = out / planted
    if link.is_dir():  # the link leads to a copy of the folder it replaces, as a planted one would
        shutil.copytree(link, victim)
        shutil.rmtree(link)
    else:
        victim.mkdir()
        link.unlink(missing_ok=True)
    (victim / "compose.yaml").write_text("mine\n")
    os.chmod(victim, 0o755)
    link.symlink_to(victim / "compose.yaml" if planted.endswith(".yaml") else victim)
    victim_before, consortium_before = _tree(victim), _tree(out)
    assert main(["provision", "--out", str(out), "--site", "gamma", "--port", "9000"]) == 1
    err = capsys.readouterr().err
    assert f"{link} -> {victim / 'compose.yaml' if planted.endswith('.yaml') else victim}" in err
    assert "never through a link" in err and "nothing was written" in err
    assert _tree(victim) == victim_before and (victim / "compose.yaml").read_text() == "mine\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o755
    assert _tree(out) == consortium_before


def test_revoke_site_never_deletes_through_a_linked_bundle(tmp_path, capsys):
    from fedmeta.server.provision import provision

    out = provision(tmp_path / "c", server_names=["localhost"], sites=["a"]).out
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "site.key").write_text("someone else's key\n")
    shutil.rmtree(out / "sites" / "a")  # handed over to the site, then replaced by a link
    (out / "sites" / "a").symlink_to(victim)
    assert main(["revoke-site", "--out", str(out), "--site", "a"]) == 1
    assert f"{out / 'sites' / 'a'}: is a symbolic link (to {victim})" in capsys.readouterr().err
    assert (victim / "site.key").read_text() == "someone else's key\n" and sorted(os.listdir(victim)) == ["site.key"]


def test_simulate_runs_of_the_two_engines_get_their_own_folders_and_a_rerun_needs_overwrite(tmp_path, capsys,
                                                                                            monkeypatch):
    from fedmeta.simulations.experiments.simulate import default_out

    assert default_out("smoke", "fomaml", "ray") != default_out("smoke", "fomaml", "inprocess")
    assert default_out("smoke", "fomaml", "ray") == Path("runs/simulate-smoke-fomaml")  # the README's folder
    earlier = tmp_path / "run"
    Outputs(earlier, "simulate").claim_folder(detail={"engine": "ray"})
    (earlier / "checkpoint.pt").write_bytes(b"the Ray run's")
    argv = ["simulate", "--preset", "smoke", "--engine", "inprocess", "--out", str(earlier),
            "--federation-dir", str(tmp_path / "never-made")]
    assert main(argv) == 1
    assert "earlier fedmeta simulate run (engine ray" in capsys.readouterr().err
    assert (earlier / "checkpoint.pt").read_bytes() == b"the Ray run's"
    assert not (tmp_path / "never-made").exists()  # refused before the federation is generated
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "draft.md").write_text("x")
    assert main([*argv[:-3], str(tmp_path / "mine"), "--overwrite"]) == 1
    assert "something other than fedmeta simulate" in capsys.readouterr().err


def test_previews_never_replace_a_file_they_did_not_draw(smoke_federation, tmp_path, capsys):
    figure = tmp_path / "fed.png"
    figure.write_bytes(b"a committed figure")
    assert main(["show-sites", str(smoke_federation), "--out", str(figure)]) == 2
    assert "fedmeta show-sites did not write it" in capsys.readouterr().err
    assert figure.read_bytes() == b"a committed figure"
    assert main(["synth", "--out", str(smoke_federation), "--preset", "smoke", "--preview", str(figure)]) == 2
    assert figure.read_bytes() == b"a committed figure"
    figure.unlink()
    assert main(["show-sites", str(smoke_federation), "--out", str(figure)]) == 0
    assert main(["show-sites", str(smoke_federation), "--out", str(figure)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["show-sites", str(smoke_federation), "--out", str(figure), "--overwrite"]) == 0


def test_synth_never_writes_into_a_site_data_folder(site, capsys):
    assert main(["synth", "--out", str(site / "fed"), "--preset", "smoke"]) == 2
    assert "never writes into a site's data" in capsys.readouterr().err
    assert not (site / "fed").exists()


# --------------------------------------------------------------------------------------------------
# recovery after SIGKILL


_KILLED_PREDICT = """
import os, signal, sys
from fedmeta.client import predict
real = predict.save_atomically
def save_then_die(write, path):
    real(write, path)
    if path.name.endswith(".nii.gz"):
        os.kill(os.getpid(), signal.SIGKILL)  # no `finally` runs: predictions.json is never written
predict.save_atomically = save_then_die
from fedmeta.common.synth import load_manifest
from fedmeta.simulations.cli import main
from tests.common.test_release import _key_pair
sys.exit(main(sys.argv[1:]))
"""


def test_predict_killed_with_sigkill_can_run_again(trained_checkpoint, smoke_federation, tmp_path, capsys):
    checkpoint, private, public = _checkpoint_and_key(trained_checkpoint, tmp_path)
    assert main(["sign", str(checkpoint), "--key", str(private)]) == 0
    heldout_site = smoke_federation / load_manifest(smoke_federation).heldout_sites[0].path
    scans = tmp_path / "scans"
    scans.mkdir()
    for scan in sorted((heldout_site / "imagesTr").glob("*.nii.gz"))[:2]:
        shutil.copy(scan, scans / scan.name)
    out = tmp_path / "masks"
    argv = ["predict", "--model", str(checkpoint), "--public-key", str(public), "--input", str(scans), "--out",
            str(out), "--no-overlays", "--device", "cpu"]
    killed = subprocess.run([sys.executable, "-c", _KILLED_PREDICT, *argv], capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "predictions.json").exists() and list(out.glob("*.nii.gz"))  # a mask, and no summary
    assert main(argv) == 1
    assert "pass --overwrite" in capsys.readouterr().err  # its own files, not "not written by predict"
    assert main([*argv, "--overwrite"]) == 0
    summary = json.loads((out / "predictions.json").read_text())
    assert len(summary["masks"]) == 2 and not summary["refused"]


def test_the_journal_is_written_before_the_first_output(tmp_path):
    """What makes recovery possible: a claim is on disk before any file it names exists."""
    out = Outputs(tmp_path / "o", "predict")
    out.claim(["a.nii.gz"])
    assert json.loads((tmp_path / "o" / JOURNAL_NAME).read_text())["files"]["a.nii.gz"]["sha256"] is None
    assert not (tmp_path / "o" / "a.nii.gz").exists()


def test_audit_privacy_needs_overwrite_for_an_earlier_audit_and_refuses_other_folders(smoke_federation, tmp_path):
    from fedmeta.simulations.experiments.audit_privacy import audit

    kwargs = dict(iterations=1, ks=[1], algorithms=["fomaml"], defences=["none"], labels=["known"],
                  federation=smoke_federation, quiet=True)
    audit(out=tmp_path / "a", **kwargs)
    with pytest.raises(OutputRefused, match="earlier fedmeta audit-privacy run; pass --overwrite"):
        audit(out=tmp_path / "a", **kwargs)
    audit(out=tmp_path / "a", overwrite=True, **kwargs)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "figure.png").write_bytes(b"someone's")
    with pytest.raises(OutputRefused, match="something other than fedmeta audit-privacy"):
        audit(out=tmp_path / "b", overwrite=True, **kwargs)


def test_benchmark_continues_its_own_folder_and_refuses_anothers(smoke_federation, tiny_preset, tmp_path):
    from fedmeta.simulations.experiments.benchmark import run_benchmark

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    with pytest.raises(OutputRefused, match=r"notes: holds files written by something other than fedmeta benchmark"):
        run_benchmark(str(tiny_preset), out=foreign, federation_dir=smoke_federation, quiet=True)
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]


def test_perf_refuses_to_replace_a_file_it_did_not_write_before_it_measures(tmp_path, capsys):
    target = tmp_path / "perf.json"
    target.write_text('{"mine": true}')
    assert main(["perf", "comm", "--out", str(target)]) == 1
    assert "exists and fedmeta perf did not write it" in capsys.readouterr().err
    assert target.read_text() == '{"mine": true}'


def test_the_serverapp_never_puts_its_checkpoints_in_a_site_data_folder(site):
    from fedmeta.common.config import RunConfig
    from fedmeta.server.app import _out_dir

    with pytest.raises(OutputRefused, match=r"run config out-dir .*lies in the site data folder"):
        _out_dir(RunConfig(out_dir=str(site / "imagesTr" / "runs")))
