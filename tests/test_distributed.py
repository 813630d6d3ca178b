"""Data parallel on 2 CPU processes (gloo): exactly the gradients of one process on the global
batch, rank 0 alone writing, and a dead rank ending the job.

The ranks are children forked from the test process (its imports come along: no 4 s start-up
per process), each on one thread (GNU OpenMP's pool does not survive a fork), joined into a gloo
process group through the same environment variables torchrun sets. One test launches the real
``torchrun``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo  # noqa: F401  (imported once here, not in every child)
from conftest import ROOT, compose_before_forking, make_cfg, read_scalars
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_byo_refusals import CountsF1
from test_unfreeze import STEPS as UNFREEZE_STEPS
from torch.distributed import TCPStore
from torch.func import functional_call

from trainer.callbacks import Callback
from trainer.checkpoint import load_checkpoint, step_path
from trainer.data.base import TensorSplit, epoch_order
from trainer.data.chars import CharText
from trainer.data.synthetic import SyntheticData
from trainer.logger import event_dir
from trainer.losses import CrossEntropy

FORK = mp.get_context("fork")
B = 32  # per process; the single-process reference takes 2 * B
COMMON = (
    "trainer.max_steps=20", "logging.every_n_steps=5", "logging.progress=false",
    "trainer.checkpoint.every_n_steps=0",
    # instruments under DDP: norms of the all-reduced gradient, per-sample norms gathered
    "instrument.norms.every_n_steps=5", "instrument.per_sample.every_n_steps=5",
    "instrument.per_sample.loss=both", "instrument.histograms.every_n_steps=10",
)  # fmt: skip
#: logged scalars that must match the single process's
COMPARED = ("train/loss", "grad_norm/total", "grad_norm/net.1.weight", "grad_norm/total_clipped",
            "param_norm/net.1.weight", "update_ratio/net.5.weight",
            "per_sample/grad_norm_mean", "per_sample/grad_norm_max",
            "per_sample/weighted_grad_norm_mean", "per_sample/weighted_grad_norm_max",
            "weights/mean", "weights/min", "weights/max")  # fmt: skip


def histograms(run_dir: Path, tag: str) -> list:
    acc = EventAccumulator(str(event_dir(run_dir)), size_guidance={"histograms": 0})
    acc.Reload()
    return acc.Histograms(tag)


def group_store() -> TCPStore:
    """A rendezvous store served by this process on a port the system picked, as torchrun's
    agent serves one: no free port is guessed and then raced for."""
    return TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def join_group(rank: int, world: int, port: int) -> None:
    """A forked rank's environment, as torchrun sets it, for the parent's store on ``port``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      TORCHELASTIC_USE_AGENT_STORE="True")  # fmt: skip


def _rank(rank: int, world: int, port: int, overrides: tuple[str, ...], run_dir: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        join_group(rank, world, port)
    from trainer.run import run

    run(make_cfg(*overrides), run_dir)


def _rank_logged(rank: int, world: int, port: int, overrides, run_dir: str) -> None:
    """:func:`_rank`, its ``trainer`` log lines written to ``<run_dir>/rank<rank>.log``."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(run_dir) / f"rank{rank}.log")
    logging.getLogger("trainer").addHandler(handler)
    logging.getLogger("trainer").setLevel(logging.INFO)
    _rank(rank, world, port, overrides, run_dir)


def _told_the_port(port_from, target, rank: int, world: int, *rest) -> None:
    """A forked rank that waits for its group's store's port, then runs ``target``: the ranks
    are forked before the parent serves any store, so no store's server thread runs at the
    fork (once in three full runs a rank forked while four of them ran waited in
    ``init_process_group``'s connection to its store for good)."""
    port = port_from.recv()
    port_from.close()
    target(rank, world, port, *rest)


def _fork_then_serve(groups: list[tuple[int, Any, tuple[Any, ...]]]) -> list[list[Any]]:
    """Fork each group's ranks (world size, target, its arguments after the port, per rank),
    then serve each multi-process group a store of its own (:func:`group_store`) and tell its
    ranks the port; wait for them all. Returns the processes, by group."""
    procs, tells = [], []
    for world, target, per_rank in groups:
        for overrides in {rank_args[0] for rank_args in per_rank}:  # (the first argument
            compose_before_forking(*overrides)  # after the port; each distinct one once)
        group = []
        for rank in range(world):
            port_from, tell = FORK.Pipe(duplex=False)
            args = (port_from, target, rank, world, *per_rank[rank])
            group.append(FORK.Process(target=_told_the_port, args=args))
            tells.append((world, tell))
        procs.append(group)
    for p in (p for group in procs for p in group):
        p.start()
    stores: list[TCPStore] = []  # (kept until the ranks are done)
    i = 0
    for group in procs:
        world = len(group)
        if world > 1:
            stores.append(group_store())
        for _ in group:
            tells[i][1].send(stores[-1].port if world > 1 else 0)
            tells[i][1].close()
            i += 1
    for p in (p for group in procs for p in group):
        p.join(120)
    return procs


def launch(*groups: tuple[int, list[str], list[Path]]) -> list[list[int]]:
    """Start each group's ranks (world size, overrides, a run folder per rank) at once and wait
    for all of them: a one-process reference runs alongside the two ranks it is compared with
    (three single-threaded processes on two cores, instead of one after the other). Returns
    each group's exit codes. Each multi-process group rendezvouses through a store of its own
    (:func:`group_store`), served after the ranks are forked (:func:`_fork_then_serve`)."""
    procs = _fork_then_serve([
        (world, _rank, [(tuple(overrides), str(run_dirs[r])) for r in range(world)])
        for world, overrides, run_dirs in groups
    ])  # fmt: skip
    return [[p.exitcode for p in group] for group in procs]


def ranks_of(target, overrides, dirs: list[Path], *extra) -> list[int | None]:
    """Fork ``target(rank, world, port, overrides, run_dir, *extra)`` for each rank (one run
    folder each, a store of their own) and wait for them: their exit codes."""
    per_rank = [(tuple(overrides), str(d), *extra) for d in dirs]
    (group,) = _fork_then_serve([(len(dirs), target, per_rank)])
    return [p.exitcode for p in group]


CASES = {
    "scalar": (),
    "vector-class_balanced": ("loss.mode=vector", "weighting=class_balanced"),
    "vector-focal": ("loss.mode=vector", "weighting=focal"),
    "vector-hard_topk": ("loss.mode=vector", "weighting=hard_topk", "weighting.fraction=0.3"),
    "scalar-l2": ("regularizer=[l2]", "regularizer.l2.coef=0.01"),
    # the input-gradient penalty (double backprop through the DDP wrapper)
    "scalar-input_grad_penalty": (
        "regularizer=[input_grad_penalty]",
        "instrument.per_sample.every_n_steps=0",
    ),
    "vector-input_grad_penalty": (
        "loss.mode=vector",
        "weighting=focal",
        "regularizer=[input_grad_penalty]",
        "instrument.per_sample.every_n_steps=0",
    ),
    # curvature of the global batch's objective: the ranks' Hessian-vector products summed
    "scalar-curvature": (
        "instrument.curvature.every_n_steps=10",
        "instrument.curvature.tol=0",
        "instrument.curvature.power_iters=8",
        "instrument.curvature.trace_probes=3",
    ),
    "vector-curvature": (
        "loss.mode=vector",
        "weighting=class_balanced",
        "instrument.curvature.every_n_steps=10",
        "instrument.curvature.tol=0",
        "instrument.curvature.power_iters=8",
        "instrument.curvature.trace_probes=3",
    ),
    # gradient accumulation: the ranks all-reduce once per step (no_sync on the first
    # micro-batch of each window), still the gradient of the global window's mean. Plain SGD:
    # summing locally before the all-reduce rounds differently, and Adam's g/√v turns a
    # rounding difference in a near-zero gradient into an lr-sized one (1.4e-5 seen)
    "scalar-accumulate": ("trainer.accumulate_grad_batches=2", "optimizer=sgd"),
    "vector-accumulate-class_balanced": (
        "loss.mode=vector",
        "weighting=class_balanced",
        "trainer.accumulate_grad_batches=2",
        "optimizer=sgd",
    ),
    # the DataLoader path (what augmented and large sets use) shards the same way
    "dataloader-vector-focal": (
        "data.loader=dataloader",
        "data.num_workers=0",
        "loss.mode=vector",
        "weighting=focal",
    ),
}


def one_and_two(tmp_path: Path, extra, b: int = B, tag: str = ""):
    """One process on batches of 2b and two of b, alongside: their run folders (the one, then
    the ranks') and the final weights of the one and of rank 0 (which alone writes)."""
    one, ranks = tmp_path / f"one{tag}", [tmp_path / f"rank0{tag}", tmp_path / f"rank1{tag}"]
    assert launch(
        (1, [*extra, f"data.batch_size={2 * b}"], [one]),
        (2, [*extra, f"data.batch_size={b}"], ranks),
    ) == [[0], [0, 0]]
    want = load_checkpoint(one / "checkpoints" / "last.pt")["model"]
    got = load_checkpoint(ranks[0] / "checkpoints" / "last.pt")["model"]
    return one, ranks, want, got


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_of_b_train_like_one_of_2b(tmp_path, case) -> None:
    one, ranks, want, got = one_and_two(tmp_path, (*COMMON, *CASES[case]))
    # 1e-6 as the issue asks; the input penalty's double backward sums in another order on
    # half batches, and Adam carries that rounding (1.2e-6 seen after 20 steps)
    tol = 1e-5 if "penalty" in case else 1e-6
    for k in want:
        assert (got[k] - want[k]).abs().max() <= tol, k
    # rank 0 alone writes; its logged scalars are of the global batch
    assert not (ranks[1] / "tb").exists() and not (ranks[1] / "metrics.json").exists()
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((ranks[0] / "metrics.json").read_text())
    assert m2["step"] == m1["step"] == 20
    for key in ("val/acc", "val/loss", "train/loss"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-6), key
    s1, s2 = read_scalars(one), read_scalars(ranks[0])
    extra_tags = ("curvature/top_eig", "curvature/trace", "reg/input_grad_penalty",
                  "grad_norm/reg", "grad_norm/data")  # fmt: skip
    compared = [t for t in (*COMPARED, *extra_tags) if t in s1]
    assert set(compared) >= {"train/loss", "grad_norm/total"}
    assert ("curvature/trace" in s1) == ("curvature" in case) == ("curvature/trace" in s2)
    for tag in ("grad_hist/net.1.weight", "weight_hist/net.5.weight"):  # of the reduced grads
        h1, h2 = histograms(one, tag), histograms(ranks[0], tag)
        assert [e.step for e in h2] == [e.step for e in h1] == [1, 10, 20]
        for a, b in zip(h1, h2, strict=True):
            a, b = a.histogram_value, b.histogram_value
            assert b.num == a.num and b.min == pytest.approx(a.min, rel=1e-5, abs=1e-9)
            assert b.max == pytest.approx(a.max, rel=1e-5) and b.sum == pytest.approx(
                a.sum, rel=1e-4, abs=1e-6)  # fmt: skip
    for tag in compared:
        assert [s for s, _ in s2[tag]] == [s for s, _ in s1[tag]]
        assert [v for _, v in s2[tag]] == pytest.approx([v for _, v in s1[tag]], rel=1e-5), tag


def test_a_ragged_last_batch_and_a_rank_without_samples(tmp_path) -> None:
    """1,437 training samples in global batches of 2 x 700: the last has 37, split 19 / 18;
    with 2 x 718 it has 1, so rank 1 gets none; both still equal one process. Vector mode
    too, whose logged weights are the global batch's (rank 1 takes part with none)."""
    vector = ("loss.mode=vector", "weighting=class_balanced", "logging.every_n_steps=1")
    # the input-gradient penalty logged at the one-sample step: rank 1 skipped the
    # penalty's all-reduce there, and the ranks aborted (a probe's)
    penalty = ("regularizer=[input_grad_penalty]", "instrument.per_sample.every_n_steps=0",
               "logging.every_n_steps=1")  # fmt: skip
    runs = [(700, ()), (718, ()), (718, vector), (718, penalty)]
    for b, mode in runs:
        # (the split holds 1,438: without the subset no global batch of 2 x 718 left a rank
        # empty, and this test did not test that: found when the penalty's abort did not show)
        extra = (*COMMON, "trainer.max_steps=-1", "trainer.max_epochs=2",
                 "data.train_subset=1437", *mode)  # fmt: skip
        one, ranks, want, got = one_and_two(tmp_path, extra, b, tag=f"{b}{len(mode)}")
        tol = 1e-5 if mode == penalty else 1e-6  # (as in the 2 x B cases: the double
        assert all((got[k] - want[k]).abs().max() <= tol for k in want), b  # backward's order)
        if mode == penalty:
            s1, s2 = read_scalars(one), read_scalars(ranks[0])
            tag = "reg/input_grad_penalty"
            assert [s for s, _ in s2[tag]] == [s for s, _ in s1[tag]] == [1, 2, 3, 4]
            assert [v for _, v in s2[tag]] == pytest.approx([v for _, v in s1[tag]], rel=1e-5)
        elif mode:  # every step logs (the last of each epoch is the one-sample batch)
            s1, s2 = read_scalars(one), read_scalars(ranks[0])
            for tag in ("weights/mean", "weights/min", "weights/max"):
                assert [s for s, _ in s2[tag]] == [s for s, _ in s1[tag]] == [1, 2, 3, 4]
                assert [v for _, v in s2[tag]] == pytest.approx([v for _, v in s1[tag]], rel=1e-6)


class RaggedChars(CharText):
    """The character windows with a seeded random number of trailing targets masked out, so
    sequences, micro-batches and ranks hold different numbers of tokens (the global token
    count is then not W times a rank's)."""

    def load(self):
        train, val = super().load()
        n, t = train.y.shape
        keep = torch.randint(1, t + 1, (n,), generator=torch.Generator().manual_seed(0))
        train.y[torch.arange(t) >= keep[:, None]] = self.ignore_index
        return train, val


class CharLSTM(torch.nn.Module):
    """Embedding -> 2-layer LSTM (sequence-first) -> next-token logits: a recurrent unit, whose
    per-sample gradients are recomputed per sequence."""

    def __init__(self, vocab_size: int, in_shape, d_model: int = 16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, d_model)
        self.rnn = torch.nn.LSTM(d_model, d_model, num_layers=2)
        self.head = torch.nn.Linear(d_model, vocab_size)

    def forward(self, tokens):
        out, _ = self.rnn(self.embed(tokens).transpose(0, 1))  # (T, B, d)
        return self.head(out.transpose(0, 1))


class OwnCell(torch.nn.Module):
    """An RNN cell of one's own: h' = tanh(x Wx + h Wh + b)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.wx = torch.nn.Parameter(torch.randn(d, d) / d**0.5)
        self.wh = torch.nn.Parameter(torch.randn(d, d) / d**0.5)
        self.b = torch.nn.Parameter(torch.zeros(d))

    def forward(self, x, h):
        return torch.tanh(x @ self.wx + h @ self.wh + self.b)


class CharOwnCell(torch.nn.Module):
    """Embedding -> a cell of one's own unrolled over the tokens -> next-token logits: each
    call's gradient its parameters get is checked against its outputs' (whole, on each
    rank, before the all-reduce averages it in place)."""

    def __init__(self, vocab_size: int, in_shape, d_model: int = 16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, d_model)
        self.cell = OwnCell(d_model)
        self.head = torch.nn.Linear(d_model, vocab_size)

    def forward(self, tokens):
        xs = self.embed(tokens)
        h, outs = xs.new_zeros(xs.shape[0], xs.shape[2]), []
        for t in range(xs.shape[1]):
            h = self.cell(xs[:, t], h)
            outs.append(h)
        return self.head(torch.stack(outs, 1))


TOKENS = (
    "data=chars", f"data._target_={__name__}.RaggedChars", "data.block_size=12",
    "data.stride=12", "model=char_transformer", "model.d_model=16", "model.n_heads=2",
    "model.dim_feedforward=32", "loss=token_cross_entropy", "optimizer=sgd", "optimizer.lr=0.5",
    "trainer.max_steps=12", "logging.every_n_steps=3", "logging.progress=false",
    "trainer.checkpoint.every_n_steps=0", "instrument.norms.every_n_steps=3",
)  # fmt: skip


MEASURED = (
    "instrument.per_sample.every_n_steps=3", "instrument.curvature.every_n_steps=6",
    "instrument.curvature.tol=0", "instrument.curvature.power_iters=4",
    "instrument.curvature.trace_probes=2",
)  # fmt: skip
TOKEN_CASES = {
    "vector-per_token": ("loss.mode=vector", "weighting=per_token"),
    "scalar-accumulate": ("trainer.accumulate_grad_batches=2",),
    "vector-accumulate": (
        "loss.mode=vector",
        "weighting=per_token",
        "trainer.accumulate_grad_batches=2",
    ),  # fmt: skip
    "sequences": ("loss.average=sequences", "trainer.accumulate_grad_batches=2"),
    # scalar mode, with per-sequence norms gathered over the ranks and the curvature of the
    # global batch's objective
    "scalar-instruments": MEASURED,
    "vector-uniform-instruments": ("loss.mode=vector", *MEASURED),
    # a user's recurrent model instead of the Transformer
    "lstm-instruments": ("~model", f"+model._target_={__name__}.CharLSTM", *MEASURED),
    # a cell of one's own: its parameters' whole gradient checked on each rank (the hook's
    # tensor became .grad, averaged in place by the all-reduce before the check, and the
    # cell was left out on every rank: a review's)
    "own-cell-instruments": ("~model", f"+model._target_={__name__}.CharOwnCell", *MEASURED),
}


@pytest.mark.parametrize("case", list(TOKEN_CASES))
def test_per_token_losses_on_two_processes_train_like_one(tmp_path, case) -> None:
    """The window's token count is all-reduced and per-token weights are normalized over the
    global batch: 2 processes x B sequences equal 1 x 2B, with ragged token counts."""
    case = TOKEN_CASES[case]
    tokens = [o for o in TOKENS if "~model" not in case or not o.startswith("model")]
    one, ranks, want, got = one_and_two(tmp_path, (*tokens, *case), b=8)
    assert all((got[k] - want[k]).abs().max() <= 1e-5 for k in want)
    s1, s2 = read_scalars(one), read_scalars(ranks[0])
    tags = ["train/loss", "grad_norm/total", "val/loss", "val/ppl"]
    tags += [t for t in ("weights/mean", "weights/min", "weights/max") if t in s1]
    tags += [t for t in s1 if t.startswith(("curvature/", "per_sample/", "grad_snr/"))]
    measured = {"curvature/top_eig", "per_sample/grad_norm_mean", "per_sample/noise_scale",
                "grad_snr/head.weight"} <= set(tags)  # fmt: skip
    assert measured == any(o.startswith("instrument.curvature") for o in case)
    if measured:  # every parameter covered: the LSTM recomputed per sequence on each rank
        assert {v for _, v in s2["per_sample/coverage"]} == {1.0}
    for tag in tags:
        assert [s for s, _ in s2[tag]] == [s for s, _ in s1[tag]], tag
        assert [v for _, v in s2[tag]] == pytest.approx([v for _, v in s1[tag]], rel=1e-5), tag


def _rank_asked_to_stop(rank, world, port, overrides, run_dir, at_step) -> None:
    """A rank whose stop request (as a signal handler sets it) comes at ``at_step``, on the
    last rank only (rank 1; one process: itself): the other rank must stop at the same rest
    point."""
    from trainer.callbacks import Callback

    class AskToStop(Callback):
        def on_train_step_end(self, trainer, out) -> None:
            if rank == world - 1 and out.step == at_step:
                trainer.stop_signal = signal.SIGUSR1

    torch.set_num_threads(1)
    if world > 1:
        join_group(rank, world, port)
    from trainer.run import run

    run(make_cfg(*overrides), run_dir, callbacks=[AskToStop()])


@pytest.mark.parametrize("at_step", [5, 12])  # mid-epoch; an epoch's last (12 per epoch)
def test_a_stop_asked_on_one_rank_stops_every_rank_at_the_same_rest_point(
    tmp_path, at_step
) -> None:
    """Mid-epoch the ranks read the flag agreed at the previous rest point (no host wait for
    the step's kernels), so they stop one step after the signal; at an epoch's end, after its
    validation, at once."""
    stop = at_step + 1 if at_step == 5 else at_step
    dirs = [tmp_path / "r0", tmp_path / "r1"]
    overrides = (*COMMON, "trainer.max_steps=40")
    assert ranks_of(_rank_asked_to_stop, overrides, dirs, at_step) == [128 + signal.SIGUSR1] * 2
    metrics = json.loads((dirs[0] / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["signal"] == "SIGUSR1"
    assert metrics["step"] == stop
    assert Path(metrics["checkpoint"]) == step_path(dirs[0] / "checkpoints", stop)
    state = load_checkpoint(metrics["checkpoint"])
    assert state["step"] == stop
    # at an epoch's last step the rest point is after its validation: the next epoch is next
    assert (state["epoch"], state["batch_in_epoch"]) == ((1, 0) if at_step == 12 else (0, 6))
    assert not list(dirs[1].glob("**/*.pt"))  # rank 0 alone writes


def torchrun(*args: str, **kw) -> subprocess.Popen:
    # --standalone: the agent's store binds a port the system picks (none guessed beforehand)
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "scripts" / "train.py"),
         "trainer.device=cpu", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw,
    )  # fmt: skip


def test_torchrun_trains_and_a_dead_rank_ends_the_job_quickly(tmp_path) -> None:
    run_dir = tmp_path / "run"
    proc = torchrun(f"hydra.run.dir={run_dir}", "trainer.max_epochs=200", "data.batch_size=16",
                    "trainer.checkpoint.every_n_steps=10", "logging.progress=false")  # fmt: skip
    deadline = time.monotonic() + 120
    while not list((run_dir / "checkpoints").glob("step_*.pt")):  # both ranks are training
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    pids = [int(p) for p in workers.stdout.split()]
    assert len(pids) == 2
    killed = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode != 0, out[-3000:]
    assert time.monotonic() - killed < 60
    assert read_scalars(run_dir)["train/loss"]  # rank 0 wrote what it had logged


def _submitit_task(monkeypatch, tasks, rank, local, nodes, node, hosts) -> None:
    """The environment submitit's SLURM executor gives a task (no torchrun variables): set and
    removed through monkeypatch, so it is undone after."""
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT"):  # fmt: skip
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": str(tasks),
        "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(local),
        "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NNODES": str(nodes),
        "SLURM_NODEID": str(node), "SLURM_JOB_NODELIST": hosts,
    }  # fmt: skip
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)


def test_a_slurm_task_started_by_submitit_finds_its_rank(monkeypatch) -> None:
    """Hydra's submitit launcher with tasks_per_node > 1: each SLURM task is one rank."""
    pytest.importorskip("submitit")
    from trainer.distributed import World, from_env

    _submitit_task(monkeypatch, tasks=8, rank=5, local=1, nodes=2, node=1, hosts="gpu[07-08]")
    assert from_env() == World(rank=5, size=8, local_rank=1)
    assert os.environ["MASTER_ADDR"] == "gpu07" and int(os.environ["MASTER_PORT"]) > 0


def test_a_task_of_submitits_local_executor_finds_its_rank(monkeypatch) -> None:
    """Hydra's ``submitit_local`` launcher with tasks_per_node=2 (SLURM emulated on one
    machine): its tasks count in submitit's local variables, not SLURM's, and each ran as a
    process of its own, the two writing one folder (a probe's). Rank and world are
    submitit's; a local job of one task stays one process."""
    pytest.importorskip("submitit")
    from trainer.distributed import SINGLE, World, from_env

    _submitit_task(monkeypatch, tasks=1, rank=0, local=0, nodes=1, node=0, hosts="gpu07")
    for key in (
        "SLURM_JOB_ID",
        "SLURM_NTASKS",
        "SLURM_PROCID",
        "SLURM_LOCALID",
        "SLURM_JOB_NUM_NODES",
        "SLURM_NNODES",
        "SLURM_NODEID",
        "SLURM_JOB_NODELIST",
    ):
        monkeypatch.delenv(key)  # fmt: skip
    local = {
        "SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "77", "SUBMITIT_LOCAL_NTASKS": "1",
        "SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_LOCALID": "0",
        "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0",
    }  # fmt: skip
    for key, value in local.items():
        monkeypatch.setenv(key, value)
    assert from_env() is SINGLE and "WORLD_SIZE" not in os.environ
    monkeypatch.setenv("SUBMITIT_LOCAL_NTASKS", "2")
    monkeypatch.setenv("SUBMITIT_LOCAL_GLOBALID", "1")
    monkeypatch.setenv("SUBMITIT_LOCAL_LOCALID", "1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT"):  # fmt: skip
        monkeypatch.setenv(key, "")  # (undone after: from_env exports them)
        monkeypatch.delenv(key)
    assert from_env() == World(rank=1, size=2, local_rank=1)
    assert os.environ["MASTER_ADDR"] and int(os.environ["MASTER_PORT"]) > 0


def test_a_slurm_job_of_one_task_stays_one_process(monkeypatch) -> None:
    """A SLURM job of a single task started by submitit (Hydra's submitit launcher with
    tasks_per_node=1) is one process: submitit's environment is not exported (no
    ``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR`` appear for a later check to find). ``>= 1`` for
    ``> 1`` (a mutation the suite missed) exported them for every submitit job."""
    pytest.importorskip("submitit")
    from trainer.distributed import SINGLE, from_env

    _submitit_task(monkeypatch, tasks=1, rank=0, local=0, nodes=1, node=0, hosts="gpu07")
    assert from_env() is SINGLE
    assert not {"WORLD_SIZE", "RANK", "MASTER_ADDR"} & set(os.environ)


def test_torchruns_world_inside_a_submitit_job_is_torchruns(monkeypatch) -> None:
    """torchrun started inside a SLURM job of several tasks submitit started: the world is
    torchrun's (its variables set), not submitit's exported over them. (A mutation round's:
    the ``WORLD_SIZE`` check dropped went unseen.)"""
    pytest.importorskip("submitit")
    from trainer.distributed import World, from_env

    _submitit_task(monkeypatch, tasks=8, rank=5, local=1, nodes=2, node=1, hosts="gpu[07-08]")
    torchrun = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}  # fmt: skip
    for key, value in torchrun.items():
        monkeypatch.setenv(key, value)
    assert from_env() == World(rank=1, size=2, local_rank=1)
    assert {k: os.environ[k] for k in torchrun} == torchrun


@pytest.mark.parametrize("drop_last", [False, True])
def test_both_loader_paths_slice_the_same_global_batches_per_rank(drop_last) -> None:
    """Each rank's batches, on either path, from any start batch: its contiguous slice of the
    single process's batch of 2 x B; together exactly every sample once per epoch."""
    from trainer.data.base import DeviceLoader, InMemoryLoader, TensorSplit
    from trainer.distributed import World

    n, b = 103, 8
    split = TensorSplit(torch.arange(n).float()[:, None], torch.zeros(n, dtype=torch.long))
    cpu = torch.device("cpu")
    one = InMemoryLoader(split, 2 * b, cpu, True, seed=3, drop_last=drop_last)
    one.set_epoch(2)
    want = [batch.index.tolist() for batch in one]
    for start in (0, 4):
        got = []
        for rank in (0, 1):
            world = World(rank, 2, rank)
            loaders = [
                InMemoryLoader(split, b, cpu, True, 3, drop_last, world),
                DeviceLoader(split, b, cpu, True, 3, drop_last, 0, False, world),
            ]
            per_path = []
            for loader in loaders:
                loader.set_epoch(2, start)
                per_path.append([(bt.index.tolist(), loader.current_global_size) for bt in loader])
            assert per_path[0] == per_path[1]
            got.append(per_path[0])
        for i, (mine, theirs) in enumerate(zip(*got, strict=True)):
            assert mine[0] + theirs[0] == want[start + i]
            assert mine[1] == theirs[1] == len(want[start + i])
    seen = sorted(i for batch in want for i in batch)
    assert seen == list(range(len(seen))) or drop_last


class InfLossOnce(CrossEntropy):
    """Cross-entropy whose first sample's loss is +inf on the third training forward of rank 0
    (that sample is the first of the global batch), with a finite gradient: only rank 0's guard
    sees it, while the all-reduced gradients are finite on both ranks."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__(label_smoothing)
        self.calls = 0

    def forward(self, output, target):
        losses = super().forward(output, target)
        self.calls += 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if self.calls == 3 and rank == 0:
            poison = torch.zeros_like(losses)
            poison[0] = math.inf
            losses = losses + poison  # a constant: no gradient path, the gradient stays finite
        return losses


@pytest.mark.parametrize("sync", ["step", "deferred"])
def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path, sync) -> None:
    """The guard's decision is agreed over the ranks: rank 0 alone has the +inf loss at step 3,
    both ranks skip it (else their parameters would part), and the run equals one process on
    the global batch, which skips it too."""
    extra = (*COMMON, f"loss._target_={__name__}.InfLossOnce",
             "instrument.nonfinite.policy=skip", f"instrument.nonfinite.sync={sync}")  # fmt: skip
    # had rank 1 stepped, the ranks' parameters would part, and rank 0's later all-reduced
    # gradients (half of them taken at rank 1's parameters) would move it off the one process
    one, ranks, want, got = one_and_two(tmp_path, extra)
    for k in want:
        assert (got[k] - want[k]).abs().max() <= 1e-6, k
    for run in (one, ranks[0]):
        assert read_scalars(run)["nonfinite/skipped_steps"] == [(3, 1.0)]


class InfLossTwice(InfLossOnce):
    """+inf in rank 0's first loss at its third and fourth calls (steps 3 and 4)."""

    def forward(self, output, target):
        losses = CrossEntropy.forward(self, output, target)
        self.calls += 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if self.calls in (3, 4) and rank == 0:
            losses = losses + torch.zeros_like(losses).index_fill_(0, torch.tensor([0]), math.inf)
        return losses


@pytest.mark.parametrize("sync", ["step", "deferred"])
def test_skips_caused_by_another_rank_count_as_consecutive_on_every_rank(tmp_path, sync) -> None:
    """Rank 1's own values are finite, but it skips steps 3 and 4 with rank 0: it counts them
    as rank 0 does, so at max_consecutive_skips=2 both ranks stop at step 4 with the guard's
    error (a rank that reset its count on its own finite values went on alone, into a
    collective its peer had left)."""
    dirs = [tmp_path / f"rank{r}" for r in (0, 1)]
    extra = ("trainer.max_steps=8", "logging.every_n_steps=1", "logging.progress=false",
             "trainer.checkpoint.every_n_steps=0", "instrument=none",
             f"loss._target_={__name__}.InfLossTwice", "instrument.nonfinite.policy=skip",
             f"instrument.nonfinite.sync={sync}", "instrument.nonfinite.max_consecutive_skips=2",
             f"data.batch_size={B}")  # fmt: skip
    assert ranks_of(_rank_failing, extra, dirs) == [1, 1]
    for r, d in enumerate(dirs):
        said = (d / "error.txt").read_text()
        assert said.startswith(
            "NonFiniteError: step 4: 2 steps in a row skipped for non-finite values"
        ), (r, said)


def _rank_failing(rank: int, world: int, port: int, overrides, run_dir: str) -> None:
    """:func:`_rank`, the error it ends with written to ``<run_dir>/error.txt`` (exit 1)."""
    try:
        _rank(rank, world, port, overrides, run_dir)
    except Exception as e:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "error.txt").write_text(f"{type(e).__name__}: {e}")
        raise SystemExit(1) from None


def test_fp16_deferred_on_two_processes_skips_as_step_mode_does(tmp_path) -> None:
    """``trainer.precision=16`` with a fused AdamW, data-parallel: rank 0 alone has the +inf
    loss at step 3; deferred, the agreed flag joins GradScaler's ``found_inf`` on both ranks,
    and the run ends bit for bit where reading the flag every step ends."""
    extra = (*COMMON, f"loss._target_={__name__}.InfLossOnce", "instrument.nonfinite.policy=skip",
             "trainer.precision=16", "optimizer=adamw", "optimizer.fused=true",
             f"data.batch_size={B}")  # fmt: skip
    runs = {sync: [tmp_path / f"{sync}{r}" for r in (0, 1)] for sync in ("step", "deferred")}
    assert launch(
        *[(2, [*extra, f"instrument.nonfinite.sync={s}"], dirs) for s, dirs in runs.items()]
    ) == [[0, 0], [0, 0]]
    step, deferred = (load_checkpoint(d[0] / "checkpoints" / "last.pt") for d in runs.values())
    for k in step["model"]:
        assert torch.equal(step["model"][k], deferred["model"][k]), k
    assert step["scaler"] == deferred["scaler"]
    for dirs in runs.values():
        assert read_scalars(dirs[0])["nonfinite/skipped_steps"] == [(3, 1.0)]


def _rank_watched(rank: int, world: int, port: int, overrides, run_dir: str) -> None:
    """A rank whose host reads are recorded per step (tests/test_nonfinite.py's watcher),
    written to ``reads<rank>.json``."""
    torch.set_num_threads(1)
    join_group(rank, world, port)
    from test_nonfinite import WatchSteps

    from trainer.run import run

    watch = WatchSteps()
    run(make_cfg(*overrides), run_dir, callbacks=[watch])
    (Path(run_dir) / f"reads{rank}.json").write_text(json.dumps(watch.reads))


class OutsideOnRank(torch.nn.Module):
    """An MLP whose middle Linear is applied by hand (``F.linear`` with its weight, a use
    outside its own forward that per-sample norms leave out) on the ranks in
    ``functional_on``, and as a module elsewhere: the same arithmetic either way."""

    def __init__(self, in_shape, out_dim: int, functional_on: tuple[int, ...] = ()):
        super().__init__()
        self.a = torch.nn.Linear(math.prod(in_shape), 32)
        self.proj = torch.nn.Linear(32, 32)
        self.head = torch.nn.Linear(32, out_dim)
        self.functional_on = tuple(functional_on)

    def forward(self, x):
        h = torch.tanh(self.a(x.flatten(1)))
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank in self.functional_on:
            h = torch.nn.functional.linear(h, self.proj.weight, self.proj.bias)
        else:
            h = self.proj(h)
        return self.head(torch.tanh(h))


def _outside_on_one_rank(tmp_path: Path, model: str, *extra: str) -> tuple[dict, dict]:
    """One process of 2B whose rank 0 applies the model's layers by hand (``functional_on``)
    beside two of B where rank 1 does: the scalars of the one and of rank 0."""
    extra = (*COMMON, "~model", f"+model._target_={__name__}.{model}", *extra,
             "logging.every_n_steps=5")  # fmt: skip
    one, ranks = tmp_path / "one", [tmp_path / "rank0", tmp_path / "rank1"]
    assert launch(
        (1, [*extra, "+model.functional_on=[0]", f"data.batch_size={2 * B}"], [one]),
        (2, [*extra, "+model.functional_on=[1]", f"data.batch_size={B}"], ranks),
    ) == [[0], [0, 0]]
    return read_scalars(one), read_scalars(ranks[0])


def test_a_unit_left_out_on_one_rank_is_left_out_on_every_rank(tmp_path) -> None:
    """Per-sample norms leave a unit out where its rank could not measure it; data-parallel,
    the gathered rows come from every rank, so one rank's exclusion is every rank's (an
    all-reduce of the covered mask): rank 0's coverage and series equal one process's that
    leaves the unit out everywhere. Before, rank 0 logged its own coverage (1.0) over rows of
    which rank 1's lacked the unit."""
    s1, s2 = _outside_on_one_rank(tmp_path, "OutsideOnRank", "trainer.max_steps=10")
    left = 32 * 32 + 32
    total = 64 * 32 + 32 + left + 32 * 10 + 10
    for s in (s1, s2):
        assert [v for _, v in s["per_sample/coverage"]] == pytest.approx([1 - left / total] * 2)
    for tag in ("per_sample/grad_norm_mean", "per_sample/grad_norm_max",
                "per_sample/noise_scale", "grad_snr/a.weight"):  # fmt: skip
        assert [st for st, _ in s2[tag]] == [st for st, _ in s1[tag]] == [5, 10], tag
        assert [v for _, v in s2[tag]] == pytest.approx([v for _, v in s1[tag]], rel=1e-5), tag
    assert all(math.isnan(v) for _, v in s2["grad_snr/proj.weight"])


class Experts(torch.nn.Module):
    """A top-1 mixture of experts: a router, experts (a ModuleList of Linears) each called on
    the rows routed to it, scaled by their probability, added to the input."""

    def __init__(self, width: int = 32, experts: int = 3) -> None:
        super().__init__()
        self.router = torch.nn.Linear(width, experts)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(experts))

    def forward(self, x):
        probs = torch.softmax(self.router(x), -1)
        top, out = probs.argmax(-1), torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = (top == e).nonzero().squeeze(1)
            out = out.index_put((rows,), expert(x[rows]) * probs[rows, e : e + 1])
        return x + out


class DigitsSwitch(torch.nn.Module):
    """Digits (64 features) -> 32 -> :class:`Experts` as ``moe`` -> the classes."""

    def __init__(self, in_shape, out_dim: int) -> None:
        super().__init__()
        self.inp, self.moe = torch.nn.Linear(64, 32), Experts()
        self.head = torch.nn.Linear(32, out_dim)

    def forward(self, x):
        return self.head(self.moe(torch.tanh(self.inp(x.flatten(1)))))


def test_a_declared_mixture_of_experts_on_two_processes_is_measured_like_one(tmp_path) -> None:
    """``instrument.per_sample.units=[moe]``: each rank runs the declared unit one sample at a
    time (vmap refuses the routing) under its checks; two processes of B log the per-sample
    statistics and train the weights of one of 2B, every parameter covered."""
    one, ranks, want, got = one_and_two(
        tmp_path, (*COMMON, "trainer.max_steps=10", "~model",
                   f"+model._target_={__name__}.DigitsSwitch", "instrument.per_sample.units=[moe]")
    )  # fmt: skip
    for k in want:
        assert (got[k] - want[k]).abs().max() <= 1e-6, k
    s1, s2 = read_scalars(one), read_scalars(ranks[0])
    assert [v for _, v in s1["per_sample/coverage"]] == [1.0, 1.0]
    assert s2["per_sample/coverage"] == s1["per_sample/coverage"]
    for tag in ("per_sample/grad_norm_mean", "per_sample/grad_norm_max",
                "per_sample/noise_scale", "grad_snr/moe.experts.0.weight"):  # fmt: skip
        assert [st for st, _ in s2[tag]] == [st for st, _ in s1[tag]] == [5, 10], tag
        assert [v for _, v in s2[tag]] == pytest.approx([v for _, v in s1[tag]], rel=1e-5), tag


class AllOutsideOnRank(OutsideOnRank):
    """OutsideOnRank with every Linear applied by hand on the ranks in ``functional_on``."""

    def forward(self, x):
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank not in self.functional_on:
            return super().forward(x)
        F = torch.nn.functional
        h = torch.tanh(F.linear(x.flatten(1), self.a.weight, self.a.bias))
        h = torch.tanh(F.linear(h, self.proj.weight, self.proj.bias))
        return F.linear(h, self.head.weight, self.head.bias)


def test_every_unit_left_out_on_one_rank_leaves_no_norms_on_any(tmp_path) -> None:
    """Rank 1 measures no unit, so no sample has a norm (coverage 0): NaN on rank 0 as in one
    process that measures none (the rows of zeros read as norms of 0 before)."""
    for s in _outside_on_one_rank(tmp_path, "AllOutsideOnRank", "trainer.max_steps=5"):
        assert s["per_sample/coverage"] == [(5, 0.0)]
        for tag in ("per_sample/grad_norm_mean", "per_sample/grad_norm_max"):
            assert [st for st, _ in s[tag]] == [5] and math.isnan(s[tag][0][1]), (tag, s[tag])


def test_per_sample_norms_of_a_sequence_model_with_a_rank_without_samples(tmp_path) -> None:
    """Per-token losses on two processes whose last global batch has one sequence, so rank 1
    measures none: the run goes on (it crashed reshaping rank 1's empty (0, T) coefficients)
    and logs what one process does. 2,769 windows (stride 14) in global batches of 2 x 692:
    step 3's holds the last one."""
    extra = ("data=chars", "data.block_size=14", "data.stride=14", "model=char_transformer",
             "model.d_model=16", "model.n_heads=2", "model.dim_feedforward=32",
             "loss=token_cross_entropy", "optimizer=sgd", "trainer.max_steps=3",
             "logging.every_n_steps=3", "logging.progress=false",
             "trainer.checkpoint.every_n_steps=0", "instrument.norms.every_n_steps=0",
             "instrument.histograms.every_n_steps=0",
             "instrument.per_sample.every_n_steps=3")  # fmt: skip
    one, ranks = tmp_path / "one", [tmp_path / "rank0", tmp_path / "rank1"]
    assert launch(
        (1, [*extra, "data.batch_size=1384"], [one]),
        (2, [*extra, "data.batch_size=692"], ranks),
    ) == [[0], [0, 0]]
    s1, s2 = read_scalars(one), read_scalars(ranks[0])
    assert s2["per_sample/coverage"] == s1["per_sample/coverage"] == [(3, 1.0)]
    for tag in ("per_sample/grad_norm_mean", "per_sample/grad_norm_max"):
        assert [st for st, _ in s2[tag]] == [3], tag
        assert s2[tag][0][1] == pytest.approx(s1[tag][0][1], rel=1e-5), tag


def test_the_checkpoint_keeps_every_ranks_batch_checks(tmp_path) -> None:
    """Per-sample norms check each new input shape of a unit's call once; a ragged last batch
    gives each rank shapes of its own (437 samples in global batches of 2 x 100: the last has
    37, 19 and 18), and the checkpoint, written by rank 0, keeps both ranks' findings: a
    resumed rank 1 does not check again what the run had settled (with layers skipped at
    random, a check may miss a call)."""
    extra = ("data=synthetic", "data.num_train=437", "data.num_val=64", "trainer.max_steps=-1",
             "trainer.max_epochs=1", "data.batch_size=100", "optimizer=sgd",
             "instrument.per_sample.every_n_steps=1", "logging.progress=false",
             "trainer.checkpoint.every_n_steps=0")  # fmt: skip
    ranks = [tmp_path / "rank0", tmp_path / "rank1"]
    assert launch((2, list(extra), ranks)) == [[0, 0]]
    saved = load_checkpoint(ranks[0] / "checkpoints" / "last.pt")["callbacks"]
    state = next(s for name, s in saved if name.endswith(".PerSampleNorms"))
    sizes = {shape[0] for _, _, shape, _ in state["verdicts"]}
    assert sizes == {100, 19, 18}


def test_per_sample_norms_add_no_host_read_on_two_processes(tmp_path) -> None:
    """Gathering the ranks' per-sample rows needs each rank's count, which the host knows (the
    loaders shard every global batch alike): a measured step that does not log reads nothing
    but the stop flag agreed at the previous rest point (a host tensor already). Before, the
    counts were exchanged and read on every measured step. Global batches of 2 x 100 in
    windows of 2: 1,437 = 7 x 200 + 37, so each epoch's last window ends on a ragged batch
    (19 / 18: the split holds 1,438, whose 38 split 19 / 19, hence the subset; a helper's
    audit); two epochs of 4 steps, logging every 4, per-sample norms every step."""
    extra = ("trainer.max_steps=-1", "trainer.max_epochs=2", "data.batch_size=100",
             "data.train_subset=1437",
             "trainer.accumulate_grad_batches=2", "optimizer=sgd", "optimizer.fused=true",
             "instrument.nonfinite.sync=deferred", "instrument.per_sample.every_n_steps=1",
             "instrument.norms.every_n_steps=1", "logging.every_n_steps=4",
             "logging.progress=false", "trainer.checkpoint.every_n_steps=0")  # fmt: skip
    dirs = [tmp_path / "r0", tmp_path / "r1"]
    assert ranks_of(_rank_watched, extra, dirs) == [0, 0]
    for rank, run_dir in enumerate(dirs):
        reads = json.loads((run_dir / f"reads{rank}.json").read_text())
        assert sorted(map(int, reads)) == list(range(1, 9))
        for step in (2, 3, 5, 6, 7):  # measured, not logging (step 1 creates the state)
            assert set(reads[str(step)]) <= {"item"}, (rank, step, reads[str(step)])
    s = read_scalars(dirs[0])
    assert [st for st, _ in s["per_sample/grad_norm_mean"]] == list(range(1, 9))
    assert {v for _, v in s["per_sample/coverage"]} == {1.0}


def test_a_run_stopped_and_resumed_on_two_processes_logs_what_an_uninterrupted_one_does(
    tmp_path,
) -> None:
    """Each rank's losses not logged yet are its own: the checkpoint (rank 0 writes it) keeps
    every rank's, so the window spanning the resume (steps 6-10, logging every 5; stopped at 9)
    and the epoch's train/loss come out as in the run never stopped, bit for bit, with every
    other scalar. Before, every rank resumed with rank 0's losses (train/loss off by ~1e-4).
    Accumulation over 2 micro-batches, per-sample norms every 2 steps (gathered from the ranks
    at their shards' counts), a ragged last batch: 1,437 = 11 x 120 + 117, 59 / 58 (the
    split holds 1,438, whose 118 split 59 / 59, hence the subset; a helper's audit)."""
    extra = (*COMMON, "trainer.max_steps=16", "instrument.per_sample.every_n_steps=2",
             "data.batch_size=60", "trainer.accumulate_grad_batches=2",
             "data.train_subset=1437", "optimizer=sgd")  # fmt: skip
    ref, dirs = [tmp_path / "a0", tmp_path / "a1"], [tmp_path / "b0", tmp_path / "b1"]
    assert launch((2, list(extra), ref)) == [[0, 0]]
    assert ranks_of(_rank_asked_to_stop, extra, dirs, 8) == [128 + signal.SIGUSR1] * 2
    stopped = json.loads((dirs[0] / "metrics.json").read_text())
    assert stopped["step"] == 9
    resumed = [tmp_path / "c0", tmp_path / "c1"]
    resume = f"trainer.resume={stopped['checkpoint']}"
    assert ranks_of(_rank_logged, [*extra, resume], resumed) == [0, 0]
    said = [(d / f"rank{r}.log").read_text() for r, d in enumerate(resumed)]
    assert said[0].count("resuming run") == 1 and "resuming run" not in said[1]  # (one line
    # per run: each rank said it before)
    want, got = read_scalars(ref[0]), read_scalars(dirs[0])  # (it continues in its own folder)
    assert sorted(got) == sorted(want)
    for tag in want:
        assert sorted(got[tag]) == sorted(want[tag]), tag
    final = json.loads((dirs[0] / "metrics.json").read_text())
    assert final["train/loss"] == json.loads((ref[0] / "metrics.json").read_text())["train/loss"]
    # resumed in one process on the global batch: every rank's losses on it, the same mean up
    # to rounding (float32 sums in another order), as one process equals two everywhere
    one = tmp_path / "one"
    assert launch((1, [*extra, "data.batch_size=120", resume], [one])) == [[0]]
    got = dict(read_scalars(dirs[0])["train/loss"])  # (continued in the stopped run's folder)
    for step, value in want["train/loss"]:
        assert got[step] == pytest.approx(value, rel=1e-5), step
    # and a checkpoint of one process resumed on two: its losses on the first rank only (each
    # rank took them all, so they counted twice: found by a review)
    stop_one = tmp_path / "stop_one"
    on_one = (*extra, "data.batch_size=120")
    assert ranks_of(_rank_asked_to_stop, on_one, [stop_one], 8) == [128 + signal.SIGUSR1]
    ckpt = json.loads((stop_one / "metrics.json").read_text())["checkpoint"]
    assert launch((2, [*extra, f"trainer.resume={ckpt}"], [tmp_path / "d0", tmp_path / "d1"])) == [
        [0, 0]
    ]
    got = dict(read_scalars(stop_one)["train/loss"])
    for step, value in want["train/loss"]:
        assert got[step] == pytest.approx(value, rel=1e-5), step


def _rank_failing_once(rank, world, port, overrides, run_dir, what: str, at_step: int) -> None:
    """A rank 0 whose disk fails once at ``at_step``: writing the checkpoint (``save``) or the
    event file before it (``flush``)."""
    torch.set_num_threads(1)
    join_group(rank, world, port)
    import trainer.checkpoint as checkpoint
    from trainer.callbacks import Callback
    from trainer.run import run

    failed: list[int] = []

    def once(step: int) -> None:
        if rank == 0 and step == at_step and not failed:
            failed.append(step)
            raise OSError(28, "No space left on device (a test's)")

    if what == "save":
        save = checkpoint.save_checkpoint

        def failing_save(path, state):
            once(int(Path(path).stem[5:]))
            return save(path, state)

        checkpoint.save_checkpoint = failing_save

    class FailingFlush(Callback):
        def on_fit_start(self, trainer) -> None:
            if what == "flush" and trainer.logger is not None:
                flush = trainer.logger.flush
                trainer.logger.flush = lambda: (once(trainer.global_step), flush())[1]
            if what == "staging":  # (inside write_deferred, before a weighting's check)
                staged = trainer.staging.flush
                trainer.staging.flush = lambda *a, **k: (once(trainer.global_step),
                                                         staged(*a, **k))[1]  # fmt: skip

    run(make_cfg(*overrides), run_dir, callbacks=[FailingFlush()])


@pytest.mark.parametrize(("what", "at_step"), [("save", 8), ("flush", 4), ("staging", 4)])
def test_a_checkpoint_failing_on_rank_0_lets_every_rank_go_on(tmp_path, what, at_step):
    """Every rank takes part in a checkpoint (the ranks' losses are gathered), so rank 0's
    failure must not leave the others waiting: writing the events before the gather (``flush``,
    at step 4) or the file after it (``save``, at the last step, 8, where the final checkpoint
    then writes it again) fails on rank 0 only; both ranks finish (found by a review: they
    deadlocked). ``staging``: the deferred scalars' write fails, before the all-reduce of a
    weighting of one's own's check, which rank 0 skipped (a review's finding: a deadlock)."""
    extra = (*COMMON, "trainer.max_steps=8", "trainer.checkpoint.every_n_steps=4")
    if what == "staging":
        extra = (*extra, "loss.mode=vector", "~weighting",
                 "+weighting._target_=test_weighting._Own", "+weighting.at=1000")  # fmt: skip
    dirs = [tmp_path / "r0", tmp_path / "r1"]
    assert ranks_of(_rank_failing_once, extra, dirs, what, at_step) == [0, 0]
    metrics = json.loads((dirs[0] / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert (dirs[0] / "checkpoints" / "last.pt").exists()
    assert load_checkpoint(dirs[0] / "checkpoints" / "last.pt")["step"] == 8


def test_validation_on_two_processes_uses_the_batchnorm_statistics_rank_0_saves(tmp_path):
    """After a step each rank's BatchNorm running statistics hold its own batch's update (DDP
    sends rank 0's only before the next training forward): rank 1 validated its half with
    others than the checkpoint's (a probe's finding: val/acc 0.1643 logged, 0.1671 from the
    checkpoint). Rank 0's buffers are sent before validating; the logged metrics are those
    of the saved model, evaluated in one process."""
    from trainer.run import build_trainer

    small = ["model=cnn", "model.batch_norm=true", "model.channels=[8]", "model.hidden=16",
             "data.batch_size=2", "data.train_subset=9", "trainer.max_epochs=1",
             "trainer.checkpoint.every_n_steps=0", "optimizer.lr=0.05", "logging.progress=false",
             "instrument=none"]  # fmt: skip
    ranks = [tmp_path / "r0", tmp_path / "r1"]
    assert launch((2, small, ranks)) == [[0, 0]]
    logged = json.loads((ranks[0] / "metrics.json").read_text())
    t = build_trainer(make_cfg(*small), tmp_path / "one", with_logger=False)
    t.model.load_state_dict(load_checkpoint(ranks[0] / "checkpoints" / "last.pt")["model"])
    again = t.evaluate()
    for key in ("val/loss", "val/acc"):
        assert logged[key] == pytest.approx(again[key], rel=1e-6, abs=1e-7), key


class FreezeBatchNorms(Callback):
    """Every BatchNorm in eval mode from the start: normalized by its running statistics."""

    def on_fit_start(self, trainer) -> None:
        for m in trainer.model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def test_two_ranks_name_batchnorms_as_fit_starts_and_the_first_alone_shows_progress(
    tmp_path,
) -> None:
    """Data-parallel, the BatchNorm layers that normalize each rank's own part are named as
    fit starts: those a callback put in eval mode in ``on_fit_start`` were named before it
    ran (a probe's). The progress lines and the epoch's line are the first rank's alone:
    every rank wrote them, each twice in a log (and on a terminal two bars drew over each
    other, a probe's)."""
    small = ["model=cnn", "model.batch_norm=true", "model.channels=[4,4]", "model.hidden=8",
             "data.batch_size=2", "data.train_subset=8", "trainer.max_steps=1",
             "trainer.checkpoint.every_n_steps=0", "logging.progress=true",
             "logging.progress_every_n_steps=1", "instrument=none",
             "+callbacks.f._target_=test_distributed.FreezeBatchNorms"]  # fmt: skip
    ranks = [tmp_path / "r0", tmp_path / "r1"]
    assert ranks_of(_rank_logged, small, ranks) == [0, 0]
    logs = [(r / f"rank{i}.log").read_text() for i, r in enumerate(ranks)]
    for log in logs:
        assert "own part of the batch" not in log, log
        assert "2 module(s) are in eval mode" in log, log
    assert "step 1/1  epoch 1/20" in logs[0] and "epoch 1/20  step 1  train/loss" in logs[0]
    assert "step 1/1" not in logs[1] and "epoch 1/20" not in logs[1], logs[1]


def test_a_ragged_validation_batch_on_the_dataloader_path_names_eval_batch_size() -> None:
    """Digits' 359 validation samples in global batches of 2 x 179 leave 1 for 2 ranks; the
    error named data.drop_last and data.batch_size, neither of which applies to validation
    (a probe's finding)."""
    from trainer.data.digits import DigitsData
    from trainer.distributed import World

    data = DigitsData(batch_size=50, eval_batch_size=179, loader="dataloader", num_workers=0)
    with pytest.raises(ValueError, match=r"validation split's last global batch \(2 x "
                       r"data.eval_batch_size=179\) has 1 sample\(s\).*another "
                       r"data.eval_batch_size"):  # fmt: skip
        data.setup(torch.device("cpu"), seed=0, world=World(0, 2, 0))
    data = DigitsData(batch_size=50, eval_batch_size=179, loader="memory")
    data.setup(torch.device("cpu"), seed=0, world=World(1, 2, 1))  # (the in-memory path can)
    assert sum(len(batch.y) for batch in data.val_loader) == 179
    # a Dataset batched by its own collate is never held as tensors: data.loader=memory is
    # not offered (it was, a probe's)
    from test_sequence import RaggedTags

    ragged = RaggedTags(kind="padded", batch_size=2, eval_batch_size=1, num_workers=0)
    with pytest.raises(ValueError, match=r"\(3 x data.eval_batch_size=1\) has 2 sample\(s\) "
                       r".*set another data.eval_batch_size$"):  # fmt: skip
        ragged.setup(torch.device("cpu"), seed=0, world=World(0, 3, 0))


def test_a_one_process_checkpoint_after_unfreezing_resumes_on_two(tmp_path) -> None:
    """DistributedDataParallel takes the trainable set when it wraps the model, which was
    built frozen; the checkpoint's ``requires_grad`` came after, and the two ranks refused the
    resume ("requires_grad ... changed at step 0"). The flags are set before the wrap: the
    resumed two processes end where the uninterrupted one process does, within 1e-6."""
    steps = [*(s for s in UNFREEZE_STEPS if not s.startswith(("data.batch_size", "trainer.max"))),
             "+callbacks.u._target_=test_unfreeze.UnfreezeOnce", "trainer.max_steps=6",
             "trainer.checkpoint.every_n_steps=2", "logging.progress=false",
             "instrument.per_sample.every_n_steps=0"]  # fmt: skip
    one = tmp_path / "one"
    assert launch((1, [*steps, f"data.batch_size={2 * B}"], [one])) == [[0]]
    step4 = one / "checkpoints" / "step_000000004.pt"
    assert load_checkpoint(step4)["trainable"]["backbone.weight"] is True
    want = load_checkpoint(one / "checkpoints" / "last.pt")["model"]
    ranks = [tmp_path / "rank0", tmp_path / "rank1"]  # (the resumed run goes on in one/)
    resume = f"trainer.resume={step4}"
    assert launch((2, [*steps, f"data.batch_size={B}", resume], ranks)) == [[0, 0]]
    resumed = load_checkpoint(one / "checkpoints" / "last.pt")
    assert resumed["step"] == 6 and len(resumed["tally_ranks"]) == 2
    for k in want:
        assert (resumed["model"][k] - want[k]).abs().max() <= 1e-6, k


class _Noise:
    """Augmentation drawn from the main process's torch RNG (an in-memory loader)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.5 * torch.randn_like(x)


class NoisySynthetic(SyntheticData):
    def load(self):
        train, val = super().load()
        return TensorSplit(train.x, train.y, _Noise()), val


@pytest.mark.parametrize("at_step", [3, 4])  # an epoch's last step; mid-epoch
def test_each_rank_resumes_with_its_own_random_state(tmp_path, at_step) -> None:
    """437 samples in batches of 2 x 100 (3 steps an epoch): the ragged last batch gives rank
    0 19 samples and rank 1 18, so their augmentation draws part. The checkpoint kept rank
    0's random states only and every rank resumed with them: 5.8e-3 off the uninterrupted run.
    Each rank's are gathered into it now: the resumed run ends bit for bit where the
    uninterrupted one does."""
    extra = ("data=synthetic", f"data._target_={__name__}.NoisySynthetic", "data.num_train=437",
             "data.num_val=64", "data.shape=[16]", "model.hidden=[16]", "data.batch_size=100",
             "data.loader=memory", "trainer.max_epochs=2", "trainer.max_steps=-1",
             "logging.every_n_steps=1", "logging.progress=false",
             "trainer.checkpoint.every_n_steps=0", "instrument=none", "optimizer=sgd")  # fmt: skip
    whole, cut = [tmp_path / "a0", tmp_path / "a1"], [tmp_path / "b0", tmp_path / "b1"]
    assert launch((2, list(extra), whole)) == [[0, 0]]
    assert ranks_of(_rank_asked_to_stop, extra, cut, at_step) == [128 + signal.SIGUSR1] * 2
    stopped = json.loads((cut[0] / "metrics.json").read_text())["checkpoint"]
    assert len(load_checkpoint(stopped)["rng_ranks"]) == 2
    resume = f"trainer.resume={stopped}"
    assert launch((2, [*extra, resume], [tmp_path / "c0", tmp_path / "c1"])) == [[0, 0]]
    want = load_checkpoint(whole[0] / "checkpoints" / "last.pt")["model"]
    got = load_checkpoint(cut[0] / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_batchnorm_across_ranks_is_named_or_synchronized(caplog) -> None:
    """A BatchNorm in training mode normalizes each rank's part of the batch under DDP: a
    probe's 2 x 16 CNN differed from 1 x 32 by 1e-2 in the weights, silently (README said the
    gradients are one process's on the global batch). Now warned, naming the layers, with
    trainer.sync_batchnorm=true converting them to SyncBatchNorm (torch's DDP runs it on CUDA
    only: refused elsewhere, naming why). One process: nothing to say."""
    from torch import nn

    from trainer.config import ConfigError
    from trainer.distributed import warn_batch_norms
    from trainer.run import batchnorm_across_ranks

    def model() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with caplog.at_level("WARNING", logger="trainer"):
        m = model()
        assert batchnorm_across_ranks(m, False, False, cpu) is m and not caplog.records
        assert batchnorm_across_ranks(m, True, False, cpu) is m and not caplog.records  # (the
        assert warn_batch_norms(m) == ["1"]  # trainer names them as fit starts)
    assert "data-parallel: 1 normalizes each rank's own part" in caplog.text
    assert "trainer.sync_batchnorm=true" in caplog.text
    with pytest.raises(ConfigError, match="SyncBatchNorm runs on CUDA only"):
        batchnorm_across_ranks(model(), True, True, cpu)
    plain = nn.Linear(3, 3)  # nothing to convert: no refusal on a CPU
    assert batchnorm_across_ranks(plain, True, True, cpu) is plain
    m = model()
    weight = m[1].weight
    synced = batchnorm_across_ranks(m, True, True, cuda)  # (converted; not run here)
    assert isinstance(synced[1], nn.SyncBatchNorm) and synced[1].weight is weight
    # (a probe's findings) one frozen in eval mode normalizes with its running statistics,
    # the same on every rank: not named; one without running statistics is, in eval mode too
    caplog.clear()
    frozen, batch_stats = model().eval(), model()
    batch_stats[1] = nn.BatchNorm2d(4, track_running_stats=False).eval()
    with caplog.at_level("WARNING", logger="trainer"):
        assert warn_batch_norms(frozen) == [] and not caplog.records
        assert warn_batch_norms(batch_stats) == ["1"]
    assert "data-parallel: 1 normalizes each rank's own part" in caplog.text
    # the model's own SyncBatchNorm off CUDA: named (torch's DDP raised its own error, after a
    # warning suggesting sync_batchnorm); on CUDA it is kept and not warned about
    caplog.clear()
    own = nn.SyncBatchNorm.convert_sync_batchnorm(model())
    with pytest.raises(ConfigError, match=r"data-parallel on cpu: the model's own SyncBatchNorm "
                       r"layers \(1\) run on CUDA only"):  # fmt: skip
        batchnorm_across_ranks(own, True, False, cpu)
    with caplog.at_level("WARNING", logger="trainer"):
        assert batchnorm_across_ranks(own, True, False, cuda) is own and not caplog.records
        assert warn_batch_norms(own) == [] and not caplog.records
    # sync_batchnorm converts frozen ones too (a callback may put them in training mode)
    synced = batchnorm_across_ranks(model().eval(), True, True, cuda)
    assert isinstance(synced[1], nn.SyncBatchNorm) and not synced[1].training
    with pytest.raises(ConfigError, match="SyncBatchNorm runs on CUDA only"):
        batchnorm_across_ranks(model().eval(), True, True, cpu)


def test_a_finished_one_process_checkpoint_resumed_on_two_logs_its_pending_window(
    tmp_path,
) -> None:
    """Stopped at step 4 with logging every 3 (step 4's losses not logged yet) and resumed on
    two processes with max_steps=4: finished at once, the first rank alone held the pending
    losses and called the window's all-reduce while the other went on to the checkpoint's:
    both hung until gloo's 60 s timeout. The ranks agree on whether a window is pending: the
    run logs step 4's train/loss, the single process's mean of it (to rounding: the same
    losses, summed in another order). One process resumed alike failed too: the stopped
    step's validation had not run, and metrics.json had no train/loss (KeyError)."""
    extra = [*TOKENS, "trainer.max_steps=10"]
    stopped = tmp_path / "one"
    assert ranks_of(_rank_asked_to_stop, [*extra, "data.batch_size=16"], [stopped], 4) == [
        128 + signal.SIGUSR1
    ]
    checkpoint = json.loads((stopped / "metrics.json").read_text())["checkpoint"]
    whole = tmp_path / "whole"
    assert launch(
        (1, [*extra, "trainer.max_steps=4", "data.batch_size=16"], [whole]),
        (2, [*extra, "trainer.max_steps=4", "data.batch_size=8", f"trainer.resume={checkpoint}"],
         [tmp_path / "r0", tmp_path / "r1"]),
    ) == [[0], [0, 0]]  # fmt: skip
    want, got = read_scalars(whole), read_scalars(stopped)  # (resumed: in the stopped dir)
    for tag in ("train/loss", "val/loss"):  # (validated at its last step, as never stopped)
        assert dict(got[tag])[4] == pytest.approx(dict(want[tag])[4], rel=1e-6), tag


def test_a_run_resumed_at_its_last_step_validates_it(tmp_path) -> None:
    """Stopped at step 4 and resumed with max_steps=4, one process: finished at once, it ran
    no validation (the stop skipped it) and failed writing metrics.json (KeyError
    'train/loss'). It validates its last step now, as the uninterrupted run did."""
    extra = [*TOKENS, "trainer.max_steps=10", "data.batch_size=16"]
    stopped, whole = tmp_path / "one", tmp_path / "whole"
    assert ranks_of(_rank_asked_to_stop, extra, [stopped], 4) == [128 + signal.SIGUSR1]
    checkpoint = json.loads((stopped / "metrics.json").read_text())["checkpoint"]
    assert launch(
        (1, [*extra, "trainer.max_steps=4"], [whole]),
        (1, [*extra, "trainer.max_steps=4", f"trainer.resume={checkpoint}"], [tmp_path / "r"]),
    ) == [[0], [0]]  # fmt: skip
    want, got = read_scalars(whole), read_scalars(stopped)
    for tag in ("train/loss", "val/loss"):
        assert dict(got[tag])[4] == dict(want[tag])[4], tag
        assert [s for s, _ in got[tag]].count(4) == 1, tag  # (once: no second validation)
    metrics = json.loads((stopped / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["step"] == 4


class AuxHead(torch.nn.Module):
    """An MLP with an auxiliary head its forward never uses (one used by a loss of its own in
    pretraining, say): a parameter without a gradient in every step."""

    def __init__(self, in_shape, out_dim: int) -> None:
        super().__init__()
        self.body = torch.nn.Linear(math.prod(in_shape), 16)
        self.head = torch.nn.Linear(16, out_dim)
        self.aux = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x.flatten(1))))


def test_a_model_with_an_unused_parameter_trains_data_parallel_when_told(tmp_path) -> None:
    """DDP requires every parameter to get a gradient unless told (find_unused_parameters): such
    a model failed at its second step with torch's error naming an argument no config key
    set (a probe's finding). With trainer.find_unused_parameters=true two processes of B train
    as one of 2B; without it the error names the key."""
    common = ["~model", f"+model._target_={__name__}.AuxHead", "trainer.max_steps=4",
              "logging.progress=false", "trainer.checkpoint.every_n_steps=0",
              "instrument.norms.every_n_steps=1"]  # fmt: skip
    told = [*common, "trainer.find_unused_parameters=true"]
    one, ranks, plain = tmp_path / "one", [tmp_path / "r0", tmp_path / "r1"], [
        tmp_path / "p0", tmp_path / "p1"]  # fmt: skip
    codes = launch((1, [*told, f"data.batch_size={2 * B}"], [one]),
                   (2, [*told, f"data.batch_size={B}"], ranks),
                   (2, [*common, f"data.batch_size={B}"], plain))  # fmt: skip
    assert codes[:2] == [[0], [0, 0]] and 0 not in codes[2], codes
    want = load_checkpoint(one / "checkpoints" / "last.pt")["model"]
    got = load_checkpoint(ranks[0] / "checkpoints" / "last.pt")["model"]
    for k in want:
        assert (got[k] - want[k]).abs().max() <= 1e-6, k
    assert torch.equal(got["aux.weight"], want["aux.weight"])  # (never trained)
    error = json.loads((plain[0] / "metrics.json").read_text())["error"]
    assert "set trainer.find_unused_parameters=true" in error, error


def test_a_compiled_model_with_an_unused_parameter_and_a_regularizer_trains_data_parallel(
    tmp_path,
) -> None:
    """With unused parameters DDP's reduction cannot take the regularizers' gradient in the
    same backward (it is added after it); under ``trainer.compile=true`` the DDP module sits
    inside torch.compile's wrapper and was taken for none: the first step stopped with
    torch's "marked as ready twice", naming no key (a probe's). aot_eager runs eager's
    kernels: the compiled pair of processes ends with the plain pair's parameters, bit for
    bit."""
    common = ["~model", f"+model._target_={__name__}.AuxHead", "trainer.max_steps=3",
              "logging.progress=false", "trainer.checkpoint.every_n_steps=0",
              "trainer.find_unused_parameters=true", "regularizer=[l2]",
              "regularizer.l2.coef=0.01", f"data.batch_size={B}"]  # fmt: skip
    plain, compiled = [tmp_path / "p0", tmp_path / "p1"], [tmp_path / "c0", tmp_path / "c1"]
    codes = launch((2, common, plain),
                   (2, [*common, "trainer.compile=true", "trainer.compile_backend=aot_eager"],
                    compiled))  # fmt: skip
    error = json.loads((compiled[0] / "metrics.json").read_text()).get("error")
    assert codes == [[0, 0], [0, 0]], error
    a = load_checkpoint(plain[0] / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(compiled[0] / "checkpoints" / "last.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


class SquaredOnOneRank(torch.nn.Module):
    """Squares its hidden units through a @once_differentiable Function on rank 1 only (a
    custom kernel on one branch of a mixture, say)."""

    def __init__(self, in_shape, out_dim: int) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(math.prod(in_shape), 8), torch.nn.Linear(8, out_dim)

    def forward(self, x):
        from test_instrument import _Square

        h = torch.tanh(self.a(x.flatten(1)))
        return self.b(_Square.apply(h) if torch.distributed.get_rank() == 1 else h)


def test_curvature_with_a_once_differentiable_function_on_one_rank_is_nan_on_every_rank(
    tmp_path,
) -> None:
    """Whether a measured step's graph holds a @once_differentiable Function is decided on
    each rank, and a rank giving up (NaN) while another went on to the Hessian-vector
    products' collective would have left that one waiting for good: the ranks agree, and
    every rank logs NaN for every measured step, and the run ends."""
    common = ["~model", f"+model._target_={__name__}.SquaredOnOneRank", "trainer.max_steps=2",
              "logging.progress=false", "trainer.checkpoint.every_n_steps=0", "instrument=none",
              "logging.every_n_steps=1", "instrument.curvature.every_n_steps=1",
              "instrument.curvature.power_iters=3", f"data.batch_size={B}"]  # fmt: skip
    ranks = [tmp_path / "r0", tmp_path / "r1"]
    assert launch((2, common, ranks)) == [[0, 0]]
    values = read_scalars(ranks[0])["curvature/trace"]
    assert [s for s, _ in values] == [1, 2] and all(math.isnan(v) for _, v in values)


class TwoExperts(torch.nn.Module):
    """Each sample routed by its first feature to expert ``a`` (> 1), ``b`` (< -1) or neither;
    an expert no sample of the batch needs is not called (a mixture of experts' shortcut), so
    which parameters get a gradient differs between the ranks."""

    def __init__(self, in_shape, out_dim: int):
        super().__init__()
        self.body = torch.nn.Linear(math.prod(in_shape), 8)
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, out_dim)

    def forward(self, x):
        x = x.flatten(1)
        out = h = torch.tanh(self.body(x))
        for expert, route in ((self.a, x[:, 0] > 1), (self.b, x[:, 0] < -1)):
            if route.any():
                rows = route.nonzero()[:, 0]
                out = out.index_add(0, rows, torch.tanh(expert(h[rows])))
        return self.head(out)


def _one_and_two(tmp_path: Path, x, y, *overrides: str) -> tuple[dict, dict, Path, list[Path]]:
    """``(x, y)`` saved as a tensors data set, and trained with a model of one's own (``+model.
    _target_`` in ``overrides``) and DDP's find_unused_parameters by one process of 2B and two
    of B at once: the one's and rank 0's scalars, and their run folders."""
    torch.save({"x": x, "y": y, "x_val": x[:8], "y_val": y[:8]}, tmp_path / "d.pt")
    common = ["data=tensors", f"data.path={tmp_path / 'd.pt'}", "~model",
              "logging.every_n_steps=1", "logging.progress=false",
              "trainer.checkpoint.every_n_steps=0", "trainer.find_unused_parameters=true",
              "optimizer=sgd", *overrides]  # fmt: skip
    one, ranks = tmp_path / "one", [tmp_path / "r0", tmp_path / "r1"]
    codes = launch((1, [*common, f"data.batch_size={2 * B}"], [one]),
                   (2, [*common, f"data.batch_size={B}"], ranks))  # fmt: skip
    assert codes == [[0], [0, 0]], codes
    return read_scalars(one), read_scalars(ranks[0]), one, ranks


class TwoExpertsMasked(TwoExperts):
    """As :class:`TwoExperts`, an expert called on the whole batch (its output masked to the
    samples routed to it: a per-sample unit), and not at all where no sample needs it."""

    def forward(self, x):
        x = x.flatten(1)
        out = h = torch.tanh(self.body(x))
        for expert, route in ((self.a, x[:, 0] > 1), (self.b, x[:, 0] < -1)):
            if route.any():
                out = out + route[:, None] * torch.tanh(expert(h))
        return self.head(out)


def test_per_sample_norms_of_an_expert_one_rank_does_not_call_are_one_process(tmp_path) -> None:
    """An expert one rank's samples are not routed to has 0 as their per-sample part: that rank
    counts it covered (DDP's all-reduce writes its gradient there without running its hooks),
    and the two processes of B log the per-sample values of one process of 2B, which calls
    it. Before, the rank left it out (a branch not taken), every rank with it: coverage 0.62
    on two processes, 1.0 on one."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2 * B, 4, generator=g), torch.randint(0, 3, (2 * B,), generator=g)
    x[:, 0] = 0.0  # expert a: no sample (no call anywhere)
    x[epoch_order(2 * B, 0, 0)[:B], 0] = -2.0  # expert b: rank 0's samples (the first half of
    # the first global batch, as one process's batch starts: the check on its first samples
    # of whether a unit's input is batch-first sees b called)
    want, got, _, _ = _one_and_two(tmp_path, x, y, "trainer.max_steps=1", "seed=0",
                                   f"+model._target_={__name__}.TwoExpertsMasked",
                                   "instrument.per_sample.every_n_steps=1")  # fmt: skip
    assert want["per_sample/coverage"] == got["per_sample/coverage"] == [(1, 1.0)]
    for tag in ("per_sample/grad_norm_mean", "per_sample/grad_norm_max",
                "per_sample/noise_scale", "grad_snr/b.weight"):  # fmt: skip
        assert got[tag][0][1] == pytest.approx(want[tag][0][1], rel=1e-5), tag
    assert math.isnan(got["grad_snr/a.weight"][0][1])  # (a zero gradient: no ratio)
    assert math.isnan(want["grad_snr/a.weight"][0][1])


def test_regularizers_with_parameters_one_rank_does_not_use_train_as_one_process(
    tmp_path,
) -> None:
    """trainer.find_unused_parameters=true, one sample of the global batch routed to expert b
    (so one rank uses it, the other not): l2's gradient in DDP's backward marked b's
    parameters ready a second time on the rank that did not use them (torch's "marked as
    ready twice": both ranks exited 1), and the input penalty's gradients, all-reduced per
    parameter in each rank's own order, made the collectives differ (an abort). Two
    processes of B now log and end as one of 2B."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2 * B, 4, generator=g), torch.randint(0, 3, (2 * B,), generator=g)
    x[:, 0] = 0.0
    x[: B // 2, 0] = 2.0  # expert a: several samples
    x[B // 2, 0] = -2.0  # expert b: one sample, on one rank whatever the order
    want, got, one, ranks = _one_and_two(tmp_path, x, y, "trainer.max_steps=2",
                                         f"+model._target_={__name__}.TwoExperts",
                                         "instrument.norms.every_n_steps=1",
                                         "regularizer=[l2,input_grad_penalty]")  # fmt: skip
    assert "grad_norm/b.weight" in want and "reg/input_grad_penalty" in want
    assert sorted(got) == sorted(want)
    for tag in (t for t in want if not t.startswith("time/")):
        for (s1, v1), (s2, v2) in zip(want[tag], got[tag], strict=True):
            assert s1 == s2 and v2 == pytest.approx(v1, rel=1e-5, abs=1e-7), tag
    final = load_checkpoint(ranks[0] / "checkpoints" / "last.pt")["model"]
    for k, v in load_checkpoint(one / "checkpoints" / "last.pt")["model"].items():
        assert (final[k] - v).abs().max() <= 1e-6, k


def test_an_embedding_scaled_by_its_batchs_counts_is_said_to_differ(caplog) -> None:
    """scale_grad_by_freq divides by each rank's (or micro-batch's) own counts: 2 ranks'
    embedding gradient norm was 46 % off one process's, silently (a probe). Said, naming it;
    one process of one micro-batch, or an embedding without it, says nothing."""
    from torch import nn

    from trainer.loop import check_frequency_scaling

    model = nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True), nn.Embedding(5, 3))
    with caplog.at_level("WARNING", logger="trainer.run"):
        check_frequency_scaling(model, 1, 1)
        assert not caplog.records
        check_frequency_scaling(model, 2, 1)
        check_frequency_scaling(model, 1, 4)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and all(m.startswith("0: scale_grad_by_freq divides") for m in said)
    assert "each rank's part (2 ranks)" in said[0] and "each micro-batch (4 a step)" in said[1]


def _rank_failing_at_the_end(rank, world, port, overrides, run_dir) -> None:
    torch.set_num_threads(1)
    join_group(rank, world, port)
    from trainer.callbacks import Callback
    from trainer.run import run

    class FailsOnRank1(Callback):
        def on_fit_end(self, trainer, metrics) -> None:
            if rank == 1:
                raise RuntimeError("boom on rank 1")

    run(make_cfg(*overrides), run_dir, callbacks=[FailsOnRank1()])


def test_an_on_fit_end_failing_on_another_rank_fails_the_run(tmp_path) -> None:
    """Rank 1's on_fit_end raised; rank 0 wrote the run completed, and a sweep counted it so
    (a probe). Every rank's on_fit_end errors are gathered at the end: rank 0 fails too,
    naming rank 1's error in metrics.json."""
    dirs = [tmp_path / "r0", tmp_path / "r1"]
    codes = ranks_of(_rank_failing_at_the_end, (*COMMON, "trainer.max_steps=2"), dirs)
    assert codes[0] != 0 and codes[1] != 0
    metrics = json.loads((dirs[0] / "metrics.json").read_text())
    assert metrics["status"] == "failed"
    assert metrics["error"] == (
        "RuntimeError: on_fit_end raised on another rank (rank 1: RuntimeError: boom on rank 1 "
        "(in FailsOnRank1.on_fit_end))"
    )


class RankOrderedF1(CountsF1):
    """CountsF1 reporting its names in another order on rank 1 (as a set's order differs
    between processes, whose hash seeds differ)."""

    def val_sums(self, output, target):
        sums = super().val_sums(output, target)
        return {k: sums[k] for k in sorted(sums, reverse=os.environ.get("RANK") == "1")}


class RankVaryingF1(CountsF1):
    """CountsF1 without one name in rank 1's second validation batch."""

    def __init__(self) -> None:
        super().__init__()
        self.batches = 0

    def val_sums(self, output, target):
        sums = super().val_sums(output, target)
        if not torch.is_grad_enabled():  # (validation: the first step's checks take it too)
            self.batches += 1
            if os.environ.get("RANK") == "1" and self.batches == 2:
                del sums["val/fn"]
        return sums


class RankExtraF1(CountsF1):
    """CountsF1 with one more name on rank 1."""

    def val_sums(self, output, target):
        sums = super().val_sums(output, target)
        if os.environ.get("RANK") == "1":
            sums["val/extra"] = torch.zeros(2, device=output.device)
        return sums


def test_validation_names_are_summed_alike_on_every_rank(tmp_path) -> None:
    """Each rank sums the names its val_sums reports, in one order on every rank: reported in
    another order on rank 1, the metrics are those of the same order everywhere, bit for bit
    (a review's: the counts of one were added to another's, val/f1 0.23 for 0.35, unsaid);
    another name on one rank is refused on every rank, naming the names (it aborted both
    processes in gloo, no metrics.json), as is a failure on one rank alone."""
    short = ["trainer.max_steps=4", "data.train_subset=256", f"data.batch_size={B}",
             "data.eval_batch_size=179", "trainer.checkpoint.every_n_steps=0"]  # fmt: skip
    dirs = {k: [tmp_path / f"{k}{r}" for r in range(2)]
            for k in ("same", "ordered", "extra", "varying")}  # fmt: skip
    codes = launch(
        (2, [*short, "~loss", "+loss._target_=test_byo_refusals.CountsF1"], dirs["same"]),
        (2, [*short, "~loss", f"+loss._target_={__name__}.RankOrderedF1"], dirs["ordered"]),
        (2, [*short, "~loss", f"+loss._target_={__name__}.RankExtraF1"], dirs["extra"]),
        (2, [*short, "~loss", f"+loss._target_={__name__}.RankVaryingF1"], dirs["varying"]),
    )  # fmt: skip
    assert codes == [[0, 0], [0, 0], [1, 1], [1, 1]]
    same, ordered = (json.loads((dirs[k][0] / "metrics.json").read_text())
                     for k in ("same", "ordered"))  # fmt: skip
    assert ordered["val/f1"] == same["val/f1"] and ordered["val/acc"] == same["val/acc"]
    failed = json.loads((dirs["extra"][0] / "metrics.json").read_text())
    assert failed["status"] == "failed" and failed["step"] == 4
    said = "val_sums reported other names on another rank than ['val/loss', 'val/acc', 'val/fn', "
    assert said in failed["error"]
    # names changing on rank 1 alone, at its second batch: its error there, every rank told
    # (rank 0 failed on gloo's "Connection closed by peer" before, a review's)
    failed = json.loads((dirs["varying"][0] / "metrics.json").read_text())
    assert failed["error"].startswith(
        "RuntimeError: data-parallel: validation failed on rank 1: ValueError: loss "
        "RankVaryingF1's val_sums reported ['val/acc', 'val/fp', 'val/loss', 'val/tp'] for "
        "validation batch 1 and ['val/acc', 'val/fn', "
    ), failed["error"]


def test_resume_auto_takes_rank_0s_folder_first_on_every_rank(tmp_path) -> None:
    """resume=auto takes the checkpoints of the folder a run starts in first; data-parallel,
    rank 0's (which alone writes them) on every rank: with a folder per rank, rank 0 took its
    own folder's step 3 and rank 1 another folder's later step 6 of the same run id, and both
    processes failed (a review's)."""
    common = ["trainer.run_id=r", f"trainer.checkpoint.search_dir={tmp_path}",
              f"data.batch_size={B}", "trainer.checkpoint.every_n_steps=0"]  # fmt: skip
    later, mine = (
        [tmp_path / f"later{r}" for r in range(2)],
        [tmp_path / f"mine{r}" for r in (0, 1)],
    )
    assert launch((2, [*common, "trainer.max_steps=6"], later),
                  (2, [*common, "trainer.max_steps=3"], mine)) == [[0, 0], [0, 0]]  # fmt: skip
    assert launch((2, [*common, "trainer.max_steps=5", "trainer.resume=auto"], mine)) == [[0, 0]]
    assert load_checkpoint(mine[0] / "checkpoints" / "last.pt")["step"] == 5
    assert load_checkpoint(later[0] / "checkpoints" / "last.pt")["step"] == 6  # left alone
    assert not (mine[0] / "previous").exists()


def _gathers(rank: int, world: int, port: int, overrides, run_dir: str) -> None:
    """Gather parts of 3 and 2 values (sizes exchanged, and given), and take hard_topk's mask
    of a ragged global batch of 5 split 3 + 2; written to ``<run_dir>/out.json``."""
    from trainer.distributed import World, agree, all_gather_cat
    from trainer.weighting import HardTopKWeighting

    join_group(rank, world, port)
    torch.distributed.init_process_group("gloo")
    part = torch.tensor([1.0, 2.0, 9.0]) if rank == 0 else torch.tensor([8.0, 3.0])
    out = {str(sizes): [v.tolist() if torch.is_tensor(v) else v
                        for v in all_gather_cat(part, sizes)]
           for sizes in (None, [3, 2])}  # fmt: skip
    topk = HardTopKWeighting(k=2)
    topk.world, topk.global_size = World(rank, world, rank), 5
    out["mask"] = topk.raw(part, None, None, None).tolist()
    cpu = torch.device("cpu")  # names compared: the same; as many, other; fewer
    out["same"] = [agree(["val/a", "val/b"], False, cpu),
                   agree(["val/a", "val/b" if rank == 0 else "val/c"], False, cpu),
                   agree(["val/a", "val/b"][: rank + 1], rank == 1, cpu)]  # fmt: skip
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "out.json").write_text(json.dumps(out))
    torch.distributed.destroy_process_group()


def test_parts_of_unequal_length_are_gathered_at_their_offsets(tmp_path) -> None:
    """``all_gather_cat`` of 3 and 2 values: the whole in rank order and each rank's offset
    (3 on rank 1), and hard_topk's mask over the ragged global batch: the two largest losses
    of the 5 (9 on rank 0, 8 on rank 1). With rank 1's offset wrong (2, a mutation the suite
    missed: its data-parallel runs gathered equal parts), rank 1 kept 3 and 8."""
    dirs = [tmp_path / "0", tmp_path / "1"]
    assert ranks_of(_gathers, (), dirs) == [0, 0]
    out = [json.loads((d / "out.json").read_text()) for d in dirs]
    for rank, offset in ((0, 0), (1, 3)):
        for sizes in ("None", "[3, 2]"):
            assert out[rank][sizes] == [[1.0, 2.0, 9.0, 8.0, 3.0], offset], (rank, sizes)
    assert out[0]["mask"] == [0.0, 0.0, 1.0] and out[1]["mask"] == [1.0, 0.0]
    assert out[0]["same"] == out[1]["same"] == [[True, []], [False, []], [False, [1]]]


class EmaCentred(torch.nn.Module):
    """A small float64 MLP centring its hidden layer by a buffer its forward reads, then
    updates in place from its (local) batch: DDP's forward gives every rank rank 0's."""

    def __init__(self, in_shape, out_dim: int) -> None:
        super().__init__()
        self.a, self.head = torch.nn.Linear(64, 4), torch.nn.Linear(4, out_dim)
        self.register_buffer("mean", torch.full((4,), 0.5))
        self.double()

    def forward(self, x):
        h = torch.tanh(self.a(x.flatten(1).double() / 16))
        out = self.head(torch.tanh(3 * (h - self.mean)))
        with torch.no_grad():
            self.mean.mul_(0.5).add_(0.5 * h.mean(0))
        return out


class GlobalExact(Callback):
    """The exact top eigenvalue (largest magnitude) of the global batch's objective, the mean
    cross-entropy over every rank's samples, from the model as DDP's forward begins (rank 0's
    buffers, broadcast as DDP does), by torch.func.hessian; rank 0 writes them to ``path``."""

    def __init__(self, path: str) -> None:
        self.path, self.exact, self.began = path, [], None

    def on_train_batch_start(self, trainer, batch) -> None:
        model = copy.deepcopy(trainer.model)
        for b in model.buffers():
            torch.distributed.broadcast(b, 0)
        xs = [torch.empty_like(batch.x) for _ in range(trainer.world.size)]
        ys = [torch.empty_like(batch.y) for _ in range(trainer.world.size)]
        torch.distributed.all_gather(xs, batch.x)
        torch.distributed.all_gather(ys, batch.y)
        self.began = (model, torch.cat(xs), torch.cat(ys))

    def on_before_optimizer_step(self, trainer, optimizer) -> None:
        model, x, y = self.began
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        flat = torch.cat([p.detach().reshape(-1) for _, p in named])

        def loss(v):
            parts = v.split([p.numel() for _, p in named])
            params = {n: t.view(p.shape) for (n, p), t in zip(named, parts, strict=True)}
            bufs = {n: b.clone() for n, b in model.named_buffers()}  # (it updates them)
            out = functional_call(model, {**params, **bufs}, (x,))
            return torch.nn.functional.cross_entropy(out, y)

        eigs = torch.linalg.eigvalsh(torch.func.hessian(loss)(flat))
        self.exact.append(float(eigs[-1] if eigs[-1] >= -eigs[0] else eigs[0]))

    def on_fit_end(self, trainer, metrics) -> None:
        if trainer.world.rank == 0:
            Path(self.path).write_text(json.dumps(self.exact))


def test_data_parallel_curvature_reads_rank_0s_buffers_as_ddp_gives_them(tmp_path) -> None:
    """DDP's forward gives every rank rank 0's buffers (``broadcast_buffers``), after the
    curvature instrument took its copies of the state the forward began with: a rank's own
    buffer, updated in place from its own samples, made its part of the Hessian another
    objective's (a review's reading). Its copies are rank 0's now, broadcast as DDP does, and
    the logged top eigenvalue is the global batch's exactly."""
    exact = tmp_path / "exact.json"
    overrides = [
        "~model", "+model._target_=test_distributed.EmaCentred", "data.batch_size=8",
        "trainer.max_steps=3", "logging.every_n_steps=1", "logging.progress=false",
        "trainer.checkpoint.every_n_steps=0", "instrument.curvature.every_n_steps=1",
        "instrument.curvature.tol=1e-10", "instrument.curvature.power_iters=200",
        "instrument.curvature.trace_probes=1",
        "+callbacks.exact._target_=test_distributed.GlobalExact", f"+callbacks.exact.path={exact}",
    ]  # fmt: skip
    ranks = [tmp_path / "rank0", tmp_path / "rank1"]
    assert launch((2, overrides, ranks)) == [[0, 0]]
    want = json.loads(exact.read_text())
    logged = [v for _, v in read_scalars(ranks[0])["curvature/top_eig"]]
    assert len(logged) == len(want) == 3 and len(set(want)) == 3
    for got, w in zip(logged, want, strict=True):
        assert got == pytest.approx(w, rel=1e-5)  # (float32 events of a float64 estimate)


def test_a_completed_single_run_leaves_the_process_group_before_it_exits(
    tmp_path, monkeypatch
) -> None:
    """Left to the interpreter's exit, gloo's threads were destroyed unjoined in about 1 exit
    in 4 of a minimal job ("terminate called without an active exception": torchrun exited 1
    after a completed run, a probe's). A completed single run frees the DDP wrapper and
    destroys the process group; a failed one, or a sweep's job, leaves it (a rank still in a
    collective would be waited for)."""
    import importlib

    import torch.distributed as dist

    import trainer.sweep as sweep
    from trainer.distributed import teardown

    run_module = importlib.import_module("trainer.run")
    result = {"monitor": "val/loss", "val/loss": 0.5, "status": "completed"}
    monkeypatch.setattr(sweep, "in_multirun", lambda: False)
    for fails, multirun, left in ((False, False, True), (True, False, False),
                                  (False, True, False)):  # fmt: skip
        store = tmp_path / f"store{fails}{multirun}"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        model(torch.ones(1, 2)).sum().backward()
        del model  # (the job's own references are gone when it returns)

        def job(cfg, fails=fails):
            if fails:
                raise RuntimeError("a job's failure")
            return result

        monkeypatch.setattr(run_module, "run", job)
        monkeypatch.setattr(sweep, "in_multirun", lambda multirun=multirun: multirun)
        try:
            sweep.run_job(None)
        except RuntimeError:
            assert fails
        assert dist.is_initialized() is not left, (fails, multirun)
        teardown()  # (and a no-op once left)
        assert not dist.is_initialized()
        teardown()
