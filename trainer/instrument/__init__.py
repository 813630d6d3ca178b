"""Instrumentation callbacks, built from the ``instrument`` config group.

Each quantity has its own cadence (``instrument.<quantity>.every_n_steps``, 0: off) and hangs off
the Trainer's hooks; none of them edits the step body, touches ``.grad`` or draws from the run's
random state, so a run's parameters are bitwise the same whatever is measured (tested:
``instrument=none`` and ``instrument=full``). Gradients are measured in
``on_before_optimizer_step``: after backward, accumulation and fp16 unscaling, before clipping.
See docs/instrumentation.md.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from trainer.callbacks import Callback
from trainer.config import ContractError
from trainer.instrument.curvature import (
    Curvature,
    hutchinson,
    hutchinson_trace,
    hvp,
    lanczos,
    top_eigenvalue,
)
from trainer.instrument.histograms import Histograms, RawHistogram, histograms
from trainer.instrument.nonfinite import NonFiniteError, NonfiniteGuard
from trainer.instrument.norms import Norms
from trainer.instrument.per_sample import PerSampleNorms

if TYPE_CHECKING:
    from trainer.config import InstrumentConfig

log = logging.getLogger(__name__)

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
    "hutchinson",
    "hutchinson_trace",
    "hvp",
    "lanczos",
    "top_eigenvalue",
]


#: the instruments, in the order they are built and fire: the guard first, so it can skip a
#: step before anything else reads it
INSTRUMENTS = ("nonfinite", "norms", "histograms", "per_sample", "curvature")


def _switched_on(name: str, node: dict) -> bool:
    if name == "nonfinite":
        return node["policy"] != "off"
    if name == "histograms" and not (node["grads"] or node["weights"]):
        return False
    return node["every_n_steps"] > 0


def build_callbacks(cfg: InstrumentConfig) -> list[Callback]:
    """The callbacks the config switches on, each built from its ``_target_`` and keys the way
    a user callback is (``instrument.<name>._target_`` may name your own class; its keys are
    checked against that class's signature first). Per-sample norms take the histograms'
    ``bins`` if their class asks for it."""
    from trainer.components import build, check_component

    callbacks: list[Callback] = []
    for name in INSTRUMENTS:
        node = dataclasses.asdict(getattr(cfg, name))
        if not _switched_on(name, node):
            if name == "norms" and node.get("agreement"):  # (no tag, unsaid: a probe)
                log.warning(
                    "instrument.norms.agreement=true logs nothing with "
                    "instrument.norms.every_n_steps=0: the cosines are taken on the norms' steps"
                )
            continue
        group = f"instrument.{name}"
        bins = {"bins": cfg.histograms.bins} if name == "per_sample" else {}
        check_component(group, node, provided=bins)
        callback = build(group, node, provided=bins)
        if not isinstance(callback, Callback):
            raise ContractError(
                f"{group}._target_: {node['_target_']} built a {type(callback).__name__}, not a "
                "trainer.callbacks.Callback"
            )
        callbacks.append(callback)
    return callbacks
