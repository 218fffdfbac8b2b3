"""FlyLoRA's implicit router: no parameters, only the aux-free load-balancing bias.

FlyLoRA (arXiv 2510.08396) has no router network: the frozen sparse projection ``A`` *is* the
router. Per wrapped linear, with ``h = A x`` (``[T, r]``)::

    score = h + d                 ("signed", the official PEFT layer)   or   |h + d|  ("abs", paper text)
    idx   = topk(score, k)        [T, k]   the chosen rank-1 experts (ranks)
    y     = (α/r) · B (h ⊙ onehot(idx))     the bias d only steers selection, never the value

The top-k runs inside :func:`moelora.kernels.rankwise_lora`; this module holds ``d`` and its
update rule, applied outside autograd after each training forward::

    c_i = #real tokens whose top-k contains rank i   (summed over DDP ranks)
    d_i ← d_i + u · sign(mean_j c_j − c_i)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelora.experts import FullPrecisionBuffers

from .base import Routing

SCORES = ("abs", "signed")


class FlyLoRARouter(FullPrecisionBuffers, nn.Module):
    """The balancing bias ``d [r]`` of one FlyLoRA layer and its sign update.

    Args:
        num_ranks: r (= the number of rank-1 experts E).
        top_k: ranks kept per token k.
        score: ``"signed"`` or ``"abs"``.
        bias_update_rate: u (0 = balancing off).
        count_padding: count padding tokens in ``c`` (the official code does; default no).

    Buffers:
        bias: ``[r]`` float32 (float64 after ``model.double()``; a half-precision cast of the model
            leaves it float32), persistent (saved with the adapter and in Lightning checkpoints).
    """

    # In bf16 a ±1e-3 step is lost once |d| ≥ 0.5 (the spacing there is 2⁻⁸): balancing would
    # silently stop after model.bfloat16().
    full_precision_buffers = ("bias",)

    def __init__(self, *, num_ranks: int, top_k: int, score: str = "signed", bias_update_rate: float = 1e-3,
                 count_padding: bool = False) -> None:
        super().__init__()
        if score not in SCORES:
            raise ValueError(f"score={score!r} is invalid: expected one of {SCORES}")
        if not 1 <= top_k <= num_ranks:
            raise ValueError(f"top_k={top_k} is invalid: expected an integer in [1, r={num_ranks}]")
        self.num_experts, self.top_k, self.score = num_ranks, top_k, score
        self.bias_update_rate, self.count_padding = float(bias_update_rate), count_padding
        self.register_buffer("bias", torch.zeros(num_ranks, dtype=torch.float32))
        # The bias the last training forward routed with, before its update. An activation-
        # checkpoint recompute of that forward (in its backward) must pick the same ranks, or the
        # recomputed mask would not match the forward's output and the gradients would be wrong.
        # moelora.checkpoint gives each forward's recompute its own (ForwardContext.saved); this
        # one serves a plain torch.utils.checkpoint.
        self._bias_used: Tensor | None = None

    def routing_bias(self, recomputing: bool) -> Tensor:
        """``[r]`` bias for this forward: the current one, or in a recompute the one its forward used."""
        if recomputing and self._bias_used is not None:
            return self._bias_used
        return self.bias

    def routing(self, topk_idx: Tensor) -> Routing:
        """The routing record of one forward from ``topk_idx [T, k]`` (chosen ranks): the ranks as
        expert ids, unit weights ``[T, k]`` (the value is ``h`` itself, not a gate), no
        probabilities, no aux loss."""
        return Routing(expert_ids=topk_idx, weights=torch.ones(topk_idx.shape, device=topk_idx.device))

    @torch.no_grad()
    def counts(self, topk_idx: Tensor, token_mask: Tensor | None = None) -> Tensor:
        """``[r]`` int64 tokens per rank of this forward, summed over distributed ranks.

        Args:
            topk_idx: ``[T, k]`` chosen ranks.
            token_mask: ``[T]`` bool real tokens, or None (all real). Ignored with ``count_padding``.
        """
        # scatter_add, not bincount or a boolean index: on CUDA both read a value back (a sync).
        ones = torch.ones_like(topk_idx)
        if token_mask is not None and not self.count_padding:
            ones = ones * token_mask.reshape(-1, 1).to(ones.dtype)
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=topk_idx.device)
        return all_reduce_counts(counts.scatter_add_(0, topk_idx.reshape(-1), ones.reshape(-1)))

    @torch.no_grad()
    def update(self, topk_idx: Tensor, token_mask: Tensor | None = None) -> None:
        """Apply ``d ← d + u · sign(mean(c) − c)`` for one training forward (no autograd), with
        ``c [r]`` the :meth:`counts` of ``topk_idx [T, k]`` over the ``token_mask [T]`` tokens.

        A collective under ``torch.distributed``: every rank must call it for the same layers in
        the same order (as DDP's forwards do), and all ranks end with the same bias.
        """
        if self.bias_update_rate == 0:
            return
        step = bias_step(self.counts(topk_idx, token_mask))
        self._bias_used = self.bias.clone()
        self.bias.add_(step.to(self.bias.device, self.bias.dtype), alpha=self.bias_update_rate)

    def extra_repr(self) -> str:
        return (f"num_ranks={self.num_experts}, top_k={self.top_k}, score={self.score!r}, "
                f"bias_update_rate={self.bias_update_rate}")


def bias_step(counts: Tensor) -> Tensor:
    """``sign(mean(c) − c)`` in exact integer arithmetic: ``sign(Σ_j c_j − r · c_i)``; ``counts [r]``."""
    counts = counts.long()
    return torch.sign(counts.sum() - counts.numel() * counts)


def all_reduce_counts(counts: Tensor) -> Tensor:
    """Sum ``counts`` over the default process group when one is initialised (else unchanged)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return counts
    # gloo reduces CPU tensors only; NCCL needs them on the GPU (where the counts already are).
    on_cpu = dist.get_backend() == "gloo" and counts.device.type != "cpu"
    buf = counts.cpu() if on_cpu else counts.clone()
    dist.all_reduce(buf)
    return buf.to(counts.device) if on_cpu else buf
