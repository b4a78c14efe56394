"""What every edge-run command line shares: one-line errors and an argument parser that ends a bad
option the same way (`edge-run` and the bench scripts alike)."""
from __future__ import annotations

import argparse
import re
import sys


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors, in the same form as every other edge-run error (and
    as a bench script's, named by its `prog`)."""

    def error(self, message: str):
        name = "edge-run" if self.prog.startswith("edge-run") else self.prog
        self.exit(2, f"{name}: error: {message} (see `{self.prog} --help`)\n")


def fail(message: str, prog: str = "edge-run") -> int:
    """Print `message` as `prog`'s one-line error; returns the exit status."""
    one_line = re.sub(r"\s*\n\s*", " ", message.strip())
    print(f"{prog}: error: {one_line}", file=sys.stderr)
    return 1
