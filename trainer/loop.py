"""The training loop: ``fit -> train_epoch -> train_step -> optimizer_step``; ``evaluate``.

One optimizer step, in order (the body never changes for instrumentation; callbacks hang off the
named hooks):

1. forward under autocast: ``logits = model(x)``; ``losses = criterion(logits, y)``, shape (B,)
   or, per token, (B, T) (with ``input_grad_penalty``, ``x`` is first made a leaf that requires
   grad)
2. objective -> backward (trainer/objective.py, the one owner of the roots): scalar, the loss's
   average; vector, ``losses.backward(gradient=w)`` with w of the losses' shape. With gradient
   accumulation each micro-batch counts by its share of its window (samples, or valid tokens,
   read ahead), so the accumulated gradient is that of the window's average. Regularizers join
   the same pass: the parameter ones once per optimizer step (last micro-batch), the
   input-gradient penalty on every micro-batch by its share
3. ``on_after_backward`` (every micro-batch)
4. last micro-batch of the window: unscale (fp16) -> ``on_before_optimizer_step``, the one point
   where gradients are measured: after accumulation and unscaling, before clipping
5. clip by total norm (the returned pre-clip norm is what ``grad_norm/total`` logs)
6. ``optimizer.step()``, ``scheduler.step()``, ``zero_grad(set_to_none=True)``
7. ``on_train_step_end``; train scalars on the logging cadence (the only host sync of a step)
"""

from __future__ import annotations

import ast
import collections
import contextlib
import difflib
import inspect
import itertools
import logging
import math
import re
import signal
import struct
import time
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import clip_grad_norm_, clip_grads_with_norm_
from torch.optim.lr_scheduler import ReduceLROnPlateau

from trainer.backward import double_backward_kernels
from trainer.callbacks import HOOKS, READ_EVERY, Callback, Every, Stateful, StepOutput, few
from trainer.checkpoint import checkpointable
from trainer.config import ContractError
from trainer.data.base import Batch, Loader, batch_count
from trainer.distributed import (
    SINGLE,
    World,
    agree,
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    broadcast_buffers,
    warn_batch_norms,
)
from trainer.instrument.norms import memory_of, needs_care, norms_of, total_norm
from trainer.logger import Progress, ProgressOptions, Scalars, TensorBoardLogger, shown
from trainer.losses import (
    Loss,
    as_loss,
    check_metric_names,
    check_pairs,
    finished_metrics,
    same_val_keys,
    units_dtype,
    val_keys,
)
from trainer.metrics import HostFn, LossTally, Staging, mean_of
from trainer.objective import Objective, Window
from trainer.precision import sum_dtype
from trainer.regularizers import InputGradPenalty, Regularizer
from trainer.update import (
    clear_grads,
    conditional_step,
    scaled_step,
    step_optimizer,
    watch_update,
)
from trainer.weighting import Weighting, check_set_up, prepare

log = logging.getLogger(__name__)


_AMP_DTYPES = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


def _check_arguments(
    precision: Any,
    grad_clip: float,
    accumulate: int,
    max_epochs: int,
    max_steps: int,
    log_every: int,
) -> None:
    """The Trainer's numbers, as the config's schema checks them (built by hand from Python,
    ``accumulate_grad_batches=-1`` never ended an epoch, ``0`` divided by zero, ``max_epochs
    =-1`` trained nothing and ``grad_clip=-1`` clipped nothing, unsaid: a probe).

    Raises:
        ValueError: one is out of its range, naming it.
    """  # fmt: skip
    checks = [
        (str(precision) in _AMP_DTYPES, "precision", f"{precision!r}, expected '32', 'bf16' or "
         "'16'"),
        (grad_clip >= 0, "grad_clip", f"{grad_clip}, must be >= 0 (0: no clipping)"),
        (accumulate >= 1, "accumulate_grad_batches", f"{accumulate}, must be >= 1"),
        (max_epochs >= 1, "max_epochs", f"{max_epochs}, must be >= 1"),
        (max_steps == -1 or max_steps >= 1, "max_steps", f"{max_steps}, must be >= 1, or -1 "
         "for no limit"),
        (log_every >= 1, "log_every_n_steps", f"{log_every}, must be >= 1"),
    ]  # fmt: skip
    for ok, name, got in checks:
        if not ok:
            raise ValueError(f"Trainer: {name}: got {got}")


#: an optimizer group's keys that choose torch's implementation, not the update's math
IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")


def _own_implementation(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A checkpoint's optimizer state with this run's implementation flags in its groups.
    torch's ``load_state_dict`` takes every key of a saved group but its parameters: a run
    resumed on another device kept the checkpoint's (a CPU checkpoint resumed on a GPU trained
    unfused, and the non-finite guard lost its device-side skip; a GPU one resumed on the CPU
    stayed fused, a review's). Set before loading, as torch places the ``step`` counts by
    them (a fused or capturable step's on the parameters' device)."""
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        return saved  # (refused by the caller, or by torch, with the reason)
    mine = optimizer.param_groups
    return {**saved, "param_groups": [
        {**g, **{k: own[k] for k in IMPLEMENTATION_KEYS if k in own}} if isinstance(g, dict) else g
        for g, own in zip(groups, mine, strict=True)
    ]}  # fmt: skip


def check_monitor(trainer: Trainer) -> None:
    """Refuse a ``monitor`` that is none of the run's metrics where a ``ReduceLROnPlateau``
    steps on it (a Trainer built by hand trained an epoch, then failed with a bare
    ``KeyError: 'val/accuracy'``, a probe's; ``trainer.run`` refuses any such monitor as it
    builds the run)."""
    from torch.optim.lr_scheduler import ReduceLROnPlateau

    from trainer.config import ConfigError

    names = (*trainer.criterion.metrics, "train/loss")
    if isinstance(trainer.scheduler, ReduceLROnPlateau) and trainer.monitor not in names:
        raise ConfigError(
            f"monitor: got {trainer.monitor!r}, which the ReduceLROnPlateau scheduler steps on, "
            f"but this run reports {', '.join(names)} (loss: {type(trainer.criterion).__name__}"
            f", task {trainer.criterion.task}); set trainer.monitor to one of them"
        )


def check_frequency_scaling(model: nn.Module, ranks: int, accumulate: int) -> None:
    """An embedding looked up with ``scale_grad_by_freq`` divides its gradient by each
    index's count in the batch it sees: a rank's part of the global batch, a micro-batch of
    an accumulation window. Such a run is then not one process on the global batch (a probe:
    the embedding's gradient norm 46 % off on 2 ranks): said, naming them, by every Trainer
    (one built by hand said nothing until 2026-12-08, a probe's)."""
    if ranks <= 1 and accumulate <= 1:
        return
    names = [n or type(model).__name__ for n, m in model.named_modules()
             if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.scale_grad_by_freq]  # fmt: skip
    if names:
        split = " and ".join(
            w for w, on in ((f"each rank's part ({ranks} ranks)", ranks > 1),
                            (f"each micro-batch ({accumulate} a step)", accumulate > 1)) if on
        )  # fmt: skip
        log.warning(
            "%s: scale_grad_by_freq divides the gradient by each index's count in %s, not in "
            "the step's whole batch, so this run's gradients are not those of one process on "
            "one batch (turn scale_grad_by_freq off to have them)",
            ", ".join(names[:5]) + (" …" if len(names) > 5 else ""), split,
        )  # fmt: skip


def _check_world(
    world: World, model: nn.Module, forward_model: nn.Module | None, loaders: dict[str, Any]
) -> None:
    """Refuse a data-parallel setup whose pieces disagree (a Trainer built by hand):
    a data-parallel ``world`` without a DistributedDataParallel ``forward_model`` wrapping
    ``model`` (each rank stepped on its own part's gradient, the replicas drifting apart), a
    DistributedDataParallel one with a single-process ``world`` (every gradient half the
    global batch's on two ranks), or loaders sharded for another world (a probe's, each
    silent until 2026-12-08; ``trainer.run`` builds them from one World)."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = getattr(forward_model, "_orig_mod", forward_model)  # (compiled: DDP inside)
    wrapped = isinstance(ddp, DistributedDataParallel)
    if world.distributed and not (isinstance(ddp, DistributedDataParallel) and ddp.module is model):
        given = (
            "a DistributedDataParallel of another module" if wrapped
            else f"a {type(forward_model).__name__}" if forward_model is not None
            else "not given"
        )  # fmt: skip
        raise ContractError(
            f"Trainer: world is data-parallel (rank {world.rank} of {world.size}), and "
            f"forward_model is {given}: give forward_model=DistributedDataParallel(model) (the "
            "gradients are averaged over the ranks by it; without it each rank trains on its "
            "own part)"
        )
    if wrapped and not world.distributed and _group_size(ddp) != 1:  # (a group of one, as
        # torchrun --nproc_per_node=1 makes it, averages over one rank: exact, a review's)
        raise ContractError(
            "Trainer: forward_model is a DistributedDataParallel, and world is a single "
            "process: give the Trainer the World its loaders and process group share "
            "(trainer.distributed.World(rank, size, local_rank)); the loss's average and the "
            "weights are taken over the global batch by it"
        )
    for role, loader in loaders.items():
        theirs = getattr(loader, "world", None)
        if isinstance(theirs, World) and (theirs.rank, theirs.size) != (world.rank, world.size):
            raise ContractError(
                f"Trainer: {role} is sharded for rank {theirs.rank} of {theirs.size}, and the "
                f"Trainer's world is rank {world.rank} of {world.size}: build the loaders and "
                "the Trainer with one World"
            )


def _group_size(ddp: Any) -> int:
    """The processes a DistributedDataParallel averages over (its process group's size)."""
    group = getattr(ddp, "process_group", None)
    try:
        return int(group.size()) if group is not None else torch.distributed.get_world_size()
    except (RuntimeError, ValueError, AttributeError):  # (no default group: none to average)
        return 1


def check_plateau(scheduler: Any, monitor: str) -> None:
    """A ``ReduceLROnPlateau`` steps on the monitored metric after each validation: its
    ``mode`` must agree with the metric's direction (``mode: min`` on val/acc would cut the
    learning rate while accuracy improves). At :meth:`Trainer.fit`'s start, and before a
    run is built (a Trainer built by hand stepped such a scheduler unchecked). A metric of
    one's own is warned of where ``mode`` disagrees with the sweep report's guess by name."""
    from torch.optim.lr_scheduler import ReduceLROnPlateau

    from trainer.config import ConfigError
    from trainer.report import DIRECTIONS, resolve_mode

    if not isinstance(scheduler, ReduceLROnPlateau):
        return
    if monitor not in DIRECTIONS:  # a metric of one's own: its direction is a guess (by
        guess = resolve_mode(monitor, "auto")  # name, as the sweep report ranks it): said
        if scheduler.mode != guess:
            best = "highest" if guess == "max" else "lowest"
            log.warning(
                "scheduler.mode=%s: ReduceLROnPlateau steps on %s (monitor), which the sweep "
                "report ranks %s first by its name; if it is best when %s, set "
                "scheduler.mode=%s", scheduler.mode, monitor, best, best, guess,
            )  # fmt: skip
        return
    wanted = DIRECTIONS[monitor]
    if scheduler.mode != wanted:
        raise ConfigError(
            f"scheduler.mode: ReduceLROnPlateau steps on {monitor} (monitor), which is best "
            f"when {'highest' if wanted == 'max' else 'lowest'}, with mode={scheduler.mode}; "
            f"set scheduler.mode={wanted} (or another monitor)"
        )


def planned_steps(batches_per_epoch: int, accumulate: int, max_epochs: int, max_steps: int) -> int:
    """Optimizer steps a run will take: the first of ``max_epochs`` and ``max_steps`` wins."""
    total = max_epochs * math.ceil(batches_per_epoch / accumulate)
    return min(total, max_steps) if max_steps > 0 else total


def _check_stateful(key: str, part: Stateful) -> None:
    """Refuse a part whose ``state_dict`` or ``load_state_dict`` cannot be called as a
    checkpoint calls them (one of one's own that had such a method for another purpose,
    before :class:`Stateful`: it failed at the first checkpoint, after training)."""
    for name, args in (("state_dict", ()), ("load_state_dict", ({},))):
        method = getattr(part, name)
        try:
            inspect.signature(method).bind(*args)
        except TypeError:
            raise ContractError(
                f"{key} {type(part).__name__}: its {name}{inspect.signature(method)} cannot be "
                f"called as a checkpoint calls it, {name}({'state' if args else ''}) "
                "(trainer.callbacks.Stateful: state_dict() returns what a checkpoint keeps, "
                "load_state_dict(state) restores it on a resume); rename a method of that "
                "name that means something else"
            ) from None


def check_callback(cb: Callback, where: str = "callbacks") -> list[str]:
    """Refuse the hooks ``cb`` overrides that cannot be called as the loop calls them, and a
    method named as a hook misspelled (``on_train_step_ends`` was never called, unsaid: a
    probe's); returns its other ``on_*`` methods, which the loop never calls either (said by
    :meth:`Trainer.add_callbacks`: a helper of one's own may be named so)."""
    for name in HOOKS:
        if getattr(type(cb), name) is not getattr(Callback, name):
            _check_hook(cb, name, where)
    others = []
    for name in dir(type(cb)):
        if not name.startswith("on_") or name in HOOKS:
            continue
        kind = inspect.getattr_static(type(cb), name, None)
        if not isinstance(kind, types.FunctionType | staticmethod | classmethod):
            continue  # (a flag or a property named so: no method, a review's)
        close = difflib.get_close_matches(name, HOOKS, n=1, cutoff=0.9)
        if close:
            raise ContractError(
                f"{where}: {type(cb).__name__}.{name} is no hook, so the loop never calls it; "
                f"did you mean {close[0]}? (the hooks: trainer.callbacks.Callback)"
            )
        others.append(name)
    return others


def _check_hook(cb: Callback, name: str, where: str) -> None:
    """Refuse a hook that cannot be called as the loop calls it (``on_train_step_end(self,
    trainer)`` failed at the first step, after training had begun: a probe)."""
    expected = inspect.signature(getattr(Callback, name))
    wanted = f"{name}({', '.join(list(expected.parameters)[1:])})"
    hook = getattr(cb, name)
    if not callable(hook):
        raise ContractError(f"{where}: {type(cb).__name__}.{name} is {hook!r}, not a method; "
                            f"the loop calls {wanted}")  # fmt: skip
    try:  # (the callable the loop calls: a functools.wraps wrapper's own signature)
        own = inspect.signature(hook, follow_wrapped=False)
    except ValueError:  # (no signature to read: a builtin; taken as it is)
        return
    try:
        own.bind(*[None] * (len(expected.parameters) - 1))
    except TypeError:
        raise ContractError(
            f"{where}: {type(cb).__name__}.{name}({', '.join(own.parameters)}) "
            f"cannot be called as the loop calls it, {wanted}"
        ) from None


def _note_hook(error: Exception, hook: Any, name: str) -> None:
    """Name the callback and hook an error came from (once, as a note the recorded error
    carries: ``trainer.run`` writes the notes after the message)."""
    note = f"(in {type(_owner(hook)).__name__}.{name})"
    if note not in getattr(error, "__notes__", ()):
        error.add_note(note)


def _described(error: BaseException | None) -> str:
    """``Type: message`` of an error ("" for none), whatever its ``__str__`` does."""
    if error is None:
        return ""
    try:
        return f"{type(error).__name__}: {error}"
    except Exception:  # (a message that cannot be made: the type alone)
        return type(error).__name__


def _modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Each module's train/eval flag."""
    return [(m, m.training) for m in model.modules()]


def _put_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, training in modes:
        m.training = training


def _bits(v: Any) -> Any:
    """A metric's value compared by its bits (NaN equal to NaN)."""
    return struct.pack("<d", v) if isinstance(v, float) else v


def _owner(hook: Any) -> Any:
    """The callback a hook (its bound method) belongs to."""
    return getattr(hook, "__self__", hook)


def _validated_step(state: dict[str, Any]) -> int:
    """The step a checkpoint of an earlier version (no ``validated_at``) was last validated
    at, as far as it tells: its own where it was written after a validation (at an epoch's
    end, or at its run's ``max_steps``), else unknown (-1: a mid-epoch stop's metrics are an
    earlier validation's)."""
    step = int(state["step"])
    max_steps = ((state.get("config") or {}).get("trainer") or {}).get("max_steps")
    at_rest = int(state.get("batch_in_epoch", 0)) == 0 or step == max_steps
    return step if "train/loss" in state.get("metrics", {}) and at_rest else -1


def window_sizes(num_samples: int, batch_size: int, drop_last: bool, accumulate: int) -> list[int]:
    """For each batch of an epoch, the number of samples in its accumulation window."""
    n = batch_count(num_samples, batch_size, drop_last)
    sizes = [min(batch_size, num_samples - i * batch_size) for i in range(n)]
    out: list[int] = []
    for start in range(0, n, accumulate):
        window = sizes[start : start + accumulate]
        out += [sum(window)] * len(window)
    return out


#: what the trainer uses of its training loader (besides iterating it and its length)
LOADER_API = ("set_epoch", "num_samples", "global_batch_size", "drop_last", "current_global_size")

#: what a first step's loss error adds, by task
LABELS_HINT = {
    "classification": " (class labels: int64 in [0, out_dim))",
    "sequence": " (token targets: int64 (B, T) in [0, out_dim), the classes each position is "
    "scored over, padding loss.ignore_index)",
    "regression": " (float targets the output's shape)",
}


def _bound(r: Regularizer, model: nn.Module) -> None:
    """A regularizer given to the Trainer bound to ``model`` (or to a module of it: its
    selection is kept, a review's: binding again to the whole model regularized every layer
    of an L2 bound to the head, unsaid); one given unbound is bound to ``model``."""
    if r.bound_to is None:
        r.bind(model)
        return
    mine = {id(p) for p in model.parameters()}
    theirs = [n for n, p in [*zip(r.names, r.params, strict=True), *r._frozen]
              if id(p) not in mine]  # fmt: skip
    if theirs:
        raise ValueError(
            f"regularizer {r.name} ({type(r).__name__}) is bound to parameters that are not "
            f"the Trainer's model's ({', '.join(theirs[:3])}{' …' if len(theirs) > 3 else ''}): "
            "bind it to the model the Trainer trains (or to a module of it), or give it unbound"
        )


def torch_words(e: BaseException) -> str:
    """An error's own words, as a check matches them: a compiled forward's (Dynamo runs it on
    fake tensors first) is the failing operation's error it quotes ("got RuntimeError('...')"),
    without the source lines it quotes after "from user code:" (``torch.ones(3,
    dtype=h.dtype)`` in a model's line made a shape error read as a dtype mismatch, and the
    data was blamed: a probe's)."""
    text = str(e).split("\nfrom user code:")[0]
    inner = re.search(r"got \w+\((['\"].*['\"])\)$", text, re.MULTILINE)
    if inner is not None:
        with contextlib.suppress(ValueError, SyntaxError):
            return str(ast.literal_eval(inner.group(1)))
    return text


#: state entries torch's own optimizers keep element by element, of their tensor's shape (an
#: optimizer of one's own, or a factored one, Adafactor's, keeps others)
_ELEMENTWISE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg",
                "acc_delta", "sum", "grad_avg", "ax", "prev")  # fmt: skip


def _same_names(kept: list[str], now: list[str]) -> bool:
    """Whether an optimizer group holds the same tensors as when it was saved, by their names
    in the model; a tensor that is not the model's (a module a callback replaced leaves its
    old tensors in the optimizer: a review's) on either side is left to the shapes' check."""
    return len(kept) == len(now) and all(
        a == b or a.startswith(NOT_THE_MODELS) or b.startswith(NOT_THE_MODELS)
        for a, b in zip(kept, now, strict=True)
    )


#: how a group's tensor that is not one of the model's parameters is named
NOT_THE_MODELS = "(not the model's"


def _refuse_another_optimizers(scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
    """A scheduler (or a part of a SequentialLR / ChainedScheduler) built on another optimizer
    than the run's: it set its lr on that one, and the run trained and logged the optimizer's
    own, unsaid (an optimizer rebuilt in a notebook, the scheduler kept, a probe's)."""
    if scheduler is None:
        return
    parts = [scheduler, *(getattr(scheduler, "_schedulers", None) or ())]
    for part in parts:
        theirs = getattr(part, "optimizer", None)
        if theirs is not None and theirs is not optimizer:
            raise ContractError(
                f"scheduler: {type(part).__name__} is built on another optimizer "
                f"({type(theirs).__name__} at {id(theirs):#x}) than the run's "
                f"({type(optimizer).__name__} at {id(optimizer):#x}): it would set the "
                "learning rate of an optimizer the run does not step; build it on the "
                "optimizer given to the Trainer"
            )
        if part is not scheduler:
            _refuse_another_optimizers(part, optimizer)


def _named(owner: Any, method: str, *args: Any) -> Any:
    """``owner.<method>(*args)``; an error raised there by a component of one's own (not of
    this package) is noted with its class and method (``(in MyCallback.state_dict)``): a
    callback's failing state_dict was recorded as the trainer's checkpointing callback's, and
    its load_state_dict's as a checkpoint that does not fit the run (a probe's)."""
    try:
        return getattr(owner, method)(*args)
    except Exception as e:
        if not type(owner).__module__.startswith("trainer."):
            e.add_note(f"(in {type(owner).__name__}.{method})")
        raise


def dtype_refusal(e: RuntimeError, x: Tensor, model: nn.Module) -> ContractError | None:
    """A model's first forward failing for its inputs' dtype (float64 or uint8 inputs for a
    float32 model), which torch's message names no data for: the refusal naming the inputs'
    dtype, the parameters' and the fix; None for another error. torch's words for a dtype
    mismatch (conv's: "Input type (double) and bias type (float) should be the same"), not
    the inputs' dtype alone: a language model's int64 ids fail for other reasons too (a
    shape, memory), kept as torch raised them."""
    # (a lazy model's dtypes are read before its dry run gives them shapes: dtype, not
    # is_floating_point(), which an uninitialized parameter refuses)
    weights = {p.dtype for p in model.parameters() if p.dtype.is_floating_point}
    text = torch_words(e)
    conv = "Input type (" in text and "should be the same" in text
    kernel = "not implemented for '" in text  # (uint8 into batch_norm, a pooling)
    dtype = "dtype" in text or "scalar type" in text or conv or kernel
    if isinstance(e, torch.OutOfMemoryError) or not dtype:
        return None
    return ContractError(
        f"the model's first forward failed on the data's inputs ({x.dtype}; the model's "
        f"parameters: {', '.join(sorted(map(str, weights))) or 'none'}): cast them in the data "
        "module (x.float(); np.float32 in a tensors file) or in the model's forward. torch: "
        f"{text.splitlines()[0]}"
    )


def _refuse_lazy(model: nn.Module) -> None:
    """A model with lazy modules (``nn.LazyLinear``) not yet run: its parameters have no
    shape until a forward, and the Trainer's first look at them failed in torch's words (a
    session's "noticed"). ``trainer.run`` runs a config's model once before building the
    optimizer (:func:`trainer.run.materialize_lazy`); by hand, do what torch's documentation
    asks: one forward on a batch, then the optimizer and the Trainer."""
    lazy = [n for n, p in model.named_parameters() if nn.parameter.is_lazy(p)]
    if lazy:
        raise ContractError(
            f"model: {', '.join(lazy[:3])}{' …' if len(lazy) > 3 else ''} not initialized yet "
            "(lazy modules, nn.LazyLinear and the like, take their shapes at their first "
            "forward): run the model once on a batch before building its optimizer and the "
            "Trainer (torch's dry run; trainer.run does it for a config's model)"
        )


def _check_half_trained(
    scaler: torch.amp.GradScaler | None, named: Iterator[tuple[str, Tensor]], when: str
) -> None:
    """``trainer.precision=16`` with trainable float16 parameters: torch's ``unscale_``
    refuses their gradients at the first step. Frozen ones get no gradient and are not
    unscaled (a frozen half-precision backbone under a float32 head was refused, which torch's
    own AMP loop trains: a probe's); one made trainable mid-run is refused then."""
    if scaler is None:
        return
    half = [n for n, p in named if p.dtype == torch.float16 and p.requires_grad]
    if half:
        raise ValueError(
            f"trainer.precision=16 with trainable float16 parameters ({', '.join(half[:3])}"
            f"{' …' if len(half) > 3 else ''}{when}): the GradScaler cannot unscale float16 "
            "gradients (torch refuses it at the first step); keep the model in float32 "
            "(autocast runs its matmuls in float16), keep those layers frozen, or use "
            "trainer.precision=32 or bf16 with a float16 model"
        )


def _output_in_words(output: Any, limit: int = 400) -> str:
    """The model's output in words: a tensor's dtype and shape, each of a tuple's, list's or
    dict's (a dict was "of shape ()", a probe's), cut at ``limit`` characters (a cache of 32
    layers' keys and values made 2,343: a review's)."""
    words = _in_words(output)
    return words if len(words) <= limit else words[: limit - 1] + "…"


def _in_words(output: Any) -> str:
    if isinstance(output, Tensor):
        return f"{output.dtype} of shape {tuple(output.shape)}"
    if isinstance(output, (tuple, list)):
        return f"a {type(output).__name__} of ({', '.join(_in_words(o) for o in output)})"
    if isinstance(output, dict):
        inner = ", ".join(f"{k!r}: {_in_words(v)}" for k, v in output.items())
        return f"a dict of {{{inner}}}"
    return f"a {type(output).__name__}"


def _now(value: Any) -> Any:
    """A learning rate as it is now: a tensor one (capturable Adam's) copied on the device,
    as the scheduler changes it in place before the step's values are read (it was logged a
    step ahead: a review)."""
    return value.detach().clone() if isinstance(value, Tensor) else value


def _qualified(cb: Any) -> str:
    """A callback's (or an objective part's) class as a checkpoint names it:
    ``module.QualifiedName``."""
    return f"{type(cb).__module__}.{type(cb).__qualname__}"


def _own_copies(args: tuple) -> tuple:
    """``args`` with each dict copied, for one hook: the run's metrics, of which each callback
    of ``on_validation_end`` and ``on_fit_end`` gets a copy of its own. The trainer's record
    was handed on itself: a callback showing ``val/acc`` as a percentage in place changed
    ``fit``'s result, ``metrics.json``, the checkpoints' metrics and the monitor, while
    TensorBoard had the validation's value (a probe's)."""
    return tuple(dict(a) if isinstance(a, dict) else a for a in args)


class Trainer:
    """Trains ``model`` on ``train_loader``, validating on ``val_loader`` after each epoch.

    Args:
        criterion: the loss, ``(output, y) -> (B,)`` per-sample losses: a
            :class:`trainer.losses.Loss` (its task gives the validation metrics) or any
            callable (validation then reports val/loss only).
        weighting: gradient weights for vector mode; ``None`` selects scalar mode.
        precision: ``"32"``, ``"bf16"`` (autocast) or ``"16"`` (autocast + GradScaler).
        grad_clip: max total gradient L2 norm (0: no clipping).
        log_every_n_steps: train scalars every N optimizer steps (and at the last).
        progress: a progress bar (or lines) while training: ``True``, or its options.
        world, forward_model: data-parallel, this process's rank and the world size, and the
            DistributedDataParallel wrapper the training forward goes through (``model`` stays
            the plain module: names, state dicts, evaluation).
        callbacks: the hooks' listeners (trainer/callbacks.py), called in this order; periodic
            checkpoints and stop signals are callbacks too (trainer/checkpoint.py).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader: Loader,
        val_loader: Loader,
        *,
        criterion: Loss | Callable[[Tensor, Tensor], Tensor],
        device: torch.device,
        weighting: Weighting | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        precision: str = "32",
        grad_clip: float = 0.0,
        accumulate_grad_batches: int = 1,
        max_epochs: int = 1,
        max_steps: int = -1,
        log_every_n_steps: int = 10,
        logger: TensorBoardLogger | None = None,
        progress: bool | ProgressOptions = False,
        detect_anomaly: bool = False,
        world: World = SINGLE,
        forward_model: nn.Module | None = None,
        channels_last: bool = False,
        callbacks: Sequence[Callback] = (),
        regularizers: Sequence[Regularizer | InputGradPenalty] = (),
    ):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.world = world
        self.forward_model = forward_model if forward_model is not None else model
        #: 4-D inputs go in channels-last memory order (the model's weights already are)
        self.channels_last = channels_last
        self.train_loader, self.val_loader = train_loader, val_loader
        #: the loss component (trainer.losses.Loss; a plain callable is wrapped)
        self.criterion = as_loss(criterion)
        check_metric_names(self.criterion)
        self._told_extra_metrics = False  # (a finalize's names beyond metrics: warned once)
        #: the metric a ReduceLROnPlateau scheduler steps on after each validation (run():
        #: the config's ``monitor``)
        self.monitor: str = self.criterion.monitor
        self.device = device
        _refuse_lazy(model)
        _refuse_another_optimizers(scheduler, optimizer)
        _check_arguments(precision, grad_clip, accumulate_grad_batches, max_epochs, max_steps,
                         log_every_n_steps)  # fmt: skip
        self.amp_dtype = _AMP_DTYPES[str(precision)]
        self.scaler = torch.amp.GradScaler(device.type) if str(precision) == "16" else None
        _check_half_trained(self.scaler, model.named_parameters(), "")
        floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
        if self.amp_dtype is not None and floats == {torch.float64}:  # (a probe's run logged
            log.warning(  # numbers equal to precision=32's, and said nothing)
                "trainer.precision=%s with a float64 model: autocast leaves float64 operations "
                "as they are, so the run is in float64 (precision has no effect); keep the "
                "model in float32 for mixed precision", precision,
            )  # fmt: skip
        self.grad_clip = grad_clip
        self.accumulate = accumulate_grad_batches
        self.max_epochs, self.max_steps = max_epochs, max_steps
        self.log_every = Every(log_every_n_steps)  # the train scalars' cadence
        self.logger = logger
        self.progress_options = (
            progress if isinstance(progress, ProgressOptions) else ProgressOptions(progress)
        )
        self.detect_anomaly = detect_anomaly
        #: a stop request (the signal's number), set by a signal handler on any rank
        self.stop_signal: int | None = None
        #: the signal the run stopped for, agreed by every rank at a rest point; None: not
        #: stopped
        self.stopped_by: int | None = None
        self._validated_at = -1  # the step of the last validation (checkpointed)
        self._val_logged: tuple[int, dict[str, Any]] | None = None  # its val/* as written
        #: the length (``T_max``, ``total_steps``) ``trainer.run`` gave the scheduler, by key
        #: (checkpointed: a resumed run builds its scheduler with it again); none by hand
        self.schedule_length: dict[str, int] = {}
        #: data-parallel: the stop flag agreed at the last rest point, on its way to the host
        #: (the copy, and the CUDA event after it)
        self._stop_in_flight: tuple[Tensor, Any] | None = None
        #: data-parallel: this rank's stop flag on the device, and the signal written into it
        self._stop_flag: tuple[Tensor, int | None] | None = None
        self.callbacks: list[Callback] = []
        self._hooks: dict[str, list[Callable[..., Any]]] = {name: [] for name in HOOKS}
        #: the on_before_optimizer_step hook running (its index), and whether each may write
        #: to the gradients (a callback of one's own; the trainer's instruments only read them)
        self._hook_at = 0
        self._writes_grads: list[bool] = []
        self.add_callbacks(*callbacks)
        #: every parameter (``named_parameters()``), and which required grad when last seen
        self._all_params = list(model.named_parameters())
        #: a parameter or module registered anywhere since the model's parameters were last
        #: read (torch's global registration hooks, while fitting): they are read again
        self._registered = False
        #: ids of the tensors set on the model since the Trainer was built (refused where
        #: they get a gradient the optimizer does not take: :meth:`_refuse_unheld`)
        self._new_ids: set[int] = set()
        self._aside: set[int] = set()  # (of those, the ones the regularizers leave out)
        self._trainable = [p.requires_grad for _, p in self._all_params]
        named = [(n, p) for n, p in self._all_params if p.requires_grad]
        #: trainable parameters and their names (``named_parameters()``), in the same order;
        #: followed as the model's ``requires_grad`` flags change (:meth:`_follow_trainable`)
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        for r in regularizers:  # (given unbound to a Trainer built by hand, one selected
            if isinstance(r, Regularizer):  # nothing and the run trained without it, its
                _bound(r, model)  # reg/<name> 0, unsaid; and one of one's own went unchecked:
                if type(r) is not Regularizer:  # a probe's)
                    r.check_gradient()  # (its backward, once, before training)
        #: the backward roots and each loss element's coefficient in them (trainer/objective.py)
        self.objective = Objective(
            self.criterion, weighting, regularizers, self.params, world=world,
            scaler=self.scaler, global_batch_size=lambda: self.train_loader.current_global_size,
        )  # fmt: skip
        self.objective.model = model
        self._prepare_weighting()  # (as trainer.run prepares it: one built by hand did not)
        # (DDP inside torch.compile's wrapper too: seen as no DDP, a compiled run with
        # unused parameters and a regularizer stopped at its first step, a probe's)
        ddp = getattr(self.forward_model, "_orig_mod", self.forward_model)
        self.objective.reg_after_reduce = bool(
            isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
            and ddp.find_unused_parameters
        )
        self._output_checked = False  # (the model's output checked against the loss: once)
        #: per-token losses (the loss defines unit weights): train/loss is Σ u ℓ / Σ u
        self.token_losses = self.criterion.has_units
        #: optimizer steps taken; inside a step's hooks, the number of the step being taken
        self.global_step = 0
        #: epochs completed (between epochs: the 0-based index of the next one)
        self.epoch = 0
        #: micro-batches of the current epoch done: the position in the epoch's data order
        self.batch_in_epoch = 0
        #: the epoch whose on_train_epoch_start this trainer fired last (None: none yet)
        self._epoch_begun: int | None = None
        #: whether the optimizer step being taken logs (set before on_before_optimizer_step)
        self.logging_step = False
        #: set by a callback in on_before_optimizer_step to skip this step's update
        self.skip_step = False
        #: set by a callback in on_before_optimizer_step: a 0-d bool tensor on the device; the
        #: update is skipped where it is True, without reading it (trainer/update.py)
        self.skip_step_where: Tensor | None = None
        #: set by a callback in on_before_optimizer_step to have the loop measure and stage
        #: grad_norm/total_clipped (after clipping) for this step
        self.measure_clipped_norm = False
        #: set (in on_fit_start) by a callback that may skip steps (the guard with
        #: policy=skip): the model's buffers are copied before each step's first forward and
        #: put back where the step is skipped (a BatchNorm's running statistics, which the
        #: forward updates before any check: a NaN batch's made every later validation NaN)
        self.restore_buffers_on_skip = False
        #: each module's train/eval mode to train with (:meth:`_start_training_modes`), as
        #: the start of fit or the last validation found them
        self._train_modes: list[tuple[nn.Module, bool]] | None = None
        self._modes_loaded = False  # _train_modes were set from a checkpoint, fit not started
        #: a checkpoint's modes of its run's last start of fit or validation (replayed from)
        self._modes_base: list[tuple[nn.Module, bool]] | None = None
        #: (module, name) of each buffer, read anew at each step (a forward may replace a
        #: buffer by a new tensor: an EMA codebook's ``self.ema = self.ema * d + ...``)
        self._buffers: list[tuple[nn.Module, str]] = []
        self._buffers_due = False  # (the model's modules replaced: the list made again)
        self._buffers_before: list[Tensor | None] | None = None
        self._window_open = False
        self._flushed_at: int | None = None  # the step on_flush last ran at
        #: the step's gradient norms as a callback computed them (share_grad_norms), and the
        #: place of the hook that shared them
        self._grad_norms: tuple[list[Tensor], list[int], Tensor | list[Tensor], int] | None = None
        self._said_changed = False  # (a callback changed measured gradients: warned once)
        #: the norms the trainer's own instrument shared this step (what it logs), as
        #: _grad_norms, and the gradients' memory then, where a callback of one's own runs later
        self._measured: tuple[list[Tensor], list[int], Tensor | list[Tensor], int] | None = None
        self._shared_memory: list[int] | None = None
        #: called once after a micro-batch's ``on_after_backward`` callbacks, where set (by
        #: then every callback has had the gradients), and once right before its backward
        #: (after ``on_train_batch_start`` and ``on_before_backward``): the per-sample
        #: instrument's checks that no callback changed the gradients between the backward
        #: passes, as its statistics need the backward's own
        self.after_backward_callbacks: Callable[[], None] | None = None
        self.before_backward_callbacks: Callable[[], None] | None = None
        #: called once each right before a micro-batch's forward (after every callback's
        #: ``on_train_batch_start``), where appended for it: the curvature instrument's
        #: copies of the state that forward begins with (a schedule's change of the model in
        #: a callback of one's own among it)
        self.before_forward_callbacks: list[Callable[[], None]] = []
        self._dtypes_of_params()
        self._unowned_named: list[str] = []  # (the names last warned of)
        self._beyond_named: list[str] = []  # (the optimizer's other tensors last warned of)
        self._were_model: set[int] = set()  # (the ids of tensors that were the model's)
        self._not_in_optimizer()
        #: what callbacks stage during a step (stage_scalars, stage_histogram)
        self.staging = Staging()
        #: the current accumulation window (its samples; per-token losses: its Σu)
        self.window = Window(samples=1)
        self.metrics: dict[str, float] = {}
        for role, loader in (("train_loader", train_loader), ("val_loader", val_loader)):
            missing = [a for a in LOADER_API if not hasattr(loader, a)]
            if missing:  # (a plain DataLoader as val_loader failed after an epoch's training,
                # "not enough values to unpack": a probe's finding)
                raise ContractError(
                    f"Trainer: {role} is a {type(loader).__name__} without "
                    f"{', '.join(missing)}; it takes trainer.data's loaders (InMemoryLoader, "
                    "DeviceLoader: batches of (x, y, index), an epoch's order from "
                    "set_epoch(epoch, start_batch)), which a DataModule builds: data.setup("
                    "device, seed), then data.train_loader and data.val_loader (a Dataset of "
                    "your own: return it from your DataModule's load())"
                )
        _check_world(world, model, forward_model,
                     {"train_loader": train_loader, "val_loader": val_loader})  # fmt: skip
        if len(train_loader) == 0:  # (its epochs "finished" without a step, train/loss NaN)
            raise ValueError(
                f"Trainer: train_loader has no batch ({train_loader.num_samples} samples, "
                f"batches of {train_loader.global_batch_size}, drop_last="
                f"{train_loader.drop_last}): nothing would train"
            )
        check_frequency_scaling(model, world.size, accumulate_grad_batches)
        self.total_steps = planned_steps(len(train_loader), self.accumulate, max_epochs, max_steps)
        #: (global step, batch in epoch) of the last rest point; the step the last update was
        #: of; the first step a failed fit was taken back from (its events are replaced)
        self._rest_at, self._updated_at = (0, 0), -1
        self._between = False  # at a rest point (after a step, before the next one's window)
        self._purge_from: int | None = None
        self._retried: tuple[int, int] | None = None  # (the step taken back, its forwards)
        #: a step finished after its optimizer's post-hook failed: its rest point is due
        self._rest_due = False
        self._plateau_at = -1  # the step ReduceLROnPlateau was last stepped at
        #: train/loss since the last log and since the epoch's start, on the device
        self.tally = LossTally(device, self.token_losses)
        self._time_at_log = 0.0
        self._null = contextlib.nullcontext()
        self.progress = Progress(False, self.total_steps)  # replaced by fit()

    @property
    def weighting(self) -> Weighting | None:
        """The weighting (vector mode), or None (scalar mode): the objective's."""
        return self.objective.weighting

    @property
    def input_penalty(self) -> InputGradPenalty | None:
        return self.objective.input_penalty

    # ------------------------------------------------------------------ events and cadence
    def add_callbacks(self, *callbacks: Callback) -> None:
        """Append callbacks (after those given to the constructor; before ``fit``)."""
        for cb in callbacks:
            if isinstance(cb, type):  # (the class: "type is not a Callback", a probe's)
                raise ContractError(
                    f"callbacks: {cb.__name__} is a class; give an instance of it, "
                    f"{cb.__name__}(...)"
                )
            if not isinstance(cb, Callback):
                raise ContractError(
                    f"callbacks: a {type(cb).__name__} is not a trainer.callbacks.Callback "
                    "(subclass it and override the hooks it needs)"
                )
            if any(cb is c for c in self.callbacks):  # (its hooks ran twice a step)
                raise ValueError(
                    f"callbacks: the same {type(cb).__name__} instance is given twice; give "
                    "it once (or two instances)"
                )
            others = check_callback(cb)  # (only the hooks it overrides are called)
            hooks = [n for n in HOOKS if getattr(type(cb), n) is not getattr(Callback, n)]
            if others:
                log.warning(
                    "callbacks: %s.%s %s no hook, so the loop never calls %s (the hooks: %s)",
                    type(cb).__name__, ", ".join(others), "is" if len(others) == 1 else "are",
                    "it" if len(others) == 1 else "them", ", ".join(HOOKS),
                )  # fmt: skip
            elif (
                not hooks
                and type(cb).state_dict is Callback.state_dict
                and type(cb).check_before_fit is Callback.check_before_fit
            ):  # (one that checks before the run alone is called: told otherwise, a probe's)
                log.warning("callbacks: %s overrides none of the hooks (trainer.callbacks."
                            "Callback), so the loop never calls it", type(cb).__name__)  # fmt: skip
            self.callbacks.append(cb)
            for name in HOOKS:
                if getattr(type(cb), name) is not getattr(Callback, name):
                    self._hooks[name].append(getattr(cb, name))
            if type(cb).on_before_optimizer_step is not Callback.on_before_optimizer_step:
                # (the trainer's own instruments read the gradients, never write them)
                own = type(cb).__module__.startswith("trainer.instrument")
                self._writes_grads.append(not own)

    def _fire(self, name: str, *args: Any, copies: bool = False) -> None:
        """Every callback's hook ``name``; ``copies``: each hook gets its own copy of the
        metrics among ``args`` (:func:`_own_copies`)."""
        staging = self.staging
        outer = staging.stager  # (a hook running this one: validation from a callback)
        for hook in self._hooks[name]:
            staging.stager = hook  # (whose tags it stages: Staging._check_owner)
            try:
                hook(self, *(_own_copies(args) if copies else args))
            except Exception as e:  # (the error recorded named neither: a probe)
                _note_hook(e, hook, name)
                raise
            finally:
                staging.stager = outer

    def _fire_before_step(self) -> None:
        """``on_before_optimizer_step``, each hook's place kept (:meth:`shared_grad_norms`)."""
        hooks = self._hooks["on_before_optimizer_step"]
        staging = self.staging
        outer = staging.stager
        for i, hook in enumerate(hooks):
            self._hook_at = i
            staging.stager = hook
            try:
                hook(self, self.optimizer)
            except Exception as e:
                _note_hook(e, hook, "on_before_optimizer_step")
                raise
            finally:
                staging.stager = outer
        self._hook_at = len(hooks)

    def _fire_each(
        self, name: str, *args: Any, copies: bool = False
    ) -> list[tuple[Any, BaseException]]:
        """Every callback's hook ``name``, each also when an earlier one raised (the end of a
        run: the final checkpoint is one of them, restoring the signal handlers another);
        returns (hook, error) for those that raised, in order."""
        errors = []
        outer = self.staging.stager
        for hook in self._hooks[name]:
            self.staging.stager = hook
            try:
                hook(self, *(_own_copies(args) if copies else args))
            except BaseException as e:  # noqa: BLE001 (raised, or logged, by the caller; a
                if isinstance(e, Exception):  # Ctrl-C in a slow report too: the final
                    _note_hook(e, hook, name)  # checkpoint)
                errors.append((hook, e))
            finally:
                self.staging.stager = outer
        return errors

    def _fire_between(self, name: str, *args: Any, copies: bool = False) -> None:
        """A hook after an optimizer step and before the next one's window (validation, a rest
        point, the end): what its callbacks stage is written at the last step taken
        (``global_step``), with the next read, not at the next step's number. (What
        ``on_fit_start`` and ``on_train_epoch_start`` stage goes with the step that follows:
        a run resumed at an epoch's end fires them again, and its event files keep what was
        written up to the checkpoint's step.)"""
        self._fire(name, *args, copies=copies)
        self.staging.defer_staged(self.global_step)

    def should_log(self, step: int) -> bool:
        """Whether optimizer step ``step`` logs the train scalars: every
        ``logging.every_n_steps``-th, and the run's last (the host reads what the step's
        instruments measured there, parameter histograms included, and the run ends on
        logged values)."""
        return self.log_every.due(step) or step == self.total_steps

    def share_grad_norms(self, grads: list[Tensor], norms: Tensor | list[Tensor]) -> None:
        """For a callback in ``on_before_optimizer_step`` that computed the gradients' 2-norms
        (``grads``: the parameters' gradients, those that exist, in ``params`` order;
        ``norms``: 1-D, theirs first, possibly followed by others; or the same as a list of
        0-d tensors, as ``torch._foreach_norm`` returns them, stacked only if and when asked
        for): later callbacks and the loop's total (``grad_norm/total``, clipping) take them
        from :meth:`shared_grad_norms` instead of computing them again, so the run clips by
        them: those of :func:`trainer.instrument.norms.norms_of` are the loop's own, bit for
        bit (torch's ``_foreach_norm`` but float16/bfloat16 in float32 and, on a CPU, tensors
        of 2¹² elements or more by rows), and leave the run as it is without the callback
        (``torch._foreach_norm``'s own differ there in the last bits: a probe's clipped run
        moved by 1.5e-8), as long as no
        gradient was replaced or changed in place since and no callback of one's own (not the
        trainer's instruments) ran its ``on_before_optimizer_step`` after the one that shared
        them (a write through ``.data`` moves no version counter)."""
        count = norms.numel() if isinstance(norms, Tensor) else len(norms)  # (metadata)
        if count < len(grads):
            raise ValueError(
                f"share_grad_norms: {len(grads)} gradients and {count} norms; the norms must "
                "hold one per gradient, in the same order (then possibly others)"
            )
        at = self._hook_at
        self._grad_norms = (grads, [g._version for g in grads], norms, at)
        own = at < len(self._writes_grads) and not self._writes_grads[at]
        if own and self._measured is None:  # (the instrument's, which it logs: what a later
            self._measured = self._grad_norms  # change is told against, _changed_after_measuring)
            # p.grad.data = ... keeps the tensor and its counter: told by its memory, where a
            # callback of one's own is still to run
            later = any(self._writes_grads[at + 1 :])
            self._shared_memory = [memory_of(g) for g in grads] if later else None

    def shared_grad_norms(self, grads: list[Tensor]) -> Tensor | None:
        """The shared norms of exactly these gradients, if a callback shared them this step and
        none of them was replaced or changed in place since (their version counters)."""
        if self._grad_norms is None:
            return None
        kept, versions, norms, at = self._grad_norms
        if len(kept) != len(grads) or any(
            a is not b or a._version != v for a, b, v in zip(kept, grads, versions, strict=True)
        ):
            return None
        # a callback of one's own that ran since may have written through ``.data``, which
        # moves no version counter: its norms are taken again (the clipping took the stale
        # ones, and clipped 100x gradients to 100x the limit: a review's)
        if any(self._writes_grads[at + 1 : self._hook_at]):
            return None
        if not isinstance(norms, Tensor):  # a list of 0-d norms: stacked once, when first asked
            norms = torch.stack(norms)
            self._grad_norms = (kept, versions, norms, at)
        return norms[: len(grads)]

    def _compare_norms(self, fresh: Tensor, grads: list[Tensor]) -> None:
        """Stage the gradients' norms taken again beside the ones an instrument shared: where
        they differ, a callback wrote to them through ``.data`` (or NumPy) after they were
        measured, which :meth:`_changed_after_measuring` says of other writes."""
        kept, _, norms, _ = self._measured  # type: ignore[misc]
        if len(kept) != len(grads):  # (a gradient set to None: said already)
            return
        shared = norms if isinstance(norms, Tensor) else torch.stack(norms)
        with_grad = [n for n, p in zip(self.param_names, self.params, strict=True)
                     if p.grad is not None]  # fmt: skip
        both = torch.cat([fresh.float(), shared[: len(grads)].float()])
        self.stage_on_host(both, partial(self._norms_differ, self.global_step, with_grad))

    def _norms_differ(self, step: int, names: list[str], values: list[float]) -> dict[str, float]:
        n = len(values) // 2
        changed = [name for name, a, b in zip(names, values[:n], values[n:], strict=True)
                   if a != b and not (math.isnan(a) and math.isnan(b))]  # fmt: skip
        if changed and not self._said_changed:
            self._warn_changed(step, changed, 0)
        return {}

    def _changed_after_measuring(self, grads: list[Tensor]) -> None:
        """Warn (once) where a callback replaced or changed in place gradients whose norms an
        instrument shared this step: what the instruments measured and what the loop's total
        and clipping see are then two different gradients (a probe's callback halving a
        layer's gradient logged ``grad_norm/total`` 0.536 beside per-parameter norms whose
        squares summed to 0.728², unsaid)."""
        kept, versions, _, _ = self._measured  # type: ignore[misc]
        memory = self._shared_memory or [0] * len(kept)
        same = {(id(g), v, ptr) for g, v, ptr in zip(kept, versions, memory, strict=True)}
        moved = memory_of if self._shared_memory else lambda g: 0
        changed = [n for n, p in zip(self.param_names, self.params, strict=True)
                   if p.grad is not None
                   and (id(p.grad), p.grad._version, moved(p.grad)) not in same]  # fmt: skip
        dropped = max(0, len(kept) - len(grads))  # (set to None: fewer than were measured)
        if changed or dropped:
            self._warn_changed(self.global_step, changed, dropped)

    def _warn_changed(self, step: int, changed: list[str], dropped: int) -> None:
        self._said_changed = True
        what = few(changed)
        if dropped:
            what = f"{what}{'; ' if what else ''}{dropped} set to None"
        log.warning(
            "step %d: a callback wrote to gradients in on_before_optimizer_step after the "
            "instruments measured them (%s): grad_norm/<param>, grad_agreement/*, the gradient "
            "histograms, the per-sample norms and the non-finite guard describe them as they "
            "were before; "
            "grad_norm/total, grad_norm/total_clipped, grad_norm/data and /reg, the clipping "
            "and the update as they are after it (where the write changed their norms, the "
            "per-parameter norms' squares do not sum to grad_norm/total² on such steps). "
            "Change gradients in on_after_backward to have every instrument see the change "
            "(warned once)",
            step, what,
        )  # fmt: skip

    def stage_scalars(self, values: Scalars) -> None:
        """Queue scalars for the current step; they are read back to the host together with
        the step's own scalars at the end of the next logging step (this one, if it logs), in
        one transfer, and written at this step (no sync here). A staged tensor must stay as it
        is until then (an in-place change after staging is an error, naming it; the other
        values are written). Staged in ``on_validation_end``, ``on_rest_point`` or
        ``on_fit_end``, they are written at the last step taken; in ``on_fit_start`` or
        ``on_train_epoch_start``, with the step that follows. A tuple of tags may map to a
        1-D tensor of their values (see :func:`trainer.logger.to_floats`). Refused, naming the
        tag: a tag staged twice in a step (two callbacks: one value would be lost), the
        trainer's own (``train/loss``, ``lr``, ``grad_norm/total``, ``weights/*``,
        ``val/*``, ``reg/*``: it would replace the trainer's value), a value that is neither
        a number nor a tensor. A view (``p.grad[0]``) is copied when staged (one small
        kernel): it shares its base's version counter, so a change in place could not be
        told apart, and the value written was the one at the read (clipped, updated).
        Data-parallel: rank 0's values are written (stage ones equal on every rank, or
        all-reduce a batch statistic before staging it)."""
        self.staging.stage(values)

    def stage_histogram(self, tag: str, values: Tensor, count_nonfinite: bool = True) -> None:
        """Queue a short 1-D tensor (a batch's per-sample values) to log as the histogram
        ``tag`` with the scalars ``<tag>_mean`` and ``<tag>_max`` (over its finite values) and,
        where some are NaN or ±Inf, ``<tag>_nonfinite``, their count (``count_nonfinite=False``:
        not written, for values where NaN stands for a sample without one). It is read back
        with the step's scalars, in the same transfer, and binned on the host: no kernel and no
        sync here (a view is copied: one small kernel). For parameter-sized tensors use
        on-device binning instead (``trainer.instrument.histograms``)."""
        self.staging.stage_histogram(tag, values, count_nonfinite)

    def stage_on_host(self, values: Tensor, fn: HostFn) -> None:
        """Queue a 1-D tensor for the current step whose scalars are computed on the host:
        it is read back with the step's scalars (in the same transfer, no sync here), and
        ``fn(values as a list of floats)`` returns the scalars to write at this step. Each
        staged step's ``fn`` runs once, in step order, on every rank, so it may keep state (a
        running average: the per-sample noise scale's). A few device ops then do what tens
        of small kernels would."""
        self.staging.stage_on_host(values, fn)

    def write_deferred(self, check: bool = True, force: bool = False) -> None:
        """Write the scalars and histograms measured on steps that did not log, each at its
        step (one host read): the next logging step does it anyway; a checkpoint and the end
        of the run do it first. Then ``on_flush``: callbacks keeping unread values of their
        own (the guard's flags) write them. ``check``: a weighting of one's own has its raw
        weights' flag read too (a checkpoint keeps no unread flag: a run resumed from it went
        on past a negative weight that the uninterrupted run stopped at; data-parallel: a
        collective, so not after a failure, which one rank may have alone). ``force``:
        ``on_flush`` also where it ran at this step (a failure inside the next step's window,
        whose micro-batches' values a callback kept since: lost, a review's)."""
        try:
            self.staging.flush(self.logger)  # host sync: logging steps, checkpoints, the end
            if force or self._flushed_at != self.global_step:  # (once a step: the end's and
                self._flushed_at = self.global_step  # the final checkpoint's are at one step,
                # and a callback staging a tag there was refused); every callback's, also
                # past one that raises (the failure's flush came at the same step and skipped
                # the rest, whose unread values were lost: a probe's); the first error raised
                errors = self._fire_each("on_flush")
                for hook, error in errors[1:]:
                    log.error("callback %s: on_flush raised too: %r",
                              type(_owner(hook)).__name__, error)  # fmt: skip
                if errors:
                    raise errors[0][1]
        finally:  # (data-parallel: also where writing failed on this rank alone, as a full
            # disk on rank 0 at a checkpoint, which then goes on to its gather: the others do)
            if check and self.objective.weighting is not None:
                self.objective.weighting.check_window(self.global_step)  # host sync (above)

    def log_scalars(self, values: Scalars, step: int | None = None) -> dict[str, float]:
        """Write scalars (and staged histograms) at ``step`` (default: the current
        ``global_step``); returns the scalars as floats. One batched host read: call it on
        logging steps only."""
        step = self.global_step if step is None else step
        return self.staging.write(values, step, self.logger)  # host sync: logging steps only

    def _double_backward_kernels(self) -> contextlib.AbstractContextManager[Any]:
        """With the input-gradient penalty, whose backward differentiates the forward's
        backward: kernels that have a double backward (:func:`double_backward_kernels`:
        attention through the math kernel, the step failed in torch's backward with the fused
        ones; cuDNN off for an RNN on CUDA)."""
        if self.input_penalty is None:
            return self._null
        return double_backward_kernels(self.model, self.device)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return self._null
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _done(self) -> bool:
        return 0 < self.max_steps <= self.global_step

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, float]:
        """Train until ``max_epochs`` or ``max_steps``; return the final metrics."""
        # a parameter or module set on a module (a callback's ``model.head = nn.Linear(...)``,
        # ``setattr`` of a new ``nn.Parameter``): the model's parameters are read again at the
        # next look (:meth:`_follow_trainable`), not every micro-batch
        from torch.nn.modules import module as modules

        def registered(*_: Any) -> None:
            self._registered = True

        def buffer_registered(module: nn.Module, name: str, _: Any) -> None:
            if name not in module._buffers:  # (a new slot; a forward reassigning one of its
                self._registered = True  # buffers, self.buf = t, made every micro-batch read
                # the model's parameters again; the slot is read afresh at a put-back anyway)

        watch = (modules.register_module_parameter_registration_hook(registered),
                 modules.register_module_module_registration_hook(registered),
                 modules.register_module_buffer_registration_hook(buffer_registered))  # fmt: skip
        # (and read again as the fit starts: a module replaced between two fits, or one a
        # failed fit refused, was followed by no one, a review's)
        self._registered = True
        try:
            return self._fit()
        finally:  # DataLoader workers, which ignore stop signals (trainer.data.base)
            for handle in watch:
                handle.remove()
            for loader in (self.train_loader, self.val_loader):
                close = getattr(loader, "close", None)
                if close is not None:
                    close()
            # the events, written when the run ends or fails (a Trainer of one's own, which
            # trainer.run does not close, held them in memory: a script ending without
            # logger.close() lost every scalar, a probe's)
            try:
                if self.logger is not None:
                    self.logger.flush()
            except Exception as e:  # noqa: BLE001 (said; the run's own outcome stands)
                log.error("fit: the events could not be written to %s: %r",
                          getattr(self.logger, "log_dir", "?"), e)  # fmt: skip

    def check_states(self) -> None:
        """Refuse, before the first step, what each callback's ``check_before_fit`` refuses
        and a state a checkpoint cannot hold (an object of one's own in a callback's, a
        loss's, a weighting's or a regularizer's ``state_dict()``; the optimizer's groups, the
        scheduler's), naming whose it is, instead of at the first checkpoint. ``fit`` checks
        as it starts; ``trainer.run`` before a resume moves any of the run's files, or an
        earlier run in its folder is set aside (a refused resume set the later checkpoints
        aside and dropped their events, a probe's)."""
        for cb in self.callbacks:  # (an instrument's settings the model cannot take too:
            # an instrument.per_sample.units pattern naming no module was refused in its
            # on_fit_start, after a resume had moved the run's files, a review's)
            check = getattr(cb, "check_before_fit", None)
            if check is None:
                continue
            if not callable(check):  # (an attribute of one's own of that name: a flag)
                raise ContractError(
                    f"callback {type(cb).__name__}: check_before_fit is a "
                    f"{type(check).__name__}, and the trainer calls check_before_fit(trainer) "
                    "before a fit (trainer.callbacks.Callback): rename that attribute"
                )
            try:
                check(self)
            except Exception as e:
                e.add_note(f"(callback {type(cb).__name__}'s check_before_fit(trainer))")
                raise
        for cb in self.callbacks:  # (the trainer's own are checkpointable by construction)
            if type(cb).__module__.startswith("trainer."):
                continue
            try:
                state = cb.state_dict()
            except Exception:  # noqa: BLE001 (a state made on a later step: checked at
                continue  # each checkpoint)
            checkpointable(state, type(cb).__name__)
        checkpointable(
            self.optimizer.state_dict(), type(self.optimizer).__name__, "optimizer"
        )  # (its groups now; its state: at each checkpoint)
        if self.scheduler is not None:
            checkpointable(self.scheduler.state_dict(), type(self.scheduler).__name__,
                           "scheduler")  # fmt: skip
        for key, part in self._stateful_parts():  # (the same for a loss, weighting or
            _check_stateful(key, part)  # regularizer of one's own)
            try:
                state = part.state_dict()
            except Exception:  # noqa: BLE001 (as above)
                continue
            checkpointable(state, type(part).__name__, key)

    def _fit(self) -> dict[str, float]:
        check_monitor(self)  # (before anything starts)
        # (again: a weighting given to another Trainer since, with another loss or world, was
        # left prepared for that one's, and this one trained with its settings, unsaid, a
        # review's; a no-op otherwise)
        self._prepare_weighting()
        check_plateau(self.scheduler, self.monitor)
        # (max_steps or max_epochs changed since: the run's last step, which logs everything,
        # and the bar's length are the new ones'; they were kept, a probe's)
        self.total_steps = planned_steps(
            len(self.train_loader), self.accumulate, self.max_epochs, self.max_steps
        )
        # (a state loaded since: its step's update is not this one's, a review's)
        self._rest_at, self._updated_at = (self.global_step, self.batch_in_epoch), -1
        self._between = False  # (what on_fit_start stages goes with the next step)
        if self._retried is not None and self._retried[1]:
            own = [type(cb).__name__ for cb in self.callbacks
                   if not type(cb).__module__.startswith("trainer.")]  # fmt: skip
            # (and the objective's parts of one's own keeping state: a weighting counting its
            # calls trained the window again one call further on, unsaid, a probe's)
            kept = [f"{key} {type(part).__name__}" for key, part in self._stateful_parts()
                    if type(part).state_dict is not Stateful.state_dict
                    and not type(part).__module__.startswith("trainer.")]  # fmt: skip
            log.warning(
                "fit: the last fit failed inside step %d's window; this one trains it again from "
                "its first micro-batch, as an uninterrupted run does, but for what the failed "
                "attempt's %d forward pass(es) changed: buffers (BatchNorm's statistics) and the "
                "random generators (dropout) are as they left them%s%s", *self._retried,
                f", and so are callbacks of one's own, whose hooks ran for them "
                f"({', '.join(own)})" if own else "",
                f", and the state of {', '.join(kept)} (the objective's parts of one's own "
                "that keep state: they ran for them too)" if kept else "",
            )  # fmt: skip
        self._retried = None
        if self._purge_from is not None and self.logger is not None:  # the steps a failed
            # fit is taken back from are trained again: TensorBoard drops what it wrote of them
            self.logger.restart_at(self._purge_from)
        self._purge_from = None
        opts = self.progress_options
        self.progress = Progress(  # (the first rank's alone: every rank drew its bar and
            # wrote its lines, each twice in a log, a probe's)
            opts.enabled and self.world.rank == 0, self.total_steps, bar=opts.bar,
            every_n_steps=opts.every_n_steps, label=opts.label, initial=self.global_step,
        )  # fmt: skip
        redirect: contextlib.AbstractContextManager[Any] = self._null
        if self.progress.active:  # log lines go above the bar instead of through it
            from tqdm.contrib.logging import logging_redirect_tqdm

            redirect = logging_redirect_tqdm()
        anomaly: contextlib.AbstractContextManager[Any] = self._null
        if self.detect_anomaly:  # names the forward op behind the first NaN in backward
            anomaly = torch.autograd.detect_anomaly(check_nan=True)
        ended: set[int] = set()  # callbacks whose on_fit_end ran through: no on_exception
        try:
            # (a callback's on_fit_start raising: every callback's on_exception, which
            # restores what the others' took, e.g. the signal handlers)
            self._fire("on_fit_start")  # (what it stages: with the first step, at its number)
            self._start_training_modes()
            if self.world.distributed:  # (the modes the run trains with: on_fit_start's, a
                warn_batch_norms(self.model)  # resume's)
            self._clear_stale_gradients()
            self._buffers = self._buffer_slots()
            self.check_states()  # (again: on_fit_start may have made a state)
            self._time_at_log = time.perf_counter()
            try:
                with redirect, anomaly:
                    if self._rest_due:  # the rest point of a step the last fit finished after
                        # its optimizer's post-hook failed (its periodic checkpoint was lost, a
                        # review's); after an epoch's or the run's last step, as run_epoch
                        # makes it: validation, the epoch counted, then the rest point (a
                        # run's last step had neither, its epoch uncounted: reviews')
                        self._rest_due = False
                        if self.batch_in_epoch == len(self.train_loader) or self._done():
                            self._after_train_epoch()
                        else:
                            self._between = True
                            self._rest_point()
                    while not self.finished() and self.stopped_by is None:
                        self.run_epoch()
                self._between = True  # (the end: at the last step taken)
                pending = self.finished() and self.tally.has_log()  # steps since the last log
                if self.world.distributed and self.finished():  # (a run resumed finished on
                    # another number of processes: the first rank alone holds what is pending)
                    flag = torch.tensor(float(pending), device=self.device)
                    pending = bool(all_reduce_max(flag))  # host sync: the end of a run
                if pending:
                    self.log_scalars({"train/loss": self._window_loss()[0]})  # host sync: once
                if (
                    self.finished()
                    and self.stopped_by is None
                    and self.global_step != self._validated_at
                ):  # resumed from a checkpoint of its last step that was not validated (a
                    # stop there): its last step's validation, as an uninterrupted run has
                    self.validate()
                self.write_deferred()
            finally:
                self.progress.close()
            self.metrics.update(step=self.global_step, epoch=self.epoch)
            # every on_fit_end, also past one that raises (the final checkpoint is one of
            # them); the run then fails with the first error, and only those that raised get
            # on_exception (instead of on_fit_end, never as well)
            errors = self._fire_each("on_fit_end", self.metrics, copies=True)
            # (those that ran through get no on_exception, whatever fails after)
            ended = {id(cb) for cb in self.callbacks} - {id(_owner(h)) for h, _ in errors}
            if self.world.distributed and self.stopped_by is None:  # (once, at the end: a
                errors = self._errors_of_every_rank(errors)  # collective of every rank)
            self.staging.defer_staged(self.global_step)
            if errors:
                for hook, error in errors[1:]:
                    name = type(_owner(hook)).__name__
                    log.error("callback %s: on_fit_end raised too: %r", name, error)
                raise errors[0][1]
            problem = self.staging.flush(self.logger, strict=False)  # host sync: the end
            if problem:  # (what on_fit_end staged: the run is over, so said, not raised)
                log.error("%s", problem)
        except BaseException as e:
            failing = self.step_in_progress()
            with contextlib.suppress(Exception):  # what was measured before the failure,
                self.staging.defer_staged(failing)  # the failing step's own included (at its
                # (number: in a window, the step it makes; its on_flush also where the last
                # step's rest point ran one)
                self.write_deferred(check=False, force=not self._between)
            for hook in self._hooks["on_exception"]:  # every one, also past one that raises;
                if id(_owner(hook)) in ended:  # the run's own error is the one raised
                    continue
                try:
                    hook(self, e)
                except Exception as inner:  # noqa: BLE001 (logged: the first error is raised)
                    log.error("callback %s: on_exception raised %s: %s (the run's error, "
                              "raised, is %s)", type(_owner(hook)).__name__,
                              type(inner).__name__, inner, type(e).__name__)  # fmt: skip
            with contextlib.suppress(Exception):  # what on_exception staged
                self.staging.defer_staged(failing)
                self.staging.flush(self.logger, strict=False)
            self._back_to_rest()  # (after the writes: at the failing step's number)
            raise
        return self.metrics

    def _start_training_modes(self) -> None:
        """Train with each module's train/eval mode as the model has it (a BatchNorm put in
        eval mode before fit keeps its running statistics: every module was put in train
        mode at each epoch's start), after the model's ``train()`` (an override of one's own
        runs, side effects and all; a model with some modules in eval mode gets its modes
        back after it). A validation puts back the modes it found, after
        ``on_validation_end`` (a callback's change mid-run is kept, and checkpointed);
        ``fit()`` leaves the model in them. A resumed run replays the checkpoint's modes
        (:meth:`_replay_modes`), over what ``on_fit_start`` changed."""
        if self._modes_loaded and self._train_modes is not None:
            self._modes_loaded = False
            self._replay_modes()
            return
        evals = [n or "(the model)" for n, m in self.model.named_modules() if not m.training]
        mixed = bool(evals) and self.model.training
        if mixed:
            log.warning(
                "fit: %d module(s) are in eval mode and are trained so, as the model has them "
                "(dropout off, BatchNorm's running statistics kept): %s%s",
                len(evals), ", ".join(evals[:5]), " …" if len(evals) > 5 else "",
            )  # fmt: skip
        self._modes_base = None
        modes = _modes(self.model)
        self.model.train()  # (an override of one's own runs, side effects and all, as at
        if mixed:  # each validation's end and on a resume) then the modes as they were
            _put_modes(modes)
        self._train_modes = _modes(self.model)

    def _replay_modes(self) -> None:
        """A resumed run's modes, reached as the run reached them (an override of one's own
        of ``train()`` may set more than the flag): the model's ``train()`` with the modes of
        the run's last start or validation (``_modes_base``), then ``train(flag)`` of each
        module a callback switched since, parents first, then the checkpoint's flags."""
        now = self._train_modes
        assert now is not None
        # (a checkpoint without them: its flags, as after a validation, where it was written)
        base = self._modes_base if self._modes_base is not None else now
        flags = dict((id(m), t) for m, t in base)
        self.model.train(flags.get(id(self.model), True))
        _put_modes(base)
        for m, flag in now:  # (parents before their children: modules() order)
            if m.training != flag:
                m.train(flag)
        _put_modes(now)
        self._modes_base = base  # (kept in this run's checkpoints until it validates: a
        # resume of one of them replayed from its current modes, a review)

    def step_in_progress(self) -> int:
        """The number of the step the run is in: the last one taken at a rest point (its
        validation, its hooks), else the one being made (its window's micro-batches are what a
        failure inside it measured)."""
        return self.global_step if self._between else self._rest_at[0] + 1

    def _back_to_rest(self) -> None:
        """After a failure inside an accumulation window: a second ``fit`` trains the window
        again from its first micro-batch (it went on from the failing one, its gradient
        cleared and the earlier ones' lost, and the window's losses counted twice: other
        weights than an uninterrupted run's, a probe's). Failing in the optimizer step, before
        the update, the step is taken back too; after it, the step is done."""
        step, batch = self._rest_at
        if self._updated_at == self.global_step and self.global_step == step + 1:
            self.batch_in_epoch += 1  # (the window's last micro-batch: its step was taken)
            self._rest_at = (self.global_step, self.batch_in_epoch)
            self.tally.end_window()
            return
        forwards = self.tally.in_window()
        if self._between:  # failed at a rest point (validation, its hooks, a checkpoint): a
            # fit called again goes on from it; what it stages there again is taken (it was
            # refused as staged twice, a review's), and what the failure wrote there stays
            self.staging.taken_back(self.global_step)
            return
        self._retried = (step + 1, forwards)  # (said by the fit that trains it again)
        self.global_step, self.batch_in_epoch = step, batch
        if self.scaler is not None:  # the step's unscale_ is taken back with it (its
            # gradients are cleared): the fit called again refused to unscale them, a probe's;
            # the scale itself changes only in update(), which had not run
            self.scaler._per_optimizer_states.pop(id(self.optimizer), None)
        self.tally.discard_window()
        self.staging.taken_back(step + 1)
        self._purge_from = step + 1  # (what the failed attempt wrote of it is replaced)

    def _clear_stale_gradients(self) -> None:
        """Gradients the parameters hold before the first step (a backward by hand, a fit
        that failed mid-step) would add to its own: cleared, and said."""
        params = {id(p): p for p in self.model.parameters()}
        params.update((id(p), p) for g in self.optimizer.param_groups for p in g["params"])
        held = [p for p in params.values() if p.grad is not None]
        if held:
            log.warning(
                "fit: %d parameter tensor(s) held gradients from before the run (a backward "
                "outside the trainer, or a fit that failed mid-step): cleared, so the first "
                "step's gradient is its own",
                len(held),
            )  # fmt: skip
        for p in held:
            p.grad = None

    def _errors_of_every_rank(
        self, errors: list[tuple[Any, BaseException]]
    ) -> list[tuple[Any, BaseException]]:
        """``errors``, or, where only another rank's ``on_fit_end`` raised, an error naming
        that rank and its error: rank 0 wrote the run completed while rank 1 failed (a
        probe's finding)."""
        told = []
        for _, e in errors:
            try:
                told.append(f"{type(e).__name__}: {e}"
                            + "".join(f" {n}" for n in getattr(e, "__notes__", ())))  # fmt: skip
            except Exception:  # noqa: BLE001 (a message that cannot be made: every rank must
                told.append(type(e).__name__)  # still reach the gather)
        every = all_gather_objects(told)
        if errors:
            return errors
        others = [f"rank {r}: {m[0]}" for r, m in enumerate(every) if m]  # type: ignore[index]
        if not others:
            return []
        return [(None, RuntimeError(f"on_fit_end raised on another rank ({'; '.join(others)})"))]

    def finished(self) -> bool:
        return self.epoch >= self.max_epochs or self._done()

    def run_epoch(self) -> None:
        """Train one epoch (or up to ``max_steps``, or until a stop signal), then validate."""
        self.train_epoch()
        self._after_train_epoch()

    def _after_train_epoch(self) -> None:
        """What follows an epoch's training (or the run's last step): its validation, the
        epoch counted where it ran to its end, the rest point."""
        self._between = True  # (validation: at the last step taken)
        ended = self.batch_in_epoch == len(self.train_loader)  # ran to the epoch's end
        if self.stopped_by is not None:
            return  # stopped mid-epoch at a rest point: no validation; the position is kept
        started = time.perf_counter()
        self.validate()
        self._time_at_log += time.perf_counter() - started  # validation is not in samples/s
        if ended:
            self.epoch += 1
            self.batch_in_epoch = 0
            self._rest_at = (self.global_step, 0)
        self._rest_point(at_once=True)  # (after the validation, which read the host anyway)

    def _rest_point(self, at_once: bool = False) -> bool:
        """A point a resumed run continues from exactly: decide (every rank alike) whether
        the run stops here, then ``on_rest_point`` (periodic checkpoints, the stop's
        checkpoint). Returns whether to stop. A signal that arrives after the last step (during
        the last validation, say) does not stop the run: it completes (its final checkpoint,
        ``metrics.json`` completed) instead of stopping to be resumed for nothing."""
        stop = self._stop_agreed(at_once)
        if stop is not None and self.finished():
            log.warning("%s after the last step: the run completes", signal.Signals(stop).name)
            stop = None
        self.stopped_by = stop
        if self.global_step and self.global_step % READ_EVERY == 0:  # (on_flush every
            # READ_EVERY steps at the latest, as documented, with nothing staged as well:
            # counted in staging steps alone, a run logging less often flushed at its end
            # only, a probe's; by step number, so a resumed run and every rank flush where the
            # uninterrupted run does; at the rest point, after the step's validation, as a
            # checkpoint's flush: in the step, the end's flush after the last validation was
            # taken as done, a review's)
            self.write_deferred()
        self._fire_between("on_rest_point")
        return self.stopped_by is not None

    def _stop_agreed(self, at_once: bool) -> int | None:
        """The signal to stop for here, or None. Data-parallel, every rank stops at the same
        rest point if any got a signal: the highest signal number any rank got, all-reduced
        (max) at every rest point on the device. Between an epoch's steps the host takes the
        value agreed at the previous rest point, copied to it in the meantime behind an event
        (no wait for this step's kernels), so a stop lands one step after the signal;
        ``at_once`` (an epoch's end) reads this one's. A signal is never lost: a rank's flag
        stays set."""
        if not self.world.distributed:
            return self.stop_signal
        if self._stop_flag is None:  # (made on the device: torch.tensor(x, device=...) would
            # copy from pageable host memory, which waits for the device's queue)
            self._stop_flag = (torch.zeros((), device=self.device), None)
        flag, written = self._stop_flag
        if written != self.stop_signal:  # (a kernel, no host wait)
            flag.fill_(float(self.stop_signal or 0))
            self._stop_flag = (flag, self.stop_signal)
        agreed = all_reduce_max(flag)
        previous, self._stop_in_flight = self._stop_in_flight, None
        if at_once:  # (what was in flight is in this value too: the flags stay set)
            return int(agreed.item()) or None  # host sync: an epoch's end
        event = None
        host = agreed.to("cpu", non_blocking=True)
        if agreed.device.type == "cuda":  # (recorded on the stream of the flag's device: the
            event = torch.cuda.Event()  # current device may be another, a review's)
            event.record(torch.cuda.current_stream(agreed.device))
        self._stop_in_flight = (host, event)
        if previous is None:
            return None
        host, event = previous
        if event is not None:
            event.synchronize()  # the previous rest point's all-reduce and copy only
        return int(host.item()) or None  # (a host tensor)

    def validate(self) -> None:
        """Evaluate, log val/* at the current step, write the epoch's line, fire the hook."""
        modes, training = _modes(self.model), self.model.training  # (put back at the end)
        m = self.metrics = self.evaluate()
        self._validated_at = self.global_step
        values = {k: v for k, v in m.items() if k.startswith("val/")}
        # (a fit called again after an on_validation_end that raised validates again: the
        # same values at the same step were written twice, two points in the curve; NaN
        # compared as itself, which == does not, a review's)
        written = (self.global_step, {k: _bits(v) for k, v in values.items()})
        if self.logger is not None and self._val_logged != written:
            self.logger.log_scalars(values, self.global_step)
            self._val_logged = written
        if self.world.rank == 0:  # (the metrics are every rank's: said once)
            log.info(
                "%sepoch %d/%d  step %d  train/loss %s  %s", self.progress_options.label,
                self.epoch + 1, self.max_epochs, self.global_step, shown(m["train/loss"]),
                "  ".join(f"{k} {shown(v)}" for k, v in m.items() if k.startswith("val/")),
            )  # fmt: skip
        if (
            isinstance(self.scheduler, ReduceLROnPlateau)
            and self.batch_in_epoch == len(self.train_loader)
            and self._plateau_at != self.global_step
        ):  # one step per epoch's validation; not on the extra one of a run that max_steps
            self.scheduler.step(m[self.monitor])  # stops mid-epoch (a longer run has none)
            self._plateau_at = self.global_step  # (a fit called again after its
            # on_validation_end failed validates again: stepped twice, a review's)
        self._fire_between("on_validation_end", m, copies=True)  # (in eval mode, as it was)
        if training:  # a train() override of one's own runs again, with its side effects
            self.model.train()
        _put_modes(modes)  # each module's as found (a callback's eval() left over undone)
        self._train_modes, self._modes_base = modes, None

    def train_epoch(self) -> None:
        if self._train_modes is None:  # (outside fit)
            self.model.train()
        else:  # as the start of fit or the last validation left them (a leftover undone)
            _put_modes(self._train_modes)
        loader = self.train_loader
        start = self.batch_in_epoch  # > 0 only in a run resumed mid-epoch
        loader.set_epoch(self.epoch, start)
        windows = window_sizes(
            loader.num_samples, loader.global_batch_size, loader.drop_last, self.accumulate
        )
        if start == 0:
            self.tally.start_epoch()
        if start == 0 or self._epoch_begun != self.epoch:  # (and in a run resumed mid-epoch,
            # trainer.batch_in_epoch > 0 saying so: a curriculum setting its epoch's value
            # there trained the rest of the epoch with its first one, unsaid, a probe's; not
            # again in a fit called again after a failure, which fired it for this epoch)
            self._between = False  # (what it stages goes with the step that follows)
            self._fire("on_train_epoch_start", self.epoch)  # (staged: as on_fit_start)
        self._epoch_begun = self.epoch
        last = len(windows) - 1
        for i, batch, window in self._with_windows(loader, start, windows):
            step_now = (i + 1) % self.accumulate == 0 or i == last
            self.train_step(batch, window, step_now)
            self.batch_in_epoch = i + 1
            if step_now:  # (a rest point's position: where a failed fit is taken back to)
                self._rest_at, self._between = (self.global_step, i + 1), True
                self.tally.end_window()
            if self._done():
                break
            if step_now and i != last and self._rest_point():  # an epoch's last step's rest
                break  # point: after its validation

    def _with_windows(
        self, loader: Loader, start: int, sizes: list[int]
    ) -> Iterator[tuple[int, Batch, Window]]:
        """Each micro-batch with its accumulation window. Per-token losses need the window's
        Σu before its first backward: its micro-batches are read first (a window of up to
        ``accumulate_grad_batches`` batches held at once, as torchtitan counts its global valid
        tokens); per-sample losses know the window's size on the host and read none ahead."""
        n, k = len(sizes), self.accumulate
        if not self.token_losses:  # one Window per window, zipped in C (no frame per batch)
            per_window = [Window(sizes[j], min(k, n - j)) for j in range(0, n, k)]
            return zip(
                itertools.count(start), loader, [per_window[i // k] for i in range(start, n)]
            )
        return self._read_ahead(loader, start, sizes)

    def _read_ahead(
        self, loader: Loader, start: int, sizes: list[int]
    ) -> Iterator[tuple[int, Batch, Window]]:
        held: list[tuple[int, Batch]] = []
        for i, batch in enumerate(loader, start):
            held.append((i, batch))
            if (i + 1) % self.accumulate == 0 or i == len(sizes) - 1:
                units = self.objective.window_units([b.y for _, b in held])
                window = Window(sizes[i], len(held), units)
                for j, b in held:
                    yield j, b, window
                held = []

    def _not_in_optimizer(self) -> None:
        """The trainable parameters the optimizer does not hold (an optimizer factory of one's
        own given the head only, the body left trainable): they get gradients every step, which
        the optimizer's ``zero_grad`` never clears, so they summed over the steps, and the
        norms, histograms, the guard and the clipping of the optimizer's own parameters read
        that sum (a probe: ``grad_norm/total`` 1.34 for 0.47 at step 4). Cleared after each
        step as the optimizer's own are, and named once (O(parameters), not per step)."""
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        outside = [(n, p) for n, p in zip(self.param_names, self.params, strict=True)
                   if id(p) not in held]  # fmt: skip
        # and the other way: tensors the optimizer updates that are not the model's (a
        # learnable temperature kept in a loss of one's own): not measured, clipped or
        # guarded, and grad_norm/total left them out, unsaid (a probe's)
        model = {id(p) for p in self.model.parameters()}
        # (not one that was the model's: a layer a callback replaced, left in its group, gets
        # no gradient and is not updated, a review's)
        self._were_model |= model
        beyond = [f"group {i}: {tuple(p.shape)}" for i, group in
                  enumerate(self.optimizer.param_groups) for p in group["params"]
                  if id(p) not in self._were_model and p.requires_grad]  # fmt: skip
        if beyond and beyond != self._beyond_named:
            log.warning(
                "%d tensor(s) the optimizer updates are not the model's parameters (%s%s): "
                "the gradient norms (grad_norm/total and per parameter), the clipping "
                "(grad_clip), the non-finite guard and the histograms cover the model's "
                "parameters only and leave them out, and a checkpoint keeps their values only "
                "where their holder's state_dict does; an nn.Parameter of a module of the "
                "model is measured, clipped, guarded and kept",
                len(beyond), ", ".join(beyond[:5]), " …" if len(beyond) > 5 else "",
            )  # fmt: skip
        self._beyond_named = beyond
        #: trainable parameters outside the optimizer: their gradients are cleared per step
        self._unowned = [p for _, p in outside]
        names = [n for n, _ in outside]
        if names and names != self._unowned_named:
            log.warning(
                "%d trainable parameter tensor(s) are not in the optimizer (%s%s): they get a "
                "gradient every step (measured, clipped with the others, cleared after the "
                "step) and are never updated; requires_grad_(False) on them saves their "
                "backward", len(names), ", ".join(names[:5]), " …" if len(names) > 5 else "",
            )  # fmt: skip
        self._unowned_named = names

    def _dtypes_of_params(self) -> None:
        #: float16/bfloat16 parameters, or long ones on a CPU: their gradients' norms, the
        #: total and the clipping coefficient are computed by trainer.instrument.norms (in
        #: float32; by rows), not by clip_grad_norm_
        self._careful = needs_care(self.params)
        #: whether the total is the 2-norm of shared per-parameter norms bit for bit, so the
        #: loop may take it from them: get_total_norm sums per (device, dtype) group, so with
        #: one group; total_norm (careful) always
        self._one_group = self._careful or len({(p.device, p.dtype) for p in self.params}) <= 1

    def _first_forward(self, x: Tensor, y: Tensor) -> tuple[Any, Tensor]:
        """The first micro-batch's forward and loss, with the output's check. A dtype the model
        or the loss cannot take (float64 or uint8 inputs for a float32 model, int16 labels)
        failed with torch's message, which names no data: re-raised naming the batch's."""
        self._output_checked = True
        try:
            logits = self.forward_model(x)
        except RuntimeError as e:
            refusal = dtype_refusal(e, x, self.model)
            if refusal is None:
                raise
            raise refusal from e
        self.criterion.check_output(logits)
        try:
            losses = self.criterion(logits, y)
        except (RuntimeError, IndexError) as e:
            text = str(e)
            if isinstance(e, torch.OutOfMemoryError) or not (
                isinstance(e, IndexError) or "dtype" in text or "scalar type" in text
                or "out of bounds" in text or "for target" in text
            ):  # fmt: skip
                raise
            classes = (  # (a label past the output's scores, one per sample: the data
                # module gave no num_classes, and out_dim is the size of one target, a probe's)
                "; set num_classes (or out_dim) in the data module (without either, out_dim "
                "is the size of one target: 1 for a class label)"
                if "out of bounds" in text and self.criterion.task == "classification"
                else ""
            )
            raise ContractError(
                f"the loss ({type(self.criterion).__name__}) failed on the first batch: outputs "
                f"{_output_in_words(logits)}, targets {y.dtype} of shape "
                f"{tuple(y.shape)}{LABELS_HINT.get(self.criterion.task or '', '')}{classes}. "
                f"torch: {text.splitlines()[0] if text else type(e).__name__}"
            ) from e
        said = self.criterion.check_targets(logits, y) if isinstance(logits, Tensor) else None
        if said:  # (in train mode: the eval-mode output validation takes may differ)
            log.warning("the first batch's output in training mode: %s", said)
        return logits, losses

    def _follow_trainable(self, fire: bool = True, look: bool = False) -> None:
        """Follow a change of the parameters' ``requires_grad`` (gradual unfreezing in a
        callback): before each micro-batch, before its backward and before each optimizer
        step, :attr:`params` and :attr:`param_names` are again the parameters that require
        grad, so the guard, clipping, ``grad_norm/total`` and the instruments cover a layer
        unfrozen mid-run (they then fire ``on_params_change``); a layer frozen while its
        gradient of the window exists loses that gradient (it is not updated). One pass over
        the flags: O(parameters). ``fire=False``: the flags restored from a checkpoint, before
        the run starts (the callbacks build on the trainable parameters then).

        The model's parameters themselves are read again after torch's registration hooks saw
        a module, parameter or buffer set (:meth:`fit`), at each fit's start, and on logging
        steps (``look``: a parameter deleted or set to None registers nothing): a tensor
        replaced or added (a callback's ``model.head = nn.Linear(...)``) is followed as an
        unfrozen one is, and one removed leaves the lists (the norms, the guard, the clipping
        and per-sample norms measured the old tensors as complete, a probe's findings). A new
        trainable tensor the optimizer does not hold is refused at the first step it has a
        gradient (:meth:`_refuse_unheld`)."""
        structure = None
        if self._registered or look:
            structure = self._follow_replaced()
            if self._registered:  # (modules replaced: the buffers a skip puts back, at the
                self._buffers_due = True  # next window; the kept ones are the old modules')
            self._registered = False
        flags = [p.requires_grad for _, p in self._all_params]
        if structure is None and flags == self._trainable:
            return
        if structure is None:
            changed = [n for (n, _), a, b in zip(self._all_params, flags, self._trainable,
                                                 strict=True) if a != b]  # fmt: skip
        else:
            changed = structure
        if self.world.distributed and changed:  # (renamed alone: the same tensors, DDP's)
            raise RuntimeError(
                f"the parameters {changed[:5]} changed (requires_grad, or the tensors) at step "
                f"{self.global_step}: DistributedDataParallel registers the parameters that "
                "require grad when it wraps the model and cannot follow a change (unfreeze "
                "before the run starts, or train the stages as separate runs resumed from "
                "each other's weights)"
            )
        if structure is None:
            for (_, p), now, before in zip(self._all_params, flags, self._trainable, strict=True):
                if before and not now:  # frozen with this window's gradient already there: it
                    p.grad = None  # is dropped, not applied unclipped and unchecked (no update)
        self._trainable = flags
        named = [(n, p) for n, p in self._all_params if p.requires_grad]
        self.param_names[:] = [n for n, _ in named]  # (in place: the lists handed out)
        self.params[:] = [p for _, p in named]
        self.objective.params = list(self.params)
        self._not_in_optimizer()
        self._bind_regularizers()
        _check_half_trained(self.scaler, zip(self.param_names, self.params, strict=True),
                            f" made trainable at step {self.global_step}")  # fmt: skip
        self._dtypes_of_params()
        log.info(
            "%s at step %d (%s%s): %d trainable tensors now",
            "the model's parameters changed" if structure else
            "the model's parameters renamed" if structure is not None else
            "trainable parameters changed", self.global_step,
            ", ".join(changed[:5]), " …" if len(changed) > 5 else "", len(self.params),
        )  # fmt: skip
        if fire:
            self._fire("on_params_change")

    def _follow_replaced(self) -> list[str] | None:
        """The model's parameters read again: None where they are the same tensors under the
        same names; else :attr:`_all_params` and :attr:`_trainable` made the model's, and the
        names of the tensors new, gone or frozen or unfrozen since (by tensor, not by name:
        [] where they were only renamed, a parametrization registered). A tensor that was
        trainable and is frozen now or gone from the model loses its gradient of the window
        (a layer frozen in the hook that swapped a head was updated unclipped, a review's)."""
        now = list(self.model.named_parameters())
        if len(now) == len(self._all_params) and all(
            a == b and p is q for (a, p), (b, q) in zip(now, self._all_params, strict=True)
        ):
            return None
        was = {id(p): (n, p, t) for (n, p), t in zip(self._all_params, self._trainable,
                                                      strict=True)}  # fmt: skip
        ids = {id(p) for _, p in now}
        new = [n for n, p in now if id(p) not in was]
        gone = [n for i, (n, _, _) in was.items() if i not in ids]
        flipped = [n for n, p in now if id(p) in was and was[id(p)][2] != p.requires_grad]
        for i, (_, p, trained) in was.items():
            if trained and (i not in ids or not p.requires_grad):
                p.grad = None  # (frozen or gone with its gradient there: not applied)
        self._new_ids.update(id(p) for _, p in now if id(p) not in was)
        self._all_params = now
        self._trainable = [p.requires_grad for _, p in now]
        return sorted({*new, *gone, *flipped})

    def _bind_regularizers(self) -> None:
        """The regularizers select again among the trainable parameters (their patterns, of
        the module each was bound to), leaving out a tensor set on the model mid-run that the
        optimizer does not hold (an EMA's copy: regularized, it got a gradient, and the run was
        refused, a review's); one the optimizer takes later is selected then."""
        aside = {id(p) for p in self._unowned if id(p) in self._new_ids}
        self._aside = aside
        for r in self.objective.regularizers:
            r.bind(r.bound_to or self.model, empty_ok=True)
            if aside:
                kept = [(n, p) for n, p in zip(r.names, r.params, strict=True)
                        if id(p) not in aside]  # fmt: skip
                r.names[:], r.params[:] = [n for n, _ in kept], [p for _, p in kept]

    def _refuse_unheld(self) -> None:
        """A tensor set on the model mid-run that the optimizer does not hold, with a gradient
        at this step: refused before the update (it would get one every step and never be
        updated, a probe's). Without a gradient (a copy kept on the model that is not in the
        forward, an EMA's) it is not refused."""
        self._not_in_optimizer()  # (the groups now: one added in this step's hooks, a review's)
        if {id(p) for p in self._unowned if id(p) in self._new_ids} != self._aside:
            self._bind_regularizers()  # (one the optimizer took since: regularized from the
            # next step, as a layer unfrozen is; a review's)
        lost = [n for n, p in zip(self.param_names, self.params, strict=True)
                if id(p) in self._new_ids and p.grad is not None
                and any(p is q for q in self._unowned)]  # fmt: skip
        if lost:
            raise RuntimeError(
                f"{', '.join(lost[:5])}{' …' if len(lost) > 5 else ''}: a new tensor set on the "
                f"model (a module or nn.Parameter, by a callback) has a gradient at step "
                f"{self.global_step}, and the optimizer does not hold it: it would get one "
                "every step and never be updated. Copy the new values into the existing "
                "parameter instead (with torch.no_grad(): p.copy_(new)), or give the optimizer "
                "the new tensor (optimizer.add_param_group; a run with a group of its own "
                "cannot be resumed), or set requires_grad_(False) on it to keep it fixed"
            )

    def train_step(self, batch: Batch, window: Window, step_now: bool) -> None:
        """Forward and backward of one micro-batch; the optimizer step when ``step_now``."""
        self._between = False  # (in a step: step_in_progress)
        self.window = window  # the accumulation window this micro-batch belongs to
        self._follow_trainable()
        self._fire("on_train_batch_start", batch)
        x, y, index = batch
        if not self._window_open:  # (the window's first micro-batch)
            if self._buffers_due:  # (modules replaced since the last window)
                self._buffers, self._buffers_due = self._buffer_slots(), False
            if self._buffers:
                self._keep_buffers()
        self._window_open = not step_now
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        fx = x  # (what the model is given)
        if self.input_penalty is not None:
            x = self.input_penalty.prepare(x)  # a leaf to differentiate the loss with respect to
            fx = x.clone()  # (the model gets a copy, which a model writing its input in place,
            # x.div_(16), may write: the leaf itself stopped the step with torch's "a leaf
            # Variable that requires grad is being used in an in-place operation", a probe's)
        if self.before_forward_callbacks:  # (each once: appended for this micro-batch)
            calls, self.before_forward_callbacks = self.before_forward_callbacks, []
            for call in calls:
                call()
        # data-parallel: the ranks' gradients are all-reduced once per optimizer step, in the
        # window's last backward; the others accumulate locally (DDP's no_sync)
        local = not step_now and self.world.distributed
        with self.forward_model.no_sync() if local else self._null:  # type: ignore[operator]
            with self._autocast(), self._double_backward_kernels():
                if self._output_checked:
                    logits = self.forward_model(fx)  # (B, K) logits, or any output the loss takes
                    losses = self.criterion(logits, y)  # (B,), or per token (B, T)
                else:  # (the first step: not after an epoch's work)
                    logits, losses = self._first_forward(fx, y)
            self._fire("on_before_backward", batch, losses)
            self._follow_trainable()  # (a change in this micro-batch's hooks: the backward's)
            if self.before_backward_callbacks is not None:  # (once: set for each micro-batch)
                check, self.before_backward_callbacks = self.before_backward_callbacks, None
                check()
            # the roots (data loss, regularizers) and their one backward pass: trainer/objective
            # (``logs``: the step this micro-batch is in logs, which only the penalty reads)
            logs = self.input_penalty is not None and self.should_log(self.global_step + 1)
            weights, units = self.objective.backward(
                losses, logits, (x, y, index), window, last=step_now, logs=logs
            )
        losses = losses.detach()
        self.tally.add(losses, units)
        self._fire("on_after_backward", batch, losses, weights)
        if self.after_backward_callbacks is not None:  # (once: set again for each micro-batch)
            check, self.after_backward_callbacks = self.after_backward_callbacks, None
            check()
        if step_now:
            self.optimizer_step(batch, losses, weights)

    def optimizer_step(self, batch: Batch, losses: Tensor, weights: Tensor | None) -> None:
        scaler = self.scaler
        if scaler is not None:
            if any(p.grad is not None for p in self.params):
                scaler.unscale_(self.optimizer)  # everything below sees true gradients
            else:  # no gradient (a callback dropped them): nothing for the scaler to unscale,
                # check or step (GradScaler asserts on a step without its checks); a gradient
                # a hook sets below is a true one, stepped as without a scaler
                scaler = None
        self.global_step += 1
        self.logging_step = should_log = self.should_log(self.global_step)
        self.skip_step = self.measure_clipped_norm = False
        self._grad_norms = self._measured = self.skip_step_where = None
        # (a change made in this window's own hooks; on logging steps, the model's
        # parameters read again: a removed one registers nothing)
        self._follow_trainable(look=should_log)
        if self._unowned and self._new_ids:  # (usually neither)
            self._refuse_unheld()
        self._fire_before_step()
        if self._registered:  # (a module replaced in those hooks: the total and the clipping
            self._follow_trainable()  # below cover the model's tensors, a probe's)
        grad_norm = None
        has_reg = self.objective.has_regularizers
        # the lr of this step, each group's (an optimizer of one's own may have none: not
        # logged)
        lrs = [_now(g.get("lr")) for g in self.optimizer.param_groups] if should_log else []
        # the norms and the clipping are the same on a skipped step (a step the guard skips
        # on the host logs the non-finite total it would log deferred, where the skip is
        # decided on the device); only the update is left out
        split_norms = self.objective.split_norms() if should_log and has_reg else {}
        grads: list[Tensor] = []  # (only where a norm is taken: not every step)
        if self.grad_clip > 0 or should_log or self.measure_clipped_norm:
            grads = [p.grad for p in self.params if p.grad is not None]
            shared = self.shared_grad_norms(grads) if self._one_group else None
            if shared is not None:  # a callback measured them: reuse, as get_total_norm
                # would compute it (the 2-norm of the per-tensor 2-norms)
                grad_norm = torch.linalg.vector_norm(shared)
            measured = self._measured
            if (
                measured is not None
                and not self._said_changed
                and (shared is None or self._grad_norms is not measured)
            ):  # (what moved since the instrument measured them: nothing where its norms are
                # reused)
                self._changed_after_measuring(grads)
                if not self._said_changed and any(self._writes_grads[measured[3] + 1 :]):
                    # a callback of one's own ran since, the counters unmoved: taken again
                    # and compared when the step's values are read (a write through .data,
                    # which no counter tells)
                    fresh = torch.stack(norms_of(grads, self._careful))
                    if shared is None and self._one_group:
                        grad_norm = torch.linalg.vector_norm(fresh)
                    self._compare_norms(fresh, grads)
        if self.grad_clip > 0:
            if grad_norm is None and not self._careful:
                grad_norm = clip_grad_norm_(self.params, self.grad_clip)
            else:
                if grad_norm is None:  # (float16/bfloat16: the total in float32; by rows)
                    grad_norm = total_norm(grads, careful=True)
                clip_grads_with_norm_(self.params, self.grad_clip, grad_norm)
            if self.measure_clipped_norm:  # measured after clipping, not inferred
                split_norms["grad_norm/total_clipped"] = total_norm(grads, self._careful)
        elif should_log or self.measure_clipped_norm:
            if grad_norm is None:
                grad_norm = total_norm(grads, self._careful)
            if self.measure_clipped_norm:
                split_norms["grad_norm/total_clipped"] = grad_norm  # nothing clipped
        if self.measure_clipped_norm and grad_norm is not None:  # the norms instrument's
            split_norms["grad_norm/total"] = grad_norm  # cadence: the total with it
        out = StepOutput(
            self.global_step, self.epoch, batch, losses, weights, grad_norm, should_log,
            skipped=self.skip_step, skip_where=self.skip_step_where,
        )  # fmt: skip
        watch = None if self.skip_step else watch_update(self.optimizer)  # (step hooks only)
        try:
            if self.skip_step:  # parameters and optimizer state stay as they are
                if scaler is not None:
                    scaler.update()  # closes this step's unscale_ (lowers the scale on inf)
            elif scaler is not None:  # (and scaler.update(); trainer/update.py)
                scaled_step(scaler, self.optimizer, self.skip_step_where)
            elif self.skip_step_where is not None:  # decided on the device, never read here
                conditional_step(self.optimizer, self.skip_step_where)
            else:
                step_optimizer(self.optimizer)  # (optimizer.step(); trainer/update.py)
        except BaseException:
            if watch is not None and watch.made:  # a step post-hook (one's own) raised after
                # the update: the step is done, finished as one (its schedule, its end's
                # hooks, its scalars), then the failure goes on
                self._updated_at = self.global_step
                self._end_failed_step(out, lrs, split_norms, scaler)
            raise
        finally:
            if watch is not None:
                watch.remove()
        self._updated_at = self.global_step  # (a failure from here on: the step was taken)
        self._after_update()
        try:
            self._fire("on_train_step_end", out)
        except BaseException:  # the step is taken: its scalars are written (or kept for the
            with contextlib.suppress(Exception):  # failure's write) before the failure goes
                self._write_step(out, lrs, split_norms)  # on (they were lost, and the next
            raise  # log averaged two windows, reviews')
        self._write_step(out, lrs, split_norms)
        self.objective.end_step()
        self.progress.update()

    def _write_step(self, out: StepOutput, lrs: list[Any], split_norms: dict[str, Tensor]) -> None:
        """The step's scalars: logged on a logging step, else kept for the next read."""
        if out.should_log:
            self._log_step(out, lrs, split_norms)
        elif split_norms or self.staging.pending():  # a callback's own cadence: kept on the
            # device and written at this step with the next logging step's read (no sync here)
            self.staging.defer({**split_norms, **self.staging.take_scalars(out.step)}, out.step)
            if len(self.staging.deferred) >= READ_EVERY:
                self.write_deferred()

    def _buffer_slots(self) -> list[tuple[nn.Module, str]]:
        """The model's buffers a skipped step puts back (with :attr:`restore_buffers_on_skip`;
        none without), by module and name."""
        if not self.restore_buffers_on_skip:
            return []
        return [(m, n) for m in self.model.modules() for n, b in m._buffers.items()
                if b is not None]  # fmt: skip

    def _current_buffers(self) -> list[Tensor | None]:
        return [m._buffers.get(n) for m, n in self._buffers]

    def _keep_buffers(self) -> None:
        """Copy the model's buffers before a step's first forward (one foreach copy, into
        copies kept from step to step; made again where a buffer changed its shape, dtype or
        device)."""
        now = self._current_buffers()
        kept = self._buffers_before
        if (
            kept is None
            or len(kept) != len(now)
            or any(
                b is None
                or k is None
                or (b.shape, b.dtype, b.device) != (k.shape, k.dtype, k.device)
                for b, k in zip(now, kept, strict=True)
            )
        ):  # (a buffer a forward set to None is kept as None: nothing to put back)
            self._buffers_before = [b.detach().clone() if b is not None else None for b in now]
        else:  # (none is None here: no list built per step)
            torch._foreach_copy_(cast(list[Tensor], kept), cast(list[Tensor], now))

    def put_back_buffers(self) -> None:
        """The model's buffers as they were before this step's first forward, where the step
        is skipped (:attr:`skip_step`, :attr:`skip_step_where`): for a callback that stops the
        run in ``on_before_optimizer_step`` at a step it skips, before the loop's own put-back
        after the update (with :attr:`restore_buffers_on_skip` set; else nothing was kept)."""
        if self._buffers_before is not None:
            self._put_back_buffers()

    def _put_back_buffers(self) -> None:
        """The buffers as they were before the step, where it is skipped: on the host's word
        (``skip_step``), or where the device's flag is set (``skip_step_where``: a
        ``torch.where`` per buffer, no host read). Into the module's current buffer (a
        forward may have put a new tensor there, on another device too), where its shape and
        dtype are unchanged."""
        before = self._buffers_before
        assert before is not None
        if not self.skip_step and self.skip_step_where is None:
            return
        if len(before) != len(self._buffers):  # (kept by an earlier fit, of other buffers: a
            return  # fit called again on a model given new ones, mid-window)
        pairs = [(b, k) for b, k in zip(self._current_buffers(), before, strict=True)
                 if b is not None and k is not None and b.shape == k.shape
                 and b.dtype == k.dtype]  # fmt: skip
        where = self.skip_step_where
        if self.skip_step or where is None:
            torch._foreach_copy_([b for b, _ in pairs], [k for _, k in pairs])
        else:
            skip = where.bool()
            with torch.no_grad():
                for b, k in pairs:
                    if b.device != k.device:  # (a forward moved it: torch.where cannot mix a
                        # CUDA flag with a CPU tensor of elements, a review's; the flag's copy
                        # to the host waits for the device, for such a buffer alone)
                        k, s = k.to(b.device), skip.to(b.device)
                    else:
                        s = skip
                    b.copy_(torch.where(s, k, b))

    def _end_failed_step(
        self,
        out: StepOutput,
        lrs: list[Any],
        split_norms: dict[str, Tensor],
        scaler: torch.amp.GradScaler | None,
    ) -> None:
        """The end of a step whose update was made before a step post-hook raised: what
        follows the update, every ``on_train_step_end`` (the instruments' update ratios are
        taken there: they were missing, a review's), the step's scalars; its rest point is
        made by the fit called again (:attr:`_rest_due`). Their own failures are logged; the
        post-hook's is the one raised. ``scaler``: the step's (None where it unscaled
        nothing: a review's, its update() refused, and the schedule was not advanced)."""
        if scaler is not None:
            try:
                scaler.update()  # (scaler.step raised before it)
            except Exception as e:  # noqa: BLE001 (logged: the post-hook's error is raised)
                log.error("step %d: the GradScaler's update after the optimizer's step hook "
                          "failed failed too: %r", out.step, e)  # fmt: skip
        try:
            self._after_update()
        except Exception as e:  # noqa: BLE001 (as above)
            log.error("step %d: finishing the update after the optimizer's step hook failed "
                      "failed too: %r", out.step, e)  # fmt: skip
        self._rest_due = True
        for hook, error in self._fire_each("on_train_step_end", out):
            log.error("callback %s: on_train_step_end raised at step %d, after the optimizer's "
                      "step hook failed: %r", type(_owner(hook)).__name__, out.step,
                      error)  # fmt: skip
        try:
            self._write_step(out, lrs, split_norms)
            self.objective.end_step()
        except Exception as e:  # noqa: BLE001 (as above)
            log.error("step %d: its scalars could not be written after the optimizer's step "
                      "hook failed: %r", out.step, e)  # fmt: skip

    def _after_update(self) -> None:
        """What follows the optimizer's update: the objective told, buffers a skipped step
        changed put back, the schedule advanced, the gradients cleared."""
        self.objective.updated()
        self.put_back_buffers()
        self._advance_schedule()  # a skipped step is a step: the schedule goes on
        clear_grads(self.optimizer)  # (optimizer.zero_grad(set_to_none=True))
        for p in self._unowned:  # (trainable, not the optimizer's: usually none)
            p.grad = None

    def _advance_schedule(self) -> None:
        if self.scheduler is None or isinstance(self.scheduler, ReduceLROnPlateau):
            return  # (ReduceLROnPlateau steps after each validation, on the monitored metric)
        if getattr(self.optimizer, "_opt_called", False):  # (set by the scheduler's wrapper)
            self.scheduler.step()
            return
        with warnings.catch_warnings():  # steps skipped so far: the order warning is moot
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            self.scheduler.step()

    def _window_loss(self) -> tuple[Tensor, int]:
        """train/loss over the steps since the last log, and their samples (every rank's)."""
        train_loss, total, count, samples = self.tally.take_log()
        if self.world.distributed:  # the mean over every rank's samples (tokens)
            if not isinstance(count, Tensor):  # (per-sample losses: the count, on the host)
                count = torch.full((), count, dtype=total.dtype, device=total.device)
            total, n = all_reduce_sum(torch.stack([total, count]))
            train_loss, samples = total / n, samples * self.world.size
        return train_loss, samples

    def _weight_stats(self, weights: Tensor, y: Tensor) -> dict[str | tuple[str, ...], Tensor]:
        """weights/mean, /min, /max of the step's last micro-batch: data-parallel, of its
        global batch (every rank's weights, each without the factor W its backward carries
        for DDP's average: the weights one process would have), and a rank without samples
        takes part with none. The mean in float64: B equal float32 weights average to exactly
        their value. Per-token losses: over the tokens, the elements the loss's units count
        (``y`` the micro-batch's targets; the padding's 0s made them depend on how long a
        batch was padded: data-parallel, each rank pads its slice to its own longest, and 2
        ranks logged 1/44 where one process logged 1/48, a probe's); NaN without any."""
        w = weights.detach()
        units = self.criterion.units(y, units_dtype(w.dtype)) if self.token_losses else None
        if units is not None:  # (logging steps only: a boolean mask's host sync)
            w = w[units.reshape(w.shape) > 0]
        w = w.double().flatten() / self.world.size
        if w.numel():
            w_min, w_max = torch.aminmax(w)
        else:  # (metadata: no sync) nothing here: the other ranks' decide
            w_min, w_max = w.new_full((), torch.inf), w.new_full((), -torch.inf)
        if not self.world.distributed:
            mean = w.mean() if w.numel() else w.new_full((), torch.nan)
            if not w.numel():
                w_min = w_max = mean
            return {"weights/mean": mean, "weights/min": w_min, "weights/max": w_max}
        total, count = all_reduce_sum(torch.stack([w.sum(), w.new_full((), float(w.numel()))]))
        neg_min, w_max = all_reduce_max(torch.stack([-w_min, w_max]))
        none = count == 0  # (every rank's tokens padding: NaN, not ±Inf)
        return {"weights/mean": total / count,
                "weights/min": torch.where(none, torch.nan, -neg_min),
                "weights/max": torch.where(none, torch.nan, w_max)}  # fmt: skip

    def _log_step(self, out: StepOutput, lrs: list[Any], extra: dict[str, Tensor]) -> None:
        train_loss, samples = self._window_loss()
        values: dict[str | tuple[str, ...], Tensor | float] = {"train/loss": train_loss}
        if lrs and lrs[0] is not None:
            values["lr"] = lrs[0]
        if len(lrs) > 1:  # parameter groups: each one's too (the head's 3× lr was not shown)
            values.update({f"lr/group_{i}": v for i, v in enumerate(lrs) if v is not None})
        if out.grad_norm is not None:
            values["grad_norm/total"] = out.grad_norm
        values.update(extra)
        values.update(self.staging.take_scalars(out.step))
        values.update(self.objective.reg_scalars())
        if out.weights is not None:
            values.update(self._weight_stats(out.weights, out.batch[1]))
        floats = self.log_scalars(values, out.step)  # host sync: logging steps only
        if self.objective.weighting is not None:  # (a strategy of one's own: its raw weights'
            self.objective.weighting.check_window(out.step)  # flag, read with the step's)
        now = time.perf_counter()
        elapsed = max(now - self._time_at_log, 1e-9)
        postfix = {"loss": floats["train/loss"], "samples/s": samples / elapsed}
        if "grad_norm/total" in floats:
            postfix["grad_norm"] = floats["grad_norm/total"]
        self.progress.show(self.epoch, self.max_epochs, out.step, postfix)
        self._time_at_log = now

    # ------------------------------------------------------------------ checkpoint state
    def _optimizer_state(self) -> dict[str, Any]:
        """The optimizer's state dict, leaving out the state of tensors no group holds (a
        head a callback replaced and took out of its group: AdamW kept its moments, and torch's
        ``state_dict`` raised a bare KeyError at every checkpoint, the final one included, a
        probe's). The optimizer keeps them (a tensor put back in a group later takes them up
        again: deleting them made a checkpointed run train differently, and a state under a
        key of its own, not a tensor, went too, a review's); the checkpoint does not, said."""
        state = self.optimizer.state
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        orphans = [k for k in state if isinstance(k, Tensor) and id(k) not in held]
        if not orphans:
            return self.optimizer.state_dict()
        log.warning(
            "checkpoint at step %d: the optimizer's state of %d tensor(s) no parameter group "
            "holds (taken out of its group, a replaced layer's) is not in it: a run resumed "
            "from it starts their state afresh if they are put back in a group",
            self.global_step, len(orphans),
        )  # fmt: skip
        gone = {id(k) for k in orphans}
        kept = type(state)(dict) if isinstance(state, collections.defaultdict) else type(state)()
        kept.update((k, v) for k, v in state.items() if id(k) not in gone)
        self.optimizer.state = kept
        try:
            return self.optimizer.state_dict()
        finally:
            self.optimizer.state = state

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly as if it had not stopped: the
        model, optimizer, scheduler and GradScaler states, the position (step, epoch, batch in
        the epoch), the per-sample losses not yet logged or folded, the last metrics, the
        loader's and the callbacks' states. (RNG states: :func:`trainer.checkpoint.rng_state`.)"""
        loader_state = getattr(self.train_loader, "state_dict", None)
        tally = self.tally.state_dict()
        if self.world.distributed:  # each rank's losses not logged yet are its own: every rank
            # takes part (a collective: every rank checkpoints together, rank 0 writes)
            host = {k: v.cpu() if isinstance(v, Tensor) else v for k, v in tally.items()}
            tally = {"tally_ranks": all_gather_objects(host)}
        return {
            "model": self.model.state_dict(),
            # (NumPy values in an optimizer's state, np.sqrt of a group's lr: each checkpoint
            # was written, then refused by the safe load, and resume=auto started afresh, a
            # probe's; as a callback's state: converted, said, or refused when written)
            "optimizer": checkpointable(
                self._optimizer_state(), type(self.optimizer).__name__, "optimizer"
            ),
            # each group's tensors by name (a resume with the groups built in another order
            # is refused: they took each other's state, a probe's)
            "optimizer_names": self._group_names(),
            "scheduler": checkpointable(
                self.scheduler.state_dict(), type(self.scheduler).__name__, "scheduler"
            )
            if self.scheduler
            else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "step": self.global_step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            # the training split's size, whose permutation the epoch's order is (a resume on
            # a split that grew trained the rest of its epoch on another order, a probe's)
            "train_samples": self.train_loader.num_samples,
            # and what else a position in the epoch means (a hand-built Trainer's loader of
            # another batch size or seed, or another accumulation, took it silently: samples
            # trained twice or never, a probe's)
            "data_order": self._data_order(),
            **tally,
            "metrics": dict(self.metrics),
            "loader": loader_state() if loader_state else None,
            # by module and class (a callback of one's own named Norms took the built-in
            # instrument's state, or gave it its own: a probe), in order
            "callbacks": [
                [_qualified(cb), checkpointable(_named(cb, "state_dict"), type(cb).__name__)]
                for cb in self.callbacks
            ],  # fmt: skip
            # a loss's, weighting's or regularizer's own state (a running mean of the losses)
            "objective": {
                k: checkpointable(_named(p, "state_dict"), type(p).__name__, k)
                for k, p in self._stateful_parts()
            },
            # their classes (a resume with another weighting took the state by key alone)
            "objective_classes": {k: _qualified(p) for k, p in self._stateful_parts()},
            # which parameters train (gradual unfreezing changes it): restored on resume, so a
            # layer unfrozen before the checkpoint trains after it too
            "trainable": {n: p.requires_grad for n, p in self.model.named_parameters()},
            # (the model's now: a replacement not yet followed, at a rest point after the
            # callback that made it, kept the old tensors' flags, a review's)
            # the step of the last validation (a run resumed finished validates its last step
            # unless that is it)
            "validated_at": self._validated_at,
            "schedule_length": dict(self.schedule_length),
            # each module's train/eval mode the next step trains with (a BatchNorm frozen by
            # a callback mid-run stays so on resume)
            "train_modes": self._modes_to_keep(),
            "train_modes_base": self._base_modes_to_keep(),
        }

    def _modes_to_keep(self) -> dict[str, bool]:
        """Each module's mode now: at a rest point, the one the next step trains with."""
        return {n: m.training for n, m in self.model.named_modules()}

    def _base_modes_to_keep(self) -> dict[str, bool] | None:
        """The modes the last start of fit or validation left (a resume replays from them;
        a resumed run's, those of the run it resumed until it validates)."""
        base = self._modes_base if self._modes_base is not None else self._train_modes
        if base is None:
            return None
        names = {id(m): n for n, m in self.model.named_modules()}
        return {names[id(m)]: t for m, t in base if id(m) in names}

    def _group_names(self) -> list[list[str]]:
        """Each optimizer group's tensors, by their names in the model (another tensor, by
        its shape)."""
        named = {id(p): n for n, p in self.model.named_parameters()}
        return [[named.get(id(p), f"{NOT_THE_MODELS}, {tuple(p.shape)})") for p in g["params"]]
                for g in self.optimizer.param_groups]  # fmt: skip

    def _check_state_shapes(self, saved: dict[str, Any]) -> None:
        """The saved optimizer state's tensors against the shapes of the tensors they go to
        (torch's load maps them by position)."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        names = [n for g in self._group_names() for n in g]
        for key, entry in (saved.get("state") or {}).items():
            if (
                not isinstance(key, int)
                or not 0 <= key < len(params)
                or not isinstance(entry, dict)
            ):
                continue
            for what, t in entry.items():
                if (what in _ELEMENTWISE and isinstance(t, Tensor) and t.ndim > 0
                        and t.shape != params[key].shape):  # fmt: skip
                    raise ValueError(
                        f"its optimizer state's {what} of shape {tuple(t.shape)} would go to "
                        f"{names[key]}, of shape {tuple(params[key].shape)}: the groups are "
                        "not built as they were (reordered, or other tensors in them); build "
                        "them in the checkpoint's order"
                    )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (strict: every key and shape must match)."""
        self._plateau_at = -1  # (another history: its steps are not this one's)
        for name, obj in (("scheduler", self.scheduler), ("scaler", self.scaler)):
            if (obj is None) != (state[name] is None):  # (first: a scheduler's initial_lr in
                # the optimizer's groups read as another optimizer's key, a mutation round's)
                raise ValueError(
                    f"the checkpoint was written {'with' if state[name] is not None else 'without'}"
                    f" a {name} and this run is configured {'with' if obj else 'without'} one"
                )
        self.model.load_state_dict(state["model"])
        self._restore_trainable(state.get("trainable"))  # (older checkpoints: none kept)
        own = {k for g in self.optimizer.param_groups for k in g if k != "params"}
        theirs = {k for g in state["optimizer"].get("param_groups", ()) for k in g}
        foreign = sorted(theirs - own - {"params"})  # (a newer torch may add keys, never these)
        if foreign:  # another optimizer's state (a checkpoint without its config): its groups
            # replaced this one's, and the first step failed on a missing hyperparameter
            raise ValueError(
                f"its optimizer state has {', '.join(foreign)}, which this run's "
                f"{type(self.optimizer).__name__} does not: written by another optimizer"
            )
        groups = [len(g["params"]) for g in state["optimizer"].get("param_groups", ())]
        mine = [len(g["params"]) for g in self.optimizer.param_groups]
        names = self._group_names()
        kept = state.get("optimizer_names")  # (older checkpoints: none kept)
        wrong = [i for i, (a, b) in enumerate(zip(kept or (), names, strict=False))
                 if not _same_names(a, b)]  # fmt: skip
        if len(groups) == len(mine) and kept is not None and wrong:
            i = wrong[0]
            raise ValueError(  # (the groups of one's script reordered between the save and the
                # resume: each tensor took another's moments and lr, or the first step failed
                # in torch's words, a probe's)
                f"its optimizer's group {i} holds {few(kept[i])}, this run's {few(names[i])}: "
                "the groups are not built as they were (reordered, or other tensors in them); "
                "build them in the checkpoint's order"
            )
        if len(groups) == len(mine) and kept is None:  # (by shape, a checkpoint keeping no
            # names: for every one, an optimizer of one's own keeping a scalar "sum" could not
            # resume, a review's)
            self._check_state_shapes(state["optimizer"])
        if len(groups) != len(mine):  # (torch's words: "a different number of parameter
            # groups", and no way out; a probe's callback had split the groups mid-run)
            raise ValueError(
                f"its optimizer has {len(groups)} parameter groups (of {groups} parameters), "
                f"this run's {len(mine)} (of {mine}): groups added or merged during a run "
                "(a callback's add_param_group) cannot be resumed, as the checkpoint is loaded "
                "before any callback runs; build every group from the start (an optimizer "
                "factory: README, `optimizer`) and change a group's lr, or freeze its "
                "parameters, in the callback instead"
            )
        self.optimizer.load_state_dict(_own_implementation(state["optimizer"], self.optimizer))
        for name, obj in (("scheduler", self.scheduler), ("scaler", self.scaler)):
            if obj is not None:
                obj.load_state_dict(state[name])
        self.global_step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        kept = state.get("train_samples")  # (older checkpoints: none kept)
        if kept is not None and int(kept) != self.train_loader.num_samples:
            raise ValueError(
                f"its training split had {int(kept)} samples, this run's has "
                f"{self.train_loader.num_samples} (the same config: a data file rewritten at "
                "its path, a folder that grew): the epochs' order and a resumed epoch's "
                "position are another split's; start a new run (another trainer.run_id, or no "
                "trainer.resume)"
            )
        saved_order, order = state.get("data_order"), self._data_order()  # (older: none)
        changed = {k: (v, order.get(k)) for k, v in (saved_order or {}).items()
                   if v is not None and order.get(k) is not None and v != order[k]}  # fmt: skip
        if changed:
            raise ValueError(
                "the checkpoint's position in its epoch (batch "
                f"{self.batch_in_epoch}) was saved with "
                + ", ".join(f"{k}={a!r}" for k, (a, _) in changed.items())
                + ", this run has "
                + ", ".join(f"{k}={b!r}" for k, (_, b) in changed.items())
                + ": the rest of the epoch would train other samples (some twice, some never) "
                "or other windows; resume with the checkpoint's settings, or start a new run"
            )
        if not 0 <= self.batch_in_epoch <= len(self.train_loader):
            raise ValueError(
                f"batch_in_epoch {self.batch_in_epoch} is outside this data's epoch of "
                f"{len(self.train_loader)} batches (another data set or batch size?)"
            )
        self.tally.load_state_dict(self._tally_state(state))
        self._rest_due = False
        # (the steps after it are made again: their tags may be staged again; a fit that had
        # ended at a later step refused its last step's tags as staged twice, a review's)
        self.staging.taken_back(self.global_step + 1)
        self.metrics = dict(state["metrics"])
        self._validated_at = int(state.get("validated_at", _validated_step(state)))
        modes = state.get("train_modes")  # (older checkpoints: derived at fit's start)
        if modes is not None:
            named = list(self.model.named_modules())
            base = state.get("train_modes_base")
            self._modes_base = None if base is None else [
                (m, bool(base.get(n, modes.get(n, m.training)))) for n, m in named
            ]  # fmt: skip
            self._train_modes = [(m, bool(modes.get(n, m.training))) for n, m in named]
            _put_modes(self._train_modes)
            self._modes_loaded = True
        if state["loader"] is not None and hasattr(self.train_loader, "load_state_dict"):
            self.train_loader.load_state_dict(state["loader"])
        saved = [tuple(entry) for entry in state["callbacks"]]  # (module.class, state)
        for cb in self.callbacks:  # by class, in order: a resume may add or drop instruments
            name = _qualified(cb)
            # (a checkpoint from before 2026-12-05 names the class alone)
            match = next((i for i, (n, _) in enumerate(saved)
                          if n == name or n == type(cb).__name__), None)  # fmt: skip
            if match is None:  # added on this resume: one that keeps no state is not missed
                if cb.state_dict():
                    log.warning("the checkpoint holds no state for callback %s: it starts fresh",
                                type(cb).__name__)  # fmt: skip
                continue
            _named(cb, "load_state_dict", saved.pop(match)[1])
        for name, kept in saved:  # (an instrument this resume turned off: as intended)
            if kept and not name.startswith("trainer."):
                log.warning("the checkpoint's state of callback %s is not taken by any "
                            "callback of this run (dropped, or its module or class renamed)",
                            name)  # fmt: skip
        parts = dict(state.get("objective", {}))  # (older checkpoints: none kept)
        classes = state.get("objective_classes", {})  # (older: none; by key alone)
        for key, part in self._stateful_parts():
            if key in parts:
                was = classes.get(key)
                if was is not None and was != _qualified(part) and parts[key]:
                    raise ValueError(
                        f"the checkpoint's {key} state is a {was}'s, and this run's {key} is a "
                        f"{_qualified(part)}: resume with the checkpoint's {key}, or start a new "
                        "run"
                    )
                _named(part, "load_state_dict", parts.pop(key))
            elif part.state_dict():
                log.warning("the checkpoint holds no state for %s %s: it starts fresh",
                            key, type(part).__name__)  # fmt: skip
        for key, kept in parts.items():  # (a part this run has not: as callbacks are said)
            if kept:
                log.warning("the checkpoint's state of %s %s is not taken by this run, which "
                            "has no such part: dropped", key,
                            classes.get(key, "(class not kept)"))  # fmt: skip

    def _agree_on_validation(self, names: list[str], failed: Exception | None) -> None:
        """Data-parallel: raise on every rank where a rank's validation failed (the failing
        rank its own error; the others one naming the rank and its error, which rank 0's
        metrics.json records) or reported other names (two small collectives at most)."""
        try:
            same, failing = agree(names, failed is not None, self.device)
            said = all_gather_objects(_described(failed)) if failing else []
        except Exception as e:  # (a collective failing after a device error: both kept)
            if failed is not None:
                raise e from failed
            raise
        if failed is not None:
            raise failed
        if failing:
            raise RuntimeError(
                f"data-parallel: validation failed on rank {failing[0]}"
                f"{f' (and {len(failing) - 1} more)' if len(failing) > 1 else ''}: "
                f"{said[failing[0]]}"
            )
        if not same:
            raise ValueError(
                f"data-parallel: loss {type(self.criterion).__name__}'s val_sums reported other "
                f"names on another rank than {names} on rank {self.world.rank}: every rank must "
                "report the same names"
            )

    def _data_order(self) -> dict[str, Any]:
        """What a position in the epoch (``batch_in_epoch``) means: the global batch's size,
        the order's shuffle and seed, ``drop_last`` and the accumulation's window (None where
        a loader of one's own keeps no such attribute: not compared). Data-parallel, the
        global batch: a resume on other processes with the same global batch is the same."""
        loader = self.train_loader
        sampler = getattr(loader, "sampler", None)

        def read(name: str) -> Any:
            value = getattr(loader, name, getattr(sampler, name, None))
            return value if isinstance(value, bool | int) else None

        return {"global_batch_size": read("global_batch_size"), "shuffle": read("shuffle"),
                "seed": read("seed"), "drop_last": read("drop_last"),
                "accumulate_grad_batches": self.accumulate}  # fmt: skip

    def _prepare_weighting(self) -> None:
        """The weighting (vector mode) prepared for this Trainer's loss and world, as
        ``trainer.run`` prepares it (:func:`trainer.weighting.prepare`: data-parallel, a
        hand-built Trainer's normalized each rank's part alone, a probe's), and its table
        read for them (:func:`trainer.weighting.check_set_up`)."""
        weighting = self.objective.weighting
        if weighting is not None:
            prepare(weighting, self.criterion, self.world, "weighting")
            check_set_up(weighting, self.criterion)

    def _stateful_parts(self) -> list[tuple[str, Stateful]]:
        """The objective's parts that may keep state (:class:`Stateful`), by the key a
        checkpoint keeps them under: ``loss``, ``weighting``, ``regularizer.<name>``."""
        parts: list[tuple[str, Any]] = [("loss", self.criterion),
                                        ("weighting", self.objective.weighting)]  # fmt: skip
        parts += [(f"regularizer.{r.name}", r) for r in self.objective.regularizers]
        penalty = self.objective.input_penalty  # (a subclass of one's own: an annealed λ)
        if penalty is not None:
            parts.append((f"regularizer.{penalty.name}", penalty))
        return [(k, p) for k, p in parts if isinstance(p, Stateful)]

    def _restore_trainable(self, saved: dict[str, bool] | None) -> None:
        """Set ``requires_grad`` as the checkpoint had it. A callback that unfroze a layer
        mid-run (``on_train_step_end`` at step k) does not run again on a resume past k: without
        this the resumed run trained that layer frozen, exact in nothing after the checkpoint."""
        if saved is None:
            return
        names = [n for n, _ in self._all_params]
        if sorted(saved) != sorted(names):
            raise ValueError(
                f"the checkpoint's parameters ({len(saved)}) are not this model's ({len(names)})"
            )
        restored = [n for n, p in self._all_params if p.requires_grad != bool(saved[n])]
        if not restored:
            return
        for n, p in self._all_params:
            p.requires_grad_(bool(saved[n]))
        log.info(
            "requires_grad as the checkpoint had it: %s%s",
            ", ".join(f"{n}={bool(saved[n])}" for n in restored[:5]),
            " …" if len(restored) > 5 else "",
        )  # fmt: skip
        self._follow_trainable(fire=False)

    def _tally_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """This rank's part of the checkpoint's loss tally: its own (data-parallel, gathered
        from every rank), or, resumed on another number of processes (one process's checkpoint
        on several included), every saved rank's losses on the first rank and none on the
        others (train/loss then averages the same losses, in another order: equal up to
        rounding)."""
        ranks = state.get("tally_ranks") or [state]  # (one process saved it)
        if len(ranks) == self.world.size:
            return ranks[self.world.rank]
        if self.world.rank != 0:
            empty = LossTally(self.device, self.token_losses)
            return empty.state_dict()
        return LossTally.merged(ranks)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The loss's validation metrics (val/loss, and val/acc or val/mse by task) and the
        epoch's mean train/loss. The model is left in eval mode (in fit, :meth:`validate`
        puts the training modes back after ``on_validation_end``)."""
        self.model.eval()
        broadcast_buffers(self.model)  # (data-parallel: the model rank 0 checkpoints)
        # (metric, [sum, count]), summed over the batches in float64 (a float64 model's
        # sums as they are; float32 ones without rounding their running total)
        wide = sum_dtype(self.device)
        names: list[str] | None = None  # what is summed (checked: losses.val_keys)
        reported: frozenset[str] = frozenset()  # what each batch must report
        sums: Tensor | None = None
        failed: Exception | None = None
        try:
            for i, (x, y, _) in enumerate(self.val_loader):
                if self.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                with self._autocast():
                    output = self.model(x)
                batch = self.criterion.val_sums(output, y)
                if names is None:
                    names, reported = val_keys(self.criterion, batch, self.device)
                    sums = torch.zeros(len(names), 2, dtype=wide, device=self.device)
                elif not isinstance(batch, dict) or batch.keys() != reported:
                    same_val_keys(self.criterion, batch, reported, i)  # (raises: both named)
                else:
                    check_pairs(self.criterion, batch, self.device)
                assert sums is not None
                sums += torch.stack([batch[k] for k in names])
        except Exception as e:  # data-parallel: said to every rank first (else the others
            if not self.world.distributed:  # failed on the collective's error, a review's)
                raise
            failed = e
        if self.world.distributed:  # the same names on every rank, or sums of other metrics
            self._agree_on_validation(names or [], failed)  # (raises where one failed)
        if names is None or sums is None:  # no validation batch (on every rank alike): NaN
            names = list(self.criterion.metrics)
            sums = torch.zeros(len(names), 2, dtype=wide, device=self.device)
        train = self.tally.epoch_parts()  # [Σ, count] on the device (no copy)
        both = all_reduce_sum(torch.cat([sums, train[None]]))
        # host sync: once per validation (data-parallel: summed over the ranks)
        rows = both.tolist()
        pairs = {k: (s, n) for k, (s, n) in zip(names, rows[:-1], strict=True)}
        metrics, extra = finished_metrics(self.criterion, pairs)
        if extra and not self._told_extra_metrics:
            self._told_extra_metrics = True
            log.warning(
                "validation metrics %s of loss %s are not in its metrics: those under val/ "
                "reach TensorBoard and the epoch lines, the others nothing, and none reaches "
                "metrics.json, the run's summary or HPARAMS or can be the monitor (list them "
                "in the loss's metrics, or leave them out of finalize)",
                extra, type(self.criterion).__name__,
            )  # fmt: skip
        return {"train/loss": mean_of(*rows[-1]), **metrics}
