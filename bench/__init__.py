"""edge-run bench."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from ..console import Parser, fail
from ..runtime.manifest import PackageError


def command(main: Callable[[], object], prog: str) -> NoReturn:
    """Run a bench script's `main` as a command: bad input (a missing or malformed package or file,
    an invalid value) ends in one line on stderr and exit status 1, as edge-run's own commands do."""
    try:
        result = main()
    except (PackageError, ValueError, OSError) as e:
        sys.exit(fail(str(e), prog))
    sys.exit(result if isinstance(result, int) else 0)


def parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """A bench script's argument parser: a bad option ends in one line on stderr, like edge-run's."""
    return Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
