"""trainer.compile=true: what a compiled run says when the model itself fails (a probe's
findings, 2026-12-07)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import train
from torch import nn

from trainer.config import ConfigError


class WrongBias(nn.Module):
    """A model of one's own with a shape bug of its own: a bias of 3 entries added to 10
    scores, built with the common ``dtype=h.dtype`` idiom. The data and the parameters are
    both float32: nothing about dtypes is wrong."""

    def __init__(self, in_shape, out_dim) -> None:
        super().__init__()
        self.lin = nn.Linear(math.prod(in_shape), out_dim)

    def forward(self, x):
        h = self.lin(x.flatten(1))
        return h + torch.ones(3, dtype=h.dtype)


TINY = ("~model", f"+model._target_={__name__}.WrongBias", "trainer.max_steps=1",
        "data.batch_size=16")  # fmt: skip


def test_a_compiled_models_own_shape_error_is_not_blamed_on_the_datas_dtype(tmp_path) -> None:
    """Uncompiled, the first forward's error is torch's ("The size of tensor a (10) must match
    the size of tensor b (3)"), raised as it is. Compiled (any backend: Dynamo runs the graph
    on fake tensors first), torch's TorchRuntimeError quotes the user's source line, which
    says ``dtype=``: the first forward's check (trainer/loop.py, ``_first_forward``) takes any
    RuntimeError whose text holds "dtype" for a dtype mismatch and re-raises it as "the model's
    first forward failed on the data's inputs (torch.float32; the model's parameters:
    torch.float32): cast them in the data module", with torch's first line only ("RuntimeError
    when making fake tensor call"): the wrong cause named, the real one (the broadcast) gone
    from the message and from metrics.json's ``error``."""
    with pytest.raises(RuntimeError, match="must match the size of tensor b"):
        train(tmp_path / "plain", *TINY)
    with pytest.raises(Exception) as raised:  # noqa: PT011 (which type is the question)
        train(tmp_path / "compiled", *TINY, "trainer.compile=true",
              "trainer.compile_backend=eager")  # fmt: skip
    text = str(raised.value)
    assert "failed on the data's inputs" not in text, text
    assert "broadcast a dimension of length 3" in text, text
    error = json.loads((tmp_path / "compiled" / "metrics.json").read_text())["error"]
    assert "broadcast a dimension of length 3" in error, error


class NaNInBackward(nn.Module):
    """A finite forward whose backward makes a NaN: sqrt's derivative at 0 (inf) times 0."""

    def __init__(self, in_shape, out_dim) -> None:
        super().__init__()
        self.lin = nn.Linear(math.prod(in_shape), out_dim)

    def forward(self, x):
        h = self.lin(x.flatten(1))
        return h + 0 * torch.sqrt(h * 0)


def test_detect_anomaly_under_an_aot_compile_is_refused_naming_the_eager_backend(tmp_path):
    """``trainer.detect_anomaly`` (``debug=anomaly``) is there so that "the first NaN-producing
    backward names its forward operation" (README). Uncompiled, and with Dynamo's ``eager``
    backend, torch names ``SqrtBackward0``; with an AOTAutograd backend (``aot_eager``, and
    ``inductor``, the default) the whole forward is one autograd node: the error names
    ``CompiledFunctionBackward`` and the forward traceback it prints ends in the trainer's
    ``self.forward_model(x)``, not at the model's line. Neither refused nor said when the
    trainer is built, as the per-sample norms and the input-gradient penalty are: refused now,
    naming the eager backend (which names the operation, as checked here)."""
    nan = ("~model", f"+model._target_={__name__}.NaNInBackward", "trainer.max_steps=1",
           "data.batch_size=16", "trainer.detect_anomaly=true")  # fmt: skip
    with pytest.raises(RuntimeError, match="'SqrtBackward0' returned nan"):
        train(tmp_path / "plain", *nan)
    with pytest.raises(RuntimeError, match="'SqrtBackward0' returned nan"):
        train(tmp_path / "eager", *nan, "trainer.compile=true", "trainer.compile_backend=eager")
    with pytest.raises(ConfigError, match=r"trainer.detect_anomaly: .* AOTAutograd backends "
                       r"\(aot_eager\) make the whole forward one autograd node .* use "
                       r"trainer.compile_backend=eager"):  # fmt: skip
        train(tmp_path / "aot", *nan, "trainer.compile=true", "trainer.compile_backend=aot_eager")
    assert not (tmp_path / "aot" / "checkpoints").exists()  # (refused before training)


class ShiftedIds(nn.Module):
    """Token ids shifted by a buffer of the wrong length (3 offsets for 6 positions): a shape
    bug of the model's own, on int64 tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.register_buffer("offset", torch.arange(3))

    def forward(self, x):
        return self.emb(x + self.offset).sum(1)


def test_a_compiled_shape_error_on_int64_tensors_is_not_taken_for_a_dtype_mismatch() -> None:
    """Dynamo's message describes the failing call's fake tensors ("FakeTensor(..., size=(16,
    6), dtype=torch.int64)") before the error it got: the check reads the quoted error's own
    words, which name no dtype (a mutation test's: read whole, or with the quote not found
    where Dynamo's hint follows it on the next line, the broadcast was refused as the data's
    dtype)."""
    from trainer.loop import dtype_refusal, torch_words

    model = ShiftedIds()
    x = torch.randint(0, 5, (16, 6))
    with pytest.raises(RuntimeError) as raised:
        torch.compile(model, backend="eager")(x)
    assert "dtype=torch.int64" in str(raised.value)  # (the premise: Dynamo's words say dtype)
    assert torch_words(raised.value).startswith("Attempting to broadcast a dimension of length 3")
    assert dtype_refusal(raised.value, x, model) is None


def test_the_source_dynamo_quotes_is_not_read_as_the_errors_words() -> None:
    """An error with no quoted inner error: its words end where Dynamo's "from user code:"
    begins, the user's line (``dtype=h.dtype``) not among them."""
    from trainer.loop import dtype_refusal, torch_words

    e = RuntimeError("Failed running call_function add: size mismatch\n\nfrom user code:\n"
                     '   File "model.py", line 9, in forward\n'
                     "    return h + torch.ones(3, dtype=h.dtype)")  # fmt: skip
    assert torch_words(e).rstrip() == "Failed running call_function add: size mismatch"
    assert dtype_refusal(e, torch.ones(2, 8), nn.Linear(8, 3)) is None
