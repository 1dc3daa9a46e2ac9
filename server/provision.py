"""`fedmeta provision`: a consortium's TLS and site-identity material, made by the coordinator.

One command writes what a federation across hospitals needs to run secure by default:

    OUT/ca/ca.crt, ca.key                the consortium's certificate authority (keep ca.key offline)
    OUT/superlink/server.crt, server.key the SuperLink's TLS certificate for the names sites dial
    OUT/superlink/register-sites.sh      registers every active site's public key with the SuperLink
    OUT/sites/<name>/                    one bundle per site, to hand to that site and nobody else:
        ca.crt, site.key, site.pub, site.json, start-site.sh, compose.yaml, release.pub, approved-apps/
        (a site that keeps its own key — `fedmeta site-keygen` there, `--site-request FILE` here — gets no site.key)
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

Everything here is ``cryptography``'s X.509 and key serialisation; nothing is hand-rolled. This module is
the command (``provision``, ``revoke-site``, ``sign``); the work is done in ``fedmeta.server.consortium``
(making and extending the folder, retiring a site), ``fedmeta.server.certificates`` (the CA, the SuperLink's
certificate, the release key), ``fedmeta.server.site_bundles`` (a site's bundle and the SuperLink's
register script) and ``fedmeta.server.consortium_files`` (writing inside the folder, its registry).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedmeta.common.release import ReleaseError, metadata_path, sign, signature_path
from fedmeta.server.certificates import CA_DAYS, CERT_DAYS
from fedmeta.server.consortium import DEFAULT_PORT, Provisioned, provision, revoke_site
from fedmeta.server.site_bundles import recorded_node_id, unregister_step


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
    parser.add_argument("--site-request", action="append", default=[], type=Path, metavar="FILE",
                        help="a site that keeps its own key: the request `fedmeta site-keygen` made there (its name "
                             "and public key only); its bundle holds no private key (repeatable)")
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
                           rekey_sites=args.rekey_site, site_requests=args.site_request)
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


__all__ = ["Provisioned", "provision", "recorded_node_id", "register", "revoke_site", "unregister_step"]
