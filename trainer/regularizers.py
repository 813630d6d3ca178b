"""Parameter regularizers as custom autograd Functions with hand-written backward passes.

Each Function is private and called through a public :class:`Regularizer`, which selects its
parameters by name pattern and multiplies by its coefficient. Every backward is written with
differentiable tensor ops, so the regularizers can be differentiated twice (``create_graph``);
tests run ``gradcheck`` and ``gradgradcheck`` on each in float64.

The gradient of each regularizer is also available analytically (:meth:`Regularizer.grad`),
without a backward pass, so the trainer can log ``grad_norm/reg`` and ``grad_norm/data``
(total gradient minus the regularizer's) on logging steps at the cost of a few vector ops.

:class:`InputGradPenalty` is the one regularizer of the inputs rather than the parameters:
λ · mean_i ‖∇_{x_i} ℓ‖², built on ``torch.autograd.grad(..., create_graph=True)`` ("double
backprop"), so its own gradient flows through a second-order graph of the network.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.autograd import Function
from torch.autograd.gradcheck import GradcheckError

from trainer.backward import once_differentiable_in
from trainer.callbacks import Stateful, few
from trainer.config import ContractError
from trainer.precision import fused_norms, is_long, long_norm, wide_dtype, widen
from trainer.rng import forked_rng

log = logging.getLogger(__name__)


def _kink_tolerant(fn: Callable[..., Tensor], copies: list[Tensor], names: list[str]) -> str:
    """The first element of ``copies`` (float64) where ``fn``'s backward is not confirmed,
    "" where it is on every element. A difference counts where it resolves the element's
    gradient, its roundoff 4|R|·ε/h within 0.1 % of it (or 1e-6; ε the value's dtype's, 2⁻⁵²
    for float64), and agrees within that,
    1e-3 of the gradient and 1e-9: the central one of step 1e-9 decides where it resolves
    (a one-sided pass overrode it: a forgotten smoothing); else the forward or backward one of
    step 1e-6 (one of them does not reach a kink within 1e-6) confirms, or a central one of
    1e-5, 1e-4 or 1e-3 (a smooth R whose |R| hides a small gradient from the finer steps: a
    correct Σexp(3p) was refused); an element no difference resolves (a huge |R| beside a small
    gradient) is not confirmed. Two to ten evaluations of R per element (at most 4,096): once,
    before training, for a regularizer of one's own whose gradcheck failed (0.3 s for an l1 of
    4,096 weights here, about 20 s for an orthogonal one)."""
    work = [c.detach().clone(memory_format=torch.contiguous_format).requires_grad_()
            for c in copies]  # fmt: skip
    value = fn(*work)
    grads = torch.autograd.grad(value, work, allow_unused=True)
    base = float(value.detach())  # (a float32 value: its own rounding, as _directional's)
    eps = torch.finfo(value.dtype).eps if value.is_floating_point() else 2**-52
    with torch.no_grad():
        for name, c, g in zip(names, work, grads, strict=True):
            flat, want = c.view(-1), (torch.zeros_like(c) if g is None else g).reshape(-1)
            for j in range(flat.numel()):
                a, old = float(want[j]), float(flat[j])

                def ends(h: float, flat: Tensor = flat, j: int = j, old: float = old):
                    flat[j] = old + h
                    up = float(fn(*work))
                    flat[j] = old - h
                    down = float(fn(*work))
                    flat[j] = old
                    return up, down

                def judge(d: float, h: float, a: float = a) -> bool | None:
                    """True/False where ``d`` resolves the gradient, None where not."""
                    noise = 4 * abs(base) * eps / h
                    if noise > 1e-3 * max(abs(a), abs(d)) + 1e-6:
                        return None
                    return abs(d - a) <= noise + 1e-3 * abs(a) + 1e-9

                up, down = ends(1e-9)
                central = (up - down) / 2e-9
                ok = judge(central, 1e-9)
                if ok is False:  # a kink within 1e-9 (a weight exactly at it): a backward
                    # taking one side's derivative (relu's p > 0 at 0) agrees with that side's
                    # difference of 1e-9 (it was refused, the central mean deciding: a probe's)
                    # (within its roundoff: a side's slope of 0 is not resolved relative to
                    # itself, but the central difference resolved the kink's other side)
                    # any slope between the two sides' is one (an asymmetric l1's 0 at 0,
                    # torch's convention for a relu/abs mix, was refused: a review's)
                    noise = 4 * abs(base) * eps / 1e-9
                    lo, hi = sorted([(up - base) / 1e-9, (base - down) / 1e-9])
                    slack = noise + 1e-3 * abs(a) + 1e-9
                    ok = lo - slack <= a <= hi + slack
                if ok is None:  # (not resolved at 1e-9: a kink's other side, or coarser)
                    up, down = ends(1e-6)
                    sides = [(up - base) / 1e-6, (base - down) / 1e-6]
                    ok = any(judge(d, 1e-6) for d in sides)
                    for h in (1e-5, 1e-4, 1e-3):
                        if ok:
                            break
                        up, down = ends(h)
                        ok = bool(judge((up - down) / (2 * h), h))
                if not ok:
                    at = list(map(int, torch.unravel_index(torch.tensor(j), c.shape)))
                    return (f"{name}{at} (at {old!r}, its backward {a:.6g}; the central "
                            f"difference of 1e-9 {central:.6g}; its value's rounding "
                            f"{abs(base) * eps:.3g})")  # fmt: skip
    return ""


#: relative agreement of a directional derivative with its finite difference, and the
#: resolution a difference must have to count (its roundoff within this of the derivative): a
#: central difference's truncation error is far smaller at the finer steps for any R smooth at
#: the scale of a parameter, and a backward off by 1e-4 is told apart (gradcheck's absolute
#: 1e-5 passed one 1.2x the true gradient where it was small; a resolution of 1e-3 let 1.0005x
#: through where |R| was 1,000 times the derivative: a probe's and a review's)
DIRECTIONAL_RTOL = 1e-6
DIRECTIONAL_RESOLUTION = 1e-5
DIRECTIONAL_STEPS = (1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


def _directional(
    fn: Callable[..., Tensor], copies: list[Tensor], gen: torch.Generator
) -> tuple[str, str]:
    """``fn``'s backward against finite differences of ``fn`` along random directions of all
    its parameters at once: any size, a few dozen evaluations of R (above 4,096 elements
    nothing but the comparison with ``GRADS`` checked the backward, and a backward 2x the
    gradient, ``GRADS`` alike, trained: a probe's). Each direction is of one sign (all ≥ 0,
    then all ≤ 0), so that a backward taking one side's derivative at a kink (relu's ``p > 0``
    at 0) agrees with that side's one-sided difference on every element at once; central ones
    agree with a backward taking their mean (sign(0) = 0).

    A difference's roundoff is measured, not assumed: second differences of R at steps too
    small to move it (1e-13 and 1e-12 of the parameters' size), which hold the evaluation's
    own rounding (a sum of a million terms; a value computed in float32 inside a
    float64 one, read as a derivative of 0 at the finer steps, and a correct backward
    refused: a review's). A difference counts where it resolves the derivative
    (:data:`DIRECTIONAL_RESOLUTION`).

    Returns ("", "") where along each direction some difference agrees with the backward
    within its roundoff and :data:`DIRECTIONAL_RTOL`; ("wrong", what) where, along a
    direction, no difference agrees and the central differences of the two finest steps that
    resolve it agree with each other ten times better than either with the backward (no side's
    derivative, nor their mean, is the backward's: wrong at the parameters; asked to agree
    within 1e-6, the differences of a million weights of an l1, moved apart a little by the
    weights a step crosses 0 at, let a backward of twice its gradient train with a warning, a
    review's); ("unresolved", what) otherwise (kinks or steep curvature within the steps, or
    R too large beside its gradient)."""
    work = [c.detach().clone(memory_format=torch.contiguous_format).requires_grad_()
            for c in copies]  # fmt: skip
    value = fn(*work)
    grads = torch.autograd.grad(value, work, allow_unused=True)
    grads = tuple(torch.zeros_like(c) if g is None else g for c, g in zip(work, grads, strict=True))
    base = float(value.detach())
    eps = torch.finfo(value.dtype).eps if value.is_floating_point() else 2**-52
    size = max(float(c.detach().abs().max()) for c in work) or 1.0
    verdict = ("", "")
    with torch.no_grad():
        for sign in (1.0, -1.0):
            v = [sign * torch.randn(c.shape, generator=gen, dtype=c.dtype).abs().to(c.device)
                 for c in work]  # fmt: skip
            auto = float(sum((g * d).sum() for g, d in zip(grads, v, strict=True)))
            reach = max(float(d.abs().max()) for d in v) or 1.0

            def at(h: float, v: list[Tensor] = v) -> float:
                return float(fn(*[c + h * d for c, d in zip(work, v, strict=True)]))

            # (second differences of one sign at steps too small to reach another kink:
            # neither a wrong backward nor a kink at the parameters, as an l1's weights at
            # 0, moves them; the backward's prediction did, and hid every finer step)
            # (up to 1e-10 of the size: a value rounded to float32 inside R moves nothing
            # at 1e-13, and its rounding was taken for float64's, a review's)
            rough = max(
                [abs(at(2 * t) - 2 * at(t) + base)
                 for t in (1e-13 * size / reach, 1e-11 * size / reach, 1e-10 * size / reach)]
                + [4 * abs(base) * eps]
            )  # fmt: skip
            agreed = ended = False
            # per step that resolves the derivative: the central, forward and backward
            # differences, each with its roundoff
            series: list[tuple[tuple[float, float], ...]] = []
            for h in DIRECTIONAL_STEPS:
                up, down = at(h), at(-h)
                noise = 4 * rough / h
                sides = (((up - down) / (2 * h), noise), ((up - base) / h, 2 * noise),
                         ((base - down) / h, 2 * noise))  # fmt: skip
                for d, n in sides:
                    scale = max(abs(d), abs(auto))
                    if n <= DIRECTIONAL_RESOLUTION * scale and abs(d - auto) <= (
                        n + DIRECTIONAL_RTOL * scale
                    ):  # fmt: skip
                        agreed = True
                if agreed:
                    break
                if 2 * noise <= DIRECTIONAL_RESOLUTION * max(abs(sides[0][0]), abs(auto)) and (
                    up != base or down != base
                ):  # (a value that did not move at all says nothing of the derivative)
                    if not ended:
                        series.append(sides)
                elif series:  # (steps 10 apart only: _richardson and _kinks_crossed take
                    ended = True  # neighbours as such)
            if agreed:
                continue
            shown = ", ".join(f"{s[0][0]:.9g}" for s in series[:5]) or "resolve nothing"
            what = (f"along a random direction of {'+' if sign > 0 else '-'}|N(0, 1)| entries "
                    f"its backward gives {auto:.9g}, the central differences {shown}")  # fmt: skip
            verdict = ("unresolved", what)
            # wrong where no side's derivative, nor their mean, can be the backward's: the
            # central differences stably off, and the one-sided ones too once their term in h
            # is taken out (steps 10 apart: (10 f(h) − f(10h)) / 9), which a backward taking
            # one side's derivative at weights exactly at a kink matches there, when weights
            # crowded near it moved the one-sided differences off it (a review's relu at 0)
            if (
                len(series) >= 3
                and _stably_off([s[0] for s in series], auto)
                and all(_stably_off(_richardson([s[k] for s in series]), auto) for k in (1, 2))
                and not _kinks_crossed(series[0], series[1], auto)
            ):
                return "wrong", what
    return verdict


def _kinks_crossed(
    fine: tuple[tuple[float, float], ...], coarse: tuple[tuple[float, float], ...], auto: float
) -> bool:
    """Whether the gap between the one-sided differences at a step and at the step 10 times
    it holds a kink's jump: a smooth R's gap is its curvature times the step, a kink's jump
    in slope is there whatever the step, so the gap's part that does not grow with it,
    (10·g(h) − g(10h)) / 9, is the jump (weights crowded within the finest step of kinks
    along differences of coordinates, a total variation's tied neighbours, kept every
    difference stably off a correct backward; and a jump beside a strong curvature was read
    as curvature: both refused, reviews'). A jump too small to move a difference by a tenth
    of how far off the backward is says nothing."""
    (_, na), (fa, _), (ba, _) = fine
    (_, nb), (fb, _), (bb, _) = coarse
    jump = max(abs(10 * abs(fa - ba) - abs(fb - bb)) / 9 - (40 * na + 4 * nb) / 9, 0.0)
    off = min(abs(fine[0][0] - auto), abs(coarse[0][0] - auto))
    return jump >= off / 10


def _richardson(diffs: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """One-sided differences at steps 10 apart, ``(value, roundoff)``, with their first-order
    term in the step taken out: (10·f(h) − f(10h)) / 9, roundoff alike."""
    return [((10 * a - b) / 9, (10 * na + nb) / 9)
            for (a, na), (b, nb) in zip(diffs, diffs[1:], strict=False)]  # fmt: skip


def _stably_off(diffs: list[tuple[float, float]], auto: float) -> bool:
    """Whether the two finest steps' differences of a series ``(value, roundoff)`` agree
    with each other ten times better than either with ``auto`` (and it is off by more than
    :data:`DIRECTIONAL_RTOL`): a derivative the backward is not. A series still moving at its
    finest steps (kinks nearer than them: weights crowded within 1e-8 of an l1's 0, which
    coarser steps all cross alike, looked stably off a correct backward) says nothing."""
    (a, na), (b, nb) = diffs[0], diffs[1]
    off = min(abs(a - auto), abs(b - auto))
    return off > 10 * (abs(a - b) + na + nb) and off > DIRECTIONAL_RTOL * abs(auto)


def _l2_grad(p: Tensor) -> Tensor:
    return p  # d(½‖p‖²)/dp


def _norms(params: tuple[Tensor, ...]) -> Tensor:
    """‖p‖₂ of each, stacked (float32 for float16/bfloat16; by rows where long on a CPU): in
    one fused call where all are dense float32/float16/bfloat16, what is left of the long
    ones after their rows' norms with the others (the step's L2 on the default MLP, one
    thread: 20 µs, 22 µs with each long weight normed on its own, 13 µs for torch's own
    per-tensor norms, which are up to 5e-5 off there; a review's)."""
    fused = fused_norms(params)
    if fused is not None:
        return torch.stack(fused)
    return torch.stack([long_norm(p) if is_long(p) else torch.linalg.vector_norm(
        p, dtype=wide_dtype(p.dtype)) for p in params])  # fmt: skip


def _l1_grad(p: Tensor) -> Tensor:
    return torch.sign(p)  # d‖p‖₁/dp, 0 at 0


def _orthogonal_grad(w: Tensor) -> Tensor:
    eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    return 4 * (w @ (w.mT @ w - eye))  # d‖WᵀW − I‖²_F/dW, (m, n)


class _L2(Function):
    """λ R(θ), R = ½ Σ_p ‖p‖²;  ∂/∂p = λ p.  Inputs: λ (a float), any number of tensors."""

    @staticmethod
    def forward(ctx, coef: float, *params: Tensor) -> Tensor:
        ctx.coef = coef
        ctx.save_for_backward(*params)
        # (float16/bfloat16 parameters' norms in float32: a float16 ‖p‖² is Inf past ‖p‖ = 256;
        # long ones on a CPU by rows: torch's own norm is 1e-5 low at 10⁶ elements there)
        norms = _norms(params)
        return norms.square_().sum().mul_(0.5 * coef)  # 0-d

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        scale = grad * ctx.coef  # one scalar kernel, then one per tensor
        return (None, *(_l2_grad(p) * scale for p in ctx.saved_tensors))


class _L1(Function):
    """λ R(θ), R = Σ_p ‖p‖₁;  ∂/∂p = λ sign(p), the subgradient 0 at 0."""

    @staticmethod
    def forward(ctx, coef: float, *params: Tensor) -> Tensor:
        ctx.coef = coef
        ctx.save_for_backward(*params)
        # (float16/bfloat16 parameters summed in float32: a float16 Σ|p| is Inf past 65504)
        sums = [p.abs().sum(dtype=wide_dtype(p.dtype)) for p in params]
        return torch.stack(sums).sum().mul_(coef)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        scale = grad * ctx.coef
        return (None, *(_l1_grad(p) * scale for p in ctx.saved_tensors))


class _Orthogonal(Function):
    """λ R(W), R = Σ_W ‖WᵀW − I‖²_F over 2-D W (m, n);  ∂/∂W = 4 λ W (WᵀW − I).

    Cost per W: two (n, m) x (m, n) products forward, one more backward.
    """

    @staticmethod
    def forward(ctx, coef: float, *weights: Tensor) -> Tensor:
        ctx.coef = coef
        ctx.save_for_backward(*weights)
        total = weights[0].new_zeros((), dtype=wide_dtype(weights[0].dtype))
        for w in weights:
            w = widen(w)  # (float16/bfloat16: the Gram matrix and its sum in float32)
            gram = w.mT @ w  # (n, n)
            total = (
                total
                + (gram - torch.eye(gram.shape[0], dtype=w.dtype, device=w.device)).pow(2).sum()
            )
        return total * coef

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        scale = grad * ctx.coef  # (float16/bfloat16: in float32, rounded once at the end)
        return (
            None,
            *((_orthogonal_grad(widen(w)) * scale).to(w.dtype) for w in ctx.saved_tensors),
        )


def l2(*params: Tensor, coef: float = 1.0) -> Tensor:
    """½ λ Σ‖p‖² through the custom Function."""
    return _L2.apply(coef, *params)


def l1(*params: Tensor, coef: float = 1.0) -> Tensor:
    """λ Σ‖p‖₁ through the custom Function."""
    return _L1.apply(coef, *params)


def orthogonal(*weights: Tensor, coef: float = 1.0) -> Tensor:
    """λ Σ‖WᵀW − I‖²_F over 2-D weights through the custom Function."""
    for w in weights:
        if w.ndim != 2:
            raise ValueError(
                f"orthogonal regularizer needs 2-D weights, got shape {tuple(w.shape)}"
            )
    return _Orthogonal.apply(coef, *weights)


#: a λ the checks of a regularizer of one's own use besides 1 and the run's λ (neither 0 nor
#: 1, where a Function leaving λ out agrees with λ times its GRADS and its value at 1)
CHECK_COEF = 0.3


#: the built-in regularizers' gradients (none writes its input)
_BUILT_IN_GRADS = (_l2_grad, _l1_grad, _orthogonal_grad)


class Regularizer(Stateful):
    """``coef * R(selected parameters)``.

    Args:
        name: the config name (``l2``, ``l1``, ``orthogonal``); logged as ``reg/<name>``.
        coef: λ >= 0.
        include: fnmatch patterns on parameter names (``named_parameters()``); a parameter is
            selected if it matches one of them ...
        exclude: ... none of these ...
        min_ndim: ... and has at least this many dimensions (2 leaves out biases and norm
            layers' scales).
        allow_unmatched: a pattern matching no parameter's name is an error (a typo) unless
            this is true (a preset shared by models that differ: ``exclude=["*norm*"]`` on
            one without norm layers); each such pattern is then named in a warning, each
            time the trainer selects. An empty selection is an error either way.
    """

    KINDS = {"l2": l2, "l1": l1, "orthogonal": orthogonal}
    GRADS = {"l2": _l2_grad, "l1": _l1_grad, "orthogonal": _orthogonal_grad}

    def __init__(
        self,
        name: str,
        coef: float,
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        min_ndim: int = 2,
        allow_unmatched: bool = False,
    ):
        if name not in self.KINDS:
            raise ValueError(
                f"regularizer: unknown {name!r}, expected one of {', '.join(self.KINDS)}"
            )
        if not coef >= 0:
            raise ValueError(f"regularizer.{name}.coef: got {coef}, must be >= 0")
        self.name, self.coef = name, coef
        self.include, self.exclude, self.min_ndim = list(include), list(exclude), min_ndim
        if not isinstance(allow_unmatched, bool):  # ("false" from YAML would be true)
            raise TypeError(
                f"regularizer.{name}.allow_unmatched: got {allow_unmatched!r}, expected "
                "true or false"
            )
        self.allow_unmatched = allow_unmatched
        #: the patterns that matched a parameter's name when selected before (one that loses
        #: its match mid-run is refused, allowed or not)
        self._matched: set[str] = set()
        self.fn = self.KINDS[name]
        self.grad_fn = self.GRADS[name]
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        self._frozen: list[tuple[str, nn.Parameter]] = []  # matched, not trainable (yet)
        self._zero = torch.zeros(())
        #: the module :meth:`bind` selected from (the trainer selects from it again when the
        #: trainable parameters change); None until bound
        self.bound_to: nn.Module | None = None

    def bind(self, model: nn.Module, *, empty_ok: bool = False) -> Regularizer:
        """Select the trainable parameters the patterns match. Patterns matching no parameter
        are an error naming them; matching only frozen ones (a layer to be unfrozen mid-run)
        select nothing for now: λR is 0 until the trainer selects again (``empty_ok``: after
        the trainable parameters changed, every matched layer frozen)."""
        # each parameter under every name it has (a tied weight's second name too: an
        # exclude naming it matched nothing, and the weight stayed regularized, a probe's)
        aliases: dict[int, list[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(n)
        every = [n for names in aliases.values() for n in names]

        def matches(p: Tensor, patterns: Sequence[str]) -> bool:
            return any(fnmatch.fnmatchcase(n, pat) for n in aliases[id(p)] for pat in patterns)

        for key, patterns in (("include", self.include), ("exclude", self.exclude)):
            unmatched = [pat for pat in patterns
                         if not any(fnmatch.fnmatchcase(n, pat) for n in every)]  # fmt: skip
            # (a typo next to a pattern that matches: ignored, unsaid, a probe's; in exclude,
            # the parameter meant to be left out stayed regularized: a weight_norm layer's
            # weight_g, named as the old API named it. Selected again mid-run, ``empty_ok``:
            # the names changed, prune's weight_orig, and the head meant to be left out was
            # regularized from there, a review's; a pattern that matched and lost its match
            # so is refused whatever allow_unmatched says, which is for a shared preset's
            # pattern naming other models' parameters, a review's)
            lost = [pat for pat in unmatched if empty_ok and pat in self._matched]
            if lost or (unmatched and not self.allow_unmatched):
                named = lost or unmatched
                since = (" since the model's parameters changed mid-run (renamed: prune's "
                         "weight_orig, a parametrization's original; removed)" if empty_ok
                         else "")  # fmt: skip
                allowed = ("" if lost else "; a pattern a shared preset names for other "
                           f"models is allowed with regularizer.{self.name}.allow_unmatched="
                           "true")  # fmt: skip
                raise ValueError(
                    f"regularizer.{self.name}.{key}: {named} "
                    f"match{'es' if len(named) == 1 else ''} no parameter of the model"
                    f"{since} (fnmatch patterns on named_parameters() names: {few(every)})"
                    f"{allowed}"
                )
            if unmatched:
                log.warning(
                    "regularizer.%s.%s: %s match%s no parameter of the model (fnmatch patterns "
                    "on named_parameters() names: %s); allowed: regularizer.%s.allow_unmatched"
                    "=true", self.name, key, unmatched, "es" if len(unmatched) == 1 else "",
                    few(every), self.name,
                )  # fmt: skip
            self._matched.update(pat for pat in patterns if pat not in unmatched)
        # (after the patterns' checks: a refused selection leaves the one before it)
        self.names, self.params = [], []
        self._frozen = []
        self.bound_to = model
        self._zero = torch.zeros((), device=next(model.parameters()).device)
        for n, p in model.named_parameters():
            if (
                p.ndim >= self.min_ndim
                and matches(p, self.include)
                and not matches(p, self.exclude)
                and not (self.name == "orthogonal" and p.ndim != 2)
            ):  # (orthogonality is defined here for matrices, not conv kernels)
                if p.is_complex() and self.name in ("l1", "orthogonal"):  # (written for real
                    raise ValueError(  # tensors: a complex value, and no backward, at step 1;
                        # a frozen one too: it would stop the run where a callback unfreezes it)
                        f"regularizer.{self.name}: {n} is complex ({p.dtype}), which "
                        f"{self.name} is not defined for here; leave it out with "
                        f"regularizer.{self.name}.exclude=[{n}] (l2 takes complex parameters)"
                    )
                if not p.requires_grad:
                    self._frozen.append((n, p))
                    continue
                self.names.append(n)
                self.params.append(p)
        if not self.params and not self._frozen and not empty_ok:
            kernels = [  # (the patterns match them: only their dimensions keep them out)
                f"{n} ({p.ndim}-D)" for n, p in model.named_parameters()
                if self.name == "orthogonal" and p.ndim > 2
                and matches(p, self.include) and not matches(p, self.exclude)
            ]  # fmt: skip
            thin = [  # (matched, kept out by min_ndim: the message said nothing matched)
                (n, p.ndim) for n, p in model.named_parameters()
                if p.ndim < self.min_ndim
                and matches(p, self.include) and not matches(p, self.exclude)
            ]  # fmt: skip
            why = ""
            if kernels:
                why = (f"; {few(kernels)} match, but orthogonal is defined here for 2-D weights "
                       "(matrices) only, not conv kernels")  # fmt: skip
            elif thin:
                why = (f"; {few([f'{n} ({d}-D)' for n, d in thin])} match, but min_ndim="
                       f"{self.min_ndim} leaves them out (regularizer.{self.name}.min_ndim="
                       f"{min(d for _, d in thin)} takes them)")  # fmt: skip
            raise ValueError(
                f"regularizer.{self.name}: no parameter matches include={self.include}, "
                f"exclude={self.exclude}, min_ndim={self.min_ndim}{why}"
            )
        return self

    def check_gradient(self) -> None:
        """For a regularizer of one's own (a subclass), once before training: its Function's
        backward against its ``grad()`` (``GRADS``, which ``grad_norm/data`` subtracts: a
        backward that disagrees trained on one gradient and reported another), and, where
        its selected parameters hold at most 4,096 elements, ``torch.autograd.gradcheck`` of
        the Function against finite differences; in float64, on copies. The frozen
        parameters its patterns match are checked too: a callback that unfreezes them makes
        the trainer select them, with no check then."""
        named = [*zip(self.names, self.params, strict=True), *self._frozen]
        if not named:
            return
        # on copies of the random states (a regularizer drawing random numbers moved the
        # run's: a probe's), as the other checks before training
        with forked_rng(named[0][1].device):
            self._check_gradient(named)

    def _check_gradient(self, named: Sequence[tuple[str, Tensor]]) -> None:
        names = [n for n, _ in named]
        copies = [p.detach().double().clone().requires_grad_() for _, p in named]
        # at λ = 1 (at λ = 0 both sides were 0 and any GRADS passed: a review), and at the
        # run's λ (a backward that ignores it)
        # and at CHECK_COEF, neither 0 nor 1: at a run's λ of 0 (a warm-up's start) or 1,
        # a Function leaving λ out of its backward or its forward passed, and at λ = 0 trained
        # on ∇R, or logged R, unsaid (a probe's)
        for coef in dict.fromkeys(c for c in (1.0, float(self.coef), CHECK_COEF) if c != 0.0):
            self._check_backward(names, copies, coef)
        with torch.no_grad():  # R a function of the parameters (a noisy one was refused as
            # a forward leaving λ out, a probe's)
            first, again = (float(self.fn(*copies, coef=1.0)) for _ in range(2))
        if first != again and not (math.isnan(first) and math.isnan(again)):
            raise ValueError(
                f"regularizer {self.name} ({type(self).__name__}): its value at the same "
                f"parameters was {first!r}, then {again!r}: a regularizer must be a function "
                "of the parameters alone (no random numbers, no state of its own), as its "
                "GRADS, the checks of its backward and grad_norm/reg take it"
            )
        self._check_value_scales(copies)
        # and at a random point: at the run's parameters R may be 0 (a zero-initialized
        # head, zero biases), where a forward leaving λ out, or a backward off by a factor,
        # agreed at every λ (a probe's); formulas against each other, no differences: R's
        # kinks do not matter; a point where R is not finite (a log barrier) is not checked
        draw = torch.Generator().manual_seed(0)
        elsewhere = [torch.randn(c.shape, generator=draw, dtype=c.dtype).to(c.device)
                     .requires_grad_() for c in copies]  # fmt: skip
        with torch.no_grad():
            finite = math.isfinite(float(self.fn(*elsewhere, coef=1.0)))
        if finite:
            self._check_value_scales(elsewhere)
            for coef in dict.fromkeys(c for c in (1.0, float(self.coef), CHECK_COEF) if c != 0.0):
                self._check_backward(names, elsewhere, coef)

        def fn(*ps: Tensor) -> Tensor:  # R itself (λ = 1): gradcheck's tolerances are
            # absolute, and λ R's gradient at an l1's λ = 1e-6 passed them whatever the
            # backward (a review: twice, none or the opposite, all accepted)
            return self.fn(*ps, coef=1.0)

        small = sum(c.numel() for c in copies) <= 4096
        if small:
            self._gradcheck(fn, copies, names)  # (element by element where it fails)
        # along random directions, at any size (a generator of its own, on the CPU: the
        # run's random states stay as they were)
        kind, what = _directional(fn, copies, torch.Generator().manual_seed(0))
        if kind == "wrong":
            raise ValueError(
                f"regularizer {self.name} ({type(self).__name__}): its Function's backward "
                f"disagrees with finite differences of its value ({what}; agreement within "
                f"{DIRECTIONAL_RTOL:g} relative is asked, and the differences agree with each "
                "other far better than with it): the backward, and GRADS alike, are not the "
                "gradient of R"
            )
        if kind == "unresolved" and not small:
            log.warning(
                "regularizer %s (%s): finite differences of its value along random "
                "directions neither confirm nor refute its Function's backward (%s: a kink or "
                "a steep curvature within a step of the parameters, or a value too large beside "
                "its gradient); trained with its backward unconfirmed",
                self.name, type(self).__name__, what,
            )  # fmt: skip

    def _gradcheck(self, fn: Callable[..., Tensor], copies: list[Tensor], names: list[str]) -> None:
        """``torch.autograd.gradcheck`` of R, and element by element where it fails."""
        try:
            torch.autograd.gradcheck(fn, tuple(copies))  # (its float64 defaults)
            # (its absolute tolerance, 1e-5, passed any backward of gradients below it: a
            # LayerScale's γ of 1e-6 whose backward was twice its gradient, a probe's): where
            # only that tolerance passed it, element by element
            if not torch.autograd.gradcheck(fn, tuple(copies), atol=0.0, raise_exception=False):
                wrong = _kink_tolerant(fn, copies, names)
                if wrong:
                    raise ValueError(
                        f"regularizer {self.name} ({type(self).__name__}): its Function's "
                        "backward passes torch.autograd.gradcheck only by its absolute "
                        f"tolerance (1e-5), and on {wrong} no difference that resolves the "
                        "gradient agrees with it"
                    )
        except GradcheckError as e:
            first = str(e).strip().splitlines()[0]
            # a correct backward fails where R has a kink (or a steep curvature) within
            # gradcheck's step, 1e-6, of the parameters: l1's |p| at a weight near 0 (a
            # pretrained one, or one an l1 run drove there). Element by element, the
            # difference on the kink's other side (forward or backward, step 1e-6) or a
            # central one of step 1e-9 (a steep curvature; where its roundoff resolves
            # the gradient to 0.1 %) agrees with a correct backward; a backward wrong at
            # the parameters (a dead zone forgotten, a factor) agrees with none.
            # (Retries at moved parameters, or a 1e-9 gradcheck with a tolerance that
            # grows with |R|, let wrong backwards through or refused correct ones: five
            # reviews.)
            wrong = _kink_tolerant(fn, copies, names)
            if wrong:
                raise ValueError(
                    f"regularizer {self.name} ({type(self).__name__}): its Function's "
                    f"backward fails torch.autograd.gradcheck ({first}), and on {wrong} "
                    "no difference that resolves the gradient agrees with it (a central "
                    "one of step 1e-9 where it resolves it, else one-sided ones of 1e-6 or "
                    "central ones of 1e-5 to 1e-3; where none resolves it, a value too large "
                    "beside the gradient or computed in float32, compute R in float64 or "
                    "leave that parameter out: exclude)"
                ) from e
            log.warning(
                "regularizer %s (%s): its Function's backward fails torch.autograd."
                "gradcheck with its step of 1e-6 (%s), and agrees with a one-sided "
                "difference or one of step 1e-9 on every element: the parameters sit "
                "within 1e-6 of a point where the regularizer is not differentiable (as "
                "|p| at 0) or curves steeply; trained with its backward",
                self.name, type(self).__name__, first,
            )  # fmt: skip

    def _check_value_scales(self, copies: list[Tensor]) -> None:
        """Its value at the run's λ, and at :data:`CHECK_COEF`, is λ times its value at 1
        (``reg/<name>`` logs it: a Function leaving λ out of its forward, its backward right,
        logged R for λR, 100× off at λ = 0.01: a review; at λ = 0, R for nothing added, a
        probe's)."""
        with torch.no_grad():
            value = self.fn(*copies, coef=1.0)
            one = float(value)
            ats = {c: float(self.fn(*copies, coef=c))
                   for c in dict.fromkeys((float(self.coef), CHECK_COEF)) if c != 1.0}  # fmt: skip
        # (within the value's own rounding: a float32 value, from a Function computing in
        # float32, was refused at 1e-9, a review's; and one computed in float32 and returned
        # in float64, at 0.3, a review's: float32's rounding at least. A λ left out is a
        # factor of 1/λ off)
        wide = value.dtype if value.is_floating_point() else torch.float32
        rel = 8 * max(torch.finfo(wide).eps, torch.finfo(torch.float32).eps)
        for coef, at in ats.items():
            if not math.isfinite(one) or math.isclose(at, coef * one, rel_tol=rel,
                                                      abs_tol=1e-300):  # fmt: skip
                continue
            raise ValueError(
                f"regularizer {self.name} ({type(self).__name__}): its value at λ = {coef:g} is "
                f"{at!r}, not λ times its value at λ = 1 ({coef * one!r}): reg/{self.name} "
                "logs the forward's value, which must include λ as the backward does"
            )

    def _check_backward(self, names: list[str], copies: list[Tensor], coef: float) -> None:
        """The Function's backward at ``coef`` against ``coef`` × its ``GRADS``."""
        value = self.fn(*copies, coef=coef)
        if not isinstance(value, Tensor) or value.ndim != 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"regularizer {self.name} ({type(self).__name__}): its function returned "
                f"{shape}, must be a 0-d tensor"
            )
        device = copies[0].device if copies else value.device
        if value.device != device or not torch.isfinite(value):  # (torch's "not on the
            # expected device", or a gradcheck failing on NaN differences, named neither,
            # a probe's)
            what = (f"on {value.device}, not on its parameters' {device}"
                    if value.device != device
                    else f"{float(value.detach())} at λ = {coef:g}")  # fmt: skip
            raise ValueError(
                f"regularizer {self.name} ({type(self).__name__}): its function's value is "
                f"{what}, checked at the run's parameters (copies in float64)"
            )
        if not value.requires_grad:  # (torch's "element 0 of tensors does not require grad"
            # named neither the regularizer nor the cause, a probe's)
            raise ValueError(
                f"regularizer {self.name} ({type(self).__name__}): its function's value does "
                "not depend on the parameters (no autograd graph: detached, or computed with "
                "no_grad or on .data); return the value of a torch.autograd.Function of them "
                "(Function.apply), whose backward gives GRADS"
            )
        auto = torch.autograd.grad(value, copies, allow_unused=True, retain_graph=True)
        # the backward times the gradient it is given: one returning λ∇R whatever it gets
        # agreed with GRADS at 1 and with every difference of R, and under a GradScaler
        # (whose scale is that gradient) trained without the regularizer, grad_norm/reg
        # reporting it (a probe's)
        upstream = torch.tensor(3.0, dtype=value.dtype, device=value.device)
        thrice = torch.autograd.grad(value, copies, upstream, allow_unused=True)
        for name, c, a, a3 in zip(names, copies, auto, thrice, strict=True):
            a = torch.zeros_like(c) if a is None else a
            version, before = c._version, c.detach().clone()
            b = coef * self.grad_fn(c.detach())
            if c._version != version or not torch.equal(c, before):  # (right values on these
                # copies; on the live weights, each logging step, which reads GRADS for
                # grad_norm/reg, replaced them, a probe's; through .data, whose version counter
                # is its own, unseen by the first, a review's. One writing a copy of its own
                # in place, p.float() of a float32 weight, is not seen here: grad() gives it
                # a copy of the weights)
                raise ValueError(
                    f"regularizer {self.name} ({type(self).__name__}): GRADS[{self.name!r}] "
                    f"writes its input in place (on {name}); the trainer calls it on the "
                    "live parameters on logging steps: return a new tensor (torch.tanh(p), "
                    "not p.tanh_())"
                )
            if not isinstance(b, Tensor) or b.shape != c.shape or b.dtype != c.dtype:
                got = (f"{b.dtype} of shape {tuple(b.shape)}" if isinstance(b, Tensor)
                       else type(b).__name__)  # fmt: skip
                raise ValueError(
                    f"regularizer {self.name} ({type(self).__name__}): GRADS[{self.name!r}] "
                    f"returned {got} for {name}, {c.dtype} of shape {tuple(c.shape)}: it must "
                    "keep its input's shape and dtype (checked in float64)"
                )
            for what, t in (("its backward", a), (f"GRADS[{self.name!r}]", b)):
                bad = (~torch.isfinite(t)).nonzero()
                if len(bad):  # (a NaN tolerance failed inside allclose, naming nothing)
                    where = ", ".join(str(int(i)) for i in bad[0])
                    raise ValueError(
                        f"regularizer {self.name} ({type(self).__name__}): {what} is not "
                        f"finite on {name}[{where}] (value {float(c.detach()[tuple(bad[0])]):.6g}, "
                        f"λ = {coef:g})"
                    )
            # float64 roundoff of two computations of the same sums, relative to their size
            tol = 1e-9 * float(a.abs().max().clamp_min(b.abs().max()).clamp_min(1e-30))
            if not torch.allclose(a, b, rtol=1e-7, atol=tol):
                raise ValueError(
                    f"regularizer {self.name} ({type(self).__name__}): its backward and "
                    f"GRADS[{self.name!r}] disagree on {name} at λ = {coef:g} (max "
                    f"|difference| {float((a - b).abs().max()):.3g}, of a gradient up to "
                    f"{float(b.abs().max()):.3g}): the step would train on one and "
                    "grad_norm/data report the other"
                )
            a3 = torch.zeros_like(c) if a3 is None else a3
            # (tells 3× from 1×, a backward that ignores its gradient: loose enough for one
            # computed in float32, whose rounding, 2⁻²³, failed a tolerance of 1e-7, a review's)
            tol = 1e-3 * float((3 * a).abs().max().clamp_min(a3.abs().max()).clamp_min(1e-30))
            if not torch.allclose(a3, 3 * a, rtol=1e-3, atol=tol):
                raise ValueError(
                    f"regularizer {self.name} ({type(self).__name__}): its Function's backward "
                    f"does not scale with the gradient it is given (on {name}, an incoming "
                    f"gradient of 3 gave up to {float(a3.abs().max()):.6g} for 3 × "
                    f"{float(a.abs().max()):.6g}): multiply what it returns by its grad_output "
                    "(a GradScaler's scale, and the step's backward, reach it there)"
                )

    def value(self) -> Tensor:
        """λ R(θ), 0-d, differentiable (twice); 0 while nothing it selects is trainable."""
        if not self.params:
            return self._zero
        return self.fn(*self.params, coef=self.coef)

    @torch.no_grad()
    def grad(self) -> list[Tensor]:
        """λ ∂R/∂p for each selected parameter, computed analytically (no backward pass); of a
        float16/bfloat16 parameter in float32, rounded once to its dtype as the Function's
        backward does (4W(WᵀW − I) of a float16 W overflowed before λ scaled it)."""
        own = self.grad_fn not in _BUILT_IN_GRADS  # (one's own GRADS gets a copy: one
        # writing its input in place past the check, through p.float() of a float32 weight,
        # itself, or p.data, doubled the live weights on each logging step, a review's)
        return [(self.coef * self.grad_fn(widen(p).clone() if own else widen(p))).to(p.dtype)
                for p in self.params]  # fmt: skip


class InputGradPenalty(Stateful):
    """λ · (1/B) Σ_i ‖∇_{x_i} L‖²,  L = Σ_j ℓ_j the batch's summed per-sample loss.

    "Double backprop" (Drucker & LeCun, 1992): the gradient of the loss with respect to each input
    is taken with ``create_graph=True``, so the penalty is itself differentiable in θ and joins
    the step's backward pass like any other regularizer. For a model that treats samples
    independently (no BatchNorm in training mode) ∇_{x_i} L = ∇_{x_i} ℓ_i, each sample's own
    input gradient; the losses are the unweighted per-sample losses in both loss modes.

    Args:
        name: logged as ``reg/<name>``.
        coef: λ >= 0.
    """

    def __init__(self, name: str = "input_grad_penalty", coef: float = 0.01):
        if not coef >= 0:
            raise ValueError(f"regularizer.{name}.coef: got {coef}, must be >= 0")
        self.name, self.coef = name, coef
        #: the first penalized step's graph was looked at for @once_differentiable Functions
        self._graph_checked = False

    def bind(self, model: nn.Module) -> InputGradPenalty:
        """Nothing to select: the penalty acts on the inputs (for symmetry with Regularizer)."""
        return self

    @staticmethod
    def prepare(x: Tensor) -> Tensor:
        """The input as a leaf that autograd differentiates with respect to."""
        if not x.is_floating_point():
            raise ContractError(
                f"input_grad_penalty needs floating-point inputs to differentiate, got {x.dtype}"
            )
        return x.detach().requires_grad_(True)

    def value(self, losses: Tensor, x: Tensor) -> Tensor:
        """λ · mean_i ‖∇_{x_i} Σ_j ℓ_j‖² (0-d, float32 or wider, differentiable in θ).

        Args:
            losses: (B,) per-sample losses computed from ``x`` (see :meth:`prepare`), or (B, T)
                per-token ones (Σ_j ℓ_j their sum; the mean over the B samples).
            x: (B, ...) the input leaf.

        Under float16 autocast the GradScaler's scale is applied to the whole objective (loss +
        penalty) by the caller, as for any loss: that scales the tangent that flows back through
        the double-backward graph. (Scaling the inner Σℓ instead and dividing g by the scale
        again would leave that tangent unscaled, and it underflowed in float16.)
        """
        if not x.requires_grad:
            raise ValueError("input_grad_penalty: the input does not require grad; use prepare(x)")
        if not self._graph_checked:  # (a walk of the graph: the first penalized step only)
            if once := once_differentiable_in([losses], [x]):  # (on the input's paths:
                # one off them, a straight-through rounding of a weight, is first order here)
                raise ContractError(
                    f"input_grad_penalty differentiates the model's backward, but "
                    f"{', '.join(once)} marks its backward @once_differentiable, which torch "
                    "does not differentiate: every path through it would be left out of the "
                    "penalty's gradient, silently (torch raises nothing there); give that "
                    "Function a backward made of differentiable ops (no @once_differentiable), "
                    "or remove the penalty"
                )
            self._graph_checked = True
        try:
            (g,) = torch.autograd.grad(losses.sum(), x, create_graph=True, allow_unused=True)
        except RuntimeError as e:
            if "use_reentrant=True" not in str(e):
                raise
            raise RuntimeError(  # (torch's words named neither the penalty nor the fix: the
                # user's code calls no .grad(), a probe's; curvature's are named so too)
                "input_grad_penalty: ∇ₓL needs torch.autograd.grad through the model, which "
                "torch.utils.checkpoint(..., use_reentrant=True) in its forward refuses; pass "
                "use_reentrant=False there (torch's recommended variant), or remove the penalty"
            ) from e
        if g is None:  # (torch: "appears to not have been used in the graph")
            raise ValueError(
                "input_grad_penalty: the loss does not depend on the input through autograd "
                "(the model's forward cuts the input off the graph, e.g. a frozen backbone run "
                "under torch.no_grad() or on x.detach()), so ∇ₓL cannot be taken; freeze such "
                "a backbone with requires_grad_(False) instead (∇ₓL then flows through it), or "
                "remove the penalty"
            )
        g = widen(g)  # (the mean over the samples: a per-token loss (B, T) has B, not B·T)
        return self.coef * g.pow(2).sum() / losses.shape[0]
