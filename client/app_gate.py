"""A site's app gate: its SuperNode runs the ClientApp of consortium-approved app bundles, and of no other.

Flower 1.41 runs at every SuperNode the ClientApp of whatever app bundle (FAB) a run was submitted with, and
the open-source SuperLink has no account check on who submits (``flower-supernode --trusted-entities``
verifies only apps fetched from Flower's Hub: a FAB ``flwr run`` uploads carries no verification and is
refused outright). So the site's start script runs its SuperNode with ``--isolation process`` — the
SuperNode then starts no app process itself — and beside it this gate, ``fedmeta site-exec``: Flower's own
SuperExec loop (``flwr.supercore.superexec.run_superexec``, which takes the SuperNode's tasks from its local
Runtime API) with a plugin that takes ClientApp tasks only, and starts each ClientApp process through
:func:`main` here, which checks the bytes of the run's FAB against the approved digests
(``fedmeta.common.app_approval``: signed by the consortium's release key, in the bundle's
``approved-apps/``) before Flower unpacks it. A FAB that is not approved is never unpacked, so none of its
code runs; the process answers the ServerApp with an error reply that says so (the run sees the site
refuse at once rather than time out), and the gate logs the refusal with the digest.

Two checks, deliberately: the task's ``fab_hash`` (what the SuperLink says) is checked when the task is
taken, for the log; the FAB's bytes (what would run) in the ClientApp process, which is the one that
counts.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

from fedmeta.common.app_approval import ApprovalError, load_approvals
from fedmeta.common.release import ReleaseError

APPROVED_DIGESTS_ENV = "FEDMETA_APPROVED_FAB_SHA256"  # the gate -> its ClientApp processes, comma-separated


class AppNotApproved(RuntimeError):
    """The run's app bundle is not one the consortium approved: its ClientApp is not started here."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "site-exec",
        help="this site's app gate: run the ClientApp of consortium-approved app bundles only (beside a "
             "SuperNode started with --isolation process)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--runtime-api-address", default="127.0.0.1:9094",
                        help="the SuperNode's local Runtime API, host:port (its --port; default 127.0.0.1:9094)")
    parser.add_argument("--approved-apps", type=Path, required=True,
                        help="folder of the consortium's signed app approvals (the bundle's approved-apps/)")
    parser.add_argument("--public-key", type=Path, required=True,
                        help="the consortium's release key the approvals are signed with (the bundle's release.pub)")
    parser.add_argument("--superexec-auth-secret-file", type=Path, required=True,
                        help="the secret this gate and the SuperNode share (the SuperNode's own "
                             "--superexec-auth-secret-file): without it any local process could take the site's tasks "
                             "from the Runtime API and run an unapproved app; start-site.sh makes one per site")
    parser.add_argument("--health-server-address", default=None,
                        help="serve gRPC health checks on host:port (for container probes)")
    parser.set_defaults(handler=_site_exec_command)


def _site_exec_command(args: argparse.Namespace) -> int:
    host = args.runtime_api_address.rpartition(":")[0].strip("[]")
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"fedmeta site-exec: error: --runtime-api-address {args.runtime_api_address} is not on loopback; the "
              "SuperNode's Runtime API is plain HTTP and must stay on this host (127.0.0.1:PORT).", file=sys.stderr)
        return 2
    from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret

    try:
        approvals = load_approvals(args.approved_apps, args.public_key)
        secret = load_superexec_auth_secret(str(args.superexec_auth_secret_file))
    except (ApprovalError, ReleaseError) as err:
        print(f"fedmeta site-exec: error: {err}", file=sys.stderr)
        return 1
    except ValueError as err:  # Flower's loader: unreadable or empty
        print(f"fedmeta site-exec: error: --superexec-auth-secret-file: {err}; give the file the SuperNode was "
              "started with (start-site.sh makes superexec.secret beside itself).", file=sys.stderr)
        return 1
    for name, reason in approvals.rejected.items():
        print(f"fedmeta site-exec: ignoring {name}: {reason}", file=sys.stderr)
    listed = ", ".join(f"{s.get('app')} {s.get('version')} ({d[:16]})" for d, s in approvals.digests.items()) or "none yet"
    print(f"fedmeta site-exec: running the ClientApp of approved apps only: {listed}; taking tasks from "
          f"{args.runtime_api_address}", file=sys.stderr, flush=True)
    run_gate(args.runtime_api_address, args.approved_apps, args.public_key, superexec_auth_secret=secret,
             health_server_address=args.health_server_address)
    return 0


def run_gate(runtime_api_address: str, approved_apps: Path, public_key: Path, *, superexec_auth_secret: bytes,
             health_server_address: str | None = None) -> None:
    """Flower's SuperExec loop with the gated plugin; returns only when the process is told to stop."""
    from flwr.supercore.constant import ExecutorType
    from flwr.supercore.superexec import run_superexec as superexec

    if not hasattr(superexec, "AutoExecPlugin"):  # fail closed if Flower moves the plugin we replace
        raise RuntimeError("this Flower release's SuperExec has no AutoExecPlugin to replace: fedmeta site-exec "
                           "cannot gate it; install the flwr release fedmeta pins (flwr==1.41.*).")
    superexec.AutoExecPlugin = gated_plugin(Path(approved_apps), Path(public_key))
    # The shared secret signs the gate's AcquireTask calls: the SuperNode hands its tasks to no other process.
    superexec.run_superexec(runtime_api_address=runtime_api_address, insecure=True,
                            superexec_auth_secret=superexec_auth_secret,
                            health_server_address=health_server_address, runtime_dependency_install=False,
                            executor_type=ExecutorType.SUBPROCESS)


def gated_plugin(approved_apps: Path, public_key: Path) -> type:
    """A SuperExec plugin that takes ClientApp tasks only and starts them through this module's :func:`main`."""
    import subprocess

    from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import LaunchResult
    from flwr.supercore.superexec.plugin.base_exec_plugin import BaseExecPlugin

    class GatedClientAppPlugin(BaseExecPlugin):
        supported_task_types = frozenset({TaskType.CLIENT_APP})
        visible_output_task_types = frozenset({TaskType.CLIENT_APP})
        announced: set[int] = set()  # runs whose first task was logged

        def launch_task(self, token: str, task: Task) -> LaunchResult:
            if self._get_supported_task_type(task) is None:
                return LaunchResult.failed(f"fedmeta site-exec runs ClientApp tasks only, not task type {task.type!r}")
            try:
                approvals = load_approvals(approved_apps, public_key)  # re-read: new approvals need no restart
                digests = sorted(approvals.digests)
            except (ApprovalError, ReleaseError) as err:
                print(f"fedmeta site-exec: {err}; refusing every app until it is fixed", file=sys.stderr)
                digests = []
            if task.fab_hash not in digests:
                print(f"fedmeta site-exec: REFUSED run {task.run_id}: its app bundle (FAB sha256 {task.fab_hash}) is "
                      f"not approved by the consortium ({len(digests)} approved in {approved_apps}); none of its "
                      "code runs here, the ServerApp gets an error reply", file=sys.stderr, flush=True)
            elif task.run_id not in self.announced:
                self.announced.add(task.run_id)
                print(f"fedmeta site-exec: run {task.run_id}: approved app bundle {task.fab_hash[:16]}; starting its "
                      "ClientApps", file=sys.stderr, flush=True)
            args = [sys.executable, "-m", "fedmeta.client.app_gate", "--runtime-api-address",
                    self.runtime_api_address, "--token", token, "--insecure", "--parent-pid", str(os.getpid())]
            # The ClientApp process checks the FAB's bytes itself (main): it refuses a task the check above let
            # through if the SuperLink's fab_hash was not the hash of what it sent.
            env = dict(os.environ, **{APPROVED_DIGESTS_ENV: ",".join(digests)})
            # As Flower's own executor: not waited for (it exits with this gate, --parent-pid; subprocess reaps
            # the finished ones at the next launch).
            subprocess.Popen(args, env=env)  # noqa: S603 - fixed argv, no shell
            return LaunchResult.accepted()

    return GatedClientAppPlugin


def install_only_approved(install, approved: set[str]):
    """``install`` (Flower's install_from_fab), refusing a FAB whose bytes are not an approved digest."""

    def install_approved(fab_file, *args, **kwargs):
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        digest = hashlib.sha256(content).hexdigest()
        if digest not in approved:
            raise AppNotApproved(f"this site runs consortium-approved apps only; app bundle sha256 {digest} is not "
                                 "approved (fedmeta sign-app, the site's approved-apps/)")
        return install(fab_file, *args, **kwargs)

    return install_approved


def main(argv: list[str] | None = None) -> None:
    """A ClientApp process (``flwr-clientapp``'s arguments) that unpacks only an approved app bundle."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    approved = {d for d in os.environ.get(APPROVED_DIGESTS_ENV, "").split(",") if d}
    if not hasattr(runtime, "install_from_fab"):  # fail closed: without the check no FAB may be unpacked
        raise SystemExit("fedmeta site-exec: this Flower release's ClientApp runtime has no install_from_fab to "
                         "check; refusing to run any app (install flwr==1.41.*).")
    runtime.install_from_fab = install_only_approved(runtime.install_from_fab, approved)
    sys.argv = ["flwr-clientapp", *(sys.argv[1:] if argv is None else argv)]
    flwr_clientapp()


if __name__ == "__main__":
    main()
