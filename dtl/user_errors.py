"""One base for every error meant for the user, and how an entry point prints it.

Anything derived from `DtlError` is the user's to fix (a config key, a shard, a checkpoint, a
model name): both entry points (`dtl ...` and `dtl/train.py`) print it as one line and exit 2.
Anything else is a bug in dtl and keeps its traceback.
"""
from __future__ import annotations

import re
import sys
import warnings

EXIT_USER_ERROR = 2

_WORKER_TRACEBACK = re.compile(r"Caught \w+ in DataLoader worker process \d+\.")
_QUALIFIED = re.compile(r"^(?:[\w.]+\.)?\w+(?:Error|Exception): ")


_python_format = warnings.formatwarning


class DtlWarning(UserWarning):
    """dtl's own advice to the user (a UserWarning, so filters and `pytest.warns` treat it as one)."""


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """dtl's own warnings read `dtl: warning: ...` on one line, like its errors, without Python's
    file:line prefix and the echoed `warnings.warn(...)` source line; every other warning (torch's
    raised from a line of dtl's included) keeps Python's format. Installed on import, so DataLoader
    workers get it too."""
    if issubclass(category, DtlWarning):
        return f"dtl: warning: {message}\n"
    return _python_format(message, category, filename, lineno, line)


warnings.formatwarning = _format_warning


class DtlError(Exception):
    """An error in what the user gave dtl; the message names the file, key or sample."""


def error_line(exc: BaseException) -> str:
    """The user's message of `exc`, even when it crossed a DataLoader worker.

    torch re-raises a worker's exception with the same type but with the worker's whole
    traceback as message ("Caught DataError in DataLoader worker process 0. Original
    Traceback ..."); the message the worker raised is its last line.
    """
    text = str(exc)
    if _WORKER_TRACEBACK.match(text):
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = _QUALIFIED.sub("", last.strip(), count=1)
    return text


def first_line(exc: BaseException) -> str:
    """An exception's first non-empty line without terminal colour codes (else its type's name): a
    library's message can be a page (torch's weights_only refusal, safetensors' header errors), and
    dtl's error is one line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)


def print_error(exc: BaseException) -> int:
    """Print `dtl: error: ...` on stderr; returns the exit code (2)."""
    print(f"dtl: error: {error_line(exc)}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR
