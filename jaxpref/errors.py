"""The errors an operator can fix, and the exit code each command returns for them.

A command prints such an error as one line (the traceback only under ``--verbosity=debug``) and exits with
its class's ``exit_code``, so that a scheduler can tell "fix the input" from "rerun to resume".
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1          # an unexpected error (a bug, or a library failure we do not recognise)
EXIT_CONFIG = 2          # a bad config key, value, file or command-line argument (nothing was started)
EXIT_DIVERGED = 3        # training diverged (non-finite updates in a row); nothing exported
EXIT_IO = 4              # a file or folder could not be read or written (disk full, lock held, corrupt data)
EXIT_PREEMPTED = 75      # EX_TEMPFAIL: stopped by SIGTERM after writing a checkpoint; rerun to resume


class JaxprefError(Exception):
    """An error the operator can fix; its message is the one line the command prints."""

    exit_code = EXIT_FAILED


class ConfigError(JaxprefError, ValueError):
    """A config key holds a value the run cannot use: ``config.<key>=<value>: <what is accepted>``."""

    exit_code = EXIT_CONFIG

    def __init__(self, key: str, value, accepted: str):
        self.key, self.value, self.accepted = key, value, accepted
        super().__init__(f"config.{key}={value!r}: {accepted}")


class UsageError(JaxprefError, ValueError):
    """A command-line argument the command cannot use (a missing --config file, a bad --out)."""

    exit_code = EXIT_CONFIG
