"""MoELoRAModule with Lightning: adapter-only checkpoints, exact resume, causal LM, DDP."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch

import moelora
from conftest import lightning_trainer, loss_recorder, minilm_path, tiny_llama
from moelora.lightning import MoELoRAModule, TextDataModule


def make(tmp_path, *, method=None, **module_kwargs):
    method = method or moelora.MoELoRAConfig(target_modules=["query", "value"], modules_to_save=["classifier"],
                                             num_experts=3, top_k=2, rank=2, seed=0)
    module = MoELoRAModule(method, **module_kwargs)
    data = TextDataModule(suite_train_per_task=3, suite_val_per_task=1, batch_size=4, seed=0)
    return module, data


def test_resume_mid_epoch_equals_uninterrupted_run(tmp_path):
    # 18 examples / batch 4 -> 5 batches per epoch; stop at step 3 (mid-epoch), run to step 8
    # (across an epoch boundary). The backbone's dropout stays on: the RNG state is restored too.
    L.seed_everything(0)
    module, data = make(tmp_path)
    straight = loss_recorder()
    lightning_trainer(tmp_path / "a", 8, [straight]).fit(module, data)
    want = {k: v.clone() for k, v in module.state_dict().items()}

    L.seed_everything(0)
    module, data = make(tmp_path)
    first = loss_recorder()
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1)
    lightning_trainer(tmp_path / "b", 3, [first, ckpt_cb]).fit(module, data)
    ckpt = tmp_path / "ck" / "epoch=0-step=3.ckpt"
    assert ckpt.is_file()

    L.seed_everything(123)  # a different seed: everything must come from the checkpoint
    module, data = make(tmp_path)
    second = loss_recorder()
    lightning_trainer(tmp_path / "c", 8, [second]).fit(module, data, ckpt_path=ckpt)
    assert first.losses + second.losses == straight.losses
    got = module.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_checkpoint_holds_adapter_only_and_loads_weights_only(tmp_path):
    module, data = make(tmp_path)
    cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck")
    lightning_trainer(tmp_path, 2, [cb]).fit(module, data)
    ckpt = torch.load(cb.best_model_path, weights_only=True)  # primitives only in hparams
    keys = set(ckpt["state_dict"])
    assert keys == set(module.adapter_keys())
    assert not any("base_layer" in k or "original_module" in k or "embeddings" in k for k in keys)
    n_saved = sum(t.numel() for t in ckpt["state_dict"].values())
    assert n_saved < 0.05 * sum(p.numel() for p in module.parameters())
    assert ckpt["optimizer_states"] and ckpt["hyper_parameters"]["method"]["method"] == "moelora"
    # on_train_end wrote a save_adapter directory that loads into a fresh backbone
    assert (Path(module.adapter_path) / "moelora_config.json").is_file()


def test_bad_checkpoint_keys_are_named(tmp_path):
    module, data = make(tmp_path)
    cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck")
    lightning_trainer(tmp_path, 1, [cb]).fit(module, data)
    other, _ = make(tmp_path, method=moelora.MoELoRAConfig(target_modules=["query"], modules_to_save=["classifier"],
                                                           num_experts=3, top_k=2, rank=2))
    with pytest.raises(ValueError, match="checkpoint does not fit.*unexpected.*value"):
        lightning_trainer(tmp_path / "x", 2).fit(other, TextDataModule(suite_train_per_task=3, batch_size=4),
                                      ckpt_path=cb.best_model_path)


def test_gradient_checkpointing_keeps_aux_loss_in_graph(tmp_path):
    module, data = make(tmp_path, gradient_checkpointing=True)
    data.setup()
    batch = data.collate([data.train_set[i] for i in range(4)])
    loss = module.training_step(batch, 0)
    loss.backward()
    routers = [layer.router.weight.grad for layer in moelora.wrapped_layers(module.model)]
    assert all(g is not None and g.abs().sum() > 0 for g in routers)
    assert all(s.forwards == 1 for s in moelora.routing_stats(module.model).layers.values())


def test_param_groups_and_router_lr(tmp_path):
    module, _ = make(tmp_path, router_lr=0.1)
    opt = module.configure_optimizers()
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["routers"]["lr"] == 0.1 and groups["routers"]["weight_decay"] == 0.0
    n_trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n_trainable


def test_causal_lm_on_tiny_llama(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tiny_llama(vocab=tokenizer.vocab_size).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    module = MoELoRAModule(moelora.MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=2, top_k=1),
                           backbone=str(tmp_path / "llama"), task="causal-lm")
    data = TextDataModule(tokenizer=str(tmp_path / "llama"), task="causal-lm", suite_train_per_task=2, batch_size=4)
    rec = loss_recorder()
    lightning_trainer(tmp_path, 3, [rec]).fit(module, data)
    assert len(rec.losses) == 3 and all(l == l for l in rec.losses)  # finite (NaN != NaN)


def test_local_files_with_custom_columns(tmp_path):
    rows = [{"sentence": f"example {i}", "y": i % 2} for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    import pandas as pd

    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.csv", "d.parquet"):
        data = TextDataModule(dataset=str(tmp_path / name), text_column="sentence", label_column="y",
                              task_column=None, batch_size=5)
        data.setup()
        batch = next(iter(data.train_dataloader()))
        assert batch["labels"].shape == (5,) and "task_ids" not in batch
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['text', 'label'\]"):
        TextDataModule(dataset=str(tmp_path / "d.csv")).setup()
    with pytest.raises(FileNotFoundError, match="nope.json"):
        TextDataModule(dataset=str(tmp_path / "nope.json")).setup()


DDP_SCRIPT = textwrap.dedent('''
    import json, sys, lightning as L, torch, moelora
    from torch.utils.data import DataLoader
    from moelora.lightning import MoELoRAModule, RoutingLogger, TextDataModule

    world, out = int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "."

    class Data(TextDataModule):
        # Global batch g holds examples 4g..4g+3; with 2 ranks each takes its contiguous half.
        def train_dataloader(self):
            rank = self.trainer.global_rank
            per = 4 // world
            order = [4 * g + rank * per + i for g in range(3) for i in range(per)]
            return DataLoader(self.train_set.select(order), batch_size=per, collate_fn=self.collate)

    if __name__ == "__main__":  # ddp_spawn children import this file again
        L.seed_everything(0)
        # No aux loss: the per-rank Switch loss is computed on local tokens, so only without it is
        # DDP's averaged gradient the gradient of the global batch. A wide router init keeps routing
        # margins far above float round-off.
        method = moelora.MoELoRAConfig(target_modules=["query", "value"], num_experts=4, top_k=2, rank=2, seed=0,
                                       aux_loss_coef=0.0, router_init_std=1.0)
        module = MoELoRAModule(method, backbone_dropout=False)
        cb = RoutingLogger(every_n_steps=1)
        trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=world,
                            strategy="ddp_spawn" if world > 1 else "auto", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                            num_sanity_val_steps=0, use_distributed_sampler=False, default_root_dir=out,
                            callbacks=[cb])
        trainer.fit(module, Data(suite_train_per_task=2, batch_size=4))
''')


def test_ddp_two_processes_match_single_process_counts(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    stats = {}
    for world in (1, 2):
        out = tmp_path / f"w{world}"
        subprocess.run([sys.executable, str(script), str(world), str(out)], check=True, capture_output=True,
                       text=True, timeout=280)
        stats[world] = json.loads(next(out.rglob("routing_stats.json")).read_text())
    assert stats[1].keys() == stats[2].keys()
    for name in stats[1]:
        assert stats[2][name]["tokens"] == stats[1][name]["tokens"] > 0
        assert stats[2][name]["counts"] == stats[1][name]["counts"], name


def test_distributed_teardown_frees_cyclic_garbage_before_exit():
    # The mechanism behind the test above staying green: garbage cycles that hold the gloo process
    # group must be gone before interpreter exit (else about 1 rank in 6 aborted there).
    import gc
    import types
    import weakref

    class Node:
        pass

    module = MoELoRAModule(moelora.MoELoRAConfig(target_modules=["query"], num_experts=2, top_k=1, rank=2))
    was_enabled = gc.isenabled()
    gc.disable()  # only the teardown may collect
    try:
        for world, freed in ((1, False), (2, True)):
            cycle = Node()
            cycle.self = cycle
            ref = weakref.ref(cycle)
            del cycle
            module._trainer = types.SimpleNamespace(world_size=world)
            module.teardown("fit")
            assert (ref() is None) == freed, world
    finally:
        module._trainer = None
        if was_enabled:
            gc.enable()


def test_a_fresh_classification_head_is_trained_not_left_frozen(recwarn):
    # The README's CLI example once trained against a frozen random classifier without a word.
    module = MoELoRAModule(moelora.MoELoRAConfig(target_modules=["query"], num_experts=2, top_k=1, rank=2))
    assert module.method.modules_to_save == ["classifier"]
    assert module.hparams["method"]["modules_to_save"] == ["classifier"], "saved with the checkpoint"
    assert all(p.requires_grad for p in module.model.classifier.trained_module.parameters())
    assert any("added ['classifier']" in str(w.message) for w in recwarn)
    recwarn.clear()
    listed = MoELoRAModule(moelora.MoELoRAConfig(target_modules=["query"], modules_to_save=["classifier"],
                                                 num_experts=2, top_k=1, rank=2))
    assert listed.method.modules_to_save == ["classifier"]
    assert not any("modules_to_save" in str(w.message) for w in recwarn)


def test_prediction_rows_line_up_token_by_token(tmp_path):
    import types

    from moelora.lightning import RoutingPredictionWriter

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    batch = {"input_ids": torch.arange(8).view(2, 4), "attention_mask": mask,
             "predictions": torch.arange(10, 18).view(2, 4),            # causal LM: one per position
             "routing": {"l": torch.arange(16).view(2, 4, 2)}}
    trainer = types.SimpleNamespace(log_dir=str(tmp_path), is_global_zero=True, datamodule=None)
    writer = RoutingPredictionWriter(output=str(tmp_path / "p.jsonl"))
    writer.write_on_epoch_end(trainer, None, [batch], None)
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == [[10, 11, 12], [14, 15]]
    assert all(len(r["prediction"]) == len(r["input_ids"]) == len(r["routing"]["l"]) for r in rows)


def test_test_split_is_held_out_not_the_validation_set(tmp_path):
    data = TextDataModule(suite_train_per_task=2, suite_val_per_task=3, batch_size=4, seed=0)
    data.setup("test")
    assert data.test_set is not None and data.test_set["text"] != data.val_set["text"]
    assert data.test_dataloader().dataset is data.test_set
    rows = [{"text": f"example {i}", "label": i % 2} for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:5]))
    plain = TextDataModule(dataset=str(tmp_path / "d.jsonl"), batch_size=4)
    plain.setup("test")
    with pytest.warns(UserWarning, match="`test` runs on the validation set"):
        assert plain.test_dataloader().dataset is plain.val_set
    given = TextDataModule(dataset=str(tmp_path / "d.jsonl"), test=str(tmp_path / "t.jsonl"), batch_size=4)
    given.setup("test")
    assert len(given.test_dataloader().dataset) == 5


def test_load_from_checkpoint_restores_the_adapter_without_listing_the_backbone(tmp_path, recwarn):
    L.seed_everything(0)
    module, data = make(tmp_path)
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    lightning_trainer(tmp_path / "a", 2, [ckpt_cb]).fit(module, data)
    recwarn.clear()
    loaded = MoELoRAModule.load_from_checkpoint(tmp_path / "ck" / "last.ckpt")
    assert not [w for w in recwarn if "not in the checkpoint" in str(w.message)], "frozen backbone keys listed"
    want = module.state_dict()
    assert want.keys() == loaded.state_dict().keys() and all(torch.equal(want[k], loaded.state_dict()[k]) for k in want)
    bad = dict(want)
    bad.pop(next(iter(bad)))
    with pytest.raises(RuntimeError, match="missing"):
        loaded.load_state_dict(bad)


@pytest.mark.parametrize("rows,kw,match", [
    ([{"text": "a", "label": 0.5}], {}, r"row 0 of column 'label' is 0.5; labels must be whole numbers"),  # was floored to 0
    ([{"text": "a", "label": "pos"}], {}, "map class names"),
    ([{"text": "a", "label": 1}, {"text": "b", "label": None}], {}, "row 1 of column 'label' is None"),
    ([{"text": "a", "label": 2}], {"num_labels": 2}, r"outside \[0, 2\) for model.num_labels=2"),
    ([{"text": None, "label": 0}], {}, "row 0 of column 'text' is None, not a string"),
    ([{"text": "a", "label": 0, "task_id": "x"}], {}, "task ids must be whole numbers"),
])
def test_bad_rows_fail_in_setup_naming_column_and_row(tmp_path, rows, kw, match):
    good = [{"text": f"t{i}", "label": i % 2} | ({"task_id": 0} if "task_id" in rows[0] else {}) for i in range(19)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows + good))
    data = TextDataModule(dataset=str(tmp_path / "d.jsonl"), batch_size=4, **kw)
    with pytest.raises(ValueError, match=match):
        data.setup("fit")


def test_setup_checks_split_size_length_and_extension_case(tmp_path):
    (tmp_path / "one.JSONL").write_text(json.dumps({"text": "a", "label": 0}))
    with pytest.raises(ValueError, match=r"data.val_fraction=0.1 cannot split data.dataset's 1 rows"):
        TextDataModule(dataset=str(tmp_path / "one.JSONL")).setup("fit")
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(20)]
    (tmp_path / "d.JSONL").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match="data.max_length=1024 exceeds the tokenizer's model_max_length=512"):
        TextDataModule(dataset=str(tmp_path / "d.JSONL"), max_length=1024).setup("fit")
    ok = TextDataModule(dataset=str(tmp_path / "d.JSONL"), num_labels=2)
    ok.setup("fit")
    assert len(ok.train_set) + len(ok.val_set) == 20


def test_predict_leaves_out_layers_that_do_not_see_every_token(tmp_path):
    # BERT's pooler sees one row per sequence: its routing cannot be [B, S, k] (predict crashed).
    method = moelora.MoELoRAConfig(target_modules=["query", "pooler.dense"], modules_to_save=["classifier"],
                                   num_experts=3, top_k=2, rank=2, seed=0)
    module, data = make(tmp_path, method=method)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    module.eval()
    with torch.no_grad():
        out = module.predict_step(batch, 0)
    assert out["routing"] and all(r.shape[:2] == batch["input_ids"].shape for r in out["routing"].values())
    assert not any("pooler" in name for name in out["routing"])


def test_empty_task_id_cells_mean_no_task(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 2, "task_id": None if i % 3 == 0 else i % 2} for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = TextDataModule(dataset=str(tmp_path / "d.jsonl"), batch_size=20, val_fraction=0.1, seed=0)
    data.setup("fit")
    batch = data.collate(list(data.train_set))
    assert set(batch["task_ids"].tolist()) == {-1, 0, 1}


def test_num_labels_below_two_is_refused_for_classification():
    with pytest.raises(ValueError, match="model.num_labels=1 is invalid"):
        MoELoRAModule(moelora.MoELoRAConfig(target_modules=["query"]), num_labels=1)


def test_held_out_splits_come_from_the_hub_dataset_and_empty_files_are_named(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load(name, split=None, **kw):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"text": f"{split} {i}", "label": i % 2} for i in range(10)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    data = TextDataModule(dataset="some/hub-set", validation="test", test="test", batch_size=4)
    data.setup("fit")
    assert calls == [("some/hub-set", "train"), ("some/hub-set", "test"), ("some/hub-set", "test")]
    monkeypatch.undo()
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match="data.validation='test' is not a data file"):
        TextDataModule(dataset=str(tmp_path / "d.jsonl"), validation="test").setup("fit")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "header.csv").write_text("text,label\n")
    for name in ("empty.jsonl", "header.csv"):
        with pytest.raises(ValueError, match=f"data file {tmp_path / name}"):
            TextDataModule(dataset=str(tmp_path / name)).setup("fit")


def test_mid_epoch_resume_does_not_warn_that_the_loader_is_not_resumable(tmp_path, recwarn):
    module, data = make(tmp_path)
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1)
    lightning_trainer(tmp_path / "b", 3, [ckpt_cb]).fit(module, data)
    module, data = make(tmp_path)
    recwarn.clear()
    lightning_trainer(tmp_path / "c", 5).fit(module, data, ckpt_path=tmp_path / "ck" / "epoch=0-step=3.ckpt")
    assert not [w for w in recwarn if "not resumable" in str(w.message)]


def test_routing_logger_windows_leave_out_validation_and_sanity_forwards(tmp_path):
    # The live scalars once counted the sanity check and mid-fit validation in the next training
    # window (SiRA's logged drop rate 0.036 where the report's train window said 0.049). Oracle:
    # the training batches' own routing, snapshot before and after each one.
    from moelora.lightning import RoutingLogger

    class TrainOnly(L.Callback):
        def __init__(self):
            self.window, self.windows = {}, []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = moelora.routing_stats(pl_module.model, sync=True).layers  # copies

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            for name, now in moelora.routing_stats(pl_module.model, sync=True).layers.items():
                ran = now.since(self.before[name])
                self.window[name] = self.window[name].plus(ran) if name in self.window else ran
            if trainer.global_step % 2 == 0:
                self.windows.append(self.window)
                self.window = {}

    module, data = make(tmp_path)
    logged = []
    module.log_dict = lambda values, **kw: logged.append(dict(values))
    oracle = TrainOnly()  # before the logger: its window closes first at a logging step
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=1, val_check_interval=2, limit_val_batches=2,
                        callbacks=[oracle, RoutingLogger(every_n_steps=2)])
    trainer.fit(module, data)
    assert len(logged) == len(oracle.windows) == 2
    for values, window in zip(logged, oracle.windows):
        summaries = [w.summary() for w in window.values()]
        for metric in ("entropy", "max_share", "dead_fraction"):
            want = sum(s[metric] for s in summaries) / len(summaries)
            assert values[f"routing/mean_{metric}"] == pytest.approx(want, rel=1e-9, abs=1e-12), metric


def test_resume_with_another_batch_size_counts_the_examples_it_ran(tmp_path):
    # Data settings may change on resume. 3 batches of 4 (12 examples), then 2 of 2: 16 examples of
    # the epoch are done; counting 5 batches at the new size (10) would make a second resume
    # train examples 10-15 again.
    module, data = make(tmp_path)
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1)
    lightning_trainer(tmp_path / "b", 3, [ckpt_cb]).fit(module, data)
    module, _ = make(tmp_path)
    data = TextDataModule(suite_train_per_task=3, suite_val_per_task=1, batch_size=2, seed=0)
    again = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck2", every_n_train_steps=5, save_top_k=-1)
    lightning_trainer(tmp_path / "c", 5, [again]).fit(module, data, ckpt_path=tmp_path / "ck" / "epoch=0-step=3.ckpt")
    state = torch.load(tmp_path / "ck2" / "epoch=0-step=5.ckpt", weights_only=True)["TextDataModule"]
    assert state == {"epoch": 0, "examples_done": 16}


@pytest.mark.parametrize("wrapper", [False, True], ids=["torch", "lightning-cli"])
def test_a_plateau_scheduler_steps_on_a_validation_metric(tmp_path, wrapper):
    from functools import partial

    from lightning.pytorch.cli import ReduceLROnPlateau as CliPlateau

    factory = partial(CliPlateau, monitor="val/acc", mode="max") if wrapper else torch.optim.lr_scheduler.ReduceLROnPlateau
    module, data = make(tmp_path, scheduler=factory)
    config = module.configure_optimizers()["lr_scheduler"]
    assert config["interval"] == "epoch" and config["monitor"] == ("val/acc" if wrapper else "val/loss")
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)  # Lightning refused a plateau scheduler without a monitor
    assert trainer.current_epoch == 2
