"""scripts/report.py on fake sweeps: real event files, metrics.json and overrides.yaml on disk."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, in_background

from trainer import report
from trainer.logger import TensorBoardLogger

SCRIPT = ROOT / "scripts" / "report.py"


OOM = "RuntimeError: CUDA out of memory.\nTried to allocate 2.00 GiB\n\n"


def completed(acc: float, val_loss: float, train_loss: float, step: int = 40) -> dict[str, Any]:
    return {"train/loss": train_loss, "val/loss": val_loss, "val/acc": acc, "step": step,
            "epoch": 2, "wall_s": 1.0 + acc / 3, "status": "completed"}  # fmt: skip


def make_run(
    run_dir: Path,
    metrics: dict[str, Any] | str | None,
    overrides: list[str] | None = None,
    steps: int = 40,
    tags: tuple[str, ...] = ("train/loss", "val/acc"),
) -> dict[str, list[tuple[int, float]]]:
    """A run dir as trainer.run leaves it; returns the curves it logged, tag -> [(step, value)].

    ``metrics`` is written as metrics.json (a str verbatim, None: no file); ``overrides`` as
    .hydra/overrides.yaml (None: no file); the event file also holds tags the report ignores.
    """
    run_dir.mkdir(parents=True)
    if overrides is not None:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if isinstance(metrics, dict):
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    elif isinstance(metrics, str):
        (run_dir / "metrics.json").write_text(metrics)
    logged: dict[str, list[tuple[int, float]]] = {t: [] for t in tags}
    logger = TensorBoardLogger(run_dir / "tb")
    for step in range(2, steps + 1, 2):
        scalars = {"lr": 0.1, "grad_norm/total": 1.0 / step}
        if "train/loss" in tags:
            scalars["train/loss"] = 2.0 / step
        if "val/acc" in tags and step % 10 == 0:  # "once per epoch"
            scalars["val/acc"] = 1.0 - 1.0 / step
            scalars["val/loss"] = 1.0 / step
        logger.add_floats(scalars, step)
        for tag in tags:
            if tag in scalars:
                logged[tag].append((step, scalars[tag]))
    logger.close()
    return logged


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A multirun dir: 3 completed jobs (one numbered 10), one failed, one missing, one unreadable.

    best val/acc: job 1; best val/loss: job 10; best train/loss: job 0.
    """
    root = tmp_path / "multirun"
    make_run(root / "0", completed(0.80, 0.50, 0.10), ["optimizer.lr=0.1", "model=mlp"])
    make_run(root / "1", completed(0.90, 0.40, 0.20), ["optimizer.lr=0.01", "model=mlp"])
    make_run(
        root / "2",
        {"status": "failed", "error": OOM, "wall_s": 0.5, "step": 4, "epoch": 0},
        ["optimizer.lr=1.0", "model=mlp"],
        steps=4,
    )
    (root / "3" / ".hydra").mkdir(parents=True)  # killed before anything but Hydra's files
    (root / "3" / ".hydra" / "overrides.yaml").write_text("- optimizer.lr=0.5\n- model=mlp\n")
    make_run(root / "4", '{"status": "compl', ["optimizer.lr=0.2", "model=cnn"], tags=())
    make_run(root / "10", completed(0.85, 0.30, 0.30), ["optimizer.lr=0.001", "model=cnn"])
    (root / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    (root / "optimization_results.yaml").write_text("name: optuna\nbest_value: 0.9\n")
    return root


def table_rows(table: str) -> list[tuple[str, str, str]]:
    """(mark, job, status) per row of a rendered table, in order."""
    header, *lines = table.splitlines()
    rows = []
    for line in lines:
        if not line.strip():
            break
        mark, rest = line[:1].strip(), line[1:].split()
        rows.append((mark, rest[0], rest[1]))
    return rows


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_jobs_are_read_in_numeric_order_with_status_overrides_and_curves(sweep) -> None:
    runs = report.collect_runs(sweep)
    assert [r.name for r in runs] == ["0", "1", "2", "3", "4", "10"]  # 10 after 2
    assert [r.status for r in runs] == [
        "completed", "completed", "failed", "missing", "unreadable", "completed",
    ]  # fmt: skip
    assert runs[0].overrides == ["optimizer.lr=0.1", "model=mlp"]
    assert runs[3].overrides == ["optimizer.lr=0.5", "model=mlp"]
    assert runs[0].metrics == json.loads((sweep / "0" / "metrics.json").read_text())
    # curves are the logged points (float32 in the event file), only the two plotted tags
    assert set(runs[0].curves) == {"train/loss", "val/acc"}
    loss = runs[0].curves["train/loss"]
    assert [s for s, _ in loss] == list(range(2, 41, 2))
    assert [v for _, v in loss] == pytest.approx([2.0 / s for s in range(2, 41, 2)], rel=1e-6)
    assert [s for s, _ in runs[0].curves["val/acc"]] == [10, 20, 30, 40]
    assert runs[3].curves == {}  # no tb/
    assert runs[4].curves == {}  # tb/ without those tags


def test_ranks_by_val_acc_highest_first_and_marks_the_best(sweep) -> None:
    ranked = report.rank_runs(report.collect_runs(sweep, curves=False), "val/acc", "auto")
    table = report.render_table(ranked, "val/acc", "auto")
    rows = table_rows(table)
    assert [job for _, job, _ in rows] == ["1", "10", "0", "2", "3", "4"]
    assert [job for mark, job, _ in rows if mark == "*"] == ["1"]
    assert "best: job 1 (val/acc 0.9, highest)" in table
    assert "optimizer.lr=0.01 model=mlp" in table
    assert "\n6 jobs (" in table
    assert "\n1 job (1 completed)" in report.render_table(ranked[:1], "val/acc", "auto")


def test_runs_that_did_not_complete_rank_below_every_completed_one(tmp_path) -> None:
    """An interrupted or failed job's metrics.json may hold a better value (a resumed job's
    last validation, a failure after one): it ranks after every completed job, in job
    order, and is never the best (a mutation ranking every job with a value went unseen: the
    fixture's failed job has none)."""
    root = tmp_path / "multirun"
    make_run(root / "0", completed(0.80, 0.50, 0.10), ["optimizer.lr=0.1"])
    make_run(
        root / "1", {**completed(0.95, 0.10, 0.05), "status": "interrupted"}, ["optimizer.lr=0.2"]
    )
    make_run(root / "2", {**completed(0.99, 0.05, 0.01), "status": "failed", "error": OOM},
             ["optimizer.lr=0.3"])  # fmt: skip
    make_run(root / "3", completed(0.70, 0.60, 0.20), ["optimizer.lr=0.4"])
    for metric in ("val/acc", "val/loss"):
        ranked = report.rank_runs(report.collect_runs(root, curves=False), metric, "auto")
        assert [r.name for r in ranked] == ["0", "3", "1", "2"], metric
        assert report.best_run(ranked, metric).name == "0"


@pytest.mark.parametrize(
    ("metric", "mode", "order"),
    [("val/loss", "auto", ["10", "1", "0"]), ("train/loss", "auto", ["0", "1", "10"]),
     ("val/loss", "max", ["0", "1", "10"]), ("val/acc", "min", ["0", "10", "1"])],
)  # fmt: skip
def test_ranks_by_any_metric_either_way(sweep, metric: str, mode: str, order: list[str]) -> None:
    ranked = report.rank_runs(report.collect_runs(sweep, curves=False), metric, mode)
    rows = table_rows(report.render_table(ranked, metric, mode))
    assert [job for _, job, _ in rows] == [*order, "2", "3", "4"]  # the others last, job order
    assert [job for mark, job, _ in rows if mark == "*"] == [order[0]]


def test_mode_auto_maximizes_accuracies_and_minimizes_the_rest() -> None:
    assert report.resolve_mode("val/acc", "auto") == "max"
    assert report.resolve_mode("train/acc_top5", "auto") == "max"
    assert report.resolve_mode("val/loss", "auto") == "min"
    assert report.resolve_mode("wall_s", "auto") == "min"
    assert report.resolve_mode("val/loss", "max") == "max"


def test_a_diverged_job_is_never_the_best(tmp_path) -> None:
    make_run(tmp_path / "0", completed(0.5, math.nan, math.nan))  # json writes NaN, reads it back
    make_run(tmp_path / "1", completed(0.6, 0.7, 0.8))
    ranked = report.rank_runs(report.collect_runs(tmp_path, curves=False), "val/loss", "auto")
    assert [r.name for r in ranked] == ["1", "0"]
    assert report.best_run(ranked, "val/loss").name == "1"
    assert " nan " in report.render_table(ranked, "val/loss", "auto")


def test_failed_missing_and_unreadable_jobs_are_listed_with_the_reason(sweep, capsys) -> None:
    assert report.main([str(sweep)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:7]}
    assert set(lines) == {"*", "10", "0", "2", "3", "4"}  # every job has its row
    assert "failed" in lines["2"] and "Tried to allocate 2.00 GiB" in lines["2"]
    assert "out of memory" not in lines["2"]  # the last non-empty line, not the first
    assert "missing" in lines["3"] and "optimizer.lr=0.5" in lines["3"]
    assert "unreadable" in lines["4"] and "JSONDecodeError" in lines["4"]
    rows = {r["job"]: r for r in read_csv(sweep / "summary.csv")}
    assert rows["2"]["error"] == OOM  # the CSV keeps the whole error
    assert rows["2"]["step"] == "4" and rows["2"]["val/acc"] == ""
    assert rows["3"]["status"] == "missing"
    assert rows["3"]["error"] == "no metrics.json yet: running, or killed before it wrote one"
    assert rows["4"]["status"] == "unreadable" and "metrics.json" in rows["4"]["error"]


def test_summary_csv_holds_the_ranked_rows_at_full_precision(sweep) -> None:
    assert report.main([str(sweep), "--metric", "val/loss"]) == 0
    rows = read_csv(sweep / "summary.csv")
    assert [r["job"] for r in rows] == ["10", "1", "0", "2", "3", "4"]
    assert [r["best"] for r in rows] == ["*", "", "", "", "", ""]
    for row in rows[:3]:
        metrics = json.loads((sweep / row["job"] / "metrics.json").read_text())
        for key in ("train/loss", "val/loss", "val/acc", "wall_s"):
            assert float(row[key]) == metrics[key], key  # exact: no rounding on the way
        assert int(row["step"]) == metrics["step"]
        assert row["status"] == "completed"
    assert rows[0]["overrides"] == "optimizer.lr=0.001 model=cnn"


def test_curves_png_is_a_real_image(sweep) -> None:
    import matplotlib.image

    assert report.main([str(sweep)]) == 0
    png = sweep / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20_000  # axes, lines and a legend, not a blank canvas
    image = matplotlib.image.imread(png)
    assert image.shape[1] == 1200 and 450 < image.shape[0] < 700 and image.shape[2] in (3, 4)
    assert image[..., :3].std() > 0.05  # more than one colour


def test_an_empty_numbered_dir_is_a_missing_job(tmp_path) -> None:
    make_run(tmp_path / "0", completed(0.7, 0.6, 0.5), ["optimizer.lr=0.1"])
    (tmp_path / "1").mkdir()  # a launcher made the dir, the job never started
    (tmp_path / "logs").mkdir()  # not a job dir: neither numbered nor holding run files
    (tmp_path / "²").mkdir()  # (str.isdigit's, not a number: int() failed on it)
    runs = report.collect_runs(tmp_path)
    assert [(r.name, r.status) for r in runs] == [("0", "completed"), ("1", "missing")]


def test_legend_labels_keep_the_overrides_that_tell_jobs_apart(tmp_path) -> None:
    common = ["trainer.device=cpu", "trainer.max_steps=30"]
    runs = [
        report.Run("0", tmp_path, "completed", overrides=[*common, "optimizer.lr=0.1"]),
        report.Run("1", tmp_path, "failed", overrides=[*common, "optimizer.lr=0.01", "model=cnn"]),
    ]
    labels, shared = report.curve_labels(runs)
    assert labels == ["0 optimizer.lr=0.1", "1 optimizer.lr=0.01 model=cnn"]
    assert shared == common
    # a single run keeps all of its overrides in its label
    assert report.curve_labels(runs[:1]) == (["0 " + " ".join(runs[0].overrides)], [])


def test_a_diverged_curve_does_not_set_the_y_range(tmp_path) -> None:
    ok = report.Run("0", tmp_path, "completed", curves={"train/loss": [(1, 2.0), (2, 0.5)]})
    blown = report.Run("1", tmp_path, "failed", curves={"train/loss": [(1, 2.0), (2, 1e30)]})
    lo, hi = report.y_limits([ok, blown], "train/loss")
    assert lo < 0.5 and 2.0 < hi < 5.0  # the completed curve's span, widened at most once
    near = report.Run("2", tmp_path, "failed", curves={"train/loss": [(1, 2.5)]})
    lo, hi = report.y_limits([ok, near], "train/loss")
    assert 2.5 < hi < 2.7  # a failed job within reach still fits
    assert report.y_limits([ok], "val/acc") is None


def test_a_single_run_dir_is_one_job(tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    make_run(run_dir, completed(0.7, 0.6, 0.5), overrides=None)  # not launched through Hydra
    assert report.main([str(run_dir)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows == [("*", "run", "completed")]
    (row,) = read_csv(run_dir / "summary.csv")
    assert row["job"] == "run" and row["overrides"] == "" and float(row["val/acc"]) == 0.7
    assert (run_dir / "curves.png").stat().st_size > 0


def test_an_unknown_metric_is_refused_naming_the_choices(sweep, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        report.main([str(sweep), "--metric", "val/accuracy"])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "'val/accuracy'" in err and "val/acc" in err and "val/loss" in err
    assert not (sweep / "summary.csv").exists()
    # the error alone: not first a note on how such a metric would be ranked, and no key
    # that is not a metric among the choices (a probe)
    assert "note:" not in err and "epoch" not in err.split("choose one of")[1]


def test_a_metric_that_is_nan_in_every_job_is_still_a_known_choice(tmp_path, capsys) -> None:
    """NaN (nothing counted) is a value of the metric: --metric's error lists it."""
    sweep = tmp_path / "nan"
    for i in range(2):
        make_run(sweep / str(i), {**completed(0.7, 0.6, 0.5), "val/loss": math.nan})
    with pytest.raises(SystemExit):
        report.main([str(sweep), "--metric", "val/los"])
    assert "val/loss" in capsys.readouterr().err.split("choose one of")[1]


def test_a_panel_of_only_nan_values_says_so_not_that_nothing_was_logged() -> None:
    nan = report.Run("0", Path("0"), "completed", curves={"train/loss": [(1, math.nan)]})
    none = report.Run("1", Path("1"), "completed", curves={"val/acc": [(1, 0.5)]})
    assert report.y_limits([nan, none], "train/loss") is None
    assert report.empty_panel_note([nan, none], "train/loss") == (
        "train/loss: no finite value (NaN or Inf)")  # fmt: skip
    assert report.empty_panel_note([none], "train/loss") == "no train/loss logged"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_cli_prints_the_table_and_writes_its_files(sweep) -> None:
    proc = cli(str(sweep), "--metric", "val/loss")
    assert proc.returncode == 0, proc.stderr
    rows = table_rows(proc.stdout)
    assert rows[0] == ("*", "10", "completed") and len(rows) == 6
    assert "best: job 10 (val/loss 0.3, lowest)" in proc.stdout
    assert (sweep / "summary.csv").is_file() and (sweep / "curves.png").is_file()


def _refused(path: Path, kind: str):
    target = path / kind
    if kind == "empty":
        target.mkdir()
        (target / "notes.txt").write_text("not a run")
    return cli(str(target)), target


@pytest.mark.parametrize("kind", ["nonexistent", "empty"])
@in_background(_refused)
def test_cli_refuses_a_dir_without_runs_naming_it(background, kind: str) -> None:
    proc, target = background
    assert proc.returncode != 0
    assert str(target) in proc.stderr
    assert proc.stdout == ""


def test_jobs_tied_with_the_best_are_named(tmp_path) -> None:
    """The first of tied jobs (job order) is marked, and the summary says which tie with it:
    before, job 1 was reported best with no word of job 3's equal value (a probe's finding)."""
    root = tmp_path / "multirun"
    for name, acc in (("0", 0.80), ("1", 0.90), ("2", 0.85), ("3", 0.90)):
        make_run(root / name, completed(acc, 0.5, 0.1), [f"optimizer.lr=0.{name}1"])
    ranked = report.rank_runs(report.collect_runs(root, curves=False), "val/acc", "auto")
    table = report.render_table(ranked, "val/acc", "auto")
    assert "best: job 1 (val/acc 0.9, highest), tied with job 3" in table
    assert [job for mark, job, _ in table_rows(table) if mark == "*"] == ["1"]


def regression(mse: float) -> dict[str, Any]:
    return {"train/loss": mse * 0.9, "val/loss": mse, "val/mse": mse, "step": 40, "epoch": 2,
            "wall_s": 1.0, "status": "completed", "monitor": "val/mse"}  # fmt: skip


def test_the_report_ranks_by_the_jobs_monitor_with_its_direction_and_its_columns(
    tmp_path, capsys
) -> None:
    """The report ranked by val/acc whatever the jobs monitored: a regression sweep's report
    (the README's command) exited 2, and a sweep with monitor=val/loss was ranked by val/acc;
    val/mse was no column (a probe)."""
    root = tmp_path / "multirun"
    for job, mse in enumerate((0.5, 0.2, 0.9)):
        make_run(root / str(job), regression(mse), [f"optimizer.lr={job}"])
    assert report.main([str(root)]) == 0
    out = capsys.readouterr().out
    assert "best: job 1 (val/mse 0.2, lowest)" in out
    rows = {r["job"]: r for r in read_csv(root / "summary.csv")}
    assert rows["1"]["best"] == "*" and float(rows["2"]["val/mse"]) == 0.9
    assert "val/acc" not in rows["1"] and "val/acc" not in out  # (no job has it: no column)
    assert (root / "curves.png").is_file()


def test_jobs_monitoring_different_metrics_need_a_metric(tmp_path) -> None:
    root = tmp_path / "multirun"
    make_run(root / "0", regression(0.5), [])
    make_run(root / "1", {**completed(0.9, 0.4, 0.2), "monitor": "val/acc"}, [])
    with pytest.raises(SystemExit):
        report.main([str(root)])
    assert not (root / "summary.csv").exists()


@pytest.mark.parametrize(
    ("metric", "mode"),
    [("val/acc", "max"), ("val/token_acc", "max"), ("val/ppl", "min"), ("val/mse", "min"),
     ("val/loss", "min"), ("val/f1", "max"), ("val/auc", "max"), ("val/error_rate", "min"),
     ("val/top1_acc", "max"), ("val/mape", "min"), ("val/heatmap_mse", "min"),
     ("val/previous_loss", "min")],
)  # fmt: skip
def test_auto_takes_each_metrics_own_direction(metric, mode) -> None:
    assert report.resolve_mode(metric, "auto") == mode


def test_an_optimizing_sweeper_against_the_monitors_direction_is_refused(monkeypatch) -> None:
    """The Optuna preset maximizes; with monitor=val/loss (or a regression's val/mse) the sweep
    took its worst trial for the best, without a word (a probe)."""
    from types import SimpleNamespace

    from hydra.core.hydra_config import HydraConfig

    from trainer import sweep
    from trainer.config import ConfigError

    monkeypatch.setattr(sweep, "in_multirun", lambda: True)
    for direction in ("maximize", "minimize"):
        hydra = SimpleNamespace(sweeper={"direction": direction})
        monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda h=hydra: h))
        ok = {"maximize": ("val/acc", "my/score"), "minimize": ("val/loss", "val/mse", "val/ppl")}
        for monitor in ok[direction]:
            sweep.check_direction(monitor)  # agrees, or a metric of one's own: not checked
        wrong = "val/loss" if direction == "maximize" else "val/acc"
        with pytest.raises(ConfigError, match=f"direction={direction}, but the run reports "
                           f"{wrong}"):  # fmt: skip
            sweep.check_direction(wrong)
    import enum

    class Direction(enum.Enum):  # (as Optuna's sweeper config holds its default)
        minimize = 1
        maximize = 2

    hydra = SimpleNamespace(sweeper={"direction": Direction.minimize})
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hydra))
    with pytest.raises(ConfigError, match="direction=minimize, but the run reports val/acc"):
        sweep.check_direction("val/acc")
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: SimpleNamespace(sweeper={})))
    sweep.check_direction("val/loss")  # the basic sweeper: no direction


def test_a_run_in_a_sweep_against_its_monitors_direction_is_refused_before_training(
    tmp_path, monkeypatch
) -> None:
    """``run()`` checks the sweeper's direction against its monitor once it knows the monitor
    (the loss's val/acc here), before the first step: a minimizing sweeper over val/acc is
    refused, nothing checkpointed, the failure in metrics.json (the run not checking it, a
    mutation the suite missed, trained the sweep toward its worst trial)."""
    from types import SimpleNamespace

    from conftest import train
    from hydra.core.hydra_config import HydraConfig

    from trainer import sweep
    from trainer.config import ConfigError

    monkeypatch.setattr(sweep, "in_multirun", lambda: True)
    hydra = SimpleNamespace(sweeper={"direction": "minimize"})
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hydra))
    with pytest.raises(ConfigError, match="direction=minimize, but the run reports val/acc"):
        train(tmp_path, "trainer.max_steps=2")
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "tb").exists()
    status = json.loads((tmp_path / "metrics.json").read_text())
    assert status["status"] == "failed" and status["step"] == 0


def test_an_infinite_metric_is_no_value_and_never_best(tmp_path) -> None:
    """A loss of one's own diverging to −Inf was ranked best of a minimizing sweep (a probe:
    "best: job 1 (val/loss -inf, lowest)"); ±Inf is no value, as NaN."""
    from trainer.report import collect_runs

    for name, value in (("0", 0.5), ("1", -math.inf), ("2", math.inf)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(
            json.dumps({"status": "completed", "monitor": "val/loss", "val/loss": value})
        )
    runs = {r.name: r for r in collect_runs(tmp_path, curves=False)}
    assert runs["0"].value("val/loss") == 0.5
    assert runs["1"].value("val/loss") is None and runs["2"].value("val/loss") is None


def test_a_loss_is_not_ranked_across_tasks(tmp_path) -> None:
    """--metric val/loss over a classification and a regression ranked the regression best
    by its smaller number, cross-entropy against squared error (a probe's finding): refused,
    naming the tasks' jobs; a task's own metric ranks as before."""
    from trainer.report import ReportError, check_comparable, collect_runs

    for name, metrics in (("0", {"val/acc": 0.9, "val/loss": 0.3}),
                          ("1", {"val/mse": 0.1, "val/loss": 0.1})):  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(
            json.dumps({"status": "completed", "monitor": "val/loss", **metrics})
        )
    runs = collect_runs(tmp_path, curves=False)
    with pytest.raises(ReportError, match=r"different tasks \(classification: job 0; "
                       r"regression: job 1\), whose val/loss are different losses"):  # fmt: skip
        check_comparable(runs, "val/loss")
    check_comparable(runs, "val/acc")  # (the classification's own: ranked among its jobs)
    # a loss of one's own reporting both metrics is one task (it was refused against itself),
    # and one without a task is another
    for name in ("0", "1"):
        (tmp_path / name / "metrics.json").write_text(
            json.dumps({"status": "completed", "val/acc": 0.9, "val/mse": 0.1, "val/loss": 0.3})
        )
    check_comparable(collect_runs(tmp_path, curves=False), "val/loss")
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "metrics.json").write_text(
        json.dumps({"status": "completed", "val/loss": 0.2})
    )
    with pytest.raises(ReportError, match=r"no task: job 2"):
        check_comparable(collect_runs(tmp_path, curves=False), "val/loss")


def test_a_loss_is_not_ranked_across_different_losses(tmp_path) -> None:
    """A sweep over loss.label_smoothing ranked by train/loss put the unsmoothed job first
    by a smaller number of another quantity (noticed in a review): refused, naming the key
    and the jobs; val/loss (the plain cross-entropy whatever the smoothing) and the task's
    metric still rank; a loss of one's own differing in a key of its own is refused for
    val/loss too; loss.mode (how backward combines the losses) is not a difference."""
    from trainer.report import ReportError, check_comparable, collect_runs, main

    def job(name: str, loss: dict, **metrics) -> None:
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "config.yaml").write_text(
            yaml.safe_dump({"seed": 0, "loss": loss})
        )
        (tmp_path / name / "metrics.json").write_text(
            json.dumps({"status": "completed", "monitor": "val/acc", **metrics})
        )

    ce = {"_target_": "trainer.losses.CrossEntropy", "mode": "scalar"}
    job("0", {**ce, "label_smoothing": 0.0}, **{"train/loss": 0.1, "val/loss": 0.3, "val/acc": 0.9})
    job(
        "1", {**ce, "label_smoothing": 0.2}, **{"train/loss": 0.6, "val/loss": 0.2, "val/acc": 0.95}
    )
    job("2", {**ce, "mode": "vector", "label_smoothing": 0.0},
        **{"train/loss": 0.2, "val/loss": 0.4, "val/acc": 0.8})  # fmt: skip
    runs = collect_runs(tmp_path, curves=False)
    with pytest.raises(ReportError, match=r"different losses \(loss.label_smoothing=0.0: jobs "
                       r"0, 2; loss.label_smoothing=0.2: job 1\), whose train/loss"):  # fmt: skip
        check_comparable(runs, "train/loss")
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--metric", "train/loss"])
    check_comparable(runs, "val/loss")
    check_comparable(runs, "val/acc")
    huber = {"_target_": "mypkg.Huber", "mode": "scalar"}
    for name in ("0", "1", "2"):
        shutil.rmtree(tmp_path / name)
    job("0", {**huber, "delta": 1.0}, **{"val/loss": 0.3, "val/mse": 0.1})
    job("1", {**huber, "delta": 0.1}, **{"val/loss": 0.05, "val/mse": 0.2})
    job("2", {**huber, "mode": "vector", "delta": 1.0}, **{"val/loss": 0.2, "val/mse": 0.09})
    with pytest.raises(ReportError, match=r"loss.delta=1.0: jobs 0, 2; loss.delta=0.1: job 1"):
        check_comparable(collect_runs(tmp_path, curves=False), "val/loss")
    (tmp_path / "1" / ".hydra" / "config.yaml").unlink()  # (not launched through Hydra)
    check_comparable(collect_runs(tmp_path, curves=False), "val/loss")


class Huber:
    """A loss's constructor, for the keys it leaves at their defaults."""

    def __init__(self, delta: float = 1.0, mode: str = "scalar") -> None:
        self.delta = delta


def test_the_losses_compared_are_those_that_ran(tmp_path) -> None:
    """.hydra/config.yaml keeps ${oc.env:SMOOTH} as written: two jobs of different smoothing
    read alike and were ranked by train/loss (a review). The run's metrics.json holds its loss
    resolved, which the report reads; a key left at its default and written out, 1 and 1.0,
    are the same loss."""
    from conftest import train

    from trainer.report import ReportError, check_comparable, collect_runs

    result = train(tmp_path / "run", "trainer.max_steps=1", "instrument=none")
    assert result["loss"] == {"_target_": "trainer.losses.CrossEntropy", "mode": "scalar",
                              "label_smoothing": 0.0}  # fmt: skip
    ce = {"_target_": "trainer.losses.CrossEntropy", "mode": "scalar"}
    for name, smooth in (("0", 0.0), ("1", 0.3)):
        (tmp_path / "sweep" / name / ".hydra").mkdir(parents=True)
        (tmp_path / "sweep" / name / ".hydra" / "config.yaml").write_text(
            yaml.safe_dump({"loss": {**ce, "label_smoothing": "${oc.env:SMOOTH}"}})
        )
        (tmp_path / "sweep" / name / "metrics.json").write_text(json.dumps({
            "status": "completed", "train/loss": 0.1 + smooth, "val/acc": 0.9,
            "loss": {**ce, "label_smoothing": smooth},
        }))  # fmt: skip
    with pytest.raises(ReportError, match=r"loss.label_smoothing=0.0: job 0; loss."):
        check_comparable(collect_runs(tmp_path / "sweep", curves=False), "train/loss")
    for name in ("0", "1"):  # (an older run's metrics.json: no loss; the config can't tell)
        metrics = json.loads((tmp_path / "sweep" / name / "metrics.json").read_text())
        del metrics["loss"]
        (tmp_path / "sweep" / name / "metrics.json").write_text(json.dumps(metrics))
    check_comparable(collect_runs(tmp_path / "sweep", curves=False), "train/loss")
    own = {"_target_": f"{__name__}.Huber", "mode": "scalar"}
    for name, loss in (("0", {**own, "delta": 1}), ("1", own), ("2", {**own, "delta": 1.0})):
        (tmp_path / "own" / name).mkdir(parents=True)
        (tmp_path / "own" / name / "metrics.json").write_text(json.dumps({
            "status": "completed", "val/loss": 0.1, "val/mse": 0.2, "loss": loss,
        }))  # fmt: skip
    check_comparable(collect_runs(tmp_path / "own", curves=False), "val/loss")


def test_a_direction_against_the_guess_for_a_metric_of_ones_own_is_said(
    monkeypatch, caplog
) -> None:
    """A metric of one's own has no known direction: an optimizing sweeper's direction and a
    ReduceLROnPlateau's mode that disagree with the report's guess by name (val/f1 highest
    first) are warned of, not refused (a review's: mode=min on val/f1 ran without a word)."""
    from types import SimpleNamespace

    import torch
    from hydra.core.hydra_config import HydraConfig

    from trainer import sweep
    from trainer.loop import check_plateau

    monkeypatch.setattr(sweep, "in_multirun", lambda: True)
    for direction, warned in (("maximize", 0), ("minimize", 1)):
        caplog.clear()
        hydra = SimpleNamespace(sweeper={"direction": direction})
        monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda h=hydra: h))
        sweep.check_direction("val/f1")
        said = [r.getMessage() for r in caplog.records if "ranks val/f1" in r.getMessage()]
        assert len(said) == warned and all("direction=maximize" in m for m in said)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for mode, warned in (("max", 0), ("min", 1)):
        caplog.clear()
        check_plateau(torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode), "val/f1")
        said = [
            r.getMessage() for r in caplog.records if "ReduceLROnPlateau steps on" in r.getMessage()
        ]
        assert len(said) == warned and all("set scheduler.mode=max" in m for m in said)


# ------------------------------------------------------- edge cases a mutation round found unpinned


def _job(root: Path, name: str, metrics, overrides: str | None = None, config=None) -> Path:
    """A job folder with only what the report reads without curves: metrics.json and .hydra."""
    path = root / name
    (path / ".hydra").mkdir(parents=True)
    if metrics is not None:
        (path / "metrics.json").write_text(json.dumps(metrics))
    if overrides is not None:
        (path / ".hydra" / "overrides.yaml").write_text(overrides)
    if config is not None:
        (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    return path


def _ranked(root: Path, metric: str = "val/acc") -> list:
    return report.rank_runs(report.collect_runs(root, curves=False), metric, "auto")


def test_a_bool_is_no_metric_value_and_only_completed_jobs_are_best(tmp_path) -> None:
    _job(tmp_path, "0", {"status": "completed", "val/acc": 0.9})
    _job(tmp_path, "1", {"status": "completed", "val/acc": True})  # (JSON true: 1.0 in Python)
    runs = _ranked(tmp_path)
    assert runs[1].value("val/acc") is None and report.best_run(runs, "val/acc").name == "0"
    other = tmp_path / "other"
    _job(other, "0", {"status": "interrupted", "val/acc": 0.5})
    _job(other, "1", {"status": "failed", "error": "x"})
    runs = _ranked(other)
    assert report.best_run(runs, "val/acc") is None
    assert "; best: none (" in report.render_table(runs, "val/acc", "auto").splitlines()[-1]
    report.write_csv(runs, "val/acc", other / "s.csv")  # (no job marked best in the CSV)
    assert [r["best"] for r in read_csv(other / "s.csv")] == ["", ""]


def test_a_tie_is_among_completed_jobs_only(tmp_path) -> None:
    _job(tmp_path, "0", {"status": "completed", "val/acc": 0.9})
    _job(tmp_path, "1", {"status": "interrupted", "val/acc": 0.9})
    last = report.render_table(_ranked(tmp_path), "val/acc", "auto").splitlines()[-1]
    assert "; best: job 0 (" in last and "tied" not in last


@pytest.mark.parametrize("status", [None, 1])
def test_a_status_that_is_not_a_word_makes_the_job_unreadable(tmp_path, status) -> None:
    _job(tmp_path, "0", {"status": status, "val/acc": 0.9})
    _job(tmp_path, "1", {"status": "completed", "val/acc": 0.8})
    runs = _ranked(tmp_path)
    assert {r.name: r.status for r in runs}["0"] == "unreadable"
    assert "best: job 1" in report.render_table(runs, "val/acc", "auto")  # (it renders)


def test_overrides_written_as_bare_lines_are_read(tmp_path) -> None:
    path = _job(tmp_path, "0", {"status": "completed"}, overrides="optimizer.lr=0.1\n")
    assert report.read_overrides(path) == ["optimizer.lr=0.1"]


def test_an_interpolated_loss_key_is_not_compared(tmp_path) -> None:
    """A loss key written as an interpolation (resolved only where the job ran) is unknown
    here: the job's loss is not read, and nothing is refused for it."""
    ce = {"_target_": "trainer.losses.CrossEntropy", "mode": "scalar"}
    first = _job(tmp_path, "0", {"status": "completed", "train/loss": 0.1},
                 config={"loss": {**ce, "label_smoothing": "${oc.env:SMOOTH}"}})  # fmt: skip
    _job(tmp_path, "1", {"status": "completed", "train/loss": 0.2},
         config={"loss": {**ce, "label_smoothing": 0.0}})  # fmt: skip
    assert report.read_loss(first) is None
    report.check_comparable(report.collect_runs(tmp_path, curves=False), "train/loss")


def test_directions_and_columns_of_metrics_named_in_any_case(tmp_path) -> None:
    for name in ("val/F1", "val/Top1_Accuracy"):
        assert report.resolve_mode(name, "auto") == "max", name
    _job(tmp_path, "0", {"status": "failed", "error": "x", "step": 3})
    assert "val/acc" in report.columns_for("val/acc", report.collect_runs(tmp_path, curves=False))


def test_the_monitor_and_the_metric_are_those_of_the_completed_jobs(tmp_path) -> None:
    _job(tmp_path, "0", {"status": "completed", "monitor": "val/acc", "val/acc": 0.9})
    _job(tmp_path, "1", {"status": "failed", "monitor": "val/loss", "error": "x"})
    assert report.monitor_of(report.collect_runs(tmp_path, curves=False)) == "val/acc"
    other = tmp_path / "other"  # one completed job without the metric: the other ranks
    _job(other, "0", {"status": "completed", "monitor": "val/acc", "val/acc": 0.9})
    _job(other, "1", {"status": "completed", "val/loss": 0.3})
    assert report.main([str(other), "--metric", "val/acc"]) == 0


BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def _plan(root: Path, sweeper: dict[str, Any], task: list[str], subdir: str | None = None) -> None:
    """The sweep's multirun.yaml as Hydra writes it (its hydra node: sweeper, overrides, and
    where given the sweep's subdir)."""
    hydra: dict[str, Any] = {"mode": "MULTIRUN", "sweeper": sweeper, "overrides": {"task": task}}
    if subdir is not None:
        hydra["sweep"] = {"subdir": subdir}
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra}))


def test_jobs_an_interrupted_sweep_never_started_are_rows_of_their_own(tmp_path, capsys, caplog):
    """A sweep of 2 × 2 points interrupted during its second job: the report listed the 2
    folders there, "2 jobs (1 completed, 1 interrupted)", a smaller sweep (a walkthrough's),
    where the sweep's own summary said 2 of 4 did not complete. The jobs never started are
    rows now, with the overrides and the number Hydra's basic sweeper gives them (its own
    split of the sweep), ranked last, in summary.csv without a folder; an Optuna sweep's
    trials, which nothing names before they run, are counted."""
    root = tmp_path / "multirun"
    plan = [["optimizer.lr=0.1", "seed=0", "trainer.max_steps=5"],
            ["optimizer.lr=0.1", "seed=1", "trainer.max_steps=5"],
            ["optimizer.lr=0.2", "seed=0", "trainer.max_steps=5"],
            ["optimizer.lr=0.2", "seed=1", "trainer.max_steps=5"]]  # fmt: skip
    make_run(root / "0", completed(0.8, 0.5, 0.1), plan[0])
    make_run(root / "1", {"status": "interrupted", "signal": "SIGINT", "step": 3}, plan[1])
    _plan(root, {"_target_": BASIC, "params": None},
          ["optimizer.lr=0.1,0.2", "seed=range(0,2)", "trainer.max_steps=5"])  # fmt: skip
    assert report.main([str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line.split(None, 3) for line in out[1:5]]
    assert [(r[0], r[1]) for r in rows] == [("*", "0"), ("1", "interrupted"),
                                            ("2", "not"), ("3", "not")]  # fmt: skip
    assert out[3].split()[1:3] == ["not", "started"] and " ".join(plan[2]) in out[3]
    assert " ".join(plan[3]) in out[4]
    assert "4 jobs (1 completed, 1 interrupted, 2 not started)" in out[6]
    assert out[2].rstrip().endswith("stopped by SIGINT at step 3")  # (its row said nothing)
    csv_rows = read_csv(root / "summary.csv")
    assert [(r["job"], r["status"], r["path"]) for r in csv_rows[2:]] == [
        ("2", "not started", ""), ("3", "not started", "")]  # fmt: skip
    assert csv_rows[2]["overrides"] == " ".join(plan[2])

    # the same sweep complete: no row added
    make_run(root / "2", completed(0.7, 0.5, 0.1), plan[2])
    make_run(root / "3", completed(0.6, 0.5, 0.1), plan[3])
    assert report.main([str(root)]) == 0
    assert "4 jobs (3 completed, 1 interrupted);" in capsys.readouterr().out

    # a dir reused by another sweep, interrupted in its first job: the folders of the first
    # sweep match none of its jobs, which are not started but the first (a review: counted as
    # the plan's jobs beyond the folders, 3 for 4, and none where it was as large); the first
    # sweep's folders are left out, said (they were counted as this sweep's: its best taken
    # from them, its summary failed for their failures, a probe's)
    shutil.rmtree(root / "3")
    make_run(root / "0b", {"status": "interrupted", "signal": "SIGINT", "step": 1},
             ["optimizer.lr=0.3"])  # fmt: skip
    _plan(root, {"_target_": BASIC, "params": None}, ["optimizer.lr=0.3,0.4,0.5,0.6"])
    assert report.main([str(root)]) == 0
    out, err = capsys.readouterr()
    assert "4 jobs (1 interrupted, 3 not started); best: none" in out, out
    assert "job folders 0, 1, 2 hold runs that are not this sweep's jobs" in err, err
    unstarted = [line.split()[0] for line in out.splitlines() if " not started " in line]
    assert unstarted == ["1", "2", "3"]
    from trainer.sweep import SweepSummary  # (the sweep's own last lines count them alike)

    with caplog.at_level("INFO", logger="trainer.sweep"):
        SweepSummary()._summarize(root, stopped=True)
    assert "4 of 4 jobs did not complete (1 interrupted, 3 not started)" in caplog.text
    # this sweep's: a folder whose metrics.json records this sweep's id (its job, or one of
    # them continued in its folder by hand: it vanished from the report, a review's), and the
    # job its number names but for trainer.resume (a sweep run again with resume=auto,
    # interrupted before that job); not: one recording another sweep's id (file dates decided
    # before: a copy without them reordered them, a review's)
    capsys.readouterr()
    _plan(root, {"_target_": BASIC, "params": None},
          ["optimizer.lr=0.2,0.1,0.5", "seed=1", "trainer.max_steps=5", "trainer.resume=auto"],
          "${hydra.job.num}")  # fmt: skip
    (root / ".sweep.json").write_text(json.dumps({"sweep_id": "this"}))
    for name, recorded in (("2", "this"), ("0", "this"), ("0b", "another")):
        metrics = json.loads((root / name / "metrics.json").read_text())
        (root / name / "metrics.json").write_text(json.dumps({**metrics, "sweep_id": recorded}))
    assert report.main([str(root)]) == 0
    out, err = capsys.readouterr()
    assert "job folder 0b holds runs that are not this sweep's jobs" in err, err
    rows = [line.lstrip("* ").split()[:2] for line in out.splitlines()[1:4]]
    # (folder 1 is job 1 by its number and overrides, folders 0 and 2 this sweep's by their
    # records: none not started, none twice)
    assert sorted(rows) == [["0", "completed"], ["1", "interrupted"], ["2", "completed"]], out
    assert "3 jobs (2 completed, 1 interrupted); best: job 0" in out, out
    # without the sweep's id (a copy that left dotfiles out), a folder recording another
    # sweep's is told by its number's job: folder 2 is not job 2 (the id decided, and the
    # overrides' check was never reached, a review's)
    (root / ".sweep.json").unlink()
    assert report.main([str(root)]) == 0
    out, err = capsys.readouterr()
    assert "job folders 0, 2, 0b hold runs that are not this sweep's jobs" in err, err
    unstarted = [line.split()[0] for line in out.splitlines() if " not started " in line]
    assert unstarted == ["0", "2"], out
    # a job folder killed before Hydra wrote its overrides is that job, missing, not also
    # a job not started
    shutil.rmtree(root / "0b")
    (root / "5").mkdir()
    _plan(root, {"_target_": BASIC, "params": None}, ["optimizer.lr=0.1,0.2", "seed=range(0,3)",
                                                      "trainer.max_steps=5"])  # fmt: skip
    assert report.main([str(root)]) == 0
    out = capsys.readouterr().out
    assert "6 jobs (2 completed, 1 interrupted, 1 missing, 2 not started)" in out, out

    # folders named by the sweep's own subdir (${seed}): one without overrides is not taken
    # for the job its name would number (a review: a folder `1`, job 0's, was taken for job
    # 1, and job 0 listed as not started); the jobs not started are counted
    named = tmp_path / "named"
    make_run(named / "1", None)
    shutil.rmtree(named / "1" / "tb")
    _plan(named, {"_target_": BASIC, "params": None}, ["seed=1,0"])
    hydra_yaml = yaml.safe_load((named / "multirun.yaml").read_text())
    hydra_yaml["hydra"]["sweep"] = {"dir": str(named), "subdir": "${seed}"}
    (named / "multirun.yaml").write_text(yaml.safe_dump(hydra_yaml))
    assert report.main([str(named)]) == 0
    out = capsys.readouterr().out
    assert "2 jobs (1 missing, 1 not started)" in out and " not started " not in out, out

    # Optuna's 7 trials, 4 of them run
    optuna = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    _plan(root, {"_target_": optuna, "n_trials": 7}, [])
    assert report.main([str(root)]) == 0
    out = capsys.readouterr().out
    assert "7 jobs (2 completed, 1 interrupted, 1 missing, 3 not started)" in out


@pytest.mark.parametrize("resume", [None, "trainer.resume=auto"])
def test_an_earlier_sweeps_run_of_a_job_is_not_the_jobs_result(
    tmp_path, capsys, caplog, resume
) -> None:
    """A dir reused by a sweep of the same overrides (another `--config-dir`, say),
    interrupted in its first job: folder 1 holds the earlier sweep's run of job 1, recording
    that sweep's id. It was reported as this sweep's job 1, completed and best (a probe's),
    though this sweep had not run it: a sweep that starts afresh sets it aside, one that
    resumes continues it only where its config is unchanged (which the report cannot see),
    and a job refused before it took the folder leaves it. Job 1 is not started, its row
    noting the earlier run (none of its numbers, nor its curves), the sweep's own last line
    counting it so."""
    root = tmp_path / "multirun"
    task = ["optimizer.lr=0.1,0.2", *([resume] if resume else [])]
    jobs = [[f"optimizer.lr={lr}", *task[1:]] for lr in (0.1, 0.2)]
    make_run(root / "0", {"status": "interrupted", "signal": "SIGTERM", "step": 1,
                          "sweep_id": "this"}, jobs[0])  # fmt: skip
    make_run(root / "1", {**completed(0.9125, 0.5, 0.1), "step": 20, "monitor": "val/acc",
                          "sweep_id": "earlier"}, jobs[1])  # fmt: skip
    _plan(root, {"_target_": BASIC, "params": None}, task, "${hydra.job.num}")
    (root / ".sweep.json").write_text(json.dumps({"sweep_id": "this"}))
    assert report.main([str(root)]) == 0
    out, err = capsys.readouterr()
    assert "job folder 1 holds an earlier sweep's run of the job" in err, err
    assert "2 jobs (1 interrupted, 1 not started); best: none" in out, out
    (row,) = [line for line in out.splitlines() if line.split()[:1] == ["1"]]
    assert row.split()[1:3] == ["not", "started"] and row.count("0.9125") == 1, row
    assert row.rstrip().endswith(  # (its result in the note alone: a better one not hidden)
        "not run by this sweep: its folder holds an earlier sweep's completed run (step 20, "
        "val/acc 0.9125)"
    )
    csv_row = read_csv(root / "summary.csv")[1]
    assert (csv_row["job"], csv_row["status"], csv_row["val/acc"]) == ("1", "not started", "")
    assert csv_row["path"] == str(root / "1")
    from trainer.sweep import SweepSummary

    with caplog.at_level("INFO", logger="trainer.sweep"):
        SweepSummary()._summarize(root, stopped=True)
    assert "2 of 2 jobs did not complete (1 interrupted, 1 not started)" in caplog.text
    assert "job 1 not started: not run by this sweep: its folder holds" in caplog.text
    assert "job 0 interrupted: stopped by SIGTERM at step 1 (trainer.resume=auto continues it)" in (
        caplog.text
    )  # (the row's note is not the line's: its hint was lost, a review's)

    # this sweep's run of it (continued, or run afresh): the job's result
    capsys.readouterr()
    shutil.rmtree(root / "1")
    make_run(root / "1", {**completed(0.8, 0.5, 0.1), "sweep_id": "this"}, jobs[1])
    assert report.main([str(root)]) == 0
    out, err = capsys.readouterr()
    assert "earlier sweep" not in err and "2 jobs (1 completed, 1 interrupted); best: job 1" in out


def test_an_earlier_sweeps_run_of_a_job_this_sweep_ran_elsewhere_is_left_out(
    tmp_path, capsys, caplog
) -> None:
    """Folders named by a value of the job (``hydra.sweep.subdir=lr${optimizer.lr}``) in a dir
    that holds an earlier sweep's numbered folders of the same jobs: the sweep ran every job
    in folders of its own, and the earlier ones were listed as its jobs not started besides,
    the sweep failed (a review's). A job with a folder of this sweep's is that folder; the
    earlier sweep's are left out; a job with none is not started, noted."""
    root = tmp_path / "multirun"
    jobs = [["optimizer.lr=0.1"], ["optimizer.lr=0.2"]]
    for n, job in enumerate(jobs):
        make_run(root / str(n), {**completed(0.9, 0.5, 0.1), "sweep_id": "earlier"}, job)
        make_run(root / f"lr{job[0][-3:]}", {**completed(0.5 + n / 10, 0.5, 0.1),
                                             "sweep_id": "this"}, job)  # fmt: skip
    _plan(root, {"_target_": BASIC, "params": None}, ["optimizer.lr=0.1,0.2"],
          "lr${optimizer.lr}")  # fmt: skip
    (root / ".sweep.json").write_text(json.dumps({"sweep_id": "this"}))
    assert report.main([str(root)]) == 0
    out, err = capsys.readouterr()
    assert "2 jobs (2 completed); best: job lr0.2" in out, out
    assert "job folders 0, 1 hold runs that are not this sweep's jobs" in err, err
    from trainer.sweep import SweepSummary

    with caplog.at_level("INFO", logger="trainer.sweep"):
        SweepSummary()._summarize(root, stopped=False)
    assert "all 2 jobs completed" in caplog.text, caplog.text
    # one of them not run by this sweep: the earlier run of it stands for it, noted
    shutil.rmtree(root / "lr0.2")
    assert report.main([str(root)]) == 0
    out, err = capsys.readouterr()
    assert "2 jobs (1 completed, 1 not started); best: job lr0.1" in out, out
    assert "job folder 1 holds an earlier sweep's run" in err and "job folder 0 holds" in err


def test_two_earlier_sweeps_runs_of_one_job_stand_for_it_once(
    tmp_path, capsys, caplog, monkeypatch
) -> None:
    """Folders named by a value of the job, in a dir holding two earlier sweeps' runs of one
    job this sweep has not run (and a job with no folder at all): one of them stands for
    the job, not started, noted, none of its curves read; the other is left out; the sweep's
    last line counts both jobs not started. (A mutation round's: each earlier run listed as
    the job, the folder's curves read for its row, and the count of not-started rows without
    folders overwriting that of those with one, each went unseen.)"""
    root = tmp_path / "multirun"
    jobs = [[f"optimizer.lr={lr}"] for lr in (0.1, 0.2, 0.5)]
    make_run(root / "lr0.1", {"status": "interrupted", "signal": "SIGTERM", "step": 1,
                              "sweep_id": "this"}, jobs[0])  # fmt: skip
    for name in ("0", "1"):
        make_run(root / name, {**completed(0.9, 0.5, 0.1), "sweep_id": "earlier"}, jobs[1])
    _plan(root, {"_target_": BASIC, "params": None}, ["optimizer.lr=0.1,0.2,0.5"],
          "lr${optimizer.lr}")  # fmt: skip
    (root / ".sweep.json").write_text(json.dumps({"sweep_id": "this"}))
    read, read_curves = [], report.read_curves
    monkeypatch.setattr(report, "read_curves", lambda d, t: read.append(d) or read_curves(d, t))
    assert report.main([str(root)]) == 0
    assert read == [root / "lr0.1"]  # (the earlier runs' curves not plotted as the job's)
    monkeypatch.undo()
    out, err = capsys.readouterr()
    assert "3 jobs (2 not started, 1 interrupted); best: none" in out, out
    noted = [line for line in out.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert len(noted) == 1 and "not run by this sweep" in noted[0], out
    assert "holds runs that are not this sweep's jobs" in err, err
    runs = report.collect_runs(root)
    (row,) = [r for r in runs if r.name in ("0", "1")]
    assert row.status == "not started" and row.curves == {}
    assert runs[[r.name for r in runs].index("lr0.1")].curves  # (this sweep's: read)
    from trainer.sweep import SweepSummary

    with caplog.at_level("INFO", logger="trainer.sweep"):
        SweepSummary()._summarize(root, stopped=True)
    assert "3 of 3 jobs did not complete (1 interrupted, 2 not started)" in caplog.text, caplog.text


def test_an_earlier_sweeps_run_of_a_job_whose_own_folder_has_no_result_is_left_out(
    tmp_path, capsys
) -> None:
    """Folders named by a value of the job: this sweep's folder of a job, killed before it
    wrote metrics.json (no sweep id to read), is the job's, missing; an earlier sweep's run
    of the same job in another folder is left out, not listed as the job not started too.
    (A mutation round's: a folder with no recorded id not counted as the job's went
    unseen.)"""
    root = tmp_path / "multirun"
    jobs = [["optimizer.lr=0.1"], ["optimizer.lr=0.2"]]
    make_run(root / "lr0.1", {**completed(0.7, 0.5, 0.1), "sweep_id": "this"}, jobs[0])
    make_run(root / "lr0.2", None, jobs[1])
    make_run(root / "1", {**completed(0.9, 0.5, 0.1), "sweep_id": "earlier"}, jobs[1])
    _plan(root, {"_target_": BASIC, "params": None}, ["optimizer.lr=0.1,0.2"],
          "lr${optimizer.lr}")  # fmt: skip
    (root / ".sweep.json").write_text(json.dumps({"sweep_id": "this"}))
    assert report.main([str(root)]) == 0
    out, err = capsys.readouterr()
    assert "2 jobs (1 completed, 1 missing); best: job lr0.1" in out, out
    assert "job folder 1 holds runs that are not this sweep's jobs" in err, err


def test_an_interrupted_run_continued_elsewhere_keeps_its_note(tmp_path, caplog) -> None:
    """A job's run continued by a later run in another folder, that one interrupted: its row
    says where it was continued (the run's latest), not only the signal that stopped it. (A
    mutation round's: the signal's note written over it, and a failed one's note written
    over its error in the sweep's line, went unseen.)"""
    later = tmp_path / "continued"
    make_run(tmp_path / "2", {"status": "interrupted", "signal": "SIGTERM", "step": 30,
                              "job_dir": str(later),
                              "overrides": ["trainer.max_steps=60", "trainer.resume=x"]},
             ["optimizer.lr=0.2"])  # fmt: skip
    run = report.load_run(tmp_path / "2")
    assert run.status == "interrupted"
    assert run.note == f"continued by {later} (its result, to step 30: the run's latest)"
    # one that failed there: the sweep's line for it is its error, not the note
    make_run(tmp_path / "3", {"status": "failed", "error": "RuntimeError: boom", "step": 40,
                              "job_dir": str(later), "overrides": ["trainer.resume=x"]},
             ["optimizer.lr=0.5"])  # fmt: skip
    from trainer.sweep import SweepSummary

    with caplog.at_level("INFO", logger="trainer.sweep"):
        SweepSummary()._summarize(tmp_path, stopped=True)
    assert "job 3 failed: RuntimeError: boom" in caplog.text, caplog.text


def test_an_earlier_runs_result_is_not_reported_as_the_jobs_that_wrote_none(
    tmp_path, capsys, caplog
) -> None:
    """A job refused in a reused sweep folder leaves the earlier run's outputs there, and
    Hydra's .hydra/ is already the refused job's: the report showed the earlier result as
    the refused job's, completed and best, next to the other overrides, and the sweep said
    all its jobs completed (a probe's). metrics.json names the overrides it ran with: where
    they are not the job's, the job is missing, said why. A job continued by a later run in
    another folder shows the run's latest result, noted as such."""
    root = tmp_path / "multirun"
    make_run(root / "0", {**completed(0.9, 0.5, 0.1), "overrides": ["optimizer.lr=0.01"]},
             ["optimizer.lr=-1"])  # fmt: skip
    make_run(root / "1", {**completed(0.7, 0.5, 0.1), "overrides": ["optimizer.lr=0.1"]},
             ["optimizer.lr=0.1"])  # fmt: skip
    later = tmp_path / "continued"
    make_run(root / "2", {**completed(0.95, 0.5, 0.1, step=60), "job_dir": str(later),
                          "overrides": ["trainer.max_steps=60", "trainer.resume=x"]},
             ["optimizer.lr=0.2"])  # fmt: skip
    _plan(root, {"_target_": BASIC, "params": None}, ["optimizer.lr=-1,0.1,0.2"])
    assert report.main([str(root)]) == 0
    out = capsys.readouterr().out
    rows = {line.lstrip("* ").split()[0]: line for line in out.splitlines()[1:4]}
    assert rows["0"].lstrip("* ").split()[1] == "missing" and "optimizer.lr=-1" in rows["0"]
    assert "its metrics.json is an earlier run's in this folder (optimizer.lr=0.01)" in rows["0"]
    assert f"continued by {later} (its result, to step 60: the run's latest)" in rows["2"]
    assert "3 jobs (2 completed, 1 missing); best: job 2 (val/acc 0.95" in out
    csv_rows = read_csv(root / "summary.csv")
    assert csv_rows[0]["note"].startswith(f"continued by {later}")
    from trainer.sweep import SweepSummary

    with caplog.at_level("INFO", logger="trainer.sweep"), pytest.raises(SystemExit):
        SweepSummary()._summarize(root, stopped=False)
    assert "job 0 missing: its metrics.json is an earlier run's" in caplog.text


def test_a_jobs_identity_and_a_refused_run_by_hand_in_its_folder(tmp_path) -> None:
    """A job is the same job whatever the order of its overrides, the spelling of a value
    Hydra parses alike (``false``, the sweeper's ``False``) and ``trainer.resume`` (each made
    a kept job look like an earlier sweep's, a review's). A run by hand refused in a sweep's
    job folder rewrites its .hydra/ but leaves the job's result: shown as the job's, noted
    (it was hidden, the job listed as not started, a review's)."""
    assert report._job(["seed=1", "optimizer.lr=1e-2", "logging.progress=false"]) == (
        report._job(
            ["optimizer.lr=0.01", "logging.progress=False", "seed=1", "trainer.resume=auto"]
        )  # fmt: skip
    )
    assert report._job(["optimizer.lr=0.01"]) != report._job(["optimizer.lr=0.02"])
    root = tmp_path / "sweep"
    root.mkdir()
    (root / ".sweep.json").write_text(json.dumps({"sweep_id": "this"}))
    job = ["optimizer.lr=0.01", "seed=1"]
    make_run(root / "1", {**completed(0.9, 0.5, 0.1), "overrides": job, "sweep_id": "this"},
             ["optimizer.lr=-0.01", "seed=1", "trainer.resume=auto"])  # fmt: skip
    run = report.load_run(root / "1")
    assert run.status == "completed" and run.overrides == job
    assert run.note == ("its .hydra/ is a later run's (optimizer.lr=-0.01 seed=1 "
                        "trainer.resume=auto), which wrote no result (refused, or killed; its "
                        "train.log is this folder's)")  # fmt: skip
    # the same with an earlier sweep's id: the job's own run (.hydra/) wrote nothing
    make_run(root / "2", {**completed(0.9, 0.5, 0.1), "overrides": job, "sweep_id": "old"},
             ["optimizer.lr=-0.01", "seed=1"])  # fmt: skip
    run = report.load_run(root / "2")
    assert run.status == "missing" and "its metrics.json is an earlier run's" in run.error
