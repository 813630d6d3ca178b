"""Custom autograd Function regularizers: gradcheck, analytic gradients, their place in a step."""

from __future__ import annotations

import pytest
import torch
from conftest import read_scalars, train
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

from trainer.loop import Callback
from trainer.models.mlp import MLP
from trainer.regularizers import _L1, _L2, Regularizer, _Orthogonal


def inputs(*shapes: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        t = torch.randn(*shape, generator=g, dtype=torch.float64)
        t = t + 0.1 * torch.sign(t)  # keep L1 away from its kink at 0, where gradcheck's
        out.append(t.requires_grad_())  # finite differences would straddle it
    return tuple(out)


@pytest.mark.parametrize(
    ("fn", "shapes"),
    [
        (_L2, [(3, 4), (5,)]),
        (_L1, [(3, 4), (5,)]),
        (_Orthogonal, [(4, 3), (2, 2)]),
        (_Orthogonal, [(3, 5)]),
    ],
)
@pytest.mark.parametrize("coef", [1.0, 0.3])
def test_gradcheck_and_gradgradcheck(fn, shapes, coef) -> None:
    xs = inputs(*shapes)
    assert gradcheck(lambda *ps: fn.apply(coef, *ps), xs)
    assert gradgradcheck(lambda *ps: fn.apply(coef, *ps), xs)


def test_values_and_first_derivatives_match_their_formulas() -> None:
    (w,) = inputs((4, 3))
    torch.testing.assert_close(_L2.apply(0.3, w), 0.3 * 0.5 * (w**2).sum())
    torch.testing.assert_close(_L1.apply(0.3, w), 0.3 * w.abs().sum())
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(_Orthogonal.apply(0.3, w), 0.3 * ((w.T @ w - eye) ** 2).sum())
    (g,) = torch.autograd.grad(_Orthogonal.apply(0.3, w), w)
    torch.testing.assert_close(g, 0.3 * 4 * w @ (w.T @ w - eye))
    zero = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(_L1.apply(1.0, zero), zero)
    assert torch.equal(g, torch.zeros(3, dtype=torch.float64))  # subgradient 0 at 0


@pytest.mark.parametrize("name", ["l2", "l1", "orthogonal"])
def test_analytic_gradient_equals_autograd(name) -> None:
    model = MLP((6,), 3, hidden=[5, 4]).double()
    reg = Regularizer(name, coef=0.3).bind(model)
    grads = torch.autograd.grad(reg.value(), reg.params)
    for a, b in zip(reg.grad(), grads, strict=True):
        torch.testing.assert_close(a, b)


def test_parameter_selection_by_pattern_and_rank() -> None:
    model = MLP((6,), 3, hidden=[5, 4])
    assert Regularizer("l2", 1.0).bind(model).names == [
        "net.1.weight",
        "net.3.weight",
        "net.5.weight",
    ]
    only_last = Regularizer("l2", 1.0, include=["net.5.*"], min_ndim=0).bind(model)
    assert only_last.names == ["net.5.weight", "net.5.bias"]
    assert Regularizer("l1", 1.0, exclude=["net.1.*"]).bind(model).names == [
        "net.3.weight",
        "net.5.weight",
    ]
    # a pattern matching no parameter's name: named, also next to one that matches (a typo
    # there was ignored, a probe's)
    for include in (["encoder.*"], ["net.1.weight", "nte.*"]):
        with pytest.raises(ValueError, match=r"regularizer.l2.include: \['(encoder|nte)\.\*'\] "
                           r"matches no parameter of the model \(fnmatch patterns on "
                           r"named_parameters\(\) names: net.1.weight, "):  # fmt: skip
            Regularizer("l2", 1.0, include=include).bind(model)
    # matched, left out by min_ndim: said so (it read as no match, a probe's)
    with pytest.raises(ValueError, match=r"regularizer.l2: no parameter matches .*; net.5.bias "
                       r"\(1-D\) match, but min_ndim=2 leaves them out \(regularizer.l2."
                       r"min_ndim=1 takes them\)") as e:  # fmt: skip
        Regularizer("l2", 1.0, include=["net.5.bias"]).bind(model)
    assert "2-D weights" not in str(e.value)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"0.weight \(4-D\) match, but orthogonal is defined"):
        Regularizer("orthogonal", 1.0, include=["0.*"]).bind(conv)  # (a review's: the message
    # said no parameter matched, where the conv kernel did)
    with pytest.raises(ValueError, match=r"regularizer.l2.coef: got -1"):
        Regularizer("l2", -1.0)


class FirstGrads(Callback):
    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []
        self.names: list[str] = []

    def on_before_optimizer_step(self, trainer, optimizer) -> None:
        self.names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
        self.grads.append([p.grad.clone() for p in trainer.params])


STEP = ["trainer.max_steps=2", "logging.every_n_steps=1", "optimizer=sgd", "optimizer.lr=0.01"]


@pytest.mark.parametrize("mode", ["scalar", "vector"])
def test_regularizer_adds_its_analytic_gradient_once_per_step(tmp_path, mode) -> None:
    plain, reg = FirstGrads(), FirstGrads()
    train(tmp_path / "plain", *STEP, f"loss.mode={mode}", callbacks=[plain])
    train(tmp_path / "reg", *STEP, f"loss.mode={mode}", "regularizer=[l2]",
          "regularizer.l2.coef=0.5", "trainer.accumulate_grad_batches=2",
          "data.batch_size=32", callbacks=[reg])  # fmt: skip
    # step 1 starts from the same weights on the same 64 samples (as 2 x 32): the difference
    # of the gradients is d(0.5 * 0.5 * |W|^2)/dW = 0.5 W on weights, 0 on biases
    init = MLP((1, 8, 8), 10)
    torch.manual_seed(0)
    init = MLP((1, 8, 8), 10)
    for name, a, b, p in zip(
        plain.names, plain.grads[0], reg.grads[0], init.parameters(), strict=True
    ):
        expected = 0.5 * p.detach() if name.endswith("weight") else torch.zeros_like(p)
        torch.testing.assert_close(b - a, expected, rtol=1e-4, atol=1e-6)


def test_reg_values_and_split_norms_are_logged(tmp_path) -> None:
    train(tmp_path / "plain", *STEP)
    train(tmp_path / "reg", *STEP, "regularizer=[l2,l1]", "regularizer.l2.coef=0.5",
          "regularizer.l1.coef=0.01")  # fmt: skip
    plain, reg = read_scalars(tmp_path / "plain"), read_scalars(tmp_path / "reg")
    torch.manual_seed(0)
    init = MLP((1, 8, 8), 10)
    weights = [p.detach() for n, p in init.named_parameters() if n.endswith("weight")]
    l2 = 0.5 * 0.5 * sum(float((w**2).sum()) for w in weights)
    l1 = 0.01 * sum(float(w.abs().sum()) for w in weights)
    assert reg["reg/l2"][0] == (1, pytest.approx(l2, rel=1e-5))
    assert reg["reg/l1"][0] == (1, pytest.approx(l1, rel=1e-5))
    # at step 1 the data gradient is the unregularized run's whole gradient
    assert reg["grad_norm/data"][0][1] == pytest.approx(plain["grad_norm/total"][0][1], rel=1e-5)
    reg_grad = torch.cat([(0.5 * w + 0.01 * torch.sign(w)).flatten() for w in weights])
    assert reg["grad_norm/reg"][0][1] == pytest.approx(float(reg_grad.norm()), rel=1e-5)
    assert "reg/l2" not in plain and "grad_norm/data" not in plain


def _halve_first_weight(trainer) -> None:  # (a projection of one's own)
    with torch.no_grad():
        next(trainer.model.parameters()).mul_(0.5)


class HalveBeforeStep(Callback):
    def on_before_optimizer_step(self, trainer, optimizer) -> None:
        _halve_first_weight(trainer)


class HalveAfterBackward(Callback):
    def on_after_backward(self, trainer, batch, losses, weights) -> None:
        _halve_first_weight(trainer)


class HalveAfterStep(Callback):
    def on_train_step_end(self, trainer, out) -> None:
        _halve_first_weight(trainer)


@pytest.mark.parametrize("hook", [HalveAfterBackward, HalveBeforeStep, HalveAfterStep])
def test_split_norms_of_weights_changed_after_the_backward_are_nan_and_said(
    tmp_path, caplog, hook
) -> None:
    """grad_norm/data and /reg subtract the regularizers' analytic gradient at the weights as
    they are when logged: a weight halved after the backward (in on_before_optimizer_step)
    made it another weight's gradient (grad_norm/data 0.710 for a true 0.382, a probe's).
    They are NaN then, warned naming the parameter, and so is grad_agreement/data_reg where
    it is measured after the change (on_after_backward; the instruments' on_before_optimizer_step
    runs before one's own). A change after the update (on_train_step_end) is the next
    backward's weights: every value exact."""
    import logging
    import math

    seen: dict[int, list] = {}

    class Capture(Callback):  # (before one's own on_before_optimizer_step)
        def on_before_optimizer_step(self, trainer, optimizer) -> None:
            seen[trainer.global_step] = [
                (p.grad.detach().double().clone(), p.detach().double().clone(), n)
                for n, p in zip(trainer.param_names, trainer.params, strict=True)
            ]  # fmt: skip

    with caplog.at_level(logging.WARNING):
        train(tmp_path, *STEP, "trainer.max_steps=3", "logging.every_n_steps=1",
              "instrument.norms.agreement=true", "regularizer=[l2]",
              "regularizer.l2.coef=0.5", callbacks=[Capture(), hook()])  # fmt: skip
    s = read_scalars(tmp_path)
    said = [r.getMessage() for r in caplog.records if "grad_norm/data" in r.getMessage()]
    split = ("grad_norm/data", "grad_norm/reg")
    nan = {HalveAfterBackward: (*split, "grad_agreement/data_reg"), HalveBeforeStep: split,
           HalveAfterStep: ()}[hook]  # fmt: skip
    assert (len(said), "net.1.weight" in "".join(said)) == ((1, True) if nan else (0, False))

    def flat(tensors) -> torch.Tensor:
        return torch.cat([t.flatten() for t in tensors])

    for tag in ("grad_norm/data", "grad_norm/reg", "grad_agreement/data_reg"):
        assert [st for st, _ in s[tag]] == [1, 2, 3]
        for step, value in s[tag]:
            if tag in nan:
                assert math.isnan(value), (tag, step)
                continue
            reg = flat(0.5 * w if n.endswith("weight") else torch.zeros_like(w)
                       for _, w, n in seen[step])  # fmt: skip
            data = flat(g for g, _, _ in seen[step]) - reg
            cos = data @ reg / (data.norm() * reg.norm())
            expected = {"grad_norm/data": data.norm(), "grad_norm/reg": reg.norm(),
                        "grad_agreement/data_reg": cos}[tag]  # fmt: skip
            # float32 gradients, their norms and cosine: 1e-5 is far above their rounding and
            # far below the error (86 %)
            assert value == pytest.approx(float(expected), rel=1e-5), (tag, step)


class ThawLastLayerAfterBackward(Callback):
    """The last layer frozen from the start, trained again from step 2's backward on (thawed
    after that backward took λR without it)."""

    def on_fit_start(self, trainer) -> None:
        trainer.model.net[5].weight.requires_grad_(False)

    def on_after_backward(self, trainer, batch, losses, weights) -> None:
        if trainer.global_step == 1:  # (the number of steps taken: step 2's backward)
            trainer.model.net[5].weight.requires_grad_(True)


class AsksAfterTheStep(Callback):
    """Asks for the regularizers' gradients after the update, every step (nothing to say)."""

    def on_train_step_end(self, trainer, out) -> None:
        trainer.objective.reg_grads()


class HalveAtStep3(Callback):
    def on_before_optimizer_step(self, trainer, optimizer) -> None:
        if trainer.global_step == 3:
            _halve_first_weight(trainer)


def test_split_norms_count_what_the_backward_regularized(tmp_path, caplog) -> None:
    """A layer thawed after the backward took λR without it has no part in that step's
    regularizer gradient (grad_norm/reg was 5.63 for the backward's 3.21: its λθ counted, a
    review's). reg_grads() asked for after the update says nothing (it was NaN, with a
    warning blaming a projection that spent the one warning a real projection at step 3 then
    did not get: a review's); that projection is warned."""
    import logging
    import math

    seen: dict[int, list] = {}

    class Capture(Callback):
        def on_before_optimizer_step(self, trainer, optimizer) -> None:
            seen[trainer.global_step] = [p.detach().double().clone()
                                         for p in trainer.model.net.parameters()]  # fmt: skip

    with caplog.at_level(logging.WARNING):
        train(tmp_path, *STEP, "trainer.max_steps=3", "logging.every_n_steps=1",
              "regularizer=[l2]", "regularizer.l2.coef=0.5",
              callbacks=[Capture(), ThawLastLayerAfterBackward(), AsksAfterTheStep(),
                         HalveAtStep3()])  # fmt: skip
    s = read_scalars(tmp_path)
    # steps 1 and 2: λθ of net.1 and net.3's weights (net.5's frozen when λR was taken)
    for step, value in s["grad_norm/reg"][:2]:
        w1, _, w3, _, _, _ = seen[step]
        expected = 0.5 * torch.cat([w1.flatten(), w3.flatten()]).norm()
        # (a float32 norm of float32 products: 1e-5 far above its rounding)
        assert value == pytest.approx(float(expected), rel=1e-5), step
    assert math.isnan(s["grad_norm/reg"][2][1])  # step 3: projected after its backward
    said = [r.getMessage() for r in caplog.records if "grad_norm/data" in r.getMessage()]
    assert len(said) == 1 and "net.1.weight" in said[0] and "net.3.weight" not in said[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_l1_and_orthogonal_of_low_precision_parameters_are_summed_in_float32(dtype) -> None:
    """Σ|p| of 131072 ones is Inf in float16 and 131072 only by luck in bfloat16 (it logged
    reg/l1 Inf, or 3 digits); ‖WᵀW − I‖²_F below is Inf in float16. Both are now in float32,
    exact here; the gradients are those of the float32 formulas, rounded once to the
    parameters' dtype."""
    from trainer.regularizers import l1, orthogonal

    p = torch.full((131072,), -1.0, dtype=dtype, requires_grad=True)
    value = l1(p, coef=1.0)
    assert value.dtype == torch.float32 and value.item() == 131072.0
    value.backward()
    assert p.grad.dtype == dtype and torch.equal(p.grad, torch.full_like(p, -1.0))
    w = torch.full((512, 64), 0.125, dtype=dtype, requires_grad=True)
    value = orthogonal(w, coef=1.0)
    wide = torch.full((512, 64), 0.125, requires_grad=True)
    reference = orthogonal(wide, coef=1.0)  # the same float32 arithmetic
    # WᵀW = 8 everywhere: the diagonal's 64 entries of WᵀW − I are 7, the other 64·63 are 8,
    # so R = 261184 (Inf in float16), each sum exact in float32
    assert value.dtype == torch.float32 and value.item() == reference.item() == 261184.0
    value.backward()
    reference.backward()
    # 4 W (WᵀW − I) = 4 · 0.125 · (63 · 8 + 7) = 255.5 everywhere, in float32 and rounded once
    assert w.grad.dtype == dtype and torch.equal(w.grad, wide.grad.to(dtype))
    assert torch.equal(wide.grad, torch.full_like(wide, 255.5))


def test_l2_of_float16_parameters_is_summed_in_float32() -> None:
    """½ λ Σ ‖p‖² of 65536 float16 ones: ‖p‖² = 65536 is Inf in float16 (it logged reg/l2 Inf);
    in float32 it is exact, 0.5 · 1e-4 · 65536 up to float32's rounding of λ/2."""
    from trainer.regularizers import l2

    p = torch.ones(65536, dtype=torch.float16, requires_grad=True)
    value = l2(p, coef=1e-4)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(0.5 * 1e-4 * 65536, rel=2**-23)
    value.backward()
    assert torch.equal(p.grad, torch.full_like(p, 1e-4))  # λ p, as before


def test_the_analytic_gradient_of_a_float16_weight_does_not_overflow() -> None:
    """``Regularizer.grad`` (grad_norm/reg, grad_norm/data, grad_agreement/data_reg) took
    4W(WᵀW − I) in float16: Inf for a W of norm ~300 whose λ-scaled gradient is about 478, so
    both split norms logged Inf. Now in float32 and rounded once to float16, as the Function's
    backward gives it, bit for bit."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(64, 64, bias=False).half()
    with torch.no_grad():
        model.weight.copy_(torch.randn(64, 64, generator=g) * 5)
    for name in ("orthogonal", "l2", "l1"):
        reg = Regularizer(name, 1e-4).bind(model)
        (backward,) = torch.autograd.grad(reg.value(), reg.params)
        (analytic,) = reg.grad()
        assert analytic.dtype == torch.float16 and torch.isfinite(analytic).all(), name
        assert torch.equal(analytic, backward), name


def test_l2_of_a_long_tensor_on_a_cpu_is_summed_by_rows() -> None:
    """½ λ ‖p‖² of 2²⁰ ones after 64 entries of 4096: torch's CPU norm loses every 1 (one
    float32 running sum per lane, pytorch#169237), reg/l2 9.8e-4 low; by rows (see
    test_a_long_tensors_norm_on_a_cpu_is_taken_by_rows) within 2e-6 of the exact value."""
    from trainer.regularizers import l2

    p = torch.ones(1 << 20)
    p[:64] = 4096.0
    exact = 0.5 * (64 * 4096.0**2 + (p.numel() - 64))
    assert l2(p, coef=1.0).item() == pytest.approx(exact, rel=2e-6)


class _LogCosh(torch.autograd.Function):
    """Σ log cosh(p) over the parameters, with a hand-written backward (``scale`` 1: right;
    2: twice the true gradient, a wrong backward)."""

    scale = 1.0

    @staticmethod
    def forward(ctx, coef, *params):
        ctx.coef = coef
        ctx.save_for_backward(*params)
        return coef * sum(torch.log(torch.cosh(p)).sum() for p in params)

    @staticmethod
    def backward(ctx, g):
        return (None, *[g * ctx.coef * _LogCosh.scale * torch.tanh(p) for p in ctx.saved_tensors])


def _logcosh(*params, coef):
    return _LogCosh.apply(coef, *params)


class LogCosh(Regularizer):
    """A regularizer of one's own, as docs/gradients.md adds one: KINDS and GRADS extended."""

    KINDS = {**Regularizer.KINDS, "logcosh": _logcosh}
    GRADS = {**Regularizer.GRADS, "logcosh": torch.tanh}


class DetachedLogCosh(Regularizer):
    """Its function's value is detached from the parameters (computed on their .data)."""

    KINDS = {**Regularizer.KINDS,
             "logcosh": lambda *ps, coef: coef * sum(torch.log(torch.cosh(p.data)).sum()
                                                     for p in ps)}  # fmt: skip
    GRADS = {**Regularizer.GRADS, "logcosh": torch.tanh}


def test_a_regularizer_whose_value_is_detached_is_named() -> None:
    """torch's "element 0 of tensors does not require grad" named neither the regularizer nor
    the cause (a probe's)."""
    reg = DetachedLogCosh("logcosh", 0.01).bind(MLP((6,), 3, hidden=[5]))
    with pytest.raises(ValueError, match=r"regularizer logcosh \(DetachedLogCosh\): its "
                       r"function's value does not depend on the parameters"):  # fmt: skip
        reg.check_gradient()


def test_a_regularizer_whose_value_is_elsewhere_or_not_finite_is_named() -> None:
    """A value on another device got torch's "Tensor on device meta is not on the expected
    device cpu!", and a NaN value a gradcheck failure on NaN differences: neither named the
    regularizer or the cause (a probe's)."""
    model = MLP((6,), 3, hidden=[5])
    elsewhere = elementwise("meta", lambda p: (p * p).to("meta"), lambda p: 2 * p)
    with pytest.raises(ValueError, match=r"regularizer meta \(meta\): its function's value "
                       r"is on meta, not on its parameters' cpu"):  # fmt: skip
        elsewhere("meta", 0.01).bind(model).check_gradient()
    nan = elementwise("nan", lambda p: p * p * float("nan"), lambda p: 2 * p)
    with pytest.raises(ValueError, match=r"regularizer nan \(nan\): its function's value is "
                       r"nan at λ = "):  # fmt: skip
        nan("nan", 0.01).bind(model).check_gradient()


def test_a_regularizer_of_ones_own_from_the_config_is_logged_and_checked(tmp_path) -> None:
    """A user's Regularizer subclass is selected by a config entry with its _target_ (it was
    refused: "expected one of l2, l1, orthogonal, input_grad_penalty", a probe's finding);
    reg/logcosh and grad_norm/data are those of its function, computed here. A backward that
    disagrees with its GRADS (it trained on one gradient and reported the other in
    grad_norm/data) is refused before training."""
    seen = {}

    class Keep(Callback):  # the step's parameters and gradients, at step 1
        def on_before_optimizer_step(self, trainer, optimizer) -> None:
            if trainer.global_step == 1:
                seen["params"] = {
                    n: p.detach().clone() for n, p in trainer.model.named_parameters()
                }
                seen["grads"] = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}

    own = [f"+regularizer.logcosh._target_={__name__}.LogCosh", "+regularizer.logcosh.coef=0.01",
           "+regularizer.logcosh.include=[net.1.*]", "trainer.max_steps=1",
           "logging.every_n_steps=1", "optimizer=sgd"]  # fmt: skip
    train(tmp_path / "a", *own, callbacks=[Keep()])
    scalars = read_scalars(tmp_path / "a")
    w = seen["params"]["net.1.weight"].double()
    assert scalars["reg/logcosh"][0][1] == pytest.approx(
        float(0.01 * torch.log(torch.cosh(w)).sum()), rel=1e-6
    )
    data = {n: g.double() for n, g in seen["grads"].items()}
    data["net.1.weight"] = data["net.1.weight"] - 0.01 * torch.tanh(w)
    want = torch.sqrt(sum(g.pow(2).sum() for g in data.values()))
    assert scalars["grad_norm/data"][0][1] == pytest.approx(float(want), rel=1e-5)
    _LogCosh.scale = 2.0
    try:
        with pytest.raises(ValueError, match=r"regularizer logcosh \(LogCosh\): its backward and "
                           r"GRADS\['logcosh'\] disagree on net.1.weight"):  # fmt: skip
            train(tmp_path / "b", *own)
    finally:
        _LogCosh.scale = 1.0


def test_a_regularizer_of_ones_own_is_checked_on_layers_frozen_at_the_start() -> None:
    """Its check covers the frozen layers its patterns match: a callback that unfreezes one
    makes the trainer select it with no check then (a backward of twice its GRADS trained on
    one gradient and reported the other, a review's finding)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[1].requires_grad_(False)
    r = LogCosh("logcosh", coef=0.01, include=["1.*"]).bind(model)
    assert r.params == []
    r.check_gradient()  # the true backward: passes
    _LogCosh.scale = 2.0
    try:
        with pytest.raises(ValueError, match=r"disagree on 1.weight"):
            r.check_gradient()
    finally:
        _LogCosh.scale = 1.0


class LogCoshTwice(LogCosh):
    """Its GRADS agree with a backward of twice the true gradient: only finite differences
    tell."""

    GRADS = {**Regularizer.GRADS, "logcosh": lambda p: 2.0 * torch.tanh(p)}


def test_a_wrong_backward_its_grads_agree_with_fails_gradcheck(tmp_path) -> None:
    _LogCosh.scale = 2.0
    try:
        with pytest.raises(ValueError, match=r"its Function's backward fails "
                           r"torch.autograd.gradcheck"):  # fmt: skip
            train(
                tmp_path,
                f"+regularizer.logcosh._target_={__name__}.LogCoshTwice",
                "+regularizer.logcosh.coef=0.01",
                "+regularizer.logcosh.include=[net.5.*]",
                "trainer.max_steps=1",
            )  # fmt: skip (net.5.weight: 2,560 elements, checked)
    finally:
        _LogCosh.scale = 1.0


def test_a_regularizer_entry_that_is_not_one_is_named() -> None:
    from conftest import make_cfg

    from trainer.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"regularizer.mine._target_: .*Callback is not a "
                       r"trainer.regularizers.Regularizer subclass"):  # fmt: skip
        validate(make_cfg("+regularizer.mine._target_=trainer.loop.Callback"))
    with pytest.raises(ConfigError, match=r"KINDS and .GRADS must have an entry 'mine'"):
        validate(make_cfg(f"+regularizer.mine._target_={__name__}.LogCosh",
                          "+regularizer.mine.coef=0.1"))  # fmt: skip
    # a function without its analytic gradient (KINDS alone) is not a regularizer either
    with pytest.raises(ConfigError, match=r"KINDS and .GRADS must have an entry 'logcosh'"):
        validate(make_cfg(f"+regularizer.logcosh._target_={__name__}.KindOnly",
                          "+regularizer.logcosh.coef=0.1"))  # fmt: skip


class KindOnly(Regularizer):
    KINDS = {**Regularizer.KINDS, "logcosh": _logcosh}


class VectorValued(Regularizer):
    """Its function returns one value per parameter, not their sum."""

    KINDS = {**Regularizer.KINDS, "vec": lambda *ps, coef: torch.stack([p.sum() for p in ps])}
    GRADS = {**Regularizer.GRADS, "vec": torch.ones_like}


def test_a_regularizer_value_that_is_not_0d_is_named(tmp_path) -> None:
    """A (2,) value failed inside torch's backward ("grad can be implicitly created only for
    scalar outputs") or at the first log (a probe's finding): named before training."""
    with pytest.raises(ValueError, match=r"regularizer vec \(VectorValued\): its function "
                       r"returned \(2,\), must be a 0-d tensor"):  # fmt: skip
        train(tmp_path, f"+regularizer.vec._target_={__name__}.VectorValued",
              "+regularizer.vec.coef=0.1", "+regularizer.vec.min_ndim=1",
              "+regularizer.vec.include=[net.5.*]", "trainer.max_steps=1")  # fmt: skip


class LogCosh32(LogCosh):
    """Its GRADS in float32 whatever the input (fine in training, which widens to float32)."""

    GRADS = {**Regularizer.GRADS, "logcosh": lambda p: torch.tanh(p.float())}


def test_a_regularizers_grads_of_another_dtype_and_a_boolean_coef_are_named(tmp_path) -> None:
    """The float64 check crashed on a float32 GRADS with torch's "Double did not match Float";
    coef=true passed as 1 (a review's findings)."""
    from conftest import make_cfg

    from trainer.config import ConfigError, validate

    with pytest.raises(ValueError, match=r"GRADS\['logcosh'\] returned torch.float32 .* must "
                       r"keep its input's shape and dtype"):  # fmt: skip
        train(tmp_path, f"+regularizer.logcosh._target_={__name__}.LogCosh32",
              "+regularizer.logcosh.coef=0.01", "trainer.max_steps=1")  # fmt: skip
    with pytest.raises(ConfigError, match=r"regularizer.logcosh.coef: got True"):
        validate(make_cfg(f"+regularizer.logcosh._target_={__name__}.LogCosh",
                          "+regularizer.logcosh.coef=true"))  # fmt: skip


def test_l1_and_orthogonal_refuse_a_complex_parameter_naming_it() -> None:
    """They are written for real tensors: a complex weight made their value complex and the
    first step failed in torch's backward, naming neither (a probe's finding)."""
    model = torch.nn.Linear(4, 4)
    model.register_parameter("w", torch.nn.Parameter(torch.randn(4, 4, dtype=torch.complex64)))
    for name in ("l1", "orthogonal"):
        with pytest.raises(ValueError, match=rf"regularizer.{name}: w is complex"):
            Regularizer(name, 0.1).bind(model)
    assert Regularizer("l2", 0.1).bind(model).names == ["weight", "w"]
    model.w.requires_grad_(False)  # (refused at the start, not where a callback unfreezes it)
    with pytest.raises(ValueError, match=r"regularizer.l1: w is complex"):
        Regularizer("l1", 0.1).bind(model)


class MyL1(Regularizer):
    """The built-in l1 under a name of one's own (so its gradient is checked)."""

    KINDS = {**Regularizer.KINDS, "myl1": Regularizer.KINDS["l1"]}
    GRADS = {**Regularizer.GRADS, "myl1": Regularizer.GRADS["l1"]}


#: what the test regularizers below read when called (a test sets, then puts back)
KNOB = {"width": 0.01, "K": 1000.0, "factor": 2.0}


def elementwise(name: str, value, backward) -> type[Regularizer]:
    """A regularizer of one's own, as docs/gradients.md adds one: Σ value(p) through a custom
    Function whose hand-written backward is backward(p), and ``GRADS`` agreeing with it (so
    only gradcheck and the element check can tell a wrong one)."""

    class Elementwise(torch.autograd.Function):
        @staticmethod
        def forward(ctx, coef, *params):
            ctx.coef = coef
            ctx.save_for_backward(*params)
            return coef * sum(value(p).sum() for p in params)

        @staticmethod
        def backward(ctx, g):
            return (None, *[g * ctx.coef * backward(p) for p in ctx.saved_tensors])

    return type(name, (Regularizer,), {
        "KINDS": {**Regularizer.KINDS, name: lambda *ps, coef: Elementwise.apply(coef, *ps)},
        "GRADS": {**Regularizer.GRADS, name: backward},
    })  # fmt: skip


def _grid(p):
    return p - 1e-3 * torch.round(p / 1e-3)


#: Σ relu(|p| − width) with a backward that forgets the dead zone (sign(p) everywhere)
DeadZone = elementwise("deadzone", lambda p: torch.relu(p.abs() - KNOB["width"]), torch.sign)
#: Σ |p − q·round(p/q)|, q = 1e-3 (a pull towards a grid), with its correct backward
Quantize = elementwise("quantize", lambda p: _grid(p).abs(), lambda p: torch.sign(_grid(p)))
#: Σ √(p² + c²), c = 3e-6 (a smooth l1, steeply curved near 0), with its backward
Charbonnier = elementwise("charb", lambda p: torch.sqrt(p * p + 9e-12),
                          lambda p: p / torch.sqrt(p * p + 9e-12))  # fmt: skip
#: Σ (p²/2 + K) with a backward of ``factor`` · p (1: right)
Offset = elementwise("offset", lambda p: p * p / 2 + KNOB["K"], lambda p: KNOB["factor"] * p)
#: λ Σ|p| with a backward of ``factor`` times its gradient
L1Twice = elementwise("l1x2", torch.abs, lambda p: KNOB["factor"] * torch.sign(p))
#: Σ √(p² + c²), c = 1e-9, with a backward of sign(p): the smoothing forgotten
SmoothedForgotten = elementwise("sm", lambda p: torch.sqrt(p * p + 1e-18), torch.sign)


def test_wrong_backwards_are_refused_at_a_small_coefficient_and_beside_a_large_constant():
    """gradcheck ran on λR, whose gradient at an l1's λ = 1e-6 is below its absolute
    tolerance, 1e-5, whatever the backward; and the retry's tolerance, |R|'s roundoff over
    a step of 1e-9, grew with a constant in R past the gradient itself: wrong backwards
    (twice, none, the opposite; 5 % off at weights of size 10) were accepted (reviews).
    Checked on R, element by element with one-sided differences, whose roundoff is small.
    An l1 of 4,096 weights of size 2, one near 0, is accepted (refused by a 1 % gate)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 24))
    with pytest.raises(ValueError, match=r"l1x2 \(l1x2\): its Function's backward fails"):
        L1Twice("l1x2", coef=1e-6).bind(model).check_gradient()
    big = nn.Sequential(nn.Linear(64, 64))  # (an l1 of 4,096 weights of size ~2, one near 0:
    with torch.no_grad():  # its retry resolves the gradient, accepted; refused at a 1 % gate)
        big[0].weight.normal_(0, 2, generator=torch.Generator().manual_seed(0))
        big[0].weight[0, 0] = 3e-7
    MyL1("myl1", coef=0.1).bind(big).check_gradient()
    with torch.no_grad():  # (weights of size ~10: an l1 whose backward is 5 % off, accepted
        big[0].weight.mul_(5)  # by a 1e-9 retry whose tolerance grew with |R|: a review)
    KNOB["factor"] = 1.05
    try:
        with pytest.raises(ValueError, match=r"l1x2 \(l1x2\): .* no difference that resolves"):
            L1Twice("l1x2", coef=0.1).bind(big).check_gradient()
    finally:
        KNOB["factor"] = 2.0
    for factor in (2.0, 0.0, -1.0):
        KNOB["factor"] = factor
        try:
            with pytest.raises(ValueError, match=r"fails torch.autograd.gradcheck .*, and on "
                               r"0.weight\[\d+, \d+\] .* no difference that resolves"):  # fmt: skip
                Offset("offset", coef=0.1).bind(model).check_gradient()
        finally:
            KNOB["factor"] = 2.0


def test_a_correct_backward_at_a_kink_is_accepted_and_a_wrong_one_refused(caplog) -> None:
    """gradcheck's finite differences (step 1e-6) straddle |p|'s kink at a weight of 1e-7, so
    a correct l1 of one's own was refused ("its Function's backward fails gradcheck"), and so
    were a pull towards a grid with a weight near it and a steeply curved smooth l1. With a
    one-sided difference (or a central one of step 1e-9) they pass, so they train, warned,
    also with many weights within 1e-5 of 0, as an l1 run leaves them; a backward wrong at
    the parameters (a dead zone forgotten, of width 0.01 or 1e-4, a weight 3e-6 inside its
    edge) fails there too and is refused.
    (Retrying at moved parameters let dead zones through or refused correct ones, three
    ways: reviews.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 24))
    with torch.no_grad():
        model[0].weight[4:] = torch.linspace(-1.1e-5, 1.1e-5, 60).reshape(20, 3)  # (near 0)
        model[0].weight[0, 0] = 1e-7
        model[0].weight[1, 0] = 5e-5  # (inside either dead zone)
        model[0].weight[2, 0] = 2e-3 + 3e-7  # (by the grid)
        model[0].weight[3, 0] = 1e-4 - 3e-6  # (3 steps inside the narrow dead zone's edge)
    for regularizer in (MyL1("myl1", coef=0.1), Quantize("quantize", coef=0.1),
                        Charbonnier("charb", coef=0.1)):  # fmt: skip
        caplog.clear()
        regularizer.bind(model).check_gradient()
        said = [r.getMessage() for r in caplog.records if "one-sided" in r.getMessage()]
        assert len(said) == 1 and "not differentiable" in said[0], type(regularizer)
    refused = r"fails torch.autograd.gradcheck .*, and on .* no difference that resolves"
    for width in (0.01, 1e-4):
        KNOB["width"] = width
        try:
            with pytest.raises(ValueError, match=refused):
                DeadZone("deadzone", coef=0.1).bind(model).check_gradient()
        finally:
            KNOB["width"] = 0.01
    _LogCosh.scale = 2.0
    try:
        with pytest.raises(ValueError, match=refused):
            LogCoshTwice("logcosh", coef=0.01).bind(model).check_gradient()
    finally:
        _LogCosh.scale = 1.0


def test_the_element_check_lets_a_resolving_central_difference_decide_and_takes_any_layout():
    """At a weight of 1e-9 a smoothing forgotten in the backward (1 for the true 0.707) agreed
    with the forward difference of 1e-6 and was accepted; the central difference of 1e-9,
    which resolves it, decides now (a review). A channels-last weight (strides of its own) made
    the element check's view fail; it checks a contiguous copy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8))
    with torch.no_grad():
        model[0].weight[0, 0] = 1e-9
    with pytest.raises(ValueError, match=r"0.weight\[0, 0\] \(at [\d.e-]+, its backward 1;"):
        SmoothedForgotten("sm", coef=0.1).bind(model).check_gradient()
    conv = nn.Sequential(nn.Conv2d(3, 4, 3)).to(memory_format=torch.channels_last)
    with torch.no_grad():
        conv[0].weight[0, 0, 0, 0] = 1e-7
    MyL1("myl1", coef=0.1).bind(conv).check_gradient()  # (accepted: a kink, warned)


def test_a_smooth_regularizer_whose_value_hides_small_gradients_is_confirmed_coarser() -> None:
    """Σexp(3p) over 16 × 16 weights of N(0, 1), |R| ≈ 2.5e4: gradcheck's roundoff at 1e-6
    passes its tolerance on small gradients, and neither the central difference of 1e-9 nor
    the one-sided ones of 1e-6 resolve them: a correct backward was refused (a review). A
    central difference of 1e-5 to 1e-3 resolves them: accepted; 5 % off, refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    with torch.no_grad():
        model[0].weight.normal_()
        model[0].weight[0, 0] = 1e-7
    for factor, right in ((1.0, True), (1.05, False)):
        KNOB["factor"] = factor
        try:
            exp3 = elementwise("exp3", lambda p: torch.exp(3 * p),
                               lambda p: KNOB["factor"] * 3 * torch.exp(3 * p))  # fmt: skip
            if right:
                exp3("exp3", coef=0.1).bind(model).check_gradient()
            else:
                with pytest.raises(ValueError, match=r"no difference that resolves"):
                    exp3("exp3", coef=0.1).bind(model).check_gradient()
        finally:
            KNOB["factor"] = 2.0


class _NoCoefForward(torch.autograd.Function):
    """Σ p²/2 whose forward leaves λ out and whose backward has it: trains on λp, logs R."""

    @staticmethod
    def forward(ctx, coef, *params):
        ctx.coef = coef
        ctx.save_for_backward(*params)
        return sum((p * p / 2).sum() for p in params)

    @staticmethod
    def backward(ctx, g):
        return (None, *[g * ctx.coef * p for p in ctx.saved_tensors])


NoCoef = type("NoCoef", (Regularizer,), {
    "KINDS": {**Regularizer.KINDS, "nocoef": lambda *ps, coef: _NoCoefForward.apply(coef, *ps)},
    "GRADS": {**Regularizer.GRADS, "nocoef": lambda p: p},
})  # fmt: skip
#: Σ p² with a backward of 2p²/p: NaN at a weight of exactly 0 (GRADS the same)
NaNAtZero = elementwise("nanat0", lambda p: p * p, lambda p: 2 * p * p / p)
#: Σ p²/2 with a right backward and a GRADS 5 % off
OffGrads = type("OffGrads", (Offset,), {
    "GRADS": {**Regularizer.GRADS, "offset": lambda p: 1.05 * p},
})  # fmt: skip


def test_the_check_compares_at_lambda_1_names_a_non_finite_backward_and_checks_the_value():
    """Three holes of the check before training (a review): a backward and GRADS compared at
    the run's λ passed anything at λ = 0 (an annealed λ starting there), and grad_norm/data
    then subtracted a wrong GRADS; a NaN backward failed with torch's "atol must be greater
    than or equal to zero, but got nan", naming nothing; a forward leaving λ out (its
    backward right) passed, and reg/<name> logged R for λR, 100× off at λ = 0.01."""
    model = nn.Sequential(nn.Linear(5, 6))
    KNOB["factor"] = 1.0
    try:
        with pytest.raises(ValueError, match=r"offset \(OffGrads\): its backward and "
                           r"GRADS\['offset'\] disagree on 0.weight at λ = 1"):  # fmt: skip
            OffGrads("offset", coef=0.0).bind(model).check_gradient()
        Offset("offset", coef=0.0).bind(model).check_gradient()  # (right: accepted)
    finally:
        KNOB["factor"] = 2.0
    with torch.no_grad():
        model[0].weight[0, 0] = 0.0
    with pytest.raises(ValueError, match=r"nanat0 \(nanat0\): its backward is not finite on "
                       r"0.weight\[0, 0\] \(value 0"):  # fmt: skip
        NaNAtZero("nanat0", coef=0.01).bind(model).check_gradient()
    with pytest.raises(ValueError, match=r"nocoef \(NoCoef\): its value at λ = 0.01 is .*, "
                       r"not λ times its value at λ = 1"):  # fmt: skip
        NoCoef("nocoef", coef=0.01).bind(model).check_gradient()


def test_orthogonal_selects_only_matrices_and_its_value_is_the_formula() -> None:
    """orthogonal is defined over 2-D weights: a conv kernel (3-D here) passes min_ndim=2 but
    is left out (selected, the Function refused it: a conv model's first step failed). Its
    value is λ Σ‖WᵀW − I‖²_F of the linear weight alone (float64 brute force)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(6, 4)).double()
    reg = Regularizer("orthogonal", 0.25).bind(model)
    assert reg.names == ["2.weight"]
    w = model[2].weight.detach()
    want = 0.25 * sum(
        (sum(w[k, i] * w[k, j] for k in range(4)) - float(i == j)) ** 2
        for i in range(6) for j in range(6)
    )  # fmt: skip
    torch.testing.assert_close(reg.value().detach(), want, rtol=1e-12, atol=0)


class LogCoshScaled(LogCosh):
    """GRADS agree with the backward, ``_LogCosh.scale`` times the true gradient."""

    GRADS = {**Regularizer.GRADS, "logcosh": lambda p: _LogCosh.scale * torch.tanh(p)}


#: Σ p²/2560 (a mean over a 10 × 256 layer: gradients below 1e-4) with a backward of
#: ``factor`` times its gradient
MeanSquare = elementwise("meansq", lambda p: p * p / 2560,
                         lambda p: KNOB["factor"] * 2 * p / 2560)  # fmt: skip
#: Σ relu(p) with torch's own convention at 0 (p > 0), and Σ|p| with +1 at 0: one side's
#: derivative at a kink
ReluOwn = elementwise("reluown", torch.relu, lambda p: (p > 0).to(p.dtype))
AbsRight = elementwise("absright", torch.abs, lambda p: torch.where(p >= 0, 1.0, -1.0).to(p.dtype))


@pytest.mark.parametrize("factor", [2.0, 1.2, 1.001])
def test_wrong_backwards_are_refused_at_any_size_and_any_gradient_scale(factor) -> None:
    """Above 4,096 elements nothing but GRADS checked the backward: one 2x the gradient,
    GRADS alike, trained on the default MLP (84k weights); and gradcheck's absolute
    tolerance, 1e-5, passed a backward 1.2x the gradient of a mean, whose gradients are
    below 1e-4 (a probe's). Finite differences along random directions of all the
    parameters, agreement asked within 1e-6 relative, refuse both, and 1.001x; the right
    backwards pass."""
    torch.manual_seed(0)
    big, small = MLP((1, 8, 8), 10), nn.Sequential(nn.Linear(256, 10))
    refused = r"disagrees with finite differences of its value|no difference that resolves"
    KNOB["factor"] = factor
    _LogCosh.scale = factor
    try:
        with pytest.raises(ValueError, match=refused):
            LogCoshScaled("logcosh", coef=0.01).bind(big).check_gradient()
        with pytest.raises(ValueError, match=refused):
            MeanSquare("meansq", coef=0.1).bind(small).check_gradient()
        KNOB["factor"] = 1.0
        _LogCosh.scale = 1.0
        LogCosh("logcosh", coef=0.01).bind(big).check_gradient()
        MeanSquare("meansq", coef=0.1).bind(small).check_gradient()
        MyL1("myl1", coef=0.1).bind(big).check_gradient()  # (|p|: no weight at its kink)
    finally:
        KNOB["factor"] = 2.0
        _LogCosh.scale = 1.0


def test_a_backward_taking_one_sides_derivative_at_a_kink_is_accepted(caplog) -> None:
    """relu's p > 0 and |p|'s +1 at weights exactly 0 are one side's derivative there: the
    central difference of 1e-9 (their mean) decided and refused them (a probe's); that side's
    difference of 1e-9 agrees, in the element check and along one-signed directions of all
    the weights at once. Trained, warned; at 84k weights too. A backward wrong at such a
    weight (relu's derivative 2 for p ≥ 0) is refused by the element check, and at 84k
    weights, half of them at the kink, refused or warned of (never unsaid)."""
    small, big = nn.Sequential(nn.Linear(3, 24)), MLP((1, 8, 8), 10)
    with torch.no_grad():
        for model in (small, big):
            for p in model.parameters():
                p[: p.shape[0] // 2].zero_()  # (half of each tensor exactly 0)
    for regularizer in (ReluOwn, AbsRight):
        for model in (small, big):
            regularizer(regularizer.__name__, coef=0.1).bind(model).check_gradient()
    wrong = elementwise("relu2", torch.relu, lambda p: 2 * (p >= 0).to(p.dtype))
    with pytest.raises(ValueError):  # (the element check: each weight)
        wrong("relu2", coef=0.1).bind(small).check_gradient()
    # (half the weights at the kink: the directions cannot tell their jump from an error)
    assert _refused_or_warned(wrong("relu2", coef=0.1).bind(big), caplog)


def test_a_regularizer_drawing_random_numbers_is_named_as_such_and_moves_no_state() -> None:
    """A value with noise was refused as "not λ times its value at λ = 1", blaming λ, and
    its draws moved the run's generator (a probe's): named as random, the states as they
    were."""
    noisy = elementwise("noisy", lambda p: p * p * (1 + 1e-3 * torch.randn(())), lambda p: 2 * p)
    torch.manual_seed(0)
    regularizer = noisy("noisy", coef=0.1).bind(nn.Sequential(nn.Linear(3, 4)))
    before = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"its value at the same parameters was .*, then .*: "
                       r"a regularizer must be a function of the parameters alone"):  # fmt: skip
        regularizer.check_gradient()
    assert torch.equal(torch.get_rng_state(), before)


def _refused_or_warned(regularizer: Regularizer, caplog) -> bool:
    """Whether the check refuses ``regularizer``'s backward or warns that nothing confirmed it."""
    caplog.clear()
    try:
        with caplog.at_level("WARNING"):
            regularizer.check_gradient()
    except ValueError:
        return True
    return "neither confirm nor refute" in caplog.text


def _million(crowded: bool = False) -> nn.Module:
    """A 1000 × 1000 weight of N(0, 0.02); ``crowded``: 30 % of it exactly 0 and 30 % within
    1e-8 of 0 (an l1 run's)."""
    model = nn.Sequential(nn.Linear(1000, 1000, bias=False))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = model[0].weight.view(-1)
        w.copy_(torch.randn(w.shape, generator=g) * 0.02)
        if crowded:
            n = w.numel() * 3 // 10
            w[:n] = 0
            w[n : 2 * n] = torch.randn(n, generator=g) * 1e-8
    return model


#: Σ p² / 2 computed in float32 (its value float32), with its float64 backward
Float32Square = elementwise("f32sq", lambda p: p.float() ** 2 / 2, lambda p: p)


def test_the_directional_check_at_a_million_weights(caplog) -> None:
    """A review's cases at a million weights. Refused: an l1's backward of twice its
    gradient (the differences, moved apart a little by the weights a step crosses 0 at, were
    asked to agree within 1e-6: trained with a warning), and a backward
    1.0005x a quadratic's whose constant makes |R| 1,000 times its derivative (a resolution
    of 1e-3 accepted it, silently). Accepted: an l1 and relu's p > 0 on weights crowded at 0
    (exactly, and within 1e-8), and a value computed in float32 (read as a derivative of 0 at
    the finer steps: refused). A dead zone forgotten: refused or warned."""
    refused = r"disagrees with finite differences of its value"
    plain, crowded = _million(), _million(crowded=True)
    KNOB.update(factor=2.0, width=1e-3)
    try:
        with pytest.raises(ValueError, match=refused):
            L1Twice("l1x2", coef=0.1).bind(plain).check_gradient()
        # (4 % of the weights in the dead zone, its edges crossed by the resolving steps:
        # refused, or trained with the warning that nothing confirmed it; never unsaid)
        assert _refused_or_warned(DeadZone("deadzone", coef=0.1).bind(plain), caplog)
        KNOB.update(factor=1.0005, K=0.0108)
        with pytest.raises(ValueError, match=refused):
            Offset("offset", coef=0.1).bind(plain).check_gradient()
        KNOB["factor"] = 1.0
        Offset("offset", coef=0.1).bind(plain).check_gradient()
    finally:
        KNOB.update(factor=2.0, width=0.01, K=1000.0)
    for regularizer in (MyL1("myl1", coef=0.1), ReluOwn("reluown", coef=0.1)):
        regularizer.bind(crowded).check_gradient()
    Float32Square("f32sq", coef=0.1).bind(plain).check_gradient()


class _TotalVariation(torch.autograd.Function):
    """Σ|w[i+1] − w[i]| over a weight's entries in order (a fused lasso), its backward by hand."""

    @staticmethod
    def forward(ctx, coef, w):
        ctx.coef = coef
        ctx.save_for_backward(w)
        f = w.reshape(-1)
        return coef * (f[1:] - f[:-1]).abs().sum()

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return None, g * ctx.coef * _tv_grad(w)


def _tv_grad(w):
    f = w.reshape(-1)
    s = torch.sign(f[1:] - f[:-1])
    out = torch.zeros_like(f)
    out[1:] += s
    out[:-1] -= s
    return out.view_as(w)


class TotalVariation(Regularizer):
    KINDS = {**Regularizer.KINDS, "tv": lambda w, coef: _TotalVariation.apply(coef, w)}
    GRADS = {**Regularizer.GRADS, "tv": _tv_grad}


def test_a_total_variation_with_neighbours_crowded_at_its_kinks_is_not_refused(caplog) -> None:
    """Kinks along differences of coordinates, which no one-signed direction keeps on one
    side: with 30 % of a million weights tied to their neighbours and 30 % within 1e-9 of
    them, every step crossed them alike and the differences sat stably off the correct
    backward: refused (a review's). The one-sided differences' gap, a jump in slope the same
    at every step, tells kinks from curvature: trained, with the warning that nothing
    confirmed it."""
    model = _million()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        w = model[0].weight.view(-1)
        k = w.numel() * 3 // 10
        w[1:k] = w[0]
        w[k : 2 * k] = 1e-9 * torch.randn(k, generator=g)
    with caplog.at_level("WARNING"):
        TotalVariation("tv", coef=0.1).bind(model).check_gradient()
    assert "neither confirm nor refute" in caplog.text


#: 2·relu(p) + relu(−p), an asymmetric l1, with torch's convention at 0 (a slope of 0 there,
#: between its sides' −1 and 2)
AsymmetricL1 = elementwise("asym", lambda p: 2 * torch.relu(p) + torch.relu(-p),
                           lambda p: 2.0 * (p > 0).to(p.dtype) - (p < 0).to(p.dtype))  # fmt: skip
#: Σ (p − 100.25)² / 2 computed in float32 and returned in float64, with its backward
PullFloat32 = elementwise("pull32", lambda p: ((p.float() - 100.25) ** 2 / 2).to(p.dtype),
                          lambda p: p - 100.25)  # fmt: skip
#: relu(p) + |p| + 1e6 (p − 0.01)², strongly curved beside its kink, with its backward
KinkCurved = elementwise(
    "kc", lambda p: torch.relu(p) + p.abs() + 1e6 * (p - 0.01) ** 2,
    lambda p: (p > 0).to(p.dtype) + torch.sign(p) + 2e6 * (p - 0.01),
)  # fmt: skip


class _Quartic32(torch.autograd.Function):
    """λ Σ p⁴/4 computed in float32 and returned so, from float64 parameters; backward λ p³."""

    @staticmethod
    def forward(ctx, coef, *params):
        ctx.coef = coef
        ctx.save_for_backward(*params)
        return coef * sum((p.float() ** 4).sum() / 4 for p in params)

    @staticmethod
    def backward(ctx, g):
        return (None, *[(g * ctx.coef * p**3).to(p.dtype) for p in ctx.saved_tensors])


Quartic32 = type("Quartic32", (Regularizer,), {
    "KINDS": {**Regularizer.KINDS, "q32": lambda *ps, coef: _Quartic32.apply(coef, *ps)},
    "GRADS": {**Regularizer.GRADS, "q32": lambda p: p**3},
})  # fmt: skip


def test_a_float32_value_on_a_small_model_is_refused_saying_to_compute_in_float64() -> None:
    """On 4,096 weights or fewer every element's gradient must be confirmed by a difference
    that resolves it: a value computed and returned in float32 resolves none at 0.1 % (its
    rounding, 1e-7 of |R|, over steps up to 1e-3), and a correct Σp⁴/4 so was refused with
    "no difference that resolves the gradient agrees", which read as a wrong backward (a
    probe's). Leaving such elements to the random directions let sign flips through (a
    review's): it is still refused, naming the value's rounding and saying to compute R in
    float64, which is accepted."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"its value's rounding [0-9.e-]+\) no difference .*"
                       r"computed in float32, compute R in float64"):  # fmt: skip
        Quartic32("q32", coef=0.1).bind(model).check_gradient()
    Quartic64 = elementwise("q64", lambda p: p**4 / 4, lambda p: p**3)
    Quartic64("q64", coef=0.1).bind(model).check_gradient()


def test_correct_backwards_a_review_found_refused_are_not(caplog) -> None:
    """A third review's false refusals, each a correct backward: a slope between the sides'
    at a weight exactly at a kink (torch's own for a relu/abs mix: only either side's slope
    or their mean was taken), a value rounded to float32 inside R on weights near 100 (its
    rounding, unseen at 1e-13 of their size, was taken for float64's, and the finer steps,
    where it did not move, for a derivative of 0), and a kink beside a strong curvature (its
    jump read as curvature). Trained: warned where nothing confirms them."""
    small = nn.Sequential(nn.Linear(30, 30))
    with torch.no_grad():
        small[0].weight[0, 0] = 0.0
    AsymmetricL1("asym", coef=0.1).bind(small).check_gradient()
    near = nn.Sequential(nn.Linear(100, 100))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in near.parameters():
            p.copy_((100.25 + 0.01 * torch.randn(p.shape, generator=g)).float())
    PullFloat32("pull32", coef=0.1).bind(near).check_gradient()
    curved = nn.Sequential(nn.Linear(100, 100))
    with torch.no_grad():
        for p in curved.parameters():
            p.copy_(0.01 + 1e-3 * torch.randn(p.shape, generator=g))
        curved[0].weight[0, 0] = 0.0
    KinkCurved("kc", coef=0.1).bind(curved).check_gradient()
