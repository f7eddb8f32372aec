"""Several ``train.py`` runs, one after another, in one torchrun launch (``helpers.train_torchrun_many``, for
tests/test_distributed.py and tests/test_families_2rank.py).

Each run is a ``train.py`` argument list; the lists are separated by ``--then``. The ranks start and import once for
all of them (most of a tiny run's time is that start-up); each run is what ``train.py`` does with its arguments,
``run_command(main, argv)``, with its own Trainer per stage. The process group the first run sets up is reused by
the next (Lightning initialises it only when it is not yet initialised).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_slimmoe.cli import main, run_command  # noqa: E402


def split_runs(argv: list[str]) -> list[list[str]]:
    runs, current = [], []
    for arg in argv:
        if arg == "--then":
            runs.append(current)
            current = []
        else:
            current.append(arg)
    return [*runs, current]


if __name__ == "__main__":
    for run in split_runs(sys.argv[1:]):
        run_command(main, run)
