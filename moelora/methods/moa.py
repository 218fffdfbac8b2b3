"""MoA: heterogeneous Mixture of Adapters, soft and sparse (DCDmllm, arXiv 2506.05928).

    cfg = moelora.MoAConfig()                        # Soft MoA: LoRA on q, k, v, o, down + parallel adapter
    cfg = moelora.MoAConfig(variant="sparse")        # Sparse MoA: token-wise threshold per type
    model = moelora.inject(hf_model, cfg)
    moelora.moa_stats(model)                         # per block and type: mean weight, activation rate

Per transformer block one router (linear or SwiGLU, sigmoid weights) gives every *type* of
expert one weight per token: a LoRA on each targeted projection, a parallel adapter beside the
FFN and, on request, a prompt expert in attention (``moa_layout``, ``moa_experts``,
``moa_block``, ``moelora.routers.moa``). Semantics: research/methods.md §1.

The two official code paths differ; moelora's defaults follow the native LLaMA-3 code (the
reference implementation) unless noted, and each difference is a field:

    what                 native LLaMA3 code            HF transformers port        moelora (field: default)
    router input         block input (residual)        input_layernorm output      router_input: "residual"
    prompt expert        soft: on (most runs)          off (hard-coded)            prompt_expert: False
    rank / alpha / size  8 / 8 / 16 (flags)            8 / 8 / 16 (hard-coded)     rank 8, alpha 8, adapter_size 16
    threshold            σ(w_τ·x+b_τ)·0.5, untrained    same                        threshold_grad: "none"
"""

from __future__ import annotations

import math
import warnings
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from moelora.config import MoELoRAConfig, _fail, _is_number, register_config
from moelora.experts import ExpertBank
from moelora.inject import AdapterPlan, SavedModule, _find_saved_modules, _module_device, module_generator
from moelora.routers.moa import ACTIVATIONS, THRESHOLD_GRADS, MoARouter
from moelora.state import AdapterState, get_state
from moelora.targeting import linear_features

from .moa_block import InstallHooks, MoABlock
from .moa_experts import MoALoRALinear, ParallelAdapter, PromptExpert
from .moa_layout import LORA_TYPES, TYPE_ORDER, check_block, find_blocks

VARIANTS = ("soft", "sparse")
#: Fields only sparse MoA reads (soft MoA runs every expert): setting them on soft MoA warns.
SPARSE_ONLY = ("max_threshold", "const_threshold", "threshold_grad")
ROUTER_INPUTS = ("residual", "normed")
HOLDER = "moa"  # the child added to every adapted block


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@register_config
@dataclass
class MoAConfig(MoELoRAConfig):
    """MoA: per block, a router weighting heterogeneous adapters (LoRAs, parallel adapter, prompt).

    MoA targets by *type*, not by module name: ``target_modules``, ``exclude_modules``,
    ``num_experts`` and ``top_k`` are not used and must stay unset (``lora_types``,
    ``type_modules`` and ``layers`` choose what is adapted). ``rank`` / ``alpha`` /
    ``use_rslora`` / ``init_lora_weights`` / ``dropout`` are the LoRA experts' (defaults as the
    official runs: r = 8, α = 8, no dropout). ``router_init_std`` is not used: routers take
    PyTorch's default ``nn.Linear`` init, as the official code. MoA has no balancing loss, so
    ``aux_loss_coef``, ``z_loss_coef`` and ``router_noise_std`` must stay 0.
    """

    method: ClassVar[str] = "moa"
    #: Never folded into the base weights or exported as static PEFT LoRAs (moelora.merge.refuse_static).
    static_refusal: ClassVar[str | None] = (
        "Every LoRA of a block is scaled per token by its router's weight (and, under Sparse MoA, runs only "
        "above the token's threshold), and the parallel and prompt experts are not LoRAs at all, so one "
        "static LoRA (or merged weights) would change the model's outputs. Keep it as an adapter "
        "(moelora.save_adapter / moelora.load_adapter).")

    target_modules: list[str] | str | None = None
    """Not used by MoA (must stay null): experts are placed by ``lora_types`` / ``type_modules``."""
    num_experts: int | None = None
    """Not used (must stay null): a block's experts follow from lora_types, parallel_adapter, prompt_expert."""
    top_k: int | None = None
    """Not used (must stay null): Sparse MoA keeps a variable number of types per token (threshold)."""
    rank: int = 8
    """LoRA rank of every type without an entry in ``rank_per_type`` (official: 8)."""
    alpha: float = 8.0
    """LoRA alpha of every type without an entry in ``alpha_per_type`` (official: 8, i.e. scale 1)."""
    aux_loss_coef: float = 0.0
    """Must be 0: MoA trains with the task loss only."""
    variant: str = "soft"
    """``"soft"``: every expert runs, scaled by its weight. ``"sparse"``: a type runs for a token
    only where its weight ≥ the token's threshold τ(x), scaled by the weight."""
    lora_types: list[str] | None = None
    """LoRA experts per block, a subset of ``q, k, v, o, up, gate, down``; null = the official
    ``[q, k, v, o, down]``. BERT-style blocks have no ``gate``."""
    rank_per_type: dict[str, int] | None = None
    """Rank for some types, e.g. ``{"down": 16}`` (others use ``rank``)."""
    alpha_per_type: dict[str, float] | None = None
    """Alpha for some types, e.g. ``{"down": 16}`` (others use ``alpha``)."""
    parallel_adapter: bool = True
    """Add the parallel adapter ``up(SiLU(down(h)))`` beside each block's FFN (official: on)."""
    adapter_size: int = 16
    """Bottleneck width of the parallel adapter (official ``p_adapter_size``: 16)."""
    adapter_init_gain: float = 1e-4
    """Gain of the adapter's xavier-uniform init (official: 1e-4; biases start at 0)."""
    prompt_expert: bool = False
    """Add the prompt expert in attention (Llama/Qwen2 attention only; off as in the official HF port)."""
    prompt_len: int = 10
    """Learnable prompt tokens per block (official: 10)."""
    swiglu_factor: int = 4
    """Router: 0 = linear ``W x + b``; f > 0 = SwiGLU with hidden size ``types · f`` (official: 4)."""
    router_activation: str = "sigmoid"
    """``"sigmoid"`` (MoA: independent weights in (0, 1)) or ``"softmax"`` (ablation)."""
    router_input: str = "residual"
    """What the router reads: ``"residual"`` = the block input before its input norm (the native
    code) or ``"normed"`` = the input norm's output (the HF port). Same thing for post-LN blocks (BERT)."""
    max_threshold: float = 0.5
    """Sparse MoA: τ(x) = σ(w_τ·x + b_τ) · max_threshold (official: 0.5), or the constant with
    ``const_threshold``."""
    const_threshold: bool = False
    """Sparse MoA: τ = max_threshold for every token (no threshold network)."""
    threshold_grad: str = "none"
    """Sparse MoA: ``"none"`` (official: τ never learns; its network stays at init and is frozen),
    ``"adamole"`` (weights (w − τ)·m renormalised over types; τ learns) or ``"ste"``
    (weights w·m, straight-through gradient to w − τ)."""
    layers: list[int] | None = None
    """Indices (0-based, in model order) of the blocks that get MoA; null = every block."""
    block_class: str | None = None
    """Class name of the transformer blocks, when MoA does not recognise them (e.g. ``"GPT2Block"``)."""
    type_modules: dict[str, str] | None = None
    """Type → module path inside a block, overriding the detected layout (e.g. ``{"q": "attn.c_attn"}``)."""
    norm_module: str | None = None
    """Path inside a block of its input norm (custom pre-norm blocks): ``"normed"`` routing reads its output."""
    ffn_module: str | None = None
    """Path inside a block of the FFN the parallel adapter sits beside (``ffn(h) + w·P(h)``)."""

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules", "num_experts", "top_k"):
            if getattr(self, name) is not None:
                _fail(name, getattr(self, name), "null: MoA places experts by type (use lora_types, "
                      "type_modules and layers)")
        self.target_modules, self.num_experts, self.top_k = ["<moa>"], 1, 1  # placeholders for the base checks
        try:
            super().__post_init__()
        finally:
            self.target_modules, self.num_experts, self.top_k = None, None, None
        for name in ("aux_loss_coef", "z_loss_coef", "router_noise_std"):
            if getattr(self, name) != 0:
                _fail(name, getattr(self, name), "0: MoA has no balancing loss and no router noise")
        self._check_choices()
        self._check_types()
        for name, low in (("adapter_size", 1), ("prompt_len", 1), ("swiglu_factor", 0)):
            if not _is_int(getattr(self, name)) or getattr(self, name) < low:
                _fail(name, getattr(self, name), f"an integer >= {low}")
        if not _is_number(self.adapter_init_gain) or not math.isfinite(self.adapter_init_gain) \
                or self.adapter_init_gain < 0:
            _fail("adapter_init_gain", self.adapter_init_gain, "a finite number >= 0")
        if not _is_number(self.max_threshold) or not 0 <= self.max_threshold <= 1:
            _fail("max_threshold", self.max_threshold, "a number in [0, 1] (router weights are in (0, 1))")
        if self.layers is not None and (not isinstance(self.layers, list) or not self.layers
                                        or not all(_is_int(i) and i >= 0 for i in self.layers)):
            _fail("layers", self.layers, "a non-empty list of block indices >= 0, or null for every block")
        for name in ("block_class", "norm_module", "ffn_module"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                _fail(name, value, "a non-empty string or null")
        if self.type_modules is not None and (not isinstance(self.type_modules, dict) or not all(
                k in LORA_TYPES and isinstance(v, str) and v for k, v in self.type_modules.items())):
            _fail("type_modules", self.type_modules, f"an object {{type: module path}} with types from {LORA_TYPES}")

    def _check_choices(self) -> None:
        for name, allowed in (("variant", VARIANTS), ("router_activation", ACTIVATIONS),
                              ("router_input", ROUTER_INPUTS), ("threshold_grad", THRESHOLD_GRADS)):
            if getattr(self, name) not in allowed:
                _fail(name, getattr(self, name), f"one of {allowed}")
        for name in ("parallel_adapter", "prompt_expert", "const_threshold"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "true or false")

    def _check_types(self) -> None:
        types = self.lora_types
        if types is not None and (not isinstance(types, list) or len(set(types)) != len(types)
                                  or not all(t in LORA_TYPES for t in types)):
            _fail("lora_types", types, f"a list of distinct types from {LORA_TYPES}, or null for [q, k, v, o, down]")
        if not self.types and not self.parallel_adapter and not self.prompt_expert:
            _fail("lora_types", types, "at least one expert: a LoRA type, parallel_adapter or prompt_expert")
        for name, check, what in (("rank_per_type", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
                                  ("alpha_per_type", lambda v: _is_number(v) and v > 0, "a number > 0")):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, dict) or not all(k in LORA_TYPES and check(v) for k, v in value.items()):
                _fail(name, value, f"an object {{type: value}} with types from {LORA_TYPES} and values {what}")
            unused = sorted(set(value) - set(self.types))
            if unused:  # a typo or a forgotten lora_types entry would otherwise change nothing
                _fail(name, value, f"types in use only (lora_types = {self.types}); {unused} get no LoRA")
        sparse_only = [f.name for f in dataclasses.fields(self)
                       if f.name in SPARSE_ONLY and getattr(self, f.name) != f.default]
        if self.variant == "soft" and sparse_only:
            warnings.warn(f"MoAConfig: {sparse_only} only apply to variant='sparse'; soft MoA runs every expert "
                          "and ignores them.", UserWarning, stacklevel=4)

    # ------------------------------------------------------------------ derived
    @property
    def types(self) -> list[str]:
        """The LoRA types in use (``lora_types`` or the official default)."""
        return list(self.lora_types) if self.lora_types is not None else ["q", "k", "v", "o", "down"]

    @property
    def type_names(self) -> list[str]:
        """Every expert type of a block, in router order (``q, k, v, prompt, o, up, gate, down, adapter``)."""
        enabled = set(self.types) | ({"adapter"} if self.parallel_adapter else set()) \
            | ({"prompt"} if self.prompt_expert else set())
        return [t for t in TYPE_ORDER if t in enabled]

    def type_rank(self, t: str) -> int:
        return (self.rank_per_type or {}).get(t, self.rank)

    def type_scale(self, t: str) -> float:
        """``alpha_t / r_t`` (``/ √r_t`` with rsLoRA)."""
        r = self.type_rank(t)
        return (self.alpha_per_type or {}).get(t, self.alpha) / (math.sqrt(r) if self.use_rslora else r)

    def build_plan(self, model: nn.Module, *, expert_ranks=None, expert_scales=None) -> AdapterPlan:
        """``moelora.inject`` / ``load_adapter`` hook: build every MoA module off to the side."""
        return build_moa_plan(model, self, expert_ranks=expert_ranks, expert_scales=expert_scales)


def build_moa_plan(model: nn.Module, config: MoAConfig, *, expert_ranks=None, expert_scales=None) -> AdapterPlan:
    """Validate ``model`` for ``config`` and build the LoRA layers, block holders and hooks
    without touching the model (so an error leaves it exactly as it was).

    Args:
        expert_ranks: per wrapped module ``[r]`` (a saved adapter's ranks), checked against the config.
        expert_scales: not supported (MoA scales come from alpha); must be None.
    """
    if expert_scales:
        raise ValueError("MoA takes its LoRA scales from alpha / alpha_per_type; do not pass expert_scales.")
    saved = _find_saved_modules(model, config.modules_to_save)
    blocks = find_blocks(model, block_class=config.block_class, type_modules=config.type_modules,
                         norm_module=config.norm_module, ffn_module=config.ffn_module)
    if config.layers is not None:
        bad = [i for i in config.layers if i >= len(blocks)]
        if bad:
            _fail("layers", config.layers, f"indices below the model's {len(blocks)} blocks")
        blocks = [blocks[i] for i in sorted(set(config.layers))]
    overlap = [s for s in saved if any(s == b or s.startswith(b + ".") or b.startswith(s + ".") for b, _ in blocks)]
    if overlap:
        raise ValueError(f"modules_to_save {overlap} overlap MoA blocks; save modules outside the adapted blocks.")
    dtype = getattr(torch, config.adapter_dtype)
    type_names = config.type_names
    lora_names: dict[str, tuple[str, str]] = {}  # module name → (block, type)
    for name, layout in blocks:
        found = check_block(model, name, layout, lora_types=config.types, adapter=config.parallel_adapter,
                            prompt=config.prompt_expert, router_input=config.router_input)
        lora_names.update({module: (name, t) for t, module in found.items()})
    holders = [f"{name}.{HOLDER}" if name else HOLDER for name, _ in blocks]
    clash = [h for h, (name, _) in zip(holders, blocks) if hasattr(model.get_submodule(name), HOLDER)]
    if clash:
        raise ValueError(f"blocks {clash[:3]} already have an attribute {HOLDER!r}; MoA cannot add its holder there.")
    state = AdapterState(config=config, wrapped=list(lora_names), saved_modules=list(saved) + holders)
    modules: dict[str, nn.Module] = {}
    blocks_out = []
    for (name, layout), holder in zip(blocks, holders):
        block = model.get_submodule(name)
        d = _hidden_size(model, block, name)
        gen = module_generator(config.seed, holder)
        router = MoARouter(in_features=d, num_types=len(type_names), swiglu_factor=config.swiglu_factor,
                           activation=config.router_activation, sparse=config.variant == "sparse",
                           max_threshold=config.max_threshold, const_threshold=config.const_threshold,
                           threshold_grad=config.threshold_grad, generator=gen, dtype=dtype)
        adapter = ParallelAdapter(hidden_size=d, adapter_size=config.adapter_size, init_gain=config.adapter_init_gain,
                                  generator=gen, dtype=dtype) if config.parallel_adapter else None
        prompt = None
        if config.prompt_expert:
            heads = model.get_submodule(f"{name}.{layout.attention}").config.num_attention_heads
            prompt = PromptExpert(hidden_size=d, num_heads=heads, prompt_len=config.prompt_len, generator=gen,
                                  dtype=dtype)
        moa = MoABlock(name=holder, type_names=type_names, router=router, adapter=adapter, prompt=prompt,
                       state=state).to(_module_device(block))
        modules[holder] = moa
        blocks_out.append((name, layout, moa))
    by_block = {name: moa for (name, _, moa) in blocks_out}
    for module_name, (block_name, t) in lora_names.items():
        base = model.get_submodule(module_name)
        d_in, d_out = linear_features(base)
        rank = config.type_rank(t)
        if expert_ranks is not None and module_name in expert_ranks and list(expert_ranks[module_name]) != [rank]:
            raise ValueError(f"{module_name}: the saved adapter has ranks {list(expert_ranks[module_name])} but the "
                             f"config gives type {t!r} rank {rank}; the saved config is inconsistent.")
        bank = ExpertBank(in_features=d_in, out_features=d_out, ranks=[rank], scales=[config.type_scale(t)],
                          init=config.init_lora_weights, dtype=dtype,
                          generator=module_generator(config.seed, module_name))
        moa = by_block[block_name]
        modules[module_name] = MoALoRALinear(base_layer=base, bank=bank.to(_module_device(base)), name=module_name,
                                             state=state, block=moa, type_name=t, type_index=moa.type_index(t),
                                             dropout=config.dropout, backend=config.backend)
    for name in saved:
        modules[name] = SavedModule(model.get_submodule(name), state)
    plan = AdapterPlan(state, modules)
    plan.hooks = [InstallHooks(blocks_out, config.router_input)]
    return plan


def _hidden_size(model: nn.Module, block: nn.Module, name: str) -> int:
    """d of the block's residual stream (the model config's ``hidden_size``)."""
    cfg = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        if _is_int(getattr(cfg, key, None)):
            return getattr(cfg, key)
    raise ValueError(f"MoA cannot tell the hidden size of {name} ({type(block).__name__}): the model has no "
                     "config.hidden_size.")


def moa_stats(model: nn.Module) -> dict[str, dict[str, dict[str, float]]]:
    """Per MoA block and type, over everything recorded since the tracker was last reset:
    ``{"mean_weight": mean router weight w, "activation_rate": share of real tokens the type ran
    for (1.0 under Soft MoA), "tokens": real tokens}``. Padding is never counted."""
    state = get_state(model)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for module in model.modules():
        if isinstance(module, MoABlock) and module.name in state.tracker.layers:
            s = state.tracker.layers[module.name]
            tokens = max(s.tokens, 1)
            out[module.name] = {t: {"mean_weight": float(s.mean_probs[i]),
                                    "activation_rate": float(s.counts[i]) / tokens, "tokens": float(s.tokens)}
                                for i, t in enumerate(module.type_names)}
    return out
