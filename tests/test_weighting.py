"""Weighting strategies: the weights each one gives, and the gradients they produce."""

from __future__ import annotations

import json
import math
import pickle
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_cfg, read_scalars, train
from test_higher_order import OverRunningMean
from torch import nn

from trainer.backward import WeightError
from trainer.weighting import (
    ClassBalancedWeighting,
    FocalWeighting,
    HardTopKWeighting,
    PerClassWeighting,
    PerSampleWeighting,
    UniformWeighting,
    WeightFileError,
    Weighting,
)

K, N, B = 3, 40, 8
CPU = torch.device("cpu")
#: a loader as the weightings read it (the most weights one batch sums)
LOADER = SimpleNamespace(global_batch_size=8)


def fake_data(targets: torch.Tensor | None = None) -> SimpleNamespace:
    targets = targets if targets is not None else torch.arange(N) % K
    return SimpleNamespace(
        num_classes=K, train_targets=targets,
        train_loader=SimpleNamespace(num_samples=N, global_batch_size=B),
    )  # fmt: skip


def problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, K)).double()
    for p in model.parameters():
        nn.init.normal_(p, generator=g)
    x = torch.randn(B, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    index = torch.tensor([3, 17, 0, 39, 8, 21, 5, 30])
    return model, x, y, index


def strategies(tmp_path) -> dict[str, object]:
    weights_file = tmp_path / "w.pt"
    torch.save(torch.linspace(0.0, 2.0, N), weights_file)
    return {
        "uniform": UniformWeighting(),
        "class_balanced": ClassBalancedWeighting(),
        "per_class": PerClassWeighting([0.5, 2.0, 1.0]),
        "per_sample": PerSampleWeighting(str(weights_file)),
        "focal": FocalWeighting(gamma=2.0),
        "hard_topk": HardTopKWeighting(k=3),
    }


def weights_for(strategy, model, x, y, index, normalize: str = "mean") -> torch.Tensor:
    strategy.normalize = normalize
    strategy.setup(fake_data(), CPU)
    logits = model(x)
    losses = nn.functional.cross_entropy(logits, y, reduction="none")
    return strategy(losses, logits, y, index)


@pytest.mark.parametrize(
    "name", ["uniform", "class_balanced", "per_class", "per_sample", "focal", "hard_topk"]
)
@pytest.mark.parametrize("normalize", ["mean", "sum", "none"])
def test_vjp_equals_weighted_sum_equals_autograd_grad(tmp_path, name, normalize) -> None:
    model, x, y, index = problem()
    w = weights_for(strategies(tmp_path)[name], model, x, y, index, normalize)
    assert w.shape == (B,) and w.dtype == torch.float64 and not w.requires_grad
    assert bool((w >= 0).all()) and bool(torch.isfinite(w).all())
    if normalize == "mean":
        assert float(w.sum()) == pytest.approx(1.0)
    if normalize == "sum":
        assert float(w.sum()) == pytest.approx(B)
    params = list(model.parameters())

    def losses():
        return nn.functional.cross_entropy(model(x), y, reduction="none")

    losses().backward(gradient=w)
    vjp = [p.grad.clone() for p in params]
    model.zero_grad()
    (w * losses()).sum().backward()
    weighted = [p.grad.clone() for p in params]
    by_grad = torch.autograd.grad(losses(), params, grad_outputs=w)
    for a, b, c in zip(vjp, weighted, by_grad, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-14)


def test_class_balanced_equals_weighted_cross_entropy() -> None:
    model, x, y, index = problem(1)
    targets = torch.tensor([0] * 25 + [1] * 10 + [2] * 5)  # imbalanced training split
    strategy = ClassBalancedWeighting()
    strategy.setup(fake_data(targets), CPU)
    expected = torch.tensor([40 / (3 * 25), 40 / (3 * 10), 40 / (3 * 5)])
    torch.testing.assert_close(strategy.class_weights, expected)

    logits = model(x)
    losses = nn.functional.cross_entropy(logits, y, reduction="none")
    w = strategy(losses, logits, y, index)
    losses.backward(gradient=w)
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # (a float64 model: the float64 weights, not float32's rounding of them)
    exact = torch.tensor([40 / (3 * 25), 40 / (3 * 10), 40 / (3 * 5)], dtype=torch.float64)
    reference = nn.CrossEntropyLoss(weight=exact, reduction="mean")(model(x), y)
    reference.backward()
    for a, p in zip(ours, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-10, atol=1e-12)
    assert float((w * losses.detach()).sum()) == pytest.approx(float(reference.detach()))


def test_per_class_all_ones_equals_uniform() -> None:
    model, x, y, index = problem(2)
    ones = weights_for(PerClassWeighting([1.0, 1.0, 1.0]), model, x, y, index)
    uniform = weights_for(UniformWeighting(), model, x, y, index)
    torch.testing.assert_close(ones, uniform, rtol=0, atol=1e-15)
    assert torch.equal(uniform, torch.full((B,), 1 / B, dtype=torch.float64))


def test_focal_and_topk_follow_their_formulas() -> None:
    model, x, y, index = problem(3)
    logits = model(x)
    losses = nn.functional.cross_entropy(logits, y, reduction="none")
    p_true = torch.softmax(logits, 1)[torch.arange(B), y]
    focal = FocalWeighting(gamma=1.5, normalize="none")(losses, logits, y, index)
    torch.testing.assert_close(focal, (1 - p_true.detach()) ** 1.5)
    # read off plain cross-entropy losses (p = exp(-l)) instead of a softmax: the same weights
    from_losses = FocalWeighting(gamma=1.5, normalize="none")
    from_losses.nll_losses = True
    torch.testing.assert_close(from_losses(losses, logits, y, index), focal)
    # a sample certain in float32 (a loss of 0.0 or -0.0): weight +0.0, not -0.0 (logged)
    certain = torch.tensor([0.0, -0.0, 1.0])
    for gamma in (0.5, 2.0):
        focal_at = FocalWeighting(gamma=gamma, normalize="none")
        focal_at.nll_losses = True
        w = focal_at.raw(certain, None, None, None)  # (r before normalization)
        assert torch.equal(w[:2], torch.zeros(2)) and not torch.signbit(w).any(), w
    # normalized: hard_topk divides by its count, known without a kernel; the same as the sum
    for normalize, scale in (("mean", 1 / 3), ("sum", B / 3)):
        w = HardTopKWeighting(k=3, normalize=normalize)(losses, logits, y, index)
        torch.testing.assert_close(w.sum(), torch.tensor(3 * scale, dtype=w.dtype))

    # k past the batch keeps every sample: uniform weights, divided by B, not by k
    for normalize, value in (("mean", 1 / B), ("sum", 1.0)):
        w = HardTopKWeighting(k=B + 5, normalize=normalize)(losses, logits, y, index)
        assert torch.equal(w, torch.full_like(losses, value)), (normalize, w)
    # gamma = 0: uniform ((1 - p)^0 = 1), which the config documents
    for normalize, value in (("none", 1.0), ("mean", 1 / B)):
        w = FocalWeighting(gamma=0, normalize=normalize)(losses, logits, y, index)
        assert torch.equal(w, torch.full_like(losses, value)), (normalize, w)
    top = HardTopKWeighting(k=3, normalize="none")(losses, logits, y, index)
    assert set(top.nonzero().flatten().tolist()) == set(losses.topk(3).indices.tolist())
    frac = HardTopKWeighting(fraction=0.3, normalize="none")(losses, logits, y, index)
    assert int(frac.sum()) == math.ceil(0.3 * B)


def test_the_trainer_reads_focal_weights_off_the_losses_only_without_label_smoothing(
    tmp_path,
) -> None:
    from trainer.run import build_trainer

    plain = build_trainer(make_cfg("loss.mode=vector", "weighting=focal"), tmp_path / "a")
    smoothed = build_trainer(
        make_cfg("loss.mode=vector", "weighting=focal", "loss.label_smoothing=0.1"), tmp_path / "b"
    )
    assert plain.weighting.nll_losses and not smoothed.weighting.nll_losses


def test_an_all_zero_batch_gets_zero_weights_not_nan() -> None:
    model, x, y, index = problem()
    for normalize in ("mean", "sum", "none"):
        w = weights_for(PerClassWeighting([0.0, 0.0, 0.0]), model, x, y, index, normalize)
        assert torch.equal(w, torch.zeros(B, dtype=torch.float64))


@pytest.mark.parametrize("suffix", [".pt", ".npy", ".csv"])
def test_per_sample_files_in_every_format(tmp_path, suffix) -> None:
    values = torch.arange(N, dtype=torch.float64) / 10
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(values, path)
    elif suffix == ".npy":
        np.save(path, values.numpy())
    else:
        path.write_text("\n".join(f"{v:.1f}" for v in values.tolist()) + "\n")
    strategy = PerSampleWeighting(str(path), normalize="none")
    strategy.setup(fake_data(), CPU)
    model, x, y, index = problem()
    w = strategy(torch.zeros(B, dtype=torch.float64), model(x), y, index)
    torch.testing.assert_close(w, index.double() / 10)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (torch.ones(N - 1), rf"has {N - 1} weights but the training split has {N} samples"),
        (torch.tensor([1.0] * 5 + [float("nan")] + [1.0] * (N - 6)), r"bad at \[5\]=nan"),
        (torch.tensor([1.0, -2.0] + [1.0] * (N - 2)), r"bad at \[1\]=-2"),
        (torch.ones(N, 2), r"expected 1-D"),
        ({"weights": torch.ones(N)}, "1-D tensor of numbers"),
        # finite and >= 0 in float64, not in float32 (the losses' dtype): the run went NaN,
        # or every gradient weight was 0 (a probe)
        (
            torch.tensor([1e40] + [1.0] * (N - 1), dtype=torch.float64),
            r"representable in float32.*out of range at \[0\]=1e\+40",
        ),
        (
            torch.full((N,), 1e-50, dtype=torch.float64),
            r"representable in float32.*out of range at \[0\]=1e-50",
        ),
    ],
)
def test_bad_per_sample_files_are_refused(tmp_path, content, match) -> None:
    path = tmp_path / "w.pt"
    torch.save(content, path)
    with pytest.raises(WeightFileError, match=match):
        PerSampleWeighting(str(path)).setup(fake_data(), CPU)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_per_sample_file_that_would_run_code_is_refused(tmp_path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(WeightFileError, match="could not read"):
        PerSampleWeighting(str(path)).setup(fake_data(), CPU)
    assert not marker.exists()


def test_missing_file_and_wrong_class_count_are_named(tmp_path) -> None:
    with pytest.raises(WeightFileError, match="does not exist"):
        PerSampleWeighting(str(tmp_path / "nope.npy")).setup(fake_data(), CPU)
    with pytest.raises(ValueError, match="got 2 weights but the data has 3 classes"):
        PerClassWeighting([1.0, 2.0]).setup(fake_data(), CPU)


def test_vector_mode_trains_with_every_strategy(tmp_path) -> None:
    per_sample = tmp_path / "w.npy"
    np.save(per_sample, np.linspace(0.5, 1.5, 1438))  # the digits training split's size
    for name, extra in [
        ("class_balanced", []),
        ("per_class", ["weighting.weights=[1,1,1,1,1,1,1,1,1,3]"]),
        ("per_sample", [f"weighting.path={per_sample}"]),
        ("focal", []),
        ("hard_topk", ["weighting.fraction=0.5"]),
    ]:
        run_dir = tmp_path / name
        metrics = train(run_dir, "loss.mode=vector", f"weighting={name}", *extra,
                        "trainer.max_epochs=2", "logging.every_n_steps=5")  # fmt: skip
        assert metrics["val/acc"] > 0.5, name
        scalars = read_scalars(run_dir)
        # normalize=mean: the weights sum to 1; the last step (46) is the epoch's ragged
        # last batch (1,438 = 22 · 64 + 30)
        for step, mean in scalars["weights/mean"]:
            assert mean == pytest.approx(1 / (30 if step == 46 else 64), rel=1e-5), step
        if name == "hard_topk":
            assert all(v == 0 for _, v in scalars["weights/min"])


def test_wrong_length_weight_file_fails_before_the_first_step(tmp_path) -> None:
    from trainer.run import run

    bad = tmp_path / "w.npy"
    np.save(bad, np.ones(100))
    with pytest.raises(WeightFileError, match="has 100 weights"):
        run(make_cfg("loss.mode=vector", "weighting=per_sample", f"weighting.path={bad}"),
            run_dir=tmp_path / "run")  # fmt: skip
    assert not (tmp_path / "run" / "tb").exists()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


def test_per_class_labels_past_the_table_are_refused_in_setup() -> None:
    """From Python (no run() to check the labels first) a label past the table failed mid-step
    with a bare IndexError (a device-side assert on CUDA), a probe."""
    labels = torch.arange(N) % K
    labels[7] = K + 1
    with pytest.raises(ValueError, match=rf"training split's labels span \[0, {K + 1}\], past "
                       rf"its {K} weights"):  # fmt: skip
        PerClassWeighting([1.0] * K).setup(fake_data(labels), CPU)
    with pytest.raises(ValueError, match="representable in float32"):
        PerClassWeighting([1.0, 1e39] + [1.0] * (K - 2)).setup(fake_data(), CPU)


def test_a_small_integer_weight_file_is_read(tmp_path) -> None:
    path = tmp_path / "w.npy"
    np.save(path, (np.arange(N) % 3).astype(np.int16))
    strategy = PerSampleWeighting(str(path), normalize="none")
    strategy.setup(fake_data(), CPU)
    assert torch.equal(strategy.table, torch.from_numpy(np.arange(N) % 3).float())


def test_weights_whose_batch_sum_passes_float32_are_refused() -> None:
    """Each weight in float32, their sum over a batch not: r / Σr was 0 for every sample
    (every gradient 0, a review)."""
    with pytest.raises(ValueError, match=r"summed over a batch .* would pass float32's largest"):
        PerClassWeighting([3e38, 3e38] + [1.0] * (K - 2)).setup(fake_data(), CPU)


def test_a_weighting_used_for_float64_then_float32_losses_gives_each_its_table(tmp_path) -> None:
    """The table was float32 whatever the losses: a float64 model's weights were the file's
    rounded (0.1 as 0.10000000149...); now they are the file's, bit for bit, and float32
    losses after them still get the float32 table."""
    values = torch.arange(1, N + 1, dtype=torch.float64) / 10
    path = tmp_path / "w.pt"
    torch.save(values, path)
    strategy = PerSampleWeighting(str(path), normalize="none")
    strategy.setup(fake_data(), CPU)
    model, x, y, index = problem()
    assert torch.equal(strategy(torch.zeros(B, dtype=torch.float64), model(x), y, index),
                       values[index])  # fmt: skip
    w = strategy(torch.zeros(B), model(x).float(), y, index)
    assert w.dtype == torch.float32 and torch.equal(w, values[index].float())
    assert strategy.table.dtype == torch.float32  # (the float32 table kept)


def test_a_tables_batch_sum_is_checked_over_a_batch_not_the_split() -> None:
    """The float32 overflow check summed the largest weight over the training split's size:
    [1e35, 1] on 10,000 samples was refused though a batch of 64 sums to 6.4e36. Over the
    global batch now (its tokens, for a loss weighting each)."""
    data = fake_data()
    data.train_loader.num_samples = 10_000
    PerClassWeighting([1e35, 1.0] + [1.0] * (K - 2)).setup(data, CPU)  # 8 x 1e35: fine
    with pytest.raises(ValueError, match=r"summed over a batch \(up to 8 samples\)"):
        PerClassWeighting([1e38, 1.0] + [1.0] * (K - 2)).setup(data, CPU)


def test_hard_topk_keeps_ceil_of_the_fraction_as_written_and_warns_when_it_keeps_all(
    caplog,
) -> None:
    """``math.ceil(0.28 * 25)`` is 8 (0.28 · 25 = 7.000000000000001 in binary floating point):
    one sample too many for 15 (fraction, B) pairs up to 1,024 (a probe). The fraction is
    taken as written (its shortest decimal): exact rational arithmetic is the reference. A
    k that keeps every sample of the batch trains as uniform: warned."""
    from fractions import Fraction

    cases = [(0.28, 25, 7), (0.07, 100, 7), (0.14, 50, 7), (0.55, 100, 55), (0.56, 25, 14)]
    for fraction, batch, kept in cases:
        assert HardTopKWeighting(fraction=fraction).count(batch) == kept
        # (a NumPy scalar, as a sweep from Python may give: its repr is no decimal)
        assert HardTopKWeighting(fraction=np.float64(fraction)).count(batch) == kept
    for fraction in (0.01, 0.07, 0.1, 0.14, 0.25, 0.28, 0.3, 0.55, 0.56, 0.7, 0.9, 1.0):
        for batch in range(1, 1025):
            want = max(1, -(-Fraction(str(fraction)) * batch // 1))
            assert HardTopKWeighting(fraction=fraction).count(batch) == want, (fraction, batch)
    with caplog.at_level("WARNING", logger="trainer.weighting"):
        HardTopKWeighting(k=B - 1).setup(fake_data(), CPU)
        assert not caplog.records
        HardTopKWeighting(k=B).setup(fake_data(), CPU)
    assert f"k={B} keeps every sample of a batch of {B}" in caplog.text


def test_class_balanced_focal_and_per_token_weights_of_float64_losses_are_float64() -> None:
    """Their weights were float32 whatever the losses: a float64 model's focal gradients were
    8e-8 to 1.7e-7 off, class-balanced weights of counts 7/3/11 2.3333332538 for 7/3. Now in
    the losses' precision, against float64 formulas."""
    from trainer.weighting import PerTokenWeighting

    labels = torch.tensor([0] * 7 + [1] * 3 + [2] * 11)
    cb = ClassBalancedWeighting()
    cb.setup(fake_data(labels), CPU)
    losses = torch.rand(3, dtype=torch.float64)
    got = cb.raw(losses, None, torch.tensor([0, 1, 2]), None)  # type: ignore[arg-type]
    want = torch.tensor([21 / 21, 21 / 9, 21 / 33], dtype=torch.float64)
    assert got.dtype == torch.float64 and torch.equal(got, want)
    assert cb.raw(losses.float(), None, torch.tensor([0, 1, 2]), None).dtype == torch.float32  # type: ignore[arg-type]

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, K, generator=g, dtype=torch.float64)
    targets = torch.arange(6) % K
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    focal = FocalWeighting(gamma=2.0)
    p = torch.softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    for nll_losses in (True, False):
        focal.nll_losses = nll_losses
        got = focal.raw(nll, logits, targets, None)  # type: ignore[arg-type]
        # two float64 routes to (1 - p)²: within a few float64 ulps of each other
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, (1 - p) ** 2, rtol=1e-12, atol=0)

    tokens = torch.tensor([[0, 1, 1], [2, 2, 2]])
    per_token = PerTokenWeighting(power=1.0)
    per_token.check_loss(__import__("trainer.losses").losses.TokenCrossEntropy())
    data = SimpleNamespace(vocab_size=3, out_dim=3, train_targets=tokens, train_loader=LOADER)
    per_token.setup(data, CPU)  # type: ignore[arg-type]
    got = per_token.raw(torch.rand(2, 3, dtype=torch.float64), None, tokens, None)  # type: ignore[arg-type]
    counts = {0: 1, 1: 2, 2: 3}  # N / (V' n): 6 / (3 n)
    want = torch.tensor([[6 / (3 * counts[int(t)]) for t in row] for row in tokens.tolist()],
                        dtype=torch.float64)  # fmt: skip
    assert got.dtype == torch.float64 and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weights_of_float16_and_bfloat16_losses_are_float32(dtype) -> None:
    """The weights of per-sample losses were computed and summed in the losses' dtype: a float16
    Σr of a class-balanced batch of 8,192 passed 65504 and every weight was r / Inf = 0 (no
    gradient, no NaN for the guard to see); bfloat16 weights kept 3 digits (3e-3 off, summing
    to 0.9994). In float32 now, as per-token losses' already were: within float32's rounding of
    the float64 weights (each r rounded once, their sum of B terms: B·2⁻²⁴ relative)."""
    b = 8192
    labels = torch.tensor([0] * 35 + [1] * 60 + [2] * 2)  # a rare class: weight 16.2
    cb = ClassBalancedWeighting()
    cb.setup(fake_data(labels), CPU)
    y = torch.arange(b) % K
    losses = torch.rand(b, generator=torch.Generator().manual_seed(0)).to(dtype)
    w = cb(losses, torch.zeros(b, K), y, torch.arange(b))
    assert cb._exact is not None
    r = cb._exact[y]  # the float64 table
    want = r / r.sum()
    assert w.dtype == torch.float32 and torch.isfinite(w).all()
    torch.testing.assert_close(w.double(), want, rtol=b * 2**-24, atol=0)
    assert float(w.double().sum()) == pytest.approx(1.0, rel=b * 2**-24)


class _Own(Weighting):
    """A strategy of one's own: r = 1, except ``bad`` on sample 0 (``every``: on every
    sample) from step ``at`` on (to step ``until``, where given)."""

    def __init__(
        self, bad: float = -1.0, at: int = 1, normalize: str = "mean", every: bool = False,
        until: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(normalize=normalize)
        self.bad, self.at, self.every, self.calls, self.until = bad, at, every, 0, until

    def raw(self, losses, logits, targets, indices):
        self.calls += 1
        r = torch.ones_like(losses)
        if self.at <= self.calls <= (self.until or self.calls):
            r[slice(None) if self.every else 0] = self.bad
        return r


class _NoSuper(Weighting):
    def __init__(self, normalize: str = "mean") -> None:  # (Weighting's __init__ not
        pass  # called: no normalize)

    def raw(self, losses, logits, targets, indices):
        return torch.ones_like(losses)


class _ClampsInPlace(Weighting):
    def raw(self, losses, logits, targets, indices):
        return losses.clamp_(max=0.5)  # (in place: the losses the trainer logs)


class _WrongShape(Weighting):
    def raw(self, losses, logits, targets, indices):
        return torch.ones(losses.shape[0] - 1)


@pytest.mark.parametrize(
    "keys, match",
    [
        # a negative r trained as gradient ascent (normalize=none), silently
        (
            ["+weighting.bad=-1.0"],
            r"weighting test_weighting._Own: raw\(\) must return finite weights >= 0; got \[0\]=-1",
        ),
        (["+weighting.bad=nan"], r"_Own: raw\(\) must return finite weights >= 0; got \[0\]=nan"),
        # finite weights whose float32 sum overflows: every w = r / Inf = 0, nothing trained,
        # unsaid (a probe)
        (
            ["+weighting.bad=3e38", "+weighting.every=true"],
            r"_Own: raw\(\) must return finite weights >= 0; got "
            r"weights whose sum overflows torch.float32 \(largest 3e\+38\)",
        ),
        # from step 3 on: found on the next logging step (4), without a read per step
        (
            ["+weighting.bad=-1.0", "+weighting.at=3"],
            r"_Own: raw\(\) returned a negative or non-finite weight, or weights whose sum "
            r"overflows, on a step from 1 to 4",
        ),
        # on step 2 alone, the steps after it good: still found on the logging step (4)
        (
            ["+weighting.bad=-1.0", "+weighting.at=2", "+weighting.until=2"],
            r"_Own: raw\(\) returned a negative or non-finite weight, or weights whose sum "
            r"overflows, on a step from 1 to 4",
        ),
        # a checkpoint between logging steps (3) reads the flag: it kept none, and a run
        # resumed from it went on past the negative weight the uninterrupted run stopped at
        (
            ["+weighting.bad=-1.0", "+weighting.at=3", "trainer.checkpoint.every_n_steps=3"],
            r"_Own: raw\(\) returned a negative or non-finite weight, or weights whose sum "
            r"overflows, on a step from 1 to 3",
        ),
    ],
    ids=["negative", "nan", "overflow", "later", "once", "checkpoint"],
)
def test_a_strategy_of_ones_own_is_held_to_finite_weights_ge_0(tmp_path, keys, match) -> None:
    """The contract of raw() (r finite and >= 0) was never checked for a user's strategy:
    negative weights trained as ascent without a word, NaN ones were named as a layer's
    gradient (a probe's finding). Named now, with the strategy's class: the first call on
    the host, later ones on logging steps and checkpoints."""
    with pytest.raises(WeightError, match=match):
        train(tmp_path, "loss.mode=vector", "~weighting", f"+weighting._target_={__name__}._Own",
              "trainer.max_steps=8", "logging.every_n_steps=4", "instrument=none",
              *keys)  # fmt: skip
    assert not list(tmp_path.glob("checkpoints/step_*.pt"))  # (none written past it)


class _Ema(OverRunningMean):
    """A strategy with state (r = the loss over a running mean of the batch losses), kept in
    checkpoints."""

    def state_dict(self):
        return {"mean": self.mean}

    def load_state_dict(self, state) -> None:
        self.mean = state["mean"]


def test_a_strategy_of_ones_own_with_state_resumes_exactly(tmp_path, caplog) -> None:
    """A weighting's state was in no checkpoint: a resumed run started its running mean
    afresh and trained differently from the uninterrupted one, without a word (a probe's
    finding: 1.4e-3 apart after 30 steps). Kept now, as a callback's is."""
    from conftest import final_params

    common = ("loss.mode=vector", "~weighting", f"+weighting._target_={__name__}._Ema",
              "instrument=none", "data.batch_size=128")  # fmt: skip
    train(tmp_path / "whole", *common, "trainer.max_steps=8")
    train(tmp_path / "part", *common, "trainer.max_steps=3")
    last = tmp_path / "part" / "checkpoints" / "last.pt"
    train(tmp_path / "rest", *common, "trainer.max_steps=8", f"trainer.resume={last}")
    whole, rest = final_params(tmp_path / "whole"), final_params(tmp_path / "part")  # (a
    # resumed run writes into the run it continues)
    assert all(torch.equal(whole[k], rest[k]) for k in whole)
    # a checkpoint without it (an older one): said, not silent
    from trainer.checkpoint import load_checkpoint

    state = load_checkpoint(last)
    del state["objective"]
    torch.save(state, tmp_path / "older.pt")
    with caplog.at_level("WARNING"):
        # (last.pt is step 8's, which the resumed run wrote)
        train(tmp_path / "older", *common, "trainer.max_steps=9",
              f"trainer.resume={tmp_path / 'older.pt'}")  # fmt: skip
    assert "the checkpoint holds no state for weighting _Ema: it starts fresh" in caplog.text


class _OtherStateDict(_Own):
    """A strategy whose state_dict meant something else before losses, weightings and
    regularizers were checkpointed."""

    def state_dict(self, prefix):
        return {prefix: 1}


def test_a_state_dict_a_checkpoint_cannot_call_is_refused_at_the_start(tmp_path) -> None:
    """It failed with a TypeError at the first checkpoint, after training (a review's
    finding); refused before the first step, naming the part and the contract."""
    with pytest.raises(TypeError, match=r"weighting _OtherStateDict: its state_dict\(prefix\) "
                       r"cannot be called as a checkpoint calls it"):  # fmt: skip
        train(tmp_path, "loss.mode=vector", "~weighting",
              f"+weighting._target_={__name__}._OtherStateDict", "+weighting.at=1000",
              "trainer.max_steps=3", "instrument=none")  # fmt: skip
    assert json.loads((tmp_path / "metrics.json").read_text())["step"] == 0


def test_a_strategy_of_ones_own_that_breaks_the_base_class_is_named(tmp_path) -> None:
    """One skipping Weighting.__init__ failed at the first step with an AttributeError; one
    returning a weight too few was named as "gradient weights" of the objective."""
    from trainer.config import ConfigError

    common = ("loss.mode=vector", "trainer.max_steps=2", "instrument=none")
    with pytest.raises(ConfigError, match=r"_NoSuper has no normalize; its __init__ must call"):
        train(tmp_path / "a", *common, f"weighting._target_={__name__}._NoSuper")
    with pytest.raises(WeightError, match=r"_WrongShape: raw\(\) returned weights of shape"):
        train(tmp_path / "b", *common, f"weighting._target_={__name__}._WrongShape")
    # (a raw() clamping the losses in place: train/loss logged 0.5 for 2.27, a probe's)
    with pytest.raises(WeightError, match=r"_ClampsInPlace: raw\(\) changed its losses in place"):
        train(tmp_path / "c", *common, f"weighting._target_={__name__}._ClampsInPlace")


def test_the_guard_names_a_weighting_that_went_non_finite_after_its_first_call(tmp_path):
    """NaN raw weights from step 3 on make NaN gradients, which the guard stops at that step,
    before the next logging step's check: its message named a layer's gradient only (a
    review's finding); it names the weighting now."""
    from trainer.instrument.nonfinite import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"step 3: .*the weighting test_weighting._Own "
                       r"returned negative or non-finite raw weights"):  # fmt: skip
        train(tmp_path, "loss.mode=vector", "~weighting", f"+weighting._target_={__name__}._Own",
              "+weighting.bad=nan", "+weighting.at=3", "trainer.max_steps=8",
              "logging.every_n_steps=4")  # fmt: skip


class _Learned(Weighting):
    """Raw weights from a parameter of its own (they require grad), or on the meta device."""

    def __init__(self, normalize: str = "mean", meta: bool = False) -> None:
        super().__init__(normalize=normalize)
        self.scale, self.meta = torch.nn.Parameter(torch.ones(())), meta

    def raw(self, losses, logits, targets, indices):
        if self.meta:
            return torch.ones(losses.shape, device="meta")
        return torch.ones_like(losses) * self.scale


@pytest.mark.parametrize(("meta", "match"), [
    (False, r"raw\(\) returned weights that require grad \(computed from parameters\?\)"),
    (True, r"raw\(\) returned weights that are on meta, the losses on cpu"),
])  # fmt: skip
def test_weights_that_require_grad_or_sit_elsewhere_name_the_weighting(tmp_path, meta, match):
    """The backward's own check refused them without naming the weighting or raw(), and a
    meta tensor failed with torch's "Tensor.item() cannot be called on meta tensors" (a
    probe)."""
    with pytest.raises(WeightError, match=r"weighting test_weighting._Learned: " + match):
        train(tmp_path, "loss.mode=vector", "~weighting",
              f"+weighting._target_={__name__}._Learned", f"+weighting.meta={str(meta).lower()}",
              "trainer.max_steps=2")  # fmt: skip


class _Rounded(Weighting):
    """Integer (or boolean) raw weights: ℓ / max ℓ rounded, the hardest sample alone."""

    def __init__(self, normalize: str = "mean", kind: str = "long") -> None:
        super().__init__(normalize=normalize)
        self.kind = kind

    def raw(self, losses, logits, targets, indices):
        r = losses / losses.max()
        return r.long() if self.kind == "long" else r >= 1


@pytest.mark.parametrize("kind", ["long", "bool"])
def test_integer_or_boolean_weights_are_refused(kind) -> None:
    """They were cast to the losses' dtype: (ℓ/max ℓ).long() trained the hardest sample alone,
    unsaid, where README says a weight of another dtype is an error (a probe's)."""
    losses = torch.tensor([0.5, 1.0, 2.0, 4.0])
    dtype = "torch.int64" if kind == "long" else "torch.bool"
    with pytest.raises(WeightError, match=rf"_Rounded: raw\(\) returned {dtype} weights; "
                       r"weights are real numbers \(the losses' are torch.float32\)"):  # fmt: skip
        _Rounded(kind=kind)(losses, torch.zeros(4, 3), torch.zeros(4, dtype=torch.long),
                            torch.arange(4))  # fmt: skip


@pytest.mark.parametrize("normalize", ["mean", "sum", "none"])
def test_uniform_weights_of_per_token_losses_are_the_units_or_their_share(normalize) -> None:
    """Uniform's own shortcut for unit weights: u / Σu under ``mean``, u itself under ``sum``
    and ``none`` (the loss's own sum over its tokens), not u / Σu for every mode."""
    units = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    losses = torch.rand(2, 3, generator=torch.Generator().manual_seed(0))
    w = UniformWeighting(normalize=normalize)(losses, None, None, None, units=units)
    assert torch.equal(w, units / 5 if normalize == "mean" else units), w


class _Upweighted(UniformWeighting):
    """A subclass of the uniform weighting with weights of its own: the first sample's
    doubled, renormalized."""

    def __call__(self, losses, logits, targets, indices, units=None):
        w = super().__call__(losses, logits, targets, indices, units).clone()
        w[0] *= 2
        return w / w.sum()


def test_a_subclass_of_the_uniform_weighting_keeps_its_own_weights() -> None:
    """Only the uniform weighting itself takes scalar mode's coefficients (its shortcut); a
    subclass whose weights differ is backpropagated with them, not replaced by 1/B."""
    from trainer.losses import CrossEntropy
    from trainer.objective import Objective, Window

    lin = nn.Linear(3, 2)
    obj = Objective(CrossEntropy(), _Upweighted(), [], list(lin.parameters()))
    x, y = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 0, 1])
    out = lin(x)
    losses = nn.functional.cross_entropy(out, y, reduction="none")
    w = obj.vector_weights(losses, out, y, torch.arange(4), None, Window(4, 1))
    assert torch.equal(w, torch.tensor([2.0, 1.0, 1.0, 1.0]) / 5)


def test_per_token_weights_name_target_ids_the_loss_counts_outside_the_vocabulary() -> None:
    """A loss of one's own whose units() count padding (-100) as tokens, or a data module
    whose out_dim misses an id: bincount's own error ("only supports 1-d non-negative
    integral inputs") said nothing of where the ids came from (a researcher's probe). Named,
    with the rule: units 0 at padding, out_dim covering every other id."""
    from trainer.losses import TokenCrossEntropy
    from trainer.weighting import PerTokenWeighting

    class CountsPadding(TokenCrossEntropy):
        def units(self, target, dtype=torch.float32):
            return torch.ones(target.shape, dtype=dtype)

    tokens = torch.tensor([[0, 1, -100], [2, 2, 2]])
    for loss, out_dim, bad in ((CountsPadding(), 3, "[-100]"), (TokenCrossEntropy(), 2, "[2]")):
        per_token = PerTokenWeighting(power=1.0)
        per_token.check_loss(loss)
        data = SimpleNamespace(
            vocab_size=out_dim, out_dim=out_dim, train_targets=tokens, train_loader=LOADER
        )
        with pytest.raises(ValueError, match=rf"ids outside \[0, {out_dim}\).*{re.escape(bad)}"):
            per_token.setup(data, CPU)  # type: ignore[arg-type]


def test_inference_targets_pass_the_weightings_in_place_check() -> None:
    """Targets made under torch.inference_mode() (a slice of a table built there) have no
    version counter: reading it raised "Inference tensors do not track version counter",
    naming nothing (a review's)."""
    with torch.inference_mode():
        targets, indices = torch.tensor([0, 1, 2, 1]), torch.arange(4)
    losses = torch.rand(4)
    weights = _Own(at=10)(losses, torch.zeros(4, 3), targets, indices)
    assert weights.shape == (4,) and torch.isfinite(weights).all()


def test_per_sample_weights_are_checked_against_the_digest_a_checkpoint_keeps(
    tmp_path, caplog
) -> None:
    """The state keeps the SHA-256 of the weights read (float64 bytes); loaded where the file
    holds the same weights it is silent, where it holds others (reversed) it refuses, and a
    state without the digest (a checkpoint from before it) is warned of, not refused. A
    subclass's ``load`` may return a tensor of a graph: its values are digested."""
    import hashlib
    import logging

    path = tmp_path / "w.pt"
    w = torch.rand(N, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.1
    torch.save(w, path)
    saved = PerSampleWeighting(str(path))
    saved.setup(fake_data(), CPU)
    state = saved.state_dict()
    assert state == {"weights_sha256": hashlib.sha256(w.numpy().tobytes()).hexdigest()}
    same = PerSampleWeighting(str(path))
    same.setup(fake_data(), CPU)
    with caplog.at_level(logging.WARNING, logger="trainer.weighting"):
        same.load_state_dict(state)
        assert "digest" not in caplog.text
        same.load_state_dict({})
    assert f"keeps no digest of the weights its run read from {path}" in caplog.text
    torch.save(w.flip(0), path)
    other = PerSampleWeighting(str(path))
    other.setup(fake_data(), CPU)
    with pytest.raises(WeightFileError, match=f"{re.escape(str(path))} holds other weights"):
        other.load_state_dict(state)

    class Computed(PerSampleWeighting):
        def load(self) -> torch.Tensor:
            return w.clone().requires_grad_() * 1  # (a tensor off a graph)

    computed = Computed(str(path))
    computed.setup(fake_data(), CPU)
    assert computed.state_dict() == state
