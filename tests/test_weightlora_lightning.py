"""WeightLoRA under Lightning: the schedule runs during fit, the optimizer follows, checkpoints
resume across the disconnection point exactly, the dashboard shows ω."""

import lightning as L
import pytest
import torch
from conftest import lightning_trainer, loss_recorder, minilm_classifier

import moelora
from moelora import weightlora
from moelora.dashboard import read_store
from moelora.dashboard.callback import RoutingDashboard
from moelora.lightning import MoELoRAModule, TextDataModule
from moelora.lightning.weightlora import WeightLoRACallback


def make(*, plus=True, **kw):
    cfg = moelora.WeightLoRAConfig(target_modules=["query", "value"], modules_to_save=["classifier"], rank=2, alpha=4,
                                   keep=3, warmup_steps=3, threshold_start=2, plus=plus, seed=0, **kw)
    module = MoELoRAModule(cfg, router_lr=0.05)
    data = TextDataModule(suite_train_per_task=3, suite_val_per_task=1, batch_size=4, seed=0)
    return module, data


def optimizer_params(trainer_):
    return [p for opt in trainer_.optimizers for g in opt.param_groups for p in g["params"]]


def test_fit_disconnects_and_expands_and_the_optimizer_follows(tmp_path):
    L.seed_everything(0)
    module, data = make()
    rec = loss_recorder()
    t = lightning_trainer(tmp_path, 6, [rec])
    t.fit(module, data)
    (cb,) = [c for c in t.callbacks if isinstance(c, WeightLoRACallback)]  # added by the module itself
    assert cb.events == [(3, "expand")]
    layers = weightlora.gated_layers(module.model)
    assert len(layers) == 3 and all(layer.bank.ranks == (8,) for layer in layers)  # 12 heads -> 3, rank 2 * 4
    params = optimizer_params(t)
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for p in trainable} and len(params) == len(trainable)
    groups = {g["name"]: g for g in t.optimizers[0].param_groups}
    assert len(groups["routers"]["params"]) == 3 and groups["routers"]["lr"] == 0.05  # ω: router_lr
    assert all(torch.isfinite(torch.tensor(rec.losses)))
    assert t.logged_metrics["weightlora/heads"] == 3
    # the adapter written at the end of fit holds the 3 expanded heads and loads back
    loaded = moelora.load_adapter(minilm_classifier(), module.adapter_path).eval()
    module.model.eval()
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, module.model(input_ids=ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("resume_at", [2, 4], ids=["before-disconnection", "after-disconnection"])
def test_resume_across_the_disconnection_equals_an_uninterrupted_run(tmp_path, resume_at):
    L.seed_everything(0)
    module, data = make()
    straight = loss_recorder()
    lightning_trainer(tmp_path / "a", 6, [straight]).fit(module, data)
    want = {k: v.clone() for k, v in module.state_dict().items()}

    L.seed_everything(0)
    module, data = make()
    first = loss_recorder()
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2, save_top_k=-1)
    lightning_trainer(tmp_path / "b", resume_at, [first, ckpt]).fit(module, data)
    path = tmp_path / "ck" / f"epoch=0-step={resume_at}.ckpt"
    assert path.is_file()
    saved = torch.load(path, weights_only=True)
    assert saved["weightlora"]["stage"] == ("warmup" if resume_at < 3 else "expanded")

    L.seed_everything(123)  # everything must come from the checkpoint
    module, data = make()
    second = loss_recorder()
    t = lightning_trainer(tmp_path / "c", 6, [second])
    t.fit(module, data, ckpt_path=path)
    assert first.losses + second.losses == straight.losses
    got = module.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert len(optimizer_params(t)) == len([p for p in module.parameters() if p.requires_grad])


def test_checkpoint_written_after_pruning_loads_into_a_fresh_module(tmp_path):
    module, data = make(plus=False)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck")
    lightning_trainer(tmp_path, 4, [ckpt]).fit(module, data)
    fresh, _ = make(plus=False)
    assert len(weightlora.gated_layers(fresh.model)) == 12
    lightning_trainer(tmp_path / "v", 1).validate(fresh, TextDataModule(suite_val_per_task=1, batch_size=4),
                                        ckpt_path=ckpt.best_model_path)
    assert [layer.name for layer in weightlora.gated_layers(fresh.model)] == \
        [layer.name for layer in weightlora.gated_layers(module.model)]
    want, got = module.state_dict(), fresh.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_dashboard_records_omega_and_shows_the_weightlora_panel(tmp_path):
    module, data = make()
    dash = RoutingDashboard(every_n_steps=1, num_samples=0)
    lightning_trainer(tmp_path, 5, [dash]).fit(module, data)
    store = read_store(tmp_path)
    assert store.gates and not store.problems
    last = store.gates[-1]["layers"]
    assert sum(g["status"] == "active" for g in last.values()) == 3
    assert sum(g["status"] == "disconnected" for g in last.values()) == 9
    early = store.gates[0]["layers"]  # step 1: before thresholding, every head has its ω
    assert all(g["omega"][0] != 0 for g in early.values())
    page = dash.report_path.read_text()
    assert "Adapter weights ω (WeightLoRA)" in page and "3 of 12 heads" in page
    # the routing windows keep recording the connected heads after disconnection
    assert set(store.windows[-1].layers) == {n for n, g in last.items() if g["status"] == "active"}
