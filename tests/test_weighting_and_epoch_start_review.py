"""A review of 2026-12-07's weighting and callback fixes: an own strategy's overflow check on
the total it is divided by, the all-zero batch's clamp to the smallest positive float, and
on_train_epoch_start in a fit called again."""

from __future__ import annotations

import pytest
import torch
from conftest import make_cfg

from trainer.callbacks import Callback
from trainer.weighting import Weighting


def _call(w: Weighting, losses, units=None):
    targets = torch.zeros(losses.shape, dtype=torch.long)
    return w(losses, None, targets, torch.arange(losses.shape[0]), units)


class _HostTotal(Weighting):
    """Equal weights whose sum the strategy knows on the host (batch_total's documented
    fast path): r = 1 per sample, the count as the total."""

    def raw(self, losses, logits, targets, indices):
        return torch.ones_like(losses)

    def batch_total(self, r):
        return r.numel()  # an int: the count, known on the host


def test_an_own_batch_total_known_on_the_host_as_an_int_still_normalizes() -> None:
    """``batch_total`` returning the host's count (an int, as ``r.numel()`` is) normalized
    r / 4 = 0.25 before 9f24685; the overflow check now calls ``torch.isfinite`` on it:
    ``TypeError: isfinite(): argument 'input' (position 1) must be Tensor, not int``, naming
    neither the weighting nor batch_total."""
    w = _call(_HostTotal(), torch.rand(4))
    assert torch.equal(w, torch.full((4,), 0.25))


class _HugeF64(Weighting):
    """float64 weights of 1e300 whose total (4e300, finite in float64) is known on the host."""

    def raw(self, losses, logits, targets, indices):
        return torch.full_like(losses, 1e300)

    def batch_total(self, r):
        return 1e300 * r.numel()


def test_a_host_total_is_checked_in_the_losses_dtype() -> None:
    """A float64 model's weights are normalized in float64: r / 4e300 = 0.25 exactly. The
    check turns the host's float into a float32 tensor (``torch.tensor(total)``), where 4e300
    is Inf, and refuses "weights whose sum overflows torch.float64 ... every normalized weight
    would be 0", which is false (the same weights summed by the default batch_total pass)."""
    w = _call(_HugeF64(), torch.rand(4, dtype=torch.float64))
    assert torch.equal(w, torch.full((4,), 0.25, dtype=torch.float64))


class _Zero(Weighting):
    def raw(self, losses, logits, targets, indices):
        return torch.zeros_like(losses)


@pytest.mark.parametrize("tokens", [2, 20])
def test_an_all_zero_token_batch_gets_zero_weights_with_normalize_sum(tokens) -> None:
    """README: "A batch whose raw weights are all 0 gets w = 0 (it contributes nothing), never
    0/0." With a token loss and normalize=sum, w = r · (Σu / max(Σr·u, least)): Σu divided by
    the smallest positive float32 (1.4e-45) is Inf for any Σu > 4.8e-7, and 0 · Inf = NaN on
    every token. Before 9f24685 (clamped to 1.18e-38) 2 tokens gave 0 and 20 tokens NaN."""
    w = _call(_Zero(normalize="sum"), torch.rand(1, tokens), torch.ones(1, tokens))
    assert torch.equal(w, torch.zeros(1, tokens)), w


class _Epochs(Callback):
    """Records each on_train_epoch_start; raises once at the end of step ``at``."""

    def __init__(self, at: int) -> None:
        self.at, self.armed, self.epochs = at, True, []

    def on_train_epoch_start(self, trainer, epoch) -> None:
        self.epochs.append(epoch)

    def on_after_backward(self, trainer, batch, losses, weights) -> None:
        if self.armed and trainer.global_step + 1 == self.at:
            self.armed = False
            raise RuntimeError("once")


@pytest.mark.parametrize("at", [3, 4])
def test_on_train_epoch_start_in_a_fit_called_again(tmp_path, at) -> None:
    """2 epochs of 3 steps: a failure in step 4's window (epoch 1's first) takes the run back
    to the epoch's start (batch_in_epoch 0), which starts again, the hook fired again for
    epoch 1, as before (what it staged for the failed step is taken back): [0, 1, 1]; a
    failure in step 3 (epoch 0's last, mid-epoch) goes on mid-epoch, and the hook is not
    fired again for an epoch it was fired for: [0, 1] (the README said "not again in a fit
    called again" of both, a review's)."""
    from trainer.run import build_trainer

    cfg = make_cfg("trainer.max_epochs=2", "data.batch_size=512", "logging.progress=false",
                   "trainer.checkpoint.every_n_steps=0")  # fmt: skip
    cb = _Epochs(at)
    trainer = build_trainer(cfg, tmp_path, [cb], with_logger=False)
    assert len(trainer.train_loader) == 3
    with pytest.raises(RuntimeError, match="once"):
        trainer.fit()
    trainer.fit()
    assert cb.epochs == ([0, 1, 1] if at == 4 else [0, 1]), cb.epochs
