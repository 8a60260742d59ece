"""What a jaxpref command prints: its own progress lines, each failure the operator can fix as one line with a
documented exit code (``jaxpref.errors``), and no third-party log lines unless ``--verbosity`` asks for them.

Every command starts through ``run`` (``train``, ``evaluate``, ``export``, ``aot``, ``fetch``) or, parsing its own
arguments, ``run_argparse`` (the data builders, ``jaxpref.world.train_base``):

  --verbosity unset     our lines only; libraries at ERROR; XLA's C++ log at FATAL (its "Very slow compile?"
                        alarm is an ERROR-level log of a compile that is merely long)
  --verbosity=info|0    the libraries' INFO lines too (absl, orbax, XLA)
  --verbosity=debug|1   and a failure prints its traceback
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback

from jaxpref import errors

_LEVEL_NAMES = {"debug": "1", "info": "0", "warning": "-1", "error": "-2", "fatal": "-3"}


def verbosity_requested(argv) -> str | None:
    """The value of ``--verbosity`` / ``-v`` in ``argv`` (None when unset)."""
    for i, arg in enumerate(argv):
        for name in ("--verbosity", "-v"):
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
    return None


def quiet_native_logs(argv=None):
    """Before jax is imported by a command's ``__main__``: XLA's C++ log (read once, at its first line) shows
    only fatal errors unless ``--verbosity`` is given; transformers' advisory warnings (PyTorch missing) off."""
    argv = sys.argv if argv is None else argv
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if verbosity_requested(argv) is None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def _normalise_verbosity(argv):
    """absl's --verbosity takes an integer; ours also takes debug / info / warning / error."""
    out = []
    for arg in argv:
        for name in ("--verbosity=", "-v="):
            if arg.startswith(name) and arg[len(name):].lower() in _LEVEL_NAMES:
                arg = name + _LEVEL_NAMES[arg[len(name):].lower()]
        out.append(arg)
    return out


def debug_requested() -> bool:
    from absl import flags
    f = flags.FLAGS
    return "verbosity" in f and f["verbosity"].present and f.verbosity >= 1


def quiet_python_logs():
    """absl (and through it tfds, orbax, grain) and Python's root logger at ERROR unless --verbosity is set;
    absl's app raises an unset --verbosity to INFO after parsing, so this runs inside main."""
    import logging as py_logging

    from absl import flags, logging
    if "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present:
        return
    logging.set_verbosity(logging.ERROR)
    py_logging.getLogger().setLevel(py_logging.ERROR)
    # A failure in a library's own thread or task (orbax's async save) is re-raised in the main thread, which
    # reports it as one line; its own traceback there is noise.
    py_logging.getLogger("asyncio").setLevel(py_logging.CRITICAL)
    threading.excepthook = _quiet_thread_failure
    for name in ("orbax", "jax", "tensorflow_datasets", "grain", "absl", "huggingface_hub", "transformers"):
        py_logging.getLogger(name).setLevel(py_logging.ERROR)
    _quiet_progress_bars()


def _quiet_thread_failure(args):
    if debug_requested():
        traceback.print_exception(args.exc_value)


def _quiet_progress_bars():
    """tfds's generation bars and per-file lines: our own phase lines say what is being built."""
    try:
        import tensorflow_datasets as tfds
        tfds.disable_progress_bar()
    except Exception:  # noqa: BLE001 - optional quieting only
        pass


def is_main_process() -> bool:
    import jax
    return jax.process_index() == 0


def say(message: str):
    """A line for the person at the console (process 0 only)."""
    if is_main_process():
        print(message, flush=True)


def warn(message: str):
    """A warning of ours (process 0, stderr), shown at every verbosity."""
    if is_main_process():
        print(f"warning: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def phase(what: str, *, announce: bool = True):
    """Announces a phase ("what ...") and ends it with its duration ("what: done in 12.3s")."""
    if announce:
        say(f"{what} ...")
    start = time.perf_counter()
    yield
    say(f"{what}: done in {time.perf_counter() - start:.1f}s")


ONE_LINE_MAX = 300  # characters: a library's message (e.g. one listing a checkpoint's files) stays a line


def one_line(error: BaseException) -> str:
    """An error's message on one line (the first line, cut at ``ONE_LINE_MAX`` characters, with its type where
    it is not ours)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if len(text) > ONE_LINE_MAX:
        text = text[:ONE_LINE_MAX - 3] + "..."
    if isinstance(error, errors.JaxprefError) or isinstance(error, ValueError):
        return text
    return f"{type(error).__name__}: {text}"


def exit_code(error: BaseException) -> int:
    if isinstance(error, errors.JaxprefError):
        return error.exit_code
    if isinstance(error, ValueError):        # our input checks raise ValueError naming the key, file or row
        return errors.EXIT_CONFIG
    if isinstance(error, OSError):           # disk full, permission, missing file
        return errors.EXIT_IO
    return errors.EXIT_FAILED


def report_failure(command: str, error: BaseException) -> int:
    """Prints a failure as one line (plus the traceback under --verbosity=debug); returns its exit code."""
    if debug_requested():
        traceback.print_exception(error)
    hint = "" if debug_requested() else " (--verbosity=debug shows the traceback)"
    unexpected = exit_code(error) == errors.EXIT_FAILED
    print(f"{command}: {one_line(error)}{hint if unexpected else ''}", file=sys.stderr, flush=True)
    return exit_code(error)


def exit_on_flag_error(command: str, argv, error: BaseException, explain=None):
    """A command line the parser refused: one line (the traceback too under --verbosity=debug), exit 2."""
    line = (explain(argv, error) if explain else None) or one_line(error)
    if verbosity_requested(argv) in ("1", "debug"):
        traceback.print_exception(error)
    print(f"{command}: {line}", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_CONFIG)


_HELP_FLAGS = ("-?", "-h", "--help", "--helpshort", "--helpfull", "--helpxml")


def _asks_for_help(argv) -> bool:
    return any(a.split("=", 1)[0] in _HELP_FLAGS for a in argv[1:])


def run(main, command: str, *, explain_flag_error=None):
    """``absl.app.run(main)`` with our flag parsing (one-line errors, --verbosity=debug) and failure report.

    ``explain_flag_error(argv, error) -> str | None``: a clearer line for a flag the parser refused (e.g. a
    mistyped ``--config.`` key).
    """
    from absl import app, flags

    def parse(argv):
        argv = _normalise_verbosity(argv)
        try:
            return flags.FLAGS(argv)
        except SystemExit as e:  # absl prints --help's usage, then exits 1: asking for help is no failure
            if e.code == 1 and _asks_for_help(argv):
                sys.exit(errors.EXIT_OK)
            raise
        except Exception as e:  # noqa: BLE001 - every parse failure becomes one line
            exit_on_flag_error(command, argv, e, explain_flag_error)

    app.run(_guarded(main, command), flags_parser=parse)


def run_argparse(main, command: str):
    """``run`` for a command whose ``main(argv)`` parses its own arguments with argparse (the data builders):
    ``--verbosity`` is taken out of the command line first and means what it means for every command."""
    from absl import app, flags

    def parse(argv):
        ours, rest = _split_verbosity(argv[1:])
        flags.FLAGS(_normalise_verbosity([argv[0], *ours]))
        return [argv[0], *rest]

    def exit_status(argv):   # what main returns (train_base: its summary) is no exit status
        status = guarded(argv[1:])
        return status if isinstance(status, int) else None

    quiet_native_logs()
    guarded = _guarded(main, command)
    app.run(exit_status, flags_parser=parse)


def _split_verbosity(args) -> tuple[list, list]:
    """(the --verbosity / -v arguments, the others) of a command line."""
    ours, rest, i = [], [], 0
    while i < len(args):
        name = args[i].split("=", 1)[0]
        if name in ("--verbosity", "-v"):
            take = 1 if "=" in args[i] or i + 1 >= len(args) else 2
            ours.append("=".join(args[i:i + take]))
            i += take
        else:
            rest.append(args[i])
            i += 1
    return ours, rest


def _guarded(main, command: str):
    """``main`` with library logs quiet and every failure reported as one line with its exit code."""
    from absl import app

    def guarded(argv):
        quiet_python_logs()
        try:
            return main(argv)
        except app.UsageError:
            raise
        except KeyboardInterrupt:
            print(f"{command}: interrupted", file=sys.stderr, flush=True)
            return 130
        except Exception as e:  # noqa: BLE001 - every failure is reported as one line with its exit code
            return report_failure(command, e)

    return guarded
