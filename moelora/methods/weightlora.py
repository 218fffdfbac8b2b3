"""WeightLoRA in any training loop: hard thresholding, disconnection, WeightLoRA+ expansion.

Plain PyTorch (Lightning does the same through the callback MoELoRAModule adds itself)::

    import moelora
    from moelora import weightlora
    cfg = moelora.WeightLoRAConfig(target_modules=["query", "value"], rank=8, alpha=16, keep=3,
                                   warmup_steps=100, plus=True)
    model = moelora.inject(hf_model, cfg)
    opt = torch.optim.AdamW(weightlora.param_groups(model, omega_lr=1e-2), lr=1e-3)
    ctl = weightlora.WeightLoRAController(model)
    for batch in loader:
        loss = model(**batch).loss + moelora.aux_loss(model)
        loss.backward(); opt.step(); opt.zero_grad()
        ctl.step(opt)                    # IHT; at step T: disconnect (+ expand), opt updated in place
    moelora.save_adapter(model, "out/")  # kept heads only; moelora.load_adapter rebuilds them

The building blocks are public too: :func:`hard_threshold`, :func:`disconnect`,
:func:`expand_ranks`, :func:`add_gates` (ω gates on an adapter that already exists, e.g. a
trained MoE-LoRA or a MeteoRA fusion, to keep only its necessary experts), :func:`omega_values`,
:func:`record_gates`, :func:`param_groups`, :func:`fold_omega` (ω into B, for tools that
read B alone; :func:`moelora.export_lora_adapters` folds ω itself). Semantics and defaults:
:mod:`.weightlora_config`.
"""

from __future__ import annotations

import warnings

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from moelora.config import config_from_dict
from moelora.inject import module_generator
from moelora.layer import MoELoRALinear, wrapped_layers
from moelora.routers.weightlora import OmegaRouter
from moelora.state import get_state

from .weightlora_config import WeightLoRAConfig, provenance_names
from .weightlora_parts import (as_optimizers, grow_bank_ranks, grown_rows, install_tracker, keep_bank_experts,
                               picked_rows, remove_params, replace_param)

__all__ = ["WeightLoRAConfig", "WeightLoRAController", "add_gates", "disconnect", "expand_ranks", "fold_omega",
           "gated_layers", "hard_threshold", "lora_parameter_count", "omega_values", "param_groups", "record_gates",
           "restructure", "weightlora_config"]


def weightlora_config(model: nn.Module) -> WeightLoRAConfig:
    """The model's live :class:`WeightLoRAConfig` (what training has done so far)."""
    config = get_state(model).config
    if not isinstance(config, WeightLoRAConfig):
        raise ValueError(f"{type(model).__name__} holds a {type(config).__name__} adapter, not WeightLoRA: inject a "
                         "moelora.WeightLoRAConfig, or add ω gates to this adapter with "
                         "moelora.weightlora.add_gates(model, moelora.WeightLoRAConfig(keep=K, ...)).")
    return config


def gated_layers(model: nn.Module) -> list[MoELoRALinear]:
    """The connected WeightLoRA layers of ``model`` (routers are :class:`OmegaRouter`), in module order."""
    return [layer for layer in wrapped_layers(model) if isinstance(layer.router, OmegaRouter)]


def add_gates(model: nn.Module, config: WeightLoRAConfig | None = None, **settings: Any) -> nn.Module:
    """Put WeightLoRA ω gates on the moelora adapter ``model`` already holds, in place.

    ::

        model = moelora.load_adapter(hf_model, "trained_moe/")        # or a MeteoRA fusion
        moelora.add_gates(model, keep=2, over="experts", warmup_steps=200)

    The existing layers keep their weights; each router is wrapped in an :class:`OmegaRouter`
    (ω = ``omega_init``, so outputs do not change) and the model's config becomes a
    :class:`WeightLoRAConfig` with ``base_method`` = the existing adapter's config and its layer
    fields copied from it. Then train with :class:`WeightLoRAController` (or Lightning) to keep
    only the necessary heads or (``over="experts"``) experts; a pruned model saves and loads as usual.

    Args:
        config: a :class:`WeightLoRAConfig` whose WeightLoRA settings (``keep``, ``over``,
            ``warmup_steps``, ...) are used (its layer fields are ignored); or none, and
        settings: those settings as keywords (they override ``config``'s).

    Raises:
        ValueError: the adapter has gates already, is a method without a router (FlyLoRA, MoA),
            or a setting is invalid (``keep`` not fitting the adapter, named). The model is
            unchanged then.
    """
    if config is not None and not isinstance(config, WeightLoRAConfig):
        raise TypeError(f"config must be a moelora.WeightLoRAConfig, got {type(config).__name__}")
    state = get_state(model)
    base = state.config
    if isinstance(base, WeightLoRAConfig):
        raise ValueError("this model's adapter already has WeightLoRA gates (moelora.WeightLoRAConfig).")
    layers = wrapped_layers(model)
    own = [layer.name for layer in layers if type(layer)._expert_delta is not MoELoRALinear._expert_delta]
    if own or callable(getattr(base, "build_plan", None)) or callable(getattr(base, "make_layer", None)):
        raise ValueError(f"cannot gate a {type(base).__name__} adapter with WeightLoRA: its layers compute their "
                         f"expert output themselves (e.g. {own[:3]}), without router weights for ω to scale. "
                         "Use a router-based method (moelora, sira, meteora) as base_method.")
    live = WeightLoRAConfig.bound(base, list(state.wrapped), **{**(config.gate_fields() if config else {}),
                                                              **settings})
    live.check_heads(len(layers))
    install_tracker(state)
    for layer in layers:
        experts = layer.bank.num_experts
        gate = OmegaRouter(inner=layer.router, over=live.over, num_experts=experts, omega_init=live.omega_init)
        gate.to(layer.bank.Bt.device)
        gate.bind_state(state)
        gate.expert_names = provenance_names(base, experts)
        layer.router = gate
    state.config = live
    record_gates(model)
    return model


def omega_values(model: nn.Module) -> dict[str, Tensor]:
    """``{layer name: ω}`` (detached copies; ``[1]`` per head, ``[E]`` per bank with ``over="experts"``)."""
    return {layer.name: layer.router.omega.detach().clone() for layer in gated_layers(model)}


def lora_parameter_count(model: nn.Module) -> int:
    """Elements of A and B over the connected WeightLoRA layers (trainable or not)."""
    return sum(layer.bank.A.numel() + layer.bank.Bt.numel() for layer in gated_layers(model))


@torch.no_grad()
def hard_threshold(model: nn.Module, keep: int | None = None) -> dict[str, Tensor]:
    """One hard-thresholding step ``ω ← H_K(ω)``: keep the K entries of largest |ω|, zero the rest.

    ``over="heads"``: K over all connected heads of the model; ``over="experts"``: K per bank
    (and the zeroed experts leave the routing). Ties go to the earlier head / expert (module
    order), so the result is deterministic; an expert with rank 0 here, or one already out of
    the routing, ranks last.

    Args:
        keep: K (default ``config.keep``).

    Returns:
        ``{layer name: [heads or experts] bool}`` the kept entries.
    """
    config = weightlora_config(model)
    k = config.keep if keep is None else keep
    layers = gated_layers(model)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"keep={k!r} is invalid: expected an integer >= 1")
    if config.over == "heads":
        if k > len(layers):
            raise ValueError(f"keep={k} is invalid: expected an integer in [1, {len(layers)}] (connected heads)")
        scores = torch.cat([layer.router.omega.detach().abs().double().reshape(-1)[:1] for layer in layers]).cpu()
        kept = torch.zeros(len(layers), dtype=torch.bool)
        kept[torch.sort(scores, descending=True, stable=True).indices[:k]] = True
        for i, layer in enumerate(layers):
            if not kept[i]:
                layer.router.omega.zero_()
        return {layer.name: kept[i:i + 1].clone() for i, layer in enumerate(layers)}
    out = {}
    for layer in layers:
        gate = layer.router
        scores = gate.omega.detach().abs().double().cpu()
        dead = ~gate.active.cpu() | (torch.tensor(layer.bank.ranks) == 0)
        scores[dead] = -1.0
        kept = torch.zeros(scores.numel(), dtype=torch.bool)
        kept[torch.sort(scores, descending=True, stable=True).indices[:min(k, scores.numel())]] = True
        gate.omega.mul_(kept.to(gate.omega.device, gate.omega.dtype))
        gate.set_active(kept)
        out[layer.name] = kept
    return out


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def disconnect(model: nn.Module, optimizers=None) -> list[str]:
    """End of warm-up: a last :func:`hard_threshold`, then remove what it zeroed, in place.

    ``over="heads"``: each dropped head's module goes back to its plain base layer (no LoRA
    compute), its A, B, ω (and router) leave the model. ``over="experts"``: each bank keeps its
    K experts (A/B rows, scales, router rows, ω). Everything removed also leaves ``optimizers``
    (param groups and state; kept parameters keep their state), so its memory is freed. The
    outputs do not change: a dropped head had ω = 0, a dropped expert had ω = 0 and no routing.

    Args:
        optimizers: an optimizer, a list of them, or ``None``.

    Returns:
        The dropped heads' names, or ``"<layer>#<expert>"`` for dropped experts.
    """
    config = weightlora_config(model)
    if config.stage != "warmup":
        raise ValueError(f"this WeightLoRA adapter was already disconnected (stage={config.stage!r}).")
    optimizers = as_optimizers(optimizers)
    state = get_state(model)
    budget = lora_parameter_count(model)
    kept = hard_threshold(model)
    layers = gated_layers(model)
    dropped: list[str] = []
    if config.over == "heads":
        for layer in layers:
            if not bool(kept[layer.name][0]):
                _remove_head(model, layer, optimizers, state)
                dropped.append(layer.name)
        live = dataclasses.replace(config, target_modules=list(state.wrapped), stage="disconnected",
                                   disconnected=config.disconnected + dropped, param_budget=budget)
    else:
        kept_experts, ranks = dict(config.kept_experts or {}), {}
        for layer in layers:
            keep = kept[layer.name].nonzero().flatten().tolist()
            before = kept_experts.get(layer.name, list(range(layer.bank.num_experts)))
            dropped += [f"{layer.name}#{before[e]}" for e in range(len(before)) if e not in keep]
            _prune_experts(layer, keep, optimizers, state.tracker, original=before,
                           experts=config.layer_experts or len(before))
            kept_experts[layer.name] = [before[e] for e in keep]
            ranks[layer.name] = list(layer.bank.ranks)
        live = dataclasses.replace(config, stage="disconnected", kept_experts=kept_experts, expert_ranks=ranks,
                                   param_budget=budget)
    state.config = live
    record_gates(model)
    return dropped


def _remove_head(model: nn.Module, layer: MoELoRALinear, optimizers, state) -> None:
    remove_params(optimizers, list(layer.bank.parameters()) + list(layer.router.parameters()))
    parent, child = _parent(model, layer.name)
    setattr(parent, child, layer.base_layer)
    state.wrapped.remove(layer.name)
    state.tracker.layers.pop(layer.name, None)
    gates = getattr(state.tracker, "gates", {})
    gates[layer.name] = {**gates.get(layer.name, {}), "omega": [0.0], "status": "disconnected"}
    # Whoever still holds the old layer object (a dashboard's layer list) must not keep A and B alive.
    layer.bank = None
    layer.router = None
    layer.last_expert_ids = layer.last_weights = None


def _prune_experts(layer: MoELoRALinear, keep: list[int], optimizers, tracker, *, original: list[int],
                   experts: int) -> None:
    if len(keep) == layer.bank.num_experts:
        return
    swapped, rows = keep_bank_experts(layer.bank, keep)
    for old, new in swapped.values():
        replace_param(optimizers, old, new, picked_rows(rows))
    index = torch.tensor(keep, dtype=torch.long)
    for old, new in layer.router.keep_experts(keep).values():
        replace_param(optimizers, old, new, picked_rows(index))
    tracker.expert_maps[layer.name] = ([original[e] for e in keep], experts)


def expand_ranks(model: nn.Module, optimizers=None, *, rank: int | None = None) -> dict[str, list[int]]:
    """WeightLoRA+: raise the kept heads' ranks after :func:`disconnect`, in place.

    Every kept expert's rank r becomes ``rank`` (default ``config.plus_rank``) or, when that is
    None, ``r · budget // kept`` (``budget``: A and B elements of all heads before disconnection;
    ``kept``: of the kept heads now), capped at ``min(d_in, d_out)``. New rows are initialised
    per ``config.plus_init`` so the outputs do not change; A and B are new (larger) parameters,
    put in their predecessors' place in ``optimizers`` with their state (new rows: zero moments).

    Returns:
        ``{layer name: new expert ranks}``.
    """
    config = weightlora_config(model)
    if config.stage != "disconnected":
        raise ValueError(f"expand_ranks runs once, right after disconnect (stage is {config.stage!r}).")
    rank = config.plus_rank if rank is None else rank
    optimizers = as_optimizers(optimizers)
    kept_params = lora_parameter_count(model)
    budget = config.param_budget or kept_params
    scheme = config.layer_config().init_lora_weights
    new_ranks = {}
    for layer in gated_layers(model):
        bank = layer.bank
        cap = min(bank.in_features, bank.out_features)
        if rank is not None and any(0 < r and rank < r for r in bank.ranks):
            raise ValueError(f"plus_rank={rank} is below a rank of {layer.name} ({list(bank.ranks)}); expected an "
                             "integer >= every kept expert's rank.")
        grown = [0 if r == 0 else max(r, min(cap, rank if rank is not None else r * budget // max(kept_params, 1)))
                 for r in bank.ranks]
        new_ranks[layer.name] = grown
        if grown == list(bank.ranks):
            continue
        gen = module_generator(config.seed, f"{layer.name}#plus")
        swapped, dest = grow_bank_ranks(bank, grown, plus_init=config.plus_init, scheme=scheme, generator=gen)
        for old, new in swapped.values():
            replace_param(optimizers, old, new, grown_rows(dest, new.shape[0]))
    ranks = dict(config.expert_ranks or {})
    ranks.update(new_ranks)
    get_state(model).config = dataclasses.replace(config, stage="expanded", expert_ranks=ranks)
    record_gates(model)
    return new_ranks


def record_gates(model: nn.Module) -> dict[str, dict]:
    """Snapshot every head's ω, status and ranks into the model's tracker (``tracker.gates``,
    which the dashboard records); returns it. Disconnected heads stay listed as such."""
    state = get_state(model)
    tracker = install_tracker(state)
    config = weightlora_config(model)
    layers = gated_layers(model)
    values = []
    if layers:
        values = torch.cat([layer.router.omega.detach().float().reshape(-1) for layer in layers]).cpu().tolist()
    start = 0
    for layer in layers:
        n = layer.router.omega.numel()
        entry = {"omega": [float(v) for v in values[start:start + n]], "status": "active",
                 "ranks": [int(r) for r in layer.bank.ranks]}
        start += n
        if config.over == "experts":
            entry["experts"] = list((config.kept_experts or {}).get(layer.name, range(layer.bank.num_experts)))
        tracker.gates[layer.name] = entry
    for name in config.disconnected:
        tracker.gates.setdefault(name, {"omega": [0.0], "status": "disconnected"})["status"] = "disconnected"
    return tracker.gates


@torch.no_grad()
def fold_omega(model: nn.Module) -> None:
    """After training: fold every ω into its experts' output scales (``scale_e ← ω · scale_e``) and
    set ω to 1, in place. The outputs do not change, and each bank alone then holds its head's
    delta (what any tool reading only the banks sees; :func:`moelora.export_lora_adapters` folds ω
    itself, so exporting does not need this).
    Not during the warm-up: with every ω at 1, thresholding would choose by position."""
    for layer in gated_layers(model):
        gate, bank = layer.router, layer.bank
        factor = gate.omega.detach().to(bank.scale.device, bank.scale.dtype)
        bank.scale.mul_(factor if gate.over == "experts" else factor[0])
        gate.omega.fill_(1.0)


def param_groups(model: nn.Module, *, omega_lr: float | None = None, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups for a plain loop: ``experts`` (LoRA A/B and ``modules_to_save``,
    ``weight_decay``), ``routers`` (inner routers of MoE heads, no decay) and ``omega`` (ω, no
    decay, lr ``omega_lr`` if given, else the optimizer's lr). Only trainable parameters."""
    omega, routers, rest = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (omega if name.endswith(".router.omega") else routers if ".router." in name else rest).append(p)
    groups = [{"params": rest, "name": "experts", "weight_decay": weight_decay},
              {"params": routers, "name": "routers", "weight_decay": 0.0},
              {"params": omega, "name": "omega", "weight_decay": 0.0, **({"lr": omega_lr} if omega_lr is not None else {})}]
    return [g for g in groups if g["params"]]


def restructure(model: nn.Module, saved: Mapping[str, Any] | WeightLoRAConfig) -> None:
    """Give ``model`` (a WeightLoRA model in warm-up) the layout of the live config ``saved``
    (a checkpoint's): disconnect its heads, prune its experts, grow its ranks. Weights of grown
    rows are placeholders, for the checkpoint's weights to be loaded next; no optimizer is touched."""
    saved = saved if isinstance(saved, WeightLoRAConfig) else config_from_dict(dict(saved))
    config = weightlora_config(model)
    if saved.stage == "warmup" or config.stage != "warmup":
        return
    state = get_state(model)
    for layer in gated_layers(model):
        if layer.name in saved.disconnected:
            _remove_head(model, layer, [], state)
            continue
        kept = (saved.kept_experts or {}).get(layer.name)
        if kept is not None:
            _prune_experts(layer, list(kept), [], state.tracker, original=list(range(layer.bank.num_experts)),
                           experts=layer.bank.num_experts)
        ranks = (saved.expert_ranks or {}).get(layer.name)
        if ranks is not None and list(ranks) != list(layer.bank.ranks):
            grow_bank_ranks(layer.bank, list(ranks), plus_init="zero_a")
    state.config = saved
    record_gates(model)


class WeightLoRAController:
    """Runs the WeightLoRA schedule of a model in any training loop.

    Call :meth:`step` once right after every ``optimizer.step()``. Optimizer step s (counted
    from 1) does, per the model's :class:`WeightLoRAConfig`:

    - ``threshold_start <= s < warmup_steps``: :func:`hard_threshold` (stochastic IHT);
    - ``s >= warmup_steps`` (once): :func:`disconnect`, then with ``plus`` :func:`expand_ranks`;
      the given optimizers are updated in place (removed / replaced parameters and state);
    - later steps, or a model loaded already disconnected: nothing.

    Args:
        model: a model holding a WeightLoRA adapter.
        steps_done: optimizer steps already taken (when resuming a plain loop).
    """

    def __init__(self, model: nn.Module, *, steps_done: int = 0) -> None:
        weightlora_config(model)
        self.model, self.steps_done = model, int(steps_done)

    @property
    def config(self) -> WeightLoRAConfig:
        return weightlora_config(self.model)

    def step(self, optimizer=None, *, step: int | None = None) -> str | None:
        """After an optimizer step. ``optimizer``: one, a list, or None; ``step``: the number of
        optimizer steps done (default: one more than last time). Returns what happened:
        ``None``, ``"threshold"``, ``"disconnect"`` or ``"expand"`` (disconnect and expansion)."""
        self.steps_done = self.steps_done + 1 if step is None else int(step)
        config = self.config
        if config.stage != "warmup" or self.steps_done < config.first_threshold_step:
            return None
        if self.steps_done < config.warmup_steps:
            hard_threshold(self.model)
            record_gates(self.model)
            return "threshold"
        if optimizer is None or (isinstance(optimizer, (list, tuple)) and not optimizer):
            warnings.warn("WeightLoRAController.step() disconnects heads now but got no optimizer: the optimizer "
                          "you train with still holds the removed parameters and not the replacements, so the kept "
                          "heads stop training. Pass it: controller.step(optimizer).", UserWarning, stacklevel=2)
        disconnect(self.model, optimizer)
        if config.plus:
            expand_ranks(self.model, optimizer)
            return "expand"
        return "disconnect"
