"""Bring your own: user components by _target_ (examples/byo), tensors files, regression.

The example package lives outside the trainer (examples/byo/byo) and is selected through the
real CLI with --config-dir, as README's "Bring your own" section shows.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, final_params, in_background, make_cfg, read_scalars, train

from trainer.config import ConfigError, validate
from trainer.data.base import DataModule
from trainer.losses import MSE

BYO = ROOT / "examples" / "byo"
BYO_CHOICES = ("model=sine_net", "data=noisy_sine", "loss=huber")


def byo_cfg(*overrides: str):
    """The composed config with examples/byo/configs on the search path (as --config-dir does)."""
    return make_cfg(f"hydra.searchpath=[file://{BYO / 'configs'}]", *overrides)


@pytest.fixture
def byo_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(BYO))


def _byo_cli(path: Path):
    run_dir = path / "run"
    env = {**os.environ, "PYTHONPATH": str(BYO)}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "--config-dir", str(BYO / "configs"), *BYO_CHOICES,
         "callbacks=byo", "trainer.max_epochs=20", "optimizer.lr=1e-2", "trainer.device=cpu",
         "logging.progress=false", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return proc, run_dir


@in_background(_byo_cli)
def test_a_user_package_trains_through_the_cli_with_config_dir(background) -> None:
    proc, run_dir = background
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # regression metrics from the user loss's task; y = sin(x) + 0.1·noise: the noise's variance
    # (0.01) is the floor of val/mse, predicting 0 scores E[sin²] ≈ 0.5
    assert metrics["monitor"] == "val/mse" and "val/acc" not in metrics
    assert metrics["val/mse"] < 0.1
    scalars = read_scalars(run_dir)
    assert [s for s, _ in scalars["byo/output_std"]] == list(range(10, metrics["step"] + 1, 10))
    assert {"val/loss", "val/mse", "train/loss"} <= scalars.keys()


def test_a_user_package_that_is_not_importable_says_so_and_where_python_looked(
    tmp_path, monkeypatch
) -> None:
    # (an earlier test of this process may have imported byo: byo_importable's, README's
    # snippet in test_docs.py; sys.path is restored after them, sys.modules is not)
    monkeypatch.delitem(sys.modules, "byo", raising=False)
    for name in [m for m in sys.modules if m.startswith("byo.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ConfigError) as e:
        validate(byo_cfg(*BYO_CHOICES))
    message = str(e.value)
    assert "no module named 'byo'" in message and "PYTHONPATH" in message
    assert "pip install -e" in message and "Python looked in" in message


def test_a_missing_submodule_of_an_importable_package_is_named_as_such(byo_importable) -> None:
    """The package imports, one of its modules does not exist: the message said to put the
    package's folder on PYTHONPATH, where it already was (a probe)."""
    with pytest.raises(
        ConfigError,
        match=r"model._target_: cannot import 'byo.nope' for "
        r"'byo.nope.Net': 'byo' imports \(from .*\) but has no module 'nope'",
    ):
        validate(byo_cfg(*BYO_CHOICES, "model._target_=byo.nope.Net"))


def test_a_missing_import_inside_a_users_module_is_not_taken_for_the_path(tmp_path) -> None:
    """A user's module that itself imports a missing submodule (``import json.nothere``) was
    reported as "'json' imports ... but has no module 'nothere'", blaming the _target_."""
    import sys

    (tmp_path / "mymod_x.py").write_text("import json.nothere\nclass Net: ...\n")
    sys.path.insert(0, str(tmp_path))
    try:
        from trainer.components import resolve_target

        with pytest.raises(ConfigError, match="no module named 'json.nothere'") as e:
            resolve_target("model", "mymod_x.Net")
        assert "but has no module" not in str(e.value)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mymod_x", None)


class NoCommon(DataModule):
    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.n = n

    def load(self):
        raise AssertionError("never loaded")


def test_a_user_key_is_checked_against_the_signature(byo_importable) -> None:
    with pytest.raises(ConfigError, match=r"model\.widht: byo\.nets\.SineNet has no parameter "
                       r"'widht'; its parameters: in_shape, out_dim, width"):  # fmt: skip
        validate(byo_cfg(*BYO_CHOICES, "+model.widht=3"))
    # forwarded **common reaches DataModule's own keys, which are accepted; others are not
    validate(byo_cfg(*BYO_CHOICES, "data.batch_size=8"))
    with pytest.raises(ConfigError, match=r"data\.bach_size: byo\.data\.NoisySine has no "):
        validate(byo_cfg(*BYO_CHOICES, "+data.bach_size=8"))
    # a data module without **common: the message says to take it (it named the key alone)
    with pytest.raises(ConfigError, match=r"data\.batch_size: \S*NoCommon has no parameter "
                       r"'batch_size'; its parameters: n; batch_size is one of every "
                       r"DataModule's loader keys: a data module of one's own takes \*\*common "
                       r"and passes it on, super\(\).__init__\(\*\*common\)"):  # fmt: skip
        validate(byo_cfg(*BYO_CHOICES, f"data._target_={__name__}.NoCommon", "~data.n",
                         "~data.noise"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"model\._target_: module 'byo\.nets' has no "
                       "'SineNett'; it defines: .*SineNet"):  # fmt: skip
        validate(byo_cfg(*BYO_CHOICES, "model._target_=byo.nets.SineNett"))
    with pytest.raises(ConfigError, match=r"callbacks\.x\.every: byo\.callbacks\.OutputScale "
                       "has no parameter 'every'"):  # fmt: skip
        validate(byo_cfg(*BYO_CHOICES, "+callbacks.x._target_=byo.callbacks.OutputScale",
                         "+callbacks.x.every=3"))  # fmt: skip


def test_a_required_argument_nobody_gives_is_named(byo_importable) -> None:
    # CallableLoss(fn) as a loss: fn is neither in the config nor something the data provides
    with pytest.raises(ConfigError, match=r"loss: trainer\.losses\.CallableLoss needs fn, "
                       "which the config does not set"):  # fmt: skip
        validate(byo_cfg(*BYO_CHOICES, "loss._target_=trainer.losses.CallableLoss", "~loss.delta"))


def test_the_model_gets_only_what_its_constructor_asks_for(tmp_path, byo_importable) -> None:
    from trainer.run import build_trainer

    t = build_trainer(byo_cfg(*BYO_CHOICES, "trainer.max_steps=1"), tmp_path, with_logger=False)
    # in_shape [1] and out_dim 1, read off the tensors; num_classes (not asked for) not passed
    assert (t.model.net[0].in_features, t.model.net[-1].out_features) == (1, 1)


def test_a_callback_that_is_not_a_callback_is_refused(tmp_path, byo_importable) -> None:
    with pytest.raises(
        ConfigError, match=r"callbacks\.n\._target_: .*not a trainer\.loop\.Callback"
    ):
        train(tmp_path, f"hydra.searchpath=[file://{BYO / 'configs'}]", *BYO_CHOICES,
              "+callbacks.n._target_=collections.OrderedDict")  # fmt: skip


# ----------------------------------------------------------------------------- data=tensors


def _classes(n: int = 300, k: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(k, (n,), generator=g)
    x = torch.randn(k, 5, generator=g)[y] * 3 + torch.randn(n, 5, generator=g)
    return x, y


def test_tensors_from_a_pt_file_train_a_classifier(tmp_path) -> None:
    x, y = _classes()
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    m = train(tmp_path / "run", "data=tensors", f"data.path={tmp_path / 'd.pt'}",
              "trainer.max_epochs=5", "data.batch_size=32")  # fmt: skip
    assert m["monitor"] == "val/acc" and m["val/acc"] > 0.9  # three separated clusters


def test_tensors_from_an_npz_file_train_a_regression_with_its_own_val_split(tmp_path) -> None:
    g = np.random.default_rng(0)
    x = g.standard_normal((256, 4)).astype(np.float32)
    w = np.array([[1.0], [-2.0], [0.5], [0.0]], dtype=np.float32)
    np.savez(tmp_path / "d.npz", x=x[:200], y=x[:200] @ w, x_val=x[200:], y_val=x[200:] @ w)
    m = train(tmp_path / "run", "data=tensors", f"data.path={tmp_path / 'd.npz'}", "loss=mse",
              "trainer.max_epochs=40", "data.batch_size=32", "optimizer.lr=1e-2")  # fmt: skip
    assert m["monitor"] == "val/mse" and "val/acc" not in m
    assert m["val/mse"] < 0.05  # a noiseless linear target: predicting 0 scores 5.25


@pytest.mark.parametrize(
    "content, match",
    [
        ({"x": torch.zeros(4, 2)}, "must hold a dict with tensors 'x' and 'y'"),
        ({"x": torch.zeros(4, 2), "y": torch.zeros(3)}, "'x' has 4 samples but 'y' 3"),
        ({"x": torch.zeros(4, 2), "y": torch.zeros(4), "z": torch.zeros(1)}, "unknown keys"),
        ({"x": torch.zeros(4, 2), "y": torch.zeros(4), "x_val": torch.zeros(1, 2)}, "only one of"),
        # an empty validation split of class labels (its min() crashed before the check)
        (
            {
                "x": torch.zeros(4, 2),
                "y": torch.zeros(4, dtype=torch.int64),
                "x_val": torch.zeros(0, 2),
                "y_val": torch.zeros(0, dtype=torch.int64),
            },
            "the validation split is empty",
        ),
        (
            {
                "x": torch.zeros(4, 2),
                "y": torch.zeros(4),
                "x_val": torch.zeros(0, 2),
                "y_val": torch.zeros(0),
            },
            "the validation split is empty",
        ),
        # found after an epoch's training before (a probe's findings)
        (
            {"x": torch.zeros(4), "y": torch.zeros(4, dtype=torch.int64)},
            r"'x' has shape \(4,\); samples need a feature axis",
        ),
        (
            {
                "x": torch.zeros(4, 3),
                "y": torch.zeros(4, dtype=torch.int64),
                "x_val": torch.zeros(2, 5),
                "y_val": torch.zeros(2, dtype=torch.int64),
            },
            r"'x_val' samples have shape \(5,\), 'x' samples \(3,\)",
        ),
        (
            {
                "x": torch.zeros(4, 3),
                "y": torch.zeros(4, dtype=torch.int64),
                "x_val": torch.zeros(2, 3),
                "y_val": torch.zeros(2, dtype=torch.int32),
            },
            "the validation split's are torch.int32",
        ),
    ],
)
def test_a_bad_tensors_file_is_named_with_its_cause(tmp_path, content, match) -> None:
    torch.save(content, tmp_path / "d.pt")
    with pytest.raises(ValueError, match=match):
        train(tmp_path / "run", "data=tensors", f"data.path={tmp_path / 'd.pt'}")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


def test_a_loss_that_does_not_fit_the_targets_is_refused_before_training(tmp_path) -> None:
    x, y = _classes()
    torch.save({"x": x, "y": y}, tmp_path / "c.pt")
    torch.save({"x": x, "y": y[:, None].float()}, tmp_path / "r.pt")
    with pytest.raises(ConfigError, match="loss=mse needs float targets"):
        train(tmp_path / "a", "data=tensors", f"data.path={tmp_path / 'c.pt'}", "loss=mse")
    with pytest.raises(ConfigError, match="loss=cross_entropy needs int64 class labels"):
        train(tmp_path / "b", "data=tensors", f"data.path={tmp_path / 'r.pt'}")
    with pytest.raises(ValueError, match="weighting=class_balanced reads class labels"):
        train(tmp_path / "c", "data=tensors", f"data.path={tmp_path / 'r.pt'}", "loss=mse",
              "loss.mode=vector", "weighting=class_balanced")  # fmt: skip
    # validation targets of another shape than the training ones: found by the first
    # validation, after a whole epoch had trained (a probe); refused before training now
    g = torch.Generator().manual_seed(0)
    torch.save({"x": x, "y": torch.randn(len(x), 2, generator=g), "x_val": x[:5],
                "y_val": torch.randn(5, 3, generator=g)}, tmp_path / "v.pt")  # fmt: skip
    with pytest.raises(ConfigError, match=r"validation split's targets are of shape \(3,\) per "
                       r"sample, the training split's \(2,\)"):  # fmt: skip
        train(tmp_path / "d", "data=tensors", f"data.path={tmp_path / 'v.pt'}", "loss=mse")
    # NaN targets: the guard named a non-finite loss and gradients at step 1, not the targets
    y = torch.randn(len(x), 2, generator=g)
    y[7, 1] = math.nan
    torch.save({"x": x, "y": y}, tmp_path / "n.pt")
    with pytest.raises(ConfigError, match=r"split.s targets hold NaN or Inf, at sample \d+;"):
        train(tmp_path / "e", "data=tensors", f"data.path={tmp_path / 'n.pt'}", "loss=mse")


# ----------------------------------------------------------------------------- regression


def test_the_diabetes_preset_learns_and_minimizes_val_mse(tmp_path) -> None:
    m = train(tmp_path, "experiment=diabetes_mse")
    # standardized target: the training mean scores about 1 on validation
    assert m["monitor"] == "val/mse" and m["val/mse"] < 0.65
    assert m["val/loss"] == m["val/mse"]  # the MSE loss is the metric


def test_mse_scalar_and_vector_uniform_train_the_same(tmp_path) -> None:
    steps = ("data=diabetes", "loss=mse", "trainer.max_steps=30", "logging.every_n_steps=1",
             "optimizer=sgd", "optimizer.lr=0.05")  # fmt: skip
    train(tmp_path / "s", *steps)
    train(tmp_path / "v", *steps, "loss.mode=vector")
    a, b = final_params(tmp_path / "s"), final_params(tmp_path / "v")
    assert all(torch.equal(a[k], b[k]) for k in a)  # as for cross-entropy: bit for bit
    assert read_scalars(tmp_path / "s")["train/loss"] == read_scalars(tmp_path / "v")["train/loss"]


def test_mse_losses_are_per_sample_and_never_broadcast() -> None:
    from trainer.losses import MSE

    out = torch.randn(6, 1, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, dtype=torch.float64)
    losses = MSE()(out, y)
    assert losses.shape == (6,)
    torch.testing.assert_close(losses, (out.squeeze(1) - y) ** 2)
    with pytest.raises(ValueError, match=r"output of shape \(6, 2\) does not match the targets"):
        MSE()(torch.zeros(6, 2), y)
    # K outputs per sample: each sample's mean over its K squared errors (a mutation summing
    # them, K times the loss and val/mse, went unseen: the suite's outputs had K = 1)
    out, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(MSE()(out, y), ((out - y) ** 2).mean(1), rtol=1e-15, atol=0)
    sums = MSE().val_sums(out, y)["val/mse"].tolist()
    assert sums == pytest.approx([((out - y) ** 2).mean(1).sum().item(), 4.0], rel=1e-15)


def test_the_examples_huber_loss_is_per_sample_and_never_broadcast(byo_importable) -> None:
    """A (B, 1) output against (B,) targets (data=tensors with y of shape (N,)): F.huber_loss
    broadcast it to (B, B), and the example's mean over dimension 1 gave each sample the mean
    over the batch's outputs, a (B,) the framework took (a probe: val/loss 1.121 for 0.773).
    Each sample's Huber loss, by hand; another shape is refused, naming both."""
    from byo.losses import Huber

    out = torch.tensor([[0.0], [2.0], [-3.0]], dtype=torch.float64)
    y = torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64)
    want = [0.5 * 0.5**2, 2.0 - 0.5, 3.0 - 0.5]  # (δ = 1: quadratic below 1, linear above)
    assert Huber(delta=1.0)(out, y).tolist() == want
    with pytest.raises(ValueError, match=r"output of shape \(3, 2\) does not match the targets"):
        Huber()(torch.zeros(3, 2), y)


class MSEWithMAE(MSE):
    """A regression loss of one's own adding ``val/mae`` (the mean absolute error)."""

    @property
    def metrics(self):
        return (*super().metrics, "val/mae")

    def val_sums(self, output, target):
        sums = super().val_sums(output, target)
        n = torch.full((), float(target.shape[0]), device=output.device)
        error = (output.reshape(target.shape) - target).abs().sum()
        return {**sums, "val/mae": torch.stack([error, n])}


class NoTaskWithMAE(MSEWithMAE):
    task = None


class MAEMonitored(MSEWithMAE):
    monitor = "val/mae"  # type: ignore[assignment]


class MAEInstead(MSEWithMAE):  # (a Gaussian NLL's way: no val/mse of its model's output)
    metrics = ("val/loss", "val/mae")


def test_a_losss_own_metric_does_not_change_what_is_monitored() -> None:
    """A regression loss of one's own that adds a metric monitored it (the last of its
    metrics), where the task's table says val/mse (a probe's): the task's metric, or
    val/loss for a loss of no task; a loss that overrides ``monitor`` gets its own."""
    assert MSEWithMAE().monitor == "val/mse"
    assert NoTaskWithMAE().monitor == "val/loss"
    assert MAEMonitored().monitor == "val/mae"
    # (a regression loss whose metrics leave val/mse out: val/loss, which it reports; it was
    # refused, naming a monitor nobody set, a review's)
    assert MAEInstead().monitor == "val/loss"


class GaussianNLL(MSE):
    """A regression loss whose model returns a mean and a log-variance, (B, 2): no val/mse
    compares that with the targets, so its metrics leave it out."""

    metrics = ("val/loss",)  # type: ignore[assignment]

    def forward(self, output, target):
        mean, log_var = output.unbind(1)
        return 0.5 * (log_var + (target - mean) ** 2 / log_var.exp())


def test_a_regression_loss_leaving_val_mse_out_validates_and_monitors_val_loss() -> None:
    """It failed at the first validation, the base val_sums computing the val/mse its metrics
    left out (a review's): val/loss alone, monitored, and no first-step warning."""
    out, y = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    loss = GaussianNLL()
    sums = loss.val_sums(out, y)
    assert set(sums) == {"val/loss"} and loss.monitor == "val/loss"
    assert sums["val/loss"].tolist() == pytest.approx([float(loss(out, y).sum()), 5.0])
    assert loss.check_targets(out, y) is None


def test_a_losss_overridden_monitor_is_what_the_run_returns(tmp_path) -> None:
    m = train(tmp_path, "data=diabetes", "~loss", f"+loss._target_={__name__}.MAEMonitored",
              "trainer.max_steps=3")  # fmt: skip
    assert m["monitor"] == "val/mae" and m["val/mae"] > 0


class ListOfLayers(torch.nn.Module):
    """Layers kept in a plain Python list: no parameter registered."""

    def __init__(self, in_shape, out_dim: int) -> None:
        super().__init__()
        self.layers = [torch.nn.Linear(64, out_dim)]

    def forward(self, x):
        return self.layers[0](x.flatten(1))


def test_a_model_without_parameters_is_named_before_anything_is_built(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"built a ListOfLayers with no parameters: nothing to "
                       r"train .*nn.ModuleList"):  # fmt: skip
        train(tmp_path, "~model", f"+model._target_={__name__}.ListOfLayers")


def test_a_bad_monitor_names_what_the_run_reports(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"monitor: got 'val/mse', but this run reports "
                       "val/loss, val/acc, train/loss"):  # fmt: skip
        train(tmp_path, "monitor=val/mse", "trainer.max_steps=1")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mse_of_a_half_precision_output_is_computed_in_float32(dtype) -> None:
    """An autocast model's float16/bfloat16 output: the targets are not rounded to its 8 or 11
    bits, and a difference beyond 256 does not overflow float16."""
    from trainer.losses import MSE

    out = torch.tensor([[1.5], [-2.0], [40.0]], dtype=dtype)
    y = torch.tensor([300.3, 0.001, 39.9])
    losses = MSE()(out, y)
    assert losses.dtype == torch.float32
    assert torch.equal(losses, (out.float().squeeze(1) - y) ** 2)


def _shadowing_cli(path: Path):
    mine = path / "configs" / "model"
    mine.mkdir(parents=True)
    (mine / "mlp.yaml").write_text("_target_: byo.nets.SineNet\nwidth: 7\n")
    env = {**os.environ, "PYTHONPATH": str(BYO)}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "--config-dir", str(path / "configs"), "model=mlp",
         "trainer.max_steps=1", "trainer.device=cpu", f"hydra.run.dir={path / 'run'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return proc, mine / "mlp.yaml", path


@in_background(_shadowing_cli)
def test_a_config_of_ones_own_named_as_a_built_in_one_is_refused(background) -> None:
    """Hydra searches the project's configs before --config-dir's: a user's model/mlp.yaml was
    never used, and model=mlp trained the built-in MLP, unsaid (a probe). Refused, naming both
    files, before anything trains."""
    proc, mine, path = background
    assert proc.returncode != 0
    err = proc.stderr
    assert f"{mine} has the group and name of this project's" in err, err[-2000:]
    assert str(ROOT / "configs" / "model" / "mlp.yaml") in err
    assert not list(path.rglob("*.pt"))


def not_a_model(in_shape, out_dim):
    return None


def plain_loss(output, target):
    return torch.nn.functional.cross_entropy(output, target, reduction="none")


def test_a_model_target_building_no_module_and_a_loss_function_called_are_named(tmp_path) -> None:
    """A model _target_ building no nn.Module failed at .to(device) naming no key; a loss
    function without _partial_: true was told to set its arguments in the YAML, not how to
    hand the function over; run(cfg) outside a Hydra job without run_dir raised Hydra's
    "HydraConfig was not set" (probes)."""
    with pytest.raises(ConfigError, match=r"model\._target_: .*not_a_model built a NoneType, "
                       r"not a torch\.nn\.Module"):  # fmt: skip
        train(tmp_path, "~model", f"+model._target_={__name__}.not_a_model")
    with pytest.raises(ConfigError, match=r"loss: .*plain_loss needs output, target.*add "
                       r"_partial_: true"):  # fmt: skip
        validate(make_cfg("~loss", f"+loss._target_={__name__}.plain_loss"))
    from trainer.run import run

    with pytest.raises(ConfigError, match="pass run_dir="):
        run(make_cfg("trainer.max_steps=1"))


def test_a_key_the_config_sets_wins_over_what_the_data_provides() -> None:
    """``out_dim`` set for the model (12 outputs for 10 classes, say) is built as set; only
    the keys the config leaves out are filled from the data."""
    from omegaconf import OmegaConf

    from trainer.components import build

    node = OmegaConf.create({"_target_": "trainer.models.mlp.MLP", "out_dim": 12, "hidden": [8]})
    model = build("model", node, provided={"in_shape": (5,), "out_dim": 10})
    assert model(torch.zeros(3, 5)).shape == (3, 12)
