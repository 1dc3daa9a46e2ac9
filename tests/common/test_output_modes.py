"""What a site's commands write takes the mode its umask gives, as ``open`` and ``mkdir`` do, so that a service
running as another user (a PACS upload) can read masks and cards; secret material stays private whatever the
umask (``fedmeta.common.outputs``)."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from pathlib import Path

import pytest
import torch

from fedmeta.client.prediction_files import save_atomically
from fedmeta.client.site import persisted_site_key
from fedmeta.common import outputs
from fedmeta.common.checkpoint import Checkpoint, save_checkpoint
from fedmeta.common.outputs import JOURNAL_NAME, Outputs, current_umask, make_folder


@contextlib.contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


UMASKS = [  # umask, an output file's mode, an output folder's mode
    (0o022, 0o644, 0o755),  # the usual: others read
    (0o077, 0o600, 0o700),  # a private account: nobody else
    (0o002, 0o664, 0o775),  # a group-shared folder: the group writes too
]


@pytest.mark.parametrize(("mask", "file_mode", "folder_mode"), UMASKS, ids=["022", "077", "002"])
def test_outputs_and_their_folders_take_the_mode_the_umask_gives(tmp_path, mask, file_mode, folder_mode):
    with umask(mask):
        assert current_umask() == mask
        masks = Outputs(tmp_path / "new" / "masks", "predict")
        masks.claim(["case_001.nii.gz", "predictions.json"])
        save_atomically(lambda tmp: tmp.write_bytes(b"a mask"), masks.folder / "case_001.nii.gz")  # as predict does
        masks.record("case_001.nii.gz")
        masks.write_json("predictions.json", {"masks": ["case_001.nii.gz"]})
        card = Outputs(tmp_path / "model", "adapt")
        card.claim(["model.pt", "card.md"])
        card.write("model.pt", lambda tmp: torch.save({"w": torch.zeros(1)}, tmp))
        card.write_text("card.md", "# card\n")
        made = make_folder(tmp_path / "report" / "2026")
    for path in (masks.folder / "case_001.nii.gz", masks.folder / "predictions.json", masks.folder / JOURNAL_NAME,
                 card.folder / "model.pt", card.folder / "card.md", card.folder / JOURNAL_NAME):
        assert _mode(path) == file_mode, path
    for path in (tmp_path / "new", masks.folder, card.folder, made.parent, made):
        assert _mode(path) == folder_mode, path


def test_an_existing_output_folder_keeps_its_mode(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o2775)  # a group's upload folder (setgid)
    with umask(0o077):
        out = Outputs(shared, "predict")
        out.claim(["case.nii.gz"])
        out.write_bytes("case.nii.gz", b"a mask")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o2775
    assert _mode(shared / "case.nii.gz") == 0o600


def test_the_journal_is_never_more_open_than_its_folder(tmp_path):
    """Under umask 000 an output is 0666, as asked; the journal that says which files are fedmeta's takes the umask
    too, but never more than the folder's read and write bits: a 0755 folder (provision's) keeps it 0644."""
    folder = tmp_path / "drop"
    folder.mkdir()
    os.chmod(folder, 0o755)
    with umask(0):
        out = Outputs(folder, "evaluate", option="--json")
        out.claim(["report.json"])
        out.write_json("report.json", {})
    assert _mode(folder / "report.json") == 0o666  # what umask 000 asks of an output
    assert _mode(folder / JOURNAL_NAME) == 0o644


@pytest.mark.parametrize("mask", [0o022, 0o000], ids=["022", "000"])
def test_secret_material_stays_private_whatever_the_umask(tmp_path, mask):
    from fedmeta.server.provision import provision

    with umask(mask):
        out = provision(tmp_path / "c", server_names=["localhost"], sites=["a"]).out
        persisted_site_key(tmp_path / "data", tmp_path / "home")
        save_checkpoint(tmp_path / "run" / "checkpoint.pt", Checkpoint(round=1, params={}, step_sizes=None,
                                                                      optimizer={}, rng_state={}, config_hash="x",
                                                                      run_config={}))
    for key in ("ca/ca.key", "superlink/server.key", "release/release.key", "sites/a/site.key"):
        assert _mode(out / key) == 0o600, key
    for folder in ("ca", "superlink", "release", "sites/a"):
        assert _mode(out / folder) == 0o700, folder
    assert _mode(out) == 0o755 and _mode(out / "sites") == 0o755  # never group- or world-writable
    (site_key,) = (tmp_path / "home" / "site-keys").iterdir()
    assert _mode(site_key) == 0o600 and _mode(site_key.parent) == 0o700
    assert _mode(tmp_path / "run" / "checkpoint.pt") == 0o600


def test_the_umask_is_read_without_changing_it_and_the_fallback_restores_it(monkeypatch):
    with umask(0o027):
        assert current_umask() == 0o027
        monkeypatch.setattr(outputs, "_PROC_STATUS", "/nonexistent/status")  # a system without /proc
        seen = []
        threads = [threading.Thread(target=lambda: seen.append(current_umask())) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert seen == [0o027] * 8
        assert os.umask(0o027) == 0o027  # still set as it was
