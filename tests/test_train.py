"""End-to-end runs in-process: accuracy, run files, TensorBoard tags, callbacks, determinism."""

from __future__ import annotations

import io
import json
import logging
import math
import os

import pytest
import torch
from conftest import final_params, make_cfg, read_scalars, train

from trainer.checkpoint import load_checkpoint
from trainer.config import ConfigError
from trainer.data.digits import DigitsData
from trainer.logger import Progress
from trainer.loop import HOOKS, Callback
from trainer.models.mlp import MLP


def test_default_run_learns_digits_and_writes_its_files(tmp_path) -> None:
    metrics = train(tmp_path, "trainer.max_epochs=8")
    assert metrics["val/acc"] >= 0.9
    assert metrics["status"] == "completed" and metrics["epoch"] == 8 and metrics["step"] == 8 * 23
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == metrics
    assert set(on_disk) == {
        "train/loss",
        "val/loss",
        "val/acc",
        "monitor",
        "step",
        "epoch",
        "wall_s",
        "status",
        "run_id",
        "checkpoint",
        "loss",
    }
    assert on_disk["loss"]["_target_"] == "trainer.losses.CrossEntropy"
    assert on_disk["checkpoint"] == str(tmp_path / "checkpoints" / "last.pt")

    # the checkpoint loads with weights_only=True and reproduces val/acc independently
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["step"] == metrics["step"] and ckpt["config"]["data"]["batch_size"] == 64
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "scaler", "epoch", "config", "rng",
                         "batch_in_epoch", "run_id", "format"}  # fmt: skip
    assert ckpt["run_id"] == metrics["run_id"]
    model = MLP((1, 8, 8), 10)
    model.load_state_dict(ckpt["model"])
    _, val = DigitsData().load()
    with torch.no_grad():
        acc = (model(val.x).argmax(1) == val.y).float().mean().item()
    assert acc == pytest.approx(metrics["val/acc"], abs=1e-6)
    opt = torch.optim.AdamW(model.parameters())
    opt.load_state_dict(ckpt["optimizer"])  # the optimizer state is complete


def test_event_file_holds_the_documented_tags(tmp_path) -> None:
    train(tmp_path, "trainer.max_epochs=2", "logging.every_n_steps=5", "loss.mode=vector",
          "scheduler=cosine", "instrument=none")  # fmt: skip
    scalars = read_scalars(tmp_path)
    per_step = ["train/loss", "lr", "grad_norm/total", "weights/mean", "weights/min", "weights/max"]
    assert set(scalars) == {*per_step, "val/loss", "val/acc"}
    for tag in per_step:  # every 5 steps, and at the last step (train/loss over 41-46)
        assert [s for s, _ in scalars[tag]] == [*range(5, 47, 5), 46], tag
    assert [s for s, _ in scalars["val/acc"]] == [23, 46]  # once per epoch, at its last step

    lrs = [v for _, v in scalars["lr"]]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 1e-3  # cosine decay, logged per step
    assert all(v > 0 for _, v in scalars["grad_norm/total"])


def test_uniform_weights_log_a_constant_mean(tmp_path) -> None:
    """Uniform weights 1/30 (whose float32 mean over 30 of them is not 1/30 in float32) on full
    batches: their mean is formed in float64, the same number every step, not a zig-zag."""
    train(tmp_path, "loss.mode=vector", "data.batch_size=30", "trainer.max_steps=6",
          "logging.every_n_steps=1", "instrument=none")  # fmt: skip
    means = [v for _, v in read_scalars(tmp_path)["weights/mean"]]
    assert means == [float(torch.tensor(1 / 30))] * 6


def test_logged_train_loss_is_the_mean_since_the_last_log(tmp_path) -> None:
    seen: list[torch.Tensor] = []

    class Losses(Callback):
        def on_after_backward(self, trainer, batch, losses, weights) -> None:
            seen.append(losses.clone())

    train(tmp_path, "trainer.max_steps=7", "logging.every_n_steps=3", callbacks=[Losses()])
    logged = read_scalars(tmp_path)["train/loss"]
    expected = [torch.cat(part).mean().item() for part in (seen[:3], seen[3:6], seen[6:])]
    assert [s for s, _ in logged] == [3, 6, 7]  # the last, partial window at the end
    assert [v for _, v in logged] == pytest.approx(expected, rel=1e-6)


def test_hooks_fire_in_the_documented_order(tmp_path) -> None:
    events: list[str] = []

    class Recorder(Callback):
        pass

    for name in HOOKS:
        setattr(Recorder, name, lambda self, trainer, *args, _n=name: events.append(_n))
    train(tmp_path, "trainer.max_epochs=1", "trainer.accumulate_grad_batches=12",
          callbacks=[Recorder()])  # fmt: skip
    # 23 batches, accumulated 12 at a time: 2 optimizer steps (12 + 11 micro-batches); the
    # rest points: after the first step, and after the epoch's validation (its last step)
    expected = (
        ["on_fit_start", "on_train_epoch_start"]
        + ["on_train_batch_start", "on_before_backward", "on_after_backward"] * 12
        + ["on_before_optimizer_step", "on_train_step_end", "on_rest_point"]
        + ["on_train_batch_start", "on_before_backward", "on_after_backward"] * 11
        + ["on_before_optimizer_step", "on_train_step_end"]
        + ["on_validation_end", "on_rest_point"]
        # what steps that did not log measured is written at the end (and again, nothing
        # left, before the last checkpoint, after on_fit_end: on_flush runs once a step)
        + ["on_flush", "on_fit_end"]
    )  # fmt: skip
    assert events == expected


def fails_restoring_signals(match: str, *args, **kwargs) -> None:
    """``train(*args, **kwargs)`` raises a RuntimeError matching ``match``, and the SIGUSR1
    handler installed before it is in place after it (run() stops on signals while fit runs,
    trainer.checkpoint.StopOnSignals, and puts the previous handlers back)."""
    import signal

    def mine(signum, frame) -> None: ...

    previous = signal.signal(signal.SIGUSR1, mine)
    try:
        with pytest.raises(RuntimeError, match=match):
            train(*args, **kwargs)
        assert signal.getsignal(signal.SIGUSR1) is mine
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_failing_fit_fires_on_exception_and_restores_the_signal_handlers(tmp_path) -> None:

    seen: list[str] = []

    class Fails(Callback):
        def on_train_step_end(self, trainer, out) -> None:
            if out.step == 2:
                raise RuntimeError("boom at step 2")

        def on_fit_end(self, trainer, metrics) -> None:
            seen.append("fit_end")

        def on_exception(self, trainer, error) -> None:
            seen.append(f"exception: {error}")

    fails_restoring_signals("boom at step 2", tmp_path, "trainer.max_steps=4", callbacks=[Fails()])
    assert seen == ["exception: boom at step 2"]


def test_a_callback_raising_at_the_end_loses_no_checkpoint_and_every_end_hook_runs(
    tmp_path,
) -> None:
    """A user's on_fit_end raising: the framework's own on_fit_end (the final checkpoint,
    the signal handlers put back) ran after it no more, so a finished run had nothing to
    resume from, and the others got on_exception as well as on_fit_end (a probe's finding).
    Every on_fit_end runs now; the run fails with the error; on_exception goes only to the
    callback that raised (instead of its on_fit_end, never as well)."""

    seen: list[str] = []

    class Report(Callback):  # its end fails
        def on_fit_end(self, trainer, metrics) -> None:
            seen.append("report: fit_end")
            raise RuntimeError("report failed")

        def on_exception(self, trainer, error) -> None:
            seen.append(f"report: exception: {error}")

    class Other(Callback):
        def on_fit_end(self, trainer, metrics) -> None:
            seen.append("other: fit_end")

        def on_exception(self, trainer, error) -> None:
            seen.append("other: exception")

    fails_restoring_signals("report failed", tmp_path, "trainer.max_steps=6",
                            callbacks=[Report(), Other()])  # fmt: skip
    assert seen == ["report: fit_end", "other: fit_end", "report: exception: report failed"]
    # last.pt of step 6 (the default cadence is 200 steps)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 6
    status = json.loads((tmp_path / "metrics.json").read_text())
    assert status["status"] == "failed" and "report failed" in status["error"]


def test_a_state_made_on_a_later_step_and_a_ctrl_c_in_a_report_lose_nothing(tmp_path) -> None:
    """The check of a user's state at the start skips a state_dict() that cannot answer yet
    (an average started at the first step: it failed the run at step 0, a review's finding);
    a KeyboardInterrupt in one on_fit_end still lets the others, the final checkpoint among
    them, run."""

    class Lazy(Callback):
        def on_train_step_end(self, trainer, out) -> None:
            self.ema = out.step

        def state_dict(self):
            return {"ema": self.ema}

    class Interrupted(Callback):
        def on_fit_end(self, trainer, metrics) -> None:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, "trainer.max_steps=3", callbacks=[Lazy(), Interrupted()])
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert (
        last["step"] == 3 and [f"{__name__}.{Lazy.__qualname__}", {"ema": 3}] in last["callbacks"]
    )


@pytest.mark.parametrize("where", ["on_fit_start", "on_train_step_end"])
def test_every_on_exception_runs_and_the_runs_own_error_is_raised(where, tmp_path) -> None:
    """A callback whose on_exception raises too: the others' on_exception ran no more (the
    signal handlers stayed installed for the rest of the process, ignoring SIGTERM after
    it), and its error replaced the run's in metrics.json. A failing on_fit_start (before
    the others' started) gets the same treatment."""

    seen: list[str] = []

    class Fails(Callback):
        def on_exception(self, trainer, error) -> None:
            raise ValueError("cleanup failed")

    setattr(Fails, where, lambda self, trainer, *a: (_ for _ in ()).throw(RuntimeError("first")))

    class Other(Callback):
        def on_exception(self, trainer, error) -> None:
            seen.append(f"other: {error}")

    fails_restoring_signals("first", tmp_path, "trainer.max_steps=3", callbacks=[Fails(), Other()])
    assert seen == ["other: first"]
    status = json.loads((tmp_path / "metrics.json").read_text())
    assert "RuntimeError: first" in status["error"] and "cleanup" not in status["error"]


class FlushSteps(Callback):
    """The step of each ``on_flush``; stages a value of its own there, as the guard does."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_flush(self, trainer) -> None:
        self.steps.append(trainer.global_step)
        trainer.stage_scalars({"u/flushed": float(len(self.steps))})


def test_the_last_step_logs_and_on_flush_runs_once_a_step(tmp_path) -> None:
    """Logging every 2 steps of 3: steps 2 and 3 log (the run's last step always does, so
    it ends on logged values); ``on_flush`` runs once at each step that writes, also at the
    end where the last write and the final checkpoint's are at one step (a value staged
    there twice would be refused as one tag staged twice)."""
    flush = FlushSteps()
    train(tmp_path, "trainer.max_steps=3", "logging.every_n_steps=2", "instrument=none",
          "trainer.checkpoint.every_n_steps=0", callbacks=[flush])  # fmt: skip
    assert [step for step, _ in read_scalars(tmp_path)["train/loss"]] == [2, 3]
    assert len(flush.steps) == len(set(flush.steps)) and flush.steps[-1] == 3, flush.steps


class FlushFailsAt3(Callback):
    def on_flush(self, trainer) -> None:
        if trainer.global_step == 3:
            raise RuntimeError("on_flush failed at 3")


def test_a_callback_whose_on_flush_raises_leaves_the_others_flushed(tmp_path) -> None:
    """A callback's ``on_flush`` raising at the step-3 checkpoint stopped the hook there:
    the callbacks after it never flushed, also not on the failure's own flush (at the same
    step, so skipped), and their unread values were lost (a probe's). Every callback flushes;
    the run fails with the first error, and what the others staged there is written."""
    flush = FlushSteps()
    with pytest.raises(RuntimeError, match="on_flush failed at 3"):
        train(tmp_path, "trainer.max_steps=6", "logging.every_n_steps=4", "instrument=none",
              "trainer.checkpoint.every_n_steps=3", callbacks=[FlushFailsAt3(), flush])  # fmt: skip
    assert flush.steps == [3]
    assert read_scalars(tmp_path)["u/flushed"] == [(3, 1.0)]
    status = json.loads((tmp_path / "metrics.json").read_text())
    assert status["status"] == "failed" and "on_flush failed at 3" in status["error"]


def test_same_seed_same_run_and_other_seed_differs(tmp_path) -> None:
    args = ["trainer.max_steps=30", "logging.every_n_steps=1", "optimizer=sgd"]
    train(tmp_path / "a", *args, "seed=3")
    train(tmp_path / "b", *args, "seed=3")
    train(tmp_path / "c", *args, "seed=4")
    a, b, c = (final_params(tmp_path / k) for k in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert read_scalars(tmp_path / "a")["train/loss"] == read_scalars(tmp_path / "b")["train/loss"]


def test_deterministic_flag_is_on_for_its_run_only(tmp_path) -> None:
    seen: list[bool] = []

    class Probe(Callback):
        def on_train_step_end(self, trainer, out) -> None:
            seen.append(torch.are_deterministic_algorithms_enabled())

    try:
        train(tmp_path / "a", "trainer.max_steps=2", "trainer.deterministic=true",
              callbacks=[Probe()])  # fmt: skip
        # the next job of a sweep runs in the same process: the flag must not leak into it
        train(tmp_path / "b", "trainer.max_steps=2", callbacks=[Probe()])
    finally:
        torch.use_deterministic_algorithms(False)
    assert seen == [True, True, False, False]


def test_hooks_see_the_step_being_taken(tmp_path) -> None:
    seen: list[tuple[int, bool]] = []

    class Probe(Callback):
        def on_before_optimizer_step(self, trainer, optimizer) -> None:
            seen.append((trainer.global_step, trainer.logging_step))

    train(tmp_path, "trainer.max_steps=4", "logging.every_n_steps=2", callbacks=[Probe()])
    assert seen == [(1, False), (2, True), (3, False), (4, True)]


def test_train_loss_across_an_epoch_boundary(tmp_path) -> None:
    seen: list[torch.Tensor] = []

    class Losses(Callback):
        def on_after_backward(self, trainer, batch, losses, weights) -> None:
            seen.append(losses.clone())

    # 23 steps per epoch; logging every 20 steps: the second interval spans the boundary
    metrics = train(tmp_path, "trainer.max_epochs=2", "logging.every_n_steps=20",
                    callbacks=[Losses()])  # fmt: skip
    logged = read_scalars(tmp_path)["train/loss"]
    assert [s for s, _ in logged] == [20, 40, 46]
    assert logged[1][1] == pytest.approx(torch.cat(seen[20:40]).mean().item(), rel=1e-6)
    assert logged[2][1] == pytest.approx(torch.cat(seen[40:]).mean().item(), rel=1e-6)
    assert metrics["train/loss"] == pytest.approx(torch.cat(seen[23:]).mean().item(), rel=1e-6)


class Bfloat16Logits(torch.nn.Module):
    """A bfloat16 model: its per-sample losses are bfloat16."""

    def __init__(self, num_classes: int = 10, **_) -> None:
        super().__init__()
        self.net = torch.nn.Linear(64, num_classes).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1).to(torch.bfloat16))


def test_bfloat16_losses_are_averaged_in_float32(tmp_path) -> None:
    """train/loss of bfloat16 losses is their mean in float32, not rounded to bfloat16's 8
    bits (≈ 2e-3 off): 128 float32 additions at 2⁻²⁴ each stay within 1e-5."""
    seen: list[torch.Tensor] = []

    class Losses(Callback):
        def on_after_backward(self, trainer, batch, losses, weights) -> None:
            seen.append(losses.clone())

    train(tmp_path, f"model._target_={__name__}.Bfloat16Logits", "trainer.max_steps=4",
          "logging.every_n_steps=2", "optimizer=sgd", callbacks=[Losses()])  # fmt: skip
    assert seen[0].dtype == torch.bfloat16
    logged = read_scalars(tmp_path)["train/loss"]
    expected = [torch.cat(part).double().mean().item() for part in (seen[:2], seen[2:])]
    assert [v for _, v in logged] == pytest.approx(expected, rel=1e-5)


def test_the_epochs_loss_sum_is_folded_alike_whether_a_validation_read_it_or_not() -> None:
    """A logging step folds its window into the epoch's sum with the window's own sum when the
    epoch's pending losses are the window's (no validation since the last log), else by
    folding them: the epoch's sum is bit for bit the sum of each fold's concatenation, each
    summed in float64 and added in float64."""
    from trainer.metrics import LossTally

    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(64, generator=g) for _ in range(9)]
    tally = LossTally(torch.device("cpu"), per_token=False)
    expected = torch.zeros((), dtype=torch.float64)
    for b in batches[:3]:
        tally.add(b, None)
    tally.take_log()  # the window is the epoch's pending part
    expected += torch.cat(batches[:3]).sum(dtype=torch.float64)
    for b in batches[3:5]:
        tally.add(b, None)
    tally.epoch_parts()  # a validation in the middle of a window folds what it has
    expected += torch.cat(batches[3:5]).sum(dtype=torch.float64)
    for b in batches[5:]:
        tally.add(b, None)
    mean, total, count, samples = tally.take_log()
    expected += torch.cat(batches[5:]).sum(dtype=torch.float64)
    count_ = torch.tensor(576.0, dtype=torch.float64)
    assert torch.equal(tally.epoch_parts(), torch.stack([expected, count_]))
    assert count == samples == 384
    assert torch.equal(total, torch.cat(batches[3:]).sum(dtype=torch.float64))
    assert torch.equal(mean, torch.cat(batches[3:]).mean())


def test_the_epochs_loss_is_summed_in_float64_a_resumed_window_counts_its_samples() -> None:
    """The epoch's mean train/loss (metrics.json, the epoch lines, "done:") was a float32
    running total of its windows' sums: 2.2e-7 off an fsum of the same losses after one epoch
    of B = 8 logged every step (a probe), growing with the windows; per-token unit counts
    stopped being integers past 2²⁴. Summed in float64 now. A resumed run's first window
    counted its flattened (B·T) pending losses as samples, and ones an earlier process trained:
    samples/s 299,488 for 5,000–7,500."""
    import math

    from trainer.metrics import LossTally

    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(8, generator=g) * 3 for _ in range(2000)]
    tally = LossTally(torch.device("cpu"), per_token=False)
    for b in batches:
        tally.add(b, None)
        tally.take_log()
    total, count = tally.epoch_parts().tolist()
    reference = math.fsum(v for b in batches for v in b.double().tolist())
    # each window's float64 sum of 8 float32 values is exact (their exponents are within 2⁵²
    # of each other), and the 2,000 float64 additions keep 2,000·2⁻⁵³ relative at most
    assert count == 16000 and total == pytest.approx(reference, rel=2000 * 2.0**-53, abs=0)

    units = torch.ones(2, 3)  # per-token: 2 sequences of 3 tokens
    tally = LossTally(torch.device("cpu"), per_token=True)
    tally.add(torch.rand(2, 3, generator=g), units)
    resumed = LossTally(torch.device("cpu"), per_token=True)
    resumed.load_state_dict(tally.state_dict())
    resumed.add(torch.rand(2, 3, generator=g), units)
    assert resumed.take_log()[3] == 2  # this process's 2 sequences (not 6 + 6 rows)
    resumed.add(torch.rand(2, 3, generator=g), units)
    assert resumed.take_log()[3] == 2


def test_a_run_stopped_mid_epoch_counts_only_completed_epochs(tmp_path) -> None:
    metrics = train(tmp_path, "trainer.max_steps=30")
    assert metrics["step"] == 30 and metrics["epoch"] == 1
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["batch_in_epoch"]) == (1, 7)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["data.batch_size=5000", "data.drop_last=true"], "data.batch_size"),
        (["data.val_fraction=0.0001"], "validation split is empty"),
    ],
)
def test_empty_splits_are_refused(tmp_path, overrides, match) -> None:
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        train(tmp_path, *overrides)


def test_memory_limit_sends_a_large_set_through_a_dataloader(tmp_path) -> None:
    from trainer.data.base import DeviceLoader
    from trainer.run import build_trainer

    t = build_trainer(make_cfg("data.memory_limit_mb=0", "data.num_workers=0"), tmp_path)
    t.logger.close()
    assert isinstance(t.train_loader, DeviceLoader) and isinstance(t.val_loader, DeviceLoader)


def test_dataloader_path_trains_exactly_like_the_in_memory_path(tmp_path) -> None:
    args = ["trainer.max_steps=30", "optimizer=sgd"]
    train(tmp_path / "mem", *args, "data.loader=memory")
    train(tmp_path / "dl", *args, "data.loader=dataloader", "data.num_workers=0")
    a, b = final_params(tmp_path / "mem"), final_params(tmp_path / "dl")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_a_failing_run_says_so_and_keeps_its_events(tmp_path) -> None:
    class Boom(Callback):
        def on_train_step_end(self, trainer, out) -> None:
            if out.step == 4:
                raise RuntimeError("boom at step 4")

    with pytest.raises(RuntimeError, match="boom"):  # (3 steps an epoch: 1,438 samples)
        train(tmp_path, "logging.every_n_steps=1", "data.batch_size=512", callbacks=[Boom()])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "boom at step 4" in metrics["error"]
    assert (metrics["step"], metrics["epoch"]) == (4, 1)  # how far it got: the second epoch
    # (step 4 was taken, its update made: its scalars are written before the failure goes on,
    # as what was measured before a failure is; they were lost until 2026-12-07)
    assert [s for s, _ in read_scalars(tmp_path)["train/loss"]] == [1, 2, 3, 4]
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


def test_a_bad_config_fails_before_anything_trains(tmp_path) -> None:
    from trainer.config import ConfigError
    from trainer.run import run

    with pytest.raises(ConfigError, match="optimizer.lr"):
        run(make_cfg("optimizer.lr=0"), run_dir=tmp_path)
    assert not (tmp_path / "tb").exists() and not (tmp_path / "checkpoints").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"


@pytest.mark.parametrize(
    ("overrides", "min_acc"),
    [
        (["data=synthetic", "data.num_train=2048", "data.num_val=512"], 0.9),
        (["model=cnn"], 0.6),
    ],
)
def test_other_data_and_models_learn(tmp_path, overrides: list[str], min_acc: float) -> None:
    metrics = train(tmp_path, *overrides, "trainer.max_epochs=2")
    assert metrics["val/acc"] >= min_acc


def test_resnet18_trains_on_digits(tmp_path) -> None:
    metrics = train(tmp_path, "model=resnet18", "trainer.max_steps=2", "data.eval_batch_size=512")
    assert metrics["step"] == 2 and math.isfinite(metrics["val/loss"])


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal(caplog) -> None:
    caplog.set_level(logging.INFO, logger="trainer.logger")
    plain, tty = io.StringIO(), _Tty()
    for stream in (plain, tty):
        p = Progress(True, total_steps=3, stream=stream, every_n_steps=2)
        for step in range(1, 4):
            p.update()
            p.show(0, 1, step, {"loss": 0.5, "grad_norm": 1.25, "samples/s": 12345.6})
        p.close()
    assert plain.getvalue() == ""  # no redraws into a file ...
    lines = [r.getMessage() for r in caplog.records if r.name == "trainer.logger"]
    assert lines == ["step 2/3  epoch 1/1  loss 0.5  grad_norm 1.25  samples/s 12346"]  # ... lines
    assert "3/3" in tty.getvalue() and "\r" in tty.getvalue()
    assert "loss=0.5" in tty.getvalue() and "samples/s=12346" in tty.getvalue()
    assert "grad_norm=1.25" in tty.getvalue()
    off = _Tty()
    Progress(False, total_steps=3, stream=off).close()
    assert off.getvalue() == ""


def test_a_terminal_of_no_width_gets_lines_not_a_bar(caplog) -> None:
    """A pseudo-terminal nobody sized (0 x 0: ``script`` without a size, some CI runners)
    showed nothing at all: tqdm drew in 0 columns, and the lines are for non-terminals (a
    probe's). It gets the lines."""
    caplog.set_level(logging.INFO, logger="trainer.logger")
    leader, follower = os.openpty()  # (a new pty's size is 0 x 0)
    try:
        with open(follower, "w", closefd=True) as stream:
            assert stream.isatty() and os.get_terminal_size(stream.fileno()).columns == 0
            p = Progress(True, total_steps=2, stream=stream, every_n_steps=2)
            assert not p.active and p.lines
            for step in (1, 2):
                p.update()
                p.show(0, 1, step, {"loss": 0.5})
            p.close()
    finally:
        os.close(leader)
    lines = [r.getMessage() for r in caplog.records if r.name == "trainer.logger"]
    assert lines == ["step 2/2  epoch 1/1  loss 0.5"]


def test_progress_of_a_resumed_run_starts_at_its_step_on_its_cadence(caplog) -> None:
    """Resumed at step 503 (lines every 500): the first line came at the first logging step
    (510, off the cadence) and the bar counted from 0, ending short of its total."""
    caplog.set_level(logging.INFO, logger="trainer.logger")
    plain, tty = io.StringIO(), _Tty()
    for stream in (plain, tty):
        p = Progress(True, total_steps=1005, stream=stream, every_n_steps=500, initial=503)
        for step in range(504, 1006):
            p.update()
            if step % 10 == 0 or step == 1005:  # (the logging steps)
                p.show(0, 1, step, {"loss": 0.5})
        p.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "trainer.logger"]
    assert lines == ["step 1000/1005  epoch 1/1  loss 0.5"]
    assert "1005/1005" in tty.getvalue()


def test_progress_lines_come_at_the_first_logging_step_past_each_multiple(caplog) -> None:
    """Lines every 4 steps, values logged every 3: a line at the first logging step at or
    after each multiple of 4 (4→6, 8→9, 12→12, 16→18), so a line that came late does not
    push the cadence back. A value of 1000 or more in magnitude, negative too, is written as
    a whole number."""
    caplog.set_level(logging.INFO, logger="trainer.logger")
    p = Progress(True, total_steps=18, stream=io.StringIO(), every_n_steps=4)
    for step in range(1, 19):
        p.update()
        if step % 3 == 0:
            p.show(0, 1, step, {"loss": -12345.6})
    p.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "trainer.logger"]
    assert lines == [f"step {s}/18  epoch 1/1  loss -12346" for s in (6, 9, 12, 18)]


def test_no_bar_in_a_parallel_sweep_but_labelled_lines(caplog) -> None:
    """Jobs running side by side must not draw over each other: lines with the job number."""
    caplog.set_level(logging.INFO, logger="trainer.logger")
    tty = _Tty()
    p = Progress(True, total_steps=10, stream=tty, bar=False, every_n_steps=5, label="job 3: ")
    for step in range(1, 11):
        p.update()
        p.show(0, 2, step, {"loss": 0.25})
    p.close()
    assert tty.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records if r.name == "trainer.logger"]
    assert lines == [
        "job 3: step 5/10  epoch 1/2  loss 0.25",
        "job 3: step 10/10  epoch 1/2  loss 0.25",
    ]


class NoLr(torch.optim.Optimizer):
    """Sign descent with a step size of its own: an optimizer without an ``lr``."""

    def __init__(self, params, step_size: float = 0.01) -> None:
        super().__init__(params, {"step_size": step_size})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["step_size"])


def _plateau_lrs(values: list[float], mode: str, threshold: float) -> list[float]:
    """Each step's lr of torch's own ReduceLROnPlateau (lr 0.05, patience 0, factor 0.5)
    stepped on the logged validation ``values``: 6 steps per epoch (1,438 training samples in
    batches of 256)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.05)
    replay = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode=mode, patience=0, factor=0.5, threshold=threshold
    )
    lrs = []
    for value in values:
        lrs += [opt.param_groups[0]["lr"]] * 6
        replay.step(value)
    return lrs


def test_reduce_lr_on_plateau_steps_on_the_monitor_after_each_validation(tmp_path) -> None:
    """ReduceLROnPlateau needs the metric: it failed at the first step (no argument given),
    a probe's finding. It steps after each validation on ``monitor``: the logged lr is torch's
    own ReduceLROnPlateau replayed on the logged val/acc; a mode against the monitor's
    direction is refused before training; an optimizer without an lr logs none."""
    plateau = ["~scheduler", "+scheduler._target_=torch.optim.lr_scheduler.ReduceLROnPlateau",
               "+scheduler._partial_=true", "+scheduler.patience=0", "+scheduler.factor=0.5",
               "+scheduler.threshold=0.6",  # (a gain of 60 % counts: cuts after some epochs)
               "trainer.max_epochs=5", "data.batch_size=256", "logging.every_n_steps=1",
               "optimizer.lr=0.05"]  # fmt: skip
    with pytest.raises(ConfigError, match=r"scheduler.mode: ReduceLROnPlateau steps on val/acc"):
        train(tmp_path / "min", *plateau)  # (its default mode: min)
    train(tmp_path / "max", *plateau, "+scheduler.mode=max")
    scalars = read_scalars(tmp_path / "max")
    accs = [v for _, v in scalars["val/acc"]]
    assert len(accs) == 5
    want = _plateau_lrs(accs, mode="max", threshold=0.6)
    assert [v for _, v in scalars["lr"]] == pytest.approx(want, rel=1e-7)
    assert len(set(want)) > 1  # (it did cut the rate)
    # stopped mid-epoch by max_steps (its last step validated, a longer run's not) and
    # resumed: it stepped on that extra validation, and trained on another rate after
    train(tmp_path / "part", *plateau, "+scheduler.mode=max", "trainer.max_steps=9")
    last = tmp_path / "part" / "checkpoints" / "last.pt"
    train(tmp_path / "rest", *plateau, "+scheduler.mode=max", f"trainer.resume={last}")
    a, b = final_params(tmp_path / "max"), final_params(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)  # (the resume continues in part/)
    train(tmp_path / "nolr", "~optimizer", f"+optimizer._target_={__name__}.NoLr",
          "+optimizer._partial_=true", "trainer.max_steps=3",
          "logging.every_n_steps=1")  # fmt: skip
    logged = read_scalars(tmp_path / "nolr")
    assert "lr" not in logged and len(logged["train/loss"]) == 3


@pytest.mark.threads(2)  # (parallel kernels too: see conftest._one_thread)
def test_foreach_is_a_key_of_the_presets_and_trains_as_the_loop_does(tmp_path) -> None:
    """``+optimizer.foreach=true`` was an unknown key of the presets (a probe's finding)."""
    common = ("optimizer=sgd", "trainer.max_steps=5")
    train(tmp_path / "a", *common, "optimizer.foreach=true")
    train(tmp_path / "b", *common, "optimizer.foreach=false")
    a, b = final_params(tmp_path / "a"), final_params(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mixed_precision_of_a_float64_model_is_said_to_do_nothing(caplog) -> None:
    """Autocast leaves float64 operations alone: a float64 model under precision=bf16 or 16
    trained and logged exactly as under 32, and nothing said so (a probe's finding)."""
    import torch.nn.functional as F

    from trainer.data.base import InMemoryLoader, TensorSplit
    from trainer.loop import Trainer

    cpu = torch.device("cpu")
    loader = InMemoryLoader(TensorSplit(torch.randn(8, 4), torch.zeros(8).long()), 4, cpu, False)

    def build(model: torch.nn.Module, precision: str) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        Trainer(model, opt, loader, loader, criterion=F.cross_entropy, device=cpu,
                precision=precision)  # fmt: skip

    with caplog.at_level("WARNING", logger="trainer.loop"):
        build(MLP((4,), 2, hidden=[3]).double(), "bf16")
        build(MLP((4,), 2, hidden=[3]), "bf16")  # float32: mixed precision as asked
        build(MLP((4,), 2, hidden=[3]).double(), "32")
    said = [r.getMessage() for r in caplog.records if "float64 model" in r.getMessage()]
    assert len(said) == 1 and "precision=bf16 with a float64 model" in said[0]


def cosine_lrs(opt: torch.optim.Optimizer, steps: int) -> list[list[float]]:
    """Each group's learning rate at steps 1..steps under torch's CosineAnnealingLR."""
    replay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    want: list[list[float]] = [[] for _ in opt.param_groups]
    for _ in range(steps):
        for i, g in enumerate(opt.param_groups):
            want[i].append(g["lr"])
        opt.step()
        replay.step()
    return want


def head_faster(params, lr: float = 0.1) -> torch.optim.SGD:
    """Two parameter groups: the last layer (its weight and bias) at 3× the body's lr."""
    params = list(params)
    return torch.optim.SGD([{"params": params[:-2]}, {"params": params[-2:], "lr": 3 * lr}], lr=lr)


def test_each_parameter_groups_lr_is_logged(tmp_path) -> None:
    """With parameter groups only the first group's lr was logged (the head's 3× rate never
    showed: a probe); each group's is logged as lr/group_<i> too, equal to torch's own
    CosineAnnealingLR replayed on the same groups, step by step; one group logs lr alone."""
    common = ["scheduler=cosine", "trainer.max_steps=5", "logging.every_n_steps=1"]
    train(tmp_path / "groups", *common, "~optimizer", f"+optimizer._target_={__name__}.head_faster",
          "+optimizer._partial_=true")  # fmt: skip
    scalars = read_scalars(tmp_path / "groups")
    want = cosine_lrs(head_faster([torch.nn.Parameter(torch.ones(1)) for _ in range(3)]), 5)
    for i in (0, 1):
        assert [s for s, _ in scalars[f"lr/group_{i}"]] == [1, 2, 3, 4, 5]
        assert [v for _, v in scalars[f"lr/group_{i}"]] == pytest.approx(want[i], rel=1e-7)
    assert [v for _, v in scalars["lr"]] == [v for _, v in scalars["lr/group_0"]]
    assert want[1][0] == pytest.approx(0.3) and want[1][-1] > 0
    train(tmp_path / "one", *common, "instrument=none")
    assert not any(t.startswith("lr/") for t in read_scalars(tmp_path / "one"))


class Norms(Callback):
    """A callback of one's own named like the built-in instrument: counts its steps."""

    def __init__(self) -> None:
        self.n = 0

    def on_train_step_end(self, trainer, out) -> None:
        self.n += 1

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.n = state["n"]


@pytest.mark.parametrize(("before", "after"), [("none", "default"), ("default", "none")])
def test_a_callbacks_state_goes_back_to_its_own_class_not_a_namesake(
    tmp_path, before, after
) -> None:
    """Callback states were matched by class name alone: a callback of one's own named Norms
    lost its state to the built-in norms instrument a resume turned on, or was handed the
    instrument's and failed the resume (a probe). Matched by module and class now."""
    train(tmp_path, "trainer.max_steps=3", f"instrument={before}", callbacks=[Norms()])
    mine = Norms()
    last = tmp_path / "checkpoints" / "last.pt"
    train(tmp_path, "trainer.max_steps=5", f"instrument={after}", f"trainer.resume={last}",
          callbacks=[mine])  # fmt: skip
    assert mine.n == 5


def test_a_checkpoint_naming_callbacks_by_class_alone_gives_each_its_state(tmp_path) -> None:
    """A checkpoint written before 2026-12-05 names each callback's state by its class alone
    (not ``module.Class``): a resume still hands a callback of that class its state, so the
    step count goes on from the checkpoint's 3 to 5, not from 0 to 2."""
    from trainer.checkpoint import save_checkpoint

    train(tmp_path, "trainer.max_steps=3", "instrument=none", callbacks=[Norms()])
    last = tmp_path / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    names = [name for name, _ in state["callbacks"]]
    assert f"{__name__}.Norms" in names  # (as written now: module and class)
    state["callbacks"] = [[name.rsplit(".", 1)[-1], kept] for name, kept in state["callbacks"]]
    save_checkpoint(last, state)
    mine = Norms()
    train(tmp_path, "trainer.max_steps=5", "instrument=none", f"trainer.resume={last}",
          callbacks=[mine])  # fmt: skip
    assert mine.n == 5


def tensor_lrs(params, lr: float = 0.01) -> torch.optim.Adam:
    """Adam whose groups' learning rates are tensors (the head's 3x the body's)."""
    params = list(params)
    groups = [{"params": params[:-2]}, {"params": params[-2:], "lr": torch.tensor(3 * lr)}]
    return torch.optim.Adam(groups, lr=torch.tensor(lr), foreach=False)


def test_a_tensor_learning_rate_is_logged_as_the_step_used_it(tmp_path) -> None:
    """A tensor lr is changed in place by the scheduler before the step's values are read:
    it was logged a step ahead (a review). Against CosineAnnealingLR replayed on floats."""
    train(tmp_path, "scheduler=cosine", "trainer.max_steps=4", "logging.every_n_steps=1",
          "instrument=none", "~optimizer", f"+optimizer._target_={__name__}.tensor_lrs",
          "+optimizer._partial_=true")  # fmt: skip
    scalars = read_scalars(tmp_path)
    one, two = (torch.nn.Parameter(torch.ones(1)) for _ in range(2))
    want = cosine_lrs(
        torch.optim.SGD([{"params": [one]}, {"params": [two], "lr": 0.03}], lr=0.01), 4
    )
    for i in (0, 1):
        assert [v for _, v in scalars[f"lr/group_{i}"]] == pytest.approx(want[i], rel=1e-6)


class FrozenStatistics(torch.nn.Module):
    """An MLP with a BatchNorm its constructor puts in eval mode (pretrained statistics kept
    while its affine parameters train), or (``by_override``) one its own ``train()`` keeps in
    eval mode."""

    def __init__(self, in_shape, out_dim: int, by_override: bool = False) -> None:
        super().__init__()
        self.inp, self.bn = torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16)
        self.head, self.by_override = torch.nn.Linear(16, out_dim), by_override
        self.augment = False  # (set by its train(), read by its forward)
        if not by_override:
            self.bn.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.augment = mode  # (a side effect of one's own override)
        if self.by_override:
            self.bn.eval()
        return self

    def forward(self, x):
        h = torch.relu(self.bn(self.inp(x.flatten(1))))
        return self.head(h * (1.5 if self.augment else 1.0))


@pytest.mark.parametrize("by_override", [False, True])
def test_a_module_in_eval_mode_is_trained_so_across_epochs_and_validation(
    tmp_path, by_override, caplog
) -> None:
    """A module put in eval mode before fit (a BatchNorm's statistics frozen) stays so while
    training, also after validations: every module was put in train mode at each epoch's
    start, and the statistics trained. A model's own train() override still runs at each
    epoch's start (a review: once the modes were put back by hand after validation, its side
    effects stayed in their eval state); on_validation_end sees the model in eval mode."""
    seen: list[tuple[bool, bool, bool]] = []
    validated: list[bool] = []

    class Modes(Callback):
        def on_train_batch_start(self, trainer, batch) -> None:
            m = trainer.model
            seen.append((m.training, m.bn.training, m.augment))

        def on_validation_end(self, trainer, metrics) -> None:
            validated.append(trainer.model.training or trainer.model.head.training)

    with caplog.at_level(logging.WARNING):
        train(tmp_path, "~model", f"+model._target_={__name__}.FrozenStatistics",
              f"+model.by_override={by_override}", "trainer.max_steps=-1",
              "trainer.max_epochs=3", "data.batch_size=512", "optimizer=sgd",
              callbacks=[Modes()])  # fmt: skip
    assert len(seen) == 9 and set(seen) == {(True, False, True)}  # 3 epochs of 3 steps
    assert validated == [False] * 3
    warned = "1 module(s) are in eval mode" in caplog.text
    assert warned != by_override  # (the override's eval is the model's own train())
    stats = final_params(tmp_path)
    assert torch.equal(stats["bn.running_mean"], torch.zeros(16))  # never updated
    assert torch.equal(stats["bn.running_var"], torch.ones(16))
    assert int(stats["bn.num_batches_tracked"]) == 0


def test_fit_starts_from_no_gradients(tmp_path, caplog) -> None:
    """Gradients the parameters hold before fit (a backward by hand in a notebook, a fit that
    failed mid-step) were added to the first step's own (2e-3 in the weights with AdamW; a
    NaN left by a failed run failed the next at its first step): cleared, and said. The
    run then equals one from no gradients, bit for bit."""
    from trainer.run import build_trainer

    def fitted(dirty: bool) -> list[torch.Tensor]:
        cfg = make_cfg("trainer.max_steps=2", "logging.progress=false",
                       "trainer.checkpoint.every_n_steps=0")  # fmt: skip
        trainer = build_trainer(cfg, tmp_path / str(dirty), with_logger=False)
        if dirty:
            trainer.model(torch.randn(4, 1, 8, 8)).sum().backward()
            next(trainer.model.parameters()).grad.fill_(math.nan)
        trainer.fit()
        return [p.detach().clone() for p in trainer.model.parameters()]

    clean = fitted(False)
    with caplog.at_level(logging.WARNING):
        dirty = fitted(True)
    assert "held gradients from before the run" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(clean, dirty, strict=True))


class FailsOnce(Callback):
    """Raises once, in ``hook``, at the trainer's micro-batch ``batch`` of the epoch."""

    def __init__(
        self, hook: str, batch: int, after: FailsOnce | None = None, step: int | None = None
    ) -> None:
        self.hook, self.batch, self.armed, self.after = hook, batch, True, after
        self.step = step  # (and at this global step, where given)

    def _fail(self, trainer, hook: str) -> None:
        if self.after is not None and self.after.armed:  # (once that one has raised)
            return
        if self.step is not None and trainer.global_step != self.step:
            return
        if self.armed and hook == self.hook and trainer.batch_in_epoch == self.batch:
            self.armed = False
            raise RuntimeError("a callback's bug")

    def on_after_backward(self, trainer, batch, losses, weights) -> None:
        self._fail(trainer, "on_after_backward")

    def on_before_optimizer_step(self, trainer, optimizer) -> None:
        self._fail(trainer, "on_before_optimizer_step")

    def on_train_step_end(self, trainer, out) -> None:
        self._fail(trainer, "on_train_step_end")

    def on_train_epoch_start(self, trainer, epoch) -> None:
        self._fail(trainer, "on_train_epoch_start")

    def on_train_batch_start(self, trainer, batch) -> None:
        self._fail(trainer, "on_train_batch_start")


class StagesEach(Callback):
    """Stages a tag of its own in each epoch's start and each step's first hook."""

    def on_train_epoch_start(self, trainer, epoch) -> None:
        trainer.stage_scalars({"mine/epoch": float(epoch)})

    def on_train_batch_start(self, trainer, batch) -> None:
        trainer.stage_scalars({"mine/batch": float(trainer.batch_in_epoch)})


@pytest.mark.parametrize(
    ("hook", "batch", "step"),
    [("on_train_batch_start", 0, 0), ("on_train_batch_start", 2, 2),
     ("on_train_epoch_start", 0, 3), ("on_train_step_end", 1, 2),
     ("on_train_step_end", 0, 1)],
)  # fmt: skip
def test_a_failure_outside_a_window_is_written_at_its_step_and_trained_on_as_one_run(
    tmp_path, hook, batch, step
) -> None:
    """Failures before a window's first forward, at a later epoch's start and after an update
    (reviews): the retry was refused as staging a tag twice (what the failure wrote at the
    step it makes was taken), an epoch's start after the first wrote at the step before, and a
    logging step whose on_train_step_end raised lost its scalars (the next log averaged two
    windows), and one that does not log lost its norms. Every tag at every step as one run's
    (3 steps an epoch, 5 in all, logging every 2)."""
    from trainer.run import build_trainer

    def fitted(callbacks) -> dict:
        cfg = make_cfg("trainer.max_steps=5", "logging.every_n_steps=2", "data.batch_size=512",
                       "logging.progress=false", "trainer.checkpoint.every_n_steps=0",
                       "instrument.norms.every_n_steps=1")  # fmt: skip
        run_dir = tmp_path / str(len(callbacks))
        trainer = build_trainer(cfg, run_dir, [StagesEach(), *callbacks])
        try:
            trainer.fit()
        except RuntimeError:
            trainer.fit()
        trainer.logger.close()
        return read_scalars(run_dir)

    once = fitted([])
    fails = FailsOnce(hook, batch, step=step)
    again = fitted([fails])
    assert not fails.armed
    assert again == once


@pytest.mark.parametrize(
    ("hook", "batch", "precision"),
    [("on_after_backward", 4, "32"), ("on_after_backward", 5, "32"),
     ("on_before_optimizer_step", 5, "32"), ("on_train_step_end", 5, "32"),
     ("on_before_optimizer_step", 5, "16"), ("on_train_step_end", 5, "16")],
)  # fmt: skip
def test_a_second_fit_after_a_failure_trains_and_logs_as_one_uninterrupted(
    tmp_path, hook, batch, precision
) -> None:
    """From Python, a fit that raised (a callback's error) and is called again: inside an
    accumulation window it went on from the failing micro-batch, the earlier ones' gradients
    cleared (other weights), and the window's losses were counted twice (train/loss 0.966 for
    1.115, a probe's). The window is trained again from its first micro-batch; failing in
    the optimizer step, before the update, the step is taken back; after it (on_train_step_end)
    the step is done, its scalars written. Weights, train/loss at every step and the epoch's
    mean as one run's; with float16's GradScaler, its scale too (a failure after its
    ``unscale_`` left the optimizer unscaled: the fit called again refused to unscale it, a
    session's probe)."""
    from trainer.run import build_trainer

    def fitted(callbacks) -> tuple[list[torch.Tensor], list[float], dict]:
        cfg = make_cfg("trainer.max_steps=4", "trainer.accumulate_grad_batches=3",
                       "logging.every_n_steps=1", "logging.progress=false",
                       f"trainer.precision={precision}", "data.batch_size=64",
                       "trainer.checkpoint.every_n_steps=0")  # fmt: skip
        trainer = build_trainer(cfg, tmp_path / str(len(callbacks)), callbacks, with_logger=False)
        logged: list[float] = []
        log_scalars = trainer.log_scalars

        def keep(values, step):
            floats = log_scalars(values, step)
            logged.append(floats["train/loss"])
            return floats

        trainer.log_scalars = keep
        try:
            metrics = trainer.fit()
        except RuntimeError:
            assert callbacks and not callbacks[0].armed
            metrics = trainer.fit()
        assert not callbacks or not callbacks[0].armed  # (it raised)
        assert (trainer.scaler is None) == (precision == "32")
        if trainer.scaler is not None:
            metrics = {**metrics, "scale": trainer.scaler.state_dict()}
        return [p.detach().clone() for p in trainer.model.parameters()], logged, metrics

    weights, logged, metrics = fitted([])
    again, logged_again, metrics_again = fitted([FailsOnce(hook, batch)])
    assert metrics_again.get("scale") == metrics.get("scale")
    assert all(torch.equal(a, b) for a, b in zip(weights, again, strict=True))
    assert logged_again == logged  # (a step whose on_train_step_end raised: logged first)
    assert metrics_again["train/loss"] == metrics["train/loss"]
    assert metrics_again["step"] == metrics["step"] == 4


class SeesStepEnds(Callback):
    """The steps whose on_train_step_end and on_rest_point it saw; ``drops``: it takes the
    gradients away after each backward and gives them back before the optimizer step (a
    GradScaler then unscales none)."""

    def __init__(self, drops: bool = False) -> None:
        self.steps: list[int] = []
        self.rests: list[int] = []
        self.drops, self.kept = drops, []

    def on_after_backward(self, trainer, batch, losses, weights) -> None:
        if self.drops:
            self.kept = [p.grad for p in trainer.params]
            for p in trainer.params:
                p.grad = None

    def on_before_optimizer_step(self, trainer, optimizer) -> None:
        if self.drops:
            for p, g in zip(trainer.params, self.kept, strict=True):
                p.grad = g

    def on_train_step_end(self, trainer, out) -> None:
        self.steps.append(out.step)

    def on_rest_point(self, trainer) -> None:
        self.rests.append(trainer.global_step)


@pytest.mark.parametrize(("where", "precision"), [
    ("pre", "32"), ("post", "32"), ("pre", "16"), ("post", "16"), ("post", "16-dropped"),
    ("post", "32-last"),
])  # fmt: skip
def test_a_step_hook_of_ones_own_that_raises_is_told_before_or_after_the_update(
    tmp_path, where, precision
) -> None:
    """An optimizer step hook of one's own raising at step 2: a post-hook's failure comes
    after the update, and the fit called again took the step again, updating twice (a
    review's: weights 4.4e-3 off); a pre-hook's comes before it. Weights, the GradScaler's
    state, every tag at every step (the update ratios of the step a post-hook failed in were
    missing, its on_train_step_end never fired: a review's), its rest point (where its
    periodic checkpoint is written: lost, a review's) and the learning rates as one
    uninterrupted run's (cosine: a step done is scheduled once; with no gradient at the
    GradScaler's unscale, its update refused and the schedule was not advanced, a
    review's)."""
    from trainer.run import build_trainer

    def fitted(fails: bool) -> tuple[list[torch.Tensor], dict, dict, list[int]]:
        accumulate = 1 if precision == "16-dropped" else 3
        cfg = make_cfg("trainer.max_steps=4", f"trainer.accumulate_grad_batches={accumulate}",
                       "logging.every_n_steps=1", "logging.progress=false",
                       f"trainer.precision={precision[:2]}", "data.batch_size=64",
                       "scheduler=cosine", "trainer.checkpoint.every_n_steps=0",
                       "instrument.norms.every_n_steps=1")  # fmt: skip
        sees = SeesStepEnds(drops=precision == "16-dropped")
        trainer = build_trainer(cfg, tmp_path / f"{fails}", [sees])
        armed = [fails]

        at = 4 if precision.endswith("last") else 2  # (the run's last step: its rest point,
        # validation and epoch were left out, reviews')

        def hook(optimizer, args, kwargs) -> None:
            if armed[0] and trainer.global_step == at:
                armed[0] = False
                raise RuntimeError("a step hook's bug")

        getattr(trainer.optimizer, f"register_step_{where}_hook")(hook)
        try:
            metrics = trainer.fit()
        except RuntimeError:
            assert fails and not armed[0]
            metrics = trainer.fit()
        assert not armed[0]
        trainer.logger.close()
        if trainer.scaler is not None:
            metrics = {**metrics, "scale": trainer.scaler.state_dict()}
        weights = [p.detach().clone() for p in trainer.model.parameters()]
        metrics = {**metrics, "rests": sees.rests, "last_epoch": trainer.scheduler.last_epoch,
                   "epoch_reached": trainer.epoch}  # fmt: skip
        return weights, read_scalars(tmp_path / f"{fails}"), metrics, sees.steps

    weights, scalars, metrics, steps = fitted(False)
    again, scalars_again, metrics_again, steps_again = fitted(True)
    # (the rest points, where the periodic checkpoints are written: step 2's was lost)
    assert metrics_again["rests"] == metrics["rests"] and {2, 4} <= set(metrics["rests"])
    assert metrics_again["epoch_reached"] == metrics["epoch_reached"]
    assert metrics_again["last_epoch"] == metrics["last_epoch"] == 4
    assert all(torch.equal(a, b) for a, b in zip(weights, again, strict=True))
    assert "update_ratio/net.1.weight" in scalars and [s for s, _ in scalars["lr"]] == [1, 2, 3, 4]
    assert scalars_again == scalars
    assert metrics_again["train/loss"] == metrics["train/loss"]
    assert metrics_again.get("scale") == metrics.get("scale")
    assert metrics_again["step"] == 4
    assert steps == [1, 2, 3, 4] and steps_again == [1, 2, 3, 4]


class StagesOwn(Callback):
    """Stages tags of its own at the fit's start and after a window's first backward (of 3)."""

    def on_fit_start(self, trainer) -> None:
        trainer.stage_scalars({"mine/start": 1.0})

    def on_after_backward(self, trainer, batch, losses, weights) -> None:
        if trainer.batch_in_epoch % 3 == 0:
            trainer.stage_scalars({"mine/mb": float(trainer.batch_in_epoch)})


@pytest.mark.parametrize(("hook", "batch"), [("on_after_backward", 4),
                                             ("on_before_optimizer_step", 5),
                                             ("on_after_backward", 1)])  # fmt: skip
def test_a_second_fit_after_a_failure_logs_the_instruments_as_one_uninterrupted(
    tmp_path, caplog, hook, batch
) -> None:
    """The instruments across a fit called again after a failure in step 2's window: what
    the failed attempt wrote of step 2 was written at step 1 (a duplicate) and the noise
    scale's average took step 2 in twice (a review's), and curvature's probes of step 2 were
    drawn again from where the failed attempt's left its generator (other values at every
    measured step on, a probe's). Every tag at every step as one run's,
    read with tensorboard's reader (the failed attempt's step 2 replaced); the warning says
    what the failed forwards left (buffers, random generators). What is staged in the failing
    window is written at the step it makes (it was written at the step before, out of the
    purge's reach: step 0 after a failure in the first step, a review's). A second failure, in
    the same step's first micro-batch, leaves the average right (it named the step before as
    the failed one, a review's)."""
    from trainer.run import build_trainer

    def fitted(callbacks) -> dict:
        cfg = make_cfg("trainer.max_steps=4", "trainer.accumulate_grad_batches=3",
                       "logging.every_n_steps=1", "logging.progress=false",
                       "data.batch_size=64", "trainer.checkpoint.every_n_steps=0",
                       "instrument.norms.every_n_steps=1", "instrument.norms.agreement=true",
                       "instrument.per_sample.every_n_steps=1",
                       "instrument.curvature.every_n_steps=1")  # fmt: skip
        run_dir = tmp_path / str(len(callbacks))
        trainer = build_trainer(cfg, run_dir, [StagesOwn(), *callbacks])
        for _ in range(3):
            try:
                trainer.fit()
                break
            except RuntimeError:
                continue
        trainer.logger.close()
        return read_scalars(run_dir)

    once = fitted([])
    failures = [FailsOnce(hook, batch)]
    if hook == "on_before_optimizer_step":  # and again, in the retry's first micro-batch
        failures.append(FailsOnce("on_after_backward", 3, after=failures[0]))
    with caplog.at_level(logging.WARNING):
        again = fitted(failures)
    assert not any(f.armed for f in failures)
    assert f"the last fit failed inside step {1 + batch // 3}'s window" in caplog.text
    # (a callback of one's own saw the failed attempt's micro-batches: nothing puts it back)
    assert "callbacks of one's own, whose hooks ran for them (StagesOwn, FailsOnce" in caplog.text
    assert not any("staged twice" in r.getMessage() for r in caplog.records)
    assert again.keys() == once.keys()
    # (a fit called again fires on_fit_start again: what it stages goes with the step that
    # follows, once, the failed attempt's replaced)
    failed_step = 1 + batch // 3
    assert again.pop("mine/start") == [(1, 1.0)] + ([(2, 1.0)] if failed_step == 2 else [])
    once.pop("mine/start")
    if hook == "on_before_optimizer_step":  # (the norms had measured step 2 and kept its
        # gradient as the previous one: step 2's cosine again is NaN, said, not a wrong one)
        (step, value), *rest = again.pop("grad_agreement/consecutive")
        assert step == 2 and math.isnan(value) and rest == once["grad_agreement/consecutive"][1:]
        assert "previous step's gradients" in caplog.text or "were not kept" in caplog.text
        once.pop("grad_agreement/consecutive")
    for tag in once:
        assert again[tag] == once[tag], tag


def test_a_failure_after_a_state_was_loaded_is_taken_back_to_the_loaded_state(tmp_path) -> None:
    """The step the last update was of was kept across a load_state_dict: a fit of step 4,
    then step 3's state loaded and step 4 failing before its update, was taken for one whose
    update was done, and the next fit trained nothing (step 3's weights: a review's)."""
    import copy

    from trainer.run import build_trainer

    class Keep(Callback):
        state = None

        def on_rest_point(self, trainer) -> None:
            if trainer.global_step == 3:
                Keep.state = copy.deepcopy(trainer.state_dict())

    fails = FailsOnce("on_before_optimizer_step", 11)
    fails.armed = False
    cfg = make_cfg("trainer.max_steps=4", "trainer.accumulate_grad_batches=3",
                   "logging.progress=false", "data.batch_size=64",
                   "trainer.checkpoint.every_n_steps=0")  # fmt: skip
    trainer = build_trainer(cfg, tmp_path, [Keep(), fails], with_logger=False)
    trainer.fit()
    want = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.load_state_dict(Keep.state)
    fails.armed = True
    with pytest.raises(RuntimeError, match="a callback's bug"):
        trainer.fit()
    assert (trainer.global_step, trainer.batch_in_epoch) == (3, 9)
    assert trainer.fit()["step"] == 4
    assert all(torch.equal(a, b) for a, b in zip(want, trainer.model.parameters(), strict=True))


def test_a_plateau_scheduler_steps_once_for_a_validation_whose_hook_failed(tmp_path) -> None:
    """A fit called again after an on_validation_end that raised validates again: the
    plateau scheduler stepped again for it (lr halved twice, a review's)."""
    from trainer.run import build_trainer

    class FailsAtValidation(Callback):
        armed = True

        def on_validation_end(self, trainer, metrics) -> None:
            trainer.stage_scalars({"mine/val": 1.0})  # (staged again by the retry: it was
            if self.armed:  # refused as staged twice, a review's)
                self.armed = False
                raise RuntimeError("a callback's bug")

    def lrs(callbacks) -> list[float]:
        cfg = make_cfg("trainer.max_epochs=2", "trainer.max_steps=-1", "data.batch_size=512",
                       "logging.progress=false", "trainer.checkpoint.every_n_steps=0",
                       "~scheduler",
                       "+scheduler._target_=torch.optim.lr_scheduler.ReduceLROnPlateau",
                       "+scheduler._partial_=true", "+scheduler.mode=max", "+scheduler.patience=0",
                       "+scheduler.threshold=10.0", "monitor=val/acc")  # fmt: skip
        trainer = build_trainer(cfg, tmp_path / str(len(callbacks)), callbacks, with_logger=False)
        try:
            trainer.fit()
        except RuntimeError:
            trainer.fit()
        return [g["lr"] for g in trainer.optimizer.param_groups]

    assert lrs([FailsAtValidation()]) == lrs([])


class FailsAtValidationOnce(Callback):
    """Raises in the first ``on_validation_end`` only."""

    armed = True

    def on_validation_end(self, trainer, metrics) -> None:
        if self.armed:
            self.armed = False
            raise RuntimeError("a callback's bug")


def test_a_validation_whose_hook_failed_is_written_once(tmp_path) -> None:
    """A fit called again after an on_validation_end that raised validates again, at the
    same step with the same values: val/* were written twice there (two points at step 3,
    read back by tensorboard's reader). Once now; the next validation's as ever."""
    from trainer.run import build_trainer

    cfg = make_cfg("trainer.max_epochs=2", "trainer.max_steps=-1", "data.batch_size=512",
                   "logging.progress=false", "trainer.checkpoint.every_n_steps=0")  # fmt: skip
    trainer = build_trainer(cfg, tmp_path, [FailsAtValidationOnce()])
    with pytest.raises(RuntimeError, match="a callback's bug"):
        trainer.fit()
    trainer.fit()
    trainer.logger.close()
    scalars = read_scalars(tmp_path)
    assert [s for s, _ in scalars["val/acc"]] == [3, 6]
    assert [s for s, _ in scalars["val/loss"]] == [3, 6]


def test_a_nan_validation_whose_hook_failed_is_written_once(tmp_path) -> None:
    """As above, with a NaN val/loss (a NaN output in eval mode): the fit called again
    validates again at the same step and wrote val/* there a second time, the written values
    being compared with ``==``, for which NaN is never equal to itself."""
    from trainer.run import build_trainer

    def nan_in_eval(module, inputs, out):
        if not module.training:
            out = out.clone()
            out[0, 0] = float("nan")
            return out

    cfg = make_cfg("trainer.max_epochs=2", "trainer.max_steps=-1", "data.batch_size=512",
                   "logging.progress=false", "trainer.checkpoint.every_n_steps=0")  # fmt: skip
    trainer = build_trainer(cfg, tmp_path, [FailsAtValidationOnce()])
    trainer.model.register_forward_hook(nan_in_eval)
    with pytest.raises(RuntimeError, match="a callback's bug"):
        trainer.fit()
    trainer.fit()
    trainer.logger.close()
    scalars = read_scalars(tmp_path)
    assert math.isnan(scalars["val/loss"][0][1])
    assert [s for s, _ in scalars["val/loss"]] == [3, 6]
    assert [s for s, _ in scalars["val/acc"]] == [3, 6]


def test_a_second_fit_with_a_longer_run_logs_everything_at_its_new_last_step(tmp_path) -> None:
    """From Python, max_steps raised after a fit and fit called again: the run's last step
    (which logs every scalar) was the first fit's, so the new last step had train/loss but
    not grad_norm/total or lr (a probe's). It is the new one's."""
    from trainer.run import build_trainer

    cfg = make_cfg("trainer.max_steps=3", "logging.every_n_steps=4", "logging.progress=false",
                   "trainer.checkpoint.every_n_steps=0")  # fmt: skip
    trainer = build_trainer(cfg, tmp_path, with_logger=False)
    seen: dict[int, set[str]] = {}
    log_scalars = trainer.log_scalars

    def keep(values, step):
        seen.setdefault(step, set()).update(values)
        return log_scalars(values, step)

    trainer.log_scalars = keep
    trainer.fit()
    trainer.max_steps = 5
    trainer.fit()
    assert {"train/loss", "grad_norm/total", "lr"} <= seen[3] and seen[3] == seen[5]
    assert sorted(seen) == [3, 4, 5]


def test_a_trainer_of_ones_own_writes_its_events_when_fit_ends(tmp_path) -> None:
    """A Trainer built in Python, whose logger nothing closes, held its events in memory after
    fit (written by close() or after 30 s): a script ending without closing lost every
    scalar. They are on disk when fit returns, and when it raises."""
    from trainer.logger import TensorBoardLogger
    from trainer.run import build_trainer

    cfg = make_cfg("trainer.max_steps=3", "logging.every_n_steps=1", "logging.progress=false",
                   "trainer.checkpoint.every_n_steps=0")  # fmt: skip
    for fails in (False, True):
        run_dir = tmp_path / str(fails)
        trainer = build_trainer(cfg, run_dir, [FailsOnce("on_train_step_end", 1)] if fails else [],
                                with_logger=False)  # fmt: skip
        trainer.logger = TensorBoardLogger(run_dir / "tb")
        if fails:
            with pytest.raises(RuntimeError, match="a callback's bug"):
                trainer.fit()
        else:
            trainer.fit()
        steps = [s for s, _ in read_scalars(run_dir)["train/loss"]]
        assert steps == ([1, 2] if fails else [1, 2, 3])  # (step 2's, written before it failed)


def test_a_run_puts_the_process_deterministic_settings_back(tmp_path, monkeypatch) -> None:
    """trainer.deterministic sets process-wide switches; a run() puts them back as it found
    them (a notebook's own warn-only deterministic mode was switched off for good by a run
    with the default false; one with true left it on, and CUBLAS_WORKSPACE_CONFIG set).
    During a run they are as its config says: true is strict even in a process that was in
    warn-only mode (it ran with nondeterministic kernels only warned of, a review's finding),
    with cuBLAS's workspace setting, a value of one's own kept."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # (so that the undo puts back what
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")  # was there, also if the run leaked one)
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark)  # fmt: skip
    seen = []

    def process() -> tuple[bool, bool, bool, str | None]:
        return (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark,
                os.environ.get("CUBLAS_WORKSPACE_CONFIG"))  # fmt: skip

    class During(Callback):
        def on_fit_start(self, trainer) -> None:
            seen.append(process())

    strict = "trainer.deterministic=true"
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = True
        train(tmp_path / "a", "trainer.max_steps=1", callbacks=[During()])
        assert process() == (True, True, True, None)
        train(tmp_path / "b", "trainer.max_steps=1", strict, callbacks=[During()])
        assert process() == (True, True, True, None)
        torch.use_deterministic_algorithms(False)
        train(tmp_path / "c", "trainer.max_steps=1", strict, callbacks=[During()])
        assert process() == (False, False, True, None)
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        train(tmp_path / "d", "trainer.max_steps=1", strict, callbacks=[During()])
        assert process() == (False, False, True, ":16:8")
        assert seen == [(False, False, True, None), (True, False, False, ":4096:8"),
                        (True, False, False, ":4096:8"), (True, False, False, ":16:8")]  # fmt: skip
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]


class _UnfreezeStatistics(Callback):
    """Puts the frozen BatchNorm in train mode after step 2 (once); records its mode at each
    step's start."""

    def __init__(self) -> None:
        self.seen: dict[int, bool] = {}

    def on_fit_start(self, trainer) -> None:  # (on a resume too: the checkpoint's modes win)
        trainer.model.bn.eval()

    def on_train_batch_start(self, trainer, batch) -> None:
        self.seen[trainer.global_step + 1] = trainer.model.bn.training

    def on_train_step_end(self, trainer, out) -> None:
        if trainer.global_step == 2:
            trainer.model.bn.train()


def test_a_mode_a_callback_sets_mid_run_is_kept_across_epochs_and_a_resume(tmp_path) -> None:
    """A callback's mode change mid-run (a frozen BatchNorm trained from step 2 on) was undone
    at the next epoch's start (a review); kept now, and checkpointed: a run resumed after it
    trains as the uninterrupted one, bit for bit."""
    common = (
        "~model",
        f"+model._target_={__name__}.FrozenStatistics",
        "trainer.max_steps=-1",
        "trainer.max_epochs=3",
        "data.batch_size=512",
        "optimizer=sgd",
        f"trainer.checkpoint.search_dir={tmp_path}",
        "trainer.checkpoint.every_n_steps=1",
    )
    whole, first, second = _UnfreezeStatistics(), _UnfreezeStatistics(), _UnfreezeStatistics()
    train(tmp_path / "whole", *common, "trainer.run_id=w", callbacks=[whole])
    assert whole.seen == {1: False, 2: False, **{k: True for k in range(3, 10)}}
    train(tmp_path / "part", *common, "trainer.run_id=p", "trainer.max_epochs=2",
          callbacks=[first])  # fmt: skip
    train(tmp_path / "more", *common, "trainer.run_id=p", "trainer.resume=auto",
          callbacks=[second])  # (its flip at step 2 is long past)  # fmt: skip
    assert second.seen == {k: True for k in range(7, 10)}
    a, b = final_params(tmp_path / "whole"), final_params(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_trainers_next_fit_keeps_its_modes_or_takes_those_set_since(tmp_path) -> None:
    """fit() leaves the model in its training modes, and the same Trainer fitted again trains
    in the modes the model has then, set by hand in between or not (a review: ignored once,
    a BatchNorm frozen for another stage trained)."""
    from trainer.run import build_trainer

    seen: list[bool] = []

    class Modes(Callback):
        def on_train_batch_start(self, trainer, batch) -> None:
            seen.append(trainer.model.bn.training)

    cfg = make_cfg("~model", f"+model._target_={__name__}.FrozenStatistics",
                   "trainer.max_steps=-1", "trainer.max_epochs=1", "data.batch_size=512",
                   "trainer.checkpoint.every_n_steps=0")  # fmt: skip
    trainer = build_trainer(cfg, tmp_path, [Modes()], with_logger=False)
    trainer.fit()
    assert trainer.model.training and not trainer.model.bn.training  # (fit leaves them so)
    trainer.max_epochs = 2
    trainer.fit()
    assert seen == [False] * 6  # frozen in both fits
    trainer.model.train()  # a second stage: every module trains
    trainer.max_epochs = 3
    trainer.fit()
    assert seen[6:] == [True] * 3
    trainer.model.bn.eval()  # a third: frozen again
    trainer.max_epochs = 4
    trainer.fit()
    assert seen[9:] == [False] * 3


class _Scaled(torch.nn.Module):
    """A factor its own train() sets (1.5 in train mode, 1.0 in eval mode) and its forward
    reads: a side effect beyond the mode flag."""

    def __init__(self) -> None:
        super().__init__()
        self.k = 1.5  # (a module starts in train mode)

    def train(self, mode: bool = True):
        super().train(mode)
        self.k = 1.5 if mode else 1.0
        return self

    def forward(self, h):
        return h * self.k


class SideEffects(torch.nn.Module):
    """A model whose own train() and a child's set factors their forwards read."""

    def __init__(self, in_shape, out_dim: int) -> None:
        super().__init__()
        self.inp, self.sub, self.head = (
            torch.nn.Linear(64, 16),
            _Scaled(),
            torch.nn.Linear(16, out_dim),
        )
        self.scale = 2.0

    def train(self, mode: bool = True):
        super().train(mode)
        self.scale = 2.0 if mode else 1.0
        return self

    def forward(self, x):
        return self.head(self.sub(torch.tanh(self.inp(x.flatten(1))))) * self.scale


class _Switches(Callback):
    """The child to eval mode after step 1, the whole model after step 5."""

    def on_train_step_end(self, trainer, out) -> None:
        if trainer.global_step == 1:
            trainer.model.sub.eval()
        if trainer.global_step == 5:
            trainer.model.eval()


@pytest.mark.parametrize("at", [(4,), (5,), (1, 2)])
def test_a_resume_replays_the_modes_train_overrides_and_all(tmp_path, at) -> None:
    """Modes reached by train() overrides with side effects and a callback's switches: a
    resume from a step after a validation with the child in eval mode (4), after the whole
    model was put in eval mode (5), and from a resumed run's own checkpoint before it
    validated (1, then its 2) trains as the uninterrupted run, bit for bit (a resume that
    put the flags back alone, ran the model's train() before them, or replayed a resumed
    run's checkpoint from its current modes left factors the forward reads as another call
    had set them: reviews)."""
    import shutil

    common = ("~model", f"+model._target_={__name__}.SideEffects", "trainer.max_steps=-1",
              "trainer.max_epochs=3", "data.batch_size=512", "optimizer=sgd",
              "trainer.checkpoint.every_n_steps=1", "trainer.checkpoint.keep_last=20",
              "trainer.run_id=s", f"trainer.checkpoint.search_dir={tmp_path / 'none'}")  # fmt: skip
    train(tmp_path / "whole", *common, callbacks=[_Switches()])
    want = final_params(tmp_path / "whole")
    source = tmp_path / "whole"
    for i, step in enumerate(at):  # each resume from the last one's (or the whole run's) file
        path = tmp_path / f"from{i}" / "checkpoints" / f"step_{step:09d}.pt"
        path.parent.mkdir(parents=True)
        shutil.copy(source / "checkpoints" / path.name, path)
        train(tmp_path / f"resumed{i}", *common, f"trainer.resume={path}", callbacks=[_Switches()])
        got = final_params(tmp_path / f"from{i}")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), i
        source = tmp_path / f"from{i}"


def test_the_schedule_plans_a_ragged_last_window_as_a_step(tmp_path) -> None:
    """5 batches an epoch, accumulating 2: 3 optimizer steps (the last of one batch), so a
    cosine schedule over the run has T_max = 3 (planned with floor, 2: the last step trained at
    lr 0, and the "last step" logged one step early)."""
    from trainer.loop import planned_steps

    assert planned_steps(5, 2, 1, -1) == 3 and planned_steps(5, 2, 2, 4) == 4
    common = ("data=synthetic", "data.num_train=320", "data.num_val=64", "data.batch_size=64",
              "trainer.accumulate_grad_batches=2", "trainer.max_epochs=1", "scheduler=cosine",
              "optimizer=sgd", "optimizer.lr=0.1")  # fmt: skip
    train(tmp_path / "every", *common, "logging.every_n_steps=1")
    lrs = [v for _, v in read_scalars(tmp_path / "every")["lr"]]
    want = [0.1 * (1 + math.cos(math.pi * k / 3)) / 2 for k in range(3)]  # 0.1, 0.075, 0.025
    assert lrs == pytest.approx(want, rel=2**-23)  # (logged as float32)
    train(tmp_path / "rare", *common, "logging.every_n_steps=100")
    assert [s for s, _ in read_scalars(tmp_path / "rare")["train/loss"]] == [3]


def test_reduce_lr_on_plateau_steps_on_the_configured_monitor(tmp_path) -> None:
    """``monitor=val/loss`` with a ReduceLROnPlateau in its default mode (min): the run hands
    its monitor to the Trainer, which steps the scheduler on it (the logged lr is torch's own
    scheduler replayed on the logged val/loss). Left at the loss's own val/acc (a mutation
    the suite missed), fit() refused mode=min for val/acc."""
    plateau = ["~scheduler", "+scheduler._target_=torch.optim.lr_scheduler.ReduceLROnPlateau",
               "+scheduler._partial_=true", "+scheduler.patience=0", "+scheduler.factor=0.5",
               "+scheduler.threshold=0.5",  # (val/loss falls 44 % in epoch 2: a cut)
               "trainer.max_epochs=3", "data.batch_size=256",
               "logging.every_n_steps=1", "optimizer.lr=0.05", "monitor=val/loss",
               "trainer.checkpoint.every_n_steps=0"]  # fmt: skip
    result = train(tmp_path, *plateau)
    assert result["monitor"] == "val/loss" and result["status"] == "completed"
    scalars = read_scalars(tmp_path)
    losses = [v for _, v in scalars["val/loss"]]
    assert len(losses) == 3
    want = _plateau_lrs(losses, mode="min", threshold=0.5)
    assert [v for _, v in scalars["lr"]] == pytest.approx(want, rel=1e-7)
    assert len(set(want)) > 1  # (it did cut the rate)


def test_a_keyboard_interrupt_in_a_step_is_raised_and_recorded_as_interrupted(tmp_path) -> None:
    """Ctrl-C mid-run (a KeyboardInterrupt out of a step's hook, where no signal handler
    caught it) reaches the caller as itself, and metrics.json says ``interrupted`` at the step
    it stopped after, not ``failed`` (the distinction a mutation the suite missed erased)."""

    class CtrlC(Callback):
        def on_train_step_end(self, trainer, out) -> None:
            if out.step == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, "trainer.max_steps=4", callbacks=[CtrlC()])
    status = json.loads((tmp_path / "metrics.json").read_text())
    assert status["status"] == "interrupted" and status["step"] == 2
    assert status["error"] == "KeyboardInterrupt: "


def test_sweep_progress_draws_bars_under_the_basic_launcher_only(monkeypatch) -> None:
    """In a multirun, each job's lines are labelled with its number; Hydra's basic launcher
    runs jobs one after another, where a bar is drawn, and a parallel launcher (joblib) not:
    their bars would draw over each other (``not basic``, a mutation the suite missed, swapped
    them). Outside a multirun nothing changes."""
    from types import SimpleNamespace

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from trainer.run import _sweep_progress

    launchers = {
        "hydra._internal.core_plugins.basic_launcher.BasicLauncher": True,
        "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher": False,
    }
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    for target, bar in launchers.items():
        hydra = SimpleNamespace(mode=RunMode.MULTIRUN, launcher={"_target_": target},
                                job=SimpleNamespace(num=3))  # fmt: skip
        monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda h=hydra: h))
        assert _sweep_progress() == {"bar": bar, "label": "job 3: "}
    hydra = SimpleNamespace(mode=RunMode.RUN, launcher={}, job=SimpleNamespace(num=0))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hydra))
    assert _sweep_progress() == {}


def test_a_validation_repeated_with_other_values_is_written_again(tmp_path) -> None:
    """A fit called again after an on_validation_end that raised validates again at the
    same step: the same values are written once, but a model changed between the fits (its
    weights halved: another loss) gives other values, which are written too, the second
    point at that step being the values the fit called again returned, not left out for
    the step's earlier ones."""
    from trainer.run import build_trainer

    cfg = make_cfg("trainer.max_epochs=1", "trainer.max_steps=-1", "data.batch_size=512",
                   "logging.progress=false", "trainer.checkpoint.every_n_steps=0")  # fmt: skip
    trainer = build_trainer(cfg, tmp_path, [FailsAtValidationOnce()])
    with pytest.raises(RuntimeError, match="a callback's bug"):
        trainer.fit()
    first = trainer.metrics["val/loss"]
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.mul_(0.5)
    again = trainer.fit()["val/loss"]
    trainer.logger.close()
    points = read_scalars(tmp_path)["val/loss"]
    assert [s for s, _ in points] == [3, 3]
    assert [v for _, v in points] == pytest.approx([first, again], rel=1e-6)
    assert abs(again - first) > 1e-3
