"""Validation metrics of a loss of one's own, against brute force over the whole validation
split (a probe's findings)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_hand_built_trainer import _Recorder
from torch import nn

from trainer.data.base import InMemoryLoader, TensorSplit
from trainer.loop import Trainer
from trainer.losses import Loss

CPU = torch.device("cpu")


def _fit(model, criterion, train, val, **kw):
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=kw.pop("lr", 0.1)),
                      InMemoryLoader(train, 8, CPU, shuffle=True),
                      InMemoryLoader(val, 16, CPU, shuffle=False), criterion=criterion,
                      device=CPU, **kw)  # fmt: skip
    return trainer.fit()


class _BinaryCE(Loss):
    """A binary classifier's loss: one logit per sample (B, 1), labels 0/1."""

    task = "classification"

    def forward(self, output, target):
        return F.binary_cross_entropy_with_logits(
            output.squeeze(1), target.float(), reduction="none"
        )


def _binary_splits():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, generator=g)
    xt = torch.randn(64, 4, generator=g)
    xv = torch.randn(40, 4, generator=g)
    return TensorSplit(xt, (xt @ w > 0).long()), TensorSplit(xv, (xv @ w > 0).long())


def test_val_acc_of_a_one_logit_binary_classifier_is_refused_naming_the_shapes(caplog) -> None:
    """A loss of one's own with task "classification" on a (B, 1) logit: val/acc was the
    argmax over one column, always class 0, so it reported the share of negatives (0.575) for
    a model that classified every validation sample right (1.0), and sweeps maximized it.
    Now the first step warns and the validation refuses, naming both shapes and the ways
    out."""
    train, val = _binary_splits()
    torch.manual_seed(0)
    with caplog.at_level("WARNING"), pytest.raises(ValueError) as e:
        _fit(nn.Linear(4, 1), _BinaryCE(), train, val, lr=1.0, max_epochs=5)
    said = (
        "loss _BinaryCE (task classification): val/acc compares the argmax of (B, K) class "
        "scores (K ≥ 2) with (B,) class indices, and got outputs of shape (16, 1) against "
        "targets of shape (16,): one score per sample (a binary classifier's logit?), whose "
        "argmax is class 0; give the loss val_sums and metrics of its own"
    )
    assert said in str(e.value)
    assert "the first batch's output in training mode: loss _BinaryCE" in caplog.text
    assert "outputs of shape (8, 1) against targets of shape (8,)" in caplog.text


class _BinaryWithAccuracy(_BinaryCE):
    """The way out the refusal names: the loss's own val_sums (logit > 0 is class 1)."""

    def val_sums(self, output, target):
        n = torch.tensor(float(target.shape[0]))
        correct = ((output.squeeze(1) > 0).long() == target).sum().float()
        loss = self.forward(output, target).sum().float()
        return {"val/loss": torch.stack([loss, n]), "val/acc": torch.stack([correct, n])}


def test_a_binary_classifier_with_val_sums_of_its_own_reports_its_accuracy() -> None:
    train, val = _binary_splits()
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    metrics = _fit(model, _BinaryWithAccuracy(), train, val, lr=1.0, max_epochs=5)
    with torch.no_grad():
        predicted = (model(val.x).squeeze(1) > 0).long()
    assert metrics["val/acc"] == (predicted == val.y).sum().item() / len(val.y)


class _PixelCE(Loss):
    """A segmentation loss: logits (B, K, H, W), labels (B, H, W), one loss per image."""

    task = "classification"

    def forward(self, output, target):
        return F.cross_entropy(output, target, reduction="none").flatten(1).mean(1)


def test_val_acc_of_dense_classification_is_refused_not_pixels_per_image() -> None:
    """(B, K, H, W) logits against (B, H, W) labels: val/acc counted the correct pixels over
    the images, 4.5 (an accuracy above 1) for a true pixel accuracy of 27/96."""
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> TensorSplit:
        return TensorSplit(torch.randn(n, 2, 4, 4, generator=g),
                           torch.randint(3, (n, 4, 4), generator=g))  # fmt: skip

    train, val = split(8), split(6)
    torch.manual_seed(0)
    with pytest.raises(ValueError) as e:
        _fit(nn.Conv2d(2, 3, 1), _PixelCE(), train, val, max_epochs=1)
    assert (
        "got outputs of shape (6, 3, 4, 4) against targets of shape (6, 4, 4): targets of "
        "shape (6, 4, 4), not one class index per sample; give the loss val_sums and metrics "
        "of its own for these (a binary classifier: (output.squeeze(1) > 0) == target; a "
        "segmentation's pixels), or task = None (val/loss only)"
    ) in str(e.value)


class _SoftCE(Loss):
    """Cross-entropy against soft labels (mixup, distillation): targets (B, K) probabilities."""

    task = "classification"

    def forward(self, output, target):
        return -(target * output.log_softmax(1)).sum(1)


@pytest.mark.parametrize("eval_batch", [3, 4])
def test_val_acc_against_soft_labels_is_refused_not_a_broadcast(eval_batch: int) -> None:
    """Soft labels (B, K) with K = 3: the argmax (B,) was compared with the (B, K) targets by
    broadcasting, which never matched a probability: val/acc 0.0, unsaid, at
    data.eval_batch_size=3 (at 4: torch's "The size of tensor a (4) must match the size of
    tensor b (3)", after the epoch's training)."""
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> TensorSplit:
        return TensorSplit(torch.randn(n, 4, generator=g),
                           torch.softmax(torch.randn(n, 3, generator=g), 1))  # fmt: skip

    train, val = split(16), split(10)
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      InMemoryLoader(train, 4, CPU, shuffle=True),
                      InMemoryLoader(val, eval_batch, CPU, shuffle=False), criterion=_SoftCE(),
                      device=CPU, max_epochs=1)  # fmt: skip
    with pytest.raises(ValueError) as e:
        trainer.fit()
    assert (
        f"got outputs of shape ({eval_batch}, 3) against targets of shape ({eval_batch}, 3): "
        f"targets of shape ({eval_batch}, 3), not one class index per sample"
    ) in str(e.value)


def test_a_callback_changing_its_metrics_argument_does_not_change_what_the_run_reports() -> None:
    """on_validation_end(trainer, metrics) was handed the trainer's own record: a callback
    showing val/acc as a percentage (metrics["val/acc"] *= 100) made fit()'s result, and so
    metrics.json, the checkpoint's metrics and the sweeper's monitor, 10.58 where TensorBoard
    and the epoch line had the validation's 0.1058 (a probe's, through trainer.run)."""
    from trainer.callbacks import Callback
    from trainer.losses import CrossEntropy

    class Percent(Callback):
        def on_validation_end(self, trainer, metrics) -> None:
            metrics["val/acc"] = 100 * metrics["val/acc"]

    g = torch.Generator().manual_seed(0)
    split = TensorSplit(torch.randn(16, 4, generator=g), torch.randint(3, (16,), generator=g))
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    rec = _Recorder()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      InMemoryLoader(split, 4, CPU, shuffle=True),
                      InMemoryLoader(split, 5, CPU, shuffle=False), criterion=CrossEntropy(),
                      device=CPU, max_epochs=1, logger=rec, callbacks=[Percent()])  # fmt: skip
    metrics = trainer.fit()
    logged = rec.s["val/acc"][trainer.global_step]
    assert 0 <= logged <= 1
    assert metrics["val/acc"] == logged, (metrics["val/acc"], logged)


def test_a_complex_val_sums_pair_is_refused_naming_the_metric() -> None:
    """A (2,) pair of a complex dtype (the other wrong pairs, of another shape or device, are
    named): torch's "result type ComplexDouble can't be cast to the desired output type
    Double", naming neither the loss nor the metric, after the epoch's training."""
    from trainer.losses import CrossEntropy

    class Complex(CrossEntropy):
        @property
        def metrics(self):
            return ("val/loss", "val/acc", "val/x")

        def val_sums(self, output, target):
            return {**super().val_sums(output, target), "val/x": torch.tensor([1 + 1j, 1])}

    g = torch.Generator().manual_seed(0)
    split = TensorSplit(torch.randn(8, 4, generator=g), torch.randint(3, (8,), generator=g))
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      InMemoryLoader(split, 4, CPU, shuffle=True),
                      InMemoryLoader(split, 4, CPU, shuffle=False), criterion=Complex(),
                      device=CPU, max_epochs=1)  # fmt: skip
    with pytest.raises(ValueError) as e:
        trainer.fit()
    assert str(e.value).startswith(
        "loss Complex's val_sums gave 'val/x' as a torch.complex64 pair: a metric's (sum, "
        "count) must be real numbers"
    ), str(e.value)


def test_a_callback_changing_its_on_fit_end_metrics_changes_neither_the_run_nor_the_next() -> None:
    """(a mutation round's, 2026-12-08) on_fit_end gets each callback a copy of its own too:
    one showing val/acc as a percentage there changed fit()'s result and what the callbacks
    after it were handed."""
    from trainer.callbacks import Callback
    from trainer.losses import CrossEntropy

    class Percent(Callback):
        def on_fit_end(self, trainer, metrics) -> None:
            metrics["val/acc"] = 100 * metrics["val/acc"]

    class Seen(Callback):
        got: float | None = None

        def on_fit_end(self, trainer, metrics) -> None:
            self.got = metrics["val/acc"]

    g = torch.Generator().manual_seed(0)
    split = TensorSplit(torch.randn(16, 4, generator=g), torch.randint(3, (16,), generator=g))
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    rec, seen = _Recorder(), Seen()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      InMemoryLoader(split, 4, CPU, shuffle=True),
                      InMemoryLoader(split, 5, CPU, shuffle=False), criterion=CrossEntropy(),
                      device=CPU, max_epochs=1, logger=rec,
                      callbacks=[Percent(), seen])  # fmt: skip
    metrics = trainer.fit()
    logged = rec.s["val/acc"][trainer.global_step]
    assert 0 <= logged <= 1
    assert metrics["val/acc"] == seen.got == logged, (metrics["val/acc"], seen.got, logged)
