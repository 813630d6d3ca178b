"""MNIST, Fashion-MNIST and CIFAR-10 through torchvision's own data set classes.

torchvision reads its real on-disk formats (MNIST's idx files, CIFAR-10's pickled batches). Without
augmentation the decoded images are kept as uint8 tensors and normalized per batch on the device
(the in-memory path); with ``augment=true`` the training split goes through a DataLoader with
torchvision transforms. torchvision is imported only when one of these sets is used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from trainer.data.base import ByteNormalize, DataModule, TensorSplit


@dataclass(frozen=True)
class _SetInfo:
    cls: str  # torchvision.datasets class name
    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


SETS = {
    "mnist": _SetInfo("MNIST", (1, 28, 28), (0.1307,), (0.3081,)),
    "fashion_mnist": _SetInfo("FashionMNIST", (1, 28, 28), (0.2860,), (0.3530,)),
    "cifar10": _SetInfo("CIFAR10", (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def expected_files(name: str, root: str) -> list[str]:
    """Where torchvision looks for the set's files under ``root``."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, SETS[name].cls)
    if hasattr(cls, "resources"):  # MNIST family: uncompressed idx files in <root>/<Class>/raw
        raw = os.path.join(root, cls.__name__, "raw")
        return [os.path.join(raw, os.path.splitext(fname)[0]) for fname, _ in cls.resources]
    folder = os.path.join(root, cls.base_folder)  # CIFAR: pickled batches + meta
    names = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return [os.path.join(folder, f) for f in names]


class TorchvisionData(DataModule):
    """One of :data:`SETS`; the official test split serves as the validation split."""

    def __init__(
        self,
        name: str,
        root: str = "outputs/data",
        download: bool = False,
        augment: bool = False,
        **common: Any,
    ):
        super().__init__(**common)
        if name not in SETS:
            raise ValueError(f"data.name: got {name!r}, expected one of {', '.join(SETS)}")
        self.name, self.root, self.download, self.augment = name, root, download, augment
        info = SETS[name]
        self.input_shape = info.shape
        self.num_classes = 10
        self.normalize = ByteNormalize(info.mean, info.std)

    def _open(self, train: bool, transform: Any = None) -> Any:
        import torchvision.datasets as tvd

        cls = getattr(tvd, SETS[self.name].cls)
        files = "\n  ".join(expected_files(self.name, self.root))
        split = "training" if train else "validation"
        present = all(os.path.isfile(p) for p in expected_files(self.name, self.root))
        try:
            ds = cls(self.root, train=train, transform=transform, download=self.download)
        except (RuntimeError, ValueError, AssertionError, TypeError, KeyError) as e:
            if "download=True" not in str(e):  # (torchvision's: missing, or a checksum)
                if self.download and not present:  # the MNIST family wraps a failed download
                    raise self._download_failed(e) from e  # in RuntimeError
                # (the files there but unreadable: a truncated idx file's "shape '[40, 28,
                # 28]' is invalid for input of size 31260", an empty one's "invalid literal
                # for int()", naming neither the data nor a file: a probe's, a review's)
                raise ValueError(
                    f"data={self.name}: its {split} files under data.root="
                    f"{os.path.abspath(self.root)} cannot be read ({type(e).__name__}: {e}): "
                    f"one is truncated or corrupted. Its files:\n  {files}"
                ) from e
            missing = [p for p in expected_files(self.name, self.root) if not os.path.isfile(p)]
            listing = "\n  ".join(missing or expected_files(self.name, self.root))
            raise FileNotFoundError(
                f"data={self.name}: files not found or corrupted under data.root="
                f"{os.path.abspath(self.root)}. Expected (missing ones listed):\n  {listing}\n"
                "Put the files there, point data.root at a folder that has them, or set "
                "data.download=true (needs internet)."
            ) from None
        except OSError as e:
            if not self.download:
                raise
            raise self._download_failed(e) from e  # CIFAR-10: could not reach the network
        images, labels = len(ds.data), len(ds.targets)
        if images != labels:  # (more labels trained class weights on labels of no image;
            # fewer failed at the first batch reaching past them: a probe's finding)
            raise ValueError(
                f"data={self.name}: its {split} files under data.root="
                f"{os.path.abspath(self.root)} hold {images} images and {labels} labels: one "
                f"is truncated or from another set. Its files:\n  {files}"
            )
        return ds

    def _download_failed(self, e: Exception) -> ConnectionError:
        return ConnectionError(
            f"data={self.name}: download to {os.path.abspath(self.root)} failed ({e}). "
            "Without internet, copy the files there yourself (see README, 'Data')."
        )

    def _as_tensors(self, ds: Any) -> TensorSplit:
        x = torch.as_tensor(ds.data)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # -> (N, C, H, W) uint8
        return TensorSplit(
            x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64), self.normalize
        )

    def load(self) -> tuple[Any, TensorSplit]:
        val = self._as_tensors(self._open(train=False))
        if not self.augment:
            return self._as_tensors(self._open(train=True)), val
        import torchvision.transforms as T

        info = SETS[self.name]
        size = info.shape[-1]
        aug = [T.RandomCrop(size, padding=size // 8)]
        if self.name == "cifar10":
            aug.append(T.RandomHorizontalFlip())
        transform = T.Compose([*aug, T.ToTensor(), T.Normalize(info.mean, info.std)])
        return self._open(train=True, transform=transform), val
