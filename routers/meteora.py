"""MeteoRA gate: one ``Linear(d_in, N)`` per wrapped linear over N imported LoRA adapters.

MeteoRA (arXiv 2405.13053; research/methods.md §4.3) gates every LoRA-wrapped linear on that
linear's own input ``x`` and routes each token to k of the N adapters::

    l = W_g x                                  [T, N]   fp32
    training:   p = softmax(l); (w, ids) = topk(p, k); w = w / Σ w      (Mixtral style)
    inference:  (v, ids) = topk(l, k);          w = softmax(v / T)      (T = temperature)

At T = 1 the two give the same weights; they differ in which path the official code runs
(training needs the first, the accelerated inference kernel implements the second).

Optional gate supervision: when per-token task ids are set on the model (``moelora.set_task_ids``)
each gate adds ``coef / G · CE(l[valid], task_ids[valid])`` to its aux loss, where G is the
number of gates. Summed by ``moelora.aux_loss`` this is ``coef · CE`` over the logits of all gates
concatenated, with equal weight, as MeteoRA's ``lora_gate_loss_func``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelora.kernels.ops import autocast_off, device_constant

from .base import Routing, router_logits, top_k


class MeteoRARouter(nn.Module):
    """Top-k gate over imported LoRA adapters with temperature and task-id supervision.

    Args:
        in_features: d_in of the wrapped linear (the gate sees the same input).
        num_experts: N, the number of adapters (experts); adapter i is gate output i.
        top_k: k, adapters per token (1 <= k <= N).
        temperature: T of the inference softmax over the top-k logits (> 0).
        renormalize: in training, divide the kept top-k probabilities by their sum.
        noise_std: Gaussian noise std on the logits in training (0 = off).
        gate_loss_coef: weight of the task-id cross-entropy (applied only when task ids are set).
        init_std: gate weights start N(0, init_std²) (MeteoRA's own code uses 1.0).
        generator: optional RNG for a reproducible init.
    """

    def __init__(self, *, in_features: int, num_experts: int, top_k: int, temperature: float = 1.0,
                 renormalize: bool = True, noise_std: float = 0.0, gate_loss_coef: float = 0.0,
                 init_std: float = 0.02, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        self.num_experts, self.top_k, self.temperature = num_experts, top_k, float(temperature)
        self.renormalize, self.noise_std, self.gate_loss_coef = renormalize, noise_std, gate_loss_coef
        # fp32 whatever the model dtype: routing decisions are brittle in low precision.
        self.gate = nn.Linear(in_features, num_experts, bias=False, dtype=torch.float32)
        with torch.no_grad():
            if init_std > 0:
                self.gate.weight.normal_(0.0, init_std, generator=generator)
            else:
                self.gate.weight.zero_()
        # Static routing override (see moelora.select_experts): [N] weights or None.
        self.forced: Tensor | None = None
        # Task id (an adapter index in the model-wide numbering) → this gate's expert, -1 where
        # the layer dropped that adapter (WeightLoRA); None = the same numbering. Set with the ids.
        self.task_lookup: tuple[int, ...] | None = None
        # The model-wide AdapterState (for task ids and the gate count); bound by set_task_ids.
        object.__setattr__(self, "_state", None)

    def bind_state(self, state) -> None:
        """Let this gate read the model's per-token task ids (``state.task_ids``)."""
        object.__setattr__(self, "_state", state)

    def logits(self, x: Tensor) -> Tensor:
        """``[T, d_in]`` → ``[T, N]`` gate logits, float32 (float64 after ``model.double()``), also
        under autocast."""
        if self.gate.weight.dtype in (torch.float32, torch.float64):
            with autocast_off(x.device.type):
                return self.gate(x.to(self.gate.weight.dtype))  # through the module: its hooks see the logits
        return router_logits(x, self.gate.weight, self.gate.bias)  # after model.half(): upcast the gate

    def forward(self, x: Tensor, *, token_mask: Tensor | None = None) -> Routing:
        """Route ``x [T, d_in]``; ``token_mask [T]`` bool excludes padding from the gate loss."""
        clean = logits = self.logits(x)
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        if self.training:
            probs = logits.softmax(dim=-1)
            weights, expert_ids = top_k(probs, self.top_k)
            if self.renormalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        else:
            probs = (logits / self.temperature).softmax(dim=-1)
            top, expert_ids = top_k(logits, self.top_k)
            weights = (top / self.temperature).softmax(dim=-1)
        if self.forced is not None:
            expert_ids, weights = self._forced_routing(x.shape[0], logits)
        return Routing(expert_ids=expert_ids, weights=weights, probs=probs,
                       aux_loss=self._gate_loss(clean, token_mask))  # supervises W_g x, not the noise

    def _forced_routing(self, num_tokens: int, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Every token to the experts with a non-zero forced weight, with those weights."""
        forced = self.forced.cpu()  # select_experts keeps it on the host: nonzero() without a device sync
        ids = forced.nonzero().view(-1)
        if ids.numel() == 0:  # none of the chosen adapters is kept in this layer (WeightLoRA)
            return (torch.full((num_tokens, 1), -1, dtype=torch.long, device=logits.device),
                    logits.new_zeros(num_tokens, 1))
        expert_ids = device_constant(ids.tolist(), logits.device).view(1, -1).expand(num_tokens, -1)
        weights = device_constant(forced[ids].tolist(), logits.device, logits.dtype)
        weights = weights.view(1, -1).expand(num_tokens, -1)
        return expert_ids, weights

    def _gate_loss(self, logits: Tensor, token_mask: Tensor | None) -> Tensor | None:
        """``coef / G · mean CE`` of this gate's logits against the current per-token task ids."""
        state = self._state
        task_ids = None if state is None else getattr(state, "task_ids", None)
        if not self.training or self.gate_loss_coef == 0 or task_ids is None:
            return None
        target = state.task_ids_for(logits.shape[0])
        if target is None:
            raise ValueError(
                f"moelora task_ids hold {task_ids.numel()} ids (shape {list(task_ids.shape)}) but this gate sees "
                f"{logits.shape[0]} rows: pass one id per token of input_ids (shape [batch, seq]) to "
                "moelora.set_task_ids right before the forward (a per-sequence layer such as a pooler needs "
                "one id per sequence).")
        target = target.to(logits.device).long()
        if self.task_lookup is not None:
            lut = device_constant(self.task_lookup, logits.device)
            target = torch.where(target >= 0, lut[target.clamp(min=0, max=lut.numel() - 1)], -1)
        valid = target >= 0
        if token_mask is not None:
            valid = valid & token_mask
        num_gates = max(len(getattr(state, "wrapped", ())), 1)
        # Mean CE over the supervised tokens, masked rather than indexed: a boolean index (and a
        # check that any token is supervised) would read the device back in every gate. With no
        # supervised token the loss is 0, still in the graph.
        ce = F.cross_entropy(logits, target.clamp(min=0), reduction="none")
        ce = torch.where(valid, ce, 0).sum() / valid.sum().clamp(min=1)
        return (self.gate_loss_coef / num_gates) * ce

    def extra_repr(self) -> str:
        return (f"in_features={self.gate.in_features}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"temperature={self.temperature}")
