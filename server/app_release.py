"""`fedmeta sign-app`: the consortium approves the Flower app bundle its runs submit, so sites run it.

A site's app gate (``fedmeta site-exec``) starts a ClientApp only for a FAB whose SHA-256 an approval signed
with the consortium's release key names (``fedmeta.common.app_approval``). This command builds the FAB from the
app folder with Flower's own builder — the bytes ``flwr run APP_DIR`` submits, so the digest is the one the
SuperNode will be handed — and writes the signed approval; with ``--consortium`` also into every site bundle's
``approved-apps/`` folder (hand it to the sites with the release). The digest covers every file the bundle
holds: sign the folder you will run, after your last edit.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from fedmeta.common.app_approval import SIGNATURE_SUFFIX, ApprovalError, fab_digest, sign_approval
from fedmeta.common.release import ReleaseError

APPROVED_APPS_DIR = "approved-apps"


def app_fab_digest(app_dir: Path) -> tuple[str, dict[str, str]]:
    """The SHA-256 of the FAB `flwr run app_dir` builds, and the app's name, version and publisher."""
    import tomllib

    from flwr.cli.build import build_fab_from_disk

    app_dir = Path(app_dir).expanduser().resolve()
    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise FileNotFoundError(f"{pyproject} not found: pass the Flower app folder you submit with `flwr run` "
                                "(the fedmeta checkout).")
    config = tomllib.loads(pyproject.read_text())
    identity = {"app": str(config.get("project", {}).get("name", "")),
                "version": str(config.get("project", {}).get("version", "")),
                "publisher": str(config.get("tool", {}).get("flwr", {}).get("app", {}).get("publisher", ""))}
    return fab_digest(build_fab_from_disk(app_dir)), identity


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sign-app",
        help="approve the Flower app a run submits (Ed25519): sites' app gates run no other ClientApp",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("app", type=Path, nargs="?", default=Path("."),
                        help="the app folder `flwr run` submits (default: the current folder)")
    parser.add_argument("--key", type=Path, required=True,
                        help="the consortium's Ed25519 release key, PEM (consortium/release/release.key)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the approval (default: CONSORTIUM/approved-apps with --consortium)")
    parser.add_argument("--consortium", type=Path, default=None,
                        help="the `fedmeta provision` folder: also copy the approval into every site bundle's "
                             "approved-apps/")
    parser.add_argument("--overwrite", action="store_true", help="replace an approval sign-app wrote before")
    parser.set_defaults(handler=_sign_app_command)


def _sign_app_command(args: argparse.Namespace) -> int:
    out = args.out or (args.consortium / APPROVED_APPS_DIR if args.consortium else None)
    if out is None:
        print("fedmeta sign-app: error: pass --out FOLDER or --consortium CONSORTIUM_FOLDER", file=sys.stderr)
        return 2
    try:
        digest, identity = app_fab_digest(args.app)
        path = sign_approval(digest, key_path=args.key, out_dir=out, overwrite=args.overwrite, **identity)
        copies = _copy_to_site_bundles(path, args.consortium) if args.consortium else []
    except (ApprovalError, ReleaseError, ValueError, FileNotFoundError, FileExistsError, PermissionError) as err:
        print(f"fedmeta sign-app: error: {err}", file=sys.stderr)
        return 1
    print(f"approved {identity['app']} {identity['version']}: FAB sha256 {digest}")
    print(f"  {path}")
    for copy in copies:
        print(f"  {copy}")
    if copies:
        print("Hand each site its bundle's approved-apps/ files; a site's app gate reads new approvals at the next "
              "task, without a restart.")
    return 0


def _copy_to_site_bundles(approval: Path, consortium: Path) -> list[Path]:
    sites = consortium / "sites"
    if not sites.is_dir():
        raise FileNotFoundError(f"--consortium {consortium}: no sites/ folder; pass the `fedmeta provision --out` folder.")
    copies = []
    for bundle in sorted(p for p in sites.iterdir() if (p / "site.json").is_file()):
        target = bundle / APPROVED_APPS_DIR
        target.mkdir(mode=0o755, exist_ok=True)  # never group- or world-writable, whatever the umask
        for source in (approval, approval.with_name(approval.name + SIGNATURE_SUFFIX)):
            shutil.copyfile(source, target / source.name)
        copies.append(target / approval.name)
    return copies
