import torch

from trainer.loop import Callback


class OutputScale(Callback):
    """Logs byo/output_std, the spread of the model's outputs on the step's batch, every N steps.

    It stages a device tensor: the trainer reads it back with the step's own scalars, in one
    transfer, so this callback adds no host sync.
    """

    def __init__(self, every_n_steps: int = 10):
        self.every = every_n_steps

    def on_train_step_end(self, trainer, out) -> None:
        if out.step % self.every == 0:
            with torch.no_grad():
                trainer.stage_scalars({"byo/output_std": trainer.model(out.batch.x).std()})
