"""The project's one error type for bad input and a broken environment, and the wrapper that prints it.

A flag out of range, a damaged or missing file, a missing key, a device this machine lacks: raise BadInput
with one line that names the flag, file or key and says what was expected. The drivers' main() prints it as
`error: ...` and exits with status 1. Every other exception is a programming error and keeps its traceback.

    >>> raise BadInput("--batch_size 0: expected an integer >= 1")
    error: --batch_size 0: expected an integer >= 1            # what the user sees from a driver
"""
import argparse
import sys


class BadInput(Exception):
    """Bad input or environment: one line naming the flag, file or key and what was expected."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, whose errors (a missing value, 'two' for an int) are BadInput too: one line, not usage + message."""

    def error(self, message):
        raise BadInput(f"{message} (see --help)")


def os_error_line(e):
    """An OSError as 'path: reason': '[Errno 28] No space left on device: 'x'' -> 'x: No space left on device'."""
    if e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e) or type(e).__name__


def run(main, argv=None):
    """Run a driver's main(argv). BadInput and OS errors (a full disk, a read-only or missing path) become one
    line on stderr and exit status 1; Ctrl-C outside a training loop exits with 130 and no traceback."""
    try:
        return main(argv)
    except BadInput as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: {os_error_line(e)}")
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
