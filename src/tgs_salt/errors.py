"""User-facing errors: the CLI prints these as one clear message and exits non-zero; Ctrl-C."""

import contextlib
import signal
import threading
from collections.abc import Iterator


class UserError(Exception):
    """A problem with the user's input (files, flags, config): reported without a traceback."""

    exit_code = 2


# ----------------------------------------------------------------------------- Ctrl-C that is not lost
# Python turns SIGINT into KeyboardInterrupt in whatever Python code runs next; when that is a
# finalizer (a __del__ or weakref callback run by the garbage collector) the exception is printed as
# "Exception ignored in ..." and the run goes on. The handler below also remembers the interrupt, and
# the training and prediction loops re-raise it at their next step (check_interrupt).
_interrupted = False


def _on_sigint(signum, frame):
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def sticky_interrupt() -> Iterator[bool]:
    """For the block, in the main thread where SIGINT has Python's default handler (not ignored, as in
    a shell's background job, nor someone else's): _on_sigint, the previous handler back after.
    Yields whether it was installed."""
    global _interrupted
    installed = threading.current_thread() is threading.main_thread() \
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if not installed:
        yield False
        return
    _interrupted = False
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield True
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _interrupted = False


def check_interrupt() -> None:
    """Raise KeyboardInterrupt if Ctrl-C came since the handler was installed (maybe swallowed)."""
    if _interrupted:
        raise KeyboardInterrupt
