"""The sweep report (scripts/report.py), a probe's findings (2026-12-07): curves.png labels
holding `$`, a sweep with no job folder yet, a damaged event file, `report.py .` in a job
folder, summary.csv's paths, a job still running."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from matplotlib.figure import Figure
from test_report import BASIC, completed, make_run

from trainer import report


def test_a_dollar_sign_in_an_override_does_not_crash_the_curves(tmp_path, capsys) -> None:
    """matplotlib reads text between two `$` as mathtext: an override value holding
    `$...$` that is not valid TeX made the legend fail to render, after summary.csv was
    written (ValueError: ParseFatalException, a traceback; curves.png not written)."""
    root = tmp_path / "sweep"
    make_run(root / "0", completed(0.8, 0.5, 0.1), ["+note=cost $x_1_2$"])
    make_run(root / "1", completed(0.9, 0.4, 0.2), ["+note=plain"])
    assert report.main([str(root)]) == 0
    assert (root / "curves.png").is_file()


def test_legend_and_title_show_the_overrides_as_written(tmp_path, monkeypatch) -> None:
    """Two `${...}` interpolations in one label (Hydra keeps them as written in
    overrides.yaml) were rendered as math: `data.root=oc.env:MY_DATA_DIR+note=...` in italics,
    the braces and spaces gone, subscripts made of the `_`s."""
    root = tmp_path / "sweep"
    shared = ["data.root=${oc.env:MY_DATA_DIR}", "+note=${oc.env:USER}"]
    make_run(root / "0", completed(0.8, 0.5, 0.1), [*shared, "optimizer.lr=${oc.env:LR_A}",
                                                    "seed=${oc.env:SEED_A}"])  # fmt: skip
    make_run(root / "1", completed(0.9, 0.4, 0.2), [*shared, "optimizer.lr=0.2", "seed=1"])
    texts = []
    save = Figure.savefig

    def savefig(fig, *args, **kwargs):
        texts.extend(t for legend in fig.legends for t in legend.get_texts())
        if fig._suptitle is not None:
            texts.append(fig._suptitle)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    assert report.main([str(root)]) == 0
    assert len(texts) == 3  # two legend entries and the shared overrides' title
    as_math = [t.get_text() for t in texts if t._preprocess_math(t.get_text())[1]]
    assert as_math == [], f"rendered as mathtext, not as written: {as_math}"


def test_a_sweep_with_no_job_folder_yet_lists_its_jobs_as_not_started(tmp_path, capsys):
    """A sweep whose jobs have not started (SLURM jobs pending; a sweep stopped before its
    first job took its folder) holds multirun.yaml alone: the report refused it as "no run
    dirs here; expected a run dir ... or a sweep dir with numbered job dirs", where one job
    started lists the others as `not started`."""
    root = tmp_path / "sweep"
    root.mkdir()
    hydra = {"mode": "MULTIRUN", "sweeper": {"_target_": BASIC, "params": None},
             "overrides": {"task": ["optimizer.lr=0.1,0.2"]}}  # fmt: skip
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra}))
    (root / ".sweep.json").write_text(json.dumps({"sweep_id": "s"}))
    assert report.main([str(root)]) == 0
    assert "2 jobs (2 not started)" in capsys.readouterr().out


def test_a_damaged_event_file_is_said_not_read_as_a_shorter_run(tmp_path, capsys) -> None:
    """One flipped byte in the middle of a job's event file: tensorboard's reader stops
    at the bad record, and the job's curve ended at step 18 of 40 in curves.png, silently (no
    warning), as if the run had stopped there; metrics.json says step 40."""
    root = tmp_path / "sweep"
    logged = make_run(root / "0", completed(0.8, 0.5, 0.1), ["x=1"])
    (path,) = (root / "0" / "tb").rglob("events.out.tfevents.*")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    (run,) = report.collect_runs(root)
    err = capsys.readouterr().err
    assert len(run.curves["train/loss"]) < len(logged["train/loss"])  # (the reader stops)
    assert f"warning: {path.parent}: its event files end at step" in err, err


@pytest.mark.parametrize("where, given", [("", "."), ("tb", "..")], ids=["dot", "dotdot"])
def test_a_job_folder_given_relatively_reads_as_given_by_its_path(
    tmp_path, monkeypatch, where, given
) -> None:
    """`cd <sweep>/1 && scripts/report.py .`: load_run looked for the sweep's id in
    `Path('.').parent`, which is `.` again (the job folder, not the sweep dir): a job whose
    .hydra/ a later refused run by hand rewrote was shown completed and best given as
    `<sweep>/1`, and as `missing` ("its metrics.json is an earlier run's") given as `.`;
    its row's job name was empty ("best: job  (val/acc ...)"). `report.py ..` from its tb/
    did the same with ``Path.absolute()``, which keeps ``..`` (a review's)."""
    root = tmp_path / "sweep"
    root.mkdir()
    (root / ".sweep.json").write_text(json.dumps({"sweep_id": "s"}))
    job = root / "1"
    ran = ["optimizer.lr=0.01", "trainer.max_steps=6"]
    make_run(
        job,
        {**completed(0.9, 0.4, 0.2), "overrides": ran, "sweep_id": "s"},
        ["optimizer.lr=-5", "trainer.max_steps=6"],
    )  # (the refused run's .hydra/)
    (by_path,) = report.collect_runs(job)
    assert (by_path.name, by_path.status) == ("1", "completed")
    monkeypatch.chdir(job / where)
    (run,) = report.collect_runs(Path(given))
    assert (run.name, run.status, run.error) == ("1", "completed", ""), run
    assert run.path == job, run.path


def test_a_job_without_metrics_json_is_not_said_to_be_killed_when_it_may_be_running(
    tmp_path, capsys
) -> None:
    """The report run during a sweep (to look at it): the running job, with its .hydra/ and
    event files but no metrics.json yet, is `missing` (documented as "killed hard") with
    nothing in its row; a job continued in another folder says "running, or killed"."""
    root = tmp_path / "sweep"
    make_run(root / "0", completed(0.8, 0.5, 0.1), ["optimizer.lr=0.1"])
    make_run(root / "1", None, ["optimizer.lr=0.01"])  # (training: events, no result yet)
    assert report.main([str(root)]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if " missing " in line]
    assert "running" in row, row


def test_summary_csv_paths_lead_to_the_jobs_from_wherever_it_is_read(tmp_path, monkeypatch) -> None:
    """`scripts/report.py outputs/multirun/X` wrote `path` = `outputs/multirun/X/0`, relative
    to the directory the report was run from, which neither the CSV nor anything beside it
    records: read from the sweep dir or a notebook elsewhere it leads nowhere (metrics.json's
    `checkpoint` had the same fault, made absolute on 2026-12-07)."""
    root = tmp_path / "outputs" / "sweep"
    make_run(root / "0", completed(0.8, 0.5, 0.1), ["optimizer.lr=0.1"])
    monkeypatch.chdir(tmp_path)
    assert report.main(["outputs/sweep"]) == 0
    import csv

    with open(root / "summary.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert Path(row["path"]) == root.absolute() / "0", row["path"]
