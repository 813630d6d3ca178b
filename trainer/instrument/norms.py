"""Per-parameter gradient norms, weight norms and update ratios, fused and read in one transfer.

Measured in ``on_before_optimizer_step``: after backward, accumulation and fp16 unscaling, before
clipping. ``torch._foreach_norm`` computes every tensor's norm in one call (one fused kernel per
device and dtype on CUDA); the results go through ``trainer.stage_scalars`` and reach the host
with the step's other scalars in a single transfer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn.utils import get_total_norm

from trainer.callbacks import Callback, Every, StepOutput, param_tag
from trainer.precision import LOW_PRECISION, fused_norms, is_long, long_norms, widen

if TYPE_CHECKING:
    from trainer.loop import Trainer

log = logging.getLogger(__name__)


def needs_care(tensors: Sequence[Tensor]) -> bool:
    """Whether :func:`norms_of` must look at the tensors one by one: float16/bfloat16 ones
    (normed in float32), or long ones on a CPU (:func:`trainer.precision.long_norm`)."""
    return any(t.dtype in LOW_PRECISION or is_long(t) for t in tensors)


def norms_of(tensors: list[Tensor], careful: bool | None = None) -> list[Tensor]:
    """Each tensor's 2-norm, 0-d each, in one fused call (``torch._foreach_norm``): those of
    float16/bfloat16 tensors computed and returned in float32, without copying them, and those
    of tensors long on a CPU by rows (:func:`trainer.precision.long_norm`; torch's own is 1e-5
    to 1e-3 low there). ``careful``: whether there are any (:func:`needs_care`), where the caller
    knows. The others' are what ``_foreach_norm`` gives them, float32 ones bit for bit."""
    if not tensors:
        return []
    if careful is None:
        careful = needs_care(tensors)
    if not careful:
        return list(torch._foreach_norm(tensors))
    fused = fused_norms(tensors)  # (the long ones' rows' norms first: one fused call)
    if fused is not None:
        return fused
    long = [is_long(t) for t in tensors]
    if any(long):
        short = iter(norms_of([t for t, x in zip(tensors, long, strict=True) if not x]))
        rows = iter(long_norms([t for t, x in zip(tensors, long, strict=True) if x]))
        return [next(rows) if x else next(short) for x in long]
    # (a float64, complex or sparse tensor among them, which dtype= does not take: the
    # float16/bfloat16 ones copied to float32)
    wide = [t.float() if t.dtype in LOW_PRECISION else t for t in tensors]
    return list(torch._foreach_norm(wide))


def minus(grad: Tensor, part: Tensor) -> Tensor:
    """``grad - part`` (a gradient less its regularizers' part), float16/bfloat16 ones in
    float32: their own subtraction rounds the difference to the dtype's 8 or 11 bits (in
    float32 it is exact unless their exponents are more than 15 apart)."""
    return widen(grad) - widen(part)


def memory_of(t: Tensor) -> int:
    """Where a tensor's values are (``data_ptr()``; a sparse one's values'), to tell a
    ``t.data = ...`` that keeps the tensor and its version counter."""
    if t.layout == torch.strided:
        return t.data_ptr()
    try:
        return t._values().data_ptr()  # (COO)
    except RuntimeError:
        return t.values().data_ptr()  # (CSR, CSC, BSR, BSC)


def total_norm(tensors: list[Tensor], careful: bool | None = None) -> Tensor:
    """The 2-norm of all of them (``torch.nn.utils.get_total_norm``'s, bit for bit, where none
    is float16/bfloat16 or long on a CPU; else the 2-norm of :func:`norms_of`, in float32 at
    least)."""
    if careful is None:
        careful = needs_care(tensors)
    if not careful or not tensors:  # (none: get_total_norm's 0)
        return get_total_norm(tensors)
    return torch.linalg.vector_norm(torch.stack(norms_of(tensors, careful=True)))


class Norms(Callback):
    """``grad_norm/<param>``, ``grad_norm/total_clipped``, ``param_norm/<param>`` and
    ``update_ratio/<param>`` every ``every_n_steps`` optimizer steps.

    * ``grad_norm/<param>``: ‖g‖₂ of each parameter with a gradient (the squares sum to
      ``grad_norm/total``²). Every norm of a float16/bfloat16 tensor is computed in float32.
    * ``grad_norm/total_clipped``: the total norm measured again after clipping (equal to the
      total when nothing is clipped).
    * ``param_norm/<param>``: ‖θ‖₂ of the weights the step is about to update.
    * ``update_ratio/<param>``: ‖θ_after − θ_before‖₂ / ‖θ_before‖₂ of the step just taken; it
      copies the weights on measuring steps only (one transient copy of the parameters, kept
      from one measuring step to the next only when they follow each other, so measuring every
      step allocates nothing per step). A step the non-finite guard skipped logs 0.
    * with ``agreement``: ``grad_agreement/consecutive``, the cosine between this step's
      gradient and the previous step's (both where the instruments measure, before clipping
      and before a later callback's write in ``on_before_optimizer_step``;
      the step before each measuring step keeps one copy of the gradients until it), and
      ``grad_agreement/data_reg``, the cosine between the data loss's gradient and the
      regularizers' (their analytic gradients; with the input-gradient penalty, whose gradient
      is taken on logging steps, on logging steps only). Negative: they pull apart.
    """

    def __init__(
        self,
        every_n_steps: int,
        param_norm: bool = True,
        update_ratio: bool = True,
        agreement: bool = False,
    ):
        if every_n_steps < 1:
            raise ValueError(f"instrument.norms.every_n_steps: got {every_n_steps}, must be >= 1")
        self.every = Every(every_n_steps)
        self.param_norm, self.update_ratio = param_norm, update_ratio
        self.agreement = agreement
        #: the previous step's gradients (id(param) -> copy), kept from the step before a
        #: measuring step until it
        self._previous: dict[int, Tensor] | None = None
        self._previous_step = -1  # the step whose gradients _previous holds
        self._pending: dict[str | int, Tensor] | None = None
        self._pending_step: int | None = None
        self._warned_gap = False
        self._names: dict[int, str] = {}  # id(parameter) -> its name in the model
        self._before: list[Tensor] | None = None
        self._before_norms: Tensor | None = None
        self._tags: dict[str, tuple[str, ...]] = {}
        self._careful = False  # float16/bfloat16 parameters, or long ones on a CPU

    def on_fit_start(self, trainer: Trainer) -> None:
        self.on_params_change(trainer)
        if self._pending is not None and self.agreement:  # a resumed run's kept gradients
            # (loaded on the CPU; unless this run does not measure agreement), by
            # parameter name (a checkpoint of an earlier version: by position in the params)
            by_name = dict(trainer.model.named_parameters())
            ps = [by_name[k] if isinstance(k, str) else trainer.params[k] for k in self._pending]
            self._previous = {id(p): g.to(p.device) for p, g in zip(ps, self._pending.values(),
                                                                     strict=True)}  # fmt: skip
            # (a checkpoint of an earlier version: kept at its own step, for the next one)
            step = self._pending_step
            self._previous_step = trainer.global_step if step is None else step
        self._pending = None

    def on_params_change(self, trainer: Trainer) -> None:
        """The trainable parameters' positions, tags and dtypes (a layer unfrozen mid-run
        gets its tags from here on); the kept copy of the weights is of the old list."""
        self._names = {id(p): n for n, p in trainer.model.named_parameters()}
        for kind in ("grad_norm", "param_norm", "update_ratio"):
            self._tags[kind] = tuple(param_tag(kind, n) for n in trainer.param_names)
        self._careful = needs_care(trainer.params)
        # (the kept copy is of the old list: no update ratio at a step whose parameters a
        # hook replaced after they were measured, a probe's; between steps, none is kept)
        self._before = self._before_norms = None

    def on_before_optimizer_step(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
        if self.agreement:
            self._agreement(trainer)
        if not self.every.due(trainer.global_step):
            return
        trainer.measure_clipped_norm = True
        with torch.no_grad():  # (the weights themselves, no detached aliases: nothing recorded)
            self._measure(trainer)

    def _measure(self, trainer: Trainer) -> None:
        grads = [p.grad for p in trainer.params if p.grad is not None]
        names = self._tags["grad_norm"]
        if len(grads) < len(names):  # some parameters have no gradient this step
            names = tuple(t for t, p in zip(names, trainer.params, strict=True)
                          if p.grad is not None)  # fmt: skip
        weights: list[Tensor] = [*trainer.params] if self.param_norm or self.update_ratio else []
        # one 1-D tensor for all, the weights' norms after the gradients' when taken in the
        # same call (from ``offset`` on): one entry in the step's single host read
        norms, offset = None, 0
        if grads:
            norms = trainer.shared_grad_norms(grads)  # the guard's, when it checked this step
            if norms is None:  # the gradients' and the weights' norms in one call
                norms = torch.stack(norms_of(grads + weights, self._careful))
                trainer.share_grad_norms(grads, norms)  # the total is taken from them
                offset = len(grads) if weights else 0
            # (a stack of norms, or a slice of one, that nothing writes to: staged as it is,
            # not copied as a user's view is)
            if offset and self.param_norm:  # both kinds as one entry
                trainer.staging.stage({names + self._tags["param_norm"]: norms}, own=False)
            else:
                trainer.staging.stage({names: norms[:offset] if offset else norms}, own=False)
        if not weights:
            return
        weight_norms = None
        if not offset:  # (the gradients' norms came from the guard, or there are none)
            weight_norms = torch.stack(norms_of(weights, self._careful))
            if self.param_norm:
                trainer.stage_scalars({self._tags["param_norm"]: weight_norms})
        if self.update_ratio:
            if weight_norms is None:
                assert norms is not None
                weight_norms = norms[offset:]
            self._before_norms = weight_norms
            if self._before is None:
                self._before = copies(weights, one_launch=weights[0].device.type != "cpu")
            else:  # measuring step after measuring step: the same buffers, refilled
                torch._foreach_copy_(self._before, weights)

    def _agreement(self, trainer: Trainer) -> None:
        with_grad = [p for p in trainer.params if p.grad is not None]
        if self.every.due(trainer.global_step):
            values: dict[str, Tensor] = {}
            previous, self._previous = self._previous, None
            if previous is not None and self._previous_step != trainer.global_step - 1:
                previous = None  # (kept at another step: not this step's previous one)
            if previous is None and trainer.global_step > 1:  # the step before was taken but
                # its gradients were not kept (a run resumed with another cadence, or from a
                # checkpoint that kept none): not available, said so, not left out silently
                nan = torch.full((), math.nan, device=trainer.device)
                values["grad_agreement/consecutive"] = nan
                if not self._warned_gap:
                    self._warned_gap = True
                    log.warning(
                        "grad_agreement/consecutive: step %d's gradients were not kept (a run "
                        "resumed from a checkpoint of another norms cadence, or without "
                        "agreement): NaN at step %d",
                        trainer.global_step - 1, trainer.global_step,
                    )  # fmt: skip
            if previous is not None:
                values.update(_consecutive(trainer.params, previous))
            objective = trainer.objective
            penalty_known = objective.input_penalty is None or trainer.logging_step
            if objective.has_regularizers and penalty_known:
                reg = objective.reg_grads()
                if reg:  # in the whole parameter space (0 where nothing regularizes)
                    data = [minus(p.grad, reg[id(p)]) if id(p) in reg else p.grad  # type: ignore[arg-type]
                            for p in with_grad]  # fmt: skip
                    regs = [reg.get(id(p), torch.zeros_like(p)) for p in with_grad]
                    values["grad_agreement/data_reg"] = _cosine(data, regs)  # type: ignore[arg-type]
            trainer.stage_scalars(values)
        if self.every.due_next(trainer.global_step):  # the next step measures: keep this one's
            self._previous = {id(p): p.grad.detach().clone() for p in with_grad}  # type: ignore[union-attr]
            self._previous_step = trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        """The kept gradients (between a step and the measuring step after it), by parameter
        name: a resumed run measures the same cosine (also where the trainable parameters
        changed during the run: the resumed model may be built with other ones)."""
        previous = self._previous_by_name  # (the step of gradients no longer kept: none, as
        step = -1 if previous is None else self._previous_step  # a resumed run has it)
        return {"previous": previous, "previous_step": step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state.get("previous")  # mapped to the parameters in on_fit_start
        self._pending_step = state.get("previous_step")

    @property
    def _previous_by_name(self) -> dict[str, Tensor] | None:
        if self._previous is None:
            return None
        return {self._names[k]: g for k, g in self._previous.items()}

    def on_train_step_end(self, trainer: Trainer, out: StepOutput) -> None:
        before_norms = self._before_norms
        if before_norms is None:
            return
        self._before_norms = None
        assert self._before is not None
        # θ_before − θ_after in place (its norm is that of the update), then the copy is freed
        # unless the next step measures too (it refills it: no allocation per step)
        delta = self._before
        if not self.every.due_next(out.step):
            self._before = None
        with torch.no_grad():
            torch._foreach_sub_(delta, [*trainer.params])
            moved = torch.stack(norms_of(delta, self._careful))
            # ‖Δθ‖ and ‖θ‖ go to the host together (one kernel), divided there
            both = torch.cat([moved, before_norms.to(moved.dtype)])
        trainer.stage_on_host(both, partial(_ratios, self._tags["update_ratio"]))


def _ratios(tags: tuple[str, ...], values: list[float]) -> dict[str, float]:
    """``update_ratio/<param>`` from ‖Δθ‖ and ‖θ‖ (the first and second half of ``values``):
    0 for a tensor that did not move (a zero one too, not 0/0); Inf for a zero tensor that
    moved (a LoRA factor initialized to 0: it was ‖Δθ‖ over the smallest normal number,
    6.8e35 in float32, or Inf where a float64 parameter made the norms float64); NaN for a
    NaN update."""
    n = len(tags)
    out = {}
    for tag, moved, before in zip(tags, values[:n], values[n:], strict=True):
        if moved == 0:
            out[tag] = 0.0
        elif before == 0:
            out[tag] = math.inf if moved > 0 else moved  # (NaN stays NaN)
        else:
            out[tag] = moved / before
    return out


def copies(tensors: list[Tensor], one_launch: bool) -> list[Tensor]:
    """A copy of each tensor, float16/bfloat16 ones in float32 (exact), so that the update
    θ_before − θ_after taken in the copy is exact in float32 (in their own dtype each element
    of it was rounded: a bfloat16 bias's update ratio was 1.5e-3 off, a probe's): a ``clone``
    each (the quickest on a CPU), or (``one_launch``) empty buffers filled by one
    ``_foreach_copy_``, a single kernel launch on a GPU for all of them instead of one per
    tensor (a model of 150 parameter tensors: 1 launch, not 150)."""
    if not one_launch:
        return [t.float() if t.dtype in LOW_PRECISION else t.clone() for t in tensors]
    out = [torch.empty_like(t, dtype=torch.float32 if t.dtype in LOW_PRECISION else t.dtype)
           for t in tensors]  # (allocations, no kernel)  # fmt: skip
    torch._foreach_copy_(out, tensors)
    return out


def _real(x: Tensor) -> Tensor:
    return torch.view_as_real(x.resolve_conj()) if x.is_complex() else x


def _consecutive(params: Sequence[Tensor], previous: dict[int, Tensor]) -> dict[str, Tensor]:
    """``grad_agreement/consecutive`` in the whole parameter space: a parameter without a
    gradient on one of the two steps (a branch used on some steps, a layer unfrozen at this
    step or frozen since the last one) counts as 0 there, not as absent. (A layer frozen
    since was left out of the previous gradient's norm: 0.738 for a true 0.340, a probe's.)"""
    now: list[Tensor] = []
    before: list[Tensor] = []
    counted = set()
    for p in params:
        g, kept = p.grad, previous.get(id(p))
        if kept is not None and kept.shape != p.shape:  # (another tensor under a freed id)
            kept = None
        if g is None and kept is None:
            continue
        if kept is not None:
            counted.add(id(p))
        now.append(torch.zeros_like(p) if g is None else g)
        before.append(torch.zeros_like(p) if kept is None else kept)
    for key, kept in previous.items():  # no longer trainable: its gradient now counts as 0
        if key not in counted:
            now.append(torch.zeros_like(kept))
            before.append(kept)
    return {"grad_agreement/consecutive": _cosine(now, before)} if now else {}


def _cosine(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """cos(a, b) of two gradients given as lists of tensors (0-d, on the device; NaN if either
    is 0: no direction, where 0 read as orthogonal). A complex tensor counts as its real and
    imaginary parts (Re⟨x, y⟩, the inner product its norm belongs to)."""
    a, b = [_real(x) for x in a], [_real(y) for y in b]
    dot = torch.stack([(x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)]).sum()
    na = torch.stack(norms_of(a)).double().norm()
    nb = torch.stack(norms_of(b)).double().norm()
    # (dot / na) / nb: |dot| <= na·nb, so neither division overflows, and na·nb cannot
    # underflow to 0 for two nonzero gradients
    return torch.where((na > 0) & (nb > 0), dot / na / nb, torch.nan).float()
