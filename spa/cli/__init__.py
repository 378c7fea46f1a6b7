"""The spa-prune command line: one argparse parser with a subparser per command (the usage is
`spa.cli.prune.USAGE`, shown by `spa-prune --help`)."""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import warnings

from ..errors import FidelityError, SpaError, VerificationError, one_line
from ..ir import MAPPED
from ..memory import memory_limit
from ..options import check_number
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into the same clean interruption as Ctrl-C (temp files removed, nothing committed)."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    """The spa-prune command. `argv=None` means a real process (the console script, python -m spa.cli): an
    interrupted run then ends with os._exit so that no interpreter shutdown (threading's join, atexit) can print
    a second KeyboardInterrupt traceback or change the exit code. Called with a list (tests, scripts), it only
    returns the exit code and leaves the process's signal handlers as it found them."""
    as_program = argv is None
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    in_main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    rc = 2
    try:
        rc = _main(argv)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM outside the run itself (while parsing, say)
        rc = _interrupted(e)
    finally:
        if in_main_thread:
            if as_program:  # the exit code is decided: no signal may turn it into a traceback at shutdown
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            else:
                signal.signal(signal.SIGTERM, old_term)
    if as_program and rc in (130, 143):
        MAPPED.remove_folder()   # the spill file and the hard links of a mapped model: os._exit runs no atexit
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(rc)
    return rc


def _main(argv: list[str]) -> int:
    # Python warnings (a corrupt image in --calib, numpy's overflow in a criterion, Pillow's decompression-bomb
    # warning) never reach stderr as extra lines: a run that succeeds lists them in its report's "warnings"
    # (and the summary's warning lines, see common.finish); a refused one prints its one error line only.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            argv = with_command(argv)
            args = build_parser(argv[0]).parse_args(argv)
            args.caught_warnings = caught
            limit = getattr(args, "memory_limit", None)
            check_number("--memory-limit", limit, low=0.0, low_open=True)
            with memory_limit(limit):  # every command's data checks (prune's driver sets it from its options too)
                return args.run(args)
        except SpaError as e:
            print(f"spa-prune: error: {one_line(e)}", file=sys.stderr)
            return 2
        except VerificationError as e:
            print(f"spa-prune: verification failed, nothing written: {one_line(e)}", file=sys.stderr)
            return 1
        except FidelityError as e:
            print(f"spa-prune: fidelity guard: {one_line(e)}", file=sys.stderr)
            return 1
        except MemoryError:
            print("spa-prune: error: out of memory; give a smaller --input-shape / fewer samples, or run on a "
                  "machine with more memory", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            return _interrupted(e)
        except ImportError as e:
            # a signal that lands while a C extension initializes (onnxruntime, torch, imported lazily) reaches
            # us as that import's failure, with our interruption as its context
            interruption = _interruption_behind(e)
            if interruption is None:
                raise
            return _interrupted(interruption)


def _interruption_behind(error: BaseException) -> KeyboardInterrupt | None:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _interrupted(e: KeyboardInterrupt) -> int:
    if isinstance(e, Terminated):
        print("spa-prune: terminated, nothing written", file=sys.stderr)
        return 143
    print("spa-prune: interrupted, nothing written", file=sys.stderr)
    return 130
