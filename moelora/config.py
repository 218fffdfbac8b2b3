"""Dataclass configs for every moelora method.

Each config validates itself in ``__post_init__``: a bad value raises ``ValueError`` naming the
field (as spelled in YAML / JSON) and the values it accepts. Configs serialise to plain JSON
dicts with a ``"method"`` key and load back through :func:`config_from_dict`, which is also how
a saved adapter finds its config class.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

_CONFIG_REGISTRY: dict[str, type["MoELoRAConfig"]] = {}

ADAPTER_DTYPES = ("float32", "bfloat16", "float16", "float64")
INIT_SCHEMES = ("kaiming", "gaussian")


def register_config(cls: type["MoELoRAConfig"]) -> type["MoELoRAConfig"]:
    """Class decorator: make ``cls`` loadable by its ``method`` name."""
    _CONFIG_REGISTRY[cls.method] = cls
    return cls


def _fail(field_name: str, value: Any, expected: str) -> None:
    raise ValueError(f"config field `{field_name}` = {value!r} is invalid: expected {expected}.")


def _check_names(field_name: str, value: Any, *, allow_none: bool) -> Any:
    """Targets are PEFT-style: a list of names / suffixes, or one full-match regex string."""
    if value is None:
        if not allow_none:
            _fail(field_name, value, 'a list of module names, a regex string, or "all-linear"')
        return None
    if isinstance(value, str):
        if not value:
            _fail(field_name, value, "a non-empty regex string or a list of module names")
        return value
    if isinstance(value, (list, tuple, set)):
        names = list(value)
        if not names or not all(isinstance(n, str) and n for n in names):
            _fail(field_name, value, "a non-empty list of non-empty module-name strings")
        return names
    _fail(field_name, value, "a list of module names or a regex string")


@register_config
@dataclass
class MoELoRAConfig:
    """Plain top-k MoE-LoRA ("MoLoRA"): per wrapped linear, E LoRA experts and a softmax router.

    ``y = base(x) + Σ_{j<k} w_j · (α/r) · B_{e_j} A_{e_j} dropout(x)`` with
    ``(e, w) = renormalise(topk(softmax(W_g x)))``.
    """

    method: ClassVar[str] = "moelora"

    target_modules: list[str] | str | None = None
    """Which modules to wrap. A list matches a module whose name equals an entry or ends with
    ``"." + entry``; a string is a full-match regex; ``"all-linear"`` wraps every linear layer
    except the output head (PEFT's rules)."""
    exclude_modules: list[str] | str | None = None
    """Same matching rules as ``target_modules``; an excluded module is never wrapped."""
    modules_to_save: list[str] | None = None
    """Modules (e.g. a fresh classification head) trained in full and saved with the adapter.
    Matched like a ``target_modules`` list; the originals come back on ``unwrap``."""
    rank: int = 8
    """LoRA rank r of every expert."""
    alpha: float = 16.0
    """LoRA alpha: each expert's output is scaled by alpha / r (alpha / sqrt(r) with rsLoRA)."""
    use_rslora: bool = False
    """Scale by alpha / sqrt(r) instead of alpha / r (rank-stabilised LoRA)."""
    dropout: float = 0.0
    """Dropout probability on the expert input (training only); the router sees the clean x."""
    num_experts: int = 4
    """Number of LoRA experts E per wrapped linear."""
    top_k: int = 2
    """Experts per token k (1 <= k <= num_experts)."""
    renormalize: bool = True
    """Divide the kept top-k probabilities by their sum (so they sum to 1)."""
    router_noise_std: float = 0.0
    """Std of Gaussian noise added to router logits in training (0 = off)."""
    router_init_std: float = 0.02
    """Router weights are initialised N(0, router_init_std²). 0 starts every token with uniform
    probabilities, so each picks experts 0..k-1 (ties go to the lowest index) until the router
    learns."""
    aux_loss_coef: float = 0.01
    """Weight of the Switch load-balancing loss ``E · Σ_e f_e · P_e`` (0 = off)."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss ``mean(logsumexp(logits)²)`` (0 = off)."""
    init_lora_weights: str = "kaiming"
    """Init of A: ``"kaiming"`` (PEFT's default, kaiming-uniform a=√5) or ``"gaussian"``
    (N(0, 1/r²), PEFT's). B always starts at zero so the wrapped model starts equal to the base."""
    seed: int | None = None
    """If set, adapter weights are drawn from a generator seeded by (seed, module name), so the
    same config gives the same init whatever the injection order."""
    adapter_dtype: str = "float32"
    """Dtype of expert and router weights; the LoRA path computes in it and casts back."""
    backend: str = "auto"
    """Expert-compute backend: ``"auto"``, ``"torch"`` or ``"triton"``."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form user metadata stored with the adapter (not interpreted)."""

    def __post_init__(self) -> None:
        self.target_modules = _check_names("target_modules", self.target_modules, allow_none=False)
        self.exclude_modules = _check_names("exclude_modules", self.exclude_modules, allow_none=True)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                _fail("modules_to_save", self.modules_to_save, "a list of module names")
            self.modules_to_save = _check_names("modules_to_save", self.modules_to_save, allow_none=True)
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            _fail("rank", self.rank, "an integer >= 1")
        if not isinstance(self.num_experts, int) or isinstance(self.num_experts, bool) or self.num_experts < 1:
            _fail("num_experts", self.num_experts, "an integer >= 1")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not 1 <= self.top_k <= self.num_experts:
            _fail("top_k", self.top_k, f"an integer in [1, num_experts={self.num_experts}]")
        if not _is_number(self.alpha) or self.alpha <= 0:
            _fail("alpha", self.alpha, "a number > 0")
        for name in ("use_rslora", "renormalize"):  # "false" is a truthy string
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "true or false")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            _fail("dropout", self.dropout, "a probability in [0, 1)")
        for name in ("router_noise_std", "router_init_std", "aux_loss_coef", "z_loss_coef"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                _fail(name, value, "a number >= 0")
        if self.init_lora_weights not in INIT_SCHEMES:
            _fail("init_lora_weights", self.init_lora_weights, f"one of {INIT_SCHEMES}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            _fail("adapter_dtype", self.adapter_dtype, f"one of {ADAPTER_DTYPES}")
        if self.backend not in ("auto", "torch", "triton"):
            _fail("backend", self.backend, "one of ('auto', 'torch', 'triton')")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            _fail("seed", self.seed, "an integer or null")
        if not isinstance(self.extra, dict):
            _fail("extra", self.extra, "a JSON object (dict)")
        try:  # saved as JSON with the adapter: refuse now what save_adapter could not write
            json.dumps(self.extra, allow_nan=False)
        except (TypeError, ValueError) as err:
            _fail("extra", self.extra, f"JSON-serialisable values (strings, finite numbers, lists, dicts): {err}")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict, with the ``method`` name first."""
        return {"method": self.method, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoELoRAConfig":
        """Build ``cls`` from :meth:`to_dict` output; unknown keys are an error naming them."""
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"config is for method {method!r}, not {cls.method!r}; "
                             "use moelora.config_from_dict to pick the class by method.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def make_router(self, *, in_features: int, generator=None):
        """Build this method's router for one wrapped linear with ``in_features`` inputs."""
        from .routers.topk import TopKRouter

        return TopKRouter(in_features=in_features, num_experts=self.num_experts, top_k=self.top_k,
                          renormalize=self.renormalize, noise_std=self.router_noise_std,
                          aux_loss_coef=self.aux_loss_coef, z_loss_coef=self.z_loss_coef,
                          init_std=self.router_init_std, generator=generator)

    @property
    def lora_scale(self) -> float:
        """Per-expert output scale: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (self.rank ** 0.5 if self.use_rslora else self.rank)


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool): NaN/inf in a scale or coefficient only shows up later,
    as a NaN loss, and would be written into the adapter's JSON as non-standard tokens."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def config_from_dict(data: dict[str, Any]) -> MoELoRAConfig:
    """Rebuild any registered config from its dict: :meth:`MoELoRAConfig.to_dict` output (the
    class picked by ``data["method"]``), or the ``{"class_path": ..., "init_args": {...}}`` form
    of a Lightning CLI YAML (what reaches the module when the CLI could not build the class)."""
    if "class_path" in data:
        return _from_class_path(data)
    method = data.get("method")
    if method is None:
        types = {f.name: f.type for c in reversed(list(_CONFIG_REGISTRY.values())) for f in dataclasses.fields(c)}
        unknown = sorted(set(data) - set(types))
        if unknown:
            hint = (f"{unknown} is no field of any moelora method config; MoELoRAConfig fields are "
                    f"{sorted(f.name for f in dataclasses.fields(MoELoRAConfig))}. On the command line check the "
                    "field name in --model.method.init_args.<field>")
        else:
            # jsonargparse drops the YAML's class_path when an override does not parse as its field's type
            typed = ", ".join(f"{k}={v!r} (expected {types[k]})" for k, v in data.items())
            hint = (f"on the command line this means a --model.method.init_args value has the wrong type: {typed}")
        raise ValueError(f"method config {data!r} names no method (no 'method' or 'class_path' key): {hint}. "
                         "In a YAML give class_path (e.g. moelora.MoELoRAConfig) and init_args.")
    if method not in _CONFIG_REGISTRY:
        raise ValueError(f"unknown moelora method {method!r}; known methods: {sorted(_CONFIG_REGISTRY)}")
    return _CONFIG_REGISTRY[method].from_dict(data)


def method_class(path: Any) -> type[MoELoRAConfig]:
    """The method config class a dotted ``class_path`` (``moelora.SiRAConfig``) names; a
    ``ValueError`` naming it and the known ones when it names none."""
    import importlib

    cls = None
    if isinstance(path, str) and "." in path:
        module_name, _, name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), name, None)
        except ImportError:
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, MoELoRAConfig)):
        known = sorted(f"moelora.{c.__name__}" for c in _CONFIG_REGISTRY.values())
        raise ValueError(f"method class_path {path!r} is not a moelora method config; use one of {known}.")
    return cls


def _from_class_path(data: dict[str, Any]) -> MoELoRAConfig:
    """The config named by ``data["class_path"]`` built from ``data["init_args"]``, with the bad
    class path or the unknown fields named (the CLI's own message is only "not a valid dict")."""
    path = data["class_path"]
    cls = method_class(path)
    args = data.get("init_args") or {}
    if not isinstance(args, dict):
        raise ValueError(f"method init_args for {path} must be a mapping of config fields, got {args!r}.")
    return cls.from_dict({"method": cls.method, **args})
