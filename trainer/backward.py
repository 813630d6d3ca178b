"""The one place where a loss meets autograd.

Two paths, both giving exactly the gradients the math says (see docs/gradients.md):

* scalar: ``loss.backward()`` on a 0-d loss; autograd seeds it with an implicit 1 (for the
  trainer's roots, a product or a quotient, a kept 1.0 of the loss's dtype and device passed
  as ``gradient``: the same seed, bit for bit, without the ``ones_like`` kernel autograd
  launches for it on every call).
* vector: ``losses.backward(gradient=w)`` on the per-sample losses l of shape (B,) with detached
  weights w of the same shape: a vector-Jacobian product, so each parameter receives
  ``sum_i w_i * d l_i / d theta``, the gradient of ``(w * l).sum()``.

``gradient`` is never broadcast: a weight vector whose shape, dtype or device differs from the
losses' is an error naming both (the classic mistake is a (4,) vector for a (2, 2) loss); the
one dtype allowed besides the losses' own is float32 for float16/bfloat16 losses (their
weights u / Σu are computed in float32: ``trainer.losses.units_dtype``), rounded to the losses'
dtype once, after the GradScaler's scale, as the scalar root's gradient is.
A GradScaler, when given, scales the root's gradient (the loss, or w) before backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from trainer.precision import LOW_PRECISION


class WeightError(ValueError):
    """Gradient weights that do not fit the losses they weight."""


class GraphFreedError(RuntimeError):
    """A backward pass through a graph whose saved tensors an earlier backward already freed."""


class explain_freed_graph:  # noqa: N801  (used as a context manager, like a function)
    """Turn autograd's "backward through the graph a second time" error into a clear one.

    A class, not ``contextlib.contextmanager``: it wraps every backward, and a generator-based
    context manager costs about 9 µs per use against well under 1 µs for this."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, e: BaseException | None, tb: Any) -> Literal[False]:
        if not isinstance(e, RuntimeError):
            return False
        if "second time" not in str(e) and "already been freed" not in str(e):
            return False
        raise GraphFreedError(
            "backward ran a second time through the same graph: the first backward freed the "
            "activations it saved. Compute the losses again with a new forward pass (the "
            "trainer does this every step), or, if two passes over one graph are really "
            "intended, pass retain_graph=True to the first (it keeps every activation alive)"
        ) from e


#: the code of every backward ``torch.autograd.function.once_differentiable`` wraps (one code
#: object, a closure per function): how a Function whose backward is marked so is recognized
_ONCE_DIFFERENTIABLE = torch.autograd.function.once_differentiable(lambda ctx: None).__code__


def once_differentiable_in(roots: Sequence[Tensor], leaves: Sequence[Tensor]) -> list[str]:
    """The custom autograd Functions (``Function`` subclasses, by name, each once) in the graph
    of ``roots`` on a path to one of ``leaves`` (the tensors a backward is taken for) whose
    backward is marked ``@once_differentiable``, as C++/CUDA extensions' often are (under
    another decorator too: ``functools.wraps``'s ``__wrapped__`` followed). A backward
    differentiated again (Hessian-vector products, the input-gradient penalty) needs the
    derivative of theirs, which torch does not take: their backward runs without a graph, and
    what it returns is tied to a fresh leaf that raises only when a backward reaches it, which
    one taken for ``leaves`` never does, so every path through such a Function was silently
    left out (a curvature estimate of the wrong sign, converged; a penalty's gradient 36 %
    off: a probe's). One off the paths to ``leaves`` (a straight-through rounding of a
    weight, for the inputs' gradient) is not run by that backward and not named. A
    backward that calls a @once_differentiable helper is not seen. One visit per node."""
    targets = {id(t) for t in leaves if t.grad_fn is None}  # (by their AccumulateGrad nodes)
    ends = {t.grad_fn for t in leaves if t.grad_fn is not None}  # (a non-leaf: its node; a
    # penalty's input with a history was not reached, and its Function not named, a review's)
    reaches: dict[Any, bool] = {}  # node -> a path from it reaches a leaf (False: unfinished)
    found: list[str] = []
    todo: list[tuple[Any, bool]] = [(t.grad_fn, False) for t in roots if t.grad_fn is not None]
    while todo:  # (depth first, each node finished after its inputs: the graph is acyclic)
        node, inputs_done = todo.pop()
        if not inputs_done:
            if node in reaches:
                continue
            reaches[node] = False
            todo.append((node, True))
            todo.extend((fn, False) for fn, _ in node.next_functions
                        if fn is not None and fn not in reaches)  # fmt: skip
            continue
        leaf = type(node).__name__ == "AccumulateGrad"  # (a custom Function's node shows its
        # ctx's attributes: a ``ctx.variable`` is not a leaf)
        reaches[node] = (
            node in ends
            or (leaf and id(node.variable) in targets)
            or any(reaches.get(fn, False) for fn, _ in node.next_functions if fn is not None)
        )
        cls: Any = getattr(node, "_forward_cls", None)  # (a custom Function's backward node)
        if reaches[node] and cls is not None and _once_differentiable(cls.backward):
            name = f"{cls.__module__}.{cls.__qualname__}"
            if name not in found:
                found.append(name)
    return found


def _once_differentiable(backward: Any) -> bool:
    """Whether ``backward`` is torch's ``once_differentiable`` wrapper, or wraps one."""
    for _ in range(100):  # (a chain of decorators; bounded)
        if backward is None:
            return False
        if getattr(backward, "__code__", None) is _ONCE_DIFFERENTIABLE:
            return True
        backward = getattr(backward, "__wrapped__", None)
    return False


def check_weights(losses: Tensor, weights: Tensor) -> None:
    """Raise :class:`WeightError` unless ``weights`` can be passed as ``gradient=`` for ``losses``.

    Checks only metadata (no host sync): shape equal (no broadcasting), dtype and device equal,
    and no autograd history (weights are constants of the backward pass).
    """
    if not isinstance(weights, Tensor):
        raise WeightError(f"gradient weights must be a Tensor, got {type(weights).__name__}")
    if weights.shape != losses.shape:
        raise WeightError(
            f"gradient weights of shape {tuple(weights.shape)} do not match the losses of shape "
            f"{tuple(losses.shape)}: backward(gradient=w) needs w of exactly the losses' shape "
            "(one weight per loss element; nothing is broadcast)"
        )
    if weights.dtype != losses.dtype and not (
        losses.dtype in LOW_PRECISION and weights.dtype == torch.float32
    ):
        raise WeightError(
            f"gradient weights have dtype {weights.dtype} but the losses {losses.dtype}; "
            "cast the weights to the losses' dtype (float16/bfloat16 losses also take float32 "
            "weights)"
        )
    if weights.device != losses.device:
        raise WeightError(
            f"gradient weights are on {weights.device} but the losses on {losses.device}"
        )
    if weights.requires_grad:
        raise WeightError(
            "gradient weights require grad; detach them (weights are constants of the backward "
            "pass, so gradients never flow into them)"
        )


#: the scalar root's seed, 1.0, per (dtype, device), for the roots in :data:`_FRESH`
_ONES: dict[tuple[torch.dtype, torch.device], Tensor] = {}

#: roots whose backward node makes a new tensor of the gradient it receives (a product, a
#: quotient, a mean's division): a kept seed goes no further than it. Anything else (a sum's
#: expand, a view, an addition's pass-through, a leaf) could hand the seed itself to a leaf,
#: which would keep it as its gradient and accumulate into it
_FRESH = frozenset({"DotBackward0", "MulBackward0", "DivBackward0", "MeanBackward0"})


def _seed(root: Tensor) -> Tensor | None:
    """A kept 0-d 1.0 of ``root``'s dtype and device where only its backward node reads it
    (and no tensor hook of the root sees it); None (autograd's own ``ones_like``) otherwise."""
    if type(root.grad_fn).__name__ not in _FRESH or root._backward_hooks:
        return None
    key = (root.dtype, root.device)
    one = _ONES.get(key)
    if one is None:
        one = _ONES[key] = torch.ones((), dtype=root.dtype, device=root.device)
    return one


def backward_scalar(
    loss: Tensor,
    scaler: torch.amp.GradScaler | None = None,
    reg: Tensor | None = None,
    inputs: Sequence[Tensor] | None = None,
) -> None:
    """``(loss + reg).backward()`` on a 0-d loss (scaled by the GradScaler under fp16).

    ``inputs``: accumulate into these leaves only (the default: every leaf that requires grad).
    """
    if loss.ndim != 0:
        raise WeightError(
            f"scalar backward needs a 0-d loss, got shape {tuple(loss.shape)}; reduce it "
            "(e.g. .mean()) or use loss.mode=vector with weights"
        )
    total = loss if reg is None else loss + reg
    root = scaler.scale(total) if scaler is not None else total
    with explain_freed_graph():
        root.backward(gradient=_seed(root), inputs=inputs)


def backward_vector(
    losses: Tensor,
    weights: Tensor,
    scaler: torch.amp.GradScaler | None = None,
    reg: Tensor | None = None,
    inputs: Sequence[Tensor] | None = None,
) -> None:
    """``losses.backward(gradient=weights)``: the vector-Jacobian product w^T J.

    With a 0-d regularizer ``reg`` it joins the same backward pass as a second root:
    ``torch.autograd.backward([losses, reg], grad_tensors=[w, 1])``. ``inputs``: accumulate
    into these leaves only.
    """
    check_weights(losses, weights)
    one = None if reg is None else torch.ones_like(reg)
    if scaler is not None:
        weights = scaler.scale(weights)
        one = None if one is None else scaler.scale(one)
    # (float32 weights of float16/bfloat16 losses: rounded once, after the scale; no kernel
    # where the dtypes agree)
    weights = weights.to(losses.dtype)
    with explain_freed_graph():
        if reg is None:
            losses.backward(gradient=weights, inputs=inputs)
            return
        torch.autograd.backward([losses, reg], grad_tensors=[weights, one], inputs=inputs)


def _weight_norm_composed(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    """``torch._weight_norm`` as ATen composes it where its fused kernel is not used."""
    return v * (g / torch.norm_except_dim(v, 2, dim))


#: the norms whose double backward is wrong with a bias and no weight: their arguments'
#: names in order, and whether the bias is per channel (dimension 1) or over the last ones
_BIAS_ONLY: dict[Any, tuple[tuple[str, ...], bool]] = {
    torch.layer_norm: (("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable"),
                       False),
    F.layer_norm: (("input", "normalized_shape", "weight", "bias", "eps"), False),
    torch.batch_norm: (("input", "weight", "bias", "running_mean", "running_var", "training",
                        "momentum", "eps", "cudnn_enabled"), True),
    F.batch_norm: (("input", "running_mean", "running_var", "weight", "bias", "training",
                    "momentum", "eps"), True),
    torch.instance_norm: (("input", "weight", "bias", "running_mean", "running_var",
                           "use_input_stats", "momentum", "eps", "cudnn_enabled"), True),
    F.instance_norm: (("input", "running_mean", "running_var", "weight", "bias",
                       "use_input_stats", "momentum", "eps"), True),
}  # fmt: skip


def _norm_then_bias(func: Any, args: tuple, kwargs: dict) -> Any:
    """``func`` (a norm of :data:`_BIAS_ONLY`); with a bias and no weight, the norm without
    either, then the bias added."""
    names, per_channel = _BIAS_ONLY[func]
    bound = {**dict(zip(names, args, strict=False)), **kwargs}
    bias = bound.get("bias")
    if bound.get("weight") is not None or bias is None:
        return func(*args, **kwargs)
    out = func(**{**bound, "bias": None})
    added = out + (bias.reshape(-1, *[1] * (out.dim() - 2)) if per_channel else bias)
    return added.to(out.dtype)  # (a bfloat16 input's norm and a float32 bias: bfloat16, as
    # the plain call gives; float32 stopped a bfloat16 layer after it, a review's)


class _SecondDerivatives(TorchFunctionMode):
    """Ops whose double backward in torch is wrong (``gradgradcheck`` fails on them, torch
    2.14.1, float64), run by ops whose is right, with the same values up to rounding:

    * ``torch._weight_norm`` (``weight_norm``, the parametrization and the hook-based one):
      its fused kernel's double backward (``_weight_norm_differentiable_backward``) is wrong,
      so Hessian-vector products through a weight-normed layer were not symmetric and a
      review's top eigenvalue was 3 % off (the trace 3 standard errors), converged, with no
      warning: by its composite ops;
    * ``layer_norm``, ``batch_norm`` and ``instance_norm`` with a bias and no weight (torch
      issue 79705): ``gradgradcheck`` gives 0, not 1, for the derivative of the bias's
      gradient in its output's gradient, and a Hessian-vector product of a model using one
      stopped the step ("Expected a proper Tensor but got None"): the norm without it, then
      the bias added (:func:`_norm_then_bias`; the instance norm's found by a third review).

    Sweeps of about 80 ops of common layers and losses (a session's and two reviews') found no
    other wrong one (an op with no double backward, the fused attention kernels',
    ``embedding_bag``'s, raises: loud)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func is torch._weight_norm:
            return _weight_norm_composed(*args, **(kwargs or {}))
        if func in _BIAS_ONLY:
            return _norm_then_bias(func, args, kwargs or {})
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def double_backward_kernels(
    model: nn.Module, device: torch.device, hessian: bool = False
) -> Iterator[None]:
    """Kernels with a double backward, for a forward whose backward is differentiated again
    (Hessian-vector products, the input-gradient penalty): attention through the math kernel
    (flash and memory-efficient have none: "derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"); with
    ``hessian`` (a backward differentiated in the parameters again: Hessian-vector products)
    the ops whose double backward is wrong by others (:class:`_SecondDerivatives`:
    ``weight_norm``, a norm with a bias and no weight); and, on CUDA, for a model holding an RNN,
    cuDNN off (its RNNs have none: "Double backwards is not supported for CuDNN RNNs", a
    review's reading of torch; torch's own RNN kernels are used instead). Only
    ``torch.backends.cudnn.enabled`` is switched, and put back: its other settings
    (deterministic, benchmark) stay as the run set them; it is process-wide, so the model's
    convolutions and BatchNorms run without cuDNN in that forward too (slower, the same
    math). (Tested on an H100: tests/test_cuda.py.)"""
    rnn = device.type == "cuda" and any(isinstance(m, nn.RNNBase) for m in model.modules())
    with contextlib.ExitStack() as stack:
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        if hessian:
            stack.enter_context(_SecondDerivatives())
        if rnn:
            was = torch.backends.cudnn.enabled
            torch.backends.cudnn.enabled = False
            stack.callback(setattr, torch.backends.cudnn, "enabled", was)
        yield
