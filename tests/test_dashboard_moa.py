"""The routing store of a MoA run: its statistics and samples are keyed by the MoA blocks and
name the blocks' types (q, v, down, ...), not by the type linears as anonymous one-expert layers.
Also: a run whose routing turns NaN stops with the cause named."""

import lightning as L
import pytest
import torch

import moelora
from moelora.dashboard import RoutingDashboard, read_store
from moelora.dashboard.report import build_report
from moelora.methods.moa import MoAConfig
from moelora.methods.moa_block import MoABlock

from conftest import lightning_trainer, tiny_llama


class _LM(L.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(**batch, labels=batch["input_ids"]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def test_moa_store_is_keyed_by_blocks_with_type_names(tmp_path):
    model = moelora.inject(tiny_llama(), MoAConfig(variant="sparse"))
    blocks = [m for m in model.modules() if isinstance(m, MoABlock)]
    assert blocks
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 97, (2, 6), generator=g),
                "attention_mask": torch.ones(2, 6, dtype=torch.long)} for _ in range(3)]
    trainer = lightning_trainer(tmp_path, 3, [RoutingDashboard(every_n_steps=1, num_samples=2)])
    trainer.fit(_LM(model), train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))

    contents = read_store(tmp_path)
    assert contents.problems == []
    layers = {entry["name"]: entry for entry in contents.meta["layers"]}
    assert set(layers) == {b.name for b in blocks}  # the type linears record nothing themselves
    for b in blocks:
        assert layers[b.name]["experts"] == list(b.type_names)
        assert layers[b.name]["num_experts"] == len(b.type_names)
    recorded = set().union(*(w.layers for w in contents.windows))
    assert recorded == set(layers)
    routed = set(contents.samples[-1]["texts"][0]["routing"])
    assert routed == set(layers)
    html = build_report(tmp_path).read_text()
    for name in blocks[0].type_names:
        assert f'"{name}"' in html  # the report's expert axis names the types


def test_non_finite_routing_stops_the_run_naming_the_cause(tmp_path):
    # A NaN adapter (e.g. fp16 Adam with eps rounded to 0) used to end in the store's refusal
    # "prob_sum is not 4 finite numbers", which names neither the weights nor the fix.
    model = moelora.inject(tiny_llama(), moelora.MoELoRAConfig(target_modules=["q_proj"], num_experts=4, seed=0))
    with torch.no_grad():
        moelora.wrapped_layers(model)[0].router.weight.fill_(float("nan"))
    batches = [{"input_ids": torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0)),
                "attention_mask": torch.ones(2, 6, dtype=torch.long)}]
    trainer = lightning_trainer(tmp_path, 1, [RoutingDashboard(every_n_steps=1, num_samples=0)])
    with pytest.raises(FloatingPointError, match=r"NaN/inf in the train window.*16-true"):
        trainer.fit(_LM(model), train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
