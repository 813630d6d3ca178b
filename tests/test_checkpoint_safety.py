"""Checkpoint safety: bad files given to ``trainer.resume`` are refused before training (and a
pickle that would run code never runs), ``resume=auto`` falls back past broken checkpoints,
``keep_last`` prunes, writes stay atomic under a full disk or a crash, and the run-dir and
free-space checks stop a run before its first step."""

from __future__ import annotations

import builtins
import collections
import errno
import hashlib
import importlib
import io
import json
import logging
import os
import pickle
import shlex
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, StopAt, final_params, in_background, read_scalars, train

import trainer.checkpoint as checkpoint_module
from trainer.callbacks import Callback
from trainer.checkpoint import load_checkpoint, step_path
from trainer.logger import event_dir

# `trainer.run` the attribute is the function (trainer/__init__.py re-exports it); the module:
run_module = importlib.import_module("trainer.run")

#: what ``shutil.disk_usage`` returns
DiskUsage = collections.namedtuple("DiskUsage", "total used free")

# checkpoints every 2 steps, train/loss every step: one step of training would leave a trace
FAST = ("trainer.checkpoint.every_n_steps=2", "logging.every_n_steps=1")


REFUSED = "refused by torch.load(weights_only=True)"  # the start of the error


def cli(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "trainer.device=cpu", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def step_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("step_*.pt"))


def assert_nothing_trained(root: Path) -> None:
    """No step checkpoint and no train/loss event anywhere under ``root``."""
    assert not list(root.rglob("step_*.pt"))
    assert not list(root.rglob("last.pt"))
    for tb in root.rglob("tb"):
        assert "train/loss" not in read_scalars(tb.parent)


def assert_no_temp_files(directory: Path) -> None:
    """None of what writes leave while in flight (``.<name>.*.tmp``, ``.last.pt.link``)."""
    assert [p.name for p in directory.iterdir() if p.name.startswith(".")] == []


# ----------------------------------------------------------------------------- payloads


class _RunsShell:
    """Unpickling calls ``os.system`` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _RunsPython:
    """Unpickling calls ``exec`` on a line that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


class _OddDict(collections.OrderedDict):
    """Looks like a state dict, but is a class ``weights_only`` does not know."""


# ----------------------------------------------------------------------------- sources


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory) -> Path:
    """A finished 4-step run of the default config (mlp): checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("mlp") / "run"
    train(run_dir, *FAST, "trainer.max_steps=4")
    return run_dir


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("cnn") / "run"
    train(run_dir, *FAST, "model=cnn", "trainer.max_steps=2")
    return run_dir


def write_bad(kind: str, path: Path, mlp_run: Path, cnn_run: Path, marker: Path) -> None:
    real = mlp_run / "checkpoints" / "step_000000002.pt"
    state = load_checkpoint(real)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = real.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "runs_shell_torch_save":
        torch.save({**state, "model": _RunsShell(marker)}, path)
    elif kind == "runs_python_pickle_dump":
        with open(path, "wb") as f:  # protocol 2: a GLOBAL opcode torch's legacy reader parses
            pickle.dump({**state, "model": _RunsPython(marker)}, f, protocol=2)
    elif kind == "wrong_shape":
        name = next(iter(state["model"]))
        state["model"] = {**state["model"], name: torch.zeros(3, 3)}
        torch.save(state, path)
    elif kind in ("no_optimizer", "no_rng"):
        del state[kind.removeprefix("no_")]
        torch.save(state, path)
    elif kind == "other_model":
        shutil.copy(cnn_run / "checkpoints" / "last.pt", path)
    elif kind == "plain_tensor":
        torch.save(torch.zeros(3), path)
    elif kind != "missing":
        raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "causes"),
    [
        ("empty", ["empty (0 bytes)"]),
        ("missing", ["does not exist"]),
        ("truncated", ["not a readable PyTorch checkpoint", "central directory"]),
        ("random_bytes", [REFUSED, "Unsupported operand"]),
        ("runs_shell_torch_save", [REFUSED, "GLOBAL", ".system"]),
        ("runs_python_pickle_dump", [REFUSED, "GLOBAL exec"]),
        ("wrong_shape", ["does not fit this run", "size mismatch for net.1.weight"]),
        ("no_optimizer", ["not a training checkpoint", "lacks optimizer"]),
        ("no_rng", ["not a training checkpoint", "lacks rng"]),
        # (refused by its config now, before its weights are tried: the changed keys named)
        ("other_model", ["was trained with another config",
                         "model._target_: trainer.models.cnn.CNN -> trainer.models.mlp.MLP"]),
        ("plain_tensor", ["holds a Tensor, not a dict"]),
    ],
)  # fmt: skip
def test_a_bad_resume_file_is_refused_naming_it_and_the_cause_before_training(
    tmp_path, mlp_run, cnn_run, kind: str, causes: list[str]
) -> None:
    bad, marker = tmp_path / "bad" / "ckpt.pt", tmp_path / "pwned"
    bad.parent.mkdir()
    write_bad(kind, bad, mlp_run, cnn_run, marker)
    run_dir = tmp_path / "run"
    with pytest.raises((ValueError, OSError)) as info:
        train(run_dir, *FAST, f"trainer.resume={bad}", "trainer.max_steps=6")
    message = str(info.value)
    assert str(bad) in message
    cause = message.replace(str(bad), "<path>")  # the file's name must not pass for the cause
    for expected in causes:
        assert expected in cause
    assert not marker.exists()  # weights_only=True refused the pickle: nothing ran
    assert_nothing_trained(tmp_path)
    assert step_files(mlp_run / "checkpoints") == ["step_000000002.pt", "step_000000004.pt"]
    failed = json.loads((run_dir / "metrics.json").read_text())
    assert failed["status"] == "failed" and str(bad) in failed["error"]


def test_the_code_running_payloads_do_run_code_when_unpickled_unsafely(tmp_path) -> None:
    """The control for the security cases above: these files are real exploits."""
    shell, python = tmp_path / "shell", tmp_path / "python"
    torch.save({"model": _RunsShell(shell)}, tmp_path / "a.pt")
    # the pickle inside torch.save's zip archive (no tensors in it), unpickled as is: never
    # an unsafe torch.load, not even here
    with zipfile.ZipFile(tmp_path / "a.pt") as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        pickle.loads(archive.read(name))
    assert shell.exists()
    with open(tmp_path / "b.pt", "wb") as f:
        pickle.dump({"model": _RunsPython(python)}, f, protocol=2)
    with open(tmp_path / "b.pt", "rb") as f:
        pickle.load(f)
    assert python.exists()


def _evil_resume(path: Path):
    bad, marker = path / "evil.pt", path / "pwned"
    torch.save({"model": _RunsShell(marker)}, bad)
    proc = cli(f"trainer.resume={bad}", "trainer.max_steps=4", f"hydra.run.dir={path / 'run'}")
    return proc, bad, marker, path


@in_background(_evil_resume)
def test_cli_refuses_a_code_running_checkpoint_with_nonzero_exit_and_no_side_effect(
    background,
) -> None:
    proc, bad, marker, tmp_path = background
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"checkpoint {bad} was {REFUSED}" in out and "GLOBAL" in out
    assert not marker.exists()
    assert_nothing_trained(tmp_path)


def test_a_failed_resume_leaves_the_run_it_came_from_untouched(tmp_path) -> None:
    """A checkpoint that does not fit (here: an mlp run resuming a cnn run's checkpoint, the
    command a user gets wrong) is refused; the cnn run's record must survive that."""
    cnn = tmp_path / "cnn"
    train(cnn, *FAST, "model=cnn", "trainer.max_steps=4")
    metrics = (cnn / "metrics.json").read_bytes()
    tb_files = sorted(p.name for p in event_dir(cnn).iterdir())
    with pytest.raises(ValueError, match="was trained with another config; this run changes "
                       "model._target_"):  # fmt: skip
        train(tmp_path / "mlp", *FAST, f"trainer.resume={step_path(cnn / 'checkpoints', 2)}")
    assert (cnn / "metrics.json").read_bytes() == metrics
    assert sorted(p.name for p in event_dir(cnn).iterdir()) == tb_files
    assert [s for s, _ in read_scalars(cnn)["train/loss"]] == [1, 2, 3, 4]


def test_a_refused_resume_in_the_same_run_dir_leaves_that_run_untouched(tmp_path) -> None:
    """The same refusal when the run dir given is the checkpoint's own (a fixed
    ``hydra.run.dir`` with ``resume=auto``): its completed record is not replaced by the
    refusal's failure."""
    train(tmp_path, *FAST, "trainer.run_id=x", "trainer.max_steps=4")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    # (an id given by hand may be another run's: the refusal says so, naming the id)
    with pytest.raises(ValueError, match=r"changes optimizer.lr.*trainer.run_id='x' is given "
                       r"by hand.*give each its own"):  # fmt: skip
        train(tmp_path, *FAST, "trainer.run_id=x", "trainer.max_steps=4", "optimizer.lr=0.5",
              "trainer.resume=auto", f"trainer.checkpoint.search_dir={tmp_path}")  # fmt: skip
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_new_run_in_a_used_run_dir_sets_the_earlier_run_aside_whole(tmp_path) -> None:
    """A fresh run given a folder holding another run's outputs writes its own events, HParams
    and checkpoints, not into the other run's: before, its points joined the other run's event
    folder (two values at each step, TensorBoard showing the first run's HParams) and its
    checkpoints sat beside the other run's, where ``resume=auto`` would find them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    train(tmp_path, *FAST, "trainer.max_steps=4", "optimizer.lr=0.01")
    first = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    train(tmp_path, *FAST, "trainer.max_steps=3", "optimizer.lr=0.02")
    aside = tmp_path / "previous" / "1"
    kept = {p.relative_to(aside): p.read_bytes() for p in aside.rglob("*") if p.is_file()}
    marker = Path("checkpoints") / "run.json"  # renamed: resume=auto no longer finds it
    assert kept.pop(marker.with_name("superseded.json")) == first.pop(marker)
    # its metrics.json names its own last.pt where it went (it named the new run's, a probe's)
    was, now = (json.loads(d.pop(Path("metrics.json"))) for d in (first, kept))
    assert was.pop("checkpoint") == str(tmp_path / "checkpoints" / "last.pt")
    assert now.pop("checkpoint") == str(aside / "checkpoints" / "last.pt") and now == was
    assert kept == first  # nothing else of the first run lost or changed
    # each folder holds one run: its own steps, once each, and its own HParams
    assert [s for s, _ in read_scalars(tmp_path)["train/loss"]] == [1, 2, 3]
    assert [s for s, _ in read_scalars(aside)["train/loss"]] == [1, 2, 3, 4]
    for run_dir, lr in ((tmp_path, 0.02), (aside, 0.01)):
        acc = EventAccumulator(str(event_dir(run_dir)))
        acc.Reload()
        content = acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
        start = metadata.parse_session_start_info_plugin_data(content)
        assert start.hparams["optimizer.lr"].number_value == pytest.approx(lr, rel=1e-12)
    assert json.loads((tmp_path / "metrics.json").read_text())["step"] == 3
    assert step_files(tmp_path / "checkpoints") == ["step_000000002.pt", "step_000000003.pt"]
    # resume=auto of the first run's config finds none of the set-aside checkpoints
    first_id = load_checkpoint(aside / "checkpoints" / "last.pt")["run_id"]
    assert checkpoint_module.find_checkpoints(tmp_path, first_id) == []


def test_runs_of_the_same_overrides_in_one_folder_are_session_groups_of_their_own(tmp_path):
    """TensorBoard's HPARAMS tab averages the sessions of one group: an earlier run of the
    same overrides, set aside, made one row with the new one, the mean of both runs' metrics
    (a probe's: 1.958 for train/loss 1.898 and 2.019). The nth run in a folder is ``#n``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    for steps in (2, 3, 4):  # (logging.* is no hyperparameter: the same overrides)
        train(tmp_path, *FAST, "trainer.max_steps=2", f"logging.every_n_steps={steps}")
    names = []
    for run_dir in (tmp_path / "previous" / "1", tmp_path / "previous" / "2", tmp_path):
        acc = EventAccumulator(str(event_dir(run_dir)))
        acc.Reload()
        content = acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
        names.append(metadata.parse_session_start_info_plugin_data(content).group_name)
    # (in-process, no Hydra overrides: the folder's name alone, and its path's tag)
    tag = hashlib.sha1(str(tmp_path.resolve()).encode()).hexdigest()[:6]
    assert names == [f"{tmp_path.name} ({tag})", f"{tmp_path.name}#2 ({tag})",
                     f"{tmp_path.name}#3 ({tag})"]  # fmt: skip
    # previous/1 deleted: the run at the top goes after the highest, and the next is #4 (the
    # lowest free number, and a count of the folders, gave two runs #3: a review's)
    shutil.rmtree(tmp_path / "previous" / "1")
    train(tmp_path, *FAST, "trainer.max_steps=2")
    for run_dir, want in ((tmp_path / "previous" / "3", "#3"), (tmp_path, "#4")):
        acc = EventAccumulator(str(event_dir(run_dir)))
        acc.Reload()
        content = acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
        assert metadata.parse_session_start_info_plugin_data(content).group_name == (
            f"{tmp_path.name}{want} ({tag})"
        )


def test_metrics_json_names_its_checkpoint_by_an_absolute_path(tmp_path, monkeypatch) -> None:
    """A run folder given relative to the working directory wrote a relative checkpoint path,
    which named another file from elsewhere and was not followed when the run was set aside
    (a review's): the path is absolute, and follows the run into previous/1."""
    monkeypatch.chdir(tmp_path)
    train(Path("r"), *FAST, "trainer.max_steps=2")
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["checkpoint"] == str(
        tmp_path / "r" / "checkpoints" / "last.pt")  # fmt: skip
    monkeypatch.chdir(tmp_path / "r")
    train(Path("..") / "r", *FAST, "trainer.max_steps=2")
    aside = json.loads((tmp_path / "r" / "previous" / "1" / "metrics.json").read_text())
    assert aside["checkpoint"] == str(tmp_path / "r" / "previous" / "1" / "checkpoints" / "last.pt")


def test_a_run_refused_early_in_a_used_run_dir_leaves_the_earlier_run_as_it_was(tmp_path):
    """A run refused before it starts (an unknown monitor, a bad value) in a folder holding an
    earlier run's outputs leaves them where and as they were: a first version of the set-aside
    moved them, and a later ``resume=auto`` of the earlier run started from scratch (a probe)."""
    named = ["trainer.run_id=x", f"trainer.checkpoint.search_dir={tmp_path}"]
    train(tmp_path, *FAST, *named, "trainer.max_steps=2")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(Exception, match="monitor"):
        train(tmp_path, *FAST, *named, "trainer.max_steps=2", "monitor=val/nothing")
    with pytest.raises(Exception, match="optimizer.lr"):
        train(tmp_path, *FAST, *named, "trainer.max_steps=2", "optimizer.lr=-1")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    metrics = train(tmp_path, *FAST, *named, "trainer.max_steps=4", "trainer.resume=auto")
    assert metrics["step"] == 4
    assert [s for s, _ in read_scalars(tmp_path)["train/loss"]] == [1, 2, 3, 4]
    assert not (tmp_path / "previous").exists()


def test_a_plateau_mode_against_the_monitor_is_refused_before_a_used_run_dir_is_taken(tmp_path):
    """A ReduceLROnPlateau whose mode contradicts the monitor (mode min, its default, on
    val/acc) is refused in ``run()`` before the run takes its folder: ``Trainer.fit`` checks it
    again, but only after an earlier run's outputs there were set aside, and a later
    ``resume=auto`` of that run would have started from scratch."""
    named = ["trainer.run_id=x", f"trainer.checkpoint.search_dir={tmp_path}"]
    train(tmp_path, *FAST, *named, "trainer.max_steps=2")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    plateau = ("~scheduler", "+scheduler._target_=torch.optim.lr_scheduler.ReduceLROnPlateau",
               "+scheduler._partial_=true", "monitor=val/acc")  # fmt: skip
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"scheduler.mode: ReduceLROnPlateau steps on val/acc"):
        train(tmp_path, *FAST, *named, "trainer.max_steps=2", *plateau)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "previous").exists()


# ----------------------------------------------------------------------------- resume=auto


def auto(search: Path, *overrides: str) -> tuple[str, ...]:
    return (*FAST, "trainer.run_id=x", f"trainer.checkpoint.search_dir={search}", *overrides)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # in place: last.pt, a hard link to it, breaks too


def flip_a_bit(path: Path) -> None:
    """One bit of the first tensor's bytes, in place: the file stays a readable zip."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack(
        "<HH", data[info.header_offset + 26 : info.header_offset + 30]
    )
    data[info.header_offset + 30 + name_len + extra_len] ^= 1
    path.write_bytes(bytes(data))


def test_a_bit_flipped_checkpoint_is_refused_and_resume_auto_falls_back(tmp_path, caplog) -> None:
    """``torch.load`` does not check the zip's CRC-32s: a checkpoint with one bit flipped in a
    weight loaded and trained on without a word (a probe). Now it is refused naming the
    damaged record, and ``resume=auto`` continues from the next newest."""
    train(tmp_path / "a", *auto(tmp_path, "trainer.max_steps=4"))
    newest = step_path(tmp_path / "a" / "checkpoints", 4)
    state = load_checkpoint(newest)
    flip_a_bit(newest)
    with pytest.raises(ValueError, match=r"is corrupt: the bytes of .*/data/0 do not match"):
        load_checkpoint(newest)
    assert torch.load(newest, weights_only=True).keys() == state.keys()  # (loads unchecked)
    with caplog.at_level(logging.WARNING):
        metrics = train(
            tmp_path / "b", *auto(tmp_path, "trainer.max_steps=6", "trainer.resume=auto")
        )
    assert metrics["step"] == 6
    assert any("step_000000004.pt is corrupt" in r.getMessage() for r in caplog.records)
    assert "train/loss" in read_scalars(tmp_path / "a")  # continued from step 2 in its own dir


def test_a_checkpoint_saved_without_checksums_loads(tmp_path) -> None:
    """``torch.utils.serialization.config.save.compute_crc32 = False`` (torch's documented
    switch) stores every CRC as 0: the check must not call such a file corrupt."""
    import torch.utils.serialization as serialization

    serialization.config.save.compute_crc32 = False  # (its config object: no monkeypatch)
    try:
        path = checkpoint_module.save_checkpoint(tmp_path / "c.pt", {"w": torch.arange(4.0)})
    finally:
        serialization.config.save.compute_crc32 = True
    with zipfile.ZipFile(path) as archive:
        assert not any(i.CRC for i in archive.infolist())
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(4.0))


def test_resume_auto_skips_a_truncated_newest_checkpoint_and_continues_from_the_next(
    tmp_path, caplog
) -> None:
    search = tmp_path / "outputs"
    first = search / "first"
    train(first, *auto(search, "trainer.checkpoint.keep_last=3", "trainer.max_steps=6"))
    ckpts = first / "checkpoints"
    assert step_files(ckpts) == ["step_000000002.pt", "step_000000004.pt", "step_000000006.pt"]
    truncate(step_path(ckpts, 6))

    caplog.set_level(logging.INFO)
    result = train(search / "second", *auto(search, "trainer.resume=auto", "trainer.max_steps=8"))
    skipped = [r for r in caplog.records if r.getMessage().startswith("resume: skipped")]
    assert len(skipped) == 1 and skipped[0].levelno == logging.WARNING
    assert (
        f"checkpoint {step_path(ckpts, 6)} is not a readable PyTorch checkpoint"
        in skipped[0].getMessage()
    )
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith(f"resuming run x from {step_path(ckpts, 4)} (step 4)") for m in messages
    )
    assert result["status"] == "completed" and result["step"] == 8
    # it continued in the first run's dir: steps 5 and 6 rewritten, the broken file replaced
    assert json.loads((first / "metrics.json").read_text())["step"] == 8
    assert step_files(ckpts) == ["step_000000004.pt", "step_000000006.pt", "step_000000008.pt"]
    assert load_checkpoint(step_path(ckpts, 6))["step"] == 6
    assert load_checkpoint(ckpts / "last.pt")["step"] == 8
    assert [s for s, _ in read_scalars(first)["train/loss"]] == list(range(1, 9))


def test_resume_auto_with_every_checkpoint_corrupt_starts_from_scratch_and_says_so(
    tmp_path, caplog
) -> None:
    search = tmp_path / "outputs"
    first = search / "first"
    train(first, *auto(search, "trainer.max_steps=4"))
    ckpts = first / "checkpoints"
    truncate(step_path(ckpts, 4))
    step_path(ckpts, 2).write_bytes(b"\0" * 100)

    caplog.set_level(logging.INFO)
    second = search / "second"
    result = train(second, *auto(search, "trainer.resume=auto", "trainer.max_steps=2"))
    skipped = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for step in (4, 2):  # newest first
        assert any(str(step_path(ckpts, step)) in m for m in skipped), skipped
    messages = [r.getMessage() for r in caplog.records]
    assert not any(m.startswith("resuming run") for m in messages)
    assert any(
        "no usable checkpoint of run x" in m and "starting from scratch" in m for m in messages
    )
    assert result["step"] == 2 and json.loads((second / "metrics.json").read_text())["step"] == 2
    assert [s for s, _ in read_scalars(second)["train/loss"]] == [1, 2]


def test_resume_auto_without_checkpoints_starts_from_scratch(tmp_path, caplog) -> None:
    search = tmp_path / "outputs"
    search.mkdir()
    caplog.set_level(logging.INFO)
    result = train(search / "run", *auto(search, "trainer.resume=auto", "trainer.max_steps=2"))
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "no usable checkpoint of run x" in m and "starting from scratch" in m for m in messages
    )
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert result["status"] == "completed" and result["step"] == 2


def test_resume_auto_that_finds_none_names_a_checkpoint_it_could_continue(tmp_path, caplog):
    """A run stopped, then started again with ``resume=auto`` and a longer
    ``trainer.max_steps``, is another run (its length is part of its identity) and starts from
    scratch: it said so at INFO, never naming the stopped run's checkpoint (a walkthrough's).
    It now names it, with the keys that differ, in a warning; a run that differs in a
    hyperparameter (a newer one, looked at first) is not named; and the path it gives
    continues the stopped run as an uninterrupted one."""
    search = tmp_path / "outputs"
    base = (*FAST, f"trainer.checkpoint.search_dir={search}", "model.hidden=[16]")
    train(search / "a", *base, "trainer.max_steps=3")
    caplog.set_level(logging.INFO)
    train(search / "lr", *base, "trainer.resume=auto", "optimizer.lr=0.5", "trainer.max_steps=3")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # (a's lr differs)
    caplog.clear()
    train(search / "b", *base, "trainer.resume=auto", "trainer.max_steps=6")
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    stopped = step_path(search / "a" / "checkpoints", 3)
    assert len(warned) == 1 and "starting from scratch" in warned[0], warned
    assert f"{stopped} (step 3)" in warned[0] and "(trainer.max_steps: 3 -> 6)" in warned[0]
    assert f"trainer.resume={stopped} continues it" in warned[0]
    train(search / "c", *base, f"trainer.resume={stopped}", "trainer.max_steps=6")
    continued, whole = final_params(search / "a"), final_params(search / "b")
    assert all(torch.equal(continued[k], whole[k]) for k in whole)
    # started again in the stopped run's own folder, which sets its outputs aside: not named
    # (the path would be gone)
    alone = tmp_path / "alone"
    here = (*FAST, f"trainer.checkpoint.search_dir={alone}", "model.hidden=[16]")
    train(alone / "run", *here, "trainer.max_steps=2")
    caplog.clear()
    train(alone / "run", *here, "trainer.resume=auto", "trainer.max_steps=4")
    assert not [r for r in caplog.records if "continues it" in r.getMessage()]
    assert (alone / "run" / "previous" / "1" / "checkpoints" / "step_000000002.pt").is_file()


def test_resume_auto_names_no_checkpoint_a_resume_would_refuse_or_not_continue(
    tmp_path, caplog, monkeypatch
) -> None:
    """The hint names only what ``trainer.resume=<path>`` continues (a review's): not a run
    as long as this one or longer (nothing left to train: following it trained 0 steps and
    re-marked the finished run), not a cosine schedule of the checkpoint run's length when the
    length changes (a longer resume is refused), not in a multirun (its jobs differ in what it
    sweeps); a file of another run that holds anything at all never stops a start."""
    caplog.set_level(logging.INFO)

    def run(search: str, folder: str, *overrides: str) -> list[str]:
        caplog.clear()
        train(tmp_path / search / folder, *FAST, "model.hidden=[16]",
              f"trainer.checkpoint.search_dir={tmp_path / search}", *overrides)  # fmt: skip
        return [r.getMessage() for r in caplog.records if "continues it" in r.getMessage()]

    run("done", "six", "trainer.max_steps=6")
    assert run("done", "three", "trainer.resume=auto", "trainer.max_steps=3") == []
    run("same", "six", "trainer.max_steps=6")
    assert run("same", "logged", "trainer.resume=auto", "trainer.max_steps=6",
               "logging.every_n_steps=2") == []  # fmt: skip
    run("cosine", "four", "scheduler=cosine", "trainer.max_steps=4")
    assert run("cosine", "eight", "scheduler=cosine", "trainer.resume=auto",
               "trainer.max_steps=8") == []  # fmt: skip
    # shorter is accepted (the schedule stops short, with a warning): a run of 6 steps
    # stopped at step 2, started again for 4, is named
    with pytest.raises(SystemExit):
        train(tmp_path / "stopped" / "six", *FAST, "model.hidden=[16]", "scheduler=cosine",
              f"trainer.checkpoint.search_dir={tmp_path / 'stopped'}", "trainer.max_steps=6",
              callbacks=[StopAt(2)])  # fmt: skip
    (said,) = run("stopped", "four", "scheduler=cosine", "trainer.resume=auto",
                  "trainer.max_steps=4")  # fmt: skip
    assert "step_000000002.pt (step 2)" in said and "(trainer.max_steps: 6 -> 4)" in said, said
    # a max_steps within the schedule's length caps the run, whatever its epochs (a review:
    # a limit set where there was none counted as longer)
    epochs = ("scheduler=cosine", "data.train_subset=64", "data.batch_size=32",
              "trainer.max_epochs=3")  # fmt: skip
    with pytest.raises(SystemExit):
        train(tmp_path / "capped" / "six", *FAST, "model.hidden=[16]", *epochs,
              f"trainer.checkpoint.search_dir={tmp_path / 'capped'}",
              callbacks=[StopAt(1)])  # fmt: skip
    (said,) = run("capped", "three", *epochs, "trainer.max_steps=3", "trainer.resume=auto")
    assert "(step 1)" in said and "(trainer.max_steps: -1 -> 3)" in said, said
    # the default max_steps=-1 is no limit: a longer max_epochs is named (a review: -1 left
    # every checkpoint out, the case the hint is for)
    run("epochs", "one", "data.train_subset=64", "data.batch_size=32", "trainer.max_epochs=1",
        "trainer.max_steps=-1")  # fmt: skip
    (said,) = run("epochs", "two", "data.train_subset=64", "data.batch_size=32",
                  "trainer.max_epochs=2", "trainer.max_steps=-1",
                  "trainer.resume=auto")  # fmt: skip
    assert "(step 2)" in said and "(trainer.max_epochs: 1 -> 2)" in said, said
    run("sweep", "two", "trainer.max_steps=2")
    monkeypatch.setattr(importlib.import_module("trainer.run"), "in_multirun", lambda: True)
    assert run("sweep", "four", "trainer.resume=auto", "trainer.max_steps=4") == []
    monkeypatch.undo()
    # a file of another run with a config no run has, newer than one that fits
    run("odd", "two", "trainer.max_steps=2")
    odd = tmp_path / "odd" / "other" / "checkpoints"
    odd.mkdir(parents=True)
    (odd / "run.json").write_text(json.dumps({"run_id": "other"}))
    torch.save({"config": {"trainer": None}, "tally_ranks": 3, "step": 1}, step_path(odd, 1))
    (said,) = run("odd", "four", "trainer.resume=auto", "trainer.max_steps=4")
    two = step_path(tmp_path / "odd" / "two" / "checkpoints", 2)
    assert f"{two} (step 2)" in said and "(trainer.max_steps: 2 -> 4)" in said, said


def test_a_hinted_path_is_quoted_as_hydra_reads_it() -> None:
    """A folder named by ``hydra.job.override_dirname`` holds ``=``, ``,`` and brackets,
    which Hydra's override grammar reads, and Hydra takes no letter outside ASCII unquoted:
    the hinted ``trainer.resume=<path>`` failed to parse when pasted (reviews'). Quoted for
    Hydra, then for the shell, it reaches Hydra as the path, whatever it holds."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from trainer.run import _override

    parse = OverridesParser.create().parse_overrides
    for path in ("/o/a/checkpoints/step_000000003.pt", "/o/optimizer.lr=0.1,seed=[1,2]/s.pt",
                 "/o/it's here/s.pt", "/o/a\\b=c/s.pt", "/o/x\\'y=/s.pt", "/o/end=\\",
                 "/o/café/s.pt", "/o/日本/s.pt", '/o/"$x`!/s.pt'):  # fmt: skip
        said = _override("trainer.resume", path)
        (argument,) = shlex.split(said)  # as a shell passes it (it took the inner quotes away)
        (override,) = parse([argument])
        assert override.value() == path, said
    assert _override("trainer.resume", "/o/a/s.pt") == "trainer.resume=/o/a/s.pt"


def test_resume_auto_in_a_folder_it_does_not_search_says_so(tmp_path, caplog) -> None:
    """A run written outside trainer.checkpoint.search_dir (hydra.run.dir elsewhere) started
    from scratch on every resume=auto with an info line only (a probe's finding): said, with
    the key to set."""
    search = tmp_path / "outputs"
    search.mkdir()
    caplog.set_level(logging.INFO)
    train(tmp_path / "elsewhere", *auto(search, "trainer.resume=auto", "trainer.max_steps=1"))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "is outside trainer.checkpoint.search_dir=" in warned[0]


def test_resume_auto_past_a_corrupt_newer_checkpoint_keeps_the_new_ones(tmp_path) -> None:
    search = tmp_path / "outputs"
    first = search / "first"
    train(first, *auto(search, "trainer.checkpoint.keep_last=2", "trainer.max_steps=6"))
    ckpts = first / "checkpoints"
    truncate(step_path(ckpts, 6))
    overrides = ("trainer.checkpoint.keep_last=1", "trainer.resume=auto", "trainer.max_steps=5")
    result = train(search / "second", *auto(search, *overrides))
    assert result["step"] == 5
    assert load_checkpoint(ckpts / "last.pt")["step"] == 5
    assert step_files(ckpts) == ["step_000000005.pt"]


def test_resume_auto_in_a_run_folder_continues_its_own_checkpoints(tmp_path, caplog) -> None:
    """A run stopped in a fixed folder and started again there with ``resume=auto`` continues
    its own checkpoint, not a later one of the same run id (the same config) in another
    folder: before, it resumed another folder's finished run and set its own checkpoints
    aside, where resume=auto no longer found them (a probe's: what a stopped run's message,
    "continue with trainer.resume=auto", led to). A warning names the later checkpoint."""
    search = tmp_path / "outputs"
    done, mine = search / "done", search / "mine"
    train(done, *auto(search, "trainer.max_steps=6"))
    train(mine, *auto(search, "trainer.max_steps=3"))  # (as if stopped at step 3)
    result = train(mine, *auto(search, "trainer.resume=auto", "trainer.max_steps=5"))
    assert result["step"] == 5 and load_checkpoint(mine / "checkpoints" / "last.pt")["step"] == 5
    assert not (mine / "previous").exists() and not (mine / "continued.json").exists()
    assert load_checkpoint(done / "checkpoints" / "last.pt")["step"] == 6  # left alone
    # the same steps as a run of 5 from the start (exact resume), none of done's
    train(search / "straight", *FAST, "trainer.max_steps=5", "trainer.run_id=y",
          f"trainer.checkpoint.search_dir={search}")  # fmt: skip
    a, b = final_params(mine), final_params(search / "straight")
    assert all(torch.equal(a[k], b[k]) for k in a)
    warned = [r.getMessage() for r in caplog.records if "holds a later one" in r.getMessage()]
    assert len(warned) == 1 and "step_000000006.pt (step 6, not loaded" in warned[0], warned
    assert "step_000000003.pt (step 3)" in warned[0]
    # a folder of its own with no checkpoint still finds the newest anywhere
    assert checkpoint_module.find_checkpoints(search, "x", own=tmp_path / "new")[0] == (
        done / "checkpoints" / "step_000000006.pt"
    )


def test_resume_auto_says_nothing_of_another_folders_checkpoint_of_the_same_step(
    tmp_path, caplog
) -> None:
    """The warning that another folder "holds a later one" is for a later step only: another
    folder whose newest checkpoint of the run is the same step as the one continued here holds
    nothing newer to resume, and warning of it would send one to a copy of the same state."""
    search = tmp_path / "outputs"
    other, mine = search / "other", search / "mine"
    train(other, *auto(search, "trainer.max_steps=2"))
    train(mine, *auto(search, "trainer.max_steps=2"))
    caplog.set_level(logging.INFO)
    result = train(mine, *auto(search, "trainer.resume=auto", "trainer.max_steps=3"))
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("resuming run x from") and "(step 2)" in m for m in messages)
    assert str(mine / "checkpoints") in next(m for m in messages if m.startswith("resuming"))
    assert not [m for m in messages if "holds a later one" in m], messages
    assert result["step"] == 3


def test_resume_auto_names_a_relative_search_dir_with_the_folder_it_resolved_to(
    tmp_path, monkeypatch, caplog
) -> None:
    """A relative ``trainer.checkpoint.search_dir`` is looked up from the folder the run was
    launched in: "no usable checkpoint ... under outputs" alone hid which ``outputs`` was
    searched (a probe launched elsewhere missed it), so the line names the absolute folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    caplog.set_level(logging.INFO)
    overrides = (*FAST, "trainer.run_id=x", "trainer.checkpoint.search_dir=outputs",
                 "trainer.resume=auto", "trainer.max_steps=1")  # fmt: skip
    train(tmp_path / "outputs" / "run", *overrides)
    said = [r.getMessage() for r in caplog.records if "no usable checkpoint" in r.getMessage()]
    where = (tmp_path / "outputs").resolve()
    assert len(said) == 1 and f"under outputs ({where}); starting from scratch" in said[0], said


# ----------------------------------------------------------------------------- keep_last


def test_keep_last_leaves_the_newest_step_files_and_last_pt_of_the_final_step(tmp_path) -> None:
    train(tmp_path, *FAST, "trainer.checkpoint.keep_last=2", "trainer.max_steps=10")
    ckpts = tmp_path / "checkpoints"  # exactly these: no temp file either
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "last.pt", "run.json", "step_000000008.pt", "step_000000010.pt",
    ]  # fmt: skip
    last = load_checkpoint(ckpts / "last.pt")
    assert last["step"] == 10
    assert torch.equal(
        last["model"]["net.1.weight"],
        load_checkpoint(step_path(ckpts, 10))["model"]["net.1.weight"],
    )
    assert load_checkpoint(step_path(ckpts, 8))["step"] == 8


# ----------------------------------------------------------------------------- atomic writes


def fail_nth_save(monkeypatch, n: int, error: BaseException) -> list[int]:
    """``torch.save`` (as trainer.checkpoint calls it) writes some bytes, then raises ``error``
    on its ``n``-th call to a file; returns the steps it was called for. (Saves to memory, the
    check of a callback's state, are no disk writes: not counted, never failed.)"""
    real, steps = torch.save, []

    def save(obj, f, *args, **kwargs):
        if isinstance(f, io.BytesIO):
            return real(obj, f, *args, **kwargs)
        steps.append(obj.get("step") if isinstance(obj, dict) else None)
        if len(steps) == n:
            f.write(b"PK\x03\x04" + b"\0" * 1000)  # the start of a zip, then the disk is full
            raise error
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    return steps


def test_disk_full_on_a_periodic_checkpoint_is_reported_and_training_goes_on(
    tmp_path, monkeypatch
) -> None:
    steps = fail_nth_save(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device"))
    result = train(tmp_path, *FAST, "trainer.checkpoint.keep_last=3", "trainer.max_steps=6")
    assert steps == [2, 4, 6]
    assert result["status"] == "completed" and result["step"] == 6
    ckpts = tmp_path / "checkpoints"
    assert step_files(ckpts) == ["step_000000002.pt", "step_000000006.pt"]  # no step 4
    assert_no_temp_files(ckpts)
    assert load_checkpoint(step_path(ckpts, 2))["step"] == 2
    assert load_checkpoint(ckpts / "last.pt")["step"] == 6
    failures = json.loads((tmp_path / "metrics.json").read_text())["checkpoint_failures"]
    assert failures == result["checkpoint_failures"] and len(failures) == 1
    assert failures[0].startswith("step 4: checkpoint not written")
    assert "No space left on device" in failures[0] and str(step_path(ckpts, 2)) in failures[0]


@pytest.mark.parametrize("error", [RuntimeError("crash mid-write"), KeyboardInterrupt()])
def test_a_crash_while_writing_the_final_checkpoint_leaves_the_previous_one_intact(
    tmp_path, monkeypatch, error: BaseException
) -> None:
    steps = fail_nth_save(monkeypatch, 3, error)
    with pytest.raises(type(error)):
        train(tmp_path, *FAST, "trainer.max_steps=5")
    assert steps == [2, 4, 5]
    ckpts = tmp_path / "checkpoints"
    # no step 5, no last.pt, no temp file
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "run.json", "step_000000002.pt", "step_000000004.pt",
    ]  # fmt: skip
    assert load_checkpoint(step_path(ckpts, 4))["step"] == 4
    failed = json.loads((tmp_path / "metrics.json").read_text())
    assert failed["status"] == ("failed" if isinstance(error, Exception) else "interrupted")
    assert failed["step"] == 5


# ----------------------------------------------------------------------------- before step 1


def test_a_run_dir_under_a_regular_file_is_refused_naming_it(tmp_path) -> None:
    (tmp_path / "afile").write_text("not a directory")
    run_dir = tmp_path / "afile" / "run"
    with pytest.raises(OSError) as info:
        train(run_dir, *FAST, "trainer.max_steps=2")
    assert f"the run dir {run_dir} cannot be written" in str(info.value)
    assert info.value.errno == errno.ENOTDIR
    assert_nothing_trained(tmp_path)


def _uncreatable_run_dir(path: Path):
    (path / "afile").write_text("not a directory")
    run_dir = path / "afile" / "run"
    return cli("trainer.max_steps=2", f"hydra.run.dir={run_dir}"), run_dir, path


@in_background(_uncreatable_run_dir)
def test_cli_exits_nonzero_naming_a_run_dir_that_cannot_be_created(background) -> None:
    proc, run_dir, tmp_path = background
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert str(run_dir) in out and "Not a directory" in out
    assert_nothing_trained(tmp_path)


def test_too_little_free_space_stops_the_run_before_the_first_step(tmp_path, monkeypatch) -> None:
    seen = []

    def disk_usage(path):
        seen.append(Path(path))
        return DiskUsage(total=2**30, used=2**30 - 4096, free=4096)

    monkeypatch.setattr(run_module.shutil, "disk_usage", disk_usage)
    with pytest.raises(OSError) as info:
        train(tmp_path, *FAST, "trainer.max_steps=4")
    ckpts = tmp_path / "checkpoints"
    assert seen == [tmp_path]  # (checked before checkpoints/ is made: its disk, the run dir's)
    assert not ckpts.exists()
    assert info.value.errno == errno.ENOSPC
    assert f"{ckpts} has 0.0 MiB free" in str(info.value)
    assert_nothing_trained(tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["step"] == 0


def test_room_for_fewer_than_keep_last_checkpoints_warns_and_trains(
    tmp_path, monkeypatch, caplog
) -> None:
    free = 3 * 2**20  # one checkpoint of the mlp (about 1.6 MiB with slack) fits, 4 do not
    usage = DiskUsage(total=2**30, used=2**30 - free, free=free)
    monkeypatch.setattr(run_module.shutil, "disk_usage", lambda path: usage)
    caplog.set_level(logging.WARNING)
    result = train(tmp_path, *FAST, "trainer.max_steps=2")
    assert result["status"] == "completed"
    assert any(
        "3.0 MiB free" in r.getMessage() and "keep_last + 1 = 4" in r.getMessage()
        for r in caplog.records
    )


# ----------------------------------------------------------------------------- safe loads


@pytest.mark.parametrize(
    ("payload", "named"),
    [(_OddDict(w=torch.zeros(2)), "_OddDict"), ({"model": np.arange(3)}, "numpy")],
    ids=["ordered_dict_subclass", "numpy_array"],
)
def test_load_checkpoint_refuses_what_weights_only_does_not_allow(
    tmp_path, payload, named: str
) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(payload, path)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(f"checkpoint {path} was {REFUSED}")
    assert named in str(info.value)


def test_load_checkpoint_takes_a_plain_ordered_dict_of_tensors(tmp_path) -> None:
    """The contrast: a state dict is an OrderedDict, which weights_only allows."""
    torch.save(collections.OrderedDict(w=torch.ones(2)), tmp_path / "ok.pt")
    assert torch.equal(load_checkpoint(tmp_path / "ok.pt")["w"], torch.ones(2))


def test_the_run_dir_check_leaves_another_processs_probe_alone(tmp_path) -> None:
    """The ranks of a data-parallel run sharing one run dir check it at once: with one probe
    name, a rank's unlink removed the other's probe and that rank was refused ("cannot be
    written"; a probe's 2 processes x 2,000 checks failed 211 times). Each process writes a
    probe of its own: one already there (another rank's, mid-check) is left as it is, and
    none of the checker's stays."""
    from trainer.run import check_writable

    other = tmp_path / ".write_test"
    other.write_bytes(b"another rank's")
    check_writable(tmp_path)
    assert other.read_bytes() == b"another rank's"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".write_test"]


def test_a_callback_state_is_checked_as_a_safe_load_would_take_it() -> None:
    """NumPy values become the same values as Python numbers and tensors (0-d arrays stay
    0-d, big-endian and non-contiguous arrays keep their values); what a safe load refuses
    (object, string and masked arrays, a tensor subclass, an object of one's own) is named
    with the callback, when written, not when resumed."""
    import numpy as np

    from trainer.checkpoint import checkpointable

    state = {"best": np.float32(0.25), "n": np.int64(7), "zero_d": np.array(1.5),
             "be": np.arange(6, dtype=">i4").reshape(2, 3).T,
             "nested": collections.OrderedDict(t=(np.bool_(True), torch.ones(2)))}  # fmt: skip
    got = checkpointable(state, "Mine")
    assert got["best"] == 0.25 and type(got["best"]) is float and got["n"] == 7
    assert got["zero_d"].shape == () and got["zero_d"].item() == 1.5
    assert got["be"].tolist() == [[0, 3], [1, 4], [2, 5]]
    assert got["nested"]["t"][0] is True and torch.equal(got["nested"]["t"][1], torch.ones(2))
    buffer = io.BytesIO()
    torch.save(got, buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)  # (what the check said)

    class Sub(torch.Tensor):
        pass

    class Own:
        pass

    refused = [np.array(["a"]), np.array([Own()], dtype=object),
               np.ma.masked_array([1, 2], mask=[0, 1]), torch.ones(2).as_subclass(Sub),
               Own()]  # fmt: skip
    for value in refused:
        with pytest.raises(ValueError, match=r"callback Mine: its state_dict\(\) holds what"):
            checkpointable({"v": value}, "Mine")


def test_the_rng_states_come_back_from_a_checkpoint_each_generator(tmp_path) -> None:
    """Python's, NumPy's (its cached Gaussian included) and torch's generators, saved with a
    checkpoint and restored from a safe load, draw what they drew after the save (a mutation
    leaving NumPy's state out of the restore went unseen: the resume tests' models draw from
    torch alone)."""
    import random

    from trainer.checkpoint import rng_state, save_checkpoint, set_rng_state

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # (one of a pair: NumPy caches the other)
    save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})

    def draws():
        return (random.random(), np.random.standard_normal(), np.random.rand(),
                torch.rand(3).tolist())  # fmt: skip

    expected = draws()
    draws()  # (every generator moved on)
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert draws() == expected


@pytest.mark.parametrize("key", [
    "trainer.resume=auto", "trainer.run_id=mine", "trainer.checkpoint.every_n_steps=7",
    "trainer.checkpoint.keep_last=9", "logging.progress=false",
    "logging.progress_every_n_steps=3", "trainer.find_unused_parameters=true",
])  # fmt: skip
def test_keys_that_do_not_change_what_is_computed_keep_the_run_id(key) -> None:
    """A run's derived id leaves out the keys that do not change what it computes, so that
    ``resume=auto`` finds a run started with another of them; each one checked through the
    composed config (a mutation putting one of them back went unseen), and a key that does
    change it (the learning rate) does change the id."""
    from conftest import make_cfg

    from trainer.checkpoint import derive_run_id
    from trainer.run import identity_config

    def run_id(*overrides: str) -> str:
        return derive_run_id(identity_config(make_cfg(*overrides)))

    assert run_id(key) == run_id()
    assert run_id("optimizer.lr=0.5") != run_id()


def test_a_run_given_its_own_id_never_resumes_another_runs_checkpoint(tmp_path) -> None:
    """``trainer.run_id`` given by hand is the run's whole identity for ``resume=auto``: the
    id derived from its config as before 2026-12-05 (the legacy one) is looked for only where
    no id is given. A run ``mine`` of the same config as a finished run ``a`` in the search
    dir starts afresh in its own folder, under its own id: taking ``a``'s checkpoint by the
    legacy id (``and`` for ``or``, a mutation the suite missed) continued ``a`` and named the
    run after it."""
    search = tmp_path / "outputs"
    common = ("trainer.max_steps=2", f"trainer.checkpoint.search_dir={search}")
    train(search / "a", *common)
    result = train(search / "b", *common, "trainer.run_id=mine", "trainer.resume=auto")
    assert result["run_id"] == "mine" and result["step"] == 2
    assert not (search / "b" / "continued.json").exists()
    assert load_checkpoint(search / "b" / "checkpoints" / "last.pt")["run_id"] == "mine"
    assert load_checkpoint(search / "a" / "checkpoints" / "last.pt")["step"] == 2  # left alone
    assert json.loads((search / "b" / "metrics.json").read_text())["run_id"] == "mine"


def test_free_space_is_checked_at_one_checkpoint_and_at_keep_last_plus_one(
    tmp_path, monkeypatch, caplog
) -> None:
    """``check_free_space`` at its exact boundaries. One checkpoint is taken as ``one = 3 ×
    parameter bytes + buffer bytes + 1 MiB``: a Linear(3, 2) and a BatchNorm1d(2) have 12
    float32 parameters (48 bytes) and buffers of 2 + 2 float32 and one int64 (24 bytes), so
    ``one = 144 + 24 + 2**20``. ``one - 1`` bytes free is refused (ENOSPC), ``one`` is not;
    with keep_last=3, ``4 × one - 1`` warns naming keep_last + 1 = 4, ``4 × one`` says nothing.
    A factor of 2 for the parameters, ``<=`` for ``<`` or ``keep_last`` for ``keep_last + 1``
    (mutations the suite missed) each move a boundary by at least a byte."""
    from types import SimpleNamespace

    from torch import nn

    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    one = 3 * 48 + 24 + 2**20
    free = [0]
    monkeypatch.setattr(run_module.shutil, "disk_usage",
                        lambda path: DiskUsage(total=2**40, used=0, free=free[0]))  # fmt: skip
    trainer = SimpleNamespace(model=model)
    caplog.set_level(logging.WARNING, logger="trainer.run")

    def check(n: int) -> list[str]:
        free[0] = n
        caplog.clear()
        run_module.check_free_space(trainer, tmp_path, 3)
        return [r.getMessage() for r in caplog.records]

    free[0] = one - 1
    with pytest.raises(OSError) as info:
        run_module.check_free_space(trainer, tmp_path, 3)
    assert info.value.errno == errno.ENOSPC
    said = check(one)  # (one fits: warned of the other three)
    assert len(said) == 1 and "keep_last + 1 = 4" in said[0]
    said = check(4 * one - 1)
    assert len(said) == 1 and "keep_last + 1 = 4 checkpoints" in said[0]
    assert check(4 * one) == []


def test_a_run_dir_whose_parents_do_not_exist_is_created(tmp_path) -> None:
    """``run(cfg, run_dir=...)`` with a folder several levels below any that exists creates
    them all (without ``parents=True``, a mutation the suite missed, it refused the run dir)."""
    run_dir = tmp_path / "not" / "yet" / "there"
    result = train(run_dir, "trainer.max_steps=1")
    assert result["status"] == "completed"
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 1


# ----------------------------------------------------------------------------- mutation round


def test_each_earlier_run_in_a_used_run_dir_gets_a_folder_of_its_own(tmp_path) -> None:
    """Four runs in one folder: the first three are set aside in ``previous/1``, ``/2`` and
    ``/3``, each whole and its own. The next free number is searched for, not taken as the one
    after ``1`` (an ``if`` for the ``while``, a mutation the suite missed, failed the fourth run
    on ``previous/2`` already there)."""
    for steps in (1, 2, 3, 4):
        train(tmp_path, *FAST, f"trainer.max_steps={steps}")
    for n in (1, 2, 3):
        aside = tmp_path / "previous" / str(n)
        assert json.loads((aside / "metrics.json").read_text())["step"] == n
        assert [s for s, _ in read_scalars(aside)["train/loss"]] == list(range(1, n + 1))
        assert load_checkpoint(aside / "checkpoints" / "last.pt")["step"] == n
    assert sorted(p.name for p in (tmp_path / "previous").iterdir()) == ["1", "2", "3"]
    assert json.loads((tmp_path / "metrics.json").read_text())["step"] == 4


def test_find_checkpoints_prefers_the_first_id_over_a_later_step_of_the_second(tmp_path) -> None:
    """Of several run ids (a run's own and the one its config had before 2026-12-05), the
    first's checkpoints come first even where the second's are of later steps: its own id's
    step 2 before the legacy id's step 5 (``ids.index`` for ``-ids.index``, a mutation the suite
    missed, put the legacy id's first)."""
    from trainer.checkpoint import find_checkpoints, write_run_marker

    for name, run_id, steps in (("legacy", "old", (4, 5)), ("current", "new", (1, 2))):
        ckpts = tmp_path / name / "checkpoints"
        write_run_marker(ckpts, run_id, tmp_path / name)
        for step in steps:
            step_path(ckpts, step).write_bytes(b"")  # (found by name: not loaded here)
    found = find_checkpoints(tmp_path, ("new", "old"))
    assert [(p.parent.parent.name, checkpoint_module.step_of(p)) for p in found] == [
        ("current", 2), ("current", 1), ("legacy", 5), ("legacy", 4),
    ]  # fmt: skip
    assert [checkpoint_module.step_of(p) for p in find_checkpoints(tmp_path, ("old", "new"))] == [
        5, 4, 2, 1,
    ]  # fmt: skip


@pytest.mark.parametrize("layout", [0, 2])
def test_a_checkpoint_of_another_layout_version_is_refused_naming_it(tmp_path, layout) -> None:
    """A training checkpoint whose ``format`` is not this trainer's is refused naming both
    versions, an older one as a newer one (``>`` for ``!=``, a mutation the suite missed, took
    an older layout as this one)."""
    from trainer.checkpoint import FORMAT, REQUIRED, load_training_checkpoint, save_checkpoint

    state = {key: 0 for key in REQUIRED} | {"format": layout, "run_id": "x"}
    path = save_checkpoint(tmp_path / "old.pt", state)
    with pytest.raises(ValueError, match=rf"{path} has layout version {layout}, not {FORMAT}$"):
        load_training_checkpoint(path)
    state["format"] = FORMAT
    assert load_training_checkpoint(save_checkpoint(path, state))["format"] == FORMAT


def test_a_failed_periodic_checkpoint_with_none_before_it_says_none_is_kept(
    tmp_path, monkeypatch
) -> None:
    """A periodic checkpoint that cannot be written before any was says that no checkpoint is
    kept (it named none as "the previous one" otherwise, and a mutation of the words went
    unseen); the run goes on and its final one is written."""
    steps = fail_nth_save(monkeypatch, 1, OSError(errno.ENOSPC, "No space left on device"))
    result = train(tmp_path, *FAST, "trainer.max_steps=3")
    assert steps == [2, 3] and result["status"] == "completed"
    assert result["checkpoint_failures"] == [
        "step 2: checkpoint not written ([Errno 28] No space left on device); none is kept"
    ]
    assert step_files(tmp_path / "checkpoints") == ["step_000000003.pt"]


def test_rank_rng_state_takes_each_ranks_own_only_where_as_many_ranks_resume() -> None:
    """A checkpoint with every rank's RNG states gives each rank its own where the same number
    of processes resumes it, and the writer's (``rng``) otherwise, or where it has no per-rank
    states (one process, an older checkpoint)."""
    from trainer.checkpoint import rank_rng_state

    state = {"rng": "writer's", "rng_ranks": ["rank 0's", "rank 1's"]}
    assert [rank_rng_state(state, r, 2) for r in (0, 1)] == ["rank 0's", "rank 1's"]
    assert [rank_rng_state(state, r, 3) for r in (0, 1, 2)] == ["writer's"] * 3
    assert rank_rng_state(state, 0, 1) == "writer's"
    for single in ({"rng": "writer's"}, {"rng": "writer's", "rng_ranks": []}):
        assert rank_rng_state(single, 0, 1) == rank_rng_state(single, 1, 2) == "writer's"


def test_load_checkpoint_refuses_a_folder_saying_it_is_one(tmp_path) -> None:
    """A folder given as the checkpoint (a run's ``checkpoints/``) is named as a folder, not
    as a file that does not exist."""
    with pytest.raises(IsADirectoryError, match=rf"checkpoint {tmp_path} is a folder; give a "):
        load_checkpoint(tmp_path)
    # a run dir or its checkpoints/ given for the run's latest: named (a stopped run's newest
    # step_*.pt, which has no last.pt); and the CLI's one line, no traceback
    from trainer.sweep import own_refusal

    (tmp_path / "checkpoints").mkdir()
    for name in ("step_000000002.pt", "step_000000010.pt", "last.pt"):
        (tmp_path / "checkpoints" / name).write_bytes(b"")
        for given in (tmp_path, tmp_path / "checkpoints"):
            with pytest.raises(IsADirectoryError) as e:
                load_checkpoint(given)
            want = name  # (the newest so far: last.pt, else the highest step)
            assert f"(.pt): {tmp_path / 'checkpoints' / want}? (trainer.resume=auto" in str(e.value)
            assert own_refusal(e.value)


def test_a_stale_last_pt_link_is_replaced_and_last_pt_is_a_hard_link(tmp_path) -> None:
    """``last.pt`` is the final step's file under a second name (a hard link, swapped in
    through ``.last.pt.link``), also where a crashed run left a ``.last.pt.link`` behind: that
    one is removed first (without it, the link failed, a copy was written instead and the
    stale file stayed: a mutation the suite missed)."""

    class LeavesALink(Callback):
        def on_train_step_end(self, trainer, out) -> None:
            if trainer.global_step == 1:  # (as a run that crashed mid-swap would)
                (tmp_path / "checkpoints" / ".last.pt.link").write_bytes(b"stale")

    train(tmp_path, *FAST, "trainer.max_steps=3", callbacks=[LeavesALink()])
    ckpts = tmp_path / "checkpoints"
    assert_no_temp_files(ckpts)
    last, step3 = (ckpts / "last.pt").stat(), step_path(ckpts, 3).stat()
    assert (last.st_ino, last.st_dev) == (step3.st_ino, step3.st_dev) and last.st_nlink == 2


def test_numpy_values_in_a_callbacks_state_are_warned_of_once(monkeypatch, caplog) -> None:
    """The warning that a callback's state holds NumPy values comes once per callback class,
    not at every checkpoint (each one converts them again)."""
    from trainer.checkpoint import checkpointable

    monkeypatch.setattr(checkpoint_module, "_WARNED_NUMPY", set())
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        for best in (0.5, 0.25, 0.125):
            assert checkpointable({"best": np.float64(best)}, "Mine") == {"best": best}
        checkpointable({"best": np.float64(1.0)}, "Other")
    said = [r.getMessage() for r in caplog.records if "holds NumPy values" in r.getMessage()]
    assert [m.split(":")[0] for m in said] == ["callback Mine", "callback Other"]


def test_a_numpy_bool_array_in_a_callbacks_state_becomes_a_bool_tensor() -> None:
    """A NumPy bool array (a mask of classes seen) is kept as a torch.bool tensor of the same
    values, as the numeric kinds are: it is no reason to refuse the state."""
    from trainer.checkpoint import checkpointable

    got = checkpointable({"seen": np.array([True, False, True])}, "Masks")
    assert got["seen"].dtype == torch.bool and got["seen"].tolist() == [True, False, True]


def test_a_logger_flush_that_fails_before_a_checkpoint_leaves_that_step_unwritten(tmp_path):
    """Everything logged up to a checkpoint's step is on disk before the checkpoint is: where
    flushing the events fails (I/O error), no checkpoint of that step is written (a resume
    from it would have lost events), the failure is reported naming it, and training goes on
    (without the raise, a mutation the suite missed, the checkpoint was written anyway)."""
    import sys

    class FlushFailsAtStep2(Callback):
        def on_fit_start(self, trainer) -> None:
            flush = trainer.logger.flush

            def failing() -> None:
                caller = sys._getframe(1).f_code
                if trainer.global_step == 2 and caller.co_filename == checkpoint_module.__file__:
                    raise OSError(errno.EIO, "Input/output error (events)")
                flush()

            trainer.logger.flush = failing

    result = train(tmp_path, *FAST, "trainer.max_steps=5", "trainer.checkpoint.keep_last=5",
                   callbacks=[FlushFailsAtStep2()])  # fmt: skip
    assert result["status"] == "completed" and result["step"] == 5
    assert step_files(tmp_path / "checkpoints") == ["step_000000004.pt", "step_000000005.pt"]
    assert result["checkpoint_failures"] == [
        "step 2: checkpoint not written ([Errno 5] Input/output error (events)); none is kept"
    ]


def test_resume_auto_in_its_own_folder_outside_the_search_dir_continues_it(tmp_path) -> None:
    """A run written outside trainer.checkpoint.search_dir and started again in the same folder
    with ``resume=auto`` continues its own checkpoints (the folder's marker is read beside the
    search dir's: without it, a mutation the suite missed, the run started afresh and set its
    own outputs aside): no ``previous/``, each step logged once, and the same weights as a run
    that was never stopped."""
    search, mine = tmp_path / "outputs", tmp_path / "elsewhere"
    search.mkdir()
    train(mine, *auto(search, "trainer.max_steps=2"))
    result = train(mine, *auto(search, "trainer.resume=auto", "trainer.max_steps=4"))
    assert result["step"] == 4 and not (mine / "previous").exists()
    assert [s for s, _ in read_scalars(mine)["train/loss"]] == [1, 2, 3, 4]
    train(tmp_path / "straight", *auto(search, "trainer.max_steps=4"))
    a, b = final_params(mine), final_params(tmp_path / "straight")
    assert all(torch.equal(a[k], b[k]) for k in a)
