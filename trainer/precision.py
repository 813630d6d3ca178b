"""float16 and bfloat16: the dtypes whose sums (norms, Σu, loss averages) are taken in float32.

A float16 sum passes 65504 (Inf), a bfloat16 one keeps 3 significant digits; in float32 a sum of
their values is exact or within float32's rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

LOW_PRECISION = (torch.float16, torch.bfloat16)


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16/bfloat16, else ``dtype`` itself."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype exact sums are kept in on ``device``: float64, float32 on MPS (which has no
    float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def widen(t: Tensor) -> Tensor:
    """``t`` in float32 if it is float16/bfloat16 (a copy), else ``t`` itself (no kernel)."""
    return t.float() if t.dtype in LOW_PRECISION else t


#: torch's 2-norm of a float32 (or float16/bfloat16, in float32) tensor on a CPU keeps one float32
#: running sum per SIMD lane (pytorch/pytorch#169237; ``sum`` is cascaded, the norm is not). Its
#: relative error, measured here, grows with the length: on varied values 1.3e-5 at 2²⁰ elements
#: and 7e-4 at 2²⁴ (about 1e-6 at 2¹⁷); on equal values, the worst case, 4.6e-5 at 2¹⁶, 7.5e-4 at
#: 2²⁰, 9.4e-3 at 2²⁴, and 2.9e-6 at most below 2¹² (at 4,080 equal values). Tensors of LONG
#: elements or more are normed by :func:`long_norm`: from 2¹² (until 2026-12-07 2¹⁷, which left
#: a 256 × 128 layer's update ratio under Adam, its update of nearly equal magnitudes, 3.7e-6
#: off in a probe's run, and equal values of 2¹⁶ 4.6e-5); a few µs more per such tensor than
#: torch's own fused call
LONG = 1 << 12

#: :func:`long_norm`'s row width: torch's norm of 256 equal values is 2.2e-7 off at most
_ROW = 256


def is_long(t: Tensor) -> bool:
    """Whether ``t`` is normed by :func:`long_norm`: LONG elements or more, dense, on a CPU,
    float32, float16 or bfloat16."""
    return (
        t.numel() >= LONG
        and t.device.type == "cpu"
        and (t.dtype == torch.float32 or t.dtype in LOW_PRECISION)
        and t.layout == torch.strided
    )


def long_norm(t: Tensor) -> Tensor:
    """``t``'s 2-norm (0-d, float32 for float16/bfloat16), by rows of 256 elements, then the
    rows' norms by rows of 256, until 256 or fewer are left: each float32 running sum takes
    at most 256 terms. Measured: within 4e-7 of the exact norm on equal values (the worst
    case) and 1e-7 on varied ones from 2¹² to 2²⁴ elements, and quicker than torch's own from
    2¹⁹ on (1.1 against 2.2 ms at 2²⁴). A tensor that is not contiguous is copied by the
    reshape. (:func:`long_norms` of one tensor.)"""
    return long_norms([t])[0]


#: the dtypes whose norms are taken in float32, in one call with ``dtype=float32``: a float16
#: gradient of finite values can have a norm past float16's 65504 (Inf, and a clipping
#: coefficient of 0), a bfloat16 norm keeps 3 significant digits
NORMED_IN_FLOAT32 = (*LOW_PRECISION, torch.float32)


def fused_norms(tensors: Sequence[Tensor]) -> list[Tensor] | None:
    """Each tensor's 2-norm in one fused ``torch._foreach_norm`` (in float32), the long ones
    (:func:`is_long`) by rows first (:func:`by_rows`); None where any tensor is not dense
    float32/float16/bfloat16 (the call's ``dtype=`` takes no other)."""
    if not all(t.dtype in NORMED_IN_FLOAT32 and t.layout == torch.strided for t in tensors):
        return None
    flats = [by_rows(t) if is_long(t) else t for t in tensors]
    return list(torch._foreach_norm(flats, 2, dtype=torch.float32))


def long_norms(tensors: list[Tensor]) -> list[Tensor]:
    """:func:`long_norm` of each tensor: :func:`by_rows` of each, then one fused
    ``torch._foreach_norm`` (in float32) over what is left of all of them."""
    return list(torch._foreach_norm([by_rows(t) for t in tensors], 2, dtype=torch.float32))


def by_rows(t: Tensor) -> Tensor:
    """What is left of a long tensor to norm, 256 values or fewer, whose norm is the tensor's:
    the 2-norms of its rows of 256 elements (its tail a row of its own), then theirs, level
    by level (one kernel per level; what is left of every tensor is normed in one fused call:
    the bench MLP's 6 gradients and 6 weights, four of them of 2¹⁴-2¹⁵ elements, 39 µs
    against 47 µs with each long one normed on its own, torch's own fused call 18 µs).
    float32 for float16/bfloat16."""
    flat, dtype = t.reshape(-1), wide_dtype(t.dtype)
    while (n := flat.numel()) > _ROW:
        rows, tail = divmod(n, _ROW)
        if not tail:  # (no slice where there is no tail: 1 of a call's 6 µs)
            flat = torch.linalg.vector_norm(flat.view(rows, _ROW), dim=1, dtype=dtype)
            continue
        parts = torch.linalg.vector_norm(flat[: rows * _ROW].view(rows, _ROW), dim=1, dtype=dtype)
        rest = torch.linalg.vector_norm(flat[rows * _ROW :], dtype=dtype)
        flat = torch.cat([parts, rest.reshape(1)])
    return flat
