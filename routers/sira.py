"""SiRA router: sparse top-k gating with expert capacity, token dropping and expert dropout.

SiRA (arXiv 2311.09179) has no official code; the paper's abstract fixes only "top-k routing
with a capacity limit" and "expert dropout on top of the gating network". Everything else
follows GShard / DeepSpeed conventions and is a switch (see ``moelora.SiRAConfig`` for the
defaults and ``research/methods.md`` §2.3 for the sources)::

    logits = W_g x                                   [T, E]   fp32
    p      = softmax(logits)                         [T, E]   (reported, used by the aux loss)
    g      = ExpertDropout(p)                        [T, E]   training only; alive mask m [T, E]
    ids    = topk(g over alive experts, k)           [T, k]   dead experts are never chosen
    C_g    = max(min_capacity, ceil(k · cf · S_g / E))         per routing group g
    keep   = rank of (t, j) among expert e's slots in group g  <  C_g
    w      = g[t, ids] · keep   (renormalised over the kept slots)

A slot that is not kept has ``expert_ids = -1`` and weight 0, so it contributes exactly nothing;
a token with no kept slot gets exactly the base layer's output.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelora.balance import switch_loss, z_loss
from moelora.kernels.reference import topk_lowest_index

from .base import Routing, router_logits

DROP_POLICIES = ("position", "probability")
FILL_ORDERS = ("slot_major", "token_major")
DROPOUT_PLACEMENTS = ("probs", "logits", "inverted")

# Capacity is computed in float64 and snapped by this tolerance before ceil, so that decimal
# factors behave as written: 1.1 · 10 tokens is 11.000000000000002 in binary and must give 11.
_CEIL_TOL = 1e-6


def expert_capacity(real_tokens: Tensor, *, top_k: int, capacity_factor: float, num_experts: int,
                    min_capacity: int) -> Tensor:
    """``C = max(min_capacity, ceil(k · capacity_factor · S / E))`` per group.

    Args:
        real_tokens: ``[G]`` int, real (non-padding) tokens S of each routing group.

    Returns:
        ``[G]`` int64 capacities.
    """
    raw = top_k * capacity_factor * real_tokens.double() / num_experts
    return torch.ceil(raw - _CEIL_TOL).clamp(min=min_capacity).long()


def capacity_keep(expert_ids: Tensor, scores: Tensor, group: Tensor, capacity: Tensor, *, num_experts: int,
                  drop_policy: str = "position", fill_order: str = "slot_major") -> Tensor:
    """Which slots fit in their expert's capacity (vectorised; no per-token loop).

    Within each (group, expert) bucket, slots are ranked by priority and the first ``C_g`` are
    kept. Priority is the fill order (``slot_major``: every token's first choice in token order,
    then every second choice, ... as GShard; ``token_major``: token order, a token's slots
    together, as DeepSpeed's ``topkgating``); with ``drop_policy="probability"`` slots are ranked
    by ``scores`` (highest first) and the fill order only breaks ties.

    Args:
        expert_ids: ``[T, k]`` int64, ``-1`` = a slot that takes no capacity (padding, dead expert).
        scores: ``[T, k]`` float, the gate value of each slot (used by ``"probability"`` only).
        group: ``[T]`` int64 routing group of each token, in ``[0, G)``.
        capacity: ``[G]`` int64 capacity per group (the same for every expert).

    Returns:
        ``[T, k]`` bool, True where the slot is kept (always False where ``expert_ids == -1``).
    """
    T, k = expert_ids.shape
    num_buckets = capacity.numel() * num_experts
    valid = expert_ids >= 0
    # Invalid slots go to a sentinel bucket after every real one, so they never take a place.
    bucket = torch.where(valid, group.view(-1, 1) * num_experts + expert_ids.clamp(min=0), num_buckets)
    if fill_order == "slot_major":
        bucket, scores = bucket.t(), scores.t()  # flat index = j·T + t
    flat_bucket, flat_scores = bucket.reshape(-1), scores.reshape(-1)
    n = flat_bucket.numel()
    if drop_policy == "probability":
        order = torch.sort(flat_scores.detach(), descending=True, stable=True).indices
    else:
        order = torch.arange(n, device=flat_bucket.device)
    # A stable sort by bucket keeps the priority order inside each bucket: rank = offset in it.
    by_bucket = torch.sort(flat_bucket[order], stable=True)
    # scatter_add rather than bincount: CUDA's bincount reads the maximum back (a device sync).
    counts = torch.zeros(num_buckets + 1, dtype=torch.long, device=flat_bucket.device)
    counts.scatter_add_(0, by_bucket.values, torch.ones_like(by_bucket.values))
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(n, device=flat_bucket.device) - starts[by_bucket.values]
    rank = torch.empty_like(rank_sorted)
    rank[order[by_bucket.indices]] = rank_sorted
    cap = torch.cat([capacity, capacity.new_zeros(1)])  # sentinel bucket: capacity 0
    keep = rank < cap[flat_bucket // num_experts]
    keep = keep.view(k, T).t() if fill_order == "slot_major" else keep.view(T, k)
    return keep & valid


class SiRARouter(nn.Module):
    """Top-k softmax router with expert capacity, token dropping and expert dropout (SiRA).

    Args:
        in_features: d_in.
        num_experts: E.
        top_k: k, 1 <= k <= E.
        capacity_factor: training capacity factor; ``None`` = no capacity limit.
        eval_capacity_factor: capacity factor in eval mode; ``None`` = no capacity limit.
        min_capacity: lower bound on the capacity of a group (>= 0).
        group_size: tokens per routing group (consecutive flattened tokens); ``None`` = the
            whole forward's tokens are one group.
        drop_policy: ``"position"`` (earlier first) or ``"probability"`` (highest gate first).
        fill_order: ``"slot_major"`` (all first choices before second choices, GShard) or
            ``"token_major"`` (token order, DeepSpeed ``topkgating``).
        expert_dropout: probability of dropping an expert for a token, training only.
        expert_dropout_placement: ``"probs"`` (mask the probabilities), ``"logits"`` (−inf
            before the softmax) or ``"inverted"`` (mask and rescale by 1/(1−p)).
        renormalize: divide the kept gate values by their sum.
        renormalize_after_drop: the sum is over the slots kept after capacity dropping (True,
            DeepSpeed) or over the top-k slots before dropping (False: a dropped slot's share is lost).
        noise_std: Gaussian noise std on the logits in training (0 = off).
        aux_loss_coef: weight of the Switch loss (top-k form, pre-drop assignment).
        z_loss_coef: weight of the router z-loss.
        init_std: router weights start N(0, init_std²).
        generator: RNG for the weight init (dropout and noise use the global RNG).
    """

    def __init__(self, *, in_features: int, num_experts: int, top_k: int,
                 capacity_factor: float | None = 1.25, eval_capacity_factor: float | None = 2.0,
                 min_capacity: int = 4, group_size: int | None = None, drop_policy: str = "position",
                 fill_order: str = "slot_major", expert_dropout: float = 0.0,
                 expert_dropout_placement: str = "probs", renormalize: bool = True,
                 renormalize_after_drop: bool = True, noise_std: float = 0.0, aux_loss_coef: float = 0.0,
                 z_loss_coef: float = 0.0, init_std: float = 0.02,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        for name, value, allowed in (("drop_policy", drop_policy, DROP_POLICIES),
                                     ("fill_order", fill_order, FILL_ORDERS),
                                     ("expert_dropout_placement", expert_dropout_placement, DROPOUT_PLACEMENTS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is invalid: expected one of {allowed}")
        if not 0.0 <= expert_dropout < 1.0:
            raise ValueError(f"expert_dropout={expert_dropout!r} is invalid: expected a probability in [0, 1)")
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.min_capacity, self.group_size = min_capacity, group_size
        self.drop_policy, self.fill_order = drop_policy, fill_order
        self.expert_dropout, self.expert_dropout_placement = expert_dropout, expert_dropout_placement
        self.renormalize, self.renormalize_after_drop = renormalize, renormalize_after_drop
        self.noise_std, self.aux_loss_coef, self.z_loss_coef = noise_std, aux_loss_coef, z_loss_coef
        # Same parameter name, shape and init as TopKRouter: with capacity and dropout off the
        # two routers are interchangeable (and a seeded init gives the same weights).
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, dtype=torch.float32))
        with torch.no_grad():
            self.weight.normal_(0.0, init_std, generator=generator) if init_std > 0 else self.weight.zero_()

    # ------------------------------------------------------------------ pieces
    def logits(self, x: Tensor) -> Tensor:
        """``[T, d_in]`` → ``[T, E]`` float32 logits, also under autocast (:func:`router_logits`)."""
        return router_logits(x, self.weight)

    def active_capacity_factor(self) -> float | None:
        """The capacity factor of the current mode (train or eval)."""
        return self.capacity_factor if self.training else self.eval_capacity_factor

    def sample_expert_mask(self, probs: Tensor) -> Tensor:
        """``[T, E]`` bool: True where the expert survives expert dropout (Bernoulli(1 − p)).

        One independent draw per (token, expert), like standard dropout on the gate output.
        A separate method so tests can substitute a known mask.
        """
        return torch.rand(probs.shape, device=probs.device) >= self.expert_dropout

    def groups(self, num_tokens: int, device: torch.device) -> tuple[Tensor, int]:
        """Routing group of each token: ``([T] int64, G)``; consecutive chunks of ``group_size``."""
        if self.group_size is None or num_tokens == 0:
            return torch.zeros(num_tokens, dtype=torch.long, device=device), 1
        group = torch.arange(num_tokens, device=device) // self.group_size
        return group, -(-num_tokens // self.group_size)

    def _gate(self, logits: Tensor, probs: Tensor) -> tuple[Tensor, Tensor | None]:
        """Apply expert dropout: ``(g [T, E], alive [T, E] bool or None)``."""
        if not (self.training and self.expert_dropout > 0):
            return probs, None
        alive = self.sample_expert_mask(probs)
        placement = self.expert_dropout_placement
        if placement == "probs":
            return probs * alive, alive
        if placement == "inverted":
            return probs * alive / (1.0 - self.expert_dropout), alive
        # "logits": softmax over the surviving experts only. A token whose experts all died would
        # give 0/0; softmax its clean logits instead (finite gradients) and zero the result.
        none_alive = ~alive.any(dim=-1, keepdim=True)
        masked = torch.where(alive | none_alive, logits, float("-inf"))
        return torch.where(none_alive, 0.0, masked.softmax(dim=-1)), alive

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, *, token_mask: Tensor | None = None) -> Routing:
        """Route ``x [T, d_in]``.

        Args:
            x: ``[T, d_in]`` tokens (any float dtype; routed in fp32).
            token_mask: ``[T]`` bool real tokens. Padding tokens get no expert (all slots −1),
                take no capacity, are not counted as dropped and are left out of the aux loss.

        Returns:
            :class:`Routing` with ``expert_ids [T, k]`` (−1 = dropped / dead / padding),
            ``weights [T, k]`` fp32 (0 on −1 slots), ``probs [T, E]`` (clean softmax, before
            expert dropout), ``aux_loss`` (training only) and ``dropped [E]`` capacity drops.
        """
        T = x.shape[0]
        logits = self.logits(x)
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        probs = logits.softmax(dim=-1)
        gate, alive = self._gate(logits, probs)
        # Dead experts rank below every survivor (even one whose probability underflowed to 0).
        score = gate if alive is None else gate.masked_fill(~alive, float("-inf"))
        ids = topk_lowest_index(score, self.top_k)  # ties to the lowest index (see base.top_k)
        valid = torch.ones_like(ids, dtype=torch.bool) if alive is None else alive.gather(1, ids)
        if token_mask is not None:
            valid = valid & token_mask.view(-1, 1)
        routed = torch.where(valid, ids, -1)  # pre-capacity assignment
        raw = torch.where(valid, gate.gather(1, ids), 0.0)

        cf = self.active_capacity_factor()
        if cf is None:
            kept = valid
        else:
            group, num_groups = self.groups(T, x.device)
            real = torch.ones(T, dtype=torch.long, device=x.device) if token_mask is None else token_mask.long()
            real_per_group = torch.zeros(num_groups, dtype=torch.long, device=x.device).index_add(0, group, real)
            capacity = expert_capacity(real_per_group, top_k=self.top_k, capacity_factor=cf,
                                       num_experts=self.num_experts, min_capacity=self.min_capacity)
            kept = capacity_keep(routed, raw, group, capacity, num_experts=self.num_experts,
                                 drop_policy=self.drop_policy, fill_order=self.fill_order)
        dropped_slots = valid & ~kept
        # scatter_add over a mask, not bincount of a boolean index: both of those sync on CUDA.
        dropped = torch.zeros(self.num_experts, dtype=torch.long, device=ids.device)
        dropped = dropped.scatter_add_(0, ids.reshape(-1), dropped_slots.reshape(-1).long())

        weights = torch.where(kept, raw, 0.0)
        if self.renormalize:
            denom = (weights if self.renormalize_after_drop else raw).sum(dim=-1, keepdim=True)
            # eps clamp as DeepSpeed: a token with no kept slot stays all-zero instead of 0/0.
            weights = weights / denom.clamp(min=torch.finfo(weights.dtype).eps)
        return Routing(expert_ids=torch.where(kept, ids, -1), weights=weights, probs=probs,
                       aux_loss=self._aux(logits, probs, routed, token_mask), dropped=dropped)

    def _aux(self, logits: Tensor, probs: Tensor, routed: Tensor, token_mask: Tensor | None) -> Tensor | None:
        """Switch loss on the pre-capacity assignment and clean probabilities, plus z-loss."""
        if not self.training or (self.aux_loss_coef == 0 and self.z_loss_coef == 0):
            return None
        loss = logits.new_zeros(())
        if self.aux_loss_coef > 0:
            loss = loss + self.aux_loss_coef * switch_loss(probs, routed, token_mask)
        if self.z_loss_coef > 0:
            loss = loss + self.z_loss_coef * z_loss(logits, token_mask)
        return loss

    def extra_repr(self) -> str:
        return (f"in_features={self.weight.shape[1]}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"capacity_factor={self.capacity_factor}, eval_capacity_factor={self.eval_capacity_factor}, "
                f"drop_policy={self.drop_policy!r}, expert_dropout={self.expert_dropout}")
