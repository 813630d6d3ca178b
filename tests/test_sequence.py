"""Per-token losses (B, T): the loss, its averages, vector backward with (B, T) weights,
accumulation over tokens, the per_token weighting, sequence metrics and the character LM."""

from __future__ import annotations

import collections
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import final_params, make_cfg, read_scalars, train
from torch import nn
from torch.func import functional_call, grad, vmap

from trainer.backward import WeightError, backward_vector
from trainer.config import ConfigError, validate
from trainer.data.base import Batch, DataModule, InMemoryLoader, TensorSplit
from trainer.data.chars import CharText, windows
from trainer.distributed import SINGLE
from trainer.instrument.per_sample import PerSampleNorms, sample_coefficients
from trainer.loop import Callback, Trainer
from trainer.losses import Loss, TokenCrossEntropy
from trainer.objective import Objective, Window
from trainer.run import build_trainer
from trainer.weighting import (
    ClassBalancedWeighting,
    PerSampleWeighting,
    PerTokenWeighting,
    UniformWeighting,
    Weighting,
)

PAD = -100
CPU = torch.device("cpu")


class TinyLM(nn.Module):
    """Embedding -> LayerNorm -> Linear: per-token logits, no mixing across positions."""

    def __init__(self, vocab: int = 7, d: int = 5, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(vocab, d, dtype=dtype)
        self.norm = nn.LayerNorm(d, dtype=dtype)
        self.head = nn.Linear(d, vocab, dtype=dtype)
        for p in self.parameters():
            nn.init.normal_(p, generator=g)

    def forward(self, tokens):  # (B, T) -> (B, T, V)
        return self.head(self.norm(self.embed(tokens)))


def token_batch(b: int = 4, t: int = 6, vocab: int = 7, seed: int = 0):
    """Tokens and next-token targets with ragged padding (one sequence fully padded)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(vocab, (b, t), generator=g)
    y = torch.randint(vocab, (b, t), generator=g)
    lengths = [t, t - 2, 1, 0][:b] + [t] * max(0, b - 4)
    for i, n in enumerate(lengths):
        y[i, n:] = PAD
    return x, y


def grads_of(model) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


# ----------------------------------------------------------------------------- the loss


def test_token_cross_entropy_is_per_token_and_zero_on_padding() -> None:
    model = TinyLM()
    x, y = token_batch()
    logits = model(x)
    losses = TokenCrossEntropy()(logits, y)
    assert losses.shape == y.shape
    for i in range(y.shape[0]):  # independent reference: one token at a time
        for t in range(y.shape[1]):
            if y[i, t] == PAD:
                assert losses[i, t] == 0
            else:
                expected = -torch.log_softmax(logits[i, t], dim=-1)[y[i, t]]
                torch.testing.assert_close(losses[i, t], expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"logits \(B, T, V\) and targets \(B, T\)"):
        TokenCrossEntropy()(logits[:, 0], y)


def reference_average(losses: torch.Tensor, y: torch.Tensor, average: str) -> torch.Tensor:
    """The averages written out with Python loops over sequences and tokens."""
    per_sequence, tokens = [], []
    for i in range(y.shape[0]):
        valid = [losses[i, t] for t in range(y.shape[1]) if y[i, t] != PAD]
        tokens += valid
        if valid:
            per_sequence.append(sum(valid) / len(valid))
    if average == "tokens":
        return sum(tokens) / len(tokens)
    return sum(per_sequence) / len(per_sequence)


@pytest.mark.parametrize("average", ["tokens", "sequences"])
def test_scalar_root_is_the_loss_average_and_vector_uniform_gives_its_gradient(average) -> None:
    model = TinyLM()
    x, y = token_batch()
    loss = TokenCrossEntropy(average=average)
    params = list(model.parameters())
    window = Window(samples=y.shape[0], units=loss.units(y).sum())
    objective = Objective(loss, None, (), params)

    losses = loss(model(x), y)
    units = objective.check_losses(losses, y)  # the loss's units, in the losses' dtype
    root = objective.scalar_root(losses, units, y, window)
    torch.testing.assert_close(root, reference_average(losses, y, average), rtol=1e-12, atol=0)
    root.backward()
    scalar = grads_of(model)

    reference_average(loss(model(x), y), y, average).backward()
    reference = grads_of(model)

    vector = Objective(loss, UniformWeighting(), (), params)
    logits = model(x)
    weights, _ = vector.backward(
        loss(logits, y), logits, (x, y, torch.arange(4)), window, last=True, logs=False
    )
    assert weights is not None and weights.shape == y.shape
    uniform = grads_of(model)
    for a, b, ref in zip(scalar, uniform, reference, strict=True):
        torch.testing.assert_close(a, ref, rtol=1e-12, atol=1e-14)
        assert torch.equal(a, b)  # scalar == vector-uniform, bit for bit


def test_vector_backward_with_per_token_weights_is_the_vjp_of_the_weighted_sum() -> None:
    model = TinyLM()
    x, y = token_batch()
    loss = TokenCrossEntropy()
    w = torch.rand(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    backward_vector(loss(model(x), y), w)  # losses.backward(gradient=w), w of shape (B, T)
    vjp = grads_of(model)
    (w * loss(model(x), y)).sum().backward()
    weighted_sum = grads_of(model)

    # independent reference: per-token gradients from torch.func, weighted by hand
    params = {k: v.detach() for k, v in model.named_parameters()}

    def token_loss(p, xi, yi, t):
        logits = functional_call(model, p, (xi[None],))[0, t]
        return F.cross_entropy(logits[None], yi[t][None], ignore_index=PAD, reduction="sum")

    reference = {k: torch.zeros_like(v) for k, v in params.items()}
    for t in range(y.shape[1]):
        per_sample = vmap(grad(token_loss), in_dims=(None, 0, 0, None))(params, x, y, t)
        for k in params:
            reference[k] += torch.einsum("b,b...->...", w[:, t], per_sample[k])
    for a, b, ref in zip(vjp, weighted_sum, reference.values(), strict=True):
        torch.testing.assert_close(a, ref, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(b, ref, rtol=1e-12, atol=1e-13)
    with pytest.raises(WeightError, match=r"\(4,\) do not match the losses of shape \(4, 6\)"):
        backward_vector(loss(model(x), y), w[:, 0])  # never broadcast silently


# ----------------------------------------------------------------------------- weightings


@pytest.mark.parametrize("average", ["tokens", "sequences"])
def test_per_sequence_weights_are_broadcast_explicitly_over_the_units(tmp_path, average) -> None:
    x, y = token_batch()
    loss = TokenCrossEntropy(average=average)
    units = loss.units(y)
    table = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
    weighting = PerSampleWeighting(str(tmp_path / "unused.pt"))
    weighting.table = table
    losses = torch.rand(y.shape, dtype=torch.float64)
    w = weighting(losses, losses, y, torch.arange(4), units.double())
    r = table[:, None] * units
    torch.testing.assert_close(w, r / r.sum(), rtol=1e-15, atol=0)
    assert float(w.sum()) == pytest.approx(1.0, rel=1e-15)
    assert torch.all(w[y == PAD] == 0)

    class Wrong(Weighting):
        def raw(self, losses, logits, targets, indices):
            return torch.ones(3, dtype=losses.dtype)

    with pytest.raises(ValueError, match=r"shape \(3,\) fit neither the losses \(4, 6\)"):
        Wrong()(losses, losses, y, torch.arange(4), units)


def test_per_token_weighting_is_the_inverse_token_frequency(tmp_path) -> None:
    data = CharText(block_size=16, stride=16)
    data.setup(CPU, 0)
    weighting = PerTokenWeighting(power=0.5)
    weighting.check_loss(TokenCrossEntropy())
    weighting.setup(data, CPU)
    counts = collections.Counter(int(t) for t in data.train_targets.flatten() if t != PAD)
    n, seen = sum(counts.values()), len(counts)
    for token in range(data.vocab_size):
        expected = (n / (seen * counts[token])) ** 0.5 if counts[token] else 0.0
        assert float(weighting.token_weights[token]) == pytest.approx(expected, rel=1e-6)
    y = data.train_loader.y[:8].clone()
    y[0, 5:] = PAD
    losses = torch.rand(y.shape)
    w = weighting(losses, losses, y, torch.arange(8), TokenCrossEntropy().units(y))
    r = torch.where(y == PAD, 0.0, weighting.token_weights[y.clamp_min(0)])
    torch.testing.assert_close(w, r / r.sum(), rtol=1e-6, atol=0)


class OwnTokenNLL(Loss):
    """A per-token loss of one's own: (B, T) with units, and no ``ignore_index`` attribute
    (torch's -100 is its padding)."""

    task = "sequence"

    def forward(self, output, target):
        return F.cross_entropy(output.transpose(1, 2), target, reduction="none")

    def units(self, target, dtype=torch.float32):
        return (target != PAD).to(dtype)


def test_per_token_weighting_takes_a_token_loss_of_ones_own() -> None:
    """The contract asks a per-token loss for ``forward`` and ``units``: per_token refused one
    without the built-in's ``ignore_index`` ("the loss ... (task sequence) is not one"). Its
    table is the built-in's (padding, a negative target, not counted); a sequence loss with
    one loss per sequence is refused, naming what it lacks."""
    data = CharText(block_size=16, stride=16)
    data.setup(CPU, 0)
    tables = []
    for loss in (TokenCrossEntropy(), OwnTokenNLL()):
        weighting = PerTokenWeighting(power=0.5)
        weighting.check_loss(loss)
        weighting.setup(data, CPU)
        tables.append(weighting.token_weights)
    assert torch.equal(*tables)
    with pytest.raises(ValueError, match=r"SequenceNLL gives none \(it defines no units"):
        PerTokenWeighting().check_loss(SequenceNLL())


class PadZeroNLL(OwnTokenNLL):
    """A per-token loss of one's own whose padding is token 0 (its units say so)."""

    def forward(self, output, target):
        return F.cross_entropy(output.transpose(1, 2), target, reduction="none") * (target != 0)

    def units(self, target, dtype=torch.float32):
        return (target != 0).to(dtype)


def test_per_token_weights_count_the_tokens_a_losss_units_count() -> None:
    """The table counts the tokens the loss's units weigh: a loss of one's own padding with
    id 0 had its padding counted (a review: real tokens weighted 1.71 times too high with
    normalize=none). By brute force over the valid tokens."""
    targets = torch.tensor([[1, 2, 0, 0], [3, 1, 1, 0], [2, 0, 0, 0]])
    data = SimpleNamespace(
        vocab_size=4,
        out_dim=4,
        train_targets=targets,
        train_loader=SimpleNamespace(global_batch_size=3),
    )
    weighting = PerTokenWeighting(power=1.0, normalize="none")
    weighting.check_loss(PadZeroNLL())
    weighting.setup(data, CPU)  # type: ignore[arg-type]
    valid = collections.Counter(int(t) for t in targets.flatten() if t != 0)
    n, seen = sum(valid.values()), len(valid)
    want = [n / (seen * valid[v]) if valid[v] else 0.0 for v in range(4)]
    assert weighting.token_weights.tolist() == pytest.approx(want, rel=1e-6)


def test_weightings_that_do_not_fit_token_losses_are_refused() -> None:
    base = ["experiment=chars_lm", "loss.mode=vector", "trainer.max_steps=1"]
    for weighting, message in [  # (each naming the weighting that fits: until 2026-12-07
        # the class-label ones named uniform and per_sample only, a probe's)
        ("hard_topk", "ranks whole samples' losses"),
        ("focal", "reads class labels"),
        ("class_balanced", "reads class labels"),
    ]:
        with pytest.raises(ValueError, match=message + ".* or per_token$"):
            build_trainer(make_cfg(*base, f"weighting={weighting}"), run_dir=None)
    with pytest.raises(ValueError, match="weights the tokens of a sequence loss"):
        PerTokenWeighting().check_loss(__import__("trainer.losses").losses.CrossEntropy())
    with pytest.raises(ConfigError, match="needs int64 token targets of shape"):
        TokenCrossEntropy().check(_digits())
    with pytest.raises(ConfigError, match=r"\(token sequences: loss=token_cross_entropy\)"):
        build_trainer(make_cfg("data=chars", "model=char_transformer"), run_dir=None)


def _digits():
    from trainer.data.digits import DigitsData

    data = DigitsData(batch_size=8)
    data.setup(CPU, 0)
    return data


# ----------------------------------------------------------------------------- the trainer


def fit(model, y_batches, accumulate: int, batch_size: int, weighting=None, steps: int = 3):
    x, y = y_batches
    split = TensorSplit(x, y)
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.5),
        InMemoryLoader(split, batch_size, CPU, shuffle=False),
        InMemoryLoader(split, 16, CPU, shuffle=False),
        criterion=TokenCrossEntropy(),
        device=CPU,
        weighting=weighting,
        accumulate_grad_batches=accumulate,
        max_steps=steps,
        max_epochs=10,
    )
    trainer.fit()
    return [p.detach().clone() for p in model.parameters()], trainer


class OwnUniform(UniformWeighting):
    """The uniform weighting, as a weighting of one's own: the general path (each
    micro-batch's normalized weights times its units' share of the window), not the built-in
    uniform's shortcut to scalar mode's coefficients."""


@pytest.mark.parametrize("weighting", [None, UniformWeighting(), OwnUniform()],
                         ids=["scalar", "vector", "vector-general"])  # fmt: skip
def test_accumulation_over_tokens_equals_one_big_batch(weighting) -> None:
    # 2 micro-batches of 4 sequences with different valid-token counts vs one batch of 8: the
    # window's token count normalizes both (read ahead, not each micro-batch's own count; a
    # mutation taking the samples' share instead of the units' went unseen on the shortcut)
    x1, y1 = token_batch(4, 6, seed=1)
    x2, y2 = token_batch(4, 6, seed=2)
    y2[:, 3:] = PAD  # the second micro-batch holds fewer tokens
    data = (torch.cat([x1, x2]), torch.cat([y1, y2]))
    accumulated, trainer = fit(TinyLM(), data, accumulate=2, batch_size=4, weighting=weighting)
    big, _ = fit(TinyLM(), data, accumulate=1, batch_size=8, weighting=weighting)
    # float64, SGD: the two differ only by the order of ≤ 2·8·6 = 96 summands per gradient
    # element (relative rounding ≤ 96 · 2^-53 ≈ 1e-14 per step); 1e-11 leaves 1000x margin
    for a, b in zip(accumulated, big, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    assert trainer.global_step == 3
    # train/loss of the epoch: Σ valid-token losses / valid tokens (not a mean over (B, T))
    assert trainer.metrics["train/loss"] > 0


def test_an_epochs_ragged_last_window_of_token_losses_is_trained_and_ends_the_epoch() -> None:
    """Three micro-batches an epoch, accumulating 2: the last window holds one (read ahead up
    to the epoch's end, not to a second micro-batch that never comes: the epoch then never
    ended, validating again and again at the same step). Two epochs equal batches of 8 and
    4 sequences, one step each."""

    class AtMostTwoValidations(Callback):  # (stops a loop that never ends the epoch)
        calls = 0

        def on_validation_end(self, trainer, metrics) -> None:
            self.calls += 1
            assert self.calls <= 2, f"validation {self.calls} at step {trainer.global_step}"

    xs, ys = zip(*(token_batch(4, 6, seed=s) for s in (1, 2, 3)), strict=True)
    split = TensorSplit(torch.cat(xs), torch.cat(ys))
    params, steps = [], []
    for accumulate, batch_size in ((2, 4), (1, 8)):
        torch.manual_seed(0)
        model = TinyLM()
        trainer = Trainer(
            model, torch.optim.SGD(model.parameters(), lr=0.5),
            InMemoryLoader(split, batch_size, CPU, shuffle=False),
            InMemoryLoader(split, 16, CPU, shuffle=False), criterion=TokenCrossEntropy(),
            device=CPU, accumulate_grad_batches=accumulate, max_steps=-1, max_epochs=2,
            callbacks=[AtMostTwoValidations()],
        )  # fmt: skip
        trainer.fit()
        params.append([p.detach().clone() for p in model.parameters()])
        steps.append(trainer.global_step)
    assert steps == [4, 4]
    # float64, SGD: the two differ only by the order of ≤ 2·8·6 = 96 summands per gradient
    # element (as test_accumulation_over_tokens_equals_one_big_batch)
    for a, b in zip(*params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


def test_the_scalar_root_of_a_window_is_its_token_average() -> None:
    # independent check of one accumulated step: the gradient equals that of the token mean
    # over both micro-batches, computed by hand
    x1, y1 = token_batch(4, 6, seed=1)
    x2, y2 = token_batch(4, 6, seed=2)
    y2[:, 3:] = PAD
    model = TinyLM()
    reference_model = TinyLM()
    loss = TokenCrossEntropy()
    x, y = torch.cat([x1, x2]), torch.cat([y1, y2])
    reference_average(loss(reference_model(x), y), y, "tokens").backward()
    objective = Objective(loss, None, (), list(model.parameters()))
    units = objective.window_units([y1, y2])
    assert int(units) == int((y != PAD).sum())
    window = Window(samples=8, batches=2, units=units)
    for i, (xb, yb) in enumerate([(x1, y1), (x2, y2)]):
        logits = model(xb)
        objective.backward(
            loss(logits, yb), logits, (xb, yb, torch.arange(4)), window, last=i == 1, logs=False
        )
    for a, b in zip(grads_of(model), grads_of(reference_model), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- per-sample norms


class SequenceFirstTinyLM(TinyLM):
    """TinyLM run sequence-first inside, (T, B, ·): its units' batch is dimension 1."""

    def forward(self, tokens):  # (B, T) -> (B, T, V)
        return super().forward(tokens.t()).transpose(0, 1)


@pytest.mark.parametrize("make", [TinyLM, SequenceFirstTinyLM], ids=["batch_first", "seq_first"])
def test_per_sequence_norms_against_torch_func(make) -> None:
    model = make()
    x, y = token_batch()
    loss = TokenCrossEntropy()
    params = list(model.parameters())
    for weighting in (None, UniformWeighting()):
        cb = measured_step(model, x, y, Objective(loss, weighting, (), params))
        model.zero_grad(set_to_none=True)

        named = {k: v.detach() for k, v in model.named_parameters()}

        def sequence_loss(p, xi, yi):  # Σ_t ℓ_t of one sequence
            return loss(functional_call(model, p, (xi[None],)), yi[None]).sum()

        per_seq = vmap(grad(sequence_loss), in_dims=(None, 0, 0))(named, x, y)
        norms = torch.sqrt(sum(g.pow(2).reshape(4, -1).sum(1) for g in per_seq.values()))
        measured = cb.last["per_sample/grad_norm"].double()
        c = 1 / float((y != PAD).sum())
        # float32 squares (the instrument's), so compared at float32 precision
        nonzero = norms > 0  # the fully padded sequence has no gradient: NaN, left out
        torch.testing.assert_close(measured[nonzero], norms[nonzero], rtol=1e-5, atol=0)
        assert torch.isnan(measured[~nonzero]).all()
        weighted = cb.last["per_sample/weighted_grad_norm"].double()
        torch.testing.assert_close(weighted[nonzero], c * norms[nonzero], rtol=1e-5, atol=1e-12)
        assert torch.isnan(weighted[~nonzero]).all()  # (no sample: no norm, weighted or not)
        assert cb.coverage() == 1.0


class ByTargetId(Weighting):
    """Per-token raw weights 1 + the target id: a sequence's tokens weighted unequally unless
    it has one token (or repeats one target)."""

    def raw(self, losses, logits, targets, indices):
        return 1.0 + targets.clamp_min(0).to(losses.dtype)


def test_unequal_token_weights_report_no_unweighted_norm_that_step() -> None:
    """With tokens weighted unequally no sequence's unweighted norm exists but those of one
    token (or one repeated target), a subset of short sequences, not the batch: none is
    reported that step (their mean and max were the one 1-token sequence's, as complete). The
    weighted norms are every non-empty sequence's."""
    model = TinyLM()
    x, y = token_batch()  # lengths 6, 4, 1, 0
    loss = TokenCrossEntropy()
    objective = Objective(loss, ByTargetId(), (), list(model.parameters()))
    objective.weighting.check_loss(loss)
    cb = measured_step(model, x, y, objective)
    assert torch.isnan(sample_coefficients(cb.weights_seen))[:2].all()  # (unequal: the longer two)
    assert torch.isnan(cb.last["per_sample/grad_norm"]).all()
    weighted = cb.last["per_sample/weighted_grad_norm"]
    assert torch.isfinite(weighted[:3]).all() and (weighted[:3] > 0).all()


def measured_step(model, x, y, objective) -> PerSampleNorms:
    """One step of per-sample norms over a batch of sequences, driven as the loop does; the
    callback (its ``last`` values), with the step's gradient weights as ``weights_seen``."""
    loss = objective.loss
    trainer = Trainer_like(model, objective, Window(x.shape[0], units=loss.units(y).sum()))
    cb = PerSampleNorms(1, loss="both")
    cb.on_fit_start(trainer)
    batch = Batch(x, y, torch.arange(x.shape[0]))
    cb.on_train_batch_start(trainer, batch)
    logits = model(x)
    losses = loss(logits, y)
    weights, _ = objective.backward(losses, logits, batch, trainer.window, last=True, logs=False)
    cb.on_after_backward(trainer, batch, losses.detach(), weights)
    trainer.global_step = 1
    cb.on_before_optimizer_step(trainer, None)
    cb.weights_seen = weights  # type: ignore[attr-defined]
    return cb


def Trainer_like(model, objective, window):
    from types import SimpleNamespace

    return SimpleNamespace(
        model=model, global_step=0, scaler=None, logger=None, world=SINGLE, window=window,
        objective=objective, stage_scalars=lambda values: None,
        stage_on_host=lambda values, fn: fn(values.tolist()),
        stage_histogram=lambda tag, v, count_nonfinite=True: None,
    )  # fmt: skip


def test_sample_coefficients_of_unequal_token_weights_are_nan() -> None:
    c = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.0], [0.0, 0.0, 0.0]])
    out = sample_coefficients(c)
    assert out[0] == 0.5 and torch.isnan(out[1]) and out[2] == 0


# ----------------------------------------------------------------------------- data and runs


def test_char_windows_cover_the_text_once_and_pad_the_tail() -> None:
    tokens = torch.arange(20)
    x, y = windows(tokens, block=8, stride=8, pad=PAD)
    assert x.shape == (3, 8)
    valid = y[y != PAD]
    assert valid.tolist() == list(range(1, 20))  # every next token predicted exactly once
    assert torch.equal(x[y != PAD] + 1, valid)
    assert (y[-1] == PAD).sum() == 5


@pytest.mark.parametrize(("n", "block", "stride"), [(9, 4, 2), (10, 4, 2), (20, 8, 3), (5, 8, 4)])
def test_char_windows_start_every_stride_and_end_at_the_last_token(n, block, stride) -> None:
    """The windows start at 0, stride, 2·stride, ... while a whole window fits, and one more
    where the text's tail is left over: never a window past the one that reaches the last
    token (it trained the tail twice as often), and every next token is a target."""
    tokens = torch.arange(n)
    x, y = windows(tokens, block=block, stride=stride, pad=PAD)
    starts, s = [], 0  # brute force: walk the text
    while True:
        starts.append(s)
        if s + block >= n - 1:  # this window reaches the last target
            break
        s += stride
    assert x[:, 0].tolist() == starts
    assert set(y[y != PAD].tolist()) == set(range(1, n))
    assert torch.equal(x[y != PAD] + 1, y[y != PAD])


def test_the_held_out_text_is_predicted_once_and_the_vocabulary_sorted() -> None:
    """Validation windows do not overlap whatever the training stride: each held-out next
    character is a target exactly once (overlapping windows counted each twice in val/*).
    Token i is the i-th character in sorted order (checkpoints depend on the ids)."""
    data = CharText(block_size=8, stride=4)
    assert data.chars == sorted(set(data.text))
    tokens = data.encode(data.text)
    cut = round((1 - data.val_fraction) * tokens.numel())
    _, val = data.load()
    targets = val.y[val.y != PAD]
    assert targets.numel() == tokens.numel() - cut - 1
    assert torch.equal(targets, tokens[cut + 1 :])  # in order, each once


def test_the_char_lm_preset_beats_a_unigram_model_and_reports_sequence_metrics(tmp_path) -> None:
    metrics = train(tmp_path, "experiment=chars_lm", "trainer.max_epochs=1")
    assert metrics["monitor"] == "val/ppl" and "val/acc" not in metrics
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-12)
    # the bar it must clear: the perplexity of the training text's character frequencies
    # (a model that ignores context) on the held-out text
    data = CharText()
    train_split, val_split = data.load()
    counts = torch.bincount(train_split.y[train_split.y != PAD], minlength=data.vocab_size)
    p = (counts.double() + 1) / (counts.sum() + data.vocab_size)  # add-one: unseen chars
    held_out = val_split.y[val_split.y != PAD]
    unigram_ppl = math.exp(float(-p[held_out].log().mean()))
    assert metrics["val/ppl"] < unigram_ppl
    scalars = read_scalars(tmp_path)
    assert {"val/loss", "val/ppl", "val/token_acc", "train/loss"} <= scalars.keys()


def test_validation_metrics_of_a_sequence_loss_by_brute_force(tmp_path) -> None:
    overrides = ["experiment=chars_lm", "trainer.max_steps=2", "model.n_layers=1"]
    train(tmp_path, *overrides)
    from trainer.models.char_lm import CharTransformer

    data = CharText()
    _, val = data.load()
    model = CharTransformer(data.vocab_size, [64], n_layers=1)
    model.load_state_dict(final_params(tmp_path))
    model.eval()
    nll, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for i in range(val.x.shape[0]):  # one sequence at a time
            logits = model(val.x[i : i + 1])[0]
            for t in range(val.y.shape[1]):
                target = int(val.y[i, t])
                if target == PAD:
                    continue
                nll -= float(torch.log_softmax(logits[t].double(), -1)[target])
                correct += int(logits[t].argmax()) == target
                n += 1
    scalars = read_scalars(tmp_path)
    assert scalars["val/loss"][-1][1] == pytest.approx(nll / n, rel=1e-5)
    assert scalars["val/token_acc"][-1][1] == pytest.approx(correct / n, abs=1e-6)
    assert scalars["val/ppl"][-1][1] == pytest.approx(math.exp(nll / n), rel=1e-5)


@pytest.mark.threads(2)  # (parallel kernels too: see conftest._one_thread)
@pytest.mark.parametrize("average", ["tokens", "sequences"])
def test_scalar_and_vector_uniform_train_the_char_lm_identically(tmp_path, average) -> None:
    small = ["experiment=chars_lm", "trainer.max_steps=4", "model.n_layers=1",
             "model.d_model=16", "model.dim_feedforward=32", "data.block_size=16",
             f"loss.average={average}"]  # fmt: skip
    train(tmp_path / "s", *small, "loss.mode=scalar")
    train(tmp_path / "v", *small, "loss.mode=vector", "weighting=uniform")
    a, b = final_params(tmp_path / "s"), final_params(tmp_path / "v")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_instrument_runs_on_the_char_lm_and_per_sample_coverage_is_honest(tmp_path) -> None:
    small = ["experiment=chars_lm_per_token", "trainer.max_steps=4", "model.n_layers=1",
             "model.d_model=16", "model.dim_feedforward=32", "data.block_size=16",
             "instrument=full", "instrument.per_sample.every_n_steps=2",
             "instrument.curvature.every_n_steps=2", "logging.every_n_steps=2"]  # fmt: skip
    train(tmp_path, *small)
    scalars = read_scalars(tmp_path)
    for tag in ("grad_norm/total", "curvature/top_eig", "curvature/trace", "weights/mean",
                "per_sample/weighted_grad_norm_mean", "per_sample/coverage"):  # fmt: skip
        assert tag in scalars, tag
        assert all(math.isfinite(v) for _, v in scalars[tag]), tag
    # the preset trains with dropout 0.1, also inside attention, whose mask a per-sample
    # recomputation cannot reproduce: the attention is left out and coverage says so (< 1)
    assert 0 < scalars["per_sample/coverage"][-1][1] < 1
    train(tmp_path / "no_dropout", *small, "model.dropout=0")  # then everything is covered
    assert read_scalars(tmp_path / "no_dropout")["per_sample/coverage"][-1][1] == 1.0


def test_the_presets_validate() -> None:
    for preset in ("chars_lm", "chars_lm_per_token"):
        typed = validate(make_cfg(f"experiment={preset}"))
        assert typed.loss.average == "tokens"


class MaskedMSE(Loss):
    """A user's per-element loss that masks by multiplying: a masked element's loss is 0 but
    its gradient is not (unlike cross-entropy's ignore_index), so only its coefficient, 0,
    keeps it out."""

    task = "regression"

    def forward(self, output, target):
        return (output - torch.nan_to_num(target)) ** 2 * ~target.isnan()

    def units(self, target, dtype=torch.float32):
        return (~target.isnan()).to(dtype)


@pytest.mark.parametrize("batches", [1, 2])
def test_a_window_without_a_unit_gives_zero_gradients_in_both_modes(batches) -> None:
    """Every element of the window masked (a ragged last batch of padding): the coefficients
    u / Σu are 0 in scalar and vector-uniform mode alike (the uniform weighting clamped Σu,
    scalar mode divided 0 by 0 and the run stopped on NaN gradients)."""
    from trainer.objective import Objective

    out = torch.randn(3, 2, requires_grad=True)
    y = torch.full((3, 2), math.nan)
    loss = MaskedMSE()
    window = Window(samples=3 * batches, batches=batches, units=torch.zeros(()))
    grads = []
    for weighting in (None, UniformWeighting()):
        objective = Objective(loss, weighting, (), [out])
        losses = loss(out, y)
        objective.backward(losses, out, (out, y, torch.arange(3)), window, last=True, logs=False)
        grads.append(out.grad)
        out.grad = None
    assert all(torch.equal(g, torch.zeros_like(out)) for g in grads)


def test_a_per_sample_weighting_refuses_any_per_element_loss_by_its_config_name() -> None:
    """hard_topk ranks samples: a user's per-element loss (units, not a sequence task) is
    refused before training, named as the config spells it (it failed at step 1 with
    'selected index k out of range'); class-label weightings do not suggest it then."""
    from trainer.weighting import FocalWeighting, HardTopKWeighting

    with pytest.raises(ValueError, match=r"weighting=hard_topk ranks whole samples.*MaskedMSE"):
        HardTopKWeighting().check_loss(MaskedMSE())
    with pytest.raises(ValueError, match=r"use weighting=uniform or per_sample$"):
        FocalWeighting().check_loss(MaskedMSE())


def test_a_logging_window_without_a_unit_logs_nan_not_zero() -> None:
    from trainer.metrics import LossTally

    tally = LossTally(torch.device("cpu"), per_token=True)
    tally.add(torch.ones(2, 3), torch.zeros(2, 3))
    mean, total, count, _ = tally.take_log()
    assert math.isnan(mean) and total == 0 and count == 0


def test_a_users_loss_with_units_validates_on_its_own_average() -> None:
    """The base validation metrics of a user's loss that defines units: val/loss is Σuℓ / Σu
    (it was Σℓ / B), and a sequence task reports val/ppl and val/token_acc (it raised a
    KeyError at the first validation, after an epoch of training)."""
    out = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    y = torch.tensor([[2.0, math.nan], [1.0, 1.0]])
    (s, n) = MaskedMSE().val_sums(out, y)["val/loss"].tolist()
    assert (s, n) == (1.0 + 4.0 + 1.0, 3.0)

    class MaskedTokens(Loss):
        task = "sequence"

        def forward(self, output, target):
            nll = F.cross_entropy(output.flatten(0, 1), target.clamp_min(0).flatten(),
                                  reduction="none").view(target.shape)  # fmt: skip
            return nll * (target >= 0)

        def units(self, target, dtype=torch.float32):
            return (target >= 0).to(dtype)

    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[0.0, 3.0], [1.0, 0.0]]])
    tokens = torch.tensor([[0, 0], [1, -1]])
    loss = MaskedTokens()
    sums = {k: v.tolist() for k, v in loss.val_sums(logits, tokens).items()}
    nll = loss(logits, tokens).sum().item()
    assert sums == {"val/loss": [nll, 3.0], "val/token_acc": [2.0, 3.0]}  # val/ppl: finalize's
    final = loss.finalize({"val/loss": nll / 3, "val/token_acc": 2 / 3})
    assert final["val/ppl"] == pytest.approx(math.exp(nll / 3), rel=1e-15)


def test_base_validation_of_sequence_losses_without_matching_units() -> None:
    """A sequence task whose losses are per sample (no units), and a loss with units whose
    validation losses are per sample: token accuracy over the target's tokens, val/loss over
    the samples (a review found them broadcast: B = T gave a token accuracy of 4.0)."""

    class PerSequence(Loss):
        task = "sequence"

        def forward(self, output, target):
            return F.cross_entropy(output.transpose(1, 2), target, reduction="none").mean(1)

    class PerSequenceValidation(PerSequence):
        def units(self, target, dtype=torch.float32):
            return torch.ones(target.shape, dtype=dtype)

        def forward(self, output, target):
            return F.cross_entropy(output.transpose(1, 2), target, reduction="none")

        def val_losses(self, output, target):
            return self.forward(output, target).mean(1)

    g = torch.Generator().manual_seed(0)
    for b, t in [(4, 4), (3, 5)]:
        logits = torch.randn(b, t, 3, generator=g)
        tokens = logits.argmax(-1)
        tokens[0, 0] = (tokens[0, 0] + 1) % 3  # one miss
        for loss in (PerSequence(), PerSequenceValidation()):
            sums = {k: v.tolist() for k, v in loss.val_sums(logits, tokens).items()}
            per_sample = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none").mean(1)
            assert sums["val/loss"] == pytest.approx([per_sample.sum().item(), b], rel=1e-6)
            assert sums["val/token_acc"] == [b * t - 1.0, float(b * t)]


class ScaledUnitsMSE(Loss):
    """Squared errors averaged over unit weights all equal to ``scale``: Σuℓ / Σu is the plain
    mean whatever the scale, bit for bit for a power of two (every product and sum scales
    exactly), and so are the coefficients u / Σu, hence training."""

    task = "regression"
    scale = 1.0

    def __init__(self, **_) -> None:
        pass

    def forward(self, output, target):
        return (output.reshape(target.shape) - target) ** 2

    def units(self, target, dtype=torch.float32):
        return torch.full(target.shape, self.scale, dtype=dtype, device=target.device)


class TinyUnitsMSE(ScaledUnitsMSE):
    scale = 2.0**-14  # an epoch's Σu, and a validation's, below 1


def test_epoch_and_validation_means_divide_by_unit_sums_below_one(tmp_path) -> None:
    """The epoch's train/loss and the validation metrics are Σ / count even where the count
    is a sum of unit weights below 1 (they were divided by max(count, 1): this epoch's
    train/loss read 0.019 for 0.879, val/loss 0.0037 for 0.680), and NaN where nothing was
    counted."""
    from trainer.metrics import mean_of

    common = ("experiment=diabetes_mse", "trainer.max_epochs=1")
    one = train(tmp_path / "one", *common, f"loss._target_={__name__}.ScaledUnitsMSE")
    tiny = train(tmp_path / "tiny", *common, f"loss._target_={__name__}.TinyUnitsMSE")
    keys = [k for k in one if k == "train/loss" or k.startswith("val/")]
    assert {"train/loss", "val/loss"} <= set(keys)
    assert {k: tiny[k] for k in keys} == {k: one[k] for k in keys}
    assert 0 < one["train/loss"] < 10
    assert math.isnan(mean_of(0.0, 0.0)) and mean_of(3.0, 0.25) == 12.0


class ElementsAsLosses(Loss):
    """ℓ = the output itself, one unit per element: each element's gradient is its
    coefficient u / Σu, exactly."""

    task = "regression"

    def forward(self, output, target):
        return output.reshape(target.shape)

    def units(self, target, dtype=torch.float32):
        return torch.ones(target.shape, dtype=dtype, device=target.device)


@pytest.mark.parametrize("scale", [None, 2.0**16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float16_losses_over_more_than_65504_units_get_their_coefficients(dtype, scale) -> None:
    """80 × 1024 float16 (bfloat16) losses, one unit each: Σu = 81920 is Inf in float16, which
    gave every coefficient 0 (and bfloat16 rounds it to 81920 ± 256); summed in float32, each
    element's gradient is 1/81920 (× a GradScaler's scale) rounded once to the dtype, in
    scalar and vector-uniform mode alike (vector mode rounded the weight before scaling it: a
    float16 subnormal, 4 bits short, then scaled); both report the float32 u / Σu."""
    from trainer.objective import Objective

    out = torch.zeros(80, 1024, dtype=dtype, requires_grad=True)
    y = torch.zeros(80, 1024)
    loss = ElementsAsLosses()
    c = torch.tensor(1.0) / 81920  # float32, then scaled in float32, then rounded once
    expected = torch.full_like(out, float(c if scale is None else c * scale))
    reported = []  # what per-sample statistics see: the float32 coefficients u / Σu
    for weighting in (None, UniformWeighting()):
        scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale)
        objective = Objective(loss, weighting, (), [out], scaler=scaler)
        window = Window(samples=80)
        weights, _ = objective.backward(loss(out, y), out, (out, y, torch.arange(80)), window,
                                        last=True, logs=False)  # fmt: skip
        assert torch.equal(out.grad, expected), weighting
        out.grad = None
        reported.append(objective.coefficients(loss(out, y), y, window) if weights is None
                        else weights)  # fmt: skip
    assert torch.equal(reported[0], torch.full_like(out, float(c), dtype=torch.float32))
    assert torch.equal(reported[0], reported[1])


def test_a_non_finite_output_makes_the_accuracy_nan_not_class_0() -> None:
    """argmax reads a NaN row as class 0: a diverged model reported the share of class 0 as
    its val/acc (a probe's finding). A counted row without a finite maximum (NaN, +Inf, all
    −Inf) makes the accuracy NaN, as val/loss is; one at a padded token (not counted) changes
    nothing, and −Inf of a masked class is a score like any other (a review's finding: it
    made the accuracy NaN)."""
    from trainer.losses import CrossEntropy, TokenCrossEntropy

    out = torch.tensor([[0.1, 2.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([1, 0, 0])
    assert CrossEntropy().val_sums(out, y)["val/acc"].tolist() == [2.0, 3.0]
    out[2, 0] = float("nan")  # row 2: argmax 0 would count as correct
    acc = CrossEntropy().val_sums(out, y)["val/acc"]
    assert math.isnan(acc[0]) and acc[1] == 3.0
    out[2, 0] = -float("inf")  # a class masked out: the row still predicts (class 1)
    assert CrossEntropy().val_sums(out, y)["val/acc"].tolist() == [2.0, 3.0]
    for row in ([float("inf"), 0.0], [-float("inf"), -float("inf")]):  # no finite maximum
        out[2] = torch.tensor(row)
        assert math.isnan(CrossEntropy().val_sums(out, y)["val/acc"][0])

    logits = torch.zeros(2, 3, 4)
    logits[..., 1] = 1.0
    target = torch.tensor([[1, 1, PAD], [1, 0, 1]])
    loss = TokenCrossEntropy(ignore_index=PAD)
    assert loss.val_sums(logits, target)["val/token_acc"].tolist() == [4.0, 5.0]
    logits[0, 2, 0] = float("nan")  # a padded position: not counted
    assert loss.val_sums(logits, target)["val/token_acc"].tolist() == [4.0, 5.0]
    logits[1, 1, 0] = float("nan")  # a counted one
    assert math.isnan(loss.val_sums(logits, target)["val/token_acc"][0])


def test_a_diverged_model_reports_nan_accuracy(tmp_path) -> None:
    metrics = train(tmp_path, "trainer.max_steps=3", "optimizer=sgd", "optimizer.lr=1e30",
                    "instrument.nonfinite.policy=off")  # fmt: skip
    assert math.isnan(metrics["val/loss"]) and math.isnan(metrics["val/acc"])


@pytest.mark.parametrize(
    "keys, match",
    [
        # a stride past the block: the text between windows was never trained on
        (
            {"block_size": 16, "stride": 32},
            r"data.stride: got 32, larger than data.block_size 16: the "
            r"training windows would skip 16 of every 32 characters",
        ),
        # a held-out text of one character: no target, val/loss NaN (or a crash)
        ({"val_fraction": 2e-5}, r"leaves the validation text 1 character\(s\)"),
        ({"val_fraction": 0.99999}, r"leaves the training text 0 character\(s\)"),
    ],
    ids=["stride_past_block", "one_val_char", "no_train_text"],
)
def test_chars_windows_that_would_skip_or_hold_no_target_are_refused(keys, match) -> None:
    """The stride was 32 whatever block_size said: data.block_size=16 trained on half the
    text, without a word (a probe's finding). It follows block_size now (half of it), and one
    past it is refused; so is a split without a character to predict."""
    with pytest.raises(ValueError, match=match):
        CharText(**keys).load()


def test_the_default_stride_is_half_the_block_and_every_character_is_a_target() -> None:
    for block in (64, 16, 1):
        data = CharText(block_size=block)
        assert data.stride == max(block // 2, 1)
        train, _ = data.load()
        cut = round(0.9 * len(data.text))
        targets = train.y[train.y != PAD].numel()
        assert targets >= cut - 1  # every training character with a next one, at least once


class Tags(DataModule):
    """Tagging: 4 input tokens, ``tags`` tags per position (padding -100); ``out_dim``
    as given (None: not set)."""

    def __init__(
        self, tags: int = 5, out_dim: int | None = 5, vocab_size: int | None = 4, **common
    ) -> None:
        super().__init__(**common)
        self.tags, self.vocab_size, self.out_dim = tags, vocab_size, out_dim

    def load(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 4, (24, 6), generator=g)
        y = torch.randint(0, self.tags, (24, 6), generator=g)
        y[::3, 4:] = PAD
        return TensorSplit(x[:16], y[:16]), TensorSplit(x[16:], y[16:])


class Tagger(nn.Module):
    def __init__(self, out_dim: int, vocab_size: int | None = None) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(4, 8), nn.Linear(8, out_dim)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)))


def test_a_tagger_is_checked_against_its_tags_not_the_input_vocabulary(tmp_path, caplog) -> None:
    """token_cross_entropy checked target ids against vocab_size (the inputs'): a tagger with
    more tags than input tokens was refused, one with fewer outputs passed; and without
    out_dim a tagger's head got as many outputs as its sequences were long (6 here), silently
    (a probe's findings). Checked against out_dim now; without it, per-position targets take
    vocab_size (a language model's classes) with a warning, or are refused."""
    common = ["~data", f"+data._target_={__name__}.Tags", "+data.batch_size=8", "~model",
              f"+model._target_={__name__}.Tagger", "loss=token_cross_entropy",
              "trainer.max_steps=2", "instrument=none"]  # fmt: skip
    train(tmp_path / "a", *common)  # 5 tags from 4 input tokens
    with pytest.raises(ConfigError, match=r"target ids span \[0, 4\] but the model scores "
                       r"out_dim=3 classes per position"):  # fmt: skip
        train(tmp_path / "b", *common, "+data.out_dim=3")
    caplog.set_level("WARNING")
    with pytest.raises(ConfigError, match=r"target ids span \[0, 4\] but the model scores "
                       r"out_dim=4 classes"):  # (vocab_size's, said)  # fmt: skip
        train(tmp_path / "c", *common, "+data.out_dim=null")
    assert "Tags sets no out_dim: taken as its vocab_size=4" in caplog.text
    with pytest.raises(ConfigError, match=r"Tags sets neither out_dim nor vocab_size, and its "
                       r"targets are torch.int64 sequences \(\(6,\) per sample\)"):  # fmt: skip
        train(tmp_path / "d", *common, "+data.out_dim=null", "+data.vocab_size=null")


class Ragged(torch.utils.data.Dataset):
    """Tagging sequences of 2 to 6 tokens, each as long as it is (no padding): torch's
    default collation cannot stack them."""

    def __init__(self, x, y, lengths) -> None:
        self.x, self.y, self.lengths = x, y, lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i):
        n = self.lengths[i]
        return self.x[i, :n], self.y[i, :n]


class PaddedRagged(Ragged):
    """The same, batched by a ``collate`` of its own: inputs padded with token 0, targets with
    the loss's ignore_index, to ``to`` tokens (0: the batch's longest sequence)."""

    to = 6

    def collate(self, samples):
        n = self.to or max(len(x) for x, _ in samples)
        x = torch.zeros(len(samples), n, dtype=torch.long)
        y = torch.full((len(samples), n), PAD)
        for i, (xi, yi) in enumerate(samples):
            x[i, : len(xi)], y[i, : len(yi)] = xi, yi
        return x, y


class PaddedToLongest(PaddedRagged):
    to = 0


class NumPyPadded(PaddedRagged):
    """Samples and batches as NumPy arrays (made tensors by the trainer)."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x.numpy(), y.numpy()

    def collate(self, samples):
        x, y = super().collate([(torch.from_numpy(a), torch.from_numpy(b)) for a, b in samples])
        return x.numpy(), y.numpy()


class NumPyRagged(Ragged):
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x.numpy(), y.numpy()


class Text(PaddedRagged):
    """Raw samples, a string and a list of tags, made tensors by the collate alone (a
    tokenizer's way)."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return "".join("abcd"[t] for t in x.tolist()), y.tolist()

    def collate(self, samples):
        return super().collate([(torch.tensor(["abcd".index(c) for c in text]), torch.tensor(y))
                                for text, y in samples])  # fmt: skip


class RaggedTags(Tags):
    """:class:`Tags` of variable length: ``kind`` ragged (no collate), padded (a collate of
    its own, to 6 tokens), longest (to each batch's longest) or tensors (padded to 6
    beforehand)."""

    def __init__(self, kind: str = "padded", **common) -> None:
        super().__init__(**common)
        self.kind = kind

    def load(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 4, (24, 6), generator=g)
        y = torch.randint(0, self.tags, (24, 6), generator=g)
        lengths = torch.randint(2, 7, (24,), generator=g).tolist()
        lengths[:2] = [6, 6]  # (the first sample sets the shapes checked: the longest)
        if self.kind == "tensors":
            for i, n in enumerate(lengths):
                x[i, n:], y[i, n:] = 0, PAD
            return TensorSplit(x[:16], y[:16]), TensorSplit(x[16:], y[16:])
        kinds = {"padded": PaddedRagged, "longest": PaddedToLongest, "ragged": Ragged,
                 "numpy": NumPyPadded, "numpy-ragged": NumPyRagged, "text": Text}  # fmt: skip
        make = kinds[self.kind]
        return make(x[:16], y[:16], lengths[:16]), make(x[16:], y[16:], lengths[16:])


@pytest.mark.parametrize("mode", ["scalar", "vector"])
def test_variable_length_sequences_batched_by_the_datasets_own_collate(tmp_path, mode) -> None:
    """A Dataset of variable-length sequences with a ``collate(samples)`` of its own trains
    exactly as the same sequences padded beforehand into tensors (bitwise); padded to each
    batch's longest sequence, batches of several lengths, its first step's loss and gradient
    norm are the same up to the order of the sums. torch's default collation of them failed
    with "stack expects each tensor to be equal size", naming neither the data set nor a fix
    (a probe's)."""
    common = ["~data", f"+data._target_={__name__}.RaggedTags", "+data.batch_size=5",
              "~model", f"+model._target_={__name__}.Tagger", "loss=token_cross_entropy",
              f"loss.mode={mode}", "trainer.max_epochs=2", "optimizer=sgd",
              "logging.every_n_steps=1", "instrument.per_sample.every_n_steps=2",
              "+data.num_workers=0"]  # fmt: skip
    train(tmp_path / "tensors", *common, "+data.kind=tensors", "+data.loader=dataloader")
    b, sb = final_params(tmp_path / "tensors"), read_scalars(tmp_path / "tensors")
    # (samples and batches as tensors, as NumPy arrays, or raw text the collate tokenizes)
    for kind in ("padded", "numpy", "text"):
        train(tmp_path / kind, *common, f"+data.kind={kind}")
        a, sa = final_params(tmp_path / kind), read_scalars(tmp_path / kind)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kind
        for tag in ("train/loss", "val/loss", "grad_norm/total", "per_sample/grad_norm_mean"):
            assert sa[tag] == sb[tag], (kind, tag)
    train(tmp_path / "longest", *common, "+data.kind=longest", "trainer.max_steps=1")
    sl = read_scalars(tmp_path / "longest")
    # the same per-token terms (the tagger scores each position alone) summed over at most
    # 5·6 tokens in another order: float32's rounding of 30 terms, 30·2⁻²⁴, bounds the change
    for tag in ("train/loss", "grad_norm/total"):
        assert sl[tag][0][1] == pytest.approx(sb[tag][0][1], rel=30 * 2**-24, abs=0), tag
    for kind in ("ragged", "numpy-ragged"):
        with pytest.raises(RuntimeError, match=r"the batch's inputs have different shapes.*"
                           r"collate\(self, samples\) method on the Dataset's class"):  # fmt: skip
            train(tmp_path / kind, *common, f"+data.kind={kind}")


def test_samples_of_other_shapes_are_named_by_their_own_indices() -> None:
    """The note on a batch whose samples' shapes differ named the batch's first four indices,
    of any shape (a probe: none of those named was a bad sample): each shape with its own
    samples' indices, the commonest first, with how many there are."""
    from trainer.data.base import _collate_pairs

    shapes = [3, 3, 3, 2, 3, 3, 3, 2, 3]
    triples = [(torch.zeros(n), torch.tensor(0), 100 + i) for i, n in enumerate(shapes)]
    with pytest.raises(RuntimeError) as caught:
        _collate_pairs(triples)
    (note,) = caught.value.__notes__
    told = "(3,) at indices 100, 101, 102, 104, … (7 samples); (2,) at indices 103, 107"
    assert note.startswith(f"(data: the batch's inputs have different shapes, {told}: ")


class LongestWithTargets(PaddedToLongest):
    """:class:`PaddedToLongest` with ``targets``: each sample's tags as it is, unpadded (the
    batch's longest decides the padding, so no one padded tensor is them)."""

    @property
    def targets(self):
        return [self.y[i, :n] for i, n in enumerate(self.lengths)]


def test_variable_length_targets_are_a_list_and_per_token_counts_their_tokens(tmp_path) -> None:
    """``weighting=per_token`` on sequences padded to each batch's longest by the Dataset's
    collate: refused with "sets no out_dim or vocab_size" where both were set and only targets
    were missing, and refused with any targets (a tensor padded to one length is no sample's
    row alone: a probe's). A list of one tensor per sample is the targets: the table counts
    their tokens, bit for bit the table of the same sequences padded beforehand, and the
    loss's check reads them (a tag past out_dim refused by split)."""
    common = ["~data", "+data.batch_size=5", "~model", f"+model._target_={__name__}.Tagger",
              "loss=token_cross_entropy", "loss.mode=vector", "weighting=per_token",
              "optimizer=sgd", "trainer.max_steps=2", "+data.num_workers=0"]  # fmt: skip
    none = r"per_token counts the training targets' tokens: the training split of RaggedTags"
    with pytest.raises(ValueError, match=none + " holds none to count"):
        train(tmp_path / "none", *common, f"+data._target_={__name__}.RaggedTags",
              "+data.kind=longest")  # fmt: skip
    tables = []
    for kind in ("tensors", "targets"):
        cfg = make_cfg(*common, f"+data._target_={__name__}.RaggedTags", f"+data.kind={kind}")
        if kind == "targets":
            cfg.data.kind = "longest"
            cfg.data._target_ = f"{__name__}.RaggedTagsWithTargets"
        t = build_trainer(cfg, tmp_path / kind)
        tables.append(t.objective.weighting.token_weights)
        t.fit()
    data = RaggedTagsWithTargets(kind="longest", batch_size=5, num_workers=0)
    data.setup(CPU, 0)
    assert data.train_targets is None and len(data.train_target_rows) == 16
    assert [len(r) for r in data.train_target_rows[:3]] == [6, 6, data.train_split_lengths[2]]
    counts = collections.Counter(int(t) for r in data.train_target_rows for t in r)
    n, seen = sum(counts.values()), len(counts)
    want = [(n / (seen * counts[v])) ** 0.5 if counts[v] else 0.0 for v in range(5)]
    assert torch.equal(*tables) and tables[0].tolist() == pytest.approx(want, rel=1e-6)
    data.out_dim = 3  # (tags 0 to 4 given)
    with pytest.raises(ConfigError, match=r"the training split's target ids span \[0, 4\]"):
        TokenCrossEntropy().check(data)
    # data.loader=memory says why it cannot (it blamed augmentation or size, a probe's)
    with pytest.raises(ValueError, match=r"data.loader=memory: the split is a Dataset whose "
                       r"collate makes its batches"):  # fmt: skip
        RaggedTagsWithTargets(kind="longest", batch_size=5, loader="memory").setup(CPU, 0)
    # a subset keeps them as a list (torch.as_tensor failed on it: a review's)
    data = RaggedTagsWithTargets(kind="longest", batch_size=5, num_workers=0, train_subset=7)
    data.setup(CPU, 0)
    assert len(data.train_target_rows) == 7
    # class-count weightings say why they do not apply; a table past float32 is refused
    with pytest.raises(
        ValueError,
        match=r"weighting=class_balanced weights each sample by its "
        r"class label: .* training targets are sequences of variable length",
    ):
        ClassBalancedWeighting().setup(data, CPU)  # fmt: skip
    weighting = PerTokenWeighting(power=60.0)
    weighting.check_loss(TokenCrossEntropy())
    skewed = SimpleNamespace(out_dim=2, train_targets=torch.tensor([[0] + [1] * 999]),
                             train_loader=SimpleNamespace(global_batch_size=4))  # fmt: skip
    with pytest.raises(ValueError, match=r"per_token's weights \(power 60\) must be "
                       r"representable in float32"):  # fmt: skip
        weighting.setup(skewed, CPU)  # type: ignore[arg-type]
    # a batch sums its tokens' weights: 500**13 fits 4 times in float32, not 4 × 1000 (the
    # samples were counted, a review's); normalize=none forms no sum and takes it
    for normalize in ("mean", "none"):
        weighting = PerTokenWeighting(power=13.0, normalize=normalize)
        weighting.check_loss(TokenCrossEntropy())
        if normalize == "none":
            weighting.setup(skewed, CPU)  # type: ignore[arg-type]
            assert float(weighting.token_weights[0]) == pytest.approx(500.0**13, rel=1e-6)
            continue
        with pytest.raises(ValueError, match=r"summed over a batch \(up to 4000 tokens\)"):
            weighting.setup(skewed, CPU)  # type: ignore[arg-type]


def test_weight_statistics_of_token_losses_are_over_the_tokens(tmp_path) -> None:
    """``weights/mean``, ``/min`` and ``/max`` of per-token weights are over the tokens the
    loss's units count: the padding's 0s made the mean depend on how long a batch was padded
    (data-parallel, each rank pads its slice to its own longest: 1/44 logged on 2 ranks, 1/48
    in one process, a probe's). Uniform weights of a batch of U tokens are 1/U each, padded
    to 6 or to the batch's longest alike; a batch of padding alone has none (NaN)."""
    common = ["~data", "+data.batch_size=5", "~model", f"+model._target_={__name__}.Tagger",
              "loss=token_cross_entropy", "loss.mode=vector", "weighting=uniform",
              "optimizer=sgd", "trainer.max_steps=3", "logging.every_n_steps=1",
              "+data.num_workers=0", f"+data._target_={__name__}.RaggedTags"]  # fmt: skip
    logged = {}
    for kind in ("tensors", "longest"):
        seen: list[torch.Tensor] = []
        keep = type(
            "Keep",
            (Callback,),
            {"on_train_step_end": lambda self, tr, out, seen=seen: seen.append(out.batch[1])},
        )()
        train(tmp_path / kind, *common, f"+data.kind={kind}", callbacks=[keep])
        logged[kind] = read_scalars(tmp_path / kind)
        for i, y in enumerate(seen):
            u = int((y != PAD).sum())
            for tag in ("weights/mean", "weights/min", "weights/max"):
                assert logged[kind][tag][i][1] == pytest.approx(1 / u, rel=2**-23), (kind, tag)
    assert logged["tensors"]["weights/mean"] == logged["longest"]["weights/mean"]
    t = build_trainer(make_cfg(*common, "+data.kind=tensors"), tmp_path / "pad")
    stats = t._weight_stats(torch.zeros(2, 3), torch.full((2, 3), PAD))
    assert all(math.isnan(float(v)) for v in stats.values())


class NoDefaultNLL(OwnTokenNLL):
    """:class:`OwnTokenNLL` with ``units(target, dtype)`` as the contract spells it: no default
    for the dtype."""

    def units(self, target, dtype):
        return (target != PAD).to(dtype)


def test_units_of_ones_own_without_a_default_dtype_serve_the_per_sample_norms(tmp_path) -> None:
    """The per-sample norms called ``units(y)`` without the dtype: a loss written to the
    documented ``units(target, dtype)`` failed at its first measured step with a TypeError (a
    probe's). They ask with the dtype, as the objective does: the norms are the built-in
    loss's, which the same tokens give."""
    common = ["~data", f"+data._target_={__name__}.Tags", "+data.batch_size=8", "~model",
              f"+model._target_={__name__}.Tagger", "optimizer=sgd", "trainer.max_steps=2",
              "instrument.per_sample.every_n_steps=1"]  # fmt: skip
    train(tmp_path / "own", *common, "~loss", f"+loss._target_={__name__}.NoDefaultNLL")
    train(tmp_path / "built", *common, "loss=token_cross_entropy")
    own, built = read_scalars(tmp_path / "own"), read_scalars(tmp_path / "built")
    # (the two losses' own float32 arithmetic: cross-entropy per token, then its reduction,
    # apart by a few roundings of 48 tokens' terms)
    pairs = zip(own["per_sample/grad_norm_mean"], built["per_sample/grad_norm_mean"], strict=True)
    assert [s for s, _ in own["per_sample/grad_norm_mean"]] == [1, 2]
    assert all(a == pytest.approx(b, rel=48 * 2**-24) for (_, a), (_, b) in pairs)


class InfAtPad(OwnTokenNLL):
    """-log(0) at padded positions, from its ``after``-th call on (its units 0 there; the
    gradient is finite, through ``torch.where``)."""

    after = 0

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, output, target):
        self.calls += 1
        ell = F.cross_entropy(output.transpose(1, 2), target.clamp_min(0), reduction="none")
        if self.calls <= self.after:
            return torch.where(target == PAD, 0.0, ell)
        return torch.where(target == PAD, torch.full_like(ell, math.inf), ell)


class InfAtPadLater(InfAtPad):
    after = 1


class NaNTokenFirstInfAtPad(InfAtPad):
    """Inf at padding on every call, and at its first call NaN at a real token too."""

    def forward(self, output, target):
        ell = super().forward(output, target)
        if self.calls == 1:
            ell = ell.clone()
            ell[0, 0] = math.nan  # (Tags' first position is never padding)
        return ell


class NaNFirst(OwnTokenNLL):
    """NaN on every element at its first call, the built-in loss's per-token values after."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, output, target):
        self.calls += 1
        ell = super().forward(output, target)
        return ell * math.nan if self.calls == 1 else ell


def test_a_loss_not_finite_at_padding_is_named_not_skipped_step_after_step(tmp_path) -> None:
    """A per-token loss of one's own, Inf where its units are 0 (padding) and right elsewhere:
    Σuℓ is NaN there, and the guard skipped every step with padding (10 of 12), naming samples
    whose tokens were all fine, nothing said of padding (a probe's). Refused at its first
    micro-batch, naming the cause; where it first happens later, the guard names padding."""
    common = ["~data", f"+data._target_={__name__}.Tags", "+data.batch_size=8", "~model",
              f"+model._target_={__name__}.Tagger", "optimizer=sgd", "trainer.max_steps=3",
              "~loss"]  # fmt: skip
    from trainer.run import build_trainer

    cfg = make_cfg(*common, f"+loss._target_={__name__}.InfAtPad")
    trainer = build_trainer(cfg, tmp_path / "first", with_logger=False)
    for _ in range(2):  # (and again in a fit called again: a second fit trained it, a review's)
        with pytest.raises(ValueError, match=r"loss InfAtPad is NaN or Inf at positions its "
                           r"units weigh 0 \(padding"):  # fmt: skip
            trainer.fit()
    # a loss NaN on every token of its first step (a model gone NaN) is the guard's: that step
    # is skipped and the run goes on (it was refused as padding, a review's)
    metrics = train(tmp_path / "nan", *common, f"+loss._target_={__name__}.NaNFirst",
                    "instrument.nonfinite.policy=skip")  # fmt: skip
    assert metrics["step"] == 3 and math.isfinite(metrics["val/loss"])
    # undecided there (a token not finite), the next micro-batch is checked (the check ended
    # at the first, and a padding-only Inf after it trained, every step skipped: a review's)
    with pytest.raises(ValueError, match=r"NaNTokenFirstInfAtPad is NaN or Inf at positions"):
        train(tmp_path / "undecided", *common, "instrument.nonfinite.policy=skip",
              f"+loss._target_={__name__}.NaNTokenFirstInfAtPad")  # fmt: skip
    from trainer.instrument.nonfinite import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"non-finite loss at positions its units "
                       r"weigh 0 alone \(padding, of training samples \["):  # fmt: skip
        train(tmp_path / "later", *common, f"+loss._target_={__name__}.InfAtPadLater",
              "instrument.nonfinite.policy=raise")  # fmt: skip


class RaggedTagsWithTargets(RaggedTags):
    def load(self):
        train_split, val = super().load()
        self.train_split_lengths = train_split.lengths
        return (LongestWithTargets(train_split.x, train_split.y, train_split.lengths),
                LongestWithTargets(val.x, val.y, val.lengths))  # fmt: skip


def test_variable_length_targets_are_refused_without_a_collate_or_of_mixed_kinds() -> None:
    """Targets of different shapes in a Dataset that cannot batch them, or of different kinds,
    are refused naming the split and the shapes (``torch.as_tensor`` failed with "only one
    element tensors can be converted to Python scalars")."""
    from trainer.data.base import _targets

    x, y = torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long)
    ragged = Ragged(x, y, [4, 2, 3])
    ragged.targets = [y[0, :4], y[1, :2], y[2, :3]]
    with pytest.raises(ValueError, match=r"training split's Ragged.targets holds per-sample "
                       r"targets of different shapes \(\(2,\), \(3,\), \(4,\), \.\.\.\), "
                       r"and Ragged has no collate"):  # fmt: skip
        _targets(ragged, "training")
    padded = PaddedToLongest(x, y, [4, 2, 3])
    padded.targets = [y[0, :4], y[1, :2].float(), y[2, :3]]
    with pytest.raises(ValueError, match=r"targets of different kinds \(1-d torch.float32, "
                       r"1-d torch.int64\)"):  # fmt: skip
        _targets(padded, "training")
    padded.targets = [y[0, :4], y[1, :4], y[2, :4]]  # (one shape: one tensor, as before)
    assert torch.equal(_targets(padded, "training"), y)


class BadCollate(PaddedRagged):
    def collate(self, samples):
        x, y = super().collate(samples)
        return x[:1], y


def test_a_collate_that_returns_another_batch_size_is_named(tmp_path) -> None:
    data = RaggedTags(kind="padded", batch_size=5, num_workers=0)
    train_split, _ = data.load()
    bad = BadCollate(train_split.x, train_split.y, train_split.lengths)
    from trainer.data.base import DeviceLoader

    loader = DeviceLoader(bad, 5, CPU, shuffle=False, num_workers=0)
    with pytest.raises(TypeError, match=r"BadCollate.collate of indices \[0, 1, 2, 3\] … "
                       r"returned x of \(1, 6\); it must be a tensor whose first dimension "
                       r"holds the batch's 5 samples"):  # fmt: skip
        next(iter(loader))


class SequenceNLL(Loss):
    """A sequence loss of one's own returning one loss per sequence, (B,): the mean token NLL
    of each sequence's tokens (torch's ignore_index -100 as padding); no ``units``."""

    task = "sequence"

    def forward(self, output, target):
        nll = F.cross_entropy(output.transpose(1, 2), target, reduction="none")
        valid = (target != -100).to(nll.dtype)
        return (nll * valid).sum(1) / valid.sum(1).clamp(min=1)


@pytest.mark.parametrize("pad", [-100, 0])
def test_token_accuracy_of_a_per_sequence_loss_counts_the_tokens_not_the_padding(pad) -> None:
    """A sequence loss returning (B,) has no unit weights: padding counted as a wrong token
    (a probe's val/token_acc 0.054 for 0.103). The tokens are those with a class index and
    not the loss's ``ignore_index`` (0 here for the padding id 0); by brute force."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 5, generator=gen)
    target = logits.argmax(-1)  # every token right ...
    target[:, ::2] = (target[:, ::2] + 1) % 5  # ... but half, then padded tails
    lengths = [6, 3, 1, 4]
    for i, n in enumerate(lengths):
        target[i, n:] = pad
    loss = SequenceNLL()
    if pad == 0:
        loss.ignore_index = 0  # (a 0 token inside a sequence is not counted either)
    valid = [(i, t) for i in range(4) for t in range(6) if target[i, t] != pad]
    want = sum(int(logits[i, t].argmax() == target[i, t]) for i, t in valid) / len(valid)
    hits, count = loss.val_sums(logits, target)["val/token_acc"]
    assert count == len(valid) and hits / count == want
    # the built-in per-token loss with that padding id (a mutation counting its padding went
    # unseen with the default -100, which no argmax hits): the same tokens
    hits, count = TokenCrossEntropy(ignore_index=pad).val_sums(logits, target)["val/token_acc"]
    assert count == len(valid) and hits / count == want


def test_a_loss_of_the_wrong_shape_is_refused_saying_what_a_per_token_loss_needs() -> None:
    """A (B, T) loss without units was refused with "per-token losses: Loss.units gives their
    shape", which did not say that a per-token loss must implement units."""
    y = torch.zeros(8, 7, dtype=torch.long)
    objective = Objective(SequenceNLL(), None, (), [])
    with pytest.raises(ValueError, match=r"shape \(8,\) \(reduction='none'\); a loss per token, "
                       r"\(B, T, ...\), is taken from a loss that implements units.*a loss per "
                       r"output of a regression, \(B, K\): reduce it per sample, e\.g\. "
                       r"\.mean\(1\)"):  # fmt: skip
        objective.check_losses(torch.zeros(8, 7), y)
    objective = Objective(OwnTokenNLL(), None, (), [])
    with pytest.raises(ValueError, match=r"shape \(8, 7\) \(reduction='none'\); its units"):
        objective.check_losses(torch.zeros(8, 7, 1), y)


class TokenNLLWithTop2(OwnTokenNLL):
    """A per-token loss of one's own adding a metric to the base class's: ``val/top2``, the
    share of counted tokens whose target is among the two highest scores."""

    @property
    def metrics(self):
        return (*super().metrics, "val/top2")

    def val_sums(self, output, target):
        sums = super().val_sums(output, target)
        counted = (target != PAD).to(output.dtype)
        hit = (output.topk(2, dim=-1).indices == target[..., None]).any(-1).to(output.dtype)
        sums["val/top2"] = torch.stack([(hit * counted).sum(), counted.sum()])
        return sums


def test_a_sequence_loss_adding_a_metric_keeps_its_perplexity(tmp_path) -> None:
    """A loss whose val_sums adds a metric to ``super().val_sums(...)`` logged the mean NLL as
    val/ppl (a probe's 2.87 for 17.7): the base class took the exponential only where
    val_sums was not overridden. val/ppl is exp(val/loss) in the events and metrics.json, and
    the added metric is everywhere the others are, checked against brute force."""
    small = ["experiment=chars_lm", "trainer.max_steps=3", "model.n_layers=1", "model.d_model=16",
             "model.dim_feedforward=32", "data.block_size=16", "data.eval_batch_size=5",
             "~loss", f"+loss._target_={__name__}.TokenNLLWithTop2"]  # fmt: skip
    metrics = train(tmp_path, *small)
    scalars = read_scalars(tmp_path)
    assert metrics["val/ppl"] == math.exp(metrics["val/loss"])
    ppl = math.exp(scalars["val/loss"][-1][1])  # (the events hold float32 values)
    assert scalars["val/ppl"][-1][1] == pytest.approx(ppl, rel=1e-6)
    from trainer.models.char_lm import CharTransformer

    data = CharText(block_size=16)
    _, val = data.load()
    model = CharTransformer(data.vocab_size, [16], n_layers=1, d_model=16, dim_feedforward=32)
    model.load_state_dict(final_params(tmp_path))
    with torch.no_grad():
        logits = model.eval()(val.x).double()
    counted = val.y != PAD
    top2 = (logits.topk(2, dim=-1).indices == val.y[..., None]).any(-1)
    expected = (top2 & counted).sum().item() / counted.sum().item()
    assert metrics["val/top2"] == pytest.approx(expected, abs=1e-12)
    assert scalars["val/top2"][-1][1] == pytest.approx(expected, abs=1e-7)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["val/top2"] == metrics["val/top2"] and saved["val/ppl"] == metrics["val/ppl"]


def test_the_epochs_train_loss_of_per_token_losses_is_each_epochs_own() -> None:
    """train/loss of an epoch with unit weights is Σuℓ / Σu over that epoch's tokens alone (a
    mutation keeping the first epoch's Σu in the second's went unseen: the epoch-boundary
    test had per-sample losses)."""
    from trainer.metrics import LossTally

    tally = LossTally(torch.device("cpu"), per_token=True)
    units = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    for epoch, (value, u) in enumerate([(1.0, units), (3.0, torch.ones(2, 3))]):
        tally.start_epoch()
        losses = torch.full((2, 3), value) + torch.arange(6.0).view(2, 3)
        tally.add(losses, u)
        tally.take_log()
        total, count = tally.epoch_parts().tolist()
        assert (total, count) == ((losses * u).sum().item(), u.sum().item()), epoch


@pytest.mark.parametrize("normalize", ["mean", "sum"])
def test_normalized_weights_of_per_token_losses_count_the_units_not_the_padding(normalize):
    """A weighting's normalization with unit weights: w ∝ r·u, Σw = 1 (``mean``) or Σu
    (``sum``: weights averaging 1 over the counted tokens), 0 on padding; a mutation scaling
    ``sum`` by every element, padding included, went unseen (the test of sum had no units)."""
    from trainer.weighting import Weighting

    class Raw(Weighting):
        def raw(self, losses, logits, targets, indices):
            return torch.arange(1.0, losses.numel() + 1).view(losses.shape)

    target = torch.tensor([[1, 2, PAD, PAD], [3, 4, 1, PAD]])
    units = TokenCrossEntropy().units(target)
    losses = torch.rand(2, 4, dtype=torch.float64)
    w = Raw(normalize=normalize)(losses, losses, target, torch.arange(2), units.double())
    r = torch.arange(1.0, 9.0, dtype=torch.float64).view(2, 4) * units
    expected = r / r.sum() * (units.sum() if normalize == "sum" else 1.0)
    torch.testing.assert_close(w, expected, rtol=1e-15, atol=0)
    assert float(w.sum()) == pytest.approx(5.0 if normalize == "sum" else 1.0, rel=1e-15)


class OldStyleTokenLoss(TokenCrossEntropy):
    """A subclass written to the built-in's convention until 2026-12-05: ``val/ppl`` reported
    as a copy of the loss's pair, which finalize turns into its exponential."""

    def val_sums(self, output, target):
        sums = super().val_sums(output, target)
        return {**sums, "val/ppl": sums["val/loss"]}


def test_a_perplexity_reported_as_the_losss_pair_is_its_exponential(tmp_path) -> None:
    """The built-in val_sums reported val/ppl as the loss's (sum, count), finished by
    finalize; once it no longer did, a subclass keeping that convention logged the mean NLL
    as its perplexity (a review's 4.31 for 74.2). A val/ppl pair equal to val/loss's is
    the loss's: exp(val/loss) in the events and metrics.json."""
    small = ["experiment=chars_lm", "trainer.max_steps=2", "model.n_layers=1", "model.d_model=16",
             "model.dim_feedforward=32", "data.block_size=16",
             "~loss", f"+loss._target_={__name__}.OldStyleTokenLoss"]  # fmt: skip
    metrics = train(tmp_path, *small)
    assert metrics["val/ppl"] == math.exp(metrics["val/loss"]) > 1
    ppl = math.exp(read_scalars(tmp_path)["val/loss"][-1][1])  # (float32 in the events)
    assert read_scalars(tmp_path)["val/ppl"][-1][1] == pytest.approx(ppl, rel=1e-6)


class OwnPerplexityPair(TokenCrossEntropy):
    """A perplexity of one's own as a ratio of sums: (Σ nll, tokens) reported as val/ppl, its
    exponential taken in finalize."""

    def val_sums(self, output, target):
        sums = super().val_sums(output, target)
        return {**sums, "val/ppl": sums["val/loss"].clone()}

    def finalize(self, values):
        return {**super().finalize(values), "val/ppl": math.exp(values["val/ppl"])}


def test_a_perplexity_pair_of_ones_own_is_exponentiated_once(tmp_path) -> None:
    """A first version took a val/ppl pair equal to val/loss's for the built-in convention's,
    so a finalize of one's own exponentiated exp(loss) again (a review's 3.65e14 for 33.5)."""
    small = ["experiment=chars_lm", "trainer.max_steps=2", "model.n_layers=1", "model.d_model=16",
             "model.dim_feedforward=32", "data.block_size=16",
             "~loss", f"+loss._target_={__name__}.OwnPerplexityPair"]  # fmt: skip
    metrics = train(tmp_path, *small)
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-12)


def test_perplexity_is_exp_of_the_loss_up_to_floats_largest() -> None:
    from trainer.losses import perplexity

    for loss in (0.0, 1.0, 100.0, 705.0, 709.78):  # below log(float max) ≈ 709.7827
        assert perplexity(loss) == math.exp(loss)
    assert perplexity(709.79) == perplexity(1e6) == perplexity(math.inf) == math.inf
    assert math.isnan(perplexity(math.nan))


def test_units_mask_the_loss_own_ignore_index_not_negative_ids() -> None:
    """Padding is whatever id ``ignore_index`` names (0 here, a tokenizer's pad id): its
    tokens get u = 0, and the scalar average Σuℓ/Σu is the loop's mean over the other tokens
    (float64), for both averages."""
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, dtype=torch.float64)
    target = torch.tensor([[3, 1, 0, 0], [2, 4, 1, 0]])
    for average in ("tokens", "sequences"):
        loss = TokenCrossEntropy(average=average, ignore_index=0)
        u = loss.units(target, torch.float64)
        seq = [[(i, t) for t in range(4) if int(target[i, t]) != 0] for i in range(2)]
        want_u = torch.zeros(2, 4, dtype=torch.float64)
        for i, toks in enumerate(seq):
            for _, t in toks:
                want_u[i, t] = 1.0 if average == "tokens" else 1.0 / len(toks)
        assert torch.equal(u, want_u), average
        nll = [[-torch.log_softmax(logits[i, t], 0)[target[i, t]] for _, t in toks]
               for i, toks in enumerate(seq)]  # fmt: skip
        want = (sum(sum(s) for s in nll) / sum(len(s) for s in nll) if average == "tokens"
                else sum(sum(s) / len(s) for s in nll) / len(nll))  # fmt: skip
        got = (loss(logits, target) * u).sum() / u.sum()
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("smoothing", [0.1, 0.5])
def test_val_loss_is_the_plain_nll_whatever_the_label_smoothing(smoothing) -> None:
    """Label smoothing shapes the training loss only: val/loss (and so val/ppl) is the plain
    next-token NLL for token_cross_entropy, the plain cross-entropy for cross_entropy (float64
    log-softmax of each row, summed)."""
    from trainer.losses import CrossEntropy

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, dtype=torch.float64)
    target = torch.tensor([[1, 3, PAD], [0, 2, 2]])
    loss = TokenCrossEntropy(label_smoothing=smoothing)
    nll = sum(-torch.log_softmax(logits[i, t], 0)[target[i, t]]
              for i in range(2) for t in range(3) if int(target[i, t]) != PAD)  # fmt: skip
    pair = loss.val_sums(logits, target)["val/loss"]
    torch.testing.assert_close(pair, torch.stack([nll, torch.tensor(5.0, dtype=torch.float64)]),
                               rtol=1e-12, atol=0)  # fmt: skip
    assert not torch.allclose(loss(logits, target)[target != PAD].sum(), nll)  # (it smooths)

    out, y = logits[:, 0], torch.tensor([1, 3])
    ce = CrossEntropy(label_smoothing=smoothing)
    want = sum(-torch.log_softmax(out[i], 0)[y[i]] for i in range(2))
    torch.testing.assert_close(ce.val_sums(out, y)["val/loss"][0], want, rtol=1e-12, atol=0)
    assert not torch.allclose(ce(out, y).sum(), want)


def test_a_label_smoothing_of_1_is_refused() -> None:
    """[0, 1): at 1 the target is uniform whatever the label, nothing of it is learned."""
    from trainer.losses import CrossEntropy

    for make in (CrossEntropy, TokenCrossEntropy):
        with pytest.raises(ValueError, match=r"label_smoothing: got 1.0, must be in \[0, 1\)"):
            make(label_smoothing=1.0)
        make(label_smoothing=0.999)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_train_loss_of_low_precision_token_losses_is_averaged_in_float32(dtype) -> None:
    """float16/bfloat16 per-token losses are averaged in float32: their product with the
    units and Σu too where a loss of one's own gives its units in the losses' dtype (float16
    keeps even integers past 2048, bfloat16 multiples of 16: Σu = 3001 of 9003 tokens of
    u = 1/3 is not one); the mean is Σuℓ/Σu of the values as given, in float64."""
    from trainer.metrics import LossTally

    torch.manual_seed(0)
    losses = (torch.rand(3001, 3) * 4).to(dtype)
    units = torch.full((3001, 3), 1 / 3, dtype=dtype)
    tally = LossTally(torch.device("cpu"), per_token=True)
    tally.add(losses, units)
    mean, total, count, samples = tally.take_log()
    l64, u64 = losses.double(), units.double()
    torch.testing.assert_close(count.double(), u64.sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(mean.double(), (l64 * u64).sum() / u64.sum(), rtol=1e-6, atol=0)
    assert samples == 3001


def test_finalize_derives_val_ppl_only_where_the_metrics_list_it() -> None:
    """A sequence loss whose metrics leave val/ppl out gets none from Loss.finalize (it would
    reach TensorBoard as a name beyond its metrics); one listing it gets exp(val/loss)."""

    class NoPpl(Loss):
        task = "sequence"
        metrics = ("val/loss", "val/token_acc")

    values = {"val/loss": 1.5, "val/token_acc": 0.25}
    assert NoPpl().finalize(dict(values)) == values
    got = TokenCrossEntropy().finalize(dict(values))
    assert got == {**values, "val/ppl": math.exp(1.5)}


@pytest.mark.parametrize("average", ["tokens", "sequences"])
def test_the_micro_batch_objective_curvature_measures_is_the_token_average(average) -> None:
    """``batch_objective`` (the objective whose Hessian curvature measures, scalar mode) of
    per-token losses with padding is the loss's own average: over the valid tokens
    (``tokens``), or the mean over sequences of each one's token mean (``sequences``); not
    the mean over every (B, T) entry, padding included. Against cross-entropy taken by hand in
    float64 (the same sums in another order: the default tolerance). Every token padding: 0,
    not 0/0."""
    loss = TokenCrossEntropy(average=average)
    objective = Objective(loss, None, (), [])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (3, 4), generator=g)
    y[torch.arange(4) >= torch.tensor([[4], [2], [1]])] = -100
    got = objective.batch_objective(loss(logits, y), logits, y, torch.arange(3))
    nll = F.cross_entropy(logits.transpose(1, 2), y, reduction="none", ignore_index=-100)
    valid = y != -100
    if average == "tokens":
        want = nll[valid].mean()
    else:
        want = torch.stack([row[ok].mean() for row, ok in zip(nll, valid, strict=True)]).mean()
    torch.testing.assert_close(got, want)
    pad = torch.full_like(y, -100)
    assert float(objective.batch_objective(loss(logits, pad), logits, pad, torch.arange(3))) == 0


class TextUntokenized(Text):
    def collate(self, samples):  # (tokenizing forgotten: the strings as they are)
        return np.array([t for t, _ in samples]), torch.zeros(len(samples), 6, dtype=torch.long)


class NeedsTwo(PaddedRagged):
    def collate(self, samples):
        assert len(samples) > 1, "need at least two samples"
        return super().collate(samples)


class ShiftedLabels(PaddedRagged):
    """Targets stored one up, and ``targets`` with them; the collate takes 1 off."""

    @property
    def targets(self):
        return torch.stack([torch.cat([self.y[i, :n] + 1, torch.full((6 - n,), PAD)])
                            for i, n in enumerate(self.lengths)])  # fmt: skip

    def collate(self, samples):
        return super().collate([(x, y - 1) for x, y in samples])


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (TextUntokenized, TypeError, r"TextUntokenized.collate of indices \[0\] returned x as a "
                                     r"NumPy array of <U\d+, shape \(1,\), which torch.as_tensor "
                                     r"refuses"),
        (NeedsTwo, AssertionError, r"need at least two samples"),
        (ShiftedLabels, ValueError, r"but ShiftedLabels\[0\] through its collate gives the target"),
    ],
)  # fmt: skip
def test_a_collate_the_checks_before_training_cannot_use_is_named(make, error, match) -> None:
    """A collate's NumPy result torch refuses gave torch's words alone; one refusing the
    checks' batch of one stopped the setup unnamed; a targets mismatch blamed __getitem__
    where the collate changed the labels (a review's)."""

    class Data(RaggedTags):
        def load(self):
            train, val = super().load()
            return make(train.x, train.y, train.lengths), make(val.x, val.y, val.lengths)

    with pytest.raises(error, match=match) as raised:
        Data(kind="padded", batch_size=5, num_workers=0).setup(CPU, 0)
    if make is NeedsTwo:
        assert "as a batch of one" in "".join(raised.value.__notes__)


def test_the_input_shape_of_collated_data_is_said_only_where_the_samples_vary(caplog) -> None:
    """Taken from the first sample; said where the last one, through the collate, has
    another shape (it was said for a collate padding every batch to one length too)."""
    said = "sets no input_shape"
    for kind, varies in (("padded", False), ("longest", True)):
        data = RaggedTags(kind=kind, batch_size=5, num_workers=0)
        caplog.clear()
        with caplog.at_level("WARNING"):
            data.setup(CPU, 0)
        train_split, _ = data.load()
        last = train_split.lengths[-1]
        assert (said in caplog.text) == (varies and last != 6), kind


class UnitsOf(OwnTokenNLL):
    """Its units as ``kind`` says: a boolean or integer mask, float64 ones whatever the
    dtype asked for, ones requiring grad, or negative ones."""

    def __init__(self, kind: str = "bool") -> None:
        super().__init__()
        self.kind = kind

    def units(self, target, dtype=torch.float32):
        mask = target != PAD
        if self.kind == "bool":
            return mask
        if self.kind == "long":
            return mask.long()
        if self.kind == "float64":
            return mask.double()
        if self.kind == "grad":
            return mask.to(dtype).requires_grad_()
        return -mask.to(dtype)  # negative


@pytest.mark.parametrize(("kind", "match"), [
    ("bool", r"units\(target, dtype=torch.float\w+\) returned torch.bool units"),
    ("long", r"units\(target, dtype=torch.float\w+\) returned torch.int64 units"),
    ("float64", r"units\(target, dtype=torch.float32\) returned torch.float64 units"),
    ("grad", r"units\(target, dtype=torch.float\w+\) returned units that require grad"),
    ("negative", r"its units\(target, dtype\) are negative or NaN"),
])  # fmt: skip
def test_units_of_the_wrong_kind_are_named(tmp_path, kind, match) -> None:
    """A boolean or integer mask failed in torch.finfo, naming neither the loss nor units();
    units of another dtype than asked moved the numbers (1e-9); units requiring grad were
    taken; negative ones trained their tokens by ascent, train/loss a signed mean (a
    probe's). Each is refused at the first micro-batch, naming the loss and units()."""
    from trainer.run import build_trainer

    common = ["~data", f"+data._target_={__name__}.Tags", "+data.batch_size=8", "~model",
              f"+model._target_={__name__}.Tagger", "optimizer=sgd", "trainer.max_steps=2",
              "trainer.accumulate_grad_batches=2", "~loss",
              f"+loss._target_={__name__}.UnitsOf", f"+loss.kind={kind}"]  # fmt: skip
    trainer = build_trainer(make_cfg(*common), tmp_path, with_logger=False)
    with pytest.raises((TypeError, ValueError), match=r"loss UnitsOf.*" + match):
        trainer.fit()


class StepMSE(Loss):
    """A per-step regression loss of one's own: targets NaN at padding, units 0 there."""

    task = "regression"

    def forward(self, output, target):
        valid = ~torch.isnan(target)
        diff = torch.where(valid, output.squeeze(-1) - target.nan_to_num(), 0.0)
        return diff.square()

    def units(self, target, dtype=torch.float32):
        return (~torch.isnan(target)).to(dtype)


def test_val_mse_of_a_per_step_regression_loss_counts_the_steps_its_units_count() -> None:
    """A regression loss with units over padded steps: val/mse summed every element, the
    padding's NaN targets too, and was NaN at every validation, unsaid (a probe's), though
    it is the monitored metric. It is the mean over the elements the units count."""
    g = torch.Generator().manual_seed(0)
    output = torch.randn(3, 5, 1, generator=g, dtype=torch.float64)
    target = torch.randn(3, 5, generator=g, dtype=torch.float64)
    target[0, 3:] = math.nan
    target[2, 1:] = math.nan
    loss = StepMSE()
    total, count = loss.val_sums(output, target)["val/mse"].tolist()
    valid = ~torch.isnan(target)
    want = (output.squeeze(-1) - target)[valid].square()
    assert count == valid.sum().item() == 9
    assert total == pytest.approx(want.sum().item(), rel=16 * 2**-52)
    assert loss.finalize({"val/mse": total / count, "val/loss": 0.0})["val/mse"] == total / count


class ValidatedByItsOwnCollate(RaggedTags):
    """Training on tensors padded beforehand (torch's default collation), validation on the
    same kind of sequences batched by a ``collate`` of its own (padded to each batch's
    longest): the validation's first sample is 3 tokens, the training's 6."""

    def load(self):
        train, val = super().load()  # (kind "longest": both PaddedToLongest)
        x, y = train.x.clone(), train.y.clone()
        for i, n in enumerate(train.lengths):
            x[i, n:], y[i, n:] = 0, PAD
        return TensorSplit(x, y), val


@pytest.mark.parametrize("kind", ["longest", "own-val"])
def test_validation_inputs_of_another_length_batched_by_a_collate_are_not_warned_of(
    kind, caplog
) -> None:
    """The warning of validation inputs of another shape than the training ones (a model
    that takes one shape fails at the first validation) is for splits batched by torch's
    default collation alone: a split batched by a ``collate`` of its own pads its variable-
    length samples (here the validation's first is 3 tokens, the training's 6), which is no
    sign of a model given the wrong shape. With both splits so (``longest``) or the
    validation alone (``own-val``: training tensors padded beforehand), nothing is said;
    ragged samples with no collate of their own are (the control)."""
    made = {"longest": lambda: RaggedTags(kind="longest", batch_size=5),
            "own-val": lambda: ValidatedByItsOwnCollate(kind="longest", batch_size=5)}  # fmt: skip

    def said(data) -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="trainer.data.base"):
            data.setup(torch.device("cpu"), 0)
        return [r.getMessage() for r in caplog.records if "validation inputs" in r.getMessage()]

    data = made[kind]()
    assert said(data) == []
    assert data.input_shape == (6,)
    control = said(RaggedTags(kind="ragged", batch_size=5))
    assert len(control) == 1 and "are of shape (3,) and its training inputs (6,)" in control[0]


def test_a_class_label_weighting_refused_for_a_per_sequence_loss_names_what_fits():
    """A sequence loss of one's own without units (one loss per sequence, (B,)): focal was
    refused naming per_token, which refuses that loss too, and not hard_topk, which fits (a
    review's)."""
    from types import SimpleNamespace

    from trainer.weighting import FocalWeighting, HardTopKWeighting

    loss = SimpleNamespace(task="sequence", has_units=False, units=None)
    HardTopKWeighting().check_loss(loss)  # (fits)
    with pytest.raises(ValueError, match="defines no units"):
        PerTokenWeighting().check_loss(loss)
    with pytest.raises(ValueError, match="reads class labels") as e:
        FocalWeighting().check_loss(loss)
    assert "per_token" not in str(e.value) and "hard_topk" in str(e.value)
