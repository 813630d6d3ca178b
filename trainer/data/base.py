"""Data modules and the two loader paths.

A data module loads a train and a val split. A split held as tensors (:class:`TensorSplit`)
within ``data.memory_limit_mb`` is batched by index on the training device
(:class:`InMemoryLoader`: no per-sample ``Dataset.__getitem__``, no host-to-device copy per
step); any other ``Dataset`` (augmented or too large) goes through a ``DataLoader`` with workers
and pinned memory (:class:`DeviceLoader`). Both yield :class:`Batch` ``(x, y, index)`` on the
device, where ``index`` holds the samples' positions in their split, and both draw the epoch's
order from :func:`epoch_order`, so the same seed gives the same batches whichever path runs.
"""

from __future__ import annotations

import abc
import atexit
import functools
import logging
import math
import random
import signal
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    Sampler,
    Subset,
    default_collate,
    get_worker_info,
)

from trainer.config import ContractError
from trainer.distributed import SINGLE, World, shard
from trainer.rng import forked_rng

log = logging.getLogger(__name__)


class Batch(NamedTuple):
    x: Tensor  # (B, *input_shape)
    y: Tensor  # (B, ...) targets: int64 class labels (B,), float vectors (B, D), tokens (B, T)
    index: Tensor  # type: ignore[assignment]  # (B,) int64 positions (shadows tuple.index)


@dataclass
class TensorSplit:
    """A split held as tensors; ``transform`` maps a batch of ``x`` (on the device) to inputs."""

    x: Tensor  # (N, *input_shape), any dtype (uint8 images stay uint8 until batched)
    y: Tensor  # (N, ...) targets of any dtype and shape (class labels, vectors, tokens)
    transform: Callable[[Tensor], Tensor] | None = None

    def __len__(self) -> int:
        return self.x.shape[0]


class ByteNormalize:
    """uint8 images (B, C, H, W) -> float32 ``(x / 255 - mean) / std`` per channel, on x's device"""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        if self.mean.device != x.device:
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return (x.float().div_(255) - self.mean) / self.std


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The permutation of ``range(n)`` for one epoch: a function of (seed, epoch) alone."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class InMemoryLoader:
    """Batches a :class:`TensorSplit` by index on its device."""

    def __init__(
        self,
        split: TensorSplit,
        batch_size: int,
        device: torch.device,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        world: World = SINGLE,
    ):
        self.x = split.x.to(device)
        self.y = split.y.to(device)
        self.transform = split.transform
        self.num_samples = len(split)
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0
        #: data-parallel: each batch is this rank's slice of a global batch of
        #: ``world.size × batch_size`` samples (see :func:`trainer.distributed.shard`)
        self.world = world
        self.global_batch_size = batch_size * world.size
        #: samples in the global batch last yielded (all ranks' together)
        self.current_global_size = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration is epoch ``epoch``'s order, from batch ``start_batch`` on (a run
        resumed mid-epoch continues where it stopped)."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return batch_count(self.num_samples, self.global_batch_size, self.drop_last)

    def __iter__(self) -> Iterator[Batch]:
        if self.shuffle:
            order = epoch_order(self.num_samples, self.seed, self.epoch).to(
                self.device, non_blocking=True
            )  # (from pageable memory CUDA waits for the stream before copying: once an
            # epoch, before its first batch; the CPU tensor is not reused)
        else:
            order = torch.arange(self.num_samples, device=self.device)
        gbs = self.global_batch_size
        for i in range(self.start_batch, len(self)):
            start, stop = i * gbs, min((i + 1) * gbs, self.num_samples)
            self.current_global_size = stop - start
            if self.world.distributed:  # may be empty on a rank for a ragged last batch
                start, stop = shard(start, stop, self.world)
            index = order[start:stop]
            x = self.x[index]
            if self.transform is not None:
                x = self.transform(x)
            yield Batch(x, self.y[index], index)


def batch_count(num_samples: int, batch_size: int, drop_last: bool) -> int:
    return num_samples // batch_size if drop_last else math.ceil(num_samples / batch_size)


class RaggedShardError(ValueError):
    """A split's last global batch has fewer samples than there are ranks (the DataLoader
    path cannot give a rank an empty batch)."""

    def __init__(self, message: str, ragged: int):
        super().__init__(message)
        self.ragged = ragged


class EpochBatchSampler(Sampler[list[int]]):
    """The DataLoader path's batches: epoch ``epoch``'s order (:func:`epoch_order`, or
    ``range(n)`` unshuffled) cut into global batches of ``world.size × batch_size``, each rank
    taking its slice (:func:`trainer.distributed.shard`), from batch ``start_batch`` on: the
    same batches as :class:`InMemoryLoader` yields."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        world: World = SINGLE,
    ):
        self.num_samples, self.batch_size, self.shuffle = num_samples, batch_size, shuffle
        self.seed, self.drop_last, self.world = seed, drop_last, world
        self.global_batch_size = batch_size * world.size
        self.epoch = self.start_batch = 0
        self.passes = 0  # (iterations so far: a worker seeds each batch of each pass)
        ragged = 0 if drop_last else num_samples % self.global_batch_size
        if world.distributed and 0 < ragged < world.size:
            raise RaggedShardError(
                f"data: the last global batch of an epoch has {ragged} sample(s) for "
                f"{world.size} processes, so a rank would get none, which the DataLoader path "
                "cannot yield; set data.drop_last=true or another data.batch_size",
                ragged,
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (
            batch_count(self.num_samples, self.global_batch_size, self.drop_last) - self.start_batch
        )

    def global_size(self, i: int) -> int:
        """Samples in global batch ``i`` (all ranks' together)."""
        return min(self.global_batch_size, self.num_samples - i * self.global_batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            order = epoch_order(self.num_samples, self.seed, self.epoch).tolist()
        else:
            order = list(range(self.num_samples))
        gbs = self.global_batch_size
        n = batch_count(self.num_samples, gbs, self.drop_last)
        self.passes += 1
        for i in range(self.start_batch, n):
            start, stop = i * gbs, min((i + 1) * gbs, self.num_samples)
            if self.world.distributed:
                start, stop = shard(start, stop, self.world)
            # each index with its batch's (epoch, number): a worker seeds its RNGs from them;
            # and the pass, so that a worker seeds a batch of the same number again in the
            # next pass (validation's, epoch 0 each time: a persistent worker whose last batch
            # of one pass was the next one's first went on drawing, and a resumed run's
            # validations, fewer passes into their workers, differed, a probe's)
            yield [(self.epoch, i, j, self.passes) for j in order[start:stop]]  # type: ignore[misc]


def seed_worker(seed: int, rank: int, epoch: int, batch: int) -> None:
    """Seed a DataLoader worker's RNGs (torch, Python, NumPy) for one batch, from the run's
    seed, the process's rank, the epoch and the batch's number."""
    entropy = [seed % 2**64, rank, epoch, batch]
    value = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])
    # the CPU generator's own seed (a worker has no CUDA): torch.manual_seed's call into the
    # CUDA seeding took 120 of its 125 µs here
    torch.default_generator.manual_seed(value)
    random.seed(value)
    np.random.seed(value % 2**32)


#: the stop signals the trainer handles (trainer/run.py)
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name)
)


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: the stop signals the trainer handles do not
    stop the worker. torchrun, SLURM and a terminal's Ctrl-C signal the whole process group,
    workers included; a SIGTERM ended a worker whoever sent it (torch's worker handler), so
    the workers died of it and the main process, finishing its step before it
    checkpoints, failed at its next batch ("DataLoader worker ... is killed by signal:
    Terminated") with no checkpoint: data-parallel, where the ranks agree on the stop one
    step later, always. Such workers outlive a SIGTERM from the main process too, so the
    main process ends them itself (:meth:`DeviceLoader.close`, at the end of a fit and at
    exit); a worker whose main process dies exits on its own (torch's watchdog)."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


#: loaders whose workers may be running (closed at exit, before multiprocessing's own exit
#: handler terminates them with a SIGTERM they ignore, then waits for them: forever)
_OPEN: weakref.WeakSet[DeviceLoader] = weakref.WeakSet()


def _close_open_loaders() -> None:
    for loader in list(_OPEN):
        loader.close()


@functools.cache
def _register_close_at_exit() -> None:
    """Once, after multiprocessing's own exit handler (exit handlers run last in, first out:
    ours first)."""
    import multiprocessing.util  # noqa: F401  (registers its handler, if not yet)

    atexit.register(_close_open_loaders)


def _worker_context() -> Any:
    """None (torch's default) where the start method is one of Python's; inside a process
    pool of another kind (joblib's loky, Hydra's joblib launcher), the platform's default
    context: the workers failed to start with "'Process' object has no attribute 'env'"."""
    import multiprocessing

    if multiprocessing.get_start_method(allow_none=True) in (None, "fork", "spawn", "forkserver"):
        return None
    return multiprocessing.get_context(multiprocessing.get_all_start_methods()[0])


class IndexedDataset(Dataset):
    """Wraps a data set so each item also carries its index: ``(x, y, i)``.

    Given ``(epoch, batch, i, pass)`` (:class:`EpochBatchSampler`'s items) in a DataLoader
    worker, it seeds the worker's RNGs for that batch first (:func:`seed_worker`): random
    augmentation then depends on (seed, rank, epoch, batch) only, not on which worker took the
    batch or what it drew before, so a run resumed mid-epoch gets the same crops and flips, and
    so does a run with another number of workers; each validation, the same ones. (In the main
    process, ``num_workers=0``, the augmentation draws from the global RNG, which a checkpoint
    restores.)"""

    def __init__(self, dataset: Dataset | TensorSplit, seed: int = 0, rank: int = 0):
        self.dataset, self.seed, self.rank = dataset, seed, rank
        self._seeded: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: int | tuple[int, ...]) -> tuple[Tensor, Any, int]:
        i = self._index(item)
        if isinstance(self.dataset, TensorSplit):
            x = self.dataset.x[i]
            if self.dataset.transform is not None:
                x = self.dataset.transform(x.unsqueeze(0)).squeeze(0)
            return x, self.dataset.y[i], i
        try:
            sample = self.dataset[i]
        except Exception as e:  # (named: a worker's error named no sample, a probe's finding)
            e.add_note(f"(data: {type(self.dataset).__name__}[{i}] raised it{self._size()})")
            raise
        return self._pair(sample, i)

    def _index(self, item: int | tuple[int, ...]) -> int:
        """The sample index of a sampler's item ``(epoch, batch, i, pass)``, the worker's RNGs
        seeded for its batch (once per batch and pass: the same draws in every pass)."""
        if not isinstance(item, tuple):
            return item
        epoch, batch, i, *rest = item
        if self._seeded != (epoch, batch, *rest) and get_worker_info() is not None:
            seed_worker(self.seed, self.rank, epoch, batch)
            self._seeded = (epoch, batch, *rest)
        return i

    def _size(self) -> str:
        try:
            return f", of {len(self.dataset)} by its __len__"  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 (the Dataset's own error is the one raised)
            return ""

    def _pair(self, sample: Any, i: int) -> tuple[Tensor, Any, int]:
        """``(x, y, i)`` of a Dataset's sample ``i``; an input or a target given as a Python
        list or tuple of numbers becomes a tensor (collated as it was, a list of numbers became
        a list of tensors, one per position, which failed at the first batch: a probe's
        finding)."""
        try:
            x, y = sample  # an int label collates to int64, a tensor target as it is
        except (TypeError, ValueError) as e:  # (a later sample of another form: only the
            kind = type(sample).__name__  # first is checked before training)
            if isinstance(sample, tuple | list):
                kind = f"a {kind} of {len(sample)}"
            e.add_note(f"(data: {type(self.dataset).__name__}[{i}] is {kind}, not an (input, "
                       "target) pair)")  # fmt: skip
            raise
        return _numbers(x), _numbers(y), i


def _numbers(v: Any) -> Any:
    """A Python list or tuple of numbers (nested too) as ``torch.as_tensor`` makes it (floats
    in the default dtype, float32; ints int64; bools bool: the tensor the checks before
    training saw); anything else as it is."""
    if not isinstance(v, list | tuple) or any(isinstance(e, Tensor) for e in v):
        return v
    try:
        return torch.as_tensor(v)
    except (TypeError, ValueError, RuntimeError):  # (ragged, or not numbers: as before)
        return v


def _batched(dataset: object) -> bool:
    """Whether the class of ``dataset`` has a batched fetch, ``__getitems__`` (on the class:
    a wrapper forwarding attributes through ``__getattr__`` would hand over the wrapped
    table's, whose rows its own ``__getitem__`` turns into pairs: a review's finding)."""
    fetch = getattr(type(dataset), "__getitems__", None)
    if fetch is Subset.__getitems__:  # (torch's Subset forwards it to what the wrapped
        # Dataset's instance has: asked of its class here, so a subset of a Dataset without
        # one is fetched sample by sample, its errors naming the sample: a review's finding)
        return _batched(dataset.dataset)  # type: ignore[attr-defined]
    return callable(fetch)


class BatchedIndexedDataset(IndexedDataset):
    """An :class:`IndexedDataset` over a Dataset with a batched fetch, ``__getitems__``
    (torch's DataLoader calls it with a batch's indices, where a dataset has one): the
    wrapped Dataset's is called once per batch (it was never called: a probe's finding)."""

    def __getitems__(self, items: list[int | tuple[int, ...]]) -> list[tuple[Tensor, Any, int]]:
        indices = [self._index(item) for item in items]
        try:
            samples = self.dataset.__getitems__(indices)  # type: ignore[union-attr]
        except Exception as e:  # (named, and raised)
            more = " …" if len(indices) > 4 else ""
            e.add_note(f"(data: {type(self.dataset).__name__}.__getitems__ of indices "
                       f"{indices[:4]}{more} raised it{self._size()})")  # fmt: skip
            raise
        if len(samples) != len(indices):
            raise ValueError(
                f"data: {type(self.dataset).__name__}.__getitems__ returned {len(samples)} "
                f"samples for {len(indices)} indices"
            )
        return [self._pair(sample, i) for sample, i in zip(samples, indices, strict=True)]


def _own_collate(dataset: object) -> Callable[[list[tuple[Any, Any]]], Any] | None:
    """The ``collate`` method of a Dataset's class (looked for through torch's ``Subset``), or
    None: how a Dataset of variable-length samples makes its batches."""
    if isinstance(dataset, Subset):
        return _own_collate(dataset.dataset)
    if not callable(getattr(type(dataset), "collate", None)):
        return None
    return dataset.collate  # type: ignore[attr-defined,no-any-return]


class CollatedIndexedDataset(BatchedIndexedDataset):
    """An :class:`IndexedDataset` over a Dataset with a ``collate(samples)`` of its own: the
    batch's ``(x, y)`` pairs go through it (padding variable-length sequences, say), and the
    DataLoader takes the ``(x, y, index)`` it makes as it is (:func:`_as_collated`). In the
    data set, not the DataLoader's ``collate_fn``: a worker gets it with the data set, pickled
    once."""

    def __getitems__(  # type: ignore[override]
        self, items: list[int | tuple[int, ...]]
    ) -> tuple[Tensor, Tensor, Tensor]:
        if _batched(self.dataset):
            triples = super().__getitems__(items)
        else:
            triples = [self[item] for item in items]
        collate = _own_collate(self.dataset)
        assert collate is not None
        indices = [i for _, _, i in triples]
        try:
            batch = collate([(x, y) for x, y, _ in triples])
        except Exception as e:  # (named, and raised)
            e.add_note(f"({_collate_name(type(self.dataset).__name__, indices)} raised it)")
            raise
        x, y = self.checked(batch, indices, type(self.dataset).__name__)
        return x, y, torch.tensor(indices)

    @staticmethod
    def checked(batch: Any, indices: list[int], dataset: str) -> tuple[Tensor, Tensor]:
        """A collate's result as the batch ``(x, y)`` of tensors with a row per index (NumPy
        arrays and lists of numbers made tensors), or an error naming what it returned."""
        name = _collate_name(dataset, indices)
        if not (isinstance(batch, tuple | list) and len(batch) == 2):
            raise ContractError(
                f"{name} returned a {type(batch).__name__}; it returns the batch as an (x, y) "
                "pair of tensors, B samples each"
            )
        parts = []
        for what, v in zip("xy", batch, strict=True):
            if isinstance(v, np.ndarray):
                try:
                    v = torch.as_tensor(v)
                except (TypeError, ValueError, RuntimeError) as e:  # (strings, objects,
                    # negative strides: torch's words alone, a review's)
                    raise ContractError(
                        f"{name} returned {what} as a NumPy array of {v.dtype}, shape "
                        f"{v.shape}, which torch.as_tensor refuses ({e}); return tensors (of "
                        "numbers: tokenize text in the collate; np.ascontiguousarray for "
                        "negative strides)"
                    ) from e
            parts.append(_numbers(v))
        x, y = parts
        for what, v in (("x", x), ("y", y)):
            if not isinstance(v, Tensor) or v.ndim == 0 or v.shape[0] != len(indices):
                got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ContractError(
                    f"{name} returned {what} of {got}; it must be a tensor whose first "
                    f"dimension holds the batch's {len(indices)} samples"
                )
        return x, y


def _collate_name(dataset: str, indices: list[int]) -> str:
    more = " …" if len(indices) > 4 else ""
    return f"data: {dataset}.collate of indices {indices[:4]}{more}"


def _as_collated(batch: Any) -> Any:
    """The DataLoader's ``collate_fn`` for a :class:`CollatedIndexedDataset`: its batch is
    made already."""
    return batch


def _collate_pairs(triples: list[tuple[Any, Any, int]]) -> Any:
    """torch's ``default_collate``, and where the samples' shapes differ (variable-length
    sequences), an error naming them and the fix (torch's "stack expects each tensor to be
    equal size" named neither the data set nor the samples: a probe's)."""
    try:
        return default_collate(triples)
    except (RuntimeError, TypeError) as e:  # (TypeError: an int target beside a tensor one,
        # torch's "only integer tensors of a single element can be converted", unexplained)
        for k, what in ((0, "inputs"), (1, "targets")):
            parts: list[Any] = [t[k] for t in triples]
            shapes = [tuple(v.shape) if isinstance(v, Tensor | np.ndarray)
                      else f"a Python {type(v).__name__}" for v in parts]  # fmt: skip
            if len(set(shapes)) > 1:
                told = _by_shape(shapes, triples)
                e.add_note(
                    f"(data: the batch's {what} have different shapes, {told}: "
                    "samples of variable length are batched by a collate(self, samples) method "
                    "on the Dataset's class, which takes the batch's (x, y) pairs and returns "
                    "(x, y) tensors, padding the inputs and the targets with the loss's "
                    "ignore_index (README, 'Bring your own'); samples meant to be of one shape "
                    "are not: see __getitem__ of the indices named)"
                )
                break
        raise


def _by_shape(shapes: list[Any], triples: list[tuple[Any, Any, int]]) -> str:
    """Each shape with the indices of its samples (up to 4, and how many), the commonest
    first (the batch's first indices were named, of any shape: a probe's)."""
    indices: dict[Any, list[int]] = {}
    for shape, t in zip(shapes, triples, strict=True):
        indices.setdefault(shape, []).append(int(t[2]))
    told = []
    for shape, at in sorted(indices.items(), key=lambda kv: -len(kv[1]))[:4]:
        more = f", … ({len(at)} samples)" if len(at) > 4 else ""
        told.append(f"{shape} at indices {', '.join(map(str, at[:4]))}{more}")
    return "; ".join(told) + ("; …" if len(indices) > 4 else "")


class DeviceLoader:
    """A DataLoader over an :class:`IndexedDataset` whose batches are moved to the device."""

    def __init__(
        self,
        dataset: Dataset | TensorSplit,
        batch_size: int,
        device: torch.device,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        num_workers: int = 2,
        pin_memory: bool = True,
        world: World = SINGLE,
    ):
        self.num_samples = len(dataset)  # type: ignore[arg-type]
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.device = device
        self._dataset_name = type(dataset).__name__
        #: the processes the batches are sharded for (as InMemoryLoader's: the Trainer checks
        #: it against its own, a review's)
        self.world = world
        self.sampler = EpochBatchSampler(
            self.num_samples, batch_size, shuffle, seed, drop_last, world
        )
        self.global_batch_size = self.sampler.global_batch_size
        self.current_global_size = 0
        own = _own_collate(dataset) is not None
        wrapper = (
            CollatedIndexedDataset if own
            else BatchedIndexedDataset if _batched(dataset)
            else IndexedDataset
        )  # fmt: skip
        self.loader = DataLoader(
            wrapper(dataset, seed, world.rank),
            batch_sampler=self.sampler,
            collate_fn=_as_collated if own else _collate_pairs,
            num_workers=num_workers,
            pin_memory=pin_memory and device.type == "cuda",
            persistent_workers=num_workers > 0,
            worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
            multiprocessing_context=_worker_context() if num_workers > 0 else None,
            # (the workers' RNGs are seeded per batch: IndexedDataset)
            generator=torch.Generator().manual_seed(seed),
        )
        self._epoch_generator_state = self._seed_generator()
        if num_workers > 0:
            _register_close_at_exit()
            _OPEN.add(self)

    def close(self) -> None:
        """End the workers, which ignore stop signals (:func:`ignore_stop_signals`): the
        DataLoader's own shutdown (each told to stop, then joined), and a worker still alive
        after it (busy in its data set) killed. Iterating again starts new ones."""
        iterator = getattr(self.loader, "_iterator", None)  # (persistent workers' iterator)
        self.loader._iterator = None
        if iterator is None:
            return
        iterator._shutdown_workers()  # (a worker busy past its timeouts is sent a SIGTERM,
        for worker in getattr(iterator, "_workers", ()):  # which it ignores: killed, or
            if worker.is_alive():  # multiprocessing waited for it at exit, forever: a
                worker.kill()  # review's finding with a stuck __getitem__)
                worker.join()

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """As :meth:`InMemoryLoader.set_epoch`. With augmentation in workers, a resumed epoch
        has the same samples, crops and flips (each batch's seed: :class:`IndexedDataset`)."""
        self.sampler.set_epoch(epoch, start_batch)

    def __len__(self) -> int:  # the whole epoch's batches, whatever the start
        return batch_count(self.num_samples, self.global_batch_size, self.drop_last)

    def _seed_generator(self) -> Tensor:
        """Seed the generator the DataLoader draws its workers' base seed from (a generator
        of its own: drawn from torch's global one, it would move the run's) from the run's
        seed and the epoch, and return its state. A function of the two alone: a run resumed
        at an epoch's end, or whose persistent workers drew their seed in another epoch (at
        the process's first iteration only), keeps the state an uninterrupted run does, where
        carrying the state along left it a draw apart (a probe's). The workers' RNGs are
        seeded again for each batch anyway (:class:`IndexedDataset`)."""
        self.loader.generator.manual_seed(self.sampler.seed * 1_000_003 + self.sampler.epoch)
        return self.loader.generator.get_state()

    def state_dict(self) -> dict[str, Tensor]:
        """The workers' seed generator as the current epoch found it (for a resume)."""
        return {"generator": self._epoch_generator_state}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.loader.generator.set_state(state["generator"])  # (seeded again for each epoch)

    def __iter__(self) -> Iterator[Batch]:
        non_blocking = self.device.type == "cuda"
        self._epoch_generator_state = self._seed_generator()  # (before the iterator's draw)
        try:
            for i, (x, y, index) in enumerate(self.loader, self.sampler.start_batch):
                self.current_global_size = self.sampler.global_size(i)
                yield Batch(
                    x.to(self.device, non_blocking=non_blocking),
                    y.to(self.device, non_blocking=non_blocking),
                    index.to(self.device, non_blocking=non_blocking),
                )
        except RuntimeError as e:  # (torch's words alone, with no data set, a probe's: a
            # sample's own error is named where it is raised, IndexedDataset)
            if "exited unexpectedly" in str(e):
                e.add_note(f"(a worker loading {self._dataset_name} for this loader died: a "
                           "crash in native code its __getitem__ calls, the memory it was "
                           "given, or os._exit; data.num_workers=0 loads in this process, "
                           "where the error shows)")  # fmt: skip
            raise


Loader = InMemoryLoader | DeviceLoader


def _targets(split: TensorSplit | Dataset, name: str) -> Tensor | list[Tensor] | None:
    """A split's targets (a TensorSplit's ``y``, a Dataset's ``targets``), or None; a
    Dataset's sequence of per-sample targets as one tensor where they have one shape, else
    (variable-length sequences its collate pads) as a list of tensors, one per sample (a
    padded tensor cannot be them: each sample alone comes at its own length; and a list of
    tensors failed in ``torch.as_tensor`` with "only one element tensors can be converted",
    a probe's)."""
    targets = split.y if isinstance(split, TensorSplit) else getattr(split, "targets", None)
    if targets is None:
        return None
    if isinstance(targets, np.ndarray) and targets.dtype == object:  # (NumPy's ragged)
        targets = list(targets)
    if isinstance(targets, Tensor) or not isinstance(targets, list | tuple):
        return torch.as_tensor(targets)
    if not any(isinstance(t, Tensor | np.ndarray) for t in targets):
        try:
            return torch.as_tensor(targets)  # (a list of numbers, or of lists of one length)
        except (TypeError, ValueError, RuntimeError):
            pass
    # (tensors row by row: torch.as_tensor makes a list of one-element tensors scalars, so
    # one-token sequences' targets, (1,) each, came out (N,) and a token loss was refused,
    # blaming the data: a probe's)
    try:
        rows = [torch.as_tensor(t) for t in targets]
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"data: the {name} split's {type(split).__name__}.targets holds an entry that is "
            f"no tensor, array or list of numbers ({e})"
        ) from None
    if len({(r.shape, r.dtype) for r in rows}) <= 1:
        return torch.stack(rows) if rows else torch.as_tensor(targets)
    cls = type(split).__name__
    if len({(r.ndim, r.dtype) for r in rows}) > 1:
        kinds = sorted({f"{r.ndim}-d {r.dtype}" for r in rows})
        raise ValueError(
            f"data: the {name} split's {cls}.targets holds per-sample targets of different "
            f"kinds ({', '.join(kinds)}); per-sample targets are of one dtype and one "
            "number of dimensions (variable-length ones differ in their lengths alone)"
        )
    if _own_collate(split) is None:
        shapes = sorted({tuple(r.shape) for r in rows})[:3]
        raise ValueError(
            f"data: the {name} split's {cls}.targets holds per-sample targets of different "
            f"shapes ({', '.join(map(str, shapes))}, ...), and {cls} has no collate(samples) "
            "of its own to pad them into batches (README, 'Bring your own')"
        )
    return rows


def _check_split(split: object, name: str, module: str) -> None:
    """Refuse a split the loaders cannot index: they batch by sample index (a seeded
    permutation per epoch, each rank its slice, a resume that starts mid-epoch at its batch),
    so a split is a :class:`TensorSplit` or a map-style Dataset (``__len__``, ``__getitem__``).
    (A probe's finding: an IterableDataset failed on ``len()`` with Python's own TypeError,
    a DataLoader at ``split[0]``.)"""
    if isinstance(split, TensorSplit):
        x, y = split.x, split.y
        if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
            # (a longer y trained on its first rows, unsaid, its extra labels counted by a
            # class-balanced weighting; a shorter one failed mid-epoch on an index: a probe's)
            raise ContractError(
                f"data: {module}.load() returned a TensorSplit as its {name} split whose x has "
                f"{_rows(x)} and y {_rows(y)}: a TensorSplit holds one target per input, "
                "both with the samples along their first dimension"
            )
        return
    what = f"data: {module}.load() returned a {type(split).__name__} as its {name} split"
    if isinstance(split, DataLoader):
        raise ContractError(
            f"{what}; load() returns the data sets, and the trainer builds the loaders "
            "(data.batch_size, data.num_workers, its own seeded shuffling): return the "
            "loader's .dataset"
        )
    if isinstance(split, IterableDataset):
        raise ContractError(
            f"{what}, an IterableDataset; the trainer batches by sample index (a seeded "
            "permutation per epoch, each process its share of every batch, an exact resume "
            "from the middle of an epoch), which a stream cannot give: return a map-style "
            "Dataset (__len__ and __getitem__, e.g. one item per record of an index of your "
            "shards), or a TensorSplit of the stream read into memory"
        )
    if (
        isinstance(split, tuple)
        and len(split) == 2
        and all(isinstance(t, Tensor | np.ndarray) for t in split)
    ):
        raise ContractError(
            f"{what}, a tuple of two {type(split[0]).__name__}s; tensors x, y of the whole "
            "split are a TensorSplit: return TensorSplit(x, y) (trainer.data.base)"
        )
    missing = [m for m in ("__len__", "__getitem__") if not hasattr(type(split), m)]
    if getattr(type(split), "__getitem__", None) is Dataset.__getitem__:
        missing.append("__getitem__ of its own (torch's Dataset's raises NotImplementedError)")
    if missing:
        raise ContractError(
            f"{what}, which has no {' or '.join(missing)}; a split is a TensorSplit (x, y) or "
            "a map-style torch Dataset of (input, target) pairs (__len__ and __getitem__; a "
            "__getitems__ is used for the batches where it has one)"
        )


def _check_targets(
    split: TensorSplit | Dataset,
    targets: Tensor | list[Tensor] | None,
    name: str,
    first: Any = None,
) -> None:
    """A Dataset's ``targets`` attribute is what the trainer checks the labels of and counts
    the classes from (class-balanced weights, ``per_class``): refused where it is not the
    samples' targets, by its length and by the first and the last sample's (a probe's all-zero
    ``targets`` over labels 0 and 1 gave class 1 a class-balanced weight of 0, silently)."""
    if targets is None or isinstance(split, TensorSplit):
        return
    n, cls = len(split), type(split).__name__  # type: ignore[arg-type]
    fix = ("make it the samples' targets, in order (as __getitem__ returns them: a "
           "target_transform's output; with a collate of the Dataset's own, as it makes a "
           "sample's row), or hand the trainer a Dataset without it (a "
           "torch.utils.data.Subset(ds, range(len(ds))) has none)")  # fmt: skip
    if len(targets) != n:
        raise ValueError(
            f"data: the {name} split's {cls}.targets holds {len(targets)} targets for its "
            f"{n} samples (__len__); the trainer checks the labels and counts the classes "
            f"from it: {fix}"
        )
    for i in sorted({0, n - 1}) if n else ():
        y = _numbers(first if i == 0 and first is not None else _as_batched(split, i)[1])
        y = y if isinstance(y, Tensor) else torch.as_tensor(y)  # (a Python float: float32)
        if not _same_targets(y.detach(), targets[i]):
            kept = targets[i]
            how = f"{cls}[{i}]" if _own_collate(split) is None else (
                f"{cls}[{i}] through its collate")  # fmt: skip
            raise ValueError(
                f"data: the {name} split's {cls}.targets[{i}] is {kept.tolist()!r} "
                f"({kept.dtype}), but {how} gives the target {y.tolist()!r} ({y.dtype}); "
                f"the trainer checks the labels and counts the classes from .targets: {fix}"
            )


def _less_last_ones(shape: torch.Size) -> tuple[int, ...]:
    """``shape`` without its last dimensions of 1 ((1,) and (1, 1) as (), (3, 1) as (3,))."""
    dims = list(shape)
    while dims and dims[-1] == 1:
        dims.pop()
    return tuple(dims)


def _same_targets(y: Tensor, kept: Tensor) -> bool:
    """Whether a sample's target and its entry in ``targets`` are the same: the same shape
    (to last dimensions of 1: (1,) beside (), (3, 1) beside (3,)), the same kind (integer
    or bool, floating, complex: the checks read ``targets``'s dtype), integers exactly,
    floating values to the rounding of the less precise dtype, NaN for NaN (a float64
    ``targets`` beside float32 samples, and a missing label's NaN, are the same targets: a
    review's false refusals)."""
    kinds = [(t.is_floating_point(), t.is_complex()) for t in (y, kept)]
    if _less_last_ones(y.shape) != _less_last_ones(kept.shape) or kinds[0] != kinds[1]:
        return False
    y, kept = y.reshape(kept.shape), kept
    if not any(kinds[0]):  # integers and bools: exactly (float64 rounds past 2**53)
        return torch.equal(y.long(), kept.long())
    eps = max(torch.finfo(t.dtype).eps for t in (y, kept))
    wide = torch.complex128 if kinds[0][1] else torch.float64
    return torch.allclose(y.to(wide), kept.to(wide), rtol=eps, atol=0, equal_nan=True)


def _pair_of(split: Dataset, i: int) -> tuple[Any, Any]:
    """Sample ``i`` of a Dataset as ``(x, y)`` (refused naming it where it is no pair), as
    the batches fetch it: through the Dataset's ``__getitems__`` where its class has one."""
    sample = split.__getitems__([i])[0] if _batched(split) else split[i]  # type: ignore[attr-defined]
    if not isinstance(sample, (tuple, list)) or len(sample) != 2:
        got = (
            type(sample).__name__
            if not isinstance(sample, (tuple, list))
            else (f"a {type(sample).__name__} of {len(sample)}")
        )
        fix = (
            "wrap it: return sample['x'], sample['y'] from __getitem__"
            if isinstance(sample, dict)
            else "several inputs go into one tensor, and the model's forward splits them"
        )
        raise ContractError(
            f"data: a Dataset's samples must be (input, target) pairs; {type(split).__name__}"
            f"[{i}] is {got} ({fix})"
        )
    return sample[0], sample[1]


def _as_batched(split: Dataset, i: int) -> tuple[Any, Any]:
    """Sample ``i`` as the batches give it: through the Dataset's own ``collate`` where it has
    one (a batch of one, its row: raw samples, text say, become the tensors the model gets;
    they were refused as inputs that are no tensor, a review's), else as :func:`_pair_of`."""
    x, y = _pair_of(split, i)
    collate = _own_collate(split)
    if collate is None:
        return x, y
    try:
        batch = collate([(x, y)])
    except Exception as e:  # (named: a collate refusing a batch of one stopped the setup
        # with its own words alone, a review's)
        name = _collate_name(type(split).__name__, [i])
        e.add_note(f"({name} raised it: the checks before training pass each sample they "
                   "look at through it as a batch of one)")  # fmt: skip
        raise
    x, y = CollatedIndexedDataset.checked(batch, [i], type(split).__name__)
    return x[0], y[0]


def _varies(split: TensorSplit | Dataset, first: tuple[int, ...]) -> bool:
    """Whether the last sample, as the batches give it, has another input shape than the
    first's (a collate padding to a fixed length: not said, a review's)."""
    n = len(split)  # type: ignore[arg-type]
    if isinstance(split, TensorSplit) or n < 2:
        return False
    return tuple(torch.as_tensor(_as_batched(split, n - 1)[0]).shape) != first


def _rows(t: Tensor) -> str:
    return f"{t.shape[0]} samples" if t.ndim else "no sample dimension (a 0-d tensor)"


def _first_sample(split: TensorSplit | Dataset, name: str = "training") -> tuple[Tensor, Any]:
    """A split's first sample ``(x, y)`` as the model sees it (after a split's transform)."""
    if len(split) == 0:  # type: ignore[arg-type]
        raise ValueError(f"data: the {name} split is empty")
    if isinstance(split, TensorSplit):
        x = split.x[:1]
        if split.transform is not None:
            x = split.transform(x)
        return x[0], split.y[0]
    x, y = _as_batched(split, 0)
    cls = type(split).__name__
    try:
        torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as e:  # a dict or a tuple of tensors: torch's
        # "Could not infer dtype of dict" named neither the data nor what the trainer takes
        raise ContractError(
            f"data: a sample's input must be one tensor (or array, or nested lists of numbers); "
            f"{cls}[0]'s is a {type(x).__name__}, which torch.as_tensor "
            f"refuses ({e}). Several inputs per sample (token ids and a mask, features of two "
            "kinds) go into one tensor, stacked or concatenated in __getitem__, and your "
            "model's forward splits them"
        ) from e
    try:
        torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError) as e:  # (a dict, None or a string: torch's
        # "Could not infer dtype of dict" at the data's setup, naming neither the data nor the
        # target, a probe's; the same structure as an input was refused naming them)
        raise ContractError(
            f"data: a sample's target must be one tensor (or array, number, or nested lists "
            f"of numbers); {cls}[0]'s is a {type(y).__name__}, which torch.as_tensor refuses "
            f"({e}). What a loss needs besides the target (a mask, a weight per element) "
            "goes into the target's tensor, or comes from the loss itself (ignore_index, "
            'units(): README, "Bring your own")'
        ) from e
    for what, v in (("input", x), ("target", y)):
        if isinstance(v, list | tuple) and not isinstance(_numbers(v), Tensor):
            # (a list of 0-d tensors passed torch.as_tensor here, but the batches keep it a
            # list, as _numbers does, collated to a list of batched tensors: the first step
            # failed in DeviceLoader with "'list' object has no attribute 'to'", a probe's)
            raise ContractError(
                f"data: a sample's {what} must be one tensor (or array, number, or nested "
                f"lists of numbers); {cls}[0]'s is a {type(v).__name__} of {len(v)} holding "
                f"{', '.join(dict.fromkeys(type(e).__name__ for e in v))}, which the "
                "batches would keep as it is (the default collate makes it a list of batched "
                f"tensors): make it one tensor in __getitem__ (torch.stack), or give "
                f"{cls} a collate of its own"
            )
    return torch.as_tensor(x), y


#: what :class:`DataModule`'s ``__init__`` sets: the loader keys every data module has
LOADER_KEYS = ("batch_size", "eval_batch_size", "loader", "memory_limit_mb", "num_workers",
               "pin_memory", "drop_last", "train_subset")  # fmt: skip


class DataModule(abc.ABC):
    """Loads the splits (:meth:`load`) and builds the loaders (:meth:`setup`).

    The whole contract for a data set of your own (see README, "Bring your own"): subclass,
    take your keys plus ``**common`` (the loader keys below) in ``__init__``, and return
    ``(train, val)`` from :meth:`load`, each a :class:`TensorSplit` ``(x, y)`` or any
    ``torch.utils.data.Dataset`` of ``(x, y)`` pairs. ``y`` may be class labels (int64, (N,)),
    float vectors (regression) or token sequences. Set ``num_classes`` for classification
    (class-based weightings need it); ``input_shape`` and ``out_dim`` are read off the data when
    not set. A model's constructor receives ``in_shape``, ``out_dim``, ``num_classes`` and
    ``vocab_size`` from here, each only if it asks for it (:meth:`provides`).
    """

    #: shape of one input; None: read off the training split after :meth:`load`
    input_shape: tuple[int, ...] | None = None
    #: classes of a classification task (int64 labels in [0, num_classes)); None: not one
    num_classes: int | None = None
    #: outputs a model needs: num_classes for classification, else the size of one target
    #: (1 for scalar regression targets); None: read off the data after :meth:`load`
    out_dim: int | None = None
    #: tokens of a sequence task; None: not one
    vocab_size: int | None = None
    #: (N, ...) targets of the training split, on the CPU (class counts); None for a
    #: ``Dataset`` without a ``targets`` attribute, or one of variable-length targets
    train_targets: Tensor | None
    #: the same of the validation split (checked as the training split's)
    val_targets: Tensor | None = None
    #: a Dataset's variable-length targets (its collate pads them), one tensor per sample,
    #: each as that sample alone comes through the collate; None otherwise
    train_target_rows: list[Tensor] | None = None
    #: the same of the validation split
    val_target_rows: list[Tensor] | None = None
    #: the first training sample's target, as a tensor (its dtype where ``train_targets`` is
    #: None)
    first_target: Tensor | None = None
    #: the first training sample's input as the model gets it (after a transform, through a
    #: collate of one's own), without the batch dimension: what a lazy model's dry run feeds
    first_input: Tensor | None = None
    #: whether :meth:`setup` took ``out_dim`` as the size of one target (none was set)
    out_dim_inferred: bool = False
    #: the same of the validation split, where ``val_targets`` is None (a Dataset without
    #: ``targets``: its first target checked before training, not at the first validation)
    first_val_target: Tensor | None = None
    train_loader: Loader
    val_loader: Loader

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int = 1024,
        loader: str = "auto",
        memory_limit_mb: int = 4096,
        num_workers: int = 2,
        pin_memory: bool = True,
        drop_last: bool = False,
        train_subset: int = 0,
    ):
        self.batch_size = batch_size
        self.train_subset = train_subset
        self.eval_batch_size = eval_batch_size
        self.loader = loader
        self.memory_limit_mb = memory_limit_mb
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.drop_last = drop_last

    @abc.abstractmethod
    def load(self) -> tuple[TensorSplit | Dataset, TensorSplit | Dataset]:
        """Return (train, val)."""

    def setup(self, device: torch.device, seed: int, world: World = SINGLE) -> None:
        """Load the splits and build the loaders; data-parallel (``world``), each rank's
        loaders yield its slices of the global batches."""
        missing = [k for k in LOADER_KEYS if not hasattr(self, k)]
        if missing:  # (an AttributeError naming train_subset stopped the run, a probe's; a
            # dataclass setting them itself is fine, a review's)
            raise ContractError(
                f"data: {type(self).__name__} has no {', '.join(missing)}: the loader keys are "
                "set by DataModule.__init__; take **common in __init__ and pass it on with "
                "super().__init__(**common) (README, 'Bring your own')"
            )
        self.world = world
        splits = self.load()
        if isinstance(splits, Iterator):  # (a load() that yields its two splits)
            splits = tuple(splits)
        if not isinstance(splits, tuple | list) or len(splits) != 2:
            got = (
                f"a {type(splits).__name__} of {len(splits)}"
                if isinstance(splits, tuple | list)
                else f"a {type(splits).__name__}"
            )
            raise ContractError(
                f"data: {type(self).__name__}.load() returned {got}; it returns (train, val), "
                "two splits (with no validation data of its own, split part of the training "
                "data off)"
            )  # fmt: skip
        train, val = splits
        _check_split(train, "training", type(self).__name__)
        _check_split(val, "validation", type(self).__name__)
        if self.train_subset:
            train = self._subset(train, self.train_subset)
        kept = _targets(train, "training"), _targets(val, "validation")
        self.train_targets, self.val_targets = (t if isinstance(t, Tensor) else None
                                                for t in kept)  # fmt: skip
        self.train_target_rows, self.val_target_rows = (t if isinstance(t, list) else None
                                                        for t in kept)  # fmt: skip
        if self.out_dim is None and self.num_classes is not None:
            self.out_dim = self.num_classes
        # the samples the checks fetch draw from copies of the random states (an augmentation
        # drawing from torch's generator moved the run's by as many fetches: a review's
        # finding, and the first sample's fetch before it)
        with forked_rng(torch.device(device)):  # (the device's generator too: a split
            # held there)
            x0, y0 = _first_sample(train)
            _check_targets(train, kept[0], "training", y0)
            _check_targets(val, kept[1], "validation")
            xv, yv = _first_sample(val, "validation") if len(val) else (None, None)  # type: ignore[arg-type]
            if self.val_targets is None and xv is not None:
                self.first_val_target = torch.as_tensor(yv)
            varies = (self.input_shape is None and _own_collate(train) is not None
                      and _varies(train, tuple(x0.shape)))  # fmt: skip
        self.first_target = torch.as_tensor(y0)  # (an int label collates to int64, as here)
        self.first_input = x0
        fixed = _own_collate(train) is None and _own_collate(val) is None
        if fixed and xv is not None and xv.shape != x0.shape:  # (a model that takes one
            # shape failed at the first validation, an epoch's training later, with torch's
            # shape error naming neither split: a probe's; not refused: a convolutional model
            # validated at another resolution than its training crops is research practice)
            log.warning(
                "data: %s's validation inputs are of shape %s and its training inputs %s (the "
                "first sample of each): a model that takes one input shape fails at the first "
                "validation, after an epoch's training", type(self).__name__,
                tuple(xv.shape), tuple(x0.shape),
            )  # fmt: skip
        if self.input_shape is None:
            self.input_shape = tuple(x0.shape)
            if varies:
                log.warning(
                    "data: %s sets no input_shape: taken as its first training sample's, %s, as "
                    "its collate batches it alone; with samples of variable length, a model "
                    "that sizes itself by in_shape (a position table) needs the longest: set "
                    "input_shape in the data module", type(self).__name__, self.input_shape,
                )  # fmt: skip
        first = self.first_target
        sequences = first.ndim >= 1 and not first.is_floating_point()  # (class ids per position)
        if self.out_dim is None and sequences and self.vocab_size is not None:
            self.out_dim = self.vocab_size  # (a language model's next-token classes)
            log.warning(
                "data: %s sets no out_dim: taken as its vocab_size=%d, the classes each position "
                "is scored over (a language model's next token); set out_dim where the targets "
                "are other classes (a tagger's tags)", type(self).__name__, self.vocab_size,
            )  # fmt: skip
        self.out_dim_inferred = self.out_dim is None
        if self.out_dim is None:  # the size of one target (a scalar target: 1)
            self.out_dim = max(1, first.numel())
        self.train_loader = self._loader(train, self.batch_size, device, True, seed, self.drop_last)
        try:
            self.val_loader = self._loader(val, self.eval_batch_size, device, False, seed, False)
        except RaggedShardError as e:  # (validation keeps every sample: no drop_last)
            world = getattr(self, "world", SINGLE)
            # (a Dataset batched by its own collate is never held as tensors: not offered)
            memory = "" if _own_collate(val) is not None else (
                ", or data.loader=memory where the split is held as tensors")  # fmt: skip
            raise ValueError(
                f"data: the validation split's last global batch ({world.size} x "
                f"data.eval_batch_size={self.eval_batch_size}) has {e.ragged} sample(s) for "
                f"{world.size} processes, so a rank would get none, which the DataLoader path "
                "cannot yield (validation keeps every sample: data.drop_last does not apply to "
                f"it); set another data.eval_batch_size{memory}"
            ) from None

    def checked_targets(self) -> tuple[Tensor | None, Tensor | None]:
        """(training, validation) targets as a loss checks them before training: each split's
        ``targets``, or, for a Dataset without them, its first sample's as a batch of one
        (its dtype and shape, and its one label)."""
        first = [t if t is None else t.unsqueeze(0) for t in (self.first_target,
                                                              self.first_val_target)]  # fmt: skip
        return (
            self.train_targets if self.train_targets is not None else first[0],
            self.val_targets if self.val_targets is not None else first[1],
        )

    def provides(self) -> dict[str, Any]:
        """What a model's constructor may ask for by name (after :meth:`setup`)."""
        out: dict[str, Any] = {"in_shape": list(self.input_shape or ()), "out_dim": self.out_dim}
        if self.num_classes is not None:
            out["num_classes"] = self.num_classes
        if self.vocab_size is not None:
            out["vocab_size"] = self.vocab_size
        return out

    @staticmethod
    def _subset(split: TensorSplit | Dataset, n: int) -> TensorSplit | Dataset:
        """The first ``n`` samples of ``split`` (``data.train_subset``)."""
        total = len(split)  # type: ignore[arg-type]
        if n > total:
            raise ValueError(
                f"data.train_subset: got {n}, but the training split has only {total} samples "
                "(debug=overfit sets it to data.batch_size: lower that)"
            )
        if isinstance(split, TensorSplit):
            return TensorSplit(split.x[:n], split.y[:n], split.transform)
        subset = Subset(split, range(n))
        if hasattr(split, "targets"):  # (a list as a list: variable-length targets, one
            # tensor per sample, failed in torch.as_tensor, a review's)
            kept = split.targets
            subset.targets = (  # type: ignore[attr-defined]
                kept[:n] if isinstance(kept, list | tuple | Tensor | np.ndarray)
                else torch.as_tensor(kept)[:n]
            )  # fmt: skip
        return subset

    def _loader(
        self,
        split: TensorSplit | Dataset,
        batch_size: int,
        device: torch.device,
        shuffle: bool,
        seed: int,
        drop_last: bool,
    ) -> Loader:
        in_memory = isinstance(split, TensorSplit) and (
            self.loader == "memory"
            or (self.loader == "auto" and split.x.nbytes <= self.memory_limit_mb * 2**20)
        )
        if self.loader == "memory" and not in_memory:
            why = (  # (a collate's Dataset was called "augmented or too large", a probe's)
                "a Dataset whose collate makes its batches" if _own_collate(split) is not None
                else f"a {type(split).__name__}, not a TensorSplit (a Dataset: augmented, "
                "too large, or read sample by sample)"
            )  # fmt: skip
            raise ValueError(
                f"data.loader=memory: the split is {why}, which only a DataLoader batches; "
                "use data.loader=auto or data.loader=dataloader"
            )
        world = getattr(self, "world", SINGLE)
        if in_memory:
            assert isinstance(split, TensorSplit)
            return InMemoryLoader(split, batch_size, device, shuffle, seed, drop_last, world)
        return DeviceLoader(
            split, batch_size, device, shuffle, seed, drop_last, self.num_workers,
            self.pin_memory, world,
        )  # fmt: skip
