"""float16 and bfloat16: the dtypes whose sums (norms, Σu, loss averages) are taken in float32.

A float16 sum passes 65504 (Inf), a bfloat16 one keeps 3 significant digits; in float32 a sum of
their values is exact or within float32's rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOW_PRECISION = (torch.float16, torch.bfloat16)


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16/bfloat16, else ``dtype`` itself."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def widen(t: Tensor) -> Tensor:
    """``t`` in float32 if it is float16/bfloat16 (a copy), else ``t`` itself (no kernel)."""
    return t.float() if t.dtype in LOW_PRECISION else t
