"""One-line errors for bad input: the user sees what is wrong and where, never a traceback."""

import functools
import sys


class UserError(Exception):
    """A problem with the user's files or arguments, reported as one line and exit code 2."""


def cli_entry(main):
    """Wrap an entry script's `main` so that a UserError ends the process with one clear line.

    Every rank reports its own error (DESIGN: other ranks print nothing *but* errors); the
    DeepSpeed launcher then stops the remaining ranks.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        from dstrain.distributed import copy_output_to_rank_log  # torch is imported there; keep errors.py light

        copy_output_to_rank_log()
        try:
            return main(*args, **kwargs)
        except UserError as error:
            message = " ".join(str(error).split("\n"))
            # One write, so the lines of ranks failing at the same moment do not run into each other.
            sys.stderr.write(f"error: {message}\n")
            sys.stderr.flush()
            sys.exit(2)

    return wrapper
