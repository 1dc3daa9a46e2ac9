"""Signed releases: `fedmeta sign` then `fedmeta evaluate --public-key` accepts the release; a flipped
byte, a foreign key, edited metadata or a missing signature is refused, naming the check that failed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmeta.common.release import ReleaseError, metadata_path, signature_path, verify
from fedmeta.common.synth import load_manifest
from fedmeta.simulations.cli import main


def _key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture
def release(trained_checkpoint, tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    shutil.copy(trained_checkpoint, checkpoint)
    private, public = _key_pair(tmp_path, "consortium")
    assert main(["sign", str(checkpoint), "--key", str(private)]) == 0
    return checkpoint, public


def test_a_signed_release_verifies_and_says_what_it_is(release):
    checkpoint, public = release
    metadata = verify(checkpoint, public)
    assert metadata["round"] == 1 and metadata["algorithm"] == "fomaml" and metadata["dp"] is None
    assert metadata["release_id"] == metadata["sha256"][:16] and len(metadata["signing_key_sha256"]) == 64
    assert json.loads(metadata_path(checkpoint).read_text()) == metadata


def _flip_byte(checkpoint, public):
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0x01
    checkpoint.write_bytes(bytes(data))


def _edit_metadata(checkpoint, public):
    path = metadata_path(checkpoint)
    path.write_text(path.read_text().replace('"round": 1', '"round": 9'))


def _foreign_key(checkpoint, public):
    _key_pair(public.parent, "other")
    shutil.copy(public.parent / "other.pub", public)


def _unsigned(checkpoint, public):
    signature_path(checkpoint).unlink()


def _not_ed25519(checkpoint, public):
    public.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


@pytest.mark.parametrize("tamper, words", [
    (_flip_byte, "its SHA-256 differs from the signed one"),
    (_edit_metadata, "its signature does not verify"),
    (_foreign_key, "its signature does not verify"),
    (_unsigned, "unsigned (" ),
    (_not_ed25519, "not an Ed25519 public key"),
])
def test_a_tampered_foreign_or_unsigned_release_is_refused_by_evaluate(release, smoke_federation, capsys, tamper,
                                                                       words):
    checkpoint, public = release
    tamper(checkpoint, public)
    site = load_manifest(smoke_federation).heldout_sites[0].path
    code = main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(site), "--shots", "1", "--steps", "0",
                 "--public-key", str(public)])
    assert code == 1
    err = capsys.readouterr().err
    assert words in err, err
    with pytest.raises(ReleaseError, match=words.replace("(", r"\(")):
        verify(checkpoint, public)


def test_evaluate_needs_a_key_or_allow_unsigned_and_a_bad_signature_is_refused_even_then(release, smoke_federation,
                                                                                       capsys):
    checkpoint, public = release
    site = load_manifest(smoke_federation).heldout_sites[0].path
    base = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(site), "--shots", "1", "--steps", "0"]
    assert main(base) == 1
    assert "no --public-key to check its signature against" in capsys.readouterr().err
    assert main([*base, "--public-key", str(public)]) == 0
    assert "verified (round 1" in capsys.readouterr().out
    assert main([*base, "--allow-unsigned"]) == 0
    _flip_byte(checkpoint, public)
    assert main([*base, "--public-key", str(public), "--allow-unsigned"]) == 1  # present and wrong: never allowed
    assert "differs from the signed one" in capsys.readouterr().err


def test_sign_refuses_a_key_that_is_not_ed25519_and_a_missing_file(tmp_path, capsys):
    key = tmp_path / "ec.key"
    key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path / "c.pt").write_bytes(b"x")
    assert main(["sign", str(tmp_path / "c.pt"), "--key", str(key)]) == 1
    assert "not an Ed25519 private key" in capsys.readouterr().err
    assert main(["sign", str(tmp_path / "absent.pt"), "--key", str(key)]) == 1
    assert "absent.pt: no such file" in capsys.readouterr().err


def test_the_serverapp_signs_its_final_checkpoint_when_given_the_key(smoke_federation, tmp_path):
    from fedmeta.common.checkpoint import CHECKPOINT_NAME
    from tests.simulations.test_inprocess import federate, tiny_config

    private, public = _key_pair(tmp_path, "consortium")
    config = tiny_config(smoke_federation, tmp_path / "run", num_rounds=1, release_key=str(private))
    federate(config, smoke_federation)
    metadata = verify(tmp_path / "run" / CHECKPOINT_NAME, public)
    assert metadata["round"] == 1
    with pytest.raises(ReleaseError, match="not an unencrypted PEM private key"):
        federate(config.replace(release_key=str(public), out_dir=str(tmp_path / "bad")), smoke_federation)
