"""val/acc's targets (a review of its refusal, 2026-12-08): labels the built-in cross-entropy
took as ignored, unlabelled samples counted wrong, targets that are not class indices, a
subclass replacing val/acc after super().val_sums, a complex pair on a later batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.data.base import InMemoryLoader, TensorSplit
from trainer.loop import Trainer
from trainer.losses import CrossEntropy, Loss

CPU = torch.device("cpu")


def _trainer(model, criterion, train, val, val_batch=16, lr=0.1):
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=lr),
                   InMemoryLoader(train, 8, CPU, shuffle=True),
                   InMemoryLoader(val, val_batch, CPU, shuffle=False), criterion=criterion,
                   device=CPU, max_epochs=1)  # fmt: skip


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    return x, torch.randint(3, (32,), generator=g)


@pytest.mark.parametrize("split", ["train", "val"])
def test_builtin_cross_entropy_refuses_a_label_of_minus_100_as_it_refuses_minus_1(split):
    """-1 and 3 (K = 3) are refused ("a class label is outside [0, 3)"); -100, torch's
    default ignore_index, is taken as a sample of loss 0 counted wrong in val/acc: val/loss
    0.59 and val/acc 0.1875, presented as complete, for half the samples unlabelled; in
    training, such a sample's loss 0 was averaged over the batch as one."""
    x, y = _data()
    yv = y.clone()
    yv[::2] = -100
    torch.manual_seed(0)
    train, val = (yv, y) if split == "train" else (y, yv)
    trainer = _trainer(nn.Linear(4, 3), CrossEntropy(), TensorSplit(x, train), TensorSplit(x, val))
    from trainer.config import ContractError

    # (the first training batch's failure is wrapped, naming the batch's shapes)
    with pytest.raises(ContractError if split == "train" else IndexError) as e:
        trainer.fit()
    assert (
        "loss=cross_entropy: a class label is outside [0, 3), the classes the model scores "
        "(torch: Target -100 is out of bounds.)"
    ) in str(e.value), str(e.value)


class _IgnoringCE(Loss):
    """A classification loss of one's own with unlabelled samples marked ignore_index (the
    attribute the base class honours for a sequence task's val/token_acc)."""

    task = "classification"
    ignore_index = -100

    def forward(self, output, target):
        return F.cross_entropy(output, target, reduction="none", ignore_index=self.ignore_index)


def test_val_acc_of_a_loss_with_ignore_index_is_not_the_unlabelled_counted_wrong():
    """val/acc was 0.1875 where the labelled samples' accuracy is 0.375: each unlabelled one
    counted as a wrong prediction (the sequence task leaves them out)."""
    x, y = _data()
    yv = y.clone()
    yv[::2] = -100
    torch.manual_seed(0)
    trainer = _trainer(nn.Linear(4, 3), _IgnoringCE(), TensorSplit(x, y), TensorSplit(x, yv))
    metrics = trainer.fit()
    with torch.no_grad():
        predicted = trainer.model(x).argmax(1)
    labelled = yv != -100
    expected = (predicted[labelled] == yv[labelled]).sum().item() / labelled.sum().item()
    assert metrics["val/acc"] == expected, (metrics["val/acc"], expected)


class _OwnCE(Loss):
    """A loss of one's own that trains on class indices, validated on other targets."""

    task = "classification"

    def forward(self, output, target):
        t = target.long().clamp(0, output.shape[1] - 1)
        return output.logsumexp(1) - output.gather(1, t[:, None]).squeeze(1)


@pytest.mark.parametrize("kind", ["float non-integers", "at least K", "negative"])
def test_val_acc_against_targets_that_are_not_class_indices_is_not_an_accuracy(kind):
    """(B, K) scores against (B,) targets that no argmax can equal: val/acc 0.0, presented as
    an accuracy (the refusal checks the shapes only). NaN now: a target of K or more or a
    fraction makes the count NaN; negative targets are not class indices, none is counted,
    and 0 / 0 is NaN."""
    x, y = _data()
    yv = {"float non-integers": y.float() + 0.5, "at least K": y + 3, "negative": -y - 1}[kind]
    torch.manual_seed(0)
    trainer = _trainer(nn.Linear(4, 3), _OwnCE(), TensorSplit(x, y), TensorSplit(x, yv))
    metrics = trainer.fit()
    assert math.isnan(metrics["val/acc"]), metrics
    assert math.isfinite(metrics["val/loss"]), metrics


class _BinaryCE(Loss):
    task = "classification"

    def forward(self, output, target):
        return F.binary_cross_entropy_with_logits(output.squeeze(1), target.float(),
                                                  reduction="none")  # fmt: skip

    def val_sums(self, output, target):
        """super()'s val/loss, and val/acc of its own (logit > 0 is class 1)."""
        n = torch.tensor(float(target.shape[0]))
        correct = ((output.squeeze(1) > 0).long() == target).sum().float()
        return {**super().val_sums(output, target), "val/acc": torch.stack([correct, n])}


def test_a_subclass_replacing_val_acc_after_super_val_sums_is_not_refused():
    """The refusal's way out ("give the loss val_sums and metrics of its own") taken with
    super().val_sums for val/loss: refused all the same, after the epoch's training, though
    the val/acc it reports is its own."""
    x, _ = _data()
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    trainer = _trainer(nn.Linear(4, 1), _BinaryCE(), TensorSplit(x, y), TensorSplit(x, y), lr=1.0)
    metrics = trainer.fit()
    with torch.no_grad():
        predicted = (trainer.model(x).squeeze(1) > 0).long()
    assert metrics["val/acc"] == (predicted == y).sum().item() / len(y)


class _SometimesComplex(CrossEntropy):
    @property
    def metrics(self):
        return ("val/loss", "val/acc", "val/x")

    def val_sums(self, output, target):
        s = (output[:, 0].sum().item() - 1000) ** 0.5  # Python: complex where negative
        return {**super().val_sums(output, target), "val/x": torch.tensor([s, 1])}


def test_a_complex_pair_on_a_later_validation_batch_is_refused_naming_the_metric():
    """The first batch's pair is real, the second's complex: torch's "result type
    ComplexDouble can't be cast to the desired output type Double", naming neither (val_keys
    checks the first batch only)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=g), torch.randint(3, (8,), generator=g)
    xv = x.clone()
    xv[:4] = 1000.0  # the first batch's output sums to ≥ 1000
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0, 0] = 1.0
        model.bias.zero_()
    trainer = _trainer(model, _SometimesComplex(), TensorSplit(x, y), TensorSplit(xv, y),
                       val_batch=4, lr=0.0)  # fmt: skip
    with pytest.raises(ValueError) as e:
        trainer.fit()
    assert str(e.value).startswith(
        "loss _SometimesComplex's val_sums gave 'val/x' as a torch.complex64 pair"
    ), str(e.value)


class _Wide(_IgnoringCE):
    """ignore_index 256, which uint8 targets cannot hold (torch wraps it to 0)."""

    ignore_index = 256

    def forward(self, output, target):
        return F.cross_entropy(output, target.long(), reduction="none")


def test_an_ignore_index_the_targets_cannot_hold_leaves_no_class_out() -> None:
    """uint8 targets against an ignore_index of 256: the comparison wrapped it to 0, and
    class 0 was left uncounted (a review's); no target can equal it, so every one counts."""
    x, y = _data()
    torch.manual_seed(0)
    trainer = _trainer(
        nn.Linear(4, 3), _Wide(), TensorSplit(x, y), TensorSplit(x, y.to(torch.uint8))
    )
    metrics = trainer.fit()
    with torch.no_grad():
        predicted = trainer.model(x).argmax(1)
    assert metrics["val/acc"] == (predicted == y).sum().item() / len(y)


class _ListLater(CrossEntropy):
    calls = 0

    def val_sums(self, output, target):
        type(self).calls += 1
        sums = super().val_sums(output, target)
        return sums if type(self).calls == 1 else list(sums.values())


def test_a_later_validation_batch_that_is_no_dict_is_named() -> None:
    """A bare AttributeError ('list' object has no attribute 'keys') where the second batch's
    val_sums returned a list (a review's)."""
    x, y = _data()
    torch.manual_seed(0)
    _ListLater.calls = 0
    trainer = _trainer(
        nn.Linear(4, 3), _ListLater(), TensorSplit(x, y), TensorSplit(x, y), val_batch=8
    )
    with pytest.raises(ValueError) as e:
        trainer.fit()
    assert str(e.value).startswith(
        "loss _ListLater's val_sums reported list for validation batch 1 and ['val/acc', "
        "'val/loss'] for the first"
    ), str(e.value)


# (a mutation round's, 2026-12-08: each of these failed with one small change to
# _accuracy, _holds, _val_acc_shapes or Loss.val_sums's own branches, and passed without)


class _OwnIgnoring(Loss):
    """Class indices, some of them ``ignore_index`` (of any value): a loss of one's own."""

    task = "classification"

    def __init__(self, ignore_index):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, output, target):
        t = target.real.long().clamp(0, output.shape[1] - 1)
        return output.logsumexp(1) - output.gather(1, t[:, None]).squeeze(1)


# argmax 0, 1, 2, 0
_SCORES = torch.tensor([[2.0, 0, 0], [0, 2, 0], [0, 0, 2], [2, 0, 0]])


def _acc(loss, output, target) -> list[float]:
    return loss.val_sums(output, target)["val/acc"].tolist()


def test_a_target_of_exactly_k_is_no_class_index() -> None:
    """K = 3 and a target 3, among class indices: no argmax equals it, NaN (as 4 or more)."""
    acc = _acc(_OwnIgnoring(-100), _SCORES, torch.tensor([0, 1, 3, 0]))
    assert math.isnan(acc[0]) and acc[1] == 4.0, acc


def test_an_ignore_index_that_is_a_class_leaves_its_hits_out() -> None:
    """ignore_index 0 (a padding class): the samples labelled 0 are neither counted nor hits,
    though the model predicts 0 for them: 1 correct of 2 (sample 2 predicts 2, labelled 1)."""
    assert _acc(_OwnIgnoring(0), _SCORES, torch.tensor([0, 1, 1, 0])) == [1.0, 2.0]


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32])
def test_an_ignore_index_of_k_or_more_is_left_out_not_a_bad_target(dtype) -> None:
    """ignore_index 255 (a segmentation's void label) with K = 3, integer or float targets:
    the unlabelled sample is left out, not NaN for a target no argmax can equal."""
    assert _acc(_OwnIgnoring(255), _SCORES, torch.tensor([0, 1, 255, 0], dtype=dtype)) == [
        3.0, 3.0]  # fmt: skip


def test_an_uncounted_sample_s_nonfinite_scores_leave_the_accuracy_finite() -> None:
    """An unlabelled sample (target -100) whose scores are NaN: left out of val/acc, which
    the three counted samples' finite scores decide (NaN only where a counted row is)."""
    scores = _SCORES.clone()
    scores[2] = float("nan")
    assert _acc(_OwnIgnoring(-100), scores, torch.tensor([0, 1, -100, 0])) == [3.0, 3.0]


def test_a_bool_ignore_index_is_no_class_index() -> None:
    """ignore_index False is a flag, not class 0: every sample counts."""
    assert _acc(_OwnIgnoring(False), _SCORES, torch.tensor([0, 1, 1, 0])) == [3.0, 4.0]


def test_an_ignore_index_below_what_the_targets_hold_leaves_no_class_out() -> None:
    """uint8 targets and ignore_index -100, which torch's comparison wraps to 156: class 156
    (of 157) was left out though no uint8 target can be -100."""
    scores = torch.zeros(2, 157)
    scores[0, 156] = scores[1, 3] = 1.0
    target = torch.tensor([156, 3], dtype=torch.uint8)
    assert _acc(_OwnIgnoring(-100), scores, target) == [2.0, 2.0]


def test_complex_targets_are_refused_by_val_acc_naming_the_shapes() -> None:
    """(B,) complex targets are no class indices: refused in val/acc's words (not torch's
    "not implemented for 'ComplexFloat'" from a comparison)."""
    target = torch.tensor([0, 1, 2, 0], dtype=torch.complex64)
    with pytest.raises(ValueError, match=r"val/acc compares the argmax of \(B, K\) class"):
        _OwnIgnoring(-100).val_sums(_SCORES, target)


class _MeanAndVariance(Loss):
    """A regression loss of one's own: output (B, 2), a mean and a log-variance; its
    val_sums takes super()'s val/loss and reports a val/mse of its own."""

    task = "regression"

    def forward(self, output, target):
        mean, logvar = output[:, 0], output[:, 1]
        return 0.5 * (logvar + (target - mean) ** 2 / logvar.exp())

    def val_sums(self, output, target):
        n = torch.tensor(float(target.shape[0]))
        mse = ((output[:, 0] - target) ** 2).sum()
        return {**super().val_sums(output, target), "val/mse": torch.stack([mse, n])}


def test_a_regression_subclass_replacing_val_mse_after_super_val_sums_is_not_refused():
    """As val/acc's: super().val_sums leaves out the val/mse it cannot compute for an
    override reporting its own (a mean and a log-variance against (B,) targets)."""
    output = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    target = torch.tensor([0.0, 2.0, 1.0])
    assert _MeanAndVariance().val_sums(output, target)["val/mse"].tolist() == [2.0, 3.0]
