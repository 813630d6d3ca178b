"""Rewrite the HPARAMS records of runs written before 2026-12-07 to the kinds written since.

    python scripts/migrate_hparams.py [DIR ...]      (default: outputs)

Until 2026-12-07 a run wrote its integer hyperparameters as text ("64") and a None as
"none"; since, integers are numbers and a None is left out. A logdir holding runs of both has
two kinds of value in such a column, and TensorBoard's HPARAMS tab refuses to sort or filter
the table by it. This rewrites the older runs' records under each folder
(:func:`trainer.hparams.migrate`: each value decided by the run's own config, its
``.hydra/config.yaml`` or its checkpoint's; a run with neither is left as written),
atomically, every other record kept byte for byte; running it again changes nothing. A file a
process may still be writing (its run has no ``metrics.json`` yet, or wrote it before the file's
first or last events, by their own times: resumed since) is left and listed: replaced under its
writer, every event written after would be lost. Once no process writes those runs (a run
killed never writes its metrics), ``--unfinished`` migrates them too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.hparams import migrate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/migrate_hparams.py",
        description="Rewrite the HPARAMS records of runs written before 2026-12-07.",
    )
    parser.add_argument("dirs", nargs="*", default=["outputs"], type=Path,
                        help="folders holding runs (default: outputs)")  # fmt: skip
    parser.add_argument("--unfinished", action="store_true",
                        help="also the runs a process may still be writing (no metrics.json, "
                             "or events after it): only once none is running")  # fmt: skip
    args = parser.parse_args(argv)
    for directory in args.dirs:
        if not directory.is_dir():
            parser.error(f"{directory} is not a folder")
    changed, left = [], []
    for directory in args.dirs:
        done, kept = migrate(directory, unfinished=args.unfinished)
        changed += done
        left += kept
    for path in changed:
        print(f"rewritten: {path}")
    for path, why in left:  # (never guessed: text that reads as an integer may be text)
        print(f"left as written: {path}: {why}")
    print(f"{len(changed)} event file(s) rewritten, {len(left)} left")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
