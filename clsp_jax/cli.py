"""What the command-line programs (`clsp_jax.eval`, `clsp_jax.embed`, `clsp_jax.export`) share: bad arguments
and bad inputs end the same way, as one line on stderr and exit code 2.

    def main(argv=None) -> int:
        try:
            args = cli.ArgumentParser(prog="python -m clsp_jax.x", description=...).parse_args(argv)
            ...                                   # raise ValueError for a bad input
        except ValueError as e:
            return cli.usage_error("clsp_jax.x", e)
"""

import argparse
import sys

USAGE_ERROR = 2  # the exit code argparse itself uses for bad arguments


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise ValueError(message) instead of printing the usage and exiting, so
    the program reports them like its other input errors (`usage_error`). --help still prints and exits 0."""

    def error(self, message):
        raise ValueError(message)


def usage_error(prog: str, error: Exception) -> int:
    """Prints "<prog>: error: <error>" on stderr; returns the exit code for it (2)."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return USAGE_ERROR
