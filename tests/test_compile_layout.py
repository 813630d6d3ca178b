"""channels_last and torch.compile: the same training, and the instruments still right.

Inductor compiles C++ kernels (about 20 s on this CPU), too slow for the suite: the compiled
path is checked with the ``eager`` backend (TorchDynamo traces and runs the captured graph
without code generation), which exercises what instrumentation depends on: the trainer's
forward going through a compiled wrapper while gradients, norms and histograms are read from
the plain module.
"""

from __future__ import annotations

import pytest
import torch
from conftest import final_params, read_scalars, train

from trainer.config import ConfigError
from trainer.loop import Callback

CNN = ("data=synthetic", "model=cnn", "data.shape=[1,12,12]", "data.num_train=256",
       "data.num_val=64", "model.batch_norm=true", "trainer.max_steps=6",
       "logging.every_n_steps=1", "instrument.norms.every_n_steps=1")  # fmt: skip


def test_channels_last_trains_the_same_cnn(tmp_path) -> None:
    train(tmp_path / "a", *CNN)
    train(tmp_path / "b", *CNN, "trainer.channels_last=true")
    a, b = final_params(tmp_path / "a"), final_params(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    sa, sb = read_scalars(tmp_path / "a"), read_scalars(tmp_path / "b")
    for tag in ("train/loss", "grad_norm/total", "val/acc"):
        assert [v for _, v in sb[tag]] == pytest.approx([v for _, v in sa[tag]], rel=1e-4), tag


@pytest.mark.parametrize("extra", [(), ("loss.mode=vector", "weighting=focal")])
def test_a_compiled_forward_trains_and_measures_like_the_plain_one(tmp_path, extra) -> None:
    common = ("trainer.max_steps=8", "logging.every_n_steps=2", "instrument.norms.every_n_steps=1",
              "instrument.histograms.every_n_steps=4", *extra)  # fmt: skip
    train(tmp_path / "plain", *common)
    seen = []

    class Probe(Callback):
        def on_fit_start(self, trainer) -> None:
            seen.append(type(trainer.forward_model).__name__)

    train(tmp_path / "compiled", *common, "trainer.compile=true", "trainer.compile_backend=eager",
          callbacks=[Probe()])  # fmt: skip
    assert seen == ["OptimizedModule"]  # the forward really went through torch.compile
    a, b = final_params(tmp_path / "plain"), final_params(tmp_path / "compiled")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
    sa, sb = read_scalars(tmp_path / "plain"), read_scalars(tmp_path / "compiled")
    assert sa.keys() == sb.keys()
    for tag in sa:
        assert [s for s, _ in sb[tag]] == [s for s, _ in sa[tag]], tag
        assert [v for _, v in sb[tag]] == pytest.approx([v for _, v in sa[tag]], rel=1e-5), tag


def test_compile_with_per_sample_norms_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="instrument.per_sample"):
        train(tmp_path, "trainer.compile=true", "instrument.per_sample.every_n_steps=1")
