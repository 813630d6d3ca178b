"""Instrumentation callbacks, built from the ``instrument`` config group.

Each quantity has its own cadence (``instrument.<quantity>.every_n_steps``, 0: off) and hangs off
the Trainer's hooks; none of them edits the step body, touches ``.grad`` or draws from the run's
random state, so a run's parameters are bitwise the same whatever is measured (tested:
``instrument=none`` and ``instrument=full``). Gradients are measured in
``on_before_optimizer_step``: after backward, accumulation and fp16 unscaling, before clipping.
See docs/instrumentation.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.instrument.curvature import Curvature, hutchinson_trace, hvp, top_eigenvalue
from trainer.instrument.histograms import Histograms, RawHistogram, histograms
from trainer.instrument.nonfinite import NonFiniteError, NonfiniteGuard
from trainer.instrument.norms import Norms
from trainer.instrument.per_sample import PerSampleNorms

if TYPE_CHECKING:
    from trainer.callbacks import Callback
    from trainer.config import InstrumentConfig

__all__ = [
    "Curvature",
    "Histograms",
    "NonFiniteError",
    "NonfiniteGuard",
    "Norms",
    "PerSampleNorms",
    "RawHistogram",
    "build_callbacks",
    "histograms",
    "hutchinson_trace",
    "hvp",
    "top_eigenvalue",
]


def build_callbacks(cfg: InstrumentConfig) -> list[Callback]:
    """The callbacks the config switches on; the guard first, so it can skip a step before
    anything else reads it."""
    callbacks: list[Callback] = []
    g = cfg.nonfinite
    if g.policy != "off":
        callbacks.append(NonfiniteGuard(g.policy, g.every_n_steps, g.max_consecutive_skips))
    n = cfg.norms
    if n.every_n_steps > 0:
        callbacks.append(Norms(n.every_n_steps, n.param_norm, n.update_ratio))
    h = cfg.histograms
    if h.every_n_steps > 0 and (h.grads or h.weights):
        callbacks.append(
            Histograms(h.every_n_steps, h.bins, h.range, (h.min, h.max), h.grads, h.weights)
        )
    p = cfg.per_sample
    if p.every_n_steps > 0:
        callbacks.append(PerSampleNorms(p.every_n_steps, p.loss, h.bins))
    c = cfg.curvature
    if c.every_n_steps > 0:
        callbacks.append(Curvature(c.every_n_steps, c.power_iters, c.tol, c.trace_probes, c.seed))
    return callbacks
