"""Shared set-up of the whole suite.

The helper modules in ``tests/helpers`` (process launchers, rank workers, shared checks) are
imported by their plain names (``from _distributed import run_distributed``); this puts that
folder on ``sys.path`` for the test modules, and processes spawned by
``torch.multiprocessing`` inherit it.
"""

import sys
from pathlib import Path

HELPERS = Path(__file__).resolve().parent / "helpers"
if str(HELPERS) not in sys.path:
    sys.path.insert(0, str(HELPERS))
