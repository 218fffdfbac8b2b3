"""WeightLoRA / WeightLoRA+ config: keep only the necessary adapters (arXiv 2506.02724).

Every head i (one wrapped module) gets a trainable scalar ω_i::

    h_i = W_i x + ω_i · (α/r) · B_i A_i x

and ω is kept K-sparse (‖ω‖₀ ≤ K = ``keep``) by stochastic iterative hard thresholding (IHT):
an ordinary optimizer step, then keep the K entries of largest |ω| and zero the rest. After
``warmup_steps`` optimizer steps the heads with ω_i = 0 are disconnected: the wrapped module is
put back as its plain base layer, and its A, B and ω leave the model and the optimizer.
WeightLoRA+ (``plus=True``) then raises the rank of the kept heads to re-spend the freed
parameters and training continues. The schedule runs in :class:`moelora.weightlora.WeightLoRAController`
(any loop) or the Lightning callback that :class:`~moelora.lightning.MoELoRAModule` adds itself.

Choices where the paper is silent (all fields below):

    what                      moelora default (field)
    ω init                    1.0 (omega_init): ω = 1 and no pruning is plain LoRA, exactly
    when IHT runs             after every optimizer step from step threshold_start (default: half
                              of warmup_steps) to warmup_steps. With B = 0 at init every ω has zero
                              gradient on step 1, so thresholding from step 1 would keep the first
                              K heads by position: ω first trains densely. threshold_start=1 = paper.
    disconnection             right after optimizer step warmup_steps (a last IHT, then removal)
    ω learning rate           ω sits in the router (``<layer>.router.omega``): MoELoRAModule puts it in
                              its "routers" group (weight decay 0, ``router_lr``); plain loops use
                              moelora.weightlora.param_groups(model, omega_lr=...). Default: the LoRA lr.
    WeightLoRA+ rank rule     every kept expert's rank × (LoRA parameters before disconnection / kept
                              parameters), rounded down (never over budget), capped at min(d_in, d_out);
                              or plus_rank for an explicit rank
    WeightLoRA+ new rows      new B columns 0, new A rows drawn like a fresh LoRA's A (plus_init="zero_b"),
                              or new A rows 0 and random B columns ("zero_a"); the output does not move
                              and the scale stays alpha / r of the original rank
    optimizer state           kept rows keep their Adam moments and step; new rows start at zero

``over="experts"`` is the same selection inside each bank ("keep only necessary experts"): ω has one
entry per expert, IHT keeps ``keep`` experts per wrapped module, and disconnection shrinks the bank
and the router to them. An expert whose ω was zeroed is also out of the routing (the router routes
among the remaining experts), so removing it does not change the outputs; it follows that such an
expert gets no gradient and does not come back. ``base_method`` puts the gates over any routed
moelora method (a trained top-k MoE-LoRA, SiRA, a MeteoRA fusion); see also
:func:`moelora.weightlora.add_gates` for an adapter that already exists.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from moelora.config import MoELoRAConfig, _fail, _is_number, config_from_dict, register_config
from moelora.inject import build_layer
from moelora.routers.weightlora import OVER, OmegaRouter
from moelora.state import AdapterState

from .weightlora_parts import PLUS_INITS, install_tracker, keep_bank_experts

STAGES = ("warmup", "disconnected", "expanded")
#: The WeightLoRA settings proper (what add_gates takes); the layer fields come from the gated method.
GATE_FIELDS = ("keep", "over", "omega_init", "warmup_steps", "threshold_start", "plus", "plus_rank", "plus_init",
               "extra")
CHECKPOINT_KEY = "weightlora"  # the live config in Lightning checkpoints (see adapt_to_checkpoint)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@register_config
@dataclass
class WeightLoRAConfig(MoELoRAConfig):
    """WeightLoRA: a trainable weight ω per head (or per expert), kept K-sparse, then pruned.

    Without ``base_method`` the heads are plain LoRA (``num_experts=1``, the default) or, with
    ``num_experts > 1``, a top-k MoE-LoRA built from this config's own fields. The fields after
    ``plus_init`` describe what training has done so far; they are filled in by disconnection and
    expansion and saved with the adapter, so a pruned adapter loads back pruned. Leave them unset.
    """

    method: ClassVar[str] = "weightlora"

    target_modules: list[str] | str | None = None
    """As :class:`MoELoRAConfig` (required without ``base_method``; filled in from it otherwise)."""
    num_experts: int = 1
    """Experts per wrapped module; 1 (default) = plain LoRA heads, as in the paper."""
    top_k: int = 1
    """Experts per token when ``num_experts > 1``."""
    keep: int | None = None
    """K, required: heads kept (``over="heads"``, across the whole model; 1 <= K <= wrapped modules)
    or experts kept per wrapped module (``over="experts"``; 1 <= K <= num_experts)."""
    over: str = "heads"
    """``"heads"``: one ω per wrapped module, dropped modules go back to their base layer.
    ``"experts"``: one ω per expert of each bank, dropped experts leave the bank and the router."""
    base_method: dict[str, Any] | None = None
    """Another method's config as a dict (``{"method": "moelora", "target_modules": [...], ...}``;
    a router-based method: moelora, sira, meteora) whose layers get the ω gates; its fields then
    define the layers and this config's layer fields are filled in from it. ``None``: this config's
    own fields build the layers."""
    omega_init: float = 1.0
    """Initial ω of every head / expert (non-zero). 1.0: the model starts as plain LoRA / the base method."""
    warmup_steps: int = 100
    """T: optimizer steps of stochastic IHT before the heads with ω = 0 are disconnected."""
    threshold_start: int | None = None
    """First optimizer step after which IHT runs (then after every step up to ``warmup_steps``).
    ``None`` = ``max(1, warmup_steps // 2)``: ω trains densely first (see the module docstring);
    1 = the paper's stochastic IHT from the start."""
    plus: bool = False
    """WeightLoRA+: after disconnection, raise the kept heads' ranks to re-spend the freed parameters."""
    plus_rank: int | None = None
    """WeightLoRA+ rank of every kept expert (>= its rank); ``None`` = the budget rule (module docstring)."""
    plus_init: str = "zero_b"
    """New rank rows at expansion: ``"zero_b"`` (new A rows random, new B columns zero) or
    ``"zero_a"`` (new A rows zero, new B columns random). Both leave the output unchanged."""
    stage: str = "warmup"
    """Filled in: ``"warmup"``, ``"disconnected"`` or ``"expanded"`` (WeightLoRA+)."""
    disconnected: list[str] = field(default_factory=list)
    """Filled in: names of the disconnected heads (``over="heads"``)."""
    kept_experts: dict[str, list[int]] | None = None
    """Filled in (``over="experts"``): per wrapped module, the original indices of the kept experts."""
    expert_ranks: dict[str, list[int]] | None = None
    """Filled in: per wrapped module, its experts' ranks after pruning / expansion."""
    param_budget: int | None = None
    """Filled in at disconnection: LoRA parameters (A and B) of all heads before it (WeightLoRA+'s budget)."""

    def __post_init__(self) -> None:
        base = self._parse_base() if self.base_method is not None else None
        object.__setattr__(self, "_base", base)
        targets = self.target_modules
        if targets is None and base is not None:
            self.target_modules = ["<from base_method>"]
        try:
            super().__post_init__()
        finally:
            if targets is None:
                self.target_modules = None
        if self.keep is None or not _is_int(self.keep) or self.keep < 1:
            _fail("keep", self.keep, "an integer >= 1: the number of heads (or experts per module) to keep")
        if self.over not in OVER:
            _fail("over", self.over, f"one of {OVER}")
        experts = self.layer_experts
        if self.over == "experts" and experts is not None:
            if experts < 2:
                _fail("over", self.over, f"'heads' (or num_experts >= 2: this adapter has {experts} expert per module)")
            if self.keep > experts:
                _fail("keep", self.keep, f"an integer in [1, {experts}] (the experts per wrapped module)")
        if not _is_number(self.omega_init) or not math.isfinite(self.omega_init) or self.omega_init == 0:
            _fail("omega_init", self.omega_init, "a finite non-zero number (0 would start every head disconnected)")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 1:
            _fail("warmup_steps", self.warmup_steps, "an integer >= 1 (optimizer steps before disconnection)")
        if self.threshold_start is not None and (not _is_int(self.threshold_start)
                                                 or not 1 <= self.threshold_start <= self.warmup_steps):
            _fail("threshold_start", self.threshold_start, f"an integer in [1, warmup_steps={self.warmup_steps}], "
                  "or null for warmup_steps // 2")
        if not isinstance(self.plus, bool):
            _fail("plus", self.plus, "true or false")
        if self.plus_rank is not None and (not _is_int(self.plus_rank) or self.plus_rank < 1):
            _fail("plus_rank", self.plus_rank, "an integer >= 1, or null for the parameter-budget rule")
        if self.plus_init not in PLUS_INITS:
            _fail("plus_init", self.plus_init, f"one of {PLUS_INITS}")
        if self.stage not in STAGES:
            _fail("stage", self.stage, f"one of {STAGES} (filled in by training; leave it unset)")
        if not isinstance(self.disconnected, list) or not all(isinstance(n, str) for n in self.disconnected):
            _fail("disconnected", self.disconnected, "a list of module names (filled in; leave it unset)")
        for name in ("kept_experts", "expert_ranks"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, dict) or not all(
                    isinstance(k, str) and isinstance(v, list) and all(_is_int(i) and i >= 0 for i in v)
                    for k, v in value.items())):
                _fail(name, value, "{module name: [integers]} (filled in; leave it unset)")

    def _parse_base(self) -> MoELoRAConfig:
        raw = self.base_method
        if not isinstance(raw, dict) or not isinstance(raw.get("method"), str):
            _fail("base_method", raw, "a method config as a dict with a 'method' key (e.g. {'method': "
                  "'moelora', 'target_modules': ['query'], 'num_experts': 4}), or null")
        if raw["method"] == self.method:
            _fail("base_method", raw["method"], "another method's config (WeightLoRA cannot gate itself)")
        try:
            base = config_from_dict(raw)
        except (TypeError, ValueError) as err:
            raise ValueError(f"config field `base_method` is invalid: {err}") from None
        if callable(getattr(base, "make_layer", None)) or callable(getattr(base, "build_plan", None)):
            _fail("base_method", raw["method"], "a method whose layers route tokens with a router (moelora, sira, "
                  f"meteora): {type(base).__name__} builds its own layers, so ω cannot scale its gate weights")
        return base

    # ------------------------------------------------------------------ derived values
    @property
    def layer_experts(self) -> int | None:
        """Experts per bank before any pruning (``None`` while a MeteoRA base is not fused yet)."""
        return self._base.num_experts if self._base is not None else self.num_experts

    @property
    def first_threshold_step(self) -> int:
        """The first optimizer step after which hard thresholding runs."""
        return self.threshold_start if self.threshold_start is not None else max(1, self.warmup_steps // 2)

    def layer_config(self) -> MoELoRAConfig:
        """The config that builds the layers under the gates: ``base_method`` parsed, or a plain
        :class:`MoELoRAConfig` with this config's own fields."""
        if self._base is not None:
            return self._base
        return MoELoRAConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MoELoRAConfig)})

    def check_heads(self, num_heads: int) -> None:
        """``keep`` against the number of wrapped modules (``over="heads"``, before disconnection)."""
        if self.over == "heads" and self.stage == "warmup" and self.keep > num_heads:
            _fail("keep", self.keep, f"an integer in [1, {num_heads}]: the model has {num_heads} wrapped module(s) "
                  "(heads) to choose from")

    def gate_fields(self) -> dict[str, Any]:
        """The WeightLoRA settings of this config (not the layer fields, not the filled-in ones)."""
        return {name: getattr(self, name) for name in GATE_FIELDS}

    @classmethod
    def bound(cls, base: MoELoRAConfig, wrapped: list[str], **gate_fields: Any) -> WeightLoRAConfig:
        """A config gating the adapter ``base`` built, over the exact ``wrapped`` module names:
        layer fields copied from ``base``, ``base_method = base.to_dict()``, WeightLoRA settings
        from ``gate_fields`` (``keep``, ``over``, ``warmup_steps``, ...)."""
        unknown = sorted(set(gate_fields) - set(GATE_FIELDS))
        if unknown:
            raise ValueError(f"unknown WeightLoRA setting(s) {unknown}; known: {list(GATE_FIELDS)}")
        common = {f.name: getattr(base, f.name) for f in dataclasses.fields(MoELoRAConfig) if f.name != "extra"}
        common.update(target_modules=list(wrapped), exclude_modules=None)
        return cls(**common, base_method=base.to_dict(), **gate_fields)

    # ------------------------------------------------------------------ hooks used by moelora.inject
    def inject_into(self, model: nn.Module) -> nn.Module | None:
        """``moelora.inject`` hook: with ``base_method`` (in warm-up), inject that method (a MeteoRA
        base fuses its adapter files), then add the gates; the model is left unchanged on any
        error. ``None`` otherwise: plain injection through :meth:`make_layer`, which also builds
        a pruned / expanded layout (a live config of a trained model) with fresh weights."""
        if self._base is None or self.stage != "warmup":
            return None
        from moelora.inject import inject, unwrap

        from .weightlora import add_gates

        inject(model, self._base)
        try:
            return add_gates(model, **self.gate_fields())
        except BaseException:
            unwrap(model)
            raise

    def make_layer(self, *, base_layer: nn.Module, name: str, state: AdapterState, in_features: int,
                   out_features: int, ranks: list[int] | None, scales: list[float] | None, dtype: torch.dtype,
                   device: torch.device, generator: torch.Generator | None) -> nn.Module:
        """``moelora.inject`` / ``load_adapter`` hook: the gated layer for module ``name``.

        ``ranks`` / ``scales``: a saved adapter's per-expert values (after pruning: the kept
        experts' only, in ``kept_experts`` order). The layer is built by :meth:`layer_config`,
        its router wrapped in an :class:`~moelora.routers.weightlora.OmegaRouter`, and pruned to
        ``kept_experts`` when training had disconnected experts.
        """
        self.check_heads(len(state.wrapped))
        tracker = install_tracker(state)
        inner_cfg = self.layer_config()
        experts = inner_cfg.num_experts
        kept = (self.kept_experts or {}).get(name)
        ranks = ranks if ranks is not None else (self.expert_ranks or {}).get(name)
        if kept is not None:  # build the full bank with empty dropped experts, then prune it
            for label, values in (("ranks", ranks), ("scales", scales)):
                if values is not None and len(values) != len(kept):
                    raise ValueError(f"{name}: got {len(values)} expert {label} for the {len(kept)} kept experts "
                                     f"{kept}; the saved adapter's config is damaged.")
            full = [0] * experts
            for i, e in enumerate(kept):
                full[e] = ranks[i] if ranks is not None else inner_cfg.rank
            ranks = full
            if scales is not None:
                scales = [scales[kept.index(e)] if e in kept else 0.0 for e in range(experts)]
        layer = build_layer(inner_cfg, base_layer=base_layer, name=name, state=state, ranks=ranks, scales=scales,
                            generator=generator)
        inner = None if self._base is None and experts == 1 else layer.router
        gate = OmegaRouter(inner=inner, over=self.over, num_experts=experts, omega_init=self.omega_init).to(device)
        gate.bind_state(state)
        gate.expert_names = provenance_names(inner_cfg, experts)
        layer.router = gate
        if kept is not None and len(kept) < experts:
            keep_bank_experts(layer.bank, kept)
            gate.keep_experts(kept)
            tracker.expert_maps[name] = (list(kept), experts)
        return layer

    # ------------------------------------------------------------------ hooks used by the Lightning module
    def callbacks(self) -> list:
        """Callbacks :class:`~moelora.lightning.MoELoRAModule` adds to the trainer: the
        thresholding / disconnection / expansion schedule."""
        from moelora.lightning.weightlora import WeightLoRACallback

        return [WeightLoRACallback()]

    def adapt_to_checkpoint(self, model: nn.Module, checkpoint: dict[str, Any]) -> None:
        """Before a Lightning checkpoint's adapter keys are checked: give ``model`` the checkpoint's
        pruned / expanded layout (its weights are loaded next)."""
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved:
            from .weightlora import restructure

            restructure(model, saved)


def provenance_names(config: MoELoRAConfig, experts: int) -> list[str] | None:
    """Expert names a method records (MeteoRA's adapter names), if it has one per expert."""
    provenance = getattr(config, "experts", None) or []
    if len(provenance) == experts and all(isinstance(p, dict) and "name" in p for p in provenance):
        return [str(p["name"]) for p in provenance]
    return None
