"""The errors a user is meant to read: each becomes one `error:` line and exit code 2 (dstrain/cli.py),
never a traceback."""


class UserError(Exception):
    """A problem with the user's files or arguments, reported as one line and exit code 2."""


class BadRecord(UserError):
    """One unusable line or record of an input file; `--skip_bad_records` skips and counts it instead."""
