"""`fedmeta provision`: a consortium's TLS and site-identity material, made by the coordinator.

One command writes what a federation across hospitals needs to run secure by default:

    OUT/ca/ca.crt, ca.key                the consortium's certificate authority (keep ca.key offline)
    OUT/superlink/server.crt, server.key the SuperLink's TLS certificate for the names sites dial
    OUT/superlink/register-sites.sh      registers every active site's public key with the SuperLink
    OUT/sites/<name>/                    one bundle per site, to hand to that site and nobody else:
        ca.crt, site.key, site.pub, site.json, start-site.sh, compose.yaml, release.pub
    OUT/release/release.key, release.pub the consortium's Ed25519 release key (`fedmeta sign --key`; keep
                                         release.key offline); release.pub also goes into every site bundle
    OUT/registry.json                    sites, key fingerprints, expiry dates, revocations

TLS is server-verified (Flower's SuperNode checks the SuperLink against ``ca.crt``); a site proves who
it is with its EC key (NIST P-384, OpenSSH format: what ``flower-supernode
--auth-supernode-private-key`` loads and ``flwr supernode register`` accepts). Private keys are
written 0600 and never replaced without ``--force`` (start over), ``--reissue-server`` (the SuperLink's
certificate only) or ``--rekey-site NAME``; running the command again with a new ``--site`` adds that
site and keeps everything else, and needs only ``ca.crt`` (``ca.key`` may stay offline). ``fedmeta revoke-site`` retires a site: its bundle's key is
deleted, the registry marks it revoked and the command prints the ``flwr supernode unregister`` step
that removes it from the running SuperLink.

Everything here is ``cryptography``'s X.509 and key serialisation; nothing is hand-rolled.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmeta.common.outputs import FOLDER_MODE, PRIVATE_FOLDER_MODE, OutputRefused, Outputs, make_folder, refuse_links

CURVE = ec.SECP384R1()  # a NIST curve, as `flwr supernode register` requires
CA_DAYS = 3650
CERT_DAYS = 397  # the longest server-certificate lifetime browsers still accept; renew yearly
# The SuperLink's HTTP port. In Flower 1.41 the Fleet API (sites) and the Control API (`flwr run`,
# `flwr supernode register`) share it: --fleet-api-address / --control-api-address are deprecated.
DEFAULT_PORT = 8000
SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
SITE_IMAGE = "fedmeta/supernode:0.1.0"


@dataclass
class Provisioned:
    """What one call wrote (``created``), kept (``kept``) and when each certificate expires."""

    out: Path
    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    expiry: dict[str, str] = field(default_factory=dict)
    rekeyed: list[str] = field(default_factory=list)  # sites whose registered key changed


# --------------------------------------------------------------------------------------------------
# the command


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "provision",
        help="make (or extend) a consortium's CA, SuperLink certificate and per-site key bundles",
        description=__doc__.split("\n\n")[0] + " Run it again with new --site names to add sites later.",
    )
    parser.add_argument("--out", type=Path, required=True, help="the consortium's material folder")
    parser.add_argument("--server-name", action="append", default=[], metavar="NAME",
                        help="DNS name or IP address the sites use to reach the SuperLink (repeatable; the first "
                             "is the address written into site bundles); required when the folder has no "
                             "SuperLink certificate yet")
    parser.add_argument("--site", action="append", default=[], metavar="NAME",
                        help="a site to make a bundle for: lower-case letters, digits and dashes (repeatable)")
    parser.add_argument("--port", type=int, default=None,
                        help=f"the SuperLink's Fleet API port the sites dial (default: the folder's, else {DEFAULT_PORT})")
    parser.add_argument("--days", type=int, default=CERT_DAYS,
                        help=f"validity of the SuperLink certificate in days (default {CERT_DAYS}; the CA: {CA_DAYS})")
    parser.add_argument("--reissue-server", action="store_true",
                        help="issue a new SuperLink certificate (renewal, or new --server-name) from the same CA; "
                             "site keys and bundles stay (needs ca.key)")
    parser.add_argument("--rekey-site", action="append", default=[], metavar="NAME",
                        help="give a provisioned site a new key (lost or leaked): unregister the old key, register "
                             "the new one, hand the site its new bundle (repeatable; ca.key not needed)")
    parser.add_argument("--force", action="store_true",
                        help="start over: a new CA, SuperLink certificate and a new key for every active site "
                             "(every site must then get its new bundle)")
    parser.set_defaults(handler=_provision_command)

    revoke = subparsers.add_parser(
        "revoke-site",
        help="retire a site: delete its bundle key, mark it revoked, print the SuperLink unregister step",
        description="Marks a site revoked in OUT/registry.json, deletes its private key from OUT/sites/<name>/ and "
                    "prints how to unregister its node from the running SuperLink.",
    )
    revoke.add_argument("--out", type=Path, required=True, help="the consortium's material folder")
    revoke.add_argument("--site", required=True, help="the site to revoke")
    revoke.set_defaults(handler=_revoke_command)

    sign = subparsers.add_parser(
        "sign",
        help="sign a checkpoint as the consortium's release (Ed25519): writes CHECKPOINT.sig and CHECKPOINT.release.json",
        description="Signs a checkpoint with the consortium's Ed25519 private key. Sites verify it with "
                    "`fedmeta evaluate --public-key release.pub`; a tampered, unsigned or foreign-signed file is refused.",
    )
    sign.add_argument("checkpoint", type=Path, help="the checkpoint.pt to release")
    sign.add_argument("--key", type=Path, required=True,
                      help="the consortium's Ed25519 private key, PEM (openssl genpkey -algorithm ed25519 -out release.key)")
    sign.add_argument("--overwrite", action="store_true",
                      help="replace the signature an earlier fedmeta sign wrote for this checkpoint")
    sign.set_defaults(handler=_sign_command)


def _provision_command(args: argparse.Namespace) -> int:
    try:
        result = provision(args.out, server_names=args.server_name, sites=args.site, port=args.port,
                           days=args.days, force=args.force, reissue_server=args.reissue_server,
                           rekey_sites=args.rekey_site)
    except (ValueError, FileExistsError, FileNotFoundError, PermissionError) as err:
        print(f"fedmeta provision: error: {err}", file=sys.stderr)
        return 1
    for path in result.created:
        print(f"wrote  {path}")
    for path in result.kept:
        print(f"kept   {path} (exists; --force replaces it)")
    for what, when in result.expiry.items():
        print(f"expires {when}  {what}")
    for name in result.rekeyed:
        print(f"rekeyed {name}: on the SuperLink, remove the old key's node ({unregister_step(result.out, name)}), then "
              f"register the new key (register-sites.sh); hand the site its new bundle")
    print(f"next: start the SuperLink with {result.out / 'superlink'} (README: consortium walk-through), run "
          f"{result.out / 'superlink' / 'register-sites.sh'}, and hand each site its folder under {result.out / 'sites'}.")
    return 0


def _sign_command(args: argparse.Namespace) -> int:
    from fedmeta.common.release import ReleaseError, metadata_path, sign, signature_path

    try:
        metadata = sign(args.checkpoint, args.key, overwrite=args.overwrite)
    except (ReleaseError, ValueError, OSError) as err:
        print(f"fedmeta sign: error: {err}", file=sys.stderr)
        return 1
    dp = f", DP epsilon {metadata['dp']['epsilon']:.3g}" if metadata["dp"] else ""
    print(f"signed release {metadata['release_id']}: {args.checkpoint} (round {metadata['round']}, "
          f"{metadata['algorithm']}{dp}; key {metadata['signing_key_sha256'][:16]})")
    print(f"wrote  {metadata_path(args.checkpoint)}\nwrote  {signature_path(args.checkpoint)}")
    return 0


def _revoke_command(args: argparse.Namespace) -> int:
    try:
        step = revoke_site(args.out, args.site)
    except (ValueError, FileNotFoundError) as err:
        print(f"fedmeta revoke-site: error: {err}", file=sys.stderr)
        return 1
    print(step)
    return 0


# --------------------------------------------------------------------------------------------------
# provisioning


def provision(out: Path | str, *, server_names: list[str] = (), sites: list[str] = (), port: int | None = None,
              days: int = CERT_DAYS, force: bool = False, reissue_server: bool = False, rekey_sites: list[str] = (),
              now: dt.datetime | None = None) -> Provisioned:
    """Writes (or completes) the consortium folder ``out``; see the module docstring for the layout.

    ``force`` starts over (a new CA, SuperLink certificate and a new key for every active site);
    ``reissue_server`` replaces only the SuperLink's certificate (new names, or renewal), signed by the
    existing CA; ``rekey_sites`` gives those sites new keys (a lost or leaked key). The CA's private
    key is needed only to sign a SuperLink certificate: adding or rekeying sites works with ca.key
    kept offline. When the address the sites dial changes, every active bundle's start script,
    compose file and site.json are rewritten (their keys are kept).
    """
    out = Path(out)
    now = now or dt.datetime.now(dt.timezone.utc)
    _check_arguments(server_names, [*sites, *rekey_sites], port if port is not None else DEFAULT_PORT, days)
    # Provision extends its own consortium folder on every run; any other non-empty folder is refused.
    folder = Outputs(out, "provision")
    folder.check_folder(overwrite=True, recognised=_is_consortium(out))
    result = Provisioned(out=out)
    registry = _read_registry(out)
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
        _alt_name(name)
    for name in {*sites, *rekey_sites, *(registry.get("sites", {}) if force else {})}:
        bundle = out / "sites" / name
        if bundle.exists() and not bundle.is_dir():
            raise FileExistsError(f"{bundle} is a file, not a site bundle folder; move it away and run again "
                                  "(nothing was written).")
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
    # A link in the tree would take a key or a start script outside the consortium folder: refused, naming it,
    # before anything is written (each write checks again).
    _refuse_links_in(out, [*(out / "sites" / name for name in {*sites, *rekey_sites, *registry.get("sites", {})}),
                           out / "superlink", out / "release", out / "registry.json"])
    folder.claim_folder(overwrite=True, recognised=_is_consortium(out))  # recorded before the first key is written
    for secret in (out / "ca", server_dir, out / "release", *(out / "sites").glob("*/")):
        if secret.is_dir() and not secret.is_symlink():  # an older release made them with the caller's umask
            make_folder(secret, PRIVATE_FOLDER_MODE)
    ca_key, ca_cert = _certificate_authority(out, now, force, result, need_key=issue_server)
    if issue_server:
        server_cert = _server_certificate(out, names, ca_key, ca_cert, now, days)
        result.created += [str(server_dir / "server.crt"), str(server_dir / "server.key")]
    else:
        result.kept.append(str(server_dir / "server.crt"))
        server_cert = x509.load_pem_x509_certificate((server_dir / "server.crt").read_bytes())
    result.expiry["SuperLink certificate " + str(server_dir / "server.crt")] = _expiry(server_cert)
    result.expiry["CA certificate " + str(out / "ca" / "ca.crt")] = _expiry(ca_cert)

    release_pub = _release_key(out, force, result)
    from fedmeta.common.release import key_fingerprint

    release_fingerprint = key_fingerprint(serialization.load_pem_public_key(release_pub))
    registry["release_key_sha256"] = release_fingerprint

    port = port if port is not None else int(registry.get("port", DEFAULT_PORT))
    address = f"{_bracketed(names[0])}:{port}"
    moved = bool(registry.get("address")) and registry["address"] != address
    registry.update(server_names=names, address=address, port=port)
    registry.setdefault("sites", {})
    # --force: a new CA invalidates every bundle's ca.crt, so every active site gets a new bundle.
    issue = list(dict.fromkeys([*sites, *rekey_sites, *(registry["sites"] if force else [])]))
    issued: set[str] = set()
    for name in issue:
        bundle = out / "sites" / name
        # A site exists when the registry has it (its bundle folder may have been handed over and removed
        # here): its key is replaced only on request.
        if (name in registry["sites"] or (bundle / "site.key").exists()) and not (force or name in rekey_sites):
            result.kept.append(str(bundle) + ("" if (bundle / "site.key").exists()
                                              else " (registered; its bundle is not here: --rekey-site makes a new one)"))
            continue
        issued.add(name)
        public = _site_bundle(out, name, address)
        registry.get("revoked", {}).pop(name, None)  # --force reissued a revoked name: a new identity
        previous = registry["sites"].get(name)
        registry["sites"][name] = {"public_key_sha256": hashlib.sha256(public).hexdigest(),
                                   "created": now.isoformat(timespec="seconds")}
        if previous and previous["public_key_sha256"] != registry["sites"][name]["public_key_sha256"]:
            result.rekeyed.append(name)
        result.created.append(str(bundle))
    if moved:  # the sites dial a new address: their scripts must say so (keys and CA are unchanged)
        for name in sorted(set(registry["sites"]) - issued):
            if (out / "sites" / name).is_dir():
                _write_bundle_files(out, name, address)
                result.created.append(f"{out / 'sites' / name} (address now {address}; hand the site its new start "
                                      "files)")
    for name in sorted(registry["sites"]):  # every bundle here carries the release key sites verify with
        bundle = out / "sites" / name
        if not bundle.is_dir():
            continue
        if not (bundle / "release.pub").is_file() or (bundle / "release.pub").read_bytes() != release_pub:
            _write(bundle / "release.pub", release_pub, 0o644, out=out)
        # ... and its fingerprint, which adapt/evaluate/predict check before taking ./release.pub as the default
        # (a release.pub that arrived beside a downloaded checkpoint is not the consortium's).
        if (bundle / "site.json").is_file():
            meta = json.loads((bundle / "site.json").read_text())
            if meta.get("release_key_sha256") != release_fingerprint:
                meta.update(release_key="release.pub", release_key_sha256=release_fingerprint)
                _write(bundle / "site.json", (json.dumps(meta, indent=2) + "\n").encode(), 0o644, out=out)
    registry.setdefault("revoked", {})
    _write_register_script(server_dir / "register-sites.sh", out, registry)
    _write(out / "registry.json", (json.dumps(registry, indent=2, sort_keys=True) + "\n").encode(), 0o644, out=out)
    return result


def revoke_site(out: Path | str, site: str) -> str:
    """Retires ``site``; returns the step that removes it from a running SuperLink."""
    out = Path(out)
    registry = _read_registry(out)
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
    _write(bundle / "REVOKED", b"This site's identity was revoked; its key is gone and the SuperLink refuses it.\n",
           0o644, out=out)
    _write_register_script(out / "superlink" / "register-sites.sh", out, registry)
    _write(out / "registry.json", (json.dumps(registry, indent=2, sort_keys=True) + "\n").encode(), 0o644, out=out)
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


def _certificate_authority(out: Path, now, force: bool, result: Provisioned, need_key: bool):
    """The CA (made when there is none, or with ``force``); its key only when ``need_key`` (it may be offline)."""
    ca_dir = out / "ca"
    key_path, cert_path = ca_dir / "ca.key", ca_dir / "ca.crt"
    if cert_path.exists() and not force:
        result.kept.append(str(cert_path))
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if not key_path.exists():
            if need_key:
                raise FileNotFoundError(
                    f"{key_path} is not here (kept offline?); it is needed to sign the SuperLink certificate. Bring "
                    "it back for this command, then store it offline again.")
            return None, cert
        return serialization.load_pem_private_key(key_path.read_bytes(), password=None), cert
    if key_path.exists() and not force:
        raise FileExistsError(f"{ca_dir} holds ca.key without ca.crt; restore ca.crt or start over with --force.")
    key = ec.generate_private_key(CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmeta consortium"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "fedmeta consortium CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write(key_path, _pem_private(key), 0o600, out=out)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, out=out)
    result.created += [str(cert_path), str(key_path)]
    return key, cert


def _release_key(out: Path, force: bool, result: Provisioned) -> bytes:
    """The consortium's Ed25519 release key pair (``fedmeta sign --key release/release.key``; the ServerApp's
    ``release-key``); made when there is none, or with ``force``. Returns the public key (PEM), which every
    site bundle carries as ``release.pub``: the key ``adapt``, ``evaluate`` and ``predict`` verify with by
    default. The private key may be kept offline once made: ``release.pub`` alone is enough here."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key_path, pub_path = out / "release" / "release.key", out / "release" / "release.pub"
    if pub_path.is_file() and not force:
        result.kept.append(str(pub_path))
        return pub_path.read_bytes()
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _write(key_path, _pem_private(key), 0o600, out=out)
    _write(pub_path, public, 0o644, out=out)
    result.created += [str(pub_path), str(key_path)]
    return public


def _server_certificate(out: Path, names: list[str], ca_key, ca_cert, now, days: int):
    server_dir = out / "superlink"
    key = ec.generate_private_key(CURVE)
    alt_names = [_alt_name(name) for name in names]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(server_dir / "server.key", _pem_private(key), 0o600, out=out)
    _write(server_dir / "server.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644, out=out)
    _write(server_dir / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), 0o644, out=out)  # --ssl-ca-certfile
    return cert


def _alt_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", name):
        raise ValueError(f"--server-name {name!r}: give a DNS name (letters, digits, dots, dashes; punycode for "
                         "international names) or an IP address, without a port")
    return x509.DNSName(name)


def _site_bundle(out: Path, name: str, address: str) -> bytes:
    """Writes a site's bundle ``out/sites/<name>``; returns its OpenSSH public key."""
    bundle = out / "sites" / name
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public += f" fedmeta-site-{name}\n".encode()
    make_folder(bundle, PRIVATE_FOLDER_MODE, within=out)
    refuse_links(bundle / "REVOKED", out)
    (bundle / "REVOKED").unlink(missing_ok=True)
    _write(bundle / "site.key", private, 0o600, out=out)
    _write(bundle / "site.pub", public, 0o644, out=out)
    _write(bundle / "ca.crt", (out / "ca" / "ca.crt").read_bytes(), 0o644, out=out)
    _write_bundle_files(out, name, address)
    return public


def _write_bundle_files(out: Path, name: str, address: str) -> None:
    """The non-secret files of the bundle ``out/sites/<name>``, which name the address the site dials."""
    bundle = out / "sites" / name
    _write(bundle / "site.json", (json.dumps({"site": name, "superlink": address, "ca": "ca.crt",
                                              "private_key": "site.key", "public_key": "site.pub"},
                                             indent=2) + "\n").encode(), 0o644, out=out)
    _write(bundle / "start-site.sh", _START_SCRIPT.format(address=address).encode(), 0o755, out=out)
    _write(bundle / "compose.yaml", _SITE_COMPOSE.format(address=address, image=SITE_IMAGE, site=name).encode(), 0o644,
           out=out)


NODE_IDS = "node-ids"  # OUT/superlink/node-ids/<site>: the node id the SuperLink gave the site's key


def _write_register_script(path: Path, out: Path, registry: dict) -> None:
    # Flower 1.41's `flwr supernode list` shows neither a node's name nor its key (every owner is "none"), so the
    # node id `flwr supernode register --format json` answers is the only handle `unregister` can take: kept here.
    lines = ["#!/bin/sh",
             "# Registers every active site's public key with the running SuperLink (run on the coordinator) and",
             f"# records the node id the SuperLink gives each in superlink/{NODE_IDS}/<site> (fedmeta revoke-site",
             "# prints `flwr supernode unregister <node id>` with it).",
             "# CONNECTION: the name of the SuperLink connection in $FLWR_HOME/config.toml (README).",
             "set -eu", 'CONNECTION="${1:?usage: register-sites.sh CONNECTION}"',
             'HERE="$(cd "$(dirname "$0")/.." && pwd)"',
             f'IDS="$HERE/superlink/{NODE_IDS}"',
             'mkdir -p "$IDS"',
             "register() {  # SITE PUBLIC_KEY",
             '  if reply="$(flwr supernode register "$2" "$CONNECTION" --name "$1" --format json)" &&',
             '     id="$(printf \'%s\' "$reply" | python3 -c \'import json, sys; r = json.load(sys.stdin); '
             'print(r.get("node-id", "") if r.get("success") else "")\')" && [ -n "$id" ]; then',
             '    printf \'%s\\n\' "$id" > "$IDS/$1"',
             '    echo "$1: registered as node $id"',
             "  else  # re-runnable: a key registered before is refused by the SuperLink; say so and go on",
             '    echo "$1: not registered now (already registered? recorded node id: $(cat "$IDS/$1" 2>/dev/null || '
             'echo none))"',
             "  fi",
             "}"]
    for name in sorted(registry.get("sites", {})):
        lines.append(f'register {name} "$HERE/sites/{name}/site.pub"')
    _write(path, ("\n".join(lines) + "\n").encode(), 0o755, out=out)


def recorded_node_id(out: Path, site: str) -> int | None:
    """The node id register-sites.sh recorded for ``site``'s key, or None."""
    try:
        text = (Path(out) / "superlink" / NODE_IDS / site).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def unregister_step(out: Path, site: str) -> str:
    """The command that removes ``site``'s node from the running SuperLink (Flower 1.41), or how to find its id."""
    node_id = recorded_node_id(out, site)
    if node_id is not None:
        return f"flwr supernode unregister {node_id} <connection>"
    return (f"flwr supernode unregister <node-id> <connection>, where <node-id> is the number `flwr supernode register` "
            f"answered for sites/{site}/site.pub; none was recorded in {Path(out) / 'superlink' / NODE_IDS / site} (the "
            "key was registered by hand or before register-sites.sh recorded ids). Flower 1.41's `flwr supernode list "
            "<connection> --format json` shows no names or keys (every owner is \"none\"): its node is the one whose "
            "created-at is when its key was registered")


def _is_consortium(out: Path) -> bool:
    """Whether ``out`` holds a consortium an older fedmeta provision made (a registry, before the output journal)."""
    try:
        registry = json.loads((out / "registry.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(registry, dict) and isinstance(registry.get("sites"), dict) and "address" in registry


def _read_registry(out: Path) -> dict:
    path = out / "registry.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); restore it from a backup or provision a new folder.") from None


def _write(path: Path, data: bytes, mode: int, *, out: Path) -> None:
    """Writes ``path`` (inside the consortium folder ``out``) with ``mode`` from its creation on (a private key is
    never world-readable, even briefly); a folder made for a private key is 0700, any other 0755, whatever the
    caller's umask. A symbolic link on the way from ``out`` (folder or file) is refused, never followed."""
    make_folder(path.parent, PRIVATE_FOLDER_MODE if mode & 0o077 == 0 else FOLDER_MODE, within=out)
    refuse_links(path, out)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, mode)  # the umask may have narrowed it
    os.replace(tmp, path)


def _refuse_links_in(out: Path, paths: list[Path]) -> None:
    """Raises :class:`OutputRefused` naming every symbolic link among ``paths`` (inside ``out``), the folders
    above them and, below those that are folders, every entry provision writes over."""
    links = []
    for path in sorted(set(paths)):
        parts = path.relative_to(out).parts
        link = next((out.joinpath(*parts[:depth]) for depth in range(len(parts) + 1)
                     if out.joinpath(*parts[:depth]).is_symlink()), None)
        if link is not None:
            links.append(link)
            continue
        for folder, subfolders, files in os.walk(path):  # does not descend into linked folders, lists them
            links += [Path(folder) / name for name in (*subfolders, *files) if (Path(folder) / name).is_symlink()]
    if links:
        shown = ", ".join(f"{link} -> {os.readlink(link)}" for link in sorted(set(links)))
        raise OutputRefused(f"{shown}: symbolic link(s) in the consortium folder {out}; provision writes only inside it "
                            "and never through a link, which would put keys and start scripts outside it. Replace each "
                            "link with the folder or file itself, or remove it, and run again (nothing was written).")


def _pem_private(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _expiry(cert: x509.Certificate) -> str:
    return cert.not_valid_after_utc.date().isoformat()


def _bracketed(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


_START_SCRIPT = """#!/bin/sh
# Joins this hospital to the consortium: TLS against the consortium CA, authenticated by this site's key.
# Usage: ./start-site.sh DATA_DIR   (the site's MSD-layout folder; check it first: fedmeta doctor / check-data)
# METRICS_PORT=9101 ./start-site.sh DATA_DIR also serves the site's own metrics (episodes, seconds per
# episode, device, memory) on 127.0.0.1:9101/metrics via `fedmeta site-metrics` (METRICS_DIR: where the
# ClientApp records them, default ./metrics beside this script).
set -eu
HERE="$(cd "$(dirname "$0")" && pwd)"
DATA_DIR="$(cd "${{1:?usage: start-site.sh DATA_DIR}}" && pwd)"
NODE_CONFIG="data-dir=\\"$DATA_DIR\\""
if [ -n "${{METRICS_PORT:-}}" ]; then
  METRICS_DIR="${{METRICS_DIR:-$HERE/metrics}}"
  NODE_CONFIG="$NODE_CONFIG metrics-dir=\\"$METRICS_DIR\\""
fi
set -- flower-supernode \\
  --superlink {address} \\
  --root-certificates "$HERE/ca.crt" \\
  --auth-supernode-private-key "$HERE/site.key" \\
  --node-config "$NODE_CONFIG"
if [ -z "${{METRICS_PORT:-}}" ]; then
  exec "$@"  # the SuperNode takes this process: a supervisor's signals reach it
fi
fedmeta site-metrics --dir "$METRICS_DIR" --port "$METRICS_PORT" &
EXPORTER=$!
"$@" &
SUPERNODE=$!
trap 'kill "$SUPERNODE" "$EXPORTER" 2>/dev/null || true' INT TERM
STATUS=0
wait "$SUPERNODE" || STATUS=$?
kill "$SUPERNODE" "$EXPORTER" 2>/dev/null || true
wait "$SUPERNODE" 2>/dev/null || true
exit "$STATUS"
"""

_SITE_COMPOSE = """# One hospital's SuperNode. Start: docker compose up -d  (DATA_DIR: the site's MSD-layout folder).
# The site's own metrics (episodes, seconds per episode, device, memory): 127.0.0.1:${{METRICS_PORT:-9101}}/metrics.
services:
  supernode:
    image: {image}
    restart: unless-stopped
    command:
      - --superlink={address}
      - --root-certificates=/run/secrets/ca.crt
      - --auth-supernode-private-key=/run/secrets/site.key
      - --node-config=data-dir="/data" metrics-dir="/metrics"
    volumes:
      - ${{DATA_DIR:?set DATA_DIR to the site's data folder}}:/data:ro
      - metrics:/metrics
      - state:/state  # the site's random order key (FEDMETA_HOME): kept across restarts
    secrets:  # the image runs as Flower's uid 49999: `sudo chown 49999 site.key` keeps it 0600 and readable
      - ca.crt
      - site.key
    environment:
      FLWR_TELEMETRY_ENABLED: "0"
      FEDMETA_HOME: /state
  metrics:
    image: {image}
    restart: unless-stopped
    entrypoint: ["fedmeta", "site-metrics"]
    command: ["--dir=/metrics", "--port=9101", "--address=0.0.0.0"]
    volumes:
      - metrics:/metrics:ro
    ports:
      - "127.0.0.1:${{METRICS_PORT:-9101}}:9101"
volumes:
  metrics:
  state:
secrets:
  ca.crt:
    file: ./ca.crt
  site.key:
    file: ./site.key
"""


__all__ = ["Provisioned", "provision", "recorded_node_id", "register", "revoke_site", "unregister_step"]
