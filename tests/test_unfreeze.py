"""A layer frozen when the trainer is built and unfrozen by a callback mid-run (gradual
unfreezing): the guard, clipping, ``grad_norm/total`` and the instruments cover it from then on,
checked against the gradients recorded by an independent callback."""

from __future__ import annotations

import logging
import math
import shutil

import pytest
import torch
from conftest import final_params, read_scalars, train
from torch import nn
from torch.func import functional_call, grad, vmap

from trainer.callbacks import Callback

LR, CLIP = 0.1, 0.05
STEPS = ["~model", f"+model._target_={__name__}.Partly", "data=synthetic", "data.num_train=256",
         "data.num_val=64", "data.batch_size=32", "optimizer=sgd", "optimizer.momentum=0",
         f"optimizer.lr={LR}", "trainer.max_steps=4", "logging.every_n_steps=1",
         "instrument.norms.every_n_steps=1", "instrument.per_sample.every_n_steps=1"]  # fmt: skip


class Partly(nn.Module):
    """An MLP whose middle layer starts frozen (a pretrained backbone being fine-tuned)."""

    def __init__(self, in_shape, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(math.prod(in_shape), 16)
        self.backbone = nn.Linear(16, 16)
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(16, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.backbone(torch.relu(self.fc1(x.flatten(1))))))


class Unfreeze(Callback):
    """Unfreezes the backbone after step ``after``; records each step's gradients (all of
    the model's, before clipping), weights and the per-sample gradient norms by torch.func."""

    def __init__(self, after: int = 2) -> None:
        self.after = after
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.before: dict[str, torch.Tensor] = {}
        self.updates: dict[int, dict[str, torch.Tensor]] = {}
        self.per_sample: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, batch) -> None:
        self.batch = batch

    def on_before_optimizer_step(self, trainer, optimizer) -> None:
        model, step = trainer.model, trainer.global_step
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

        def loss(ps, x, y):
            out = functional_call(model, ps, (x[None],))
            return torch.nn.functional.cross_entropy(out, y[None])

        # (after the backward: the instrument's hooks are gone, this forward is not measured)
        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, self.batch.x, self.batch.y)
        sq = sum(v.flatten(1).double().square().sum(1) for v in g.values())
        self.per_sample[step] = sq.sqrt()
        named = model.named_parameters()
        self.grads[step] = {n: p.grad.clone() for n, p in named if p.grad is not None}
        self.before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    def on_train_step_end(self, trainer, out) -> None:
        self.updates[out.step] = {
            n: p.detach() - self.before[n] for n, p in trainer.model.named_parameters()
        }
        if out.step == self.after:
            trainer.model.backbone.requires_grad_(True)


def total(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))


def test_a_layer_unfrozen_mid_run_is_counted_clipped_and_measured(tmp_path) -> None:
    rec = Unfreeze(after=2)
    train(tmp_path, *STEPS, f"trainer.grad_clip={CLIP}", callbacks=[rec])
    scalars = read_scalars(tmp_path)
    assert sorted(rec.grads[2]) == ["fc1.bias", "fc1.weight", "head.bias", "head.weight"]
    assert "backbone.weight" in rec.grads[3]  # (the recorder sees every gradient)
    for step in (1, 2, 3, 4):
        norm = total(rec.grads[step])
        assert dict(scalars["grad_norm/total"])[step] == pytest.approx(norm, rel=1e-6)
        assert norm > CLIP  # so clipping scaled every gradient down, the unfrozen one too
        coef = CLIP / norm
        for name, g in rec.grads[step].items():  # plain SGD: Δθ = −lr · coef · g
            torch.testing.assert_close(rec.updates[step][name], -LR * coef * g, rtol=1e-4,
                                       atol=1e-7)  # fmt: skip
        # the total after clipping, measured: the clip value
        assert dict(scalars["grad_norm/total_clipped"])[step] == pytest.approx(CLIP, rel=1e-5)
        # per-sample norms over every trainable parameter, the unfrozen layer too
        assert dict(scalars["per_sample/coverage"])[step] == 1.0
        want = rec.per_sample[step]
        got = dict(scalars["per_sample/grad_norm_mean"])[step]
        assert got == pytest.approx(float(want.mean()), rel=1e-5)
    frozen = rec.updates[2]["backbone.weight"]
    assert torch.equal(frozen, torch.zeros_like(frozen))
    for tag in ("grad_norm/backbone.weight", "update_ratio/backbone.bias"):
        assert [s for s, _ in scalars[tag]] == [3, 4], tag
    norms = [v for _, v in scalars["grad_norm/backbone.weight"]]
    want = [float(rec.grads[s]["backbone.weight"].norm()) for s in (3, 4)]
    assert norms == pytest.approx(want, rel=1e-6)


class PoisonBackbone(Unfreeze):
    """Also puts a NaN into the unfrozen layer's gradient on step 3."""

    def on_after_backward(self, trainer, batch, losses, weights) -> None:
        if trainer.global_step + 1 == 3:
            trainer.model.backbone.weight.grad.view(-1)[0] = float("nan")

    def on_train_step_end(self, trainer, out) -> None:
        super().on_train_step_end(trainer, out)
        where = None if out.skip_where is None else bool(out.skip_where)  # (a test: reads)
        self.skips = getattr(self, "skips", []) + [(out.skipped, where)]


@pytest.mark.parametrize("sync", ["step", "deferred"])
def test_the_guard_checks_a_layer_unfrozen_mid_run(tmp_path, sync, caplog) -> None:
    rec = PoisonBackbone(after=2)
    with caplog.at_level(logging.WARNING):
        train(tmp_path, *STEPS, "instrument.nonfinite.policy=skip",
              f"instrument.nonfinite.sync={sync}", callbacks=[rec])  # fmt: skip
    for name, delta in rec.updates[3].items():  # skipped: nothing moved
        assert torch.equal(delta, torch.zeros_like(delta)), name
    assert all(torch.isfinite(p).all() for p in rec.before.values())
    assert any(d.abs().max() > 0 for d in rec.updates[4].values())
    assert read_scalars(tmp_path)["nonfinite/skipped_steps"] == [(3, 1.0)]
    # what on_train_step_end is told: on the host (step mode), or as the device flag
    if sync == "step":
        assert rec.skips == [(False, None), (False, None), (True, None), (False, None)]
    else:
        assert rec.skips == [(False, False), (False, False), (False, True), (False, False)]
    assert "backbone.weight" in caplog.text


class UnfreezeMidWindow(Unfreeze):
    """Unfreezes after the first micro-batch of step 2's window (accumulation 2)."""

    def on_after_backward(self, trainer, batch, losses, weights) -> None:
        if trainer.global_step + 1 == 2 and not trainer.model.backbone.weight.requires_grad:
            trainer.model.backbone.requires_grad_(True)

    def on_train_step_end(self, trainer, out) -> None:
        self.updates[out.step] = {}


def test_per_sample_norms_skip_a_window_whose_parameters_changed(tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        train(tmp_path, *STEPS, "trainer.accumulate_grad_batches=2",
              callbacks=[UnfreezeMidWindow()])  # fmt: skip
    scalars = read_scalars(tmp_path)
    # step 2's first micro-batch was measured without the backbone: the step logs none
    assert [s for s, _ in scalars["per_sample/grad_norm_mean"]] == [1, 3, 4]
    assert [v for _, v in scalars["per_sample/coverage"]] == [1.0, 1.0, 1.0]
    assert "step 2 is not measured: the trainable parameters changed" in caplog.text
    assert [s for s, _ in scalars["grad_norm/backbone.weight"]] == [2, 3, 4]


class FreezeAfterBackward(Unfreeze):
    """Freezes fc1 in step 2's on_after_backward, its gradient of the step already there (a
    NaN put into it with ``nan``); records as Unfreeze does."""

    def __init__(self, nan: bool = False) -> None:
        super().__init__(after=0)
        self.nan = nan

    def on_after_backward(self, trainer, batch, losses, weights) -> None:
        if trainer.global_step + 1 == 2:
            if self.nan:
                trainer.model.fc1.weight.grad.view(-1)[0] = float("nan")
            trainer.model.fc1.requires_grad_(False)


@pytest.mark.parametrize("nan", [False, True])
def test_a_layer_frozen_with_its_gradient_there_is_not_updated(tmp_path, nan) -> None:
    """Its gradient of the step is dropped: not applied unclipped and unchecked (a reviewer
    found fc1 moved by −lr·g, the clip left out, and a NaN there reached the weights)."""
    rec = FreezeAfterBackward(nan=nan)
    train(tmp_path, *STEPS, f"trainer.grad_clip={CLIP}", "instrument.nonfinite.policy=skip",
          callbacks=[rec])  # fmt: skip
    for step in (2, 3, 4):
        assert "fc1.weight" not in rec.grads[step]
        for name in ("fc1.weight", "fc1.bias"):
            assert torch.equal(rec.updates[step][name], torch.zeros_like(rec.before[name]))
        coef = CLIP / total(rec.grads[step])  # the others: clipped together, without fc1
        update, g = rec.updates[step]["head.weight"], rec.grads[step]["head.weight"]
        torch.testing.assert_close(update, -LR * coef * g, rtol=1e-4, atol=1e-7)
    assert all(torch.isfinite(p).all() for p in rec.before.values())
    assert "nonfinite/skipped_steps" not in read_scalars(tmp_path)


class UnfreezeForResume(Callback):
    """Unfreezes the backbone after step 1, and again when a run resumed past it starts (the
    resumed model is built with it frozen)."""

    def on_fit_start(self, trainer) -> None:
        if trainer.global_step >= 1:
            trainer.model.backbone.requires_grad_(True)

    def on_train_step_end(self, trainer, out) -> None:
        if out.step == 1:
            trainer.model.backbone.requires_grad_(True)


def test_a_run_resumed_after_unfreezing_measures_what_the_uninterrupted_one_does(tmp_path):
    """The gradients kept for the next step's agreement are checkpointed by parameter name:
    by position, the resumed run (built with fewer trainable parameters) crashed."""
    steps = [*STEPS[:-2], "instrument.norms.every_n_steps=2", "instrument.norms.agreement=true",
             "trainer.checkpoint.every_n_steps=3", "trainer.max_steps=6"]  # fmt: skip
    whole, rest = whole_and_resumed(tmp_path, steps, UnfreezeForResume)
    tag = "grad_agreement/consecutive"
    assert [s for s, _ in whole[tag]] == [2, 4, 6]
    assert [(s, v) for s, v in whole[tag] if s > 3] == rest[tag]


def whole_and_resumed(tmp_path, steps: list[str], callback) -> tuple[dict, dict]:
    """A run of ``steps`` with ``callback()``, and a copy of it resumed from its step 3 with a
    new ``callback()``: their scalars (the resumed one's: what it wrote); their final
    parameters asserted bitwise equal."""
    train(tmp_path / "whole", *steps, callbacks=[callback()])
    shutil.copytree(tmp_path / "whole", tmp_path / "rest")
    shutil.rmtree(tmp_path / "rest" / "tb")  # (only what the resumed run writes)
    step3 = tmp_path / "rest" / "checkpoints" / "step_000000003.pt"
    train(tmp_path / "rest", *steps, f"trainer.resume={step3}", callbacks=[callback()])
    a, b = final_params(tmp_path / "whole"), final_params(tmp_path / "rest")
    assert all(torch.equal(a[k], b[k]) for k in a)
    return read_scalars(tmp_path / "whole"), read_scalars(tmp_path / "rest")


class UnfreezeOnce(Callback):
    """Unfreezes the backbone after step 1 and does nothing on a resume (the README's
    pattern): a run resumed past step 1 relies on the checkpoint's ``requires_grad``."""

    def on_train_step_end(self, trainer, out) -> None:
        if out.step == 1:
            trainer.model.backbone.requires_grad_(True)


class UnfreezeFromStep(Callback):
    """Unfreezes the backbone before each micro-batch from step 2 on (stateless)."""

    def on_train_batch_start(self, trainer, batch) -> None:
        if trainer.global_step >= 1:
            trainer.model.backbone.requires_grad_(True)


@pytest.mark.parametrize("callback", [UnfreezeOnce, UnfreezeFromStep])
def test_a_resumed_run_keeps_the_trainable_flags_of_its_checkpoint(tmp_path, callback) -> None:
    """The checkpoint keeps which parameters train. Before, a run resumed after an unfreezing
    callback had fired trained the layer frozen (its tags stopped, its weights differed) with
    no warning; re-applied by a callback before the first micro-batch, the change left that
    step's per-sample norms out and shifted the noise scale's running average."""
    steps = [*STEPS[:-1], "instrument.per_sample.every_n_steps=1",
             "instrument.norms.every_n_steps=2", "trainer.checkpoint.every_n_steps=3",
             "trainer.max_steps=6"]  # fmt: skip
    whole, rest = whole_and_resumed(tmp_path, steps, callback)
    assert "grad_norm/backbone.weight" in rest and "per_sample/noise_scale_ema" in rest
    later = {tag: [(s, v) for s, v in points if s > 3] for tag, points in whole.items()}
    assert rest == {tag: points for tag, points in later.items() if points}


class FreezeOnce(Callback):
    """Freezes ``fc1`` (trainable when the model is built) after step 2 and does nothing on
    a resume: a run resumed past step 2 relies on the checkpoint's ``requires_grad``."""

    def on_train_step_end(self, trainer, out) -> None:
        if out.step == 2:
            trainer.model.fc1.requires_grad_(False)


def test_a_layer_frozen_mid_run_stays_frozen_when_resumed(tmp_path, caplog) -> None:
    """The checkpoint's ``requires_grad`` is put back both ways: a layer a callback froze at
    step 2, resumed from step 3, trains no more (its weights those of step 2's checkpoint)
    and the run ends bitwise as the uninterrupted one. The flags are set when the model is
    built, before anything selects among its parameters (data-parallel: DDP's reducer, which
    cannot follow a later change), so the Trainer finds them as saved: one line says so, and
    none reports a change of the trainable set at step 3 that no callback made. With every
    flag set back to True there (a mutation the suite missed; only an unfreezing was tested),
    the Trainer froze ``fc1`` again when loading the checkpoint, and said so."""
    steps = [*STEPS[:-4], "instrument=none", "trainer.max_steps=4",
             "trainer.checkpoint.every_n_steps=1", "trainer.checkpoint.keep_last=10"]  # fmt: skip
    caplog.set_level(logging.INFO, logger="trainer")
    whole_and_resumed(tmp_path, steps, FreezeOnce)
    from trainer.checkpoint import load_checkpoint

    step2 = load_checkpoint(tmp_path / "whole" / "checkpoints" / "step_000000002.pt")["model"]
    end = final_params(tmp_path / "rest")
    assert torch.equal(end["fc1.weight"], step2["fc1.weight"])
    assert not torch.equal(end["head.weight"], step2["head.weight"])
    restored = [r.getMessage() for r in caplog.records
                if r.getMessage().startswith("requires_grad as the checkpoint had it")]  # fmt: skip
    assert restored == ["requires_grad as the checkpoint had it: fc1.weight=False, "
                        "fc1.bias=False"]  # fmt: skip
    changed = [r.getMessage() for r in caplog.records if "trainable parameters changed" in
               r.getMessage()]  # fmt: skip
    assert [m.split(" (")[0] for m in changed] == ["trainable parameters changed at step 2"]


class ChangeAtBatchStart(Callback):
    """Unfreezes the backbone, or freezes fc1, in on_train_batch_start of step 3's micro-batch;
    records the gradients the optimizer step sees."""

    def __init__(self, freeze: bool) -> None:
        self.freeze, self.grads = freeze, {}

    def on_train_batch_start(self, trainer, batch) -> None:
        if trainer.global_step + 1 == 3:
            layer = trainer.model.fc1 if self.freeze else trainer.model.backbone
            layer.requires_grad_(not self.freeze)

    def on_before_optimizer_step(self, trainer, optimizer) -> None:
        named = trainer.model.named_parameters()
        self.grads[trainer.global_step] = {n for n, p in named if p.grad is not None}


@pytest.mark.parametrize("freeze", [False, True])
def test_the_input_penalty_backward_follows_a_change_made_before_it(tmp_path, freeze) -> None:
    """The penalty's backward accumulates into the trainable parameters only (``inputs``): a
    layer unfrozen in on_train_batch_start got no gradient that step, a layer frozen there
    crashed its double backward (a reviewer's findings)."""
    rec = ChangeAtBatchStart(freeze)
    train(tmp_path, *STEPS[:-1], "regularizer=[input_grad_penalty]", callbacks=[rec])
    changed = "fc1.weight" if freeze else "backbone.weight"
    assert (changed in rec.grads[2]) == freeze
    assert (changed in rec.grads[3]) != freeze
    assert (changed in rec.grads[4]) != freeze


class UnfreezeBeforeBackward(Unfreeze):
    """Unfreezes the backbone in on_before_backward of step 2 (measured: between its forward
    and its backward)."""

    def on_before_backward(self, trainer, batch, losses) -> None:
        if trainer.global_step + 1 == 2 and not trainer.model.backbone.weight.requires_grad:
            trainer.model.backbone.requires_grad_(True)

    def on_train_step_end(self, trainer, out) -> None:
        self.updates[out.step] = {}


def test_a_change_between_a_measured_forward_and_its_backward_leaves_the_step_out(
    tmp_path, caplog
) -> None:
    with caplog.at_level(logging.WARNING):
        train(tmp_path, *STEPS, callbacks=[UnfreezeBeforeBackward()])
    scalars = read_scalars(tmp_path)
    assert [s for s, _ in scalars["per_sample/grad_norm_mean"]] == [1, 3, 4]
    assert "step 2 is not measured: the trainable parameters changed" in caplog.text
    # (step 2's forward ran with the backbone frozen: its backward gives it no gradient)
    assert [s for s, _ in scalars["grad_norm/backbone.weight"]] == [3, 4]


class Swap(Callback):
    """After step 3: freezes fc1 and unfreezes the backbone (the same number of tensors), or
    (``unfreeze_only``) unfreezes the backbone (two tensors more)."""

    def __init__(self, unfreeze_only: bool) -> None:
        self.unfreeze_only = unfreeze_only

    def on_train_step_end(self, trainer, out) -> None:
        if out.step == 3:
            trainer.model.fc1.requires_grad_(self.unfreeze_only)
            trainer.model.backbone.requires_grad_(True)


@pytest.mark.parametrize("unfreeze_only", [False, True])
def test_noise_scale_values_read_after_a_change_keep_their_steps_tags(tmp_path, unfreeze_only):
    """Per-sample norms every 3 steps, logging every 5: step 3's SNRs are read at step 5, after
    the change; they went under the new parameters' tags (or crashed, with more tensors: a
    review's finding). The same as logging every step."""
    steps = [*STEPS[:-3], "instrument=none", "instrument.per_sample.every_n_steps=3",
             "trainer.max_steps=6"]  # fmt: skip
    train(tmp_path / "every", *steps, "logging.every_n_steps=1", callbacks=[Swap(unfreeze_only)])
    train(tmp_path / "late", *steps, "logging.every_n_steps=5", callbacks=[Swap(unfreeze_only)])
    every, late = read_scalars(tmp_path / "every"), read_scalars(tmp_path / "late")
    snr = sorted(t for t in every if t.startswith("grad_snr/"))
    assert snr == sorted(t for t in late if t.startswith("grad_snr/"))
    assert [s for s, _ in every["grad_snr/fc1.weight"]] == ([3, 6] if unfreeze_only else [3])
    for tag in [*snr, "per_sample/noise_scale", "per_sample/noise_scale_ema"]:
        assert every[tag] == late[tag], tag


class RegRecorder(Callback):
    """Unfreezes the backbone after step 2; records each step's weights, gradients, and the
    data gradient alone (the batch's mean cross-entropy, by autograd on the same weights)."""

    def __init__(self) -> None:
        self.weights, self.grads, self.data = {}, {}, {}

    def on_train_batch_start(self, trainer, batch) -> None:
        self.batch = batch

    def on_before_optimizer_step(self, trainer, optimizer) -> None:
        model, step = trainer.model, trainer.global_step
        named = dict(model.named_parameters())
        self.weights[step] = {n: p.detach().clone() for n, p in named.items()}
        self.grads[step] = {n: p.grad.clone() for n, p in named.items() if p.grad is not None}
        params = {n: p.detach().requires_grad_() for n, p in self.weights[step].items()}
        out = functional_call(model, params, (self.batch.x,))
        loss = torch.nn.functional.cross_entropy(out, self.batch.y)
        grads = torch.autograd.grad(loss, list(params.values()))
        self.data[step] = dict(zip(params, grads, strict=True))

    def on_train_step_end(self, trainer, out) -> None:
        if out.step == 2:
            trainer.model.backbone.requires_grad_(True)


@pytest.mark.parametrize("mode", ["scalar", "vector"])
@pytest.mark.parametrize("include", ["*", "backbone.*"])
def test_regularizers_select_again_among_the_trainable_parameters(tmp_path, include, mode) -> None:
    """l2 over the 2-D weights (``*``) or the backbone alone (frozen when the trainer is built:
    λR 0 until then, not an error, in either mode: vector mode's backward takes λR as a second
    root, which must then be left out, having no graph): after the unfreeze at step 2 the
    backbone's gradient is its data gradient plus λθ, and reg/l2 = λ/2 Σ‖θ‖² counts it (a
    probe found it left out: the data gradient only, and reg/l2 1.41 for 2.69)."""
    rec, coef = RegRecorder(), 0.5
    train(tmp_path, *STEPS[:-1], "regularizer=[l2]", f"regularizer.l2.coef={coef}",
          f"regularizer.l2.include=[{include}]", f"loss.mode={mode}", callbacks=[rec])  # fmt: skip
    reg = dict(read_scalars(tmp_path)["reg/l2"])
    for step in (1, 2, 3, 4):
        weights = rec.weights[step]
        backbone = [n.startswith("backbone") for n in weights]
        chosen = [n for (n, w), b in zip(weights.items(), backbone, strict=True)
                  if w.ndim == 2 and (include == "*" or b) and (step > 2 or not b)]  # fmt: skip
        want = coef / 2 * sum(float(weights[n].double().square().sum()) for n in chosen)
        assert reg[step] == pytest.approx(want, rel=1e-5, abs=1e-12), step
        for n in chosen:  # the applied gradient: data + λθ
            torch.testing.assert_close(rec.grads[step][n],
                                       rec.data[step][n] + coef * weights[n], rtol=1e-5,
                                       atol=1e-6)  # fmt: skip
    assert "backbone.weight" in rec.grads[3] and "backbone.weight" not in rec.grads[2]


class Half(Partly):
    """The same MLP in float16."""

    def __init__(self, in_shape, out_dim: int) -> None:
        super().__init__(in_shape, out_dim)
        self.half()


def test_a_float16_model_under_a_grad_scaler_is_refused_when_built(tmp_path) -> None:
    """torch's GradScaler cannot unscale float16 gradients: the run failed at its first step
    with torch's own message (a probe's finding); it is refused before training, naming the
    way out."""
    with pytest.raises(
        ValueError,
        match=r"trainer.precision=16 with trainable float16 parameters "
        r"\(fc1.weight, fc1.bias, head.weight …\).*trainer.precision=32 or bf16",
    ):
        train(tmp_path, "~model", f"+model._target_={__name__}.Half", "data=synthetic",
              "data.num_train=64", "data.num_val=16", "trainer.max_steps=1",
              "trainer.precision=16")  # fmt: skip


def test_fp16_trains_a_model_whose_frozen_layer_is_float16() -> None:
    """A frozen float16 layer (a half-precision backbone kept fixed) has no gradient for the
    GradScaler to unscale: torch's own AMP loop trains such a model under float16 autocast
    with a GradScaler. The trainer refused it when built, saying the scaler "cannot unscale
    float16 gradients (torch refuses it at the first step)", of parameters that never get a
    gradient. Trained here against the same hand-written torch.amp loop, bit for bit."""
    import copy

    import torch.nn.functional as F

    from trainer.data.base import InMemoryLoader, TensorSplit
    from trainer.loop import Trainer
    from trainer.losses import CrossEntropy

    torch.manual_seed(0)
    split = TensorSplit(torch.randn(16, 4), torch.randint(0, 3, (16,)))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    model[0].half().requires_grad_(False)  # the frozen float16 backbone
    reference = copy.deepcopy(model)
    loader = InMemoryLoader(split, 8, torch.device("cpu"), shuffle=False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    trainer = Trainer(model, opt, loader, loader, criterion=CrossEntropy(),
                      device=torch.device("cpu"), precision="16", max_epochs=1)  # fmt: skip
    trainer.fit()
    # torch's own recipe on the same batches (in order, two of 8)
    ref_opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.5)
    scaler = torch.amp.GradScaler("cpu")
    for i in range(2):
        x, y = split.x[8 * i : 8 * i + 8], split.y[8 * i : 8 * i + 8]
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(reference(x), y, reduction="none")
        scaler.scale(loss @ torch.full((8,), 1 / 8)).backward()
        scaler.unscale_(ref_opt)
        scaler.step(ref_opt)
        scaler.update()
        ref_opt.zero_grad()
    assert trainer.global_step == 2
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b), name

    class Unfreezes(Callback):
        def on_train_step_end(self, trainer, out) -> None:
            trainer.model[0].requires_grad_(True)

    model[0].requires_grad_(False)
    again = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.5), loader, loader,
                    criterion=CrossEntropy(), device=torch.device("cpu"), precision="16",
                    max_epochs=1, callbacks=[Unfreezes()])  # fmt: skip
    with pytest.raises(ValueError, match=r"trainable float16 parameters \(0.weight, 0.bias "
                       r"made trainable at step 1\)"):  # fmt: skip
        again.fit()
