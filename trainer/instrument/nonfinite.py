"""The non-finite guard: NaN or Inf in the loss or a gradient, caught before the optimizer step.

Every checked step costs a few device reductions and one host read of a single flag (the only
per-step sync instrumentation makes; ``instrument.nonfinite.every_n_steps`` thins it out, and
``policy=off`` removes it). Only a failing check looks further, to name the culprit.

Under ``trainer.precision=16`` the guard checks the loss only: gradients that overflow float16
are the GradScaler's business (it skips those steps and lowers its scale), not an error.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from trainer.callbacks import Callback, Every

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
    parameters, optimizer state and scheduler stay as they are), count it
    (``nonfinite/skipped_steps``, logged with the step) and give up after
    ``max_consecutive_skips`` skipped steps in a row. Skipped steps still count as steps
    (``global_step``, ``max_steps``)."""

    def __init__(
        self, policy: str = "raise", every_n_steps: int = 1, max_consecutive_skips: int = 10
    ):
        if policy not in ("raise", "skip"):
            raise ValueError(f"instrument.nonfinite.policy: got {policy!r}, expected raise or skip")
        self.policy, self.max_consecutive = policy, max_consecutive_skips
        self.every = Every(every_n_steps)
        self.skipped = 0
        self.consecutive = 0
        self._loss_ok: Tensor | None = None

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])

    def on_after_backward(
        self, trainer: Trainer, batch: Batch, losses: Tensor, weights: Tensor | None
    ) -> None:
        if self.every.due_next(trainer.global_step):  # the step this micro-batch belongs to
            ok = torch.isfinite(losses).all()
            self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok

    def on_before_optimizer_step(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
        if not self.every.due(trainer.global_step):
            return
        loss_ok, self._loss_ok = self._loss_ok, None
        named = [(n, p.grad) for n, p in zip(trainer.param_names, trainer.params, strict=True)
                 if p.grad is not None]  # fmt: skip
        flags = [] if loss_ok is None else [loss_ok]
        if trainer.scaler is None and named:
            # ‖g‖₂ per tensor (fused): NaN/Inf if the tensor holds one. A sum of squares can also
            # overflow for huge finite gradients (|g| > 1e19 in float32): such an alarm is
            # checked exactly below, on the failure path only. (max |g|, which cannot overflow,
            # took 10x longer on CPU.)
            norms = torch.stack(torch._foreach_norm([g for _, g in named]))
            flags.append(torch.isfinite(norms).all())
        if not flags or bool(torch.stack(flags).all()):  # host sync: once per checked step
            self.consecutive = 0
            return
        cause = self._describe(trainer, loss_ok, named)
        if not cause:  # an overflowing norm of finite gradients: not a non-finite value
            self.consecutive = 0
            return
        if self.policy == "raise":
            raise NonFiniteError(
                f"step {trainer.global_step}: {cause}; stopped before the optimizer step "
                "(instrument.nonfinite.policy=skip skips such steps instead)"
            )
        self.skipped += 1
        self.consecutive += 1
        trainer.skip_step = True
        trainer.stage_scalars({"nonfinite/skipped_steps": float(self.skipped)})
        log.warning("step %d skipped: %s", trainer.global_step, cause)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"step {trainer.global_step}: {self.consecutive} steps in a row skipped for "
                f"non-finite values (instrument.nonfinite.max_consecutive_skips="
                f"{self.max_consecutive}); the last: {cause}"
            )

    @staticmethod
    def _describe(trainer: Trainer, loss_ok: Tensor | None, named: list[tuple[str, Tensor]]) -> str:
        """Which value went non-finite (on the failure path only, so its reads cost nothing)."""
        parts = []
        if loss_ok is not None and not bool(loss_ok):
            parts.append("non-finite loss (NaN/Inf in the per-sample losses)")
        if trainer.scaler is None and named:
            finite = torch.stack([torch.isfinite(g).all() for _, g in named]).tolist()
            bad = [n for (n, _), ok in zip(named, finite, strict=True) if not ok]
            if bad:
                more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
                parts.append(f"non-finite gradient of {bad[0]}{more}")
        return "; ".join(parts)
