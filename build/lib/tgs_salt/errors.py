"""User-facing errors: the CLI prints these as one clear message and exits non-zero."""


class UserError(Exception):
    """A problem with the user's input (files, flags, config): reported without a traceback."""

    exit_code = 2
