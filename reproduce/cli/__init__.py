"""``python -m reproduce COMMAND``: one module of this package per command.

A command is a module that registers a ``Command`` (its name, one line of help, its options and the
function that runs it) in ``COMMANDS``; ``main`` builds the parser from the registry, so adding a command
is adding a file. Modules import nothing heavy at the top (torch, the trackers, Optuna): ``--help``
builds every command's parser, and it must stay instant. A ``UserError`` (a bad key, a missing file the
user named) is printed as one line, ``error: ...``, with exit code 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

from reproduce.errors import UserError
from reproduce.registry import Registry


@dataclass(frozen=True)
class Command:
    name: str
    help: str  # one line in `python -m reproduce --help`
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]  # the exit code
    description: str | None = None  # the command's own --help text (default: help); its module's docstring


def plain(doc: str) -> str:
    """A command module's docstring as --help text, without its opening "``python -m reproduce X``: "."""
    text = re.sub(r"^``[^`]*``:\s*", "", doc.strip())
    return text[:1].upper() + text[1:]


COMMANDS: Registry[Command] = Registry("command", "reproduce.cli")
DESCRIPTION = ("The library's commands: prepare a dataset, train one method, run a paper's recipe, list the methods. "
               "The DVC pipeline runs them through `dvc repro`; sweeps and the report are `python -m sweeps` and "
               "`python -m analysis`.")


def params_options(parser: argparse.ArgumentParser, example: str = "recipe.epochs=5") -> None:
    """``--params FILE`` and repeatable ``--set KEY=VALUE``, as every command that reads params.yaml takes them."""
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a parameter, e.g. --set {example} (repeatable; the value is YAML)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduce", description=DESCRIPTION,
                                     epilog="`python -m reproduce COMMAND --help` describes a command.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        description = plain(command.description or command.help)
        command.add_arguments(commands.add_parser(name, help=command.help, description=description,
                                                  formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    from reproduce.numerics import pin_cpu_numerics

    pin_cpu_numerics()  # before torch loads: the same CPU numbers on every x86-64 machine
    return run_reporting_errors(COMMANDS.get(args.command).run, args)


def run_reporting_errors(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``run(args)``, with the errors a user fixes (their parameters, the files they named) as one line on
    stderr and exit code 2."""
    try:
        return run(args)
    except (UserError, FileNotFoundError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
