"""Scalar and vector backward give exactly the gradients the math says."""

from __future__ import annotations

import pytest
import torch
from conftest import final_params, read_scalars, train
from torch import nn
from torch.func import functional_call, grad, vmap

from trainer.backward import WeightError, backward_scalar, backward_vector, check_weights
from trainer.loop import Callback
from trainer.weighting import UniformWeighting


def tiny_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    for p in model.parameters():
        nn.init.normal_(p, generator=g)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(3, (6,), generator=g)
    w = torch.rand(6, generator=g, dtype=torch.float64)
    return model, x, y, w


def per_sample_losses(model, x, y):
    return nn.functional.cross_entropy(model(x), y, reduction="none")  # (B,)


def grads_of(model) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def test_vector_backward_is_the_vjp_of_the_weighted_sum() -> None:
    model, x, y, w = tiny_problem()
    backward_vector(per_sample_losses(model, x, y), w)
    vjp = grads_of(model)

    (w * per_sample_losses(model, x, y)).sum().backward()
    weighted_sum = grads_of(model)

    by_grad = torch.autograd.grad(
        per_sample_losses(model, x, y), list(model.parameters()), grad_outputs=w
    )

    # independent reference: per-sample gradients from torch.func, weighted by hand
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    reference = [torch.einsum("b,b...->...", w, per_sample[k]) for k in params]

    for a, b, c, ref in zip(vjp, weighted_sum, by_grad, reference, strict=True):
        torch.testing.assert_close(a, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c, ref, rtol=1e-12, atol=1e-12)


def test_uniform_mean_weights_equal_scalar_mean_backward() -> None:
    model, x, y, _ = tiny_problem(1)
    losses = per_sample_losses(model, x, y)
    w = UniformWeighting("mean")(losses, model(x), y, torch.arange(6))
    assert torch.equal(w, torch.ones(6, dtype=w.dtype) / 6)
    backward_vector(losses, w)
    vector = grads_of(model)
    backward_scalar(per_sample_losses(model, x, y).mean())
    scalar = grads_of(model)
    for a, b in zip(vector, scalar, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_the_scalar_seed_is_kept_only_where_no_leaf_can_hold_it() -> None:
    """Scalar backward seeds a product's or a mean's root with a kept 1.0 (no ``ones_like``
    per call). A root that could pass its seed on as it is (a view of a one-element
    parameter, a sum, an addition) gets autograd's own: its leaf's gradient, accumulated
    and zeroed in place, never writes into the seed of a later root."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    for root in (lambda: (w * w).sum() * 1.0, lambda: torch.dot(w, w), lambda: (w * w).mean()):
        with Ops() as ops:
            backward_scalar(root())
        assert not any(name.startswith("ones_like") for name in ops.seen)
    scale = torch.nn.Parameter(torch.tensor([2.0]))
    for root in (lambda: scale.reshape(()), lambda: scale.sum(), lambda: scale.squeeze() + 0.0):
        backward_scalar(root())
        backward_scalar(root())  # accumulates into scale.grad in place
        assert scale.grad.tolist() == [2.0]
        scale.grad.zero_()
        w.grad = None
        backward_scalar((w * w).sum() * 1.0)
        assert w.grad.tolist() == [2.0, -4.0]
        scale.grad = None


def test_uniform_none_weights_give_the_gradient_of_the_sum() -> None:
    model, x, y, _ = tiny_problem(2)
    losses = per_sample_losses(model, x, y)
    backward_vector(losses, UniformWeighting("none")(losses, losses, y, y))
    vector = grads_of(model)
    per_sample_losses(model, x, y).sum().backward()
    for a, b in zip(vector, grads_of(model), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_the_classic_shape_mistake_names_both_shapes() -> None:
    # ERRATA: a (4,) vector for a (2, 2) loss; PyTorch itself would only say "Mismatch in shape"
    x = torch.randn(2, 2, requires_grad=True)
    losses = x.pow(2)
    with pytest.raises(WeightError, match=r"\(4,\).*\(2, 2\)"):
        backward_vector(losses, torch.tensor([0.1, 0.5, 0.2, 0.3]))
    assert x.grad is None  # nothing ran
    v = torch.tensor([[0.1, 0.5], [0.2, 0.3]])
    backward_vector(losses, v)
    torch.testing.assert_close(x.grad, 2 * x.detach() * v)  # the VJP v^T J, elementwise here


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        (torch.ones(3), r"\(3,\).*\(3, 1\)"),  # would broadcast silently without the check
        (torch.ones(3, 1, dtype=torch.float64), "dtype"),
        (torch.ones(3, 1, device="meta"), "meta"),
        (torch.ones(3, 1, requires_grad=True), "detach"),
        (torch.ones(3, 1, requires_grad=True) * 1, "detach"),  # (not a leaf: computed)
    ],
)
def test_weights_that_do_not_fit_are_refused(weights: torch.Tensor, match: str) -> None:
    losses = torch.ones(3, 1, requires_grad=True) * 2
    with pytest.raises(WeightError, match=match):
        check_weights(losses, weights)


def test_scalar_backward_refuses_a_vector_loss() -> None:
    with pytest.raises(WeightError, match=r"0-d loss, got shape \(3,\)"):
        backward_scalar(torch.ones(3, requires_grad=True) * 1)


STEPS50 = ["trainer.max_steps=50", "logging.every_n_steps=1", "optimizer=sgd", "optimizer.lr=0.05"]


@pytest.mark.threads(2)  # (parallel kernels too: see conftest._one_thread)
def test_scalar_and_vector_uniform_train_the_same(tmp_path) -> None:
    train(tmp_path / "scalar", *STEPS50, "loss.mode=scalar")
    train(tmp_path / "vector", *STEPS50, "loss.mode=vector", "weighting=uniform")
    a, b = final_params(tmp_path / "scalar"), final_params(tmp_path / "vector")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    la, lb = read_scalars(tmp_path / "scalar"), read_scalars(tmp_path / "vector")
    assert [s for s, _ in la["train/loss"]] == list(range(1, 51))
    assert la["train/loss"] == lb["train/loss"]
    # vector mode also logs its weights: uniform 1/B, B = 64 except the epoch's last batch (30)
    expected = [(s, 1 / 30 if s % 23 == 0 else 1 / 64) for s in range(1, 51)]
    for tag in ("weights/mean", "weights/min", "weights/max"):
        assert [(s, pytest.approx(v)) for s, v in lb[tag]] == expected
    assert "weights/mean" not in la


class GradRecorder(Callback):
    """Records parameter gradients where the trainer measures them (before clipping)."""

    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []
        self.norms: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer, optimizer) -> None:
        grads = [p.grad.detach().clone() for p in trainer.params]
        self.grads.append(grads)
        self.norms.append(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))


@pytest.mark.parametrize(
    "mode", ["loss.mode=scalar", "loss.mode=vector", "weighting.normalize=none"]
)
def test_accumulation_equals_one_big_batch(tmp_path, mode: str) -> None:
    # normalize=none: the gradient of the window's summed loss, like one batch's summed loss
    lr = "optimizer.lr=0.001" if "none" in mode else "optimizer.lr=0.05"
    common = ["optimizer=sgd", lr, "trainer.max_epochs=1", "loss.mode=vector", mode]
    big, small = GradRecorder(), GradRecorder()
    train(tmp_path / "big", *common, "data.batch_size=64", callbacks=[big])
    train(tmp_path / "acc", *common, "data.batch_size=32", "trainer.accumulate_grad_batches=2",
          callbacks=[small])  # fmt: skip
    assert len(big.grads) == len(small.grads) == 23  # 1,438 train samples: 22 x 64 + 30
    for ga, gb in zip(big.grads, small.grads, strict=True):
        for a, b in zip(ga, gb, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    a, b = final_params(tmp_path / "big"), final_params(tmp_path / "acc")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


class UpdateRecorder(GradRecorder):
    """Also records the size of each parameter update."""

    def __init__(self) -> None:
        super().__init__()
        self.updates: list[float] = []

    def on_before_optimizer_step(self, trainer, optimizer) -> None:
        super().on_before_optimizer_step(trainer, optimizer)
        self._before = [p.detach().clone() for p in trainer.params]

    def on_train_step_end(self, trainer, out) -> None:
        delta = [p.detach() - b for p, b in zip(trainer.params, self._before, strict=True)]
        self.updates.append(
            float(torch.linalg.vector_norm(torch.cat([d.flatten() for d in delta])))
        )


def test_logged_grad_norm_is_the_norm_before_clipping(tmp_path) -> None:
    rec = UpdateRecorder()
    train(tmp_path, "trainer.max_steps=5", "logging.every_n_steps=1", "trainer.grad_clip=0.01",
          "optimizer=sgd", "optimizer.momentum=0", "optimizer.lr=0.5", callbacks=[rec])  # fmt: skip
    logged = [v for _, v in read_scalars(tmp_path)["grad_norm/total"]]
    assert logged == pytest.approx([float(n) for n in rec.norms], rel=1e-5)
    assert min(logged) > 0.01  # so clipping really happened on each step
    # plain SGD moves by lr * (clipped gradient), whose norm is the clip value
    assert rec.updates == pytest.approx([0.5 * 0.01] * 5, rel=1e-4)


@pytest.mark.parametrize("precision", ["16", "bf16"])
def test_mixed_precision_measures_unscaled_gradients(tmp_path, precision: str) -> None:
    full, mixed = GradRecorder(), GradRecorder()
    common = ["trainer.max_steps=1", "logging.every_n_steps=1"]
    train(tmp_path / "32", *common, callbacks=[full])
    train(tmp_path / precision, *common, f"trainer.precision={precision}", callbacks=[mixed])
    # fp16's GradScaler multiplies the loss by 2**16; the measured norm must not be
    ratio = float(mixed.norms[0] / full.norms[0])
    assert ratio == pytest.approx(1.0, abs=0.05)
    logged = read_scalars(tmp_path / precision)["grad_norm/total"][0][1]
    assert logged == pytest.approx(float(mixed.norms[0]), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_the_scalar_root_has_the_means_gradient_bit_for_bit(dtype) -> None:
    """Scalar mode's root for a micro-batch that is its whole window, Σ ℓᵢ·(1/B) (one autograd
    node cheaper than mean()), backpropagates exactly what mean() does, for every B up to 300;
    its value is the mean up to float rounding."""
    from trainer.losses import CrossEntropy
    from trainer.objective import Objective, Window

    objective = Objective(CrossEntropy(), None, (), [])
    g = torch.Generator().manual_seed(0)
    for b in range(1, 301):
        losses = torch.rand(b, generator=g, dtype=dtype).requires_grad_()
        y = torch.zeros(b, dtype=torch.long)
        root = objective.scalar_root(losses, None, y, Window(b))
        (got,) = torch.autograd.grad(root, losses)
        (want,) = torch.autograd.grad(losses.mean(), losses)
        assert torch.equal(got, want), b
        # two sums of b terms in [0, 1) in different orders: |Δ| <= 2 b ε mean (b ε each)
        eps = torch.finfo(dtype).eps
        value, mean = float(root.detach()), float(losses.detach().mean())
        assert abs(value - mean) <= 2 * b * eps * mean


def _uniform_pair(loss):
    from trainer.objective import Objective

    return Objective(loss, None, (), []), Objective(loss, UniformWeighting(), (), [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_scalar_and_vector_uniform_apply_the_same_per_sample_coefficients_over_a_window(
    dtype,
) -> None:
    """Over a window of several micro-batches (b samples of the window's N), scalar mode's root
    backpropagates to each loss exactly the coefficient vector-uniform mode passes as its
    weight and the per-sample instrument reads (``coefficients``): 1/N computed in the losses'
    dtype (float32 for float16/bfloat16 losses). Before, scalar mode took mean() × b/N and
    vector mode (1/b) × b/N: each rounds twice, differently (b = 3 of N = 9: a different last
    bit)."""
    from trainer.losses import CrossEntropy
    from trainer.objective import Window

    scalar, vector = _uniform_pair(CrossEntropy())
    wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    g = torch.Generator().manual_seed(0)
    for n in range(2, 80):
        for b in {1, 2, 3, 5, 7, n // 2 or 1, n - 1}:
            window = Window(samples=n, batches=-(-n // b))
            losses = torch.rand(b, generator=g).to(dtype).requires_grad_()
            y = torch.zeros(b, dtype=torch.long)
            (got,) = torch.autograd.grad(scalar.scalar_root(losses, None, y, window), losses)
            weights = vector.vector_weights(losses, losses, y, torch.arange(b), None, window)
            # (half losses: float32 coefficients, rounded to the losses' dtype by the backward)
            assert torch.equal(got, weights.to(dtype)), (n, b)
            assert torch.equal(weights, scalar.coefficients(losses, y, window)), (n, b)
            assert torch.equal(weights, torch.ones(b, dtype=wide) / n), (n, b)


@pytest.mark.parametrize("average", ["tokens", "sequences"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_scalar_and_vector_uniform_apply_the_same_per_token_coefficients_over_a_window(
    average, dtype
) -> None:
    """The same for per-token losses with padding: u / U, U the window's Σu, in both modes and
    in ``coefficients`` (before, vector mode took (u / Σu) × Σu / U: sequences of 6, 4 and 1
    tokens over windows of two micro-batches differed in the last bit)."""
    from trainer.losses import TokenCrossEntropy, units_dtype
    from trainer.objective import Window

    loss = TokenCrossEntropy(average=average)
    scalar, vector = _uniform_pair(loss)
    g = torch.Generator().manual_seed(0)
    for seed in range(40):
        b, t = 2 + seed % 5, 1 + seed % 7
        y = torch.randint(5, (2, b, t), generator=g)  # two micro-batches
        lengths = torch.randint(t + 1, (2, b), generator=g)
        y[torch.arange(t) >= lengths[..., None]] = -100
        total = sum(loss.units(part, torch.float64).sum() for part in y)
        window = Window(samples=2 * b, batches=2, units=total)
        for part in y:
            losses = torch.rand(b, t, generator=g).to(dtype).requires_grad_()
            units = loss.units(part, units_dtype(dtype))
            (got,) = torch.autograd.grad(scalar.scalar_root(losses, units, part, window), losses)
            weights = vector.vector_weights(losses, losses, part, torch.arange(b), units, window)
            # (half losses: float32 coefficients, rounded to the losses' dtype by the backward)
            assert torch.equal(got, weights.to(dtype)), seed
            assert torch.equal(weights, scalar.coefficients(losses, part, window)), seed
            want = units / total.to(units.dtype).clamp_min(torch.finfo(units.dtype).tiny)
            assert torch.equal(weights, want), seed


@pytest.mark.parametrize("normalize", ["sum", "none"])
def test_the_uniform_weighting_that_does_not_average_weighs_each_element_1(normalize) -> None:
    """Vector mode with the uniform weighting and ``normalize=sum`` or ``none``: the objective
    is the plain sum of the losses, each micro-batch's as given (no share of the window), so
    every weight is exactly 1 for per-sample losses and the unit weight u itself for per-token
    ones; only ``normalize=mean`` takes scalar mode's coefficients 1/N and u/U."""
    from trainer.losses import CrossEntropy, TokenCrossEntropy
    from trainer.objective import Objective, Window

    objective = Objective(CrossEntropy(), UniformWeighting(normalize=normalize), (), [])
    losses = torch.rand(5, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(5, dtype=torch.long)
    for window in (Window(5), Window(samples=15, batches=3)):
        weights = objective.vector_weights(losses, losses, y, torch.arange(5), None, window)
        assert torch.equal(weights, torch.ones(5)), window
    loss = TokenCrossEntropy()
    objective = Objective(loss, UniformWeighting(normalize=normalize), (), [])
    y = torch.tensor([[1, 2, -100], [3, -100, -100]])
    units = loss.units(y, torch.float32)
    for window in (Window(2, 1, units.sum().double()), Window(4, 2, 2 * units.sum().double())):
        losses = torch.rand(2, 3, generator=torch.Generator().manual_seed(1))
        weights = objective.vector_weights(losses, losses, y, torch.arange(2), units, window)
        assert torch.equal(weights, units), window


@pytest.mark.threads(2)  # (parallel kernels too: see conftest._one_thread)
@pytest.mark.parametrize(
    "shape", [("data.batch_size=7",), ("data=diabetes", "loss=mse", "data.batch_size=7")]
)
def test_scalar_and_vector_uniform_train_the_same_with_accumulation(tmp_path, shape) -> None:
    """Bit for bit over windows of three micro-batches of 7 (N = 21), where mean() × 7/21 and
    (1/7) × 7/21 round differently."""
    steps = ["trainer.max_steps=8", "optimizer=sgd", "trainer.accumulate_grad_batches=3",
             "instrument=none", *shape]  # fmt: skip
    train(tmp_path / "s", *steps, "loss.mode=scalar")
    train(tmp_path / "v", *steps, "loss.mode=vector", "weighting=uniform")
    a, b = final_params(tmp_path / "s"), final_params(tmp_path / "v")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_float16_losses_of_a_large_window_keep_their_coefficient_under_a_loss_scale() -> None:
    """1/N of a window past 16,384 samples is below float16's normal range: the coefficient is
    taken in float32 and the backward rounds c·scale to float16 once (a GradScaler's 2^14 here),
    within half an ulp; in float16 it lost up to 1.4e-3 (a reviewer's numbers)."""
    from trainer.losses import CrossEntropy
    from trainer.objective import Window

    scalar, _ = _uniform_pair(CrossEntropy())
    for n in (1000, 32000, 100_000):
        losses = torch.ones(n, dtype=torch.float16, requires_grad=True)
        root = scalar.scalar_root(losses, None, torch.zeros(n, dtype=torch.long), Window(n))
        (got,) = torch.autograd.grad(root * 2.0**14, losses)
        relative = (got.double() / 2.0**14 * n - 1).abs().max()
        assert relative <= 2.0**-11, n  # float16: half an ulp of c·scale
        # vector mode's weights alike (float32 1/N, scaled, then rounded once: a mutation
        # rounding them to float16 before the scale went unseen)
        losses = torch.ones(n, dtype=torch.float16, requires_grad=True)
        backward_vector(losses * 1, torch.full((n,), 1.0 / n), Times(2.0**14))
        relative = (losses.grad.double() / 2.0**14 * n - 1).abs().max()
        assert relative <= 2.0**-11, n


class Times:
    """A loss scaler's ``scale`` (what backward_vector calls): × ``factor``."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.factor


class WindowRecorder(GradRecorder):
    """The weights at the start of the run, each micro-batch, and each step's gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_fit_start(self, trainer) -> None:
        self.start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    def on_train_batch_start(self, trainer, batch) -> None:
        self.batches.append((batch.x.clone(), batch.y.clone()))


@pytest.mark.parametrize("sizes", [(32, 2), (20, 3)])
def test_accumulated_focal_weights_take_each_micro_batchs_share(tmp_path, sizes) -> None:
    """Vector mode, a non-uniform weighting (focal, normalize=mean), k micro-batches of B: the
    window's gradient is Σₘ (Bₘ/N) Σᵢ wₘᵢ ∇ℓₘᵢ with each micro-batch's weights normalized on
    their own (README, "Gradient accumulation"), against autograd per sample on a copy of the
    model. Without the share Bₘ/N (a mutation the suite missed) it was k times too large."""
    b, k = sizes
    rec = WindowRecorder()
    train(tmp_path, "loss.mode=vector", "weighting=focal", f"data.batch_size={b}",
          f"trainer.accumulate_grad_batches={k}", "trainer.max_steps=1", "optimizer=sgd",
          callbacks=[rec])  # fmt: skip
    from trainer.models.mlp import MLP

    model = MLP((1, 8, 8), 10).double()
    model.load_state_dict(rec.start)
    params = dict(model.named_parameters())
    n = sum(x.shape[0] for x, _ in rec.batches)
    assert len(rec.batches) == k and n == b * k
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for x, y in rec.batches:
        logits = model(x.double())
        losses = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        r = (1 - torch.softmax(logits.detach(), -1).gather(1, y[:, None]).squeeze(1)) ** 2.0
        w = r / r.sum() * (x.shape[0] / n)  # focal's default gamma, normalized, the share
        grads = torch.autograd.grad((w * losses).sum(), list(params.values()))
        for name, g in zip(params, grads, strict=True):
            total[name] += g
    # float32 against float64: each entry is a float32 sum over the n samples' terms, whose
    # rounding is at most about n·ε₃₂ of the largest entry (the mutation: a factor of k)
    for (name, ref), got in zip(total.items(), rec.grads[0], strict=True):
        bound = n * torch.finfo(torch.float32).eps * float(ref.abs().max())
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=bound, msg=name)


@pytest.mark.parametrize("path", ["scalar", "vector"])
def test_a_grad_scaler_scales_the_regularizers_gradient_with_the_datas(path) -> None:
    """Under float16's GradScaler both roots are scaled: the gradients are the unscaled
    ones times the scale, exactly (a power of 2). An unscaled regularizer's seed left λ∇R
    1/scale of its size after the unscale, while the data's gradient was right."""
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    w = torch.tensor([0.5, 0.25])
    grads = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=1024.0)):
        p.grad = None
        losses, reg = p * 3, 0.5 * (p * p).sum()
        if path == "vector":
            backward_vector(losses, w, scaler, reg=reg)
        else:
            backward_scalar(torch.dot(losses, w), scaler, reg=reg)
        grads.append(p.grad.clone())
    assert torch.equal(grads[0], 3 * w + p.detach())  # the analytic gradient: 3w + p
    assert torch.equal(grads[1], 1024 * grads[0])


def test_float32_weights_are_refused_for_float64_losses() -> None:
    """float32 is the one other dtype allowed, and only for float16/bfloat16 losses (their
    weights u / Σu are computed in float32): float64 losses' weights in float32 would be
    rounded to 24 bits without a word."""
    losses = torch.ones(3, dtype=torch.float64, requires_grad=True) * 2
    with pytest.raises(WeightError, match="dtype"):
        check_weights(losses, torch.ones(3, dtype=torch.float32))
    check_weights(losses.half(), torch.ones(3, dtype=torch.float32))  # allowed
    check_weights(losses.bfloat16(), torch.ones(3, dtype=torch.float32))


def test_a_hook_on_the_scalar_root_gets_a_fresh_seed_each_call() -> None:
    """The kept 1.0 seed is passed only where no tensor hook of the root sees it: a hook that
    scales its gradient in place (allowed on a fresh seed) would otherwise scale the kept one,
    and every later backward of that dtype and device with it."""
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    for _ in range(3):
        root = torch.dot(x, c)  # DotBackward0: a root the kept seed is used for
        root.register_hook(lambda g: g.mul_(3.0))
        backward_scalar(root)
        assert torch.equal(x.grad, 3.0 * c)  # d(3·x·c)/dx, exactly, every call
        x.grad = None
    plain = torch.dot(x, c)
    backward_scalar(plain)
    assert torch.equal(x.grad, c)
