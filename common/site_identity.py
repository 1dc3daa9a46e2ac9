"""A site's identity key and the request that carries its public half to the coordinator.

Flower's SuperNode proves which site it is with an EC key (NIST P-384, OpenSSH format: what ``flower-supernode
--auth-supernode-private-key`` loads and ``flwr supernode register`` accepts). Two ways to get one:

- the coordinator makes it inside the site's bundle (``fedmeta provision --site NAME``): a single operator's pilot;
- the site makes it and keeps it (``fedmeta site-keygen``, as NVFlare 2.8's distributed provisioning does): only
  the *request* — the site's name and public key — travels to the coordinator (``fedmeta provision
  --site-request FILE``), which registers the key and returns a bundle holding no private key.

The request is JSON: ``{"format", "site", "public_key" (the OpenSSH line), "public_key_sha256", "created"}``; its
fingerprint is what both sides read aloud to each other before the coordinator registers it (out of band).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

CURVE = ec.SECP384R1()  # a NIST curve, as `flwr supernode register` requires
REQUEST_FORMAT = 1
REQUEST_SUFFIX = ".site-request.json"
SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MAX_REQUEST_BYTES = 16 * 1024


class SiteRequestError(ValueError):
    """A site request that cannot be used: names the file and what is wrong."""


def new_site_key(site: str) -> tuple[bytes, bytes]:
    """A fresh site key: (private key, OpenSSH PEM; public key, one OpenSSH line naming the site)."""
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" fedmeta-site-{site}\n".encode()


def public_key_sha256(public: bytes) -> str:
    """The fingerprint the registry records (SHA-256 of the public key's OpenSSH line, as written)."""
    return hashlib.sha256(public).hexdigest()


def site_request(site: str, public: bytes, now: dt.datetime | None = None) -> dict[str, Any]:
    now = now or dt.datetime.now(dt.timezone.utc)
    return {"format": REQUEST_FORMAT, "site": site, "public_key": public.decode().strip(),
            "public_key_sha256": public_key_sha256(public), "created": now.isoformat(timespec="seconds")}


def read_site_request(path: Path | str) -> tuple[str, bytes]:
    """(site name, public key as written into site.pub) from a request file, or a SiteRequestError naming it."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_REQUEST_BYTES:
            raise SiteRequestError(f"--site-request {path}: larger than {MAX_REQUEST_BYTES} bytes: not a site request")
        request = json.loads(path.read_text())
    except FileNotFoundError:
        raise SiteRequestError(f"--site-request {path}: no such file; the site makes it with `fedmeta site-keygen`.") from None
    except (OSError, ValueError) as err:
        raise SiteRequestError(f"--site-request {path}: not a readable JSON site request ({err}).") from None
    if not isinstance(request, dict) or request.get("format") != REQUEST_FORMAT:
        raise SiteRequestError(f"--site-request {path}: not a site request of format {REQUEST_FORMAT} "
                               "(`fedmeta site-keygen` writes them).")
    site, line = request.get("site"), request.get("public_key")
    if not isinstance(site, str) or not SITE_NAME.match(site):
        raise SiteRequestError(f"--site-request {path}: site {site!r} is not a site name (lower-case letters, digits "
                               "and dashes).")
    if not isinstance(line, str) or "\n" in line.strip():
        raise SiteRequestError(f"--site-request {path}: public_key must be one OpenSSH public key line.")
    public = line.strip().encode() + b"\n"
    try:
        key = serialization.load_ssh_public_key(public)
    except (ValueError, TypeError) as err:
        raise SiteRequestError(f"--site-request {path}: its public_key is not an OpenSSH public key ({err}).") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != CURVE.name:
        raise SiteRequestError(f"--site-request {path}: its key is not an EC {CURVE.name} key, which Flower's node "
                               "authentication needs; make the key with `fedmeta site-keygen`.")
    if request.get("public_key_sha256") != public_key_sha256(public):
        raise SiteRequestError(f"--site-request {path}: public_key_sha256 does not match its public key: the file was "
                               "edited; ask the site for its request again.")
    return site, public
