"""The event file: TensorBoard's format, read back with tensorboard's own readers."""

from __future__ import annotations

import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub import errors
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New

from trainer.callbacks import Callback
from trainer.instrument.histograms import histograms
from trainer.logger import TensorBoardLogger, to_floats, to_host_many


def records(path) -> list[bytes]:
    """Every record of a file through tensorboard's reader, which checks both checksums."""
    reader, out = PyRecordReader_New(str(path)), []
    while True:
        try:
            reader.GetNext()
        except errors.OutOfRangeError:
            return out
        out.append(reader.record())


def test_checksums_match_tensorboards_reader(tmp_path):
    log = TensorBoardLogger(tmp_path)
    for step in range(5):
        log.add_floats({"a": float(step), "b/c": -step / 3}, step)
    log.close()
    assert len(records(log.file.path)) == 1 + 5  # the file_version event, then one per call


def test_a_corrupted_byte_is_caught_by_the_reader(tmp_path):
    """The reader verifies the checksums, so the test above can fail."""
    log = TensorBoardLogger(tmp_path)
    log.add_floats({"a": 1.0}, 1)
    log.close()
    data = bytearray(log.file.path.read_bytes())
    data[-6] ^= 0xFF  # inside the last record's payload
    log.file.path.write_bytes(bytes(data))
    with pytest.raises(errors.DataLossError):
        records(log.file.path)


def test_scalars_and_histograms_read_back(tmp_path):
    log = TensorBoardLogger(tmp_path)
    log.log_scalars({"x": torch.tensor(2.5), ("p/0", "p/1"): torch.tensor([1.0, math.inf])}, 3)
    values = torch.linspace(-1, 1, 101)
    (h,) = histograms([values], bins=10)
    log.log_histogram_raw("hist/v", h, 3)
    log.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("x")] == [(3, 2.5)]
    assert acc.Scalars("p/1")[0].value == math.inf
    (event,) = acc.Histograms("hist/v")
    assert event.step == 3
    assert event.histogram_value.num == 101
    assert sum(event.histogram_value.bucket) == 101
    assert event.histogram_value.min == -1 and event.histogram_value.max == 1

    # Σv and Σv² as written, against exact sums (fsum): Σv summed in float64 is within
    # γ₁₀₀·Σ|v| of it, Σv² summed in float32 (non-negative terms) within γ₁₀₁·Σv², where
    # γₙ = n·u / (1 − n·u) for the dtype's unit roundoff u
    def gamma(n: int, u: float) -> float:
        return n * u / (1 - n * u)

    v = values.double().tolist()
    size = math.fsum(abs(x) for x in v)
    assert abs(event.histogram_value.sum - math.fsum(v)) <= gamma(100, 2.0**-53) * size
    exact = math.fsum(x * x for x in v)
    assert abs(event.histogram_value.sum_squares - exact) <= gamma(101, 2.0**-24) * exact


def test_flush_puts_the_events_on_disk_before_close(tmp_path):
    """A live TensorBoard, or a run killed before it closes its file, reads what ``flush``
    wrote: the events reach the operating system at each write, not at ``close``."""
    log = TensorBoardLogger(tmp_path)
    log.add_floats({"x": 1.5}, 7)
    log.flush()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()  # (the file is still open)
    assert [(e.step, e.value) for e in acc.Scalars("x")] == [(7, 1.5)]
    log.close()


@pytest.mark.parametrize("late_name", [False, True])
def test_purge_step_hides_the_older_files_later_steps(tmp_path, late_name):
    """A resumed run's events replace the ones a killed run wrote past its checkpoint, also in
    the same second and when the older file's name sorts late (TensorBoard reads a folder's
    files in name order and skips one that sorts before the file it has read: a pid of 9999
    sorts after 10001 as text)."""
    first = TensorBoardLogger(tmp_path)
    for step in range(1, 11):
        first.add_floats({"loss": 1.0}, step)
    first.close()
    if late_name:
        first.file.path.rename(tmp_path / "events.out.tfevents.9999999999.host.9999.0")
    second = TensorBoardLogger(tmp_path, purge_step=6)
    for step in range(6, 9):
        second.add_floats({"loss": 2.0}, step)
    second.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    seen = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert seen == [(s, 1.0) for s in range(1, 6)] + [(s, 2.0) for s in range(6, 9)]


def test_floats_are_read_in_one_transfer():
    out = to_floats({"a": 1, "b": torch.tensor(2.0), ("c", "d"): torch.tensor([3.0, 4.0])})
    assert out == {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}


@pytest.mark.parametrize("others", [torch.float32, torch.float16, torch.float64])
def test_every_value_is_rounded_to_float32_on_its_own_whatever_it_is_staged_with(others):
    """One transfer for tensors of several dtypes, shapes and autograd states: each value is
    what ``float(t.float())`` gives for it alone (an int64 beside float16 values is not
    rounded to float16 first, as ``cat``'s promotion would), also beside a float64 array,
    which itself comes back unrounded."""
    g = torch.Generator().manual_seed(0)
    big = torch.tensor(2**24 + 1, dtype=torch.int64)  # not a float32, let alone a float16
    values = {
        "f64": torch.tensor(1 / 3, dtype=torch.float64),
        "int": big,
        "bf16": torch.randn((), generator=g).bfloat16(),
        "grad": (torch.randn(3, generator=g, requires_grad=True) * 2).sum(),
        ("m0", "m1", "m2", "m3"): torch.randn(2, 2, generator=g).to(others),
        ("v0", "v1"): torch.randn(2, generator=g).to(others),
    }
    staged = (torch.arange(6.0, dtype=torch.float64).reshape(2, 3) / 3).to(others)
    (out,), (array,) = to_host_many([values], [staged])
    expected = {}
    for key, v in values.items():
        flat = v.detach().reshape(-1).float().tolist()
        expected.update(zip(key, flat, strict=True) if isinstance(key, tuple) else [(key, flat[0])])
    assert out == expected
    assert out["int"] == 2**24  # float32's rounding of 2²⁴ + 1, exactly once
    assert array == staged.reshape(-1).tolist()  # (its own dtype's values, exactly)
    (alone,), _ = to_host_many([{"int": big, ("h",): torch.ones(1, dtype=others)}])
    assert alone == {"int": 2**24, "h": 1.0}  # (cat would make the int a float16: inf)


def test_two_writers_in_the_same_second_get_their_own_files(tmp_path):
    a, b = TensorBoardLogger(tmp_path), TensorBoardLogger(tmp_path)
    a.add_floats({"a": 1.0}, 1)
    b.add_floats({"b": 2.0}, 1)
    a.close()
    b.close()
    assert a.file.path != b.file.path
    assert len(records(a.file.path)) == len(records(b.file.path)) == 2


def test_a_runs_event_folder_is_named_by_its_label_and_found_again(tmp_path):
    """A new run's events go to ``tb/<label>`` (``/`` made ``_``; a label over 120
    characters cut to 110 and a digest, so two long labels differing only at their end stay
    apart); a run that exists is found again: its labelled folder, or ``tb/`` itself where
    an older run wrote its event files there."""
    from trainer.logger import event_dir

    assert event_dir(tmp_path / "r", "model=cnn,data.root=/x") == (
        tmp_path / "r" / "tb" / "model=cnn,data.root=_x"
    )
    exact = "a" * 120  # (at the limit: as it is)
    assert event_dir(tmp_path / "r", exact).name == exact
    longer = [event_dir(tmp_path / "r", "a" * 120 + end).name for end in ("1", "2")]
    assert longer[0] != longer[1]
    assert all(len(n) == 119 and n.startswith("a" * 110 + "~") for n in longer), longer
    run = tmp_path / "r"
    TensorBoardLogger(event_dir(run, "lr=0.1")).close()
    assert event_dir(run, "lr=0.2") == run / "tb" / "lr=0.1"  # (a resume with other values)
    old = tmp_path / "old"
    TensorBoardLogger(old / "tb").close()
    assert event_dir(old, "lr=0.1") == old / "tb"


def test_events_are_written_once_flush_secs_have_passed_and_kept_until_then(tmp_path):
    """``add_floats`` writes the buffered events once ``flush_secs`` have passed since the
    last write (here -1: always passed) and keeps them in memory until then (an hour: not
    before ``flush`` or ``close``)."""
    eager = TensorBoardLogger(tmp_path / "eager", flush_secs=-1.0)
    eager.add_floats({"a": 1.0}, 1)
    assert len(records(eager.file.path)) == 2  # (the file_version event and the step's)
    lazy = TensorBoardLogger(tmp_path / "lazy", flush_secs=3600.0)
    lazy.add_floats({"a": 1.0}, 1)
    assert len(records(lazy.file.path)) == 1
    lazy.flush()
    assert len(records(lazy.file.path)) == 2
    eager.close()
    lazy.close()


@pytest.mark.parametrize(("value", "want"), [
    (0.0, "0.0000"), (-0.0, "0.0000"), (0.5, "0.5000"), (0.01, "0.0100"),
    (0.00999, "0.0100"),  # (4 decimals show it: rounds to 0.01)
    (0.009949, "9.949e-03"), (1e-4, "1.000e-04"), (-2.5e-5, "-2.500e-05"),
    (999999.99994, "999999.9999"), (1e6, "1.000e+06"), (-3.2e31, "-3.200e+31"),
    (math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf"),
])  # fmt: skip
def test_a_metric_is_shown_with_what_its_digits_can_say(value, want) -> None:
    """The epoch and summary lines' numbers: 4 decimals, and 4 significant digits where the
    decimals would show under 0.01 (a converged loss printed 0.0000, a probe's) or a million
    and more (a diverged one printed 31 digits, a review's); 0 plain, never -0.0000 (a
    mutation round found no test of it)."""
    from trainer.logger import shown

    assert shown(value) == want


def test_values_measured_between_logging_steps_keep_the_time_they_were_measured(tmp_path):
    """Norms every 4 steps, logging every 7, histograms every 5: step 4's norms are kept on
    the device and written with step 7's read, and had that read's wall time, later than
    step 5's histograms (TensorBoard's wall-time axis put step 4 after step 5, a probe's).
    Each event has the time its step's values were kept: along the steps, the wall times
    never go back."""
    from conftest import train
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from trainer.logger import event_dir

    train(tmp_path, "trainer.max_steps=14", "logging.every_n_steps=7",
          "instrument.norms.every_n_steps=4", "instrument.histograms.every_n_steps=5")  # fmt: skip
    files = sorted(event_dir(tmp_path).glob("events.out.tfevents.*"))
    loaded = [e for path in files for e in EventFileLoader(str(path)).Load()]
    events = [
        e for e in loaded if e.summary.value and not e.summary.value[0].tag.startswith("_hparams_/")
    ]
    steps = {e.step for e in events}
    assert {4, 5, 7, 8, 10, 12, 14} <= steps
    by_step = sorted(events, key=lambda e: (e.step, e.wall_time))
    times = [e.wall_time for e in by_step]
    assert times == sorted(times), [(e.step, e.wall_time) for e in by_step]


class StagesEveryStep(Callback):
    """A histogram and a scalar of one's own staged at every step."""

    def on_train_step_end(self, trainer, out) -> None:
        trainer.stage_histogram("mine/h", torch.arange(4.0) * out.step)
        trainer.stage_scalars({"mine/x": float(out.step)})


def test_a_staged_histogram_read_later_keeps_the_time_its_step_was_measured(tmp_path):
    """A histogram of one's own staged at every step, logging every 7: steps 1-6 are read
    with step 7, and each step's histogram event had the read's wall time while its scalars
    (``mine/x``, ``mine/h_mean``) had their step's (TensorBoard's wall-time axis put step 1's
    histogram after step 6's scalars). Both events of a step are written with the same time,
    the time its values were kept, and those times go up with the steps."""
    from conftest import train
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from trainer.logger import event_dir

    train(tmp_path, "trainer.max_steps=7", "logging.every_n_steps=7",
          callbacks=[StagesEveryStep()])  # fmt: skip
    times: dict[tuple[int, str], float] = {}
    for path in sorted(event_dir(tmp_path).glob("events.out.tfevents.*")):
        for e in EventFileLoader(str(path)).Load():
            for v in e.summary.value:
                if v.tag in ("mine/h", "mine/x"):
                    times[e.step, v.tag] = e.wall_time
    assert sorted(times) == [(s, t) for s in range(1, 8) for t in ("mine/h", "mine/x")]
    for step in range(1, 8):
        assert times[step, "mine/h"] == times[step, "mine/x"], step
    along = [times[s, "mine/x"] for s in range(1, 8)]
    assert along == sorted(along) and len(set(along)) == 7, along
