"""A review of the hand-built Trainer's checks (optimizer groups by name, tensors beyond the
model, the scheduler's optimizer): false warnings and false refusals in legitimate setups."""

from __future__ import annotations

import torch
from test_hand_built_trainer import _net, _trainer
from torch import nn

from trainer.callbacks import Callback

BEYOND = "the optimizer updates are not the model's parameters"


class _NewHead(Callback):
    """After step 1: the last layer replaced by a fresh one, handed to the optimizer with
    ``add_param_group`` (README, "Replacing parameters"); the old layer's tensors stay in
    group 0, where they get no gradient and are never updated again."""

    def on_train_step_end(self, trainer, out) -> None:
        if out.step != 1:
            return
        model = trainer.model
        self.old = list(model[4].parameters())
        self.kept = [p.detach().clone() for p in self.old]
        torch.manual_seed(1)
        model[4] = nn.Linear(8, 3)
        trainer.optimizer.add_param_group({"params": list(model[4].parameters())})


def test_a_replaced_layer_left_in_its_group_is_not_warned_as_updated(caplog) -> None:
    """The removed layer's tensors get no gradient after the replacement, and AdamW (even
    with weight decay) leaves them as they are: nothing the optimizer updates is left out of
    the norms, the clipping or the guard. The warning says they are updated and left out,
    and advises making them parameters of the model (they were)."""
    model = _net()
    cb = _NewHead()
    trainer = _trainer(model, torch.optim.AdamW(model.parameters(), weight_decay=0.1),
                       max_steps=3, callbacks=[cb])  # fmt: skip
    with caplog.at_level("WARNING", logger="trainer.loop"):
        trainer.fit()
    assert all(p.grad is None for p in cb.old)
    assert all(torch.equal(p, k) for p, k in zip(cb.old, cb.kept, strict=True)), "updated"
    said = [r.getMessage() for r in caplog.records if BEYOND in r.getMessage()]
    assert said == [], said


class _RunningSum(torch.optim.SGD):
    """An optimizer of one's own (README, `optimizer`: "Another class"): SGD that also keeps,
    per tensor, the running sum of its gradient's squared norm under the state key "sum"
    (a 0-d tensor, as torch keeps "step")."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    st = self.state[p]
                    st["sum"] = st.get("sum", torch.zeros(())) + p.grad.square().sum()
        return super().step(closure)


def test_an_optimizer_of_ones_own_with_a_scalar_state_named_sum_resumes() -> None:
    """Its checkpoint names every group's tensors as this run's (the same model, the same
    groups), yet ``load_state_dict`` refuses it by the shapes' check (run for every
    checkpoint, not only those without names as README says): "sum" is taken for Adagrad's
    element-wise accumulator, and the message blames the groups' order."""
    a = _net()
    ta = _trainer(a, _RunningSum(a.parameters(), lr=0.1), max_steps=2)
    ta.fit()
    state = ta.state_dict()
    b = _net()
    tb = _trainer(b, _RunningSum(b.parameters(), lr=0.1), max_steps=4)
    tb.load_state_dict(state)
    tb.fit()
    assert tb.global_step == 4
