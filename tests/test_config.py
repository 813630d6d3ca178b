"""Every config file composes and instantiates; bad values fail before training, naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, compose_whole, make_cfg
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from trainer.config import ConfigError, validate
from trainer.run import build_scheduler, resolve_device

GROUPS = [
    "data", "model", "optimizer", "scheduler", "loss", "weighting", "trainer", "regularizer",
    "instrument",
]  # fmt: skip


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


# what a choice needs besides itself (weightings need vector mode; two need a value)
NEEDS = {
    "weighting": ["loss.mode=vector"],
    "per_class": ["weighting.weights=[1,1,1,1,1,1,1,1,1,2]"],
    "per_sample": ["weighting.path=weights.pt"],
    "tensors": ["data.path=data.pt"],
}


def _outcome(compose, overrides: tuple[str, ...]) -> tuple:
    try:
        cfg = compose(*overrides)
    except Exception as e:  # the error, as the test would see it
        return type(e), str(e)
    return OmegaConf.to_yaml(cfg), OmegaConf.is_struct(cfg), OmegaConf.is_readonly(cfg)


@pytest.mark.parametrize(
    "overrides",
    [
        ("data=synthetic", "data.num_train=40", "seed=3", "trainer.max_steps=2"),
        ("optimizer.lr=0.5", "optimizer=sgd"),  # a value, then its node's group choice
        ("logging.every_n_steps=5", "experiment=digits_vector", "optimizer.lr=0.2"),
        ("regularizer=[l2]", "regularizer.l2.coef=0.1", "instrument=full"),
        ("trainer.max_steps=3", "trainer.max_steps=4"),
        ("data.batch_size=8", "~data", "+data._target_=trainer.data.synthetic.SyntheticData"),
        ("+extra.a=1", "~extra"),  # a value, then a composed override of its key
        ("+x={y:'${seed}'}", "~x.y=0", "seed=3"),  # ~ and + read what a later value sets
        ("optimizer.lrr=1", "seed=abc"),  # two errors: the first one's
        ("+model._target_=torch.nn.Identity",),  # errors, word for word
        ("optimizer.lrr=1",),
        ("~data.nothing",),
        ("optimizer=sgd", "optimizer.betas=[0.9,0.99]"),
    ],
    ids=lambda v: " ".join(v),
)
def test_the_tests_config_helper_gives_what_composing_every_override_gives(overrides) -> None:
    """conftest's make_cfg composes group choices (cached) and applies plain values the way
    Hydra's compose does: the same config and flags, the same errors."""
    assert _outcome(make_cfg, overrides) == _outcome(compose_whole, overrides)


@pytest.mark.parametrize(
    ("group", "choice"), [(g, c) for g in GROUPS for c in choices(g)], ids=lambda v: str(v)
)
def test_every_config_file_composes_and_validates(group: str, choice: str) -> None:
    cfg = make_cfg(f"{group}={choice}", *NEEDS.get(group, []), *NEEDS.get(choice, []))
    typed = validate(cfg)
    assert getattr(typed, group) is not None


# what each model's data provides, an input batch and the output's shape
IMAGES = ({"in_shape": [1, 8, 8], "out_dim": 10}, torch.zeros(2, 1, 8, 8), (2, 10))
SEQUENCES = (
    {"in_shape": [12], "vocab_size": 10},
    torch.zeros(2, 12, dtype=torch.long),
    (2, 12, 10),
)
MODEL_DATA = {"char_transformer": SEQUENCES}


@pytest.mark.parametrize("model", choices("model"))
def test_every_model_instantiates_with_shapes_from_the_data(model: str) -> None:
    cfg = make_cfg(f"model={model}")
    provided, x, shape = MODEL_DATA.get(model, IMAGES)
    net = instantiate(cfg.model, **provided)
    assert net(x).shape == shape


@pytest.mark.parametrize("optimizer", choices("optimizer"))
@pytest.mark.parametrize("scheduler", choices("scheduler"))
def test_every_optimizer_and_scheduler_instantiates(optimizer: str, scheduler: str) -> None:
    cfg = make_cfg(f"optimizer={optimizer}", f"scheduler={scheduler}", "optimizer.lr=0.5")
    params = [torch.nn.Parameter(torch.ones(3))]
    opt = instantiate(cfg.optimizer, _convert_="all")(params)
    assert opt.param_groups[0]["lr"] == 0.5
    sched = build_scheduler(cfg.scheduler, opt, total_steps=10)
    assert (sched is None) == (scheduler == "none")
    if scheduler == "cosine":  # T_max is the run's step count: lr reaches eta_min at the end
        for _ in range(10):
            opt.step()
            sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(cfg.scheduler.eta_min)


def _lrs(sched: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    opt = sched.optimizer
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_a_scheduler_file_keeps_its_own_length_and_gets_the_runs_where_it_has_none() -> None:
    """The trainer set ``T_max`` to the run's length for any config with ``eta_min``: a file's
    own ``T_max: 3`` was replaced (the lr of a 6-step run followed T_max 6, no warning), and a
    ``CosineAnnealingWarmRestarts`` (``eta_min``, no ``T_max``) failed with an unexpected
    keyword. The length is set where the constructor takes it and the config does not give it;
    OneCycleLR's ``total_steps`` likewise unless ``epochs`` is given. References: torch's
    schedulers built by hand."""
    from trainer.run import run_length_keys

    def opt() -> torch.optim.Optimizer:
        return torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=1e-3)

    def cfg(**kw: object):
        return OmegaConf.create({"_partial_": True, **kw})

    S = torch.optim.lr_scheduler
    own = cfg(_target_="torch.optim.lr_scheduler.CosineAnnealingLR", T_max=3, eta_min=0.0)
    assert run_length_keys(own) == []
    o = opt()
    assert _lrs(build_scheduler(own, opt(), total_steps=6), 6) == _lrs(
        S.CosineAnnealingLR(o, T_max=3, eta_min=0.0), 6
    )
    restarts = cfg(_target_="torch.optim.lr_scheduler.CosineAnnealingWarmRestarts", T_0=3,
                   eta_min=0.0)  # fmt: skip
    o = opt()
    assert _lrs(build_scheduler(restarts, opt(), total_steps=6), 6) == _lrs(
        S.CosineAnnealingWarmRestarts(o, T_0=3, eta_min=0.0), 6
    )
    cosine = cfg(_target_="torch.optim.lr_scheduler.CosineAnnealingLR")  # (no eta_min either)
    assert run_length_keys(cosine) == ["T_max"]
    assert build_scheduler(cosine, opt(), total_steps=6).T_max == 6
    one_cycle = cfg(_target_="torch.optim.lr_scheduler.OneCycleLR", max_lr=0.1)
    assert run_length_keys(one_cycle) == ["total_steps"]
    o = opt()
    assert _lrs(build_scheduler(one_cycle, opt(), total_steps=6), 6) == _lrs(
        S.OneCycleLR(o, max_lr=0.1, total_steps=6), 6
    )
    by_epochs = cfg(_target_="torch.optim.lr_scheduler.OneCycleLR", max_lr=0.1, epochs=2,
                    steps_per_epoch=3)  # fmt: skip
    assert run_length_keys(by_epochs) == []
    step = cfg(_target_="torch.optim.lr_scheduler.StepLR", step_size=2)
    assert run_length_keys(step) == []


def test_a_cosine_period_of_ones_own_is_not_checked_against_the_run_on_resume() -> None:
    """The resume check refuses a run longer than the trainer's ``T_max`` (the learning rate
    would climb again); a ``T_max`` the config sets is the user's period, climbing included."""
    from types import SimpleNamespace

    from trainer.run import _check_schedule_length

    o = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=1e-3)
    trainer = SimpleNamespace(scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=3),
                              total_steps=8)  # fmt: skip
    target = "torch.optim.lr_scheduler.CosineAnnealingLR"
    own = OmegaConf.create({"_target_": target, "_partial_": True, "T_max": 3})
    _check_schedule_length(trainer, Path("last.pt"), own)  # type: ignore[arg-type]
    runs = OmegaConf.create({"_target_": target, "_partial_": True, "eta_min": 0.0})
    with pytest.raises(ConfigError, match=r"over its run's 3 steps \(T_max\)"):
        _check_schedule_length(trainer, Path("last.pt"), runs)  # type: ignore[arg-type]
    # OneCycleLR keeps total_steps in its state too: resumed longer it raised mid-run
    # ("Tried to step 5 times"), after the run had trained up to there; refused up front now
    one_cycle = OmegaConf.create(
        {"_target_": "torch.optim.lr_scheduler.OneCycleLR", "_partial_": True, "max_lr": 0.1}
    )
    trainer.scheduler = build_scheduler(one_cycle, o, total_steps=4)
    with pytest.raises(ConfigError, match=r"OneCycleLR schedule runs over its run's 4 steps "
                       r"\(total_steps\).*stops the run with an error"):  # fmt: skip
        _check_schedule_length(trainer, Path("last.pt"), one_cycle)  # type: ignore[arg-type]
    trainer.total_steps = 3  # shorter: follows the checkpoint's schedule (warned)
    _check_schedule_length(trainer, Path("last.pt"), one_cycle)  # type: ignore[arg-type]


def test_every_data_config_instantiates() -> None:
    for choice in choices("data"):
        data = instantiate(make_cfg(f"data={choice}", *NEEDS.get(choice, [])).data)
        assert data.batch_size >= 1


def test_every_config_file_extends_its_schema() -> None:
    # without the schema in its defaults list a file would escape type and range checks
    for group in GROUPS:
        for choice in choices(group):
            node = OmegaConf.load(CONFIGS / group / f"{choice}.yaml")
            assert "defaults" in node, f"{group}/{choice}.yaml must extend its schema"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optimizer.lr=0", "optimizer.lr"),
        ("optimizer.lr=-0.1", "optimizer.lr"),
        ("data.batch_size=0", "data.batch_size"),
        ("trainer.device=gpu", "trainer.device"),
        ("trainer.device=cuda:x", "trainer.device"),
        ("trainer.device=cuda:", "trainer.device"),
        ("seed=4294967296", "seed"),  # (NumPy's seeds end at 2³² − 1)
        ("trainer.precision=8", "trainer.precision"),
        ("trainer.max_epochs=0", "trainer.max_epochs"),
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("trainer.grad_clip=-1", "trainer.grad_clip"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
        ("loss.mode=vectr", "loss.mode"),
        ("loss.label_smoothing=1.5", "loss.label_smoothing"),
        ("weighting.normalize=max", "weighting.normalize"),
        ("weighting=focal", "weighting"),  # a non-uniform weighting in scalar mode
        ("weighting.normalize=sum", "weighting"),
        ("weighting=focal loss.mode=vector weighting.gamma=-1", "weighting.gamma"),
        ("weighting=per_class loss.mode=vector weighting.weights=[1,nan]", "weighting.weights[1]"),
        ("weighting=per_sample loss.mode=vector weighting.path=w.txt", "weighting.path"),
        ("weighting=hard_topk loss.mode=vector weighting.fraction=0", "weighting.fraction"),
        ("weighting=hard_topk loss.mode=vector weighting.k=-2", "weighting.k"),
        ("logging.every_n_steps=0", "logging.every_n_steps"),
        ("data.val_fraction=1.0", "data.val_fraction"),
        ("data.loader=disk", "data.loader"),
        ("optimizer.weight_decay=-1", "optimizer.weight_decay"),
        ("seed=-1", "seed"),
        ("+optimizer.lrr=0.1", "optimizer.lrr"),
        ("+trainer.max_epoch=3", "trainer.max_epoch"),
        ("+foo=1", "foo"),
        ("regularizer=[l2] regularizer.l2.coef=-0.1", "regularizer.l2.coef"),
        ("regularizer=[l1] +regularizer.l1.coeff=1", "regularizer.l1.coeff"),
        (
            "regularizer=[input_grad_penalty] regularizer.input_grad_penalty.coef=-1",
            "regularizer.input_grad_penalty.coef",
        ),
        (
            "regularizer=[input_grad_penalty] +regularizer.input_grad_penalty.min_ndim=2",
            "regularizer.input_grad_penalty.min_ndim",
        ),
        ("instrument.curvature.every_n_steps=-1", "instrument.curvature.every_n_steps"),
        ("instrument.curvature.power_iters=0", "instrument.curvature.power_iters"),
        ("instrument.curvature.trace_probes=0", "instrument.curvature.trace_probes"),
        ("instrument.curvature.tol=-1", "instrument.curvature.tol"),
        ("instrument.curvature.tol=inf", "instrument.curvature.tol"),
        ("data=synthetic data.shape=[]", "data.shape"),
        ("data=tensors data.path=x.pt data.num_classes=1", "data.num_classes"),
        ("optimizer=adamw optimizer.betas=[0.9,0.99,0.5]", "optimizer.betas"),
        ("optimizer=adamw optimizer.betas=[0.9]", "optimizer.betas"),
        ("loss.mode=vector weighting=hard_topk weighting.fraction=1.0001", "weighting.fraction"),
        (
            "instrument.histograms.range=fixed instrument.histograms.min=0.5 "
            "instrument.histograms.max=0.5",
            "instrument.histograms.min",
        ),
        ("+instrument.curvature.probes=3", "instrument.curvature.probes"),
    ],
)
def test_out_of_range_or_unknown_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ": "):
        validate(make_cfg(*override.split()))


@pytest.mark.parametrize(
    "override",
    [
        "scheduler=step scheduler.gamma=1",  # (no decay: the boundary the range includes)
        "loss.mode=vector weighting=hard_topk weighting.fraction=1.0",  # every sample
        "data=chars data.block_size=8 data.stride=8",  # windows that just touch
        "data=tensors data.path=X.PT",  # (the suffix in any case, as the loader reads it)
        "data.val_fraction=0.999",
        "seed=4294967295",
        "instrument.histograms.range=fixed instrument.histograms.min=-1e-30 "
        "instrument.histograms.max=1e-30",
    ],
)
def test_the_boundaries_a_range_includes_are_accepted(override: str) -> None:
    """The other side of the refusals above: each range's own boundary is valid."""
    validate(make_cfg(*override.split()))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optimizer.lr=abc", "optimizer.lr"),
        ("data.batch_size=1.5", "data.batch_size"),
        ("trainer.max_epochs=many", "trainer.max_epochs"),
        ("data.batch_sise=3", "data.batch_sise"),
        ("trainer.max_epoch=3", "trainer.max_epoch"),
    ],
)
def test_typos_and_wrong_types_fail_while_composing(override: str, key: str) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        make_cfg(override)
    text = f"{info.value} {info.value.__cause__}"
    assert key in text


def test_unknown_group_choice_lists_the_options() -> None:
    with pytest.raises(MissingConfigException) as info:
        make_cfg("model=mlpp")
    assert "mlpp" in str(info.value) and "cnn" in str(info.value)
    assert "schema" not in str(info.value).split("Config search path")[0]


def test_unknown_regularizer_name_lists_the_options() -> None:
    with pytest.raises(MissingConfigException) as info:
        make_cfg("regularizer=[l2,l3]")
    assert "regularizer/l3" in str(info.value)


def test_unavailable_cuda_is_an_error_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="trainer.device"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_sgd_nesterov_needs_momentum() -> None:
    with pytest.raises(ConfigError, match="optimizer.nesterov"):
        validate(make_cfg("optimizer=sgd", "optimizer.nesterov=true", "optimizer.momentum=0"))


def test_configs_dir_has_no_stray_files() -> None:
    stray = [p for p in Path(CONFIGS).rglob("*") if p.is_file() and p.suffix != ".yaml"]
    assert not stray


def test_schedulers_of_schedulers_get_the_optimizer_in_each_part() -> None:
    """SequentialLR and ChainedScheduler list partial schedulers: each part was left a
    partial (SequentialLR: "should have 'optimizer' as its attribute") or got the optimizer
    as its list (ChainedScheduler: "multiple values for argument 'schedulers'"), a probe's
    findings. Each part is called with the optimizer; the rates are torch's own, built by
    hand; a part that cannot be built is named."""

    def opt() -> torch.optim.Optimizer:
        return torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=1.0)

    S = torch.optim.lr_scheduler
    warm = {"_target_": "torch.optim.lr_scheduler.LinearLR", "_partial_": True,
            "start_factor": 0.25, "total_iters": 3}  # fmt: skip
    decay = {"_target_": "torch.optim.lr_scheduler.ExponentialLR", "_partial_": True,
             "gamma": 0.5}  # fmt: skip
    sequential = OmegaConf.create({"_target_": "torch.optim.lr_scheduler.SequentialLR",
                                   "_partial_": True, "schedulers": [warm, decay],
                                   "milestones": [3]})  # fmt: skip
    o = opt()
    want = _lrs(S.SequentialLR(o, [S.LinearLR(o, 0.25, total_iters=3), S.ExponentialLR(o, 0.5)],
                               milestones=[3]), 8)  # fmt: skip
    assert _lrs(build_scheduler(sequential, opt(), total_steps=8), 8) == want
    chained = OmegaConf.create({"_target_": "torch.optim.lr_scheduler.ChainedScheduler",
                                "_partial_": True, "schedulers": [warm, decay]})  # fmt: skip
    o = opt()
    want = _lrs(S.ChainedScheduler([S.LinearLR(o, 0.25, total_iters=3), S.ExponentialLR(o, 0.5)]),
                8)  # fmt: skip
    assert _lrs(build_scheduler(chained, opt(), total_steps=8), 8) == want
    bad = OmegaConf.create(
        {
            **sequential,
            "schedulers": [
                warm,
                {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "_partial_": True},
            ],
        }
    )
    with pytest.raises(ConfigError, match=r"scheduler.schedulers\[1\]: .*T_max"):
        build_scheduler(bad, opt(), total_steps=8)
    whole = OmegaConf.create({**sequential, "schedulers": [
        warm, {k: v for k, v in decay.items() if k != "_partial_"}]})  # fmt: skip
    with pytest.raises(ConfigError, match=r"scheduler.schedulers\[1\]: give each part a "
                       r"_target_ and _partial_: true"):  # fmt: skip
        build_scheduler(whole, opt(), total_steps=8)


@pytest.mark.parametrize(
    "overrides, match",
    [
        # an optimizer stepping with a closure, a scheduler stepping with an argument
        (
            ["~optimizer", "+optimizer._target_=torch.optim.LBFGS", "+optimizer._partial_=true"],
            r"optimizer._target_: torch.optim.lbfgs.LBFGS.step\(\) needs a closure",
        ),
        (
            [
                "~scheduler",
                "+scheduler._target_=torch.optim.lr_scheduler.StepLR",
                "+scheduler.step_size=5",
            ],
            r"scheduler: the trainer calls torch.optim.lr_scheduler.StepLR with the optimizer: "
            r"add _partial_: true",
        ),
        (
            ["optimizer._target_=torch.optim.RMSprop"],
            r"optimizer.betas: torch.optim.rmsprop.RMSprop has no parameter 'betas'"
            r".*the preset's keys",
        ),
        (  # (torch's own RuntimeError named no key: a probe)
            ["optimizer.fused=true", "+optimizer.foreach=true"],
            r"optimizer: fused=true and foreach=true together, which torch refuses",
        ),
    ],
    ids=["lbfgs", "no_partial", "preset_target_replaced", "fused_and_foreach"],
)
def test_an_optimizer_or_scheduler_the_loop_cannot_use_is_refused_before_training(
    overrides, match
) -> None:
    """LBFGS failed at the first step (no closure), after the first update; a scheduler file
    without _partial_ was told to set an optimizer in YAML; a preset given another _target_
    failed with a raw TypeError while building (a probe's findings)."""
    with pytest.raises(ConfigError, match=match):
        validate(make_cfg(*overrides))


def test_a_trainer_built_by_hand_refuses_a_plateau_scheduler_against_its_metric() -> None:
    """ReduceLROnPlateau in mode min on val/acc cuts the learning rate while accuracy rises:
    run() refused it, a Trainer built by hand stepped it unchecked (a probe: lr halved every
    epoch as val/acc went 0.75 to 0.94). Its fit() refuses it before training; and a plain
    DataLoader as the validation loader is refused when the Trainer is built (it failed
    after an epoch's training, "not enough values to unpack")."""
    from torch.utils.data import DataLoader, TensorDataset

    from trainer.data.base import InMemoryLoader, TensorSplit
    from trainer.loop import Trainer
    from trainer.losses import CrossEntropy

    model = torch.nn.Linear(4, 3)
    split = TensorSplit(torch.randn(16, 4), torch.randint(0, 3, (16,)))
    loader = InMemoryLoader(split, 8, torch.device("cpu"), shuffle=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    trainer = Trainer(model, opt, loader, loader, criterion=CrossEntropy(),
                      device=torch.device("cpu"), scheduler=plateau, max_epochs=2)  # fmt: skip
    with pytest.raises(ConfigError, match=r"ReduceLROnPlateau steps on val/acc .* mode=min"):
        trainer.fit()
    assert trainer.global_step == 0
    plain = DataLoader(TensorDataset(split.x, split.y), batch_size=8)
    with pytest.raises(TypeError, match=r"val_loader is a DataLoader without set_epoch"):
        Trainer(model, opt, loader, plain, criterion=CrossEntropy(), device=torch.device("cpu"))


@pytest.mark.parametrize(
    ("argument", "match"),
    [
        ({"accumulate_grad_batches": -1}, r"accumulate_grad_batches: got -1, must be >= 1"),
        ({"accumulate_grad_batches": 0}, r"accumulate_grad_batches: got 0"),
        ({"max_epochs": -1}, r"max_epochs: got -1, must be >= 1"),
        ({"max_steps": 0}, r"max_steps: got 0, must be >= 1, or -1"),
        ({"grad_clip": -1.0}, r"grad_clip: got -1.0, must be >= 0"),
        ({"precision": "fp16"}, r"precision: got 'fp16', expected '32', 'bf16' or '16'"),
        ({"log_every_n_steps": 0}, r"log_every_n_steps: got 0"),
    ],
)
def test_a_trainer_built_by_hand_checks_its_numbers(argument, match) -> None:
    """The config's schema checks these; a Trainer built by hand took them: accumulation of
    -1 never ended an epoch, 0 divided by zero, max_epochs=-1 trained nothing, grad_clip=-1
    clipped nothing, 'fp16' failed with a KeyError (a probe)."""
    from trainer.data.base import InMemoryLoader, TensorSplit
    from trainer.loop import Trainer
    from trainer.losses import CrossEntropy

    model = torch.nn.Linear(4, 3)
    split = TensorSplit(torch.randn(16, 4), torch.randint(0, 3, (16,)))
    loader = InMemoryLoader(split, 8, torch.device("cpu"), shuffle=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with pytest.raises(ValueError, match=f"Trainer: {match}"):
        Trainer(model, opt, loader, loader, criterion=CrossEntropy(), device=torch.device("cpu"),
                **argument)  # fmt: skip


def test_a_cuda_device_index_must_be_below_the_device_count(monkeypatch) -> None:
    """With one CUDA device, ``cuda:0`` is it and ``cuda:1`` is refused naming the key and the
    count (``>`` for ``>=``, a mutation the suite missed, let ``cuda:1`` through, to fail at the
    first tensor moved there)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(ConfigError, match=r"trainer.device: got 'cuda:1' but only 1 CUDA"):
        resolve_device("cuda:1")


def test_the_cached_schema_is_not_changed_by_the_configs_validated_against_it() -> None:
    """``validate`` merges every config into one schema built per process: the merge copies
    it, so configs validated before (one refused among them, one with a key added) leave it
    equal to a fresh one, and a config validated after gets the same result as at first."""
    from trainer.config import TrainConfig, _schema

    first = validate(make_cfg("optimizer=sgd", "optimizer.lr=0.3"))
    for refused in ("optimizer.lr=-1", "+trainer.extra_note=1"):
        with pytest.raises(ConfigError):
            validate(make_cfg(refused))
    validate(make_cfg("model=cnn", "trainer.max_steps=3", "scheduler=cosine"))
    fresh = OmegaConf.structured(TrainConfig)
    assert OmegaConf.to_yaml(_schema()) == OmegaConf.to_yaml(fresh)
    assert OmegaConf.is_struct(_schema()) == OmegaConf.is_struct(fresh)
    assert validate(make_cfg("optimizer=sgd", "optimizer.lr=0.3")) == first
