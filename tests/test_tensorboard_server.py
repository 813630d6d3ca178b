"""A real TensorBoard server on a run dir, queried through its HTTP data API.

The server is started as a user starts it, on the loopback interface only (``--host
127.0.0.1``: the issue's ``--bind_all=false`` is the same thing, but this TensorBoard's
``--bind_all`` is a switch that takes no value), on a port it picks itself, and stopped at the
end.
"""

from __future__ import annotations

import hashlib
import json
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import BASE, CONFIGS, final_params, train

from trainer.logger import event_dir

PARAM = "net.1.weight"  # the MLP's first Linear weight
RUN = "tb/run"  # the run's name in TensorBoard: its event folder (no overrides: "run")


def serve(logdir, ready) -> tuple[subprocess.Popen, str]:
    """A TensorBoard serving ``logdir`` on a loopback port it picks itself (``--port 0``), once
    ``ready(url)`` says it has loaded what the test needs: (the server, its base URL)."""
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
         "--port", "0", "--host", "127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    output: queue.Queue[str] = queue.Queue()  # its lines, drained so the pipe never fills
    drain = threading.Thread(target=lambda: [output.put(line) for line in server.stdout])
    drain.daemon = True
    drain.start()
    deadline = time.monotonic() + 90
    seen: list[str] = []

    def fail() -> None:
        server.kill()
        pytest.fail(f"tensorboard did not come up: {''.join(seen)[-2000:]}")

    # it prints "TensorBoard <version> at http://127.0.0.1:<port>/" once it listens
    while not (found := re.search(r"http://127\.0\.0\.1:\d+", seen[-1] if seen else "")):
        try:
            seen.append(output.get(timeout=max(deadline - time.monotonic(), 0.01)))
        except queue.Empty:
            fail()
    url = found.group(0)
    while True:
        try:
            if ready(url):
                return server, url
        except (urllib.error.URLError, ConnectionError, KeyError):
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            while not output.empty():
                seen.append(output.get())
            fail()
        time.sleep(0.25)


@pytest.fixture
def served(tmp_path):
    """A finished run and a TensorBoard serving it: (base URL, final metrics, PARAM's size)."""
    metrics = train(tmp_path, "trainer.max_steps=6", "logging.every_n_steps=1",
                    "instrument.histograms.every_n_steps=3")  # fmt: skip
    server, url = serve(tmp_path, _loaded)
    try:
        yield url, metrics, final_params(tmp_path)[PARAM].numel()
    finally:
        server.terminate()
        server.wait(timeout=30)


def _loaded(url: str) -> bool:
    """The run's whole event file is loaded: the data server lists a run before it has read
    it, so wait for the last scalar and the last histogram rather than for the run's name."""
    if RUN not in get(url, "/data/runs"):
        return False
    loss = get(url, f"/data/plugin/scalars/scalars?run={RUN}&tag=train/loss")
    hist = get(url, f"/data/plugin/histograms/histograms?run={RUN}&tag=grad_hist/{PARAM}")
    acc = get(url, f"/data/plugin/scalars/scalars?run={RUN}&tag=val/acc")
    return len(loss) == 6 and len(hist) == 3 and acc[-1][1] == 6


def get(url: str, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_scalars_histograms_and_hparams_are_served(served) -> None:
    url, metrics, numel = served
    tags = get(url, "/data/plugin/scalars/tags")[RUN]
    for tag in ("train/loss", "val/acc", "val/loss", "grad_norm/total", "lr"):
        assert tag in tags, tag
    val_acc = get(url, f"/data/plugin/scalars/scalars?run={RUN}&tag=val/acc")
    assert val_acc[-1][1] == 6 and val_acc[-1][2] == pytest.approx(metrics["val/acc"], rel=1e-6)
    loss = get(url, f"/data/plugin/scalars/scalars?run={RUN}&tag=train/loss")
    assert [step for _, step, _ in loss] == [1, 2, 3, 4, 5, 6]

    hist_tags = get(url, "/data/plugin/histograms/tags")[RUN]
    assert f"grad_hist/{PARAM}" in hist_tags and f"weight_hist/{PARAM}" in hist_tags
    hist = get(url, f"/data/plugin/histograms/histograms?run={RUN}&tag=grad_hist/{PARAM}")
    assert [step for _, step, _ in hist] == [1, 3, 6]  # the cadence, the first and the last
    for _, _, buckets in hist:  # [left, right, count] per bucket: every element counted
        assert sum(count for _, _, count in buckets) == pytest.approx(numel)

    experiment = get(url, "/data/plugin/hparams/experiment", {"experimentName": ""})
    names = {h["name"] for h in experiment["hparamInfos"]}
    assert {"optimizer.lr", "data.batch_size", "loss.mode", "seed"} <= names
    assert [m["name"]["tag"] for m in experiment["metricInfos"]] == [
        "val/acc", "val/loss", "train/loss", "val/mse", "val/ppl", "val/token_acc"]  # fmt: skip
    groups = get(url, "/data/plugin/hparams/session_groups", {
        "experimentName": "", "startIndex": 0, "sliceSize": 10,
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                            "STATUS_RUNNING"],
        "colParams": [{"metric": {"tag": "val/acc"}}],
    })["sessionGroups"]  # fmt: skip
    (session,) = [s for g in groups for s in g["sessions"]]
    assert session["name"] == RUN and session["status"] == "STATUS_SUCCESS"
    shown = {m["name"]["tag"]: m["value"] for m in session["metricValues"]}
    assert shown["val/acc"] == pytest.approx(metrics["val/acc"], rel=1e-6)
    assert shown["val/loss"] == pytest.approx(metrics["val/loss"], rel=1e-6)
    assert groups[0]["hparams"]["optimizer.lr"] == pytest.approx(1e-3)


def hydra_run(run_dir, *overrides: str) -> None:
    """A run as ``scripts/train.py`` makes it (Hydra's job config set: its group choices and
    command-line overrides), in this process."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from trainer.run import run

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[*BASE, *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        with open_dict(cfg):
            del cfg["hydra"]
        run(cfg, run_dir)
    finally:
        HydraConfig.instance().cfg = None  # type: ignore[assignment]


def experiment_record(run_dir) -> list[str]:
    """The hyperparameters a run's own experiment record lists, sorted."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    acc = EventAccumulator(str(event_dir(run_dir)))
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.EXPERIMENT_TAG]
    return sorted(h.name for h in metadata.parse_experiment_plugin_data(content).hparam_infos)


def session_groups(url: str) -> list:
    return get(url, "/data/plugin/hparams/session_groups", {
        "experimentName": "", "startIndex": 0, "sliceSize": 100,
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                            "STATUS_RUNNING"],
        "colParams": [{"metric": {"tag": "val/acc"}}],
    })["sessionGroups"]  # fmt: skip


def test_hparams_of_a_sweep_and_a_mixed_logdir(tmp_path) -> None:
    """Two jobs of an lr sweep and a run that overrides other keys, in one logdir: whichever
    run's experiment record TensorBoard picks lists every key any of them overrides (a
    superset), marks that run's overridden keys as differing, shows integers as numbers and the
    regularizers by name, leaves out presentation keys, and names each session group after its
    run."""
    sweep = [("sweep/0", "optimizer.lr=0.01"), ("sweep/1", "optimizer.lr=0.1")]
    for name, lr in sweep:
        hydra_run(tmp_path / name, lr, "trainer.max_steps=2")
    hydra_run(tmp_path / "single", "trainer.max_steps=2", "instrument.per_sample.every_n_steps=2",
              "regularizer=[l2,orthogonal]")  # fmt: skip
    records = [experiment_record(tmp_path / d) for d in ("sweep/0", "sweep/1", "single")]
    assert records[0] == records[1]  # the jobs of a sweep: the same keys
    assert set(records[0]) < set(records[2])  # + the chosen regularizers' own keys
    overridden = {"optimizer.lr", "trainer.max_steps", "instrument.per_sample.every_n_steps",
                  "regularizer"}  # fmt: skip
    assert all(overridden <= set(r) for r in records)  # any run's override, in every record

    def ended(url: str) -> bool:  # the three sessions loaded, to their end
        groups = session_groups(url)
        return sum(s["status"] == "STATUS_SUCCESS" for g in groups for s in g["sessions"]) == 3

    server, url = serve(tmp_path, ended)
    try:
        experiment = get(url, "/data/plugin/hparams/experiment", {"experimentName": ""})
        groups = session_groups(url)
        # what the tab asks when a numeric column is filtered and another sorted (integers as
        # text refused an interval filter, the whole request failing; and sorted "128" before
        # "64": a probe's)
        filtered = get(url, "/data/plugin/hparams/session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 100,
            "allowedStatuses": ["STATUS_SUCCESS"],
            "colParams": [
                {"hparam": "data.batch_size", "filterInterval": {"minValue": 0, "maxValue": 100}},
                {"hparam": "optimizer.lr", "order": "ORDER_DESC"},
                {"hparam": "trainer.max_steps", "filterInterval": {"minValue": 2, "maxValue": 2}},
            ],
        })["sessionGroups"]  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert [g["hparams"]["optimizer.lr"] for g in filtered] == pytest.approx([0.1, 0.01, 1e-3])
    infos = {h["name"]: h for h in experiment["hparamInfos"]}
    assert {"optimizer.lr", "instrument.per_sample.every_n_steps", "regularizer",
            "trainer.max_steps", "data.batch_size"} <= infos.keys()  # fmt: skip
    assert not [k for k in infos if k.startswith("logging.")]
    differing = {k for k, h in infos.items() if h.get("differs")}
    overridden = [{"trainer.device", "trainer.max_steps", "optimizer.lr"},
                  {"trainer.device", "trainer.max_steps", "instrument.per_sample.every_n_steps",
                   "regularizer"}]  # fmt: skip
    assert differing in overridden  # the picked record's own command line
    assert infos["data.batch_size"]["type"] == "DATA_TYPE_FLOAT64"  # (an integer: a number)
    by_name = {g["name"]: g["hparams"] for g in groups}

    def tag(name: str) -> str:  # (the folder's path's: two sweeps' sweep/0 are two groups)
        return hashlib.sha1(str((tmp_path / name).resolve()).encode()).hexdigest()[:6]

    first = f"sweep/0 trainer.device=cpu optimizer.lr=0.01 trainer.max_steps=2 ({tag('sweep/0')})"
    assert by_name.keys() == {
        first,
        f"sweep/1 trainer.device=cpu optimizer.lr=0.1 trainer.max_steps=2 ({tag('sweep/1')})",
        "single trainer.device=cpu trainer.max_steps=2 instrument.per_sample.every_n_steps=2 "
        f"regularizer=l2+orthogonal ({tag('single')})",
    }  # fmt: skip
    single = next(v for k, v in by_name.items() if k.startswith("single"))
    assert single["regularizer"] == "l2+orthogonal" and single["data.batch_size"] == 64
    assert by_name[first]["optimizer.lr"] == pytest.approx(0.01)


def _older_record(values) -> list:
    """A run's experiment and session-start records as the code before 2026-12-07 wrote
    them: integers as text ("64"), a None as "none", its own task's metrics alone."""
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    from trainer.hparams import RunHParams, start_summaries

    old = {k: (str(v) if isinstance(v, int) and not isinstance(v, bool) else
               "none" if v is None else v) for k, v in values.items()}  # fmt: skip
    records = start_summaries(RunHParams(old), ["val/acc", "val/loss", "train/loss"], "old")
    for v in records[0].value:
        if v.tag == metadata.EXPERIMENT_TAG:  # (the task's 3 metrics, as it listed them)
            data = plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
            del data.experiment.metric_infos[3:]
            v.metadata.plugin_data.content = data.SerializeToString()
    return records


def test_hparams_of_a_logdir_with_a_run_written_before_integers_were_numbers(tmp_path) -> None:
    """A run whose HPARAMS record was written before 2026-12-07 (integers as text: "64")
    beside one written now (64, a number), in one logdir (``tensorboard --logdir outputs``):
    the table sorted or filtered by an integer column answered 500 / 400 (a column of two
    kinds, a review's). ``scripts/migrate_hparams.py`` rewrites the older record:
    then both sort and filter, the older run's value a number."""
    from conftest import make_cfg
    from omegaconf import OmegaConf

    from trainer.hparams import end_summary, migrate, run_hparams, start_summaries
    from trainer.logger import TensorBoardLogger

    cfg = make_cfg("trainer.max_steps=2")
    values = run_hparams(cfg)
    (tmp_path / "old" / ".hydra").mkdir(parents=True)  # (the older run's own config)
    OmegaConf.save(cfg, tmp_path / "old" / ".hydra" / "config.yaml")
    for name, records in (("old", _older_record(values.values)),
                          ("new", start_summaries(values, name="new"))):  # fmt: skip
        logger = TensorBoardLogger(tmp_path / name / "tb" / "run")
        for s in records:
            logger.add_summary(s, 0)
        logger.add_floats({"val/acc": 0.5, "val/loss": 1.0, "train/loss": 1.0}, 2)
        logger.add_summary(end_summary(True), 2)
        logger.close()
        (tmp_path / name / "metrics.json").write_text('{"status": "completed"}')  # (ended)
    changed, left = migrate(tmp_path)  # (the older run's file; the newer has no config)
    assert [p.parts[-4] for p in changed] == ["old"] and [p.parts[-4] for p, _ in left] == ["new"]

    def ask(col: dict) -> list:
        return get(url, "/data/plugin/hparams/session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 100,
            "allowedStatuses": ["STATUS_SUCCESS"], "colParams": [col],
        })["sessionGroups"]  # fmt: skip

    server, url = serve(tmp_path, lambda u: len(session_groups(u)) == 2)
    try:
        sorted_ = ask({"hparam": "data.batch_size", "order": "ORDER_ASC"})
        filtered = ask({"hparam": "data.batch_size",
                        "filterInterval": {"minValue": 0, "maxValue": 100}})  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert len(sorted_) == 2 and len(filtered) == 2
    assert [g["hparams"]["data.batch_size"] for g in filtered] == [64, 64]


def test_a_resumed_run_shows_each_step_once(tmp_path) -> None:
    """A run checkpointed at step 5 that failed at step 8, resumed (logging every 4 steps
    now), served by TensorBoard as a user starts it (its default data server, which ignores
    the session start's purge): ``train/loss`` was shown at steps 1-8 and then 12 and 14,
    steps 6 and 7 the failed attempt's (a probe's). Each step once, the resumed run's."""
    from test_resume import _FailsAtStep8

    base = ["trainer.run_id=r", "trainer.checkpoint.every_n_steps=5", "trainer.max_steps=14",
            f"trainer.checkpoint.search_dir={tmp_path}"]  # fmt: skip
    with pytest.raises(RuntimeError, match="a crash at step 8"):
        train(tmp_path / "run", *base, "logging.every_n_steps=1", callbacks=[_FailsAtStep8()])
    train(tmp_path / "again", *base, "logging.every_n_steps=4", "trainer.resume=auto")
    want = [1, 2, 3, 4, 5, 8, 12, 14]

    def loaded(url: str) -> bool:
        points = get(url, f"/data/plugin/scalars/scalars?run=run/{RUN}&tag=train/loss")
        return [step for _, step, _ in points][-1:] == [14]

    server, url = serve(tmp_path, loaded)
    try:
        points = get(url, f"/data/plugin/scalars/scalars?run=run/{RUN}&tag=train/loss")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert [step for _, step, _ in points] == want
