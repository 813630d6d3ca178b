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
import logging
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

_MISSING = object()
#: the attribute types whose contents :func:`attributes_kept` puts back (a hook table, a list)
_CONTAINERS = (dict, list, set)


def scripted(module: nn.Module) -> bool:
    """A TorchScript module: its tables are no dicts, and no hook can be registered on it."""
    return isinstance(module, torch.jit.ScriptModule)


def _contents(v: Any) -> Any:
    """A plain shallow copy of a container attribute's contents (a hook table, a set of
    names, a list), or None for any other value or one that cannot be copied so. (Not
    ``type(v)(v)``: a list subclass of its own constructor, a ring buffer of a capacity,
    came back empty, or raised and stopped the step: a review's.)"""
    try:
        if isinstance(v, dict):
            return dict(v)
        if isinstance(v, list):
            return list(v)
        if isinstance(v, set):
            return set(v)
    except Exception:  # noqa: BLE001 (a container of its own that will not be read: skipped)
        return None
    return None


def _put_back(v: Any, before: Any) -> None:
    """``v``'s contents made ``before``'s again, in place."""
    if isinstance(v, list):
        v[:] = before
    else:
        v.clear()
        v.update(before)


def same_contents(v: Any, before: Any) -> bool:
    """Whether a container's contents are ``before``'s, by identity (a dict's in order)."""
    if isinstance(v, dict):  # (in order: a forward moving a key to the end, ``d[k] =
        # d.pop(k)``, read in order by the next, was not put back, a review's)
        return len(v) == len(before) and all(
            k is j and x is y for (k, x), (j, y) in zip(v.items(), before.items(), strict=True)
        )
    if isinstance(v, list):
        return len(v) == len(before) and all(a is b for a, b in zip(v, before, strict=True))
    return v == before


#: a module's own tables (parameters, buffers, children, hooks): put back shallowly only
MODULE_TABLES = frozenset(vars(nn.Module()))
#: its hook tables among them, and those of flags kept per hook (by its handle's id)
_HOOK_TABLES = frozenset(k for k in MODULE_TABLES if "hooks" in k)
_HOOK_FLAGS = frozenset(k for k in _HOOK_TABLES if "with_kwargs" in k or "always_called" in k)
#: the tensors inside a module's containers whose values are put back: at most this many per
#: module, each of at most _SMALL elements (state: counts, running statistics)
_HELD, _SMALL = 64, 1 << 16


def _nested(values: Any, depth: int = 3, budget: int = 4096) -> list[Any]:
    """The plain dicts and lists inside ``values`` (a container attribute's contents), in plain
    tuples, lists and dicts, ``depth`` levels down, each once, while their lengths total at
    most ``budget``: what a forward may change in place inside an attribute (a table of
    counts per expert, ``self.stats["load"][e] += n``). Not a subclass's, whose own
    bookkeeping a put-back of its contents would not follow (an LRU cache of one's own kept
    its order of keys, and deleted one no longer there: a review's); not past the budget (a
    log of 100,000 entries kept in the model: 0.5 s per extra forward, another's)."""
    found: dict[int, Any] = {}
    todo = [(v, depth) for v in values]
    size = 0
    while todo:
        v, left = todo.pop()
        if id(v) in found:
            continue
        if type(v) in (dict, list, tuple):
            if size + len(v) > budget:  # (past it: skipped, the others still looked at; a
                continue  # log of 5,000 beside a count per expert stopped the look, a review's)
            size += len(v)
        if type(v) in (dict, list):
            found[id(v)] = v
        if left and type(v) in (dict, list, tuple):
            todo += [(x, left - 1) for x in (v.values() if type(v) is dict else v)
                     if type(x) in (dict, list, tuple)]  # fmt: skip
    return list(found.values())


def _generators(values: Any, depth: int = 3) -> list[torch.Generator]:
    """The ``torch.Generator`` objects among ``values``, in tuples, lists and dicts too (a
    module's ``self.gens = [g]``: a review's), ``depth`` levels down."""
    found = []
    for v in values:
        if type(v) in weakref.ProxyTypes:  # (a dead one raises at isinstance)
            continue
        if isinstance(v, torch.Generator):
            found.append(v)
        elif depth and isinstance(v, (list, tuple, dict)):
            found += _generators(v.values() if isinstance(v, dict) else v, depth - 1)
    return found


@contextlib.contextmanager
def buffer_values_kept(model: nn.Module) -> Iterator[None]:
    """Within: an extra backward (an instrument's, a logging step's) that may run parts of
    the forward again (an activation checkpoint's recomputation: a batch norm inside moved its
    running statistics once more per extra backward, so measuring, or how often a run logs,
    changed the model it validates and saves, a probe's). After: each buffer the model holds
    has its values back, and is back in its module's table where it was replaced. Written
    through ``.data``, which moves no version counter: batch norm's kernel updates its running
    statistics in place without moving theirs, so a moved counter cannot tell which changed,
    and the backward of the step's own forward may have saved them (a copy that moved it
    failed that backward). One copy of each buffer is held within, and one foreach copy made
    after."""
    # (one whose elements share memory, an expanded one, cannot be written in place, nor
    # was it: left as it is; the copy into it stopped the run, a review's)
    held = [(m, n, b) for m in model.modules() for n, b in m._buffers.items()
            if b is not None and torch._debug_has_internal_overlap(b) == 0]  # fmt: skip
    copies = [b.detach().clone() for _, _, b in held]
    try:
        yield
    finally:
        if held:
            torch._foreach_copy_([b.data for _, _, b in held], copies)
        for m, n, b in held:
            if m._buffers.get(n) is not b:
                m._buffers[n] = b


@contextlib.contextmanager
def attributes_kept(module: nn.Module, also: Iterable[nn.Module] = ()) -> Iterator[None]:
    """Within: a forward (and backward) run again by an instrument. After: every module under
    ``module`` has the attributes it had before, by identity (a counter reassigned, a cache
    and the flag saying it is built), and its container attributes their contents (its
    parameter, buffer and child tables, its hook tables, a list it appends to: a hook a
    forward registers with a flag saying so was kept while the flag was put back, and the
    next forward registered it twice, a review's), and a tensor it keeps as a plain attribute
    (not a parameter or buffer) its values, where it was written into in place (a running
    total of its own, a cache filled in place: the per-sample mixing check's runs added into
    it again, a review's; through ``.data`` too, which moves no version counter: compared by
    value, :func:`_written`). A copy of each such tensor is taken on entry, its size again in
    memory while the forward runs, and one host read per device made on exit. Not one that
    requires grad (an activation kept for inspection, which a forward replaces rather than
    writes into: its copy cost the size of every kept activation per extra forward, a
    review's), nor an inference tensor (made under ``torch.inference_mode``: instruments'
    extra forwards need autograd, outside it). The plain dicts and lists inside its
    container attributes (:func:`_nested`: 3 levels down, 4,096 entries) get their contents
    back too (a count per expert kept in a list in a dict, added into by each forward: the
    checks' forwards added into it before the step's own, a review's), and the values of the
    tensors in them, up to 64 of at most 65,536 elements each (``_HELD``, ``_SMALL``: such
    a count kept as a tensor). Not put back: objects changed in place otherwise (a larger
    tensor inside a container, one inside another object; a set, a deque or a subclass's
    inside a container), ``__slots__``, and
    TorchScript modules (their tables are no dicts), which are left as they are. A
    ``torch.Generator`` a module keeps as an attribute, or in a tuple, list or dict it keeps,
    gets its state back (a model adding noise from one of its own trained otherwise with
    per-sample norms or curvature on: a review's); one in another object does not."""
    kept = Attributes(module, also)
    try:
        yield
    finally:
        kept.put_back()


class Attributes:
    """What :func:`attributes_kept` puts back, as ``module``'s modules (and ``also``'s) have
    it now: their attributes by identity, their containers' contents, the values of the
    tensors they keep and the states of their generators."""

    def __init__(self, module: nn.Module, also: Iterable[nn.Module] = ()) -> None:
        self.saved: list[tuple[nn.Module, dict[str, Any], dict[str, Any]]] = []
        self.nested: list[tuple[Any, Any]] = []
        self.tensors: list[tuple[Tensor, int, Tensor]] = []
        self.generators: list[tuple[torch.Generator, Tensor]] = []
        with torch._C.DisableTorchFunction():  # (no instrument's mode counts these as uses)
            modules = {id(m): m for m in module.modules()}
            for m in also:  # (modules the model had before: a module replaced since)
                modules.setdefault(id(m), m)
            #: the modules taken, and their classes (a parametrization registered since
            #: swaps a module's class)
            self.modules = list(modules.values())
            self.types = {k: type(m) for k, m in modules.items()}
            for m in self.modules:
                if scripted(m):
                    continue
                attrs = dict(vars(m))
                contents = {k: c for k, v in attrs.items() if (c := _contents(v)) is not None}
                # the dicts and lists inside its own containers (a list in a dict attribute a
                # forward adds into: the checks' extra forwards added into it too, before the
                # step's own, and training changed, a review's), and the small tensors in them
                # (a count per expert kept as a tensor in a dict, added into in place); not
                # every tensor (a history of 10,000 detached statistics copied per extra
                # forward: 0.2 s)
                own = [v for k, v in attrs.items() if k not in MODULE_TABLES]
                found = _nested([v for v in own if type(v) in (dict, list, tuple)])
                top = {id(v) for v in attrs.values()}  # (in ``contents`` already)
                inner = [c for c in found if id(c) not in top]
                self.nested += [(c, before) for c in inner if (before := _contents(c)) is not None]
                held = [x for c in found for x in (c.values() if type(c) is dict else c)
                        if _tensor(x) and x.numel() <= _SMALL
                        and not x.requires_grad and not x.is_inference()]  # fmt: skip
                self.saved.append((m, attrs, contents))
                # (not a weakref proxy: a dead one raises at any use, and stopped the step)
                values = [v for v in attrs.values() if type(v) not in weakref.ProxyTypes]
                self.tensors += tensor_copies(values)
                self.tensors += tensor_copies(held[:_HELD])
                self.generators += [(g, g.get_state()) for g in _generators(values)]

    def put_back(self, began: bool = False) -> None:
        """Each module's attributes, containers, kept tensors and generators as they were
        taken, its tables (parameters, buffers, children, hooks) too. ``began=True``: the
        state a forward began with again, for the curvature instrument's run of it, except
        its parameters' tables as they are now (the Hessian is taken at them) and the
        instruments' own hooks as they are now (marked ``instrument_hook``: the per-sample
        instrument's, which come and go between); a user's hook registered since (by the
        forward, once, behind a flag put back here: applied twice, a review's; by a callback
        for the next forward) is out, one removed since back in, a submodule replaced since
        (a schedule's in ``on_after_backward``) the old one; what took this snapshot puts
        them back after (:func:`attributes_kept`)."""
        for g, state in self.generators:  # (a generator of its own drawn from: a model
            g.set_state(state)  # adding noise from one changed training, a review's probe)
        put_tensors_back(self.tensors, "a tensor a module keeps (not a parameter or buffer)")
        for m, attrs, contents in self.saved:
            now = vars(m)
            for k in [k for k in now if k not in attrs]:
                del now[k]
            for k, v in attrs.items():
                if now.get(k, _MISSING) is not v and not (began and k == "_parameters"):
                    now[k] = v
            for k, before in contents.items():
                if began and k == "_parameters":
                    continue
                v = now[k]
                if began and k in _HOOK_FLAGS:  # (flags per handle: those of either)
                    before = {**before, **v}
                elif began and k in _HOOK_TABLES:
                    before = _instruments_kept(v, before)
                try:
                    if not same_contents(v, before):
                        _put_back(v, before)
                except Exception:  # noqa: BLE001 (one of its own that refuses: left as is)
                    continue
        for v, before in self.nested:
            try:
                if not same_contents(v, before):
                    _put_back(v, before)
            except Exception:  # noqa: BLE001 (one of its own that refuses: left as is)
                continue


def _instrument(hook: Any) -> bool:
    return bool(getattr(type(hook), "instrument_hook", False))


def _instruments_kept(now: dict[Any, Any], before: dict[Any, Any]) -> dict[Any, Any]:
    """A hook table as ``before`` holds it, the instruments' hooks as ``now`` does (in their
    places where they were in both; those registered since last)."""
    kept = {k: now[k] if _instrument(h) else h for k, h in before.items()
            if not _instrument(h) or k in now}  # fmt: skip
    kept.update({k: h for k, h in now.items() if _instrument(h) and k not in kept})
    return kept


def _tensor(x: Any) -> bool:
    """Whether ``x`` is a tensor (by its type first: a dead weakref proxy raises at
    ``isinstance``)."""
    return type(x) not in weakref.ProxyTypes and isinstance(x, Tensor)


def tensor_copies(values: Any) -> list[tuple[Tensor, int, Tensor]]:
    """The tensors among ``values`` (an object's attributes) with their version counters and
    copies, for :func:`put_tensors_back`: not one that requires grad, nor an inference tensor
    (see :func:`attributes_kept`)."""
    with torch._C.DisableTorchFunction():  # (no instrument's mode counts these as uses)
        return [(v, v._version, v.detach().clone()) for v in values
                if _tensor(v) and not v.is_inference()
                and not v.requires_grad]  # fmt: skip


def put_tensors_back(copies: list[tuple[Tensor, int, Tensor]], what: str) -> None:
    """Each of :func:`tensor_copies`' tensors that was written since (:func:`_written`) given
    its copy's values back (:func:`_put_values_back`); what cannot be is warned about, naming
    ``what`` it is, never raised."""
    try:
        with torch._C.DisableTorchFunction(), torch.no_grad():
            _put_values_back(_written(copies), what)
    except Exception as e:  # noqa: BLE001 (what else was changed is put back all the same)
        log.warning(
            "an instrument's extra forward changed %s, and it could not be compared or put "
            "back (%s: %s): training may differ from a run without measuring",
            what, type(e).__name__, str(e).splitlines()[0] if str(e) else "",
        )  # fmt: skip


def _put_values_back(written: list[tuple[Tensor, int, Tensor]], what: str) -> None:
    """Each tensor's values made its copy's again, and its version counter what it was: the
    step's own graph may hold it (a forward hook's extra forward runs before the step's
    backward, which then refused a tensor "modified by an inplace operation": a review's).
    One that cannot be written (an expanded view) is warned about only where it still differs
    once the others are back (its base among them)."""
    failed: list[tuple[Tensor, Tensor, str]] = []
    for t, version, before in written:
        try:
            if _resized(t, before):  # (resize_, or .data set)
                t.data = before
            else:
                t.data.copy_(before)  # (through .data: no version moves)
        except RuntimeError as e:
            failed.append((t, before, str(e).splitlines()[0]))
            continue
        if t._version != version and _set_versions is not None and _whole(t):
            _set_versions((t,), (version,))  # (not a view's: its counter is its storage's,
            # whose other writes it would hide from the step's backward; a review's gradient
            # came out 10x on the rest of a buffer so, where the backward must refuse it)
    for t, before, why in failed:
        moved = _moved(t, before)
        if moved is None or bool(moved):  # host read: an extra forward's, where one failed
            log.warning(
                "an instrument's extra forward changed %s in place, and it cannot be put back "
                "(%s): training may differ from a run without measuring",
                what, why,
            )  # fmt: skip


#: torch's setter of version counters (private; where a torch has none, a tensor the step's
#: graph holds and an extra forward wrote stops the step's backward, as without measuring)
_set_versions = getattr(torch._C._autograd, "_unsafe_set_version_counter", None)


def _counted(t: Tensor, version: int, before: Tensor) -> bool:
    """Whether ``t`` was written by its version counter, or resized (:func:`_resized`)."""
    return t._version != version or _resized(t, before)


def _resized(t: Tensor, before: Tensor) -> bool:
    """Whether a dense ``t``'s shape or dtype is not its copy's by now (``resize_``,
    ``.data =``); a sparse or nested one has no sizes to ask."""
    if t.layout != torch.strided or t.is_nested:
        return False
    return t.shape != before.shape or t.dtype != before.dtype


def _whole(t: Tensor) -> bool:
    """Whether ``t`` is all of its storage (no view of another tensor, nothing else in it)."""
    return bool(
        t._base is None
        and t.storage_offset() == 0
        and t.is_contiguous()
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )


def _moved(t: Tensor, before: Tensor) -> Tensor | None:
    """Whether ``t``'s values differ from ``before``'s, on the device (NaN where NaN was is no
    change); None for one whose values cannot be compared (sparse, nested, quantized, meta, or
    of another shape or dtype by now)."""
    if t.layout != torch.strided or t.is_nested or t.is_quantized or t.is_meta:
        return None
    if _resized(t, before):
        return None
    moved = t != before
    if t.is_floating_point() or t.is_complex():
        moved &= ~(t.isnan() & before.isnan())
    return moved.any()


def _written(tensors: list[tuple[Tensor, int, Tensor]]) -> list[tuple[Tensor, int, Tensor]]:
    """The tensors (with their versions and copies) whose version counter moved, or whose
    values differ from their copy's: a write through ``.data`` moves no counter (a review's
    EMA and call count kept the extra forwards' updates so). One host read per device for the
    values, where a module keeps such tensors at all."""
    written = [(t, v, before) for t, v, before in tensors if _counted(t, v, before)]
    flags: dict[torch.device, list[tuple[Tensor, int, Tensor, Tensor]]] = {}
    for t, version, before in tensors:
        moved = None if _counted(t, version, before) else _moved(t, before)
        if moved is not None:  # (one that cannot be compared: by its counter alone)
            flags.setdefault(t.device, []).append((t, version, before, moved))
    for group in flags.values():
        read = torch.stack([f for *_, f in group]).tolist()  # host read: an extra forward's
        written += [(t, v, before) for (t, v, before, _), w in zip(group, read, strict=True)
                    if w]  # fmt: skip
    return written


def plain_attributes(module: nn.Module) -> list[tuple[nn.Module, dict[str, Any]]]:
    """The attributes of every module under ``module`` that are no container (a counter, a
    flag saying a cache is built), by identity: what :func:`set_plain_attributes` puts back
    for a recomputation of its forward as it began (hook and parameter tables are not: the
    instruments' own hooks come and go between)."""
    return [
        (m, {k: v for k, v in vars(m).items() if not isinstance(v, _CONTAINERS)})
        for m in module.modules()
        if not scripted(m)
    ]


def set_plain_attributes(saved: list[tuple[nn.Module, dict[str, Any]]]) -> None:
    """Each module's attributes that are no container made ``saved``'s again
    (:func:`plain_attributes`), and such attributes added since removed."""
    for m, attrs in saved:
        now = vars(m)
        for k in [k for k, v in now.items() if k not in attrs and not isinstance(v, _CONTAINERS)]:
            del now[k]
        for k, v in attrs.items():
            if now.get(k, _MISSING) is not v:
                now[k] = v


def call_with(
    module: nn.Module,
    state: dict[str, Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    kept: bool = True,
) -> Any:
    """``module(*args, **kwargs)`` with the parameters and buffers ``state`` names (by their
    names in ``module``, any alias of them) replaced by its tensors, and put back after;
    its modules' attributes too (:func:`attributes_kept`) unless ``kept`` is False: a caller
    that differentiates the output after the call, inside an :func:`attributes_kept` of its
    own (curvature's), whose graph saved a tensor the forward wrote in place (put back at the
    call's end, its backward refused it: a review's).

    Raises:
        KeyError: a name of ``state`` is no parameter or buffer of ``module``.
    """
    with swapped(module, state), attributes_kept(module) if kept else contextlib.nullcontext():
        return module(*args, **(kwargs or {}))


@contextlib.contextmanager
def swapped(module: nn.Module, state: dict[str, Tensor]) -> Iterator[None]:
    """Within: the parameters and buffers ``state`` names (by their names in ``module``, any
    alias of them) replaced by its tensors, in each module once (every alias and every tied
    use of a tensor sees its replacement); after: the very tensors taken out put back.

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
        yield
    finally:
        for table, key, t in reversed(taken):
            table[key] = t
