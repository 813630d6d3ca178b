"""Histograms of gradients and weights, binned on the training device.

``SummaryWriter.add_histogram`` copies a tensor to the host, converts it to float64 and bins it
with NumPy (about 0.4 s for 10M values on a laptop-class CPU). Here each tensor is reduced on its
own device: ``torch.aminmax`` for the range, ``torch.histogram`` (``torch.bucketize`` on CUDA)
for the counts, the sum and the sum of squares; only the ``bins`` counts and four numbers per
tensor reach the host, in two batched transfers per histogram step (ranges, then counts), and
the logger writes them as the histogram proto ``SummaryWriter.add_histogram_raw`` would.

Non-finite values (NaN, ±Inf) are left out of the histogram and counted; the count is logged as
``nonfinite/grad/<param>`` or ``nonfinite/weight/<param>`` when it is not 0. Never a crash.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from trainer.callbacks import Callback, Every
from trainer.config import HISTOGRAM_RANGES
from trainer.precision import is_long, long_norm, sum_dtype

if TYPE_CHECKING:
    from trainer.loop import Trainer


@dataclass
class RawHistogram:
    """What ``SummaryWriter.add_histogram_raw`` takes, for one tensor."""

    min: float
    max: float
    num: int  # finite values counted
    sum: float
    sum_squares: float
    bucket_limits: list[float]  # right edge of each bucket
    bucket_counts: list[float]
    nonfinite: int  # NaN/Inf values left out


#: at most this many values per ``torch.histc`` call: its counts are float32 (on CUDA added
#: atomically), exact and independent of the order of the additions up to 2**24 per bucket
HISTC_CHUNK = 2**24


@contextlib.contextmanager
def _histc_allowed() -> Iterator[None]:
    """``torch.histc`` on CUDA is listed as nondeterministic (atomic float additions), so
    ``torch.use_deterministic_algorithms(True)`` (``trainer.deterministic=true``) refuses it;
    but its counts, at most :data:`HISTC_CHUNK` values per call, are sums of 1.0 that are exact
    in any order: allowed here, and only here."""
    if not torch.are_deterministic_algorithms_enabled():
        yield
        return
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(True, warn_only=warn_only)


_F32_MAX = torch.finfo(torch.float32).max
_F32_TINY = torch.finfo(torch.float32).tiny
_F64_MAX = torch.finfo(torch.float64).max
_F64_TINY = torch.finfo(torch.float64).tiny


def _ulp(x: float, dtype: torch.dtype) -> float:
    """The spacing of ``dtype``'s values at ``x`` >= 0 (float64, else float32's)."""
    if dtype == torch.float64:
        return math.ulp(x)
    if x < _F32_TINY:  # (subnormal: float32's least step)
        return _F32_TINY * torch.finfo(torch.float32).eps
    return 2.0 ** (math.frexp(min(x, _F32_MAX))[1] - 24)


def _overflow_scale(bins: int) -> float:
    """A power of 2 that brings a float64 range near its largest value, times ``bins``, back
    within it (exact: no rounding changes)."""
    return 2.0 ** -(bins.bit_length() + 2)


def _histc(x: Tensor, bins: int, left: float, right: float) -> Tensor:
    """``torch.histc`` exact for any size: float32 counts per chunk of :data:`HISTC_CHUNK`
    values, summed in float64 (exact) when there are several."""
    with _histc_allowed():
        if x.numel() <= HISTC_CHUNK:
            return torch.histc(x, bins=bins, min=left, max=right)
        chunks = [torch.histc(c, bins=bins, min=left, max=right) for c in x.split(HISTC_CHUNK)]
        return torch.stack(chunks).double().sum(0)


def histograms(
    tensors: list[Tensor],
    bins: int = 64,
    range_policy: str = "minmax",
    fixed: tuple[float, float] = (-1.0, 1.0),
) -> list[RawHistogram]:
    """Bin each tensor on its device; two host reads in all (not per tensor).

    ``range_policy``: ``minmax`` ([min, max] of the finite values), ``symmetric``
    ([-a, a], a = max |x|), or ``fixed`` (``fixed``; values outside go to the edge buckets).
    """
    # (a sparse gradient, e.g. an ``Embedding(sparse=True)``'s, is binned as the dense tensor
    # it stands for: its rows never touched count as the zeros they are)
    flat = [(t.to_dense() if t.is_sparse else t).detach().reshape(-1) for t in tensors]
    # pass 1: the range of each tensor, one transfer for all. aminmax propagates NaN and shows
    # ±Inf, so finite bounds prove the tensor finite without a separate isfinite pass (a
    # float64 tensor's bounds as they are, beyond float32's range or resolution: the stack is
    # then float64, the others' bounds exact in it)
    bounds = [
        x.new_zeros(2, dtype=torch.float32) if not x.numel()  # (empty: nothing to bin)
        else torch.stack(torch.aminmax(x)) if x.dtype == torch.float64
        else torch.stack(torch.aminmax(x)).float() for x in flat
    ]  # fmt: skip
    ranges = torch.stack(bounds).tolist() if bounds else []  # host sync: histogram steps only
    finite = []
    for i, (x, (lo, hi)) in enumerate(zip(flat, ranges, strict=True)):
        bad = 0
        if not (math.isfinite(lo) and math.isfinite(hi)):  # rare: drop NaN/Inf (this syncs)
            keep = torch.isfinite(x)
            bad = int((~keep).sum())
            x = x[keep]
            lo, hi = (x.min().item(), x.max().item()) if x.numel() else (0.0, 0.0)
        ranges[i] = [lo, hi, bad]
        finite.append(x)
    # pass 2: counts and sums on the device, one transfer for all; Σx and the transfer in
    # float64 (float32 on MPS, which has none)
    acc = sum_dtype(flat[0].device) if flat else torch.float64
    counts_all: list[Tensor] = []
    sums_all: list[Tensor] = []  # Σx per tensor (of x / scale), float64
    squares_all: list[Tensor] = []  # Σx² per tensor (of x / scale)
    scales: list[float] = []
    edges_all = []
    for x, (lo, hi, _) in zip(finite, ranges, strict=True):
        if range_policy == "symmetric":
            a = max(abs(lo), abs(hi))
            left, right = -a, a
        elif range_policy == "fixed":
            left, right = fixed
        else:
            left, right = lo, hi
        if right <= left:  # a constant tensor: one bucket around its value, ± 0.5 as NumPy
            # takes it, wider only where a bucket of that range is below the value's
            # resolution in the dtype it is binned in (float32 1e8 ± 0.5 is 1e8: histc put it
            # in bucket 0, below its written limits; from 512 on it was widened to ± |v|/1024
            # whatever the dtype, a probe's: 1000 gave [999.02, 1000.98], not NumPy's range)
            ulp = _ulp(abs(left) + 0.5, acc)  # (one of NumPy's buckets is 1/bins wide)
            half = 0.5 if 1 / bins >= ulp else ulp * bins
            largest = _F64_MAX if x.dtype == torch.float64 else _F32_MAX
            if abs(left) + half <= largest:
                left, right = left - half, right + half
            elif left > 0:  # (near the dtype's largest: the range on the side it can take)
                left = left - 2 * half
            else:
                right = right + 2 * half
        # binned in float64 (where the device has it), in which the written limits are: in
        # float32, histc's own rounding put a value within float32's resolution of an edge
        # one bucket over, outside the limits it stated (a linspace's -0.4000000059604645
        # counted above -0.3999999999999999: a review's). On MPS float32, but a range whose
        # width times the bins passes float32's largest value is binned in float64 wherever
        # it may (histc's arithmetic overflowed: counts 0, or all in one end)
        wide = acc == torch.float64 or (right - left) * bins > _F32_MAX
        xf = x.double() if wide else x.float()
        xb = xf.clamp(left, right) if range_policy == "fixed" else xf  # outside: edge buckets
        limits = _limits(left, right, bins)
        if wide and xb.device.type == "cpu" and _interpolates(left, right, bins, limits):
            # each value against the limits written, exactly: torch.histogram's edges are
            # these (torch.linspace's), its interpolated bucket corrected against them; histc's
            # arithmetic alone, (x − left)·bins / (right − left) in float64, put a value within
            # float64's resolution of a limit one bucket over: -1e-17 over [-1, 1] above 0 (a
            # symmetric range's middle limit, where tiny values lie), float64 values on a
            # limit (probes'). 1.3 against 0.7 ms for 65,536 values on this CPU
            counts_all.append(torch.histogram(xb, bins=bins, range=(left, right)).hist)
        elif wide:  # (CUDA; a range whose interpolation overflows, or a few ulps wide)
            # compared with the limits, exactly
            inner = torch.tensor(limits[:-1], dtype=torch.float64, device=xb.device)
            at = torch.bucketize(xb, inner, right=True)  # (a value on a limit: the bucket above)
            with _histc_allowed():  # (integer counts: exact in any order, as histc's)
                counts_all.append(torch.bincount(at, minlength=bins).to(xb.dtype))
        else:  # (MPS: float32, histc's arithmetic)
            counts_all.append(_histc(xb, bins, left, right))
        # Σx in float64 (values that cancel: an output layer's gradient summed to 3.7x its
        # exact -3.7e-9 in float32), and Σx² in the binning's dtype (float32 on MPS).
        # Values whose Σx² could pass its largest value (float32's: |x| > 1.8e19 gave
        # sum_squares Inf; float64's: |x| > 1.3e154) or whose squares fall below its
        # smallest normal one (float32's: |x| < 1e-19 gave 0) are summed as x / m
        # (m = max |x|, |x / m| ≤ 1), times m or m² on the host
        m = max(abs(lo), abs(hi))
        mm = m * m
        huge = mm * max(x.numel(), 1) > (_F64_MAX if wide else _F32_MAX)
        tiny = 0 < mm < (_F64_TINY if wide else _F32_TINY)
        scale = m if huge or tiny else 1.0
        xs = xf / scale if scale != 1.0 else xf
        sums_all.append(xs.sum(dtype=acc))
        # (long on a CPU: by rows, as the norms are; torch's float32 dot keeps one running sum
        # per lane there, 1.2e-3 off for 2²² equal float16 values)
        squares_all.append(long_norm(xs).square() if is_long(xs) else torch.dot(xs, xs))
        scales.append(scale)
        edges_all.append(limits)
    # (the sums are float64: the counts and the squares' sums join them, exact)
    values = (  # host sync: histogram steps only
        torch.cat(
            [
                torch.stack(counts_all).to(acc).reshape(-1),
                torch.stack(sums_all),
                torch.stack(squares_all).to(acc),
            ]
        ).tolist()  # fmt: skip
        if counts_all
        else []
    )
    out = []
    sums = len(counts_all) * bins  # where the sums start
    for i, (x, (lo, hi, bad), limits, scale) in enumerate(
        zip(finite, ranges, edges_all, scales, strict=True)
    ):
        out.append(
            RawHistogram(
                min=lo, max=hi, num=x.numel(), sum=values[sums + i] * scale,
                sum_squares=values[sums + len(finite) + i] * scale * scale,
                bucket_limits=limits, bucket_counts=values[i * bins : (i + 1) * bins],
                nonfinite=int(bad),
            )
        )  # fmt: skip
    return out


def _limits(left: float, right: float, bins: int) -> list[float]:
    """The right limit of each of ``bins`` equal buckets over [``left``, ``right``], in
    float64: ``torch.linspace``'s edges, which ``torch.histogram`` bins by (the last the
    range's right end itself); for a range wider than float64's largest value, of the range
    scaled by a power of 2 (exact), scaled back."""
    s = 1.0 if math.isfinite(right - left) else _overflow_scale(bins)
    edges = torch.linspace(left * s, right * s, bins + 1, dtype=torch.float64)[1:]
    return [*(edges[:-1] / s).tolist(), right]


def _interpolates(left: float, right: float, bins: int, limits: list[float]) -> bool:
    """Whether ``torch.histogram`` counts exactly over [``left``, ``right``]: its interpolated
    bucket, from (x − left)·bins / (right − left) in float64, is corrected against the
    neighbouring edges only (one bucket either way), so the arithmetic must not overflow
    (everything was counted in bucket 1 over [0, 1.7e308]) and the buckets must be wide
    against float64's resolution, their limits apart (a range of a few ulps repeats limits,
    and values were counted in a bucket of width 0: a review's); else the values are compared
    with the limits (``torch.bucketize``)."""
    width = (right - left) / bins
    return (
        math.isfinite((right - left) * bins)
        and width > _F64_TINY
        and width > 2.0**-40 * max(abs(left), abs(right))
        and left < limits[0]
        and all(a < b for a, b in zip(limits, limits[1:], strict=False))
    )


def host_histogram(values: list[float], bins: int = 64) -> RawHistogram:
    """A histogram of a short list already on the host (e.g. a batch's per-sample norms, read
    with the step's scalars), over [min, max] of its finite values; NaN/Inf counted, left out.

    The buckets are exactly ``numpy.histogram``'s for ``range=(min, max)`` (its equal-width
    algorithm, the same float64 operations, done here in plain Python): for a batch of values
    NumPy's per-call overhead was most of the cost (116 µs against about 20 µs here for 64
    values). The sums are correctly rounded (``math.fsum``)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        lo = hi = 0.0
        left, right = -0.5, 0.5
    else:
        lo, hi = min(finite), max(finite)
        left, right = (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)
    step = (right - left) / bins  # numpy.linspace(left, right, bins + 1): k * step + left
    edges = [k * step + left for k in range(bins)] + [right]
    width = right - left
    counts = [0.0] * bins
    last = bins - 1
    for v in finite:  # numpy.histogram's index, then its corrections at the edges
        i = int((v - left) / width * bins)
        if i == bins:
            i -= 1
        if v < edges[i]:
            i -= 1
        if i != last and v >= edges[i + 1]:
            i += 1
        counts[i] += 1.0
    return RawHistogram(
        min=lo, max=hi, num=len(finite), sum=math.fsum(finite),
        sum_squares=math.fsum(v * v for v in finite), bucket_limits=edges[1:],
        bucket_counts=counts, nonfinite=len(values) - len(finite),
    )  # fmt: skip


class Histograms(Callback):
    """``grad_hist/<param>`` and ``weight_hist/<param>`` every ``every_n_steps`` steps and at
    the run's first and last step (so a run shorter than two intervals still shows a
    distribution), at the measuring point (gradients after accumulation and unscaling, before
    clipping; the weights the step is about to update)."""

    def __init__(
        self,
        every_n_steps: int,
        bins: int = 64,
        range: str = "minmax",  # noqa: A002  (the config key's name)
        min: float = -1.0,  # noqa: A002
        max: float = 1.0,  # noqa: A002
        grads: bool = True,
        weights: bool = True,
    ):
        """Keys as ``instrument.histograms.*``: ``range`` ``minmax``, ``symmetric`` or
        ``fixed`` (to [``min``, ``max``]; see :func:`histograms`)."""
        if every_n_steps < 1:
            raise ValueError(
                f"instrument.histograms.every_n_steps: got {every_n_steps}, must be >= 1"
            )
        # (the config's checks, for an instance built in Python: bins=0 failed at the first
        # histogram step, training begun, in a ZeroDivisionError naming nothing, and a fixed
        # range of min >= max wrote limits running downwards, every value in one bucket, a
        # probe's)
        try:  # (an integer of any kind, NumPy's too; not a bool)
            count = None if isinstance(bins, bool) else operator.index(bins)
        except TypeError:
            count = None
        if count is None or not 1 <= count <= 10_000:
            raise ValueError(
                f"instrument.histograms.bins: got {bins!r}, must be an integer in [1, 10000]"
            )
        bins = count
        if range not in HISTOGRAM_RANGES:
            raise ValueError(
                f"instrument.histograms.range: got {range!r}, must be one of "
                f"{', '.join(HISTOGRAM_RANGES)}"
            )
        if range == "fixed" and not (math.isfinite(min) and math.isfinite(max) and min < max):
            raise ValueError(
                f"instrument.histograms.min: got min={min}, max={max}: range=fixed needs "
                "finite min < max"
            )
        self.every, self.bins = Every(every_n_steps), bins
        self.range_policy, self.fixed = range, (min, max)
        self.grads, self.weights = grads, weights

    def on_before_optimizer_step(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
        step = trainer.global_step
        due = self.every.due(step) or step in (1, trainer.total_steps)
        if not due or trainer.logger is None:
            return
        tags: list[tuple[str, str]] = []
        tensors: list[Tensor] = []
        for name, p in zip(trainer.param_names, trainer.params, strict=True):
            kinds = [("grad", p.grad)] if self.grads and p.grad is not None else []
            kinds += [("weight", p)] if self.weights else []
            for kind, t in kinds:
                if not t.numel():  # a zero-size parameter: nothing to bin (aminmax raised)
                    continue
                if t.is_complex():  # its real and imaginary parts, each its own histogram
                    parts = torch.view_as_real(t.detach().resolve_conj())
                    tags += [(kind, f"{name}/real"), (kind, f"{name}/imag")]
                    tensors += [parts[..., 0], parts[..., 1]]
                else:
                    tags.append((kind, name))
                    tensors.append(t)
        hists = histograms(tensors, self.bins, self.range_policy, self.fixed)
        counts: dict[str, float] = {}
        for (kind, name), h in zip(tags, hists, strict=True):
            trainer.logger.log_histogram_raw(f"{kind}_hist/{name}", h, trainer.global_step)
            if h.nonfinite:
                counts[f"nonfinite/{kind}/{name}"] = float(h.nonfinite)
        if counts:
            trainer.stage_scalars(counts)
