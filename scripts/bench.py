"""Benchmark: the trainer against a plain hand-written PyTorch loop, and the CLI's wall time.

    python scripts/bench.py                       # digits/mlp, 2,000 steps, 10 rounds, + CLI
    python scripts/bench.py --steps 500 --rounds 3 --no-cli
    python scripts/bench.py data=synthetic model=cnn data.shape=[1,28,28]   # other data/models
    python scripts/bench.py --no-cli --variant "loss.mode=vector weighting=focal" \
        --variant "regularizer=[l2]"             # settings against the default trainer too
    python scripts/bench.py --device cuda --no-cli --variant "instrument.norms.every_n_steps=1"
    python scripts/bench.py --no-cli --rounds 1 --ops 3 +optimizer.fused=true \
        instrument.nonfinite.sync=deferred      # + kernels and host reads per step, counted

The plain loop mirrors the trainer's defaults (scalar mode, float32, no accumulation, clipping or
scheduler): overrides that change those change only the trainer's side, so compare like with
like (data, model, loss, optimizer and batch-size overrides apply to both). It trains with the
trainer's loss as a hand-written loop would write it (``F.cross_entropy``'s or ``F.mse_loss``'s
own mean, per-token cross-entropy over the flattened tokens; a user's loss: its losses' own
average), so classification, regression and sequence models are all compared:

    python scripts/bench.py --no-cli experiment=diabetes_mse
    python scripts/bench.py --no-cli --steps 200 experiment=chars_lm

Both loops train the same model (same init), on the same in-memory data, batch size, batch order,
optimizer and number of steps, validating after each epoch, in one process; the two alternate
epoch by epoch so drift in machine speed hits both. The ratio is trainer time / plain time
(median over rounds). Each ``--variant`` adds a third (fourth, ...) loop to the same alternation:
the trainer with those overrides on top, reported against the plain loop and against the trainer
without them (the per-round ratio's median), so a setting's cost is measured head to head.
The CLI part runs ``python scripts/train.py`` with its defaults as a user would and reports wall
time (start-up included) and peak resident memory. Results are printed and written to
outputs/bench/<time>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

import trainer  # noqa: F401  (registers the config schemas)
from trainer.data.base import InMemoryLoader, epoch_order
from trainer.losses import MSE, CrossEntropy, TokenCrossEntropy
from trainer.run import build_trainer

ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loss(criterion, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training loss as a hand-written loop writes it for the trainer's loss: PyTorch's own
    reduction, no per-sample losses kept. A loss it has none for (a user's) is its per-element
    losses' own average (Σuℓ / Σu for per-token losses)."""
    if isinstance(criterion, CrossEntropy):
        return F.cross_entropy(output, y, label_smoothing=criterion.label_smoothing)
    if isinstance(criterion, TokenCrossEntropy) and criterion.average == "tokens":
        return F.cross_entropy(
            output.flatten(0, 1), y.flatten(), ignore_index=criterion.ignore_index,
            label_smoothing=criterion.label_smoothing,
        )  # fmt: skip
    if isinstance(criterion, MSE):
        return F.mse_loss(output.reshape(y.shape), y)
    losses = criterion(output, y)
    units = criterion.units(y, losses.dtype)
    return losses.mean() if units is None else (losses * units).sum() / units.sum()


def plain_epochs(t, steps: int, writer) -> Iterator[None]:
    """A hand-written loop over the trainer's own model, optimizer, data and loss, logging as
    such a loop does: the step's loss every ``logging.every_n_steps`` steps and the validation
    metrics after each epoch, to TensorBoard through ``writer`` (a ``SummaryWriter``, made
    before the timing as the trainer's logger is), flushed at each epoch's end: its writer
    thread's work is the plain loop's, not drained in the next loop's timed epoch (a
    review's); yields per epoch."""
    model, opt, device, criterion = t.model, t.optimizer, t.device, t.criterion
    train, val = t.train_loader, t.val_loader
    x_all, y_all, bs, n = train.x, train.y, train.batch_size, train.num_samples
    transform = train.transform  # (the in-memory vision sets' uint8 → normalized float)
    end = n - n % bs if train.drop_last else n  # (data.drop_last: no ragged last batch)
    every = t.log_every.n
    step, epoch = 0, 0
    while step < steps:
        model.train()
        order = epoch_order(n, train.seed, epoch).to(device)
        for i in range(0, end, bs):
            idx = order[i : i + bs]
            x = x_all[idx] if transform is None else transform(x_all[idx])
            loss = plain_loss(criterion, model(x), y_all[idx])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % every == 0:
                writer.add_scalar("train/loss", loss.item(), step)  # host sync: logging steps
            if step == steps:
                break
        model.eval()  # the same validation metrics as the trainer (the loss's val_sums)
        with torch.no_grad():
            sums: dict[str, torch.Tensor] = {}
            for x, y, _ in val:
                for k, v in criterion.val_sums(model(x), y).items():
                    sums[k] = sums[k] + v if k in sums else v
        values = {k: float(v[0]) / max(float(v[1]), 1.0) for k, v in sums.items()}
        for k, v in criterion.finalize(values).items():
            writer.add_scalar(k, v, step)
        writer.flush()
        epoch += 1
        yield
    writer.close()


def trainer_epochs(t) -> Iterator[None]:
    """The trainer at its default settings (what ``fit`` runs), one epoch per ``next``."""
    t._fire("on_fit_start")  # as fit() does: callbacks set themselves up here
    while not t.finished():
        t.run_epoch()
        yield
    t.write_deferred()  # as fit() does at the end: what was measured on steps that did not log
    t.logger.close()


def timed_alternation(loops: list[Iterator[None]], device: torch.device) -> list[float]:
    """Advance each loop an epoch at a time, in turn; seconds spent in each."""
    spent = [0.0] * len(loops)
    live: list[Iterator[None] | None] = list(loops)
    while any(live):
        for k, it in enumerate(live):
            if it is None:
                continue
            sync(device)
            start = time.perf_counter()
            try:
                next(it)
            except StopIteration:
                live[k] = None
            sync(device)
            spent[k] += time.perf_counter() - start
    return spent


def build(overrides: list[str], steps: int, run_dir: Path):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"trainer.max_steps={steps}",
                "trainer.max_epochs=1000000",
                "logging.progress=false",
                *overrides,
            ],
        )
    return build_trainer(cfg, run_dir)


def bench_loops(overrides: list[str], steps: int, rounds: int, variants: list[str] = ()) -> dict:
    from torch.utils.tensorboard import SummaryWriter

    names = ["trainer", "plain", *variants]
    times: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(-1, rounds):  # round -1 warms the process up, untimed (the first
            # loop run paid its first uses: a review's)
            length = steps if r >= 0 else min(steps, 50)
            # the same seed gives every loop the same initial weights and batch order
            t = build(overrides, length, Path(tmp) / f"trainer{r}")
            p = build(overrides, length, Path(tmp) / f"plain{r}")
            vs = [
                build([*overrides, *v.split()], length, Path(tmp) / f"variant{r}_{i}")
                for i, v in enumerate(variants)
            ]
            if not isinstance(t.train_loader, InMemoryLoader):
                sys.exit("bench compares in-memory data sets only (set data.loader=memory)")
            writer = SummaryWriter(str(Path(tmp) / f"plain{r}_tb"))
            loops = [trainer_epochs(t), plain_epochs(p, length, writer), *map(trainer_epochs, vs)]
            # epoch by epoch, in turn, starting with a different loop each round, so drift in
            # machine speed hits every loop alike
            shift = max(r, 0) % len(loops)
            order = list(range(shift, len(loops))) + list(range(shift))
            spent = timed_alternation([loops[k] for k in order], t.device)
            p.logger.close()
            if r < 0:
                continue
            for k, sec in zip(order, spent, strict=True):
                times[names[k]].append(sec)

    def ratios(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(times[a], times[b], strict=True)]

    result = {
        "steps": steps,
        "rounds": rounds,
        "trainer_s": statistics.median(times["trainer"]),
        "plain_s": statistics.median(times["plain"]),
        "ratio_median": statistics.median(ratios("trainer", "plain")),
        "ratio_of_sums": sum(times["trainer"]) / sum(times["plain"]),
        "ratios": ratios("trainer", "plain"),
        "trainer_steps_per_s": steps / statistics.median(times["trainer"]),
    }
    result["variants"] = {
        v: {
            "s": statistics.median(times[v]),
            "vs_plain": statistics.median(ratios(v, "plain")),
            "vs_trainer": statistics.median(ratios(v, "trainer")),
            "vs_trainer_per_round": ratios(v, "trainer"),
        }
        for v in variants
    }
    return result


def bench_histogram(n: int, repeats: int = 5) -> dict:
    """One histogram of an n-element tensor: on-device binning + add_histogram_raw against
    SummaryWriter.add_histogram (host copy, float64, NumPy binning), both written to disk."""
    from torch.utils.tensorboard import SummaryWriter

    from trainer.instrument import histograms

    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        writer = SummaryWriter(tmp, max_queue=1000, flush_secs=3600)  # writing is not timed
        # each method in its own block: interleaved with add_histogram, our kernels ran about
        # 2x slower (NumPy's worker threads, likely, still spinning after its binning)
        for i in range(repeats + 1):  # the first round warms up
            start = time.perf_counter()
            (h,) = histograms([x], bins=64)
            writer.add_histogram_raw(
                "ours", h.min, h.max, h.num, h.sum, h.sum_squares, h.bucket_limits,
                h.bucket_counts, global_step=i,
            )  # fmt: skip
            if i:
                ours.append(time.perf_counter() - start)
        for i in range(repeats + 1):
            start = time.perf_counter()
            writer.add_histogram("theirs", x, global_step=i)
            if i:
                theirs.append(time.perf_counter() - start)
        writer.close()
    return {
        "histogram_elements": n,
        "histogram_ours_s": statistics.median(ours),
        "histogram_add_histogram_s": statistics.median(theirs),
        "histogram_speedup": statistics.median(theirs) / statistics.median(ours),
    }


def bench_ops(overrides: list[str], epochs: int, variants: list[str] = ()) -> dict:
    """Operations dispatched per optimizer step, counted (not timed): the kernels a GPU would
    launch (view, alias, profiler and bare allocation operations left out) and the host reads
    of a tensor's value (``item``, ``bool``, ``float``, f-strings: one ``_local_scalar_dense``
    each; ``tolist``, ``numpy`` and ``cpu`` calls, one each, also of a tensor already on the
    CPU), for the plain loop, the trainer and each variant, over ``epochs`` epochs after a
    first one (whose first step creates the optimizer's state), their validation and the end
    of the run included. On a launch-bound GPU each kernel costs its launch, so this is that
    cost counted on any machine; CPU and CUDA dispatch the same operations (a foreach call is
    one operation on both, one launch on CUDA where its tensors agree in dtype and device). An
    operation whose output size depends on the values (``nonzero``, ``masked_select``, indexing
    with a boolean mask, read or written) waits for a GPU as well: a kernel and a host read."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    scalar_read = aten._local_scalar_dense.default
    sized_by_values = {aten.nonzero.default, aten.masked_select.default}
    indexing = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default,
                aten._index_put_impl_.default}  # fmt: skip
    masks = (torch.bool, torch.uint8)
    no_kernel = {aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
                 aten.new_empty.default, aten.new_empty_strided.default,
                 aten.empty_permuted.default, scalar_read}  # fmt: skip

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.kernels = self.reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is scalar_read:
                self.reads += 1
            elif not (func.is_view or func.namespace == "profiler" or func in no_kernel):
                self.kernels += 1
                if func in sized_by_values or (func in indexing and any(
                    i is not None and i.dtype in masks for i in args[1]
                )):  # fmt: skip
                    self.reads += 1  # (the mask's count reaches the host first)
            return func(*args, **(kwargs or {}))

    T = torch.Tensor
    reads_of = {T.tolist, T.numpy, T.cpu}  # (the rest reach _local_scalar_dense)

    class Reads(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.reads = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.reads += func in reads_of
            return func(*args, **(kwargs or {}))

    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in [("trainer", []), ("plain", None), *((v, v.split()) for v in variants)]:
            probe = build([*overrides, *(extra or [])], 1, Path(tmp) / "probe")
            per_epoch = len(probe.train_loader)
            probe.logger.close()
            steps = per_epoch * (epochs + 1)
            t = build([*overrides, *(extra or [])], steps, Path(tmp) / f"ops_{len(out)}")
            if t.accumulate != 1:
                sys.exit("--ops counts runs without gradient accumulation")
            if extra is None:
                from torch.utils.tensorboard import SummaryWriter

                loop = plain_epochs(t, steps, SummaryWriter(str(Path(tmp) / "ops_tb")))
            else:
                loop = trainer_epochs(t)
            next(loop)  # the first epoch, not counted
            kernels, reads = Count(), Reads()
            with kernels, reads:
                for _ in loop:
                    pass
            if extra is None:
                t.logger.close()
            counted = steps - per_epoch
            host_reads = kernels.reads + reads.reads
            out[name] = {"kernels_per_step": kernels.kernels / counted,
                         "host_reads_per_step": host_reads / counted}  # fmt: skip
    return {"ops_epochs": epochs, "ops": out}


#: what every PyTorch training script pays before its first step: importing torch and building
#: an optimizer (which imports torch._dynamo)
FLOOR = "import torch; torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)"


#: runs its arguments as a command and prints [wall s, exit code, peak RSS KiB] of that child.
#: A child's peak RSS counts what its parent had mapped when it forked (Linux keeps that high
#: water mark through exec), so the command is started from this small interpreter, not from
#: the bench's process with torch loaded
_MEASURE = (
    "import json, os, subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "print(json.dumps([time.perf_counter() - start, os.waitstatus_to_exitcode(status),"
    " usage.ru_maxrss]))\n"
)


def measured_run(cmd: list[str], cwd: Path = ROOT) -> tuple[float, float]:
    """Run ``cmd`` to completion (output discarded): its wall time (s) and its own peak resident
    memory (MiB, ``wait4``'s resource usage of that one process, started from a small helper
    interpreter, see ``_MEASURE``); a failure raises."""
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, *cmd], cwd=cwd, check=True, capture_output=True, text=True
    )
    wall, code, peak_kib = json.loads(out.stdout)
    if code != 0:
        raise subprocess.CalledProcessError(code, cmd)
    return wall, peak_kib / 1024  # ru_maxrss is in KiB on Linux


def bench_cli(repeats: int) -> dict:
    """``python scripts/train.py`` with its defaults, as a user runs it, alternated with the
    floor (:data:`FLOOR`) run the same way, so the start-up is judged against what the machine
    takes for torch alone at the same moment."""
    walls, peaks, accs, floor_walls, floor_peaks = [], [], [], [], []
    for i in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            wall, peak = measured_run(
                [sys.executable, str(ROOT / "scripts" / "train.py"), f"hydra.run.dir={tmp}/run{i}"]
            )
            walls.append(wall)
            peaks.append(peak)
            accs.append(json.loads((Path(tmp) / f"run{i}" / "metrics.json").read_text())["val/acc"])
        wall, peak = measured_run([sys.executable, "-c", FLOOR])
        floor_walls.append(wall)
        floor_peaks.append(peak)
    return {
        "cli_wall_s_median": statistics.median(walls),
        "cli_wall_s": walls,
        "cli_peak_rss_mib": max(peaks),
        "cli_val_acc": accs,
        "floor_wall_s_median": statistics.median(floor_walls),
        "floor_wall_s": floor_walls,
        "floor_peak_rss_mib": max(floor_peaks),
        "cli_over_floor_s_median": statistics.median(
            w - f for w, f in zip(walls, floor_walls, strict=True)
        ),
    }


def bench_startup(repeats: int) -> dict:
    """Process start to the end of the first training step of ``python scripts/train.py``:
    what a user waits for before training, in every job of a sweep. The job logs a progress
    line after step 1 (output is not a terminal here); its timestamp ends the interval."""
    stamp = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\].* step 1/1 ", re.M)
    firsts, walls = [], []
    for i in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start, t0 = time.time(), time.perf_counter()
            proc = subprocess.run(
                [sys.executable, str(ROOT / "scripts" / "train.py"), f"hydra.run.dir={tmp}/run{i}",
                 "trainer.max_steps=1", "logging.every_n_steps=1",
                 "logging.progress_every_n_steps=1"],
                check=True, cwd=ROOT, capture_output=True, text=True,
            )  # fmt: skip
            walls.append(time.perf_counter() - t0)
            found = stamp.search(proc.stdout + proc.stderr)
            if found is None:
                raise RuntimeError(f"no 'step 1/1' line in the output:\n{proc.stdout[-2000:]}")
            logged = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            firsts.append(logged - start)
    return {
        "startup_to_first_step_s_median": statistics.median(firsts),
        "startup_to_first_step_s": firsts,
        "startup_one_step_run_wall_s": walls,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--cli-repeats", type=int, default=3)
    p.add_argument("--no-cli", action="store_true", help="skip timing python scripts/train.py")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="OVERRIDES",
        help="also time the trainer with these extra overrides (space-separated); repeatable",
    )
    p.add_argument(
        "--histogram",
        type=int,
        default=0,
        metavar="N",
        help="also time one histogram of an N-element tensor against add_histogram",
    )
    p.add_argument(
        "--startup",
        type=int,
        default=0,
        metavar="N",
        help="also time process start to the first training step of the CLI, N times",
    )
    p.add_argument(
        "--ops",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="also count the operations each loop dispatches per step (kernels a GPU would "
        "launch, host reads) over EPOCHS epochs after a first one",
    )
    p.add_argument(
        "--device",
        default=None,
        help="trainer.device for both loops (e.g. cuda; in-memory data then lives on the GPU)",
    )
    p.add_argument("--out", type=Path, help="result file (default: outputs/bench/<time>.json)")
    p.add_argument("overrides", nargs="*", help="config overrides, as for scripts/train.py")
    args = p.parse_args()
    if args.device:
        args.overrides = [*args.overrides, f"trainer.device={args.device}"]

    result = {
        "overrides": args.overrides,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **bench_loops(args.overrides, args.steps, args.rounds, args.variant),
    }
    print(
        f"trainer {result['trainer_s']:.3f} s  plain {result['plain_s']:.3f} s  "
        f"ratio {result['ratio_median']:.3f} (median of {args.rounds}; of sums "
        f"{result['ratio_of_sums']:.3f}; per round "
        + ", ".join(f"{r:.3f}" for r in result["ratios"])
        + f")  {result['trainer_steps_per_s']:.0f} steps/s"
    )
    for v, r in result["variants"].items():
        print(
            f"  + {v}: {r['s']:.3f} s, {r['vs_plain']:.3f}x plain, {r['vs_trainer']:.3f}x the "
            "trainer without it (per round "
            + ", ".join(f"{x:.3f}" for x in r["vs_trainer_per_round"])
            + ")"
        )
    if args.ops:
        result.update(bench_ops(args.overrides, args.ops, args.variant))
        for name, r in result["ops"].items():
            print(
                f"{name}: {r['kernels_per_step']:.2f} kernels, {r['host_reads_per_step']:.2f} "
                "host reads per step (counted, validation included)"
            )
    if args.histogram:
        result.update(bench_histogram(args.histogram))
        print(
            f"histogram of {args.histogram:,} values: {result['histogram_ours_s'] * 1e3:.1f} ms "
            f"on the device + add_histogram_raw vs {result['histogram_add_histogram_s'] * 1e3:.1f}"
            f" ms add_histogram: {result['histogram_speedup']:.1f}x"
        )
    if not args.no_cli:
        result.update(bench_cli(args.cli_repeats))
        print(
            f"python scripts/train.py: {result['cli_wall_s_median']:.2f} s wall (median of "
            f"{args.cli_repeats}: "
            + ", ".join(f"{w:.2f}" for w in result["cli_wall_s"])
            + f"), peak RSS {result['cli_peak_rss_mib']:.0f} MiB, val/acc {result['cli_val_acc']}"
        )
        print(
            f"  floor (import torch, build an optimizer): {result['floor_wall_s_median']:.2f} s, "
            f"{result['floor_peak_rss_mib']:.0f} MiB; the run takes "
            f"{result['cli_over_floor_s_median']:.2f} s more (median of the pairs)"
        )
    if args.startup:
        result.update(bench_startup(args.startup))
        print(
            "python scripts/train.py, process start to the end of step 1: "
            f"{result['startup_to_first_step_s_median']:.2f} s (median of {args.startup}: "
            + ", ".join(f"{w:.2f}" for w in result["startup_to_first_step_s"])
            + ")"
        )
    out = args.out or ROOT / "outputs" / "bench" / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
