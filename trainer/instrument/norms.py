"""Per-parameter gradient norms, weight norms and update ratios, fused and read in one transfer.

Measured in ``on_before_optimizer_step``: after backward, accumulation and fp16 unscaling, before
clipping. ``torch._foreach_norm`` computes every tensor's norm in one call (one fused kernel per
device and dtype on CUDA); the results go through ``trainer.stage_scalars`` and reach the host
with the step's other scalars in a single transfer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from trainer.callbacks import Callback, Every, StepOutput

if TYPE_CHECKING:
    from trainer.loop import Trainer


class Norms(Callback):
    """``grad_norm/<param>``, ``grad_norm/total_clipped``, ``param_norm/<param>`` and
    ``update_ratio/<param>`` every ``every_n_steps`` optimizer steps.

    * ``grad_norm/<param>``: ‖g‖₂ of each parameter with a gradient (the squares sum to
      ``grad_norm/total``²).
    * ``grad_norm/total_clipped``: the total norm measured again after clipping (equal to the
      total when nothing is clipped).
    * ``param_norm/<param>``: ‖θ‖₂ of the weights the step is about to update.
    * ``update_ratio/<param>``: ‖θ_after − θ_before‖₂ / ‖θ_before‖₂ of the step just taken; it
      copies the weights on measuring steps only (one transient copy of the parameters). A
      step the non-finite guard skipped logs 0.
    """

    def __init__(self, every_n_steps: int, param_norm: bool = True, update_ratio: bool = True):
        if every_n_steps < 1:
            raise ValueError(f"instrument.norms.every_n_steps: got {every_n_steps}, must be >= 1")
        self.every = Every(every_n_steps)
        self.param_norm, self.update_ratio = param_norm, update_ratio
        self._before: list[Tensor] | None = None
        self._before_norms: Tensor | None = None
        self._tags: dict[str, tuple[str, ...]] = {}
        self._one_group = False

    def on_fit_start(self, trainer: Trainer) -> None:
        # get_total_norm sums per (device, dtype) group: with one group its total is the 2-norm
        # of these per-parameter norms bit for bit, so the trainer may reuse them
        self._one_group = len({(p.device, p.dtype) for p in trainer.params}) == 1
        for kind in ("param_norm", "update_ratio"):
            self._tags[kind] = tuple(f"{kind}/{n}" for n in trainer.param_names)

    def on_before_optimizer_step(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
        if not self.every.due(trainer.global_step):
            return
        trainer.measure_clipped_norm = True
        names, grads = [], []
        for n, p in zip(trainer.param_names, trainer.params, strict=True):
            if p.grad is not None:
                names.append(f"grad_norm/{n}")
                grads.append(p.grad)
        if grads:  # one 1-D tensor for all: one entry in the step's single host read
            norms = torch.stack(torch._foreach_norm(grads))
            if self._one_group:  # the trainer takes grad_norm/total from these
                trainer.param_grad_norms = norms
            trainer.stage_scalars({tuple(names): norms})
        if self.param_norm or self.update_ratio:
            weights = [p.detach() for p in trainer.params]
            norms = torch.stack(torch._foreach_norm(weights))
            if self.param_norm:
                trainer.stage_scalars({self._tags["param_norm"]: norms})
            if self.update_ratio:
                self._before = [w.clone() for w in weights]
                self._before_norms = norms

    def on_train_step_end(self, trainer: Trainer, out: StepOutput) -> None:
        if self._before is None:
            return
        before, before_norms = self._before, self._before_norms
        self._before = self._before_norms = None
        assert before_norms is not None
        delta = torch._foreach_sub([p.detach() for p in trainer.params], before)
        # a zero weight tensor that moved gives a huge ratio, never a division by 0
        ratios = torch.stack(torch._foreach_norm(delta)) / before_norms.clamp_min(
            torch.finfo(before_norms.dtype).tiny
        )
        trainer.stage_scalars({self._tags["update_ratio"]: ratios})
