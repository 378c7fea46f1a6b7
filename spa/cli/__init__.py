"""The spa-prune command line: one argparse parser with a subparser per command (the usage is
`spa.cli.prune.USAGE`, shown by `spa-prune --help`)."""
from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import SpaError, VerificationError
from .common import Parser
from .prune import USAGE

# subcommand modules, each with add_parser(subparsers) that sets `run`; "prune" is the default command
COMMANDS = {"prune": "prune", "analyse": "analyse", "profile": "profile", "finetune": "finetune",
            "to-torch": "to_torch", "make-calib": "make_calib"}
ALIASES = {"analyze": "analyse"}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line: one argparse parser with a subparser per command. With `only`, the other
    commands are registered by name but not configured: the command that runs does not pay for importing the
    others' modules at start-up. A subcommand whose optional dependency is missing (torch, gymnasium) still
    parses and says what to install when it runs."""
    top = Parser(prog="spa-prune", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = top.add_subparsers(dest="command", parser_class=Parser, metavar="COMMAND")
    for command, module_name in COMMANDS.items():
        if only is not None and command != only:
            subparsers.add_parser(command)
            continue
        try:
            module = importlib.import_module(f"{__name__}.{module_name}")
        except ImportError as e:
            _unavailable(subparsers, command, e)
            continue
        module.add_parser(subparsers)
    return top


def command_parser(command: str) -> argparse.ArgumentParser:
    """One subcommand's parser (its --help text, its defaults)."""
    parser = build_parser(command)
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def _unavailable(subparsers, command: str, error: ImportError) -> None:
    p = subparsers.add_parser(command, add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)

    def run(args) -> int:
        raise SpaError(f"'{command}' needs an optional dependency that is not installed ({error}); "
                       f"pip install 'spa-prune[test]' brings them all")

    p.set_defaults(run=run)


def with_command(argv: list[str]) -> list[str]:
    """`spa-prune IN OUT ...` is `spa-prune prune IN OUT ...`: the first word picks a command only when it
    names one."""
    if argv and argv[0] in ALIASES:
        return [ALIASES[argv[0]], *argv[1:]]
    if argv and argv[0] in COMMANDS:
        return argv
    return ["prune", *argv]


def main(argv=None) -> int:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    try:
        argv = with_command(argv)
        args = build_parser(argv[0]).parse_args(argv)
        return args.run(args)
    except SpaError as e:
        print(f"spa-prune: error: {e}", file=sys.stderr)
        return 2
    except VerificationError as e:
        print(f"spa-prune: verification failed, nothing written: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("spa-prune: interrupted, nothing written", file=sys.stderr)
        return 130
