"""One MoA block at run time: the router, the block-level experts and the hooks that place them.

``MoABlock`` is added to each transformer block as a new child named ``moa`` (so its weights save
as ``<block>.moa.router.*``, ``<block>.moa.adapter.*``, ``<block>.moa.prompt.*``). Forward hooks,
installed when the adapter is attached and removed by ``moelora.unwrap``, put it to work:

    router site (input_layernorm / BERT attention)  → route(block input, or the norm's output)
    LoRA linears (MoALoRALinear)                     → read their type's weight from the block
    FFN (mlp / BertOutput)                           → + w_adapter · P(h)
    attention (Llama/Qwen2, prompt expert on)        → q_proj output and RoPE captured,
                                                       + w_prompt · o_p added to the o_proj input

Routing happens inside the block's forward, so an activation-checkpoint recompute routes again,
identically, instead of reusing a stale weight; statistics are recorded only by the real forward.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from moelora.balance import recomputing
from moelora.routers.moa import MoAGates, MoARouter
from moelora.state import AdapterState

from .moa_experts import ParallelAdapter, PromptExpert, ddp_touch


def _first_input(args: tuple, kwargs: dict, name: str = "hidden_states") -> Tensor:
    return args[0] if args else kwargs[name]


class MoABlock(nn.Module):
    """The router and block-level experts of one transformer block (a new child ``moa``).

    Args:
        name: this module's path (``<block>.moa``), the key of its statistics.
        type_names: the block's types in router order (e.g. ``q, k, v, o, down, adapter``).
        router: the :class:`~moelora.routers.moa.MoARouter`.
        adapter / prompt: the parallel adapter and prompt expert, or ``None``.
        state: the model-wide :class:`~moelora.state.AdapterState`.
    """

    records_routing = True  # statistics and dashboard key: ``name``, experts = the types

    def __init__(self, *, name: str, type_names: list[str], router: MoARouter, adapter: ParallelAdapter | None,
                 prompt: PromptExpert | None, state: AdapterState) -> None:
        super().__init__()
        # unwrap() puts ``original_module`` back; None tells it this module was added, so it is deleted.
        self.original_module = None
        self.name, self.type_names = name, tuple(type_names)
        self.router, self.adapter, self.prompt = router, adapter, prompt
        object.__setattr__(self, "_state", state)  # shared by every layer: not a submodule
        self._gates: MoAGates | None = None
        self._query: Tensor | None = None  # prompt expert: this forward's q_proj output and RoPE
        self._rope: tuple[Tensor, Tensor] | None = None
        self.last_expert_ids: Tensor | None = None  # [T, n] type index where active, else -1
        self.last_weights: Tensor | None = None  # [T, n] applied weights of the last forward

    # ------------------------------------------------------------------ routing
    def route(self, x: Tensor) -> None:
        """Route the block's hidden states ``x [..., d]``; record statistics unless recomputing."""
        state = self._state
        if not state.enabled:
            self._gates = None
            return
        flat = x.reshape(-1, x.shape[-1])
        gates = self.router(flat.to(self.router_dtype))
        self._gates = gates
        recompute = recomputing()
        if not recompute:
            self._record(gates, state.mask_for(flat.shape[0], recomputing=recompute))

    @property
    def router_dtype(self) -> torch.dtype:
        return next(self.router.parameters()).dtype

    def gates_for(self, num_tokens: int, who: str) -> MoAGates:
        """This forward's gates, checked to describe ``num_tokens`` tokens."""
        gates = self._gates
        if gates is None:
            raise RuntimeError(f"{who} is a MoA expert but its block ({self.name.rsplit('.', 1)[0]}) has not routed "
                               "this forward: MoA weights come from the block router, so run the whole block "
                               "(or model), not the layer alone.")
        if gates.num_tokens != num_tokens:
            raise RuntimeError(f"{who} sees {num_tokens} tokens but its block routed {gates.num_tokens}: MoA needs "
                               "every expert of a block to see the block's tokens (turn off feed-forward chunking).")
        return gates

    def clear(self) -> None:
        """Drop this forward's gates and captures (after the block's forward)."""
        self._gates, self._query, self._rope = None, None, None

    @torch.no_grad()
    def _record(self, gates: MoAGates, mask: Tensor | None) -> None:
        n = len(self.type_names)
        ids = torch.arange(n, device=gates.probs.device).expand(gates.num_tokens, n)
        if gates.active is not None:
            ids = torch.where(gates.active, ids, -1)
        state = self._state
        tasks = state.task_ids_for(gates.num_tokens)
        state.tracker.record(self.name, n, ids, gates.probs, None, mask, task_ids=tasks,
                             num_tasks=state.task_rows() if tasks is not None else None)
        self.last_expert_ids, self.last_weights = ids, gates.weights.detach()

    @property
    def expert_names(self) -> list[str]:
        """The block's experts for statistics and the routing report: its types, in router order."""
        return list(self.type_names)

    def type_index(self, type_name: str) -> int:
        return self.type_names.index(type_name)

    # ------------------------------------------------------------------ block-level experts
    def adapter_delta(self, h: Tensor) -> Tensor:
        """``w_adapter · P(h)`` for the FFN input ``h [..., d]`` → ``[..., d]`` in ``h``'s dtype;
        under Sparse MoA computed on the active tokens only (exact zeros elsewhere)."""
        flat = h.reshape(-1, h.shape[-1])
        gates = self.gates_for(flat.shape[0], f"{self.name}.adapter")
        t = self.type_index("adapter")
        w, idx = gates.weight(t), gates.index(t)
        x = flat.to(self.adapter.up.weight.dtype)
        if idx is None:
            out = self.adapter(x) * w.unsqueeze(1)
        else:
            out = x.new_zeros(x.shape)
            if idx.numel():
                part = self.adapter(x.index_select(0, idx)) * w.index_select(0, idx).unsqueeze(1)
                out = out.index_add(0, idx, part.to(out.dtype))  # autocast may have made it bf16
            out = ddp_touch(out, self.adapter, self.router)
        return out.view(h.shape).to(h.dtype)

    def prompt_delta(self, attn: nn.Module, attn_out: Tensor) -> Tensor:
        """``w_prompt · o_p`` for the o-projection input ``attn_out [B, S, H·dh]`` of ``attn``."""
        if self._query is None or self._rope is None:
            raise RuntimeError(f"{self.name}: the prompt expert found no query / position embeddings for this "
                               "forward (the attention module was called in an unexpected way).")
        B, S = attn_out.shape[:2]
        dh = attn.head_dim
        q = self._query.view(B, S, -1, dh).transpose(1, 2)
        cos, sin = self._rope
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        q = rope(q, q, cos, sin)[0]
        k_proj, v_proj = (getattr(m, "base_layer", m) for m in (attn.k_proj, attn.v_proj))  # frozen projections
        o = self.prompt.attend(q, k_proj, v_proj, num_kv_groups=attn.num_key_value_groups, scaling=attn.scaling)
        gates = self.gates_for(B * S, f"{self.name}.prompt")
        w = gates.weight(self.type_index("prompt")).view(B, S, 1)
        self._query, self._rope = None, None
        return (o * w.to(o.dtype)).to(attn_out.dtype)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, types={list(self.type_names)}"


# ---------------------------------------------------------------------------------------- hooks
# Classes, not closures, so injected models stay picklable (ddp_spawn, deepcopy).
class _RouteOnInput:
    """Forward pre-hook on the router site: route on its input (the block's residual stream)."""

    def __init__(self, moa: MoABlock) -> None:
        self.moa = moa

    def __call__(self, module, args, kwargs) -> None:
        self.moa.route(_first_input(args, kwargs))


class _RouteOnOutput:
    """Forward hook on the block's input norm: route on its output (the normed hidden state)."""

    def __init__(self, moa: MoABlock) -> None:
        self.moa = moa

    def __call__(self, module, args, output) -> None:
        self.moa.route(output)


class _Clear:
    """Forward hook on the block: drop the gates (the next forward, or a recompute, routes anew)."""

    def __init__(self, moa: MoABlock) -> None:
        self.moa = moa

    def __call__(self, module, args, output) -> None:
        self.moa.clear()


class _AdapterOnOutput:
    """Forward hook on the FFN: ``ffn(h) + w · P(h)``."""

    def __init__(self, moa: MoABlock) -> None:
        self.moa = moa

    def __call__(self, module, args, kwargs, output):
        if not self.moa._state.enabled:
            return None
        return output + self.moa.adapter_delta(_first_input(args, kwargs))


class _AdapterOnResidual:
    """Forward pre-hook on BERT's FFN output module ``LN(dropout(dense(i)) + input_tensor)``:
    ``input_tensor`` is the FFN input ``h``, so ``h + w·P(h)`` there adds the adapter beside the FFN
    and before the post-LayerNorm (without the FFN's dropout)."""

    def __init__(self, moa: MoABlock) -> None:
        self.moa = moa

    def __call__(self, module, args, kwargs):
        if not self.moa._state.enabled:
            return None
        if len(args) > 1:
            h = args[1]
            return (args[0], h + self.moa.adapter_delta(h), *args[2:]), kwargs
        h = kwargs["input_tensor"]
        return args, {**kwargs, "input_tensor": h + self.moa.adapter_delta(h)}


class _PromptPositions:
    """Forward pre-hook on the attention: keep this forward's ``position_embeddings`` (cos, sin)."""

    def __init__(self, moa: MoABlock) -> None:
        self.moa = moa

    def __call__(self, module, args, kwargs) -> None:
        rope = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        self.moa._rope = rope if self.moa._state.enabled else None


class _PromptQuery:
    """Forward hook on ``q_proj``: keep its output (LoRA included), the prompt expert's queries."""

    def __init__(self, moa: MoABlock) -> None:
        self.moa = moa

    def __call__(self, module, args, output) -> None:
        self.moa._query = output if self.moa._state.enabled else None


class _PromptAdd:
    """Forward pre-hook on ``o_proj``: add ``w · o_p`` to its input, so the O-LoRA sees it too."""

    def __init__(self, moa: MoABlock, attn: nn.Module) -> None:
        self.moa, self.attn = moa, attn

    def __call__(self, module, args):
        if not self.moa._state.enabled:
            return None
        x = args[0]
        return (x + self.moa.prompt_delta(self.attn, x), *args[1:])


class InstallHooks:
    """``AdapterPlan`` hook: after the modules are in place, hook every MoA block into its host.

    Args:
        blocks: ``(block name, layout, moa holder)`` per block.
        router_input: ``"residual"`` or ``"normed"``.
    """

    def __init__(self, blocks: list, router_input: str) -> None:
        self.blocks, self.router_input = blocks, router_input

    def __call__(self, model: nn.Module) -> list:
        handles = []
        for name, layout, moa in self.blocks:
            block = model.get_submodule(name)
            site = block.get_submodule(layout.router_site) if layout.router_site else block
            if self.router_input == "normed" and layout.site_is_norm:
                handles.append(site.register_forward_hook(_RouteOnOutput(moa)))
            else:
                handles.append(site.register_forward_pre_hook(_RouteOnInput(moa), with_kwargs=True))
            if layout.router_site:
                # Routing happens inside the block's forward (recomputed under checkpointing), so the
                # gates can go when the block is done. A block-level pre-hook runs outside
                # transformers' checkpointed forward: its gates must stay for the recompute.
                handles.append(block.register_forward_hook(_Clear(moa), always_call=True))
            if moa.adapter is not None:
                ffn = block.get_submodule(layout.ffn)
                if layout.ffn_mode == "residual":
                    handles.append(ffn.register_forward_pre_hook(_AdapterOnResidual(moa), with_kwargs=True))
                else:
                    handles.append(ffn.register_forward_hook(_AdapterOnOutput(moa), with_kwargs=True))
            if moa.prompt is not None:
                attn = block.get_submodule(layout.attention)
                handles.append(attn.register_forward_pre_hook(_PromptPositions(moa), with_kwargs=True))
                handles.append(attn.q_proj.register_forward_hook(_PromptQuery(moa)))
                handles.append(attn.o_proj.register_forward_pre_hook(_PromptAdd(moa, attn)))
        return handles
