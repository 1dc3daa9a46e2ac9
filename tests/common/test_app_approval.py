"""App approvals (fedmeta.common.app_approval): only a statement signed by the consortium's release key approves
an app bundle; anything else approves nothing and says why, without blocking on odd files."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from fedmeta.common.app_approval import ApprovalError, load_approvals, sign_approval

DIGEST = "ab" * 32


def _key_pair(folder, name):
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(folder / f"{name}.key")], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(folder / f"{name}.key"), "-pubout", "-out",
                    str(folder / f"{name}.pub")], check=True)
    return folder / f"{name}.key", folder / f"{name}.pub"


@pytest.fixture
def keys(tmp_path):
    return _key_pair(tmp_path, "release"), _key_pair(tmp_path, "other")


def test_a_signed_approval_approves_its_digest_and_nothing_else(keys, tmp_path):
    (key, pub), _ = keys
    out = tmp_path / "approved"
    path = sign_approval(DIGEST, app="fedmeta", version="0.1.0", publisher="fedmeta", key_path=key, out_dir=out)
    approvals = load_approvals(out, pub)
    assert approvals.allows(DIGEST) and not approvals.allows("cd" * 32) and approvals.rejected == {}
    assert json.loads(path.read_text())["fab_sha256"] == DIGEST


def test_what_is_not_an_approval_approves_nothing_and_says_why(keys, tmp_path):
    (key, pub), (other_key, _) = keys
    out = tmp_path / "approved"
    foreign = sign_approval("cd" * 32, app="x", version="1", publisher="x", key_path=other_key, out_dir=out)
    edited = sign_approval("ef" * 32, app="y", version="1", publisher="y", key_path=key, out_dir=out)
    edited.write_text(edited.read_text().replace("ef" * 32, "ee" * 32))
    (out / "unsigned.app.json").write_text(json.dumps({"format": 1, "fab_sha256": DIGEST}))
    os.mkfifo(out / "fifo.app.json")  # would block a plain read
    (out / "zero.app.json").symlink_to("/dev/zero")  # would never end
    (out / "zero.app.json.sig").symlink_to("/dev/zero")
    approvals = load_approvals(out, pub)
    assert approvals.digests == {}
    reasons = approvals.rejected
    assert "does not verify" in reasons[foreign.name] and "does not verify" in reasons[edited.name]
    assert "unsigned" in reasons["unsigned.app.json"]
    assert "not a regular file" in reasons["fifo.app.json"] or "unsigned" in reasons["fifo.app.json"]
    assert "not a regular file" in reasons["zero.app.json"]


def test_a_missing_folder_or_key_fails_closed_naming_it(keys, tmp_path):
    (_, pub), _ = keys
    with pytest.raises(ApprovalError, match="no such folder"):
        load_approvals(tmp_path / "nowhere", pub)
    with pytest.raises(ValueError, match="no such file"):
        load_approvals(tmp_path, tmp_path / "missing.pub")
