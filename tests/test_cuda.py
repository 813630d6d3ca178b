"""The CUDA path; every test here skips cleanly on a machine without CUDA."""

from __future__ import annotations

import pytest
import torch
from conftest import make_cfg, read_scalars, requires_cuda

from trainer.run import build_trainer

pytestmark = requires_cuda


@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_cuda_run_keeps_data_on_the_gpu_and_logs_unscaled_norms(tmp_path, precision) -> None:
    norms = {}
    for p in ("32", precision):
        cfg = make_cfg("trainer.device=cuda", f"trainer.precision={p}", "trainer.max_steps=3",
                       "logging.every_n_steps=1")  # fmt: skip
        t = build_trainer(cfg, tmp_path / p)
        assert t.train_loader.x.device.type == "cuda"  # in-memory data resident on the GPU
        t.fit()
        t.logger.close()
        norms[p] = [v for _, v in read_scalars(tmp_path / p)["grad_norm/total"]]
    assert norms[precision][0] == pytest.approx(norms["32"][0], rel=0.05)


def test_auto_device_picks_cuda(tmp_path) -> None:
    t = build_trainer(make_cfg("trainer.device=auto", "trainer.max_steps=1"), tmp_path)
    assert next(t.model.parameters()).device.type == "cuda"
    t.logger.close()
    assert torch.cuda.is_available()


def test_no_host_sync_between_logging_steps(tmp_path) -> None:
    # CUDA's sync debug mode raises on any device-to-host synchronization: it is on for every
    # micro-batch of a step that does not log (norms, histograms and per-sample norms on their
    # own cadence of 10; the guard, which reads one flag per step in step mode, off). Steps 10
    # and 20 log, and so does the last, 25, where the histograms measure again; the first
    # step is exempt: the histograms measure there too, and read their ranges
    from conftest import train

    from trainer.loop import Callback

    class NoSync(Callback):
        def on_train_batch_start(self, trainer, batch) -> None:
            step = trainer.global_step + 1  # the step this micro-batch belongs to
            quiet = step > 1 and not trainer.should_log(step)
            torch.cuda.set_sync_debug_mode("error" if quiet else "default")

        def on_train_step_end(self, trainer, out) -> None:
            torch.cuda.set_sync_debug_mode("default")

    try:
        train(tmp_path, "trainer.device=cuda", "trainer.max_steps=25", "logging.every_n_steps=10",
              "instrument.nonfinite.policy=off", "instrument.histograms.every_n_steps=10",
              "instrument.per_sample.every_n_steps=10", callbacks=[NoSync()])  # fmt: skip
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_default_guard_makes_no_host_sync_between_logging_steps(tmp_path) -> None:
    """Issue 14 on a GPU: with every default instrument on, the guard included
    (``sync=auto`` defers on CUDA, and the default AdamW is fused there, so a bad update is
    skipped inside the step), CUDA's sync debug mode raises on any device-to-host
    synchronization in a step that does not log (the last step, 25, logs). The first step is
    exempt: it creates the optimizer state, which cannot be undone on the device, so its flag
    is read (and the histograms measure there)."""
    from conftest import train

    from trainer.loop import Callback

    class NoSync(Callback):
        def on_train_batch_start(self, trainer, batch) -> None:
            step = trainer.global_step + 1  # the step this micro-batch belongs to
            quiet = step > 1 and not trainer.should_log(step)
            torch.cuda.set_sync_debug_mode("error" if quiet else "default")

        def on_train_step_end(self, trainer, out) -> None:
            torch.cuda.set_sync_debug_mode("default")
            assert trainer.optimizer.defaults["fused"] is True

    try:
        metrics = train(tmp_path, "trainer.device=cuda", "trainer.max_steps=25",
                        "logging.every_n_steps=10", callbacks=[NoSync()])  # fmt: skip
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert metrics["step"] == 25
