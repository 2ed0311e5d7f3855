"""The errors a user is meant to read: each becomes one `error:` line and exit code 2 (dstrain/cli.py),
never a traceback. And the one way a run stops on purpose: `Preempted`, exit code 75."""

# sysexits.h's EX_TEMPFAIL ("a temporary failure; the user is invited to retry"): the run was asked to
# stop (a preemption signal) and left a complete checkpoint; the same command resumes it.
PREEMPTED_EXIT_CODE = 75


class UserError(Exception):
    """A problem with the user's files or arguments, reported as one line and exit code 2."""


class BadRecord(UserError):
    """One unusable line or record of an input file; `--skip_bad_records` skips and counts it instead."""


class Preempted(BaseException):
    """The run stopped because a preemption signal asked it to: one line, exit code 75.

    A BaseException (as KeyboardInterrupt is): raised from a signal handler before training starts, it
    must pass through library code that catches Exception. `orderly` is True when every rank stopped
    together after a checkpoint (they then leave the process group together)."""

    def __init__(self, message: str, orderly: bool):
        super().__init__(message)
        self.orderly = orderly
