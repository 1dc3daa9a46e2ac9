"""The `fedmeta` console command: one entry point, one subcommand per job.

Each job lives in its own module and registers its subcommand through `register(subparsers)`;
this file only dispatches, so importing it stays cheap (torch and Flower load inside the handlers).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module path -> the subcommands it registers (for the help text and lazy import).
_COMMAND_MODULES = [
    "simulations.bench",  # fedmeta bench [sim|scaling|comm|meta]
    "simulations.simulate",  # fedmeta simulate
    "simulations.data_commands",  # fedmeta synth, show-sites, check-data
    "simulations.benchmark",  # fedmeta benchmark
    "simulations.evaluate",  # fedmeta evaluate
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
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("fedmeta: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
