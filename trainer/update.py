"""An optimizer step that is skipped on the device, without reading anything back to the host.

The non-finite guard in deferred mode (trainer/instrument/nonfinite.py) knows whether a step's
gradients are finite only as a 0-d tensor on the device; reading it would make the host wait for
the step's kernels every step. :func:`conditional_step` applies the update where the flag is
False and leaves everything as it was where it is True:

* an optimizer with a fused implementation (``fused=True`` on ``torch.optim.SGD``, ``Adam``,
  ``AdamW``, ``Adagrad``) takes the flag as ``found_inf``, exactly as ``GradScaler`` hands it
  over: its kernels skip the update of the parameters and the state and undo the step count;
* torch's other optimizers (:data:`PUT_BACK`) step unconditionally, after a copy of the
  parameters that have a gradient and of their optimizer state, which are then put back where
  the flag is set (``torch.where``, bit for bit, NaN-proof). That costs one copy of the
  parameters and the state per step, and two kernels per tensor: affordable on a GPU, whose
  launches are asynchronous.

An optimizer of one's own (a subclass of torch's included) is not stepped on non-finite
gradients: its step may keep state outside the per-parameter state (a counter in its param
groups, an attribute), draw random numbers (Langevin noise), or raise on a NaN (a Cholesky
factor), none of which a put-back undoes (a probe's findings: a group counter ran ahead, a state
entry first made on a skipped step kept its NaN, a run crashed that step mode skips). Nor is an
optimizer with step hooks (``register_step_pre_hook``/``post_hook``, its own or global): an EMA
of the weights kept in a post-hook would take the step's NaN. There the flag is read on the host
each step, as in step mode.

A step that would create optimizer state (an optimizer's first step, a parameter's first
gradient; not torch's SGD without momentum, which keeps none), or an optimizer keeping Python
numbers, tensors on another device (a non-fused Adam keeps its step count on the CPU) or sparse
tensors (SGD's momentum of an ``Embedding(sparse=True)``'s gradients: ``torch.where`` takes no
sparse tensor) in its state, cannot be undone on the device: there the flag is read on the host
(so a run reads it on its first step, and such an optimizer on every step).

Whether a step would create state, and where the state lies, is asked every step: one lookup
per parameter, with the devices of the state's tensors counted once per state mapping
(:func:`_census`), instead of a pass over every parameter's state and its tensors (host time a
launch-bound GPU step waits for; timed in README).

Under ``trainer.precision=16`` the step goes through ``GradScaler.step``: :func:`scaled_step`
merges the flag into the ``found_inf`` the scaler hands a fused optimizer (no host read, as the
scaler makes none there); with any other optimizer the scaler reads its own flag every step, and
the flag is read with it.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim import optimizer as _optim_module

#: torch's optimizers whose step changes nothing but the parameters and their per-parameter
#: state tensors, draws no random numbers and runs through NaN/Inf gradients (tested bit for
#: bit against not stepping, tests/test_nonfinite.py): a deferred skip puts their step back.
PUT_BACK = frozenset(
    getattr(torch.optim, name)
    for name in (
        "SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "NAdam", "RAdam", "Adamax", "Adadelta",
        "ASGD", "Rprop", "Adafactor", "Muon",
    )
    if hasattr(torch.optim, name)
)  # fmt: skip


def _hooked(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a step of ``optimizer`` runs step hooks: its own or torch's global ones."""
    return bool(
        getattr(optimizer, "_optimizer_step_pre_hooks", None)
        or getattr(optimizer, "_optimizer_step_post_hooks", None)
        or _optim_module._global_optimizer_pre_hooks
        or _optim_module._global_optimizer_post_hooks
    )


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a step of ``optimizer`` can be skipped on the device without a host read: it
    is one of torch's own (:data:`PUT_BACK`, fused or not: a fused subclass's own ``step``
    code runs on a ``found_inf`` step too, a review's group counter), and no step hook would
    see the skipped step (the module docstring). torch's profiler registers a global step
    hook of its own when ``KINETO_USE_DAEMON`` is set: every step then reads the flag."""
    return type(optimizer) in PUT_BACK and not _hooked(optimizer)


class UpdateWatch:
    """Whether ``optimizer``'s update was made, told by a step post-hook of the trainer's put
    first among the optimizer's own (torch runs those, then the global ones): a post-hook of
    one's own that raises after the update leaves the step done (a fit called again took it
    again: updated twice, a review's). Removed after the step."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.made = False
        self._handle = optimizer.register_step_post_hook(self._made)
        hooks = optimizer._optimizer_step_post_hooks
        others = [(k, h) for k, h in hooks.items() if k != self._handle.id]
        hooks.clear()  # (first, whatever the dict's kind: an OrderedDict in torch)
        hooks[self._handle.id] = self._made
        hooks.update(others)

    def _made(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        self.made = True

    def remove(self) -> None:
        self._handle.remove()


def watch_update(optimizer: torch.optim.Optimizer) -> UpdateWatch | None:
    """An :class:`UpdateWatch` where a step post-hook may run (the optimizer's own or a
    global one), else None (nothing runs after the update inside ``step``)."""
    hooks = getattr(optimizer, "_optimizer_step_post_hooks", None)
    if hooks is None or not (hooks or _optim_module._global_optimizer_post_hooks):
        return None
    return UpdateWatch(optimizer)


def takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """The optimizer's step skips itself on a ``found_inf`` flag (its fused implementation)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        group.get("fused") for group in optimizer.param_groups
    )


def _stepped(optimizer: torch.optim.Optimizer) -> tuple[list[Tensor], list[dict | None]]:
    """The parameters a step updates (those with a gradient) and their optimizer state: None
    where the step would create it (an empty state, unless the optimizer keeps none: torch's
    SGD without momentum)."""
    params: list[Tensor] = []
    states: list[dict | None] = []
    for group in optimizer.param_groups:
        # (torch's own SGD, not a subclass, which may keep state of its own)
        stateless = type(optimizer) is torch.optim.SGD and group.get("momentum", 0) == 0
        for p in group["params"]:
            if p.grad is not None:
                params.append(p)
                states.append(optimizer.state.get(p) or ({} if stateless else None))
    return params, states


def _undoable(states: list[dict | None], device: torch.device) -> bool:
    """Whether a step over these states can be skipped on ``device`` without a host read: the
    step creates no state, and what there is holds tensors on that device only (torch.where
    would move a CPU step count onto the GPU, where the optimizer then reads it back every
    step: a non-fused Adam's, say), none of them sparse (which ``torch.where`` does not take)."""
    return all(s is not None and all(_dense_on(v, device) for v in s.values()) for s in states)


def _dense_on(v: object, device: torch.device) -> bool:
    return isinstance(v, Tensor) and v.layout == torch.strided and v.device == device


@dataclass(frozen=True)
class _Census:
    """The devices of an optimizer's state tensors (None: it also holds something else, a
    Python number or a sparse tensor), as counted for ``key``: the state mapping's id and the
    parameters' ids."""

    key: tuple[int, tuple[int, ...]]
    devices: frozenset[torch.device] | None


_CENSUS: weakref.WeakKeyDictionary[torch.optim.Optimizer, _Census] = weakref.WeakKeyDictionary()


def _census(optimizer: torch.optim.Optimizer) -> _Census | None:
    """None unless every parameter has its state (a step then creates none), asked every step:
    a user may empty a state (a momentum reset) or swap a parameter in a group. The long way
    looks each parameter up and counts the devices of the state's tensors; it is kept while the
    state mapping and the parameters are the same objects, and then a step asks only whether
    there are as many entries as parameters and none is empty (passes in C: ≈ 11 µs a step for
    150 parameters, against ≈ 20 µs for the lookups, whose tensor keys hash in Python). Not seen:
    a state tensor moved to another device in place by user code, or a parameter's entry
    removed while one for a tensor that is no parameter was added. torch's SGD without momentum
    keeps no state: nothing to create, nothing to put back."""
    if type(optimizer) is torch.optim.SGD and all(
        g.get("momentum", 0) == 0 for g in optimizer.param_groups
    ):
        return _STATELESS
    state = optimizer.state
    params = [g["params"] for g in optimizer.param_groups]
    key = (id(state), tuple(map(id, itertools.chain.from_iterable(params))))
    kept = _CENSUS.get(optimizer)
    if (
        kept is not None
        and kept.key == key
        and len(state) == len(key[1])
        and all(state.values())  # (an emptied entry: not settled)
    ):
        return kept
    for p in itertools.chain.from_iterable(params):
        if not state.get(p):
            return None
    devices: set[torch.device] | None = set()
    for entry in state.values():
        for v in entry.values():
            if not isinstance(v, Tensor) or v.layout != torch.strided:
                devices = None
            elif devices is not None:
                devices.add(v.device)
    kept = _Census(key, None if devices is None else frozenset(devices))
    _CENSUS[optimizer] = kept
    return kept


_STATELESS = _Census((0, ()), frozenset())


def _settled_on(optimizer: torch.optim.Optimizer, device: torch.device) -> bool:
    """A step creates no state and what there is lies on ``device`` only (:func:`_undoable`
    for every parameter, from the census)."""
    census = _census(optimizer)
    return census is not None and census.devices is not None and census.devices <= {device}


def step_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``; torch's fused SGD with momentum steps unfused where it would refuse:
    a step in which some parameters with a gradient have a momentum buffer and others none yet
    (a parameter's first gradient after the optimizer's first step: a branch or an expert not
    used at first) raises ``TypeError: expected Tensor as element ...`` in torch's fused SGD.
    That one step goes through torch's own unfused SGD, which makes the new buffers as any first
    step does; later steps are fused again."""
    if not _late_momentum(optimizer):
        optimizer.step()
        return
    fused = [g for g in optimizer.param_groups if g.get("fused")]
    for group in fused:
        group["fused"] = False
    try:
        optimizer.step()
    finally:
        for group in fused:
            group["fused"] = True


def clear_grads(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)``, as one loop setting each of the optimizer's
    parameters' gradient to None: what torch's does with ``set_to_none=True``, without the
    dynamo-disabling wrapper and the profiler range around it (1.7 µs instead of 10.8 µs per
    step for the digits MLP's 6 tensors on this CPU). torch's own runs where it may do more: an
    optimizer whose ``zero_grad`` is its own, and while a profiler records (its
    ``Optimizer.zero_grad#...`` range stays in the trace)."""
    if getattr(optimizer.zero_grad, "__func__", None) is not _ZERO_GRAD or (
        torch.autograd._profiler_enabled()
    ):
        optimizer.zero_grad(set_to_none=True)
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


_ZERO_GRAD = torch.optim.Optimizer.zero_grad


def _late_momentum(optimizer: torch.optim.Optimizer) -> bool:
    """Whether torch's fused SGD would refuse this step (see :func:`step_optimizer`)."""
    if type(optimizer) is not torch.optim.SGD:
        return False
    groups = [g for g in optimizer.param_groups if g.get("fused") and g["momentum"] != 0]
    if not groups or _census(optimizer) is not None:
        return False  # (every parameter has its state, its buffer: nothing to check)
    for group in groups:
        have = [
            optimizer.state.get(p, {}).get("momentum_buffer") is not None
            for p in group["params"]
            if p.grad is not None
        ]
        if any(have) and not all(have):
            return True
    return False


def scaled_step(
    scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, skip: Tensor | None = None
) -> None:
    """``scaler.step(optimizer)``, then ``scaler.update()`` (``trainer.precision=16``, gradients
    already unscaled); with a 0-d ``skip``, no update where it is True (1.0). The scale follows
    the scaler's own overflow flag only, as when the caller skips the step on the host (a step
    skipped for ``skip`` alone does not lower it).

    A fused optimizer whose state exists gets ``skip`` merged into the ``found_inf`` that
    ``GradScaler.step`` hands it (a step pre-hook, which runs after the scaler set it): no host
    read, as the scaler itself makes none there. Elsewhere ``skip`` is read on the host (with an
    optimizer that is not fused, ``GradScaler.step`` reads its own flag every step anyway).

    A fused optimizer's step that creates state is not left to ``found_inf``: torch's fused SGD
    makes its momentum buffers with ``empty_like`` before its kernel looks at the flag, so an
    overflow on its first step (common at the scaler's initial scale) would keep uninitialized
    memory as momentum. Such a step reads the gradients' finiteness on the host (the scaler's
    own flag: what ``unscale_`` found) and is skipped there on an overflow, as GradScaler skips
    a step that is not fused; a finite one that torch's fused SGD would refuse
    (:func:`step_optimizer`) is taken unfused, around the scaler (the gradients are unscaled
    already)."""
    if scaler.is_enabled() and takes_found_inf(optimizer):
        settled = _census(optimizer) is not None  # (no state to create: the short way)
        params: list[Tensor] = []
        states: list[dict | None] = []
        if not settled:
            params, states = _stepped(optimizer)
        if (
            skip is not None
            and skips_on_device(optimizer)  # (else its step or a hook would see the skip)
            and (_settled_on(optimizer, skip.device) if settled else _undoable(states, skip.device))
        ):

            def merge(opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
                opt.found_inf = torch.maximum(opt.found_inf, skip.float())  # type: ignore[attr-defined]

            handle = optimizer.register_step_pre_hook(merge)
            try:
                scaler.step(optimizer)
            finally:
                handle.remove()
            scaler.update()
            return
        if any(s is None for s in states) and not _finite([p.grad for p in params]):  # type: ignore[misc]
            scaler.update()  # (lowers the scale: unscale_ found the overflow)
            return
        if _late_momentum(optimizer):  # (the gradients were read finite just above)
            if skip is None or not bool(skip):  # host read: a step that creates state
                step_optimizer(optimizer)  # unfused, without GradScaler's found_inf
            scaler.update()
            return
    if skip is not None and bool(skip):  # host read: see above
        scaler.update()
        return
    scaler.step(optimizer)
    scaler.update()


def _finite(tensors: list[Tensor]) -> bool:
    """Whether every value of these tensors is finite (one host read)."""
    if not tensors:
        return True
    device = tensors[0].device
    flags = torch.stack([torch.isfinite(t).all().to(device) for t in tensors])
    return bool(flags.all())  # host read: a step that creates optimizer state


def conditional_step(optimizer: torch.optim.Optimizer, skip: Tensor) -> None:
    """``optimizer.step()`` where the 0-d ``skip`` is False (or 0.0, as ``found_inf``); nothing
    changes where it is True (1.0): parameters and optimizer state (see the module docstring)."""
    if not skips_on_device(optimizer):
        if bool(skip):  # host read: an optimizer of one's own, or one with step hooks
            return
        step_optimizer(optimizer)
        return
    if takes_found_inf(optimizer) and _settled_on(optimizer, skip.device):
        _found_inf_step(optimizer, skip)  # (the usual step: no pass over the parameters)
        return
    params, states = _stepped(optimizer)
    if not _undoable(states, skip.device):
        if bool(skip):  # host read: a step that creates state, or numbers elsewhere in it
            return
        step_optimizer(optimizer)
        return
    if takes_found_inf(optimizer):
        _found_inf_step(optimizer, skip)
        return
    with torch.no_grad():
        skip = skip if skip.dtype == torch.bool else skip != 0  # (a found_inf-style 1.0/0.0)
        saved_params = [p.clone() for p in params]
        saved_states = [{k: v.clone() for k, v in s.items()} for s in states]  # type: ignore[union-attr]
        optimizer.step()
        for p, before in zip(params, saved_params, strict=True):
            p.copy_(torch.where(skip, before, p))
        for p, kept in zip(params, saved_states, strict=True):
            if not kept:  # (a stateless optimizer's: nothing to put back, no entry to add)
                continue
            state = optimizer.state[p]  # a step may have replaced a state tensor, not updated it
            for k, v in kept.items():
                state[k] = torch.where(skip, v, state[k])


def _found_inf_step(optimizer: torch.optim.Optimizer, skip: Tensor) -> None:
    """A fused optimizer's step with ``skip`` as its ``found_inf``, as GradScaler hands it."""
    optimizer.found_inf = skip.float()  # type: ignore[attr-defined]
    optimizer.grad_scale = None  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf, optimizer.grad_scale  # type: ignore[attr-defined]
