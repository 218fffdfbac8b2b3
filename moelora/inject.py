"""Put MoE-LoRA layers into a model and take them out again (PEFT-style, in place).

``inject`` validates everything before it changes anything: on any error the model is exactly
as it was.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import warnings
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .checkpointing import ReplayingCheckpoint
from .config import MoELoRAConfig
from .experts import ExpertBank
from .layer import MoELoRALinear, wrapped_layers
from .state import STATE_ATTR, AdapterState, get_state
from .targeting import find_targets, linear_features, name_matches


class SavedModule(nn.Module):
    """A ``modules_to_save`` entry: a trainable copy in front of the untouched original.

    Its state-dict keys are ``<path>.trained_module.*``; ``unwrap`` puts the original back. Inside
    :func:`disable_adapters` (``state.enabled`` False) the original runs, as in PEFT.
    """

    def __init__(self, original: nn.Module, state: AdapterState | None = None) -> None:
        super().__init__()
        self.original_module = original
        self.trained_module = copy.deepcopy(original)
        for p in self.trained_module.parameters():
            p.requires_grad_(True)
        object.__setattr__(self, "_state", state)  # not a submodule: shared by every layer

    def forward(self, *args, **kwargs):
        state = self.__dict__.get("_state")
        if state is not None and not state.enabled:
            return self.original_module(*args, **kwargs)
        return self.trained_module(*args, **kwargs)


def module_generator(seed: int | None, name: str) -> torch.Generator | None:
    """A CPU generator seeded from ``(seed, name)``, or ``None`` (global RNG) when seed is None."""
    if seed is None:
        return None
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _module_device(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def _find_saved_modules(model: nn.Module, names: Sequence[str] | None) -> list[str]:
    if not names:
        return []
    found = [n for n, _ in model.named_modules() if n and name_matches(n, list(names))]
    # Keep only outermost matches: wrapping a module and its own child would save it twice.
    found = [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]
    missing = [want for want in names if not any(name_matches(n, [want]) for n in found)]
    if missing:
        raise ValueError(f"modules_to_save entries {missing} match no module of {type(model).__name__}.")
    return found


def inject(model: nn.Module, config: MoELoRAConfig, *,
           expert_ranks: Mapping[str, Sequence[int]] | None = None,
           expert_scales: Mapping[str, Sequence[float]] | None = None) -> nn.Module:
    """Wrap ``config.target_modules`` of ``model`` with MoE-LoRA layers, freeze the rest, in place.

    Args:
        model: any ``nn.Module`` (usually a ``transformers`` model).
        config: a :class:`~moelora.config.MoELoRAConfig` (or a method subclass).
        expert_ranks: optional per-module list of expert ranks (heterogeneous banks, rank 0
            allowed), keyed by module name; default ``[config.rank] * num_experts``.
        expert_scales: optional per-module list of expert output scales; default
            ``config.lora_scale`` for every expert.

    Returns:
        The same ``model`` object, now holding the adapter.

    Raises:
        ValueError: the model already holds a moelora adapter, no module matched, a matched
            module is not a linear layer, or a ``modules_to_save`` entry matched nothing.
    """
    custom = getattr(config, "inject_into", None)  # configs built from files (MeteoRA: PEFT LoRA dirs)
    if callable(custom) and expert_ranks is None and expert_scales is None and custom(model) is not None:
        return model
    plan = build_adapter(model, config, expert_ranks=expert_ranks, expert_scales=expert_scales)
    attach_adapter(model, plan)
    return model


class AdapterPlan:
    """New modules built for a model but not yet put into it (see :func:`build_adapter`)."""

    def __init__(self, state: AdapterState, modules: dict[str, nn.Module]) -> None:
        self.state, self.modules = state, modules
        # Callables ``install(model) -> [hook handles]`` that attach_adapter runs once the modules
        # are in place (methods whose experts sit between modules, such as MoA's per-block
        # router); their handles are removed by unwrap.
        self.hooks: list = []

    def adapter_tensors(self) -> dict[str, Tensor]:
        """Model-level state-dict keys and tensors of everything the adapter saves."""
        return {f"{name}.{key}": t for name, module in self.modules.items()
                for key, t in adapter_state_dict(module).items()}


def adapter_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The saved part of one adapter module: experts and router (wrapped layer) or the trained copy."""
    skip = ("base_layer.", "original_module.")
    return {k: v for k, v in module.state_dict().items() if not k.startswith(skip)}


def build_adapter(model: nn.Module, config: MoELoRAConfig, *,
                  expert_ranks: Mapping[str, Sequence[int]] | None = None,
                  expert_scales: Mapping[str, Sequence[float]] | None = None) -> AdapterPlan:
    """Validate and build every adapter module for ``model`` without touching ``model``."""
    if not isinstance(config, MoELoRAConfig):
        raise TypeError(f"config must be a MoELoRAConfig (or a method config), got {type(config).__name__}")
    if getattr(model, STATE_ATTR, None) is not None or wrapped_layers(model):
        raise ValueError("this model already holds a moelora adapter; call moelora.unwrap(model) before "
                         "injecting again.")
    build_plan = getattr(config, "build_plan", None)  # methods spanning more than one linear (MoA blocks)
    if callable(build_plan):
        return build_plan(model, expert_ranks=expert_ranks, expert_scales=expert_scales)
    saved = _find_saved_modules(model, config.modules_to_save)
    targets = find_targets(model, config.target_modules, config.exclude_modules, skip=set(saved))
    state = AdapterState(config=config, wrapped=list(targets), saved_modules=list(saved))
    modules: dict[str, nn.Module] = {}
    for name in targets:
        modules[name] = build_layer(config, base_layer=model.get_submodule(name), name=name, state=state,
                                    ranks=(expert_ranks or {}).get(name), scales=(expert_scales or {}).get(name),
                                    generator=module_generator(config.seed, name))
    for name in saved:
        modules[name] = SavedModule(model.get_submodule(name), state)
    return AdapterPlan(state, modules)


def build_layer(config: MoELoRAConfig, *, base_layer: nn.Module, name: str, state: AdapterState,
                ranks: Sequence[int] | None = None, scales: Sequence[float] | None = None,
                generator: torch.Generator | None = None) -> nn.Module:
    """The wrapped layer ``config`` builds around ``base_layer`` (module ``name``), not yet placed.

    A config with a ``make_layer`` hook (FlyLoRA, WeightLoRA) builds it itself and checks
    ``ranks`` / ``scales`` itself; otherwise an :class:`ExpertBank` plus ``config.make_router``
    in a :class:`MoELoRALinear`. Methods that wrap another method's layers call this with that
    method's config.

    Args:
        ranks: per-expert ranks (a saved adapter's on load), default ``[config.rank] * num_experts``.
        scales: per-expert output scales, default ``config.lora_scale`` for every expert.
        generator: RNG for the init (``inject`` seeds it from ``(config.seed, name)``).
    """
    d_in, d_out = linear_features(base_layer)
    dtype = getattr(torch, config.adapter_dtype)
    device = _module_device(base_layer)
    make_layer = getattr(config, "make_layer", None)  # methods with their own layer (FlyLoRA)
    if callable(make_layer):
        return make_layer(base_layer=base_layer, name=name, state=state, in_features=d_in, out_features=d_out,
                          ranks=None if ranks is None else list(ranks),
                          scales=None if scales is None else list(scales), dtype=dtype, device=device,
                          generator=generator)
    ranks = list(ranks) if ranks is not None else [config.rank] * config.num_experts
    if len(ranks) != config.num_experts:
        raise ValueError(f"{name}: got {len(ranks)} expert ranks for num_experts={config.num_experts}")
    scales = list(scales) if scales is not None else [config.lora_scale] * config.num_experts
    bank = ExpertBank(in_features=d_in, out_features=d_out, ranks=ranks, scales=scales,
                      init=config.init_lora_weights, dtype=dtype, generator=generator).to(device)
    if not getattr(config, "train_loras", True):  # MeteoRA trains its gates only by default
        bank.requires_grad_(False)
    router = config.make_router(in_features=d_in, generator=generator).to(device)
    if config.num_experts == 1:  # a softmax over one expert is 1 for every token: the router never learns
        router.requires_grad_(False)
    return MoELoRALinear(base_layer=base_layer, bank=bank, router=router, name=name, state=state,
                         dropout=config.dropout, backend=config.backend)


def attach_adapter(model: nn.Module, plan: AdapterPlan) -> None:
    """Put a built plan into ``model``: freeze the base, swap modules in, install the mask hooks."""
    state = plan.state
    for pname, param in model.named_parameters():
        state.requires_grad[pname] = param.requires_grad
        param.requires_grad_(False)
    for name, module in plan.modules.items():
        parent, child = _parent(model, name)
        replaced = getattr(parent, child, None)
        setattr(parent, child, module)
        # A new module starts in training mode. It takes the mode of what it replaces: a model
        # from ``from_pretrained`` is in eval mode, where SiRA's expert dropout, its training
        # capacity and FlyLoRA's bias update must not run.
        module.train(replaced.training if isinstance(replaced, nn.Module) else parent.training)
    setattr(model, STATE_ATTR, state)
    state.handles = [
        model.register_forward_pre_hook(_CaptureMask(state), with_kwargs=True),
        model.register_forward_hook(_ReleaseMask(state), always_call=True),
    ]
    for install in getattr(plan, "hooks", ()):
        state.handles.extend(install(model))


class _CaptureMask:
    """Forward pre-hook: the flattened ``attention_mask`` of this forward (a keyword, or the
    positional argument of that name in the model's ``forward``) becomes the token mask. It also
    makes every transformers checkpointed layer carry that mask into its recomputation
    (:class:`ReplayingCheckpoint`).

    A class, not a closure, so injected models stay picklable (``ddp_spawn``, ``deepcopy``)."""

    def __init__(self, state: AdapterState) -> None:
        self.state = state
        self.position: int | None = -1   # of attention_mask among forward's positional args; -1 = not read yet
        self.checkpointed: list[nn.Module] | None = None

    def __call__(self, module, args, kwargs) -> None:
        self.state.tracker.flush()  # what a compiled forward could not record (LoadTracker)
        mask = kwargs.get("attention_mask")
        if mask is None and args:
            if self.position == -1:
                self.position = _positional_index(module.forward, "attention_mask")
            if self.position is not None and self.position < len(args):
                mask = args[self.position]
        self.state.token_mask = real_token_mask(mask)
        self.state.in_forward = True
        if self.checkpointed is None:
            self.checkpointed = [m for m in module.modules() if hasattr(m, "gradient_checkpointing")]
        for m in self.checkpointed:  # gradient_checkpointing_enable() may have run since the last forward
            func = m.__dict__.get("_gradient_checkpointing_func")
            if func is not None and not isinstance(func, ReplayingCheckpoint):
                m._gradient_checkpointing_func = ReplayingCheckpoint(func, self.state)


def real_token_mask(attention_mask) -> Tensor | None:
    """``[B·S]`` bool mask of the real (non-padding) tokens of a forward, from its ``attention_mask``;
    ``None`` when it tells nothing (then every token counts as real).

    - 2-D ``[B, S]``, 1 = real token: as is.
    - 3-D ``[B, Q, K]`` / 4-D ``[B, heads, Q, K]``, as transformers' static-cache ``generate`` and
      packed training pass: bool (True = may attend) or additive float (0 = may attend, a large
      negative number = masked). A query that may attend no key is padding (left padding); when
      ``Q == K`` (no cache) so is one that may not attend itself (its own key is masked: right
      padding). Read on the device: no sync.
    - a dict of such masks (per attention type): its ``"full_attention"`` entry.
    """
    mask = attention_mask
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values()), None))
    if not isinstance(mask, Tensor) or mask.dim() not in (2, 3, 4):
        return None
    if mask.dim() == 2:
        return mask.reshape(-1).bool()
    scores = mask if mask.dim() == 3 else mask[:, 0]
    allowed = scores > torch.finfo(scores.dtype).min / 2 if scores.is_floating_point() else scores.bool()
    real = allowed.any(-1)                                    # [B, Q]
    if allowed.shape[1] == allowed.shape[2]:
        real = real & allowed.diagonal(dim1=1, dim2=2)
    return real.reshape(-1)


def _positional_index(forward, name: str) -> int | None:
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional.index(name) if name in positional else None


class _ReleaseMask:
    """Forward hook: keep the mask for activation-checkpoint recomputation (which runs after
    the forward returned, in backward) and clear it for anything else."""

    def __init__(self, state: AdapterState) -> None:
        self.state = state

    def __call__(self, module, args, output) -> None:
        self.state.last_token_mask, self.state.token_mask = self.state.token_mask, None
        self.state.in_forward = False


def unwrap(model: nn.Module) -> nn.Module:
    """Remove the adapter: put every original module back and restore ``requires_grad`` flags."""
    state = get_state(model)
    for name in state.wrapped:
        parent, child = _parent(model, name)
        setattr(parent, child, getattr(parent, child).base_layer)
    for name in state.saved_modules:
        parent, child = _parent(model, name)
        original = getattr(parent, child).original_module
        if original is None:  # a module the adapter added (MoA's per-block holder), not a wrapper
            delattr(parent, child)
        else:
            setattr(parent, child, original)
    for handle in state.handles:
        handle.remove()
    for module in model.modules():
        func = module.__dict__.get("_gradient_checkpointing_func")
        if isinstance(func, ReplayingCheckpoint):
            module._gradient_checkpointing_func = func.inner
    for pname, param in model.named_parameters():
        if pname in state.requires_grad:
            param.requires_grad_(state.requires_grad[pname])
    delattr(model, STATE_ATTR)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside it, the model computes its base outputs only (no routing recorded)."""
    state = get_state(model)
    previous, state.enabled = state.enabled, False
    try:
        yield model
    finally:
        state.enabled = previous


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of every router's auxiliary loss from the last forward (coefficients applied).

    Each layer's loss is handed out once (then forgotten, so the graph is not kept alive): call
    it once per forward, after the forward. Returns a zero scalar when no router has an aux loss
    (eval mode, or all coefficients 0). A forward inside :func:`disable_adapters` routes nothing
    and leaves the pending losses alone, so a base-model forward (a KL reference) between the
    adapted forward and this call does not drop them; a loss never collected stays pending until
    the next routed forward replaces it.
    """
    get_state(model)
    layers = wrapped_layers(model)
    if any(layer._aux_detached for layer in layers):
        warnings.warn("moelora aux loss was computed without autograd, so it cannot train the routers: "
                      "this happens under reentrant activation checkpointing or torch.no_grad(). Use "
                      "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}).",
                      RuntimeWarning, stacklevel=2)
    losses = [loss for layer in layers if (loss := layer.pop_aux_loss()) is not None]
    if not losses:
        device = layers[0].bank.A.device if layers else torch.device("cpu")
        return torch.zeros((), device=device)
    dtype = torch.float64 if any(loss.dtype == torch.float64 for loss in losses) else torch.float32
    return torch.stack([loss.to(dtype) for loss in losses]).sum()  # at least fp32; float64 routers keep it


def routing_stats(model: nn.Module, *, sync: bool = False):
    """The model's :class:`~moelora.tracker.LoadTracker` (per-layer counts, probs, drops, entropy).

    Args:
        sync: return a copy summed across distributed ranks (a collective: call it on every rank).
    """
    tracker = get_state(model).tracker
    return tracker.reduced() if sync else tracker


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (PEFT's ``print_trainable_parameters`` numbers)."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
