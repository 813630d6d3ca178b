"""A module's forward with some of its parameters and buffers replaced, put back after.

``torch.func.functional_call`` does this too, but puts the wrong tensor back where a module is
reachable under two attribute names (``self.again = self.inp``): the model kept the detached
copy of the mixing check in place of its ``nn.Parameter``, which then never trained, under
``instrument.per_sample`` (a probe's finding, torch 2.14). :func:`call_with` replaces by tensor
identity in each module once (every alias and every tied use of a tensor sees its
replacement) and restores the very tensors it took out, except a buffer the forward itself
reassigned: that is the forward's own update (a cache it built, with a Python attribute saying
so, as Hugging Face's rotary embeddings keep one), and is kept (put back, the model ran on with
the old table while its attribute said built, and measuring changed training: a review's).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


def call_with(
    module: nn.Module,
    state: dict[str, Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
) -> Any:
    """``module(*args, **kwargs)`` with the parameters and buffers ``state`` names (by their
    names in ``module``, any alias of them) replaced by its tensors, and put back after.

    Raises:
        KeyError: a name of ``state`` is no parameter or buffer of ``module``.
    """
    originals = {
        **dict(module.named_parameters(remove_duplicate=False)),
        **dict(module.named_buffers(remove_duplicate=False)),
    }
    by_id: dict[int, Tensor] = {}
    for name, new in state.items():
        if name not in originals:
            raise KeyError(f"{name!r} is not a parameter or buffer of {type(module).__name__}")
        by_id[id(originals[name])] = new
    taken: list[tuple[dict[str, Any], str, Any, Any]] = []
    try:
        for m in module.modules():  # (each module once, however many names reach it)
            tables: tuple[dict[str, Any], ...] = (m._parameters, m._buffers)
            for table in tables:
                for key, t in table.items():
                    if t is not None and id(t) in by_id:
                        taken.append((table, key, t, table is m._buffers))
                        table[key] = by_id[id(t)]
        return module(*args, **(kwargs or {}))
    finally:
        for table, key, t, buffer in reversed(taken):
            if buffer and key in table and table[key] is not by_id[id(t)]:
                continue  # (reassigned by the forward: its own update, kept)
            table[key] = t
