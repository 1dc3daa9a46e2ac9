"""`fedmeta doctor`: a site's pre-flight check before it joins the consortium.

One line per check, ``ok`` / ``FAIL`` / ``note``, and for a failure the fix. The checks: the bundle
is complete; the private key is 0600 and is the EC key Flower's SuperNode loads; the release key
(``release.pub``) is the one ``site.json`` pins; the CA certificate
is valid and not about to expire; the SuperLink answers over TLS with a certificate the consortium CA
signed for the name in the bundle, and its clock agrees with ours; the GPU torch sees (a CPU is fine,
only slower); free disk; and, with ``--data``, the site's data (``fedmeta check-data``). The exit
code is 1 when any check fails.
"""

from __future__ import annotations

import argparse
import datetime as dt
import email.utils
import json
import shutil
import socket
import ssl
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

EXPIRY_WARNING_DAYS = 30
MAX_CLOCK_SKEW_S = 60.0  # TLS and Flower's node authentication both rely on timestamps
MIN_FREE_DISK_GIB = 5.0


@dataclass
class Check:
    name: str
    status: str  # ok | FAIL | note
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:4s}  {self.name}: {self.detail}"
        return text + (f"\n      fix: {self.fix}" if self.status == "FAIL" and self.fix else "")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="a site's pre-flight check: bundle, key, certificates, SuperLink over TLS, clock, GPU, disk, data",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--bundle", type=Path, help="the site bundle folder `fedmeta provision` made for this site")
    parser.add_argument("--data", type=Path, help="the site's data folder (as given to the SuperNode's data-dir)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the SuperLink (default 5)")
    parser.set_defaults(handler=_doctor_command)


def _doctor_command(args: argparse.Namespace) -> int:
    if args.bundle is None and args.data is None:
        print("fedmeta doctor: error: give --bundle, --data or both.", file=sys.stderr)
        return 2
    checks = doctor(bundle=args.bundle, data=args.data, timeout=args.timeout)
    for check in checks:
        print(check.line())
    failed = [c for c in checks if c.status == "FAIL"]
    print(f"{len(failed)} of {len(checks)} checks failed" if failed else f"all {len(checks)} checks passed")
    return 1 if failed else 0


def doctor(*, bundle: Path | None = None, data: Path | None = None, timeout: float = 5.0) -> list[Check]:
    checks: list[Check] = []
    if bundle is not None:
        checks += _guarded("bundle", lambda: _bundle_checks(Path(bundle), timeout))
    checks += _guarded("GPU", lambda: [_gpu_check()])
    checks += _guarded("disk", lambda: [_disk_check(Path(data) if data is not None else Path.home())])
    if data is not None:
        checks += _guarded("data", lambda: [_data_check(Path(data))])
    return checks


def _guarded(name: str, run) -> list[Check]:
    """A check that raises is a FAIL line naming the error, never a traceback."""
    try:
        return run()
    except Exception as err:  # noqa: BLE001 - a pre-flight check reports, it does not crash
        return [Check(name, "FAIL", f"could not be checked: {type(err).__name__}: {err}",
                      "fix what the error names (a file's permissions or contents), then run doctor again")]


# --------------------------------------------------------------------------------------------------


def _bundle_checks(bundle: Path, timeout: float) -> list[Check]:
    needed = ("ca.crt", "site.key", "site.json")
    missing = [name for name in needed if not (bundle / name).is_file()]
    if missing:
        return [Check("bundle", "FAIL", f"{bundle} lacks {', '.join(missing)}",
                      "use the folder `fedmeta provision` made for this site (sites/<name>/), unchanged")]
    try:
        info = json.loads((bundle / "site.json").read_text())
        address = str(info["superlink"])
    except (ValueError, KeyError, TypeError) as err:
        return [Check("bundle", "FAIL", f"{bundle / 'site.json'} is not a fedmeta site descriptor ({err})",
                      "ask the coordinator for a fresh bundle")]
    checks = [Check("bundle", "ok", f"site {info.get('site')!r}, SuperLink {address}")]
    checks.append(_key_check(bundle / "site.key"))
    checks.append(_release_key_check(bundle, info))
    ca_check, ca = _ca_check(bundle / "ca.crt")
    checks.append(ca_check)
    if ca is not None:
        checks += _superlink_checks(address, bundle / "ca.crt", timeout)
        passed = {check.name for check in checks if check.status != "FAIL"}
        if {"private key", "SuperLink over TLS", "clock"} <= passed:  # a key Flower loads, a SuperLink that answers
            checks.extend(_guarded("site key registered",
                                   lambda: [_registration_check(address, bundle / "ca.crt", bundle / "site.key", timeout)]))
    return checks


def _registration_check(address: str, ca_path: Path, key_path: Path, timeout: float) -> Check:
    """Whether the SuperLink admits this site's key: Flower's own node activation, undone at once.

    A SuperNode whose key the SuperLink does not know exits with "Failed to activate SuperNode" (exit code 305)
    and nothing that says why; this asks the same question before it starts. The node is online for the few
    milliseconds between activation and deactivation, which a running round may notice as one site that left.
    """
    import httpx
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL
    from flwr.proto.fleet_pb2 import ActivateNodeRequest, DeactivateNodeRequest  # pylint: disable=E0611
    from flwr.supercore.error import FlowerError
    from flwr.supercore.error.base import ApiErrorCode
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    private_key = load_ssh_private_key(key_path.read_bytes(), None)
    public_key = private_key.public_key()
    with FleetHttpClient.from_server_address(
        address, False, str(ca_path),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperNode"),
                      NodeAuthHttpInterceptor(private_key, public_key)],
    ) as client:
        if isinstance(getattr(client, "_client", None), httpx.Client):  # Flower's default waits 30 s per call
            client._client.timeout = httpx.Timeout(timeout)
        try:
            response = client.ActivateNode(ActivateNodeRequest(public_key=public_key_to_bytes(public_key),
                                                               heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL))
        except httpx.HTTPStatusError as err:
            error = FlowerError.from_json(err.response.text)
            if error is not None and error.code == ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED:
                return Check("site key registered", "FAIL",
                             f"the SuperLink at {address} does not admit this site's key (not registered, revoked, or a "
                             "SuperNode with this key is already online)",
                             f"send {key_path.with_name('site.pub')} to the coordinator to register (register-sites.sh / "
                             "`flwr supernode register site.pub`); stop a SuperNode already running with this key")
            if error is None:  # not a Flower SuperLink's answer (another server, or a proxy that refuses the path)
                return Check("site key registered", "note",
                             f"{address} did not answer Flower's node activation (HTTP {err.response.status_code}): "
                             "registration not checked")
            return Check("site key registered", "FAIL", f"the SuperLink refused the check ([code {error.code}] "
                         f"{error.message})", "ask the coordinator; the SuperLink's log names the reason")
        except httpx.HTTPError as err:
            return Check("site key registered", "FAIL", f"cannot ask {address} ({err})",
                         "check the coordinator is up and that this network may reach its port")
        try:
            client.DeactivateNode(DeactivateNodeRequest(node_id=response.node_id))
        except httpx.HTTPError:
            pass  # the SuperLink marks it offline after a missed heartbeat anyway
    return Check("site key registered", "ok", f"the SuperLink admits this site's key (node {response.node_id})")


def _key_check(path: Path) -> Check:
    # cryptography: +11 ms here, +18 ms for x509 (_ca_check) on `fedmeta doctor --help` (python -X importtime).
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key  # as ec above

    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return Check("private key", "FAIL", f"{path} is readable by others (mode {mode:o})", f"chmod 600 {path}")
    try:
        key = load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError) as err:
        return Check("private key", "FAIL", f"{path} is not an OpenSSH private key ({err})", "restore it from the bundle")
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return Check("private key", "FAIL", f"{path} is not an EC key", "restore it from the bundle")
    public = path.with_name("site.pub")
    if public.is_file():  # a site that keeps its own key copies the coordinator's bundle beside it: the two must pair
        from cryptography.hazmat.primitives.serialization import load_ssh_public_key

        try:
            paired = load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()
        except (ValueError, TypeError, AttributeError):
            paired = False
        if not paired:
            return Check("private key", "FAIL", f"{path} is not the key of {public} (the key the coordinator registers)",
                         "keep your own site.key and the coordinator's bundle made from your request; do not mix bundles")
    return Check("private key", "ok", f"EC {key.curve.name}, mode 600" + (", pairs with site.pub" if public.is_file() else ""))


def _release_key_check(bundle: Path, info: dict) -> Check:
    """The bundle's release.pub is the key its site.json pins (``fedmeta provision`` writes both): adapt, evaluate
    and predict verify releases with it, so a swapped file would make a forger's checkpoint pass."""
    # fedmeta.common.release loads cryptography: +17 ms on `fedmeta doctor --help` (python -X importtime).
    from fedmeta.common.release import ReleaseError, key_fingerprint, load_public_key

    path, pinned = bundle / "release.pub", info.get("release_key_sha256")
    if not pinned:
        return Check("release key", "FAIL", f"{bundle / 'site.json'} pins no release key fingerprint "
                     "(release_key_sha256), so release.pub cannot be told from a substitute",
                     "ask the coordinator for a fresh bundle (fedmeta provision writes the pin)")
    if not path.is_file():
        return Check("release key", "FAIL", f"{bundle} lacks release.pub, the consortium's key releases are verified "
                     "with", "restore release.pub from the bundle the coordinator sent")
    try:
        fingerprint = key_fingerprint(load_public_key(path))
    except ReleaseError as err:
        return Check("release key", "FAIL", str(err), "restore release.pub from the bundle the coordinator sent")
    if fingerprint != pinned:
        return Check("release key", "FAIL", f"{path} has fingerprint {fingerprint[:16]}..., not the "
                     f"{str(pinned)[:16]}... that site.json pins: the file was replaced, and releases signed by "
                     "whoever holds its private key would pass", "restore release.pub from the bundle the coordinator "
                     "sent, and compare its fingerprint with the one the consortium publishes")
    return Check("release key", "ok", f"release.pub is the pinned key, sha256 {fingerprint} (compare it with the "
                 "fingerprint the consortium publishes)")


def _ca_check(path: Path):
    from cryptography import x509  # +18 ms on `fedmeta doctor --help`: see _key_check

    try:
        ca = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as err:
        return Check("CA certificate", "FAIL", f"{path} is not a PEM certificate ({err})", "restore it from the bundle"), None
    now = dt.datetime.now(dt.timezone.utc)
    left = (ca.not_valid_after_utc - now).days
    if now < ca.not_valid_before_utc or left < 0:
        return Check("CA certificate", "FAIL", f"not valid now (valid {ca.not_valid_before_utc:%Y-%m-%d} to "
                     f"{ca.not_valid_after_utc:%Y-%m-%d})", "check this machine's clock, or ask for a new bundle"), None
    status = "note" if left < EXPIRY_WARNING_DAYS else "ok"
    return Check("CA certificate", status, f"expires {ca.not_valid_after_utc:%Y-%m-%d} ({left} days)"), ca


def _superlink_checks(address: str, ca_path: Path, timeout: float) -> list[Check]:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    context = ssl.create_default_context(cafile=str(ca_path))
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                certificate = tls.getpeercert()
                try:  # any HTTP reply carries the server's Date; a server that answers none is no failure
                    tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                    tls.settimeout(timeout)
                    head = tls.recv(4096).decode("latin-1", errors="replace")
                except OSError:
                    head = ""
    except ssl.SSLCertVerificationError as err:
        return [Check("SuperLink over TLS", "FAIL", f"{address} presented a certificate the consortium CA does not "
                      f"vouch for ({err.verify_message})", "check the address in site.json, or ask the coordinator")]
    except (OSError, ValueError) as err:
        return [Check("SuperLink over TLS", "FAIL", f"cannot reach {address} ({err})",
                      "check the coordinator is up and that this network may reach its port")]
    expires = dt.datetime.strptime(certificate["notAfter"], "%b %d %H:%M:%S %Y %Z").replace(tzinfo=dt.timezone.utc)
    checks = [Check("SuperLink over TLS", "ok", f"{address}, certificate verified, expires {expires:%Y-%m-%d}")]
    date = next((line.split(":", 1)[1].strip() for line in head.splitlines() if line.lower().startswith("date:")), None)
    if date is None:
        checks.append(Check("clock", "note", "the SuperLink sent no Date header; clock skew not measured"))
    else:
        skew = (dt.datetime.now(dt.timezone.utc) - email.utils.parsedate_to_datetime(date)).total_seconds()
        status = "ok" if abs(skew) <= MAX_CLOCK_SKEW_S else "FAIL"
        checks.append(Check("clock", status, f"{skew:+.0f} s against the SuperLink",
                            "synchronise this machine's clock (NTP)"))
    return checks


def _gpu_check() -> Check:
    import torch  # +0.75 s on `fedmeta doctor --help` (python -X importtime)

    if not torch.cuda.is_available():
        return Check("GPU", "note", f"none visible to torch {torch.__version__}: the site trains on the CPU (slower); "
                     "a CUDA site installs torch's CUDA build (README, GPU sites)")
    props = torch.cuda.get_device_properties(0)
    return Check("GPU", "ok", f"{props.name}, {props.total_memory / 2**30:.1f} GiB")


def _disk_check(path: Path) -> Check:
    free = shutil.disk_usage(path if path.exists() else Path.home()).free / 2**30
    status = "ok" if free >= MIN_FREE_DISK_GIB else "FAIL"
    return Check("disk", status, f"{free:.1f} GiB free at {path}", f"free at least {MIN_FREE_DISK_GIB:.0f} GiB")


def _data_check(path: Path) -> Check:
    from fedmeta.common.validate import ReadLimits, check_path  # numpy: +45-85 ms on `fedmeta doctor --help`

    try:
        reports = check_path(path, limits=ReadLimits.from_environment())  # a bad FEDMETA_MAX_VOXELS: this check fails
    except (ValueError, FileNotFoundError, OSError) as err:
        return Check("data", "FAIL", str(err), f"run `fedmeta check-data {path}` and fix what it lists")
    bad = [r for r in reports if not r.ok]
    valid = sum(r.num_valid for r in reports)
    if bad:
        return Check("data", "FAIL", f"{len(bad)} of {len(reports)} site folder(s) have problems",
                     f"run `fedmeta check-data {path}` and fix what it lists")
    return Check("data", "ok", f"{valid} valid case(s) in {len(reports)} site folder(s)")


__all__ = ["Check", "doctor", "register"]
