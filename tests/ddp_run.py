"""Run by tests/test_ddp_runs.py in a fresh process: a 2-process CPU DDP fit (gloo; the ``ddp``
launcher re-runs this file for rank 1) of ``weightlora`` (WeightLoRA+ through its disconnection
and expansion) or ``moa_sparse`` (Sparse MoA where no type runs for any token: a constant
threshold above every sigmoid weight). Each rank saves what it ended with to ``<out>/rank<N>.pt``."""

import sys
from pathlib import Path

import lightning as L
import torch

import moelora
from moelora import weightlora
from moelora.lightning import MoELoRAModule, TextDataModule


class Record(L.Callback):
    def __init__(self, method: str, out: Path):
        self.method, self.out = method, out

    def on_train_end(self, trainer, pl_module):
        layers = weightlora.gated_layers(pl_module.model) if self.method == "weightlora" else []
        wrapped = trainer.strategy.model
        torch.save({"heads": [layer.name for layer in layers], "ranks": [tuple(layer.bank.ranks) for layer in layers],
                    "state": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                    "ddp_params": {id(p) for p in wrapped.parameters() if p.requires_grad}
                    == {id(p) for p in pl_module.parameters() if p.requires_grad},
                    "events": [c.events for c in trainer.callbacks if hasattr(c, "events")],
                    "steps": trainer.global_step},
                   self.out / f"rank{trainer.global_rank}.pt")


def config_for(method: str):
    if method == "weightlora":
        return moelora.WeightLoRAConfig(target_modules=["query", "value"], modules_to_save=["classifier"], rank=2,
                                        alpha=4, keep=3, warmup_steps=3, threshold_start=2, plus=True, seed=0)
    return moelora.MoAConfig(variant="sparse", lora_types=["q", "v"], rank=2, const_threshold=True,
                             max_threshold=1.0, modules_to_save=["classifier"])


def main(method: str, out: Path) -> None:
    L.seed_everything(0)
    module = MoELoRAModule(config_for(method), router_lr=0.05)
    data = TextDataModule(suite_train_per_task=3, suite_val_per_task=1, batch_size=4, seed=0)
    trainer = L.Trainer(max_steps=6 if method == "weightlora" else 3, accelerator="cpu", devices=2, strategy="ddp",
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=str(out), num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[Record(method, out)])
    trainer.fit(module, data)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], Path(sys.argv[2]))
