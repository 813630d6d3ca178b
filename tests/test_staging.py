"""``trainer.metrics.Staging`` on its own: what each deferred step writes, and at which step."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.metrics import Staging


class Recorder:
    """A logger keeping what it is given: ``(step, tag, value)`` scalars and histograms."""

    def __init__(self) -> None:
        self.scalars: list[tuple[int, str, float]] = []
        self.histograms: list[tuple[int, str, int]] = []

    def add_floats(self, floats, step, wall_time=None) -> None:
        self.scalars += [(step, tag, v) for tag, v in floats.items()]

    def log_histogram_raw(self, tag, h, step, wall_time=None) -> None:
        self.histograms.append((step, tag, h.num))


def test_deferred_steps_are_written_each_at_its_own_step_and_write_returns_its_own() -> None:
    """Steps 1 and 2 do not log (deferred), step 3 does: each step's scalars, histogram (and
    its ``_mean``/``_max``) are written at that step, once, and ``write`` returns step 3's
    values only. Every value is a small integer or its mean, exact in float32."""
    staging, log = Staging(), Recorder()
    for step in (1, 2):
        staging.stage({"u/x": torch.tensor(float(step))})
        staging.stage_histogram("u/h", torch.full((step,), float(10 * step)))
        staging.defer(staging.take_scalars(step), step)
    staging.stage({"u/x": torch.tensor(3.0)})
    staging.stage_histogram("u/h", torch.tensor([30.0, 32.0, 34.0]))
    got = staging.write(staging.take_scalars(3), 3, log)
    assert got == {"u/x": 3.0, "u/h_mean": 32.0, "u/h_max": 34.0}
    assert log.histograms == [(1, "u/h", 1), (2, "u/h", 2), (3, "u/h", 3)]
    assert sorted(log.scalars) == sorted(
        [(1, "u/x", 1.0), (1, "u/h_mean", 10.0), (1, "u/h_max", 10.0),
         (2, "u/x", 2.0), (2, "u/h_mean", 20.0), (2, "u/h_max", 20.0),
         (3, "u/x", 3.0), (3, "u/h_mean", 32.0), (3, "u/h_max", 34.0)]
    )  # fmt: skip
    # nothing is kept to be written again
    assert staging.flush(log) is None and len(log.scalars) == 9


def test_a_histogram_of_no_finite_value_has_no_mean_or_max_and_quiet_is_per_step() -> None:
    """All-NaN: ``_mean`` and ``_max`` are NaN (nothing to average), not 0, and the three
    non-finite values counted; ``count_nonfinite=False`` silences the count of that step only
    (the next step's, staged counted, is written)."""
    staging, log = Staging(), Recorder()
    nan3 = torch.full((3,), math.nan)
    staging.stage_histogram("u/h", nan3, count_nonfinite=False)
    staging.defer(staging.take_scalars(1), 1)
    staging.stage_histogram("u/h", nan3)
    got = staging.write(staging.take_scalars(2), 2, log)
    assert math.isnan(got["u/h_mean"]) and math.isnan(got["u/h_max"])
    assert got["u/h_nonfinite"] == 3.0
    assert [(s, t) for s, t, _ in log.scalars if t == "u/h_nonfinite"] == [(2, "u/h_nonfinite")]


def test_values_changed_in_place_are_left_out_and_the_first_is_named() -> None:
    """Two deferred steps each with a scalar, a histogram and a host function's tensor changed
    in place after staging: none of the changed values is written (nor the host function
    run on them), the unchanged one is, and the error names the first step's tensor."""
    staging, log = Staging(), Recorder()
    ran: list[list[float]] = []
    changed = []
    for step in (1, 2):
        s, h, v = torch.tensor(1.0), torch.ones(2), torch.ones(2)
        staging.stage({f"u/s{step}": s, "u/kept": torch.tensor(float(step))})
        staging.stage_histogram(f"u/h{step}", h)
        staging.stage_on_host(v, lambda x: ran.append(x) or {})
        staging.defer(staging.take_scalars(step), step)
        changed += [s, h, v]
    for t in changed:
        t.add_(1)
    with pytest.raises(RuntimeError, match="step 1: the tensor staged as 'u/s1' was changed"):
        staging.flush(log)
    assert log.scalars == [(1, "u/kept", 1.0), (2, "u/kept", 2.0)]
    assert log.histograms == [] and ran == []


def test_a_histograms_four_tags_are_its_own_for_the_step() -> None:
    """A histogram writes ``<tag>``, ``<tag>_mean``, ``<tag>_max`` and ``<tag>_nonfinite``: a
    scalar staged under any of them, or the histogram staged again, in the same step is
    refused (one would replace the other without a word)."""
    staging = Staging()
    staging.stage_histogram("u/h", torch.ones(2))
    for tag in ("u/h_mean", "u/h_max", "u/h_nonfinite"):
        with pytest.raises(ValueError, match=f"'{tag}' was staged twice for this step"):
            staging.stage({tag: 1.0})
    with pytest.raises(ValueError, match="'u/h' was staged twice for this step"):
        staging.stage_histogram("u/h", torch.ones(2))


def test_stage_on_host_refuses_what_is_not_a_function_where_staged() -> None:
    """A function that is not callable is refused when staged, not at the next logging
    step's read (where the step's other values would be at stake)."""
    with pytest.raises(TypeError, match="takes a tensor and a function, got a Tensor and a dict"):
        Staging().stage_on_host(torch.ones(2), {})


def test_a_view_staged_for_the_host_is_its_value_when_staged() -> None:
    """A view staged for the host, whose base then changes in place within the step (a
    gradient clipped later), is read as it was when staged: copied then."""
    staging, seen = Staging(), []
    base = torch.zeros(4)
    staging.stage_on_host(base[:2], lambda v: seen.append(v) or {})
    base.add_(5.0)
    staging.write(staging.take_scalars(1), 1, Recorder())
    assert seen == [[0.0, 0.0]]


def test_an_instruments_view_is_checked_from_the_end_of_its_step() -> None:
    """``own=False`` (an instrument's slice of a tensor nothing writes to until the read): the
    view is not copied, and a change in place to its base within the step (another slice)
    is not an error; the version is taken at the step's end."""
    staging, log = Staging(), Recorder()
    base = torch.zeros(4)
    staging.stage({("u/a", "u/b"): base[:2]}, own=False)
    base[2:].add_(1.0)
    assert staging.write(staging.take_scalars(1), 1, log) == {"u/a": 0.0, "u/b": 0.0}


def test_an_inference_tensor_staged_is_its_value_when_staged() -> None:
    """A tensor made under torch.inference_mode() has no version counter: changed in place
    after it was staged, its new value was written, unsaid (a probe's 1111 for 111). Copied
    when staged."""
    staging, log = Staging(), Recorder()
    with torch.inference_mode():
        value = torch.tensor(111.0)
    staging.stage({"u/x": value})
    staging.stage_histogram("u/h", value.reshape(1))
    with torch.inference_mode():
        value.add_(1000.0)
    got = staging.write(staging.take_scalars(1), 1, log)
    assert got == {"u/x": 111.0, "u/h_mean": 111.0, "u/h_max": 111.0}
