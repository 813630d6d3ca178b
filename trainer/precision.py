"""float16 and bfloat16: the dtypes whose sums (norms, Σu, loss averages) are taken in float32.

A float16 sum passes 65504 (Inf), a bfloat16 one keeps 3 significant digits; in float32 a sum of
their values is exact or within float32's rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOW_PRECISION = (torch.float16, torch.bfloat16)


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16/bfloat16, else ``dtype`` itself."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def widen(t: Tensor) -> Tensor:
    """``t`` in float32 if it is float16/bfloat16 (a copy), else ``t`` itself (no kernel)."""
    return t.float() if t.dtype in LOW_PRECISION else t


#: torch's 2-norm of a float32 (or float16/bfloat16, in float32) tensor on a CPU keeps one float32
#: running sum per SIMD lane (pytorch/pytorch#169237; ``sum`` is cascaded, the norm is not):
#: measured here, 1.3e-5 relative low at 2²⁰ elements, 9e-5 at 2²², 7e-4 at 2²⁴, and below
#: 1e-6 under 2¹⁷. Tensors of LONG elements or more are normed by :func:`long_norm`
LONG = 1 << 17


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
    """``t``'s 2-norm (0-d, float32 for float16/bfloat16), by rows of ⌊√n⌋ elements and then
    the norm of the rows' norms: each float32 running sum takes about √n terms, not n over the
    lanes (2²⁴ elements: 1.7e-7 relative, not 7e-4; and 2x quicker on this CPU). A tensor that
    is not contiguous is copied by the reshape."""
    n = t.numel()
    width = math.isqrt(n)
    rows = n // width
    flat, dtype = t.reshape(-1), wide_dtype(t.dtype)
    parts = torch.linalg.vector_norm(flat[: rows * width].view(rows, width), dim=1, dtype=dtype)
    if rows * width < n:
        rest = torch.linalg.vector_norm(flat[rows * width :], dtype=dtype)
        parts = torch.cat([parts, rest.reshape(1)])
    return torch.linalg.vector_norm(parts)
