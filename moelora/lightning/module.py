"""MoELoRAModule: a frozen Hugging Face backbone with a moelora adapter, trained by Lightning.

Checkpoints hold the adapter (experts, routers, their buffers, ``modules_to_save`` copies),
optimizer and loop state, and the RNG state, never the frozen backbone; loading validates the
adapter keys itself because Lightning's strict loading is off. ``hparams`` hold only primitives
(the method config as a dict), so ``torch.load(weights_only=True)`` reads every checkpoint.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

import moelora
from moelora.config import MoELoRAConfig, config_from_dict
from moelora.inject import adapter_state_dict
from moelora.methods.meteora import MeteoRAConfig
from moelora.paths import check_model_location
from moelora.state import get_state

from .data import TASK_KINDS, load_tokenizer, resolve_path


def train_fresh_heads(method: MoELoRAConfig, model: torch.nn.Module, fresh_keys: set[str]) -> MoELoRAConfig:
    """``method`` with every freshly initialised top-level head of ``model`` (a module all of
    whose parameters are in ``fresh_keys``, the checkpoint's missing keys, e.g. BERT's
    ``classifier`` or Llama's ``score``) added to ``modules_to_save``, with a warning.

    A frozen random head cannot learn the task, so this is never wanted; PEFT adds the head for
    ``task_type="SEQ_CLS"`` too. A head the checkpoint did load is left as configured."""
    from lightning.pytorch.utilities import rank_zero_warn

    from moelora.targeting import name_matches

    listed = list(method.modules_to_save or [])
    fresh = []
    for name, module in model.named_children():
        params = [f"{name}.{p}" for p, _ in module.named_parameters()]
        if params and all(p in fresh_keys for p in params) and not (listed and name_matches(name, listed)):
            fresh.append(name)
    if not fresh:
        return method
    rank_zero_warn(f"model.method.modules_to_save: added {fresh}: the backbone checkpoint has no weights for this head, "
                   "so it starts random and must be trained (as PEFT does for SEQ_CLS). List it in modules_to_save "
                   "yourself to silence this warning.")
    return dataclasses.replace(method, modules_to_save=listed + fresh)


def default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)


class MoELoRAModule(L.LightningModule):
    """Train a moelora adapter on a frozen backbone.

    Args:
        method: the method config (any registered config; in YAML chosen by ``class_path``).
        backbone: HF model name or local path; ``"minilm"`` = the bundled all-MiniLM-L6-v2.
        task: ``"sequence-classification"`` or ``"causal-lm"``.
        num_labels: classes for sequence classification.
        optimizer: builds the optimizer from parameter groups (routers, experts).
        scheduler: optional LR scheduler, stepped every optimizer step; a ``ReduceLROnPlateau``
            steps once per epoch on its ``monitor`` (Lightning's CLI wrapper) or ``val/loss``.
        router_lr: learning rate of the router group (default: the optimizer's).
        gradient_checkpointing: non-reentrant activation checkpointing of the backbone.
        backbone_dropout: keep the backbone's own dropout layers active in training (as PEFT
            does); ``False`` zeroes them, making training deterministic given the data order.
        adapter_dir: where ``on_train_end`` writes ``save_adapter`` (default: ``<log_dir>/adapter``).
        adapter_layout: leave unset. The module records it in its checkpoints for MeteoRA (each
            fused module's expert ranks, beside the fused config), so that a checkpoint rebuilds
            the adapter without re-reading the PEFT LoRA directories: its weights are all in the
            checkpoint, and the directories may have moved or be relative to another directory.
    """

    def __init__(self, method: MoELoRAConfig | dict, *, backbone: str = "minilm",
                 task: str = "sequence-classification", num_labels: int = 2,
                 optimizer: OptimizerCallable = default_optimizer, scheduler: LRSchedulerCallable | None = None,
                 router_lr: float | None = None, gradient_checkpointing: bool = False,
                 backbone_dropout: bool = True, adapter_dir: str | None = None,
                 adapter_layout: dict[str, list[int]] | None = None) -> None:
        super().__init__()
        if task not in TASK_KINDS:
            raise ValueError(f"model.task={task!r} is invalid: expected one of {TASK_KINDS}")
        if task == "sequence-classification" and (isinstance(num_labels, bool) or not isinstance(num_labels, int)
                                                  or num_labels < 2):
            # transformers turns num_labels=1 into a regression head (MSE loss); accuracy is an argmax.
            raise ValueError(f"model.num_labels={num_labels!r} is invalid: sequence classification needs an "
                             "integer >= 2 (num_labels=1 would make transformers build a regression head).")
        self.method = config_from_dict(method) if isinstance(method, dict) else method
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.save_hyperparameters(ignore=["method", "optimizer", "scheduler"])
        self.model, fresh = self._build_backbone()
        self.method = train_fresh_heads(self.method, self.model, fresh)
        self.hparams["method"] = self.method.to_dict()  # primitives only: weights_only loading works
        if not backbone_dropout:
            for m in self.model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
        if adapter_layout is not None:  # a checkpoint's own adapter: the weights come with it
            moelora.inject(self.model, self.method, expert_ranks=adapter_layout)
        else:
            moelora.inject(self.model, self.method)
        if isinstance(self.method, MeteoRAConfig):
            fused = get_state(self.model).config  # exact targets, resolved directories, provenance
            self.hparams["method"] = fused.to_dict()
            self.hparams["adapter_layout"] = {layer.name: list(layer.bank.ranks)
                                              for layer in moelora.wrapped_layers(self.model)}
        self.model.train()  # from_pretrained returns eval mode; train as PEFT does (backbone dropout on)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.strict_loading = False
        self.adapter_path: Path | None = None

    def _build_backbone(self):
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        path = str(resolve_path(self.hparams.backbone))
        check_model_location(path, "model.backbone", also=", or 'minilm' (the bundled all-MiniLM-L6-v2)")
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # a fresh classification head's notice is expected
        try:
            auto = AutoModelForCausalLM if self.hparams.task == "causal-lm" else AutoModelForSequenceClassification
            kwargs = {} if self.hparams.task == "causal-lm" else {"num_labels": self.hparams.num_labels}
            model, info = auto.from_pretrained(path, output_loading_info=True, **kwargs)
            if self.hparams.task == "sequence-classification" and model.config.pad_token_id is None:
                # A decoder classifier finds each row's last token by the pad id; the data module
                # pads with eos (or unk) where the tokenizer has no pad token: tell the model.
                model.config.pad_token_id = load_tokenizer(self.hparams.backbone).pad_token_id
            return model, set(info.get("missing_keys") or ())
        finally:
            hf_logging.set_verbosity(verbosity)

    @property
    def max_positions(self) -> int | None:
        """Tokens the backbone can take: the size of a learned absolute position table (BERT's
        ``position_embeddings``, GPT-2's ``wpe``; RoBERTa's offset by its padding index), or
        ``None`` for rotary / relative positions. The data module checks ``max_length`` with it."""
        for name, module in self.model.named_modules():
            if isinstance(module, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in ("position_embeddings", "wpe"):
                offset = module.padding_idx + 1 if module.padding_idx is not None else 0
                return module.num_embeddings - offset
        return None

    # ------------------------------------------------------------------ steps
    def forward(self, batch: dict[str, Tensor]):
        batch = dict(batch)
        task_ids = batch.pop("task_ids", None)
        if task_ids is not None:
            moelora.set_task_ids(self.model, task_ids[:, None].expand_as(batch["input_ids"]))
        return self.model(**batch)

    def _shared_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        out = self(batch)
        aux = moelora.aux_loss(self.model)
        bs = batch["input_ids"].shape[0]
        if self.hparams.task == "causal-lm" and not (batch["labels"][:, 1:] != -100).any():
            # Every text of the batch is one token long: no next-token target, and the model's mean
            # over zero targets is NaN. Train on the aux loss alone and log no loss for the batch.
            return out.logits.sum() * 0.0 + aux
        loss = out.loss + aux
        self.log(f"{stage}/loss", out.loss, prog_bar=True, batch_size=bs, sync_dist=stage != "train")
        self.log(f"{stage}/aux_loss", aux, batch_size=bs, sync_dist=stage != "train")
        if self.hparams.task == "sequence-classification":
            correct = (out.logits.argmax(-1) == batch["labels"]).float()
            self.log(f"{stage}/acc", correct.mean(), prog_bar=stage != "train", batch_size=bs,
                     sync_dist=stage != "train")
            if stage != "train" and "task_ids" in batch:
                for t in batch["task_ids"].unique().tolist():
                    m = batch["task_ids"] == t
                    self.log(f"{stage}/acc_task{t}", correct[m].mean(), batch_size=int(m.sum()), sync_dist=True)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        """Predictions plus each wrapped layer's per-token expert choice ``[B, S, k]``. Layers that do
        not see every token (BERT's pooler, a head on the pooled vector) are left out."""
        out = self(batch)
        shape = batch["input_ids"].shape
        routing = {layer.name: layer.last_expert_ids.view(*shape, -1).cpu()
                   for layer in moelora.wrapped_layers(self.model)
                   if layer.last_expert_ids is not None and layer.last_expert_ids.shape[0] == shape.numel()}
        preds = out.logits.argmax(-1).cpu()
        return {"input_ids": batch["input_ids"].cpu(), "attention_mask": batch["attention_mask"].cpu(),
                "predictions": preds, "routing": routing}

    def configure_callbacks(self) -> list[L.Callback]:
        """Callbacks the method config supplies through a ``callbacks()`` hook (WeightLoRA's
        thresholding schedule); Lightning adds them to the trainer's own."""
        make = getattr(self.method, "callbacks", None)
        return list(make()) if callable(make) else []

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        routers, experts = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (routers if ".router." in name else experts).append(p)
        groups = [{"params": experts, "name": "experts"}]
        if routers:
            groups.append({"params": routers, "name": "routers", "weight_decay": 0.0,
                           **({"lr": self.hparams.router_lr} if self.hparams.router_lr else {})})
        groups = [g for g in groups if g["params"]]
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # Steps on a validation metric, so once per epoch: the wrapper in lightning.pytorch.cli
            # names it (`monitor`); a plain torch one watches val/loss.
            return {"optimizer": optimizer, "lr_scheduler": {
                "scheduler": scheduler, "interval": "epoch", "monitor": getattr(scheduler, "monitor", "val/loss")}}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def adapter_keys(self) -> dict[str, torch.Size]:
        """Checkpoint keys of the adapter and their shapes (``model.<module>.<tensor>``)."""
        state = get_state(self.model)
        return {f"model.{name}.{key}": t.shape for name in state.wrapped + state.saved_modules
                for key, t in adapter_state_dict(self.model.get_submodule(name)).items()}

    def state_dict(self, *args, **kwargs):
        full = super().state_dict(*args, **kwargs)
        keys = self.adapter_keys()
        return type(full)((k, v) for k, v in full.items() if k in keys)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load an adapter-only state dict (what :meth:`state_dict` returns): the frozen backbone
        keys it never holds are not "missing", so ``load_from_checkpoint`` does not list every
        backbone weight in a warning, and ``strict`` checks the adapter keys alone."""
        keys = super().load_state_dict(state_dict, strict=False, assign=assign)
        adapter = self.adapter_keys()
        missing = [k for k in keys.missing_keys if k in adapter]
        if strict and (missing or keys.unexpected_keys):
            raise RuntimeError(f"adapter state dict does not fit {type(self).__name__}: missing {missing[:10]}, "
                               f"unexpected {keys.unexpected_keys[:10]}")
        return torch.nn.modules.module._IncompatibleKeys(missing, keys.unexpected_keys)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["moelora"] = {"rng": torch.get_rng_state(), "method": self.method.to_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        adapt = getattr(get_state(self.model).config, "adapt_to_checkpoint", None)
        if callable(adapt):  # adapters whose layout changes in training (WeightLoRA pruning) take the checkpoint's
            adapt(self.model, checkpoint)
        want = self.adapter_keys()
        got = checkpoint.get("state_dict", {})
        missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        wrong = sorted(k for k in set(want) & set(got) if tuple(got[k].shape) != tuple(want[k]))
        if missing or unexpected or wrong:
            raise ValueError(f"checkpoint does not fit this model's adapter: missing {missing[:10]}, "
                             f"unexpected {unexpected[:10]}, mis-shaped {wrong[:10]}. Was it written with "
                             "the same backbone and method config?")
        extra = checkpoint.get("moelora", {})
        if "rng" in extra:
            torch.set_rng_state(extra["rng"])

    def teardown(self, stage: str) -> None:
        # By now the strategy has unwrapped DistributedDataParallel, but cyclic garbage still holds
        # the gloo process group. Left to the interpreter's final collection, the group is destroyed
        # while Python is finalizing; its worker threads then drop Python objects, cannot take the GIL
        # and abort the rank ("terminate called without an active exception", 5 of 30 runs of a plain
        # Lightning BoringModel with ddp_spawn on 2 CPU ranks, torch 2.13). Collecting it here lets
        # Lightning's exit hook destroy the group while Python is whole (0 of 30 runs).
        if self._trainer is not None and self.trainer.world_size > 1:
            gc.collect()

    def on_train_end(self) -> None:
        log_dir = self.trainer.log_dir if self.trainer is not None else None  # a collective under DDP
        if self.trainer is not None and not self.trainer.is_global_zero:
            return
        log_dir = log_dir or "."
        target = Path(self.hparams.adapter_dir) if self.hparams.adapter_dir else Path(log_dir) / "adapter"
        self.adapter_path = moelora.save_adapter(self.model, target)
