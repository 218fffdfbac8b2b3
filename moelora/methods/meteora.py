"""MeteoRA: off-the-shelf PEFT LoRA adapters fused as routed experts (arXiv 2405.13053).

    fused = moelora.from_lora_adapters(hf_model, {"math": "dir/a", "code": "dir/b"},
                                       config=moelora.MeteoRAConfig(top_k=2))
    moelora.set_task_ids(fused, task_ids)          # optional gate supervision, [batch, seq]
    loss = fused(**batch).loss + moelora.aux_loss(fused)
    with moelora.select_experts(fused, "math"):    # exactly adapter "math", as PEFT computes it
        ...

Every wrapped linear gets one expert per adapter (adapter i = expert i = gate output i, in the
order of the ``adapters`` mapping) with that adapter's own rank and scale; an adapter that does
not touch a module is a rank-0 expert there. Gates: :class:`moelora.routers.MeteoRARouter`.
Semantics and sources: research/methods.md §4, design §3.6.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from moelora import expert_space as space
from moelora.balance import recomputing
from moelora.checkpointing import set_forcing
from moelora.config import MoELoRAConfig, _fail, _is_number, register_config
from moelora.inject import attach_adapter, build_adapter
from moelora.layer import wrapped_layers
from moelora.lora_import import LoraAdapter, read_lora_adapter
from moelora.routers.meteora import MeteoRARouter
from moelora.state import STATE_ATTR, AdapterState, get_state
from moelora.targeting import ALL_LINEAR, name_matches

BASE_MISMATCH_POLICIES = ("warn", "raise", "ignore")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")  # fullmatch: "$" would let a trailing "\n" through


@register_config
@dataclass
class MeteoRAConfig(MoELoRAConfig):
    """MeteoRA: N imported LoRA adapters per wrapped linear, a top-k gate ``Linear(d_in, N)`` each.

    Training: ``softmax(W_g x)`` → top-k → renormalise; inference: top-k logits →
    ``softmax(v / temperature)``. Gate supervision by per-token task ids (``set_task_ids``) adds
    ``gate_loss_coef · CE`` over all gates to :func:`moelora.aux_loss`.

    Build with :func:`from_lora_adapters`, which fills ``target_modules`` (every module an
    adapter touches), ``num_experts`` (the number of adapters) and ``experts`` (provenance).
    ``rank``, ``alpha`` and ``use_rslora`` are not used for imported experts: each keeps its own
    adapter's rank and scale (``rank_pattern`` / ``alpha_pattern`` / rsLoRA included).
    Defaults that differ from :class:`MoELoRAConfig`: ``aux_loss_coef = 0`` (MeteoRA has no
    load-balancing loss) and ``target_modules = None``.
    """

    method: ClassVar[str] = "meteora"

    target_modules: list[str] | str | None = None
    """``None`` (default): wrap every module any adapter touches. A list / regex / ``"all-linear"``
    (PEFT rules) restricts the fusion to matching modules; adapters' LoRAs elsewhere are dropped
    with a warning. After fusion this holds the exact list of wrapped module names."""
    num_experts: int | None = None
    """N; filled in by :func:`from_lora_adapters` (must equal the number of adapters if set)."""
    top_k: int = 2
    """Adapters per token k (MeteoRA's released checkpoints use 2; 1 <= k <= N)."""
    temperature: float = 1.0
    """T of the inference softmax over the top-k logits (MeteoRA's code default 1; its README
    uses 15/20/30 for composite-3/5/10). Training ignores it, as MeteoRA does."""
    gate_loss_coef: float = 50.0
    """Weight of the gate-supervision cross-entropy, applied only in training and only for a
    forward whose task ids were set with :func:`set_task_ids` (MeteoRA's value: 50)."""
    train_loras: bool = False
    """Train the imported LoRA weights together with the gates (MeteoRA's released script does);
    ``False`` (default) trains the gates only and keeps every adapter exactly as imported."""
    allow_pickle: bool = False
    """Accept adapters that only ship the pickle ``adapter_model.bin`` (read with
    ``torch.load(weights_only=True)``); refused by default."""
    on_base_mismatch: str = "warn"
    """An adapter's ``base_model_name_or_path`` differs from the model's (or from another
    adapter's): ``"warn"`` (default), ``"raise"`` or ``"ignore"``. Shapes are always enforced."""
    max_adapter_bytes: int | None = 1 << 34
    """Refuse an adapter file whose tensors total more bytes than this (16 GiB); None = no bound."""
    adapters: dict[str, str] | None = None
    """``{expert name: PEFT LoRA directory}``, so a YAML / JSON config alone can build the model
    (``moelora.inject(model, config)`` then fuses them). ``from_lora_adapters``' own ``adapters``
    argument wins; the fused config records the directories used."""
    experts: list[dict[str, Any]] = field(default_factory=list)
    """Provenance, one entry per expert in gate order: name, path, weights file, sha256 and the
    adapter's LoRA settings. Filled in by :func:`from_lora_adapters`; saved with the adapter."""
    aux_loss_coef: float = 0.0
    """Switch load-balancing loss weight; 0 (off) as in MeteoRA."""
    adapter_heads: str = "refuse"
    """An adapter with trained ``modules_to_save`` copies (PEFT adds the classification head for
    ``SEQ_CLS``): ``"refuse"`` (default; one expert cannot carry its own head) or ``"drop"``
    (leave the copies out with a warning; the fused model uses its own head, trained when listed
    in ``modules_to_save``)."""

    def __post_init__(self) -> None:
        targets, num = self.target_modules, self.num_experts
        # The base checks need concrete values; None means "filled in by from_lora_adapters".
        if targets is None:
            self.target_modules = ["<from adapters>"]
        if num is None:
            k = self.top_k
            if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
                _fail("top_k", k, "an integer >= 1 (at most the number of adapters)")  # N is not known yet
            self.num_experts = k
        try:
            super().__post_init__()
        finally:
            if targets is None:
                self.target_modules = None
            if num is None:
                self.num_experts = None
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature <= 0:
            _fail("temperature", self.temperature, "a finite number > 0")
        if not _is_number(self.gate_loss_coef) or not math.isfinite(self.gate_loss_coef) or self.gate_loss_coef < 0:
            _fail("gate_loss_coef", self.gate_loss_coef, "a finite number >= 0")
        for name in ("train_loras", "allow_pickle"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "true or false")
        if self.adapter_heads not in ("refuse", "drop"):
            _fail("adapter_heads", self.adapter_heads, "'refuse' or 'drop'")
        if self.on_base_mismatch not in BASE_MISMATCH_POLICIES:
            _fail("on_base_mismatch", self.on_base_mismatch, f"one of {BASE_MISMATCH_POLICIES}")
        if self.max_adapter_bytes is not None and (not isinstance(self.max_adapter_bytes, int)
                                                   or isinstance(self.max_adapter_bytes, bool)
                                                   or self.max_adapter_bytes < 1):
            _fail("max_adapter_bytes", self.max_adapter_bytes, "an integer >= 1, or null for no bound")
        if self.adapters is not None and (not isinstance(self.adapters, dict) or not self.adapters or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.adapters.items())):
            _fail("adapters", self.adapters, "a non-empty object {expert name: PEFT LoRA directory}, or null")
        if not isinstance(self.experts, list) or not all(
                isinstance(e, dict) and isinstance(e.get("name"), str) for e in self.experts):
            _fail("experts", self.experts, "a list of provenance objects, each with a string 'name'")
        if self.experts and self.num_experts is not None and len(self.experts) != self.num_experts:
            _fail("experts", f"<{len(self.experts)} entries>", f"one entry per expert (num_experts={self.num_experts})")

    def inject_into(self, model: nn.Module) -> nn.Module | None:
        """``moelora.inject`` hook: fuse ``adapters`` into ``model``; ``None`` (plain injection of
        fresh experts, which needs ``target_modules`` and ``num_experts``) when there are none."""
        return from_lora_adapters(model, config=self) if self.adapters else None

    def make_router(self, *, in_features: int, generator=None) -> MeteoRARouter:
        """A :class:`~moelora.routers.MeteoRARouter` for one wrapped linear with ``in_features`` inputs."""
        if self.num_experts is None:
            raise ValueError("MeteoRAConfig.num_experts is unset: build MeteoRA models with "
                             "moelora.from_lora_adapters(model, {name: dir}, config).")
        return MeteoRARouter(in_features=in_features, num_experts=self.num_experts, top_k=self.top_k,
                             temperature=self.temperature, renormalize=self.renormalize,
                             noise_std=self.router_noise_std, gate_loss_coef=self.gate_loss_coef,
                             init_std=self.router_init_std, generator=generator)


# ---------------------------------------------------------------------------------------- fusion
def from_lora_adapters(model: nn.Module, adapters: Mapping[str, Any] | None = None,
                       config: MeteoRAConfig | None = None) -> nn.Module:
    """Fuse PEFT LoRA adapter directories into ``model`` as routed experts, in place (MeteoRA).

    Args:
        model: the base model the adapters were trained on (no moelora adapter yet). Module
            names must match the adapters' keys, so load the same class (e.g.
            ``AutoModelForCausalLM``) the adapters were made with.
        adapters: ``{expert name: PEFT LoRA directory}``; the order is the gate order (and the
            task-id order for :func:`set_task_ids`). Names are used as export directory names:
            letters, digits, ``_ . -``. Default: ``config.adapters``.
        config: a :class:`MeteoRAConfig` (default ``MeteoRAConfig()``).

    Returns:
        The same ``model``, with every module any adapter touches wrapped; gates trainable, the
        LoRAs trainable only with ``config.train_loras``.

    Raises:
        FileNotFoundError / ValueError / TypeError: bad names, paths, files, configs, keys,
            shapes, dtypes or values (all checked first); the model is then left unchanged.
    """
    config = MeteoRAConfig() if config is None else config
    if not isinstance(config, MeteoRAConfig):
        raise TypeError(f"config must be a MeteoRAConfig, got {type(config).__name__}")
    adapters = config.adapters if adapters is None else adapters
    names = _check_adapter_names(adapters)
    if getattr(model, STATE_ATTR, None) is not None or wrapped_layers(model):
        raise ValueError("this model already holds a moelora adapter; call moelora.unwrap(model) first, "
                         "or pass a fresh base model.")
    n = len(names)
    if config.top_k > n:
        raise ValueError(f"MeteoRAConfig.top_k={config.top_k} but only {n} adapter(s) were given; "
                         f"set top_k <= {n}.")
    if config.num_experts is not None and config.num_experts != n:
        raise ValueError(f"MeteoRAConfig.num_experts={config.num_experts} but {n} adapters were given; "
                         "leave num_experts unset (it is filled in from the adapters).")
    loaded = [read_lora_adapter(name, adapters[name], model, allow_pickle=config.allow_pickle,
                                max_bytes=config.max_adapter_bytes, drop_heads=config.adapter_heads == "drop")
              for name in names]
    _check_bases(model, loaded, config.on_base_mismatch)
    _check_unchanged(loaded, config.experts)
    targets = _select_modules(model, loaded, config)
    fused = dataclasses.replace(config, target_modules=targets, num_experts=n,
                                adapters={a.name: str(Path(adapters[a.name]).expanduser().resolve()) for a in loaded},
                                experts=[a.provenance() for a in loaded])
    ranks = {m: [a.modules[m].rank if m in a.modules else 0 for a in loaded] for m in targets}
    scales = {m: [a.modules[m].scale if m in a.modules else 0.0 for a in loaded] for m in targets}
    plan = build_adapter(model, fused, expert_ranks=ranks, expert_scales=scales)
    if plan.state.wrapped != targets:  # a full name also suffix-matched another module
        raise ValueError(f"module names {sorted(set(plan.state.wrapped) ^ set(targets))[:5]} are ambiguous "
                         "in this model; restrict MeteoRAConfig.target_modules.")
    for name in targets:
        layer = plan.modules[name]
        for i, adapter in enumerate(loaded):
            if name in adapter.modules:
                lora = adapter.modules[name]
                layer.bank.set_lora_pair(i, lora.lora_A, lora.lora_B)
        layer.bank.requires_grad_(fused.train_loras)
        layer.router.bind_state(plan.state)
    attach_adapter(model, plan)
    return model


def _check_adapter_names(adapters: Any) -> list[str]:
    if not isinstance(adapters, Mapping) or not adapters:
        raise TypeError("adapters must be a non-empty mapping {expert name: PEFT LoRA directory} (the argument, "
                        f"or MeteoRAConfig.adapters), got {type(adapters).__name__}")
    names = list(adapters)
    bad = [n for n in names if not isinstance(n, str) or not _NAME_RE.fullmatch(n) or n in (".", "..")]
    if bad:
        raise ValueError(f"adapter names {bad} are invalid: use letters, digits and '_', '.', '-' (they "
                         "become export directory names).")
    return names


def _same_base(a: str, b: str) -> bool:
    """Same model, allowing a hub id vs a local snapshot directory of it."""
    a, b = str(a).rstrip("/\\"), str(b).rstrip("/\\")
    return a == b or Path(a).name.lower() == Path(b).name.lower()


def _check_bases(model: nn.Module, loaded: list[LoraAdapter], policy: str) -> None:
    """Compare every adapter's ``base_model_name_or_path`` with the model and with each other."""
    if policy == "ignore":
        return
    ours = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    issues = []
    claimed = [(a.name, a.config.get("base_model_name_or_path")) for a in loaded]
    for name, base in claimed:
        if base and ours and not _same_base(base, ours):
            issues.append(f"adapter {name!r} was trained on {base!r}, the model is {ours!r}")
    named = [(n, b) for n, b in claimed if b]
    if not ours and any(not _same_base(b, named[0][1]) for _, b in named[1:]):
        issues.append(f"the adapters name different base models: {dict(named)}")
    if not issues:
        return
    message = ("base model mismatch: " + "; ".join(issues) + ". PEFT does not check this; outputs may be "
               "meaningless if the weights differ. Set MeteoRAConfig(on_base_mismatch='ignore') if intended.")
    if policy == "raise":
        raise ValueError(message)
    warnings.warn(message, UserWarning, stacklevel=3)


def _check_unchanged(loaded: list[LoraAdapter], recorded: list[dict[str, Any]]) -> None:
    """Re-fusing from a saved config: warn when an adapter file is not the one recorded."""
    by_name = {e.get("name"): e for e in recorded}
    changed = [a.name for a in loaded if a.name in by_name and by_name[a.name].get("sha256") not in (None, a.sha256)]
    if changed:
        warnings.warn(f"adapter file(s) of {changed} differ from the sha256 recorded in the config (the adapters "
                      "changed since the fusion this config comes from).", UserWarning, stacklevel=3)


def _select_modules(model: nn.Module, loaded: list[LoraAdapter], config: MeteoRAConfig) -> list[str]:
    """Modules to wrap, in model order: those any adapter touches, filtered by the config."""
    touched = set().union(*(a.modules for a in loaded))
    order = [n for n, _ in model.named_modules() if n in touched]
    wanted = config.target_modules
    keep = [n for n in order if (wanted is None or wanted == ALL_LINEAR or name_matches(n, wanted))
            and not name_matches(n, config.exclude_modules)]
    if not keep:
        raise ValueError(f"MeteoRAConfig.target_modules={wanted!r} / exclude_modules={config.exclude_modules!r} "
                         f"leave none of the adapters' modules (e.g. {order[:5]}); widen them or leave "
                         "target_modules unset.")
    dropped = [n for n in order if n not in keep]
    if dropped:
        warnings.warn(f"MeteoRA fusion skips {len(dropped)} module(s) the adapters touch but "
                      f"target_modules/exclude_modules exclude, e.g. {dropped[:5]}: those adapters will not "
                      "match their PEFT outputs.", UserWarning, stacklevel=3)
    return keep


# ------------------------------------------------------------------------------ gate supervision
class _TaskIdConsumer:
    """Forward pre-hook: task ids set for one forward are dropped at the start of the next one.

    They are not cleared at the end of their forward: activation checkpointing recomputes the
    forward inside backward, and the gates must see the same ids there.
    """

    def __init__(self, state: AdapterState) -> None:
        self.state, self.seen = state, None

    def __call__(self, module, args, kwargs):
        if recomputing():  # the model's forward run again in backward (checkpointed as a whole)
            return
        if self.state.task_ids is not None and self.state.task_ids is self.seen:
            self.state.task_ids = None  # set for an earlier forward: never reuse it
        self.seen = ids = self.state.task_ids
        tokens = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
        if ids is not None and ids.dim() == 2 and isinstance(tokens, Tensor) and tokens.dim() >= 2 \
                and tuple(ids.shape) != tuple(tokens.shape[:2]):
            self.state.task_ids = self.seen = None
            raise ValueError(f"task_ids are {tuple(ids.shape)} but this forward's batch is {tuple(tokens.shape[:2])} "
                             "[batch, seq]: a transposed or misaligned tensor would supervise the wrong tokens.")


_CONSUMERS: "weakref.WeakKeyDictionary[nn.Module, _TaskIdConsumer]" = weakref.WeakKeyDictionary()


def meteora_gates(model: nn.Module) -> list[tuple[nn.Module, MeteoRARouter]]:
    """``(layer, gate)`` for every MeteoRA gate of ``model`` in module order, including gates
    wrapped by another router (WeightLoRA's ω over a MeteoRA fusion)."""
    out = []
    for layer in wrapped_layers(model):
        router = layer.router
        gate = router if isinstance(router, MeteoRARouter) else getattr(router, "inner", None)
        if isinstance(gate, MeteoRARouter):
            out.append((layer, gate))
    return out


def meteora_routers(model: nn.Module) -> list[MeteoRARouter]:
    """The MeteoRA gates of ``model``, in module order."""
    return [gate for _, gate in meteora_gates(model)]


def set_task_ids(model: nn.Module, task_ids: Tensor | None) -> None:
    """Per-token task ids for the next forward of ``model`` (MeteoRA gate supervision).

    Call it right before the forward whose batch carries task ids, e.g. in a Lightning
    ``training_step``::

        moelora.set_task_ids(model, batch.pop("task_ids", None))   # [batch, seq] or None
        out = model(**batch)
        loss = out.loss + moelora.aux_loss(model)

    In training mode, with ``gate_loss_coef > 0``, every MeteoRA gate then adds its share of
    ``gate_loss_coef · CE(logits of all gates, task ids)`` to :func:`moelora.aux_loss`; tokens
    with a negative id or masked out by ``attention_mask`` are not supervised. No shift is applied
    (the gate at token t is supervised by ``task_ids[t]``). A gate on a per-sequence layer (BERT's
    pooler) is supervised by each sequence's id when every sequence holds one id. The ids are also kept on
    ``model._moelora_state.task_ids`` for per-task routing statistics, for any method.

    Args:
        model: a moelora model.
        task_ids: integer tensor with one id per token of the next forward (``[batch, seq]``, as
            ``input_ids``): the index of the adapter (in ``from_lora_adapters`` order) the token's
            task belongs to, negative (e.g. -100) for no supervision. ``None`` clears them.

    The ids apply to exactly one forward (and its activation-checkpoint recomputation), then are
    dropped at the start of the next forward; a forward whose token count differs raises.

    Raises:
        TypeError: not an integer tensor. ValueError: an id >= the number of adapters.
    """
    state = get_state(model)
    if task_ids is None:
        state.task_ids = None
        return
    if not isinstance(task_ids, Tensor) or task_ids.is_floating_point() or task_ids.is_complex() \
            or task_ids.dtype == torch.bool:
        raise TypeError(f"task_ids must be an integer tensor [batch, seq] (one id per token), got "
                        f"{getattr(task_ids, 'dtype', type(task_ids).__name__)}")
    if task_ids.dim() not in (1, 2):
        raise ValueError(f"task_ids must be [batch, seq] like input_ids (or [tokens]), got shape {tuple(task_ids.shape)}")
    ids = task_ids.detach().to(torch.long).clone()  # a fresh object: see _TaskIdConsumer
    gates = meteora_gates(model)
    count = space.num_experts(state.config, gates[0][1].num_experts) if gates else 0
    if gates and ids.numel() and int(ids.max()) >= count:
        raise ValueError(f"task_ids holds id {int(ids.max())} but the model fuses {count} "
                         f"adapters (ids 0..{count - 1}, negative = ignore).")
    for layer, router in gates:
        router.bind_state(state)
        origin = space.layer_origin(state.config, layer.name)
        router.task_lookup = None if origin is None else tuple(space.lookup(origin, count).tolist())
    consumer = _CONSUMERS.get(model)
    if consumer is None or consumer.state is not state:
        consumer = _TaskIdConsumer(state)
        state.handles.append(model.register_forward_pre_hook(consumer, with_kwargs=True))
        _CONSUMERS[model] = consumer
    state.task_ids = ids


# ------------------------------------------------------------------------------- static routing
def expert_names(model: nn.Module) -> list[str]:
    """Expert names in the model-wide numbering (gate order before any WeightLoRA pruning): the
    adapters' names, or ``expert_<i>`` for non-imported ones."""
    state = get_state(model)
    layers = wrapped_layers(model)
    n = space.num_experts(state.config, layers[0].bank.num_experts) if layers else 0
    return space.expert_names(state.config, n)


def resolve_expert_weights(names: list[str], weights: Any) -> Tensor:
    """``[N]`` float64 weights from an expert name or index, ``{name or index: w}`` (others 0) or
    N numbers, for experts ``names``; must be finite and not all zero."""
    n = len(names)
    if isinstance(weights, str) or (isinstance(weights, int) and not isinstance(weights, bool)):
        weights = {weights: 1.0}
    if isinstance(weights, Tensor) and weights.dim() != 1:
        raise ValueError(f"expert weights as a tensor must be 1-D with {n} entries (experts {names}); got shape "
                         f"{tuple(weights.shape)}.")
    if isinstance(weights, Mapping):
        out = torch.zeros(n, dtype=torch.float64)
        seen: dict[int, Any] = {}
        for key, w in weights.items():
            index = names.index(key) if isinstance(key, str) and key in names else key
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n:
                raise ValueError(f"unknown expert {key!r}; experts are {names} (or indices 0..{n - 1}).")
            if index in seen:
                raise ValueError(f"expert {names[index]!r} is given twice ({seen[index]!r} and {key!r}).")
            seen[index] = key
            out[index] = _weight(w, key)
    elif isinstance(weights, (Sequence, Tensor)) and len(weights) == n:
        out = torch.as_tensor([_weight(w, i) for i, w in enumerate(weights)], dtype=torch.float64)
    else:
        raise ValueError(f"expert weights must be an expert name or index, a {{name: weight}} mapping, or "
                         f"{n} numbers (experts {names}); got {weights!r}.")
    if not torch.isfinite(out).all() or not (out != 0).any():
        raise ValueError(f"expert weights {out.tolist()} must be finite and not all zero.")
    return out


def _weight(value: Any, key: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expert weight for {key!r} is {value!r}, not a number.") from None


@contextlib.contextmanager
def select_experts(model: nn.Module, weights: Any) -> Iterator[nn.Module]:
    """Inside the block every MeteoRA gate routes every token to fixed experts.

    ``weights`` is an expert name or index (exactly that adapter: the model computes what PEFT
    computes with that adapter active), or ``{name: w}`` / N numbers for a static mixture
    ``Σ_i w_i · scale_i B_i A_i x`` (weights used as given, not renormalised; what
    :func:`moelora.collapse_lora_adapters` exports).
    """
    gates = meteora_gates(model)
    if not gates:
        raise ValueError("select_experts needs a MeteoRA model (built with moelora.from_lora_adapters).")
    forced = resolve_expert_weights(expert_names(model), weights).float()
    state = get_state(model)
    previous = state.forcing
    # Kept in the state: checkpoint recomputations replay it. Each layer gets the weights of the
    # adapters it still has (WeightLoRA may drop some), in its own numbering.
    set_forcing(state, tuple((r, layer.name, forced) for layer, r in gates))
    try:
        yield model
    finally:
        set_forcing(state, previous)
