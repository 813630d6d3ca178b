"""Hessian curvature of the training loss: Hessian-vector products, Lanczos, Hutchinson.

The Hessian H of a loss L(θ) is never formed. Its product with a vector v comes from two reverse
passes: first ∇L with ``create_graph=True`` (a graph of the gradient itself), then the gradient of
⟨∇L, v⟩, which is Hv (Pearlmutter's trick; ``torch.autograd.grad(grads, params, v)``). On top:

* :func:`top_eigenvalue`: the Lanczos method. It converges to the eigenvalue of largest
  magnitude (for a non-convex loss that can be a negative one; its sign is kept) from the
  Krylov space of a random start, the extreme Ritz values of a small tridiagonal matrix.
* :func:`hutchinson_trace`: tr(H) = E[zᵀHz] for Rademacher z (entries ±1), averaged over probes;
  its variance is 2(‖H‖²_F − Σᵢ Hᵢᵢ²) / probes.

Random vectors come from a caller-owned ``torch.Generator``: the run's global random state is
never touched, so measuring does not change the batch order, dropout masks or the trajectory.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import numbers
import operator
import re
import types
import weakref
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from trainer.backward import double_backward_kernels, explain_freed_graph, once_differentiable_in
from trainer.callbacks import Callback, Every, few
from trainer.config import ContractError
from trainer.distributed import all_reduce_sum
from trainer.instrument.norms import norms_of
from trainer.instrument.swap import (
    MODULE_TABLES,
    Attributes,
    attributes_kept,
    buffer_values_kept,
    call_with,
    same_contents,
)
from trainer.precision import widen
from trainer.rng import Fork, forked_rng

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from trainer.data.base import Batch
    from trainer.loop import Trainer


def _integer(key: str, value: Any, least: int) -> int:
    """``value`` as an int (NumPy's and torch's integers too; not a bool), at least ``least``."""
    try:
        if isinstance(value, bool) or (
            isinstance(value, torch.Tensor) and (value.dtype == torch.bool or value.ndim)
        ):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ContractError(f"{key}: got {value!r}, an integer >= {least}") from None
    if number < least:
        raise ValueError(f"{key}: got {number}, must be >= {least}")
    return number


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """⟨a, b⟩ over lists of tensors, in float32 at least (float16/bfloat16 parameters: their
    products in float32, summed in float32, as the norms are taken)."""
    return torch.stack([(widen(x) * widen(y)).sum() for x, y in zip(a, b, strict=True)]).sum()


def hvp(grads: Sequence[Tensor], params: Sequence[Tensor], v: Sequence[Tensor]) -> list[Tensor]:
    """Hv for the Hessian of the loss whose gradients ``grads`` (wrt ``params``) were taken
    with ``create_graph=True``. The graph is kept for further products.

    A gradient that does not depend on θ contributes zero rows. Gradients that all carry no
    graph are an error: they were taken without ``create_graph=True`` (for a loss truly linear
    in θ, H = 0 and there is nothing to multiply).
    """
    pairs = [(g, u) for g, u in zip(grads, v, strict=True) if g.requires_grad]
    if not pairs:
        raise ValueError(
            "hvp: none of the gradients carries an autograd graph; take them with "
            "torch.autograd.grad(loss, params, create_graph=True) (if the loss is linear in the "
            "parameters, its Hessian is 0)"
        )
    outputs, vectors = zip(*pairs, strict=True)
    with explain_freed_graph():
        return list(
            torch.autograd.grad(
                outputs, params, grad_outputs=vectors, retain_graph=True, materialize_grads=True
            )
        )


class _NoDerivative(Exception):
    """An op of the model whose backward has no derivative (torch raises a RuntimeError, or for
    a @once_differentiable Function nothing): the curvature is NaN, said."""


#: torch's errors for an op whose backward has no derivative formula (one of torch's: CTC's;
#: a ``torch.library.custom_op`` whose backward calls an op with none, a review's)
_NO_DERIVATIVE = re.compile(
    r"derivative for \S+ is not implemented|but no autograd formula was registered"
)


def _randn_like(p: Tensor, generator: torch.Generator) -> Tensor:
    return torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)


def _rademacher_like(p: Tensor, generator: torch.Generator) -> Tensor:
    bits = torch.randint(0, 2, p.shape, generator=generator, device=p.device)
    return bits.to(p.dtype).mul_(2).sub_(1)


def _ritz(alphas: list[float], betas: list[float]) -> tuple[float, float, float, float]:
    """The extreme Ritz values of the Lanczos tridiagonal T of ``alphas`` (its diagonal) and
    ``betas[:-1]`` (beside it), each with its residual ‖Hy − θy‖ = ``betas[-1]``·|sₖ| (y its
    Ritz vector, sₖ the last entry of T's unit eigenvector): (θ_min, r_min, θ_max, r_max).
    (The α's and β's are of order 1: :func:`lanczos` scales the products.)"""
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if len(alphas) > 1:
        off = torch.tensor(betas[:-1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(t)
    last = vectors[-1].abs() * abs(betas[-1])
    return float(values[0]), float(last[0]), float(values[-1]), float(last[-1])


def _power_of_two_below(m: Tensor) -> Tensor:
    """The largest power of two at most ``m`` (0-d, on its device), 1 where ``m`` is 0 or not
    finite: dividing by it is exact."""
    ok = torch.isfinite(m) & (m > 0)
    return torch.where(ok, torch.exp2(torch.floor(torch.log2(torch.where(ok, m, 1)))), 1)


def _made(device: torch.device, state: Tensor) -> torch.Generator:
    """A generator on ``device`` with a checkpoint's ``state``; one that does not fit is
    refused naming it (torch's error says only the size it expected)."""
    made = torch.Generator(device=device)
    try:
        made.set_state(state)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"curvature: the checkpoint's probe generator state does not fit a {device.type} "
            f"generator of this torch ({e})"
        ) from e
    return made


def lanczos(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    generator: torch.Generator,
    iters: int = 50,
    tol: float = 1e-3,
    product: Callable[[list[Tensor]], list[Tensor]] | None = None,
) -> tuple[Tensor, int, bool]:
    """The Hessian's eigenvalue of largest magnitude (for a non-convex loss, a negative one
    where that dominates; its sign is kept) by the Lanczos method: (the estimate, 0-d; the
    Hessian-vector products taken; whether it converged).

    From a random unit vector v₁, each product Hvₖ is made orthogonal to vₖ and vₖ₋₁ (the
    three-term recurrence, βₖvₖ₊₁ = Hvₖ − αₖvₖ − βₖ₋₁vₖ₋₁): after k products, the eigenvalues
    of the k × k tridiagonal T of the α's and β's (the Ritz values) are H's best estimates from
    the Krylov space span(v₁, Hv₁, …, Hᵏ⁻¹v₁), which holds power iteration's k-th iterate: the
    estimate of largest magnitude is at least as close as power iteration's, most often far
    closer (on the default MLP, 5e-6 relative after 24–29 products where power iteration's
    was 0.3–1.3 % off), and an eigenvalue alone above a large cluster is seen after 2 products
    (power iteration stopped at the cluster's value, half of it). Three vectors of the
    parameters' size are kept (no reorthogonalization against older ones: in floating point
    the recurrence loses orthogonality only as Ritz values converge, and the extreme ones stay
    within the spectrum (Paige)). The products are divided by a power of two taken from the
    first one (exact), so that the norms' squares neither underflow nor overflow (float32 ones
    did for a Hessian near 1e-22 or 1e19: a converged 6.5× low, a NaN; a review's).

    Stops after ``iters`` products, or earlier once (1) the Ritz value θ of largest magnitude
    changed by at most ``tol`` relative to itself since the previous product, (2) its residual
    ‖Hy − θy‖ = βₖ·|sₖ| (y its Ritz vector, sₖ the last entry of T's eigenvector) is at most
    ``tol``·|θ|, which puts an eigenvalue of H within ``tol``·|θ| of θ, and (3) the Ritz value
    θ' at the other end of the spectrum meets (1) and (2) too (with the same bound, ``tol``·|θ|)
    or is short of |θ| by 10 times its residual r' (|θ'| + 10·r' ≤ |θ|): converged. Without (3)
    an eigenvalue of 0.99 alone converged while a dense end at −1 was still short of it (−0.963,
    r' = 0.027), and 0.99 was called converged, the wrong sign (a review's). The factor 10 is a
    margin, not a bound: r' bounds the distance from θ' to some eigenvalue, not to the end of
    the spectrum; where the other end is within it, both ends must settle (on the default MLP at
    initialization, whose most negative eigenvalue is −0.8 of the top, a bound of |θ|/2 in place
    of the margin left 1 start of 4 unconverged at 50 products). Where βₖ falls to rounding (a
    Krylov space H maps into itself, as for H = cI after one product), the Ritz values are H's
    own: converged. The rules stop on the largest magnitude the Krylov space has seen: like any
    method from a random start, it cannot see a direction its start and the products barely
    reach, and a cluster the rules see settled can hide an eigenvalue beyond it (reviews': −1.01
    beyond a cluster at −0.95 while +1 converged, +1.0 reported in 3 of 100 starts at ``tol``
    1e-3, 2 at 1e-4, none at 1e-6; 1.05 above a cluster at 1.0, 1.0 reported in 2 of 5 starts at
    1e-3, none at 1e-4). The products are computed in the parameters' dtype, so no ``tol`` makes
    the estimate closer than that dtype's rounding of Hv (with bfloat16 parameters, 1.6e-3
    relative was seen at ``tol`` = 1e-5; with float16 ones, products that underflow are not seen
    at all). A non-finite αₖ or βₖ (NaN: a step whose objective is NaN, which the guard skips;
    ±Inf: a curvature past the dtype's range, whose sign is the start's) stops it at once, as
    done, with NaN. ``tol=0``: always ``iters`` products, no host sync until the end, and no
    convergence claimed or checked (True); NaN where a product was not finite. ``product(v)``
    replaces ``hvp(grads, params, v)`` (data-parallel: summed over the ranks). The vectors are
    kept in float32 for float16/bfloat16 parameters (cast to theirs for each product), and the
    α's and β's are summed in float32 at least.
    """
    product = product or (lambda u: hvp(grads, params, u))
    v = [widen(_randn_like(p, generator)) for p in params]
    norm = torch.linalg.vector_norm(torch.stack(norms_of(v)))
    v = [u / norm.to(u.dtype) for u in v]
    device, dtype = params[0].device, widen(params[0]).dtype
    eps = max(torch.finfo(u.dtype).eps for u in v)
    prev: list[Tensor] | None = None
    beta = torch.zeros((), device=device, dtype=dtype)
    scale: Tensor | None = None  # (a power of two: H/scale's products are of order 1)
    taken: list[Tensor] = []  # α₁, β₁, α₂, β₂, … on the device (tol = 0: read at the end)
    alphas: list[float] = []
    betas: list[float] = []
    last = (math.nan, math.nan)  # the previous product's (θ_min, θ_max)
    estimate = math.nan
    for k in range(iters):
        w = [widen(h) for h in product([u.to(p.dtype) for u, p in zip(v, params, strict=True)])]
        if scale is None:
            scale = _power_of_two_below(torch.stack([h.abs().amax() for h in w]).amax().float())
            scale = scale.to(dtype)
        w = [h / scale.to(h.dtype) for h in w]  # (exact: a power of two)
        alpha = _dot(v, w)
        w = [h - alpha.to(h.dtype) * u for h, u in zip(w, v, strict=True)]
        if prev is not None:
            w = [h - beta.to(h.dtype) * u for h, u in zip(w, prev, strict=True)]
        beta = torch.linalg.vector_norm(torch.stack(norms_of(w))).to(dtype)
        taken += [alpha.to(dtype), beta]
        if tol > 0:
            # host sync, on measuring steps only: one per product when tol > 0
            a, b, unit = torch.stack([*taken[-2:], scale]).tolist()
            if not (math.isfinite(a) and math.isfinite(b)):  # (its sign, were it ±Inf, is
                # the random start's: +Inf came out -Inf, a review's)
                return torch.full((), math.nan, device=device, dtype=dtype), k + 1, True
            alphas.append(a)
            betas.append(b)
            low, r_low, high, r_high = _ritz(alphas, betas)
            ends = [(low, r_low, low - last[0]), (high, r_high, high - last[1])]
            (theta, residual, moved), other = ends[::-1] if high >= -low else ends
            largest = abs(theta)
            bound = tol * largest  # (abs(NaN) <= bound is False: not at the first product)
            # the other end too, unless it is short of the estimate by 10 times its residual
            # (its sign may win)
            settled = (
                residual <= bound
                and abs(moved) <= bound
                and (
                    abs(other[0]) + 10 * other[1] <= largest
                    or other[1] <= bound
                    and abs(other[2]) <= bound
                )
            )
            if settled or b <= 8 * eps * largest or b == 0:
                return torch.tensor(theta * unit, device=device, dtype=dtype), k + 1, True
            last, estimate = (low, high), theta
        prev = v
        v = [h / beta.to(h.dtype).clamp_min(torch.finfo(h.dtype).tiny) for h in w]  # (β = 0:
        # v = 0, then α = 0)
    if tol > 0:
        return torch.tensor(estimate * unit, device=device, dtype=dtype), iters, False
    # tol = 0: the Ritz values on the device, no host read (NaN where a product was not finite)
    pairs = torch.stack(taken).view(-1, 2)
    finite = torch.isfinite(pairs).all()
    pairs = torch.where(finite, pairs, 0)
    t = torch.diag(pairs[:, 0]) + torch.diag(pairs[:-1, 1], 1) + torch.diag(pairs[:-1, 1], -1)
    values = torch.linalg.eigvalsh(t if device.type in ("cpu", "cuda") else t.cpu()).to(device)
    eig = torch.where(-values[0] > values[-1], values[0], values[-1]) * cast(Tensor, scale)
    return torch.where(finite, eig, math.nan), iters, True


def top_eigenvalue(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    generator: torch.Generator,
    iters: int = 50,
    tol: float = 1e-3,
    product: Callable[[list[Tensor]], list[Tensor]] | None = None,
) -> Tensor:
    """:func:`lanczos`'s estimate (0-d), NaN where it did not converge within ``iters``
    products (``tol > 0``): an unconverged estimate is not presented as the value (power
    iteration's, which this replaced, was 28 % low at 20 products on a small MLP)."""
    eig, _, converged = lanczos(grads, params, generator, iters, tol, product)
    return eig if converged else torch.full_like(eig, torch.nan)


def hutchinson_trace(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    generator: torch.Generator,
    probes: int = 10,
    product: Callable[[list[Tensor]], list[Tensor]] | None = None,
) -> Tensor:
    """Hutchinson's estimate of tr(H): the mean of zᵀHz over Rademacher probes z (0-d);
    ``product`` as in :func:`top_eigenvalue`."""
    return hutchinson(grads, params, generator, probes, product)[0]


def hutchinson(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    generator: torch.Generator,
    probes: int = 10,
    product: Callable[[list[Tensor]], list[Tensor]] | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`hutchinson_trace` and its standard error, the probes' sample standard deviation
    over √probes (0-d each; NaN for one probe): how far the estimate is from tr(H), which at
    the default 10 probes was 50–115 % of it on a probe's small models."""
    if probes < 1:
        raise ValueError(f"probes: got {probes}, must be at least 1")
    product = product or (lambda u: hvp(grads, params, u))
    total = torch.zeros((), device=params[0].device, dtype=widen(params[0]).dtype)
    values = []
    for _ in range(probes):
        z = [_rademacher_like(p, generator) for p in params]
        values.append(_dot(z, product(z)))
        total = total + values[-1]
    if probes == 1:
        return total, torch.full_like(total, torch.nan)
    return total / probes, torch.stack(values).std() / math.sqrt(probes)


class Curvature(Callback):
    """Logs ``curvature/top_eig``, ``curvature/trace`` and its standard error
    (``curvature/trace_stderr``) every ``every_n_steps`` optimizer steps.

    What is measured: the Hessian, with respect to every trainable parameter, of the objective
    the step's data gradient is the gradient of, on the step's (last) micro-batch and at the
    parameters the step is about to update: ``mean(losses)`` in scalar mode, ``Σ wᵢ ℓᵢ`` with
    the weighting's weights in vector mode. Regularizers are not included. It runs in
    ``on_before_optimizer_step`` in full precision (no autocast), in the model's training mode;
    BatchNorm running statistics are not updated (the forward runs on copies of the buffers)
    and dropout draws the step's own masks again, from a forked copy of the random states the
    micro-batch's forward started from (it drew the next step's masks, a Hessian 22 % off the
    step's on a probe's dropout MLP), so a run's parameters are bitwise the same
    with and without it, unless the model's forward changes Python state of its own (a call
    counter it branches on), which a forward run again changes too. Steps it does not measure
    cost one integer comparison per micro-batch.
    """

    def __init__(
        self,
        every_n_steps: int,
        power_iters: int = 50,
        tol: float = 1e-3,
        trace_probes: int = 10,
        seed: int = 0,
    ):
        # built in Python, checked as the config's keys are: power_iters=0 or a negative or
        # NaN tol trained on and logged NaN at every measured step (with a warning to raise
        # power_iters), trace_probes=0 failed at the first measured step, power_iters=True ran
        # one product
        key = "instrument.curvature."
        every_n_steps = _integer(key + "every_n_steps", every_n_steps, 1)
        power_iters = _integer(key + "power_iters", power_iters, 1)
        trace_probes = _integer(key + "trace_probes", trace_probes, 1)
        if isinstance(tol, bool) or not isinstance(tol, (float, int, numbers.Real)):  # (NumPy's)
            raise ContractError(f"{key}tol: got {tol!r}, a real number >= 0")
        tol = float(tol)
        if not 0 <= tol < math.inf:
            raise ValueError(f"{key}tol: got {tol}, must be finite and >= 0")
        self.every = Every(every_n_steps)
        self.power_iters, self.tol, self.trace_probes = power_iters, tol, trace_probes
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._loaded: tuple[torch.device, Tensor] | None = None  # a checkpoint's, not made yet
        #: the step last measured and the generator's state before its draws; the step a
        #: failure was in (a fit called again measures it again from the same state)
        self._drawn: tuple[int, Tensor] | None = None
        self._failed_at = -1
        self._batch: Batch | None = None
        self._weights: Tensor | None = None
        self._start: Fork | None = None  # (the random states a due micro-batch began with)
        self._batch_start: Fork | None = None
        #: what a due micro-batch's forward began with: the model's buffers (copies), its
        #: modules' attributes, its frozen parameters' version counters
        self._state: _Began | None = None
        self._batch_state: _Began | None = None
        self._said: set[str] = set()  # (why a step logged NaN: said once a run each)
        self._warned = False  # (an unconverged Lanczos run: said once a run)
        self._unsupported = False  # (an op without a double backward: said once a run)

    def on_fit_start(self, trainer: Trainer) -> None:
        """On CUDA, attention dropout of the step's forward may be drawn by the fused kernels
        (flash, memory-efficient), and an RNN's between its layers by cuDNN; the measurement's
        forward, through kernels with a double backward (the math kernel, cuDNN off), draws
        other masks from the same random state (two reviews' reading): said, naming the
        layers. (On a CPU the kernels draw the same masks: tested.) Attention called as
        ``F.scaled_dot_product_attention(dropout_p=...)`` in a forward of one's own is not
        seen."""
        if trainer.device.type != "cuda" or not self.every.n:
            return
        named = [n or type(trainer.model).__name__ for n, m in trainer.model.named_modules()
                 if m.training and (
                     isinstance(m, torch.nn.MultiheadAttention) and m.dropout > 0
                     or isinstance(m, torch.nn.RNNBase) and m.dropout > 0 and m.num_layers > 1
                 )]  # fmt: skip
        if named:
            log.warning(
                "instrument.curvature on CUDA: %s may draw dropout in fused kernels (attention "
                "called with need_weights=False, as torch's Transformer layers call it, through "
                "flash or memory-efficient attention; an RNN's between its layers, in cuDNN), "
                "whose masks the measurement, through kernels with a double backward, cannot "
                "draw again: curvature/* are then of the objective with other masks in these "
                "layers than the step's (the other dropout layers draw the step's own)",
                ", ".join(named[:5]) + (" …" if len(named) > 5 else ""),
            )  # fmt: skip

    def on_train_batch_start(self, trainer: Trainer, batch: Batch) -> None:
        if not self.every.due_next(trainer.global_step):
            return
        # right before the forward where the trainer runs it (after every callback's
        # on_train_batch_start: a schedule's change of the model made there was undone, 7.17
        # for 11.32, a review's), else now (a loop of one's own calling the hooks)
        later = getattr(trainer, "before_forward_callbacks", None)
        if isinstance(later, list):
            later.append(partial(self._began, trainer, batch.x.device))
        else:
            self._began(trainer, batch.x.device)

    def _began(self, trainer: Trainer, device: torch.device) -> None:
        """What the measurement's forward starts from, as the step's begins: its random
        states (its dropout masks), and its buffers and attributes (a buffer its forward reads,
        then updates, an EMA normalizer's, was read as updated: top_eig −1.51 for +1.00, a
        review's), torch's global module hooks, and which parameters there were (identity
        and version counter). Data-parallel, the buffers DDP's forward is about to take from
        rank 0 are rank 0's (broadcast here as DDP does)."""
        model = trainer.model
        self._start = Fork(device)
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        ddp = getattr(getattr(trainer, "forward_model", None), "_orig_mod", None) or getattr(
            trainer, "forward_model", None
        )
        if isinstance(ddp, DistributedDataParallel) and ddp.will_sync_module_buffers():
            source = torch.distributed.get_global_rank(ddp.process_group, 0)
            for b in buffers.values():  # (a collective: every rank takes its copies here)
                torch.distributed.broadcast(b, source, group=ddp.process_group)
        self._state = _Began(
            buffers,
            Attributes(model),
            {n: (p, p._version) for n, p in model.named_parameters(remove_duplicate=False)},
            {k: dict(d) for k, d in _global_hooks().items()},
            {id(t): (t, t._version) for t in _hidden_tensors(model)},
        )

    def on_after_backward(self, trainer: Trainer, batch: Batch, losses: Tensor, weights) -> None:
        if self.every.due_next(trainer.global_step):  # the step this micro-batch belongs to
            self._batch = batch  # the window's last micro-batch wins
            self._batch_start, self._start = self._start, None
            self._batch_state, self._state = self._state, None
            # vector mode: its weighting's weights, as the step computed them
            self._weights = trainer.objective.batch_weights if weights is not None else None

    def on_before_optimizer_step(self, trainer: Trainer, optimizer) -> None:
        if not self.every.due(trainer.global_step) or self._batch is None:
            return
        batch, self._batch = self._batch, None
        weights, self._weights = self._weights, None
        start, self._batch_start = self._batch_start, None
        state, self._batch_state = self._batch_state, None
        trainer.stage_scalars(self.measure(trainer, batch, weights, start, state))  # read with
        # the step's scalars

    def state_dict(self) -> dict[str, Any]:
        """The probe generator's state (None before the first measurement)."""
        if self._loaded is not None:  # loaded, not measured with since: kept as it was
            return {"generator": self._loaded[1], "device": str(self._loaded[0])}
        g = self._generator
        return {
            "generator": None if g is None else g.get_state(),
            "device": str(g.device) if g else None,
        }

    def on_exception(self, trainer: Trainer, error: BaseException) -> None:
        self._failed_at = trainer.step_in_progress()  # (inside a window: the step being made)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._drawn, self._failed_at = None, -1
        # (a state from before the first measurement: seeded afresh at the next one; the
        # generator drawn from since was kept, a review's)
        self._generator = None
        # (made at the next measurement, on its device: a GPU checkpoint's generator could not
        # be made on a machine without one, and the resume failed, a review's)
        self._loaded = None
        if state["generator"] is not None:
            device = torch.device(state["device"])
            if device.type == "cpu":  # (one that does not fit: said at the resume, not at
                _made(device, state["generator"])  # the next measurement; kept unloaded)
            self._loaded = (device, state["generator"])

    def generator(self, device: torch.device) -> torch.Generator:
        """The measurement's own generator, seeded once (its stream continues across steps,
        and across a resume on the same kind of device)."""
        loaded = self._loaded
        if loaded is not None:
            if loaded[0].type == device.type:  # (kept where it fails: a fit called again
                self._generator = _made(device, loaded[1])  # says it again, a review's)
            else:  # (one device's generator state means nothing to another's: said)
                log.warning(
                    "curvature: the checkpoint's probe generator was on %s, this run measures "
                    "on %s: its probes are drawn afresh from instrument.curvature.seed, not as "
                    "the run would have drawn them on", loaded[0], device,
                )  # fmt: skip
            self._loaded = None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def measure(
        self,
        trainer: Trainer,
        batch: Batch,
        weights: Tensor | None = None,
        start: Fork | None = None,
        state: _Began | None = None,
    ) -> dict[str, Tensor | float]:
        """The top eigenvalue and the trace of the Hessian of ``batch``'s objective (vector
        mode: weighted by ``weights``, the step's own, or else by the weighting called again),
        at the current parameters. The model's forward and the loss run again on the batch,
        from the random states ``start`` took (the step's forward's: its dropout masks), or
        else from the current ones, and with the buffers (copies) and modules' attributes
        ``state`` took (the step's forward's), or else the current ones; the run's random
        states are left as they are either way, and so are the model's buffers and its
        modules' attributes, also where its backwards run parts of the forward again (an
        activation checkpoint's, a backward hook's counter: a review's)."""
        began = state.attributes.modules if state is not None else ()
        # (the modules the forward began with too: one replaced since, put back as it began,
        # kept that state for good, and training changed, a review's)
        # (and the buffers' values: a batch norm inside an activation checkpoint, recomputed
        # by the products' backwards, moved its running statistics 45 times more over 2
        # measured steps, a probe's)
        with (
            attributes_kept(trainer.model, began),
            _global_hooks_as(state),
            buffer_values_kept(trainer.model),
        ):
            try:
                if state is not None:  # (its parameters, the instruments' hooks as they are)
                    _unchanged_structure(trainer.model, state.attributes)
                    state.attributes.put_back(began=True)
                try:  # (the backwards too, inside a fork of the random states: one
                    # drawing random numbers, gradient noise added by a hook, drew the run's in
                    # the products and changed the trajectory with curvature on, a probe's)
                    with forked_rng(batch.x.device):
                        return self._measure(trainer, batch, weights, start, state)
                except RuntimeError as e:  # (an op of torch's whose backward has none, raised
                    # by the products: CTC's "derivative for aten::_ctc_loss_backward is not
                    # implemented", which stopped the run, a probe's)
                    if _NO_DERIVATIVE.search(str(e)):
                        raise _NoDerivative(str(e)) from e
                    raise
            except _NotFrom as e:  # (what it was measured from is not the step's: NaN, said)
                if str(e) not in self._said:
                    self._said.add(str(e))
                    log.warning("curvature: NaN, %s", e)
                return self._nan(batch)
            except (NotImplementedError, _NoDerivative) as e:  # an op of the model without
                # a double backward (an EmbeddingBag's: it stopped the run, a review's; CTC's,
                # torch's RuntimeError, a probe's; a @once_differentiable Function's, which
                # torch leaves out silently): NaN, said once
                if not self._unsupported:
                    self._unsupported = True
                    log.warning(
                        "curvature: NaN, the model's backward has no derivative of its own "
                        "(%s): Hessian-vector products need one for every op; turn curvature "
                        "off (instrument.curvature.every_n_steps=0) or replace that op",
                        str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e),
                    )  # fmt: skip
                return self._nan(batch)

    @staticmethod
    def _nan(batch: Batch) -> dict[str, Tensor | float]:
        nan = torch.full((), math.nan, device=batch.x.device)
        return {"curvature/top_eig": nan, "curvature/top_eig_iters": 0.0,
                "curvature/trace": nan, "curvature/trace_stderr": nan}  # fmt: skip

    def _measure(
        self,
        trainer: Trainer,
        batch: Batch,
        weights: Tensor | None,
        start: Fork | None,
        began: _Began | None,
    ) -> dict[str, Tensor | float]:
        model = trainer.model
        x, y, index = batch
        params = [p for p in model.parameters() if p.requires_grad]
        state: dict[str, Tensor] = dict(model.named_parameters())
        # a parameter replaced since the step's forward began, or a frozen one changed in
        # place since (state kept in an nn.Parameter(requires_grad=False), an EMA its forward
        # updates): a copy (the measurement's forward wrote into it, and training changed, a
        # review's), and NaN, since its value then is not kept (a frozen backbone would be
        # copied at every due micro-batch). Not one frozen since, unchanged (a review's NaN)
        if began is not None:  # (before its forward: none runs then, which would change it)
            _as_it_began(model, began)
        # copies: a BatchNorm in training mode updates its running statistics in place; of
        # the buffers the step's forward began with (one it reassigned since: by its name)
        buffers = began.buffers if began is not None else {}
        state.update({
            n: (buffers[n] if n in buffers and _alike(buffers[n], b) else b).clone()
            for n, b in model.named_buffers()
        })  # fmt: skip
        # full precision, but for a model holding float16/bfloat16 parameters trained under
        # autocast (a frozen float16 backbone under precision=16), which cannot run outside
        # it: the step's autocast (the run stopped at its first measured step, a probe's)
        amp = getattr(trainer, "amp_dtype", None)
        low = amp is not None and any(
            p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()
        )
        with (
            forked_rng(x.device),  # dropout (or Python's random) must not advance the run's
            # kernels with a double backward, which Hessian-vector products need: attention
            # through the math kernel, cuDNN off for an RNN on CUDA
            double_backward_kernels(model, x.device, hessian=True),
            torch.autocast(x.device.type, dtype=amp) if low else contextlib.nullcontext(),
            _PlainLookups(),  # the objective's own gradient through an embedding
        ):
            if start is not None:  # (inside the fork: the run's states come back after)
                start.rewind()
            # (its attributes put back by the caller's attributes_kept, after the backwards:
            # put back right after the forward, a tensor it wrote in place and saved for its
            # backward stopped the step, a review's)
            logits = call_with(model, state, (x,), kept=False)
            # the loss too: one drawing random numbers (a noisy label smoothing) draws the
            # step's, and leaves the run's as they were (it drew the next step's and changed
            # the trajectory: a probe's finding)
            losses = trainer.criterion(logits, y)
            # the micro-batch's data objective, as the step's root weighs it
            # (trainer/objective.py)
            objective = trainer.objective.batch_objective(losses, logits, y, index, weights)
        now = [p for p in model.parameters() if p.requires_grad]
        if len(now) != len(params) or any(a is not b for a, b in zip(now, params, strict=False)):
            raise _NotFrom(
                "the measurement's forward made new trainable parameters (a submodule built "
                "on demand, behind a flag put back to how the step's forward found it): the "
                "Hessian would leave them out"
            )
        ddp = trainer.world.distributed
        once = once_differentiable_in([objective], params)  # (a walk of the graph: a measuring
        # step's; torch would leave every path through them out of the products, silently:
        # a probe's estimate of the wrong sign, converged)
        if ddp:  # (every rank decides alike: one measuring while another gives up waited in
            # the products' collective for good); host read: a measured step's
            flag = torch.tensor([float(bool(once))], device=x.device)
            if float(all_reduce_sum(flag)) > 0 and not once:
                raise _NoDerivative("another rank's graph holds a @once_differentiable Function")
        if once:
            raise _NoDerivative(
                f"{', '.join(once)} marks its backward @once_differentiable, which torch does "
                "not differentiate"
            )
        try:
            taken = torch.autograd.grad(objective, params, create_graph=True, allow_unused=True)
        except RuntimeError as e:
            if "use_reentrant=True" not in str(e):
                raise
            raise RuntimeError(
                "instrument.curvature: Hessian-vector products need torch.autograd.grad through "
                "the model, which torch.utils.checkpoint(..., use_reentrant=True) in its forward "
                "refuses; pass use_reentrant=False there (torch's recommended variant), or turn "
                "curvature off (instrument.curvature.every_n_steps=0)"
            ) from e
        grads = [
            g if g is not None else torch.zeros_like(p) for g, p in zip(taken, params, strict=True)
        ]
        # (a data-parallel rank without samples: its part of H is 0, and the double
        # backward of an empty batch's loss can fail on its reshapes, (0, T) to (0·T, V))
        curved = x.shape[0] > 0 and any(g.requires_grad for g in grads)
        if not curved and not ddp:  # the loss is linear in θ: H = 0
            zero = torch.zeros((), device=params[0].device)
            spread = zero if self.trace_probes > 1 else torch.full_like(zero, torch.nan)
            return {"curvature/top_eig": zero, "curvature/top_eig_iters": 0.0,
                    "curvature/trace": zero, "curvature/trace_stderr": spread}  # fmt: skip

        def product(v: list[Tensor]) -> list[Tensor]:
            # data-parallel: H v of the global objective, the sum of the ranks' parts (every
            # rank takes part, also one whose part is empty or linear)
            hv = hvp(grads, params, v) if curved else [torch.zeros_like(u) for u in v]
            if not ddp:
                return hv
            flat = all_reduce_sum(torch.cat([h.reshape(-1) for h in hv]))
            parts = flat.split([h.numel() for h in hv])
            return [f.view_as(h) for f, h in zip(parts, hv, strict=True)]

        gen = self.generator(params[0].device)
        step = getattr(trainer, "global_step", -1)  # (a measurement outside a run: none)
        if self._drawn is not None and self._drawn[0] == step == self._failed_at >= 0:
            # the failed step measured again (a fit called again after a failure in it): its
            # probes drawn as the first attempt drew them (they were drawn further on: other
            # values at every measured step from it on, a probe's)
            gen.set_state(self._drawn[1])
        self._drawn = (step, gen.get_state())  # (a copy on the host; no device sync)
        eig, products, converged = lanczos(grads, params, gen, self.power_iters, self.tol, product)
        if not converged and not self._warned:
            self._warned = True
            log.warning(
                "curvature/top_eig: the Lanczos method did not converge within power_iters=%d "
                "(tol=%g): NaN is logged for such a step (curvature/top_eig_iters says how many "
                "products each step took); raise instrument.curvature.power_iters",
                self.power_iters, self.tol,
            )  # fmt: skip
        trace, stderr = hutchinson(grads, params, gen, self.trace_probes, product)
        return {
            "curvature/top_eig": eig if converged else torch.full_like(eig, torch.nan),
            "curvature/top_eig_iters": float(products),
            "curvature/trace": trace,
            "curvature/trace_stderr": stderr,
        }


class _PlainLookups(torch.overrides.TorchFunctionMode):
    """The measurement's forward looks embeddings up without ``scale_grad_by_freq`` and
    ``sparse``, which change a lookup's backward, not its values: with the first, the
    gradient is each row's divided by its index's count in the batch, S·∇L, not the
    objective's, and the products S·H v of a matrix that is not symmetric (Lanczos
    converged to 0.480 for a top eigenvalue of 0.497, and Hutchinson estimated tr(S·H): a
    probe's); with the second the products came back sparse, which the scaling could not
    read (NaN, said as an op without a double backward). In modules, functional calls and
    the aten op alike."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        flags = _LOOKUP_FLAGS.get(func)
        if flags is not None:
            args = tuple(False if i in flags else a for i, a in enumerate(args))
            if kwargs:
                kwargs = {k: False if k in _LOOKUP_KEYS else v for k, v in kwargs.items()}
        return func(*args, **(kwargs or {}))


#: lookups' ``scale_grad_by_freq`` and ``sparse`` flags, by position and by name
_LOOKUP_FLAGS = {
    torch.nn.functional.embedding: (5, 6),
    torch.embedding: (3, 4),
    # (the op itself, as decomposed or exported code calls it: its flags were kept, a review's)
    torch.ops.aten.embedding: (3, 4),
    torch.ops.aten.embedding.default: (3, 4),
}
_LOOKUP_KEYS = frozenset({"scale_grad_by_freq", "sparse"})


def _alike(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


class _Began(NamedTuple):
    """A micro-batch's state as its forward began (:meth:`Curvature._began`)."""

    buffers: dict[str, Tensor]  # copies, by name
    attributes: Attributes
    params: dict[str, tuple[Tensor, int]]  # every name of each parameter, with its version
    hooks: dict[str, dict[Any, Any]]  # torch's global module hooks (copies of the tables)
    hidden: dict[int, tuple[Tensor, int]]  # modules' tensors kept outside registered ones


def _as_it_began(model: torch.nn.Module, began: _Began) -> None:
    """Raise :class:`_NotFrom` where the parameters are not those the step's forward began
    with: one replaced since, or tied or untied (every name of each, tied ones too: a weight
    tied after the forward was measured tied, 7 % off, a review's); a frozen one changed in
    place since (state kept in an ``nn.Parameter(requires_grad=False)``, an EMA its forward
    updates: its value then is not kept, a frozen backbone would be copied at every due
    micro-batch; its forward wrote into it again, and training changed, a review's); or a
    module's parameters or buffers the model keeps outside its registered modules (an EMA
    teacher in a plain list, updated by the forward) changed in place since (the
    measurement's forward updated it again, a review's). None is run then."""
    now = dict(model.named_parameters(remove_duplicate=False))
    then = began.params
    replaced = [n for n in [*now, *(n for n in then if n not in now)]
                if then.get(n, (None, -1))[0] is not now.get(n)]  # fmt: skip
    if replaced:
        raise _NotFrom(
            f"parameter(s) {few(replaced)} replaced, tied or untied since the step's forward "
            "began: the Hessian would be of another objective than the step's"
        )
    moved = [n for n, p in now.items() if not p.requires_grad and then[n][1] != p._version]
    if moved:
        raise _NotFrom(
            f"frozen parameter(s) {few(moved)} changed in place since the step's forward "
            "began (state kept in an nn.Parameter with requires_grad=False): the Hessian "
            "would be of another objective than the step's (keep such state in a buffer, "
            "register_buffer, whose value as the forward began is kept); a write through "
            ".data moves no version counter and is not seen"
        )
    hidden = [t for t, version in began.hidden.values() if t._version != version]
    if hidden:
        raise _NotFrom(
            f"{len(hidden)} tensor(s) of a module the model keeps outside its registered "
            "modules (in a list, a dict or a plain attribute: an EMA teacher) changed in "
            "place since the step's forward began: the Hessian would be of another "
            "objective than the step's, and its forward would change them again"
        )


def _hidden_tensors(model: torch.nn.Module) -> list[Tensor]:
    """The tensors of the modules the model's modules keep outside their registered ones (an
    EMA teacher: :func:`_modules_in`): their parameters, buffers and plain tensor
    attributes, less what the model's own modules and tensors are (a list viewing its
    registered blocks, a helper holding the model: their BatchNorms' running statistics
    moved, and curvature was NaN for nothing, a review's; a weakref proxy of the model)."""
    registered = {id(m) for m in model.modules()}
    values = [v for m in model.modules() for k, v in vars(m).items() if k not in MODULE_TABLES]
    found: dict[int, torch.nn.Module] = {}
    for x in _modules_in(values, registered):
        for sub in x.modules():
            if id(sub) not in registered:
                found.setdefault(id(sub), sub)
    own_tensors = {id(t) for t in (*model.parameters(), *model.buffers())}
    tensors: dict[int, Tensor] = {}
    for h in found.values():
        kept = [v for k, v in vars(h).items() if isinstance(v, Tensor) and k not in MODULE_TABLES]
        for t in [*h._parameters.values(), *h._buffers.values(), *kept]:
            if isinstance(t, Tensor) and id(t) not in own_tensors and not t.is_inference():
                tensors.setdefault(id(t), t)
    return list(tensors.values())


#: values that hold no module: not looked into (a log of 100,000 numbers, once each)
_ATOMS = (Tensor, str, bytes, int, float, complex, bool, type(None), type, types.ModuleType)


def _modules_in(values: list[Any], registered: set[int], depth: int = 3) -> list[torch.nn.Module]:
    """The modules not in ``registered`` among ``values``, or inside them ``depth`` levels
    down: in a dict's values, a list, tuple, set or deque (subclasses too: a tuple or an
    OrderedDict was missed, a review's), a plain object's ``__dict__`` (read without its
    ``__getattr__``: a proxy's raised and stopped the run, a review's), a bound method's
    object; each object once (kept alive while looked at: a freed one's id reused hid a
    teacher, a review's). Not a mapping of another kind (a dataset or a store would load
    its items, a config would resolve its interpolations), nor a weakref proxy (a dead one
    raised at any use). What cannot be read is passed by."""
    found: dict[int, torch.nn.Module] = {}
    seen: dict[int, Any] = {}
    todo = [(v, depth) for v in values if not _atom(v)]
    while todo:
        v, left = todo.pop()
        if id(v) in seen:
            continue
        seen[id(v)] = v
        try:
            if isinstance(v, torch.nn.Module):
                if id(v) not in registered:
                    found.setdefault(id(v), v)
                continue
            if not left:
                continue
            if isinstance(v, dict):
                inner: Any = list(v.values())
            elif isinstance(v, (list, tuple, set, frozenset, collections.deque)):
                inner = list(v)
            elif isinstance(v, types.MethodType):
                inner = [v.__self__]
            else:
                attrs = object.__getattribute__(v, "__dict__")
                inner = list(attrs.values()) if type(attrs) is dict else []
        except Exception:  # noqa: BLE001 (no __dict__, or one that raises: nothing to see)
            continue
        todo += [(x, left - 1) for x in inner if not _atom(x)]
    return list(found.values())


def _atom(v: Any) -> bool:
    """Whether ``v`` holds no module to look for (by its type alone: a weakref proxy, dead,
    raised at any other use)."""
    kind = type(v)
    return kind in weakref.ProxyTypes or issubclass(kind, _ATOMS)


def _unchanged_structure(model: torch.nn.Module, began: Attributes) -> None:
    """Raise :class:`_NotFrom` where a module's class or its parameters' names changed
    since ``began`` was taken (a parametrization or pruning registered after the step's
    forward: the state it began with cannot be run again around the parameters as they are
    now, and the measurement crashed the run, a review's)."""
    names = {id(m): n for n, m in model.named_modules()}
    for m, _, contents in began.saved:
        params = contents.get("_parameters")
        moved = type(m) is not began.types[id(m)] or (
            params is not None and set(params) != set(vars(m)["_parameters"])
        )
        if moved:
            raise _NotFrom(
                f"module {names.get(id(m), type(m).__name__)!r} changed its class or its "
                "parameters' names since the step's forward began (a parametrization or "
                "pruning registered after it): the Hessian would be of another model"
            )


def _global_hooks() -> dict[str, dict[Any, Any]]:
    """torch's global module hook tables (``register_module_forward_hook`` and its kin), by
    name."""
    from torch.nn.modules import module

    return {k: v for k, v in vars(module).items() if k.startswith("_global_")
            and isinstance(v, dict)}  # fmt: skip


@contextlib.contextmanager
def _global_hooks_as(began: _Began | None) -> Iterator[None]:
    """Within: torch's global module hooks as they were when ``began`` was taken (one a
    callback registered after the step's forward, for the next one, ran in the measurement's:
    0.88 for 0.38, a review's); after: as they are now."""
    if began is None:
        yield
        return
    tables = _global_hooks()
    now = {k: dict(v) for k, v in tables.items()}
    try:
        for k, v in tables.items():
            if k in began.hooks and not same_contents(v, began.hooks[k]):
                v.clear()
                v.update(began.hooks[k])
        yield
    finally:
        for k, v in tables.items():
            if not same_contents(v, now[k]):
                v.clear()
                v.update(now[k])


class _NotFrom(Exception):
    """The measurement would not be of the step's objective (its message: why)."""
