"""The non-finite guard: NaN or Inf in the loss or a gradient, caught before the optimizer step.

What a check costs and when its flag is read depends on ``sync``:

* ``step`` (the default on a CPU, where reading a tensor waits for nothing): one kernel,
  GradScaler's own ``_amp_foreach_non_finite_check_and_unscale_`` with a scale of 1 over every
  gradient and the step's losses (exact), and one read of its flag every checked step; a
  failing check looks further, to name the culprit, and the loop skips the update (or raises)
  right there.
* ``deferred`` (the default on an accelerator): one value per gradient and loss that is finite
  exactly where the tensor's values are (:func:`finite_measures`: its largest magnitude, one
  fused call), and the flag from them in one more kernel (the same check kernel, over
  those values), never read per step. The update is made
  conditional on it on the device (trainer/update.py: the fused optimizers' ``found_inf``, as
  ``GradScaler`` does it, or a copy put back with ``torch.where``), and the flags of the steps
  since the last read are kept on the device, with each step's norms, and read on the next
  logging step (at the latest every ``READ_EVERY`` steps, and at the end): the same steps are
  skipped and the same parameters result as with ``step``, bit for bit, and each skipped step
  is logged at its own step with its culprit, only later. With ``policy=raise`` every update
  after the first non-finite step is skipped too, so the error, raised at the read, leaves
  the parameters as they were before that step; with ``policy=skip`` the skipped steps in a
  row are counted on the device as well, and every update from the step that reaches
  ``max_consecutive_skips`` on is skipped, as step mode stops there.

``nonfinite/skipped_steps`` is written at each skipped step either way. A skipped step still
counts as a step: ``global_step``, ``max_steps`` and the learning-rate schedule advance, as
they do for a step ``GradScaler`` skips.

Under ``trainer.precision=16`` the guard checks the loss only: gradients that overflow float16
are the GradScaler's business (it skips those steps and lowers its scale), not an error.
``deferred`` then needs a fused optimizer (the default on CUDA): the loss's flag joins the
``found_inf`` the scaler hands it (trainer/update.py), and neither makes a host read; with any
other optimizer ``GradScaler.step`` reads its own flag every step, and ``auto`` picks ``step``.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from trainer.callbacks import READ_EVERY, Callback, Every, StepOutput
from trainer.distributed import all_reduce_max
from trainer.losses import units_dtype
from trainer.update import skips_on_device, takes_found_inf

if TYPE_CHECKING:
    from trainer.data.base import Batch
    from trainer.loop import Trainer

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """A NaN or Inf reached the loss or a gradient (policy ``raise``), or too many in a row
    (policy ``skip``)."""


class NonfiniteGuard(Callback):
    """``policy="raise"``: stop before the update with an error naming the step and the loss or
    the first parameter with a non-finite gradient. ``policy="skip"``: skip the update (the
    parameters and the optimizer state stay as they are), count it
    (``nonfinite/skipped_steps``, logged at the step) and give up after
    ``max_consecutive_skips`` skipped steps in a row. Skipped steps still count as steps
    (``global_step``, ``max_steps``, the schedule). ``sync``: ``step``, ``deferred`` or
    ``auto`` (deferred on an accelerator, step on a CPU); see the module docstring."""

    def __init__(
        self,
        policy: str = "raise",
        every_n_steps: int = 1,
        max_consecutive_skips: int = 10,
        sync: str = "auto",
    ):
        if policy not in ("raise", "skip"):
            raise ValueError(f"instrument.nonfinite.policy: got {policy!r}, expected raise or skip")
        if sync not in ("auto", "step", "deferred"):
            raise ValueError(
                f"instrument.nonfinite.sync: got {sync!r}, expected auto, step or deferred"
            )
        self.policy, self.max_consecutive, self.sync = policy, max_consecutive_skips, sync
        self.every = Every(every_n_steps)
        self.skipped = 0
        self.consecutive = 0
        #: the last step counted as skipped (a fit called again after a failure later in that
        #: step makes it again: counted once)
        self._counted_to = -1
        #: the buffers said to be non-finite after a skipped step (each said once), and the
        #: floating-point buffers finite when the run started (on_fit_start)
        self._said_buffers: set[str] = set()
        self._watched: list[str] = []
        #: step mode: a skipped step whose buffers are checked once the loop put them back
        self._buffers_step: tuple[int, int | None] | None = None
        #: trainer.precision=16: (step, loss scale) at the last read, and the steps in a row
        #: the GradScaler skipped, as the scale's fall tells
        self._scale_at: tuple[int, float] | None = None
        self._scaler_run = 0
        self._in_step = False  # inside on_before_optimizer_step (the step's update to come)
        #: whether the flags are read on logging steps only (resolved in on_fit_start)
        self.deferred = False
        self._losses: list[Tensor] = []  # the step's micro-batches' losses
        self._indices: list[Tensor] = []  # and their samples' indices in the split
        self._targets: list[Tensor] = []  # and their targets (per-token losses: the units)
        #: deferred: (step, names, norms) of the checked steps not read yet, the norms as the
        #: fused call returned them (0-d each; stacked at the read, all steps' in one)
        self._pending: list[tuple[int, list[str], list[Tensor]]] = []
        #: deferred: whether every later update is skipped (on the device; policy raise: a
        #: non-finite step was seen; skip: ``max_consecutive_skips`` were reached)
        self._latched: Tensor | None = None
        #: deferred, policy skip: the skipped steps in a row, counted on the device
        self._run: Tensor | None = None
        #: deferred, policy skip: (run, latch) before the last counted step, the step, and
        #: the two pairs of buffers the count alternates between (no copy a step): a step
        #: counted again (a fit called again after a failure later in it) starts from them
        self._before: tuple[Tensor, Tensor] | None = None
        self._counted_at = -1
        self._buffers: list[tuple[Tensor, Tensor]] = []
        #: the step a failure was in (on_exception)
        self._failed_at = -1
        #: deferred, policy raise: the error a read raised (the latch stays set: a fit called
        #: again trained nothing, every update skipped, unsaid, a review's)
        self._stopped: str | None = None
        #: policy skip: each trainable parameter's count of infinite elements at the fit's
        #: first micro-batch (after every on_fit_start), None until then
        self._held_at_start: dict[str, int] | None = None
        self._found: Tensor | None = None  # step mode: the check's flag, kept
        #: step mode: whether the kept flag may be set (not read as 0 since the check kernel
        #: last ran on it): zeroed before the next check then only
        self._found_set = False
        self._one: Tensor | None = None  # the check's scale of 1
        self._all_names: tuple[tuple[int, int], list[str]] | None = None

    def on_exception(self, trainer: Trainer, error: BaseException) -> None:
        self._failed_at = trainer.step_in_progress()

    def check_before_fit(self, trainer: Trainer) -> None:
        """``sync=deferred`` with ``precision=16`` and an optimizer that is not fused (before
        a resume moves the run's files; refused in ``on_fit_start`` alone, it came after)."""
        self._deferred(trainer)

    def _deferred(self, trainer: Trainer) -> bool:
        """Whether this fit reads the flags deferred; the refusal above."""
        own = not skips_on_device(trainer.optimizer)  # (its flag is read each step anyway)
        deferred = self.sync == "deferred" or (
            self.sync == "auto" and trainer.device.type != "cpu" and not own
        )
        if deferred and trainer.scaler is not None and not takes_found_inf(trainer.optimizer):
            if self.sync == "deferred":
                raise ValueError(
                    "instrument.nonfinite.sync=deferred with trainer.precision=16 needs a fused "
                    f"optimizer (optimizer.fused=true): GradScaler.step reads its own overflow "
                    f"flag every step with a {type(trainer.optimizer).__name__} that is not "
                    "fused, so there is no sync to save (use sync=step)"
                )
            deferred = False
        return deferred

    def on_fit_start(self, trainer: Trainer) -> None:
        if self._stopped is not None:
            raise NonFiniteError(
                f"{self._stopped}; raised by the last fit: a fit called again does not go on "
                "from it (load a state or a checkpoint of a step before it)"
            )
        # a resumed run's unread flags come from the checkpoint on the CPU: onto the device,
        # where this run's flags are (they are read together)
        self._pending = [(s, n, [t.to(trainer.device) for t in ts]) for s, n, ts in self._pending]
        if self._latched is not None:  # (float: the check kernel's flag)
            self._latched = self._latched.to(trainer.device, torch.float32)
        own = not skips_on_device(trainer.optimizer)  # (its flag is read each step anyway)
        self.deferred = deferred = self._deferred(trainer)
        if self.policy == "skip":  # a skipped step leaves the buffers as they were too
            trainer.restore_buffers_on_skip = True
        self._held_at_start = None  # (taken at this fit's first micro-batch)
        if trainer.scaler is not None and self._scale_at is None:  # host read: once, before
            # the first step (a resumed run: the last read before its checkpoint, kept)
            self._scale_at = (trainer.global_step, trainer.scaler.get_scale())
        elif trainer.scaler is None:
            self._scale_at = None
        self.on_params_change(trainer)
        # the floating-point buffers finite now (a mask of −Inf is non-finite on purpose):
        # those a skipped step is checked for (one host read, before the first step)
        named = [(n, b) for n, b in trainer.model.named_buffers() if b.is_floating_point()]
        finite = torch.stack([torch.isfinite(b).all().cpu() for _, b in named]).tolist() if (
            named
        ) else []  # fmt: skip
        self._watched = [n for (n, _), ok in zip(named, finite, strict=True) if ok]
        if deferred and own:
            log.info(
                "instrument.nonfinite.sync=deferred with a %s, an optimizer of one's own or one "
                "with step hooks: its step is not taken on non-finite gradients and put back "
                "(what it keeps elsewhere, random draws and hooks would see it), so the flag "
                "(deferred mode's, from the norms) is read on the host every step; sync=step "
                "(what auto picks for it) checks each value instead",
                type(trainer.optimizer).__name__,
            )
        elif deferred and trainer.scaler is None and not takes_found_inf(trainer.optimizer):
            log.info(
                "instrument.nonfinite.sync=deferred with a %s that is not fused: each step copies "
                "the parameters and the optimizer state, to put them back if the step was not "
                "finite (optimizer.fused=true avoids it where torch has a fused kernel)",
                type(trainer.optimizer).__name__,
            )

    def on_params_change(self, trainer: Trainer) -> None:
        """Checks the gradients of the parameters trainable now (a layer unfrozen mid-run);
        their infinite elements (a mask of -inf) are counted as they are now (a mask of a
        layer unfrozen mid-run stopped a run beside a transient NaN, a review's)."""
        self._all_names = None
        if self._held_at_start is not None:  # (host read: where the trainable set changes)
            for n, (_, inf) in _nonfinite_counts(trainer).items():
                self._held_at_start.setdefault(n, inf)

    def state_dict(self) -> dict[str, object]:
        """The counts, and in deferred mode the flags not read yet (a resumed run reads them)."""
        return {
            "skipped": self.skipped,
            "consecutive": self.consecutive,
            "pending": [(s, n, torch.stack(ts)) for s, n, ts in self._pending],  # (1-D each)
            "latched": self._latched,
            "scaler_run": self._scaler_run,
            "scale_at": self._scale_at,  # (the streak is counted from this read on)
        }

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])
        self._counted_to = -1
        kept = state.get("pending", [])
        self._pending = [(int(s), list(n), list(t.unbind())) for s, n, t in kept]
        self._latched = state.get("latched")
        # (the device's count of skips in a row, from the loaded count and latch: it went on
        # from the last step's, a review's)
        self._run, self._before, self._buffers, self._counted_at = None, None, [], -1
        self._failed_at, self._stopped = -1, None
        self._scaler_run = int(state.get("scaler_run", 0))  # (older checkpoints: none)
        at = state.get("scale_at")
        self._scale_at = (int(at[0]), float(at[1])) if at is not None else None

    def on_after_backward(
        self, trainer: Trainer, batch: Batch, losses: Tensor, weights: Tensor | None
    ) -> None:
        if self._held_at_start is None and self.policy == "skip":  # (once a fit)
            self._held_at_start = {n: inf for n, (_, inf) in _nonfinite_counts(trainer).items()}
        if self.every.due_next(trainer.global_step):  # the step this micro-batch belongs to
            self._losses.append(losses)
            self._indices.append(batch.index)
            self._targets.append(batch.y)

    def on_before_optimizer_step(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
        self._in_step = True
        try:
            self._before_step(trainer)
        finally:
            self._in_step = False

    def _before_step(self, trainer: Trainer) -> None:
        if self.every.due(trainer.global_step):
            self._check(trainer)
        elif self._latched is not None:  # deferred, a step not checked (every_n_steps > 1):
            # no update after the latch either (a non-finite step with raise; skip: the limit
            # of skips in a row), until the read raises
            trainer.skip_step_where = self._latched
        if (
            self.deferred
            and self._pending
            and (trainer.logging_step or len(self._pending) >= READ_EVERY)
        ):
            self._read(trainer)

    def on_flush(self, trainer: Trainer) -> None:
        # before a checkpoint (which then keeps no unread flag: a resumed run would write the
        # same skips again), after a failure (nothing lost), every READ_EVERY steps
        if self.deferred:
            self._read(trainer)

    def on_fit_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self.deferred:
            self._read(trainer)

    def _check(self, trainer: Trainer) -> None:
        losses, self._losses = self._losses, []
        indices, self._indices = self._indices, []
        targets, self._targets = self._targets, []
        grads: list[Tensor] = []
        if trainer.scaler is None:  # (fp16: overflowing gradients are the GradScaler's)
            grads = [p.grad for p in trainer.params if p.grad is not None]
        tensors = grads + losses
        if not tensors:
            return
        distributed = trainer.world.distributed
        if self.deferred:  # no host read: the update is made conditional on the device
            self._defer(trainer, grads, losses, tensors)
            return
        found = kept = self._any_nonfinite(tensors)
        if found is None:  # sparse or complex gradients: deferred mode's exact measures,
            # checked by the same kernel (a float32 sum of norms overflowed for finite values,
            # and was blind to float16 values that sum to Inf as the optimizer coalesces them)
            found = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
            torch._amp_foreach_non_finite_check_and_unscale_(
                finite_measures(tensors), found, self._ones(found.device)
            )
        if distributed:  # every rank skips if any does: one small all-reduce per checked step
            found = all_reduce_max(found.float())
        if not bool(found):  # host sync: once per checked step
            if kept is not None:  # (0 agreed: 0 here too) the kept flag needs no zeroing
                self._found_set = False
            self.consecutive = 0
            return
        names = self._names(trainer, len(grads), len(losses))
        # (a sparse tensor's values once its repeated indices are summed: two finite ones
        # may add up to Inf)
        finite = torch.stack(
            [torch.isfinite(t.coalesce()._values() if t.is_sparse else t).all() for t in tensors]
        ).tolist()
        bad = [n for n, fine in zip(names, finite, strict=True) if not fine]
        samples = _samples_of(losses, indices) if LOSS in bad else []
        if LOSS in bad and _only_where_no_units(losses, targets, trainer):
            bad = [PADDING if n == LOSS else n for n in bad]
        trainer.skip_step = True  # (before: a skip that stops the run puts buffers back)
        self._skip(trainer, trainer.global_step, bad or [ELSEWHERE], samples=samples)

    def _defer(
        self, trainer: Trainer, grads: list[Tensor], losses: list[Tensor], tensors: list[Tensor]
    ) -> None:
        """Deferred mode's check: per tensor a value finite exactly where its values are
        (:func:`finite_measures`, its largest magnitude; kept, read on the next logging step)
        and the step's skip flag, float 1.0/0.0, from them on the device: the fused optimizers
        take it as ``found_inf`` as it is. Two kernels per step with ``policy=raise`` (the
        measures' fused call, and the check kernel over their list: not stacked, as a step that
        does not log never needs them as one tensor); ``policy=skip`` four more (the flag's
        zeroing, :meth:`_count`'s three): on a launch-bound GPU step each counts. (The float32
        2-norms it took until 2026-12-05 overflowed for finite values; the norms instrument
        and clipping took them too.)"""
        norms = finite_measures(tensors)
        names = self._names(trainer, len(grads), len(losses))
        distributed = trainer.world.distributed
        if self.policy == "raise" and not distributed:
            # every update from the first non-finite step on: the latch is the flag itself,
            # set by the check and never cleared (the read raises)
            if self._latched is None:
                self._latched = torch.zeros((), dtype=torch.float32, device=norms[0].device)
            flag = self._latched
        else:
            flag = torch.zeros((), dtype=torch.float32, device=norms[0].device)
        # (×1 in place on each 0-d norm: no bit changes)
        torch._amp_foreach_non_finite_check_and_unscale_(norms, flag, self._ones(flag.device))
        if distributed:
            flag = all_reduce_max(flag)  # every rank skips if any does (its losses are its own)
        if self.policy == "skip":
            trainer.skip_step_where = self._count(flag, trainer.global_step)
        elif distributed:
            self._latched = flag if self._latched is None else torch.maximum(self._latched, flag)
            trainer.skip_step_where = self._latched
        else:
            trainer.skip_step_where = flag  # (the latch itself)
        if not distributed:
            self._pending.append((trainer.global_step, names, norms))
            return
        # the agreed flag after the norms: a step skipped for another rank's values counts
        self._pending.append((trainer.global_step, [*names, SKIPPED], [*norms, flag]))

    def _count(self, flag: Tensor, step: int) -> Tensor:
        """Deferred ``policy=skip``: the skipped steps in a row counted on the device too (from
        the host's count at the last read), so that from the step that reaches
        ``max_consecutive_skips`` on, every update is skipped, as step mode stops there (the
        read raises, naming that step); a latch, never cleared. Returns the step's skip flag.
        Three small kernels a step (policy ``raise`` needs none: its flag is its latch): the
        skip is the flag or the latch; a latched step counts as skipped, so the run only grows
        from there and the latch, ``run >= max``, holds."""
        if self._latched is None:
            self._latched = torch.zeros((), dtype=torch.float32, device=flag.device)
        if self._run is None or self._run.device != flag.device:  # (from the host's count; a
            # latch kept from before, a resumed run's, starts it at the limit: it holds)
            self._run = torch.full((), float(self.consecutive), device=flag.device)
            self._run.add_(self._latched, alpha=self.max_consecutive)
            spare = (torch.empty_like(self._run), torch.empty_like(self._latched))
            self._buffers = [(self._run, self._latched), spare]
            self._before, self._counted_at = None, -1
        before = (self._run, self._latched)
        if step == self._counted_at == self._failed_at and self._before is not None:
            # the failed step counted again (a fit called again after a failure later in
            # it): from the count before it (counted twice, it latched early: every later
            # update skipped, unsaid, a review's)
            before = self._before
        run, latched = next(b for b in self._buffers if b[0] is not before[0])
        skip = torch.maximum(flag, before[1])  # (float 1.0 skipped, 0.0 not)
        torch.addcmul(skip, before[0], skip, out=run)  # run = skip · (run + 1)
        torch.ge(run, self.max_consecutive, out=latched)
        self._before, self._counted_at = before, step
        self._run, self._latched = run, latched
        return skip

    def _ones(self, device: torch.device) -> Tensor:
        """The check kernel's scale of 1 (float32), kept."""
        if self._one is None or self._one.device != device:
            self._one = torch.ones((), dtype=torch.float32, device=device)
        return self._one

    def _any_nonfinite(self, tensors: list[Tensor]) -> Tensor | None:
        """Step mode's check, exact and in one kernel: GradScaler's own
        ``_amp_foreach_non_finite_check_and_unscale_`` with a scale of 1 (it multiplies every
        value by 1.0, which changes no bit), then one host read. 12 µs against 28 µs for the
        norms on the digits MLP's CPU step. None where it does not apply (tensors on several
        devices, sparse or complex gradients, bfloat16 ones off a CPU: CUDA's kernel is not
        implemented for them): the caller checks with :func:`finite_measures` instead."""
        device = tensors[0].device
        if any(t.device != device or t.is_sparse or t.is_complex() for t in tensors):
            return None  # (the kernel takes neither sparse nor complex tensors)
        if device.type != "cpu" and any(t.dtype == torch.bfloat16 for t in tensors):
            return None
        if self._found is None or self._found.device != device:
            # float32 whatever the default dtype: the kernel takes nothing else
            self._found = torch.zeros((), dtype=torch.float32, device=device)
            self._found_set = False
        found = self._found
        if self._found_set:  # (the kernel only ever sets it: zeroed unless read as 0 since)
            found.zero_()
        self._found_set = True
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, self._ones(device))
        except RuntimeError as e:  # an expanded tensor (a batch-level loss broadcast to (B,)):
            # the kernel writes in place and refuses one whose elements share memory; those
            # are checked as copies (the kernel only sets the flag: a pass it stopped in
            # leaves it as the values it met had it)
            if "single memory location" not in str(e):
                raise
            tensors = [t.clone() if _overlapping(t) else t for t in tensors]
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, self._ones(device))
        return found  # (read by the caller: once per checked step)

    def _names(self, trainer: Trainer, grads: int, losses: int) -> list[str]:
        """The checked tensors' names: the parameters with a gradient, then the losses (kept
        for the usual case, every parameter with a gradient; not to be changed)."""
        if grads in (0, len(trainer.params)):  # (0: fp16, the losses only)
            key = (grads, losses)
            if self._all_names is None or self._all_names[0] != key:
                self._all_names = (key, [*trainer.param_names[:grads], *[LOSS] * losses])
            return self._all_names[1]
        names = [n for n, p in zip(trainer.param_names, trainer.params, strict=True)
                 if p.grad is not None][:grads]  # fmt: skip
        return names + [LOSS] * losses

    def _read(self, trainer: Trainer) -> None:
        """Deferred mode: the kept flags' steps, in order, as step mode would have met them."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        # (stack promotes: float64 norms of a float64 model read as they are)
        values = torch.stack([t for _, _, ts in pending for t in ts]).tolist()  # host sync:
        start = 0  # logging steps only (and every READ_EVERY steps, and at the end)
        for step, names, norms in pending:
            stop = start + len(norms)
            step_values = values[start:stop]
            start = stop
            skipped = False
            if names and names[-1] == SKIPPED:  # the norms, then the flag all ranks agreed on
                names, (*step_values, flag) = names[:-1], step_values
                skipped = bool(flag)
            bad = [n for n, v in zip(names, step_values, strict=True) if not math.isfinite(v)]
            if skipped and not bad:  # another rank's values (data-parallel)
                bad = [ELSEWHERE]
            if not bad:
                self.consecutive = 0
                continue
            self._skip(trainer, step, bad, read_at=trainer.global_step)

    def on_train_step_end(self, trainer: Trainer, out: StepOutput) -> None:
        if self._buffers_step is not None:  # (a buffer the loop could not put back: one
            (step, read_at), self._buffers_step = self._buffers_step, None  # of a new shape)
            self._buffers_hit(trainer, step, read_at)
        if self._scale_at is not None and out.should_log and trainer.scaler is not None:
            self._watch_scale(trainer, out.step)

    def _watch_scale(self, trainer: Trainer, step: int) -> None:
        """trainer.precision=16 leaves non-finite gradients to the GradScaler, which skips the
        step and lowers its scale: a gradient that is NaN at every scale (not an overflow)
        had it skip every step, its scale fall to 0, and the run complete having trained
        nothing, unsaid (a probe's finding). On logging steps, with the read there: the scale
        is logged (``amp/scale``), and every step since the last read was skipped where it fell
        by the backoff factor once per step (growth needs a clean step), or to 0;
        ``max_consecutive_skips`` such steps in a row with the scale below float16's smallest
        subnormal, 2⁻²⁴ (40 halvings from 2¹⁶: the scaled gradients underflow, nothing can
        train; a model whose float16 gradients overflow at a scale of 1 trains below 1), or at
        0, stop the run."""
        scaler = trainer.scaler
        assert scaler is not None and self._scale_at is not None
        now = scaler.get_scale()  # host sync: logging steps only
        trainer.stage_scalars({"amp/scale": now})
        before_step, before = self._scale_at
        self._scale_at = (step, now)
        n = step - before_step
        # (the scale is float32: it reaches 0 where the float64 product does not)
        # (0 stays 0: every step since a read of 0 was skipped too)
        every = n > 0 and (now == 0.0 or before > 0 and math.isclose(
            now, before * scaler.get_backoff_factor() ** n, rel_tol=1e-6, abs_tol=0.0))  # fmt: skip
        self._scaler_run = self._scaler_run + n if every else 0
        if now == 0.0 or (self._scaler_run >= self.max_consecutive and now < UNDERFLOW_SCALE):
            # (a scale of 0 stays 0, every step skipped, however it got there: a resume past
            # it, or a limit above the ~166 halvings that take 2^16 to 0: a review)
            since = f"steps {step - self._scaler_run + 1}-{step}" if self._scaler_run else (
                f"step {step}")  # fmt: skip
            raise NonFiniteError(
                f"{since}: the GradScaler skipped every "
                f"step (trainer.precision=16; its loss scale fell to {now:.3g}, below float16's "
                "smallest subnormal, where the scaled gradients underflow): the gradients are "
                "not finite at any usable scale (a NaN, not an overflow), and nothing trains "
                f"(instrument.nonfinite.max_consecutive_skips={self.max_consecutive}; "
                "trainer.precision=32 or bf16 lets the guard name the parameter)"
            )

    def _buffers_hit(self, trainer: Trainer, step: int, read_at: int | None) -> None:
        """Say which of the buffers finite at the start hold non-finite values after a skipped
        step (each once): the skip leaves the parameters and the optimizer's state as they
        were, but the step's forward has already updated the buffers a training-mode forward
        updates (a BatchNorm's running statistics), and a NaN batch made every later
        validation NaN in a run that completed (a probe's finding). A host read on skipped
        steps only. Deferred, the buffers are read when the flags are: after later steps."""
        named = dict(trainer.model.named_buffers())
        watched = [n for n in self._watched if n in named and n not in self._said_buffers]
        if not watched:
            return
        bad = torch.stack([~torch.isfinite(named[n]).all().cpu() for n in watched]).tolist()
        hit = [n for n, x in zip(watched, bad, strict=True) if x]  # (host sync above: skipped
        if not hit:  # steps only)
            return
        self._said_buffers.update(hit)
        when = (
            f"step {step} skipped"
            if read_at is None
            else f"step {step} skipped (its "
            f"flag read at step {read_at}: a later skipped step may have written them)"
        )
        log.warning(
            "%s, but the model's buffers %s%s hold non-finite values: a training-mode forward "
            "updates them (a BatchNorm's running statistics) before the step is checked, and a "
            "skip leaves only the parameters and the optimizer's state as they were; evaluation "
            "with them is NaN from here on (resume from a checkpoint before the step, or keep "
            "such batches out)", when, ", ".join(hit[:3]), " …" if len(hit) > 3 else "",
        )  # fmt: skip

    def _skip(
        self,
        trainer: Trainer,
        step: int,
        bad: list[str],
        read_at: int | None = None,
        samples: list[int] | None = None,
    ) -> None:
        """Step ``step`` had non-finite ``bad`` values: raise, or count it as skipped
        (``samples``: the training split's samples whose losses were not finite, where
        known)."""
        counts = _nonfinite_counts(trainer)  # (one host read: a failing step only)
        held = [n for n, (nan, inf) in counts.items() if nan or inf]
        # parameters holding NaN, or more infinite elements than at the fit's start: a skip
        # leaves them so (with every_n_steps > 1 the unchecked steps went on updating with NaN,
        # and the run ended "completed" on NaN weights, a probe's; so did a resume of a
        # checkpoint holding that NaN, a review's); a mask of -inf the model has from the
        # start is not counted (it stopped a run beside a transient NaN: reviews'), nor named
        start = self._held_at_start or {}
        spoiled = [n for n in held if counts[n][0] or counts[n][1] > start.get(n, 0)]
        cause = (
            _cause(bad, samples) + _weights_cause(trainer)
            + _params_cause(held if self.policy == "raise" else spoiled, self.every.n)
        )  # fmt: skip
        spoiled = spoiled if self.policy == "skip" else []
        if self.policy == "raise":
            later = _read_later(step, read_at)
            message = (
                f"step {step}: {cause}; stopped before the optimizer step{later} "
                "(instrument.nonfinite.policy=skip skips such steps instead)"
            )
            if read_at is not None:  # (deferred: the latch stays, skipping every update)
                self._stopped = f"{message}, and every update from that step on was skipped"
            raise NonFiniteError(message)
        if spoiled:
            read = (f" (read at step {read_at}, with instrument.nonfinite.sync=deferred)"
                    if read_at is not None else "")  # fmt: skip
            message = (
                f"step {step}: {cause}; stopped{read}: {spoiled[0]}"
                f"{f' (and {len(spoiled) - 1} more)' if len(spoiled) > 1 else ''} holds "
                "NaN, or Inf it did not hold when the fit started: skipping steps leaves it so"
            )
            self._stopped = message  # (a fit called again: the parameters are still so)
            self._put_back(trainer)
            raise NonFiniteError(message)
        if step > self._counted_to:  # (made again by a fit called again after a later hook
            # of it failed: it was counted twice, a probe's)
            self.skipped += 1
            self.consecutive += 1
            self._counted_to = step
        value = {"nonfinite/skipped_steps": float(self.skipped)}
        if read_at is None:
            trainer.stage_scalars(value)
        elif trainer.logger is not None:  # written at its own step (nothing else staged)
            trainer.logger.add_floats(value, step)
        log.warning("step %d skipped: %s", step, cause)
        if self._in_step and trainer.restore_buffers_on_skip:  # (the loop puts this step's
            if self.consecutive < self.max_consecutive:  # back after this hook: checked
                self._buffers_step = (step, read_at)  # after that; at the limit the run
        else:  # stops below, before any restore; a flag read at a logging step had said
            self._buffers_hit(trainer, step, read_at)  # buffers it then restored: a probe)
        if self.consecutive >= self.max_consecutive:
            later = _read_later(step, read_at)
            self._put_back(trainer)
            raise NonFiniteError(
                f"step {step}: {self.consecutive} steps in a row skipped for "
                f"non-finite values (instrument.nonfinite.max_consecutive_skips="
                f"{self.max_consecutive}); the last: {cause}{later}; {_largest_weight(trainer)}"
            )

    def _put_back(self, trainer: Trainer) -> None:
        """A skip that stops the run, inside a step: the buffers its forward changed (a NaN
        batch's BatchNorm statistics) put back first, as the loop does after a skipped step's
        update (they stayed, unsaid, in the model a fit called again from Python then had, or
        one's own ``on_exception`` saved). The step is skipped: step mode's ``skip_step``, or
        deferred, the device's flag of this step (latched by the skips read)."""
        if self._in_step and trainer.restore_buffers_on_skip:
            trainer.put_back_buffers()


#: a loss scale below float16's smallest subnormal: the scaled backward underflows
UNDERFLOW_SCALE = 2.0**-24

#: the name the step's losses go by among the checked tensors
LOSS = "\0loss"
#: the same, non-finite only where the loss's units are 0 (padding)
PADDING = "\0loss at padding"
#: the culprit of a step skipped for another rank's values (data-parallel)
ELSEWHERE = "\0another rank"
#: deferred: the name of the kept step's skip flag, after its norms
SKIPPED = "\0skipped"


def _read_later(step: int, read_at: int | None) -> str:
    """Deferred mode: when the flag was read, and which steps updated nothing."""
    if read_at is None:
        return ""
    steps = f"step {step}" if read_at == step else f"steps {step}-{read_at}"
    return (
        f" (read at step {read_at}, with instrument.nonfinite.sync=deferred: {steps} "
        "updated nothing)"
    )


def _largest_weight(trainer: Trainer) -> str:
    """The parameters' largest magnitude, in words (a host read: a failing run only). A
    learning rate far too large leaves them finite but huge after one update, and every
    later forward overflows: the error named only the loss and the gradients."""
    params = [p.detach() for p in trainer.params if p.numel()]
    if not params:
        return "the trainable parameters hold no element"
    largest = float(torch.stack([p.abs().max().float() for p in params]).max())
    if not math.isfinite(largest):  # (named in the cause: _params_cause)
        return "the parameters hold non-finite values"
    return (
        f"the parameters' largest magnitude is now {largest:.3g} (a huge one would say an "
        "update too large, from the learning rate say, left them finite but so large that "
        "every forward overflows; a small one points at the data or the loss)"
    )


def _nonfinite_counts(trainer: Trainer) -> dict[str, tuple[int, int]]:
    """Each trainable parameter's counts of NaN and of infinite elements (a host read: a
    fit's first micro-batch, with policy skip, and a failing step only)."""
    named = [(n, p) for n, p in zip(trainer.param_names, trainer.params, strict=True)
             if p.numel() and (p.is_floating_point() or p.is_complex())]  # fmt: skip
    if not named:
        return {}
    device = named[0][1].device
    counts = torch.stack([
        torch.stack([torch.isnan(p.detach()).sum(), torch.isinf(p.detach()).sum()]).to(device)
        for _, p in named
    ])  # fmt: skip
    pairs = [(int(a), int(b)) for a, b in counts.tolist()]  # host sync: once, as said above
    return dict(zip([n for n, _ in named], pairs, strict=True))


def _params_cause(bad: list[str], every: int = 1) -> str:
    """The trainable parameters ``bad`` that hold NaN/Inf now, named: an update never writes
    one under the guard, so they were written around it (by hand, by a callback, a loaded
    state) or by an update that overflowed, and every gradient is non-finite from there (a
    probe's Inf weight was blamed on the first layer's gradient, and never named)."""
    if not bad:
        return ""
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    unchecked = (f", a step the guard did not check (instrument.nonfinite.every_n_steps="
                 f"{every})" if every > 1 else "")  # fmt: skip
    return (
        f"; the parameter {bad[0]}{more} holds NaN/Inf itself now (a checked step's "
        "non-finite update never reaches the parameters: written by hand, by a callback or a "
        f"loaded state{unchecked}, or an update that overflowed)"
    )


def finite_measures(tensors: list[Tensor]) -> list[Tensor]:
    """Each tensor's largest magnitude, 0-d each: finite exactly where all its values are (NaN
    where one is NaN, else +Inf where one is infinite), as it cannot overflow. What deferred
    mode keeps to name a culprit, and its flag comes from (and step mode's where its kernel
    does not apply). One fused call (``torch._foreach_norm`` with ord inf) per dtype (and
    device, where the list holds several dtypes; a model split over devices is not supported:
    the check kernel takes tensors on one); float16/bfloat16 ones in float32; complex tensors
    as their real and imaginary parts (|z| overflows for parts near the dtype's largest
    value); sparse ones by their values once repeated indices are summed, in their dtype, as
    the optimizer sums them (one call each, as empty ones). Deferred mode took float32
    2-norms until 2026-12-05, whose squares overflow above about 1e19: a probe's diverging run
    was then skipped there and not in step mode, its finite values called non-finite."""
    # the usual list (one dtype, dense, none empty) in one pass: the per-tensor checks below
    # took ~0.5 µs a tensor of host time every step
    kinds = {(t.dtype, t.layout, t.numel() > 0) for t in tensors}
    if len(kinds) == 1:
        dtype, layout, filled = next(iter(kinds))
        if layout == torch.strided and filled and not dtype.is_complex:
            return list(torch._foreach_norm(tensors, math.inf, dtype=_measured_in(dtype)))
    real = [_real(t) for t in tensors]
    fused = [t.layout == torch.strided and t.numel() > 0 for t in real]
    # (a list of several dtypes or devices took torch's per-tensor path: bfloat16 parameters
    # beside float32 losses)
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(real):
        if fused[i]:
            groups.setdefault((t.dtype, t.device), []).append(i)
    out: list[Tensor | None] = [None] * len(real)
    for (dtype, _), at in groups.items():
        group = [real[i] for i in at]
        for i, m in zip(at, torch._foreach_norm(group, math.inf, dtype=_measured_in(dtype)),
                        strict=True):  # fmt: skip
            out[i] = m
    return [m if m is not None else _largest(t) for m, t in zip(out, real, strict=True)]


def _measured_in(dtype: torch.dtype) -> torch.dtype | None:
    """float16/bfloat16 measures in float32 (exact: the largest magnitude; CUDA's check
    kernel, which takes the measures, is not implemented for bfloat16), others in their own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else None


def _real(t: Tensor) -> Tensor:
    """A complex tensor's real and imaginary parts (a view, or a copy where autograd left the
    conjugate flag: the gradient of a forward through ``c.conj()``), others as they are."""
    if t.is_complex() and t.layout == torch.strided:
        return torch.view_as_real(t.resolve_conj())
    return t


def _largest(t: Tensor) -> Tensor:
    """max |t| of a sparse or empty tensor (NaN if a value is NaN), 0 for no values."""
    values = _real(t.coalesce()._values() if t.is_sparse else t)
    dtype = _measured_in(values.dtype) or values.dtype
    if not values.numel():
        return torch.zeros((), dtype=dtype, device=t.device)
    return torch.linalg.vector_norm(values, math.inf, dtype=dtype)


def _samples_of(losses: list[Tensor], indices: list[Tensor]) -> list[int]:
    """The indices of the samples whose losses (a row of them, per token) are not all finite
    (host sync: a failing step only)."""
    if len(losses) != len(indices):
        return []
    found = []
    for ell, index in zip(losses, indices, strict=True):
        if ell.ndim == 0 or ell.shape[0] != index.shape[0]:
            return []
        rows = (~torch.isfinite(ell.detach())).reshape(ell.shape[0], -1).any(1)
        found += index[rows.to(index.device)].tolist()
    return found


def _only_where_no_units(losses: list[Tensor], targets: list[Tensor], trainer: Trainer) -> bool:
    """Whether a per-token loss's non-finite values all sit where its units are 0 (padding),
    as a loss of one's own computing -log(0) at a padded target makes them (host sync: a
    failing step only; a probe's: steps skipped, the samples named, nothing said of padding)."""
    loss = getattr(getattr(trainer, "objective", None), "loss", None)
    if loss is None or not getattr(loss, "has_units", False) or len(losses) != len(targets):
        return False
    seen = False
    for ell, y in zip(losses, targets, strict=True):
        units = loss.units(y, units_dtype(ell.dtype))
        if units is None or units.shape != ell.shape:
            return False
        off = ~torch.isfinite(ell.detach())
        if bool((off & (units != 0)).any()):
            return False
        seen = seen or bool(off.any())
    return seen


def _cause(bad: list[str], samples: list[int] | None = None) -> str:
    """What went non-finite, in words (``samples``: whose losses, where known)."""
    parts = []
    if PADDING in bad:
        parts.append(
            "non-finite loss at positions its units weigh 0 alone (padding"
            + (f", of training samples {samples[:5]}" if samples else "")
            + "): Σuℓ / Σu, train/loss and this check read every element, and 0·Inf is NaN; "
            "make the loss finite (0) where its units are 0, as ignore_index does"
        )
    if ELSEWHERE in bad:
        parts.append("a non-finite loss or gradient on another rank (data-parallel: every rank "
                     "acts on the step together; that rank's log names it)")  # fmt: skip
    if LOSS in bad:
        which = ""
        if samples:  # (a NaN target, input or weight of these: a sample to look at)
            more = f" (+{len(samples) - 5})" if len(samples) > 5 else ""
            which = f" of training samples {samples[:5]}{more}, by index in the split"
        parts.append(f"non-finite loss (NaN/Inf in the per-sample losses{which})")
    grads = [n for n in bad if n not in (LOSS, PADDING, ELSEWHERE)]
    if grads:
        more = f" (and {len(grads) - 1} more)" if len(grads) > 1 else ""
        parts.append(f"non-finite gradient of {grads[0]}{more}")
    return "; ".join(parts)


def _weights_cause(trainer: Trainer) -> str:
    """A weighting of one's own whose raw weights went negative or non-finite since it was
    last checked: the likely cause of a non-finite gradient, said (host sync: a failing step
    only)."""
    weighting = getattr(getattr(trainer, "objective", None), "weighting", None)
    problem = weighting.raw_problem() if weighting is not None else None
    return f" ({problem})" if problem else ""


def _overlapping(t: Tensor) -> bool:
    """Whether elements of ``t`` share memory (a stride of 0 along a dimension of 2 or more)."""
    return any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape, strict=True))
