"""Summarize a sweep (or one run): a ranked table, ``summary.csv`` and ``curves.png``.

    python scripts/report.py outputs/multirun/2026-11-25/10-00-00-000000   # rank by val/acc
    python scripts/report.py <dir> --metric val/loss                       # lowest first
    python scripts/report.py <run dir>                                      # one run works too

The work is in :mod:`trainer.report`.
"""

from trainer.report import cli

if __name__ == "__main__":
    cli()
