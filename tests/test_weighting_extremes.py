"""The weightings' contract at the ends of float32's range, one process and two (gloo): a
probe's findings, 2026-12-07."""

from __future__ import annotations

import json

import pytest
from test_distributed import _rank, ranks_of

OWN = ("loss.mode=vector", "~weighting", "+weighting._target_=test_weighting._Own")
COMMON = ("trainer.max_steps=2", "logging.every_n_steps=1", "logging.progress=false",
          "trainer.checkpoint.every_n_steps=0", "instrument=none")  # fmt: skip


def test_own_weights_whose_global_sum_overflows_are_refused_on_two_processes(tmp_path) -> None:
    """README: a strategy of one's own is checked "also for finite weights whose sum overflows
    (every weight 0, nothing trained)". One process of 4 samples of r = 1e38 is refused (the
    sum 4e38 passes float32's 3.4e38); two processes of 2 each normalize by the same global
    sum, all-reduced to Inf, so every weight is r / Inf = 0 and nothing trains, but each rank
    checked only its own sum (2e38, finite)."""
    overrides = (*COMMON, *OWN, "+weighting.bad=1e38", "+weighting.every=true",
                 "data.batch_size=2")  # fmt: skip
    dirs = [tmp_path / "rank0", tmp_path / "rank1"]
    codes = ranks_of(_rank, overrides, dirs)
    metrics = json.loads((dirs[0] / "metrics.json").read_text())
    assert codes != [0, 0], ("trained with every weight 0, unsaid", metrics)
    assert metrics["status"] == "failed" and metrics["error"].startswith(
        "WeightError: weighting test_weighting._Own: raw() must return finite weights >= 0; "
        "got weights whose sum overflows torch.float32 (largest 1e+38): every normalized "
        "weight would be 0"
    ), metrics


def test_own_per_sequence_weights_whose_sum_over_tokens_overflows_are_refused() -> None:
    """A strategy of one's own giving one weight per sequence (B,) for per-token losses (B, T)
    is normalized by Σᵢₜ rᵢuᵢₜ (README: "per-sequence weights r of shape (B,) are broadcast
    explicitly, rᵢuᵢₜ"; normalize=mean divides by their sum over all elements). Two sequences
    of 20 valid tokens with r = 1e37: Σr = 2e37 is finite, but Σ r·u = 4e38 passes float32's
    largest value, so every weight is r·u / Inf = 0. The same weights per sample (40 samples
    of 1e37, the same 4e38) are refused, "every normalized weight would be 0"; here the
    check looked at Σr, before the units, and returned zeros."""
    import pytest
    import torch

    from trainer.backward import WeightError
    from trainer.weighting import Weighting

    class PerSequence(Weighting):
        def raw(self, losses, logits, targets, indices):
            return torch.full(losses.shape[:1], 1e37, dtype=losses.dtype)

    losses, units = torch.rand(2, 20), torch.ones(2, 20)
    with pytest.raises(
        WeightError,
        match=r"^weighting .*PerSequence: raw\(\) must return "
        r"finite weights >= 0; got weights whose sum overflows torch.float32 "
        r"\(largest 1e\+37\): every normalized weight would be 0$",
    ):
        w = PerSequence()(losses, None, torch.zeros(2, 20, dtype=torch.long), torch.arange(2),
                          units)  # fmt: skip
        raise AssertionError(f"no error; every weight {w.unique().tolist()}")


def test_a_table_of_subnormal_float32_weights_is_refused() -> None:
    """README: the tables are checked "in float32 as well: ... a positive one below its smallest
    ... is refused", and the refusal names the range "between 1.18e-38 and 3.4e+38, or 0". A
    per_class table of 1e-40 (subnormal in float32, not 0) passes the check; under
    normalize=mean its batch sum (4e-40) is then clamped up to 1.18e-38, so the weights sum to
    0.034, not 1: a gradient 29x too small, weights/mean logged as if it were right."""
    from types import SimpleNamespace

    import torch

    from trainer.weighting import PerClassWeighting

    y = torch.tensor([0, 1, 2, 0])
    data = SimpleNamespace(
        num_classes=3,
        train_targets=y,
        train_loader=SimpleNamespace(num_samples=4, global_batch_size=4),
    )
    strategy = PerClassWeighting([1e-40, 1e-40, 1e-40])
    with pytest.raises(ValueError, match=r"must be representable in float32, where the losses "
                       r"are weighted \(between 1.18e-38 and 3.4e\+38, or 0\): out of range at "
                       r"\[0\]=1e-40, \[1\]=1e-40, \[2\]=1e-40;"):  # fmt: skip
        strategy.setup(data, torch.device("cpu"))  # type: ignore[arg-type]
    # a table of normal float32 values far below 1 is normalized to sum 1, exactly
    small = PerClassWeighting([2.0**-120] * 3)
    small.setup(data, torch.device("cpu"))  # type: ignore[arg-type]
    w = small(torch.rand(4), torch.zeros(4, 3), y, torch.arange(4))
    assert torch.equal(w, torch.full((4,), 0.25)), w


def test_focal_weights_of_a_confident_batch_are_normalized_to_sum_1() -> None:
    """focal, normalize=mean: w = r / Σr, so equal raw weights give 1/B whatever their scale.
    With gamma 6 and a float32 batch every sample of which is nearly certain (each loss
    1.19e-7, float32's smallest step above a loss of 0), r = (1 - p)^6 ≈ 2.9e-42 is subnormal;
    its sum is clamped up to 1.18e-38 (meant for an all-zero batch), and the weights come
    out ≈ 2.4e-4 each instead of 0.25: that batch's gradient 1000x too small, unsaid."""
    import torch

    from trainer.weighting import FocalWeighting

    focal = FocalWeighting(gamma=6.0)
    focal.nll_losses = True
    losses = torch.full((4,), 1.1920929e-07)
    w = focal(losses, torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), torch.arange(4))
    assert torch.equal(w, torch.full((4,), 0.25)), w
