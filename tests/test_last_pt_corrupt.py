"""A review's finding on find_checkpoints taking a completed run's last.pt whose step file is gone
(2026-12-07): one that does not load is dropped without a word. The README: "Checkpoints that
do not load are skipped with a warning naming them and the cause (``auto`` falls back to the
next newest)"; a step file that does not load is (select_resume's notes), this run's newest
checkpoint was not: resume=auto went back to step 10 saying nothing of step 15's."""

from __future__ import annotations

from conftest import train

from trainer.checkpoint import select_resume

BASE = ("trainer.device=cpu", "logging.progress=false", "model.hidden=[16]",
        "data.batch_size=64", "trainer.run_id=x", "trainer.checkpoint.every_n_steps=5",
        "trainer.max_steps=15", "instrument=none")  # fmt: skip


def test_a_last_pt_that_does_not_load_is_named_where_auto_skips_it(tmp_path) -> None:
    run_dir = tmp_path / "a"
    ckpts = run_dir / "checkpoints"
    train(run_dir, *BASE, f"trainer.checkpoint.search_dir={tmp_path}")
    data = (ckpts / "last.pt").read_bytes()
    (ckpts / "step_000000015.pt").unlink()  # (last.pt is now the run's step 15)
    (ckpts / "last.pt").unlink()
    (ckpts / "last.pt").write_bytes(data[: len(data) // 2])  # (truncated in a copy)
    path, _, notes, _ = select_resume("auto", tmp_path, ("x",), run_dir)
    assert path == ckpts / "step_000000010.pt"  # (the next newest)
    assert len(notes) == 1 and notes[0].startswith(
        f"checkpoint {ckpts / 'last.pt'} is not a readable PyTorch checkpoint"
    ), notes
