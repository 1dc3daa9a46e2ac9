"""`fedmeta site-keygen`: a site makes its own identity key and keeps it; only a request leaves the site.

The way NVFlare 2.8's distributed provisioning works: the private key is made where it is used and never travels.
The site sends ``<site>.site-request.json`` (its name and public key, ``fedmeta.common.site_identity``) to the
coordinator, reads the printed fingerprint to it over another channel, and gets back a bundle without a private
key (``fedmeta provision --site-request FILE``); it copies that bundle's files into this folder, beside its
``site.key``, and starts from here (``fedmeta doctor --bundle .``, ``./start-site.sh``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedmeta.common.outputs import PRIVATE_FILE_MODE, PRIVATE_FOLDER_MODE, make_folder, write_atomically
from fedmeta.common.site_identity import REQUEST_SUFFIX, SITE_NAME, new_site_key, site_request


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "site-keygen",
        help="make this site's own identity key (kept here) and the request the coordinator registers",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--site", required=True, help="the site's name, as the consortium knows it (e.g. st-marys)")
    parser.add_argument("--out", type=Path, required=True,
                        help="the site's bundle folder: site.key (0600), site.pub and SITE.site-request.json go here")
    parser.set_defaults(handler=_site_keygen_command)


def site_keygen(site: str, out: Path) -> Path:
    """Writes ``out/site.key`` (never over an existing one), ``site.pub`` and the request; returns the request."""
    if not SITE_NAME.match(site):
        raise ValueError(f"--site {site!r}: use lower-case letters, digits and dashes, as the consortium names sites")
    out = Path(out)
    if (out / "site.key").exists() or (out / "site.key").is_symlink():
        raise FileExistsError(f"{out / 'site.key'} exists: this site has a key; it is never replaced here. To make a "
                              "new one (a leaked key), move it away first, then ask the coordinator to rekey the site.")
    make_folder(out, PRIVATE_FOLDER_MODE)
    private, public = new_site_key(site)
    write_atomically(out / "site.key", lambda tmp: tmp.write_bytes(private), PRIVATE_FILE_MODE)
    write_atomically(out / "site.pub", lambda tmp: tmp.write_bytes(public), 0o644)
    request = out / f"{site}{REQUEST_SUFFIX}"
    body = json.dumps(site_request(site, public), indent=2) + "\n"
    write_atomically(request, lambda tmp: tmp.write_text(body), 0o644)
    return request


def _site_keygen_command(args: argparse.Namespace) -> int:
    try:
        request = site_keygen(args.site, args.out)
    except (ValueError, FileExistsError, OSError) as err:
        print(f"fedmeta site-keygen: error: {err}", file=sys.stderr)
        return 1
    fingerprint = json.loads(request.read_text())["public_key_sha256"]
    print(f"wrote  {args.out / 'site.key'} (0600: keep it here; it never leaves the site)")
    print(f"wrote  {args.out / 'site.pub'}")
    print(f"wrote  {request}")
    print(f"next: send {request.name} to the coordinator (fedmeta provision --site-request {request.name}) and read it "
          f"this fingerprint over another channel: sha256 {fingerprint}. Copy the bundle it returns into {args.out}.")
    return 0
