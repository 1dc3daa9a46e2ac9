"""The `fedmeta` console command: one entry point, one subcommand per job, dispatch only.

Each job lives in the room of its audience and registers its subcommands through
`register(subparsers)`: what a hospital runs (`fedmeta.client.commands`), what a researcher runs
(`fedmeta.simulations.experiments`, `fedmeta.simulations.synthetic`) and what measures performance
(`fedmeta.simulations.perf`). Importing this file stays cheap: torch and Flower load inside handlers.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module path -> the subcommands it registers (for the help text and lazy import).
_COMMAND_MODULES = [
    "fedmeta.client.commands",  # fedmeta check-data, evaluate (a hospital, on its own data)
    "fedmeta.client.site_model",  # fedmeta adapt, predict (a new hospital adopts the model)
    "fedmeta.client.doctor",  # fedmeta doctor (a hospital, before it joins)
    "fedmeta.client.site_metrics",  # fedmeta site-metrics (a hospital's IT team, while it takes part)
    "fedmeta.server.provision",  # fedmeta provision, revoke-site (the coordinator's consortium material)
    "fedmeta.simulations.experiments.simulate",  # fedmeta simulate
    "fedmeta.simulations.experiments.benchmark",  # fedmeta benchmark
    "fedmeta.simulations.experiments.audit_privacy",  # fedmeta audit-privacy (the gradient-inversion attack bench)
    "fedmeta.simulations.synthetic.federation",  # fedmeta synth, show-sites
    "fedmeta.simulations.perf.perf",  # fedmeta perf [sim|scaling|comm|meta] (alias: bench)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmeta",
        description="Federated meta-learning of a UNet initialisation for medical image segmentation.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from fedmeta.simulations.engines.processes import run_command

    # SIGTERM/SIGINT stop the command's workers, then its `finally`s and engine exits run: exit 143/130.
    return run_command(lambda: args.handler(args), "fedmeta")


if __name__ == "__main__":
    sys.exit(main())
