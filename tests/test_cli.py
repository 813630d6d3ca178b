"""The real CLI, as a user runs it, in a subprocess."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import ROOT, in_background, read_scalars

from trainer.data.base import InMemoryLoader
from trainer.logger import event_dir


def cli(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    flags = [a for a in args if a.startswith("-")]  # Hydra's flags (-m) come before overrides
    overrides = [a for a in args if not a.startswith("-")]
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *flags, "trainer.device=cpu",
         *overrides],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _single_run(path):
    return cli("trainer.max_epochs=2", f"hydra.run.dir={path / 'run'}"), path / "run"


@in_background(_single_run)
def test_single_run_prints_a_summary_and_writes_its_run_dir(background) -> None:
    proc, run_dir = background
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    # stdout is a pipe here: no bar redraws, a plain line per epoch and a final summary
    assert "\r" not in out
    assert "epoch 1/2" in out and "epoch 2/2" in out
    assert "done: val/acc" in out and f"tensorboard --logdir {run_dir}" in out
    for path in (".hydra/config.yaml", ".hydra/overrides.yaml", "checkpoints/last.pt",
                 "metrics.json", "train.log"):  # fmt: skip
        assert (run_dir / path).is_file(), path
    assert list(event_dir(run_dir).glob("events.out.tfevents.*"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    # (the overrides it ran with, as .hydra/ says: a report tells an earlier run's from them)
    assert metrics["overrides"] == ["trainer.device=cpu", "trainer.max_epochs=2"]
    assert metrics["sweep_id"] is None  # (a single run's)
    assert "- trainer.device=cpu" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "epoch 2/2" in (run_dir / "train.log").read_text()


def _workers_run(path):
    return cli("trainer.max_steps=3", "data.loader=dataloader", "data.num_workers=2",
               "instrument=none", f"hydra.run.dir={path / 'run'}")  # fmt: skip


@in_background(_workers_run)
def test_a_run_with_dataloader_workers_exits(background) -> None:
    """Workers ignore stop signals (trainer.data.base.ignore_stop_signals), and so the SIGTERM
    multiprocessing ends them with at exit: a first version's runs finished their work and
    then waited for them forever (a review's finding; subprocess.run's timeout fails it)."""
    proc = background
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done: val/acc" in proc.stdout + proc.stderr


def _multirun(path):
    proc = cli("-m", "optimizer.lr=0.01,0.1", "loss.mode=scalar,vector", "trainer.max_steps=4",
               "logging.every_n_steps=2", f"hydra.sweep.dir={path / 'sweep'}")  # fmt: skip
    return proc, path / "sweep"


@in_background(_multirun)
def test_multirun_gives_each_job_its_own_dir_and_tensorboard_run(background) -> None:
    proc, sweep = background
    assert proc.returncode == 0, proc.stderr
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        seen.add(tuple(sorted(o for o in overrides if o.startswith(("optimizer.lr", "loss.mode")))))
        assert json.loads((job / "metrics.json").read_text())["status"] == "completed"
        assert [s for s, _ in read_scalars(job)["train/loss"]] == [2, 4]
    assert len(seen) == 4


@in_background(
    lambda path: cli("data=mnist", f"data.root={path / 'nodata'}", f"hydra.run.dir={path / 'r'}")
)
def test_missing_torchvision_files_say_where_to_put_them(background) -> None:
    proc = background
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "train-images-idx3-ubyte" in err and "data.download=true" in err


def _config_error(path):
    bad = ("trainer.max_epochs=-3", f"hydra.run.dir={path / 'run'}")
    plain = cli(*bad)
    full = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *bad], cwd=ROOT,
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )  # fmt: skip
    built = cli("weighting=per_class", "weighting.weights=[1,1,3]", "loss.mode=vector",
                f"hydra.run.dir={path / 'built'}")  # fmt: skip
    return plain, full, built, path / "run"


@in_background(_config_error)
def test_a_config_error_is_one_line_naming_the_key_and_its_run_records_it(background) -> None:
    """A value out of range is a user's error, not the trainer's: the CLI says which key and
    why, in one line without a traceback, exits 1, and the run's metrics.json records it;
    ``HYDRA_FULL_ERROR=1`` still shows the traceback (Hydra's own switch); the run's
    ``train.log`` holds either. So is a value
    refused while its component is built (a ValueError of the trainer's own: a probe's)."""
    plain, full, built, run_dir = background
    message = "trainer.max_epochs: got -3, must be >= 1"
    assert plain.returncode == 1, plain.stderr[-2000:]
    assert f"Error: {message}" in plain.stderr.splitlines(), plain.stderr[-2000:]
    assert "Traceback" not in plain.stderr + plain.stdout
    assert built.returncode == 1 and "Traceback" not in built.stderr + built.stdout
    assert "Error: weighting.weights: got 3 weights but the data has 10 classes" in built.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed" and message in metrics["error"], metrics
    assert full.returncode == 1
    assert "Traceback (most recent call last)" in full.stderr and message in full.stderr
    # the run's log file says why too (it was empty, a probe's): the line, then (the second
    # run in the folder, HYDRA_FULL_ERROR=1) the traceback
    logged = (run_dir / "train.log").read_text()
    assert f"Error: {message}" in logged, logged
    assert logged.index(f"Error: {message}") < logged.index("Traceback (most recent call last)")
    assert "failed, with the traceback below" in logged, logged
    assert f"ConfigError: {message}" in logged.split("Traceback (most recent call last)")[1]


def _raise(error: Exception) -> None:
    raise error


def test_only_the_trainers_own_refusals_lose_their_traceback() -> None:
    """The one-line form is for errors the trainer raises itself, whose message says what is
    wrong; an error raised in one's own code or in torch's keeps the traceback that leads to
    its cause."""
    from trainer.config import _check
    from trainer.losses import check_metric_names
    from trainer.sweep import own_refusal

    def caught(fn, *args) -> BaseException:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001
            return e
        raise AssertionError("nothing raised")

    assert own_refusal(caught(_check, False, "trainer.max_epochs", "got -3"))  # ConfigError
    bad_names = SimpleNamespace(metrics=("acc",))  # (not under val/)
    assert own_refusal(caught(check_metric_names, bad_names))  # a ValueError of its own
    assert not own_refusal(caught(_raise, ValueError("my model's own check")))  # one's own code
    mismatched = (torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))  # (batch sizes 2 and 3)
    assert not own_refusal(caught(torch.nn.functional.cross_entropy, *mismatched))  # torch's
    assert not own_refusal(ValueError("never raised"))  # (no traceback: not known)
    looped = caught(_check, False, "k", "m")
    looped.__cause__ = looped  # (a chain that loops: answered, where it hung, a review's)
    assert own_refusal(looped)
    from trainer.checkpoint import load_checkpoint  # a missing file the trainer names

    assert own_refusal(caught(load_checkpoint, ROOT / "no_such_checkpoint.pt"))
    # a component of one's own refused for its kind (a callback's hook that the loop cannot
    # call, a Dataset's sample that is no pair): a ContractError, its message the whole story
    # (they printed the trainer's traceback, a probe's); a TypeError Python raises inside the
    # trainer (a bug of its own) keeps it
    from trainer.callbacks import Callback
    from trainer.data.base import _pair_of
    from trainer.loop import check_callback

    class Arity(Callback):
        def on_flush(self) -> None:  # type: ignore[override]
            pass

    assert own_refusal(caught(check_callback, Arity(), "callbacks.mine"))
    assert own_refusal(caught(_pair_of, [{"x": 1, "y": 2}], 0))
    assert not own_refusal(caught(check_callback, None))  # (None has no hooks: Python's)
    # refused in a call one's own code made (a callback staging a string): the traceback
    # leads to that line (it was lost, a review's)
    from trainer.metrics import Staging

    def stages_a_string() -> None:
        Staging().stage({"mine/x": "oops"})  # type: ignore[dict-item]

    staged = caught(stages_a_string)
    assert isinstance(staged, TypeError) and not own_refusal(staged)


def test_a_refusal_wrapping_an_error_of_ones_own_code_keeps_its_traceback(
    tmp_path, monkeypatch
) -> None:
    """``model._target_`` naming a module that fails while it is imported is refused by the
    trainer, but the cause is in one's own file: its traceback leads there (a review's: the
    one-line form hid it); one whose cause is importlib's (no such module) needs none."""
    from trainer.components import resolve_target
    from trainer.sweep import own_refusal

    (tmp_path / "my_broken_model.py").write_text(
        "def helper():\n    return undefined\n\nhelper()\n"
    )
    # (failing inside the standard library called from one's own line: a review's)
    (tmp_path / "my_json_model.py").write_text("import json\n\njson.loads('{bad json')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # a SyntaxError is raised in importlib's frozen code (a frame of no file): the message
    # names the file and the line, no traceback needed
    (tmp_path / "my_unparsable_model.py").write_text("def broken(:\n    pass\n")
    cases = (("my_broken_model.Net", True), ("my_json_model.Net", True),
             ("no_such_module_here.Net", False), ("my_unparsable_model.Net", False))  # fmt: skip
    for name, own in cases:
        with pytest.raises(Exception) as caught:
            resolve_target("model", name)
        assert own_refusal(caught.value) is not own, name
    # one's own module that resolves another at its import: the trainer's refusal wraps the
    # trainer's refusal of the other module, which wraps the error in one's own file; the
    # whole chain is followed to it
    (tmp_path / "my_plugin_model.py").write_text(
        "from trainer.components import resolve_target\n\n"
        "Net = resolve_target('model', 'my_broken_model.Net')\n"
    )
    with pytest.raises(Exception) as caught:
        resolve_target("model", "my_plugin_model.Net")
    assert not own_refusal(caught.value)


def _bench(path):
    out = path / "bench.json"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--no-cli", "--steps", "30",
         "--rounds", "2", "--variant", "loss.mode=vector weighting=focal", "--ops", "1",
         "--out", str(out)],
        check=True, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return json.loads(out.read_text())


@in_background(_bench)
def test_bench_times_the_trainer_a_plain_loop_and_variants(background) -> None:
    result = background
    assert result["steps"] == 30 and len(result["ratios"]) == 2
    # a ratio of two measured times (its size depends on the machine's load: not asserted)
    assert math.isfinite(result["ratio_median"]) and result["ratio_median"] > 0
    variant = result["variants"]["loss.mode=vector weighting=focal"]
    assert len(variant["vs_trainer_per_round"]) == 2 and variant["s"] > 0
    # counted, not timed: the trainer adds kernels to the plain loop's (the guard's check,
    # the per-sample losses' root), the focal weighting more again
    ops = result["ops"]
    names = ("plain", "trainer", "loss.mode=vector weighting=focal")
    plain, trainer, focal = (ops[k]["kernels_per_step"] for k in names)
    assert 0 < plain < trainer < focal
    assert all(r["host_reads_per_step"] > 0 for r in ops.values())  # (logging, validation)


def _bench_module():
    """scripts/bench.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.parametrize("data", ["digits", "digits-drop_last", "mnist"])
def test_the_bench_plain_loop_does_the_trainers_work(tmp_path, monkeypatch, data) -> None:
    """The plain loop and the trainer it is timed against train the same model on the same
    batches with the same optimizer: after 30 steps (digits: an epoch of 23 batches, its last
    ragged, and 7 of the next; MNIST's in-memory set: 20 images in batches of 8) their
    parameters are equal bit for bit, and so are their validation metrics at each epoch's end.
    Until 2026-12-06 the plain loop trained the ragged batch that ``data.drop_last`` drops, and
    took the images without the split's transform (MNIST's uint8 → normalized float) that the
    trainer's loader applies (a review's findings): unlike work, timed side by side."""
    bench = _bench_module()
    overrides = ["logging.every_n_steps=4"]
    if data == "mnist":
        from test_data_vision import write_set

        write_set("mnist", tmp_path / "data", monkeypatch)
        overrides += ["data=mnist", f"data.root={tmp_path / 'data'}", "data.batch_size=8"]
    elif data == "digits-drop_last":
        overrides.append("data.drop_last=true")
    t = bench.build(overrides, 30, tmp_path / "trainer")
    p = bench.build(overrides, 30, tmp_path / "plain")
    assert (t.train_loader.transform is not None) == (data == "mnist")
    for _ in bench.trainer_epochs(t):
        pass
    from torch.utils.tensorboard import SummaryWriter

    for _ in bench.plain_epochs(p, 30, SummaryWriter(str(tmp_path / "plain_run" / "tb" / "run"))):
        pass
    p.logger.close()
    assert t.global_step == 30
    trained, plain = dict(t.model.named_parameters()), dict(p.model.named_parameters())
    assert all(torch.equal(trained[k], plain[k]) for k in trained)
    ours, theirs = read_scalars(tmp_path / "trainer"), read_scalars(tmp_path / "plain_run")
    for tag in ("val/loss", "val/acc"):
        assert theirs[tag] == ours[tag] and len(ours[tag]) >= 2, tag
    assert [s for s, _ in theirs["train/loss"]] == list(range(4, 31, 4))  # (read every 4)


def test_the_bench_builds_each_loop_with_its_overrides_and_the_whole_length(
    tmp_path, monkeypatch
) -> None:
    """The overrides reach the trainer and the plain loop, a variant's on top of them, and every
    loop trains the steps asked for: 70 steps of 3 batches an epoch (digits, B = 512) is more
    than the default 20 epochs, which ended the trainers at 60 where the plain loop went on."""
    bench = _bench_module()
    built = {}

    def build(overrides, steps, run_dir):
        built[run_dir.name] = t = real(overrides, steps, run_dir)
        return t

    real = bench.build
    monkeypatch.setattr(bench, "build", build)
    common = ["optimizer=adamw", "optimizer.lr=0.01", "data.batch_size=512"]
    variant = "optimizer.lr=0.02 optimizer.weight_decay=0.5"  # (two overrides in one)
    bench.bench_loops(common, steps=70, rounds=1, variants=[variant])
    got = {k: (g["lr"], g["weight_decay"]) for k, t in built.items()
           for g in t.optimizer.param_groups}  # fmt: skip
    assert got == {"trainer0": (0.01, 0.01), "plain0": (0.01, 0.01), "variant0_0": (0.02, 0.5),
                   "trainer-1": (0.01, 0.01), "plain-1": (0.01, 0.01),
                   "variant-1_0": (0.02, 0.5)}  # fmt: skip
    for name, t in built.items():  # (AdamW counts its steps per parameter; round -1 warms
        # the process up, 50 steps untimed)
        want = 50 if "-1" in name else 70
        assert {int(s["step"]) for s in t.optimizer.state.values()} == {want}, name


def test_the_bench_alternates_its_loops_and_takes_medians_of_their_ratios(monkeypatch) -> None:
    """The round-robin and its arithmetic on known times: each round starts with the next loop
    (trainer, plain, variant), after a warm-up round whose times are not counted; a loop's
    seconds are its own, the ratios are trainer / plain per round and their median (not the
    ratio of medians, nor a mean); each loop's seconds are the sum over its epochs, taken in
    turn."""
    bench = _bench_module()
    # (round -1, the warm-up: 100 s each, counted nowhere)
    seconds = {"trainer": [2.0, 1.0, 10.0, 100.0], "plain": [1.0, 2.0, 1.0, 100.0],
               "v": [3.0, 2.0, 2.0, 100.0]}  # fmt: skip
    firsts = []

    def build(overrides, steps, run_dir):  # trainer-1 (the warm-up), plain1, variant2_0, ...
        kind, r = re.fullmatch(r"([a-z]+)(-?\d+)(?:_\d+)?", run_dir.name).groups()
        loader = InMemoryLoader.__new__(InMemoryLoader)
        return SimpleNamespace(kind="v" if kind == "variant" else kind, round=int(r),
                               train_loader=loader, device=torch.device("cpu"),
                               logger=SimpleNamespace(close=lambda: None))  # fmt: skip

    def timed(loops, device):
        firsts.append(loops[0].kind)
        return [seconds[loop.kind][loop.round] for loop in loops]

    alternation = bench.timed_alternation
    monkeypatch.setattr(bench, "build", build)
    monkeypatch.setattr(bench, "trainer_epochs", lambda t: t)
    monkeypatch.setattr(bench, "plain_epochs", lambda p, steps, writer: p)
    monkeypatch.setattr(bench, "timed_alternation", timed)
    result = bench.bench_loops([], steps=30, rounds=3, variants=["v"])
    assert firsts == ["trainer", "trainer", "plain", "v"]
    assert result["ratios"] == [2.0, 0.5, 10.0] and result["ratio_median"] == 2.0
    assert (result["trainer_s"], result["plain_s"]) == (2.0, 1.0)
    assert result["ratio_of_sums"] == 13.0 / 4.0 and result["trainer_steps_per_s"] == 15.0
    assert result["variants"]["v"] == {"s": 2.0, "vs_plain": 2.0, "vs_trainer": 1.5,
                                       "vs_trainer_per_round": [1.5, 2.0, 0.2]}  # fmt: skip
    clock, calls = [0.0], []

    def epochs(name: str, cost: float, n: int):
        for _ in range(n):
            calls.append(name)
            clock[0] += cost
            yield

    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    spent = alternation([epochs("a", 1.0, 3), epochs("b", 2.0, 2)], torch.device("cpu"))
    assert spent == [3.0, 4.0] and calls == ["a", "b", "a", "b", "a"]


def test_the_bench_measures_each_process_own_peak_memory() -> None:
    """The start-up measurement's helper: a process that holds 400 MiB more than a bare
    interpreter reports 400 MiB more, in MiB (2²⁰ bytes: within the few MiB the allocator's
    pages move it; ru_maxrss's KiB read as 1,000 per MiB said 409.6), a bare interpreter far
    less (its own peak: not this test process's ~500 MiB, which a child forked straight from
    it would report), and a failing command raises."""
    bench = _bench_module()
    _, big = bench.measured_run([sys.executable, "-c", "x = b'1' * (400 * 2**20)"])
    wall, small = bench.measured_run([sys.executable, "-c", "pass"])
    assert 396 <= big - small <= 404 and small < 100 and wall > 0
    with pytest.raises(subprocess.CalledProcessError):
        bench.measured_run([sys.executable, "-c", "raise SystemExit(3)"])


@pytest.mark.parametrize("experiment", ["digits_scalar", "diabetes_mse", "chars_lm",
                                        "chars_lm_per_token"])  # fmt: skip
def test_the_bench_plain_loop_trains_on_the_trainers_own_loss(tmp_path, experiment) -> None:
    """The plain loop's loss (PyTorch's own reduction) is the scalar the trainer
    backpropagates for the same batch (its per-element losses' own average), for
    classification, regression and per-token sequence losses. The two sum B (or B·T) float32
    terms in different orders: within float32 rounding of a mean of a few hundred terms."""
    import torch
    from conftest import make_cfg

    from trainer.objective import Window
    from trainer.run import build_trainer

    bench = _bench_module()
    t = build_trainer(make_cfg(f"experiment={experiment}"), tmp_path, with_logger=False)
    x, y, _ = next(iter(t.train_loader))
    with torch.no_grad():
        output = t.model(x)
        losses = t.criterion(output, y)
        units = t.objective.check_losses(losses, y)
        window = Window(y.shape[0], 1, None if units is None else units.sum())
        root = t.objective.scalar_root(losses, units, y, window)
        plain = bench.plain_loss(t.criterion, output, y)
    torch.testing.assert_close(plain, root, rtol=1e-6, atol=0.0)


def _noise_module():
    import importlib.util

    path = ROOT / "scripts" / "noise_scale.py"
    spec = importlib.util.spec_from_file_location("noise_scale", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _study_runs(monkeypatch, capsys, *argv: str) -> tuple[list, int | str | None, str]:
    """The noise study's ``main`` on ``argv``, its runs not trained but recorded (their batch
    size and ``drop_last``): (runs, exit code, stderr). No run reaches the target, so a grid
    that passes its checks ends with "fewer than two batch sizes reached the target"."""
    study, runs = _noise_module(), []
    monkeypatch.setattr(
        study, "run", lambda cfg, run_dir, callbacks: runs.append(
            (cfg.data.batch_size, cfg.data.drop_last))
    )  # fmt: skip
    monkeypatch.setattr(study, "last_value", lambda run_dir, tag, until: math.nan)
    monkeypatch.setattr(sys, "argv", ["noise_scale.py", *argv])
    with pytest.raises(SystemExit) as ended:
        study.main()
    return runs, ended.value.code, capsys.readouterr().err


def test_the_noise_study_refuses_a_batch_size_past_the_training_split(
    monkeypatch, capsys, tmp_path
) -> None:
    """``--batch-sizes 8 4096`` trained its B = 4096 runs on batches of the whole split (1,438
    samples) and fitted S(B) to them as B = 4096, without a word (a probe's): refused before
    any run trains."""
    runs, code, err = _study_runs(
        monkeypatch, capsys, "--batch-sizes", "8", "4096", "1439", "1438", "--lrs", "0.4",
        "--out", str(tmp_path),
    )  # fmt: skip
    assert runs == [] and code == 2
    assert ("--batch-sizes: 4096, 1439 larger than the training split (1438 samples): no step "
            "has such a batch") in err  # fmt: skip
    assert not any(tmp_path.iterdir())


def test_every_step_of_a_noise_study_run_is_a_batch_of_its_size(monkeypatch, capsys, tmp_path):
    """B = 512 ended each epoch with a batch of 414 (1,438 = 2·512 + 414), its steps counted
    as of 512 (a probe's): the study's runs drop an epoch's short last batch. The largest batch
    the split holds is a study's point."""
    runs, code, _ = _study_runs(
        monkeypatch, capsys, "--batch-sizes", "8", "512", "1438", "--lrs", "0.4", "0.8",
        "--out", str(tmp_path),
    )  # fmt: skip
    assert code == "fewer than two batch sizes reached the target; raise --max-steps"
    assert runs == [(b, True) for b in (8, 512, 1438) for _ in (0.4, 0.8)]


@pytest.mark.parametrize("order", [(16, 32, 64), (32, 16, 64), (64, 32, 16)])
def test_the_noise_studys_median_leaves_out_runs_measured_before_none(order) -> None:
    """A best run that reached the target before the first measured step has no B_simple
    (NaN): statistics.median over a list with a NaN depended on its order (12.9, 13.4 or NaN,
    a probe). The median is of the measured runs, whatever their order."""
    values = {16: math.nan, 32: 13.4, 64: 12.9}
    steps = {16: 100, 32: 60, 64: 40}
    best = {b: {"batch_size": b, "steps": steps[b], "b_simple": values[b]} for b in order}
    result = _noise_module().fit(best, 0.5, [])
    assert result["b_simple_median"] == statistics.median([13.4, 12.9])
    assert result["b_simple_runs"] == 2 and result["fit"]["of_the_predicted_form"]
    rising = {b: {**r, "steps": 200 - steps[b]} for b, r in best.items()}  # more steps with B
    assert not _noise_module().fit(rising, 0.5, [])["fit"]["of_the_predicted_form"]


def test_the_noise_studys_median_best_runs_and_stopping_rule(tmp_path) -> None:
    """The median of three measured B_simple (not their mean); per batch size the run of the
    fewest steps (the grid's first on a tie; one that never reached the target is none); the
    stop: EMA e₁ = ℓ₁, eₖ = 0.9·eₖ₋₁ + 0.1·ℓₖ, at or below the target ends the run at that
    step (losses 1, 0, 0, …: eₖ = 0.9^(k−1), first ≤ 0.5 at k = 8, 0.9⁷ = 0.478 against 0.9⁶
    = 0.531); the instrument's last finite value at or before a step, read from the events."""
    from trainer.logger import TensorBoardLogger

    mod = _noise_module()
    best = {b: {"batch_size": b, "steps": 200 // b, "b_simple": v}
            for b, v in ((16, 100.0), (32, 13.4), (64, 10.0))}  # fmt: skip
    assert mod.fit(best, 0.5, [])["b_simple_median"] == 13.4
    rows = [{"batch_size": b, "lr": lr, "steps": n}
            for b, lr, n in ((16, 0.1, 30), (16, 0.2, 20), (16, 0.4, 20), (32, 0.1, None),
                             (32, 0.2, 50), (64, 0.1, None))]  # fmt: skip
    assert mod.best_runs(rows) == {16: rows[1], 32: rows[4]}

    def stop_at(target: float, losses: list[float]) -> tuple[int | None, int]:
        stop, trainer = mod.StopAtTarget(target), SimpleNamespace(max_steps=100)
        for k, loss in enumerate(losses, 1):
            stop.on_train_step_end(trainer, SimpleNamespace(step=k, losses=torch.full((3,), loss)))
        return stop.reached, trainer.max_steps

    assert stop_at(0.5, [1.0] + [0.0] * 11) == (8, 8)
    assert stop_at(0.5, [0.5, 0.6, 0.0]) == (1, 1)  # (at the target: reached)
    assert stop_at(0.5, [0.6] * 5) == (None, 100)
    run = tmp_path / "run"
    writer = TensorBoardLogger(event_dir(run))  # (the writer and the folder of a real run)
    for step, v in ((5, 1.0), (10, 2.0), (15, math.nan), (20, 4.0), (25, 5.0)):
        writer.add_floats({"per_sample/noise_scale_ema": v, "per_sample/noise_scale": v}, step)
    writer.close()
    got = [mod.last_value(run, "per_sample/noise_scale_ema", until) for until in (20, 15, 4)]
    assert got[:2] == [4.0, 2.0] and math.isnan(got[2])
    assert math.isnan(mod.last_value(run, "per_sample/other", 20))


def test_the_noise_study_trains_each_grid_point_once(tmp_path, monkeypatch) -> None:
    """A batch size or learning rate given twice trained twice into the same folder (the first
    run's outputs set aside under the second's, which the summary then named: a review's
    finding); each point of the grid trains once, in the order given."""
    mod = _noise_module()
    trained = []
    monkeypatch.setattr(mod, "run", lambda cfg, run_dir, callbacks: trained.append(
        (cfg.data.batch_size, cfg.optimizer.lr, run_dir.name)))  # fmt: skip
    monkeypatch.setattr(mod, "last_value", lambda run_dir, tag, until: math.nan)
    argv = ["--batch-sizes", "16", "16", "8", "--lrs", "0.4", "0.2", "0.4", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["noise_scale.py", *argv])
    with pytest.raises(SystemExit, match="fewer than two batch sizes reached the target"):
        mod.main()  # (the stand-in trains nothing: no run reaches the target)
    assert trained == [(16, 0.4, "b16_lr0.4"), (16, 0.2, "b16_lr0.2"), (8, 0.4, "b8_lr0.4"),
                       (8, 0.2, "b8_lr0.2")]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({}, ""),
        ({"batch_sizes": [1, 32]}, "--batch-sizes: each must be >= 2"),
        ({"batch_sizes": [32]}, "--batch-sizes: give at least two different ones"),
        ({"batch_sizes": [32, 32]}, "--batch-sizes: give at least two different ones"),
        ({"lrs": [0.4, 0.0]}, "--lrs: each must be finite and > 0"),
        ({"lrs": [math.inf]}, "--lrs: each must be finite and > 0"),
        ({"target": 0.0}, "--target: must be finite and > 0"),
        ({"target": math.nan}, "--target: must be finite and > 0"),
        ({"max_steps": 0}, "--max-steps: must be >= 1"),
        ({"batch_sizes": [2, 33]}, "--batch-sizes: 33 larger than the training split (32 samples)"),
    ],
)
def test_the_noise_studys_grid_checks(change, why) -> None:
    grid = {"batch_sizes": [2, 32], "lrs": [0.4], "target": 0.5, "max_steps": 1,
            "train_samples": 32, **change}  # fmt: skip
    got = _noise_module().refusal(**grid)
    assert got.startswith(why) and (got == "") == (why == "")


def test_the_noise_study_refuses_a_bad_grid_before_training(tmp_path) -> None:
    """A NaN learning rate was refused by the config check only when its run started, after
    the earlier runs had trained (no JSON written for them)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "noise_scale.py"), "--lrs", "0.4", "nan",
         "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "--lrs: each must be finite and > 0" in proc.stderr
    assert not any(tmp_path.iterdir())


def _noise_study(path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "noise_scale.py"), "--batch-sizes", "32", "128",
         "--lrs", "0.4", "--target", "0.5", "--max-steps", "400", "--out", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return proc, path


@in_background(_noise_study)
def test_the_noise_scale_study_fits_its_curve_and_reads_the_instrument(background) -> None:
    proc, out = background
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "noise_scale.json").read_text())
    best = {r["batch_size"]: r for r in result["best"]}
    assert sorted(best) == [32, 128] and all(r["steps"] for r in best.values())
    s_min, b_noise = result["fit"]["s_min"], result["fit"]["b_noise"]
    for b, r in best.items():  # two points: the fitted curve passes through both
        assert s_min * (1 + b_noise / b) == pytest.approx(r["steps"], rel=1e-9)
        assert math.isfinite(r["b_simple"])  # the instrument's estimate, read from the run
    assert (out / "noise_scale.png").stat().st_size > 0
    # (two batch sizes, one learning rate: the fit passes through both, and means little;
    # printed without a word before, a review's)
    assert "2 batch size(s) reached the target, with 1 learning rate(s)" in proc.stdout
