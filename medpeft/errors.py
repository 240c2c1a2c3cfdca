"""The one exception type a user should ever see: a message, printed on one line, exit code 2."""


class UsageError(Exception):
    """Bad input or an unusable environment: the message says what, where and how to fix it."""

    exit_code = 2
