"""What every entry point (train.py, sample.py, sample_ddp.py, extract_features.py, dit_fast.demo)
does with bad input: one line on stderr, ``<prog>: error: <what was wrong; what to do>``, exit code 2,
no traceback, and nothing created (each entry point validates before its first side effect).

    parser = OneLineParser(prog="train.py", ...)   # argparse, but its errors are one line too
    sys.exit(run_entry(main, "train.py", argv))    # library errors -> one line, exit 2

Bugs (any other exception type) still raise with their traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Callable

USAGE_ERROR = 2  # argparse's and the shell's convention for "bad command line"


class OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error (its own usage block is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input (a flag, a file, a folder, a missing optional package:
    our ImportErrors name the extra to install), not a bug."""
    from .checkpoint import CheckpointError
    from .distributed import RemoteError
    from .vae import VAEError
    return (ValueError, OSError, ImportError, CheckpointError, VAEError, RemoteError)


def one_line(err: BaseException) -> str:
    """The message on one line (multi-line library messages are joined with '; ')."""
    text = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def run_entry(main: Callable, prog: str, argv=None, extra: tuple = ()) -> int:
    """``main(argv)``; bad input (``user_errors()`` and ``extra``) becomes one line on stderr and
    exit code 2. Returns the exit code (0, or main's own int result)."""
    try:
        result = main(argv)
    except user_errors() + tuple(extra) as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return USAGE_ERROR
    return result if isinstance(result, int) else 0



class flag_named(contextlib.AbstractContextManager):  # noqa: N801 (used as a function: with flag_named(...))
    """Bad input met inside (ValueError / OSError) is re-raised as one ValueError naming ``flag``."""

    def __init__(self, flag: str):
        self.flag = flag

    def __exit__(self, kind, err, traceback):
        if isinstance(err, (OSError, ValueError)):
            raise ValueError(f"{self.flag}: {one_line(err)}") from err
        return False
