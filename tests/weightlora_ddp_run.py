"""Run by tests/test_weightlora_ddp.py in a fresh process: a 2-process CPU DDP fit (gloo, the
``ddp`` launcher re-runs this file for rank 1) of WeightLoRA+ through its disconnection and
expansion; each rank saves what it ended with to ``<out>/rank<N>.pt``."""

import sys
from pathlib import Path

import lightning as L
import torch

import moelora
from moelora import weightlora
from moelora.lightning import MoELoRAModule, TextDataModule


class Record(L.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        layers = weightlora.gated_layers(pl_module.model)
        wrapped = trainer.strategy.model
        torch.save({"heads": [layer.name for layer in layers], "ranks": [tuple(layer.bank.ranks) for layer in layers],
                    "state": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                    "ddp_params": {id(p) for p in wrapped.parameters() if p.requires_grad}
                    == {id(p) for p in pl_module.parameters() if p.requires_grad},
                    "events": [c.events for c in trainer.callbacks if hasattr(c, "events")]},
                   self.out / f"rank{trainer.global_rank}.pt")


def main(out: Path) -> None:
    L.seed_everything(0)
    config = moelora.WeightLoRAConfig(target_modules=["query", "value"], modules_to_save=["classifier"], rank=2,
                                      alpha=4, keep=3, warmup_steps=3, threshold_start=2, plus=True, seed=0)
    module = MoELoRAModule(config, router_lr=0.05)
    data = TextDataModule(suite_train_per_task=3, suite_val_per_task=1, batch_size=4, seed=0)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=str(out), num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[Record(out)])
    trainer.fit(module, data)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
