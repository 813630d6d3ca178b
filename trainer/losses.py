"""Loss components: per-sample losses for backward, and the task's validation metrics.

A loss maps the model's output and the batch's targets to one loss per element,
``reduction="none"``: per sample, shape (B,), or per token, shape (B, T) for sequence models.
Scalar mode backpropagates the loss's own average, vector mode a weighted sum with weights of
the losses' full shape (trainer/objective.py). The average is defined by :meth:`Loss.units`:
each element's unit weight u (None: every element 1), the average being Σ u ℓ / Σ u. For
per-token losses u masks out padding, and ``average`` says what is averaged:

* ``tokens``: u = 1 on every valid (non-padding) token: Σ ℓ / (valid tokens), the usual
  language-model loss (every token counts the same, so long sequences count more);
* ``sequences``: u = 1 / nᵢ on sequence i's nᵢ valid tokens: the mean over sequences of each
  sequence's mean token loss (every sequence counts the same).

Its ``task`` says what validation reports besides ``val/loss``:

* ``classification``: ``val/acc`` (argmax of the output against int64 labels);
* ``regression``: ``val/mse`` (mean over samples of the mean squared error over a target's
  elements);
* ``sequence``: ``val/ppl`` = exp(val/loss) with val/loss the mean over valid tokens, and
  ``val/token_acc`` (argmax over the vocabulary against the next token);
* ``None``: ``val/loss`` only.

``monitor`` is the metric a sweep optimizes by default (``val/acc`` maximized; ``val/ppl`` for
sequences, ``val/mse`` for regression, minimized); the top-level config key ``monitor``
overrides it.

A loss of your own (README, "Bring your own"): subclass :class:`Loss` and implement
:meth:`Loss.forward`, or point ``loss._target_`` at any callable ``(output, target) -> (B,)``
(a function with ``_partial_: true``), which reports ``val/loss`` only.
"""

from __future__ import annotations

import decimal
import functools
import math
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.callbacks import Stateful
from trainer.config import ConfigError, ContractError
from trainer.metrics import mean_of
from trainer.precision import wide_dtype

if TYPE_CHECKING:
    from trainer.data.base import DataModule

TASKS = ("classification", "regression", "sequence", None)
AVERAGES = ("tokens", "sequences")


class Loss(Stateful):
    """Base class: per-sample losses (:meth:`forward`) and validation metrics (:meth:`val_sums`).

    ``val_sums`` returns, for one validation batch, each metric's (sum, count) as a (2,)
    tensor; the loop adds them over the batches and the processes, divides, and hands the
    means to :meth:`finalize`, which may derive more (a sequence's perplexity, an F1 from
    true/false positive rates) and must return every name of :attr:`metrics`. Only what is a
    ratio of sums over the samples is exact this way (a maximum over the samples is not: it
    would depend on the batch size and the processes). The base class gives ``val/loss`` (the
    mean of :meth:`val_losses`) and the task's metrics.
    """

    #: ``classification``, ``regression`` or None (see the module docstring)
    task: str | None = None
    #: the losses are exactly -log p_y of a softmax over the output (plain cross-entropy): a
    #: weighting may read the true class's probability off them
    nll: bool = False

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        """Per-element losses, (B,) or (B, T), differentiable in ``output``."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward(output, target)")

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        return self.forward(output, target)

    def check(self, data: DataModule) -> None:
        """Raise :class:`ConfigError` if this loss cannot train on ``data`` (called once)."""

    def units(self, target: Tensor, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """Each loss element's unit weight u in the loss's own average Σ u ℓ / Σ u, detached,
        of the losses' shape, in ``dtype`` (the losses', float32 for float16/bfloat16 losses:
        :func:`units_dtype`); None: per-sample losses, every unit 1 (the plain mean)."""
        return None

    def check_output(self, output: Any) -> None:
        """Raise where the model's output cannot go through :meth:`val_sums` (checked on the
        first training step, not after an epoch's training): the built-in metrics take one
        tensor; a model returning a tuple or dict needs a loss overriding ``val_sums``."""
        if not isinstance(output, Tensor) and type(self).val_sums is Loss.val_sums:
            raise ContractError(
                f"the model returned a {type(output).__name__}, not a tensor: "
                f"{type(self).__name__}'s validation metrics (Loss.val_sums) take the model's "
                "output as one tensor; return the logits (or predictions) as a tensor, or "
                "override val_sums and metrics in your loss for this output"
            )

    def check_targets(self, output: Tensor, target: Tensor) -> str | None:
        """What the first training batch's output says of the task's metric in
        :meth:`val_sums`: why ``val/mse`` could not compare it with the targets, or None. The
        trainer warns with it at the first step (a regression loss of one's own whose model
        returns a mean and a log-variance trained a whole epoch, then failed naming loss=mse:
        a probe's); not an error, as validation takes the model's eval-mode output, which may
        differ (a review's false refusal), and fails there with these words if it does not."""
        if type(self).val_sums is not Loss.val_sums:
            return None
        if self.task == "classification" and "val/acc" in self.metrics:
            return _val_acc_shapes(self, output, target)
        if self.task != "regression" or "val/mse" not in self.metrics:
            return None
        return None if _comparable(output, target) else _val_mse_shapes(self, output, target)

    def val_losses(self, output: Tensor, target: Tensor) -> Tensor:
        """The per-sample losses validation averages into ``val/loss`` (default: forward's)."""
        return self.forward(output, target)

    @property
    def metrics(self) -> tuple[str, ...]:
        """The validation metrics :meth:`finalize` returns, ``val/loss`` first: each starts
        with ``val/`` (TensorBoard's tags of validation), written to ``metrics.json``, the run's
        summary and HPARAMS, and a ``monitor`` may name one."""
        extra = {
            "classification": ("val/acc",),
            "regression": ("val/mse",),
            "sequence": ("val/ppl", "val/token_acc"),
        }.get(self.task or "", ())
        return ("val/loss", *extra)

    @property
    def monitor(self) -> str:
        """What a run returns to a sweeper unless ``monitor=`` says otherwise: the task's
        metric where the loss reports it, else ``val/loss`` (a regression loss of one's own
        adding a metric of its own made that the monitored one, where the task's table says
        ``val/mse``: a probe's). Override it to monitor a metric of your own."""
        by_task = {"classification": "val/acc", "regression": "val/mse", "sequence": "val/ppl"}
        metric = by_task.get(self.task or "", "val/loss")
        # (a loss of the task whose own metrics leave the task's out, a Gaussian NLL's model
        # output no val/mse compares: val/loss, which it reports; it was refused, naming a
        # monitor nobody set, a review's)
        return metric if metric in self.metrics else "val/loss"

    def val_sums(self, output: Tensor, target: Tensor) -> dict[str, Tensor]:
        if not isinstance(output, Tensor):  # (an override calling this one with a tuple or
            # dict output: an AttributeError on its dtype after an epoch, a probe's)
            raise ContractError(
                f"{type(self).__name__}: Loss.val_sums (the base class's) takes the model's "
                f"output as one tensor, and got a {type(output).__name__}; in your val_sums, "
                "pass it the part it measures (super().val_sums(output[0], target)) or compute "
                "the sums from the output's parts"
            )
        # float32 for float32 and lower (an argmax of float16 scores would tie more often),
        # float64 as it is (a float64 model's metrics in its own precision)
        output = output if output.dtype == torch.float64 else output.float()
        n = torch.full((), float(target.shape[0]), dtype=output.dtype, device=output.device)
        losses = self.val_losses(output, target).to(output.dtype)
        units = self.units(target, losses.dtype)
        if units is not None and units.shape != losses.shape:  # (val_losses per sample)
            units = None
        if units is None:
            sums = {"val/loss": torch.stack([losses.sum(), n])}
        else:  # the loss's own average Σuℓ / Σu, as train/loss
            sums = {"val/loss": torch.stack([(losses * units).sum(), units.sum()])}
        # (the task's metric where ``metrics`` lists it: a regression loss listing only
        # val/loss, its model's output a mean and a log-variance, failed at the first
        # validation computing the val/mse it left out, a review's)
        # (an override calling this one for its val/loss, with outputs the task's metric
        # cannot take, gets it left out, for a metric of its own of that name: it was
        # refused, a review's; a listed one it does not report is named at validation)
        own = type(self).val_sums is not Loss.val_sums
        if self.task == "classification" and "val/acc" in self.metrics:
            said = _val_acc_shapes(self, output, target)
            if said is None:
                sums["val/acc"] = _accuracy(self, output, target)
            elif not own:  # (a binary classifier's one logit was argmax 0 for every sample,
                # its val/acc the share of class 0; a (B, K, H, W) output's correct pixels
                # were divided by the images; soft labels (B, K) were compared by
                # broadcasting: a probe's)
                raise ValueError(said)
        elif self.task == "regression" and "val/mse" in self.metrics:
            if not _comparable(output, target):
                if not own:
                    raise ValueError(_val_mse_shapes(self, output, target))
            elif units is not None and units.numel() == target.numel():  # per-element losses
                # with units (a sequence's steps, padded): over the elements they count (the
                # padding's NaN targets made val/mse NaN, unsaid, a probe's)
                counted = units.reshape(target.shape[0], -1) > 0
                terms = torch.where(counted, squared_elements(output, target), 0.0)
                sums["val/mse"] = torch.stack([terms.sum(), counted.sum().to(terms.dtype)])
            else:
                sums["val/mse"] = torch.stack([squared_error(output, target).sum(), n])
        elif self.task == "sequence":  # val/ppl: exp of val/loss (finalize)
            if output.ndim != target.ndim + 1 or output.shape[:-1] != target.shape:
                raise ValueError(
                    f"loss {type(self).__name__} (task sequence): val/token_acc needs logits "
                    f"(B, T, V) for targets (B, T); got {tuple(output.shape)} and "
                    f"{tuple(target.shape)} (override val_sums and metrics for other outputs)"
                )
            if units is None or units.shape != target.shape:  # a loss per sequence: the
                # tokens are those with a class index (≥ 0, and not the loss's ignore_index);
                # padding counted as a wrong token before (a probe's 0.054 for 0.103)
                valid = target >= 0
                ignore = getattr(self, "ignore_index", None)
                if isinstance(ignore, int):
                    valid = valid & (target != ignore)
                counted = valid.to(output.dtype)
            else:
                counted = (units > 0).to(output.dtype)
            hits = (output.argmax(dim=-1) == target).to(output.dtype) * counted
            correct = _unless_nonfinite(hits.sum(), output, counted > 0)
            sums["val/token_acc"] = torch.stack([correct, counted.sum()])
        return sums

    def finalize(self, values: dict[str, float]) -> dict[str, float]:
        """The metrics from the averaged sums (each :meth:`val_sums` name's sum / count), plus
        those derived from them: a sequence task's ``val/ppl`` = exp(``val/loss``) where
        ``val/ppl`` is listed in :attr:`metrics` and :meth:`val_sums` did not report it itself
        (until 2026-12-05 the base class reported it as a copy of the loss's pair and took the
        exponential only where ``val_sums`` was not overridden: a subclass adding a metric to
        ``super().val_sums(...)`` logged the mean NLL as its perplexity). What it returns
        must hold every name of :attr:`metrics` (the trainer checks at validation)."""
        if (self.task == "sequence" and "val/ppl" not in values and "val/loss" in values
                and "val/ppl" in self.metrics):  # fmt: skip
            return {**values, "val/ppl": perplexity(values["val/loss"])}
        return values

    @property
    def has_units(self) -> bool:
        """Whether the loss defines unit weights (:meth:`units`): several loss elements per
        sample (tokens), averaged as Σuℓ / Σu."""
        return type(self).units is not Loss.units


def _accuracy(loss: Loss, output: Tensor, target: Tensor) -> Tensor:
    """``val/acc``'s (correct, counted) of (B, K) scores against (B,) class indices, on the
    device (no host read): the samples whose target is a class index are counted, as a
    sequence's tokens are (not below 0, not the loss's ``ignore_index``: unlabelled samples
    were counted as wrong predictions, 0.1875 for 0.375, a review's); NaN where a counted
    target is one no argmax can equal (K or more, a fraction, NaN: 0.0 was presented as an
    accuracy, a review's), or a counted row's scores have no finite maximum."""
    counted = ~(target < 0)  # (a NaN target counted: and said below)
    ignore = getattr(loss, "ignore_index", None)
    if isinstance(ignore, int) and not isinstance(ignore, bool) and _holds(target.dtype, ignore):
        counted = counted & (target != ignore)
    bad = target >= output.shape[1]
    if target.is_floating_point():
        bad = bad | (target != target.floor())  # (NaN != NaN)
    hits = (output.argmax(dim=1) == target) & counted
    correct = torch.where((bad & counted).any(), torch.nan, hits.sum().to(output.dtype))
    correct = _unless_nonfinite(correct, output, counted)
    return torch.stack([correct, counted.sum().to(output.dtype)])


def _holds(dtype: torch.dtype, value: int) -> bool:
    """Whether targets of ``dtype`` can hold ``value`` (torch wraps one they cannot: an
    ``ignore_index`` of 256 compared with uint8 targets left class 0 out, a review's)."""
    if dtype.is_floating_point:
        return True
    if dtype == torch.bool:
        return value in (0, 1)
    info = torch.iinfo(dtype)
    return info.min <= value <= info.max


def _unless_nonfinite(correct: Tensor, output: Tensor, counted: Tensor | None = None) -> Tensor:
    """The count of correct predictions, or NaN where a counted output row (the last
    dimension: one sample's or token's scores) has no finite maximum: a NaN (which argmax reads
    as the maximum, so such a row counted as class 0, and a diverged model reported the share
    of class 0 as its accuracy), +Inf (an overflow) or every score −Inf; its loss is not
    finite either. A −Inf score of a class masked out (as language models do) still ranks.
    On the device: no host read."""
    bad = ~torch.isfinite(output.amax(dim=-1))
    if counted is not None:
        bad = bad & counted
    return torch.where(bad.any(), torch.nan, correct)


def units_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype unit weights, their sums and the coefficients u / Σu are computed in for
    losses of ``dtype``: float32 for float16/bfloat16 losses (a float16 Σu is Inf past 65504
    tokens, which zeroed every coefficient; bfloat16 keeps 3 digits of it), else ``dtype``."""
    return wide_dtype(dtype)


def check_metric_names(loss: Loss) -> None:
    """Refuse, before training, a loss's :attr:`~Loss.metrics` that are not names under
    ``val/``, each once: a name outside it reached ``metrics.json`` and never TensorBoard."""
    names = loss.metrics
    what = f"loss {type(loss).__name__}'s metrics"
    if not isinstance(names, tuple | list) or not all(isinstance(n, str) for n in names):
        raise ContractError(f"{what} must be a tuple (or list) of names; got {names!r}")
    bad = [n for n in names if not n.startswith("val/") or n == "val/"]
    if bad:
        raise ValueError(
            f"{what} {bad} are not names under 'val/': validation metrics are logged under val/ "
            "in TensorBoard (rename them, e.g. 'val/f1')"
        )
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{what} name {twice} more than once")


def val_keys(loss: Loss, sums: Any, device: torch.device) -> tuple[list[str], frozenset[str]]:
    """The names the trainer sums of the first validation batch's :meth:`~Loss.val_sums`,
    checked: a dict of (sum, count) tensors of shape (2,) on ``device``; and the names every
    later batch must report (:func:`same_val_keys`). Ordered as :attr:`~Loss.metrics`, then
    the others by name (not as reported: data-parallel, every rank must sum the same names in
    the same order, and a set's order differs between processes)."""
    check_pairs(loss, sums, device)
    listed = [k for k in loss.metrics if k in sums]
    return listed + sorted(k for k in sums if k not in listed), frozenset(sums)


def check_pairs(loss: Loss, sums: Any, device: torch.device) -> None:
    """Refuse a validation batch's :meth:`~Loss.val_sums` other than a dict of (sum, count)
    real tensors of shape (2,) on ``device``, naming the metric (every batch: a later one's
    complex pair failed in torch's words, a review's; metadata only, no host read)."""
    what = f"loss {type(loss).__name__}'s val_sums"
    if not isinstance(sums, dict):
        raise ContractError(f"{what} must return a dict of name -> (sum, count); got "
                        f"{type(sums).__name__}")  # fmt: skip
    for k, v in sums.items():
        if not isinstance(v, Tensor) or v.shape != (2,):
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(
                f"{what} must give each metric its (sum, count) as a tensor of shape (2,), "
                f"which the trainer adds over the batches and processes; got {k!r}: {got} "
                "(until 2026-12-05 a name not in metrics was ignored, whatever it held)"
            )
        if not same_device(v.device, device):
            raise ValueError(
                f"{what} gave {k!r} on {v.device}, the trainer's device is {device}: make its "
                "tensors on the model output's device"
            )
        if v.is_complex():  # (torch's "result type ComplexDouble can't be cast", naming
            raise ValueError(  # neither, after the epoch's training: a probe's)
                f"{what} gave {k!r} as a {v.dtype} pair: a metric's (sum, count) must be real "
                "numbers (report a complex quantity's real parts, e.g. its magnitude, as "
                "metrics of their own)"
            )


def same_val_keys(loss: Loss, sums: Any, first: frozenset[str], batch: int) -> None:
    """Raise where validation batch ``batch`` reported other names than the first."""
    if isinstance(sums, dict) and sums.keys() == first:
        return
    got = sorted(sums) if isinstance(sums, dict) else type(sums).__name__
    raise ValueError(
        f"loss {type(loss).__name__}'s val_sums reported {got} for validation batch {batch} "
        f"and {sorted(first)} for the first: every batch must report the same names (a count "
        "of 0 where a batch has none of a metric's samples)"
    )


def same_device(a: torch.device, b: torch.device) -> bool:
    """The same device, a device without an index standing for any of its type's (the
    trainer's ``cuda`` is the tensors' ``cuda:0`` on one GPU)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def finished_metrics(loss: Loss, pairs: dict[str, tuple[float, float]]) -> tuple[
        dict[str, float], list[str]]:  # fmt: skip
    """:meth:`~Loss.finalize` of the averaged sums (``pairs``: each name's summed (sum,
    count)), checked: a dict of real numbers (made floats) holding every name of
    :attr:`~Loss.metrics` (one missing, or a tensor, failed after the whole run, at
    ``metrics.json``, until 2026-12-05); (the metrics, :attr:`~Loss.metrics` first, and the
    names it returned beyond them: those under ``val/`` reach TensorBoard and the epoch lines
    only, the others nothing)."""
    name = type(loss).__name__
    final = loss.finalize({k: mean_of(s, n) for k, (s, n) in pairs.items()})
    if not isinstance(final, dict):
        raise ContractError(f"loss {name}'s finalize must return a dict of name -> number; got "
                        f"{type(final).__name__}")  # fmt: skip
    real = numbers.Real | decimal.Decimal
    wrong = {k: type(v).__name__ for k, v in final.items()
             if not isinstance(v, real) or isinstance(v, bool)}  # fmt: skip
    if wrong:
        raise ContractError(
            f"loss {name}'s finalize must return real numbers (a float, an int, NumPy's; "
            f"metrics.json and HPARAMS take them as floats); got {wrong} (a tensor: float(t))"
        )
    try:
        final = {k: float(v) for k, v in final.items()}
    except (OverflowError, ValueError) as e:  # (an int beyond a float, a signaling NaN)
        raise ValueError(f"loss {name}'s finalize returned a number no float holds: {e}") from e
    nll = mean_of(*pairs["val/loss"]) if "val/loss" in pairs else math.nan
    if loss.task == "sequence" and math.isclose(final.get("val/ppl", math.nan), nll,
                                                rel_tol=1e-9):  # fmt: skip
        # the mean NLL as the perplexity: val/loss's pair reported as val/ppl, which finalize
        # made exp(loss) by the built-in losses' convention until 2026-12-05 (a subclass may
        # keep it: it logged the mean NLL as val/ppl, a review's). exp(x) > x, so a
        # perplexity is never its loss's mean; over 4 processes the two sums may differ in
        # the last bit (another review's), hence a tolerance
        final["val/ppl"] = perplexity(nll)
    missing = [k for k in loss.metrics if k not in final]
    if missing:
        ppl = "val/ppl" in missing and loss.task == "sequence"
        hint = (" (a finalize of your own: start from super().finalize(values), which "
                "derives val/ppl)" if ppl else "")  # fmt: skip
        raise ValueError(
            f"loss {name} lists {missing} in its metrics, but neither its val_sums (which "
            f"reported {sorted(pairs)}) nor its finalize gave them: report each as a (sum, "
            f"count) pair in val_sums, derive it in finalize, or leave it out of metrics{hint}"
        )
    extra = [k for k in final if k not in loss.metrics]
    shown = {k: final[k] for k in extra if k.startswith("val/")}
    return {**{k: final[k] for k in loss.metrics}, **shown}, extra


def perplexity(loss: float) -> float:
    """exp(mean NLL), inf where it overflows (NaN stays NaN: nothing was averaged). (A cut at
    700 gave inf for the finite exp(705) = 1.5e306.)"""
    try:
        return math.exp(loss)
    except OverflowError:  # (past log(float max) ≈ 709.78)
        return math.inf


def _comparable(output: Tensor, target: Tensor) -> bool:
    """Whether a squared error can pair the output with the targets element by element: the
    same batch and as many elements per sample (never a broadcast)."""
    return output.shape[0] == target.shape[0] and output.numel() == target.numel()


def _val_mse_shapes(loss: Loss, output: Tensor, target: Tensor) -> str:
    """Why ``val/mse`` cannot compare these, and the ways out."""
    return (
        f"loss {type(loss).__name__} (task regression): val/mse compares the model's output "
        f"with the targets element by element, and the output of shape {tuple(output.shape)} "
        f"does not match the targets of shape {tuple(target.shape)}; return one output per "
        "target element, or give the loss task = None (val/loss only) or val_sums and metrics "
        "of its own for this output"
    )


def _val_acc_shapes(loss: Loss, output: Tensor, target: Tensor) -> str | None:
    """Why the base class's ``val/acc`` (the argmax of (B, K) scores against (B,) class
    indices, K ≥ 2) cannot measure these, and the ways out; None where it can."""
    b = output.shape[0] if output.ndim else None
    if (output.ndim == 2 and output.shape[1] >= 2 and target.shape == (b,)
            and not target.is_complex()):  # fmt: skip
        return None
    if output.ndim == 2 and output.shape[1] == 1 or output.ndim == 1:
        shape = "one score per sample (a binary classifier's logit?), whose argmax is class 0"
    elif target.shape != (b,):
        shape = f"targets of shape {tuple(target.shape)}, not one class index per sample"
    else:
        shape = "not one row of class scores per sample"
    return (
        f"loss {type(loss).__name__} (task classification): val/acc compares the argmax of "
        f"(B, K) class scores (K ≥ 2) with (B,) class indices, and got outputs of shape "
        f"{tuple(output.shape)} against targets of shape {tuple(target.shape)}: {shape}; give "
        "the loss val_sums and metrics of its own for these (a binary classifier: "
        "(output.squeeze(1) > 0) == target; a segmentation's pixels), or task = None "
        "(val/loss only)"
    )


def squared_error(output: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean of ``(output - target)²`` over a target's elements, (B,).

    ``output`` and ``target`` must hold as many elements per sample; a (B, 1) output against
    a (B,) target (one scalar per sample) is the usual case. Anything else is an error naming
    both shapes, never a broadcast (a (B, 1) - (B,) difference would silently be (B, B)).
    """
    return squared_elements(output, target).mean(dim=1)


def squared_elements(output: Tensor, target: Tensor) -> Tensor:
    """``(output - target)²`` per target element, (B, K): :func:`squared_error`'s terms."""
    b = target.shape[0]
    if not _comparable(output, target):
        raise ValueError(
            f"loss=mse: the model's output of shape {tuple(output.shape)} does not match the "
            f"targets of shape {tuple(target.shape)} (one output per target element; nothing "
            "is broadcast)"
        )
    # in float32 at least (an autocast model's float16/bfloat16 output would round the
    # targets to 8 or 11 bits, and float16 overflows beyond a difference of 256)
    dtype = torch.promote_types(output.dtype, torch.float32)
    diff = output.reshape(b, -1).to(dtype) - target.reshape(b, -1).to(dtype)
    return diff.square()


def _label_out_of_range(output: Tensor, error: IndexError) -> IndexError:
    """torch's "Target 5 is out of bounds", on a batch after the first: what it means, and
    why the checks before training did not see it."""
    return IndexError(
        f"loss=cross_entropy: a class label is outside [0, {output.shape[-1]}), the classes "
        f"the model scores (torch: {error}); a Dataset without a targets attribute has only "
        "its first sample's label checked before training: give it targets (a tensor of its "
        "labels) to have every label checked then, or set num_classes to cover them"
    )


#: the built-in cross-entropy's ``ignore_index``: none a label can take (torch's default,
#: -100, gave such a sample a loss of 0, trained and averaged over the batch as one, and
#: counted wrong in val/acc, where -1 or K was refused as outside [0, K): a review's)
NO_LABEL_IGNORED = torch.iinfo(torch.int64).min


class CrossEntropy(Loss):
    """ℓᵢ = −log softmax(outputᵢ)[yᵢ] (with label smoothing ε: the cross-entropy against
    (1 − ε)·onehot(yᵢ) + ε/K). ``val/loss`` is the plain cross-entropy (no smoothing)."""

    task = "classification"

    def __init__(self, label_smoothing: float = 0.0):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"loss.label_smoothing: got {label_smoothing}, must be in [0, 1)")
        self.label_smoothing = label_smoothing
        self.nll = label_smoothing == 0

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        # functional, not nn.CrossEntropyLoss: one module call less per step
        try:
            return F.cross_entropy(
                output, target, reduction="none", label_smoothing=self.label_smoothing,
                ignore_index=NO_LABEL_IGNORED,
            )  # fmt: skip
        except IndexError as e:  # (on the CPU; CUDA asserts on the device)
            raise _label_out_of_range(output, e) from e

    def val_losses(self, output: Tensor, target: Tensor) -> Tensor:
        try:
            return F.cross_entropy(output, target, reduction="none", ignore_index=NO_LABEL_IGNORED)
        except IndexError as e:
            raise _label_out_of_range(output, e) from e

    def check_output(self, output: Any) -> None:
        """Also: (B, K) scores with at least the data's K classes. A model with fewer outputs
        than classes failed with torch's IndexError at the first step (on CUDA, a device-side
        assert); one returning (B,) with a message about class probabilities."""
        super().check_output(output)
        classes = getattr(self, "_classes", None)
        if classes is None or not isinstance(output, Tensor):
            return
        if output.dim() == 2 and output.shape[1] == 1:
            raise ConfigError(
                f"loss=cross_entropy: the model's output has shape {tuple(output.shape)}: one "
                "score per sample, over which a softmax is 1 whatever the label (loss 0, "
                "nothing learned); set num_classes (or out_dim) in the data module (without "
                "either, out_dim is the size of one target: 1 for a class label)"
            )
        if output.dim() != 2 or output.shape[1] < classes:
            raise ConfigError(
                f"loss=cross_entropy: the model's output has shape {tuple(output.shape)}; it "
                f"must be (batch, {classes}): one score per class of the data (out_dim="
                f"{classes}), which the built-in models take from the data (a model of your own: "
                "its out_dim or num_classes argument)"
            )

    def check(self, data: DataModule) -> None:
        self._classes = data.out_dim  # (the scores check_output expects per sample)
        targets, val = data.checked_targets()
        if targets is not None and (targets.is_floating_point() or targets.ndim != 1):
            fix = (
                "token sequences: loss=token_cross_entropy"
                if targets.ndim == 2 and not (targets.is_floating_point())
                else "regression targets: loss=mse"
            )
            raise ConfigError(
                f"loss=cross_entropy needs int64 class labels of shape (N,); the data's targets "
                f"are {targets.dtype} of shape {tuple(targets.shape)} ({fix})"
            )
        if targets is not None and targets.dtype != torch.int64:
            raise ConfigError(
                f"loss=cross_entropy needs int64 class labels; the data's are {targets.dtype} "
                "(torch refuses them at the first step): cast them with .long() in the data module "
                "(a data=tensors file: save them as int64, y.long() or np.int64)"
            )
        for split, labels in (("training", targets), ("validation", val)):
            if labels is None or not labels.numel():
                continue
            if split == "validation" and (labels.is_floating_point() or labels.ndim != 1):
                raise ConfigError(
                    f"loss=cross_entropy: the validation split's targets are {labels.dtype} of "
                    f"shape {tuple(labels.shape)}, not class labels of shape (N,) as the "
                    "training split's"
                )
            if split == "validation" and labels.dtype != torch.int64:  # (torch refuses them
                raise ConfigError(  # at the first validation, after an epoch's training)
                    f"loss=cross_entropy needs int64 class labels; the validation split's are "
                    f"{labels.dtype}: cast them with .long() (a data=tensors file: save y_val "
                    "as int64)"
                )
            if data.out_dim is None:
                continue
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= data.out_dim:
                first = (data.train_targets if split == "training" else data.val_targets) is None
                seen = (f"first sample's class label is {high if high >= data.out_dim else low}"
                        if first else f"class labels span [{low}, {high}]")  # fmt: skip
                raise ConfigError(
                    f"loss=cross_entropy: the {split} split's {seen}, "
                    f"but the model is built with out_dim={data.out_dim} scores per sample; set "
                    "num_classes (or out_dim) in the data module (without either, out_dim is the "
                    "size of one target: 1 for a class label)"
                )


class MSE(Loss):
    """ℓᵢ = mean over the target's elements of (outputᵢ − yᵢ)² (regression)."""

    task = "regression"

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        return squared_error(output, target)

    def check(self, data: DataModule) -> None:
        targets, val = data.checked_targets()
        for split, t in (("training", targets), ("validation", val)):
            if t is not None and not t.is_floating_point():
                raise ConfigError(
                    f"loss=mse needs float targets; the {split} split's targets are {t.dtype} "
                    "(class labels: loss=cross_entropy; integer values, counts or ages: make "
                    "them float in the data module, e.g. float(y) in __getitem__)"
                )
        for split, t in (("training", targets), ("validation", val)):
            bad = None if t is None else (~torch.isfinite(t)).reshape(len(t), -1).any(1)
            if bad is not None and bool(bad.any()):  # (the step's guard named only a
                # non-finite loss and gradients, not the targets)
                rows = bad.nonzero().flatten()
                raise ConfigError(
                    f"loss=mse: the {split} split's targets hold NaN or Inf, at sample "
                    f"{', '.join(str(i) for i in rows[:5].tolist())}"
                    f"{f' and {len(rows) - 5} more' if len(rows) > 5 else ''}; drop or fill them "
                    "in the data module"
                )
        # (found after a whole epoch, by the first validation, before; the squared error is
        # over each sample's values flattened, so (1,) and () per sample are the same)
        if (
            targets is not None
            and val is not None
            and len(targets)
            and len(val)
            and val[0].numel() != targets[0].numel()
        ):
            raise ConfigError(
                f"loss=mse: the validation split's targets are of shape {tuple(val.shape[1:])} "
                f"per sample, the training split's {tuple(targets.shape[1:])}; the model's "
                "output has one shape"
            )


class TokenCrossEntropy(Loss):
    """Per-token cross-entropy for sequence models: logits (B, T, V) against next-token targets
    (B, T) -> losses (B, T), 0 where the target is ``ignore_index`` (padding).

    ``average`` (``tokens`` or ``sequences``) defines the scalar objective (module docstring)
    and, in vector mode, the unit weights a weighting starts from. Validation averages over
    valid tokens whatever ``average`` is: ``val/loss`` is the mean next-token NLL (nats),
    ``val/ppl`` its exp, ``val/token_acc`` the share of tokens predicted exactly.
    """

    task = "sequence"

    def __init__(
        self, average: str = "tokens", ignore_index: int = -100, label_smoothing: float = 0.0
    ):
        if average not in AVERAGES:
            raise ValueError(f"loss.average: got {average!r}, expected tokens or sequences")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"loss.label_smoothing: got {label_smoothing}, must be in [0, 1)")
        self.average, self.ignore_index = average, ignore_index
        self.label_smoothing = label_smoothing

    def _check_shapes(self, output: Tensor, target: Tensor) -> None:
        if output.ndim != 3 or target.ndim != 2 or output.shape[:2] != target.shape:
            raise ValueError(
                f"loss=token_cross_entropy: needs logits (B, T, V) and targets (B, T); got "
                f"{tuple(output.shape)} and {tuple(target.shape)}"
            )

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        self._check_shapes(output, target)  # metadata only
        b, t, v = output.shape
        losses = F.cross_entropy(
            output.reshape(b * t, v), target.reshape(b * t), reduction="none",
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
        )  # fmt: skip
        return losses.view(b, t)  # (B, T), 0 on padding

    def units(self, target: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        mask = (target != self.ignore_index).to(dtype)  # (B, T)
        if self.average == "tokens":
            return mask
        return mask / mask.sum(dim=1, keepdim=True).clamp_min(1.0)  # each sequence sums to 1

    def val_sums(self, output: Tensor, target: Tensor) -> dict[str, Tensor]:
        self._check_shapes(output, target)
        output = output if output.dtype == torch.float64 else output.float()  # (as Loss's)
        b, t, v = output.shape
        valid = target != self.ignore_index
        n = valid.sum().to(output.dtype)
        nll = F.cross_entropy(
            output.reshape(b * t, v), target.reshape(b * t), reduction="sum",
            ignore_index=self.ignore_index,
        )  # fmt: skip
        correct = ((output.argmax(dim=-1) == target) & valid).sum().to(output.dtype)
        correct = _unless_nonfinite(correct, output, valid)
        # val/ppl is derived from val/loss by Loss.finalize (exp of the token mean, not a
        # mean of exps)
        return {"val/loss": torch.stack([nll, n]), "val/token_acc": torch.stack([correct, n])}

    def check(self, data: DataModule) -> None:
        targets = data.train_targets
        if targets is not None and (targets.is_floating_point() or targets.ndim != 2):
            raise ConfigError(
                f"loss=token_cross_entropy needs int64 token targets of shape (N, T); the "
                f"data's targets are {targets.dtype} of shape {tuple(targets.shape)}"
            )
        # (against out_dim, the classes the model scores each position over: a language
        # model's vocabulary, a tagger's tags; it checked the input vocabulary, refusing a
        # tagger with more tags than input tokens and passing one with fewer outputs)
        for split, ids, rows in (
            ("training", targets, getattr(data, "train_target_rows", None)),
            ("validation", data.val_targets, getattr(data, "val_target_rows", None)),
        ):
            if ids is None and rows:  # (variable-length sequences, each as it comes alone)
                if rows[0].is_floating_point() or rows[0].ndim != 1:
                    raise ConfigError(
                        f"loss=token_cross_entropy needs int64 token targets, one sequence "
                        f"per sample; the {split} split's are {rows[0].dtype} of "
                        f"{rows[0].ndim} dimensions per sample"
                    )
                ids = torch.cat(rows)
            if ids is None or data.out_dim is None or ids.is_floating_point():
                continue
            valid = ids[ids != self.ignore_index]
            if valid.numel() and not 0 <= int(valid.min()) <= int(valid.max()) < data.out_dim:
                raise ConfigError(
                    f"loss=token_cross_entropy: the {split} split's target ids span "
                    f"[{int(valid.min())}, {int(valid.max())}] but the model scores "
                    f"out_dim={data.out_dim} classes per position (padding must be "
                    f"loss.ignore_index={self.ignore_index})"
                )


class CallableLoss(Loss):
    """Any ``(output, target) -> (B,)`` callable as a loss; validation reports ``val/loss``.
    (Per-token losses need :meth:`Loss.units`: subclass :class:`Loss` for them.)"""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], task: str | None = None):
        self.fn, self.task = fn, task

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        return self.fn(output, target)

    def __repr__(self) -> str:
        fn = self.fn.func if isinstance(self.fn, functools.partial) else self.fn  # (_partial_)
        name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        module = getattr(fn, "__module__", None)
        return f"{type(self).__name__}({module + '.' if module else ''}{name})"


def loss_name(loss: Any) -> str:
    """A loss as an error names it: its class, and a wrapped callable's own name
    (``CallableLoss(mypkg.losses.bad_fn)``: "loss CallableLoss returned ..." named none of
    the user's, a walkthrough's)."""
    return repr(loss) if isinstance(loss, CallableLoss) else type(loss).__name__


def as_loss(obj: Any) -> Loss:
    """``obj`` as a :class:`Loss`: a Loss as it is, a plain callable wrapped."""
    if isinstance(obj, Loss):
        if obj.task not in TASKS:
            raise ConfigError(f"loss: {type(obj).__name__}.task is {obj.task!r}; expected one "
                              f"of {', '.join(map(str, TASKS))}")  # fmt: skip
        return obj
    if callable(obj):
        return CallableLoss(obj)
    raise ConfigError(
        f"loss: got {type(obj).__name__}, expected a trainer.losses.Loss or a callable "
        "(output, target) -> per-sample losses (B,)"
    )
