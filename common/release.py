"""Signed releases: a consortium signs the checkpoint it publishes; a site verifies it before using it.

``fedmeta sign CHECKPOINT --key PRIVATE_KEY_PEM`` writes two files beside the checkpoint:

- ``<checkpoint>.release.json``: what is released — the file's SHA-256 and size, the round, the run's
  trajectory hash and a digest of its run config, the algorithm, the number of training sites and the
  DP ε when the run used DP, and the signing key's fingerprint;
- ``<checkpoint>.sig``: the Ed25519 signature (``cryptography``) of that JSON's exact bytes, base64.

Verification checks, in order, and names the first that fails: the signature file and the metadata
exist; the public key is an Ed25519 PEM; the signature verifies over the metadata (else the file was
signed by another key, or its metadata was edited); the checkpoint's SHA-256 is the signed one (else the
checkpoint was altered after signing). Ed25519 because it is small, fast, deterministic and has no
parameters to get wrong; any consortium can make a key pair with OpenSSL (README, "Signed releases").
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedmeta.common.outputs import Outputs, file_sha256

SIGNATURE_SUFFIX = ".sig"
METADATA_SUFFIX = ".release.json"
RELEASE_FORMAT = 1


class ReleaseError(ValueError):
    """A release that must not be used: names the file and the check that failed."""


def signature_path(checkpoint: Path | str) -> Path:
    return Path(f"{checkpoint}{SIGNATURE_SUFFIX}")


def metadata_path(checkpoint: Path | str) -> Path:
    return Path(f"{checkpoint}{METADATA_SUFFIX}")


def key_fingerprint(public_key) -> str:
    """SHA-256 of the raw 32-byte Ed25519 public key, hex: how a site tells which key signed."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def load_private_key(path: Path | str):
    return _load_pem_key(path, "--key", "private key", lambda data: serialization.load_pem_private_key(data, None),
                         Ed25519PrivateKey, "make one with `openssl genpkey -algorithm ed25519 -out release.key`")


def load_public_key(path: Path | str):
    return _load_pem_key(path, "--public-key", "public key", serialization.load_pem_public_key, Ed25519PublicKey,
                         "the consortium's release.pub is `openssl pkey -in release.key -pubout`")


def _load_pem_key(path: Path | str, option: str, what: str, load, expected: type, hint: str):
    """An Ed25519 key from a PEM file, or a ReleaseError naming the option, the file and the fix."""
    path = Path(path)
    try:
        key = load(path.read_bytes())
    except FileNotFoundError:
        raise ReleaseError(f"{option} {path}: no such file; pass the consortium's Ed25519 {what} (PEM).") from None
    except (ValueError, TypeError) as err:
        raise ReleaseError(f"{option} {path}: not an unencrypted PEM {what} ({err}); {hint}.") from None
    if not isinstance(key, expected):
        raise ReleaseError(f"{option} {path}: a {type(key).__name__}, not an Ed25519 {what}; {hint}.")
    return key


def release_metadata(checkpoint_path: Path, public_key) -> dict[str, Any]:
    """What a signature vouches for: the file itself (digest, size) and what the run was."""
    # fedmeta.common.checkpoint loads torch: +0.8 s on `fedmeta provision --help` and `sign --help`, which import
    # this module (python -X importtime).
    from fedmeta.common.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(checkpoint_path)  # refuses a damaged or NaN checkpoint before it is signed
    run_config = json.dumps(checkpoint.run_config, sort_keys=True, separators=(",", ":"), default=str)
    digest = file_sha256(checkpoint_path)
    metadata: dict[str, Any] = {
        "format": RELEASE_FORMAT,
        "file": checkpoint_path.name,
        "sha256": digest,
        "release_id": digest[:16],
        "size": checkpoint_path.stat().st_size,
        "round": int(checkpoint.round),
        "trajectory_hash": checkpoint.config_hash,
        "run_config_sha256": hashlib.sha256(run_config.encode()).hexdigest(),
        "algorithm": checkpoint.run_config.get("algorithm"),
        "training_sites": None,
        "dp": None,
        "signing_key_sha256": key_fingerprint(public_key),
    }
    if checkpoint.privacy and checkpoint.privacy.get("history"):
        from fedmeta.common.privacy import PrivacyAccountant  # torch, as load_checkpoint above

        accountant = PrivacyAccountant.from_state_dict(checkpoint.privacy)
        metadata["dp"] = {"epsilon": accountant.epsilon, "delta": accountant.delta, "rounds": len(accountant.history)}
        metadata["training_sites"] = max(int(e[0]) for e in checkpoint.privacy["history"])
    return metadata


def sign(checkpoint_path: Path | str, key_path: Path | str, *, overwrite: bool = False) -> dict[str, Any]:
    """Signs ``checkpoint_path`` with the Ed25519 key at ``key_path``; writes the metadata and signature
    beside it and returns the metadata. An earlier signature is replaced only with ``overwrite``, and a file
    of either name that fedmeta sign did not write never (``fedmeta.common.outputs``)."""
    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.is_file():
        raise ReleaseError(f"{checkpoint_path}: no such file; pass the checkpoint.pt to release.")
    names = [metadata_path(checkpoint_path).name, signature_path(checkpoint_path).name]
    outputs = Outputs(checkpoint_path.parent, "sign", option="")
    outputs.check(names, overwrite=overwrite, recognised=_earlier_signature(checkpoint_path))
    key = load_private_key(key_path)
    metadata = release_metadata(checkpoint_path, key.public_key())
    body = (json.dumps(metadata, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
    outputs.claim(names, overwrite=overwrite, recognised=_earlier_signature(checkpoint_path))
    outputs.write_bytes(names[0], body)
    outputs.write_bytes(names[1], base64.b64encode(key.sign(body)) + b"\n")
    return metadata


def _earlier_signature(checkpoint_path: Path) -> set[str]:
    """The signature files beside ``checkpoint_path`` that a fedmeta release before the output journal wrote."""
    try:
        earlier = json.loads(metadata_path(checkpoint_path).read_text())
    except (OSError, ValueError):
        return set()
    if not (isinstance(earlier, dict) and earlier.get("format") == RELEASE_FORMAT and "signing_key_sha256" in earlier
            and earlier.get("file") == checkpoint_path.name):
        return set()
    return {metadata_path(checkpoint_path).name, signature_path(checkpoint_path).name}


def verify(checkpoint_path: Path | str, public_key_path: Path | str | None, *, allow_unsigned: bool = False
           ) -> dict[str, Any] | None:
    """The signed metadata of ``checkpoint_path`` when it verifies with the key at ``public_key_path``;
    None when unsigned use is allowed and there is no key or no signature. A signature that is present
    must verify, whatever ``allow_unsigned`` says. Raises :class:`ReleaseError` naming the failed check."""
    checkpoint_path = Path(checkpoint_path)
    if public_key_path is None:
        if allow_unsigned:
            return None
        raise ReleaseError(f"{checkpoint_path}: no --public-key to check its signature against. Pass the consortium's "
                           "release key (--public-key release.pub), or --allow-unsigned to use an unverified file.")
    key = load_public_key(public_key_path)
    sig_file, meta_file = signature_path(checkpoint_path), metadata_path(checkpoint_path)
    if not sig_file.is_file() or not meta_file.is_file():
        if allow_unsigned:
            return None
        missing = sig_file if not sig_file.is_file() else meta_file
        raise ReleaseError(f"{checkpoint_path}: unsigned ({missing} is missing). Ask the consortium for the signed "
                           "release, or pass --allow-unsigned to use it unverified.")
    body = meta_file.read_bytes()
    try:
        signature = base64.b64decode(sig_file.read_bytes().strip(), validate=True)
        key.verify(signature, body)
    except (InvalidSignature, ValueError):
        raise ReleaseError(f"{checkpoint_path}: its signature does not verify with {public_key_path} (key "
                           f"{key_fingerprint(key)[:16]}): it was signed by another key, or {meta_file.name} was "
                           "edited. Do not use it; ask the consortium for the release.") from None
    metadata = json.loads(body)
    if file_sha256(checkpoint_path) != metadata.get("sha256"):
        raise ReleaseError(f"{checkpoint_path}: its SHA-256 differs from the signed one (release "
                           f"{metadata.get('release_id')}): the checkpoint was altered after it was signed. Do not use "
                           "it; ask the consortium for the release.")
    return metadata


__all__ = ["METADATA_SUFFIX", "ReleaseError", "SIGNATURE_SUFFIX", "key_fingerprint", "metadata_path", "sign",
           "signature_path", "verify"]
