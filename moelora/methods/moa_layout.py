"""Where MoA's experts sit inside a transformer block, per architecture (block detection).

MoA names its experts by *type*: a LoRA on ``q, k, v, o`` (attention) or ``up, gate, down`` (FFN),
a parallel ``adapter`` beside the FFN and a ``prompt`` expert inside attention. A
:class:`BlockLayout` maps those types onto module paths inside one block and says where the
router reads the block input and where the parallel adapter is added:

- ``decoder`` (found by structure: Llama, Qwen2, Mistral, Qwen3, ...): ``q/k/v/o`` =
  ``self_attn.{q,k,v,o}_proj``, ``up/gate/down`` = ``mlp.{up,gate,down}_proj``; the router reads
  the input (residual) or output (normed) of ``input_layernorm``; ``mlp(h) + w·P(h)``.
- ``bert`` (BERT, RoBERTa, MiniLM, ...): ``q/k/v`` = ``attention.self.{query,key,value}``,
  ``o`` = ``attention.output.dense``, ``up`` = ``intermediate.dense``, ``down`` = ``output.dense``,
  no ``gate``; the router reads the input of ``attention`` (post-LN: the block input is already
  normalised, so ``residual`` and ``normed`` coincide); ``LN(FFN(h) + h + w·P(h))``: P is added to
  ``BertOutput``'s residual input, before its LayerNorm.
- ``custom`` (``MoAConfig(block_class=...)``): types from ``type_modules``, the router on the input
  or output of ``norm_module`` (else the block input), ``ffn_module(h) + w·P(h)``.

Users override any type's path with ``MoAConfig.type_modules`` and name an unknown block class
with ``block_class``. The prompt expert is supported only where its hooks are known to be exact
(:data:`PROMPT_ATTENTION`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

from moelora.targeting import is_linear_like

LORA_TYPES = ("q", "k", "v", "o", "up", "gate", "down")
#: Order of the router's outputs, as the official code: [Q, K, V, (prompt), O | UP, GATE, DOWN | adapter].
TYPE_ORDER = ("q", "k", "v", "prompt", "o", "up", "gate", "down", "adapter")
#: Attention classes whose forward the prompt expert hooks exactly: it needs the query projection's
#: output, RoPE from ``position_embeddings`` and the o-projection input, and nothing in between that
#: changes q (Qwen3's per-head q_norm would, so it is not listed).
PROMPT_ATTENTION = frozenset({"LlamaAttention", "Qwen2Attention"})


@dataclass(frozen=True)
class BlockLayout:
    """Module paths inside one transformer block (relative to the block).

    Attributes:
        kind: ``"decoder"``, ``"bert"`` or ``"custom"``.
        types: LoRA type → path of the linear it adapts (types the block lacks are absent).
        router_site: path of the first module the block calls on its input (its input is the
            block input, i.e. the residual stream), or ``None`` = route in a pre-hook on the block.
        site_is_norm: ``router_site`` is the block's input norm, so its output is the normed input.
        ffn: path of the FFN module the parallel adapter sits beside.
        ffn_mode: ``"output"``: ``ffn(h) + w·P(h)`` with ``h`` the FFN input; ``"residual"``: the FFN
            output module takes ``(hidden, input_tensor=h)`` and adds ``h`` before its LayerNorm
            (BERT's ``BertOutput``), so ``w·P(h)`` is added to that residual input.
        attention: path of the attention module (for the prompt expert), or ``None``.
    """

    kind: str
    types: dict[str, str] = field(default_factory=dict)
    router_site: str | None = None
    site_is_norm: bool = False
    ffn: str | None = None
    ffn_mode: str = "output"
    attention: str | None = None


DECODER = BlockLayout(
    kind="decoder",
    types={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "up": "mlp.up_proj", "gate": "mlp.gate_proj", "down": "mlp.down_proj"},
    router_site="input_layernorm", site_is_norm=True, ffn="mlp", ffn_mode="output", attention="self_attn")
BERT = BlockLayout(
    kind="bert",
    types={"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
           "o": "attention.output.dense", "up": "intermediate.dense", "down": "output.dense"},
    router_site="attention", site_is_norm=False, ffn="output", ffn_mode="residual", attention="attention.self")
#: Known layouts with the paths that identify them (a module holding all of them is a block).
KNOWN_LAYOUTS: tuple[tuple[BlockLayout, tuple[str, ...]], ...] = (
    (DECODER, ("input_layernorm", "self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")),
    (BERT, ("attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense")),
)
_KNOWN_HELP = ("decoder layers holding input_layernorm, self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj "
               "(Llama, Qwen2, Mistral, ...) and BERT-style layers holding attention.self.{query,key,value}, "
               "attention.output.dense, intermediate.dense and output.dense (BERT, RoBERTa, MiniLM)")


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _known_layout(block: nn.Module) -> BlockLayout | None:
    for layout, marks in KNOWN_LAYOUTS:
        if all(_has(block, p) for p in marks):
            return layout
    return None


def _repeated_classes(model: nn.Module) -> list[str]:
    """Class names of modules kept in a ``ModuleList`` (where transformer blocks usually live)."""
    names: list[str] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for child in module:
                if type(child).__name__ not in names:
                    names.append(type(child).__name__)
    return names


def find_blocks(model: nn.Module, *, block_class: str | None = None, type_modules: dict[str, str] | None = None,
                norm_module: str | None = None, ffn_module: str | None = None) -> list[tuple[str, BlockLayout]]:
    """Every transformer block of ``model`` in module order, with its layout (overrides applied).

    Args:
        block_class: class name of the blocks; ``None`` = find them by structure (outermost
            modules that hold one of the known layouts' identifying paths).
        type_modules / norm_module / ffn_module: user overrides of the layout's paths.

    Raises:
        ValueError: no block found (the message names the model's repeated module classes and how
            to pass ``block_class``), or ``block_class`` names an unknown structure without
            ``type_modules``.
    """
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue  # keep outermost blocks only (a block never holds another block)
        if block_class is not None:
            if type(module).__name__ == block_class:
                found.append((name, module))
        elif _known_layout(module) is not None:
            found.append((name, module))
    if not found:
        if block_class is not None:
            raise ValueError(f"MoAConfig.block_class={block_class!r} matches no module of {type(model).__name__}; "
                             f"classes it repeats in ModuleLists: {_repeated_classes(model)}.")
        raise ValueError(
            f"MoA found no transformer block in {type(model).__name__}: it knows {_KNOWN_HELP}. Name the block "
            f"class and map the expert types onto its modules, e.g. MoAConfig(block_class="
            f"{(_repeated_classes(model) or ['MyBlock'])[0]!r}, type_modules={{'q': 'attn.q', 'down': 'mlp.fc_out'}}, "
            "norm_module='ln_1', ffn_module='mlp'). Classes this model repeats in ModuleLists: "
            f"{_repeated_classes(model)}.")
    out = []
    for name, block in found:
        layout = _known_layout(block)
        if layout is None:
            if not type_modules:
                raise ValueError(f"MoA does not know the structure of {type(block).__name__} ({name}); it knows "
                                 f"{_KNOWN_HELP}. Map the expert types onto its modules with MoAConfig.type_modules, "
                                 "e.g. {'q': 'attn.q', 'down': 'mlp.fc_out'} (paths inside the block).")
            layout = BlockLayout(kind="custom")
        out.append((name, apply_overrides(layout, type_modules=type_modules, norm_module=norm_module,
                                          ffn_module=ffn_module)))
    return out


def apply_overrides(layout: BlockLayout, *, type_modules: dict[str, str] | None, norm_module: str | None,
                    ffn_module: str | None) -> BlockLayout:
    """``layout`` with the user's type paths, input norm and FFN module put in."""
    changes: dict = {}
    if type_modules:
        changes["types"] = {**layout.types, **type_modules}
    if norm_module is not None:
        changes.update(router_site=norm_module, site_is_norm=True)
    if ffn_module is not None:
        changes.update(ffn=ffn_module, ffn_mode="output")
    return replace(layout, **changes)


def check_block(model: nn.Module, name: str, layout: BlockLayout, *, lora_types: list[str], adapter: bool,
                prompt: bool, router_input: str) -> dict[str, str]:
    """Validate one block for the requested experts; return ``{type: full module name}`` of its LoRAs.

    Raises:
        ValueError: a requested type has no path or its module is missing / not linear, the FFN or
            input norm is missing, or the prompt expert is requested for an architecture it does
            not support (the message names the class).
    """
    block = model.get_submodule(name)
    cls = type(block).__name__
    out = {}
    for t in lora_types:
        path = layout.types.get(t)
        if path is None:
            raise ValueError(f"MoA LoRA type {t!r} has no module in {cls} ({name}); its types map to "
                             f"{layout.types}. Drop {t!r} from lora_types or map it with "
                             f"type_modules={{{t!r}: 'path'}}.")
        if not _has(block, path):
            raise ValueError(f"MoA LoRA type {t!r} maps to {path!r}, which {cls} ({name}) does not have; "
                             "fix it with MoAConfig.type_modules (paths inside the block).")
        if not is_linear_like(block.get_submodule(path)):
            kind = type(block.get_submodule(path)).__name__
            raise ValueError(f"MoA LoRA type {t!r} maps to {name}.{path}, a {kind}; only nn.Linear and "
                             "transformers' Conv1D can carry a LoRA.")
        out[t] = f"{name}.{path}" if name else path
    if adapter and (layout.ffn is None or not _has(block, layout.ffn)):
        raise ValueError(f"MoA's parallel adapter needs the FFN module of {cls} ({name}), but {layout.ffn!r} "
                         "is not there; name it with MoAConfig.ffn_module or set parallel_adapter=False.")
    if layout.router_site is not None and not _has(block, layout.router_site):
        raise ValueError(f"MoA's router reads the input of {layout.router_site!r}, which {cls} ({name}) does not "
                         "have; name the block's input norm with MoAConfig.norm_module.")
    if router_input == "normed" and layout.kind == "custom" and not layout.site_is_norm:
        raise ValueError(f"router_input='normed' needs the input norm of {cls} ({name}): name it with "
                         "MoAConfig.norm_module, or use router_input='residual'.")
    if prompt:
        attn = block.get_submodule(layout.attention) if layout.attention and _has(block, layout.attention) else None
        attn_cls = type(attn).__name__ if attn is not None else "no attention module known"
        if attn_cls not in PROMPT_ATTENTION:
            raise ValueError(f"MoA's prompt expert is not supported for {cls} ({attn_cls}): it hooks the query "
                             f"projection, RoPE and the o-projection input of {sorted(PROMPT_ATTENTION)} only. "
                             "Set prompt_expert=False for this architecture.")
    return out
