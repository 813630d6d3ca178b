"""Weighting strategies for ``loss.mode=vector``: per-sample losses -> detached gradient weights.

A strategy maps one batch's ``(losses, logits, targets, indices)`` to raw weights r >= 0 of shape
(B,); ``normalize`` turns them into the weights w passed to ``losses.backward(gradient=w)``:

* ``mean``: w_i = r_i / sum_j r_j. The weights sum to 1 over the batch (a weighted mean of the
  losses); uniform gives 1/B, the same gradients as ``loss.mode=scalar``.
* ``sum``: w_i = B r_i / sum_j r_j. The weights average 1 (a weighted sum of the losses); uniform
  gives 1, the gradient of the summed loss.
* ``none``: w_i = r_i, as the strategy gives them.

Per-token losses (B, T) (trainer/losses.py) take weights of their full shape (B, T). The loss
gives each token a unit weight u (1 on valid tokens, 0 on padding; 1/nᵢ on sequence i's tokens
with ``loss.average=sequences``) and a strategy's raw weights multiply it: a per-sequence
strategy's r of shape (B,) is broadcast explicitly, r_i u_it, a per-token one's r of shape
(B, T) elementwise, r_it u_it. Sums run over every element: ``mean`` gives w = r u / Σ r u
(uniform: the loss's own average, the same gradients as scalar mode), ``sum`` scales that by Σ u
(uniform: w = u), ``none`` gives r u. Raw weights of any other shape are an error.

A batch whose raw weights are all 0 gets w = 0 (it contributes nothing) under every mode. The
batch total sum_j r_j is taken by :meth:`Weighting.batch_total`, the one place a data-parallel run
replaces by a sum over the global batch. Weights never carry autograd history: strategies receive
detached tensors.

Strategies (r_i for sample i with label y_i, data-set index n_i):

* ``uniform``: r_i = 1.
* ``class_balanced``: r_i = N / (K n_{y_i}), inverse class frequency over the training split (N
  samples, K classes, n_k samples of class k; a class absent from it gets 0). Under ``mean`` this
  is ``CrossEntropyLoss(weight=c, reduction="mean")``, which divides by the sum of the selected
  class weights.
* ``per_class``: r_i = c_{y_i} for an explicit list c of K weights.
* ``per_sample``: r_i = s_{n_i}, from a file of one weight per training sample.
* ``focal``: r_i = (1 - p_i)^gamma, p_i the detached softmax probability of the true class
  (read off the loss, p_i = exp(-l_i), when the losses are plain cross-entropy).
* ``hard_topk``: r_i = 1 for the k highest-loss samples of the batch (or a fraction of it), else 0.
* ``per_token`` (sequence losses): r_it = (N / (V' n_{y_it}))^power, the inverse frequency of
  the target token y_it over the training split's N valid target tokens (n_v of token v, V'
  distinct tokens seen; power 0.5 by default, a smoothed inverse frequency): rare tokens count
  more.

To add a strategy: subclass :class:`Weighting`, implement :meth:`~Weighting.raw` (and
:meth:`~Weighting.setup` if it needs the data), add a schema to trainer/config.py and a file to
configs/weighting/.
"""

from __future__ import annotations

import abc
import copy
import functools
import hashlib
import logging
import math
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.backward import WeightError
from trainer.callbacks import Stateful
from trainer.config import ConfigError, ContractError
from trainer.distributed import (
    SINGLE,
    World,
    all_gather_cat,
    all_reduce_max,
    all_reduce_sum,
    shard_sizes,
)
from trainer.losses import units_dtype
from trainer.precision import widen

if TYPE_CHECKING:
    from trainer.data.base import DataModule
    from trainer.losses import Loss

log = logging.getLogger(__name__)

NORMALIZE = ("mean", "sum", "none")


class WeightFileError(ValueError):
    """A per-sample weight file that cannot be used; the message names the file and the cause."""


def _describe_bad(values: Tensor, what: str) -> str | None:
    """None if every value is finite and >= 0, else a message naming the first bad indices."""
    bad = (~torch.isfinite(values)) | (values < 0)
    if not bool(bad.any()):
        return None
    return f"{what} must be finite and >= 0; bad at {_shown(values, bad)}"


def _version(t: object) -> Any:
    """A tensor's version counter (None for anything else, and for a tensor made under
    ``torch.inference_mode()``, which has none: reading it raised, naming nothing, a
    review's); of a tuple, list or dict of tensors (a model's output), each one's."""
    if isinstance(t, (tuple, list)):
        return tuple(_version(o) for o in t)
    if isinstance(t, dict):
        return tuple(_version(o) for o in t.values())
    return t._version if isinstance(t, Tensor) and not t.is_inference() else None


def _detached(output: Any) -> Any:
    """The model's output detached: a tensor, or each tensor of a tuple, list or dict of them
    (a model with an auxiliary head; ``logits.detach()`` stopped such a run at its first step
    under any weighting but uniform, also one reading the targets alone: a probe's)."""
    if isinstance(output, Tensor):
        return output.detach()
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # (a namedtuple: GoogLeNet's
        # outputs in training; built from one generator it failed, a review's)
        return type(output)(*(_detached(o) for o in output))
    if isinstance(output, (tuple, list)):
        return type(output)(_detached(o) for o in output)
    if isinstance(output, dict):  # (a subclass kept: transformers' ModelOutput, read by name)
        out = copy.copy(output)
        for k, v in output.items():
            out[k] = _detached(v)
        return out
    return output


def _class_name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _own(w: object) -> bool:
    """Whether ``w`` is a strategy of one's own (not one of this module's)."""
    return type(w).__module__ != __name__


def _shown(values: Tensor, bad: Tensor) -> str:
    """The first bad entries of ``values`` as ``[i]=v``, and how many more."""
    idx = bad.nonzero().flatten()
    shown = ", ".join(f"[{i}]={values[i].item():g}" for i in idx[:5].tolist())
    return shown + (f" and {len(idx) - 5} more" if len(idx) > 5 else "")


@functools.cache
def _least(dtype: torch.dtype) -> float:
    """The smallest positive number of ``dtype`` (a subnormal one)."""
    zero = torch.zeros((), dtype=dtype)
    return float(torch.nextafter(zero, torch.ones((), dtype=dtype)))


def _check_float32(values: Tensor, what: str) -> None:
    """Raise where a weight, finite and >= 0 in float64, is not in float32 (the losses' dtype
    for float32 and bfloat16 models, whose weights are rounded to it): Inf past its largest
    value (the run went NaN), 0 below its smallest (a file of 1e-50: every gradient 0)."""
    f = values.float()
    # (a subnormal one too, 1e-40, which the message's range leaves out: its batch's sum was
    # raised to the smallest normal float32 as an all-zero batch's, and mean weights summed
    # to 0.034, a probe's)
    small = (f.abs() < torch.finfo(torch.float32).tiny) & (values > 0)
    bad = (torch.isinf(f) & torch.isfinite(values)) | small
    if bool(bad.any()):
        raise ValueError(
            f"{what} must be representable in float32, where the losses are weighted (between "
            f"{torch.finfo(torch.float32).tiny:.3g} and {torch.finfo(torch.float32).max:.3g}, "
            f"or 0): out of range at {_shown(values, bad)}; rescale them (only their ratios "
            "matter with normalize=mean or sum)"
        )


class Weighting(Stateful, abc.ABC):
    """Base class: subclasses implement :meth:`raw`; :meth:`__call__` normalizes."""

    #: the losses are exactly -log p_{y_i} (cross-entropy without label smoothing), so a
    #: strategy may read the true class's probability off them; set by the trainer's builder
    nll_losses: bool = False
    #: data-parallel: normalize over the global batch (all ranks' samples); set by the builder
    world: World = SINGLE
    #: data-parallel: samples in the current global batch, set by the trainer before each call
    global_size: int = 0
    #: the loss :func:`prepare` made it ready for, and the one a table was read for in setup
    _prepared_for: Loss | None = None
    #: (:func:`loss_key`; _NOT_READ on a table strategy until setup reads its table)
    _set_up_for: Any = None

    def __init__(self, normalize: str = "mean"):
        if normalize not in NORMALIZE:
            raise ValueError(
                f"weighting.normalize: got {normalize!r}, expected one of {', '.join(NORMALIZE)}"
            )
        self.normalize = normalize

    #: the strategy reads class labels (a per-class table, the true class's probability):
    #: classification losses only
    needs_classes: bool = False

    def setup(self, data: DataModule, device: torch.device) -> None:  # noqa: B027
        """Read what the strategy needs from the training split (once, before training)."""

    #: the loss has several losses per sample (tokens), each weighted (set by check_loss)
    elements: bool = False

    def check_loss(self, loss: Loss) -> None:
        """Refuse a loss this strategy cannot weight (called once, before training)."""
        elements = self.elements = loss.has_units  # several losses per sample (tokens)
        if self.per_sample_only and elements:
            raise ValueError(
                f"weighting={_config_name(self)} ranks whole samples' losses; it is not defined "
                f"for the per-element losses of {type(loss).__name__} (it defines units); use "
                "weighting=uniform or per_sample (one weight per sample)"
                + (" or per_token" if loss.task == "sequence" else "")
            )
        if self.needs_classes and loss.task != "classification":
            # (per_token for a sequence loss's tokens; hard_topk for one loss per sample: a
            # sequence loss of one's own without units takes it, and per_token refuses it)
            fits = " or per_token" if elements and loss.task == "sequence" else ""
            fits = fits if elements else " or hard_topk"
            raise ValueError(
                f"weighting={_config_name(self)} reads class labels, but the loss "
                f"{type(loss).__name__} is not a classification loss (task {loss.task}); use "
                f"weighting=uniform or per_sample{fits}"
            )

    @abc.abstractmethod
    def raw(self, losses: Tensor, logits: Tensor, targets: Tensor, indices: Tensor) -> Tensor:
        """Raw weights r >= 0, shape (B,), same dtype and device as ``losses``."""

    #: a strategy of one's own: whether :meth:`_check_raw` has looked (the first call reads
    #: its check on the host), and the steps' flag since the last read (on the device)
    _raw_checked: bool = False
    _raw_bad: Tensor | None = None
    _raw_none: Tensor
    _checked_at = 0  # the step of the last check_window

    def _check_raw(self, r: Tensor, total: Tensor | float | int | None) -> None:
        """The contract of :meth:`raw` (r finite and >= 0) for a strategy of one's own: a
        negative r trained as gradient ascent, silently with ``normalize=none`` (a negative Σr
        clamped to the smallest float made every weight -Inf with ``mean``); a NaN was named as
        a layer's gradient by the guard, or trained NaN without it. Checked with a host read
        on the first call; after it, a flag on the device, read on logging steps
        (:meth:`check_window`), so no step syncs for it."""
        bad = ~(torch.isfinite(r) & (r >= 0))
        # and a sum that overflows (finite weights of 3e38: every w = r / Inf = 0, nothing
        # trained, unsaid: a probe), where the strategy normalizes: ``total``, what it divides
        # by (the sum over every rank's samples, and over a token loss's units: each rank's
        # own sum, or Σr where Σ r·u overflowed, passed, a probe's)
        if total is None or isinstance(total, Tensor):
            over = None if total is None else ~torch.isfinite(total)
        else:  # (one known on the host, batch_total's: read there, in its own precision; a
            # tensor made of an int failed in torch's words, of a float64 one above float32's
            # range refused, a review's, and on a device it would copy from the host)
            try:  # (in the weights' dtype, where it divides them: a float32 run's total of
                # 1.2e39 made every weight 0, unsaid, a mutation round's)
                finite = abs(float(total)) <= torch.finfo(r.dtype).max
            except OverflowError:  # (an int past float64's range)
                finite = False
            over = None if finite else torch.ones((), dtype=torch.bool, device=r.device)
        if self._raw_checked:
            flag = bad.any() if over is None else bad.any() | over
            self._raw_bad = flag if self._raw_bad is None else self._raw_bad | flag
            return
        self._raw_checked = True
        flag = (bad.any() if over is None else bad.any() | over).float()
        self._raw_none = torch.zeros((), device=r.device)  # (a rank that had no call since)
        if self.world.distributed:  # (every rank raises, or none: no rank left waiting)
            flag = all_reduce_max(flag)
        if bool(flag):  # host sync: the first step only
            if bool(bad.any()):
                where = _shown(r.flatten(), bad.flatten())
            elif over is not None and bool(over):
                where = (f"weights whose sum overflows {r.dtype} (largest "
                         f"{float(r.max()):.3g}): every normalized weight would be 0")  # fmt: skip
            else:
                where = "another rank"
            raise WeightError(
                f"weighting {_class_name(self)}: raw() must return finite weights >= 0; got {where}"
            )

    def raw_problem(self) -> str | None:
        """What went wrong with this rank's raw weights since the last check, or None (its
        flag read: host sync, for a step that failed or logs)."""
        if self._raw_bad is None or not bool(self._raw_bad):
            return None
        return (
            f"the weighting {_class_name(self)} returned negative or non-finite raw weights, "
            "or weights whose sum overflows, since the last logging step (raw() must return "
            "finite weights >= 0)"
        )

    def check_window(self, step: int) -> None:
        """Raise if a strategy of one's own returned a negative or non-finite raw weight on a
        step since the last check (called on logging steps, which read the host anyway)."""
        if not self._raw_checked:  # (a built-in, or no step yet)
            return
        since, self._checked_at = self._checked_at, step
        if self._raw_bad is None and not self.world.distributed:
            return
        flag = self._raw_bad.float() if self._raw_bad is not None else self._raw_none
        self._raw_bad = None
        if self.world.distributed:  # (every rank, a flag or not: the same collectives)
            flag = all_reduce_max(flag)
        if bool(flag):  # host sync: logging steps only
            raise WeightError(
                f"weighting {_class_name(self)}: raw() returned a negative or non-finite "
                f"weight, or weights whose sum overflows, on a step from {since + 1} to "
                f"{step} (read on logging steps; r must be finite and >= 0, its sum finite)"
            )

    def _with_units(self, r: Tensor, units: Tensor) -> Tensor:
        """Raw weights times the loss's unit weights, broadcast explicitly (module docstring)."""
        if r.shape == units.shape:  # one raw weight per token
            return r * units
        if r.shape == units.shape[:1]:  # one per sequence, on each of its tokens
            return r[:, None] * units
        raise ValueError(
            f"weighting={_config_name(self)}: raw weights of shape {tuple(r.shape)} fit neither "
            f"the losses {tuple(units.shape)} nor their sequences {tuple(units.shape[:1])}"
        )

    def batch_total(self, r: Tensor) -> Tensor | float:
        """sum_j r_j over the batch (over the global batch when data-parallel). A strategy that
        knows it on the host returns a float (> 0): one division kernel instead of three."""
        return r.sum()

    #: the strategy weights per-sample losses only (it ranks or reads whole samples' losses)
    per_sample_only: bool = False

    def __call__(
        self,
        losses: Tensor,
        logits: Tensor,
        targets: Tensor,
        indices: Tensor,
        units: Tensor | None = None,
    ) -> Tensor:
        """The weights w, of the losses' shape; ``units``: the loss's unit weights (None for
        per-sample losses, see :meth:`trainer.losses.Loss.units`)."""
        # detached inputs, so no autograd history (and no no_grad context to enter per step)
        # (float16/bfloat16 losses' weights and sums in float32, units_dtype: a float16 Σr
        # passed 65504 and every weight was r / Inf = 0, no gradient and no NaN; bfloat16 kept
        # 3 digits of each weight)
        dtype = units_dtype(losses.dtype)
        own = _own(self)
        inputs = (losses, logits, targets, indices)
        versions = [_version(t) for t in inputs] if own else []
        r = self.raw(losses.detach(), _detached(logits), targets, indices)
        if own and versions != [_version(t) for t in inputs]:
            # (metadata: a raw() clamping the losses in place changed the train/loss the
            # trainer logs from them, unsaid: a probe's 0.5 for 2.27)
            changed = [name for name, t, v in zip(("losses", "logits", "targets", "indices"),
                                                  inputs, versions, strict=True)
                       if _version(t) != v]  # fmt: skip
            raise WeightError(
                f"weighting {_class_name(self)}: raw() changed its {', '.join(changed)} in place "
                "(the trainer logs train/loss and the metrics from them, and the backward needs "
                "them as they were): compute the weights out of place (losses.clamp(...), not "
                "losses.clamp_(...))"
            )
        if not isinstance(r, Tensor):
            raise WeightError(
                f"weighting {_class_name(self)}: raw() returned a {type(r).__name__}, not a "
                "tensor of weights"
            )
        if r.requires_grad or r.device != losses.device:  # (metadata: the backward's own
            # error named neither the weighting nor raw(): a probe)
            why = ("require grad (computed from parameters?): weights are constants of the "
                   "backward; detach them" if r.requires_grad
                   else f"are on {r.device}, the losses on {losses.device}")  # fmt: skip
            raise WeightError(f"weighting {_class_name(self)}: raw() returned weights that {why}")
        if not r.is_floating_point():  # (cast, an integer weight rounded: (ℓ/max ℓ).long()
            # trained the hardest sample alone, unsaid, a probe's)
            raise WeightError(
                f"weighting {_class_name(self)}: raw() returned {r.dtype} weights; weights are "
                f"real numbers (the losses' are {losses.dtype}): return floating-point ones "
                "(an integer or boolean one is a rounding or a mask: multiply the losses' "
                "weights by a float mask instead)"
            )
        r = r.to(dtype)  # (another floating dtype: the losses')
        if units is None and r.shape != losses.shape:
            raise WeightError(
                f"weighting {_class_name(self)}: raw() returned weights of shape "
                f"{tuple(r.shape)} for losses of shape {tuple(losses.shape)} (one per sample)"
            )
        raw = r  # (the built-ins' are finite and >= 0: tested; one's own's checked below)
        if units is not None:
            units = units.to(dtype)
            r = self._with_units(r, units)
        # (an all-zero batch gives w = 0 instead of 0/0: its sum raised to the smallest
        # float, a subnormal one; to the smallest normal one, positive sums below it were
        # raised too, and mean weights of 1e-40 summed to 0.034, a probe's)
        least = _least(r.dtype)
        if self.normalize == "none":
            if own:
                self._check_raw(raw, None)
            return r
        if units is not None:  # sums over every element; uniform sum-normalized: w = u
            r_sum, u_sum = r.sum(), units.sum()
            if self.world.distributed:  # over every rank's tokens
                r_sum, u_sum = all_reduce_sum(torch.stack([r_sum, u_sum.to(r.dtype)]))
            if own:
                self._check_raw(raw, r_sum)
            total = r_sum.clamp_min(least)
            if self.normalize == "sum":  # (the scale kept finite: of an all-zero batch, Σu /
                # the least float was Inf, and 0 · Inf NaN on every token, a review's)
                return r * (u_sum / total).clamp_max(torch.finfo(r.dtype).max)
            return r / total
        if self.world.distributed:  # Σr and the sample count over every rank's part
            count = torch.full((), float(r.numel()), dtype=r.dtype, device=r.device)
            r_sum, n = all_reduce_sum(torch.stack([r.sum(), count]))
            if own:
                self._check_raw(raw, r_sum)
            w = r / r_sum.clamp_min(least)
            return w * n if self.normalize == "sum" else w
        batch_total = self.batch_total(r)
        if own:
            self._check_raw(raw, batch_total)
        if isinstance(batch_total, Tensor):
            batch_total = batch_total.clamp_min(least)
        w = r / batch_total
        return w * r.numel() if self.normalize == "sum" else w


class UniformWeighting(Weighting):
    """r_i = 1 for every sample."""

    def raw(self, losses: Tensor, logits: Tensor, targets: Tensor, indices: Tensor) -> Tensor:
        return torch.ones_like(losses)

    def __call__(
        self,
        losses: Tensor,
        logits: Tensor,
        targets: Tensor,
        indices: Tensor,
        units: Tensor | None = None,
    ) -> Tensor:
        if units is not None:  # the loss's own average: w = u / Σu (mean), u (sum, none)
            u = units.to(units_dtype(losses.dtype))
            if self.normalize != "mean":
                return u
            # data-parallel: Σu over every rank's tokens
            return u / all_reduce_sum(u.sum()).clamp_min(_least(u.dtype))
        if self.world.distributed:  # 1 / the global batch's size, which needs the ranks' counts
            return super().__call__(losses, logits, targets, indices)
        # one fill instead of ones / ones.sum(): the same values (tested), one kernel
        value = 1.0 / losses.numel() if self.normalize == "mean" else 1.0
        return torch.full_like(losses, value, requires_grad=False)


def _config_name(w: Weighting) -> str:
    """``ClassBalancedWeighting`` -> ``class_balanced``; a strategy of one's own by its
    ``_target_`` (no config file has the name its class would give)."""
    import re

    if _own(w):
        return _class_name(w)
    name = type(w).__name__.removesuffix("Weighting")
    return _NAMES.get(name) or re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


#: the config names the rule above would spell otherwise
_NAMES = {"HardTopK": "hard_topk"}


def _class_count(data: DataModule, strategy: str) -> int:
    if getattr(data, "train_target_rows", None) is not None:
        raise ValueError(
            f"weighting={strategy} weights each sample by its class label: the data module "
            f"{type(data).__name__}'s training targets are sequences of variable length, not one "
            "class label per sample; weight their tokens with weighting=per_token, or use "
            "weighting=uniform or per_sample"
        )
    if data.num_classes is None or data.train_targets is None:
        missing = (
            "sets no num_classes" if data.num_classes is None else
            "has no training targets to count (a Dataset needs a .targets attribute of int64 "
            "labels; tensors: TensorSplit's y)"
        )  # fmt: skip
        raise ValueError(
            f"weighting={strategy} needs class counts: the data module "
            f"{type(data).__name__} {missing}; set it, or use weighting=uniform, per_sample or "
            "hard_topk"
        )
    return data.num_classes


def prepare(weighting: Any, loss: Loss, world: World, where: str) -> None:
    """Make ``weighting`` ready to weight ``loss``'s losses on ``world`` (before training,
    from ``trainer.run`` and from every :class:`~trainer.loop.Trainer`): a
    :class:`Weighting` with a ``normalize``, a loss it can weight (:meth:`Weighting.check_loss`),
    told whether the losses are -log p_y and which processes share the global batch. A
    ``Trainer`` built by hand did none of this: data-parallel, each rank normalized its own
    part while the objective multiplied by the ranks for DDP's average (a step's gradient
    1.9× the global batch's weighted mean on two ranks, unsaid), and a strategy its per-token
    loss cannot take failed at the first step in torch's words (a probe's). ``where``: how
    the errors name it."""
    if not isinstance(weighting, Weighting):
        raise ConfigError(
            f"{where}: got a {type(weighting).__name__}, not a trainer.weighting.Weighting "
            "(subclass it and implement raw())"
        )
    if getattr(weighting, "normalize", None) not in NORMALIZE:  # (its own __init__ skipped
        raise ConfigError(  # Weighting's: found at the first step otherwise)
            f"{where}: {type(weighting).__name__} has no normalize; its __init__ must call "
            "super().__init__(normalize=...) (trainer.weighting.Weighting)"
        )
    if weighting._prepared_for is loss and weighting.world is world:
        return  # (trainer.run's, again by its Trainer: check_loss is called once)
    weighting.check_loss(loss)
    weighting.nll_losses = loss.nll  # losses are -log p_y exactly
    weighting.world = world  # normalized over the global batch
    weighting._prepared_for = loss


#: what a Trainer built by hand with a table strategy does first, as trainer.run does
PREPARE_FIRST = (
    "call trainer.weighting.prepare(weighting, loss, world, 'weighting') and then "
    "weighting.setup(data_module, device) before building the Trainer (with that loss and "
    "world), as trainer.run does"
)


def check_set_up(weighting: Weighting, loss: Loss) -> None:
    """Refuse a built-in strategy whose table :meth:`Weighting.setup` never read (a
    ``Trainer`` built by hand: its first step failed with "'ClassBalancedWeighting' object
    has no attribute 'table'", a probe's), or read for another loss than the Trainer's (its
    units decide which tokens the table counts). A subclass of one's own with a ``setup`` of
    its own is its own (one keeping its weights elsewhere was refused, a review's)."""
    if not isinstance(weighting, _TableLookup) or type(weighting).setup.__module__ != __name__:
        return
    if not hasattr(weighting, "table"):
        raise ContractError(
            f"weighting {type(weighting).__name__} reads its table from the training split in "
            f"setup(data, device), never called: {PREPARE_FIRST}"
        )
    was = weighting._set_up_for
    if was is _NOT_READ or was == loss_key(loss):
        return
    if loss.has_units or (was is not None and was[1]):  # (what it counted differs)
        other = "no loss" if was is None else f"another loss ({was[0]}, {dict(was[2])})"
        mine = f"{loss_key(loss)[0]} {dict(loss_key(loss)[2])}"
        units = (  # (whichever side has units: the Trainer's was said to, a review's)
            f"the Trainer's, {mine}, weighs several elements per sample" if loss.has_units
            else f"that one weighs several elements per sample and the Trainer's, {mine}, "
            "does not"
        )  # fmt: skip
        raise ContractError(
            f"weighting {type(weighting).__name__}'s table was read in setup for {other} "
            f"while {units} (its units decide which the table counts): {PREPARE_FIRST}"
        )


def loss_key(loss: Loss) -> tuple[str, bool, tuple[tuple[str, Any], ...]]:
    """What a table strategy's setup read of ``loss``: its class, whether it has units, and
    its plain settings (an ``ignore_index``): a copy of a set-up weighting, or a loss built
    alike, is the same loss to it (compared by identity, a deep copy's was refused, a
    review's)."""
    plain = tuple(sorted((k, v) for k, v in vars(loss).items()
                         if isinstance(v, bool | int | float | str | type(None))))  # fmt: skip
    return type(loss).__qualname__, loss.has_units, plain


#: a table strategy's loss before its setup read what the loss weighs
_NOT_READ = object()


class _TableLookup(Weighting):
    """A table of weights on the device, in float32 (float64 for float64 losses, from the
    values as given: taken when the first such losses come)."""

    _set_up_for: Any = _NOT_READ

    table: Tensor
    _exact: Tensor | None = None  # (float64, as given; None: a table computed in float32)
    _table64: Tensor | None = None  # (``_exact`` on the device, once float64 losses came)

    def _table_for(self, losses: Tensor) -> Tensor:
        if losses.dtype != torch.float64 or self._exact is None:
            return self.table
        if self._table64 is None or self._table64.device != self.table.device:
            self._table64 = self._exact.to(self.table.device)
        return self._table64

    def _loss_prepared(self) -> None:
        """Note the loss :func:`prepare` told the strategy of as setup reads the table (None:
        none; the loss's units decide what it counts: a setup before a Trainer built by hand
        prepared it counted a per-token loss's padding, a review's): checked by
        :func:`check_set_up`."""
        loss = self._prepared_for
        self._set_up_for = None if loss is None else loss_key(loss)

    def _largest_batch(self, data: DataModule) -> int:
        """The most weights one batch sums: the global batch's samples, times each one's
        elements (tokens) for a loss that weights them one by one."""
        self._loss_prepared()
        n = data.train_loader.global_batch_size
        targets = getattr(data, "train_targets", None)
        rows = getattr(data, "train_target_rows", None)
        if self.elements and targets is not None and targets.dim() > 1:
            n *= targets[0].numel()
        elif self.elements and rows:  # (variable-length: a batch padded to the longest)
            n *= max(r.numel() for r in rows)
        return n

    def _set_table(self, values: Tensor, device: torch.device, what: str, samples: int) -> None:
        """``values`` (float64, checked finite and >= 0) as the table: float32 on ``device``,
        and as given for float64 losses; refused where float32 cannot hold them, or their
        sum over ``samples`` (a batch's at most: :meth:`_largest_batch`) would pass its
        largest value (r / Σr = 0)."""
        _check_float32(values, what)
        # (normalize=none forms no sum: refused there, a legitimate table was, a review's)
        if self.normalize != "none" and (
            float(values.max()) * max(samples, 1) > torch.finfo(torch.float32).max
        ):
            units = "tokens" if self.elements else "samples"
            raise ValueError(
                f"{what}: the largest, {float(values.max()):g}, summed over a batch (up to "
                f"{samples} {units}) would pass float32's largest value, and every normalized "
                "weight would be 0; rescale them (only their ratios matter with normalize=mean "
                "or sum)"
            )
        self._exact, self._table64 = values, None
        self.table = values.float().to(device)


class _ClassTable(_TableLookup):
    """r_i = table[y_i] for a per-class table on the device."""

    needs_classes = True

    def raw(self, losses: Tensor, logits: Tensor, targets: Tensor, indices: Tensor) -> Tensor:
        return self._table_for(losses)[targets]


class ClassBalancedWeighting(_ClassTable):
    """r_i = N / (K n_{y_i}): inverse class frequency over the training split."""

    def setup(self, data: DataModule, device: torch.device) -> None:
        k = _class_count(data, "class_balanced")
        assert data.train_targets is not None
        counts = torch.bincount(data.train_targets.cpu().long(), minlength=k).double()
        n = counts.sum()
        table = torch.where(counts > 0, n / (k * counts.clamp_min(1)), 0.0)
        self.class_weights = table.float()  # (K,), what CrossEntropyLoss(weight=...) would take
        self.table = self.class_weights.to(device)
        self._exact, self._table64 = table, None  # (float64 losses: the float64 ratios)


class PerClassWeighting(_ClassTable):
    """r_i = weights[y_i] for an explicit list of one weight per class."""

    def __init__(self, weights: list[float], normalize: str = "mean"):
        super().__init__(normalize)
        self.weights = torch.tensor([float(w) for w in weights], dtype=torch.float64)
        problem = _describe_bad(self.weights, "weighting.weights")
        if problem:
            raise ValueError(problem)

    def setup(self, data: DataModule, device: torch.device) -> None:
        _class_count(data, "per_class")
        if len(self.weights) != data.num_classes:
            raise ValueError(
                f"weighting.weights: got {len(self.weights)} weights but the data has "
                f"{data.num_classes} classes; give one weight per class"
            )
        labels = getattr(data, "train_targets", None)  # (validation is not weighted)
        if labels is not None and labels.numel() and labels.dtype != torch.bool and not (
            labels.is_floating_point()
        ) and not 0 <= int(labels.min()) <= int(labels.max()) < len(self.weights):  # fmt: skip
            raise ValueError(
                f"weighting=per_class: the training split's labels span "
                f"[{int(labels.min())}, {int(labels.max())}], past its {len(self.weights)} "
                "weights (one per class, 0 to num_classes - 1)"
            )
        self._set_table(self.weights, device, "weighting.weights", self._largest_batch(data))


class PerSampleWeighting(_TableLookup):
    """r_i = s[n_i], one weight per training sample, read from a .pt, .npy or .csv file.

    The file holds a 1-D sequence of N numbers, N the size of the training split, indexed like
    the batches' ``index`` (see README, "Data"). ``.pt`` loads with ``weights_only=True``; ``.csv``
    holds one number per line (or comma-separated), no header.
    """

    def __init__(self, path: str, normalize: str = "mean"):
        super().__init__(normalize)
        self.path = Path(path)
        #: the SHA-256 of the weights read (float64 bytes), kept in a checkpoint
        self.digest: str | None = None

    def state_dict(self) -> dict[str, Any]:
        """The weights' digest: a resume reads the file again, and one rewritten since at the
        same path resumed silently and trained on other weights (a probe's), the config
        (``weighting.path``) unchanged."""
        return {"weights_sha256": self.digest} if self.digest is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse weights other than the checkpoint's (an older checkpoint keeps no digest)."""
        kept = state.get("weights_sha256")
        if kept is None and self.digest is not None:
            log.warning(
                "weighting.path: the checkpoint keeps no digest of the weights its run read "
                "from %s (written before 2026-12-07): the file is not checked against them",
                self.path,
            )
        if kept is not None and self.digest is not None and kept != self.digest:
            raise WeightFileError(
                f"weighting.path: {self.path} holds other weights than the run being resumed "
                f"trained with (SHA-256 {self.digest[:12]}… now, {kept[:12]}… in the "
                "checkpoint): a resume continues that run exactly; put the file back as it "
                "was, or start a new run"
            )

    def load(self) -> Tensor:
        path = self.path
        if not path.is_file():
            raise WeightFileError(f"weighting.path: per-sample weight file {path} does not exist")
        suffix = path.suffix.lower()
        try:
            if suffix == ".pt":
                values = torch.load(path, map_location="cpu", weights_only=True)
            elif suffix == ".npy":
                import numpy as np

                values = torch.from_numpy(np.load(path, allow_pickle=False))
            elif suffix == ".csv":
                text = path.read_text().replace(",", "\n").split()
                values = torch.tensor([float(v) for v in text], dtype=torch.float64)
            else:
                raise WeightFileError(
                    f"weighting.path: {path} has suffix {suffix!r}; expected .pt, .npy or .csv"
                )
        except WeightFileError:
            raise
        except Exception as e:
            raise WeightFileError(f"weighting.path: could not read {path}: {e}") from e
        numeric = isinstance(values, Tensor) and (
            values.dtype.is_floating_point
            or values.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
        )
        if not numeric:
            kind = values.dtype if isinstance(values, Tensor) else type(values).__name__
            raise WeightFileError(
                f"weighting.path: {path} must hold a 1-D tensor of numbers, got {kind}"
            )
        if values.ndim != 1:
            raise WeightFileError(
                f"weighting.path: {path} holds shape {tuple(values.shape)}; expected 1-D (N,)"
            )
        return values.detach().double()  # (a tensor saved off a graph: its values)

    def setup(self, data: DataModule, device: torch.device) -> None:
        values = self.load()
        values = values.detach() if isinstance(values, Tensor) else values  # (a subclass's)
        n = data.train_loader.num_samples
        if len(values) != n:
            raise WeightFileError(
                f"weighting.path: {self.path} has {len(values)} weights but the training split "
                f"has {n} samples; give one weight per training sample"
            )
        problem = _describe_bad(values, f"weights in {self.path}")
        if problem:
            raise WeightFileError(f"weighting.path: {problem}")
        if not values.any():
            raise WeightFileError(
                f"weighting.path: every weight in {self.path} is 0: no sample would contribute "
                "to any gradient"
            )
        try:
            self._set_table(values, device, f"weights in {self.path}", self._largest_batch(data))
        except ValueError as e:
            raise WeightFileError(f"weighting.path: {e}") from None
        flat = values.detach().cpu().double().contiguous()  # (a subclass's load: any tensor)
        self.digest = hashlib.sha256(flat.numpy().tobytes()).hexdigest()

    def raw(self, losses: Tensor, logits: Tensor, targets: Tensor, indices: Tensor) -> Tensor:
        return self._table_for(losses)[indices]


class FocalWeighting(Weighting):
    """r_i = (1 - p_i)^gamma, p_i = softmax(logits_i)[y_i], detached (Lin et al., 2017)."""

    needs_classes = True

    def __init__(self, gamma: float = 2.0, normalize: str = "mean"):
        super().__init__(normalize)
        if not (gamma >= 0 and math.isfinite(gamma)):
            raise ValueError(f"weighting.gamma: got {gamma}, must be finite and >= 0")
        self.gamma = gamma

    def raw(self, losses: Tensor, logits: Tensor, targets: Tensor, indices: Tensor) -> Tensor:
        # (in float32 at least: a float64 model's weights in float64)
        if self.nll_losses:  # l_i = -log p_i, so 1 - p_i = -expm1(-l_i): 3 kernels, no softmax
            # (+ 0.0: a loss of -0.0 or 0.0, a sample certain in float32, gave a weight of
            # -0.0, which clamp_min keeps: weights/min logged -0.0, a probe)
            return torch.expm1(-widen(losses)).neg_().clamp_min_(0.0).add_(0.0).pow_(self.gamma)
        if not isinstance(logits, Tensor):  # (a loss of one's own: no -log p to read)
            raise WeightError(
                f"weighting=focal reads the model's output as class logits (B, K), but the "
                f"model returned a {type(logits).__name__}; return the logits as a tensor, or "
                "weight the samples with a weighting of your own reading the part it needs"
            )
        p = F.softmax(widen(logits), dim=-1).gather(1, targets[:, None]).squeeze(1)  # (B,)
        return (1.0 - p).clamp_min(0.0).add_(0.0).pow_(self.gamma)


class HardTopKWeighting(Weighting):
    """r_i = 1 for the ``k`` (if > 0, else ``ceil(fraction * B)``) highest-loss samples."""

    per_sample_only = True

    def __init__(self, k: int = 0, fraction: float = 0.25, normalize: str = "mean"):
        super().__init__(normalize)
        if k < 0 or (k == 0 and not 0.0 < fraction <= 1.0):
            raise ValueError(
                f"weighting: need weighting.k > 0 or weighting.fraction in (0, 1]; got k={k}, "
                f"fraction={fraction}"
            )
        self.k, self.fraction = k, fraction

    def count(self, batch_size: int) -> int:
        """k, or ⌈fraction · B⌉ of the fraction as written (0.28 · 25 is 7.000000000000001
        in binary floating point: its ceiling kept 8 samples for 7)."""
        if self.k > 0:
            return min(self.k, batch_size)
        return max(1, math.ceil(Fraction(repr(float(self.fraction))) * batch_size))

    def setup(self, data: DataModule, device: torch.device) -> None:
        batch = data.train_loader.global_batch_size
        if self.k >= batch:
            log.warning(
                "weighting=hard_topk: k=%d keeps every sample of a batch of %d, so it trains as "
                "weighting=uniform does (up to rounding with accumulation: its weights take a "
                "micro-batch's share of the window in two roundings); give k below the batch "
                "size, or a fraction",
                self.k, batch,
            )  # fmt: skip

    def raw(self, losses: Tensor, logits: Tensor, targets: Tensor, indices: Tensor) -> Tensor:
        if self.world.distributed:  # the top k of the global batch: every rank's losses
            everyone, offset = all_gather_cat(losses, shard_sizes(self.global_size, self.world))
            top = torch.topk(everyone, self.count(everyone.numel()), sorted=False).indices
            mask = torch.zeros_like(everyone).index_fill_(0, top, 1.0)
            return mask[offset : offset + losses.numel()]
        top = torch.topk(losses, self.count(losses.numel()), sorted=False).indices
        return torch.zeros_like(losses).index_fill_(0, top, 1.0)

    def batch_total(self, r: Tensor) -> Tensor | float:
        return float(self.count(r.numel()))  # exactly count() ones: known without a kernel


class PerTokenWeighting(_TableLookup):
    """r_it = (N / (V' n_{y_it}))^power: inverse target-token frequency (sequence losses)."""

    def __init__(self, power: float = 0.5, normalize: str = "mean"):
        super().__init__(normalize)
        if not (power >= 0 and math.isfinite(power)):
            raise ValueError(f"weighting.power: got {power}, must be finite and >= 0")
        self.power = power
        self._units: Any = None  # the loss's units (check_loss)

    def check_loss(self, loss: Loss) -> None:
        name = type(loss).__name__
        if loss.task != "sequence":
            raise ValueError(
                f"weighting=per_token weights the tokens of a sequence loss; the loss {name} "
                f"has task {loss.task!r}, not 'sequence' (loss=token_cross_entropy; a loss of "
                "one's own over class ids per position sets task = 'sequence': per_token "
                "counts each class's tokens)"
            )
        if not loss.has_units:  # (a loss of one's own with a per-sequence loss, (B,))
            raise ValueError(
                f"weighting=per_token weights each token's loss: the loss {name} gives none "
                "(it defines no units(target, dtype), so its losses are one per sequence, "
                "(B,)); return per-token losses (B, T) and implement units (README, 'Bring "
                "your own'), or use a per-sequence weighting"
            )
        # the tokens counted are those the loss's units weigh (> 0): its padding, whatever
        # id it is (a loss of one's own padding with 0 had its pads counted, a review's)
        self._units = loss.units
        super().check_loss(loss)  # (``elements``: a batch's sum is over its tokens; left
        # unset, the check of the table's sum counted samples, a review's)

    def setup(self, data: DataModule, device: torch.device) -> None:
        rows = getattr(data, "train_target_rows", None)
        if data.out_dim is None:  # (the classes each position is scored over: a language
            raise ValueError(  # model's vocabulary, a tagger's tags)
                f"weighting=per_token needs the classes each position is scored over: the "
                f"data module {type(data).__name__} sets no out_dim or vocab_size"
            )
        if data.train_targets is None and rows is None:  # (the message blamed out_dim where
            raise ValueError(  # it was set, a probe's)
                f"weighting=per_token counts the training targets' tokens: the training split "
                f"of {type(data).__name__} holds none to count (a Dataset needs a targets "
                "attribute: the samples' target sequences in order, a tensor (N, T), or a list "
                "of one tensor per sample where their lengths vary, as each sample alone "
                "comes through the Dataset's collate)"
            )
        # the tokens of sequences of one length at a time (of each as it comes alone,
        # variable-length ones), as the loss's units weigh them
        groups: dict[tuple[int, ...], list[Tensor]] = {}
        for row in [data.train_targets] if rows is None else rows:
            assert row is not None
            groups.setdefault(tuple(row.shape), []).append(row)
        tokens = torch.cat([self._tokens(ts[0] if rows is None else torch.stack(ts))
                            for ts in groups.values()])  # fmt: skip
        bad = tokens[(tokens < 0) | (tokens >= data.out_dim)]
        if bad.numel():  # (bincount's own error said nothing of where they came from)
            raise ValueError(
                f"weighting=per_token: the training targets hold ids outside [0, "
                f"{data.out_dim}) at positions the loss's units count as tokens (e.g. "
                f"{sorted(set(bad[:5].tolist()))}): the loss's units() must be 0 where a "
                "target is padding (-100, say), and the data's out_dim (its vocab_size) must "
                "cover every other target id"
            )
        counts = torch.bincount(tokens, minlength=data.out_dim).double()
        seen = int((counts > 0).sum())
        freq = torch.where(counts > 0, counts.sum() / (seen * counts.clamp_min(1)), 0.0)
        exact = freq.pow(self.power)
        # (refused past float32 and past its largest value summed over a batch's tokens: a
        # power of 25 gave a table of Inf, trained as NaN, a review's)
        self._set_table(exact, device, f"weighting=per_token's weights (power {self.power:g})",
                        self._largest_batch(data))  # fmt: skip
        self.token_weights = self.table.cpu()  # (V,), 0 for unseen tokens

    def _tokens(self, targets: Tensor) -> Tensor:
        """The ids of ``targets`` (N, T) at the positions the loss's units weigh."""
        self._loss_prepared()
        units = self._units(targets, torch.float64) if self._units is not None else None
        valid = (units > 0) if units is not None else (targets >= 0)
        return targets[valid.reshape(targets.shape)].reshape(-1).long()

    def raw(self, losses: Tensor, logits: Tensor, targets: Tensor, indices: Tensor) -> Tensor:
        # padding ids (e.g. -100) index nothing: any valid id stands in, the units zero them
        return self._table_for(losses)[targets.clamp(0, self.table.numel() - 1)]
