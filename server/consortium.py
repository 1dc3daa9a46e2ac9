"""Making and extending a consortium's material (``provision``) and retiring a site (``revoke_site``).

The folder's layout and the rules for what is replaced when are ``fedmeta.server.provision``'s (the
command); the keys and certificates come from ``fedmeta.server.certificates``, the site bundles from
``fedmeta.server.site_bundles``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedmeta.common.outputs import FOLDER_MODE, PRIVATE_FOLDER_MODE, Outputs, make_folder, refuse_links
from fedmeta.common.release import key_fingerprint
from fedmeta.common.site_identity import read_site_request
from fedmeta.server.certificates import (
    CA_DAYS, CERT_DAYS, alt_name, certificate_authority, expiry, release_key_pair, server_certificate,
)
from fedmeta.server.consortium_files import Provisioned, is_consortium, read_registry, refuse_links_in, write_file
from fedmeta.server.site_bundles import (
    recorded_node_id, site_bundle, unregister_step, write_bundle_files, write_register_script,
)

# The SuperLink's HTTP port. In Flower 1.41 the Fleet API (sites) and the Control API (`flwr run`,
# `flwr supernode register`) share it: --fleet-api-address / --control-api-address are deprecated.
DEFAULT_PORT = 8000
SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def provision(out: Path | str, *, server_names: list[str] = (), sites: list[str] = (), port: int | None = None,
              days: int = CERT_DAYS, force: bool = False, reissue_server: bool = False, rekey_sites: list[str] = (),
              site_requests: list[Path | str] = (), now: dt.datetime | None = None) -> Provisioned:
    """Writes (or completes) the consortium folder ``out``; see ``fedmeta.server.provision`` for the layout.

    ``force`` starts over (a new CA, SuperLink certificate and a new key for every active site);
    ``reissue_server`` replaces only the SuperLink's certificate (new names, or renewal), signed by the
    existing CA; ``rekey_sites`` gives those sites new keys (a lost or leaked key). The CA's private
    key is needed only to sign a SuperLink certificate: adding or rekeying sites works with ca.key
    kept offline. When the address the sites dial changes, every active bundle's start script,
    compose file and site.json are rewritten (their keys are kept).
    """
    out = Path(out)
    now = now or dt.datetime.now(dt.timezone.utc)
    # Sites that keep their own key send only its public half (fedmeta site-keygen); read and checked first.
    requested = dict(read_site_request(path) for path in site_requests)
    if len(requested) != len(list(site_requests)):
        raise ValueError("--site-request: two requests name the same site; pass one per site.")
    sites = [*sites, *requested]
    _check_arguments(server_names, [*sites, *(name for name in rekey_sites if name not in requested)],
                     port if port is not None else DEFAULT_PORT, days)
    # Provision extends its own consortium folder on every run; any other non-empty folder is refused.
    folder = Outputs(out, "provision")
    folder.check_folder(overwrite=True, recognised=is_consortium(out))
    result = Provisioned(out=out)
    registry = read_registry(out)
    _check_request(out, registry, server_names, sites, rekey_sites, force)
    names, issue_server = _server_plan(out, registry, server_names, force, reissue_server)
    # A link in the tree would take a key or a start script outside the consortium folder: refused, naming it,
    # before anything is written (each write checks again).
    refuse_links_in(out, [*(out / "sites" / name for name in {*sites, *rekey_sites, *registry.get("sites", {})}),
                          out / "superlink", out / "release", out / "registry.json"])
    # The folder that holds the keys is 0755 whatever the umask (never group- or world-writable, where a subfolder
    # could be swapped); a new one is made so before the claim, which would make an output folder (the umask's).
    make_folder(out, FOLDER_MODE)
    folder.claim_folder(overwrite=True, recognised=is_consortium(out))  # recorded before the first key is written
    for secret in (out / "ca", out / "superlink", out / "release", *(out / "sites").glob("*/")):
        if secret.is_dir() and not secret.is_symlink():  # an older release made them with the caller's umask
            make_folder(secret, PRIVATE_FOLDER_MODE)
    _certificates(out, names, issue_server, now, days, force, result)

    release_pub = release_key_pair(out, force, result)
    release_fingerprint = key_fingerprint(serialization.load_pem_public_key(release_pub))
    registry["release_key_sha256"] = release_fingerprint

    port = port if port is not None else int(registry.get("port", DEFAULT_PORT))
    address = f"{bracketed(names[0])}:{port}"
    moved = bool(registry.get("address")) and registry["address"] != address
    registry.update(server_names=names, address=address, port=port)
    registry.setdefault("sites", {})
    # --force: a new CA invalidates every bundle's ca.crt, so every active site gets a new bundle.
    issue = list(dict.fromkeys([*sites, *rekey_sites, *(registry["sites"] if force else [])]))
    issued = _issue_bundles(out, registry, issue, address, now, force, rekey_sites, result, requested)
    if moved:  # the sites dial a new address: their scripts must say so (keys and CA are unchanged)
        for name in sorted(set(registry["sites"]) - issued):
            if (out / "sites" / name).is_dir():
                write_bundle_files(out, name, address)
                result.created.append(f"{out / 'sites' / name} (address now {address}; hand the site its new start "
                                      "files)")
    _spread_release_key(out, registry, release_pub, release_fingerprint)
    registry.setdefault("revoked", {})
    _write_registry(out, registry)
    return result


def _check_request(out: Path, registry: dict, server_names, sites, rekey_sites, force: bool) -> None:
    """Refuses, before anything is written, a revoked name reissued, a rekey of an unknown site, a server name
    that is no name, and a file where a site's bundle folder goes."""
    revoked = set(registry.get("revoked", {}))
    again = sorted((set(sites) | set(rekey_sites)) & revoked)
    if again and not force:
        raise ValueError(f"site(s) {', '.join(again)} were revoked; a revoked identity is not reissued. "
                         "Provision the site under a new name.")
    unknown = sorted(set(rekey_sites) - set(registry.get("sites", {})))
    if unknown and not force:
        raise ValueError(f"--rekey-site {', '.join(unknown)}: not a provisioned site of {out} "
                         f"(sites: {', '.join(sorted(registry.get('sites', {}))) or 'none'}); add it with --site.")

    for name in server_names:  # refused before anything is written, so a failure leaves no half-made CA
        alt_name(name)
    for name in {*sites, *rekey_sites, *(registry.get("sites", {}) if force else {})}:
        bundle = out / "sites" / name
        if bundle.exists() and not bundle.is_dir():
            raise FileExistsError(f"{bundle} is a file, not a site bundle folder; move it away and run again "
                                  "(nothing was written).")


def _server_plan(out: Path, registry: dict, server_names, force: bool, reissue_server: bool) -> tuple[list[str], bool]:
    """The names the SuperLink's certificate carries, and whether this call issues it (refusing new names
    without --reissue-server)."""
    server_dir = out / "superlink"
    names = list(server_names) or registry.get("server_names", [])
    if not names:
        raise ValueError("--server-name is required the first time: the DNS name or IP address the sites dial, "
                         "e.g. --server-name coordinator.hospital-net.org")
    issue_server = force or reissue_server or not (server_dir / "server.crt").exists()
    if not issue_server and server_names and list(server_names) != registry.get("server_names", []):
        raise FileExistsError(f"{server_dir / 'server.crt'} is for {registry.get('server_names', [])}, not "
                              f"{list(server_names)}; pass --reissue-server to issue a new one from the same CA "
                              "(the SuperLink must then restart with it; site keys stay).")
    return names, issue_server


def _certificates(out: Path, names: list[str], issue_server: bool, now, days: int, force: bool,
                  result: Provisioned) -> None:
    """The CA and the SuperLink's certificate: made, or kept; their expiry dates go into ``result``."""
    server_dir = out / "superlink"
    ca_key, ca_cert = certificate_authority(out, now, force, result, need_key=issue_server)
    if issue_server:
        server_cert = server_certificate(out, names, ca_key, ca_cert, now, days)
        result.created += [str(server_dir / "server.crt"), str(server_dir / "server.key")]
    else:
        result.kept.append(str(server_dir / "server.crt"))
        server_cert = x509.load_pem_x509_certificate((server_dir / "server.crt").read_bytes())
    result.expiry["SuperLink certificate " + str(server_dir / "server.crt")] = expiry(server_cert)
    result.expiry["CA certificate " + str(out / "ca" / "ca.crt")] = expiry(ca_cert)


def _issue_bundles(out: Path, registry: dict, issue: list[str], address: str, now, force: bool, rekey_sites,
                   result: Provisioned, requested: dict[str, bytes] | None = None) -> set[str]:
    """Makes the bundle of every site in ``issue`` that needs one and records its key; returns those sites.

    A site in ``requested`` brought its own public key: its bundle holds that key and no private key."""
    requested = requested or {}
    issued: set[str] = set()
    for name in issue:
        bundle = out / "sites" / name
        own_key = requested.get(name)
        known = registry["sites"].get(name, {}).get("public_key_sha256")
        if own_key is None and registry["sites"].get(name, {}).get("private_key_held_by") == "site":
            if name in rekey_sites:  # the coordinator cannot make the key of a site that keeps its own
                raise ValueError(f"--rekey-site {name}: this site keeps its own key; ask it for a new request "
                                 f"(fedmeta site-keygen) and pass --site-request FILE --rekey-site {name}.")
            if (bundle / "site.pub").is_file():
                own_key = (bundle / "site.pub").read_bytes()  # --force (a new CA): the site's key stays its own
        if own_key is not None and known is not None and known != hashlib.sha256(own_key).hexdigest() \
                and not (force or name in rekey_sites):
            raise ValueError(f"site {name!r} is registered with another key (sha256 {known[:16]}...); to give it the "
                             f"key of its request, pass --rekey-site {name} too (then unregister the old key's node).")
        # A site exists when the registry has it (its bundle folder may have been handed over and removed
        # here): its key is replaced only on request.
        if (name in registry["sites"] or (bundle / "site.key").exists()) and not (force or name in rekey_sites):
            result.kept.append(str(bundle) + ("" if (bundle / "site.key").exists() or own_key is not None
                                              else " (registered; its bundle is not here: --rekey-site makes a new one)"))
            continue
        issued.add(name)
        public = site_bundle(out, name, address, public_key=own_key)
        registry.get("revoked", {}).pop(name, None)  # --force reissued a revoked name: a new identity
        previous = registry["sites"].get(name)
        registry["sites"][name] = {"public_key_sha256": hashlib.sha256(public).hexdigest(),
                                   "created": now.isoformat(timespec="seconds"),
                                   "private_key_held_by": "site" if own_key is not None else "coordinator"}
        if previous and previous["public_key_sha256"] != registry["sites"][name]["public_key_sha256"]:
            result.rekeyed.append(name)
        result.created.append(str(bundle))
    return issued


def _spread_release_key(out: Path, registry: dict, release_pub: bytes, release_fingerprint: str) -> None:
    """Every bundle here carries the release key sites verify with, and its fingerprint in site.json."""
    for name in sorted(registry["sites"]):
        bundle = out / "sites" / name
        if not bundle.is_dir():
            continue
        if not (bundle / "release.pub").is_file() or (bundle / "release.pub").read_bytes() != release_pub:
            write_file(bundle / "release.pub", release_pub, 0o644, out=out)
        # ... and its fingerprint, which adapt/evaluate/predict check before taking ./release.pub as the default
        # (a release.pub that arrived beside a downloaded checkpoint is not the consortium's).
        if (bundle / "site.json").is_file():
            meta = json.loads((bundle / "site.json").read_text())
            if meta.get("release_key_sha256") != release_fingerprint:
                meta.update(release_key="release.pub", release_key_sha256=release_fingerprint)
                write_file(bundle / "site.json", (json.dumps(meta, indent=2) + "\n").encode(), 0o644, out=out)


def _write_registry(out: Path, registry: dict) -> None:
    """The SuperLink's register-sites.sh for the active sites, then registry.json."""
    write_register_script(out / "superlink" / "register-sites.sh", out, registry)
    write_file(out / "registry.json", (json.dumps(registry, indent=2, sort_keys=True) + "\n").encode(), 0o644, out=out)


def revoke_site(out: Path | str, site: str) -> str:
    """Retires ``site``; returns the step that removes it from a running SuperLink."""
    out = Path(out)
    registry = read_registry(out)
    if site not in registry.get("sites", {}):
        known = ", ".join(sorted(registry.get("sites", {}))) or "none"
        raise ValueError(f"site {site!r} is not provisioned in {out} (sites: {known}).")
    entry = registry["sites"].pop(site)
    node_id = recorded_node_id(out, site)
    registry.setdefault("revoked", {})[site] = {**entry, "revoked": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                                **({"node_id": node_id} if node_id is not None else {})}
    bundle = out / "sites" / site
    refuse_links(bundle / "site.key", out)  # unlinking through a linked folder would delete someone else's file
    make_folder(bundle, PRIVATE_FOLDER_MODE, within=out)  # the folder may have been handed over and deleted here
    (bundle / "site.key").unlink(missing_ok=True)
    write_file(bundle / "REVOKED", b"This site's identity was revoked; its key is gone and the SuperLink refuses it.\n",
               0o644, out=out)
    _write_registry(out, registry)
    return (f"revoked {site} (key fingerprint sha256:{entry['public_key_sha256'][:16]}...). The SuperLink admits its key "
            f"until you remove it; on the coordinator, with <connection> the SuperLink connection register-sites.sh "
            f"used: {unregister_step(out, site)}.")


def _check_arguments(server_names, sites, port, days) -> None:
    for name in sites:
        if not SITE_NAME.match(name):
            raise ValueError(f"--site {name!r}: use lower-case letters, digits and dashes (a folder and a node name), "
                             "e.g. --site st-marys-radiology")
    if len(set(sites)) != len(list(sites)):
        raise ValueError(f"--site names repeat: {sorted(sites)}")
    for name in server_names:
        if not name or any(c.isspace() for c in name) or name.startswith("-"):
            raise ValueError(f"--server-name {name!r}: give a DNS name or an IP address, e.g. coordinator.example.org")
    if not 1 <= port <= 65535:
        raise ValueError(f"--port {port}: must be a TCP port, 1-65535.")
    if not 1 <= days <= CA_DAYS:
        raise ValueError(f"--days {days}: must be between 1 and {CA_DAYS}.")


def bracketed(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


__all__ = ["DEFAULT_PORT", "SITE_NAME", "Provisioned", "provision", "recorded_node_id", "revoke_site",
           "unregister_step"]
