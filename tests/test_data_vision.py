"""TorchvisionData through torchvision's real loaders, on tiny files written in the real formats.

Each test writes a few images (known random pixels and labels) the way the official archives lay
them out on disk: MNIST / Fashion-MNIST as uncompressed big-endian idx files under
``<root>/<Class>/raw``, CIFAR-10 as pickled batches under ``<root>/cifar-10-batches-py``. Then
``TorchvisionData.setup`` reads them with ``torchvision.datasets.MNIST / FashionMNIST / CIFAR10``
and the tests check what comes out of the loaders against what was written.
"""

from __future__ import annotations

import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.data.base import DeviceLoader, InMemoryLoader
from trainer.data.vision import TorchvisionData

N_TRAIN, N_TEST = 20, 10
BATCH, EVAL_BATCH = 4, 8

# the sets' published per-channel statistics (an oracle independent of vision.SETS)
STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
SHAPES = {"mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
MNIST_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]
CIFAR_FILES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]


@dataclass
class Written:
    """What a test put on disk, as (N, C, H, W) uint8 images and int64 labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


# --- writing the on-disk formats ---


def _write_idx(path: Path, arr: np.ndarray) -> None:
    """Big-endian idx: magic 0x00000803 (uint8, 3 dims) or 0x00000801 (uint8, 1 dim), dims, data."""
    assert arr.dtype == np.uint8 and arr.ndim in (1, 3)
    magic = 0x0803 if arr.ndim == 3 else 0x0801
    header = struct.pack(f">I{arr.ndim}I", magic, *arr.shape)
    path.write_bytes(header + arr.tobytes())


def _write_mnist(root: Path, cls_name: str, rng: np.random.Generator) -> Written:
    raw = root / cls_name / "raw"
    raw.mkdir(parents=True)
    out = []
    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        out += [torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels).long()]
    return Written(*out)


def _pickle(path: Path, obj: dict) -> None:
    # The official batches are Python 2 pickles whose str keys torchvision decodes to str with
    # pickle.load(..., encoding="latin1"); a Python 3 pickle with str keys loads to the same dict.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _write_cifar(root: Path, rng: np.random.Generator) -> Written:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    # one row per image, 3072 bytes: the 1024 red pixels row by row, then green, then blue
    train_rows = rng.integers(0, 256, size=(N_TRAIN, 3072), dtype=np.uint8)
    train_labels = rng.integers(0, 10, size=N_TRAIN).tolist()
    test_rows = rng.integers(0, 256, size=(N_TEST, 3072), dtype=np.uint8)
    test_labels = rng.integers(0, 10, size=N_TEST).tolist()
    per = N_TRAIN // 5
    for b in range(5):
        sl = slice(b * per, (b + 1) * per)
        _pickle(
            folder / f"data_batch_{b + 1}",
            {
                "batch_label": f"training batch {b + 1} of 5",
                "labels": train_labels[sl],
                "data": train_rows[sl],
                "filenames": [f"img_{i}.png" for i in range(sl.start, sl.stop)],
            },
        )
    _pickle(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": test_labels,
            "data": test_rows,
            "filenames": [f"test_{i}.png" for i in range(N_TEST)],
        },
    )
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    _pickle(
        folder / "batches.meta",
        {"label_names": names, "num_cases_per_batch": per, "num_vis": 3072},
    )

    def chw(rows: np.ndarray) -> torch.Tensor:
        # pixel (c, h, w) of image n is byte c*1024 + h*32 + w of its row
        n = rows.shape[0]
        out = torch.empty(n, 3, 32, 32, dtype=torch.uint8)
        flat = torch.from_numpy(rows.copy())
        for c in range(3):
            out[:, c] = flat[:, c * 1024 : (c + 1) * 1024].view(n, 32, 32)
        return out

    return Written(
        chw(train_rows),
        torch.tensor(train_labels, dtype=torch.int64),
        chw(test_rows),
        torch.tensor(test_labels, dtype=torch.int64),
    )


def _skip_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    # CIFAR10 verifies every file's md5 against the official archive's, which our tiny files
    # cannot match. Only that check is replaced (by "the file exists"), through the name
    # torchvision/datasets/cifar.py imported (``from .utils import check_integrity``); the rest
    # of the real loader (opening and unpickling the batches, stacking them, reshaping the
    # channel-major rows to (N, 3, 32, 32) and transposing to HWC, reading the meta file's
    # label names) runs unchanged.
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def write_set(name: str, root: Path, monkeypatch: pytest.MonkeyPatch, seed: int = 0) -> Written:
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        _skip_md5(monkeypatch)
        return _write_cifar(root, rng)
    return _write_mnist(root, {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name], rng)


def make(
    name: str, root: Path, augment: bool = False, download: bool = False, **kw
) -> TorchvisionData:
    common = dict(
        batch_size=BATCH,
        eval_batch_size=EVAL_BATCH,
        loader="auto",
        num_workers=0,
        pin_memory=False,
        drop_last=False,
    )
    common.update(kw)
    return TorchvisionData(name, root=str(root), download=download, augment=augment, **common)


def normalized(name: str, pixels: torch.Tensor) -> torch.Tensor:
    """The expected model input for uint8 images (B, C, H, W): (pixels/255 - mean) / std."""
    mean, std = (torch.tensor(v, dtype=torch.float64).view(-1, 1, 1) for v in STATS[name])
    return (pixels.double() / 255 - mean) / std


def epoch_indices(loader) -> list[int]:
    return [i for b in loader for i in b.index.tolist()]


# --- 1. the in-memory path: exact round trip of the written pixels and labels ---


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_in_memory_round_trip(name, tmp_path, monkeypatch):
    w = write_set(name, tmp_path, monkeypatch)
    d = make(name, tmp_path)
    d.setup(torch.device("cpu"), seed=0)

    assert d.input_shape == SHAPES[name]
    assert d.num_classes == 10
    assert isinstance(d.train_loader, InMemoryLoader)
    assert isinstance(d.val_loader, InMemoryLoader)

    # train: one epoch visits every index once, in batches of BATCH, each with the exact values
    assert len(d.train_loader) == N_TRAIN // BATCH
    seen = []
    for x, y, index in d.train_loader:
        assert x.dtype == torch.float32 and x.shape == (BATCH, *SHAPES[name])
        assert y.dtype == torch.int64 and index.dtype == torch.int64
        torch.testing.assert_close(
            x.double(), normalized(name, w.train_x[index]), atol=1e-5, rtol=0
        )
        assert torch.equal(y, w.train_y[index])
        seen += index.tolist()
    assert sorted(seen) == list(range(N_TRAIN))
    assert seen != list(range(N_TRAIN))  # shuffled

    # val: the test split, in file order, in batches of EVAL_BATCH (8 + 2)
    batches = list(d.val_loader)
    assert [len(b.index) for b in batches] == [EVAL_BATCH, N_TEST - EVAL_BATCH]
    x = torch.cat([b.x for b in batches])
    assert torch.equal(torch.cat([b.index for b in batches]), torch.arange(N_TEST))
    torch.testing.assert_close(x.double(), normalized(name, w.test_x), atol=1e-5, rtol=0)
    assert torch.equal(torch.cat([b.y for b in batches]), w.test_y)


def test_cifar_layout_spot_check(tmp_path, monkeypatch):
    """Single pixels: byte c*1024 + h*32 + w of a row lands at x[c, h, w], not at a HWC position."""
    w = write_set("cifar10", tmp_path, monkeypatch)
    rows = []
    for b in range(1, 6):
        with open(tmp_path / "cifar-10-batches-py" / f"data_batch_{b}", "rb") as f:
            rows.append(pickle.load(f)["data"])
    data = np.concatenate(rows)
    d = make("cifar10", tmp_path)
    d.setup(torch.device("cpu"), seed=0)
    x = torch.empty(N_TRAIN, 3, 32, 32)
    for b in d.train_loader:  # the whole split as the model sees it, put back in index order
        x[b.index] = b.x
    expected = normalized("cifar10", w.train_x)
    for n, c, h, col in [(0, 0, 0, 1), (3, 1, 5, 7), (7, 2, 31, 0), (19, 2, 17, 30)]:
        byte = int(data[n, c * 1024 + h * 32 + col])
        assert int(w.train_x[n, c, h, col]) == byte
        assert abs(float(x[n, c, h, col]) - float(expected[n, c, h, col])) < 1e-5


# --- 2. augment=True: the DataLoader path ---


def _matches_some_crop(name: str, x: torch.Tensor, img: torch.Tensor, flips: bool) -> bool:
    """Whether x is normalize(crop of img zero-padded by size//8), optionally flipped."""
    size = img.shape[-1]
    pad = size // 8
    padded = normalized(name, F.pad(img, (pad, pad, pad, pad)))
    for src in (padded, padded.flip(-1)) if flips else (padded,):
        for i in range(2 * pad + 1):
            for j in range(2 * pad + 1):
                if torch.allclose(x.double(), src[:, i : i + size, j : j + size], atol=1e-5):
                    return True
    return False


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_augment_uses_dataloader_path(name, tmp_path, monkeypatch):
    w = write_set(name, tmp_path, monkeypatch)
    d = make(name, tmp_path, augment=True)
    d.setup(torch.device("cpu"), seed=0)

    assert isinstance(d.train_loader, DeviceLoader)
    assert isinstance(d.val_loader, InMemoryLoader)  # val is never augmented

    torch.manual_seed(0)  # the crops/flips draw from the main process's RNG (num_workers=0)
    seen, changed = [], 0
    for x, y, index in d.train_loader:
        assert x.dtype == torch.float32 and x.shape == (BATCH, *SHAPES[name])
        assert y.dtype == torch.int64 and index.dtype == torch.int64
        assert torch.equal(y, w.train_y[index])
        for xi, i in zip(x, index.tolist(), strict=True):
            # each input is a random crop (+ flip for CIFAR) of the image written at its index
            assert _matches_some_crop(name, xi, w.train_x[i], flips=name == "cifar10")
            plain = normalized(name, w.train_x[i])
            changed += not torch.allclose(xi.double(), plain, atol=1e-5)
        seen += index.tolist()
    assert sorted(seen) == list(range(N_TRAIN))
    assert changed > 0  # augmentation actually happened

    val = list(d.val_loader)
    torch.testing.assert_close(
        torch.cat([b.x for b in val]).double(), normalized(name, w.test_x), atol=1e-5, rtol=0
    )


def _augmented_epochs(loader, start_batch: int = 0) -> list[list[torch.Tensor]]:
    """Each epoch's inputs (0 and 1), epoch 0 from ``start_batch`` on."""
    out = []
    for epoch, start in ((0, start_batch), (1, 0)):
        loader.set_epoch(epoch, start)
        out.append([b.x.clone() for b in loader])
    return out


def test_augmentation_in_workers_is_the_same_after_a_resume_and_for_any_workers(
    tmp_path, monkeypatch
):
    """The workers' RNGs are seeded per batch from (seed, rank, epoch, batch). Before, they
    were seeded once (persistent workers) and a run resumed mid-epoch got other crops for the
    rest of that epoch and for every later one (a probe; the README said later epochs were
    exact again)."""
    write_set("cifar10", tmp_path, monkeypatch)
    loaders = {}
    for workers in (1, 2):
        d = make("cifar10", tmp_path, augment=True, num_workers=workers)
        d.setup(torch.device("cpu"), seed=7)
        loaders[workers] = d.train_loader

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b, strict=True))

    whole = _augmented_epochs(loaders[2])
    one_worker = _augmented_epochs(loaders[1])
    assert same(one_worker[0], whole[0]) and same(one_worker[1], whole[1])
    d = make("cifar10", tmp_path, augment=True, num_workers=2)  # a resumed run's loader
    d.setup(torch.device("cpu"), seed=7)
    rest, later = _augmented_epochs(d.train_loader, start_batch=3)
    assert same(rest, whole[0][3:]) and same(later, whole[1])
    assert not same(whole[0], whole[1])  # (each epoch its own crops and flips)


def test_memory_loader_refuses_augmented_split(tmp_path, monkeypatch):
    write_set("mnist", tmp_path, monkeypatch)
    d = make("mnist", tmp_path, augment=True, loader="memory")
    with pytest.raises(ValueError, match="data.loader=memory"):
        d.setup(torch.device("cpu"), seed=0)


def test_dataloader_path_without_augment_gives_same_batches(tmp_path, monkeypatch):
    """loader=dataloader over the uint8 split yields the in-memory path's batches exactly."""
    write_set("cifar10", tmp_path, monkeypatch)
    a, b = make("cifar10", tmp_path), make("cifar10", tmp_path, loader="dataloader")
    a.setup(torch.device("cpu"), seed=3)
    b.setup(torch.device("cpu"), seed=3)
    assert isinstance(b.train_loader, DeviceLoader)
    for ba, bb in zip(a.train_loader, b.train_loader, strict=True):
        assert torch.equal(ba.index, bb.index) and torch.equal(ba.y, bb.y)
        torch.testing.assert_close(ba.x, bb.x)


# --- 3. missing files ---


@pytest.mark.parametrize(
    "name, folder, files",
    [
        ("mnist", os.path.join("MNIST", "raw"), MNIST_FILES),
        ("fashion_mnist", os.path.join("FashionMNIST", "raw"), MNIST_FILES),
        ("cifar10", "cifar-10-batches-py", CIFAR_FILES),
    ],
)
def test_missing_files_named(name, folder, files, tmp_path):
    d = make(name, tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        d.setup(torch.device("cpu"), seed=0)
    msg = str(err.value)
    for f in files:
        assert os.path.join(str(tmp_path), folder, f) in msg
    assert "data.download=true" in msg
    assert str(tmp_path) in msg


def test_missing_files_lists_only_the_missing_ones(tmp_path, monkeypatch):
    write_set("mnist", tmp_path, monkeypatch)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError) as err:
        make("mnist", tmp_path).setup(torch.device("cpu"), seed=0)
    msg = str(err.value)
    assert os.path.join(str(tmp_path), "MNIST", "raw", "t10k-labels-idx1-ubyte") in msg
    for present in MNIST_FILES[:3]:
        assert present not in msg


def test_cifar_checksum_mismatch_is_reported(tmp_path, monkeypatch):
    """Without the md5 bypass, the (present) fake files fail torchvision's integrity check."""
    write_set("cifar10", tmp_path, monkeypatch)
    monkeypatch.undo()  # the real check_integrity again
    with pytest.raises(FileNotFoundError, match="corrupted") as err:
        make("cifar10", tmp_path).setup(torch.device("cpu"), seed=0)
    assert "data_batch_1" in str(err.value)


def test_unknown_name():
    with pytest.raises(ValueError, match="mnist, fashion_mnist, cifar10"):
        TorchvisionData("svhn")


# --- 4. order: a function of (seed, epoch) ---


def test_order_depends_on_seed_and_epoch(tmp_path, monkeypatch):
    write_set("mnist", tmp_path, monkeypatch)
    a, b, c = make("mnist", tmp_path), make("mnist", tmp_path), make("mnist", tmp_path)
    a.setup(torch.device("cpu"), seed=0)
    b.setup(torch.device("cpu"), seed=0)
    c.setup(torch.device("cpu"), seed=1)

    first = epoch_indices(a.train_loader)
    assert epoch_indices(b.train_loader) == first  # same seed, same order
    assert epoch_indices(a.train_loader) == first  # re-iterating the same epoch repeats it
    assert epoch_indices(c.train_loader) != first  # another seed, another order

    a.train_loader.set_epoch(1)
    second = epoch_indices(a.train_loader)
    assert second != first and sorted(second) == list(range(N_TRAIN))
    b.train_loader.set_epoch(1)
    assert epoch_indices(b.train_loader) == second


def test_order_is_the_same_on_both_paths(tmp_path, monkeypatch):
    """The augmented (DataLoader) path draws the same epoch order as the in-memory path."""
    write_set("cifar10", tmp_path, monkeypatch)
    mem, aug = make("cifar10", tmp_path), make("cifar10", tmp_path, augment=True)
    mem.setup(torch.device("cpu"), seed=5)
    aug.setup(torch.device("cpu"), seed=5)
    for epoch in (0, 1):
        mem.train_loader.set_epoch(epoch)
        aug.train_loader.set_epoch(epoch)
        assert epoch_indices(aug.train_loader) == epoch_indices(mem.train_loader)


@pytest.mark.parametrize(
    ("name", "module"), [("mnist", "mnist"), ("fashion_mnist", "mnist"), ("cifar10", "cifar")]
)
def test_failed_download_says_to_copy_the_files(name, module, tmp_path, monkeypatch):
    import importlib
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    tv_module = importlib.import_module(f"torchvision.datasets.{module}")
    monkeypatch.setattr(tv_module, "download_and_extract_archive", offline)
    monkeypatch.setattr(tv_module, "download_url", offline, raising=False)
    with pytest.raises(ConnectionError, match="copy the files there yourself"):
        make(name, tmp_path, download=True).setup(torch.device("cpu"), seed=0)


def test_a_missing_file_with_download_on_offline_is_a_failed_download(tmp_path, monkeypatch):
    """One file of the set missing and data.download=true without a network: the download
    failed (copy the files by hand), not "the files there cannot be read"."""
    import urllib.error

    import torchvision.datasets.mnist as tv_mnist

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    write_set("mnist", tmp_path, monkeypatch)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    with pytest.raises(ConnectionError, match="copy the files there yourself"):
        make("mnist", tmp_path, download=True).setup(torch.device("cpu"), seed=0)


@pytest.mark.parametrize("augment", [False, True])  # (the tensors' path; the Dataset's)
@pytest.mark.parametrize("extra", [5, -5])
def test_images_and_labels_of_different_counts_are_refused_naming_the_files(
    tmp_path, monkeypatch, augment, extra
) -> None:
    """MNIST's label file holding more labels than its images was trained on without a word
    (class weights counted labels of no image); fewer failed at the first batch reaching past
    them with an IndexError naming no file (a probe's finding). Refused before training."""
    write_set("mnist", tmp_path, monkeypatch)
    raw = tmp_path / "MNIST" / "raw"
    _write_idx(raw / "train-labels-idx1-ubyte", np.zeros(N_TRAIN + extra, dtype=np.uint8))
    with pytest.raises(ValueError, match=rf"training files under data.root=.* hold {N_TRAIN} "
                       rf"images and {N_TRAIN + extra} labels: one is truncated"):  # fmt: skip
        make("mnist", tmp_path, augment=augment).setup(torch.device("cpu"), seed=0)


def test_an_idx_file_of_an_unknown_type_is_named_with_the_data_and_its_files(tmp_path, monkeypatch):
    """An idx header whose type byte names no type: torchvision's bare ``KeyError: 10``
    named neither the data set nor a file (a review's finding)."""
    write_set("mnist", tmp_path, monkeypatch)
    images = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    header = bytearray(images.read_bytes())
    header[2] = 0x0A
    images.write_bytes(bytes(header))
    unread = r"data=mnist: its validation files under data.root=.* cannot be read \(KeyError"
    with pytest.raises(ValueError, match=unread + r": .*truncated or corrupted"):
        make("mnist", tmp_path).setup(torch.device("cpu"), seed=0)


@pytest.mark.parametrize("cut, download", [(100, False), (100, True), (None, False)])
def test_a_truncated_idx_file_is_named_with_the_data_and_its_files(
    tmp_path, monkeypatch, cut, download
):
    """torch's "shape '[40, 28, 28]' is invalid for input of size 31260" named neither the
    data set nor a file (a probe's finding); with data.download=true it was called a failed
    download, and an empty file gave a bare "invalid literal for int()" (a review's)."""
    write_set("mnist", tmp_path, monkeypatch)
    images = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-cut] if cut else b"")
    unread = r"data=mnist: its validation files under data.root=.* cannot be read \((Runtime"
    with pytest.raises(ValueError, match=unread + r"Error|ValueError): .*truncated or corrupted"):
        make("mnist", tmp_path, download=download).setup(torch.device("cpu"), seed=0)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_a_training_subset_keeps_the_splits_transform(name, tmp_path, monkeypatch):
    """``data.train_subset`` of a split held as uint8 images keeps the split's normalization:
    its batches are the float32 inputs the whole split's are, the same values (a subset
    without the transform, a mutation the suite missed, fed the model raw bytes)."""
    w = write_set(name, tmp_path, monkeypatch)
    d = make(name, tmp_path, train_subset=N_TRAIN // 2)
    d.setup(torch.device("cpu"), seed=0)
    assert isinstance(d.train_loader, InMemoryLoader) and d.train_loader.num_samples == N_TRAIN // 2
    x, _, index = next(iter(d.train_loader))
    assert x.dtype == torch.float32 and x.shape == (BATCH, *SHAPES[name])
    assert int(index.max()) < N_TRAIN // 2
    torch.testing.assert_close(x.double(), normalized(name, w.train_x[index]), atol=1e-5, rtol=0)
