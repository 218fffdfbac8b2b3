"""MoA's three kinds of expert: a LoRA on a block's linear, a parallel adapter, a prompt expert.

Each expert is scaled, per token, by its type's weight from the block router (``moa_block``).
Under Sparse MoA a LoRA or parallel adapter runs only on the tokens where its type is active:
those rows are gathered, computed and scatter-added back, so a skipped token costs that expert
nothing and sends it no gradient. The prompt expert is dense under both variants (as the official
code: attention over shared prompt keys is not a per-token computation), scaled by the applied
weight, which is exactly 0 where the type is inactive.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moelora.experts import ExpertBank
from moelora.kernels import gated_lora
from moelora.layer import MoELoRALinear
from moelora.state import AdapterState


def _xavier(d_in: int, d_out: int, gain: float, generator: torch.Generator | None, dtype: torch.dtype) -> nn.Linear:
    """``nn.Linear`` with ``xavier_uniform_(gain)`` weights and zero bias, drawn from ``generator``."""
    layer = nn.Linear(d_in, d_out, dtype=dtype)
    bound = gain * math.sqrt(6.0 / (d_in + d_out))
    with torch.no_grad():
        layer.weight.copy_(torch.rand(d_out, d_in, generator=generator) * (2 * bound) - bound)
        layer.bias.zero_()
    return layer


class ParallelAdapter(nn.Module):
    """``P(h) = up(SiLU(down(h)))``, beside the FFN: ``[..., d] → [..., d]``.

    Both weights start ``xavier_uniform_(gain=init_gain)`` (official: 1e-4) and both biases at 0, so
    the adapter starts close to (not exactly at) zero, as in the official code.
    """

    def __init__(self, *, hidden_size: int, adapter_size: int, init_gain: float = 1e-4,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.down = _xavier(hidden_size, adapter_size, init_gain, generator, dtype)
        self.up = _xavier(adapter_size, hidden_size, init_gain, generator, dtype)

    def forward(self, h: Tensor) -> Tensor:
        """``h [..., d]`` → ``P(h) [..., d]``."""
        return self.up(F.silu(self.down(h)))


class PromptExpert(nn.Module):
    """LLaMA-Adapter-style prompt: ``L`` learnable tokens attended to through the frozen k/v projections.

    ``o_p = gate_h · softmax(q k_pᵀ · scaling) v_p`` per head ``h``, with ``k_p = W_k P``,
    ``v_p = W_v P`` (no RoPE on prompt keys; the queries carry theirs) and a separate softmax over
    the prompt keys. ``gate [H]`` starts at 0 (no tanh), so the expert starts as a no-op.

    Args:
        hidden_size: d (the prompt tokens live in the residual stream's space).
        num_heads: attention heads H.
        prompt_len: L.
    """

    def __init__(self, *, hidden_size: int, num_heads: int, prompt_len: int = 10,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        # nn.Embedding's default init, N(0, 1), as the official prompt table.
        self.prompt = nn.Parameter(torch.randn(prompt_len, hidden_size, generator=generator).to(dtype))
        self.gate = nn.Parameter(torch.zeros(num_heads, dtype=dtype))

    def attend(self, q: Tensor, k_proj: nn.Module, v_proj: nn.Module, *, num_kv_groups: int, scaling: float) -> Tensor:
        """``q [B, H, S, dh]`` (with RoPE) → gated prompt attention output ``[B, S, H·dh]``.

        ``k_proj`` / ``v_proj`` are the frozen base projections (``[L, d] → [L, H_kv·dh]``); each
        key/value head serves ``num_kv_groups`` query heads (grouped-query attention).
        """
        B, H, S, dh = q.shape
        dtype = self.prompt.dtype
        weight = getattr(k_proj, "weight", None)
        p = self.prompt.to(weight.dtype) if isinstance(weight, Tensor) and weight.is_floating_point() else self.prompt
        kp = k_proj(p).to(dtype).view(p.shape[0], -1, dh).transpose(0, 1)  # [H_kv, L, dh]
        vp = v_proj(p).to(dtype).view(p.shape[0], -1, dh).transpose(0, 1)
        kp = kp.repeat_interleave(num_kv_groups, dim=0)  # kv head i serves query heads i·g .. i·g+g-1
        vp = vp.repeat_interleave(num_kv_groups, dim=0)
        scores = torch.matmul(q.to(dtype), kp.transpose(-1, -2)) * scaling  # [B, H, S, L]
        # At least float32 for the softmax (the prompt expert is fragile in bf16, as the official port notes).
        attn = torch.softmax(scores, dim=-1, dtype=torch.promote_types(dtype, torch.float32)).to(dtype)
        out = torch.matmul(attn, vp) * self.gate.view(1, H, 1, 1)  # [B, H, S, dh]
        return out.transpose(1, 2).reshape(B, S, H * dh)


class MoATypeGate(nn.Module):
    """The ``router`` slot of a MoA LoRA layer: no parameters, the weights come from the block
    router. Names the layer's one expert after its type (the dashboard shows it)."""

    num_experts = 1
    top_k = 1

    def __init__(self, type_name: str) -> None:
        super().__init__()
        self.type_name = type_name
        self.expert_names = [type_name]

    def extra_repr(self) -> str:
        return f"type={self.type_name!r}"


def ddp_touch(out: Tensor, *modules: nn.Module) -> Tensor:
    """``out`` plus an exact zero that depends on every trainable parameter of ``modules``, under
    ``torch.distributed`` in a differentiable forward only.

    A sparse expert that ran for no token of this rank's batch gets no gradient, and DDP's
    reducer then fails the step (or needs ``find_unused_parameters=True``, which walks the graph
    every step); so does the block's router when no type ran at all. With this their gradient is
    a zero instead, which all-reduces with the other ranks' real gradients. Outside DDP nothing is
    added (a skipped expert keeps ``grad is None``).
    """
    dist = torch.distributed
    if not (torch.is_grad_enabled() and dist.is_available() and dist.is_initialized()):
        return out
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    if not params:
        return out
    return out + torch.stack([p.reshape(-1)[0] for p in params]).sum().to(out.dtype) * 0


class MoALoRALinear(MoELoRALinear):
    """A frozen linear plus one LoRA expert of type ``type_name``, scaled per token by the type's
    weight from its block's router: ``y = base(x) + w_t(x) · (α_t/r_t) · B A dropout(x)``.

    Args:
        block: the block's :class:`~moelora.methods.moa_block.MoABlock` (a reference, not a
            submodule: it is saved under its own name).
        type_name / type_index: the type and its column in the block's weights.
        (others as :class:`~moelora.layer.MoELoRALinear`; ``bank`` holds one expert.)
    """

    records_routing = False  # the block records its types' routing

    def __init__(self, *, base_layer: nn.Module, bank: ExpertBank, name: str, state: AdapterState, block: nn.Module,
                 type_name: str, type_index: int, dropout: float = 0.0, backend: str = "auto") -> None:
        super().__init__(base_layer=base_layer, bank=bank, router=MoATypeGate(type_name), name=name, state=state,
                         dropout=dropout, backend=backend)
        object.__setattr__(self, "_block", block)
        self.type_name, self.type_index = type_name, type_index

    def _expert_delta(self, flat: Tensor, mask: Tensor | None, recompute: bool) -> Tensor:
        """``[T, d_out]`` for tokens ``flat [T, d_in]``: the scaled LoRA on the tokens where this
        type runs (all of them under Soft MoA), exact zeros elsewhere."""
        gates = self._block.gates_for(flat.shape[0], self.name)
        w = gates.weight(self.type_index)
        idx = gates.index(self.type_index)
        bank = self.bank
        if idx is None:
            delta = self._lora(flat, w)
        else:
            delta = flat.new_zeros(flat.shape[0], bank.out_features, dtype=bank.A.dtype)
            if idx.numel():
                part = self._lora(flat.index_select(0, idx), w.index_select(0, idx))
                delta = delta.index_add(0, idx, part.to(delta.dtype))  # autocast may have made it bf16
            delta = ddp_touch(delta, bank, self._block.router)
        if not recompute:
            active = torch.ones_like(w, dtype=torch.bool) if gates.active is None else gates.active[:, self.type_index]
            self.last_expert_ids = torch.where(active, 0, -1).unsqueeze(1)
            self.last_weights = w.detach().unsqueeze(1)
        return delta

    def _lora(self, x: Tensor, w: Tensor) -> Tensor:
        """``w[t] · scale · B A dropout(x_t)`` for ``x [n, d_in]``, ``w [n]`` → ``[n, d_out]``."""
        bank = self.bank
        ids = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)
        return gated_lora(self._expert_input(x), bank.A, bank.Bt, ids, w.unsqueeze(1), bank.col_expert,
                          bank.col_scale(), num_experts=1, backend=self.backend, ranks=bank.ranks,
                          check_layout=False)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, type={self.type_name!r}, backend={self.backend!r}"
