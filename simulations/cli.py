"""The `fedmeta` console command: one entry point, one subcommand per job, dispatch only.

Each job lives in the room of its audience and registers its subcommands through a
`register(subparsers)` function: what a hospital runs (`fedmeta.client`), what the coordinator runs
(`fedmeta.server.provision`), what a researcher runs (`fedmeta.simulations.experiments`,
`fedmeta.simulations.synthetic`) and what measures performance (`fedmeta.simulations.perf`).

`COMMANDS` names, for every command, the function that registers it and the one line `fedmeta --help`
shows; a command's module is imported only when that command runs (or its own `--help` is asked for), so a
hospital's `fedmeta predict` loads the client's modules and none of the researchers'. torch and Flower load
inside the handlers.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from fedmeta.simulations.engines.processes import run_command


@dataclass(frozen=True)
class Command:
    """Where a subcommand lives and what `fedmeta --help` says of it.

    ``register`` is ``"module:function"``: the function, called with the subparsers, adds the command's
    parser (one function may add several commands, each listed here with the same ``register``).
    ``help`` and ``aliases`` must be the ones that parser is added with (tests/simulations/test_cli.py checks).
    """

    register: str
    help: str
    aliases: tuple[str, ...] = ()


# In the order `fedmeta --help` lists them; the commands one function registers stay together, in its order.
COMMANDS: dict[str, Command] = {
    # a hospital, on its own data
    "check-data": Command("fedmeta.client.commands:register",
                          "list every problem with a site's (or a federation's) data; exit 1 if any"),
    "evaluate": Command("fedmeta.client.commands:register",
                        "adapt a saved initialisation to a site with k labelled slices and report Dice"),
    "import": Command("fedmeta.client.import_commands:register",
                      "write a downloaded public dataset (an MSD task, CHAOS) as a site folder fedmeta reads"),
    # a new hospital adopts the model
    "adapt": Command("fedmeta.client.site_model_commands:register",
                     "adapt the consortium's initialisation to this site with k labelled slices; write a site model"),
    "predict": Command("fedmeta.client.site_model_commands:register",
                       "segment scans with a site model (or a release): one NIfTI mask per scan, in the scan's own "
                       "grid"),
    # a hospital, before it joins
    "doctor": Command("fedmeta.client.doctor:register",
                      "a site's pre-flight check: bundle, key, certificates, SuperLink over TLS, clock, GPU, disk, "
                      "data"),
    # a hospital's IT team, while it takes part
    "site-metrics": Command("fedmeta.client.site_metrics:register",
                            "serve this site's ClientApp metrics (episodes, seconds, device, memory) for Prometheus"),
    "site-keygen": Command("fedmeta.client.site_keys:register",
                           "make this site's own identity key (kept here) and the request the coordinator registers"),
    "site-exec": Command("fedmeta.client.app_gate:register",
                         "this site's app gate: run the ClientApp of consortium-approved app bundles only (beside a "
                         "SuperNode started with --isolation process)"),
    # the coordinator's consortium material
    "provision": Command("fedmeta.server.provision:register",
                         "make (or extend) a consortium's CA, SuperLink certificate and per-site key bundles"),
    "revoke-site": Command("fedmeta.server.provision:register",
                           "retire a site: delete its bundle key, mark it revoked, print the SuperLink unregister "
                           "step"),
    "sign": Command("fedmeta.server.provision:register",
                    "sign a checkpoint as the consortium's release (Ed25519): writes CHECKPOINT.sig and "
                    "CHECKPOINT.release.json"),
    "fleet-proxy-config": Command("fedmeta.server.fleet_proxy:register",
                                  "write the nginx configuration of the Fleet-only proxy in front of the SuperLink "
                                  "(a host without containers)"),
    "sign-app": Command("fedmeta.server.app_release:register",
                        "approve the Flower app a run submits (Ed25519): sites' app gates run no other ClientApp"),
    # the coordinator's operators, while runs go on and between them
    "server-metrics": Command("fedmeta.server.server_metrics:register",
                              "serve every run's last state (round, sites answered and dropped, epsilon, run "
                              "active) for Prometheus, between runs too"),
    # a researcher
    "plan": Command("fedmeta.simulations.plan_command:register",
                    "plan a federation from its sites' fingerprints (spacing, 2D, image size, CT window, labels): "
                    "plan.json + run-config.toml"),
    "simulate": Command("fedmeta.simulations.experiments.simulate:register",
                        "meta-train on the synthetic federation and report new-hospital adaptation"),
    "benchmark": Command("fedmeta.simulations.experiments.benchmark:register",
                         "the new-hospital benchmark: every method, equal budget, k-shot adaptation on held-out "
                         "sites"),
    "variants": Command("fedmeta.simulations.experiments.variants:register",
                        "score every test-time adaptation variant of trained checkpoints on validation sites"),
    "audit-privacy": Command("fedmeta.simulations.experiments.audit_privacy:register",
                             "gradient-inversion attack on a site's reply, with and without DP and secure "
                             "aggregation"),
    "dp-budget": Command("fedmeta.simulations.experiments.audit_privacy:register",
                         "the dp-noise-multiplier that keeps a run within a privacy budget (epsilon at delta)"),
    "synth": Command("fedmeta.simulations.synthetic.federation:register",
                     "generate the synthetic hospital federation (real ICBM152 anatomy, per-site scanners and "
                     "annotators)"),
    "show-sites": Command("fedmeta.simulations.synthetic.federation:register",
                          "draw one slice per site with its label overlay (PNG)"),
    # what measures performance; `perf`, not `bench`: `fedmeta benchmark` is the research benchmark
    "perf": Command("fedmeta.simulations.perf.perf:register",
                    "performance figures (simulation overhead, scaling, communication, meta-step cost, whole-CT "
                    "inference); alias: bench",
                    aliases=("bench",)),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `fedmeta` parser: every command with its one-line help, and `command`'s (a name or an alias) in full.

    Only the module that registers `command` is imported; the other commands are placeholders that carry
    their name, aliases and help, which is all `fedmeta --help` and an unknown command's error show.
    """
    parser = argparse.ArgumentParser(
        prog="fedmeta",
        description="Federated meta-learning of a UNet initialisation for medical image segmentation.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    selected = _by_name().get(command) if command is not None else None
    registered = False
    for name, entry in COMMANDS.items():
        if selected is not None and entry.register == selected.register:
            if not registered:  # the function adds all of its commands, in its order
                _resolve(entry.register)(subparsers)
                registered = True
        else:
            subparsers.add_parser(name, aliases=list(entry.aliases), help=entry.help, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The placeholders parse every argument list as far as the command's name (or print the top-level help,
    # or the error of a missing or unknown command); then the command's own parser parses all of it.
    command = build_parser().parse_known_args(argv)[0].command
    args = build_parser(command).parse_args(argv)
    # SIGTERM/SIGINT stop the command's workers, then its `finally`s and engine exits run: exit 143/130.
    return run_command(lambda: args.handler(args), "fedmeta")


def _by_name() -> dict[str, Command]:
    return {name: entry for primary, entry in COMMANDS.items() for name in (primary, *entry.aliases)}


def _resolve(target: str):
    """The function ``"module:function"`` names (importing the module)."""
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


if __name__ == "__main__":
    sys.exit(main())
