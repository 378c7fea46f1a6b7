"""spa-prune: structured pruning of ONNX models.

    spa-prune IN.onnx OUT.onnx --ratio 0.5            remove half of the units of every coupled group
    spa-prune IN.onnx OUT.onnx --target-flops 0.5     keep at most 50% of the MACs (global ranking)
    spa-prune analyse IN.onnx                          list coupled groups and frozen channels (dry run)
    spa-prune zoo:resnet18 out.onnx --ratio 0.5        prune a model from the built-in zoo (needs torch)
    spa-prune IN OUT --target-flops 0.5 --importance obspa --calib calib.npz
                                                       OBS scores + least-squares reconstruction, no fine-tuning
    spa-prune make-calib IMAGES_DIR -o calib.npz --size 224    calibration data from a folder of images
    spa-prune IN OUT --policy ppo-gnn --target-flops 0.5 --calib calib.npz --evals 300
                                                       search a per-group allocation (RL or a control), then
                                                       apply + verify it like any other selection
    spa-prune IN OUT --target-flops 0.5 --steps 3 --finetune-data train.npz
                                                       progressive: 3 verified steps, KD fine-tuning between
    spa-prune finetune OUT tuned.onnx --data train.npz --teacher IN    fine-tune (+ distillation), same interface
    spa-prune to-torch OUT out.pt                      a trainable torch module that reproduces OUT
    spa-prune profile IN.onnx -o table.json --batch 8  latency cost table for --target-latency (run it on the
                                                       deployment machine, carry the file)
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import warnings

from ..calib import memory_limit
from ..errors import SpaError, VerificationError, one_line
from .common import Parser, check_number

# subcommand modules, each with add_parser(subparsers) that sets `run`; "prune" is the default command
COMMANDS = {"prune": "prune", "analyse": "analyse", "profile": "profile", "finetune": "finetune",
            "to-torch": "to_torch", "make-calib": "make_calib"}
ALIASES = {"analyze": "analyse"}


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: one argparse parser with a subparser per command. A subcommand whose optional
    dependency is missing (torch, gymnasium) still parses and says what to install when it runs."""
    top = Parser(prog="spa-prune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = top.add_subparsers(dest="command", parser_class=Parser, metavar="COMMAND")
    for command, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(f"{__name__}.{module_name}")
        except ImportError as e:
            _unavailable(subparsers, command, e)
            continue
        module.add_parser(subparsers)
    return top


def command_parser(command: str) -> argparse.ArgumentParser:
    """One subcommand's parser (its --help text, its defaults)."""
    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


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
            args = build_parser().parse_args(with_command(argv))
            args.caught_warnings = caught
            limit = getattr(args, "memory_limit", None)
            check_number("--memory-limit", limit, low=0.0, low_open=True)
            with memory_limit(limit):  # TODO(PruneOptions.memory_limit_gb): a parameter through the driver
                return args.run(args)
        except SpaError as e:
            print(f"spa-prune: error: {one_line(e)}", file=sys.stderr)
            return 2
        except VerificationError as e:
            print(f"spa-prune: verification failed, nothing written: {one_line(e)}", file=sys.stderr)
            return 1
        except MemoryError:
            print("spa-prune: error: out of memory; give a smaller --input-shape / fewer samples, or run on a "
                  "machine with more memory", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            return _interrupted(e)


def _interrupted(e: KeyboardInterrupt) -> int:
    if isinstance(e, Terminated):
        print("spa-prune: terminated, nothing written", file=sys.stderr)
        return 143
    print("spa-prune: interrupted, nothing written", file=sys.stderr)
    return 130
