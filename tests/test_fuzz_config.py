"""Bad overrides through the real entry point: each one is refused before the first step.

Every case runs ``scripts/train.py`` as ``python scripts/train.py`` does (``runpy`` with
``__name__ == "__main__"``, so Hydra finds ``configs/`` relative to the script and exits 1 on an
error), but in this process: ~0.3 s a case instead of ~4 s for a fresh interpreter. A few of
them also run in a real subprocess, to prove the two paths print the same error and exit alike.

A case passes when the run exits non-zero, its error names the key, group or file at fault,
and nothing was trained: no checkpoint, no ``train/loss`` scalar, and a ``metrics.json`` (if
any) that says ``failed`` at no step.
"""

from __future__ import annotations

import json
import logging
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, in_background
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from trainer.logger import event_dir

SCRIPT = ROOT / "scripts" / "train.py"

# Before each case's own overrides, so a case that sets one of these keys wins. A case that
# wrongly trains stops after two steps, and logs train/loss from its first.
BASE = ["trainer.device=cpu", "trainer.max_steps=2", "logging.every_n_steps=1",
        "logging.progress=false"]  # fmt: skip

# digits' training split: 1,797 images less the round(0.2 * 1,797) of data.val_fraction=0.2
DIGITS_TRAIN = 1797 - round(0.2 * 1797)

VECTOR_PER_SAMPLE = ["loss.mode=vector", "weighting=per_sample"]


few_gpus = pytest.mark.skipif(torch.cuda.device_count() > 7, reason="cuda:7 exists here")
no_mps = pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is there")

CASES = [
    # --- typos in keys: Hydra refuses them while composing, naming the full key
    pytest.param(["optimizer.lrr=0.1"], "optimizer.lrr", id="key-optimizer.lrr"),
    pytest.param(["trainer.max_epoch=3"], "trainer.max_epoch", id="key-trainer.max_epoch"),
    pytest.param(["data.batchsize=3"], "data.batchsize", id="key-data.batchsize"),
    pytest.param(["optimizer=sgd", "optimizer.betas=[0.9,0.99]"], "optimizer.betas",
                 id="key-of-another-optimizer-choice"),
    # keys appended with +: past Hydra's struct check, refused by validate()
    pytest.param(["+trainer.foo=1"], "trainer.foo", id="appended-key-trainer.foo"),
    # --- typos in group choices: Hydra lists the valid ones
    pytest.param(["optimizer=adam"], "optimizer/adam", id="choice-optimizer=adam"),
    pytest.param(["model=resnet"], "model/resnet", id="choice-model=resnet"),
    pytest.param(["data=mnsit"], "data/mnsit", id="choice-data=mnsit"),
    pytest.param(["weighting=focall"], "weighting/focall", id="choice-weighting=focall"),
    pytest.param(["instrument=ful"], "instrument/ful", id="choice-instrument=ful"),
    pytest.param(["regularizer=[l3]"], "regularizer/l3", id="choice-regularizer=[l3]"),
    pytest.param(["experiment=nope"], "experiment/nope", id="choice-experiment=nope"),
    pytest.param(["debug=slow"], "debug/slow", id="choice-debug=slow"),
    pytest.param(["scheduler=cosin"], "scheduler/cosin", id="choice-scheduler=cosin"),
    pytest.param(["loss=vector"], "loss/vector", id="choice-loss=vector"),
    pytest.param(["hparams_search=nope"], "hparams_search/nope", id="choice-hparams_search"),
    pytest.param(["regularizer=[l2,l2]"], "regularizer", id="choice-regularizer-twice"),
    # a _target_ of another class on a preset: its keys checked against that class (a probe:
    # Hydra's instantiate named no key), and a key of its own named with the form that works
    pytest.param(["data._target_=trainer.data.synthetic.SyntheticData"],
                 "data.val_fraction: trainer.data.synthetic.SyntheticData takes no "
                 "'val_fraction'", id="target-data-preset-keys"),
    pytest.param(["data._target_=trainer.data.synthetic.SyntheticData", "+data.noise=2"],
                 "replace the node: ~data +data._target_=... +data.noise=...",
                 id="target-data-own-key"),
    # --- wrong types: Hydra refuses the conversion, naming the key
    pytest.param(["trainer.max_epochs=abc"], "trainer.max_epochs", id="type-max_epochs=abc"),
    pytest.param(["data.batch_size=1.5"], "data.batch_size", id="type-batch_size=1.5"),
    pytest.param(["seed=x"], "seed", id="type-seed=x"),
    pytest.param(["trainer.grad_clip=fast"], "trainer.grad_clip", id="type-grad_clip=fast"),
    pytest.param(["logging.progress=maybe"], "logging.progress", id="type-progress=maybe"),
    pytest.param(["optimizer.lr=null"], "optimizer.lr", id="type-lr=null"),
    # --- out of range: refused by validate() before anything is built, or while building
    pytest.param(["optimizer.lr=0"], "optimizer.lr: got 0.0", id="range-lr=0"),
    pytest.param(["optimizer.lr=-1"], "optimizer.lr: got -1.0", id="range-lr=-1"),
    pytest.param(["optimizer.lr=inf"], "optimizer.lr", id="range-lr=inf"),
    pytest.param(["optimizer.weight_decay=inf"], "optimizer.weight_decay",
                 id="range-weight_decay=inf"),
    pytest.param(["optimizer.eps=inf"], "optimizer.eps", id="range-eps=inf"),
    pytest.param(["scheduler=cosine", "scheduler.eta_min=inf"], "scheduler.eta_min",
                 id="range-eta_min=inf"),
    pytest.param(["data.batch_size=0"], "data.batch_size: got 0", id="range-batch_size=0"),
    pytest.param(["data.batch_size=5000", "data.drop_last=true"], "data.batch_size",
                 id="range-batch_size>split-drop_last"),
    pytest.param(["data.val_fraction=1.5"], "data.val_fraction", id="range-val_fraction=1.5"),
    pytest.param(["data.train_subset=-1"], "data.train_subset", id="range-train_subset<0"),
    pytest.param(["data.train_subset=999999"], "data.train_subset",
                 id="range-train_subset>split"),
    pytest.param(["data.imbalance_ratio=0.5"], "data.imbalance_ratio",
                 id="range-imbalance_ratio<1"),
    pytest.param(["data.imbalance_ratio=inf"], "data.imbalance_ratio",
                 id="range-imbalance_ratio=inf"),
    pytest.param(["data=synthetic", "data.noise=inf"], "data.noise", id="range-noise=inf"),
    pytest.param(["model=cnn", "data=synthetic"], "model", id="range-cnn-on-vectors"),
    pytest.param(["seed=99999999999999"], "seed", id="range-seed>=2**32"),
    pytest.param(["trainer.max_epochs=0"], "trainer.max_epochs", id="range-max_epochs=0"),
    pytest.param(["trainer.max_steps=0"], "trainer.max_steps", id="range-max_steps=0"),
    pytest.param(["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches",
                 id="range-accumulate=0"),
    pytest.param(["trainer.grad_clip=-1"], "trainer.grad_clip", id="range-grad_clip<0"),
    pytest.param(["trainer.checkpoint.keep_last=0"], "trainer.checkpoint.keep_last",
                 id="range-keep_last=0"),
    pytest.param(["trainer.checkpoint.every_n_steps=-5"], "trainer.checkpoint.every_n_steps",
                 id="range-checkpoint-every<0"),
    pytest.param(["logging.every_n_steps=0"], "logging.every_n_steps", id="range-log-every=0"),
    # --- loss, weighting, regularizers
    pytest.param(["loss.label_smoothing=1.5"], "loss.label_smoothing", id="label_smoothing"),
    pytest.param(["weighting.normalize=median"], "weighting.normalize", id="normalize=median"),
    pytest.param(["weighting=focal"], "weighting", id="scalar-mode-with-focal"),
    pytest.param(["loss.mode=vector", "weighting=focal", "weighting.gamma=-1"],
                 "weighting.gamma", id="focal-gamma<0"),
    pytest.param(["loss.mode=vector", "weighting=per_class", "weighting.weights=[1,2]"],
                 "weighting.weights", id="per_class-wrong-length"),
    pytest.param(["loss.mode=vector", "weighting=per_class",
                  "weighting.weights=[0,0,0,0,0,0,0,0,0,0]"], "weighting.weights",
                 id="per_class-all-zero"),
    # (a learning rate falling to 0: its check, dropped, went unseen and the run trained; an
    # EMA that never moves and an infinite class weight: refused by the config and by the
    # constructors, each naming the key)
    pytest.param(["loss.mode=vector", "weighting=per_class",
                  "weighting.weights=[1,1,1,1,1,1,1,1,1,inf]"], "weighting.weights",
                 id="per_class-inf"),
    pytest.param(["scheduler=step", "scheduler.gamma=0"], "scheduler.gamma", id="step-gamma=0"),
    pytest.param(["instrument.per_sample.every_n_steps=1", "instrument.per_sample.noise_ema=1"],
                 "instrument.per_sample.noise_ema", id="noise_ema=1"),
    pytest.param(["regularizer=[l2]", "regularizer.l2.coef=-1"], "regularizer.l2.coef",
                 id="l2-coef<0"),
    pytest.param(["regularizer=[l2]", "regularizer.l2.include=[nomatch]"], "regularizer.l2",
                 id="l2-selects-nothing"),
    # --- instrumentation
    pytest.param(["instrument.histograms.bins=0"], "instrument.histograms.bins", id="bins=0"),
    pytest.param(["instrument.nonfinite.policy=ignore"], "instrument.nonfinite.policy",
                 id="nonfinite-policy=ignore"),
    pytest.param(["instrument.per_sample.every_n_steps=1", "regularizer=[input_grad_penalty]"],
                 "instrument.per_sample.every_n_steps", id="per_sample-with-double-backward"),
    # --- devices and precision
    pytest.param(["trainer.device=tpu"], "trainer.device", id="device=tpu"),
    pytest.param(["trainer.device=cuda:7"], "trainer.device", id="device=cuda:7",
                 marks=few_gpus),
    pytest.param(["trainer.device=mps"], "trainer.device", id="device=mps", marks=no_mps),
    pytest.param(["trainer.precision=8"], "trainer.precision", id="precision=8"),
    # --- sweeps without -m: Hydra names the override
    pytest.param(["optimizer.lr=1,2"], "optimizer.lr=1,2", id="sweep-lr=1,2"),
    pytest.param(["optimizer=adamw,sgd"], "optimizer=adamw,sgd", id="sweep-optimizer-choices"),
    pytest.param(["optimizer.lr=range(1,3)"], "optimizer.lr", id="sweep-range()"),
    # --- files: data, per-sample weights, checkpoints, the run dir
    pytest.param(["data=fashion_mnist", "data.root=<files>/nothing"],
                 "<files>/nothing/FashionMNIST/raw/train-images-idx3-ubyte",
                 id="data-fashion_mnist-missing"),
    pytest.param([*VECTOR_PER_SAMPLE, "weighting.path=<files>/short.pt"], "<files>/short.pt",
                 id="per_sample-wrong-length-pt"),
    pytest.param([*VECTOR_PER_SAMPLE, "weighting.path=<files>/short.csv"],
                 "<files>/short.csv", id="per_sample-wrong-length-csv"),
    pytest.param([*VECTOR_PER_SAMPLE, "weighting.path=<files>/nan.pt"], "<files>/nan.pt",
                 id="per_sample-nan"),
    pytest.param([*VECTOR_PER_SAMPLE, "weighting.path=<files>/negative.csv"],
                 "<files>/negative.csv", id="per_sample-negative"),
    pytest.param([*VECTOR_PER_SAMPLE, "weighting.path=<files>/missing.pt"],
                 "<files>/missing.pt", id="per_sample-missing-file"),
    pytest.param([*VECTOR_PER_SAMPLE, "weighting.path=<files>/zeros.pt"], "<files>/zeros.pt",
                 id="per_sample-all-zero"),
    pytest.param(["trainer.resume=<files>/missing.pt"], "<files>/missing.pt",
                 id="resume-missing-file"),
    pytest.param(["trainer.resume=<files>/garbage.pt"], "<files>/garbage.pt",
                 id="resume-not-a-checkpoint"),
    pytest.param(["hydra.run.dir=<files>/not_a_dir/run"], "<files>/not_a_dir/run",
                 id="run-dir-under-a-file"),
]  # fmt: skip

# run again through a real subprocess: one of each way to fail (composing, validating, building)
CLI_CASES = ["key-optimizer.lrr", "choice-optimizer=adam", "sweep-lr=1,2", "range-batch_size=0",
             "per_sample-wrong-length-pt"]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return write_files(tmp_path_factory.mktemp("files"))


def write_files(d: Path) -> Path:
    """Bad weight files, a file that is not a checkpoint, and a file in a run dir's way, in
    ``d`` (made)."""
    d.mkdir(parents=True, exist_ok=True)
    torch.save(torch.ones(10), d / "short.pt")
    (d / "short.csv").write_text("1\n2\n3\n")
    nan = torch.ones(DIGITS_TRAIN)
    nan[5] = float("nan")
    torch.save(nan, d / "nan.pt")
    (d / "negative.csv").write_text("\n".join(["1"] * (DIGITS_TRAIN - 1) + ["-1"]))
    torch.save(torch.zeros(DIGITS_TRAIN), d / "zeros.pt")
    (d / "garbage.pt").write_bytes(b"not a checkpoint")
    (d / "not_a_dir").write_text("a file where the run dir would go\n")
    return d


def fill(overrides: list[str], files: Path) -> list[str]:
    """A case says ``<files>`` for the folder that the ``files`` fixture fills."""
    return [o.replace("<files>", str(files)) for o in overrides]


def train_in_process(args: list[str], monkeypatch: pytest.MonkeyPatch) -> int | str | None:
    """``python scripts/train.py *args`` in this process; returns the exit code."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    # Hydra re-raises instead of printing and exiting 1 when a tracer is set (coverage, IDEs)
    monkeypatch.setattr("hydra._internal.utils.is_under_debugger", lambda: False)
    # Hydra configures logging for the job (its console handler writes to capsys' stdout) and
    # keeps its config in singletons: put all of it back for the tests that follow
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    hydra_cfg = HydraConfig.instance().cfg
    GlobalHydra.instance().clear()
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = hydra_cfg
        for h in root.handlers:
            if h not in handlers:
                h.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    return exit_info.value.code


def error_text(output: str) -> str:
    """The output less Hydra's echo of the overrides, the traceback's frames (source lines
    such as ``seed_everything(typed.seed, ...)``) and Python's warnings (``path:line:
    XWarning: message`` and the source line under it: one another thread or an object of an
    earlier test collected meanwhile writes is not the error; as a job logs it too, after the
    log's ``[time][py.warnings][WARNING] - ``): a key found in what is left was
    named by an error message, not quoted back from the command line or the code."""
    kept, in_frames = [], False
    for line in output.splitlines():
        if line.startswith("Error executing job with overrides"):
            continue
        if line.startswith("Traceback (most recent call last)") or re.match(
            r"^(\[[^]]*\]\[py\.warnings\]\[WARNING\] - )?\S+:\d+: \w*Warning: ", line
        ):  # (a job logs its warnings: README, train.log)
            in_frames = True
            continue
        if in_frames and line.startswith(" "):
            continue
        in_frames = False
        kept.append(line)
    return "\n".join(kept)


def assert_nothing_trained(run_dir: Path) -> None:
    assert not list(run_dir.glob("checkpoints/*.pt")), "a checkpoint was written"
    if (run_dir / "metrics.json").exists():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["status"] == "failed", metrics
        assert metrics.get("step", 0) == 0, metrics
    if (run_dir / "tb").exists():
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(event_dir(run_dir)))
        acc.Reload()
        assert "train/loss" not in acc.Tags()["scalars"], "a training step was logged"


def test_the_fuzz_covers_at_least_50_bad_overrides() -> None:
    assert len(CASES) >= 50
    assert len({p.id for p in CASES}) == len(CASES)
    # README's count of them is this one (it said 74 for 79 once)
    readme = (ROOT / "README.md").read_text()
    assert f"| bad overrides tried and refused | **{len(CASES)}**" in readme
    assert f"{len(CASES)} bad overrides" in readme


@pytest.mark.parametrize(("overrides", "expected"), CASES)
def test_bad_override_fails_before_the_first_step_naming_the_key(
    overrides: list[str], expected: str, files: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    run_dir = tmp_path / "run"
    code = train_in_process(
        [f"hydra.run.dir={run_dir}", *BASE, *fill(overrides, files)], monkeypatch
    )
    captured = capsys.readouterr()
    message = error_text(captured.err + captured.out)
    assert code not in (0, None), message
    assert fill([expected], files)[0] in message, message
    assert_nothing_trained(run_dir)


def _cli_case(path: Path, case_id: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """A CLI case in a fresh interpreter (a background job: it spends ~4 s importing torch on
    the core the in-process cases leave idle), with bad files of its own; returns the process,
    its run dir and the files, which the in-process run then uses too (the messages name
    them)."""
    files = write_files(path / "files")
    run_dir = path / "run"  # (not the id: '=' or ',' in a path breaks)
    overrides = next(p.values[0] for p in CASES if p.id == case_id)
    args = [f"hydra.run.dir={run_dir}", *BASE, *fill(overrides, files)]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return proc, run_dir, files


@pytest.mark.parametrize("case_id", CLI_CASES)
@in_background(_cli_case)
def test_in_process_runs_fail_as_the_cli_does(
    case_id: str, background, tmp_path: Path, capsys, monkeypatch
) -> None:
    overrides, expected = next(p.values for p in CASES if p.id == case_id)
    proc, cli_dir, files = background
    cli_err = proc.stderr
    run_dir = tmp_path / "run"
    code = train_in_process(
        [f"hydra.run.dir={run_dir}", *BASE, *fill(overrides, files)], monkeypatch
    )
    in_process_err = capsys.readouterr().err
    assert proc.returncode == code == 1
    assert fill([expected], files)[0] in error_text(cli_err), cli_err
    # the same error, word for word, once the run dirs (which differ) are left out, and any
    # warning printed meanwhile (once in six full runs the comparison failed, its text not
    # kept: both outputs are shown whole where they differ)
    cli_message = error_text(cli_err).replace(str(cli_dir), "<run>")
    in_message = error_text(in_process_err).replace(str(run_dir), "<run>")
    assert cli_message == in_message, (
        f"CLI:\n{cli_err}\n--- in process:\n{in_process_err}")  # fmt: skip
    assert_nothing_trained(cli_dir)
