"""The histogram instrument built in Python checks its arguments as the config does, and a
constant tensor's range is NumPy's wherever that is resolved (a probe's findings, 2026-12-08)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.instrument import histograms
from trainer.instrument.histograms import Histograms


@pytest.mark.parametrize("bins", [0, -4, 2.5, 10_001, True])
def test_a_histograms_bins_built_in_python_are_refused_naming_the_key(bins) -> None:
    """``Histograms`` refuses a cadence of 0 and a misspelled range from Python, naming the
    key, as the config does; a bad ``bins`` was taken, and the run failed at its first
    histogram step, after training had started, in words naming neither the key nor the
    instrument (ZeroDivisionError: float division by zero for 0; torch.linspace's TypeError
    for 2.5)."""
    with pytest.raises(ValueError) as refused:
        Histograms(1, bins=bins)
    assert str(refused.value) == (
        f"instrument.histograms.bins: got {bins!r}, must be an integer in [1, 10000]"
    )


@pytest.mark.parametrize(("lo", "hi"), [(1.0, -1.0), (0.5, 0.5), (math.nan, 1.0)])
def test_a_fixed_range_built_in_python_needs_finite_min_below_max(lo, hi) -> None:
    """``range=fixed`` with min >= max (or NaN) from the config is refused; built in Python
    it was taken and the run logged histograms that are wrong without a word: for [1, -1]
    ``right <= left`` is read as a constant tensor, the range becomes [0.5, -0.5], the limits
    run downwards and every value is counted in the first bucket."""
    with pytest.raises(ValueError) as refused:
        Histograms(1, range="fixed", min=lo, max=hi)
    assert str(refused.value) == (
        f"instrument.histograms.min: got min={lo}, max={hi}: range=fixed needs finite min < max"
    )


@pytest.mark.parametrize("value", [1000.0, -2048.0, 1e6, 1e8, 0.0])
def test_a_constant_tensors_range_is_numpys_where_half_is_resolved(value) -> None:
    """README / docs/instrumentation.md: "a constant tensor gets NumPy's range of ± 0.5 around
    it, wider where that is below its resolution". The range was widened to ± |v|·2⁻¹⁰ for
    any |v| > 512, whatever the dtype it is binned in (float64 on the CPU):
    [999.0234375, 1000.9765625] instead of NumPy's [999.5, 1000.5]. (1e8 is beyond float32's
    resolution of ± 0.5, not float64's.)"""
    (h,) = histograms([torch.full((10,), value)], bins=64)
    counts, edges = np.histogram(np.full(10, value), bins=64)
    assert h.bucket_limits == edges[1:].tolist()
    assert h.bucket_counts == counts.astype(float).tolist()


@pytest.mark.parametrize(("value", "bins"), [(4e13, 64), (-5e13, 64), (2.0**38, 10_000)])
def test_a_constant_tensors_range_is_numpys_where_its_buckets_are_resolved(value, bins) -> None:
    """(a review's) The range is widened from NumPy's ± 0.5 wherever |v|·eps·bins > 0.5, that
    is wherever a bucket of NumPy's range, 1/bins, is under 2|v|·eps: 1 to 4 ulps of v, buckets
    that float64 resolves. 4e13 (ulp 2⁻⁷ = 0.0078, NumPy's buckets 1/64 = 2 ulps, its limits
    exact and increasing) was binned over ± 0.5703125, while 2**45 = 3.5e13, of the same ulp,
    gets NumPy's ± 0.5."""
    counts, edges = np.histogram(np.full(10, value), bins=bins)
    assert (np.diff(edges) > 0).all()
    (h,) = histograms([torch.full((10,), value, dtype=torch.float64)], bins=bins)
    assert h.bucket_limits == edges[1:].tolist()
    assert h.bucket_counts == counts.astype(float).tolist()


def test_a_numpy_integer_bins_is_taken_as_the_function_takes_it() -> None:
    """(a review's) ``Histograms(1, bins=np.int64(64))`` is refused with "got np.int64(64),
    must be in [1, 10000]", a message whose value is in the range it names (``histograms()``
    bins with it as it does with 64, and the check before 2026-12-08 took it)."""
    (h,) = histograms([torch.arange(4.0)], bins=np.int64(64))
    assert sum(h.bucket_counts) == 4
    assert Histograms(1, bins=np.int64(64)).bins == 64
