"""Instrumentation callbacks, built from the ``instrument`` config group.

Each quantity has its own cadence (``instrument.<quantity>.every_n_steps``, 0: off) and hangs off
the Trainer's hooks; none of them edits the step body or draws from the run's random state, so
a run's parameters are bitwise the same whatever is measured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.instrument.curvature import Curvature, hutchinson_trace, hvp, top_eigenvalue

if TYPE_CHECKING:
    from trainer.config import InstrumentConfig
    from trainer.loop import Callback

__all__ = ["Curvature", "build_callbacks", "hutchinson_trace", "hvp", "top_eigenvalue"]


def build_callbacks(cfg: InstrumentConfig) -> list[Callback]:
    """The callbacks the config switches on."""
    callbacks: list[Callback] = []
    c = cfg.curvature
    if c.every_n_steps > 0:
        callbacks.append(Curvature(c.every_n_steps, c.power_iters, c.tol, c.trace_probes, c.seed))
    return callbacks
