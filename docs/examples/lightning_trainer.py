"""A Lightning Trainer run, watched by one callback.

THERMOSCOPE_COLLECTOR=127.0.0.1:50051 python docs/examples/lightning_trainer.py
"""

import sys
from typing import Any

import lightning
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from thermoscope.integrations.lightning import ThermoscopeCallback


class Regression(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def data() -> DataLoader:
    x = torch.randn(1024, 8, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)


def main(steps: int = 20, **settings: Any) -> lightning.Trainer:
    """`steps` optimizer steps of 2 batches each; `settings` go to the callback."""
    torch.manual_seed(0)
    module = Regression()
    trainer = lightning.Trainer(
        max_steps=steps,
        accumulate_grad_batches=2,
        accelerator="cpu",
        devices=1,
        callbacks=[ThermoscopeCallback(every=5, **settings)],  # the one Thermoscope line
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data())
    return trainer


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
