"""Data parallel under torchrun: rank 0's failure record must survive torchrun's SIGTERM.

When one rank fails, torchrun's agent sends SIGTERM to the others at once. Rank 0 has by then
got the collective's broken connection and is recording its failure (``metrics.json``, the
README: "an error raised on another rank during training reaches rank 0 as the collective's
broken connection ..., which is what rank 0's ``metrics.json`` then records"). The stop
handlers (``StopOnSignals``) are restored in ``on_exception``, before ``run()`` writes the
failure record, so the SIGTERM kills rank 0 there: with the real torchrun a probe's run folder
had no ``metrics.json`` in 1 run of 3, and a stray ``.metrics.json.*.tmp`` in another. Here the
SIGTERM is delivered deterministically at the moment rank 0 starts writing its record.
"""

from __future__ import annotations

import importlib
import json
import os
import signal

import torch
from test_distributed import COMMON, _rank_failing, ranks_of

from trainer.models.mlp import MLP


class FailsOnRank1(MLP):
    """An MLP whose third forward on rank 1 raises (a bad batch in rank 1's shard)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if torch.distributed.get_rank() == 1 and self.calls == 3:
            raise ValueError("rank 1: a corrupt batch")
        return super().forward(x)


def _rank_terminated_while_recording(rank, world, port, overrides, run_dir) -> None:
    """:func:`_rank_failing`, with torchrun's SIGTERM arriving as the run records its end."""
    run_module = importlib.import_module("trainer.run")  # (trainer.run is also a function)

    original = run_module._write_metrics

    def terminated_meanwhile(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun: another rank failed, stop the rest
        return original(*args, **kwargs)

    run_module._write_metrics = terminated_meanwhile
    _rank_failing(rank, world, port, overrides, run_dir)


def test_rank_0_records_its_failure_when_torchrun_terminates_it(tmp_path) -> None:
    dirs = [tmp_path / "rank0", tmp_path / "rank1"]
    overrides = (*COMMON, "trainer.max_steps=6", "instrument=none", "data.batch_size=32",
                 "~model", f"+model._target_={__name__}.FailsOnRank1")  # fmt: skip
    codes = ranks_of(_rank_terminated_while_recording, overrides, dirs)
    assert codes[1] == 1
    assert (dirs[0] / "metrics.json").exists(), (
        f"rank 0 exited {codes[0]} without metrics.json; left: "
        f"{sorted(p.name for p in dirs[0].iterdir())}"
    )
    metrics = json.loads((dirs[0] / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["step"] == 2
    assert not list(dirs[0].glob(".metrics.json*.tmp"))
