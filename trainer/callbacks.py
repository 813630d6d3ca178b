"""Callbacks: the hooks a training run calls, what they receive, and when they are due.

Instrumentation, user callbacks and the trainer's own periodic jobs all hang off these hooks;
none of them edits the step body. This module imports no part of the loop, so a callback module
imports it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from trainer.data.base import Batch
    from trainer.loop import Trainer


#: what is measured on the device without being read (deferred flags, scalars of steps that do
#: not log) is read at the next logging step, and at the latest every this many steps
READ_EVERY = 1000


@dataclass(frozen=True)
class Every:
    """A cadence: due on every ``n``-th optimizer step (steps count from 1; ``n=0``: never).

    ``due(step)`` is asked inside a step's hooks, where ``trainer.global_step`` is the step being
    taken; ``due_next(step)`` before it, from a micro-batch whose step is ``step + 1``.
    """

    n: int

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"every_n_steps: got {self.n}, must be >= 0 (0: never)")

    def due(self, step: int) -> bool:
        return self.n > 0 and step % self.n == 0

    def due_next(self, step: int) -> bool:
        return self.n > 0 and (step + 1) % self.n == 0


@dataclass
class StepOutput:
    """What ``on_train_step_end`` receives about the optimizer step just taken."""

    step: int  # optimizer steps taken, this one included
    epoch: int  # 0-based epoch of this step
    batch: Batch  # the window's last micro-batch
    losses: Tensor  # (B,) or (B, T) detached losses of that micro-batch
    weights: Tensor | None  # its gradient weights (vector mode), as passed to backward
    grad_norm: Tensor | None  # 0-d total L2 norm before clipping (when clipping or logging)
    should_log: bool
    skipped: bool = False  # a callback (the non-finite guard) skipped the update
    #: where the skip was decided on the device, without a host read (the guard's deferred
    #: mode, ``trainer.skip_step_where``): the 0-d flag, True where the update was skipped
    #: (``skipped`` is then False: the host does not know); None otherwise
    skip_where: Tensor | None = None


class Stateful:
    """What a checkpoint keeps of a part of one's own (a loss, a weighting, a regularizer)
    that has state: a running mean of the losses, a call counter, an annealed coefficient.
    Without it a resumed run started that state afresh and trained differently from the
    uninterrupted one, without a word. The same contract as :meth:`Callback.state_dict`:
    tensors, containers and primitives, checked when the run starts and at each checkpoint;
    data-parallel, rank 0's is kept and every rank resumes with it."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue exactly; {}: nothing."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (nothing kept)
        """Restore :meth:`state_dict`'s output (tensors on the CPU: move them as needed)."""


class Callback:
    """Base class for callbacks: override any hook; each is called as ``hook(trainer, ...)``.

    Hooks, in the order they fire (and ``check_before_fit(trainer)``, a read-only check
    that refuses a setting before any file is written or moved):

    * ``on_fit_start(trainer)``
    * ``on_train_epoch_start(trainer, epoch)``
    * ``on_params_change(trainer)``: the parameters' ``requires_grad`` flags changed (a layer
      unfrozen or frozen by a callback), seen before a micro-batch or before an optimizer
      step: ``trainer.params`` and ``trainer.param_names`` are the trainable ones again; a
      callback keeping per-parameter state rebuilds it here
    * ``on_train_batch_start(trainer, batch)``: every micro-batch, before its forward
    * ``on_before_backward(trainer, batch, losses)``: every micro-batch, after its forward and
      loss (``losses`` (B,) or (B, T), still on the graph), before its backward
    * ``on_after_backward(trainer, batch, losses, weights)``: every micro-batch, right after its
      backward; ``losses`` (B,) or (B, T) detached, ``weights`` of their shape or None in scalar
      mode; gradients are still accumulating and, under fp16, multiplied by
      ``trainer.scaler.get_scale()``
    * ``on_before_optimizer_step(trainer, optimizer)``: gradients final (accumulated, unscaled),
      not yet clipped; ``trainer.global_step`` is the step being taken, ``trainer.logging_step``
      whether it logs. Setting ``trainer.skip_step = True`` skips the update (parameters and
      optimizer state untouched; the schedule advances), setting ``trainer.skip_step_where``
      to a 0-d bool tensor skips it where that is True, decided on the device (no host read)
    * ``on_train_step_end(trainer, out: StepOutput)``: after step, scheduler and zero_grad
    * ``on_validation_end(trainer, metrics)``: after each epoch's validation
    * ``on_rest_point(trainer)``: a point the run can be checkpointed at and resumed from
      exactly: after an optimizer step and its logging, except an epoch's last step, whose
      rest point is after the epoch's validation. ``trainer.stopped_by`` (set here, the same on
      every rank) says the run stops at this one (a stop signal)
    * ``on_flush(trainer)``: the values measured on steps that did not log are being written
      (every ``READ_EVERY`` steps, before a checkpoint, at the end, after a failure). A logging
      step writes the loop's with its own read, and does not call this hook: a callback's
      own unread values are read at its logging step in ``on_train_step_end``
      (``trainer.logging_step``), and here, so a checkpoint holds none and a failed run loses
      none
    * ``on_fit_end(trainer, metrics)``: training over, also when stopped by a signal; every
      callback's runs, also past one that raises (the run then fails with the first error)
    * ``on_exception(trainer, error)``: instead of ``on_fit_end`` when ``fit`` raises (then
      re-raised; also after an ``on_fit_start`` raised): release what ``on_fit_start`` took.
      Every callback's runs, also past one that raises (logged); after an ``on_fit_end``
      raised, only that callback's

    Scalars a callback measures go through ``trainer.stage_scalars``: they are read back to the
    host together with the next logging step's own (this step's, if it logs), in one transfer,
    and written at the step they were staged at; a staged tensor must stay as it is until then.
    A callback's cadence is an :class:`Every`. Per-token losses (B, T) reach the hooks with that
    shape, and so do their weights.
    """

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep for a resumed run to continue exactly (an RNG's
        state, a counter); tensors, containers and primitives only (NumPy values are stored
        as Python numbers and tensors; anything else a safe load refuses stops the run:
        :func:`trainer.checkpoint.checkpointable`). A resumed run's
        :meth:`load_state_dict` gets the tensors on the CPU (checkpoints load with
        ``map_location="cpu"``): move those the callback keeps on the device in
        :meth:`on_fit_start`, as the built-in instruments do."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def check_before_fit(self, trainer: Trainer) -> None:
        """Refuse a setting (raise, naming it) before anything is written or moved:
        ``trainer.run`` calls it before a resume sets the later checkpoints aside and drops
        their events, and before an earlier run in the folder is set aside; ``fit`` again
        after ``on_fit_start``. Read only: no state changed here."""

    def on_fit_start(self, trainer: Trainer) -> None: ...
    def on_train_epoch_start(self, trainer: Trainer, epoch: int) -> None: ...
    def on_params_change(self, trainer: Trainer) -> None: ...
    def on_train_batch_start(self, trainer: Trainer, batch: Batch) -> None: ...
    def on_before_backward(self, trainer: Trainer, batch: Batch, losses: Tensor) -> None: ...
    def on_after_backward(
        self, trainer: Trainer, batch: Batch, losses: Tensor, weights: Tensor | None
    ) -> None: ...
    def on_before_optimizer_step(
        self, trainer: Trainer, optimizer: torch.optim.Optimizer
    ) -> None: ...
    def on_train_step_end(self, trainer: Trainer, out: StepOutput) -> None: ...
    def on_validation_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...
    def on_rest_point(self, trainer: Trainer) -> None: ...
    def on_flush(self, trainer: Trainer) -> None: ...
    def on_fit_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...
    def on_exception(self, trainer: Trainer, error: BaseException) -> None: ...


HOOKS = tuple(name for name in vars(Callback) if name.startswith("on_"))


#: the loop's own tags (train/loss, the learning rate, the total norm, the weights' summary,
#: the split of the norm by regularizers) and prefixes (validation metrics, regularizer values,
#: the parameter groups' learning rates, HParams): a callback staging one would replace the
#: loop's value or add points to its curve
LOOP_TAGS = frozenset({
    "train/loss", "lr", "grad_norm/total", "grad_norm/total_clipped", "grad_norm/data",
    "grad_norm/reg", "weights/mean", "weights/min", "weights/max",
})  # fmt: skip
LOOP_PREFIXES = ("val/", "reg/", "lr/group_", "_hparams_/")


def few(names: list[str], most: int = 5) -> str:
    """Names for a warning: the first ``most``, and how many more (``a, b, c (+4)``)."""
    rest = f" (+{len(names) - most})" if len(names) > most else ""
    return ", ".join(names[:most]) + rest


def param_tag(prefix: str, name: str) -> str:
    """``<prefix>/<parameter name>``, or, where that is one of the loop's own tags (a
    parameter named ``total``, ``data`` or ``reg`` at the model's root), the same with
    `` (parameter)`` after it."""
    tag = f"{prefix}/{name}"
    return f"{tag} (parameter)" if tag in LOOP_TAGS or tag.startswith(LOOP_PREFIXES) else tag
