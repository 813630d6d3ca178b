"""A module's forward with some of its parameters and buffers replaced, put back after.

``torch.func.functional_call`` does this too, but puts the wrong tensor back where a module is
reachable under two attribute names (``self.again = self.inp``): the model kept the detached
copy of the mixing check in place of its ``nn.Parameter``, which then never trained, under
``instrument.per_sample`` (a probe's finding, torch 2.14). :func:`call_with` replaces by tensor
identity in each module once (every alias and every tied use of a tensor sees its
replacement) and restores the very tensors it took out. What the forward sets on the modules
is put back too (:func:`attributes_kept`): a table built on demand, Hugging Face's rotary
embeddings' way, went into the replacing copy while the Python attribute saying "built" stayed,
and the model ran on with the old table (measuring changed training: a review's).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

_MISSING = object()


@contextlib.contextmanager
def attributes_kept(module: nn.Module) -> Iterator[None]:
    """Within: a forward run again by an instrument. After: every module under ``module`` has
    the attributes it had before, by identity (a counter reassigned, a cache and the flag
    saying it is built, a module or buffer registered on demand), its parameter, buffer and
    child tables the keys they had. Objects changed in place (a list appended to, a random
    generator drawn from, a tensor written into) are not put back."""
    saved = []
    for m in module.modules():
        attrs = dict(vars(m))
        tables = {k: dict(attrs[k]) for k in ("_parameters", "_buffers", "_modules")}
        saved.append((m, attrs, tables))
    try:
        yield
    finally:
        for m, attrs, tables in saved:
            now = vars(m)
            for k in [k for k in now if k not in attrs]:
                del now[k]
            for k, v in attrs.items():
                if now.get(k, _MISSING) is not v:
                    now[k] = v
            for k, before in tables.items():
                table = now[k]
                if table.keys() != before.keys() or any(
                    table[n] is not t for n, t in before.items()
                ):
                    table.clear()
                    table.update(before)


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
    taken: list[tuple[dict[str, Any], str, Any]] = []
    try:
        for m in module.modules():  # (each module once, however many names reach it)
            tables: tuple[dict[str, Any], ...] = (m._parameters, m._buffers)
            for table in tables:
                for key, t in table.items():
                    if t is not None and id(t) in by_id:
                        taken.append((table, key, t))
                        table[key] = by_id[id(t)]
        with attributes_kept(module):
            return module(*args, **(kwargs or {}))
    finally:
        for table, key, t in reversed(taken):
            table[key] = t
