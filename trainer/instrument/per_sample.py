"""Per-sample gradient norms from the step's own backward, never the whole model's per-sample grads.

On a measuring step, forward hooks on every module that owns parameters keep its input a and put a
hook on its output, which receives the output's gradient g during the step's own backward. Per
layer, the squared norm of each sample's parameter gradient follows from (a, g):

* ``Linear`` on (B, in): ∇_W ℓᵢ = gᵢ aᵢᵀ, so ‖∇_W ℓᵢ‖² = ‖aᵢ‖² ‖gᵢ‖² and ‖∇_b ℓᵢ‖² = ‖gᵢ‖².
* ``Linear`` on sequences (B, T, in) and ``Conv1d``/``Conv2d`` (unfolded into T = output
  positions of a_t ∈ R^{C·k}): ∇_W ℓᵢ = Σ_t g_t a_tᵀ, whose squared norm is either the Gram form
  Σ_{t,s} (a_t·a_s)(g_t·g_s) (cost T²(C·k + out) per sample) or the squared norm of that one
  layer's per-sample gradient (cost T·C·k·out, memory B·C·k·out), whichever is cheaper; bias:
  ‖Σ_t g_t‖².
* any other module with parameters: ``torch.func.vmap(grad(...))`` of ⟨gᵢ, module(aᵢ)⟩ over its
  own parameters, one module at a time.
* BatchNorm in training mode mixes the samples of a batch: the gradient reaching any layer
  upstream of it mixes the samples too, so a per-sample gradient is not defined there. Such a
  BatchNorm and every module whose forward ran before it (a superset of its upstream layers) are
  left out, as are modules called more than once per forward or with several tensor inputs:
  reported (a warning, and ``per_sample/coverage``, the share of parameter elements whose
  per-sample gradient was captured: a module whose hook never saw its output's gradient counts as
  left out, e.g. attention returning a tuple, or a weight used outside its module's forward),
  never mixed in silently. Layers after the last such BatchNorm are exact.

The hooks see the gradient of the step's backward root, Σᵢ wᵢℓᵢ (scalar mode: wᵢ = 1/N over the
N samples of the accumulation window), so the direct result is the *weighted* norm ‖∇θ(wᵢℓᵢ)‖,
sample i's share of the step's gradient; the *unweighted* ‖∇θ ℓᵢ‖ is that divided by wᵢ, for
samples with wᵢ > 0 (a sample of weight 0, e.g. outside hard_topk's top k, contributes no gradient
and is left out of the unweighted statistics). Only the data loss is measured: parameter
regularizers have no per-sample part, and the input-gradient penalty is refused by the config.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from trainer.callbacks import Callback, Every
from trainer.distributed import all_gather_cat

if TYPE_CHECKING:
    from trainer.data.base import Batch
    from trainer.loop import Trainer

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- per-layer math


def _gram_or_direct(a: Tensor, g: Tensor) -> Tensor:
    """Σ over a layer's weight of the squared per-sample gradient Σ_t g_t a_tᵀ, per sample.

    ``a``: (B, G, T, Ci), ``g``: (B, G, T, Co) for G independent groups. Returns (B,).
    """
    t, ci, co = a.shape[2], a.shape[3], g.shape[3]
    if t * (ci + co) <= ci * co:  # the Gram form is cheaper
        ga = a @ a.transpose(-1, -2)  # (B, G, T, T)
        gg = g @ g.transpose(-1, -2)
        return (ga * gg).sum(dim=(1, 2, 3))
    per_sample = g.transpose(-1, -2) @ a  # (B, G, Co, Ci): this layer's per-sample gradient
    return per_sample.pow(2).sum(dim=(1, 2, 3))


def linear_sq_norms(module: nn.Linear, a: Tensor, g: Tensor) -> Tensor:
    """Per-sample ‖∇ℓᵢ‖² over the Linear's weight and bias, (B,)."""
    if a.ndim == 2:
        gg = (g * g).sum(1)
        sq = (a * a).sum(1) * gg
        return sq + gg if module.bias is not None and module.bias.requires_grad else sq
    b = a.shape[0]
    a3, g3 = a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])  # (B, T, ·)
    sq = _gram_or_direct(a3.unsqueeze(1), g3.unsqueeze(1))
    if module.bias is not None and module.bias.requires_grad:
        sq = sq + g3.sum(1).pow(2).sum(1)
    return sq


def conv_sq_norms(module: nn.Conv1d | nn.Conv2d, a: Tensor, g: Tensor) -> Tensor:
    """Per-sample ‖∇ℓᵢ‖² over a Conv1d/Conv2d's weight and bias, (B,)."""
    if isinstance(module, nn.Conv1d):  # as a Conv2d over (1, L)
        a, g = a.unsqueeze(2), g.unsqueeze(2)
        kernel, stride = (1, *module.kernel_size), (1, *module.stride)
        dilation = (1, *module.dilation)
        padding: Any = module.padding if isinstance(module.padding, str) else (0, *module.padding)
    else:
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
        padding = module.padding
    if isinstance(padding, str) or module.padding_mode != "zeros":
        # 'same'/'valid' or non-zero padding: pad exactly as the layer did, then unfold unpadded
        pads = module._reversed_padding_repeated_twice  # (left, right[, top, bottom])
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        a = F.pad(a, pads if a.ndim - 2 == len(pads) // 2 else (*pads, 0, 0), mode=mode)
        padding = 0
    b, groups = a.shape[0], module.groups
    cols = F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, C·k, T)
    gout = g.reshape(b, g.shape[1], -1)  # (B, out, T)
    cols = cols.reshape(b, groups, -1, cols.shape[-1]).transpose(-1, -2)  # (B, G, T, C·k/G)
    g4 = gout.reshape(b, groups, -1, gout.shape[-1]).transpose(-1, -2)  # (B, G, T, out/G)
    sq = _gram_or_direct(cols, g4)
    if module.bias is not None and module.bias.requires_grad:
        sq = sq + gout.sum(2).pow(2).sum(1)
    return sq


def func_sq_norms(module: nn.Module, a: Tensor, g: Tensor) -> Tensor:
    """Per-sample ‖∇ℓᵢ‖² over ``module``'s own parameters by torch.func (one layer at a time)."""
    params = {n: p.detach() for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    dtype = next(iter(params.values())).dtype  # run it in its parameters' precision
    a = a.to(dtype) if a.is_floating_point() else a
    g = g.to(dtype)

    def inner(p: dict[str, Tensor], ai: Tensor, gi: Tensor) -> Tensor:
        out = functional_call(module, p, (ai.unsqueeze(0),))
        return (out * gi.unsqueeze(0)).sum()

    per_sample = vmap(grad(inner), in_dims=(None, 0, 0))(params, a, g)
    return sum(v.pow(2).reshape(v.shape[0], -1).sum(1) for v in per_sample.values())


def sample_coefficients(c: Tensor) -> Tensor:
    """One coefficient per sample, (B,), from the loss elements' coefficients.

    Per-sample losses: c itself. Per-token losses (B, T): sample i's gradient is that of
    Σ_t c_it ℓ_it; when its nonzero coefficients are all equal (any uniform weighting, either
    ``loss.average``) that is cᵢ ∇Σ_t ℓ_it and cᵢ is returned, so the unweighted norm is that
    of the sequence's summed token loss. Tokens weighted unequally (``per_token``) have no
    such factor: NaN (the unweighted norm is then not reported for that sequence; the weighted
    one still is).
    """
    if c.ndim == 1:
        return c
    flat = c.reshape(c.shape[0], -1)
    top = flat.abs().amax(dim=1)  # (B,)
    equal = ((flat != 0) & (flat != top[:, None])).sum(dim=1) == 0
    return torch.where(equal, top, torch.nan)


# ----------------------------------------------------------------------------- the callback


class PerSampleNorms(Callback):
    """Logs ``per_sample/grad_norm`` (a histogram over the step's samples) with
    ``per_sample/grad_norm_mean`` and ``_max`` (unweighted ‖∇θ ℓᵢ‖), and/or
    ``per_sample/weighted_grad_norm`` (+ ``_mean``, ``_max``; ‖∇θ(wᵢℓᵢ)‖), every
    ``every_n_steps`` optimizer steps, plus ``per_sample/coverage``. See the module docstring.

    Steps it does not measure run without hooks.
    """

    def __init__(self, every_n_steps: int, loss: str = "unweighted", bins: int = 64):
        if every_n_steps < 1:
            raise ValueError(
                f"instrument.per_sample.every_n_steps: got {every_n_steps}, must be >= 1"
            )
        if loss not in ("weighted", "unweighted", "both"):
            raise ValueError(f"instrument.per_sample.loss: got {loss!r}")
        self.every, self.loss, self.bins = Every(every_n_steps), loss, bins
        self.modules: list[tuple[str, nn.Module]] = []
        self._handles: list[Any] = []
        self._sq: Tensor | None = None  # (B,) of the current micro-batch
        self._deferred: list[tuple[nn.Module, Tensor, Tensor]] = []
        self._calls: dict[nn.Module, int] = {}
        self._order: dict[nn.Module, int] = {}  # forward order within the micro-batch
        self._mixing: list[tuple[int, str]] = []  # (order, name) of training-mode BatchNorms
        self._excluded: dict[str, str] = {}  # module name -> why, for the current micro-batch
        self._captured: set[nn.Module] = set()  # modules whose per-sample part was added
        self._weighted: list[Tensor] = []  # per micro-batch, (B,) weighted norms
        self._weights: list[Tensor] = []  # per micro-batch, (B,) effective weights
        self._reported: set[str] = set()
        self._names: dict[nn.Module, str] = {}
        self._sizes: dict[nn.Module, int] = {}
        #: the last measured step's per-sample norms, on the device: tag -> (N,) (NaN for a
        #: weight-0 sample's unweighted norm)
        self.last: dict[str, Tensor] = {}

    def on_fit_start(self, trainer: Trainer) -> None:
        for name, m in trainer.model.named_modules():
            own = [p for p in m.parameters(recurse=False) if p.requires_grad]
            if own:
                self.modules.append((name, m))
                self._names[m] = name
                self._sizes[m] = sum(p.numel() for p in own)

    # ---- arming: hooks exist only while a measured micro-batch runs its forward and backward
    def on_train_batch_start(self, trainer: Trainer, batch: Batch) -> None:
        if not self.every.due_next(trainer.global_step):
            return
        self._sq = None
        self._deferred.clear()
        self._calls.clear()
        self._order.clear()
        self._mixing.clear()
        self._excluded.clear()
        self._captured.clear()
        for _, m in self.modules:
            self._handles.append(m.register_forward_hook(self._forward_hook))

    def _disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _forward_hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if (
            not torch.is_grad_enabled()
            or not isinstance(output, Tensor)
            or not output.requires_grad
        ):
            return
        name = self._names[module]
        self._calls[module] = self._calls.get(module, 0) + 1
        self._order.setdefault(module, len(self._order))
        if self._calls[module] > 1:
            self._excluded[name] = "called more than once per forward (shared weights)"
            return
        if isinstance(module, _BatchNorm) and module.training:
            self._excluded[name] = "BatchNorm in training mode mixes the samples of a batch"
            self._mixing.append((self._order[module], name))
            return
        tensors = [x for x in inputs if isinstance(x, Tensor)]
        if len(tensors) != 1 or tensors[0].shape[:1] != output.shape[:1]:
            self._excluded[name] = "not one tensor input with the batch as its first dimension"
            return
        a = tensors[0].detach()
        output.register_hook(lambda g, m=module, a=a: self._on_output_grad(m, a, g))

    def _upstream_of_mixing(self, module: nn.Module) -> str | None:
        """The training-mode BatchNorm whose forward ran after ``module``'s, if any."""
        later = [name for order, name in self._mixing if order > self._order[module]]
        return later[-1] if later else None

    def _on_output_grad(self, module: nn.Module, a: Tensor, g: Tensor) -> None:
        name = self._names[module]
        if name in self._excluded:
            return  # e.g. called twice: its parts cannot be combined per layer
        mixing = self._upstream_of_mixing(module)
        if mixing is not None:
            self._excluded[name] = (
                f"runs before {mixing!r} (BatchNorm in training mode), whose batch statistics "
                "mix the samples' gradients"
            )
            return
        with torch.no_grad():
            # float16/bfloat16 under autocast (and GradScaler-scaled): square in float32
            low = g.dtype in (torch.float16, torch.bfloat16)
            g = g.detach().float() if low else g.detach()
            if isinstance(module, nn.Linear):
                sq = linear_sq_norms(module, a.to(g.dtype), g)
            elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
                sq = conv_sq_norms(module, a.to(g.dtype), g)
            else:  # after the backward, outside autograd's engine
                self._deferred.append((module, a, g))
                return
            self._add(sq.float())
            self._captured.add(module)

    def _add(self, sq: Tensor) -> None:
        self._sq = sq if self._sq is None else self._sq + sq

    def on_after_backward(
        self, trainer: Trainer, batch: Batch, losses: Tensor, weights: Tensor | None
    ) -> None:
        if not self._handles:
            return
        self._disarm()
        for module, a, g in self._deferred:
            name = self._names[module]
            if name in self._excluded:
                continue
            try:
                sq = func_sq_norms(module, a, g)
            except RuntimeError as e:  # its forward cannot be recomputed per sample
                if "randomness" not in str(e):
                    raise
                self._excluded[name] = (
                    "its forward draws random numbers (dropout inside it), which a per-sample "
                    "recomputation cannot reproduce"
                )
                continue
            self._add(sq.float())
            self._captured.add(module)
        self._deferred.clear()
        for name, m in self.modules:  # coverage counts what was captured, not what was visited
            if m not in self._captured and name not in self._excluded:
                self._excluded[name] = (
                    "no per-sample gradient was captured: its forward gave no single tensor "
                    "output on the loss's path (e.g. attention returning a tuple), or its "
                    "parameters are used outside its own forward"
                )
        self._report(trainer)
        b = losses.shape[0]
        sq = self._sq if self._sq is not None else torch.zeros(b, device=losses.device)
        self._sq = None
        norms = sq.clamp_min(0).sqrt()
        if trainer.scaler is not None:  # the root's gradient was multiplied by the loss scale
            norms = norms / trainer.scaler.get_scale()  # host read: measuring steps only
        # each loss element's coefficient in the root that was backpropagated, as the
        # objective defines it (vector mode: the weights; data-parallel, × world size)
        if weights is None:
            weights = trainer.objective.coefficients(losses, batch.y, trainer.window)
        w = sample_coefficients(weights.detach().float())
        self._weighted.append(norms)
        self._weights.append(w)

    def _report(self, trainer: Trainer) -> None:
        new = {n: why for n, why in self._excluded.items() if n not in self._reported}
        for name, why in new.items():
            log.warning("per-sample gradient norms leave out %r: %s", name, why)
        self._reported.update(new)

    def on_before_optimizer_step(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
        if not self._weighted:
            return
        root, w = torch.cat(self._weighted), torch.cat(self._weights)
        self._weighted.clear()
        self._weights.clear()
        if trainer.world.distributed:  # one series over the global batch, in its order
            root, _ = all_gather_cat(root)
            w, _ = all_gather_cat(w)
        weighted = root / trainer.world.size  # the sample's share of the averaged gradient
        total = sum(self._sizes.values())
        excluded = sum(self._sizes[m] for n, m in self.modules if n in self._excluded)
        values: dict[str, Tensor | float] = {"per_sample/coverage": 1.0 - excluded / max(total, 1)}
        series: dict[str, Tensor] = {}
        if self.loss in ("weighted", "both"):
            series["per_sample/weighted_grad_norm"] = weighted
        if self.loss in ("unweighted", "both"):
            positive = w > 0  # False for NaN (unequal token weights)
            # unweighted = root / w for w > 0; a weight-0 sample has no gradient to measure
            unweighted = torch.where(
                positive, root / w.clamp_min(torch.finfo(w.dtype).tiny), torch.nan
            )
            series["per_sample/grad_norm"] = unweighted
        self.last = series
        trainer.stage_scalars(values)
        for tag, v in series.items():  # histogram, _mean and _max from the step's one host read
            trainer.stage_histogram(tag, v)
