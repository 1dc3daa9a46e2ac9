"""The `fedmeta` command table: lazy, yet the same parser the modules' own `register` functions build."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from fedmeta.simulations import cli


def _eager_parser() -> argparse.ArgumentParser:
    """Every command's module imported and registered, in the table's order: what the table stands for."""
    parser = argparse.ArgumentParser(prog="fedmeta", description=cli.build_parser().description)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for target in dict.fromkeys(entry.register for entry in cli.COMMANDS.values()):
        cli._resolve(target)(subparsers)
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def test_the_table_lists_what_the_modules_register_with_the_same_help_and_aliases():
    eager = _eager_parser()
    lazy = cli.build_parser()
    assert lazy.format_help() == eager.format_help()
    # the choices an unknown command's error lists, aliases included, in the same order
    assert list(_subparsers(lazy).choices) == list(_subparsers(eager).choices)


@pytest.mark.parametrize("command", [*cli.COMMANDS, "bench"])
def test_a_selected_command_gets_its_modules_own_parser(command):
    eager = _subparsers(_eager_parser()).choices[command]
    lazy = _subparsers(cli.build_parser(command)).choices[command]
    assert lazy.format_help() == eager.format_help()
    assert lazy.get_default("handler") is eager.get_default("handler") is not None


def _modules_after(argv: list[str]) -> set[str]:
    """The modules a fresh interpreter holds after `fedmeta ARGV` (a --help, which exits)."""
    code = (f"import json, sys\nfrom fedmeta.simulations.cli import main\ntry:\n    main({argv!r})\n"
            "except SystemExit:\n    pass\nprint('MODULES', json.dumps(sorted(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(result.stdout.rsplit("MODULES ", 1)[1]))


def test_fedmeta_help_imports_no_command_module():
    modules = _modules_after(["--help"])
    command_modules = {entry.register.partition(":")[0] for entry in cli.COMMANDS.values()}
    assert not command_modules & modules
    assert not {"torch", "numpy", "flwr"} & modules


def test_a_hospitals_predict_loads_none_of_the_researchers_or_the_coordinators_modules():
    modules = _modules_after(["predict", "--help"])
    assert cli.COMMANDS["predict"].register.partition(":")[0] in modules
    foreign = sorted(m for m in modules if m.startswith(("fedmeta.server", "fedmeta.simulations.experiments",
                                                         "fedmeta.simulations.perf", "fedmeta.simulations.synthetic")))
    assert not foreign


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_no_commands_help_waits_for_torch(command):
    """A command's --help answers without loading torch (about 2-3 s here): heavy imports wait for the work."""
    assert "torch" not in _modules_after([command, "--help"])


def test_a_reader_that_goes_away_ends_the_command_quietly_not_with_a_traceback():
    # `fedmeta benchmark --paired A B | head`: more output than a pipe holds, and the reader stops after a line.
    script = ("import sys\n"
              "from fedmeta.simulations.engines.processes import run_command\n"
              "sys.exit(run_command(lambda: [print('a paired row ' * 8) for _ in range(100_000)] and 0, 'fedmeta'))\n")
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert writer.stdout.readline().startswith(b"a paired row")
    writer.stdout.close()
    _, err = writer.communicate(timeout=60)
    assert writer.returncode == 141, err.decode()
    assert b"Traceback" not in err and b"Broken pipe" not in err, err.decode()
