"""Typed config schemas, registered in Hydra's ConfigStore.

Each config group (``configs/<group>/<choice>.yaml``) extends the schema stored here under
``<group>/<choice>_schema``, so Hydra itself rejects an unknown key or a value of the wrong type
while composing. Range and cross-field checks live in ``__post_init__`` and run when
:func:`validate` turns the composed config into these dataclasses, before anything is built.
Every error names the full key (``optimizer.lr``) and says what would be right.

This module imports no torch: composing a config stays cheap.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config value is out of range or inconsistent; the message names the key."""


class ContractError(TypeError):
    """A component of one's own (model, data, loss, callback, metric) or a value given to the
    trainer is not of the kind its contract takes; the message names it and the fix. One of
    the trainer's refusals: ``scripts/train.py`` prints it without the trainer's traceback
    (a TypeError that Python raises inside the trainer, a bug, keeps it)."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _check_val_fraction(value: float) -> None:
    _check(0.0 < value < 1.0, "data.val_fraction", f"got {value}, must be in (0, 1)")


def _one_of(value: object, allowed: tuple[str, ...], key: str) -> None:
    _check(value in allowed, key, f"got {value!r}, expected one of {', '.join(allowed)}")


# ----------------------------------------------------------------------------- data


@dataclass
class DataConfig:
    """Keys every data set has. ``batch_size`` is per optimizer micro-step."""

    _target_: str = MISSING
    batch_size: int = 64
    #: batch size for validation (no gradients, so it can be larger)
    eval_batch_size: int = 1024
    #: ``auto``: tensors on the training device when the set is held as tensors (not augmented)
    #: and its inputs take at most ``memory_limit_mb``, else a DataLoader; ``memory`` /
    #: ``dataloader`` force one path.
    loader: str = "auto"
    memory_limit_mb: int = 4096
    #: DataLoader path only
    num_workers: int = 2
    #: DataLoader path only, and only when training on CUDA
    pin_memory: bool = True
    #: drop the last, smaller training batch of each epoch
    drop_last: bool = False
    #: train on the first N samples of the training split only (0: all of it); debug=overfit
    #: sets it to one batch
    train_subset: int = 0

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "data.batch_size", f"got {self.batch_size}, must be >= 1")
        _check(
            self.eval_batch_size >= 1,
            "data.eval_batch_size",
            f"got {self.eval_batch_size}, must be >= 1",
        )
        _one_of(self.loader, ("auto", "memory", "dataloader"), "data.loader")
        _check(
            self.memory_limit_mb >= 0,
            "data.memory_limit_mb",
            f"got {self.memory_limit_mb}, must be >= 0",
        )
        _check(self.num_workers >= 0, "data.num_workers", f"got {self.num_workers}, must be >= 0")
        _check(
            self.train_subset >= 0,
            "data.train_subset",
            f"got {self.train_subset}, must be >= 0 (0: the whole training split)",
        )


@dataclass
class DigitsConfig(DataConfig):
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): real data, no network."""

    _target_: str = "trainer.data.digits.DigitsData"
    #: fraction of the 1,797 images held out for validation
    val_fraction: float = 0.2
    #: seed of the train/val split (independent of the run's seed, so runs compare on one split)
    split_seed: int = 0
    #: a long-tailed training split: class c keeps a fraction ratio^(-c/9) of its samples, so
    #: class 0 keeps all and class 9 about 1/ratio (1: balanced); validation stays balanced
    imbalance_ratio: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_val_fraction(self.val_fraction)
        _check(
            1.0 <= self.imbalance_ratio < math.inf,
            "data.imbalance_ratio",
            f"got {self.imbalance_ratio}, must be finite and >= 1 (1: balanced)",
        )


@dataclass
class TorchvisionConfig(DataConfig):
    """MNIST, Fashion-MNIST or CIFAR-10 through torchvision's data set classes."""

    _target_: str = "trainer.data.vision.TorchvisionData"
    name: str = MISSING
    #: folder holding the files (relative paths are relative to where you launch)
    root: str = "outputs/data"
    #: fetch missing files from the internet; off by default so a missing file is an error
    download: bool = False
    #: random crop (+ horizontal flip for CIFAR-10); augmented sets use the DataLoader path
    augment: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _one_of(self.name, ("mnist", "fashion_mnist", "cifar10"), "data.name")
        _check(bool(self.root), "data.root", "must be a folder path, got an empty string")
        _check(
            not (self.augment and self.loader == "memory"),
            "data.loader",
            "'memory' cannot apply per-sample augmentation; use data.loader=auto or dataloader",
        )


@dataclass
class SyntheticConfig(DataConfig):
    """A generated, learnable task: Gaussian clusters around one random mean per class."""

    _target_: str = "trainer.data.synthetic.SyntheticData"
    num_train: int = 8192
    num_val: int = 2048
    num_classes: int = 10
    #: shape of one input, e.g. [64] for vectors or [3, 32, 32] for images
    shape: list[int] = field(default_factory=lambda: [64])
    #: standard deviation of the noise around each class mean (the means have unit variance)
    noise: float = 1.0
    #: seed of the generated data (independent of the run's seed)
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("num_train", "num_val"):
            value = getattr(self, key)
            _check(value >= 1, f"data.{key}", f"got {value}, must be >= 1")
        _check(self.num_classes >= 2, "data.num_classes", f"got {self.num_classes}, must be >= 2")
        _check(
            len(self.shape) >= 1 and all(s >= 1 for s in self.shape),
            "data.shape",
            f"got {list(self.shape)}, must be a non-empty list of positive sizes",
        )
        _check(
            0 <= self.noise < math.inf, "data.noise", f"got {self.noise}, must be finite and >= 0"
        )


@dataclass
class DiabetesConfig(DataConfig):
    """scikit-learn's bundled diabetes data (442 samples, 10 features): regression, no network."""

    _target_: str = "trainer.data.diabetes.DiabetesData"
    val_fraction: float = 0.2
    split_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_val_fraction(self.val_fraction)


@dataclass
class TensorsConfig(DataConfig):
    """Your tensors from a .pt or .npz file holding x, y (and optionally x_val, y_val)."""

    _target_: str = "trainer.data.tensors.TensorsData"
    path: str = MISSING
    #: without x_val/y_val in the file: the fraction of samples held out for validation
    val_fraction: float = 0.2
    split_seed: int = 0
    #: classes of int64 labels (null: the largest label + 1)
    num_classes: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.path.lower().endswith((".pt", ".npz")),
            "data.path",
            f"got {self.path!r}, expected a .pt or .npz file",
        )
        _check_val_fraction(self.val_fraction)
        _check(
            self.num_classes is None or self.num_classes >= 2,
            "data.num_classes",
            f"got {self.num_classes}, must be >= 2 (or null: read off the labels)",
        )


@dataclass
class CharsConfig(DataConfig):
    """Next-character prediction on text bundled with scikit-learn (trainer/data/chars.py)."""

    _target_: str = "trainer.data.chars.CharText"
    #: characters per sample (the model's context)
    block_size: int = 64
    #: training windows start every ``stride`` characters (< block_size: they overlap; at
    #: most block_size, or text is skipped); null: block_size // 2 (overlapping by half)
    stride: int | None = None
    #: the last fraction of the text, held out for validation
    val_fraction: float = 0.1
    #: the target id of padding (must equal loss.ignore_index)
    ignore_index: int = -100

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_val_fraction(self.val_fraction)
        _check(self.block_size >= 1, "data.block_size", f"got {self.block_size}, must be >= 1")
        if self.stride is not None:
            _check(
                1 <= self.stride <= self.block_size,
                "data.stride",
                f"got {self.stride}, must be >= 1 and <= data.block_size ({self.block_size}): "
                "windows farther apart than their length skip text (null: block_size // 2)",
            )


# ----------------------------------------------------------------------------- model


@dataclass
class MLPConfig:
    _target_: str = "trainer.models.mlp.MLP"
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _check(
            all(h >= 1 for h in self.hidden),
            "model.hidden",
            f"got {list(self.hidden)}, every width must be >= 1",
        )
        _check(0.0 <= self.dropout < 1.0, "model.dropout", f"got {self.dropout}, must be in [0, 1)")


@dataclass
class CNNConfig:
    _target_: str = "trainer.models.cnn.CNN"
    channels: list[int] = field(default_factory=lambda: [32, 64])
    hidden: int = 128
    batch_norm: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _check(
            len(self.channels) >= 1 and all(c >= 1 for c in self.channels),
            "model.channels",
            f"got {list(self.channels)}, must be a non-empty list of positive widths",
        )
        _check(self.hidden >= 1, "model.hidden", f"got {self.hidden}, must be >= 1")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", f"got {self.dropout}, must be in [0, 1)")


@dataclass
class CharTransformerConfig:
    _target_: str = "trainer.models.char_lm.CharTransformer"
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    dim_feedforward: int = 256
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for key in ("d_model", "n_heads", "n_layers", "dim_feedforward"):
            value = getattr(self, key)
            _check(value >= 1, f"model.{key}", f"got {value}, must be >= 1")
        _check(
            self.d_model % self.n_heads == 0,
            "model.n_heads",
            f"d_model {self.d_model} must be divisible by n_heads {self.n_heads}",
        )
        _check(0.0 <= self.dropout < 1.0, "model.dropout", f"got {self.dropout}, must be in [0, 1)")


@dataclass
class ResNetConfig:
    _target_: str = "trainer.models.resnet.resnet18"
    #: ``auto``: a 3x3 stride-1 stem without max-pool for images up to 64 px (CIFAR-style),
    #: torchvision's 7x7 stride-2 stem above; ``true``/``false`` force one.
    small_input: str = "auto"

    def __post_init__(self) -> None:
        _one_of(str(self.small_input).lower(), ("auto", "true", "false"), "model.small_input")


# ----------------------------------------------------------------------------- optimizer


@dataclass
class OptimizerConfig:
    _target_: str = MISSING
    _partial_: bool = True
    lr: float = 1e-3
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _check(0 < self.lr < math.inf, "optimizer.lr", f"got {self.lr}, must be finite and > 0")
        _check(
            0 <= self.weight_decay < math.inf,
            "optimizer.weight_decay",
            f"got {self.weight_decay}, must be finite and >= 0",
        )


@dataclass
class SGDConfig(OptimizerConfig):
    _target_: str = "torch.optim.SGD"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    #: torch's fused implementation (one kernel for all parameters); None: fused on a CUDA
    #: device with floating-point parameters (the non-finite guard's deferred check then costs
    #: no copy), torch's default otherwise
    fused: bool | None = None
    #: torch's multi-tensor (foreach) implementation; None: torch's default (true on CUDA
    #: where not fused); true also keeps a CUDA run off the fused default
    foreach: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            0 <= self.momentum < 1, "optimizer.momentum", f"got {self.momentum}, must be in [0, 1)"
        )
        _check(
            not self.nesterov or self.momentum > 0,
            "optimizer.nesterov",
            "Nesterov momentum needs optimizer.momentum > 0",
        )


@dataclass
class AdamWConfig(OptimizerConfig):
    _target_: str = "torch.optim.AdamW"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    #: torch's fused implementation (one kernel for all parameters); None: fused on a CUDA
    #: device with floating-point parameters (the non-finite guard's deferred check then costs
    #: no copy), torch's default otherwise
    fused: bool | None = None
    #: torch's multi-tensor (foreach) implementation; None: torch's default (true on CUDA
    #: where not fused); true also keeps a CUDA run off the fused default
    foreach: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optimizer.betas",
            f"got {list(self.betas)}, must be two numbers in [0, 1)",
        )
        _check(0 < self.eps < math.inf, "optimizer.eps", f"got {self.eps}, must be finite and > 0")


# ----------------------------------------------------------------------------- scheduler


@dataclass
class SchedulerConfig:
    """``_target_: null``: a constant learning rate. Schedulers step once per optimizer step."""

    _target_: str | None = None
    _partial_: bool = True


@dataclass
class CosineConfig(SchedulerConfig):
    """Cosine decay from ``optimizer.lr`` to ``eta_min`` over the run's total optimizer steps."""

    _target_: str | None = "torch.optim.lr_scheduler.CosineAnnealingLR"
    eta_min: float = 0.0

    def __post_init__(self) -> None:
        _check(
            0 <= self.eta_min < math.inf,
            "scheduler.eta_min",
            f"got {self.eta_min}, must be finite and >= 0",
        )


@dataclass
class StepLRConfig(SchedulerConfig):
    """Multiply the learning rate by ``gamma`` every ``step_size`` optimizer steps."""

    _target_: str | None = "torch.optim.lr_scheduler.StepLR"
    step_size: int = 1000
    gamma: float = 0.1

    def __post_init__(self) -> None:
        _check(self.step_size >= 1, "scheduler.step_size", f"got {self.step_size}, must be >= 1")
        _check(0 < self.gamma <= 1, "scheduler.gamma", f"got {self.gamma}, must be in (0, 1]")


# ----------------------------------------------------------------------------- loss, weighting


LOSS_MODES = ("scalar", "vector")


@dataclass
class LossConfig:
    """Keys every loss has. ``mode`` is read by the trainer, not passed to the loss:
    ``scalar``: ``losses.mean().backward()``; ``vector``: ``losses.backward(gradient=w)``.
    A loss of your own needs no schema: ``_target_`` plus its constructor's keys (``mode``
    comes from configs/train.yaml)."""

    _target_: str = MISSING
    mode: str = "scalar"

    def __post_init__(self) -> None:
        _one_of(self.mode, LOSS_MODES, "loss.mode")


@dataclass
class CrossEntropyConfig(LossConfig):
    """Per-sample cross-entropy over class logits (classification; trainer/losses.py)."""

    _target_: str = "trainer.losses.CrossEntropy"
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            0.0 <= self.label_smoothing < 1.0,
            "loss.label_smoothing",
            f"got {self.label_smoothing}, must be in [0, 1)",
        )


@dataclass
class MSEConfig(LossConfig):
    """Per-sample mean squared error (regression; trainer/losses.py)."""

    _target_: str = "trainer.losses.MSE"


@dataclass
class TokenCrossEntropyConfig(LossConfig):
    """Per-token cross-entropy (B, T) with padding (sequences; trainer/losses.py)."""

    _target_: str = "trainer.losses.TokenCrossEntropy"
    #: ``tokens``: Σℓ / valid tokens; ``sequences``: the mean of each sequence's mean
    average: str = "tokens"
    #: the target id that marks padding (loss 0, no gradient, not counted)
    ignore_index: int = -100
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _one_of(self.average, ("tokens", "sequences"), "loss.average")
        _check(
            0.0 <= self.label_smoothing < 1.0,
            "loss.label_smoothing",
            f"got {self.label_smoothing}, must be in [0, 1)",
        )


@dataclass
class WeightingConfig:
    """Per-sample gradient weights for ``loss.mode=vector`` (formulas: trainer/weighting.py)."""

    _target_: str = MISSING
    #: ``mean``: w = r / sum(r), weights sum to 1 (uniform -> 1/B, equal to scalar mode);
    #: ``sum``: w = B r / sum(r), weights average 1; ``none``: w = r
    normalize: str = "mean"

    def __post_init__(self) -> None:
        _one_of(self.normalize, ("mean", "sum", "none"), "weighting.normalize")


@dataclass
class UniformWeightingConfig(WeightingConfig):
    _target_: str = "trainer.weighting.UniformWeighting"


@dataclass
class ClassBalancedWeightingConfig(WeightingConfig):
    _target_: str = "trainer.weighting.ClassBalancedWeighting"


@dataclass
class PerClassWeightingConfig(WeightingConfig):
    _target_: str = "trainer.weighting.PerClassWeighting"
    #: one weight per class, finite and >= 0 (the length is checked against the data)
    weights: list[float] = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        for i, w in enumerate(self.weights):
            _check(
                math.isfinite(w) and w >= 0,
                f"weighting.weights[{i}]",
                f"got {w}, every class weight must be finite and >= 0",
            )
        _check(len(self.weights) >= 1, "weighting.weights", "give one weight per class")
        _check(
            sum(self.weights) > 0,
            "weighting.weights",
            "every class weight is 0: no sample would contribute to any gradient",
        )


@dataclass
class PerSampleWeightingConfig(WeightingConfig):
    _target_: str = "trainer.weighting.PerSampleWeighting"
    #: .pt, .npy or .csv file with one weight per training sample (checked when the run starts)
    path: str = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.path.lower().endswith((".pt", ".npy", ".csv")),
            "weighting.path",
            f"got {self.path!r}, expected a .pt, .npy or .csv file",
        )


@dataclass
class FocalWeightingConfig(WeightingConfig):
    _target_: str = "trainer.weighting.FocalWeighting"
    #: focusing exponent: r = (1 - p_true)^gamma (0: uniform)
    gamma: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            math.isfinite(self.gamma) and self.gamma >= 0,
            "weighting.gamma",
            f"got {self.gamma}, must be finite and >= 0",
        )


@dataclass
class PerTokenWeightingConfig(WeightingConfig):
    _target_: str = "trainer.weighting.PerTokenWeighting"
    #: r = (inverse target-token frequency)^power: 0 uniform, 1 fully inverse
    power: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0.0 <= self.power < math.inf, "weighting.power", f"got {self.power}, must be >= 0")


@dataclass
class HardTopKWeightingConfig(WeightingConfig):
    _target_: str = "trainer.weighting.HardTopKWeighting"
    #: keep the k highest-loss samples of each batch; k > 0 takes precedence over ``fraction``
    k: int = 0
    #: with k = 0: keep ceil(fraction * B) of them
    fraction: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.k >= 0, "weighting.k", f"got {self.k}, must be >= 0")
        _check(
            self.k > 0 or 0.0 < self.fraction <= 1.0,
            "weighting.fraction",
            f"got {self.fraction}, must be in (0, 1] (or set weighting.k > 0)",
        )


@dataclass
class RegularizerConfig:
    """One entry of the ``regularizer`` list: ``coef * R(selected parameters)``."""

    _target_: str = "trainer.regularizers.Regularizer"
    #: the coefficient λ (>= 0)
    coef: float = 1e-4
    #: fnmatch patterns on parameter names; selected: matches an include, no exclude ...
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    #: ... and has at least this many dimensions (2 leaves out biases and norm-layer scales)
    min_ndim: int = 2
    #: a pattern matching no parameter's name is an error unless this is true (a preset
    #: shared by models that differ); each is then named in a warning
    allow_unmatched: bool = False


@dataclass
class InputGradPenaltyConfig:
    """``regularizer=[input_grad_penalty]``: λ · mean_i ‖∇_{x_i} ℓ‖² ("double backprop")."""

    _target_: str = "trainer.regularizers.InputGradPenalty"
    #: the coefficient λ (>= 0)
    coef: float = 0.01


#: regularizer name -> the schema its config file extends
REGULARIZERS: dict[str, type] = {
    "l2": RegularizerConfig,
    "l1": RegularizerConfig,
    "orthogonal": RegularizerConfig,
    "input_grad_penalty": InputGradPenaltyConfig,
}


# ----------------------------------------------------------------------------- instrumentation


@dataclass
class CurvatureConfig:
    """Hessian curvature of the training loss on the current batch (trainer/instrument/).

    Runs on its own steps only; between them it costs nothing. Random probes and starting
    vectors come from its own generator, so measuring never changes the trajectory.
    """

    #: the callback built from these keys, like a user callback (your own class may stand in)
    _target_: str = "trainer.instrument.Curvature"
    #: measure every N optimizer steps (0: off)
    every_n_steps: int = 0
    #: Lanczos steps at most for ``curvature/top_eig`` (one Hessian-vector product each; the
    #: key keeps its name from the power iteration it replaced) ...
    power_iters: int = 50
    #: ... stopping early once the estimate changes by at most this relative amount and an
    #: eigenvalue lies that near it (trainer.instrument.curvature.lanczos)
    tol: float = 1e-3
    #: Rademacher probes for Hutchinson's ``curvature/trace`` (one Hessian-vector product each)
    trace_probes: int = 10
    #: seed of the measurement's own random generator
    seed: int = 0

    def __post_init__(self) -> None:
        key = "instrument.curvature."
        _check(self.every_n_steps >= 0, key + "every_n_steps", "must be >= 0 (0: off)")
        _check(self.power_iters >= 1, key + "power_iters", f"got {self.power_iters}, must be >= 1")
        # (tol=inf stopped power iteration after 2 products and called it converged: 18.0 for
        # an eigenvalue of 19.1, a review's)
        _check(0 <= self.tol < math.inf, key + "tol", f"got {self.tol}, must be finite and >= 0")
        _check(
            self.trace_probes >= 1, key + "trace_probes", f"got {self.trace_probes}, must be >= 1"
        )


@dataclass
class NormsConfig:
    """Gradient and weight norms at the measuring point (after accumulation and unscaling,
    before clipping), in one batched host read per measuring step."""

    _target_: str = "trainer.instrument.Norms"
    #: every N optimizer steps (0: off): grad_norm/<param>, grad_norm/total_clipped, ...
    every_n_steps: int = 10
    #: ... param_norm/<param> (the weights the step updates) ...
    param_norm: bool = True
    #: ... and update_ratio/<param> = ‖Δθ‖/‖θ‖ of the step (copies the weights on those steps);
    #: grad_agreement/consecutive and /data_reg, cosines between the step's gradient and the
    #: previous step's, and between the data and regularizer gradients (one copy of the
    #: gradients kept from the step before each measuring step)
    update_ratio: bool = True
    agreement: bool = False

    def __post_init__(self) -> None:
        _check(self.every_n_steps >= 0, "instrument.norms.every_n_steps", "must be >= 0 (0: off)")


HISTOGRAM_RANGES = ("minmax", "symmetric", "fixed")


@dataclass
class HistogramsConfig:
    """Histograms of gradients and weights, binned on the training device."""

    _target_: str = "trainer.instrument.Histograms"
    #: every N optimizer steps (0: off)
    every_n_steps: int = 100
    bins: int = 64
    #: ``minmax``: [min, max] of the tensor; ``symmetric``: [-max|x|, max|x|]; ``fixed``:
    #: [min, max] below, values outside counted in the first / last bucket
    range: str = "minmax"
    min: float = -1.0
    max: float = 1.0
    grads: bool = True
    weights: bool = True

    def __post_init__(self) -> None:
        key = "instrument.histograms."
        _check(self.every_n_steps >= 0, key + "every_n_steps", "must be >= 0 (0: off)")
        _check(1 <= self.bins <= 10_000, key + "bins", f"got {self.bins}, must be in [1, 10000]")
        _one_of(self.range, HISTOGRAM_RANGES, key + "range")
        _check(
            self.range != "fixed" or (math.isfinite(self.min) and math.isfinite(self.max)
                                      and self.min < self.max),
            key + "min",
            f"got min={self.min}, max={self.max}: range=fixed needs finite min < max",
        )  # fmt: skip


PER_SAMPLE_LOSSES = ("weighted", "unweighted", "both")


@dataclass
class PerSampleConfig:
    """Per-sample gradient norms from activations and output gradients seen by hooks."""

    _target_: str = "trainer.instrument.PerSampleNorms"
    #: every N optimizer steps (0: off)
    every_n_steps: int = 0
    #: ``unweighted``: ‖∇θ ℓᵢ‖ (per_sample/grad_norm); ``weighted``: ‖∇θ(wᵢℓᵢ)‖, each sample's
    #: share of the step's gradient (per_sample/weighted_grad_norm; scalar mode: wᵢ = 1/N); ``both``
    loss: str = "unweighted"
    #: the decay of the EMAs behind per_sample/noise_scale_ema (of tr(Σ) and |G|² separately)
    noise_ema: float = 0.9
    #: grad_snr/<param>: per parameter tensor, ‖ḡ‖² / tr(S) over the step's samples
    snr: bool = True
    #: modules (names or fnmatch patterns over model.named_modules()) measured as one unit
    #: with all their submodules' parameters: a mixture of experts calling its experts on
    #: the rows it routes to them (each expert alone sees no batch and is left out)
    units: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        key = "instrument.per_sample."
        _check(self.every_n_steps >= 0, key + "every_n_steps", "must be >= 0 (0: off)")
        _one_of(self.loss, PER_SAMPLE_LOSSES, key + "loss")
        _check(0 <= self.noise_ema < 1, key + "noise_ema", "must be in [0, 1)")


NONFINITE_POLICIES = ("off", "raise", "skip")
NONFINITE_SYNCS = ("auto", "step", "deferred")


@dataclass
class NonfiniteConfig:
    """The guard against NaN/Inf in the loss or a gradient, checked before the optimizer step."""

    _target_: str = "trainer.instrument.NonfiniteGuard"

    #: ``raise``: stop with an error naming the step and the first non-finite parameter;
    #: ``skip``: leave parameters and optimizer state untouched for that step; ``off``
    policy: str = "raise"
    #: check every N optimizer steps
    every_n_steps: int = 1
    #: ``skip``: give up after this many skipped steps in a row
    max_consecutive_skips: int = 10
    #: ``step``: read the flag every checked step; ``deferred``: skip on the device, read the
    #: flags on logging steps; ``auto``: deferred on an accelerator, step on a CPU
    sync: str = "auto"

    def __post_init__(self) -> None:
        key = "instrument.nonfinite."
        _one_of(self.policy, NONFINITE_POLICIES, key + "policy")
        _check(
            self.every_n_steps >= 1,
            key + "every_n_steps",
            f"got {self.every_n_steps}, must be >= 1",
        )
        _check(
            self.max_consecutive_skips >= 1,
            key + "max_consecutive_skips",
            f"got {self.max_consecutive_skips}, must be >= 1",
        )
        _one_of(self.sync, NONFINITE_SYNCS, key + "sync")


@dataclass
class InstrumentConfig:
    """What is measured, each quantity on its own cadence (``instrument=default|none|full``).
    Each quantity is a callback built from its ``_target_`` and keys, as a user callback is."""

    norms: NormsConfig = field(default_factory=NormsConfig)
    histograms: HistogramsConfig = field(default_factory=HistogramsConfig)
    per_sample: PerSampleConfig = field(default_factory=PerSampleConfig)
    nonfinite: NonfiniteConfig = field(default_factory=NonfiniteConfig)
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)


# ----------------------------------------------------------------------------- trainer, logging

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass
class CheckpointConfig:
    #: a checkpoint every N optimizer steps (0: only the final one), at a point a resumed run
    #: continues from exactly; always one at the end (``last.pt``) and on SIGTERM/SIGINT/SIGUSR1
    every_n_steps: int = 200
    #: periodic checkpoints kept (the oldest are deleted once a newer one is safely written)
    keep_last: int = 3
    #: where ``trainer.resume=auto`` looks for earlier runs' checkpoints (relative to the
    #: working directory, as Hydra's output dirs are)
    search_dir: str = "outputs"

    def __post_init__(self) -> None:
        _check(
            self.every_n_steps >= 0,
            "trainer.checkpoint.every_n_steps",
            f"got {self.every_n_steps}, must be >= 0 (0: only at the end)",
        )
        _check(
            self.keep_last >= 1,
            "trainer.checkpoint.keep_last",
            f"got {self.keep_last}, must be >= 1",
        )


@dataclass
class TrainerConfig:
    max_epochs: int = 20
    #: stop after this many optimizer steps (-1: no limit); the first of the two limits wins
    max_steps: int = -1
    #: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``
    device: str = "auto"
    #: ``32`` (float32), ``bf16`` (bfloat16 autocast) or ``16`` (float16 autocast + GradScaler)
    precision: str = "32"
    #: clip the total gradient L2 norm to this value (0: no clipping)
    grad_clip: float = 0.0
    accumulate_grad_batches: int = 1
    #: deterministic algorithms (torch.use_deterministic_algorithms); slower on GPU
    deterministic: bool = False
    #: torch.autograd.detect_anomaly around training: the first backward that produces a
    #: NaN names the forward operation that caused it (slow; debug=anomaly)
    detect_anomaly: bool = False
    #: CNNs: weights and 4-D inputs in channels-last memory order (faster convolutions with
    #: tensor cores on GPUs; the same values)
    channels_last: bool = False
    #: data-parallel on CUDA: BatchNorms as SyncBatchNorm, normalizing over the global batch
    #: (without it, as torch's DDP, each rank normalizes its own part: warned)
    sync_batchnorm: bool = False
    #: data-parallel: DDP looks for parameters a step's forward did not use (an auxiliary
    #: head, a branch not taken) after each forward (a graph traversal per step; without it,
    #: such a model fails at its second step, naming this key)
    find_unused_parameters: bool = False
    #: run the training forward through torch.compile (``compile_backend``: inductor, or e.g.
    #: eager / aot_eager to check a model traces); per-sample norms are refused with it
    compile: bool = False
    compile_backend: str = "inductor"
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    #: continue from a checkpoint: a path, or ``auto`` (the newest valid checkpoint of the run
    #: with this ``run_id`` under ``trainer.checkpoint.search_dir``; a fresh start if none)
    resume: str | None = None
    #: the run's stable identity across restarts (Hydra gives each start a new dir); null:
    #: derived from the config (a hash of everything but the resume, run_id, checkpoint and
    #: progress keys), so the same command resumes the same run
    run_id: str | None = None

    def __post_init__(self) -> None:
        _check(self.max_epochs >= 1, "trainer.max_epochs", f"got {self.max_epochs}, must be >= 1")
        _check(
            self.max_steps == -1 or self.max_steps >= 1,
            "trainer.max_steps",
            f"got {self.max_steps}, must be >= 1, or -1 for no limit",
        )
        _check(
            bool(_DEVICE.match(self.device)),
            "trainer.device",
            f"got {self.device!r}, expected auto, cpu, cuda, cuda:N or mps",
        )
        _one_of(str(self.precision), ("32", "bf16", "16"), "trainer.precision")
        _check(self.grad_clip >= 0, "trainer.grad_clip", f"got {self.grad_clip}, must be >= 0")
        _check(
            self.accumulate_grad_batches >= 1,
            "trainer.accumulate_grad_batches",
            f"got {self.accumulate_grad_batches}, must be >= 1",
        )


@dataclass
class LoggingConfig:
    #: write train scalars (and read them back to the host) every N optimizer steps
    every_n_steps: int = 10
    #: progress while training: a tqdm bar on a terminal; plain log lines every
    #: ``progress_every_n_steps`` when the output is not a terminal or in a parallel sweep
    progress: bool = True
    progress_every_n_steps: int = 100

    def __post_init__(self) -> None:
        _check(
            self.every_n_steps >= 1,
            "logging.every_n_steps",
            f"got {self.every_n_steps}, must be >= 1",
        )
        _check(
            self.progress_every_n_steps >= 1,
            "logging.progress_every_n_steps",
            f"got {self.progress_every_n_steps}, must be >= 1",
        )


@dataclass
class TrainConfig:
    """The composed run config (``configs/train.yaml``)."""

    seed: int = 0
    data: Any = MISSING
    model: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    loss: Any = MISSING
    weighting: Any = MISSING
    #: name -> regularizer config (``regularizer=[l2,orthogonal]``); empty by default
    regularizer: dict[str, Any] = field(default_factory=dict)
    instrument: InstrumentConfig = field(default_factory=InstrumentConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    #: name -> a callback's config (``_target_`` + its keys), built and added to the run's
    #: callbacks after the instruments (``callbacks=<file>``, configs/callbacks/)
    callbacks: dict[str, Any] = field(default_factory=dict)
    #: the metric a run returns to a sweeper (Optuna optimizes it) and HPARAMS lists first;
    #: null: the loss's task decides (val/acc for classification, val/mse for regression)
    monitor: str | None = None

    #: groups whose choice builds an object with ``_target_``: a schema of the project's own,
    #: or any user ``_target_`` (checked against its signature by :func:`validate`)
    GROUPS: ClassVar[tuple[str, ...]] = (
        "data", "model", "optimizer", "scheduler", "loss", "weighting",
    )  # fmt: skip

    def __post_init__(self) -> None:
        _check(0 <= self.seed < 2**32, "seed", f"got {self.seed}, must be in [0, 2**32)")
        mode = self.loss.get("mode") if isinstance(self.loss, dict) else self.loss.mode
        _one_of(mode, LOSS_MODES, "loss.mode")
        weighting = self.weighting
        if mode == "scalar" and isinstance(weighting, WeightingConfig):
            uniform_mean = type(weighting) is UniformWeightingConfig and (
                weighting.normalize == "mean"
            )
            _check(
                uniform_mean,
                "weighting",
                f"{weighting._target_.rsplit('.', 1)[-1]} (normalize={weighting.normalize}) "
                "needs loss.mode=vector; scalar mode always backpropagates the plain mean of "
                "the losses",
            )
        if mode == "scalar" and isinstance(weighting, dict):
            _check(
                False,
                "weighting",
                f"{weighting.get('_target_')} needs loss.mode=vector; scalar mode always "
                "backpropagates the plain mean of the losses",
            )
        for name, reg in self.regularizer.items():
            if name not in REGULARIZERS and isinstance(reg, dict) and "_target_" in reg:
                continue  # a regularizer of one's own (checked by _check_user_components)
            _check(
                name in REGULARIZERS,
                "regularizer",
                f"got {name!r}, expected one of {', '.join(REGULARIZERS)}, or a file of one's "
                "own (configs/regularizer/<name>.yaml with '# @package regularizer.<name>' and "
                "a _target_: a trainer.regularizers.Regularizer subclass)",
            )
            _check(
                isinstance(reg, REGULARIZERS[name]),
                f"regularizer.{name}",
                f"choose it from configs/regularizer/ (regularizer=[{','.join(REGULARIZERS)}])",
            )
            _check(
                math.isfinite(reg.coef) and reg.coef >= 0,
                f"regularizer.{name}.coef",
                f"got {reg.coef}, must be finite and >= 0",
            )
            if isinstance(reg, RegularizerConfig):
                _check(reg.min_ndim >= 0, f"regularizer.{name}.min_ndim", "must be >= 0")
        _check(
            self.instrument.per_sample.every_n_steps == 0
            or "input_grad_penalty" not in self.regularizer,
            "instrument.per_sample.every_n_steps",
            "per-sample gradient norms read the data loss's gradient flowing through each layer; "
            "regularizer.input_grad_penalty's double backward flows through the same layers and "
            "would mix into them: turn one of the two off (instrument.per_sample.every_n_steps=0"
            "; instrument=full and debug=anomaly turn them on)",
        )
        for name, node in self.callbacks.items():
            _check(
                isinstance(node, dict) and "_target_" in node,
                f"callbacks.{name}",
                "must be a _target_ (a Callback class) plus its keys",
            )

    @property
    def loss_mode(self) -> str:
        return str(self.loss.get("mode") if isinstance(self.loss, dict) else self.loss.mode)


#: keys of a group's node the project reads itself, not passed to a user target
RESERVED_KEYS: dict[str, tuple[str, ...]] = {"loss": ("mode",)}
#: keyword arguments the builder passes from the data, to a model that asks for them
MODEL_PROVIDED = ("in_shape", "out_dim", "num_classes", "vocab_size")


#: what the trainer calls an optimizer's and a scheduler's partial ``_target_`` with
CALLED_WITH = {"optimizer": "the model's parameters", "scheduler": "the optimizer"}


def _check_user_components(typed: TrainConfig) -> None:
    """Import each user ``_target_`` (a group's node without a schema, a built-in one whose
    ``_target_`` was replaced, and every callback) and check its keys against the target's
    signature; an optimizer or scheduler the trainer cannot step is refused here."""
    from trainer.components import check_component, resolve_target

    for group in TrainConfig.GROUPS:
        node = getattr(typed, group)
        if isinstance(node, dict):
            target = node.get("_target_")
            if group in CALLED_WITH and target is not None and not node.get("_partial_"):
                raise ConfigError(
                    f"{group}: the trainer calls {target} with {CALLED_WITH[group]}: add "
                    f"_partial_: true to its YAML file (or +{group}._partial_=true)"
                )
            provided = MODEL_PROVIDED if group == "model" else ()
            check_component(group, node, RESERVED_KEYS.get(group, ()), provided)
        elif dataclasses.is_dataclass(node) and not isinstance(node, type) and group in CALLED_WITH:
            target = getattr(node, "_target_", None)
            preset = next(f.default for f in dataclasses.fields(node) if f.name == "_target_")
            if target is not None and target != preset:  # a preset's keys for another class
                # (model, data and loss: a class taking **kwargs may swallow them, so a key it
                # refuses is named when it is built, trainer.components.build)
                try:
                    check_component(group, dataclasses.asdict(node))
                except ConfigError as e:
                    raise ConfigError(
                        f"{e} (the preset's keys, written for {preset}; for another class "
                        f"give {group} a YAML file of its own: README, 'Bring your own')"
                    ) from e
        else:
            continue
        if group in CALLED_WITH and target is not None:
            check_stepping(group, resolve_target(group, target))
    optimizer = typed.optimizer
    if dataclasses.is_dataclass(optimizer) and not isinstance(optimizer, type):
        optimizer = dataclasses.asdict(optimizer)
    both = [k for k in ("foreach", "differentiable") if optimizer.get(k)]
    if optimizer.get("fused") and both:  # (torch's own error, at the build, named no key)
        raise ConfigError(
            f"optimizer: fused=true and {both[0]}=true together, which torch refuses (one "
            "implementation per step); drop one of them"
        )
    for name, node in typed.callbacks.items():
        check_component(f"callbacks.{name}", node)
    for name, node in typed.regularizer.items():
        if isinstance(node, dict):  # one of one's own
            _check_own_regularizer(name, node)


def _check_own_regularizer(name: str, node: dict[str, Any]) -> None:
    """A regularizer of one's own: a :class:`trainer.regularizers.Regularizer` subclass whose
    ``KINDS`` and ``GRADS`` name it (the builder passes ``name``), its keys its constructor's,
    and a finite coef >= 0."""
    from trainer.components import check_component
    from trainer.regularizers import Regularizer

    key = f"regularizer.{name}"
    target = check_component(key, node, provided=("name",))
    if not (isinstance(target, type) and issubclass(target, Regularizer)):
        raise ConfigError(
            f"{key}._target_: {node['_target_']} is not a trainer.regularizers.Regularizer "
            "subclass (subclass it, with KINDS and GRADS naming your function and its "
            "gradient: docs/gradients.md)"
        )
    if name not in target.KINDS or name not in target.GRADS:
        raise ConfigError(
            f"{key}: {node['_target_']}.KINDS and .GRADS must have an entry {name!r} (the "
            "regularizer's config name: its Function and its gradient)"
        )
    coef = node.get("coef", 1e-4)
    _check(
        isinstance(coef, int | float)
        and not isinstance(coef, bool)
        and math.isfinite(coef)
        and coef >= 0,
        f"{key}.coef",
        f"got {coef!r}, must be finite and >= 0",
    )


def check_stepping(group: str, target: Any) -> None:
    """Refuse an optimizer whose ``step`` needs a closure (LBFGS re-evaluates the loss several
    times per step) and a scheduler whose ``step`` needs an argument: the loop calls
    ``optimizer.step()`` and ``scheduler.step()`` (``ReduceLROnPlateau``: with the monitored
    metric, after each validation). Found before training, not at the first step."""
    import inspect

    from torch.optim.lr_scheduler import ReduceLROnPlateau

    if not inspect.isclass(target) or not callable(getattr(target, "step", None)):
        return
    if group == "scheduler" and issubclass(target, ReduceLROnPlateau):
        return
    try:
        step = target.step  # type: ignore[attr-defined]
        parameters = list(inspect.signature(step).parameters.values())[1:]  # (self)
    except (TypeError, ValueError):
        return
    named = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
             inspect.Parameter.KEYWORD_ONLY)  # fmt: skip
    required = [p.name for p in parameters
                if p.default is inspect.Parameter.empty and p.kind in named]  # fmt: skip
    if required:
        why = ("a closure that re-evaluates the loss" if "closure" in required
               else f"{', '.join(required)}")  # fmt: skip
        raise ConfigError(
            f"{group}._target_: {target.__module__}.{target.__qualname__}.step() needs "
            f"{why}, which the trainer's loop does not pass (it calls {group}.step()); choose "
            f"another {group}"
        )


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, nodes in group_schemas().items():
        for name, node in nodes.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


def group_schemas() -> dict[str, dict[str, type]]:
    """Each config group's options and their schemas (dataclasses), as registered."""
    return {
        "data": {
            "digits": DigitsConfig,
            "torchvision": TorchvisionConfig,
            "synthetic": SyntheticConfig,
            "diabetes": DiabetesConfig,
            "tensors": TensorsConfig,
            "chars": CharsConfig,
        },
        "model": {
            "mlp": MLPConfig,
            "cnn": CNNConfig,
            "resnet": ResNetConfig,
            "char_transformer": CharTransformerConfig,
        },
        "optimizer": {"sgd": SGDConfig, "adamw": AdamWConfig},
        "scheduler": {"none": SchedulerConfig, "cosine": CosineConfig, "step": StepLRConfig},
        "loss": {
            "cross_entropy": CrossEntropyConfig,
            "mse": MSEConfig,
            "token_cross_entropy": TokenCrossEntropyConfig,
        },
        "weighting": {
            "uniform": UniformWeightingConfig,
            "class_balanced": ClassBalancedWeightingConfig,
            "per_class": PerClassWeightingConfig,
            "per_sample": PerSampleWeightingConfig,
            "focal": FocalWeightingConfig,
            "hard_topk": HardTopKWeightingConfig,
            "per_token": PerTokenWeightingConfig,
        },
        "trainer": {"trainer": TrainerConfig},
        "regularizer": {
            "regularizer": RegularizerConfig,
            "input_grad_penalty": InputGradPenaltyConfig,
        },
        "instrument": {"instrument": InstrumentConfig},
    }


@functools.cache
def _schema() -> DictConfig:
    """``OmegaConf.structured(TrainConfig)``, built once per process: 8 ms a run (half of
    :func:`validate`), paid by every in-process run of the test suite and by each job of a
    sweep."""
    return OmegaConf.structured(TrainConfig)


def validate(cfg: DictConfig) -> TrainConfig:
    """Check a composed config against the schemas; raise :class:`ConfigError` naming the key.

    Hydra has already rejected unknown keys and wrong types for keys it composed; this also
    catches keys appended with ``+key=value`` and runs every range and cross-field check.
    """
    try:
        merged = OmegaConf.merge(_schema(), cfg)  # (merge copies it: the cached one stays)
        typed = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        cause = e.__cause__ if isinstance(e.__cause__, ConfigError) else None
        if cause is not None:  # a __post_init__ check, wrapped by OmegaConf
            raise cause from None
        raise ConfigError(str(e).split("\n    full_key")[0] + _full_key(e)) from None
    assert isinstance(typed, TrainConfig)
    _reject_unknown_keys(cfg, typed, prefix="")
    _check_user_components(typed)
    return typed


def _reject_unknown_keys(node: Any, typed: Any, prefix: str) -> None:
    """Keys appended with ``+key=value`` get past Hydra's struct check; refuse them here."""
    known = {f.name: getattr(typed, f.name) for f in dataclasses.fields(typed)}
    for key in node:
        own = (
            f" (the preset's schema: for a class of one's own with keys of its own, give "
            f"{prefix.rstrip('.')} a YAML file of its own, or replace the node: "
            f"~{prefix.rstrip('.')} +{prefix}_target_=... +{prefix}{key}=...)"
            if prefix in ("model.", "data.", "loss.") and _swapped_target(typed)
            else ""
        )
        _check(
            key in known,
            f"{prefix}{key}",
            f"unknown key; valid keys here: {', '.join(sorted(known))}{own}",
        )
        if dataclasses.is_dataclass(known[key]):
            _reject_unknown_keys(node[key], known[key], prefix=f"{prefix}{key}.")
        elif isinstance(known[key], dict):  # name -> dataclass (the regularizer list)
            for name, value in known[key].items():
                if dataclasses.is_dataclass(value):
                    _reject_unknown_keys(node[key][name], value, prefix=f"{prefix}{key}.{name}.")


def _swapped_target(typed: Any) -> bool:
    """Whether a preset's node has a ``_target_`` other than the preset's own (a class of
    one's own given the preset's keys; a typo on a built-in class gets no hint about it)."""
    fields = {f.name: f for f in dataclasses.fields(typed)}
    if "_target_" not in fields:
        return False
    return bool(getattr(typed, "_target_", None) != fields["_target_"].default)


def _full_key(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    return f" (key: {key})" if key else ""
