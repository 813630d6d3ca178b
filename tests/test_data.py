"""Digits and synthetic data, the in-memory loader and the DataLoader path."""

from __future__ import annotations

import pathlib

import pytest
import torch

from trainer.data.base import DeviceLoader, InMemoryLoader, TensorSplit, epoch_order
from trainer.data.digits import DigitsData
from trainer.data.synthetic import SyntheticData
from trainer.loop import window_sizes

CPU = torch.device("cpu")


def test_digits_are_scikit_learns_digits() -> None:
    from sklearn.datasets import load_digits  # the independent reference

    ref = load_digits()
    train, val = DigitsData(val_fraction=0.2).load()
    assert len(train) + len(val) == 1797 and len(val) == 359
    x = torch.cat([train.x, val.x]).view(-1, 64) * 16
    y = torch.cat([train.y, val.y])
    ref_x, ref_y = torch.tensor(ref.data, dtype=torch.float32), torch.tensor(ref.target)
    # the same 1,797 (image, label) pairs, in some order
    key = lambda xs, ys: sorted(map(tuple, torch.cat([xs, ys[:, None].float()], 1).tolist()))  # noqa: E731
    assert key(x, y) == key(ref_x, ref_y)
    assert set(y.tolist()) == set(range(10))


def test_digits_split_is_deterministic_and_disjoint() -> None:
    a_train, a_val = DigitsData(split_seed=0).load()
    b_train, b_val = DigitsData(split_seed=0).load()
    assert torch.equal(a_val.x, b_val.x) and torch.equal(a_train.y, b_train.y)
    c_train, c_val = DigitsData(split_seed=1).load()
    assert not torch.equal(a_val.x, c_val.x)
    train_rows = {tuple(r) for r in a_train.x.view(-1, 64).tolist()}
    leaked = sum(tuple(r) in train_rows for r in a_val.x.view(-1, 64).tolist())
    assert leaked < 10  # only the few images that occur twice in the data set itself


def split(n: int = 10) -> TensorSplit:
    return TensorSplit(torch.arange(n, dtype=torch.float32)[:, None] * 10, torch.arange(n) % 3)


def test_in_memory_loader_visits_each_sample_once_and_carries_indices() -> None:
    loader = InMemoryLoader(split(), batch_size=4, device=CPU, shuffle=True, seed=7)
    batches = list(loader)
    assert [len(b.y) for b in batches] == [4, 4, 2] and len(loader) == 3
    seen = torch.cat([b.index for b in batches])
    assert sorted(seen.tolist()) == list(range(10))
    for b in batches:  # each row belongs to the index it carries
        assert torch.equal(b.x[:, 0], b.index.float() * 10) and torch.equal(b.y, b.index % 3)
    assert torch.equal(seen, epoch_order(10, 7, 0))


def test_same_seed_same_order_other_epoch_other_order() -> None:
    a = InMemoryLoader(split(50), batch_size=8, device=CPU, shuffle=True, seed=1)
    b = InMemoryLoader(split(50), batch_size=8, device=CPU, shuffle=True, seed=1)
    order = lambda ld: torch.cat([bt.index for bt in ld]).tolist()  # noqa: E731
    assert order(a) == order(b)
    first = order(a)
    a.set_epoch(1)
    assert order(a) != first and sorted(order(a)) == sorted(first)


def test_drop_last_and_unshuffled_validation() -> None:
    loader = InMemoryLoader(split(), batch_size=4, device=CPU, shuffle=True, drop_last=True)
    assert [len(b.y) for b in loader] == [4, 4]
    val = InMemoryLoader(split(), batch_size=4, device=CPU, shuffle=False)
    assert torch.cat([b.index for b in val]).tolist() == list(range(10))


def test_dataloader_path_gives_the_same_batches() -> None:
    mem = InMemoryLoader(split(23), batch_size=5, device=CPU, shuffle=True, seed=3)
    dl = DeviceLoader(split(23), batch_size=5, device=CPU, shuffle=True, seed=3, num_workers=0)
    for epoch in (0, 1):
        mem.set_epoch(epoch)
        dl.set_epoch(epoch)
        for a, b in zip(mem, dl, strict=True):
            assert torch.equal(a.index, b.index) and torch.equal(a.x, b.x)
            assert torch.equal(a.y, b.y)


def test_dataloader_path_with_workers() -> None:
    dl = DeviceLoader(split(12), batch_size=4, device=CPU, shuffle=True, seed=0, num_workers=2)
    got = torch.cat([b.index for b in dl])
    assert torch.equal(got, epoch_order(12, 0, 0))


def test_dataloader_workers_outlive_a_stop_signal_and_are_closed() -> None:
    """torchrun and SLURM signal the whole process group: the workers died of SIGTERM and the
    main process, finishing its step before checkpointing, failed at its next batch ("worker
    ... is killed by signal: Terminated"), data-parallel always, with no checkpoint (a probe's
    finding). They ignore the stop signals, and the loader ends them itself (a first version
    left that to multiprocessing at exit, whose SIGTERM they ignore: every run with workers
    hung at its exit, a review's finding)."""
    import os
    import signal

    dl = DeviceLoader(split(40), batch_size=4, device=CPU, shuffle=True, seed=0, num_workers=2)
    it = iter(dl)
    seen = [next(it).index, next(it).index]  # (one from each worker: both set up)
    workers = list(dl.loader._iterator._workers)
    for w in workers:
        os.kill(w.pid, signal.SIGTERM)
        os.kill(w.pid, signal.SIGINT)
    seen += [b.index for b in it]  # the epoch's other 8 batches, from the same workers
    assert torch.equal(torch.cat(seen), epoch_order(40, 0, 0))
    assert all(w.is_alive() for w in workers)
    dl.close()  # (the DataLoader's shutdown: each worker told to stop, and joined)
    assert [w.exitcode for w in workers] == [0, 0]
    assert torch.equal(torch.cat([b.index for b in dl]), epoch_order(40, 0, 0))  # (new ones)
    dl.close()


class Stuck(torch.utils.data.Dataset):
    """Samples 0-3 at once; any later one never (a worker stuck in its ``__getitem__``)."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int):
        if i >= 4:
            import time

            time.sleep(10**6)
        return torch.zeros(2), 0


def test_a_worker_stuck_in_its_dataset_is_ended_by_close(monkeypatch) -> None:
    """The DataLoader's shutdown sends a worker that does not stop in time a SIGTERM, which
    the workers ignore: close() returned with it alive, and the process waited for it at
    exit forever (a review's finding). It is killed."""
    from torch.utils.data import _utils

    monkeypatch.setattr(_utils, "MP_STATUS_CHECK_INTERVAL", 0.1)  # (the shutdown's waits)
    dl = DeviceLoader(Stuck(), batch_size=4, device=CPU, shuffle=False, num_workers=1)
    it = iter(dl)
    next(it)  # (the worker now waits in sample 4, prefetching the next batch)
    workers = list(dl.loader._iterator._workers)
    try:
        dl.close()
        assert not any(w.is_alive() for w in workers)
    finally:  # (not left to the exit on a failure)
        for w in workers:
            if w.is_alive():
                w.kill()


class FailsAt(torch.utils.data.Dataset):
    """Sample 6 raises (or, ``triple``, is a tuple of 3); its __len__ says 12."""

    def __init__(self, triple: bool = False) -> None:
        self.triple = triple

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int):
        if i == 6 and self.triple:
            return torch.zeros(2), 0, 1
        if i == 6:
            raise ValueError("boom")
        return torch.zeros(2), 0


@pytest.mark.parametrize("workers", [0, 1])
def test_a_datasets_error_names_the_sample(workers) -> None:
    """A Dataset's error in __getitem__ named no sample (in a worker: torch's "Caught
    ValueError in DataLoader worker process 0", a probe). It carries the index and the length
    its __len__ gives."""
    cases = [
        (False, "boom", "(data: FailsAt[6] raised it, of 12 by its __len__)"),
        # a later sample of another form (only the first is checked before training)
        (True, "unpack", "(data: FailsAt[6] is a tuple of 3, not an (input, target) pair)"),
    ]
    for triple, error, where in cases:
        dl = DeviceLoader(FailsAt(triple), batch_size=4, device=CPU, shuffle=False,
                          num_workers=workers)  # fmt: skip
        try:
            with pytest.raises(ValueError, match=error) as raised:
                list(dl)
            assert where in str(raised.value) + "".join(getattr(raised.value, "__notes__", ()))
        finally:
            dl.close()


def test_synthetic_is_reproducible_and_shaped() -> None:
    d = SyntheticData(num_train=100, num_val=20, num_classes=4, shape=[3, 5, 5], seed=2)
    train, val = d.load()
    assert train.x.shape == (100, 3, 5, 5) and val.x.shape == (20, 3, 5, 5)
    assert d.input_shape == (3, 5, 5) and int(train.y.max()) <= 3
    again, _ = SyntheticData(
        num_train=100, num_val=20, num_classes=4, shape=[3, 5, 5], seed=2
    ).load()
    assert torch.equal(train.x, again.x)


def test_synthetic_is_learnable_by_nearest_class_mean() -> None:
    train, val = SyntheticData(num_train=2000, num_val=500, shape=[64], noise=1.0).load()
    means = torch.stack([train.x[train.y == c].mean(0) for c in range(10)])
    pred = torch.cdist(val.x, means).argmin(1)
    assert (pred == val.y).float().mean() > 0.9


@pytest.mark.parametrize(
    ("n", "bs", "drop", "acc", "expected"),
    [
        (10, 4, False, 1, [4, 4, 2]),
        (10, 4, False, 2, [8, 8, 2]),
        (10, 4, True, 2, [8, 8]),
        (23, 5, False, 3, [15, 15, 15, 8, 8]),
    ],
)
def test_accumulation_windows(n, bs, drop, acc, expected) -> None:
    assert window_sizes(n, bs, drop, acc) == expected


def test_a_resume_between_0_and_more_workers_says_the_draws_differ(caplog) -> None:
    """With 0 workers a Dataset's augmentation draws from the global generators, with more
    from per-batch seeds: a resume across that changed the draws unsaid (3.7e-3 in a probe's
    weights). Said, on the DataLoader path only, not between two counts > 0."""
    from types import SimpleNamespace

    from trainer.run import _warn_worker_draws

    loader = DeviceLoader(FailsAt(), batch_size=4, device=CPU, shuffle=False, num_workers=0)
    trainer = SimpleNamespace(train_loader=loader)
    with caplog.at_level("WARNING", logger="trainer.run"):
        _warn_worker_draws({"data": {"num_workers": 2}}, {"data": {"num_workers": 1}}, trainer)
        assert not caplog.records
        _warn_worker_draws({"data": {"num_workers": 2}}, {"data": {"num_workers": 0}}, trainer)
        _warn_worker_draws({"data": {"num_workers": 0}}, {"data": {"num_workers": 0}},
                           SimpleNamespace(train_loader=[]))  # fmt: skip
    assert len(caplog.records) == 1
    assert "data.num_workers 2 -> 0: random draws" in caplog.records[0].getMessage()


def test_a_resume_on_another_number_of_processes_says_what_draws_otherwise(caplog) -> None:
    """Resumed on another number of processes, a run continues up to rounding where nothing
    is drawn at random; a Dataset's augmentation and dropout (one stream on every rank) draw
    otherwise: a probe's 2-process augmented run resumed on one ended 0.024 away in the
    weights, unsaid. Said, naming what draws; not on the same number, nor where nothing draws:
    a split of tensors on the DataLoader path without a transform or with the built-in
    normalization, dropout of p = 0 or in eval mode as the checkpoint has it (a review's)."""
    from types import SimpleNamespace

    from torch import nn

    from trainer.data.base import ByteNormalize
    from trainer.distributed import World
    from trainer.run import _warn_world_draws

    def loader(dataset) -> DeviceLoader:
        return DeviceLoader(dataset, batch_size=4, device=CPU, shuffle=False, num_workers=0)

    x, y = torch.zeros(8, 1, 2, 2, dtype=torch.uint8), torch.zeros(8, dtype=torch.int64)
    drawing, normalized = loader(FailsAt()), loader(TensorSplit(x, y, ByteNormalize([0.5], [1])))
    plain, dropped = nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
    attention = nn.MultiheadAttention(4, 2, dropout=0.1)
    one, two = World(), World(0, 2, 0)

    def resume(state, train_loader, model, world) -> None:
        trainer = SimpleNamespace(train_loader=train_loader, model=model, world=world)
        _warn_world_draws(state, trainer)

    ranks = {"tally_ranks": [{}, {}]}
    with caplog.at_level("WARNING", logger="trainer.run"):
        resume(ranks, drawing, plain, one)  # said
        resume({}, [], dropped, one)
        resume(ranks, [], nn.Sequential(nn.Dropout(0.0)), one)
        resume(ranks, normalized, plain, one)
        resume(ranks, loader(TensorSplit(x, y)), plain, one)
        resume({**ranks, "train_modes": {"1": False}}, [], dropped, one)
        resume({}, drawing, dropped, two)  # said
        resume(ranks, [], plain, two)
        resume({}, [], attention, two)  # said
        resume({}, [], nn.Sequential(nn.GRU(4, 4, num_layers=2, dropout=0.1)), two)  # said
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 4, said
    assert "-> 2: dropout (0: one stream" in said[3]
    assert "resume: 2 process(es) -> 1: a Dataset's random draws (augmentation) draw" in said[0]
    assert said[1].startswith("resume: 1 process(es) -> 2: a Dataset's random draws")
    assert "and dropout (1: one stream, the same on every rank) draw otherwise" in said[1]
    assert "-> 2: dropout (MultiheadAttention: one stream" in said[2]


@pytest.mark.parametrize(("n", "fraction"), [(10, 0.35), (7, 0.5), (100, 0.2)])
def test_a_tensors_files_split_is_disjoint_and_whole(tmp_path, n, fraction) -> None:
    """Its own validation split: round(f·N) samples, the rest for training, none in both (a
    sample of the validation split trained on would flatter val/*)."""
    from trainer.data.tensors import TensorsData

    x = torch.arange(n, dtype=torch.float32)[:, None]  # each sample names itself
    torch.save({"x": x, "y": torch.arange(n) % 3}, tmp_path / "d.pt")
    train, val = TensorsData(str(tmp_path / "d.pt"), val_fraction=fraction).load()
    seen_train, seen_val = train.x[:, 0].tolist(), val.x[:, 0].tolist()
    assert len(seen_val) == round(fraction * n)
    assert sorted(seen_train + seen_val) == list(range(n))  # disjoint, and every sample
    assert torch.equal(train.y, train.x[:, 0].long() % 3)  # labels stay with their samples


def _tensors(tmp_path, content, name="d.pt", **kw):
    from trainer.data.tensors import TensorsData

    torch.save(content, tmp_path / name)
    return TensorsData(str(tmp_path / name), **kw)


_X4, _Y4 = torch.zeros(4, 2), torch.tensor([0, 1, 0, 1])


@pytest.mark.parametrize(
    ("content", "kw", "match"),
    [
        ({"x": torch.zeros(3, 2), "y": _Y4}, {}, "'x' has 3 samples but 'y' 4"),
        ({"x": _X4, "y": _Y4, "y_val": _Y4}, {}, "holds only one of 'x_val' and 'y_val'"),
        (
            {"x": _X4, "y": _Y4, "x_val": torch.zeros(3, 2), "y_val": _Y4[:2]},
            {},
            "'x_val' has 3 samples but 'y_val' 2",
        ),  # fmt: skip
        ({"x": _X4, "y": [0, 1, 0, 1]}, {}, "'y' is a list, not a tensor"),
        ({"x": _X4, "y": torch.tensor([0, -1, 1, 0])}, {}, "class labels must be >= 0"),
        ({"x": _X4[:3], "y": _Y4[:3]}, {"val_fraction": 0.1}, "0.1 of 3 samples leaves an empty"),
        ({"x": _X4[:3], "y": _Y4[:3]}, {"val_fraction": 0.9}, "0.9 of 3 samples leaves an empty"),
    ],
)
def test_a_tensors_file_that_cannot_be_used_is_refused_naming_the_cause(
    tmp_path, content, kw, match
) -> None:
    from trainer.data.tensors import TensorFileError

    with pytest.raises(TensorFileError, match=match):
        _tensors(tmp_path, content, **kw).load()


def test_a_tensors_file_is_read_without_running_its_pickled_code(tmp_path) -> None:
    """``torch.load(weights_only=True)`` and ``np.load(allow_pickle=False)``: a file holding a
    pickled object is refused, and the object's code never runs (here: it would write a
    marker file). A missing file is named; the suffix's case does not matter."""
    import numpy as np

    from trainer.data.tensors import TensorFileError, TensorsData

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    torch.save({"x": _X4, "y": _Y4, "z": Payload()}, tmp_path / "evil.pt")
    np.savez(tmp_path / "evil.npz", x=np.zeros((4, 2)), y=np.array([Payload()], dtype=object))
    for name in ("evil.pt", "evil.npz"):
        with pytest.raises(TensorFileError, match=f"could not read .*{name}"):
            TensorsData(str(tmp_path / name)).load()
        assert not marker.exists(), name
    with pytest.raises(TensorFileError, match=r"data.path: .*nowhere.pt does not exist"):
        TensorsData(str(tmp_path / "nowhere.pt")).load()
    train, val = _tensors(tmp_path, {"x": _X4, "y": _Y4}, name="upper.PT").load()
    assert len(train.y) + len(val.y) == 4


def test_a_tensors_files_labels_and_split_seed(tmp_path) -> None:
    """Classes are int64 labels of shape (N,), counted over both splits (a class seen only in
    validation still has an output); other targets are not classes; ``split_seed`` picks the
    validation samples, the same ones for the same seed."""
    x = torch.arange(20, dtype=torch.float32)[:, None]
    y = torch.arange(20) % 3
    both = {"x": x, "y": y, "x_val": x[:2], "y_val": torch.tensor([3, 0])}
    data = _tensors(tmp_path, both)
    data.load()
    assert data.num_classes == 4
    for targets in (torch.zeros(20, 2, dtype=torch.int64), y.to(torch.complex64), y.float()):
        data = _tensors(tmp_path, {"x": x, "y": targets})
        data.load()
        assert data.num_classes is None, targets.dtype

    def val_of(seed: int) -> list[float]:
        return _tensors(tmp_path, {"x": x, "y": y}, split_seed=seed).load()[1].x[:, 0].tolist()

    assert val_of(0) == val_of(0) and val_of(0) != val_of(1)


def test_the_long_tail_keeps_ceil_n_c_times_ratio_to_the_minus_c_over_k_minus_1() -> None:
    """data.imbalance_ratio: class c keeps ⌈n_c · ρ^(−c/(K−1))⌉ of its training samples (the
    first ones in the split's order), counted against the balanced split in exact rational
    arithmetic (class 0 keeps all, class K−1 its n/ρ)."""
    from fractions import Fraction

    _, balanced_val = DigitsData().load()
    balanced, _ = DigitsData().load()
    tail, val = DigitsData(imbalance_ratio=10).load()
    assert torch.equal(val.y, balanced_val.y)  # (the validation split stays balanced)
    n = torch.bincount(balanced.y, minlength=10).tolist()
    kept = torch.bincount(tail.y, minlength=10).tolist()
    for c in range(10):  # ⌈n·10^(−c/9)⌉ by comparison: the least k with k ≥ n·10^(−c/9),
        # i.e. k⁹ ≥ n⁹·10^(−c), exactly
        want = next(k for k in range(n[c] + 1) if Fraction(k) ** 9 >= Fraction(n[c]) ** 9 / 10**c)
        assert kept[c] == want, (c, kept, n)
    assert (kept[0], kept[9]) == (140, 15)  # (README: 140 zeros down to 15 nines)


@pytest.mark.parametrize("loader", ["memory", "dataloader"])
@pytest.mark.parametrize("start", [0, 1, 2])
def test_the_global_batch_size_is_each_batchs_own_from_any_start(loader, start) -> None:
    """``current_global_size``: the samples of the global batch just yielded (every rank's), as
    the data-parallel objective reads it; 10 samples in global batches of 4 (2 ranks × 2) are
    4, 4, 2, also for an epoch resumed at batch ``start`` (the DataLoader path counted a
    resumed epoch's batches from 0: its ragged last batch read as full)."""
    from trainer.distributed import World

    world = World(1, 2, 1)  # (rank 1 of 2: a shard of each global batch; no process group)
    if loader == "memory":
        ld = InMemoryLoader(split(10), batch_size=2, device=CPU, shuffle=True, seed=0, world=world)
    else:
        ld = DeviceLoader(split(10), batch_size=2, device=CPU, shuffle=True, seed=0,
                          num_workers=0, world=world)  # fmt: skip
    ld.set_epoch(1, start)
    sizes = [ld.current_global_size for _ in ld]
    assert sizes == [4, 4, 2][start:]


@pytest.mark.parametrize("loader", ["memory", "dataloader"])
def test_drop_last_drops_a_ragged_training_batch_never_a_validation_one(loader) -> None:
    """data.drop_last is the training loader's: validation scores every held-out sample (359
    in batches of 64, the last of 39), or val/* would leave some out."""
    data = DigitsData(batch_size=64, eval_batch_size=64, drop_last=True, loader=loader,
                      num_workers=0)  # fmt: skip
    data.setup(CPU, 0)
    assert [len(b.y) for b in data.val_loader] == [64] * 5 + [39]
    assert [len(b.y) for b in data.train_loader] == [64] * (1438 // 64)


def test_epoch_order_tells_seed_and_epoch_apart() -> None:
    """The order is a function of (seed, epoch) as a pair: seed 1's first epoch is not seed 0's
    second (``seed + epoch``, a mutation the suite missed, made them one permutation: runs of
    neighbouring seeds saw each other's epochs)."""
    assert not torch.equal(epoch_order(50, 1, 0), epoch_order(50, 0, 1))
    assert not torch.equal(epoch_order(50, 2, 0), epoch_order(50, 1, 1))
    assert torch.equal(epoch_order(50, 1, 0), epoch_order(50, 1, 0))


def test_the_batch_sampler_on_two_ranks_drops_or_refuses_a_ragged_last_batch() -> None:
    """The DataLoader path on 2 ranks (global batches of 2 × 2): 9 samples leave a last
    global batch of 1, which one rank would get nothing of: refused without drop_last, naming
    the count, and dropped with it; a last batch of 2 (as many samples as ranks) gives each
    rank one; none left over is no ragged batch."""
    from trainer.data.base import EpochBatchSampler, RaggedShardError
    from trainer.distributed import World

    def slices(n: int, rank: int, drop_last: bool) -> list[list[int]]:
        sampler = EpochBatchSampler(n, 2, shuffle=False, drop_last=drop_last,
                                    world=World(rank, 2, rank))  # fmt: skip
        batches = [[i for _, _, i, _ in batch] for batch in sampler]
        assert len(sampler) == len(batches)
        return batches

    with pytest.raises(RaggedShardError, match=r"the last global batch of an epoch has 1 "
                       r"sample\(s\) for 2 processes") as info:  # fmt: skip
        slices(9, 0, drop_last=False)
    assert info.value.ragged == 1
    assert slices(9, 0, drop_last=True) == [[0, 1], [4, 5]]
    assert slices(9, 1, drop_last=True) == [[2, 3], [6, 7]]
    assert slices(10, 0, drop_last=False) == [[0, 1], [4, 5], [8]]
    assert slices(10, 1, drop_last=False) == [[2, 3], [6, 7], [9]]
    assert slices(8, 1, drop_last=False) == [[2, 3], [6, 7]]


def test_an_empty_validation_dataset_without_targets_gives_no_validation_batch() -> None:
    """A validation Dataset of no items (and no ``targets``) has no first sample to check:
    its loader is built and yields nothing (fetching its sample 0 refused it as an empty
    training split, a mutation the suite missed)."""
    from trainer.data.base import DataModule

    class NoItems(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 0

        def __getitem__(self, i):
            raise IndexError(i)

    class EmptyVal(DataModule):
        num_classes = 3

        def load(self):
            return split(10), NoItems()

    data = EmptyVal(batch_size=4, eval_batch_size=4, num_workers=0)
    data.setup(CPU, 0)
    assert len(data.val_loader) == 0 and list(data.val_loader) == []
    assert data.first_val_target is None and len(data.train_loader) == 3


class Draws(torch.utils.data.Dataset):
    """Each item draws from torch's, Python's and NumPy's global generators (augmentation)."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        import random

        import numpy as np

        return torch.tensor([torch.rand(()).item(), random.random(), np.random.rand()]), 0


def test_a_workers_draws_depend_on_the_batch_alone(monkeypatch) -> None:
    """In a DataLoader worker (faked here: no worker process starts), the generators are
    seeded once per batch from (seed, rank, epoch, batch): a batch's items draw the same
    whatever was drawn before, and each of the four changes them; items of one batch draw
    on from one seeding (each seeded anew, they would all draw alike). In the main process
    (``num_workers=0``) nothing is seeded: the draws go on from the global generators, which
    a checkpoint restores."""
    import trainer.data.base as base
    from trainer.data.base import IndexedDataset, seed_worker
    from trainer.rng import forked_rng

    with forked_rng(CPU):  # (the global generators as they were, after: seeded here)
        torch.manual_seed(123)
        main = IndexedDataset(Draws(), seed=0)[(0, 0, 0)][0][0].item()
        torch.manual_seed(123)
        assert main == torch.rand(()).item()
        monkeypatch.setattr(base, "get_worker_info", lambda: object())

        def batch(seed=0, rank=0, epoch=0, number=0, before=0) -> list[list[float]]:
            ds = IndexedDataset(Draws(), seed=seed, rank=rank)
            torch.rand(before)  # (whatever this worker drew before)
            return [ds[(epoch, number, i)][0].tolist() for i in (0, 1, 2)]

        first = batch()
        assert batch(before=5) == first and batch() == first
        assert len({tuple(x) for x in first}) == 3  # three items, three draws
        for other in ({"seed": 1}, {"rank": 1}, {"epoch": 1}, {"number": 1}):
            got = batch(**other)
            pairs = zip(got, first, strict=True)
            assert all(a[k] != b[k] for a, b in pairs for k in range(3)), other
        seed_worker(0, 0, 0, 0)  # what the batch's seeding is
        assert Draws()[0][0].tolist() == first[0]
        ds = IndexedDataset(Draws(), seed=0)  # the next batch reseeds, and coming back too
        seq = [ds[(0, b, 0)][0].tolist() for b in (0, 1, 0)]
        assert seq[0] == first[0] and seq[1] == batch(number=1)[0] and seq[2] == first[0]
        # a batch of the same epoch and number in the sampler's next pass (validation's,
        # epoch 0 each time) is seeded again: the draws of the first pass, not the ones after
        # them (a persistent worker whose last batch of a pass was the next one's first drew
        # on, and a resumed run's validations differed, a probe's)
        ds = IndexedDataset(Draws(), seed=0)
        passes = [[ds[(0, 0, i, k)][0].tolist() for i in (0, 1, 2)] for k in (1, 2)]
        assert passes == [first, first]
    from trainer.data.base import EpochBatchSampler

    sampler = EpochBatchSampler(4, 2, shuffle=False)
    assert [[item[3] for item in b] for _ in range(2) for b in sampler] == [[1, 1]] * 2 + [
        [2, 2]
    ] * 2
