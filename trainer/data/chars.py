"""A character-level language-modelling corpus that ships inside an installed package.

scikit-learn bundles the descriptions of its data sets as reStructuredText
(``sklearn/datasets/descr/*.rst``, 14 files, about 43,000 characters of English prose and
tables). They are read straight from the package's files (no network, no scikit-learn import),
concatenated in file-name order, and cut at one point: the first ``1 - val_fraction`` of the
characters train, the rest is held-out text the model never sees.

Tokens are the text's distinct characters (sorted; about 90). A sample is a window of
``block_size`` characters ``x`` and the same window shifted by one, ``y`` (the next character
at each position); training windows start every ``stride`` characters. The last window of each
split is cut short by the end of its text and padded: its missing targets are
``ignore_index`` (the loss's padding), its missing inputs token 0. Validation windows do not
overlap, so each held-out character but the first (the first window's input, whose previous
character is the training text's last) is predicted exactly once.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor

from trainer.data.base import DataModule, TensorSplit


def sklearn_descr_text() -> str:
    """scikit-learn's bundled data-set descriptions, concatenated in file-name order."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "data=chars reads text bundled with scikit-learn, which is not installed: "
            "pip install scikit-learn"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "descr"
    files = sorted(folder.glob("*.rst"))
    if not files:
        raise FileNotFoundError(f"data=chars: no scikit-learn descriptions (*.rst) in {folder}")
    return "\n".join(f.read_text(encoding="utf-8") for f in files)


def windows(tokens: Tensor, block: int, stride: int, pad: int) -> tuple[Tensor, Tensor]:
    """(x, y) windows of ``block`` tokens, starting every ``stride``; y = x shifted by one.
    The last window reaches the text's last token, padded (x with 0, y with ``pad``)."""
    n = tokens.numel() - 1  # positions that have a next token
    starts = list(range(0, max(n - block, 0) + 1, stride))
    if starts[-1] + block < n:  # the tail the strided windows miss
        starts.append(starts[-1] + stride)
    x = torch.zeros(len(starts), block, dtype=torch.long)
    y = torch.full((len(starts), block), pad, dtype=torch.long)
    for i, s in enumerate(starts):
        m = min(block, n - s)
        x[i, :m] = tokens[s : s + m]
        y[i, :m] = tokens[s + 1 : s + 1 + m]
    return x, y


class CharText(DataModule):
    """Next-character prediction on held-out text (module docstring). Provides ``vocab_size``
    and ``in_shape`` (block_size,) to a model that asks for them."""

    def __init__(
        self,
        block_size: int = 64,
        stride: int | None = None,
        val_fraction: float = 0.1,
        ignore_index: int = -100,
        **common,
    ):
        super().__init__(**common)
        stride = max(block_size // 2, 1) if stride is None else stride  # (overlapping by half)
        if block_size < 1 or stride < 1:
            raise ValueError(
                f"data.block_size and data.stride must be >= 1, got {block_size}, {stride}"
            )
        if stride > block_size:  # (the stride of a block size set before a shorter one)
            raise ValueError(
                f"data.stride: got {stride}, larger than data.block_size {block_size}: the "
                f"training windows would skip {stride - block_size} of every {stride} "
                f"characters; set data.stride <= data.block_size (e.g. "
                f"data.stride={max(block_size // 2, 1)}, windows overlapping by half)"
            )
        self.block_size, self.stride = block_size, stride
        self.val_fraction, self.ignore_index = val_fraction, ignore_index
        self.input_shape = (block_size,)
        self.text = sklearn_descr_text()
        #: the vocabulary: the text's distinct characters, sorted; token i is chars[i]
        self.chars = sorted(set(self.text))
        self.vocab_size = self.out_dim = len(self.chars)

    def encode(self, text: str) -> Tensor:
        index = {c: i for i, c in enumerate(self.chars)}
        return torch.tensor([index[c] for c in text], dtype=torch.long)

    def decode(self, tokens: Tensor) -> str:
        return "".join(self.chars[int(t)] for t in tokens)

    def load(self) -> tuple[TensorSplit, TensorSplit]:
        tokens = self.encode(self.text)
        cut = round((1 - self.val_fraction) * tokens.numel())
        for split, size in (("training", cut), ("validation", tokens.numel() - cut)):
            if size < 2:  # (no character with a next one: no target to predict)
                raise ValueError(
                    f"data.val_fraction: {self.val_fraction} of {tokens.numel()} characters "
                    f"leaves the {split} text {size} character(s), no next character to "
                    "predict; give a fraction that leaves both at least 2"
                )
        train = windows(tokens[:cut], self.block_size, self.stride, self.ignore_index)
        val = windows(tokens[cut:], self.block_size, self.block_size, self.ignore_index)
        return TensorSplit(*train), TensorSplit(*val)
