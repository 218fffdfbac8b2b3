"""FlyLoRA in real training set-ups: a Hugging Face decoder with padding under gradient
checkpointing, and a Lightning run resumed from a checkpoint (the bias buffer comes back)."""

import lightning as L
import torch

import moelora
from conftest import tiny_llama
from moelora.lightning import MoELoRAModule, TextDataModule

# Gradient checkpointing imports triton; do it at collection, while TRITON_INTERPRET=1 (see the
# note in test_flylora.py), or later interpreter tests in this process break.
try:
    import triton  # noqa: F401
except ImportError:
    pass


def test_hf_gradient_checkpointing_with_padding_matches_plain_training():
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    results = []
    for use_checkpointing in (False, True):
        model = tiny_llama(0)
        cfg = moelora.FlyLoRAConfig(target_modules=["q_proj", "v_proj", "down_proj"], rank=8, top_k=2, alpha=16,
                                    bias_update_rate=0.5, backend="torch")
        moelora.inject(model, cfg)
        with torch.no_grad():
            for layer in moelora.wrapped_layers(model):
                layer.bank.Bt.normal_(generator=torch.Generator().manual_seed(1))
        model.train()
        if use_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for _ in range(2):
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        layers = moelora.wrapped_layers(model)
        stats = moelora.routing_stats(model).layers
        results.append(([layer.router.bias.clone() for layer in layers],
                        [layer.bank.Bt.grad.clone() for layer in layers],
                        {name: (s.counts.clone(), s.tokens, s.forwards) for name, s in stats.items()}))
    (bias0, grads0, stats0), (bias1, grads1, stats1) = results
    assert any(b.abs().sum() > 0 for b in bias0)
    assert all(torch.equal(a, b) for a, b in zip(bias0, bias1))
    for a, b in zip(grads0, grads1):
        torch.testing.assert_close(a, b)
    assert stats0.keys() == stats1.keys()
    for name in stats0:
        assert torch.equal(stats0[name][0], stats1[name][0]) and stats0[name][1:] == stats1[name][1:] == (15 * 2, 2)


def _make():
    method = moelora.FlyLoRAConfig(target_modules=["query", "value"], modules_to_save=["classifier"], rank=8,
                                   top_k=2, alpha=16, bias_update_rate=0.01)
    return MoELoRAModule(method, backbone_dropout=False), \
        TextDataModule(suite_train_per_task=2, suite_val_per_task=1, batch_size=4, seed=0)


def _trainer(root, max_steps, callbacks=()):
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root, num_sanity_val_steps=0,
                     limit_val_batches=0, callbacks=list(callbacks))


def test_lightning_resume_restores_the_bias_and_continues_identically(tmp_path):
    L.seed_everything(0)
    module, data = _make()
    _trainer(tmp_path / "a", 4).fit(module, data)
    want = {k: v.clone() for k, v in module.state_dict().items()}
    assert any(k.endswith(".router.bias") for k in want) and any(k.endswith(".bank.A") for k in want)
    assert not any(k.endswith(".router.bias") and torch.count_nonzero(v) == 0 for k, v in want.items())
    groups = module.configure_optimizers().param_groups
    assert [g["name"] for g in groups] == ["experts"]  # no router parameters; A and the bias never train
    assert not any(p is layer.bank.A for g in groups for p in g["params"]
                   for layer in moelora.wrapped_layers(module.model))

    L.seed_everything(0)
    module, data = _make()
    ck = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2, save_top_k=-1)
    _trainer(tmp_path / "b", 2, [ck]).fit(module, data)
    L.seed_everything(123)
    module, data = _make()
    _trainer(tmp_path / "c", 4).fit(module, data, ckpt_path=tmp_path / "ck" / "epoch=0-step=2.ckpt")
    got = module.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
