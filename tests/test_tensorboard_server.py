"""A real TensorBoard server on a run dir, queried through its HTTP data API.

The server is started as a user starts it, on a free port of the loopback interface only
(``--host 127.0.0.1``: the issue's ``--bind_all=false`` is the same thing, but this
TensorBoard's ``--bind_all`` is a switch that takes no value), and stopped at the end.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import final_params, train

PARAM = "net.1.weight"  # the MLP's first Linear weight


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tmp_path):
    """A finished run and a TensorBoard serving it: (base URL, final metrics, PARAM's size)."""
    metrics = train(tmp_path, "trainer.max_steps=6", "logging.every_n_steps=1",
                    "instrument.histograms.every_n_steps=3")  # fmt: skip
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path),
         "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if _loaded(url):
                    break
            except (urllib.error.URLError, ConnectionError, KeyError):
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()  # a live server's stdout would block the read below
                pytest.fail(f"tensorboard did not come up: {server.stdout.read()[-2000:]}")
            time.sleep(0.25)
        yield url, metrics, final_params(tmp_path)[PARAM].numel()
    finally:
        server.terminate()
        server.wait(timeout=30)


def _loaded(url: str) -> bool:
    """The run's whole event file is loaded: the data server lists a run before it has read
    it, so wait for the last scalar and the last histogram rather than for the run's name."""
    if "tb" not in get(url, "/data/runs"):
        return False
    loss = get(url, "/data/plugin/scalars/scalars?run=tb&tag=train/loss")
    hist = get(url, f"/data/plugin/histograms/histograms?run=tb&tag=grad_hist/{PARAM}")
    acc = get(url, "/data/plugin/scalars/scalars?run=tb&tag=val/acc")
    return len(loss) == 6 and len(hist) == 3 and acc[-1][1] == 6


def get(url: str, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_scalars_histograms_and_hparams_are_served(served) -> None:
    url, metrics, numel = served
    tags = get(url, "/data/plugin/scalars/tags")["tb"]
    for tag in ("train/loss", "val/acc", "val/loss", "grad_norm/total", "lr"):
        assert tag in tags, tag
    val_acc = get(url, "/data/plugin/scalars/scalars?run=tb&tag=val/acc")
    assert val_acc[-1][1] == 6 and val_acc[-1][2] == pytest.approx(metrics["val/acc"], rel=1e-6)
    loss = get(url, "/data/plugin/scalars/scalars?run=tb&tag=train/loss")
    assert [step for _, step, _ in loss] == [1, 2, 3, 4, 5, 6]

    hist_tags = get(url, "/data/plugin/histograms/tags")["tb"]
    assert f"grad_hist/{PARAM}" in hist_tags and f"weight_hist/{PARAM}" in hist_tags
    hist = get(url, f"/data/plugin/histograms/histograms?run=tb&tag=grad_hist/{PARAM}")
    assert [step for _, step, _ in hist] == [1, 3, 6]  # the cadence, the first and the last
    for _, _, buckets in hist:  # [left, right, count] per bucket: every element counted
        assert sum(count for _, _, count in buckets) == pytest.approx(numel)

    experiment = get(url, "/data/plugin/hparams/experiment", {"experimentName": ""})
    names = {h["name"] for h in experiment["hparamInfos"]}
    assert {"optimizer.lr", "data.batch_size", "loss.mode", "seed"} <= names
    assert [m["name"]["tag"] for m in experiment["metricInfos"]] == [
        "val/acc", "val/loss", "train/loss"]  # fmt: skip
    groups = get(url, "/data/plugin/hparams/session_groups", {
        "experimentName": "", "startIndex": 0, "sliceSize": 10,
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                            "STATUS_RUNNING"],
        "colParams": [{"metric": {"tag": "val/acc"}}],
    })["sessionGroups"]  # fmt: skip
    (session,) = [s for g in groups for s in g["sessions"]]
    assert session["name"] == "tb" and session["status"] == "STATUS_SUCCESS"
    shown = {m["name"]["tag"]: m["value"] for m in session["metricValues"]}
    assert shown["val/acc"] == pytest.approx(metrics["val/acc"], rel=1e-6)
    assert shown["val/loss"] == pytest.approx(metrics["val/loss"], rel=1e-6)
    assert groups[0]["hparams"]["optimizer.lr"] == pytest.approx(1e-3)
