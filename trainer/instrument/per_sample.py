"""Per-sample gradient norms from the step's own backward, never the whole model's per-sample grads.

The model is split into *units*, each covering a set of parameters: ``nn.MultiheadAttention``
and RNNs (``nn.RNN``/``LSTM``/``GRU``) cover all their parameters (attention's ``out_proj``
included); any other module covers the parameters it owns itself. On a measuring micro-batch,
hooks on every unit keep its inputs and put a hook on each of its tensor outputs, which receives
that output's gradient g during the step's own backward. Per unit call, the per-sample gradient
of its parameters follows from (inputs, g):

* ``Linear`` on (B, in): ∇_W ℓᵢ = gᵢ aᵢᵀ, so ‖∇_W ℓᵢ‖² = ‖aᵢ‖² ‖gᵢ‖² and ‖∇_b ℓᵢ‖² = ‖gᵢ‖².
* ``Linear`` on sequences (B, T, in) and ``Conv1d``/``Conv2d`` (unfolded into T = output
  positions of a_t ∈ R^{C·k}): ∇_W ℓᵢ = Σ_t g_t a_tᵀ, whose squared norm is either the Gram form
  Σ_{t,s} (a_t·a_s)(g_t·g_s) (cost T²(C·k + out) per sample) or the squared norm of that one
  layer's per-sample gradient (cost T·C·k·out, memory B·C·k·out), whichever is cheaper; bias:
  ‖Σ_t g_t‖².
* ``EmbeddingBag`` whose bags are the samples (offsets of B bags, or a 2-D input):
  ‖gᵢ‖² Σ_v (Σ_{t: idx_t = v} cₜ)², cₜ each entry's coefficient (1, its per-sample weight,
  1/nᵢ for mean; 0 for padding), or ‖gᵢ‖² for mode max (:func:`embedding_bag_sq_norms`).
* attention and RNNs: the unit recomputed on each sample alone (its batch dimension from
  ``batch_first``; masks sliced with it), differentiating Σ_k ⟨g_k, out_k⟩ over its outputs
  (attention's output and weights; an RNN's output, h_n and c_n): one small backward per sample.
* any other unit: ``torch.func.vmap(grad(...))`` of ⟨gᵢ, module(aᵢ)⟩ over its own parameters
  (a parametrized module's, ``torch.nn.utils.parametrize``: its own and its parametrizations',
  the originals its weight is computed from, with that computation inside).
* the closed forms' and the generic units' samples are along dimension 0 of their input and
  output, or dimension 1 for a sequence-first (T, B, ·) one (torch's layers with
  ``batch_first=False`` pass that on to their Linears and LayerNorms; an Embedding of
  transposed tokens); which one is settled by a check forward (:meth:`PerSampleNorms._verify`).
* a parameter used more than once per forward (a weight registered in two modules, i.e. tied,
  or a module called twice): its per-sample gradients from every use are materialized
  (B × its size, up to ``MATERIALIZE_BYTES``) and summed before squaring, so the cross terms
  are in.

What cannot be measured is left out and named (a warning, and ``per_sample/coverage``, the share
of parameter elements whose per-sample gradient was captured), never mixed in silently:

* a parameter that enters a differentiable computation while none of its units is running
  (``F.linear(x, child.weight)`` in a parent's forward, logits as ``h @ emb.weight.T``): a
  ``TorchFunctionMode`` active during the measured forward sees every such use, and its unit
  (every unit the parameter is registered in) is left out;
* BatchNorm in training mode mixes the samples of a batch: the gradient reaching any layer
  upstream of it mixes the samples too, so a per-sample gradient is not defined there. Such a
  BatchNorm and every unit whose forward ran before it are left out;
* a unit whose forward draws random numbers (dropout inside attention, between an RNN's layers,
  or inside another unit; Python's ``random`` or NumPy's global generator, seen by their
  states moving during the recomputation, which runs on copies of them: a generator object
  the unit owns is not seen) that a per-sample recomputation cannot reproduce;
* a unit after which the model mixes or reorders the samples by other means (a
  normalization with the batch's statistics written by hand, a sort of the batch): each of its
  output rows then gets other samples' gradients in the step's backward. Seen once per input
  shape on a few samples of the batch (:meth:`PerSampleNorms._verify`);
* a unit whose inputs do not carry the batch where expected (several tensor inputs to a
  generic unit), or whose output never received a gradient (an RNN fed a PackedSequence is
  measured: each sample's rows of it, :func:`_packed_owner`, recomputed alone);
* a unit recomputed per sample (not a closed form, or a closed form used more than once)
  with a hook of one's own that replaced or changed in place its inputs (keyword ones too)
  or its output: the recomputation runs the hook again. A closed form's own pre-hooks run
  before it counts as active, so one using its weight is an outside use (above);
* a unit with torch's older ``spectral_norm`` (its pre-hook's power iteration would run
  again), an attention or RNN with a parametrization that changed its own buffers in the
  measured forward (the new ``spectral_norm``'s in training; a generic unit's change in
  place is compared with its recomputation's instead, :func:`_same_change`), and every unit
  while a global module forward hook is registered (it runs before the measuring hooks);
* a unit whose output's gradient no hook saw while the backward reached its parameters
  (torch fires no hook of an output changed in place after the forward where the output is
  a view of the op's result: a Linear on (B, T, D) followed by ``ReLU(inplace=True)``).

The hooks see the gradient of the step's backward root, Σᵢ wᵢℓᵢ (scalar mode: wᵢ = 1/N over the
N samples of the accumulation window), so the direct result is the *weighted* norm ‖∇θ(wᵢℓᵢ)‖,
sample i's share of the step's gradient; the *unweighted* ‖∇θ ℓᵢ‖ is that divided by wᵢ, for
samples with wᵢ > 0 (a sample of weight 0, e.g. outside hard_topk's top k, contributes no gradient
and is left out of the unweighted statistics). Only the data loss is measured: parameter
regularizers have no per-sample part, and the input-gradient penalty is refused by the config.

The squared norms are kept per parameter tensor, (B, parameters), so that besides the total
norm the step's statistics come per tensor: the gradient noise scale B_simple = tr(Σ)/|G|² over
the covered parameters and each tensor's SNR ‖ḡ‖²/tr(S) (docs/instrumentation.md).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import inspect
import logging
import math
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules import module as _module_hooks
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.overrides import TorchFunctionMode, _pop_mode_temporarily
from torch.overrides import _get_current_function_mode as _current_function_mode

from trainer.callbacks import Callback, Every, Stateful, few
from trainer.config import ConfigError
from trainer.distributed import (
    all_gather_cat,
    all_gather_objects,
    all_reduce_max,
    shard_sizes,
)
from trainer.instrument.norms import memory_of, minus, norms_of
from trainer.instrument.swap import (
    attributes_kept,
    call_with,
    plain_attributes,
    put_tensors_back,
    scripted,
    set_plain_attributes,
    swapped,
    tensor_copies,
)
from trainer.losses import units_dtype
from trainer.precision import LOW_PRECISION, sum_dtype
from trainer.regularizers import Regularizer
from trainer.rng import Fork, forked_rng

if TYPE_CHECKING:
    from trainer.data.base import Batch
    from trainer.loop import Trainer

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- per-layer math


def _gram_or_direct(a: Tensor, g: Tensor) -> Tensor:
    """Σ over a layer's weight of the squared per-sample gradient Σ_t g_t a_tᵀ, per sample.

    ``a``: (B, G, T, Ci), ``g``: (B, G, T, Co) for G independent groups. Returns (B,).
    """
    b, groups, t, ci = a.shape
    co = g.shape[3]
    gram = t * (ci + co) <= ci * co  # the Gram form takes fewer operations
    # its temporaries per sample (the inputs and two Gram matrices in float64; the per-sample
    # gradient), squared in place: samples in chunks of at most MATERIALIZE_BYTES of them (an
    # LM head of 8,192 outputs at T = 1,024 took 2 × 4.9 GB for B = 32 at once, inside the
    # backward's hook)
    if gram:
        each = groups * (2 * t * t + t * (ci + co)) * 8
    else:
        each = groups * co * ci * max(a.element_size(), g.element_size())
    chunk = max(1, MATERIALIZE_BYTES // max(each, 1))
    if chunk < b:
        return torch.cat(
            [_gram_or_direct(a[i : i + chunk], g[i : i + chunk]) for i in range(0, b, chunk)]
        )
    if gram:
        # in float64: the form adds T² products whose sum is the squared norm, so where the
        # terms are large against it (an input with an offset into a layer whose output
        # gradient sums to about 0 over t, as before an InstanceNorm) float32 loses the
        # square of what the per-sample gradient itself loses (a probe's Conv1d was 17 %
        # off at coverage 1, where float32 autograd was 0.13 % off)
        # (float32 on MPS, which has no float64)
        a, g = a.to(sum_dtype(a.device)), g.to(sum_dtype(g.device))
        ga = a @ a.transpose(-1, -2)  # (B, G, T, T)
        gg = g @ g.transpose(-1, -2)
        return ga.mul_(gg).sum(dim=(1, 2, 3))
    per_sample = g.transpose(-1, -2) @ a  # (B, G, Co, Ci): this layer's per-sample gradient
    return per_sample.square_().sum(dim=(1, 2, 3))


def linear_sq_norms(module: nn.Linear, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Per-sample ‖∇ℓᵢ‖² of the Linear's weight and bias, (B,) each."""
    bias = module.bias is not None and module.bias.requires_grad
    if a.ndim == 2:
        gg = (g * g).sum(1)
        return {"weight": (a * a).sum(1) * gg, **({"bias": gg} if bias else {})}
    b = a.shape[0]
    a3, g3 = a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])  # (B, T, ·)
    out = {"weight": _gram_or_direct(a3.unsqueeze(1), g3.unsqueeze(1))}
    if bias:
        out["bias"] = g3.sum(1).pow(2).sum(1)
    return out


def conv_sq_norms(module: nn.Conv1d | nn.Conv2d, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Per-sample ‖∇ℓᵢ‖² of a Conv1d/Conv2d's weight and bias, (B,) each."""
    if isinstance(module, nn.Conv1d):  # as a Conv2d over (1, L)
        a, g = a.unsqueeze(2), g.unsqueeze(2)
        kernel, stride = (1, *module.kernel_size), (1, *module.stride)
        dilation = (1, *module.dilation)
        padding: Any = module.padding if isinstance(module.padding, str) else (0, *module.padding)
    else:
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
        padding = module.padding
    if isinstance(padding, str) or module.padding_mode != "zeros":
        # 'same'/'valid' or non-zero padding: pad exactly as the layer did, then unfold unpadded
        pads = module._reversed_padding_repeated_twice  # (left, right[, top, bottom])
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        a = F.pad(a, pads if a.ndim - 2 == len(pads) // 2 else (*pads, 0, 0), mode=mode)
        padding = 0
    b, groups = a.shape[0], module.groups
    cols = F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, C·k, T)
    gout = g.reshape(b, g.shape[1], -1)  # (B, out, T)
    cols = cols.reshape(b, groups, -1, cols.shape[-1]).transpose(-1, -2)  # (B, G, T, C·k/G)
    g4 = gout.reshape(b, groups, -1, gout.shape[-1]).transpose(-1, -2)  # (B, G, T, out/G)
    out = {"weight": _gram_or_direct(cols, g4)}
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = gout.sum(2).pow(2).sum(1)
    return out


def layer_norm_sq_norms(module: nn.LayerNorm, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Per-sample ‖∇ℓᵢ‖² of a LayerNorm's weight γ and bias β, (B,) each: with x̂ the input
    normalized over ``normalized_shape``, ∇γ ℓᵢ = Σ_t gᵢₜ ⊙ x̂ᵢₜ and ∇β ℓᵢ = Σ_t gᵢₜ."""
    shape = tuple(module.normalized_shape)
    dims = tuple(range(-len(shape), 0))
    b = a.shape[0]
    out = {}
    if module.weight is not None and module.weight.requires_grad:
        var, mean = torch.var_mean(a, dim=dims, unbiased=False, keepdim=True)
        x_hat = (a - mean) * torch.rsqrt(var + module.eps)
        out["weight"] = (g * x_hat).reshape(b, -1, *shape).sum(1).pow(2).reshape(b, -1).sum(1)
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = g.reshape(b, -1, *shape).sum(1).pow(2).reshape(b, -1).sum(1)
    return out


def embedding_sq_norms(module: nn.Embedding, idx: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Per-sample ‖∇ℓᵢ‖² of an Embedding's table, {"weight": (B,)}: row v of sample i's
    gradient is the sum of gᵢₜ over its positions t holding token v (none for
    ``padding_idx``), so the squared norm is Σ_{t,s} [idx_t = idx_s] (g_t·g_s) (cost T² per
    sample), or, when the table is smaller than T², the squared norm of the scattered
    per-sample gradient."""
    b = idx.shape[0]
    i = idx.reshape(b, -1)
    gg = g.reshape(b, i.shape[1], -1)
    if module.padding_idx is not None:
        gg = gg * (i != module.padding_idx).unsqueeze(-1).to(gg.dtype)
    t, (v, d) = i.shape[1], module.weight.shape
    if t * t <= v * d:  # the Gram form, in float64 as :func:`_gram_or_direct`'s, samples in
        # chunks of at most MATERIALIZE_BYTES of temporaries (g in float64, two T × T)
        wide = sum_dtype(gg.device)
        chunk = max(1, MATERIALIZE_BYTES // ((2 * t * t + t * d) * 8 + t * t))
        parts = []
        for k in range(0, b, chunk):
            gk, ik = gg[k : k + chunk].to(wide), i[k : k + chunk]
            same = (ik.unsqueeze(2) == ik.unsqueeze(1)).to(wide)
            parts.append(same.mul_(gk @ gk.transpose(1, 2)).sum(dim=(1, 2)))
        return {"weight": torch.cat(parts)}
    table = gg.new_zeros(b, v, d).scatter_add_(1, i.unsqueeze(-1).expand(-1, -1, d), gg)
    return {"weight": table.pow(2).sum(dim=(1, 2))}


def embedding_bag_sq_norms(
    module: nn.EmbeddingBag,
    idx: Tensor,
    offsets: Tensor | None,
    weights: Tensor | None,
    g: Tensor,
) -> dict[str, Tensor]:
    """Per-sample ‖∇ℓᵢ‖² of an EmbeddingBag's table, {"weight": (B,)}, bag i being sample i's
    (a row of a 2-D ``idx``, or the entries from ``offsets[i]``). Mode sum and mean: the
    bag's gradient puts cₜ gᵢ on the row of each of its entries t (cₜ: 1, or its
    ``per_sample_weights`` entry; 1/nᵢ for mean over the bag's nᵢ entries; 0 for
    ``padding_idx``), so its squared norm is ‖gᵢ‖² Σ_v (Σ_{t: idx_t = v} cₜ)², the sums over
    the runs of equal (bag, row) keys once sorted, in float64. Mode max: each output
    dimension's gradient goes to one row, ‖gᵢ‖² for a bag with an entry (0 for an empty one,
    whose output is 0)."""
    b = g.shape[0]
    device = idx.device
    if idx.numel() == 0:  # every bag empty: no gradient (a review's crashed the step)
        return {"weight": g.new_zeros(b, dtype=torch.float32)}
    if idx.dim() == 2:  # (B, N): each row a bag
        bag = torch.arange(b, device=device).repeat_interleave(idx.shape[1])
        idx = idx.reshape(-1)
        weights = weights.reshape(-1) if weights is not None else None
    else:
        starts = cast(Tensor, offsets)
        starts = starts[:-1] if module.include_last_offset else starts
        positions = torch.arange(idx.numel(), device=device)
        bag = torch.searchsorted(starts.to(idx.dtype), positions.to(idx.dtype), right=True) - 1
    f64 = torch.float64
    keep = (idx != module.padding_idx) if module.padding_idx is not None else idx >= 0
    count = torch.zeros(b, dtype=f64, device=device).index_add_(0, bag, keep.to(f64))
    gg = g.detach().to(f64).pow(2).sum(1)
    if module.mode == "max":
        return {"weight": (gg * (count > 0)).float()}
    c = keep.to(f64)
    if weights is not None:
        c = c * weights.detach().to(f64)
    if module.mode == "mean":
        c = c / count[bag].clamp(min=1)
    key, order = (bag * module.num_embeddings + idx).sort()
    total = c[order].cumsum(0)
    position = torch.arange(key.numel(), device=device)
    last = torch.ones_like(key, dtype=torch.bool)  # the last entry of each run of a key
    last[:-1] = key[1:] != key[:-1]
    ends = torch.where(last, position, -1)
    before = torch.cat([ends.new_full((1,), -1), ends[:-1]]).cummax(0).values  # the last run's end
    run = total - torch.where(before >= 0, total[before.clamp(min=0)], 0.0)  # its Σ cₜ
    sq = torch.zeros(b, dtype=f64, device=device).index_add_(
        0, key // module.num_embeddings, torch.where(last, run * run, 0.0)
    )
    return {"weight": (gg * sq).float()}


def _bag_check(module: nn.EmbeddingBag, bound: dict[str, Any], output: Any, b: int) -> str | None:
    """Why an EmbeddingBag's call cannot be measured by its closed form, or None: its output's
    rows must be the batch's samples' bags, (B, D), from a 2-D input or offsets of B bags."""
    idx, offsets = bound.get("input"), bound.get("offsets")
    weights = bound.get("per_sample_weights")
    if not isinstance(output, Tensor) or output.dim() != 2 or output.shape[0] != b:
        return f"its output does not have the batch ({b}) as dimension 0"
    if not isinstance(idx, Tensor) or idx.dim() not in (1, 2):
        return "an input that is not a 1-D or 2-D tensor of indices"
    if idx.dim() == 2 and (offsets is not None or idx.shape[0] != b):
        return f"a 2-D input whose rows are not the batch's {b} bags"
    n = b + int(module.include_last_offset)
    if idx.dim() == 1 and (not isinstance(offsets, Tensor) or tuple(offsets.shape) != (n,)):
        return f"offsets that do not make the batch's {b} bags"
    if weights is not None and (not isinstance(weights, Tensor) or weights.shape != idx.shape):
        return "per_sample_weights not of its input's shape"
    return None


def _cell_check(bound: dict[str, Any], outputs: list[Tensor], b: int) -> str | None:
    """Why a torch RNN cell's call cannot be measured per sample, or None: its input, its
    state (``hx``, a tensor or an LSTMCell's (h, c)) and its outputs must be batched (2-D),
    the batch (``b``) as dimension 0."""
    x, hx = bound.get("input"), bound.get("hx")
    if not isinstance(x, Tensor) or any(
        t.dim() != 2 or t.shape[0] != b for t in [x, *_tensors(hx)]
    ):
        return f"an unbatched call, or its input or state without the batch ({b}) as dimension 0"
    if any(t.dim() != 2 or t.shape[0] != b for t in outputs):
        return f"an output without the batch ({b}) as dimension 0"
    return None


def _inputs_in(
    call: _Call, dtype: torch.dtype
) -> tuple[Tensor, tuple[Tensor, ...], list[int | None]]:
    """A generic unit call's first input, its other tensor inputs (in its other positional
    arguments, then in those given by name, in order, nested in tuples, lists or dicts:
    :func:`_call_inputs` puts them back) and which dimension of each is the batch (None: the
    input is passed whole to each sample): as the check forward on a few samples saw it
    (``call.at``), else dimension 0 where it has the batch's size; the batched floating ones
    and the first in ``dtype`` (the parameters'), as its recomputations take them."""
    a, slots = call.args[0], _slots(call.args, call.kwargs)
    b = a.shape[call.dim]
    dims = [
        call.at[slot] if slot in call.at else 0 if t.dim() > 0 and t.shape[0] == b else None
        for slot, t in slots
    ]
    rest = tuple(t.to(dtype) if d is not None and t.is_floating_point() else t
                 for (_, t), d in zip(slots, dims, strict=True))  # fmt: skip
    return (a.to(dtype) if a.is_floating_point() else a), rest, dims


def _labelled(obj: Any, label: str) -> list[tuple[str, Tensor]]:
    """The tensors in ``obj``, in :func:`_tensors`'s order, each with where it is in it."""
    if isinstance(obj, Tensor):
        return [(label, obj)]
    if isinstance(obj, dict):
        items = [(f"{label}[{k!r}]", v) for k, v in obj.items()]
    elif isinstance(obj, (tuple, list)):
        items = [(f"{label}[{i}]", v) for i, v in enumerate(obj)]
    else:
        return []
    return [pair for where, v in items for pair in _labelled(v, where)]


def _slots(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[str, Tensor]]:
    """A unit call's tensor inputs but its first, in :func:`_inputs_in`'s order, each with
    where it is given: its argument's position or name, and its place in a tuple, list or dict
    (``argument 2[0]``, ``masks[1]``)."""
    given = [pair for i, v in enumerate(args[1:], 1) for pair in _labelled(v, f"argument {i}")]
    return given + [pair for k, v in kwargs.items() for pair in _labelled(v, k)]


def _sized_like_batch(args: tuple[Any, ...], kwargs: dict[str, Any], b: int) -> dict[str, Any]:
    """A unit call's other tensor inputs with ``b`` (the batch's size) as a dimension, by
    slot (:func:`_slots`): their shapes."""
    return {slot: tuple(t.shape) for slot, t in _slots(args, kwargs) if b in t.shape}


def _sample_inputs(
    rest: tuple[Tensor, ...], dims: list[int | None], rows: Sequence[Tensor]
) -> list[Tensor]:
    """A generic unit's other tensor inputs for one sample: ``rows`` (each batched one's
    slice, in order, as vmap hands them) with a batch dimension of 1 where it was, the others
    whole."""
    given = iter(rows)
    return [r if d is None else next(given).unsqueeze(d) for r, d in zip(rest, dims, strict=True)]


def _batched(rest: tuple[Tensor, ...], dims: list[int | None]) -> tuple[list[Tensor], list[int]]:
    """A generic unit's other tensor inputs that hold the batch, and the dimension of each:
    what vmap maps over beside its first input."""
    pairs = [(r, k) for r, k in zip(rest, dims, strict=True) if k is not None]
    return [r for r, _ in pairs], [k for _, k in pairs]


def _one_sample(
    call: _Call,
    state: dict[str, Tensor],
    first: Tensor,
    rest: tuple[Tensor, ...],
    dims: list[int | None],
    rows: Sequence[Tensor],
) -> list[Tensor]:
    """A generic unit's outputs that took a gradient in the step, its forward run on one
    sample (under vmap: its first input ``first`` and its batched inputs' ``rows``, the
    others whole) with parameters and buffers ``state``."""
    others = _sample_inputs(rest, dims, rows)
    result = functional_call(
        call.unit, state, *_call_inputs(call, first.unsqueeze(call.dim), others)
    )
    outs = _outputs_of(result, call)
    if outs is None:
        raise ValueError("its forward on one sample gives other outputs")
    return outs


def _call_inputs(call: _Call, first: Tensor, others: Sequence[Tensor]) -> tuple[tuple, dict]:
    """A generic unit's arguments from its first input and its other tensor inputs
    ``others``, in the order :func:`_inputs_in` gives them, put where the call had them."""
    given = iter(others)
    args = _map_tensors(call.args[1:], lambda _: next(given))
    kwargs = _map_tensors(call.kwargs, lambda _: next(given))
    return (first, *args), kwargs


def _outputs_of(result: Any, call: _Call) -> list[Tensor] | None:
    """A generic unit's outputs that took a gradient in the step (their places among its
    tensor outputs, ``call.kept``) from a recomputation's ``result``; None where it gives
    another number of tensor outputs."""
    got = _tensors(result)
    if len(got) != call.count:
        return None
    return [got[i] for i in call.kept]


def _outputs_root(outs: list[Tensor], grads: Sequence[Tensor | None]) -> Tensor | None:
    """Σₖ ⟨outₖ, gₖ⟩ over a unit's outputs (those that reach its parameters) and the gradients
    ``grads`` their hooks got in the step (None: none reached it), whose gradient for the
    parameters is the step's: each output's hook here hands what produced it gₖ alone. Where
    one output is computed from another (an LSTM cell of one's own, its h from its c), the
    gradient the step's hook got at c holds the path through h already, and the plain sum
    counted it twice: 14 % off at coverage 1, this session's first version; the hook cuts what
    reaches c inside, so each output counts with the others held. None where no output reaches
    the parameters. A sample's output squeezed, ``(x @ w).squeeze()``, is its row without its
    sizes of 1 (no broadcast: otherwise ValueError)."""
    terms = []
    for out, g in zip(outs, grads, strict=True):
        if g is None or not out.requires_grad:
            continue
        if out.shape != g.shape:
            if [n for n in out.shape if n != 1] != [n for n in g.shape if n != 1]:
                raise ValueError(
                    f"its output on one sample has shape {tuple(out.shape)}, not {tuple(g.shape)}"
                )
            g = g.reshape(out.shape)
        g = g.to(out.dtype)
        if len(outs) > 1:
            out.register_hook(lambda _, g=g: g)
        terms.append((out * g).sum())
    return sum(terms[1:], terms[0]) if terms else None


def _lstm_cell(p: dict[str, Any], x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """torch's LSTMCell, (h′, c′) from ``x`` and ``state`` = (h, c) with weights ``p`` (a bias
    may be None): gates = x W_ihᵀ + b_ih + h W_hhᵀ + b_hh, split into i, f, g, o; c′ = σ(f)·c +
    σ(i)·tanh(g); h′ = σ(o)·tanh(c′), through c′ detached (its gradient holds that path)."""
    h, c = state
    gates = F.linear(x, p["weight_ih"], p["bias_ih"]) + F.linear(h, p["weight_hh"], p["bias_hh"])
    i, f, g, o = gates.chunk(4, 1)
    c2 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c2.detach()), c2


def _reaches(fn: Any, target: Any, depth: int = 4) -> bool:
    """Whether autograd node ``target`` is among the nodes ``fn`` leads to, ``depth`` steps at
    most (not ``fn`` itself: two outputs of one node)."""
    if fn is None or target is None:
        return False
    level = [fn]
    for _ in range(depth):
        level = [n for f in level for n, _ in f.next_functions if n is not None]
        if any(n is target for n in level):
            return True
    return False


def sample_coefficients(c: Tensor) -> Tensor:
    """One coefficient per sample, (B,), from the loss elements' coefficients.

    Per-sample losses: c itself. Per-token losses (B, T): sample i's gradient is that of
    Σ_t c_it ℓ_it; when its nonzero coefficients are all equal (any uniform weighting, either
    ``loss.average``) that is cᵢ ∇Σ_t ℓ_it and cᵢ is returned, so the unweighted norm is that
    of the sequence's summed token loss. Tokens weighted unequally (``per_token``) have no
    such factor: NaN (the unweighted norm is then not reported for that sequence; the weighted
    one still is).
    """
    if c.ndim == 1:
        return c
    flat = c.flatten(1)  # (a data-parallel rank without samples here: (0, T), no reshape)
    top = flat.abs().amax(dim=1)  # (B,)
    equal = ((flat != 0) & (flat != top[:, None])).sum(dim=1) == 0
    return torch.where(equal, top, torch.nan)


# ----------------------------------------------------------------------------- units and calls

#: the noise-scale scalars (PerSampleNorms._statistics), staged as one vector with the SNRs
NOISE_TAGS = ("per_sample/grad_var_trace", "per_sample/grad_signal", "per_sample/noise_scale",
              "per_sample/noise_scale_ema")  # fmt: skip

#: the largest relative error a float16/bfloat16 step gradient's rounding may bound the
#: SNRs and the noise scale's tr(Σ) by before they are NaN (:meth:`PerSampleNorms._noise_scale`)
ROUNDED_LIMIT = 0.05
#: the unit roundoff of the sums the noise scale and the SNRs are computed from: float32, as
#: the per-sample rows are for every model (:meth:`PerSampleNorms._noise_scale`)
SUMS_U = 2.0**-24

#: materialize at most this many bytes of one parameter's per-sample gradients (B × its size),
#: which a parameter used more than once per forward needs (tied weights, a layer called twice)
MATERIALIZE_BYTES = 2**28


def _tensors(obj: Any) -> list[Tensor]:
    """The tensors in ``obj`` (a tensor, or nested tuples/lists/dicts of them), in order."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = obj.values()
    elif not isinstance(obj, (tuple, list)):
        return []
    out: list[Tensor] = []
    for x in obj:  # (no call per leaf: this runs on each function of a measured forward)
        if isinstance(x, Tensor):
            out.append(x)
        elif isinstance(x, (tuple, list, dict)):
            out.extend(_tensors(x))
    return out


def _requires_grad(obj: Any) -> bool:
    return any(t.requires_grad for t in _tensors(obj))


class _OutsideUses(TorchFunctionMode):
    """While a measured forward runs: records each parameter that enters a differentiable
    computation while no unit covering it is running (``F.linear(x, child.weight)`` in a parent,
    a weight tied by hand into another module's forward). Its per-sample part is not seen by any
    hook, so it cannot be measured: the unit is left out and named."""

    def __init__(
        self,
        units_of: dict[int, list[nn.Module]],
        active: dict[nn.Module, int],
        on_mixing: Any = None,
    ):
        super().__init__()
        self.units_of, self.active = units_of, active
        #: called with the function's name when a normalization with the batch's statistics
        #: runs (``F.batch_norm(training=True)``, in a BatchNorm or in a layer of one's own)
        self.on_mixing = on_mixing
        self.outside: dict[nn.Module, str] = {}  # unit -> the function that used its parameter
        #: units whose parameter an embedding with ``scale_grad_by_freq`` looked up: its
        #: gradient is divided by each index's count over the whole batch
        self.freq_scaled: dict[nn.Module, str] = {}
        #: set while the instrument's own forward hooks run: their calls (detach, shape checks,
        #: register_hook, a tensor's properties) are not the model's, and pass straight through
        self.paused = False
        #: units of one's own whose calls' parameter uses are kept (:func:`_own_edges`), and,
        #: per unit, the autograd nodes of the results of each function that took one of its
        #: parameters while its forward ran (taken by its forward hook)
        self.watched: set[nn.Module] = set()
        self.uses: dict[nn.Module, list[Any]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **kwargs) if kwargs else func(*args)
        if self.paused:
            return out
        if func in _BATCH_STATISTICS and self.on_mixing is not None and (
            kwargs.get("training") if kwargs and "training" in kwargs
            else len(args) > 5 and args[5]
        ):  # fmt: skip
            self.on_mixing(f"{getattr(func, '__name__', 'batch_norm')}(training=True)")
        where = _FREQ_SCALED.get(func)
        if where is not None:
            weight = kwargs.get("weight") if kwargs and "weight" in kwargs else (
                args[where[0]] if len(args) > where[0] else None)  # fmt: skip
            flag = kwargs.get("scale_grad_by_freq") if kwargs and "scale_grad_by_freq" in kwargs \
                else len(args) > where[1] and args[where[1]]  # fmt: skip
            if flag and isinstance(weight, Tensor):
                units = self.units_of.get(id(weight))
                if units is None and weight.requires_grad:  # a weight computed from
                    # parameters (a parametrization's): the units running now (a probe's
                    # weight_norm'd Embedding, 0.6 % off at coverage 1)
                    units = [u for u, n in self.active.items() if n > 0]
                for unit in units or ():
                    self.freq_scaled.setdefault(unit, getattr(func, "__name__", str(func)))
        # a use on the graph (not metadata)
        if out.requires_grad if isinstance(out, Tensor) else _requires_grad(out):
            units_of, active = self.units_of, self.active
            for t in _tensors((args, kwargs) if kwargs else args):
                units = units_of.get(id(t))
                if not units:
                    continue
                if not any(active.get(u) for u in units):
                    for unit in units:  # every unit the parameter is registered in
                        self.outside.setdefault(unit, getattr(func, "__name__", str(func)))
                    continue
                for unit in units:
                    if unit in self.watched and active.get(unit):
                        nodes = self.uses.setdefault(unit, [])
                        nodes.extend(o.grad_fn for o in _tensors(out) if o.grad_fn is not None)
        return out


#: normalizations that may use the batch's statistics (their ``training`` flag: the 6th
#: argument of both)
_BATCH_STATISTICS = frozenset({F.batch_norm, torch.batch_norm})
#: lookups whose ``scale_grad_by_freq`` divides the weight's gradient by each index's count
#: in the whole batch (the positions of the weight and of the flag among the arguments)
_FREQ_SCALED = {F.embedding: (1, 5), F.embedding_bag: (1, 5), torch.embedding: (0, 3)}


def _batch_statistics(module: _BatchNorm) -> bool:
    """Whether a BatchNorm normalizes with the batch's statistics in its next forward: in
    training mode, or without running statistics (``track_running_stats=False``) in either."""
    return module.training or (module.running_mean is None and module.running_var is None)


#: the layers with a closed form, and the methods of theirs it assumes (a subclass that
#: overrides one uses its weight in its own way: weight standardization, a gain)
_CLOSED_FORMS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Linear: ("forward",),
    nn.Conv1d: ("forward", "_conv_forward"),
    nn.Conv2d: ("forward", "_conv_forward"),
    nn.LayerNorm: ("forward",),
    nn.Embedding: ("forward",),
    nn.EmbeddingBag: ("forward",),
}


def _unit_kind(module: nn.Module) -> str:
    if isinstance(module, nn.MultiheadAttention):
        return "attention"
    if isinstance(module, nn.RNNBase):
        return "rnn"
    for cls, methods in _CLOSED_FORMS.items():
        if isinstance(module, cls):
            stock = all(getattr(type(module), m) is getattr(cls, m) for m in methods)
            freq = cls in (nn.Embedding, nn.EmbeddingBag) and module.scale_grad_by_freq
            if stock and not freq and _own(module):
                return "closed"
            break  # (a subclass of its own forward: recomputed per sample like any module)
    return "func"


def _own(module: nn.Module) -> bool:
    """Whether the module's ``weight`` and ``bias`` are its own registered parameters, and
    its only ones: the closed forms file a per-sample part under them. Not so under
    ``torch.nn.utils.weight_norm`` (``weight`` computed from ``weight_g`` and ``weight_v`` by a
    forward pre-hook) or ``torch.nn.utils.prune`` (from ``weight_orig`` and a mask), nor under
    a parametrization (``torch.nn.utils.parametrize``) of either: the part went to a computed
    tensor, the parameters got none, and the unit counted as captured."""
    if parametrize.is_parametrized(module):  # (a bias parametrized alone left the weight
        return False  # its own: the closed form read the computed bias, its originals none)
    own = {n for n, v in module._parameters.items() if v is not None}  # (not getattr: a
    return "weight" in own and own <= {"weight", "bias"}  # parametrization would run)


def _batch_dims(
    module: nn.Module, kind: str, first: Tensor, out: Tensor, b: int
) -> tuple[int, ...]:
    """The dimensions of a closed-form or generic unit's input and output that may hold the
    batch (``b`` samples): 0, batch-first, and 1, sequence-first ((T, B, ·), as torch's layers
    with ``batch_first=False`` pass it on), where the layer allows it (a Linear's input needs
    3 dimensions, a LayerNorm's 2 besides its normalized ones; a convolution's dimension 1 is
    its channels). Which one does is settled by :meth:`PerSampleNorms._verify`."""
    dims = []
    if first.shape[:1] == (b,) and out.shape[:1] == (b,):
        dims.append(0)
    if _cell(module):  # (batch-first, 2-D: checked)
        least: int | None = None
    elif kind == "func" or isinstance(module, nn.Embedding):
        least = 2
    elif isinstance(module, nn.Linear):
        least = 3
    elif isinstance(module, nn.LayerNorm):
        least = len(module.normalized_shape) + 2
    else:
        least = None
    if (
        least is not None
        and first.dim() >= least
        and out.dim() >= 2
        and first.shape[1] == b
        and out.shape[1] == b
    ):
        dims.append(1)
    return tuple(dims)


def _scaled(shape: tuple[int, ...], dim: int, n: int) -> tuple[int, ...]:
    """``shape`` with dimension ``dim`` of size ``n``."""
    return (*shape[:dim], n, *shape[dim + 1 :])


def _keyed(key: tuple[str, int], dim: int) -> tuple[Any, ...]:
    """A unit call's key in the mixing check, by the dimension its batch is in: (unit, call)
    batch-first, (unit, call, 1) sequence-first (one call may be watched at both)."""
    return key if dim == 0 else (*key, dim)


#: why a TorchScript unit is left out
SCRIPTED = (
    "a TorchScript module (torch.jit.script/trace): no forward hook can be registered on it, "
    "so its inputs and its output's gradient are not seen"
)

#: why a unit whose input is changed in place, in its forward or after it, is left out
IN_PLACE = (
    "its input is changed in place (in its forward, or after it), so the input its per-sample "
    "part is computed from is gone"
)

#: why a unit after which the model mixes the samples is left out
MIXED = (
    "the model mixes or reorders the samples after it (a normalization with the batch's "
    "statistics of its own, a sort of the batch: its output for one sample reached the others' "
    "outputs; or its own output for a sample is another alone than in the batch, or its "
    "samples' gradients alone do not add up to the batch's: it reads the batch's size or "
    "values, or state its own forward changes, a count it routes by), so the step's backward "
    "gives each of its rows other samples' gradients too, or its recomputation per sample is "
    "not what the step computed"
)


def _signature(x: Any) -> tuple[Any, ...]:
    """The shapes and dtypes of a batch's inputs: what a check of the model's forward holds
    for."""
    return tuple((tuple(t.shape), str(t.dtype)) for t in _tensors(x))


def _parameters_of(obj: Any) -> dict[int, Any]:
    """A :func:`copy.deepcopy` memo sharing the parameters of ``obj`` (a module) and of the
    modules among its attributes: a copy of a loss holding a teacher model is the loss's
    state, not another teacher. (Buffers are copied: a forward may update them.)"""
    modules = [obj] if isinstance(obj, nn.Module) else []
    modules += [v for v in getattr(obj, "__dict__", {}).values() if isinstance(v, nn.Module)]
    return {id(p): p for m in modules for p in m.parameters()}


def _loss_copy(loss: Any, model: nn.Module) -> Any:
    """A copy of the loss for a check's forward (a call may advance its own state, a counter):
    the parameters of modules it holds (a distillation's teacher) are shared, not copied once
    per check; so are the model's own modules it holds (a head it applies itself: a copy of
    it is no unit, and its hooks failed the check).

    Raises:
        Exception: what the object's pickling raises (a lock it holds)."""
    memo = {**_parameters_of(loss), **{id(m): m for m in model.modules()}}
    return copy.deepcopy(loss, memo)


def _tuples(obj: Any) -> Any:
    """Lists (as a checkpoint keeps them) back into tuples, nested."""
    return tuple(_tuples(v) for v in obj) if isinstance(obj, (list, tuple)) else obj


class _Probe(nn.Module):
    """The model and what is done with its output, as one module: ``functional_call`` then
    keeps its parameters and buffers swapped for the check's own during the backwards too
    (tensor hooks the model's forward registered fire there)."""

    def __init__(self, model: nn.Module, then: Any) -> None:
        super().__init__()
        self.model, self.then = model, then

    def forward(self, x: Any) -> Any:
        return self.then(self.model(x))


def _mixing_passes(
    losses: Tensor,
    watched: list[tuple[Any, int, Tensor | None]],
    grads: dict[int, Tensor],
    p: int,
    inside: list[tuple[Any, Tensor]] = (),  # type: ignore[assignment]
) -> set[Any] | None:
    """The keys of ``watched`` (key, the batch dimension, of size ``p``, of a tensor whose
    gradient a hook keeps in ``grads`` under its index: registered as the forward made it, so
    an in-place change after that is part of what follows it; or, for a packed sequence's
    data, dimension 0 and the sample of each row) one of whose rows reaches another sample's
    loss.

    For each bit b of the row index and each of its values v: backpropagate Σ over the rows k
    with bit b = v of ⟨r_k, ℓ_k⟩ (r: fixed random numbers, so no sum cancels) and look at the
    other rows j of every watched tensor, whose gradient is exactly 0 unless row j reaches a
    loss ℓ_k with k ≠ j. Rows j ≠ k differ in some bit, so any pair is seen: 2·⌈log2 p⌉
    backwards. ``.backward()`` (not ``autograd.grad`` with ``inputs``: a reentrant
    activation checkpoint refuses that), into the check's own leaves. ``inside``: (key, a
    device flag) found by value (:meth:`PerSampleNorms._check_mixing`), read with the rest.
    None where a loss is not finite (its NaN gradients would read as reaching every row):
    nothing is settled. A NaN gradient elsewhere (0/0: a square root at 0 of a row no chosen
    loss reaches) is no evidence."""
    device = losses.device
    gen = torch.Generator(device=device).manual_seed(0)  # (not the run's random states)
    r = torch.rand(losses.shape, generator=gen, device=device).add_(0.5).to(losses.dtype)
    rows = torch.arange(p, device=device)
    bits = max(1, math.ceil(math.log2(p)))
    hits = []
    finite = [torch.isfinite(losses).all()]
    none = torch.zeros((), dtype=torch.bool, device=device)  # (no gradient reached it)
    for bit in range(bits):
        for v in (0, 1):
            chosen = ((rows >> bit) & 1) == v
            if not bool(chosen.any()) or bool(chosen.all()):  # host read: once a check
                continue
            grads.clear()
            ((losses * r)[chosen].sum()).backward(retain_graph=True)
            hits.append(torch.stack([
                none if i not in grads
                else _nonzero(grads[i].index_select(d, rows[~chosen])) if owner is None
                else _nonzero_rows(grads[i], ~chosen[owner])
                for i, (_, d, owner) in enumerate(watched)
            ]))  # fmt: skip
    keys = [key for key, _, _ in watched] + [key for key, _ in inside]
    flags = [torch.stack(hits).any(0)] if hits and watched else []
    flags += [torch.stack([flag for _, flag in inside])] if inside else []
    read = torch.cat([torch.stack(finite).all().reshape(1), *flags]).tolist()  # host sync:
    if not read[0]:  # once per new input signature
        return None
    return {key for key, h in zip(keys, read[1:], strict=True) if h}


def _versions(obj: Any) -> list[int]:
    """The version counters of the tensors in ``obj`` (-1 for an inference tensor, which keeps
    none: made under ``torch.inference_mode``, it cannot be changed in place outside it).
    Read with torch-function handling off: under the outside-use mode (the unit pre-hooks' and
    output hooks' reads, 5 per unit and measured forward) each read was a Python dispatch
    through the mode, ≈ 4 µs a tensor; reading a counter is nobody's use of a tensor."""
    with torch._C.DisableTorchFunction():
        return [_version(t) for t in _tensors(obj)]


def _version(t: Tensor) -> int:
    return -1 if t.is_inference() else t._version


def _nonzero(g: Tensor) -> Tensor:
    """Whether any entry is nonzero and not NaN (0/0 where no gradient arrives: a square root
    at 0), on the device."""
    return (g.ne(0) & ~g.isnan()).any()


def _moves_other_rows(
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    output: Tensor,
    fork: Fork,
    busy: list[bool],
    dim: int = 0,
    begun: list[tuple[nn.Module, dict[str, Any]]] | None = None,
    buffers: dict[str, Tensor] | None = None,
) -> Tensor | None:
    """Whether a generic unit mixes the samples by value (detached batch statistics, token ids
    in, features from under no_grad: no gradient shows it), on the device: its forward again,
    with the same random draws (``fork``, taken before its call), once on the same input and
    once with the first sample's input replaced by the second's (along ``dim``, 1 for a
    sequence-first one); where the first gives its output back bit for bit, the other rows of
    the second must be it too (within √ε of the output's largest magnitude), and each sample
    run alone must give its row back
    (:func:`_alone_differs`). None where that cannot be told (its forward raises, or does not
    give its output back: a counter of its own, state it updates), which is no evidence either
    way. ``busy`` is set while it runs: the check's hooks do not count the calls of its
    children. Each run starts from the plain attributes ``begun`` (:func:`plain_attributes`
    as its call began: a counter of its own steering its output is where it was; without,
    such a unit was never compared alone, and one also reading a value of the whole batch
    was measured 31 % off at coverage 1, a probe's), and they are as they were after."""
    if args[0].dim() <= dim:
        return None
    with attributes_kept(module):
        after = Fork(output.device)
        outs = []
        busy[0] = True
        try:
            for swap in (False, True):
                first = args[0].detach().clone()
                if swap:
                    first.select(dim, 0).copy_(first.select(dim, 1))
                fork.rewind()
                with torch.no_grad():  # (detached below: no graph, none saved)
                    again = _again(module, begun or [], buffers or {}, first, args, kwargs)
                if not isinstance(again, Tensor) or again.shape != output.shape:
                    return None
                outs.append(again.detach())
        except Exception:  # noqa: BLE001 (a forward that cannot run again so: no evidence)
            return None
        finally:
            busy[0] = False
            after.rewind()  # (what follows draws as it would have)
        same, swapped = outs
        kept = output.detach()
        if not bool(((same == kept) | (same.isnan() & kept.isnan())).all()):  # host read: once
            return None  # (per generic unit and check)
        rest = output.shape[dim] - 1
        swapped, others = swapped.narrow(dim, 1, rest), kept.narrow(dim, 1, rest)
        moved = (swapped != others) & ~(swapped.isnan() & others.isnan())
        if kept.is_floating_point():  # (a rounding of each row apart: a mixture of experts
            # routing the first sample elsewhere feeds its experts other numbers of rows,
            # whose kernels round the others' rows otherwise, by an ε or so; bit for bit, a
            # top-1 mixture of experts declared a unit was left out on digits in float32)
            moved &= (swapped - others).abs() > _row_rounding(others, dim)
        moved = moved.any()
        alone = _alone_differs(
            module, args, kwargs, kept, fork, busy, dim, begun or [], buffers or {}
        )
        return moved if alone is None else moved | alone


def _row_rounding(rows: Tensor, dim: int) -> Tensor:
    """How far a kernel fed another number of rows may round each row of ``rows`` (batch
    dimension ``dim``) apart: √ε of its own largest magnitude, and one ε of the whole's (a
    row of 0s). Per row, not √ε of the whole's largest: a unit adding 3e-4 of the batch's
    detached mean to its input, 0.03 % of the whole, was 38 % off at coverage 1 on a sample
    whose input was 1e-4 of the others' (a review's); nor K·ε of the whole's for a sample's
    input of K values, which passed √ε of it past K = 1/√ε (a (3, 32, 32) image: 20 % off
    at coverage 1, another review's). A row after a cancellation, its rounding past √ε of
    its own largest, is left out (no evidence it does not mix)."""
    eps = torch.finfo(rows.dtype).eps
    finite = rows.abs().nan_to_num(0, 0, 0)
    if not finite.numel():  # (an output of no values: nothing moved; amax() raised, and the
        return finite  # whole check failed, every unit left out, a review's)
    other = [d for d in range(rows.dim()) if d != dim]
    own = finite.amax(dim=other, keepdim=True) if other else finite
    return eps**0.5 * own + eps * finite.amax()


def _alone_differs(
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    kept: Tensor,
    fork: Fork,
    busy: list[bool],
    dim: int,
    begun: list[tuple[nn.Module, dict[str, Any]]],
    buffers: dict[str, Tensor],
) -> Tensor | None:
    """Whether a generic unit gives a sample another output alone than in the batch, on the
    device: its forward reads the batch's size (``h * x.shape[0] ** 0.5``) or a value of the
    whole batch, and its recomputation per sample, which sees a batch of one, is not what the
    step computed (34 % off at coverage 1: a probe's).

    Each of the check's samples runs alone (the first alone missed a small or blank one: a
    review's), and its output must be its row of the batch's within √ε of the dtype
    (:func:`_loose`: of TF32 on CUDA where torch may use it), relative to the output's
    largest magnitude: a batched kernel rounds otherwise than a one-sample
    one, by a few ε per reduction step (relative to each row's own largest, a row of one value
    near 0 was flagged for rounding: a review's). The sum of its samples' gradients alone
    must also be the batch's (:func:`_batch_gradient_differs`: values can hide what gradients
    show). None where that cannot be told: its forward on one sample raises, has another
    shape or draws random numbers. (An output of 0 at the check, of zero-initialized weights,
    shows nothing: its unit is not counted as checked.)"""
    if not kept.is_floating_point() or not kept.numel():
        return None
    after = Fork(kept.device)
    busy[0] = True
    params: list[Tensor] = (
        [p for p in module.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
    )
    # a fixed random cotangent r (not the run's random states): Σᵢ of the samples' gradients
    # of ⟨rᵢ, f(xᵢ)⟩ alone must be the batch's gradient of ⟨r, f(X)⟩
    gen = torch.Generator(device=kept.device).manual_seed(1)
    r = torch.rand(kept.shape, generator=gen, device=kept.device).add_(0.5).to(kept.dtype)
    sums: list[Tensor | None] = [None] * len(params)
    spreads: list[Tensor | None] = [None] * len(params)  # Σᵢ |their gradients|
    try:
        rows = []
        for i in range(kept.shape[dim]):
            fork.rewind()
            one = args[0].detach().narrow(dim, i, 1).clone()
            alone = _again(module, begun, buffers, one, args, kwargs)
            if fork.drew() or not isinstance(alone, Tensor):
                return None
            shape = kept.narrow(dim, i, 1).shape
            if alone.shape != shape:  # (a squeezed one: its row without the sizes of 1, as
                # the recomputation per sample takes it)
                if [n for n in alone.shape if n != 1] != [n for n in shape if n != 1]:
                    return None
                alone = alone.reshape(shape)
            if params and alone.requires_grad:
                got = torch.autograd.grad(  # (retained: a weight a pre-hook computed in
                    (alone * r.narrow(dim, i, 1)).sum(),  # the check's forward is shared
                    params,  # with its graph, which its backwards still need)
                    allow_unused=True,
                    retain_graph=True,
                )
                sums = [g if s is None else s if g is None else s + g
                        for s, g in zip(sums, got, strict=True)]  # fmt: skip
                spreads = [g.abs() if s is None else s if g is None else s + g.abs()
                           for s, g in zip(spreads, got, strict=True)]  # fmt: skip
            rows.append(alone.detach())
        alone = torch.cat(rows, dim)
        scale = kept.abs().nan_to_num(0, 0, 0).amax()
        off = (alone - kept).abs() > _loose(kept.device, kept.dtype) * scale
        differs = (off & ~(alone == kept) & ~(alone.isnan() & kept.isnan())).any()
        grads_differ = _batch_gradient_differs(
            module, args, kwargs, r, params, sums, fork, begun, kept.shape[dim], spreads, buffers
        )
        return differs if grads_differ is None else differs | grads_differ
    except Exception:  # noqa: BLE001 (a forward that cannot run on one sample: no evidence)
        return None
    finally:
        busy[0] = False
        after.rewind()


def _again(
    module: nn.Module,
    begun: list[tuple[nn.Module, dict[str, Any]]],
    buffers: dict[str, Tensor],
    first: Tensor,
    args: tuple,
    kwargs: dict,
) -> Any:
    """A check's run of a generic unit's forward again on ``first`` (copies of its other
    inputs), from the plain attributes ``begun`` and copies of the buffers ``buffers`` its
    call began with: the check's own forward may have saved a buffer it then changed in place
    (a counter it divides by), and a run on the buffer itself advanced it under that graph,
    whose backward failed, and every unit was left out (a review's)."""
    set_plain_attributes(begun)
    with swapped(module, {n: b.clone() for n, b in buffers.items()}):
        return module.forward(first, *_copies(args[1:]), **_copies(kwargs))


def _saved_as_they_are() -> contextlib.AbstractContextManager[Any]:
    """Tensors saved for backward kept as themselves (the innermost saved-tensor hooks are
    the ones autograd uses): a check's runs of a unit again, inside a non-reentrant
    activation checkpoint's forward, saved tensors its recomputation then did not, and
    torch's CheckpointError failed the check, every unit left out on every step (a probe's)."""
    return torch.autograd.graph.saved_tensors_hooks(_itself, _itself)


def _itself(t: Any) -> Any:
    return t


def _copies(obj: Any) -> Any:
    """``obj`` with each tensor in it a detached copy: a unit's other inputs for a check's run
    of its forward again, which may change them in place (the check's own forward saved them
    for its backward: a counter advanced in place failed the check, and every unit was left
    out; the parameters' gradients do not depend on whether they are detached)."""
    return _map_tensors(obj, lambda t: t.detach().clone())


def _loose(device: torch.device, *dtypes: torch.dtype) -> float:
    """√ε of the coarsest of ``dtypes`` (and of TF32, on CUDA where torch may use it for a
    matmul or a cuDNN convolution): how far a batched kernel and a one-sample one may round
    apart, relative to the largest magnitude, in the alone-vs-batch checks."""
    eps = max(torch.finfo(d).eps for d in dtypes)
    if device.type == "cuda" and (
        torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
    ):
        eps = max(eps, 2.0**-10)  # (TF32 keeps 10 bits of mantissa)
    return float(eps**0.5)


def _batch_gradient_differs(
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    r: Tensor,
    params: list[Tensor],
    sums: list[Tensor | None],
    fork: Fork,
    begun: list[tuple[nn.Module, dict[str, Any]]],
    n: int,
    spreads: list[Tensor | None],
    buffers: dict[str, Tensor],
) -> Tensor | None:
    """Whether the batch's gradient of ⟨r, f(X)⟩ for a generic unit's parameters differs from
    ``sums``, the sum of its samples' gradients run alone, on the device: the per-sample
    gradients its recomputation gives add up to the step's only where the unit treats its
    samples alone. Values can hide what gradients show: a branch of zero-initialized weights
    reading the batch's size (LoRA's ``(x @ A.T) @ B.T * n ** 0.5`` with B = 0) gives each
    sample its row back, yet scales B's gradient by √n (41-58 % off at coverage 1: a
    review's probe). Within √ε of the coarser of the gradient's and the output's dtypes
    (:func:`_loose`) as :func:`_sums_apart` applies it, ``n`` samples. None where nothing can be
    told (no parameter takes a gradient)."""
    if not params or all(s is None for s in sums):
        return None
    fork.rewind()
    whole = _again(module, begun, buffers, args[0].detach().clone(), args, kwargs)
    if not isinstance(whole, Tensor) or not whole.requires_grad:
        return None
    batch = torch.autograd.grad(
        (whole.reshape(r.shape) * r).sum(), params, allow_unused=True, retain_graph=True
    )
    triples = []
    for a, b, c in zip(sums, batch, spreads, strict=True):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        triples.append((a, b, torch.zeros_like(a) if c is None else c))
    if not triples:
        return None
    return _sums_apart(triples, _loose(r.device, triples[0][0].dtype, r.dtype), n)


def _sums_apart(
    triples: list[tuple[Tensor, Tensor, Tensor]], loose: float, n: int, each: bool = False
) -> Tensor:
    """Whether a sum of ``n`` samples' gradients (each run alone) and the batch's gradient
    differ by more than rounding, for any of a unit's parameters: ``triples`` of (the sum, the
    batch's, Σᵢ of the samples' gradients' magnitudes), on the device. Each element within
    ``loose`` (√ε) of the largest of that Σᵢ |gᵢ| and its parameter's largest magnitude on
    either side, and not within less than min(n·ε, √ε) of the unit's largest.

    Not the unit's largest alone: a parameter whose gradient is 1e-3 of it (a small bias)
    hid per-sample gradients 100 % off, logged 6-10 % off at coverage 1 (a review's). Not the
    parameter's own largest alone: where the samples' gradients cancel in their sum (a bias
    of a head near 0, on a batch with as many samples of each label), both sides are rounding
    noise, which Σᵢ |gᵢ| bounds (a unit on sequences was left out so, its norms exact: a
    review's). The floor: a parameter whose gradient is 0 analytically (a shift before a
    softmax, a bias before an instance norm) holds rounding noise on both sides, as far apart
    as it is large (a review's: such units were left out at √ε of their own scale)."""
    own = torch.stack([
        torch.maximum(a.abs().nan_to_num(0, 0, 0).amax(), b.abs().nan_to_num(0, 0, 0).amax())
        for a, b, _ in triples
    ])  # fmt: skip
    floor = min(n * loose**2, loose) * own.amax()
    flags = [
        ((a - b).abs() > torch.maximum(loose * torch.maximum(c.nan_to_num(0, 0, 0), s), floor))
        & ~(a.isnan() & b.isnan())
        for (a, b, c), s in zip(triples, own, strict=True)
    ]
    apart = torch.stack([f.any() for f in flags])  # (each: one flag per parameter, the
    return apart if each else apart.any()  # floor still the unit's, as above)


def _keep(grads: dict[int, Tensor], i: int, g: Tensor | None) -> None:
    if g is None:  # (an LSTM's unused output, in float32: its hook is called with None)
        return
    grads[i] = g if i not in grads else grads[i] + g


def _renorms(module: nn.Module) -> bool:
    """An ``Embedding`` (or ``EmbeddingBag``) with ``max_norm``: its forward renormalizes the
    rows it looks up, in place."""
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.max_norm is not None


def _renormed_in_place(model: nn.Module) -> dict[str, Tensor]:
    """Copies of the weights a forward rewrites in place (an ``Embedding`` with ``max_norm``
    renormalizes the rows it looks up, not exactly idempotently in float32), by name: a check's
    extra forward runs on them, so measuring leaves the training's weights as they were."""
    names = {id(p): n for n, p in model.named_parameters()}  # (a tied weight: the name it
    # is listed under, which may be another module's, as functional_call takes it)
    copies = {}
    for m in model.modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and _renorms(m) and id(m.weight) in names:
            copies[names[id(m.weight)]] = (  # (requiring a gradient as the weight does: the
                m.weight.detach().clone().requires_grad_(m.weight.requires_grad)  # mixing
            )  # check watches the lookups' rows: left out as unseen, a max_norm table was)
    return copies


@dataclass
class _Call:
    """One forward call of a unit on a measured micro-batch."""

    unit: nn.Module
    args: tuple[Any, ...]  # detached
    kwargs: dict[str, Any]  # detached
    #: the tensor outputs that require grad: their shape, dtype and device, not the tensors
    #: (kept, they held every unit's output until after the backward, the logits (B, T, V)
    #: among them, which the step's backward would have freed: a review measured 35 MiB of a
    #: Transformer's 62 MiB of activations)
    outputs: list[tuple[torch.Size, torch.dtype, torch.device]]
    dims: list[int]  # each output's batch dimension
    grads: dict[int, Tensor] = field(default_factory=dict)  # output index -> its gradient
    #: the autocast the forward ran under (device type, dtype), or None: a recomputation per
    #: sample runs under it too (its saved inputs are in the dtype autocast gave them)
    autocast: tuple[str, torch.dtype] | None = None
    #: (unit name, call within the forward, input shape) when which dimension of its input is
    #: the batch is not known yet (settled after the backward: :meth:`PerSampleNorms._verify`)
    verify: tuple[str, int, tuple[int, ...]] | None = None
    #: (unit name, call within the forward) when whether the model mixes the samples after it
    #: is not known yet for this input (:meth:`PerSampleNorms._check_mixing`, after the backward)
    mixing: tuple[str, int] | None = None
    #: a unit of one's own with ``mixing`` set: whether its output is all 0, on the device (its
    #: mixing check would show nothing of it: not run again for it alone)
    zero: Tensor | None = None
    #: its tensor inputs' version counters after its forward (shared with the detached
    #: aliases kept): where one moved, the input was changed in place since
    versions: list[int] = field(default_factory=list)
    #: a closed-form or generic unit's batch dimension, in its input and output: 0, or 1 for
    #: a sequence-first (T, B, ·) one (where ``verify`` is set: once settled)
    dim: int = 0
    #: the dimensions that may hold its batch (:func:`_batch_dims`), for ``verify``
    candidates: tuple[int, ...] = ()
    #: copies of its buffers as its forward began (:func:`_buffer_copies`): a recomputation's
    buffers: dict[str, Tensor] = field(default_factory=dict)
    #: a generic unit whose forward changed buffers in place: why it is left out unless its
    #: recomputation changes them alike, and copies of them as that forward left them
    #: (:func:`_same_change`)
    changed: tuple[str, dict[str, Tensor]] | None = None
    #: its modules' attributes as its forward began (``swap.plain_attributes``), which a
    #: recomputation starts from
    attributes: list[tuple[nn.Module, dict[str, Any]]] = field(default_factory=list)
    #: an LSTMCell's: its h output computed from its c output (torch's composite cell, on a
    #: CPU), so the gradient c's hook gets includes the path through h
    nested: bool = False
    #: set where the step's backward sent a gradient into a tensor its forward kept beside its
    #: outputs with a path to its parameters (:meth:`PerSampleNorms._hidden_output`)
    hidden: list[bool] = field(default_factory=lambda: [False])
    #: the batch's dimension in a generic unit's other tensor inputs with the batch's size as
    #: a dimension (by their ``_slots``), None for one passed whole, not sliced per sample (a
    #: table or mask as long as the batch by chance, whose size did not follow it), as the
    #: check forward on a few samples saw them (:meth:`PerSampleNorms._verify`)
    at: dict[str, int | None] = field(default_factory=dict)
    #: a generic unit's tensor outputs: how many, and the places of those that took a
    #: gradient in the step (``outputs``) among them (a tuple (h, c) of a cell of one's own)
    count: int = 1
    kept: list[int] = field(default_factory=lambda: [0])
    #: (unit name, call within the forward, (its first input's shape, its other inputs'
    #: slots and shapes)) while which of those hold the batch is not known yet
    sizes: tuple[str, int, Any] | None = None
    #: a unit of one's own: the gradient the step's backward handed its parameters from the
    #: nodes its call made (by name; none yet: {}), whichever way it came, through its
    #: outputs or a tensor kept elsewhere (:meth:`PerSampleNorms._watch`); None: not watched
    sink: _Sink | None = None

    @property
    def real(self) -> dict[str, Tensor] | None:
        return None if self.sink is None else self.sink.real

    #: a generic unit of one's own: the gradient of its outputs alone for its parameters (its
    #: forward run again), each with its samples' Σᵢ |gᵢ|, by name, and the tolerance they
    #: were compared with (:meth:`PerSampleNorms._elsewhere`); empty: none reached them
    batch: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    loose: float = 0.0
    #: a watched call's uses of each parameter (the nodes' places its hooks watch), by name
    uses: dict[str, int] = field(default_factory=dict)

    def moved(self) -> bool:
        return _versions((self.args, self.kwargs)) != self.versions

    @property
    def device(self) -> torch.device:
        return self.outputs[0][2] if self.outputs else torch.device("cpu")

    def autocast_again(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.autocast[0], dtype=self.autocast[1])


def _slice_sample(x: Any, *, dim: int | None, i: int, group: int = 1) -> Any:
    if dim is None or not isinstance(x, Tensor):
        return x
    return x.narrow(dim, i * group, group)


#: where the batch is in a unit's inputs: argument name -> (batch dimension, samples per group)
_Layout = dict[str, tuple[int | None, int]]


def _attention_layout(m: nn.MultiheadAttention, bound: dict[str, Any], b: int) -> _Layout | str:
    d = 0 if m.batch_first else 1
    if not {"query", "key", "value"} <= bound.keys():  # (a subclass of its own forward)
        return "its forward's arguments are not nn.MultiheadAttention's (query, key, value)"
    query = bound["query"]
    if not isinstance(query, Tensor) or query.dim() != 3:
        return "unbatched attention input"
    dims: dict[str, tuple[int | None, int]] = {"query": (d, 1), "key": (d, 1), "value": (d, 1)}
    if bound.get("key_padding_mask") is not None:
        dims["key_padding_mask"] = (0, 1)
    mask = bound.get("attn_mask")
    if mask is not None and mask.dim() == 3:  # (B · heads, L, S)
        dims["attn_mask"] = (0, m.num_heads)
    return dims


def _rnn_layout(m: nn.RNNBase, bound: dict[str, Any], b: int) -> _Layout | str:
    x_key, h_key = _rnn_keys(bound)
    if x_key is None:
        return "no input"
    x = bound[x_key]
    if isinstance(x, PackedSequence):  # (its samples' rows: :func:`_packed_owner`)
        n = int(x.batch_sizes[0]) if x.batch_sizes.numel() else 0  # (on the host)
        if n != b:
            return f"a PackedSequence of {n} sequences, not the batch's {b}"
        return {x_key: (None, 1), **({h_key: (1, 1)} if h_key else {})}
    if not isinstance(x, Tensor):
        return f"an input of type {type(x).__name__}"
    if x.dim() != 3:
        return "unbatched input"
    d = 0 if m.batch_first else 1
    dims: dict[str, tuple[int | None, int]] = {x_key: (d, 1), **({h_key: (1, 1)} if h_key else {})}
    return dims


def _rnn_keys(bound: dict[str, Any]) -> tuple[str | None, str | None]:
    """The names an RNN's forward got its input and initial state under: ``input`` and
    ``hx``, or a subclass's own first, and the next where it holds 3-D tensors (a state; a
    KeyError crashed the step before, then ``forward(x, lengths)`` read lengths as one)."""
    names = list(bound)
    if not names:
        return None, None
    x_key = "input" if "input" in bound else names[0]
    if "hx" in bound:
        return x_key, "hx"
    after = names[names.index(x_key) + 1 :][:1]
    held = _tensors(bound[after[0]]) if after else []
    return x_key, after[0] if held and all(t.dim() == 3 for t in held) else None


def _packed_owner(packed: PackedSequence) -> Tensor:
    """The sample of each row of ``packed.data``, (N,), on its device: its index in the
    batch as the sequences were given. The rows are time-major, ``batch_sizes[t]`` of them at
    step t, of the sequences sorted longest first (``sorted_indices[j]`` is the j-th's index
    as given; None where they were given sorted)."""
    sizes = packed.batch_sizes  # (on the host, as torch keeps them)
    starts = torch.cumsum(sizes, 0) - sizes
    position = torch.arange(int(sizes.sum())) - starts.repeat_interleave(sizes)
    position = position.to(packed.data.device)
    return position if packed.sorted_indices is None else packed.sorted_indices[position]


def _buffer_state(module: nn.Module) -> dict[str, tuple[int, int, int]]:
    """A module's buffers (its children's and its parametrizations' too) by name: (identity,
    version counter, data pointer), which a change in place, by ``.data =`` or by
    reassignment moves."""
    out = {}
    for n, b in module.named_buffers():
        try:
            ptr = b.data_ptr()
        except RuntimeError:  # (a tensor without storage: its identity and version tell)
            ptr = -1
        out[n] = (id(b), _version(b), ptr)
    return out


def _buffer_changes(
    kind: str, before: dict[str, tuple[int, int, int]], now: dict[str, tuple[int, int, int]]
) -> tuple[str, list[str]] | None:
    """Why a unit whose buffers went from ``before`` (as its forward was entered) to ``now``
    cannot be recomputed as it is, and the buffers changed in place (empty where one was
    changed by ``.data =``); None where none changed. Reassigned (a cache rebuilt from the
    shapes) is run again from the same start. ``.data =`` cannot be under torch.func (a
    review's crashed the next step); a change in place from the batch (a running statistic, a
    count of samples) run again on one sample is another change (an RNN's recomputation, one
    sample at a time, read 8.7 % off at coverage 1: a review's): a generic unit's is checked
    (:func:`_same_change`), the others' left out."""
    kept = [n for n, v in now.items() if n in before and before[n][0] == v[0]]
    replaced = [n for n in kept if before[n][2] != now[n][2]]
    in_place = [n for n in kept if before[n][1] != now[n][1]]
    if not replaced and not in_place:
        return None
    return (
        f"its forward changed its buffers ({few(replaced or in_place)}) "
        f"{'by .data =' if replaced else 'in place'} as it ran (a counter, a running "
        "statistic), which a recomputation on one sample would not do as the batch's forward "
        "did"
    ), ([] if replaced else in_place)


def _same_change(after: dict[str, Tensor], runs: list[dict[str, Tensor]]) -> bool:
    """Whether each recomputation left the buffers a unit's forward changed in place as the
    batch's forward left them (``after``); each run started from the values that forward
    began with. Where the change reads no sample (spectral_norm's power iteration, from the
    weight alone) the samples ran with the values the batch's forward used; one from the
    batch (a running statistic, a count of samples) is another change for one sample, and
    the unit is left out. A NaN is no match."""
    flags = [
        (r[n] == b).all() if r[n].shape == b.shape
        else torch.zeros((), dtype=torch.bool, device=b.device)
        for r in runs for n, b in after.items()
    ]  # fmt: skip
    return bool(torch.stack(flags).all())  # host read: per measured call of such a unit


class _NotAlone(Exception):
    """A generic unit's samples alone are not its batch's rows, by value or by the sum of their
    gradients (its message: why)."""


def _container(module: nn.Module | None) -> bool:
    """A ``ModuleList`` or ``ModuleDict``: never called itself."""
    return isinstance(module, (nn.ModuleList, nn.ModuleDict))


def _caller(name: str, by_name: Mapping[str, nn.Module]) -> str | None:
    """The module around the one named ``name`` that calls it on the batch, as far as names
    tell: the nearest enclosing module that is no container (:func:`_container`) nor the
    model, around the nearest container holding it where there is one (an expert's own
    Linear, ``moe.experts.0.fc1``: ``moe``, not its MLP ``moe.experts.0``, itself fed the
    rows routed to it: a researcher's probe); None where there is none."""
    parts = name.split(".")
    ancestors = [".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1)]  # nearest first
    held = next((k for k, a in enumerate(ancestors) if _container(by_name.get(a))), None)
    for a in ancestors[held or 0 :]:
        if not _container(by_name.get(a)):  # (None where listed under another name)
            return a
    return None


def _each_sample(
    call: _Call,
    buffers: dict[str, Tensor],
    first: Tensor,
    given: list[Tensor],
    dims: list[int],
) -> Iterator[tuple[int, dict[str, Tensor], Tensor, list[Tensor]]]:
    """For a unit run one sample at a time, each sample ``i``: its attributes set as its call
    began (a counter of its own), copies of ``buffers``, its row of ``first`` (along the
    call's batch dimension) and of each batched input ``given`` (along ``dims``)."""
    for i in range(first.shape[call.dim]):
        set_plain_attributes(call.attributes)
        fresh = {n: b.clone() for n, b in buffers.items()}
        yield (
            i,
            fresh,
            first.select(call.dim, i),
            [t.select(k, i) for t, k in zip(given, dims, strict=True)],
        )


def _sample_coefficients(n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``n`` fixed random weights in [0.5, 1.5), one per sample (a generator of their own:
    the run's random states are not drawn from)."""
    gen = torch.Generator(device=device).manual_seed(2)
    return torch.rand(n, generator=gen, device=device).add_(0.5).to(dtype)


def _torchs(module: nn.Module) -> bool:
    """Whether ``module``'s class and every class it derives from are torch's own
    (``torch.nn``'s layers treat each sample alone, except the normalizations with the batch's
    statistics, left out by their own rule). Not a class of one's own that torch derived
    another from: ``torch.nn.utils.parametrize`` makes ``Parametrized<Name>`` in its own
    module (by the class alone, a parametrized unit of one's own clipping by the batch's
    largest input was 163 % off at coverage 1: a review's), as FSDP's ``fully_shard`` does."""
    return all(c.__module__.split(".")[0] == "torch" for c in type(module).__mro__
               if c is not object)  # fmt: skip


#: torch's own modules that treat each sample alone, whose forward vmap cannot batch (an
#: Embedding with max_norm: its lookups renormalize the table in place): run one sample at a
#: time
_ALONE = (nn.Embedding,)

#: torch's RNN cells: called with their state, (input, hx) or an LSTMCell's (input, (h, c)),
#: or without it; an LSTMCell returns (h, c). Each sample alone, differentiated by vmap over
#: the input, the state and the outputs' gradients (:meth:`PerSampleNorms._cell_grads`)
_CELLS = (nn.RNNCell, nn.GRUCell, nn.LSTMCell)

#: an LSTMCell's own parameters, where they are all it has
_LSTM_WEIGHTS = {"weight_ih", "weight_hh", "bias_ih", "bias_hh"}


def _cell(module: nn.Module) -> bool:
    """Whether ``module`` is one of torch's RNN cells itself (also parametrized: torch's
    ``Parametrized<Name>``), not a subclass of one's own, whose forward may do anything."""
    return parametrize.type_before_parametrizations(module) in _CELLS


def _buffer_copies(module: nn.Module) -> dict[str, Tensor]:
    """Copies of a unit's buffers (its children's and its parametrizations' too) by name, as
    its forward is entered: its recomputation runs on them, with the values that forward saw
    (a temperature the model anneals after the call was read at its new value, 42 % off at
    coverage 1; a cache its forward rebuilds, a counter it advances, are rebuilt or advanced
    from the same start: a review's), and whatever it changes leaves the model's alone."""
    return {n: b.detach().clone() for n, b in module.named_buffers()}


def _nonzero_rows(g: Tensor, rows: Tensor) -> Tensor:
    """:func:`_nonzero` of the rows of ``g`` (along dimension 0) where ``rows`` is True."""
    return (g.ne(0) & ~g.isnan() & rows.view(-1, *[1] * (g.dim() - 1))).any()


class PerSampleNorms(Callback):
    """Logs ``per_sample/grad_norm`` (a histogram over the step's samples) with
    ``per_sample/grad_norm_mean`` and ``_max`` (unweighted ‖∇θ ℓᵢ‖), and/or
    ``per_sample/weighted_grad_norm`` (+ ``_mean``, ``_max``; ‖∇θ(wᵢℓᵢ)‖), every
    ``every_n_steps`` optimizer steps, plus ``per_sample/coverage``. See the module docstring.

    Steps it does not measure run without hooks.
    """

    def __init__(
        self,
        every_n_steps: int,
        loss: str = "unweighted",
        bins: int = 64,
        noise_ema: float = 0.9,
        snr: bool = True,
        units: Sequence[str] = (),
    ):
        if every_n_steps < 1:
            raise ValueError(
                f"instrument.per_sample.every_n_steps: got {every_n_steps}, must be >= 1"
            )
        if loss not in ("weighted", "unweighted", "both"):
            raise ValueError(f"instrument.per_sample.loss: got {loss!r}")
        if not 0 <= noise_ema < 1:
            raise ValueError(f"instrument.per_sample.noise_ema: got {noise_ema}, must be in [0, 1)")
        self.every, self.loss, self.bins = Every(every_n_steps), loss, bins
        self.noise_ema, self.snr = noise_ema, snr
        if isinstance(units, str) or not all(isinstance(u, str) and u for u in units):
            raise ValueError(
                f"instrument.per_sample.units: got {units!r}, must be a list of module names "
                "or fnmatch patterns over them (model.named_modules())"
            )
        #: patterns of the modules measured as one unit with all their submodules' parameters
        self.tree_patterns = list(units)
        self._trees: set[nn.Module] = set()
        self._by_name: dict[str, nn.Module] = {}
        self._mixed: dict[str, list[str]] = {}
        #: the EMAs of the unbiased tr(Σ) and |G|² estimates (McCandlish et al. 2018, app. A)
        self._ema: list[float] | None = None
        #: the averages before the last step's update, and that step; the step a fit failed at
        self._ema_before: list[float] | None = None
        self._ema_step = self._failed_at = -1
        self._said_unequal = False  # (the noise scale's NaN for unequal weights: said once)
        self._said_rounded = False  # (its NaN for a low-precision gradient's rounding: once)
        self._roundoff: tuple[tuple[float, float], ...] = ()
        #: (name, module, parameters it covers, kind) per unit
        self.units: list[tuple[str, nn.Module, list[nn.Parameter], str]] = []
        #: id(parameter) -> the units it is registered in (two for a tied weight)
        self._units_by_param: dict[int, list[nn.Module]] = {}
        self._covers: dict[nn.Module, list[nn.Parameter]] = {}
        self._kind: dict[nn.Module, str] = {}
        self._names: dict[nn.Module, str] = {}
        self._param_names: dict[int, str] = {}
        self._params: list[nn.Parameter] = []  # every unit's parameters, each once, in order
        self._param_by_id: dict[int, nn.Parameter] = {}
        self._mask: tuple[Any, Tensor] | None = None  # (excluded units, covered mask)
        self._sizes: Tensor | None = None  # each parameter's number of elements (data-parallel)
        self._tags: tuple[str, ...] = NOISE_TAGS  # the statistics staged as one vector
        self._handles: list[Any] = []
        self._mode: _OutsideUses | None = None
        self._mode_depth = 0  # the model's forward called within itself (one mode for all)
        self._active: dict[nn.Module, int] = {}
        #: a unit's forward running (from its last pre-hook to its first forward hook), and
        #: the units whose forward called themselves (the outer call's recomputation runs the
        #: inner's again: 16 % off at coverage 1, a review's)
        self._in_forward: dict[nn.Module, int] = {}
        self._recursive: set[nn.Module] = set()
        self._looped: set[nn.Module] = set()  # units of one's own run one sample at a time
        self._watched: set[nn.Module] = set()  # (set in on_fit_start)
        #: id(param) of the parameters whose every unit is watched, and, on a measured
        #: micro-batch, the gradient the backward handed each in all (:meth:`_totals_differ`)
        self._totaled: set[int] = set()
        self._total: dict[int, Tensor] = {}
        self._regs: list[Regularizer] = []  # the objective's, whose gradient is taken out
        #: whether the step's backward of a measured micro-batch runs (from
        #: on_before_backward to on_after_backward): only it is counted by those hooks
        self._counting = [False]
        self._batch = 0  # samples in the measured micro-batch
        self._sq: dict[int, Tensor] = {}  # id(param) -> (B,) squared norms, this micro-batch
        self._calls: list[_Call] = []
        self._ncalls: dict[nn.Module, int] = {}
        #: each unit's first forward start (a tick) within the micro-batch; a tick counts
        #: forward starts and normalizations with the batch's statistics, in order
        self._start: dict[nn.Module, int] = {}
        self._tick = 0
        #: (tick, name) of each normalization with the batch's statistics (a BatchNorm in
        #: training mode or without running statistics, with or without parameters of its
        #: own; ``F.batch_norm(training=True)`` anywhere in the forward)
        self._mixing: list[tuple[int, str]] = []
        self._batchnorms: list[tuple[str, _BatchNorm]] = []  # (set in on_fit_start)
        self._excluded: dict[str, str] = {}  # unit name -> why, for the current micro-batch
        #: unit name -> why, for any measured micro-batch of the current (or last) window: a
        #: unit left out of one is left out of the step's statistics and coverage
        self._window_excluded: dict[str, str] = {}
        #: (unit name, call within the forward, input shape) -> the dimension of that input
        #: (and of the output) seen to be the batch, 0 or 1, or why none is (:meth:`_verify`)
        self._verdicts: dict[tuple[str, int, tuple[int, ...]], int | str] = {}
        #: (unit name, call within the forward, (its first input's shape, its other inputs
        #: with the batch's size as a dimension: (slot, shape) each)) -> (slot, the dimension
        #: seen to be the batch, or None: passed whole, its size did not follow the batch) for
        #: each, or why that is not known (:meth:`_verify`)
        self._other_dims: dict[tuple[str, int, Any], tuple[tuple[str, int | None], ...] | str] = {}
        self._entered: dict[nn.Module, int] = {}  # each unit's calls in this forward so far
        #: a unit's inputs as its forward starts (its arguments and keyword arguments, their
        #: tuples, lists and dicts copied, the tensors in them the same), and their tensors'
        #: version counters: a unit is measured from these, and one that changes them in
        #: place leaves no input to compute from (taken back when its forward returns)
        self._entry_versions: dict[
            nn.Module,
            tuple[
                Any,
                Any,
                list[int],
                list[weakref.ref[Tensor]] | None,
                set[Any],
                list[tuple[Any, dict]],
            ],
        ] = {}
        #: a unit's inputs as its first pre-hook (ours) gets them, and its output as its first
        #: forward hook (ours) does, with their version counters (a stack per unit: a hook
        #: may call its unit again); a hook of one's own that replaced or changed either is
        #: applied again (inputs) or not matched (output) by a per-sample recomputation of the
        #: call (:attr:`_hooked`: why)
        self._given: dict[nn.Module, list[tuple[Any, list[int]]]] = {}
        self._first_output: dict[nn.Module, list[tuple[Any, list[int]]]] = {}
        self._hooked: dict[nn.Module, str] = {}
        #: units whose forward ran with other tensors in their parameters' places
        self._substituted: set[nn.Module] = set()
        #: a batch's input signature -> (the unit calls, (name, call within the forward), after
        #: which the model mixes the samples; the unit calls its check saw) (:meth:`_check_mixing`)
        self._mixing_checks: dict[Any, tuple[frozenset[Any], frozenset[Any]]] = {}
        self._mixing_failed: dict[Any, str] = {}  # signature -> why its check failed
        self._signature: Any = None  # the measured micro-batch's
        self._started = False  # this process trained a micro-batch (its first: checked)
        #: the units with buffers (their children's and parametrizations' too), and, per
        #: call under way, those buffers' copies and state as its forward was entered
        self._buffered: set[nn.Module] = set()
        self._scripted: list[tuple[str, nn.Module]] = []  # (set in on_fit_start)
        self._at_entry: dict[
            nn.Module, list[tuple[dict[str, Tensor], dict[str, Any], Any, int | None]]
        ] = {}
        self._captured: set[nn.Module] = set()  # units whose per-sample part was added
        #: id(param) of the units' parameters the measured micro-batch's backward reached (a
        #: hook on each while it runs): a unit neither captured nor reached had 0 per sample
        self._reached: set[int] = set()
        #: one process: each unit parameter's gradient (the tensor, its version) as the
        #: measured micro-batch started; one written past autograd (a Function's backward
        #: setting ``.grad`` by hand) fires no hook, but changes it
        self._grads_before: dict[int, tuple[Tensor | None, int]] = {}
        #: each parameter's gradient and its version after the backward (_check_unchanged)
        self._after: list[tuple[Tensor, Tensor | None, int, int]] = []
        #: the parameters whose gradient a callback changed in the measured window, and in
        #: which hooks; and, on the device, whose gradient's norm moved between the checks
        self._edited: dict[int, str] = {}
        self._after_norms: Tensor | None = None
        self._moved: Tensor | None = None
        self._said_edited = False
        self._shared: dict[int, Tensor] = {}  # id(param) -> its (B, *shape) per-sample grads
        self._weighted: list[Tensor] = []  # per micro-batch, (B, params) squared weighted norms
        #: per micro-batch, (B, 2): each sample's effective weight, and 1.0 where it is a
        #: sample (0.0: a sequence without one valid target, whose gradient is 0 whatever
        #: its weight: no sample of the noise scale's)
        self._weights: list[Tensor] = []
        #: data-parallel: each rank's rows in ``_weighted`` (known on the host: the loaders
        #: shard every global batch alike), so gathering them needs no exchange of sizes
        self._rank_rows: list[int] = []
        self._reported: set[tuple[str, str]] = set()  # (unit, why): each reason named once
        #: the trainable parameters changed during this window: it is not measured
        self._skip_window = False
        #: the last measured step's per-sample norms, on the device: tag -> (N,) (NaN for a
        #: weight-0 sample's unweighted norm)
        self.last: dict[str, Tensor] = {}

    def check_before_fit(self, trainer: Trainer) -> None:
        """``instrument.per_sample.units`` patterns the model's modules cannot take (before
        a resume moves the run's files; refused in ``on_fit_start`` alone, they came after);
        and an input-gradient penalty beside them, whose double backward flows through the
        measured layers and mixes into their norms (refused by the config; a Trainer built by
        hand logged ‖∇θ(ℓᵢ + penalty)‖-like values as the data loss's, 52 % off, a probe's)."""
        penalty = getattr(trainer, "input_penalty", None)
        if penalty is not None:
            raise ConfigError(
                f"per-sample gradient norms (PerSampleNorms) read the data loss's gradient "
                f"flowing through each layer; the regularizer {penalty.name}'s double backward "
                "(an input-gradient penalty) flows through the same layers and would mix into "
                "them: use one of the two"
            )
        self._declared(trainer.model)

    def on_fit_start(self, trainer: Trainer) -> None:
        self._drop_rows()
        self._build_units(trainer)

    def on_params_change(self, trainer: Trainer) -> None:
        """The units again, of the parameters trainable now (a layer unfrozen mid-run is
        measured from the next window on). A measured window under way when the change is
        seen was measured for the old parameters: its step logs no per-sample values."""
        if self._handles:  # seen between a measured micro-batch's forward and its backward
            self._leave_mode()  # (disarmed, its mode stayed on torch's stack: a review's)
            self._disarm()
            self._calls.clear()
            self._skip_window = True
        if self._weighted:
            self._weighted.clear()
            self._weights.clear()
            self._skip_window = True
        self._build_units(trainer)

    def _declared(self, model: nn.Module) -> set[nn.Module]:
        """The modules ``instrument.per_sample.units`` names (fnmatch over
        ``model.named_modules()``), each measured as one unit over all its submodules'
        parameters: a module of one's own that calls its children on rows it gathers (a
        mixture of experts' ``experts[e](x[top == e])``: each expert, fed no batch, is left
        out on its own). One inside another is the outer's; one inside an attention or RNN
        module is that module's. A pattern that matches no module is an error naming it."""
        if not self.tree_patterns:
            return set()
        named = [(n, m) for n, m in model.named_modules() if n]
        unmatched = [pat for pat in self.tree_patterns
                     if not any(fnmatch.fnmatchcase(n, pat) for n, _ in named)]  # fmt: skip
        if unmatched:
            raise ValueError(
                f"instrument.per_sample.units: {unmatched} match no module of the model's "
                f"(its modules: {few([n for n, _ in named])})"
            )
        trees: set[nn.Module] = set()
        declared = dict.fromkeys(self.tree_patterns, False)
        by_name = dict(named)
        for n, m in named:  # (parents first: one inside a declared one is the outer's)
            pats = [pat for pat in self.tree_patterns if fnmatch.fnmatchcase(n, pat)]
            if not pats:
                continue
            if any(m in set(t.modules()) for t in trees):  # (a declared one's: covered)
                declared.update(dict.fromkeys(pats, True))
            elif _unit_kind(m) == "func" and not _cell(m) and not _container(m):
                declared.update(dict.fromkeys(pats, True))  # (torch's layers, attention,
                trees.add(m)  # RNNs: units of their own already; a container: not called)
        refused = [pat for pat, ok in declared.items() if not ok]
        if refused:  # (a silent no-op before: its experts left out, nothing said)
            matched = [n for n, _ in named if any(fnmatch.fnmatchcase(n, p) for p in refused)]
            callers = {c for c in (_caller(n, by_name) for n in matched) if c is not None}
            raise ValueError(
                f"instrument.per_sample.units: {refused} match only modules measured as units "
                "of their own already or never called themselves ("
                + few([f"{n} ({type(by_name[n]).__name__})" for n in matched])
                + "): declare the module that calls them on the batch"
                + (f", {few(sorted(callers))}" if callers else "")
            )
        return trees

    def _named_in(self, module: nn.Module, kind: str) -> list[tuple[str, nn.Parameter]]:
        """The trainable parameters a unit covers (:func:`_named_covered`); a declared one's
        (``instrument.per_sample.units``): all its submodules', by their names in it."""
        if module in self._trees:
            return [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        return _named_covered(module, kind)

    def _own_unit(self, module: nn.Module) -> bool:
        """Whether a generic unit gets the checks of a module of one's own (its samples alone
        against its batch, its gradients past its outputs): a class not torch's, or one
        declared in ``instrument.per_sample.units``."""
        return module in self._trees or not _torchs(module)

    def _build_units(self, trainer: Trainer) -> None:
        self.units = []
        self._units_by_param, self._covers, self._kind, self._names = {}, {}, {}, {}
        #: where each unit's parameters are held (module, key, parameter): a forward run
        #: with other tensors there (``torch.func.functional_call``) is not of its own
        self._slots: dict[nn.Module, list[tuple[nn.Module, str, Tensor]]] = {}
        self._mask = self._sizes = None
        names = {id(p): n for n, p in trainer.model.named_parameters()}
        self._param_names = names
        inside: set[nn.Module] = set()  # submodules of attention / RNN / declared units
        self._trees = self._declared(trainer.model)
        self._by_name = dict(trainer.model.named_modules())
        for t in self._trees:  # (all of them first: a child also registered under a name
            inside.update(set(t.modules()) - {t})  # listed before its declared module was
            # a unit of its own too, its parameters counted twice, 24 % off: a review's)
        for name, m in trainer.model.named_modules():
            if m in inside:
                continue
            kind = _unit_kind(m)
            if m in self._trees:  # (all its submodules' parameters, run as one function)
                kind = "func"
                inside.update(set(m.modules()) - {m})
            elif kind in ("attention", "rnn"):
                inside.update(m.modules())
            elif parametrize.is_parametrized(m):  # (its weight's computation: in its forward)
                inside.update(m.parametrizations.modules())  # type: ignore[union-attr]
            own = [p for _, p in self._named_in(m, kind)]
            if not own:
                continue
            self.units.append((name, m, own, kind))
            self._covers[m], self._kind[m], self._names[m] = own, kind, name
            for p in own:
                self._units_by_param.setdefault(id(p), []).append(m)
            mine = {id(p) for p in own}
            self._slots[m] = [(sub, key, p) for sub in m.modules()
                              for key, p in sub._parameters.items()
                              if p is not None and id(p) in mine]  # fmt: skip
        self._param_by_id = {id(p): p for _, _, own, _ in self.units for p in own}
        #: the units of one's own whose calls' gradients are watched at their parameters
        #: (:meth:`_watch`): generic ones of classes not torch's
        self._watched = {
            m
            for _, m, _, kind in self.units
            if kind == "func" and self._own_unit(m) and not _cell(m)
        }
        #: TorchScript units: no hook can be registered on them, left out on every step
        self._scripted = [(n, m) for n, m, _, _ in self.units if scripted(m)]
        #: generic units whose parameters hold several dtypes, left out on every step: the
        #: per-sample recomputation runs in one, its first parameter's (a declared unit with
        #: a bfloat16 gain first rounded its float64 rows, 7.8e-4 off at coverage 1, within
        #: bfloat16's tolerance: a review's)
        self._mixed = {
            n: sorted({str(p.dtype).removeprefix("torch.") for p in own})
            for n, m, own, kind in self.units
            if kind == "func" and not _cell(m) and len({p.dtype for p in own}) > 1
        }
        self._buffered = {m for _, m, _, _ in self.units if next(m.buffers(), None) is not None}
        self._batchnorms = [
            (name, m) for name, m in trainer.model.named_modules() if isinstance(m, _BatchNorm)
        ]
        self._params = list(self._param_by_id.values())
        if self.snr:
            self._tags = NOISE_TAGS + tuple(f"grad_snr/{names[id(p)]}" for p in self._params)
        # the unit roundoff of each step gradient's elements, which the statistics below
        # subtract the square of from the rows' (0: float32 or wider, whose rounding the
        # float32 sums bound): a float16/bfloat16 parameter's gradient is rounded to its
        # dtype, k times over an accumulation window of k, and W − 1 more in a data-parallel
        # sum over W ranks; under float16/bfloat16 autocast every parameter's, once per
        # micro-batch: a low-precision op's output gradient flows into all of them (a
        # LayerNorm runs in bfloat16 on a CPU, a tied Embedding weight gets a Linear's
        # rounded gradient: exempting norm layers and Embeddings logged their SNRs 22-91 %
        # off, a review's finding)
        # Each rounding moves an element by u of itself, or, in float16's subnormal range
        # (below 6.1e-5: a float16 model's small gradients late in a run), by up to half its
        # smallest step, 2⁻²⁵: (u, f) per parameter, f the latter over the tensor's √numel
        # (relative alone, a review saw SNRs 50-197 % off at coverage 1)
        amp = getattr(trainer, "amp_dtype", None)
        k = max(1, int(getattr(trainer, "accumulate", 1)))
        world = getattr(trainer, "world", None)
        ranks = world.size if world is not None and world.distributed else 1

        def rounding(dtype: torch.dtype, times: int, numel: int) -> tuple[float, float]:
            info = torch.finfo(dtype)
            return times * info.eps / 2, times * info.tiny * info.eps / 2 * math.sqrt(numel)

        def both(p: Tensor) -> tuple[float, float]:
            own = rounding(p.dtype, k + ranks - 1, p.numel()) if p.dtype in LOW_PRECISION else None
            cast = rounding(amp, k, p.numel()) if amp is not None else None
            given = [r for r in (own, cast) if r is not None] or [(0.0, 0.0)]
            return max(u for u, _ in given), max(f for _, f in given)

        self._roundoff = tuple(both(p) for p in self._params)

    # ---- arming: hooks exist only while a measured micro-batch runs its forward and backward
    def on_train_batch_start(self, trainer: Trainer, batch: Batch) -> None:
        if not self._started:  # the first micro-batch reads the host anyway (the optimizer's
            self._started = True  # state is created): its inputs' mixing check is done there
            sig = _signature(batch.x)
            if sig not in self._mixing_checks and sig not in self._mixing_failed:
                self._check_mixing(trainer, batch)
        if self._skip_window or not self.every.due_next(trainer.global_step):
            return
        self._batch = batch.x.shape[0]
        self._signature = _signature(batch.x)
        if trainer.world.distributed:
            self._count_rows(trainer, self._batch)
        if not self._weighted:  # the window's first measured micro-batch
            self._window_excluded.clear()
            self._edited.clear()
            self._moved = None
        # the gradients as the last backward left them (none at a window's start), against
        # which the ones the next backward starts from are checked (_check_unchanged)
        self._snapshot()
        trainer.before_backward_callbacks = self._check_before_backward
        self._sq.clear()
        self._calls.clear()
        self._ncalls.clear()
        self._start.clear()
        self._tick = 0
        self._mixing.clear()
        self._excluded.clear()
        self._captured.clear()
        self._reached.clear()
        self._shared.clear()
        self._active.clear()
        self._in_forward.clear()
        self._entry_versions.clear()
        self._recursive.clear()
        self._entered.clear()
        self._given.clear()
        self._first_output.clear()
        self._hooked.clear()
        self._substituted.clear()
        self._at_entry.clear()
        self._grads_before.clear()
        self._total.clear()
        # the regularizers' gradient is known, their grad() (GRADS): the trainer's are
        # their Function's backward, and one of one's own (a subclass) has its backward
        # compared with its GRADS before training (Regularizer.check_gradient; grad_norm/data
        # subtracts it too): taken out of the whole gradient (one of one's own left its
        # parameters unchecked whole until 2026-12-07: a side branch went through at coverage 1)
        self._regs = list(getattr(getattr(trainer, "objective", None), "regularizers", ()))
        self._totaled = {
            id(p)
            for p in self._params
            if all(u in self._watched for u in self._units_by_param.get(id(p), ()))
        }
        for p in self._params:  # which parameters this backward reaches (the data
            if p.requires_grad:  # parallel all-reduce writes an unused one's without it)
                self._handles.append(p.register_hook(partial(self._reach, id(p))))
                if not trainer.world.distributed:
                    g = p.grad
                    self._grads_before[id(p)] = (g, -1 if g is None else g._version)
        root = trainer.model  # the model's forward is watched for outside uses, nothing else
        for name, _ in self._scripted:  # (no hook can be registered on one: it stopped the
            self._excluded[name] = SCRIPTED  # step, a review's)
        for name, dtypes in self._mixed.items():
            self._excluded[name] = (
                f"its parameters hold several dtypes ({', '.join(dtypes)}), and its per-sample "
                "recomputation runs in one: give them one dtype, or make the parts of each "
                "dtype modules of their own (a declared unit: declare them apart)"
            )
        for _, m, _, _ in self.units:  # before a unit's own pre-hooks (weight_norm's, prune's
            # compute its weight from its parameters: a use inside its forward)
            if scripted(m):
                continue
            self._handles.append(
                m.register_forward_pre_hook(_Hook(self._enter), prepend=True, with_kwargs=True)
            )
            self._handles.append(  # (last)
                m.register_forward_pre_hook(_Hook(self._inputs_given), with_kwargs=True)
            )
            # first of the unit's forward hooks: a user's hook runs after the unit stopped
            # counting as active, so its use of the unit's weights is seen as outside
            self._handles.append(
                m.register_forward_hook(_Hook(self._forward_hook), with_kwargs=True, prepend=True)
            )
            self._handles.append(m.register_forward_hook(_Hook(self._output_given)))  # (last)
        if scripted(root):  # (every unit is: left out above)
            return
        # (the mode first of all: registered last, in front)
        self._handles.append(root.register_forward_pre_hook(_Hook(self._enter_mode), prepend=True))
        for name, bn in self._batchnorms:  # (those without parameters of their own too)
            if not scripted(bn):
                hook = _Hook(partial(self._enter_bn, name))
                self._handles.append(bn.register_forward_pre_hook(hook))
        self._handles.append(root.register_forward_hook(_Hook(self._model_returned)))

    def _check_before_backward(self) -> None:
        self._check_unchanged("on_train_batch_start or on_before_backward")
        # right before the step's backward: whatever the hooks took so far was not it (a
        # callback whose on_before_backward runs after this one's, ``autograd.grad`` of the
        # losses for a diagnostic: its unit of one's own was left out, and a closed form's
        # squared norms, taken at once, were counted twice, the noise scale 6x off at coverage
        # 1: reviews')
        self._total.clear()
        self._sq.clear()
        self._captured.clear()
        self._reached.clear()
        for call in self._calls:
            call.grads.clear()
            call.hidden[0] = False
            if call.sink is not None and call.sink.real:
                call.sink.real.clear()

    def _model_returned(self, module: nn.Module, inputs: Any, output: Any) -> None:
        # (a deep copy of the model made while it is measured, an EMA or SWA copy, gets hooks
        # that do nothing, :class:`_Hook`: a lambda here, which the copy shared, left the
        # model's mode, and each call of the copy left a mode of a copied instrument on
        # torch's stack for good, a probe's)
        if _in_backward():  # (an activation checkpoint's recomputation: no mode entered)
            return
        if self._mode_depth:  # (an inner call of the model's forward returned)
            self._mode_depth -= 1
            return
        self._leave_mode()

    def on_before_backward(self, trainer: Trainer, batch: Batch, losses: Tensor) -> None:
        # the forward is over: its mode too, also where an inner call of the model's forward
        # raised and the outer one caught it (the count of calls was left one up, and the mode
        # saw the regularizers' uses of the weights as outside ones, a review's)
        self._leave_mode()
        self._counting[0] = bool(self._handles)  # (the step's backward follows)

    def _enter_mode(self, module: nn.Module, inputs: Any) -> None:
        if _in_backward():  # a non-reentrant checkpoint of the whole model, recomputed: its
            return  # mode, entered in the backward, was dropped by autograd (a crash, a review's)
        if self._mode is not None:  # the model's forward calls itself: the outer call's mode
            self._mode_depth += 1  # (a second one, entered over it, was the one left)
            return
        self._mode = _OutsideUses(self._units_by_param, self._active, self._mix)
        self._mode.watched = self._watched
        self._mode.__enter__()

    def _mix(self, name: str) -> None:
        """A normalization with the batch's statistics runs now: each unit whose forward
        started before it is upstream of it, its samples' gradients mixed."""
        self._mixing.append((self._tick, name))
        self._tick += 1

    def _enter_bn(self, name: str, module: _BatchNorm, inputs: Any) -> None:
        if _batch_statistics(module) and not _in_backward():  # (a recomputation: seen)
            self._mix(f"{name} (BatchNorm with the batch's statistics)")

    def on_exception(self, trainer: Trainer, error: BaseException) -> None:
        # (its statistics, written, may come again; the step being made, not the last one
        # taken: a second failure in that step's first micro-batch named the one before, and
        # the average took the step in twice, a review's)
        self._failed_at = trainer.step_in_progress()
        self._counting[0] = False
        if trainer.after_backward_callbacks == self._check_unchanged:
            trainer.after_backward_callbacks = None
        if trainer.before_backward_callbacks == self._check_before_backward:
            trainer.before_backward_callbacks = None
        self._leave_mode()
        self._disarm()
        self._drop_rows()

    def _drop_rows(self) -> None:
        """The rows measured for a window that did not end (a failed step: given to another
        Trainer, the instance measured its next window with them, 64 rows for 32 samples)."""
        self._weighted.clear()
        self._weights.clear()
        self._rank_rows.clear()
        self._calls.clear()
        self._grads_before.clear()
        self._after.clear()
        self._edited.clear()
        self._after_norms = self._moved = None
        self._skip_window = False

    def _leave_mode(self) -> None:
        self._mode_depth = 0
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
            for unit, func in mode.outside.items():
                self._excluded.setdefault(
                    self._names[unit],
                    f"a parameter of it enters {func}() outside its own forward (e.g. "
                    "F.linear(x, module.weight), or a weight tied by hand): that use's "
                    "per-sample part is seen by no hook",
                )
            for unit, func in mode.freq_scaled.items():  # (a probe: an SNR 9x off, a noise
                self._excluded.setdefault(  # scale 25 % off, at coverage 1)
                    self._names[unit],
                    f"a parameter of it is looked up by {func}(scale_grad_by_freq=True), whose "
                    "gradient divides by each index's count over the whole batch: a sample's "
                    "part depends on the other samples",
                )

    def _disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._given.clear()  # (no input or output kept past the measured forward)
        self._first_output.clear()
        self._at_entry.clear()
        self._entry_versions.clear()  # (a unit whose forward raised, the model going on: its
        # inputs were kept until the next measured micro-batch, a review's)

    def _reach(self, key: int, grad: Tensor) -> None:
        self._reached.add(key)
        if key in self._totaled and self._counting[0]:  # (the whole gradient the step's
            # backward hands it; a copy: this tensor becomes its .grad, which data-parallel
            # averaged in place before the check, every rank's unit left out, a review's)
            g = _dense(grad.detach())
            self._total[key] = g.clone() if key not in self._total else self._total[key] + g

    def _grad_written(self, p: Tensor) -> bool:
        """Whether ``p``'s gradient changed during the micro-batch without its hook (one
        process; data-parallel, the all-reduce writes a gradient this rank's samples did not
        reach, and a hand-written one is not all-reduced either)."""
        before = self._grads_before.get(id(p))
        if before is None:
            return False
        g = p.grad
        return g is not before[0] or (g is not None and g._version != before[1])

    def _enter(self, module: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if _in_backward():  # an activation checkpoint's recomputation: not a call
            return
        if self._in_forward.get(module):
            self._recursive.add(module)
        if self._kind[module] != "closed":  # (its pre-hooks are part of its recomputation:
            # weight_norm's and prune's compute its weight; a closed form's are not, below)
            self._active[module] = self._active.get(module, 0) + 1
        self._entered[module] = self._entered.get(module, 0) + 1
        self._start.setdefault(module, self._tick)
        self._tick += 1
        given = (*inputs, *kwargs.values())
        self._given.setdefault(module, []).append((given, _versions(given)))
        if module in self._buffered or self._kind[module] != "closed":
            # (a recomputation starts where this forward did: its buffers, and its
            # attributes, a flag saying a cache is built among them: a review's read a
            # stale table as built, 1.45 % off at coverage 1)
            entry = (
                _buffer_copies(module) if module in self._buffered else {},
                _buffer_state(module) if module in self._buffered else {},
                plain_attributes(module),
                # (the first autograd node its call makes: before its pre-hooks', whose
                # computed weight is part of it, weight_norm's)
                None if _next_node is None or torch.compiler.is_compiling() else _next_node(),
            )
            self._at_entry.setdefault(module, []).append(entry)

    def _inputs_given(
        self, module: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """The last of a unit's pre-hooks: its inputs' version counters as its forward gets
        them (after a pre-hook of one's own replaced them, say). A closed form counts as
        active from here: a pre-hook of one's own that uses its weight (``x + F.linear(x,
        m.weight)``) is a use outside what its closed form computes, seen as one (until
        2026-12-06 the norms of such a model were 2 % off at coverage 1: a review's probe)."""
        if _in_backward():
            return
        if any(sub._parameters.get(key) is not p for sub, key, p in self._slots[module]):
            self._substituted.add(module)  # (their per-sample gradients were taken for its
            # own, whose gradient is 0 there: 5-81 % off at coverage < 1, a probe's)
        self._in_forward[module] = self._in_forward.get(module, 0) + 1
        versions = _versions((inputs, kwargs))
        if self._kind[module] == "closed":  # (torch's layers: tensors in, one tensor out,
            # nothing kept beside it; what follows cost ≈ 10 µs a call, a bench's)
            self._entry_versions[module] = (inputs, kwargs, versions, None, set(), [])
            self._active[module] = self._active.get(module, 0) + 1
        else:
            tensors = _tensors((inputs, kwargs))
            traced = torch.compiler.is_compiling()  # (a model the user compiled: no weak
            # reference or autograd node while dynamo traces the hook: its guards crashed)
            self._entry_versions[module] = (
                _map_tensors(inputs, Tensor.detach),  # (aliases: nothing of its graph kept)
                _map_tensors(kwargs, Tensor.detach),
                versions,
                # (weak: a dead one's id, taken by a new tensor in its place, counted as given)
                None if traced else [weakref.ref(t) for t in tensors],
                # where autograd's graph enters it: a state it rebinds away (``state[0] = h``)
                # is gone from its arguments by its capture, and a walk went on through it
                # into the previous call, whose output's hook sees that (a review's)
                set() if traced else {(t.grad_fn, t.output_nr) for t in tensors if t.grad_fn},
                # objects of one's own among them (a cache), with their attributes
                [] if traced else [(o, dict(vars(o))) for o in _objects((inputs, kwargs))],
            )  # (those given by name too: one its forward changed in place was measured 45 %
            # off at coverage 1, each recomputation seeing it changed, and training moved with
            # it; and the containers' contents as they were: a state list a cell rebinds,
            # ``state[0] = h``, held the new state when its call was captured, 3-8 % off at
            # coverage 1: reviews')
        stack = self._given.get(module)
        if not stack:
            return
        given, versions = stack.pop()
        now = (*inputs, *kwargs.values())
        if (
            len(given) != len(now)
            or any(a is not b for a, b in zip(given, now, strict=True))
            or _versions(now) != versions
        ):  # (a closed form reads what its forward got: only its recomputation, where it is
            # used more than once, would pass them through that hook again)
            self._hooked.setdefault(
                module,
                "a forward pre-hook of its own replaced or changed its inputs, which a "
                "per-sample recomputation of its forward would pass through that hook again",
            )

    def _output_given(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        """The last of a unit's forward hooks: one of one's own that replaced or changed the
        output makes the gradient the unit's output receives that of another tensor than a
        per-sample recomputation of its forward (which runs that hook too) returns (a closed
        form used once reads the gradient its own forward's output received: unaffected)."""
        stack = self._first_output.get(module)
        if _in_backward() or not stack:
            return
        first, versions = stack.pop()
        if first is not output or _versions(output) != versions:
            self._hooked.setdefault(
                module,
                "a forward hook of its own replaced or changed its output, whose gradient a "
                "per-sample recomputation of its forward (running that hook too) would not "
                "match",
            )

    def _forward_hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if _in_backward():  # (a non-reentrant checkpoint runs the forward again in the
            # backward, each time or until what it needs is back: the call, captured as its
            # forward made it, was taken for a second one, which no check saw, and its unit
            # left out; a reentrant one's first forward runs without gradients: left out)
            return
        self._active[module] -= 1
        self._in_forward[module] -= 1
        self._first_output.setdefault(module, []).append((output, _versions(output)))
        if not torch.is_grad_enabled():
            self._entry_versions.pop(module, None)  # (its inputs, not kept past its call: a
            # deep copy of the model, which copies its hooks and so this, refuses a tensor a
            # forward made)
            return
        mode = self._mode  # (None: a forward outside the model's, e.g. a user's own call)
        if mode is None:
            self._capture(module, args, kwargs, output)
            return
        if _current_function_mode() is mode:  # (the usual case: no mode of the model's own
            # entered since): off the stack while this hook runs, its calls (detach, shape
            # checks, register_hook) pass no Python function-mode dispatch, ≈ 5 µs a call
            with _pop_mode_temporarily():
                self._capture(module, args, kwargs, output)
            return
        mode.paused = True  # this hook's own calls are not uses of a parameter
        try:
            self._capture(module, args, kwargs, output)
        finally:
            mode.paused = False

    def _capture(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        """After a unit's forward: check that it can be measured, keep its inputs (as its
        forward got them: a list or dict it was given and put other tensors into, a state
        ``state[0] = h`` or an auxiliary loss appended, as it was) and hook its outputs'
        gradients."""
        outputs = [t for t in _tensors(output) if t.requires_grad]
        started = self._entry_versions.pop(module, None)
        uses = self._mode.uses.pop(module, []) if self._mode is not None else []
        versions, live = None, (args, kwargs)
        if started is not None:
            args, kwargs, versions, refs, entries_at, objects = started
        if not outputs or self._batch == 0:  # (data-parallel: a rank without samples here)
            return
        name = self._names[module]
        self._ncalls[module] = self._ncalls.get(module, 0) + 1
        if name in self._excluded:
            return
        if isinstance(module, _BatchNorm) and _batch_statistics(module):
            self._excluded[name] = (
                "BatchNorm normalizing with the batch's statistics (training mode, or no "
                "running statistics) mixes the samples of a batch"
            )
            return
        entries = self._at_entry.get(module)
        entry = entries.pop() if entries else None  # (its buffers as its forward began)
        why, hidden = None, cast(list[Tensor], [])
        if started is not None and refs is not None:
            found = self._hidden_output(
                module,
                live,
                refs,
                entries_at,
                objects + (entry[2] if entry is not None else []),
                outputs,
            )
            why, hidden = (found, []) if isinstance(found, str) else (None, found)
        why = why or self._check(module, args, kwargs, outputs, output)
        changed = None
        if why is None and entry is not None and self._kind[module] != "closed" and entry[1]:
            moved = _buffer_changes(self._kind[module], entry[1], _buffer_state(module))
            if moved is not None and self._kind[module] == "func" and moved[1]:
                # a generic unit's change in place: checked against its recomputation's
                # (spectral_norm's power iteration, left out until the thirty-second session)
                now = dict(module.named_buffers())
                changed = (moved[0], {n: now[n].detach().clone() for n in moved[1]})
            elif moved is not None:
                why = moved[0]
        if why is None and module in self._recursive:
            why = (
                "its forward calls itself: a recomputation of the outer call runs the inner "
                "one's again, whose part is counted on its own too"
            )
        if why is None and versions is not None and _versions((args, kwargs)) != versions:
            why = IN_PLACE
        verify = None
        dim, candidates = 0, cast(tuple[int, ...], ())
        entered = self._entered.get(module, 0)
        if why is None and self._kind[module] in ("closed", "func"):
            # dimension 0 (or 1, sequence-first) has the batch's size: the batch, or a
            # sequence as long as it, a table of B rows, features of every pair of samples?
            # Seen once per call and input shape (:meth:`_verify`); one sample has no other
            # to be told from: any layout gives its gradient
            if isinstance(module, nn.EmbeddingBag) and self._kind[module] == "closed":
                # (its bags are its output's rows, checked; its input's length varies)
                candidates, shape = (0,), tuple(outputs[0].shape)
            elif _cell(module):  # (2-D, the batch first: checked; its input may be passed by
                # keyword, cell(input=x, hx=h): no args[0], which crashed a review's forward)
                candidates, shape = (0,), ()
            else:
                kind = self._kind[module]
                candidates = _batch_dims(module, kind, args[0], outputs[0], self._batch)
                if not isinstance(output, Tensor):  # (several outputs: batch-first, checked)
                    candidates = tuple(d for d in candidates if d == 0)
                shape = tuple(args[0].shape)
            key = (name, entered, shape)
            known = self._verdicts.get(key)
            if isinstance(known, str):
                why = known
            elif known in candidates:
                dim = cast(int, known)
            elif self._batch > 1 and not _cell(module):
                verify = key
            else:
                dim = candidates[0]
        sizes, at = None, cast(dict[str, int | None], {})
        generic = self._kind[module] == "func" and not _cell(module)  # (a cell's: checked)
        if why is None and generic and self._batch > 1 and args:
            # another input with the batch's size as a dimension: the samples' (a condition,
            # a padding mask, (B, T) beside a sequence-first (T, B, ·) first input), or a
            # table, a (T, T) mask, as long as the batch by chance? By which of its sizes
            # follows the batch's, seen once per call and shapes (:meth:`_verify`; until the
            # twenty-ninth session each with the batch's size as dimension 0 was sliced there,
            # such a unit left out by the checks of every measured micro-batch where that was
            # wrong, and one sequence-first left out). One sample: any gives its gradient
            given = _sized_like_batch(args, kwargs, self._batch)
            if given:
                shapes = (name, entered, (tuple(args[0].shape), tuple(given.items())))
                passed = self._other_dims.get(shapes)
                if isinstance(passed, str):
                    why = passed
                elif passed is not None:
                    at = dict(passed)
                else:
                    sizes = shapes
        mixing = None
        if why is None and self._batch > 1:  # does the model mix the samples after it?
            call_key = _keyed((name, entered), dim)
            checked = self._mixing_checks.get(self._signature)
            if verify is not None:  # (keyed by the batch's dimension, once settled; a table
                mixing = (name, entered)  # of B rows reaches every sample: named for that)
            elif checked is not None and call_key in checked[0]:
                why = MIXED
            elif checked is None or call_key not in checked[1]:
                mixing = call_key  # not known yet: after the backward
        zero = None  # (an output of 0 shows no mixing inside a unit of one's own)
        if mixing is not None and self._kind[module] == "func" and isinstance(output, Tensor):
            zero = (output == 0).all() if output.numel() else None
        if why is not None:
            self._excluded[name] = why
            return
        dims = self._out_dims(module, len(outputs)) if dim == 0 else [dim] * len(outputs)
        device = outputs[0].device.type
        amp = (
            (device, torch.get_autocast_dtype(device))
            if torch.is_autocast_enabled(device)
            else None
        )
        call = _Call(
            module, _detach(args), _detach(kwargs),
            [(t.shape, t.dtype, t.device) for t in outputs], dims,
            autocast=amp, verify=verify, mixing=mixing, zero=zero,
            versions=_versions((args, kwargs)), dim=dim, candidates=candidates,
            buffers=entry[0] if entry is not None else {},
            attributes=entry[2] if entry is not None else [], changed=changed,
            nested=isinstance(module, nn.LSTMCell) and len(outputs) == 2
            and _reaches(outputs[0].grad_fn, outputs[1].grad_fn), at=at, sizes=sizes,
            count=len(_tensors(output)),
            kept=[i for i, t in enumerate(_tensors(output)) if t.requires_grad],
        )  # fmt: skip
        self._calls.append(call)
        if entry is not None and entry[3] is not None and module in self._watched:
            self._watch(call, entry[3], outputs, uses)
        for k, t in enumerate(outputs):
            t.register_hook(lambda g, c=call, k=k: self._on_output_grad(c, k, g))
        for t in hidden:  # (a flag, not the call: such a tensor may outlive the step)
            t.register_hook(partial(_flag, call.hidden))

    def _watch(self, call: _Call, since: int, outputs: list[Tensor], uses: list[Any]) -> None:
        """Hooks on the autograd nodes a unit's call made (numbered from ``since``) that hand
        a gradient to its parameters, found from its outputs and from each function that took
        one of them while its forward ran (its model's mode saw those): what the step's
        backward hands them, through its outputs or through a tensor its forward kept
        elsewhere (a list attribute, a buffer, a global, an attribute also used after its
        forward), is summed into ``call.real``, which :meth:`_sums_differ` compares with the
        gradient of its outputs' alone."""
        starts = [t.grad_fn for t in outputs if t.grad_fn is not None] + uses
        names = {id(p): n for n, p in self._named_in(call.unit, self._kind[call.unit])}
        own: dict[int, Tensor] = {id(p): p for p in self._covers[call.unit]}
        call.sink = _Sink(self._counting)
        call.uses = _hook_own(starts, since, own, names, call.sink)

    def _hidden_output(
        self,
        module: nn.Module,
        live: tuple[Any, Any],
        refs: list[weakref.ref[Tensor]],
        inputs: set[Any],
        objects: list[tuple[Any, dict[str, Any]]],
        outputs: list[Tensor],
    ) -> str | list[Tensor]:
        """Why a unit's call cannot be measured, one of its own parameters passed to it as an
        input (a recomputation takes its inputs as constants: ``u(h, gain=u.g)``, 0.5 % off at
        coverage 1); or else the tensors its forward put into a list or dict it was given
        (``live``: its arguments as they are now; ``refs``: the tensors it was given, and
        ``inputs``: the (node, output) pairs where autograd's graph entered them), into an
        attribute of its modules or of an object of one's own it was given (``objects``:
        theirs as its forward began), that have a path to its parameters other than through
        its outputs: where the step's backward sends a gradient into one (an LSTM cell of
        one's own keeping c in the state list and returning h, a memory of its keys, a mixture
        of experts' ``self.aux_loss``, a cache's values: 1-4 % off at coverage 1, reviews'),
        no hook of its outputs sees that gradient, and the call is left out after the
        backward; not where none does (attention weights kept for inspection). Its new state
        ``state[0] = h``, or a loss computed from h, goes through h's hook."""
        own = {id(p) for p in self._covers[module]}
        given = _tensors(live)
        if any(id(t) in own or id(t._base) in own for t in given):
            return (  # (or put into a list it was given, where the walk below would see it)
                "one of its own parameters is passed to it as an input, or put into a list or "
                "dict it was given"
            )
        ids = {id(t) for r in refs if (t := r()) is not None}  # (those still alive)
        listed = [t for t in given if id(t) not in ids and t.requires_grad]
        new = listed + [
            v
            for o, before in objects
            for k, v in vars(o).items()
            if isinstance(v, Tensor) and v.requires_grad and before.get(k) is not v
        ]
        if not new:
            return []
        # (by the node and its output: h and c split from one node, its output 0 returned and 1
        # kept in the list, stopped at the node, 3.9 % off at coverage 1: a review's)
        stop = inputs | {(t.grad_fn, t.output_nr) for t in outputs if t.grad_fn is not None}
        hidden = [t for t in new if _reaches_own((t.grad_fn, t.output_nr), stop, own)]
        if not hidden:
            return []
        # which of them its outputs were computed from: every (node, output) their graphs pass
        # through, back to its inputs
        upstream: set[Any] = set()
        todo, seen = [(t.grad_fn, t.output_nr) for t in outputs], set()
        while todo:
            fn, k = todo.pop()
            if fn is None:
                continue
            upstream.add((fn, k))
            if (fn, k) in inputs or fn in seen:
                continue
            seen.add(fn)
            todo.extend(fn.next_functions)
        found = []
        for t in hidden:
            if (t.grad_fn, t.output_nr) not in upstream:  # (any gradient it gets is not its
                found.append(t)  # outputs': seen by a hook, after the backward)
            elif any(t is u for u in listed):  # (its outputs' gradient reaches it too: the
                return (  # rest cannot be told apart; a memory of its keys it attends over)
                    "its forward put a tensor its outputs were computed from, with a path to "
                    "its parameters, into a list or dict it was given (a memory of its keys): "
                    "a gradient it gets there, not through its outputs, no hook sees"
                )
            # (an attribute its outputs were computed from: weight_norm's weight, attention
            # weights kept to look at; one also used after its forward is not seen)
        return found

    def _gathered_hint(self, module: nn.Module, shape: tuple[int, ...]) -> str:
        """:meth:`_declare_hint` for a call whose input's dimension 0 is not the batch's size
        (rows gathered from it, whatever its other sizes: an expert whose width is the
        batch's size was told of tables and positions, a researcher's probe)."""
        return self._declare_hint(module) if shape and shape[0] != self._batch else ""

    def _declare_hint(self, module: nn.Module) -> str:
        """For a unit called on rows that are not the batch (an expert fed the rows routed to
        it): the module around it to measure as one unit, ``instrument.per_sample.units``."""
        caller = _caller(self._names.get(module, ""), self._by_name)
        if caller is None:  # (the model's own forward calls it: no name to declare)
            return (
                " (called on rows gathered from the batch, as a mixture of experts' expert? "
                "the model's own forward calls it: move that into a module of its own and "
                "measure it as one unit, instrument.per_sample.units)"
            )
        return (
            " (called on rows gathered from the batch, as a mixture of experts' expert? "
            f"measure the module calling it as one unit: instrument.per_sample.units=[{caller}])"
        )

    def _bound(self, module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
        return inspect.signature(module.forward).bind(*args, **kwargs).arguments

    def _out_dims(self, module: nn.Module, n: int) -> list[int]:
        """The batch dimension of each of the unit's ``n`` tensor outputs."""
        kind = self._kind[module]
        if kind == "attention":
            # attn_output (batch_first or not), attn_weights (B, ...)
            return [0 if module.batch_first else 1, 0][:n]  # type: ignore[union-attr]
        if kind == "rnn":  # output, h_n (and c_n): (layers · directions, B, H)
            return [0 if module.batch_first else 1, *[1] * (n - 1)]  # type: ignore[union-attr]
        return [0] * n

    def _check(
        self, module: nn.Module, args: tuple, kwargs: dict, outputs: list[Tensor], output: Any
    ) -> str | None:
        """Why this call cannot be measured per sample, or None."""
        if parametrize._cache_enabled and any(
            parametrize.is_parametrized(m) for m in module.modules()
        ):
            return (
                "a parametrized weight in it under torch.nn.utils.parametrize.cached(): the "
                "computed weight is one tensor for every access, so a use of it outside the "
                "unit's forward is not seen (a probe's, 9 % off at coverage 1)"
            )
        if any(
            isinstance(h, SpectralNorm)
            for m in module.modules()
            for h in m._forward_pre_hooks.values()
        ):  # (its recomputation ran the power iteration again: 5 % off, and training moved)
            return (
                "torch.nn.utils.spectral_norm in it: its forward pre-hook computes the weight "
                "with a step of power iteration on buffers it updates, which a per-sample "
                "recomputation would run again (and measuring must not change)"
            )
        if _module_hooks._global_forward_pre_hooks or _module_hooks._global_forward_hooks:
            return (  # (they run before the measuring hooks, which cannot see what they do)
                "a global module forward hook (torch.nn.modules.module."
                "register_module_forward_pre_hook/register_module_forward_hook) is registered"
            )
        if any(p.is_complex() for p in self._covers[module]) or any(
            t.is_complex() for t in [*_tensors((args, kwargs)), *outputs]
        ):
            return "complex parameters or values (the per-sample norms are for real ones)"
        kind, b = self._kind[module], self._batch
        if kind == "attention":
            m: Any = module
            if m.training and m.dropout > 0:
                return (
                    "attention dropout (dropout > 0 in training) draws random numbers, which a "
                    "per-sample recomputation cannot reproduce"
                )
            layout = _attention_layout(m, self._bound(module, args, kwargs), b)
        elif kind == "rnn":
            m = module
            if m.training and m.dropout > 0 and m.num_layers > 1:
                return (
                    "dropout between its layers draws random numbers, which a per-sample "
                    "recomputation cannot reproduce"
                )
            layout = _rnn_layout(m, self._bound(module, args, kwargs), b)
        elif isinstance(module, nn.EmbeddingBag) and kind == "closed":
            return _bag_check(module, self._bound(module, args, kwargs), output, b)
        elif _cell(module):
            return _cell_check(self._bound(module, args, kwargs), outputs, b)
        else:
            tensors = _tensors((args, kwargs))
            first = args[0] if args else None
            # several tensor inputs, by position or by name, in tuples, lists or dicts too
            # (x, cond; x, (h, c); x, mask=m): those with the batch as dimension 0 are sliced
            # per sample, the others passed whole
            several = len(tensors) > 1 and isinstance(first, Tensor)
            if (len(tensors) != 1 and not several) or tensors[0] is not first:
                if len(tensors) == 1 and not args:
                    return (  # (a probe read "not one tensor input" for lin(input=x))
                        "its one tensor input is passed by keyword: the per-sample "
                        "forms take it as the first positional argument (module(x))"
                    )
                return "not a tensor as its first argument"
            if not isinstance(output, Tensor) and any(
                t.dim() == 0 or t.shape[0] != b for t in outputs
            ):  # (a tuple, list or dict of outputs, (h, c): each the batch's, batch-first)
                return (
                    f"an output without the batch ({b}) as dimension 0 (several outputs, in a "
                    "tuple, list or dict, are for a batch-first call only)"
                )
            if not _batch_dims(module, kind, first, outputs[0], b):
                return (
                    f"its input or output has the batch ({b}) neither as dimension 0 nor, "
                    "sequence-first (T, B, ·), as dimension 1"
                ) + self._declare_hint(module)
            if isinstance(module, (nn.Conv1d, nn.Conv2d)) and first.dim() != (
                3 if isinstance(module, nn.Conv1d) else 4
            ):
                return "an unbatched input"
            return None
        if isinstance(layout, str):
            return layout
        bound = self._bound(module, args, kwargs)
        for key, (dim, group) in layout.items():
            for t in _tensors(bound.get(key)):
                if dim is not None and (t.dim() <= dim or t.shape[dim] != b * group):
                    return f"its input {key!r} does not have the batch ({b}) at dimension {dim}"
        return None

    def _upstream_of_mixing(self, module: nn.Module) -> str | None:
        """The normalization with the batch's statistics that ran after ``module``'s forward
        started (a module holding one counts as upstream of it: its parameters may be used
        before it), if any."""
        start = self._start.get(module, -1)
        later = [name for tick, name in self._mixing if tick > start]
        return later[0] if later else None  # (the first after it: a BatchNorm's module name)

    def _single_use(self, module: nn.Module) -> bool:
        """Each of the unit's parameters is used once in this forward: by this one call."""
        return self._ncalls.get(module, 0) == 1 and all(
            sum(self._ncalls.get(u, 0) for u in self._units_of(p)) == 1
            for p in self._covers[module]
        )

    def _units_of(self, p: Tensor) -> list[nn.Module]:
        return self._units_by_param[id(p)]

    def _on_output_grad(self, call: _Call, k: int, g: Tensor | None) -> None:
        if g is None:  # no gradient reached this output (an LSTM's output when only its h_n is
            return  # used): it adds nothing to the per-sample gradient
        if self._skip_window:  # (the parameters changed after this forward: not measured)
            return
        call.grads[k] = g.detach()
        module = call.unit
        if self._kind[module] != "closed" or self._names[module] in self._excluded:
            return  # after the backward, outside autograd's engine
        if self._mode is not None or call.verify is not None or call.mixing is not None:
            return  # outside uses not known yet (no on_before_backward), or its layout, or
            # whether the samples are mixed after it (after the backward)
        if not self._single_use(module) or self._upstream_of_mixing(module) is not None:
            return
        if call.moved():  # (its input changed in place since: left out after the backward)
            return
        self._closed_form(call, g)

    def _closed_form(self, call: _Call, g: Tensor) -> None:
        """Add a single-use closed-form unit's per-sample squared norms from its input and
        its output's gradient ``g``."""
        module = call.unit
        # (autograd runs hooks with grad mode off unless the backward builds a graph)
        with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
            # float16/bfloat16 under autocast (and GradScaler-scaled): square in float32
            low = g.dtype in LOW_PRECISION
            g = g.detach().float() if low else g.detach()
            try:
                parts = self._closed_parts(call, g)
            except Exception as e:  # noqa: BLE001 (a measurement never stops the training)
                text = str(e).strip()
                self._excluded.setdefault(
                    self._names[module],
                    f"its closed form failed ({type(e).__name__}: "
                    f"{text.splitlines()[0][:200] if text else ''})",
                )
                call.grads.clear()
                return
            for n, sq in parts.items():
                self._add(getattr(module, n), sq)
            self._captured.add(module)
            call.grads.clear()  # done: nothing left for after the backward

    def _closed_parts(self, call: _Call, g: Tensor) -> dict[str, Tensor]:
        module = call.unit
        if isinstance(module, nn.EmbeddingBag):
            bound = self._bound(module, call.args, call.kwargs)
            return embedding_bag_sq_norms(
                module, bound["input"], bound.get("offsets"), bound.get("per_sample_weights"), g
            )
        a = call.args[0]
        if call.dim:  # sequence-first (T, B, ·): the closed forms take the batch first
            a, g = a.movedim(call.dim, 0), g.movedim(call.dim, 0)
        if isinstance(module, nn.Embedding):
            return embedding_sq_norms(module, a, g)
        if isinstance(module, nn.LayerNorm):
            return layer_norm_sq_norms(module, a.to(g.dtype), g)
        if isinstance(module, nn.Linear):
            return linear_sq_norms(module, a.to(g.dtype), g)
        return conv_sq_norms(module, a.to(g.dtype), g)  # type: ignore[arg-type]

    def _add(self, p: Tensor, sq: Tensor) -> None:
        """Add (B,) per-sample squared norms of parameter ``p`` (float32)."""
        sq = sq.float()
        self._sq[id(p)] = sq if id(p) not in self._sq else self._sq[id(p)] + sq

    def _per_sample_grads(self, call: _Call) -> dict[str, Tensor]:
        """The unit's parameters' per-sample gradients from this call, (B, *shape) each,
        recomputed on copies of its buffers as its forward began, its modules' attributes
        put back after (:func:`trainer.instrument.swap.attributes_kept`: a counter it keeps
        is not advanced by measuring). A unit of one's own (a class not torch's) must give
        gradients that add up to its batch's (:meth:`_sums_differ`), or :class:`_NotAlone`
        is raised, saying so."""
        with attributes_kept(call.unit):
            set_plain_attributes(call.attributes)  # (as its forward began)
            grads, alone = self._recompute(call, call.buffers)
            if self._kind[call.unit] == "func" and self._own_unit(call.unit):
                set_plain_attributes(call.attributes)
                assert alone is not None  # (a generic unit's: kept by _recompute)
                why = self._sums_differ(call, grads, alone)
                if why is not None:
                    raise _NotAlone(why)
            return grads

    def _sums_differ(
        self, call: _Call, per_sample: dict[str, Tensor], alone: tuple[Tensor, ...]
    ) -> str | None:
        """Why the per-sample gradients of a generic unit's call do not add up to its
        gradient on the whole batch, or None: Σᵢ ∇θ⟨f(xᵢ), gᵢ⟩, each sample alone, against
        ∇θ⟨f(X), G⟩, its forward run again on the batch's input X with the gradient G its
        output got in the step's backward. They are equal where the unit treats each sample
        alone; a unit reading a value of the whole batch that the mixing check's first 16
        samples of the first batch of a shape did not show (a clip by the batch's largest
        input, the outlier at sample 20 of 24, measured 171 % off at coverage 1: this
        session's probe, a review's 14.5 % before) gives each sample alone something else.
        Checked at every measured micro-batch: one forward and backward of the unit on the
        batch and one host read. Within √ε of the parameters' dtype (:func:`_loose`; both
        sides are computed in it from the same G) as :func:`_sums_apart` applies it, element
        by element. A unit whose gradient is 0 by construction (a shift before a softmax,
        alone in its unit) holds rounding noise on both sides, which may differ by more: it is
        left out, its true part being 0. Each sample's output alone (``alone``: the runs
        ``per_sample`` was taken through, stacked along the batch dimension) must also be its
        row of the batch's, whatever G is."""
        module = call.unit
        if not call.grads:  # (no gradient reached its outputs: every sample's is 0, and the
            return None  # batch's)
        params = dict(self._named_in(module, self._kind[module]))
        leaf = {n: p.detach() for n, p in params.items()}
        if _renorms(module):  # (a copy: its forward rewrites the rows it looks up)
            leaf = {n: p.clone() for n, p in leaf.items()}
        leaf = {n: p.requires_grad_() for n, p in leaf.items()}
        dtype = next(iter(leaf.values())).dtype
        a, rest, dims = _inputs_in(call, dtype)
        fresh = {n: b.clone() for n, b in call.buffers.items()}
        with torch.enable_grad():
            result = functional_call(module, {**leaf, **fresh}, *_call_inputs(call, a, rest))
            outs = _outputs_of(result, call)
            shapes = [tuple(shape) for shape, _, _ in call.outputs]
            try:
                if outs is None:
                    raise ValueError
                root = _outputs_root(outs, [call.grads.get(k) for k in range(len(outs))])
            except ValueError:
                return (
                    "its forward run again on the batch gives outputs of other shapes "
                    f"({[tuple(t.shape) for t in _tensors(result)]}, not {shapes})"
                )
            if root is None:  # (its parameters do not reach its outputs: 0 on both sides,
                # unless the step's backward reached them another way)
                if not call.real:  # (nothing reached them: 0 there too, no read)
                    return None
                zeros = {n: torch.zeros_like(p) for n, p in leaf.items()}
                other = self._elsewhere(call, zeros, per_sample, a.shape[call.dim])
                # host read: such a unit's, where the step's backward reached its parameters
                # through the nodes its call made (it is then left out, or was 0 there)
                found = [] if other is None else _apart(other, other[1].tolist())
                return _elsewhere_why(module, found) if found else None
            got = torch.autograd.grad(
                root, list(leaf.values()), allow_unused=True, retain_graph=True
            )
            # the samples' gradients again with a fixed random weight cᵢ each: where the
            # step's output gradient is the same row for every sample (a loss linear in the
            # unit's output), a backward reading the batch (a straight-through estimator of
            # the batch's mean) kept its plain sum, 12 % off at coverage 1 (a review's)
            count, d = a.shape[call.dim], call.dim
            grads = [call.grads.get(k) for k in range(len(outs))]
            coef = _sample_coefficients(count, a.device, dtype)
            weighted = None
            if all(g is None or (g.dim() > d and g.shape[d] == count) for g in grads):
                root_c = _outputs_root(outs, [
                    None if g is None else g.to(dtype) * coef.view(
                        [-1 if i == d else 1 for i in range(g.dim())])
                    for g in grads  # (in the parameters' dtype: a bfloat16 G times c was
                    # rounded, the samples' side not, and a unit under autocast left out)
                ])  # fmt: skip
                if root_c is not None:
                    weighted = torch.autograd.grad(root_c, list(leaf.values()), allow_unused=True)
        batch_grads = {
            n: torch.zeros_like(leaf[n]) if b is None else b.detach()
            for n, b in zip(leaf, got, strict=True)
        }
        triples = [(per_sample[n].sum(0), batch_grads[n], per_sample[n].abs().sum(0)) for n in leaf]
        if weighted is not None:
            for n, b in zip(leaf, weighted, strict=True):
                rows = per_sample[n] * coef.view(-1, *[1] * leaf[n].dim()).to(per_sample[n].dtype)
                b = torch.zeros_like(leaf[n]) if b is None else b.detach()
                triples.append((rows.sum(0), b, rows.abs().sum(0)))
        # (both sides in the parameters' dtype, from the same G, cast exactly: with bfloat16's
        # √ε under autocast, a clip of 0.91 was 4.7 % off at coverage 1, a review's)
        loose = _loose(a.device, dtype)
        apart = _sums_apart(triples, loose, a.shape[call.dim])
        other = self._elsewhere(call, batch_grads, per_sample, a.shape[call.dim])
        # each sample alone by value too, whatever G is: where the step's output gradient is
        # the same row for every sample (a critic's loss linear in its output), a wrong
        # per-sample input (a table of B rows that is no sample's, sliced) kept the sum, and
        # its norms were 65 % off at coverage 1 (a review's). Those of the runs its per-sample
        # gradients were taken through (until the thirty-second session a forward of their
        # own, by vmap or one sample at a time: 18 % of a looped unit's measuring)
        batch = [o.detach() for o in outs]
        off = torch.stack([
            (
                ((rows - kept.reshape(rows.shape)).abs()
                 > loose * kept.abs().nan_to_num(0, 0, 0).amax())
                & ~(rows.isnan() & kept.reshape(rows.shape).isnan())
            ).any()
            for rows, kept in zip(alone, batch, strict=True)
        ]).any()  # fmt: skip
        # host read: one per unit of one's own per measured micro-batch
        flags = [apart, off] if other is None else [apart, off, *other[1]]
        sums_apart, rows_apart, *elsewhere = torch.stack(flags).tolist()
        if not (sums_apart or rows_apart):
            found = [] if other is None else _apart(other, elsewhere)
            return _elsewhere_why(module, found) if found else None
        found = []
        if rows_apart:
            found.append("each sample run alone gives another output than its row of the batch")
        if sums_apart:
            found.append(
                "its per-sample gradients, each sample run alone, do not add up to its "
                "gradient on the whole batch"
            )
        why = " and ".join(found) + (
            ": its forward reads a value of the whole batch (its size, a statistic, a clip by "
            "its largest input) that this micro-batch shows and its mixing check's did not, "
            "or a tensor input of B rows is no sample's (a table as long as the batch, taken "
            "for the samples')"
        )
        if not rows_apart:
            why += (
                ", or its gradient is rounding noise on both sides (0 by construction: a shift "
                "before a softmax)"
            )
        return why + " (left out on such a micro-batch; checked at each)"

    def _elsewhere(
        self, call: _Call, batch: dict[str, Tensor], per_sample: dict[str, Tensor], n: int
    ) -> tuple[list[str], Tensor] | None:
        """Whether the gradient the step's backward handed a watched call's parameters
        (``call.real``, from the nodes its call made) differs from ``batch``, its outputs'
        alone (their gradients in the step, through its forward run again): the parameters'
        names and a flag for each, on the device; None where the call is not watched. Within
        √ε of the parameters' dtype as :func:`_sums_apart` applies it (``per_sample``'s Σᵢ
        |gᵢ|). Under autocast, its forward runs again as the step's did instead (its inputs in
        their dtypes, under the same autocast: the same roundings), within 2ε of autocast's
        dtype (an order of summation the device may change; compared with ``batch``, computed
        in the parameters' dtype, √ε of bfloat16 let a path of 0.05 % of the norms through,
        this session's probe)."""
        first = next(iter(batch.values()))
        loose = _loose(first.device, first.dtype)
        if call.autocast is not None:
            batch = self._as_the_step(call, {k: b.dtype for k, b in batch.items()})
            loose = max(loose, 2 * torch.finfo(call.autocast[1]).eps)
        call.batch = {k: (b, per_sample[k].abs().sum(0)) for k, b in batch.items()}
        call.loose = loose  # (and for :meth:`_totals_differ`, after every call)
        real = call.real
        if real is None:
            return None
        triples = [
            (real[k].to(b.dtype) if k in real else torch.zeros_like(b), b, spread)
            for k, (b, spread) in call.batch.items()
        ]  # fmt: skip
        # (by parameter: the warning names those the backward reached past the outputs)
        return list(call.batch), _sums_apart(triples, loose, n, each=True)

    def _as_the_step(self, call: _Call, dtypes: dict[str, torch.dtype]) -> dict[str, Tensor]:
        """A generic unit call's gradient from its outputs alone, its forward run again as the
        step ran it: on copies of its inputs in their dtypes and of its buffers as it began,
        from its attributes as it began, under its autocast; by parameter name. Summed as the
        step's is (:meth:`_watch`): at each use of a parameter's cast, in the parameter's
        dtype (autograd summed 64 uses of one autocast cast in bfloat16, 1.3 % of the
        parameter's largest gradient apart from the step's: its unit left out on some steps,
        a review's)."""
        module = call.unit
        leaf = {
            n: p.detach().clone().requires_grad_()
            for n, p in self._named_in(module, self._kind[module])
        }
        own: dict[int, Tensor] = {id(p): p for p in leaf.values()}
        names = {id(p): n for n, p in leaf.items()}
        set_plain_attributes(call.attributes)
        fresh = {n: b.clone() for n, b in call.buffers.items()}
        sink = _Sink([True])
        mode = _OutsideUses({k: [module] for k in own}, {module: 1})
        mode.watched = {module}
        with torch.enable_grad(), call.autocast_again():
            since = _next_node() if _next_node is not None else 0
            with mode:
                result = functional_call(module, {**leaf, **fresh}, _copies(call.args),
                                         _copies(call.kwargs))  # fmt: skip
            outs = _outputs_of(result, call)
            root = None
            if outs is not None:
                root = _outputs_root(outs, [call.grads.get(k) for k in range(len(outs))])
            if root is not None:
                starts = [o.grad_fn for o in outs if o.grad_fn is not None]  # type: ignore[union-attr]
                starts += mode.uses.get(module, [])
                _hook_own(starts, since, own, names, sink)
                torch.autograd.grad(root, list(leaf.values()), allow_unused=True)
        real = sink.real or {}
        return {
            n: real[n].to(dtypes[n]) if n in real else torch.zeros_like(p, dtype=dtypes[n])
            for n, p in leaf.items()
        }

    def _totals_differ(self, trainer: Trainer) -> None:
        """Leaves out the units of a parameter whose whole gradient in the step's backward (its
        hook's, :meth:`_reach`) is not the sum of its units' calls' gradients from their
        outputs alone (:attr:`_Call.batch`): a path no hook of an output sees and no node a
        call made shows (a tensor kept from an earlier step's forward and read in this one's
        loss, 52 % off at coverage 1; a side branch made by a custom autograd Function or under
        vmap inside the forward, whose results no mode sees with a node, 2.6 %; a unit called
        outside the model's forward, in the loss, 0.7 %: a review's), or a use of it in the
        loss. For the parameters whose every unit is a watched unit of one's own:
        :attr:`_totaled`. A regularizer's gradient joins the same backward: its ``grad()`` is
        taken out (the trainer's l2, l1 and orthogonal, and a subclass of one's own, whose
        backward is compared with its ``GRADS`` before training; left unchecked, a side branch
        into a parameter it reached went through at coverage 1). Within the calls' tolerance as
        :func:`_sums_apart` applies it; under autocast, for a parameter used k times, at least
        √k·ε of autocast's dtype: the step sums the uses of a cast in that dtype (64 uses of an
        autocast cast of a weight in a loop were 1.3 % of its largest gradient apart from the
        sum of their own, a review's; k·ε/2 let a side branch of 1.5 % through at k = 64,
        another's, which √k·ε catches, 0.5 % the largest let through there; with √k·ε/2, no
        step of 120 with 16-128 uses under bfloat16 and float16 was left out, this session's
        probe).
        One host read per measured micro-batch where there is any."""
        if not self._total:
            return
        expected: dict[int, tuple[Tensor, Tensor, float]] = {}
        uses: dict[int, int] = {}
        for call in self._calls:
            if not call.batch:
                continue
            named = dict(self._named_in(call.unit, self._kind[call.unit]))
            eps = torch.finfo(call.autocast[1]).eps if call.autocast is not None else 0.0
            for n, (b, spread) in call.batch.items():
                key = id(named[n])
                uses[key] = uses.get(key, 0) + call.uses.get(n, 1)
                loose = max(call.loose, eps * math.sqrt(uses[key]))
                if key in expected:
                    b0, s0, loose0 = expected[key]
                    expected[key] = (b0 + b, s0 + spread, max(loose0, loose))
                else:  # (each parameter by its own calls' tolerance: a bfloat16 unit's
                    # elsewhere let a float32 one's 4.9 % through, a review's)
                    expected[key] = (b, spread, loose)
        reg: dict[int, Tensor] = {}  # (the regularizers' part of the whole, where it is in)
        own: dict[int, list[str]] = {}  # (a regularizer of one's own, by what it reaches)
        if self._regs and getattr(getattr(trainer, "objective", None), "reg_in_backward", False):
            scale = _loss_scale(trainer.scaler) if trainer.scaler is not None else 1.0
            for r in self._regs:
                for p, g in zip(r.params, r.grad(), strict=True):
                    if id(p) in self._total:
                        g = g * scale
                        reg[id(p)] = g if id(p) not in reg else reg[id(p)] + g
                        if type(r) is not Regularizer:
                            own.setdefault(id(p), []).append(f"{r.name} ({type(r).__name__})")
        keys, flags, unsure = [], [], []
        for key, total in self._total.items():
            units = self._units_by_param.get(key, [])
            if not units or any(
                self._names[u] in self._excluded or u not in self._captured for u in units
            ):
                continue  # (left out already, or no call of them measured)
            if key in expected:
                b, spread, loose = expected[key]
            else:
                b, spread = torch.zeros_like(total), torch.zeros_like(total)
                loose = _loose(total.device, total.dtype)
            got = total.to(b.dtype)
            if key in reg:  # (taken out of the whole, not added to the sum: compared at the
                # regularizer's scale, l2.coef=10 let a side branch through, a review's; the
                # subtraction's rounding, ε of the whole, within the tolerance)
                part = reg[key].to(b.dtype)
                got = got - part
                rounding = part.abs() * (4 * torch.finfo(b.dtype).eps)
                spread = spread + rounding / loose
                # (where that rounding passes what the data's part may differ by, the rest
                # cannot be told: a bfloat16 unit under l2.coef=10 let a side branch through)
                # (not where the data's part is 0, a parameter its calls did not use: the
                # regularizer's alone, nothing to tell apart)
                data = b.abs().amax()
                unsure.append((rounding.amax() > loose * data) & (data > 0))
            else:
                unsure.append(torch.zeros((), dtype=torch.bool, device=b.device))
            keys.append(key)
            flags.append(_sums_apart([(got, b, spread)], loose, self._batch))
        self._total.clear()
        if not flags:
            return
        # host read: one per measured micro-batch with such parameters
        read = torch.stack([*flags, *unsure]).tolist()
        for key, apart, vague in zip(keys, read[: len(keys)], read[len(keys) :], strict=True):
            param = self._param_names.get(key, "a parameter")
            if vague:
                for unit in self._units_by_param[key]:
                    self._excluded.setdefault(
                        self._names[unit],
                        f"the regularizers' part of {param}'s gradient is too large beside its "
                        f"data's part for {self._param_by_id[key].dtype} to check that the rest "
                        "is its calls' outputs' alone (left out on such a micro-batch)",
                    )
                continue
            if not apart:
                continue
            mine = (  # (its backward is compared with its GRADS at the start only)
                f", or regularizer {own[key][0]} trained on another gradient than its grad() "
                "(GRADS) reports at these parameters"
                if len(own.get(key, ())) == 1
                else f", or regularizers {' or '.join(own[key])} trained on other gradients "
                "than their grad() (GRADS) reports at these parameters"
                if key in own
                else ""
            )
            for unit in self._units_by_param[key]:
                self._excluded.setdefault(
                    self._names[unit],
                    f"the step's backward handed {param} another gradient than its calls' "
                    "outputs' alone: a tensor kept with a path to it got a gradient no hook of "
                    "their outputs sees (kept from an earlier step, made by a custom autograd "
                    "Function or under vmap inside its forward, or by a call outside the "
                    "model's forward), the loss uses it directly, or a hook on it changes its "
                    f"gradient{mine} (left out on such a micro-batch; checked at each)",
                )

    def _recompute(
        self, call: _Call, buffers: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], tuple[Tensor, ...] | None]:
        """The unit's per-sample gradients from this call, and a generic unit's outputs of
        each sample alone, stacked along its batch dimension (None for the others): those of
        the runs its gradients were taken through."""
        module = call.unit
        params = {n: p for n, p in self._named_in(module, self._kind[module])}
        if call.changed is not None and _cell(module):  # (no check of its change there)
            raise _NotAlone(call.changed[0])
        if _cell(module):
            return self._cell_grads(call, {n: p.detach() for n, p in params.items()}), None
        if self._kind[module] in ("closed", "func"):
            leaf = {n: p.detach() for n, p in params.items()}
            if _renorms(module):  # (a copy: its forward rewrites the rows it looks up)
                leaf = {n: p.clone() for n, p in leaf.items()}
            dtype = next(iter(leaf.values())).dtype
            # each output's gradient (zeros where none reached it), in the parameters' dtype
            g = tuple(
                call.grads[k].to(dtype) if k in call.grads
                else torch.zeros(shape, dtype=dtype, device=device)
                for k, (shape, _, device) in enumerate(call.outputs)
            )  # fmt: skip
            a, rest, dims = _inputs_in(call, dtype)
            d = call.dim  # (1: sequence-first, (T, B, ·))

            def inner(
                p: dict[str, Tensor],
                ai: Tensor,
                gi: tuple[Tensor, ...],
                *ri: Tensor,
                bufs: dict[str, Tensor] = buffers,
            ) -> tuple[Tensor, tuple[Tensor, ...]]:
                outs = _one_sample(call, {**p, **bufs}, ai, rest, dims, ri)
                root = _outputs_root(outs, [gk.unsqueeze(d) for gk in gi])
                # (the outputs too: a unit of one's own compares them with its batch's rows,
                # :meth:`_sums_differ`, the runs its gradients are of, not another forward)
                zero = ai.new_zeros((), dtype=dtype)
                return (root if root is not None else zero), tuple(outs)

            # (outside autograd: the unit's other parameters, a parent's children, are the
            # model's own, and the rows were part of the step's graph, kept alive until the
            # next measurement; torch.func's grad differentiates inside no_grad all the same)
            given, in_dims = _batched(rest, dims)
            # on copies of the copies: the batch's runs of the checks, and the loop below where
            # vmap refuses partway (a change in place already made: one more per sample, and
            # a spectral norm left out so, a review's), start from the forward's start again
            batched = {n: b.clone() for n, b in buffers.items()}
            with torch.no_grad():
                try:
                    result = vmap(
                        partial(grad(inner, has_aux=True), bufs=batched),
                        in_dims=(None, d, d, *in_dims), out_dims=(0, d),
                    )(leaf, a, g, *given)  # fmt: skip
                except Exception as e:  # noqa: BLE001 (vmap's own refusals: checked below)
                    if "randomness" in str(e):  # (a draw: left out by the caller)
                        raise
                    refusal = e
                else:  # (under vmap a change in place reading a sample raises: the batch
                    # size, read as 1, can still differ)
                    if call.changed is not None and not _same_change(call.changed[1], [batched]):
                        raise _NotAlone(call.changed[0])
                    return result
                # Run one sample at a time, each from the attributes and buffers its forward
                # began with, where vmap refuses a forward that treats each sample alone:
                # torch's Embedding with max_norm (its lookups renormalize the table in
                # place; left out until the twenty-seventh session), and a unit of one's own
                # (a top-1 router's argmax as an index, a branch on a sample's value; left out
                # until the thirty-first session). What a unit of one's own does after the
                # point vmap stopped at may read a value of the whole batch, on the host
                # (``torch.zeros(n)`` of a tensor ``n``, a slice by it) or as a tensor: in two
                # versions that ran it with the mixing check alone (its first 16 samples of
                # the first batch of a shape), clips by the batch's largest input, the
                # outlier at sample 20 of 24, were 16-163 % off at coverage 1, the
                # twenty-fifth session's 31 % (reverted). Since the twenty-eighth session its
                # samples alone must give its batch's rows and add up to its batch's
                # gradient at every measured micro-batch (:meth:`_sums_differ`, its rows
                # alone run one at a time too where vmap refuses them).
                own = self._kind[module] == "func" and self._own_unit(module)
                if not own and call.changed is not None:  # (vmap's refusal of the change)
                    raise _NotAlone(call.changed[0]) from refusal
                if not own and (type(module) not in _ALONE or in_dims):
                    raise refusal
                if own and module not in self._looped:
                    self._looped.add(module)
                    first = str(refusal).strip().splitlines()[0] if str(refusal).strip() else ""
                    first = first.split(" Please ")[0].split(" http")[0]  # (its links cut)
                    log.info(
                        "per-sample gradient norms run %r one sample at a time (vmap refuses "
                        "its forward: %s: %s): per measured micro-batch, B forwards and "
                        "backwards of it, checked against its batch's",
                        self._names[module], type(refusal).__name__, first[:160],
                    )  # fmt: skip
                by_sample: list[tuple[dict[str, Tensor], tuple[Tensor, ...]]] = []
                runs: list[dict[str, Tensor]] = []
                try:
                    for i, fresh, ai, ri in _each_sample(call, buffers, a, given, in_dims):
                        by_sample.append(grad(inner, has_aux=True)(  # (its buffers passed
                            {**leaf}, ai, tuple(t.select(d, i) for t in g), *ri, bufs=fresh
                        ))  # to it: a change in place of one captured is refused)  # fmt: skip
                        runs.append(fresh)
                except Exception as e:  # noqa: BLE001 (the loop's error: named, vmap's too)
                    changes = ""  # (torch.func refuses a change in place of a buffer it did
                    if call.changed is not None:  # not make, outside no_grad: said so)
                        changes = f"it changes {few(list(call.changed[1]))} in place: "
                    raise RuntimeError(
                        f"{changes}{type(e).__name__}: {str(e).strip()[:150]}; under vmap: "
                        f"{type(refusal).__name__}: {str(refusal).strip()[:150]}"
                    ) from e
                if call.changed is not None and not _same_change(call.changed[1], runs):
                    raise _NotAlone(call.changed[0])
                each = tuple(
                    torch.stack(o, d) for o in zip(*(r[1] for r in by_sample), strict=True)
                )
                return {n: torch.stack([r[0][n] for r in by_sample]) for n in leaf}, each
        # attention, RNNs: one recomputation per sample (their kernels have no batching rule)
        bound = self._bound(module, call.args, call.kwargs)
        if self._kind[module] == "attention":
            layout = _attention_layout(cast(nn.MultiheadAttention, module), bound, self._batch)
        else:
            layout = _rnn_layout(cast(nn.RNNBase, module), bound, self._batch)
        assert not isinstance(layout, str)
        if self._kind[module] == "attention":
            return self._attention_vmap(call, params, bound, layout, buffers), None
        out: dict[str, list[Tensor]] = {n: [] for n in params}
        leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
        x_key = _rnn_keys(bound)[0] if self._kind[module] == "rnn" else None
        packed = bound.get(x_key) if x_key is not None else None
        rows: list[Tensor] = []
        if isinstance(packed, PackedSequence):  # each sample's rows, in time order, and
            # its sequence alone as a batch of one in the RNN's layout
            owner = _packed_owner(packed).cpu()  # host sync: a measured step's, per packed call
            order = torch.argsort(owner, stable=True).to(packed.data.device)
            rows = list(order.split(torch.bincount(owner, minlength=self._batch).tolist()))
            alone = 0 if cast(nn.RNNBase, module).batch_first else 1

        def output_grad(k: int, o: Tensor, i: int) -> Tensor:
            g = call.grads[k].to(o.dtype)
            if rows and k == 0:  # (the packed output's data: the sample's rows)
                return g.index_select(0, rows[i]).reshape(o.shape)
            return _slice_sample(g, dim=call.dims[k], i=i)

        for i in range(self._batch):
            sample = {
                key: _map_tensors(v, partial(_slice_sample, dim=layout[key][0], i=i,
                                             group=layout[key][1]))
                if key in layout
                else v
                for key, v in bound.items()
            }  # fmt: skip
            if rows:
                data = cast(PackedSequence, packed).data
                sample[cast(str, x_key)] = data.index_select(0, rows[i]).unsqueeze(alone)
            with torch.enable_grad(), call.autocast_again():
                fresh = {n: b.clone() for n, b in buffers.items()}  # (each sample's from
                # the same start: a change in place is run again for each)
                result = functional_call(module, {**leaves, **fresh}, (), sample)
                outs = [t for t in _tensors(result) if t.requires_grad]
                root = sum(
                    (o * output_grad(k, o, i)).sum() for k, o in enumerate(outs) if k in call.grads
                )
                names = list(leaves)
                if not isinstance(root, Tensor):  # no gradient reached its outputs
                    grads = [torch.zeros_like(leaves[n]) for n in names]
                else:
                    got = torch.autograd.grad(root, [leaves[n] for n in names], allow_unused=True)
                    grads = [torch.zeros_like(leaves[n]) if x is None else x
                             for n, x in zip(names, got, strict=True)]  # fmt: skip
            for n, x in zip(names, grads, strict=True):
                out[n].append(x)
        return {n: torch.stack(v) for n, v in out.items()}, None

    def _cell_grads(self, call: _Call, leaf: dict[str, Tensor]) -> dict[str, Tensor]:
        """A torch RNN cell's per-sample gradients from this call, (B, *shape) each: the
        gradient of Σₖ ⟨outₖ, gₖ⟩ for each sample alone (its input row, its state's rows, zeros
        where the call gave none, as the cell builds them; its outputs' gradient rows), by
        vmap. In the parameters' dtype, as the other recomputations. Where an LSTMCell's h was
        computed from its c (CPU: torch's composite), the gradient c's hook got includes the
        path through h, which its formula (:func:`_lstm_cell`) cuts (counted twice, its norms
        were 12 % off: this session's first version); there its weights must be its own
        parameters (a computed one, a parametrization's, was read as it was: its originals
        got 0, a review's); elsewhere, torch's own forward."""
        module = call.unit
        bound = self._bound(module, call.args, call.kwargs)
        dtype = next(iter(leaf.values())).dtype
        x = bound["input"].to(dtype)
        hx = _map_tensors(bound.get("hx"), lambda t: t.to(dtype))
        if hx is None:
            zero = x.new_zeros(x.shape[0], cast(Any, module).hidden_size)
            hx = (zero, zero) if isinstance(module, nn.LSTMCell) else zero
        gs = tuple(
            call.grads[k].to(dtype) if k in call.grads else torch.zeros(shape, dtype=dtype,
                                                                        device=device)
            for k, (shape, _, device) in enumerate(call.outputs)
        )  # fmt: skip
        lstm = isinstance(module, nn.LSTMCell) and call.nested
        if lstm and (
            parametrize.is_parametrized(module)
            or not set(module._parameters) <= _LSTM_WEIGHTS
            or module._parameters.get("weight_ih") is None
            or module._parameters.get("weight_hh") is None
        ):  # (its formula read a computed weight as it was: 0 for its originals, a review's)
            raise ValueError(
                "an LSTMCell whose weights are computed from other parameters (a "
                "parametrization, weight_norm, prune): its recomputation by the cell's formula, "
                "which the CPU's composite kernel needs (its h' computed from its c'), reads "
                "the parameters themselves"
            )
        weights = {n: getattr(module, n) for n in _LSTM_WEIGHTS} if lstm else {}

        def inner(p: dict[str, Tensor], xi: Tensor, hi: Any, gi: tuple[Tensor, ...]) -> Tensor:
            state = _map_tensors(hi, lambda t: t.unsqueeze(0))
            if lstm:
                outs = list(_lstm_cell({**weights, **p}, xi.unsqueeze(0), state))
            else:  # (torch's own forward: its weights computed as the step computed them)
                outs = _tensors(functional_call(module, p, (xi.unsqueeze(0), state)))
            if len(outs) != len(gi):  # (an output that does not need a gradient)
                raise ValueError(f"{len(outs)} outputs on one sample, {len(gi)} in the batch")
            parts = [(o.squeeze(0) * g).sum() for o, g in zip(outs, gi, strict=True)]
            return torch.stack(parts).sum()

        with torch.no_grad():  # (torch.func's grad differentiates inside no_grad all the same)
            return vmap(grad(inner), in_dims=(None, 0, 0, 0))(leaf, x, hx, gs)

    def _attention_vmap(
        self,
        call: _Call,
        params: Mapping[str, Tensor],
        bound: dict[str, Any],
        layout: _Layout,
        buffers: dict[str, Tensor],
    ) -> dict[str, Tensor]:
        """Attention's per-sample gradients in one ``vmap(grad(...))`` over the samples, each
        seen unbatched by the module; the math attention kernel, which has batching rules."""
        module = call.unit
        keys = [k for k in layout if isinstance(bound.get(k), Tensor)]
        xs, x_dims = [], []
        for k in keys:
            t, (dim, group) = bound[k], layout[k]
            if group > 1:  # (B · heads, L, S) -> (B, heads, L, S)
                t = t.reshape(-1, group, *t.shape[1:])
            xs.append(t)
            x_dims.append(dim)
        got = sorted(call.grads)
        if not got:  # no gradient reached its outputs: no per-sample gradient either
            return {n: p.new_zeros(self._batch, *p.shape) for n, p in params.items()}
        gs = [call.grads[k] for k in got]
        leaves = {n: p.detach() for n, p in params.items()}
        fixed = {k: v for k, v in bound.items() if k not in keys}

        def inner(p: dict[str, Tensor], *tensors: Tensor) -> Tensor:
            kwargs = {**fixed, **dict(zip(keys, tensors[: len(keys)], strict=True))}
            outs = _tensors(functional_call(module, {**p, **buffers}, (), kwargs))
            grads = tensors[len(keys) :]
            parts = [(outs[k] * g.to(outs[k].dtype)).sum() for k, g in zip(got, grads, strict=True)]
            return torch.stack(parts).sum()

        dims = (None, *x_dims, *[call.dims[k] for k in got])
        # the math kernel forms each sample's scores, (heads, L, S), where training's fused
        # kernels form none: about 4 such tensors per sample (scores, weights, their
        # gradients), for as many samples at once as fit in MATERIALIZE_BYTES (all B at once
        # took 692 MiB for a step's 218 MiB at B = 8, T = 1,024 on a review's CPU)
        b, query, key = self._batch, bound.get("query"), bound.get("key")
        chunk = None
        if isinstance(query, Tensor) and isinstance(key, Tensor) and b > 0:
            length = query.numel() // max(b * query.shape[-1], 1)
            source = key.numel() // max(b * key.shape[-1], 1)
            heads = cast(nn.MultiheadAttention, module).num_heads
            each = 4 * heads * length * source * query.element_size()
            fits = max(1, MATERIALIZE_BYTES // max(each, 1))
            chunk = fits if fits < b else None
        with sdpa_kernel(SDPBackend.MATH), call.autocast_again(), torch.no_grad():  # (above)
            return vmap(grad(inner), in_dims=dims, chunk_size=chunk)(leaves, *xs, *gs)

    def on_after_backward(
        self, trainer: Trainer, batch: Batch, losses: Tensor, weights: Tensor | None
    ) -> None:
        self._counting[0] = False
        if not self._handles:
            return
        self._disarm()
        self._leave_mode()  # (left when the model's forward returned; not if it never ran)
        pending = {c.verify: c for c in self._calls if c.verify is not None}
        sizes = {c.sizes: c for c in self._calls if c.sizes is not None}
        if pending or sizes:
            unsure = self._verify(trainer, batch, pending, sizes)
            for c in sizes.values():
                known = self._other_dims.get(cast(Any, c.sizes))
                if known is not None and not isinstance(known, str):
                    c.at = dict(known)
                elif c.sizes in unsure:  # (each sliced as its size says, this micro-batch;
                    c.sizes = None  # asked again at the next measured one)
            for c in pending.values():  # (its batch's dimension, settled: its mixing check's
                found = self._verdicts.get(cast(Any, c.verify))  # key says which it watches)
                if isinstance(found, int):
                    c.dim, c.dims = found, [found] * len(c.dims)
                    if c.mixing is not None:
                        c.mixing = _keyed(c.mixing, found)
        checked = self._mixing_checks.get(self._signature)
        gave_up = self._signature in self._mixing_failed
        unknown = [c for c in self._calls if c.mixing is not None
                   and (checked is None or c.mixing not in checked[1] and not gave_up)]  # fmt: skip
        # (not where each call unknown is a unit of one's own whose output is 0 here too: its
        # check would show nothing of it again. A frozen adapter's B = 0 was checked at every
        # measured micro-batch, a forward and up to 24 backwards each, the first one twice)
        zeros = [c.zero for c in unknown if c.zero is not None]
        # (not after a normalization with the batch's statistics: the check runs BatchNorms
        # on their running ones, where its output may not be 0; a review's stayed left out)
        all_zero = checked is not None and not self._mixing and len(zeros) == len(unknown)
        # (host read: a measured step whose units of one's own unsettled gave an output of 0)
        if unknown and not (all_zero and bool(torch.stack(zeros).all())):
            self._check_mixing(trainer, batch)  # a new input signature, or a call its check
            checked = self._mixing_checks.get(self._signature)  # did not see (host read)
        fork: Fork | None = None
        with contextlib.ExitStack() as stack:
            for call in self._calls:
                module = call.unit
                name = self._names[module]
                found = self._verdicts.get(call.verify) if call.verify is not None else None
                why = found if isinstance(found, str) else None
                if why is None and call.sizes is not None:
                    known = self._other_dims.get(call.sizes)
                    if isinstance(known, str):
                        why = known
                    elif known is None:  # (not settled: left out, asked again on the next)
                        why = (
                            "whether its other inputs as long as the batch are the samples' "
                            "is not known yet: the model's forward and the loss on a few "
                            "samples did not make this call"
                        )
                if why is None and call.mixing is not None:
                    if checked is not None and call.mixing in checked[0]:
                        why = MIXED
                    elif checked is None or call.mixing not in checked[1]:
                        why = (
                            "whether the model mixes the samples after it (or, a unit of "
                            "one's own, inside its forward) is not known yet: "
                        ) + (
                            self._mixing_failed.get(self._signature)
                            or "its check's forward did not make this call, made it "
                            "without the check's samples along its batch dimension (its "
                            "input not in the layout it takes), or, a unit of one's own, "
                            "made it with an output of 0 (zero-initialized weights), which "
                            "shows no mixing inside it; checked again at a measured step "
                            "until it is known (a unit of one's own at one whose forward "
                            "gives it an output that is not 0)"
                        )
                if why is None and module in self._substituted:
                    why = (
                        "its forward ran with tensors in place of its parameters (torch.func."
                        "functional_call: a hypernetwork's or a tied transpose's weights): "
                        "their per-sample gradients are not its parameters'"
                    )
                if why is None and call.moved():
                    why = IN_PLACE
                if why is None and call.hidden[0]:
                    why = (
                        "its forward kept a tensor with a path to its parameters other than "
                        "through its outputs (in a list or dict it was given, an attribute: a "
                        "state beside them, a memory of its keys, an auxiliary loss, a cache), "
                        "and the backward sent a gradient into it, which no hook of its outputs "
                        "sees"
                    )
                if why is not None:
                    self._excluded.setdefault(name, why)
                if name in self._excluded or not call.grads and module in self._captured:
                    continue
                if not call.grads and any(id(p) in self._reached for p in self._covers[module]):
                    # (torch fires no hook of an output changed in place after the forward
                    # where it is a view of the op's result: a Linear's on sequences, then a
                    # ReLU(inplace=True); its part read 0, 12-47 % off at coverage 1 until
                    # 2026-12-06, a probe's)
                    self._excluded[name] = (
                        "no gradient was seen at its output (changed in place after its "
                        "forward?), but the backward reached its parameters"
                    )
                    continue
                mixing = self._upstream_of_mixing(module)
                if mixing is not None:
                    self._excluded[name] = (
                        f"runs before {mixing}, whose batch statistics mix the samples' gradients"
                    )
                    continue
                single = self._single_use(module)
                fresh = call.verify is not None and self._kind[module] == "closed"
                if single and fresh and 0 in call.grads:  # (its batch's dimension shown just
                    self._closed_form(call, call.grads[0])  # now: its closed form, as the hook's)
                    continue
                if (
                    not single
                    and isinstance(module, nn.EmbeddingBag)
                    and any(
                        self._bound(module, call.args, call.kwargs).get(k) is not None
                        for k in ("offsets", "per_sample_weights")
                    )
                ):
                    self._excluded[name] = (
                        "an EmbeddingBag with offsets or per_sample_weights used more than once "
                        "per forward (tied): its per-sample gradients are not recomputed by row"
                    )
                    continue
                if not single:
                    b = self._batch
                    big = [p for p in self._covers[module]
                           if b * p.numel() * p.element_size() > MATERIALIZE_BYTES]  # fmt: skip
                    if big:
                        self._excluded[name] = (
                            f"used more than once per forward, and {b} per-sample copies of "
                            f"{self._param_names.get(id(big[0]), 'a parameter')} exceed "
                            f"{MATERIALIZE_BYTES // 2**20} MiB"
                        )
                        continue
                if module in self._hooked:  # (recomputed below: a hook would not match)
                    self._excluded[name] = self._hooked[module]
                    continue
                drawing = (
                    "its forward draws random numbers (dropout inside it; Python's or NumPy's "
                    "global generator), which a per-sample recomputation cannot reproduce"
                )
                if fork is None:  # (the recomputations on copies of the random states: the
                    fork = stack.enter_context(forked_rng(call.device))  # run's next draws stay)
                apart = None
                try:
                    per_sample = self._per_sample_grads(call)
                except _NotAlone as e:  # (its sums are not its batch's: this micro-batch)
                    apart = str(e)
                except Exception as e:  # its forward cannot be recomputed per sample (vmap's
                    # errors; an output of an unexpected kind; a hook of one's own reading its
                    # arguments by position, given as keywords here: an IndexError escaped)
                    if "randomness" in str(e):
                        self._excluded[name] = drawing
                    else:  # (left out and named: a measurement never stops the training)
                        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                        self._excluded[name] = (
                            f"its forward cannot be recomputed per sample ({type(e).__name__}: "
                            f"{first[:200]})"
                        ) + _vmap_hint(str(e))
                    continue
                finally:  # (torch's draws under vmap raise; Python's and NumPy's do not)
                    drew = fork.drew()
                    if drew:  # the next unit starts from the same states
                        fork.rewind()
                if drew:  # what it drew now is not what the step's forward drew (its samples
                    # alone not its rows, too: named for the draw, a unit run one at a time)
                    self._excluded[name] = drawing
                    continue
                if apart is not None:
                    self._excluded[name] = apart
                    continue
                covered = dict(self._named_in(module, self._kind[module]))
                if single:
                    for n, v in per_sample.items():
                        self._add(covered[n], v.float().pow(2).reshape(v.shape[0], -1).sum(1))
                else:  # summed over the parameter's uses before squaring (the cross terms)
                    for n, v in per_sample.items():
                        key = id(covered[n])
                        self._shared[key] = v if key not in self._shared else self._shared[key] + v
                self._captured.add(module)
        self._totals_differ(trainer)
        for call in self._calls:  # (a graph kept alive past the step keeps no copies)
            if call.sink is not None:
                call.sink.real = None
        self._calls.clear()
        self._finish_shared()
        for name, m, own, _ in self.units:  # coverage counts what was captured, not visited
            if m not in self._captured and name not in self._excluded and self._batch > 0:
                if not any(id(p) in self._reached or self._grad_written(p) for p in own):
                    continue  # a branch not taken: no sample's gradient reached it, each is 0
                self._excluded[name] = (
                    "no per-sample gradient was captured, but the backward reached its "
                    "parameters: they are used outside its own forward (F.linear(x, "
                    "module.weight) in the loss, a custom autograd Function, a gradient "
                    "written to .grad by hand), its forward ran without gradients and again "
                    "in the backward (a reentrant activation checkpoint: use_reentrant=False "
                    "is measured), or a regularizer's gradient reached them (a branch not "
                    "taken is then not told apart)"
                )
        self._grads_before.clear()  # (no gradient kept alive past the micro-batch)
        self._report(trainer)
        for name, why in self._excluded.items():
            self._window_excluded.setdefault(name, why)
        zero = torch.zeros(losses.shape[0], dtype=torch.float32, device=losses.device)
        sq = torch.stack([self._sq.get(id(p), zero) for p in self._params], 1)  # (B, params)
        self._sq.clear()
        if trainer.scaler is not None:  # the root's gradient was multiplied by the loss scale
            sq = sq / _loss_scale(trainer.scaler) ** 2
        # each loss element's coefficient in the root that was backpropagated, as the
        # objective defines it (vector mode: the weights; data-parallel, × world size)
        if weights is None:
            weights = trainer.objective.coefficients(losses, batch.y, trainer.window)
        w = sample_coefficients(weights.detach().float())
        units = (  # (with the dtype, as the objective asks: a units(target, dtype) of one's
            # own, without a default, failed here, a probe's)
            trainer.objective.loss.units(batch.y, units_dtype(losses.dtype))
            if losses.ndim > 1 else None
        )  # fmt: skip
        if units is not None:  # (per-token losses: which sequences have a target)
            w = torch.stack([w, units.flatten(1).ne(0).any(1).to(w.dtype)], 1)
        self._weighted.append(sq)
        self._weights.append(w)
        # the batch gradient the statistics take from .grad must be the backward's: checked
        # once every callback's on_after_backward has had it (one of one's own changing it
        # there, a noise or a surgery, mixed the two: a probe's noise scale of -8,396 for a
        # true 35.8, unsaid)
        self._snapshot()
        trainer.after_backward_callbacks = self._check_unchanged

    def _snapshot(self) -> None:
        """The gradients as they are now, which :meth:`_check_unchanged` compares with."""
        self._after = self._grad_states()
        self._after_norms = self._grad_norms_now()

    def _grad_states(self) -> list[tuple[Tensor, Tensor | None, int, int]]:
        """Each parameter's gradient as it is now: the tensor, its version counter and its
        memory (``p.grad.data = ...`` keeps the tensor and moves no counter)."""
        return [(p, g, -1, 0) if g is None else (p, g, g._version, memory_of(g))
                for p in self._params for g in [p.grad]]  # fmt: skip

    def _grad_norms_now(self) -> Tensor | None:
        """Each parameter's gradient's 2-norm (0 without one), on the device: a write in
        place through ``.data`` or NumPy moves no version counter, but moves these."""
        grads = [p.grad for p in self._params]
        if not self._params or all(g is None for g in grads):
            return None
        filled = [p.new_zeros(()) if g is None else g
                  for p, g in zip(self._params, grads, strict=True)]  # fmt: skip
        return torch.stack(norms_of(filled)).float()

    def _check_unchanged(self, hooks: str = "on_after_backward") -> None:
        """After the callbacks' ``on_after_backward``, and before the next backward (after
        its ``on_train_batch_start`` and ``on_before_backward``): the parameters whose
        gradient one of them replaced or changed in place since the last backward
        (:meth:`_statistics` leaves them out). A write through ``.data`` or NumPy in place
        moves no version counter: its gradient's norm is compared instead, on the device
        (:attr:`_moved`, read with the step's values)."""
        states, self._after = self._after, []
        before, self._after_norms = self._after_norms, None
        if before is not None and len(states) == len(self._params):  # (no host read: the
            # norms' differences are read with the step's values, _statistics)
            now_norms = self._grad_norms_now()
            if now_norms is not None:
                # (a NaN gradient's norm is NaN both times: no write, and one it was read as
                # used up the one warning, a review's: an fp16 overflow said to be a callback's)
                moved = (now_norms != before) & ~(now_norms.isnan() & before.isnan())
                self._moved = moved if self._moved is None else self._moved | moved
        now = {id(p): (g, version, ptr) for p, g, version, ptr in self._grad_states()}
        for p, g, version, ptr in states:  # (a parameter no longer trainable: its window is
            # not measured, _skip_window)
            g_now, version_now, ptr_now = now.get(id(p), (g, version, ptr))
            if g_now is not g or version_now != version or ptr_now != ptr:
                self._edited.setdefault(id(p), hooks)

    def _finish_shared(self) -> None:
        """Square the summed per-sample gradients of parameters used more than once, unless
        one of their units was left out (then every unit sharing them is)."""
        excluded = {id(p) for name, m, own, _ in self.units if name in self._excluded
                    for p in own}  # fmt: skip
        for name, _, own, _ in self.units:
            shares = any(id(p) in excluded and id(p) in self._shared for p in own)
            if name not in self._excluded and shares:
                self._excluded[name] = "it shares a parameter with a unit left out"
        for key, v in self._shared.items():
            if key not in excluded:
                self._add(self._param_by_id[key], v.float().pow(2).reshape(v.shape[0], -1).sum(1))
        self._shared.clear()

    def _count_rows(self, trainer: Trainer, local: int) -> None:
        """Add this micro-batch's samples on each rank to :attr:`_rank_rows`: its place in the
        epoch (``batch_in_epoch``) gives its global batch, which every loader shards alike
        (trainer.distributed.shard). A rank whose batch is not its shard says so (the others
        would wait for it in the gather)."""
        loader = trainer.train_loader
        size = loader.global_batch_size
        i = trainer.batch_in_epoch
        sizes = shard_sizes(max(0, min(size, loader.num_samples - i * size)), trainer.world)
        if sizes[trainer.world.rank] != local:
            raise RuntimeError(
                f"per-sample norms, data-parallel: rank {trainer.world.rank} has {local} samples "
                f"in batch {i} of the epoch, not its shard's {sizes[trainer.world.rank]} of a "
                f"global batch of {sum(sizes)} (a loader that does not shard with "
                "trainer.distributed.shard)"
            )
        if not self._rank_rows:
            self._rank_rows = [0] * len(sizes)
        self._rank_rows = [a + b for a, b in zip(self._rank_rows, sizes, strict=True)]

    def _check_mixing(self, trainer: Trainer, batch: Batch) -> None:
        """Whether the model mixes or reorders the samples after each unit call, for inputs of
        this batch's signature (a normalization with the batch's statistics written by hand,
        a sort of the batch), or a generic unit mixes them inside its own forward: then the
        unit's row of one sample reaches other samples' losses, and the step's backward gives
        it their gradients too, which no closed form or recomputation can split.

        The model's forward and the loss run on the batch's first P = min(B, 16) samples
        (on aliases of the parameters, copies of the buffers and of the loss, every random
        state forked, BatchNorms in eval mode: they are left out by their own rule, and a
        SyncBatchNorm would all-gather while only this rank checks); :func:`_mixing_passes`
        then finds each unit call whose output row (a generic unit's: or input row) of one
        sample reaches another's loss. What does not reach a loss (an auxiliary output) is
        not looked at. Done at the process's first micro-batch, then on a measured one with
        new input shapes (or a call the check did not see: a layer skipped at random): one
        host read each time, not per step. Kept (and checkpointed). A mixing these P samples
        do not show (a sort that leaves them in order) is not seen."""
        signature = _signature(batch.x)
        self._mixing_checks.pop(signature, None)
        self._mixing_failed.pop(signature, None)
        xs = _tensors(batch.x)
        if not xs or xs[0].ndim == 0 or xs[0].shape[0] < 2:
            return  # (one sample: nothing to mix; not kept, so asked again at a real batch)
        p = min(xs[0].shape[0], 16)
        model = trainer.model
        #: (unit call, batch dimension, each row's sample where not its index) per tensor
        watched: list[tuple[Any, int, Tensor | None]] = []
        grads: dict[int, Tensor] = {}  # its gradient in a backward, by its index in watched
        hooks: list[Any] = []
        seen: set[tuple[str, int]] = set()
        counts: dict[nn.Module, int] = {}
        inside: list[tuple[Any, Tensor]] = []  # generic unit calls: output rows changed
        forks: dict[nn.Module, tuple[Fork, list[int], list[Any], dict[str, Tensor]]] = {}
        again_running = [False]  # (a unit run again by value: its children's calls not seen)

        def watch(key: Any, t: Tensor, dim: int, owner: Tensor | None = None) -> None:
            hooks.append(t.register_hook(partial(_keep, grads, len(watched))))
            watched.append((key, dim, owner))
            seen.add(key)  # (a call counts as checked where its batch was watched: one whose
            # batch dimension did not have the check's samples, attention fed another layout
            # than its own with T = B > 16, counted as not mixing, 27 % off: a review's)

        def enter(module: nn.Module, args: tuple[Any, ...]) -> Any:
            if again_running[0]:
                return None
            counts[module] = counts.get(module, 0) + 1
            key = (self._names[module], counts[module])
            first = args[0] if args else None  # a generic unit may mix inside its forward
            if self._kind[module] != "func" or not isinstance(first, Tensor):
                return None
            dims = [d for d in (0, 1) if first.dim() > d and first.shape[d] == p]
            if dims:  # (batch-first, or sequence-first: each watched under its own key)
                # (its draws, to make them again, its counters and its buffers)
                copies = _buffer_copies(module) if module in self._buffered else {}
                forks[module] = (Fork(first.device), dims, plain_attributes(module), copies)
            if first.requires_grad:  # (token ids, features from under no_grad: by value only)
                for d in dims:
                    watch(_keyed(key, d), first, d)
            return None

        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if again_running[0]:
                return
            got = [t for t in _tensors(output) if t.requires_grad]
            key = (self._names[module], counts.get(module, 0))
            if self._kind[module] in ("closed", "func"):  # batch-first, or sequence-first:
                for t in got:  # a call's batch is watched at either, under its own key
                    for d in (0, 1):
                        if t.dim() > d and t.shape[d] == p:
                            watch(_keyed(key, d), t, d)
            else:
                first = output[0] if isinstance(output, tuple) and output else None
                for t, d in zip(got, self._out_dims(module, len(got)), strict=True):
                    if isinstance(first, PackedSequence) and t is first.data:
                        if first.batch_sizes.numel() and int(first.batch_sizes[0]) == p:
                            watch(key, t, 0, _packed_owner(first))  # (its rows by sample;
                        # not sentences of several per sample: a review's voided every check)
                    elif t.dim() > d and t.shape[d] == p:
                        watch(key, t, d)
            fork, dims, begun, buffers = forks.pop(module, (None, [], [], {}))
            if fork is not None and isinstance(output, Tensor):
                if output.numel() and bool((output == 0).all()):  # host read: once per
                    # generic unit and check
                    for d in (0, 1):  # an output of 0 (zero-initialized weights: an
                        seen.discard(_keyed(key, d))  # adapter's B as a unit of its own)
                    return  # shows no mixing inside it, by value or by its gradient: not
                    # settled (a size-reading unit measured at coverage 1 so: a probe's)
                for d in dims:
                    if output.dim() > d and output.shape[d] == p:
                        with _saved_as_they_are():
                            moved = _moves_other_rows(
                                module, args, kwargs, output, fork, again_running, d, begun,
                                buffers,
                            )  # fmt: skip
                        if moved is not None:
                            seen.add(_keyed(key, d))
                            inside.append((_keyed(key, d), moved))

        handles = [h for _, m, _, _ in self.units if not scripted(m) for h in (
            m.register_forward_pre_hook(_Hook(enter), prepend=True),
            m.register_forward_hook(_Hook(record), prepend=True, with_kwargs=True),  # (before a
            # user's hook replaces its output; a copy made in this forward, an EMA's made on
            # demand: hooks that do nothing, which raised for it, every unit left out)
        )]  # fmt: skip
        # (copies: a forward normalizing its input in place must not change the batch)
        x = _map_tensors(batch.x, lambda t: t[:p].clone())
        y = _map_tensors(batch.y, lambda t: t[:p].clone())
        norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training]
        found: set[Any] | None = set()
        # a copy of the loss, whose state a call may advance (a counter of its own); one a copy
        # cannot take (a lock) is called itself, its Stateful state put back after
        kept = None
        attrs: dict[str, Any] | None = None  # (the loss called itself: its attributes, and
        generators: dict[str, Tensor] = {}  # the states of generators of its own, put back)
        tensors: list[tuple[Tensor, int, Tensor]] = []
        try:
            loss = _loss_copy(trainer.objective.loss, model)
        except Exception:  # noqa: BLE001 (deepcopy raises what the object's pickling does)
            loss = trainer.objective.loss
            attrs = dict(vars(loss))  # (a counter of its own advanced: training changed, a
            generators = {k: g.get_state() for k, g in attrs.items()  # review)
                          if isinstance(g, torch.Generator)}  # fmt: skip
            tensors = tensor_copies(attrs.values())  # (changed in place: self.calls += 1
            # on a tensor)
            try:
                kept = copy.deepcopy(loss.state_dict()) if isinstance(loss, Stateful) else None
            except Exception as e:  # noqa: BLE001 (its state cannot be put back either)
                self._mixing_failed[signature] = (
                    f"its check cannot copy the loss or its state ({type(e).__name__}: "
                    f"{str(e).strip()[:150]})"
                )
                self._mixing_checks[signature] = (frozenset(), frozenset())
                return
        try:

            def then(out: Any) -> set[Any] | None:
                losses = loss(out, y)  # (a unit the loss calls, a head it applies, watched)
                for h in handles:  # (the backwards below run no forward of theirs)
                    h.remove()
                return _mixing_passes(losses, watched, grads, p, inside)

            state = {**{f"model.{n}": t.detach().requires_grad_(t.requires_grad)
                        for n, t in model.named_parameters()},
                     **{f"model.{n}": t.clone() for n, t in model.named_buffers()},
                     **{f"model.{n}": t for n, t in _renormed_in_place(model).items()}}  # fmt: skip
            for m in norms:
                m.training = False
            with torch.enable_grad(), forked_rng(xs[0].device):
                found = call_with(_Probe(model, then), state, (x,))
        except Exception as e:  # (a model or loss that cannot run so: nothing is settled)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self._mixing_failed[signature] = f"its check failed: {type(e).__name__}: {first[:200]}"
            self._mixing_checks[signature] = (frozenset(), frozenset())  # (not again: the
            return  # units it would settle are left out, naming why)
        finally:
            for m in norms:
                m.training = True
            for h in [*handles, *hooks]:
                h.remove()
            if kept is not None:
                loss.load_state_dict(kept)
            if attrs is not None:
                vars(loss).clear()
                vars(loss).update(attrs)
                for k, g_state in generators.items():
                    attrs[k].set_state(g_state)
                put_tensors_back(tensors, "a tensor of the loss (which a copy cannot take)")
        if found is None:  # a non-finite loss or gradient on these samples: settled later
            self._mixing_failed[signature] = (
                "a loss or gradient on its check's samples was not finite (checked again on "
                "the next measured step)"
            )
            return
        self._mixing_checks[signature] = (frozenset(found), frozenset(seen))

    def _verify(
        self,
        trainer: Trainer,
        batch: Batch,
        pending: dict[tuple[str, int, tuple[int, ...]], _Call],
        sizes: dict[tuple[str, int, Any], _Call] | None = None,
    ) -> set[Any]:
        """Settle, for each pending (unit, call, input shape), which dimension of that input,
        0 or 1 (sequence-first), is the batch: the model's forward runs again on P samples of
        the batch (P = 2, or 3 for a batch of 2, samples repeated), then a copy of the loss (a
        unit it calls, a head it applies itself, is seen: it was left out on every step),
        without gradients, on copies of its buffers, every random state forked
        (:func:`trainer.rng.forked_rng`), and a unit call's batch is dimension d where its
        input and output then have size P there and the sizes they had elsewhere. A
        batch-first (B, T, ·) input with T = B reads (P, B, ·), a sequence-first one (B, P, ·);
        a table of B rows keeps B; positions ``arange(T)`` with T = B keep T; features of
        every pair of samples, (B, B, ·), read (P, P, ·). What was seen is kept (and
        checkpointed): a run pays this forward once per new input shape. A call this forward
        did not make (a layer skipped at random, a forward that failed before it) is settled
        on a later measured step; until then the unit is left out.

        The same forward settles ``sizes``: which other tensor inputs of a unit of one's own
        with the batch's size as dimension 0 are the samples' (sliced per sample: a condition,
        a padding mask; on P samples they have P rows) and which are passed whole (a table,
        a (T, T) mask, as long as the batch by chance: they keep their size). Returns those of
        ``sizes`` whose unit's forward failed on the P samples: nothing is told of them."""
        b = self._batch
        p = 3 if b == 2 else 2
        model = trainer.model
        seen: dict[tuple[str, int], tuple[int, ...]] = {}
        outs: dict[tuple[str, int], tuple[int, ...]] = {}
        others: dict[tuple[str, int], dict[str, tuple[int, ...]]] = {}
        finished: set[tuple[str, int]] = set()  # (calls whose forward returned)
        unsure: set[Any] = set()
        counts: dict[nn.Module, int] = {}

        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            counts[module] = counts.get(module, 0) + 1
            if args and isinstance(args[0], Tensor):
                seen[(self._names[module], counts[module])] = tuple(args[0].shape)
                others[(self._names[module], counts[module])] = {
                    slot: tuple(t.shape) for slot, t in _slots(args, kwargs)
                }

        def returned(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            finished.add((self._names[module], counts.get(module, 0)))
            if isinstance(output, Tensor):
                outs[(self._names[module], counts.get(module, 0))] = tuple(output.shape)

        units = [m for _, m, _, kind in self.units
                 if kind in ("closed", "func") and not scripted(m)]  # fmt: skip
        handles = [h for m in units  # (a copy made in this forward: hooks that do nothing)
                   for h in (m.register_forward_pre_hook(_Hook(record), with_kwargs=True),
                             m.register_forward_hook(_Hook(returned)))]  # fmt: skip
        rows = torch.arange(p, device=batch.x.device) % b
        x = batch.x[rows]
        y = _map_tensors(batch.y, lambda t: t[rows.to(t.device)] if t.dim() else t)
        try:  # (a unit the loss calls, a head it applies itself, is seen too)
            loss = _loss_copy(trainer.objective.loss, model)
        except Exception:  # noqa: BLE001 (one a copy cannot take: the model's forward alone)
            loss = None

        def then(out: Any) -> Any:
            if loss is not None:
                with contextlib.suppress(Exception):  # (what the model's forward saw counts)
                    loss(out, y)
            return out

        failed = ""
        # BatchNorms in eval mode for it: the same shapes, no batch statistics (a
        # SyncBatchNorm would all-gather them, and only the ranks checking run this forward)
        norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training]
        try:
            state = {**{f"model.{n}": t for n, t in model.named_parameters()},
                     **{f"model.{n}": t.clone() for n, t in model.named_buffers()},
                     **{f"model.{n}": t for n, t in _renormed_in_place(model).items()}}  # fmt: skip
            for m in norms:
                m.training = False
            # (under the step's autocast: a frozen float16 layer under precision=16 could not
            # run outside it, and every unit was left out, a probe's)
            amp = getattr(trainer, "amp_dtype", None)
            again = (torch.autocast(x.device.type, dtype=amp) if amp is not None
                     else contextlib.nullcontext())  # fmt: skip
            with torch.no_grad(), forked_rng(x.device), again:
                call_with(_Probe(model, then), state, (x,))
        except Exception as e:  # (a model that cannot run on P samples: what it saw counts)
            failed = f"; the forward failed: {type(e).__name__}: {e}"
        finally:
            for m in norms:
                m.training = True
            for h in handles:
                h.remove()
        for key, call in pending.items():
            name, k, shape = key
            got = seen.get((name, k))
            bags = isinstance(call.unit, nn.EmbeddingBag)  # (a closed form's: by its output)
            if bags:
                got = outs.get((name, k))
            if got is None:  # not settled: left out this step, asked again on the next one
                self._excluded.setdefault(
                    name,
                    "which dimension of its input is the batch is not known yet: the "
                    f"model's forward and the loss on {p} samples did not make this "
                    f"call{failed}" + self._gathered_hint(call.unit, shape),
                )
                continue
            out_shape, out_got = tuple(call.outputs[0][0]), outs.get((name, k))
            fits = [
                d
                for d in call.candidates
                if got == _scaled(shape, d, p)
                # (the output too; a batch-first input's unit whose forward failed after it
                # counts by its input, as before the outputs were looked at)
                and (bags or out_got == _scaled(out_shape, d, p) or out_got is None and d == 0)
            ]
            of = "its output" if bags else "its input"
            what = (
                f"dimension {call.candidates[0]} of {of} {shape} is not the batch"
                if len(call.candidates) == 1
                else f"neither dimension 0 nor 1 of {of} {shape} is the batch"
            )
            self._verdicts[key] = (
                fits[0]
                if fits
                else f"{what}: on {p} samples of the batch it was {got}, its output "
                f"{out_got} (a table or positions of the batch's length, features of every "
                "pair of samples)" + self._gathered_hint(call.unit, shape)
            )
        for sized in sizes or {}:
            unit, n, (_, given) = sized
            at_p = others.get((unit, n))
            if at_p is None or any(at_p.get(slot) is None for slot, _ in given):
                continue  # (not settled: left out this step, asked again on the next one; a
                # mask the model drops where nothing is padded, None on these samples, was
                # kept as a reason, its unit left out for good: a review's)
            if (unit, n) not in finished:  # its forward failed on these samples (a state of
                # B rows of its own, ``cell(x, self.hid)``): no evidence, each sliced as by
                # its size, as before this check, the checks of each micro-batch guarding it;
                # not kept (kept, a forward that failed once left a table of B rows sliced,
                # its unit left out for good by those checks: a review's)
                unsure.add(sized)
                continue
            dims: list[tuple[str, int | None]] = []
            odd: list[str] = []
            for slot, was in given:
                got = at_p[slot]
                moved = [k for k, (n, m) in enumerate(zip(was, got, strict=False)) if n != m]
                if got == was:  # (its size did not follow the batch's: whole)
                    dims.append((slot, None))
                elif len(got) == len(was) and len(moved) == 1 and got == _scaled(was, moved[0], p):
                    dims.append((slot, moved[0]))  # (b there, p on the check's samples)
                else:
                    odd.append(f"{slot!r} {was} was {got}")
            self._other_dims[sized] = (
                tuple(dims)
                if not odd
                else "its other inputs as long as the batch neither follow its size in one "
                f"dimension nor keep their own: on {p} samples of the batch, its input "
                + ", ".join(odd)
            )
        return unsure

    def _report(self, trainer: Trainer) -> None:
        new = [(n, why) for n, why in self._excluded.items() if (n, why) not in self._reported]
        if new:  # (its own parameters, not its children's, which are units of their own: a
            # researcher read 'moe' as the whole block, its router Linear still measured)
            own = {name: theirs for name, _, theirs, _ in self.units}
        for name, why in new:
            params = ", ".join(self._param_names.get(id(p), "?") for p in own.get(name, ()))
            log.warning(
                "per-sample gradient norms leave out %r: %s [its parameters left out: %s]",
                name, why, params or "none",
            )  # fmt: skip
        self._reported.update(new)

    def on_before_optimizer_step(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
        rank_rows, self._rank_rows = self._rank_rows, []
        if self._skip_window:
            self._skip_window = False
            log.warning(
                "per-sample gradient norms: step %d is not measured: the trainable parameters "
                "changed during its window", trainer.global_step,
            )  # fmt: skip
            return
        if not self._weighted:
            return
        # (N, params), and (N,) or, per-token losses, (N, 2) with the present flags
        sq, wp = torch.cat(self._weighted), torch.cat(self._weights)
        self._weighted.clear()
        self._weights.clear()
        if trainer.world.distributed:  # one series over the global batch, in its order
            if rank_rows[trainer.world.rank] != sq.shape[0]:  # (metadata: no sync)
                raise RuntimeError(
                    f"per-sample norms, data-parallel: {sq.shape[0]} rows measured on rank "
                    f"{trainer.world.rank}, {rank_rows[trainer.world.rank]} counted"
                )
            flat = wp.ndim == 1
            wp = wp[:, None] if flat else wp  # (the same loss, so columns, on every rank)
            cols = wp.shape[1]
            width = sq.shape[1] + cols
            sizes = [n * width for n in rank_rows]  # (no exchange, no host sync)
            rows, _ = all_gather_cat(torch.cat([sq, wp], 1).flatten(), sizes)
            rows = rows.reshape(-1, width)
            sq, wp = rows[:, :-cols], rows[:, -cols:]
            wp = wp[:, 0] if flat else wp
        w, present = (wp[:, 0], wp[:, 1]) if wp.ndim == 2 else (wp, None)
        covered = self._covered_mask(sq.device)  # (params,) 1.0 covered, 0.0 left out
        coverage: Tensor | float
        if trainer.world.distributed:  # a unit left out on any rank is out on all (one small
            # all-reduce, no host read): the rows of the ranks that measured it are dropped too
            covered = 1 - all_reduce_max(1 - covered)
            numels = self._numels(sq.device)
            coverage = covered.double() @ numels / numels.sum()
            sq = sq * covered
        else:
            coverage = self.coverage()
            if self._window_excluded:  # a unit left out of one micro-batch: out of every row
                sq = sq * covered
        root = sq.sum(1).clamp_min(0).sqrt()  # wᵢ‖∇ℓᵢ‖ over the covered parameters
        # a step where a sample's norm is not finite (a float16 backward that overflowed,
        # which the GradScaler skips; a NaN gradient): no sample is measured. (The histograms'
        # mean and max are over finite values, so the samples that overflowed would go
        # unseen, and the few that did not read as the step's: 0.001 for a true 10,000.)
        root = torch.where(torch.isfinite(root).all(), root, torch.nan)
        # every unit left out (coverage 0): no sample has a norm (its rows of zeros were
        # logged as norms of 0, a mean and max of 0: a probe's NaN batch of a new shape)
        if trainer.world.distributed:  # (the agreed mask: two small kernels, no host read)
            root = torch.where(covered.any(), root, torch.nan)
        elif coverage == 0:
            root = torch.full_like(root, torch.nan)
        # the sample's share of the averaged gradient (one process: root itself, x / 1 == x)
        weighted = root / trainer.world.size if trainer.world.distributed else root
        if present is not None:  # a sequence without a valid target is no sample: no norm
            # (its 0 was in the histogram and the mean; the unweighted series had NaN)
            weighted = torch.where(present > 0, weighted, torch.nan)
        values: dict[str | tuple[str, ...], Tensor | float] = {"per_sample/coverage": coverage}
        series: dict[str, Tensor] = {}
        if self.loss in ("weighted", "both"):
            series["per_sample/weighted_grad_norm"] = weighted
        if self.loss in ("unweighted", "both"):
            positive = w > 0  # False for NaN (unequal token weights)
            # a sequence whose tokens are weighted unequally has no unweighted norm, and the
            # rest (those of one token, or of one repeated target) are no sample of the batch:
            # none is reported that step (their mean was 2.06, a probe's one 1-token sequence)
            if present is not None:  # (per-token losses: per-sample ones have no NaN w
                # but a non-finite step's, where every norm is NaN already)
                positive = positive & ~(torch.isnan(w) & (present > 0)).any()
            # unweighted = root / w for w > 0; a weight-0 sample has no gradient to measure
            unweighted = torch.where(
                positive, root / w.clamp_min(torch.finfo(w.dtype).tiny), torch.nan
            )
            series["per_sample/grad_norm"] = unweighted
        self.last = series
        self._statistics(trainer, sq, w, present, covered)
        trainer.stage_scalars(values)
        for tag, v in series.items():  # histogram, _mean and _max from the step's one host read
            # (NaN: a weight-0 sample's unweighted norm, or every sample's on a step with a
            # non-finite one: not counted as values that are not finite)
            trainer.stage_histogram(tag, v, count_nonfinite=False)

    def _statistics(
        self, trainer: Trainer, sq: Tensor, w: Tensor, present: Tensor | None, covered: Tensor
    ) -> None:
        """Stage what the gradient noise scale and the SNRs need (:meth:`_noise_scale`
        computes them on the host from it, when the step's values are read): a few device ops
        instead of the ≈ 40 small kernels the same arithmetic took on the device. ``sq``:
        (N, params) squared weighted per-sample norms; ``w``: (N,) the samples' coefficients;
        ``present``: (N,) 0.0 for a sequence without a valid target (no sample: its gradient
        is 0, its coefficient 0, neither counts), None for per-sample losses (every row a
        sample: the count is known on the host); ``covered``: (params,) 1.0 per covered
        parameter, 0.0 per one left out."""
        if sq.shape[0] < 2 or not self._params:
            return
        reg = trainer.objective.reg_grads() if trainer.objective.has_regularizers else {}
        data = [p.new_zeros(()) if p.grad is None else minus(p.grad, reg[id(p)]) if id(p) in reg
                else p.grad for p in self._params]  # fmt: skip
        # sq = (wᵢ‖gᵢ‖)² (data-parallel, wᵢ carries W); the samples' coefficients' spread in
        # w's own dtype: 0 exactly where they are all equal (a float32 copy of float64
        # weights could make unequal ones equal). +Inf: no sample at all
        if present is None:  # every row a sample (the count on the host)
            w_min, w_max = torch.aminmax(w)
            spread = torch.stack([w_max - w_min, w_max]).float()
            n: int | None = sq.shape[0]
        else:
            w_max = w.max()
            w_min = torch.where(present > 0, w, torch.inf).amin()
            spread = torch.stack([w_max - w_min, w_max, present.sum()]).float()
            n = None  # (staged with the values)
        # sums of the rows (0 for a sequence without a valid target), divided by n on the host;
        # float32, as the rows are for every model (their rounding, u = 2⁻²⁴ of each value,
        # bounds what tr(S) and the SNRs resolve: _noise_scale)
        parts = [sq.sum(0).float(), torch.stack(norms_of(data)).float(), spread, covered.float()]
        moved, self._moved = self._moved, None
        if moved is not None:  # (1.0 per gradient whose norm a callback moved: read with the
            parts.append(moved.float())  # rest, no host read here)
        scaled = trainer.scaler is not None
        if scaled:  # the gradients were rounded scaled by the loss scale: their subnormal
            # floor is that much smaller unscaled (without it, a float16 mixed-precision run's
            # SNRs of 0.05 were NaN, a review's finding); read with the rest (no host read)
            scale = _loss_scale(trainer.scaler)  # type: ignore[arg-type]
            parts.append(torch.as_tensor(scale, dtype=torch.float32, device=sq.device).reshape(1))
        values = torch.cat(parts)
        # (the tags as they are now: the values may be read after the trainable parameters,
        # and so the tags, changed)
        edited = tuple(id(p) in self._edited for p in self._params)
        if any(edited) and not self._said_edited:
            self._said_edited = True
            names = [self._param_names[id(p)] for p, e in zip(self._params, edited, strict=True)
                     if e]  # fmt: skip
            hooks = next(h for p, e in zip(self._params, edited, strict=True) for h in
                         [self._edited.get(id(p))] if e and h)  # fmt: skip
            log.warning(
                "step %d: a callback changed the gradients of %s in %s: "
                "per_sample/noise_scale, grad_var_trace, grad_signal and their parameters' "
                "grad_snr/* need the batch gradient as the backward made it (the per-sample "
                "norms are of the backward's gradients, before the change) and are NaN on such "
                "steps; the gradient norms and histograms are of the changed gradients (warned "
                "once)",
                trainer.global_step, few(names), hooks,
            )  # fmt: skip
        fn = partial(self._noise_scale, trainer.world.size, self._tags, n, torch.finfo(w.dtype).eps,
                     self._roundoff, scaled, edited=edited, norms_moved=moved is not None,
                     names=[self._param_names[id(p)] for p in self._params],
                     step=trainer.global_step)  # fmt: skip
        trainer.stage_on_host(values, fn)

    def _noise_scale(
        self,
        world: int,
        tags: tuple[str, ...],
        n: int | None,
        eps: float,
        roundoff: tuple[tuple[float, float], ...],
        scaled: bool,
        values: list[float],
        edited: tuple[bool, ...] = (),
        norms_moved: bool = False,
        names: list[str] | None = None,
        step: int = 0,
    ) -> dict[str, float]:
        """On the host, in float64, in step order: the gradient noise scale B_simple =
        tr(Σ) / |G|² over the covered parameters, its running average and, per parameter
        tensor, the SNR ‖ḡ‖² / tr(S) of the step's samples (module docstring); NaN where the
        samples' coefficients are not all equal (to 8 eps of their dtype, relative), or (SNR)
        for a parameter left out. ``values``:
        the per-parameter sums of the squared weighted norms, the step's gradient norms, the
        coefficients' spread and largest value, the number of samples (unless ``n`` gives
        it), the covered mask (:meth:`_statistics`); ``edited``: per parameter, whether a
        callback changed its gradient after the backward (its SNR, and the estimate where it
        is covered, NaN)."""
        if scaled:  # the loss scale the gradients were rounded at: the last value
            loss_scale, values = values[-1], values[:-1]
            roundoff = tuple((u, f / loss_scale) for u, f in roundoff)
        if norms_moved:  # per parameter, whether its gradient's norm moved between the backward and
            # the checks after the callbacks (a write through .data or NumPy, no counter moved)
            count = len(names or [])
            flags, values = values[-count:], values[:-count]
            seen = [f > 0 and not e for f, e in zip(flags, edited or [False] * len(flags),
                                                    strict=True)]  # fmt: skip
            if any(seen) and not self._said_edited:
                self._said_edited = True
                which = [n for n, f in zip(names or [], seen, strict=True) if f]
                log.warning(
                    "step %d: a callback changed the gradients of %s through .data or NumPy "
                    "(their norms moved after the backward, no version counter did): "
                    "per_sample/noise_scale, grad_var_trace, grad_signal and their "
                    "parameters' grad_snr/* need the batch gradient as the backward made it "
                    "and are NaN on such steps (warned once)",
                    step, few(which),
                )  # fmt: skip
            edited = tuple(f > 0 for f in flags) if not edited else tuple(
                e or f > 0 for e, f in zip(edited, flags, strict=True))  # fmt: skip
        extra = 2 if n is not None else 3  # (the weights' entries)
        count = (len(values) - extra) // 3  # parameters (3 per parameter)
        sum_sq, norms = values[:count], values[count : 2 * count]
        spread, w_max = values[2 * count], values[2 * count + 1]
        if n is None:
            n = round(values[2 * count + 2])
        covered = values[2 * count + extra : 3 * count + extra]
        mean_sq = [s / n for s in sum_sq] if n else sum_sq
        # equal coefficients: equal up to the few roundings that made each (r/Σr times the
        # micro-batch's share, times W: per-micro-batch normalized weights of equal r came out
        # 1 ulp apart over an accumulation window, and every step logged NaN); the estimate
        # then moves by O(8 eps) relative, below what its float32 sums round by
        uniform = spread <= 8 * eps * w_max and w_max > 0 and n > 1  # (False with a NaN)
        # (a NaN coefficient: a sequence whose tokens weigh unequally)
        unequal = n > 1 and not w_max <= 0 and not spread <= 8 * eps * w_max
        if unequal and not self._said_unequal:
            self._said_unequal = True  # (NaN on every step, unexplained: a probe's finding)
            log.warning(
                "per_sample/noise_scale, grad_var_trace, grad_signal and grad_snr/*: NaN on "
                "steps whose samples weigh unequally in the step's gradient (a weighting's "
                "unequal weights, per-token weights, loss.average=sequences over sequences of "
                "different lengths): the estimators need one coefficient for every sample "
                "(docs/instrumentation.md)"
            )
        estimate, snr = [math.nan, math.nan], [math.nan] * count
        if uniform and any(c > 0 for c in covered):  # (none: no estimate, not one of 0)
            inv = 1.0 / (w_max * w_max)
            # ‖(1/n) Σ gᵢ‖² = |G_step|² / (n c)², c = w / W the samples' coefficient in G_step
            scale = inv * (world / n) * (world / n)
            batch_sq = [g * g * scale for g in norms]
            # unbiased tr(S) per parameter: (1/n) Σ ‖gᵢ‖² − ‖ḡ‖², times n / (n − 1)
            trace_p = [
                (m * inv - b) * (n / (n - 1)) for m, b in zip(mean_sq, batch_sq, strict=True)
            ]
            trace = sum(t for t, c in zip(trace_p, covered, strict=True) if c > 0)
            batch = sum(b for b, c in zip(batch_sq, covered, strict=True) if c > 0)
            estimate = [trace, batch - trace / n]  # [tr(Σ), unbiased |G|²]
            snr = [_div(b, t) if c > 0 else math.nan
                   for b, t, c in zip(batch_sq, trace_p, covered, strict=True)]  # fmt: skip
            # (a negative SNR is a variance below 0: rounding, at an SNR past what the sums
            # resolve; no number rather than a wrong one)
            snr = [r if math.isfinite(r) and r >= 0 else math.nan for r in snr]
            # a step gradient whose elements round by u of themselves or f over the tensor
            # (float16/bfloat16: __init__'s _roundoff) is off by e_p ≤ u‖G_p‖ + f_p, which
            # moves ‖ḡ_p‖² by δ_p ≤ scale·e_p(2‖G_p‖ + e_p): tr(S_p) by δ_p n/(n − 1), the
            # SNR by δ_p/‖ḡ_p‖² + δ_p n/(n − 1)/tr(S_p) of itself, tr(Σ) by Σδ_p n/(n − 1)
            # and |G|² = Σ‖ḡ_p‖² − tr(Σ)/n by Σδ_p (1 + 1/(n − 1)). Past ROUNDED_LIMIT of
            # themselves, NaN (a probe: a bfloat16 model's output-bias SNR 123 for 103; a
            # review: −273 for 3,834, and a noise scale of the wrong sign)
            grow = n / (n - 1)
            delta = [scale * (u * g + f) * (2 * g + u * g + f)
                     for (u, f), g in zip(roundoff, norms, strict=True)]  # fmt: skip
            # and where f dominates (the gradient's typical element below float16's smallest
            # normal), the per-sample rows are built from output gradients that underflow as
            # well, which no bound here covers: NaN (a review's float16 noise scale 12 % off)
            under = [f > u * g for (u, f), g in zip(roundoff, norms, strict=True)]
            rough = []
            for i, (d, b, t) in enumerate(zip(delta, batch_sq, trace_p, strict=True)):
                if (
                    d > 0
                    and not math.isnan(snr[i])
                    and (under[i] or b <= 0 or t == 0
                         or d / b + d * grow / abs(t) > ROUNDED_LIMIT)
                ):  # fmt: skip
                    rough.append(i)
            # the sums arrive as float32 values, each rounded by u = ``SUMS_U`` (2⁻²⁴) of
            # itself: that alone moves m_p (the mean squared norm) by u m_p and
            # ‖ḡ_p‖² by 2u of itself, so tr(S_p) = (m_p − ‖ḡ_p‖²) n/(n − 1) by up to
            # (u m_p + 2u ‖ḡ_p‖²) n/(n − 1). Where the SNR moves past ROUNDED_LIMIT of itself,
            # S − ‖ḡ‖² cancelled down to that rounding (samples nearly alike: a probe's six
            # identical samples logged SNRs of 2.65e7 for a variance of 0, or −5e6): NaN. The
            # least error these values carry, not a bound on it: a necessary condition
            moves_m = [SUMS_U * m * inv for m in mean_sq]
            moves_b = [2 * SUMS_U * b for b in batch_sq]
            for i, (rm, rb, t) in enumerate(zip(moves_m, moves_b, trace_p, strict=True)):
                if (
                    not math.isnan(snr[i])
                    and i not in rough
                    and (t == 0 or 2 * SUMS_U + (rm + rb) * grow / abs(t) > ROUNDED_LIMIT)
                ):
                    rough.append(i)
            for i in rough:
                snr[i] = math.nan
            moved = sum(d for d, c in zip(delta, covered, strict=True) if c > 0)
            if any(x and c > 0 for x, c in zip(under, covered, strict=True)):
                moved = math.inf
            # tr(Σ) = Σ tr(S_p) moves by Σ (u m_p + 2u ‖ḡ_p‖²) n/(n − 1); |G|² = Σ ‖ḡ_p‖² −
            # tr(Σ)/n = Σ (n ‖ḡ_p‖² − m_p)/(n − 1) by Σ (u m_p + n·2u ‖ḡ_p‖²)/(n − 1) (a
            # review's: n/(n − 1) on the m term made every noise scale past 8e5 NaN)
            rm = sum(r for r, c in zip(moves_m, covered, strict=True) if c > 0)
            rb = sum(r for r, c in zip(moves_b, covered, strict=True) if c > 0)
            # (and tr(Σ) below 0, a sum of squares: only rounding makes it, as a negative SNR)
            if (
                estimate[0] < 0
                or (moved + rm + rb) * grow > ROUNDED_LIMIT * abs(estimate[0])
                or moved * (1 + 1 / (n - 1)) + (rm + n * rb) / (n - 1)
                > ROUNDED_LIMIT * abs(estimate[1])
            ):  # (False with a NaN: a non-finite step's NaN is not the rounding's, and is NaN
                # already)
                estimate = [math.nan, math.nan]
                rough.append(-1)
            # (an SNR's tag only where SNRs are logged: with snr=false the lookup failed,
            # IndexError, a review's)
            shown = [
                "per_sample/noise_scale" if i < 0 else tags[len(NOISE_TAGS) + i]
                for i in rough if i < 0 or len(NOISE_TAGS) + i < len(tags)
            ]  # fmt: skip
            if shown and not self._said_rounded:
                self._said_rounded = True
                named = ", ".join(shown[:5])
                log.warning(
                    "%s: NaN where the step's gradient, rounded to float16/bfloat16 (the "
                    "parameters' or autocast's), or the float32 sums they are taken from "
                    "could move it by more than %d %% (S - |mean gradient|^2, or "
                    "|mean gradient|^2 - tr/n, cancelled down to that rounding: samples nearly "
                    "alike, or a signal far below the noise; docs/instrumentation.md)",
                    named, round(100 * ROUNDED_LIMIT),
                )  # fmt: skip
        if any(edited):  # not the backward's batch gradient (_check_unchanged): no number
            snr = [math.nan if e else r for r, e in zip(snr, edited, strict=True)]
            if any(e and c > 0 for e, c in zip(edited, covered, strict=True)):
                estimate = [math.nan, math.nan]
        # no estimate (NaN) with unequal coefficients, or a step whose gradient is not finite
        # (a step the guard or the GradScaler skips: its sum overflowed, −Inf was logged)
        ok = uniform and all(math.isfinite(x) for x in estimate)
        if not ok:
            estimate = [math.nan, math.nan]
        if step == self._ema_step == self._failed_at:  # the failed step measured again (a
            # fit called again after a failure in it): its first measurement's update undone
            # (it was taken in twice, a review's)
            self._ema = self._ema_before
        self._ema_before, self._ema_step = self._ema, step
        if self._ema is None:
            self._ema = list(estimate)
        elif ok:  # a step without an estimate leaves the averages as they were (they held NaN
            # for the rest of the run after one); the first step with one starts them
            b = self.noise_ema  # β·ema + (1 − β)·estimate
            self._ema = [e if math.isnan(m) else b * m + (1 - b) * e
                         for e, m in zip(estimate, self._ema, strict=True)]  # fmt: skip
        ema = self._ema
        row = [*estimate, _div(estimate[0], estimate[1]), _div(ema[0], ema[1])]
        if not self.snr:
            snr = []
        return dict(zip(tags, [*row, *snr], strict=True))

    def _covered_mask(self, device: torch.device) -> Tensor:
        """1.0 per covered parameter, 0.0 per one left out of the window (built again when
        that changes)."""
        key = (tuple(self._window_excluded), device)
        if self._mask is None or self._mask[0] != key:
            left_out = {id(p) for name, _, own, _ in self.units if name in self._window_excluded
                        for p in own}  # fmt: skip
            mask = torch.tensor(
                [float(id(p) not in left_out) for p in self._params], dtype=torch.float32
            )
            self._mask = (key, mask.to(device))
        return self._mask[1]

    def _numels(self, device: torch.device) -> Tensor:
        """Each parameter's number of elements (float64: exact sums), on ``device``, kept."""
        if self._sizes is None or self._sizes.device != device:
            sizes = [float(p.numel()) for p in self._params]
            self._sizes = torch.tensor(sizes, dtype=torch.float64, device=device)
        return self._sizes

    def state_dict(self) -> dict[str, Any]:
        """The averages, and what the checks of unit calls (batch dimension, mixing) found (a
        resumed run measures what the run would have, without checking again)."""
        # data-parallel: every rank's (the checkpoint is a collective, every rank takes part):
        # a rank's ragged shard has shapes of its own, and what was found of a shape is the same
        # on every rank, so each resumed rank takes the union
        mine = [(n, k, list(shape), why) for (n, k, shape), why in self._verdicts.items()]
        others = [(n, k, key, why if isinstance(why, str) else [list(d) for d in why])
                  for (n, k, key), why in self._other_dims.items()]  # fmt: skip
        parts = cast(list[tuple[list[Any], list[Any]]], all_gather_objects((mine, others)))
        union = {(n, k, tuple(shape)): why for part, _ in parts
                 for n, k, shape, why in part}  # fmt: skip
        verdicts = [(n, k, list(shape), why) for (n, k, shape), why in union.items()]
        sized = {(n, k, _tuples(key)): why for _, part in parts
                 for n, k, key, why in part}  # fmt: skip
        # (the sets' calls sorted: their order is the process's string hashes', so a resumed
        # run's checkpoint listed the same calls in another order, a review's)
        checks = [[list(sig), sorted((list(k) for k in flagged), key=repr),
                   sorted((list(k) for k in seen), key=repr)]
                  for sig, (flagged, seen) in self._mixing_checks.items()]  # fmt: skip
        mixing: dict[Any, tuple[Any, Any]] = {}
        for part in all_gather_objects(checks):  # every rank's; a check that saw calls wins
            for sig, flagged, seen in part:  # type: ignore[attr-defined]  # over one that
                if seen or _tuples(sig) not in mixing:  # failed on its rank (it saw none)
                    mixing[_tuples(sig)] = (flagged, seen)
        kept = [[sig, flagged, seen] for sig, (flagged, seen) in mixing.items()]
        # why a check failed (it is not run again for those inputs, or, non-finite, it is):
        # resumed without it, a run checked again what the uninterrupted one had given up on,
        # and measured units that one left out (a probe's 27 grad_snr tags). Not where
        # another rank's check of the same inputs saw calls
        failed: dict[Any, tuple[bool, str]] = {}
        for part in all_gather_objects([[list(sig), why, sig in self._mixing_checks]
                                        for sig, why in self._mixing_failed.items()]):  # fmt: skip
            for sig, why, given_up in part:  # type: ignore[attr-defined]
                sig = _tuples(sig)
                if sig in mixing and mixing[sig][1]:
                    continue
                # a check that raised (given up: its empty result is what is kept) names why
                # over one that was not finite (to be checked again)
                if sig not in failed or given_up and not failed[sig][0]:
                    failed[sig] = (bool(given_up), why)
        return {"noise_ema": self._ema, "verdicts": verdicts, "verdicts_version": 2,
                "other_dims": [[n, k, key, why] for (n, k, key), why in sized.items()],
                "mixing": kept,
                "mixing_failed": [[sig, why] for sig, (_, why) in failed.items()]}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ema = state["noise_ema"]  # (a checkpoint of an earlier version: a tensor (2,))
        self._ema = None if ema is None else [float(x) for x in ema]
        self._ema_before, self._ema_step, self._failed_at = None, -1, -1
        # (an earlier version's: None, dimension 0; its reasons, written when only dimension
        # 0 was looked at, are dropped, so a sequence-first call is checked again, as a run
        # started now would: a resumed run kept such units out, coverage 0.44 against 1.0)
        current = state.get("verdicts_version", 1) >= 2
        self._verdicts = {
            (str(n), int(k), tuple(int(d) for d in shape)): 0 if why is None else why
            for n, k, shape, why in state.get("verdicts", [])
            if current or not isinstance(why, str)
        }
        self._other_dims = {  # (an earlier version's has none: checked again)
            (str(n), int(k), _tuples(key)): why if isinstance(why, str) else _tuples(why)
            for n, k, key, why in state.get("other_dims", [])
        }
        self._mixing_checks = {  # (an earlier version's has none: checked again)
            _tuples(sig): (frozenset(map(_tuples, flagged)), frozenset(map(_tuples, seen)))
            for sig, flagged, seen in state.get("mixing", [])
        }
        self._mixing_failed = {_tuples(sig): str(why)
                               for sig, why in state.get("mixing_failed", [])}  # fmt: skip
        if "mixing" in state:  # the run's first micro-batch was checked: a resumed process
            # checks as the uninterrupted one would (a measured micro-batch's new inputs), not
            # its own first micro-batch's too (a ragged batch's checks were kept that the
            # uninterrupted run never made: a probe's)
            self._started = True

    def coverage(self) -> float:
        """The share of trainable parameter elements whose per-sample part was captured in
        every measured micro-batch of the (last) measured window."""
        params = {id(p): p for _, _, own, _ in self.units for p in own}
        left_out = {id(p) for name, _, own, _ in self.units if name in self._window_excluded
                    for p in own}  # fmt: skip
        total = sum(p.numel() for p in params.values())
        return 1.0 - sum(params[k].numel() for k in left_out) / max(total, 1)


def _in_backward() -> bool:
    """Whether autograd's engine is running a backward on this thread (a hook called from
    it: an activation checkpoint's recomputation)."""
    return torch._C._current_graph_task_id() != -1


def _div(a: float, b: float) -> float:
    """a / b as IEEE floats divide (±Inf, or NaN for 0 / 0), not an exception."""
    if b != 0 or math.isnan(b):
        return a / b
    if a == 0 or math.isnan(a):
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _loss_scale(scaler: torch.amp.GradScaler) -> Tensor | float:
    """The GradScaler's current scale as the tensor it keeps on the device (no host read), or
    as ``get_scale()``'s float where that tensor is not available."""
    scale = getattr(scaler, "_get_scale_async", None)
    value = scale() if scale is not None else None
    return value.float() if isinstance(value, Tensor) else scaler.get_scale()


def _named_covered(module: nn.Module, kind: str) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters a unit covers, by their names in it (as
    ``torch.func.functional_call`` takes them): attention's and an RNN's all; any other
    module's own, and those of its parametrizations (``torch.nn.utils.parametrize``: the
    originals a weight is computed from, e.g. ``weight_norm``'s ``original0``/``original1``,
    and a parametrization's own parameters), whose computation is part of its forward."""
    recurse = kind in ("attention", "rnn")
    named = list(module.named_parameters(recurse=recurse))
    if not recurse and parametrize.is_parametrized(module):
        named += [(f"parametrizations.{n}", p)
                  for n, p in module.parametrizations.named_parameters()]  # type: ignore[union-attr]  # fmt: skip
    return [(n, p) for n, p in named if p.requires_grad]


def _objects(obj: Any) -> list[Any]:
    """The objects of one's own in ``obj`` (in its tuples, lists and dicts): neither tensors,
    modules, containers nor classes, with attributes of their own (a cache object)."""
    if isinstance(obj, dict):
        obj = obj.values()
    elif not isinstance(obj, (tuple, list)):
        return []
    found: list[Any] = []
    for x in obj:
        if isinstance(x, (tuple, list, dict)):
            found += _objects(x)
        elif not isinstance(x, (Tensor, nn.Module, type)) and hasattr(x, "__dict__"):
            found.append(x)
    return found


def _reaches_own(start: tuple[Any, int], stop: set[Any], own: set[int]) -> bool:
    """Whether autograd's graph from ``start`` (a node and its output) reaches a parameter
    whose id is in ``own`` other than through ``stop``'s (node, output) pairs."""
    todo, seen = [start], set()
    while todo:
        fn, k = todo.pop()
        if fn is None or (fn, k) in stop or fn in seen:
            continue
        seen.add(fn)
        if id(getattr(fn, "variable", None)) in own:
            return True
        todo.extend(fn.next_functions)
    return False


def _vmap_hint(text: str) -> str:
    """What vmap's refusal ``text`` means for a unit's forward, in a researcher's words
    (vmap's own first line was cut, naming neither the cause nor a remedy: a probe's)."""
    if "vmap" not in text:
        return ""
    if ".item()" in text and "data-dependent control flow" in text:  # (vmap under grad)
        return (
            ": it reads a tensor's value on the host (.item(), int() or float() of a tensor: "
            "a top-1 router's argmax used as an index, say) or branches in Python on one, "
            "which vmap cannot do per sample"
        )
    if ".item()" in text:
        return (
            ": it reads a tensor's value on the host (.item(), int() or float() of a tensor: "
            "a top-1 router's argmax used as an index, say), which vmap cannot do per sample"
        )
    if "data-dependent control flow" in text:
        return ": it branches in Python on a tensor's value, which vmap cannot do per sample"
    if "dynamic shape" in text or "boolean mask" in text:
        return (
            ": a shape in it depends on a tensor's values (a boolean mask, nonzero), which "
            "vmap cannot do per sample"
        )
    return ""


def _elsewhere_why(module: nn.Module, names: list[str]) -> str:
    """Why a unit is left out where the step's backward handed its parameters ``names``
    another gradient than its outputs' alone (:meth:`PerSampleNorms._elsewhere`)."""
    kept = [k for k, v in vars(module).items() if k not in _MODULE_OWN and _tensors(v)]
    more = ", …" if len(kept) > 8 else ""
    return (
        f"the step's backward handed its parameters another gradient than its outputs' alone "
        f"({', '.join(names)}): a tensor its forward kept with a path to them (in a list "
        "attribute, a buffer, a global, an object it was given, an attribute also used after "
        "its forward"
        + (f"; its attributes holding tensors now: {', '.join(kept[:8])}{more}" if kept else "")
        + ") got a gradient that no hook of its outputs sees (left out on such a micro-batch; "
        "checked at each)"
    )


#: the attributes every module has (its parameters', buffers', children's and hooks' tables)
_MODULE_OWN = frozenset(vars(nn.Module()))


def _apart(other: tuple[list[str], Tensor], flags: list[Any]) -> list[str]:
    return [name for name, f in zip(other[0], flags, strict=True) if f]


#: the sequence number autograd gives the next node it makes (nodes are numbered in the
#: order a thread makes them); None where this torch has no such function: no call's
#: gradient is then watched at its parameters (:func:`_own_edges`)
_next_node = getattr(torch._C._autograd, "_get_sequence_nr", None)


def _own_edges(starts: Sequence[Any], since: int, own: dict[int, Tensor]) -> dict[Any, list]:
    """The autograd nodes a unit's call made (numbered from ``since``) that hand a gradient
    to one of its parameters (``own``: id -> the parameter), found from ``starts`` (its
    outputs' nodes, and those of the results of each function that took one of its
    parameters), with the places (index among each node's next functions, the parameter)
    through which they do. A cast of a parameter (autocast's, ``w.to(torch.bfloat16)``) is
    not such a node, its consumers are: autocast keeps one cast of a parameter for its whole
    region (its cache), made by the first call that used it and used by every call after,
    whose gradients it sums (a hook there gave the first call all of them, the others none:
    a review's, a unit called twice under bfloat16 left out); at each consumer, the gradient
    its cast would pass on is the one handed to it, in the parameter's dtype. A cast among
    ``starts`` (the forward's own, seen by the mode) is its call's own: the place itself."""
    found: dict[Any, list[tuple[int, Tensor]]] = {}
    todo, seen = list(starts), set()
    # (a cast the forward made itself, ``w.double()``, is a function a mode saw take the
    # parameter: one of ``starts``, its own node the place; at its consumer too, it was
    # counted twice, a review's)
    made = set(starts)
    while todo:
        fn = todo.pop()
        if fn in seen:
            continue
        seen.add(fn)
        if fn._sequence_nr() < since:  # (made before the call: its input's graph)
            continue
        for j, (nxt, _) in enumerate(fn.next_functions):
            if nxt is None:
                continue
            leaf = getattr(nxt, "variable", None)  # (a leaf's gradient sink: AccumulateGrad)
            if leaf is None:
                cast = None if nxt in made else _cast_of(nxt, own)
                if cast is None:
                    todo.append(nxt)
                else:
                    found.setdefault(fn, []).append((j, cast))
            elif id(leaf) in own:
                found.setdefault(fn, []).append((j, leaf))
    return found


def _hook_own(
    starts: Sequence[Any],
    since: int,
    own: dict[int, Tensor],
    names: dict[int, str],
    sink: _Sink,
) -> dict[str, int]:
    """Hooks :func:`_take` into ``sink`` on each node :func:`_own_edges` finds; how many
    places watch each parameter, by name (its uses in the call)."""
    uses: dict[str, int] = {}
    for node, places in _own_edges(starts, since, own).items():
        at = [(j, names[id(p)], p.dtype) for j, p in places]
        node.register_hook(partial(_take, sink, at))
        for _, name, _ in at:
            uses[name] = uses.get(name, 0) + 1
    return uses


def _cast_of(fn: Any, own: dict[int, Tensor]) -> Tensor | None:
    """The parameter in ``own`` that ``fn`` casts (a ``_to_copy``'s node whose one next
    function is that parameter's gradient sink), or None."""
    if type(fn).__name__ != "ToCopyBackward0":
        return None
    nxt = fn.next_functions
    if len(nxt) != 1 or nxt[0][0] is None:
        return None
    return own.get(id(getattr(nxt[0][0], "variable", None)))


class _Sink:
    """Where a watched call's node hooks (:func:`_take`) put what they hand its parameters:
    ``real``, by name, while ``counting[0]`` (the instrument's: set from its
    ``on_before_backward`` to its ``on_after_backward``, the step's backward; an
    ``autograd.grad`` of one's own in the forward or the loss is not it, a review's unit so
    left out); None once the call was checked (a graph the user keeps alive, a history of
    its statistics, kept a gradient-sized copy per call and step until then: a review's)."""

    __slots__ = ("counting", "real")

    def __init__(self, counting: list[bool]) -> None:
        self.counting = counting
        self.real: dict[str, Tensor] | None = {}


def _take(sink: _Sink, places: list[tuple[int, str, torch.dtype]], grads: tuple, _: tuple) -> None:
    """A node hook: adds the gradients a node of a unit's call hands its parameters (at
    ``places``: (index among its next functions, parameter name, its dtype)) to the sink."""
    real = sink.real
    if real is None or not sink.counting[0]:
        return
    for j, name, dtype in places:
        g = grads[j]
        if g is not None:
            # (a copy: the tensor may become the parameter's .grad, which data-parallel
            # averages in place before the checks, a review's; sparse + dense: refused)
            g = _dense(g.detach()).to(dtype, copy=name not in real)
            real[name] = g if name not in real else real[name] + g


def _dense(g: Tensor) -> Tensor:
    return g.to_dense() if g.is_sparse else g


def _flag(flag: list[bool], grad: Tensor | None) -> None:
    if grad is not None:
        flag[0] = True


def _nothing(*args: Any, **kwargs: Any) -> None:
    """What a copy of a measured module's hook does: nothing."""


class _Hook:
    """A measuring hook of a module (a method of the instrument). A deep copy of the module
    made while it is measured (an EMA's or a target network's copy, of the model or of a
    unit inside its forward) gets :func:`_nothing` in its place: the copy is not measured,
    and the instrument is not copied with it (a copy of one's, kept by the model, was copied
    again at the next step with its spent handles, which crashed the step: a review's)."""

    __slots__ = ("fn",)
    #: kept as it is where the curvature instrument puts a forward's hooks back as they were
    #: (:meth:`trainer.instrument.swap.Attributes.put_back`)
    instrument_hook = True

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return _nothing

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _nothing_again, ()


def _nothing_again() -> Any:
    return _nothing


def _detach(obj: Any) -> Any:
    return _map_tensors(obj, lambda t: t.detach())


def _map_tensors(obj: Any, fn: Any) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple):  # (a named tuple keeps its type: a PackedSequence)
        mapped = [_map_tensors(x, fn) for x in obj]
        return type(obj)(*mapped) if hasattr(obj, "_fields") else tuple(mapped)
    if isinstance(obj, list):
        return [_map_tensors(x, fn) for x in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj
