"""Bad-input errors and the one line the command line prints for any exception.

Library code raises :class:`UserError` (or a ``ValueError`` / ``FileNotFoundError`` naming the field
or file) when the input is wrong: the message says what is wrong and how to fix it. ``vlmjax.main``
prints whatever reaches the top as ``format_error(exc)``: one line, no traceback. Exception types that
do not describe bad input get a note that it looks like a bug. Nothing here imports the rest of vlmjax.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable

from absl import flags

PREFIX = "vlmjax: error: "
BUG_NOTE = " (this looks like a bug in vlmjax: rerun with --verbose and report the traceback)"


class UserError(Exception):
    """The input (a config value, a path, a flag) is wrong; the message names it and the fix."""


# Types whose message describes the input rather than a fault in vlmjax.
INPUT_ERRORS = (UserError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
                KeyError, FloatingPointError, SystemExit, flags.Error)

# ml_collections' locked ConfigDict: KeyError("'totl_steps'\nDid you mean \"total_steps\" instead of
# \"totl_steps\"?"), raised again as AttributeError(KeyError(...)) by attribute access.
_ML_COLLECTIONS_MISSING = re.compile(
    r"^'(?P<key>[^'\n]+)'(?:\nDid you mean \"(?P<hint>[^\"\n]+)\" instead of \"[^\"\n]*\"\?)?$")
# Wrappers whose own text only repeats (or hides) the error that caused them.
_WRAPPERS = ("Error whilst parsing config file", "Configuration is not available because of an "
             "earlier failure to load")


def missing_field(exc: BaseException) -> tuple[str, str | None] | None:
    """(field, did-you-mean field or None) when ``exc`` is ml_collections' "no such field" error."""
    while isinstance(exc, (KeyError, AttributeError)) and exc.args:
        arg = exc.args[0]
        if isinstance(arg, BaseException):
            exc = arg
            continue
        m = _ML_COLLECTIONS_MISSING.match(str(arg))
        return (m["key"], m["hint"]) if m else None
    return None


def root_cause(exc: BaseException) -> BaseException:
    """``exc`` without the absl / ml_collections wrappers around a config file's own error."""
    while any(w in str(exc) for w in _WRAPPERS) and (exc.__cause__ or exc.__context__):
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return exc


def is_input_error(exc: BaseException) -> bool:
    """Whether ``exc`` describes bad input (else it looks like a bug); a config field that does not
    exist counts as input (a config file or override misses it)."""
    return isinstance(exc, (INPUT_ERRORS, KeyboardInterrupt)) or missing_field(exc) is not None


def message(exc: BaseException) -> str:
    """What ``exc`` says, on one line."""
    field = missing_field(exc)
    if field:
        text = f"config field {field[0]!r} does not exist" + (
            f" (did you mean {field[1]!r}?)" if field[1] else "")
    elif isinstance(exc, KeyboardInterrupt):
        text = "interrupted (Ctrl-C)"
    elif isinstance(exc, SystemExit):
        text = str(exc.code)
    elif isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        # str(KeyError) is the repr of its argument: a message as it is, a bare key quoted.
        text = exc.args[0] if " " in exc.args[0] else f"KeyError: {exc.args[0]!r}"
    elif isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror}" + (f" -> {exc.filename2}" if exc.filename2 else "")
    else:
        text = str(exc)
    text = " ".join(text.split())
    if text.startswith("vlmjax: "):  # messages written for printing as they are
        text = text[len("vlmjax: "):]
    if not is_input_error(exc):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text or type(exc).__name__


def format_error(exc: BaseException) -> str:
    """The one line printed for ``exc``: 'vlmjax: error: <message>' (+ a note when it looks like a bug)."""
    exc = root_cause(exc)
    return PREFIX + message(exc) + ("" if is_input_error(exc) else BUG_NOTE)


def verbose_requested(argv: list[str]) -> bool:
    """--verbose in ``argv`` (the last of --verbose / --noverbose wins) or VLMJAX_VERBOSE=1."""
    if os.environ.get("VLMJAX_VERBOSE", "").lower() not in ("", "0", "false", "no"):
        return True
    value = False
    for arg in argv:
        name, _, v = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name in ("verbose", "noverbose"):
            value = (name == "verbose") == (v.lower() not in ("0", "false", "no"))
    return value


def run_cli(main: Callable[[list[str]], object], argv: list[str], usage: str) -> None:
    """The small entry points' (``vlmjax.diagnose``, ``vlmjax.plan``) command line: --help prints
    ``usage``; an error is printed as ONE last line on stderr, 'vlmjax: error: ...', exit code 1
    (Ctrl-C: 130), with its traceback first under --verbose or VLMJAX_VERBOSE=1."""
    if any(a in ("--help", "-help", "-h", "--helpfull") for a in argv[1:]):
        print(usage, flush=True)
        return
    try:
        main(argv)
    except BaseException as e:  # pylint: disable=broad-except
        sys.stdout.flush()
        if verbose_requested(argv):
            traceback.print_exception(e)
        print(format_error(e), file=sys.stderr, flush=True)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 1)
