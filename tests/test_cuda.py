"""The CUDA path; every test here skips cleanly on a machine without CUDA."""

from __future__ import annotations

import pytest
import torch
from conftest import make_cfg, read_scalars, requires_cuda

from trainer.run import build_trainer

pytestmark = requires_cuda


@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_cuda_run_keeps_data_on_the_gpu_and_logs_unscaled_norms(tmp_path, precision) -> None:
    norms = {}
    for p in ("32", precision):
        cfg = make_cfg("trainer.device=cuda", f"trainer.precision={p}", "trainer.max_steps=3",
                       "logging.every_n_steps=1")  # fmt: skip
        t = build_trainer(cfg, tmp_path / p)
        assert t.train_loader.x.device.type == "cuda"  # in-memory data resident on the GPU
        t.fit()
        t.logger.close()
        norms[p] = [v for _, v in read_scalars(tmp_path / p)["grad_norm/total"]]
    assert norms[precision][0] == pytest.approx(norms["32"][0], rel=0.05)


def test_auto_device_picks_cuda(tmp_path) -> None:
    t = build_trainer(make_cfg("trainer.device=auto", "trainer.max_steps=1"), tmp_path)
    assert next(t.model.parameters()).device.type == "cuda"
    t.logger.close()
    assert torch.cuda.is_available()


def test_no_host_sync_between_logging_steps(tmp_path) -> None:
    # CUDA's sync debug mode raises on any device-to-host synchronization: it is on for every
    # micro-batch of a step that does not log (norms, histograms and per-sample norms on their
    # own cadence of 10; the guard, which reads one flag per step in step mode, off). Steps 10
    # and 20 log, and so does the last, 25, where the histograms measure again; the first
    # step is exempt: the histograms measure there too, and read their ranges
    from conftest import train

    from trainer.loop import Callback

    class NoSync(Callback):
        def on_train_batch_start(self, trainer, batch) -> None:
            step = trainer.global_step + 1  # the step this micro-batch belongs to
            quiet = step > 1 and not trainer.should_log(step)
            torch.cuda.set_sync_debug_mode("error" if quiet else "default")

        def on_train_step_end(self, trainer, out) -> None:
            torch.cuda.set_sync_debug_mode("default")

    try:
        train(tmp_path, "trainer.device=cuda", "trainer.max_steps=25", "logging.every_n_steps=10",
              "instrument.nonfinite.policy=off", "instrument.histograms.every_n_steps=10",
              "instrument.per_sample.every_n_steps=10", callbacks=[NoSync()])  # fmt: skip
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("precision", ["32", "16"])
def test_the_default_guard_makes_no_host_sync_between_logging_steps(tmp_path, precision) -> None:
    """Issue 14 on a GPU: with every default instrument on, the guard included
    (``sync=auto`` defers on CUDA, and the default AdamW is fused there, so a bad update is
    skipped inside the step), CUDA's sync debug mode raises on any device-to-host
    synchronization in a step that does not log (the last step, 25, logs). The first step is
    exempt: it creates the optimizer state, which cannot be undone on the device, so its flag
    is read (and the histograms measure there). Under fp16 too: the loss's flag joins the
    GradScaler's ``found_inf``."""
    from conftest import train

    from trainer.loop import Callback

    class NoSync(Callback):
        def on_train_batch_start(self, trainer, batch) -> None:
            step = trainer.global_step + 1  # the step this micro-batch belongs to
            quiet = step > 1 and not trainer.should_log(step)
            torch.cuda.set_sync_debug_mode("error" if quiet else "default")

        def on_train_step_end(self, trainer, out) -> None:
            torch.cuda.set_sync_debug_mode("default")
            assert trainer.optimizer.defaults["fused"] is True

    try:
        metrics = train(tmp_path, "trainer.device=cuda", "trainer.max_steps=25",
                        "logging.every_n_steps=10", f"trainer.precision={precision}",
                        callbacks=[NoSync()])  # fmt: skip
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert metrics["step"] == 25


def test_a_run_resumed_between_logging_steps_continues_on_the_gpu(tmp_path) -> None:
    """The deferred guard's unread flags, the norms' kept gradient (agreement) and the
    per-sample averages come back from a checkpoint on the CPU: the resumed run moves them to
    the GPU and ends where the uninterrupted run ends."""
    import shutil

    from conftest import final_params, train

    common = ("trainer.device=cuda", "trainer.max_steps=15", "logging.every_n_steps=10",
              "trainer.checkpoint.every_n_steps=5", "instrument.norms.agreement=true",
              "instrument.norms.every_n_steps=3",
              "instrument.per_sample.every_n_steps=2")  # fmt: skip
    train(tmp_path / "full", *common)
    shutil.copytree(tmp_path / "full", tmp_path / "again")
    step5 = tmp_path / "again" / "checkpoints" / "step_000000005.pt"
    metrics = train(tmp_path / "again", *common, f"trainer.resume={step5}")
    assert metrics["step"] == 15
    a, b = final_params(tmp_path / "full"), final_params(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_deterministic_runs_bin_histograms_exactly_on_the_gpu(tmp_path) -> None:
    """trainer.deterministic=true turns on torch.use_deterministic_algorithms, which refuses
    torch.histc on CUDA; the histograms take it anyway (counts of at most 2**24 values per call:
    exact in any order), and a bucket of more than 2**24 values is counted exactly."""
    from conftest import train

    from trainer.instrument.histograms import histograms

    metrics = train(tmp_path, "trainer.device=cuda", "trainer.deterministic=true",
                    "trainer.max_steps=3")  # fmt: skip
    assert metrics["step"] == 3
    x = torch.zeros(2**24 + 3, device="cuda")
    x[0] = 1.0
    (h,) = histograms([x], bins=2)
    assert h.bucket_counts == [2**24 + 2, 1.0]
    with torch.backends.cudnn.flags(deterministic=True):  # (float64: bucketize and bincount)
        torch.use_deterministic_algorithms(True)
        try:
            (h,) = histograms([x.double()], bins=2)
        finally:
            torch.use_deterministic_algorithms(False)
    assert h.bucket_counts == [2**24 + 2, 1.0]


def test_a_non_fused_adam_keeps_its_step_count_on_the_cpu_when_deferred(tmp_path) -> None:
    """optimizer.fused=false, deferred guard: the copy-and-where path must not move the
    optimizer's CPU step counts to the GPU (the optimizer would read them back every step);
    such a step reads the flag instead, and trains as step mode does."""
    from conftest import final_params, train

    from trainer.loop import Callback

    class Devices(Callback):
        seen: set[str] = set()

        def on_train_step_end(self, trainer, out) -> None:
            for state in trainer.optimizer.state.values():
                self.seen.add(state["step"].device.type)

    common = ("trainer.device=cuda", "trainer.max_steps=6", "optimizer.fused=false")
    train(tmp_path / "deferred", *common, "instrument.nonfinite.sync=deferred",
          callbacks=[Devices()])  # fmt: skip
    assert Devices.seen == {"cpu"}
    train(tmp_path / "step", *common, "instrument.nonfinite.sync=step")
    a, b = final_params(tmp_path / "deferred"), final_params(tmp_path / "step")
    assert all(torch.equal(a[k], b[k]) for k in a)


class DigitsGRU(torch.nn.Module):
    """The 8x8 digits read row by row by a GRU (cuDNN's RNN on CUDA)."""

    def __init__(self, in_shape, out_dim) -> None:
        super().__init__()
        self.rnn = torch.nn.GRU(8, 16, batch_first=True)
        self.head = torch.nn.Linear(16, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.reshape(len(x), 8, 8))
        return self.head(out[:, -1])


def test_hessian_vector_products_through_a_gru_on_cuda_are_the_cpus() -> None:
    """cuDNN's RNNs have no double backward: under ``double_backward_kernels`` (cuDNN off for a
    model with an RNN) the Hessian-vector product through a GRU on CUDA is the CPU's, float64,
    to 1e-9 relative (summation order only); without it, where cuDNN runs the RNN, torch
    refuses the double backward (the reason for the switch)."""
    from trainer.backward import double_backward_kernels
    from trainer.instrument import hvp

    torch.manual_seed(0)
    cpu = DigitsGRU((64,), 10).double()
    x, y = torch.randn(16, 64, dtype=torch.float64), torch.randint(0, 10, (16,))
    v = [torch.randn_like(p) for p in cpu.parameters()]

    def product(model, device):
        with double_backward_kernels(model, torch.device(device)):
            loss = torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device))
        params = list(model.parameters())
        grads = torch.autograd.grad(loss, params, create_graph=True)
        return [h.cpu() for h in hvp(grads, params, [t.to(device) for t in v])]

    want = product(cpu, "cpu")
    gpu = DigitsGRU((64,), 10).double().cuda()
    gpu.load_state_dict(cpu.state_dict())
    got = product(gpu, "cuda")
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    if torch.backends.cudnn.is_available():
        gru = DigitsGRU((64,), 10).cuda()
        loss = torch.nn.functional.cross_entropy(gru(x.float().cuda()), y.cuda())
        grads = torch.autograd.grad(loss, list(gru.parameters()), create_graph=True)
        with pytest.raises(RuntimeError, match="(?i)double backward.*cudnn"):
            hvp(grads, list(gru.parameters()), [torch.randn_like(p) for p in gru.parameters()])


def test_curvature_of_a_gru_model_trains_on_cuda(tmp_path) -> None:
    """The curvature instrument on a GRU model on CUDA measures (finite values at every step)
    and leaves the trajectory as a run without it."""
    from conftest import final_params, train

    model = ("~model", f"+model._target_={__name__}.DigitsGRU")
    common = ("trainer.device=cuda", "trainer.max_steps=3", "logging.every_n_steps=1", *model)
    train(tmp_path / "with", *common, "instrument.curvature.every_n_steps=1")
    train(tmp_path / "without", *common)
    values = read_scalars(tmp_path / "with")
    assert len(values["curvature/top_eig"]) == 3
    assert all(v == v and abs(v) < float("inf") for _, v in values["curvature/trace"])
    want, got = final_params(tmp_path / "without"), final_params(tmp_path / "with")
    assert all(torch.equal(want[k], got[k]) for k in want)


class Bf16Net(torch.nn.Module):
    """A linear model whose parameters are bfloat16 (inputs cast to them): bfloat16
    gradients and losses, which CUDA's GradScaler check kernel is not implemented for."""

    def __init__(self, num_classes: int = 10, **_) -> None:
        super().__init__()
        self.net = torch.nn.Linear(64, num_classes).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1).to(torch.bfloat16))


def test_bfloat16_parameters_are_checked_alike_in_both_modes_on_cuda(tmp_path) -> None:
    """Both modes check bfloat16 gradients on CUDA (step mode through finite_measures, in
    float32; deferred's measures in float32 too: in bfloat16 they would reach the kernel),
    skip the same step and end bit for bit alike."""
    from conftest import final_params, train

    from trainer.loop import Callback

    class NanAt3(Callback):
        def on_after_backward(self, trainer, batch, losses, weights) -> None:
            if trainer.global_step + 1 == 3:
                trainer.params[0].grad[0, 0] = float("nan")

    for sync in ("step", "deferred"):
        train(tmp_path / sync, "trainer.device=cuda", "~model",
              f"+model._target_={__name__}.Bf16Net", "optimizer=sgd", "trainer.max_steps=6",
              "logging.every_n_steps=2", "instrument.nonfinite.policy=skip",
              f"instrument.nonfinite.sync={sync}", callbacks=[NanAt3()])  # fmt: skip
        assert read_scalars(tmp_path / sync)["nonfinite/skipped_steps"] == [(3, 1.0)]
    step, deferred = final_params(tmp_path / "step"), final_params(tmp_path / "deferred")
    assert all(torch.equal(step[k], deferred[k]) for k in step)


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_rnn_cells_called_with_their_state_are_measured_exactly_on_cuda(kind) -> None:
    """On CUDA an LSTMCell's h′ and c′ come from one fused kernel: the step's graph has no path
    from c′ to h′, so nothing is cut and torch's own forward recomputes it (on a CPU, its
    composite cell computes h′ from c′: tests/test_per_sample.py). The three cells' per-sample
    norms against rows of the batch's Jacobian, float64 on the GPU, at coverage 1."""
    from test_per_sample import B, D, Unrolled, _jacobian_rows, measure

    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, 4, D, dtype=torch.float64, generator=g).cuda()
    y = torch.tensor([0, 1, 2, 2, 1, 0]).cuda()
    torch.manual_seed(0)
    model = Unrolled(kind, True).double().cuda()
    reference = _jacobian_rows(model, x, y)
    last, staged = measure(model, x, y)
    assert staged["per_sample/coverage"] == 1
    torch.testing.assert_close(last["per_sample/grad_norm"].double(), reference, rtol=1e-5, atol=0)


@pytest.mark.parametrize("tol", [1e-3, 1e-8, 0.0])
def test_lanczos_on_cuda_finds_the_largest_magnitude_eigenvalue(tol) -> None:
    """The Lanczos method with its vectors and generator on the GPU (its α and β read on the
    host per product, or, tol = 0, the tridiagonal's eigenvalues taken on the device): the
    exact Hessian of a small tanh MLP (float64), converged within tol·|θ| of its eigenvalue of
    largest magnitude; tol = 0 after 200 products, within 1e-8."""
    from test_higher_order import small_network_hessian

    from trainer.instrument import lanczos

    _, _, h = small_network_hessian("mlp")
    eigs = torch.linalg.eigvalsh(h)
    top = float(eigs[0] if -eigs[0] > eigs[-1] else eigs[-1])
    hc = h.cuda()
    params = [torch.zeros(h.shape[0], dtype=torch.float64, device="cuda")]
    gen = torch.Generator(device="cuda").manual_seed(0)
    iters = 200
    eig, products, converged = lanczos([], params, gen, iters, tol, lambda v: [hc @ v[0]])
    assert eig.device.type == "cuda" and converged
    assert abs(float(eig) - top) <= max(tol, 1e-8) * abs(top)
    assert products == iters if tol == 0 else products < iters


def test_a_lazy_model_on_cuda_starts_as_its_sized_twin(tmp_path) -> None:
    """The dry run initializes a lazy model as it is built, before it moves to the GPU: its
    initial values draw from the CPU generator, as its sized twin's do when it is built (on
    the GPU they would draw from the CUDA generator, another start and another dropout
    stream). The two runs end bit for bit equal."""
    from conftest import final_params, train
    from test_lazy_models import COMMON

    train(tmp_path / "lazy", *COMMON, "trainer.device=cuda")
    train(tmp_path / "sized", *COMMON, "trainer.device=cuda", "+model.lazy=false")
    lazy, sized = final_params(tmp_path / "lazy"), final_params(tmp_path / "sized")
    assert all(torch.equal(lazy[k], sized[k]) for k in sized)
    assert read_scalars(tmp_path / "lazy") == read_scalars(tmp_path / "sized")
