"""App approvals: the consortium signs the Flower app bundle (FAB) its runs use; a site runs no other.

Flower 1.41 executes, at every SuperNode, the ClientApp of whatever app a run was submitted with, and its
open-source SuperLink has no account check on who submits (``--trusted-entities`` verifies only apps
fetched from Flower's Hub). So a site decides itself which code it runs: the consortium signs, with the same
offline Ed25519 release key that signs checkpoints, a statement naming the SHA-256 of the FAB that
``flwr run`` builds from its app folder (``fedmeta sign-app``), and the site's app gate (``fedmeta
site-exec``) starts a ClientApp only for a FAB whose bytes hash to an approved digest.

An approval is two files, like a signed release (``fedmeta.common.release``):

- ``<app>-<version>-<digest16>.app.json``: ``{"format", "fab_sha256", "app", "version", "publisher",
  "approved_at", "signing_key_sha256"}``;
- ``<same>.sig``: the Ed25519 signature of that JSON's exact bytes, base64.

Flower-free: the caller computes the FAB's digest (``fedmeta.server.app_release`` builds the FAB with
Flower's own builder).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature

from fedmeta.common.outputs import Outputs
from fedmeta.common.release import key_fingerprint, load_private_key, load_public_key

APPROVAL_FORMAT = 1
APPROVAL_SUFFIX = ".app.json"
SIGNATURE_SUFFIX = ".sig"
MAX_APPROVAL_BYTES = 64 * 1024  # an approval is ~300 bytes; a bigger file is not one, and is not read
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ApprovalError(ValueError):
    """An approval that cannot be used: names the file and what is wrong with it."""


@dataclass(frozen=True)
class Approvals:
    """The approved FAB digests in a folder, and the files that were not approvals (with why)."""

    digests: dict[str, dict[str, Any]]  # fab_sha256 -> the signed statement
    rejected: dict[str, str]  # file name -> reason

    def allows(self, fab_sha256: str) -> bool:
        return fab_sha256 in self.digests


def fab_digest(fab_bytes: bytes) -> str:
    """The digest Flower names a FAB by (``fab_hash``): SHA-256 of its bytes, hex."""
    return hashlib.sha256(fab_bytes).hexdigest()


def approval_name(app: str, version: str, fab_sha256: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{app}-{version}")
    return f"{safe}-{fab_sha256[:16]}{APPROVAL_SUFFIX}"


def sign_approval(fab_sha256: str, *, app: str, version: str, publisher: str, key_path: Path | str,
                  out_dir: Path | str, overwrite: bool = False) -> Path:
    """Writes the signed approval of ``fab_sha256`` into ``out_dir``; returns the statement's path."""
    if not _SHA256.fullmatch(fab_sha256):
        raise ApprovalError(f"fab_sha256 {fab_sha256!r} is not a SHA-256 hex digest (64 lower-case hex characters).")
    key = load_private_key(key_path)
    statement = {
        "format": APPROVAL_FORMAT,
        "fab_sha256": fab_sha256,
        "app": app,
        "version": version,
        "publisher": publisher,
        "approved_at": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "signing_key_sha256": key_fingerprint(key.public_key()),
    }
    body = (json.dumps(statement, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
    name = approval_name(app, version, fab_sha256)
    names = [name, name + SIGNATURE_SUFFIX]
    outputs = Outputs(Path(out_dir), "sign-app", option="--out")
    outputs.check(names, overwrite=overwrite)
    outputs.claim(names, overwrite=overwrite)
    outputs.write_bytes(names[0], body)
    outputs.write_bytes(names[1], base64.b64encode(key.sign(body)) + b"\n")
    return Path(out_dir) / name


def load_approvals(folder: Path | str, public_key_path: Path | str) -> Approvals:
    """Every approval in ``folder`` whose signature verifies with the release key at ``public_key_path``.

    A file that is not a valid approval (unsigned, signed by another key, edited, malformed, too big) approves
    nothing and is listed in ``rejected`` with the reason, so the site's log can say why an app was refused.
    """
    folder = Path(folder)
    key = load_public_key(public_key_path)
    digests: dict[str, dict[str, Any]] = {}
    rejected: dict[str, str] = {}
    if not folder.is_dir():
        raise ApprovalError(f"--approved-apps {folder}: no such folder; it holds the consortium's signed app "
                            "approvals (`fedmeta sign-app` writes them; they come with the site bundle).")
    for path in sorted(folder.glob("*" + APPROVAL_SUFFIX)):
        try:
            statement = _verified_statement(path, key)
        except ApprovalError as err:
            rejected[path.name] = str(err)
            continue
        digests[statement["fab_sha256"]] = statement
    return Approvals(digests, rejected)


def _read_small_file(path: Path) -> bytes:
    """At most MAX_APPROVAL_BYTES of a regular file: a FIFO, a device (a link to /dev/zero) or a bigger file is
    refused without blocking or reading on (the gate re-reads approvals at every task)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ApprovalError(f"{path.name}: not a regular file: not an approval")
        data = os.read(descriptor, MAX_APPROVAL_BYTES + 1)
    finally:
        os.close(descriptor)
    if len(data) > MAX_APPROVAL_BYTES:
        raise ApprovalError(f"{path.name}: larger than {MAX_APPROVAL_BYTES} bytes: not an approval")
    return data


def _verified_statement(path: Path, key) -> dict[str, Any]:
    sig_path = path.with_name(path.name + SIGNATURE_SUFFIX)
    try:
        body, signature = _read_small_file(path), _read_small_file(sig_path)
    except FileNotFoundError:
        raise ApprovalError(f"{path.name}: unsigned ({sig_path.name} is missing)") from None
    except OSError as err:
        raise ApprovalError(f"{path.name}: unreadable ({err.strerror or err})") from None
    try:
        key.verify(base64.b64decode(signature.strip(), validate=True), body)
    except (InvalidSignature, ValueError):
        raise ApprovalError(f"{path.name}: its signature does not verify with the consortium's release key "
                            f"({key_fingerprint(key)[:16]}): signed by another key, or edited") from None
    try:
        statement = json.loads(body)
    except ValueError:
        raise ApprovalError(f"{path.name}: signed, but not JSON") from None
    if not (isinstance(statement, dict) and statement.get("format") == APPROVAL_FORMAT
            and isinstance(statement.get("fab_sha256"), str) and _SHA256.fullmatch(statement["fab_sha256"])
            and all(isinstance(statement.get(field), str) for field in ("app", "version"))):
        raise ApprovalError(f"{path.name}: signed, but not an approval of format {APPROVAL_FORMAT} with a fab_sha256, "
                            "app and version")
    return statement
