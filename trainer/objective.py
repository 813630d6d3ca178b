"""The objective: the one owner of the backward roots and of each loss element's coefficient.

A micro-batch's data root is Σ cᵢ ℓᵢ over its loss elements (samples (B,), or tokens (B, T)),
and every instrument that needs "what did loss element i count for in this step's gradient"
(per-sample norms, curvature) asks :class:`Objective` instead of re-deriving it:

* scalar mode: the loss's own average over the accumulation window. Per-sample losses:
  ``Σ ℓᵢ · (1/N)`` (N samples in the window; a dot product), so cᵢ = 1 / N: for a window of
  one micro-batch the same gradient as ``mean``, bit for bit, and one autograd node less work.
  Per-token losses with unit weights u (trainer/losses.py): Σ u ℓ / U, U = Σ u over the
  window, so c = u / U.
* vector mode: ``losses.backward(gradient=w)`` with w = the weighting's weights of the losses'
  shape (trainer/weighting.py), times the micro-batch's share of the window under
  ``normalize=mean`` (B / N, or Σu / U for tokens), so c = w. The uniform weighting's w are
  scalar mode's c, computed by the same code: the two modes backpropagate the same
  coefficients bit for bit, with or without accumulation.
* data-parallel: the window is the global one (every rank's samples), and each rank's root is
  the world size W times its part of the global objective, because DDP averages the ranks'
  gradients: c carries the factor W. This is the only place data parallelism enters.

Regularizers join the same backward pass as a second root: parameter regularizers λR(θ) once per
optimizer step (on the window's last micro-batch), the input-gradient penalty on every
micro-batch by its share. On logging steps the objective also knows ``grad_norm/data`` and
``grad_norm/reg`` (the regularizers' analytic gradients; the penalty's taken by one extra
double-backward pass on those steps only).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from trainer.backward import backward_scalar, backward_vector
from trainer.callbacks import few
from trainer.config import ConfigError, ContractError
from trainer.distributed import SINGLE, World, all_reduce_max, all_reduce_sum
from trainer.instrument.norms import minus, total_norm
from trainer.instrument.swap import attributes_kept, buffer_values_kept
from trainer.losses import Loss, loss_name, units_dtype
from trainer.precision import sum_dtype
from trainer.regularizers import InputGradPenalty, Regularizer
from trainer.rng import forked_rng
from trainer.weighting import UniformWeighting, Weighting

log = logging.getLogger(__name__)

#: dtypes whose per-sample root is a dot product (half-precision losses: a product and a sum,
#: which accumulates in float32)
_DOT_DTYPES = (torch.float32, torch.float64)


def _own_value(r: Regularizer) -> bool:
    """A regularizer of one's own whose ``value()`` is its own and whose ``grad()`` is not."""
    return type(r).value is not Regularizer.value and type(r).grad is Regularizer.grad


def _kept(coef: Any) -> Any:
    """λ as it is now: a tensor's copy (one changed in place is not the value it was)."""
    return coef.detach().clone() if isinstance(coef, Tensor) else coef


def _same(a: Any, b: Any) -> bool:
    """Whether two λ are equal (a tensor's: a host read, on logging steps only)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        a, b = (torch.as_tensor(t).detach().cpu().double() for t in (a, b))
        return bool(torch.equal(a, b))
    return bool(a == b)


@dataclass
class Window:
    """The accumulation window a micro-batch belongs to (its global one, data-parallel)."""

    samples: int  # samples in the window, known on the host
    batches: int = 1  # micro-batches in it
    units: Tensor | None = None  # 0-d Σu over the window: per-token losses only (device)


class Objective:
    """Builds each micro-batch's backward roots and runs the backward (module docstring).

    Args:
        loss: the loss component; its :meth:`~trainer.losses.Loss.units` define its average.
        weighting: the weighting (vector mode), or None (scalar mode).
        regularizers: parameter regularizers and at most one input-gradient penalty.
        params: the trainable parameters backward accumulates into.
        global_batch_size: data-parallel, the current global batch's size (all ranks).
    """

    def __init__(
        self,
        loss: Loss,
        weighting: Weighting | None,
        regularizers: Sequence[Regularizer | InputGradPenalty],
        params: Sequence[Tensor],
        *,
        world: World = SINGLE,
        scaler: torch.amp.GradScaler | None = None,
        global_batch_size: Callable[[], int] = lambda: 0,
    ):
        self.loss, self.weighting = loss, weighting
        #: parameter regularizers, added once per optimizer step
        self.regularizers = [r for r in regularizers if isinstance(r, Regularizer)]
        #: the input-gradient penalty, added on every micro-batch (it depends on the inputs)
        penalties = [r for r in regularizers if isinstance(r, InputGradPenalty)]
        unknown = [r for r in regularizers if not isinstance(r, (Regularizer, InputGradPenalty))]
        if unknown or len(penalties) > 1:
            raise ContractError(
                "regularizers: expected trainer.regularizers.Regularizer instances and at most "
                f"one InputGradPenalty, got {[type(r).__name__ for r in regularizers]}"
            )
        names = [r.name for r in regularizers]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # (a Trainer built by hand: one reg/<name> value overwrote the other's, and
            # their states shared one checkpoint key, a probe's)
            raise ConfigError(
                f"regularizers: the name(s) {twice} are given to more than one regularizer; "
                "each logs reg/<name> and keeps its state under it: give each its own name"
            )
        self.input_penalty = penalties[0] if penalties else None
        self.params = list(params)
        #: the model (the Trainer's): its buffers kept through the penalty's extra backward
        self.model: torch.nn.Module | None = None
        self.world, self.scaler = world, scaler
        self._padding_checked = False  # (the loss finite where its units are 0: once)
        self.global_batch_size = global_batch_size
        #: the last optimizer step's λR per parameter regularizer, detached
        self.reg_values: list[Tensor] = []
        #: whether the last backward took the parameter regularizers' gradient (the window's
        #: last micro-batch; added after it where ``reg_after_reduce``): what a check of a
        #: parameter's whole gradient in it subtracts (the per-sample norms' instrument)
        self.reg_in_backward = False
        self._penalty_window: list[Tensor] = []  # the penalty's detached values this window
        self._penalty_grads: dict[int, Tensor] = {}  # its θ-gradient, windows that log only
        self._inverse_counts: dict[tuple[int, int, torch.dtype, torch.device], Tensor] = {}
        #: vector mode: the weighting's weights of the last micro-batch backpropagated, as it
        #: returned them (before the window's share and DDP's factor)
        self.batch_weights: Tensor | None = None
        #: DistributedDataParallel finding unused parameters (the Trainer sets it): the
        #: parameter regularizers' gradient is taken outside its backward (:meth:`backward`)
        self.reg_after_reduce = False
        #: the regularized parameters as the step's backward took λR at, id -> (name, tensor,
        #: version), from that backward until the update (None outside): a write to one since
        #: (a projection in ``on_before_optimizer_step``) leaves their analytic gradient at
        #: the weights as they are now, not the backward's
        self._reg_at: dict[int, tuple[str, Tensor, int]] | None = None
        self._reg_coef: list[tuple[Any, Any]] | None = None
        self._said_coef: set[str] = set()  # (regularizers whose value() changed λ: warned)
        self._said_moved: set[str] = set()

    @property
    def has_regularizers(self) -> bool:
        return bool(self.regularizers) or self.input_penalty is not None

    # ------------------------------------------------------------------ the window
    def window_units(self, targets: Sequence[Tensor]) -> Tensor | None:
        """U = Σu over a window's micro-batches (their targets), a 0-d device tensor without a
        host sync; None for per-sample losses, whose window size is known on the host."""
        # counts in float64 (exact), except where a device has none (MPS)
        exact = sum_dtype(targets[0].device)
        units = [self._units(y, exact) for y in targets]
        if units[0] is None:
            return None
        total = torch.stack([u.sum() for u in units if u is not None]).sum()
        # data-parallel: the global window's (one small all-reduce per window, no host sync)
        return all_reduce_sum(total)

    def _ddp(self) -> int:
        """W when data-parallel (the factor of DDP's average), else 0."""
        return self.world.size if self.world.distributed else 0

    def _share(self, y: Tensor, window: Window) -> float:
        """The micro-batch's (global batch's) share of the window's samples."""
        n = self.global_batch_size() if self.world.distributed else y.shape[0]
        return n / window.samples  # 1.0 without accumulation

    # ------------------------------------------------------------------ roots and coefficients
    def check_losses(self, losses: Tensor, y: Tensor) -> Tensor | None:
        """The loss's unit weights for ``y``, after checking the losses' shape (metadata only)."""
        units = self._units(y, units_dtype(losses.dtype))  # (float64 losses: float64)
        expected = y.shape[:1] if units is None else units.shape
        if losses.shape != expected:  # metadata only, no sync
            raise ValueError(
                f"loss {loss_name(self.loss)} returned shape {tuple(losses.shape)} for a "
                f"batch of {y.shape[0]}; it must return one loss per element, shape "
                f"{tuple(expected)} (reduction='none')"
                + (
                    "; a loss per token, (B, T, ...), is taken from a loss that implements "
                    "units(target, dtype), the unit weights of its average (README, 'Bring "
                    "your own'); a loss per output of a regression, (B, K): reduce it per "
                    "sample, e.g. .mean(1)"
                    if units is None and losses.ndim > 1 and losses.shape[0] == y.shape[0]
                    else "; its units(target, dtype) give that shape"
                    if units is not None
                    else ""
                )
            )
        if not losses.requires_grad and torch.is_grad_enabled():  # metadata only
            why = (
                f"of dtype {losses.dtype} (integer losses have no gradient)"
                if not losses.is_floating_point()
                else "that do not require grad, as the model has no trainable parameter (all "
                "requires_grad=False: nothing to train; a callback may unfreeze some in "
                "on_fit_start)"
                if not any(p.requires_grad for p in self.params)
                else "that do not require grad (detached from the model's graph: .detach(), "
                ".item(), a NumPy round trip, or torch.no_grad)"
            )
            raise ValueError(
                f"loss {loss_name(self.loss)} returned losses {why}; it must return "
                "floating-point per-sample losses computed from the model's output"
            )
        if units is not None and not self._padding_checked:
            self._check_padding(losses, units)
        return units

    def _check_padding(self, losses: Tensor, units: Tensor) -> None:
        """Once, at the first micro-batch with units: a loss not finite where its units are 0
        (padding: -log(0) of a padded target in a loss of one's own) makes Σuℓ NaN (0·Inf),
        and the guard skipped every step with padding, naming samples whose tokens were all
        fine (a probe's: 10 of 12 steps skipped, train/loss NaN). Refused, naming the cause
        (host sync: this first step only; data-parallel, agreed, so every rank raises)."""
        with torch.no_grad():  # (Inf at padding, every token finite: a loss going NaN
            # everywhere, a step the guard skips, is not this; refused as it was, a review's)
            finite, pad = torch.isfinite(losses.detach()), units == 0
            tokens_ok = (finite | pad).all()
            wrong = ~(units >= 0).all()  # (negative or NaN units: ascent on those tokens, a
            # signed train/loss; checked here, at the first micro-batch, a probe's)
            flags = torch.stack([(~finite & pad).any() & tokens_ok, ~tokens_ok, wrong]).float()
        if self.world.distributed:
            flags = all_reduce_max(flags)
        bad, undecided, wrong_units = flags.tolist()
        if wrong_units:
            raise ValueError(
                f"loss {loss_name(self.loss)}: its units(target, dtype) are negative or NaN "
                "(on this rank or another); unit weights are counts or shares, >= 0 (a "
                "negative one trains its tokens by ascent)"
            )  # host sync: the first micro-batch (and the next ones
        # while a token's loss is not finite there: undecided, the guard's steps to skip; a
        # check that ended there let a padding-only Inf after it train, a review's)
        if undecided:
            return
        if bad:  # (and again in a fit called again: a second fit trained it, a review's)
            raise ValueError(
                f"loss {loss_name(self.loss)} is NaN or Inf at positions its units weigh 0 "
                "(padding, on this rank or another): the loss's average Σuℓ / Σu, train/loss "
                "and the non-finite guard read every element, and 0·Inf is NaN; make the loss "
                "finite (0) where its units are 0, as torch's ignore_index does"
            )
        self._padding_checked = True

    def scalar_root(
        self, losses: Tensor, units: Tensor | None, y: Tensor, window: Window
    ) -> Tensor:
        """Scalar mode's 0-d data root for one micro-batch."""
        if units is not None:  # Σ (u / U) ℓ over the window: c = u / U (× W data-parallel)
            root = (losses * (units / self._window_units(units, window))).sum()
            return root * self.world.size if self.world.distributed else root
        if self.world.distributed:  # Σ_local ℓ · W / N (also right for an empty or ragged part)
            return losses.sum() * (self.world.size / window.samples)
        # Σ ℓᵢ · (1/N), N the window's samples: for a window of one micro-batch the same
        # gradient as mean(), 1/B per sample bit for bit (what mean's backward divides out), as
        # a dot product with one autograd node less work (≈ 25 µs of a CPU step); with
        # accumulation the coefficients 1/N the uniform weighting passes too (not mean() × B/N,
        # which rounds twice)
        c = self._inverse_count(losses, window.samples)
        if losses.dtype in _DOT_DTYPES:
            return torch.dot(losses, c)
        return (losses * c).sum()  # (float16/bfloat16: float32 c, a float32 product and sum)

    def _inverse_count(self, losses: Tensor, n: int) -> Tensor:
        """1/n in each of the losses' B elements, computed as ``ones / n`` in the losses' dtype
        (as the mean's backward computes 1/B; float16/bfloat16 losses: in float32, which the
        backward rounds to their dtype once, after a GradScaler's scale: 1/n of a large
        window is below float16's normal range), kept per (B, n, dtype, device)."""
        key = (losses.shape[0], n, units_dtype(losses.dtype), losses.device)
        w = self._inverse_counts.get(key)
        if w is None:
            if len(self._inverse_counts) >= 64:  # (batch sizes that vary without end)
                self._inverse_counts.clear()
            w = torch.ones(key[0], dtype=key[2], device=key[3]) / n
            self._inverse_counts[key] = w
        return w

    def _units(self, y: Tensor, dtype: torch.dtype) -> Tensor | None:
        """The loss's units of ``y`` in ``dtype``, checked (metadata only, no sync): in that
        floating dtype and detached, as the contract says (a boolean or integer mask failed in
        ``torch.finfo``, naming neither the loss nor ``units()``; float32 units of float64
        losses moved the numbers; units that require grad were taken: a probe's)."""
        units = self.loss.units(y, dtype)
        if units is None:
            return None
        if not isinstance(units, Tensor) or units.dtype != dtype or units.requires_grad:
            got = (
                f"a {type(units).__name__}" if not isinstance(units, Tensor)
                else "units that require grad" if units.dtype == dtype
                else f"{units.dtype} units"
            )  # fmt: skip
            raise ContractError(
                f"loss {loss_name(self.loss)}: units(target, dtype={dtype}) returned {got}; it "
                "returns the unit weights in the dtype it is given, detached from the graph "
                "(mask.to(dtype))"
            )
        return units

    def _window_units(self, units: Tensor, window: Window) -> Tensor:
        """U; for a window of one micro-batch Σu computed as the uniform weighting does, so
        scalar mode and vector-uniform mode give the same coefficients bit for bit (one
        process; data-parallel, U is the global window's, summed over the ranks). At least the
        dtype's smallest normal number, as the uniform weighting's: a window without a unit
        (every token padding) gives coefficients 0, not 0/0."""
        if window.batches == 1 and not self.world.distributed:
            total = units.sum()
        else:
            assert window.units is not None
            total = window.units.to(units.dtype)
        return total.clamp_min(torch.finfo(total.dtype).tiny)

    def vector_weights(
        self,
        losses: Tensor,
        output: Tensor,
        y: Tensor,
        index: Tensor,
        units: Tensor | None,
        window: Window,
    ) -> Tensor:
        """Vector mode's gradient weights for one micro-batch, of the losses' shape."""
        assert self.weighting is not None
        ddp = self._ddp()
        if ddp:  # the sizes of the ranks' parts: known here, no exchange needed
            self.weighting.global_size = self.global_batch_size()
        weights = self.weighting(losses, output, y, index, units)
        self.batch_weights = weights  # (the micro-batch's own, for batch_objective)
        if self._uniform_mean:
            # the loss's own average: scalar mode's coefficients, computed by the same code, so
            # that vector-uniform mode backpropagates what scalar mode does bit for bit, also
            # over a window of several micro-batches (the general path below scales the
            # micro-batch's 1/B or u/Σu by its share, rounding twice); they include W
            return self._uniform_coefficients(losses, units, window)
        if self.weighting.normalize == "mean":  # sum/none: each micro-batch's as given
            if units is None:
                share = self._share(y, window)
                weights = weights if share == 1.0 else weights * share
            elif window.batches > 1:  # this micro-batch's units' share of the window's
                # (data-parallel: its global batch's, one more small all-reduce)
                weights = weights * (
                    all_reduce_sum(units.sum()) / self._window_units(units, window)
                )
        if ddp:
            weights = weights * ddp
        # (float16/bfloat16 losses with units: float32 weights, which backward_vector scales
        # and then rounds to the losses' dtype once, as scalar mode's root does)
        return weights

    def coefficients(self, losses: Tensor, y: Tensor, window: Window) -> Tensor:
        """Scalar mode: each loss element's coefficient c in the micro-batch's root (× W
        data-parallel), of the losses' shape. (Vector mode's are the weights themselves.)"""
        units = self._units(y, units_dtype(losses.dtype))
        return self._uniform_coefficients(losses, units, window)

    @property
    def _uniform_mean(self) -> bool:
        """Vector mode with the uniform weighting averaging (not a subclass: its weights may
        differ): its weights are scalar mode's coefficients."""
        w = self.weighting
        return type(w) is UniformWeighting and w.normalize == "mean"

    def _uniform_coefficients(self, losses: Tensor, units: Tensor | None, window: Window) -> Tensor:
        """c of every loss element under the loss's own average over the window (× W
        data-parallel): u / U for per-token losses, 1/N for per-sample ones; the values scalar
        mode's root applies (:meth:`scalar_root`), bit for bit."""
        if units is not None:
            c = units / self._window_units(units, window)
            # (float16/bfloat16 losses: the float32 u / U, which the backward applies rounded
            # to their dtype after a GradScaler's scale, in both modes)
            return c * self.world.size if self.world.distributed else c
        if self.world.distributed:
            return torch.full_like(losses, self.world.size / window.samples)
        return self._inverse_count(losses, window.samples)

    def batch_objective(
        self, losses: Tensor, output: Tensor, y: Tensor, index: Tensor,
        weights: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """One micro-batch's data objective on its own, as if it were the whole window (this
        rank's part of its global batch's, without DDP's factor W): what curvature measures.
        Vector mode: ``weights``, the weighting's for that micro-batch as its step computed
        them (:attr:`batch_weights`, kept by the caller after its backward), so that a
        weighting keeping state of its own is not called again; without them, the weighting's
        for these losses."""
        units = self._units(y, units_dtype(losses.dtype))
        if self.weighting is not None:  # normalized over the global batch under DDP
            if weights is None:
                weights = self.weighting(losses, output, y, index, units)
            return (weights * losses).sum()
        if units is not None:  # data-parallel: the global batch's Σu (0 units: 0, not 0/0)
            total = all_reduce_sum(units.sum())
            return (losses * (units / total.clamp_min(torch.finfo(total.dtype).tiny))).sum()
        if self.world.distributed:  # this rank's part of the global batch's mean
            return losses.sum() / self.global_batch_size()
        return losses.mean()

    # ------------------------------------------------------------------ backward
    def backward(
        self,
        losses: Tensor,
        output: Tensor,
        batch: tuple[Tensor, Tensor, Tensor],
        window: Window,
        *,
        last: bool,
        logs: bool,
    ) -> tuple[Tensor | None, Tensor | None]:
        """One backward pass of the micro-batch's roots: the data root, and the regularizers
        (``last``: the window's last micro-batch; ``logs``: the step logs). Returns the
        gradient weights (vector mode; None in scalar mode) and the loss's unit weights (None
        for per-sample losses)."""
        x, y, index = batch
        units = self.check_losses(losses, y)
        reg = self._regularization() if last and self.regularizers else None  # once a step
        self.reg_in_backward = reg is not None
        aside = None
        if reg is not None and self.reg_after_reduce:  # DDP marks a parameter the forward
            # did not use ready itself; λR's gradient in the same backward marked it again
            # (torch: "marked as ready twice"): added after DDP's average instead, which
            # keeps the λ∇R every rank adds as it is (the same sum)
            aside, reg = reg, None
        if self.input_penalty is not None:  # every micro-batch, by its share of the window
            penalty = self._penalized(losses, x, y, window, logs)
            reg = penalty if reg is None else reg + penalty
        # with the penalty, x requires grad: accumulate into the parameters only, not into x
        inputs = self.params if self.input_penalty is not None else None
        if self.weighting is None:
            backward_scalar(self.scalar_root(losses, units, y, window), self.scaler, reg, inputs)
            weights = None
        else:
            weights = self.vector_weights(losses, output, y, index, units, window)
            backward_vector(losses, weights, self.scaler, reg, inputs)
        if aside is not None:
            self._add_regularization(aside)
        return weights, units

    def _add_regularization(self, reg: Tensor) -> None:
        """λR's gradient (scaled as the step's root under fp16) added to the regularized
        parameters' gradients, by ``torch.autograd.grad``: no DDP hook fires."""
        params = list({id(p): p for r in self.regularizers for p in r.params}.values())
        root = reg if self.scaler is None else self.scaler.scale(reg)
        grads = torch.autograd.grad(root, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)

    def _regularization(self) -> Tensor | None:
        """Σ λR over the regularizers (0-d), added once per optimizer step; None while none
        selects a trainable parameter (every layer it matches frozen: nothing to differentiate)."""
        before = [_kept(r.coef) for r in self.regularizers]
        values = [r.value() for r in self.regularizers]
        #: each regularizer's λ before and after its value() took λR (a callback annealing
        #: it after the backward made grad_norm/reg and /data of the new λ, 2× off: a probe's;
        #: a tensor λ changed in place, or a value() annealing it: a review's)
        self._reg_coef = [(b, _kept(r.coef)) for b, r in zip(before, self.regularizers,
                                                             strict=True)]  # fmt: skip
        self._reg_at = {id(p): (n, p, p._version) for r in self.regularizers
                        for n, p in zip(r.names, r.params, strict=True)}  # fmt: skip
        for r, v in zip(self.regularizers, values, strict=True):  # (metadata: no sync)
            if not isinstance(v, Tensor) or v.ndim != 0:
                shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(
                    f"regularizer {r.name} ({type(r).__name__}): value() returned {shape}, "
                    "must be a 0-d tensor (λ·R summed over its parameters)"
                )
        self.reg_values = [v.detach() for v in values]
        total = values[0] if len(values) == 1 else torch.stack(values).sum()
        return total if total.requires_grad else None

    def _penalized(self, losses: Tensor, x: Tensor, y: Tensor, window: Window, logs: bool):
        """The micro-batch's input-gradient penalty, by its share of the window (× W)."""
        ddp = self._ddp()
        if not ddp:
            return self._input_penalty(losses, x, self._share(y, window), logs)
        # data-parallel: this rank's part of the global mean (× W for DDP's average)
        n_local = y.shape[0]
        if n_local:
            part = self._input_penalty(losses, x, n_local / window.samples, logs)
        else:  # no sample here: nothing to penalize, a part of 0 in the window's values,
            # whose sum every rank then all-reduces (a rank without any skipped the collective
            # on the logging step: a native abort, a probe's)
            part = losses.sum() * 0.0
            self._penalty_window.append(part.detach())
        return part * ddp

    def _input_penalty(self, losses: Tensor, x: Tensor, share: float, logs: bool) -> Tensor:
        """The input-gradient penalty times its share of the window (0-d).

        On windows whose step logs, also its gradient with respect to θ, for grad_norm/reg:
        one extra double-backward pass there (no analytic form exists), none on other steps.
        """
        assert self.input_penalty is not None
        penalty = self.input_penalty.value(losses, x)  # scaled under fp16 with the whole root
        if share != 1.0:
            penalty = penalty * share
        self._penalty_window.append(penalty.detach())
        if logs:
            # fp16: scaled like the step's backward, so the tangent does not underflow
            root = penalty if self.scaler is None else self.scaler.scale(penalty)
            scale = None if self.scaler is None else self.scaler.scale(torch.ones_like(penalty))
            # (the model's buffers kept: a batch norm inside an activation checkpoint,
            # recomputed by this extra backward, moved its statistics once more per logging
            # step, and how often a run logged changed the model, a probe's)
            kept = contextlib.ExitStack()
            if self.model is not None:  # (and its modules' attributes: a tensor of its own
                # state written in place there moved too, a review's)
                kept.enter_context(buffer_values_kept(self.model))
                kept.enter_context(attributes_kept(self.model))
            # (and the random states: a backward hook drawing gradient noise drew again here,
            # and how often a run logged changed the parameters it trained to, a probe's)
            kept.enter_context(forked_rng(penalty.device))
            with kept:
                grads = torch.autograd.grad(root, self.params, retain_graph=True, allow_unused=True)
            for p, g in zip(self.params, grads, strict=True):
                if g is not None:
                    g = g if scale is None else g / scale
                    old = self._penalty_grads.get(id(p))
                    self._penalty_grads[id(p)] = g if old is None else old + g
        return penalty

    # ------------------------------------------------------------------ what a logging step reads
    def reg_grads(self) -> dict[int, Tensor]:
        """The regularizers' part of each regularized parameter's gradient (``id(p)`` -> it):
        the parameter regularizers' analytic gradients and the input penalty's, taken on
        logging windows (data-parallel, summed over the ranks: a collective)."""
        reg_grad = self._penalty_grads_summed()
        at, moved = self._reg_at, self._moved_since_backward()
        coefs = self._reg_coef or [(None, None)] * len(self.regularizers)
        values: list[Tensor | None] = list(self.reg_values) or [None] * len(self.regularizers)
        for r, (then, after), took in zip(self.regularizers, coefs, values, strict=True):
            now = r.coef
            unknown = then is not None and not _same(then, after)  # host read: logging steps
            if not unknown and took is not None and _own_value(r):
                unknown = self._other_value(r, then if then is not None else now, took)
            if unknown and r.name not in self._said_coef:  # (changed inside value(): which
                self._said_coef.add(r.name)  # λ it took is not known)
                log.warning(
                    "grad_norm/data and grad_norm/reg (and grad_agreement/data_reg): NaN on "
                    "steps where regularizer %s's value() changes its λ (%s to %s): which λ "
                    "the step's λR took is not known. Change λ in a callback "
                    "(on_train_step_end) instead (warned once)", r.name, then, after,
                )  # fmt: skip
            if then is not None and not unknown and not _same(then, now):  # (set since the
                r.coef = then  # backward: the gradient of the λ the step holds)
            try:
                grads = r.grad()
            finally:
                r.coef = now
            if unknown:
                grads = [torch.full_like(g, math.nan) for g in grads]
            for p, g in zip(r.params, grads, strict=True):
                if at is not None and id(p) not in at:  # trainable since the backward took
                    continue  # λR (unfrozen in on_after_backward): none of it is in the step
                if moved:  # (not the backward's: every part NaN, the totals with them)
                    g = torch.full_like(g, math.nan)
                reg_grad[id(p)] = reg_grad[id(p)] + g if id(p) in reg_grad else g
        return reg_grad

    def _other_value(self, r: Regularizer, coef: Any, took: Tensor) -> bool:
        """Whether a regularizer whose ``value()`` is its own took another value than
        ``fn(params, λ)``, which its ``grad()`` differentiates (a warm-up scaling λ inside
        value() without storing it: grad_norm/reg 4× the step's, grad_norm/data off with it,
        unsaid, a probe's): then NaN, warned once. One forward of R, on logging steps; within
        the value's own rounding (another order of the same sums)."""
        with torch.no_grad():
            expected = r.fn(*r.params, coef=coef) if r.params else r._zero
        a, b = float(took), float(expected)  # host read: logging steps
        eps = torch.finfo(took.dtype if took.is_floating_point() else torch.float32).eps
        if math.isclose(a, b, rel_tol=8 * eps, abs_tol=0.0) or (math.isnan(a) and math.isnan(b)):
            return False
        if r.name not in self._said_coef:
            self._said_coef.add(r.name)
            log.warning(
                "grad_norm/data and grad_norm/reg (and grad_agreement/data_reg): NaN on steps "
                "where regularizer %s's value() (%s) is not its function at its λ (%s, which "
                "its grad() differentiates): override grad() to match it, or keep the λ it "
                "uses in coef (warned once)", r.name, a, b,
            )  # fmt: skip
        return True

    def updated(self) -> None:
        """The step's update is done (or skipped): what :meth:`reg_grads` compares with the
        backward's weights is over (the update moved them all: a callback asking for them in
        ``on_train_step_end`` got NaN, and a warning blaming a projection, a review's)."""
        self._reg_at = None

    def _moved_since_backward(self) -> bool:
        """Whether a regularized parameter was written in place since the step's backward
        took λR (its version counter; a write through ``.data`` moves none): its analytic
        gradient now is at other weights than the backward's, so ``grad_norm/data``, ``/reg``
        and ``grad_agreement/data_reg`` measured since are NaN, warned once (a probe's
        callback halving a weight in ``on_before_optimizer_step`` logged grad_norm/data 0.710
        for a true 0.382)."""
        if self._reg_at is None:
            return False
        moved = [n for n, p, v in self._reg_at.values() if p._version != v]
        if set(moved) - self._said_moved:
            self._said_moved.update(moved)
            log.warning(
                "grad_norm/data and grad_norm/reg (and, where measured after the change, "
                "grad_agreement/data_reg and the per-sample noise scale, its EMA, "
                "grad_var_trace, grad_signal and grad_snr/*): NaN on steps where a regularized "
                "parameter is changed in place after the step's backward (%s, e.g. a "
                "projection or max-norm constraint in on_after_backward or "
                "on_before_optimizer_step): the regularizers' gradient at the weights the "
                "backward used is no longer known. Constrain the weights in on_train_step_end "
                "(after the update) to keep them (warned once per parameter)",
                few(moved),
            )  # fmt: skip
        return bool(moved)

    def _penalty_grads_summed(self) -> dict[int, Tensor]:
        """The input penalty's θ-gradients of the window, summed over the ranks: one
        collective per parameter dtype, over every trainable parameter in order (0 where this
        rank has none). Each rank summed its own parameters in its own order: a parameter
        used on one rank only (DDP finding unused parameters) made the ranks' collectives
        differ, an abort, or with equal shapes one parameter's gradient added to another's."""
        if not self.world.distributed or self.input_penalty is None:
            return dict(self._penalty_grads)
        groups: dict[torch.dtype, list[Tensor]] = {}
        for p in self.params:
            groups.setdefault(p.dtype, []).append(p)
        summed: dict[int, Tensor] = {}
        for ps in groups.values():
            flat = all_reduce_sum(torch.cat([
                self._penalty_grads.get(id(p), torch.zeros_like(p)).reshape(-1) for p in ps
            ]))  # fmt: skip
            for p, g in zip(ps, flat.split([p.numel() for p in ps]), strict=True):
                summed[id(p)] = g.view_as(p)
        return summed

    def split_norms(self) -> dict[str, Tensor]:
        """grad_norm/reg from the regularizers' analytic gradients (and the input penalty's,
        taken on logging windows), grad_norm/data = the rest of the total gradient."""
        reg_grad = self.reg_grads()
        data = [
            minus(p.grad, reg_grad[id(p)]) if id(p) in reg_grad else p.grad
            for p in self.params
            if p.grad is not None
        ]
        return {
            "grad_norm/data": total_norm(data),
            "grad_norm/reg": total_norm(list(reg_grad.values())),
        }

    def reg_scalars(self) -> dict[str, Tensor]:
        """``reg/<name>`` of the step just taken (device tensors)."""
        values = {
            f"reg/{r.name}": v for r, v in zip(self.regularizers, self.reg_values, strict=True)
        }
        if self.input_penalty is not None and self._penalty_window:
            # data-parallel: each rank holds its part of the global penalty
            values[f"reg/{self.input_penalty.name}"] = all_reduce_sum(
                torch.stack(self._penalty_window).sum()
            )
        return values

    def end_step(self) -> None:
        """Forget the window's penalty values and gradients (after the step's logging)."""
        self._penalty_window.clear()
        self._penalty_grads.clear()
