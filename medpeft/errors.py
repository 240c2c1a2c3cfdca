"""The exceptions a user should ever see: a message, printed on one line, and an exit code."""


class UsageError(Exception):
    """Bad input or an unusable environment: the message says what, where and how to fix it. Exit code 2."""

    exit_code = 2


class TrainingStopped(UsageError):
    """Training went wrong (NaN loss, out of memory, disk full): what happened, the likely causes, what was kept.
    Exit code 1: the input was valid, the run failed."""

    exit_code = 1
